//! A single node with real FFmpeg and the fake IPTV provider: on-demand start, live playback,
//! single flight under 50 concurrent first requests, and access recording without Redis on the
//! request path.

mod common;

use common::*;
use farm_tests::hls::{ffprobe_codecs, HlsClient, MediaPlaylist};
use farm_tests::provider::FakeProvider;
use farm_tests::redis::RedisServer;
use farm_tests::wait::eventually;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_request_plays_live_media_with_headers_state_and_access() {
    let redis = RedisServer::start();
    let provider = FakeProvider::start().await;
    let root = tempfile::tempdir().expect("tempdir");
    add_channel(
        &redis,
        "news",
        &provider.url("/live/news.ts"),
        &["--name", "News"],
    );
    let node = node(&redis, "n1", root.path(), false, &[]);
    let base = node.base_url();

    let t0 = Instant::now();
    let first = get(&format!("{base}/live/news/index.m3u8")).await;
    println!("time to first playlist: {:?}", t0.elapsed());
    assert_eq!(first.status, 200, "{}", first.text());
    let pl = MediaPlaylist::parse(&first.text()).expect("valid playlist");
    assert!(
        !pl.segments.is_empty(),
        "first playlist lists a segment:\n{}",
        first.text()
    );
    assert_eq!(
        first.header("content-type"),
        "application/vnd.apple.mpegurl"
    );
    assert_eq!(first.header("cache-control"), "no-cache");
    assert_eq!(first.header("access-control-allow-origin"), "*");

    let seg = get(&format!("{base}/live/news/{}", pl.segments[0].uri)).await;
    assert_eq!(seg.status, 200);
    assert_eq!(seg.header("content-type"), "video/mp2t");
    assert!(
        seg.header("cache-control").contains("max-age="),
        "{}",
        seg.header("cache-control")
    );
    let head = client()
        .head(format!("{base}/live/news/{}", pl.segments[0].uri))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(head.status().as_u16(), 200);
    let pre = client()
        .request(
            reqwest::Method::OPTIONS,
            format!("{base}/live/news/index.m3u8"),
        )
        .send()
        .await
        .expect("OPTIONS");
    assert_eq!(pre.status().as_u16(), 204);
    assert!(pre.headers().contains_key("access-control-allow-methods"));

    // The stream hash names a live FFmpeg of this node.
    let stream = hgetall(&redis, "farm:stream:news").await;
    assert_eq!(stream.get("node").map(String::as_str), Some("n1"));
    let pid: i32 = stream["pid"].parse().expect("pid recorded");
    assert!(
        ffmpegs_under(root.path()).contains(&pid),
        "pid {pid} is a live ffmpeg of this node"
    );
    assert_eq!(
        stream["pid_start"].parse::<u64>().ok(),
        farm_tests::procs::process_start_time(pid)
    );
    let access_before = zscore(&redis, "farm:access", "news")
        .await
        .expect("access recorded");

    // 20 s of media like a player: no gap in media sequence numbers.
    let mut hls = HlsClient::new(&format!("{base}/live/news/index.m3u8"));
    let report = hls
        .pull(Duration::from_secs(20), Duration::from_secs(60))
        .await
        .expect("pull");
    println!("{report:?}");
    assert!(report.media_seconds >= 20.0, "{report:?}");
    assert_eq!(report.gaps, 0, "{report:?}");
    assert_eq!(report.failed_segments, 0, "{report:?}");
    assert_eq!(report.sequence_resets, 0, "{report:?}");
    let codecs = ffprobe_codecs(report.last_segment.as_ref().expect("a segment"));
    assert!(codecs.iter().any(|c| c == "h264"), "{codecs:?}");
    assert!(codecs.iter().any(|c| c == "aac"), "{codecs:?}");

    // While watched, farm:access moved forward and the stream is running with the same FFmpeg.
    let access_after = zscore(&redis, "farm:access", "news").await.expect("access");
    assert!(
        access_after > access_before + 10_000.0,
        "access advanced: {access_before} -> {access_after}"
    );
    let stream = hgetall(&redis, "farm:stream:news").await;
    assert_eq!(stream["state"], "running");
    assert_eq!(stream["restarts"], "0");
    assert!(!stream["last_segment_at"].is_empty());
    assert_eq!(provider.total_connections_for("/live/news.ts"), 1);
    // The first request looked the channel up once (nobody ran it); 20 s of viewing added nothing.
    assert_eq!(
        metric(&node, "farm_node_request_path_redis_calls_total").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_first_requests_share_one_ffmpeg_and_one_upstream_connection() {
    let redis = RedisServer::start();
    let provider = FakeProvider::start().await;
    let root = tempfile::tempdir().expect("tempdir");
    add_channel(&redis, "sport", &provider.url("/live/sport.ts"), &[]);
    let node = node(&redis, "n1", root.path(), false, &[]);
    let url = format!("{}/live/sport/index.m3u8", node.base_url());

    let mut tasks = Vec::new();
    for _ in 0..50 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move { get(&url).await }));
    }
    for t in tasks {
        let r = t.await.expect("join");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            r.text().contains(".ts"),
            "every viewer got a playlist with a segment"
        );
    }
    assert_eq!(ffmpegs_under(root.path()).len(), 1, "exactly one ffmpeg");
    assert_eq!(
        provider.total_connections_for("/live/sport.ts"),
        1,
        "one upstream connection"
    );
    assert_eq!(provider.current_connections_for("/live/sport.ts"), 1);
    assert_eq!(metric(&node, "farm_node_ffmpeg_spawns_total").await, 1.0);
    let gen: String = {
        use redis::AsyncCommands;
        let mut c = redis.conn().await;
        c.get("farm:gen:sport").await.expect("gen")
    };
    assert_eq!(gen, "1", "one claim");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_viewer_requests_cost_a_few_flush_pipelines_and_no_request_path_redis() {
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    // Fake FFmpeg: this test is about the request path, not media.
    add_channel(
        &redis,
        "c1",
        "http://127.0.0.1:9/c1.ts?mode=normal&seg_ms=500",
        &[],
    );
    let node = node(&redis, "n1", root.path(), true, &[]);
    let url = format!("{}/live/c1/index.m3u8", node.base_url());
    let first = get(&url).await;
    assert_eq!(first.status, 200, "{}", first.text());

    let before = redis.command_calls().await;
    let rp_before = metric(&node, "farm_node_request_path_redis_calls_total").await;
    let t0 = Instant::now();
    let mut ok = 0;
    let c = client();
    // Paced like 1,000 viewer requests over ~2.5 s, so several flush intervals pass.
    let mut pace = tokio::time::interval(Duration::from_micros(2500));
    for i in 0..1000 {
        pace.tick().await;
        let r = c.get(&url).send().await.expect("GET");
        assert_eq!(r.status().as_u16(), 200, "request {i}");
        ok += 1;
    }
    let elapsed = t0.elapsed();
    let after = redis.command_calls().await;
    let delta = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    // Commands a client sent (commandstats also counts the ones scripts run inside Redis).
    let top_level = [
        "evalsha",
        "xreadgroup",
        "xack",
        "xdel",
        "xadd",
        "hgetall",
        "ping",
        "smembers",
    ];
    let total: u64 = top_level.iter().map(|k| delta(k)).sum();
    // Background traffic only: an access flush per 500 ms, a keepalive pipeline (3 scripts) per
    // 500 ms (lease TTL 3 s / 6), a timeline record per segment (500 ms) and a blocking command
    // read per second; none of it scales with the requests.
    let budget = 11 * (elapsed.as_secs() + 2);
    println!(
        "{ok} requests in {elapsed:?}: {total} redis commands from the node (evalsha {}, ping {}), budget {budget}",
        delta("evalsha"),
        delta("ping")
    );
    assert!(
        total <= budget,
        "{total} redis commands for {ok} requests in {elapsed:?}: {after:?}"
    );
    assert_eq!(
        metric(&node, "farm_node_request_path_redis_calls_total").await,
        rp_before,
        "no Redis call inside a request for a channel this node runs"
    );
    let flushes = metric(&node, "farm_node_access_flushes_total").await;
    println!("access flushes so far: {flushes}");
    assert!(
        flushes <= (elapsed.as_millis() / 500 + 3) as f64,
        "at most one flush per interval: {flushes}"
    );
    // The requests' access lands in Redis with the next flush.
    let (t_last, _) = redis_time(&redis).await;
    eventually(
        "access flushed after the requests",
        Duration::from_secs(5),
        || async {
            zscore(&redis, "farm:access", "c1")
                .await
                .filter(|s| *s >= t_last as f64)
        },
    )
    .await;
}

/// Redis TIME in ms (and the raw pair).
async fn redis_time(redis: &RedisServer) -> (u64, (u64, u64)) {
    let mut c = redis.conn().await;
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await.expect("TIME");
    (s * 1000 + us / 1000, (s, us))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcode_profile_serves_h264_aac_at_720p_and_the_node_publishes_its_liveness() {
    let redis = RedisServer::start();
    let provider = FakeProvider::start().await;
    let root = tempfile::tempdir().expect("tempdir");
    add_channel(
        &redis,
        "hd",
        &provider.url("/hd.ts"),
        &["--profile", "h264-720p"],
    );
    let node = node(
        &redis,
        "n1",
        root.path(),
        false,
        &["--start-timeout", "20s"],
    );
    let r = get(&format!("{}/live/hd/index.m3u8", node.base_url())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let pl = MediaPlaylist::parse(&r.text()).expect("playlist");
    let seg = root.path().join("n1/hd").join(&pl.segments[0].uri);
    let out = std::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "stream=codec_name,height",
            "-of",
            "csv=p=0",
        ])
        .arg(&seg)
        .output()
        .expect("ffprobe");
    let probe = String::from_utf8_lossy(&out.stdout).to_string();
    println!("transcoded segment: {probe:?}");
    assert!(probe.lines().any(|l| l.starts_with("h264,720")), "{probe}");
    assert!(probe.lines().any(|l| l.starts_with("aac")), "{probe}");

    // Liveness: node hash, alive key with a TTL, heartbeat score, its channel set.
    let mut c = redis.conn().await;
    use redis::AsyncCommands;
    let ttl: i64 = c.pttl("farm:node:n1:alive").await.expect("PTTL");
    assert!(
        ttl > 0 && ttl <= 3000,
        "alive key has a PX TTL of at most node_ttl: {ttl}"
    );
    let info = hgetall(&redis, "farm:node:n1").await;
    assert_eq!(info["public_url"], node.base_url());
    assert!(info["disk_free"].parse::<u64>().expect("disk_free") > 0);
    assert!(zscore(&redis, "farm:nodes", "n1").await.is_some());
    let set: Vec<String> = c.smembers("farm:node:n1:streams").await.expect("SMEMBERS");
    assert_eq!(set, vec!["hd".to_string()]);
}
