//! The checks and the claim before a channel's first FFmpeg: catalog, disk, capacity, the lease
//! (or a drain's handover) and the recorded timeline.

use super::*;
use crate::error::ApiError;
use axum::http::StatusCode;
use farm_proto::scripts::{owner_value, ClaimResult, HandoverResult};
use farm_proto::ChannelSpec;
use std::sync::atomic::Ordering;
use tracing::warn;

/// Claim, then the recorded timeline.
pub(super) async fn preflight(
    node: &Node,
    entry: &ChannelEntry,
    mode: &ClaimMode,
) -> Result<(ChannelSpec, u64, crate::playlist::Recorded), ApiError> {
    let (spec, gen) = claim(node, entry, mode).await?;
    // What an earlier owner published: the new timeline continues it, and its last playlist is
    // what viewers get while this node starts (a failover or a drain, not a cold start).
    let recorded = match node.store.timeline(&entry.id).await {
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
    };
    Ok((spec, gen, recorded))
}

/// Catalog, checks and claim. Nothing is spawned and nothing is written unless all pass.
pub(super) async fn claim(
    node: &Node,
    entry: &ChannelEntry,
    mode: &ClaimMode,
) -> Result<(ChannelSpec, u64), ApiError> {
    let cfg = &node.cfg;
    let id = &entry.id;
    // Viewers get a sentence; the Redis error (a script hash, a WRONGTYPE) goes to the log.
    let redis_down = |e: crate::store::StoreError| {
        node.metrics.redis_errors.inc();
        warn!(error = %e, "cannot start the channel: redis");
        ApiError::unavailable(
            format!("cannot start channel {id} this moment: the farm's state store did not answer as expected; retry"),
            2,
        )
    };
    let spec = node
        .store
        .catalog(id)
        .await
        .map_err(redis_down)?
        .ok_or_else(|| {
            ApiError::not_found(format!("unknown channel {id:?}: it is not in the catalog"))
        })?;
    for url in spec.sources() {
        farm_proto::validate::upstream_url(&url, &cfg.allowed_schemes).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("channel {id} cannot start: catalog entry has an {e}"),
            )
        })?;
    }
    // FFmpeg reads every scheme but http without the gateway (https through CONNECT, whose TLS
    // the gateway cannot rewrite): credentials in such a URL would be in FFmpeg's argv, which
    // every local user can read. udp/rtp have no credentials (their query holds FFmpeg options).
    for url in spec.sources() {
        let scheme = crate::egress::scheme(&url);
        if !matches!(scheme.as_str(), "http" | "udp" | "rtp")
            && farm_proto::redact::has_credentials(&url)
        {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!(
                    "channel {id} cannot start: its upstream URL {} carries credentials (userinfo, a token in the query or /live/<user>/<pass>/) that FFmpeg would show in its command line; only http:// URLs may carry them (the egress gateway adds them)",
                    farm_proto::redact::url(&url)
                ),
            ));
        }
    }
    // An upstream must never be the farm itself (Redis, a sentinel, this node) nor a denied
    // network: decided on resolved addresses, so no spelling of 127.0.0.1 gets through.
    for url in spec.sources() {
        if let Err(e) = node.egress.check_source(&url, cfg.read_timeout).await {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("channel {id} cannot start: {e}"),
            ));
        }
    }
    if !spec.provider.is_empty() && farm_proto::validate::channel_id(&spec.provider).is_err() {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "channel {id} cannot start: catalog names an invalid provider {:?}",
                spec.provider
            ),
        ));
    }
    if !cfg.profiles.contains_key(&spec.profile) {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "channel {id} cannot start: unknown profile {:?}",
                spec.profile
            ),
        ));
    }
    if let Some(free) = node.disk_free() {
        if free < cfg.min_free {
            return Err(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                format!(
                    "refusing to start channel {id}: {} MiB free on the HLS folder, below min_free {} MiB",
                    free >> 20,
                    cfg.min_free >> 20
                ),
            ));
        }
    }
    let weight = cfg.profiles[&spec.profile].weight.max(1);
    entry.weight.store(weight, Ordering::Release);
    if let ClaimMode::Handover { from, gen } = mode {
        return match node
            .store
            .handover(
                id,
                from,
                *gen,
                &cfg.node_id,
                cfg.lease_ttl,
                cfg.max_streams,
                weight,
            )
            .await
            .map_err(redis_down)?
        {
            HandoverResult::Moved { gen } => Ok((spec, gen)),
            // A race lost (the old owner stopped, or someone took it first) or no room here:
            // the old owner keeps or stops the channel; a viewer's next request finds it.
            HandoverResult::Stale { owner } => Err(ApiError::unavailable(
                format!(
                    "channel {id} cannot be taken over from {from}: its lease is now {}",
                    owner.map_or("free".to_string(), |(n, g)| owner_value(&n, g))
                ),
                1,
            )),
            HandoverResult::Full { running } => Err(ApiError::unavailable(
                format!("channel {id} cannot be taken over from {from}: this node is full ({running} running)"),
                1,
            )),
        };
    }
    if node.draining.load(Ordering::Acquire) {
        // A draining node takes no new channels: the viewer goes to the owner, or a node with room.
        if let Some(owner) = node.store.owner_of(id).await.map_err(redis_down)? {
            if owner != cfg.node_id {
                if let Some(url) = node.store.live_node_url(&owner).await.map_err(redis_down)? {
                    return Err(ApiError::owned_by(url));
                }
            }
        }
        return match node
            .store
            .roomiest_node(&cfg.node_id)
            .await
            .map_err(redis_down)?
        {
            Some((_, url)) => Err(ApiError::forwarded(url)),
            None => Err(ApiError::unavailable(
                format!(
                    "node {} is draining and no other node has room for channel {id}",
                    cfg.node_id
                ),
                10,
            )),
        };
    }
    match node
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
        .map_err(redis_down)?
    {
        ClaimResult::Claimed { gen } => Ok((spec, gen)),
        ClaimResult::Owned { node: owner, .. } if owner == cfg.node_id => {
            Err(ApiError::unavailable(
                format!("channel {id} is still held by an earlier run on this node; retry shortly"),
                1,
            ))
        }
        ClaimResult::Owned { node: owner, .. } => {
            match node.store.live_node_url(&owner).await.map_err(redis_down)? {
                Some(url) => Err(ApiError::owned_by(url)),
                None => Err(ApiError::unavailable(
                    format!(
                    "channel {id} is held by node {owner}, which is not answering; retry shortly"
                ),
                    2,
                )),
            }
        }
        ClaimResult::Full { running } => match node.store.roomiest_node(&cfg.node_id).await.map_err(redis_down)? {
            // Another node has room: the viewer goes there and that node starts the channel.
            Some((_, url)) => Err(ApiError::forwarded(url)),
            None => Err(ApiError::unavailable(
                format!(
                    "the farm is full: node {} is at capacity ({running} of {} weight units) and no live node has room for channel {id}",
                    cfg.node_id, cfg.max_streams
                ),
                10,
            )),
        },
        ClaimResult::Busy { node: prev } => Err(ApiError::unavailable(
            format!("channel {id} was released from node {prev} a moment ago; it stops there first; retry"),
            1,
        )),
        ClaimResult::Recovering { not_alive: false } => Err(ApiError::unavailable(
            format!("channel {id} cannot start this moment: the farm is recovering from a Redis restart; retry"),
            1,
        )),
        ClaimResult::Recovering { not_alive: true } => Err(ApiError::unavailable(
            format!("channel {id} cannot start this moment: node {} is registering with the farm; retry", cfg.node_id),
            1,
        )),
        ClaimResult::ProviderFull { max } => Err(ApiError::unavailable(
            format!(
                "provider {} is at its limit of {max} concurrent connections; channel {id} cannot start now",
                spec.provider
            ),
            10,
        )),
    }
}
