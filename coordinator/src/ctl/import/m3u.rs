//! The extended-M3U parser behind `farmctl import`: turns an IPTV provider's playlist into catalog
//! entries, or into the complete list of what is wrong with it.
//!
//! Accepted input: an optional BOM, `#EXTM3U` (with optional attributes such as `url-tvg`) as the
//! first non-blank line, then entries made of one `#EXTINF:<duration> key="value" ...,<title>` line
//! and the next URL line. Blank lines, comments and other directives (`#EXTGRP`, `#EXTVLCOPT`, ...)
//! are skipped; LF, CRLF and lone CR all end a line.
//!
//! Invariants:
//! - Every returned [`ChannelSpec`] has a valid channel id and URLs that passed
//!   [`validate::upstream_url`], and a name and group within [`validate::MAX_TEXT_LEN`] bytes
//!   (so it passes [`ChannelSpec::validate`]); ids are unique within one file.
//! - On any problem nothing is returned but every error, each with its 1-based line number, so an
//!   operator can fix the whole file in one pass.
//! - The parser never panics, whatever the bytes.

mod slug;
#[cfg(test)]
mod tests;

pub use slug::{slug, MAX_ID_LEN};

use farm_proto::validate;
use farm_proto::ChannelSpec;
use std::collections::HashMap;
use thiserror::Error;

/// One problem in a playlist, at a 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {message}")]
pub struct M3uError {
    pub line: usize,
    pub message: String,
}

impl M3uError {
    fn new(line: usize, message: impl Into<String>) -> Self {
        Self {
            line,
            message: message.into(),
        }
    }
}

/// Parses an extended M3U playlist into catalog entries (profile `copy`, no provider, not pinned).
///
/// The channel id is the slug of `tvg-id`, else of `tvg-name`, else of the title after the comma
/// (see [`slug`]); the name is `tvg-name`, else the title, else the id; the group is `group-title`.
/// Every URL is checked against `allowed_schemes`. Errors are sorted by line.
pub fn parse(
    text: &str,
    allowed_schemes: &[impl AsRef<str>],
) -> Result<Vec<ChannelSpec>, Vec<M3uError>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut p = Parser::default();
    for (idx, raw) in lines(text).enumerate() {
        p.line(idx + 1, raw, allowed_schemes);
    }
    p.finish()
}

/// The parser's state between lines.
#[derive(Default)]
struct Parser {
    errors: Vec<M3uError>,
    channels: Vec<ChannelSpec>,
    /// id -> line of the #EXTINF that claimed it
    seen: HashMap<String, usize>,
    /// the #EXTINF waiting for its URL: (line, parsed entry or None when the line was malformed)
    pending: Option<(usize, Option<Entry>)>,
    header_seen: bool,
}

impl Parser {
    fn error(&mut self, line: usize, message: impl Into<String>) {
        self.errors.push(M3uError::new(line, message));
    }

    fn line(&mut self, line_no: usize, raw: &str, allowed_schemes: &[impl AsRef<str>]) {
        // a BOM can also sit mid-file where two playlists were concatenated
        let line = raw.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
        if line.is_empty() {
            return;
        }
        if !self.header_seen {
            self.header_seen = true;
            if starts_with_ignore_case(line, "#EXTM3U") {
                return;
            }
            self.error(
                line_no,
                "the playlist does not start with #EXTM3U (is this an extended M3U file?)",
            );
            // keep going: report what else is wrong too
        }
        if let Some(rest) = strip_prefix_ignore_case(line, "#EXTINF")
            .filter(|r| r.is_empty() || r.starts_with(':') || r.starts_with(char::is_whitespace))
        {
            self.extinf(line_no, rest);
        } else if !line.starts_with('#') {
            // (#EXTM3U repeated by concatenated lists, #EXTGRP, #EXTVLCOPT, comments: not ours)
            self.url(line_no, line, allowed_schemes);
        }
    }

    /// An `#EXTINF` line; `rest` follows the tag.
    fn extinf(&mut self, line_no: usize, rest: &str) {
        if let Some((prev_line, _)) = self.pending.take() {
            self.errors.push(missing_url(prev_line));
        }
        let entry = match rest.strip_prefix(':') {
            Some(body) => match parse_extinf(body) {
                Ok(entry) => Some(entry),
                Err(why) => {
                    self.error(line_no, why);
                    None
                }
            },
            None => {
                self.error(
                    line_no,
                    "malformed #EXTINF: expected '#EXTINF:<duration> attributes,<title>'",
                );
                None
            }
        };
        self.pending = Some((line_no, entry));
    }

    /// A URL line: completes the pending `#EXTINF` into a channel.
    fn url(&mut self, line_no: usize, line: &str, allowed_schemes: &[impl AsRef<str>]) {
        let Some((extinf_line, entry)) = self.pending.take() else {
            self.error(
                line_no,
                format!(
                    "{} does not follow an #EXTINF line (each URL needs '#EXTINF:...' before it)",
                    quoted_excerpt(line)
                ),
            );
            return;
        };
        let url_ok = match validate::upstream_url(line, allowed_schemes) {
            Ok(()) => true,
            Err(e) => {
                self.error(line_no, e.to_string());
                false
            }
        };
        let Some(entry) = entry else {
            return; // its #EXTINF was already reported
        };
        let Some(id) = entry.channel_id() else {
            self.error(
                extinf_line,
                "cannot derive a channel id: tvg-id, tvg-name and the title have no usable letters or digits",
            );
            return;
        };
        if let Some(first) = self.seen.get(&id) {
            let msg = format!("duplicate channel id {id:?}: the entry at line {first} has the same id (give one of them a distinct tvg-id)");
            self.error(extinf_line, msg);
            return;
        }
        self.seen.insert(id.clone(), extinf_line);
        let spec = entry.into_spec(id, line.to_string());
        let mut fields_ok = true;
        for (field, value) in [("name", &spec.name), ("group", &spec.group)] {
            if let Err(e) = validate::text_field(field, value) {
                self.error(extinf_line, format!("the channel's {e}"));
                fields_ok = false;
            }
        }
        if url_ok && fields_ok {
            self.channels.push(spec);
        }
    }

    fn finish(mut self) -> Result<Vec<ChannelSpec>, Vec<M3uError>> {
        if let Some((line, _)) = self.pending.take() {
            self.errors.push(missing_url(line));
        }
        if self.errors.is_empty() {
            Ok(self.channels)
        } else {
            self.errors.sort_by_key(|e| e.line);
            Err(self.errors)
        }
    }
}

fn missing_url(extinf_line: usize) -> M3uError {
    M3uError::new(extinf_line, "#EXTINF has no URL line after it")
}

/// Lines ended by LF, CRLF or a lone CR; a final line without terminator counts, a trailing
/// terminator does not start another line.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let s = rest?;
        if s.is_empty() {
            rest = None;
            return None;
        }
        match s.find(['\n', '\r']) {
            Some(i) => {
                let after = &s[i..];
                let skip = if after.starts_with("\r\n") { 2 } else { 1 };
                rest = Some(&after[skip..]);
                Some(&s[..i])
            }
            None => {
                rest = None;
                Some(s)
            }
        }
    })
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    strip_prefix_ignore_case(s, prefix).is_some()
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix) {
        s.get(prefix.len()..)
    } else {
        None
    }
}

/// At most 60 characters of untrusted text, quoted, for error messages.
fn quoted_excerpt(s: &str) -> String {
    let mut out: String = s.chars().take(60).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    format!("{out:?}")
}

/// What one `#EXTINF` line says.
#[derive(Debug, Default, PartialEq, Eq)]
struct Entry {
    tvg_id: String,
    tvg_name: String,
    group: String,
    title: String,
}

impl Entry {
    fn channel_id(&self) -> Option<String> {
        [&self.tvg_id, &self.tvg_name, &self.title]
            .into_iter()
            .map(|s| slug(s))
            .find(|s| !s.is_empty())
    }

    fn into_spec(self, id: String, url: String) -> ChannelSpec {
        let name = [self.tvg_name, self.title]
            .into_iter()
            .find(|s| !s.is_empty())
            .unwrap_or_else(|| id.clone());
        ChannelSpec {
            id,
            name,
            url,
            backup_urls: Vec::new(),
            profile: "copy".into(),
            provider: String::new(),
            pinned: false,
            group: self.group,
        }
    }
}

/// Parses what follows `#EXTINF:`: `-1 key="value" key2=value2,Title, with commas`.
/// The duration is optional (some providers start with the attributes); attribute keys are
/// case-insensitive; values may be double-quoted, single-quoted or bare; the title is everything
/// after the first comma outside quotes.
fn parse_extinf(body: &str) -> Result<Entry, String> {
    let mut entry = Entry::default();
    let mut rest = body.trim_start();
    // the duration: a number such as -1, 0 or 10.5
    let dur_len = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '-' || c == '+' || c == '.'))
        .unwrap_or(rest.len());
    rest = &rest[dur_len..];

    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break; // no title: the id and name come from the attributes
        }
        if let Some(title) = rest.strip_prefix(',') {
            entry.title = clean(title);
            break;
        }
        let key_len = rest
            .find(|c: char| c == '=' || c == ',' || c.is_whitespace())
            .unwrap_or(rest.len());
        let key = &rest[..key_len];
        rest = &rest[key_len..];
        let Some(after_eq) = rest.strip_prefix('=') else {
            if key.is_empty() {
                // cannot happen (the loop only gets here on a non-separator), but never spin
                return Err("malformed #EXTINF attributes".into());
            }
            continue; // a bare word such as a stray flag: ignore it
        };
        let value;
        if let Some(q) = after_eq.chars().next().filter(|c| *c == '"' || *c == '\'') {
            let inner = &after_eq[q.len_utf8()..];
            let Some(end) = inner.find(q) else {
                return Err(format!(
                    "unterminated quote in the value of attribute {}",
                    quoted_excerpt(key)
                ));
            };
            value = &inner[..end];
            rest = &inner[end + q.len_utf8()..];
        } else {
            let end = after_eq
                .find(|c: char| c == ',' || c.is_whitespace())
                .unwrap_or(after_eq.len());
            value = &after_eq[..end];
            rest = &after_eq[end..];
        }
        let slot = if key.eq_ignore_ascii_case("tvg-id") {
            &mut entry.tvg_id
        } else if key.eq_ignore_ascii_case("tvg-name") {
            &mut entry.tvg_name
        } else if key.eq_ignore_ascii_case("group-title") {
            &mut entry.group
        } else {
            continue; // tvg-logo, tvg-chno, catchup, ...: not part of the catalog
        };
        if slot.is_empty() {
            *slot = clean(value); // the first occurrence wins
        }
    }
    Ok(entry)
}

/// Turns control characters (they would garble `farmctl channel list`) into spaces and collapses
/// whitespace runs.
fn clean(s: &str) -> String {
    let spaced: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    spaced.split_whitespace().collect::<Vec<_>>().join(" ")
}
