//! Proves the harness itself works against the real services (redis-server, ffmpeg/ffprobe, the fake
//! provider, fake-ffmpeg) before other tests rely on it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path as AxPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Router;
use futures::StreamExt;

use farm_tests::bins::{bin_path, fake_ffmpeg};
use farm_tests::hls::{ffprobe_codecs, ffprobe_duration, HlsClient, MediaPlaylist, ProbeInput};
use farm_tests::media;
use farm_tests::node::http_status;
use farm_tests::procs;
use farm_tests::provider::{FakeProvider, Mode};
use farm_tests::redis::RedisServer;
use farm_tests::signal;
use farm_tests::ts;
use farm_tests::wait::{eventually, eventually_blocking};

// ---------------------------------------------------------------- wait, ports, bins, procs

#[tokio::test]
async fn eventually_returns_the_value_once_ready() {
    let start = Instant::now();
    let mut calls = 0;
    let v = eventually("third call", Duration::from_secs(5), || {
        calls += 1;
        let ready = calls >= 3;
        async move { ready.then_some(42) }
    })
    .await;
    assert_eq!(v, 42);
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(eventually_blocking("now", Duration::ZERO, || Some(7)), 7);
}

#[tokio::test]
#[should_panic(expected = "timed out after 200ms waiting for the impossible")]
async fn eventually_panics_with_what_it_waited_for() {
    eventually("the impossible", Duration::from_millis(200), || async {
        None::<()>
    })
    .await;
}

#[test]
fn free_port_is_bindable() {
    let port = farm_tests::ports::free_port();
    assert_ne!(port, 0);
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind the free port");
}

#[test]
fn bin_path_finds_fake_ffmpeg_and_explains_missing_ones() {
    assert_eq!(
        fake_ffmpeg(),
        Path::new(env!("CARGO_BIN_EXE_fake-ffmpeg")),
        "bin_path must find the same binary cargo built"
    );
    let err = std::panic::catch_unwind(|| bin_path("no-such-farm-binary"))
        .expect_err("missing binary must panic");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("build it first: cargo build --workspace --bins"),
        "{msg}"
    );
}

#[test]
fn procs_sees_children_zombies_and_start_times() {
    let mut child = Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep");
    let pid = child.id() as i32;
    let me = std::process::id() as i32;
    assert!(procs::pid_alive(pid));
    assert!(procs::children_of(me).contains(&pid));
    assert_eq!(procs::parent_of(pid), Some(me));
    let started = procs::process_start_time(pid).expect("start time");
    assert!(started >= procs::process_start_time(me).expect("own start time"));
    let found = procs::processes_with_cmdline_containing("sleep 30");
    assert!(
        found.iter().any(|(p, c)| *p == pid && c == "sleep 30"),
        "{found:?}"
    );

    // Killed but not waited for: a zombie of ours.
    signal::kill9(pid).expect("kill sleep");
    eventually_blocking(
        "the child to become a zombie",
        Duration::from_secs(5),
        || procs::is_zombie(pid).then_some(()),
    );
    assert!(!procs::pid_alive(pid));
    assert_eq!(procs::zombies_of(me), vec![pid]);
    assert!(procs::processes_with_cmdline_containing("sleep 30")
        .iter()
        .all(|(p, _)| *p != pid));
    child.wait().expect("reap");
    assert!(procs::zombies_of(me).is_empty());
    assert_eq!(procs::process_start_time(pid), None);
}

// ---------------------------------------------------------------- redis

#[tokio::test]
async fn redis_server_ping_pause_resume_restart_and_stats() {
    let mut redis = RedisServer::start_with_args(&["--maxmemory-policy", "noeviction"]);
    assert!(redis.url().ends_with(&format!(":{}/", redis.port())));
    assert!(procs::pid_alive(redis.pid()));
    let mut conn = redis.conn().await;
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .expect("PING");
    assert_eq!(pong, "PONG");
    assert_eq!(
        farm_tests::redis::config_get(&mut conn, "maxmemory-policy").await,
        vec!["maxmemory-policy", "noeviction"]
    );
    let () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut conn)
        .await
        .expect("SET");
    for _ in 0..3 {
        let _: Option<String> = redis::cmd("GET")
            .arg("k")
            .query_async(&mut conn)
            .await
            .expect("GET");
    }
    let calls = redis.command_calls().await;
    assert_eq!(calls.get("set"), Some(&1), "{calls:?}");
    assert_eq!(calls.get("get"), Some(&3), "{calls:?}");
    assert!(calls.contains_key("config|get"), "{calls:?}");
    assert!(redis.connected_clients().await >= 1);

    // Paused: the server holds the socket but does not answer.
    redis.pause();
    let paused = tokio::time::timeout(
        Duration::from_millis(300),
        redis::cmd("PING").query_async::<String>(&mut conn),
    )
    .await;
    assert!(
        paused.is_err(),
        "a paused redis must not answer: {paused:?}"
    );
    redis.resume();
    eventually("PING after resume", Duration::from_secs(5), || {
        let mut conn = conn.clone();
        async move {
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .ok()
        }
    })
    .await;

    // SIGKILL: gone; restart: same port, empty (no persistence).
    let (old_pid, port) = (redis.pid(), redis.port());
    redis.kill9();
    assert!(!procs::pid_alive(old_pid));
    assert!(redis.try_conn().await.is_err());
    redis.restart();
    assert_eq!(redis.port(), port);
    assert_ne!(redis.pid(), old_pid);
    let mut conn = redis.conn().await;
    let v: Option<String> = redis::AsyncCommands::get(&mut conn, "k")
        .await
        .expect("GET after restart");
    assert_eq!(v, None);
    let pid = redis.pid();
    drop(redis);
    assert!(
        !procs::pid_alive(pid),
        "drop must kill and reap redis-server"
    );
}

// ---------------------------------------------------------------- media + provider

#[test]
fn source_media_is_ten_seconds_of_h264_and_aac() {
    let path = media::source_ts();
    assert!(path.is_file());
    assert_eq!(path, media::source_ts(), "same path every call");
    let d = media::source_duration();
    assert!(
        (Duration::from_millis(9_900)..=Duration::from_millis(10_100)).contains(&d),
        "{d:?}"
    );
    assert_eq!(ffprobe_codecs(&path), vec!["h264", "aac"]);
    let info = media::source_info();
    assert_eq!(info.bytes.len() % ts::PACKET, 0);
    ts::check_monotonic(&info.bytes).expect("source timestamps");
}

#[tokio::test]
async fn provider_stream_is_probed_as_h264_and_aac_and_counted() {
    let provider = FakeProvider::start().await;
    let url = provider.url("/live/ch1.ts");
    assert_eq!(
        url,
        format!("http://127.0.0.1:{}/live/ch1.ts", provider.port())
    );
    // ffprobe blocks; the provider runs on its own runtime, so blocking here is fine.
    let codecs = tokio::task::spawn_blocking(move || ffprobe_codecs(ProbeInput::Url(&url)))
        .await
        .expect("ffprobe task");
    assert_eq!(codecs, vec!["h264", "aac"]);
    assert_eq!(provider.total_connections_for("/live/ch1.ts"), 1);
    assert_eq!(
        provider.total_connections_for("live/ch1.ts"),
        1,
        "leading / optional"
    );
    eventually(
        "ffprobe's stream to be closed",
        Duration::from_secs(5),
        || async { (provider.current_connections() == 0).then_some(()) },
    )
    .await;
    assert_eq!(provider.total_connections(), 1);
}

#[tokio::test]
async fn provider_modes_answer_403_404_and_per_path_overrides() {
    let provider = FakeProvider::start().await;
    let http = reqwest::Client::new();
    let status = |path: &'static str| {
        let http = http.clone();
        let url = provider.url(path);
        async move {
            http.get(url)
                .send()
                .await
                .expect("GET provider")
                .status()
                .as_u16()
        }
    };
    provider.set_mode(Mode::Forbidden);
    assert_eq!(status("/live/a.ts").await, 403);
    provider.set_path_mode("/live/b.ts", Mode::Normal);
    assert_eq!(status("/live/b.ts").await, 200);
    provider.set_path_mode("/live/a.ts", Mode::NotFound);
    assert_eq!(status("/live/a.ts").await, 404);
    provider.clear_path_mode("/live/a.ts");
    assert_eq!(provider.mode_for("/live/a.ts"), Mode::Forbidden);
    provider.set_mode(Mode::Normal);
    assert_eq!(status("/live/a.ts?token=x").await, 200);
    assert_eq!(provider.total_connections_for("/live/a.ts"), 3);
    assert_eq!(provider.total_connections_for("/live/b.ts"), 1);
    assert_eq!(provider.total_connections(), 4);
    // The sync helper used by NodeProcess reads only the status line of an endless stream.
    assert_eq!(http_status(provider.addr(), "/live/c.ts"), Some(200));
}

#[tokio::test]
async fn provider_connection_counters_go_up_and_back_down() {
    let provider = FakeProvider::start().await;
    let http = reqwest::Client::new();
    let mut streams = Vec::new();
    for path in ["/live/x.ts", "/live/x.ts", "/live/y.ts"] {
        let resp = http
            .get(provider.url(path))
            .send()
            .await
            .expect("GET provider");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers().get("content-type").map(|v| v.as_bytes()),
            Some(&b"video/mp2t"[..])
        );
        let mut body = resp.bytes_stream();
        let first = body.next().await.expect("a chunk").expect("chunk ok");
        assert_eq!(first[0], ts::SYNC);
        streams.push(body);
    }
    assert_eq!(provider.current_connections(), 3);
    assert_eq!(provider.current_connections_for("/live/x.ts"), 2);
    assert_eq!(provider.current_connections_for("/live/y.ts"), 1);
    streams.truncate(1); // drops the second x and the y stream
    eventually("two streams to close", Duration::from_secs(5), || async {
        (provider.current_connections() == 1).then_some(())
    })
    .await;
    assert_eq!(provider.current_connections_for("/live/x.ts"), 1);
    assert_eq!(provider.current_connections_for("/live/y.ts"), 0);
    drop(streams);
    eventually("all streams to close", Duration::from_secs(5), || async {
        (provider.current_connections() == 0).then_some(())
    })
    .await;
    assert_eq!(provider.total_connections(), 3);
    assert_eq!(provider.total_connections_for("/live/x.ts"), 2);
}

#[tokio::test]
async fn provider_drop_stall_and_cut_streams() {
    let provider = FakeProvider::start_with_speed(2.0).await;
    let one_second = media::source_info().bytes_per_second;
    let http = reqwest::Client::new();
    // Each case: `path` switched to `mode`, then a GET of it.
    let get_in_mode = |path: &'static str, mode: Mode| {
        provider.set_path_mode(path, mode);
        let request = http.get(provider.url(path)).send();
        async move { request.await.unwrap_or_else(|e| panic!("GET {path}: {e}")) }
    };

    // Drop: about one second of data, then an abrupt close (an error, not a clean end).
    let mut body = get_in_mode("/drop.ts", Mode::Drop).await.bytes_stream();
    let mut got = 0usize;
    let mut ended_with_error = false;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .expect("drop mode must end the stream")
    {
        match chunk {
            Ok(c) => got += c.len(),
            Err(_) => {
                ended_with_error = true;
                break;
            }
        }
    }
    assert!(ended_with_error, "Drop must abort, not end cleanly");
    assert!(
        (got as f64) > 0.8 * one_second && (got as f64) < 1.5 * one_second,
        "got {got} bytes, one second is {one_second}"
    );

    // Stall: headers, then silence until the mode changes.
    let resp = get_in_mode("/stall.ts", Mode::Stall).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let silent = tokio::time::timeout(Duration::from_millis(500), body.next()).await;
    assert!(silent.is_err(), "a stalled stream must send nothing");
    assert_eq!(provider.current_connections_for("/stall.ts"), 1);
    provider.clear_path_mode("/stall.ts");
    let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .expect("data after the stall ends")
        .expect("a chunk")
        .expect("chunk ok");
    assert_eq!(chunk[0], ts::SYNC);

    // A client that goes away during a stall is noticed (the counter drops) without any data sent.
    let resp = get_in_mode("/stall2.ts", Mode::Stall).await;
    assert_eq!(provider.current_connections_for("/stall2.ts"), 1);
    drop(resp);
    eventually(
        "the stalled client to be uncounted",
        Duration::from_secs(5),
        || async { (provider.current_connections_for("/stall2.ts") == 0).then_some(()) },
    )
    .await;

    // Switching a live stream to Forbidden cuts it.
    provider.set_path_mode("/stall.ts", Mode::Forbidden);
    let cut = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match body.next().await {
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return,
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "Forbidden must cut the stream in flight");
    eventually(
        "cut streams to be uncounted",
        Duration::from_secs(5),
        || async { (provider.current_connections() == 0).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn provider_timestamps_stay_monotonic_across_loops() {
    // 8x pace: 13 s of media (more than one 10 s loop) arrive in about 1.5 s.
    let provider = FakeProvider::start_with_speed(8.0).await;
    let info = media::source_info();
    let want = (13.0 * info.bytes_per_second) as usize;
    let mut body = reqwest::get(provider.url("/live/loop.ts"))
        .await
        .expect("GET provider")
        .bytes_stream();
    let mut data = Vec::with_capacity(want + 64 * 1024);
    let started = Instant::now();
    while data.len() < want {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("stream keeps flowing")
            .expect("stream does not end")
            .expect("chunk ok");
        data.extend_from_slice(&chunk);
    }
    drop(body);
    let elapsed = started.elapsed();
    assert!(
        elapsed > Duration::from_millis(1_000) && elapsed < Duration::from_secs(10),
        "paced at 8x: 13 s of media took {elapsed:?}"
    );
    data.truncate(data.len() / ts::PACKET * ts::PACKET);
    assert!(data.len() > info.bytes.len(), "must cross a loop boundary");
    ts::check_monotonic(&data).expect("timestamps monotonic across the loop");
    ts::check_continuity(&data).expect("continuity counters continue across the loop");
    let scan = ts::scan(&data);
    let longest = scan
        .pes
        .values()
        .map(|t| ts::ts_forward(t.first, t.last))
        .max()
        .expect("PES timestamps");
    assert!(longest > 12 * ts::TS_HZ, "span {longest} ticks");

    // Real ffprobe agrees: about 13 s, with h264 + aac.
    let duration = ffprobe_duration(&data).expect("ffprobe duration");
    assert!(
        (12.0..14.5).contains(&duration),
        "ffprobe duration {duration}"
    );
    assert_eq!(ffprobe_codecs(&data), vec!["h264", "aac"]);
    let capture = tempfile::Builder::new()
        .suffix(".ts")
        .tempfile()
        .expect("temp file");
    std::fs::write(capture.path(), &data).expect("write capture");
    // Real ffmpeg decodes across the loop boundary without a warning (stopping at 12 s: the capture
    // ends in the middle of a frame).
    let decode = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-v", "warning", "-i"])
        .arg(capture.path())
        .args(["-t", "12", "-f", "null", "-"])
        .output()
        .expect("run ffmpeg");
    let warnings = String::from_utf8_lossy(&decode.stderr);
    assert!(
        decode.status.success() && warnings.trim().is_empty(),
        "{warnings}"
    );
}

// ---------------------------------------------------------------- fake-ffmpeg + HLS client

/// argv shaped like the node's FFmpeg command line (see `node/src/ffmpeg.rs`).
fn fake_ffmpeg_cmd(dir: &Path, input: &str, list_size: u32) -> Command {
    fake_ffmpeg_cmd_from(dir, input, list_size, 0)
}

fn fake_ffmpeg_cmd_from(dir: &Path, input: &str, list_size: u32, start_number: u64) -> Command {
    let flags = if start_number > 0 {
        "delete_segments+temp_file+discont_start"
    } else {
        "delete_segments+temp_file"
    };
    let mut cmd = Command::new(fake_ffmpeg());
    cmd.args([
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "level+warning",
        "-y",
    ])
    .args(["-protocol_whitelist", "http,https,tcp,tls"])
    .args(["-rw_timeout", "10000000", "-reconnect", "1"])
    .args(["-i", input])
    .args(["-c", "copy", "-f", "hls", "-hls_time", "1.000"])
    .args(["-hls_list_size", &list_size.to_string()])
    .args(["-hls_delete_threshold", "2", "-hls_flags", flags])
    .args(["-start_number", &start_number.to_string()])
    .arg("-hls_segment_filename")
    .arg(dir.join("seg_%d.ts"))
    .arg(dir.join("index.m3u8"))
    .env_clear()
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd
}

fn segment_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("seg_") && n.ends_with(".ts"))
        .collect();
    names.sort();
    names
}

#[test]
fn fake_ffmpeg_writes_a_rolling_playlist_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = fake_ffmpeg_cmd_from(
        dir.path(),
        "http://127.0.0.1:9/live/x.ts?seg_ms=100&bytes=1000",
        3,
        100,
    )
    .spawn()
    .expect("spawn fake-ffmpeg");
    let pid = child.id() as i32;
    let playlist = dir.path().join("index.m3u8");
    let first = eventually_blocking("the first playlist", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&playlist).ok()?;
        Some(MediaPlaylist::parse(&text).expect("fake-ffmpeg writes valid playlists"))
    });
    assert!(first.media_sequence >= 100, "-start_number");
    for seg in &first.segments {
        // discont_start marks the first segment of this run (while it is still listed).
        assert_eq!(seg.discontinuity, seg.sequence == 100, "{first:?}");
    }
    let pl = eventually_blocking("media sequence 104", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&playlist).ok()?;
        let pl = MediaPlaylist::parse(&text).expect("fake-ffmpeg writes valid playlists");
        (pl.media_sequence >= 104).then_some(pl)
    });
    assert_eq!(pl.version, Some(3));
    assert_eq!(pl.target_duration, 1);
    assert_eq!(pl.segments.len(), 3);
    assert!(!pl.endlist);
    for seg in &pl.segments {
        assert_eq!(seg.uri, format!("seg_{}.ts", seg.sequence));
        assert!((seg.duration - 0.1).abs() < 1e-6);
        assert!(!seg.discontinuity);
    }
    // Old segments are deleted; hls_delete_threshold (2) unlisted ones may linger, like ffmpeg.
    let on_disk = segment_files(dir.path());
    assert!(on_disk.len() <= 3 + 2 + 1, "{on_disk:?}");
    assert!(!dir.path().join("seg_100.ts").exists());
    let listed = dir.path().join(&pl.segments[2].uri);
    if let Ok(meta) = std::fs::metadata(&listed) {
        assert_eq!(meta.len(), 1128, "1000 bytes round up to 6 TS packets");
    }
    let running = procs::processes_with_cmdline_containing(&dir.path().display().to_string());
    assert_eq!(
        running.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        vec![pid]
    );

    signal::term(pid).expect("SIGTERM");
    let status = eventually_blocking("fake-ffmpeg to exit", Duration::from_secs(3), || {
        child.try_wait().expect("try_wait")
    });
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(stderr.contains("fake-ffmpeg: pid"), "{stderr}");
}

#[test]
fn fake_ffmpeg_modes_crash_exit0_fail_and_stall() {
    let run = |query: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        let started = Instant::now();
        let out = fake_ffmpeg_cmd(dir.path(), &format!("http://h/x.ts?{query}"), 5)
            .output()
            .expect("run fake-ffmpeg");
        (out, started.elapsed(), dir)
    };
    let (out, took, dir) = run("mode=crash&after_ms=300&seg_ms=100");
    assert_eq!(out.status.code(), Some(1));
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(
        dir.path().join("index.m3u8").exists(),
        "writes until it crashes"
    );

    let (out, _, _) = run("mode=exit0&after_ms=100");
    assert_eq!(out.status.code(), Some(0));

    let (out, took, dir) = run("mode=fail");
    assert_eq!(out.status.code(), Some(1));
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Server returned 403 Forbidden"));
    assert!(!dir.path().join("index.m3u8").exists());

    // Stall: segments stop after after_ms but the process keeps running.
    let dir = tempfile::tempdir().expect("tempdir");
    let stderr_path = dir.path().join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut child = fake_ffmpeg_cmd(
        dir.path(),
        "http://h/x.ts?mode=stall&after_ms=300&seg_ms=50",
        0,
    )
    .stderr(stderr)
    .spawn()
    .expect("spawn fake-ffmpeg");
    let playlist = dir.path().join("index.m3u8");
    let count = || {
        std::fs::read_to_string(&playlist)
            .ok()
            .and_then(|t| MediaPlaylist::parse(&t).ok())
            .map_or(0, |p| p.segments.len())
    };
    eventually_blocking("the stall to begin", Duration::from_secs(5), || {
        let log = std::fs::read_to_string(&stderr_path).ok()?;
        log.contains("stalling as asked").then_some(())
    });
    let stalled_at = count();
    assert!(
        (1..=6).contains(&stalled_at),
        "about 300/50 segments, got {stalled_at}"
    );
    // Absence check: over 6 more segment intervals nothing new appears and it keeps running.
    let quiet = farm_tests::wait::poll_until(Duration::from_millis(300), || {
        (count() != stalled_at).then_some(())
    });
    assert!(quiet.is_none(), "segments written after the stall");
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "still running while stalled"
    );
    signal::send(child.id() as i32, signal::Sig::INT).expect("SIGINT");
    let status = eventually_blocking("exit after SIGINT", Duration::from_secs(3), || {
        child.try_wait().expect("try_wait")
    });
    assert!(status.success());
}

/// Serves a directory over HTTP like nginx would (playlist + segments), for the HLS client test.
async fn serve_dir(dir: Arc<std::path::PathBuf>) -> std::net::SocketAddr {
    async fn file(
        State(dir): State<Arc<std::path::PathBuf>>,
        AxPath(name): AxPath<String>,
    ) -> axum::response::Response {
        match tokio::fs::read(dir.join(&name)).await {
            Ok(b) => b.into_response(),
            Err(_) => StatusCode::NOT_FOUND.into_response(),
        }
    }
    let app = Router::new()
        .route("/live/ch/{name}", axum::routing::get(file))
        .with_state(dir);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn hls_client_follows_a_live_playlist_without_gaps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = fake_ffmpeg_cmd(dir.path(), "http://h/x.ts?seg_ms=200&bytes=2000", 6)
        .spawn()
        .expect("spawn fake-ffmpeg");
    let addr = serve_dir(Arc::new(dir.path().to_path_buf())).await;
    let mut client = HlsClient::new(&format!("http://{addr}/live/ch/index.m3u8"));
    let report = client
        .pull(Duration::from_secs(2), Duration::from_secs(15))
        .await
        .expect("pull 2 s of media");
    assert_eq!(report.gaps, 0, "{report:?}");
    assert_eq!(report.failed_segments, 0, "{report:?}");
    assert!(report.segments >= 10, "{report:?}");
    assert!(report.media_seconds >= 2.0);
    assert_eq!(report.bytes, report.segments * 2068, "{report:?}");
    assert!(report.statuses_seen.get(&200).copied().unwrap_or(0) > report.segments);
    let last = report.last_segment.as_ref().expect("a segment");
    assert_eq!(last[0], ts::SYNC);
    assert!(
        report.max_wall_gap_between_new_segments < Duration::from_secs(2),
        "{report:?}"
    );

    // The client keeps its place: stopping the producer makes the next pull fail at its deadline
    // without counting gaps.
    signal::term(child.id() as i32).expect("SIGTERM");
    let status = eventually("fake-ffmpeg to exit", Duration::from_secs(3), || {
        let s = child.try_wait().expect("try_wait");
        async move { s }
    })
    .await;
    assert!(status.success());
    let err = client
        .pull(Duration::from_secs(60), Duration::from_millis(1_500))
        .await
        .expect_err("no more media");
    assert!(err.contains("gaps: 0"), "{err}");

    // A playlist URL that 404s is retried until the deadline, with the statuses recorded.
    let mut missing = HlsClient::new(&format!("http://{addr}/live/ch/nope.m3u8"));
    let err = missing
        .pull(Duration::from_secs(1), Duration::from_millis(700))
        .await
        .expect_err("404");
    assert!(err.contains("404"), "{err}");
}

/// A MONITOR connection sees every command a client sends, with Redis's time and the client.
#[tokio::test]
async fn monitor_sees_every_command_with_its_client_and_time() {
    let redis = RedisServer::start();
    let monitor = redis.monitor();
    let mut c = redis.conn().await;
    let before = procs::now_us();
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut c)
        .await
        .expect("SET");
    let seen = eventually("the SET in MONITOR", Duration::from_secs(5), || async {
        monitor.seen().into_iter().find(|m| m.command == "set")
    })
    .await;
    assert!(seen.at_us + 1000 >= before, "{seen:?}");
    assert!(seen.line.contains("\"k\""), "{seen:?}");
    assert_ne!(seen.client, monitor.addr);
}

/// The invariant checker fails a farm in which a second FFmpeg for a channel ran during part of its
/// window, although every pass after that one is clean (it used to return on its first clean pass).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invariant_checker_fails_a_duplicate_ffmpeg_seen_in_one_pass_only() {
    use farm_tests::invariants::{self, FarmNode, Kind};
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    // Two "FFmpegs" writing for channel c1 under two live nodes' roots (the test process stands in
    // for both nodes: they are alive); no leases, so each is also a leaked process.
    let spawn = |node: &str| {
        let dir = root.path().join(node).join("c1");
        std::fs::create_dir_all(&dir).expect("mkdir");
        Command::new(fake_ffmpeg())
            .args(["-i", "http://127.0.0.1:9/c1.ts?seg_ms=500"])
            .arg(dir.join("index.m3u8"))
            .stderr(Stdio::null())
            .spawn()
            .expect("fake ffmpeg")
    };
    let (mut a, mut b) = (spawn("n1"), spawn("n2"));
    let me = std::process::id() as i32;
    // Both nodes registered, as live nodes are.
    let mut c = redis.conn().await;
    for n in ["n1", "n2"] {
        let _: () = redis::cmd("SET")
            .arg(format!("farm:node:{n}:alive"))
            .arg("1")
            .query_async(&mut c)
            .await
            .expect("SET alive");
    }
    let nodes = [
        FarmNode {
            id: "n1".into(),
            hls_root: root.path().join("n1"),
            pid: Some(me),
        },
        FarmNode {
            id: "n2".into(),
            hls_root: root.path().join("n2"),
            pid: Some(me),
        },
    ];
    let check = tokio::spawn({
        let nodes = nodes.to_vec();
        async move {
            let redis = redis;
            invariants::check(&redis, &nodes, Duration::from_secs(2)).await
        }
    });
    // The duplicate runs for the checker's first passes only; then both go, with their folders.
    eventually_blocking("two FFmpegs for c1", Duration::from_secs(5), || {
        (invariants::farm_ffmpegs(&nodes).len() == 2).then_some(())
    });
    tokio::time::sleep(Duration::from_millis(500)).await; // the fault's length
    for (child, node) in [(&mut a, "n1"), (&mut b, "n2")] {
        let _ = child.kill();
        let _ = child.wait();
        std::fs::remove_dir_all(root.path().join(node).join("c1")).expect("rm");
    }
    let report = check.await.expect("checker");
    println!("{}", report.figure());
    assert!(!report.is_clean(), "{report}");
    assert!(report.settled_pass.is_some(), "the farm settled: {report}");
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.finding.kind == Kind::DoubleRunning),
        "{report}"
    );
}
