//! The README's run command (`deploy/local/run`): it starts redis, a node and a live demo source,
//! prints a playback URL that plays, and Ctrl-C leaves no process behind.

use farm_tests::fixtures::get;
use farm_tests::hls::HlsClient;
use farm_tests::ports::free_port;
use farm_tests::procs;
use farm_tests::wait::eventually;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_command_serves_the_demo_channel_and_ctrl_c_stops_everything() {
    let state = tempfile::tempdir().expect("tempdir");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/run");
    let (port, redis_port, source_port) = (free_port(), free_port(), free_port());
    let mut child = Command::new("bash")
        .arg(&script)
        .env("FARM_BIN_DIR", farm_tests::bins::bin_dir())
        .env("STATE_DIR", state.path())
        .env("PORT", port.to_string())
        .env("REDIS_PORT", redis_port.to_string())
        .env("SOURCE_PORT", source_port.to_string())
        .env("NODE_PORT", free_port().to_string())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .expect("run deploy/local/run");
    let stdout = child.stdout.take().expect("stdout");
    // Keep reading to the end, so the launcher never writes into a closed pipe.
    let (tx, rx) = tokio::sync::oneshot::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("run: {line}");
            if let Some(u) = line.strip_prefix("playback: ") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(u.trim().to_string());
                }
            }
        }
    });
    let url = tokio::time::timeout(Duration::from_secs(120), rx)
        .await
        .expect("the run command prints a playback URL within 120 s")
        .expect("a playback line");
    assert_eq!(url, format!("http://127.0.0.1:{port}/live/demo/index.m3u8"));

    // The first request starts the channel; a live UDP source may need a retry while it probes.
    eventually(
        "the demo channel plays",
        Duration::from_secs(40),
        || async { (get(&url).await.status == 200).then_some(()) },
    )
    .await;
    let report = HlsClient::new(&url)
        .pull(Duration::from_secs(4), Duration::from_secs(30))
        .await
        .expect("pull");
    assert!(report.segments >= 2 && report.gaps == 0, "{report:?}");

    // Ctrl-C to the launcher's process group, as a terminal sends it.
    farm_tests::signal::send_group(child.id() as i32, farm_tests::signal::Sig::INT)
        .expect("SIGINT");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    println!("launcher exited: {status:?}");
    reader.join().expect("reader");
    let needles = [
        state.path().to_string_lossy().to_string(),
        format!("udp://127.0.0.1:{source_port}"),
        format!("127.0.0.1:{redis_port}"), // redis-server retitles itself "redis-server 127.0.0.1:<port>"
    ];
    eventually(
        "no process of the launcher left",
        Duration::from_secs(15),
        || async {
            let left: Vec<_> = needles
                .iter()
                .flat_map(|n| procs::processes_with_cmdline_containing(n))
                .collect();
            if !left.is_empty() {
                println!("still running: {left:?}");
            }
            left.is_empty().then_some(())
        },
    )
    .await;
}

/// `deploy/local/run &` from a script, then SIGTERM: the launcher was started with SIGINT ignored
/// (as every background job of a non-interactive shell is), yet SIGTERM stops everything it
/// started, FFmpegs included (checked in /proc), in order, redis-server last, and it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_command_in_the_background_stops_everything_on_sigterm_redis_last() {
    use farm_tests::launch::{assert_orderly_stop, Launched};

    let state = tempfile::tempdir().expect("tempdir");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/run");
    let (port, redis_port, source_port, node_port) =
        (free_port(), free_port(), free_port(), free_port());
    let env = [
        (
            "FARM_BIN_DIR",
            farm_tests::bins::bin_dir().display().to_string(),
        ),
        ("PORT", port.to_string()),
        ("REDIS_PORT", redis_port.to_string()),
        ("SOURCE_PORT", source_port.to_string()),
        ("NODE_PORT", node_port.to_string()),
        ("FARM_HLS_TIME", "1s".to_string()),
    ];
    let run = Launched::in_background(&script, &[], &env, state.path());
    assert!(
        run.ignores_sigint(),
        "started as `run &` from a script, the launcher has SIGINT ignored"
    );
    let (_, line) = run
        .stdout_line("a playback URL", Duration::from_secs(120), |l| {
            l.starts_with("playback: ")
        })
        .await;
    let url = line.trim_start_matches("playback: ").trim().to_string();
    assert_eq!(url, format!("http://127.0.0.1:{port}/live/demo/index.m3u8"));
    eventually(
        "the demo channel plays",
        Duration::from_secs(40),
        || async { (get(&url).await.status == 200).then_some(()) },
    )
    .await;
    let report = HlsClient::new(&url)
        .pull(Duration::from_secs(2), Duration::from_secs(30))
        .await
        .expect("pull");
    assert!(report.segments >= 2, "{report:?}");

    let tracked = run.farm_processes();
    println!("tracked: {tracked:?}");
    assert!(
        tracked.iter().any(|t| t.name == "node1/ffmpeg"),
        "the demo's FFmpeg runs before the stop: {tracked:?}"
    );
    let (run, report) = tokio::task::spawn_blocking(move || {
        let mut run = run;
        let report = run.sigterm_and_watch(Duration::from_secs(60));
        (run, report)
    })
    .await
    .expect("join");
    println!("launcher exit status {:?}", report.exit_status);
    assert_orderly_stop(&report, state.path());
    assert!(
        report.gone.iter().any(|(t, _)| t.name == "launcher/bash"),
        "deploy/local/cluster, run's child, was tracked and stopped: {report:?}"
    );
    drop(run);
    for p in [port, redis_port, node_port] {
        assert!(
            std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, p)).is_ok(),
            "port {p} is still taken"
        );
    }
}
