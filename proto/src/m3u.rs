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

use crate::validate;
use crate::ChannelSpec;
use std::collections::HashMap;
use thiserror::Error;

/// The longest channel id a slug may produce (the channel-id rule's limit).
pub const MAX_ID_LEN: usize = 64;

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
    let mut errors = Vec::new();
    let mut channels = Vec::new();
    // id -> line of the #EXTINF that claimed it
    let mut seen: HashMap<String, usize> = HashMap::new();
    // the #EXTINF waiting for its URL: (line, parsed entry or None when the line was malformed)
    let mut pending: Option<(usize, Option<Entry>)> = None;
    let mut header_seen = false;

    for (idx, raw) in lines(text).enumerate() {
        let line_no = idx + 1;
        // a BOM can also sit mid-file where two playlists were concatenated
        let line = raw.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
        if line.is_empty() {
            continue;
        }
        if !header_seen {
            header_seen = true;
            if starts_with_ignore_case(line, "#EXTM3U") {
                continue;
            }
            errors.push(M3uError::new(
                line_no,
                "the playlist does not start with #EXTM3U (is this an extended M3U file?)",
            ));
            // keep going: report what else is wrong too
        }
        if let Some(rest) = strip_prefix_ignore_case(line, "#EXTINF")
            .filter(|r| r.is_empty() || r.starts_with(':') || r.starts_with(char::is_whitespace))
        {
            if let Some((prev_line, _)) = pending.take() {
                errors.push(missing_url(prev_line));
            }
            let entry = match rest.strip_prefix(':') {
                Some(body) => match parse_extinf(body) {
                    Ok(entry) => Some(entry),
                    Err(why) => {
                        errors.push(M3uError::new(line_no, why));
                        None
                    }
                },
                None => {
                    errors.push(M3uError::new(
                        line_no,
                        "malformed #EXTINF: expected '#EXTINF:<duration> attributes,<title>'",
                    ));
                    None
                }
            };
            pending = Some((line_no, entry));
            continue;
        }
        if line.starts_with('#') {
            // #EXTM3U repeated by concatenated lists, #EXTGRP, #EXTVLCOPT, comments: not ours
            continue;
        }

        // a URL line
        let Some((extinf_line, entry)) = pending.take() else {
            errors.push(M3uError::new(
                line_no,
                format!(
                    "{} does not follow an #EXTINF line (each URL needs '#EXTINF:...' before it)",
                    quoted_excerpt(line)
                ),
            ));
            continue;
        };
        let url_ok = match validate::upstream_url(line, allowed_schemes) {
            Ok(()) => true,
            Err(e) => {
                errors.push(M3uError::new(line_no, e.to_string()));
                false
            }
        };
        let Some(entry) = entry else {
            continue; // its #EXTINF was already reported
        };
        let Some(id) = entry.channel_id() else {
            errors.push(M3uError::new(
                extinf_line,
                "cannot derive a channel id: tvg-id, tvg-name and the title have no usable letters or digits",
            ));
            continue;
        };
        if let Some(first) = seen.get(&id) {
            errors.push(M3uError::new(
                extinf_line,
                format!("duplicate channel id {id:?}: the entry at line {first} has the same id (give one of them a distinct tvg-id)"),
            ));
            continue;
        }
        seen.insert(id.clone(), extinf_line);
        let spec = entry.into_spec(id, line.to_string());
        let mut fields_ok = true;
        for (field, value) in [("name", &spec.name), ("group", &spec.group)] {
            if let Err(e) = validate::text_field(field, value) {
                errors.push(M3uError::new(extinf_line, format!("the channel's {e}")));
                fields_ok = false;
            }
        }
        if url_ok && fields_ok {
            channels.push(spec);
        }
    }
    if let Some((line, _)) = pending {
        errors.push(missing_url(line));
    }

    if errors.is_empty() {
        Ok(channels)
    } else {
        errors.sort_by_key(|e| e.line);
        Err(errors)
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

/// Turns a free-form name into a channel id: ASCII letters lowercased, digits and `_` kept,
/// common accented Latin, Greek and Cyrillic letters transliterated, other letters dropped, runs of
/// anything else become one `-`; no leading or trailing `-`; at most [`MAX_ID_LEN`] bytes. May be
/// empty; a non-empty result is always a valid channel id.
///
/// `"BBC One HD"` → `bbc-one-hd`, `"bbc1.uk"` → `bbc1-uk`, `"Das Erste (Österreich)"` →
/// `das-erste-oesterreich`, `"Первый канал"` → `pervyj-kanal`.
pub fn slug(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_ID_LEN));
    let mut gap = false;
    let mut buf = [0u8; 4];
    for c in s.chars() {
        let piece: &str = if c.is_ascii_alphanumeric() || c == '_' {
            c.to_ascii_lowercase().encode_utf8(&mut buf)
        } else if let Some(t) = transliterate(c) {
            t
        } else if c.is_alphanumeric() || is_combining_mark(c) {
            "" // a letter we cannot spell in ASCII: dropped, no separator
        } else {
            gap = true;
            continue;
        };
        if piece.is_empty() {
            continue;
        }
        if gap && !out.is_empty() {
            if out.len() + 1 >= MAX_ID_LEN {
                break;
            }
            out.push('-');
        }
        gap = false;
        if out.len() + piece.len() > MAX_ID_LEN {
            break;
        }
        out.push_str(piece);
    }
    while out.ends_with('-') {
        out.pop();
    }
    out
}

fn is_combining_mark(c: char) -> bool {
    matches!(c, '\u{0300}'..='\u{036f}')
}

/// ASCII spelling of common non-ASCII letters (lowercase), `None` for anything else.
fn transliterate(c: char) -> Option<&'static str> {
    let lower = c.to_lowercase().next().unwrap_or(c);
    Some(match lower {
        // Latin-1 and Latin Extended-A ('i' is the lowercase of 'İ')
        'i' => "i",
        'à' | 'á' | 'â' | 'ã' | 'å' | 'ā' | 'ă' | 'ą' => "a",
        'ä' | 'æ' => "ae",
        'ç' | 'ć' | 'ĉ' | 'ċ' | 'č' => "c",
        'ď' | 'đ' | 'ð' => "d",
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ĕ' | 'ė' | 'ę' | 'ě' => "e",
        'ĝ' | 'ğ' | 'ġ' | 'ģ' => "g",
        'ĥ' | 'ħ' => "h",
        'ì' | 'í' | 'î' | 'ï' | 'ĩ' | 'ī' | 'ĭ' | 'į' | 'ı' => "i",
        'ĵ' => "j",
        'ķ' => "k",
        'ĺ' | 'ļ' | 'ľ' | 'ŀ' | 'ł' => "l",
        'ñ' | 'ń' | 'ņ' | 'ň' => "n",
        'ò' | 'ó' | 'ô' | 'õ' | 'ō' | 'ŏ' | 'ő' => "o",
        'ö' | 'ø' | 'œ' => "oe",
        'ŕ' | 'ŗ' | 'ř' => "r",
        'ś' | 'ŝ' | 'ş' | 'š' | 'ș' => "s",
        'ß' => "ss",
        'ţ' | 'ť' | 'ŧ' | 'ț' => "t",
        'þ' => "th",
        'ù' | 'ú' | 'û' | 'ũ' | 'ū' | 'ŭ' | 'ů' | 'ű' | 'ų' => "u",
        'ü' => "ue",
        'ŵ' => "w",
        'ý' | 'ÿ' | 'ŷ' => "y",
        'ź' | 'ż' | 'ž' => "z",
        // Greek
        'α' | 'ά' => "a",
        'β' => "v",
        'γ' => "g",
        'δ' => "d",
        'ε' | 'έ' => "e",
        'ζ' => "z",
        'η' | 'ή' => "i",
        'θ' => "th",
        'ι' | 'ί' | 'ϊ' | 'ΐ' => "i",
        'κ' => "k",
        'λ' => "l",
        'μ' => "m",
        'ν' => "n",
        'ξ' => "x",
        'ο' | 'ό' => "o",
        'π' => "p",
        'ρ' => "r",
        'σ' | 'ς' => "s",
        'τ' => "t",
        'υ' | 'ύ' | 'ϋ' | 'ΰ' => "y",
        'φ' => "f",
        'χ' => "ch",
        'ψ' => "ps",
        'ω' | 'ώ' => "o",
        // Cyrillic (Russian, Ukrainian, Belarusian, Serbian, Bulgarian)
        'а' => "a",
        'б' => "b",
        'в' => "v",
        'г' | 'ґ' => "g",
        'д' => "d",
        'ђ' => "dj",
        'е' | 'ё' | 'є' | 'э' => "e",
        'ж' => "zh",
        'з' => "z",
        'и' | 'і' | 'ї' => "i",
        'ы' => "y",
        'й' | 'ј' => "j",
        'к' => "k",
        'л' => "l",
        'љ' => "lj",
        'м' => "m",
        'н' => "n",
        'њ' => "nj",
        'о' => "o",
        'п' => "p",
        'р' => "r",
        'с' => "s",
        'т' => "t",
        'ћ' => "c",
        'у' | 'ў' => "u",
        'ф' => "f",
        'х' => "h",
        'ц' => "c",
        'ч' => "ch",
        'џ' => "dz",
        'ш' => "sh",
        'щ' => "shch",
        'ю' => "ju",
        'я' => "ja",
        'ъ' | 'ь' => "",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::DEFAULT_ALLOWED_SCHEMES;

    fn ok(text: &str) -> Vec<ChannelSpec> {
        match parse(text, DEFAULT_ALLOWED_SCHEMES) {
            Ok(v) => v,
            Err(e) => panic!("unexpected errors: {e:?}"),
        }
    }

    fn errs(text: &str) -> Vec<M3uError> {
        match parse(text, DEFAULT_ALLOWED_SCHEMES) {
            Ok(v) => panic!("expected errors, got {v:?}"),
            Err(e) => e,
        }
    }

    fn lines_of(errors: &[M3uError]) -> Vec<usize> {
        errors.iter().map(|e| e.line).collect()
    }

    const PROVIDER_LIST: &str = "\u{feff}#EXTM3U url-tvg=\"http://epg.example/guide.xml.gz\" x-tvg-url=\"http://epg.example/g2.xml\"\r
#EXTINF:-1 tvg-id=\"bbc1.uk\" tvg-name=\"BBC One\" tvg-logo=\"http://logo.example/bbc1.png\" group-title=\"UK\",BBC One HD\r
http://provider.example/live/user/pass/1001.ts\r
\r
#EXTINF:-1 tvg-id=\"\" tvg-name=\"News, Weather & Sport\" group-title=\"UK, News\",Ignored Title\r
#EXTGRP:Other group\r
#EXTVLCOPT:http-user-agent=VLC/3.0\r
http://provider.example/live/user/pass/1002.ts\r
#EXTINF:0,Das Erste (Österreich)\r
https://cdn.example/daserste/index.m3u8?token=a,b\r
";

    #[test]
    fn parses_a_provider_playlist() {
        let v = ok(PROVIDER_LIST);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].id, "bbc1-uk");
        assert_eq!(v[0].name, "BBC One");
        assert_eq!(v[0].group, "UK");
        assert_eq!(v[0].url, "http://provider.example/live/user/pass/1001.ts");
        assert_eq!(v[0].profile, "copy");
        assert!(!v[0].pinned && v[0].provider.is_empty() && v[0].backup_urls.is_empty());

        assert_eq!(v[1].id, "news-weather-sport");
        assert_eq!(v[1].name, "News, Weather & Sport");
        assert_eq!(v[1].group, "UK, News");
        assert_eq!(v[1].url, "http://provider.example/live/user/pass/1002.ts");

        assert_eq!(v[2].id, "das-erste-oesterreich");
        assert_eq!(v[2].name, "Das Erste (Österreich)");
        assert_eq!(v[2].group, "");
        assert_eq!(
            v[2].url,
            "https://cdn.example/daserste/index.m3u8?token=a,b"
        );
    }

    #[test]
    fn specs_survive_the_catalog_hash() {
        for spec in ok(PROVIDER_LIST) {
            let h = spec
                .to_fields()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            assert_eq!(ChannelSpec::from_fields(&spec.id, &h), Some(spec));
        }
    }

    #[test]
    fn header_only_and_empty_lists() {
        assert!(ok("#EXTM3U\n").is_empty());
        assert!(ok("#EXTM3U").is_empty());
        assert!(ok("\n\n  #EXTM3U  \n\n").is_empty());
        assert!(ok("#extm3u\n").is_empty());
        // an empty file has no header, but also nothing wrong with any line
        assert!(ok("").is_empty());
        assert!(ok("\u{feff}").is_empty());
    }

    #[test]
    fn missing_header_is_reported() {
        let e = errs("<html>\n<body>Not found</body>\n");
        assert_eq!(e[0].line, 1);
        assert!(e[0].message.contains("#EXTM3U"), "{}", e[0]);
        // every other line is reported too
        assert_eq!(lines_of(&e), vec![1, 1, 2]);
    }

    #[test]
    fn line_endings_lf_crlf_cr_count_lines_the_same() {
        let body = [
            "#EXTM3U",
            "#EXTINF:-1,A",
            "http://x/a",
            "",
            "#EXTINF:-1,B",
            "gopher://x/b",
        ];
        for sep in ["\n", "\r\n", "\r"] {
            let e = errs(&body.join(sep));
            assert_eq!(lines_of(&e), vec![6], "separator {sep:?}: {e:?}");
        }
        // mixed endings
        let v = ok("#EXTM3U\r\n#EXTINF:-1,A\nhttp://x/a\r#EXTINF:-1,B\r\nhttp://x/b");
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn title_fallbacks_for_id_and_name() {
        let v = ok("#EXTM3U\n#EXTINF:-1 tvg-name=\"Sky Sports F1\",Sky F1 HD\nhttp://x/1\n");
        assert_eq!(
            (v[0].id.as_str(), v[0].name.as_str()),
            ("sky-sports-f1", "Sky Sports F1")
        );
        let v = ok("#EXTM3U\n#EXTINF:-1,Sky F1 HD\nhttp://x/1\n");
        assert_eq!(
            (v[0].id.as_str(), v[0].name.as_str()),
            ("sky-f1-hd", "Sky F1 HD")
        );
        // tvg-id that slugs to nothing falls back to the name
        let v = ok("#EXTM3U\n#EXTINF:-1 tvg-id=\"...\" tvg-name=\"Arte\",x\nhttp://x/1\n");
        assert_eq!(v[0].id, "arte");
        // no title at all, only attributes
        let v = ok("#EXTM3U\n#EXTINF:-1 tvg-id=\"cnn.us\"\nhttp://x/1\n");
        assert_eq!((v[0].id.as_str(), v[0].name.as_str()), ("cnn-us", "cnn-us"));
    }

    #[test]
    fn attribute_syntax_variants() {
        let e = parse_extinf(r#"-1 TVG-ID="a.b" tvg-name='Single, quoted' group-title=Bare tvg-logo="",Title, with, commas"#)
            .expect("parses");
        assert_eq!(e.tvg_id, "a.b");
        assert_eq!(e.tvg_name, "Single, quoted");
        assert_eq!(e.group, "Bare");
        assert_eq!(e.title, "Title, with, commas");

        // no duration, spaces around, duplicate attribute (first wins), stray word
        let e = parse_extinf(r#"  tvg-id="x" tvg-id="y" catchup  ,  T  "#).expect("parses");
        assert_eq!((e.tvg_id.as_str(), e.title.as_str()), ("x", "T"));

        // '=' and quotes inside the title are just title
        let e = parse_extinf(r#"-1,A="b" c"#).expect("parses");
        assert_eq!(e.title, r#"A="b" c"#);

        // a quoted value may contain '=' and the other quote
        let e = parse_extinf(r#"-1 tvg-name="it's = fine",x"#).expect("parses");
        assert_eq!(e.tvg_name, "it's = fine");

        // empty body
        assert_eq!(parse_extinf("").expect("parses"), Entry::default());
        assert_eq!(parse_extinf(",").expect("parses"), Entry::default());
    }

    #[test]
    fn unterminated_quote_is_an_error_with_its_line() {
        let e = errs("#EXTM3U\n#EXTINF:-1 tvg-id=\"abc,ABC\nhttp://x/1\n");
        assert_eq!(lines_of(&e), vec![2]);
        assert!(e[0].message.contains("unterminated quote"), "{}", e[0]);
    }

    #[test]
    fn extinf_without_colon_is_malformed() {
        let e = errs("#EXTM3U\n#EXTINF -1,A\nhttp://x/1\n");
        assert_eq!(lines_of(&e), vec![2]);
        assert!(e[0].message.contains("malformed"));
    }

    #[test]
    fn other_directives_and_comments_are_ignored() {
        let v = ok("#EXTM3U\n# a comment\n#EXTINFO:whatever\n#EXTINF:-1,A\n#EXTVLCOPT:x=y\n#KODIPROP:a=b\n\nhttp://x/a\n#EXTM3U\n");
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].url, "http://x/a");
        // concatenated playlists: a second BOM and header mid-file
        let v =
            ok("#EXTM3U\n#EXTINF:-1,A\nhttp://x/a\n\u{feff}#EXTM3U\n#EXTINF:-1,B\nhttp://x/b\n");
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn every_bad_line_is_reported() {
        let text = "#EXTM3U
#EXTINF:-1,Good
http://x/good
http://x/orphan
#EXTINF:-1,No URL
#EXTINF:-1,Bad scheme
file:///etc/passwd
#EXTINF:-1,FFmpeg option
-i http://x
#EXTINF:-1 tvg-id=\"日本\",テレビ
http://x/jp
#EXTINF:-1,Concat
concat:http://a|http://b
#EXTINF:-1,Good
http://x/dup
#EXTINF:-1,Trailing";
        let e = errs(text);
        assert_eq!(lines_of(&e), vec![4, 5, 7, 9, 10, 13, 14, 16], "{e:#?}");
        assert!(e[0].message.contains("does not follow an #EXTINF"));
        assert!(e[1].message.contains("no URL"));
        assert!(e[2].message.contains("scheme"));
        assert!(e[3].message.contains("'-'"));
        assert!(e[4].message.contains("channel id"));
        assert!(e[5].message.contains("scheme"));
        assert!(e[6].message.contains("duplicate") && e[6].message.contains("line 2"));
        assert!(e[7].message.contains("no URL"));
        assert_eq!(e[6].to_string(), format!("line 14: {}", e[6].message));
    }

    #[test]
    fn duplicate_ids_name_both_lines() {
        let e = errs("#EXTM3U\n#EXTINF:-1 tvg-id=\"bbc1.uk\",BBC One HD\nhttp://x/1\n#EXTINF:-1 tvg-id=\"BBC1.UK\",BBC One SD\nhttp://x/2\n");
        assert_eq!(lines_of(&e), vec![4]);
        assert!(e[0].message.contains("\"bbc1-uk\""));
        assert!(e[0].message.contains("line 2"));
    }

    #[test]
    fn allowed_schemes_come_from_the_caller() {
        let text = "#EXTM3U\n#EXTINF:-1,A\nrtmp://x/live/a\n";
        assert!(parse(text, DEFAULT_ALLOWED_SCHEMES).is_ok());
        let e = parse(text, &["http", "https"]).expect_err("rtmp refused");
        assert_eq!(lines_of(&e), vec![3]);
        let e = parse(text, &[] as &[&str]).expect_err("nothing allowed");
        assert_eq!(lines_of(&e), vec![3]);
    }

    #[test]
    fn urls_are_trimmed_and_control_chars_are_refused() {
        let v = ok("#EXTM3U\n#EXTINF:-1,A\n   http://x/a   \n");
        assert_eq!(v[0].url, "http://x/a");
        let e = errs("#EXTM3U\n#EXTINF:-1,A\nhttp://x/a\u{0}b\n");
        assert_eq!(lines_of(&e), vec![3]);
        let e = errs("#EXTM3U\n#EXTINF:-1,A\nhttp://x/a b\n");
        assert_eq!(lines_of(&e), vec![3]);
    }

    #[test]
    fn overlong_names_and_groups_are_errors_at_their_line() {
        let big = "n".repeat(1 << 20);
        let e = errs(&format!(
            "#EXTM3U\n#EXTINF:-1 tvg-id=\"a\",{big}\nhttp://x/a\n#EXTINF:-1 group-title=\"{}\",B\nhttp://x/b\n",
            "g".repeat(257)
        ));
        assert_eq!(lines_of(&e), vec![2, 4], "{e:?}");
        assert!(
            e[0].message.contains("name: it is 1048576 bytes long"),
            "{}",
            e[0]
        );
        assert!(e[1].message.contains("group"), "{}", e[1]);
        assert!(e.iter().all(|x| x.message.len() < 200));
    }

    #[test]
    fn names_lose_control_characters() {
        let v = ok("#EXTM3U\n#EXTINF:-1 group-title=\"G\u{1b}[31m\",A\u{7}\tB\nhttp://x/a\n");
        assert_eq!(v[0].name, "A B");
        assert_eq!(v[0].group, "G [31m");
    }

    #[test]
    fn slugs() {
        let cases = [
            ("BBC One HD", "bbc-one-hd"),
            ("bbc1.uk", "bbc1-uk"),
            ("  --Hello__World--  ", "hello__world"),
            ("ProSieben MAXX (DE)", "prosieben-maxx-de"),
            ("Das Erste (Österreich)", "das-erste-oesterreich"),
            ("Ελληνική ΕΡΤ1", "elliniki-ert1"),
            ("Первый канал", "pervyj-kanal"),
            ("ТНТ4 / СТС", "tnt4-sts"),
            ("Télé-Québec", "tele-quebec"),
            ("Straße", "strasse"),
            ("Cafe\u{301} Noir", "cafe-noir"),
            ("日本テレビ", ""),
            ("NHK 日本 World", "nhk-world"),
            ("📺 Sport 24/7 📺", "sport-24-7"),
            ("", ""),
            ("-", ""),
            ("a\u{0}b", "a-b"),
            ("a ъ b", "a-b"),
            ("İstanbul TV", "istanbul-tv"),
        ];
        for (input, want) in cases {
            assert_eq!(slug(input), want, "{input:?}");
        }
    }

    #[test]
    fn slugs_are_capped_at_64_without_a_trailing_dash() {
        let s = slug(&"abc ".repeat(40));
        assert!(s.len() <= MAX_ID_LEN, "{s}");
        assert!(!s.ends_with('-'));
        assert!(validate::channel_id(&s).is_ok());
        assert_eq!(slug(&"x".repeat(100)), "x".repeat(64));
        // a multi-letter transliteration never overshoots
        let s = slug(&format!("{}щ", "a".repeat(62)));
        assert_eq!(s, "a".repeat(62));
        let s = slug(&format!("{} b", "a".repeat(63)));
        assert_eq!(s, "a".repeat(63));
    }

    #[test]
    fn non_empty_slugs_are_valid_channel_ids() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let alphabet: Vec<char> = "aZ09_-. /äöüßéøΩωЖжщ日🎥\u{301}\t\"',=".chars().collect();
        for _ in 0..5_000 {
            let len = (rng.next() % 90) as usize;
            let s: String = (0..len)
                .map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize])
                .collect();
            let id = slug(&s);
            assert!(
                id.is_empty() || validate::channel_id(&id).is_ok(),
                "{s:?} -> {id:?}"
            );
            assert!(
                !id.starts_with('-') && !id.ends_with('-') && !id.contains("--"),
                "{s:?} -> {id:?}"
            );
        }
    }

    #[test]
    fn results_satisfy_the_invariants() {
        let v = ok(PROVIDER_LIST);
        let mut ids: Vec<&str> = v.iter().map(|c| c.id.as_str()).collect();
        for c in &v {
            assert!(validate::channel_id(&c.id).is_ok());
            assert!(validate::upstream_url(&c.url, DEFAULT_ALLOWED_SCHEMES).is_ok());
            assert!(c.validate(DEFAULT_ALLOWED_SCHEMES).is_ok(), "{c:?}");
        }
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), v.len());
    }

    /// xorshift64: deterministic noise without a dependency.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
    }

    fn check_invariants(text: &str) {
        match parse(text, DEFAULT_ALLOWED_SCHEMES) {
            Ok(v) => {
                let mut ids = std::collections::HashSet::new();
                for c in &v {
                    assert!(validate::channel_id(&c.id).is_ok(), "{c:?}");
                    assert!(
                        validate::upstream_url(&c.url, DEFAULT_ALLOWED_SCHEMES).is_ok(),
                        "{c:?}"
                    );
                    assert!(c.validate(DEFAULT_ALLOWED_SCHEMES).is_ok(), "{c:?}");
                    assert!(ids.insert(c.id.clone()), "duplicate {c:?}");
                }
            }
            Err(e) => {
                assert!(!e.is_empty());
                let max_line = lines(text.strip_prefix('\u{feff}').unwrap_or(text))
                    .count()
                    .max(1);
                for err in &e {
                    assert!(
                        err.line >= 1 && err.line <= max_line,
                        "{err} beyond {max_line}"
                    );
                }
                assert!(e.windows(2).all(|w| w[0].line <= w[1].line));
            }
        }
    }

    #[test]
    fn never_panics_on_random_bytes() {
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        for _ in 0..3_000 {
            let len = (rng.next() % 512) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            check_invariants(&String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn never_panics_on_random_playlist_fragments() {
        // noise built from the grammar's own pieces reaches far deeper than random bytes
        let pieces = [
            "#EXTM3U",
            "#EXTINF:",
            "#EXTINF",
            "#extinf:-1",
            "-1",
            " ",
            ",",
            "\"",
            "'",
            "=",
            "tvg-id",
            "tvg-name=",
            "group-title=\"",
            "\n",
            "\r\n",
            "\r",
            "http://",
            "https://h/",
            "x",
            "ü",
            "日",
            "щ",
            "\u{feff}",
            "\u{0}",
            "\t",
            "#EXTGRP:g",
            "-i",
            "file:///etc/passwd",
            ".",
            "é",
            "🎥",
            "rtmp://a/b",
            "concat:",
            "\u{301}",
        ];
        let mut rng = XorShift(0xdead_beef_cafe_f00d);
        for _ in 0..5_000 {
            let n = (rng.next() % 80) as usize;
            let mut text = String::new();
            for _ in 0..n {
                text.push_str(pieces[(rng.next() % pieces.len() as u64) as usize]);
            }
            check_invariants(&text);
        }
    }

    #[test]
    fn handles_large_lists() {
        let mut text = String::from("#EXTM3U\n");
        for i in 0..10_000 {
            text.push_str(&format!(
                "#EXTINF:-1 tvg-id=\"ch{i}.example\" group-title=\"G\",Channel {i}\nhttp://p.example/live/{i}.ts\n"
            ));
        }
        let v = ok(&text);
        assert_eq!(v.len(), 10_000);
        assert_eq!(v[9_999].id, "ch9999-example");
    }
}
