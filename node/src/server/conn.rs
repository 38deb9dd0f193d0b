//! One connection of the node's HTTP server under hyper's HTTP/1 builder: nothing allocated until
//! it sends a byte, every byte noted in its [`ConnState`], closed when a timeout runs out, when the
//! registry evicts it, or (after its request in flight) at shutdown.

use super::limits::Limits;
use super::registry::{lock, ConnState, Registry};
use crate::metrics::{KindLabel, Metrics};
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::debug;

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

/// One accepted connection; removed from the registry when dropped.
pub(super) struct Conn {
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
    pub(super) fn new(
        id: u64,
        peer: SocketAddr,
        state: Arc<ConnState>,
        registry: Arc<Mutex<Registry>>,
        metrics: Arc<Metrics>,
    ) -> Conn {
        Conn {
            id,
            peer,
            state,
            registry,
            metrics,
        }
    }

    /// Waits for the connection's first byte: whether it came before the header timeout, a kill
    /// or shutdown. Nothing is allocated for a connection until it sends something (hyper reserves
    /// its read buffer on the first poll): an idle one costs only its socket and this task.
    async fn first_byte(
        &self,
        stream: &TcpStream,
        limits: &Limits,
        shutdown: &CancellationToken,
    ) -> bool {
        let state = &self.state;
        let first = tokio::time::Instant::from_std(
            state.epoch + Duration::from_millis(state.opened_ms) + limits.header_timeout,
        );
        tokio::select! {
            r = stream.readable() => r.is_ok(),
            _ = state.kill.notified() => false,
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep_until(first) => {
                self.metrics
                    .http_connections_timed_out
                    .get_or_create(&KindLabel { kind: "header".into() })
                    .inc();
                false
            }
        }
    }

    pub(super) async fn run(
        self,
        stream: TcpStream,
        app: Router,
        limits: Arc<Limits>,
        shutdown: CancellationToken,
    ) {
        if !self.first_byte(&stream, &limits, &shutdown).await {
            return;
        }
        let state = self.state.clone();
        let peer = self.peer;
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
