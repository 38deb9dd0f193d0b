//! Dead-node reaping and failover: a node whose heartbeat is older than `node_ttl` and whose alive
//! key is gone has its channels released (`reap_channel.lua`), its watched and pinned channels
//! started on the live node with the most room, and then its own keys removed (`reap_node.lua`).
//!
//! Invariants: nothing is reaped while more than half of the known nodes look dead (a Redis or
//! network problem is more likely than a mass failure); a node whose alive key comes back while it
//! is being reaped is left alone; at most the tick's reap budget of channels goes per tick.

use super::{Pass, TickError};
use crate::events::Event;
use crate::shared::Shared;
use crate::store::StoreError;
use crate::view::{NodeView, Placement};
use farm_proto::scripts::split_owner;
use farm_proto::scripts::{ReapChannelReply, ReapNodeReply};
use farm_proto::types::event;
use std::collections::HashSet;
use tracing::{debug, error, info, warn};

/// Between ticks: the dead nodes whose `node_dead` event was written in this term.
#[derive(Debug, Default)]
pub(super) struct State {
    announced: HashSet<String>,
}

/// Nodes whose alive key is gone and whose last heartbeat is older than `hb_cutoff_ms`.
pub(super) fn dead(nodes: &[NodeView], hb_cutoff_ms: u64) -> Vec<&NodeView> {
    nodes
        .iter()
        .filter(|n| !n.alive && n.heartbeat_ms < hb_cutoff_ms)
        .collect()
}

/// More than half of the known nodes look dead: reap nothing.
pub(super) fn too_many_dead(dead: usize, known: usize) -> bool {
    dead * 2 > known
}

/// What decides the fate of one channel of a dead node, read before its release.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct ChannelFacts {
    /// The lease value (`<node>:<gen>`), if any.
    pub owner: Option<String>,
    /// Its score in `farm:access` (last viewer access, ms).
    pub access_ms: Option<f64>,
    /// The catalog's `pinned` field.
    pub pinned: Option<String>,
    /// The catalog's `provider` field.
    pub provider: Option<String>,
}

/// The release of one channel of a dead node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Release {
    pub id: String,
    /// The dead node's gen, when it still held the lease.
    pub gen: Option<u64>,
    /// Start it elsewhere once released: watched since `watched_since` or pinned, and nobody
    /// else owns it.
    pub rehome: bool,
    pub provider: Option<String>,
}

pub(super) fn plan_release(
    node: &str,
    id: &str,
    f: &ChannelFacts,
    watched_since_ms: u64,
) -> Release {
    let owner = f.owner.as_deref().and_then(split_owner);
    let ours_or_free = owner.is_none_or(|(n, _)| n == node);
    let watched = f.access_ms.is_some_and(|a| a >= watched_since_ms as f64);
    let pinned = matches!(f.pinned.as_deref(), Some("1" | "true"));
    Release {
        id: id.to_string(),
        gen: owner.filter(|(n, _)| *n == node).map(|(_, g)| g),
        rehome: ours_or_free && (watched || pinned),
        provider: f.provider.clone().filter(|p| !p.is_empty()),
    }
}

pub(super) async fn run(pass: &mut Pass<'_>, st: &mut State) -> Result<(), TickError> {
    let (sh, nodes, now_ms) = (pass.sh, pass.nodes, pass.now_ms);
    let hb_cutoff = now_ms.saturating_sub(sh.cfg.node_ttl.as_millis() as u64);
    let dead = dead(nodes, hb_cutoff);
    pass.report.nodes_dead = dead.len();
    sh.metrics.nodes_dead.set(dead.len() as i64);
    st.announced.retain(|id| dead.iter().any(|n| &n.id == id));
    if dead.is_empty() {
        return Ok(());
    }
    if too_many_dead(dead.len(), nodes.len()) {
        pass.report.held = Some("many_dead");
        sh.metrics.refused("many_dead");
        error!(
            dead = dead.len(),
            known = nodes.len(),
            "more than half of the nodes look dead: reaping nothing (a Redis or network problem is more likely than a mass failure)"
        );
        return Ok(());
    }
    let watched_since = super::idle::cutoff(now_ms, sh.cfg.idle_timeout);
    let mut placement = Placement::new(nodes);
    for node in dead {
        if pass.budget == 0 {
            break;
        }
        if st.announced.insert(node.id.clone()) {
            warn!(node = %node.id, silent_ms = now_ms.saturating_sub(node.heartbeat_ms), "node is dead: reaping it");
            pass.events.push(
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
                redis::cmd("SMEMBERS").arg(sh.keys.node_streams(&node.id)),
            )
            .await?;
        let chans = &all[..all.len().min(pass.budget)];
        if release(pass, &node.id, chans, watched_since, &mut placement).await? {
            warn!(node = %node.id, "node came back while it was being reaped; leaving it alone");
            st.announced.remove(&node.id);
            continue;
        }
        if chans.len() < all.len() {
            continue; // the reap budget ran out: the rest next tick
        }
        remove_node(pass, st, &node.id, hb_cutoff, all.len()).await?;
    }
    Ok(())
}

/// Releases `chans` of the dead `node` and re-homes those that need it. `true` when the node came
/// back meanwhile (its alive key is there again).
async fn release(
    pass: &mut Pass<'_>,
    node: &str,
    chans: &[String],
    watched_since: u64,
    placement: &mut Placement,
) -> Result<bool, TickError> {
    if chans.is_empty() {
        return Ok(false);
    }
    let facts = read_facts(pass.sh, chans).await?;
    let plans: Vec<Release> = chans
        .iter()
        .zip(&facts)
        .map(|(id, f)| plan_release(node, id, f, watched_since))
        .collect();
    let batch: Vec<(&str, Option<&str>)> = plans
        .iter()
        .map(|p| (p.id.as_str(), p.provider.as_deref()))
        .collect();
    let replies = pass.fence.reap_channels(node, &batch).await?;
    let mut came_back = false;
    let mut rehome = Vec::new();
    for (plan, reply) in plans.iter().zip(&replies.done) {
        match reply {
            ReapChannelReply::Alive => came_back = true,
            ReapChannelReply::Released | ReapChannelReply::Cleared => {
                pass.budget = pass.budget.saturating_sub(1);
                pass.report.channels_reaped += 1;
                pass.sh.metrics.reaped("node_dead", 1);
                pass.events
                    .push(channel_event(event::REAPED, pass.now_ms, node, plan));
                if plan.rehome {
                    rehome.push(plan);
                }
            }
        }
    }
    replies.finish()?;
    for plan in rehome {
        failover(pass, node, plan, placement).await?;
    }
    Ok(came_back)
}

/// Starts a released channel of the dead node `from` on the live node with the most room.
async fn failover(
    pass: &mut Pass<'_>,
    from: &str,
    plan: &Release,
    placement: &mut Placement,
) -> Result<(), TickError> {
    let Some(target) = placement.place(&[from]) else {
        warn!(channel = %plan.id, from, "no live node with free capacity: the channel starts again on its next viewer");
        return Ok(());
    };
    pass.fence.start(&target, &plan.id, "failover").await?;
    pass.report.rehomed += 1;
    pass.sh.metrics.failovers.inc();
    info!(channel = %plan.id, from, to = %target, "failover: start sent");
    pass.events
        .push(channel_event(event::FAILOVER, pass.now_ms, &target, plan).field("from", from));
    Ok(())
}

/// `kind` for the channel of `plan` on `node`, for the reason `node_dead`, with the dead node's gen.
fn channel_event(kind: &'static str, at_ms: u64, node: &str, plan: &Release) -> Event {
    let e = Event::new(kind, at_ms)
        .field("node", node)
        .field("channel", &plan.id)
        .field("reason", "node_dead");
    match plan.gen {
        Some(g) => e.field("gen", g),
        None => e,
    }
}

/// The dead node's own keys, once it lists no channel any more.
async fn remove_node(
    pass: &mut Pass<'_>,
    st: &mut State,
    node: &str,
    hb_cutoff: u64,
    channels: usize,
) -> Result<(), TickError> {
    match pass.fence.reap_node(node, hb_cutoff).await? {
        ReapNodeReply::Reaped => {
            pass.report.nodes_reaped += 1;
            pass.sh.metrics.reaped("node_dead", 1);
            st.announced.remove(node);
            info!(node, channels, "dead node reaped");
            pass.events.push(
                Event::new(event::REAPED, pass.now_ms)
                    .field("node", node)
                    .field("reason", "node_dead")
                    .field("what", "node"),
            );
        }
        r @ (ReapNodeReply::Alive | ReapNodeReply::Busy) => {
            debug!(node, reply = ?r, "node not reaped this tick")
        }
    }
    Ok(())
}

/// Who owns each channel now, when it was last watched, whether it is pinned, its provider.
async fn read_facts(sh: &Shared, chans: &[String]) -> Result<Vec<ChannelFacts>, StoreError> {
    let k = &sh.keys;
    let mut p = redis::pipe();
    for id in chans {
        p.get(k.owner(id))
            .zscore(k.access(), id)
            .cmd("HMGET")
            .arg(k.channel(id))
            .arg("pinned")
            .arg("provider");
    }
    let replies: Vec<redis::Value> = sh.store.pipe("dead node channel facts", &p).await?;
    if replies.len() != chans.len() * 3 {
        return Err(StoreError::protocol(
            "dead node channel facts",
            "reply count",
        ));
    }
    fn read<T: redis::FromRedisValue + Default>(v: &redis::Value) -> T {
        redis::from_redis_value(v.clone()).unwrap_or_default()
    }
    Ok(replies
        .chunks(3)
        .map(|f| {
            let (pinned, provider) = read(&f[2]);
            ChannelFacts {
                owner: read(&f[0]),
                access_ms: read(&f[1]),
                pinned,
                provider,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, heartbeat_ms: u64, alive: bool) -> NodeView {
        NodeView {
            id: id.into(),
            heartbeat_ms,
            alive,
            capacity: 10,
            running: 0,
            draining: false,
        }
    }

    #[test]
    fn dead_means_silent_past_the_cutoff_and_no_alive_key() {
        let nodes = [
            node("old-gone", 100, false),
            node("old-alive", 100, true),
            node("recent-gone", 1_000, false),
        ];
        let ids: Vec<_> = dead(&nodes, 500).iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["old-gone"]);
    }

    #[test]
    fn more_than_half_dead_reaps_nothing() {
        assert!(!too_many_dead(1, 2));
        assert!(too_many_dead(2, 3));
        assert!(!too_many_dead(2, 4));
        assert!(too_many_dead(1, 1));
    }

    fn facts(owner: Option<&str>, access_ms: Option<f64>, pinned: &str) -> ChannelFacts {
        ChannelFacts {
            owner: owner.map(str::to_string),
            access_ms,
            pinned: Some(pinned.to_string()),
            provider: Some(String::new()),
        }
    }

    #[test]
    fn watched_or_pinned_channels_of_the_dead_node_are_rehomed() {
        let since = 1_000;
        let watched = plan_release("n1", "a", &facts(Some("n1:4"), Some(1_500.0), "0"), since);
        assert_eq!(
            watched,
            Release {
                id: "a".into(),
                gen: Some(4),
                rehome: true,
                provider: None
            }
        );
        let idle = plan_release("n1", "b", &facts(Some("n1:4"), Some(500.0), ""), since);
        assert!(!idle.rehome);
        let pinned = plan_release("n1", "c", &facts(None, None, "true"), since);
        assert!(pinned.rehome && pinned.gen.is_none());
        // Another node owns it already: released here only as leftovers, never started twice.
        let elsewhere = plan_release("n1", "d", &facts(Some("n2:9"), Some(1_500.0), "1"), since);
        assert!(!elsewhere.rehome && elsewhere.gen.is_none());
    }

    #[test]
    fn a_provider_goes_with_the_release() {
        let mut f = facts(Some("n1:1"), None, "");
        f.provider = Some("acme".into());
        assert_eq!(
            plan_release("n1", "a", &f, 0).provider.as_deref(),
            Some("acme")
        );
    }

    #[test]
    fn events_carry_the_dead_nodes_gen_when_it_held_the_lease() {
        let with = plan_release("n1", "a", &facts(Some("n1:4"), None, ""), 0);
        let e = channel_event(event::REAPED, 7, "n1", &with);
        assert!(e.fields.contains(&("gen", "4".into())), "{e:?}");
        assert!(e.fields.contains(&("at", "7".into())), "{e:?}");
        let without = plan_release("n1", "a", &facts(None, None, ""), 0);
        assert!(!channel_event(event::REAPED, 7, "n1", &without)
            .fields
            .iter()
            .any(|(k, _)| *k == "gen"));
    }
}
