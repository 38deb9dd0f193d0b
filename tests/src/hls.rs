//! The HLS checker: a media playlist parser, the strict RFC 8216 checker, a player-like puller, and
//! ffprobe helpers.
//!
//! [`PlaylistChecker`] is fed every playlist fetched for one channel, in fetch order (and optionally
//! every segment body), and reports each breach of the rules a live player relies on, naming the
//! fetch and the line. [`HlsClient`] runs every fetch through its own checker and, unless made with
//! [`HlsClient::lenient`], fails the test on a violation; code that fetches playlists itself feeds
//! the process-wide checker of the channel with [`observe`].
//!
//! [`HlsClient::pull`] behaves like a live player: it reloads the playlist about every half target
//! duration, starts three segments from the live edge, follows media sequence numbers, downloads each
//! new segment once and reports what it saw (gaps, failed downloads, sequence resets, HTTP statuses,
//! the longest wall-clock wait between new segments). Its reload sleeps are a player's pacing, not
//! test synchronisation.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use reqwest::Url;

/// One `#EXTINF` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// URI as written in the playlist (usually relative).
    pub uri: String,
    /// `#EXTINF` duration in seconds.
    pub duration: f64,
    /// Media sequence number: `#EXT-X-MEDIA-SEQUENCE` + index.
    pub sequence: u64,
    /// Preceded by `#EXT-X-DISCONTINUITY`.
    pub discontinuity: bool,
    /// Discontinuity sequence number (RFC 8216 6.2.2): `#EXT-X-DISCONTINUITY-SEQUENCE` + the
    /// `#EXT-X-DISCONTINUITY` tags before and at this segment in this playlist.
    pub discontinuity_number: u64,
    /// `#EXT-X-PROGRAM-DATE-TIME` written for this segment, as Unix milliseconds (`None` when the
    /// segment has no tag of its own).
    pub program_date_time: Option<i64>,
    /// 1-based line of the `#EXTINF` tag.
    pub extinf_line: usize,
    /// 1-based line of the URI.
    pub line: usize,
}

/// A parsed HLS media playlist.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaPlaylist {
    pub version: Option<u32>,
    /// `#EXT-X-TARGETDURATION`, seconds.
    pub target_duration: u64,
    /// 1-based line of `#EXT-X-TARGETDURATION`.
    pub target_duration_line: usize,
    /// `#EXT-X-MEDIA-SEQUENCE` (0 if absent).
    pub media_sequence: u64,
    /// 1-based line of `#EXT-X-MEDIA-SEQUENCE`, if present.
    pub media_sequence_line: Option<usize>,
    /// `#EXT-X-DISCONTINUITY-SEQUENCE` (0 if absent).
    pub discontinuity_sequence: u64,
    pub segments: Vec<Segment>,
    /// `#EXT-X-ENDLIST` present.
    pub endlist: bool,
    /// 1-based line of `#EXT-X-ENDLIST`, if present.
    pub endlist_line: Option<usize>,
    /// Breaches of RFC 8216 visible in this playlist alone that do not stop it from being read
    /// (a tag given twice, a playlist-wide tag after the first segment, a decimal `#EXTINF` under
    /// `#EXT-X-VERSION` < 3): `(line, message)`. [`PlaylistChecker`] reports them.
    pub issues: Vec<(usize, String)>,
}

impl MediaPlaylist {
    /// Parses a media playlist. Errors (naming the line) on a missing `#EXTM3U`, a master playlist,
    /// a missing or bad `#EXT-X-TARGETDURATION`, a bad `#EXTINF`, `#EXT-X-MEDIA-SEQUENCE`,
    /// `#EXT-X-DISCONTINUITY-SEQUENCE`, `#EXT-X-VERSION` or `#EXT-X-PROGRAM-DATE-TIME`, or an
    /// `#EXTINF` without a URI.
    pub fn parse(text: &str) -> Result<MediaPlaylist, String> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty());
        match lines.next() {
            Some((_, "#EXTM3U")) => {}
            Some((n, other)) => return Err(format!("line {n}: {other:?}, not #EXTM3U")),
            None => return Err("empty playlist".into()),
        }
        let mut version: Option<u32> = None;
        let mut target: Option<(u64, usize)> = None;
        let mut media_sequence: Option<(u64, usize)> = None;
        let mut discontinuity_sequence: Option<(u64, usize)> = None;
        let mut endlist_line = None;
        let mut issues = Vec::new();
        // The pending segment's tags: (duration, #EXTINF line), #EXT-X-DISCONTINUITY, date-time.
        let mut pending: Option<(f64, usize)> = None;
        let mut discontinuity = false;
        let mut date_time: Option<i64> = None;
        let mut decimal_extinf: Option<usize> = None;
        let mut discontinuities = 0u64;
        // Sequence and discontinuity numbers are relative until the end: the tags that set their
        // bases may come late (an issue, but the playlist still reads).
        let mut segments: Vec<Segment> = Vec::new();
        for (n, line) in lines {
            let once = |seen: bool, tag: &str, issues: &mut Vec<(usize, String)>| {
                if seen {
                    issues.push((n, format!("{tag} appears twice (RFC 8216 4.3.3)")));
                }
            };
            let before_segments = |tag: &str, issues: &mut Vec<(usize, String)>, segs: usize| {
                if segs > 0 || pending.is_some() {
                    issues.push((
                        n,
                        format!("{tag} after the first media segment (RFC 8216 4.3.3)"),
                    ));
                }
            };
            if let Some(v) = line.strip_prefix("#EXT-X-TARGETDURATION:") {
                once(target.is_some(), "#EXT-X-TARGETDURATION", &mut issues);
                let d = v
                    .trim()
                    .parse::<u64>()
                    .map_err(|e| format!("line {n}: bad #EXT-X-TARGETDURATION {v:?}: {e}"))?;
                target = Some((d, n));
            } else if let Some(v) = line.strip_prefix("#EXT-X-MEDIA-SEQUENCE:") {
                once(
                    media_sequence.is_some(),
                    "#EXT-X-MEDIA-SEQUENCE",
                    &mut issues,
                );
                before_segments("#EXT-X-MEDIA-SEQUENCE", &mut issues, segments.len());
                let s = v
                    .trim()
                    .parse()
                    .map_err(|e| format!("line {n}: bad #EXT-X-MEDIA-SEQUENCE {v:?}: {e}"))?;
                media_sequence = Some((s, n));
            } else if let Some(v) = line.strip_prefix("#EXT-X-DISCONTINUITY-SEQUENCE:") {
                once(
                    discontinuity_sequence.is_some(),
                    "#EXT-X-DISCONTINUITY-SEQUENCE",
                    &mut issues,
                );
                before_segments("#EXT-X-DISCONTINUITY-SEQUENCE", &mut issues, segments.len());
                let s = v.trim().parse().map_err(|e| {
                    format!("line {n}: bad #EXT-X-DISCONTINUITY-SEQUENCE {v:?}: {e}")
                })?;
                discontinuity_sequence = Some((s, n));
            } else if let Some(v) = line.strip_prefix("#EXT-X-VERSION:") {
                once(version.is_some(), "#EXT-X-VERSION", &mut issues);
                version = Some(
                    v.trim()
                        .parse()
                        .map_err(|e| format!("line {n}: bad #EXT-X-VERSION {v:?}: {e}"))?,
                );
            } else if let Some(v) = line.strip_prefix("#EXT-X-PROGRAM-DATE-TIME:") {
                let ms = parse_date_time(v.trim())
                    .ok_or_else(|| format!("line {n}: bad #EXT-X-PROGRAM-DATE-TIME {v:?}"))?;
                date_time = Some(ms);
            } else if let Some(v) = line.strip_prefix("#EXTINF:") {
                let d = v.split_once(',').map_or(v, |(d, _)| d).trim();
                let secs: f64 = d
                    .parse()
                    .map_err(|e| format!("line {n}: bad #EXTINF {v:?}: {e}"))?;
                if !secs.is_finite() || secs < 0.0 {
                    return Err(format!("line {n}: bad #EXTINF duration {secs}"));
                }
                if d.contains(['.', 'e', 'E']) {
                    decimal_extinf.get_or_insert(n);
                }
                if pending.replace((secs, n)).is_some() {
                    return Err(format!(
                        "line {n}: two #EXTINF lines without a URI between them"
                    ));
                }
            } else if line == "#EXT-X-ENDLIST" {
                endlist_line = Some(n);
            } else if line == "#EXT-X-DISCONTINUITY" {
                discontinuity = true;
            } else if line.starts_with("#EXT-X-STREAM-INF") {
                return Err(format!("line {n}: master playlist, not a media playlist"));
            } else if line.starts_with('#') {
                // Other tags and comments are not needed by the tests.
            } else {
                let (secs, extinf_line) = pending
                    .take()
                    .ok_or_else(|| format!("line {n}: URI {line:?} without #EXTINF"))?;
                let disc = std::mem::take(&mut discontinuity);
                discontinuities += u64::from(disc);
                segments.push(Segment {
                    uri: line.to_string(),
                    duration: secs,
                    sequence: segments.len() as u64,
                    discontinuity: disc,
                    discontinuity_number: discontinuities,
                    program_date_time: date_time.take(),
                    extinf_line,
                    line: n,
                });
            }
        }
        if let Some((_, n)) = pending {
            return Err(format!("line {n}: #EXTINF without a URI at the end"));
        }
        let (target_duration, target_duration_line) =
            target.ok_or("missing #EXT-X-TARGETDURATION")?;
        if let Some(n) = decimal_extinf {
            if version.unwrap_or(1) < 3 {
                issues.push((
                    n,
                    format!(
                        "decimal #EXTINF duration needs #EXT-X-VERSION 3 or more, the playlist says {} (RFC 8216 7)",
                        version.map_or("nothing (1)".to_string(), |v| v.to_string())
                    ),
                ));
            }
        }
        let media_sequence_line = media_sequence.map(|(_, n)| n);
        let media_sequence = media_sequence.map_or(0, |(s, _)| s);
        let discontinuity_sequence = discontinuity_sequence.map_or(0, |(s, _)| s);
        for seg in &mut segments {
            seg.sequence = media_sequence
                .checked_add(seg.sequence)
                .ok_or("#EXT-X-MEDIA-SEQUENCE overflows with the listed segments")?;
            seg.discontinuity_number = discontinuity_sequence
                .checked_add(seg.discontinuity_number)
                .ok_or("#EXT-X-DISCONTINUITY-SEQUENCE overflows")?;
        }
        Ok(MediaPlaylist {
            version,
            target_duration,
            target_duration_line,
            media_sequence,
            media_sequence_line,
            discontinuity_sequence,
            segments,
            endlist: endlist_line.is_some(),
            endlist_line,
            issues,
        })
    }

    /// Sequence number of the last segment, if any.
    pub fn last_sequence(&self) -> Option<u64> {
        self.segments.last().map(|s| s.sequence)
    }

    /// Sum of the segment durations, seconds.
    pub fn total_duration(&self) -> f64 {
        self.segments.iter().map(|s| s.duration).sum()
    }
}

/// Parses an RFC 3339 / ISO 8601 date-time as HLS writes it (`2024-05-01T12:00:00.123Z`,
/// `+02:00`, or FFmpeg's `+0000`) into Unix milliseconds. `None` if it is not one.
pub fn parse_date_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let sep = |i: usize, c: &[u8]| b.get(i).is_some_and(|x| c.contains(x));
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if sep(i, b".") {
        let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        let frac = &s[i + 1..i + 1 + digits];
        let first3: String = frac.chars().chain("000".chars()).take(3).collect();
        millis = first3.parse().ok()?;
        i += 1 + digits;
    }
    let offset_min = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&c @ (b'+' | b'-')) => {
            let (h, m) = match b.len() - i - 1 {
                5 if sep(i + 3, b":") => (num(i + 1..i + 3)?, num(i + 4..i + 6)?),
                4 => (num(i + 1..i + 3)?, num(i + 3..i + 5)?),
                2 => (num(i + 1..i + 3)?, 0),
                _ => return None,
            };
            if h > 23 || m > 59 {
                return None;
            }
            let o = h * 60 + m;
            if c == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    // Days from the civil date (H. Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset_min * 60;
    Some(secs * 1000 + millis)
}

/// One breach of the HLS rules found by [`PlaylistChecker`]: which fetch, which line, what.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// 1-based number of the playlist fetch (within its checker) that showed it; for a segment,
    /// the playlist fetch that preceded the segment's download.
    pub fetch: u64,
    /// 1-based line in that playlist, when the breach is on one line.
    pub line: Option<usize>,
    /// What was fetched (the playlist or segment URL, as the observer gave it).
    pub url: String,
    /// When the fetch was made: since the checker's first fetch, or on the clock of the caller
    /// that gave it.
    pub at: Duration,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fetch {} (+{:.1}s {})",
            self.fetch,
            self.at.as_secs_f64(),
            self.url
        )?;
        if let Some(line) = self.line {
            write!(f, " line {line}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What the checker remembers about one media sequence number.
#[derive(Debug, Clone)]
struct SeenSegment {
    uri: String,
    duration: f64,
    discontinuity_number: u64,
    program_date_time: Option<i64>,
    fetch: u64,
}

/// What the checker remembers about one segment body.
#[derive(Debug, Clone, Copy)]
struct SeenBody {
    len: u64,
    digest: u32,
    fetch: u64,
}

/// How many violations a checker keeps (the count goes on).
const MAX_VIOLATIONS: usize = 200;

/// The strict, stateful RFC 8216 checker for one live channel.
///
/// Feed it every playlist fetched for the channel, in the order the fetches were made
/// ([`PlaylistChecker::observe_playlist`]), and optionally every segment body fetched
/// ([`PlaylistChecker::observe_segment`]). It reports, naming the fetch and the line:
/// - a playlist that does not parse, a tag given twice, a playlist-wide tag after a segment, a
///   decimal `#EXTINF` under a version below 3, an `#EXT-X-ENDLIST` (the farm's playlists are live);
/// - `#EXT-X-TARGETDURATION` different from the previous fetch's (players keep the first one);
/// - an `#EXTINF` that, rounded to the nearest integer, exceeds the target duration (4.3.3.1);
/// - `#EXT-X-MEDIA-SEQUENCE` lower than at the previous fetch;
/// - one media sequence number listed with two URIs, two durations or two program date-times, or
///   one URI listed for two sequence numbers, across all fetches (6.2.1: a server only appends
///   segments and removes them from the front);
/// - a segment whose discontinuity number (6.2.2: `#EXT-X-DISCONTINUITY-SEQUENCE` + the
///   `#EXT-X-DISCONTINUITY` tags before and at it) differs from an earlier fetch's, or is lower
///   than that of a lower sequence number, or higher than that of a higher one;
/// - a segment URI served with different bytes at two fetches.
///
/// URIs are compared as written in the playlist, so fetches of one channel through different
/// nodes or nginx share one history. A segment that disagrees with its history is reported once
/// per rule, a target duration once per change.
#[derive(Debug, Clone)]
pub struct PlaylistChecker {
    started: Option<Instant>,
    fetches: u64,
    segment_fetches: u64,
    target: Option<(u64, u64)>,
    last_media_sequence: Option<(u64, u64)>,
    by_sequence: BTreeMap<u64, SeenSegment>,
    sequence_by_uri: HashMap<String, (u64, u64)>,
    bodies: HashMap<String, SeenBody>,
    /// (sequence number, rule) already reported: a segment that disagrees with its history does so
    /// at every fetch that lists it, once is enough.
    reported: HashSet<(u64, &'static str)>,
    violations: Vec<Violation>,
    total_violations: u64,
    /// Text of the first playlist with a violation, and of the fetch before it.
    first_bad: Option<(u64, String, Option<String>)>,
    last_text: Option<String>,
}

impl Default for PlaylistChecker {
    fn default() -> Self {
        PlaylistChecker::new()
    }
}

impl PlaylistChecker {
    pub fn new() -> PlaylistChecker {
        PlaylistChecker {
            started: None,
            fetches: 0,
            segment_fetches: 0,
            target: None,
            last_media_sequence: None,
            by_sequence: BTreeMap::new(),
            sequence_by_uri: HashMap::new(),
            bodies: HashMap::new(),
            reported: HashSet::new(),
            violations: Vec::new(),
            total_violations: 0,
            first_bad: None,
            last_text: None,
        }
    }

    /// Playlists observed so far.
    pub fn fetches(&self) -> u64 {
        self.fetches
    }

    /// Segment bodies observed so far.
    pub fn segment_fetches(&self) -> u64 {
        self.segment_fetches
    }

    /// The violations kept (the first [`MAX_VIOLATIONS`]).
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// Every violation found, also those not kept.
    pub fn total_violations(&self) -> u64 {
        self.total_violations
    }

    /// Time since the first observation.
    fn elapsed(&mut self) -> Duration {
        let now = Instant::now();
        now - *self.started.get_or_insert(now)
    }

    /// Checks one playlist body fetched (with a 200) from `url`; returns the violations it shows.
    pub fn observe_playlist(&mut self, url: &str, text: &str) -> Vec<Violation> {
        let at = self.elapsed();
        self.observe_playlist_at(url, text, at)
    }

    /// Like [`PlaylistChecker::observe_playlist`] for a fetch made at `at` on the caller's clock
    /// (e.g. a browser's, since the player started).
    pub fn observe_playlist_at(&mut self, url: &str, text: &str, at: Duration) -> Vec<Violation> {
        self.fetches += 1;
        let fetch = self.fetches;
        let mut found = Vec::new();
        let mut v = |line: Option<usize>, message: String| {
            found.push(Violation {
                fetch,
                line,
                url: url.to_string(),
                at,
                message,
            });
        };
        match MediaPlaylist::parse(text) {
            Err(e) => v(None, format!("does not parse: {e}")),
            Ok(p) => self.check_playlist(&p, fetch, &mut v),
        }
        if !found.is_empty() && self.first_bad.is_none() {
            self.first_bad = Some((fetch, text.to_string(), self.last_text.take()));
        }
        self.last_text = Some(text.to_string());
        self.keep(&found);
        found
    }

    fn check_playlist(
        &mut self,
        p: &MediaPlaylist,
        fetch: u64,
        v: &mut impl FnMut(Option<usize>, String),
    ) {
        for (line, issue) in &p.issues {
            v(Some(*line), issue.clone());
        }
        if let Some(line) = p.endlist_line {
            v(
                Some(line),
                "#EXT-X-ENDLIST in a live playlist: the player stops at its end".into(),
            );
        }
        match self.target {
            Some((t, since)) if t != p.target_duration => v(
                Some(p.target_duration_line),
                format!(
                    "#EXT-X-TARGETDURATION:{} but it was {t} since fetch {since}; it must not change (RFC 8216 6.2.1, players keep the first)",
                    p.target_duration
                ),
            ),
            _ => {}
        }
        if self.target.is_none_or(|(t, _)| t != p.target_duration) {
            self.target = Some((p.target_duration, fetch));
        }
        if let Some((last, at)) = self.last_media_sequence {
            if p.media_sequence < last {
                v(
                    p.media_sequence_line,
                    format!(
                        "#EXT-X-MEDIA-SEQUENCE went back from {last} (fetch {at}) to {}",
                        p.media_sequence
                    ),
                );
            }
        }
        self.last_media_sequence = Some((p.media_sequence, fetch));
        for seg in &p.segments {
            let rounded = seg.duration.round();
            if rounded > p.target_duration as f64 {
                v(
                    Some(seg.extinf_line),
                    format!(
                        "#EXTINF:{} (sequence {}) rounds to {rounded}, above #EXT-X-TARGETDURATION:{} (RFC 8216 4.3.3.1)",
                        seg.duration, seg.sequence, p.target_duration
                    ),
                );
            }
            self.check_segment(seg, fetch, v);
        }
    }

    fn check_segment(
        &mut self,
        seg: &Segment,
        fetch: u64,
        v: &mut impl FnMut(Option<usize>, String),
    ) {
        let n = seg.sequence;
        let reported = &mut self.reported;
        let mut once = |rule: &'static str, line: usize, message: String| {
            if reported.insert((n, rule)) {
                v(Some(line), message);
            }
        };
        match self.sequence_by_uri.get(&seg.uri) {
            Some(&(other, at)) if other != n => once(
                "uri",
                seg.line,
                format!(
                    "URI {} listed as sequence {n}, but it was sequence {other} at fetch {at}: a URI names one segment for ever",
                    seg.uri
                ),
            ),
            Some(_) => {}
            None => {
                self.sequence_by_uri.insert(seg.uri.clone(), (n, fetch));
            }
        }
        if let Some(old) = self.by_sequence.get(&n) {
            if old.uri != seg.uri {
                once(
                    "sequence",
                    seg.line,
                    format!(
                        "sequence {n} is {} but it was {} at fetch {}",
                        seg.uri, old.uri, old.fetch
                    ),
                );
            }
            if (old.duration - seg.duration).abs() > 1e-6 {
                once(
                    "duration",
                    seg.extinf_line,
                    format!(
                        "sequence {n} has #EXTINF:{} but had {} at fetch {} (a listed segment must not change)",
                        seg.duration, old.duration, old.fetch
                    ),
                );
            }
            if old.discontinuity_number != seg.discontinuity_number {
                once(
                    "discontinuity",
                    seg.line,
                    format!(
                        "sequence {n} is in discontinuity {} but was in {} at fetch {} (RFC 8216 6.2.2: a removed #EXT-X-DISCONTINUITY must increment #EXT-X-DISCONTINUITY-SEQUENCE)",
                        seg.discontinuity_number, old.discontinuity_number, old.fetch
                    ),
                );
            }
            if let (Some(a), Some(b)) = (old.program_date_time, seg.program_date_time) {
                if a != b {
                    once(
                        "date-time",
                        seg.extinf_line,
                        format!(
                            "sequence {n} has #EXT-X-PROGRAM-DATE-TIME {b} ms but had {a} ms at fetch {}",
                            old.fetch
                        ),
                    );
                }
            }
            return;
        }
        // A new sequence number: its discontinuity number must fit between its neighbours'.
        if let Some((&m, lower)) = self.by_sequence.range(..n).next_back() {
            if lower.discontinuity_number > seg.discontinuity_number {
                once(
                    "discontinuity order",
                    seg.line,
                    format!(
                        "sequence {n} is in discontinuity {}, below sequence {m}'s {} (fetch {}): discontinuity numbers never decrease",
                        seg.discontinuity_number, lower.discontinuity_number, lower.fetch
                    ),
                );
            }
        }
        if let Some((&m, higher)) = self.by_sequence.range(n + 1..).next() {
            if higher.discontinuity_number < seg.discontinuity_number {
                once(
                    "discontinuity order",
                    seg.line,
                    format!(
                        "sequence {n} is in discontinuity {}, above sequence {m}'s {} (fetch {}): discontinuity numbers never decrease",
                        seg.discontinuity_number, higher.discontinuity_number, higher.fetch
                    ),
                );
            }
        }
        self.by_sequence.insert(
            n,
            SeenSegment {
                uri: seg.uri.clone(),
                duration: seg.duration,
                discontinuity_number: seg.discontinuity_number,
                program_date_time: seg.program_date_time,
                fetch,
            },
        );
    }

    /// Checks one segment body fetched from `url`; `uri` is the segment's URI as written in the
    /// playlist. Returns the violation if the same URI was served with other bytes before.
    pub fn observe_segment(&mut self, uri: &str, url: &str, body: &[u8]) -> Option<Violation> {
        let at = self.elapsed();
        self.observe_segment_digest(uri, url, body.len() as u64, digest(body), at)
    }

    /// Like [`PlaylistChecker::observe_segment`] with the body's length and [`digest`] (from a
    /// browser, which sends no bodies), fetched at `at` on the caller's clock.
    pub fn observe_segment_digest(
        &mut self,
        uri: &str,
        url: &str,
        len: u64,
        digest: u32,
        at: Duration,
    ) -> Option<Violation> {
        self.segment_fetches += 1;
        let seen = SeenBody {
            len,
            digest,
            fetch: self.fetches,
        };
        let old = *self.bodies.entry(uri.to_string()).or_insert(seen);
        if old.len == len && old.digest == digest {
            return None;
        }
        let found = Violation {
            fetch: self.fetches,
            line: None,
            url: url.to_string(),
            at,
            message: format!(
                "segment {uri} served with other bytes ({len} bytes, digest {digest:08x}) than after fetch {} ({} bytes, digest {:08x}): a URI names one segment for ever",
                old.fetch, old.len, old.digest
            ),
        };
        self.keep(std::slice::from_ref(&found));
        Some(found)
    }

    fn keep(&mut self, found: &[Violation]) {
        self.total_violations += found.len() as u64;
        let room = MAX_VIOLATIONS.saturating_sub(self.violations.len());
        self.violations.extend(found.iter().take(room).cloned());
    }

    /// A report of every violation kept, with the first bad playlist and the one fetched before
    /// it; empty when there is none.
    pub fn summary(&self) -> String {
        if self.total_violations == 0 {
            return String::new();
        }
        let mut out = format!(
            "{} RFC 8216 violation(s) in {} playlist and {} segment fetches:\n",
            self.total_violations, self.fetches, self.segment_fetches
        );
        for v in self.violations.iter().take(40) {
            out += &format!("  {v}\n");
        }
        if self.violations.len() > 40 {
            out += &format!("  ... {} more\n", self.total_violations - 40);
        }
        if let Some((fetch, text, before)) = &self.first_bad {
            if let Some(before) = before {
                out += &format!("--- fetch {} ---\n{}", fetch - 1, numbered(before));
            }
            out += &format!("--- fetch {fetch} ---\n{}", numbered(text));
        }
        out
    }
}

fn numbered(text: &str) -> String {
    text.lines()
        .enumerate()
        .map(|(i, l)| format!("{:>4} {l}\n", i + 1))
        .collect()
}

/// The digest [`PlaylistChecker`] compares segment bodies by: 32-bit FNV-1a (the browser player
/// computes the same in `tests/player/player.js`). With the length, enough to tell two bodies apart.
pub fn digest(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The process-wide checkers behind [`observe`], one per channel.
fn registry() -> &'static Mutex<HashMap<String, PlaylistChecker>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, PlaylistChecker>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// The channel a playlist or segment URL belongs to: the path's folder
/// (`/live/[<token>/]<id>/index.m3u8` → `<id>`), so fetches through any node or nginx share one
/// checker. Falls back to the whole path.
pub fn channel_key(url: &str) -> String {
    let path = Url::parse(url).map_or_else(|_| url.to_string(), |u| u.path().to_string());
    let mut parts = path.rsplit('/');
    let _file = parts.next();
    match parts.next() {
        Some(dir) if !dir.is_empty() => dir.to_string(),
        _ => path,
    }
}

/// Feeds one playlist body fetched (with a 200) from `playlist_url` to the process-wide checker
/// of its channel ([`channel_key`]) and panics with the violations it shows, so a test that
/// fetches playlists itself gets the same strict check as [`HlsClient`] with one line:
/// `farm_tests::hls::observe(&url, &body);`.
///
/// Fetches count in the order `observe` is called: feed it from one sequence of fetches (one
/// viewer loop). nextest runs each test in its own process, so the registry is per test.
pub fn observe(playlist_url: &str, body: &str) {
    let found = try_observe(playlist_url, body);
    if !found.is_empty() {
        let key = channel_key(playlist_url);
        panic!(
            "playlist of channel {key:?} breaks RFC 8216:\n{}",
            lock(registry())
                .get(&key)
                .map(PlaylistChecker::summary)
                .unwrap_or_default()
        );
    }
}

/// [`observe`] without the panic: returns the new violations.
pub fn try_observe(playlist_url: &str, body: &str) -> Vec<Violation> {
    lock(registry())
        .entry(channel_key(playlist_url))
        .or_default()
        .observe_playlist(playlist_url, body)
}

/// Feeds one segment body fetched from `segment_url` (its URI in the playlist is the URL's file
/// name) to the checker of its channel; panics if the URI was served with other bytes before.
pub fn observe_segment(segment_url: &str, body: &[u8]) {
    let path =
        Url::parse(segment_url).map_or_else(|_| segment_url.to_string(), |u| u.path().to_string());
    let uri = path.rsplit('/').next().unwrap_or(&path).to_string();
    let key = channel_key(segment_url);
    let found = lock(registry())
        .entry(key.clone())
        .or_default()
        .observe_segment(&uri, segment_url, body);
    if let Some(v) = found {
        panic!("segment of channel {key:?} breaks RFC 8216: {v}");
    }
}

/// The violations the process-wide checker of this URL's channel holds so far.
pub fn observed_violations(url: &str) -> Vec<Violation> {
    lock(registry())
        .get(&channel_key(url))
        .map(|c| c.violations().to_vec())
        .unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A test that panicked while holding it left consistent data: every update is one insert.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What one [`HlsClient::pull`] saw.
#[derive(Clone, Default)]
pub struct PullReport {
    /// New segments downloaded (200).
    pub segments: u64,
    /// Sum of their `#EXTINF` durations.
    pub media_seconds: f64,
    /// Sum of their sizes.
    pub bytes: u64,
    /// Sequence numbers skipped: they left the playlist before the client saw them.
    pub gaps: u64,
    /// Segments listed but whose download failed (non-200 or error); they are not retried.
    pub failed_segments: u64,
    /// Times the media sequence went backwards (e.g. a new FFmpeg starting again from 0).
    pub sequence_resets: u64,
    /// Playlist requests made.
    pub playlist_loads: u64,
    /// Longest wall-clock time between two successive new segments.
    pub max_wall_gap_between_new_segments: Duration,
    /// Body of the last segment downloaded.
    pub last_segment: Option<Vec<u8>>,
    /// HTTP status → count, over playlist and segment requests (after redirects).
    pub statuses_seen: BTreeMap<u16, u64>,
    /// Last transport/parse error, if any.
    pub last_error: Option<String>,
    /// Wall time of the pull.
    pub elapsed: Duration,
    /// RFC 8216 violations the client's [`PlaylistChecker`] found during this pull (a strict
    /// client panics with them at the end of the pull instead of returning).
    pub violations: Vec<Violation>,
}

impl PullReport {
    /// Adds a later pull of the same viewer: its counts summed, the longer of the two longest waits,
    /// its statuses counted in.
    pub fn add(&mut self, r: &PullReport) {
        self.segments += r.segments;
        self.media_seconds += r.media_seconds;
        self.bytes += r.bytes;
        self.gaps += r.gaps;
        self.failed_segments += r.failed_segments;
        self.sequence_resets += r.sequence_resets;
        self.playlist_loads += r.playlist_loads;
        self.max_wall_gap_between_new_segments = self
            .max_wall_gap_between_new_segments
            .max(r.max_wall_gap_between_new_segments);
        for (s, n) in &r.statuses_seen {
            *self.statuses_seen.entry(*s).or_default() += n;
        }
    }

    /// Panics with the violations, if any.
    pub fn assert_strict(&self) {
        assert!(
            self.violations.is_empty(),
            "{} RFC 8216 violation(s):\n{}",
            self.violations.len(),
            self.violations
                .iter()
                .map(|v| format!("  {v}\n"))
                .collect::<String>()
        );
    }
}

/// A viewer pulling with `client` (pulls of 2 s, each within 10 s) until `stop` is set; its `id` and
/// the pulls summed (segments, gaps, failed segments, sequence resets, statuses, longest wait).
pub fn pull_until_stopped(
    mut client: HlsClient,
    id: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(String, PullReport)> {
    tokio::spawn(async move {
        let mut total = PullReport::default();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let r = client
                .pull(Duration::from_secs(2), Duration::from_secs(10))
                .await
                .unwrap_or_else(|e| panic!("{id}: {e}"));
            total.add(&r);
        }
        (id, total)
    })
}

/// Awaits the viewers of [`pull_until_stopped`] and asserts each saw at least `min_segments`
/// segments, no gap, failed segment or sequence reset, only 200s, and a new segment at least every
/// `max_gap`.
pub async fn assert_viewers_smooth(
    viewers: Vec<tokio::task::JoinHandle<(String, PullReport)>>,
    min_segments: u64,
    max_gap: Duration,
) {
    for v in viewers {
        let (id, total) = v.await.expect("viewer");
        println!("viewer {id}: {total:?}");
        assert!(total.segments >= min_segments, "{id}: {total:?}");
        assert_eq!(
            (total.gaps, total.failed_segments, total.sequence_resets),
            (0, 0, 0),
            "{id}: {total:?}"
        );
        assert!(
            total.statuses_seen.keys().all(|s| *s == 200),
            "{id}: {total:?}"
        );
        assert!(
            total.max_wall_gap_between_new_segments <= max_gap,
            "{id}: {total:?}"
        );
    }
}

impl fmt::Debug for PullReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullReport")
            .field("segments", &self.segments)
            .field("media_seconds", &self.media_seconds)
            .field("bytes", &self.bytes)
            .field("gaps", &self.gaps)
            .field("failed_segments", &self.failed_segments)
            .field("sequence_resets", &self.sequence_resets)
            .field("playlist_loads", &self.playlist_loads)
            .field(
                "max_wall_gap_between_new_segments",
                &self.max_wall_gap_between_new_segments,
            )
            .field(
                "last_segment",
                &self
                    .last_segment
                    .as_ref()
                    .map(|b| format!("{} bytes", b.len())),
            )
            .field("statuses_seen", &self.statuses_seen)
            .field("last_error", &self.last_error)
            .field("elapsed", &self.elapsed)
            .field("violations", &self.violations.len())
            .finish()
    }
}

/// A player-like HLS client for one playlist URL. It keeps its position between pulls, so a second
/// `pull` continues where the first stopped (and counts a gap if segments were missed meanwhile).
///
/// Every playlist it fetches and every segment it downloads goes through its own
/// [`PlaylistChecker`]. A client made with [`HlsClient::new`] is strict: a pull that saw a
/// violation panics with them at its end, and so does [`HlsClient::get_playlist`]. Tests that feed
/// bad playlists on purpose use [`HlsClient::lenient`] and read [`PullReport::violations`].
pub struct HlsClient {
    url: Url,
    http: reqwest::Client,
    next_sequence: Option<u64>,
    last_playlist: Option<MediaPlaylist>,
    checker: Mutex<PlaylistChecker>,
    strict: bool,
}

/// Wait between playlist requests that failed (non-200, transport error, unparsable).
const RETRY_INTERVAL: Duration = Duration::from_millis(250);
/// Upper bound for one HTTP request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl HlsClient {
    /// A strict client for `playlist_url`. Panics if the URL does not parse.
    pub fn new(playlist_url: &str) -> HlsClient {
        let url = Url::parse(playlist_url)
            .unwrap_or_else(|e| panic!("bad playlist URL {playlist_url:?}: {e}"));
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("build reqwest client");
        HlsClient {
            url,
            http,
            next_sequence: None,
            last_playlist: None,
            checker: Mutex::new(PlaylistChecker::new()),
            strict: true,
        }
    }

    /// A client that records RFC 8216 violations in its reports without panicking: for tests that
    /// serve bad playlists on purpose.
    pub fn lenient(playlist_url: &str) -> HlsClient {
        HlsClient {
            strict: false,
            ..HlsClient::new(playlist_url)
        }
    }

    /// The playlist URL.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// The last playlist parsed by [`HlsClient::pull`].
    pub fn last_playlist(&self) -> Option<&MediaPlaylist> {
        self.last_playlist.as_ref()
    }

    /// Every violation the client's checker found so far (the first 200).
    pub fn violations(&self) -> Vec<Violation> {
        lock(&self.checker).violations().to_vec()
    }

    /// One GET of the playlist: `(status, body)`. A 200 body goes through the checker (a strict
    /// client panics on a violation).
    pub async fn get_playlist(&self) -> Result<(u16, String), String> {
        let resp = self
            .http
            .get(self.url.clone())
            .send()
            .await
            .map_err(|e| format!("GET {}: {e}", self.url))?;
        let status = resp.status().as_u16();
        let final_url = resp.url().to_string();
        let body = resp
            .text()
            .await
            .map_err(|e| format!("read {}: {e}", self.url))?;
        if status == 200 {
            let found = lock(&self.checker).observe_playlist(&final_url, &body);
            if self.strict && !found.is_empty() {
                panic!(
                    "playlist {} breaks RFC 8216:\n{}",
                    self.url,
                    lock(&self.checker).summary()
                );
            }
        }
        Ok((status, body))
    }

    /// Pulls like a player until `media` seconds of new segments were downloaded (`Ok`), or `deadline`
    /// of wall time passed or the playlist ended (`Err` with the partial report). A strict client
    /// panics at the end instead if a playlist or segment it fetched broke RFC 8216.
    pub async fn pull(
        &mut self,
        media: Duration,
        deadline: Duration,
    ) -> Result<PullReport, String> {
        let before = lock(&self.checker).total_violations();
        let mut report = PullReport::default();
        let result = self.pull_into(&mut report, media, deadline).await;
        let checker = lock(&self.checker);
        let new = usize::try_from(checker.total_violations() - before).unwrap_or(usize::MAX);
        let kept = checker.violations();
        report.violations = kept[kept.len().saturating_sub(new)..].to_vec();
        if self.strict && checker.total_violations() > before {
            panic!(
                "playlists of {} break RFC 8216 (use HlsClient::lenient to allow it):\n{}\n{report:?}",
                self.url,
                checker.summary()
            );
        }
        drop(checker);
        match result {
            Ok(()) => Ok(report),
            Err(e) => Err(format!("{e}: {report:?}")),
        }
    }

    async fn pull_into(
        &mut self,
        report: &mut PullReport,
        media: Duration,
        deadline: Duration,
    ) -> Result<(), String> {
        let started = Instant::now();
        let end = started + deadline;
        let want = media.as_secs_f64();
        let mut last_new: Option<Instant> = None;
        loop {
            if report.media_seconds >= want {
                report.elapsed = started.elapsed();
                return Ok(());
            }
            let now = Instant::now();
            if now >= end {
                report.elapsed = started.elapsed();
                return Err(format!(
                    "pulled {:.1}s of {want:.1}s of media from {} within {deadline:?}",
                    report.media_seconds, self.url
                ));
            }
            let loaded = self.load_playlist(report, end).await;
            let Some((playlist, base)) = loaded else {
                sleep_until_or(end, RETRY_INTERVAL).await;
                continue;
            };
            for seg in self.new_segments(&playlist, report) {
                if report.media_seconds >= want || Instant::now() >= end {
                    break;
                }
                self.next_sequence = Some(seg.sequence + 1);
                match self.get_segment(&base, &seg.uri, report, end).await {
                    Some(body) => {
                        let t = Instant::now();
                        if let Some(prev) = last_new {
                            report.max_wall_gap_between_new_segments =
                                report.max_wall_gap_between_new_segments.max(t - prev);
                        }
                        last_new = Some(t);
                        report.segments += 1;
                        report.media_seconds += seg.duration;
                        report.bytes += body.len() as u64;
                        report.last_segment = Some(body);
                    }
                    None => report.failed_segments += 1,
                }
            }
            let up_to_date = self.next_sequence > playlist.last_sequence();
            let ended = playlist.endlist && up_to_date;
            let reload = Duration::from_millis(playlist.target_duration * 1000 / 2)
                .max(Duration::from_millis(100));
            self.last_playlist = Some(playlist);
            if ended && report.media_seconds < want {
                report.elapsed = started.elapsed();
                return Err(format!(
                    "playlist {} ended (#EXT-X-ENDLIST) after {:.1}s of {want:.1}s",
                    self.url, report.media_seconds
                ));
            }
            if report.media_seconds < want {
                sleep_until_or(end, reload).await;
            }
        }
    }

    /// Decides which segments of `playlist` are new, updating gap and reset counters.
    fn new_segments(&mut self, playlist: &MediaPlaylist, report: &mut PullReport) -> Vec<Segment> {
        let (Some(first), Some(last)) = (
            playlist.segments.first().map(|s| s.sequence),
            playlist.last_sequence(),
        ) else {
            return Vec::new();
        };
        let live_edge_start = if playlist.endlist {
            first
        } else {
            last.saturating_sub(2).max(first)
        };
        let next = match self.next_sequence {
            None => live_edge_start,
            Some(next) if last + 1 < next => {
                report.sequence_resets += 1;
                live_edge_start
            }
            Some(next) if first > next => {
                report.gaps += first - next;
                first
            }
            Some(next) => next,
        };
        self.next_sequence = Some(next);
        playlist
            .segments
            .iter()
            .filter(|s| s.sequence >= next)
            .cloned()
            .collect()
    }

    /// GETs the playlist; `Some((playlist, final URL))` on a 200 that parses.
    async fn load_playlist(
        &self,
        report: &mut PullReport,
        end: Instant,
    ) -> Option<(MediaPlaylist, Url)> {
        report.playlist_loads += 1;
        let timeout = end
            .saturating_duration_since(Instant::now())
            .min(REQUEST_TIMEOUT);
        let resp = match self
            .http
            .get(self.url.clone())
            .timeout(timeout)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                report.last_error = Some(format!("GET {}: {e}", self.url));
                return None;
            }
        };
        let status = resp.status().as_u16();
        *report.statuses_seen.entry(status).or_default() += 1;
        let base = resp.url().clone();
        let body = match resp.text().await {
            Ok(b) => b,
            Err(e) => {
                report.last_error = Some(format!("read {}: {e}", self.url));
                return None;
            }
        };
        if status != 200 {
            report.last_error = Some(format!("GET {} -> {status}: {}", self.url, body.trim()));
            return None;
        }
        lock(&self.checker).observe_playlist(base.as_str(), &body);
        match MediaPlaylist::parse(&body) {
            Ok(p) => Some((p, base)),
            Err(e) => {
                report.last_error = Some(format!("parse {}: {e}\n{body}", self.url));
                None
            }
        }
    }

    async fn get_segment(
        &self,
        base: &Url,
        uri: &str,
        report: &mut PullReport,
        end: Instant,
    ) -> Option<Vec<u8>> {
        let url = match base.join(uri) {
            Ok(u) => u,
            Err(e) => {
                report.last_error = Some(format!("bad segment URI {uri:?}: {e}"));
                return None;
            }
        };
        let timeout = end
            .saturating_duration_since(Instant::now())
            .min(REQUEST_TIMEOUT);
        let resp = match self.http.get(url.clone()).timeout(timeout).send().await {
            Ok(r) => r,
            Err(e) => {
                report.last_error = Some(format!("GET {url}: {e}"));
                return None;
            }
        };
        let status = resp.status().as_u16();
        *report.statuses_seen.entry(status).or_default() += 1;
        if status != 200 {
            report.last_error = Some(format!("GET {url} -> {status}"));
            return None;
        }
        match resp.bytes().await {
            Ok(b) => {
                lock(&self.checker).observe_segment(uri, url.as_str(), &b);
                Some(b.to_vec())
            }
            Err(e) => {
                report.last_error = Some(format!("read {url}: {e}"));
                None
            }
        }
    }
}

async fn sleep_until_or(end: Instant, d: Duration) {
    let left = end.saturating_duration_since(Instant::now());
    tokio::time::sleep(d.min(left)).await;
}

/// What to probe: a file, bytes in memory, or a URL ffprobe opens itself.
#[derive(Debug, Clone, Copy)]
pub enum ProbeInput<'a> {
    Path(&'a Path),
    Bytes(&'a [u8]),
    Url(&'a str),
}

impl<'a> From<&'a Path> for ProbeInput<'a> {
    fn from(p: &'a Path) -> Self {
        ProbeInput::Path(p)
    }
}

impl<'a> From<&'a PathBuf> for ProbeInput<'a> {
    fn from(p: &'a PathBuf) -> Self {
        ProbeInput::Path(p)
    }
}

impl<'a> From<&'a [u8]> for ProbeInput<'a> {
    fn from(b: &'a [u8]) -> Self {
        ProbeInput::Bytes(b)
    }
}

impl<'a> From<&'a Vec<u8>> for ProbeInput<'a> {
    fn from(b: &'a Vec<u8>) -> Self {
        ProbeInput::Bytes(b)
    }
}

/// Codec names of every stream, in stream order (e.g. `["h264", "aac"]`), from real
/// `ffprobe -v error -show_entries stream=index,codec_name -of csv=p=0`. For MPEG-TS ffprobe lists
/// each stream again under its program; those repeats are dropped. Panics if ffprobe fails.
pub fn ffprobe_codecs<'a>(input: impl Into<ProbeInput<'a>>) -> Vec<String> {
    try_ffprobe_codecs(input).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`ffprobe_codecs`] but returns ffprobe's failure (e.g. for asserting a file is not media).
pub fn try_ffprobe_codecs<'a>(input: impl Into<ProbeInput<'a>>) -> Result<Vec<String>, String> {
    let out = run_ffprobe(input.into(), &["-show_entries", "stream=index,codec_name"])?;
    let mut seen = std::collections::BTreeSet::new();
    let mut codecs = Vec::new();
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (index, codec) = line.split_once(',').unwrap_or(("", line));
        if seen.insert(index.to_string()) {
            codecs.push(codec.trim_end_matches(',').to_string());
        }
    }
    Ok(codecs)
}

/// Container duration in seconds from `ffprobe -show_entries format=duration`.
pub fn ffprobe_duration<'a>(input: impl Into<ProbeInput<'a>>) -> Result<f64, String> {
    let out = run_ffprobe(input.into(), &["-show_entries", "format=duration"])?;
    let line = out
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    line.trim_end_matches(',')
        .parse()
        .map_err(|e| format!("ffprobe duration {line:?}: {e}"))
}

fn run_ffprobe(input: ProbeInput<'_>, entries: &[&str]) -> Result<String, String> {
    // Keep the temp file alive until ffprobe has finished.
    let mut _tmp = None;
    let target: std::ffi::OsString = match input {
        ProbeInput::Path(p) => p.as_os_str().to_owned(),
        ProbeInput::Url(u) => u.into(),
        ProbeInput::Bytes(b) => {
            let mut f = tempfile::Builder::new()
                .prefix("farm-probe-")
                .suffix(".ts")
                .tempfile()
                .map_err(|e| format!("temp file for ffprobe: {e}"))?;
            std::io::Write::write_all(&mut f, b).map_err(|e| format!("write probe file: {e}"))?;
            let path = f.path().as_os_str().to_owned();
            _tmp = Some(f);
            path
        }
    };
    let mut cmd = Command::new("ffprobe");
    cmd.args(["-v", "error"])
        .args(entries)
        .args(["-of", "csv=p=0"])
        .arg(&target);
    let output =
        crate::media::run_tool(&mut cmd, &format!("ffprobe {}", target.to_string_lossy()))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FFMPEG_LIVE: &str = "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:41\n#EXTINF:2.000000,\nseg_41.ts\n#EXTINF:2.000000,\nseg_42.ts\n#EXTINF:1.960000,\nseg_43.ts\n";

    #[test]
    fn parses_ffmpeg_live_playlist() {
        let p = MediaPlaylist::parse(FFMPEG_LIVE).expect("parse");
        assert_eq!(p.version, Some(3));
        assert_eq!(p.target_duration, 2);
        assert_eq!(p.media_sequence, 41);
        assert!(!p.endlist);
        assert_eq!(p.segments.len(), 3);
        assert_eq!(p.segments[0].uri, "seg_41.ts");
        assert_eq!(p.segments[2].sequence, 43);
        assert!((p.segments[2].duration - 1.96).abs() < 1e-9);
        assert_eq!(p.last_sequence(), Some(43));
        assert!((p.total_duration() - 5.96).abs() < 1e-9);
    }

    #[test]
    fn parses_endlist_discontinuity_and_crlf() {
        let text = "#EXTM3U\r\n#EXT-X-TARGETDURATION:4\r\n#EXTINF:4,title\r\na.ts\r\n#EXT-X-DISCONTINUITY\r\n#EXTINF:3.5,\r\nb.ts?x=1\r\n#EXT-X-ENDLIST\r\n";
        let p = MediaPlaylist::parse(text).expect("parse");
        assert_eq!(p.media_sequence, 0);
        assert!(p.endlist);
        assert!(!p.segments[0].discontinuity);
        assert!(p.segments[1].discontinuity);
        assert_eq!(p.segments[1].uri, "b.ts?x=1");
        assert_eq!(p.segments[1].sequence, 1);
    }

    #[test]
    fn rejects_bad_playlists() {
        assert!(MediaPlaylist::parse("").is_err());
        assert!(MediaPlaylist::parse("hello\n").is_err());
        assert!(
            MediaPlaylist::parse("#EXTM3U\n#EXTINF:2,\nx.ts\n").is_err(),
            "no target duration"
        );
        assert!(MediaPlaylist::parse("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\n").is_err());
        assert!(
            MediaPlaylist::parse("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:abc,\nx.ts\n").is_err()
        );
        assert!(MediaPlaylist::parse("#EXTM3U\n#EXT-X-TARGETDURATION:2\nx.ts\n").is_err());
        assert!(
            MediaPlaylist::parse("#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nlow.m3u8\n").is_err()
        );
    }

    #[test]
    fn empty_live_playlist_is_valid() {
        let p = MediaPlaylist::parse("#EXTM3U\n#EXT-X-TARGETDURATION:2\n").expect("parse");
        assert!(p.segments.is_empty());
        assert_eq!(p.last_sequence(), None);
    }

    #[test]
    fn follows_sequence_and_counts_gaps_and_resets() {
        let mut c = HlsClient::new("http://127.0.0.1:1/live/x/index.m3u8");
        let mut r = PullReport::default();
        let pl = |seq: u64, n: usize| {
            let mut t = format!("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:{seq}\n");
            for i in 0..n as u64 {
                t += &format!("#EXTINF:2,\nseg_{}.ts\n", seq + i);
            }
            MediaPlaylist::parse(&t).expect("parse")
        };
        // First load: start 3 from the live edge.
        let s = c.new_segments(&pl(10, 5), &mut r);
        assert_eq!(
            s.iter().map(|s| s.sequence).collect::<Vec<_>>(),
            vec![12, 13, 14]
        );
        c.next_sequence = Some(15);
        // Same playlist again: nothing new.
        assert!(c.new_segments(&pl(10, 5), &mut r).is_empty());
        // Jumped: 15..=17 were never listed while we looked.
        let s = c.new_segments(&pl(18, 3), &mut r);
        assert_eq!(r.gaps, 3);
        assert_eq!(s.first().map(|s| s.sequence), Some(18));
        c.next_sequence = Some(21);
        // Restarted from 0.
        let s = c.new_segments(&pl(0, 2), &mut r);
        assert_eq!(r.sequence_resets, 1);
        assert_eq!(s.first().map(|s| s.sequence), Some(0));
    }

    /// A live playlist: `#EXT-X-MEDIA-SEQUENCE:ms`, `#EXT-X-DISCONTINUITY-SEQUENCE:ds`, then each
    /// entry `(uri, duration, discontinuity before it)`.
    fn live(td: u64, ms: u64, ds: u64, segs: &[(&str, f64, bool)]) -> String {
        let mut t = format!(
            "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:{td}\n#EXT-X-MEDIA-SEQUENCE:{ms}\n#EXT-X-DISCONTINUITY-SEQUENCE:{ds}\n"
        );
        for (i, (uri, d, disc)) in segs.iter().enumerate() {
            if *disc {
                t += "#EXT-X-DISCONTINUITY\n";
            }
            t += &format!(
                "#EXT-X-PROGRAM-DATE-TIME:2030-01-01T00:00:{:02}.000Z\n#EXTINF:{d:.3},\n{uri}\n",
                (ms + i as u64) % 60
            );
        }
        t
    }

    /// Feeds the playlists in order; returns the messages of every violation, one per fetch.
    fn check(playlists: &[String]) -> Vec<Vec<String>> {
        let mut c = PlaylistChecker::new();
        playlists
            .iter()
            .map(|p| {
                c.observe_playlist("http://h/live/ch/index.m3u8", p)
                    .into_iter()
                    .map(|v| v.to_string())
                    .collect()
            })
            .collect()
    }

    /// The violations of the last fetch, asserting the earlier ones had none.
    fn last_fetch_violations(playlists: &[String]) -> Vec<String> {
        let mut all = check(playlists);
        let last = all.pop().expect("a playlist");
        assert!(all.iter().all(Vec::is_empty), "earlier fetches: {all:?}");
        last
    }

    #[test]
    fn parses_discontinuity_sequence_date_time_and_lines() {
        let text = live(
            2,
            7,
            3,
            &[
                ("a.ts", 2.0, false),
                ("b.ts", 2.0, true),
                ("c.ts", 1.5, true),
            ],
        );
        let p = MediaPlaylist::parse(&text).expect("parse");
        assert_eq!(p.discontinuity_sequence, 3);
        assert_eq!(
            p.segments
                .iter()
                .map(|s| s.discontinuity_number)
                .collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(p.target_duration_line, 3);
        assert_eq!(p.media_sequence_line, Some(4));
        assert_eq!(p.segments[0].extinf_line, 7);
        assert_eq!(p.segments[0].line, 8);
        assert_eq!(p.segments[0].program_date_time, Some(1_893_456_007_000));
        assert!(p.issues.is_empty(), "{:?}", p.issues);
        // A date-time applies only to the segment right after it.
        let p = MediaPlaylist::parse(
            "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-PROGRAM-DATE-TIME:2030-01-01T00:00:00Z\n#EXTINF:2,\na.ts\n#EXTINF:2,\nb.ts\n",
        )
        .expect("parse");
        assert!(p.segments[0].program_date_time.is_some());
        assert_eq!(p.segments[1].program_date_time, None);
    }

    #[test]
    fn parses_date_times_as_hls_servers_write_them() {
        let z = parse_date_time("2024-05-01T12:00:00Z").expect("Z");
        assert_eq!(z, 1_714_564_800_000);
        assert_eq!(parse_date_time("2024-05-01T12:00:00.123Z"), Some(z + 123));
        assert_eq!(
            parse_date_time("2024-05-01T12:00:00.1234567z"),
            Some(z + 123)
        );
        assert_eq!(
            parse_date_time("2024-05-01T14:00:00.5+02:00"),
            Some(z + 500)
        );
        assert_eq!(parse_date_time("2024-05-01T12:00:00.000+0000"), Some(z));
        assert_eq!(parse_date_time("2024-05-01T07:00:00-05"), Some(z));
        assert_eq!(parse_date_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_date_time("2000-02-29T00:00:00Z"),
            Some(951_782_400_000)
        );
        for bad in [
            "",
            "2024-05-01",
            "2024-05-01T12:00:00",
            "2024-13-01T12:00:00Z",
            "2024-05-01 12:00:00Z",
            "2024-05-01T12:00:00.Z",
            "2024-05-01T12:00:00Zjunk",
            "2024-05-01T12:00:00+2",
            "2024-05-01T12:00:00+25:00",
            "２024-05-01T12:00:00Z",
        ] {
            assert_eq!(parse_date_time(bad), None, "{bad:?}");
        }
        let err = MediaPlaylist::parse(
            "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-PROGRAM-DATE-TIME:yesterday\n#EXTINF:2,\na.ts\n",
        )
        .expect_err("bad date-time");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn a_good_live_history_passes() {
        // Restart with a discontinuity, the window sliding past it (the discontinuity sequence
        // goes up), a failover that jumps the media sequence forward, one segment fetched twice.
        let seq = [
            live(
                2,
                10,
                0,
                &[
                    ("s_1_10.ts", 2.0, false),
                    ("s_1_11.ts", 2.0, false),
                    ("s_1_12.ts", 1.96, false),
                ],
            ),
            live(
                2,
                10,
                0,
                &[
                    ("s_1_10.ts", 2.0, false),
                    ("s_1_11.ts", 2.0, false),
                    ("s_1_12.ts", 1.96, false),
                ],
            ),
            live(
                2,
                11,
                0,
                &[
                    ("s_1_11.ts", 2.0, false),
                    ("s_1_12.ts", 1.96, false),
                    ("s_2_13.ts", 0.48, true),
                ],
            ),
            live(
                2,
                12,
                0,
                &[
                    ("s_1_12.ts", 1.96, false),
                    ("s_2_13.ts", 0.48, true),
                    ("s_2_14.ts", 2.4, false),
                ],
            ),
            live(
                2,
                13,
                1,
                &[
                    ("s_2_13.ts", 0.48, false),
                    ("s_2_14.ts", 2.4, false),
                    ("s_2_15.ts", 2.0, false),
                ],
            ),
            live(2, 20, 1, &[("s_3_20.ts", 2.0, true)]),
            live(
                2,
                20,
                1,
                &[("s_3_20.ts", 2.0, true), ("s_3_21.ts", 2.0, false)],
            ),
        ];
        let mut c = PlaylistChecker::new();
        for (i, p) in seq.iter().enumerate() {
            let found = c.observe_playlist("http://h/live/ch/index.m3u8", p);
            assert!(found.is_empty(), "fetch {}: {found:?}", i + 1);
        }
        assert!(c.observe_segment("s_2_14.ts", "u", b"abc").is_none());
        assert!(c.observe_segment("s_2_14.ts", "u", b"abc").is_none());
        assert!(c.observe_segment("s_3_20.ts", "u", b"abd").is_none());
        assert_eq!(c.total_violations(), 0);
        assert_eq!(c.summary(), "");
        assert_eq!((c.fetches(), c.segment_fetches()), (7, 3));
    }

    #[test]
    fn catches_a_target_duration_change_between_fetches() {
        // FFmpeg's cold start: target 1 while the first short segment is alone, then 2.
        let v = last_fetch_violations(&[
            live(1, 0, 0, &[("seg_0.ts", 0.96, false)]),
            live(
                2,
                0,
                0,
                &[("seg_0.ts", 0.96, false), ("seg_1.ts", 2.0, false)],
            ),
        ]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].starts_with("fetch 2 (+"), "{v:?}");
        assert!(
            v[0].contains("line 3: #EXT-X-TARGETDURATION:2 but it was 1 since fetch 1"),
            "{v:?}"
        );
    }

    #[test]
    fn reports_a_change_once_and_a_disagreeing_segment_once_per_rule() {
        let v = check(&[
            live(1, 0, 0, &[("seg_0.ts", 1.0, false)]),
            live(2, 0, 0, &[("seg_0.ts", 1.0, true)]),
            live(2, 0, 0, &[("seg_0.ts", 1.0, true)]),
            live(1, 0, 0, &[("seg_0.ts", 1.0, true)]),
        ]);
        assert_eq!(v[1].len(), 2, "{v:?}");
        assert!(v[2].is_empty(), "{v:?}");
        assert_eq!(v[3].len(), 1, "{v:?}");
        assert!(
            v[3][0].contains("#EXT-X-TARGETDURATION:1 but it was 2 since fetch 2"),
            "{v:?}"
        );
    }

    #[test]
    fn catches_an_extinf_above_the_target_duration_after_rounding() {
        let ok = last_fetch_violations(&[live(2, 0, 0, &[("a.ts", 2.49, false)])]);
        assert!(ok.is_empty(), "{ok:?}");
        let v = check(&[live(2, 0, 0, &[("a.ts", 2.0, false), ("b.ts", 2.5, false)])]);
        assert_eq!(v[0].len(), 1, "{v:?}");
        assert!(
            v[0][0].contains("line 10: #EXTINF:2.5 (sequence 1) rounds to 3"),
            "{v:?}"
        );
    }

    #[test]
    fn catches_the_media_sequence_going_back() {
        // A restarted FFmpeg numbering from 0 again.
        let v = last_fetch_violations(&[
            live(
                2,
                5,
                0,
                &[("seg_5.ts", 2.0, false), ("seg_6.ts", 2.0, false)],
            ),
            live(2, 0, 0, &[("seg_0_new.ts", 2.0, false)]),
        ]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].contains("line 4: #EXT-X-MEDIA-SEQUENCE went back from 5 (fetch 1) to 0"),
            "{v:?}"
        );
    }

    #[test]
    fn catches_a_sequence_number_with_two_uris_and_a_uri_with_two_numbers() {
        let v = last_fetch_violations(&[
            live(
                2,
                5,
                0,
                &[("seg_5.ts", 2.0, false), ("seg_6.ts", 2.0, false)],
            ),
            live(2, 6, 0, &[("other_6.ts", 2.0, false)]),
        ]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].contains("sequence 6 is other_6.ts but it was seg_6.ts at fetch 1"),
            "{v:?}"
        );
        // FFmpeg restarted with the same names: seg_0.ts comes back as sequence 7.
        let v = last_fetch_violations(&[
            live(2, 0, 0, &[("seg_0.ts", 2.0, false)]),
            live(2, 7, 0, &[("seg_0.ts", 2.0, true)]),
        ]);
        assert!(
            v.iter().any(|m| m
                .contains("URI seg_0.ts listed as sequence 7, but it was sequence 0 at fetch 1")),
            "{v:?}"
        );
    }

    #[test]
    fn catches_a_changed_segment_and_date_time() {
        let mut second = live(2, 0, 0, &[("a.ts", 1.5, false)]);
        second = second.replace("00:00:00.000Z", "00:00:01.000Z");
        let v = last_fetch_violations(&[live(2, 0, 0, &[("a.ts", 2.0, false)]), second]);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(
            v[0].contains("sequence 0 has #EXTINF:1.5 but had 2 at fetch 1"),
            "{v:?}"
        );
        assert!(v[1].contains("#EXT-X-PROGRAM-DATE-TIME"), "{v:?}");
    }

    #[test]
    fn catches_a_discontinuity_removed_without_incrementing_the_sequence() {
        // FFmpeg's `discont_start`: the tag before the first segment vanishes when it slides out.
        let v = last_fetch_violations(&[
            live(
                2,
                0,
                0,
                &[("seg_0.ts", 2.0, true), ("seg_1.ts", 2.0, false)],
            ),
            live(
                2,
                1,
                0,
                &[("seg_1.ts", 2.0, false), ("seg_2.ts", 2.0, false)],
            ),
        ]);
        assert!(
            v.iter()
                .any(|m| m.contains("sequence 1 is in discontinuity 0 but was in 1 at fetch 1")),
            "{v:?}"
        );
        // A new segment numbered below an older one's discontinuity.
        let v = last_fetch_violations(&[
            live(2, 10, 2, &[("a.ts", 2.0, false)]),
            live(2, 11, 1, &[("b.ts", 2.0, false)]),
        ]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].contains("sequence 11 is in discontinuity 1, below sequence 10's 2"),
            "{v:?}"
        );
        // And one above a higher one's (seen out of order).
        let v = last_fetch_violations(&[
            live(2, 12, 0, &[("c.ts", 2.0, false)]),
            live(2, 11, 3, &[("b.ts", 2.0, false)]),
        ]);
        assert!(
            v.iter()
                .any(|m| m.contains("sequence 11 is in discontinuity 3, above sequence 12's 0")),
            "{v:?}"
        );
    }

    #[test]
    fn catches_a_uri_served_with_other_bytes() {
        let mut c = PlaylistChecker::new();
        assert!(c
            .observe_playlist("u", &live(2, 0, 0, &[("seg_0.ts", 2.0, false)]))
            .is_empty());
        assert!(c
            .observe_segment("seg_0.ts", "http://h/live/ch/seg_0.ts", b"first")
            .is_none());
        let v = c
            .observe_segment("seg_0.ts", "http://h/live/ch/seg_0.ts", b"second")
            .expect("violation");
        assert!(
            v.message
                .contains("segment seg_0.ts served with other bytes (6 bytes"),
            "{v}"
        );
        assert!(v.message.contains("than after fetch 1 (5 bytes"), "{v}");
        assert_eq!(c.total_violations(), 1);
        assert!(c
            .summary()
            .contains("1 RFC 8216 violation(s) in 1 playlist and 2 segment fetches"));
    }

    #[test]
    fn catches_endlist_bad_text_and_single_playlist_issues() {
        let ended = live(2, 0, 0, &[("a.ts", 2.0, false)]) + "#EXT-X-ENDLIST\n";
        let v = last_fetch_violations(&[ended]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].contains("line 9: #EXT-X-ENDLIST in a live playlist"),
            "{v:?}"
        );

        let v = last_fetch_violations(&["<html>502</html>".to_string()]);
        assert!(v[0].contains("does not parse: line 1"), "{v:?}");

        let v = last_fetch_violations(&[
            "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\na.ts\n#EXT-X-MEDIA-SEQUENCE:3\n#EXT-X-DISCONTINUITY-SEQUENCE:1\n".to_string(),
        ]);
        assert_eq!(v.len(), 3, "{v:?}");
        assert!(
            v[0].contains("line 3: #EXT-X-TARGETDURATION appears twice"),
            "{v:?}"
        );
        assert!(
            v[1].contains("line 6: #EXT-X-MEDIA-SEQUENCE after the first media segment"),
            "{v:?}"
        );
        assert!(
            v[2].contains("line 7: #EXT-X-DISCONTINUITY-SEQUENCE after"),
            "{v:?}"
        );

        let v = last_fetch_violations(&[
            "#EXTM3U\n#EXT-X-VERSION:2\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.96,\na.ts\n".to_string(),
        ]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].contains("line 4: decimal #EXTINF duration needs #EXT-X-VERSION 3"),
            "{v:?}"
        );
    }

    #[test]
    fn the_summary_shows_the_first_bad_playlist_and_the_one_before() {
        let mut c = PlaylistChecker::new();
        c.observe_playlist("u", &live(1, 0, 0, &[("seg_0.ts", 1.0, false)]));
        c.observe_playlist("u", &live(2, 0, 0, &[("seg_0.ts", 1.0, false)]));
        let s = c.summary();
        assert!(s.contains("--- fetch 1 ---\n   1 #EXTM3U\n"), "{s}");
        assert!(s.contains("--- fetch 2 ---\n"), "{s}");
        assert!(s.contains("   3 #EXT-X-TARGETDURATION:2\n"), "{s}");
    }

    #[test]
    fn the_registry_keys_by_channel_and_panics_on_a_violation() {
        assert_eq!(
            channel_key("http://127.0.0.1:1/live/news/index.m3u8"),
            "news"
        );
        assert_eq!(
            channel_key("http://127.0.0.1:2/live/tok.en/news/seg_3.ts"),
            "news"
        );
        // Through two "nodes": one history.
        observe(
            "http://127.0.0.1:1/live/reg_test/index.m3u8",
            &live(2, 3, 0, &[("a.ts", 2.0, false)]),
        );
        observe(
            "http://127.0.0.1:2/live/reg_test/index.m3u8",
            &live(2, 3, 0, &[("a.ts", 2.0, false)]),
        );
        observe_segment("http://127.0.0.1:2/live/reg_test/a.ts", b"x");
        let back = std::panic::catch_unwind(|| {
            observe(
                "http://127.0.0.1:2/live/reg_test/index.m3u8",
                &live(2, 2, 0, &[("z.ts", 2.0, false)]),
            );
        })
        .expect_err("media sequence went back");
        let msg = back.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("went back from 3 (fetch 2) to 2"), "{msg}");
        assert_eq!(
            observed_violations("http://x/live/reg_test/index.m3u8").len(),
            1
        );
        let bytes = std::panic::catch_unwind(|| {
            observe_segment("http://127.0.0.1:1/live/reg_test/a.ts", b"y");
        })
        .expect_err("other bytes");
        let msg = bytes.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("a.ts served with other bytes"), "{msg}");
    }

    #[test]
    fn fnv1a_digest_matches_the_reference_values() {
        // The page's JavaScript computes the same (tests/player/player.js).
        assert_eq!(digest(b""), 0x811c_9dc5);
        assert_eq!(digest(b"a"), 0xe40c_292c);
        assert_eq!(digest(b"foobar"), 0xbf9c_f968);
    }
}
