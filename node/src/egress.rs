//! Where FFmpeg may connect: the egress policy and the per-channel gateway.
//!
//! An upstream chosen by the catalog is trusted as far as the operator wrote it; what the upstream
//! itself says (URIs inside an HLS playlist, a redirect) is not. So every FFmpeg that reads an
//! `http`/`https` upstream gets `-http_proxy` pointing at its own [`Gateway`], a tiny HTTP forward
//! proxy on 127.0.0.1 (absolute-form `GET` and `CONNECT` for TLS), which resolves each destination
//! itself and asks the [`Policy`]; with the Landlock sandbox (see `sandbox`) FFmpeg cannot open a
//! TCP connection to anything but that port, so no URI spelling gets around it.
//!
//! Invariants: the farm's own Redis, sentinels and node ports are never reached, whatever the
//! catalog says; internal addresses (loopback, private, link-local, shared) are reached only
//! through a `host:port` the channel's catalog names, or inside a network the operator allowed
//! (`--egress-allow`); `--egress-deny` networks and non-unicast addresses never. The decision is
//! made on resolved addresses, and the gateway connects to exactly the address it checked.

use crate::config::IpNet;
use crate::metrics::Metrics;
use farm_proto::redis_url::{host_port, split_host_port};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, warn, Instrument};

/// The longest request head FFmpeg may send the gateway.
const MAX_HEAD: usize = 16 * 1024;
/// Connections open through one gateway at most: an FFmpeg fetches one file at a time per
/// playlist, so more means a playlist fanning out (many variants), which gets 503s instead.
const MAX_CONNECTIONS: usize = 64;

/// Schemes whose destination the policy decides (TCP-based). `udp`, `rtp` and `srt` are received
/// or sent over UDP, which no Redis or HTTP service on the farm answers.
fn tcp_default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" | "rtmps" => Some(443),
        "rtmp" => Some(1935),
        "tcp" => Some(0),
        _ => None,
    }
}

/// Whether FFmpeg reads this scheme through the gateway.
pub fn proxied(scheme: &str) -> bool {
    scheme == "http" || scheme == "https"
}

/// The lowercase scheme of a URL.
pub fn scheme(url: &str) -> String {
    url.split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default()
}

/// `host` (lowercase, IPv6 without brackets) and port of a URL's authority, the scheme's default
/// port when none is written. `None` for schemes the policy does not decide.
pub fn endpoint(url: &str) -> Option<(String, u16)> {
    let default = tcp_default_port(&scheme(url))?;
    host_port(url, default)
}

/// A port on some addresses that belongs to the farm itself.
#[derive(Debug, Clone)]
struct FarmPort {
    what: String,
    port: u16,
    /// `None`: every loopback and unspecified address (the service listens on this machine).
    ip: Option<IpAddr>,
}

impl FarmPort {
    fn matches(&self, ip: IpAddr, port: u16) -> bool {
        port == self.port
            && match self.ip {
                Some(own) => own == ip,
                None => ip.is_loopback() || ip.is_unspecified(),
            }
    }
}

/// Loopback, private, link-local, shared (CGNAT) and "this network" addresses.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
        }
    }
}

/// Why a destination is not connected to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The policy refuses every address of it.
    #[error("{0}")]
    Refused(String),
    /// The name does not resolve (now): nothing to decide.
    #[error("{0}")]
    Unresolved(String),
}

/// Who may be reached. Built once at start-up.
#[derive(Debug, Default)]
pub struct Policy {
    farm: Vec<FarmPort>,
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl Policy {
    /// `farm`: the farm's own endpoints (`what`, `host`, `port`): Redis or sentinels, the node's
    /// listener. Names are resolved now; a name that does not resolve is kept for its port on
    /// this machine's addresses.
    pub async fn new(farm: &[(String, String, u16)], allow: Vec<IpNet>, deny: Vec<IpNet>) -> Self {
        let mut ports = Vec::new();
        for (what, host, port) in farm {
            let addrs: Vec<IpAddr> = match host.trim_matches(['[', ']']).parse::<IpAddr>() {
                Ok(ip) => vec![ip],
                Err(_) => tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::net::lookup_host((host.as_str(), *port)),
                )
                .await
                .ok()
                .and_then(Result::ok)
                .map(|it| it.map(|a| a.ip()).collect())
                .unwrap_or_default(),
            };
            let local = addrs.is_empty()
                || addrs
                    .iter()
                    .any(|ip| ip.to_canonical().is_loopback() || ip.is_unspecified());
            if local {
                ports.push(FarmPort {
                    what: what.clone(),
                    port: *port,
                    ip: None,
                });
            }
            for ip in addrs {
                ports.push(FarmPort {
                    what: what.clone(),
                    port: *port,
                    ip: Some(ip.to_canonical()),
                });
            }
        }
        Policy {
            farm: ports,
            allow,
            deny,
        }
    }

    /// Whether FFmpeg may connect to `addr`; `vouched` when the channel's catalog names the
    /// `host:port` it was resolved from. The error is the sentence for the operator.
    pub fn check(&self, addr: SocketAddr, vouched: bool) -> Result<(), String> {
        let ip = addr.ip().to_canonical();
        let port = addr.port();
        if let Some(f) = self.farm.iter().find(|f| f.matches(ip, port)) {
            return Err(format!("{ip}:{port} is the farm's {}", f.what));
        }
        let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
        if ip.is_unspecified() || ip.is_multicast() || broadcast || port == 0 {
            return Err(format!("{ip}:{port} is not a unicast address"));
        }
        if let Some(net) = self.deny.iter().find(|n| n.contains(ip)) {
            return Err(format!("{ip} is inside --egress-deny {net}"));
        }
        if is_internal(ip) && !vouched && !self.allow.iter().any(|n| n.contains(ip)) {
            return Err(format!(
                "{ip}:{port} is an internal address the channel's catalog does not name \
                 (an upstream may not send FFmpeg there; --egress-allow opens a network)"
            ));
        }
        Ok(())
    }

    /// Resolves `host:port` and keeps the addresses the policy allows, in resolver order; the
    /// error names why the first one was refused, or that the name does not resolve.
    pub async fn resolve(
        &self,
        host: &str,
        port: u16,
        vouched: bool,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>, Refusal> {
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::time::timeout(timeout, tokio::net::lookup_host((host, port)))
                .await
                .map_err(|_| {
                    Refusal::Unresolved(format!("resolving {host} took longer than {timeout:?}"))
                })?
                .map_err(|e| Refusal::Unresolved(format!("cannot resolve {host}: {e}")))?
                .collect(),
        };
        let mut first_refusal = None;
        let mut ok = Vec::new();
        for a in addrs {
            match self.check(a, vouched) {
                Ok(()) => ok.push(a),
                Err(e) => {
                    first_refusal.get_or_insert(e);
                }
            }
        }
        if ok.is_empty() {
            return Err(match first_refusal {
                Some(why) => Refusal::Refused(why),
                None => Refusal::Unresolved(format!("{host} has no address")),
            });
        }
        Ok(ok)
    }

    /// The check made before a channel starts: a catalog URL naming the farm itself, a denied
    /// network or a non-unicast address is refused. A name that does not resolve now is left to
    /// the run (FFmpeg reports it and the crash loop ends it).
    pub async fn check_source(&self, url: &str, timeout: Duration) -> Result<(), String> {
        let Some((host, port)) = endpoint(url) else {
            return Ok(());
        };
        match self.resolve(&host, port, true, timeout).await {
            Ok(_) | Err(Refusal::Unresolved(_)) => Ok(()),
            Err(Refusal::Refused(why)) => Err(format!("its upstream {host}:{port}: {why}")),
        }
    }
}

/// The `host:port`s a channel's catalog names: internal addresses behind them are the operator's
/// choice, not an upstream's.
pub fn vouched(sources: &[String]) -> HashSet<(String, u16)> {
    sources.iter().filter_map(|u| endpoint(u)).collect()
}

struct GatewayCtx {
    channel: String,
    policy: Arc<Policy>,
    vouched: HashSet<(String, u16)>,
    timeout: Duration,
    metrics: Arc<Metrics>,
    last_refusal: Mutex<Option<String>>,
}

/// One channel's HTTP forward proxy on 127.0.0.1. Dropping it closes the listener and every
/// connection through it.
pub struct Gateway {
    port: u16,
    ctx: Arc<GatewayCtx>,
    task: JoinHandle<()>,
}

impl Gateway {
    pub async fn open(
        channel: &str,
        policy: Arc<Policy>,
        sources: &[String],
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Gateway> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let ctx = Arc::new(GatewayCtx {
            channel: channel.to_string(),
            policy,
            vouched: vouched(sources),
            timeout,
            metrics,
            last_refusal: Mutex::new(None),
        });
        let c = ctx.clone();
        let task = tokio::spawn(
            async move {
                // Connections live in this set: aborting the accept loop drops them all.
                let mut conns = JoinSet::new();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((mut stream, _)) if conns.len() >= MAX_CONNECTIONS => {
                                conns.spawn(async move {
                                    let why = format!("over {MAX_CONNECTIONS} connections at once");
                                    answer(&mut stream, "503 Service Unavailable", &why).await;
                                });
                            }
                            Ok((stream, _)) => {
                                conns.spawn(serve(stream, c.clone()));
                            }
                            Err(e) => {
                                warn!(error = %e, "egress gateway accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        },
                        Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    }
                }
            }
            .instrument(tracing::info_span!("egress", channel = %channel, port)),
        );
        Ok(Gateway { port, ctx, task })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `-http_proxy` value for FFmpeg.
    pub fn proxy_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The last refusal since the previous call: it explains an FFmpeg exit better than FFmpeg's
    /// own "403 Forbidden".
    pub fn take_refusal(&self) -> Option<String> {
        self.ctx
            .last_refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
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

fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, String> {
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
    let mut out = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
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

async fn answer(client: &mut TcpStream, status: &str, body: &str) {
    let text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
        body.len() + 1
    );
    let _ = client.write_all(text.as_bytes()).await;
    let _ = client.shutdown().await;
}

async fn serve(mut client: TcpStream, ctx: Arc<GatewayCtx>) {
    let mut buf = Vec::with_capacity(2048);
    let head = tokio::time::timeout(ctx.timeout, async {
        loop {
            let mut chunk = [0u8; 2048];
            let n = client.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before a request".to_string());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(h) = parse_head(&buf)? {
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
    let vouched = ctx.vouched.contains(&(head.host.clone(), head.port));
    let addrs = match ctx
        .policy
        .resolve(&head.host, head.port, vouched, ctx.timeout)
        .await
    {
        Ok(a) => a,
        Err(Refusal::Unresolved(e)) => {
            answer(&mut client, "502 Bad Gateway", &e).await;
            return;
        }
        Err(Refusal::Refused(e)) => {
            let why = format!("egress to {}:{} refused: {e}", head.host, head.port);
            warn!(channel = %ctx.channel, "{why}");
            ctx.metrics.egress_refused.inc();
            *ctx.last_refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
            answer(&mut client, "403 Forbidden", &why).await;
            return;
        }
    };
    let mut upstream = None;
    let mut last_err = String::new();
    for a in &addrs {
        match tokio::time::timeout(ctx.timeout, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                upstream = Some(s);
                break;
            }
            Ok(Err(e)) => last_err = format!("{a}: {e}"),
            Err(_) => last_err = format!("{a}: no answer within {:?}", ctx.timeout),
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
    ctx.metrics.egress_connections.inc();
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
        _ = tokio::io::copy(&mut ur, &mut cw) => {}
        _ = tokio::io::copy(&mut cr, &mut uw) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        IpNet::parse(s).expect("net")
    }

    async fn policy() -> Policy {
        Policy::new(
            &[
                ("Redis".into(), "127.0.0.1".into(), 6379),
                ("sentinel".into(), "10.1.2.3".into(), 26379),
            ],
            vec![net("192.168.50.0/24")],
            vec![net("203.0.113.0/24")],
        )
        .await
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[tokio::test]
    async fn the_farm_itself_is_never_reached_in_any_spelling() {
        let p = policy().await;
        for a in [
            "127.0.0.1:6379",
            "127.0.0.2:6379",
            "0.0.0.0:6379",
            "[::1]:6379",
            "[::]:6379",
            "[::ffff:127.0.0.1]:6379",
            "10.1.2.3:26379",
        ] {
            let e = p.check(sa(a), true).expect_err(a);
            assert!(e.contains("the farm's"), "{a}: {e}");
        }
        // Another port on the sentinel's host is only an internal address.
        assert!(p.check(sa("10.1.2.3:80"), true).is_ok());
    }

    #[tokio::test]
    async fn internal_addresses_need_the_catalog_or_an_allowed_network() {
        let p = policy().await;
        for a in [
            "127.0.0.1:8080",
            "10.0.0.1:80",
            "172.16.0.1:80",
            "192.168.1.1:80",
            "169.254.169.254:80",
            "100.64.0.1:80",
            "[fd00::1]:80",
            "[fe80::1]:80",
            "[::ffff:10.0.0.1]:80",
        ] {
            let e = p.check(sa(a), false).expect_err(a);
            assert!(e.contains("internal address"), "{a}: {e}");
            assert!(p.check(sa(a), true).is_ok(), "{a} vouched by the catalog");
        }
        assert!(p.check(sa("192.168.50.7:80"), false).is_ok(), "allowed net");
        assert!(p.check(sa("198.51.100.7:80"), false).is_ok(), "public");
        let e = p.check(sa("203.0.113.9:80"), true).expect_err("denied net");
        assert!(e.contains("--egress-deny"), "{e}");
        for a in ["224.0.0.1:80", "255.255.255.255:80", "198.51.100.7:0"] {
            assert!(p.check(sa(a), true).is_err(), "{a}");
        }
    }

    #[test]
    fn endpoints_of_urls() {
        assert_eq!(
            endpoint("http://u:p@Provider.Example/x.ts"),
            Some(("provider.example".into(), 80))
        );
        assert_eq!(endpoint("https://[::1]:8443/a"), Some(("::1".into(), 8443)));
        assert_eq!(endpoint("rtmp://h/live/x"), Some(("h".into(), 1935)));
        assert_eq!(endpoint("udp://239.0.0.1:1234"), None);
        assert_eq!(endpoint("http://h:99999/"), None);
    }

    #[test]
    fn proxy_heads_are_rewritten_to_origin_form_with_connection_close() {
        let raw: &[u8] = b"GET http://Up.Example:8080/live/a.m3u8?t=1 HTTP/1.1\r\nHost: up.example:8080\r\nConnection: keep-alive\r\nProxy-Authorization: x\r\nUser-Agent: Lavf\r\n\r\nrest";
        let (h, used) = parse_head(raw).expect("parse").expect("complete");
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

        let (c, _) = parse_head(b"CONNECT [::1]:443 HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("parse")
            .expect("complete");
        assert!(c.connect);
        assert_eq!((c.host.as_str(), c.port), ("::1", 443));

        assert!(parse_head(b"GET /origin-form HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_head(b"GET ftp://x/ HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_head(b"CONNECT nohost HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_head(b"GET http://x/ HTTP/1.1\r\nHost")
            .expect("partial")
            .is_none());
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
        let policy = Arc::new(policy().await);
        let metrics = Arc::new(Metrics::new());
        let gw = Gateway::open(
            "ch",
            policy,
            &[format!("http://127.0.0.1:{up_port}/live.m3u8")],
            Duration::from_secs(2),
            metrics.clone(),
        )
        .await
        .expect("gateway");

        async fn ask(port: u16, req: String) -> String {
            let mut s = TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            s.write_all(req.as_bytes()).await.expect("write");
            let mut out = String::new();
            s.read_to_string(&mut out).await.expect("read");
            out
        }
        let ok = ask(
            gw.port(),
            format!("GET http://127.0.0.1:{up_port}/seg.ts HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        )
        .await;
        assert!(
            ok.starts_with("HTTP/1.1 200 OK") && ok.ends_with("ok"),
            "{ok}"
        );
        let seen = got.await.expect("upstream");
        assert!(seen.starts_with("GET /seg.ts HTTP/1.1\r\n"), "{seen}");

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
        assert_eq!(metrics.egress_refused.get(), 4);
        assert!(gw
            .take_refusal()
            .is_some_and(|r| r.contains("internal address")));
        let bad = ask(gw.port(), "GET /x HTTP/1.1\r\n\r\n".into()).await;
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
        // A name that does not resolve is a gateway error, not a refusal.
        let nx = ask(
            gw.port(),
            "GET http://no-such-host.invalid/x HTTP/1.1\r\n\r\n".into(),
        )
        .await;
        assert!(nx.starts_with("HTTP/1.1 502"), "{nx}");
        assert_eq!(metrics.egress_refused.get(), 4);

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
}
