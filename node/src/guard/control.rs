//! The guard's control loop: its fence and its gateways.
//!
//! One task owns everything: it reads the node's messages, keeps the deadline, and fences when the
//! deadline passes. The fence kills every FFmpeg the node announced (start time checked) and every
//! marked FFmpeg child of the node it finds in `/proc`, then drops every gateway connection; until
//! a later deadline arrives gateways answer 503, relay nothing, and an FFmpeg announced meanwhile
//! is killed at once. At EOF (the node is gone) it kills what it tracks and ends.

use super::fence::{self, monotonic_ns, FenceClock, Step};
use super::proto::{decode, encode, Frame, FromGuard, ToGuard, MAX_LINE};
use crate::egress::peer::PeerTable;
use crate::egress::{EventSink, Gateway, GatewayConfig, GatewayEvent, Limits, Policy};
use crate::procs;
use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

/// Bounds on what the node may ask for (it is trusted, but a bug must not grow the guard forever).
const MAX_GATEWAYS: usize = 100_000;
const MAX_TRACKED: usize = 100_000;
/// Events (not replies) queued for a node that does not read (frozen): beyond, they are dropped.
const EVENT_QUEUE: usize = 1024;

/// Lines to the node: replies in order and never dropped; events dropped while the node does not
/// read (a frozen node), counted.
#[derive(Clone)]
pub(super) struct Outbox {
    replies: mpsc::UnboundedSender<String>,
    events: mpsc::Sender<String>,
    pub(super) dropped: Arc<AtomicU64>,
}

impl Outbox {
    pub(super) fn new() -> (
        Outbox,
        mpsc::UnboundedReceiver<String>,
        mpsc::Receiver<String>,
    ) {
        let (rtx, rrx) = mpsc::unbounded_channel();
        let (etx, erx) = mpsc::channel(EVENT_QUEUE);
        (
            Outbox {
                replies: rtx,
                events: etx,
                dropped: Arc::default(),
            },
            rrx,
            erx,
        )
    }

    fn reply(&self, m: &FromGuard) {
        let _ = self.replies.send(encode(m));
    }

    fn event(&self, m: &FromGuard) {
        if self.events.try_send(encode(m)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct State {
    node_pid: Option<u32>,
    hls_root: std::path::PathBuf,
    policy: Option<Arc<Policy>>,
    clock: Arc<FenceClock>,
    /// The deadline the last fence was for (`Some(0)`: none yet, closed).
    fenced_for: Option<u64>,
    /// pid → (start time, channel).
    ffmpegs: HashMap<u32, (u64, String)>,
    /// The same by channel, for the gateways' peer checks.
    peers: Arc<PeerTable>,
    limits: Limits,
    gateways: HashMap<u64, Gateway>,
    out: Outbox,
}

/// The control loop: ends at EOF on the control pipe, or on a bad `init`. `peers` is filled from
/// the node's announcements (given here so unit tests can add themselves).
pub(super) async fn run(
    mut rx: mpsc::Receiver<Frame>,
    out: Outbox,
    peers: Arc<PeerTable>,
) -> ExitCode {
    let mut st = State {
        node_pid: None,
        hls_root: std::path::PathBuf::new(),
        policy: None,
        clock: Arc::new(FenceClock::closed()),
        fenced_for: Some(0),
        ffmpegs: HashMap::new(),
        peers,
        limits: Limits::default(),
        gateways: HashMap::new(),
        out,
    };
    loop {
        // The clock first: a guard thawed past its deadline fences before it reads anything.
        let wait = match fence::step(monotonic_ns(), st.clock.deadline_ns(), st.fenced_for) {
            Step::Fence => {
                st.fence();
                continue;
            }
            Step::Sleep(d) => d,
            Step::Wait => Duration::from_secs(3600),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            frame = rx.recv() => match frame {
                None => {
                    st.node_gone();
                    return ExitCode::SUCCESS;
                }
                Some(Frame::TooLong) => warn!("a control line over {MAX_LINE} bytes was skipped"),
                Some(Frame::Line(line)) => match decode::<ToGuard>(&line) {
                    Ok(msg) => {
                        if let Err(e) = st.handle(msg).await {
                            error!("{e}");
                            return ExitCode::from(2);
                        }
                    }
                    Err(e) => warn!("{e}"),
                },
            },
        }
    }
}

impl State {
    /// Acts on one message; an error ends the guard (only a bad `init` does).
    async fn handle(&mut self, msg: ToGuard) -> Result<(), String> {
        match msg {
            ToGuard::Init {
                node_pid,
                hls_root,
                policy,
                limits,
            } => self.init(node_pid, hls_root, &policy, limits)?,
            ToGuard::Deadline { mono_ns } => {
                if !self.clock.extend(mono_ns) {
                    debug!(
                        mono_ns,
                        "a deadline not later than the current one was ignored"
                    );
                } else if self.fenced_for.is_some_and(|f| f != 0) && self.clock.is_open() {
                    info!("renewed again: gateways open");
                }
            }
            ToGuard::Spawned {
                pid,
                start,
                channel,
            } => self.spawned(pid, start, channel),
            ToGuard::Reaped { pid } => {
                self.ffmpegs.remove(&pid);
                self.peers.remove(pid);
            }
            ToGuard::Open {
                id,
                channel,
                vouched,
                timeout_ms,
                max_connections,
                secrets,
            } => {
                let reply = match self
                    .open(id, channel, vouched, timeout_ms, max_connections, secrets)
                    .await
                {
                    Ok(port) => FromGuard::Opened { id, port },
                    Err(error) => FromGuard::OpenFailed { id, error },
                };
                self.out.reply(&reply);
            }
            ToGuard::Close { id } => {
                self.gateways.remove(&id);
            }
        }
        Ok(())
    }

    fn init(
        &mut self,
        node_pid: u32,
        hls_root: std::path::PathBuf,
        policy: &crate::egress::PolicySpec,
        limits: Limits,
    ) -> Result<(), String> {
        if self.node_pid.is_some() {
            warn!("a second init was ignored");
            return Ok(());
        }
        if node_pid <= 1 || hls_root.as_os_str().is_empty() {
            return Err(format!(
                "init names node pid {node_pid} and HLS root {}",
                hls_root.display()
            ));
        }
        self.hls_root = hls_root;
        let policy =
            Policy::from_spec(policy).map_err(|e| format!("init has a bad policy: {e}"))?;
        self.node_pid = Some(node_pid);
        self.policy = Some(Arc::new(policy));
        self.limits = limits;
        info!(node_pid, ?limits, "guarding the node");
        self.out.reply(&FromGuard::Ready {
            pid: std::process::id(),
        });
        Ok(())
    }

    /// The node spawned an FFmpeg: tracked, or killed at once while the fence is closed.
    fn spawned(&mut self, pid: u32, start: u64, channel: String) {
        if pid <= 1 {
            warn!(pid, "an ffmpeg with a bad pid was ignored");
        } else if !self.clock.is_open() {
            // The fence is closed: nothing may run, whatever the node thinks.
            let killed = procs::kill_group_verified(pid, start);
            error!(pid, %channel, killed, "ffmpeg spawned while the fence is closed: killed");
            self.out.reply(&FromGuard::Killed {
                pid,
                channel,
                why: "spawned while the fence was closed (no recent lease renewal)".into(),
            });
        } else if self.ffmpegs.len() >= MAX_TRACKED {
            warn!(
                pid,
                "too many ffmpegs tracked; this one is left to the /proc scan"
            );
        } else {
            self.peers.add(&channel, pid);
            self.ffmpegs.insert(pid, (start, channel));
        }
    }

    async fn open(
        &mut self,
        id: u64,
        channel: String,
        vouched: Vec<(String, u16)>,
        timeout_ms: u64,
        max_connections: usize,
        secrets: Vec<farm_proto::redact::OriginSecrets>,
    ) -> Result<u16, String> {
        let policy = self
            .policy
            .clone()
            .ok_or("the guard has not been initialised")?;
        farm_proto::validate::channel_id(&channel).map_err(|e| e.to_string())?;
        if self.gateways.contains_key(&id) {
            return Err(format!("gateway {id} is already open"));
        }
        if self.gateways.len() >= MAX_GATEWAYS {
            return Err(format!("over {MAX_GATEWAYS} gateways open"));
        }
        if !(1..=600_000).contains(&timeout_ms) || max_connections == 0 {
            return Err(format!(
                "bad gateway settings: timeout {timeout_ms} ms, {max_connections} connections"
            ));
        }
        let out = self.out.clone();
        let events: EventSink = Arc::new(move |e| match e {
            GatewayEvent::Connected => out.event(&FromGuard::Connected { id }),
            // In order with the replies: the node reads it before it reaps the FFmpeg it refused.
            GatewayEvent::Refused(why) => out.reply(&FromGuard::Refused { id, why }),
            // Reported at most once a second per kind; the ones that explain an FFmpeg exit as
            // replies, for the same reason.
            GatewayEvent::Limited { kind, count, why } => {
                let m = FromGuard::Limited {
                    id,
                    kind,
                    count,
                    why,
                };
                if kind.explains_failure() {
                    out.reply(&m)
                } else {
                    out.event(&m)
                }
            }
        });
        let cfg = GatewayConfig {
            channel,
            policy,
            vouched: vouched.into_iter().collect::<HashSet<_>>(),
            timeout: Duration::from_millis(timeout_ms),
            max_connections: max_connections.min(4096),
            secrets,
            limits: self.limits,
            peers: Some(self.peers.clone()),
        };
        let gw = Gateway::open(cfg, events, self.clock.clone())
            .await
            .map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))?;
        let port = gw.port();
        self.gateways.insert(id, gw);
        Ok(port)
    }

    /// The deadline passed: every FFmpeg of the node dies, every upstream connection closes.
    fn fence(&mut self) {
        let deadline = self.clock.deadline_ns();
        self.fenced_for = Some(deadline);
        let late_ms = monotonic_ns().saturating_sub(deadline) / 1_000_000;
        let mut killed = 0u32;
        for (pid, (start, channel)) in &self.ffmpegs {
            if procs::kill_group_verified(*pid, *start) {
                killed += 1;
                warn!(pid, %channel, "fence: killed ffmpeg");
            }
        }
        // The second line: an FFmpeg spawned just before the node froze, not announced yet.
        if let Some(node) = self.node_pid {
            for (pid, start) in procs::ffmpeg_children_of(node, &self.hls_root) {
                if !self.ffmpegs.contains_key(&pid) && procs::kill_group_verified(pid, start) {
                    killed += 1;
                    warn!(pid, "fence: killed an ffmpeg the node had not announced");
                }
            }
        }
        self.clock.fence();
        if killed > 0 || !self.gateways.is_empty() {
            error!(
                killed,
                late_ms,
                gateways = self.gateways.len(),
                "fence: no lease renewal for 2/3 of the lease TTL; ffmpegs killed, upstream connections closed"
            );
        } else {
            info!(
                late_ms,
                "fence: no lease renewal for 2/3 of the lease TTL (nothing running)"
            );
        }
        self.out.reply(&FromGuard::Fenced { killed, late_ms });
    }

    /// EOF: the node is gone. Nothing it started may outlive it.
    fn node_gone(&mut self) {
        let mut killed = 0;
        for (pid, (start, _)) in &self.ffmpegs {
            if procs::kill_group_verified(*pid, *start) {
                killed += 1;
            }
        }
        if killed > 0 {
            warn!(killed, "the node is gone: killed its ffmpegs");
        }
        self.gateways.clear();
    }
}

#[cfg(test)]
mod tests;
