//! The viewer's freeze on failover: what a person watching sees when the node that runs their
//! channel dies.
//!
//! Two farm-nodes (real FFmpeg reading the fake provider's real-time MPEG-TS through the egress
//! gateway, hls_time 1 s, node and lease TTL 3 s) on fixed ports, one farm-coordinator (tick 1 s),
//! nginx from the shipped template in front of both, and hls.js (default configuration) in headless
//! Chromium playing the channel through nginx. Each trial `kill -9`s the node that owns the
//! channel and measures, on the player's own clock, the longest time `currentTime` stood still
//! after the kill (the freeze), until it advanced 3 s past the kill. The killed node is then
//! started again (same port and folder) and the next trial kills the current owner. The anchor is
//! the server side of the same event: `node_ttl + tick` to detect the death, plus 2 × hls_time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::report::{num, percentile, Figure, Goal, PhaseOutput};
use crate::{coordinator_bin, killfarm, Settings};
use farm_tests::coordinator::owner;
use farm_tests::farm::{without, FAST};
use farm_tests::nginx::{NginxOpts, NginxServer};
use farm_tests::node::NodeOpts;
use farm_tests::player::BrowserPlayer;

const NODE_TTL_S: f64 = 3.0;
const TICK_S: f64 = 1.0;
const HLS_TIME_S: f64 = 1.0;
const CHANNEL: &str = "tv";

/// [`FAST`] with the default restart backoff, and a 15 s start timeout.
fn node_args() -> Vec<String> {
    let mut args = without(FAST, &["--backoff-base", "--backoff-max"]);
    args.extend(["--start-timeout".to_string(), "15s".to_string()]);
    args
}

pub async fn run(s: &Settings) -> Result<PhaseOutput, String> {
    let goal = Goal::AtMost(NODE_TTL_S + TICK_S + 2.0 * HLS_TIME_S);
    let mut out = PhaseOutput::default();
    if coordinator_bin().is_none() {
        let why = "farm-coordinator is not built in this checkout: not measured".to_string();
        out.fig(Figure::missing(
            "viewer_freeze_s_p50",
            "s",
            goal,
            why.clone(),
        ));
        out.fig(Figure::missing("viewer_freeze_s_p99", "s", goal, why));
        return Ok(out);
    }
    let killfarm::KillFarm {
        redis,
        provider: _provider,
        root: _root,
        mut nodes,
        co: _co,
    } = killfarm::start(
        "farm-bench-viewer-",
        CHANNEL,
        "/live/tv.ts",
        ["v1", "v2"],
        |id, url, root| {
            let addr = SocketAddr::from(([127, 0, 0, 1], farm_tests::ports::free_port()));
            NodeOpts::new(id, url, root.join(id))
                .args(node_args())
                .listen(addr)
        },
    )
    .await?;
    let mut c = redis.conn().await;
    let nginx = {
        let o = NginxOpts::for_nodes(nodes.iter());
        tokio::task::spawn_blocking(move || NginxServer::start(&o))
            .await
            .map_err(|e| format!("start nginx: {e}"))?
    };
    let stream = format!("{}/live/{CHANNEL}/index.m3u8", nginx.base_url());
    let player = BrowserPlayer::start(&stream).await;
    player.wait_first_frame(Duration::from_secs(30)).await;
    player
        .wait_played(Duration::from_secs(10), Duration::from_secs(40))
        .await;

    let trials_wanted = s.failover_trials.max(5);
    let mut freezes = Vec::new();
    let mut trials = Vec::new();
    for trial in 0..trials_wanted {
        let (victim, gen) = killfarm::owner_index(&mut c, &nodes, CHANNEL).await?;
        let owner_id = nodes[victim].node_id().to_string();
        let before = player.report();
        let played_at_kill = before.played;
        player.mark(format!("trial {trial}: kill -9 {owner_id}"));
        let kill_at = player
            .report()
            .marks
            .last()
            .map(|m| m.0)
            .unwrap_or_default();
        nodes[victim].kill9();
        let t0 = Instant::now();
        // Played on past the kill: 3 s more of media than at the kill.
        let after = player
            .wait_until(
                "playback to advance 3 s past the kill",
                Duration::from_secs(60),
                |r| r.played >= played_at_kill + 3.0,
            )
            .await;
        let freeze = after
            .freezes
            .iter()
            .filter(|f| f.start + f.length >= kill_at)
            .map(|f| {
                // Only the part after the kill.
                (f.start + f.length).saturating_sub(f.start.max(kill_at))
            })
            .max()
            .unwrap_or_default()
            .as_secs_f64();
        freezes.push(freeze);
        let new_owner = owner(&mut c, "farm", CHANNEL).await;
        trials.push(json!({
            "trial": trial,
            "killed": owner_id,
            "gen_before": gen,
            "owner_after": new_owner.map(|(n, g)| format!("{n}:{g}")),
            "freeze_s": freeze,
            "advanced_again_after_s": t0.elapsed().as_secs_f64(),
            "fatal_errors": after.fatal_errors.len(),
            "frags_out_of_order": after.frags_out_of_order.len(),
            "backward_jumps": after.backward_jumps.len(),
        }));
        // The killed node comes back (same port for nginx, same folder: its sweep cleans it).
        killfarm::restart(&mut nodes, victim).await?;
        // A few seconds of ordinary playback between trials.
        let played = player.report().played;
        player
            .wait_until("playback between trials", Duration::from_secs(40), |r| {
                r.played >= played + 4.0
            })
            .await;
    }
    let last = player.report();
    out.set(
        "viewer",
        json!({
            "node_ttl_s": NODE_TTL_S,
            "tick_s": TICK_S,
            "hls_time_s": HLS_TIME_S,
            "player": last.hls_version,
            "trials": trials,
            "fatal_errors": last.fatal_errors.len(),
            "frags_out_of_order": last.frags_out_of_order.len(),
            "backward_jumps": last.backward_jumps.len(),
            "target_durations": last.target_durations,
        }),
    );
    let anchor = NODE_TTL_S + TICK_S + 2.0 * HLS_TIME_S;
    for (name, p) in [("viewer_freeze_s_p50", 50.0), ("viewer_freeze_s_p99", 99.0)] {
        let mut f = Figure::new(name, "s", goal).detail(format!(
            "hls.js {} (default config) in Chromium through nginx: longest standstill of the picture after kill -9 of the owner, {} trials; anchor node_ttl + tick + 2 x hls_time = {} s; whole run: {} fatal errors, {} fragments out of order, {} jumps back",
            last.hls_version.as_deref().unwrap_or("?"),
            freezes.len(),
            num(anchor),
            last.fatal_errors.len(),
            last.frags_out_of_order.len(),
            last.backward_jumps.len()
        ));
        if let Some(v) = percentile(&freezes, p) {
            f = f.value(v);
        }
        out.fig(f);
    }
    Ok(out)
}
