//! Keepalive: heartbeat, lease renewals and the fence, one pipeline per interval.

use super::*;
use crate::store::{Keepalive, Renewal, StoreError};
use farm_proto::records::NodeRecord;
use farm_proto::scripts::owner_value;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// What the keepalive remembers between ticks.
#[derive(Default)]
struct Beats {
    /// Every channel was fenced (no renewal for the fence time); cleared when Redis answers.
    fenced_all: bool,
    /// This incarnation's heartbeat reached Redis before.
    before: bool,
    /// Redis time of the last heartbeat reply and when it came: a heartbeat tells Redis what time it
    /// expects, so that one delivered late (after a partition healed) changes nothing.
    last_reply: Option<(u64, Instant)>,
}

impl Beats {
    /// Fences every channel, remembered until Redis answers again.
    fn fence_all(&mut self, node: &Node, why: &str) {
        fence_all(node, why);
        self.fenced_all = true;
    }
}

/// Keepalive: heartbeat, lease renewals and last-segment times in one pipeline per interval.
/// Fences channels whose lease is gone, and all of them when Redis was unreachable for 2/3 of the lease TTL.
pub async fn keepalive_loop(node: Arc<Node>) {
    let cfg = node.cfg.clone();
    let mut tick = tokio::time::interval(cfg.keepalive_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beats = Beats::default();
    loop {
        // The fence time is a deadline of its own, not something noticed at the next tick.
        tokio::select! {
            _ = node.cancel.cancelled() => return,
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(fence_deadline(&node)), if !beats.fenced_all => {
                beats.fence_all(&node, "no lease renewal for 2/3 of the lease TTL");
                continue;
            }
        }
        let (entries, draining) = renewable(&node);
        // Woken after a freeze (SIGSTOP, a stalled VM) past the fence time: our leases may belong to
        // others by now. Stop the FFmpegs before anything else, without waiting for Redis to say so.
        if since_redis_ok(&node) >= cfg.fence_after() && !beats.fenced_all && !entries.is_empty() {
            beats.fence_all(
                &node,
                "no lease renewal for 2/3 of the lease TTL (woken after a freeze)",
            );
        }
        match renew(&node, &mut beats, &entries, draining).await {
            Ok((ka, sent_at)) => renewed(&node, &mut beats, &entries, ka, sent_at),
            Err(err) => {
                node.metrics.redis_errors.inc();
                // Try again soon rather than a whole interval later: a blip must not eat the lease.
                tick.reset_after(cfg.keepalive_interval().min(Duration::from_millis(250)));
                let since = since_redis_ok(&node);
                warn!(error = %err, ?since, "keepalive failed");
                if since >= cfg.fence_after() && !entries.is_empty() {
                    beats.fence_all(&node, "cannot renew leases for 2/3 of the lease TTL");
                }
            }
        }
    }
}

/// Stops every FFmpeg this node runs, touching nothing in Redis (their leases may be others' now).
fn fence_all(node: &Node, why: &str) {
    let claimed: Vec<Arc<ChannelEntry>> = node
        .entries()
        .into_iter()
        .filter(|e| e.gen() > 0 && !e.handing_over())
        .collect();
    if !claimed.is_empty() {
        error!(
            reason = why,
            channels = claimed.len(),
            "fencing: stopping every FFmpeg"
        );
    }
    for e in &claimed {
        e.fence();
    }
}

fn fence_deadline(node: &Node) -> tokio::time::Instant {
    let last = *node.last_redis_ok.lock().unwrap_or_else(|p| p.into_inner());
    tokio::time::Instant::from_std(last + node.cfg.fence_after())
}

fn since_redis_ok(node: &Node) -> Duration {
    node.last_redis_ok
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .elapsed()
}

/// The channels whose leases this node renews, and whether it drains (and has nothing left:
/// `drained`).
fn renewable(node: &Node) -> (Vec<Arc<ChannelEntry>>, (bool, bool)) {
    let entries: Vec<Arc<ChannelEntry>> = node
        .entries()
        .into_iter()
        .filter(|e| {
            e.gen() > 0
                && !matches!(
                    e.phase(),
                    Phase::Failed(_) | Phase::Gone | Phase::Refused(_)
                )
        })
        .collect();
    let draining = node.draining.load(Ordering::Acquire);
    let drained = draining && entries.is_empty();
    // A channel being handed over no longer holds its lease: neither renewed nor fenced.
    let entries = entries.into_iter().filter(|e| !e.handing_over()).collect();
    (entries, (draining, drained))
}

/// The node's heartbeat hash.
fn heartbeat(
    node: &Node,
    entries: &[Arc<ChannelEntry>],
    (draining, drained): (bool, bool),
) -> NodeRecord {
    let cfg = &node.cfg;
    let load: u32 = entries.iter().map(|e| e.state().weight).sum();
    NodeRecord {
        public_url: Some(cfg.public_url.clone()),
        addr: Some(cfg.listen.to_string()),
        incarnation: Some(node.incarnation.clone()),
        pid: Some(std::process::id()),
        started_at: Some(node.started_ms),
        version: Some(env!("CARGO_PKG_VERSION").to_string()),
        capacity: Some(cfg.max_streams.into()),
        running: Some(entries.len() as u64),
        load: Some(load.into()),
        disk_free: Some(node.disk_free().unwrap_or(0)),
        draining: Some(draining),
        drained: Some(drained),
        heartbeat_at: None,
    }
}

/// One round trip: heartbeat and renewals, raced against the fence time (a call that hangs past
/// it fences while it hangs: redis_timeout may be longer than what is left of the lease). The
/// reply, and when the renewal was sent (it counts from then).
async fn renew(
    node: &Node,
    beats: &mut Beats,
    entries: &[Arc<ChannelEntry>],
    draining: (bool, bool),
) -> Result<(Keepalive, Instant), StoreError> {
    let cfg = &node.cfg;
    let renewals: Vec<Renewal> = entries
        .iter()
        .map(|e| Renewal {
            channel: e.id.clone(),
            owner: owner_value(&cfg.node_id, e.gen()),
            provider: e.provider.get().cloned().flatten(),
            last_segment_at: e.last_segment_ms(),
        })
        .collect();
    let record = heartbeat(node, entries, draining);
    let sent_at = Instant::now();
    let beat = crate::store::Beat {
        before: beats.before,
        expected_now_ms: beats
            .last_reply
            .map(|(t, at)| t + sent_at.saturating_duration_since(at).as_millis() as u64),
        max_lag: cfg.fence_after(),
    };
    let call = node.keepalive_store.keepalive(
        &cfg.node_id,
        cfg.node_ttl,
        &node.incarnation,
        &record,
        cfg.lease_ttl,
        &renewals,
        &beat,
    );
    tokio::pin!(call);
    let result = loop {
        tokio::select! {
            r = &mut call => break r,
            _ = tokio::time::sleep_until(fence_deadline(node)), if !beats.fenced_all => {
                beats.fence_all(node, "no lease renewal for 2/3 of the lease TTL (a renewal is still pending)");
            }
        }
    };
    match result {
        Ok(ka) if ka.stale => Err(StoreError::Protocol(
            "the heartbeat reached Redis later than the fence time allows; it changed nothing"
                .into(),
        )),
        Ok(ka) => Ok((ka, sent_at)),
        Err(e) => Err(e),
    }
}

/// Redis answered: the node is alive until the next fence time; leases found lost are fenced.
fn renewed(
    node: &Node,
    beats: &mut Beats,
    entries: &[Arc<ChannelEntry>],
    ka: Keepalive,
    sent_at: Instant,
) {
    let cfg = &node.cfg;
    beats.last_reply = Some((ka.redis_now_ms, Instant::now()));
    *node.last_redis_ok.lock().unwrap_or_else(|p| p.into_inner()) = sent_at;
    if let Some(guard) = &node.guard {
        guard.renewed(sent_at, cfg.fence_after());
    }
    beats.before = true;
    node.ready.send_if_modified(|r| !std::mem::replace(r, true));
    if ka.lost {
        fence_all(
            node,
            "redis lost this node's keys (restarted empty, or the node was reaped)",
        );
    }
    if ka.repaired > 0 {
        node.metrics.data_errors.inc_by(ka.repaired.min(100) as u64);
        warn!(
            repaired = ka.repaired,
            "heartbeat replaced wrong-typed keys of this node (>= 100: farm:nodes has the wrong type; the coordinator repairs it)"
        );
    }
    for e in &ka.data_errors {
        node.metrics.data_errors.inc();
        warn!(error = %farm_proto::redact::text(e), "a lease renewal failed on a bad key: only that channel is fenced");
    }
    if beats.fenced_all {
        info!("redis reachable again; channels start again on demand");
        beats.fenced_all = false;
    }
    for (e, ok) in entries.iter().zip(ka.held) {
        if !ok {
            warn!(channel = %e.id, gen = e.gen(), "lease lost; fencing the channel");
            e.fence();
        }
    }
}
