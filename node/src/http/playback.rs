//! Playback: a channel's playlist and segments, wherever it runs. This node's own (waiting for the
//! first segment of a start), the one its owner recorded in Redis, a redirect to its owner, or a
//! start here when nobody runs it; and nginx's `auth_request` hook.

use super::refusal::respond;
use super::response::{file_response, ranged_response};
use super::{client_addr, AppState, Peer};
use crate::config::Config;
use crate::error::ApiError;
use crate::metrics::KindLabel;
use crate::node::{authorize, authorize_uri, Node, Phase, Playback, Refusal};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use farm_proto::validate::HlsFile;
use std::sync::Arc;
use std::time::Instant;

pub(super) async fn live_plain(
    State(st): State<AppState>,
    peer: Peer,
    headers: HeaderMap,
    uri: Uri,
    Path((a, b)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let client = client_addr(&st.node.cfg, peer.0, &headers);
    let p = authorize(&st.node.cfg, &[&a, &b], &client).inspect_err(|_| {
        st.node.metrics.playback_refused.inc();
    })?;
    crate::metrics::viewer_request(&st.node.metrics, live_file(&st, p, &client, &headers, &uri))
        .await
}

pub(super) async fn live_signed(
    State(st): State<AppState>,
    peer: Peer,
    headers: HeaderMap,
    uri: Uri,
    Path((a, b, c)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let client = client_addr(&st.node.cfg, peer.0, &headers);
    let p = authorize(&st.node.cfg, &[&a, &b, &c], &client).inspect_err(|_| {
        st.node.metrics.playback_refused.inc();
    })?;
    crate::metrics::viewer_request(&st.node.metrics, live_file(&st, p, &client, &headers, &uri))
        .await
}

/// The key `client` is rate limited under, `None` when it is exempt: an address of the trusted
/// proxies themselves (loopback by default: the operator's tools, or a proxy that sent no
/// `X-Real-IP`), as nginx exempts loopback from its own per-client limits.
fn limited(cfg: &Config, client: &str) -> Option<String> {
    match client.parse::<std::net::IpAddr>() {
        Ok(ip) if cfg.trusted_proxies.iter().any(|n| n.contains(ip)) => None,
        Ok(_) => Some(client.to_string()),
        Err(_) => None,
    }
}

/// A first request taken from a client's budget before its lookup reached Redis: given back
/// when dropped, unless [`Charge::keep`] says the request did cost a start or a catalog lookup.
struct Charge<'a> {
    taken: Option<(&'a crate::limits::RateLimiter, String)>,
}

impl Charge<'_> {
    /// The request cost what a first request costs: the client's budget stays spent.
    fn keep(mut self) {
        self.taken = None;
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        if let Some((limiter, key)) = self.taken.take() {
            limiter.refund(&key, Instant::now());
        }
    }
}

/// Before a request for a channel this node does not run reaches Redis: an id the catalog did
/// not know a moment ago is 404 from memory, and a client that used up its first requests waits.
/// Otherwise one first request is taken from the client's budget (see [`Charge`]).
fn before_lookup<'a>(
    st: &'a AppState,
    id: &str,
    client: &str,
    now: Instant,
) -> Result<Charge<'a>, ApiError> {
    let m = &st.node.metrics;
    if st.limits.unknown.contains(id, now) {
        m.unknown_channel_hits.inc();
        return Err(Refusal::UnknownChannel { id: id.to_string() }.into());
    }
    let Some(key) = limited(&st.node.cfg, client) else {
        return Ok(Charge { taken: None });
    };
    match st.limits.first_requests.take(&key, now) {
        Ok(()) => Ok(Charge {
            taken: Some((&st.limits.first_requests, key)),
        }),
        Err(wait) => {
            m.first_requests_limited.inc();
            Err(Refusal::FirstRequestsLimited {
                rate: st.node.cfg.start_rate,
                burst: st.node.cfg.start_burst,
                wait,
            }
            .into())
        }
    }
}

async fn live_file(
    st: &AppState,
    p: Playback,
    client: &str,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<Response, ApiError> {
    let node = &st.node;
    let label = KindLabel {
        kind: match p.kind {
            HlsFile::Playlist => "playlist",
            HlsFile::Segment => "segment",
        }
        .into(),
    };
    node.metrics.requests.get_or_create(&label).inc();
    let id = &p.id;
    match p.kind {
        HlsFile::Playlist => {
            if p.file != crate::playlist::PLAYLIST {
                return Err(Refusal::NoSuchPlaylist { file: p.file }.into());
            }
            let body = playlist(st, id, client, uri).await?;
            node.access.record(id);
            Ok(file_response(p.kind, body))
        }
        HlsFile::Segment => {
            let Some(entry) = node.local(id).filter(|e| e.gen() > 0) else {
                let charge = before_lookup(st, id, client, Instant::now())?;
                let e = node.route_elsewhere(id).await;
                if matches!(
                    e,
                    Refusal::NotRunning { .. } | Refusal::OwnerUnreachable { .. }
                ) {
                    // Nobody runs it: as costly as a first request.
                    charge.keep();
                }
                return Err(respond(&node.cfg, e, uri));
            };
            let seq = crate::watcher::segment_number(&p.file);
            let read = match seq {
                Some(seq) => {
                    entry
                        .hot
                        .segment(&entry.dir.join(&p.file), seq, entry.progress().last_seq)
                        .await
                }
                None => tokio::fs::read(entry.dir.join(&p.file))
                    .await
                    .map(bytes::Bytes::from),
            };
            match read {
                Ok(body) => {
                    node.access.record(id);
                    let (r, sent) = ranged_response(p.kind, body, headers);
                    node.metrics.segment_bytes.inc_by(sent);
                    Ok(r)
                }
                Err(_) => Err(Refusal::SegmentGone {
                    id: id.clone(),
                    file: p.file,
                }
                .into()),
            }
        }
    }
}

/// A channel's playlist, wherever it runs: this node's own (waiting for the first segment of a
/// start), or the one its owner recorded in Redis (also while a failover or a drain moves it: the
/// last window, held, which players wait on), or a start here when nobody runs it.
async fn playlist(
    st: &AppState,
    id: &str,
    client: &str,
    uri: &Uri,
) -> Result<bytes::Bytes, ApiError> {
    let node = &st.node;
    let want = wanted_msn(uri)?;
    let local = node.local(id);
    let handing_over = local.as_ref().is_some_and(|e| e.handing_over());
    if let Some(entry) = local.as_ref().filter(|_| !handing_over) {
        if let Some(answer) = local_playlist(node, entry, want).await {
            return answer.map_err(|e| respond(&node.cfg, e, uri));
        }
    }
    let charge = before_lookup(st, id, client, Instant::now())?;
    let view = node.remote_view(id).await.map_err(|e| {
        ApiError::from(Refusal::Unlocatable {
            id: id.to_string(),
            why: e.to_string(),
        })
    })?;
    if handing_over && view.owner.as_deref().is_none_or(|o| o == node.cfg.node_id) {
        // Handing it over (drain), the new owner has not claimed it yet: what this node
        // published, without holding the reload (nothing more will be published here).
        if let Some(e) = &local {
            let p = e.published();
            if !p.plain.is_empty() {
                return Ok(p.plain);
            }
        }
    }
    if let Some(owner) = view.owner.as_deref().filter(|o| *o != node.cfg.node_id) {
        if let (Some(pl), Some(age)) = (&view.playlist, view.age_ms) {
            if age <= node.cfg.hold_max().as_millis() as u64 {
                node.metrics.remote_playlists.inc();
                return Ok(pl.clone());
            }
        }
        // Its owner has published nothing yet (it is starting): the owner answers when it has.
        return Err(respond(&node.cfg, node.owner_route(id, owner).await, uri));
    }
    // Nobody holds the lease: start it here. While that cannot happen yet (the last owner may
    // still stop its FFmpeg, Redis is recovering), the recorded window, if fresh, is the answer.
    let held = view.playlist.clone().filter(|_| {
        view.age_ms
            .is_some_and(|a| a <= node.cfg.hold_max().as_millis() as u64)
    });
    charge.keep();
    let entry = node
        .get_or_start(id)
        .map_err(|e| respond(&node.cfg, e, uri))?;
    match local_playlist(node, &entry, want).await {
        Some(Err(e @ Refusal::UnknownChannel { .. })) => {
            // Refused by the catalog: the next requests for this id need not ask Redis again.
            st.limits.unknown.insert(id, Instant::now());
            Err(e.into())
        }
        Some(Err(e))
            if held.is_some()
                && ApiError::from(e.clone()).status == StatusCode::SERVICE_UNAVAILABLE =>
        {
            node.metrics.remote_playlists.inc();
            Ok(held.unwrap_or_default())
        }
        Some(answer) => answer.map_err(|e| respond(&node.cfg, e, uri)),
        None => Err(Refusal::Stopping { id: id.to_string() }.into()),
    }
}

/// nginx `auth_request`: 204 when the viewer's URI (`X-Original-URI`) may be served, recording the
/// access in memory; 403 otherwise. Never starts anything and never waits on Redis.
pub(super) async fn auth(
    State(node): State<Arc<Node>>,
    peer: Peer,
    headers: HeaderMap,
) -> Response {
    let client = client_addr(&node.cfg, peer.0, &headers);
    let uri = headers
        .get("x-original-uri")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match authorize_uri(&node.cfg, uri, &client) {
        Ok(p) => {
            node.access.record(&p.id);
            node.metrics.auth_allowed.inc();
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => {
            node.metrics.auth_denied.inc();
            let e = ApiError::from(e);
            (StatusCode::FORBIDDEN, format!("{}\n", e.message)).into_response()
        }
    }
}

/// The delivery directive of a blocking playlist reload (RFC 8216bis 6.2.5.2): `_HLS_msn=<n>`
/// asks for a playlist that lists segment n. Partial segments are not offered.
fn wanted_msn(uri: &Uri) -> Result<Option<u64>, ApiError> {
    let mut msn = None;
    for (k, v) in uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
    {
        match k {
            "_HLS_msn" => {
                msn = Some(v.parse::<u64>().map_err(|_| Refusal::BadMsn {
                    value: v.to_string(),
                })?)
            }
            "_HLS_part" => return Err(Refusal::NoPartials.into()),
            _ => {}
        }
    }
    Ok(msn)
}

/// This node's playlist of a channel it runs or starts: the published one, or while it starts
/// after a failover or a drain the earlier owner's (held), else it waits (on phase changes, not by
/// polling) for the first segment, up to `start_timeout`. With `want` (a blocking reload) the
/// answer waits until segment `want` is published, up to three target durations (then it is the
/// current playlist: an unchanged playlist makes a player try again, an error would not be
/// better for the viewer). `None` when the channel is going away here (stopped, or handed over):
/// another node's answer is the right one.
async fn local_playlist(
    node: &Node,
    entry: &crate::node::ChannelEntry,
    want: Option<u64>,
) -> Option<Result<bytes::Bytes, Refusal>> {
    let id = &entry.id;
    let mut rx = entry.phase.subscribe();
    let mut published = entry.published.subscribe();
    let deadline = tokio::time::Instant::now() + node.cfg.start_timeout;
    let mut hold: Option<tokio::time::Instant> = None;
    loop {
        let phase = rx.borrow_and_update().clone();
        let p = published.borrow_and_update().clone();
        let mut until = deadline;
        match phase {
            Phase::Ready | Phase::Restarting | Phase::Claiming | Phase::Starting => {
                if !p.text.is_empty() {
                    let last = p.last.unwrap_or(0);
                    match want {
                        Some(m) if m > last.saturating_add(2) => {
                            return Some(Err(Refusal::BeyondNext {
                                id: id.clone(),
                                want: m,
                                last,
                            }))
                        }
                        Some(m) if m > last => {
                            let end = *hold.get_or_insert_with(|| {
                                tokio::time::Instant::now()
                                    + std::time::Duration::from_secs(3 * p.target.max(1))
                            });
                            if tokio::time::Instant::now() >= end {
                                return Some(Ok(p.text));
                            }
                            until = end;
                        }
                        _ => return Some(Ok(p.text)),
                    }
                } else if let Some(held) = entry.held() {
                    node.metrics.remote_playlists.inc();
                    return Some(Ok(held));
                }
            }
            Phase::Failed(reason) => {
                return Some(Err(Refusal::Failed {
                    reason,
                    hold: node.cfg.failed_hold,
                }))
            }
            Phase::Refused(e) => return Some(Err(e)),
            Phase::Gone => return None,
        }
        let timed_out = tokio::select! {
            r = rx.changed() => match r {
                Ok(()) => false,
                Err(_) => return None,
            },
            r = published.changed() => match r {
                Ok(()) => false,
                Err(_) => return None,
            },
            _ = tokio::time::sleep_until(until) => true,
        };
        if timed_out && until == deadline {
            return Some(Err(Refusal::StartTimeout {
                id: id.clone(),
                waited: node.cfg.start_timeout,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_clients_are_exempt_from_the_first_request_limit() {
        let cfg = Config::from_args(<crate::config::Args as clap::Parser>::parse_from([
            "farm-node",
        ]))
        .expect("defaults");
        assert_eq!(limited(&cfg, "127.0.0.1"), None);
        assert_eq!(limited(&cfg, "::1"), None);
        assert_eq!(limited(&cfg, "127.0.0.2").as_deref(), Some("127.0.0.2"));
        assert_eq!(limited(&cfg, "203.0.113.7").as_deref(), Some("203.0.113.7"));
    }
}
