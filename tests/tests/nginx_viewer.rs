//! The seeds' worst failure, tested: nginx sends every byte from disk, and the farm still sees the
//! viewer. Real nginx (shipped config, auth_request mode, signed URLs), a real farm-node (fake
//! FFmpeg, 500 ms segments) and a real farm-coordinator (idle_timeout 4 s, tick 500 ms).
//!
//! - A viewer plays only through nginx for 30 s: the node sends no segment byte itself, the channel's
//!   `farm:access` keeps advancing, it is never stopped (an unwatched twin is, within the same run),
//!   and it is stopped within idle_timeout + tick (+ flush and the stop) once the viewer leaves.
//! - Tampered, expired, wrong-channel, client-bound-elsewhere and missing tokens get 403 through
//!   nginx; the channel's access time does not move and nothing starts.

use farm_tests::coordinator::{events, owner};
use farm_tests::farm::{Farm, FarmBuilder};
use farm_tests::fixtures::*;
use farm_tests::hls::HlsClient;
use farm_tests::nginx::raw_request;
use farm_tests::wait::eventually;
use std::time::{Duration, Instant};

const SECRET: &str = "viewer-test-secret-0123456789";
const IDLE: Duration = Duration::from_secs(4);
const TICK: Duration = Duration::from_millis(500);
const FLUSH: Duration = Duration::from_millis(500);

fn token(channel: &str) -> String {
    signed_token(SECRET, channel, 600, None)
}

/// Node n1 (fake FFmpeg, signed URLs) behind nginx, channels `ids` on the fake FFmpeg's source.
fn farm(ids: &[&str]) -> FarmBuilder {
    Farm::builder()
        .fake_channels(ids, 500)
        .nodes(&["n1"])
        .fake_ffmpeg()
        .node_args(&["--token-secret", SECRET])
        .nginx()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_served_only_by_nginx_keeps_the_channel_alive_and_it_stops_after_they_leave() {
    let farm = farm(&["watched", "unwatched"])
        .coordinators(&["co1"])
        .coordinator_value("--idle-timeout", "4s")
        .coordinator_value("--tick", "500ms")
        .start()
        .await;
    let (redis, node, co, nginx) = (
        &farm.redis,
        &farm.nodes[0],
        &farm.coordinators[0],
        farm.nginx(),
    );
    let mut c = redis.conn().await;
    let url = |id: &str| format!("{}/live/{}/{id}/index.m3u8", nginx.base_url(), token(id));

    // Both channels start through nginx; only one is watched afterwards.
    assert_all_play(["watched", "unwatched"].map(url)).await;
    let (_, gen) = owner(&mut c, "farm", "watched")
        .await
        .expect("watched runs");
    let started_bytes = metric(node, "farm_node_segment_bytes_total").await;

    let mut viewer = HlsClient::new(&url("watched"));
    let mut last_access = access(redis, "watched").await.expect("access entry");
    let mut total = farm_tests::hls::PullReport::default();
    let mut unwatched_stopped_at = None;
    let began = Instant::now();
    for round in 1..=6 {
        let r = watch_round(&mut viewer, round).await;
        total.add(&r);
        // The node flushes every 500 ms: a viewer of 5 s moved the access time.
        let a = access_after(redis, "watched", last_access).await;
        let age = redis_now_ms(redis).await.saturating_sub(a);
        let still = owner(&mut c, "farm", "watched").await;
        if unwatched_stopped_at.is_none() && owner(&mut c, "farm", "unwatched").await.is_none() {
            unwatched_stopped_at = Some(began.elapsed());
        }
        println!(
            "round {round}: {} segments ({} bytes) through nginx, access advanced {} ms (age {age} ms), owner {still:?}",
            r.segments,
            r.bytes,
            a - last_access
        );
        assert_eq!(
            still,
            Some(("n1".to_string(), gen)),
            "the watched channel was stopped"
        );
        last_access = a;
    }
    let left = Instant::now();
    println!("viewer total over {:?}: {total:?}", began.elapsed());
    assert!(total.segments >= 55, "{total:?}");
    assert_eq!(
        (total.gaps, total.failed_segments, total.sequence_resets),
        (0, 0, 0)
    );

    // nginx sent every segment byte from disk; the node sent none.
    let node_bytes = metric(node, "farm_node_segment_bytes_total").await - started_bytes;
    let entries = nginx.access_entries();
    let segs: Vec<_> = entries
        .iter()
        .filter(|e| e.path.contains("/watched/seg_"))
        .collect();
    let from_disk: u64 = segs
        .iter()
        .filter(|e| e.via == "disk" && e.status == 200)
        .map(|e| e.bytes)
        .sum();
    let allowed = metric(node, "farm_node_auth_allowed_total").await;
    println!(
        "segments: {} requests, {from_disk} bytes sent by nginx from disk, {node_bytes} by the node; {allowed} auth subrequests allowed",
        segs.len()
    );
    assert_eq!(node_bytes, 0.0, "the node served segment bytes itself");
    assert!(
        segs.iter().all(|e| e.via == "disk" && e.status == 200),
        "{segs:#?}"
    );
    assert_eq!(from_disk, total.bytes);

    // The unwatched twin shows what the watched channel escaped: it was stopped as idle.
    let stops: Vec<_> = events(&mut c, "farm")
        .await
        .into_iter()
        .filter(|e| e.kind() == "stopped")
        .collect();
    println!(
        "unwatched channel found stopped at the round ending {unwatched_stopped_at:?} into the viewing; stop events: {:?}",
        stops.iter().map(|e| (e.get("channel").to_string(), e.get("reason").to_string())).collect::<Vec<_>>()
    );
    assert!(
        unwatched_stopped_at.is_some(),
        "the unwatched channel was not stopped"
    );
    assert!(
        stops.iter().all(|e| e.get("channel") != "watched"),
        "watched was stopped: {stops:?}"
    );
    assert!(stops
        .iter()
        .any(|e| e.get("channel") == "unwatched" && e.get("reason") == "idle"));

    // The viewer left: the channel goes within idle_timeout + tick + flush (+ the stop).
    let took = stopped_after_its_viewer_left(&c, "watched", left).await;
    let bound = IDLE + TICK + FLUSH;
    println!("stopped {took:?} after the viewer left (idle + tick + flush = {bound:?})");
    assert!(took >= IDLE - FLUSH, "stopped too early: {took:?}");
    assert!(
        took <= bound + Duration::from_secs(2),
        "stopped late: {took:?}"
    );
    assert!(co.metric("farm_coordinator_idle_stops_total") >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_403_through_nginx_move_no_access_time_and_start_nothing() {
    let farm = farm(&["c1", "probe", "idle"]).start().await;
    let (redis, node, nginx) = (&farm.redis, &farm.nodes[0], farm.nginx());
    let base = nginx.base_url();
    let good = |id: &str, file: &str| format!("{base}/live/{}/{id}/{file}", token(id));

    for id in ["c1", "probe"] {
        assert_eq!(get_observed(&good(id, "index.m3u8")).await.status, 200);
    }
    let seg = farm_tests::hls::MediaPlaylist::parse(
        &get_observed(&good("c1", "index.m3u8")).await.text(),
    )
    .expect("playlist")
    .segments[0]
        .uri
        .clone();
    // A probe access flushed after this point proves every earlier record was flushed too (a
    // flush takes the node's whole buffer).
    let probe = |before: u64| {
        let redis = &redis;
        let url = good("probe", "index.m3u8");
        async move {
            assert_eq!(get_observed(&url).await.status, 200);
            eventually(
                "the probe's access to be flushed",
                Duration::from_secs(5),
                || async { access(redis, "probe").await.filter(|a| *a > before) },
            )
            .await
        }
    };
    let p0 = probe(access(redis, "probe").await.unwrap_or(0)).await;
    let c1_before = access(redis, "c1").await.expect("c1 access");
    // Segments are checked by the auth subrequest, playlists by the node answering them.
    let denied_now = || async {
        metric(node, "farm_node_auth_denied_total").await
            + metric(node, "farm_node_playback_refused_total").await
    };
    let denied_before = denied_now().await;

    let t = token("c1");
    let flipped = {
        let (head, last) = t.split_at(t.len() - 1);
        format!("{head}{}", if last == "0" { "1" } else { "0" })
    };
    let expired = signed_token(SECRET, "c1", -5, None);
    let elsewhere = signed_token(SECRET, "c1", 600, Some("10.9.9.9"));
    let bad_tokens = [
        ("tampered", flipped),
        ("expired", expired),
        ("other channel's", token("probe")),
        ("bound to another client", elsewhere),
        ("garbage", "123.a.nothex".to_string()),
    ];
    let mut sent = 0;
    for (what, tok) in &bad_tokens {
        for id in ["c1", "idle"] {
            for file in ["index.m3u8", seg.as_str()] {
                let path = format!("/live/{tok}/{id}/{file}");
                let r = raw_request(nginx.addr(), "GET", &path);
                sent += 1;
                assert_eq!(r.status, 403, "{what} token, {path}: {}", r.text());
            }
        }
    }
    // No token at all, with signed URLs on.
    for id in ["c1", "idle"] {
        let r = raw_request(nginx.addr(), "GET", &format!("/live/{id}/index.m3u8"));
        sent += 1;
        assert_eq!(r.status, 403, "no token: {}", r.text());
    }
    let denied = denied_now().await - denied_before;
    println!("{sent} requests with bad or missing tokens through nginx: all 403; the node denied {denied}");
    assert_eq!(denied, f64::from(sent), "each was checked by the node");

    let p1 = probe(p0).await;
    let c1_after = access(redis, "c1").await.expect("c1 access");
    println!(
        "c1 access before {c1_before}, after {c1_after} (probe advanced {} ms meanwhile)",
        p1 - p0
    );
    assert_eq!(
        c1_after, c1_before,
        "a refused request moved c1's access time"
    );
    assert!(
        owner(&mut redis.conn().await, "farm", "idle")
            .await
            .is_none(),
        "a refused request started a channel"
    );
    assert!(access(redis, "idle").await.is_none());
    assert!(!node.hls_root().join("idle").exists());
    let bad_entries = nginx
        .access_entries()
        .into_iter()
        .filter(|e| e.status == 403)
        .count();
    assert_eq!(bad_entries, sent as usize);
}
