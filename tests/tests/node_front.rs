//! The node's side of the nginx front: signed playback URLs, the `auth_request` endpoint, routing
//! to the owner (307, or X-Accel-Redirect behind nginx) and the zero-cost access socket.

use farm_tests::fixtures::*;
use farm_tests::node::{farmctl, NodeProcess};
use farm_tests::redis::RedisServer;
use farm_tests::wait::eventually;
use std::time::Duration;

const SECRET: &str = "test-secret-0123456789";

/// The token with its last hex digit changed: well formed, wrongly signed.
fn flip_last(t: &str) -> String {
    let (head, last) = t.split_at(t.len() - 1);
    format!("{head}{}", if last == "0" { "1" } else { "0" })
}

async fn auth(node: &NodeProcess, uri: &str) -> u16 {
    client()
        .get(format!("{}/auth", node.base_url()))
        .header("X-Original-URI", uri)
        .send()
        .await
        .expect("GET /auth")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_urls_open_their_channel_only_and_bad_tokens_start_nothing() {
    let (redis, root) = redis_with_fake_channels(&["c1", "c2"]);
    let node = node(&redis, "n1", root.path(), true, &["--token-secret", SECRET]);
    let base = node.base_url();

    // farmctl mints the token the node accepts.
    let out = farmctl(
        &redis.url(),
        &["token", "c1", "--ttl", "10m", "--token-secret", SECRET],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();

    let bad = [
        (format!("{base}/live/c1/index.m3u8"), "token required"),
        (
            format!("{base}/live/{}/c1/index.m3u8", flip_last(&token)),
            "not valid",
        ),
        (format!("{base}/live/{token}/c2/index.m3u8"), "not valid"),
        (
            format!(
                "{base}/live/{}/c1/index.m3u8",
                signed_token(SECRET, "c1", -5, None)
            ),
            "expired",
        ),
        (
            format!(
                "{base}/live/{}/c1/index.m3u8",
                signed_token(SECRET, "c1", 600, Some("10.9.9.9"))
            ),
            "not valid",
        ),
        (format!("{base}/live/garbage/c1/index.m3u8"), "malformed"),
    ];
    for (url, why) in &bad {
        let r = get(url).await;
        assert_eq!(r.status, 403, "{url}: {}", r.text());
        assert!(r.text().contains(why), "{url}: {}", r.text());
    }
    assert!(
        !exists(&redis, "farm:owner:c1").await && !exists(&redis, "farm:owner:c2").await,
        "nothing started"
    );
    assert!(
        zscore(&redis, "farm:access", "c1").await.is_none(),
        "no access recorded"
    );

    // The good token plays, and relative segment URIs inherit it.
    let r = get_observed(&format!("{base}/live/{token}/c1/index.m3u8")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let pl = farm_tests::hls::MediaPlaylist::parse(&r.text()).expect("playlist");
    let seg = get(&format!("{base}/live/{token}/c1/{}", pl.segments[0].uri)).await;
    assert_eq!(seg.status, 200);
    // A client-bound token works for that client (the test connects from 127.0.0.1).
    let bound = signed_token(SECRET, "c1", 600, Some("127.0.0.1"));
    assert_eq!(
        get_observed(&format!("{base}/live/{bound}/c1/index.m3u8"))
            .await
            .status,
        200
    );

    // auth_request: 204 for a good URI, 403 otherwise; a refused check records nothing.
    let good = format!("/live/{token}/c1/index.m3u8");
    let other_channel = format!("/live/{token}/c2/index.m3u8");
    let traversal = format!("/live/{token}/c1/../../etc/passwd");
    let refused = [
        "/live/c1/index.m3u8",
        &other_channel,
        &traversal,
        "/etc/passwd",
    ];
    for (want, uris) in [(204, &[good.as_str()][..]), (403, &refused[..])] {
        for uri in uris {
            assert_eq!(auth(&node, uri).await, want, "auth of {uri}");
        }
    }
    assert!(
        !exists(&redis, "farm:owner:c2").await,
        "auth never starts a channel"
    );
    assert!(zscore(&redis, "farm:access", "c2").await.is_none());
}

/// A first viewer request for c1 on `node` (answered 200): the access time it recorded.
async fn first_access(redis: &RedisServer, node: &NodeProcess) -> f64 {
    let r = get_observed(&format!("{}/live/c1/index.m3u8", node.base_url())).await;
    assert_eq!(r.status, 200);
    zscore(redis, "farm:access", "c1").await.expect("access")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_request_checks_alone_keep_the_access_time_moving() {
    let (redis, root) = redis_with_fake_channels(&["c1"]);
    let node = node(&redis, "n1", root.path(), true, &[]);
    let first = first_access(&redis, &node).await;
    // nginx serves the bytes; the node only sees auth subrequests.
    let later = eventually(
        "auth checks advance farm:access",
        Duration::from_secs(10),
        || async {
            assert_eq!(auth(&node, "/live/c1/seg_1.ts").await, 204);
            zscore(&redis, "farm:access", "c1")
                .await
                .filter(|s| *s > first + 1000.0)
        },
    )
    .await;
    println!(
        "access advanced by {} ms through auth checks alone",
        later - first
    );
    assert_eq!(
        metric(&node, "farm_node_segment_bytes_total").await,
        0.0,
        "the node served no segment bytes"
    );
    assert!(metric(&node, "farm_node_auth_allowed_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_owner_redirects_to_the_owner_or_hands_nginx_an_accel_redirect() {
    let (redis, root) = redis_with_fake_channels(&["c1"]);
    let owner = node(&redis, "n1", root.path(), true, &[]);
    let plain = node(&redis, "n2", root.path(), true, &[]);
    let behind = node(
        &redis,
        "n3",
        root.path(),
        true,
        &["--accel-redirect", "/_farm_owner"],
    );
    let first = get_observed(&format!("{}/live/c1/index.m3u8", owner.base_url())).await;
    assert_eq!(first.status, 200);
    let playlist = farm_tests::hls::MediaPlaylist::parse(&first.text()).expect("playlist");
    let seg = playlist.segments[0].uri.clone();

    // Any node answers the playlist itself, from what the owner recorded in Redis.
    for n in [&plain, &behind] {
        let r = get_observed(&format!("{}/live/c1/index.m3u8", n.base_url())).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let theirs = farm_tests::hls::MediaPlaylist::parse(&r.text()).expect("playlist");
        assert_eq!(theirs.segments[0].uri, seg, "the owner's playlist");
        assert!(r.header("location").is_empty() && r.header("x-accel-redirect").is_empty());
    }
    // Segments come from the owner's disk.
    for path in [format!("/live/c1/{seg}")] {
        let r = get(&format!("{}{path}", plain.base_url())).await;
        assert_eq!(r.status, 307, "{path}: {}", r.text());
        assert_eq!(r.header("location"), format!("{}{path}", owner.base_url()));
        let r = get(&format!("{}{path}", behind.base_url())).await;
        assert_eq!(
            r.header("x-accel-redirect"),
            format!("/_farm_owner/{}{path}", owner.addr()),
            "{path}"
        );
    }
    assert_eq!(ffmpegs_under(root.path()).len(), 1, "no second FFmpeg");
    assert_eq!(metric(&plain, "farm_node_ffmpeg_spawns_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_datagrams_count_as_viewer_access() {
    let (redis, root) = redis_with_fake_channels(&["c1"]);
    let sock = root.path().join("access.sock");
    let node = node(
        &redis,
        "n1",
        root.path(),
        true,
        &["--access-socket", sock.to_str().expect("utf8")],
    );
    let first = first_access(&redis, &node).await;
    let tx = std::os::unix::net::UnixDatagram::unbound().expect("socket");
    let later = eventually(
        "access advances from log lines",
        Duration::from_secs(10),
        || async {
            // What nginx sends with `syslog:server=unix:...,nohostname,tag=farm` and '$remote_addr $request_uri'.
            tx.send_to(
                b"<190>Nov 22 04:38:05 farm: 127.0.0.1 /live/c1/seg_3.ts",
                &sock,
            )
            .expect("send");
            tx.send_to(b"<190>Nov 22 04:38:05 farm: 127.0.0.1 /live/../x", &sock)
                .expect("send");
            zscore(&redis, "farm:access", "c1")
                .await
                .filter(|s| *s > first + 1000.0)
        },
    )
    .await;
    println!("access advanced by {} ms from log datagrams", later - first);
    assert!(metric(&node, "farm_node_access_log_lines_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_real_ip_counts_only_from_trusted_proxies() {
    let (redis, root) = redis_with_fake_channels(&["c1"]);
    // n1 trusts loopback (the default); n2 trusts only 10.0.0.0/8, so this test's own requests
    // (from 127.0.0.1) cannot claim another viewer address.
    let n1 = node(&redis, "n1", root.path(), true, &["--token-secret", SECRET]);
    let n2 = node(
        &redis,
        "n2",
        root.path(),
        true,
        &["--token-secret", SECRET, "--trusted-proxies", "10.0.0.0/8"],
    );
    let viewer = "10.9.9.9";
    let token = signed_token(SECRET, "c1", 600, Some(viewer));
    let uri = format!("/live/{token}/c1/index.m3u8");
    let check = |base: String| {
        let uri = uri.clone();
        async move {
            client()
                .get(format!("{base}/auth"))
                .header("X-Original-URI", uri)
                .header("X-Real-IP", viewer)
                .send()
                .await
                .expect("GET /auth")
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        check(n1.base_url()).await,
        204,
        "a trusted proxy vouches for the viewer's address"
    );
    assert_eq!(
        check(n2.base_url()).await,
        403,
        "an untrusted peer's X-Real-IP is ignored"
    );
}
