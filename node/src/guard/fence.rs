//! The fence clock: one absolute deadline on CLOCK_MONOTONIC, moved forward by the node after each
//! lease renewal (time the renewal was sent + ⅔ of the lease TTL), and what the guard does with it.
//!
//! CLOCK_MONOTONIC is one clock for every process on the machine, so a deadline computed in the
//! node means the same instant in the guard; std's `Instant` and tokio's timers run on it too.
//! Invariants: the deadline only moves forward; a deadline of 0 (none yet) is a closed fence;
//! traffic passes a gateway only while `now < deadline`, checked at every byte batch, not only by
//! the timer (a guard thawed after the deadline must not relay what queued up meanwhile).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

/// The CLOCK_MONOTONIC time of an `Instant` of this process, in nanoseconds.
pub fn instant_ns(at: Instant) -> u64 {
    let (now_ns, now) = (monotonic_ns(), Instant::now());
    match now.checked_duration_since(at) {
        Some(ago) => now_ns.saturating_sub(duration_ns(ago)),
        None => now_ns.saturating_add(duration_ns(at - now)),
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The guard's deadline and its fences. Shared by the guard's control loop (which moves it and
/// fences) and every gateway (which asks it before passing bytes).
#[derive(Debug)]
pub struct FenceClock {
    deadline_ns: AtomicU64,
    /// Bumped at every fence: gateways drop their connections when it changes.
    fences: watch::Sender<u64>,
}

impl FenceClock {
    /// No deadline yet: closed until the node sends one.
    pub fn closed() -> FenceClock {
        FenceClock {
            deadline_ns: AtomicU64::new(0),
            fences: watch::channel(0).0,
        }
    }

    /// Never fences (a gateway outside a guard, in unit tests).
    pub fn open_forever() -> FenceClock {
        let c = FenceClock::closed();
        c.deadline_ns.store(u64::MAX, Ordering::Release);
        c
    }

    pub fn deadline_ns(&self) -> u64 {
        self.deadline_ns.load(Ordering::Acquire)
    }

    /// Whether traffic may pass now.
    pub fn is_open(&self) -> bool {
        monotonic_ns() < self.deadline_ns()
    }

    /// Moves the deadline to `to` if that is later; whether it moved.
    pub fn extend(&self, to: u64) -> bool {
        self.deadline_ns.fetch_max(to, Ordering::AcqRel) < to
    }

    /// Changes at every fence.
    pub fn fences(&self) -> watch::Receiver<u64> {
        self.fences.subscribe()
    }

    /// Tells every gateway to drop its connections.
    pub fn fence(&self) {
        self.fences.send_modify(|n| *n += 1);
    }
}

/// What the gateways see of it.
impl crate::egress::Fence for FenceClock {
    fn is_open(&self) -> bool {
        FenceClock::is_open(self)
    }

    fn fences(&self) -> watch::Receiver<u64> {
        FenceClock::fences(self)
    }
}

/// What the guard's control loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing until a message arrives: no deadline yet, or already fenced for this one.
    Wait,
    /// Decide again after this long (the deadline is ahead).
    Sleep(Duration),
    /// The deadline has passed and nothing was fenced for it: fence now.
    Fence,
}

/// The decision, from the clock: `fenced_for` is the deadline the last fence was for (start with
/// `Some(0)`: a guard with no deadline has nothing to fence yet and is closed).
pub fn step(now_ns: u64, deadline_ns: u64, fenced_for: Option<u64>) -> Step {
    if fenced_for == Some(deadline_ns) {
        Step::Wait
    } else if now_ns >= deadline_ns {
        Step::Fence
    } else {
        Step::Sleep(Duration::from_nanos(deadline_ns - now_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_fences_once_and_only_after_it_passes() {
        // A fresh guard: closed, nothing to fence.
        assert_eq!(step(5, 0, Some(0)), Step::Wait);
        // Armed at 1000: sleep until then, then fence once.
        assert_eq!(
            step(400, 1000, Some(0)),
            Step::Sleep(Duration::from_nanos(600))
        );
        assert_eq!(step(1000, 1000, Some(0)), Step::Fence);
        assert_eq!(
            step(7000, 1000, Some(0)),
            Step::Fence,
            "overdue (thawed late)"
        );
        assert_eq!(step(7000, 1000, Some(1000)), Step::Wait, "fenced already");
        // A later renewal re-arms it.
        assert_eq!(
            step(7000, 9000, Some(1000)),
            Step::Sleep(Duration::from_nanos(2000))
        );
        // A renewal that arrives after its own deadline (the node was slow) fences at once.
        assert_eq!(step(9500, 9000, Some(1000)), Step::Fence);
    }

    #[test]
    fn the_deadline_only_moves_forward_and_closes_the_gate_when_it_passes() {
        let c = FenceClock::closed();
        assert!(!c.is_open(), "no deadline yet: closed");
        let now = monotonic_ns();
        assert!(c.extend(now + 60_000_000_000));
        assert!(c.is_open());
        assert!(!c.extend(now), "an older deadline is ignored");
        assert_eq!(c.deadline_ns(), now + 60_000_000_000);
        let past = FenceClock::closed();
        past.extend(now.saturating_sub(1));
        assert!(!past.is_open());
        assert!(FenceClock::open_forever().is_open());
        let rx = c.fences();
        c.fence();
        assert!(rx.has_changed().expect("sender alive"));
    }

    #[tokio::test]
    async fn monotonic_time_agrees_with_instants_and_tokio_timers() {
        let t0 = Instant::now();
        let ns0 = instant_ns(t0);
        let later = t0 + Duration::from_millis(30);
        let off = instant_ns(later).abs_diff(ns0 + 30_000_000);
        assert!(off < 1_000_000, "{off} ns apart");
        let before = monotonic_ns();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let slept = monotonic_ns() - before;
        assert!(
            (20_000_000..2_000_000_000).contains(&slept),
            "{slept} ns for a 20 ms timer"
        );
        assert!(instant_ns(Instant::now()) >= before);
    }
}
