//! A channel's actor: from its claim until it is released, the only writer of its Redis state; and
//! what it publishes to viewers (the timeline and the playlist).

use super::*;
use crate::watcher::Progress;
use farm_proto::scripts::owner_value;
use farm_proto::types::event;
use farm_proto::{ChannelSpec, StreamState};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

/// What ended one FFmpeg run.
pub(super) enum RunEnd {
    Crash(String),
    Stop(String, Option<oneshot::Sender<()>>),
    Restart,
    Paused(oneshot::Sender<()>),
    Fenced,
}

/// [`run_channel_inner`] in a start slot: it waits its turn (up to `start_timeout`, else the
/// start is refused with 503) and keeps the slot while it claims (catalog, upstream check, lease,
/// recorded timeline: the Redis work of a start), until it leaves `Claiming`. An upstream that
/// never sends a segment does not keep others from starting.
pub(super) async fn run_channel(
    node: Arc<Node>,
    entry: Arc<ChannelEntry>,
    inbox: mpsc::Receiver<Ctl>,
    mode: ClaimMode,
) {
    let timeout = node.cfg.start_timeout;
    let wait = tokio::time::timeout(timeout, node.start_slots.clone().acquire_owned());
    let slot = tokio::select! {
        _ = node.cancel.cancelled() => {
            entry.phase.send_replace(Phase::Gone);
            return;
        }
        r = wait => r,
    };
    let slot = match slot {
        Ok(Ok(slot)) => slot,
        _ => {
            node.metrics.start_slot_timeouts.inc();
            let busy = node.cfg.max_concurrent_starts;
            debug!(busy, "no start slot within start_timeout");
            entry
                .phase
                .send_replace(Phase::Refused(Refusal::NoStartSlot {
                    id: entry.id.clone(),
                    node: node.cfg.node_id.clone(),
                    busy,
                    waited: timeout,
                }));
            return;
        }
    };
    let mut phase = entry.phase.subscribe();
    let started = async move {
        let _ =
            tokio::time::timeout(timeout, phase.wait_for(|p| !matches!(p, Phase::Claiming))).await;
        drop(slot);
    };
    tokio::join!(started, run_channel_inner(node, entry, inbox, mode));
}

/// The whole life of one channel on this node: preflight and claim, supervise, then its end
/// (stopped, fenced or failed) recorded.
pub(super) async fn run_channel_inner(
    node: Arc<Node>,
    entry: Arc<ChannelEntry>,
    mut inbox: mpsc::Receiver<Ctl>,
    mode: ClaimMode,
) {
    let (spec, gen, recorded) = match preflight(&node, &entry, &mode).await {
        Ok(v) => v,
        Err(e) => {
            debug!(error = %e, "start refused");
            entry.phase.send_replace(Phase::Refused(e));
            return;
        }
    };
    crate::metrics::request_path_done();
    let claim = claimed(&node, &entry, &spec, gen).await;
    let dir = entry.dir.clone();
    let end = match prepare_dir(&node, &entry) {
        Ok(progress) => {
            supervise(
                &node,
                &entry,
                &spec,
                &claim.owner,
                progress,
                &recorded,
                &mut inbox,
            )
            .await
        }
        Err(e) => Outcome::Failed(format!("cannot prepare {}: {e}", dir.display()), None),
    };
    node.watcher.unregister(&dir);
    if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            error!(dir = %dir.display(), error = %e, "could not remove channel folder");
        }
    }
    node.metrics.streams_running.dec();
    match end {
        Outcome::Stopped(reason, done) => stopped(&node, &entry, &claim, reason, done).await,
        Outcome::Fenced => {
            entry.phase.send_replace(Phase::Gone);
            node.metrics.stopped("fenced");
            warn!("channel fenced: lease lost, FFmpeg stopped without touching Redis");
        }
        Outcome::Failed(reason, done) => {
            failed(&node, &entry, &claim, reason, done).await;
            // Viewers get 503 with the reason for a while, instead of a new crash loop per request.
            hold_failed(&node, &mut inbox).await;
        }
    }
}

/// What a claim gave the channel: its gen, the lease value, its provider account.
struct Claimed {
    gen: u64,
    owner: String,
    provider: Option<String>,
}

/// The lease is ours: the entry learns its gen and provider, the channel is `Starting`.
async fn claimed(node: &Node, entry: &ChannelEntry, spec: &ChannelSpec, gen: u64) -> Claimed {
    let owner = owner_value(&node.cfg.node_id, gen);
    let provider = (!spec.provider.is_empty()).then(|| spec.provider.clone());
    let _ = entry.provider.set(provider.clone());
    entry.update(|s| s.gen = gen);
    entry.phase.send_replace(Phase::Starting);
    node.metrics.channel_starts.inc();
    node.metrics.streams_running.inc();
    info!(gen, url = %farm_proto::redact::Redacted(&spec.url), profile = %spec.profile, "channel claimed");
    node.event(event::STARTED, &entry.id, gen, &[]).await;
    Claimed {
        gen,
        owner,
        provider,
    }
}

/// A stop: the lease released, the event recorded, the entry gone before the stop is acknowledged.
async fn stopped(
    node: &Node,
    entry: &Arc<ChannelEntry>,
    claim: &Claimed,
    reason: String,
    done: Option<oneshot::Sender<()>>,
) {
    entry.phase.send_replace(Phase::Gone);
    match release(node, entry, claim, None).await {
        Ok(true) => {}
        Ok(false) if entry.handing_over() => {}
        Ok(false) => warn!("lease was no longer ours at release"),
        Err(e) => {
            node.metrics.redis_errors.inc();
            error!(error = %e, "could not release lease; it expires by itself");
        }
    }
    node.metrics.stopped(&reason);
    node.event(event::STOPPED, &entry.id, claim.gen, &[("reason", &reason)])
        .await;
    info!(%reason, "channel stopped");
    // Gone from the map before the stop is acknowledged: a start right after it begins anew.
    node.remove_entry(entry);
    if let Some(d) = done {
        let _ = d.send(());
    }
}

/// The lease (and the provider's connection) let go; a failed channel's hash keeps `state` and
/// `last_error` for [`FAILED_KEEP`].
async fn release(
    node: &Node,
    entry: &ChannelEntry,
    claim: &Claimed,
    failed: Option<(&str, &str)>,
) -> Result<bool, crate::store::StoreError> {
    node.store
        .release(
            &entry.id,
            &node.cfg.node_id,
            &claim.owner,
            claim.provider.as_deref(),
            failed,
            FAILED_KEEP,
        )
        .await
}

/// A crash loop's end: `failed` with the reason in the stream hash, the lease released.
async fn failed(
    node: &Node,
    entry: &ChannelEntry,
    claim: &Claimed,
    reason: String,
    done: Option<oneshot::Sender<()>>,
) {
    // Viewers get a generic reason, never FFmpeg's text (the reason is in the stream hash, the
    // event and the log, redacted).
    entry.phase.send_replace(Phase::Failed(format!(
        "channel {} is failing upstream; retry later",
        entry.id
    )));
    let failed = Some((StreamState::Failed.as_str(), reason.as_str()));
    if let Err(e) = release(node, entry, claim, failed).await {
        node.metrics.redis_errors.inc();
        error!(error = %e, "could not release failed channel; the lease expires by itself");
    }
    node.metrics.stopped("failed");
    node.event(event::FAILED, &entry.id, claim.gen, &[("reason", &reason)])
        .await;
    error!(%reason, "channel failed");
    if let Some(d) = done {
        let _ = d.send(());
    }
}

/// Keeps a failed entry for `failed_hold` (or until a stop or shutdown).
async fn hold_failed(node: &Node, inbox: &mut mpsc::Receiver<Ctl>) {
    let hold = tokio::time::sleep(node.cfg.failed_hold);
    tokio::pin!(hold);
    loop {
        tokio::select! {
            _ = &mut hold => break,
            _ = node.cancel.cancelled() => break,
            msg = inbox.recv() => match msg {
                Some(Ctl::Stop { done, .. }) => { if let Some(d) = done { let _ = d.send(()); } break; }
                Some(_) => {}
                None => break,
            },
        }
    }
}

pub(super) enum Outcome {
    Stopped(String, Option<oneshot::Sender<()>>),
    Failed(String, Option<oneshot::Sender<()>>),
    Fenced,
}

pub(super) fn prepare_dir(
    node: &Node,
    entry: &ChannelEntry,
) -> std::io::Result<watch::Receiver<Progress>> {
    let dir = &entry.dir;
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    let rx = node
        .watcher
        .register(dir)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    *entry.progress.lock().unwrap_or_else(|p| p.into_inner()) = Some(rx.clone());
    Ok(rx)
}

pub(super) fn remove_unlisted_below(entry: &ChannelEntry, below: u64) {
    let Ok(rd) = std::fs::read_dir(&entry.dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if crate::watcher::segment_number(name).is_some_and(|n| n < below) && !entry.lists(name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// How long a channel's timeline record stays in Redis after its last write: a channel started
/// again within it continues its media sequence and target duration.
pub(super) const TIMELINE_KEEP: Duration = Duration::from_secs(3600);

/// What one look at FFmpeg's playlist did.
pub(super) enum Publish {
    Nothing,
    Done,
    /// Redis says the lease is not ours: nothing was published.
    Fenced,
}

/// Reads FFmpeg's playlist and publishes the new segments: recorded in Redis first (gen-checked,
/// so the recorded playlist is never behind what a viewer got and a stale owner publishes
/// nothing), then served, then the files that left the window are deleted. When Redis does not
/// answer within `publish_wait` the segments are published anyway: an outage must not stop
/// viewers (the takeover margin covers what a new owner cannot know).
pub(super) async fn publish(node: &Node, entry: &ChannelEntry, owner: &str) -> Publish {
    let path = entry.dir.join(crate::playlist::FFMPEG_PLAYLIST);
    let text = match tokio::fs::read_to_string(&path).await {
        Ok(t) => t,
        Err(e) => {
            debug!(error = %e, "cannot read ffmpeg's playlist");
            return Publish::Nothing;
        }
    };
    let listed = crate::playlist::parse_ffmpeg(&text);
    let (ingested, playlist, recorded, served) = {
        let mut g = entry.timeline.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tl) = g.as_mut() else {
            return Publish::Nothing;
        };
        let ingested = tl.ingest(&listed, crate::playlist::now_ms());
        if ingested.added == 0 {
            return Publish::Nothing;
        }
        let served = Published {
            text: tl.served(),
            plain: tl.text(),
            last: tl.last(),
            target: tl.target(),
        };
        (ingested, tl.text(), tl.recorded(), served)
    };
    if ingested.over_target > 0 {
        node.metrics
            .segments_over_target
            .inc_by(ingested.over_target as u64);
        warn!(
            segments = ingested.over_target,
            "segment longer than the channel's target duration (a source GOP longer than the first segment showed)"
        );
    }
    let wait = node.cfg.publish_wait();
    let record = node.store.record_timeline(
        &entry.id,
        owner,
        entry.gen(),
        &recorded,
        &playlist,
        TIMELINE_KEEP,
    );
    match tokio::time::timeout(wait, record).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            warn!("lease lost: not publishing; fencing the channel");
            return Publish::Fenced;
        }
        Ok(Err(e)) => {
            node.metrics.redis_errors.inc();
            node.metrics.publish_unrecorded.inc();
            warn!(error = %e, "cannot record the timeline; publishing anyway");
        }
        Err(_) => {
            node.metrics.publish_unrecorded.inc();
            warn!(?wait, "timeline not recorded in time; publishing anyway");
        }
    }
    entry.published.send_replace(served);
    for f in ingested.delete {
        if let Err(e) = std::fs::remove_file(entry.dir.join(&f)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(file = %f, error = %e, "cannot delete a segment that left the playlist");
            }
        }
    }
    Publish::Done
}
