//! A channel's live playlist, composed by the node from what FFmpeg writes.
//!
//! FFmpeg writes segments and its own playlist ([`FFMPEG_PLAYLIST`], never served); the node keeps
//! the channel's [`Timeline`] and composes the playlist viewers get. That is how a channel keeps
//! RFC 8216's promises for its whole life, across FFmpeg restarts, drains and failovers:
//!
//! - `EXT-X-TARGETDURATION` is chosen once, from the first segment, and never changes (a new owner
//!   takes it over from Redis); FFmpeg's own playlist says 1 while it lists only the short first
//!   segment and 2 afterwards.
//! - Media sequence numbers only grow, one per published segment, with no gap: a restarted FFmpeg's
//!   segments follow the last published one, a new owner's follow the last one recorded in Redis
//!   (which an owner records before it publishes). A player then places the new owner's first
//!   segment right after the last one it has (hls.js aligns a playlist that starts at the next
//!   number on the previous one's end), so nothing is shown twice. The numbers are the
//!   playlist's own (positional); FFmpeg's file numbers only keep file names apart.
//! - Every break in the timeline (a new FFmpeg run) is an `EXT-X-DISCONTINUITY`, and
//!   `EXT-X-DISCONTINUITY-SEQUENCE` counts the ones that slid out of the window.
//! - Every segment carries `EXT-X-PROGRAM-DATE-TIME`, so a player can place a new owner's segments
//!   on its timeline after a gap.
//! - A segment's file name carries the owner's gen and its media sequence number
//!   ([`segment_file`]), so a URI never names two different segments, whichever node wrote it.

use bytes::Bytes;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// FFmpeg's own playlist in a channel folder: read by the node, never served (not a valid
/// playback file name).
pub const FFMPEG_PLAYLIST: &str = ".ffmpeg.m3u8";
/// The playlist viewers ask for.
pub const PLAYLIST: &str = "index.m3u8";
/// Largest target duration the node accepts for a channel, seconds.
const MAX_TARGET: u64 = 60;
/// Media a cold start's first playlist lists, in target durations. Measured with hls.js (default
/// configuration) on a real-time source without a burst: 1.0 stalled at the first 2 s segment in
/// some runs (the player a segment's length behind the edge has no margin for the fetch), 1.5
/// played without a stall; the cost is a later first playlist (the first segments are short, so
/// half a target duration later than 1.0).
const START_MEDIA: f64 = 1.5;
/// ... or this many segments, whichever comes first.
const START_MEDIA_SEGMENTS: usize = 3;

/// `seg_<gen>_<msn>.ts`: the file (and URI) of one segment.
pub fn segment_file(gen: u64, seq: u64) -> String {
    format!("seg_{gen}_{seq}.ts")
}

/// The FFmpeg `-hls_segment_filename` pattern for an owner's gen.
pub fn segment_pattern(gen: u64) -> String {
    format!("seg_{gen}_%d.ts")
}

/// Parses `seg_<gen>_<msn>.ts` into `(gen, msn)`.
pub fn parse_segment_file(name: &str) -> Option<(u64, u64)> {
    let (gen, seq) = name
        .strip_prefix("seg_")?
        .strip_suffix(".ts")?
        .split_once('_')?;
    let num = |s: &str| {
        (!s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    Some((num(gen)?, num(seq)?))
}

/// One segment FFmpeg lists in its playlist.
#[derive(Debug, Clone, PartialEq)]
pub struct FfmpegSegment {
    pub seq: u64,
    pub duration: f64,
    pub file: String,
}

/// The segments FFmpeg's playlist lists, oldest first (only `#EXTINF` + URI pairs whose URI is a
/// segment file of ours; everything else is ignored).
pub fn parse_ffmpeg(text: &str) -> Vec<FfmpegSegment> {
    let mut out = Vec::new();
    let mut duration: Option<f64> = None;
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("#EXTINF:") {
            duration = v
                .split(',')
                .next()
                .and_then(|d| d.trim().parse::<f64>().ok())
                .filter(|d| d.is_finite() && *d >= 0.0);
        } else if !line.is_empty() && !line.starts_with('#') {
            let file = line.rsplit('/').next().unwrap_or(line);
            if let (Some(d), Some((_, seq))) = (duration.take(), parse_segment_file(file)) {
                out.push(FfmpegSegment {
                    seq,
                    duration: d,
                    file: file.to_string(),
                });
            }
        }
    }
    out
}

/// What a channel's timeline looked like when an earlier owner (or an earlier life) last recorded
/// it in Redis.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Target duration, seconds (0: none chosen yet).
    pub target: u64,
    /// Media sequence number of the newest published segment.
    pub last: Option<u64>,
    /// Discontinuity number of the newest published segment.
    pub disc: u64,
}

/// One published segment.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    /// Its media sequence number.
    msn: u64,
    duration: f64,
    file: String,
    discontinuity: bool,
    /// Wall time of the segment's first sample, ms since the epoch.
    pdt_ms: u64,
}

/// What [`Timeline::ingest`] changed.
#[derive(Debug, Default, PartialEq)]
pub struct Ingested {
    /// Segments newly published.
    pub added: usize,
    /// Segment files that left the window far enough ago to be deleted now.
    pub delete: Vec<String>,
    /// Segments whose duration, rounded, is longer than the target duration.
    pub over_target: usize,
}

/// A channel's published window and everything needed to continue it.
#[derive(Debug)]
pub struct Timeline {
    hls_time: f64,
    window_len: usize,
    keep_after: usize,
    target: u64,
    window: VecDeque<Entry>,
    /// Files that left the window, deleted once `keep_after` more have left.
    retired: VecDeque<String>,
    /// `EXT-X-DISCONTINUITY-SEQUENCE`: the discontinuity number before the window's first entry.
    disc_seq: u64,
    /// The next published segment starts a new run (a restart, or a new owner).
    pending_break: bool,
    /// Media sequence number of the newest published segment.
    last: Option<u64>,
    /// The first media sequence number of a timeline nothing was recorded of (see [`fresh_base`]).
    fresh_base: u64,
    last_disc: u64,
    /// FFmpeg's number of the newest segment seen (published or skipped): what is newer in its
    /// playlist, and where the next run's file numbers start.
    last_file: Option<u64>,
    /// Wall-clock end of the newest published segment, ms (PDTs never go back).
    last_end_ms: u64,
    version: u64,
    text: Bytes,
    served: Bytes,
}

impl Timeline {
    /// A timeline for a channel's life on this node: `prev` is what Redis recorded (a new owner
    /// continues it), `window_len` is `hls_list_size`.
    pub fn new(hls_time: Duration, window_len: usize, prev: &Recorded) -> Self {
        Self {
            hls_time: hls_time.as_secs_f64(),
            window_len: window_len.max(1),
            keep_after: 2,
            target: prev.target.min(MAX_TARGET),
            window: VecDeque::new(),
            retired: VecDeque::new(),
            disc_seq: prev.disc,
            pending_break: prev.last.is_some(),
            last: prev.last,
            fresh_base: 0,
            last_disc: prev.disc,
            last_file: None,
            last_end_ms: 0,
            version: 0,
            text: Bytes::new(),
            served: Bytes::new(),
        }
    }

    /// Starts a timeline nothing was recorded of at `base` (see [`fresh_base`]).
    pub fn with_fresh_base(mut self, base: u64) -> Self {
        self.fresh_base = base;
        self
    }

    /// A new FFmpeg run begins: its first published segment is a discontinuity.
    pub fn begin_run(&mut self) {
        if self.last.is_some() {
            self.pending_break = true;
        }
    }

    /// FFmpeg's first file number for a new run: after every number this gen wrote (`written`,
    /// from the folder) or saw, so a file name is never reused. A fresh timeline starts at the
    /// next media sequence number, so that file numbers read like the playlist's.
    pub fn next_start(&self, written: Option<u64>) -> u64 {
        match self.last_file.max(written) {
            Some(n) => n + 1,
            None => self.last.map_or(self.fresh_base, |l| l + 1),
        }
    }

    /// Publishes the segments of FFmpeg's playlist that are newer than the newest published one.
    /// `now_ms` is the wall time the playlist was seen (the newest segment just ended).
    pub fn ingest(&mut self, listed: &[FfmpegSegment], now_ms: u64) -> Ingested {
        let mut out = Ingested::default();
        let new: Vec<&FfmpegSegment> = listed
            .iter()
            .filter(|s| self.last_file.is_none_or(|l| s.seq > l))
            .collect();
        if new.is_empty() {
            return out;
        }
        let target = match self.target {
            0 => choose_target(self.hls_time, new[0].duration),
            t => t,
        };
        if self.last.is_none() && !self.cold_start_ready(&new, target) {
            return out;
        }
        self.target = target;
        // The newest segment ended about now; earlier new ones back to back before it.
        let total_ms: u64 = new.iter().map(|s| ms(s.duration)).sum();
        let mut start = now_ms.saturating_sub(total_ms);
        for s in new {
            start = self.append(s, start, &mut out);
        }
        self.slide(&mut out);
        self.version += 1;
        self.text = Bytes::from(self.compose(false));
        self.served = Bytes::from(self.compose(true));
        out
    }

    /// Whether a cold start may publish `new` at `target`. It publishes once it can list
    /// START_MEDIA target durations of media: a player starts behind the live edge by what the
    /// first playlist lists (hls.js by at most that), and one that starts closer than the longest
    /// segment plus the time to fetch it runs dry while the next one is still being recorded. (A
    /// new owner continuing a recorded timeline publishes its first segment at once: its viewers
    /// play from their buffer.)
    fn cold_start_ready(&self, new: &[&FfmpegSegment], target: u64) -> bool {
        let listed_media: f64 = new.iter().map(|s| s.duration).sum();
        listed_media + 0.05 >= target as f64 * START_MEDIA
            // Short segments (a GOP well under hls_time): START_MEDIA_SEGMENTS of them
            // already give a player room; FFmpeg's list could not hold more anyway.
            || new.len() >= START_MEDIA_SEGMENTS
            // A GOP longer than hls_time: a second segment would take a whole GOP more; the
            // first playlist comes at once (a player may stall once at the start).
            || target as f64 > self.hls_time + 0.5
    }

    /// Appends one new segment that FFmpeg's list says started about `start` (wall ms) and
    /// returns when the next one starts.
    fn append(&mut self, s: &FfmpegSegment, mut start: u64, out: &mut Ingested) -> u64 {
        // FFmpeg's numbers are consecutive within a run: a jump means segments left its
        // playlist unseen (never published): the timeline breaks there.
        if self.last_file.is_some_and(|l| s.seq != l + 1) {
            self.pending_break = self.last.is_some();
        }
        self.last_file = Some(s.seq);
        let discontinuity = std::mem::replace(&mut self.pending_break, false);
        // Within a run segments follow each other; after a break, the wall clock decides,
        // but never before the previous end.
        if !discontinuity && self.last_end_ms > 0 {
            start = self.last_end_ms;
        }
        start = start.max(self.last_end_ms);
        if discontinuity {
            self.last_disc += 1;
        }
        if (s.duration + 0.5).floor() as u64 > self.target {
            out.over_target += 1;
        }
        let msn = self.last.map_or(self.fresh_base, |l| l + 1);
        self.window.push_back(Entry {
            msn,
            duration: s.duration,
            file: s.file.clone(),
            discontinuity,
            pdt_ms: start,
        });
        self.last = Some(msn);
        self.last_end_ms = start + ms(s.duration);
        out.added += 1;
        self.last_end_ms
    }

    /// Slides the window to its length; files that left it are deleted `keep_after` later.
    fn slide(&mut self, out: &mut Ingested) {
        while self.window.len() > self.window_len {
            if let Some(old) = self.window.pop_front() {
                if old.discontinuity {
                    self.disc_seq += 1;
                }
                self.retired.push_back(old.file);
            }
        }
        while self.retired.len() > self.keep_after {
            if let Some(f) = self.retired.pop_front() {
                out.delete.push(f);
            }
        }
    }

    /// The playlist text; `blocking` adds `EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES` (the owner
    /// holds a reload with `_HLS_msn` until that segment is published, so a player learns of
    /// each segment the moment it exists; a node answering from Redis cannot, and says nothing).
    fn compose(&self, blocking: bool) -> String {
        let first = self.window.front().map_or(0, |e| e.msn);
        let mut t = String::with_capacity(192 + self.window.len() * 96);
        let _ = write!(
            t,
            "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:{}\n",
            self.target
        );
        if blocking {
            t.push_str("#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES\n");
        }
        let _ = write!(
            t,
            "#EXT-X-MEDIA-SEQUENCE:{first}\n#EXT-X-DISCONTINUITY-SEQUENCE:{}\n",
            self.disc_seq
        );
        for e in &self.window {
            if e.discontinuity {
                t.push_str("#EXT-X-DISCONTINUITY\n");
            }
            let pdt = UNIX_EPOCH + Duration::from_millis(e.pdt_ms);
            let _ = write!(
                t,
                "#EXT-X-PROGRAM-DATE-TIME:{}\n#EXTINF:{:.3},\n{}\n",
                humantime::format_rfc3339_millis(pdt),
                e.duration,
                e.file
            );
        }
        t
    }

    /// The playlist as recorded in Redis (empty before the first segment).
    pub fn text(&self) -> Bytes {
        self.text.clone()
    }

    /// The playlist as the owner serves it (with blocking reload).
    pub fn served(&self) -> Bytes {
        self.served.clone()
    }

    /// The target duration, seconds (0 before the first segment).
    pub fn target(&self) -> u64 {
        self.target
    }

    /// Bumped on every publish.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// What to record in Redis for a new owner or a held playlist.
    pub fn recorded(&self) -> Recorded {
        Recorded {
            target: self.target,
            last: self.last,
            disc: self.last_disc,
        }
    }

    /// Whether `file` is published or recently was (its bytes may still be asked for).
    pub fn lists(&self, file: &str) -> bool {
        self.window.iter().any(|e| e.file == file) || self.retired.iter().any(|f| f == file)
    }

    /// Media sequence number of the newest published segment.
    pub fn last(&self) -> Option<u64> {
        self.last
    }
}

fn ms(secs: f64) -> u64 {
    (secs * 1000.0).round() as u64
}

/// The target duration for a channel's life, from its first segment. FFmpeg cuts a segment at the
/// first key frame after `hls_time` (the first one after `hls_time / 2`), so the first segment is
/// about one GOP long when the GOP is longer than that; later segments are then the smallest
/// multiple of it reaching `hls_time`. RFC 8216 wants every `EXTINF`, rounded to the nearest
/// integer, at most the target.
pub fn choose_target(hls_time: f64, first: f64) -> u64 {
    let round = |x: f64| (x + 0.5).floor().max(1.0) as u64;
    let mut t = round(hls_time);
    if first > 0.05 {
        let per = (hls_time / first - 1e-6).ceil().max(1.0);
        t = t.max(round(first * per));
    }
    t.min(MAX_TARGET)
}

/// Where a timeline starts when Redis recorded nothing of the channel: the wall clock in units of
/// half an `hls_time` (FFmpeg's shortest segment). A channel's media sequence then only grows
/// even when its record is gone (it expired, or Redis restarted empty): no earlier life of it can
/// have published faster than one segment per half `hls_time`, so it stayed below this number, and
/// a segment file name (`seg_<gen>_<n>`) is never used twice even when gens start over with Redis.
pub fn fresh_base(now_ms: u64, hls_time: Duration) -> u64 {
    now_ms / (hls_time.as_millis() as u64 / 2).max(250)
}

/// Wall time now, ms since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
