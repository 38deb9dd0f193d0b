//! The node's HTTP surface, built by [`app`]: playback (`/live/<id>/<file>`), the admin API
//! (`/admin`, bearer token), `/healthz` and `/metrics`.
//!
//! The playback path never awaits Redis once a channel runs here: access is recorded in memory and
//! flushed by a background task. Only a first request (start) or a request for a channel this node
//! does not run (routing) talks to Redis, and those are bounded per client ([`ClientLimits`]): a
//! token bucket per client for requests that would start a channel, a negative cache of ids the
//! catalog does not know, and an exponential delay per address after wrong admin tokens.
//!
//! What a connection may cost (timeouts, header size, connection caps) is the server's business:
//! see [`crate::server`].

use crate::config::Config;
use crate::error::ApiError;
use crate::limits::{AuthFailures, RateLimiter, UnknownIds};
use crate::metrics::KindLabel;
use crate::node::{Node, Phase};
use axum::body::Body;
use axum::extract::{ConnectInfo, FromRef, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use farm_proto::validate::{self, HlsFile};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::warn;

/// What the HTTP layer remembers about clients (see the module docs).
pub struct ClientLimits {
    /// Requests that would start a channel (or look one up nobody runs), per client.
    pub first_requests: RateLimiter,
    /// Channel ids the catalog did not know.
    pub unknown: UnknownIds,
    /// Wrong admin tokens, per address.
    pub admin: AuthFailures,
}

impl ClientLimits {
    pub fn new(cfg: &Config) -> Self {
        Self {
            first_requests: RateLimiter::new(cfg.start_rate, cfg.start_burst),
            unknown: UnknownIds::new(cfg.unknown_channel_ttl),
            admin: AuthFailures::new(),
        }
    }
}

/// The router's state: the node, and what the HTTP layer keeps about clients.
#[derive(Clone)]
pub struct AppState {
    pub node: Arc<Node>,
    pub limits: Arc<ClientLimits>,
}

impl FromRef<AppState> for Arc<Node> {
    fn from_ref(s: &AppState) -> Self {
        s.node.clone()
    }
}

impl FromRef<AppState> for Arc<ClientLimits> {
    fn from_ref(s: &AppState) -> Self {
        s.limits.clone()
    }
}

pub fn app(node: Arc<Node>) -> Router {
    let limits = Arc::new(ClientLimits::new(&node.cfg));
    Router::new()
        .route("/live/{a}/{b}", get(live_plain).options(preflight))
        .route("/live/{a}/{b}/{c}", get(live_signed).options(preflight))
        .route("/auth", get(auth))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/admin/streams", get(admin_streams))
        .route("/admin/streams/{id}/stop", post(admin_stop))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .with_state(AppState { node, limits })
}

/// 429 with `Retry-After` (whole seconds, at least 1).
fn too_many(message: String, wait: Duration) -> ApiError {
    ApiError {
        retry_after: Some(wait.as_secs_f64().ceil().max(1.0) as u64),
        ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, message)
    }
}

fn unknown_channel(id: &str) -> ApiError {
    ApiError::not_found(format!("unknown channel {id:?}: it is not in the catalog"))
}

fn cors(h: &mut HeaderMap) {
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Content-Length, Retry-After"),
    );
}

async fn preflight() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    cors(h);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Range, Origin, Accept"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    r
}

fn file_response(kind: HlsFile, body: bytes::Bytes) -> Response {
    let mut r = Response::new(Body::from(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(kind.content_type()),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(match kind {
            HlsFile::Playlist => "no-cache",
            HlsFile::Segment => "public, max-age=3600, immutable",
        }),
    );
    cors(h);
    r
}

/// What a `Range` header asks of a body of `len` bytes (RFC 9110 §14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAsk {
    /// No range, one the server ignores (another unit, several ranges, `If-Range`): the whole body.
    Full,
    /// Bytes `first..=last`.
    Part(u64, u64),
    /// Unsatisfiable or invalid: 416.
    Unsatisfiable,
}

/// Reads the `Range` header for a body of `len` bytes. Single byte ranges are served (`a-b`, `a-`,
/// `-n`); a range-set of several is answered with the whole body, which RFC 9110 allows; an
/// `If-Range` also gets the whole body (these responses carry no validator it could match); an
/// invalid or unsatisfiable `bytes` range is 416.
pub fn range_ask(headers: &HeaderMap, len: u64) -> RangeAsk {
    let mut all = headers.get_all(header::RANGE).iter();
    let (Some(value), None) = (all.next(), all.next()) else {
        return RangeAsk::Full;
    };
    if headers.contains_key(header::IF_RANGE) {
        return RangeAsk::Full;
    }
    let Ok(value) = value.to_str() else {
        return RangeAsk::Unsatisfiable;
    };
    let Some((unit, set)) = value.split_once('=') else {
        return RangeAsk::Unsatisfiable;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeAsk::Full;
    }
    let digits = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(s.parse().unwrap_or(u64::MAX))
    };
    let mut specs = Vec::new();
    for spec in set.split(',') {
        let spec = spec.trim();
        if spec.is_empty() {
            continue;
        }
        let Some((a, b)) = spec.split_once('-') else {
            return RangeAsk::Unsatisfiable;
        };
        let parsed = match (a.trim().is_empty(), b.trim().is_empty()) {
            (true, false) => digits(b).map(|n| (None, Some(n))),
            (false, true) => digits(a).map(|a| (Some(a), None)),
            (false, false) => match (digits(a), digits(b)) {
                (Some(a), Some(b)) if a <= b => Some((Some(a), Some(b))),
                _ => None,
            },
            (true, true) => None,
        };
        match parsed {
            Some(p) => specs.push(p),
            None => return RangeAsk::Unsatisfiable,
        }
    }
    match specs.as_slice() {
        [] => RangeAsk::Unsatisfiable,
        [(Some(a), b)] if *a < len => RangeAsk::Part(*a, b.unwrap_or(u64::MAX).min(len - 1)),
        [(None, Some(n))] if *n > 0 && len > 0 => RangeAsk::Part(len - (*n).min(len), len - 1),
        [_] => RangeAsk::Unsatisfiable,
        _ => RangeAsk::Full,
    }
}

/// [`file_response`] that honours `Range` (206 with `Content-Range`, or 416), and the body bytes
/// it sends.
fn ranged_response(kind: HlsFile, body: bytes::Bytes, headers: &HeaderMap) -> (Response, u64) {
    let len = body.len() as u64;
    let mut sent = 0;
    let mut r = match range_ask(headers, len) {
        RangeAsk::Full => {
            sent = len;
            file_response(kind, body)
        }
        RangeAsk::Part(first, last) => {
            sent = last - first + 1;
            let mut r = file_response(kind, body.slice(first as usize..=last as usize));
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {first}-{last}/{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            r
        }
        RangeAsk::Unsatisfiable => {
            let mut r = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("range not satisfiable: this file has {len} bytes"),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            r
        }
    };
    r.headers_mut()
        .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    (r, sent)
}

/// A playback request that passed validation and, when signed URLs are on, the token check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Playback {
    pub id: String,
    pub file: String,
    pub kind: HlsFile,
}

/// Checks the path elements after `/live/`: `<id>/<file>`, or `<token>/<id>/<file>` when signed
/// URLs are on. The one place that decides what a playback path may name (requests, `/auth`,
/// and the access socket all come through here).
pub fn authorize(cfg: &Config, parts: &[&str], client: &str) -> Result<Playback, ApiError> {
    let check = |id: &str, file: &str| -> Result<Playback, ApiError> {
        validate::channel_id(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
        let kind = validate::hls_file(file).map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(Playback {
            id: id.to_string(),
            file: file.to_string(),
            kind,
        })
    };
    match (&cfg.token_secret, parts) {
        (None, [id, file]) => check(id, file),
        (None, [_, _, _]) => Err(ApiError::not_found(
            "no such path: signed playback URLs are off",
        )),
        (Some(_), [_, _]) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "playback token required",
        )),
        (Some(secret), [token, id, file]) => {
            let p = check(id, file)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            farm_proto::token::verify(secret.as_bytes(), token, id, now, client)
                .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, e.to_string()))?;
            Ok(p)
        }
        _ => Err(ApiError::not_found("no such path")),
    }
}

/// The viewer's address: the peer, or `X-Real-IP` when the peer is a trusted proxy (nginx).
fn client_addr(cfg: &Config, peer: Option<SocketAddr>, headers: &HeaderMap) -> String {
    // Only an IP: nginx sends `$remote_addr`; anything else is not an address to key limits on.
    let real = headers
        .get("x-real-ip")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<std::net::IpAddr>().ok());
    let trusted = |p: &SocketAddr| cfg.trusted_proxies.iter().any(|n| n.contains(p.ip()));
    match (peer, real) {
        (Some(p), Some(r)) if trusted(&p) => r.to_string(),
        (Some(p), _) => p.ip().to_string(),
        (None, Some(r)) => r.to_string(),
        (None, None) => String::new(),
    }
}

/// The peer address when the server runs with connect info (absent in `oneshot` tests).
pub struct Peer(Option<SocketAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

async fn live_plain(
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

async fn live_signed(
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
        return Err(unknown_channel(id));
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
            Err(too_many(
                format!(
                    "too many requests for channels that are not running from your address \
(at most {} a second, {} at once); retry in a moment",
                    st.node.cfg.start_rate, st.node.cfg.start_burst
                ),
                wait,
            ))
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
                return Err(ApiError::not_found(format!(
                    "no playlist {:?}: a channel's playlist is {}",
                    p.file,
                    crate::playlist::PLAYLIST
                )));
            }
            let body = playlist(st, id, client, uri).await?;
            node.access.record(id);
            Ok(file_response(p.kind, body))
        }
        HlsFile::Segment => {
            let Some(entry) = node.local(id).filter(|e| e.gen() > 0) else {
                let charge = before_lookup(st, id, client, Instant::now())?;
                let e = route_elsewhere(node, id).await;
                if e.status == StatusCode::NOT_FOUND {
                    // Nobody runs it: as costly as a first request.
                    charge.keep();
                }
                return Err(to_owner(node, e, uri));
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
                Err(_) => Err(ApiError::not_found(format!(
                    "segment {} of channel {id} is not available",
                    p.file
                ))),
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
    let handing_over = local
        .as_ref()
        .is_some_and(|e| e.handing_over.load(std::sync::atomic::Ordering::Acquire));
    if let Some(entry) = local.as_ref().filter(|_| !handing_over) {
        if let Some(answer) = local_playlist(node, entry, want).await {
            return answer.map_err(|e| to_owner(node, e, uri));
        }
    }
    let charge = before_lookup(st, id, client, Instant::now())?;
    let view = node
        .remote_view(id)
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot locate channel {id}: {e}"), 2))?;
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
        return Err(to_owner(node, owner_route(node, id, owner).await, uri));
    }
    // Nobody holds the lease: start it here. While that cannot happen yet (the last owner may
    // still stop its FFmpeg, Redis is recovering), the recorded window, if fresh, is the answer.
    let held = view.playlist.clone().filter(|_| {
        view.age_ms
            .is_some_and(|a| a <= node.cfg.hold_max().as_millis() as u64)
    });
    charge.keep();
    let entry = node.get_or_start(id).map_err(|e| to_owner(node, e, uri))?;
    match local_playlist(node, &entry, want).await {
        Some(Err(e)) if e.status == StatusCode::NOT_FOUND => {
            // Refused by the catalog: the next requests for this id need not ask Redis again.
            st.limits.unknown.insert(id, Instant::now());
            Err(e)
        }
        Some(Err(e)) if e.status == StatusCode::SERVICE_UNAVAILABLE && held.is_some() => {
            node.metrics.remote_playlists.inc();
            Ok(held.unwrap_or_default())
        }
        Some(answer) => answer.map_err(|e| to_owner(node, e, uri)),
        None => Err(ApiError::unavailable(
            format!("channel {id} is stopping; retry"),
            1,
        )),
    }
}

/// Where to send a viewer of a channel `owner` runs.
async fn owner_route(node: &Node, id: &str, owner: &str) -> ApiError {
    match node.store.live_node_url(owner).await {
        Ok(Some(url)) => ApiError::owned_by(url),
        Ok(None) => ApiError::unavailable(
            format!("channel {id} is held by node {owner}, which is not answering; retry shortly"),
            2,
        ),
        Err(e) => ApiError::unavailable(format!("cannot locate channel {id}: {e}"), 2),
    }
}

/// Turns "owned by <base URL>" into a redirect to the same path on the owner, or, behind nginx,
/// an `X-Accel-Redirect` to its internal owner location.
fn to_owner(node: &Node, mut e: ApiError, uri: &Uri) -> ApiError {
    let Some(base) = e.owner.take() else { return e };
    let mut path = uri.path().to_string();
    if e.forwarded {
        let hops = hops(uri);
        if hops >= MAX_HOPS {
            return ApiError::unavailable(
                "the farm is full: no node with room took the channel",
                10,
            );
        }
        path = format!("{path}?farm_hop={}", hops + 1);
    } else if let Some(q) = uri.query() {
        path = format!("{path}?{q}");
    }
    match &node.cfg.accel_redirect {
        Some(prefix) => {
            let hostport = base
                .split_once("://")
                .map_or(base.as_str(), |(_, rest)| rest)
                .split('/')
                .next()
                .unwrap_or("");
            e.status = StatusCode::OK;
            e.message = String::new();
            e.accel = Some(format!("{prefix}/{hostport}{path}"));
        }
        None => e.location = Some(format!("{}{path}", base.trim_end_matches('/'))),
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

/// A segment request for a channel this node does not run: the owner, or 404.
async fn route_elsewhere(node: &Node, id: &str) -> ApiError {
    match node.store.owner_of(id).await {
        Ok(Some(owner)) if owner != node.cfg.node_id => {
            match node.store.live_node_url(&owner).await {
                Ok(Some(url)) => ApiError::owned_by(url),
                _ => {
                    ApiError::not_found(format!("channel {id} is not running on a reachable node"))
                }
            }
        }
        Ok(_) => ApiError::not_found(format!(
            "channel {id} is not running; request its playlist first"
        )),
        Err(e) => ApiError::unavailable(format!("cannot locate channel {id}: {e}"), 2),
    }
}

/// nginx `auth_request`: 204 when the viewer's URI (`X-Original-URI`) may be served, recording the
/// access in memory; 403 otherwise. Never starts anything and never waits on Redis.
async fn auth(State(node): State<Arc<Node>>, peer: Peer, headers: HeaderMap) -> Response {
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
            (StatusCode::FORBIDDEN, format!("{}\n", e.message)).into_response()
        }
    }
}

/// [`authorize`] for a whole URI (`/live/...`, query ignored), as nginx reports it.
pub fn authorize_uri(cfg: &Config, uri: &str, client: &str) -> Result<Playback, ApiError> {
    let path = uri.split(['?', '#']).next().unwrap_or("");
    let rest = path
        .strip_prefix("/live/")
        .ok_or_else(|| ApiError::not_found("not a playback path"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    authorize(cfg, &parts, client)
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
                msn = Some(v.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("_HLS_msn={v:?} is not a media sequence number"))
                })?)
            }
            "_HLS_part" => {
                return Err(ApiError::bad_request(
                    "_HLS_part: this server offers no partial segments",
                ))
            }
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
) -> Option<Result<bytes::Bytes, ApiError>> {
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
                            return Some(Err(ApiError::bad_request(format!(
                                "_HLS_msn={m} is beyond the next segments of channel {id} (the last is {last})"
                            ))))
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
                return Some(Err(ApiError::unavailable(
                    reason,
                    node.cfg.failed_hold.as_secs().max(1),
                )))
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
            return Some(Err(ApiError::unavailable(
                format!(
                    "channel {id} is starting: no segment yet after {}",
                    farm_proto::duration::format(node.cfg.start_timeout)
                ),
                2,
            )));
        }
    }
}

async fn healthz(State(node): State<Arc<Node>>) -> Response {
    let since = node
        .last_redis_ok
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .elapsed();
    // Ready once the first heartbeat landed (until then claims are refused) and Redis answers.
    let redis_ok = since < node.cfg.fence_after() && *node.ready.borrow();
    let body = serde_json::json!({
        "node": node.cfg.node_id,
        "incarnation": node.incarnation,
        "redis": if redis_ok { "ok" } else { "unreachable" },
        "redis_last_ok_ms_ago": since.as_millis() as u64,
        "channels": node.entries().len(),
        "shutting_down": node.cancel.is_cancelled(),
    });
    let status = if redis_ok && !node.cancel.is_cancelled() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    let mut r = node.metrics.render().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

/// The bearer token check of `/admin`. Wrong tokens are counted per address: after a few, the
/// address waits (exponentially longer) before its next attempt is even checked (429), and one
/// log line per address per minute says so. The token given is never logged.
fn check_admin(
    st: &AppState,
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let node = &st.node;
    let Some(token) = node.cfg.admin_token.as_deref() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin API disabled: start the node with --admin-token (FARM_ADMIN_TOKEN)",
        ));
    };
    let client = client_addr(&node.cfg, peer, headers);
    let now = Instant::now();
    if let Err(wait) = st.limits.admin.check(&client, now) {
        node.metrics.admin_auth_throttled.inc();
        return Err(too_many(
            "too many wrong admin tokens from your address: wait before trying again".into(),
            wait,
        ));
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        st.limits.admin.succeeded(&client);
        return Ok(());
    }
    node.metrics.admin_auth_failures.inc();
    if let Some(r) = st.limits.admin.failed(&client, now) {
        warn!(
            %client,
            failures = r.since_last_log,
            delay = ?r.delay,
            "admin API: missing or wrong bearer token (one line per address per minute at most)"
        );
    }
    Err(ApiError::new(
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token",
    ))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn admin_streams(
    State(st): State<AppState>,
    peer: Peer,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_admin(&st, peer.0, &headers)?;
    let node = st.node;
    let now = Instant::now();
    let list: Vec<_> = node
        .entries()
        .into_iter()
        .map(|e| {
            let phase = match e.phase() {
                Phase::Claiming => "claiming".to_string(),
                Phase::Starting => "starting".into(),
                Phase::Ready => "running".into(),
                Phase::Restarting => "restarting".into(),
                Phase::Failed(_) => "failed".into(),
                Phase::Refused(_) => "refused".into(),
                Phase::Gone => "stopping".into(),
            };
            serde_json::json!({
                "channel": e.id,
                "gen": e.gen(),
                "state": phase,
                "pid": e.pid.load(std::sync::atomic::Ordering::Acquire),
                "restarts": e.restarts.load(std::sync::atomic::Ordering::Acquire),
                "uptime_s": now.duration_since(e.started).as_secs(),
            })
        })
        .collect();
    Ok(Json(list).into_response())
}

async fn admin_stop(
    State(st): State<AppState>,
    peer: Peer,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_admin(&st, peer.0, &headers)?;
    let node = st.node;
    validate::channel_id(&id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if node.stop_channel(&id, "ops", None).await? {
        Ok(Json(serde_json::json!({ "channel": id, "stopped": true })).into_response())
    } else {
        Err(ApiError::not_found(format!(
            "channel {id} is not running on this node"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(range: &str, len: u64) -> RangeAsk {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(range).expect("value"));
        range_ask(&h, len)
    }

    #[test]
    fn byte_ranges_follow_rfc_9110() {
        use RangeAsk::*;
        assert_eq!(range_ask(&HeaderMap::new(), 10), Full);
        assert_eq!(ask("bytes=0-3", 10), Part(0, 3));
        assert_eq!(ask("bytes=2-", 10), Part(2, 9));
        assert_eq!(ask("bytes=-3", 10), Part(7, 9));
        assert_eq!(
            ask("bytes=-30", 10),
            Part(0, 9),
            "a suffix longer than the body"
        );
        assert_eq!(ask("bytes=5-500", 10), Part(5, 9), "last-pos clamped");
        assert_eq!(ask("BYTES = 1-1", 10), Part(1, 1));
        assert_eq!(ask("bytes=0-99999999999999999999999", 10), Part(0, 9));
        // Unsatisfiable or invalid: 416.
        for bad in [
            "bytes=10-",
            "bytes=10-20",
            "bytes=-0",
            "bytes=5-2",
            "bytes=abc",
            "bytes=",
            "bytes=-",
            "bytes=1-2-3",
            "bytes=+1-2",
            "bytes",
            "bytes=0x1-2",
        ] {
            assert_eq!(ask(bad, 10), Unsatisfiable, "{bad}");
        }
        assert_eq!(
            ask("bytes=0-", 0),
            Unsatisfiable,
            "an empty body has no byte 0"
        );
        // Ignored: other units, several ranges, If-Range.
        assert_eq!(ask("items=0-1", 10), Full);
        assert_eq!(ask("bytes=0-1,4-5", 10), Full);
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_static("bytes=0-1"));
        h.insert(header::IF_RANGE, HeaderValue::from_static("\"x\""));
        assert_eq!(range_ask(&h, 10), Full);
    }

    #[test]
    fn ranged_responses_carry_content_range() {
        let body = bytes::Bytes::from_static(b"0123456789");
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_static("bytes=2-4"));
        let (r, sent) = ranged_response(HlsFile::Segment, body.clone(), &h);
        assert_eq!((r.status(), sent), (StatusCode::PARTIAL_CONTENT, 3));
        assert_eq!(r.headers()[header::CONTENT_RANGE], "bytes 2-4/10");
        assert_eq!(r.headers()[header::ACCEPT_RANGES], "bytes");
        h.insert(header::RANGE, HeaderValue::from_static("bytes=20-"));
        let (r, sent) = ranged_response(HlsFile::Segment, body.clone(), &h);
        assert_eq!((r.status(), sent), (StatusCode::RANGE_NOT_SATISFIABLE, 0));
        assert_eq!(r.headers()[header::CONTENT_RANGE], "bytes */10");
        let (r, sent) = ranged_response(HlsFile::Segment, body, &HeaderMap::new());
        assert_eq!((r.status(), sent), (StatusCode::OK, 10));
    }

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

    #[test]
    fn x_real_ip_counts_only_from_trusted_peers_and_only_as_an_ip() {
        let cfg = Config::from_args(<crate::config::Args as clap::Parser>::parse_from([
            "farm-node",
        ]))
        .expect("defaults");
        let mut h = HeaderMap::new();
        h.insert("x-real-ip", HeaderValue::from_static("203.0.113.7"));
        let from = |ip: &str| Some(SocketAddr::new(ip.parse().expect("ip"), 1));
        assert_eq!(client_addr(&cfg, from("127.0.0.1"), &h), "203.0.113.7");
        assert_eq!(client_addr(&cfg, from("::1"), &h), "203.0.113.7");
        // 127.0.0.2 is not nginx: by default only 127.0.0.1 and ::1 are.
        assert_eq!(client_addr(&cfg, from("127.0.0.2"), &h), "127.0.0.2");
        assert_eq!(client_addr(&cfg, from("10.0.0.1"), &h), "10.0.0.1");
        h.insert("x-real-ip", HeaderValue::from_static("not-an-ip"));
        assert_eq!(client_addr(&cfg, from("127.0.0.1"), &h), "127.0.0.1");
    }
}
