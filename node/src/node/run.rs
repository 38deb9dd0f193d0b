//! One FFmpeg run: recorded in Redis, then watched until it exits, stalls or a message ends it;
//! every new playlist FFmpeg writes is published on the way.

use super::supervise::Plan;
use super::*;
use crate::ffmpeg;
use crate::watcher::Progress;
use farm_proto::records::StreamField;
use farm_proto::StreamState;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn, Instrument};

/// What one run is started with.
pub(super) struct Run<'a> {
    /// The source, with its credentials (logged and recorded redacted).
    pub url: &'a str,
    /// The first media sequence number FFmpeg writes.
    pub start_number: u64,
    pub restarts: u64,
    pub last_error: &'a str,
}

/// A spawned FFmpeg and the tail of its stderr.
struct Running {
    child: Child,
    pid: u32,
    /// Ends at EOF, when FFmpeg exits.
    reader: Option<JoinHandle<()>>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// One FFmpeg run: record it, then wait for its exit, a stall, or a message.
pub(super) async fn run_once(
    plan: &Plan<'_>,
    run: &Run<'_>,
    child: Child,
    progress: &mut watch::Receiver<Progress>,
    inbox: &mut mpsc::Receiver<Ctl>,
) -> RunEnd {
    match begin(plan, run, child).await {
        Ok(running) => watch_run(plan, run, running, progress, inbox).await,
        Err(end) => end,
    }
}

/// Makes the run known: its pid to the entry, its record file, its stream hash (a lease found
/// lost ends the run at once).
async fn begin(plan: &Plan<'_>, run: &Run<'_>, mut child: Child) -> Result<Running, RunEnd> {
    let (node, entry) = (plan.node, plan.entry);
    let pid = child.id().unwrap_or(0);
    let pid_start = ffmpeg::start_time(pid).unwrap_or(0);
    if entry.update(|s| {
        s.pid = pid;
        s.fenced
    }) {
        // Fenced between the spawn and now: fence() saw no pid to kill.
        terminate(&mut child, pid, Duration::ZERO).await;
        return Err(RunEnd::Fenced);
    }
    if let Err(e) = ffmpeg::write_owner_file(&entry.dir, pid, pid_start) {
        warn!(error = %e, "could not write the ffmpeg record file");
    }
    let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let reader = read_stderr(node, &mut child, pid, &tail);
    let state = if run.restarts == 0 {
        StreamState::Starting
    } else {
        StreamState::Restarting
    };
    let fields = [
        StreamField::State(state),
        StreamField::Process(Some((pid, pid_start))),
        StreamField::Source(farm_proto::redact::url(run.url)),
        StreamField::Restarts(run.restarts),
        StreamField::LastError(run.last_error.to_string()),
    ];
    record(plan, &mut child, pid, &fields, "ffmpeg pid").await?;
    debug!(pid, url = %farm_proto::redact::Redacted(run.url), "ffmpeg started");
    Ok(Running {
        child,
        pid,
        reader,
        tail,
    })
}

/// Records the run in the stream hash. A lease found lost stops FFmpeg and ends the run; a Redis
/// error is counted and logged (the keepalive decides about fencing; a lost write here is repaired
/// by the next one).
async fn record(
    plan: &Plan<'_>,
    child: &mut Child,
    pid: u32,
    fields: &[StreamField],
    what: &str,
) -> Result<(), RunEnd> {
    let node = plan.node;
    match plan.record(fields).await {
        Ok(true) => {}
        Ok(false) => {
            terminate(child, pid, node.cfg.stop_grace).await;
            return Err(RunEnd::Fenced);
        }
        Err(e) => {
            node.metrics.redis_errors.inc();
            warn!(error = %e, "could not record {what}");
        }
    }
    Ok(())
}

/// Keeps the last lines of FFmpeg's stderr (redacted) and logs them at debug.
fn read_stderr(
    node: &Node,
    child: &mut Child,
    pid: u32,
    tail: &Arc<Mutex<VecDeque<String>>>,
) -> Option<JoinHandle<()>> {
    child.stderr.take().map(|stderr| {
        let tail = tail.clone();
        let span = tracing::debug_span!("ffmpeg_stderr", pid);
        // Ends at EOF, when FFmpeg exits; the actor always reaps the child itself.
        node.tracker.spawn(
            async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    // FFmpeg quotes URLs in its errors: redacted before it is logged or kept.
                    let line = farm_proto::redact::text(&line);
                    debug!(target: "ffmpeg", "{line}");
                    let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                    if t.len() == STDERR_LINES {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            }
            .instrument(span),
        )
    })
}

/// Waits for the run's end: FFmpeg exits, stalls (no new segment for three segment durations, or
/// no first one within its allowance), the node shuts down, or a message arrives. Each new
/// playlist FFmpeg writes is published meanwhile.
async fn watch_run(
    plan: &Plan<'_>,
    run: &Run<'_>,
    mut r: Running,
    progress: &mut watch::Receiver<Progress>,
    inbox: &mut mpsc::Receiver<Ctl>,
) -> RunEnd {
    let (node, entry, cfg) = (plan.node, plan.entry, &plan.node.cfg);
    let pid = r.pid;
    let spawned = Instant::now();
    let first_allowance = cfg.stall_after() + cfg.read_timeout;
    let mut running_written = false;
    // FFmpeg's playlist as of the previous run: only a new rename publishes.
    let mut seen_playlist = progress.borrow().ffmpeg_playlist;
    loop {
        let (deadline, waiting_for) = {
            let p = progress.borrow();
            match p.last_segment {
                Some(t) => (t + cfg.stall_after(), "a new segment"),
                None => (spawned + first_allowance, "the first segment"),
            }
        };
        tokio::select! {
            status = r.child.wait() => return exited(status, &mut r).await,
            _ = tokio::time::sleep_until(deadline.into()) => {
                terminate(&mut r.child, pid, cfg.stop_grace).await;
                let secs = (Instant::now() - progress.borrow().last_segment.unwrap_or(spawned)).as_secs_f32();
                return RunEnd::Crash(format!("stalled: no new segment for {secs:.1}s (waiting for {waiting_for})"));
            }
            changed = progress.changed() => {
                if changed.is_err() { continue; }
                let version = progress.borrow().ffmpeg_playlist;
                // A channel being handed over publishes nothing more: the new owner continues
                // after what it recorded.
                if version == seen_playlist || entry.handing_over() {
                    continue;
                }
                seen_playlist = version;
                if let Some(end) = published(plan, run, &mut r, &mut running_written).await {
                    return end;
                }
            }
            _ = node.cancel.cancelled() => {
                terminate(&mut r.child, pid, cfg.stop_grace).await;
                return RunEnd::Stop("shutdown".into(), None);
            }
            msg = inbox.recv() => return on_message(plan, &mut r, msg).await,
        }
    }
}

/// FFmpeg exited by itself: a crash, with the last lines it wrote.
async fn exited(status: std::io::Result<std::process::ExitStatus>, r: &mut Running) -> RunEnd {
    let status = match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("wait failed: {e}"),
    };
    // Let the reader drain what FFmpeg wrote before it exited (bounded).
    if let Some(reader) = r.reader.as_mut() {
        let _ = tokio::time::timeout(Duration::from_secs(1), reader).await;
    }
    let tail = tail_text(&r.tail);
    RunEnd::Crash(format!(
        "ffmpeg {status}{}",
        if tail.is_empty() {
            String::new()
        } else {
            format!(": {tail}")
        }
    ))
}

/// FFmpeg wrote a new playlist: publish it; the first publication of a run makes the channel
/// ready and records it `running`. `Some` when the lease turned out lost.
async fn published(
    plan: &Plan<'_>,
    run: &Run<'_>,
    r: &mut Running,
    running_written: &mut bool,
) -> Option<RunEnd> {
    let (node, entry) = (plan.node, plan.entry);
    match publish(node, entry, plan.owner).await {
        Publish::Nothing => return None,
        Publish::Done => {}
        Publish::Fenced => {
            terminate(&mut r.child, r.pid, Duration::ZERO).await;
            return Some(RunEnd::Fenced);
        }
    }
    entry.enter(Phase::Ready);
    if *running_written {
        return None;
    }
    *running_written = true;
    let fields = [
        StreamField::State(StreamState::Running),
        StreamField::LastSegmentAt(None),
    ];
    if let Err(end) = record(plan, &mut r.child, r.pid, &fields, "running state").await {
        return Some(end);
    }
    if run.restarts > 0 {
        // Files an earlier run wrote but never got published.
        remove_unlisted_below(entry, run.start_number);
    }
    None
}

/// A message to the actor ends the run: FFmpeg is stopped the way the message asks.
async fn on_message(plan: &Plan<'_>, r: &mut Running, msg: Option<Ctl>) -> RunEnd {
    let grace = plan.node.cfg.stop_grace;
    let (grace, end) = match msg {
        Some(Ctl::Stop { reason, done }) => {
            plan.entry.phase.send_replace(Phase::Gone);
            let _ = plan
                .record(&[StreamField::State(StreamState::Stopping)])
                .await;
            (grace, RunEnd::Stop(reason, done))
        }
        Some(Ctl::Restart) => (grace, RunEnd::Restart),
        Some(Ctl::Pause { done }) => (grace, RunEnd::Paused(done)),
        // The lease is gone: no grace for an FFmpeg that must not write another segment.
        Some(Ctl::Fenced) => (Duration::ZERO, RunEnd::Fenced),
        None => (grace, RunEnd::Stop("shutdown".into(), None)),
    };
    terminate(&mut r.child, r.pid, grace).await;
    end
}

fn tail_text(tail: &Mutex<VecDeque<String>>) -> String {
    let t = tail.lock().unwrap_or_else(|p| p.into_inner());
    t.iter()
        .rev()
        .take(3)
        .rev()
        .cloned()
        .collect::<Vec<_>>()
        .join(" | ")
}
