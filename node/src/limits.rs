//! What one client may make the node spend, kept in memory by the HTTP layer: a token bucket per
//! client for requests that cost Redis work (first requests), a negative cache of channel ids the
//! catalog does not know, and an exponential delay per address for wrong admin tokens.
//!
//! Invariants: every map is bounded (old entries are pruned, and a map that is still full is
//! cleared rather than refusing newcomers); nothing here awaits anything; a key is never logged by
//! this module (callers log the address, never a token).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Clients (or ids) each map remembers at most.
const MAX_KEYS: usize = 100_000;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A token bucket per client: `burst` requests at once, then `rate` per second.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `rate` 0 turns the limiter off.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refill(&self, b: Bucket, now: Instant) -> f64 {
        (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * self.rate).min(self.burst)
    }

    /// Takes one request of `key` if it has one left (`Err(wait)` when it has none). Checking and
    /// spending are one step under the lock, so concurrent requests of one client cannot all pass
    /// on the same last token.
    pub fn take(&self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let mut m = lock(&self.buckets);
        if m.len() >= MAX_KEYS && !m.contains_key(key) {
            // Full buckets carry no state worth keeping.
            m.retain(|_, b| self.refill(*b, now) < self.burst);
            if m.len() >= MAX_KEYS {
                m.clear();
            }
        }
        let b = m.entry(key.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let t = self.refill(*b, now);
        if t < 1.0 {
            return Err(Duration::from_secs_f64((1.0 - t) / self.rate));
        }
        *b = Bucket {
            tokens: t - 1.0,
            at: now,
        };
        Ok(())
    }

    /// Gives back a request taken for one that turned out to cost nothing (its channel runs).
    pub fn refund(&self, key: &str, now: Instant) {
        if self.rate == 0.0 {
            return;
        }
        if let Some(b) = lock(&self.buckets).get_mut(key) {
            *b = Bucket {
                tokens: (self.refill(*b, now) + 1.0).min(self.burst),
                at: now,
            };
        }
    }
}

/// Channel ids the catalog did not know, answered 404 from memory for `ttl`.
pub struct UnknownIds {
    ttl: Duration,
    ids: Mutex<HashMap<String, Instant>>,
}

impl UnknownIds {
    /// `ttl` 0 turns the cache off.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            ids: Mutex::new(HashMap::new()),
        }
    }

    pub fn insert(&self, id: &str, now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        let mut m = lock(&self.ids);
        if m.len() >= MAX_KEYS {
            m.retain(|_, until| *until > now);
            if m.len() >= MAX_KEYS {
                m.clear();
            }
        }
        m.insert(id.to_string(), now + self.ttl);
    }

    pub fn contains(&self, id: &str, now: Instant) -> bool {
        let mut m = lock(&self.ids);
        match m.get(id) {
            Some(until) if *until > now => true,
            Some(_) => {
                m.remove(id);
                false
            }
            None => false,
        }
    }

    /// Forgets `id` (it was found after all, e.g. a start command ran it).
    pub fn remove(&self, id: &str) {
        lock(&self.ids).remove(id);
    }
}

/// Wrong admin tokens per address: the first [`AuthFailures::FREE`] cost nothing, then each
/// failure makes the address wait twice as long as the one before (from 250 ms, at most 60 s)
/// before its next attempt is even checked. A right token clears the address.
pub struct AuthFailures {
    entries: Mutex<HashMap<String, Failures>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    retry_at: Instant,
    logged_at: Option<Instant>,
    unlogged: u64,
}

/// What to log after a failure (at most once per address per [`AuthFailures::LOG_EVERY`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureReport {
    /// Failures from the address since its previous log line, this one included.
    pub since_last_log: u64,
    /// Failures counted toward its delay.
    pub count: u32,
    /// How long it now waits before its next attempt is checked.
    pub delay: Duration,
}

impl AuthFailures {
    /// Failures an address may make before it is delayed.
    pub const FREE: u32 = 3;
    const BASE: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(60);
    /// An address whose last failure is older than this starts over.
    const FORGET: Duration = Duration::from_secs(600);
    /// One log line per address at most this often.
    pub const LOG_EVERY: Duration = Duration::from_secs(60);

    pub fn new() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The delay after `count` failures.
    pub fn delay(count: u32) -> Duration {
        if count <= Self::FREE {
            return Duration::ZERO;
        }
        let doublings = (count - Self::FREE - 1).min(16);
        (Self::BASE * (1u32 << doublings)).min(Self::MAX)
    }

    /// `Err(wait)` while `addr` must wait before its next attempt is checked.
    pub fn check(&self, addr: &str, now: Instant) -> Result<(), Duration> {
        match lock(&self.entries).get(addr) {
            Some(f) if f.retry_at > now => Err(f.retry_at - now),
            _ => Ok(()),
        }
    }

    /// Counts a failure of `addr`; `Some` when it is time to log one line about it.
    pub fn failed(&self, addr: &str, now: Instant) -> Option<FailureReport> {
        let mut m = lock(&self.entries);
        if m.len() >= MAX_KEYS && !m.contains_key(addr) {
            m.retain(|_, f| now.saturating_duration_since(f.last) < Self::FORGET);
            if m.len() >= MAX_KEYS {
                m.clear();
            }
        }
        let f = m.entry(addr.to_string()).or_insert(Failures {
            count: 0,
            last: now,
            retry_at: now,
            logged_at: None,
            unlogged: 0,
        });
        if now.saturating_duration_since(f.last) >= Self::FORGET {
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        let delay = Self::delay(f.count);
        f.retry_at = now + delay;
        f.unlogged += 1;
        let due = f
            .logged_at
            .is_none_or(|at| now.saturating_duration_since(at) >= Self::LOG_EVERY);
        if !due {
            return None;
        }
        let report = FailureReport {
            since_last_log: f.unlogged,
            count: f.count,
            delay,
        };
        f.logged_at = Some(now);
        f.unlogged = 0;
        Some(report)
    }

    /// A right token: the address starts over.
    pub fn succeeded(&self, addr: &str) {
        lock(&self.entries).remove(addr);
    }
}

impl Default for AuthFailures {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let l = RateLimiter::new(2, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.take("a", t0).is_ok());
        }
        let wait = l.take("a", t0).expect_err("burst used up");
        assert!(wait <= Duration::from_millis(500), "{wait:?}");
        assert!(l.take("b", t0).is_ok(), "another client has its own bucket");
        assert!(l.take("a", t0 + Duration::from_millis(500)).is_ok());
        assert!(l.take("a", t0 + Duration::from_millis(500)).is_err());
        // A refunded request can be taken again, but never beyond the burst.
        l.refund("a", t0 + Duration::from_millis(500));
        assert!(l.take("a", t0 + Duration::from_millis(500)).is_ok());
        for _ in 0..10 {
            l.refund("b", t0);
        }
        for _ in 0..3 {
            assert!(l.take("b", t0).is_ok());
        }
        assert!(l.take("b", t0).is_err(), "refunds are capped at the burst");
        assert!(
            RateLimiter::new(0, 1).take("a", t0).is_ok(),
            "rate 0 is off"
        );
    }

    #[test]
    fn concurrent_takes_never_pass_more_than_the_burst() {
        let l = std::sync::Arc::new(RateLimiter::new(1, 20));
        let t0 = Instant::now();
        let passed = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..50 {
                        if l.take("a", t0).is_ok() {
                            passed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(passed.into_inner(), 20);
    }

    #[test]
    fn unknown_ids_expire() {
        let c = UnknownIds::new(Duration::from_secs(5));
        let t0 = Instant::now();
        c.insert("nope", t0);
        assert!(c.contains("nope", t0 + Duration::from_secs(4)));
        assert!(!c.contains("nope", t0 + Duration::from_secs(5)));
        assert!(!c.contains("other", t0));
        let off = UnknownIds::new(Duration::ZERO);
        off.insert("nope", t0);
        assert!(!off.contains("nope", t0));
    }

    #[test]
    fn admin_failures_delay_exponentially_and_log_once_a_minute() {
        let f = AuthFailures::new();
        let t0 = Instant::now();
        let first = f
            .failed("1.2.3.4", t0)
            .expect("the first failure is logged");
        assert_eq!(first.since_last_log, 1);
        for _ in 1..AuthFailures::FREE {
            assert_eq!(f.failed("1.2.3.4", t0), None, "logged once a minute");
            assert!(
                f.check("1.2.3.4", t0).is_ok(),
                "the first failures are free"
            );
        }
        f.failed("1.2.3.4", t0);
        assert_eq!(
            f.check("1.2.3.4", t0),
            Err(Duration::from_millis(250)),
            "then a delay"
        );
        assert!(f.check("5.6.7.8", t0).is_ok(), "per address");
        assert_eq!(AuthFailures::delay(5), Duration::from_millis(500));
        assert_eq!(AuthFailures::delay(100), Duration::from_secs(60));
        let later = t0 + AuthFailures::LOG_EVERY;
        let r = f
            .failed("1.2.3.4", later)
            .expect("a minute later: logged again");
        assert_eq!(r.since_last_log, 4);
        f.succeeded("1.2.3.4");
        assert!(f.check("1.2.3.4", later).is_ok());
    }
}
