//! The phases of the benchmark, its settings, and the run of them all: one phase at a time, each
//! recorded with its figures or its error.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::FutureExt;

use crate::report::{cpu_jiffies, Machine, PhaseOutput, PhaseRun, Report};
use crate::util::pause;
use crate::{abuse, failover, rps, scale, tick, ttfp, viewer};
use farm_tests::bins::bin_dir;

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
