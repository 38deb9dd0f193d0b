//! One tick of the coordinator. Every coordinator checks the farm-wide keys' types ([`keytypes`])
//! and reads the clock and the node list each tick (so its view of Redis health stays current); only
//! the leader goes on, through the phases in this order:
//!
//! 1. [`idle`]: stop channels nobody watched for `idle_timeout`, drop access entries nobody owns;
//! 2. [`reap`]: reap dead nodes, re-home their watched and pinned channels (failover);
//! 3. [`reconcile`]: drop set entries and stream hashes no lease backs;
//! 4. [`pinned`]: start pinned channels that run nowhere.
//!
//! Each phase reads its facts from Redis, makes a plan with a pure function of those facts (unit
//! tested without Redis), and applies it through [`fenced`] calls.
//!
//! Invariants:
//! - "Now" is Redis `TIME`, never this machine's clock.
//! - Every write is a script that re-checks the leader lease and the facts it acts on (the owner, the
//!   access score, the node's liveness) atomically; what was read before only selects candidates.
//!   A script that finds another leader ends the tick with [`TickError::NotLeader`].
//! - Cost grows with what needs doing, not with the farm: idle channels come from a score range of
//!   `farm:access`, stale keys from a bounded slice per tick (cursors through the live nodes' sets and
//!   the access zset), dead nodes from `farm:nodes`. No KEYS, no SCAN of the keyspace.
//! - Reaping waits `reap_settle` after this coordinator became leader and after its Redis view was
//!   disturbed (a failed call or a stall); it is refused while more than half the nodes look dead.

mod fenced;
mod idle;
mod keytypes;
mod pinned;
mod reap;
mod reconcile;

pub use fenced::CMD_MAXLEN;

use crate::events::{self, Event};
use crate::shared::Shared;
use crate::store::{time_ms, StoreError};
use crate::view::NodeView;
use fenced::Fence;
use std::time::Instant;
use tracing::{error, warn};

/// Why a tick ended early.
#[derive(Debug, thiserror::Error)]
pub enum TickError {
    /// A fenced write found that another coordinator leads now: nothing of this tick's remaining
    /// work was written, and this coordinator stops trusting its leadership.
    #[error("another coordinator leads now: a fenced write was refused")]
    NotLeader,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the tick loop remembers between ticks (one leadership term; a new term starts clean).
#[derive(Debug, Default)]
pub struct TickState {
    /// The leader value the last leading tick ran under.
    term: Option<String>,
    idle: idle::State,
    reap: reap::State,
    reconcile: reconcile::State,
    pinned: pinned::State,
}

/// What one tick did (for logs, tests and the benchmark).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TickReport {
    pub leading: bool,
    /// Redis time of the tick, ms.
    pub now_ms: u64,
    pub nodes_alive: usize,
    pub nodes_dead: usize,
    /// Idle entries read from `farm:access`.
    pub idle_seen: usize,
    pub idle_stops: usize,
    /// Access entries of channels nobody owns, removed.
    pub stale_access: usize,
    /// Why reaping (and maybe idle cleanup) did not run this tick.
    pub held: Option<&'static str>,
    pub nodes_reaped: usize,
    pub channels_reaped: usize,
    pub rehomed: usize,
    /// Pinned channels that ran nowhere and were started.
    pub pinned_started: usize,
    /// Stale stream hashes and set entries removed.
    pub reconciled: usize,
}

/// One leading tick in progress: the fence it writes through, Redis's clock, the farm's nodes,
/// and what it did so far.
struct Pass<'a> {
    sh: &'a Shared,
    fence: Fence<'a>,
    now_ms: u64,
    nodes: &'a [NodeView],
    report: TickReport,
    events: Vec<Event>,
    /// Keys the dead-node reaper and the reconciliation may still remove this tick.
    budget: usize,
}

/// Which phases a leading tick runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Redis was unreachable or stalled within the settle time: accesses and heartbeats that could
    /// not reach it are still on their way, so nothing is stopped or reaped.
    Nothing,
    /// A new term settles: idle stops only (their script re-checks the access score), no reaping.
    IdleOnly,
    All,
}

fn scope(redis_disturbed: bool, new_term: bool) -> Scope {
    match (redis_disturbed, new_term) {
        (true, _) => Scope::Nothing,
        (false, true) => Scope::IdleOnly,
        (false, false) => Scope::All,
    }
}

/// Runs one tick.
pub async fn tick(sh: &Shared, st: &mut TickState) -> Result<TickReport, TickError> {
    let started = Instant::now();
    let mut report = TickReport::default();
    let clock: (String, String) = sh.store.query("TIME", &redis::cmd("TIME")).await?;
    let clock_ms =
        time_ms(&clock).ok_or_else(|| StoreError::protocol("TIME", format!("{clock:?}")))?;
    if !keytypes::check(sh, clock_ms).await? {
        return Ok(report);
    }
    let (now_ms, nodes) = read_nodes(sh).await?;
    report.now_ms = now_ms;
    report.nodes_alive = nodes.iter().filter(|n| n.alive).count();
    sh.metrics.nodes_alive.set(report.nodes_alive as i64);

    let lead = sh.leadership();
    let Some(held) = lead.leading(Instant::now()).map(str::to_string) else {
        if st.term.take().is_some() {
            *st = TickState::default();
        }
        sh.metrics.is_leader.set(0);
        return Ok(report);
    };
    report.leading = true;
    sh.metrics.is_leader.set(1);
    if st.term.as_deref() != Some(held.as_str()) {
        *st = TickState {
            term: Some(held.clone()),
            ..TickState::default()
        };
    }
    let settle = sh.cfg.reap_settle;
    let disturbed = sh
        .store
        .disturbed_at()
        .is_some_and(|t| t.elapsed() < settle);
    let new_term = lead.since.is_some_and(|t| t.elapsed() < settle);
    let mut pass = Pass {
        sh,
        fence: Fence::new(sh, &held),
        now_ms,
        nodes: &nodes,
        report,
        events: Vec::new(),
        budget: sh.cfg.max_reaps,
    };
    let outcome = run_phases(&mut pass, st, scope(disturbed, new_term)).await;
    // Whatever was done is recorded, also when a later step failed.
    let by = sh.cfg.by();
    let emitted = events::emit(&sh.store, &sh.keys.events(), &by, &mut pass.events).await;
    if let Err(TickError::NotLeader) = outcome {
        error!("a fenced write found another leader: stopping this tick");
        sh.lost_leadership();
        if let Err(e) = emitted {
            warn!(error = %e, "could not record the events of this tick");
        }
        count_tick(sh, started);
        return Err(TickError::NotLeader);
    }
    outcome?;
    emitted?;
    count_tick(sh, started);
    Ok(pass.report)
}

/// A leading tick that ran to its end (also one that found another leader) is counted and timed.
fn count_tick(sh: &Shared, started: Instant) {
    sh.metrics
        .tick_duration
        .observe(started.elapsed().as_secs_f64());
    sh.metrics.ticks.inc();
}

async fn run_phases(
    pass: &mut Pass<'_>,
    st: &mut TickState,
    scope: Scope,
) -> Result<(), TickError> {
    match scope {
        Scope::Nothing => {
            pass.report.held = Some("redis_disturbed");
            pass.sh.metrics.refused("redis_disturbed");
            warn!(
                settle = ?pass.sh.cfg.reap_settle,
                "redis was unreachable or stalled recently: not stopping or reaping anything until it has been steady for the settle time"
            );
            Ok(())
        }
        Scope::IdleOnly => {
            idle::run(pass, &mut st.idle).await?;
            pass.report.held = Some("new_leader");
            Ok(())
        }
        Scope::All => {
            idle::run(pass, &mut st.idle).await?;
            reap::run(pass, &mut st.reap).await?;
            reconcile::run(pass, &mut st.reconcile).await?;
            pinned::run(pass, &mut st.pinned).await
        }
    }
}

/// Redis time and every member of `farm:nodes` with its liveness and load.
async fn read_nodes(sh: &Shared) -> Result<(u64, Vec<NodeView>), StoreError> {
    let k = &sh.keys;
    let mut p = redis::pipe();
    p.cmd("TIME")
        .cmd("ZRANGE")
        .arg(k.nodes())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES");
    let (time, members): ((String, String), Vec<(String, f64)>) =
        sh.store.pipe("TIME + ZRANGE nodes", &p).await?;
    let now_ms = time_ms(&time).ok_or_else(|| StoreError::protocol("TIME", format!("{time:?}")))?;
    if members.is_empty() {
        return Ok((now_ms, Vec::new()));
    }
    let mut p = redis::pipe();
    for (id, _) in &members {
        NodeView::queue_reads(&mut p, k, id);
    }
    // One node's wrong-typed hash (an operator's mistake) must not blind the tick to every node.
    p.ignore_errors();
    let replies: Vec<redis::Value> = sh.store.pipe("node liveness", &p).await?;
    if replies.len() != members.len() * NodeView::READS {
        return Err(StoreError::protocol("node liveness", "reply count"));
    }
    let mut nodes = Vec::with_capacity(members.len());
    for ((id, score), r) in members.iter().zip(replies.chunks(NodeView::READS)) {
        if let Some(redis::Value::ServerError(e)) = r.get(1) {
            sh.metrics.data_errors.inc();
            warn!(node = %id, error = ?e, "the node's hash has the wrong type (its next heartbeat replaces it)");
        }
        nodes.push(NodeView::from_reads(id, *score, r).0);
    }
    Ok((now_ms, nodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disturbed_redis_holds_everything_and_a_new_term_holds_reaping() {
        assert_eq!(scope(true, true), Scope::Nothing);
        assert_eq!(scope(true, false), Scope::Nothing);
        assert_eq!(scope(false, true), Scope::IdleOnly);
        assert_eq!(scope(false, false), Scope::All);
    }
}
