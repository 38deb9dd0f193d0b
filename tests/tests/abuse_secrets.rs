//! Issue 14, secrets: a catalog URL with credentials in its userinfo, its query and its path (the
//! Xtream convention) plays, and no secret string reaches anything anyone else can read.
//!
//! Real redis-server, farm-node with real FFmpeg (its egress gateway in the guard), a
//! farm-coordinator, nginx from the shipped template, farmctl; the fake IPTV provider behind a
//! [`CredentialGate`] that answers 401 unless a request carries every credential. Checked: every
//! response body (node and nginx, 200, 502 and 503), the node's log (guard included, FFmpeg's own
//! lines at debug), the coordinator's log, nginx's logs, every Redis key but the catalog hashes
//! (events, stream hashes, ...), farmctl's outputs, both `/metrics`, and `/proc/*/cmdline` of every
//! process while FFmpeg runs. And the channel played: the provider saw the credentials.

use farm_tests::coordinator::{CoordinatorOpts, CoordinatorProcess};
use farm_tests::farm::coordinator_args;
use farm_tests::fixtures::*;
use farm_tests::hls::HlsClient;
use farm_tests::nginx::{raw_request, NginxOpts, NginxServer};
use farm_tests::node::{farmctl, NodeOpts, NodeProcess};
use farm_tests::provider::{require_credentials, Credentials, FakeProvider};
use farm_tests::redis::RedisServer;
use farm_tests::wait::eventually;
use std::time::Duration;

const USER: &str = "SeCrEtUsEr1";
const PASS: &str = "SeCrEtPaSs2";
const PATH_USER: &str = "SeCrEtPaThU3";
const PATH_PASS: &str = "SeCrEtPaThP4";
const TOKEN: &str = "SeCrEtToKeN5";
/// The token of a channel the provider refuses (a wrong one, so FFmpeg fails on it).
const WRONG_TOKEN: &str = "SeCrEtWrOnG6";
/// In an https URL (which nodes refuse to start).
const TLS_TOKEN: &str = "SeCrEtTlS7";

const SECRETS: &[&str] = &[
    USER,
    PASS,
    PATH_USER,
    PATH_PASS,
    TOKEN,
    WRONG_TOKEN,
    TLS_TOKEN,
];

/// Panics naming the secret and where, with some context around it.
#[track_caller]
fn assert_clean(what: &str, text: &str) {
    for s in SECRETS {
        if let Some(i) = text.find(s) {
            let from = text[..i]
                .char_indices()
                .rev()
                .nth(150)
                .map_or(0, |(j, _)| j);
            let to = (i + s.len() + 150).min(text.len());
            let to = (to..=text.len())
                .find(|j| text.is_char_boundary(*j))
                .unwrap_or(text.len());
            panic!("secret {s:?} in {what}: ...{}...", &text[from..to]);
        }
    }
}

/// Every Redis value a reader can see, as text: all keys except the catalog's own hashes (which
/// hold the URL as the operator wrote it, by design).
async fn redis_dump(redis: &RedisServer) -> String {
    let mut c = redis.conn().await;
    let mut out = String::new();
    for key in all_keys(redis).await {
        if key.starts_with("farm:channel:") {
            continue;
        }
        let t: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut c)
            .await
            .expect("TYPE");
        let v: redis::Value = match t.as_str() {
            "string" => redis::cmd("GET").arg(&key).query_async(&mut c).await,
            "hash" => redis::cmd("HGETALL").arg(&key).query_async(&mut c).await,
            "set" => redis::cmd("SMEMBERS").arg(&key).query_async(&mut c).await,
            "zset" => {
                redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut c)
                    .await
            }
            "list" => {
                redis::cmd("LRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut c)
                    .await
            }
            "stream" => {
                redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut c)
                    .await
            }
            _ => Ok(redis::Value::Nil),
        }
        .expect("read a key");
        out.push_str(&format!("{key} ({t}): {v:?}\n"));
    }
    out
}

/// Every process's command line, as text.
fn all_cmdlines() -> String {
    let mut out = String::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if let Ok(b) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            out.push_str(&format!(
                "{pid}: {}\n",
                String::from_utf8_lossy(&b).replace('\0', " ")
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_a_catalog_url_reach_the_provider_and_nobody_else() {
    let redis = RedisServer::start();
    let provider = FakeProvider::start().await;
    let creds = Credentials {
        user: USER.into(),
        pass: PASS.into(),
        token: TOKEN.into(),
        path_user: PATH_USER.into(),
        path_pass: PATH_PASS.into(),
    };
    let gate = require_credentials(&provider, creds.clone());
    let sec_url = gate.url(&creds, "sec.ts");
    let bad_url = gate
        .url(&creds, "bad.ts")
        .replace(&format!("token={TOKEN}"), &format!("token={WRONG_TOKEN}"));
    let tls_url = format!(
        "https://{USER}:{PASS}@127.0.0.1:{}/live/x.m3u8?token={TLS_TOKEN}",
        gate.addr().port()
    );
    for (id, url) in [("sec", &sec_url), ("bad", &bad_url), ("tls", &tls_url)] {
        let o = farmctl(&redis.url(), &["channel", "add", id, url]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_clean(
            "farmctl channel add output",
            &String::from_utf8_lossy(&o.stdout),
        );
        assert_clean(
            "farmctl channel add errors",
            &String::from_utf8_lossy(&o.stderr),
        );
    }

    let root = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::spawn(
        NodeOpts::new("n1", redis.url(), root.path().join("n1"))
            .args(FAST.iter().copied())
            .args(["--max-crashes", "3", "--failed-hold", "60s"])
            // FFmpeg's own stderr lines are logged at debug under target "ffmpeg": log them too.
            .env("RUST_LOG", "info,farm_node=debug,ffmpeg=debug"),
    );
    let co = CoordinatorProcess::spawn(CoordinatorOpts::new("co1", redis.url()).args(
        coordinator_args(&[("--tick", "500ms")], &["--idle-timeout"]),
    ));
    let nginx = NginxServer::start(&NginxOpts::for_nodes([&node]));
    let mut bodies = String::new();

    // The channel plays through nginx: the provider saw every credential.
    let mut viewer = HlsClient::new(&format!("{}/live/sec/index.m3u8", nginx.base_url()));
    let r = viewer
        .pull(Duration::from_secs(4), Duration::from_secs(40))
        .await
        .unwrap_or_else(|e| panic!("sec does not play: {e}\n{}", node.log()));
    assert_eq!((r.gaps, r.failed_segments), (0, 0), "{r:?}");
    bodies.push_str(&String::from_utf8_lossy(
        r.last_segment.as_deref().unwrap_or_default(),
    ));
    let (status, playlist) = viewer.get_playlist().await.expect("playlist");
    assert_eq!(status, 200);
    bodies.push_str(&playlist);
    let direct = get(&format!("{}/live/sec/index.m3u8", node.base_url())).await;
    assert_eq!(direct.status, 200);
    bodies.push_str(&direct.text());
    assert!(
        gate.accepted() >= 1,
        "the provider never got the credentials"
    );
    let sec_refused = gate.refused();
    println!(
        "sec plays: {} segments; the gate let {} requests in, refused {sec_refused}",
        r.segments,
        gate.accepted()
    );

    // While FFmpeg reads it: its argv, and every other process's, has none of the secrets.
    let ffmpegs = ffmpegs_under(&root.path().join("n1"));
    assert_eq!(ffmpegs.len(), 1, "one FFmpeg runs");
    let argv = std::fs::read(format!("/proc/{}/cmdline", ffmpegs[0])).expect("cmdline");
    let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
    assert!(
        argv.contains("/live/sf"),
        "FFmpeg reads a masked URL: {argv}"
    );
    println!("FFmpeg's argv: {argv}");
    assert_clean("/proc/*/cmdline", &all_cmdlines());

    // A channel the provider refuses: restarts, fails; the viewers' 503 says nothing of FFmpeg's
    // text (which quotes the URL), through the node and through nginx.
    let failed = eventually("bad to fail", Duration::from_secs(60), || async {
        let r = get(&format!("{}/live/bad/index.m3u8", node.base_url())).await;
        (r.status == 503 && r.text().contains("is failing upstream")).then_some(r)
    })
    .await;
    bodies.push_str(&failed.text());
    let via_nginx = raw_request(nginx.addr(), "GET", "/live/bad/index.m3u8");
    assert_eq!(via_nginx.status, 503, "{}", via_nginx.text());
    bodies.push_str(&via_nginx.text());
    assert!(gate.refused() > sec_refused, "the provider refused bad");
    let h = hgetall(&redis, "farm:stream:bad").await;
    println!(
        "bad failed; viewers get {:?}; its hash: {h:?}",
        failed.text().trim()
    );
    assert!(
        h.get("last_error").is_some_and(|e| e.contains("401")),
        "{h:?}"
    );

    // An https URL with credentials is refused at start, with a sentence that names no secret.
    for base in [node.base_url(), nginx.base_url()] {
        let r = get(&format!("{base}/live/tls/index.m3u8")).await;
        assert_eq!(r.status, 502, "{}", r.text());
        assert!(r.text().contains("carries credentials"), "{}", r.text());
        bodies.push_str(&r.text());
    }

    // Everything readable: responses, logs, Redis, farmctl, metrics, argv.
    assert_clean("response bodies", &bodies);
    let mut ctl = String::new();
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["status", "--all"],
        &["channel", "list"],
        &["channel", "list", "--json"],
        &["channel", "show", "sec"],
        &["channel", "show", "bad", "--json"],
        &["events", "--count", "1000"],
    ] {
        let o = farmctl(&redis.url(), args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        ctl.push_str(&String::from_utf8_lossy(&o.stdout));
        ctl.push_str(&String::from_utf8_lossy(&o.stderr));
    }
    assert!(ctl.contains("http://***@127.0.0.1:"), "{ctl}");
    assert_clean("farmctl output", &ctl);
    let shown = farmctl(&redis.url(), &["channel", "show", "sec", "--show-secrets"]);
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains(&sec_url),
        "--show-secrets shows the URL as written"
    );
    assert_clean(
        "node /metrics",
        &get(&format!("{}/metrics", node.base_url())).await.text(),
    );
    assert_clean(
        "node /healthz",
        &get(&format!("{}/healthz", node.base_url())).await.text(),
    );
    assert_clean("coordinator /metrics", &co.metrics());
    let dump = redis_dump(&redis).await;
    assert!(dump.contains("farm:events"), "{dump}");
    assert_clean("Redis (every key but the catalog)", &dump);
    let log = node.log();
    assert!(log.contains("channel claimed"), "the node logged its start");
    assert!(
        log.contains("target=\"ffmpeg\"") || log.contains("ffmpeg:") || log.contains("401"),
        "FFmpeg's lines are in the log"
    );
    assert_clean("node log (guard included)", &log);
    assert_clean("coordinator log", &co.log());
    assert_clean("nginx error log", &nginx.error_log());
    assert_clean("nginx access log", &nginx.access_log());
    assert_clean("/proc/*/cmdline", &all_cmdlines());
    print_egress(&node).await;
}
