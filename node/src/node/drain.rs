//! Drain: handing every channel of this node to other nodes.

use super::*;
use farm_proto::StreamState;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

/// Drain: hand every channel of this node to the live node with the most room. Its FFmpeg stops
/// first (break before make: the upstream connection, a provider's connection slot and a UDP port
/// can only be held once), while this node keeps serving the published window, which viewers play
/// from their buffer; the new owner takes the lease (handover script), continues the timeline and
/// publishes its first segment; then this node lets the channel go. Channels nobody can take stay
/// here, loudly.
pub async fn drain(node: Arc<Node>) {
    node.draining.store(true, Ordering::Release);
    info!("draining: no new channels; handing the running ones to other nodes");
    let entries: Vec<Arc<ChannelEntry>> = node
        .entries()
        .into_iter()
        .filter(|e| {
            e.gen() > 0
                && matches!(
                    e.phase(),
                    Phase::Ready | Phase::Starting | Phase::Restarting
                )
        })
        .collect();
    for e in entries {
        if node.cancel.is_cancelled() || !node.draining.load(Ordering::Acquire) {
            return;
        }
        let target = match node.store.roomiest_node(&node.cfg.node_id).await {
            Ok(Some((t, _))) => t,
            Ok(None) => {
                error!(channel = %e.id, "drain: no live node has room; the channel stays here");
                continue;
            }
            Err(err) => {
                error!(channel = %e.id, error = %err, "drain: cannot pick a node");
                continue;
            }
        };
        hand_over(&node, &e, &target).await;
    }
    info!("drained");
}

/// One channel to `target`: its FFmpeg paused, the handover command sent, the new owner awaited
/// (bounded), then the channel stopped here.
async fn hand_over(node: &Node, e: &ChannelEntry, target: &str) {
    let cfg = &node.cfg;
    let gen = e.gen();
    let (tx, rx) = oneshot::channel();
    if e.inbox.send(Ctl::Pause { done: tx }).await.is_err() || rx.await.is_err() {
        return; // the channel ended meanwhile
    }
    e.update(|s| s.handing_over = true);
    let cmd = farm_proto::Command {
        op: farm_proto::Op::Start,
        channel: e.id.clone(),
        gen: Some(gen),
        reason: "drain".into(),
        by: cfg.node_id.clone(),
        from: cfg.node_id.clone(),
        seq: None,
    };
    if let Err(err) = node.store.send_command(target, &cmd).await {
        error!(channel = %e.id, error = %err, "drain: cannot send the handover; stopping the channel here (its next viewer starts it elsewhere)");
        e.update(|s| s.handing_over = false);
        let _ = node.stop_channel(&e.id, "drained", Some(gen)).await;
        return;
    }
    let moved = new_owner_runs(node, &e.id, target).await;
    if !moved {
        warn!(channel = %e.id, %target, "drain: the new owner did not report running in time; stopping here anyway");
    }
    let (tx, rx) = oneshot::channel();
    if e.inbox
        .send(Ctl::Stop {
            reason: "drained".into(),
            done: Some(tx),
        })
        .await
        .is_ok()
    {
        let _ = rx.await;
    }
    info!(channel = %e.id, %target, moved, "drain: channel handed over");
}

/// Waits (bounded) until `target` reports the channel running; viewers are still served here
/// meanwhile.
async fn new_owner_runs(node: &Node, id: &str, target: &str) -> bool {
    let deadline = Instant::now() + node.cfg.start_timeout + node.cfg.lease_ttl;
    while Instant::now() < deadline && !node.cancel.is_cancelled() {
        if let Ok(Some((owner, state))) = node.store.stream_owner_state(id).await {
            if owner == target && state == StreamState::Running.as_str() {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}
