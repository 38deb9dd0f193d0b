//! FFmpeg supervision with real FFmpeg against the fake provider: crash restart with backoff,
//! a provider refusing forever ends in `failed`, a stalled provider is restarted, a dead primary
//! URL falls over to the backup. Backoffs are measured at the processes (kernel start times in
//! /proc against the kill, or against the previous FFmpeg's end), with backoff base 1 s so the
//! 10 ms grain of /proc start times is small next to them; the backoff function itself has a unit
//! test here too.

use farm_tests::farm::{Farm, FarmBuilder};
use farm_tests::fixtures::*;
use farm_tests::invariants::{self, settle_time};
use farm_tests::node::NodeProcess;
use farm_tests::provider::{FakeProvider, Mode};
use farm_tests::redis::RedisServer;
use farm_tests::wait::eventually;
use redis::AsyncCommands;
use std::time::{Duration, Instant};

/// The invariant checker over the test's one node (TTL 3 s, no coordinator).
async fn leaves_nothing(redis: &RedisServer, node: &NodeProcess) {
    let report = invariants::check_nodes(
        redis,
        &[node],
        settle_time(Duration::from_secs(3), Duration::from_millis(500)),
    )
    .await;
    println!("supervision: {}", report.figure());
    report.assert_clean();
}

async fn events(redis: &RedisServer) -> Vec<std::collections::HashMap<String, String>> {
    let mut c = redis.conn().await;
    let reply: redis::streams::StreamRangeReply =
        c.xrange_all("farm:events").await.expect("XRANGE");
    reply
        .ids
        .into_iter()
        .map(|e| {
            e.map
                .into_iter()
                .filter_map(|(k, v)| redis::from_redis_value::<String>(v).ok().map(|v| (k, v)))
                .collect()
        })
        .collect()
}

/// Backoff base and cap of these tests' nodes.
const BASE: Duration = Duration::from_secs(1);
const CAP: Duration = Duration::from_secs(2);
/// The grain of a kernel start time in /proc: one clock tick (100 Hz), rounded down.
const TICK_GRAIN: Duration = Duration::from_millis(10);

/// The shortest backoff after the `k`-th crash in the window: ½ × base × 2^(k-1), capped.
fn least_backoff(k: u32) -> Duration {
    (BASE * 2u32.pow(k - 1)).min(CAP) / 2
}

/// The longest: 1.5 × base × 2^(k-1), capped.
fn most_backoff(k: u32) -> Duration {
    (BASE * 2u32.pow(k - 1) * 3 / 2).min(CAP)
}

/// Node n1 with backoff base 1 s and cap 2 s and `extra` arguments, and channel `id` reading
/// `/<id>.ts` on the fake provider.
fn supervised(id: &str, extra: &[&str]) -> FarmBuilder {
    Farm::builder()
        .provider_channel(id, &format!("/{id}.ts"))
        .nodes(&["n1"])
        .node_value("--backoff-base", "1s")
        .node_value("--backoff-max", "2s")
        .node_args(extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_ffmpeg_is_restarted_after_a_backoff_and_counted() {
    let farm = supervised("kids", &[]).start().await;
    let (redis, root) = (&farm.redis, &farm.root);
    let node = farm.node("n1");
    let url = format!("{}/live/kids/index.m3u8", node.base_url());
    assert_eq!(get_observed(&url).await.status, 200);
    // The victim as /proc shows it: the one FFmpeg under the node's root.
    let running = ffmpegs_under(root.path());
    assert_eq!(running.len(), 1, "{running:?}");
    let old = running[0];

    farm_tests::signal::kill9(old).expect("kill -9 ffmpeg");
    let killed_ms = farm_tests::procs::now_ms();
    let killed_at = Instant::now();
    let (new, new_start_ms) =
        eventually("a new ffmpeg in /proc", Duration::from_secs(20), || async {
            let pid = ffmpegs_under(root.path()).into_iter().find(|p| *p != old)?;
            Some((pid, farm_tests::procs::start_unix_ms(pid)?))
        })
        .await;
    let gap = Duration::from_millis(new_start_ms.saturating_sub(killed_ms));
    println!(
        "kill -9 of ffmpeg {old} -> ffmpeg {new} started {gap:?} later (kernel start time; backoff \
after 1 crash: {:?}..{:?}, /proc grain {TICK_GRAIN:?})",
        least_backoff(1),
        most_backoff(1)
    );
    assert!(
        gap + TICK_GRAIN >= least_backoff(1),
        "restarted {gap:?} after the crash: no backoff (at least {:?})",
        least_backoff(1)
    );
    assert!(
        gap <= most_backoff(1) + Duration::from_millis(500),
        "restarted {gap:?} after the crash, backoff at most {:?}",
        most_backoff(1)
    );
    let new = eventually(
        "the new ffmpeg recorded",
        Duration::from_secs(20),
        || async {
            let h = hgetall(redis, "farm:stream:kids").await;
            let pid: i32 = h.get("pid")?.parse().ok()?;
            (pid == new && h.get("state")? == "running").then_some((pid, h))
        },
    )
    .await;
    println!(
        "restart after kill -9 took {:?} until running (backoff included)",
        killed_at.elapsed()
    );
    assert_eq!(new.1["restarts"], "1");
    assert!(
        new.1["last_error"].contains("signal") || new.1["last_error"].contains("9"),
        "{:?}",
        new.1
    );
    assert_eq!(
        ffmpegs_under(root.path()),
        vec![new.0],
        "only the new ffmpeg runs"
    );
    let ev = events(redis).await;
    assert!(
        ev.iter()
            .any(|e| e["event"] == "restarted" && e["channel"] == "kids"),
        "{ev:?}"
    );
    // Viewers keep getting the playlist: the new run's segments follow the old ones after a
    // discontinuity, their media sequence numbers continuing (not starting again at 0).
    let p = eventually("the new run published", Duration::from_secs(10), || async {
        let r = get_observed(&url).await;
        let p = farm_tests::hls::MediaPlaylist::parse(&r.text()).ok()?;
        p.segments.iter().any(|s| s.discontinuity).then_some(p)
    })
    .await;
    let cut = p
        .segments
        .iter()
        .position(|s| s.discontinuity)
        .expect("a discontinuity");
    assert!(cut > 0, "the old run's segments are still listed: {p:?}");
    assert!(
        p.segments[cut].sequence > p.segments[cut - 1].sequence,
        "sequence continues after a restart: {p:?}"
    );
    leaves_nothing(redis, node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_refusing_forever_ends_in_failed_with_the_reason_and_spawns_stop() {
    let farm = supervised(
        "gone",
        &[
            "--max-crashes",
            "3",
            "--crash-window",
            "60s",
            "--failed-hold",
            "30s",
            "--start-timeout",
            "20s",
        ],
    )
    .start()
    .await;
    let (redis, provider, root) = (&farm.redis, farm.provider(), &farm.root);
    // Before the first playlist request, which starts the channel.
    provider.set_path_mode("/gone.ts", Mode::Forbidden);
    let node = farm.node("n1");
    let url = format!("{}/live/gone/index.m3u8", node.base_url());
    // Every FFmpeg of the node, from /proc, scanned every 5 ms (a refused FFmpeg lives ~100 ms).
    let scan = Duration::from_millis(5);
    let spawns = farm_tests::procs::Spawns::start(&root.path().to_string_lossy(), scan);
    let t0 = Instant::now();
    let r = get_observed(&url).await;
    println!(
        "failed after {:?}: {} {}",
        t0.elapsed(),
        r.status,
        r.text().trim()
    );
    assert_eq!(r.status, 503);
    // Viewers get a generic reason (FFmpeg's text quotes upstream URLs); the hash names the 403.
    assert!(
        r.text().contains("is failing upstream; retry later"),
        "{}",
        r.text()
    );
    assert!(!r.header("retry-after").is_empty());

    // Viewers learn of the failure the moment it happens; the stream hash follows.
    let h = eventually(
        "the stream hash says failed",
        Duration::from_secs(5),
        || async {
            let h = hgetall(redis, "farm:stream:gone").await;
            (h.get("state").map(String::as_str) == Some("failed")).then_some(h)
        },
    )
    .await;
    assert!(h["last_error"].contains("403"), "{h:?}");
    assert!(!exists(redis, "farm:owner:gone").await, "lease released");
    assert_eq!(
        provider.total_connections_for("/gone.ts"),
        3,
        "three attempts, then stop"
    );
    // The gaps between one FFmpeg's end (first scan without it) and the next one's kernel start.
    let seen = spawns.seen();
    drop(spawns);
    assert_eq!(seen.len(), 3, "three FFmpegs seen in /proc: {seen:?}");
    let gaps: Vec<Duration> = seen
        .windows(2)
        .map(|w| {
            let ended = w[0].gone_ms.expect("the earlier one ended");
            Duration::from_millis(w[1].start_ms.saturating_sub(ended))
        })
        .collect();
    println!(
        "gaps between a refused FFmpeg's end and the next start: {gaps:?} (at least {:?}, {:?}; grain {:?})",
        least_backoff(1),
        least_backoff(2),
        TICK_GRAIN + scan
    );
    for (i, gap) in gaps.iter().enumerate() {
        let k = i as u32 + 1;
        assert!(
            *gap + TICK_GRAIN + scan >= least_backoff(k),
            "restart {k} came {gap:?} after the crash: backoff at least {:?}",
            least_backoff(k)
        );
        assert!(
            *gap <= most_backoff(k) + Duration::from_millis(500),
            "restart {k} came {gap:?} after the crash: backoff at most {:?}",
            most_backoff(k)
        );
    }
    // Viewers keep asking; nothing is spawned again while the failure holds.
    for _ in 0..5 {
        let r = get_observed(&url).await;
        assert_eq!(r.status, 503);
        assert!(r.text().contains("is failing upstream"));
    }
    assert_eq!(
        provider.total_connections_for("/gone.ts"),
        3,
        "spawns stopped"
    );
    assert_eq!(metric(node, "farm_node_ffmpeg_spawns_total").await, 3.0);
    assert!(ffmpegs_under(root.path()).is_empty());
    assert!(!root.path().join("n1/gone").exists(), "folder removed");
    let ev = events(redis).await;
    assert!(
        ev.iter()
            .any(|e| e["event"] == "failed" && e["reason"].contains("403")),
        "{ev:?}"
    );
    leaves_nothing(redis, node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_provider_is_restarted_within_three_segments_plus_read_timeout() {
    let redis = RedisServer::start();
    let provider = FakeProvider::start().await;
    let root = tempfile::tempdir().expect("tempdir");
    add_channel(&redis, "slow", &provider.url("/slow.ts"), &[]);
    // hls_time 1s (FAST), read timeout 3s: the bound is 3 × 1 s + 3 s = 6 s.
    let node = node(&redis, "n1", root.path(), false, &["--read-timeout", "3s"]);
    let url = format!("{}/live/slow/index.m3u8", node.base_url());
    assert_eq!(get_observed(&url).await.status, 200);
    let old = hgetall(&redis, "farm:stream:slow").await["pid"].clone();

    provider.set_path_mode("/slow.ts", Mode::Stall);
    let stalled_at = Instant::now();
    let (after, h) = eventually(
        "the stalled ffmpeg is replaced",
        Duration::from_secs(20),
        || async {
            let h = hgetall(&redis, "farm:stream:slow").await;
            (h.get("restarts").map(String::as_str) != Some("0")).then(|| (stalled_at.elapsed(), h))
        },
    )
    .await;
    println!(
        "stall detected and restart begun after {after:?}: {}",
        h["last_error"]
    );
    assert!(
        after <= Duration::from_secs(6) + Duration::from_millis(1500),
        "restart within 3 × hls_time + read timeout: {after:?}"
    );
    provider.set_path_mode("/slow.ts", Mode::Normal);
    eventually("running again", Duration::from_secs(20), || async {
        let h = hgetall(&redis, "farm:stream:slow").await;
        (h.get("state")? == "running" && *h.get("pid")? != old).then_some(())
    })
    .await;
    assert_eq!(get_observed(&url).await.status, 200);
    leaves_nothing(&redis, &node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_primary_url_falls_over_to_the_backup() {
    let redis = RedisServer::start();
    let provider = FakeProvider::start().await;
    provider.set_path_mode("/primary.ts", Mode::NotFound);
    let root = tempfile::tempdir().expect("tempdir");
    add_channel(
        &redis,
        "movie",
        &provider.url("/primary.ts"),
        &["--backup", &provider.url("/backup.ts")],
    );
    let node = node(
        &redis,
        "n1",
        root.path(),
        false,
        &["--start-timeout", "15s"],
    );
    let r = get(&format!("{}/live/movie/index.m3u8", node.base_url())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let h = hgetall(&redis, "farm:stream:movie").await;
    assert_eq!(h["source"], provider.url("/backup.ts"), "{h:?}");
    assert!(h["last_error"].contains("404"), "{h:?}");
    assert_eq!(provider.current_connections_for("/backup.ts"), 1);
    let mut c = redis.conn().await;
    let n: u64 = c.xlen("farm:events").await.expect("XLEN");
    assert!(n >= 2, "started and restarted events");
    leaves_nothing(&redis, &node).await;
}

/// The backoff function: ½ to 1.5 × base × 2^(k-1), capped at the max, jittered.
mod backoff_function {
    use farm_node::node::backoff;
    use std::time::Duration;

    #[test]
    fn grows_exponentially_with_jitter_and_is_capped() {
        let base = Duration::from_millis(200);
        let max = Duration::from_secs(5);
        for k in 1..=10u32 {
            let nominal = (base * 2u32.pow(k - 1)).min(max);
            let draws: Vec<Duration> = (0..2000).map(|_| backoff(base, max, k)).collect();
            let (lo, hi) = (
                draws.iter().min().copied().unwrap_or_default(),
                draws.iter().max().copied().unwrap_or_default(),
            );
            assert!(lo >= nominal / 2, "k={k}: {lo:?} below ½ × {nominal:?}");
            assert!(
                hi <= (nominal * 3 / 2).min(max),
                "k={k}: {hi:?} above the bound"
            );
            // Jitter: the draws spread over most of their range (not a constant).
            let range = (nominal * 3 / 2).min(max) - nominal / 2;
            assert!(
                hi - lo >= range * 8 / 10,
                "k={k}: draws {lo:?}..{hi:?} barely vary"
            );
        }
        // A first crash waits about the base, the fourth eight times more (below the cap).
        let mean = |k: u32| {
            (0..4000)
                .map(|_| backoff(base, max, k).as_secs_f64())
                .sum::<f64>()
                / 4000.0
        };
        let (m1, m4) = (mean(1), mean(4));
        assert!((m1 - 0.2).abs() < 0.02, "mean first backoff {m1}");
        assert!(
            (m4 / m1 - 8.0).abs() < 0.8,
            "mean fourth / first {}",
            m4 / m1
        );
    }

    #[test]
    fn never_exceeds_the_cap_even_after_many_crashes() {
        let max = Duration::from_secs(30);
        for k in [20, 31, 32, 1000, u32::MAX] {
            let b = backoff(Duration::from_millis(500), max, k);
            assert!(b <= max && b >= max / 2, "k={k}: {b:?}");
        }
        assert_eq!(backoff(Duration::ZERO, max, 3), Duration::ZERO);
    }
}
