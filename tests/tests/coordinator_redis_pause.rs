//! Redis outages end to end (SIGSTOP of redis-server): two nodes with the fake FFmpeg, one
//! coordinator; node and lease TTL 4 s, tick 500 ms.
//!
//! - Up to ½ the lease TTL, whenever it starts: four pauses of 2 s (½ × 4 s), each starting at
//!   another phase of n1's keepalive interval (10 %, 35 %, 60 % and 85 % of it after a renewal that
//!   reached Redis, as `MONITOR` shows it; n2's phase is whatever it is, printed): nothing is
//!   stopped, restarted or reaped, the same FFmpegs run, the player sees no reset; the coordinator
//!   notices the stalls and holds its reaps.
//! - Longer than the lease TTL: the nodes fence their FFmpegs, the coordinator reaps no node, and
//!   once Redis returns the farm serves again by itself while the fenced leftovers are reconciled.

use farm_tests::coordinator::{
    events, fake_source, farmctl_ok, ffmpegs_for, owner, CoordinatorProcess, FarmEvent,
};
use farm_tests::farm::Farm;
use farm_tests::hls::HlsClient;
use farm_tests::wait::{eventually, eventually_with};
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use std::time::Duration;

const LEASE: Duration = Duration::from_secs(4);

/// The keepalive interval: a sixth of the shorter TTL.
const KEEPALIVE: Duration = Duration::from_millis(4000 / 6);

/// When (Redis time, µs) `node`'s keepalives after `after_us` reached Redis, as MONITOR saw them.
fn keepalives(monitor: &farm_tests::redis::Monitor, node: &str, after_us: u64) -> Vec<u64> {
    let alive = format!("\"farm:node:{node}:alive\"");
    monitor
        .seen()
        .into_iter()
        .filter(|m| m.command == "evalsha" && m.line.contains(&alive) && m.at_us > after_us)
        .map(|m| m.at_us)
        .collect()
}

/// Waits for `node`'s next keepalive after `after_us` (polled every 2 ms: its time decides when
/// the outage starts, so it must be seen early).
async fn next_keepalive(monitor: &farm_tests::redis::Monitor, node: &str, after_us: u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(t) = keepalives(monitor, node, after_us).first() {
            return *t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no keepalive of {node} in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Nodes n1 and n2 (fake FFmpeg) and coordinator c1 (idle timeout 10 s, tick 500 ms), TTLs 4 s;
/// channels watched and kept (pinned).
async fn farm() -> Farm {
    Farm::pair()
        .fake_ffmpeg()
        .channel("watched", fake_source("watched", 500))
        .channel_with("kept", fake_source("kept", 500), &["--pinned"])
        .node_value("--lease-ttl", "4s")
        .node_value("--node-ttl", "4s")
        .coordinator_value("--idle-timeout", "10s")
        .coordinator_value("--tick", "500ms")
        .coordinator_value("--node-ttl", "4s")
        .coordinator_value("--lease-ttl", "4s")
        .coordinator_value("--leader-ttl", "4s")
        .start()
        .await
}

/// The farm with kept started on n2 and a player that has watched 2 s of watched through n1: the
/// farm, a connection and the player.
async fn playing() -> (Farm, MultiplexedConnection, HlsClient) {
    let f = farm().await;
    let url = f.redis.url();
    let c = f.redis.conn().await;
    farmctl_ok(&url, &["start", "kept", "--node", "n2", "--wait"]);
    let mut player = HlsClient::new(&format!(
        "{}/live/watched/index.m3u8",
        f.node("n1").base_url()
    ));
    player
        .pull(Duration::from_secs(2), Duration::from_secs(20))
        .await
        .expect("watched plays");
    (f, c, player)
}

/// Waits until the coordinator has run `n` more ticks as leader.
async fn ticks(co: &CoordinatorProcess, n: f64) {
    let start = co.metric("farm_coordinator_ticks_total");
    eventually(
        &format!("{n} more coordinator ticks"),
        Duration::from_secs(30),
        || async { (co.metric("farm_coordinator_ticks_total") >= start + n).then_some(()) },
    )
    .await;
}

fn after<'a>(ev: &'a [FarmEvent], mark: &str) -> Vec<&'a FarmEvent> {
    ev.iter().filter(|e| e.id.as_str() > mark).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_redis_paused_half_the_lease_at_any_phase_stops_and_reaps_nothing() {
    let (f, mut c, mut player) = playing().await;
    eventually(
        "the coordinator to lead",
        Duration::from_secs(10),
        || async {
            (f.coordinator("c1").metric("farm_coordinator_is_leader") == 1.0).then_some(())
        },
    )
    .await;
    let before_watched = owner(&mut c, "farm", "watched")
        .await
        .expect("watched runs");
    let before_kept = owner(&mut c, "farm", "kept").await.expect("kept runs");
    let pids = (
        ffmpegs_for(f.node("n1").hls_root(), "watched"),
        ffmpegs_for(f.node("n2").hls_root(), "kept"),
    );
    let mark = events(&mut c, "farm")
        .await
        .last()
        .map(|e| e.id.clone())
        .unwrap_or_default();

    // The player keeps watching across the pauses.
    let pull = tokio::spawn(async move {
        player
            .pull(Duration::from_secs(22), Duration::from_secs(60))
            .await
    });
    let monitor = f.redis.monitor();
    let outage = LEASE / 2;
    let interval_us = KEEPALIVE.as_micros() as u64;
    let mut from_us = farm_tests::procs::now_us();
    let mut phases = Vec::new();
    for percent in [10u64, 35, 60, 85] {
        let renewed = next_keepalive(&monitor, "n1", from_us).await;
        let at = renewed + interval_us * percent / 100;
        let now = farm_tests::procs::now_us();
        assert!(
            at > now,
            "n1's keepalive seen too late to start the outage at {percent} %"
        );
        // The outage's start and length are the fault, not synchronisation.
        tokio::time::sleep(Duration::from_micros(at - now)).await;
        f.redis.pause();
        let paused = farm_tests::procs::now_us();
        tokio::time::sleep(outage).await;
        f.redis.resume();
        let resumed = farm_tests::procs::now_us();
        // n2's phase: time since its last keepalive before the pause.
        let n2_last = keepalives(&monitor, "n2", 0)
            .into_iter()
            .filter(|t| *t <= paused)
            .max()
            .unwrap_or(0);
        phases.push(format!(
            "n1 at {:.0} % ({} ms after its renewal), n2 at {:.0} %, down {} ms",
            (paused - renewed) as f64 * 100.0 / interval_us as f64,
            (paused - renewed) / 1000,
            (paused - n2_last) as f64 * 100.0 / interval_us as f64,
            (resumed - paused) / 1000
        ));
        assert!(
            paused - renewed < interval_us,
            "the outage began {} ms after n1's renewal, past its keepalive interval",
            (paused - renewed) / 1000
        );
        // Renewed twice since (the farm is steady again) before the next outage.
        let first = next_keepalive(&monitor, "n1", resumed).await;
        from_us = next_keepalive(&monitor, "n1", first).await;
    }
    println!("Redis paused {outage:?} (½ lease TTL) four times: {phases:?}");
    // Long enough for any wrong decision to show: node_ttl + a few ticks.
    ticks(f.coordinator("c1"), 12.0).await;
    let report = pull
        .await
        .expect("player task")
        .expect("the player kept playing");
    println!("player across the Redis pauses: {report:?}");
    assert_eq!(
        report.sequence_resets, 0,
        "watched was restarted: {report:?}"
    );

    assert_eq!(owner(&mut c, "farm", "watched").await, Some(before_watched));
    assert_eq!(owner(&mut c, "farm", "kept").await, Some(before_kept));
    assert_eq!(
        (
            ffmpegs_for(f.node("n1").hls_root(), "watched"),
            ffmpegs_for(f.node("n2").hls_root(), "kept")
        ),
        pids,
        "an FFmpeg was replaced"
    );
    let ev = events(&mut c, "farm").await;
    let since = after(&ev, &mark);
    assert!(
        since.iter().all(|e| !matches!(
            e.kind(),
            "stopped" | "started" | "reaped" | "node_dead" | "failover" | "failed" | "restarted"
        )),
        "something happened during a Redis pause of ½ the lease TTL: {since:?}"
    );
    let held = f
        .coordinator("c1")
        .metric("farm_coordinator_reaps_refused_total{reason=\"redis_disturbed\"}");
    println!("ticks that held their reaps after the stall: {held}");
    assert!(
        held >= 1.0,
        "the coordinator did not notice the stall:\n{}",
        f.coordinator("c1").metrics()
    );
    f.assert_settled(&[f.node("n1"), f.node("n2")], "short redis pause")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_redis_paused_longer_than_the_lease_reaps_no_node_and_the_farm_recovers() {
    let (f, mut c, mut player) = playing().await;
    let (_, gen_before) = owner(&mut c, "farm", "watched")
        .await
        .expect("watched runs");
    let mark = events(&mut c, "farm")
        .await
        .last()
        .map(|e| e.id.clone())
        .unwrap_or_default();

    f.redis.pause();
    // The nodes fence their FFmpegs after 2/3 of the lease TTL without Redis.
    eventually(
        "the nodes to fence their FFmpegs",
        Duration::from_secs(15),
        || async {
            (ffmpegs_for(f.node("n1").hls_root(), "watched").is_empty()
                && ffmpegs_for(f.node("n2").hls_root(), "kept").is_empty())
            .then_some(())
        },
    )
    .await;
    // Hold the outage past the lease TTL (fault injection, not synchronisation).
    tokio::time::sleep(Duration::from_secs(3)).await;
    f.redis.resume();

    // The viewer gets the channel back by itself.
    let report = player
        .pull(Duration::from_secs(4), Duration::from_secs(40))
        .await
        .expect("watched plays again after the outage");
    println!("player after a long Redis pause: {report:?}");
    let (_, gen_after) = owner(&mut c, "farm", "watched")
        .await
        .expect("watched runs again");
    assert!(gen_after > gen_before);
    // The fenced, unwatched channel's leftovers on n2 are reconciled once the coordinator has
    // settled, and (it is pinned) the coordinator starts it again somewhere.
    eventually_with(
        &c,
        "kept's stale n2 keys reaped and kept running again",
        Duration::from_secs(30),
        |mut c| async move {
            let member: bool = c.sismember("farm:node:n2:streams", "kept").await.ok()?;
            let hash_node: Option<String> = c.hget("farm:stream:kept", "node").await.ok()?;
            let owner: Option<String> = c.get("farm:owner:kept").await.ok()?;
            let gen: u64 = owner?.rsplit_once(':')?.1.parse().ok()?;
            let stale = member || (hash_node.as_deref() == Some("n2") && gen == 1);
            (!stale && gen > 1).then_some(())
        },
    )
    .await;
    let ev = events(&mut c, "farm").await;
    let since = after(&ev, &mark);
    assert!(
        since.iter().all(|e| e.kind() != "node_dead"),
        "a Redis outage reaped a node: {since:?}"
    );
    let reaped: Vec<_> = since
        .iter()
        .filter(|e| e.kind() == "reaped" && e.get("channel") == "kept")
        .collect();
    assert!(
        reaped.iter().any(|e| e.get("reason") == "no_lease"),
        "{since:?}"
    );
    for n in ["n1", "n2"] {
        let alive: bool = c
            .exists(format!("farm:node:{n}:alive"))
            .await
            .expect("EXISTS");
        assert!(alive, "{n} is not alive after the outage");
    }
    f.assert_settled(&[f.node("n1"), f.node("n2")], "long redis pause")
        .await;
}
