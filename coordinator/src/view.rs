//! How the coordinator and farmctl see nodes, and where a channel goes when it needs a node.

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
    pub fn new(id: &str, heartbeat: f64, alive: bool, hash: &HashMap<String, String>) -> Self {
        let num = |f: &str| hash.get(f).and_then(|v| v.parse().ok()).unwrap_or(0);
        Self {
            id: id.to_string(),
            heartbeat_ms: if heartbeat.is_finite() && heartbeat > 0.0 {
                heartbeat as u64
            } else {
                0
            },
            alive,
            capacity: num("capacity"),
            // Capacity is in weight units (a transcode counts its profile's weight): use the
            // node's load when it reports one, its channel count otherwise.
            running: hash
                .get("load")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| num("running")),
            draining: matches!(hash.get("draining").map(String::as_str), Some("1" | "true")),
        }
    }

    /// Channels it can still take.
    pub fn free(&self) -> u64 {
        if self.capacity == 0 {
            u64::MAX / 2
        } else {
            self.capacity.saturating_sub(self.running)
        }
    }
}

/// The live, not draining node with the most free capacity (ties: the smallest id), skipping
/// `exclude`.
pub fn pick_target<'a>(nodes: &'a [NodeView], exclude: &[&str]) -> Option<&'a NodeView> {
    nodes
        .iter()
        .filter(|n| n.alive && !n.draining && n.free() > 0 && !exclude.contains(&n.id.as_str()))
        .max_by(|a, b| a.free().cmp(&b.free()).then_with(|| b.id.cmp(&a.id)))
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

    #[test]
    fn picks_the_live_node_with_most_room() {
        let nodes = [
            node("a", true, 10, 9),
            node("b", true, 10, 2),
            node("c", false, 100, 0),
            node("d", true, 10, 2),
            node("e", true, 5, 5),
        ];
        assert_eq!(pick_target(&nodes, &[]).map(|n| n.id.as_str()), Some("b"));
        assert_eq!(
            pick_target(&nodes, &["b"]).map(|n| n.id.as_str()),
            Some("d")
        );
        assert_eq!(pick_target(&nodes, &["b", "d", "a"]), None);
        let mut draining = node("x", true, 100, 0);
        draining.draining = true;
        let with_draining = [node("a", true, 10, 5), draining];
        assert_eq!(
            pick_target(&with_draining, &[]).map(|n| n.id.as_str()),
            Some("a")
        );
        let unlimited = [node("a", true, 10, 0), node("z", true, 0, 50)];
        assert_eq!(
            pick_target(&unlimited, &[]).map(|n| n.id.as_str()),
            Some("z")
        );
    }

    #[test]
    fn view_reads_the_node_hash() {
        let h: HashMap<String, String> = [("capacity", "8"), ("running", "3")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let v = NodeView::new("n1", 1_700_000_000_000.0, true, &h);
        assert_eq!(v.free(), 5);
        assert_eq!(v.heartbeat_ms, 1_700_000_000_000);
        assert_eq!(
            NodeView::new("n2", f64::NAN, false, &HashMap::new()).capacity,
            0
        );
    }
}
