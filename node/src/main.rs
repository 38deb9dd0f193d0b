//! The `farm-node` binary: parse settings, set up logging, run until SIGTERM or Ctrl-C. Run as
//! `farm-node __guard` by the node itself, it is the node's guard process.

use clap::Parser;
use farm_node::config::{Args, Config};
use std::process::ExitCode;

fn main() -> ExitCode {
    // The node's guard is this binary too (see `farm_node::guard`); it takes no flags.
    if farm_node::guard::is_guard_invocation() {
        return farm_node::guard::main();
    }
    let cfg = match Config::from_args(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("farm-node: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        // One line per event, whatever a field holds (a command's reason, an FFmpeg line...).
        .with_writer(farm_node::logging::Escaping(std::io::stderr))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("farm-node: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(cfg.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("farm-node: cannot listen on {}: {e}", cfg.listen);
                return ExitCode::FAILURE;
            }
        };
        match farm_node::run(cfg, listener, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("farm-node: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
