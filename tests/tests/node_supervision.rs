//! FFmpeg supervision with real FFmpeg against the fake provider: crash restart with backoff,
//! a provider refusing forever ends in `failed`, a stalled provider is restarted, a dead primary
//! URL falls over to the backup.

mod common;

use common::*;
use farm_tests::provider::{FakeProvider, Mode};
use farm_tests::redis::RedisServer;
use farm_tests::wait::eventually;
use redis::AsyncCommands;
use std::time::{Duration, Instant};

async fn events(redis: &RedisServer) -> Vec<std::collections::HashMap<String, String>> {
    let mut c = redis.conn().await;
    let reply: redis::streams::StreamRangeReply =
        c.xrange_all("farm:events").await.expect("XRANGE");
    reply
        .ids
        .into_iter()
        .map(|e| {
            e.map
                .into_iter()
                .filter_map(|(k, v)| redis::from_redis_value::<String>(v).ok().map(|v| (k, v)))
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_ffmpeg_is_restarted_after_a_backoff_and_counted() {
    let redis = RedisServer::start();
    let provider = FakeProvider::start().await;
    let root = tempfile::tempdir().expect("tempdir");
    add_channel(&redis, "kids", &provider.url("/kids.ts"), &[]);
    let node = node(&redis, "n1", root.path(), false, &[]);
    let url = format!("{}/live/kids/index.m3u8", node.base_url());
    assert_eq!(get(&url).await.status, 200);
    let old: i32 = hgetall(&redis, "farm:stream:kids").await["pid"]
        .parse()
        .expect("pid");

    let killed_at = Instant::now();
    farm_tests::signal::kill9(old).expect("kill -9 ffmpeg");
    let new = eventually("a new ffmpeg recorded", Duration::from_secs(20), || async {
        let h = hgetall(&redis, "farm:stream:kids").await;
        let pid: i32 = h.get("pid")?.parse().ok()?;
        (pid != old && h.get("state")? == "running").then_some((pid, h))
    })
    .await;
    println!(
        "restart after kill -9 took {:?} (backoff included)",
        killed_at.elapsed()
    );
    assert_eq!(new.1["restarts"], "1");
    assert!(
        new.1["last_error"].contains("signal") || new.1["last_error"].contains("9"),
        "{:?}",
        new.1
    );
    assert_eq!(
        ffmpegs_under(root.path()),
        vec![new.0],
        "only the new ffmpeg runs"
    );
    let ev = events(&redis).await;
    assert!(
        ev.iter()
            .any(|e| e["event"] == "restarted" && e["channel"] == "kids"),
        "{ev:?}"
    );
    // Viewers keep getting the playlist: the new run's segments follow the old ones after a
    // discontinuity, their media sequence numbers continuing (not starting again at 0).
    let p = eventually("the new run published", Duration::from_secs(10), || async {
        let r = get(&url).await;
        let p = farm_tests::hls::MediaPlaylist::parse(&r.text()).ok()?;
        p.segments.iter().any(|s| s.discontinuity).then_some(p)
    })
    .await;
    let cut = p
        .segments
        .iter()
        .position(|s| s.discontinuity)
        .expect("a discontinuity");
    assert!(cut > 0, "the old run's segments are still listed: {p:?}");
    assert!(
        p.segments[cut].sequence > p.segments[cut - 1].sequence,
        "sequence continues after a restart: {p:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_refusing_forever_ends_in_failed_with_the_reason_and_spawns_stop() {
    let redis = RedisServer::start();
    let provider = FakeProvider::start().await;
    provider.set_path_mode("/gone.ts", Mode::Forbidden);
    let root = tempfile::tempdir().expect("tempdir");
    add_channel(&redis, "gone", &provider.url("/gone.ts"), &[]);
    let node = node(
        &redis,
        "n1",
        root.path(),
        false,
        &[
            "--max-crashes",
            "3",
            "--crash-window",
            "60s",
            "--failed-hold",
            "30s",
            "--start-timeout",
            "20s",
        ],
    );
    let url = format!("{}/live/gone/index.m3u8", node.base_url());
    let t0 = Instant::now();
    let r = get(&url).await;
    println!(
        "failed after {:?}: {} {}",
        t0.elapsed(),
        r.status,
        r.text().trim()
    );
    assert_eq!(r.status, 503);
    // Viewers get a generic reason (FFmpeg's text quotes upstream URLs); the hash names the 403.
    assert!(
        r.text().contains("is failing upstream; retry later"),
        "{}",
        r.text()
    );
    assert!(!r.header("retry-after").is_empty());

    // Viewers learn of the failure the moment it happens; the stream hash follows.
    let h = eventually(
        "the stream hash says failed",
        Duration::from_secs(5),
        || async {
            let h = hgetall(&redis, "farm:stream:gone").await;
            (h.get("state").map(String::as_str) == Some("failed")).then_some(h)
        },
    )
    .await;
    assert!(h["last_error"].contains("403"), "{h:?}");
    assert!(!exists(&redis, "farm:owner:gone").await, "lease released");
    assert_eq!(
        provider.total_connections_for("/gone.ts"),
        3,
        "three attempts, then stop"
    );
    // Viewers keep asking; nothing is spawned again while the failure holds.
    for _ in 0..5 {
        let r = get(&url).await;
        assert_eq!(r.status, 503);
        assert!(r.text().contains("is failing upstream"));
    }
    assert_eq!(
        provider.total_connections_for("/gone.ts"),
        3,
        "spawns stopped"
    );
    assert_eq!(metric(&node, "farm_node_ffmpeg_spawns_total").await, 3.0);
    assert!(ffmpegs_under(root.path()).is_empty());
    assert!(!root.path().join("n1/gone").exists(), "folder removed");
    let ev = events(&redis).await;
    assert!(
        ev.iter()
            .any(|e| e["event"] == "failed" && e["reason"].contains("403")),
        "{ev:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_provider_is_restarted_within_three_segments_plus_read_timeout() {
    let redis = RedisServer::start();
    let provider = FakeProvider::start().await;
    let root = tempfile::tempdir().expect("tempdir");
    add_channel(&redis, "slow", &provider.url("/slow.ts"), &[]);
    // hls_time 1s (FAST), read timeout 3s: the bound is 3 × 1 s + 3 s = 6 s.
    let node = node(&redis, "n1", root.path(), false, &["--read-timeout", "3s"]);
    let url = format!("{}/live/slow/index.m3u8", node.base_url());
    assert_eq!(get(&url).await.status, 200);
    let old = hgetall(&redis, "farm:stream:slow").await["pid"].clone();

    provider.set_path_mode("/slow.ts", Mode::Stall);
    let stalled_at = Instant::now();
    let (after, h) = eventually(
        "the stalled ffmpeg is replaced",
        Duration::from_secs(20),
        || async {
            let h = hgetall(&redis, "farm:stream:slow").await;
            (h.get("restarts").map(String::as_str) != Some("0")).then(|| (stalled_at.elapsed(), h))
        },
    )
    .await;
    println!(
        "stall detected and restart begun after {after:?}: {}",
        h["last_error"]
    );
    assert!(
        after <= Duration::from_secs(6) + Duration::from_millis(1500),
        "restart within 3 × hls_time + read timeout: {after:?}"
    );
    provider.set_path_mode("/slow.ts", Mode::Normal);
    eventually("running again", Duration::from_secs(20), || async {
        let h = hgetall(&redis, "farm:stream:slow").await;
        (h.get("state")? == "running" && *h.get("pid")? != old).then_some(())
    })
    .await;
    assert_eq!(get(&url).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_primary_url_falls_over_to_the_backup() {
    let redis = RedisServer::start();
    let provider = FakeProvider::start().await;
    provider.set_path_mode("/primary.ts", Mode::NotFound);
    let root = tempfile::tempdir().expect("tempdir");
    add_channel(
        &redis,
        "movie",
        &provider.url("/primary.ts"),
        &["--backup", &provider.url("/backup.ts")],
    );
    let node = node(
        &redis,
        "n1",
        root.path(),
        false,
        &["--start-timeout", "15s"],
    );
    let r = get(&format!("{}/live/movie/index.m3u8", node.base_url())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let h = hgetall(&redis, "farm:stream:movie").await;
    assert_eq!(h["source"], provider.url("/backup.ts"), "{h:?}");
    assert!(h["last_error"].contains("404"), "{h:?}");
    assert_eq!(provider.current_connections_for("/backup.ts"), 1);
    let mut c = redis.conn().await;
    let n: u64 = c.xlen("farm:events").await.expect("XLEN");
    assert!(n >= 2, "started and restarted events");
}
