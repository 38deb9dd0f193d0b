//! The guard process as the node runs it: started from the node's own binary with a cleared
//! environment, given the whole picture first (init, the deadline, every FFmpeg alive), read
//! until it ends, and replaced after a backoff when it dies ([`GuardTask::run`]).

use super::client::{lock, Guard, Link};
use super::proto::{decode, encode, Frame, FromGuard, LineSplitter, ToGuard, MAX_LINE};
use std::collections::VecDeque;
use std::os::unix::process::CommandExt as _;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

/// How long a guard may take to start, and to answer a gateway request.
pub(super) const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines queued for a guard that does not read: beyond, it is killed and restarted.
const QUEUE: usize = 4096;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Environment the guard keeps from the node (the node's may hold secrets).
const KEEP_ENV: [&str; 2] = ["RUST_LOG", "NO_COLOR"];

/// One guard process as the node runs it.
pub(super) struct Running {
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

/// Supervises the guard process: see [`GuardTask::run`].
pub struct GuardTask {
    pub(super) guard: Arc<Guard>,
    pub(super) running: Running,
}

/// Starts the guard: this binary (`/proc/self/exe`: the one this node runs, even if a newer one
/// replaced it on disk) with the guard argument, piped, with only [`KEEP_ENV`] of the node's
/// environment.
fn spawn_guard() -> Result<(Child, ChildStdin, ChildStdout), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
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
    match (child.stdin.take(), child.stdout.take()) {
        (Some(stdin), Some(stdout)) => Ok((child, stdin, stdout)),
        _ => Err("the guard process has no pipes".into()),
    }
}

/// Writes queued lines to the guard; ends when the link is dropped and the queue drained (the
/// guard then reads EOF).
fn pipe_writer(mut stdin: ChildStdin, mut rx: mpsc::Receiver<String>, pid: u32) -> JoinHandle<()> {
    tokio::spawn(
        async move {
            while let Some(line) = rx.recv().await {
                if let Err(e) = stdin.write_all(line.as_bytes()).await {
                    debug!(error = %e, "writing to the guard failed");
                    return;
                }
            }
        }
        .instrument(tracing::debug_span!("guard_pipe", pid)),
    )
}

impl Guard {
    /// Starts a guard process, gives it the whole picture, and waits for it to be ready.
    pub(super) async fn launch(&self) -> Result<Running, String> {
        let (child, stdin, stdout) = spawn_guard()?;
        let pid = child.id().unwrap_or(0);
        let (tx, rx) = mpsc::channel::<String>(QUEUE);
        let writer = pipe_writer(stdin, rx, pid);
        self.link(tx, pid);
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

    /// Makes `tx` the current guard's pipe, with the whole picture queued first.
    fn link(&self, tx: mpsc::Sender<String>, pid: u32) {
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

    /// The guard is gone: nothing more is queued for it, nobody waits on it.
    fn unlink(&self) {
        lock(&self.shared).link = None;
        lock(&self.pending).clear();
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
