//! A single node with real FFmpeg and the fake IPTV provider: on-demand start, live playback,
//! single flight under 50 concurrent first requests, and access recording without Redis on the
//! request path.

use farm_tests::farm::Farm;
use farm_tests::fixtures::*;
use farm_tests::hls::{ffprobe_codecs, HlsClient, MediaPlaylist};
use farm_tests::redis::RedisServer;
use farm_tests::wait::eventually;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_request_plays_live_media_with_headers_state_and_access() {
    let farm = Farm::builder()
        .provider_channel_with("news", "/live/news.ts", &["--name", "News"])
        .nodes(&["n1"])
        .start()
        .await;
    let (redis, provider, root) = (&farm.redis, farm.provider(), &farm.root);
    let node = farm.node("n1");
    let base = node.base_url();

    let t0 = Instant::now();
    let first = get(&format!("{base}/live/news/index.m3u8")).await;
    println!("time to first playlist: {:?}", t0.elapsed());
    assert_eq!(first.status, 200, "{}", first.text());
    farm_tests::hls::observe(&format!("{base}/live/news/index.m3u8"), &first.text());
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
    let stream = hgetall(redis, "farm:stream:news").await;
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
    let first_cost = metric(node, "farm_node_request_path_redis_calls_total").await;
    println!("Redis calls made for the first request: {first_cost}");
    assert!(
        first_cost >= 4.0,
        "a lookup, the catalog, the claim and the recorded timeline: {first_cost}"
    );
    let access_before = zscore(redis, "farm:access", "news")
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
    let access_after = zscore(redis, "farm:access", "news").await.expect("access");
    assert!(
        access_after > access_before + 10_000.0,
        "access advanced: {access_before} -> {access_after}"
    );
    let stream = hgetall(redis, "farm:stream:news").await;
    assert_eq!(stream["state"], "running");
    assert_eq!(stream["restarts"], "0");
    assert!(!stream["last_segment_at"].is_empty());
    assert_eq!(provider.total_connections_for("/live/news.ts"), 1);
    // The first request looked the channel up (nobody ran it) and started it: the lookup and the
    // start's catalog read, claim and recorded timeline; 20 s of viewing added nothing.
    assert_eq!(
        metric(node, "farm_node_request_path_redis_calls_total").await,
        first_cost
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_first_requests_share_one_ffmpeg_and_one_upstream_connection() {
    let farm = Farm::one_node(&[("sport", "/live/sport.ts")]).await;
    let (redis, provider, root) = (&farm.redis, farm.provider(), &farm.root);
    let node = farm.node("n1");
    let url = format!("{}/live/sport/index.m3u8", node.base_url());

    let mut tasks = Vec::new();
    for _ in 0..50 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move { get(&url).await }));
    }
    for t in tasks {
        let r = t.await.expect("join");
        assert_eq!(r.status, 200, "{}", r.text());
        // Fifty viewers, each with its own first playlist: one strict checker each.
        let found = farm_tests::hls::PlaylistChecker::new().observe_playlist(&url, &r.text());
        assert!(found.is_empty(), "{found:?}");
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
    assert_eq!(metric(node, "farm_node_ffmpeg_spawns_total").await, 1.0);
    let gen: String = {
        use redis::AsyncCommands;
        let mut c = redis.conn().await;
        c.get("farm:gen:sport").await.expect("gen")
    };
    assert_eq!(gen, "1", "one claim");
}

/// Every command Redis receives while a node answers viewer requests for a channel it runs:
/// none. Counted with `MONITOR`, every command, no list of expected ones. The node's background
/// work is told apart by connection (the command stream's blocking reads have their own) and by
/// time: the node runs with 60 s TTLs (a keepalive every 10 s), a 10 s access flush and a fake
/// FFmpeg that writes three segments and then nothing (with 10 s segments the node waits 30 s
/// before calling that a stall), so after the start its only Redis traffic is two 10 s timers.
/// The test learns their phase from 11 s of traffic, then sends its requests in a window that
/// none of them falls into, and counts everything Redis received in that window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_requests_for_a_running_channel_cost_no_redis_command() {
    const PERIOD_US: u64 = 10_000_000;
    const WINDOW: Duration = Duration::from_secs(3);
    const MARGIN_US: u64 = 300_000;
    let (redis, root) = redis_with_channel(
        "c1",
        "http://127.0.0.1:9/c1.ts?mode=stall&after_ms=1700&seg_ms=500",
        &[],
    );
    let node = farm_tests::node::NodeProcess::spawn(
        farm_tests::node::NodeOpts::new("n1", redis.url(), root.path().join("n1"))
            .with_fake_ffmpeg()
            .args([
                "--hls-time",
                "10s",
                "--lease-ttl",
                "60s",
                "--node-ttl",
                "60s",
                "--access-flush",
                "10s",
            ]),
    );
    let monitor = redis.monitor();
    let url = format!("{}/live/c1/index.m3u8", node.base_url());
    let c = client();
    let playlist = |c: reqwest::Client| {
        let url = url.clone();
        async move {
            let r = c.get(&url).send().await.expect("GET playlist");
            assert_eq!(r.status().as_u16(), 200);
            let body = r.text().await.expect("body");
            farm_tests::hls::observe(&url, &body);
            body
        }
    };
    let first = playlist(c.clone()).await;
    let pl = MediaPlaylist::parse(&first).expect("playlist");
    let seg_url = format!(
        "{}/live/c1/{}",
        node.base_url(),
        pl.segments.last().expect("a segment").uri
    );
    let rp_start = metric(&node, "farm_node_request_path_redis_calls_total").await;

    // Learning: a viewer asks once a second (so that the access flush has work) for 11 s.
    let learn_from = farm_tests::procs::now_us();
    for _ in 0..11 {
        playlist(c.clone()).await;
        tokio::time::sleep(Duration::from_secs(1)).await; // a viewer's pace
    }
    let learned = monitor.seen();
    let blocking: std::collections::BTreeSet<String> = learned
        .iter()
        .filter(|m| m.command == "xreadgroup")
        .map(|m| m.client.clone())
        .collect();
    assert_eq!(
        blocking.len(),
        1,
        "one connection for the command stream's blocking reads: {blocking:?}"
    );
    let background = |m: &&farm_tests::redis::Monitored| {
        !m.in_script() && !blocking.contains(&m.client) && m.client != monitor.addr
    };
    let timers: Vec<u64> = learned
        .iter()
        .filter(background)
        .filter(|m| m.at_us >= learn_from)
        .map(|m| m.at_us)
        .collect();
    assert!(
        !timers.is_empty(),
        "no keepalive or flush in 11 s of learning"
    );
    // The next window of WINDOW that no timer (learned time + k × 10 s) comes near.
    let clear = |from: u64| {
        (1..=4u64).all(|k| {
            timers.iter().all(|t| {
                let due = t + k * PERIOD_US;
                due + MARGIN_US < from || due > from + WINDOW.as_micros() as u64 + MARGIN_US
            })
        })
    };
    let now = farm_tests::procs::now_us();
    let start = (0..PERIOD_US / 50_000)
        .map(|i| now + i * 50_000)
        .find(|t| clear(*t))
        .expect("a quiet window within one timer period");
    // Measurement scheduling against the node's known timers, not synchronisation.
    tokio::time::sleep(Duration::from_micros(start - now)).await;

    let (mut playlists, mut segments) = (0u32, 0u32);
    let t0 = farm_tests::procs::now_us();
    let deadline = Instant::now() + WINDOW;
    while Instant::now() < deadline && playlists < 1000 {
        let body = playlist(c.clone()).await;
        assert!(body.contains("#EXTINF"));
        playlists += 1;
        let r = c.get(&seg_url).send().await.expect("GET segment");
        assert_eq!(r.status().as_u16(), 200);
        let bytes = r.bytes().await.expect("segment body");
        farm_tests::hls::observe_segment(&seg_url, &bytes);
        segments += 1;
    }
    let t1 = farm_tests::procs::now_us();
    // MONITOR keeps Redis's order: once a later command shows, the window is complete.
    let after = eventually(
        "a background command after the window",
        Duration::from_secs(15),
        || async {
            monitor
                .seen()
                .into_iter()
                .filter(|m| !m.in_script() && !blocking.contains(&m.client))
                .find(|m| m.at_us > t1)
        },
    )
    .await;
    let seen = monitor.seen();
    let in_window: Vec<&farm_tests::redis::Monitored> = seen
        .iter()
        .filter(|m| m.at_us >= t0 && m.at_us <= t1)
        .filter(|m| !m.in_script() && m.client != monitor.addr)
        .collect();
    let blocked_reads = in_window
        .iter()
        .filter(|m| blocking.contains(&m.client))
        .count();
    let counted: Vec<&&farm_tests::redis::Monitored> = in_window
        .iter()
        .filter(|m| !blocking.contains(&m.client))
        .collect();
    let rp_end = metric(&node, "farm_node_request_path_redis_calls_total").await;
    println!(
        "{playlists} playlist and {segments} segment requests in {:.2} s: {} commands reached Redis meanwhile \
(plus {blocked_reads} blocking reads on the command stream's own connection); background timers learned at {} times, \
the next command {:.2} s after the window ({}); request-path counter {rp_start} -> {rp_end}",
        (t1 - t0) as f64 / 1e6,
        counted.len(),
        timers.len(),
        (after.at_us - t1) as f64 / 1e6,
        after.line,
    );
    assert!(
        playlists >= 200,
        "too few requests in the window to mean anything: {playlists}"
    );
    assert!(
        counted.is_empty(),
        "viewer requests for a running channel reached Redis: {counted:#?}"
    );
    assert_eq!(rp_end, rp_start, "the node counted a request-path call");
    // The window's accesses reach Redis with the next flush.
    let (t_last, _) = redis_time(&redis).await;
    eventually(
        "access flushed after the requests",
        Duration::from_secs(15),
        || async {
            zscore(&redis, "farm:access", "c1")
                .await
                .filter(|s| *s + 1000.0 >= (t1 / 1000) as f64 && t_last > 0)
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
    let farm = Farm::builder()
        .provider_channel_with("hd", "/hd.ts", &["--profile", "h264-720p"])
        .nodes(&["n1"])
        .node_args(&["--start-timeout", "20s"])
        .start()
        .await;
    let (redis, root) = (&farm.redis, &farm.root);
    let node = farm.node("n1");
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
    let info = hgetall(redis, "farm:node:n1").await;
    assert_eq!(info["public_url"], node.base_url());
    assert!(info["disk_free"].parse::<u64>().expect("disk_free") > 0);
    assert!(zscore(redis, "farm:nodes", "n1").await.is_some());
    let set: Vec<String> = c.smembers("farm:node:n1:streams").await.expect("SMEMBERS");
    assert_eq!(set, vec!["hd".to_string()]);
}
