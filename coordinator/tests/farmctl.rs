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

/// Its stdout says `want` (shown whole when it does not).
#[track_caller]
fn assert_stdout_has(o: &Output, want: &str) {
    let out = stdout(o);
    assert!(out.contains(want), "{out}");
}

/// Its stderr says `want` (shown whole when it does not).
#[track_caller]
fn assert_stderr_has(o: &Output, want: &str) {
    let err = stderr(o);
    assert!(err.contains(want), "{err}");
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
    assert_stderr_has(&o, "already exists");
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
    assert_stdout_has(&o, "name:        Arte");
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
    assert_stderr_has(&o, "does not exist");
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
    assert_stderr_has(&o, "not allowed");
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
    assert!(
        stdout(&o).starts_with("imported 3 channels in "),
        "{}",
        stdout(&o)
    );
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
    assert_stderr_has(&o, "\"cnn-us\" already exists");
    // 3 channels, the index, farm:catalog:version and farm:catalog:gen; no staging list left
    assert_eq!(dbsize(&r), 6);
    assert!(hash(&r, "farm:channel:new-one").is_empty());
    // ...unless --replace
    let o = farmctl(&r.url, &["import", &file2, "--replace"]);
    assert_exit(&o, 0);
    assert!(
        stdout(&o).starts_with("imported 2 channels in "),
        "{}",
        stdout(&o)
    );
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
    assert_stderr_has(&o, "cannot connect to Redis");
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
    assert_stderr_has(&o, "did not answer");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

/// A playlist of `n` channels `c0..c<n>` on `host`.
fn generated_m3u(n: usize, host: &str) -> String {
    let mut text = String::from("#EXTM3U\n");
    for i in 0..n {
        text.push_str(&format!(
            "#EXTINF:-1 tvg-id=\"c{i}\" group-title=\"G\",Channel {i}\nhttp://{host}/live/{i}.ts\n"
        ));
    }
    text
}

/// Every key of the test Redis (SCAN: the test Redis is small).
fn all_keys(r: &Redis) -> BTreeSet<String> {
    let mut c = r.conn();
    redis::cmd("SCAN")
        .cursor_arg(0)
        .arg("COUNT")
        .arg(1000)
        .clone()
        .iter::<String>(&mut c)
        .expect("SCAN")
        .map(|k| k.expect("a key"))
        .collect()
}

#[test]
fn large_imports_go_in_chunks_and_leave_no_staging_behind() {
    let r = Redis::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write_file(dir.path(), "big.m3u", &generated_m3u(5000, "a.example"));
    let o = farmctl(&r.url, &["import", &file, "--chunk", "500"]);
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("staged 500/5000\n"), "{out}");
    assert!(out.contains("committed import 1\n"), "{out}");
    assert!(out.contains("applied 5000/5000\n"), "{out}");
    assert!(
        out.contains("imported 5000 channels in ") && out.contains("(chunks of 500)"),
        "{out}"
    );
    assert_eq!(members(&r, "farm:channels").len(), 5000);
    assert_eq!(
        hash(&r, "farm:channel:c4999")["url"],
        "http://a.example/live/4999.ts"
    );
    let keys = all_keys(&r);
    assert!(
        !keys.iter().any(|k| k.starts_with("farm:catalog:import")),
        "staging left behind: {:?}",
        keys.iter()
            .filter(|k| k.starts_with("farm:catalog:"))
            .collect::<Vec<_>>()
    );

    // --replace of the same ids with other URLs, and the list reads them all back (SSCAN)
    let file = write_file(dir.path(), "big2.m3u", &generated_m3u(5000, "b.example"));
    assert_exit(&farmctl(&r.url, &["import", &file, "--chunk", "700"]), 2);
    assert_exit(
        &farmctl(&r.url, &["import", &file, "--chunk", "700", "--replace"]),
        0,
    );
    assert_eq!(
        hash(&r, "farm:channel:c0")["url"],
        "http://b.example/live/0.ts"
    );
    let o = farmctl(&r.url, &["channel", "list"]);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o).lines().count(), 5001);

    // caps: channels and bytes, each with the flag that raises it
    let o = farmctl(&r.url, &["import", &file, "--max-channels", "4999"]);
    assert_exit(&o, 2);
    assert_stderr_has(&o, "5000 channels, more than --max-channels 4999");
    assert_one_sentence(&o);
    let o = farmctl(&r.url, &["import", &file, "--max-bytes", "10K"]);
    assert_exit(&o, 2);
    assert_stderr_has(&o, "more than --max-bytes 10240");
}

#[test]
fn an_import_that_fails_while_staging_leaves_the_catalog_as_it_was() {
    let r = Redis::start();
    let dir = tempfile::tempdir().expect("temp dir");
    assert_exit(
        &farmctl(&r.url, &["channel", "add", "keep", "http://k.example/1"]),
        0,
    );
    let before = (members(&r, "farm:channels"), hash(&r, "farm:channel:keep"));
    // Redis refuses writes (OOM) half way through the staging.
    let used: String = redis::cmd("INFO")
        .arg("memory")
        .query(&mut r.conn())
        .expect("INFO");
    let used: u64 = used
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory");
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used + 2_000_000)
        .query::<()>(&mut r.conn())
        .expect("CONFIG SET");
    let file = write_file(dir.path(), "big.m3u", &generated_m3u(20_000, "a.example"));
    let o = farmctl(&r.url, &["import", &file, "--chunk", "200"]);
    assert_exit(&o, 1);
    assert_stdout_has(&o, "staged 2000/20000");
    assert_stderr_has(&o, "OOM");
    assert_one_sentence(&o);
    assert_eq!(
        (members(&r, "farm:channels"), hash(&r, "farm:channel:keep")),
        before
    );
    assert!(hash(&r, "farm:channel:c0").is_empty());
    assert!(
        !all_keys(&r)
            .iter()
            .any(|k| k.starts_with("farm:catalog:import")),
        "the failed import's staging list is removed"
    );
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query::<()>(&mut r.conn())
        .expect("CONFIG SET");
    assert_exit(&farmctl(&r.url, &["import", &file, "--chunk", "2000"]), 0);
    assert_eq!(members(&r, "farm:channels").len(), 20_001);
}

#[test]
fn a_committed_import_is_finished_by_the_next_catalog_write() {
    let r = Redis::start();
    // What farmctl leaves when it is killed right after the commit: the marker and the list.
    let mut c = r.conn();
    let entries: Vec<String> = (0..3)
        .map(|i| {
            serde_json::json!({
                "id": format!("s{i}"), "name": format!("S {i}"), "url": format!("http://s.example/{i}"),
                "backup_urls": [], "profile": "copy", "provider": "", "pinned": i == 1, "group": ""
            })
            .to_string()
        })
        .collect();
    redis::pipe()
        .cmd("RPUSH")
        .arg("farm:catalog:import:7")
        .arg(&entries)
        .cmd("SET")
        .arg("farm:catalog:importing")
        .arg(7)
        .query::<()>(&mut c)
        .expect("plant");
    let o = farmctl(&r.url, &["channel", "list"]);
    assert_exit(&o, 0);
    assert_stdout_has(
        &o,
        "import 7 is committed but 3 of its channels are not applied yet",
    );
    let o = farmctl(&r.url, &["import", "--resume"]);
    assert_exit(&o, 0);
    assert_stdout_has(&o, "import 7 applied");
    assert_eq!(members(&r, "farm:channels").len(), 3);
    assert_eq!(
        members(&r, "farm:pinned"),
        BTreeSet::from(["s1".to_string()])
    );
    assert!(!all_keys(&r)
        .iter()
        .any(|k| k.starts_with("farm:catalog:import")));
    let o = farmctl(&r.url, &["import", "--resume"]);
    assert_exit(&o, 0);
    assert_stdout_has(&o, "no import was waiting");

    // A channel add finishes a pending import before its own write (writes apply in order).
    redis::pipe()
        .cmd("RPUSH")
        .arg("farm:catalog:import:8")
        .arg(&entries[..1])
        .cmd("SET")
        .arg("farm:catalog:importing")
        .arg(8)
        .query::<()>(&mut c)
        .expect("plant");
    redis::cmd("DEL")
        .arg("farm:channel:s0")
        .query::<()>(&mut c)
        .expect("DEL");
    assert_exit(
        &farmctl(&r.url, &["channel", "add", "s9", "http://s.example/9"]),
        0,
    );
    assert_eq!(hash(&r, "farm:channel:s0")["url"], "http://s.example/0");
    assert_eq!(members(&r, "farm:channels").len(), 4);
}

#[test]
fn odd_data_in_redis_never_breaks_the_list_and_big_names_are_refused() {
    let r = Redis::start();
    let mut c = r.conn();
    let big = "N".repeat(1 << 20);
    redis::pipe()
        .cmd("HSET")
        .arg("farm:channel:huge")
        .arg("url")
        .arg("http://h.example/1")
        .arg("name")
        .arg(&big)
        .cmd("HSET")
        .arg("farm:channel:bytes")
        .arg("url")
        .arg(b"http://h.example/\xff\xfe".as_slice())
        .arg("name")
        .arg(b"\xc3\x28\x1b[2J".as_slice())
        .cmd("SET")
        .arg("farm:channel:str")
        .arg("garbage")
        .cmd("SADD")
        .arg("farm:channels")
        .arg(&["huge", "bytes", "str", "gone"])
        .query::<()>(&mut c)
        .expect("plant");
    let o = farmctl(&r.url, &["channel", "list"]);
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 5, "{out}");
    assert!(
        out.len() < 2000,
        "a 1 MB name is clipped: {} bytes",
        out.len()
    );
    assert!(out.contains("NNN…"), "{out}");
    assert!(!out.contains('\u{1b}'), "{out}");
    assert!(
        out.contains("(unreadable: ") && out.contains("WRONGTYPE"),
        "{out}"
    );
    assert!(out.contains("(indexed, but its hash is missing)"), "{out}");
    assert_exit(&farmctl(&r.url, &["channel", "list", "--json"]), 0);
    assert_exit(&farmctl(&r.url, &["channel", "show", "huge"]), 0);
    assert_exit(&farmctl(&r.url, &["status"]), 0);

    // writing one is refused with a sentence, and nothing changes (an argument is at most
    // 128 KiB, so the 1 MB name comes through an import)
    let o = farmctl(
        &r.url,
        &[
            "channel",
            "add",
            "n1",
            "http://h.example/2",
            "--name",
            &big[..100_000],
        ],
    );
    assert_exit(&o, 2);
    assert_one_sentence(&o);
    assert_stderr_has(
        &o,
        "invalid name: it is 100000 bytes long, at most 256 are allowed",
    );
    assert!(stderr(&o).len() < 300);
    assert!(hash(&r, "farm:channel:n1").is_empty());
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write_file(
        dir.path(),
        "big-name.m3u",
        &format!("#EXTM3U\n#EXTINF:-1 tvg-id=\"n2\",{big}\nhttp://h.example/3\n"),
    );
    let o = farmctl(&r.url, &["import", &file]);
    assert_exit(&o, 2);
    assert_stderr_has(
        &o,
        ":2: the channel's invalid name: it is 1048576 bytes long",
    );
    assert!(stderr(&o).len() < 400);
    assert!(hash(&r, "farm:channel:n2").is_empty());
}

#[test]
fn urls_are_shown_redacted_unless_asked() {
    let r = Redis::start();
    let url = "http://usr:pw@p.example/live/xuser/xpass/7.ts?token=tok123";
    let o = farmctl(&r.url, &["channel", "add", "sec", url, "--backup", url]);
    assert_exit(&o, 0);
    for args in [
        &["channel", "list"][..],
        &["channel", "list", "--json"],
        &["channel", "show", "sec"],
        &["channel", "show", "sec", "--json"],
    ] {
        let o = farmctl(&r.url, args);
        assert_exit(&o, 0);
        let out = stdout(&o);
        for secret in ["usr", "pw@", "xuser", "xpass", "tok123"] {
            assert!(!out.contains(secret), "{args:?}: {secret} in {out}");
        }
        assert!(
            out.contains("http://***@p.example/live/***/***/7.ts?token=***"),
            "{out}"
        );
        let mut shown = args.to_vec();
        shown.push("--show-secrets");
        let o = farmctl(&r.url, &shown);
        assert!(stdout(&o).contains(url), "{shown:?}: {}", stdout(&o));
    }
    // an https URL with a token: added, with a warning that nodes will not start it
    let o = farmctl(
        &r.url,
        &[
            "channel",
            "add",
            "tls",
            "https://cdn.example/a.m3u8?token=zz",
        ],
    );
    assert_exit(&o, 0);
    assert_stdout_has(&o, "nodes refuse to start it");
    assert!(!stdout(&o).contains("zz"));
}
