//! The node's shared state and the life of a channel on it.
//!
//! A channel is an entry in [`Node::channels`] from the first request until its actor ends. The
//! entry is inserted before anything else happens, so concurrent first requests find it and wait on
//! the same [`Phase`] (single flight: one claim, one FFmpeg). The actor ([`run_channel`]) owns the
//! FFmpeg child and is the only writer of the channel's Redis state; everything else talks to it
//! through its inbox.
//!
//! The wings, in the order a channel meets them:
//!
//! | module | does |
//! |---|---|
//! | `authorize` | what a playback path may name, signed URLs (requests, nginx's hook, the access socket) |
//! | `route` | where a viewer of a channel this node does not run goes |
//! | `claim` | catalog, disk and capacity checks, the lease (or a drain's handover), the recorded timeline |
//! | `actor` | the channel's actor from claim to release; publishing its timeline and playlist |
//! | `supervise` | FFmpeg runs, restarts with backoff, crash loops, stopping a process group |
//! | `run` | one FFmpeg run: recorded, watched for its exit or a stall, its playlists published |
//! | `keepalive` | heartbeat, lease renewals and the fence, one pipeline per interval |
//! | `access` | viewer access flushed to Redis for the coordinator's idle decisions |
//! | `drain` | handing every channel to other nodes |
//!
//! A refusal is a [`Refusal`], in the node's words; the HTTP layer maps it to a response.

use crate::config::Config;
use crate::ffmpeg;
use crate::metrics::{CarryRequestPath, Metrics};
use crate::playlist::now_ms;
use crate::store::Store;
use crate::watcher::{HlsWatcher, Progress};
use nix::sys::signal::Signal;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

mod access;
mod actor;
mod authorize;
mod claim;
mod drain;
mod keepalive;
mod refusal;
mod route;
mod run;
mod supervise;

pub use access::access_flush_loop;
use actor::*;
pub use authorize::{authorize, authorize_uri, Playback};
use claim::*;
pub use drain::drain;
pub use keepalive::keepalive_loop;
pub use refusal::{NodeUrl, Refusal};
use supervise::*;
pub use supervise::{backoff, terminate};

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
    Refused(Refusal),
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

/// A channel's run on this node beyond its [`Phase`], as one value behind one lock: written by its
/// actor, drain and the fence, read by requests, the keepalive and the admin API, so what is read
/// together was written together (the fence sets `fenced` and reads `pid` at once; a run records
/// its `pid` and reads `fenced` at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunState {
    /// 0 until claimed.
    pub gen: u64,
    /// Capacity weight of the channel's profile (set at claim).
    pub weight: u32,
    /// The running FFmpeg's pid; 0 between runs.
    pub pid: u32,
    pub restarts: u64,
    /// Being handed to another node (drain): its lease moved on purpose, so a failed renewal is
    /// expected and must not fence the FFmpeg before the new owner runs. Nothing more is published.
    pub handing_over: bool,
    /// The channel is fenced: its FFmpeg was killed and must not be restarted.
    pub fenced: bool,
}

impl Default for RunState {
    fn default() -> Self {
        Self {
            gen: 0,
            weight: 1,
            pid: 0,
            restarts: 0,
            handing_over: false,
            fenced: false,
        }
    }
}

pub struct ChannelEntry {
    pub id: String,
    pub dir: PathBuf,
    pub phase: watch::Sender<Phase>,
    pub inbox: mpsc::Sender<Ctl>,
    state: Mutex<RunState>,
    pub progress: Mutex<Option<watch::Receiver<Progress>>>,
    pub started: Instant,
    /// The channel's provider account, once claimed (its holding is renewed with the lease).
    pub provider: std::sync::OnceLock<Option<String>>,
    /// In-memory copies of the playlist and the newest segments.
    pub hot: crate::hot::HotFiles,
    /// The channel's timeline on this node (from the claim on).
    pub timeline: Mutex<Option<crate::playlist::Timeline>>,
    /// What viewers get: the playlist as last published (recorded in Redis first).
    pub published: watch::Sender<Published>,
    /// The playlist an earlier owner (or run) recorded, served while this node starts the channel
    /// after a failover or a drain, so players wait on a playlist instead of an error.
    pub held: Mutex<Option<bytes::Bytes>>,
}

impl ChannelEntry {
    /// The run state as of now.
    pub fn state(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Changes the run state in one step; `f`'s answer is read under the same lock.
    pub fn update<T>(&self, f: impl FnOnce(&mut RunState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }
    pub fn gen(&self) -> u64 {
        self.state().gen
    }
    pub fn handing_over(&self) -> bool {
        self.state().handing_over
    }
    pub fn fenced(&self) -> bool {
        self.state().fenced
    }
    pub fn phase(&self) -> Phase {
        self.phase.borrow().clone()
    }
    /// Moves the channel to `phase`; waiters are woken only when it changes.
    fn enter(&self, phase: Phase) {
        self.phase.send_if_modified(|p| {
            let was = std::mem::replace(p, phase);
            *p != was
        });
    }
    /// The watcher's view of the folder (playlist version, newest segment).
    pub fn progress(&self) -> Progress {
        let g = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().map(|rx| rx.borrow().clone()).unwrap_or_default()
    }

    /// Fences the channel at once: its FFmpeg group gets SIGKILL here, not when the actor gets to
    /// its message (it may be waiting on Redis), and the actor ends without touching Redis.
    pub fn fence(&self) {
        let pid = self.update(|s| {
            s.fenced = true;
            s.pid
        });
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
    /// The fence outside this process; it runs every channel's egress gateway. Without one
    /// (the router's tests) no FFmpeg is spawned.
    pub guard: Option<Arc<crate::guard::Guard>>,
    /// Start slots (`max_concurrent_starts`): a channel holds one while it claims, so a burst of
    /// first requests queues instead of flooding Redis.
    pub start_slots: Arc<tokio::sync::Semaphore>,
}

/// How long a [`Node::remote_view`] answer is reused.
pub const REMOTE_FRESH: Duration = Duration::from_millis(100);
/// Channels remembered by [`Node::remote_view`] at most.
const REMOTE_MAX: usize = 10_000;

impl Node {
    /// The node's state. Without a guard (`None`: the router's tests) it claims, serves, routes
    /// and refuses like any other, but every channel it claims fails before an FFmpeg is spawned.
    pub fn new(
        cfg: Arc<Config>,
        store: Store,
        watcher: Arc<HlsWatcher>,
        metrics: Arc<Metrics>,
        egress: Arc<crate::egress::Policy>,
        sandbox: crate::sandbox::Sandbox,
        guard: impl Into<Option<Arc<crate::guard::Guard>>>,
    ) -> Arc<Self> {
        let guard = guard.into();
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
    pub fn get_or_start(self: &Arc<Self>, id: &str) -> Result<Arc<ChannelEntry>, Refusal> {
        self.get_or_start_with(id, ClaimMode::Fresh)
    }

    /// [`Node::get_or_start`] with an explicit way to take the lease.
    pub fn get_or_start_with(
        self: &Arc<Self>,
        id: &str,
        mode: ClaimMode,
    ) -> Result<Arc<ChannelEntry>, Refusal> {
        if self.cancel.is_cancelled() {
            return Err(Refusal::ShuttingDown);
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
            state: Mutex::new(RunState::default()),
            progress: Mutex::new(None),
            started: Instant::now(),
            provider: std::sync::OnceLock::new(),
            hot: crate::hot::HotFiles::new(
                self.hot_budget.clone(),
                self.cfg.hls_list_size as u64 + 2,
            ),
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
    ) -> Result<bool, Refusal> {
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
