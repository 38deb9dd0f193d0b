//! Idle cleanup end to end: real redis-server, two real farm-nodes, one farm-coordinator
//! (idle_timeout 5 s, tick 1 s, access flush 500 ms).
//!
//! - A channel watched by a player (real FFmpeg, fake IPTV provider) is never stopped while watched,
//!   and is stopped within idle_timeout + tick + access_flush (+ the stop itself) once the viewer
//!   leaves, leaving no FFmpeg, no folder and no runtime key; the event says `idle`.
//! - A channel started by ops and never watched is stopped the same way; a pinned one is not.

use farm_tests::coordinator::{
    events, fake_source, farmctl_ok, ffmpegs_for, node_args, owner, CoordinatorOpts,
    CoordinatorProcess,
};
use farm_tests::hls::HlsClient;
use farm_tests::node::{NodeOpts, NodeProcess};
use farm_tests::provider::FakeProvider;
use farm_tests::redis::RedisServer;
use farm_tests::wait::eventually;
use redis::AsyncCommands;
use std::time::{Duration, Instant};

const IDLE: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_secs(1);
const FLUSH: Duration = Duration::from_millis(500);

fn coordinator(redis: &RedisServer) -> CoordinatorProcess {
    CoordinatorProcess::spawn(CoordinatorOpts::new("c1", redis.url()).args([
        "--idle-timeout",
        "5s",
        "--tick",
        "1s",
        "--node-ttl",
        "3s",
        "--lease-ttl",
        "3s",
        "--leader-ttl",
        "3s",
    ]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_never_stops_a_watched_channel_and_stops_it_once_the_viewer_leaves() {
    let redis = RedisServer::start();
    let provider = FakeProvider::start().await;
    let root = tempfile::tempdir().expect("tempdir");
    let url = redis.url();
    farmctl_ok(
        &url,
        &["channel", "add", "news", &provider.url("/live/news.ts")],
    );
    let n1 =
        NodeProcess::spawn(NodeOpts::new("n1", &url, root.path().join("n1")).args(node_args("3s")));
    let _n2 =
        NodeProcess::spawn(NodeOpts::new("n2", &url, root.path().join("n2")).args(node_args("3s")));
    let co = coordinator(&redis);
    let mut c = redis.conn().await;

    // A player watches for 25 s of media.
    let mut hls = HlsClient::new(&format!("{}/live/news/index.m3u8", n1.base_url()));
    let report = hls
        .pull(Duration::from_secs(25), Duration::from_secs(75))
        .await
        .expect("25 s of media while watched");
    let left = Instant::now();
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

    // The viewer left: the channel goes within idle_timeout + tick + access_flush (+ the stop).
    eventually(
        "news to be stopped after its viewer left",
        Duration::from_secs(30),
        || {
            let mut c = c.clone();
            async move { owner(&mut c, "farm", "news").await.is_none().then_some(()) }
        },
    )
    .await;
    let took = left.elapsed();
    let bound = IDLE + TICK + FLUSH;
    println!(
        "idle stop {took:?} after the viewer left (idle_timeout + tick + access_flush = {bound:?}, slack {:?})",
        took.saturating_sub(bound)
    );
    assert!(
        took >= IDLE,
        "stopped {took:?} after the viewer left: earlier than idle_timeout"
    );
    assert!(
        took <= bound + Duration::from_secs(3),
        "stopped {took:?} after the viewer left"
    );

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
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    let url = redis.url();
    farmctl_ok(
        &url,
        &[
            "channel",
            "add",
            "kept",
            &fake_source("kept", 500),
            "--pinned",
        ],
    );
    farmctl_ok(
        &url,
        &[
            "channel",
            "add",
            "unwatched",
            &fake_source("unwatched", 500),
        ],
    );
    let n1 = NodeProcess::spawn(
        NodeOpts::new("n1", &url, root.path().join("n1"))
            .with_fake_ffmpeg()
            .args(node_args("3s")),
    );
    let _n2 = NodeProcess::spawn(
        NodeOpts::new("n2", &url, root.path().join("n2"))
            .with_fake_ffmpeg()
            .args(node_args("3s")),
    );
    let co = coordinator(&redis);
    let mut c = redis.conn().await;

    farmctl_ok(&url, &["start", "kept", "--node", "n1", "--wait"]);
    let (_, kept_gen) = owner(&mut c, "farm", "kept").await.expect("kept runs");
    let started = Instant::now();
    farmctl_ok(&url, &["start", "unwatched", "--node", "n1", "--wait"]);

    eventually(
        "the never-watched channel to be stopped",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            async move {
                owner(&mut c, "farm", "unwatched")
                    .await
                    .is_none()
                    .then_some(())
            }
        },
    )
    .await;
    let took = started.elapsed();
    println!(
        "never-watched channel stopped {took:?} after its start (idle_timeout + tick = {:?})",
        IDLE + TICK
    );
    assert!(took <= IDLE + TICK + Duration::from_secs(3), "{took:?}");
    assert!(ffmpegs_for(n1.hls_root(), "unwatched").is_empty());

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
    eventually(
        "the unpinned channel to be stopped",
        Duration::from_secs(10),
        || {
            let mut c = c.clone();
            async move { owner(&mut c, "farm", "kept").await.is_none().then_some(()) }
        },
    )
    .await;
}
