//! Coordinator tick cost with 100k and 1k synthetic channels, 1 % of them idle.
//!
//! Per farm size: a fresh redis-server seeded as two live nodes leave it (owner leases, the nodes'
//! stream sets, stream hashes, `farm:access`; 1 % of the channels last watched two idle timeouts
//! ago), then the real `farm-coordinator` binary (tick 100 ms). Its first leading tick sends the stop
//! commands for the idle 1 %; the benchmark then plays the nodes' part (releases those channels, as
//! `release.lua` does) and measures the steady tick: the mean of the coordinator's own
//! `farm_coordinator_tick_duration_seconds` over the next ticks, once its new-leader settle time has
//! passed (so dead-node checks and the stale-key reconciliation run too).
//!
//! `tick_ms_100k` is that steady tick; the first tick (whose cost grows with the number of idle
//! channels it stops, by design) is reported beside it.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde_json::json;

use crate::phase::Settings;
use crate::report::{num, Figure, Goal, PhaseOutput};
use crate::util::{coordinator_bin, get, http, metric_sum};
use farm_tests::coordinator::{CoordinatorOpts, CoordinatorProcess};
use farm_tests::farm::coordinator_args;
use farm_tests::redis::RedisServer;

const IDLE_TIMEOUT_MS: u64 = 60_000;

struct SizeResult {
    channels: usize,
    idle: usize,
    seed_s: f64,
    first_ms: Option<f64>,
    stops_sent: u64,
    steady_ms: f64,
    steady_ticks: f64,
    /// CPU per steady tick of redis-server and of farm-coordinator (what a tick's time is made of).
    redis_cpu_ms: f64,
    coordinator_cpu_ms: f64,
}

pub async fn run(s: &Settings) -> Result<PhaseOutput, String> {
    let mut out = PhaseOutput::default();
    if coordinator_bin().is_none() {
        let why = "farm-coordinator is not built in this checkout: not measured".to_string();
        out.fig(Figure::missing(
            "tick_ms_100k",
            "ms",
            Goal::AtMost(5.0),
            why.clone(),
        ));
        out.fig(Figure::missing(
            "tick_ratio_100k_1k",
            "ratio",
            Goal::AtMost(3.0),
            why,
        ));
        return Ok(out);
    }
    let mut results = Vec::new();
    for n in [1_000usize, 100_000] {
        results.push(measure(n, s).await?);
    }
    let small = &results[0];
    let big = &results[1];
    for r in &results {
        out.set(
            &format!("channels_{}", r.channels),
            json!({
                "channels": r.channels,
                "idle": r.idle,
                "seed_seconds": r.seed_s,
                "first_tick_ms": r.first_ms,
                "stops_sent_by_first_tick": r.stops_sent,
                "steady_tick_ms_mean": r.steady_ms,
                "steady_ticks_averaged": r.steady_ticks,
                "redis_cpu_ms_per_steady_tick": r.redis_cpu_ms,
                "coordinator_cpu_ms_per_steady_tick": r.coordinator_cpu_ms,
            }),
        );
    }
    let first = |r: &SizeResult| r.first_ms.map_or_else(|| "?".to_string(), num);
    out.fig(
        Figure::new("tick_ms_100k", "ms", Goal::AtMost(5.0))
            .value(big.steady_ms)
            .detail(format!(
                "steady leader tick, mean of {:.0} ticks, 100k channels on 2 nodes, 1k idle (already stopped); CPU per tick: redis-server {} ms, coordinator {} ms; the first tick, which sends the 1k stops, took {} ms",
                big.steady_ticks,
                num(big.redis_cpu_ms),
                num(big.coordinator_cpu_ms),
                first(big)
            )),
    );
    out.fig(
        Figure::new("tick_ratio_100k_1k", "ratio", Goal::AtMost(3.0))
            .value(big.steady_ms / small.steady_ms)
            .detail(format!(
                "steady tick {} ms (100k) / {} ms (1k); first ticks {} / {} ms",
                num(big.steady_ms),
                num(small.steady_ms),
                first(big),
                first(small)
            )),
    );
    Ok(out)
}

async fn measure(n: usize, s: &Settings) -> Result<SizeResult, String> {
    let redis = RedisServer::start();
    let mut c = redis.conn().await;
    let now = redis_now(&mut c).await?;
    let t = std::time::Instant::now();
    let idle = seed(&mut c, n, now).await?;
    let seed_s = t.elapsed().as_secs_f64();
    let co = start_coordinator(redis.url()).await?;
    let client = http();
    let base = co.base_url();
    // The first leading tick: caught by polling the tick count quickly.
    let (sum1, count1) = wait_ticks(&client, &base, 1.0, Duration::from_secs(60), 5).await?;
    let first_ms = (count1 == 1.0).then_some(sum1 * 1000.0);
    let stops_sent = stops_sent(&mut c).await?;
    // The nodes' part: they stop the idle channels and release them.
    farm_tests::coordinator::release_channels(&mut c, &idle)
        .await
        .map_err(|e| format!("release idle channels: {e}"))?;
    // Past the new-leader settle time (node_ttl 1 s = 10 ticks), with margin.
    let (_, released_at) = snapshot(&client, &base).await?;
    let (s0, c0) = wait_ticks(
        &client,
        &base,
        released_at + 15.0,
        Duration::from_secs(60),
        50,
    )
    .await?;
    let cpu = |pid: i32| crate::sys::cpu_seconds(pid).unwrap_or(f64::NAN);
    let (redis0, co0) = (cpu(redis.pid()), cpu(co.pid()));
    let (s1, c1) = wait_ticks(
        &client,
        &base,
        c0 + s.steady_ticks as f64,
        Duration::from_secs(120),
        250,
    )
    .await?;
    let (redis1, co1) = (cpu(redis.pid()), cpu(co.pid()));
    drop(co);
    let ticks = c1 - c0;
    if ticks <= 0.0 {
        return Err("no steady ticks counted".into());
    }
    Ok(SizeResult {
        channels: n,
        idle: idle.len(),
        seed_s,
        first_ms,
        stops_sent,
        steady_ms: (s1 - s0) * 1000.0 / ticks,
        steady_ticks: ticks,
        redis_cpu_ms: (redis1 - redis0) * 1000.0 / ticks,
        coordinator_cpu_ms: (co1 - co0) * 1000.0 / ticks,
    })
}

/// farm-coordinator on `url` with a 100 ms tick (node TTL 1 s, lease TTL 10 s, idle timeout 60 s).
async fn start_coordinator(url: String) -> Result<CoordinatorProcess, String> {
    tokio::task::spawn_blocking(move || {
        CoordinatorProcess::spawn(
            CoordinatorOpts::new("bench", url)
                .args(coordinator_args(
                    &[
                        ("--tick", "100ms"),
                        ("--node-ttl", "1s"),
                        ("--lease-ttl", "10s"),
                        ("--idle-timeout", "60s"),
                    ],
                    &[],
                ))
                .env("RUST_LOG", "info"),
        )
    })
    .await
    .map_err(|e| format!("start farm-coordinator: {e}"))
}

/// Commands the coordinator sent to the nodes' command streams (the stops of the idle channels).
async fn stops_sent(c: &mut redis::aio::MultiplexedConnection) -> Result<u64, String> {
    let k = farm_proto::Keys::new("farm");
    let mut stops_sent = 0u64;
    for node in ["n1", "n2"] {
        let len: u64 = redis::cmd("XLEN")
            .arg(k.cmd(node))
            .query_async(c)
            .await
            .map_err(|e| format!("XLEN: {e}"))?;
        stops_sent += len;
    }
    Ok(stops_sent)
}

/// `(sum, count)` of the coordinator's tick duration histogram.
async fn snapshot(client: &reqwest::Client, base: &str) -> Result<(f64, f64), String> {
    let (status, body) = get(client, &format!("{base}/metrics")).await?;
    if status != 200 {
        return Err(format!("GET {base}/metrics: {status}"));
    }
    let text = String::from_utf8_lossy(&body);
    let sum = metric_sum(&text, "farm_coordinator_tick_duration_seconds_sum");
    let count = metric_sum(&text, "farm_coordinator_tick_duration_seconds_count");
    match (sum, count) {
        (Some(s), Some(c)) => Ok((s, c)),
        _ => Err("farm-coordinator exports no farm_coordinator_tick_duration_seconds".into()),
    }
}

/// Polls until the tick count reaches `count`; returns the snapshot then.
async fn wait_ticks(
    client: &reqwest::Client,
    base: &str,
    count: f64,
    timeout: Duration,
    poll_ms: u64,
) -> Result<(f64, f64), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let snap = snapshot(client, base).await?;
        if snap.1 >= count {
            return Ok(snap);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "farm-coordinator ran {} leader ticks, not {count}, within {timeout:?} (is it leading?)",
                snap.1
            ));
        }
        crate::util::pause(Duration::from_millis(poll_ms)).await;
    }
}

async fn redis_now(c: &mut MultiplexedConnection) -> Result<u64, String> {
    let (sec, us): (u64, u64) = redis::cmd("TIME")
        .query_async(c)
        .await
        .map_err(|e| format!("TIME: {e}"))?;
    Ok(sec * 1000 + us / 1000)
}

/// Two live nodes and `n` running channels as `claim.lua` and the nodes' keepalive leave them; 1 %
/// idle. Returns the idle channels.
async fn seed(c: &mut MultiplexedConnection, n: usize, now: u64) -> Result<Vec<String>, String> {
    let half = (n / 2).to_string();
    let k = farm_proto::Keys::new("farm");
    for node in ["n1", "n2"] {
        let _: () = redis::pipe()
            .hset_multiple(
                k.node(node),
                &[
                    ("capacity", "0"),
                    ("running", half.as_str()),
                    ("public_url", "http://127.0.0.1:9"),
                ],
            )
            .ignore()
            .zadd(k.nodes(), node, now)
            .ignore()
            .cmd("SET")
            .arg(k.node_alive(node))
            .arg("bench")
            .arg("EX")
            .arg(600)
            .ignore()
            .query_async(c)
            .await
            .map_err(|e| format!("seed node: {e}"))?;
    }
    farm_tests::coordinator::seed_running_channels(
        c,
        n,
        now,
        IDLE_TIMEOUT_MS,
        &[("gen", "1"), ("state", "running")],
    )
    .await
    .map_err(|e| format!("seed channels: {e}"))
}
