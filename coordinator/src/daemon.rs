//! The coordinator process: [`Coordinator`] (one election round and one tick at a time, for tests
//! and benchmarks) and [`run`], which drives one with timers in named, supervised tasks (`leader`,
//! `tick`, `http`) until shutdown, then stops them within `shutdown_grace` and gives the leader
//! lease up.
//!
//! Invariant: the lease is released only after the tick task stopped, so no write of this
//! coordinator can follow the release.

use crate::config::Config;
use crate::error::CoordinatorError;
use crate::http;
use crate::leader::{self, Campaign};
use crate::shared::Shared;
use crate::store::StoreError;
use crate::tick::{self, TickError, TickReport, TickState};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

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

    /// One tick (does its work only while leading). [`TickError::NotLeader`] when a fenced write
    /// found that another coordinator leads now: this one stops trusting its leadership.
    pub async fn tick(&mut self) -> Result<TickReport, TickError> {
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
    let mut tasks = Tasks::new();
    tasks.spawn(
        "leader",
        leader::leader_loop(sh.clone(), cancel.clone())
            .map(Ok)
            .boxed(),
    );
    let c = cancel.clone();
    tasks.spawn(
        "tick",
        async move {
            tick_loop(&mut coord, c).await;
            Ok(())
        }
        .boxed(),
    );
    let server = axum::serve(listener, http::app(sh.clone()))
        .with_graceful_shutdown(cancel.clone().cancelled_owned());
    tasks.spawn(
        "http",
        async move { server.await.map_err(|e| format!("http server: {e}")) }.boxed(),
    );
    let failure = tasks.until(shutdown).await;
    cancel.cancel();
    tasks.stop(cfg.shutdown_grace).await;
    // Only after the tick task stopped: no write of ours can follow the release.
    leader::resign(&sh).await;
    info!("farm-coordinator stopped");
    failure.map_or(Ok(()), Err)
}

/// The process's named background tasks. Each reports its end; an end before shutdown was asked
/// for is a failure of the process.
struct Tasks {
    tracker: TaskTracker,
    ended_tx: mpsc::Sender<(&'static str, Result<(), String>)>,
    ended_rx: mpsc::Receiver<(&'static str, Result<(), String>)>,
}

impl Tasks {
    fn new() -> Self {
        let (ended_tx, ended_rx) = mpsc::channel(4);
        Self {
            tracker: TaskTracker::new(),
            ended_tx,
            ended_rx,
        }
    }

    /// Runs `fut` as the task `name` (in its span); a panic counts as its end with an error.
    fn spawn(&self, name: &'static str, fut: BoxFuture<'static, Result<(), String>>) {
        let ended = self.ended_tx.clone();
        self.tracker.spawn(
            async move {
                let r = match AssertUnwindSafe(fut).catch_unwind().await {
                    Ok(r) => r,
                    Err(_) => Err("panicked".to_string()),
                };
                let _ = ended.send((name, r)).await;
            }
            .instrument(info_span!("task", name)),
        );
    }

    /// Waits for `shutdown` or the first task's end, which is returned as the failure.
    async fn until(&mut self, shutdown: impl Future<Output = ()>) -> Option<CoordinatorError> {
        tokio::select! {
            _ = shutdown => {
                info!("shutdown requested");
                None
            }
            Some((task, r)) = self.ended_rx.recv() => {
                let why = r.err().unwrap_or_else(|| "returned".into());
                error!(task, %why, "background task ended unexpectedly; shutting down");
                Some(CoordinatorError::Task { task, why })
            }
        }
    }

    /// Waits (at most `grace`) for the tasks, which were told to stop.
    async fn stop(self, grace: Duration) {
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                ?grace,
                "background tasks did not stop within the shutdown grace"
            );
        }
    }
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
            // Logged by the tick; the leader task finds out at its next renewal.
            Err(TickError::NotLeader) => {}
            Err(TickError::Store(e)) => {
                sh.metrics.redis_errors.inc();
                warn!(error = %e, "tick failed");
            }
        }
    }
}
