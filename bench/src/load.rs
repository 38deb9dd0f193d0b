//! The load generator shared by every throughput comparison: closed-loop HTTP/1.1 over N keep-alive
//! connections, each sending its next `GET` as soon as the previous response is complete.
//!
//! It is deliberately cheap per byte: response bodies of known length are discarded inside the
//! kernel (`recv(MSG_TRUNC)` on the TCP socket, no copy to user space), so on a small machine the
//! client takes as little CPU as possible from the server under test. The same generator, with the
//! same settings, drives A and B of every comparison. Only responses that complete inside the
//! measured window (after the warm-up) are counted; a response with another status than the
//! expected one counts as an error, not as a request.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustix::net::RecvFlags;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// One load run against one URL.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub addr: SocketAddr,
    /// Request target, e.g. `/live/ch/index.m3u8`.
    pub path: String,
    pub connections: usize,
    /// Not counted: connections are open and the server's caches are warm afterwards.
    pub warmup: Duration,
    /// Measured window after the warm-up.
    pub duration: Duration,
    pub expect_status: u16,
}

/// What one load run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Responses with the expected status completed inside the window.
    pub requests: u64,
    /// Responses with another status, and transport errors, inside the window.
    pub errors: u64,
    /// Body bytes of the counted responses.
    pub body_bytes: u64,
    /// Length of the measured window.
    pub window: Duration,
    /// Status → count inside the window.
    pub statuses: BTreeMap<u16, u64>,
    /// Responses completed during the warm-up (not counted above).
    pub warmup_responses: u64,
    /// Connections (re)opened, warm-up included (nginx closes one after `keepalive_requests`).
    pub connects: u64,
    /// The last transport or protocol error, if any.
    pub last_error: Option<String>,
}

impl LoadResult {
    /// Counted requests per second of window.
    pub fn rps(&self) -> f64 {
        let s = self.window.as_secs_f64();
        if s > 0.0 {
            self.requests as f64 / s
        } else {
            0.0
        }
    }

    fn merge(&mut self, o: LoadResult) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.body_bytes += o.body_bytes;
        self.connects += o.connects;
        self.warmup_responses += o.warmup_responses;
        for (k, v) in o.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        if o.last_error.is_some() {
            self.last_error = o.last_error;
        }
    }
}

/// Runs `spec` and returns the merged result of all connections.
pub async fn run(spec: &LoadSpec) -> LoadResult {
    let request: Arc<[u8]> = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: farm-bench\r\nAccept: */*\r\n\r\n",
        spec.path, spec.addr
    )
    .into_bytes()
    .into();
    let start = Instant::now();
    let count_from = start + spec.warmup;
    let end = count_from + spec.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..spec.connections.max(1) {
        let request = request.clone();
        let addr = spec.addr;
        let expect = spec.expect_status;
        tasks.spawn(async move { connection(addr, request, expect, count_from, end).await });
    }
    let mut total = LoadResult {
        window: spec.duration,
        ..LoadResult::default()
    };
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(r) => total.merge(r),
            Err(e) => total.last_error = Some(format!("load task failed: {e}")),
        }
    }
    total
}

/// One response head.
struct Head {
    status: u16,
    /// Bytes of the head, up to and including the blank line.
    len: usize,
    body: BodyLen,
    close: bool,
}

enum BodyLen {
    Known(usize),
    Chunked,
    /// Until the connection closes (HTTP/1.0 style).
    UntilClose,
}

/// One keep-alive connection's loop until `end`.
async fn connection(
    addr: SocketAddr,
    request: Arc<[u8]>,
    expect: u16,
    count_from: Instant,
    end: Instant,
) -> LoadResult {
    let mut out = LoadResult::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut trash = vec![0u8; 1 << 20];
    let mut conn: Option<TcpStream> = None;
    while Instant::now() < end {
        let stream = match conn.as_mut() {
            Some(s) => s,
            None => match connect(addr).await {
                Ok(s) => {
                    out.connects += 1;
                    conn.insert(s)
                }
                Err(e) => {
                    record_error(&mut out, count_from, format!("connect {addr}: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let exchange = tokio::time::timeout_at(
            end + Duration::from_millis(50),
            one_request(stream, &request, &mut buf, &mut trash),
        )
        .await;
        let done = Instant::now();
        match exchange {
            // The window closed with this response in flight: not counted.
            Err(_) => break,
            Ok(Ok((status, body, keep))) => {
                if done < count_from {
                    out.warmup_responses += 1;
                } else if done <= end {
                    *out.statuses.entry(status).or_default() += 1;
                    if status == expect {
                        out.requests += 1;
                        out.body_bytes += body as u64;
                    } else {
                        out.errors += 1;
                    }
                }
                if !keep {
                    conn = None;
                }
            }
            Ok(Err(e)) => {
                record_error(&mut out, count_from, e.to_string());
                conn = None;
            }
        }
    }
    out
}

fn record_error(out: &mut LoadResult, count_from: Instant, e: String) {
    if Instant::now() >= count_from {
        out.errors += 1;
    }
    out.last_error = Some(e);
}

async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends one request and reads its response; `(status, body length, keep-alive)`.
async fn one_request(
    stream: &mut TcpStream,
    request: &[u8],
    buf: &mut [u8],
    trash: &mut [u8],
) -> io::Result<(u16, usize, bool)> {
    stream.write_all(request).await?;
    let mut filled = 0usize;
    let head = loop {
        if let Some(h) = parse_head(&buf[..filled])? {
            break h;
        }
        filled = fill(stream, buf, filled, HEAD).await?;
    };
    let extra = filled - head.len;
    match head.body {
        BodyLen::Known(len) => {
            if extra > len {
                return Err(bad(
                    "more bytes than Content-Length (pipelining is not used)",
                ));
            }
            discard(stream, len - extra, trash).await?;
            Ok((head.status, len, !head.close))
        }
        BodyLen::Chunked => {
            buf.copy_within(head.len..filled, 0);
            let len = read_chunked(stream, buf, extra).await?;
            Ok((head.status, len, !head.close))
        }
        BodyLen::UntilClose => {
            let mut len = extra;
            loop {
                let n = stream.read(trash).await?;
                if n == 0 {
                    break;
                }
                len += n;
            }
            Ok((head.status, len, false))
        }
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Parses a complete response head at the start of `data`, `None` if more bytes are needed.
fn parse_head(data: &[u8]) -> io::Result<Option<Head>> {
    let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&data[..end]).map_err(|_| bad("response head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or("");
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut close = version == "HTTP/1.0";
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| bad("bad Content-Length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        }
    }
    // 1xx, 204 and 304 have no body.
    let no_body = status < 200 || status == 204 || status == 304;
    let body = match (no_body, chunked, length) {
        (true, _, _) => BodyLen::Known(0),
        (false, true, _) => BodyLen::Chunked,
        (false, false, Some(n)) => BodyLen::Known(n),
        (false, false, None) => BodyLen::UntilClose,
    };
    Ok(Some(Head {
        status,
        len: end + 4,
        body,
        close,
    }))
}

/// Drops `remaining` body bytes inside the kernel (`recv` with `MSG_TRUNC`: no copy to user space).
async fn discard(stream: &TcpStream, mut remaining: usize, trash: &mut [u8]) -> io::Result<()> {
    while remaining > 0 {
        stream.readable().await?;
        let want = remaining.min(trash.len());
        let r = stream.try_io(Interest::READABLE, || {
            rustix::net::recv(
                stream,
                &mut trash[..want],
                RecvFlags::TRUNC | RecvFlags::DONTWAIT,
            )
            .map(|(_, n)| n)
            .map_err(io::Error::from)
        });
        match r {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a body",
                ))
            }
            Ok(n) => remaining = remaining.saturating_sub(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads a chunked body whose first `have` bytes are at the start of `buf`; returns its length.
async fn read_chunked(
    stream: &mut TcpStream,
    buf: &mut [u8],
    mut have: usize,
) -> io::Result<usize> {
    let mut total = 0usize;
    loop {
        // Chunk size line.
        let line_end = loop {
            if let Some(p) = buf[..have].windows(2).position(|w| w == b"\r\n") {
                break p;
            }
            have = fill(stream, buf, have, CHUNKED).await?;
        };
        let size_text = std::str::from_utf8(&buf[..line_end]).map_err(|_| bad("bad chunk size"))?;
        let size_hex = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| bad("bad chunk size"))?;
        buf.copy_within(line_end + 2..have, 0);
        have -= line_end + 2;
        if size == 0 {
            // Trailers (none expected) end with an empty line.
            loop {
                if let Some(p) = buf[..have].windows(2).position(|w| w == b"\r\n") {
                    if p == 0 {
                        return Ok(total);
                    }
                    buf.copy_within(p + 2..have, 0);
                    have -= p + 2;
                    continue;
                }
                have = fill(stream, buf, have, CHUNKED).await?;
            }
        }
        total += size;
        // Chunk data plus its CRLF.
        let mut need = size + 2;
        while need > 0 {
            if have == 0 {
                have = fill(stream, buf, 0, CHUNKED).await?;
            }
            let take = need.min(have);
            buf.copy_within(take..have, 0);
            have -= take;
            need -= take;
        }
    }
}

/// What [`fill`] reads: the errors it gives when the buffer is full, and when the peer closes.
struct Reading {
    full: &'static str,
    closed: &'static str,
}

const HEAD: Reading = Reading {
    full: "response head larger than 64 KiB",
    closed: "connection closed before the response head",
};

const CHUNKED: Reading = Reading {
    full: "chunk line too long",
    closed: "connection closed inside a chunked body",
};

/// Reads more after the `have` bytes already in `buf`; how many it holds now.
async fn fill(
    stream: &mut TcpStream,
    buf: &mut [u8],
    have: usize,
    reading: Reading,
) -> io::Result<usize> {
    if have == buf.len() {
        return Err(bad(reading.full));
    }
    let n = stream.read(&mut buf[have..]).await?;
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, reading.closed));
    }
    Ok(have + n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_parsed() {
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello")
            .expect("ok")
            .expect("complete");
        assert_eq!(h.status, 200);
        assert!(matches!(h.body, BodyLen::Known(12)));
        assert!(!h.close);
        assert_eq!(h.len, 39);
        let h = parse_head(
            b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\nConnection: close\r\n\r\n",
        )
        .expect("ok")
        .expect("complete");
        assert!(matches!(h.body, BodyLen::Chunked));
        assert!(h.close);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le")
            .expect("ok")
            .is_none());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
    }

    #[tokio::test]
    async fn counts_requests_against_a_real_server() {
        let app = axum::Router::new()
            .route(
                "/fixed",
                axum::routing::get(|| async { vec![7u8; 300_000] }),
            )
            .route(
                "/chunked",
                axum::routing::get(|| async {
                    let parts: Vec<Result<bytes::Bytes, std::io::Error>> = vec![
                        Ok(bytes::Bytes::from_static(b"abc")),
                        Ok(bytes::Bytes::from_static(b"defgh")),
                    ];
                    axum::body::Body::from_stream(futures::stream::iter(parts))
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        for (path, len) in [("/fixed", 300_000u64), ("/chunked", 8)] {
            let r = run(&LoadSpec {
                addr,
                path: path.into(),
                connections: 4,
                warmup: Duration::from_millis(50),
                duration: Duration::from_millis(300),
                expect_status: 200,
            })
            .await;
            assert!(r.requests > 10, "{path}: {r:?}");
            assert_eq!(r.errors, 0, "{path}: {r:?}");
            assert_eq!(r.body_bytes, r.requests * len, "{path}: {r:?}");
        }
        server.abort();
    }
}
