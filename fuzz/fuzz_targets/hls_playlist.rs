//! `farm_tests::hls::MediaPlaylist::parse`, the test harness's reading of a playlist: never panics,
//! and what it returns is consistent (sequence numbers follow the media sequence, durations are
//! finite and not negative).
#![no_main]

use farm_tests::hls::MediaPlaylist;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(p) = MediaPlaylist::parse(&text) else {
        return;
    };
    for (i, s) in p.segments.iter().enumerate() {
        assert_eq!(Some(s.sequence), p.media_sequence.checked_add(i as u64));
        assert!(s.duration.is_finite() && s.duration >= 0.0);
        assert!(!s.uri.is_empty() && !s.uri.starts_with('#'));
    }
    let _ = p.total_duration();
    let _ = p.last_sequence();
});
