//! `farm-bench`: every performance goal of the farm measured side by side with its anchor, in one run.
//!
//! The benchmark starts everything it measures (redis-server, nginx, farm-node, farm-coordinator, the
//! fake IPTV provider, real and fake FFmpeg) on 127.0.0.1 in temp dirs, and stops it again. It runs in
//! phases, one at a time so they do not share the machine:
//!
//! | phase | figures |
//! |---|---|
//! | [`rps`] | `segment_rps_ratio`, `playlist_rps_ratio` (node / plain nginx at its best), `template_segment_rps_ratio`, `template_playlist_rps_ratio` (shipped template / plain nginx at its best), `auth_segment_rps_ratio`, `redis_cmds_per_1k_requests`, `request_path_redis_rtt` |
//! | [`tick`] | `tick_ms_100k`, `tick_ratio_100k_1k` |
//! | [`ttfp`] | `ttfp_overhead_ms_p50`, `ttfp_overhead_ms_p99`, `ttfp_ts_over_hls_time` |
//! | [`scale`] | `node_cpu_per_stream_pct` (farm-node + guard, gateways relaying real bytes), `guard_cpu_per_stream_pct`, `node_rss_per_stream_kb`, `guard_rss_per_stream_kb` |
//! | [`failover`] | `failover_s_p50`, `failover_s_p99` |
//! | [`viewer`] | `viewer_freeze_s_p50`, `viewer_freeze_s_p99` (hls.js in headless Chromium through nginx, `kill -9` of the owner) |
//! | [`abuse`] | `burst_worst_gap_s`, `import_redis_max_latency_ms` (runs at least [`ABUSE_PHASE_LIMIT`]) |
//!
//! Invariants: A and B of a comparison are measured in the same run, interleaved (ABBA rounds), with
//! the same load generator ([`load`]); a figure that cannot be measured is `null` with the reason,
//! never a guess; a goal that is not met is reported as such. A phase that fails (or panics: the
//! harness fixtures panic on setup failures) is recorded with its error and the others still run;
//! every fixture is dropped at the end of its phase, so nothing it started outlives it.

pub mod abuse;
pub mod failover;
pub mod killfarm;
pub mod load;
pub mod nginx;
pub mod report;
pub mod rps;
pub mod scale;
pub mod sys;
pub mod tick;
pub mod ttfp;
pub mod viewer;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::FutureExt;

use farm_tests::bins::bin_dir;
use report::{cpu_jiffies, Machine, PhaseOutput, PhaseRun, Report};

/// The benchmark's phases, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Rps,
    Tick,
    Ttfp,
    Scale,
    Failover,
    Viewer,
    Abuse,
}

/// The abuse phase starts a whole farm with real FFmpeg and imports 100,000 channels: it gets at
/// least this long, `--quick` or not.
pub const ABUSE_PHASE_LIMIT: Duration = Duration::from_secs(300);

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Rps,
        Phase::Tick,
        Phase::Ttfp,
        Phase::Scale,
        Phase::Failover,
        Phase::Viewer,
        Phase::Abuse,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Rps => "rps",
            Phase::Tick => "tick",
            Phase::Ttfp => "ttfp",
            Phase::Scale => "scale",
            Phase::Failover => "failover",
            Phase::Viewer => "viewer",
            Phase::Abuse => "abuse",
        }
    }

    /// Parses a phase name (`rps`, `tick`, `ttfp`, `scale`, `failover`, `viewer`, `abuse`).
    pub fn parse(s: &str) -> Result<Phase, String> {
        Phase::ALL
            .into_iter()
            .find(|p| p.name() == s.trim())
            .ok_or_else(|| {
                format!(
                    "unknown phase {s:?}: use one of {}",
                    Phase::ALL.map(Phase::name).join(", ")
                )
            })
    }
}

/// What the command line asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    /// Phases to run; empty = all.
    pub only: Vec<Phase>,
    /// The command line, for the report.
    pub command: String,
}

/// Sizes and durations of the run, from `--quick` or the full mode.
#[derive(Debug, Clone)]
pub struct Settings {
    pub quick: bool,
    /// Connections of the throughput comparisons.
    pub connections: usize,
    /// ABBA rounds per throughput comparison.
    pub rounds: usize,
    pub warmup: Duration,
    pub round: Duration,
    /// Time-to-first-playlist trials (each: node, raw ffmpeg same argv, raw ffmpeg default probing).
    pub ttfp_trials: usize,
    /// Supervised streams of the scale phase.
    pub streams: usize,
    /// CPU measurement window of the scale phase (loaded), and of the idle baseline.
    pub scale_window: Duration,
    pub scale_idle_window: Duration,
    /// Failover trials.
    pub failover_trials: usize,
    /// Steady coordinator ticks averaged per farm size.
    pub steady_ticks: u64,
    /// Upper bound of one phase.
    pub phase_limit: Duration,
}

impl Settings {
    pub fn new(quick: bool) -> Settings {
        if quick {
            Settings {
                quick,
                connections: 64,
                rounds: 2,
                warmup: Duration::from_millis(500),
                round: Duration::from_millis(2500),
                ttfp_trials: 3,
                streams: 200,
                scale_window: Duration::from_secs(8),
                scale_idle_window: Duration::from_secs(3),
                failover_trials: 3,
                steady_ticks: 20,
                phase_limit: Duration::from_secs(120),
            }
        } else {
            Settings {
                quick,
                connections: 64,
                rounds: 5,
                warmup: Duration::from_secs(1),
                round: Duration::from_secs(5),
                ttfp_trials: 10,
                streams: 200,
                scale_window: Duration::from_secs(30),
                scale_idle_window: Duration::from_secs(10),
                failover_trials: 10,
                steady_ticks: 50,
                phase_limit: Duration::from_secs(480),
            }
        }
    }
}

/// The default report path: `<target dir>/farm-bench/report.json`.
pub fn default_out() -> PathBuf {
    let dir = bin_dir();
    let target = dir.parent().map_or_else(|| dir.clone(), Path::to_path_buf);
    target.join("farm-bench").join("report.json")
}

/// Runs the selected phases and returns the report (never panics on a failing phase).
pub async fn run(opts: &Options) -> Report {
    let settings = Settings::new(opts.quick);
    let started = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let machine = Machine::probe();
    let mut phases = Vec::new();
    for phase in Phase::ALL {
        if !opts.only.is_empty() && !opts.only.contains(&phase) {
            continue;
        }
        let busy_before_pct = machine_busy(Duration::from_secs(1)).await;
        eprintln!(
            "farm-bench: phase {} (machine busy before it: {}) ...",
            phase.name(),
            busy_before_pct.map_or_else(|| "?".into(), |b| format!("{b:.0}%"))
        );
        let t = Instant::now();
        let r = run_phase(phase, settings.clone()).await;
        let took = t.elapsed();
        match &r {
            Ok(_) => eprintln!("farm-bench: phase {} done in {took:.1?}", phase.name()),
            Err(e) => eprintln!(
                "farm-bench: phase {} FAILED after {took:.1?}: {e}",
                phase.name()
            ),
        }
        phases.push(PhaseRun {
            name: phase.name(),
            result: r,
            took,
            busy_before_pct,
        });
    }
    Report {
        mode: if opts.quick { "quick" } else { "full" },
        command: opts.command.clone(),
        machine,
        started_unix,
        elapsed: started.elapsed(),
        phases,
    }
}

/// Share of all cores busy over `window` (percent).
async fn machine_busy(window: Duration) -> Option<f64> {
    let (b0, t0) = cpu_jiffies()?;
    pause(window).await;
    let (b1, t1) = cpu_jiffies()?;
    (t1 > t0).then(|| (b1 - b0) as f64 * 100.0 / (t1 - t0) as f64)
}

/// One phase on its own task, bounded by `phase_limit`; a panic becomes an error.
async fn run_phase(phase: Phase, s: Settings) -> Result<PhaseOutput, String> {
    let limit = if phase == Phase::Abuse {
        s.phase_limit.max(ABUSE_PHASE_LIMIT)
    } else {
        s.phase_limit
    };
    let task = tokio::spawn(async move {
        let fut = async move {
            match phase {
                Phase::Rps => rps::run(&s).await,
                Phase::Tick => tick::run(&s).await,
                Phase::Ttfp => ttfp::run(&s).await,
                Phase::Scale => scale::run(&s).await,
                Phase::Failover => failover::run(&s).await,
                Phase::Viewer => viewer::run(&s).await,
                Phase::Abuse => abuse::run(&s).await,
            }
        };
        match tokio::time::timeout(limit, std::panic::AssertUnwindSafe(fut).catch_unwind()).await {
            Err(_) => Err(format!("phase did not finish within {limit:?}")),
            Ok(Err(panic)) => Err(panic_text(panic.as_ref())),
            Ok(Ok(r)) => r,
        }
    });
    match task.await {
        Ok(r) => r,
        Err(e) if e.is_panic() => Err(panic_text(e.into_panic().as_ref())),
        Err(e) => Err(format!("phase task ended: {e}")),
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    let text = p
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into());
    format!(
        "panicked: {}",
        text.lines().take(12).collect::<Vec<_>>().join(" / ")
    )
}

/// Builds the binaries the phases run (farm-node, fake-ffmpeg, farm-coordinator, farmctl) with the
/// cargo that runs this benchmark, in the same profile. Returns what could not be built; an error
/// when the essential ones are missing.
pub fn build_binaries(build: bool) -> Result<Vec<String>, String> {
    let profile_release = bin_dir().file_name().is_some_and(|n| n == "release");
    let mut warnings = Vec::new();
    if !profile_release {
        warnings.push(
            "not a release build: figures of a debug build say little (use cargo run --release)"
                .to_string(),
        );
    }
    let cargo = std::env::var_os("CARGO");
    if build {
        if let Some(cargo) = cargo {
            for (pkgs, essential) in [
                (&["farm-node", "farm-tests"][..], true),
                (&["farm-coordinator"][..], false),
            ] {
                let mut cmd = Command::new(&cargo);
                cmd.arg("build").arg("--bins");
                if profile_release {
                    cmd.arg("--release");
                }
                for p in pkgs {
                    cmd.arg("-p").arg(p);
                }
                eprintln!("farm-bench: building {} ...", pkgs.join(", "));
                let status = cmd
                    .current_dir(farm_tests::nginx::repo_root())
                    .stdin(Stdio::null())
                    .status()
                    .map_err(|e| format!("run cargo build: {e}"))?;
                if !status.success() {
                    let msg = format!("cargo build -p {} failed ({status})", pkgs.join(" -p "));
                    if essential {
                        return Err(msg);
                    }
                    warnings.push(msg);
                }
            }
        }
    }
    for name in ["farm-node", "farmctl", "fake-ffmpeg"] {
        if !bin_dir().join(name).is_file() {
            return Err(format!(
                "{name} not found in {}: build it first (cargo build{} --workspace --bins)",
                bin_dir().display(),
                if profile_release { " --release" } else { "" }
            ));
        }
    }
    Ok(warnings)
}

/// The farm-coordinator binary, when it is built.
pub fn coordinator_bin() -> Option<PathBuf> {
    let p = bin_dir().join("farm-coordinator");
    p.is_file().then_some(p)
}

/// Adds (or replaces) channels through `farmctl import` of an extended M3U (one process for all).
pub fn add_channels(redis_url: &str, channels: &[(String, String)]) -> Result<(), String> {
    let mut m3u = String::from("#EXTM3U\n");
    for (id, url) in channels {
        m3u.push_str(&format!("#EXTINF:-1 tvg-id=\"{id}\",{id}\n{url}\n"));
    }
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let path = dir.path().join("channels.m3u");
    std::fs::write(&path, m3u).map_err(|e| format!("write {}: {e}", path.display()))?;
    let path = path.to_string_lossy().into_owned();
    farmctl(redis_url, &["import", &path], "farmctl import")
}

/// Adds one channel with `farmctl channel add`.
pub fn add_channel(redis_url: &str, id: &str, url: &str) -> Result<(), String> {
    farmctl(
        redis_url,
        &["channel", "add", id, url],
        &format!("farmctl channel add {id}"),
    )
}

/// Runs farmctl; `<what> failed (<status>): <stderr>` unless it succeeds.
fn farmctl(redis_url: &str, args: &[&str], what: &str) -> Result<(), String> {
    let out = farm_tests::node::farmctl(redis_url, args);
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The bearer token the benchmark's nodes run with (their admin API stops channels between trials).
pub const ADMIN_TOKEN: &str = "farm-bench-admin-token";

/// An HTTP client that does not follow redirects.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// `(status, body)` of a GET.
pub async fn get(client: &reqwest::Client, url: &str) -> Result<(u16, Vec<u8>), String> {
    let r = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = r.status().as_u16();
    let body = r.bytes().await.map_err(|e| format!("read {url}: {e}"))?;
    Ok((status, body.to_vec()))
}

/// Stops a channel on a node through its admin API.
pub async fn admin_stop(client: &reqwest::Client, base: &str, id: &str) -> Result<(), String> {
    let url = format!("{base}/admin/streams/{id}/stop");
    let r = client
        .post(&url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    match r.status().as_u16() {
        200 | 404 => Ok(()),
        s => Err(format!("POST {url}: {s}")),
    }
}

/// Sum of the samples of a metric (any labels) in a Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let base = series.split('{').next().unwrap_or(series);
        if base == name {
            if let Ok(v) = value.parse::<f64>() {
                sum += v;
                found = true;
            }
        }
    }
    found.then_some(sum)
}

/// A node's `/metrics` text.
pub async fn node_metrics(client: &reqwest::Client, base: &str) -> Result<String, String> {
    let (status, body) = get(client, &format!("{base}/metrics")).await?;
    if status != 200 {
        return Err(format!("GET {base}/metrics: {status}"));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A temp dir named `prefix…` for what a phase starts; removed when dropped.
pub fn temp_dir(prefix: &str) -> Result<tempfile::TempDir, String> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))
}

/// Sleeps without blocking the runtime (pacing of the benchmark's own steps, not synchronisation).
pub async fn pause(d: Duration) {
    tokio::time::sleep(d).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_parse_by_name() {
        assert_eq!(Phase::parse("rps"), Ok(Phase::Rps));
        assert_eq!(Phase::parse(" failover"), Ok(Phase::Failover));
        assert!(Phase::parse("nope").is_err_and(|e| e.contains("rps, tick")));
    }

    #[test]
    fn metric_sums_cover_labels() {
        let text = "# TYPE x counter\nfarm_node_requests_total{kind=\"playlist\"} 3\nfarm_node_requests_total{kind=\"segment\"} 4\nfarm_node_requests_total_other 9\n";
        assert_eq!(metric_sum(text, "farm_node_requests_total"), Some(7.0));
        assert_eq!(metric_sum(text, "farm_node_missing"), None);
    }
}
