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

use crate::killfarm;
use crate::phase::Settings;
use crate::report::{num, Goal, PhaseOutput};
use farm_tests::coordinator::owner;
use farm_tests::farm::{without, FAST};
use farm_tests::nginx::{NginxOpts, NginxServer};
use farm_tests::node::NodeOpts;
use farm_tests::player::{BrowserPlayer, PlayerReport};

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
    if let Some(out) = killfarm::unmeasured_without_coordinator(
        ["viewer_freeze_s_p50", "viewer_freeze_s_p99"],
        goal,
        "farm-coordinator is not built in this checkout: not measured",
    ) {
        return Ok(out);
    }
    let mut w = Watched::start().await?;
    let mut freezes = Vec::new();
    let mut trials = Vec::new();
    for trial in 0..s.failover_trials.max(5) {
        let (victim, freeze, record) = w.kill_owner(trial).await?;
        freezes.push(freeze);
        trials.push(record);
        w.between_trials(victim).await?;
    }
    Ok(report(goal, &freezes, trials, &w.player.report()))
}

/// The kill farm with nginx in front and a player watching the channel through it. Fields drop in
/// this order: the player first, the farm last.
struct Watched {
    player: BrowserPlayer,
    _nginx: NginxServer,
    farm: killfarm::KillFarm,
}

impl Watched {
    /// Starts the farm and nginx, and returns once the player has shown its first frame and played
    /// a while.
    async fn start() -> Result<Watched, String> {
        let farm = killfarm::start(
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
        let nginx = {
            let o = NginxOpts::for_nodes(farm.nodes.iter());
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
        Ok(Watched {
            player,
            _nginx: nginx,
            farm,
        })
    }

    /// One trial: `kill -9` of the owner, then the longest standstill after the kill until playback
    /// advanced 3 s past it; returns the killed node's index, the freeze and the trial's record.
    async fn kill_owner(
        &mut self,
        trial: usize,
    ) -> Result<(usize, f64, serde_json::Value), String> {
        let (c, nodes) = (&mut self.farm.c, &mut self.farm.nodes);
        let (victim, gen) = killfarm::owner_index(c, nodes, CHANNEL).await?;
        let owner_id = nodes[victim].node_id().to_string();
        let before = self.player.report();
        let played_at_kill = before.played;
        self.player
            .mark(format!("trial {trial}: kill -9 {owner_id}"));
        let kill_at = self
            .player
            .report()
            .marks
            .last()
            .map(|m| m.0)
            .unwrap_or_default();
        nodes[victim].kill9();
        let t0 = Instant::now();
        // Played on past the kill: 3 s more of media than at the kill.
        let after = self
            .player
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
        let new_owner = owner(c, "farm", CHANNEL).await;
        let record = json!({
            "trial": trial,
            "killed": owner_id,
            "gen_before": gen,
            "owner_after": new_owner.map(|(n, g)| format!("{n}:{g}")),
            "freeze_s": freeze,
            "advanced_again_after_s": t0.elapsed().as_secs_f64(),
            "fatal_errors": after.fatal_errors.len(),
            "frags_out_of_order": after.frags_out_of_order.len(),
            "backward_jumps": after.backward_jumps.len(),
        });
        Ok((victim, freeze, record))
    }

    /// The killed node comes back (same port for nginx, same folder: its sweep cleans it), then a
    /// few seconds of ordinary playback.
    async fn between_trials(&mut self, victim: usize) -> Result<(), String> {
        killfarm::restart(&mut self.farm.nodes, victim).await?;
        let played = self.player.report().played;
        self.player
            .wait_until("playback between trials", Duration::from_secs(40), |r| {
                r.played >= played + 4.0
            })
            .await;
        Ok(())
    }
}

/// The trials under `viewer`, and the freeze's p50 and p99 against the anchor.
fn report(
    goal: Goal,
    freezes: &[f64],
    trials: Vec<serde_json::Value>,
    last: &PlayerReport,
) -> PhaseOutput {
    let mut out = PhaseOutput::default();
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
    let detail = format!(
        "hls.js {} (default config) in Chromium through nginx: longest standstill of the picture after kill -9 of the owner, {} trials; anchor node_ttl + tick + 2 x hls_time = {} s; whole run: {} fatal errors, {} fragments out of order, {} jumps back",
        last.hls_version.as_deref().unwrap_or("?"),
        freezes.len(),
        num(anchor),
        last.fatal_errors.len(),
        last.frags_out_of_order.len(),
        last.backward_jumps.len()
    );
    killfarm::p50_p99(
        &mut out,
        ["viewer_freeze_s_p50", "viewer_freeze_s_p99"],
        goal,
        freezes,
        &detail,
    );
    out
}
