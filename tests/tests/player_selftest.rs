//! The browser player harness sees the world: hls.js (default configuration) in headless Chromium,
//! on a page served from another origin than the stream, plays a real farm-node's live channel
//! (real FFmpeg, the fake IPTV provider) at real-time pace, and the harness notices when the source
//! stops (a freeze), when the stream URL fails (a fatal error) and when the stream's origin sends no
//! CORS headers (a fatal error: the page really is cross-origin).
//!
//! These tests fail, not skip, when Chromium or the pinned hls.js is missing.

use axum::routing::get;
use axum::Router;
use farm_tests::farm::Farm;
use farm_tests::fixtures::*;
use farm_tests::hls::{HlsClient, MediaPlaylist};
use farm_tests::player::{BrowserPlayer, PlayerReport};
use farm_tests::procs;
use farm_tests::provider::Mode;
use farm_tests::redis::RedisServer;
use farm_tests::wait::{eventually, eventually_blocking};
use std::time::{Duration, Instant};

/// A player of `url` once hls.js has given up on it (a fatal error, within 20 s), and its report,
/// printed under `label`.
async fn given_up_on(url: &str, label: &str) -> (BrowserPlayer, PlayerReport) {
    let player = BrowserPlayer::start(url).await;
    let r = player
        .wait_until("a fatal error", Duration::from_secs(20), |r| {
            !r.fatal_errors.is_empty()
        })
        .await;
    println!("{label}:\n{r}");
    (player, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hls_js_plays_a_live_channel_in_real_time_and_a_stopped_source_shows_as_a_freeze() {
    let farm = Farm::one_node(&[("news", "/live/news.ts")]).await;
    let (provider, node) = (farm.provider(), farm.node("n1"));
    let stream = format!("{}/live/news/index.m3u8", node.base_url());

    // A warm channel: hls.js starts three target durations behind the live edge, so it has a
    // buffer and any freeze below is the harness misreading the world. (From a cold start, where
    // the first playlist lists one segment, hls.js plays at the very edge and stalls briefly.)
    let hls = HlsClient::new(&stream);
    eventually(
        "the playlist to list 5 segments",
        Duration::from_secs(30),
        || async {
            let (status, body) = hls.get_playlist().await.ok()?;
            let p = MediaPlaylist::parse(&body).ok().filter(|_| status == 200)?;
            (p.segments.len() >= 5).then_some(())
        },
    )
    .await;

    let player = BrowserPlayer::start(&stream).await;
    assert_ne!(
        reqwest::Url::parse(player.page_url())
            .expect("page URL")
            .port(),
        reqwest::Url::parse(&stream).expect("stream URL").port(),
        "the page and the stream are on different origins"
    );
    let first = player.wait_first_frame(Duration::from_secs(30)).await;
    let ttff = first.first_frame.expect("first frame");
    println!("time to first frame: {ttff:?}");

    // 15 s of media at real-time pace: the clock of a real decoder, not a download counter.
    let t0 = Instant::now();
    let played = player
        .wait_played(Duration::from_secs(15), Duration::from_secs(30))
        .await;
    let wall = t0.elapsed();
    println!("15 s of media played in {wall:?} of wall time\n{played}");
    assert!(
        wall >= Duration::from_secs(14),
        "media cannot play faster than real time: {wall:?}\n{played}"
    );
    assert!(played.fatal_errors.is_empty(), "{played}");
    assert!(played.page_errors.is_empty(), "{played}");
    assert!(played.backward_jumps.is_empty(), "{played}");
    assert!(played.frags_out_of_order.is_empty(), "{played}");
    // 25 fps: frames really reached the screen while currentTime advanced.
    assert!(played.frames >= 15 * 25 * 8 / 10, "{played}");
    assert!(played.decoded >= played.frames / 2, "{played}");
    assert!(
        played
            .longest_freeze()
            .is_none_or(|f| f.length < Duration::from_secs(1)),
        "{played}"
    );
    // Every playlist hls.js loaded went through the strict checker (what it found on today's
    // node is printed, not asserted: the node's playlists are another test's business).
    assert!(played.playlists_loaded >= 5, "{played}");
    assert_eq!(
        played.playlists_checked, played.playlists_loaded,
        "{played}"
    );
    assert!(!played.target_durations.is_empty(), "{played}");
    let frags = played.frags_loaded.len();
    assert!(frags >= 10, "{played}");
    println!(
        "segment digests checked: {} of {frags} fragments loaded",
        played.segments_checked
    );

    // The source stops sending (connection open, no data): the player plays out its buffer, then
    // the picture stands still while the video is not paused. The harness must see that freeze.
    player.mark("source stalled");
    let stalled_at = player.elapsed();
    provider.set_mode(Mode::Stall);
    let frozen = player
        .wait_until(
            "a freeze of 2 s after the source stalled",
            Duration::from_secs(20),
            |r| {
                r.freezes
                    .iter()
                    .any(|f| f.start + f.length > stalled_at && f.length >= Duration::from_secs(2))
            },
        )
        .await;
    println!("after the stall:\n{frozen}");
    let freeze = frozen.longest_freeze().expect("a freeze");
    assert!(freeze.start >= stalled_at, "{frozen}");
    assert!(
        !frozen.problems(Duration::from_secs(1)).is_empty(),
        "a 2 s freeze is a problem a viewer notices: {frozen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_and_a_stream_without_cors_are_fatal_errors() {
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    let node = node(&redis, "n1", root.path(), true, &[]);

    // An unknown channel: the node answers 404, and hls.js (no retry on 4xx) gives up.
    let missing = format!("{}/live/nosuch/index.m3u8", node.base_url());
    let (player, r) = given_up_on(&missing, "404").await;
    let (_, err) = &r.fatal_errors[0];
    assert_eq!(err.code, Some(404), "{r}");
    assert_eq!(err.details.as_deref(), Some("manifestLoadError"), "{r}");
    assert!(r.first_frame.is_none(), "{r}");
    assert!(!r.problems(Duration::from_secs(1)).is_empty(), "{r}");

    // Dropping the player leaves no browser process behind.
    let (pid, dir) = (player.pid(), format!("{}/", player.temp_dir().display()));
    let before = procs::processes_with_cmdline_containing(&dir).len();
    drop(player);
    assert!(
        before >= 2,
        "the browser's processes name its temp dir: {before}"
    );
    assert!(
        !procs::pid_alive(pid) || procs::is_zombie(pid),
        "browser {pid} still runs"
    );
    eventually_blocking(
        "no process of the dropped browser",
        Duration::from_secs(5),
        || {
            procs::processes_with_cmdline_containing(&dir)
                .is_empty()
                .then_some(())
        },
    );

    // A valid playlist from an origin that sends no CORS headers: the browser withholds it from
    // the page, which proves the page and the stream are on different origins.
    let playlist = "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:1.0,\nseg_0.ts\n";
    let app = Router::new().route("/live/ch/index.m3u8", get(move || async move { playlist }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let (player, r) = given_up_on(&format!("http://{addr}/live/ch/index.m3u8"), "no CORS").await;
    let (_, err) = &r.fatal_errors[0];
    assert_eq!(err.details.as_deref(), Some("manifestLoadError"), "{r}");
    assert_eq!(err.code, Some(0), "a CORS failure has no HTTP status: {r}");
    assert_eq!(r.playlists_loaded, 0, "{r}");
    drop(player);
    server.abort();
}
