//! The `farm-coordinator` binary: parse settings, set up logging, run until SIGTERM or Ctrl-C (see
//! `farm_runtime::daemon`).

use clap::Parser;
use farm_coordinator::config::{Args, Config};
use std::process::ExitCode;

fn main() -> ExitCode {
    farm_runtime::daemon::main(
        "farm-coordinator",
        Config::from_args(Args::parse()),
        |cfg| cfg.listen,
        std::io::stderr,
        farm_coordinator::run,
    )
}
