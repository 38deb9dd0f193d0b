//! One channel's egress gateway: a tiny HTTP forward proxy on 127.0.0.1 (absolute-form `GET` and
//! `CONNECT` for TLS) that FFmpeg reads every `http`/`https` upstream through. It resolves each
//! destination itself, asks the [`Policy`], and connects to exactly the address it checked.
//!
//! Gateways live in the guard process (see `guard`), not in the node: the upstream connections
//! they hold end at the node's fence even while the node process is frozen. A gateway passes
//! bytes only while its [`FenceClock`] is open: at a fence it drops every connection, and until
//! the next renewal it answers new ones with 503 and relays nothing (checked before every write,
//! so data that queued up while the host was frozen is not delivered after the deadline).

use super::policy::{vouched, Policy, Refusal};
use crate::guard::fence::FenceClock;
use farm_proto::redis_url::split_host_port;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
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

/// What a gateway reports (the guard sends it on to the node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayEvent {
    /// An upstream connection was made.
    Connected,
    /// The policy refused a destination; the sentence for `last_error`.
    Refused(String),
}

/// Where a gateway's events go. Must not block.
pub type EventSink = Arc<dyn Fn(GatewayEvent) + Send + Sync>;

/// What a gateway needs to decide and connect.
pub struct GatewayConfig {
    pub channel: String,
    pub policy: Arc<Policy>,
    /// The `host:port`s the channel's catalog names (see [`vouched`]).
    pub vouched: HashSet<(String, u16)>,
    /// Resolve, connect and request-head bound.
    pub timeout: Duration,
    pub max_connections: usize,
    /// Credentials FFmpeg's masked URLs leave out (see [`farm_proto::redact::mask`]): put back
    /// into plain-HTTP requests for their own `host:port` only.
    pub secrets: Vec<farm_proto::redact::OriginSecrets>,
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
        }
    }
}

struct GatewayCtx {
    cfg: GatewayConfig,
    events: EventSink,
    fence: Arc<FenceClock>,
}

/// One channel's HTTP forward proxy on 127.0.0.1. Dropping it closes the listener and every
/// connection through it.
pub struct Gateway {
    port: u16,
    task: JoinHandle<()>,
}

impl Gateway {
    pub async fn open(
        cfg: GatewayConfig,
        events: EventSink,
        fence: Arc<FenceClock>,
    ) -> std::io::Result<Gateway> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let span = tracing::info_span!("egress", channel = %cfg.channel, port);
        let max = cfg.max_connections.max(1);
        let ctx = Arc::new(GatewayCtx { cfg, events, fence });
        let mut fences = ctx.fence.fences();
        let task = tokio::spawn(
            async move {
                // Connections live in this set: aborting the accept loop drops them all.
                let mut conns = JoinSet::new();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((mut stream, _)) if !ctx.fence.is_open() => {
                                conns.spawn(async move {
                                    answer(&mut stream, "503 Service Unavailable", "fenced: this node has not renewed its leases").await;
                                });
                            }
                            Ok((mut stream, _)) if conns.len() >= max => {
                                conns.spawn(async move {
                                    let why = format!("over {max} connections at once");
                                    answer(&mut stream, "503 Service Unavailable", &why).await;
                                });
                            }
                            Ok((stream, _)) => {
                                conns.spawn(serve(stream, ctx.clone()));
                            }
                            Err(e) => {
                                warn!(error = %e, "egress gateway accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        },
                        Some(_) = conns.join_next(), if !conns.is_empty() => {}
                        changed = fences.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            if !conns.is_empty() {
                                debug!(connections = conns.len(), "fence: dropping every connection");
                            }
                            conns.abort_all();
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
    let text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
        body.len() + 1
    );
    let _ = client.write_all(text.as_bytes()).await;
    let _ = client.shutdown().await;
}

async fn serve(mut client: TcpStream, ctx: Arc<GatewayCtx>) {
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
    // Either side ending ends both: FFmpeg closes when it gives up on a stalled upstream, and the
    // upstream closes after its response (`Connection: close`).
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    tokio::select! {
        _ = pump(&mut ur, &mut cw, &ctx.fence) => {}
        _ = pump(&mut cr, &mut uw, &ctx.fence) => {}
    }
}

/// Copies until EOF, an error, or the fence: nothing read is written once the deadline passed.
async fn pump<R, W>(from: &mut R, to: &mut W, fence: &FenceClock) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUF];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
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
    use std::sync::Mutex;

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
}
