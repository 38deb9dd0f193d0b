//! The one-machine cluster launcher (`deploy/local/cluster`): redis, 3 farm-nodes, two coordinators
//! and nginx (shipped config) in front; it prints exactly one `ready <nginx URL> <redis URL>` line,
//! the demo channel plays through nginx (bytes sent by nginx from a node's disk), and Ctrl-C
//! (SIGINT to its process group) leaves no process behind. It supervises: a node killed with -9 is
//! restarted while the rest of the farm runs on, and its files are removed before that (nginx
//! sends files from every node's folder); SIGTERM to it in the background stops everything in order.

use farm_tests::hls::HlsClient;
use farm_tests::launch::{script, uptime_ticks, wait_200, LaunchPorts, Launched, Mode, Tracked};
use farm_tests::nginx::{sent_via, AccessEntry};
use farm_tests::procs;
use farm_tests::wait::{eventually, eventually_with};
use redis::AsyncCommands;
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_launcher_serves_the_demo_through_nginx_from_three_nodes_and_ctrl_c_stops_all() {
    let state = tempfile::tempdir().expect("tempdir");
    let ports = LaunchPorts::free();
    let began = Instant::now();
    let launched = Launched::start(
        Mode::Foreground,
        &script("cluster"),
        &ports.cluster_args(),
        &ports.env(&[]),
        state.path(),
    );
    let (_, ready) = launched
        .stdout()
        .first(
            "the launcher's first line",
            Duration::from_secs(120),
            |_| true,
        )
        .await;
    println!("ready after {:?}", began.elapsed());
    assert_eq!(ready, ports.ready_line());

    // All three nodes are up and registered; the coordinators elected a leader.
    let mut redis = ports.redis().await;
    let mut nodes: Vec<String> = redis::cmd("ZRANGE")
        .arg("farm:nodes")
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .expect("ZRANGE");
    nodes.sort();
    assert_eq!(nodes, ["node1", "node2", "node3"]);
    let coordinators = farm_tests::bins::bin_dir()
        .join("farm-coordinator")
        .is_file();
    if coordinators {
        let leader = eventually("a coordinator to lead", Duration::from_secs(15), || {
            let mut r = redis.clone();
            async move {
                let v: Option<String> = redis::cmd("GET")
                    .arg("farm:leader")
                    .query_async(&mut r)
                    .await
                    .ok()?;
                v
            }
        })
        .await;
        println!("leader: {leader}");
    }

    // A player plays the demo channel through nginx (the first requests start it on a node; a
    // live UDP source needs a few seconds of probing).
    let url = ports.demo_url();
    let http = reqwest::Client::new();
    let started = Instant::now();
    wait_200(
        &http,
        "the demo plays through nginx",
        &url,
        Duration::from_secs(40),
    )
    .await;
    println!("first playlist after {:?}", started.elapsed());
    let report = HlsClient::new(&url)
        .pull(Duration::from_secs(6), Duration::from_secs(40))
        .await
        .expect("pull through nginx");
    println!("through nginx: {report:?}");
    assert!(report.segments >= 2 && report.gaps == 0, "{report:?}");
    let owner: String = redis::cmd("HGET")
        .arg("farm:stream:demo")
        .arg("node")
        .query_async(&mut redis)
        .await
        .expect("HGET");
    let log = std::fs::read_to_string(state.path().join("nginx/logs/access.log")).expect("log");
    let segs: Vec<AccessEntry> = log
        .lines()
        .filter_map(AccessEntry::parse)
        .filter(|e| e.path.starts_with("/live/demo/seg") && e.status == 200)
        .collect();
    let (from_disk, disk_bytes) = sent_via(&segs, "disk");
    println!(
        "demo runs on {owner}; nginx sent {from_disk} of {} segment requests ({disk_bytes} bytes) from disk",
        segs.len()
    );
    assert!(!segs.is_empty() && from_disk == segs.len(), "{segs:?}");

    // Ctrl-C to the launcher's process group, as a terminal sends it.
    let pgid = launched.pid();
    let stopping = Instant::now();
    let (mut launched, status) = tokio::task::spawn_blocking(move || {
        let mut launched = launched;
        let status = launched.interrupt(Duration::from_secs(30));
        (launched, status)
    })
    .await
    .expect("join");
    let status = status.expect("the launcher exits within 30 s of Ctrl-C");
    println!(
        "launcher (group {pgid}) exited {status:?} after {:?}",
        stopping.elapsed()
    );
    assert!(
        launched.wait_stdout_closed(Duration::from_secs(15)),
        "the launcher's stdout is closed after it exited"
    );
    let lines: Vec<String> = launched
        .stdout()
        .snapshot()
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    assert_eq!(lines, [ready], "stdout carries exactly the ready line");
    ports.wait_none_left(state.path()).await;
    drop(launched);
    ports.assert_released(3);
}

/// How many probe answers the test collects before the kill and after the restart.
const PROBES_AROUND: usize = 20;

/// What a probe request through nginx got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// The file planted in the killed node's folder.
    Stale,
    /// The same path in node3's folder.
    Live,
    Other(u16),
    Failed,
}

/// `kill -9` of the node that runs the demo: the launcher and the rest of the farm run on, the
/// node's leftovers are removed and it is restarted (new pid, healthz, heartbeat in Redis), and
/// nginx never sends its files once the launcher has reported the death.
///
/// What "before nginx could serve them" is measured against: nginx sends a file from the first
/// node folder that has it, after an auth subrequest to the node of the last folder that has it.
/// A path planted in node1's and node3's folders is therefore sent from node1's (the control
/// below shows it) with node3's consent, also while node1 is dead: the worst case, like a channel
/// that failed over from node1 to node3 while node1's old files stay on disk. A prober asks for
/// that path through nginx every 5 ms; the test prints how long after the kill node1's copy was
/// still sent (the launcher's reaction time) and asserts that no request started after the
/// launcher's "died" line got it. "Gone before the new process starts" is checked against the
/// kernel: the boot-time clock when the test saw the folder gone vs the new process's start time
/// in /proc, and the new process's own start-up sweep finds nothing to remove.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_9_is_restarted_after_its_files_are_removed_and_sigterm_stops_all_in_order(
) {
    let state = tempfile::tempdir().expect("tempdir");
    let ports = LaunchPorts::free();
    // Read by the nodes and coordinators from the environment the launcher passes on.
    let env = [
        ("FARM_NODE_TTL", "3s".to_string()),
        ("FARM_LEASE_TTL", "3s".to_string()),
        ("FARM_TICK", "500ms".to_string()),
        ("FARM_HLS_TIME", "1s".to_string()),
    ];
    let farm = Launched::cluster(&ports, &env, state.path()).await;
    let (base, node_port) = (ports.base_url(), ports.node);
    let redis = ports.redis().await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client");

    // The demo runs on node1: its first request, sent to node1 itself, makes node1 claim it.
    let node1_url = format!("http://127.0.0.1:{node_port}");
    wait_200(
        &http,
        "node1 plays the demo",
        &format!("{node1_url}/live/demo/index.m3u8"),
        Duration::from_secs(60),
    )
    .await;
    let hget = |key: String, field: &'static str| {
        let mut r = redis.clone();
        async move {
            redis::cmd("HGET")
                .arg(key)
                .arg(field)
                .query_async::<Option<String>>(&mut r)
                .await
                .ok()
                .flatten()
        }
    };
    assert_eq!(
        hget("farm:stream:demo".into(), "node").await.as_deref(),
        Some("node1")
    );
    let old_pid = farm.pids()["node1"];
    assert_eq!(
        hget("farm:node:node1".into(), "pid").await,
        Some(old_pid.to_string()),
        "the pids file and Redis agree on node1's pid"
    );
    let ffmpeg_pid: i32 = hget("farm:stream:demo".into(), "pid")
        .await
        .and_then(|p| p.parse().ok())
        .expect("the demo's FFmpeg pid");
    let ffmpeg = Tracked {
        name: "node1's FFmpeg".into(),
        pid: ffmpeg_pid,
        start: procs::process_start_time(ffmpeg_pid).expect("the demo's FFmpeg runs"),
    };
    let others: Vec<Tracked> = farm
        .farm_processes()
        .into_iter()
        .filter(|t| !t.name.starts_with("node1"))
        .collect();

    // The planted file, in node1's folder and (other bytes) in node3's.
    let root = |i: u32| state.path().join(format!("node{i}/hls"));
    let nonce = format!("{}-{}", std::process::id(), node_port);
    let stale = format!("STALE node1 {nonce}");
    let live = format!("LIVE node3 {nonce}");
    for (i, body) in [(1, &stale), (3, &live)] {
        std::fs::create_dir_all(root(i).join("probe")).expect("mkdir");
        std::fs::write(root(i).join("probe/planted.ts"), body).expect("plant");
    }
    let probe_url = format!("{base}/live/probe/planted.ts");
    let classify = |status: u16, body: &str| match (status, body) {
        (200, b) if b == stale => Probe::Stale,
        (200, b) if b == live => Probe::Live,
        (s, _) => Probe::Other(s),
    };
    let control = http.get(&probe_url).send().await.expect("probe");
    let status = control.status().as_u16();
    let body = control.text().await.unwrap_or_default();
    assert_eq!(
        classify(status, &body),
        Probe::Stale,
        "control: nginx sends node1's copy while it is on disk ({status} {body:?})"
    );

    // A process that outlived node1 in one of its channel folders, as an FFmpeg does when the
    // parent-death signal is missing (no setpriv): identified like the node's sweep does it, by the
    // channel folder in its environment. The launcher must kill it before removing the folder.
    let mut survivor = Command::new("sleep")
        .arg("600")
        .env_clear()
        .env("STREAMFARM_CHANNEL_DIR", root(1).join("probe"))
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn the stand-in leftover");

    // Watchers: the folder on disk (every 1 ms), and requests through nginx (every 5 ms).
    let stop = Arc::new(AtomicBool::new(false));
    let disk = {
        let (probe_dir, demo_dir, stop) =
            (root(1).join("probe"), root(1).join("demo"), stop.clone());
        std::thread::spawn(move || {
            let mut gone: Option<(Instant, u64)> = None;
            while !stop.load(Ordering::Relaxed) && gone.is_none() {
                if !probe_dir.exists() && !demo_dir.exists() {
                    gone = Some((Instant::now(), uptime_ticks()));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            gone
        })
    };
    let probes = Arc::new(AtomicUsize::new(0));
    let prober = {
        let (http, url, stop) = (http.clone(), probe_url.clone(), stop.clone());
        let (stale, live, probes) = (stale.clone(), live.clone(), probes.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let began = Instant::now();
                let got = match http.get(&url).send().await {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        match (s, r.text().await.unwrap_or_default()) {
                            (200, b) if b == stale => Probe::Stale,
                            (200, b) if b == live => Probe::Live,
                            _ => Probe::Other(s),
                        }
                    }
                    Err(_) => Probe::Failed,
                };
                seen.push((began, got));
                probes.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen
        })
    };
    // Some requests before the kill.
    let some_probes = |what: &'static str, after: usize| {
        let probes = probes.clone();
        eventually(what, Duration::from_secs(10), move || {
            let n = probes.load(Ordering::Relaxed);
            async move { (n >= after + PROBES_AROUND).then_some(n) }
        })
    };
    some_probes("probes through nginx before the kill", 0).await;

    let killed = Instant::now();
    farm_tests::signal::kill9(old_pid).expect("kill -9 node1");
    let (noticed, died) = farm
        .stderr()
        .first(
            "the launcher reports node1's death",
            Duration::from_secs(10),
            |l| l.contains(&format!("node1 pid {old_pid} died")),
        )
        .await;
    assert!(
        died.contains("SIGKILL") && died.contains("status 137"),
        "{died}"
    );
    assert!(died.contains("killed 1 leftover FFmpeg"), "{died}");
    let survivor_gone = farm_tests::wait::poll_until(Duration::from_secs(5), || {
        survivor.try_wait().ok().flatten()
    });
    assert!(
        survivor_gone.is_some(),
        "the process left in node1's channel folder was killed"
    );
    let (restarted, line) = farm
        .stderr()
        .first("node1 started again", Duration::from_secs(20), |l| {
            l.contains("started node1 pid") && !l.ends_with(&format!(" pid {old_pid}"))
        })
        .await;
    let new_pid: i32 = line
        .rsplit(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("new pid");
    let new_start = procs::process_start_time(new_pid).expect("the new node1 runs");
    assert_ne!(new_pid, old_pid);
    assert_eq!(
        farm.pids()["node1"],
        new_pid,
        "the pids file names the new node1"
    );
    wait_200(
        &http,
        "node1 answers healthz again",
        &format!("{node1_url}/healthz"),
        Duration::from_secs(20),
    )
    .await;
    let healthy = Instant::now();
    eventually_with(
        &redis,
        "node1 heartbeats again in Redis",
        Duration::from_secs(20),
        |mut r| {
            let hget = hget("farm:node:node1".into(), "pid");
            async move {
                let alive: bool = r.exists("farm:node:node1:alive").await.ok()?;
                (alive && hget.await == Some(new_pid.to_string())).then_some(())
            }
        },
    )
    .await;
    let heartbeat = Instant::now();
    let answered = probes.load(Ordering::Relaxed);
    some_probes("probes through nginx after the restart", answered).await;
    stop.store(true, Ordering::Relaxed);
    let seen = prober.await.expect("prober");
    let removed = disk.join().expect("disk watcher");

    let ms = |t: Instant| t.duration_since(killed).as_secs_f64() * 1e3;
    let (removed_at, removed_ticks) =
        removed.expect("node1's channel folders were removed while the test watched");
    let after_kill: Vec<_> = seen.iter().filter(|(t, _)| *t >= killed).collect();
    let stale_after_kill: Vec<_> = after_kill
        .iter()
        .filter(|(_, p)| *p == Probe::Stale)
        .collect();
    let last_stale = stale_after_kill.last().map(|(t, _)| ms(*t));
    println!(
        "kill -9 node1 (pid {old_pid}) -> folders gone {:.1} ms, launcher's 'died' line {:.1} ms, \
         new pid {new_pid} started {:.1} ms, healthz {:.1} ms, heartbeat in Redis {:.1} ms",
        ms(removed_at),
        ms(noticed),
        ms(restarted),
        ms(healthy),
        ms(heartbeat)
    );
    println!(
        "probe requests through nginx after the kill: {} ({} got node1's stale copy, the last one \
         sent {:?} ms after the kill; the others: {:?})",
        after_kill.len(),
        stale_after_kill.len(),
        last_stale,
        after_kill
            .iter()
            .map(|(_, p)| *p)
            .filter(|p| *p != Probe::Stale)
            .fold(BTreeMap::<String, usize>::new(), |mut m, p| {
                *m.entry(format!("{p:?}")).or_default() += 1;
                m
            })
    );
    for (t, p) in &seen {
        assert!(
            !(*t >= noticed && *p == Probe::Stale),
            "a request started {:.1} ms after the kill (the launcher reported the death at {:.1} ms) got node1's stale file",
            ms(*t),
            ms(noticed)
        );
    }
    assert!(
        seen.iter().any(|(t, p)| *t >= noticed && *p == Probe::Live),
        "after the death nginx sends node3's copy"
    );
    println!(
        "boot clock when the folder was seen gone: {removed_ticks} ticks; the new node1 started at {new_start} ticks"
    );
    assert!(
        removed_ticks < new_start,
        "node1's folders were still there when the new node1 started"
    );
    // The node logs its start-up sweep of the HLS folder (only when it removed something) before
    // "farm-node starting": between the two incarnations' start lines.
    let log = std::fs::read_to_string(state.path().join("node1.log")).expect("node1.log");
    let starts: Vec<usize> = log
        .match_indices("farm-node starting")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(starts.len(), 2, "two incarnations in node1.log");
    let between = &log[starts[0]..starts[1]];
    assert!(
        !between.contains("start-up sweep of the HLS folder"),
        "the new node1's start-up sweep found leftovers in its folder:\n{between}"
    );
    println!(
        "the new node1's start-up sweep of redis: {:?}",
        log[starts[1]..]
            .lines()
            .find(|l| l.contains("start-up sweep of redis leftovers"))
    );
    assert!(procs::pid_alive(farm.pid()), "the launcher runs on");
    for t in &others {
        assert!(
            t.alive(),
            "{} (pid {}) was stopped by node1's death",
            t.name,
            t.pid
        );
    }
    assert!(
        !ffmpeg.alive(),
        "the killed node's FFmpeg (pid {ffmpeg_pid}) is gone"
    );

    // The farm serves the demo again (node1's restart released its leases).
    let url = ports.demo_url();
    wait_200(
        &http,
        "the demo plays through nginx again",
        &url,
        Duration::from_secs(60),
    )
    .await;
    let report = HlsClient::new(&url)
        .pull(Duration::from_secs(3), Duration::from_secs(40))
        .await
        .expect("pull through nginx");
    assert!(report.segments >= 2, "{report:?}");

    // SIGTERM to the launcher in the background: everything stops, in order.
    let tracked = farm.farm_processes();
    assert!(
        tracked
            .iter()
            .any(|t| t.name.starts_with("node") && t.name.ends_with("/ffmpeg")),
        "a channel's FFmpeg runs before the stop: {tracked:?}"
    );
    farm.stop_in_order().await;
    ports.assert_released(3);
}
