//! Poll a condition with a deadline: the harness's only way to wait for something to happen.
//!
//! The 50 ms poll interval is a trade-off between reaction time and the CPU a waiting test burns on a
//! 2-core machine that runs many tests at once.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often [`eventually`] and [`eventually_blocking`] re-check their condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Calls `f` every [`POLL_INTERVAL`] until it returns `Some`, and returns that value.
///
/// `f` is always called at least once, and once more at the deadline, so a condition that is already
/// true never waits. Panics with "timed out after {timeout:?} waiting for {what}" when `timeout` passes.
pub async fn eventually<F, Fut, T>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        let now = Instant::now();
        if now >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
    }
}

/// Blocking twin of [`eventually`] for sync code (fixtures, `Drop`, non-async tests).
///
/// Do not call it from inside an async test while the condition depends on a task of that same
/// runtime: it blocks the thread.
pub fn eventually_blocking<F, T>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Option<T>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        let now = Instant::now();
        if now >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL_INTERVAL.min(deadline - now));
    }
}

/// Like [`eventually_blocking`] but returns `None` at the deadline instead of panicking.
pub fn poll_until<F, T>(timeout: Duration, f: F) -> Option<T>
where
    F: FnMut() -> Option<T>,
{
    poll_every(POLL_INTERVAL, timeout, f)
}

/// [`poll_until`], trying `f` every `interval` (e.g. a server's start-up, which every test waits
/// for).
pub fn poll_every<F, T>(interval: Duration, timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Option<T>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(interval.min(deadline - now));
    }
}

/// [`eventually`] with a fresh clone of `conn` for each try of `f` (the usual shape of a wait on
/// Redis state).
pub async fn eventually_with<C, F, Fut, T>(conn: &C, what: &str, timeout: Duration, mut f: F) -> T
where
    C: Clone,
    F: FnMut(C) -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually(what, timeout, || f(conn.clone())).await
}
