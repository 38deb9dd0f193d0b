//! `farm-coordinator`: the farm's coordinator and the operator CLI's logic.
//!
//! The coordinator is the only component that decides a channel is idle or a node is dead. Several
//! may run; one leads ([`leader`]). Each tick the leader ([`tick`]) stops idle channels, reaps dead
//! nodes and re-homes their watched channels, and reconciles stale keys; every write it makes is a
//! Lua script fenced by the leader lease. [`run`] owns the process's life: the named background
//! tasks (`leader`, `tick`, `http`), their supervision, and a bounded graceful shutdown that gives
//! the leader lease up.
//!
//! - [`ctl`]: `farmctl`, the operator CLI, as a library (`ctl::run`) so it can be tested without
//!   spawning a process; `src/bin/farmctl.rs` only parses arguments and maps errors to exit codes.

pub mod config;
pub mod ctl;
pub mod events;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod store;
pub mod tick;
pub mod view;

use crate::config::Config;
use crate::leader::{Campaign, Leadership};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use crate::tick::{TickReport, TickState};
use farm_proto::Keys;
use futures::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("invalid configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("background task {task} ended: {why}")]
    Task { task: &'static str, why: String },
}

/// What the coordinator's tasks share.
pub struct Shared {
    pub cfg: Config,
    pub keys: Keys,
    pub store: Store,
    pub metrics: Metrics,
    leadership: Mutex<Leadership>,
}

impl Shared {
    pub fn new(cfg: Config) -> Result<Self, CoordinatorError> {
        cfg.check()?;
        let store = Store::new(&cfg.redis_url, cfg.redis_timeout, cfg.stall_threshold())?;
        Ok(Self {
            keys: Keys::new(cfg.prefix.clone()),
            store,
            metrics: Metrics::new(),
            leadership: Mutex::new(Leadership::default()),
            cfg,
        })
    }

    /// A snapshot of this coordinator's leadership.
    pub fn leadership(&self) -> Leadership {
        self.leadership
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn update_leadership(&self, f: impl FnOnce(&mut Leadership)) {
        f(&mut self.leadership.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// A coordinator driven step by step: [`Coordinator::campaign`] and [`Coordinator::tick`]. [`run`]
/// drives one with timers; tests and benchmarks call the steps themselves.
pub struct Coordinator {
    shared: Arc<Shared>,
    state: TickState,
}

impl Coordinator {
    pub fn new(cfg: Config) -> Result<Self, CoordinatorError> {
        Ok(Self {
            shared: Arc::new(Shared::new(cfg)?),
            state: TickState::default(),
        })
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// One round of the leader election (acquire or renew).
    pub async fn campaign(&self) -> Result<Campaign, StoreError> {
        leader::campaign(&self.shared).await
    }

    /// One tick (does its work only while leading).
    pub async fn tick(&mut self) -> Result<TickReport, StoreError> {
        tick::tick(&self.shared, &mut self.state).await
    }

    /// Gives the leader lease up by compare.
    pub async fn resign(&self) {
        leader::resign(&self.shared).await
    }
}

/// Runs the coordinator until `shutdown` completes (or a background task fails), then stops its
/// tasks within `shutdown_grace` and releases the leader lease.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let mut coord = Coordinator::new(cfg)?;
    let sh = coord.shared();
    let cfg = &sh.cfg;
    info!(
        id = %cfg.id,
        listen = %cfg.listen,
        idle_timeout = ?cfg.idle_timeout,
        tick = ?cfg.tick,
        node_ttl = ?cfg.node_ttl,
        leader_ttl = ?cfg.leader_ttl,
        "farm-coordinator starting"
    );
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    // Every task reports its end here; an end before cancellation is a failure of the process.
    let (ended_tx, mut ended_rx) = mpsc::channel::<(&'static str, Result<(), String>)>(4);
    let supervise =
        |name: &'static str, fut: futures::future::BoxFuture<'static, Result<(), String>>| {
            let ended = ended_tx.clone();
            tracker.spawn(
                async move {
                    let r = match AssertUnwindSafe(fut).catch_unwind().await {
                        Ok(r) => r,
                        Err(_) => Err("panicked".to_string()),
                    };
                    let _ = ended.send((name, r)).await;
                }
                .instrument(info_span!("task", name)),
            );
        };

    supervise(
        "leader",
        leader::leader_loop(sh.clone(), cancel.clone())
            .map(Ok)
            .boxed(),
    );
    let c = cancel.clone();
    supervise(
        "tick",
        async move {
            tick_loop(&mut coord, c).await;
            Ok(())
        }
        .boxed(),
    );
    let server = axum::serve(listener, http::app(sh.clone()))
        .with_graceful_shutdown(cancel.clone().cancelled_owned());
    supervise(
        "http",
        async move { server.await.map_err(|e| format!("http server: {e}")) }.boxed(),
    );
    drop(ended_tx);

    let mut failure = None;
    tokio::select! {
        _ = shutdown => info!("shutdown requested"),
        Some((task, r)) = ended_rx.recv() => {
            let why = r.err().unwrap_or_else(|| "returned".into());
            error!(task, %why, "background task ended unexpectedly; shutting down");
            failure = Some(CoordinatorError::Task { task, why });
        }
    }
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(cfg.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        warn!(grace = ?cfg.shutdown_grace, "background tasks did not stop within the shutdown grace");
    }
    // Only after the tick task stopped: no write of ours can follow the release.
    leader::resign(&sh).await;
    info!("farm-coordinator stopped");
    failure.map_or(Ok(()), Err)
}

/// The `tick` task: one tick every `tick`, until cancelled. A failed tick is logged and retried at
/// the next one (the Redis health record makes the next ticks hold their reaps).
async fn tick_loop(coord: &mut Coordinator, cancel: CancellationToken) {
    let sh = coord.shared();
    let mut interval = tokio::time::interval(sh.cfg.tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = interval.tick() => {}
        }
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            r = coord.tick() => r,
        };
        match r {
            Ok(report) if report.leading => debug!(?report, "tick"),
            Ok(_) => {}
            Err(e) => {
                sh.metrics.redis_errors.inc();
                warn!(error = %e, "tick failed");
            }
        }
    }
}
