//! The request FFmpeg sends a gateway: a proxy request head (absolute-form `GET`, or `CONNECT` for
//! TLS), parsed into its destination and, for plain HTTP, rewritten into the origin-form head the
//! upstream gets, with `Connection: close` and the credentials FFmpeg's masked URL left out.
//!
//! Invariant: credentials go back only into requests for the `host:port` they belong to (see
//! [`farm_proto::redact::mask`]); a redirect to another origin, or another port, never gets them.

use farm_proto::redact::OriginSecrets;
use farm_proto::redis_url::split_host_port;

/// A parsed request head: the destination and the head to send on (for plain HTTP).
pub(super) struct Head {
    pub connect: bool,
    pub host: String,
    pub port: u16,
    /// For `GET`-style requests: the request rewritten to origin form with `Connection: close`.
    pub forward: Vec<u8>,
}

impl Head {
    /// `host:port`, for messages.
    pub fn dest(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Parses a request head at the start of `buf`: `Ok(None)` while it is incomplete, else the head
/// and how many bytes of `buf` it took. The error is the sentence for FFmpeg's 400.
pub(super) fn parse_head(
    buf: &[u8],
    secrets: &[OriginSecrets],
) -> Result<Option<(Head, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("bad request head: {e}")),
    };
    let method = req.method.unwrap_or_default();
    let target = req.path.unwrap_or_default();
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) =
            split_host_port(target, 0).ok_or_else(|| format!("bad CONNECT target {target:?}"))?;
        let head = Head {
            connect: true,
            host,
            port,
            forward: Vec::new(),
        };
        return Ok(Some((head, used)));
    }
    let (host, port, path) = absolute_target(target)?;
    // FFmpeg read a masked URL: the credentials go back in here, for that origin only.
    let origin = secrets.iter().find(|s| s.host == host && s.port == port);
    let forward = origin_form(method, &path, req.headers, origin);
    let head = Head {
        connect: false,
        host,
        port,
        forward,
    };
    Ok(Some((head, used)))
}

/// The host, port and path (with its query; `/` when none) of an absolute-form target
/// `http://host[:port]/path`, the only form a proxy request may take.
fn absolute_target(target: &str) -> Result<(String, u16, String), String> {
    let rest = target
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("http://"))
        .map(|_| &target[7..])
        .ok_or_else(|| format!("not a proxy request: {target:?}"))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let hostport = authority.rsplit('@').next().unwrap_or_default();
    let (host, port) =
        split_host_port(hostport, 80).ok_or_else(|| format!("bad URL {target:?}"))?;
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    Ok((host, port, path))
}

/// The head the upstream gets: origin form, hop-by-hop and proxy headers dropped, `Connection:
/// close`; with `origin`'s secrets, the masked path unmasked and its Basic credentials added
/// (unless FFmpeg sends its own `Authorization`, after a 401).
fn origin_form(
    method: &str,
    path: &str,
    headers: &[httparse::Header<'_>],
    origin: Option<&OriginSecrets>,
) -> Vec<u8> {
    let path = match origin {
        Some(o) => o.unmask(path),
        None => path.to_string(),
    };
    let mut out = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
    let has_auth = headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("authorization"));
    if let Some(basic) = origin.and_then(|o| o.basic.as_ref()).filter(|_| !has_auth) {
        out.extend_from_slice(b"Authorization: Basic ");
        out.extend_from_slice(base64(basic.0.as_bytes()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for h in headers {
        let name = h.name.to_ascii_lowercase();
        if matches!(
            name.as_str(),
            "connection" | "proxy-connection" | "proxy-authorization" | "keep-alive"
        ) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

/// Standard base64 with padding (RFC 4648), for `Authorization: Basic`.
fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_heads_are_rewritten_to_origin_form_with_connection_close() {
        let raw: &[u8] = b"GET http://Up.Example:8080/live/a.m3u8?t=1 HTTP/1.1\r\nHost: up.example:8080\r\nConnection: keep-alive\r\nProxy-Authorization: x\r\nUser-Agent: Lavf\r\n\r\nrest";
        let (h, used) = parse_head(raw, &[]).expect("parse").expect("complete");
        assert!(!h.connect);
        assert_eq!((h.host.as_str(), h.port), ("up.example", 8080));
        let fwd = String::from_utf8(h.forward).expect("utf8");
        assert!(
            fwd.starts_with("GET /live/a.m3u8?t=1 HTTP/1.1\r\n"),
            "{fwd}"
        );
        assert!(fwd.contains("User-Agent: Lavf\r\n") && fwd.contains("Host: up.example:8080"));
        assert!(!fwd.to_ascii_lowercase().contains("keep-alive"));
        assert!(!fwd.contains("Proxy-Authorization"));
        assert!(fwd.ends_with("Connection: close\r\n\r\n"));
        assert_eq!(&raw[used..], b"rest");

        let (c, _) = parse_head(b"CONNECT [::1]:443 HTTP/1.1\r\nHost: x\r\n\r\n", &[])
            .expect("parse")
            .expect("complete");
        assert!(c.connect);
        assert_eq!((c.host.as_str(), c.port), ("::1", 443));

        assert!(parse_head(b"GET /origin-form HTTP/1.1\r\n\r\n", &[]).is_err());
        assert!(parse_head(b"GET ftp://x/ HTTP/1.1\r\n\r\n", &[]).is_err());
        assert!(parse_head(b"CONNECT nohost HTTP/1.1\r\n\r\n", &[]).is_err());
        assert!(parse_head(b"GET http://x/ HTTP/1.1\r\nHost", &[])
            .expect("partial")
            .is_none());
    }

    #[test]
    fn masked_urls_get_their_credentials_back_for_their_origin_only() {
        let m = farm_proto::redact::mask(
            "http://us%3Ar:p%40ss@up.example:8080/live/usr/pwd/7.ts?token=TOK&mode=x",
            "n0",
            80,
        );
        let secrets = vec![m.secrets.expect("secrets")];
        let head = |target: &str, extra: &str| {
            let raw = format!("GET {target} HTTP/1.1\r\nHost: h\r\n{extra}\r\n");
            let (h, _) = parse_head(raw.as_bytes(), &secrets)
                .expect("parse")
                .expect("complete");
            String::from_utf8(h.forward).expect("utf8")
        };
        // FFmpeg sends the masked URL in absolute form (no userinfo)
        let fwd = head(&m.url.replacen("up.example", "Up.Example", 1), "");
        assert!(
            fwd.starts_with("GET /live/usr/pwd/7.ts?token=TOK&mode=x HTTP/1.1\r\n"),
            "{fwd}"
        );
        // base64("us:r:p@ss")
        assert!(
            fwd.contains("Authorization: Basic dXM6cjpwQHNz\r\n"),
            "{fwd}"
        );
        // a relative segment resolved against the masked playlist URL
        let fwd = head("http://up.example:8080/live/sfn0z0/sfn0z1/7_1.ts", "");
        assert!(
            fwd.starts_with("GET /live/usr/pwd/7_1.ts HTTP/1.1"),
            "{fwd}"
        );
        // FFmpeg's own Authorization (after a 401) is not doubled
        let fwd = head(&m.url, "Authorization: Digest x\r\n");
        assert_eq!(fwd.matches("Authorization").count(), 1, "{fwd}");
        // another origin (a redirect, another port) never gets them
        for other in [
            "http://evil.example:8080/live/sfn0z0/sfn0z1/7.ts",
            "http://up.example:8081/live/sfn0z0/sfn0z1/7.ts",
        ] {
            let fwd = head(other, "");
            assert!(
                !fwd.contains("usr") && !fwd.contains("Authorization"),
                "{fwd}"
            );
        }
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
    }
}
