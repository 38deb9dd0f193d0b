//! Bad input gets a clear 4xx and changes nothing; the admin API and the command stream stop
//! channels, a stale gen changes nothing, and a command left unacked by an earlier incarnation is
//! picked up after a restart.

use farm_tests::fixtures::*;
use farm_tests::node::http_status;
use farm_tests::redis::RedisServer;
use farm_tests::wait::{eventually, eventually_with};
use redis::AsyncCommands;
use std::io::{Read, Write};
use std::time::Duration;

/// The node's admin token in [`admin_api_and_command_stream_stop_channels_and_a_stale_gen_changes_nothing`].
const TOKEN: &str = "s3cret-admin-token";

/// Sends a raw request line (no client-side normalisation of `..` or `%2e`) and returns status + body.
fn raw_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_paths_and_ids_get_a_clear_4xx_and_nothing_starts_or_is_read() {
    let (redis, root) = redis_with_fake_channels(&["ok"]);
    // A canary outside the HLS folder that a traversal would reach.
    std::fs::write(root.path().join("secret.ts"), b"canary").expect("canary");
    let node = node(&redis, "n1", root.path(), true, &[]);
    let long = format!("/live/{}/index.m3u8", "a".repeat(65));
    let invalid = [
        "/live/../secret.ts",
        "/live/..%2fsecret.ts/index.m3u8",
        "/live/%2e%2e/secret.ts",
        "/live/%2e%2e/index.m3u8",
        "/live/ok/..%2f..%2fsecret.ts",
        "/live/ok/%2e%2e%2fsecret.ts",
        "/live/a%00b/index.m3u8",
        "/live/ok/seg%00.ts",
        &long,
        "/live/ok/index.m3u8.tmp",
        "/live/ok/seg_1.mp4",
        "/live/ok/.ffmpeg.pid",
        "/live/%C3%A4/index.m3u8",
        "/live/ok%E2%80%A4ts/index.m3u8",
    ];
    let unknown = [
        "/live/unknown/index.m3u8",
        "/live/unknown/seg_1.ts",
        "/nope",
    ];
    for (want, paths) in [(400, &invalid[..]), (404, &unknown[..])] {
        for path in paths {
            let (status, body) = raw_get(node.addr(), path);
            assert_eq!(status, want, "{path}: {body}");
            assert!(
                !body.contains("canary"),
                "{path} leaked a file outside the channel folder"
            );
            if want == 400 {
                assert!(
                    body.starts_with("invalid"),
                    "{path}: the 400 says what is wrong: {body}"
                );
            }
        }
    }
    assert!(ffmpegs_under(root.path()).is_empty(), "nothing started");
    assert_eq!(metric(&node, "farm_node_ffmpeg_spawns_total").await, 0.0);
    let keys = all_keys(&redis).await;
    assert!(
        !keys
            .iter()
            .any(|k| k.starts_with("farm:owner:") || k.starts_with("farm:stream:")),
        "{keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_urls_with_forbidden_schemes_never_reach_ffmpeg() {
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    // Written behind farmctl's back (an operator with redis-cli): the node checks again.
    let mut c = redis.conn().await;
    for (id, url) in [
        ("f1", "file:///etc/passwd"),
        ("f2", "concat:http://a/1.ts|http://a/2.ts"),
        ("f3", "subfile,,start,0,end,10,,:http://a/1.ts"),
        ("f4", "-i http://a/1.ts"),
        ("f5", "http://a/1.ts\r\nX-Evil: 1"),
    ] {
        let _: () = redis::pipe()
            .hset("farm:channel:".to_string() + id, "url", url)
            .sadd("farm:channels", id)
            .query_async(&mut c)
            .await
            .expect("seed");
    }
    let node = node(&redis, "n1", root.path(), true, &[]);
    for id in ["f1", "f2", "f3", "f4", "f5"] {
        assert_invalid_upstream(&node, id).await;
        assert!(!exists(&redis, &format!("farm:owner:{id}")).await);
    }
    assert_eq!(metric(&node, "farm_node_ffmpeg_spawns_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_and_command_stream_stop_channels_and_a_stale_gen_changes_nothing() {
    let (redis, root) = redis_with_fake_channels(&["c1", "c2"]);
    let node = node(&redis, "n1", root.path(), true, &["--admin-token", TOKEN]);
    let base = node.base_url();
    for id in ["c1", "c2"] {
        assert_eq!(
            get(&format!("{base}/live/{id}/index.m3u8")).await.status,
            200
        );
    }

    // The admin API needs its token.
    assert_eq!(http_status(node.addr(), "/admin/streams"), Some(401));
    let streams = |token| admin_request(&node, reqwest::Method::GET, "/streams", token);
    let bad = streams(Some("wrong")).await.expect("GET");
    assert_eq!(bad.status().as_u16(), 401);
    let list: serde_json::Value = streams(Some(TOKEN))
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    assert_eq!(
        admin_stop(&node, "c1", None).await,
        401,
        "no token, no stop"
    );
    assert!(exists(&redis, "farm:owner:c1").await);
    assert_eq!(admin_stop(&node, "..%2f", Some(TOKEN)).await, 400);
    assert_eq!(admin_stop(&node, "c1", Some(TOKEN)).await, 200);
    assert!(
        !exists(&redis, "farm:owner:c1").await,
        "lease released when the stop answers"
    );
    assert!(!root.path().join("n1/c1").exists(), "folder removed");
    assert_eq!(ffmpegs_under(root.path()).len(), 1);

    // The command stream, as an operator with redis-cli would use it.
    let mut conn = redis.conn().await;
    let gen: u64 = conn.get("farm:gen:c2").await.expect("gen");
    send_stop(&mut conn, "n1", "c2", gen + 7, &[]).await;
    send_command(&mut conn, "n1", &[("op", "explode"), ("channel", "c2")]).await;
    eventually_with(
        &conn,
        "stale and malformed commands consumed",
        Duration::from_secs(10),
        |mut c| async move {
            let n: u64 = c.xlen("farm:cmd:n1").await.ok()?;
            (n == 0).then_some(())
        },
    )
    .await;
    assert!(
        exists(&redis, "farm:owner:c2").await,
        "a stale gen changes nothing"
    );
    assert_eq!(ffmpegs_under(root.path()).len(), 1);
    send_stop(&mut conn, "n1", "c2", gen, &[("reason", "ops")]).await;
    eventually("c2 stopped by command", Duration::from_secs(10), || async {
        (!exists(&redis, "farm:owner:c2").await && ffmpegs_under(root.path()).is_empty())
            .then_some(())
    })
    .await;
    assert!(!exists(&redis, "farm:stream:c2").await);
    let pending: redis::streams::StreamPendingReply = conn
        .xpending("farm:cmd:n1", "node")
        .await
        .expect("XPENDING");
    assert_eq!(pending.count(), 0, "every command acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_left_unacked_by_an_earlier_incarnation_is_handled_after_a_restart() {
    let (redis, root) = redis_with_fake_channels(&["c1"]);
    let mut conn = redis.conn().await;
    // An earlier incarnation of n1 read this start command and died before acting on it.
    let _: () = conn
        .xgroup_create_mkstream("farm:cmd:n1", "node", "0")
        .await
        .expect("XGROUP");
    send_command(
        &mut conn,
        "n1",
        &[("op", "start"), ("channel", "c1"), ("by", "test")],
    )
    .await;
    let read: redis::streams::StreamReadReply = conn
        .xread_options(
            &["farm:cmd:n1"],
            &[">"],
            &redis::streams::StreamReadOptions::default().group("node", "n1"),
        )
        .await
        .expect("XREADGROUP");
    assert_eq!(read.keys[0].ids.len(), 1, "delivered to n1, not acked");

    let _node = node(&redis, "n1", root.path(), true, &[]);
    eventually(
        "the pending start runs",
        Duration::from_secs(15),
        || async {
            let h = hgetall(&redis, "farm:stream:c1").await;
            (h.get("state").map(String::as_str) == Some("running")).then_some(())
        },
    )
    .await;
    let pending: redis::streams::StreamPendingReply = conn
        .xpending("farm:cmd:n1", "node")
        .await
        .expect("XPENDING");
    assert_eq!(pending.count(), 0, "acked after its effect");
}
