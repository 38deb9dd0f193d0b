//! Operations endpoints: `/healthz`, `/metrics`, and the admin API behind its bearer token.

use super::{client_addr, AppState, Peer};
use crate::error::ApiError;
use crate::node::{Node, Phase, Refusal};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use farm_proto::validate;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tracing::warn;

pub(super) async fn healthz(State(node): State<Arc<Node>>) -> Response {
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

pub(super) async fn metrics(State(node): State<Arc<Node>>) -> Response {
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
        return Err(Refusal::AdminDisabled.into());
    };
    let client = client_addr(&node.cfg, peer, headers);
    let now = Instant::now();
    if let Err(wait) = st.limits.admin.check(&client, now) {
        node.metrics.admin_auth_throttled.inc();
        return Err(Refusal::AdminThrottled { wait }.into());
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
    Err(Refusal::AdminUnauthorized.into())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) async fn admin_streams(
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
                "pid": e.state().pid,
                "restarts": e.state().restarts,
                "uptime_s": now.duration_since(e.started).as_secs(),
            })
        })
        .collect();
    Ok(Json(list).into_response())
}

pub(super) async fn admin_stop(
    State(st): State<AppState>,
    peer: Peer,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_admin(&st, peer.0, &headers)?;
    let node = st.node;
    validate::channel_id(&id).map_err(|e| Refusal::BadPath(e.to_string()))?;
    if node.stop_channel(&id, "ops", None).await? {
        Ok(Json(serde_json::json!({ "channel": id, "stopped": true })).into_response())
    } else {
        Err(Refusal::NotHere { id }.into())
    }
}
