//! The farm's invariant checker: run it at the end of every fault scenario.
//!
//! [`check`] looks at everything a farm leaves behind (Redis keys, the nodes' HLS folders, FFmpeg
//! processes) and polls until it finds nothing wrong or the wait passes (use [`settle_time`]:
//! `2 × node_ttl + tick`, the bound of promise 9). It prints a table of what it found and returns
//! the counts. What it calls wrong:
//!
//! - Redis: an owner lease naming a node that is not alive; any `farm:node:<dead>*` key, a
//!   `farm:cmd:<dead>` stream or a `farm:nodes` member of a dead node; a stream hash without an
//!   owner lease (except a `failed` one with a TTL) or naming another node than the lease; a node
//!   set entry whose lease names another node (or nobody); a load entry without its set entry; a
//!   `farm:access` entry of a channel nobody owns; a live provider holding of a channel nobody owns;
//!   a live node that is not registered (no `:alive` key).
//! - Disk: a channel folder under a live node's HLS root for a channel that node does not own.
//!   Folders under a dead node's root are listed apart ("dead node folders"): no process of the farm
//!   can remove them until that node starts again and sweeps them (promise 5, tested by
//!   `node_lifecycle`); they are printed, not counted as leaks.
//! - Processes: an FFmpeg (real or fake: any process whose command line writes under a node's HLS
//!   root) of a dead node or for a channel its node does not own; a zombie child of a live node.
//! - Channels: a `running` channel without exactly one live owner and exactly one FFmpeg in the farm;
//!   two FFmpegs for one channel anywhere ("double owned").
//!
//! Reads are not atomic (a node may be mid-start); polling until a whole pass is clean is what
//! makes the verdict reliable. The checker uses `SCAN` (tests may; the farm never does).

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
    LeakedFolder,
    LeakedProcess,
    Zombie,
    DoubleOwned,
    RunningWithoutOwnerOrFfmpeg,
    /// Informational: folders under a dead node's root (its next start sweeps them).
    DeadNodeFolder,
}

impl Kind {
    const ALL: [Kind; 14] = [
        Kind::DeadOwnerLease,
        Kind::DeadNodeKey,
        Kind::OrphanStreamHash,
        Kind::StaleSetEntry,
        Kind::StaleLoadEntry,
        Kind::StaleAccessEntry,
        Kind::StaleProviderHolding,
        Kind::UnregisteredLiveNode,
        Kind::LeakedFolder,
        Kind::LeakedProcess,
        Kind::Zombie,
        Kind::DoubleOwned,
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
            Kind::LeakedFolder => "channel folders a live node does not own",
            Kind::LeakedProcess => "FFmpegs of a dead node or of an unowned channel",
            Kind::Zombie => "zombie children of live nodes",
            Kind::DoubleOwned => "channels with two FFmpegs or two owners",
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
}

/// What one [`check`] found (the last pass: the clean one, or the one at the deadline).
#[derive(Debug, Clone, Default)]
pub struct InvariantReport {
    pub findings: Vec<Finding>,
    /// How long the checker polled until this pass.
    pub waited: Duration,
    pub passes: u32,
    /// Channels with an owner lease.
    pub owned_channels: usize,
    /// FFmpeg processes found under the nodes' roots.
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
    /// Channels with two FFmpegs or two owners.
    pub fn double_owned(&self) -> usize {
        self.count(|k| k == Kind::DoubleOwned)
    }
    /// Running channels without one live owner and one FFmpeg, and live nodes not registered.
    pub fn broken(&self) -> usize {
        self.count(|k| {
            matches!(
                k,
                Kind::RunningWithoutOwnerOrFfmpeg | Kind::UnregisteredLiveNode
            )
        })
    }
    /// Folders under dead nodes' roots (informational).
    pub fn dead_node_folders(&self) -> usize {
        self.count(|k| k == Kind::DeadNodeFolder)
    }
    /// Everything that must be zero.
    pub fn leaks(&self) -> usize {
        self.count(|k| k != Kind::DeadNodeFolder)
    }
    pub fn is_clean(&self) -> bool {
        self.leaks() == 0
    }
    /// Panics with the table unless clean.
    pub fn assert_clean(&self) {
        assert!(self.is_clean(), "the farm leaked:\n{self}");
    }
    /// One line of figures, for a test's printed summary.
    pub fn figure(&self) -> String {
        format!(
            "leaked keys {}, folders {}, processes {}, double-owned channels {}, broken channels {} (clean after {:?}, {} passes)",
            self.leaked_keys(),
            self.leaked_folders(),
            self.leaked_processes(),
            self.double_owned(),
            self.broken(),
            self.waited,
            self.passes
        )
    }
}

impl fmt::Display for InvariantReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invariants: {} after {:?} ({} passes; nodes alive {}, dead {}; {} owned channels, {} FFmpegs)",
            if self.is_clean() { "CLEAN" } else { "LEAKS" },
            self.waited,
            self.passes,
            self.nodes_alive,
            self.nodes_dead,
            self.owned_channels,
            self.ffmpegs
        )?;
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
        Ok(())
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

/// Polls every 200 ms until a whole pass finds nothing or `wait` passes; prints and returns the
/// last pass. Node ids found in Redis that are not in `nodes` count as dead.
pub async fn check_with(
    redis: &RedisServer,
    prefix: &str,
    nodes: &[FarmNode],
    wait: Duration,
) -> InvariantReport {
    let started = Instant::now();
    let deadline = started + wait;
    let mut conn = redis.conn().await;
    let mut passes = 0;
    loop {
        passes += 1;
        let mut report = match one_pass(&mut conn, prefix, nodes).await {
            Ok(r) => r,
            Err(e) => {
                // Redis itself is the fault under test sometimes: keep polling until the deadline.
                if Instant::now() >= deadline {
                    panic!("invariant checker cannot read redis: {e}");
                }
                if let Ok(c) = redis.try_conn().await {
                    conn = c;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        report.waited = started.elapsed();
        report.passes = passes;
        if report.is_clean() || Instant::now() >= deadline {
            println!("{report}");
            return report;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
) -> redis::RedisResult<InvariantReport> {
    let live: BTreeSet<&str> = nodes
        .iter()
        .filter(|n| n.alive())
        .map(|n| n.id.as_str())
        .collect();
    let is_live = |id: &str| live.contains(id);
    let mut findings: Vec<Finding> = Vec::new();
    let mut find = |kind: Kind, what: String| findings.push(Finding { kind, what });

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
            let state = h.get("state").map_or("", String::as_str);
            let node = h.get("node").map_or("", String::as_str);
            match owner_of(ch) {
                None if state == "failed" && pttl > 0 => {}
                None => find(
                    Kind::OrphanStreamHash,
                    format!("{k}: state={state} node={node} pttl={pttl}, no owner lease"),
                ),
                Some(o) if o != node => find(
                    Kind::OrphanStreamHash,
                    format!("{k}: names node {node}, the lease names {o}"),
                ),
                Some(_) => {
                    if state == "running" {
                        running.push(ch.to_string());
                    }
                }
            }
        }
    }

    // Node keys, command streams, the nodes zset.
    let mut node_ids: BTreeSet<String> = BTreeSet::new();
    for k in keys.iter().filter(|k| k.starts_with(&node_prefix)) {
        let rest = &k[node_prefix.len()..];
        let id = rest.split(':').next().unwrap_or(rest);
        node_ids.insert(id.to_string());
        if !is_live(id) {
            find(Kind::DeadNodeKey, format!("{k} (node {id} not alive)"));
        }
    }
    for k in keys.iter().filter(|k| k.starts_with(&cmd_prefix)) {
        let id = &k[cmd_prefix.len()..];
        if !is_live(id) {
            find(Kind::DeadNodeKey, format!("{k} (node {id} not alive)"));
        }
    }
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(p("nodes"))
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await?;
    for m in &members {
        if !is_live(m) {
            find(
                Kind::DeadNodeKey,
                format!("{} member {m} (node not alive)", p("nodes")),
            );
        }
    }
    for id in &live {
        let alive_key = format!("{node_prefix}{id}:alive");
        if !keys.contains(&alive_key) {
            find(
                Kind::UnregisteredLiveNode,
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
                    format!("{node_prefix}{id}:load has {ch}, the set does not"),
                );
            }
        }
    }

    // Access entries.
    let access: Vec<String> = redis::cmd("ZRANGE")
        .arg(p("access"))
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await?;
    for ch in &access {
        if !owners.contains_key(ch) {
            find(
                Kind::StaleAccessEntry,
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
            if !n.alive() {
                find(
                    Kind::DeadNodeFolder,
                    format!("{} (node {} dead)", e.path().display(), n.id),
                );
            } else if owner_of(&ch).as_deref() != Some(n.id.as_str()) {
                find(
                    Kind::LeakedFolder,
                    format!(
                        "{} (lease: {})",
                        e.path().display(),
                        owners.get(&ch).map_or("none", String::as_str)
                    ),
                );
            }
        }
    }

    // Processes.
    let ffmpegs = farm_ffmpegs(nodes);
    report_ffmpegs(&ffmpegs, nodes, &owners, &running, &listed_by, &mut find);
    for n in nodes {
        if let Some(pid) = n.pid {
            for z in procs::zombies_of(pid) {
                find(
                    Kind::Zombie,
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

fn report_ffmpegs(
    ffmpegs: &[FfmpegProc],
    nodes: &[FarmNode],
    owners: &BTreeMap<String, String>,
    running: &[String],
    listed_by: &BTreeMap<String, Vec<String>>,
    find: &mut impl FnMut(Kind, String),
) {
    let alive = |id: &str| nodes.iter().any(|n| n.id == id && n.alive());
    let mut per_channel: BTreeMap<&str, Vec<&FfmpegProc>> = BTreeMap::new();
    for f in ffmpegs {
        per_channel.entry(f.channel.as_str()).or_default().push(f);
        let owner = owners.get(&f.channel).map(|v| owner_node(v));
        if !alive(&f.node) {
            find(
                Kind::LeakedProcess,
                format!("pid {} for {} of dead node {}", f.pid, f.channel, f.node),
            );
        } else if owner != Some(f.node.as_str()) {
            find(
                Kind::LeakedProcess,
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
        if procs.len() > 1 {
            let who: Vec<String> = procs
                .iter()
                .map(|p| format!("{}:{}", p.node, p.pid))
                .collect();
            find(
                Kind::DoubleOwned,
                format!("{ch}: {} FFmpegs ({})", procs.len(), who.join(", ")),
            );
        }
    }
    for (ch, by) in listed_by {
        if by.len() > 1 {
            find(
                Kind::DoubleOwned,
                format!("{ch}: listed by {} nodes ({})", by.len(), by.join(", ")),
            );
        }
    }
    for ch in running {
        let owner = owners.get(ch).map(|v| owner_node(v)).unwrap_or("");
        let n = per_channel.get(ch.as_str()).map_or(0, Vec::len);
        if !alive(owner) || n != 1 {
            find(
                Kind::RunningWithoutOwnerOrFfmpeg,
                format!(
                    "{ch}: state running, owner {owner:?} alive={}, {n} FFmpegs",
                    alive(owner)
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
        r.findings.push(Finding {
            kind: Kind::DeadOwnerLease,
            what: "farm:owner:a = n9:1".into(),
        });
        r.findings.push(Finding {
            kind: Kind::DeadNodeFolder,
            what: "/x/n9/a".into(),
        });
        r.findings.push(Finding {
            kind: Kind::DoubleOwned,
            what: "b: 2 FFmpegs".into(),
        });
        assert_eq!(r.leaked_keys(), 1);
        assert_eq!(r.double_owned(), 1);
        assert_eq!(r.dead_node_folders(), 1);
        assert_eq!(r.leaks(), 2);
        assert!(!r.is_clean());
        let table = r.to_string();
        assert!(table.contains("LEAKS"), "{table}");
        assert!(table.contains("farm:owner:a = n9:1"), "{table}");
    }
}
