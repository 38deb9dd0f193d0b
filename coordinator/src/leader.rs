//! Leadership among coordinators: `farm:leader` holds `<id>:<epoch>` with a PX lease, acquired by
//! whoever finds it empty (a new epoch from `farm:leader:epoch`), renewed by compare.
//!
//! Invariants: this process trusts its leadership only until `valid_until`, a margin before the
//! lease it last renewed expires, measured on the monotonic clock from when the renewal was sent;
//! every write the leader makes is a script that checks `farm:leader` again, so a deposed or
//! frozen leader cannot act even if its own view is stale. A follower retries when the current
//! lease expires (its PTTL), so a dead leader is replaced within the lease TTL.

use crate::events::{self, Event};
use crate::shared::Shared;
use crate::store::Result;
use farm_proto::scripts::{self, LeaderReply};
use farm_proto::types::event;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// What one round of the campaign found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Campaign {
    /// We lead; `fresh` when this round acquired the lease.
    Leading { fresh: bool },
    /// Another coordinator leads; try again after this long.
    Following { retry_in: Duration },
}

/// One acquire-or-renew round.
pub async fn campaign(sh: &Shared) -> Result<Campaign> {
    let cfg = &sh.cfg;
    let held = sh.leadership().held.unwrap_or_default();
    let ttl = cfg.leader_ttl;
    let sent = Instant::now();
    let call = scripts::Leader {
        id: &cfg.id,
        ttl,
        held: &held,
    };
    let reply = sh.store.call(&sh.keys, &call).await?;
    // Trust the lease for 4/5 of its TTL from when the request left: clock drift and the reply's
    // travel time eat into the rest.
    let valid_until = sent + ttl * 4 / 5;
    match reply {
        LeaderReply::Renewed { .. } => {
            sh.update_leadership(|l| l.valid_until = Some(valid_until));
            Ok(Campaign::Leading { fresh: false })
        }
        LeaderReply::Acquired { value, epoch } => {
            let previous = sh.leadership().other.unwrap_or_default();
            sh.update_leadership(|l| {
                l.held = Some(value.clone());
                l.epoch = epoch;
                l.valid_until = Some(valid_until);
                l.since = Some(Instant::now());
                l.other = None;
            });
            sh.metrics.is_leader.set(1);
            sh.metrics.leader_changes.inc();
            info!(epoch, %previous, "leading the farm; reaping starts after {:?}", cfg.reap_settle);
            let mut ev = vec![Event::new(event::LEADER_CHANGED, events::local_ms())
                .field("coordinator", &cfg.id)
                .field("epoch", epoch)
                .field("previous", previous)];
            if let Err(e) = events::emit(&sh.store, &sh.keys.events(), &cfg.by(), &mut ev).await {
                sh.metrics.redis_errors.inc();
                warn!(error = %e, "could not record the leader_changed event");
            }
            Ok(Campaign::Leading { fresh: true })
        }
        LeaderReply::Follower { value, pttl_ms } => {
            let was = sh.leadership().held;
            if was.is_some() {
                error!(leader = %value, "lost leadership: another coordinator holds the lease");
            } else {
                debug!(leader = %value, "following");
            }
            sh.update_leadership(|l| {
                l.held = None;
                l.valid_until = None;
                l.since = None;
                l.other = Some(value.clone());
            });
            sh.metrics.is_leader.set(0);
            let renew = cfg.leader_renew_interval();
            let retry_in = match pttl_ms {
                // Try again just after the leader's lease runs out, unless it is renewed first.
                Some(ms) => renew.min(Duration::from_millis(ms + 5)),
                None => renew,
            };
            Ok(Campaign::Following { retry_in })
        }
    }
}

/// The `leader` task: campaigns every third of the lease TTL until cancelled. Errors are retried;
/// a leader that cannot renew stops trusting its leadership when `valid_until` passes.
pub async fn leader_loop(sh: Arc<Shared>, cancel: CancellationToken) {
    let renew = sh.cfg.leader_renew_interval();
    loop {
        let wait = match campaign(&sh).await {
            Ok(Campaign::Leading { .. }) => renew,
            Ok(Campaign::Following { retry_in }) => retry_in,
            Err(e) => {
                sh.metrics.redis_errors.inc();
                let lead = sh.leadership();
                if lead.held.is_some() && lead.leading(Instant::now()).is_none() {
                    error!(error = %e, "cannot renew the leader lease: not acting until it is renewed");
                    sh.metrics.is_leader.set(0);
                } else {
                    warn!(error = %e, "leader lease round failed");
                }
                (renew / 4).max(Duration::from_millis(50))
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Gives the lease up by compare (graceful shutdown), so another coordinator takes over at once.
pub async fn resign(sh: &Shared) {
    let held = sh.leadership().held;
    sh.update_leadership(|l| {
        l.held = None;
        l.valid_until = None;
        l.since = None;
    });
    sh.metrics.is_leader.set(0);
    let Some(value) = held else {
        return;
    };
    let call = scripts::LeaderRelease { held: &value };
    match sh.store.call(&sh.keys, &call).await {
        Ok(true) => info!(%value, "leadership released"),
        Ok(false) => warn!(%value, "the leader lease was no longer ours at release"),
        Err(e) => warn!(error = %e, "could not release the leader lease; it expires by itself"),
    }
}
