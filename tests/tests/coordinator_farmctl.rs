//! farmctl's ops commands against a live farm (two nodes with the fake FFmpeg, one coordinator):
//! status (table and JSON), start (named node and automatic placement), stop --wait, pin/unpin,
//! events (latest and --follow), and bad arguments: one sentence on stderr, exit 2, nothing changed;
//! an unreachable Redis exits 1.

use farm_tests::bins::bin_path;
use farm_tests::coordinator::{
    events, fake_source, farmctl_ok, node_args, owner, CoordinatorOpts, CoordinatorProcess,
};
use farm_tests::farm::coordinator_args;
use farm_tests::node::{farmctl, NodeOpts, NodeProcess};
use farm_tests::redis::RedisServer;
use farm_tests::wait::eventually;
use redis::AsyncCommands;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_farmctl_ops_commands_drive_a_live_farm() {
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    let url = redis.url();
    for ch in ["alpha", "beta"] {
        farmctl_ok(&url, &["channel", "add", ch, &fake_source(ch, 500)]);
    }
    let n1 = NodeProcess::spawn(
        NodeOpts::new("n1", &url, root.path().join("n1"))
            .with_fake_ffmpeg()
            .args(node_args("3s")),
    );
    let _n2 = NodeProcess::spawn(
        NodeOpts::new("n2", &url, root.path().join("n2"))
            .with_fake_ffmpeg()
            .args(node_args("3s")),
    );
    let _co = CoordinatorProcess::spawn(CoordinatorOpts::new("c1", &url).args(coordinator_args(
        &[("--idle-timeout", "2m"), ("--tick", "500ms")],
        &["--leader-ttl"],
    )));
    let mut c = redis.conn().await;

    // start: on a named node, then wherever there is room.
    let out = farmctl_ok(&url, &["start", "alpha", "--node", "n1", "--wait"]);
    assert!(out.contains("channel alpha runs on node n1"), "{out}");
    let out = farmctl_ok(&url, &["start", "beta", "--wait"]);
    assert!(out.contains("channel beta runs on node"), "{out}");
    let out = farmctl_ok(&url, &["start", "alpha"]);
    assert!(out.contains("already runs on node n1"), "{out}");

    // status: table and JSON.
    eventually(
        "status to show the leader and both nodes",
        Duration::from_secs(10),
        || async {
            let out = farmctl_ok(&url, &["status"]);
            (out.contains("leader: c1") && out.contains("n1") && out.contains("n2")).then_some(out)
        },
    )
    .await;
    let out = farmctl_ok(&url, &["status"]);
    println!("{out}");
    for needle in [
        "ALIVE",
        "RUNNING",
        "DISK FREE",
        "LAST ACCESS",
        "alpha",
        "beta",
        "running",
    ] {
        assert!(out.contains(needle), "{needle} missing in\n{out}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&farmctl_ok(&url, &["status", "--json"])).expect("status --json");
    assert_eq!(json["leader"]["coordinator"], "c1");
    let nodes = json["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2);
    assert!(nodes.iter().all(|n| n["alive"] == true), "{json}");
    let alpha = json["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .find(|c| c["id"] == "alpha")
        .expect("alpha listed")
        .clone();
    assert_eq!(alpha["node"], "n1");
    assert_eq!(alpha["state"], "running");
    assert!(alpha["pid"].as_u64().is_some(), "{alpha}");
    assert!(alpha["last_access_ms_ago"].as_u64().is_some(), "{alpha}");

    // pin / unpin edit the catalog flag.
    let out = farmctl_ok(&url, &["pin", "alpha"]);
    assert!(out.contains("pinned channel alpha"), "{out}");
    let pinned: String = c.hget("farm:channel:alpha", "pinned").await.expect("HGET");
    assert_eq!(pinned, "1");
    farmctl_ok(&url, &["unpin", "alpha"]);
    let pinned: String = c.hget("farm:channel:alpha", "pinned").await.expect("HGET");
    assert_eq!(pinned, "0");

    // events --follow prints what happens next.
    let mut follower = Command::new(bin_path("farmctl"))
        .args(["events", "--follow", "--json", "--count", "1"])
        .env_clear()
        .env("FARM_REDIS_URL", &url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn farmctl events --follow");
    let stdout = follower.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The follower prints the latest event first: then it is following.
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the latest event");

    // stop --wait: the owner stops it with reason ops.
    let (_, gen) = owner(&mut c, "farm", "alpha").await.expect("alpha runs");
    let out = farmctl_ok(&url, &["stop", "alpha", "--wait"]);
    assert!(
        out.contains(&format!("channel alpha (gen {gen}) stopped on node n1")),
        "{out}"
    );
    assert_eq!(owner(&mut c, "farm", "alpha").await, None);
    assert!(farm_tests::coordinator::ffmpegs_for(n1.hls_root(), "alpha").is_empty());
    let ev = events(&mut c, "farm").await;
    let stop = ev
        .iter()
        .find(|e| e.kind() == "stopped" && e.get("channel") == "alpha")
        .expect("a stopped event");
    assert_eq!(stop.get("reason"), "ops");
    assert_eq!(stop.get("gen"), gen.to_string());

    let followed = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("events --follow printed the stop");
        let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
        if v["event"] == "stopped" && v["channel"] == "alpha" {
            break v;
        }
    };
    assert_eq!(followed["reason"], "ops");
    let _ = follower.kill();
    let _ = follower.wait();

    let out = farmctl_ok(&url, &["events", "--count", "50"]);
    assert!(
        out.contains("stopped") && out.contains("channel=alpha") && out.contains("reason=ops"),
        "{out}"
    );
    let out = farmctl_ok(&url, &["events", "--channel", "beta"]);
    assert!(out.lines().all(|l| l.contains("channel=beta")), "{out}");

    // Bad input: exit 2, one sentence, nothing changed.
    let keys_before: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .expect("KEYS");
    for (args, says) in [
        (&["stop", "alpha"][..], "is not running"),
        (&["stop", "../etc"], "invalid channel id"),
        (&["start", "nosuch"], "does not exist"),
        (&["start", "alpha", "--node", "ghost"], "is not alive"),
        (&["start", "alpha", "--node", "a:b"], "invalid node id"),
        (&["pin", "nosuch"], "does not exist"),
        (&["unpin", "a/b"], "invalid channel id"),
        (&["events", "--count", "0"], "0 is not in 1..=10000"),
        (&["stop"], "required"),
        (&["status", "--bogus"], "unexpected argument"),
    ] {
        let out = farmctl(&url, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "farmctl {args:?}: {err}");
        assert!(err.contains(says), "farmctl {args:?} said: {err}");
        assert!(
            out.stdout.is_empty(),
            "farmctl {args:?} printed {:?}",
            out.stdout
        );
        if !err.starts_with("error:") {
            // Ours (clap's usage errors have their own format): one line, one sentence.
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(
                err.starts_with("farmctl: ") && err.trim_end().ends_with('.'),
                "{err}"
            );
        }
    }
    let mut keys_after: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .expect("KEYS");
    let mut keys_before = keys_before;
    keys_before.sort();
    keys_after.sort();
    assert_eq!(keys_before, keys_after, "bad input changed Redis");
    assert_eq!(owner(&mut c, "farm", "alpha").await, None);

    // Runtime failure: exit 1.
    for args in [&["status"][..], &["stop", "beta"], &["events"]] {
        let out = farmctl("redis://127.0.0.1:1/", args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "farmctl {args:?}: {err}");
        assert!(err.contains("cannot connect to Redis"), "{err}");
    }
}
