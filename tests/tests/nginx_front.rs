//! nginx with the shipped config in front of a real farm-node: the first request reaches the node
//! (which starts the channel), then nginx sends playlists and segments from the node's disk with the
//! right types and cache headers; the node's 503 + Retry-After passes through; nothing but strict
//! `/live/` paths is served.

use farm_tests::fixtures::*;
use farm_tests::nginx::{raw_request, NginxOpts, NginxServer};
use farm_tests::wait::eventually;
use std::time::Duration;

const SECRET_TEXT: &str = "this-file-must-never-be-served";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_sends_hls_files_from_disk_with_the_right_headers_and_passes_the_nodes_503() {
    let (redis, root) = redis_with_fake_channels(&["c1"]);
    // First segment after 6 s, start timeout 1 s: its first request gets the node's 503.
    add_fake_channels(&redis, &["slow"], 6000);
    let node = node(&redis, "n1", root.path(), true, &["--start-timeout", "1s"]);
    let nginx = NginxServer::start(&NginxOpts::for_nodes([&node]));
    let base = nginx.base_url();
    let playlist_url = format!("{base}/live/c1/index.m3u8");

    // Not on disk yet: nginx hands the request to the node, which starts the channel.
    let first = eventually(
        "c1 plays through nginx",
        Duration::from_secs(20),
        || async {
            let r = get_observed(&playlist_url).await;
            (r.status == 200).then_some(r)
        },
    )
    .await;
    assert!(farm_tests::hls::MediaPlaylist::parse(&first.text()).is_ok());

    // Playlists always come from the node (never a stale file on disk); segments from disk.
    let r = get_observed(&playlist_url).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), "application/vnd.apple.mpegurl");
    assert_eq!(r.header("cache-control"), "no-cache");
    assert_eq!(r.header("access-control-allow-origin"), "*");
    // A playlist changes several times a second: no validators that could produce a stale 304.
    assert_eq!(r.header("etag"), "", "playlists carry no ETag");
    let playlist = farm_tests::hls::MediaPlaylist::parse(&r.text()).expect("playlist");
    let seg = playlist.segments.last().expect("a segment").uri.clone();
    let on_disk = std::fs::read(node.hls_root().join("c1").join(&seg)).expect("segment on disk");
    let s = get(&format!("{base}/live/c1/{seg}")).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.header("content-type"), "video/mp2t");
    assert_eq!(s.header("cache-control"), "public, max-age=3600, immutable");
    assert_eq!(s.header("access-control-allow-origin"), "*");
    assert!(
        s.body == on_disk,
        "nginx sent {} bytes, the file has {}",
        s.body.len(),
        on_disk.len()
    );
    let head = raw_request(nginx.addr(), "HEAD", &format!("/live/c1/{seg}"));
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        on_disk.len().to_string().as_str()
    );

    let entries = nginx.access_entries();
    let vias: Vec<(String, String)> = entries
        .iter()
        .filter(|e| e.path.starts_with("/live/c1/") && e.status == 200)
        .map(|e| (e.path.clone(), e.via.clone()))
        .collect();
    println!("nginx access log for c1: {vias:?}");
    for (path, via) in &vias {
        let want = if path.ends_with(".m3u8") {
            "node"
        } else {
            "disk"
        };
        assert_eq!(via, want, "{path}: {vias:?}");
    }
    // Every segment request was still checked with the node (auth_request), which sent no
    // segment byte.
    let allowed = metric(&node, "farm_node_auth_allowed_total").await;
    let seg_bytes = metric(&node, "farm_node_segment_bytes_total").await;
    println!("node: auth allowed {allowed}, segment bytes served by the node {seg_bytes}");
    assert!(allowed >= 2.0, "auth subrequests: {allowed}");
    assert_eq!(seg_bytes, 0.0);

    // CORS preflight, and only GET/HEAD.
    let pre = raw_request(nginx.addr(), "OPTIONS", "/live/c1/index.m3u8");
    assert_eq!(pre.status, 204);
    assert_eq!(pre.header("access-control-allow-origin"), "*");
    assert!(pre.header("access-control-allow-methods").contains("GET"));
    let post = raw_request(nginx.addr(), "POST", "/live/c1/index.m3u8");
    assert!(matches!(post.status, 403 | 405), "POST: {}", post.status);

    // The node's 503 + Retry-After while a channel starts reaches the viewer unchanged.
    let r = get_observed(&format!("{base}/live/slow/index.m3u8")).await;
    println!(
        "slow channel through nginx: {} Retry-After {:?}: {}",
        r.status,
        r.header("retry-after"),
        r.text().trim()
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.header("retry-after").parse::<u64>().is_ok_and(|s| s >= 1),
        "Retry-After: {:?}",
        r.header("retry-after")
    );
    assert_eq!(r.header("access-control-allow-origin"), "*");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_serves_nothing_but_strict_live_paths() {
    let (redis, root) = redis_with_fake_channels(&["c1"]);
    let node = node(&redis, "n1", root.path(), true, &[]);
    let nginx = NginxServer::start(&NginxOpts::for_nodes([&node]));
    let status = get_observed(&format!("{}/live/c1/index.m3u8", nginx.base_url()))
        .await
        .status;
    assert_eq!(status, 200);
    // Files that must stay private: next to the channels, inside a channel folder (names FFmpeg
    // could never produce), and outside the root.
    let hls = node.hls_root();
    std::fs::write(hls.join("secret.m3u8"), SECRET_TEXT).expect("write");
    std::fs::write(hls.join("c1").join("notes.txt"), SECRET_TEXT).expect("write");
    std::fs::write(hls.join("c1").join("x.m3u8.tmp"), SECRET_TEXT).expect("write");
    std::fs::write(root.path().join("outside.ts"), SECRET_TEXT).expect("write");

    let addr = nginx.addr();
    let port = node.addr().port();
    let probes = [
        ("/live/c1/notes.txt", &[400][..]),
        ("/live/c1/x.m3u8.tmp", &[400]),
        ("/live/secret.m3u8", &[400]),
        ("/live/c1/../secret.m3u8", &[400]),
        ("/live/c1/%2e%2e/secret.m3u8", &[400]),
        ("/live/%2e%2e/outside.ts", &[400, 404]),
        ("/live/../outside.ts", &[400, 404]),
        ("/live/c1/..%2f..%2foutside.ts", &[400, 404]),
        ("/live/c1%2Fx/index.m3u8", &[400, 403]),
        ("/live/a/b/c1/index.m3u8", &[400]),
        ("/live/c1/index.m3u8/", &[400]),
        ("/live/", &[400]),
        ("/outside.ts", &[404]),
        ("/healthz", &[404]),
        ("/metrics", &[404]),
        ("/admin/streams", &[404]),
        ("/auth", &[404]),
        ("/_farm_auth", &[404]),
        (
            &*format!("/_farm_owner/127.0.0.1:{port}/live/c1/index.m3u8"),
            &[404],
        ),
        ("/etc/passwd", &[404]),
    ];
    for (path, allowed) in probes {
        let r = raw_request(addr, "GET", path);
        println!("GET {path} -> {}", r.status);
        assert!(
            allowed.contains(&r.status),
            "GET {path}: {} (wanted {allowed:?}): {}",
            r.status,
            r.text()
        );
        assert!(!r.text().contains(SECRET_TEXT), "GET {path} leaked a file");
    }
    // The node never saw those requests: only the one playlist request reached it.
    let requests = metric(&node, "farm_node_requests_total{kind=\"playlist\"}").await
        + metric(&node, "farm_node_requests_total{kind=\"segment\"}").await;
    println!("requests the node itself answered: {requests}");
    assert_eq!(requests, 1.0);
}
