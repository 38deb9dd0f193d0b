//! Every open connection of the node's HTTP server: what each one is doing (its [`ConnState`],
//! shared with its task and its socket), when it times out, and which one is closed to make room
//! at the cap (see the server's module docs for the order).

use super::limits::Limits;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// A connection idle for less than this is never evicted (its next request may be on the wire).
pub const EVICT_MIN_IDLE: Duration = Duration::from_secs(1);

/// No time set (an atomic millisecond field).
const NONE: u64 = u64::MAX;

/// What the server knows of one connection, shared by its task, its IO and the registry.
pub(super) struct ConnState {
    pub epoch: Instant,
    pub opened_ms: u64,
    /// Last byte read or written.
    last_io_ms: AtomicU64,
    /// When the current request head began (the accept, or the first byte after an idle pause);
    /// `NONE` while idle after a response or while a request runs.
    head_ms: AtomicU64,
    /// Requests being handled (the handler has not answered yet).
    handling: AtomicU32,
    /// Requests that reached the handler.
    served: AtomicU64,
    pub kill: Notify,
}

impl ConnState {
    fn new(epoch: Instant) -> Self {
        let now = ms(epoch);
        Self {
            epoch,
            opened_ms: now,
            last_io_ms: AtomicU64::new(now),
            head_ms: AtomicU64::new(now),
            handling: AtomicU32::new(0),
            served: AtomicU64::new(0),
            kill: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        ms(self.epoch)
    }

    pub(super) fn on_read(&self) {
        let now = self.now();
        self.last_io_ms.store(now, Ordering::Relaxed);
        if self.handling.load(Ordering::Acquire) == 0 {
            let _ = self
                .head_ms
                .compare_exchange(NONE, now, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    pub(super) fn on_write(&self) {
        self.last_io_ms.store(self.now(), Ordering::Relaxed);
    }

    pub(super) fn begin_request(&self) {
        self.handling.fetch_add(1, Ordering::AcqRel);
        self.served.fetch_add(1, Ordering::Relaxed);
        self.head_ms.store(NONE, Ordering::Release);
    }

    pub(super) fn end_request(&self) {
        self.last_io_ms.store(self.now(), Ordering::Relaxed);
        self.handling.fetch_sub(1, Ordering::AcqRel);
    }

    /// When to look again, and what has run out by `now` (`Some("header" | "idle")`).
    pub(super) fn check(&self, l: &Limits) -> (u64, Option<&'static str>) {
        let now = self.now();
        let (header, idle) = (
            l.header_timeout.as_millis() as u64,
            l.idle_timeout.as_millis() as u64,
        );
        if self.handling.load(Ordering::Acquire) > 0 {
            return (now + idle, None);
        }
        let head = self.head_ms.load(Ordering::Acquire);
        if head != NONE {
            let due = head.saturating_add(header);
            return (due, (now >= due).then_some("header"));
        }
        let due = self.last_io_ms.load(Ordering::Relaxed).saturating_add(idle);
        (due, (now >= due).then_some("idle"))
    }

    /// Eviction order: `None` when it must not be evicted, else lower goes first.
    fn eviction_key(&self, now: u64) -> Option<(u8, u64)> {
        if self.handling.load(Ordering::Acquire) > 0 {
            return None;
        }
        if self.served.load(Ordering::Relaxed) == 0 {
            return Some((0, self.opened_ms));
        }
        let head = self.head_ms.load(Ordering::Acquire);
        if head != NONE {
            return Some((1, head));
        }
        let last = self.last_io_ms.load(Ordering::Relaxed);
        (now.saturating_sub(last) >= EVICT_MIN_IDLE.as_millis() as u64).then_some((2, last))
    }
}

fn ms(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// Every open connection, by id.
#[derive(Default)]
pub(super) struct Registry {
    conns: HashMap<u64, (Arc<ConnState>, Option<IpAddr>)>,
    per_addr: HashMap<IpAddr, usize>,
    /// Ids in accept order: where eviction looks first (connections that never completed a
    /// request); entries of closed or served connections are skipped lazily.
    fresh: VecDeque<u64>,
    next: u64,
}

/// Why a new connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    Limit,
    PerAddress,
}

impl Registry {
    pub(super) fn admit(
        &mut self,
        addr: IpAddr,
        l: &Limits,
        epoch: Instant,
    ) -> Result<(u64, Arc<ConnState>, bool), Refusal> {
        let counted = !l.trusted(addr) && l.max_per_addr > 0;
        if counted && self.per_addr.get(&addr).copied().unwrap_or(0) >= l.max_per_addr {
            return Err(Refusal::PerAddress);
        }
        let mut evicted = false;
        if self.conns.len() >= l.max_connections {
            if !self.evict_one(epoch) {
                return Err(Refusal::Limit);
            }
            evicted = true;
        }
        let id = self.next;
        self.next += 1;
        let state = Arc::new(ConnState::new(epoch));
        self.conns
            .insert(id, (state.clone(), counted.then_some(addr)));
        if counted {
            *self.per_addr.entry(addr).or_default() += 1;
        }
        self.fresh.push_back(id);
        if self.fresh.len() > 2 * self.conns.len() + 1024 {
            let conns = &self.conns;
            self.fresh.retain(|id| {
                conns
                    .get(id)
                    .is_some_and(|(s, _)| s.served.load(Ordering::Relaxed) == 0)
            });
        }
        Ok((id, state, evicted))
    }

    pub(super) fn remove(&mut self, id: u64) -> bool {
        let Some((_, addr)) = self.conns.remove(&id) else {
            return false;
        };
        if let Some(a) = addr {
            if let Some(n) = self.per_addr.get_mut(&a) {
                *n -= 1;
                if *n == 0 {
                    self.per_addr.remove(&a);
                }
            }
        }
        true
    }

    /// Closes the connection that matters least (see the module docs); `false` when every one
    /// is busy or too recently active.
    pub(super) fn evict_one(&mut self, epoch: Instant) -> bool {
        let now = ms(epoch);
        // Oldest connection that never completed a request.
        while let Some(id) = self.fresh.pop_front() {
            let key = self.conns.get(&id).map(|(s, _)| s.eviction_key(now));
            // Anything else has completed a request (or is gone): the scan below weighs it.
            if let Some(Some((0, _))) = key {
                return self.kill(id);
            }
        }
        let victim = self
            .conns
            .iter()
            .filter_map(|(id, (s, _))| s.eviction_key(now).map(|k| (k, *id)))
            .min()
            .map(|(_, id)| id);
        match victim {
            Some(id) => self.kill(id),
            None => false,
        }
    }

    /// Open connections.
    pub(super) fn len(&self) -> usize {
        self.conns.len()
    }

    fn kill(&mut self, id: u64) -> bool {
        if let Some((s, _)) = self.conns.get(&id) {
            s.kill.notify_one();
        }
        self.remove(id)
    }
}

pub(super) fn lock(r: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IpNet;

    fn limits(max: usize, per_addr: usize) -> Limits {
        Limits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_header_bytes: 16 << 10,
            max_connections: max,
            max_per_addr: per_addr,
            trusted: vec![IpNet::parse("127.0.0.1").expect("net")],
            why: String::new(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    /// A registry under `limits(max, per_addr)` whose connections start at `epoch`.
    struct Admitting {
        r: Registry,
        l: Limits,
        epoch: Instant,
    }

    impl Admitting {
        fn new(max: usize, per_addr: usize, epoch: Instant) -> Self {
            Self {
                r: Registry::default(),
                l: limits(max, per_addr),
                epoch,
            }
        }

        fn admit(&mut self, addr: &str) -> Result<(u64, Arc<ConnState>, bool), Refusal> {
            self.r.admit(ip(addr), &self.l, self.epoch)
        }
    }

    #[test]
    fn the_cap_evicts_connections_that_never_sent_a_request_first() {
        let mut f = Admitting::new(3, 0, Instant::now() - Duration::from_secs(100));
        let (a, sa, _) = f.admit("10.0.0.1").expect("a");
        sa.begin_request();
        sa.end_request();
        // a served a request and has been idle; b and c never sent one.
        sa.last_io_ms.store(0, Ordering::Relaxed);
        let (b, _, _) = f.admit("10.0.0.2").expect("b");
        let (c, sc, _) = f.admit("10.0.0.3").expect("c");
        let (_, _, evicted) = f.admit("10.0.0.4").expect("d");
        assert!(evicted);
        assert!(
            !f.r.conns.contains_key(&b),
            "the oldest fresh one goes first"
        );
        assert!(f.r.conns.contains_key(&a) && f.r.conns.contains_key(&c));
        // A connection with a request running is never evicted.
        sc.begin_request();
        let (_, _, evicted) = f.admit("10.0.0.5").expect("e");
        assert!(evicted);
        assert!(f.r.conns.contains_key(&c));
        assert_eq!(f.r.conns.len(), 3);
    }

    #[test]
    fn busy_or_just_active_connections_are_not_evicted_and_the_newcomer_is_refused() {
        let mut f = Admitting::new(2, 0, Instant::now());
        let (_, s1, _) = f.admit("10.0.0.1").expect("1");
        let (_, s2, _) = f.admit("10.0.0.2").expect("2");
        s1.begin_request();
        s2.begin_request();
        s2.end_request();
        // s2 was active just now: not evictable yet.
        assert_eq!(f.admit("10.0.0.3").err(), Some(Refusal::Limit));
    }

    #[test]
    fn per_address_cap_exempts_trusted_proxies() {
        let mut f = Admitting::new(100, 2, Instant::now());
        let (a, _, _) = f.admit("10.0.0.9").expect("1");
        f.admit("10.0.0.9").expect("2");
        assert_eq!(f.admit("10.0.0.9").err(), Some(Refusal::PerAddress));
        for _ in 0..5 {
            f.admit("127.0.0.1").expect("trusted");
        }
        assert!(f.r.remove(a));
        assert!(!f.r.remove(a), "removed once");
        f.admit("10.0.0.9").expect("room again");
    }

    #[test]
    fn timeouts_follow_the_connection_state() {
        let epoch = Instant::now() - Duration::from_secs(1000);
        let l = limits(10, 0);
        let s = ConnState::new(epoch);
        assert_eq!(s.check(&l).1, None);
        // A head begun 11 s ago is late.
        s.head_ms.store(s.now() - 11_000, Ordering::Relaxed);
        assert_eq!(s.check(&l).1, Some("header"));
        // A request running is never timed out.
        s.begin_request();
        assert_eq!(s.check(&l).1, None);
        s.end_request();
        assert_eq!(s.check(&l).1, None, "idle from the response on");
        s.last_io_ms.store(s.now() - 76_000, Ordering::Relaxed);
        assert_eq!(s.check(&l).1, Some("idle"));
        // The first byte after an idle pause starts a head.
        s.on_read();
        assert_eq!(s.check(&l).1, None);
        assert_ne!(s.head_ms.load(Ordering::Relaxed), NONE);
    }
}
