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
use crate::guard::GuardTask;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::store::Store;
use crate::watcher::{Dispatcher, HlsWatcher};
use farm_runtime::tasks::{Policy, Tasks};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
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
    Http(String),
    #[error(transparent)]
    Task(#[from] farm_runtime::tasks::TaskFailed),
}

/// Runs the node on `listener` until `shutdown` completes (or a critical background task ends),
/// then stops every channel, releases leases and deregisters, within `shutdown_grace`.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let cfg = Arc::new(cfg);
    let (node, dispatcher, guard_task) = start(&cfg, &listener).await?;
    info!(node = %cfg.node_id, incarnation = %node.incarnation, listen = %cfg.listen, ffmpeg_sandbox = node.sandbox.enforced(), "farm-node starting");
    let mut tasks = Tasks::new();
    // The guard outlives the channels (it must fence them until they are stopped): its own token,
    // cancelled after they are.
    let guard_cancel = CancellationToken::new();
    spawn_tasks(&tasks, &node, dispatcher, guard_task, guard_cancel.clone())?;
    // What a connection may cost, the connection cap fitted under this process's fd limit.
    let limits = server::Limits::new(&cfg, server::fd_limit());
    let server = server::serve(
        listener,
        http::app(node.clone()),
        limits,
        node.metrics.clone(),
        node.cancel.clone(),
        cfg.shutdown_grace,
    );
    tasks.spawn(
        "http",
        Policy::Critical,
        server.instrument(info_span!("http")),
    );
    let cancel = node.cancel.clone();
    let failure = tasks
        .until(async move {
            tokio::select! {
                _ = shutdown => {}
                _ = cancel.cancelled() => {}
            }
        })
        .await;
    node.cancel.cancel();
    stop_channels(&node).await;
    guard_cancel.cancel();
    if let Err(e) = node.store.deregister(&cfg.node_id).await {
        error!(error = %e, "could not deregister; the node's keys expire or are reaped");
    }
    node.watcher.close();
    // The HTTP server drains within `shutdown_grace` from the cancellation; the others end at once.
    let stopped = tasks
        .stop(cfg.shutdown_grace.max(Duration::from_secs(5)))
        .await;
    info!("farm-node stopped");
    match (failure, stopped) {
        (Some(f), _) => Err(f.into()),
        (None, Some(f)) if f.task == "http" => Err(NodeError::Http(f.why)),
        _ => Ok(()),
    }
}

/// Everything the node needs before it serves: the HLS folder (swept), Redis, the file watcher,
/// the sandbox, the egress policy and the guard process.
async fn start(
    cfg: &Arc<Config>,
    listener: &TcpListener,
) -> Result<(Arc<Node>, Dispatcher, GuardTask), NodeError> {
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
        guard::Limits::from_config(cfg),
        metrics.clone(),
    )
    .await
    .map_err(NodeError::Guard)?;
    let node = Node::new(cfg.clone(), store, watcher, metrics, egress, sandbox, guard);
    Ok((node, dispatcher, guard_task))
}

/// The node's background tasks but the HTTP server. Each ends when told to (the node's token; the
/// watcher's when the watcher closes; the guard's on `guard_cancel`), so all are critical but the
/// memory release, which is best effort.
fn spawn_tasks(
    tasks: &Tasks,
    node: &Arc<Node>,
    dispatcher: Dispatcher,
    guard_task: GuardTask,
    guard_cancel: CancellationToken,
) -> Result<(), NodeError> {
    tasks.spawn(
        "watcher",
        Policy::Critical,
        dispatcher.run().instrument(info_span!("watcher")),
    );
    tasks.spawn(
        "access_flush",
        Policy::Critical,
        node::access_flush_loop(node.clone()).instrument(info_span!("access_flush")),
    );
    // After a burst (connections, channel starts), freed memory goes back to the system.
    tasks.spawn(
        "memory_release",
        Policy::Helper,
        memory::release_loop(node.metrics.clone(), node.cancel.clone())
            .instrument(info_span!("memory_release")),
    );
    let n = node.clone();
    // Their gateways died with the guard: stop the running channels (a viewer starts them again).
    let on_lost = move || stop_running(&n, "guard_lost");
    tasks.spawn(
        "guard",
        Policy::Critical,
        guard_task
            .run(guard_cancel, on_lost)
            .instrument(info_span!("guard")),
    );
    tasks.spawn(
        "startup",
        Policy::Critical,
        startup(node.clone()).instrument(info_span!("startup")),
    );
    if let Some(path) = &node.cfg.access_socket {
        let sock = access_log::bind(path)
            .map_err(|e| NodeError::AccessSocket(path.display().to_string(), e))?;
        tasks.spawn(
            "access_log",
            Policy::Critical,
            access_log::run(node.clone(), sock).instrument(info_span!("access_log")),
        );
    }
    Ok(())
}

/// The `startup` task: the Redis half of the start-up sweep, which must finish before this
/// incarnation renews or takes commands, then the keepalive and the command consumer.
async fn startup(n: Arc<Node>) {
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

/// Tells every channel that runs (or is starting) to stop, with `reason`.
fn stop_running(n: &Node, reason: &str) {
    let running = |e: &node::ChannelEntry| {
        e.gen() > 0
            && matches!(
                e.phase(),
                node::Phase::Starting | node::Phase::Ready | node::Phase::Restarting
            )
    };
    for e in n.entries().iter().filter(|e| running(e)) {
        let _ = e.inbox.try_send(node::Ctl::Stop {
            reason: reason.into(),
            done: None,
        });
    }
}

/// Waits (at most `shutdown_grace`) for the channels, which saw the cancellation and stop their
/// FFmpegs; past it, kills what is left and removes their folders.
async fn stop_channels(node: &Node) {
    let grace = node.cfg.shutdown_grace;
    if !farm_runtime::tasks::close_and_wait(&node.tracker, grace).await {
        warn!(
            ?grace,
            "channels did not stop within the shutdown grace; killing their FFmpegs"
        );
        for e in node.entries() {
            let pid = e.state().pid;
            if pid > 0 {
                let _ = ffmpeg::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
            }
            let _ = std::fs::remove_dir_all(&e.dir);
        }
    }
}
