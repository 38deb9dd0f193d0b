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
use farm_runtime::tasks::{Policy, Tasks};
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

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
    // Each runs until cancelled: an earlier end stops the coordinator.
    let mut tasks = Tasks::new();
    let c = cancel.clone();
    let s = sh.clone();
    let span = |name: &'static str| info_span!("task", name);
    tasks.spawn(
        "leader",
        Policy::Critical,
        leader::leader_loop(s, c).instrument(span("leader")),
    );
    let c = cancel.clone();
    tasks.spawn(
        "tick",
        Policy::Critical,
        async move { tick_loop(&mut coord, c).await }.instrument(span("tick")),
    );
    let server = axum::serve(listener, http::app(sh.clone()))
        .with_graceful_shutdown(cancel.clone().cancelled_owned());
    tasks.spawn(
        "http",
        Policy::Critical,
        async move { server.await.map_err(|e| format!("http server: {e}")) }
            .instrument(span("http")),
    );
    let failure = tasks.until(shutdown).await;
    cancel.cancel();
    // Errors while stopping were logged; they do not change how the coordinator ends.
    let _ = tasks.stop(cfg.shutdown_grace).await;
    // Only after the tick task stopped: no write of ours can follow the release.
    leader::resign(&sh).await;
    info!("farm-coordinator stopped");
    match failure {
        Some(f) => Err(CoordinatorError::Task {
            task: f.task,
            why: f.why,
        }),
        None => Ok(()),
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
