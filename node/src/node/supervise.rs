//! FFmpeg supervision: one run at a time, restarts with backoff, stalls, crash loops, and stopping
//! a child's process group.

use super::*;
use crate::ffmpeg;
use crate::watcher::Progress;
use farm_proto::records::StreamField;
use farm_proto::types::event;
use farm_proto::{ChannelSpec, StreamState};
use nix::sys::signal::Signal;
use rand::Rng;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn, Instrument};

/// Runs FFmpeg until a stop, a fence or the end of a crash loop.
pub(super) async fn supervise(
    node: &Arc<Node>,
    entry: &Arc<ChannelEntry>,
    spec: &ChannelSpec,
    owner: &str,
    mut progress: watch::Receiver<Progress>,
    recorded: &crate::playlist::Recorded,
    inbox: &mut mpsc::Receiver<Ctl>,
) -> Outcome {
    let cfg = node.cfg.clone();
    // Continue what an earlier owner recorded (or start a new timeline).
    *entry.timeline.lock().unwrap_or_else(|p| p.into_inner()) = Some(
        crate::playlist::Timeline::new(cfg.hls_time, cfg.hls_list_size as usize, recorded)
            .with_fresh_base(crate::playlist::fresh_base(now_ms(), cfg.hls_time)),
    );
    let sources = spec.sources();
    // FFmpeg's argv gets http URLs without their credentials; the gateway puts them back.
    let nonce = format!("{:016x}", rand::random::<u64>());
    let (masked, secrets): (Vec<String>, Vec<farm_proto::redact::OriginSecrets>) = {
        let mut secrets = Vec::new();
        let masked = sources
            .iter()
            .enumerate()
            .map(|(i, u)| {
                if crate::egress::scheme(u) != "http" {
                    return u.clone();
                }
                let m = farm_proto::redact::mask(u, &format!("{nonce}{i}"), 80);
                secrets.extend(m.secrets);
                m.url
            })
            .collect();
        (masked, secrets)
    };
    let profile = &cfg.profiles[&spec.profile];
    let mut crashes: VecDeque<Instant> = VecDeque::new();
    // Runs in a row that ended without a segment, whatever they lasted (a stalled run can outlast
    // the crash window).
    let mut empty_runs = 0u32;
    let mut source_idx = 0usize;
    let mut restarts = 0u64;
    let mut last_error = String::new();
    // One egress gateway for the channel's life: every http/https request FFmpeg makes goes
    // through it, and is refused where the policy says so.
    let gateway = if sources
        .iter()
        .any(|u| crate::egress::proxied(&crate::egress::scheme(u)))
    {
        match node
            .guard
            .open_gateway(&entry.id, &sources, cfg.read_timeout, &secrets)
            .await
        {
            Ok(g) => Some(g),
            Err(e) => return Outcome::Failed(format!("cannot open the egress gateway: {e}"), None),
        }
    } else {
        None
    };
    let proxy = gateway.as_ref().map(|g| g.proxy_url());
    loop {
        if entry.fenced.load(Ordering::Acquire) {
            return Outcome::Fenced;
        }
        let url = &sources[source_idx % sources.len()];
        let argv_url = &masked[source_idx % masked.len()];
        let start_number = {
            let mut tl = entry.timeline.lock().unwrap_or_else(|p| p.into_inner());
            let tl = tl.get_or_insert_with(|| {
                crate::playlist::Timeline::new(cfg.hls_time, cfg.hls_list_size as usize, recorded)
                    .with_fresh_base(crate::playlist::fresh_base(now_ms(), cfg.hls_time))
            });
            tl.begin_run();
            tl.next_start(progress.borrow().last_seq)
        };
        node.watcher.reset(&entry.dir);
        let argv = ffmpeg::args(
            &cfg,
            &ffmpeg::RunSpec {
                url: argv_url,
                dir: &entry.dir,
                profile,
                start_number,
                gen: entry.gen(),
                http_proxy: proxy.as_deref(),
            },
        );
        let ports = ffmpeg::tcp_ports(url, gateway.as_ref().map(|g| g.port()));
        let end = match ffmpeg::spawn(
            &cfg.ffmpeg,
            &argv,
            &entry.dir,
            node.pdeathsig.as_deref(),
            &node.sandbox,
            &ports,
        ) {
            Err(e) => RunEnd::Crash(format!("cannot run {}: {e}", cfg.ffmpeg.display())),
            Ok((child, _keeper)) => {
                // The guard kills it at the fence, also while this process cannot run.
                let _tracked = node.guard.track(&child, &entry.id);
                node.metrics.ffmpeg_spawns.inc();
                run_once(
                    node,
                    entry,
                    owner,
                    url,
                    child,
                    restarts,
                    start_number,
                    &last_error,
                    &mut progress,
                    inbox,
                )
                .await
            }
        };
        entry.pid.store(0, Ordering::Release);
        if entry.fenced.load(Ordering::Acquire) {
            return Outcome::Fenced;
        }
        match end {
            RunEnd::Stop(reason, done) => return Outcome::Stopped(reason, done),
            RunEnd::Fenced => return Outcome::Fenced,
            RunEnd::Restart => {
                restarts += 1;
                entry.restarts.store(restarts, Ordering::Release);
                continue;
            }
            RunEnd::Paused(done) => {
                let _ = done.send(());
                return paused(node, inbox).await;
            }
            RunEnd::Crash(reason) => {
                // The gateway knows why better than FFmpeg's "403 Forbidden".
                let reason = match gateway.as_ref().and_then(|g| g.take_refusal()) {
                    Some(why) => format!("{reason} ({why})"),
                    None => reason,
                };
                node.metrics.ffmpeg_crashes.inc();
                let now = Instant::now();
                crashes.push_back(now);
                while crashes
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > cfg.crash_window)
                {
                    crashes.pop_front();
                }
                // The watcher's last segment is reset before every run.
                let produced = progress.borrow().last_segment.is_some();
                empty_runs = if produced { 0 } else { empty_runs + 1 };
                warn!(%reason, crashes = crashes.len(), empty_runs, "ffmpeg crashed");
                if crashes.len() as u32 >= cfg.max_crashes {
                    return Outcome::Failed(
                        format!(
                            "{} crashes within {:?}; last: {reason}",
                            crashes.len(),
                            cfg.crash_window
                        ),
                        None,
                    );
                }
                if empty_runs >= cfg.max_empty_runs {
                    return Outcome::Failed(
                        format!("{empty_runs} runs in a row without a segment; last: {reason}"),
                        None,
                    );
                }
                restarts += 1;
                entry.restarts.store(restarts, Ordering::Release);
                last_error = reason.clone();
                source_idx += 1;
                entry.phase.send_if_modified(|p| {
                    let was = std::mem::replace(p, Phase::Restarting);
                    was != Phase::Restarting
                });
                let backoff = backoff(cfg.backoff_base, cfg.backoff_max, crashes.len() as u32);
                let wrote = node
                    .store
                    .stream_set(
                        &entry.id,
                        owner,
                        &[
                            StreamField::State(StreamState::Restarting),
                            StreamField::Restarts(restarts),
                            StreamField::LastError(reason.clone()),
                            StreamField::Process(None),
                        ],
                    )
                    .await;
                if let Ok(false) = wrote {
                    return Outcome::Fenced;
                }
                let gen = entry.gen();
                let b = format!("{}ms", backoff.as_millis());
                node.event(
                    event::RESTARTED,
                    &entry.id,
                    gen,
                    &[("reason", &reason), ("backoff", &b)],
                )
                .await;
                // Back off, still answering stop and fence.
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = node.cancel.cancelled() => return Outcome::Stopped("shutdown".into(), None),
                    msg = inbox.recv() => match msg {
                        Some(Ctl::Stop { reason, done }) => return Outcome::Stopped(reason, done),
                        Some(Ctl::Fenced) => return Outcome::Fenced,
                        Some(Ctl::Restart) => {}
                        Some(Ctl::Pause { done }) => {
                            let _ = done.send(());
                            return paused(node, inbox).await;
                        }
                        None => return Outcome::Stopped("shutdown".into(), None),
                    },
                }
            }
        }
    }
}

/// A paused channel (drain): no FFmpeg; its published playlist and files are still served until a
/// stop (the new owner runs) or a fence.
pub(super) async fn paused(node: &Node, inbox: &mut mpsc::Receiver<Ctl>) -> Outcome {
    loop {
        tokio::select! {
            _ = node.cancel.cancelled() => return Outcome::Stopped("shutdown".into(), None),
            msg = inbox.recv() => match msg {
                Some(Ctl::Stop { reason, done }) => return Outcome::Stopped(reason, done),
                Some(Ctl::Fenced) => return Outcome::Fenced,
                Some(Ctl::Pause { done }) => { let _ = done.send(()); }
                Some(Ctl::Restart) => {}
                None => return Outcome::Stopped("shutdown".into(), None),
            },
        }
    }
}

/// Exponential backoff with jitter: base × 2^(n-1), capped, times a random factor in [0.5, 1.5).
pub fn backoff(base: Duration, max: Duration, crashes: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << crashes.saturating_sub(1).min(16));
    let capped = exp.min(max);
    capped.mul_f64(rand::rng().random_range(0.5..1.5)).min(max)
}

/// One FFmpeg run: record it, then wait for its exit, a stall, or a message.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run_once(
    node: &Arc<Node>,
    entry: &Arc<ChannelEntry>,
    owner: &str,
    url: &str,
    mut child: Child,
    restarts: u64,
    start_number: u64,
    last_error: &str,
    progress: &mut watch::Receiver<Progress>,
    inbox: &mut mpsc::Receiver<Ctl>,
) -> RunEnd {
    let cfg = &node.cfg;
    let pid = child.id().unwrap_or(0);
    let pid_start = ffmpeg::start_time(pid).unwrap_or(0);
    entry.pid.store(pid as u64, Ordering::Release);
    if entry.fenced.load(Ordering::Acquire) {
        // Fenced between the spawn and now: fence() saw no pid to kill.
        terminate(&mut child, pid, Duration::ZERO).await;
        return RunEnd::Fenced;
    }
    if let Err(e) = ffmpeg::write_owner_file(&entry.dir, pid, pid_start) {
        warn!(error = %e, "could not write the ffmpeg record file");
    }
    let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let mut reader = child.stderr.take().map(|stderr| {
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
    });
    let state = if restarts == 0 {
        StreamState::Starting
    } else {
        StreamState::Restarting
    };
    match node
        .store
        .stream_set(
            &entry.id,
            owner,
            &[
                StreamField::State(state),
                StreamField::Process(Some((pid, pid_start))),
                StreamField::Source(farm_proto::redact::url(url)),
                StreamField::Restarts(restarts),
                StreamField::LastError(last_error.to_string()),
            ],
        )
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            terminate(&mut child, pid, cfg.stop_grace).await;
            return RunEnd::Fenced;
        }
        Err(e) => {
            // The keepalive decides about fencing; a lost write here is repaired by the next one.
            node.metrics.redis_errors.inc();
            warn!(error = %e, "could not record ffmpeg pid");
        }
    }
    debug!(pid, url = %farm_proto::redact::Redacted(url), "ffmpeg started");
    let spawned = Instant::now();
    let first_allowance = cfg.hls_time * 3 + cfg.read_timeout;
    let mut running_written = false;
    // FFmpeg's playlist as of the previous run: only a new rename publishes.
    let mut seen_playlist = progress.borrow().ffmpeg_playlist;
    loop {
        let (deadline, waiting_for) = {
            let p = progress.borrow();
            match p.last_segment {
                Some(t) => (t + cfg.hls_time * 3, "a new segment"),
                None => (spawned + first_allowance, "the first segment"),
            }
        };
        tokio::select! {
            status = child.wait() => {
                let status = match status {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("wait failed: {e}"),
                };
                // Let the reader drain what FFmpeg wrote before it exited (bounded).
                if let Some(r) = reader.as_mut() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), r).await;
                }
                let tail = tail_text(&tail);
                return RunEnd::Crash(format!("ffmpeg {status}{}", if tail.is_empty() { String::new() } else { format!(": {tail}") }));
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                terminate(&mut child, pid, cfg.stop_grace).await;
                let secs = (Instant::now() - progress.borrow().last_segment.unwrap_or(spawned)).as_secs_f32();
                return RunEnd::Crash(format!("stalled: no new segment for {secs:.1}s (waiting for {waiting_for})"));
            }
            changed = progress.changed() => {
                if changed.is_err() { continue; }
                let version = progress.borrow().ffmpeg_playlist;
                // A channel being handed over publishes nothing more: the new owner continues
                // after what it recorded.
                if version == seen_playlist || entry.handing_over.load(Ordering::Acquire) {
                    continue;
                }
                seen_playlist = version;
                let published = match publish(node, entry, owner).await {
                    Publish::Nothing => false,
                    Publish::Done => true,
                    Publish::Fenced => {
                        terminate(&mut child, pid, Duration::ZERO).await;
                        return RunEnd::Fenced;
                    }
                };
                if published {
                    entry.phase.send_if_modified(|p| {
                        let was = std::mem::replace(p, Phase::Ready);
                        was != Phase::Ready
                    });
                    if !running_written {
                        running_written = true;
                        let w = node.store.stream_set(
                            &entry.id, owner,
                            &[StreamField::State(StreamState::Running), StreamField::LastSegmentAt(None)],
                        ).await;
                        match w {
                            Ok(true) => {}
                            Ok(false) => { terminate(&mut child, pid, cfg.stop_grace).await; return RunEnd::Fenced; }
                            Err(e) => { node.metrics.redis_errors.inc(); warn!(error = %e, "could not record running state"); }
                        }
                        if restarts > 0 {
                            // Files an earlier run wrote but never got published.
                            remove_unlisted_below(entry, start_number);
                        }
                    }
                }
            }
            _ = node.cancel.cancelled() => {
                terminate(&mut child, pid, cfg.stop_grace).await;
                return RunEnd::Stop("shutdown".into(), None);
            }
            msg = inbox.recv() => match msg {
                Some(Ctl::Stop { reason, done }) => {
                    entry.phase.send_replace(Phase::Gone);
                    let _ = node.store.stream_set(&entry.id, owner, &[StreamField::State(StreamState::Stopping)]).await;
                    terminate(&mut child, pid, cfg.stop_grace).await;
                    return RunEnd::Stop(reason, done);
                }
                Some(Ctl::Restart) => {
                    terminate(&mut child, pid, cfg.stop_grace).await;
                    return RunEnd::Restart;
                }
                Some(Ctl::Pause { done }) => {
                    terminate(&mut child, pid, cfg.stop_grace).await;
                    return RunEnd::Paused(done);
                }
                Some(Ctl::Fenced) => {
                    terminate(&mut child, pid, Duration::ZERO).await;
                    return RunEnd::Fenced;
                }
                None => {
                    terminate(&mut child, pid, cfg.stop_grace).await;
                    return RunEnd::Stop("shutdown".into(), None);
                }
            },
        }
    }
}

pub(super) fn tail_text(tail: &Mutex<VecDeque<String>>) -> String {
    let t = tail.lock().unwrap_or_else(|p| p.into_inner());
    t.iter()
        .rev()
        .take(3)
        .rev()
        .cloned()
        .collect::<Vec<_>>()
        .join(" | ")
}

/// SIGTERM to the group, wait up to `grace`, SIGKILL, always reap.
pub async fn terminate(child: &mut Child, pid: u32, grace: Duration) {
    if pid == 0 {
        let _ = child.kill().await;
        return;
    }
    if !grace.is_zero() {
        if let Err(e) = ffmpeg::signal_group(pid, Signal::SIGTERM) {
            debug!(pid, error = %e, "SIGTERM to ffmpeg group");
        }
        if let Ok(res) = tokio::time::timeout(grace, child.wait()).await {
            if let Err(e) = res {
                warn!(pid, error = %e, "waiting for ffmpeg");
            }
            return;
        }
        warn!(pid, ?grace, "ffmpeg ignored SIGTERM; killing its group");
    }
    if let Err(e) = ffmpeg::signal_group(pid, Signal::SIGKILL) {
        debug!(pid, error = %e, "SIGKILL to ffmpeg group");
    }
    if let Err(e) = child.wait().await {
        warn!(pid, error = %e, "waiting for ffmpeg after SIGKILL");
    }
}
