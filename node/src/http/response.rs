//! File answers: MIME type, cache headers (no-cache playlists, immutable segments), CORS, and
//! byte ranges (RFC 9110 §14).

use super::cors::cors;
use crate::error::ApiError;
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use farm_proto::validate::HlsFile;

pub(super) fn file_response(kind: HlsFile, body: bytes::Bytes) -> Response {
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
pub(super) fn ranged_response(
    kind: HlsFile,
    body: bytes::Bytes,
    headers: &HeaderMap,
) -> (Response, u64) {
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
}
