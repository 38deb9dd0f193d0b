//! The node's HTTP surface, built by [`app`]: playback (`/live/<id>/<file>`), the admin API
//! (`/admin`, bearer token), `/healthz` and `/metrics`.
//!
//! The playback path never awaits Redis once a channel runs here: access is recorded in memory and
//! flushed by a background task. Only a first request (start) or a request for a channel this node
//! does not run (routing) talks to Redis.

use crate::error::ApiError;
use crate::metrics::KindLabel;
use crate::node::{Node, Phase};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use farm_proto::validate::{self, HlsFile};
use std::sync::Arc;
use std::time::Instant;

pub fn app(node: Arc<Node>) -> Router {
    Router::new()
        .route("/live/{id}/{file}", get(live_file).options(preflight))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/admin/streams", get(admin_streams))
        .route("/admin/streams/{id}/stop", post(admin_stop))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .with_state(node)
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

fn file_response(kind: HlsFile, body: Vec<u8>) -> Response {
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

/// Parses and checks `<id>/<file>`; the errors are the viewer's 400s.
pub fn parse_live_path(id: &str, file: &str) -> Result<HlsFile, ApiError> {
    validate::channel_id(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    validate::hls_file(file).map_err(|e| ApiError::bad_request(e.to_string()))
}

async fn live_file(
    State(node): State<Arc<Node>>,
    Path((id, file)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let kind = parse_live_path(&id, &file)?;
    let label = KindLabel {
        kind: match kind {
            HlsFile::Playlist => "playlist",
            HlsFile::Segment => "segment",
        }
        .into(),
    };
    node.metrics.requests.get_or_create(&label).inc();
    match kind {
        HlsFile::Playlist => {
            let entry = node.get_or_start(&id)?;
            let body = wait_playable(&node, &entry, &file).await?;
            node.access.record(&id);
            Ok(file_response(kind, body))
        }
        HlsFile::Segment => {
            let Some(entry) = node.local(&id).filter(|e| e.gen() > 0) else {
                return Err(route_elsewhere(&node, &id, &file).await);
            };
            match tokio::fs::read(entry.dir.join(&file)).await {
                Ok(body) => {
                    node.access.record(&id);
                    node.metrics.segment_bytes.inc_by(body.len() as u64);
                    Ok(file_response(kind, body))
                }
                Err(_) => Err(ApiError::not_found(format!(
                    "segment {file} of channel {id} is not available"
                ))),
            }
        }
    }
}

/// A request for a channel this node does not run: send the viewer to the owner, or 404.
async fn route_elsewhere(node: &Node, id: &str, file: &str) -> ApiError {
    match node.store.owner_of(id).await {
        Ok(Some(owner)) if owner != node.cfg.node_id => {
            match node.store.live_node_url(&owner).await {
                Ok(Some(url)) => {
                    ApiError::redirect(format!("{}/live/{id}/{file}", url.trim_end_matches('/')))
                }
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

/// Waits (on phase changes, not by polling) until the playlist can be served, up to `start_timeout`.
async fn wait_playable(
    node: &Node,
    entry: &crate::node::ChannelEntry,
    file: &str,
) -> Result<Vec<u8>, ApiError> {
    let id = &entry.id;
    let path = entry.dir.join(file);
    let mut rx = entry.phase.subscribe();
    let deadline = tokio::time::Instant::now() + node.cfg.start_timeout;
    loop {
        let phase = rx.borrow_and_update().clone();
        match phase {
            Phase::Ready | Phase::Restarting => {
                if let Ok(b) = tokio::fs::read(&path).await {
                    return Ok(b);
                }
            }
            Phase::Failed(reason) => {
                return Err(ApiError::unavailable(
                    reason,
                    node.cfg.failed_hold.as_secs().max(1),
                ))
            }
            Phase::Refused(e) => return Err(e),
            Phase::Gone => {
                return Err(ApiError::unavailable(
                    format!("channel {id} is stopping; retry"),
                    1,
                ))
            }
            Phase::Claiming | Phase::Starting => {}
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Err(_) => {
                return Err(ApiError::unavailable(
                    format!(
                        "channel {id} is starting: no segment yet after {}",
                        farm_proto::duration::format(node.cfg.start_timeout)
                    ),
                    2,
                ))
            }
            Ok(Err(_)) => {
                return Err(ApiError::unavailable(
                    format!("channel {id} stopped; retry"),
                    1,
                ))
            }
            Ok(Ok(())) => {}
        }
    }
}

async fn healthz(State(node): State<Arc<Node>>) -> Response {
    let since = node
        .last_redis_ok
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .elapsed();
    let redis_ok = since < node.cfg.fence_after();
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

fn check_admin(node: &Node, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = node.cfg.admin_token.as_deref() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin API disabled: start the node with --admin-token (FARM_ADMIN_TOKEN)",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
        ))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn admin_streams(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_admin(&node, &headers)?;
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
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_admin(&node, &headers)?;
    validate::channel_id(&id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if node.stop_channel(&id, "ops", None).await? {
        Ok(Json(serde_json::json!({ "channel": id, "stopped": true })).into_response())
    } else {
        Err(ApiError::not_found(format!(
            "channel {id} is not running on this node"
        )))
    }
}
