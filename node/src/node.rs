//! The node's shared state and the life of a channel on it.
//!
//! A channel is an entry in [`Node::channels`] from the first request until its actor ends. The
//! entry is inserted before anything else happens, so concurrent first requests find it and wait on
//! the same [`Phase`] (single flight: one claim, one FFmpeg). The actor ([`run_channel`]) owns the
//! FFmpeg child and is the only writer of the channel's Redis state; everything else talks to it
//! through its inbox.

use crate::config::Config;
use crate::error::ApiError;
use crate::ffmpeg;
use crate::metrics::{CarryRequestPath, Metrics};
use crate::store::{Renewal, Store};
use crate::watcher::{HlsWatcher, Progress};
use axum::http::StatusCode;
use farm_proto::scripts::{owner_value, ClaimResult, HandoverResult};
use farm_proto::types::event;
use farm_proto::{ChannelSpec, StreamState};
use nix::sys::signal::Signal;
use rand::Rng;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

/// How long a `failed` stream hash stays in Redis for ops to read.
const FAILED_KEEP: Duration = Duration::from_secs(600);
/// Lines of FFmpeg's stderr kept for `last_error`.
const STDERR_LINES: usize = 8;

/// Where a channel is in its life, as request handlers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Reading the catalog and claiming the lease.
    Claiming,
    /// FFmpeg runs; no playlist yet.
    Starting,
    /// The playlist exists.
    Ready,
    /// FFmpeg crashed and is being restarted (the old playlist may still be served).
    Restarting,
    /// Crash loop ended; the reason. The entry stays for `failed_hold`.
    Failed(String),
    /// Refused before anything ran (unknown channel, owned elsewhere, disk full, ...).
    Refused(ApiError),
    /// Stopped; the entry is being removed.
    Gone,
}

/// How a channel's lease is taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimMode {
    /// A first request or a start command: claim a free lease.
    Fresh,
    /// Take the channel over from a draining node that holds it with this gen (the timeline it
    /// recorded is continued, as after a failover).
    Handover { from: String, gen: u64 },
}

/// Messages to a channel's actor.
pub enum Ctl {
    Stop {
        reason: String,
        done: Option<oneshot::Sender<()>>,
    },
    Restart,
    /// Drain: stop FFmpeg (its upstream connection and local resources are the new owner's to
    /// take) but keep serving what is published until a `Stop`.
    Pause {
        done: oneshot::Sender<()>,
    },
    /// Our lease is gone (or Redis is unreachable past the fence time): kill FFmpeg, touch nothing in Redis.
    Fenced,
}

/// A channel's playlist as this node serves it.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// The text (empty before the first segment).
    pub text: bytes::Bytes,
    /// The same without blocking reload (as recorded in Redis), for when this node will not hold
    /// a reload (it hands the channel over).
    pub plain: bytes::Bytes,
    /// Media sequence number of its newest segment.
    pub last: Option<u64>,
    /// Its target duration, seconds.
    pub target: u64,
}

pub struct ChannelEntry {
    pub id: String,
    pub dir: PathBuf,
    pub phase: watch::Sender<Phase>,
    pub inbox: mpsc::Sender<Ctl>,
    /// 0 until claimed.
    pub gen: AtomicU64,
    pub pid: AtomicU64,
    pub progress: Mutex<Option<watch::Receiver<Progress>>>,
    pub restarts: AtomicU64,
    pub started: Instant,
    /// The channel's provider account, once claimed (its holding is renewed with the lease).
    pub provider: std::sync::OnceLock<Option<String>>,
    /// In-memory copies of the playlist and the newest segments.
    pub hot: crate::hot::HotFiles,
    /// Capacity weight of the channel's profile (set at claim).
    pub weight: std::sync::atomic::AtomicU32,
    /// Being handed to another node (drain): its lease moved on purpose, so a failed renewal is
    /// expected and must not fence the FFmpeg before the new owner runs. Nothing more is published.
    pub handing_over: std::sync::atomic::AtomicBool,
    /// Set when the channel is fenced: its FFmpeg was killed and must not be restarted.
    pub fenced: std::sync::atomic::AtomicBool,
    /// The channel's timeline on this node (from the claim on).
    pub timeline: Mutex<Option<crate::playlist::Timeline>>,
    /// What viewers get: the playlist as last published (recorded in Redis first).
    pub published: watch::Sender<Published>,
    /// The playlist an earlier owner (or run) recorded, served while this node starts the channel
    /// after a failover or a drain, so players wait on a playlist instead of an error.
    pub held: Mutex<Option<bytes::Bytes>>,
}

impl ChannelEntry {
    pub fn gen(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }
    pub fn phase(&self) -> Phase {
        self.phase.borrow().clone()
    }
    /// The watcher's view of the folder (playlist version, newest segment).
    pub fn progress(&self) -> Progress {
        let g = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().map(|rx| rx.borrow().clone()).unwrap_or_default()
    }

    /// Fences the channel at once: its FFmpeg group gets SIGKILL here, not when the actor gets to
    /// its message (it may be waiting on Redis), and the actor ends without touching Redis.
    pub fn fence(&self) {
        self.fenced.store(true, Ordering::Release);
        let pid = self.pid.load(Ordering::Acquire) as u32;
        if pid > 0 {
            if let Err(e) = ffmpeg::signal_group(pid, Signal::SIGKILL) {
                debug!(pid, error = %e, "SIGKILL to a fenced ffmpeg group");
            }
        }
        let _ = self.inbox.try_send(Ctl::Fenced);
    }

    /// The published playlist (empty before the first segment).
    pub fn published(&self) -> Published {
        self.published.borrow().clone()
    }

    /// The earlier owner's playlist, while this node starts the channel.
    pub fn held(&self) -> Option<bytes::Bytes> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether a segment file is published (or just left the window).
    pub fn lists(&self, file: &str) -> bool {
        self.timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|t| t.lists(file))
    }

    fn last_segment_ms(&self) -> Option<u64> {
        let g = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().and_then(|rx| rx.borrow().last_segment_ms)
    }
}

/// Viewer access since the last flush: one lock and a set insert on the request path, no Redis.
/// Any channel a viewer asked this node for counts, wherever it runs (the flush stamps only
/// channels that have an owner). Bounded: past [`ACCESS_MAX`] distinct channels in one interval,
/// more are dropped (and counted).
#[derive(Default)]
pub struct AccessBuffer {
    seen: Mutex<HashSet<String>>,
    dropped: std::sync::atomic::AtomicU64,
}

/// Distinct channels one access flush carries at most.
pub const ACCESS_MAX: usize = 50_000;

impl AccessBuffer {
    pub fn record(&self, id: &str) {
        let mut s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if !s.contains(id) {
            if s.len() >= ACCESS_MAX {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            s.insert(id.to_string());
        }
    }

    /// Accesses dropped because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
    fn take(&self) -> HashSet<String> {
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

pub struct Node {
    pub cfg: Arc<Config>,
    pub store: Store,
    /// The keepalive's own connection (heartbeat and lease renewals never queue behind requests).
    pub keepalive_store: Store,
    pub watcher: Arc<HlsWatcher>,
    pub metrics: Arc<Metrics>,
    pub access: AccessBuffer,
    pub channels: Mutex<HashMap<String, Arc<ChannelEntry>>>,
    pub incarnation: String,
    pub started_ms: u64,
    pub tracker: TaskTracker,
    pub cancel: CancellationToken,
    /// When the keepalive last reached Redis.
    pub last_redis_ok: Mutex<Instant>,
    /// Byte budget of all in-memory playlist and segment copies.
    pub hot_budget: Arc<crate::hot::Budget>,
    /// Set by a `drain` command: no new channels; the running ones are handed to other nodes.
    pub draining: std::sync::atomic::AtomicBool,
    /// setpriv, to give every FFmpeg a parent-death signal.
    pub pdeathsig: Option<PathBuf>,
    /// The first heartbeat reached Redis (until then the claim script refuses this node).
    pub ready: watch::Sender<bool>,
    /// Where FFmpeg may connect (every channel's gateway asks it).
    pub egress: Arc<crate::egress::Policy>,
    /// The network sandbox every FFmpeg is spawned in.
    pub sandbox: crate::sandbox::Sandbox,
    /// What Redis said about channels other nodes run, for [`REMOTE_FRESH`]: bounds the Redis
    /// calls viewer requests for those channels make.
    remote: Mutex<HashMap<String, (Instant, Arc<crate::store::RemoteView>)>>,
    /// The fence outside this process; it runs every channel's egress gateway.
    pub guard: Arc<crate::guard::Guard>,
    /// Start slots (`max_concurrent_starts`): a channel holds one while it claims, so a burst of
    /// first requests queues instead of flooding Redis.
    pub start_slots: Arc<tokio::sync::Semaphore>,
}

/// How long a [`Node::remote_view`] answer is reused.
pub const REMOTE_FRESH: Duration = Duration::from_millis(100);
/// Channels remembered by [`Node::remote_view`] at most.
const REMOTE_MAX: usize = 10_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Node {
    pub fn new(
        cfg: Arc<Config>,
        store: Store,
        watcher: Arc<HlsWatcher>,
        metrics: Arc<Metrics>,
        egress: Arc<crate::egress::Policy>,
        sandbox: crate::sandbox::Sandbox,
        guard: Arc<crate::guard::Guard>,
    ) -> Arc<Self> {
        let incarnation = format!("{:x}-{:x}", now_ms(), std::process::id());
        let hot_budget = crate::hot::Budget::new(cfg.segment_cache);
        Arc::new(Self {
            keepalive_store: store.dedicated(),
            store,
            watcher,
            metrics,
            access: AccessBuffer::default(),
            channels: Mutex::new(HashMap::new()),
            incarnation,
            started_ms: now_ms(),
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
            last_redis_ok: Mutex::new(Instant::now()),
            hot_budget,
            draining: std::sync::atomic::AtomicBool::new(false),
            pdeathsig: ffmpeg::pdeathsig_wrapper(),
            ready: watch::channel(false).0,
            egress,
            sandbox,
            remote: Mutex::new(HashMap::new()),
            guard,
            start_slots: Arc::new(tokio::sync::Semaphore::new(
                cfg.max_concurrent_starts.max(1) as usize,
            )),
            cfg,
        })
    }

    /// What Redis says of a channel this node does not run (its owner, its recorded playlist),
    /// reused for [`REMOTE_FRESH`]. A viewer request awaits it: counted as a request-path call.
    pub async fn remote_view(
        &self,
        id: &str,
    ) -> Result<Arc<crate::store::RemoteView>, crate::store::StoreError> {
        let lock = || self.remote.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, v)) = lock().get(id) {
            if at.elapsed() < REMOTE_FRESH {
                return Ok(v.clone());
            }
        }
        let view = Arc::new(self.store.timeline(id).await.inspect_err(|_| {
            self.metrics.redis_errors.inc();
        })?);
        let mut m = lock();
        if m.len() >= REMOTE_MAX {
            m.retain(|_, (at, _)| at.elapsed() < REMOTE_FRESH);
            if m.len() >= REMOTE_MAX {
                m.clear();
            }
        }
        m.insert(id.to_string(), (Instant::now(), view.clone()));
        Ok(view)
    }

    fn lock_channels(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ChannelEntry>>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn local(&self, id: &str) -> Option<Arc<ChannelEntry>> {
        self.lock_channels().get(id).cloned()
    }

    pub fn entries(&self) -> Vec<Arc<ChannelEntry>> {
        self.lock_channels().values().cloned().collect()
    }

    /// The channel's entry, starting it when this node does not have it (single flight).
    pub fn get_or_start(self: &Arc<Self>, id: &str) -> Result<Arc<ChannelEntry>, ApiError> {
        self.get_or_start_with(id, ClaimMode::Fresh)
    }

    /// [`Node::get_or_start`] with an explicit way to take the lease.
    pub fn get_or_start_with(
        self: &Arc<Self>,
        id: &str,
        mode: ClaimMode,
    ) -> Result<Arc<ChannelEntry>, ApiError> {
        if self.cancel.is_cancelled() {
            return Err(ApiError::unavailable("node is shutting down", 2));
        }
        let mut map = self.lock_channels();
        if let Some(e) = map.get(id) {
            return Ok(e.clone());
        }
        let (phase, _) = watch::channel(Phase::Claiming);
        let (tx, rx) = mpsc::channel(16);
        let entry = Arc::new(ChannelEntry {
            id: id.to_string(),
            dir: ffmpeg::channel_dir(&self.cfg.hls_root, id),
            phase,
            inbox: tx,
            gen: AtomicU64::new(0),
            pid: AtomicU64::new(0),
            progress: Mutex::new(None),
            restarts: AtomicU64::new(0),
            started: Instant::now(),
            provider: std::sync::OnceLock::new(),
            hot: crate::hot::HotFiles::new(
                self.hot_budget.clone(),
                self.cfg.hls_list_size as u64 + 2,
            ),
            handing_over: std::sync::atomic::AtomicBool::new(false),
            weight: std::sync::atomic::AtomicU32::new(1),
            fenced: std::sync::atomic::AtomicBool::new(false),
            timeline: Mutex::new(None),
            published: watch::channel(Published::default()).0,
            held: Mutex::new(None),
        });
        map.insert(id.to_string(), entry.clone());
        drop(map);
        let node = self.clone();
        let e2 = entry.clone();
        let span = tracing::info_span!("channel", id = %id);
        self.tracker.spawn(
            async move {
                run_channel(node.clone(), e2.clone(), rx, mode).await;
                node.remove_entry(&e2);
            }
            .instrument(span)
            .carry_request_path(),
        );
        Ok(entry)
    }

    fn remove_entry(&self, entry: &Arc<ChannelEntry>) {
        let mut map = self.lock_channels();
        if map.get(&entry.id).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            map.remove(&entry.id);
        }
        self.metrics.streams_running.set(
            map.values()
                .filter(|e| {
                    e.gen() > 0 && !matches!(e.phase(), Phase::Failed(_) | Phase::Refused(_))
                })
                .count() as i64,
        );
    }

    /// Free bytes on HLS_ROOT.
    pub fn disk_free(&self) -> Option<u64> {
        let st = nix::sys::statvfs::statvfs(&self.cfg.hls_root).ok()?;
        Some(st.blocks_available() as u64 * st.fragment_size() as u64)
    }

    /// Asks a channel to stop and waits until it has (FFmpeg gone, folder removed, lease released).
    pub async fn stop_channel(
        &self,
        id: &str,
        reason: &str,
        gen: Option<u64>,
    ) -> Result<bool, ApiError> {
        let Some(entry) = self.local(id) else {
            return Ok(false);
        };
        if let Some(g) = gen {
            if entry.gen() != g {
                return Ok(false);
            }
        }
        let (tx, rx) = oneshot::channel();
        if entry
            .inbox
            .send(Ctl::Stop {
                reason: reason.to_string(),
                done: Some(tx),
            })
            .await
            .is_err()
        {
            return Ok(false);
        }
        // The actor may end for another reason first, dropping the sender: that is also "stopped".
        let _ = rx.await;
        Ok(true)
    }

    async fn event(&self, kind: &str, id: &str, gen: u64, extra: &[(&str, &str)]) {
        let gen = gen.to_string();
        let at = now_ms().to_string();
        let mut f: Vec<(&str, &str)> = vec![
            ("node", &self.cfg.node_id),
            ("channel", id),
            ("gen", &gen),
            ("at", &at),
        ];
        f.extend_from_slice(extra);
        if let Err(e) = self.store.event(kind, &f).await {
            self.metrics.redis_errors.inc();
            warn!(error = %e, event = kind, "could not record event");
        }
    }
}

/// What ended one FFmpeg run.
enum RunEnd {
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
async fn run_channel(
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
                .send_replace(Phase::Refused(ApiError::unavailable(
                    format!(
                    "channel {} cannot start now: node {} is busy starting {busy} other channels \
and this one waited {} for its turn; retry shortly",
                    entry.id,
                    node.cfg.node_id,
                    farm_proto::duration::format(timeout)
                ),
                    2,
                )));
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

/// The whole life of one channel on this node: preflight, claim, supervise, stop.
async fn run_channel_inner(
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
    let cfg = node.cfg.clone();
    let owner = owner_value(&cfg.node_id, gen);
    let provider = (!spec.provider.is_empty()).then(|| spec.provider.clone());
    let _ = entry.provider.set(provider.clone());
    entry.gen.store(gen, Ordering::Release);
    entry.phase.send_replace(Phase::Starting);
    node.metrics.channel_starts.inc();
    node.metrics.streams_running.inc();
    info!(gen, url = %farm_proto::redact::Redacted(&spec.url), profile = %spec.profile, "channel claimed");
    node.event(event::STARTED, &entry.id, gen, &[]).await;

    let dir = entry.dir.clone();
    let end = match prepare_dir(&node, &entry) {
        Ok(progress) => {
            supervise(
                &node, &entry, &spec, &owner, progress, &recorded, &mut inbox,
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
        Outcome::Stopped(reason, done) => {
            entry.phase.send_replace(Phase::Gone);
            match node
                .store
                .release(
                    &entry.id,
                    &cfg.node_id,
                    &owner,
                    provider.as_deref(),
                    None,
                    FAILED_KEEP,
                )
                .await
            {
                Ok(true) => {}
                Ok(false) if entry.handing_over.load(Ordering::Acquire) => {}
                Ok(false) => warn!("lease was no longer ours at release"),
                Err(e) => {
                    node.metrics.redis_errors.inc();
                    error!(error = %e, "could not release lease; it expires by itself");
                }
            }
            node.metrics.stopped(&reason);
            node.event(event::STOPPED, &entry.id, gen, &[("reason", &reason)])
                .await;
            info!(%reason, "channel stopped");
            // Gone from the map before the stop is acknowledged: a start right after it begins anew.
            node.remove_entry(&entry);
            if let Some(d) = done {
                let _ = d.send(());
            }
        }
        Outcome::Fenced => {
            entry.phase.send_replace(Phase::Gone);
            node.metrics.stopped("fenced");
            warn!("channel fenced: lease lost, FFmpeg stopped without touching Redis");
        }
        Outcome::Failed(reason, done) => {
            // Viewers get a generic reason, never FFmpeg's text (the reason is in the stream
            // hash, the event and the log, redacted).
            entry.phase.send_replace(Phase::Failed(format!(
                "channel {} is failing upstream; retry later",
                entry.id
            )));
            match node
                .store
                .release(
                    &entry.id,
                    &cfg.node_id,
                    &owner,
                    provider.as_deref(),
                    Some((StreamState::Failed.as_str(), &reason)),
                    FAILED_KEEP,
                )
                .await
            {
                Ok(_) => {}
                Err(e) => {
                    node.metrics.redis_errors.inc();
                    error!(error = %e, "could not release failed channel; the lease expires by itself");
                }
            }
            node.metrics.stopped("failed");
            node.event(event::FAILED, &entry.id, gen, &[("reason", &reason)])
                .await;
            error!(%reason, "channel failed");
            if let Some(d) = done {
                let _ = d.send(());
            }
            // Viewers get 503 with the reason for a while, instead of a new crash loop per request.
            let hold = tokio::time::sleep(cfg.failed_hold);
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
    }
}

enum Outcome {
    Stopped(String, Option<oneshot::Sender<()>>),
    Failed(String, Option<oneshot::Sender<()>>),
    Fenced,
}

/// Claim, then the recorded timeline.
async fn preflight(
    node: &Node,
    entry: &ChannelEntry,
    mode: &ClaimMode,
) -> Result<(ChannelSpec, u64, crate::playlist::Recorded), ApiError> {
    let (spec, gen) = claim(node, entry, mode).await?;
    // What an earlier owner published: the new timeline continues it, and its last playlist is
    // what viewers get while this node starts (a failover or a drain, not a cold start).
    let recorded = match node.store.timeline(&entry.id).await {
        Ok(view) => {
            if let (Some(pl), Some(age)) = (view.playlist, view.age_ms) {
                if age <= node.cfg.hold_max().as_millis() as u64 {
                    *entry.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(pl);
                }
            }
            view.recorded
        }
        Err(e) => {
            // Without it the channel starts a new timeline: players see a discontinuity, and the
            // media sequence may repeat numbers an earlier owner used (URIs still differ by gen).
            node.metrics.redis_errors.inc();
            warn!(error = %e, "cannot read the recorded timeline; starting a new one");
            crate::playlist::Recorded::default()
        }
    };
    Ok((spec, gen, recorded))
}

/// Catalog, checks and claim. Nothing is spawned and nothing is written unless all pass.
async fn claim(
    node: &Node,
    entry: &ChannelEntry,
    mode: &ClaimMode,
) -> Result<(ChannelSpec, u64), ApiError> {
    let cfg = &node.cfg;
    let id = &entry.id;
    // Viewers get a sentence; the Redis error (a script hash, a WRONGTYPE) goes to the log.
    let redis_down = |e: crate::store::StoreError| {
        node.metrics.redis_errors.inc();
        warn!(error = %e, "cannot start the channel: redis");
        ApiError::unavailable(
            format!("cannot start channel {id} this moment: the farm's state store did not answer as expected; retry"),
            2,
        )
    };
    let spec = node
        .store
        .catalog(id)
        .await
        .map_err(redis_down)?
        .ok_or_else(|| {
            ApiError::not_found(format!("unknown channel {id:?}: it is not in the catalog"))
        })?;
    for url in spec.sources() {
        farm_proto::validate::upstream_url(&url, &cfg.allowed_schemes).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("channel {id} cannot start: catalog entry has an {e}"),
            )
        })?;
    }
    // FFmpeg reads every scheme but http without the gateway (https through CONNECT, whose TLS
    // the gateway cannot rewrite): credentials in such a URL would be in FFmpeg's argv, which
    // every local user can read. udp/rtp have no credentials (their query holds FFmpeg options).
    for url in spec.sources() {
        let scheme = crate::egress::scheme(&url);
        if !matches!(scheme.as_str(), "http" | "udp" | "rtp")
            && farm_proto::redact::has_credentials(&url)
        {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!(
                    "channel {id} cannot start: its upstream URL {} carries credentials (userinfo, a token in the query or /live/<user>/<pass>/) that FFmpeg would show in its command line; only http:// URLs may carry them (the egress gateway adds them)",
                    farm_proto::redact::url(&url)
                ),
            ));
        }
    }
    // An upstream must never be the farm itself (Redis, a sentinel, this node) nor a denied
    // network: decided on resolved addresses, so no spelling of 127.0.0.1 gets through.
    for url in spec.sources() {
        if let Err(e) = node.egress.check_source(&url, cfg.read_timeout).await {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("channel {id} cannot start: {e}"),
            ));
        }
    }
    if !spec.provider.is_empty() && farm_proto::validate::channel_id(&spec.provider).is_err() {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "channel {id} cannot start: catalog names an invalid provider {:?}",
                spec.provider
            ),
        ));
    }
    if !cfg.profiles.contains_key(&spec.profile) {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "channel {id} cannot start: unknown profile {:?}",
                spec.profile
            ),
        ));
    }
    if let Some(free) = node.disk_free() {
        if free < cfg.min_free {
            return Err(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                format!(
                    "refusing to start channel {id}: {} MiB free on the HLS folder, below min_free {} MiB",
                    free >> 20,
                    cfg.min_free >> 20
                ),
            ));
        }
    }
    let weight = cfg.profiles[&spec.profile].weight.max(1);
    entry.weight.store(weight, Ordering::Release);
    if let ClaimMode::Handover { from, gen } = mode {
        return match node
            .store
            .handover(
                id,
                from,
                *gen,
                &cfg.node_id,
                cfg.lease_ttl,
                cfg.max_streams,
                weight,
            )
            .await
            .map_err(redis_down)?
        {
            HandoverResult::Moved { gen } => Ok((spec, gen)),
            // A race lost (the old owner stopped, or someone took it first) or no room here:
            // the old owner keeps or stops the channel; a viewer's next request finds it.
            HandoverResult::Stale { owner } => Err(ApiError::unavailable(
                format!(
                    "channel {id} cannot be taken over from {from}: its lease is now {}",
                    owner.map_or("free".to_string(), |(n, g)| owner_value(&n, g))
                ),
                1,
            )),
            HandoverResult::Full { running } => Err(ApiError::unavailable(
                format!("channel {id} cannot be taken over from {from}: this node is full ({running} running)"),
                1,
            )),
        };
    }
    if node.draining.load(Ordering::Acquire) {
        // A draining node takes no new channels: the viewer goes to the owner, or a node with room.
        if let Some(owner) = node.store.owner_of(id).await.map_err(redis_down)? {
            if owner != cfg.node_id {
                if let Some(url) = node.store.live_node_url(&owner).await.map_err(redis_down)? {
                    return Err(ApiError::owned_by(url));
                }
            }
        }
        return match node
            .store
            .roomiest_node(&cfg.node_id)
            .await
            .map_err(redis_down)?
        {
            Some((_, url)) => Err(ApiError::forwarded(url)),
            None => Err(ApiError::unavailable(
                format!(
                    "node {} is draining and no other node has room for channel {id}",
                    cfg.node_id
                ),
                10,
            )),
        };
    }
    match node
        .store
        .claim(
            id,
            &cfg.node_id,
            cfg.lease_ttl,
            cfg.max_streams,
            (!spec.provider.is_empty()).then_some(spec.provider.as_str()),
            weight,
        )
        .await
        .map_err(redis_down)?
    {
        ClaimResult::Claimed { gen } => Ok((spec, gen)),
        ClaimResult::Owned { node: owner, .. } if owner == cfg.node_id => {
            Err(ApiError::unavailable(
                format!("channel {id} is still held by an earlier run on this node; retry shortly"),
                1,
            ))
        }
        ClaimResult::Owned { node: owner, .. } => {
            match node.store.live_node_url(&owner).await.map_err(redis_down)? {
                Some(url) => Err(ApiError::owned_by(url)),
                None => Err(ApiError::unavailable(
                    format!(
                    "channel {id} is held by node {owner}, which is not answering; retry shortly"
                ),
                    2,
                )),
            }
        }
        ClaimResult::Full { running } => match node.store.roomiest_node(&cfg.node_id).await.map_err(redis_down)? {
            // Another node has room: the viewer goes there and that node starts the channel.
            Some((_, url)) => Err(ApiError::forwarded(url)),
            None => Err(ApiError::unavailable(
                format!(
                    "the farm is full: node {} is at capacity ({running} of {} weight units) and no live node has room for channel {id}",
                    cfg.node_id, cfg.max_streams
                ),
                10,
            )),
        },
        ClaimResult::Busy { node: prev } => Err(ApiError::unavailable(
            format!("channel {id} was released from node {prev} a moment ago; it stops there first; retry"),
            1,
        )),
        ClaimResult::Recovering { not_alive: false } => Err(ApiError::unavailable(
            format!("channel {id} cannot start this moment: the farm is recovering from a Redis restart; retry"),
            1,
        )),
        ClaimResult::Recovering { not_alive: true } => Err(ApiError::unavailable(
            format!("channel {id} cannot start this moment: node {} is registering with the farm; retry", cfg.node_id),
            1,
        )),
        ClaimResult::ProviderFull { max } => Err(ApiError::unavailable(
            format!(
                "provider {} is at its limit of {max} concurrent connections; channel {id} cannot start now",
                spec.provider
            ),
            10,
        )),
    }
}

fn prepare_dir(node: &Node, entry: &ChannelEntry) -> std::io::Result<watch::Receiver<Progress>> {
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

/// Runs FFmpeg until a stop, a fence or the end of a crash loop.
async fn supervise(
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
                            ("state", StreamState::Restarting.as_str().into()),
                            ("restarts", restarts.to_string()),
                            ("last_error", reason.clone()),
                            ("pid", String::new()),
                            ("pid_start", String::new()),
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
async fn paused(node: &Node, inbox: &mut mpsc::Receiver<Ctl>) -> Outcome {
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
async fn run_once(
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
                ("state", state.as_str().into()),
                ("pid", pid.to_string()),
                ("pid_start", pid_start.to_string()),
                ("source", farm_proto::redact::url(url)),
                ("restarts", restarts.to_string()),
                ("last_error", last_error.to_string()),
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
                            &[("state", StreamState::Running.as_str().into()), ("last_segment_at", "$now".into())],
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
                    let _ = node.store.stream_set(&entry.id, owner, &[("state", StreamState::Stopping.as_str().into())]).await;
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

fn remove_unlisted_below(entry: &ChannelEntry, below: u64) {
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
const TIMELINE_KEEP: Duration = Duration::from_secs(3600);

/// What one look at FFmpeg's playlist did.
enum Publish {
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
async fn publish(node: &Node, entry: &ChannelEntry, owner: &str) -> Publish {
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

/// Keepalive: heartbeat, lease renewals and last-segment times in one pipeline per interval.
/// Fences channels whose lease is gone, and all of them when Redis was unreachable for 2/3 of the lease TTL.
pub async fn keepalive_loop(node: Arc<Node>) {
    let cfg = node.cfg.clone();
    let mut tick = tokio::time::interval(cfg.keepalive_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fenced_all = false;
    let mut beat_before = false;
    // Redis time of the last heartbeat reply and when it came: a heartbeat tells Redis what time it
    // expects, so that one delivered late (after a partition healed) changes nothing.
    let mut last_reply: Option<(u64, Instant)> = None;
    // Stops every FFmpeg this node runs, touching nothing in Redis (their leases may be others' now).
    let fence_all = |why: &str| {
        let claimed: Vec<Arc<ChannelEntry>> = node
            .entries()
            .into_iter()
            .filter(|e| e.gen() > 0 && !e.handing_over.load(Ordering::Acquire))
            .collect();
        if !claimed.is_empty() {
            error!(
                reason = why,
                channels = claimed.len(),
                "fencing: stopping every FFmpeg"
            );
        }
        for e in &claimed {
            e.fence();
        }
    };
    let fence_deadline = |node: &Node| {
        let last = *node.last_redis_ok.lock().unwrap_or_else(|p| p.into_inner());
        tokio::time::Instant::from_std(last + cfg.fence_after())
    };
    loop {
        // The fence time is a deadline of its own, not something noticed at the next tick.
        tokio::select! {
            _ = node.cancel.cancelled() => return,
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(fence_deadline(&node)), if !fenced_all => {
                fence_all("no lease renewal for 2/3 of the lease TTL");
                fenced_all = true;
                continue;
            }
        }
        let entries: Vec<Arc<ChannelEntry>> = node
            .entries()
            .into_iter()
            .filter(|e| {
                e.gen() > 0
                    && !matches!(
                        e.phase(),
                        Phase::Failed(_) | Phase::Gone | Phase::Refused(_)
                    )
            })
            .collect();
        let draining = node.draining.load(Ordering::Acquire);
        let drained = draining && entries.is_empty();
        // A channel being handed over no longer holds its lease: neither renewed nor fenced.
        let entries: Vec<Arc<ChannelEntry>> = entries
            .into_iter()
            .filter(|e| !e.handing_over.load(Ordering::Acquire))
            .collect();
        // Woken after a freeze (SIGSTOP, a stalled VM) past the fence time: our leases may belong to
        // others by now. Stop the FFmpegs before anything else, without waiting for Redis to say so.
        let since = node
            .last_redis_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        if since >= cfg.fence_after() && !fenced_all && !entries.is_empty() {
            fence_all("no lease renewal for 2/3 of the lease TTL (woken after a freeze)");
            fenced_all = true;
        }
        let renewals: Vec<Renewal> = entries
            .iter()
            .map(|e| Renewal {
                channel: e.id.clone(),
                owner: owner_value(&cfg.node_id, e.gen()),
                provider: e.provider.get().cloned().flatten(),
                last_segment_at: e.last_segment_ms(),
            })
            .collect();
        let running = entries.len().to_string();
        let load: u32 = entries
            .iter()
            .map(|e| e.weight.load(Ordering::Acquire))
            .sum();
        let fields = [
            ("public_url", cfg.public_url.clone()),
            ("addr", cfg.listen.to_string()),
            ("incarnation", node.incarnation.clone()),
            ("pid", std::process::id().to_string()),
            ("started_at", node.started_ms.to_string()),
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("capacity", cfg.max_streams.to_string()),
            ("running", running),
            ("load", load.to_string()),
            ("disk_free", node.disk_free().unwrap_or(0).to_string()),
            ("draining", if draining { "1" } else { "0" }.to_string()),
            ("drained", if drained { "1" } else { "0" }.to_string()),
        ];
        // A renewal counts from when it was sent; a call that hangs past the fence time fences
        // while it hangs (redis_timeout may be longer than what is left of the lease).
        let sent_at = Instant::now();
        let beat = crate::store::Beat {
            before: beat_before,
            expected_now_ms: last_reply
                .map(|(t, at)| t + sent_at.saturating_duration_since(at).as_millis() as u64),
            max_lag: cfg.fence_after(),
        };
        let call = node.keepalive_store.keepalive(
            &cfg.node_id,
            cfg.node_ttl,
            &node.incarnation,
            &fields,
            cfg.lease_ttl,
            &renewals,
            &beat,
        );
        tokio::pin!(call);
        let result = loop {
            tokio::select! {
                r = &mut call => break r,
                _ = tokio::time::sleep_until(fence_deadline(&node)), if !fenced_all => {
                    fence_all("no lease renewal for 2/3 of the lease TTL (a renewal is still pending)");
                    fenced_all = true;
                }
            }
        };
        let result = match result {
            Ok(ka) if ka.stale => Err(crate::store::StoreError::Protocol(
                "the heartbeat reached Redis later than the fence time allows; it changed nothing"
                    .into(),
            )),
            other => other,
        };
        match result {
            Ok(ka) => {
                last_reply = Some((ka.redis_now_ms, Instant::now()));
                *node.last_redis_ok.lock().unwrap_or_else(|p| p.into_inner()) = sent_at;
                node.guard.renewed(sent_at, cfg.fence_after());
                beat_before = true;
                node.ready.send_if_modified(|r| !std::mem::replace(r, true));
                if ka.lost {
                    fence_all(
                        "redis lost this node's keys (restarted empty, or the node was reaped)",
                    );
                }
                if ka.repaired > 0 {
                    node.metrics.data_errors.inc_by(ka.repaired.min(100) as u64);
                    warn!(
                        repaired = ka.repaired,
                        "heartbeat replaced wrong-typed keys of this node (>= 100: farm:nodes has the wrong type; the coordinator repairs it)"
                    );
                }
                for e in &ka.data_errors {
                    node.metrics.data_errors.inc();
                    warn!(error = %farm_proto::redact::text(e), "a lease renewal failed on a bad key: only that channel is fenced");
                }
                let held = ka.held;
                if fenced_all {
                    info!("redis reachable again; channels start again on demand");
                    fenced_all = false;
                }
                for (e, ok) in entries.iter().zip(held) {
                    if !ok {
                        warn!(channel = %e.id, gen = e.gen(), "lease lost; fencing the channel");
                        e.fence();
                    }
                }
            }
            Err(err) => {
                node.metrics.redis_errors.inc();
                // Try again soon rather than a whole interval later: a blip must not eat the lease.
                tick.reset_after(cfg.keepalive_interval().min(Duration::from_millis(250)));
                let since = node
                    .last_redis_ok
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .elapsed();
                warn!(error = %err, ?since, "keepalive failed");
                if since >= cfg.fence_after() && !entries.is_empty() {
                    fence_all("cannot renew leases for 2/3 of the lease TTL");
                    fenced_all = true;
                }
            }
        }
    }
}

/// Flushes viewer access to Redis once per `access_flush`, for channels this node runs.
pub async fn access_flush_loop(node: Arc<Node>) {
    let mut tick = tokio::time::interval(node.cfg.access_flush);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = node.cancel.cancelled() => true,
            _ = tick.tick() => false,
        };
        let ids: Vec<String> = node.access.take().into_iter().collect();
        if !ids.is_empty() {
            match node.store.touch(&ids).await {
                Ok(true) => {
                    node.metrics.access_flushes.inc();
                }
                Ok(false) => {
                    node.metrics.data_errors.inc();
                    warn!(channels = ids.len(), "farm:access has the wrong type: access not recorded (the coordinator repairs it); keeping it for the next flush");
                    for id in ids {
                        node.access.record(&id);
                    }
                }
                Err(e) => {
                    node.metrics.redis_errors.inc();
                    warn!(error = %e, channels = ids.len(), "access flush failed; keeping it for the next one");
                    for id in ids {
                        node.access.record(&id);
                    }
                }
            }
        }
        if last {
            return;
        }
    }
}

/// Drain: hand every channel of this node to the live node with the most room. Its FFmpeg stops
/// first (break before make: the upstream connection, a provider's connection slot and a UDP port
/// can only be held once), while this node keeps serving the published window, which viewers play
/// from their buffer; the new owner takes the lease (handover script), continues the timeline and
/// publishes its first segment; then this node lets the channel go. Channels nobody can take stay
/// here, loudly.
pub async fn drain(node: Arc<Node>) {
    let cfg = node.cfg.clone();
    node.draining.store(true, Ordering::Release);
    info!("draining: no new channels; handing the running ones to other nodes");
    let entries: Vec<Arc<ChannelEntry>> = node
        .entries()
        .into_iter()
        .filter(|e| {
            e.gen() > 0
                && matches!(
                    e.phase(),
                    Phase::Ready | Phase::Starting | Phase::Restarting
                )
        })
        .collect();
    for e in entries {
        if node.cancel.is_cancelled() || !node.draining.load(Ordering::Acquire) {
            return;
        }
        let target = match node.store.roomiest_node(&cfg.node_id).await {
            Ok(Some((t, _))) => t,
            Ok(None) => {
                error!(channel = %e.id, "drain: no live node has room; the channel stays here");
                continue;
            }
            Err(err) => {
                error!(channel = %e.id, error = %err, "drain: cannot pick a node");
                continue;
            }
        };
        let gen = e.gen();
        let (tx, rx) = oneshot::channel();
        if e.inbox.send(Ctl::Pause { done: tx }).await.is_err() || rx.await.is_err() {
            continue; // the channel ended meanwhile
        }
        e.handing_over.store(true, Ordering::Release);
        let cmd = farm_proto::Command {
            op: farm_proto::Op::Start,
            channel: e.id.clone(),
            gen: Some(gen),
            reason: "drain".into(),
            by: cfg.node_id.clone(),
            from: cfg.node_id.clone(),
            seq: None,
        };
        if let Err(err) = node.store.send_command(&target, &cmd).await {
            error!(channel = %e.id, error = %err, "drain: cannot send the handover; stopping the channel here (its next viewer starts it elsewhere)");
            e.handing_over.store(false, Ordering::Release);
            let _ = node.stop_channel(&e.id, "drained", Some(gen)).await;
            continue;
        }
        // Wait (bounded) until the new owner runs it; viewers are still served here meanwhile.
        let deadline = Instant::now() + cfg.start_timeout + cfg.lease_ttl;
        let mut moved = false;
        while Instant::now() < deadline && !node.cancel.is_cancelled() {
            if let Ok(Some((owner, state))) = node.store.stream_owner_state(&e.id).await {
                if owner == target && state == StreamState::Running.as_str() {
                    moved = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !moved {
            warn!(channel = %e.id, %target, "drain: the new owner did not report running in time; stopping here anyway");
        }
        let (tx, rx) = oneshot::channel();
        if e.inbox
            .send(Ctl::Stop {
                reason: "drained".into(),
                done: Some(tx),
            })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        info!(channel = %e.id, %target, moved, "drain: channel handed over");
    }
    info!("drained");
}
