//! The one place where errors become HTTP responses: a status, a one-sentence message, and
//! `Retry-After` where waiting helps.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub retry_after: Option<u64>,
    /// For 307 redirects to the owner node.
    pub location: Option<String>,
    /// The owner node's base URL, when another node runs the channel: the HTTP layer turns this
    /// into a redirect (or an X-Accel-Redirect) that keeps the viewer's original path.
    pub owner: Option<String>,
    /// For X-Accel-Redirect to nginx's internal owner location.
    pub accel: Option<String>,
    /// `owner` is not the owner but a node with room (this one is full): the forward carries a hop
    /// count so two full nodes never bounce a viewer between them.
    pub forwarded: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
            location: None,
            owner: None,
            accel: None,
            forwarded: false,
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, m)
    }
    pub fn unavailable(m: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, m)
        }
    }
    /// This node is full; `base` (a live node with room) should start the channel.
    pub fn forwarded(base: String) -> Self {
        Self {
            forwarded: true,
            ..Self::owned_by(base)
        }
    }

    /// Another node runs the channel; `base` is its public URL.
    pub fn owned_by(base: String) -> Self {
        Self {
            owner: Some(base),
            ..Self::new(StatusCode::TEMPORARY_REDIRECT, "served by its owner node")
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, format!("{}\n", self.message)).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        if let Some(s) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let Some(loc) = self.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            h.insert(header::LOCATION, loc);
        }
        if let Some(acc) = self.accel.and_then(|l| HeaderValue::from_str(&l).ok()) {
            h.insert("x-accel-redirect", acc);
        }
        resp
    }
}
