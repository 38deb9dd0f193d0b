//! The farm's invariant checker: run it at the end of every fault scenario.
//!
//! [`check`] watches everything a farm leaves behind (Redis keys, the nodes' HLS folders, FFmpeg
//! processes) for a whole observation window (use [`settle_time`]: `2 × node_ttl + tick`, the bound
//! of promise 9), one pass every 200 ms. The verdict covers every pass of the window:
//!
//! - **Never, in any pass:** two runnable (not stopped) FFmpegs for one channel (promise 1). The
//!   first pass that shows one fails the check, whatever came before or after.
//! - **Settled by the end of the window:** some pass must find nothing at all ("settled"); before
//!   it, a fault's leftovers may still be being cleaned up.
//! - **Clean once settled:** after the settled pass, a finding seen in two consecutive passes fails
//!   the check (reads are not atomic: a start or a stop between two reads of one pass can show a
//!   folder or a process whose lease the pass did not see; a leak stays, a race does not).
//!
//! The report names every violating pass (its number, its time, what it found). What is wrong:
//!
//! - Redis: an owner lease naming a node that is not alive; any `farm:node:<dead>*` key, a
//!   `farm:cmd:<dead>` stream or a `farm:nodes` member of a dead node; a stream hash without an
//!   owner lease (except a `failed` one with a TTL) or naming another node than the lease; a node
//!   set entry whose lease names another node (or nobody); a load entry without its set entry; a
//!   `farm:access` entry of a channel nobody owns; a live provider holding of a channel nobody owns;
//!   a live node that is not registered (no `:alive` key). `farm:timeline:<id>` (TTL 1 h) outlives
//!   its channel by design and is not checked.
//! - Channels: a lease held by a live node that runs no FFmpeg for it while its stream is not in a
//!   transition (`running`, `failed` or no stream hash); a stream in `starting`, `restarting` or
//!   `stopping` for longer than [`Options::stuck_after`] (`starting`: since its claim,
//!   `started_at`; the others: since the checker first saw that state with that restart count); a
//!   `running` channel without exactly one live owner and exactly one FFmpeg; two live nodes listing
//!   one channel.
//! - Disk: a channel folder under a live node's HLS root for a channel that node does not own.
//!   Folders under a dead node's root are listed apart ("dead node folders"): no process of the farm
//!   can remove them until that node starts again and sweeps them (promise 5, tested by
//!   `node_lifecycle`); they are printed, not counted as leaks.
//! - Processes: an FFmpeg (real or fake: any process whose command line writes under a node's HLS
//!   root) of a dead node or for a channel its node does not own; a zombie child of a live node.
//!
//! The checker uses `SCAN` (tests may; the farm never does).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use crate::node::NodeProcess;
use crate::procs;
use crate::redis::RedisServer;

/// The bound of promise 9: `2 × node_ttl + tick`.
pub fn settle_time(node_ttl: Duration, tick: Duration) -> Duration {
    node_ttl * 2 + tick
}

/// One node as the checker sees it: its id, its HLS root and, when it runs, its pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FarmNode {
    pub id: String,
    pub hls_root: PathBuf,
    /// `None`: the node is dead (killed, stopped for good).
    pub pid: Option<i32>,
}

impl FarmNode {
    /// A node process; alive when its process exists (a SIGSTOPped node is alive).
    pub fn of(node: &NodeProcess) -> FarmNode {
        let pid = node.pid();
        FarmNode {
            id: node.node_id().to_string(),
            hls_root: node.hls_root().to_path_buf(),
            pid: procs::pid_alive(pid).then_some(pid),
        }
    }

    /// A node that no longer runs (its process gone), with the root it used.
    pub fn dead(id: impl Into<String>, hls_root: impl Into<PathBuf>) -> FarmNode {
        FarmNode {
            id: id.into(),
            hls_root: hls_root.into(),
            pid: None,
        }
    }

    pub fn alive(&self) -> bool {
        self.pid.is_some()
    }
}

/// Every node of a list of processes, as [`FarmNode`]s.
pub fn farm_nodes(nodes: &[&NodeProcess]) -> Vec<FarmNode> {
    nodes.iter().map(|n| FarmNode::of(n)).collect()
}

/// One thing found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: Kind,
    /// What it is about, stable from one pass to the next (a key, a folder, a pid): two passes
    /// showing the same subject show the same leak.
    pub subject: String,
    pub what: String,
}

/// The categories of the printed table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    DeadOwnerLease,
    DeadNodeKey,
    OrphanStreamHash,
    StaleSetEntry,
    StaleLoadEntry,
    StaleAccessEntry,
    StaleProviderHolding,
    UnregisteredLiveNode,
    LeaseWithoutFfmpeg,
    StuckInTransition,
    LeakedFolder,
    LeakedProcess,
    Zombie,
    /// Two runnable FFmpegs for one channel: never allowed, in any pass.
    DoubleRunning,
    /// Two live nodes list one channel in their sets.
    DoubleListed,
    RunningWithoutOwnerOrFfmpeg,
    /// Informational: folders under a dead node's root (its next start sweeps them).
    DeadNodeFolder,
}

impl Kind {
    const ALL: [Kind; 17] = [
        Kind::DeadOwnerLease,
        Kind::DeadNodeKey,
        Kind::OrphanStreamHash,
        Kind::StaleSetEntry,
        Kind::StaleLoadEntry,
        Kind::StaleAccessEntry,
        Kind::StaleProviderHolding,
        Kind::UnregisteredLiveNode,
        Kind::LeaseWithoutFfmpeg,
        Kind::StuckInTransition,
        Kind::LeakedFolder,
        Kind::LeakedProcess,
        Kind::Zombie,
        Kind::DoubleRunning,
        Kind::DoubleListed,
        Kind::RunningWithoutOwnerOrFfmpeg,
        Kind::DeadNodeFolder,
    ];

    fn label(self) -> &'static str {
        match self {
            Kind::DeadOwnerLease => "owner leases naming a dead node",
            Kind::DeadNodeKey => "keys of dead nodes (node:*, cmd:*, nodes member)",
            Kind::OrphanStreamHash => "stream hashes without (or disagreeing with) a lease",
            Kind::StaleSetEntry => "node set entries whose lease names another node",
            Kind::StaleLoadEntry => "node load entries without a set entry",
            Kind::StaleAccessEntry => "farm:access entries of unowned channels",
            Kind::StaleProviderHolding => "provider holdings of unowned channels",
            Kind::UnregisteredLiveNode => "live nodes without an :alive key",
            Kind::LeaseWithoutFfmpeg => "leases of live nodes that run no FFmpeg for them",
            Kind::StuckInTransition => "streams stuck in starting/restarting/stopping",
            Kind::LeakedFolder => "channel folders a live node does not own",
            Kind::LeakedProcess => "FFmpegs of a dead node or of an unowned channel",
            Kind::Zombie => "zombie children of live nodes",
            Kind::DoubleRunning => "channels with two runnable FFmpegs (any pass)",
            Kind::DoubleListed => "channels listed by two live nodes",
            Kind::RunningWithoutOwnerOrFfmpeg => {
                "running channels without one live owner + one FFmpeg"
            }
            Kind::DeadNodeFolder => "(info) folders under a dead node's root",
        }
    }

    fn is_key(self) -> bool {
        matches!(
            self,
            Kind::DeadOwnerLease
                | Kind::DeadNodeKey
                | Kind::OrphanStreamHash
                | Kind::StaleSetEntry
                | Kind::StaleLoadEntry
                | Kind::StaleAccessEntry
                | Kind::StaleProviderHolding
        )
    }

    /// Findings that fail the check in any pass, settled or not.
    pub fn is_safety(self) -> bool {
        self == Kind::DoubleRunning
    }
}

/// How the checker judges a farm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// A stream in `starting`, `restarting` or `stopping` for longer than this is stuck. The
    /// harness's farms start a channel within a few seconds (1 s segments, backoff at most 2 s).
    pub stuck_after: Duration,
    /// Time between passes.
    pub poll: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            stuck_after: Duration::from_secs(5),
            poll: Duration::from_millis(200),
        }
    }
}

/// A pass that broke the invariants after the farm had settled, or showed a runnable duplicate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub pass: u32,
    /// Since the check began.
    pub at: Duration,
    pub finding: Finding,
}

/// What one [`check`] saw over its window.
#[derive(Debug, Clone, Default)]
pub struct InvariantReport {
    /// What the last pass found.
    pub findings: Vec<Finding>,
    /// Until the first pass that found nothing (the whole window when none did).
    pub waited: Duration,
    /// The first pass that found nothing.
    pub settled_pass: Option<u32>,
    /// How long the checker watched.
    pub window: Duration,
    pub passes: u32,
    /// Passes that broke an invariant (a duplicate in any pass; anything persistent once settled).
    pub violations: Vec<Violation>,
    /// Channels with an owner lease (last pass).
    pub owned_channels: usize,
    /// FFmpeg processes found under the nodes' roots (last pass).
    pub ffmpegs: usize,
    pub nodes_alive: usize,
    pub nodes_dead: usize,
}

impl InvariantReport {
    fn count(&self, pred: impl Fn(Kind) -> bool) -> usize {
        self.findings.iter().filter(|f| pred(f.kind)).count()
    }
    /// Keys left behind (every Redis category).
    pub fn leaked_keys(&self) -> usize {
        self.count(Kind::is_key)
    }
    /// Folders a live node does not own.
    pub fn leaked_folders(&self) -> usize {
        self.count(|k| k == Kind::LeakedFolder)
    }
    /// FFmpegs of dead nodes or of unowned channels, plus zombies.
    pub fn leaked_processes(&self) -> usize {
        self.count(|k| matches!(k, Kind::LeakedProcess | Kind::Zombie))
    }
    /// Channels with two FFmpegs or two listing nodes.
    pub fn double_owned(&self) -> usize {
        self.count(|k| matches!(k, Kind::DoubleRunning | Kind::DoubleListed))
    }
    /// Running channels without one live owner and one FFmpeg, leases without an FFmpeg, stuck
    /// streams and live nodes not registered.
    pub fn broken(&self) -> usize {
        self.count(|k| {
            matches!(
                k,
                Kind::RunningWithoutOwnerOrFfmpeg
                    | Kind::UnregisteredLiveNode
                    | Kind::LeaseWithoutFfmpeg
                    | Kind::StuckInTransition
            )
        })
    }
    /// Folders under dead nodes' roots (informational).
    pub fn dead_node_folders(&self) -> usize {
        self.count(|k| k == Kind::DeadNodeFolder)
    }
    /// Everything in the last pass that must be zero.
    pub fn leaks(&self) -> usize {
        self.count(|k| k != Kind::DeadNodeFolder)
    }
    /// Settled, clean in the last pass, and no violating pass in the window.
    pub fn is_clean(&self) -> bool {
        self.settled_pass.is_some() && self.leaks() == 0 && self.violations.is_empty()
    }
    /// Panics with the table unless clean.
    pub fn assert_clean(&self) {
        assert!(self.is_clean(), "the farm broke its invariants:\n{self}");
    }
    /// One line of figures, for a test's printed summary.
    pub fn figure(&self) -> String {
        format!(
            "leaked keys {}, folders {}, processes {}, double-owned channels {}, broken channels {}; \
violating passes {} (clean after {:?}, held clean over a {:?} window, {} passes)",
            self.leaked_keys(),
            self.leaked_folders(),
            self.leaked_processes(),
            self.double_owned(),
            self.broken(),
            self.violations
                .iter()
                .map(|v| v.pass)
                .collect::<BTreeSet<_>>()
                .len(),
            self.waited,
            self.window,
            self.passes
        )
    }
}

impl fmt::Display for InvariantReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.is_clean() {
            "CLEAN"
        } else if self.settled_pass.is_none() {
            "NEVER SETTLED"
        } else if !self.violations.is_empty() {
            "VIOLATED"
        } else {
            "LEAKS"
        };
        writeln!(
            f,
            "invariants: {verdict} over {:?} ({} passes; settled {}; nodes alive {}, dead {}; {} owned channels, {} FFmpegs)",
            self.window,
            self.passes,
            match self.settled_pass {
                Some(p) => format!("at pass {p}, after {:?}", self.waited),
                None => "never".to_string(),
            },
            self.nodes_alive,
            self.nodes_dead,
            self.owned_channels,
            self.ffmpegs
        )?;
        writeln!(f, "  last pass:")?;
        writeln!(f, "  {:<58} | found", "check")?;
        writeln!(f, "  {:-<58}-+------", "")?;
        for kind in Kind::ALL {
            let of_kind: Vec<&Finding> = self.findings.iter().filter(|x| x.kind == kind).collect();
            writeln!(f, "  {:<58} | {}", kind.label(), of_kind.len())?;
            for x in of_kind.iter().take(5) {
                writeln!(f, "  {:<58} |   {}", "", x.what)?;
            }
            if of_kind.len() > 5 {
                writeln!(f, "  {:<58} |   ... {} more", "", of_kind.len() - 5)?;
            }
        }
        if !self.violations.is_empty() {
            writeln!(f, "  violating passes ({}):", self.violations.len())?;
            for v in self.violations.iter().take(20) {
                writeln!(
                    f,
                    "    pass {} at {:?}: {}: {}",
                    v.pass,
                    v.at,
                    v.finding.kind.label(),
                    v.finding.what
                )?;
            }
            if self.violations.len() > 20 {
                writeln!(f, "    ... {} more", self.violations.len() - 20)?;
            }
        }
        Ok(())
    }
}

/// The verdict over a sequence of passes (see the module docs): fed one pass at a time.
#[derive(Debug, Default)]
pub struct Verdict {
    settled: Option<(u32, Duration)>,
    previous: BTreeSet<(Kind, String)>,
    violations: Vec<Violation>,
}

impl Verdict {
    /// Records pass `pass`, `at` after the start, with what it found.
    pub fn pass(&mut self, pass: u32, at: Duration, findings: &[Finding]) {
        let counted: Vec<&Finding> = findings
            .iter()
            .filter(|f| f.kind != Kind::DeadNodeFolder)
            .collect();
        for f in counted.iter().filter(|f| f.kind.is_safety()) {
            self.violations.push(Violation {
                pass,
                at,
                finding: (*f).clone(),
            });
        }
        let now: BTreeSet<(Kind, String)> = counted
            .iter()
            .map(|f| (f.kind, f.subject.clone()))
            .collect();
        if self.settled.is_some() {
            for f in counted.iter().filter(|f| !f.kind.is_safety()) {
                if self.previous.contains(&(f.kind, f.subject.clone())) {
                    self.violations.push(Violation {
                        pass,
                        at,
                        finding: (*f).clone(),
                    });
                }
            }
        } else if counted.is_empty() {
            self.settled = Some((pass, at));
        }
        self.previous = now;
    }

    pub fn settled(&self) -> Option<(u32, Duration)> {
        self.settled
    }

    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }
}

/// [`check_with`] for the default prefix `farm`.
pub async fn check(redis: &RedisServer, nodes: &[FarmNode], wait: Duration) -> InvariantReport {
    check_with(redis, "farm", nodes, wait).await
}

/// [`check`] on node processes (each alive if its process runs).
pub async fn check_nodes(
    redis: &RedisServer,
    nodes: &[&NodeProcess],
    wait: Duration,
) -> InvariantReport {
    check(redis, &farm_nodes(nodes), wait).await
}

/// [`check_opts`] with the default [`Options`].
pub async fn check_with(
    redis: &RedisServer,
    prefix: &str,
    nodes: &[FarmNode],
    wait: Duration,
) -> InvariantReport {
    check_opts(redis, prefix, nodes, wait, Options::default()).await
}

/// Watches the farm for `window`, one pass every `opts.poll`, and judges every pass (see the
/// module docs); prints and returns the report. Node ids found in Redis that are not in `nodes`
/// count as dead.
pub async fn check_opts(
    redis: &RedisServer,
    prefix: &str,
    nodes: &[FarmNode],
    window: Duration,
    opts: Options,
) -> InvariantReport {
    let started = Instant::now();
    let deadline = started + window;
    let mut conn = redis.conn().await;
    let mut verdict = Verdict::default();
    let mut transitions = Transitions::default();
    let mut passes = 0;
    let mut last: Option<InvariantReport> = None;
    let mut last_error = String::new();
    loop {
        match one_pass(&mut conn, prefix, nodes, &mut transitions, opts.stuck_after).await {
            Ok(report) => {
                passes += 1;
                verdict.pass(passes, started.elapsed(), &report.findings);
                last = Some(report);
            }
            Err(e) => {
                // Redis itself is the fault under test sometimes: keep polling until the deadline.
                last_error = e.to_string();
                if let Ok(c) = redis.try_conn().await {
                    conn = c;
                }
            }
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(opts.poll.min(deadline - now)).await;
    }
    let Some(mut report) = last else {
        panic!("invariant checker cannot read redis: {last_error}");
    };
    report.passes = passes;
    report.window = started.elapsed();
    report.settled_pass = verdict.settled().map(|(p, _)| p);
    report.waited = verdict.settled().map_or(report.window, |(_, at)| at);
    report.violations = verdict.violations().to_vec();
    println!("{report}");
    report
}

/// What the checker remembers between passes: since when each stream has been in a transition.
#[derive(Debug, Default)]
struct Transitions {
    /// (channel, gen, state, restarts) → Redis time (ms) the checker first saw it.
    first_seen: HashMap<(String, String, String, String), u64>,
}

/// An FFmpeg found writing under a node's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FfmpegProc {
    pub node: String,
    pub channel: String,
    pub pid: i32,
    /// Stopped (SIGSTOP): it exists but cannot run.
    pub stopped: bool,
}

/// Every process (other than a farm-node) writing under one of the nodes' roots, with the node and
/// channel it writes for. One pass over `/proc`.
pub fn farm_ffmpegs(nodes: &[FarmNode]) -> Vec<FfmpegProc> {
    let me = std::process::id() as i32;
    let needles: Vec<(String, &str)> = nodes
        .iter()
        .map(|n| {
            (
                format!(
                    "{}/",
                    n.hls_root.display().to_string().trim_end_matches('/')
                ),
                n.id.as_str(),
            )
        })
        .collect();
    let mut out = Vec::new();
    for pid in procs::all_pids() {
        if pid == me {
            continue;
        }
        let Some(cmd) = procs::cmdline(pid) else {
            continue;
        };
        if cmd.is_empty() || cmd.split(' ').next().unwrap_or("").ends_with("farm-node") {
            continue;
        }
        for (needle, node) in &needles {
            let Some(i) = cmd.find(needle.as_str()) else {
                continue;
            };
            let rest = &cmd[i + needle.len()..];
            let channel: String = rest
                .chars()
                .take_while(|c| *c != '/' && *c != ' ')
                .collect();
            let Some(st) = procs::stat(pid) else { break };
            if st.state == 'Z' || st.state == 'X' {
                break;
            }
            out.push(FfmpegProc {
                node: node.to_string(),
                channel,
                pid,
                stopped: matches!(st.state, 'T' | 't'),
            });
            break;
        }
    }
    out
}

/// The largest number of runnable (not stopped) FFmpegs for one channel, and that channel.
pub fn max_ffmpegs_per_channel(nodes: &[FarmNode]) -> (usize, Option<String>) {
    let mut per: HashMap<String, usize> = HashMap::new();
    for p in farm_ffmpegs(nodes).into_iter().filter(|p| !p.stopped) {
        *per.entry(p.channel).or_default() += 1;
    }
    per.into_iter()
        .max_by_key(|(_, n)| *n)
        .map_or((0, None), |(c, n)| (n, Some(c)))
}

fn owner_node(value: &str) -> &str {
    value.rsplit_once(':').map_or(value, |(n, _)| n)
}

/// Every member of the sorted set `key`.
async fn zset_members(
    conn: &mut MultiplexedConnection,
    key: &str,
) -> redis::RedisResult<Vec<String>> {
    redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await
}

async fn scan_keys(
    conn: &mut MultiplexedConnection,
    prefix: &str,
) -> redis::RedisResult<Vec<String>> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    // Bounded: a test farm has far fewer keys than this many pages.
    for _ in 0..100_000 {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

async fn one_pass(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    nodes: &[FarmNode],
    transitions: &mut Transitions,
    stuck_after: Duration,
) -> redis::RedisResult<InvariantReport> {
    let live: BTreeSet<&str> = nodes
        .iter()
        .filter(|n| n.alive())
        .map(|n| n.id.as_str())
        .collect();
    let is_live = |id: &str| live.contains(id);
    let mut findings: Vec<Finding> = Vec::new();
    let mut find = |kind: Kind, subject: String, what: String| {
        findings.push(Finding {
            kind,
            subject,
            what,
        })
    };

    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    let now_ms = secs * 1000 + micros / 1000;
    let keys = scan_keys(conn, prefix).await?;
    let p = |s: &str| format!("{prefix}:{s}");
    let owner_prefix = p("owner:");
    let stream_prefix = p("stream:");
    let node_prefix = p("node:");
    let cmd_prefix = p("cmd:");
    let provider_prefix = p("provider:");

    // Owners.
    let owner_keys: Vec<&String> = keys
        .iter()
        .filter(|k| k.starts_with(&owner_prefix))
        .collect();
    let mut owners: BTreeMap<String, String> = BTreeMap::new();
    if !owner_keys.is_empty() {
        let mut pipe = redis::pipe();
        for k in &owner_keys {
            pipe.cmd("GET").arg(k.as_str());
        }
        let vals: Vec<Option<String>> = pipe.query_async(conn).await?;
        for (k, v) in owner_keys.iter().zip(vals) {
            if let Some(v) = v {
                owners.insert(k[owner_prefix.len()..].to_string(), v);
            }
        }
    }
    let owned_channels = owners.len();
    let owner_of = |ch: &str| owners.get(ch).map(|v| owner_node(v).to_string());
    for (ch, v) in &owners {
        if !is_live(owner_node(v)) {
            find(
                Kind::DeadOwnerLease,
                format!("{owner_prefix}{ch}"),
                format!("{owner_prefix}{ch} = {v} (node not alive)"),
            );
        }
    }

    // Stream hashes.
    let stream_keys: Vec<&String> = keys
        .iter()
        .filter(|k| k.starts_with(&stream_prefix))
        .collect();
    let mut running: Vec<String> = Vec::new();
    // Channel → its stream state, for channels whose hash agrees with the lease.
    let mut states: BTreeMap<String, String> = BTreeMap::new();
    let mut seen_transitions = BTreeSet::new();
    if !stream_keys.is_empty() {
        let mut pipe = redis::pipe();
        for k in &stream_keys {
            pipe.cmd("HGETALL")
                .arg(k.as_str())
                .cmd("PTTL")
                .arg(k.as_str());
        }
        let vals: Vec<redis::Value> = pipe.query_async(conn).await?;
        for (k, pair) in stream_keys.iter().zip(vals.chunks(2)) {
            let ch = &k[stream_prefix.len()..];
            let h: HashMap<String, String> =
                redis::from_redis_value(pair[0].clone()).unwrap_or_default();
            let pttl: i64 = redis::from_redis_value(pair[1].clone()).unwrap_or(-2);
            if h.is_empty() {
                continue; // gone between SCAN and HGETALL
            }
            let field = |f: &str| h.get(f).map_or("", String::as_str);
            let (state, node) = (field("state"), field("node"));
            match owner_of(ch) {
                None if state == "failed" && pttl > 0 => {}
                None => find(
                    Kind::OrphanStreamHash,
                    k.to_string(),
                    format!("{k}: state={state} node={node} pttl={pttl}, no owner lease"),
                ),
                Some(o) if o != node => find(
                    Kind::OrphanStreamHash,
                    k.to_string(),
                    format!("{k}: names node {node}, the lease names {o}"),
                ),
                Some(_) => {
                    states.insert(ch.to_string(), state.to_string());
                    if state == "running" {
                        running.push(ch.to_string());
                    }
                    if matches!(state, "starting" | "restarting" | "stopping") {
                        let id = (
                            ch.to_string(),
                            field("gen").to_string(),
                            state.to_string(),
                            field("restarts").to_string(),
                        );
                        let first = *transitions.first_seen.entry(id.clone()).or_insert(now_ms);
                        seen_transitions.insert(id);
                        // A start is timed from its claim; the others from when first seen.
                        let since = match (state, field("started_at").parse::<u64>()) {
                            ("starting", Ok(claimed)) => claimed.min(first),
                            _ => first,
                        };
                        let for_ms = now_ms.saturating_sub(since);
                        if for_ms > stuck_after.as_millis() as u64 {
                            find(
                                Kind::StuckInTransition,
                                k.to_string(),
                                format!(
                                    "{k}: {state} for {:.1}s (bound {stuck_after:?}), restarts {}, last_error {:?}",
                                    for_ms as f64 / 1000.0,
                                    field("restarts"),
                                    field("last_error")
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
    transitions
        .first_seen
        .retain(|id, _| seen_transitions.contains(id));

    // Node keys, command streams, the nodes zset.
    for k in keys.iter().filter(|k| k.starts_with(&node_prefix)) {
        let rest = &k[node_prefix.len()..];
        let id = rest.split(':').next().unwrap_or(rest);
        if !is_live(id) {
            find(
                Kind::DeadNodeKey,
                k.to_string(),
                format!("{k} (node {id} not alive)"),
            );
        }
    }
    for k in keys.iter().filter(|k| k.starts_with(&cmd_prefix)) {
        let id = &k[cmd_prefix.len()..];
        if !is_live(id) {
            find(
                Kind::DeadNodeKey,
                k.to_string(),
                format!("{k} (node {id} not alive)"),
            );
        }
    }
    let members = zset_members(conn, &p("nodes")).await?;
    for m in &members {
        if !is_live(m) {
            find(
                Kind::DeadNodeKey,
                format!("{} {m}", p("nodes")),
                format!("{} member {m} (node not alive)", p("nodes")),
            );
        }
    }
    for id in &live {
        let alive_key = format!("{node_prefix}{id}:alive");
        if !keys.contains(&alive_key) {
            find(
                Kind::UnregisteredLiveNode,
                alive_key.clone(),
                format!("{id}: no {alive_key} (not registered)"),
            );
        }
    }

    // Live nodes' sets and load hashes.
    let mut listed_by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for id in &live {
        let set: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("{node_prefix}{id}:streams"))
            .query_async(conn)
            .await?;
        let load: Vec<String> = redis::cmd("HKEYS")
            .arg(format!("{node_prefix}{id}:load"))
            .query_async(conn)
            .await?;
        for ch in &set {
            listed_by
                .entry(ch.clone())
                .or_default()
                .push(id.to_string());
            if owner_of(ch).as_deref() != Some(*id) {
                find(
                    Kind::StaleSetEntry,
                    format!("{node_prefix}{id}:streams {ch}"),
                    format!(
                        "{node_prefix}{id}:streams has {ch}; lease: {}",
                        owners.get(ch).map_or("none", String::as_str)
                    ),
                );
            }
        }
        for ch in &load {
            if !set.contains(ch) {
                find(
                    Kind::StaleLoadEntry,
                    format!("{node_prefix}{id}:load {ch}"),
                    format!("{node_prefix}{id}:load has {ch}, the set does not"),
                );
            }
        }
    }

    // Access entries.
    let access = zset_members(conn, &p("access")).await?;
    for ch in &access {
        if !owners.contains_key(ch) {
            find(
                Kind::StaleAccessEntry,
                format!("{} {ch}", p("access")),
                format!("{} has {ch}, nobody owns it", p("access")),
            );
        }
    }

    // Provider holdings.
    for k in keys
        .iter()
        .filter(|k| k.starts_with(&provider_prefix) && k.ends_with(":conns"))
    {
        let held: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(k.as_str())
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(conn)
            .await?;
        for (ch, until) in held {
            if until > now_ms as f64 && !owners.contains_key(&ch) {
                find(
                    Kind::StaleProviderHolding,
                    format!("{k} {ch}"),
                    format!(
                        "{k} holds {ch} for {:.1}s more, nobody owns it",
                        (until - now_ms as f64) / 1000.0
                    ),
                );
            }
        }
    }

    // Folders.
    for n in nodes {
        let Ok(rd) = std::fs::read_dir(&n.hls_root) else {
            continue;
        };
        for e in rd.flatten() {
            if !e.path().is_dir() {
                continue;
            }
            let ch = e.file_name().to_string_lossy().into_owned();
            let path = e.path().display().to_string();
            if !n.alive() {
                find(
                    Kind::DeadNodeFolder,
                    path.clone(),
                    format!("{path} (node {} dead)", n.id),
                );
            } else if owner_of(&ch).as_deref() != Some(n.id.as_str()) {
                find(
                    Kind::LeakedFolder,
                    path.clone(),
                    format!(
                        "{path} (lease: {})",
                        owners.get(&ch).map_or("none", String::as_str)
                    ),
                );
            }
        }
    }

    // Processes.
    let ffmpegs = farm_ffmpegs(nodes);
    let facts = Facts {
        nodes,
        owners: &owners,
        states: &states,
        running: &running,
        listed_by: &listed_by,
    };
    report_ffmpegs(&ffmpegs, &facts, &mut find);
    for n in nodes {
        if let Some(pid) = n.pid {
            for z in procs::zombies_of(pid) {
                find(
                    Kind::Zombie,
                    format!("zombie {z}"),
                    format!("pid {z}, child of node {} ({pid})", n.id),
                );
            }
        }
    }
    Ok(InvariantReport {
        findings,
        nodes_alive: live.len(),
        nodes_dead: nodes.len() - live.len(),
        owned_channels,
        ffmpegs: ffmpegs.len(),
        ..Default::default()
    })
}

/// What one pass read from Redis, for judging the processes it found.
struct Facts<'a> {
    nodes: &'a [FarmNode],
    owners: &'a BTreeMap<String, String>,
    /// Channel → stream state (hashes that agree with their lease).
    states: &'a BTreeMap<String, String>,
    running: &'a [String],
    listed_by: &'a BTreeMap<String, Vec<String>>,
}

fn report_ffmpegs(
    ffmpegs: &[FfmpegProc],
    facts: &Facts<'_>,
    find: &mut impl FnMut(Kind, String, String),
) {
    let alive = |id: &str| facts.nodes.iter().any(|n| n.id == id && n.alive());
    let owners = facts.owners;
    let mut per_channel: BTreeMap<&str, Vec<&FfmpegProc>> = BTreeMap::new();
    for f in ffmpegs {
        per_channel.entry(f.channel.as_str()).or_default().push(f);
        let owner = owners.get(&f.channel).map(|v| owner_node(v));
        if !alive(&f.node) {
            find(
                Kind::LeakedProcess,
                format!("pid {}", f.pid),
                format!("pid {} for {} of dead node {}", f.pid, f.channel, f.node),
            );
        } else if owner != Some(f.node.as_str()) {
            find(
                Kind::LeakedProcess,
                format!("pid {}", f.pid),
                format!(
                    "pid {} for {} on {}, lease: {}",
                    f.pid,
                    f.channel,
                    f.node,
                    owners.get(&f.channel).map_or("none", String::as_str)
                ),
            );
        }
    }
    for (ch, procs) in &per_channel {
        let runnable: Vec<&&FfmpegProc> = procs.iter().filter(|p| !p.stopped).collect();
        if runnable.len() > 1 {
            let who: Vec<String> = runnable
                .iter()
                .map(|p| format!("{}:{}", p.node, p.pid))
                .collect();
            find(
                Kind::DoubleRunning,
                format!("channel {ch}"),
                format!(
                    "{ch}: {} runnable FFmpegs ({})",
                    runnable.len(),
                    who.join(", ")
                ),
            );
        }
    }
    for (ch, by) in facts.listed_by {
        if by.len() > 1 {
            find(
                Kind::DoubleListed,
                format!("channel {ch}"),
                format!("{ch}: listed by {} nodes ({})", by.len(), by.join(", ")),
            );
        }
    }
    for ch in facts.running {
        let owner = owners.get(ch).map(|v| owner_node(v)).unwrap_or("");
        let n = per_channel.get(ch.as_str()).map_or(0, Vec::len);
        if !alive(owner) || n != 1 {
            find(
                Kind::RunningWithoutOwnerOrFfmpeg,
                format!("channel {ch}"),
                format!(
                    "{ch}: state running, owner {owner:?} alive={}, {n} FFmpegs",
                    alive(owner)
                ),
            );
        }
    }
    // A lease of a live node that runs nothing for it, unless the stream is between two runs.
    for (ch, v) in owners {
        let node = owner_node(v);
        if !alive(node) {
            continue;
        }
        let state = facts.states.get(ch).map_or("", String::as_str);
        if matches!(state, "starting" | "restarting" | "stopping") {
            continue;
        }
        let runs = per_channel
            .get(ch.as_str())
            .is_some_and(|ps| ps.iter().any(|p| p.node == node));
        if !runs {
            find(
                Kind::LeaseWithoutFfmpeg,
                format!("lease {ch}"),
                format!(
                    "{ch}: leased to live node {node} ({v}), stream state {:?}, no FFmpeg of {node} for it",
                    if state.is_empty() { "none" } else { state }
                ),
            );
        }
    }
}

/// Whether a path looks like a channel folder under `root` (for tests that list folders).
pub fn channel_folders(root: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_values_split_at_the_last_colon() {
        assert_eq!(owner_node("n1:12"), "n1");
        assert_eq!(owner_node("n1"), "n1");
    }

    #[test]
    fn a_report_counts_by_category_and_prints_a_table() {
        let mut r = InvariantReport::default();
        r.findings
            .push(finding(Kind::DeadOwnerLease, "farm:owner:a = n9:1"));
        r.findings.push(finding(Kind::DeadNodeFolder, "/x/n9/a"));
        r.findings
            .push(finding(Kind::DoubleRunning, "b: 2 FFmpegs"));
        r.settled_pass = Some(1);
        assert_eq!(r.leaked_keys(), 1);
        assert_eq!(r.double_owned(), 1);
        assert_eq!(r.dead_node_folders(), 1);
        assert_eq!(r.leaks(), 2);
        assert!(!r.is_clean());
        let table = r.to_string();
        assert!(table.contains("LEAKS"), "{table}");
        assert!(table.contains("farm:owner:a = n9:1"), "{table}");
    }

    fn finding(kind: Kind, what: &str) -> Finding {
        Finding {
            kind,
            subject: what.to_string(),
            what: what.to_string(),
        }
    }

    const MS: Duration = Duration::from_millis(200);

    #[test]
    fn a_duplicate_in_any_pass_fails_even_when_every_other_pass_is_clean() {
        let mut v = Verdict::default();
        v.pass(1, MS, &[]);
        v.pass(2, MS * 2, &[finding(Kind::DoubleRunning, "ch: 2")]);
        for i in 3..20 {
            v.pass(i, MS * i, &[]);
        }
        assert_eq!(v.settled().map(|s| s.0), Some(1));
        assert_eq!(v.violations().len(), 1);
        assert_eq!(v.violations()[0].pass, 2);
        // Also before the farm settled.
        let mut v = Verdict::default();
        v.pass(1, MS, &[finding(Kind::DoubleRunning, "ch: 2")]);
        v.pass(2, MS * 2, &[]);
        assert_eq!(v.violations().len(), 1);
    }

    #[test]
    fn leftovers_may_be_cleaned_up_until_the_farm_settles_but_not_come_back() {
        let leak = finding(Kind::DeadOwnerLease, "farm:owner:a");
        let mut v = Verdict::default();
        v.pass(1, MS, std::slice::from_ref(&leak));
        v.pass(2, MS * 2, std::slice::from_ref(&leak));
        v.pass(3, MS * 3, &[]);
        assert!(v.violations().is_empty());
        assert_eq!(v.settled().map(|s| s.0), Some(3));
        // Once in one pass: a race between two reads of a pass, not a leak.
        v.pass(4, MS * 4, std::slice::from_ref(&leak));
        v.pass(5, MS * 5, &[]);
        assert!(v.violations().is_empty());
        // Twice in a row: a leak.
        v.pass(6, MS * 6, std::slice::from_ref(&leak));
        v.pass(7, MS * 7, std::slice::from_ref(&leak));
        assert_eq!(v.violations().len(), 1);
        assert_eq!(v.violations()[0].pass, 7);
    }

    #[test]
    fn a_farm_that_never_settles_is_not_clean() {
        let mut r = InvariantReport::default();
        assert!(!r.is_clean());
        r.settled_pass = Some(3);
        assert!(r.is_clean());
        r.violations.push(Violation {
            pass: 9,
            at: MS * 9,
            finding: finding(Kind::LeaseWithoutFfmpeg, "ch"),
        });
        assert!(!r.is_clean());
        assert!(r.to_string().contains("pass 9"), "{r}");
    }
}
