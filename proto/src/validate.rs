//! Input validation shared by the node, farmctl and the importer. Everything a viewer or an operator
//! sends passes through here before it touches Redis, the disk or FFmpeg.

use thiserror::Error;

/// Why an input was refused. The message is meant for the person who sent it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum InvalidInput {
    #[error("invalid channel id {0:?}: use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'")]
    ChannelId(String),
    #[error("invalid node id {0:?}: use 1 to 64 characters from A-Z, a-z, 0-9, '_', '-' and '.'")]
    NodeId(String),
    #[error("invalid file name {0:?}: expected index.m3u8 or a segment like seg_12.ts")]
    SegmentName(String),
    /// `url` is shown redacted ([`crate::redact::url`]): the message may reach logs and viewers.
    #[error("invalid upstream URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("invalid {field}: {why}")]
    Field { field: &'static str, why: String },
}

/// Longest catalog `name` and `group`, in bytes.
pub const MAX_TEXT_LEN: usize = 256;
/// Most backup URLs one channel may have.
pub const MAX_BACKUPS: usize = 8;
/// Longest upstream URL, in bytes.
pub const MAX_URL_LEN: usize = 2048;

/// A free-text catalog field (`name`, `group`): at most [`MAX_TEXT_LEN`] bytes, no control
/// characters (they would garble a terminal).
pub fn text_field(field: &'static str, value: &str) -> Result<(), InvalidInput> {
    if value.len() > MAX_TEXT_LEN {
        return Err(InvalidInput::Field {
            field,
            why: format!(
                "it is {} bytes long, at most {MAX_TEXT_LEN} are allowed",
                value.len()
            ),
        });
    }
    if value.chars().any(char::is_control) {
        return Err(InvalidInput::Field {
            field,
            why: format!("{:?} contains control characters", truncate(value)),
        });
    }
    Ok(())
}

/// A name that ends up in key names and config lookups (`provider`, `profile`): the channel-id
/// alphabet, 1 to 64 bytes.
pub fn label(field: &'static str, value: &str) -> Result<(), InvalidInput> {
    if id_like(value, 64, &[]) {
        Ok(())
    } else {
        Err(InvalidInput::Field {
            field,
            why: format!(
                "{:?}: use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'",
                truncate(value)
            ),
        })
    }
}

fn id_like(s: &str, max: usize, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || extra.contains(&b))
}

/// Channel ids: `^[A-Za-z0-9_-]{1,64}$`.
pub fn channel_id(id: &str) -> Result<(), InvalidInput> {
    if id_like(id, 64, &[]) {
        Ok(())
    } else {
        Err(InvalidInput::ChannelId(truncate(id)))
    }
}

/// Node ids: `^[A-Za-z0-9_.-]{1,64}$` (never `:`, which separates node and gen in an owner value).
pub fn node_id(id: &str) -> Result<(), InvalidInput> {
    if id_like(id, 64, b".") && id != "." && id != ".." {
        Ok(())
    } else {
        Err(InvalidInput::NodeId(truncate(id)))
    }
}

/// What kind of file a valid HLS file name names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HlsFile {
    Playlist,
    Segment,
}

impl HlsFile {
    pub fn content_type(self) -> &'static str {
        match self {
            HlsFile::Playlist => "application/vnd.apple.mpegurl",
            HlsFile::Segment => "video/mp2t",
        }
    }
}

/// File names a viewer may ask for: `^[A-Za-z0-9_-]{1,64}\.(m3u8|ts)$`. No dots besides the
/// extension, no separators: nothing outside the channel's own folder can be named.
pub fn hls_file(name: &str) -> Result<HlsFile, InvalidInput> {
    let err = || InvalidInput::SegmentName(truncate(name));
    let (stem, ext) = name.rsplit_once('.').ok_or_else(err)?;
    if !id_like(stem, 64, &[]) {
        return Err(err());
    }
    match ext {
        "m3u8" => Ok(HlsFile::Playlist),
        "ts" => Ok(HlsFile::Segment),
        _ => Err(err()),
    }
}

/// The default schemes an upstream URL may use.
pub const DEFAULT_ALLOWED_SCHEMES: &[&str] =
    &["http", "https", "rtmp", "rtmps", "udp", "rtp", "srt"];

/// Checks an upstream URL: a scheme from `allowed`, a host, no leading `-` (it would be an FFmpeg
/// option), no whitespace or control characters (CR/LF would smuggle headers), at most 2048 bytes.
pub fn upstream_url(url: &str, allowed: &[impl AsRef<str>]) -> Result<(), InvalidInput> {
    let err = |why: &str| InvalidInput::Url {
        url: truncate(&crate::redact::url(url)),
        why: why.to_string(),
    };
    if url.is_empty() {
        return Err(err("it is empty"));
    }
    if url.len() > MAX_URL_LEN {
        return Err(err("it is longer than 2048 bytes"));
    }
    if url.starts_with('-') {
        return Err(err("it starts with '-'"));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(err("it contains whitespace or control characters"));
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(err("it has no scheme:// part"));
    };
    let scheme_ok = !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.');
    let lower = scheme.to_ascii_lowercase();
    if !scheme_ok || !allowed.iter().any(|a| a.as_ref() == lower) {
        let list: Vec<&str> = allowed.iter().map(|a| a.as_ref()).collect();
        return Err(err(&format!(
            "scheme {scheme:?} is not allowed (allowed: {})",
            list.join(", ")
        )));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return Err(err("it has no host"));
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    if s.len() <= 80 {
        return s.to_string();
    }
    let mut end = 80;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_ids() {
        for ok in ["a", "bbc_one-HD", &"x".repeat(64)] {
            assert!(channel_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "..",
            "a/b",
            "a.b",
            "a b",
            "ä",
            "a\0",
            &"x".repeat(65),
            "%2e%2e",
        ] {
            assert!(channel_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hls_files() {
        assert_eq!(hls_file("index.m3u8"), Ok(HlsFile::Playlist));
        assert_eq!(hls_file("seg_12.ts"), Ok(HlsFile::Segment));
        for bad in [
            "..", "../x.ts", "a.b.ts", ".ts", "x.tmp", "x.ts.tmp", "x.mp4", "x", "x\0.ts",
            "x%2f.ts",
        ] {
            assert!(hls_file(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn upstream_urls() {
        let allowed = DEFAULT_ALLOWED_SCHEMES;
        for ok in [
            "http://provider.example/live/1.ts",
            "https://u:p@h:8080/x.m3u8?token=1",
            "udp://239.0.0.1:1234",
            "rtmp://127.0.0.1/live/key",
        ] {
            assert!(upstream_url(ok, allowed).is_ok(), "{ok}");
        }
        for bad in [
            "file:///etc/passwd",
            "file://localhost/etc/passwd",
            "concat:http://a|http://b",
            "subfile,,start,0,end,10,,:http://x",
            "-i http://x",
            "http://x/\r\nHost: y",
            "http://",
            "http:///path",
            "gopher://x",
            "",
        ] {
            assert!(upstream_url(bad, allowed).is_err(), "{bad:?}");
        }
        // the refusal quotes the URL without its credentials
        let e = upstream_url("gopher://u:pw@h/live/usr/pwd/1?token=tk", allowed)
            .expect_err("scheme")
            .to_string();
        for secret in ["pw@", "usr", "pwd", "tk"] {
            assert!(!e.contains(secret), "{e}");
        }
    }

    #[test]
    fn text_fields_and_labels() {
        assert!(text_field("name", "BBC One").is_ok());
        assert!(text_field("name", &"x".repeat(MAX_TEXT_LEN)).is_ok());
        let e = text_field("name", &"x".repeat(1 << 20)).expect_err("too long");
        assert_eq!(
            e.to_string(),
            "invalid name: it is 1048576 bytes long, at most 256 are allowed"
        );
        assert!(text_field("group", "a\u{1b}[2J").is_err());
        assert!(label("provider", "acme-1").is_ok());
        for bad in ["", "a b", "a:b", &"p".repeat(65)] {
            assert!(label("provider", bad).is_err(), "{bad:?}");
        }
    }
}
