//! One proxied request, from FFmpeg's request head to the end of the relay: the request rate, the
//! [`Policy`](super::Policy)'s decision on the resolved addresses, the connection to exactly the
//! address it checked, the bounded response head (plain HTTP), then bytes both ways, throttled
//! down to the channel's bandwidth and checked against the fence before every write.

use super::gateway::Ctx;
use super::limits::{GatewayEvent, LimitKind, Limits, Throttle};
use super::policy::Refusal;
use super::request::{parse_head, Head};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, warn};

/// The longest request head FFmpeg may send the gateway.
const MAX_HEAD: usize = 16 * 1024;
/// Relay buffer per direction and connection (tokio's `copy` uses the same).
const RELAY_BUF: usize = 8 * 1024;

/// One proxied request of the FFmpeg `pid` (0: not known).
pub(super) async fn serve(mut client: TcpStream, ctx: std::sync::Arc<Ctx>, pid: u32) {
    let Some((head, rest)) = read_request(&mut client, &ctx).await else {
        return;
    };
    if let Err(why) = ctx.budget.request(pid) {
        answer(&mut client, "429 Too Many Requests", &why).await;
        return;
    }
    let mut upstream = match connect(&ctx, &head).await {
        Ok(s) => s,
        Err((status, why)) => {
            answer(&mut client, status, &why).await;
            return;
        }
    };
    if !ctx.fence.is_open() {
        // The fence closed while this one was resolving or connecting.
        return;
    }
    (ctx.events)(GatewayEvent::Connected);
    let _ = upstream.set_nodelay(true);
    if send_request(&mut client, &mut upstream, &head, &rest)
        .await
        .is_err()
    {
        return;
    }
    let dest = head.dest();
    // Plain HTTP: the response head is read here, bounded in size and time (inside TLS it cannot
    // be seen: there the bandwidth cap and FFmpeg's own read timeout bound it).
    let mut first = Vec::new();
    if !head.connect {
        match response_head(&mut upstream, ctx.budget.limits().head_max, ctx.cfg.timeout).await {
            Ok(b) => first = b,
            Err(e) => {
                let (kind, status, why) = e.explain(&dest, ctx.budget.limits(), ctx.cfg.timeout);
                if let Some(kind) = kind {
                    ctx.budget.report(kind, why.clone(), pid);
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
    let down = Throttle::new(&ctx.budget, pid, &dest);
    tokio::select! {
        _ = pump(&first, &mut ur, &mut cw, &ctx, Some(down)) => {}
        _ = pump(&[], &mut cr, &mut uw, &ctx, None) => {}
    }
}

/// Reads FFmpeg's request head, within the gateway's timeout: the head and the bytes that came
/// after it. A bad head is answered 400; a client that sends none in time is dropped.
async fn read_request(client: &mut TcpStream, ctx: &Ctx) -> Option<(Head, Vec<u8>)> {
    let mut buf = Vec::with_capacity(2048);
    let head = tokio::time::timeout(ctx.cfg.timeout, async {
        loop {
            let mut chunk = [0u8; 2048];
            let n = client.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before a request".to_string());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(h) = parse_head(&buf, &ctx.cfg.secrets)? {
                return Ok(h);
            }
            if buf.len() > MAX_HEAD {
                return Err(format!("request head over {MAX_HEAD} bytes"));
            }
        }
    })
    .await;
    match head {
        Ok(Ok((head, used))) => Some((head, buf.split_off(used))),
        Ok(Err(e)) => {
            debug!(error = %e, "egress request refused");
            answer(client, "400 Bad Request", &e).await;
            None
        }
        Err(_) => None,
    }
}

/// Resolves the destination, asks the policy, and connects to the first address it allows that
/// answers. The error is FFmpeg's answer: 403 for a refusal (reported), else 502.
async fn connect(ctx: &Ctx, head: &Head) -> Result<TcpStream, (&'static str, String)> {
    let cfg = &ctx.cfg;
    let vouched = cfg.vouched.contains(&(head.host.clone(), head.port));
    let addrs = match cfg
        .policy
        .resolve(&head.host, head.port, vouched, cfg.timeout)
        .await
    {
        Ok(a) => a,
        Err(Refusal::Unresolved(e)) => return Err(("502 Bad Gateway", e)),
        Err(Refusal::Refused(e)) => {
            let why = format!("egress to {} refused: {e}", head.dest());
            warn!(channel = %cfg.channel, "{why}");
            (ctx.events)(GatewayEvent::Refused(why.clone()));
            return Err(("403 Forbidden", why));
        }
    };
    let mut last_err = String::new();
    for a in &addrs {
        match tokio::time::timeout(cfg.timeout, TcpStream::connect(a)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last_err = format!("{a}: {e}"),
            Err(_) => last_err = format!("{a}: no answer within {:?}", cfg.timeout),
        }
    }
    let why = format!("cannot connect to {}: {last_err}", head.dest());
    Err(("502 Bad Gateway", why))
}

/// Sends the request on: for `CONNECT`, FFmpeg learns the tunnel is up and its first TLS bytes go
/// through; for plain HTTP, the rewritten head and what followed it.
async fn send_request(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    head: &Head,
    rest: &[u8],
) -> std::io::Result<()> {
    if head.connect {
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
    } else {
        upstream.write_all(&head.forward).await?;
    }
    upstream.write_all(rest).await
}

/// A short answer of the gateway's own, then the connection ends.
pub(super) async fn answer(client: &mut TcpStream, status: &str, body: &str) {
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

impl HeadError {
    /// The limit it was (if any), FFmpeg's status and the sentence.
    fn explain(
        self,
        dest: &str,
        l: Limits,
        timeout: Duration,
    ) -> (Option<LimitKind>, &'static str, String) {
        match self {
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
                format!("upstream {dest} sent no response head within {timeout:?}"),
            ),
            HeadError::Closed(e) => (None, "502 Bad Gateway", format!("upstream {dest}: {e}")),
        }
    }
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

/// Writes `first`, then copies until EOF, an error, or the fence: nothing read is written once
/// the deadline passed. With a throttle, no faster than the channel's bandwidth cap.
async fn pump<R, W>(
    first: &[u8],
    from: &mut R,
    to: &mut W,
    ctx: &Ctx,
    mut throttle: Option<Throttle<'_>>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUF];
    let mut chunk = first;
    loop {
        if chunk.is_empty() {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            chunk = &buf[..n];
        }
        if let Some(t) = throttle.as_mut() {
            t.pass(chunk.len()).await;
        }
        if !ctx.fence.is_open() {
            return Err(std::io::Error::other("fenced"));
        }
        to.write_all(chunk).await?;
        chunk = &[];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_head_ends_at_its_blank_line() {
        assert_eq!(head_end(b"HTTP/1.0 200 OK\n\nbody", 0), Some(17));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\nA: b\r\n", 0), None);
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n", 22), Some(25));
    }
}
