//! Failover: `kill -9` of the node that owns a watched channel → the first new segment served by
//! another node.
//!
//! Two farm-nodes (real FFmpeg, hls_time 1 s, node and lease TTL 3 s), one farm-coordinator (tick
//! 1 s), the fake provider's real-time MPEG-TS. Each trial kills the current owner of a channel that
//! was just watched, in one of two ways of noticing the failover:
//!
//! - `coordinator` (the figures): nobody asks the other node for the channel; the benchmark watches
//!   `farm:owner:<id>` (every 50 ms) until the coordinator's failover start has made the other node
//!   the owner, then fetches the playlist and its newest segment from that node. This is the path
//!   the anchor `node_ttl + tick` describes (detection), plus the new FFmpeg's first segment.
//! - `viewer` (a detail): like a player that lost its node, the benchmark asks the other node for
//!   the playlist every 100 ms (a 307 to the dead owner, or any error, means "not yet"), which lets
//!   that node start the channel itself once the dead owner's lease has expired.
//!
//! The time is taken when the other node has served the playlist and the newest segment in it. The
//! killed node is then started again (same id and folder; its start-up sweep removes the FFmpeg it
//! left behind) and the next trial kills the other one.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::killfarm;
use crate::phase::Settings;
use crate::report::{num, percentile, Goal, PhaseOutput};
use crate::util::get;
use farm_tests::coordinator::{events, owner};
use farm_tests::farm::FAST;
use farm_tests::hls::MediaPlaylist;
use farm_tests::node::{NodeOpts, NodeProcess};

const NODE_TTL_S: f64 = 3.0;
const TICK_S: f64 = 1.0;
const CHANNEL: &str = "fo";
/// Bound of one trial.
const TRIAL_LIMIT: Duration = Duration::from_secs(40);

/// [`FAST`] and a 15 s start timeout.
fn node_args() -> Vec<&'static str> {
    [FAST, &["--start-timeout", "15s"]].concat()
}

pub async fn run(s: &Settings) -> Result<PhaseOutput, String> {
    let goal = Goal::AtMost(NODE_TTL_S + TICK_S + 2.0);
    if let Some(out) = killfarm::unmeasured_without_coordinator(
        ["failover_s_p50", "failover_s_p99"],
        goal,
        "farm-coordinator is not built in this checkout: not measured",
    ) {
        return Ok(out);
    }
    let mut f = FailoverFarm::start().await?;
    let mut times = Vec::new();
    let mut viewer_times = Vec::new();
    let mut trials = Vec::new();
    let viewer_trials = s.failover_trials.div_ceil(2);
    for trial in 0..s.failover_trials + viewer_trials {
        let mode = if trial < s.failover_trials {
            Mode::Coordinator
        } else {
            Mode::Viewer
        };
        let (took, record) = f.kill_owner(trial, mode).await?;
        match mode {
            Mode::Coordinator => times.push(took),
            Mode::Viewer => viewer_times.push(took),
        }
        trials.push(record);
    }
    drop(f);
    Ok(report(goal, &times, &viewer_times, trials))
}

/// The kill farm and an HTTP client that does not follow redirects.
struct FailoverFarm {
    client: reqwest::Client,
    farm: killfarm::KillFarm,
}

impl FailoverFarm {
    /// Starts the farm, and the channel on n1.
    async fn start() -> Result<FailoverFarm, String> {
        let farm = killfarm::start(
            "farm-bench-failover-",
            CHANNEL,
            "/live/fo.ts",
            ["n1", "n2"],
            |id, url, root| NodeOpts::new(id, url, root.join(id)).args(node_args()),
        )
        .await?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(20))
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        let (st, body) = get(
            &client,
            &format!("{}/live/{CHANNEL}/index.m3u8", farm.nodes[0].base_url()),
        )
        .await?;
        if st != 200 {
            return Err(format!(
                "first start on n1: {st}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        Ok(FailoverFarm { client, farm })
    }

    /// One trial: `kill -9` of the owner of the watched channel, the time until the other node
    /// served its newest segment (noticed the `mode` way), and the trial's record. The killed node
    /// comes back (new incarnation, same folder) afterwards.
    async fn kill_owner(
        &mut self,
        trial: usize,
        mode: Mode,
    ) -> Result<(f64, serde_json::Value), String> {
        let (client, c, nodes) = (&self.client, &mut self.farm.c, &mut self.farm.nodes);
        let (victim, _) = killfarm::owner_index(c, nodes, CHANNEL).await?;
        let survivor = 1 - victim;
        // Watched, and a few segments into its run, on a farm where both nodes are alive.
        settle(client, c, nodes, victim, survivor).await?;
        let events_before = events(c, "farm").await.len();

        nodes[victim].kill9();
        let t0 = Instant::now();
        let base = nodes[survivor].base_url();
        let served = match mode {
            Mode::Coordinator => {
                let survivor_id = nodes[survivor].node_id().to_string();
                owned_by(c, &survivor_id, t0).await?;
                first_segment_from(client, &base, t0).await
            }
            Mode::Viewer => first_segment_from(client, &base, t0).await,
        };
        let took = t0.elapsed().as_secs_f64();
        let ev = events(c, "farm").await;
        let by_coordinator = ev[events_before.min(ev.len())..]
            .iter()
            .any(|e| e.kind() == "failover" && e.get("channel") == CHANNEL);
        let statuses = served?;
        let record = json!({
            "trial": trial,
            "mode": mode.name(),
            "killed": nodes[victim].node_id(),
            "served_by": nodes[survivor].node_id(),
            "seconds": took,
            "coordinator_failover_event_by_then": by_coordinator,
            "statuses_while_waiting": statuses,
        });
        killfarm::restart(nodes, victim).await?;
        Ok((took, record))
    }
}

/// The trials under `failover`, and the coordinator failover's p50 and p99 against the anchor.
fn report(
    goal: Goal,
    times: &[f64],
    viewer_times: &[f64],
    trials: Vec<serde_json::Value>,
) -> PhaseOutput {
    let mut out = PhaseOutput::default();
    out.set(
        "failover",
        json!({
            "node_ttl_s": NODE_TTL_S,
            "tick_s": TICK_S,
            "hls_time_s": 1.0,
            "trials": trials,
        }),
    );
    let anchor = NODE_TTL_S + TICK_S;
    let detail = format!(
        "kill -9 of the owner -> coordinator failover -> newest segment served by the other node, {} trials; anchor node_ttl + tick = {} s (real ffmpeg, hls_time 1 s); a viewer retrying on the other node gets it after p50 {} s (lease expiry, {} trials)",
        times.len(),
        num(anchor),
        num(percentile(viewer_times, 50.0).unwrap_or(f64::NAN)),
        viewer_times.len()
    );
    killfarm::p50_p99(
        &mut out,
        ["failover_s_p50", "failover_s_p99"],
        goal,
        times,
        &detail,
    );
    out
}

/// How a trial notices the failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Coordinator,
    Viewer,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Coordinator => "coordinator",
            Mode::Viewer => "viewer",
        }
    }
}

/// Waits (polling Redis every 50 ms) until `node` owns the channel.
async fn owned_by(
    c: &mut redis::aio::MultiplexedConnection,
    node: &str,
    t0: Instant,
) -> Result<(), String> {
    loop {
        if owner(c, "farm", CHANNEL)
            .await
            .is_some_and(|(n, _)| n == node)
        {
            return Ok(());
        }
        if t0.elapsed() > TRIAL_LIMIT {
            return Err(format!(
                "{node} did not own the channel within {TRIAL_LIMIT:?} after the kill (no coordinator failover)"
            ));
        }
        crate::util::pause(Duration::from_millis(50)).await;
    }
}

/// Waits until the channel runs on `owner` with a couple of segments, a viewer's access is recorded,
/// and `other` is alive.
async fn settle(
    client: &reqwest::Client,
    c: &mut redis::aio::MultiplexedConnection,
    nodes: &[NodeProcess],
    owner: usize,
    other: usize,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (st, body) = get(
            client,
            &format!("{}/live/{CHANNEL}/index.m3u8", nodes[owner].base_url()),
        )
        .await?;
        let segments = (st == 200)
            .then(|| MediaPlaylist::parse(&String::from_utf8_lossy(&body)).ok())
            .flatten()
            .map_or(0, |p| p.segments.len());
        let alive: bool = redis::cmd("EXISTS")
            .arg(farm_proto::Keys::new("farm").node_alive(nodes[other].node_id()))
            .query_async(c)
            .await
            .map_err(|e| format!("EXISTS: {e}"))?;
        if segments >= 3 && alive {
            // The access flush (500 ms) carries this request to Redis.
            crate::util::pause(Duration::from_millis(700)).await;
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "before a kill: channel on {} lists {segments} segments (status {st}), {} alive: {alive}",
                nodes[owner].node_id(),
                nodes[other].node_id()
            ));
        }
        crate::util::pause(Duration::from_millis(200)).await;
    }
}

/// Polls `base` for the playlist every 100 ms until it serves it and its newest segment; returns the
/// statuses seen while waiting.
async fn first_segment_from(
    client: &reqwest::Client,
    base: &str,
    t0: Instant,
) -> Result<std::collections::BTreeMap<String, u64>, String> {
    let mut seen = std::collections::BTreeMap::new();
    loop {
        if t0.elapsed() > TRIAL_LIMIT {
            return Err(format!(
                "{base} served no segment within {TRIAL_LIMIT:?} after the kill; statuses {seen:?}"
            ));
        }
        let r = get(client, &format!("{base}/live/{CHANNEL}/index.m3u8")).await;
        let key = match &r {
            Ok((st, _)) => st.to_string(),
            Err(_) => "error".to_string(),
        };
        *seen.entry(key).or_insert(0u64) += 1;
        if let Ok((200, body)) = r {
            if let Some(seg) = MediaPlaylist::parse(&String::from_utf8_lossy(&body))
                .ok()
                .and_then(|p| p.segments.last().cloned())
            {
                if let Ok((200, _)) =
                    get(client, &format!("{base}/live/{CHANNEL}/{}", seg.uri)).await
                {
                    return Ok(seen);
                }
            }
        }
        crate::util::pause(Duration::from_millis(100)).await;
    }
}
