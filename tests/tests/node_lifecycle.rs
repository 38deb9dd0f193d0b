//! Node life: graceful SIGTERM leaves nothing; SIGKILL of a node takes its FFmpeg with it, on both
//! spawn paths (`--ffmpeg-sandbox off` and `auto`), also an FFmpeg the node restarted and one of a
//! restarted node (victims found in /proc); the next start sweeps a leftover FFmpeg (pid + start
//! time + marker) and never a reused pid; the disk guard refuses starts. Each test ends with the
//! invariant checker.

use farm_tests::farm::coordinator_args;
use farm_tests::farm::Farm;
use farm_tests::fixtures::*;
use farm_tests::invariants::{self, settle_time, FarmNode};
use farm_tests::node::NodeProcess;
use farm_tests::redis::RedisServer;
use farm_tests::wait::eventually;
use redis::AsyncCommands;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

/// The invariant checker (node TTL 3 s, no coordinator).
async fn leaves_nothing(redis: &RedisServer, nodes: &[FarmNode]) {
    let report = invariants::check(
        redis,
        nodes,
        settle_time(Duration::from_secs(3), Duration::from_millis(500)),
    )
    .await;
    println!("node life: {}", report.figure());
    report.assert_clean();
}

/// The one FFmpeg under `root` as /proc shows it (pid, kernel start time), waiting for it.
async fn the_ffmpeg(root: &std::path::Path, not: &[i32]) -> (i32, u64) {
    eventually("an FFmpeg in /proc", Duration::from_secs(20), || async {
        let pids: Vec<i32> = ffmpegs_under(root)
            .into_iter()
            .filter(|p| !not.contains(p))
            .collect();
        match pids.as_slice() {
            [pid] => Some((*pid, farm_tests::procs::process_start_time(*pid)?)),
            _ => None,
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_every_ffmpeg_removes_folders_releases_leases_and_deregisters() {
    let mut farm = Farm::one_node(&[("a", "/a.ts"), ("b", "/b.ts")]).await;
    let [mut node] = farm.take_nodes();
    let (redis, provider, root) = (&farm.redis, farm.provider(), &farm.root);
    for id in ["a", "b"] {
        assert_eq!(
            get(&format!("{}/live/{id}/index.m3u8", node.base_url()))
                .await
                .status,
            200
        );
    }
    assert_eq!(ffmpegs_under(root.path()).len(), 2);
    assert!(exists(redis, "farm:node:n1:alive").await);

    let t0 = Instant::now();
    node.sigterm();
    let status = node
        .wait_exit(Duration::from_secs(20))
        .expect("node exits within 20s");
    println!("graceful shutdown took {:?}", t0.elapsed());
    assert!(status.success(), "{status:?}");
    assert!(ffmpegs_under(root.path()).is_empty(), "no ffmpeg left");
    let left: Vec<_> = std::fs::read_dir(root.path().join("n1"))
        .expect("root")
        .collect();
    assert!(left.is_empty(), "no channel folder left: {left:?}");
    for key in [
        "farm:owner:a",
        "farm:owner:b",
        "farm:stream:a",
        "farm:stream:b",
        "farm:node:n1",
        "farm:node:n1:alive",
        "farm:node:n1:streams",
    ] {
        assert!(!exists(redis, key).await, "{key} removed");
    }
    let mut c = redis.conn().await;
    let nodes: Vec<String> = c.zrange("farm:nodes", 0, -1).await.expect("ZRANGE");
    assert!(nodes.is_empty(), "deregistered: {nodes:?}");
    assert_eq!(
        provider.current_connections(),
        0,
        "upstream connections closed"
    );
    let stopped: Vec<String> = all_keys(redis).await;
    println!("keys after shutdown: {stopped:?}");
    // The node's command stream stays for its next life (commands sent meanwhile are claimed
    // then): the node comes back, and the farm is clean.
    let again = farm_tests::fixtures::node(redis, "n1", root.path(), false, &[]);
    leaves_nothing(redis, &[FarmNode::of(&again)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_the_next_start_kills_the_leftover_ffmpeg_and_removes_its_folder() {
    after_sigkill("auto").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_without_the_sandbox_the_ffmpeg_dies_too_and_the_next_start_sweeps() {
    after_sigkill("off").await;
}

/// kill -9 of `node`: its FFmpeg `(pid, start time)`, `what`, is gone within 5 s.
async fn kill9_takes(node: &mut NodeProcess, (pid, start): (i32, u64), what: &str) {
    let killed = Instant::now();
    node.kill9();
    farm_tests::procs::watch_exit(pid, start, Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("{what} {pid} did not die with its node"));
    println!(
        "{what} {pid} gone {:?} after kill -9 of its node",
        killed.elapsed()
    );
}

/// kill -9 of a node takes its FFmpeg with it: one the node restarted (its spawning thread is not
/// the first one), and one of the next incarnation; a leftover planted as an earlier incarnation
/// would leave it is swept by the next start. `sandbox`: the `--ffmpeg-sandbox` spawn path.
async fn after_sigkill(sandbox: &str) {
    let (redis, root) = redis_with_fake_channels(&["c1"]);
    let args = ["--ffmpeg-sandbox", sandbox];
    // A farm has a coordinator: it reaps what no node of the farm would (a stale access entry).
    let _co = farm_tests::coordinator::CoordinatorProcess::spawn(
        farm_tests::coordinator::CoordinatorOpts::new("c1", redis.url())
            .args(coordinator_args(&[("--tick", "500ms")], &["--leader-ttl"])),
    );
    let mut first = node(&redis, "n1", root.path(), true, &args);
    let sandboxed = metric(&first, "farm_node_ffmpeg_sandbox").await;
    println!("--ffmpeg-sandbox {sandbox}: FFmpeg sandboxed = {sandboxed}");
    assert_eq!(sandboxed, if sandbox == "off" { 0.0 } else { 1.0 });
    let url = format!("{}/live/c1/index.m3u8", first.base_url());
    assert_eq!(get_observed(&url).await.status, 200);
    // An FFmpeg restart first: the victim is the FFmpeg the node spawned again.
    let (crashed, _) = the_ffmpeg(root.path(), &[]).await;
    farm_tests::signal::kill9(crashed).expect("kill -9 ffmpeg");
    let (pid, start) = the_ffmpeg(root.path(), &[crashed]).await;
    eventually(
        "the restarted FFmpeg serves",
        Duration::from_secs(10),
        || async {
            (hgetall(&redis, "farm:stream:c1").await.get("restarts")? == "1").then_some(())
        },
    )
    .await;
    // The parent-death signal and the guard take the FFmpeg with its node, even on SIGKILL.
    kill9_takes(&mut first, (pid, start), "the restarted FFmpeg").await;

    // Without that signal (another platform, a wrapper missing) the next start must sweep what is
    // left: start a leftover exactly as an earlier incarnation would have, marker and record included.
    let dir = root.path().join("n1/c1");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut leftover = std::process::Command::new(farm_tests::bins::fake_ffmpeg())
        .args([
            "-i",
            "http://127.0.0.1:9/c1.ts?mode=normal&seg_ms=500",
            "-hls_time",
            "1",
        ])
        .arg("-hls_segment_filename")
        .arg(dir.join("seg_%d.ts"))
        .arg(dir.join("index.m3u8"))
        .env_clear()
        .env("STREAMFARM_CHANNEL_DIR", &dir)
        .current_dir(&dir)
        .process_group(0)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("leftover fake-ffmpeg");
    let pid = leftover.id() as i32;
    let start = farm_tests::procs::process_start_time(pid).expect("start time");
    std::fs::write(dir.join(".ffmpeg.pid"), format!("{pid} {start}\n")).expect("record");
    eventually(
        "the planted leftover runs",
        Duration::from_secs(5),
        || async { ffmpegs_under(root.path()).contains(&pid).then_some(()) },
    )
    .await;

    let t0 = Instant::now();
    let mut second = node(&redis, "n1", root.path(), true, &args);
    eventually(
        "leftover ffmpeg killed",
        Duration::from_secs(10),
        || async { (!ffmpegs_under(root.path()).contains(&pid)).then_some(()) },
    )
    .await;
    println!("leftover swept {:?} after the restart", t0.elapsed());
    assert!(
        leftover.wait().expect("reap").code().is_none(),
        "killed by a signal"
    );
    assert!(
        !root.path().join("n1/c1").exists(),
        "leftover folder removed"
    );
    eventually("old lease released", Duration::from_secs(10), || async {
        (!exists(&redis, "farm:owner:c1").await).then_some(())
    })
    .await;
    // The channel starts again cleanly on the new incarnation (while it starts, viewers get the
    // window the killed incarnation recorded, held).
    let url = format!("{}/live/c1/index.m3u8", second.base_url());
    assert_eq!(get_observed(&url).await.status, 200);
    // The restarted node's FFmpeg dies with it too.
    let ffmpeg = the_ffmpeg(root.path(), &[]).await;
    kill9_takes(&mut second, ffmpeg, "the restarted node's FFmpeg").await;
    // A third incarnation sweeps what the second left in Redis, the coordinator what no node
    // owns (the access entry); then nothing is left.
    let third = node(&redis, "n1", root.path(), true, &args);
    eventually(
        "the second's lease released",
        Duration::from_secs(10),
        || async { (!exists(&redis, "farm:owner:c1").await).then_some(()) },
    )
    .await;
    leaves_nothing(&redis, &[FarmNode::of(&third)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pid_record_pointing_at_an_unrelated_process_leaves_it_alone() {
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    let hls = root.path().join("n1");
    // An unrelated live process, recorded as if it were our FFmpeg: once with its true start time
    // (but no marker), once with a wrong start time (a reused pid). It leads its own process group,
    // like the FFmpegs (and most services) do, so a kill by pid alone would reach it.
    let mut bystander = std::process::Command::new("sleep")
        .arg("300")
        .process_group(0)
        .spawn()
        .expect("sleep");
    let pid = bystander.id() as i32;
    let start = farm_tests::procs::process_start_time(pid).expect("start time");
    for (ch, st) in [("x1", start), ("x2", start + 12345)] {
        std::fs::create_dir_all(hls.join(ch)).expect("mkdir");
        std::fs::write(hls.join(ch).join(".ffmpeg.pid"), format!("{pid} {st}\n")).expect("record");
    }
    {
        let mut c = redis.conn().await;
        let _: () = redis::pipe()
            .sadd("farm:node:n1:streams", "x3")
            .hset_multiple(
                "farm:stream:x3",
                &[
                    ("node", "n1"),
                    ("pid", &pid.to_string()),
                    ("pid_start", &start.to_string()),
                ],
            )
            .query_async(&mut c)
            .await
            .expect("seed");
    }
    let node = node(&redis, "n1", root.path(), true, &[]);
    eventually(
        "sweep done (redis leftovers released)",
        Duration::from_secs(10),
        || async { (!exists(&redis, "farm:stream:x3").await).then_some(()) },
    )
    .await;
    assert!(
        !hls.join("x1").exists() && !hls.join("x2").exists(),
        "leftover folders removed"
    );
    assert!(
        farm_tests::procs::pid_alive(pid) && !farm_tests::procs::is_zombie(pid),
        "the bystander lives"
    );
    assert!(
        bystander.try_wait().expect("try_wait").is_none(),
        "the bystander was not killed"
    );
    assert!(node.log().contains("farm-node starting"));
    bystander.kill().expect("kill bystander");
    bystander.wait().expect("reap bystander");
    leaves_nothing(&redis, &[FarmNode::of(&node)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_min_free_a_start_is_refused_with_a_clear_error_and_nothing_runs() {
    let farm = Farm::builder()
        .provider_channel("big", "/big.ts")
        .nodes(&["n1"])
        .node_args(&["--min-free", "1000000T"])
        .start()
        .await;
    let (redis, provider, root) = (&farm.redis, farm.provider(), &farm.root);
    let node = farm.node("n1");
    let r = get(&format!("{}/live/big/index.m3u8", node.base_url())).await;
    println!("{} {}", r.status, r.text().trim());
    assert_eq!(r.status, 507);
    assert!(r.text().contains("min_free"), "{}", r.text());
    assert!(ffmpegs_under(root.path()).is_empty());
    assert_eq!(
        provider.total_connections(),
        0,
        "nothing read from upstream"
    );
    assert!(!exists(redis, "farm:owner:big").await, "no lease taken");
    assert!(!exists(redis, "farm:stream:big").await);
    assert!(!root.path().join("n1/big").exists());
    assert_eq!(metric(node, "farm_node_ffmpeg_spawns_total").await, 0.0);
    leaves_nothing(redis, &[FarmNode::of(node)]).await;
}
