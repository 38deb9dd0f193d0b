//! The farm the failover and viewer phases kill nodes in: Redis, the fake provider with one channel,
//! two nodes and one coordinator (idle timeout 60 s, otherwise [`farm_tests::farm::Timing::Fast`])
//! that leads before the phase starts.

use std::path::Path;
use std::time::{Duration, Instant};

use farm_tests::coordinator::{leader, CoordinatorOpts, CoordinatorProcess};
use farm_tests::farm::{with_values, FAST_COORDINATOR};
use farm_tests::node::{NodeOpts, NodeProcess};
use farm_tests::provider::FakeProvider;
use farm_tests::redis::RedisServer;

use crate::report::{percentile, Figure, Goal, PhaseOutput};
use crate::util::{add_channel, coordinator_bin};

/// The running farm; fields in drop order (the watching connection and the coordinator first, Redis
/// last).
pub struct KillFarm {
    /// A connection to watch the farm with.
    pub c: redis::aio::MultiplexedConnection,
    pub co: CoordinatorProcess,
    pub nodes: Vec<NodeProcess>,
    pub root: tempfile::TempDir,
    pub provider: FakeProvider,
    pub redis: RedisServer,
}

/// Starts the farm in a temp dir named `prefix…`: `channel` reads `path` on the provider, node
/// `id` starts with `opts(id, redis_url, root)`; returns once the coordinator leads (at most 20 s).
pub async fn start(
    prefix: &str,
    channel: &str,
    path: &str,
    ids: [&str; 2],
    opts: impl Fn(&str, &str, &Path) -> NodeOpts,
) -> Result<KillFarm, String> {
    let redis = RedisServer::start();
    let provider = FakeProvider::start().await;
    let root = crate::util::temp_dir(prefix)?;
    let url = redis.url();
    add_channel(&url, channel, &provider.url(path))?;
    let mut nodes: Vec<NodeProcess> = Vec::new();
    for id in ids {
        let o = opts(id, &url, root.path());
        nodes.push(
            tokio::task::spawn_blocking(move || NodeProcess::spawn(o))
                .await
                .map_err(|e| format!("start node: {e}"))?,
        );
    }
    let co_url = url.clone();
    let co = tokio::task::spawn_blocking(move || {
        CoordinatorProcess::spawn(
            CoordinatorOpts::new("c1", co_url)
                .args(with_values(FAST_COORDINATOR, &[("--idle-timeout", "60s")])),
        )
    })
    .await
    .map_err(|e| format!("start farm-coordinator: {e}"))?;
    let mut c = redis.conn().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while leader(&mut c, "farm").await.is_none() {
        if Instant::now() > deadline {
            return Err("the coordinator did not become leader within 20 s".into());
        }
        crate::util::pause(Duration::from_millis(100)).await;
    }
    Ok(KillFarm {
        c,
        co,
        nodes,
        root,
        provider,
        redis,
    })
}

/// Restarts node `i` with the options it first had.
pub async fn restart(nodes: &mut [NodeProcess], i: usize) -> Result<(), String> {
    let o = nodes[i].opts().clone();
    nodes[i] = tokio::task::spawn_blocking(move || NodeProcess::spawn(o))
        .await
        .map_err(|e| format!("restart node: {e}"))?;
    Ok(())
}

/// The index in `nodes` of the node that owns `channel`, and the owner's gen.
pub async fn owner_index(
    c: &mut redis::aio::MultiplexedConnection,
    nodes: &[NodeProcess],
    channel: &str,
) -> Result<(usize, u64), String> {
    let (owner_id, gen) = farm_tests::coordinator::owner(c, "farm", channel)
        .await
        .ok_or("the channel has no owner before the kill")?;
    let i = nodes
        .iter()
        .position(|n| n.node_id() == owner_id)
        .ok_or_else(|| format!("owner {owner_id} is not one of the bench's nodes"))?;
    Ok((i, gen))
}

/// Without farm-coordinator in this checkout, the phase's two figures (`names`) are missing for
/// `why`: that output, or `None` when the coordinator is built.
pub fn unmeasured_without_coordinator(
    names: [&'static str; 2],
    goal: Goal,
    why: &str,
) -> Option<PhaseOutput> {
    if coordinator_bin().is_some() {
        return None;
    }
    let mut out = PhaseOutput::default();
    for name in names {
        out.fig(Figure::missing(name, "s", goal, why.to_string()));
    }
    Some(out)
}

/// The p50 and p99 figures (`names`, in seconds) of `values`, both with `detail`.
pub fn p50_p99(
    out: &mut PhaseOutput,
    names: [&'static str; 2],
    goal: Goal,
    values: &[f64],
    detail: &str,
) {
    for (name, p) in [(names[0], 50.0), (names[1], 99.0)] {
        let mut f = Figure::new(name, "s", goal).detail(detail.to_string());
        if let Some(v) = percentile(values, p) {
            f = f.value(v);
        }
        out.fig(f);
    }
}
