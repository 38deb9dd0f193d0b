//! End-to-end tests of the real `farmctl` binary against a real redis-server per test.

use std::collections::{BTreeSet, HashMap};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A private redis-server on a free port in a temp dir; killed and waited on drop, its log printed
/// when the test failed.
struct Redis {
    child: Child,
    dir: tempfile::TempDir,
    url: String,
}

impl Redis {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(dir.path().join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH");
        let redis = Redis {
            child,
            dir,
            url: format!("redis://127.0.0.1:{port}/"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.try_ping().is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING within 10s"
            );
            std::thread::sleep(Duration::from_millis(10)); // poll interval, not synchronisation
        }
        redis
    }

    fn try_ping(&self) -> redis::RedisResult<String> {
        redis::cmd("PING").query(&mut redis::Client::open(self.url.as_str())?.get_connection()?)
    }

    fn conn(&self) -> redis::Connection {
        let client = redis::Client::open(self.url.as_str()).expect("valid url");
        client.get_connection().expect("connect to the test redis")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
            eprintln!("--- redis-server log ---\n{log}");
        }
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// Runs farmctl with a clean FARM_* environment.
fn farmctl_env(url: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_farmctl"));
    for var in [
        "FARM_REDIS_URL",
        "FARM_PREFIX",
        "FARM_ALLOWED_SCHEMES",
        "FARM_REDIS_TIMEOUT",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("FARM_REDIS_URL", url)
        .envs(env.iter().copied())
        .args(args);
    cmd.stdin(Stdio::null()).output().expect("run farmctl")
}

fn farmctl(url: &str, args: &[&str]) -> Output {
    farmctl_env(url, &[], args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
}

/// farmctl's own failures: exactly one sentence, prefixed, ending with a period.
#[track_caller]
fn assert_one_sentence(o: &Output) {
    let err = stderr(o);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("farmctl: ") && last.ends_with('.'),
        "stderr: {err}"
    );
}

fn members(r: &Redis, set: &str) -> BTreeSet<String> {
    redis::cmd("SMEMBERS")
        .arg(set)
        .query(&mut r.conn())
        .expect("SMEMBERS")
}

fn hash(r: &Redis, key: &str) -> HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(key)
        .query(&mut r.conn())
        .expect("HGETALL")
}

fn dbsize(r: &Redis) -> i64 {
    redis::cmd("DBSIZE").query(&mut r.conn()).expect("DBSIZE")
}

fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write playlist");
    path.display().to_string()
}

#[test]
fn add_list_show_rm() {
    let r = Redis::start();
    let o = farmctl(
        &r.url,
        &[
            "channel",
            "add",
            "bbc1",
            "http://p.example/1.ts",
            "--backup",
            "http://b.example/1.ts",
            "--name",
            "BBC One",
            "--group",
            "UK",
            "--provider",
            "acme",
            "--pinned",
        ],
    );
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "added channel bbc1\n");
    let h = hash(&r, "farm:channel:bbc1");
    assert_eq!(h["url"], "http://p.example/1.ts");
    assert_eq!(h["backup_urls"], "http://b.example/1.ts");
    assert_eq!(
        (
            h["name"].as_str(),
            h["pinned"].as_str(),
            h["provider"].as_str()
        ),
        ("BBC One", "1", "acme")
    );
    assert_eq!(
        members(&r, "farm:channels"),
        BTreeSet::from(["bbc1".to_string()])
    );

    // no silent overwrite
    let o = farmctl(
        &r.url,
        &["channel", "add", "bbc1", "http://other.example/x"],
    );
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert_one_sentence(&o);
    assert_eq!(
        hash(&r, "farm:channel:bbc1")["url"],
        "http://p.example/1.ts"
    );

    // --replace leaves no stale field behind
    redis::cmd("HSET")
        .arg("farm:channel:bbc1")
        .arg("legacy")
        .arg("x")
        .exec(&mut r.conn())
        .expect("HSET");
    let o = farmctl(
        &r.url,
        &[
            "channel",
            "add",
            "bbc1",
            "http://other.example/x",
            "--replace",
        ],
    );
    assert_exit(&o, 0);
    let h = hash(&r, "farm:channel:bbc1");
    assert_eq!(
        (h["url"].as_str(), h["pinned"].as_str(), h["name"].as_str()),
        ("http://other.example/x", "0", "bbc1")
    );
    assert!(!h.contains_key("legacy"));

    let o = farmctl(
        &r.url,
        &[
            "channel",
            "add",
            "arte",
            "https://a.example/live.m3u8",
            "--name",
            "Arte",
        ],
    );
    assert_exit(&o, 0);
    let o = farmctl(&r.url, &["channel", "list"]);
    assert_exit(&o, 0);
    let table = stdout(&o);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("URL"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("arte ") && lines[1].contains("https://a.example/live.m3u8"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("bbc1 ") && lines[2].contains("http://other.example/x"),
        "{table}"
    );

    let o = farmctl(&r.url, &["channel", "list", "--json"]);
    assert_exit(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("list --json is JSON");
    let ids: Vec<&str> = v
        .as_array()
        .expect("an array")
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert_eq!(ids, ["arte", "bbc1"]);

    let o = farmctl(&r.url, &["channel", "show", "arte"]);
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("name:        Arte"), "{}", stdout(&o));
    let o = farmctl(&r.url, &["channel", "show", "arte", "--json"]);
    assert_exit(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("show --json is JSON");
    assert_eq!(
        (v["url"].as_str(), v["profile"].as_str()),
        (Some("https://a.example/live.m3u8"), Some("copy"))
    );
    let o = farmctl(&r.url, &["channel", "show", "nope"]);
    assert_exit(&o, 2);
    assert_one_sentence(&o);

    let o = farmctl(&r.url, &["channel", "rm", "bbc1"]);
    assert_exit(&o, 0);
    assert!(hash(&r, "farm:channel:bbc1").is_empty());
    assert_eq!(
        members(&r, "farm:channels"),
        BTreeSet::from(["arte".to_string()])
    );
    let o = farmctl(&r.url, &["channel", "rm", "bbc1"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
}

#[test]
fn bad_input_exits_2_and_writes_nothing() {
    let r = Redis::start();
    let cases: &[&[&str]] = &[
        &["channel", "add", "x", "file:///etc/passwd"],
        &[
            "channel",
            "add",
            "x",
            "concat:http://a.example/1|http://b.example/2",
        ],
        &["channel", "add", "x", "--", "-i x"],
        &[
            "channel",
            "add",
            "x",
            "http://a.example/1",
            "--backup",
            "file:///etc/passwd",
        ],
        &["channel", "add", "../x", "http://a.example/1"],
        &["channel", "add", "x", "http://a.example/1\r\nHost: evil"],
        &[
            "channel",
            "add",
            "x",
            "http://a.example/1",
            "--provider",
            "a:b",
        ],
    ];
    for args in cases {
        let o = farmctl(&r.url, args);
        assert_exit(&o, 2);
        assert_one_sentence(&o);
        assert!(stdout(&o).is_empty());
    }
    // clap's own usage errors exit 2 as well
    let o = farmctl(&r.url, &["channel", "add", "x", "-i", "x"]);
    assert_exit(&o, 2);
    let o = farmctl(&r.url, &["channel", "explode"]);
    assert_exit(&o, 2);
    // a narrower scheme list from the environment applies
    let o = farmctl_env(
        &r.url,
        &[("FARM_ALLOWED_SCHEMES", "https")],
        &["channel", "add", "x", "http://a.example/1"],
    );
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("not allowed"), "{}", stderr(&o));
    assert_eq!(dbsize(&r), 0);
}

const GOOD_M3U: &str = "#EXTM3U url-tvg=\"http://epg.example/guide.xml\"\r
#EXTINF:-1 tvg-id=\"bbc1.uk\" tvg-name=\"BBC One\" tvg-logo=\"http://l.example/1.png\" group-title=\"UK\",BBC One HD\r
http://p.example/live/u/p/1.ts\r
#EXTINF:-1 tvg-name=\"Das Erste\" group-title=\"DE, public\",Das Erste HD\r
#EXTVLCOPT:http-user-agent=VLC\r
http://p.example/live/u/p/2.ts\r
\r
#EXTINF:-1 tvg-id=\"cnn.us\",CNN International\r
https://p.example/cnn/index.m3u8\r
";

#[test]
fn import_writes_every_channel() {
    let r = Redis::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write_file(dir.path(), "good.m3u", GOOD_M3U);
    let o = farmctl(&r.url, &["import", &file, "--provider", "acme"]);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "imported 3 channels\n");
    let ids = ["bbc1-uk", "cnn-us", "das-erste"];
    assert_eq!(
        members(&r, "farm:channels"),
        ids.iter().map(|s| s.to_string()).collect()
    );
    let h = hash(&r, "farm:channel:das-erste");
    assert_eq!(h["name"], "Das Erste");
    assert_eq!(h["group"], "DE, public");
    assert_eq!(h["url"], "http://p.example/live/u/p/2.ts");
    assert_eq!(h["provider"], "acme");
    assert_eq!(h["profile"], "copy");
    assert_eq!(hash(&r, "farm:channel:cnn-us")["name"], "CNN International");

    // a second import of overlapping channels is refused as a whole...
    let file2 = write_file(
        dir.path(),
        "more.m3u",
        "#EXTM3U\n#EXTINF:-1,New One\nhttp://p.example/9.ts\n#EXTINF:-1 tvg-id=\"cnn.us\",CNN\nhttp://q.example/cnn.ts\n",
    );
    let o = farmctl(&r.url, &["import", &file2]);
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("\"cnn-us\" already exists"),
        "{}",
        stderr(&o)
    );
    assert_eq!(dbsize(&r), 4);
    assert!(hash(&r, "farm:channel:new-one").is_empty());
    // ...unless --replace
    let o = farmctl(&r.url, &["import", &file2, "--replace"]);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "imported 2 channels\n");
    assert_eq!(
        hash(&r, "farm:channel:cnn-us")["url"],
        "http://q.example/cnn.ts"
    );
    assert_eq!(hash(&r, "farm:channel:cnn-us")["provider"], "");
    assert_eq!(members(&r, "farm:channels").len(), 4);
}

#[test]
fn broken_import_changes_nothing_and_names_every_line() {
    let r = Redis::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let o = farmctl(&r.url, &["channel", "add", "keep", "http://k.example/1"]);
    assert_exit(&o, 0);
    let before = (
        dbsize(&r),
        members(&r, "farm:channels"),
        hash(&r, "farm:channel:keep"),
    );

    let broken = "#EXTM3U
#EXTINF:-1 tvg-id=\"a\",A
http://p.example/a.ts
#EXTINF:-1 tvg-id=\"b\",B
file:///etc/passwd
#EXTINF:-1 tvg-id=\"c\",C
http://p.example/c.ts
#EXTINF:-1 tvg-id=\"keep\" tvg-name=\"Keep,Unterminated quote
http://p.example/keep.ts
#EXTINF:-1 tvg-id=\"d\",D
http://p.example/d.ts
";
    let file = write_file(dir.path(), "broken.m3u", broken);
    let o = farmctl(&r.url, &["import", &file, "--replace"]);
    assert_exit(&o, 2);
    let err = stderr(&o);
    assert!(err.contains(&format!("{file}:5: ")), "{err}");
    assert!(err.contains(&format!("{file}:8: ")), "{err}");
    assert!(
        err.contains("farmctl: ") && err.contains("2 errors, nothing was imported."),
        "{err}"
    );
    assert_one_sentence(&o);
    assert!(stdout(&o).is_empty());
    assert_eq!(
        (
            dbsize(&r),
            members(&r, "farm:channels"),
            hash(&r, "farm:channel:keep")
        ),
        before
    );

    // an unreadable file is bad input too
    let o = farmctl(
        &r.url,
        &[
            "import",
            &dir.path().join("missing.m3u").display().to_string(),
        ],
    );
    assert_exit(&o, 2);
    assert_one_sentence(&o);
}

#[test]
fn env_prefix_is_honoured() {
    let r = Redis::start();
    let o = farmctl_env(
        &r.url,
        &[("FARM_PREFIX", "tv")],
        &["channel", "add", "x", "udp://239.0.0.1:1234"],
    );
    assert_exit(&o, 0);
    assert_eq!(
        members(&r, "tv:channels"),
        BTreeSet::from(["x".to_string()])
    );
    assert_eq!(hash(&r, "tv:channel:x")["url"], "udp://239.0.0.1:1234");
    let o = farmctl(&r.url, &["--prefix", "tv", "channel", "show", "x"]);
    assert_exit(&o, 0);
}

#[test]
fn unreachable_redis_exits_1() {
    let url = format!("redis://127.0.0.1:{}/", free_port());
    let o = farmctl(&url, &["channel", "list"]);
    assert_exit(&o, 1);
    assert_one_sentence(&o);
    assert!(
        stderr(&o).contains("cannot connect to Redis"),
        "{}",
        stderr(&o)
    );
    assert_eq!(stderr(&o).lines().count(), 1);
}

#[test]
fn silent_redis_times_out_with_exit_1() {
    // accepts connections (the kernel completes the handshake) but never answers
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!(
        "redis://127.0.0.1:{}/",
        silent.local_addr().expect("addr").port()
    );
    let started = Instant::now();
    let o = farmctl(
        &url,
        &[
            "--redis-timeout",
            "300ms",
            "channel",
            "add",
            "x",
            "http://a.example/1",
        ],
    );
    assert_exit(&o, 1);
    assert_one_sentence(&o);
    assert!(stderr(&o).contains("did not answer"), "{}", stderr(&o));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}
