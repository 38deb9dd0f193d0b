//! The shipped Redis files: `deploy/redis/redis.conf` + `users.acl` on a real redis-server (only the
//! port, folder, log and ACL file path overridden), and `sentinel.conf` on a real Sentinel.
//!
//! - A real farm-node works as the `farm-node` user (start, segments, keepalive, access flush, a drain
//!   to a second node, a stop command, graceful shutdown) without a single ACL denial, while FLUSHALL, CONFIG, KEYS, DEBUG,
//!   SHUTDOWN and catalog writes as that user are refused.
//! - farm-coordinator, farmctl and ops work as their users; ops cannot write.
//! - Every command the Lua scripts call is granted to the users that run them; no farm user gets a
//!   dangerous command or keys outside `farm:`.
//! - The Sentinel example monitors the primary, logging in as the `sentinel` user, and a node that
//!   finds the primary through it (`redis+sentinel://`) works as `farm-node`.

use farm_tests::coordinator::{
    fake_source, owner, wait_alive, wait_unowned, CoordinatorOpts, CoordinatorProcess,
};
use farm_tests::farm::coordinator_args;
use farm_tests::fixtures::send_command;
use farm_tests::node::{farmctl, output_ok, NodeOpts, NodeProcess};
use farm_tests::ports::free_port;
use farm_tests::procs::print_tail_if_panicking;
use farm_tests::redis::{config_get, inline_command, RedisServer};
use farm_tests::wait::{eventually, eventually_with};
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The fast node settings ([`farm_tests::farm::FAST`]) with the default restart backoff.
fn fast() -> Vec<String> {
    farm_tests::farm::without(farm_tests::farm::FAST, &["--backoff-base", "--backoff-max"])
}

fn repo() -> PathBuf {
    farm_tests::nginx::repo_root()
}

/// The password of `user` in the shipped users.acl (its `>password` rule).
fn password(user: &str) -> String {
    let acl = std::fs::read_to_string(repo().join("deploy/redis/users.acl")).expect("users.acl");
    acl.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(user))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix('>')))
        .unwrap_or_else(|| panic!("no password for {user} in users.acl"))
        .to_string()
}

/// redis-server started from the shipped redis.conf and users.acl (a copy, in its folder).
struct ConfRedis(RedisServer);

impl ConfRedis {
    fn start() -> ConfRedis {
        let server = RedisServer::start_with_conf(
            &repo().join("deploy/redis/redis.conf"),
            &[("--aclfile", &repo().join("deploy/redis/users.acl"))],
        );
        // The default user is off.
        let reply = inline_command(server.port(), "PING");
        assert!(
            reply.as_deref().is_some_and(|r| r.starts_with("-NOAUTH")),
            "PING without a user must be refused, got {reply:?}"
        );
        ConfRedis(server)
    }

    fn port(&self) -> u16 {
        self.0.port()
    }

    fn url(&self, user: &str) -> String {
        format!(
            "redis://{user}:{}@127.0.0.1:{}/",
            password(user),
            self.port()
        )
    }

    async fn conn(&self, user: &str) -> MultiplexedConnection {
        redis::Client::open(self.url(user))
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connect as {user}: {e}"))
    }
}

/// `ACL LOG` as `(username, reason, object)`, newest first.
async fn acl_log(admin: &mut MultiplexedConnection) -> Vec<(String, String, String)> {
    let entries: Vec<HashMap<String, redis::Value>> = redis::cmd("ACL")
        .arg("LOG")
        .arg(128)
        .query_async(admin)
        .await
        .expect("ACL LOG");
    let field = |e: &HashMap<String, redis::Value>, k: &str| {
        e.get(k)
            .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
            .unwrap_or_default()
    };
    entries
        .iter()
        .map(|e| (field(e, "username"), field(e, "reason"), field(e, "object")))
        .collect()
}

/// Runs a raw command as a user; `Err(message)` when Redis refuses it.
async fn try_cmd(c: &mut MultiplexedConnection, args: &[&str]) -> Result<redis::Value, String> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    // redis-rs shows the NOPERM error code as "NoPerm"; one spelling for the assertions.
    cmd.query_async(c)
        .await
        .map_err(|e| e.to_string().replace("NoPerm", "NOPERM"))
}

fn farmctl_as(redis: &ConfRedis, user: &str, args: &[&str]) -> std::process::Output {
    farmctl(&redis.url(user), args)
}

/// The node that owns `channel`, if any.
async fn owner_node(admin: &mut MultiplexedConnection, channel: &str) -> Option<String> {
    owner(admin, "farm", channel).await.map(|(node, _)| node)
}

/// Adds the fake-ffmpeg channel `id` (a segment every 500 ms) with farmctl as farm-admin; its URL.
fn add_channel(redis: &ConfRedis, id: &str) -> String {
    let url = fake_source(id, 500);
    farmctl_ok_as(redis, "farm-admin", &["channel", "add", id, &url]);
    url
}

/// farmctl as `user`; its stdout, or a panic with its stderr if it fails.
fn farmctl_ok_as(redis: &ConfRedis, user: &str, args: &[&str]) -> String {
    output_ok(
        &farmctl_as(redis, user, args),
        &format!("farmctl {args:?} as {user}"),
    )
}

fn node_as_acl_user(redis: &ConfRedis, id: &str, root: &Path) -> NodeProcess {
    NodeProcess::spawn(
        NodeOpts::new(id, redis.url("farm-node"), root.join(id))
            .with_fake_ffmpeg()
            .args(fast()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_works_as_its_acl_user_while_flushall_and_config_are_refused() {
    let redis = ConfRedis::start();
    let mut admin = redis.conn("admin").await;
    for (param, shipped) in [("maxmemory-policy", "noeviction"), ("appendonly", "yes")] {
        assert_eq!(config_get(&mut admin, param).await, [param, shipped]);
    }

    let c1_url = add_channel(&redis, "c1");
    let root = tempfile::tempdir().expect("tempdir");
    let mut node = node_as_acl_user(&redis, "n1", root.path());
    let http = reqwest::Client::new();
    let playlist = format!("{}/live/c1/index.m3u8", node.base_url());
    let r = http.get(&playlist).send().await.expect("GET");
    assert_eq!(r.status(), 200);
    let body = r.text().await.expect("body");
    let seg = farm_tests::hls::MediaPlaylist::parse(&body)
        .expect("playlist")
        .segments[0]
        .uri
        .clone();
    let r = http
        .get(format!("{}/live/c1/{seg}", node.base_url()))
        .send()
        .await
        .expect("GET segment");
    assert_eq!(r.status(), 200);

    // Keepalive (heartbeat, renew, last segment time) and the access flush ran as farm-node.
    let claimed: Option<f64> = admin.zscore("farm:access", "c1").await.expect("ZSCORE");
    let claimed = claimed.expect("access entry");
    let stream = eventually(
        "keepalive and access flush",
        Duration::from_secs(10),
        || {
            let mut a = admin.clone();
            let http = http.clone();
            let playlist = playlist.clone();
            async move {
                let _ = http.get(&playlist).send().await;
                let h: HashMap<String, String> = a.hgetall("farm:stream:c1").await.ok()?;
                let access: Option<f64> = a.zscore("farm:access", "c1").await.ok()?;
                (h.contains_key("last_segment_at") && access > Some(claimed)).then_some(h)
            }
        },
    )
    .await;
    println!("farm:stream:c1 written by farm-node: {stream:?}");
    assert_eq!(stream.get("state").map(String::as_str), Some("running"));
    let alive: bool = admin.exists("farm:node:n1:alive").await.expect("EXISTS");
    assert!(alive);

    // A drain: n1 picks the live node with the most room (n2) and hands c1 over, all as farm-node.
    let mut n2 = node_as_acl_user(&redis, "n2", root.path());
    wait_alive(&admin, "n2", "n2 heartbeats", Duration::from_secs(10)).await;
    send_command(&mut admin, "n1", &[("op", "drain"), ("by", "test")]).await;
    eventually(
        "c1 handed to n2 by the drain",
        Duration::from_secs(30),
        || {
            let mut a = admin.clone();
            async move { (owner_node(&mut a, "c1").await? == "n2").then_some(()) }
        },
    )
    .await;

    // A stop command (farmctl as farm-admin): the node reads, acts, releases and acks as farm-node.
    farmctl_ok_as(&redis, "farm-admin", &["stop", "c1"]);
    wait_unowned(
        &admin,
        "c1",
        "c1 stopped by command",
        Duration::from_secs(10),
    )
    .await;
    // And a graceful shutdown deregisters both.
    for n in [&mut node, &mut n2] {
        n.sigterm();
        let status = n.wait_exit(Duration::from_secs(15)).expect("node exits");
        assert!(status.success(), "{status}");
    }
    let left: Vec<String> = redis::cmd("KEYS")
        .arg("farm:node:*")
        .query_async(&mut admin)
        .await
        .expect("KEYS");
    assert!(left.is_empty(), "node keys left: {left:?}");

    let denials = acl_log(&mut admin).await;
    println!("ACL denials during the nodes' whole life: {denials:?}");
    assert!(denials.is_empty(), "the nodes hit ACL denials: {denials:?}");
    for n in [&node, &n2] {
        assert!(!n.log().contains("NOPERM"), "{}", n.log());
    }

    // The node's user cannot wipe, reconfigure, scan, stop the server or rewrite the catalog.
    let mut n = redis.conn("farm-node").await;
    let forbidden: &[&[&str]] = &[
        &["FLUSHALL"],
        &["FLUSHDB"],
        &["CONFIG", "GET", "*"],
        &["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"],
        &["KEYS", "*"],
        &["DEBUG", "SLEEP", "0"],
        &["SHUTDOWN", "NOSAVE"],
        &["SCRIPT", "FLUSH"],
        &["ACL", "LIST"],
        &["HSET", "farm:channel:c1", "url", "http://evil.example/x.ts"],
        &["DEL", "farm:channel:c1"],
        &["SET", "other:key", "1"],
        &["GET", "farm:leader"],
    ];
    for args in forbidden {
        let e = try_cmd(&mut n, args)
            .await
            .expect_err(&format!("{args:?} as farm-node must be refused"));
        println!("farm-node {args:?}: {e}");
        // DEBUG is switched off for everyone by redis.conf, before the ACL is consulted.
        let refused = e.contains("NOPERM") || (args[0] == "DEBUG" && e.contains("not allowed"));
        assert!(refused, "{args:?}: {e}");
    }
    let url: Option<String> = admin.hget("farm:channel:c1", "url").await.expect("HGET");
    assert_eq!(url, Some(c1_url), "the catalog survived");
    let logged = acl_log(&mut admin).await;
    assert!(
        logged
            .iter()
            .any(|(u, _, o)| u == "farm-node" && o == "flushall"),
        "ACL LOG records the refused FLUSHALL: {logged:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_farmctl_and_ops_work_as_their_acl_users() {
    let redis = ConfRedis::start();
    let mut admin = redis.conn("admin").await;
    for id in ["idle", "kept"] {
        add_channel(&redis, id);
    }
    farmctl_ok_as(&redis, "farm-admin", &["pin", "kept"]);
    let root = tempfile::tempdir().expect("tempdir");
    let mut n1 = node_as_acl_user(&redis, "n1", root.path());
    // A second node: a coordinator reaps nothing while most nodes look dead.
    let _n2 = node_as_acl_user(&redis, "n2", root.path());
    let co = CoordinatorProcess::spawn(
        CoordinatorOpts::new("co1", redis.url("farm-coordinator")).args(coordinator_args(
            &[("--idle-timeout", "2s"), ("--tick", "500ms")],
            &[],
        )),
    );
    for id in ["idle", "kept"] {
        let r = reqwest::get(format!("{}/live/{id}/index.m3u8", n1.base_url()))
            .await
            .expect("GET");
        assert_eq!(r.status(), 200, "{id}");
    }
    // The coordinator leads and stops the unwatched channel, not the pinned one.
    let began = Instant::now();
    wait_unowned(
        &admin,
        "idle",
        "the idle channel to be stopped",
        Duration::from_secs(15),
    )
    .await;
    println!(
        "idle channel stopped by the coordinator (as farm-coordinator) after {:?}",
        began.elapsed()
    );
    assert!(owner(&mut admin, "farm", "kept").await.is_some());
    assert_eq!(co.metric("farm_coordinator_is_leader"), 1.0);

    // A dead node is reaped by the coordinator's scripts (its pinned channel may move to n2).
    assert_eq!(owner_node(&mut admin, "kept").await.as_deref(), Some("n1"));
    n1.kill9();
    let began = Instant::now();
    eventually_with(
        &admin,
        "the dead node to be reaped",
        Duration::from_secs(20),
        |mut a| async move {
            let nodes: Vec<String> = a.zrange("farm:nodes", 0, -1).await.ok()?;
            let kept = owner_node(&mut a, "kept").await;
            (nodes == ["n2"] && kept.as_deref() != Some("n1")).then_some(())
        },
    )
    .await;
    println!("dead node reaped after {:?}", began.elapsed());

    // Ops read everything with farmctl and redis commands, and write nothing.
    let status = farmctl_ok_as(&redis, "farm-ops", &["status"]);
    let list = farmctl_ok_as(&redis, "farm-ops", &["channel", "list"]);
    farmctl_ok_as(&redis, "farm-ops", &["events"]);
    println!("farmctl status as farm-ops:\n{status}\nchannel list:\n{list}");
    assert!(list.contains("idle") && list.contains("kept"));
    let refused = farmctl_as(
        &redis,
        "farm-ops",
        &["channel", "add", "x", "http://127.0.0.1:9/x.ts"],
    );
    assert!(!refused.status.success(), "ops added a channel");
    let mut ops = redis.conn("farm-ops").await;
    let h: HashMap<String, String> = ops.hgetall("farm:channel:kept").await.expect("HGETALL");
    assert!(h.contains_key("url"));
    for args in [
        &["HSET", "farm:channel:kept", "url", "x"][..],
        &["DEL", "farm:channels"],
        &["XADD", "farm:cmd:n1", "*", "op", "stop"],
        &["FLUSHALL"],
    ] {
        let e = try_cmd(&mut ops, args)
            .await
            .expect_err("ops may not write");
        assert!(e.contains("NOPERM"), "{args:?}: {e}");
    }

    let denials: Vec<_> = acl_log(&mut admin)
        .await
        .into_iter()
        .filter(|(u, _, _)| u != "farm-ops")
        .collect();
    assert!(
        denials.is_empty(),
        "coordinator/node/farmctl hit ACL denials: {denials:?}"
    );
    assert!(!co.log().contains("NOPERM"), "{}", co.log());
}

/// Commands named in `redis.call('X', ...)` / `redis.pcall("X", ...)` of a script.
fn lua_commands(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for marker in ["redis.call(", "redis.pcall("] {
        for part in src.split(marker).skip(1) {
            let part = part.trim_start();
            let Some(q) = part.chars().next().filter(|c| *c == '\'' || *c == '"') else {
                continue;
            };
            if let Some(name) = part[1..].split(q).next() {
                out.insert(name.to_ascii_lowercase());
            }
        }
    }
    out
}

/// users.acl as user → (rules).
fn acl_users() -> HashMap<String, Vec<String>> {
    let acl = std::fs::read_to_string(repo().join("deploy/redis/users.acl")).expect("users.acl");
    acl.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut w = l.split_whitespace();
            assert_eq!(w.next(), Some("user"), "{l}");
            let name = w.next().expect("user name").to_string();
            (name, w.map(str::to_string).collect())
        })
        .collect()
}

#[test]
fn every_command_the_scripts_call_is_granted_and_no_farm_user_gets_a_dangerous_one() {
    let users = acl_users();
    let granted = |user: &str| -> BTreeSet<String> {
        users[user]
            .iter()
            .filter_map(|r| r.strip_prefix('+'))
            .map(str::to_ascii_lowercase)
            .collect()
    };
    // Scripts a node runs (proto/README.md); all of them are also run by coordinators and farmctl.
    let node_scripts = [
        "claim.lua",
        "renew.lua",
        "release.lua",
        "stream_set.lua",
        "touch.lua",
        "heartbeat.lua",
        "release_node.lua",
        "timeline.lua",
    ];
    let dir = repo().join("proto/lua");
    let mut all = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("proto/lua") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        let cmds = lua_commands(&std::fs::read_to_string(&path).expect("read script"));
        assert!(
            !cmds.is_empty() || name == "README.md",
            "{name} calls nothing?"
        );
        if node_scripts.contains(&name.as_str()) {
            let node = granted("farm-node");
            let missing: Vec<_> = cmds.difference(&node).collect();
            assert!(missing.is_empty(), "farm-node lacks {missing:?} for {name}");
        }
        all.extend(cmds);
    }
    println!("commands called by the scripts: {all:?}");
    for user in ["farm-coordinator", "farm-admin"] {
        let g = granted(user);
        let missing: Vec<_> = all.difference(&g).collect();
        assert!(missing.is_empty(), "{user} lacks {missing:?}");
    }
    for user in ["farm-node", "farm-coordinator", "farm-admin", "farm-ops"] {
        let rules = &users[user];
        let g = granted(user);
        for bad in [
            "@all",
            "@dangerous",
            "@admin",
            "flushall",
            "flushdb",
            "config",
            "debug",
            "shutdown",
            "keys",
            "acl",
            "monitor",
            "script|flush",
            "swapdb",
            "migrate",
            "restore",
        ] {
            assert!(!g.contains(bad), "{user} is granted {bad}");
        }
        assert_eq!(rules.first().map(String::as_str), Some("on"), "{user}");
        assert!(
            rules.contains(&"-@all".to_string()),
            "{user} must start from -@all"
        );
        assert!(rules.contains(&"resetchannels".to_string()), "{user}");
        let keys: Vec<_> = rules
            .iter()
            .filter(|r| r.starts_with('~') || r.starts_with('%') || *r == "allkeys")
            .collect();
        assert!(!keys.is_empty(), "{user} has no key pattern");
        for k in keys {
            let pattern = k.rsplit('~').next().unwrap_or("");
            assert!(
                pattern.starts_with("farm:"),
                "{user}: key rule {k} reaches outside farm:"
            );
        }
    }
    assert!(
        users["default"].contains(&"off".to_string()),
        "the default user must be off"
    );
    // Ops read only.
    assert!(users["farm-ops"].iter().all(|r| !r.starts_with('~')));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sentinel_example_monitors_the_primary_as_its_acl_user() {
    let redis = ConfRedis::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let conf =
        std::fs::read_to_string(repo().join("deploy/redis/sentinel.conf")).expect("sentinel.conf");
    let monitor = conf
        .lines()
        .find(|l| l.starts_with("sentinel monitor farm "))
        .expect("a monitor line");
    // One Sentinel here, so a quorum of 1; everything else as shipped.
    let conf = conf
        .replace(
            monitor,
            &format!("sentinel monitor farm 127.0.0.1 {} 1", redis.port()),
        )
        .replace(
            "dir /var/lib/redis-sentinel",
            &format!("dir {}", dir.path().display()),
        );
    let path = dir.path().join("sentinel.conf");
    std::fs::write(&path, conf).expect("write sentinel.conf");
    let port = free_port();
    let mut child = Command::new("redis-server")
        .arg(&path)
        .arg("--sentinel")
        .args(["--port", &port.to_string()])
        .arg("--logfile")
        .arg(dir.path().join("sentinel.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sentinel");
    struct Reap<'a>(&'a mut Child, &'a Path);
    impl Drop for Reap<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            print_tail_if_panicking(format_args!("sentinel log"), 30, || {
                std::fs::read_to_string(self.1.join("sentinel.log")).unwrap_or_default()
            });
        }
    }
    let _reap = Reap(&mut child, dir.path());
    let url = format!("redis://127.0.0.1:{port}/");
    let began = Instant::now();
    let master = eventually(
        "Sentinel to see a healthy primary",
        Duration::from_secs(15),
        || async {
            let client = redis::Client::open(url.as_str()).ok()?;
            let mut c = client.get_multiplexed_async_connection().await.ok()?;
            let m: HashMap<String, String> = redis::cmd("SENTINEL")
                .arg("MASTER")
                .arg("farm")
                .query_async(&mut c)
                .await
                .ok()?;
            // info-refresh stays 0 until an INFO as the sentinel user succeeded.
            let refreshed = m.get("info-refresh").is_some_and(|v| v != "0");
            (m.get("flags").map(String::as_str) == Some("master") && refreshed).then_some(m)
        },
    )
    .await;
    println!(
        "Sentinel sees the primary after {:?}: flags {:?}, role {:?}, quorum {:?}, down-after {:?} ms",
        began.elapsed(),
        master.get("flags"),
        master.get("role-reported"),
        master.get("quorum"),
        master.get("down-after-milliseconds")
    );
    assert_eq!(
        master.get("role-reported").map(String::as_str),
        Some("master")
    );
    assert_eq!(
        master.get("down-after-milliseconds").map(String::as_str),
        Some("5000")
    );

    // A node that finds the primary through this Sentinel works as its ACL user there.
    let mut admin = redis.conn("admin").await;
    add_channel(&redis, "c1");
    let root = tempfile::tempdir().expect("tempdir");
    let via_sentinel = format!(
        "redis+sentinel://farm-node:{}@127.0.0.1:{port}/farm",
        password("farm-node")
    );
    let node = NodeProcess::spawn(
        NodeOpts::new("n1", via_sentinel, root.path().join("n1"))
            .with_fake_ffmpeg()
            .args(fast()),
    );
    let r = reqwest::get(format!("{}/live/c1/index.m3u8", node.base_url()))
        .await
        .expect("GET");
    assert_eq!(r.status(), 200);
    assert_eq!(owner_node(&mut admin, "c1").await.as_deref(), Some("n1"));
    let denials = acl_log(&mut admin).await;
    assert!(
        denials.is_empty(),
        "Sentinel or the node hit ACL denials: {denials:?}"
    );
}
