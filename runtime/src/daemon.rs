//! One daemon `main` for `farm-node` and `farm-coordinator` ([`main`]): settings, logging, the
//! tokio runtime, the listener, the run until SIGTERM or Ctrl-C ([`shutdown_signal`]), exit codes.
//!
//! Exit codes: 0 after a clean shutdown, 2 for settings that cannot be used (before anything
//! started; the message on stderr, as clap does for a bad flag), 1 for a failure at start-up or
//! while running. Every message on stderr starts with the daemon's name.

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use tokio::net::TcpListener;
use tracing_subscriber::fmt::MakeWriter;

/// Runs a daemon: `config` is its parsed settings (its error ends the process with exit code 2),
/// `listen` the address to bind, `log_writer` where tracing writes (filtered by `RUST_LOG`, `info`
/// by default), `run` the daemon itself, given the bound listener and the shutdown signal.
pub fn main<C, E, W, R, F, RE>(
    name: &str,
    config: Result<C, E>,
    listen: impl FnOnce(&C) -> SocketAddr,
    log_writer: W,
    run: R,
) -> ExitCode
where
    E: Display,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
    R: FnOnce(C, TcpListener, Shutdown) -> F,
    F: Future<Output = Result<(), RE>>,
    RE: Display,
{
    let cfg = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(log_writer)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = listen(&cfg);
    rt.block_on(async move {
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("{name}: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        match run(cfg, listener, Box::pin(shutdown_signal())).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{name}: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// The shutdown signal [`main`] hands the daemon.
pub type Shutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Completes on SIGTERM or Ctrl-C (SIGINT); on Ctrl-C alone where SIGTERM cannot be watched.
pub async fn shutdown_signal() {
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
