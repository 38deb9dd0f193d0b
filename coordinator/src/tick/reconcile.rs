//! Stale-key reconciliation over a bounded slice per tick: set entries of live nodes whose lease
//! names another node or nobody, and stream hashes no lease backs (found through `farm:access`).
//! The slice cycles: an SSCAN cursor per live node's set and a rank cursor through `farm:access`.
//! A dead node's leftovers are the dead-node reaper's, which re-homes them.

use super::{Pass, TickError};
use crate::events::Event;
use crate::shared::Shared;
use crate::store::StoreError;
use crate::view::NodeView;
use farm_proto::records::StreamRecord;
use farm_proto::scripts::split_owner;
use farm_proto::types::event;
use std::collections::{HashMap, HashSet};
use tracing::info;

/// Where the next slice starts.
#[derive(Debug, Default)]
pub(super) struct State {
    /// Rank in `farm:access` where the next slice starts.
    access_cursor: u64,
    /// SSCAN cursor per live node's streams set.
    node_cursors: HashMap<String, u64>,
}

/// A channel to look at: found in a live node's set (`set_node`) or in `farm:access` (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Candidate {
    pub set_node: Option<String>,
    pub id: String,
}

/// What Redis says about a candidate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Facts {
    /// The lease value (`<node>:<gen>`), if any.
    pub owner: Option<String>,
    /// The stream hash's `node`.
    pub hash_node: Option<String>,
    /// The stream hash's PTTL (-1: no TTL, a running channel's; -2: no hash).
    pub pttl: i64,
}

/// Keys of `id` that no lease of `node` backs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Stale {
    pub node: String,
    pub id: String,
    /// Another node holds the lease (else nobody does).
    pub owned_elsewhere: bool,
}

impl Stale {
    fn reason(&self) -> &'static str {
        if self.owned_elsewhere {
            "not_owner"
        } else {
            "no_lease"
        }
    }
}

/// SSCAN COUNT per live node: the slice shared among them, at least 10 each.
pub(super) fn per_node(slice: usize, alive: usize) -> usize {
    (slice / alive.max(1)).max(10)
}

/// The rank where the next access slice starts: back to 0 after a short (last) slice.
pub(super) fn next_access_cursor(start: u64, got: usize, slice: usize) -> u64 {
    if got < slice {
        0
    } else {
        start + got as u64
    }
}

/// The stale keys among the candidates, at most `budget`, each (node, channel) once.
pub(super) fn plan(
    cands: &[Candidate],
    facts: &[Facts],
    nodes: &[NodeView],
    budget: usize,
) -> Vec<Stale> {
    let known = |id: &str| nodes.iter().any(|n| n.id == id);
    let alive = |id: &str| nodes.iter().any(|n| n.id == id && n.alive);
    let mut seen = HashSet::new();
    let mut stale = Vec::new();
    for (c, f) in cands.iter().zip(facts) {
        let owner_node = f.owner.as_deref().and_then(split_owner).map(|(n, _)| n);
        let node = match (&c.set_node, owner_node, &f.hash_node) {
            // A set entry the lease does not back.
            (Some(n), _, _) => (owner_node != Some(n.as_str())).then(|| n.clone()),
            // A stream hash nobody's lease backs, of a live node or of one no longer in the farm.
            (None, None, Some(m)) if f.pttl == -1 && (alive(m) || !known(m)) => Some(m.clone()),
            (None, _, _) => None,
        };
        if let Some(node) = node {
            if seen.insert((node.clone(), c.id.clone())) {
                stale.push(Stale {
                    node,
                    id: c.id.clone(),
                    owned_elsewhere: owner_node.is_some(),
                });
            }
        }
    }
    stale.truncate(budget);
    stale
}

pub(super) async fn run(pass: &mut Pass<'_>, st: &mut State) -> Result<(), TickError> {
    let cands = candidates(pass.sh, st, pass.nodes).await?;
    if cands.is_empty() {
        return Ok(());
    }
    let facts = read_facts(pass.sh, &cands).await?;
    let stale = plan(&cands, &facts, pass.nodes, pass.budget);
    if stale.is_empty() {
        return Ok(());
    }
    let batch: Vec<(&str, &str)> = stale
        .iter()
        .map(|s| (s.node.as_str(), s.id.as_str()))
        .collect();
    let replies = pass.fence.reconcile(&batch).await?;
    for (s, removed) in stale.iter().zip(&replies.done) {
        let Some(removed) = removed.label() else {
            continue;
        };
        let reason = s.reason();
        pass.budget = pass.budget.saturating_sub(1);
        pass.report.reconciled += 1;
        pass.sh.metrics.reaped(reason, 1);
        info!(node = %s.node, channel = %s.id, reason, removed, "stale keys reaped");
        pass.events.push(
            Event::new(event::REAPED, pass.now_ms)
                .field("node", &s.node)
                .field("channel", &s.id)
                .field("reason", reason)
                .field("removed", removed),
        );
    }
    replies.finish()
}

/// This tick's slice: the next members of each live node's set, then the next ranks of
/// `farm:access`.
async fn candidates(
    sh: &Shared,
    st: &mut State,
    nodes: &[NodeView],
) -> Result<Vec<Candidate>, StoreError> {
    let slice = sh.cfg.reconcile_batch;
    let alive: Vec<&NodeView> = nodes.iter().filter(|n| n.alive).collect();
    st.node_cursors
        .retain(|id, _| alive.iter().any(|n| &n.id == id));
    let mut cands = Vec::new();
    if !alive.is_empty() {
        let count = per_node(slice, alive.len());
        let mut p = redis::pipe();
        for n in &alive {
            let cursor = st.node_cursors.get(&n.id).copied().unwrap_or(0);
            p.cmd("SSCAN")
                .arg(sh.keys.node_streams(&n.id))
                .arg(cursor)
                .arg("COUNT")
                .arg(count);
        }
        let scans: Vec<(u64, Vec<String>)> = sh.store.pipe("SSCAN node streams", &p).await?;
        for (n, (cursor, members)) in alive.iter().zip(scans) {
            st.node_cursors.insert(n.id.clone(), cursor);
            cands.extend(members.into_iter().map(|id| Candidate {
                set_node: Some(n.id.clone()),
                id,
            }));
        }
    }
    let start = st.access_cursor;
    let end = start + slice as u64 - 1;
    let ids: Vec<String> = sh
        .store
        .query(
            "ZRANGE access slice",
            redis::cmd("ZRANGE")
                .arg(sh.keys.access())
                .arg(start)
                .arg(end),
        )
        .await?;
    st.access_cursor = next_access_cursor(start, ids.len(), slice);
    cands.extend(ids.into_iter().map(|id| Candidate { set_node: None, id }));
    Ok(cands)
}

async fn read_facts(sh: &Shared, cands: &[Candidate]) -> Result<Vec<Facts>, StoreError> {
    let k = &sh.keys;
    let mut p = redis::pipe();
    for c in cands {
        p.get(k.owner(&c.id))
            .hgetall(k.stream(&c.id))
            .pttl(k.stream(&c.id));
    }
    let replies: Vec<redis::Value> = sh.store.pipe("reconcile facts", &p).await?;
    if replies.len() != cands.len() * 3 {
        return Err(StoreError::protocol("reconcile facts", "reply count"));
    }
    Ok(replies
        .chunks(3)
        .map(|f| Facts {
            owner: redis::from_redis_value(f[0].clone()).unwrap_or(None),
            hash_node: StreamRecord::from_fields(
                &redis::from_redis_value(f[1].clone()).unwrap_or_default(),
            )
            .node,
            pttl: redis::from_redis_value(f[2].clone()).unwrap_or(-2),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, alive: bool) -> NodeView {
        NodeView {
            id: id.into(),
            heartbeat_ms: 1,
            alive,
            capacity: 0,
            running: 0,
            draining: false,
        }
    }

    fn cand(set_node: Option<&str>, id: &str) -> Candidate {
        Candidate {
            set_node: set_node.map(str::to_string),
            id: id.into(),
        }
    }

    fn facts(owner: Option<&str>, hash_node: Option<&str>, pttl: i64) -> Facts {
        Facts {
            owner: owner.map(str::to_string),
            hash_node: hash_node.map(str::to_string),
            pttl,
        }
    }

    fn stale(node: &str, id: &str, owned_elsewhere: bool) -> Stale {
        Stale {
            node: node.into(),
            id: id.into(),
            owned_elsewhere,
        }
    }

    /// [`plan`] of candidates, each with the facts read for it.
    fn planned(rows: &[(Candidate, Facts)], nodes: &[NodeView], budget: usize) -> Vec<Stale> {
        let (cands, facts): (Vec<_>, Vec<_>) = rows.iter().cloned().unzip();
        plan(&cands, &facts, nodes, budget)
    }

    #[test]
    fn set_entries_the_lease_does_not_back_are_stale() {
        let nodes = [node("n1", true), node("n2", true)];
        let rows = [
            (cand(Some("n1"), "mine"), facts(Some("n1:3"), None, -2)),
            (cand(Some("n1"), "moved"), facts(Some("n2:4"), None, -2)),
            (cand(Some("n1"), "free"), facts(None, None, -2)),
        ];
        assert_eq!(
            planned(&rows, &nodes, 10),
            [stale("n1", "moved", true), stale("n1", "free", false)]
        );
    }

    #[test]
    fn stream_hashes_without_a_lease_are_stale_unless_kept_or_a_dead_nodes() {
        let nodes = [node("live", true), node("dead", false)];
        let rows = [
            (cand(None, "a"), facts(None, Some("live"), -1)),
            (cand(None, "kept"), facts(None, Some("live"), 5_000)), // a final state kept with a TTL
            (cand(None, "owned"), facts(Some("live:1"), Some("live"), -1)),
            (cand(None, "of-dead"), facts(None, Some("dead"), -1)), // the reaper's, which re-homes it
            (cand(None, "of-gone"), facts(None, Some("gone"), -1)), // a node no longer in the farm
            (cand(None, "no-hash"), facts(None, None, -2)),
        ];
        assert_eq!(
            planned(&rows, &nodes, 10),
            [stale("live", "a", false), stale("gone", "of-gone", false)]
        );
    }

    #[test]
    fn each_stale_pair_once_and_within_the_budget() {
        let nodes = [node("n1", true)];
        let rows = [
            (cand(Some("n1"), "x"), facts(None, None, -2)),
            (cand(None, "x"), facts(None, Some("n1"), -1)),
            (cand(Some("n1"), "y"), facts(None, None, -2)),
        ];
        assert_eq!(
            planned(&rows, &nodes, 10),
            [stale("n1", "x", false), stale("n1", "y", false)]
        );
        assert_eq!(planned(&rows, &nodes, 1), [stale("n1", "x", false)]);
    }

    #[test]
    fn cursors_cycle_through_the_farm() {
        assert_eq!(per_node(200, 2), 100);
        assert_eq!(per_node(200, 50), 10);
        assert_eq!(per_node(200, 0), 200);
        assert_eq!(next_access_cursor(0, 200, 200), 200);
        assert_eq!(next_access_cursor(200, 37, 200), 0);
    }
}
