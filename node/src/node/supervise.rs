//! FFmpeg supervision: one run at a time (see `run`), restarts with backoff, crash loops, and
//! stopping a child's process group.

use super::run::{run_once, Run};
use super::*;
use crate::config::Profile;
use crate::ffmpeg;
use crate::guard::{GatewayHandle, Guard};
use crate::watcher::Progress;
use farm_proto::records::StreamField;
use farm_proto::types::event;
use farm_proto::{ChannelSpec, StreamState};
use nix::sys::signal::Signal;
use rand::Rng;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Child;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

/// What every FFmpeg run of a channel is given: the channel, its sources, its egress gateway.
pub(super) struct Plan<'a> {
    pub node: &'a Arc<Node>,
    pub entry: &'a Arc<ChannelEntry>,
    /// `<node>:<gen>`, the lease value every write is checked against.
    pub owner: &'a str,
    pub profile: &'a Profile,
    /// Kills the FFmpegs at the fence, also while this process cannot run.
    pub guard: Arc<Guard>,
    /// The catalog's URLs (the main one, then the backups), tried in turn after crashes.
    pub sources: Vec<String>,
    /// The same as FFmpeg's argv has them: http URLs without their credentials.
    pub masked: Vec<String>,
    /// Every http/https request FFmpeg makes goes through it (refused where the policy says so).
    pub gateway: Option<GatewayHandle>,
    pub recorded: &'a crate::playlist::Recorded,
}

impl Plan<'_> {
    /// Writes fields of the channel's stream hash, checked against its lease: `Ok(false)` when
    /// the lease is no longer ours (nothing written).
    pub async fn record(&self, fields: &[StreamField]) -> crate::store::Result<bool> {
        let (node, entry) = (self.node, self.entry);
        node.store.stream_set(&entry.id, self.owner, fields).await
    }
}

/// What the runs so far say: crashes in the window, runs in a row without a segment, the source
/// next in turn, restarts and the last error (as recorded in the stream hash).
#[derive(Default)]
pub(super) struct History {
    crashes: VecDeque<Instant>,
    /// Whatever they lasted (a stalled run can outlast the crash window).
    empty_runs: u32,
    source_idx: usize,
    pub restarts: u64,
    pub last_error: String,
}

impl History {
    fn restarted(&mut self, entry: &ChannelEntry) {
        self.restarts += 1;
        let restarts = self.restarts;
        entry.update(|s| s.restarts = restarts);
    }

    /// Counts a crash; the channel's end when it completes a crash loop.
    fn crashed(&mut self, node: &Node, reason: &str, produced: bool) -> Result<(), Outcome> {
        let cfg = &node.cfg;
        node.metrics.ffmpeg_crashes.inc();
        let now = Instant::now();
        self.crashes.push_back(now);
        while self
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > cfg.crash_window)
        {
            self.crashes.pop_front();
        }
        self.empty_runs = if produced { 0 } else { self.empty_runs + 1 };
        let (crashes, empty_runs) = (self.crashes.len(), self.empty_runs);
        warn!(%reason, crashes, empty_runs, "ffmpeg crashed");
        if crashes as u32 >= cfg.max_crashes {
            return Err(Outcome::Failed(
                format!(
                    "{crashes} crashes within {:?}; last: {reason}",
                    cfg.crash_window
                ),
                None,
            ));
        }
        if empty_runs >= cfg.max_empty_runs {
            return Err(Outcome::Failed(
                format!("{empty_runs} runs in a row without a segment; last: {reason}"),
                None,
            ));
        }
        Ok(())
    }
}

/// Runs FFmpeg until a stop, a fence or the end of a crash loop: one run, what ended it, and after
/// a crash a backoff before the next.
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
    *entry.timeline.lock().unwrap_or_else(|p| p.into_inner()) = Some(new_timeline(&cfg, recorded));
    let Some(guard) = node.guard.clone() else {
        return Outcome::Failed("no guard: this node runs no FFmpeg".into(), None);
    };
    let sources = spec.sources();
    let (masked, secrets) = mask_sources(&sources);
    let gateway = match open_gateway(&node.cfg, &guard, entry, &sources, &secrets).await {
        Ok(g) => g,
        Err(e) => return Outcome::Failed(format!("cannot open the egress gateway: {e}"), None),
    };
    let plan = Plan {
        node,
        entry,
        owner,
        profile: &cfg.profiles[&spec.profile],
        guard,
        sources,
        masked,
        gateway,
        recorded,
    };
    let mut history = History::default();
    loop {
        if entry.fenced() {
            return Outcome::Fenced;
        }
        let end = one_run(&plan, &history, &mut progress, inbox).await;
        if entry.update(|s| {
            s.pid = 0;
            s.fenced
        }) {
            return Outcome::Fenced;
        }
        match end {
            RunEnd::Stop(reason, done) => return Outcome::Stopped(reason, done),
            RunEnd::Fenced => return Outcome::Fenced,
            RunEnd::Restart => history.restarted(entry),
            RunEnd::Paused(done) => {
                let _ = done.send(());
                return paused(node, inbox).await;
            }
            RunEnd::Crash(reason) => {
                // The gateway knows why better than FFmpeg's "403 Forbidden".
                let reason = match plan.gateway.as_ref().and_then(|g| g.take_refusal()) {
                    Some(why) => format!("{reason} ({why})"),
                    None => reason,
                };
                // The watcher's last segment is reset before every run.
                let produced = progress.borrow().last_segment.is_some();
                if let Err(end) = history.crashed(node, &reason, produced) {
                    return end;
                }
                if let Some(end) = restart_after_crash(&plan, &mut history, reason, inbox).await {
                    return end;
                }
            }
        }
    }
}

fn new_timeline(cfg: &Config, recorded: &crate::playlist::Recorded) -> crate::playlist::Timeline {
    crate::playlist::Timeline::new(cfg.hls_time, cfg.hls_list_size as usize, recorded)
        .with_fresh_base(crate::playlist::fresh_base(now_ms(), cfg.hls_time))
}

/// FFmpeg's argv gets http URLs without their credentials; the gateway puts them back.
fn mask_sources(sources: &[String]) -> (Vec<String>, Vec<farm_proto::redact::OriginSecrets>) {
    let nonce = format!("{:016x}", rand::random::<u64>());
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
}

/// One egress gateway for the channel's life, when a source needs one (http/https).
async fn open_gateway(
    cfg: &Config,
    guard: &Arc<Guard>,
    entry: &ChannelEntry,
    sources: &[String],
    secrets: &[farm_proto::redact::OriginSecrets],
) -> Result<Option<GatewayHandle>, String> {
    if !sources
        .iter()
        .any(|u| crate::egress::proxied(&crate::egress::scheme(u)))
    {
        return Ok(None);
    }
    guard
        .open_gateway(&entry.id, sources, cfg.read_timeout, secrets)
        .await
        .map(Some)
        .map_err(|e| e.to_string())
}

/// One run: the next source in turn, FFmpeg spawned (tracked by the guard) and supervised until
/// it ends.
async fn one_run(
    plan: &Plan<'_>,
    history: &History,
    progress: &mut watch::Receiver<Progress>,
    inbox: &mut mpsc::Receiver<Ctl>,
) -> RunEnd {
    let (node, entry) = (plan.node, plan.entry);
    let cfg = &node.cfg;
    let url = &plan.sources[history.source_idx % plan.sources.len()];
    let argv_url = &plan.masked[history.source_idx % plan.masked.len()];
    let start_number = {
        let mut tl = entry.timeline.lock().unwrap_or_else(|p| p.into_inner());
        let tl = tl.get_or_insert_with(|| new_timeline(cfg, plan.recorded));
        tl.begin_run();
        tl.next_start(progress.borrow().last_seq)
    };
    node.watcher.reset(&entry.dir);
    let proxy = plan.gateway.as_ref().map(|g| g.proxy_url());
    let argv = ffmpeg::args(
        cfg,
        &ffmpeg::RunSpec {
            url: argv_url,
            dir: &entry.dir,
            profile: plan.profile,
            start_number,
            gen: entry.gen(),
            http_proxy: proxy.as_deref(),
        },
    );
    let ports = ffmpeg::tcp_ports(url, plan.gateway.as_ref().map(|g| g.port()));
    match ffmpeg::spawn(
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
            let _tracked = plan.guard.track(&child, &entry.id);
            node.metrics.ffmpeg_spawns.inc();
            let run = Run {
                url,
                start_number,
                restarts: history.restarts,
                last_error: &history.last_error,
            };
            run_once(plan, &run, child, progress, inbox).await
        }
    }
}

/// After a crash that does not end the channel: `restarting`, recorded in Redis (a lease found
/// lost fences), then a backoff that still answers stop and fence. `Some` when the channel ends.
async fn restart_after_crash(
    plan: &Plan<'_>,
    history: &mut History,
    reason: String,
    inbox: &mut mpsc::Receiver<Ctl>,
) -> Option<Outcome> {
    let (node, entry, cfg) = (plan.node, plan.entry, &plan.node.cfg);
    history.restarted(entry);
    history.last_error = reason.clone();
    history.source_idx += 1;
    entry.enter(Phase::Restarting);
    let backoff = backoff(
        cfg.backoff_base,
        cfg.backoff_max,
        history.crashes.len() as u32,
    );
    let wrote = plan
        .record(&[
            StreamField::State(StreamState::Restarting),
            StreamField::Restarts(history.restarts),
            StreamField::LastError(reason.clone()),
            StreamField::Process(None),
        ])
        .await;
    if let Ok(false) = wrote {
        return Some(Outcome::Fenced);
    }
    let b = format!("{}ms", backoff.as_millis());
    node.event(
        event::RESTARTED,
        &entry.id,
        entry.gen(),
        &[("reason", &reason), ("backoff", &b)],
    )
    .await;
    back_off(node, backoff, inbox).await
}

/// Backs off, still answering stop and fence. `Some` when the channel ends meanwhile.
async fn back_off(
    node: &Node,
    backoff: Duration,
    inbox: &mut mpsc::Receiver<Ctl>,
) -> Option<Outcome> {
    tokio::select! {
        _ = tokio::time::sleep(backoff) => None,
        _ = node.cancel.cancelled() => Some(Outcome::Stopped("shutdown".into(), None)),
        msg = inbox.recv() => match msg {
            Some(Ctl::Stop { reason, done }) => Some(Outcome::Stopped(reason, done)),
            Some(Ctl::Fenced) => Some(Outcome::Fenced),
            Some(Ctl::Restart) => None,
            Some(Ctl::Pause { done }) => {
                let _ = done.send(());
                Some(paused(node, inbox).await)
            }
            None => Some(Outcome::Stopped("shutdown".into(), None)),
        },
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
