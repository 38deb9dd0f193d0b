//! Property tests for the extended-M3U importer behind `farmctl import` (`farm_coordinator::ctl::import::m3u`):
//! it never panics; whatever it accepts is safe to write to the catalog (valid, unique ids and
//! valid URLs); every error points at a line that exists; a generated playlist comes back as the
//! channels it was made from, whatever its line endings, BOMs, blank lines and extra directives;
//! and one bad URL in it is reported at exactly its line and nothing is returned.

use farm_coordinator::ctl::import::m3u::{self, M3uError};
use farm_proto::validate::{self, DEFAULT_ALLOWED_SCHEMES};
use farm_proto::ChannelSpec;
use farm_tests::abuse::m3u_line_count;
use proptest::prelude::*;
use std::collections::HashSet;

fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig::with_cases(cases)
}

/// The importer's promises for any input.
fn check_invariants(text: &str) -> Result<(), TestCaseError> {
    match m3u::parse(text, DEFAULT_ALLOWED_SCHEMES) {
        Ok(channels) => {
            let mut ids = HashSet::new();
            for c in &channels {
                prop_assert!(validate::channel_id(&c.id).is_ok(), "bad id in {:?}", c);
                prop_assert!(
                    validate::upstream_url(&c.url, DEFAULT_ALLOWED_SCHEMES).is_ok(),
                    "bad url in {:?}",
                    c
                );
                for u in &c.backup_urls {
                    prop_assert!(validate::upstream_url(u, DEFAULT_ALLOWED_SCHEMES).is_ok());
                }
                prop_assert!(ids.insert(c.id.clone()), "duplicate id {:?}", c.id);
                prop_assert!(
                    !c.name.chars().any(char::is_control) && !c.group.chars().any(char::is_control),
                    "control characters reach the catalog: {:?}",
                    c
                );
            }
        }
        Err(errors) => {
            prop_assert!(!errors.is_empty(), "Err with no error");
            let max = m3u_line_count(text);
            for e in &errors {
                prop_assert!(
                    (1..=max).contains(&e.line),
                    "error at line {} of a {}-line text: {}",
                    e.line,
                    max,
                    e
                );
                prop_assert!(!e.message.is_empty());
                prop_assert_eq!(e.to_string(), format!("line {}: {}", e.line, e.message));
            }
            prop_assert!(
                errors.windows(2).all(|w| w[0].line <= w[1].line),
                "errors not sorted by line: {:?}",
                errors
            );
        }
    }
    Ok(())
}

/// Text built from the grammar's own pieces: reaches deeper than random characters.
fn m3u_noise() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "#EXTM3U",
        "#extm3u",
        "#EXTINF:",
        "#EXTINF",
        "#EXTINF:-1",
        "#EXTINF -1",
        "#EXTINFO:",
        "-1",
        "10.5",
        " ",
        "\t",
        ",",
        "\"",
        "'",
        "=",
        "tvg-id=",
        "tvg-id=\"",
        "tvg-name='",
        "group-title=",
        "TVG-ID",
        "\n",
        "\r\n",
        "\r",
        "\n\n",
        "\u{feff}",
        "http://",
        "https://h/x.ts",
        "rtmp://a/b",
        "udp://239.0.0.1:1234",
        "file:///etc/passwd",
        "concat:",
        "subfile,,:",
        "-i ",
        "x",
        "ab",
        "ä",
        "щ",
        "日本",
        "🎥",
        "\u{301}",
        "\u{0}",
        "\u{1b}[31m",
        ".",
        "..",
        "/",
        "#EXTGRP:g",
        "#EXTVLCOPT:a=b",
        "# comment",
    ]);
    prop::collection::vec(piece, 0..60).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn never_panics_and_keeps_its_promises_on_any_text(text in any::<String>()) {
        check_invariants(&text)?;
    }

    #[test]
    fn never_panics_and_keeps_its_promises_on_playlist_noise(text in m3u_noise()) {
        check_invariants(&text)?;
    }

    #[test]
    fn never_panics_on_lossy_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_invariants(&String::from_utf8_lossy(&bytes))?;
    }
}

/// One channel of a generated playlist, and how its `#EXTINF` line is spelled.
#[derive(Debug, Clone)]
struct Gen {
    /// A fixed point of the slug: what the importer must derive from it unchanged.
    id: String,
    name: String,
    group: String,
    title: String,
    url: String,
    quote: char,
    key_case_upper: bool,
    duration: &'static str,
    extra_attr: bool,
    /// A directive between the #EXTINF and its URL (#EXTVLCOPT, #EXTGRP), ignored by the importer.
    directive: Option<&'static str>,
}

/// Ids the slug leaves as they are: lowercase ASCII words joined by single dashes, at most 64 bytes.
fn slug_fixed_point() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z0-9_]{1,10}", 1..5)
        .prop_map(|words| words.join("-"))
        .prop_filter("fits an id", |s| s.len() <= 64)
}

/// Free text without quotes, commas, control characters or doubled spaces (what `clean` keeps).
fn text_value() -> impl Strategy<Value = String> {
    prop::collection::vec("[A-Za-z0-9äöüéЖж日&()+!:/.-]{1,8}", 1..4).prop_map(|w| w.join(" "))
}

fn upstream_url() -> impl Strategy<Value = String> {
    (
        prop::sample::select(DEFAULT_ALLOWED_SCHEMES),
        "[a-z0-9]{1,10}(\\.[a-z]{2,5})?(:[1-9][0-9]{0,3})?",
        "(/[A-Za-z0-9_.~-]{1,10}){0,3}(\\?[a-z]{1,4}=[a-z0-9,]{0,6})?",
    )
        .prop_map(|(s, h, p)| format!("{s}://{h}{p}"))
}

fn channel() -> impl Strategy<Value = Gen> {
    (
        slug_fixed_point(),
        text_value(),
        prop::option::of(text_value()),
        text_value(),
        upstream_url(),
        (
            prop::sample::select(vec!['"', '\'']),
            any::<bool>(),
            prop::sample::select(vec!["-1", "0", "10.5", ""]),
            any::<bool>(),
            prop::option::of(prop::sample::select(vec![
                "#EXTVLCOPT:http-user-agent=VLC/3.0",
                "#EXTGRP:Other",
                "# a comment",
            ])),
        ),
    )
        .prop_map(
            |(
                id,
                name,
                group,
                title,
                url,
                (quote, key_case_upper, duration, extra_attr, directive),
            )| Gen {
                id,
                name,
                group: group.unwrap_or_default(),
                title,
                url,
                quote,
                key_case_upper,
                duration,
                extra_attr,
                directive,
            },
        )
}

/// A playlist of channels with distinct ids, and how it is laid out.
#[derive(Debug, Clone)]
struct Playlist {
    channels: Vec<Gen>,
    eol: &'static str,
    bom: bool,
    blank_lines: Vec<bool>,
}

fn playlist() -> impl Strategy<Value = Playlist> {
    (
        prop::collection::vec(channel(), 0..12),
        prop::sample::select(vec!["\n", "\r\n", "\r"]),
        any::<bool>(),
        prop::collection::vec(any::<bool>(), 12),
    )
        .prop_map(|(mut channels, eol, bom, blank_lines)| {
            let mut seen = HashSet::new();
            channels.retain(|c| seen.insert(c.id.clone()));
            Playlist {
                channels,
                eol,
                bom,
                blank_lines,
            }
        })
}

impl Playlist {
    /// The text, and for each channel the 1-based line of its URL.
    fn render(&self) -> (String, Vec<usize>) {
        let mut lines: Vec<String> = vec![format!(
            "{}#EXTM3U url-tvg=\"http://epg.example/guide.xml\"",
            if self.bom { "\u{feff}" } else { "" }
        )];
        let mut url_lines = Vec::new();
        for (i, c) in self.channels.iter().enumerate() {
            if self.blank_lines.get(i).copied().unwrap_or(false) {
                lines.push(String::new());
            }
            let key = |k: &str| {
                if c.key_case_upper {
                    k.to_ascii_uppercase()
                } else {
                    k.to_string()
                }
            };
            let q = c.quote;
            let mut attrs = format!(
                "{}={q}{}{q} {}={q}{}{q}",
                key("tvg-id"),
                c.id,
                key("tvg-name"),
                c.name
            );
            if !c.group.is_empty() {
                attrs.push_str(&format!(" {}={q}{}{q}", key("group-title"), c.group));
            }
            if c.extra_attr {
                attrs.push_str(" tvg-logo=\"http://logo.example/a,b.png\" catchup");
            }
            lines.push(format!("#EXTINF:{} {attrs},{}", c.duration, c.title));
            if let Some(d) = c.directive {
                lines.push(d.to_string());
            }
            lines.push(c.url.clone());
            url_lines.push(lines.len());
        }
        (lines.join(self.eol), url_lines)
    }

    fn expected(&self) -> Vec<ChannelSpec> {
        self.channels
            .iter()
            .map(|c| ChannelSpec {
                id: c.id.clone(),
                name: c.name.clone(),
                url: c.url.clone(),
                backup_urls: Vec::new(),
                profile: "copy".into(),
                provider: String::new(),
                pinned: false,
                group: c.group.clone(),
            })
            .collect()
    }
}

fn bad_url() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "file:///etc/passwd",
        "concat:http://a/1.ts|http://a/2.ts",
        "subfile,,start,0,end,10,,:http://a/1.ts",
        "-i http://a/1.ts",
        "http://a/1.ts x",
        "gopher://a/1",
        "http://",
        "/etc/passwd",
    ])
}

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn a_generated_playlist_round_trips_its_channels(p in playlist()) {
        let (text, _) = p.render();
        match m3u::parse(&text, DEFAULT_ALLOWED_SCHEMES) {
            Ok(got) => prop_assert_eq!(got, p.expected(), "text: {:?}", text),
            Err(e) => return Err(TestCaseError::fail(format!("{e:?} for {text:?}"))),
        }
    }

    #[test]
    fn one_bad_url_is_reported_at_its_line_and_nothing_is_returned(
        p in playlist().prop_filter("has a channel", |p| !p.channels.is_empty()),
        pick in any::<prop::sample::Index>(),
        bad in bad_url(),
    ) {
        let mut p = p;
        let i = pick.index(p.channels.len());
        p.channels[i].url = bad.to_string();
        let (text, url_lines) = p.render();
        let errors: Vec<M3uError> = match m3u::parse(&text, DEFAULT_ALLOWED_SCHEMES) {
            Ok(v) => return Err(TestCaseError::fail(format!("accepted {bad:?}: {v:?}"))),
            Err(e) => e,
        };
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        prop_assert_eq!(lines, vec![url_lines[i]], "{:?} in {:?}", errors, text);
    }
}
