//! The node's HTTP server: its own accept loop over hyper's HTTP/1 connection builder, because
//! `axum::serve` has no knob for what an outsider may make the node spend.
//!
//! What a connection may cost is bounded:
//! - its request head: `max_header_bytes` of buffer (hyper's `max_buf_size`; larger gets 431), sent
//!   within `header_timeout` of the accept or of its first byte after an idle pause;
//! - its idle time: `idle_timeout` without a byte either way while no request runs (a stalled
//!   reader of a response included);
//! - the number of them: `max_connections` in all, below the fd limit with a reserve for FFmpeg
//!   pipes, files and Redis; `max_per_addr` per client address (trusted proxies exempt). At the
//!   global cap the connection that waited longest without ever completing a request, else the one
//!   idle longest (at least [`EVICT_MIN_IDLE`]), is closed to make room: idle and slow clients can
//!   never keep a viewer (or nginx) out. A connection is never closed while a request runs on it.
//!
//! Accept errors (EMFILE, ENFILE, ENOBUFS...) are counted, logged at most every
//! [`LOG_EVERY`], free an fd by closing an idle connection, and back off from 5 ms to 1 s:
//! the loop never spins and never stalls silently.
//!
//! Shutdown: the listener closes, every connection finishes its request in flight (hyper's
//! graceful shutdown), and what is left after `grace` is dropped.

use crate::config::{Config, IpNet};
use crate::metrics::{KindLabel, Metrics, ReasonLabel};
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, info, warn};

/// A connection idle for less than this is never evicted (its next request may be on the wire).
pub const EVICT_MIN_IDLE: Duration = Duration::from_secs(1);
/// Repeated accept errors and refusals are logged at most this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// The most connections the default cap allows, whatever the fd limit.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;

/// What a connection may cost (see the module docs).
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    /// 0: no per-address cap.
    pub max_per_addr: usize,
    pub trusted: Vec<IpNet>,
    /// Why `max_connections` is what it is (logged at start).
    pub why: String,
}

/// The soft RLIMIT_NOFILE of this process (`None`: unlimited or unknown).
pub fn fd_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// File descriptors kept out of the connection cap: FFmpeg pipes (a few per channel), segment
/// files being read, Redis, the watcher, the guard.
pub fn fd_reserve(max_streams: u32) -> u64 {
    let streams = if max_streams == 0 { 250 } else { max_streams };
    128 + 4 * u64::from(streams)
}

impl Limits {
    /// The limits `cfg` asks for, the connection cap fitted under `nofile` (the fd limit).
    pub fn new(cfg: &Config, nofile: Option<u64>) -> Self {
        let reserve = fd_reserve(cfg.max_streams);
        // Room under the fd limit: what is left after the reserve (on a tiny limit, up to 64
        // connections but never more than half of it).
        let room = nofile.map(|n| n.saturating_sub(reserve).max((n / 2).min(64)).max(1));
        let (max, why) = match (cfg.http_max_connections, room, nofile) {
            (Some(want), Some(room), Some(n)) if u64::from(want) > room => (
                room,
                format!(
                    "--http-max-connections {want} lowered to {room}: the fd limit is {n} and \
{reserve} are kept for FFmpeg, files and Redis (raise LimitNOFILE / ulimit -n)"
                ),
            ),
            (Some(want), _, _) => (u64::from(want), "--http-max-connections".into()),
            (None, Some(room), Some(n)) => (
                room.min(DEFAULT_MAX_CONNECTIONS),
                format!("fd limit {n} minus {reserve} kept for FFmpeg, files and Redis"),
            ),
            _ => (DEFAULT_MAX_CONNECTIONS, "no fd limit".into()),
        };
        Self {
            header_timeout: cfg.http_header_timeout,
            idle_timeout: cfg.http_idle_timeout,
            max_header_bytes: cfg.http_max_header_bytes.max(8 << 10),
            max_connections: usize::try_from(max).unwrap_or(usize::MAX).max(1),
            max_per_addr: cfg.http_max_connections_per_addr as usize,
            trusted: cfg.trusted_proxies.clone(),
            why,
        }
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(ip))
    }
}

/// No time set (an atomic millisecond field).
const NONE: u64 = u64::MAX;

/// What the server knows of one connection, shared by its task, its IO and the registry.
struct ConnState {
    epoch: Instant,
    opened_ms: u64,
    /// Last byte read or written.
    last_io_ms: AtomicU64,
    /// When the current request head began (the accept, or the first byte after an idle pause);
    /// `NONE` while idle after a response or while a request runs.
    head_ms: AtomicU64,
    /// Requests being handled (the handler has not answered yet).
    handling: AtomicU32,
    /// Requests that reached the handler.
    served: AtomicU64,
    kill: Notify,
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

    fn on_read(&self) {
        let now = self.now();
        self.last_io_ms.store(now, Ordering::Relaxed);
        if self.handling.load(Ordering::Acquire) == 0 {
            let _ = self
                .head_ms
                .compare_exchange(NONE, now, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    fn on_write(&self) {
        self.last_io_ms.store(self.now(), Ordering::Relaxed);
    }

    fn begin_request(&self) {
        self.handling.fetch_add(1, Ordering::AcqRel);
        self.served.fetch_add(1, Ordering::Relaxed);
        self.head_ms.store(NONE, Ordering::Release);
    }

    fn end_request(&self) {
        self.last_io_ms.store(self.now(), Ordering::Relaxed);
        self.handling.fetch_sub(1, Ordering::AcqRel);
    }

    /// When to look again, and what has run out by `now` (`Some("header" | "idle")`).
    fn check(&self, l: &Limits) -> (u64, Option<&'static str>) {
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

/// The socket, noting every byte either way in its [`ConnState`].
struct Tracked {
    inner: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.state.on_read();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.state.on_write();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.state.on_write();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Every open connection, by id.
#[derive(Default)]
struct Registry {
    conns: HashMap<u64, (Arc<ConnState>, Option<IpAddr>)>,
    per_addr: HashMap<IpAddr, usize>,
    /// Ids in accept order: where eviction looks first (connections that never completed a
    /// request); entries of closed or served connections are skipped lazily.
    fresh: VecDeque<u64>,
    next: u64,
}

/// Why a new connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Limit,
    PerAddress,
}

impl Registry {
    fn admit(
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

    fn remove(&mut self, id: u64) -> bool {
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
    fn evict_one(&mut self, epoch: Instant) -> bool {
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

    fn kill(&mut self, id: u64) -> bool {
        if let Some((s, _)) = self.conns.get(&id) {
            s.kill.notify_one();
        }
        self.remove(id)
    }
}

fn lock(r: &Mutex<Registry>) -> std::sync::MutexGuard<'_, Registry> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts of something that happened, logged at most every [`LOG_EVERY`].
struct Throttled {
    last: Option<Instant>,
    since: u64,
}

impl Throttled {
    fn new() -> Self {
        Self {
            last: None,
            since: 0,
        }
    }

    /// `Some(count since the last line)` when a line is due.
    fn hit(&mut self) -> Option<u64> {
        self.since += 1;
        let due = self.last.is_none_or(|t| t.elapsed() >= LOG_EVERY);
        if !due {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.since))
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown`, then lets requests in flight
/// finish for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    grace: Duration,
) -> io::Result<()> {
    let limits = Arc::new(limits);
    let epoch = Instant::now();
    let registry = Arc::new(Mutex::new(Registry::default()));
    metrics
        .http_connection_limit
        .set(limits.max_connections as i64);
    info!(
        max_connections = limits.max_connections,
        why = %limits.why,
        max_per_addr = limits.max_per_addr,
        header_timeout = ?limits.header_timeout,
        idle_timeout = ?limits.idle_timeout,
        max_header_bytes = limits.max_header_bytes,
        "http server limits"
    );
    let mut tasks = JoinSet::new();
    let mut backoff = Duration::ZERO;
    let mut accept_log = Throttled::new();
    let mut refuse_log = Throttled::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        warn!(error = %e, "an http connection task panicked");
                    }
                }
                continue;
            }
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(v) => {
                backoff = Duration::ZERO;
                v
            }
            Err(e) => {
                if is_connection_error(&e) {
                    // The peer gave up before we took it: nothing to fix here.
                    debug!(error = %e, "accept: connection gone before it was taken");
                    continue;
                }
                metrics.http_accept_errors.inc();
                // Out of fds or memory: free one fd, and wait before trying again.
                let freed = lock(&registry).evict_one(epoch);
                if freed {
                    metrics.http_connections_evicted.inc();
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                if let Some(n) = accept_log.hit() {
                    warn!(
                        error = %e,
                        errors = n,
                        retry_in = ?backoff,
                        open = lock(&registry).conns.len(),
                        limit = limits.max_connections,
                        fd_limit = ?fd_limit(),
                        "cannot accept connections; closing an idle one and backing off \
                    (raise the fd limit or lower --http-max-connections)"
                    );
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                continue;
            }
        };
        let admitted = lock(&registry).admit(peer.ip(), &limits, epoch);
        let (id, state) = match admitted {
            Ok((id, state, evicted)) => {
                if evicted {
                    metrics.http_connections_evicted.inc();
                }
                (id, state)
            }
            Err(why) => {
                let (label, status, text) = match why {
                    Refusal::Limit => (
                        "limit",
                        "503 Service Unavailable",
                        "the node is at its connection limit; retry shortly\n",
                    ),
                    Refusal::PerAddress => (
                        "per_address",
                        "429 Too Many Requests",
                        "too many connections from your address\n",
                    ),
                };
                metrics
                    .http_connections_refused
                    .get_or_create(&ReasonLabel {
                        reason: label.into(),
                    })
                    .inc();
                // One try, never a wait: the answer is a courtesy.
                let _ = stream.try_write(
                    format!(
                        "HTTP/1.1 {status}\r\nRetry-After: 1\r\nConnection: close\r\n\
Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{text}",
                        text.len()
                    )
                    .as_bytes(),
                );
                drop(stream);
                if let Some(n) = refuse_log.hit() {
                    warn!(
                        refused = n,
                        reason = label,
                        limit = limits.max_connections,
                        per_addr = limits.max_per_addr,
                        "refusing connections: every open connection is busy or active \
(or one address holds too many)"
                    );
                }
                continue;
            }
        };
        metrics.http_connections_accepted.inc();
        metrics.http_connections.inc();
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            id,
            peer,
            state,
            registry: registry.clone(),
            metrics: metrics.clone(),
        };
        let (app, limits, shutdown) = (app.clone(), limits.clone(), shutdown.clone());
        tasks.spawn(conn.run(stream, app, limits, shutdown));
    }
    drop(listener);
    // Connections saw the cancellation: idle ones close now, busy ones after their response.
    let open = tasks.len();
    if open > 0 {
        debug!(open, "waiting for http connections to finish");
    }
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(
            left = tasks.len(),
            ?grace,
            "http connections still open after the grace; closing them"
        );
        tasks.shutdown().await;
    }
    Ok(())
}

/// Accept errors about one incoming connection only (it was reset before we took it).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// One accepted connection; removed from the registry when dropped.
struct Conn {
    id: u64,
    peer: SocketAddr,
    state: Arc<ConnState>,
    registry: Arc<Mutex<Registry>>,
    metrics: Arc<Metrics>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        lock(&self.registry).remove(self.id);
        self.metrics.http_connections.dec();
    }
}

/// Marks a request as running on its connection until dropped.
struct Handling(Arc<ConnState>);

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.end_request();
    }
}

impl Conn {
    async fn run(
        self,
        stream: TcpStream,
        app: Router,
        limits: Arc<Limits>,
        shutdown: CancellationToken,
    ) {
        let state = self.state.clone();
        let peer = self.peer;
        // Nothing is allocated for a connection until it sends something (hyper reserves its read
        // buffer on the first poll): an idle one costs only its socket and this task.
        let first = tokio::time::Instant::from_std(
            state.epoch + Duration::from_millis(state.opened_ms) + limits.header_timeout,
        );
        tokio::select! {
            r = stream.readable() => {
                if r.is_err() {
                    return;
                }
            }
            _ = state.kill.notified() => return,
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(first) => {
                self.metrics
                    .http_connections_timed_out
                    .get_or_create(&KindLabel { kind: "header".into() })
                    .inc();
                return;
            }
        }
        let io = TokioIo::new(Tracked {
            inner: stream,
            state: state.clone(),
        });
        let svc_state = state.clone();
        let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            svc_state.begin_request();
            let guard = Handling(svc_state.clone());
            let mut req = req.map(axum::body::Body::new);
            req.extensions_mut().insert(ConnectInfo(peer));
            let call = app.clone().oneshot(req);
            async move {
                let resp = call.await;
                drop(guard);
                resp
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .max_buf_size(limits.max_header_bytes)
            .keep_alive(true);
        let conn = builder.serve_connection(io, svc);
        tokio::pin!(conn);
        let mut draining = false;
        loop {
            let (due, expired) = state.check(&limits);
            if let Some(kind) = expired {
                self.metrics
                    .http_connections_timed_out
                    .get_or_create(&KindLabel { kind: kind.into() })
                    .inc();
                debug!(peer = %peer, kind, "closing a connection: timeout");
                return;
            }
            let wake = tokio::time::Instant::from_std(state.epoch + Duration::from_millis(due));
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = state.kill.notified() => {
                    debug!(peer = %peer, "closing a connection to make room for a new one");
                    return;
                }
                _ = shutdown.cancelled(), if !draining => {
                    conn.as_mut().graceful_shutdown();
                    draining = true;
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn the_cap_evicts_connections_that_never_sent_a_request_first() {
        let epoch = Instant::now() - Duration::from_secs(100);
        let l = limits(3, 0);
        let mut r = Registry::default();
        let (a, sa, _) = r.admit(ip("10.0.0.1"), &l, epoch).expect("a");
        sa.begin_request();
        sa.end_request();
        // a served a request and has been idle; b and c never sent one.
        sa.last_io_ms.store(0, Ordering::Relaxed);
        let (b, _, _) = r.admit(ip("10.0.0.2"), &l, epoch).expect("b");
        let (c, sc, _) = r.admit(ip("10.0.0.3"), &l, epoch).expect("c");
        let (_, _, evicted) = r.admit(ip("10.0.0.4"), &l, epoch).expect("d");
        assert!(evicted);
        assert!(!r.conns.contains_key(&b), "the oldest fresh one goes first");
        assert!(r.conns.contains_key(&a) && r.conns.contains_key(&c));
        // A connection with a request running is never evicted.
        sc.begin_request();
        let (_, _, evicted) = r.admit(ip("10.0.0.5"), &l, epoch).expect("e");
        assert!(evicted);
        assert!(r.conns.contains_key(&c));
        assert_eq!(r.conns.len(), 3);
    }

    #[test]
    fn busy_or_just_active_connections_are_not_evicted_and_the_newcomer_is_refused() {
        let epoch = Instant::now();
        let l = limits(2, 0);
        let mut r = Registry::default();
        let (_, s1, _) = r.admit(ip("10.0.0.1"), &l, epoch).expect("1");
        let (_, s2, _) = r.admit(ip("10.0.0.2"), &l, epoch).expect("2");
        s1.begin_request();
        s2.begin_request();
        s2.end_request();
        // s2 was active just now: not evictable yet.
        assert_eq!(
            r.admit(ip("10.0.0.3"), &l, epoch).err(),
            Some(Refusal::Limit)
        );
    }

    #[test]
    fn per_address_cap_exempts_trusted_proxies() {
        let epoch = Instant::now();
        let l = limits(100, 2);
        let mut r = Registry::default();
        let (a, _, _) = r.admit(ip("10.0.0.9"), &l, epoch).expect("1");
        r.admit(ip("10.0.0.9"), &l, epoch).expect("2");
        assert_eq!(
            r.admit(ip("10.0.0.9"), &l, epoch).err(),
            Some(Refusal::PerAddress)
        );
        for _ in 0..5 {
            r.admit(ip("127.0.0.1"), &l, epoch).expect("trusted");
        }
        assert!(r.remove(a));
        assert!(!r.remove(a), "removed once");
        r.admit(ip("10.0.0.9"), &l, epoch).expect("room again");
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

    #[test]
    fn the_default_cap_stays_under_the_fd_limit() {
        let mut cfg =
            crate::config::Config::from_args(<crate::config::Args as clap::Parser>::parse_from([
                "farm-node",
            ]))
            .expect("defaults");
        let l = Limits::new(&cfg, Some(1024));
        assert_eq!(l.max_connections, 1024 - 528);
        assert!(l.why.contains("1024"), "{}", l.why);
        let l = Limits::new(&cfg, Some(1 << 20));
        assert_eq!(l.max_connections, DEFAULT_MAX_CONNECTIONS as usize);
        cfg.http_max_connections = Some(5000);
        let l = Limits::new(&cfg, Some(1024));
        assert_eq!(l.max_connections, 496, "lowered to fit: {}", l.why);
        assert!(l.why.contains("lowered"), "{}", l.why);
    }
}
