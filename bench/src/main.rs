//! `farm-bench`: the farm's performance figures, each side by side with its anchor, in one run.
//!
//! `cargo run --release -p farm-bench -- [--quick]` builds what it runs, measures,
//! prints a table and writes `target/farm-bench/report.json`. The logic is in the `farm_bench` library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use farm_bench::{self as bench, Options, Phase};

#[derive(Debug, Parser)]
#[command(
    name = "farm-bench",
    about = "streamfarm benchmark: node vs nginx throughput, Redis cost per request, coordinator tick, \
time to first playlist vs raw ffmpeg, per-stream CPU/RSS (node and guard), failover time, \
hostile load (first-request burst, 100k import)",
    max_term_width = 100
)]
struct Cli {
    /// Short rounds and fewer trials (the abuse phase takes as long either way: about 40 s).
    #[arg(long)]
    quick: bool,
    /// Run only these phases (comma-separated): rps, tick, ttfp, scale, failover, viewer, abuse.
    #[arg(long, value_delimiter = ',', value_parser = Phase::parse)]
    only: Vec<Phase>,
    /// Where to write the JSON report [default: target/farm-bench/report.json].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not run `cargo build` for farm-node, fake-ffmpeg and farm-coordinator first.
    #[arg(long)]
    no_build: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = cli.out.clone().unwrap_or_else(bench::default_out);
    // Fail before a long run, not after it, when the report cannot be written.
    if let Err(e) = out
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&out)
        })
    {
        eprintln!(
            "farm-bench: cannot write the report to {}: {e}",
            out.display()
        );
        return ExitCode::from(2);
    }
    let command = std::iter::once("farm-bench".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let warnings = match bench::util::build_binaries(!cli.no_build) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("farm-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    for w in &warnings {
        eprintln!("farm-bench: warning: {w}");
    }
    let opts = Options {
        quick: cli.quick,
        only: cli.only,
        command,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("farm-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = rt.block_on(bench::run(&opts));
    println!("{}\n", report.header());
    print!("{}", report.table());
    let mut json = report.json();
    json["warnings"] = serde_json::json!(warnings);
    let written = out
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            std::fs::write(
                &out,
                serde_json::to_string_pretty(&json).unwrap_or_default() + "\n",
            )
        });
    match written {
        Ok(()) => println!("\nreport: {}", out.display()),
        Err(e) => {
            eprintln!("farm-bench: cannot write {}: {e}", out.display());
            return ExitCode::FAILURE;
        }
    }
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    if report.failed_phases().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
