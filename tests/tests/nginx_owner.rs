//! Routing to the owner behind nginx: a request that nginx sends to a node that does not run the
//! channel comes back as `X-Accel-Redirect: /_farm_owner/<owner ip:port>/live/...`, and nginx's
//! internal location fetches it from the owner. The viewer never leaves nginx and never sees a
//! redirect; the signed token travels along and is checked by the owner.

use farm_tests::fixtures::*;
use farm_tests::hls::HlsClient;
use farm_tests::nginx::{NginxOpts, NginxServer};
use farm_tests::wait::eventually;
use std::time::Duration;

const SECRET: &str = "owner-test-secret-0123456789";

fn token(channel: &str) -> String {
    signed_token(SECRET, channel, 600, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_nginx_sends_to_the_non_owner_is_served_from_the_owner() {
    let (redis, root) = redis_with_fake_channels(&["c1"]);
    let args = ["--token-secret", SECRET, "--accel-redirect", "/_farm_owner"];
    let owner = node(&redis, "a", root.path(), true, &args);
    let other = node(&redis, "b", root.path(), true, &args);
    let tok = token("c1");

    // The channel starts on node a (a viewer that reached a directly).
    let direct = format!("{}/live/{tok}/c1/index.m3u8", owner.base_url());
    eventually("c1 runs on node a", Duration::from_secs(20), || async {
        (get_observed(&direct).await.status == 200).then_some(())
    })
    .await;
    assert_eq!(
        hgetall(&redis, "farm:stream:c1")
            .await
            .get("node")
            .map(String::as_str),
        Some("a")
    );

    // This nginx only knows node b and b's disk: every c1 request goes to b, which does not own it.
    let nginx = NginxServer::start(&NginxOpts::for_nodes([&other]));
    let url = format!("{}/live/{tok}/c1/index.m3u8", nginx.base_url());
    let r = get_observed(&url).await; // no redirect following: the viewer must get the playlist itself
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("location"), "");
    assert!(
        farm_tests::hls::MediaPlaylist::parse(&r.text()).is_ok(),
        "{}",
        r.text()
    );

    let report = HlsClient::new(&url)
        .pull(Duration::from_secs(4), Duration::from_secs(20))
        .await
        .expect("pull through nginx");
    println!("pulled through nginx via node b: {report:?}");
    assert!(
        report.segments >= 4 && report.failed_segments == 0,
        "{report:?}"
    );

    // nginx logs a request after its response went out: wait for the pull's last segment.
    let entries = eventually(
        "nginx logged every segment",
        Duration::from_secs(5),
        || async {
            let entries = nginx.access_entries();
            let segs = entries
                .iter()
                .filter(|e| e.path.contains("/c1/") && e.path.ends_with(".ts"))
                .count();
            (segs as u64 >= report.segments).then_some(entries)
        },
    )
    .await;
    let c1: Vec<_> = entries.iter().filter(|e| e.path.contains("/c1/")).collect();
    let via_owner = c1.iter().filter(|e| e.via == "owner").count();
    let bytes_from_owner: u64 = c1
        .iter()
        .filter(|e| e.via == "owner")
        .map(|e| e.bytes)
        .sum();
    println!(
        "nginx: {} c1 requests, {via_owner} fetched from the owner ({bytes_from_owner} bytes), statuses {:?}",
        c1.len(),
        c1.iter().map(|e| e.status).collect::<Vec<_>>()
    );
    // Playlists: node b answers them itself, from what the owner recorded in Redis; segments: b
    // hands them to the owner (X-Accel-Redirect), which sends them.
    for e in &c1 {
        let want = if e.path.ends_with(".m3u8") {
            "node"
        } else {
            "owner"
        };
        assert!(
            e.status == 200 && e.via == want,
            "{} answered {} via {}, wanted 200 via {want}: {c1:#?}",
            e.path,
            e.status,
            e.via
        );
    }
    assert!(via_owner >= report.segments as usize, "{c1:#?}");
    assert!(metric(&other, "farm_node_remote_playlists_total").await >= 1.0);
    // The owner sent the bytes; b sent none and started nothing.
    let a_bytes = metric(&owner, "farm_node_segment_bytes_total").await;
    let b_bytes = metric(&other, "farm_node_segment_bytes_total").await;
    println!("segment bytes served: owner a {a_bytes}, non-owner b {b_bytes}");
    assert!(a_bytes >= report.bytes as f64, "a served {a_bytes}");
    assert_eq!(b_bytes, 0.0);
    assert!(!other.hls_root().join("c1").exists(), "b never ran c1");
    assert_eq!(
        hgetall(&redis, "farm:stream:c1")
            .await
            .get("node")
            .map(String::as_str),
        Some("a"),
        "still one FFmpeg, on a"
    );

    // The token still matters on the owner's side: a wrong one is refused through the same path.
    let wrong = format!("{}/live/{}/c1/index.m3u8", nginx.base_url(), token("c2"));
    assert_eq!(get(&wrong).await.status, 403);
}

/// One nginx in front of two nodes on one machine (the cluster launcher's layout): channels run on
/// node a, whatever node their id hashes to. Every auth subrequest for a segment on a's disk goes
/// to a, the node that runs the channel; none goes to b. (With the hash alone, about half of six
/// channels would land on b.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_subrequests_go_to_the_node_whose_disk_has_the_file() {
    let ids = ["ch1", "ch2", "ch3", "ch4", "ch5", "ch6"];
    let (redis, root) = redis_with_fake_channels(&ids);
    let args = ["--token-secret", SECRET, "--accel-redirect", "/_farm_owner"];
    let a = node(&redis, "a", root.path(), true, &args);
    let b = node(&redis, "b", root.path(), true, &args);
    let playlist_on_a = |id: &str| format!("{}/live/{}/{id}/index.m3u8", a.base_url(), token(id));
    for id in ids {
        let r = get_observed(&playlist_on_a(id)).await;
        assert_eq!(r.status, 200, "{id} on a: {}", r.text());
    }
    let nginx = NginxServer::start(&NginxOpts::for_nodes([&a, &b]));
    let mut before = Vec::new();
    for id in &ids {
        before.push(zscore(&redis, "farm:access", id).await.expect("access") as u64);
    }
    for id in &ids {
        // The newest segment now (segments leave the disk a few seconds after the playlist).
        let r = get(&playlist_on_a(id)).await;
        let p = farm_tests::hls::MediaPlaylist::parse(&r.text()).expect("playlist");
        let seg = p.segments.last().expect("a segment").uri.clone();
        let url = format!("{}/live/{}/{id}/{seg}", nginx.base_url(), token(id));
        let r = get(&url).await;
        assert_eq!(r.status, 200, "{id} through nginx: {}", r.text());
    }
    let (a_auth, b_auth) = (
        metric(&a, "farm_node_auth_allowed_total").await,
        metric(&b, "farm_node_auth_allowed_total").await,
    );
    println!("auth subrequests: node a (runs all six) {a_auth}, node b {b_auth}");
    assert_eq!(b_auth, 0.0, "auth for files on a's disk went to b");
    assert!(a_auth >= ids.len() as f64);
    // And a counted them: every channel's access time moved.
    for (id, t0) in ids.iter().zip(before) {
        eventually(
            &format!("{id}'s access to advance"),
            Duration::from_secs(5),
            || async {
                let t = zscore(&redis, "farm:access", id).await? as u64;
                (t > t0).then_some(())
            },
        )
        .await;
    }
    let vias: Vec<String> = nginx
        .access_entries()
        .into_iter()
        .filter(|e| e.path.starts_with("/live/"))
        .map(|e| e.via)
        .collect();
    assert!(vias.iter().all(|v| v == "disk"), "{vias:?}");
}
