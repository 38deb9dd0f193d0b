use super::*;

fn seg(gen: u64, seq: u64, d: f64) -> FfmpegSegment {
    FfmpegSegment {
        seq,
        duration: d,
        file: segment_file(gen, seq),
    }
}

fn lines(t: &Timeline) -> Vec<String> {
    String::from_utf8(t.text().to_vec())
        .expect("utf8")
        .lines()
        .map(str::to_string)
        .collect()
}

fn tag(t: &Timeline, name: &str) -> String {
    lines(t)
        .into_iter()
        .find_map(|l| l.strip_prefix(name).map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn segment_file_names_round_trip_and_refuse_others() {
    assert_eq!(segment_file(7, 106), "seg_7_106.ts");
    assert_eq!(parse_segment_file("seg_7_106.ts"), Some((7, 106)));
    for bad in [
        "seg_7.ts",
        "seg__1.ts",
        "seg_7_1.ts.tmp",
        "seg_a_1.ts",
        "seg_1_+2.ts",
        "index.m3u8",
        "seg_1_99999999999999999999999.ts",
    ] {
        assert_eq!(parse_segment_file(bad), None, "{bad}");
    }
}

#[test]
fn ffmpeg_playlists_parse_into_our_segments_only() {
    let text = "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXT-X-MEDIA-SEQUENCE:4\n#EXTINF:1.001000,\nseg_3_4.ts\n#EXT-X-DISCONTINUITY\n#EXTINF:2.000000,\n/abs/dir/seg_3_5.ts\n#EXTINF:nan,\nseg_3_6.ts\n#EXTINF:2.0,\nother.ts\n";
    let s = parse_ffmpeg(text);
    assert_eq!(s, vec![seg(3, 4, 1.001), seg(3, 5, 2.0)]);
}

#[test]
fn the_target_duration_is_chosen_once_and_bounds_every_extinf() {
    assert_eq!(choose_target(2.0, 1.0), 2, "1 s GOP: 2 s segments");
    assert_eq!(choose_target(2.0, 1.04), 2);
    assert_eq!(choose_target(2.0, 4.0), 4, "4 s GOP: 4 s segments");
    assert_eq!(choose_target(2.0, 1.92), 4, "1.92 s GOP: 3.84 s segments");
    assert_eq!(choose_target(2.0, 0.5), 2);
    assert_eq!(choose_target(1.0, 0.5), 1);
    assert_eq!(choose_target(2.0, 500.0), MAX_TARGET);

    let mut t = Timeline::new(Duration::from_secs(2), 3, &Recorded::default());
    assert_eq!(
        t.ingest(&[seg(1, 0, 1.0)], 10_000).added,
        0,
        "1 s listed: not yet"
    );
    assert_eq!(
        t.ingest(&[seg(1, 0, 1.0), seg(1, 1, 1.0)], 11_000).added,
        0,
        "2 s: not yet"
    );
    assert!(t.text().is_empty());
    t.ingest(&[seg(1, 0, 1.0), seg(1, 1, 1.0), seg(1, 2, 1.0)], 12_000);
    assert_eq!(tag(&t, "#EXT-X-TARGETDURATION:"), "2");
    let r = t.ingest(&[seg(1, 1, 1.0), seg(1, 2, 1.0), seg(1, 3, 2.6)], 14_600);
    assert_eq!(
        r.over_target, 1,
        "2.6 s rounds to 3 > 2: counted, not hidden"
    );
    assert_eq!(tag(&t, "#EXT-X-TARGETDURATION:"), "2", "never changes");
}

#[test]
fn window_slides_deletes_late_and_numbers_only_grow() {
    let mut t = Timeline::new(Duration::from_secs(2), 3, &Recorded::default());
    let mut listed = Vec::new();
    let mut deleted = Vec::new();
    for i in 0..8u64 {
        listed.push(seg(1, i, 2.0));
        let r = t.ingest(&listed, 1_000_000 + i * 2000);
        // The first playlist waits for 1.5 target durations of media: two segments.
        assert_eq!(r.added, [0, 2, 1, 1, 1, 1, 1, 1][i as usize], "segment {i}");
        deleted.extend(r.delete);
    }
    assert_eq!(tag(&t, "#EXT-X-MEDIA-SEQUENCE:"), "5");
    assert!(t.lists("seg_1_7.ts") && t.lists("seg_1_3.ts") && !t.lists("seg_1_2.ts"));
    assert_eq!(deleted, vec!["seg_1_0.ts", "seg_1_1.ts", "seg_1_2.ts"]);
    // Seen again: nothing new.
    assert_eq!(t.ingest(&listed, 1_100_000).added, 0);
}

#[test]
fn a_restart_is_a_discontinuity_counted_when_it_slides_out() {
    let mut t = Timeline::new(Duration::from_secs(2), 3, &Recorded::default());
    t.ingest(&[seg(1, 0, 2.0), seg(1, 1, 2.0)], 10_000);
    assert_eq!(t.next_start(Some(2)), 3, "after what FFmpeg wrote");
    t.begin_run();
    t.ingest(&[seg(1, 3, 1.0)], 20_000);
    let l = lines(&t);
    let pos = l.iter().position(|x| x == "seg_1_3.ts").expect("listed");
    assert_eq!(l[pos - 3], "#EXT-X-DISCONTINUITY");
    assert_eq!(tag(&t, "#EXT-X-DISCONTINUITY-SEQUENCE:"), "0");
    t.ingest(&[seg(1, 3, 1.0), seg(1, 4, 2.0), seg(1, 5, 2.0)], 24_000);
    // File 3 (media sequence number 2: file 2 was never published) is first now: the tag is
    // still listed, the sequence unchanged.
    assert_eq!(tag(&t, "#EXT-X-MEDIA-SEQUENCE:"), "2");
    assert_eq!(tag(&t, "#EXT-X-DISCONTINUITY-SEQUENCE:"), "0");
    t.ingest(&[seg(1, 4, 2.0), seg(1, 5, 2.0), seg(1, 6, 2.0)], 26_000);
    assert_eq!(tag(&t, "#EXT-X-DISCONTINUITY-SEQUENCE:"), "1");
    assert_eq!(t.recorded().disc, 1);
}

#[test]
fn a_new_owner_continues_the_recorded_timeline() {
    let prev = Recorded {
        target: 3,
        last: Some(41),
        disc: 2,
    };
    let mut t = Timeline::new(Duration::from_secs(2), 6, &prev);
    let start = t.next_start(None);
    assert_eq!(start, 42);
    t.ingest(&[seg(9, start, 1.0)], 50_000);
    assert_eq!(
        tag(&t, "#EXT-X-TARGETDURATION:"),
        "3",
        "the recorded target"
    );
    assert_eq!(
        tag(&t, "#EXT-X-MEDIA-SEQUENCE:"),
        "42",
        "the next number: a player aligns it on the end of what it has"
    );
    assert_eq!(tag(&t, "#EXT-X-DISCONTINUITY-SEQUENCE:"), "2");
    assert!(lines(&t).contains(&"#EXT-X-DISCONTINUITY".to_string()));
    assert_eq!(t.recorded().disc, 3);
}

#[test]
fn program_date_times_are_continuous_within_a_run_and_never_go_back() {
    let mut t = Timeline::new(Duration::from_secs(2), 6, &Recorded::default());
    t.ingest(&[seg(1, 0, 2.0), seg(1, 1, 2.0)], 1_700_000_004_000);
    t.begin_run();
    // A restarted FFmpeg reading a burst: its first segment "ended" before the last one did.
    t.ingest(&[seg(1, 2, 2.0)], 1_700_000_005_000);
    let pdts: Vec<String> = lines(&t)
        .into_iter()
        .filter_map(|l| {
            l.strip_prefix("#EXT-X-PROGRAM-DATE-TIME:")
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        pdts,
        vec![
            "2023-11-14T22:13:20.000Z",
            "2023-11-14T22:13:22.000Z",
            "2023-11-14T22:13:24.000Z"
        ]
    );
}

#[test]
fn a_fresh_timeline_starts_above_any_earlier_life() {
    // An earlier life that started at its base and published one segment per half hls_time
    // (as fast as FFmpeg cuts) for an hour stays below a base taken a moment after it ended.
    let hls = Duration::from_secs(2);
    let t0 = 1_700_000_000_000;
    let earlier_last = fresh_base(t0, hls) + 3599; // 3600 segments: base..=base + 3599
    assert!(fresh_base(t0 + 3_600_001, hls) > earlier_last);
    let mut t = Timeline::new(hls, 6, &Recorded::default()).with_fresh_base(fresh_base(t0, hls));
    assert_eq!(
        t.next_start(None),
        1_700_000_000,
        "file numbers start there too"
    );
    t.ingest(
        &[seg(1, 1_700_000_000, 2.0), seg(1, 1_700_000_001, 2.0)],
        t0,
    );
    assert_eq!(tag(&t, "#EXT-X-MEDIA-SEQUENCE:"), "1700000000");
}

#[test]
fn media_sequence_numbers_are_the_playlists_own_without_gaps() {
    let mut t = Timeline::new(Duration::from_secs(2), 6, &Recorded::default());
    t.ingest(&[seg(1, 0, 2.0), seg(1, 1, 2.0)], 10_000);
    // Segments 2 and 3 left FFmpeg's playlist unseen: 4 is published as the next number,
    // after a discontinuity.
    t.ingest(&[seg(1, 4, 2.0)], 20_000);
    let l = lines(&t);
    assert_eq!(tag(&t, "#EXT-X-MEDIA-SEQUENCE:"), "0");
    let uris: Vec<&String> = l.iter().filter(|x| x.ends_with(".ts")).collect();
    assert_eq!(uris, ["seg_1_0.ts", "seg_1_1.ts", "seg_1_4.ts"]);
    let pos = l.iter().position(|x| x == "seg_1_4.ts").expect("listed");
    assert_eq!(l[pos - 3], "#EXT-X-DISCONTINUITY");
    assert_eq!(t.last(), Some(2));
    assert_eq!(t.next_start(None), 5, "file numbers go on after 4");
}
