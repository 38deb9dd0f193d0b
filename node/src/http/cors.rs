//! CORS for browser players: every answer allows any origin; `OPTIONS` on a playback path is the
//! preflight.

use axum::http::header::{self, HeaderName};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

fn insert(h: &mut HeaderMap, headers: &[(HeaderName, &'static str)]) {
    for (name, value) in headers {
        h.insert(name, HeaderValue::from_static(value));
    }
}

/// The CORS headers of every playback answer.
pub(super) fn cors(h: &mut HeaderMap) {
    insert(
        h,
        &[
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
            (
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                "Content-Length, Retry-After",
            ),
        ],
    );
}

pub(super) async fn preflight() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    cors(h);
    insert(
        h,
        &[
            (header::ACCESS_CONTROL_ALLOW_METHODS, "GET, HEAD, OPTIONS"),
            (
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                "Range, Origin, Accept",
            ),
            (header::ACCESS_CONTROL_MAX_AGE, "86400"),
        ],
    );
    r
}
