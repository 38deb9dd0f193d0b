//! Idle cleanup end to end: real redis-server, two real farm-nodes, one farm-coordinator
//! (idle_timeout 5 s, tick 1 s, access flush 500 ms).
//!
//! - A channel watched by a player (real FFmpeg, fake IPTV provider) is never stopped while watched,
//!   and once the viewer leaves its FFmpeg exits (seen in /proc) no earlier than idle_timeout after
//!   the viewer's last request and no later than idle_timeout + tick + access_flush + stop_grace +
//!   0.5 s, leaving no folder and no runtime key; the event says `idle`.
//! - A channel started by ops and never watched: its FFmpeg exits within the same bounds counted
//!   from its claim (a start counts as an access); a pinned one is not stopped.

use farm_tests::coordinator::{events, fake_source, farmctl_ok, ffmpegs_for, owner, wait_unowned};
use farm_tests::farm::{Farm, FarmBuilder};
use farm_tests::hls::HlsClient;
use farm_tests::wait::eventually;
use redis::AsyncCommands;
use std::time::Duration;

const IDLE: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_secs(1);
const FLUSH: Duration = Duration::from_millis(500);
/// The nodes' `--stop-grace` ([`farm_tests::farm::FAST`]).
const STOP_GRACE: Duration = Duration::from_secs(2);
const SLACK: Duration = Duration::from_millis(500);

/// The one FFmpeg of `channel` under `root`, from /proc: its pid and kernel start time.
fn victim(root: &std::path::Path, channel: &str) -> (i32, u64) {
    let pids = ffmpegs_for(root, channel);
    assert_eq!(pids.len(), 1, "one FFmpeg for {channel}: {pids:?}");
    let start = farm_tests::procs::process_start_time(pids[0]).expect("start time");
    (pids[0], start)
}

fn ms(d: u64) -> Duration {
    Duration::from_millis(d)
}

/// Waits (30 s) for channel `id`'s FFmpeg `(pid, start time)` to exit, as /proc shows it: how long
/// it still ran after `ran_after` and how long after `gone_after` it was gone (wall clock, ms).
async fn ffmpeg_exit(
    (pid, start): (i32, u64),
    id: &str,
    ran_after: u64,
    gone_after: u64,
) -> (Duration, Duration) {
    let exit = farm_tests::procs::watch_exit(pid, start, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("{id}'s FFmpeg did not exit in 30 s"));
    (
        ms(exit.last_alive_ms.saturating_sub(ran_after)),
        ms(exit.gone_ms.saturating_sub(gone_after)),
    )
}

/// [`Farm::pair`] with idle_timeout 5 s.
fn farm() -> FarmBuilder {
    Farm::pair().coordinator_value("--idle-timeout", "5s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_never_stops_a_watched_channel_and_stops_it_once_the_viewer_leaves() {
    let mut farm = farm()
        .provider_channel("news", "/live/news.ts")
        .start()
        .await;
    let ([n1, _n2], [co]) = farm.take_daemons();
    let provider = farm.provider();
    let mut c = farm.redis.conn().await;

    // A player watches for 25 s of media.
    let mut hls = HlsClient::new(&format!("{}/live/news/index.m3u8", n1.base_url()));
    let report = hls
        .pull(Duration::from_secs(25), Duration::from_secs(75))
        .await
        .expect("25 s of media while watched");
    println!("while watched: {report:?}");
    assert_eq!(
        report.sequence_resets, 0,
        "the channel was restarted while watched: {report:?}"
    );
    assert_eq!(report.gaps, 0, "{report:?}");
    let (node, gen) = owner(&mut c, "farm", "news").await.expect("news runs");
    assert_eq!(node, "n1");
    let stops: Vec<_> = events(&mut c, "farm")
        .await
        .into_iter()
        .filter(|e| e.kind() == "stopped" && e.get("channel") == "news")
        .collect();
    assert!(stops.is_empty(), "a watched channel was stopped: {stops:?}");
    assert!(
        co.metric("farm_coordinator_is_leader") == 1.0,
        "{}",
        co.metrics()
    );

    // The viewer's last request, bracketed by the wall clock.
    let (pid, start) = victim(n1.hls_root(), "news");
    let last_url = format!("{}/live/news/index.m3u8", n1.base_url());
    let before = farm_tests::procs::now_ms();
    let r = reqwest::get(&last_url).await.expect("last request");
    assert_eq!(r.status().as_u16(), 200);
    let body = r.text().await.expect("playlist");
    let after = farm_tests::procs::now_ms();
    farm_tests::hls::observe(&last_url, &body);
    // The viewer left: FFmpeg exits, as /proc shows it.
    let (earliest, latest) = ffmpeg_exit((pid, start), "news", after, before).await;
    let bound = IDLE + TICK + FLUSH + STOP_GRACE + SLACK;
    println!(
        "idle stop: FFmpeg ran {earliest:?} past the viewer's last request and was gone {latest:?} after it \
(at least idle_timeout {IDLE:?}; at most idle + tick + access_flush + stop_grace + 0.5 s = {bound:?})"
    );
    assert!(
        earliest >= IDLE,
        "FFmpeg stopped {earliest:?} after the viewer's last request: earlier than idle_timeout"
    );
    assert!(
        latest <= bound,
        "FFmpeg still ran {latest:?} after the viewer's last request (bound {bound:?})"
    );
    wait_unowned(&c, "news", "news's lease released", Duration::from_secs(2)).await;

    let ev = events(&mut c, "farm").await;
    let stopped: Vec<_> = ev
        .iter()
        .filter(|e| e.kind() == "stopped" && e.get("channel") == "news")
        .collect();
    assert_eq!(stopped.len(), 1, "{ev:?}");
    assert_eq!(stopped[0].get("reason"), "idle");
    assert_eq!(stopped[0].get("node"), "n1");
    assert_eq!(stopped[0].get("gen"), gen.to_string());
    // Nothing is left: no FFmpeg, no folder, no runtime key.
    eventually(
        "news's ffmpeg to be gone",
        Duration::from_secs(5),
        || async { ffmpegs_for(n1.hls_root(), "news").is_empty().then_some(()) },
    )
    .await;
    assert!(
        !n1.hls_root().join("news").exists(),
        "the channel folder survived"
    );
    for key in ["farm:owner:news", "farm:stream:news"] {
        let e: bool = c.exists(key).await.expect("EXISTS");
        assert!(!e, "{key} survived the stop");
    }
    let access: Option<f64> = c.zscore("farm:access", "news").await.expect("ZSCORE");
    assert_eq!(access, None);
    let set: Vec<String> = c.smembers("farm:node:n1:streams").await.expect("SMEMBERS");
    assert!(set.is_empty(), "{set:?}");
    assert!(co.metric("farm_coordinator_idle_stops_total") >= 1.0);
    assert_eq!(provider.current_connections_for("/live/news.ts"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_stops_never_watched_channels_but_not_pinned_ones() {
    let mut farm = farm()
        .channel_with("kept", fake_source("kept", 500), &["--pinned"])
        .channel("unwatched", fake_source("unwatched", 500))
        .fake_ffmpeg()
        .start()
        .await;
    let ([n1, _n2], [co]) = farm.take_daemons();
    let url = farm.url();
    let mut c = farm.redis.conn().await;

    farmctl_ok(&url, &["start", "kept", "--node", "n1", "--wait"]);
    let (_, kept_gen) = owner(&mut c, "farm", "kept").await.expect("kept runs");
    farmctl_ok(&url, &["start", "unwatched", "--node", "n1", "--wait"]);
    // Its claim is its access (claim.lua stamps farm:access with the claim's Redis time).
    let claimed: u64 = c
        .hget("farm:stream:unwatched", "started_at")
        .await
        .expect("HGET started_at");
    let (pid, start) = victim(n1.hls_root(), "unwatched");
    let (earliest, latest) = ffmpeg_exit((pid, start), "unwatched", claimed, claimed).await;
    let bound = IDLE + TICK + FLUSH + STOP_GRACE + SLACK;
    println!(
        "never-watched channel: FFmpeg ran {earliest:?} past its claim and was gone {latest:?} after it \
(at least idle_timeout {IDLE:?}, at most {bound:?})"
    );
    assert!(
        earliest >= IDLE,
        "a never-watched channel was stopped {earliest:?} after its claim: before idle_timeout"
    );
    assert!(latest <= bound, "{latest:?} > {bound:?}");
    wait_unowned(
        &c,
        "unwatched",
        "its lease released",
        Duration::from_secs(5),
    )
    .await;

    // The pinned channel, idle even longer, survives two more ticks.
    let ticks = co.metric("farm_coordinator_ticks_total");
    eventually("two more leader ticks", Duration::from_secs(10), || async {
        (co.metric("farm_coordinator_ticks_total") >= ticks + 2.0).then_some(())
    })
    .await;
    assert_eq!(
        owner(&mut c, "farm", "kept").await,
        Some(("n1".to_string(), kept_gen)),
        "a pinned channel was stopped"
    );
    assert_eq!(ffmpegs_for(n1.hls_root(), "kept").len(), 1);
    let ev = events(&mut c, "farm").await;
    let stopped: Vec<_> = ev.iter().filter(|e| e.kind() == "stopped").collect();
    assert_eq!(stopped.len(), 1, "{ev:?}");
    assert_eq!(stopped[0].get("channel"), "unwatched");
    assert_eq!(stopped[0].get("reason"), "idle");

    // Unpinned, it goes too.
    farmctl_ok(&url, &["unpin", "kept"]);
    let unpinned_stopped = "the unpinned channel to be stopped";
    wait_unowned(&c, "kept", unpinned_stopped, Duration::from_secs(10)).await;
}
