//! The soak (promises 1, 4, 5 and 9 together): 3 nodes, 2 coordinators, 200 fake-FFmpeg channels,
//! synthetic viewers that come and go, and random `kill -9` + restart of nodes and coordinators.
//!
//! Every 100 ms a sampler counts the FFmpegs of every channel over the three nodes' roots: no channel
//! may ever run twice. When the chaos ends (everything restarted), the invariant checker must find
//! nothing within `2 × node_ttl + tick`.
//!
//! Lease and node TTL 3 s, tick 500 ms, idle timeout 5 s. Viewers: each channel flips between
//! watched (5–15 s, a playlist request about every second through a random node, redirects
//! followed) and unwatched (3–12 s). Faults: every 2–5 s, kill -9 of a random node (at most one down
//! at a time, restarted after 2–6 s, same id and HLS root) or of a random coordinator (restarted
//! after 1–4 s).
//!
//! Bounds asserted: never two runnable FFmpegs for a channel (every 100 ms sample); the checker
//! clean over its whole window after the chaos; a watching viewer is never without a playlist
//! for longer than promise 4 allows, `node_ttl + tick` + the fake FFmpeg's first segment (1 s) +
//! one request interval + 0.5 s (from its first failed request to its next served one, or from a
//! second kill in the middle of it; + `leader_ttl` when that was a coordinator's, whose successor
//! reaps after its settle time); once the farm has settled, every request of a watching viewer is
//! served (3 s of steady viewing).
//!
//! CI runs `soak_short` (`FARM_SOAK_SECS`, default 45 s of chaos). The long one, 5 minutes:
//! `FARM_SOAK_SECS=300 cargo test -p farm-tests --test soak -- --ignored --nocapture`
//! (`FARM_SOAK_SEED=<n>` replays a run's random choices; the seed is printed).

use farm_tests::coordinator::{events, farmctl_ok, node_args, CoordinatorOpts, CoordinatorProcess};
use farm_tests::farm::coordinator_args;
use farm_tests::invariants::{self, settle_time, FarmNode};
use farm_tests::node::{NodeOpts, NodeProcess};
use farm_tests::redis::RedisServer;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CHANNELS: usize = 200;
const NODE_TTL: Duration = Duration::from_secs(3);
const TICK: Duration = Duration::from_millis(500);
const LEADER_TTL: Duration = Duration::from_secs(3);
/// Viewer requests in flight at most (a start can take seconds; the rest waits its turn).
const INFLIGHT: usize = 48;

/// xorshift64*: reproducible random choices from a printed seed.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// What the chaos thread did.
#[derive(Debug, Default)]
struct ChaosReport {
    node_kills: u32,
    coordinator_kills: u32,
    restarts: u32,
    log: Vec<String>,
    /// When each kill happened, and whether it was a coordinator's: a viewer's outage is bounded
    /// from the last fault that reached it.
    kills: Vec<(Instant, bool)>,
}

impl ChaosReport {
    /// A line of the log, stamped with the seconds since `t0` (the chaos's start).
    fn note(&mut self, t0: Instant, what: String) {
        let at = t0.elapsed().as_secs_f64();
        self.log.push(format!("{at:>6.1}s {what}"));
    }

    /// A kill -9 of `who`, a coordinator when `coordinator`: counted, timed and logged.
    fn killed(&mut self, t0: Instant, who: String, coordinator: bool) {
        if coordinator {
            self.coordinator_kills += 1;
        } else {
            self.node_kills += 1;
        }
        self.kills.push((Instant::now(), coordinator));
        self.note(t0, format!("kill -9 {who}"));
    }
}

enum Target {
    Node(usize),
    Coordinator(usize),
}

/// Kills and restarts nodes and coordinators until `until`, then restarts whatever is down.
fn chaos(
    until: Instant,
    nodes: &mut [NodeProcess],
    coords: &mut [CoordinatorProcess],
    bases: &Mutex<Vec<Option<String>>>,
    mut rng: Rng,
) -> ChaosReport {
    let t0 = Instant::now();
    let mut report = ChaosReport::default();
    let mut pending: Vec<(Instant, Target)> = Vec::new();
    let mut next_fault = Instant::now() + rng.ms(2000, 5000);
    let restart = |t: &Target,
                   nodes: &mut [NodeProcess],
                   coords: &mut [CoordinatorProcess],
                   report: &mut ChaosReport| {
        match *t {
            Target::Node(i) => {
                let fresh = NodeProcess::spawn(nodes[i].opts().clone());
                lock(bases)[i] = Some(fresh.base_url());
                // The new one first: the harness sweeps a root only when its last node goes.
                let _old = std::mem::replace(&mut nodes[i], fresh);
                report.note(t0, format!("restart node {}", nodes[i].node_id()));
            }
            Target::Coordinator(i) => {
                let fresh = CoordinatorProcess::spawn(coords[i].opts().clone());
                let _old = std::mem::replace(&mut coords[i], fresh);
                report.note(t0, format!("restart coordinator {}", coords[i].id()));
            }
        }
        report.restarts += 1;
    };
    while Instant::now() < until {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = pending.into_iter().partition(|(at, _)| *at <= now);
        pending = later;
        for (_, t) in &due {
            restart(t, nodes, coords, &mut report);
        }
        if now >= next_fault {
            let node_down = pending.iter().any(|(_, t)| matches!(t, Target::Node(_)));
            if !node_down && rng.below(2) == 0 {
                let i = rng.below(nodes.len() as u64) as usize;
                nodes[i].kill9();
                lock(bases)[i] = None;
                report.killed(t0, format!("node {}", nodes[i].node_id()), false);
                pending.push((now + rng.ms(2000, 6000), Target::Node(i)));
            } else {
                let up: Vec<usize> = (0..coords.len())
                    .filter(|i| {
                        !pending
                            .iter()
                            .any(|(_, t)| matches!(t, Target::Coordinator(j) if j == i))
                    })
                    .collect();
                if !up.is_empty() {
                    let i = up[rng.below(up.len() as u64) as usize];
                    coords[i].kill9();
                    report.killed(t0, format!("coordinator {}", coords[i].id()), true);
                    pending.push((now + rng.ms(1000, 4000), Target::Coordinator(i)));
                }
            }
            next_fault = now + rng.ms(2000, 5000);
        }
        // Fault pacing, not synchronisation.
        std::thread::sleep(Duration::from_millis(100));
    }
    for (_, t) in &pending {
        restart(t, nodes, coords, &mut report);
    }
    report
}

#[derive(Debug, Default)]
struct Sampled {
    samples: u64,
    double_samples: u64,
    max_per_channel: usize,
    first_doubles: Vec<String>,
}

/// Every 100 ms: the largest number of runnable FFmpegs of one channel over the farm.
fn sampler(nodes: Vec<FarmNode>, stop: Arc<AtomicBool>, t0: Instant) -> Sampled {
    let mut s = Sampled::default();
    while !stop.load(Ordering::Acquire) {
        let mut per: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for p in invariants::farm_ffmpegs(&nodes)
            .into_iter()
            .filter(|p| !p.stopped)
        {
            per.entry(p.channel)
                .or_default()
                .push(format!("{}:{}", p.node, p.pid));
        }
        s.samples += 1;
        let worst = per.values().map(Vec::len).max().unwrap_or(0);
        s.max_per_channel = s.max_per_channel.max(worst);
        if worst > 1 {
            s.double_samples += 1;
            if s.first_doubles.len() < 5 {
                for (ch, who) in per.iter().filter(|(_, w)| w.len() > 1) {
                    s.first_doubles
                        .push(format!("{:.1}s {ch}: {who:?}", t0.elapsed().as_secs_f64()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    s
}

/// A new run's first segment (the fake FFmpeg's `seg_ms`) and a viewer's longest request
/// interval, for the outage bound.
const FIRST_SEGMENT: Duration = Duration::from_secs(1);
const REQUEST_EVERY_MAX: Duration = Duration::from_millis(1200);
const SLACK: Duration = Duration::from_millis(500);

/// One viewer request: (channel, watching session, sent at, served, after the chaos).
type Request = (usize, u64, Instant, bool, bool);

#[derive(Default)]
struct ViewerStats {
    requests: AtomicU64,
    skipped: AtomicU64,
    statuses: Mutex<BTreeMap<u16, u64>>,
    /// Every request, for the bounds.
    log: Mutex<Vec<Request>>,
    /// Per channel, when the last playlist fed to the strict checker was asked for: a viewer's
    /// answers are checked in the order it asked (an older answer arriving late is skipped).
    checked_up_to: Mutex<BTreeMap<usize, Instant>>,
    /// What the strict RFC 8216 checker found.
    violations: Mutex<Vec<String>>,
}

/// A viewer's outage: how long, what bound it is held to, and which one it was.
struct Outage {
    took: Duration,
    bound: Duration,
    which: String,
}

/// The bound of an outage a node's death began: promise 4 (the dead node detected within
/// `node_ttl + tick`, then the new owner's first segment), plus one request interval (the viewer
/// asks again) and 0.5 s.
const NODE_BOUND: Duration = Duration::from_millis(
    (NODE_TTL.as_millis()
        + TICK.as_millis()
        + FIRST_SEGMENT.as_millis()
        + REQUEST_EVERY_MAX.as_millis()
        + SLACK.as_millis()) as u64,
);
/// A coordinator killed while it re-homes: the other takes the leadership within `leader_ttl`
/// and reaps after `reap_settle` (= `node_ttl`) in its new term, then as for a node.
const COORDINATOR_BOUND: Duration =
    Duration::from_millis(NODE_BOUND.as_millis() as u64 + LEADER_TTL.as_millis() as u64);

/// The worst outage of a watching viewer during the chaos (by how much it exceeds its bound): the
/// time without a playlist from its first failed request, or from the last kill before its next
/// served one when a second fault came in the middle (the promises are bounds per fault: a
/// coordinator killed while it re-homes, or the node that took the channel killed in turn, starts
/// the clock again, with that fault's bound). Also how many sessions ended while failing, and how
/// many outages a later kill restarted.
fn worst_outage(log: &[Request], kills: &[(Instant, bool)]) -> (Outage, usize, usize) {
    let mut by: BTreeMap<(usize, u64), Vec<(Instant, bool)>> = BTreeMap::new();
    for (ch, session, at, ok, steady) in log {
        if !steady {
            by.entry((*ch, *session)).or_default().push((*at, *ok));
        }
    }
    let mut worst = Outage {
        took: Duration::ZERO,
        bound: NODE_BOUND,
        which: "none".into(),
    };
    let (mut unresolved, mut refaulted) = (0, 0);
    for ((ch, session), mut reqs) in by {
        reqs.sort();
        let mut failing_since: Option<Instant> = None;
        for (at, ok) in &reqs {
            match (ok, failing_since) {
                (false, None) => failing_since = Some(*at),
                (true, Some(since)) => {
                    let last_kill = kills
                        .iter()
                        .copied()
                        .filter(|(k, _)| *k > since && k < at)
                        .max();
                    refaulted += usize::from(last_kill.is_some());
                    let o = Outage {
                        took: *at - last_kill.map_or(since, |(k, _)| k),
                        bound: match last_kill {
                            Some((_, true)) => COORDINATOR_BOUND,
                            _ => NODE_BOUND,
                        },
                        which: format!(
                            "s{ch} (session {session}){}",
                            match last_kill {
                                Some((_, true)) =>
                                    ", counted from a coordinator's kill in the middle of it",
                                Some((_, false)) =>
                                    ", counted from a node's kill in the middle of it",
                                None => "",
                            }
                        ),
                    };
                    if o.took.as_secs_f64() - o.bound.as_secs_f64()
                        > worst.took.as_secs_f64() - worst.bound.as_secs_f64()
                    {
                        worst = o;
                    }
                    failing_since = None;
                }
                _ => {}
            }
        }
        if failing_since.is_some() {
            unresolved += 1;
        }
    }
    (worst, unresolved, refaulted)
}

/// Viewers come and go until `steady` is set, then the ones watching keep watching (and the others
/// stay away) until `stop`.
async fn viewers(
    steady: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    bases: Arc<Mutex<Vec<Option<String>>>>,
    mut rng: Rng,
    stats: Arc<ViewerStats>,
) {
    struct Session {
        watched: bool,
        flip_at: Instant,
        next_request: Instant,
        /// Bumped each time the viewer starts watching.
        number: u64,
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(12))
        .build()
        .expect("http client");
    let now = Instant::now();
    let mut sessions: Vec<Session> = (0..CHANNELS)
        .map(|_| Session {
            watched: rng.below(2) == 0,
            flip_at: now + rng.ms(0, 10_000),
            next_request: now + rng.ms(0, 1000),
            number: 0,
        })
        .collect();
    let inflight = Arc::new(tokio::sync::Semaphore::new(INFLIGHT));
    let mut requests = tokio::task::JoinSet::new();
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        let flips = !steady.load(Ordering::Acquire);
        for (i, s) in sessions.iter_mut().enumerate() {
            if flips && now >= s.flip_at {
                s.watched = !s.watched;
                s.flip_at = now
                    + if s.watched {
                        rng.ms(5000, 15_000)
                    } else {
                        rng.ms(3000, 12_000)
                    };
                s.next_request = now;
                s.number += 1;
            }
            if !s.watched || now < s.next_request {
                continue;
            }
            s.next_request = now + rng.ms(800, 1200);
            let live: Vec<String> = lock(&bases).iter().flatten().cloned().collect();
            if live.is_empty() {
                continue;
            }
            let Ok(permit) = inflight.clone().try_acquire_owned() else {
                stats.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let url = format!(
                "{}/live/s{i}/index.m3u8",
                live[rng.below(live.len() as u64) as usize]
            );
            let (http, stats) = (http.clone(), stats.clone());
            let (session, steady_now) = (s.number, !flips);
            requests.spawn(async move {
                let sent = Instant::now();
                let (status, body) = match http.get(&url).send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        (status, r.text().await.unwrap_or_default())
                    }
                    Err(_) => (0, String::new()),
                };
                if status == 200 {
                    let newer = {
                        let mut up_to = lock(&stats.checked_up_to);
                        let newer = up_to.get(&i).is_none_or(|t| *t < sent);
                        if newer {
                            up_to.insert(i, sent);
                        }
                        newer
                    };
                    if newer {
                        for v in farm_tests::hls::try_observe(&url, &body) {
                            lock(&stats.violations).push(v.to_string());
                        }
                    }
                }
                stats.requests.fetch_add(1, Ordering::Relaxed);
                *lock(&stats.statuses).entry(status).or_default() += 1;
                lock(&stats.log).push((i, session, sent, status == 200, steady_now));
                drop(permit);
            });
        }
        while requests.try_join_next().is_some() {}
        // A viewer's pacing.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while requests.join_next().await.is_some() {}
}

async fn soak(chaos_for: Duration) {
    let seed = env_u64("FARM_SOAK_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1
    });
    println!("soak: {CHANNELS} channels, 3 nodes, 2 coordinators, {chaos_for:?} of chaos, FARM_SOAK_SEED={seed}");
    let mut rng = Rng(seed);
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    let url = redis.url();
    let mut m3u = String::from("#EXTM3U\n");
    for i in 0..CHANNELS {
        m3u.push_str(&format!(
            "#EXTINF:-1 tvg-id=\"s{i}\",Soak {i}\nhttp://127.0.0.1:9/s{i}.ts?mode=normal&seg_ms=1000\n"
        ));
    }
    let m3u_path = root.path().join("soak.m3u");
    std::fs::write(&m3u_path, m3u).expect("write m3u");
    farmctl_ok(&url, &["import", &m3u_path.to_string_lossy()]);
    let mut nodes: Vec<NodeProcess> = (1..=3)
        .map(|i| {
            let id = format!("n{i}");
            NodeProcess::spawn(
                NodeOpts::new(&id, &url, root.path().join(&id))
                    .with_fake_ffmpeg()
                    .args(node_args("3s"))
                    .args(["--max-streams", "150", "--start-timeout", "8s"]),
            )
        })
        .collect();
    let mut coords: Vec<CoordinatorProcess> = (1..=2)
        .map(|i| {
            CoordinatorProcess::spawn(CoordinatorOpts::new(format!("c{i}"), &url).args(
                coordinator_args(
                    &[
                        ("--idle-timeout", "5s"),
                        ("--tick", "500ms"),
                        ("--leader-ttl", &format!("{}s", LEADER_TTL.as_secs())),
                    ],
                    &[],
                ),
            ))
        })
        .collect();
    let farm: Vec<FarmNode> = nodes
        .iter()
        .map(|n| FarmNode::dead(n.node_id(), n.hls_root()))
        .collect();
    let bases = Arc::new(Mutex::new(
        nodes.iter().map(|n| Some(n.base_url())).collect::<Vec<_>>(),
    ));

    let t0 = Instant::now();
    let until = t0 + chaos_for;
    let stop = Arc::new(AtomicBool::new(false));
    let sample = {
        let (farm, stop) = (farm.clone(), stop.clone());
        std::thread::spawn(move || sampler(farm, stop, t0))
    };
    let stats = Arc::new(ViewerStats::default());
    let (steady, viewers_stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let watchers = tokio::spawn(viewers(
        steady.clone(),
        viewers_stop.clone(),
        bases.clone(),
        rng.clone(),
        stats.clone(),
    ));
    rng.next();
    let chaos_rng = Rng(rng.next() | 1);
    let (mut nodes, coords, chaos_report) = tokio::task::spawn_blocking({
        let bases = bases.clone();
        move || {
            let r = chaos(until, &mut nodes, &mut coords, &bases, chaos_rng);
            (nodes, coords, r)
        }
    })
    .await
    .expect("chaos thread");
    let chaos_end = Instant::now();

    // Everything runs again: the farm must settle with nothing left and nothing doubled, while the
    // viewers who watch go on watching (and the coordinator stops what nobody watches).
    steady.store(true, Ordering::Release);
    let alive: Vec<FarmNode> = nodes.iter().map(FarmNode::of).collect();
    let report = invariants::check(&redis, &alive, settle_time(NODE_TTL, TICK)).await;
    // Settled: from now on every request of a watching viewer is served.
    let steady_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await; // 3 s of steady viewing
    viewers_stop.store(true, Ordering::Release);
    watchers.await.expect("viewers");
    stop.store(true, Ordering::Release);
    let sampled = sample.join().expect("sampler thread");
    let mut c = redis.conn().await;
    let ev = events(&mut c, "farm").await;
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for e in &ev {
        *kinds.entry(e.kind().to_string()).or_default() += 1;
    }
    for line in &chaos_report.log {
        println!("chaos {line}");
    }
    println!(
        "soak ({:?} of chaos, seed {seed}): {} node kills, {} coordinator kills, {} restarts; viewers {} requests {:?} ({} skipped while {INFLIGHT} were in flight); \
events {kinds:?}; FFmpegs sampled every 100 ms: {} samples, max {} per channel, {} samples with a channel running twice {:?}; \
settled {:?} after the chaos: {}",
        chaos_for,
        chaos_report.node_kills,
        chaos_report.coordinator_kills,
        chaos_report.restarts,
        stats.requests.load(Ordering::Relaxed),
        lock(&stats.statuses),
        stats.skipped.load(Ordering::Relaxed),
        sampled.samples,
        sampled.max_per_channel,
        sampled.double_samples,
        sampled.first_doubles,
        chaos_end.elapsed(),
        report.figure()
    );
    assert_eq!(
        sampled.double_samples, 0,
        "a channel ran twice: {:?}",
        sampled.first_doubles
    );
    report.assert_clean();
    let log = lock(&stats.log).clone();
    let (worst, unresolved, refaulted) = worst_outage(&log, &chaos_report.kills);
    let steady: Vec<_> = log
        .iter()
        .filter(|(_, _, at, _, steady)| *steady && *at >= steady_from)
        .collect();
    let steady_failed = steady.iter().filter(|(_, _, _, ok, _)| !ok).count();
    println!(
        "viewers during the chaos: worst time without a playlist {:?} ({}; its bound {:?}: node_ttl + tick + first segment + one request interval + 0.5 s = {NODE_BOUND:?} after a node's kill, + leader_ttl = {COORDINATOR_BOUND:?} after a coordinator's), \
{refaulted} outages had a second kill in them; {unresolved} sessions ended while failing; after settling: {} requests, {steady_failed} not served",
        worst.took,
        worst.which,
        worst.bound,
        steady.len()
    );
    assert!(
        worst.took <= worst.bound,
        "a watching viewer went {:?} without a playlist ({}), bound {:?}",
        worst.took,
        worst.which,
        worst.bound
    );
    assert!(
        steady.len() >= 100,
        "too few steady requests: {}",
        steady.len()
    );
    assert_eq!(
        steady_failed, 0,
        "a watching viewer was not served after the farm settled"
    );
    let violations = lock(&stats.violations).clone();
    println!(
        "strict RFC 8216 checker over the viewers' playlists: {} violations",
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "the viewers' playlists break RFC 8216:\n{}",
        violations.join("\n")
    );
    for n in &mut nodes {
        assert!(n.running(), "node {} died by itself", n.node_id());
    }
    drop(coords);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_short() {
    soak(Duration::from_secs(env_u64("FARM_SOAK_SECS").unwrap_or(45))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "5 minutes: FARM_SOAK_SECS=300 cargo test -p farm-tests --test soak -- --ignored --nocapture"]
async fn soak_long() {
    soak(Duration::from_secs(
        env_u64("FARM_SOAK_SECS").unwrap_or(300),
    ))
    .await;
}
