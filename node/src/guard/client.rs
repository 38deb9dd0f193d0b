//! The node's side of its guard: what the rest of the node tells it (renewals, FFmpeg spawns and
//! reaps) or asks of it (gateways), and what it hears back.
//!
//! Everything the guard must know is kept here too (the deadline, the FFmpegs alive), so a new
//! guard gets the whole picture before anything else (see `process`, which starts and supervises
//! the guard process). A guard that stops reading its pipe (the queue fills) is killed, and
//! restarted like one that died.

use super::fence::instant_ns;
use super::process::{GuardTask, ANSWER_TIMEOUT};
use super::proto::{encode, FromGuard, ToGuard};
use crate::egress::PolicySpec;
use crate::metrics::Metrics;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

#[derive(Default)]
pub(super) struct Shared {
    pub link: Option<Link>,
    /// The fence time sent last, CLOCK_MONOTONIC ns (0: none yet).
    pub deadline_ns: u64,
    /// pid → (start time, channel) of every FFmpeg alive.
    pub ffmpegs: HashMap<u32, (u64, String)>,
}

/// The current guard's pipe.
pub(super) struct Link {
    pub tx: mpsc::Sender<String>,
    pub pid: u32,
    pub killed: bool,
}

#[derive(Default)]
struct GatewayShared {
    last_refusal: Mutex<Option<String>>,
}

/// The node's handle on its guard.
pub struct Guard {
    /// The first line every new guard gets.
    pub(super) init: ToGuard,
    /// Set on every FFmpeg at its spawn.
    ffmpeg_limits: super::limits::FfmpegLimits,
    cgroups: Option<super::limits::Cgroups>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) shared: Mutex<Shared>,
    /// Bumped each time a new guard is connected.
    pub(super) incarnation: watch::Sender<u64>,
    /// Gateway requests waiting for their answer, by id.
    pub(super) pending: Mutex<HashMap<u64, oneshot::Sender<Result<u16, String>>>>,
    gateways: Mutex<HashMap<u64, Weak<GatewayShared>>>,
    next_id: AtomicU64,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A channel's gateway in the guard. Dropping it closes the gateway.
pub struct GatewayHandle {
    id: u64,
    port: u16,
    shared: Arc<GatewayShared>,
    guard: Arc<Guard>,
}

impl GatewayHandle {
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
        lock(&self.shared.last_refusal).take()
    }
}

impl Drop for GatewayHandle {
    fn drop(&mut self) {
        lock(&self.guard.gateways).remove(&self.id);
        let _ = self.guard.send(&ToGuard::Close { id: self.id });
    }
}

/// An FFmpeg the guard knows of; dropping it (after the reap) tells the guard it is gone.
pub struct Tracked {
    pid: u32,
    guard: Arc<Guard>,
    /// Its cgroup leaf, removed with it.
    cgroup: Option<std::path::PathBuf>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(leaf) = self.cgroup.take() {
            super::limits::Cgroups::release(&leaf);
        }
        if self.pid == 0 {
            return;
        }
        let mut sh = lock(&self.guard.shared);
        sh.ffmpegs.remove(&self.pid);
        self.guard
            .send_locked(&mut sh, &ToGuard::Reaped { pid: self.pid });
    }
}

impl Guard {
    /// Starts the node's guard and waits until it is ready. Where the node may manage its own
    /// cgroup, it moves into a leaf first (the guard starts there too) and FFmpegs get theirs.
    pub async fn start(
        node_pid: u32,
        hls_root: std::path::PathBuf,
        policy: PolicySpec,
        limits: super::Limits,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Guard>, GuardTask), String> {
        let cgroups = match super::limits::Cgroups::detect(&limits.ffmpeg) {
            Ok(c) => {
                info!(
                    cpu = limits.ffmpeg.cpu,
                    memory = limits.ffmpeg.memory,
                    "each ffmpeg runs in a cgroup of its own (cpu.max, memory.max)"
                );
                Some(c)
            }
            Err(why) => {
                info!(
                    %why,
                    memory = limits.ffmpeg.memory,
                    "no cgroup for ffmpegs: their memory is bounded by RLIMIT_DATA, their CPU \
                     only by nice and the egress gateways' caps"
                );
                None
            }
        };
        metrics.ffmpeg_cgroups.set(i64::from(cgroups.is_some()));
        let guard = Arc::new(Guard {
            init: ToGuard::Init {
                node_pid,
                hls_root,
                policy,
                limits: limits.gateway,
            },
            ffmpeg_limits: limits.ffmpeg,
            cgroups,
            metrics,
            shared: Mutex::default(),
            incarnation: watch::channel(0).0,
            pending: Mutex::default(),
            gateways: Mutex::default(),
            next_id: AtomicU64::new(1),
        });
        let running = guard.launch().await?;
        Ok((guard.clone(), GuardTask { guard, running }))
    }

    /// The pid of the current guard process, if one runs.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.shared).link.as_ref().map(|l| l.pid)
    }

    /// A lease renewal sent at `sent_at` succeeded: the fence moves to `sent_at + fence_after`.
    pub fn renewed(&self, sent_at: Instant, fence_after: Duration) {
        let ns = instant_ns(sent_at)
            .saturating_add(u64::try_from(fence_after.as_nanos()).unwrap_or(u64::MAX));
        let mut sh = lock(&self.shared);
        if ns > sh.deadline_ns {
            sh.deadline_ns = ns;
            self.send_locked(&mut sh, &ToGuard::Deadline { mono_ns: ns });
        }
    }

    /// Tells the guard of a spawned FFmpeg (a process-group leader) and sets its memory and CPU
    /// limits; keep the token until it is reaped.
    pub fn track(self: &Arc<Self>, child: &Child, channel: &str) -> Tracked {
        let Some(pid) = child.id() else {
            return Tracked {
                pid: 0,
                guard: self.clone(),
                cgroup: None,
            };
        };
        // At once: FFmpeg has only started to link itself.
        if let Err(e) = super::limits::set_rlimits(pid, &self.ffmpeg_limits) {
            self.metrics.ffmpeg_limit_errors.inc();
            warn!(pid, %channel, error = %e, "cannot set ffmpeg's rlimits");
        }
        let cgroup = self.cgroups.as_ref().and_then(|cg| {
            cg.place(pid, channel, &self.ffmpeg_limits)
                .inspect_err(|e| {
                    self.metrics.ffmpeg_limit_errors.inc();
                    warn!(pid, %channel, error = %e, "cannot put ffmpeg in its cgroup");
                })
                .ok()
        });
        let start = crate::procs::start_time(pid).unwrap_or(0);
        let mut sh = lock(&self.shared);
        sh.ffmpegs.insert(pid, (start, channel.to_string()));
        self.send_locked(
            &mut sh,
            &ToGuard::Spawned {
                pid,
                start,
                channel: channel.to_string(),
            },
        );
        Tracked {
            pid,
            guard: self.clone(),
            cgroup,
        }
    }

    /// Opens the channel's egress gateway in the guard. Waits for a guard being restarted, up to
    /// [`ANSWER_TIMEOUT`] in all.
    pub async fn open_gateway(
        self: &Arc<Self>,
        channel: &str,
        sources: &[String],
        timeout: Duration,
        secrets: &[farm_proto::redact::OriginSecrets],
    ) -> Result<GatewayHandle, String> {
        let vouched: Vec<(String, u16)> = crate::egress::vouched(sources).into_iter().collect();
        let until = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        let mut incarnation = self.incarnation.subscribe();
        loop {
            let before = *incarnation.borrow_and_update();
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            let shared = Arc::new(GatewayShared::default());
            lock(&self.pending).insert(id, tx);
            // Before the request: a refusal may come right after the answer.
            lock(&self.gateways).insert(id, Arc::downgrade(&shared));
            let forget = || {
                lock(&self.pending).remove(&id);
                lock(&self.gateways).remove(&id);
            };
            let sent = self.send(&ToGuard::Open {
                id,
                channel: channel.to_string(),
                vouched: vouched.clone(),
                timeout_ms: u64::try_from(timeout.as_millis())
                    .unwrap_or(u64::MAX)
                    .clamp(1, 600_000),
                max_connections: crate::egress::MAX_CONNECTIONS,
                secrets: secrets.to_vec(),
            });
            if !sent {
                forget();
                // A guard connected since `before` is asked at once.
                match tokio::time::timeout_at(until, incarnation.wait_for(|n| *n != before)).await {
                    Ok(Ok(_)) => continue,
                    _ => return Err("no guard process to open it (being restarted)".into()),
                }
            }
            match tokio::time::timeout_at(until, rx).await {
                Ok(Ok(Ok(port))) => {
                    return Ok(GatewayHandle {
                        id,
                        port,
                        shared,
                        guard: self.clone(),
                    })
                }
                Ok(Ok(Err(e))) => {
                    forget();
                    return Err(e);
                }
                // The guard died before it answered: ask the next one.
                Ok(Err(_)) => forget(),
                Err(_) => {
                    forget();
                    return Err(format!(
                        "the guard did not answer within {ANSWER_TIMEOUT:?}"
                    ));
                }
            }
        }
    }

    fn send(&self, msg: &ToGuard) -> bool {
        let mut sh = lock(&self.shared);
        self.send_locked(&mut sh, msg)
    }

    /// Queues a line for the current guard; whether it was queued. A guard whose queue is full
    /// does not read its pipe: it is killed (and restarted by its supervisor).
    fn send_locked(&self, sh: &mut Shared, msg: &ToGuard) -> bool {
        let Some(link) = sh.link.as_mut() else {
            return false;
        };
        match link.tx.try_send(encode(msg)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !link.killed {
                    link.killed = true;
                    error!(
                        pid = link.pid,
                        "the guard does not read its control pipe; killing it"
                    );
                    if let Ok(pid) = i32::try_from(link.pid) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// What the guard said: answers to gateway requests, refusals and limits (kept for the
    /// channel's `last_error`), fences and kills (counted and logged).
    pub(super) fn on_event(&self, ev: FromGuard) {
        match ev {
            FromGuard::Ready { pid } => debug!(pid, "guard ready (again)"),
            FromGuard::Opened { id, port } => {
                if let Some(tx) = lock(&self.pending).remove(&id) {
                    let _ = tx.send(Ok(port));
                }
            }
            FromGuard::OpenFailed { id, error } => {
                if let Some(tx) = lock(&self.pending).remove(&id) {
                    let _ = tx.send(Err(error));
                }
            }
            FromGuard::Refused { id, why } => {
                self.metrics.egress_refused.inc();
                let gw = lock(&self.gateways).get(&id).and_then(Weak::upgrade);
                if let Some(gw) = gw {
                    *lock(&gw.last_refusal) = Some(why);
                }
            }
            FromGuard::Connected { .. } => {
                self.metrics.egress_connections.inc();
            }
            FromGuard::Limited {
                id,
                kind,
                count,
                why,
            } => {
                self.metrics
                    .egress_limited
                    .get_or_create(&crate::metrics::KindLabel {
                        kind: kind.as_str().into(),
                    })
                    .inc_by(count);
                if kind.explains_failure() {
                    let gw = lock(&self.gateways).get(&id).and_then(Weak::upgrade);
                    if let Some(gw) = gw {
                        *lock(&gw.last_refusal) = Some(why);
                    }
                }
            }
            FromGuard::Fenced { killed, late_ms } => {
                self.metrics.guard_fences.inc();
                self.metrics.guard_kills.inc_by(u64::from(killed));
                warn!(
                    killed,
                    late_ms,
                    "the guard fenced this node: no lease renewal for 2/3 of the lease TTL"
                );
            }
            FromGuard::Killed { pid, channel, why } => {
                self.metrics.guard_kills.inc();
                error!(pid, %channel, %why, "the guard killed an ffmpeg");
            }
        }
    }
}
