//! The README's run command (`deploy/local/run`): it starts redis, a node and a live demo source,
//! prints a playback URL that plays, and Ctrl-C leaves no process behind.

use farm_tests::hls::{HlsClient, PullReport};
use farm_tests::launch::{script, wait_200, LaunchPorts, Launched, Mode};
use std::time::Duration;

/// Waits for the run command's playback URL (the demo channel through nginx on `ports`), for the
/// channel to play (the first request starts it; a live UDP source may need a retry while it
/// probes), and pulls it for `pull`.
async fn demo_plays(run: &Launched, ports: &LaunchPorts, pull: Duration) -> PullReport {
    let (_, line) = run
        .stdout()
        .first("a playback URL", Duration::from_secs(120), |l| {
            l.starts_with("playback: ")
        })
        .await;
    let url = line.trim_start_matches("playback: ").trim().to_string();
    assert_eq!(url, ports.demo_url());
    let http = farm_tests::fixtures::client();
    wait_200(
        &http,
        "the demo channel plays",
        &url,
        Duration::from_secs(40),
    )
    .await;
    HlsClient::new(&url)
        .pull(pull, Duration::from_secs(30))
        .await
        .expect("pull")
}

/// `deploy/local/run` started in `mode` with `extra` environment, in a new state folder.
fn run(mode: Mode, extra: (&'static str, &str)) -> (tempfile::TempDir, LaunchPorts, Launched) {
    let state = tempfile::tempdir().expect("tempdir");
    let ports = LaunchPorts::free();
    let env = ports.run_env(&[(extra.0, extra.1.to_string())]);
    let run = Launched::start(mode, &script("run"), &[], &env, state.path());
    (state, ports, run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_command_serves_the_demo_channel_and_ctrl_c_stops_everything() {
    let (state, ports, run) = run(Mode::Foreground, ("NO_COLOR", "1"));
    let report = demo_plays(&run, &ports, Duration::from_secs(4)).await;
    assert!(report.segments >= 2 && report.gaps == 0, "{report:?}");

    // Ctrl-C to the launcher's process group, as a terminal sends it.
    let (run, status) = tokio::task::spawn_blocking(move || {
        let mut run = run;
        let status = run.interrupt(Duration::from_secs(60));
        let closed = run.wait_stdout_closed(Duration::from_secs(15));
        assert!(closed, "the launcher's stdout is closed after it exited");
        (run, status)
    })
    .await
    .expect("join");
    println!("launcher exited: {status:?}");
    assert!(status.is_some(), "the launcher exits within 60 s of Ctrl-C");
    ports.wait_none_left(state.path()).await;
    drop(run);
}

/// `deploy/local/run &` from a script, then SIGTERM: the launcher was started with SIGINT ignored
/// (as every background job of a non-interactive shell is), yet SIGTERM stops everything it
/// started, FFmpegs included (checked in /proc), in order, redis-server last, and it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_command_in_the_background_stops_everything_on_sigterm_redis_last() {
    let (_state, ports, run) = run(Mode::Background, ("FARM_HLS_TIME", "1s"));
    assert!(
        run.ignores_sigint(),
        "started as `run &` from a script, the launcher has SIGINT ignored"
    );
    let report = demo_plays(&run, &ports, Duration::from_secs(2)).await;
    assert!(report.segments >= 2, "{report:?}");

    let tracked = run.farm_processes();
    println!("tracked: {tracked:?}");
    assert!(
        tracked.iter().any(|t| t.name == "node1/ffmpeg"),
        "the demo's FFmpeg runs before the stop: {tracked:?}"
    );
    let report = run.stop_in_order().await;
    assert!(
        report.gone.iter().any(|(t, _)| t.name == "launcher/bash"),
        "deploy/local/cluster, run's child, was tracked and stopped: {report:?}"
    );
    ports.assert_released(1);
}
