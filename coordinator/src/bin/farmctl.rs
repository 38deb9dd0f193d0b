//! `farmctl`: parses the command line, runs [`farm_coordinator::ctl::run`] on a single-threaded
//! runtime and turns its error into stderr lines and an exit code (0 ok, 2 bad input, 1 failure).

use clap::Parser;
use farm_coordinator::ctl::{self, Cli, CtlError, EXIT_RUNTIME};
use std::io::{self, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse(); // exits 2 on usage errors
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("farmctl: cannot start the async runtime: {e}.");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let mut out = io::BufWriter::new(io::stdout().lock());
    let result = runtime
        .block_on(ctl::run(cli, &mut out))
        .and_then(|()| out.flush().map_err(CtlError::from));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = out.flush(); // whatever was printed before the failure
                                 // nothing more can be done if stderr is gone; the exit code still tells
            let _ = e.report(&mut io::stderr().lock());
            ExitCode::from(e.exit_code())
        }
    }
}
