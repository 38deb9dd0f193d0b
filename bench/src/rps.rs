//! Throughput of the viewer path, node vs nginx, and what a viewer request costs in Redis.
//!
//! One farm-node (fake FFmpeg writing a ~500 KB segment every 2 s into a live channel), three nginx
//! over the same HLS root ([`crate::nginx`]: plain nginx at its best — sendfile, tcp_nopush,
//! `access_log off`, `open_file_cache` on, one prefix location —, the shipped template as shipped
//! with `auth_request` to the node, and the template without `auth_request`), the same
//! 64-connection load generator for everything. Five comparisons, each in ABBA rounds (A first in
//! even rounds, B first in odd ones), every round on the newest segment:
//!
//! - `segment_rps_ratio`: node serving the segment / plain nginx at its best, same file;
//! - `playlist_rps_ratio`: node serving the live playlist (composed in memory) / plain nginx at its
//!   best sending FFmpeg's own playlist file (`.ffmpeg.m3u8`, the only playlist on disk: what
//!   nginx serves when it fronts FFmpeg's output directly);
//! - `template_segment_rps_ratio`, `template_playlist_rps_ratio`: the shipped template (with
//!   `auth_request`) / plain nginx at its best: what the shipped front costs against the anchor;
//! - `auth_segment_rps_ratio`: the template with `auth_request` / the same template without it.
//!
//! While an A side runs (every A request reaches the node: a file, or the `/auth` subrequest), a Redis
//! `MONITOR` counts the commands clients send ([`crate::sys::Monitor`]) and the node's
//! `farm_node_request_path_redis_calls_total` is read before and after.

mod figures;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::load::{self, LoadResult, LoadSpec};
use crate::nginx::{self as bnginx, BenchNginx, Variant};
use crate::phase::Settings;
use crate::report::PhaseOutput;
use crate::sys::{self, Monitor};
use crate::util::{get, http, metric_sum, node_metrics, ADMIN_TOKEN};
use farm_tests::hls::MediaPlaylist;
use farm_tests::node::{NodeOpts, NodeProcess};
use farm_tests::redis::RedisServer;
use figures::{report_comparisons, report_redis, request_path_figure};

const CHANNEL: &str = "live";
/// FFmpeg's own playlist in the channel folder (farm-node's `playlist::FFMPEG_PLAYLIST`): the node
/// composes the playlist it serves in memory, so this is the only playlist on disk. Plain nginx
/// serves it: the classic setup where nginx sends what FFmpeg writes.
const FFMPEG_PLAYLIST: &str = ".ffmpeg.m3u8";
/// Fake FFmpeg's segment size: 500,000 bytes rounded up to whole TS packets.
const SEGMENT_BYTES: u64 = 500_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Segment,
    Playlist,
    AuthSegment,
    TemplateSegment,
    TemplatePlaylist,
}

impl Cmp {
    fn name(self) -> &'static str {
        match self {
            Cmp::Segment => "segment",
            Cmp::Playlist => "playlist",
            Cmp::AuthSegment => "auth_segment",
            Cmp::TemplateSegment => "template_segment",
            Cmp::TemplatePlaylist => "template_playlist",
        }
    }
}

/// Totals of one side of a comparison over its rounds.
#[derive(Debug, Default, Clone)]
struct Side {
    requests: u64,
    errors: u64,
    secs: f64,
    /// Responses including the warm-up (what the Redis window saw).
    all_responses: u64,
    rounds_rps: Vec<f64>,
    /// CPU seconds of the server processes during the rounds.
    server_cpu: f64,
    /// The node's CPU: part of the server's on the A sides; on the B sides, what nginx reading files
    /// from the node's folder costs the node (its file watcher's wake-ups).
    node_cpu: f64,
    /// CPU seconds of this process (the load generator) during the rounds.
    client_cpu: f64,
    last_error: Option<String>,
    statuses: BTreeMap<u16, u64>,
}

impl Side {
    fn add(&mut self, r: &LoadResult, all: u64, cpu: Cpu) {
        self.requests += r.requests;
        self.errors += r.errors;
        self.secs += r.window.as_secs_f64();
        self.all_responses += all;
        self.rounds_rps.push(r.rps());
        self.server_cpu += cpu.server;
        self.node_cpu += cpu.node;
        self.client_cpu += cpu.client;
        if r.last_error.is_some() {
            self.last_error = r.last_error.clone();
        }
        for (k, v) in &r.statuses {
            *self.statuses.entry(*k).or_default() += v;
        }
    }

    fn rps(&self) -> f64 {
        if self.secs > 0.0 {
            self.requests as f64 / self.secs
        } else {
            0.0
        }
    }

    fn cpu_us_per_request(&self) -> f64 {
        self.per_request(self.server_cpu)
    }

    /// Microseconds of `cpu` seconds per counted request (warm-up responses included).
    fn per_request(&self, cpu: f64) -> f64 {
        if self.all_responses > 0 {
            cpu * 1e6 / self.all_responses as f64
        } else {
            f64::NAN
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "requests": self.requests,
            "errors": self.errors,
            "seconds": self.secs,
            "rps": self.rps(),
            "rounds_rps": self.rounds_rps,
            "server_cpu_us_per_request": self.cpu_us_per_request(),
            "node_cpu_us_per_request": self.per_request(self.node_cpu),
            "client_cpu_us_per_request": self.per_request(self.client_cpu),
            "statuses": self.statuses,
            "last_error": self.last_error,
        })
    }
}

pub async fn run(s: &Settings) -> Result<PhaseOutput, String> {
    let live = LiveNode::start().await?;
    let node_addr = live.node.addr();
    // Every target serves the right bytes before anything is measured.
    let (seg, seg_size, _) = newest_segment(&live.chan_dir)?;
    check_target(
        &live.client,
        "node",
        node_addr,
        &seg,
        seg_size,
        "index.m3u8",
    )
    .await?;
    // Without nginx (not installed, or a template the benchmark cannot use) the node-only
    // figures are still measured; the ratios say why they are missing.
    let fronts = start_fronts(node_addr, &live.node_root, &live.client, &seg, seg_size).await;
    let targets = Targets::new(&live.node, &fronts);
    let metrics_before = node_metrics(&live.client, &live.base).await?;
    let rp_before = metric_sum(&metrics_before, "farm_node_request_path_redis_calls_total");
    let stats_before = live.redis.command_calls().await;

    let rounds = measure_rounds(s, &live, &targets).await?;

    let stats_after = live.redis.command_calls().await;
    let metrics_after = node_metrics(&live.client, &live.base).await?;
    let rp_after = metric_sum(&metrics_after, "farm_node_request_path_redis_calls_total");

    let mut out = PhaseOutput::default();
    report_comparisons(&mut out, s, &rounds.sides, fronts.as_ref().err());
    let a_responses = report_redis(&mut out, &rounds, &stats_before, &stats_after);
    out.fig(request_path_figure(rp_before, rp_after, a_responses));
    out.set(
        "setup",
        json!({
            "nginx_config": bnginx::config_source(),
            "segment_bytes": rounds.segment_sizes,
            "node_rss_kb_after": sys::rss_kb(targets.node_pid),
        }),
    );
    drop(fronts);
    drop(live);
    Ok(out)
}

/// The measured farm: one node with a live channel on fake FFmpeg, its Redis and folder. Fields drop
/// in this order: the node first, the folder, Redis last.
struct LiveNode {
    node: NodeProcess,
    client: reqwest::Client,
    base: String,
    chan_dir: PathBuf,
    node_root: PathBuf,
    _root: tempfile::TempDir,
    redis: RedisServer,
}

impl LiveNode {
    /// Starts the node, asks for the channel's playlist once and waits until FFmpeg's playlist lists
    /// a couple of segments, so the newest one stays listed for a whole round pair.
    async fn start() -> Result<LiveNode, String> {
        let redis = RedisServer::start();
        let root = crate::util::temp_dir("farm-bench-rps-")?;
        let node_root = root.path().join("n1");
        let chan_dir = node_root.join(CHANNEL);
        crate::util::add_channel(
            &redis.url(),
            CHANNEL,
            &format!("http://127.0.0.1:9/{CHANNEL}.ts?mode=normal&bytes={SEGMENT_BYTES}"),
        )?;
        let node = NodeProcess::spawn(
            NodeOpts::new("bench-n1", redis.url(), &node_root)
                .with_fake_ffmpeg()
                .args(["--admin-token", ADMIN_TOKEN]),
        );
        let base = node.base_url();
        let client = http();
        let (status, body) = get(&client, &format!("{base}/live/{CHANNEL}/index.m3u8")).await?;
        if status != 200 {
            return Err(format!(
                "first playlist request: {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while newest_segment(&chan_dir).map(|p| p.2).unwrap_or(0) < 2 {
            if tokio::time::Instant::now() > deadline {
                return Err("the channel did not list 2 segments within 20 s".into());
            }
            crate::util::pause(std::time::Duration::from_millis(100)).await;
        }
        Ok(LiveNode {
            node,
            client,
            base,
            chan_dir,
            node_root,
            _root: root,
            redis,
        })
    }
}

/// Where one side of a comparison sends its load, and whose CPU is the server's.
struct Target {
    addr: SocketAddr,
    path: String,
    pids: Vec<i32>,
}

/// The node and each nginx (address and server pids; `None`: no nginx).
struct Targets {
    node_addr: SocketAddr,
    node_pid: i32,
    best: Option<(SocketAddr, Vec<i32>)>,
    template: Option<(SocketAddr, Vec<i32>)>,
    template_no_auth: Option<(SocketAddr, Vec<i32>)>,
}

impl Targets {
    fn new(node: &NodeProcess, fronts: &Result<Fronts, String>) -> Targets {
        let front = |f: fn(&Fronts) -> &BenchNginx| {
            fronts
                .as_ref()
                .ok()
                .map(|x| (f(x).addr(), server_pids(f(x))))
        };
        Targets {
            node_addr: node.addr(),
            node_pid: node.pid(),
            best: front(|f| &f.best),
            template: front(|f| &f.template),
            template_no_auth: front(|f| &f.template_no_auth),
        }
    }

    /// The A and B sides of `cmp` on the segment `seg`; `None`: that side's nginx is missing.
    fn sides(&self, cmp: Cmp, seg: &str) -> (Option<Target>, Option<Target>) {
        let seg_path = format!("/live/{CHANNEL}/{seg}");
        let pl_path = format!("/live/{CHANNEL}/index.m3u8");
        let best_pl_path = format!("/live/{CHANNEL}/{FFMPEG_PLAYLIST}");
        let on = |front: &Option<(SocketAddr, Vec<i32>)>, path: &str, with_node: bool| {
            front.as_ref().map(|(addr, pids)| {
                let mut pids = pids.clone();
                if with_node {
                    pids.push(self.node_pid);
                }
                Target {
                    addr: *addr,
                    path: path.to_string(),
                    pids,
                }
            })
        };
        let node = Some((self.node_addr, Vec::new()));
        let a = match cmp {
            Cmp::Segment => on(&node, &seg_path, true),
            Cmp::Playlist => on(&node, &pl_path, true),
            Cmp::TemplatePlaylist => on(&self.template, &pl_path, true),
            Cmp::AuthSegment | Cmp::TemplateSegment => on(&self.template, &seg_path, true),
        };
        let b = match cmp {
            Cmp::Segment | Cmp::TemplateSegment => on(&self.best, &seg_path, false),
            Cmp::Playlist | Cmp::TemplatePlaylist => on(&self.best, &best_pl_path, false),
            Cmp::AuthSegment => on(&self.template_no_auth, &seg_path, false),
        };
        (a, b)
    }
}

/// What the rounds measured.
struct Rounds {
    sides: BTreeMap<(&'static str, char), Side>,
    /// Commands clients sent to Redis while the A sides ran.
    redis_cmds: BTreeMap<String, u64>,
    segment_sizes: Vec<u64>,
}

/// `s.rounds` ABBA rounds of every comparison, each on the newest segment; a Redis `MONITOR` runs
/// while an A side does.
async fn measure_rounds(s: &Settings, live: &LiveNode, t: &Targets) -> Result<Rounds, String> {
    let mut rounds = Rounds {
        sides: BTreeMap::new(),
        redis_cmds: BTreeMap::new(),
        segment_sizes: Vec::new(),
    };
    for round in 0..s.rounds {
        for cmp in [
            Cmp::Segment,
            Cmp::Playlist,
            Cmp::TemplateSegment,
            Cmp::TemplatePlaylist,
            Cmp::AuthSegment,
        ] {
            let (seg, size, _) = newest_segment(&live.chan_dir)?;
            rounds.segment_sizes.push(size);
            let (a, b) = t.sides(cmp, &seg);
            let order = if round % 2 == 0 {
                ['A', 'B']
            } else {
                ['B', 'A']
            };
            for side in order {
                let Some(target) = (if side == 'A' { &a } else { &b }) else {
                    continue;
                };
                let monitor = if side == 'A' {
                    Some(Monitor::start(live.redis.port())?)
                } else {
                    None
                };
                let (r, all, cpu) = load_side(s, target, t.node_pid).await;
                if let Some(m) = monitor {
                    for (k, v) in m.stop() {
                        *rounds.redis_cmds.entry(k).or_default() += v;
                    }
                }
                rounds
                    .sides
                    .entry((cmp.name(), side))
                    .or_default()
                    .add(&r, all, cpu);
            }
        }
    }
    Ok(rounds)
}

/// One side's load: its result, the responses counted (warm-up included) and the CPU it cost.
async fn load_side(s: &Settings, target: &Target, node_pid: i32) -> (LoadResult, u64, Cpu) {
    let spec = LoadSpec {
        addr: target.addr,
        path: target.path.clone(),
        connections: s.connections,
        warmup: s.warmup,
        duration: s.round,
        expect_status: 200,
    };
    let cpu0 = Cpu::read(&target.pids, node_pid);
    let r = load::run(&spec).await;
    let cpu = Cpu::read(&target.pids, node_pid).minus(&cpu0);
    let all = r.statuses.values().sum::<u64>() + r.warmup_responses;
    (r, all, cpu)
}

/// One GET of the segment and the playlist from `addr`: both 200, the segment complete.
async fn check_target(
    client: &reqwest::Client,
    who: &str,
    addr: SocketAddr,
    seg: &str,
    seg_size: u64,
    playlist: &str,
) -> Result<(), String> {
    for path in [
        format!("/live/{CHANNEL}/{seg}"),
        format!("/live/{CHANNEL}/{playlist}"),
    ] {
        let (st, b) = get(client, &format!("http://{addr}{path}")).await?;
        let want_len = path.ends_with(".ts").then_some(seg_size);
        if st != 200 || want_len.is_some_and(|l| l != b.len() as u64) {
            return Err(format!(
                "{who} GET {path}: {st}, {} bytes (want {want_len:?})",
                b.len()
            ));
        }
    }
    Ok(())
}

/// The three nginx of the comparisons.
struct Fronts {
    best: BenchNginx,
    template: BenchNginx,
    template_no_auth: BenchNginx,
}

/// The three nginx (best, template, template without auth), checked.
async fn start_fronts(
    node: SocketAddr,
    root: &Path,
    client: &reqwest::Client,
    seg: &str,
    seg_size: u64,
) -> Result<Fronts, String> {
    let mut started = Vec::new();
    for variant in [Variant::Best, Variant::Template, Variant::TemplateNoAuth] {
        let root = root.to_path_buf();
        let n = tokio::task::spawn_blocking(move || BenchNginx::start(variant, node, &root))
            .await
            .map_err(|e| format!("start nginx: {e}"))??;
        let who = format!("nginx ({variant:?})");
        let playlist = if variant == Variant::Best {
            FFMPEG_PLAYLIST
        } else {
            "index.m3u8"
        };
        if let Err(e) = check_target(client, &who, n.addr(), seg, seg_size, playlist).await {
            return Err(format!("{e}; nginx error log: {}", n.error_log().trim()));
        }
        started.push(n);
    }
    let template_no_auth = started.pop().ok_or("no template nginx without auth")?;
    let template = started.pop().ok_or("no template nginx")?;
    let best = started.pop().ok_or("no plain nginx")?;
    Ok(Fronts {
        best,
        template,
        template_no_auth,
    })
}

/// Newest segment listed in FFmpeg's playlist on disk: `(file name, size, segments listed)`.
fn newest_segment(dir: &Path) -> Result<(String, u64, usize), String> {
    let pl_path: PathBuf = dir.join(FFMPEG_PLAYLIST);
    let text = std::fs::read_to_string(&pl_path)
        .map_err(|e| format!("read {}: {e}", pl_path.display()))?;
    let pl = MediaPlaylist::parse(&text)?;
    let last = pl
        .segments
        .last()
        .ok_or_else(|| format!("{} lists no segment", pl_path.display()))?;
    let size = std::fs::metadata(dir.join(&last.uri))
        .map_err(|e| format!("stat {}: {e}", last.uri))?
        .len();
    Ok((last.uri.clone(), size, pl.segments.len()))
}

/// nginx master and workers.
fn server_pids(n: &BenchNginx) -> Vec<i32> {
    let mut v = vec![n.pid()];
    v.extend(farm_tests::procs::children_of(n.pid()));
    v
}

/// CPU seconds so far of the server processes, the node among them, and this process.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    server: f64,
    node: f64,
    client: f64,
}

impl Cpu {
    fn read(pids: &[i32], node_pid: i32) -> Cpu {
        let of = |p: i32| sys::cpu_seconds(p).unwrap_or(0.0);
        Cpu {
            server: pids.iter().map(|p| of(*p)).sum(),
            node: of(node_pid),
            client: of(std::process::id() as i32),
        }
    }

    fn minus(&self, o: &Cpu) -> Cpu {
        Cpu {
            server: self.server - o.server,
            node: self.node - o.node,
            client: self.client - o.client,
        }
    }
}
