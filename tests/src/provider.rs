//! [`FakeProvider`]: a fake IPTV provider serving an endless live MPEG-TS on every path.
//!
//! Each request streams [`crate::media::source_ts`] in a loop at real-time pace (an initial ~1 s burst,
//! then file size / duration bytes per second, times the speed factor). Each loop adds the file's
//! timestamp span + one frame to every PCR/PTS/DTS (mod 2^33) and continuity counters are renumbered,
//! so the stream looks like one continuous live channel to ffmpeg.
//!
//! The server runs on its own thread and tokio runtime: a test that blocks its own thread (running
//! ffprobe, a blocking wait) cannot starve it. Modes can be switched at any time, globally or per
//! path; a stream in flight re-reads its mode before every chunk (see [`Mode`]).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::media::{self, SourceInfo};
use crate::netproxy::ServerThread;
use crate::ts;

/// Bytes per chunk written to a client: 50 TS packets.
const CHUNK: usize = ts::PACKET * 50;

/// How the provider answers, globally or for one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// 200 and an endless real-time stream.
    #[default]
    Normal,
    /// 403 for new requests; streams in flight are cut.
    Forbidden,
    /// 404 for new requests; streams in flight are cut.
    NotFound,
    /// 200, then the connection is closed abruptly (no terminating chunk) after ~1 s of data,
    /// counted from the start for new requests and from the switch for streams in flight.
    Drop,
    /// 200 (headers sent) but no more data; the connection stays open. A stream in flight stops
    /// sending and resumes at real-time pace (no catch-up burst) when the mode changes back.
    Stall,
}

#[derive(Default)]
struct PathCounters {
    current: u64,
    total: u64,
}

struct Shared {
    global: Mutex<Mode>,
    per_path: Mutex<HashMap<String, Mode>>,
    counters: Mutex<HashMap<String, PathCounters>>,
    current: AtomicU64,
    total: AtomicU64,
    bytes_sent: AtomicU64,
    /// Bumped on every mode change so stalled streams wake up.
    changed: watch::Sender<u64>,
    media: &'static SourceInfo,
    speed: f64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the maps inconsistent: keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn mode_for(&self, path: &str) -> Mode {
        if let Some(m) = lock(&self.per_path).get(path) {
            return *m;
        }
        *lock(&self.global)
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

/// The running fake provider. Dropping it (or [`FakeProvider::shutdown`]) stops the server and cuts
/// every stream.
pub struct FakeProvider {
    shared: Arc<Shared>,
    server: ServerThread,
}

impl FakeProvider {
    /// Starts a provider at real-time pace on 127.0.0.1 (port chosen by the OS).
    pub async fn start() -> FakeProvider {
        Self::start_with_speed(1.0).await
    }

    /// Starts a provider whose pace is `speed` × real time (e.g. 4.0 to read a 10 s loop in 2.5 s).
    pub async fn start_with_speed(speed: f64) -> FakeProvider {
        // Loading (and maybe generating) the media blocks: keep it off the async thread.
        let media = tokio::task::spawn_blocking(media::source_info)
            .await
            .expect("load test media");
        Self::start_inner(media, speed)
    }

    /// Sync twin of [`FakeProvider::start_with_speed`] for non-async tests.
    pub fn start_blocking(speed: f64) -> FakeProvider {
        Self::start_inner(media::source_info(), speed)
    }

    fn start_inner(media: &'static SourceInfo, speed: f64) -> FakeProvider {
        assert!(speed > 0.0, "speed must be positive, got {speed}");
        let shared = Arc::new(Shared {
            global: Mutex::new(Mode::Normal),
            per_path: Mutex::new(HashMap::new()),
            counters: Mutex::new(HashMap::new()),
            current: AtomicU64::new(0),
            total: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            changed: watch::channel(0).0,
            media,
            speed,
        });
        let app = Router::new().fallback(serve).with_state(shared.clone());
        let server = ServerThread::start("fake-provider", 2, move |listener| async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("fake provider: server error: {e}");
            }
        });
        FakeProvider { shared, server }
    }

    /// Address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Port it listens on.
    pub fn port(&self) -> u16 {
        self.server.addr().port()
    }

    /// Full URL of `path`, e.g. `url("/live/ch1.ts")` → `http://127.0.0.1:P/live/ch1.ts`.
    /// A missing leading `/` is added. A query string may be included; it does not affect the path key.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.server.addr(), normalize(path))
    }

    /// Pace multiplier it was started with.
    pub fn speed(&self) -> f64 {
        self.shared.speed
    }

    /// Sets the mode of every path that has no per-path mode.
    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.shared.global) = mode;
        self.shared.bump();
    }

    /// Sets the mode of one path (without query string); it wins over the global mode.
    pub fn set_path_mode(&self, path: &str, mode: Mode) {
        lock(&self.shared.per_path).insert(normalize_key(path), mode);
        self.shared.bump();
    }

    /// Removes a per-path mode: the path follows the global mode again.
    pub fn clear_path_mode(&self, path: &str) {
        lock(&self.shared.per_path).remove(&normalize_key(path));
        self.shared.bump();
    }

    /// The mode a new request for `path` would get.
    pub fn mode_for(&self, path: &str) -> Mode {
        self.shared.mode_for(&normalize_key(path))
    }

    /// Streams being sent right now (decremented when the body is dropped, i.e. the client went away
    /// and the server noticed, or the stream was cut).
    pub fn current_connections(&self) -> u64 {
        self.shared.current.load(Ordering::SeqCst)
    }

    /// Requests answered so far, any status.
    pub fn total_connections(&self) -> u64 {
        self.shared.total.load(Ordering::SeqCst)
    }

    /// [`FakeProvider::current_connections`] for one path.
    pub fn current_connections_for(&self, path: &str) -> u64 {
        lock(&self.shared.counters)
            .get(&normalize_key(path))
            .map_or(0, |c| c.current)
    }

    /// [`FakeProvider::total_connections`] for one path.
    pub fn total_connections_for(&self, path: &str) -> u64 {
        lock(&self.shared.counters)
            .get(&normalize_key(path))
            .map_or(0, |c| c.total)
    }

    /// Body bytes sent so far over all streams.
    pub fn bytes_sent(&self) -> u64 {
        self.shared.bytes_sent.load(Ordering::SeqCst)
    }

    /// Stops the server and cuts every stream; waits for its thread. Idempotent.
    pub fn shutdown(&mut self) {
        self.server.stop();
    }
}

impl std::fmt::Debug for FakeProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeProvider")
            .field("addr", &self.server.addr())
            .field("speed", &self.shared.speed)
            .field("current_connections", &self.current_connections())
            .field("total_connections", &self.total_connections())
            .finish()
    }
}

fn normalize(path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    }
}

/// The key used for per-path modes and counters: the path without query string.
fn normalize_key(path: &str) -> String {
    let p = path.split_once('?').map_or(path, |(p, _)| p);
    normalize(p)
}

async fn serve(State(shared): State<Arc<Shared>>, uri: Uri) -> Response {
    let path = uri.path().to_string();
    shared.total.fetch_add(1, Ordering::SeqCst);
    lock(&shared.counters)
        .entry(path.clone())
        .or_default()
        .total += 1;
    let mode = shared.mode_for(&path);
    match mode {
        Mode::Forbidden => return (StatusCode::FORBIDDEN, "403 Forbidden\n").into_response(),
        Mode::NotFound => return (StatusCode::NOT_FOUND, "404 Not Found\n").into_response(),
        Mode::Normal | Mode::Drop | Mode::Stall => {}
    }
    let guard = ConnGuard::new(shared.clone(), path.clone());
    let stream = LiveStream::new(shared, path, guard, mode);
    let body = Body::from_stream(futures::stream::unfold(stream, |mut s| async move {
        s.next_chunk().await.map(|item| (item, s))
    }));
    (
        [
            (header::CONTENT_TYPE, "video/mp2t"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Counts a stream in flight; dropped with the response body.
struct ConnGuard {
    shared: Arc<Shared>,
    path: String,
}

impl ConnGuard {
    fn new(shared: Arc<Shared>, path: String) -> ConnGuard {
        shared.current.fetch_add(1, Ordering::SeqCst);
        lock(&shared.counters)
            .entry(path.clone())
            .or_default()
            .current += 1;
        ConnGuard { shared, path }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shared.current.fetch_sub(1, Ordering::SeqCst);
        if let Some(c) = lock(&self.shared.counters).get_mut(&self.path) {
            c.current = c.current.saturating_sub(1);
        }
    }
}

/// One client's endless stream: position in the file, loop count, pacing clock.
struct LiveStream {
    shared: Arc<Shared>,
    path: String,
    _guard: ConnGuard,
    changed: watch::Receiver<u64>,
    loop_index: u64,
    pos: usize,
    sent: u64,
    /// Pacing: bytes allowed at `t0`, then `rate` more per second.
    credit_base: f64,
    t0: Instant,
    rate: f64,
    /// Close once `sent` reaches this (Drop mode).
    drop_at: Option<u64>,
    cc: ts::ContinuityFixer,
    finished: bool,
}

impl LiveStream {
    fn new(shared: Arc<Shared>, path: String, guard: ConnGuard, mode: Mode) -> LiveStream {
        let media = shared.media;
        let burst = media.bytes_per_second;
        let rate = media.bytes_per_second * shared.speed;
        let changed = shared.changed.subscribe();
        let mut s = LiveStream {
            shared,
            path,
            _guard: guard,
            changed,
            loop_index: 0,
            pos: 0,
            sent: 0,
            credit_base: burst,
            t0: Instant::now(),
            rate,
            drop_at: None,
            cc: ts::ContinuityFixer::default(),
            finished: false,
        };
        if mode == Mode::Drop {
            s.drop_at = Some(s.one_second());
        }
        s
    }

    fn one_second(&self) -> u64 {
        self.shared.media.bytes_per_second as u64
    }

    /// The next body chunk: `None` ends the body cleanly, `Some(Err)` aborts the connection.
    async fn next_chunk(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if self.finished {
            return None;
        }
        loop {
            // Mark the current version seen before reading the mode, so a change that lands after the
            // read wakes `changed()` below.
            self.changed.borrow_and_update();
            match self.shared.mode_for(&self.path) {
                Mode::Normal => self.drop_at = None,
                Mode::Drop => {
                    let at = *self.drop_at.get_or_insert(self.sent + self.one_second());
                    if self.sent >= at {
                        return self.abort("dropped by fake provider (Mode::Drop)");
                    }
                }
                Mode::Forbidden | Mode::NotFound => {
                    return self.abort("cut by fake provider (mode changed)");
                }
                Mode::Stall => {
                    if self.changed.changed().await.is_err() {
                        self.finished = true;
                        return None;
                    }
                    // Resume at real-time pace from now, without a catch-up burst.
                    self.credit_base = self.sent as f64;
                    self.t0 = Instant::now();
                    continue;
                }
            }
            break;
        }
        // Pace: wait until the budget allows the next chunk.
        let allowed = self.credit_base + self.rate * self.t0.elapsed().as_secs_f64();
        let need = self.sent as f64 + CHUNK as f64 - allowed;
        if need > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(need / self.rate)).await;
        }
        let mut chunk = self.take(CHUNK);
        if let Some(at) = self.drop_at {
            let left = usize::try_from(at.saturating_sub(self.sent)).unwrap_or(usize::MAX);
            chunk.truncate(left.max(ts::PACKET));
        }
        self.sent += chunk.len() as u64;
        self.shared
            .bytes_sent
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        Some(Ok(Bytes::from(chunk)))
    }

    fn abort(&mut self, why: &str) -> Option<Result<Bytes, std::io::Error>> {
        self.finished = true;
        Some(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            why.to_string(),
        )))
    }

    /// Copies up to `n` bytes (whole packets) from the looped file, rewriting timestamps and CCs.
    fn take(&mut self, n: usize) -> Vec<u8> {
        let media = self.shared.media;
        let file = &media.bytes;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.pos >= file.len() {
                self.pos = 0;
                self.loop_index += 1;
            }
            let end = (self.pos + ts::PACKET).min(file.len());
            let start = out.len();
            out.extend_from_slice(&file[self.pos..end]);
            self.pos = end;
            let offset = (u128::from(self.loop_index) * u128::from(media.loop_offset_90k)
                % u128::from(ts::TS_WRAP)) as u64;
            let p = &mut out[start..];
            ts::shift_packet(p, offset);
            self.cc.fix(p);
        }
        out
    }
}

/// What a [`CredentialGate`] demands of every request, the way IPTV providers ask for them:
/// `Authorization: Basic <user:pass>` (a URL's userinfo), `token=<token>` in the query, and the
/// Xtream path `/live/<path_user>/<path_pass>/<rest>`.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: String,
    pub pass: String,
    pub token: String,
    pub path_user: String,
    pub path_pass: String,
}

/// A front that makes a [`FakeProvider`] require [`Credentials`]: a request carrying all of them
/// is passed on as `GET /live/<rest>` (no query, no credentials) and the provider's answer relayed;
/// any other gets `401` and is counted. Plain threads and blocking sockets, so it runs under any
/// test flavour. Stops (and closes its listener) on drop.
pub struct CredentialGate {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl CredentialGate {
    /// `http://127.0.0.1:P/live/<path_user>/<path_pass>/<name>?token=<token>` with the userinfo,
    /// i.e. the catalog URL of `<name>` with every credential in place.
    pub fn url(&self, creds: &Credentials, name: &str) -> String {
        format!(
            "http://{}:{}@{}/live/{}/{}/{name}?token={}",
            creds.user, creds.pass, self.addr, creds.path_user, creds.path_pass, creds.token
        )
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests that carried every credential (and were passed on).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Requests answered 401.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for CredentialGate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

/// Standard base64 with padding, for comparing `Authorization: Basic`.
fn base64_std(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            out.push(if i <= c.len() {
                char::from(ABC[(n >> (18 - 6 * i)) as usize & 63])
            } else {
                '='
            });
        }
    }
    out
}

/// Starts a [`CredentialGate`] in front of `provider`.
pub fn require_credentials(provider: &FakeProvider, creds: Credentials) -> CredentialGate {
    use std::io::{Read, Write};
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind credential gate");
    let addr = listener.local_addr().expect("gate addr");
    let upstream = provider.addr();
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (a, r, s) = (accepted.clone(), refused.clone(), stop.clone());
    let basic = format!(
        "basic {}",
        base64_std(format!("{}:{}", creds.user, creds.pass).as_bytes())
    )
    .to_ascii_lowercase();
    let prefix = format!("/live/{}/{}/", creds.path_user, creds.path_pass);
    let token = format!("token={}", creds.token);
    std::thread::Builder::new()
        .name(format!("credential-gate-{}", addr.port()))
        .spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut client) = conn else { continue };
                let (a, r) = (a.clone(), r.clone());
                let (basic, prefix, token) = (basic.clone(), prefix.clone(), token.clone());
                std::thread::spawn(move || {
                    let _ = client.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                        match client.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
                    let authorized = head.lines().any(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("authorization:")
                            .is_some_and(|v| v.trim() == basic)
                    });
                    let ok = authorized
                        && path.starts_with(&prefix)
                        && query.split('&').any(|kv| kv == token);
                    if !ok {
                        r.fetch_add(1, Ordering::SeqCst);
                        let _ = client.write_all(
                            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 13\r\nConnection: close\r\n\r\nUnauthorized\n",
                        );
                        return;
                    }
                    a.fetch_add(1, Ordering::SeqCst);
                    let rest = &path[prefix.len()..];
                    let Ok(mut up) = std::net::TcpStream::connect(upstream) else {
                        return;
                    };
                    let req = format!(
                        "GET /live/{rest} HTTP/1.1\r\nHost: {upstream}\r\nConnection: close\r\n\r\n"
                    );
                    if up.write_all(req.as_bytes()).is_err() {
                        return;
                    }
                    // Until either side closes: the provider's stream is endless.
                    let _ = std::io::copy(&mut up, &mut client);
                    let _ = up.shutdown(std::net::Shutdown::Both);
                });
            }
        })
        .expect("spawn credential gate");
    CredentialGate {
        addr,
        accepted,
        refused,
        stop,
    }
}

/// What a [`HostileUpstream`] does with a request for one of its paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// `200 OK`, then header lines for ever, as fast as the client reads them.
    EndlessHeader,
    /// A master playlist whose only variant is itself.
    SelfReferencingMaster,
    /// Reads the request and never answers; the connection stays open until the client goes.
    StallForever,
    /// `200 OK` and its head, then not a byte more; the connection stays open until the client
    /// goes (each run then lasts until the node's stall detection, longer than a crash window's
    /// share).
    StallAfterHead,
}

impl Hostile {
    pub const ALL: [Hostile; 4] = [
        Hostile::EndlessHeader,
        Hostile::SelfReferencingMaster,
        Hostile::StallForever,
        Hostile::StallAfterHead,
    ];

    /// The path that behaves so.
    pub fn path(self) -> &'static str {
        match self {
            Hostile::EndlessHeader => "/endless-header.ts",
            Hostile::SelfReferencingMaster => "/self.m3u8",
            Hostile::StallForever => "/stall.ts",
            Hostile::StallAfterHead => "/stall-after-head.ts",
        }
    }
}

#[derive(Default)]
struct HostileLog {
    /// path → when each request arrived.
    requests: HashMap<String, Vec<std::time::Instant>>,
    /// path → bytes sent.
    bytes: HashMap<String, u64>,
    open: u64,
}

/// A raw-TCP upstream that misbehaves as [`Hostile`] says, by path (any other path: 404), and
/// records every request (path and time) and byte it sends: what reached the provider, not what
/// the farm says it sent. Runs on its own thread; stops (cutting every connection) on drop.
pub struct HostileUpstream {
    log: Arc<Mutex<HostileLog>>,
    server: ServerThread,
}

impl HostileUpstream {
    pub fn start() -> HostileUpstream {
        let log: Arc<Mutex<HostileLog>> = Arc::default();
        let l = log.clone();
        let server = ServerThread::start("hostile-upstream", 1, move |listener| async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        conns.spawn(hostile_conn(s, l.clone()));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
                while conns.try_join_next().is_some() {}
            }
        });
        HostileUpstream { log, server }
    }

    /// The URL of a hostile path.
    pub fn url(&self, h: Hostile) -> String {
        format!("http://{}{}", self.server.addr(), h.path())
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Requests received for `h`'s path so far.
    pub fn requests(&self, h: Hostile) -> u64 {
        lock(&self.log)
            .requests
            .get(h.path())
            .map_or(0, |v| v.len() as u64)
    }

    /// The most requests for `h`'s path inside any `window` (sliding).
    pub fn max_requests_in(&self, h: Hostile, window: Duration) -> u64 {
        let log = lock(&self.log);
        let Some(times) = log.requests.get(h.path()) else {
            return 0;
        };
        let mut best = 0;
        let mut start = 0;
        for end in 0..times.len() {
            while times[end].duration_since(times[start]) >= window {
                start += 1;
            }
            best = best.max(end - start + 1);
        }
        best as u64
    }

    /// When the first and the last request for `h`'s path came.
    pub fn first_and_last(&self, h: Hostile) -> Option<(std::time::Instant, std::time::Instant)> {
        let log = lock(&self.log);
        let t = log.requests.get(h.path())?;
        Some((*t.first()?, *t.last()?))
    }

    /// Bytes sent on `h`'s path so far.
    pub fn bytes_sent(&self, h: Hostile) -> u64 {
        lock(&self.log).bytes.get(h.path()).copied().unwrap_or(0)
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> u64 {
        lock(&self.log).open
    }
}

async fn hostile_conn(mut s: tokio::net::TcpStream, log: Arc<Mutex<HostileLog>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    lock(&log).open += 1;
    struct Open(Arc<Mutex<HostileLog>>);
    impl Drop for Open {
        fn drop(&mut self) {
            lock(&self.0).open -= 1;
        }
    }
    let _open = Open(log.clone());
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let target = text.split_whitespace().nth(1).unwrap_or("/").to_string();
    let path = target.split('?').next().unwrap_or("/").to_string();
    lock(&log)
        .requests
        .entry(path.clone())
        .or_default()
        .push(std::time::Instant::now());
    let count = |n: usize| {
        *lock(&log).bytes.entry(path.clone()).or_default() += n as u64;
    };
    let hostile = Hostile::ALL.into_iter().find(|h| h.path() == path);
    match hostile {
        Some(Hostile::EndlessHeader) => {
            let first = b"HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\n";
            if s.write_all(first).await.is_err() {
                return;
            }
            count(first.len());
            // 64 lines of 1 KiB per write: the client, not this server, is the bottleneck.
            let line = [b"X-Padding: ".as_slice(), &[b'a'; 1024], b"\r\n"].concat();
            let block = line.repeat(64);
            while s.write_all(&block).await.is_ok() {
                count(block.len());
            }
        }
        Some(Hostile::SelfReferencingMaster) => {
            let body = format!(
                "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=800000,RESOLUTION=640x360\n{}\n",
                Hostile::SelfReferencingMaster.path()
            );
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.apple.mpegurl\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(resp.as_bytes()).await.is_ok() {
                count(resp.len());
            }
        }
        Some(h @ (Hostile::StallForever | Hostile::StallAfterHead)) => {
            if h == Hostile::StallAfterHead {
                let head =
                    b"HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\nConnection: close\r\n\r\n";
                if s.write_all(head).await.is_err() {
                    return;
                }
                count(head.len());
            }
            // Until the client goes.
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        }
        None => {
            let _ = s
                .write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await;
        }
    }
}
