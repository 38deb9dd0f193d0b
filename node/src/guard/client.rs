//! The node's side of its guard: starting and supervising the guard process, and what the rest of
//! the node tells it (renewals, FFmpeg spawns and reaps) or asks of it (gateways).
//!
//! Everything the guard must know is kept here too (the deadline, the FFmpegs alive), so a new
//! guard gets the whole picture before anything else. A guard that dies is restarted (with a
//! backoff) after the node was told to stop every channel: their gateways died with it. A guard
//! that stops reading its pipe (the queue fills) is killed and restarted the same way.

use super::fence::instant_ns;
use super::proto::{decode, encode, Frame, FromGuard, LineSplitter, ToGuard, MAX_LINE};
use crate::egress::PolicySpec;
use crate::metrics::Metrics;
use std::collections::{HashMap, VecDeque};
use std::os::unix::process::CommandExt as _;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdout};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

/// How long a guard may take to start, and to answer a gateway request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines queued for a guard that does not read: beyond, it is killed and restarted.
const QUEUE: usize = 4096;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Environment the guard keeps from the node (the node's may hold secrets).
const KEEP_ENV: [&str; 2] = ["RUST_LOG", "NO_COLOR"];

#[derive(Default)]
struct Shared {
    link: Option<Link>,
    /// The fence time sent last, CLOCK_MONOTONIC ns (0: none yet).
    deadline_ns: u64,
    /// pid → (start time, channel) of every FFmpeg alive.
    ffmpegs: HashMap<u32, (u64, String)>,
}

/// The current guard's pipe.
struct Link {
    tx: mpsc::Sender<String>,
    pid: u32,
    killed: bool,
}

#[derive(Default)]
struct GatewayShared {
    last_refusal: Mutex<Option<String>>,
}

/// The node's handle on its guard.
pub struct Guard {
    init: ToGuard,
    /// Set on every FFmpeg at its spawn.
    ffmpeg_limits: super::limits::FfmpegLimits,
    cgroups: Option<super::limits::Cgroups>,
    metrics: Arc<Metrics>,
    shared: Mutex<Shared>,
    /// Bumped each time a new guard is connected.
    incarnation: watch::Sender<u64>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<u16, String>>>>,
    gateways: Mutex<HashMap<u64, Weak<GatewayShared>>>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One guard process as the node runs it.
struct Running {
    child: Child,
    stdout: ChildStdout,
    split: LineSplitter,
    frames: VecDeque<Frame>,
    writer: JoinHandle<()>,
}

impl Running {
    /// The next message from the guard; skips (and reports) bad lines. Cancel-safe.
    async fn next(&mut self) -> Result<FromGuard, String> {
        loop {
            match self.frames.pop_front() {
                Some(Frame::Line(l)) => match decode::<FromGuard>(&l) {
                    Ok(m) => return Ok(m),
                    Err(e) => warn!("from the guard: {e}"),
                },
                Some(Frame::TooLong) => {
                    warn!("a line over {MAX_LINE} bytes from the guard was skipped")
                }
                None => {
                    let mut buf = [0u8; 8192];
                    let n = self
                        .stdout
                        .read(&mut buf)
                        .await
                        .map_err(|e| format!("reading its pipe failed: {e}"))?;
                    if n == 0 {
                        return Err("its pipe closed".into());
                    }
                    let mut out = Vec::new();
                    self.split.push(&buf[..n], &mut out);
                    self.frames.extend(out);
                }
            }
        }
    }

    /// Reaps the process (killing it when it does not end by itself within `grace`).
    async fn end(mut self, grace: Duration) -> String {
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(s) => s,
            Err(_) => {
                let _ = self.child.start_kill();
                self.child.wait().await
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.writer).await;
        self.writer.abort();
        match status {
            Ok(s) => s.to_string(),
            Err(e) => format!("cannot be waited for: {e}"),
        }
    }
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

/// Supervises the guard process: see [`GuardTask::run`].
pub struct GuardTask {
    guard: Arc<Guard>,
    running: Running,
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
        let start = crate::ffmpeg::start_time(pid).unwrap_or(0);
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

    /// Starts a guard process, gives it the whole picture, and waits for it to be ready.
    async fn launch(&self) -> Result<Running, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
        // /proc/self/exe: the binary this node runs, even if a newer one replaced it on disk.
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg0(&exe)
            .arg(super::ARG)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for k in KEEP_ENV {
            if let Some(v) = std::env::var_os(k) {
                cmd.env(k, v);
            }
        }
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start the guard process: {e}"))?;
        let pid = child.id().unwrap_or(0);
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("the guard process has no pipes".into());
        };
        let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
        // Ends when the link is dropped and the queue drained: the guard then reads EOF.
        let writer = tokio::spawn(
            async move {
                while let Some(line) = rx.recv().await {
                    if let Err(e) = stdin.write_all(line.as_bytes()).await {
                        debug!(error = %e, "writing to the guard failed");
                        return;
                    }
                }
            }
            .instrument(tracing::debug_span!("guard_pipe", pid)),
        );
        {
            let mut sh = lock(&self.shared);
            let mut first = vec![encode(&self.init)];
            if sh.deadline_ns > 0 {
                first.push(encode(&ToGuard::Deadline {
                    mono_ns: sh.deadline_ns,
                }));
            }
            for (pid, (start, channel)) in &sh.ffmpegs {
                first.push(encode(&ToGuard::Spawned {
                    pid: *pid,
                    start: *start,
                    channel: channel.clone(),
                }));
            }
            for line in first {
                // A fresh queue of QUEUE lines; more FFmpegs than that are left to its /proc scan.
                let _ = tx.try_send(line);
            }
            sh.link = Some(Link {
                tx,
                pid,
                killed: false,
            });
        }
        let mut running = Running {
            child,
            stdout,
            split: LineSplitter::new(MAX_LINE),
            frames: VecDeque::new(),
            writer,
        };
        let ready = tokio::time::timeout(ANSWER_TIMEOUT, async {
            loop {
                match running.next().await? {
                    FromGuard::Ready { .. } => return Ok(()),
                    other => self.on_event(other),
                }
            }
        })
        .await;
        let err = match ready {
            Ok(Ok(())) => {
                info!(pid, "guard process ready");
                self.incarnation.send_modify(|n| *n += 1);
                return Ok(running);
            }
            Ok(Err(e)) => e,
            Err(_) => format!("not ready within {ANSWER_TIMEOUT:?}"),
        };
        self.unlink();
        let status = running.end(Duration::from_millis(500)).await;
        Err(format!(
            "the guard process failed to start: {err} ({status})"
        ))
    }

    /// The guard is gone: nothing more is queued for it, nobody waits on it.
    fn unlink(&self) {
        lock(&self.shared).link = None;
        lock(&self.pending).clear();
    }

    fn on_event(&self, ev: FromGuard) {
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

impl GuardTask {
    /// Serves the guard's events until `cancel`; then closes its pipe (the guard exits on EOF) and
    /// reaps it. A guard that dies is replaced: `on_lost` is called first (the node stops every
    /// channel: their gateways are gone), then a new guard starts after a backoff.
    pub async fn run(self, cancel: CancellationToken, on_lost: impl Fn()) {
        let guard = self.guard;
        let mut running = self.running;
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = Instant::now();
            let why = tokio::select! {
                why = async {
                    loop {
                        match running.next().await {
                            Ok(ev) => guard.on_event(ev),
                            Err(why) => return why,
                        }
                    }
                } => why,
                _ = cancel.cancelled() => {
                    guard.unlink();
                    let status = running.end(Duration::from_secs(5)).await;
                    info!(%status, "guard process stopped");
                    return;
                }
            };
            guard.unlink();
            let status = running.end(Duration::from_millis(500)).await;
            guard.metrics.guard_restarts.inc();
            error!(%why, %status, "the guard process is gone: stopping every channel, starting a new guard");
            on_lost();
            if started.elapsed() > Duration::from_secs(30) {
                backoff = BACKOFF_MIN;
            }
            running = loop {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cancel.cancelled() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                match guard.launch().await {
                    Ok(r) => break r,
                    Err(e) => error!(error = %e, retry_in = ?backoff, "cannot start a new guard"),
                }
            };
        }
    }
}
