//! The one-machine cluster launcher (`deploy/local/cluster`): redis, 3 farm-nodes, two coordinators
//! and nginx (shipped config) in front; it prints exactly one `ready <nginx URL> <redis URL>` line,
//! the demo channel plays through nginx (bytes sent by nginx from a node's disk), and Ctrl-C
//! (SIGINT to its process group) leaves no process behind.

use farm_tests::hls::HlsClient;
use farm_tests::nginx::AccessEntry;
use farm_tests::ports::free_port;
use farm_tests::procs;
use farm_tests::signal;
use farm_tests::wait::eventually;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The launcher's process group: on drop (a failed assertion included) it gets the Ctrl-C a
/// terminal would send, then SIGKILL after a grace, and the launcher is reaped.
struct Launched(Option<Child>);

impl Launched {
    fn pgid(&self) -> i32 {
        self.0.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Sends SIGINT to the group and waits for the launcher to exit.
    fn interrupt_and_wait(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.0.take()?;
        let pgid = child.id() as i32;
        let _ = signal::send_group(pgid, signal::Sig::INT);
        let status = wait_child(&mut child, Duration::from_secs(30));
        if status.is_none() {
            let _ = signal::send_group(pgid, signal::Sig::KILL);
            let _ = child.wait();
        }
        status
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        self.interrupt_and_wait();
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    farm_tests::wait::poll_until(timeout, || child.try_wait().ok().flatten())
}

/// A port such that it and the `n - 1` ports after it were free a moment ago.
fn free_port_run(n: u16) -> u16 {
    loop {
        let p = free_port();
        if p.checked_add(n).is_none() {
            continue;
        }
        let all_free = (p..p + n).all(|q| TcpListener::bind((Ipv4Addr::LOCALHOST, q)).is_ok());
        if all_free {
            return p;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_launcher_serves_the_demo_through_nginx_from_three_nodes_and_ctrl_c_stops_all() {
    let state = tempfile::tempdir().expect("tempdir");
    let script = farm_tests::nginx::repo_root().join("deploy/local/cluster");
    let (port, redis_port, source_port) = (free_port(), free_port(), free_port());
    let node_port = free_port_run(5); // 3 nodes + 2 coordinators
    let began = Instant::now();
    let mut child = Command::new("bash")
        .arg(&script)
        .args(["--nodes", "3", "--port", &port.to_string()])
        .args(["--redis-port", &redis_port.to_string()])
        .env("FARM_BIN_DIR", farm_tests::bins::bin_dir())
        .env("STATE_DIR", state.path())
        .env("SOURCE_PORT", source_port.to_string())
        .env("NODE_PORT", node_port.to_string())
        .env_remove("FARM_TOKEN_SECRET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .expect("run deploy/local/cluster");
    let stdout = child.stdout.take().expect("stdout");
    let launched = Launched(Some(child));
    let (tx, rx) = tokio::sync::oneshot::channel::<String>();
    // Keep reading to the end so the launcher never writes into a closed pipe; keep every line.
    let reader = std::thread::spawn(move || {
        let mut tx = Some(tx);
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("cluster stdout: {line}");
            if let Some(tx) = tx.take() {
                let _ = tx.send(line.clone());
            }
            lines.push(line);
        }
        lines
    });
    let ready = tokio::time::timeout(Duration::from_secs(120), rx)
        .await
        .expect("the launcher prints its ready line within 120 s")
        .expect("a ready line");
    println!("ready after {:?}", began.elapsed());
    let base = format!("http://127.0.0.1:{port}");
    let redis_url = format!("redis://127.0.0.1:{redis_port}/");
    assert_eq!(ready, format!("ready {base} {redis_url}"));

    // All three nodes are up and registered; the coordinators elected a leader.
    let client = redis::Client::open(redis_url.as_str()).expect("redis url");
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the cluster's redis");
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
    let url = format!("{base}/live/demo/index.m3u8");
    let http = reqwest::Client::new();
    let started = Instant::now();
    eventually(
        "the demo plays through nginx",
        Duration::from_secs(40),
        || async {
            let r = http.get(&url).send().await.ok()?;
            (r.status() == 200).then_some(())
        },
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
    let from_disk: u64 = segs
        .iter()
        .filter(|e| e.via == "disk")
        .map(|e| e.bytes)
        .sum();
    println!(
        "demo runs on {owner}; nginx sent {} of {} segment requests ({from_disk} bytes) from disk",
        segs.iter().filter(|e| e.via == "disk").count(),
        segs.len()
    );
    assert!(
        !segs.is_empty() && segs.iter().all(|e| e.via == "disk"),
        "{segs:?}"
    );

    // Ctrl-C to the launcher's process group, as a terminal sends it.
    let pgid = launched.pgid();
    let stopping = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let mut launched = launched;
        launched.interrupt_and_wait()
    })
    .await
    .expect("join")
    .expect("the launcher exits within 30 s of Ctrl-C");
    println!(
        "launcher (group {pgid}) exited {status:?} after {:?}",
        stopping.elapsed()
    );
    let lines = reader.join().expect("reader");
    assert_eq!(lines, [ready], "stdout carries exactly the ready line");
    let needles = [
        state.path().to_string_lossy().to_string(),
        format!("udp://127.0.0.1:{source_port}"),
        format!("--port {redis_port}"),
    ];
    eventually(
        "no process of the launcher left",
        Duration::from_secs(15),
        || async {
            let left: Vec<_> = needles
                .iter()
                .flat_map(|n| procs::processes_with_cmdline_containing(n))
                .collect();
            left.is_empty().then_some(())
        },
    )
    .await;
    for p in [port, redis_port, node_port, node_port + 1, node_port + 2] {
        assert!(
            TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok(),
            "port {p} is still taken"
        );
    }
}
