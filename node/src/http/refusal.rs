//! The one place where the node's refusals become HTTP answers: a status, a one-sentence message,
//! `Retry-After` where waiting helps, and for a channel another node serves, a redirect to the
//! same path there (or, behind nginx, an `X-Accel-Redirect` to its internal owner location).

use crate::config::Config;
use crate::error::ApiError;
use crate::node::{NodeUrl, Refusal};
use axum::http::{StatusCode, Uri};
use std::time::Duration;

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        let (status, retry_after) = status(&r);
        ApiError {
            retry_after,
            ..ApiError::new(status, message(r))
        }
    }
}

/// The status of each refusal, and `Retry-After` (seconds) where waiting helps.
fn status(r: &Refusal) -> (StatusCode, Option<u64>) {
    use Refusal::*;
    let wait = |s| (StatusCode::SERVICE_UNAVAILABLE, Some(s));
    // Whole seconds, at least 1.
    let later = |d: &Duration| {
        let secs = d.as_secs_f64().ceil().max(1.0) as u64;
        (StatusCode::TOO_MANY_REQUESTS, Some(secs))
    };
    match r {
        BadPath(_) | BeyondNext { .. } | BadMsn { .. } | NoPartials => {
            (StatusCode::BAD_REQUEST, None)
        }
        TokenRequired | BadToken(_) | AdminDisabled => (StatusCode::FORBIDDEN, None),
        AdminUnauthorized => (StatusCode::UNAUTHORIZED, None),
        FirstRequestsLimited { wait, .. } | AdminThrottled { wait } => later(wait),
        NoSuchPath(_)
        | OwnerUnreachable { .. }
        | NotRunning { .. }
        | UnknownChannel { .. }
        | NoSuchPlaylist { .. }
        | SegmentGone { .. }
        | NotHere { .. } => (StatusCode::NOT_FOUND, None),
        Owned(_) | Forwarded(_) => (StatusCode::TEMPORARY_REDIRECT, None),
        BadCatalog { .. } => (StatusCode::BAD_GATEWAY, None),
        DiskLow { .. } => (StatusCode::INSUFFICIENT_STORAGE, None),
        HeldHere { .. }
        | JustReleased { .. }
        | Recovering { .. }
        | Registering { .. }
        | HandoverStale { .. }
        | HandoverFull { .. }
        | Stopping { .. } => wait(1),
        OwnerAway { .. }
        | Unlocatable { .. }
        | StoreUnavailable { .. }
        | NoStartSlot { .. }
        | ShuttingDown
        | StartTimeout { .. } => wait(2),
        FarmFull { .. } | DrainingNoRoom { .. } | ProviderFull { .. } | NoRoomAfterForwards => {
            wait(10)
        }
        Failed { hold, .. } => wait(hold.as_secs().max(1)),
    }
}

/// The sentence a refused viewer reads.
fn message(r: Refusal) -> String {
    use Refusal::*;
    match r {
        BadPath(m) | BadToken(m) => m,
        NoSuchPath(m) => m.into(),
        TokenRequired => "playback token required".into(),
        NoSuchPlaylist { file } => format!(
            "no playlist {file:?}: a channel's playlist is {}",
            crate::playlist::PLAYLIST
        ),
        SegmentGone { id, file } => format!("segment {file} of channel {id} is not available"),
        BadMsn { value } => format!("_HLS_msn={value:?} is not a media sequence number"),
        NoPartials => "_HLS_part: this server offers no partial segments".into(),
        FirstRequestsLimited { rate, burst, .. } => format!(
            "too many requests for channels that are not running from your address \
(at most {rate} a second, {burst} at once); retry in a moment"
        ),
        AdminDisabled => {
            "admin API disabled: start the node with --admin-token (FARM_ADMIN_TOKEN)".into()
        }
        AdminUnauthorized => "missing or wrong bearer token".into(),
        AdminThrottled { .. } => {
            "too many wrong admin tokens from your address: wait before trying again".into()
        }
        NotHere { id } => format!("channel {id} is not running on this node"),
        Owned(_) | Forwarded(_) => "served by its owner node".into(),
        OwnerAway { id, owner } => format!("channel {id} is held by node {owner}, which is not answering; retry shortly"),
        OwnerUnreachable { id } => format!("channel {id} is not running on a reachable node"),
        NotRunning { id } => format!("channel {id} is not running; request its playlist first"),
        Unlocatable { id, why } => format!("cannot locate channel {id}: {why}"),
        UnknownChannel { id } => format!("unknown channel {id:?}: it is not in the catalog"),
        StoreUnavailable { id } => format!("cannot start channel {id} this moment: the farm's state store did not answer as expected; retry"),
        BadCatalog { id, why } => format!("channel {id} cannot start: {why}"),
        DiskLow { id, free, min_free } => format!(
            "refusing to start channel {id}: {} MiB free on the HLS folder, below min_free {} MiB",
            free >> 20,
            min_free >> 20
        ),
        HeldHere { id } => format!("channel {id} is still held by an earlier run on this node; retry shortly"),
        JustReleased { id, node } => format!("channel {id} was released from node {node} a moment ago; it stops there first; retry"),
        FarmFull { id, node, running, capacity } => format!("the farm is full: node {node} is at capacity ({running} of {capacity} weight units) and no live node has room for channel {id}"),
        NoRoomAfterForwards => "the farm is full: no node with room took the channel".into(),
        DrainingNoRoom { id, node } => format!("node {node} is draining and no other node has room for channel {id}"),
        ProviderFull { id, provider, max } => format!("provider {provider} is at its limit of {max} concurrent connections; channel {id} cannot start now"),
        Recovering { id } => format!("channel {id} cannot start this moment: the farm is recovering from a Redis restart; retry"),
        Registering { id, node } => format!("channel {id} cannot start this moment: node {node} is registering with the farm; retry"),
        HandoverStale { id, from, lease } => format!(
            "channel {id} cannot be taken over from {from}: its lease is now {}",
            lease.as_deref().unwrap_or("free")
        ),
        HandoverFull { id, from, running } => format!("channel {id} cannot be taken over from {from}: this node is full ({running} running)"),
        NoStartSlot { id, node, busy, waited } => format!(
            "channel {id} cannot start now: node {node} is busy starting {busy} other channels \
and this one waited {} for its turn; retry shortly",
            farm_proto::duration::format(waited)
        ),
        ShuttingDown => "node is shutting down".into(),
        Failed { reason, .. } => reason,
        StartTimeout { id, waited } => format!(
            "channel {id} is starting: no segment yet after {}",
            farm_proto::duration::format(waited)
        ),
        Stopping { id } => format!("channel {id} is stopping; retry"),
        BeyondNext { id, want, last } => format!("_HLS_msn={want} is beyond the next segments of channel {id} (the last is {last})"),
    }
}

/// As the HTTP answer shows it (logs of refused starts and access-log lines read the same).
impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        ApiError::from(self.clone()).fmt(f)
    }
}

/// The answer to a playback request `uri` that `r` refused: a channel another node serves is a
/// redirect to the same path there, everything else its status and sentence.
pub fn respond(cfg: &Config, r: Refusal, uri: &Uri) -> ApiError {
    let (owner, forwarded) = match &r {
        Refusal::Owned(u) => (u.clone(), false),
        Refusal::Forwarded(u) => (u.clone(), true),
        _ => return r.into(),
    };
    let mut path = uri.path().to_string();
    if forwarded {
        // A forward to a node with room carries a hop count, so two full nodes never bounce a
        // viewer between them.
        let hops = hops(uri);
        if hops >= MAX_HOPS {
            return Refusal::NoRoomAfterForwards.into();
        }
        path = format!("{path}?farm_hop={}", hops + 1);
    } else if let Some(q) = uri.query() {
        path = format!("{path}?{q}");
    }
    redirect(cfg, r.into(), &owner, &path)
}

/// `path` on the `owner` node: a `Location`, or behind nginx an `X-Accel-Redirect` (200, empty).
fn redirect(cfg: &Config, mut e: ApiError, owner: &NodeUrl, path: &str) -> ApiError {
    match &cfg.accel_redirect {
        Some(prefix) => {
            e.status = StatusCode::OK;
            e.message = String::new();
            e.accel = Some(format!("{prefix}/{}{path}", owner.authority()));
        }
        None => e.location = Some(format!("{}{path}", owner.base().trim_end_matches('/'))),
    }
    e
}

/// Forwards to a node with room happen at most this often for one request.
const MAX_HOPS: u32 = 2;

fn hops(uri: &Uri) -> u32 {
    uri.query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("farm_hop="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(accel: Option<&str>) -> Config {
        let mut cfg = Config::from_args(<crate::config::Args as clap::Parser>::parse_from([
            "farm-node",
        ]))
        .expect("defaults");
        cfg.accel_redirect = accel.map(str::to_string);
        cfg
    }

    fn uri(s: &str) -> Uri {
        s.parse().expect("uri")
    }

    fn owner() -> NodeUrl {
        NodeUrl::new("http://10.0.0.2:8080/".into())
    }

    #[test]
    fn the_owner_gets_the_same_path_and_query() {
        let e = respond(
            &cfg(None),
            Refusal::Owned(owner()),
            &uri("/live/a/index.m3u8?x=1"),
        );
        assert_eq!(e.status, StatusCode::TEMPORARY_REDIRECT);
        assert_eq!(
            e.location.as_deref(),
            Some("http://10.0.0.2:8080/live/a/index.m3u8?x=1")
        );
        let e = respond(
            &cfg(Some("/_owner")),
            Refusal::Owned(owner()),
            &uri("/live/a/s.ts"),
        );
        assert_eq!((e.status, e.message.as_str()), (StatusCode::OK, ""));
        assert_eq!(
            e.accel.as_deref(),
            Some("/_owner/10.0.0.2:8080/live/a/s.ts")
        );
    }

    #[test]
    fn forwards_to_a_node_with_room_count_their_hops() {
        let forward = |u: &str| respond(&cfg(None), Refusal::Forwarded(owner()), &uri(u));
        let e = forward("/live/a/index.m3u8?x=1");
        assert_eq!(
            e.location.as_deref(),
            Some("http://10.0.0.2:8080/live/a/index.m3u8?farm_hop=1")
        );
        let e = forward("/live/a/index.m3u8?farm_hop=1");
        assert_eq!(
            e.location.as_deref(),
            Some("http://10.0.0.2:8080/live/a/index.m3u8?farm_hop=2")
        );
        let e = forward("/live/a/index.m3u8?farm_hop=2");
        assert_eq!(
            (e.status, e.retry_after, e.location),
            (StatusCode::SERVICE_UNAVAILABLE, Some(10), None)
        );
    }

    #[test]
    fn other_refusals_keep_their_status_and_sentence() {
        let e = respond(
            &cfg(None),
            Refusal::HeldHere { id: "a".into() },
            &uri("/live/a/index.m3u8"),
        );
        assert_eq!(
            (e.status, e.retry_after),
            (StatusCode::SERVICE_UNAVAILABLE, Some(1))
        );
        assert_eq!(
            e.message,
            "channel a is still held by an earlier run on this node; retry shortly"
        );
        assert_eq!(
            Refusal::ShuttingDown.to_string(),
            "503 node is shutting down",
            "logs read as the answer"
        );
    }
}
