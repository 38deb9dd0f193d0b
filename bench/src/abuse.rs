//! What hostile load does to the farm's promises, as figures.
//!
//! - `burst_worst_gap_s`: the abuse tests' farm ([`farm_tests::abuse::AbuseFarm`]: redis-server, two
//!   farm-nodes with real FFmpeg reading the fake IPTV provider, `--hls-time 1s`, `--max-streams
//!   20`, a coordinator, nginx from the shipped template, 3 watched channels each played through
//!   nginx by a player-like viewer that polls the playlist and downloads every new segment, noting
//!   the longest wall time between two new segments). Then 500 concurrent first requests for 500
//!   different catalog channels, 250 straight at each node, each from its own loopback address.
//!   The figure is the worst gap any watched viewer saw from the burst's start until
//!   [`AFTER_BURST`] after its last answer (the FFmpegs it started run meanwhile). Goal: one
//!   segment (hls_time 1 s) plus a 0.5 s allowance. The detail says how many of the 500 got 200,
//!   how many 503 with `Retry-After`, and anything else.
//! - `import_redis_max_latency_ms`: `farmctl import` of a generated 100,000-channel M3U (the same
//!   shape as tests/tests/abuse_import.rs: provider-like `#EXTINF` attributes) into its own
//!   redis-server, while a separate connection sends a PING every 5 ms from its own thread. The
//!   figure is the slowest PING round trip (goal <= 100 ms); the detail has the import's duration
//!   and how many PINGs took over 100 ms. Nothing else uses that Redis meanwhile.
//!
//! Invariants: every fixture is dropped at the end of the phase; the farm's own verdict
//! (`AbuseFarm::finish`, which asserts) is not run: the figures are reported, never asserted.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::phase::Settings;
use crate::report::{num, Figure, Goal, PhaseOutput};
use farm_tests::abuse::{
    attacker_ip, raw_get, AbuseFarm, AbuseOpts, ViewerStats, HLS_TIME, MAX_GAP, MAX_STREAMS,
};
use farm_tests::redis::{Pinger, RedisServer};

/// First requests of the burst.
const BURST: usize = 500;
/// How long the viewers are watched after the burst's last answer.
pub const AFTER_BURST: Duration = Duration::from_secs(10);
/// The same viewers watched without a burst, just before it, for the anchor of `burst_worst_gap_s`.
const CALM: Duration = Duration::from_secs(13);
/// Channels of the generated import.
const IMPORT_CHANNELS: usize = 100_000;

pub async fn run(_s: &Settings) -> Result<PhaseOutput, String> {
    let mut out = PhaseOutput::default();
    burst(&mut out).await?;
    import(&mut out).await?;
    Ok(out)
}

async fn burst(out: &mut PhaseOutput) -> Result<(), String> {
    let farm = AbuseFarm::start(AbuseOpts {
        extra_channels: BURST,
        node_args: Vec::new(),
    })
    .await;
    let addrs: Vec<SocketAddr> = farm.nodes.iter().map(|n| n.addr()).collect();
    let calm = calm_worst_gap(&farm).await;
    let starts_before = farm.metric("farm_node_channel_starts_total").await;
    let t0 = Instant::now();
    let tally = fire_burst(&addrs).await;
    let answered = t0.elapsed();
    let starts = farm.metric("farm_node_channel_starts_total").await - starts_before;
    // The FFmpegs the burst started run now: watch on.
    crate::util::pause(AFTER_BURST).await;
    let stats = farm.viewer_stats();
    let worst = farm.worst_gap();
    let running: Vec<usize> = farm
        .nodes
        .iter()
        .map(|n| {
            farm_tests::procs::children_of(n.pid())
                .len()
                .saturating_sub(1)
        })
        .collect();
    let b = Burst {
        tally,
        answered,
        calm,
        starts,
        nodes: addrs.len(),
    };
    out.set(
        "burst",
        json!({
            "answers": b.tally,
            "answered_s": b.answered.as_secs_f64(),
            "calm_worst_gap_s": b.calm.as_secs_f64(),
            "channel_starts_during_burst": b.starts,
            "watched_after_s": AFTER_BURST.as_secs_f64(),
            "node_children_except_guard_after": running,
            "viewers": stats.iter().map(|s| json!({
                "channel": s.channel,
                "segments": s.segments,
                "max_gap_s": s.max_gap.as_secs_f64(),
                "statuses": s.statuses,
                "errors": s.errors.iter().take(5).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }),
    );
    out.fig(burst_figure(&b, &stats, worst));
    drop(farm);
    Ok(())
}

/// The anchor: the worst gap of the same viewers over a window as long as the burst's, with nothing
/// else going on.
async fn calm_worst_gap(farm: &AbuseFarm) -> Duration {
    farm.reset_gaps();
    crate::util::pause(CALM).await;
    let calm = farm.worst_gap();
    farm.reset_gaps();
    calm
}

/// [`BURST`] concurrent first requests for different channels, split over `addrs`, each from its own
/// source address; the answers tallied by kind.
async fn fire_burst(addrs: &[SocketAddr]) -> BTreeMap<String, u64> {
    let tasks: Vec<_> = (0..BURST)
        .map(|i| {
            let half = i * addrs.len() / BURST;
            let dst = addrs[half];
            let src = attacker_ip(1 + half as u8, i);
            tokio::spawn(first_request(src, dst, format!("/live/b{i}/index.m3u8")))
        })
        .collect();
    let mut tally: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        let key = match t.await {
            Ok(Ok((503, true, _))) => "503+retry-after".to_string(),
            Ok(Ok((status, _, true))) => format!("{status}+accel"),
            Ok(Ok((status, _, _))) => status.to_string(),
            Ok(Err(e)) => format!("error: {}", e.split(':').next().unwrap_or(&e)),
            Err(e) => format!("task: {e}"),
        };
        *tally.entry(key).or_default() += 1;
    }
    tally
}

/// What the burst measured.
struct Burst {
    /// Answers by kind.
    tally: BTreeMap<String, u64>,
    /// From the first request to the last answer.
    answered: Duration,
    /// The viewers' worst gap just before the burst.
    calm: Duration,
    /// Channel starts the burst caused.
    starts: f64,
    nodes: usize,
}

/// `burst_worst_gap_s`: the viewers' worst gap during and after the burst.
fn burst_figure(b: &Burst, stats: &[ViewerStats], worst: Duration) -> Figure {
    let (tally, starts) = (&b.tally, b.starts);
    let viewer_errors: usize = stats.iter().map(|s| s.errors.len()).sum();
    let ok = tally.get("200").copied().unwrap_or(0);
    let accel = tally.get("200+accel").copied().unwrap_or(0);
    let busy = tally.get("503+retry-after").copied().unwrap_or(0);
    let other: Vec<String> = tally
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "200" | "200+accel" | "503+retry-after"))
        .map(|(k, v)| format!("{v} x {k}"))
        .collect();
    // The abuse suite's bound: the normal cadence plus at most one segment.
    let goal = MAX_GAP;
    let mut f = Figure::new("burst_worst_gap_s", "s", Goal::AtMost(goal.as_secs_f64()))
        .detail(format!(
            "worst wait between two new segments of {} watched channels (through nginx) from a burst of {BURST} first requests for {BURST} catalog channels ({} per node, one source address each) until {} s after its last answer; answers in {} s: {ok} x 200 from the node asked, {accel} x 200 with X-Accel-Redirect to the owner (nginx would send the file), {busy} x 503+Retry-After{}; {starts} channel starts; 2 nodes, max streams {MAX_STREAMS} each, real FFmpeg, hls_time {} s (goal: the cadence plus one segment, as the abuse tests assert); anchor: the same viewers without a burst, {} s just before it: worst wait {} s",
            stats.len(),
            BURST / b.nodes.max(1),
            AFTER_BURST.as_secs(),
            num(b.answered.as_secs_f64()),
            if other.is_empty() { String::new() } else { format!(", {}", other.join(", ")) },
            HLS_TIME.as_secs_f64(),
            CALM.as_secs(),
            num(b.calm.as_secs_f64()),
        ));
    if stats.iter().any(|s| s.segments == 0) {
        f = f.note("a watched viewer got no segment during the burst: no gap to report");
    } else {
        f = f.value(worst.as_secs_f64());
    }
    if viewer_errors > 0 {
        f = f.note(format!(
            "{viewer_errors} viewer errors, e.g. {:?}",
            stats.iter().flat_map(|s| s.errors.first()).next()
        ));
    }
    f
}

/// A first request with `Connection: close`: `(status, has Retry-After, has X-Accel-Redirect)`.
async fn first_request(
    src: IpAddr,
    dst: SocketAddr,
    path: String,
) -> Result<(u16, bool, bool), String> {
    let answer = tokio::time::timeout(Duration::from_secs(30), raw_get(src, dst, &path, ""))
        .await
        .unwrap_or_else(|_| Err("timeout: no answer within 30 s".into()))?;
    Ok((
        answer.status,
        answer.header("retry-after").is_some(),
        answer.header("x-accel-redirect").is_some(),
    ))
}

async fn import(out: &mut PhaseOutput) -> Result<(), String> {
    let redis = RedisServer::start();
    let dir = crate::util::temp_dir("farm-bench-import-")?;
    let file = dir.path().join("provider.m3u");
    write_m3u(&file, IMPORT_CHANNELS).map_err(|e| format!("write {}: {e}", file.display()))?;
    let file_bytes = std::fs::metadata(&file).map_or(0, |m| m.len());
    let pinger = Pinger::start(&redis.url())?;
    let url = redis.url();
    let path = file.display().to_string();
    let t = Instant::now();
    let res =
        tokio::task::spawn_blocking(move || farm_tests::node::farmctl(&url, &["import", &path]))
            .await
            .map_err(|e| format!("farmctl: {e}"))?;
    let took = t.elapsed();
    let (max, pings, over) = pinger.finish()?;
    let imported = {
        let mut c = redis.conn().await;
        redis::cmd("SCARD")
            .arg(farm_proto::Keys::new("farm").channels())
            .query_async::<u64>(&mut c)
            .await
            .ok()
    };
    out.set(
        "import",
        json!({
            "channels": IMPORT_CHANNELS,
            "file_bytes": file_bytes,
            "import_s": took.as_secs_f64(),
            "exit": res.status.to_string(),
            "catalog_after": imported,
            "pings": pings,
            "pings_over_100ms": over,
            "max_ping_ms": max.as_secs_f64() * 1000.0,
            "farmctl_stdout_tail": farm_tests::procs::tail(&String::from_utf8_lossy(&res.stdout), 3),
        }),
    );
    let mut f = Figure::new("import_redis_max_latency_ms", "ms", Goal::AtMost(100.0)).detail(
        format!(
            "slowest of {pings} PINGs (one per 5 ms, own connection) during farmctl import of {IMPORT_CHANNELS} channels ({} MB M3U) that took {} s; {over} PINGs over 100 ms; catalog after: {}",
            num(file_bytes as f64 / 1e6),
            num(took.as_secs_f64()),
            imported.map_or_else(|| "unreadable".to_string(), |n| n.to_string()),
        ),
    );
    if res.status.success() {
        f = f.value(max.as_secs_f64() * 1000.0);
    } else {
        f = f.note(format!(
            "farmctl import failed ({}): {}",
            res.status,
            farm_tests::procs::tail(&String::from_utf8_lossy(&res.stderr), 3)
        ));
    }
    out.fig(f);
    Ok(())
}

/// `n` channels `c0..` with provider-like attributes (the shape of tests/tests/abuse_import.rs).
fn write_m3u(path: &std::path::Path, n: usize) -> std::io::Result<()> {
    std::fs::write(path, farm_tests::abuse::provider_m3u("c", n, None))
}
