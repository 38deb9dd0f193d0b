//! The node's HTTP surface, built by [`app`] (the one routing function): playback
//! (`/live/<id>/<file>`, nginx's `/auth` hook), the admin API (`/admin`, bearer token), `/healthz`
//! and `/metrics`.
//!
//! | module | does |
//! |---|---|
//! | `playback` | serving playlists and segments: this node's, the owner's recorded one, or a start |
//! | `refusal` | the node's refusals as HTTP answers (status, sentence, redirect to the owner) |
//! | `response` | file answers: MIME type, cache headers, byte ranges |
//! | `cors` | CORS headers and the browser's preflight |
//! | `ops` | `/healthz`, `/metrics` and the admin API with its token check |
//!
//! The playback path never awaits Redis once a channel runs here: access is recorded in memory and
//! flushed by a background task. Only a first request (start) or a request for a channel this node
//! does not run (routing) talks to Redis, and those are bounded per client ([`ClientLimits`]): a
//! token bucket per client for requests that would start a channel, a negative cache of ids the
//! catalog does not know, and an exponential delay per address after wrong admin tokens.
//!
//! What a connection may cost (timeouts, header size, connection caps) is the server's business:
//! see [`crate::server`].

mod cors;
mod ops;
mod playback;
mod refusal;
mod response;

use crate::config::Config;
use crate::error::ApiError;
use crate::limits::{AuthFailures, RateLimiter, UnknownIds};
use crate::node::{Node, Refusal};
use axum::extract::{ConnectInfo, FromRef};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;

pub use crate::node::{authorize, authorize_uri, Playback};
pub use response::{range_ask, RangeAsk};

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

/// The node's router: every endpoint, with a fresh [`ClientLimits`].
pub fn app(node: Arc<Node>) -> Router {
    let limits = Arc::new(ClientLimits::new(&node.cfg));
    router(AppState { node, limits })
}

/// The routing function: which handler answers which path.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/live/{a}/{b}",
            get(playback::live_plain).options(cors::preflight),
        )
        .route(
            "/live/{a}/{b}/{c}",
            get(playback::live_signed).options(cors::preflight),
        )
        .route("/auth", get(playback::auth))
        .route("/healthz", get(ops::healthz))
        .route("/metrics", get(ops::metrics))
        .route("/admin/streams", get(ops::admin_streams))
        .route("/admin/streams/{id}/stop", post(ops::admin_stop))
        .fallback(|| async { ApiError::from(Refusal::NoSuchPath("no such endpoint")) })
        .with_state(state)
}

/// The viewer's address: the peer, or `X-Real-IP` when the peer is a trusted proxy (nginx).
pub(crate) fn client_addr(cfg: &Config, peer: Option<SocketAddr>, headers: &HeaderMap) -> String {
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
pub struct Peer(pub Option<SocketAddr>);

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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

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
