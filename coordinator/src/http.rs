//! The coordinator's HTTP surface, built by [`app`]: `/metrics` (Prometheus text) and `/healthz`.

use crate::shared::Shared;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::sync::Arc;
use std::time::Instant;

pub fn app(sh: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "no such endpoint\n") })
        .with_state(sh)
}

async fn metrics(State(sh): State<Arc<Shared>>) -> Response {
    let mut r = sh.metrics.render().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

/// 200 while this coordinator's Redis view is fresh (a round trip within `node_ttl`), else 503.
async fn healthz(State(sh): State<Arc<Shared>>) -> Response {
    let last_ok = sh.store.last_ok().map(|t| t.elapsed());
    let redis_ok = last_ok.is_some_and(|d| d < sh.cfg.node_ttl);
    let lead = sh.leadership();
    let body = serde_json::json!({
        "coordinator": sh.cfg.id,
        "leader": lead.leading(Instant::now()).is_some(),
        "epoch": lead.epoch,
        "leader_seen": lead.held.clone().or(lead.other.clone()),
        "redis": if redis_ok { "ok" } else { "unreachable" },
        "redis_last_ok_ms_ago": last_ok.map(|d| d.as_millis() as u64),
    });
    let status = if redis_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    /// GET `path` from `app`: the status and the body.
    async fn fetch(app: Router, path: &str) -> (StatusCode, Vec<u8>) {
        let r = app
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("answer");
        let status = r.status();
        let body = r.into_body().collect().await.expect("body").to_bytes();
        (status, body.to_vec())
    }

    #[tokio::test]
    async fn metrics_and_health_answer_without_redis() {
        let sh = Arc::new(Shared::new(Config::new("redis://127.0.0.1:1/", "c1")).expect("shared"));
        let app = app(sh);
        let (status, body) = fetch(app.clone(), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(String::from_utf8_lossy(&body).contains("farm_coordinator_is_leader 0"));
        let (status, body) = fetch(app, "/healthz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["coordinator"], "c1");
        assert_eq!(v["leader"], false);
    }
}
