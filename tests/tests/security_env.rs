//! What FFmpeg and the outside can learn of the node's secrets (promise 10, issue 7): a node runs
//! with a password-protected Redis, a token secret and an admin token, all given through the
//! environment as systemd's EnvironmentFile would; the real FFmpeg it starts has exactly `PATH`
//! and `STREAMFARM_CHANNEL_DIR` in its environment (read from `/proc/<pid>/environ`) and no secret
//! in its argv; the node's log, `/healthz` and `/metrics` name no secret; the admin API answers 401
//! to every request without exactly its bearer token.
//!
//! (A node's Redis ACL user being refused FLUSHALL and CONFIG SET is proven by
//! `deploy_redis::a_node_works_as_its_acl_user_while_flushall_and_config_are_refused`.)

use farm_tests::fixtures::*;
use farm_tests::node::{NodeOpts, NodeProcess};
use farm_tests::provider::FakeProvider;
use farm_tests::redis::RedisServer;
use farm_tests::wait::eventually;
use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const REDIS_PASSWORD: &str = "redis-pw-7f3a9c1e5b";
const TOKEN_SECRET: &str = "token-secret-2d8e4f6a0b1c";
const ADMIN_TOKEN: &str = "admin-token-9b7d5f3e1a";

/// `KEY=value` pairs of a process's environment, as the kernel shows them.
fn environ(pid: i32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/environ: {e}"));
    raw.split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| String::from_utf8_lossy(kv).into_owned())
        .collect()
}

fn secrets() -> [&'static str; 3] {
    [REDIS_PASSWORD, TOKEN_SECRET, ADMIN_TOKEN]
}

fn assert_no_secret(what: &str, text: &str) {
    for s in secrets() {
        assert!(!text.contains(s), "{what} contains the secret {s:?}");
    }
}

/// FFmpeg has no business with the farm's Redis at all, password or not.
fn assert_no_redis(what: &str, text: &str) {
    assert_no_secret(what, text);
    assert!(
        !text.contains("redis://") && !text.contains("redis+sentinel://"),
        "{what} names the farm's Redis: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_gets_no_secret_and_the_admin_api_wants_its_exact_token() {
    let redis = RedisServer::start();
    let provider = FakeProvider::start().await;
    add_channel(&redis, "c1", &provider.url("/c1.ts"), &[]);
    // From here on the farm's Redis wants a password.
    let mut c = redis.conn().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(REDIS_PASSWORD)
        .query_async(&mut c)
        .await
        .expect("CONFIG SET requirepass");
    let redis_url = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{}/", redis.port());

    let root = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::spawn(
        NodeOpts::new("n1", redis_url.clone(), root.path().join("n1"))
            .args(FAST.iter().copied())
            .env("FARM_REDIS_URL", &redis_url)
            .env("FARM_TOKEN_SECRET", TOKEN_SECRET)
            .env("FARM_ADMIN_TOKEN", ADMIN_TOKEN)
            // Everything the node logs, FFmpeg's messages included, is checked for secrets below.
            .env("RUST_LOG", "debug,ffmpeg=debug"),
    );
    let base = node.base_url();

    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let token = farm_proto::token::mint(TOKEN_SECRET.as_bytes(), "c1", expiry, None).expect("mint");
    let r = get(&format!("{base}/live/{token}/c1/index.m3u8")).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let pids = eventually("the channel's FFmpeg", Duration::from_secs(20), || async {
        let p = ffmpegs_under(node.hls_root());
        (p.len() == 1).then_some(p)
    })
    .await;
    let ffmpeg = pids[0];
    let exe = std::fs::read_link(format!("/proc/{ffmpeg}/exe")).expect("exe");
    println!("FFmpeg pid {ffmpeg}: {}", exe.display());
    assert!(
        exe.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("ffmpeg")),
        "the real FFmpeg runs: {}",
        exe.display()
    );

    let env = environ(ffmpeg);
    println!("FFmpeg's environment: {env:?}");
    let keys: BTreeSet<&str> = env
        .iter()
        .map(|kv| kv.split_once('=').map_or(kv.as_str(), |(k, _)| k))
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["PATH", "STREAMFARM_CHANNEL_DIR"]),
        "FFmpeg's environment holds exactly PATH and the marker"
    );
    assert_no_redis("FFmpeg's environment", &env.join("\n"));
    let argv = farm_tests::procs::cmdline(ffmpeg).expect("cmdline");
    assert_no_redis("FFmpeg's argv", &argv);

    // Control: the node's own environment has them, so the check above can fail.
    let node_env = environ(node.pid()).join("\n");
    for s in secrets() {
        assert!(
            node_env.contains(s),
            "the node's environment should hold {s:?}"
        );
    }

    // The admin API: 401 without exactly its bearer token (429 once the address has made a few
    // wrong attempts: it must wait before the next is checked); the secret is not echoed.
    let cl = client();
    let streams = format!("{base}/admin/streams");
    let wrong_headers: Vec<(&str, String)> = vec![
        ("no header", String::new()),
        ("wrong token", "Bearer wrong".into()),
        ("empty bearer", "Bearer ".into()),
        ("no scheme", ADMIN_TOKEN.into()),
        ("basic", format!("Basic {ADMIN_TOKEN}")),
        (
            "prefix",
            format!("Bearer {}", &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]),
        ),
        ("extended", format!("Bearer {ADMIN_TOKEN}x")),
        ("two spaces", format!("Bearer  {ADMIN_TOKEN}")),
        ("other token", format!("Bearer {TOKEN_SECRET}")),
        ("redis password", format!("Bearer {REDIS_PASSWORD}")),
    ];
    for (what, value) in &wrong_headers {
        let mut req = cl.get(&streams);
        if !value.is_empty() {
            req = req.header("Authorization", value);
        }
        let r = req.send().await.expect("GET /admin/streams");
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        assert!(status == 401 || status == 429, "{what}: {status} {body}");
        assert_no_secret(&format!("the {status} body ({what})"), &body);
        let r = cl
            .post(format!("{base}/admin/streams/c1/stop"))
            .header("Authorization", value.as_str())
            .send()
            .await
            .expect("POST stop");
        let status = r.status().as_u16();
        assert!(status == 401 || status == 429, "stop with {what}: {status}");
    }
    let status = get(&format!("{streams}?token={ADMIN_TOKEN}")).await.status;
    assert!(
        status == 401 || status == 429,
        "a token in the query string: {status}"
    );
    assert_eq!(ffmpegs_under(node.hls_root()), pids, "nothing was stopped");
    // After its Retry-After, the exact token opens it.
    let r = farm_tests::wait::eventually(
        "the admin API to take the exact token after the wrong ones",
        Duration::from_secs(30),
        || async {
            let r = cl
                .get(&streams)
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .expect("GET");
            (r.status().as_u16() != 429).then_some(r)
        },
    )
    .await;
    assert_eq!(r.status().as_u16(), 200, "the exact token opens it");
    assert_no_secret("/admin/streams", &r.text().await.unwrap_or_default());

    assert_no_secret("/healthz", &get(&format!("{base}/healthz")).await.text());
    assert_no_secret("/metrics", &get(&format!("{base}/metrics")).await.text());
    assert_no_secret("the node log", &node.log());
    assert_no_secret(
        "the stream hash",
        &format!(
            "{:?}",
            hgetall_authed(&redis_authed(&redis_url).await, "farm:stream:c1").await
        ),
    );
}

/// A connection to the password-protected Redis (the harness's own `conn` has no password).
async fn redis_authed(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect with the password")
}

async fn hgetall_authed(
    c: &redis::aio::MultiplexedConnection,
    key: &str,
) -> std::collections::HashMap<String, String> {
    let mut c = c.clone();
    redis::cmd("HGETALL")
        .arg(key)
        .query_async(&mut c)
        .await
        .expect("HGETALL")
}

/// `--help` shows each setting's environment variable, and by default its value: a daemon started
/// with its secrets in the environment (systemd's EnvironmentFile) must not print them there.
#[test]
fn help_output_names_no_secret_taken_from_the_environment() {
    let redis_url = format!("redis://farm:{REDIS_PASSWORD}@127.0.0.1:6379/");
    for bin in ["farm-node", "farm-coordinator"] {
        let out = std::process::Command::new(farm_tests::bins::bin_path(bin))
            .arg("--help")
            .env("FARM_REDIS_URL", &redis_url)
            .env("FARM_TOKEN_SECRET", TOKEN_SECRET)
            .env("FARM_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap_or_else(|e| panic!("run {bin} --help: {e}"));
        assert!(out.status.success(), "{bin} --help failed: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("FARM_REDIS_URL"), "{bin} --help: {text}");
        assert_no_secret(&format!("{bin} --help"), &text);
    }
}
