//! The one redaction of upstream credentials: every URL that reaches a log line, an event, a Redis
//! hash, farmctl's output or an HTTP body goes through [`url`] (or [`text`] for free text such as
//! FFmpeg's error lines, which quote URLs), and FFmpeg's own command line gets [`mask`]ed URLs.
//!
//! What counts as a credential in a URL (the rule, also in `proto/README.md`):
//! - the userinfo (`user:password@`), whole;
//! - every query value (`?token=***&user=***`; a bare `?word` becomes `?***`), and the fragment;
//! - provider path credentials, the Xtream Codes convention: `/<kind>/<user>/<pass>/<rest…>` with
//!   `<kind>` one of `live`, `movie`, `series`, `timeshift` (any case) and at least one segment
//!   after the password, and the short form `/<user>/<pass>/<id>` (exactly three segments, the
//!   last starting with a digit): `<user>` and `<pass>` become `***`.
//!
//! Redaction for display is deliberately wide (every query value, also `?mode=normal`): a log line
//! loses detail rather than leaking. What FFmpeg's argv must not carry ([`mask`]) is narrower, so
//! FFmpeg options in a query (`udp://…?pkt_size=1316`) stay readable: the userinfo, the Xtream path
//! credentials, and query values that look like credentials ([`secret_param`]).
//!
//! Invariants: [`url`] and [`text`] never panic and never return a credential of their input; a URL
//! without credentials keeps its scheme, host, port and the shape of its path.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What replaces a credential in shown text.
pub const MASK: &str = "***";

/// Path prefixes of the Xtream Codes convention `/<kind>/<user>/<pass>/...`.
const XTREAM_KINDS: &[&str] = &["live", "movie", "series", "timeshift"];

/// A URL split at its delimiters (a slice of the input each).
struct Parts<'a> {
    /// `scheme://`, empty when the input has none.
    head: &'a str,
    userinfo: Option<&'a str>,
    /// `host[:port]`.
    host: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    fragment: Option<&'a str>,
}

fn split(s: &str) -> Parts<'_> {
    let (head, rest) = match s.find("://") {
        Some(i) => (&s[..i + 3], &s[i + 3..]),
        None => ("", s),
    };
    let (rest, fragment) = match rest.split_once('#') {
        Some((r, f)) => (r, Some(f)),
        None => (rest, None),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = if head.is_empty() {
        ("", rest)
    } else {
        match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        }
    };
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    Parts {
        head,
        userinfo,
        host,
        path,
        query,
        fragment,
    }
}

/// Indexes (into `path.split('/')`, whose item 0 is the empty string before the leading `/`) of
/// the two path segments that are Xtream credentials, if the path follows the convention.
fn xtream_positions(path: &str) -> Option<(usize, usize)> {
    let segs: Vec<&str> = path.split('/').collect();
    if segs.first().is_some_and(|s| !s.is_empty()) {
        return None; // not an absolute path
    }
    let segs = &segs[1..];
    let nonempty = |i: usize| segs.get(i).is_some_and(|s| !s.is_empty());
    if segs.len() >= 4
        && XTREAM_KINDS.iter().any(|k| k.eq_ignore_ascii_case(segs[0]))
        && nonempty(1)
        && nonempty(2)
        && nonempty(3)
    {
        return Some((2, 3));
    }
    if segs.len() == 3
        && nonempty(0)
        && nonempty(1)
        && segs[2].starts_with(|c: char| c.is_ascii_digit())
    {
        return Some((1, 2));
    }
    None
}

/// The path with its Xtream credentials (if any) replaced by `with(i)` (`i` = 0 user, 1 pass).
fn map_path(path: &str, mut with: impl FnMut(usize, &str) -> String) -> String {
    match xtream_positions(path) {
        None => path.to_string(),
        Some((u, p)) => path
            .split('/')
            .enumerate()
            .map(|(i, seg)| {
                if i == u {
                    with(0, seg)
                } else if i == p {
                    with(1, seg)
                } else {
                    seg.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("/"),
    }
}

/// `url` with every credential replaced by `***` (see the module docs for the rule).
///
/// `http://u:p@h:8080/live/u/p/1.ts?token=abc&x=` → `http://***@h:8080/live/***/***/1.ts?token=***&x=`
pub fn url(s: &str) -> String {
    let p = split(s);
    let mut out = String::with_capacity(s.len());
    out.push_str(p.head);
    if p.userinfo.is_some() {
        out.push_str(MASK);
        out.push('@');
    }
    out.push_str(p.host);
    out.push_str(&map_path(p.path, |_, _| MASK.to_string()));
    if let Some(q) = p.query {
        out.push('?');
        let parts: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, "")) => format!("{k}="),
                Some((k, _)) => format!("{k}={MASK}"),
                None if kv.is_empty() => String::new(),
                None => MASK.to_string(),
            })
            .collect();
        out.push_str(&parts.join("&"));
    }
    if let Some(f) = p.fragment {
        out.push('#');
        if !f.is_empty() {
            out.push_str(MASK);
        }
    }
    out
}

/// A URL that shows itself redacted: `info!(url = %Redacted(&spec.url))`.
#[derive(Clone, Copy)]
pub struct Redacted<'a>(pub &'a str);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&url(self.0))
    }
}

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", url(self.0))
    }
}

fn scheme_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')
}

fn ends_url(c: char) -> bool {
    c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '<' | '>' | '`')
}

/// Free text (an FFmpeg error line, a reason) with every URL in it redacted by [`url`]. A URL is
/// `scheme://` up to the next whitespace, quote or angle bracket; trailing punctuation (`.,;:!?)]}`)
/// is kept outside it, so `http://h/x.ts: 403` stays readable.
pub fn text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        let before = &rest[..i];
        let start = before
            .char_indices()
            .rev()
            .find(|(_, c)| !scheme_char(*c))
            .map_or(0, |(j, c)| j + c.len_utf8());
        let after = &rest[i + 3..];
        let end = i + 3 + after.find(ends_url).unwrap_or(after.len());
        let token = &rest[start..end];
        let trimmed = token.trim_end_matches(|c| ".,;:!?)]}".contains(c));
        out.push_str(&rest[..start]);
        out.push_str(&url(trimmed));
        out.push_str(&token[trimmed.len()..]);
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Whether a query parameter is a credential FFmpeg's argv must not carry: its name says so
/// (contains `token`, `auth`, `key`, `pass`, `pwd`, `secret`, `sig`, `user`, `login`, `session`,
/// `hash` or `cred`, or is one of `u`, `p`, `k`, `t`, `h`, `st`, `sid`, `pw`), or its value is 12
/// characters or longer (an opaque token under any name).
pub fn secret_param(key: &str, value: &str) -> bool {
    if value.is_empty() {
        return false;
    }
    let k: String = key
        .chars()
        .filter(|c| !matches!(c, '-' | '_' | '.'))
        .collect::<String>()
        .to_ascii_lowercase();
    const PARTS: &[&str] = &[
        "token", "auth", "key", "pass", "pwd", "secret", "sig", "user", "login", "session", "hash",
        "cred",
    ];
    const WHOLE: &[&str] = &["u", "p", "k", "t", "h", "st", "sid", "pw"];
    PARTS.iter().any(|p| k.contains(p)) || WHOLE.contains(&k.as_str()) || value.len() >= 12
}

/// Whether `url` carries a credential FFmpeg's argv must not show (the userinfo, Xtream path
/// credentials, or a [`secret_param`] in its query).
pub fn has_credentials(s: &str) -> bool {
    let p = split(s);
    p.userinfo.is_some()
        || xtream_positions(p.path).is_some()
        || p.query.is_some_and(|q| {
            q.split('&').any(|kv| match kv.split_once('=') {
                Some((k, v)) => secret_param(k, v),
                None => !kv.is_empty() && kv.len() >= 12,
            })
        })
}

/// A secret string: serialised as itself (it has to cross the node → guard pipe), but `Debug`
/// shows `***`, so no `{:?}` of a message or config prints it.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

/// What the egress gateway needs to turn one masked URL's requests back into the real ones: for
/// requests to `host:port`, each placeholder in the request target is replaced by its real text,
/// and `Authorization: Basic` is added from `basic` (the percent-decoded `user:password`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OriginSecrets {
    /// Lowercase host (IPv6 without brackets) and port, as the gateway parses a request target.
    pub host: String,
    pub port: u16,
    /// Placeholder → the real text it stands for (as written in the catalog URL).
    pub swaps: Vec<(String, Secret)>,
    /// `user:password`, percent-decoded, for `Authorization: Basic`.
    pub basic: Option<Secret>,
}

impl OriginSecrets {
    /// The request target with every placeholder replaced by its real text.
    pub fn unmask(&self, target: &str) -> String {
        let mut t = target.to_string();
        for (ph, real) in &self.swaps {
            if t.contains(ph.as_str()) {
                t = t.replace(ph.as_str(), &real.0);
            }
        }
        t
    }
}

/// A URL as FFmpeg may see it, and what the gateway needs to undo that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masked {
    /// The URL for FFmpeg's argv: no userinfo, placeholders instead of credentials.
    pub url: String,
    /// `None` when `url` had nothing to mask (then it is the input unchanged).
    pub secrets: Option<OriginSecrets>,
}

/// Masks an `http` URL for FFmpeg's argv: the userinfo is removed (the gateway sends it as
/// `Authorization: Basic`), and each Xtream path credential and each [`secret_param`] query value
/// is replaced by an opaque placeholder `sf<nonce>z<n>` (letters and digits only, so FFmpeg keeps it
/// as written and relative URIs resolve against it). `nonce` must be unique per channel run and
/// unguessable enough not to occur in a real URL (e.g. 16 random hex digits).
///
/// A URL without credentials, or one without a host, comes back unchanged with no secrets.
pub fn mask(s: &str, nonce: &str, default_port: u16) -> Masked {
    let unchanged = || Masked {
        url: s.to_string(),
        secrets: None,
    };
    if !has_credentials(s) {
        return unchanged();
    }
    let p = split(s);
    let Some((host, port)) = crate::redis_url::split_host_port(p.host, default_port) else {
        return unchanged();
    };
    let mut swaps: Vec<(String, Secret)> = Vec::new();
    let mut placeholder = |real: &str| {
        let ph = format!("sf{nonce}z{}", swaps.len());
        swaps.push((ph.clone(), Secret(real.to_string())));
        ph
    };
    let mut out = String::with_capacity(s.len());
    out.push_str(p.head);
    out.push_str(p.host);
    out.push_str(&map_path(p.path, |_, seg| placeholder(seg)));
    if let Some(q) = p.query {
        out.push('?');
        let parts: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) if secret_param(k, v) => format!("{k}={}", placeholder(v)),
                None if kv.len() >= 12 => placeholder(kv),
                _ => kv.to_string(),
            })
            .collect();
        out.push_str(&parts.join("&"));
    }
    // The fragment is never sent: FFmpeg does not need it.
    let basic = p.userinfo.map(|u| Secret(percent_decode(u)));
    Masked {
        url: out,
        secrets: Some(OriginSecrets {
            host,
            port,
            swaps,
            basic,
        }),
    }
}

/// `%XX` decoded (invalid escapes kept as written; the result is UTF-8-lossy).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(v) = hex {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_userinfo_query_values_and_xtream_credentials() {
        let cases = [
            ("http://h/x.ts", "http://h/x.ts"),
            (
                "http://u:p@h:8080/live/user/pass/1.ts?token=abc&x=&flag",
                "http://***@h:8080/live/***/***/1.ts?token=***&x=&***",
            ),
            ("http://user@h/", "http://***@h/"),
            ("http://a:b@c@h/x", "http://***@h/x"),
            ("http://h/user/pass/1234", "http://h/***/***/1234"),
            ("http://h/user/pass/1234.m3u8", "http://h/***/***/1234.m3u8"),
            ("http://h/MOVIE/u/p/9.mkv", "http://h/MOVIE/***/***/9.mkv"),
            (
                "http://h/timeshift/u/p/120/2024-01-01:10-00/5.ts",
                "http://h/timeshift/***/***/120/2024-01-01:10-00/5.ts",
            ),
            // not the convention: shape kept
            (
                "http://h/hls/stream/index.m3u8",
                "http://h/hls/stream/index.m3u8",
            ),
            ("http://h/live/x.ts", "http://h/live/x.ts"),
            ("http://h/live/u/p/", "http://h/live/u/p/"),
            ("http://h/x#frag", "http://h/x#***"),
            (
                "udp://239.0.0.1:1234?pkt_size=1316",
                "udp://239.0.0.1:1234?pkt_size=***",
            ),
            ("http://h?a=1", "http://h?a=***"),
            ("", ""),
            ("no url at all", "no url at all"),
        ];
        for (input, want) in cases {
            assert_eq!(url(input), want, "{input}");
            assert_eq!(Redacted(input).to_string(), want);
        }
    }

    #[test]
    fn urls_inside_free_text_are_redacted() {
        let t = "[http @ 0x55] HTTP error 403 Forbidden\nhttp://u:pw@h/live/usr/pwd/1.ts?token=tk: Server returned 403 Forbidden (access denied)";
        let r = text(t);
        for secret in ["pw@", "usr", "pwd", "tk"] {
            assert!(!r.contains(secret), "{secret} in {r}");
        }
        assert!(
            r.ends_with("http://***@h/live/***/***/1.ts?token=***: Server returned 403 Forbidden (access denied)"),
            "{r}"
        );
        assert_eq!(
            text("Opening 'https://h/a.m3u8?sig=s' for reading"),
            "Opening 'https://h/a.m3u8?sig=***' for reading"
        );
        assert_eq!(text("see <rtmp://k:s@h/app>."), "see <rtmp://***@h/app>.");
        assert_eq!(text("ünïcode://x?a=b ok"), "ünïcode://x?a=*** ok");
        assert_eq!(text("no urls"), "no urls");
        assert_eq!(text("://?a=b"), "://?a=***");
    }

    #[test]
    fn masks_keep_options_and_hide_credentials() {
        let m = mask(
            "http://us%40r:p%3Ass@Up.Example/live/usr/pwd/7.ts?token=TOK&mode=normal",
            "n0",
            80,
        );
        assert_eq!(
            m.url,
            "http://Up.Example/live/sfn0z0/sfn0z1/7.ts?token=sfn0z2&mode=normal"
        );
        let s = m.secrets.expect("secrets");
        assert_eq!((s.host.as_str(), s.port), ("up.example", 80));
        assert_eq!(s.basic, Some(Secret("us@r:p:ss".into())));
        assert_eq!(
            s.unmask("/live/sfn0z0/sfn0z1/7_1.ts?token=sfn0z2"),
            "/live/usr/pwd/7_1.ts?token=TOK"
        );
        assert_eq!(format!("{s:?}").matches("usr").count(), 0, "{s:?}");

        // nothing to mask: unchanged
        let plain = "http://127.0.0.1:9/c1.ts?mode=normal&seg_ms=500";
        assert_eq!(mask(plain, "n", 80).url, plain);
        assert!(mask(plain, "n", 80).secrets.is_none());
        assert!(!has_credentials(plain));
        // an opaque value under any name
        let m = mask("http://h:81/a.m3u8?e=1&h2=0123456789abcdef", "q", 80);
        assert_eq!(m.url, "http://h:81/a.m3u8?e=1&h2=sfqz0");
        assert_eq!(m.secrets.expect("secrets").port, 81);
    }

    #[test]
    fn credential_detection() {
        for yes in [
            "https://u:p@h/x",
            "https://h/x.m3u8?token=a,b",
            "srt://h:9000?passphrase=xyz",
            "http://h/live/a/b/1.ts",
            "http://h/x?apiKey=1",
            "rtmp://h/app?st=1",
        ] {
            assert!(has_credentials(yes), "{yes}");
        }
        for no in [
            "https://h/x.m3u8",
            "udp://239.0.0.1:1234?pkt_size=1316&fifo_size=1000000",
            "http://h/x.ts?mode=normal&seg_ms=500&bytes=20000",
            "http://h/x?token=",
        ] {
            assert!(!has_credentials(no), "{no}");
        }
    }

    #[test]
    fn never_panics_and_never_returns_a_userinfo() {
        let pieces = [
            "http://", "u:p@", "@", "/", "live/", "a/", "1", "?", "&", "=", "#", ":", "%", "%4",
            "é", "://", " ", "'", "x",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..5000 {
            let mut s = String::new();
            for _ in 0..(seed % 12) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                s.push_str(pieces[(seed % pieces.len() as u64) as usize]);
            }
            let r = url(&s);
            let t = text(&s);
            let _ = mask(&s, "n", 80);
            let _ = percent_decode(&s);
            if s.contains("://u:p@") {
                assert!(!r.contains("u:p@"), "{s} -> {r}");
                // in free text a URL ends at whitespace or a quote
                if !s.contains([' ', '\'']) {
                    assert!(!t.contains("u:p@"), "{s} -> {t}");
                }
            }
        }
    }
}
