//! Pinned channels run somewhere at all times: one that no node owns (never started, fenced,
//! failed, its re-home lost) gets a `start` on the live node with the most room, at most once per
//! lease TTL + node TTL. `farm:pinned` is small; nothing else is scanned.

use super::{Pass, TickError};
use crate::events::Event;
use crate::shared::Shared;
use crate::store::StoreError;
use crate::view::Placement;
use farm_proto::types::event;
use std::collections::HashMap;
use std::time::Instant;
use tracing::{info, warn};

/// Between ticks: pinned channel -> when a start for it may be sent again.
#[derive(Debug, Default)]
pub(super) struct State {
    starts: HashMap<String, Instant>,
}

/// A start for a pinned channel that runs nowhere; `target` is `None` when no live node has room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PinStart {
    pub id: String,
    pub target: Option<String>,
}

/// Starts for the pinned channels nobody owns (`owned` in the same order as `pinned`) that were not
/// started recently, each placed on the node with the most room left.
pub(super) fn plan(
    pinned: &[String],
    owned: &[bool],
    recent: &HashMap<String, Instant>,
    placement: &mut Placement,
) -> Vec<PinStart> {
    pinned
        .iter()
        .zip(owned)
        .filter(|(id, owned)| !**owned && !recent.contains_key(*id))
        .map(|(id, _)| PinStart {
            id: id.clone(),
            target: placement.place(&[]),
        })
        .collect()
}

pub(super) async fn run(pass: &mut Pass<'_>, st: &mut State) -> Result<(), TickError> {
    let (pinned, owned) = read(pass.sh).await?;
    if pinned.is_empty() {
        return Ok(());
    }
    let now = Instant::now();
    let again_at = now + pass.sh.cfg.lease_ttl + pass.sh.cfg.node_ttl;
    st.starts.retain(|_, until| *until > now);
    let mut placement = Placement::new(pass.nodes);
    for start in plan(&pinned, &owned, &st.starts, &mut placement) {
        let Some(target) = start.target else {
            warn!(channel = %start.id, "pinned channel runs nowhere and no live node has room");
            continue;
        };
        pass.fence.start(&target, &start.id, "pinned").await?;
        st.starts.insert(start.id.clone(), again_at);
        pass.report.pinned_started += 1;
        info!(channel = %start.id, node = %target, "pinned channel ran nowhere: start sent");
        pass.events.push(
            Event::new(event::FAILOVER, pass.now_ms)
                .field("node", &target)
                .field("channel", &start.id)
                .field("reason", "pinned"),
        );
    }
    Ok(())
}

/// The members of `farm:pinned` and whether each has an owner.
async fn read(sh: &Shared) -> Result<(Vec<String>, Vec<bool>), StoreError> {
    let pinned: Vec<String> = sh
        .store
        .query(
            "SMEMBERS pinned",
            redis::cmd("SMEMBERS").arg(sh.keys.pinned()),
        )
        .await?;
    if pinned.is_empty() {
        return Ok((pinned, Vec::new()));
    }
    let mut p = redis::pipe();
    for id in &pinned {
        p.exists(sh.keys.owner(id));
    }
    let owned: Vec<bool> = sh.store.pipe("EXISTS owners", &p).await?;
    Ok((pinned, owned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::NodeView;
    use std::time::Duration;

    fn node(id: &str, capacity: u64, running: u64) -> NodeView {
        NodeView {
            id: id.into(),
            heartbeat_ms: 1,
            alive: true,
            capacity,
            running,
            draining: false,
        }
    }

    #[test]
    fn unowned_pinned_channels_not_started_recently_are_placed_by_room() {
        let pinned: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let owned = [false, true, false, false];
        let recent = HashMap::from([("c".to_string(), Instant::now() + Duration::from_secs(5))]);
        let mut placement = Placement::new(&[node("n1", 2, 0), node("n2", 3, 2)]);
        let starts = plan(&pinned, &owned, &recent, &mut placement);
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            starts,
            [
                PinStart {
                    id: "a".into(),
                    target: some("n1")
                },
                PinStart {
                    id: "d".into(),
                    target: some("n1")
                },
            ]
        );
        // The farm is full now.
        let starts = plan(&pinned[..1], &[false], &HashMap::new(), &mut placement);
        assert_eq!(
            starts,
            [PinStart {
                id: "a".into(),
                target: some("n2")
            }]
        );
        let starts = plan(&pinned[..1], &[false], &HashMap::new(), &mut placement);
        assert_eq!(starts[0].target, None);
    }
}
