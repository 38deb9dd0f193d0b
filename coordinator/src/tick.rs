//! One tick of the coordinator: idle cleanup, dead-node reaping with failover, and stale-key
//! reconciliation. Every coordinator reads the clock and the node list each tick (so its view of
//! Redis health stays current); only the leader goes on.
//!
//! Invariants:
//! - "Now" is Redis `TIME`, never this machine's clock.
//! - Every write is a script that re-checks the leader lease and the facts it acts on (the owner, the
//!   access score, the node's liveness) atomically; what was read before only selects candidates.
//! - Cost grows with what needs doing, not with the farm: idle channels come from a score range of
//!   `farm:access`, stale keys from a bounded slice per tick (cursors through the live nodes' sets and
//!   the access zset), dead nodes from `farm:nodes`. No KEYS, no SCAN of the keyspace.
//! - Reaping waits `reap_settle` after this coordinator became leader and after its Redis view was
//!   disturbed (a failed call or a stall); it is refused while more than half the nodes look dead.

use crate::events::{self, Event};
use crate::store::{eval, time_ms, Result, StoreError};
use crate::view::{pick_target, NodeView};
use crate::Shared;
use farm_proto::scripts::{self, split_owner};
use farm_proto::types::event;
use std::collections::{HashMap, HashSet};
use std::time::Instant;
use tracing::{debug, error, info, warn};

/// Approximate cap of a node's command stream (XADD MAXLEN ~): far above what a node has pending.
pub const CMD_MAXLEN: usize = 10_000;

/// What the tick loop remembers between ticks.
#[derive(Debug, Default)]
pub struct TickState {
    /// channel -> (gen, until): a stop for that gen is in flight; not sent again before `until`.
    outstanding: HashMap<String, (u64, Instant)>,
    /// Dead nodes whose `node_dead` event was written in this term.
    announced_dead: HashSet<String>,
    /// Rank in `farm:access` where the next reconciliation slice starts.
    access_cursor: u64,
    /// SSCAN cursor per live node's streams set.
    node_cursors: HashMap<String, u64>,
    /// The leader value the last leading tick ran under: a new term starts with a clean state.
    term: Option<String>,
    /// Pinned channel -> when a start for it may be sent again.
    pin_starts: HashMap<String, Instant>,
}

/// What one tick did (for logs, tests and the benchmark).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TickReport {
    pub leading: bool,
    /// Redis time of the tick, ms.
    pub now_ms: u64,
    pub nodes_alive: usize,
    pub nodes_dead: usize,
    /// Idle entries read from `farm:access`.
    pub idle_seen: usize,
    pub idle_stops: usize,
    /// Access entries of channels nobody owns, removed.
    pub stale_access: usize,
    /// Why reaping (and maybe idle cleanup) did not run this tick.
    pub held: Option<&'static str>,
    pub nodes_reaped: usize,
    pub channels_reaped: usize,
    pub rehomed: usize,
    /// Pinned channels that ran nowhere and were started.
    pub pinned_started: usize,
    /// Stale stream hashes and set entries removed.
    pub reconciled: usize,
    /// A script found that another coordinator leads now.
    pub lost_leadership: bool,
}

fn protocol(what: &'static str, detail: impl Into<String>) -> StoreError {
    StoreError::Protocol {
        what,
        detail: detail.into(),
    }
}

/// Farm-wide keys and the type the farm keeps in each; `true` when the leader may replace a
/// wrong-typed one (the farm rebuilds it), `false` when it only reports it (the catalog).
fn global_keys(k: &farm_proto::Keys) -> Vec<(String, &'static str, bool)> {
    vec![
        (k.access(), "zset", true),
        (k.nodes(), "zset", true),
        (k.recovering(), "string", true),
        (k.since(), "string", true),
        (k.events(), "stream", true),
        (k.channels(), "set", false),
        (k.pinned(), "set", false),
    ]
}

/// Checks the farm-wide keys' types (one pipeline of TYPE): a wrong-typed key is reported every
/// tick (log, metric) and, by the leader, replaced when the farm can rebuild it. Returns false when
/// `farm:nodes` is still wrong-typed (this tick cannot read the nodes).
async fn check_keys(sh: &Shared, ev: &mut Vec<Event>, now_ms: u64) -> Result<bool> {
    let keys = global_keys(&sh.keys);
    let mut p = redis::pipe();
    for (key, _, _) in &keys {
        p.cmd("TYPE").arg(key);
    }
    let types: Vec<String> = sh.store.pipe("TYPE of the farm-wide keys", &p).await?;
    let leading = sh.leadership().leading(Instant::now()).map(str::to_string);
    let mut nodes_ok = true;
    for ((key, wanted, repairable), found) in keys.iter().zip(types) {
        if found == *wanted || found == "none" {
            continue;
        }
        sh.metrics.data_errors.inc();
        let mut action = "left (the catalog: an operator must fix it)";
        if let (Some(held), true) = (&leading, *repairable) {
            let mut rp = redis::pipe();
            eval(
                &mut rp,
                &scripts::REPAIR_KEY,
                &[&sh.keys.leader(), key],
                &[held, wanted],
            );
            let r: Vec<String> = sh.store.pipe("repair_key.lua", &rp).await?;
            if r.first().is_some_and(|r| r != "notleader") {
                action = "replaced (the farm rebuilds it)";
                ev.push(
                    Event::new(event::KEY_REPAIRED, now_ms)
                        .field("key", key)
                        .field("found", &found)
                        .field("wanted", *wanted)
                        .field("action", "replaced"),
                );
            }
        } else if *repairable {
            action = "left for the leader to replace";
        }
        error!(%key, %found, %wanted, action, "a farm-wide key has the wrong type");
        if key == &sh.keys.nodes() && !action.starts_with("replaced") {
            nodes_ok = false;
        }
    }
    Ok(nodes_ok)
}

/// Runs one tick.
pub async fn tick(sh: &Shared, st: &mut TickState) -> Result<TickReport> {
    let started = Instant::now();
    let mut report = TickReport::default();
    let mut key_events = Vec::new();
    let clock: (String, String) = sh.store.query("TIME", &redis::cmd("TIME")).await?;
    let clock_ms = time_ms(&clock).ok_or_else(|| protocol("TIME", format!("{clock:?}")))?;
    let nodes_readable = check_keys(sh, &mut key_events, clock_ms).await?;
    if !key_events.is_empty() {
        events::emit(&sh.store, &sh.keys.events(), &sh.cfg.by(), &mut key_events).await?;
    }
    if !nodes_readable {
        return Ok(report);
    }
    let (now_ms, nodes) = read_nodes(sh).await?;
    report.now_ms = now_ms;
    report.nodes_alive = nodes.iter().filter(|n| n.alive).count();
    sh.metrics.nodes_alive.set(report.nodes_alive as i64);

    let lead = sh.leadership();
    let Some(held) = lead.leading(Instant::now()).map(str::to_string) else {
        if st.term.take().is_some() {
            *st = TickState::default();
        }
        sh.metrics.is_leader.set(0);
        return Ok(report);
    };
    report.leading = true;
    sh.metrics.is_leader.set(1);
    if st.term.as_deref() != Some(held.as_str()) {
        *st = TickState {
            term: Some(held.clone()),
            ..TickState::default()
        };
    }

    let cfg = &sh.cfg;
    let settle = cfg.reap_settle;
    let disturbed = sh
        .store
        .disturbed_at()
        .is_some_and(|t| t.elapsed() < settle);
    let new_term = lead.since.is_some_and(|t| t.elapsed() < settle);
    let mut ev = Vec::new();
    let outcome = async {
        if disturbed {
            // Accesses and heartbeats that could not reach Redis are still on their way.
            report.held = Some("redis_disturbed");
            sh.metrics.refused("redis_disturbed");
            warn!(
                settle = ?settle,
                "redis was unreachable or stalled recently: not stopping or reaping anything until it has been steady for the settle time"
            );
            return Ok::<bool, StoreError>(true);
        }
        if !idle_cleanup(sh, st, &held, now_ms, &mut report, &mut ev).await? {
            return Ok(false);
        }
        if new_term {
            report.held = Some("new_leader");
            return Ok(true);
        }
        let mut budget = cfg.max_reaps;
        if !reap_dead(sh, st, &held, now_ms, &nodes, &mut budget, &mut report, &mut ev).await? {
            return Ok(false);
        }
        if !reconcile(sh, st, &held, &nodes, &mut budget, &mut report, &mut ev).await? {
            return Ok(false);
        }
        keep_pinned(sh, st, &held, now_ms, &nodes, &mut report, &mut ev).await
    }
    .await;
    // Whatever was done is recorded, also when a later step failed.
    let emitted = events::emit(&sh.store, &sh.keys.events(), &cfg.by(), &mut ev).await;
    let still_leading = outcome?;
    emitted?;
    if !still_leading {
        report.lost_leadership = true;
        error!("a fenced write found another leader: stopping this tick");
        sh.update_leadership(|l| l.valid_until = None);
        sh.metrics.is_leader.set(0);
    }
    sh.metrics
        .tick_duration
        .observe(started.elapsed().as_secs_f64());
    sh.metrics.ticks.inc();
    Ok(report)
}

/// Redis time and every member of `farm:nodes` with its liveness and load.
async fn read_nodes(sh: &Shared) -> Result<(u64, Vec<NodeView>)> {
    let k = &sh.keys;
    let mut p = redis::pipe();
    p.cmd("TIME")
        .cmd("ZRANGE")
        .arg(k.nodes())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES");
    let (time, members): ((String, String), Vec<(String, f64)>) =
        sh.store.pipe("TIME + ZRANGE nodes", &p).await?;
    let now_ms = time_ms(&time).ok_or_else(|| protocol("TIME", format!("{time:?}")))?;
    if members.is_empty() {
        return Ok((now_ms, Vec::new()));
    }
    let mut p = redis::pipe();
    for (id, _) in &members {
        p.exists(k.node_alive(id))
            .hgetall(k.node(id))
            .scard(k.node_streams(id));
    }
    // One node's wrong-typed hash (an operator's mistake) must not blind the tick to every node.
    p.ignore_errors();
    let replies: Vec<redis::Value> = sh.store.pipe("node liveness", &p).await?;
    if replies.len() != members.len() * 3 {
        return Err(protocol("node liveness", "reply count"));
    }
    let mut nodes = Vec::with_capacity(members.len());
    for ((id, score), r) in members.iter().zip(replies.chunks(3)) {
        let alive: bool = redis::from_redis_value(r[0].clone()).unwrap_or(false);
        if let redis::Value::ServerError(e) = &r[1] {
            sh.metrics.data_errors.inc();
            warn!(node = %id, error = ?e, "the node's hash has the wrong type (its next heartbeat replaces it)");
        }
        let hash: HashMap<String, String> =
            redis::from_redis_value(r[1].clone()).unwrap_or_default();
        let mut view = NodeView::new(id, *score, alive, &hash);
        // The heartbeat's count lags by up to a keepalive; the set is current.
        let listed: u64 = redis::from_redis_value(r[2].clone()).unwrap_or(0);
        view.running = view.running.max(listed);
        nodes.push(view);
    }
    Ok((now_ms, nodes))
}

/// Sends a stop (with the owner's gen) for each channel idle longer than `idle_timeout`; drops access
/// entries of channels nobody owns. Returns false when a fenced write found another leader.
async fn idle_cleanup(
    sh: &Shared,
    st: &mut TickState,
    held: &str,
    now_ms: u64,
    report: &mut TickReport,
    ev: &mut Vec<Event>,
) -> Result<bool> {
    let cfg = &sh.cfg;
    let k = &sh.keys;
    let cutoff = now_ms.saturating_sub(cfg.idle_timeout.as_millis() as u64);
    let cutoff_arg = cutoff.to_string();
    let by = cfg.by();
    let maxlen = CMD_MAXLEN.to_string();
    let (leader_key, access_key) = (k.leader(), k.access());
    let now = Instant::now();
    st.outstanding.retain(|_, (_, until)| *until > now);
    let mut offset = 0usize;
    loop {
        let room = cfg.max_idle_stops.saturating_sub(report.idle_stops);
        if room == 0 {
            break;
        }
        let ids: Vec<String> = sh
            .store
            .query(
                "ZRANGEBYSCORE access",
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&access_key)
                    .arg("-inf")
                    .arg(format!("({cutoff}"))
                    .arg("LIMIT")
                    .arg(offset)
                    .arg(cfg.idle_batch),
            )
            .await?;
        if ids.is_empty() {
            break;
        }
        report.idle_seen += ids.len();
        let mut p = redis::pipe();
        for id in &ids {
            p.get(k.owner(id));
        }
        let owners: Vec<Option<String>> = sh.store.pipe("GET owners", &p).await?;
        // Candidates: not already asked to stop for this gen.
        let todo: Vec<(&String, Option<String>)> = ids
            .iter()
            .zip(owners)
            .filter(|(id, owner)| {
                let gen = owner.as_deref().and_then(split_owner).map(|(_, g)| g);
                !matches!((st.outstanding.get(*id), gen), (Some((g, _)), Some(gen)) if *g == gen)
            })
            .take(room)
            .collect();
        let mut dropped = 0usize;
        if !todo.is_empty() {
            let mut p = redis::pipe();
            for (id, owner) in &todo {
                let node = owner
                    .as_deref()
                    .and_then(split_owner)
                    .map_or("", |(n, _)| n);
                eval(
                    &mut p,
                    &scripts::IDLE_STOP,
                    &[
                        &leader_key,
                        &k.owner(id),
                        &access_key,
                        &k.channel(id),
                        &k.cmd(node),
                    ],
                    &[
                        held,
                        id,
                        &cutoff_arg,
                        owner.as_deref().unwrap_or(""),
                        &maxlen,
                        &by,
                    ],
                );
            }
            let results: Vec<String> = sh.store.pipe("idle_stop.lua", &p).await?;
            for ((id, owner), r) in todo.iter().zip(results) {
                match r.as_str() {
                    "stop" => {
                        let (node, gen) = owner.as_deref().and_then(split_owner).unwrap_or(("", 0));
                        st.outstanding
                            .insert((*id).clone(), (gen, now + cfg.stop_resend_after()));
                        report.idle_stops += 1;
                        sh.metrics.idle_stops.inc();
                        info!(channel = %id, node, gen, "idle: stop sent");
                    }
                    "dropped" => {
                        dropped += 1;
                        report.stale_access += 1;
                        sh.metrics.reaped("stale_access", 1);
                        debug!(channel = %id, "idle access entry of a channel nobody runs removed");
                        ev.push(
                            Event::new(event::REAPED, now_ms)
                                .field("channel", id)
                                .field("reason", "stale_access"),
                        );
                    }
                    "notleader" => return Ok(false),
                    _ => {}
                }
            }
        }
        if ids.len() < cfg.idle_batch {
            break;
        }
        // Removed entries no longer take a rank in the range.
        offset += ids.len() - dropped;
    }
    Ok(true)
}

/// Reaps nodes whose heartbeat is older than `node_ttl` and whose alive key is gone: releases their
/// channels, re-homes the watched and pinned ones, removes the node's keys.
#[allow(clippy::too_many_arguments)]
async fn reap_dead(
    sh: &Shared,
    st: &mut TickState,
    held: &str,
    now_ms: u64,
    nodes: &[NodeView],
    budget: &mut usize,
    report: &mut TickReport,
    ev: &mut Vec<Event>,
) -> Result<bool> {
    let cfg = &sh.cfg;
    let k = &sh.keys;
    let hb_cutoff = now_ms.saturating_sub(cfg.node_ttl.as_millis() as u64);
    let dead: Vec<&NodeView> = nodes
        .iter()
        .filter(|n| !n.alive && n.heartbeat_ms < hb_cutoff)
        .collect();
    report.nodes_dead = dead.len();
    sh.metrics.nodes_dead.set(dead.len() as i64);
    st.announced_dead
        .retain(|id| dead.iter().any(|n| &n.id == id));
    if dead.is_empty() {
        return Ok(true);
    }
    if dead.len() * 2 > nodes.len() {
        report.held = Some("many_dead");
        sh.metrics.refused("many_dead");
        error!(
            dead = dead.len(),
            known = nodes.len(),
            "more than half of the nodes look dead: reaping nothing (a Redis or network problem is more likely than a mass failure)"
        );
        return Ok(true);
    }
    let watched_since = now_ms.saturating_sub(cfg.idle_timeout.as_millis() as u64);
    let mut live: Vec<NodeView> = nodes.iter().filter(|n| n.alive).cloned().collect();
    let leader_key = k.leader();
    for node in dead {
        if *budget == 0 {
            break;
        }
        if st.announced_dead.insert(node.id.clone()) {
            warn!(
                node = %node.id,
                silent_ms = now_ms.saturating_sub(node.heartbeat_ms),
                "node is dead: reaping it"
            );
            ev.push(
                Event::new(event::NODE_DEAD, now_ms)
                    .field("node", &node.id)
                    .field("last_heartbeat", node.heartbeat_ms)
                    .field("reason", "heartbeat_expired"),
            );
        }
        let all: Vec<String> = sh
            .store
            .query(
                "SMEMBERS node streams",
                redis::cmd("SMEMBERS").arg(k.node_streams(&node.id)),
            )
            .await?;
        let chans: Vec<&String> = all.iter().take(*budget).collect();
        let mut came_back = false;
        if !chans.is_empty() {
            // Facts that decide re-homing: who owns it now, when it was last watched, pinned, provider.
            let mut p = redis::pipe();
            for id in &chans {
                p.get(k.owner(id))
                    .zscore(k.access(), *id)
                    .cmd("HMGET")
                    .arg(k.channel(id))
                    .arg("pinned")
                    .arg("provider");
            }
            let facts: Vec<redis::Value> = sh.store.pipe("dead node channel facts", &p).await?;
            if facts.len() != chans.len() * 3 {
                return Err(protocol("dead node channel facts", "reply count"));
            }
            struct Plan<'a> {
                id: &'a str,
                gen: Option<u64>,
                rehome: bool,
            }
            let mut plans = Vec::with_capacity(chans.len());
            let mut p = redis::pipe();
            for (id, f) in chans.iter().zip(facts.chunks(3)) {
                let owner: Option<String> = redis::from_redis_value(f[0].clone()).unwrap_or(None);
                let access: Option<f64> = redis::from_redis_value(f[1].clone()).unwrap_or(None);
                let (pinned, provider): (Option<String>, Option<String>) =
                    redis::from_redis_value(f[2].clone()).unwrap_or((None, None));
                let parsed = owner.as_deref().and_then(split_owner);
                let ours_or_free = parsed.is_none_or(|(n, _)| n == node.id);
                let watched = access.is_some_and(|a| a >= watched_since as f64);
                let pinned = matches!(pinned.as_deref(), Some("1" | "true"));
                let rehome = ours_or_free && (watched || pinned);
                let provider = provider.filter(|p| !p.is_empty());
                let conns = provider
                    .as_deref()
                    .map_or_else(|| k.access(), |p| k.provider_conns(p));
                eval(
                    &mut p,
                    &scripts::REAP_CHANNEL,
                    &[
                        &leader_key,
                        &k.node_alive(&node.id),
                        &k.owner(id),
                        &k.node_streams(&node.id),
                        &k.stream(id),
                        &k.access(),
                        &conns,
                        &k.node_load(&node.id),
                    ],
                    &[
                        held,
                        &node.id,
                        id,
                        if provider.is_some() { "1" } else { "0" },
                    ],
                );
                plans.push(Plan {
                    id,
                    gen: parsed.filter(|(n, _)| *n == node.id).map(|(_, g)| g),
                    rehome,
                });
            }
            let results: Vec<String> = sh.store.pipe("reap_channel.lua", &p).await?;
            let mut starts = Vec::new();
            for (plan, r) in plans.iter().zip(results) {
                match r.as_str() {
                    "notleader" => return Ok(false),
                    "alive" => came_back = true,
                    "released" | "cleared" => {
                        *budget = budget.saturating_sub(1);
                        report.channels_reaped += 1;
                        sh.metrics.reaped("node_dead", 1);
                        let mut e = Event::new(event::REAPED, now_ms)
                            .field("node", &node.id)
                            .field("channel", plan.id)
                            .field("reason", "node_dead");
                        if let Some(g) = plan.gen {
                            e = e.field("gen", g);
                        }
                        ev.push(e);
                        if plan.rehome {
                            starts.push(plan);
                        }
                    }
                    other => warn!(
                        channel = plan.id,
                        reply = other,
                        "unexpected reap_channel reply"
                    ),
                }
            }
            for plan in starts {
                let Some(target) = pick_target(&live, &[node.id.as_str()]).map(|t| t.id.clone())
                else {
                    warn!(
                        channel = plan.id,
                        from = %node.id,
                        "no live node with free capacity: the channel starts again on its next viewer"
                    );
                    continue;
                };
                if !send_start(sh, held, &target, plan.id, "failover").await? {
                    return Ok(false);
                }
                if let Some(t) = live.iter_mut().find(|n| n.id == target) {
                    t.running += 1;
                }
                report.rehomed += 1;
                sh.metrics.failovers.inc();
                info!(channel = plan.id, from = %node.id, to = %target, "failover: start sent");
                let mut e = Event::new(event::FAILOVER, now_ms)
                    .field("node", &target)
                    .field("channel", plan.id)
                    .field("from", &node.id)
                    .field("reason", "node_dead");
                if let Some(g) = plan.gen {
                    e = e.field("gen", g);
                }
                ev.push(e);
            }
        }
        if came_back {
            warn!(node = %node.id, "node came back while it was being reaped; leaving it alone");
            st.announced_dead.remove(&node.id);
            continue;
        }
        if chans.len() < all.len() {
            continue; // the reap budget ran out: the rest next tick
        }
        let mut inv = scripts::REAP_NODE.prepare_invoke();
        inv.key(&leader_key)
            .key(k.node(&node.id))
            .key(k.node_alive(&node.id))
            .key(k.nodes())
            .key(k.node_streams(&node.id))
            .key(k.cmd(&node.id))
            .key(k.node_load(&node.id))
            .arg(held)
            .arg(&node.id)
            .arg(hb_cutoff);
        let r: String = sh.store.script("reap_node.lua", inv).await?;
        match r.as_str() {
            "reaped" => {
                report.nodes_reaped += 1;
                sh.metrics.reaped("node_dead", 1);
                st.announced_dead.remove(&node.id);
                info!(node = %node.id, channels = all.len(), "dead node reaped");
                ev.push(
                    Event::new(event::REAPED, now_ms)
                        .field("node", &node.id)
                        .field("reason", "node_dead")
                        .field("what", "node"),
                );
            }
            "notleader" => return Ok(false),
            other => debug!(node = %node.id, reply = other, "node not reaped this tick"),
        }
    }
    Ok(true)
}

/// Stale-key reconciliation over a bounded slice per tick: set entries of live nodes whose lease
/// names another node or nobody, and stream hashes no lease backs (found through `farm:access`).
async fn reconcile(
    sh: &Shared,
    st: &mut TickState,
    held: &str,
    nodes: &[NodeView],
    budget: &mut usize,
    report: &mut TickReport,
    ev: &mut Vec<Event>,
) -> Result<bool> {
    let cfg = &sh.cfg;
    let k = &sh.keys;
    let slice = cfg.reconcile_batch;
    let alive: Vec<&NodeView> = nodes.iter().filter(|n| n.alive).collect();
    st.node_cursors
        .retain(|id, _| alive.iter().any(|n| &n.id == id));
    // (set the channel was found in, channel)
    let mut cands: Vec<(Option<String>, String)> = Vec::new();
    if !alive.is_empty() {
        let per_node = (slice / alive.len()).max(10);
        let mut p = redis::pipe();
        for n in &alive {
            p.cmd("SSCAN")
                .arg(k.node_streams(&n.id))
                .arg(st.node_cursors.get(&n.id).copied().unwrap_or(0))
                .arg("COUNT")
                .arg(per_node);
        }
        let scans: Vec<(u64, Vec<String>)> = sh.store.pipe("SSCAN node streams", &p).await?;
        for (n, (cursor, members)) in alive.iter().zip(scans) {
            st.node_cursors.insert(n.id.clone(), cursor);
            cands.extend(members.into_iter().map(|c| (Some(n.id.clone()), c)));
        }
    }
    let start = st.access_cursor;
    let slice_ids: Vec<String> = sh
        .store
        .query(
            "ZRANGE access slice",
            redis::cmd("ZRANGE")
                .arg(k.access())
                .arg(start)
                .arg(start + slice as u64 - 1),
        )
        .await?;
    st.access_cursor = if slice_ids.len() < slice {
        0
    } else {
        start + slice_ids.len() as u64
    };
    cands.extend(slice_ids.into_iter().map(|c| (None, c)));
    if cands.is_empty() {
        return Ok(true);
    }
    let mut p = redis::pipe();
    for (_, id) in &cands {
        p.get(k.owner(id))
            .hget(k.stream(id), "node")
            .pttl(k.stream(id));
    }
    let facts: Vec<redis::Value> = sh.store.pipe("reconcile facts", &p).await?;
    if facts.len() != cands.len() * 3 {
        return Err(protocol("reconcile facts", "reply count"));
    }
    let known = |id: &str| nodes.iter().any(|n| n.id == id);
    let is_alive = |id: &str| alive.iter().any(|n| n.id == id);
    let mut acts: Vec<(String, String, bool)> = Vec::new(); // (node, channel, someone else owns it)
    let mut seen = HashSet::new();
    for ((set_node, id), f) in cands.iter().zip(facts.chunks(3)) {
        let owner: Option<String> = redis::from_redis_value(f[0].clone()).unwrap_or(None);
        let hash_node: Option<String> = redis::from_redis_value(f[1].clone()).unwrap_or(None);
        let pttl: i64 = redis::from_redis_value(f[2].clone()).unwrap_or(-2);
        let owner_node = owner.as_deref().and_then(split_owner).map(|(n, _)| n);
        let act = match set_node {
            Some(n) => (owner_node != Some(n.as_str())).then(|| n.clone()),
            // A stream hash nobody's lease backs, of a live node or of one no longer in the farm
            // (a dead node's leftovers are the dead-node reaper's, which re-homes them).
            None => match (owner_node, hash_node) {
                (None, Some(m)) if pttl == -1 && (is_alive(&m) || !known(&m)) => Some(m),
                _ => None,
            },
        };
        if let Some(n) = act {
            if seen.insert((n.clone(), id.clone())) {
                acts.push((n, id.clone(), owner_node.is_some()));
            }
        }
    }
    acts.truncate(*budget);
    if acts.is_empty() {
        return Ok(true);
    }
    let leader_key = k.leader();
    let mut p = redis::pipe();
    for (n, id, _) in &acts {
        eval(
            &mut p,
            &scripts::RECONCILE,
            &[
                &leader_key,
                &k.owner(id),
                &k.node_streams(n),
                &k.stream(id),
                &k.node_load(n),
            ],
            &[held, n, id],
        );
    }
    let results: Vec<String> = sh.store.pipe("reconcile.lua", &p).await?;
    let now_ms = report.now_ms;
    for ((n, id, owned_elsewhere), r) in acts.iter().zip(results) {
        if r == "notleader" {
            return Ok(false);
        }
        if r.is_empty() {
            continue;
        }
        let removed = match r.as_str() {
            "u" => "set",
            "s" => "stream",
            _ => "set,stream",
        };
        let reason = if *owned_elsewhere {
            "not_owner"
        } else {
            "no_lease"
        };
        *budget = budget.saturating_sub(1);
        report.reconciled += 1;
        sh.metrics.reaped(reason, 1);
        info!(node = %n, channel = %id, reason, removed, "stale keys reaped");
        ev.push(
            Event::new(event::REAPED, now_ms)
                .field("node", n)
                .field("channel", id)
                .field("reason", reason)
                .field("removed", removed),
        );
    }
    Ok(true)
}

/// Pinned channels run somewhere at all times: one that no node owns (never started, fenced,
/// failed, its re-home lost) gets a `start` on the live node with the most room, at most once per
/// lease TTL + node TTL. `farm:pinned` is small; nothing else is scanned.
async fn keep_pinned(
    sh: &Shared,
    st: &mut TickState,
    held: &str,
    now_ms: u64,
    nodes: &[NodeView],
    report: &mut TickReport,
    ev: &mut Vec<Event>,
) -> Result<bool> {
    let k = &sh.keys;
    let pinned: Vec<String> = sh
        .store
        .query("SMEMBERS pinned", redis::cmd("SMEMBERS").arg(k.pinned()))
        .await?;
    if pinned.is_empty() {
        return Ok(true);
    }
    let mut p = redis::pipe();
    for id in &pinned {
        p.exists(k.owner(id));
    }
    let owned: Vec<bool> = sh.store.pipe("EXISTS owners", &p).await?;
    let now = Instant::now();
    let backoff = sh.cfg.lease_ttl + sh.cfg.node_ttl;
    st.pin_starts.retain(|_, until| *until > now);
    let mut live: Vec<NodeView> = nodes.iter().filter(|n| n.alive).cloned().collect();
    for (id, owned) in pinned.iter().zip(owned) {
        if owned || st.pin_starts.contains_key(id) {
            continue;
        }
        let Some(target) = pick_target(&live, &[]).map(|t| t.id.clone()) else {
            warn!(channel = %id, "pinned channel runs nowhere and no live node has room");
            continue;
        };
        if !send_start(sh, held, &target, id, "pinned").await? {
            return Ok(false);
        }
        st.pin_starts.insert(id.clone(), now + backoff);
        if let Some(t) = live.iter_mut().find(|n| n.id == target) {
            t.running += 1;
        }
        report.pinned_started += 1;
        info!(channel = %id, node = %target, "pinned channel ran nowhere: start sent");
        ev.push(
            Event::new(event::FAILOVER, now_ms)
                .field("node", &target)
                .field("channel", id)
                .field("reason", "pinned"),
        );
    }
    Ok(true)
}

/// A leader-fenced `start` command for `channel` on `target`'s command stream. `false` when this
/// coordinator no longer leads (nothing was written).
async fn send_start(
    sh: &Shared,
    held: &str,
    target: &str,
    channel: &str,
    reason: &str,
) -> Result<bool> {
    let k = &sh.keys;
    let mut inv = scripts::COMMAND.prepare_invoke();
    inv.key(k.leader())
        .key(k.cmd(target))
        .arg(held)
        .arg(CMD_MAXLEN.to_string())
        .arg("op")
        .arg("start")
        .arg("channel")
        .arg(channel)
        .arg("reason")
        .arg(reason)
        .arg("by")
        .arg(sh.cfg.by());
    let sent: Option<String> = sh.store.script("command.lua", inv).await?;
    Ok(sent.is_some())
}
