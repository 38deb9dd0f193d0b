//! Failover end to end: kill -9 of the node that owns watched channels (real FFmpeg, fake IPTV
//! provider, two nodes, one coordinator; node and lease TTL 3 s, tick 1 s).
//!
//! Within node_ttl + tick (+ 0.5 s) the channels run on the other node: one that a player keeps
//! pulling (via the surviving node's URL) and one that was watched recently but has no request in
//! flight (only the coordinator's `start` can bring that one back). The watched one is served
//! again, a new segment of the new owner's run fetched through the surviving node, within
//! node_ttl + tick + 0.5 s plus its first segment (the new FFmpeg's start, seen in /proc, within
//! node_ttl + tick + 0.5 s of the kill; its first segment within two segment durations of that).
//! The player keeps playing after a bounded gap, and nothing of the dead node remains.

use farm_tests::coordinator::{events, ffmpegs_for, owner};
use farm_tests::farm::Farm;
use farm_tests::fixtures::{newer_segment, no_redirects_within, observed_playlist};
use farm_tests::hls::HlsClient;
use farm_tests::wait::{eventually, eventually_with};
use redis::AsyncCommands;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const NODE_TTL: Duration = Duration::from_secs(3);
const TICK: Duration = Duration::from_secs(1);
const HLS_TIME: Duration = Duration::from_secs(1);
const SLACK: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_moves_watched_channels_off_a_killed_node() {
    let mut farm = Farm::pair()
        .provider_channel("news", "/live/news.ts")
        .provider_channel("sports", "/live/sports.ts")
        .start()
        .await;
    let [mut n1, n2] = farm.take_nodes();
    let [co] = farm.take_coordinators();
    let (redis, root) = (&farm.redis, &farm.root);
    let mut c = redis.conn().await;

    // Both channels start on n1 (their first request goes there).
    for ch in ["news", "sports"] {
        let (status, body) = HlsClient::new(&format!("{}/live/{ch}/index.m3u8", n1.base_url()))
            .get_playlist()
            .await
            .expect("first playlist");
        assert_eq!(status, 200, "{ch}: {body}");
        assert_eq!(
            owner(&mut c, "farm", ch).await.map(|o| o.0).as_deref(),
            Some("n1")
        );
    }
    // A player watches news through n2 (redirected to the owner, n1).
    let mut player = HlsClient::new(&format!("{}/live/news/index.m3u8", n2.base_url()));
    let pull = tokio::spawn(async move {
        player
            .pull(Duration::from_secs(30), Duration::from_secs(90))
            .await
    });
    eventually_with(
        &c,
        "the player to get a few segments from n1",
        Duration::from_secs(30),
        |mut c| async move {
            let h: HashMap<String, String> = c.hgetall("farm:stream:news").await.ok()?;
            let started: u64 = h.get("started_at")?.parse().ok()?;
            let last: u64 = h.get("last_segment_at")?.parse().ok()?;
            (last >= started + 6000).then_some(())
        },
    )
    .await;

    let (_, gen_before) = owner(&mut c, "farm", "news").await.expect("news runs");
    n1.kill9();
    let killed = Instant::now();
    let killed_ms = farm_tests::procs::now_ms();
    // A second viewer polls through n2 until it is served again: a playlist listing a segment of
    // a newer run (gen) than the dead owner's, and that segment's bytes.
    let probe_url = format!("{}/live/news/index.m3u8", n2.base_url());
    let served_again = tokio::spawn(async move {
        let http = no_redirects_within(Duration::from_secs(10));
        while killed.elapsed() < Duration::from_secs(30) {
            let (status, body) = observed_playlist(&http, &probe_url).await;
            if status == 200
                && newer_segment(&http, &probe_url, &body, gen_before)
                    .await
                    .is_some_and(|bytes| !bytes.is_empty())
            {
                return Some((killed.elapsed(), farm_tests::procs::now_ms()));
            }
            tokio::time::sleep(farm_tests::wait::POLL_INTERVAL).await;
        }
        None
    });
    // The new owner's FFmpeg for news, as /proc shows it: its kernel start time.
    let new_ffmpeg_start = tokio::spawn({
        let root = n2.hls_root().to_path_buf();
        async move {
            eventually("news's FFmpeg on n2", Duration::from_secs(20), || {
                let root = root.clone();
                async move {
                    let pid = *ffmpegs_for(&root, "news").first()?;
                    farm_tests::procs::start_unix_ms(pid)
                }
            })
            .await
        }
    });
    // Polled with a deadline, noting when each channel moved.
    let mut moved = HashMap::new();
    while moved.len() < 2 {
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "channels not owned by n2 20s after the kill: moved so far {moved:?}"
        );
        for ch in ["news", "sports"] {
            if !moved.contains_key(ch)
                && owner(&mut c, "farm", ch).await.map(|o| o.0).as_deref() == Some("n2")
            {
                moved.insert(ch, killed.elapsed());
            }
        }
        tokio::time::sleep(farm_tests::wait::POLL_INTERVAL).await;
    }
    eventually_with(
        &c,
        "sports to run on n2",
        Duration::from_secs(20),
        |mut c| async move {
            let state: Option<String> = c.hget("farm:stream:sports", "state").await.ok()?;
            (state.as_deref() == Some("running")).then_some(())
        },
    )
    .await;
    let running = killed.elapsed();
    println!(
        "after kill -9 of n1: news owned by n2 after {:?}, sports after {:?} (node_ttl + tick = {:?}); sports running (playlist ready) after {running:?}",
        moved["news"],
        moved["sports"],
        NODE_TTL + TICK
    );
    // sports has no viewer: only the coordinator's failover start can have moved it.
    assert!(
        moved["sports"] <= NODE_TTL + TICK + SLACK,
        "sports moved after {:?} (bound node_ttl + tick + 0.5 s)",
        moved["sports"]
    );

    let spawned_ms = new_ffmpeg_start.await.expect("ffmpeg task");
    let (served_again, served_ms) = served_again
        .await
        .expect("probe task")
        .expect("news served again through n2 within 30 s");
    let spawned = Duration::from_millis(spawned_ms.saturating_sub(killed_ms));
    let first_segment = Duration::from_millis(served_ms.saturating_sub(spawned_ms));
    println!(
        "news served again through n2 (a segment of the new run) {served_again:?} after the kill: \
new FFmpeg started {spawned:?} after it (bound node_ttl + tick + 0.5 s = {:?}), its first segment served {first_segment:?} later",
        NODE_TTL + TICK + SLACK
    );
    assert!(
        spawned <= NODE_TTL + TICK + SLACK,
        "the new owner's FFmpeg started {spawned:?} after the kill"
    );
    assert!(
        first_segment <= HLS_TIME * 2,
        "the new run's first segment was served {first_segment:?} after its FFmpeg started"
    );
    assert!(served_again <= NODE_TTL + TICK + SLACK + first_segment + Duration::from_millis(100));
    let report = pull
        .await
        .expect("player task")
        .expect("the player kept playing");
    println!(
        "player across the failover: longest wait between new segments {:?}; {report:?}",
        report.max_wall_gap_between_new_segments
    );
    // The last segment before the kill is at most one segment old; the player reloads every
    // half target duration.
    assert!(
        report.max_wall_gap_between_new_segments <= served_again + HLS_TIME + HLS_TIME / 2 + SLACK,
        "{report:?}"
    );

    // Nothing of the dead node remains in Redis.
    for key in [
        "farm:node:n1",
        "farm:node:n1:alive",
        "farm:node:n1:streams",
        "farm:cmd:n1",
    ] {
        let e: bool = c.exists(key).await.expect("EXISTS");
        assert!(!e, "{key} survived the reap");
    }
    let member: Option<f64> = c.zscore("farm:nodes", "n1").await.expect("ZSCORE");
    assert_eq!(member, None);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("farm:*")
        .query_async(&mut c)
        .await
        .expect("KEYS");
    for key in &keys {
        if key.starts_with("farm:owner:") {
            let v: String = c.get(key).await.expect("GET");
            assert!(!v.starts_with("n1:"), "{key} = {v}");
        }
        if key.starts_with("farm:stream:") {
            let n: Option<String> = c.hget(key, "node").await.expect("HGET");
            assert_ne!(n.as_deref(), Some("n1"), "{key} still names n1");
        }
        assert!(!key.contains("n1"), "{key} is left from the dead node");
    }
    let ev = events(&mut c, "farm").await;
    for e in &ev {
        println!(
            "event {} {:<14} node={} channel={} gen={} reason={}",
            e.id,
            e.kind(),
            e.get("node"),
            e.get("channel"),
            e.get("gen"),
            e.get("reason")
        );
    }
    let dead: Vec<_> = ev.iter().filter(|e| e.kind() == "node_dead").collect();
    assert_eq!(dead.len(), 1, "{ev:?}");
    assert_eq!(dead[0].get("node"), "n1");
    let failover: Vec<_> = ev
        .iter()
        .filter(|e| e.kind() == "failover" && e.get("channel") == "sports")
        .collect();
    assert_eq!(failover.len(), 1, "{ev:?}");
    assert_eq!(
        (failover[0].get("from"), failover[0].get("node")),
        ("n1", "n2")
    );
    assert!(
        co.metric("farm_coordinator_reaps_total{reason=\"node_dead\"}") >= 3.0,
        "{}",
        co.metrics()
    );
    farm.assert_settled(&[&n1, &n2], "failover").await;
    let orphans = farm_tests::node::kill_processes_under(&root.path().join("n1"));
    println!(
        "FFmpegs of the killed node still running (the node's next start would sweep them): {}",
        orphans.len()
    );
}
