//! The zero-cost access mode: nginx makes no subrequest; it writes each request's path to the node's
//! datagram socket (`access_log syslog:server=unix:...`), and the node counts the viewer from it.
//!
//! - It keeps a watched channel alive and lets an unwatched one stop, like auth_request mode, while
//!   nginx sends every byte and the node answers no request for a running channel.
//! - Side by side with auth_request on the same node: request rate, latency and how many accesses
//!   each mode reported (datagrams can be dropped when the node falls behind; subrequests cannot).

use farm_tests::coordinator::{events, owner};
use farm_tests::farm::{Farm, FarmBuilder};
use farm_tests::fixtures::*;
use farm_tests::hls::HlsClient;
use farm_tests::nginx::{NginxOpts, NginxServer};
use futures::StreamExt;
use std::time::{Duration, Instant};

/// Node n1 (fake FFmpeg) taking access records on its socket, channels `ids` (a segment every
/// `seg_ms`).
fn farm(ids: &[&str], seg_ms: u64) -> FarmBuilder {
    Farm::builder()
        .fake_channels(ids, seg_ms)
        .nodes(&["n1"])
        .fake_ffmpeg()
        .access_sockets()
}

/// nginx in front of the farm's nodes; in access-log mode when `zero_cost`.
fn nginx(farm: &Farm, zero_cost: bool) -> NginxServer {
    let opts = NginxOpts::for_nodes(&farm.nodes);
    NginxServer::start(&if zero_cost {
        opts.access_log([&farm.access_socket("n1")])
    } else {
        opts
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_mode_keeps_a_watched_channel_alive_and_lets_an_unwatched_one_stop() {
    let farm = farm(&["watched", "unwatched"], 500)
        .coordinators(&["co1"])
        .coordinator_value("--idle-timeout", "4s")
        .coordinator_value("--tick", "500ms")
        .start()
        .await;
    let (redis, node, co) = (&farm.redis, &farm.nodes[0], &farm.coordinators[0]);
    let nginx = nginx(&farm, true);
    let mut c = redis.conn().await;
    let url = |id: &str| format!("{}/live/{id}/index.m3u8", nginx.base_url());

    assert_all_play(["watched", "unwatched"].map(url)).await;
    let (_, gen) = owner(&mut c, "farm", "watched")
        .await
        .expect("watched runs");
    let node_segment_requests =
        || async { metric(node, "farm_node_requests_total{kind=\"segment\"}").await };
    let node_playlist_requests =
        || async { metric(node, "farm_node_requests_total{kind=\"playlist\"}").await };
    let requests_at_start = node_segment_requests().await;
    let playlists_at_start = node_playlist_requests().await;

    let mut viewer = HlsClient::new(&url("watched"));
    let mut last_access = access(redis, "watched").await.expect("access entry");
    let (mut segments, mut bytes, mut playlist_loads) = (0, 0, 0);
    let began = Instant::now();
    for round in 1..=4 {
        let r = watch_round(&mut viewer, round).await;
        assert_eq!(
            (r.gaps, r.failed_segments, r.sequence_resets),
            (0, 0, 0),
            "{r:?}"
        );
        segments += r.segments;
        bytes += r.bytes;
        playlist_loads += r.playlist_loads;
        let a = access_after(redis, "watched", last_access).await;
        let lines = metric(node, "farm_node_access_log_lines_total").await;
        println!(
            "round {round}: {} segments through nginx, access advanced {} ms, {lines} access-log lines read by the node",
            r.segments,
            a - last_access
        );
        assert_eq!(
            owner(&mut c, "farm", "watched").await,
            Some(("n1".to_string(), gen)),
            "the watched channel was stopped"
        );
        last_access = a;
    }
    let left = Instant::now();
    let watched_for = began.elapsed();

    // No subrequest and no segment request reached the node: nginx sent every byte. Playlists
    // are the node's (from memory): one answer per playlist load, nothing more.
    let auth_calls = metric(node, "farm_node_auth_allowed_total").await
        + metric(node, "farm_node_auth_denied_total").await;
    let extra_requests = node_segment_requests().await - requests_at_start;
    let playlist_requests = node_playlist_requests().await - playlists_at_start;
    let node_bytes = metric(node, "farm_node_segment_bytes_total").await;
    let lines = metric(node, "farm_node_access_log_lines_total").await;
    let served = nginx
        .access_entries()
        .iter()
        .filter(|e| e.path.starts_with("/live/watched/") && e.via == "disk")
        .count();
    println!(
        "{watched_for:?} watched: {segments} segments ({bytes} bytes) and {served} requests sent by nginx from disk; \
         node: {lines} access-log lines, {auth_calls} auth calls, {extra_requests} segment requests, \
         {playlist_requests} playlist requests ({playlist_loads} loads), {node_bytes} segment bytes"
    );
    assert_eq!(auth_calls, 0.0);
    assert_eq!(extra_requests, 0.0);
    assert_eq!(playlist_requests, playlist_loads as f64);
    assert_eq!(node_bytes, 0.0);
    assert!(
        lines >= served as f64 * 0.9,
        "{lines} lines for {served} requests"
    );
    assert!(
        owner(&mut c, "farm", "unwatched").await.is_none(),
        "the unwatched channel still runs after {watched_for:?}"
    );
    let stops: Vec<_> = events(&mut c, "farm")
        .await
        .into_iter()
        .filter(|e| e.kind() == "stopped")
        .map(|e| (e.get("channel").to_string(), e.get("reason").to_string()))
        .collect();
    assert_eq!(stops, [("unwatched".to_string(), "idle".to_string())]);

    let took = stopped_after_its_viewer_left(&c, "watched", left).await;
    println!("stopped {took:?} after the viewer left (idle 4 s + tick 500 ms + flush 500 ms)");
    assert!(
        (Duration::from_millis(3500)..=Duration::from_secs(7)).contains(&took),
        "{took:?}"
    );
    assert!(co.metric("farm_coordinator_idle_stops_total") >= 2.0);
}

/// What one mode measured.
#[derive(Debug)]
struct Run {
    requests: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    reported: f64,
}

async fn hammer(url: &str, requests: usize, concurrency: usize) -> (Duration, Vec<Duration>) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .expect("client");
    let began = Instant::now();
    let mut latencies: Vec<Duration> = futures::stream::iter(0..requests)
        .map(|_| {
            let http = http.clone();
            async move {
                let t = Instant::now();
                let r = http.get(url).send().await.expect("GET");
                assert_eq!(r.status(), 200);
                r.bytes().await.expect("body");
                t.elapsed()
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    latencies.sort();
    (began.elapsed(), latencies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_request_and_access_log_side_by_side() {
    const REQUESTS: usize = 2000;
    const CONCURRENCY: usize = 8;
    // Long segments: the measured segment stays on disk for the whole run.
    let farm = farm(&["c1"], 5000).start().await;
    let node = &farm.nodes[0];
    let auth = nginx(&farm, false);
    let zero = nginx(&farm, true);
    let playlist = get_observed(&format!("{}/live/c1/index.m3u8", auth.base_url())).await;
    assert_eq!(playlist.status, 200, "{}", playlist.text());
    let seg = farm_tests::hls::MediaPlaylist::parse(&playlist.text())
        .expect("playlist")
        .segments[0]
        .uri
        .clone();

    let mut runs = Vec::new();
    for (mode, nginx, counter) in [
        ("auth_request", &auth, "farm_node_auth_allowed_total"),
        ("access-log", &zero, "farm_node_access_log_lines_total"),
    ] {
        let url = format!("{}/live/c1/{seg}", nginx.base_url());
        hammer(&url, 100, CONCURRENCY).await; // warm-up: connections, page cache
        let before = metric(node, counter).await;
        let (elapsed, lat) = hammer(&url, REQUESTS, CONCURRENCY).await;
        // Datagrams still in the socket are read within a moment; lost ones never arrive.
        let target = before + REQUESTS as f64;
        let deadline = Instant::now() + Duration::from_secs(2);
        let reported = loop {
            let n = metric(node, counter).await;
            if n >= target || Instant::now() >= deadline {
                break n - before;
            }
            tokio::time::sleep(farm_tests::wait::POLL_INTERVAL).await;
        };
        let run = Run {
            requests: REQUESTS,
            elapsed,
            p50: lat[lat.len() / 2],
            p99: lat[lat.len() * 99 / 100],
            reported,
        };
        println!(
            "{mode:>12}: {} requests x {CONCURRENCY} concurrent in {:?} = {:.0} req/s, p50 {:?}, p99 {:?}; accesses reported to the node: {} ({:.1}%)",
            run.requests,
            run.elapsed,
            run.requests as f64 / run.elapsed.as_secs_f64(),
            run.p50,
            run.p99,
            run.reported,
            run.reported * 100.0 / run.requests as f64
        );
        runs.push(run);
    }
    // auth_request reports every request (it cannot serve one without asking); the datagrams may
    // drop some under load, which only matters if a viewer's every request were lost.
    assert_eq!(runs[0].reported, REQUESTS as f64);
    assert!(runs[1].reported > 0.0, "{:?}", runs[1]);
    assert_eq!(metric(node, "farm_node_segment_bytes_total").await, 0.0);
}
