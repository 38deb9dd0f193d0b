//! What an upstream may make one channel cost, all its gateway's connections together, and how
//! each limit applied is reported.
//!
//! The request rate and the bandwidth are token buckets shared by the channel's connections; a
//! response head's size and time are bounded per request (see `relay`). Every limit applied is
//! counted, logged and sent on as a [`GatewayEvent::Limited`] at most once per [`REPORT_EVERY`]
//! and kind, and at once for each new FFmpeg process (it explains that FFmpeg's exit, which the
//! node is about to see: a new run must not wait for the second to pass).

use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tracing::warn;

/// A kind of limit is logged and reported at most this often per gateway (with a count).
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// What one channel's upstreams may cost, all its connections together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// The longest upstream response head (plain HTTP): beyond, it is cut and FFmpeg gets 502.
    pub head_max: usize,
    /// Bytes per second relayed from upstreams to FFmpeg; 0: no cap.
    pub bytes_per_sec: u64,
    /// New requests per second; 0: no cap.
    pub requests_per_sec: u32,
    /// Requests that may come at once before the rate applies.
    pub burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(50, 20)
    }
}

impl Limits {
    /// A 64 KiB head, `mbit_per_sec` Mbit/s and `requests_per_sec` requests/s with a burst of
    /// twice as many (0: no cap): FFmpeg opening an HLS master loads every variant and rendition
    /// playlist and the first segment of each at once (a ladder of 19 playlists at 20/s).
    pub fn new(mbit_per_sec: u32, requests_per_sec: u32) -> Limits {
        Limits {
            head_max: 64 * 1024,
            bytes_per_sec: u64::from(mbit_per_sec) * 1_000_000 / 8,
            requests_per_sec,
            burst: requests_per_sec.saturating_mul(2),
        }
    }
}

/// Which limit an upstream (or a local process) ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// A response head over [`Limits::head_max`].
    Head,
    /// No response head within the gateway's timeout.
    Stall,
    /// Requests over the rate: answered 429.
    Rate,
    /// A connection throttled to [`Limits::bytes_per_sec`].
    Bandwidth,
    /// A connection from a process that is not the channel's FFmpeg: refused.
    Peer,
}

impl LimitKind {
    pub const ALL: [LimitKind; 5] = [
        LimitKind::Head,
        LimitKind::Stall,
        LimitKind::Rate,
        LimitKind::Bandwidth,
        LimitKind::Peer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Head => "head",
            LimitKind::Stall => "stall",
            LimitKind::Rate => "rate",
            LimitKind::Bandwidth => "bandwidth",
            LimitKind::Peer => "peer",
        }
    }

    /// Whether it explains the channel's FFmpeg failing (goes to `last_error`). A stranger's
    /// connection says nothing about the channel, and a throttled one is not a failure.
    pub fn explains_failure(self) -> bool {
        matches!(self, LimitKind::Head | LimitKind::Stall | LimitKind::Rate)
    }
}

/// What a gateway reports (the guard sends it on to the node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayEvent {
    /// An upstream connection was made.
    Connected,
    /// The policy refused a destination; the sentence for `last_error`.
    Refused(String),
    /// A limit applied `count` times since the last report; the last sentence.
    Limited {
        kind: LimitKind,
        count: u64,
        why: String,
    },
}

/// Where a gateway's events go. Must not block.
pub type EventSink = Arc<dyn Fn(GatewayEvent) + Send + Sync>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A token bucket: `rate` per second, up to `burst` saved. It may go into debt (a relay that
/// already read its bytes), which the next takers wait off.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
    }

    /// Takes `n` if there are that many; whether it did.
    fn try_take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` (into debt if need be) and says how long until the balance is back to zero.
    fn take(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// One channel's spending: its buckets and the reports of every limit applied.
pub(super) struct Budget {
    limits: Limits,
    requests: Option<Mutex<Bucket>>,
    bandwidth: Option<Mutex<Bucket>>,
    reporter: Reporter,
}

impl Budget {
    pub(super) fn new(limits: Limits, channel: &str, events: EventSink) -> Budget {
        let requests = (limits.requests_per_sec > 0).then(|| {
            Mutex::new(Bucket::new(
                f64::from(limits.requests_per_sec),
                f64::from(limits.burst.max(1)),
            ))
        });
        // One second of bytes may come at once (a live source's start-up burst).
        let bps = limits.bytes_per_sec as f64;
        let bandwidth = (limits.bytes_per_sec > 0).then(|| Mutex::new(Bucket::new(bps, bps)));
        Budget {
            limits,
            requests,
            bandwidth,
            reporter: Reporter::new(channel, events),
        }
    }

    pub(super) fn limits(&self) -> Limits {
        self.limits
    }

    /// Takes one request of the FFmpeg `pid` (0: not known); when over the rate, reports it and
    /// gives the sentence FFmpeg's 429 carries.
    pub(super) fn request(&self, pid: u32) -> Result<(), String> {
        let allowed = self
            .requests
            .as_ref()
            .is_none_or(|b| lock(b).try_take(1.0, Instant::now()));
        if allowed {
            return Ok(());
        }
        let why = format!(
            "upstream requests over {}/s (burst {}): answered 429 (a playlist that names itself?)",
            self.limits.requests_per_sec, self.limits.burst
        );
        self.report(LimitKind::Rate, why.clone(), pid);
        Err(why)
    }

    /// Takes `n` bytes of the bandwidth; how long to wait before passing them on.
    fn bytes(&self, n: usize) -> Duration {
        match &self.bandwidth {
            Some(b) => lock(b).take(n as f64, Instant::now()),
            None => Duration::ZERO,
        }
    }

    pub(super) fn report(&self, kind: LimitKind, why: String, pid: u32) {
        self.reporter.report(kind, why, pid);
    }
}

/// The channel's bandwidth cap on one connection's way down to FFmpeg.
pub(super) struct Throttle<'a> {
    budget: &'a Budget,
    /// The FFmpeg the connection serves (0: not known).
    pid: u32,
    dest: &'a str,
    /// Reported once per connection.
    throttled: bool,
}

impl<'a> Throttle<'a> {
    pub(super) fn new(budget: &'a Budget, pid: u32, dest: &'a str) -> Self {
        Throttle {
            budget,
            pid,
            dest,
            throttled: false,
        }
    }

    /// Waits until `n` more bytes fit the channel's rate.
    pub(super) async fn pass(&mut self, n: usize) {
        let wait = self.budget.bytes(n);
        if wait.is_zero() {
            return;
        }
        if !self.throttled {
            self.throttled = true;
            let mbit = self.budget.limits.bytes_per_sec * 8 / 1_000_000;
            self.budget.report(
                LimitKind::Bandwidth,
                format!("upstream {} throttled to {mbit} Mbit/s", self.dest),
                self.pid,
            );
        }
        tokio::time::sleep(wait).await;
    }
}

/// Counts limits and reports them (see the module docs).
struct Reporter {
    channel: String,
    events: EventSink,
    state: Mutex<[Pending; 5]>,
}

#[derive(Default)]
struct Pending {
    count: u64,
    last: Option<Instant>,
    /// The FFmpeg the last report was about (0: none, or a stranger).
    pid: u32,
    why: String,
}

impl Reporter {
    fn new(channel: &str, events: EventSink) -> Reporter {
        Reporter {
            channel: channel.to_string(),
            events,
            state: Mutex::default(),
        }
    }

    /// `pid`: the FFmpeg whose request it was (0 when not known).
    fn report(&self, kind: LimitKind, why: String, pid: u32) {
        let i = LimitKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        let due = {
            let mut st = lock(&self.state);
            let p = &mut st[i];
            p.count += 1;
            let new_ffmpeg = pid != 0 && pid != p.pid;
            if p.last.is_some_and(|t| t.elapsed() < REPORT_EVERY) && !new_ffmpeg {
                p.why = why.clone();
                None
            } else {
                p.last = Some(Instant::now());
                p.pid = pid;
                p.why.clear();
                Some(std::mem::take(&mut p.count))
            }
        };
        if let Some(count) = due {
            warn!(channel = %self.channel, kind = kind.as_str(), count, "egress limit: {why}");
            (self.events)(GatewayEvent::Limited { kind, count, why });
        }
    }
}

impl Drop for Reporter {
    /// What was counted since the last report is still reported.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        for (kind, p) in LimitKind::ALL.iter().zip(st.iter_mut()) {
            if p.count > 0 {
                (self.events)(GatewayEvent::Limited {
                    kind: *kind,
                    count: p.count,
                    why: std::mem::take(&mut p.why),
                });
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A sink that keeps every event.
    pub(in crate::egress) fn recorder() -> (EventSink, Arc<Mutex<Vec<GatewayEvent>>>) {
        let seen: Arc<Mutex<Vec<GatewayEvent>>> = Arc::default();
        let s = seen.clone();
        (Arc::new(move |e| lock(&s).push(e)), seen)
    }

    /// How often `kind` was reported in `seen`, and each report's sentence.
    pub(in crate::egress) fn limited(
        seen: &Mutex<Vec<GatewayEvent>>,
        kind: LimitKind,
    ) -> (u64, Vec<String>) {
        let mut n = 0;
        let mut whys = Vec::new();
        for e in lock(seen).iter() {
            match e {
                GatewayEvent::Limited {
                    kind: k,
                    count,
                    why,
                } if *k == kind => {
                    n += count;
                    whys.push(why.clone());
                }
                _ => {}
            }
        }
        (n, whys)
    }

    #[test]
    fn limits_are_reported_once_a_second_and_at_once_for_each_new_ffmpeg() {
        let (sink, seen) = recorder();
        let r = Reporter::new("ch", sink);
        r.report(LimitKind::Rate, "a".into(), 5);
        r.report(LimitKind::Rate, "b".into(), 5);
        r.report(LimitKind::Rate, "c".into(), 5);
        r.report(LimitKind::Peer, "s1".into(), 0);
        r.report(LimitKind::Peer, "s2".into(), 0);
        // The next run: its first 429 explains its exit, reported at once with what was pending.
        r.report(LimitKind::Rate, "d".into(), 6);
        assert_eq!(
            limited(&seen, LimitKind::Rate),
            (4, vec!["a".into(), "d".into()])
        );
        assert_eq!(limited(&seen, LimitKind::Peer), (1, vec!["s1".into()]));
        r.report(LimitKind::Rate, "e".into(), 6);
        drop(r);
        assert_eq!(
            limited(&seen, LimitKind::Rate),
            (5, vec!["a".into(), "d".into(), "e".into()])
        );
        assert_eq!(
            limited(&seen, LimitKind::Peer),
            (2, vec!["s1".into(), "s2".into()])
        );
    }
}
