//! How the coordinator and farmctl see nodes, and where a channel goes when it needs a node.

use farm_proto::records::NodeRecord;
use farm_proto::{placement, Keys};
use serde::Serialize;
use std::collections::HashMap;

/// One member of `farm:nodes` with its liveness and load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeView {
    pub id: String,
    /// Score in `farm:nodes`: Redis time (ms) of the last heartbeat.
    pub heartbeat_ms: u64,
    /// `farm:node:<id>:alive` exists.
    pub alive: bool,
    /// Most channels it runs at once; 0 = unlimited.
    pub capacity: u64,
    pub running: u64,
    /// The node is draining (`draining` = 1 in its hash): it takes no new channels.
    pub draining: bool,
}

impl NodeView {
    /// Builds a view from the zset member, the alive flag and the node hash (missing fields = 0).
    pub fn new(id: &str, heartbeat: f64, alive: bool, record: &NodeRecord) -> Self {
        Self {
            id: id.to_string(),
            heartbeat_ms: if heartbeat.is_finite() && heartbeat > 0.0 {
                heartbeat as u64
            } else {
                0
            },
            alive,
            capacity: record.capacity.unwrap_or(0),
            // Capacity is in weight units (a transcode counts its profile's weight): use the
            // node's load when it reports one, its channel count otherwise.
            running: record.used().unwrap_or(0),
            draining: record.draining.unwrap_or(false),
        }
    }

    /// How many replies [`NodeView::queue_reads`] adds per node.
    pub const READS: usize = 3;

    /// Queues the reads [`NodeView::from_reads`] takes for node `id`: its alive key, its hash and
    /// the size of its streams set.
    pub fn queue_reads(p: &mut redis::Pipeline, keys: &Keys, id: &str) {
        p.exists(keys.node_alive(id))
            .hgetall(keys.node(id))
            .scard(keys.node_streams(id));
    }

    /// The view from the replies [`NodeView::queue_reads`] queued (a reply that cannot be read
    /// counts as absent), with the node's hash.
    pub fn from_reads(id: &str, heartbeat: f64, reads: &[redis::Value]) -> (Self, NodeRecord) {
        fn read<T: redis::FromRedisValue>(v: Option<&redis::Value>) -> Option<T> {
            v.and_then(|v| redis::from_redis_value(v.clone()).ok())
        }
        let alive = read(reads.first()).unwrap_or(false);
        let hash: HashMap<String, String> = read(reads.get(1)).unwrap_or_default();
        let record = NodeRecord::from_fields(&hash);
        let mut view = NodeView::new(id, heartbeat, alive, &record);
        // The heartbeat's count lags by up to a keepalive; the set is current.
        let listed: u64 = read(reads.get(2)).unwrap_or(0);
        view.running = view.running.max(listed);
        (view, record)
    }

    /// Channels it can still take.
    pub fn free(&self) -> u64 {
        placement::free(self.capacity, self.running)
    }
}

/// The live, not draining node with the most free capacity ([`placement::roomiest`]: ties go to
/// the smallest id), skipping `exclude`.
pub fn pick_target<'a>(nodes: &'a [NodeView], exclude: &[&str]) -> Option<&'a NodeView> {
    placement::roomiest(
        nodes
            .iter()
            .filter(|n| n.alive && !n.draining && !exclude.contains(&n.id.as_str()))
            .map(|n| (n.id.as_str(), n.free(), n)),
    )
}

/// Where this tick's starts go: the live nodes, each start counted against its target's room, so
/// that several starts spread over the farm the way single ones would.
#[derive(Debug, Clone)]
pub struct Placement {
    live: Vec<NodeView>,
}

impl Placement {
    pub fn new(nodes: &[NodeView]) -> Self {
        Self {
            live: nodes.iter().filter(|n| n.alive).cloned().collect(),
        }
    }

    /// The target of one more start ([`pick_target`], skipping `exclude`), counted as running it.
    pub fn place(&mut self, exclude: &[&str]) -> Option<String> {
        let id = pick_target(&self.live, exclude)?.id.clone();
        if let Some(t) = self.live.iter_mut().find(|n| n.id == id) {
            t.running += 1;
        }
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, alive: bool, capacity: u64, running: u64) -> NodeView {
        NodeView {
            id: id.into(),
            heartbeat_ms: 1,
            alive,
            capacity,
            running,
            draining: false,
        }
    }

    /// The id of [`pick_target`]'s node.
    fn picked<'a>(nodes: &'a [NodeView], exclude: &[&str]) -> Option<&'a str> {
        pick_target(nodes, exclude).map(|n| n.id.as_str())
    }

    #[test]
    fn picks_the_live_node_with_most_room() {
        let nodes = [
            node("a", true, 10, 9),
            node("b", true, 10, 2),
            node("c", false, 100, 0),
            node("d", true, 10, 2),
            node("e", true, 5, 5),
        ];
        assert_eq!(picked(&nodes, &[]), Some("b"));
        assert_eq!(picked(&nodes, &["b"]), Some("d"));
        assert_eq!(picked(&nodes, &["b", "d", "a"]), None);
        let mut draining = node("x", true, 100, 0);
        draining.draining = true;
        let with_draining = [node("a", true, 10, 5), draining];
        assert_eq!(picked(&with_draining, &[]), Some("a"));
        let unlimited = [node("a", true, 10, 0), node("z", true, 0, 50)];
        assert_eq!(picked(&unlimited, &[]), Some("z"));
    }

    #[test]
    fn placement_spreads_starts_by_room() {
        let nodes = [
            node("a", true, 4, 1),
            node("b", true, 4, 2),
            node("dead", false, 100, 0),
        ];
        let mut p = Placement::new(&nodes);
        let placed: Vec<_> = (0..6).map(|_| p.place(&[])).collect();
        let some = |s: &str| Some(s.to_string());
        // a has 3 free, b 2: a, then both at 2 (ties: smallest id), ... until both are full.
        assert_eq!(
            placed,
            [some("a"), some("a"), some("b"), some("a"), some("b"), None]
        );
        let mut p = Placement::new(&nodes);
        assert_eq!(p.place(&["a"]), some("b"));
    }

    #[test]
    fn reads_become_a_view_and_unreadable_ones_count_as_absent() {
        use redis::Value;
        let hash = Value::Array(vec![
            Value::BulkString(b"capacity".to_vec()),
            Value::BulkString(b"8".to_vec()),
            Value::BulkString(b"running".to_vec()),
            Value::BulkString(b"1".to_vec()),
        ]);
        let (v, h) = NodeView::from_reads("n1", 5.0, &[Value::Int(1), hash, Value::Int(3)]);
        assert!(v.alive);
        assert_eq!((v.capacity, v.running, v.heartbeat_ms), (8, 3, 5));
        assert_eq!(h.capacity, Some(8));
        let wrong = Value::Int(7); // not a hash
        let (v, h) = NodeView::from_reads("n2", 1.0, &[Value::Int(0), wrong, Value::Int(2)]);
        assert!(!v.alive && h == NodeRecord::default());
        assert_eq!((v.capacity, v.running), (0, 2));
        assert_eq!(NodeView::from_reads("n3", 1.0, &[]).0.running, 0);
    }

    #[test]
    fn view_reads_the_node_hash() {
        let h: HashMap<String, String> = [("capacity", "8"), ("running", "3")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let v = NodeView::new(
            "n1",
            1_700_000_000_000.0,
            true,
            &NodeRecord::from_fields(&h),
        );
        assert_eq!(v.free(), 5);
        assert_eq!(v.heartbeat_ms, 1_700_000_000_000);
        assert_eq!(
            NodeView::new("n2", f64::NAN, false, &NodeRecord::default()).capacity,
            0
        );
    }
}
