//! Frozen owners with real FFmpeg (promises 1 and 2): two nodes and a coordinator, lease and node
//! TTL 3 s, tick 500 ms; the channel reads the fake provider over HTTP through its node's egress
//! gateway (in the node's guard process).
//!
//! - Only the `farm-node` process is frozen (SIGSTOP) for 3 × the lease TTL; its FFmpeg, its guard
//!   and the provider keep going. Sampled every 50 ms from `/proc` and from the provider: never two
//!   live FFmpegs for the channel, never two provider connections; the frozen node's FFmpeg and
//!   its upstream connection are gone by its fence time (the last renewal + ⅔ TTL, bounded from
//!   the lease's PTTL at the freeze); the channel moves and a viewer gets new segments from the
//!   other node; after SIGCONT the old node heartbeats again, runs nothing of the moved channel, and
//!   the invariant checker is clean.
//! - The node's whole cgroup is frozen (node, FFmpeg and guard: a frozen host), with the cgroup v2
//!   `cgroup.freeze` on a pure v2 machine, else the v1 freezer (`FARM_FREEZER=v1|v2` forces one);
//!   the test fails when neither can be used. Never two running (not frozen) FFmpegs; after the
//!   thaw the old FFmpeg is gone before it completes another segment (inotify on its folder).
//! - The guard's cost per stream: its RSS with N gateways relaying vs none, and its CPU per stream
//!   and per relayed megabyte.

use farm_tests::coordinator::{
    farmctl_ok, ffmpegs_for, node_args, owner, wait_alive, CoordinatorOpts, CoordinatorProcess,
};
use farm_tests::farm::coordinator_args;
use farm_tests::fixtures::metric;
use farm_tests::hls::HlsClient;
use farm_tests::invariants::{self, farm_ffmpegs, settle_time, FarmNode};
use farm_tests::node::{NodeOpts, NodeProcess};
use farm_tests::procs;
use farm_tests::provider::FakeProvider;
use farm_tests::redis::RedisServer;
use farm_tests::wait::eventually;
use redis::AsyncCommands;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LEASE: Duration = Duration::from_secs(3);
const TICK: Duration = Duration::from_millis(500);
const SAMPLE: Duration = Duration::from_millis(50);
const PATH: &str = "/ch.ts";

struct Farm {
    redis: RedisServer,
    provider: FakeProvider,
    n1: NodeProcess,
    n2: NodeProcess,
    _co: CoordinatorProcess,
    _root: tempfile::TempDir,
}

impl Farm {
    async fn start() -> Farm {
        let redis = RedisServer::start();
        let provider = FakeProvider::start().await;
        let root = tempfile::tempdir().expect("tempdir");
        let url = redis.url();
        farmctl_ok(&url, &["channel", "add", "ch", &provider.url(PATH)]);
        let node = |id: &str| {
            NodeProcess::spawn(NodeOpts::new(id, &url, root.path().join(id)).args(node_args("3s")))
        };
        let (n1, n2) = (node("n1"), node("n2"));
        let co = CoordinatorProcess::spawn(
            CoordinatorOpts::new("c1", &url).args(coordinator_args(&[("--tick", "500ms")], &[])),
        );
        Farm {
            redis,
            provider,
            n1,
            n2,
            _co: co,
            _root: root,
        }
    }

    fn nodes(&self) -> [FarmNode; 2] {
        [FarmNode::of(&self.n1), FarmNode::of(&self.n2)]
    }

    /// The first viewer on n1: n1 runs ch, its FFmpeg reads the provider. Returns (gen, FFmpeg).
    async fn watch_on_n1(&self) -> (u64, i32) {
        let mut c = self.redis.conn().await;
        let (status, body) = HlsClient::new(&format!("{}/live/ch/index.m3u8", self.n1.base_url()))
            .get_playlist()
            .await
            .expect("first playlist");
        assert_eq!(status, 200, "{body}");
        let (node, gen) = owner(&mut c, "farm", "ch").await.expect("ch is owned");
        assert_eq!(node, "n1");
        let pids = ffmpegs_for(self.n1.hls_root(), "ch");
        assert_eq!(pids.len(), 1, "{pids:?}");
        eventually(
            "n1's FFmpeg to read the provider",
            Duration::from_secs(10),
            || async { (self.provider.current_connections_for(PATH) == 1).then_some(()) },
        )
        .await;
        (gen, pids[0])
    }
}

/// The guard process of a node (its child `farm-node __guard`).
fn guard_of(node: &NodeProcess) -> i32 {
    let pids: Vec<i32> = procs::children_of(node.pid())
        .into_iter()
        .filter(|p| procs::cmdline(*p).is_some_and(|c| c.ends_with("farm-node __guard")))
        .filter(|p| procs::pid_alive(*p))
        .collect();
    assert_eq!(pids.len(), 1, "guards of {}: {pids:?}", node.node_id());
    pids[0]
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect("stat") + 1..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().expect("ticks"))
        .collect();
    (f[0] + f[1]) as f64 / rustix::param::clock_ticks_per_second() as f64
}

/// Asks n2 for the channel every 100 ms without following redirects (n1 is frozen); once n2
/// answers 200 it owns and serves it: pull 3 s of new segments from it. When n2 first answered,
/// and the pull.
fn viewer_on_n2(n2: &NodeProcess, since: Instant) -> tokio::task::JoinHandle<(Duration, String)> {
    let url = format!("{}/live/ch/index.m3u8", n2.base_url());
    tokio::spawn(async move {
        let http = farm_tests::fixtures::client();
        loop {
            assert!(
                since.elapsed() < Duration::from_secs(30),
                "n2 never served ch"
            );
            if let Ok(r) = http.get(&url).send().await {
                if r.status().as_u16() == 200 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let served = since.elapsed();
        let mut hls = HlsClient::new(&url);
        let report = hls
            .pull(Duration::from_secs(3), Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("a viewer on n2 got no new segments: {e}"));
        assert!(report.segments >= 2, "{report:?}");
        (
            served,
            format!(
                "{} new segments ({:.1}s of media, {} bytes)",
                report.segments, report.media_seconds, report.bytes
            ),
        )
    })
}

/// After the fault (n1 woke at `woke`): n1 heartbeats again, runs nothing of ch for 2 s (sampled), n2 still owns it
/// with `gen`, one provider connection; then the invariant checker.
async fn n1_rejoins_cleanly(f: &Farm, gen: u64, what: &str, woke: Instant) {
    let mut c = f.redis.conn().await;
    wait_alive(&c, "n1", "n1 to heartbeat again", Duration::from_secs(10)).await;
    let rejoined = woke.elapsed();
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(2) {
        assert!(
            ffmpegs_for(f.n1.hls_root(), "ch").is_empty(),
            "n1 runs an FFmpeg for ch after the {what}"
        );
        assert!(
            f.provider.current_connections_for(PATH) <= 1,
            "two provider connections after the {what}"
        );
        tokio::time::sleep(SAMPLE).await;
    }
    assert_eq!(
        owner(&mut c, "farm", "ch").await,
        Some(("n2".to_string(), gen))
    );
    let n1_set: Vec<String> = c.smembers("farm:node:n1:streams").await.expect("SMEMBERS");
    assert!(n1_set.is_empty(), "{n1_set:?}");
    assert_eq!(ffmpegs_for(f.n2.hls_root(), "ch").len(), 1);
    assert_eq!(f.provider.current_connections_for(PATH), 1);
    println!("after the {what}: n1 heartbeats again after {rejoined:?} and runs nothing of ch");
    let report = invariants::check_nodes(&f.redis, &[&f.n1, &f.n2], settle_time(LEASE, TICK)).await;
    println!("{what}: {}", report.figure());
    report.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_process_is_fenced_by_its_guard_before_its_channel_moves() {
    let f = Farm::start().await;
    let mut c = f.redis.conn().await;
    let (old_gen, old) = f.watch_on_n1().await;
    let guard = guard_of(&f.n1);

    f.n1.sigstop();
    let frozen = Instant::now();
    // The guard fences at the last renewal it got + ⅔ TTL; that renewal was sent before Redis set
    // this lease (a renewal in flight at the freeze may have landed, and only moves it earlier).
    let pttl: i64 = c.pttl("farm:owner:ch").await.expect("PTTL");
    let fence_by = Duration::from_millis(pttl.max(0) as u64).saturating_sub(LEASE / 3);
    let viewer = viewer_on_n2(&f.n2, frozen);

    let (mut samples, mut two_ffmpegs, mut two_conns) = (0u32, 0u32, 0u32);
    let (mut ffmpeg_gone, mut conn_gone, mut moved) = (None, None, None);
    while frozen.elapsed() < LEASE * 3 {
        let t = frozen.elapsed();
        let procs: Vec<_> = farm_ffmpegs(&f.nodes())
            .into_iter()
            .filter(|p| p.channel == "ch")
            .collect();
        let conns = f.provider.current_connections_for(PATH);
        samples += 1;
        // Every live FFmpeg counts: nothing but the node is stopped in this test.
        if procs.len() > 1 {
            two_ffmpegs += 1;
        }
        if conns > 1 {
            two_conns += 1;
        }
        if ffmpeg_gone.is_none() && !procs.iter().any(|p| p.node == "n1") {
            ffmpeg_gone = Some(t);
        }
        // The first time the provider has nobody: n1's connection closed before n2's opened.
        if conn_gone.is_none() && conns == 0 {
            conn_gone = Some(t);
        }
        if moved.is_none()
            && owner(&mut c, "farm", "ch").await.map(|o| o.0).as_deref() == Some("n2")
        {
            moved = Some(t);
        }
        assert!(
            procs::stat(guard).is_some_and(|s| s.state != 'T' && s.state != 'Z'),
            "n1's guard is not running"
        );
        // Every 5 ms around the fence time, to time the kill (more samples only make the check
        // stricter).
        let near = t + Duration::from_millis(300) >= fence_by
            && t <= fence_by + Duration::from_millis(300);
        tokio::time::sleep(if near {
            Duration::from_millis(5)
        } else {
            SAMPLE
        })
        .await;
    }
    let (served, pulled) = viewer.await.expect("viewer");
    let ffmpeg_gone = ffmpeg_gone.expect("n1's FFmpeg was killed while n1 was frozen");
    let conn_gone = conn_gone.expect("n1's provider connection closed while n1 was frozen");
    let moved = moved.expect("ch moved to n2 while n1 was frozen");
    let margin = |t: Duration| fence_by.as_millis() as i64 - t.as_millis() as i64;
    println!(
        "n1 (only the farm-node process) frozen for {:?}: fence time at the latest {fence_by:?} into the freeze; \
n1's FFmpeg gone after {ffmpeg_gone:?} (margin {} ms), its provider connection closed after {conn_gone:?} (margin {} ms); \
ch owned by n2 after {moved:?}, a viewer on n2 served after {served:?}: {pulled}; \
{samples} samples (every {SAMPLE:?}, every 5 ms within 300 ms of the fence time): {two_ffmpegs} with two live FFmpegs, {two_conns} with two provider connections",
        LEASE * 3,
        margin(ffmpeg_gone),
        margin(conn_gone),
    );
    assert_eq!(two_ffmpegs, 0, "two FFmpegs ran for ch while n1 was frozen");
    assert_eq!(two_conns, 0, "the provider saw two connections for ch");
    // By the fence time; a sample (5 ms there), the kill, and the provider noticing the close
    // (it writes every ~40 ms) for the measurement.
    let bound = fence_by + Duration::from_millis(100);
    assert!(
        ffmpeg_gone <= bound,
        "n1's FFmpeg gone {ffmpeg_gone:?} into the freeze, fence by {fence_by:?}"
    );
    assert!(
        conn_gone <= bound,
        "n1's upstream closed {conn_gone:?} into the freeze, fence by {fence_by:?}"
    );
    assert!(!procs::pid_alive(old), "n1's old FFmpeg {old} still runs");
    let (_, new_gen) = owner(&mut c, "farm", "ch").await.expect("ch on n2");
    assert!(new_gen > old_gen);

    let alive: bool = c.exists("farm:node:n1:alive").await.expect("EXISTS");
    assert!(!alive, "n1 still counted alive after a 9 s freeze");
    f.n1.sigcont();
    n1_rejoins_cleanly(&f, new_gen, "SIGCONT", Instant::now()).await;
    assert_eq!(guard_of(&f.n1), guard, "n1's guard was replaced");
    println!(
        "n1's metrics after the wake: guard fences {}, FFmpegs killed by the guard {}, guard restarts {}",
        metric(&f.n1, "farm_node_guard_fences_total").await,
        metric(&f.n1, "farm_node_guard_kills_total").await,
        metric(&f.n1, "farm_node_guard_restarts_total").await
    );
}

/// A cgroup whose processes can be frozen and thawed as one (a frozen host).
struct Freezer {
    dir: PathBuf,
    /// The cgroup.procs of the hierarchy's root, where the processes go back.
    root_procs: PathBuf,
    v2: bool,
}

impl Freezer {
    /// A new cgroup: v2 on a pure v2 machine, else the v1 freezer, else v2 beside v1 (hybrid);
    /// `FARM_FREEZER=v1|v2` forces one. Panics (the test fails) when none can be used.
    fn create(name: &str) -> Freezer {
        let v2_root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.controllers").exists());
        let v1_root = Some(PathBuf::from("/sys/fs/cgroup/freezer"))
            .filter(|p| p.join("cgroup.procs").exists());
        let pure_v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let mut order: Vec<(bool, PathBuf)> = Vec::new();
        let forced = std::env::var("FARM_FREEZER").ok();
        for v2 in match forced.as_deref() {
            Some("v1") => vec![false],
            Some("v2") => vec![true],
            _ if pure_v2 => vec![true, false],
            _ => vec![false, true],
        } {
            let root = if v2 { &v2_root } else { &v1_root };
            if let Some(r) = root {
                order.push((v2, r.clone()));
            }
        }
        let mut tried = Vec::new();
        for (v2, root) in order {
            let dir = root.join(name);
            let made = std::fs::create_dir(&dir).or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            });
            let control = dir.join(if v2 { "cgroup.freeze" } else { "freezer.state" });
            match made {
                Ok(()) if control.exists() => {
                    return Freezer {
                        dir,
                        root_procs: root.join("cgroup.procs"),
                        v2,
                    }
                }
                Ok(()) => {
                    let _ = std::fs::remove_dir(&dir);
                    tried.push(format!("{}: no {}", dir.display(), control.display()));
                }
                Err(e) => tried.push(format!("{}: {e}", dir.display())),
            }
        }
        panic!(
            "no usable cgroup freezer (v2 cgroup.freeze or v1 freezer; run as root): tried {tried:?}"
        );
    }

    fn kind(&self) -> &'static str {
        if self.v2 {
            "cgroup v2 cgroup.freeze"
        } else {
            "cgroup v1 freezer"
        }
    }

    fn add(&self, pid: i32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", self.dir.display()));
    }

    fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn set(&self, frozen: bool) {
        let (file, value) = match (self.v2, frozen) {
            (true, f) => ("cgroup.freeze", if f { "1" } else { "0" }),
            (false, true) => ("freezer.state", "FROZEN"),
            (false, false) => ("freezer.state", "THAWED"),
        };
        std::fs::write(self.dir.join(file), value)
            .unwrap_or_else(|e| panic!("write {value} to {file}: {e}"));
    }

    fn frozen(&self) -> bool {
        if self.v2 {
            std::fs::read_to_string(self.dir.join("cgroup.events"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.trim() == "frozen 1")
        } else {
            std::fs::read_to_string(self.dir.join("freezer.state"))
                .unwrap_or_default()
                .trim()
                == "FROZEN"
        }
    }

    /// Freezes every process in it and waits until the kernel says they all are.
    async fn freeze(&self) {
        self.set(true);
        eventually(
            "the cgroup to be frozen",
            Duration::from_secs(5),
            || async { self.frozen().then_some(()) },
        )
        .await;
    }

    fn thaw(&self) {
        self.set(false);
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        self.set(false);
        for pid in self.pids() {
            let _ = std::fs::write(&self.root_procs, pid.to_string());
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Completed-file events (a segment or playlist renamed into place, or closed after writing) in a
/// folder, read from inotify.
struct FolderWatch {
    fd: rustix::fd::OwnedFd,
}

impl FolderWatch {
    fn new(dir: &Path) -> FolderWatch {
        use rustix::fs::inotify;
        let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)
            .expect("inotify");
        inotify::add_watch(
            &fd,
            dir,
            inotify::WatchFlags::MOVED_TO | inotify::WatchFlags::CLOSE_WRITE,
        )
        .unwrap_or_else(|e| panic!("watch {}: {e}", dir.display()));
        FolderWatch { fd }
    }

    /// The names of the files completed since the last call.
    fn completed(&self) -> Vec<String> {
        use rustix::fs::inotify;
        let mut buf = [std::mem::MaybeUninit::uninit(); 8192];
        let mut reader = inotify::Reader::new(&self.fd, &mut buf);
        let mut names = Vec::new();
        loop {
            match reader.next() {
                Ok(ev) => {
                    if let Some(n) = ev.file_name() {
                        names.push(n.to_string_lossy().into_owned());
                    }
                }
                Err(rustix::io::Errno::AGAIN) => return names,
                Err(e) => panic!("reading inotify: {e}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_host_runs_no_second_ffmpeg_and_its_old_ffmpeg_writes_nothing_after_the_thaw() {
    let f = Farm::start().await;
    // Declared after the farm: dropped (thawed) before the nodes are killed.
    let freezer = Freezer::create(&format!("farm-fault-freeze-{}", std::process::id()));
    let guard = guard_of(&f.n1);
    freezer.add(f.n1.pid());
    freezer.add(guard);
    let mut c = f.redis.conn().await;
    let (old_gen, old) = f.watch_on_n1().await;
    let in_cgroup = freezer.pids();
    assert!(
        [f.n1.pid(), guard, old]
            .iter()
            .all(|p| in_cgroup.contains(p)),
        "node {}, guard {guard}, FFmpeg {old} not all in {in_cgroup:?}",
        f.n1.pid()
    );
    let dir = f.n1.hls_root().join("ch");
    eventually("n1 to write segments", Duration::from_secs(10), || async {
        let segs = std::fs::read_dir(&dir)
            .ok()?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".ts"))
            .count();
        (segs >= 2).then_some(())
    })
    .await;

    freezer.freeze().await;
    let frozen = Instant::now();
    let viewer = viewer_on_n2(&f.n2, frozen);
    let (mut samples, mut two_running, mut two_conns) = (0u32, 0u32, 0u32);
    let mut moved = None;
    while frozen.elapsed() < LEASE * 3 {
        let t = frozen.elapsed();
        let is_frozen = freezer.frozen();
        let members = freezer.pids();
        let running = farm_ffmpegs(&f.nodes())
            .into_iter()
            .filter(|p| p.channel == "ch" && !p.stopped)
            .filter(|p| !(is_frozen && members.contains(&p.pid)))
            .count();
        samples += 1;
        if running > 1 {
            two_running += 1;
        }
        // Informational: a frozen host's TCP connection stays open until it thaws.
        if f.provider.current_connections_for(PATH) > 1 {
            two_conns += 1;
        }
        if moved.is_none()
            && owner(&mut c, "farm", "ch").await.map(|o| o.0).as_deref() == Some("n2")
        {
            moved = Some(t);
        }
        tokio::time::sleep(SAMPLE).await;
    }
    let (served, pulled) = viewer.await.expect("viewer");
    let moved = moved.expect("ch moved to n2 while n1's host was frozen");
    assert!(freezer.frozen(), "the host thawed by itself");
    let alive: bool = c.exists("farm:node:n1:alive").await.expect("EXISTS");
    assert!(!alive, "n1 still counted alive after a 9 s freeze");
    assert!(procs::pid_alive(old), "n1's FFmpeg died while frozen");

    // Thaw, watching n1's folder: the old FFmpeg must die before it completes another file.
    let watch = FolderWatch::new(&dir);
    let before = watch.completed();
    assert!(before.is_empty(), "a frozen FFmpeg wrote {before:?}");
    freezer.thaw();
    let thawed = Instant::now();
    let mut runnable_polls = 0u32;
    while procs::pid_alive(old) {
        runnable_polls += 1;
        assert!(
            thawed.elapsed() < Duration::from_secs(5),
            "n1's FFmpeg still runs 5 s after the thaw"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let gone_after = thawed.elapsed();
    let completed = watch.completed();
    let segments: Vec<&String> = completed.iter().filter(|n| n.starts_with("seg_")).collect();
    let (_, new_gen) = owner(&mut c, "farm", "ch").await.expect("ch on n2");
    println!(
        "n1's host ({}: node, guard, FFmpeg) frozen for {:?}: ch owned by n2 after {moved:?}, a viewer on n2 served after {served:?}: {pulled}; \
{samples} samples every {SAMPLE:?}: {two_running} with two running FFmpegs ({two_conns} with two provider connections: the frozen host's stays open); \
after the thaw the old FFmpeg was gone in {gone_after:?} ({runnable_polls} polls saw it alive), files it completed meanwhile: {completed:?}",
        freezer.kind(),
        LEASE * 3,
    );
    assert_eq!(two_running, 0, "two running FFmpegs for ch");
    assert!(
        segments.is_empty(),
        "n1's old FFmpeg completed segments after the thaw: {segments:?}"
    );
    assert!(new_gen > old_gen);
    drop(freezer);
    n1_rejoins_cleanly(&f, new_gen, "thaw", thawed).await;
    println!(
        "n1's metrics after the thaw: guard fences {}, FFmpegs killed by the guard {}, guard restarts {}",
        metric(&f.n1, "farm_node_guard_fences_total").await,
        metric(&f.n1, "farm_node_guard_kills_total").await,
        metric(&f.n1, "farm_node_guard_restarts_total").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_costs_little_per_stream() {
    const N: usize = 8;
    const WINDOW: Duration = Duration::from_secs(10);
    let redis = RedisServer::start();
    let provider = FakeProvider::start().await;
    let root = tempfile::tempdir().expect("tempdir");
    for i in 0..N {
        farmctl_ok(
            &redis.url(),
            &[
                "channel",
                "add",
                &format!("c{i}"),
                &provider.url(&format!("/c{i}.ts")),
            ],
        );
    }
    let n1 = NodeProcess::spawn(
        NodeOpts::new("n1", redis.url(), root.path().join("n1")).args(node_args("3s")),
    );
    let guard = guard_of(&n1);
    // The guard gets its settings over its pipe: nothing in its argv, nothing of the node's
    // environment (where a Redis password or a token may be) but the log settings.
    let env = std::fs::read(format!("/proc/{guard}/environ")).expect("environ");
    let keys: Vec<String> = env
        .split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            String::from_utf8_lossy(kv)
                .split('=')
                .next()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert!(
        keys.iter().all(|k| k == "RUST_LOG" || k == "NO_COLOR"),
        "guard environment: {keys:?}"
    );
    let argv = procs::cmdline(guard).expect("cmdline");
    assert_eq!(
        argv.split(' ').skip(1).collect::<Vec<_>>(),
        ["__guard"],
        "{argv}"
    );
    let idle_rss = rss_kib(guard);
    let start = |i: usize| {
        let url = format!("{}/live/c{i}/index.m3u8", n1.base_url());
        async move {
            let (status, body) = HlsClient::new(&url).get_playlist().await.expect("playlist");
            assert_eq!(status, 200, "{body}");
        }
    };
    let relaying = |n: u64| {
        let provider = &provider;
        async move {
            eventually(
                "the FFmpegs to read the provider",
                Duration::from_secs(10),
                || async { (provider.current_connections() == n).then_some(()) },
            )
            .await;
        }
    };
    // One stream first: the first gateway also pays for what the guard sets up once.
    start(0).await;
    relaying(1).await;
    let one_rss = rss_kib(guard);
    futures::future::join_all((1..N).map(start)).await;
    relaying(N as u64).await;
    // The measurement window (the sleep is the measurement, not a synchronisation).
    let (cpu0, node_cpu0, bytes0, t0) = (
        cpu_secs(guard),
        cpu_secs(n1.pid()),
        provider.bytes_sent(),
        Instant::now(),
    );
    tokio::time::sleep(WINDOW).await;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs(guard) - cpu0;
    let node_cpu = cpu_secs(n1.pid()) - node_cpu0;
    let mb = (provider.bytes_sent() - bytes0) as f64 / 1e6;
    let rss = rss_kib(guard);
    assert_eq!(provider.current_connections(), N as u64, "a stream broke");
    assert_eq!(invariants::farm_ffmpegs(&[FarmNode::of(&n1)]).len(), N);
    let per_stream_kib = rss.saturating_sub(one_rss) as f64 / (N - 1) as f64;
    let pct = cpu / secs * 100.0 / N as f64;
    println!(
        "guard cost: RSS {idle_rss} KiB with 0 gateways, {one_rss} KiB with 1, {rss} KiB with {N} relaying = {per_stream_kib:.0} KiB per further stream; \
CPU {:.0} ms over {secs:.1} s relaying {mb:.1} MB ({:.2} Mbit/s per stream) = {pct:.3}% of a core per stream, {:.0} us per MB \
(the node meanwhile {:.3}% of a core per stream)",
        cpu * 1000.0,
        mb * 8.0 / secs / N as f64,
        cpu * 1e6 / mb.max(1e-9),
        node_cpu / secs * 100.0 / N as f64,
    );
    assert!(mb > 0.0, "nothing relayed");
    // Bounds far above the figures, there to fail if the relay starts copying or leaking.
    assert!(per_stream_kib < 512.0, "{per_stream_kib} KiB per stream");
    assert!(pct < 2.0, "{pct}% of a core per stream");
}

/// The guard's own life: killed, it is replaced and the node's channels stop (their gateways died
/// with it) and start again on demand; when the node dies, its guard kills what it tracks and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_guard_is_replaced_and_a_killed_node_takes_its_guard_along() {
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    farmctl_ok(
        &redis.url(),
        &[
            "channel",
            "add",
            "ch",
            &farm_tests::coordinator::fake_source("ch", 500),
        ],
    );
    let mut n1 = NodeProcess::spawn(
        NodeOpts::new("n1", redis.url(), root.path().join("n1"))
            .with_fake_ffmpeg()
            .args(node_args("3s")),
    );
    let playlist = format!("{}/live/ch/index.m3u8", n1.base_url());
    let get = |url: String| async move {
        HlsClient::new(&url)
            .get_playlist()
            .await
            .expect("playlist")
            .0
    };
    assert_eq!(get(playlist.clone()).await, 200);
    let ffmpeg = ffmpegs_for(n1.hls_root(), "ch");
    assert_eq!(ffmpeg.len(), 1);
    let old_guard = guard_of(&n1);

    farm_tests::signal::kill9(old_guard).expect("kill the guard");
    let killed = Instant::now();
    eventually("the channel to stop", Duration::from_secs(10), || async {
        ffmpegs_for(n1.hls_root(), "ch").is_empty().then_some(())
    })
    .await;
    let stopped_after = killed.elapsed();
    let new_guard = eventually("a new guard", Duration::from_secs(10), || async {
        let g: Vec<i32> = procs::children_of(n1.pid())
            .into_iter()
            .filter(|p| *p != old_guard && procs::pid_alive(*p))
            .filter(|p| procs::cmdline(*p).is_some_and(|c| c.ends_with("__guard")))
            .collect();
        (g.len() == 1).then(|| g[0])
    })
    .await;
    let replaced_after = killed.elapsed();
    let mut c = redis.conn().await;
    let ev = farm_tests::coordinator::events(&mut c, "farm").await;
    assert!(
        ev.iter()
            .any(|e| e.kind() == "stopped" && e.get("reason") == "guard_lost"),
        "{ev:?}"
    );
    // Started again by the next viewer, through the new guard.
    assert_eq!(get(playlist.clone()).await, 200);
    assert_eq!(ffmpegs_for(n1.hls_root(), "ch").len(), 1);
    assert_eq!(metric(&n1, "farm_node_guard_restarts_total").await, 1.0);
    println!(
        "guard kill -9: the channel's FFmpeg stopped after {stopped_after:?}, a new guard ran after {replaced_after:?}; the next viewer started it again"
    );
    let report = invariants::check_nodes(&redis, &[&n1], settle_time(LEASE, TICK)).await;
    report.assert_clean();

    // The node dies: its guard kills the FFmpeg it tracks and exits at once.
    let ffmpeg = ffmpegs_for(n1.hls_root(), "ch");
    n1.kill9();
    let t = Instant::now();
    eventually(
        "the guard to exit with its node",
        Duration::from_secs(5),
        || async {
            (!procs::pid_alive(new_guard) && ffmpeg.iter().all(|p| !procs::pid_alive(*p)))
                .then_some(())
        },
    )
    .await;
    println!(
        "node kill -9: its guard and FFmpeg gone after {:?}",
        t.elapsed()
    );
}
