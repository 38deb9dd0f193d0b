//! `farm-node`: one worker of the farm. It serves channels as HLS, starting one FFmpeg per channel
//! for the whole farm on the first viewer (the lease in Redis decides who), supervises it, records
//! viewer access in memory and flushes it to Redis, and obeys its command stream.
//!
//! [`run`] owns the node's life: start-up sweep, the guard process (see [`guard`]), the named
//! background tasks (watcher dispatcher, keepalive, access flusher, command consumer, guard
//! supervisor, HTTP server), and a bounded graceful shutdown.

pub mod access_log;
pub mod commands;
pub mod config;
pub mod egress;
pub mod error;
pub mod ffmpeg;
pub mod guard;
pub mod hot;
pub mod http;
pub mod limits;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod playlist;
pub mod procs;
pub mod sandbox;
pub mod server;
pub mod store;
pub mod sweep;
pub mod watcher;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::store::Store;
use crate::watcher::HlsWatcher;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{error, info, info_span, warn, Instrument};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot use the HLS folder {0}: {1}")]
    HlsRoot(String, std::io::Error),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot watch files: {0}")]
    Notify(#[from] notify::Error),
    #[error("cannot bind the access socket {0}: {1}")]
    AccessSocket(String, std::io::Error),
    #[error("{0}")]
    Sandbox(String),
    #[error("{0}")]
    Guard(String),
    #[error("http server failed: {0}")]
    Http(std::io::Error),
}

/// Runs the node on `listener` until `shutdown` completes, then stops every channel, releases
/// leases and deregisters, within `shutdown_grace`.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let cfg = Arc::new(cfg);
    std::fs::create_dir_all(&cfg.hls_root)
        .map_err(|e| NodeError::HlsRoot(cfg.hls_root.display().to_string(), e))?;
    let root = cfg.hls_root.clone();
    let disk = tokio::task::spawn_blocking(move || sweep::sweep_disk(&root))
        .await
        .unwrap_or_default();
    if disk != sweep::SweepReport::default() {
        info!(?disk, "start-up sweep of the HLS folder");
    }
    let store = Store::new(&cfg.redis_url, &cfg.prefix, cfg.redis_timeout)?;
    let metrics = Arc::new(Metrics::new());
    let (watcher, dispatcher) = HlsWatcher::new(4096, metrics.notify_overflows.clone())?;
    let sandbox = sandbox::Sandbox::probe(cfg.ffmpeg_sandbox).map_err(NodeError::Sandbox)?;
    metrics.ffmpeg_sandbox.set(i64::from(sandbox.enforced()));
    // The farm's own endpoints: FFmpeg never reaches them, whatever a catalog or upstream says.
    let mut own: Vec<(String, String, u16)> = store
        .target()
        .addresses()
        .into_iter()
        .map(|(h, p)| ("Redis".to_string(), h, p))
        .collect();
    let http = listener.local_addr().unwrap_or(cfg.listen);
    own.push(("node listener".into(), http.ip().to_string(), http.port()));
    let egress = Arc::new(
        egress::Policy::new(&own, cfg.egress_allow.clone(), cfg.egress_deny.clone()).await,
    );
    // The fence outside this process, and the egress gateways with it.
    let (guard, guard_task) = guard::Guard::start(
        std::process::id(),
        cfg.hls_root.clone(),
        egress.spec(),
        guard::Limits::from_config(&cfg),
        metrics.clone(),
    )
    .await
    .map_err(NodeError::Guard)?;
    let node = Node::new(
        cfg.clone(),
        store,
        watcher.clone(),
        metrics,
        egress,
        sandbox,
        guard,
    );
    info!(node = %cfg.node_id, incarnation = %node.incarnation, listen = %cfg.listen, ffmpeg_sandbox = sandbox.enforced(), "farm-node starting");

    // Named background tasks; each ends on cancellation (the watcher's when the watcher closes).
    let background = tokio_util::task::TaskTracker::new();
    background.spawn(dispatcher.run().instrument(info_span!("watcher")));
    background.spawn(node::access_flush_loop(node.clone()).instrument(info_span!("access_flush")));
    // After a burst (connections, channel starts), freed memory goes back to the system.
    background.spawn(
        memory::release_loop(node.metrics.clone(), node.cancel.clone())
            .instrument(info_span!("memory_release")),
    );
    // The guard outlives the channels (it must fence them until they are stopped): its own token,
    // cancelled after they are.
    let guard_cancel = tokio_util::sync::CancellationToken::new();
    let n = node.clone();
    background.spawn(
        guard_task
            .run(guard_cancel.clone(), move || {
                // Their gateways died with the guard: stop them (a viewer starts them again).
                let running = |e: &node::ChannelEntry| {
                    e.gen() > 0
                        && matches!(
                            e.phase(),
                            node::Phase::Starting | node::Phase::Ready | node::Phase::Restarting
                        )
                };
                for e in n.entries().iter().filter(|e| running(e)) {
                    let _ = e.inbox.try_send(node::Ctl::Stop {
                        reason: "guard_lost".into(),
                        done: None,
                    });
                }
            })
            .instrument(info_span!("guard")),
    );
    let n = node.clone();
    background.spawn(
        async move {
            // The Redis half of the sweep must finish before this incarnation renews or takes commands.
            let mut delay = Duration::from_millis(200);
            loop {
                match sweep::sweep_redis(&n.store, &n.cfg.node_id, &n.cfg.hls_root).await {
                    Ok(r) => {
                        if r != sweep::SweepReport::default() {
                            info!(report = ?r, "start-up sweep of redis leftovers");
                        }
                        break;
                    }
                    Err(e) => {
                        warn!(error = %e, retry_in = ?delay, "start-up sweep: redis unavailable");
                        tokio::select! {
                            _ = n.cancel.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
            tokio::join!(
                node::keepalive_loop(n.clone()).instrument(info_span!("keepalive")),
                commands::command_loop(n.clone()).instrument(info_span!("commands")),
            );
        }
        .instrument(info_span!("startup")),
    );

    if let Some(path) = &cfg.access_socket {
        let sock = access_log::bind(path)
            .map_err(|e| NodeError::AccessSocket(path.display().to_string(), e))?;
        background.spawn(access_log::run(node.clone(), sock).instrument(info_span!("access_log")));
    }

    let cancel = node.cancel.clone();
    // What a connection may cost, the connection cap fitted under this process's fd limit.
    let limits = server::Limits::new(&cfg, server::fd_limit());
    let server = server::serve(
        listener,
        http::app(node.clone()),
        limits,
        node.metrics.clone(),
        cancel.clone(),
        cfg.shutdown_grace,
    );
    let server = tokio::spawn(server.instrument(info_span!("http")));
    tokio::select! {
        _ = shutdown => info!("shutdown requested"),
        _ = cancel.cancelled() => {}
    }
    cancel.cancel();

    // Channels see the cancellation and stop their FFmpegs; wait for them, bounded.
    node.tracker.close();
    if tokio::time::timeout(cfg.shutdown_grace, node.tracker.wait())
        .await
        .is_err()
    {
        warn!(grace = ?cfg.shutdown_grace, "channels did not stop within the shutdown grace; killing their FFmpegs");
        for e in node.entries() {
            let pid = e.state().pid;
            if pid > 0 {
                let _ = ffmpeg::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
            }
            let _ = std::fs::remove_dir_all(&e.dir);
        }
    }
    guard_cancel.cancel();
    if let Err(e) = node.store.deregister(&cfg.node_id).await {
        error!(error = %e, "could not deregister; the node's keys expire or are reaped");
    }
    watcher.close();
    background.close();
    if tokio::time::timeout(Duration::from_secs(5), background.wait())
        .await
        .is_err()
    {
        warn!("background tasks did not end within 5s");
    }
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(NodeError::Http(e)),
        Err(e) => error!(error = %e, "http task panicked"),
    }
    info!("farm-node stopped");
    Ok(())
}
