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
//!
//! Parts: `limits` (what a connection may cost, fitted under the fd limit), `registry` (every open
//! connection, its timeouts and the eviction order), `conn` (one connection under hyper); this
//! file is the accept loop.

mod conn;
mod limits;
mod registry;

use crate::metrics::{Metrics, ReasonLabel};
use axum::Router;
use conn::Conn;
use registry::{lock, Refusal, Registry};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use limits::{fd_limit, fd_reserve, Limits, DEFAULT_MAX_CONNECTIONS};
pub use registry::EVICT_MIN_IDLE;

/// Repeated accept errors and refusals are logged at most this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

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
    let mut server = Server::new(limits, metrics);
    let mut tasks = JoinSet::new();
    let mut backoff = Duration::ZERO;
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
            Err(e) if is_connection_error(&e) => {
                // The peer gave up before we took it: nothing to fix here.
                debug!(error = %e, "accept: connection gone before it was taken");
                continue;
            }
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                server.accept_failed(&e, backoff);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                continue;
            }
        };
        if let Some(conn) = server.admit(&stream, peer) {
            let (app, limits, shutdown) = (app.clone(), server.limits.clone(), shutdown.clone());
            tasks.spawn(conn.run(stream, app, limits, shutdown));
        }
    }
    drop(listener);
    drain(tasks, grace).await;
    Ok(())
}

/// What the accept loop keeps.
struct Server {
    limits: Arc<Limits>,
    epoch: Instant,
    registry: Arc<Mutex<Registry>>,
    metrics: Arc<Metrics>,
    accept_log: Throttled,
    refuse_log: Throttled,
}

impl Server {
    fn new(limits: Limits, metrics: Arc<Metrics>) -> Server {
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
        Server {
            limits: Arc::new(limits),
            epoch: Instant::now(),
            registry: Arc::default(),
            metrics,
            accept_log: Throttled::new(),
            refuse_log: Throttled::new(),
        }
    }

    /// Out of fds or memory: frees one fd (an idle connection); the caller waits `backoff`.
    fn accept_failed(&mut self, e: &io::Error, backoff: Duration) {
        self.metrics.http_accept_errors.inc();
        let freed = lock(&self.registry).evict_one(self.epoch);
        if freed {
            self.metrics.http_connections_evicted.inc();
        }
        if let Some(n) = self.accept_log.hit() {
            warn!(
                error = %e,
                errors = n,
                retry_in = ?backoff,
                open = lock(&self.registry).len(),
                limit = self.limits.max_connections,
                fd_limit = ?fd_limit(),
                "cannot accept connections; closing an idle one and backing off \
                    (raise the fd limit or lower --http-max-connections)"
            );
        }
    }

    /// Registers a new connection (evicting one at the cap), or refuses it.
    fn admit(&mut self, stream: &TcpStream, peer: SocketAddr) -> Option<Conn> {
        let admitted = lock(&self.registry).admit(peer.ip(), &self.limits, self.epoch);
        match admitted {
            Ok((id, state, evicted)) => {
                if evicted {
                    self.metrics.http_connections_evicted.inc();
                }
                self.metrics.http_connections_accepted.inc();
                self.metrics.http_connections.inc();
                let _ = stream.set_nodelay(true);
                Some(Conn::new(
                    id,
                    peer,
                    state,
                    self.registry.clone(),
                    self.metrics.clone(),
                ))
            }
            Err(why) => {
                self.refuse(stream, why);
                None
            }
        }
    }

    /// Counts and answers a refused connection (the caller drops it).
    fn refuse(&mut self, stream: &TcpStream, why: Refusal) {
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
        self.metrics
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
        if let Some(n) = self.refuse_log.hit() {
            warn!(
                refused = n,
                reason = label,
                limit = self.limits.max_connections,
                per_addr = self.limits.max_per_addr,
                "refusing connections: every open connection is busy or active \
(or one address holds too many)"
            );
        }
    }
}

/// Waits up to `grace` for the connections, which saw the cancellation: idle ones close now,
/// busy ones after their response. What is left then is dropped.
async fn drain(mut tasks: JoinSet<()>, grace: Duration) {
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
