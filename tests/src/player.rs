//! [`BrowserPlayer`]: a real viewer (hls.js with its default configuration, in headless Chromium)
//! and the analyses of what it saw ([`PlayerReport`]).
//!
//! The harness serves the page (`tests/player/index.html`, `player.js`) and the pinned hls.js
//! (`tests/player/node_modules`, installed by `npm ci` from the committed lock file; `tests/run`
//! does it) from its own HTTP server on 127.0.0.1 (origin A). The stream comes from another origin
//! (a node or nginx), so the player depends on CORS as in a real deployment. The page has no retry
//! or recovery code: it reports hls.js events, `<video>` events and a sample of the video element
//! every 200 ms to origin A, in order, stamped with the browser's clock (Unix ms, the clock the
//! harness reads too, so [`BrowserPlayer::mark`] lines test actions up with the player's view).
//! Every playlist hls.js loaded goes through a [`PlaylistChecker`], and so does every segment's
//! digest.
//!
//! Invariants: Chromium runs headless in its own process group with a fresh profile and HOME in a
//! temp dir; on drop the group, every descendant and every process naming the temp dir (Chromium's
//! crash handler leaves the group) are SIGKILLed and the browser is reaped; the HTTP server thread
//! is stopped and joined. Chromium missing, or a page that does not report (or reports no
//! H.264/AAC in MSE), is a panic, never a skip.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use reqwest::Url;
use serde::Deserialize;

use crate::hls::{PlaylistChecker, Violation};
use crate::netproxy::ServerThread;
use crate::nginx::repo_root;
use crate::procs::{self, tail};
use crate::signal;

/// How long [`BrowserPlayer::start`] waits for the page to report that it runs.
pub const PAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the waits re-read the events (the page samples every 200 ms).
const POLL: Duration = Duration::from_millis(100);
/// A `currentTime` that stays put for at least this long while playing is a freeze.
pub const MIN_FREEZE: Duration = Duration::from_millis(400);
/// A forward step of `currentTime` this much larger than the wall time it took is a skip.
const SKIP_SLACK: f64 = 1.0;

/// Where the page and hls.js live.
pub fn player_dir() -> PathBuf {
    repo_root().join("tests/player")
}

/// The hls.js version `tests/player/package.json` pins.
pub fn pinned_hls_version() -> String {
    let path = player_dir().join("package.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()));
    json["dependencies"]["hls.js"]
        .as_str()
        .unwrap_or_else(|| panic!("{} pins no hls.js", path.display()))
        .to_string()
}

/// The installed hls.js build the page loads. Panics when it is missing or is not the pinned
/// version (run `npm ci` in `tests/player`; `tests/run` does it).
pub fn hls_js_path() -> PathBuf {
    let pinned = pinned_hls_version();
    let pkg = player_dir().join("node_modules/hls.js/package.json");
    let installed = std::fs::read_to_string(&pkg)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|j| j["version"].as_str().map(str::to_string));
    match installed {
        Some(v) if v == pinned => player_dir().join("node_modules/hls.js/dist/hls.min.js"),
        Some(v) => panic!(
            "tests/player has hls.js {v} installed but pins {pinned}: run `npm ci` in tests/player (tests/run does it)"
        ),
        None => panic!(
            "hls.js is not installed in tests/player: run `npm ci` there (tests/run does it)"
        ),
    }
}

/// The Chromium binary: `chromium` (Debian) or `chromium-browser` from PATH. Panics when neither is
/// there (install it: `apt-get install chromium`; `tests/run` does it).
pub fn chromium_bin() -> PathBuf {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser"] {
        if let Some(p) = std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
        {
            return p;
        }
    }
    panic!("chromium is not installed: `apt-get install chromium` (tests/run does it)");
}

/// Now, as Unix milliseconds (the clock the page stamps its events with).
pub fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// One fragment as hls.js describes it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Frag {
    /// Media sequence number.
    pub sn: Option<i64>,
    /// Discontinuity counter hls.js assigned.
    pub cc: Option<i64>,
    /// Start on hls.js's timeline, seconds.
    pub start: Option<f64>,
    pub duration: Option<f64>,
    /// URI as written in the playlist.
    pub uri: Option<String>,
    pub url: Option<String>,
    /// Body size and FNV-1a digest, when hls.js still held the body at `FRAG_LOADED`.
    pub bytes: Option<u64>,
    pub digest: Option<u32>,
}

/// One playlist load as hls.js describes it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Level {
    pub url: Option<String>,
    pub target_duration: Option<f64>,
    pub start_sn: Option<i64>,
    pub end_sn: Option<i64>,
    pub start_cc: Option<i64>,
    pub end_cc: Option<i64>,
    pub live: Option<bool>,
    pub updated: Option<bool>,
    pub fragments: Option<u64>,
    /// The playlist text as received.
    pub text: Option<String>,
}

/// An hls.js `ERROR` event.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct HlsError {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub details: Option<String>,
    pub fatal: bool,
    /// HTTP status of the failed load, if one.
    pub code: Option<i64>,
    pub url: Option<String>,
    pub reason: Option<String>,
    pub sn: Option<i64>,
}

impl fmt::Display for HlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{} {}",
            if self.fatal { "FATAL " } else { "" },
            self.kind.as_deref().unwrap_or("?"),
            self.details.as_deref().unwrap_or("?")
        )?;
        if let Some(code) = self.code {
            write!(f, " (HTTP {code})")?;
        }
        if let Some(sn) = self.sn {
            write!(f, " sn {sn}")?;
        }
        if let Some(url) = &self.url {
            write!(f, " {url}")?;
        }
        if let Some(reason) = &self.reason {
            write!(f, ": {reason}")?;
        }
        Ok(())
    }
}

/// A sample of the `<video>` element.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Sample {
    pub current_time: f64,
    pub ready_state: u8,
    pub paused: bool,
    pub ended: bool,
    pub seeking: bool,
    /// Buffered ranges `[start, end]`, seconds.
    pub buffered: Vec<[f64; 2]>,
    /// Frames presented so far (`requestVideoFrameCallback`).
    pub frames: u64,
    pub decoded: Option<u64>,
    pub dropped: Option<u64>,
    /// hls.js's estimate of the distance to the live edge, seconds.
    pub latency: Option<f64>,
}

/// What the page reports.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PlayerEvent {
    /// The page runs: what the browser can do.
    Page {
        user_agent: String,
        hls_version: Option<String>,
        hls_supported: bool,
        mse_h264_aac: bool,
        visibility: String,
    },
    /// The first video frame reached the screen.
    FirstFrame {
        media_time: f64,
    },
    /// A `<video>` event (`playing`, `waiting`, `stalled`, `seeking`, `error`, ...).
    Video {
        name: String,
        current_time: f64,
        ready_state: u8,
        code: Option<i64>,
        message: Option<String>,
    },
    ManifestParsed {
        levels: u32,
    },
    LevelLoaded(Level),
    FragLoaded(Frag),
    FragBuffered(Frag),
    FragChanged(Frag),
    HlsError(HlsError),
    Sample(Sample),
    /// An exception, a rejected promise or a page-level problem.
    PageError {
        message: String,
    },
    /// An event this harness does not understand (kept with its JSON).
    #[serde(skip)]
    Unknown {
        json: String,
        error: String,
    },
}

/// An event with the page's sequence number and its time (Unix ms).
#[derive(Debug, Clone, PartialEq)]
pub struct Stamped {
    pub seq: u64,
    pub t: f64,
    pub event: PlayerEvent,
}

impl Stamped {
    fn parse(v: serde_json::Value) -> Stamped {
        let seq = v["seq"].as_u64().unwrap_or(u64::MAX);
        let t = v["t"].as_f64().unwrap_or(0.0);
        let event = serde_json::from_value::<PlayerEvent>(v.clone()).unwrap_or_else(|e| {
            PlayerEvent::Unknown {
                json: v.to_string(),
                error: e.to_string(),
            }
        });
        Stamped { seq, t, event }
    }
}

/// A span where `currentTime` did not move while the video was meant to play.
#[derive(Debug, Clone, PartialEq)]
pub struct Freeze {
    /// When it began, since the player started.
    pub start: Duration,
    pub length: Duration,
    /// `currentTime` it stuck at.
    pub media_time: f64,
    /// Still frozen at the last sample.
    pub ongoing: bool,
}

/// A jump of `currentTime` (backwards: media shown again; forwards: media skipped).
#[derive(Debug, Clone, PartialEq)]
pub struct Jump {
    pub at: Duration,
    pub from: f64,
    pub to: f64,
}

/// A fragment loaded with a lower sequence number than one loaded before it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutOfOrder {
    pub at: Duration,
    pub sn: i64,
    pub highest_before: i64,
}

/// What the player saw, from its start to the last event received. Times are since the start.
#[derive(Debug, Clone, Default)]
pub struct PlayerReport {
    pub stream_url: String,
    /// From the start to the last event.
    pub wall: Duration,
    pub user_agent: Option<String>,
    pub hls_version: Option<String>,
    /// When the page reported that it runs.
    pub page_ready: Option<Duration>,
    /// When the first video frame was presented (time to first frame).
    pub first_frame: Option<Duration>,
    /// Media seconds played: the sum of `currentTime`'s ordinary forward steps after the first frame.
    pub played: f64,
    /// `currentTime` at the last sample.
    pub current_time: f64,
    /// Frames presented, decoded and dropped (last sample).
    pub frames: u64,
    pub decoded: u64,
    pub dropped: u64,
    pub samples: usize,
    pub fatal_errors: Vec<(Duration, HlsError)>,
    /// Non-fatal hls.js errors (hls.js recovered or retries by itself).
    pub errors: Vec<(Duration, HlsError)>,
    /// `<video>` `error` events and page errors (exceptions, a rejected `play()`).
    pub page_errors: Vec<(Duration, String)>,
    /// Distinct `#EXT-X-TARGETDURATION` values hls.js loaded.
    pub target_durations: BTreeSet<u64>,
    pub playlists_loaded: u64,
    pub frags_loaded: Vec<(Duration, Frag)>,
    pub frags_out_of_order: Vec<OutOfOrder>,
    /// Fragments loaded a second time (same sequence number).
    pub frags_reloaded: Vec<(Duration, i64)>,
    /// Freezes after the first frame, each at least [`MIN_FREEZE`].
    pub freezes: Vec<Freeze>,
    pub backward_jumps: Vec<Jump>,
    pub forward_jumps: Vec<Jump>,
    /// `waiting` events after the first frame (the player ran out of buffer).
    pub rebuffers: Vec<Duration>,
    /// `stalled` events (no data arriving), any time.
    pub stalls: Vec<Duration>,
    /// RFC 8216 violations in the playlists (and segment digests) the player loaded.
    pub playlist_violations: Vec<Violation>,
    /// Playlist texts and segment digests the checker received from the page.
    pub playlists_checked: u64,
    pub segments_checked: u64,
    /// Marks set with [`BrowserPlayer::mark`].
    pub marks: Vec<(Duration, String)>,
    /// Events the harness could not parse.
    pub unknown_events: Vec<String>,
}

impl PlayerReport {
    /// Builds the report from the events (in any order) of a player started at `start_ms`.
    pub fn from_events(
        stream_url: &str,
        start_ms: f64,
        events: &[Stamped],
        marks: &[(f64, String)],
    ) -> PlayerReport {
        let mut events: Vec<&Stamped> = events.iter().collect();
        events.sort_by_key(|e| e.seq);
        let since = |t: f64| Duration::from_secs_f64(((t - start_ms) / 1000.0).max(0.0));
        let mut r = PlayerReport {
            stream_url: stream_url.to_string(),
            marks: marks.iter().map(|(t, l)| (since(*t), l.clone())).collect(),
            ..PlayerReport::default()
        };
        let mut checker = PlaylistChecker::new();
        let mut first_frame_t: Option<f64> = None;
        let mut highest_sn: Option<i64> = None;
        let mut loaded_sns = BTreeSet::new();
        // (t, current time) of the previous sample after the first frame, and of the last advance.
        let mut prev: Option<(f64, f64)> = None;
        let mut last_advance: Option<(f64, f64)> = None;
        for e in &events {
            r.wall = r.wall.max(since(e.t));
            let at = since(e.t);
            match &e.event {
                PlayerEvent::Page {
                    user_agent,
                    hls_version,
                    ..
                } => {
                    r.page_ready.get_or_insert(at);
                    r.user_agent = Some(user_agent.clone());
                    r.hls_version.clone_from(hls_version);
                }
                PlayerEvent::FirstFrame { .. } => {
                    first_frame_t.get_or_insert(e.t);
                    r.first_frame.get_or_insert(at);
                }
                PlayerEvent::Video {
                    name,
                    code,
                    message,
                    ..
                } => match name.as_str() {
                    "waiting" if first_frame_t.is_some() => r.rebuffers.push(at),
                    "stalled" => r.stalls.push(at),
                    "error" => r.page_errors.push((
                        at,
                        format!(
                            "<video> error {}: {}",
                            code.unwrap_or(0),
                            message.as_deref().unwrap_or("")
                        ),
                    )),
                    _ => {}
                },
                PlayerEvent::ManifestParsed { .. } => {}
                PlayerEvent::LevelLoaded(level) => {
                    r.playlists_loaded += 1;
                    if let Some(td) = level.target_duration {
                        r.target_durations.insert(td as u64);
                    }
                    if let Some(text) = &level.text {
                        let url = level.url.as_deref().unwrap_or(stream_url);
                        checker.observe_playlist_at(url, text, at);
                    }
                }
                PlayerEvent::FragLoaded(frag) => {
                    if let Some(sn) = frag.sn {
                        if let Some(high) = highest_sn.filter(|h| sn < *h) {
                            r.frags_out_of_order.push(OutOfOrder {
                                at,
                                sn,
                                highest_before: high,
                            });
                        }
                        if !loaded_sns.insert(sn) {
                            r.frags_reloaded.push((at, sn));
                        }
                        highest_sn = Some(highest_sn.map_or(sn, |h| h.max(sn)));
                    }
                    if let (Some(uri), Some(bytes), Some(digest)) =
                        (&frag.uri, frag.bytes, frag.digest)
                    {
                        let url = frag.url.as_deref().unwrap_or(uri);
                        checker.observe_segment_digest(uri, url, bytes, digest, at);
                    }
                    r.frags_loaded.push((at, frag.clone()));
                }
                PlayerEvent::FragBuffered(_) | PlayerEvent::FragChanged(_) => {}
                PlayerEvent::HlsError(err) => {
                    if err.fatal {
                        r.fatal_errors.push((at, err.clone()));
                    } else {
                        r.errors.push((at, err.clone()));
                    }
                }
                PlayerEvent::PageError { message } => r.page_errors.push((at, message.clone())),
                PlayerEvent::Unknown { json, error } => {
                    r.unknown_events.push(format!("{error}: {json}"));
                }
                PlayerEvent::Sample(s) => {
                    r.samples += 1;
                    r.current_time = s.current_time;
                    r.frames = s.frames;
                    r.decoded = s.decoded.unwrap_or(0);
                    r.dropped = s.dropped.unwrap_or(0);
                    if first_frame_t.is_none() && s.ready_state >= 2 && s.frames > 0 {
                        first_frame_t = Some(e.t);
                        r.first_frame.get_or_insert(at);
                    }
                    if first_frame_t.is_none() {
                        continue;
                    }
                    let playing = !s.paused && !s.ended && !s.seeking;
                    if let Some((pt, pc)) = prev {
                        let step = s.current_time - pc;
                        let wall = (e.t - pt) / 1000.0;
                        if step < -0.05 {
                            r.backward_jumps.push(Jump {
                                at,
                                from: pc,
                                to: s.current_time,
                            });
                        } else if step > wall + SKIP_SLACK {
                            r.forward_jumps.push(Jump {
                                at,
                                from: pc,
                                to: s.current_time,
                            });
                        } else if step > 0.0 {
                            r.played += step;
                        }
                    }
                    prev = Some((e.t, s.current_time));
                    // A freeze: currentTime stands still over at least one sample while playing.
                    // Its length runs from the last sample that saw it move to the first that
                    // sees it move again (an upper bound, within one sample interval).
                    match last_advance {
                        Some((lt, lc)) if playing => {
                            if (s.current_time - lc).abs() >= 1e-3 {
                                let length = Duration::from_secs_f64((e.t - lt) / 1000.0);
                                if length >= MIN_FREEZE {
                                    r.freezes.push(Freeze {
                                        start: since(lt),
                                        length,
                                        media_time: lc,
                                        ongoing: false,
                                    });
                                }
                                last_advance = Some((e.t, s.current_time));
                            }
                        }
                        _ => last_advance = Some((e.t, s.current_time)),
                    }
                }
            }
        }
        // A freeze still going on at the last sample.
        if let (Some((lt, lc)), Some((pt, pc))) = (last_advance, prev) {
            let length = Duration::from_secs_f64((pt - lt).max(0.0) / 1000.0);
            if (pc - lc).abs() < 1e-3 && length >= MIN_FREEZE {
                r.freezes.push(Freeze {
                    start: since(lt),
                    length,
                    media_time: lc,
                    ongoing: true,
                });
            }
        }
        r.playlist_violations = checker.violations().to_vec();
        r.playlists_checked = checker.fetches();
        r.segments_checked = checker.segment_fetches();
        r
    }

    /// The longest freeze, if any.
    pub fn longest_freeze(&self) -> Option<&Freeze> {
        self.freezes.iter().max_by_key(|f| f.length)
    }

    /// Time to first frame (since the player started).
    pub fn time_to_first_frame(&self) -> Option<Duration> {
        self.first_frame
    }

    /// What a viewer would have noticed: fatal errors, page errors, media shown twice or skipped,
    /// fragments loaded out of order, more than one target duration, playlist violations, and
    /// freezes longer than `max_freeze`. Empty when the viewing was clean.
    pub fn problems(&self, max_freeze: Duration) -> Vec<String> {
        let mut out = Vec::new();
        if self.first_frame.is_none() {
            out.push("no video frame was ever shown".to_string());
        }
        for (at, e) in &self.fatal_errors {
            out.push(format!("+{:.1}s fatal hls.js error: {e}", at.as_secs_f64()));
        }
        for (at, m) in &self.page_errors {
            out.push(format!("+{:.1}s page error: {m}", at.as_secs_f64()));
        }
        for j in &self.backward_jumps {
            out.push(format!(
                "+{:.1}s currentTime went back {:.2} -> {:.2} (media shown again)",
                j.at.as_secs_f64(),
                j.from,
                j.to
            ));
        }
        for j in &self.forward_jumps {
            out.push(format!(
                "+{:.1}s currentTime jumped {:.2} -> {:.2} (media skipped)",
                j.at.as_secs_f64(),
                j.from,
                j.to
            ));
        }
        for o in &self.frags_out_of_order {
            out.push(format!(
                "+{:.1}s fragment sn {} loaded after sn {}",
                o.at.as_secs_f64(),
                o.sn,
                o.highest_before
            ));
        }
        if self.target_durations.len() > 1 {
            out.push(format!(
                "target duration changed: {:?}",
                self.target_durations
            ));
        }
        for v in &self.playlist_violations {
            out.push(format!("playlist: {v}"));
        }
        for f in self.freezes.iter().filter(|f| f.length > max_freeze) {
            out.push(format!(
                "+{:.1}s froze for {:.1}s at media time {:.2}{}",
                f.start.as_secs_f64(),
                f.length.as_secs_f64(),
                f.media_time,
                if f.ongoing { " (still frozen)" } else { "" }
            ));
        }
        out
    }

    /// Panics with the summary unless [`PlayerReport::problems`] is empty.
    pub fn assert_watched_cleanly(&self, max_freeze: Duration) {
        let problems = self.problems(max_freeze);
        assert!(
            problems.is_empty(),
            "the viewer noticed:\n  {}\n{self}",
            problems.join("\n  ")
        );
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".to_string(), |d| format!("{:.2}s", d.as_secs_f64()))
}

impl fmt::Display for PlayerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "player: hls.js {} in {}",
            self.hls_version.as_deref().unwrap_or("?"),
            self.user_agent
                .as_deref()
                .and_then(|ua| ua.split(' ').find(|w| w.contains("Chrom")))
                .unwrap_or("?")
        )?;
        writeln!(f, "  stream: {}", self.stream_url)?;
        writeln!(
            f,
            "  wall {:.1}s, page ready {}, first frame {}, played {:.1}s of media, currentTime {:.2}",
            self.wall.as_secs_f64(),
            secs(self.page_ready),
            secs(self.first_frame),
            self.played,
            self.current_time
        )?;
        writeln!(
            f,
            "  frames presented {}, decoded {}, dropped {}; {} samples",
            self.frames, self.decoded, self.dropped, self.samples
        )?;
        writeln!(
            f,
            "  playlists loaded {}, target durations {:?}, fragments loaded {} (sn {}..{}), out of order {}, reloaded {}",
            self.playlists_loaded,
            self.target_durations,
            self.frags_loaded.len(),
            self.frags_loaded
                .first()
                .and_then(|(_, fr)| fr.sn)
                .map_or("-".into(), |s| s.to_string()),
            self.frags_loaded
                .last()
                .and_then(|(_, fr)| fr.sn)
                .map_or("-".into(), |s| s.to_string()),
            self.frags_out_of_order.len(),
            self.frags_reloaded.len()
        )?;
        let longest = self.longest_freeze();
        writeln!(
            f,
            "  freezes {} (longest {}), rebuffers {}, stalls {}, jumps back {}, skips {}",
            self.freezes.len(),
            longest.map_or("-".to_string(), |fr| format!(
                "{:.2}s at +{:.1}s",
                fr.length.as_secs_f64(),
                fr.start.as_secs_f64()
            )),
            self.rebuffers.len(),
            self.stalls.len(),
            self.backward_jumps.len(),
            self.forward_jumps.len()
        )?;
        writeln!(
            f,
            "  hls.js errors: {} fatal, {} non-fatal; page errors {}; playlist violations {} ({} playlists, {} segment digests checked)",
            self.fatal_errors.len(),
            self.errors.len(),
            self.page_errors.len(),
            self.playlist_violations.len(),
            self.playlists_checked,
            self.segments_checked
        )?;
        for (at, e) in self.fatal_errors.iter().chain(&self.errors).take(10) {
            writeln!(f, "    +{:.1}s {e}", at.as_secs_f64())?;
        }
        for (at, m) in self.page_errors.iter().take(5) {
            writeln!(f, "    +{:.1}s page: {m}", at.as_secs_f64())?;
        }
        for v in self.playlist_violations.iter().take(10) {
            writeln!(f, "    {v}")?;
        }
        for (at, label) in &self.marks {
            writeln!(f, "  mark +{:.1}s {label}", at.as_secs_f64())?;
        }
        if !self.unknown_events.is_empty() {
            writeln!(f, "  unparsed events: {}", self.unknown_events.len())?;
        }
        Ok(())
    }
}

/// What the page's server shares with the player handle.
#[derive(Default)]
struct Shared {
    events: Mutex<Vec<Stamped>>,
    marks: Mutex<Vec<(f64, String)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Clone)]
struct PageState {
    shared: Arc<Shared>,
    hls_js: PathBuf,
    dir: PathBuf,
}

/// The page's origin: an HTTP server on 127.0.0.1 in its own thread and runtime, so it answers
/// whatever the test's runtime is doing.
fn page_server(shared: Arc<Shared>, hls_js: PathBuf) -> ServerThread {
    let state = PageState {
        shared,
        hls_js,
        dir: player_dir(),
    };
    let app = Router::new()
        .route("/", get(page))
        .route("/player.js", get(player_js))
        .route("/hls.min.js", get(serve_hls_js))
        .route("/events", post(events))
        .with_state(state);
    ServerThread::start("player-page", 1, move |listener| async move {
        let _ = axum::serve(listener, app).await;
    })
}

fn file(path: &Path, content_type: &'static str) -> Response {
    match std::fs::read(path) {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, content_type),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::NOT_FOUND, format!("{}: {e}", path.display())).into_response(),
    }
}

async fn page(State(s): State<PageState>) -> Response {
    file(&s.dir.join("index.html"), "text/html; charset=utf-8")
}

async fn player_js(State(s): State<PageState>) -> Response {
    file(&s.dir.join("player.js"), "text/javascript")
}

async fn serve_hls_js(State(s): State<PageState>) -> Response {
    file(&s.hls_js, "text/javascript")
}

async fn events(
    State(s): State<PageState>,
    Json(batch): Json<Vec<serde_json::Value>>,
) -> StatusCode {
    lock(&s.shared.events).extend(batch.into_iter().map(Stamped::parse));
    StatusCode::NO_CONTENT
}

/// hls.js with its default configuration in headless Chromium, playing one stream. See the module
/// docs.
pub struct BrowserPlayer {
    child: Child,
    stream_url: String,
    page_url: String,
    start_ms: f64,
    started: Instant,
    shared: Arc<Shared>,
    server: Option<ServerThread>,
    log_path: PathBuf,
    dir: tempfile::TempDir,
}

impl BrowserPlayer {
    /// Starts Chromium on the player page for `stream_url` and waits until the page runs (up to
    /// [`PAGE_TIMEOUT`]). Panics, with Chromium's log, when Chromium or hls.js is missing, the page
    /// does not report, or the browser cannot play H.264/AAC through MSE.
    pub async fn start(stream_url: &str) -> BrowserPlayer {
        let hls_js = hls_js_path();
        let chromium = chromium_bin();
        let shared = Arc::new(Shared::default());
        let server = page_server(shared.clone(), hls_js);
        let page_url = Url::parse_with_params(
            &format!("http://{}/", server.addr()),
            &[("src", stream_url)],
        )
        .expect("page URL")
        .to_string();
        let dir = tempfile::Builder::new()
            .prefix("farm-player-")
            .tempdir()
            .expect("temp dir for chromium");
        let log_path = dir.path().join("chromium.log");
        let log = File::create(&log_path).expect("chromium log file");
        let log2 = log.try_clone().expect("clone log file");
        let start_ms = unix_ms();
        let started = Instant::now();
        let child = Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--autoplay-policy=no-user-gesture-required",
                "--window-size=800,600",
            ])
            .arg(format!(
                "--user-data-dir={}",
                dir.path().join("profile").display()
            ))
            .arg(&page_url)
            // Chromium's crash handler and caches go by HOME: keep them in the temp dir, where
            // the handler's command line also names it for the clean-up.
            .env("HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", chromium.display()));
        let mut player = BrowserPlayer {
            child,
            stream_url: stream_url.to_string(),
            page_url,
            start_ms,
            started,
            shared,
            server: Some(server),
            log_path,
            dir,
        };
        player.wait_page().await;
        player
    }

    async fn wait_page(&mut self) {
        let deadline = Instant::now() + PAGE_TIMEOUT;
        loop {
            let page = lock(&self.shared.events)
                .iter()
                .find_map(|e| match &e.event {
                    PlayerEvent::Page {
                        hls_supported,
                        mse_h264_aac,
                        user_agent,
                        ..
                    } => Some((*hls_supported, *mse_h264_aac, user_agent.clone())),
                    _ => None,
                });
            match page {
                Some((true, true, _)) => return,
                Some((hls, mse, ua)) => panic!(
                    "the browser cannot play the stream: hls.js supported {hls}, H.264/AAC in MSE {mse} ({ua})\n{}",
                    self.log_tail()
                ),
                None => {}
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "chromium exited with {status} before the player page ran\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "the player page {} did not report within {PAGE_TIMEOUT:?}\n{}",
                    self.page_url,
                    self.log_tail()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The stream URL the player plays.
    pub fn stream_url(&self) -> &str {
        &self.stream_url
    }

    /// The page's URL (origin A).
    pub fn page_url(&self) -> &str {
        &self.page_url
    }

    /// The browser's pid (the leader of its process group).
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits in i32")
    }

    /// The player's temp dir (profile, HOME, Chromium's log): every process of this browser
    /// names it or descends from [`BrowserPlayer::pid`].
    pub fn temp_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Time since the player started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Every event received so far, in the page's order.
    pub fn events(&self) -> Vec<Stamped> {
        let mut events = lock(&self.shared.events).clone();
        events.sort_by_key(|e| e.seq);
        events
    }

    /// Records a labelled moment (e.g. "kill n1"), shown in the report on the player's timeline.
    pub fn mark(&self, label: impl Into<String>) {
        lock(&self.shared.marks).push((unix_ms(), label.into()));
    }

    /// The analyses of everything received so far.
    pub fn report(&self) -> PlayerReport {
        let events = lock(&self.shared.events).clone();
        let marks = lock(&self.shared.marks).clone();
        PlayerReport::from_events(&self.stream_url, self.start_ms, &events, &marks)
    }

    /// Polls the report until `done` holds and returns it; panics with the report after `timeout`.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&PlayerReport) -> bool,
    ) -> PlayerReport {
        let deadline = Instant::now() + timeout;
        loop {
            let report = self.report();
            if done(&report) {
                return report;
            }
            if Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting for {what}\n{report}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits for the first video frame.
    pub async fn wait_first_frame(&self, timeout: Duration) -> PlayerReport {
        self.wait_until("the first video frame", timeout, |r| {
            r.first_frame.is_some()
        })
        .await
    }

    /// Waits until `media` seconds were played after the first frame.
    pub async fn wait_played(&self, media: Duration, timeout: Duration) -> PlayerReport {
        let want = media.as_secs_f64();
        self.wait_until(&format!("{want:.1}s of media played"), timeout, |r| {
            r.played >= want
        })
        .await
    }

    /// The tail of Chromium's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        // D-Bus is absent on test machines; its complaints hide the useful lines.
        let useful: Vec<&str> = log.lines().filter(|l| !l.contains("dbus")).collect();
        format!(
            "--- chromium log ({}) ---\n{}\n--- end ---",
            self.log_path.display(),
            tail(&useful.join("\n"), 40)
        )
    }

    /// SIGKILLs the browser's process group, every descendant and every process naming its temp
    /// dir (the crash handler, which leaves the group), and reaps the browser.
    fn kill(&mut self) {
        let pid = self.pid();
        let mut family = descendants(pid);
        family.push(pid);
        let dir = format!("{}/", self.dir.path().display());
        family.extend(
            procs::processes_with_cmdline_containing(&dir)
                .into_iter()
                .map(|(p, _)| p),
        );
        let _ = signal::send_group(pid, signal::Sig::KILL);
        for p in &family {
            let _ = signal::kill9(*p);
        }
        let _ = self.child.wait();
        // Descendants re-parented to init are reaped there; wait (bounded) until they are gone.
        crate::wait::poll_until(Duration::from_secs(5), || {
            family
                .iter()
                .all(|p| procs::stat(*p).is_none_or(|s| s.state == 'Z'))
                .then_some(())
        });
    }
}

/// Every process below `pid` (children, their children, ...).
fn descendants(pid: i32) -> Vec<i32> {
    let stats: Vec<procs::ProcStat> = procs::all_pids()
        .into_iter()
        .filter_map(procs::stat)
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for s in stats.iter().filter(|s| s.ppid == p) {
            out.push(s.pid);
            frontier.push(s.pid);
        }
    }
    out
}

impl fmt::Debug for BrowserPlayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrowserPlayer")
            .field("pid", &self.child.id())
            .field("stream_url", &self.stream_url)
            .field("page_url", &self.page_url)
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Drop for BrowserPlayer {
    fn drop(&mut self) {
        self.kill();
        self.server.take();
        if std::thread::panicking() {
            eprintln!("{}\n{}", self.report(), self.log_tail());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T0: f64 = 1_000_000.0;

    /// Events as the page would send them, numbered in order.
    fn stamp(events: Vec<serde_json::Value>) -> Vec<Stamped> {
        events
            .into_iter()
            .enumerate()
            .map(|(i, mut v)| {
                v["seq"] = json!(i);
                Stamped::parse(v)
            })
            .collect()
    }

    fn sample(t_ms: f64, ct: f64, paused: bool) -> serde_json::Value {
        json!({"kind": "sample", "t": T0 + t_ms, "current_time": ct, "ready_state": 4,
               "paused": paused, "ended": false, "seeking": false, "buffered": [[0.0, ct + 3.0]],
               "frames": (ct * 25.0) as u64, "decoded": (ct * 25.0) as u64, "dropped": 0,
               "latency": 3.0})
    }

    fn first_frame(t_ms: f64) -> serde_json::Value {
        json!({"kind": "first_frame", "t": T0 + t_ms, "media_time": 0.0, "current_time": 0.0})
    }

    fn report(events: Vec<serde_json::Value>) -> PlayerReport {
        PlayerReport::from_events("http://s/live/ch/index.m3u8", T0, &stamp(events), &[])
    }

    #[test]
    fn steady_playback_has_no_freeze_and_counts_media_played() {
        let mut ev = vec![first_frame(500.0)];
        for i in 0..50 {
            ev.push(sample(600.0 + 200.0 * i as f64, 0.2 * i as f64, false));
        }
        let r = report(ev);
        assert_eq!(r.first_frame, Some(Duration::from_millis(500)));
        assert!((r.played - 9.8).abs() < 1e-6, "{r}");
        assert!(r.freezes.is_empty(), "{r}");
        assert!(r.problems(Duration::from_secs(1)).is_empty(), "{r}");
        assert_eq!(r.samples, 50);
    }

    #[test]
    fn a_stuck_current_time_is_a_freeze_unless_paused() {
        let mut ev = vec![first_frame(0.0)];
        // Plays 0..=1.0 s, stands at 1.0 for five samples, plays on; then paused for 2 s (not a
        // freeze), then stuck again until the end (an ongoing freeze).
        let cts = [
            0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.2, 1.4,
        ];
        let mut t = 0.0;
        for ct in cts {
            t += 200.0;
            ev.push(sample(t, ct, false));
        }
        for _ in 0..10 {
            t += 200.0;
            ev.push(sample(t, 1.4, true));
        }
        t += 200.0;
        ev.push(sample(t, 1.6, false));
        for _ in 0..6 {
            t += 200.0;
            ev.push(sample(t, 1.6, false));
        }
        let r = report(ev);
        assert_eq!(r.freezes.len(), 2, "{r:#?}");
        let f = &r.freezes[0];
        assert_eq!(f.start, Duration::from_millis(1200));
        assert_eq!(f.length, Duration::from_millis(1200));
        assert_eq!(f.media_time, 1.0);
        assert!(!f.ongoing);
        let g = &r.freezes[1];
        assert!(g.ongoing);
        assert_eq!(g.length, Duration::from_millis(1200));
        assert_eq!(
            r.longest_freeze().map(|f| f.length),
            Some(Duration::from_millis(1200))
        );
        assert_eq!(r.problems(Duration::from_secs(1)).len(), 2, "{r}");
        assert!(r.problems(Duration::from_secs(2)).is_empty(), "{r}");
    }

    #[test]
    fn jumps_out_of_order_fragments_and_reloads_are_reported() {
        let frag = |t: f64, sn: i64| {
            json!({"kind": "frag_loaded", "t": T0 + t, "sn": sn, "cc": 0, "start": sn as f64,
                   "duration": 1.0, "uri": format!("seg_{sn}.ts"), "url": "u"})
        };
        let ev = vec![
            frag(100.0, 5),
            frag(200.0, 6),
            first_frame(300.0),
            sample(400.0, 10.0, false),
            sample(600.0, 9.0, false),  // back: media shown again
            sample(800.0, 12.0, false), // skipped 3 s in 0.2 s
            frag(900.0, 4),
            frag(1000.0, 6),
        ];
        let r = report(ev);
        assert_eq!(r.backward_jumps.len(), 1, "{r}");
        assert_eq!(r.forward_jumps.len(), 1, "{r}");
        assert_eq!(
            r.frags_out_of_order,
            vec![OutOfOrder {
                at: Duration::from_millis(900),
                sn: 4,
                highest_before: 6
            }]
        );
        assert_eq!(r.frags_reloaded, vec![(Duration::from_secs(1), 6)]);
        let problems = r.problems(Duration::from_secs(1)).join("\n");
        assert!(problems.contains("went back 10.00 -> 9.00"), "{problems}");
        assert!(problems.contains("jumped 9.00 -> 12.00"), "{problems}");
        assert!(
            problems.contains("fragment sn 4 loaded after sn 6"),
            "{problems}"
        );
    }

    #[test]
    fn errors_rebuffers_and_playlists_are_classified() {
        let level = |t: f64, td: u64| {
            json!({"kind": "level_loaded", "t": T0 + t, "url": "http://s/live/ch/index.m3u8",
                   "target_duration": td, "start_sn": 0, "end_sn": 0, "live": true,
                   "text": format!("#EXTM3U\n#EXT-X-TARGETDURATION:{td}\n#EXTINF:1,\nseg_0.ts\n")})
        };
        let ev = vec![
            json!({"kind": "page", "t": T0 + 50.0, "user_agent": "Mozilla HeadlessChrome/1.0",
                   "hls_version": "1.7.4", "hls_supported": true, "mse_h264_aac": true,
                   "visibility": "visible", "src": "x"}),
            json!({"kind": "video", "t": T0 + 60.0, "name": "waiting", "current_time": 0.0, "ready_state": 0}),
            level(100.0, 1),
            level(1100.0, 2),
            first_frame(1200.0),
            json!({"kind": "video", "t": T0 + 1300.0, "name": "waiting", "current_time": 1.0, "ready_state": 2}),
            json!({"kind": "hls_error", "t": T0 + 1400.0, "type": "mediaError",
                   "details": "bufferStalledError", "fatal": false}),
            json!({"kind": "hls_error", "t": T0 + 1500.0, "type": "networkError",
                   "details": "levelLoadError", "fatal": true, "code": 503, "url": "u"}),
            json!({"kind": "frag_loaded", "t": T0 + 1600.0, "sn": 0, "uri": "seg_0.ts", "url": "u",
                   "bytes": 3, "digest": 1}),
            json!({"kind": "frag_loaded", "t": T0 + 1700.0, "sn": 0, "uri": "seg_0.ts", "url": "u",
                   "bytes": 3, "digest": 2}),
            json!({"kind": "something_new", "t": T0 + 1800.0}),
        ];
        let r = report(ev);
        assert_eq!(r.page_ready, Some(Duration::from_millis(50)));
        assert_eq!(r.hls_version.as_deref(), Some("1.7.4"));
        assert_eq!(r.rebuffers, vec![Duration::from_millis(1300)], "{r}");
        assert_eq!(r.errors.len(), 1);
        assert_eq!(r.fatal_errors.len(), 1);
        assert_eq!(r.fatal_errors[0].1.code, Some(503));
        assert_eq!(r.target_durations, BTreeSet::from([1, 2]));
        assert_eq!(
            (r.playlists_loaded, r.playlists_checked, r.segments_checked),
            (2, 2, 2)
        );
        let v: Vec<String> = r
            .playlist_violations
            .iter()
            .map(|v| v.to_string())
            .collect();
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(
            v[0].contains("#EXT-X-TARGETDURATION:2 but it was 1"),
            "{v:?}"
        );
        assert!(v[1].contains("seg_0.ts served with other bytes"), "{v:?}");
        assert_eq!(r.unknown_events.len(), 1, "{r}");
        let shown = r.to_string();
        for want in [
            "hls.js 1.7.4 in HeadlessChrome/1.0",
            "FATAL networkError levelLoadError (HTTP 503) u",
        ] {
            assert!(shown.contains(want), "{shown}");
        }
    }
}
