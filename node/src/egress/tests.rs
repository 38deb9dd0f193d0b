//! The gateway as FFmpeg and upstreams see it, on real sockets: what the policy refuses, the fence,
//! each limit, and the peer check.

use super::gateway::PEER_WAIT;
use super::limits::tests::{limited, recorder};
use super::peer::PeerTable;
use super::policy::tests::policy;
use super::*;
use crate::guard::fence::FenceClock;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Seen = Arc<Mutex<Vec<GatewayEvent>>>;

/// A gateway for channel `ch` whose catalog names `127.0.0.1:<up_port>`, with a 2 s timeout and
/// default limits unless `tweak` says otherwise; the events it reports.
async fn gateway(
    up_port: u16,
    fence: Arc<FenceClock>,
    tweak: impl FnOnce(&mut GatewayConfig),
) -> (Gateway, Seen) {
    let (sink, seen) = recorder();
    let mut cfg = GatewayConfig::new(
        "ch",
        Arc::new(policy().await),
        &[format!("http://127.0.0.1:{up_port}/live.ts")],
        Duration::from_secs(2),
    );
    tweak(&mut cfg);
    let gw = Gateway::open(cfg, sink, fence).await.expect("gateway");
    (gw, seen)
}

fn open() -> Arc<FenceClock> {
    Arc::new(FenceClock::open_forever())
}

fn events(seen: &Seen) -> std::sync::MutexGuard<'_, Vec<GatewayEvent>> {
    seen.lock().unwrap_or_else(|p| p.into_inner())
}

/// Polls `f` every 10 ms for up to 5 s.
async fn wait_until(mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < until, "condition not met within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An upstream that answers every request with a short `200 OK`.
async fn ok_upstream() -> (u16, Arc<std::sync::atomic::AtomicU64>) {
    scripted_upstream(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            .await;
    })
    .await
}

/// The request FFmpeg sends the gateway for `path` on the upstream at `port`.
fn proxy_get(port: u16, path: &str) -> String {
    format!("GET http://127.0.0.1:{port}{path} HTTP/1.1\r\n\r\n")
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
    let (gw, seen) = gateway(up_port, open(), |_| {}).await;
    let refused = || {
        events(&seen)
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
    assert_eq!(events(&seen)[..], [GatewayEvent::Connected]);

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
    assert!(events(&seen)
        .last()
        .is_some_and(|e| matches!(e, GatewayEvent::Refused(r) if r.contains("internal address"))));
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
    let (gw, _) = gateway(up_port, fence.clone(), |_| {}).await;
    let get = proxy_get(up_port, "/live.ts");
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
    wait_until(|| open.load(Ordering::SeqCst) == 0).await;

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
    wait_until(|| open.load(Ordering::SeqCst) == 1).await;
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
    wait_until(|| open.load(Ordering::SeqCst) == 0).await;
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

async fn gateway_with(up_port: u16, limits: Limits, timeout: Duration) -> (Gateway, Seen) {
    gateway(up_port, open(), |cfg| {
        cfg.limits = limits;
        cfg.timeout = timeout;
    })
    .await
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
    let r = ask(gw.port(), proxy_get(endless, "/live.ts")).await;
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
        let (gw, seen) = gateway_with(port, Limits::default(), Duration::from_millis(500)).await;
        let t = Instant::now();
        let r = ask(gw.port(), proxy_get(port, "/live.ts")).await;
        assert!(r.starts_with("HTTP/1.1 504"), "{r}");
        assert!(r.contains("no response head within 500ms"), "{r}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(limited(&seen, LimitKind::Stall).0, 1);
    }

    // A normal head (with body bytes in the same packet) passes whole.
    let (normal, _) = scripted_upstream(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
            .await;
    })
    .await;
    let (gw, seen) = gateway_with(normal, Limits::default(), Duration::from_secs(2)).await;
    let r = ask(gw.port(), proxy_get(normal, "/a")).await;
    assert_eq!(
        r,
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    );
    assert!(events(&seen)
        .iter()
        .all(|e| matches!(e, GatewayEvent::Connected)));
}

#[tokio::test]
async fn requests_over_the_rate_get_429_and_the_upstream_sees_the_rate_only() {
    let (port, hits) = ok_upstream().await;
    let (gw, seen) = gateway_with(port, Limits::new(0, 10), Duration::from_secs(2)).await;
    let get = proxy_get(port, "/self.m3u8");
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
    wait_until(|| limited(&seen, LimitKind::Rate).0 == too_many).await;
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
        let get = proxy_get(port, "/fast.ts");
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
    println!("two connections, 2 s, cap 16 Mbit/s (burst 1 s): {a} + {b} bytes = {mbit:.1} Mbit/s");
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
    wait_until(|| limited(&seen, LimitKind::Bandwidth).0 == 2).await;
}

#[tokio::test]
async fn only_the_channels_own_ffmpeg_may_use_its_gateway() {
    let (port, hits) = ok_upstream().await;
    let table = Arc::new(PeerTable::default());
    let (gw, seen) = gateway(port, open(), |cfg| cfg.peers = Some(table.clone())).await;
    let get = proxy_get(port, "/live.ts");

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
