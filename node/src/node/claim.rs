//! The checks and the claim before a channel's first FFmpeg: catalog, disk, capacity, the lease
//! (or a drain's handover) and the recorded timeline. Refusals are [`Refusal`]s.

use super::*;
use crate::store::StoreError;
use farm_proto::scripts::{owner_value, ClaimResult, HandoverResult};
use farm_proto::ChannelSpec;
use std::sync::atomic::Ordering;
use tracing::warn;

/// Claim, then the recorded timeline.
pub(super) async fn preflight(
    node: &Node,
    entry: &ChannelEntry,
    mode: &ClaimMode,
) -> Result<(ChannelSpec, u64, crate::playlist::Recorded), Refusal> {
    let (spec, gen) = claim(node, entry, mode).await?;
    let recorded = recorded_timeline(node, entry).await;
    Ok((spec, gen, recorded))
}

/// Catalog, checks, then the lease: nothing is spawned and nothing is written unless all pass.
pub(super) async fn claim(
    node: &Node,
    entry: &ChannelEntry,
    mode: &ClaimMode,
) -> Result<(ChannelSpec, u64), Refusal> {
    let id = &entry.id;
    let spec = node
        .store
        .catalog(id)
        .await
        .map_err(|e| redis_down(node, id, e))?
        .ok_or_else(|| Refusal::UnknownChannel { id: id.clone() })?;
    check_sources(node, id, &spec).await?;
    check_entry(node, id, &spec)?;
    check_disk(node, id)?;
    let weight = node.cfg.profiles[&spec.profile].weight.max(1);
    entry.update(|s| s.weight = weight);
    let gen = match mode {
        ClaimMode::Handover { from, gen } => take_over(node, id, from, *gen, weight).await?,
        // A draining node takes no new channels: the viewer goes to the owner, or a node with room.
        ClaimMode::Fresh if node.draining.load(Ordering::Acquire) => {
            return Err(while_draining(node, id).await)
        }
        ClaimMode::Fresh => lease(node, id, &spec, weight).await?,
    };
    Ok((spec, gen))
}

/// Viewers get a sentence; the Redis error (a script hash, a WRONGTYPE) goes to the log.
fn redis_down(node: &Node, id: &str, e: StoreError) -> Refusal {
    node.metrics.redis_errors.inc();
    warn!(error = %e, "cannot start the channel: redis");
    Refusal::StoreUnavailable { id: id.to_string() }
}

fn bad_catalog(id: &str, why: String) -> Refusal {
    Refusal::BadCatalog {
        id: id.to_string(),
        why,
    }
}

/// Every upstream URL of the channel: an allowed scheme, no credentials FFmpeg's argv would show,
/// and an address the egress policy allows.
async fn check_sources(node: &Node, id: &str, spec: &ChannelSpec) -> Result<(), Refusal> {
    let cfg = &node.cfg;
    for url in spec.sources() {
        farm_proto::validate::upstream_url(&url, &cfg.allowed_schemes)
            .map_err(|e| bad_catalog(id, format!("catalog entry has an {e}")))?;
    }
    // FFmpeg reads every scheme but http without the gateway (https through CONNECT, whose TLS
    // the gateway cannot rewrite): credentials in such a URL would be in FFmpeg's argv, which
    // every local user can read. udp/rtp have no credentials (their query holds FFmpeg options).
    for url in spec.sources() {
        let scheme = crate::egress::scheme(&url);
        if !matches!(scheme.as_str(), "http" | "udp" | "rtp")
            && farm_proto::redact::has_credentials(&url)
        {
            return Err(bad_catalog(
                id,
                format!(
                    "its upstream URL {} carries credentials (userinfo, a token in the query or /live/<user>/<pass>/) that FFmpeg would show in its command line; only http:// URLs may carry them (the egress gateway adds them)",
                    farm_proto::redact::url(&url)
                ),
            ));
        }
    }
    // An upstream must never be the farm itself (Redis, a sentinel, this node) nor a denied
    // network: decided on resolved addresses, so no spelling of 127.0.0.1 gets through.
    for url in spec.sources() {
        if let Err(e) = node.egress.check_source(&url, cfg.read_timeout).await {
            return Err(bad_catalog(id, e.to_string()));
        }
    }
    Ok(())
}

/// The catalog entry's provider and profile.
fn check_entry(node: &Node, id: &str, spec: &ChannelSpec) -> Result<(), Refusal> {
    if !spec.provider.is_empty() && farm_proto::validate::channel_id(&spec.provider).is_err() {
        return Err(bad_catalog(
            id,
            format!("catalog names an invalid provider {:?}", spec.provider),
        ));
    }
    if !node.cfg.profiles.contains_key(&spec.profile) {
        return Err(bad_catalog(
            id,
            format!("unknown profile {:?}", spec.profile),
        ));
    }
    Ok(())
}

/// New starts are refused below the free-space watermark.
fn check_disk(node: &Node, id: &str) -> Result<(), Refusal> {
    match node.disk_free() {
        Some(free) if free < node.cfg.min_free => Err(Refusal::DiskLow {
            id: id.to_string(),
            free,
            min_free: node.cfg.min_free,
        }),
        _ => Ok(()),
    }
}

/// A drain's handover: the lease moves from `from` (holding it with `gen`) to this node.
async fn take_over(
    node: &Node,
    id: &str,
    from: &str,
    gen: u64,
    weight: u32,
) -> Result<u64, Refusal> {
    let cfg = &node.cfg;
    let moved = node
        .store
        .handover(
            id,
            from,
            gen,
            &cfg.node_id,
            cfg.lease_ttl,
            cfg.max_streams,
            weight,
        )
        .await
        .map_err(|e| redis_down(node, id, e))?;
    match moved {
        HandoverResult::Moved { gen } => Ok(gen),
        // A race lost (the old owner stopped, or someone took it first) or no room here:
        // the old owner keeps or stops the channel; a viewer's next request finds it.
        HandoverResult::Stale { owner } => Err(Refusal::HandoverStale {
            id: id.to_string(),
            from: from.to_string(),
            lease: owner.map(|(n, g)| owner_value(&n, g)),
        }),
        HandoverResult::Full { running } => Err(Refusal::HandoverFull {
            id: id.to_string(),
            from: from.to_string(),
            running,
        }),
    }
}

/// Where a viewer of a channel goes while this node drains: its owner, or a node with room.
async fn while_draining(node: &Node, id: &str) -> Refusal {
    let node_id = &node.cfg.node_id;
    let route = async {
        if let Some(owner) = node.store.owner_of(id).await? {
            if owner != *node_id {
                if let Some(url) = node.store.live_node_url(&owner).await? {
                    return Ok(Refusal::Owned(NodeUrl::new(url)));
                }
            }
        }
        let none = Refusal::DrainingNoRoom {
            id: id.to_string(),
            node: node_id.clone(),
        };
        forwarded(node, none).await
    };
    route.await.unwrap_or_else(|e| redis_down(node, id, e))
}

/// Sends the viewer to the live node with the most room (that node starts the channel), or
/// answers `none` when no node has room.
async fn forwarded(node: &Node, none: Refusal) -> Result<Refusal, StoreError> {
    Ok(match node.store.roomiest_node(&node.cfg.node_id).await? {
        Some((_, url)) => Refusal::Forwarded(NodeUrl::new(url)),
        None => none,
    })
}

/// The claim script: the lease (and the provider's connection) for this node, or why not.
async fn lease(node: &Node, id: &str, spec: &ChannelSpec, weight: u32) -> Result<u64, Refusal> {
    let cfg = &node.cfg;
    let claimed = node
        .store
        .claim(
            id,
            &cfg.node_id,
            cfg.lease_ttl,
            cfg.max_streams,
            (!spec.provider.is_empty()).then_some(spec.provider.as_str()),
            weight,
        )
        .await
        .map_err(|e| redis_down(node, id, e))?;
    let id = id.to_string();
    Err(match claimed {
        ClaimResult::Claimed { gen } => return Ok(gen),
        ClaimResult::Owned { node: owner, .. } if owner == cfg.node_id => Refusal::HeldHere { id },
        ClaimResult::Owned { node: owner, .. } => match node.store.live_node_url(&owner).await {
            Ok(Some(url)) => Refusal::Owned(NodeUrl::new(url)),
            Ok(None) => Refusal::OwnerAway { id, owner },
            Err(e) => redis_down(node, &id, e),
        },
        // Another node has room: the viewer goes there and that node starts the channel.
        ClaimResult::Full { running } => {
            let none = Refusal::FarmFull {
                id: id.clone(),
                node: cfg.node_id.clone(),
                running,
                capacity: cfg.max_streams,
            };
            forwarded(node, none)
                .await
                .unwrap_or_else(|e| redis_down(node, &id, e))
        }
        ClaimResult::Busy { node: prev } => Refusal::JustReleased { id, node: prev },
        ClaimResult::Recovering { not_alive: false } => Refusal::Recovering { id },
        ClaimResult::Recovering { not_alive: true } => Refusal::Registering {
            id,
            node: cfg.node_id.clone(),
        },
        ClaimResult::ProviderFull { max } => Refusal::ProviderFull {
            id,
            provider: spec.provider.clone(),
            max,
        },
    })
}

/// What an earlier owner published: the new timeline continues it, and its last playlist is
/// what viewers get while this node starts (a failover or a drain, not a cold start).
async fn recorded_timeline(node: &Node, entry: &ChannelEntry) -> crate::playlist::Recorded {
    match node.store.timeline(&entry.id).await {
        Ok(view) => {
            if let (Some(pl), Some(age)) = (view.playlist, view.age_ms) {
                if age <= node.cfg.hold_max().as_millis() as u64 {
                    *entry.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(pl);
                }
            }
            view.recorded
        }
        Err(e) => {
            // Without it the channel starts a new timeline: players see a discontinuity, and the
            // media sequence may repeat numbers an earlier owner used (URIs still differ by gen).
            node.metrics.redis_errors.inc();
            warn!(error = %e, "cannot read the recorded timeline; starting a new one");
            crate::playlist::Recorded::default()
        }
    }
}
