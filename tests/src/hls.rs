//! The HLS checker: a media playlist parser, a player-like puller, and ffprobe helpers.
//!
//! [`HlsClient::pull`] behaves like a live player: it reloads the playlist about every half target
//! duration, starts three segments from the live edge, follows media sequence numbers, downloads each
//! new segment once and reports what it saw (gaps, failed downloads, sequence resets, HTTP statuses,
//! the longest wall-clock wait between new segments). Its reload sleeps are a player's pacing, not
//! test synchronisation.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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
}

/// A parsed HLS media playlist.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaPlaylist {
    pub version: Option<u32>,
    /// `#EXT-X-TARGETDURATION`, seconds.
    pub target_duration: u64,
    /// `#EXT-X-MEDIA-SEQUENCE` (0 if absent).
    pub media_sequence: u64,
    pub segments: Vec<Segment>,
    /// `#EXT-X-ENDLIST` present.
    pub endlist: bool,
}

impl MediaPlaylist {
    /// Parses a media playlist. Errors on a missing `#EXTM3U`, a master playlist, a missing or bad
    /// `#EXT-X-TARGETDURATION`, a bad `#EXTINF`, or an `#EXTINF` without a URI.
    pub fn parse(text: &str) -> Result<MediaPlaylist, String> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        match lines.next() {
            Some("#EXTM3U") => {}
            Some(other) => return Err(format!("first line is {other:?}, not #EXTM3U")),
            None => return Err("empty playlist".into()),
        }
        let mut version = None;
        let mut target_duration = None;
        let mut media_sequence = 0u64;
        let mut endlist = false;
        let mut pending: Option<f64> = None;
        let mut discontinuity = false;
        let mut entries: Vec<(String, f64, bool)> = Vec::new();
        for line in lines {
            if let Some(v) = line.strip_prefix("#EXT-X-TARGETDURATION:") {
                target_duration = Some(
                    v.trim()
                        .parse::<u64>()
                        .map_err(|e| format!("bad #EXT-X-TARGETDURATION {v:?}: {e}"))?,
                );
            } else if let Some(v) = line.strip_prefix("#EXT-X-MEDIA-SEQUENCE:") {
                media_sequence = v
                    .trim()
                    .parse()
                    .map_err(|e| format!("bad #EXT-X-MEDIA-SEQUENCE {v:?}: {e}"))?;
            } else if let Some(v) = line.strip_prefix("#EXT-X-VERSION:") {
                version = Some(
                    v.trim()
                        .parse()
                        .map_err(|e| format!("bad #EXT-X-VERSION {v:?}: {e}"))?,
                );
            } else if let Some(v) = line.strip_prefix("#EXTINF:") {
                let d = v.split_once(',').map_or(v, |(d, _)| d).trim();
                let d: f64 = d.parse().map_err(|e| format!("bad #EXTINF {v:?}: {e}"))?;
                if !d.is_finite() || d < 0.0 {
                    return Err(format!("bad #EXTINF duration {d}"));
                }
                if pending.replace(d).is_some() {
                    return Err("two #EXTINF lines without a URI between them".into());
                }
            } else if line == "#EXT-X-ENDLIST" {
                endlist = true;
            } else if line == "#EXT-X-DISCONTINUITY" {
                discontinuity = true;
            } else if line.starts_with("#EXT-X-STREAM-INF") {
                return Err("master playlist, not a media playlist".into());
            } else if line.starts_with('#') {
                // Other tags and comments are not needed by the tests.
            } else {
                let d = pending
                    .take()
                    .ok_or_else(|| format!("URI {line:?} without #EXTINF"))?;
                entries.push((line.to_string(), d, std::mem::take(&mut discontinuity)));
            }
        }
        if pending.is_some() {
            return Err("#EXTINF without a URI at the end".into());
        }
        let target_duration = target_duration.ok_or("missing #EXT-X-TARGETDURATION")?;
        let segments = entries
            .into_iter()
            .enumerate()
            .map(|(i, (uri, duration, discontinuity))| {
                let sequence = media_sequence
                    .checked_add(i as u64)
                    .ok_or("#EXT-X-MEDIA-SEQUENCE overflows with the listed segments")?;
                Ok(Segment {
                    uri,
                    duration,
                    sequence,
                    discontinuity,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(MediaPlaylist {
            version,
            target_duration,
            media_sequence,
            segments,
            endlist,
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
            .finish()
    }
}

/// A player-like HLS client for one playlist URL. It keeps its position between pulls, so a second
/// `pull` continues where the first stopped (and counts a gap if segments were missed meanwhile).
pub struct HlsClient {
    url: Url,
    http: reqwest::Client,
    next_sequence: Option<u64>,
    last_playlist: Option<MediaPlaylist>,
}

/// Wait between playlist requests that failed (non-200, transport error, unparsable).
const RETRY_INTERVAL: Duration = Duration::from_millis(250);
/// Upper bound for one HTTP request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl HlsClient {
    /// A client for `playlist_url`. Panics if the URL does not parse.
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

    /// One GET of the playlist: `(status, body)`.
    pub async fn get_playlist(&self) -> Result<(u16, String), String> {
        let resp = self
            .http
            .get(self.url.clone())
            .send()
            .await
            .map_err(|e| format!("GET {}: {e}", self.url))?;
        let status = resp.status().as_u16();
        let body = resp
            .text()
            .await
            .map_err(|e| format!("read {}: {e}", self.url))?;
        Ok((status, body))
    }

    /// Pulls like a player until `media` seconds of new segments were downloaded (`Ok`), or `deadline`
    /// of wall time passed or the playlist ended (`Err` with the partial report).
    pub async fn pull(
        &mut self,
        media: Duration,
        deadline: Duration,
    ) -> Result<PullReport, String> {
        let started = Instant::now();
        let end = started + deadline;
        let want = media.as_secs_f64();
        let mut report = PullReport::default();
        let mut last_new: Option<Instant> = None;
        loop {
            if report.media_seconds >= want {
                report.elapsed = started.elapsed();
                return Ok(report);
            }
            let now = Instant::now();
            if now >= end {
                report.elapsed = started.elapsed();
                return Err(format!(
                    "pulled {:.1}s of {want:.1}s of media from {} within {deadline:?}: {report:?}",
                    report.media_seconds, self.url
                ));
            }
            let loaded = self.load_playlist(&mut report, end).await;
            let Some((playlist, base)) = loaded else {
                sleep_until_or(end, RETRY_INTERVAL).await;
                continue;
            };
            for seg in self.new_segments(&playlist, &mut report) {
                if report.media_seconds >= want || Instant::now() >= end {
                    break;
                }
                self.next_sequence = Some(seg.sequence + 1);
                match self.get_segment(&base, &seg.uri, &mut report, end).await {
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
                    "playlist {} ended (#EXT-X-ENDLIST) after {:.1}s of {want:.1}s: {report:?}",
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
            Ok(b) => Some(b.to_vec()),
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
    let output = Command::new("ffprobe")
        .args(["-v", "error"])
        .args(entries)
        .args(["-of", "csv=p=0"])
        .arg(&target)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run ffprobe (is it installed?): {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "ffprobe {} exited with {}: {}",
            target.to_string_lossy(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
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
}
