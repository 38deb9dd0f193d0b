//! Routing: where a viewer of a channel this node does not run goes (its owner), or why nowhere.

use super::{Node, NodeUrl, Refusal};

impl Node {
    /// Where to send a viewer of a channel `owner` runs.
    pub async fn owner_route(&self, id: &str, owner: &str) -> Refusal {
        match self.store.live_node_url(owner).await {
            Ok(Some(url)) => Refusal::Owned(NodeUrl::new(url)),
            Ok(None) => Refusal::OwnerAway {
                id: id.to_string(),
                owner: owner.to_string(),
            },
            Err(e) => Refusal::Unlocatable {
                id: id.to_string(),
                why: e.to_string(),
            },
        }
    }

    /// A segment request for a channel this node does not run: its owner, or why nobody serves it.
    pub async fn route_elsewhere(&self, id: &str) -> Refusal {
        match self.store.owner_of(id).await {
            Ok(Some(owner)) if owner != self.cfg.node_id => {
                match self.store.live_node_url(&owner).await {
                    Ok(Some(url)) => Refusal::Owned(NodeUrl::new(url)),
                    _ => Refusal::OwnerUnreachable { id: id.to_string() },
                }
            }
            Ok(_) => Refusal::NotRunning { id: id.to_string() },
            Err(e) => Refusal::Unlocatable {
                id: id.to_string(),
                why: e.to_string(),
            },
        }
    }
}
