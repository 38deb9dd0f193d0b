//! Property tests for the validators every outside input passes through (promise 10): channel ids
//! and HLS file names against regex-free reference models of `^[A-Za-z0-9_-]{1,64}$` and
//! `^[A-Za-z0-9_-]{1,64}\.(m3u8|ts)$`, and upstream URLs against what FFmpeg must never see.
//!
//! Case counts stay modest so CI is quick; `PROPTEST_CASES=100000 cargo test -p farm-proto --test
//! prop_validate` digs deeper.

use farm_proto::validate::{self, HlsFile, DEFAULT_ALLOWED_SCHEMES};
use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig::with_cases(farm_proto::proptest_cases(cases))
}

/// The reference model of `[A-Za-z0-9_-]`, spelled out byte by byte.
fn id_byte(b: u8) -> bool {
    matches!(b, b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-')
}

/// `^[A-Za-z0-9_-]{1,64}$` without a regex: length in bytes, then every byte.
fn model_channel_id(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=64).contains(&b.len()) && b.iter().all(|&c| id_byte(c))
}

/// `^[A-Za-z0-9_-]{1,64}\.(m3u8|ts)$` without a regex.
fn model_hls_file(s: &str) -> Option<HlsFile> {
    for (ext, kind) in [(".m3u8", HlsFile::Playlist), (".ts", HlsFile::Segment)] {
        if let Some(stem) = s.strip_suffix(ext) {
            if model_channel_id(stem) {
                return Some(kind);
            }
        }
    }
    None
}

/// Strings that sit near the edges of the id grammar: valid bytes mixed with the separators,
/// encodings and look-alikes a traversal would use, lengths around 64.
fn id_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        8 => "[A-Za-z0-9_-]{1,8}",
        1 => Just(".".to_string()),
        1 => Just("..".to_string()),
        1 => Just("/".to_string()),
        1 => Just("\\".to_string()),
        1 => Just("%2e".to_string()),
        1 => Just("%2f".to_string()),
        1 => Just("\0".to_string()),
        1 => Just(" ".to_string()),
        1 => Just("\u{ff0e}".to_string()), // fullwidth full stop
        1 => Just("\u{ff0f}".to_string()), // fullwidth solidus
        1 => Just("\u{2024}".to_string()), // one dot leader
        1 => Just("ä".to_string()),
        1 => Just("K".to_string()),        // Kelvin sign, looks like K
        1 => Just(":".to_string()),
        1 => Just("x".repeat(60)),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

fn file_like() -> impl Strategy<Value = String> {
    let ext = prop_oneof![
        Just(".m3u8"),
        Just(".ts"),
        Just(".TS"),
        Just(".m3u8.tmp"),
        Just(".ts.tmp"),
        Just(".mp4"),
        Just("."),
        Just(""),
        Just(".m3u"),
        Just("..ts"),
        Just(".ts\0"),
        Just(".ts/"),
    ];
    (id_like(), ext).prop_map(|(stem, ext)| format!("{stem}{ext}"))
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn channel_id_accepts_exactly_the_pattern(s in prop_oneof![id_like(), any::<String>()]) {
        prop_assert_eq!(validate::channel_id(&s).is_ok(), model_channel_id(&s), "{:?}", s);
    }

    #[test]
    fn every_valid_channel_id_is_accepted(s in "[A-Za-z0-9_-]{1,64}") {
        prop_assert!(validate::channel_id(&s).is_ok(), "{:?}", s);
    }

    #[test]
    fn hls_file_accepts_exactly_the_pattern(s in prop_oneof![file_like(), any::<String>()]) {
        prop_assert_eq!(validate::hls_file(&s).ok(), model_hls_file(&s), "{:?}", s);
    }

    #[test]
    fn every_valid_hls_file_is_accepted(
        stem in "[A-Za-z0-9_-]{1,64}",
        playlist in any::<bool>(),
    ) {
        let (name, want) = if playlist {
            (format!("{stem}.m3u8"), HlsFile::Playlist)
        } else {
            (format!("{stem}.ts"), HlsFile::Segment)
        };
        prop_assert_eq!(validate::hls_file(&name), Ok(want));
    }
}

/// Schemes a hostile catalog entry might use, in the spellings FFmpeg understands.
fn scheme() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(DEFAULT_ALLOWED_SCHEMES).prop_map(str::to_string),
        1 => prop::sample::select(DEFAULT_ALLOWED_SCHEMES).prop_map(|s| s.to_ascii_uppercase()),
        1 => prop::sample::select(vec![
            "file", "concat", "subfile", "data", "pipe", "fd", "gopher", "cache", "async", "crypto",
            "hls", "tee", "unix", "ftp", "http+file", "concat:http", "subfile,,start,0,end,1,,:http",
            "-http", " http", "ht tp", "http\n", "",
        ])
        .prop_map(str::to_string),
        1 => "[a-z+.-]{0,8}",
    ]
}

/// URL-ish strings: a scheme, a separator, an authority and a path, each of which may be hostile.
fn url_like() -> impl Strategy<Value = String> {
    let sep = prop_oneof![
        6 => Just("://"),
        1 => Just(":"),
        1 => Just(":/"),
        1 => Just(":///"),
        1 => Just(""),
    ];
    let lead = prop_oneof![
        8 => Just(""),
        1 => Just("-"),
        1 => Just(" "),
        1 => Just("\t"),
        1 => Just("-i "),
    ];
    let host = prop_oneof![
        6 => "[a-z0-9.-]{1,16}(:[0-9]{1,5})?",
        1 => Just(String::new()),
        1 => Just(":8080".to_string()),
        1 => Just("u:p@".to_string()),
        1 => Just("u:p@h".to_string()),
        1 => Just("127.0.0.1".to_string()),
    ];
    let path_piece = prop_oneof![
        8 => "[A-Za-z0-9/_.,=?&%~-]{0,12}",
        1 => Just("\r\nX-Evil: 1".to_string()),
        1 => Just("\n".to_string()),
        1 => Just(" ".to_string()),
        1 => Just("\u{0}".to_string()),
        1 => Just("\u{7f}".to_string()),
        1 => Just("\u{85}".to_string()),   // NEXT LINE, a Unicode line break
        1 => Just("\u{2028}".to_string()), // LINE SEPARATOR
        1 => Just("\u{a0}".to_string()),   // no-break space
        1 => Just("|file:///etc/passwd".to_string()),
        1 => Just("ä".to_string()),
    ];
    let path = prop::collection::vec(path_piece, 0..4).prop_map(|v| v.concat());
    (lead, scheme(), sep, host, path)
        .prop_map(|(lead, scheme, sep, host, path)| format!("{lead}{scheme}{sep}{host}{path}"))
}

/// What an accepted upstream URL must never be, whatever the validator's own logic.
fn assert_safe_if_accepted(url: &str, allowed: &[&str]) -> Result<(), TestCaseError> {
    if validate::upstream_url(url, allowed).is_err() {
        return Ok(());
    }
    prop_assert!(
        !url.starts_with('-'),
        "accepted an FFmpeg option: {:?}",
        url
    );
    prop_assert!(
        !url.chars().any(|c| c.is_whitespace() || c.is_control()),
        "accepted whitespace or control characters: {:?}",
        url
    );
    prop_assert!(url.len() <= 2048, "accepted {} bytes", url.len());
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(TestCaseError::fail(format!(
            "accepted without scheme://: {url:?}"
        )));
    };
    let lower = scheme.to_ascii_lowercase();
    prop_assert!(
        allowed.contains(&lower.as_str()),
        "accepted scheme {:?} outside {:?}: {:?}",
        scheme,
        allowed,
        url
    );
    // FFmpeg picks the protocol from the text before the first ':' (or a ',' option list): that
    // too must be the allowed scheme, so no `concat:`/`subfile,` prefix can hide in front of it.
    let ffmpeg_proto: String = url.chars().take_while(|c| *c != ':' && *c != ',').collect();
    prop_assert_eq!(ffmpeg_proto.to_ascii_lowercase(), lower);
    prop_assert!(
        !rest.is_empty() && !rest.starts_with('/'),
        "accepted without a host: {:?}",
        url
    );
    Ok(())
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn accepted_upstream_urls_are_never_options_control_chars_or_foreign_schemes(
        url in prop_oneof![url_like(), any::<String>()],
    ) {
        assert_safe_if_accepted(&url, DEFAULT_ALLOWED_SCHEMES)?;
    }

    #[test]
    fn the_allowed_list_comes_from_the_caller(
        url in url_like(),
        allowed in prop::sample::subsequence(DEFAULT_ALLOWED_SCHEMES.to_vec(), 0..=3),
    ) {
        assert_safe_if_accepted(&url, &allowed)?;
    }

    #[test]
    fn well_formed_urls_with_allowed_schemes_are_accepted(
        scheme in prop::sample::select(DEFAULT_ALLOWED_SCHEMES),
        host in "[a-z0-9]{1,12}(\\.[a-z0-9]{1,12}){0,3}",
        port in prop::option::of(1u16..),
        path in "(/[A-Za-z0-9_.~-]{0,12}){0,4}(\\?[a-z]{1,5}=[A-Za-z0-9]{0,8})?",
    ) {
        let port = port.map(|p| format!(":{p}")).unwrap_or_default();
        let url = format!("{scheme}://{host}{port}{path}");
        prop_assert!(
            validate::upstream_url(&url, DEFAULT_ALLOWED_SCHEMES).is_ok(),
            "{:?}: {:?}",
            url,
            validate::upstream_url(&url, DEFAULT_ALLOWED_SCHEMES)
        );
    }

    #[test]
    fn node_ids_never_contain_a_colon_or_a_separator(s in prop_oneof![id_like(), any::<String>()]) {
        if validate::node_id(&s).is_ok() {
            prop_assert!(!s.contains(':') && !s.contains('/') && s != "." && s != "..", "{:?}", s);
            prop_assert!((1..=64).contains(&s.len()));
        }
    }
}
