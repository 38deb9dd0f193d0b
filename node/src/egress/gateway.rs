//! One channel's egress gateway: a tiny HTTP forward proxy on 127.0.0.1 (absolute-form `GET` and
//! `CONNECT` for TLS) that FFmpeg reads every `http`/`https` upstream through. It resolves each
//! destination itself, asks the [`Policy`], and connects to exactly the address it checked.
//!
//! Gateways live in the guard process (see `guard`), not in the node: the upstream connections
//! they hold end at the node's fence even while the node process is frozen. A gateway passes
//! bytes only while its [`FenceClock`] is open: at a fence it drops every connection, and until
//! the next renewal it answers new ones with 503 and relays nothing (checked before every write,
//! so data that queued up while the host was frozen is not delivered after the deadline).
//!
//! What an upstream can make a channel cost is capped here ([`Limits`], per channel, all its
//! connections together): the size of a response head (an endless header is cut and FFmpeg gets
//! 502), the time to the response head (504), the bytes per second relayed to FFmpeg (throttled,
//! so a fast upstream costs no more than a live channel needs), and the requests per second (429
//! beyond a small burst: a playlist that names itself ends the FFmpeg run at once instead of a hot
//! loop). Each is counted and logged (at most once a second per kind and channel) and reported to
//! the node, where it lands in the channel's `last_error`. Only the channel's own FFmpeg may
//! connect ([`super::peer`]); any other local process is refused.

use super::peer::{PeerTable, Verdict};
use super::policy::{vouched, Policy, Refusal};
use crate::guard::fence::FenceClock;
use farm_proto::redis_url::split_host_port;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, warn, Instrument};

/// The longest request head FFmpeg may send the gateway.
const MAX_HEAD: usize = 16 * 1024;
/// Connections open through one gateway at most: an FFmpeg fetches one file at a time per
/// playlist, so more means a playlist fanning out (many variants), which gets 503s instead.
pub const MAX_CONNECTIONS: usize = 64;
/// Relay buffer per direction and connection (tokio's `copy` uses the same).
const RELAY_BUF: usize = 8 * 1024;
/// How long a connection from a process not known (yet) is held while its channel has no live
/// FFmpeg known: the node announces an FFmpeg right after spawning it, usually within a millisecond.
const PEER_WAIT: Duration = Duration::from_secs(2);
/// Such connections held at once per gateway; beyond, they are refused at once.
const PEER_WAITING: usize = 8;
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

/// What a gateway needs to decide and connect.
pub struct GatewayConfig {
    pub channel: String,
    pub policy: Arc<Policy>,
    /// The `host:port`s the channel's catalog names (see [`vouched`]).
    pub vouched: HashSet<(String, u16)>,
    /// Resolve, connect, request-head and response-head bound.
    pub timeout: Duration,
    pub max_connections: usize,
    /// Credentials FFmpeg's masked URLs leave out (see [`farm_proto::redact::mask`]): put back
    /// into plain-HTTP requests for their own `host:port` only.
    pub secrets: Vec<farm_proto::redact::OriginSecrets>,
    pub limits: Limits,
    /// The FFmpegs that may connect (the guard's table); `None` lets any local process in (unit
    /// tests of the proxy itself only).
    pub peers: Option<Arc<PeerTable>>,
}

impl GatewayConfig {
    /// The usual settings for a channel reading `sources`.
    pub fn new(channel: &str, policy: Arc<Policy>, sources: &[String], timeout: Duration) -> Self {
        GatewayConfig {
            channel: channel.to_string(),
            policy,
            vouched: vouched(sources),
            timeout,
            max_connections: MAX_CONNECTIONS,
            secrets: Vec::new(),
            limits: Limits::default(),
            peers: None,
        }
    }
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

/// Counts limits and reports them at most once per [`REPORT_EVERY`] and kind, and at once the
/// first time for each FFmpeg process (it explains that FFmpeg's exit, which the node is about to
/// see: a new run must not wait for the second to pass).
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
    /// `pid`: the FFmpeg whose request it was (0 when not known).
    fn report(&self, kind: LimitKind, why: String, pid: u32) {
        let i = LimitKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        let due = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
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

struct GatewayCtx {
    cfg: GatewayConfig,
    events: EventSink,
    fence: Arc<FenceClock>,
    requests: Option<Mutex<Bucket>>,
    bandwidth: Option<Mutex<Bucket>>,
    reporter: Reporter,
}

impl GatewayCtx {
    fn new(cfg: GatewayConfig, events: EventSink, fence: Arc<FenceClock>) -> GatewayCtx {
        let l = cfg.limits;
        let requests = (l.requests_per_sec > 0).then(|| {
            Mutex::new(Bucket::new(
                f64::from(l.requests_per_sec),
                f64::from(l.burst.max(1)),
            ))
        });
        // One second of bytes may come at once (a live source's start-up burst).
        let bandwidth = (l.bytes_per_sec > 0)
            .then(|| Mutex::new(Bucket::new(l.bytes_per_sec as f64, l.bytes_per_sec as f64)));
        let reporter = Reporter {
            channel: cfg.channel.clone(),
            events: events.clone(),
            state: Mutex::default(),
        };
        GatewayCtx {
            cfg,
            events,
            fence,
            requests,
            bandwidth,
            reporter,
        }
    }

    /// Whether one more request may go out now.
    fn request_allowed(&self) -> bool {
        self.requests.as_ref().is_none_or(|b| {
            b.lock()
                .unwrap_or_else(|p| p.into_inner())
                .try_take(1.0, Instant::now())
        })
    }
}

/// One channel's HTTP forward proxy on 127.0.0.1. Dropping it closes the listener and every
/// connection through it.
pub struct Gateway {
    port: u16,
    task: JoinHandle<()>,
}

/// What becomes of an accepted connection.
enum Admit {
    /// From this FFmpeg (0: unchecked).
    Serve(TcpStream, u32),
    Answer(TcpStream, &'static str, String),
    /// Held until the channel's FFmpeg is announced (or refused after [`PEER_WAIT`]).
    Wait(TcpStream, SocketAddr),
}

impl Gateway {
    pub async fn open(
        cfg: GatewayConfig,
        events: EventSink,
        fence: Arc<FenceClock>,
    ) -> std::io::Result<Gateway> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let local = listener.local_addr()?;
        let port = local.port();
        let span = tracing::info_span!("egress", channel = %cfg.channel, port);
        let max = cfg.max_connections.max(1);
        let ctx = Arc::new(GatewayCtx::new(cfg, events, fence));
        let mut fences = ctx.fence.fences();
        let task = tokio::spawn(
            async move {
                // Connections live in these sets: aborting the accept loop drops them all.
                let mut conns = JoinSet::new();
                // Connections from a process not known yet, until it is (or PEER_WAIT).
                let mut waiting: JoinSet<Option<(TcpStream, u32)>> = JoinSet::new();
                // Strangers being answered 403 (reading their request first, so the answer is
                // not lost to a reset); beyond as many as may wait, they are dropped unanswered.
                let mut refusing = JoinSet::new();
                loop {
                    let admit = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((stream, peer)) => admit(&ctx, stream, local, peer, waiting.len()),
                            Err(e) => {
                                warn!(error = %e, "egress gateway accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        },
                        Some(done) = waiting.join_next(), if !waiting.is_empty() => match done {
                            Ok(Some((stream, pid))) => Admit::Serve(stream, pid),
                            _ => continue,
                        },
                        Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                        Some(_) = refusing.join_next(), if !refusing.is_empty() => continue,
                        changed = fences.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            if !conns.is_empty() {
                                debug!(connections = conns.len(), "fence: dropping every connection");
                            }
                            conns.abort_all();
                            continue;
                        }
                    };
                    match admit {
                        Admit::Serve(mut stream, pid) => {
                            if !ctx.fence.is_open() {
                                conns.spawn(async move {
                                    answer(&mut stream, "503 Service Unavailable", "fenced: this node has not renewed its leases").await;
                                });
                            } else if conns.len() >= max {
                                conns.spawn(async move {
                                    let why = format!("over {max} connections at once");
                                    answer(&mut stream, "503 Service Unavailable", &why).await;
                                });
                            } else {
                                conns.spawn(serve(stream, ctx.clone(), pid));
                            }
                        }
                        Admit::Answer(mut stream, status, why) => {
                            if refusing.len() < PEER_WAITING {
                                let timeout = ctx.cfg.timeout.min(Duration::from_secs(1));
                                refusing.spawn(async move {
                                    let mut buf = [0u8; 2048];
                                    let _ = tokio::time::timeout(timeout, stream.read(&mut buf)).await;
                                    answer(&mut stream, status, &why).await;
                                });
                            }
                        }
                        Admit::Wait(stream, peer) => {
                            let ctx = ctx.clone();
                            waiting.spawn(async move { wait_for_ffmpeg(&ctx, stream, local, peer).await });
                        }
                    }
                }
            }
            .instrument(span),
        );
        Ok(Gateway { port, task })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `-http_proxy` value for FFmpeg.
    pub fn proxy_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const NOT_YOURS: &str = "403 Forbidden";

/// The peer check, at accept.
fn admit(
    ctx: &GatewayCtx,
    stream: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
    waiting: usize,
) -> Admit {
    let Some(table) = &ctx.cfg.peers else {
        return Admit::Serve(stream, 0);
    };
    match super::peer::check(table, &ctx.cfg.channel, local, peer) {
        Verdict::Ours(pid) => Admit::Serve(stream, pid),
        Verdict::NotYet if waiting < PEER_WAITING => Admit::Wait(stream, peer),
        Verdict::NotYet => stranger(ctx, stream, peer, "no FFmpeg of this channel runs"),
        Verdict::Stranger(why) => stranger(ctx, stream, peer, &why),
    }
}

fn stranger(ctx: &GatewayCtx, stream: TcpStream, peer: SocketAddr, why: &str) -> Admit {
    let why = format!("connection from {peer} refused: {why}");
    ctx.reporter.report(LimitKind::Peer, why.clone(), 0);
    Admit::Answer(stream, NOT_YOURS, why)
}

/// Holds a connection from a process not known yet until the channel's FFmpeg is announced, then
/// checks again; refuses it when none is within [`PEER_WAIT`].
async fn wait_for_ffmpeg(
    ctx: &GatewayCtx,
    mut stream: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
) -> Option<(TcpStream, u32)> {
    let table = ctx.cfg.peers.as_ref()?;
    let mut changes = table.changes();
    let until = tokio::time::Instant::now() + PEER_WAIT;
    let why = loop {
        match super::peer::check(table, &ctx.cfg.channel, local, peer) {
            Verdict::Ours(pid) => return Some((stream, pid)),
            Verdict::Stranger(why) => break why,
            Verdict::NotYet => {}
        }
        match tokio::time::timeout_at(until, changes.changed()).await {
            Ok(Ok(())) => {}
            _ => break format!("no FFmpeg of this channel holds it within {PEER_WAIT:?}"),
        }
    };
    let why = format!("connection from {peer} refused: {why}");
    ctx.reporter.report(LimitKind::Peer, why.clone(), 0);
    answer(&mut stream, NOT_YOURS, &why).await;
    None
}
/// A parsed request head: the destination and the head to send on (for plain HTTP).
struct Head {
    connect: bool,
    host: String,
    port: u16,
    /// For `GET`-style requests: the request rewritten to origin form with `Connection: close`.
    forward: Vec<u8>,
}

fn parse_head(
    buf: &[u8],
    secrets: &[farm_proto::redact::OriginSecrets],
) -> Result<Option<(Head, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("bad request head: {e}")),
    };
    let method = req.method.unwrap_or_default();
    let target = req.path.unwrap_or_default();
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) =
            split_host_port(target, 0).ok_or_else(|| format!("bad CONNECT target {target:?}"))?;
        return Ok(Some((
            Head {
                connect: true,
                host,
                port,
                forward: Vec::new(),
            },
            used,
        )));
    }
    // Absolute form only: `http://host[:port]/path`.
    let rest = target
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("http://"))
        .map(|_| &target[7..])
        .ok_or_else(|| format!("not a proxy request: {target:?}"))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let hostport = authority.rsplit('@').next().unwrap_or_default();
    let (host, port) =
        split_host_port(hostport, 80).ok_or_else(|| format!("bad URL {target:?}"))?;
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    // FFmpeg read a masked URL: the credentials go back in here, for that origin only.
    let origin = secrets.iter().find(|s| s.host == host && s.port == port);
    let path = match origin {
        Some(o) => o.unmask(&path),
        None => path,
    };
    let mut out = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
    let has_auth = req
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("authorization"));
    if let Some(basic) = origin.and_then(|o| o.basic.as_ref()).filter(|_| !has_auth) {
        out.extend_from_slice(b"Authorization: Basic ");
        out.extend_from_slice(base64(basic.0.as_bytes()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        if matches!(
            name.as_str(),
            "connection" | "proxy-connection" | "proxy-authorization" | "keep-alive"
        ) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Some((
        Head {
            connect: false,
            host,
            port,
            forward: out,
        },
        used,
    )))
}

/// Standard base64 with padding (RFC 4648), for `Authorization: Basic`.
fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn answer(client: &mut TcpStream, status: &str, body: &str) {
    let retry = if status.starts_with("429") {
        "Retry-After: 1\r\n"
    } else {
        ""
    };
    let text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{retry}Connection: close\r\n\r\n{body}\n",
        body.len() + 1
    );
    let _ = client.write_all(text.as_bytes()).await;
    let _ = client.shutdown().await;
}

/// Where an upstream's response head ends (after its blank line), if it has ended.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    (start..buf.len()).find_map(|i| {
        if buf[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if buf[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

/// Why an upstream's response head was not taken.
enum HeadError {
    TooLong,
    Stalled,
    Closed(String),
}

/// Reads an upstream's response head (and whatever came with it), up to `max` bytes and
/// `timeout` in all: a head that never ends or comes a byte at a time is cut.
async fn response_head(
    upstream: &mut TcpStream,
    max: usize,
    timeout: Duration,
) -> Result<Vec<u8>, HeadError> {
    let mut buf = Vec::with_capacity(4096);
    tokio::time::timeout(timeout, async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = upstream
                .read(&mut chunk)
                .await
                .map_err(|e| HeadError::Closed(e.to_string()))?;
            if n == 0 {
                return Err(HeadError::Closed("closed before a response".into()));
            }
            let from = buf.len();
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = head_end(&buf, from) {
                if end > max {
                    return Err(HeadError::TooLong);
                }
                return Ok(());
            }
            if buf.len() > max {
                return Err(HeadError::TooLong);
            }
        }
    })
    .await
    .map_err(|_| HeadError::Stalled)??;
    Ok(buf)
}

/// One proxied request of the FFmpeg `pid` (0: not known).
async fn serve(mut client: TcpStream, ctx: Arc<GatewayCtx>, pid: u32) {
    let cfg = &ctx.cfg;
    let mut buf = Vec::with_capacity(2048);
    let head = tokio::time::timeout(cfg.timeout, async {
        loop {
            let mut chunk = [0u8; 2048];
            let n = client.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before a request".to_string());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(h) = parse_head(&buf, &cfg.secrets)? {
                return Ok(h);
            }
            if buf.len() > MAX_HEAD {
                return Err(format!("request head over {MAX_HEAD} bytes"));
            }
        }
    })
    .await;
    let (head, used) = match head {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            debug!(error = %e, "egress request refused");
            answer(&mut client, "400 Bad Request", &e).await;
            return;
        }
        Err(_) => return,
    };
    if !ctx.request_allowed() {
        let l = cfg.limits;
        let why = format!(
            "upstream requests over {}/s (burst {}): answered 429 (a playlist that names itself?)",
            l.requests_per_sec, l.burst
        );
        ctx.reporter.report(LimitKind::Rate, why.clone(), pid);
        answer(&mut client, "429 Too Many Requests", &why).await;
        return;
    }
    let vouched = cfg.vouched.contains(&(head.host.clone(), head.port));
    let addrs = match cfg
        .policy
        .resolve(&head.host, head.port, vouched, cfg.timeout)
        .await
    {
        Ok(a) => a,
        Err(Refusal::Unresolved(e)) => {
            answer(&mut client, "502 Bad Gateway", &e).await;
            return;
        }
        Err(Refusal::Refused(e)) => {
            let why = format!("egress to {}:{} refused: {e}", head.host, head.port);
            warn!(channel = %cfg.channel, "{why}");
            (ctx.events)(GatewayEvent::Refused(why.clone()));
            answer(&mut client, "403 Forbidden", &why).await;
            return;
        }
    };
    let mut upstream = None;
    let mut last_err = String::new();
    for a in &addrs {
        match tokio::time::timeout(cfg.timeout, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                upstream = Some(s);
                break;
            }
            Ok(Err(e)) => last_err = format!("{a}: {e}"),
            Err(_) => last_err = format!("{a}: no answer within {:?}", cfg.timeout),
        }
    }
    let Some(mut upstream) = upstream else {
        answer(
            &mut client,
            "502 Bad Gateway",
            &format!("cannot connect to {}:{}: {last_err}", head.host, head.port),
        )
        .await;
        return;
    };
    if !ctx.fence.is_open() {
        // The fence closed while this one was resolving or connecting.
        return;
    }
    (ctx.events)(GatewayEvent::Connected);
    let _ = upstream.set_nodelay(true);
    let rest = &buf[used..];
    let sent = if head.connect {
        match client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
        {
            Ok(()) => upstream.write_all(rest).await,
            Err(e) => Err(e),
        }
    } else {
        match upstream.write_all(&head.forward).await {
            Ok(()) => upstream.write_all(rest).await,
            Err(e) => Err(e),
        }
    };
    if sent.is_err() {
        return;
    }
    let dest = format!("{}:{}", head.host, head.port);
    // Plain HTTP: the response head is read here, bounded in size and time (inside TLS it cannot
    // be seen: there the bandwidth cap and FFmpeg's own read timeout bound it).
    let mut first = Vec::new();
    if !head.connect {
        let l = cfg.limits;
        match response_head(&mut upstream, l.head_max, cfg.timeout).await {
            Ok(b) => first = b,
            Err(e) => {
                let (kind, status, why) = match e {
                    HeadError::TooLong => (
                        Some(LimitKind::Head),
                        "502 Bad Gateway",
                        format!(
                            "upstream {dest} sent a response head over {} bytes: cut",
                            l.head_max
                        ),
                    ),
                    HeadError::Stalled => (
                        Some(LimitKind::Stall),
                        "504 Gateway Timeout",
                        format!(
                            "upstream {dest} sent no response head within {:?}",
                            cfg.timeout
                        ),
                    ),
                    HeadError::Closed(e) => {
                        (None, "502 Bad Gateway", format!("upstream {dest}: {e}"))
                    }
                };
                if let Some(kind) = kind {
                    ctx.reporter.report(kind, why.clone(), pid);
                }
                answer(&mut client, status, &why).await;
                return;
            }
        }
    }
    // Either side ending ends both: FFmpeg closes when it gives up on a stalled upstream, and the
    // upstream closes after its response (`Connection: close`).
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let down = Throttle {
        pid,
        ctx: &ctx,
        dest: &dest,
        throttled: false,
    };
    tokio::select! {
        _ = pump(&first, &mut ur, &mut cw, &ctx.fence, Some(down)) => {}
        _ = pump(&[], &mut cr, &mut uw, &ctx.fence, None) => {}
    }
}

/// The channel's bandwidth cap on one connection's way down to FFmpeg.
struct Throttle<'a> {
    pid: u32,
    ctx: &'a GatewayCtx,
    dest: &'a str,
    /// Reported once per connection.
    throttled: bool,
}

impl Throttle<'_> {
    /// Waits until `n` more bytes fit the channel's rate.
    async fn pass(&mut self, n: usize) {
        let Some(bucket) = &self.ctx.bandwidth else {
            return;
        };
        let wait = bucket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(n as f64, Instant::now());
        if wait.is_zero() {
            return;
        }
        if !self.throttled {
            self.throttled = true;
            let mbit = self.ctx.cfg.limits.bytes_per_sec * 8 / 1_000_000;
            self.ctx.reporter.report(
                LimitKind::Bandwidth,
                format!("upstream {} throttled to {mbit} Mbit/s", self.dest),
                self.pid,
            );
        }
        tokio::time::sleep(wait).await;
    }
}

/// Writes `first`, then copies until EOF, an error, or the fence: nothing read is written once
/// the deadline passed. With a throttle, no faster than the channel's bandwidth cap.
async fn pump<R, W>(
    first: &[u8],
    from: &mut R,
    to: &mut W,
    fence: &FenceClock,
    mut throttle: Option<Throttle<'_>>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !first.is_empty() {
        if let Some(t) = throttle.as_mut() {
            t.pass(first.len()).await;
        }
        if !fence.is_open() {
            return Err(std::io::Error::other("fenced"));
        }
        to.write_all(first).await?;
    }
    let mut buf = vec![0u8; RELAY_BUF];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        if let Some(t) = throttle.as_mut() {
            t.pass(n).await;
        }
        if !fence.is_open() {
            return Err(std::io::Error::other("fenced"));
        }
        to.write_all(&buf[..n]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IpNet;

    async fn policy() -> Policy {
        Policy::new(
            &[
                ("Redis".into(), "127.0.0.1".into(), 6379),
                ("sentinel".into(), "10.1.2.3".into(), 26379),
            ],
            vec![IpNet::parse("192.168.50.0/24").expect("net")],
            vec![IpNet::parse("203.0.113.0/24").expect("net")],
        )
        .await
    }

    /// A sink that keeps every event.
    fn recorder() -> (EventSink, Arc<Mutex<Vec<GatewayEvent>>>) {
        let seen: Arc<Mutex<Vec<GatewayEvent>>> = Arc::default();
        let s = seen.clone();
        (
            Arc::new(move |e| s.lock().unwrap_or_else(|p| p.into_inner()).push(e)),
            seen,
        )
    }

    async fn ask(port: u16, req: String) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    #[test]
    fn proxy_heads_are_rewritten_to_origin_form_with_connection_close() {
        let raw: &[u8] = b"GET http://Up.Example:8080/live/a.m3u8?t=1 HTTP/1.1\r\nHost: up.example:8080\r\nConnection: keep-alive\r\nProxy-Authorization: x\r\nUser-Agent: Lavf\r\n\r\nrest";
        let (h, used) = parse_head(raw, &[]).expect("parse").expect("complete");
        assert!(!h.connect);
        assert_eq!((h.host.as_str(), h.port), ("up.example", 8080));
        let fwd = String::from_utf8(h.forward).expect("utf8");
        assert!(
            fwd.starts_with("GET /live/a.m3u8?t=1 HTTP/1.1\r\n"),
            "{fwd}"
        );
        assert!(fwd.contains("User-Agent: Lavf\r\n") && fwd.contains("Host: up.example:8080"));
        assert!(!fwd.to_ascii_lowercase().contains("keep-alive"));
        assert!(!fwd.contains("Proxy-Authorization"));
        assert!(fwd.ends_with("Connection: close\r\n\r\n"));
        assert_eq!(&raw[used..], b"rest");

        let (c, _) = parse_head(b"CONNECT [::1]:443 HTTP/1.1\r\nHost: x\r\n\r\n", &[])
            .expect("parse")
            .expect("complete");
        assert!(c.connect);
        assert_eq!((c.host.as_str(), c.port), ("::1", 443));

        assert!(parse_head(b"GET /origin-form HTTP/1.1\r\n\r\n", &[]).is_err());
        assert!(parse_head(b"GET ftp://x/ HTTP/1.1\r\n\r\n", &[]).is_err());
        assert!(parse_head(b"CONNECT nohost HTTP/1.1\r\n\r\n", &[]).is_err());
        assert!(parse_head(b"GET http://x/ HTTP/1.1\r\nHost", &[])
            .expect("partial")
            .is_none());
    }

    #[test]
    fn masked_urls_get_their_credentials_back_for_their_origin_only() {
        let m = farm_proto::redact::mask(
            "http://us%3Ar:p%40ss@up.example:8080/live/usr/pwd/7.ts?token=TOK&mode=x",
            "n0",
            80,
        );
        let secrets = vec![m.secrets.expect("secrets")];
        let head = |target: &str, extra: &str| {
            let raw = format!("GET {target} HTTP/1.1\r\nHost: h\r\n{extra}\r\n");
            let (h, _) = parse_head(raw.as_bytes(), &secrets)
                .expect("parse")
                .expect("complete");
            String::from_utf8(h.forward).expect("utf8")
        };
        // FFmpeg sends the masked URL in absolute form (no userinfo)
        let fwd = head(&m.url.replacen("up.example", "Up.Example", 1), "");
        assert!(
            fwd.starts_with("GET /live/usr/pwd/7.ts?token=TOK&mode=x HTTP/1.1\r\n"),
            "{fwd}"
        );
        // base64("us:r:p@ss")
        assert!(
            fwd.contains("Authorization: Basic dXM6cjpwQHNz\r\n"),
            "{fwd}"
        );
        // a relative segment resolved against the masked playlist URL
        let fwd = head("http://up.example:8080/live/sfn0z0/sfn0z1/7_1.ts", "");
        assert!(
            fwd.starts_with("GET /live/usr/pwd/7_1.ts HTTP/1.1"),
            "{fwd}"
        );
        // FFmpeg's own Authorization (after a 401) is not doubled
        let fwd = head(&m.url, "Authorization: Digest x\r\n");
        assert_eq!(fwd.matches("Authorization").count(), 1, "{fwd}");
        // another origin (a redirect, another port) never gets them
        for other in [
            "http://evil.example:8080/live/sfn0z0/sfn0z1/7.ts",
            "http://up.example:8081/live/sfn0z0/sfn0z1/7.ts",
        ] {
            let fwd = head(other, "");
            assert!(
                !fwd.contains("usr") && !fwd.contains("Authorization"),
                "{fwd}"
            );
        }
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
    }

    #[tokio::test]
    async fn the_gateway_refuses_what_the_policy_refuses_and_forwards_the_rest() {
        // An upstream that answers one request and records what it got.
        let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let up_port = up.local_addr().expect("addr").port();
        let got = tokio::spawn(async move {
            let (mut s, _) = up.accept().await.expect("accept");
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.expect("read");
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await
                .expect("write");
            String::from_utf8_lossy(&buf[..n]).to_string()
        });
        let (sink, seen) = recorder();
        let gw = Gateway::open(
            GatewayConfig::new(
                "ch",
                Arc::new(policy().await),
                &[format!("http://127.0.0.1:{up_port}/live.m3u8")],
                Duration::from_secs(2),
            ),
            sink,
            Arc::new(FenceClock::open_forever()),
        )
        .await
        .expect("gateway");
        let refused = || {
            seen.lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|e| matches!(e, GatewayEvent::Refused(_)))
                .count()
        };

        let ok = ask(
            gw.port(),
            format!("GET http://127.0.0.1:{up_port}/seg.ts HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        )
        .await;
        assert!(
            ok.starts_with("HTTP/1.1 200 OK") && ok.ends_with("ok"),
            "{ok}"
        );
        let got = got.await.expect("upstream");
        assert!(got.starts_with("GET /seg.ts HTTP/1.1\r\n"), "{got}");
        assert_eq!(
            seen.lock().unwrap_or_else(|p| p.into_inner())[..],
            [GatewayEvent::Connected]
        );

        for req in [
            "GET http://127.0.0.1:6379/seg.ts HTTP/1.1\r\n\r\n".to_string(),
            "CONNECT 127.0.0.1:6379 HTTP/1.1\r\n\r\n".to_string(),
            "GET http://localhost:6379/ HTTP/1.1\r\n\r\n".to_string(),
            // Same host as the catalog, another port: an internal address the catalog does not name.
            format!("GET http://127.0.0.1:{}/ HTTP/1.1\r\n\r\n", up_port ^ 1),
        ] {
            let r = ask(gw.port(), req.clone()).await;
            assert!(r.starts_with("HTTP/1.1 403"), "{req}: {r}");
        }
        assert_eq!(refused(), 4);
        assert!(seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .is_some_and(
                |e| matches!(e, GatewayEvent::Refused(r) if r.contains("internal address"))
            ));
        let bad = ask(gw.port(), "GET /x HTTP/1.1\r\n\r\n".into()).await;
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
        // A name that does not resolve is a gateway error, not a refusal.
        let nx = ask(
            gw.port(),
            "GET http://no-such-host.invalid/x HTTP/1.1\r\n\r\n".into(),
        )
        .await;
        assert!(nx.starts_with("HTTP/1.1 502"), "{nx}");
        assert_eq!(refused(), 4);

        // Connections that hold without a request fill the gateway; the next one gets a 503.
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(
                TcpStream::connect(("127.0.0.1", gw.port()))
                    .await
                    .expect("connect"),
            );
        }
        let full = ask(gw.port(), "CONNECT example.com:443 HTTP/1.1\r\n\r\n".into()).await;
        assert!(full.starts_with("HTTP/1.1 503"), "{full}");
        drop(held);
    }

    /// An upstream that streams bytes on every connection until the peer goes; counts the open ones.
    async fn streaming_upstream() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = up.local_addr().expect("addr").port();
        let open = Arc::new(AtomicUsize::new(0));
        let o = open.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = up.accept().await {
                let o = o.clone();
                tokio::spawn(async move {
                    o.fetch_add(1, Ordering::SeqCst);
                    let mut head = [0u8; 1024];
                    let _ = s.read(&mut head).await;
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
                    while s.write_all(&[0x47; 1316]).await.is_ok() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (port, open)
    }

    #[tokio::test]
    async fn at_the_fence_the_gateway_drops_its_connections_and_relays_nothing_more() {
        use std::sync::atomic::Ordering;
        let (up_port, open) = streaming_upstream().await;
        let fence = Arc::new(FenceClock::closed());
        let (sink, _) = recorder();
        let gw = Gateway::open(
            GatewayConfig::new(
                "ch",
                Arc::new(policy().await),
                &[format!("http://127.0.0.1:{up_port}/live.ts")],
                Duration::from_secs(2),
            ),
            sink,
            fence.clone(),
        )
        .await
        .expect("gateway");
        let get = format!("GET http://127.0.0.1:{up_port}/live.ts HTTP/1.1\r\n\r\n");
        // No deadline yet: closed.
        let r = ask(gw.port(), get.clone()).await;
        assert!(r.starts_with("HTTP/1.1 503") && r.contains("fenced"), "{r}");

        // Armed for 300 ms: bytes flow, then stop at the deadline without anyone calling fence().
        fence.extend(crate::guard::fence::monotonic_ns() + 300_000_000);
        let mut s = TcpStream::connect(("127.0.0.1", gw.port()))
            .await
            .expect("connect");
        s.write_all(get.as_bytes()).await.expect("write");
        let t = std::time::Instant::now();
        let mut total = 0usize;
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => total += n,
                Err(_) => panic!("the relay still ran 5 s after its deadline"),
            }
        }
        let ended = t.elapsed();
        assert!(total > 10_000, "{total} bytes before the deadline");
        assert!(
            (Duration::from_millis(250)..Duration::from_millis(1500)).contains(&ended),
            "relay ended {ended:?} after a 300 ms deadline"
        );
        crate::guard::tests_wait(|| open.load(Ordering::SeqCst) == 0).await;

        // Renewed: open again. A fence drops a connection that is idle (a stalled upstream too).
        fence.extend(u64::MAX);
        let mut idle = TcpStream::connect(("127.0.0.1", gw.port()))
            .await
            .expect("connect");
        idle.write_all(b"GET http://127.0.0.1:")
            .await
            .expect("half a head");
        let mut s = TcpStream::connect(("127.0.0.1", gw.port()))
            .await
            .expect("connect");
        s.write_all(get.as_bytes()).await.expect("write");
        let n = s.read(&mut buf).await.expect("read");
        assert!(n > 0);
        crate::guard::tests_wait(|| open.load(Ordering::SeqCst) == 1).await;
        fence.fence();
        for c in [&mut s, &mut idle] {
            let end = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    match c.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            assert!(end.is_ok(), "a connection outlived the fence");
        }
        crate::guard::tests_wait(|| open.load(Ordering::SeqCst) == 0).await;
    }

    /// An upstream that answers every connection with `answer(n)` (n: the connection's number)
    /// and counts connections.
    async fn scripted_upstream<F, Fut>(answer: F) -> (u16, Arc<std::sync::atomic::AtomicU64>)
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        use std::sync::atomic::{AtomicU64, Ordering};
        let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = up.local_addr().expect("addr").port();
        let count = Arc::new(AtomicU64::new(0));
        let c = count.clone();
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = up.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut head = [0u8; 4096];
                    let _ = s.read(&mut head).await;
                    answer(s).await;
                });
            }
        });
        (port, count)
    }

    async fn gateway_with(
        up_port: u16,
        limits: Limits,
        timeout: Duration,
    ) -> (Gateway, Arc<Mutex<Vec<GatewayEvent>>>) {
        let (sink, seen) = recorder();
        let mut cfg = GatewayConfig::new(
            "ch",
            Arc::new(policy().await),
            &[format!("http://127.0.0.1:{up_port}/live.ts")],
            timeout,
        );
        cfg.limits = limits;
        let gw = Gateway::open(cfg, sink, Arc::new(FenceClock::open_forever()))
            .await
            .expect("gateway");
        (gw, seen)
    }

    fn limited(seen: &Mutex<Vec<GatewayEvent>>, kind: LimitKind) -> (u64, Vec<String>) {
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        let mut whys = Vec::new();
        for e in seen.iter() {
            if let GatewayEvent::Limited {
                kind: k,
                count,
                why,
            } = e
            {
                if *k == kind {
                    n += count;
                    whys.push(why.clone());
                }
            }
        }
        (n, whys)
    }

    #[test]
    fn limits_are_reported_once_a_second_and_at_once_for_each_new_ffmpeg() {
        let (sink, seen) = recorder();
        let r = Reporter {
            channel: "ch".into(),
            events: sink,
            state: Mutex::default(),
        };
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

    #[tokio::test]
    async fn an_endless_or_missing_response_head_is_cut_and_ffmpeg_gets_an_error() {
        // Headers for ever, as fast as the socket takes them.
        let (endless, _) = scripted_upstream(|mut s| async move {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n").await;
            let line = [b"X-Pad: ".as_slice(), &[b'a'; 1000], b"\r\n"].concat();
            while s.write_all(&line).await.is_ok() {}
        })
        .await;
        let (gw, seen) = gateway_with(endless, Limits::default(), Duration::from_secs(5)).await;
        let t = Instant::now();
        let r = ask(
            gw.port(),
            format!("GET http://127.0.0.1:{endless}/live.ts HTTP/1.1\r\n\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 502"), "{r}");
        assert!(r.contains("response head over 65536 bytes"), "{r}");
        assert!(
            r.len() < 1000,
            "nothing of the head reaches FFmpeg: {} bytes",
            r.len()
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(limited(&seen, LimitKind::Head).0, 1);

        // A head that never ends, one byte at a time: cut at the timeout.
        let (trickle, _) = scripted_upstream(|mut s| async move {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n").await;
            while s.write_all(b"x").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        // No answer at all.
        let (silent, _) = scripted_upstream(|s| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        })
        .await;
        for port in [trickle, silent] {
            let (gw, seen) =
                gateway_with(port, Limits::default(), Duration::from_millis(500)).await;
            let t = Instant::now();
            let r = ask(
                gw.port(),
                format!("GET http://127.0.0.1:{port}/live.ts HTTP/1.1\r\n\r\n"),
            )
            .await;
            assert!(r.starts_with("HTTP/1.1 504"), "{r}");
            assert!(r.contains("no response head within 500ms"), "{r}");
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
            assert_eq!(limited(&seen, LimitKind::Stall).0, 1);
        }

        // A normal head (with body bytes in the same packet) passes whole.
        let (normal, _) = scripted_upstream(|mut s| async move {
            let _ = s
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
                )
                .await;
        })
        .await;
        let (gw, seen) = gateway_with(normal, Limits::default(), Duration::from_secs(2)).await;
        let r = ask(
            gw.port(),
            format!("GET http://127.0.0.1:{normal}/a HTTP/1.1\r\n\r\n"),
        )
        .await;
        assert_eq!(
            r,
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        );
        assert!(seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .all(|e| matches!(e, GatewayEvent::Connected)));
        assert_eq!(head_end(b"HTTP/1.0 200 OK\n\nbody", 0), Some(17));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\nA: b\r\n", 0), None);
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n", 22), Some(25));
    }

    #[tokio::test]
    async fn requests_over_the_rate_get_429_and_the_upstream_sees_the_rate_only() {
        let (port, hits) = scripted_upstream(|mut s| async move {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await;
        })
        .await;
        let (gw, seen) = gateway_with(port, Limits::new(0, 10), Duration::from_secs(2)).await;
        let get = format!("GET http://127.0.0.1:{port}/self.m3u8 HTTP/1.1\r\n\r\n");
        // A hot loop, as FFmpeg on a playlist naming itself: one request after the other for 1.5 s.
        let t = Instant::now();
        let (mut ok, mut too_many) = (0u64, 0u64);
        while t.elapsed() < Duration::from_millis(1500) {
            let r = ask(gw.port(), get.clone()).await;
            if r.starts_with("HTTP/1.1 200") {
                ok += 1;
            } else {
                assert!(
                    r.starts_with("HTTP/1.1 429") && r.contains("Retry-After: 1"),
                    "{r}"
                );
                too_many += 1;
            }
        }
        let upstream = hits.load(std::sync::atomic::Ordering::SeqCst);
        println!("1.5 s of a hot loop at 10/s, burst 20: {ok} passed, {too_many} answered 429; the upstream saw {upstream}");
        assert_eq!(ok, upstream);
        // The burst (20) and 1.5 s at 10/s, give or take one.
        assert!((33..=37).contains(&ok), "{ok} requests passed");
        assert!(too_many > 50, "{too_many}");
        // Reported at once, then at most once a second, with the count.
        drop(gw);
        // What was counted since the last report is reported when the gateway goes.
        crate::guard::tests_wait(|| limited(&seen, LimitKind::Rate).0 == too_many).await;
        let (n, whys) = limited(&seen, LimitKind::Rate);
        assert_eq!(n, too_many);
        assert!((1..=3).contains(&whys.len()), "{whys:?}");
        assert!(whys[0].contains("over 10/s"), "{whys:?}");
    }

    #[tokio::test]
    async fn a_fast_upstream_is_throttled_to_the_channel_bandwidth() {
        // As fast as the socket takes it.
        let (port, _) = scripted_upstream(|mut s| async move {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
            let chunk = [0x47u8; 64 * 1024];
            while s.write_all(&chunk).await.is_ok() {}
        })
        .await;
        // 16 Mbit/s = 2 MB/s, with a burst of one second's worth, shared by two connections.
        let (gw, seen) = gateway_with(port, Limits::new(16, 0), Duration::from_secs(2)).await;
        let read_for = |d: Duration| {
            let gw_port = gw.port();
            let get = format!("GET http://127.0.0.1:{port}/fast.ts HTTP/1.1\r\n\r\n");
            async move {
                let mut s = TcpStream::connect(("127.0.0.1", gw_port))
                    .await
                    .expect("connect");
                s.write_all(get.as_bytes()).await.expect("write");
                let until = tokio::time::Instant::now() + d;
                let mut total = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(Ok(n)) = tokio::time::timeout_at(until, s.read(&mut buf)).await {
                    if n == 0 {
                        break;
                    }
                    if total == 0 {
                        assert!(
                            buf.starts_with(b"HTTP/1.1 200 OK"),
                            "{}",
                            String::from_utf8_lossy(&buf[..n])
                        );
                    }
                    total += n as u64;
                }
                total
            }
        };
        let t = Instant::now();
        let (a, b) = tokio::join!(
            read_for(Duration::from_secs(2)),
            read_for(Duration::from_secs(2))
        );
        let secs = t.elapsed().as_secs_f64();
        let mbit = (a + b) as f64 * 8.0 / 1e6 / secs;
        println!(
            "two connections, 2 s, cap 16 Mbit/s (burst 1 s): {a} + {b} bytes = {mbit:.1} Mbit/s"
        );
        // 2 MB burst + 2 s × 2 MB/s = 6 MB at most (+ one relay buffer per connection).
        assert!(a + b <= 6_000_000 + 2 * 64 * 1024, "{}", a + b);
        assert!(a + b >= 4_000_000, "{}", a + b);
        assert!(a > 500_000 && b > 500_000, "shared: {a} / {b}");
        assert_eq!(
            limited(&seen, LimitKind::Bandwidth).0,
            1,
            "reported once a second"
        );
        drop(gw);
        crate::guard::tests_wait(|| limited(&seen, LimitKind::Bandwidth).0 == 2).await;
    }

    #[tokio::test]
    async fn only_the_channels_own_ffmpeg_may_use_its_gateway() {
        let (port, hits) = scripted_upstream(|mut s| async move {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await;
        })
        .await;
        let (sink, seen) = recorder();
        let table = Arc::new(PeerTable::default());
        let mut cfg = GatewayConfig::new(
            "ch",
            Arc::new(policy().await),
            &[format!("http://127.0.0.1:{port}/live.ts")],
            Duration::from_secs(2),
        );
        cfg.peers = Some(table.clone());
        let gw = Gateway::open(cfg, sink, Arc::new(FenceClock::open_forever()))
            .await
            .expect("gateway");
        let get = format!("GET http://127.0.0.1:{port}/live.ts HTTP/1.1\r\n\r\n");

        // Another process runs as the channel's FFmpeg: this one is a stranger, refused at once.
        let mut ffmpeg = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        table.add("ch", ffmpeg.id());
        let t = Instant::now();
        let r = ask(gw.port(), get.clone()).await;
        assert!(
            r.starts_with("HTTP/1.1 403") && r.contains("not the channel's FFmpeg"),
            "{r}"
        );
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        // So is a process of another channel.
        table.add("other", std::process::id());
        assert!(ask(gw.port(), get.clone())
            .await
            .starts_with("HTTP/1.1 403"));
        table.remove(std::process::id());

        // Between two runs (no live FFmpeg known), a connection waits for the new one's
        // announcement: here it is this process.
        let _ = ffmpeg.kill();
        let _ = ffmpeg.wait();
        let pending = tokio::spawn(ask(gw.port(), get.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await; // let it arrive before the announcement
        table.add("ch", std::process::id());
        let r = pending.await.expect("ask");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(ask(gw.port(), get.clone())
            .await
            .starts_with("HTTP/1.1 200"));
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "strangers reached nothing"
        );

        // Nobody announced within PEER_WAIT: refused.
        table.remove(std::process::id());
        let t = Instant::now();
        let r = ask(gw.port(), get.clone()).await;
        assert!(r.starts_with("HTTP/1.1 403") && r.contains("within"), "{r}");
        assert!(t.elapsed() >= PEER_WAIT, "{:?}", t.elapsed());
        drop(gw);
        let (n, whys) = limited(&seen, LimitKind::Peer);
        assert_eq!(n, 3, "{whys:?}");
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
