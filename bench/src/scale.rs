//! What a supervised stream costs the node: CPU (the node's own processes, not FFmpeg's) and RSS,
//! with 200 fake-FFmpeg streams that read real bytes through the egress gateway, and one
//! player-like viewer per stream.
//!
//! The node runs with its defaults (hls_time 2 s, list size 6, access flush 1 s, TTLs 10 s) and no
//! stream limit. Every channel's upstream is the fake IPTV provider ([`farm_tests::provider`]: the test
//! source looped at real-time pace, ~2 Mbit/s) with `read=1`, so each fake FFmpeg reads its input
//! through `-http_proxy`, i.e. the channel's egress gateway in the node's guard process, and
//! discards it: the gateways relay real bytes. First the idle baseline (no stream) is measured over
//! the same window as the loaded state; then 200 channels are started through their first playlist
//! request, each gets a viewer that reloads the playlist every 2 s and downloads every new segment
//! (100 KB), and after a settle time the utime+stime (`/proc/<pid>/stat`) of the node and of its
//! guard (its child `farm-node __guard`) are read over the window, and the bytes the provider sent
//! meanwhile (the relayed bitrate, printed per stream); `VmRSS` is read once the viewers have
//! watched for 20 s (a whole playlist window of new segments per channel), and sampled every second
//! meanwhile (`rss_series_kb` in the report: flat when memory is bounded).
//!
//! - `node_cpu_per_stream_pct`: the CPU of the node's processes (farm-node + its guard, which runs
//!   the egress gateways and so does the relaying) over the window divided by the streams (serving
//!   the viewers and relaying the upstreams included, the idle baseline not subtracted). Before the
//!   gateways relayed anything, this figure was farm-node alone with silent upstreams.
//! - `guard_cpu_per_stream_pct`: the guard's part of it.
//! - `node_rss_per_stream_kb`: farm-node's RSS growth from the idle baseline divided by the streams.
//! - `guard_rss_per_stream_kb`: the guard's `VmRSS` growth from its idle baseline divided by the
//!   streams (its `Pss` from `smaps_rollup`, which does not count pages shared with farm-node, is in
//!   the detail and the report).
//!
//! A second, shorter run with `--segment-cache 0` (when the node has that flag) separates the memory
//! of the node's in-memory copies of hot segments from what supervising a stream costs.

mod viewers;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::phase::Settings;
use crate::report::{num, Figure, Goal, PhaseOutput};
use crate::sys::{cpu_seconds, guard_of, pss_kb, rss_kb, threads};
use crate::util::{add_channels, get, http};
use farm_tests::node::{NodeOpts, NodeProcess};
use farm_tests::provider::FakeProvider;
use farm_tests::redis::RedisServer;
use viewers::Viewers;

const SEGMENT_BYTES: u64 = 100_000;

/// One node with `n` streams and viewers.
struct Run {
    streams: usize,
    window_s: f64,
    idle_cpu_s: f64,
    idle_window_s: f64,
    busy_cpu_s: f64,
    idle_rss_kb: u64,
    busy_rss_kb: u64,
    threads: Option<u64>,
    /// RSS every second of the window: flat when memory is bounded, rising when it is not.
    rss_series_kb: Vec<u64>,
    ffmpeg_children: usize,
    viewer_rps: f64,
    viewer_errors: u64,
    start_all_s: f64,
    /// How long the viewers had been watching when RSS was read.
    viewing_s: f64,
    guard: Guard,
    /// Bytes the provider sent per second per stream during the window (what the gateways relayed).
    relayed_bytes_per_s_per_stream: f64,
}

/// The guard process's figures.
#[derive(Debug, Default, Clone)]
struct Guard {
    pid_idle: i32,
    pid_busy: i32,
    idle_cpu_s: f64,
    busy_cpu_s: f64,
    idle_rss_kb: u64,
    busy_rss_kb: u64,
    idle_pss_kb: Option<u64>,
    busy_pss_kb: Option<u64>,
}

impl Guard {
    fn json(&self) -> serde_json::Value {
        json!({
            "pid_idle": self.pid_idle,
            "pid_busy": self.pid_busy,
            "idle_cpu_s": self.idle_cpu_s,
            "busy_cpu_s": self.busy_cpu_s,
            "idle_rss_kb": self.idle_rss_kb,
            "busy_rss_kb": self.busy_rss_kb,
            "idle_pss_kb": self.idle_pss_kb,
            "busy_pss_kb": self.busy_pss_kb,
        })
    }
}

impl Run {
    /// farm-node + guard.
    fn cpu_pct_per_stream(&self) -> f64 {
        (self.busy_cpu_s + self.guard.busy_cpu_s) / self.window_s * 100.0 / self.streams as f64
    }

    fn guard_cpu_pct_per_stream(&self) -> f64 {
        self.guard.busy_cpu_s / self.window_s * 100.0 / self.streams as f64
    }

    fn guard_rss_kb_per_stream(&self) -> f64 {
        (self.guard.busy_rss_kb as f64 - self.guard.idle_rss_kb as f64) / self.streams as f64
    }

    fn guard_pss_kb_per_stream(&self) -> Option<f64> {
        Some(
            (self.guard.busy_pss_kb? as f64 - self.guard.idle_pss_kb? as f64) / self.streams as f64,
        )
    }

    /// Whether the same guard ran from the idle baseline to the end.
    fn guard_stable(&self) -> bool {
        self.guard.pid_idle != 0 && self.guard.pid_idle == self.guard.pid_busy
    }

    fn rss_kb_per_stream(&self) -> f64 {
        (self.busy_rss_kb as f64 - self.idle_rss_kb as f64) / self.streams as f64
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "streams": self.streams,
            "window_s": self.window_s,
            "idle_cpu_s": self.idle_cpu_s,
            "idle_window_s": self.idle_window_s,
            "busy_cpu_s": self.busy_cpu_s,
            "idle_rss_kb": self.idle_rss_kb,
            "busy_rss_kb": self.busy_rss_kb,
            "node_threads": self.threads,
            "rss_series_kb": self.rss_series_kb,
            "node_children_ffmpeg": self.ffmpeg_children,
            "viewer_requests_per_s": self.viewer_rps,
            "viewer_errors": self.viewer_errors,
            "start_all_s": self.start_all_s,
            "viewing_s_at_rss": self.viewing_s,
            "segment_bytes": SEGMENT_BYTES,
            "cpu_pct_per_stream_node_and_guard": self.cpu_pct_per_stream(),
            "rss_kb_per_stream": self.rss_kb_per_stream(),
            "guard": self.guard.json(),
            "guard_rss_kb_per_stream": self.guard_rss_kb_per_stream(),
            "guard_pss_kb_per_stream": self.guard_pss_kb_per_stream(),
            "relayed_bytes_per_s_per_stream": self.relayed_bytes_per_s_per_stream,
        })
    }
}

pub async fn run(s: &Settings) -> Result<PhaseOutput, String> {
    let n = s.streams;
    // RSS is read after 20 s of viewing: by then every channel has gone through a whole playlist
    // window of new segments (8 x 2 s), so caches that keep a window of them are full.
    let main = measure(
        n,
        &[],
        s.scale_window,
        s.scale_idle_window,
        Duration::from_secs(20),
    )
    .await?;
    // The same without the node's in-memory copies of hot files: what supervision alone costs.
    let no_cache = if node_has_flag("--segment-cache") {
        Some(
            measure(
                n,
                &["--segment-cache", "0"],
                Duration::from_secs(4),
                Duration::from_secs(1),
                Duration::from_secs(8),
            )
            .await?,
        )
    } else {
        None
    };
    let mut out = PhaseOutput::default();
    out.set("defaults", main.json());
    if let Some(r) = &no_cache {
        out.set("segment_cache_0", r.json());
    }
    let relayed = format!(
        "{} kbit/s relayed per stream through the egress gateways ({} Mbit/s in all)",
        num(main.relayed_bytes_per_s_per_stream * 8.0 / 1000.0),
        num(main.relayed_bytes_per_s_per_stream * 8.0 * n as f64 / 1e6),
    );
    out.fig(node_cpu_figure(&main, &relayed));
    let (gcpu, grss) = guard_figures(&main, &relayed);
    out.fig(gcpu);
    out.fig(node_rss_figure(&main, no_cache.as_ref()));
    out.fig(grss);
    Ok(out)
}

/// `node_cpu_per_stream_pct`: farm-node + guard over the window, per stream.
fn node_cpu_figure(main: &Run, relayed: &str) -> Figure {
    let (n, secs) = (main.streams, main.window_s);
    let mut cpu = Figure::new("node_cpu_per_stream_pct", "%", Goal::AtMost(0.05))
        .value(main.cpu_pct_per_stream())
        .detail(format!(
            "farm-node {} s + guard {} s CPU over {} s with {n} streams, {relayed}, and {n} viewers ({} req/s) = {}% of a core; idle baseline {}% of a core",
            num(main.busy_cpu_s),
            num(main.guard.busy_cpu_s),
            num(secs),
            num(main.viewer_rps),
            num((main.busy_cpu_s + main.guard.busy_cpu_s) / secs * 100.0),
            num((main.idle_cpu_s + main.guard.idle_cpu_s) / main.idle_window_s * 100.0),
        ));
    if !main.guard_stable() {
        cpu = cpu.note(format!(
            "the guard was not the same process throughout (pid {} idle, {} loaded): its CPU is not in the figure",
            main.guard.pid_idle, main.guard.pid_busy
        ));
    }
    if main.relayed_bytes_per_s_per_stream <= 0.0 {
        cpu = cpu.note("the gateways relayed nothing: the figure is without relaying".to_string());
    }
    if main.viewer_errors > 0 || main.ffmpeg_children < n {
        cpu = cpu.note(format!(
            "{} viewer errors; {} ffmpeg children of {n} streams",
            main.viewer_errors, main.ffmpeg_children
        ));
    }
    cpu
}

/// `guard_cpu_per_stream_pct` and `guard_rss_per_stream_kb`: measured only when the same guard ran
/// throughout.
fn guard_figures(main: &Run, relayed: &str) -> (Figure, Figure) {
    let (n, secs) = (main.streams, main.window_s);
    let mut gcpu = Figure::new("guard_cpu_per_stream_pct", "%", Goal::Context).detail(format!(
        "the guard's part of node_cpu_per_stream_pct: {} s over {} s, {relayed}; idle {}% of a core",
        num(main.guard.busy_cpu_s),
        num(secs),
        num(main.guard.idle_cpu_s / main.idle_window_s * 100.0),
    ));
    let mut grss = Figure::new("guard_rss_per_stream_kb", "KB", Goal::Context).detail(format!(
        "guard VmRSS {} KB with {n} streams vs {} KB idle; Pss {} per stream ({} KB idle, {} KB loaded)",
        main.guard.busy_rss_kb,
        main.guard.idle_rss_kb,
        main.guard_pss_kb_per_stream()
            .map_or_else(|| "unreadable (no smaps_rollup)".to_string(), |v| format!("{} KB", num(v))),
        main.guard.idle_pss_kb.map_or("?".into(), |v| v.to_string()),
        main.guard.busy_pss_kb.map_or("?".into(), |v| v.to_string()),
    ));
    if main.guard_stable() {
        gcpu = gcpu.value(main.guard_cpu_pct_per_stream());
        grss = grss.value(main.guard_rss_kb_per_stream());
    } else {
        let why = format!(
            "no guard, or not the same guard process throughout (pid {} idle, {} loaded)",
            main.guard.pid_idle, main.guard.pid_busy
        );
        gcpu = gcpu.note(why.clone());
        grss = grss.note(why);
    }
    (gcpu, grss)
}

/// `node_rss_per_stream_kb`, with what the run without segment cache says about the rest.
fn node_rss_figure(main: &Run, no_cache: Option<&Run>) -> Figure {
    let n = main.streams;
    let cache_note = no_cache.map_or(String::new(), |r| {
        format!(
            "; with --segment-cache 0: {} KB per stream: the rest is the node's in-memory copies of the watched channels' newest {} KB segments (bounded node-wide by --segment-cache)",
            num(r.rss_kb_per_stream()),
            SEGMENT_BYTES / 1000
        )
    });
    Figure::new("node_rss_per_stream_kb", "KB", Goal::AtMost(200.0))
        .value(main.rss_kb_per_stream())
        .detail(format!(
            "RSS {} KB after {} s of viewing {n} streams vs {} KB idle, node defaults{cache_note}",
            main.busy_rss_kb,
            main.viewing_s.round(),
            main.idle_rss_kb
        ))
}

/// Whether `farm-node --help` lists `flag`.
fn node_has_flag(flag: &str) -> bool {
    std::process::Command::new(farm_tests::bins::bin_path("farm-node"))
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
        .unwrap_or(false)
}

/// One node with `n` streams: idle baseline, start every channel, a viewer each, CPU over the
/// loaded `window`, RSS once the viewers have watched `min_viewing`.
async fn measure(
    n: usize,
    extra: &[&str],
    window: Duration,
    idle_window: Duration,
    min_viewing: Duration,
) -> Result<Run, String> {
    let farm = ScaleFarm::start(n, extra).await?;
    let pid = farm.node.pid();
    let (mut guard, idle) = idle_baseline(pid, idle_window).await?;
    let start_all_s = farm.start_channels().await?;
    let viewers = Viewers::start(&farm);
    // A full playlist window of segments goes by before the window starts.
    crate::util::pause(Duration::from_secs(4)).await;
    let mut loaded = loaded_window(pid, guard.pid_idle, &farm.provider, &viewers, window).await?;
    guard.busy_cpu_s = loaded.guard_cpu_s;
    while viewers.since.elapsed() < min_viewing {
        crate::util::pause((min_viewing - viewers.since.elapsed()).min(Duration::from_secs(1)))
            .await;
        loaded.rss_series_kb.extend(rss_kb(pid));
    }
    let busy_rss = rss_kb(pid).ok_or("node RSS unreadable")?;
    guard.pid_busy = guard_of(pid).unwrap_or(0);
    guard.busy_rss_kb = rss_kb(guard.pid_busy).unwrap_or(0);
    guard.busy_pss_kb = pss_kb(guard.pid_busy);
    let viewing_s = viewers.since.elapsed().as_secs_f64();
    let node_threads = threads(pid);
    let ffmpegs = farm_tests::procs::children_of(pid)
        .into_iter()
        .filter(|c| *c != guard.pid_busy)
        .count();
    let viewer_errors = viewers.stop().await;
    drop(farm);
    let window_s = loaded.window.as_secs_f64();
    Ok(Run {
        streams: n,
        window_s,
        idle_cpu_s: idle.cpu_s,
        idle_window_s: idle.window.as_secs_f64(),
        busy_cpu_s: loaded.cpu_s,
        idle_rss_kb: idle.rss_kb,
        busy_rss_kb: busy_rss,
        threads: node_threads,
        rss_series_kb: loaded.rss_series_kb,
        ffmpeg_children: ffmpegs,
        viewer_rps: loaded.viewer_requests as f64 / window_s,
        viewer_errors,
        start_all_s,
        viewing_s,
        guard,
        relayed_bytes_per_s_per_stream: loaded.sent as f64 / window_s / n.max(1) as f64,
    })
}

/// The measured farm: Redis, the fake provider, one node with `n` channels on it. Fields drop in
/// this order: the node first, Redis last.
struct ScaleFarm {
    node: NodeProcess,
    client: reqwest::Client,
    base: String,
    channels: Vec<(String, String)>,
    _root: tempfile::TempDir,
    provider: FakeProvider,
    _redis: RedisServer,
}

impl ScaleFarm {
    async fn start(n: usize, extra: &[&str]) -> Result<ScaleFarm, String> {
        let redis = RedisServer::start();
        let provider = FakeProvider::start().await;
        let root = crate::util::temp_dir("farm-bench-scale-")?;
        let node_root = root.path().join("n1");
        let channels: Vec<(String, String)> = (0..n)
            .map(|i| {
                (
                    format!("s{i}"),
                    provider.url(&format!(
                        "/s{i}.ts?read=1&mode=normal&bytes={SEGMENT_BYTES}"
                    )),
                )
            })
            .collect();
        let url = redis.url();
        let list = channels.clone();
        tokio::task::spawn_blocking(move || add_channels(&url, &list))
            .await
            .map_err(|e| format!("add channels: {e}"))??;
        let node = NodeProcess::spawn(
            NodeOpts::new("bench-n1", redis.url(), &node_root)
                .with_fake_ffmpeg()
                .args(["--max-streams", "0", "--start-timeout", "30s"])
                .args(extra.iter().copied()),
        );
        Ok(ScaleFarm {
            base: node.base_url(),
            node,
            client: http(),
            channels,
            _root: root,
            provider,
            _redis: redis,
        })
    }

    /// Starts every channel through its first request, 50 at a time; returns how long it took.
    async fn start_channels(&self) -> Result<f64, String> {
        let t = Instant::now();
        let mut failed = Vec::new();
        for chunk in self.channels.chunks(50) {
            let mut tasks = tokio::task::JoinSet::new();
            for (id, _) in chunk {
                let url = format!("{}/live/{id}/index.m3u8", self.base);
                let client = self.client.clone();
                let id = id.clone();
                tasks.spawn(async move { (id, get(&client, &url).await) });
            }
            while let Some(r) = tasks.join_next().await {
                match r {
                    Ok((_, Ok((200, _)))) => {}
                    Ok((id, Ok((st, body)))) => failed.push(format!(
                        "{id}: {st} {}",
                        String::from_utf8_lossy(&body).trim()
                    )),
                    Ok((id, Err(e))) => failed.push(format!("{id}: {e}")),
                    Err(e) => failed.push(format!("start task: {e}")),
                }
            }
        }
        if !failed.is_empty() {
            return Err(format!(
                "{} of {} channels did not start: {}",
                failed.len(),
                self.channels.len(),
                failed
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        Ok(t.elapsed().as_secs_f64())
    }
}

/// The node's idle figures.
struct Idle {
    cpu_s: f64,
    window: Duration,
    rss_kb: u64,
}

/// The node and its guard with no stream, over `window`; the guard's busy fields are still unset.
async fn idle_baseline(pid: i32, window: Duration) -> Result<(Guard, Idle), String> {
    crate::util::pause(Duration::from_secs(2)).await;
    let mut guard = Guard {
        pid_idle: guard_of(pid).unwrap_or(0),
        ..Guard::default()
    };
    let g0 = cpu_seconds(guard.pid_idle).unwrap_or(0.0);
    let (cpu_s, window) = cpu_over(pid, window).await?;
    guard.idle_cpu_s = cpu_seconds(guard.pid_idle).unwrap_or(0.0) - g0;
    let node_rss = rss_kb(pid).ok_or("node RSS unreadable")?;
    guard.idle_rss_kb = rss_kb(guard.pid_idle).unwrap_or(0);
    guard.idle_pss_kb = pss_kb(guard.pid_idle);
    Ok((
        guard,
        Idle {
            cpu_s,
            window,
            rss_kb: node_rss,
        },
    ))
}

/// What the loaded window measured.
struct Loaded {
    cpu_s: f64,
    window: Duration,
    guard_cpu_s: f64,
    /// Bytes the provider sent (what the gateways relayed).
    sent: u64,
    viewer_requests: u64,
    /// The node's RSS every second.
    rss_series_kb: Vec<u64>,
}

/// CPU of the node and of its guard `guard_pid` over `window` with every viewer watching, the bytes
/// relayed and the viewers' requests meanwhile.
async fn loaded_window(
    pid: i32,
    guard_pid: i32,
    provider: &FakeProvider,
    viewers: &Viewers,
    window: Duration,
) -> Result<Loaded, String> {
    let req0 = viewers.requests.load(Ordering::Relaxed);
    let c0 = cpu_seconds(pid).ok_or("node CPU time unreadable")?;
    let gc0 = cpu_seconds(guard_pid);
    let sent0 = provider.bytes_sent();
    let t0 = Instant::now();
    let mut rss_series_kb = Vec::new();
    while t0.elapsed() < window {
        crate::util::pause((window - t0.elapsed()).min(Duration::from_secs(1))).await;
        rss_series_kb.extend(rss_kb(pid));
    }
    let cpu_s = cpu_seconds(pid).ok_or("node CPU time unreadable")? - c0;
    let sent = provider.bytes_sent() - sent0;
    let gc1 = cpu_seconds(guard_pid);
    let window = t0.elapsed();
    let guard_cpu_s = match (gc0, gc1) {
        (Some(a), Some(b)) => b - a,
        _ => 0.0,
    };
    let req1 = viewers.requests.load(Ordering::Relaxed);
    Ok(Loaded {
        cpu_s,
        window,
        guard_cpu_s,
        sent,
        viewer_requests: req1 - req0,
        rss_series_kb,
    })
}

/// CPU seconds `pid` used over `window` (and the exact window).
async fn cpu_over(pid: i32, window: Duration) -> Result<(f64, Duration), String> {
    let c0 = cpu_seconds(pid).ok_or("node CPU time unreadable")?;
    let t0 = Instant::now();
    crate::util::pause(window).await;
    let c1 = cpu_seconds(pid).ok_or("node CPU time unreadable")?;
    Ok((c1 - c0, t0.elapsed()))
}
