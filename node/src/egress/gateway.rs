//! One channel's egress gateway: a tiny HTTP forward proxy on 127.0.0.1 (absolute-form `GET` and
//! `CONNECT` for TLS) that FFmpeg reads every `http`/`https` upstream through. This part owns its
//! life: the listener, who is let in, how many at once, and the end of every connection at a
//! fence or when the gateway is dropped; each request is served by `relay`.
//!
//! Gateways live in the guard process (see `guard`), not in the node: the upstream connections
//! they hold end at the node's fence even while the node process is frozen. A gateway passes
//! bytes only while its [`Fence`] is open: at a fence it drops every connection, and until the
//! next renewal it answers new ones with 503 and relays nothing (checked before every write, so
//! data that queued up while the host was frozen is not delivered after the deadline). Only the
//! channel's own FFmpeg may connect ([`super::peer`]); any other local process is refused.

use super::limits::{Budget, EventSink, LimitKind, Limits};
use super::peer::{PeerTable, Verdict};
use super::policy::{vouched, Policy};
use super::relay::{answer, serve};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, warn, Instrument};

/// Connections open through one gateway at most: an FFmpeg fetches one file at a time per
/// playlist, so more means a playlist fanning out (many variants), which gets 503s instead.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection from a process not known (yet) is held while its channel has no live
/// FFmpeg known: the node announces an FFmpeg right after spawning it, usually within a millisecond.
pub(super) const PEER_WAIT: Duration = Duration::from_secs(2);
/// Such connections held at once per gateway; beyond, they are refused at once.
const PEER_WAITING: usize = 8;

const NOT_YOURS: &str = "403 Forbidden";
const UNAVAILABLE: &str = "503 Service Unavailable";

/// The node's fence as a gateway sees it (the guard's clock, `guard::fence`): whether bytes may
/// pass now, and a change at every fence, when every connection is dropped.
pub trait Fence: Send + Sync {
    fn is_open(&self) -> bool;
    fn fences(&self) -> watch::Receiver<u64>;
}

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

/// What every connection of one gateway shares.
pub(super) struct Ctx {
    pub cfg: GatewayConfig,
    pub events: EventSink,
    pub fence: Arc<dyn Fence>,
    pub budget: Budget,
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
        fence: Arc<dyn Fence>,
    ) -> std::io::Result<Gateway> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let span = tracing::info_span!("egress", channel = %cfg.channel, port);
        let budget = Budget::new(cfg.limits, &cfg.channel, events.clone());
        let ctx = Arc::new(Ctx {
            cfg,
            events,
            fence,
            budget,
        });
        let task = tokio::spawn(Accept::new(listener, ctx)?.run().instrument(span));
        Ok(Gateway { port, task })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What becomes of an accepted connection.
enum Admit {
    /// From this FFmpeg (0: unchecked).
    Serve(TcpStream, u32),
    Answer(TcpStream, &'static str, String),
    /// Held until the channel's FFmpeg is announced (or refused after [`PEER_WAIT`]).
    Wait(TcpStream, SocketAddr),
}

/// The accept loop and the connections it holds: they live in its sets, so aborting the loop
/// (dropping the gateway) drops them all.
struct Accept {
    listener: TcpListener,
    local: SocketAddr,
    ctx: Arc<Ctx>,
    max: usize,
    conns: JoinSet<()>,
    /// Connections from a process not known yet, until it is (or PEER_WAIT).
    waiting: JoinSet<Option<(TcpStream, u32)>>,
    /// Strangers being answered 403 (reading their request first, so the answer is not lost to
    /// a reset); beyond as many as may wait, they are dropped unanswered.
    refusing: JoinSet<()>,
}

impl Accept {
    fn new(listener: TcpListener, ctx: Arc<Ctx>) -> std::io::Result<Accept> {
        Ok(Accept {
            local: listener.local_addr()?,
            listener,
            max: ctx.cfg.max_connections.max(1),
            ctx,
            conns: JoinSet::new(),
            waiting: JoinSet::new(),
            refusing: JoinSet::new(),
        })
    }

    async fn run(mut self) {
        let mut fences = self.ctx.fence.fences();
        loop {
            let admit = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => self.admit(stream, peer),
                    Err(e) => {
                        warn!(error = %e, "egress gateway accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                Some(done) = self.waiting.join_next(), if !self.waiting.is_empty() => match done {
                    Ok(Some((stream, pid))) => Admit::Serve(stream, pid),
                    _ => continue,
                },
                Some(_) = self.conns.join_next(), if !self.conns.is_empty() => continue,
                Some(_) = self.refusing.join_next(), if !self.refusing.is_empty() => continue,
                changed = fences.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if !self.conns.is_empty() {
                        debug!(connections = self.conns.len(), "fence: dropping every connection");
                    }
                    self.conns.abort_all();
                    continue;
                }
            };
            self.dispatch(admit);
        }
    }

    fn dispatch(&mut self, admit: Admit) {
        match admit {
            Admit::Serve(stream, pid) => {
                let why = if !self.ctx.fence.is_open() {
                    "fenced: this node has not renewed its leases".to_string()
                } else if self.conns.len() >= self.max {
                    format!("over {} connections at once", self.max)
                } else {
                    self.conns.spawn(serve(stream, self.ctx.clone(), pid));
                    return;
                };
                self.conns.spawn(answer_owned(stream, UNAVAILABLE, why));
            }
            Admit::Answer(mut stream, status, why) => {
                if self.refusing.len() < PEER_WAITING {
                    let timeout = self.ctx.cfg.timeout.min(Duration::from_secs(1));
                    self.refusing.spawn(async move {
                        let mut buf = [0u8; 2048];
                        let _ = tokio::time::timeout(timeout, stream.read(&mut buf)).await;
                        answer(&mut stream, status, &why).await;
                    });
                }
            }
            Admit::Wait(stream, peer) => {
                let (ctx, local) = (self.ctx.clone(), self.local);
                self.waiting
                    .spawn(async move { wait_for_ffmpeg(&ctx, stream, local, peer).await });
            }
        }
    }

    /// The peer check, at accept.
    fn admit(&self, stream: TcpStream, peer: SocketAddr) -> Admit {
        let ctx = &self.ctx;
        let Some(table) = &ctx.cfg.peers else {
            return Admit::Serve(stream, 0);
        };
        match super::peer::check(table, &ctx.cfg.channel, self.local, peer) {
            Verdict::Ours(pid) => Admit::Serve(stream, pid),
            Verdict::NotYet if self.waiting.len() < PEER_WAITING => Admit::Wait(stream, peer),
            Verdict::NotYet => {
                let why = stranger(ctx, peer, "no FFmpeg of this channel runs");
                Admit::Answer(stream, NOT_YOURS, why)
            }
            Verdict::Stranger(why) => Admit::Answer(stream, NOT_YOURS, stranger(ctx, peer, &why)),
        }
    }
}

async fn answer_owned(mut stream: TcpStream, status: &'static str, why: String) {
    answer(&mut stream, status, &why).await;
}

/// Reports a connection refused to a stranger; the sentence it is answered with.
fn stranger(ctx: &Ctx, peer: SocketAddr, why: &str) -> String {
    let why = format!("connection from {peer} refused: {why}");
    ctx.budget.report(LimitKind::Peer, why.clone(), 0);
    why
}

/// Holds a connection from a process not known yet until the channel's FFmpeg is announced, then
/// checks again; refuses it when none is within [`PEER_WAIT`].
async fn wait_for_ffmpeg(
    ctx: &Ctx,
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
    let why = stranger(ctx, peer, &why);
    answer(&mut stream, NOT_YOURS, &why).await;
    None
}
