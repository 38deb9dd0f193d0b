//! The guard process (`farm-node __guard`): its runtime, and the two ends of its control pipe.
//!
//! A thread reads the node's lines from stdin and hands them to the control loop
//! ([`super::control`]), which owns everything else; a task writes its replies and events to
//! stdout. SIGTERM and SIGINT are ignored: the guard ends with its node (EOF on stdin).

use super::control::{run, Outbox};
use super::proto::{Frame, LineSplitter, MAX_LINE};
use std::io::Read;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::{error, warn};

/// The guard's entry point (from `main`, before any argument parsing).
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("farm-node guard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let span = tracing::info_span!("guard", pid = std::process::id());
    rt.block_on(tracing::Instrument::instrument(
        async {
            // Registered and never read: the default action (exit) is replaced for good.
            use tokio::signal::unix::{signal, SignalKind};
            let _ignored = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            );
            let (tx, rx) = mpsc::channel(256);
            if let Err(e) = std::thread::Builder::new()
                .name("guard-stdin".into())
                .spawn(move || read_stdin(tx))
            {
                error!(error = %e, "cannot start the stdin reader");
                return ExitCode::FAILURE;
            }
            let (out, replies, events) = Outbox::new();
            let writer = tokio::spawn(write_stdout(replies, events, out.dropped.clone()));
            let code = run(rx, out, Arc::default()).await;
            writer.abort();
            code
        },
        span,
    ))
}

/// Reads the node's lines until EOF; ends the channel (EOF for the control loop) then.
fn read_stdin(tx: mpsc::Sender<Frame>) {
    let mut stdin = std::io::stdin().lock();
    let mut split = LineSplitter::new(MAX_LINE);
    let mut buf = [0u8; 8192];
    let mut frames = Vec::new();
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                split.push(&buf[..n], &mut frames);
                for f in frames.drain(..) {
                    if tx.blocking_send(f).is_err() {
                        return;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                error!(error = %e, "reading the control pipe failed");
                return;
            }
        }
    }
}

async fn write_stdout(
    mut replies: mpsc::UnboundedReceiver<String>,
    mut events: mpsc::Receiver<String>,
    dropped: Arc<AtomicU64>,
) {
    let mut out = tokio::io::stdout();
    let mut reported = 0;
    loop {
        let line = tokio::select! {
            biased;
            Some(r) = replies.recv() => r,
            Some(e) = events.recv() => e,
            else => return,
        };
        if out.write_all(line.as_bytes()).await.is_err() || out.flush().await.is_err() {
            return;
        }
        let d = dropped.load(Ordering::Relaxed);
        if d != reported {
            warn!(
                dropped = d - reported,
                "events dropped while the node did not read its guard"
            );
            reported = d;
        }
    }
}
