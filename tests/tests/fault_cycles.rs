//! Start/stop cycles against one node (promise 6 and 9): the fake FFmpeg (a segment every 20 ms),
//! four channels cycled in parallel; each cycle is a playlist request (start, wait for the first
//! segment) and a stop, alternately through the admin API and through the node's command stream.
//!
//! Measured: cycles per second; zombies (none, ever, at the end); the node's open fds, threads and
//! RSS after a warm-up and at the end (growth bounded, printed); stop commands acked by the node
//! whose effect had not happened when the ack was seen ("lost acknowledged commands", must be 0).
//!
//! CI runs `FARM_CYCLES` cycles (default 2,000: about 30 s here). The full run:
//! `FARM_CYCLES=10000 cargo nextest run -p farm-tests --test fault_cycles --no-capture`.

use farm_tests::coordinator::{farmctl_ok, node_args, owner};
use farm_tests::fixtures::assert_settled;
use farm_tests::invariants;
use farm_tests::node::{NodeOpts, NodeProcess};
use farm_tests::procs;
use farm_tests::redis::RedisServer;
use farm_tests::wait::poll_until;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WORKERS: usize = 4;
const TOKEN: &str = "cycle-admin-token";

/// Open fds, threads and RSS (KiB) of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Usage {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

fn usage(pid: i32) -> Usage {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Usage {
        fds,
        threads: field("Threads:") as usize,
        rss_kib: field("VmRSS:"),
    }
}

/// The node's children but its guard (`farm-node __guard`, a child for the node's whole life).
fn ffmpeg_children(pid: i32) -> Vec<i32> {
    procs::children_of(pid)
        .into_iter()
        .filter(|c| !procs::cmdline(*c).is_some_and(|l| l.ends_with(" __guard")))
        .collect()
}

fn cycles_wanted() -> u64 {
    std::env::var("FARM_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

#[derive(Default)]
struct Counters {
    done: AtomicU64,
    admin_stops: AtomicU64,
    command_stops: AtomicU64,
    lost_acked: AtomicU64,
    failures: AtomicU64,
    /// Starts answered "is stopping; retry" right after the stop was acknowledged.
    stopping_after_ack: AtomicU64,
}

async fn worker(
    i: usize,
    base: String,
    redis_url: String,
    total: u64,
    counters: Arc<Counters>,
) -> Result<(), String> {
    let ch = format!("c{i}");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .map_err(|e| e.to_string())?;
    let client = redis::Client::open(redis_url).map_err(|e| e.to_string())?;
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let mut n = 0u64;
    loop {
        let done = counters.done.fetch_add(1, Ordering::AcqRel);
        if done >= total {
            return Ok(());
        }
        n += 1;
        // A start right after an acknowledged stop must work; a "stopping; retry" 503 is counted
        // (and retried like a player would) so the run goes on and reports everything.
        let mut tries = 0;
        let url = format!("{base}/live/{ch}/index.m3u8");
        loop {
            tries += 1;
            let r = http
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("{ch} cycle {n}: GET: {e}"))?;
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            if status == 200 {
                // One viewer per channel, cycle after cycle: the strict checker sees its playlists
                // across every stop and start.
                let found = farm_tests::hls::try_observe(&url, &body);
                if let Some(v) = found.first() {
                    return Err(format!("{ch} cycle {n}: playlist breaks RFC 8216: {v}"));
                }
                break;
            }
            if status == 503 && body.contains("is stopping") && tries < 100 {
                if tries == 1 {
                    counters.stopping_after_ack.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            return Err(format!("{ch} cycle {n}: GET answered {status}: {body}"));
        }
        if n.is_multiple_of(2) {
            let r = http
                .post(format!("{base}/admin/streams/{ch}/stop"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .map_err(|e| format!("{ch} cycle {n}: admin stop: {e}"))?;
            if r.status().as_u16() != 200 {
                return Err(format!(
                    "{ch} cycle {n}: admin stop answered {}",
                    r.status()
                ));
            }
            counters.admin_stops.fetch_add(1, Ordering::Relaxed);
        } else {
            let (_, gen) = owner(&mut c, "farm", &ch)
                .await
                .ok_or_else(|| format!("{ch} cycle {n}: no owner after a 200"))?;
            let id: String = redis::cmd("XADD")
                .arg("farm:cmd:n1")
                .arg("*")
                .arg("op")
                .arg("stop")
                .arg("channel")
                .arg(&ch)
                .arg("gen")
                .arg(gen)
                .arg("reason")
                .arg("cycle")
                .query_async(&mut c)
                .await
                .map_err(|e| e.to_string())?;
            // Acked = gone from the stream (the node XACKs and XDELs after the effect).
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let left: Vec<redis::Value> = redis::cmd("XRANGE")
                    .arg("farm:cmd:n1")
                    .arg(&id)
                    .arg(&id)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| e.to_string())?;
                if left.is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{ch} cycle {n}: stop command {id} not acked in 20s"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if owner(&mut c, "farm", &ch)
                .await
                .is_some_and(|(_, g)| g == gen)
            {
                counters.lost_acked.fetch_add(1, Ordering::Relaxed);
                counters.failures.fetch_add(1, Ordering::Relaxed);
                // Do not pile up: stop it through the admin API and go on.
                let _ = http
                    .post(format!("{base}/admin/streams/{ch}/stop"))
                    .bearer_auth(TOKEN)
                    .send()
                    .await;
            }
            counters.command_stops.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_start_stop_cycles_leave_no_zombie_and_no_growth() {
    let total = cycles_wanted();
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    let url = redis.url();
    for i in 0..WORKERS {
        farmctl_ok(
            &url,
            &[
                "channel",
                "add",
                &format!("c{i}"),
                &format!("http://127.0.0.1:9/c{i}.ts?mode=normal&seg_ms=20&bytes=2000"),
            ],
        );
    }
    let node = NodeProcess::spawn(
        NodeOpts::new("n1", &url, root.path().join("n1"))
            .with_fake_ffmpeg()
            .args(node_args("3s"))
            .args(["--admin-token", TOKEN]),
    );
    // RUST_LOG is debug for farm_node in the harness: the log grows, memory must not.
    let pid = node.pid();
    let base = node.base_url();
    let warmup = (total / 10).clamp(20, 400);
    let run = |n: u64, counters: Arc<Counters>| {
        let (base, url) = (base.clone(), url.clone());
        async move {
            let tasks: Vec<_> = (0..WORKERS)
                .map(|i| tokio::spawn(worker(i, base.clone(), url.clone(), n, counters.clone())))
                .collect();
            for t in tasks {
                if let Err(e) = t.await.expect("worker task") {
                    panic!("{e}");
                }
            }
        }
    };

    run(warmup, Arc::new(Counters::default())).await;
    let settle = || {
        poll_until(Duration::from_secs(5), || {
            (ffmpeg_children(pid).is_empty()).then_some(())
        })
    };
    settle();
    let before = usage(pid);
    let counters = Arc::new(Counters::default());
    let t0 = Instant::now();
    // Sample the node while it cycles: peaks and zombies that linger.
    let sampler = {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let h = std::thread::spawn(move || {
            let (mut peak, mut lingering) = (usage(pid), 0u32);
            let mut seen_zombie: Option<(i32, Instant)> = None;
            while !s2.load(Ordering::Acquire) {
                let u = usage(pid);
                peak = Usage {
                    fds: peak.fds.max(u.fds),
                    threads: peak.threads.max(u.threads),
                    rss_kib: peak.rss_kib.max(u.rss_kib),
                };
                // A zombie is normal for the instant between exit and wait; one that stays 1 s is not.
                match (procs::zombies_of(pid).first().copied(), seen_zombie) {
                    (Some(z), Some((old, since))) if z == old => {
                        if since.elapsed() > Duration::from_secs(1) {
                            lingering += 1;
                            seen_zombie = None;
                        }
                    }
                    (Some(z), _) => seen_zombie = Some((z, Instant::now())),
                    (None, _) => seen_zombie = None,
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (peak, lingering)
        });
        (stop, h)
    };
    run(total, counters.clone()).await;
    let took = t0.elapsed();
    sampler.0.store(true, Ordering::Release);
    let (peak, lingering) = sampler.1.join().expect("sampler thread");
    settle();
    let after = usage(pid);
    let zombies = procs::zombies_of(pid);
    let children = ffmpeg_children(pid);
    let lost = counters.lost_acked.load(Ordering::Relaxed);
    let stopping = counters.stopping_after_ack.load(Ordering::Relaxed);
    let (admin, cmd) = (
        counters.admin_stops.load(Ordering::Relaxed),
        counters.command_stops.load(Ordering::Relaxed),
    );
    println!(
        "{total} start/stop cycles ({admin} admin stops, {cmd} command-stream stops) after {warmup} warm-up cycles in {took:?} \
({:.1} cycles/s, {WORKERS} channels in parallel): fds {} -> {} (peak {}), threads {} -> {} (peak {}), RSS {} -> {} KiB (peak {}, growth {} KiB); \
zombies at the end {zombies:?}, zombies lingering > 1 s during the run {lingering}, children left {children:?}; lost acknowledged commands {lost} of {cmd}; \
starts answered 503 \"stopping\" after an acknowledged stop {stopping}",
        total as f64 / took.as_secs_f64(),
        before.fds,
        after.fds,
        peak.fds,
        before.threads,
        after.threads,
        peak.threads,
        before.rss_kib,
        after.rss_kib,
        peak.rss_kib,
        after.rss_kib as i64 - before.rss_kib as i64,
    );
    assert!(zombies.is_empty(), "zombies: {zombies:?}");
    assert_eq!(lingering, 0, "zombies lingered during the run");
    assert!(children.is_empty(), "children left: {children:?}");
    assert_eq!(lost, 0, "acked stop commands without effect");
    // Bounds: a few fds for pooled connections and tokio's blocking threads, which come and go.
    assert!(
        after.fds <= before.fds + 8,
        "fds grew: {before:?} -> {after:?}"
    );
    assert!(
        after.threads <= before.threads + 8,
        "threads grew: {before:?} -> {after:?}"
    );
    assert!(
        after.rss_kib <= before.rss_kib + 32 * 1024,
        "RSS grew more than 32 MiB: {before:?} -> {after:?}"
    );
    let settle = invariants::settle_time(Duration::from_secs(3), Duration::from_millis(500));
    assert_settled(&redis, &[&node], settle, "cycles").await;
    // node.rs run_channel answers the stop (`done`) before the entry leaves the channel map, so a
    // start in between finds the finished entry and answers 503 "stopping; retry".
    assert_eq!(
        stopping, 0,
        "a start right after an acknowledged stop was answered 503 'is stopping'"
    );
}
