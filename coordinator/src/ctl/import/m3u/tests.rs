//! The importer's unit tests: the parser on provider-style lists, every kind of bad line, slugs, and
//! the invariants on noise.

use super::*;
use farm_proto::validate::DEFAULT_ALLOWED_SCHEMES;

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
    let v = ok("#EXTM3U\n#EXTINF:-1,A\nhttp://x/a\n\u{feff}#EXTM3U\n#EXTINF:-1,B\nhttp://x/b\n");
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
