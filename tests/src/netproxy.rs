//! [`TcpProxy`]: a TCP proxy on 127.0.0.1 between one client (a node) and a server (Redis) whose
//! behaviour is switched at run time, to cut one node off from Redis while the rest of the farm
//! still reaches it.
//!
//! Modes ([`NetMode`]):
//! - `Pass`: bytes flow both ways as they come.
//! - `Latency(d)`: every chunk is delivered `d` after it was read (in order; throughput unchanged).
//! - `Blackhole`: new connections are accepted but not connected upstream; existing ones stop
//!   forwarding and stop reading, so the kernel buffers fill and the peers see silence, as in a
//!   network partition. Nothing is closed: when the mode goes back to `Pass`, held bytes are
//!   delivered late (like TCP retransmits after a partition heals) and the connections go on.
//! - `Reset`: every connection is closed with an RST; new ones are accepted and reset at once.
//!
//! The proxy runs on its own thread and runtime, so it works the same from sync and async tests and
//! never competes with the test's runtime. Dropping it closes the listener and every connection.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// What the proxy does with the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetMode {
    Pass,
    Latency(Duration),
    Blackhole,
    Reset,
}

#[derive(Default)]
struct Stats {
    accepted: AtomicU64,
    active: AtomicU64,
    resets: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// Counters of a [`TcpProxy`] (for tests and their printed figures).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted since the start.
    pub accepted: u64,
    /// Connections open now.
    pub active: u64,
    /// Connections closed by `Reset`.
    pub resets: u64,
    /// Bytes forwarded client → server.
    pub bytes_up: u64,
    /// Bytes forwarded server → client.
    pub bytes_down: u64,
}

/// A switchable TCP proxy `127.0.0.1:<port>` → `upstream`.
pub struct TcpProxy {
    upstream: SocketAddr,
    mode: watch::Sender<NetMode>,
    stats: Arc<Stats>,
    server: ServerThread,
}

impl TcpProxy {
    /// Starts a proxy to `127.0.0.1:<upstream_port>` on a free port, in `Pass` mode.
    pub fn start(upstream_port: u16) -> TcpProxy {
        Self::start_to(SocketAddr::from((Ipv4Addr::LOCALHOST, upstream_port)))
    }

    /// Starts a proxy to `upstream` on a free port of 127.0.0.1, in `Pass` mode.
    pub fn start_to(upstream: SocketAddr) -> TcpProxy {
        let (mode, mode_rx) = watch::channel(NetMode::Pass);
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        let server = ServerThread::start("tcp-proxy", 1, move |listener| {
            accept_loop(listener, upstream, mode_rx, st)
        });
        TcpProxy {
            upstream,
            mode,
            stats,
            server,
        }
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.server.addr().port()
    }

    /// `redis://127.0.0.1:<port>/`: a Redis URL through the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.server.addr().port())
    }

    /// Where it forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// The current mode.
    pub fn mode(&self) -> NetMode {
        *self.mode.borrow()
    }

    /// Switches the mode; takes effect at once for every connection.
    pub fn set_mode(&self, mode: NetMode) {
        self.mode.send_replace(mode);
    }

    /// `Pass`.
    pub fn pass(&self) {
        self.set_mode(NetMode::Pass);
    }

    /// `Latency(d)`.
    pub fn latency(&self, d: Duration) {
        self.set_mode(NetMode::Latency(d));
    }

    /// `Blackhole` (a partition).
    pub fn blackhole(&self) {
        self.set_mode(NetMode::Blackhole);
    }

    /// `Reset`: close everything, refuse new connections (until the mode changes).
    pub fn reset(&self) {
        self.set_mode(NetMode::Reset);
    }

    /// Its counters.
    pub fn stats(&self) -> ProxyStats {
        let s = &self.stats;
        ProxyStats {
            accepted: s.accepted.load(Ordering::Relaxed),
            active: s.active.load(Ordering::Relaxed),
            resets: s.resets.load(Ordering::Relaxed),
            bytes_up: s.bytes_up.load(Ordering::Relaxed),
            bytes_down: s.bytes_down.load(Ordering::Relaxed),
        }
    }
}

impl std::fmt::Debug for TcpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpProxy")
            .field("port", &self.server.addr().port())
            .field("upstream", &self.upstream)
            .field("mode", &self.mode())
            .field("stats", &self.stats())
            .finish()
    }
}

/// A server on a free port of 127.0.0.1 in its own thread and tokio runtime, so it answers whatever
/// the test's thread or runtime is doing. Stopping it (or dropping it) ends the serving future,
/// drops the runtime with every connection task and its sockets, and joins the thread.
pub struct ServerThread {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    /// Binds 127.0.0.1:0 and runs `serve(listener)` on thread `<name>-<port>` until stopped, on a
    /// runtime of `workers` threads (1: the thread itself).
    pub fn start<F, S>(name: &'static str, workers: usize, serve: F) -> ServerThread
    where
        F: FnOnce(TcpListener) -> S + Send + 'static,
        S: std::future::Future<Output = ()>,
    {
        // Binding port 0 here (not a free-port guess) means no race with other processes.
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("{name}: bind 127.0.0.1:0: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("{name}: non-blocking listener: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("{name}: listener address: {e}"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-{}", addr.port()))
            .spawn(move || {
                let mut rt = if workers > 1 {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    b.worker_threads(workers);
                    b
                } else {
                    tokio::runtime::Builder::new_current_thread()
                };
                let rt = match rt.enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("{name}: cannot build runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => tokio::select! {
                            () = serve(listener) => {}
                            _ = stopped => {}
                        },
                        Err(e) => eprintln!("{name}: listener: {e}"),
                    }
                });
                // Dropping the runtime cancels every connection task, closing all streams.
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .unwrap_or_else(|e| panic!("{name}: spawn thread: {e}"));
        ServerThread {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the server and cuts every connection; waits for its thread. Idempotent.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Receiver<NetMode>,
    stats: Arc<Stats>,
) {
    // Connection tasks live in a JoinSet so they end with the loop (and the runtime).
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                if *mode.borrow() == NetMode::Reset {
                    abort(&client);
                    stats.resets.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let (mode, stats) = (mode.clone(), stats.clone());
                conns.spawn(async move {
                    stats.active.fetch_add(1, Ordering::Relaxed);
                    connection(client, upstream, mode, &stats).await;
                    stats.active.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Makes dropping the socket send an RST instead of a FIN.
fn abort(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

/// Waits while the mode is `Blackhole`; false when it is (or becomes) `Reset` or the proxy ends.
async fn wait_open(mode: &mut watch::Receiver<NetMode>) -> bool {
    loop {
        match *mode.borrow_and_update() {
            NetMode::Reset => return false,
            NetMode::Blackhole => {}
            NetMode::Pass | NetMode::Latency(_) => return true,
        }
        if mode.changed().await.is_err() {
            return false;
        }
    }
}

async fn until_reset(mode: &mut watch::Receiver<NetMode>) {
    loop {
        if *mode.borrow_and_update() == NetMode::Reset {
            return;
        }
        if mode.changed().await.is_err() {
            return;
        }
    }
}

async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<NetMode>,
    stats: &Stats,
) {
    // A blackholed connect hangs like a SYN into a partition (the client's own timeout decides).
    if !wait_open(&mut mode).await {
        abort(&client);
        stats.resets.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let server =
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream)).await {
            Ok(Ok(s)) => s,
            // Upstream down: the client sees its connection closed, as it would see a refusal.
            _ => {
                abort(&client);
                return;
            }
        };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    abort(&client);
    abort(&server);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let (up_tx, up_rx) = mpsc::channel(64);
    let (down_tx, down_rx) = mpsc::channel(64);
    let mut reset_watch = mode.clone();
    // Whichever half ends first ends the connection; dropping the halves closes both sockets
    // (with an RST: linger 0), which is what a reset or a dead peer looks like.
    tokio::select! {
        _ = read_half(cr, up_tx, mode.clone(), &stats.bytes_up) => {}
        _ = read_half(sr, down_tx, mode.clone(), &stats.bytes_down) => {}
        _ = write_half(up_rx, sw, mode.clone()) => {}
        _ = write_half(down_rx, cw, mode.clone()) => {}
        _ = until_reset(&mut reset_watch) => {}
    };
    // Whichever branch noticed it first (a half stops too when the mode turns to Reset), a
    // connection that ends in Reset mode was reset.
    if *mode.borrow() == NetMode::Reset {
        stats.resets.fetch_add(1, Ordering::Relaxed);
    }
}

async fn read_half(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    tx: mpsc::Sender<(Instant, Vec<u8>)>,
    mut mode: watch::Receiver<NetMode>,
    counter: &AtomicU64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // In a blackhole nothing is read, so the sender's kernel buffers fill up.
        if !wait_open(&mut mode).await {
            return;
        }
        let n = match rd.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
            return;
        }
    }
}

async fn write_half(
    mut rx: mpsc::Receiver<(Instant, Vec<u8>)>,
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<NetMode>,
) {
    while let Some((read_at, bytes)) = rx.recv().await {
        // Hold the chunk while blackholed; delay it by the latency in force when it may go.
        loop {
            if !wait_open(&mut mode).await {
                return;
            }
            let NetMode::Latency(d) = *mode.borrow() else {
                break;
            };
            let due = read_at + d;
            if Instant::now() >= due {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {}
                r = mode.changed() => if r.is_err() { return },
            }
        }
        if wr.write_all(&bytes).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// An echo server on a free port; returns its port.
    fn echo_server() -> u16 {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind echo");
        let port = l.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        port
    }

    fn round_trip(s: &mut std::net::TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg)?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got)?;
        Ok(got)
    }

    fn connect(port: u16) -> std::net::TcpStream {
        let s = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect proxy");
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .expect("timeout");
        s
    }

    #[test]
    fn pass_latency_blackhole_heal_and_reset() {
        let proxy = TcpProxy::start(echo_server());
        let mut s = connect(proxy.port());
        assert_eq!(round_trip(&mut s, b"hello").expect("pass"), b"hello");

        proxy.latency(Duration::from_millis(200));
        let t = Instant::now();
        assert_eq!(round_trip(&mut s, b"slow").expect("latency"), b"slow");
        // Both directions are delayed.
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );

        proxy.blackhole();
        let err = round_trip(&mut s, b"lost?").expect_err("nothing comes back in a blackhole");
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{err:?}"
        );
        // The held bytes arrive when the partition heals.
        proxy.pass();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).expect("held bytes after the heal");
        assert_eq!(&got, b"lost?");

        proxy.reset();
        let mut buf = [0u8; 8];
        let r = s.write_all(b"x").and_then(|_| s.read(&mut buf));
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "a reset connection is closed: {r:?}"
        );
        let mut fresh = connect(proxy.port());
        assert!(
            round_trip(&mut fresh, b"new").is_err(),
            "new connections are refused while in reset"
        );
        proxy.pass();
        let mut again = connect(proxy.port());
        assert_eq!(
            round_trip(&mut again, b"back").expect("pass again"),
            b"back"
        );
        // The proxy counts a reset as its connection task ends, which may be just after the
        // client saw it: poll the counters with a deadline.
        let deadline = Instant::now() + Duration::from_secs(5);
        let st = loop {
            let st = proxy.stats();
            if (st.resets >= 2 && st.accepted >= 3) || Instant::now() >= deadline {
                break st;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(st.resets >= 2, "{st:?}");
        assert!(st.accepted >= 3, "{st:?}");
    }
}
