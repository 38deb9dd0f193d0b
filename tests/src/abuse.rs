//! [`AbuseFarm`]: a small production-like farm that an abuse scenario attacks while viewers watch.
//!
//! Real redis-server, two real `farm-node`s (real FFmpeg, the fake IPTV provider upstream,
//! `--accel-redirect` as behind nginx, a 1,024 fd limit as on a stock Linux box), one coordinator
//! (short idle timeout, so channels an attack started are stopped again), and nginx from the shipped
//! template in front. [`WATCHED`] channels are played continuously through nginx by
//! [`HlsClient`] viewers from 127.0.0.1 (exempt from nginx's per-client limits, like a local
//! proxy); attackers use other loopback addresses ([`attacker_ip`]).
//!
//! Before the baseline each node starts [`WARM_STARTS`] channels at once and stops them again, so
//! the baseline is a node that has done that work before (its allocator arenas and thread pools
//! exist), as any node in production has.
//!
//! [`AbuseFarm::finish`] is the scenario's verdict: every viewer saw no error (no non-200, no
//! failed or skipped segment, no sequence reset, no RFC 8216 violation) and no gap between two
//! new segments longer than one segment on top of the normal cadence; the watched channels kept
//! their owner and gen (nothing fenced or restarted them); and each node's memory (VmRSS from
//! /proc) returned to within 20 % of its baseline, taken after the viewers had filled the nodes'
//! segment caches. It prints the figures before it asserts. The viewers run on their own runtime
//! thread, so attack tasks in the test's runtime cannot delay them.
//!
//! Invariants: everything started is owned by the farm value and stopped on drop (viewers first);
//! the attack helpers never sleep to synchronise (pacing an attack is the attack).

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::coordinator::{farmctl_ok, metric_value, CoordinatorOpts, CoordinatorProcess};
use crate::hls::HlsClient;
use crate::nginx::{NginxOpts, NginxServer};
use crate::node::{NodeOpts, NodeProcess};
use crate::provider::FakeProvider;
use crate::redis::RedisServer;

/// Segment length of the farm (the test source has a key frame every second).
pub const HLS_TIME: Duration = Duration::from_secs(1);
/// Channels watched during every scenario.
pub const WATCHED: [&str; 3] = ["w0", "w1", "w2"];
/// The nodes' admin token.
pub const ADMIN_TOKEN: &str = "abuse-admin-token-5c1f9e0d";
/// The fd limit the nodes run with.
pub const NODE_FD_LIMIT: u64 = 1024;
/// Channel capacity of each node (`--max-streams`).
pub const MAX_STREAMS: u32 = 20;
/// Lease and node TTL.
pub const TTL: &str = "5s";
/// Largest wait between two new segments a viewer may see: the normal cadence plus one segment.
pub const MAX_GAP: Duration = Duration::from_secs(2);
/// Node memory after a scenario may exceed its baseline by this factor at most.
pub const RSS_SLACK: f64 = 1.2;
/// Channels each node starts and stops before the baseline (`warm<node>-<k>`), so that the
/// baseline is a node that has done that work before (its allocator arenas and thread pools
/// exist), as any node in production has: the verdict then measures what the attack left.
pub const WARM_STARTS: usize = 12;

/// How to build the farm.
#[derive(Debug, Clone, Default)]
pub struct AbuseOpts {
    /// Catalog channels besides the watched ones: `b0`, `b1`, ... (never started by the fixture).
    pub extra_channels: usize,
    /// Appended to every node's arguments.
    pub node_args: Vec<String>,
}

/// What one viewer saw since the baseline.
#[derive(Debug, Clone, Default)]
pub struct ViewerStats {
    pub channel: String,
    pub segments: u64,
    /// Longest wall time between two new segments.
    pub max_gap: Duration,
    /// HTTP status -> count (playlists and segments).
    pub statuses: BTreeMap<u16, u64>,
    /// Everything that went wrong, in words.
    pub errors: Vec<String>,
    last_segment_at: Option<Instant>,
}

impl ViewerStats {
    fn reset(&mut self) {
        *self = ViewerStats {
            channel: std::mem::take(&mut self.channel),
            ..ViewerStats::default()
        };
    }
}

struct Viewer {
    stats: Arc<Mutex<ViewerStats>>,
    task: tokio::task::JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Peak memory and fds of the nodes, sampled every 100 ms.
#[derive(Debug, Clone, Default)]
struct Peaks {
    rss_kb: Vec<u64>,
    fds: Vec<u64>,
}

/// The farm under attack (see the module docs).
pub struct AbuseFarm {
    /// Stops the viewers and the sampler; cancelled first on drop.
    stop: CancellationToken,
    /// The viewers' own runtime (one thread): an attack's tasks in the test's runtime cannot
    /// delay them, so a gap they see is the farm's.
    viewer_rt: Option<tokio::runtime::Runtime>,
    viewers: Vec<Viewer>,
    peaks: Arc<Mutex<Peaks>>,
    baseline_rss_kb: Vec<u64>,
    baseline_split: Vec<(u64, u64)>,
    baseline_owners: Vec<Option<(String, u64)>>,
    baseline_fenced: f64,
    started: Instant,
    pub nginx: NginxServer,
    pub coordinator: CoordinatorProcess,
    pub nodes: Vec<NodeProcess>,
    pub provider: FakeProvider,
    pub redis: RedisServer,
    root: tempfile::TempDir,
}

/// `127.<net>.<i / 250>.<i % 250 + 1>`: distinct loopback source addresses for attackers
/// (`net` 0 is the viewers' 127.0.0.x; use 1 and up).
pub fn attacker_ip(net: u8, i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        net,
        u8::try_from(i / 250).unwrap_or(u8::MAX),
        u8::try_from(i % 250 + 1).unwrap_or(u8::MAX),
    ))
}

/// The text of a playlist of `n` channels `<prefix>0..` with provider-like attributes; line `bad_at` (1-based
/// line number of a URL line), if given, names a file: URL.
pub fn provider_m3u(prefix: &str, n: usize, bad_at: Option<usize>) -> String {
    let mut text = String::with_capacity(n * 120);
    text.push_str("#EXTM3U url-tvg=\"http://epg.example/guide.xml\"\n");
    for i in 0..n {
        text.push_str(&format!(
            "#EXTINF:-1 tvg-id=\"{prefix}{i}\" tvg-name=\"Channel {i}\" tvg-logo=\"http://logo.example/{i}.png\" group-title=\"Group {}\",Channel {i} HD\n",
            i % 40
        ));
        let line = 2 * i + 3;
        if Some(line) == bad_at {
            text.push_str("file:///etc/passwd\n");
        } else {
            text.push_str(&format!("http://provider.example/live/u/p/{i}.ts\n"));
        }
    }
    text
}

/// Number of lines of an M3U text the way the importer behind `farmctl import` documents them (a
/// leading BOM ignored; LF, CRLF and a lone CR each end one; a final unterminated line counts),
/// counted independently of its code: the reference its property tests and fuzz target check
/// error line numbers against. At least 1.
pub fn m3u_line_count(text: &str) -> usize {
    let b = text.strip_prefix('\u{feff}').unwrap_or(text).as_bytes();
    let (mut n, mut open, mut i) = (0, false, 0);
    while i < b.len() {
        match b[i] {
            b'\r' => {
                n += 1;
                open = false;
                if b.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => {
                n += 1;
                open = false;
            }
            _ => open = true,
        }
        i += 1;
    }
    (n + usize::from(open)).max(1)
}

/// One answer read by [`raw_get`].
#[derive(Debug, Clone, Default)]
pub struct RawAnswer {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawAnswer {
    /// A header's value (name case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        let name = format!("{}:", name.to_ascii_lowercase());
        self.head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with(&name))
            .map(|l| l[name.len()..].trim().to_string())
    }
}

/// `GET path` from `src` to `dst` with `Connection: close` and `extra` header lines (each ending in
/// `\r\n`); the whole answer, or what went wrong. Unbounded in time: callers put a timeout on it.
pub async fn raw_get(
    src: IpAddr,
    dst: SocketAddr,
    path: &str,
    extra: &str,
) -> Result<RawAnswer, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = connect_from(src, dst)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {dst}\r\n{extra}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no answer head in {} bytes", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {head}"))?;
    Ok(RawAnswer {
        status,
        head,
        body: raw[split + 4..].to_vec(),
    })
}

/// A TCP connection to `dst` from the loopback address `src`.
pub async fn connect_from(src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let s = match src {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    s.bind(SocketAddr::new(src, 0))?;
    s.connect(dst).await
}

/// Whether the other side has closed `s` (EOF or reset); whatever it sent first is read and
/// dropped (a refused connection gets a short 429/503 before the close).
pub fn closed_by_peer(s: &TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.try_read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// How many of `conns` the other side still keeps open.
pub fn still_open(conns: &[TcpStream]) -> usize {
    conns.iter().filter(|s| !closed_by_peer(s)).count()
}

/// Polls `still_open(conns)` every 200 ms until it is 0 or `timeout` passes; the time it took,
/// or `Err(open)` at the deadline.
pub async fn wait_all_closed(conns: &[TcpStream], timeout: Duration) -> Result<Duration, usize> {
    let t0 = Instant::now();
    loop {
        let open = still_open(conns);
        if open == 0 {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() >= timeout {
            return Err(open);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Raises this process's soft fd limit to its hard limit (attacks hold thousands of sockets);
/// returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    let want = Rlimit {
        current: now.maximum,
        maximum: now.maximum,
    };
    let _ = setrlimit(Resource::Nofile, want);
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Runs `f` with this process's soft fd limit at `limit` (children spawned meanwhile inherit it),
/// then raises it again.
fn with_fd_limit<T>(limit: u64, f: impl FnOnce() -> T) -> T {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let before = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(limit),
            maximum: before.maximum,
        },
    )
    .expect("lower the soft fd limit for the nodes");
    let out = f();
    let _ = setrlimit(Resource::Nofile, before);
    out
}

/// VmRSS of `pid` in KiB.
pub fn rss_kb(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// `(RssAnon, RssFile)` of `pid` in KiB: memory the process allocated, and pages of its binary
/// and libraries it touched.
pub fn rss_split_kb(pid: i32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("RssAnon:")?, field("RssFile:")?))
}

/// Open file descriptors of `pid`.
pub fn fd_count(pid: i32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

impl AbuseFarm {
    /// Starts everything, starts the watched channels through nginx and waits until every viewer
    /// has pulled enough segments to fill the nodes' caches; then takes the baseline.
    pub async fn start(opts: AbuseOpts) -> AbuseFarm {
        raise_fd_limit();
        let redis = RedisServer::start();
        let provider = FakeProvider::start().await;
        let root = tempfile::Builder::new()
            .prefix("farm-abuse-")
            .tempdir()
            .expect("tempdir");
        let url = redis.url();
        let mut m3u = String::from("#EXTM3U\n");
        let ids = WATCHED
            .iter()
            .map(|s| s.to_string())
            .chain((0..opts.extra_channels).map(|i| format!("b{i}")))
            .chain(
                (0..2 * WARM_STARTS)
                    .map(|i| format!("warm{}-{}", i / WARM_STARTS, i % WARM_STARTS)),
            );
        for id in ids {
            m3u.push_str(&format!(
                "#EXTINF:-1 tvg-id=\"{id}\",Channel {id}\n{}\n",
                provider.url(&format!("/abuse/{id}.ts"))
            ));
        }
        let m3u_path = root.path().join("catalog.m3u");
        std::fs::write(&m3u_path, m3u).expect("write m3u");
        farmctl_ok(&url, &["import", &m3u_path.to_string_lossy()]);
        let max_streams = MAX_STREAMS.to_string();
        let nodes: Vec<NodeProcess> = with_fd_limit(NODE_FD_LIMIT, || {
            ["n1", "n2"]
                .iter()
                .map(|id| {
                    NodeProcess::spawn(
                        NodeOpts::new(*id, &url, root.path().join(id))
                            .args([
                                "--hls-time",
                                "1s",
                                "--lease-ttl",
                                TTL,
                                "--node-ttl",
                                TTL,
                                "--access-flush",
                                "500ms",
                                "--stop-grace",
                                "2s",
                                "--max-streams",
                                &max_streams,
                                "--accel-redirect",
                                "/_farm_owner",
                                "--admin-token",
                                ADMIN_TOKEN,
                            ])
                            .args(opts.node_args.iter().cloned()),
                    )
                })
                .collect()
        });
        let coordinator = CoordinatorProcess::spawn(CoordinatorOpts::new("c1", &url).args([
            "--idle-timeout",
            "5s",
            "--tick",
            "500ms",
            "--node-ttl",
            TTL,
            "--lease-ttl",
            TTL,
        ]));
        let nginx = NginxServer::start(&NginxOpts::for_nodes(&nodes));
        let stop = CancellationToken::new();
        let viewer_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("abuse-viewers")
            .enable_all()
            .build()
            .expect("viewer runtime");
        let viewers: Vec<Viewer> = WATCHED
            .iter()
            .map(|id| {
                let url = format!("{}/live/{id}/index.m3u8", nginx.base_url());
                let stats = Arc::new(Mutex::new(ViewerStats {
                    channel: id.to_string(),
                    ..ViewerStats::default()
                }));
                let task = viewer_rt.spawn(view(url, stats.clone(), stop.clone()));
                Viewer { stats, task }
            })
            .collect();
        let mut farm = AbuseFarm {
            stop,
            viewer_rt: Some(viewer_rt),
            viewers,
            peaks: Arc::new(Mutex::new(Peaks::default())),
            baseline_rss_kb: Vec::new(),
            baseline_split: Vec::new(),
            baseline_owners: Vec::new(),
            baseline_fenced: 0.0,
            started: Instant::now(),
            nginx,
            coordinator,
            nodes,
            provider,
            redis,
            root,
        };
        // Warm: every viewer has pulled as many segments as a node keeps in memory per channel
        // (hls_list_size + 2 = 8), and a few more.
        let warm = Instant::now();
        crate::wait::eventually("the viewers to warm up", Duration::from_secs(40), || {
            let ok = farm.viewers.iter().all(|v| lock(&v.stats).segments >= 10);
            async move { ok.then_some(()) }
        })
        .await;
        for v in &farm.viewers {
            let s = lock(&v.stats);
            assert!(
                s.errors.iter().all(|e| e.contains("503")),
                "{}: warm-up errors other than a start's 503: {:?}",
                s.channel,
                s.errors
            );
        }
        farm.warm_nodes().await;
        farm.baseline().await;
        println!(
            "abuse farm up: 2 nodes (fd limit {NODE_FD_LIMIT}, max streams {MAX_STREAMS}), \
{} watched channels warm after {:.1}s; baseline RSS {:?} KiB",
            WATCHED.len(),
            warm.elapsed().as_secs_f64(),
            farm.baseline_rss_kb
        );
        farm
    }

    /// Each node starts [`WARM_STARTS`] channels at once and stops them again; returns once
    /// both have handed the freed memory back.
    async fn warm_nodes(&self) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let releases = self.metric("farm_node_memory_releases_total").await;
        for (i, n) in self.nodes.iter().enumerate() {
            let starts: Vec<_> = (0..WARM_STARTS)
                .map(|k| {
                    let url = format!("{}/live/warm{i}-{k}/index.m3u8", n.base_url());
                    let http = http.clone();
                    tokio::spawn(async move { http.get(url).send().await.map(|r| r.status()) })
                })
                .collect();
            for t in starts {
                let status = t.await.expect("join").expect("warm start");
                assert_eq!(status.as_u16(), 200, "a warm-up start on {}", n.node_id());
            }
            for k in 0..WARM_STARTS {
                let r = http
                    .post(format!("{}/admin/streams/warm{i}-{k}/stop", n.base_url()))
                    .bearer_auth(ADMIN_TOKEN)
                    .send()
                    .await
                    .expect("warm stop");
                assert_eq!(
                    r.status().as_u16(),
                    200,
                    "a warm-up stop on {}",
                    n.node_id()
                );
            }
        }
        crate::wait::eventually(
            "both nodes to release memory after the warm-up",
            Duration::from_secs(20),
            || async {
                (self.metric("farm_node_memory_releases_total").await >= releases + 2.0)
                    .then_some(())
            },
        )
        .await;
    }

    async fn baseline(&mut self) {
        for v in &self.viewers {
            lock(&v.stats).reset();
        }
        self.baseline_rss_kb = self
            .nodes
            .iter()
            .map(|n| rss_kb(n.pid()).expect("node RSS"))
            .collect();
        self.baseline_split = self
            .nodes
            .iter()
            .map(|n| rss_split_kb(n.pid()).unwrap_or_default())
            .collect();
        self.baseline_owners = self.owners().await;
        self.baseline_fenced = self.fence_count().await;
        *lock(&self.peaks) = Peaks {
            rss_kb: self.baseline_rss_kb.clone(),
            fds: self
                .nodes
                .iter()
                .map(|n| fd_count(n.pid()).unwrap_or(0))
                .collect(),
        };
        let pids: Vec<i32> = self.nodes.iter().map(|n| n.pid()).collect();
        let (peaks, stop) = (self.peaks.clone(), self.stop.clone());
        let rt = self.viewer_rt.as_ref().expect("viewer runtime");
        rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let mut p = lock(&peaks);
                for (i, pid) in pids.iter().enumerate() {
                    p.rss_kb[i] = p.rss_kb[i].max(rss_kb(*pid).unwrap_or(0));
                    p.fds[i] = p.fds[i].max(fd_count(*pid).unwrap_or(0));
                }
            }
        });
        self.started = Instant::now();
    }

    /// `(owner node, gen)` of each watched channel.
    pub async fn owners(&self) -> Vec<Option<(String, u64)>> {
        let mut c = self.redis.conn().await;
        let mut out = Vec::new();
        for id in WATCHED {
            out.push(crate::coordinator::owner(&mut c, "farm", id).await);
        }
        out
    }

    /// The nodes' fences and fenced stops so far (guard fences included).
    async fn fence_count(&self) -> f64 {
        let mut n = 0.0;
        for i in 0..self.nodes.len() {
            let text = self.node_metrics(i).await;
            n += metric_value(&text, "farm_node_channel_stops_total{reason=\"fenced\"}")
                + metric_value(&text, "farm_node_guard_fences_total");
        }
        n
    }

    /// The temp folder holding the nodes' HLS roots.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// A node's `/metrics` text ("" if it does not answer).
    pub async fn node_metrics(&self, i: usize) -> String {
        let url = format!("{}/metrics", self.nodes[i].base_url());
        match reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Sum of a metric over both nodes (`name` may carry labels, see [`metric_value`]).
    pub async fn metric(&self, name: &str) -> f64 {
        let mut sum = 0.0;
        for i in 0..self.nodes.len() {
            sum += metric_value(&self.node_metrics(i).await, name);
        }
        sum
    }

    /// The viewers' figures so far.
    pub fn viewer_stats(&self) -> Vec<ViewerStats> {
        self.viewers
            .iter()
            .map(|v| lock(&v.stats).clone())
            .collect()
    }

    /// Forgets the worst gaps seen so far: the next are measured from each viewer's last segment.
    pub fn reset_gaps(&self) {
        for v in &self.viewers {
            lock(&v.stats).max_gap = Duration::ZERO;
        }
    }

    /// The worst gap any viewer saw so far.
    pub fn worst_gap(&self) -> Duration {
        self.viewer_stats()
            .iter()
            .map(|s| s.max_gap)
            .max()
            .unwrap_or_default()
    }

    /// Peak VmRSS (KiB) and fd count of each node since the baseline.
    pub fn peaks(&self) -> (Vec<u64>, Vec<u64>) {
        let p = lock(&self.peaks);
        (p.rss_kb.clone(), p.fds.clone())
    }

    /// The verdict (see the module docs): prints the figures, then asserts.
    pub async fn finish(self, scenario: &str) {
        // Memory first, while the viewers still play (as they would in production).
        let t0 = Instant::now();
        let mut rss: Vec<u64>;
        loop {
            rss = self
                .nodes
                .iter()
                .map(|n| rss_kb(n.pid()).unwrap_or(u64::MAX))
                .collect();
            let back = rss
                .iter()
                .zip(&self.baseline_rss_kb)
                .all(|(now, base)| (*now as f64) <= (*base as f64) * RSS_SLACK);
            if back || t0.elapsed() >= Duration::from_secs(30) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let settle = t0.elapsed();
        let owners = self.owners().await;
        let fenced = self.fence_count().await - self.baseline_fenced;
        self.stop.cancel();
        let stats = self.viewer_stats();
        let (peak_rss, peak_fds) = self.peaks();
        let length = self.started.elapsed();
        println!("== {scenario}: verdict after {:.1}s", length.as_secs_f64());
        for (i, n) in self.nodes.iter().enumerate() {
            let split = rss_split_kb(n.pid()).unwrap_or_default();
            println!(
                "   node {}: RSS baseline {} KiB ({:?} anon, file), peak {} KiB, after {} KiB ({:?}) ({:+.1}%, settled in {:.1}s); peak fds {}",
                n.node_id(),
                self.baseline_rss_kb[i],
                self.baseline_split[i],
                peak_rss[i],
                rss[i],
                split,
                (rss[i] as f64 / self.baseline_rss_kb[i] as f64 - 1.0) * 100.0,
                settle.as_secs_f64(),
                peak_fds[i]
            );
        }
        for s in &stats {
            println!(
                "   viewer {}: {} segments, worst gap {:.2}s, statuses {:?}, errors {}",
                s.channel,
                s.segments,
                s.max_gap.as_secs_f64(),
                s.statuses,
                s.errors.len()
            );
        }
        println!("   watched owners {owners:?}; fences {fenced}");
        if fenced > 0.0 {
            for n in &self.nodes {
                let log = n.log();
                let why: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("fenc") || l.contains("keepalive failed"))
                    .take(10)
                    .collect();
                println!("   node {} on fencing: {why:#?}", n.node_id());
            }
        }
        for s in &stats {
            assert!(
                s.errors.is_empty(),
                "{scenario}: viewer of {} saw errors: {:#?}",
                s.channel,
                s.errors
            );
            assert!(
                s.max_gap <= MAX_GAP,
                "{scenario}: viewer of {} waited {:.2}s between two segments (at most {:?})",
                s.channel,
                s.max_gap.as_secs_f64(),
                MAX_GAP
            );
            let expected = (length.as_secs_f64() / HLS_TIME.as_secs_f64() / 2.0) as u64;
            assert!(
                s.segments >= expected,
                "{scenario}: viewer of {} got {} segments in {:.1}s",
                s.channel,
                s.segments,
                length.as_secs_f64()
            );
        }
        assert_eq!(
            owners, self.baseline_owners,
            "{scenario}: a watched channel changed owner or gen"
        );
        assert_eq!(fenced, 0.0, "{scenario}: a node fenced channels");
        for (i, n) in self.nodes.iter().enumerate() {
            assert!(
                (rss[i] as f64) <= self.baseline_rss_kb[i] as f64 * RSS_SLACK,
                "{scenario}: node {} kept {} KiB, baseline {} KiB (peak {} KiB)",
                n.node_id(),
                rss[i],
                self.baseline_rss_kb[i],
                peak_rss[i]
            );
            let log = n.log();
            assert!(
                !log.contains("panicked"),
                "{scenario}: node {} panicked",
                n.node_id()
            );
        }
    }
}

impl Drop for AbuseFarm {
    fn drop(&mut self) {
        self.stop.cancel();
        for v in &self.viewers {
            v.task.abort();
        }
        if let Some(rt) = self.viewer_rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A viewer: pulls one new segment at a time, noting the wait between them and every error.
async fn view(url: String, stats: Arc<Mutex<ViewerStats>>, stop: CancellationToken) {
    // Lenient: a playlist that breaks RFC 8216 is one more error in the verdict, with the others,
    // instead of a panic that ends this viewer.
    let mut client = HlsClient::lenient(&url);
    loop {
        let pull = tokio::select! {
            _ = stop.cancelled() => return,
            r = client.pull(Duration::from_millis(1), Duration::from_secs(10)) => r,
        };
        let now = Instant::now();
        let mut s = lock(&stats);
        match pull {
            Ok(r) => {
                for (status, n) in &r.statuses_seen {
                    *s.statuses.entry(*status).or_default() += n;
                    if *status != 200 {
                        s.errors.push(format!(
                            "{n} x HTTP {status}: {}",
                            r.last_error.clone().unwrap_or_default()
                        ));
                    }
                }
                for v in &r.violations {
                    s.errors.push(format!("RFC 8216: {v}"));
                }
                if r.failed_segments > 0 || r.gaps > 0 || r.sequence_resets > 0 {
                    s.errors.push(format!(
                        "{} failed, {} skipped segments, {} sequence resets: {:?}",
                        r.failed_segments, r.gaps, r.sequence_resets, r.last_error
                    ));
                } else if let Some(e) = r
                    .last_error
                    .as_ref()
                    .filter(|_| r.statuses_seen.keys().all(|k| *k == 200))
                {
                    s.errors.push(format!("transport: {e}"));
                }
                if let Some(prev) = s.last_segment_at {
                    s.max_gap = s.max_gap.max(now - prev);
                }
                s.last_segment_at = Some(now);
                s.segments += r.segments;
            }
            Err(e) => {
                s.errors.push(format!("no new segment within 10 s: {e}"));
                s.last_segment_at = None;
            }
        }
    }
}
