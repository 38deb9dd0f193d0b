//! Watches channel folders with `notify` and turns FFmpeg's renames into per-channel progress.
//!
//! FFmpeg (with `temp_file`) writes `seg_<gen>_<n>.ts.tmp` and its own playlist's `.tmp` and renames
//! them when complete, so a rename onto a segment name means "segment n is complete" and a rename onto
//! FFmpeg's playlist means "FFmpeg listed a new segment": the channel actor then publishes it (see
//! [`crate::playlist`]). Publishing and stall detection wait on these events; nothing polls the disk.
//!
//! The notify callback only `try_send`s into a bounded channel; on overflow the event is counted and
//! the dispatcher rescans every watched folder once, so a burst can delay progress but never lose it.

use crate::playlist::now_ms;
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, watch};

/// What FFmpeg has produced in one channel folder so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bumped on every rename onto FFmpeg's own playlist (it lists a new finished segment).
    pub ffmpeg_playlist: u64,
    /// Highest finished segment number seen.
    pub last_seq: Option<u64>,
    /// When it finished (monotonic), for stall detection.
    pub last_segment: Option<Instant>,
    /// When it finished (ms since the epoch), for `last_segment_at`.
    pub last_segment_ms: Option<u64>,
    /// Finished segments seen.
    pub segments: u64,
}

type Registry = Mutex<HashMap<PathBuf, watch::Sender<Progress>>>;

/// The node's one watcher over all channel folders.
pub struct HlsWatcher {
    watcher: Mutex<Option<RecommendedWatcher>>,
    registry: Arc<Registry>,
}

/// The media sequence number of a segment file (`seg_<gen>_<n>.ts`).
pub fn segment_number(name: &str) -> Option<u64> {
    crate::playlist::parse_segment_file(name).map(|(_, n)| n)
}

impl HlsWatcher {
    /// Starts the watcher; `dispatch` must be run (it is the named task that applies events).
    pub fn new(capacity: usize, overflows: Counter) -> notify::Result<(Arc<Self>, Dispatcher)> {
        let (tx, rx) = mpsc::channel::<notify::Event>(capacity);
        let lost = Arc::new(AtomicBool::new(false));
        let (ov, lost2) = (overflows.clone(), lost.clone());
        let watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(ev) => {
                    if tx.try_send(ev).is_err() {
                        ov.inc();
                        lost2.store(true, Ordering::Release);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "notify error; rescanning channel folders");
                    lost2.store(true, Ordering::Release);
                }
            })?;
        let registry: Arc<Registry> = Arc::default();
        let me = Arc::new(Self {
            watcher: Mutex::new(Some(watcher)),
            registry: registry.clone(),
        });
        Ok((me, Dispatcher { rx, registry, lost }))
    }

    /// Watches a channel folder (call before FFmpeg starts writing in it).
    pub fn register(&self, dir: &Path) -> notify::Result<watch::Receiver<Progress>> {
        let (tx, rx) = watch::channel(Progress::default());
        self.lock_registry().insert(dir.to_path_buf(), tx);
        if let Some(w) = self.lock_watcher().as_mut() {
            w.watch(dir, RecursiveMode::NonRecursive)?;
        }
        // Anything written before the watch was in place.
        if let Some(tx) = self.lock_registry().get(dir) {
            rescan(dir, tx);
        }
        Ok(rx)
    }

    /// Stops watching a folder (before it is removed).
    pub fn unregister(&self, dir: &Path) {
        self.lock_registry().remove(dir);
        if let Some(w) = self.lock_watcher().as_mut() {
            // The folder may already be gone, which removes the watch by itself.
            let _ = w.unwatch(dir);
        }
    }

    /// Resets a folder's progress before a restarted FFmpeg writes into it, keeping the last
    /// segment number so the next run continues the media sequence.
    pub fn reset(&self, dir: &Path) {
        if let Some(tx) = self.lock_registry().get(dir) {
            tx.send_modify(|p| {
                p.last_segment = None;
            });
        }
    }

    fn lock_registry(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<PathBuf, watch::Sender<Progress>>> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_watcher(&self) -> std::sync::MutexGuard<'_, Option<RecommendedWatcher>> {
        self.watcher.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the OS watcher (at shutdown), which ends the dispatcher.
    pub fn close(&self) {
        self.lock_watcher().take();
    }
}

/// The task that applies file events to channel progress.
pub struct Dispatcher {
    rx: mpsc::Receiver<notify::Event>,
    registry: Arc<Registry>,
    lost: Arc<AtomicBool>,
}

impl Dispatcher {
    /// Runs until the watcher is closed.
    pub async fn run(mut self) {
        while let Some(ev) = self.rx.recv().await {
            if self.lost.swap(false, Ordering::AcqRel) {
                let reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
                for (dir, tx) in reg.iter() {
                    rescan(dir, tx);
                }
            }
            if !finishes_a_file(&ev.kind) {
                continue;
            }
            // For a rename with both ends, the destination is the last path.
            let Some(path) = ev.paths.last() else {
                continue;
            };
            let (Some(dir), Some(name)) =
                (path.parent(), path.file_name().and_then(|n| n.to_str()))
            else {
                continue;
            };
            let reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(tx) = reg.get(dir) {
                apply(tx, name);
            }
        }
    }
}

fn finishes_a_file(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Create(_)
            | EventKind::Modify(ModifyKind::Name(
                RenameMode::To | RenameMode::Both | RenameMode::Any
            ))
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
}

fn apply(tx: &watch::Sender<Progress>, name: &str) {
    if name == crate::playlist::FFMPEG_PLAYLIST {
        tx.send_modify(|p| {
            p.ffmpeg_playlist += 1;
        });
    } else if let Some(n) = segment_number(name) {
        tx.send_if_modified(|p| {
            if p.last_seq.is_some_and(|l| n <= l) && p.last_segment.is_some() {
                return false;
            }
            p.last_seq = Some(p.last_seq.map_or(n, |l| l.max(n)));
            p.last_segment = Some(Instant::now());
            p.last_segment_ms = Some(now_ms());
            p.segments += 1;
            true
        });
    }
}

/// Brings a folder's progress up to date from a directory listing (after a lost event or a late watch).
fn rescan(dir: &Path, tx: &watch::Sender<Progress>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    // Segments first, in order, then FFmpeg's playlist that lists them.
    names.sort_by_key(|n| (n == crate::playlist::FFMPEG_PLAYLIST, segment_number(n)));
    for n in names {
        apply(tx, &n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names() {
        assert_eq!(segment_number("seg_3_12.ts"), Some(12));
        assert_eq!(segment_number("seg_3_12.ts.tmp"), None);
        assert_eq!(segment_number("index.m3u8"), None);
    }

    #[tokio::test]
    async fn renames_become_progress_without_polling() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("ch");
        std::fs::create_dir(&dir).expect("mkdir");
        let (w, d) = HlsWatcher::new(64, Counter::default()).expect("watcher");
        let task = tokio::spawn(d.run());
        let mut rx = w.register(&dir).expect("register");
        std::fs::write(dir.join("seg_1_0.ts.tmp"), b"x").expect("write");
        std::fs::rename(dir.join("seg_1_0.ts.tmp"), dir.join("seg_1_0.ts")).expect("rename");
        std::fs::write(dir.join(".ffmpeg.m3u8.tmp"), b"#EXTM3U").expect("write");
        std::fs::rename(dir.join(".ffmpeg.m3u8.tmp"), dir.join(".ffmpeg.m3u8")).expect("rename");
        let p = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            rx.wait_for(|p| p.ffmpeg_playlist > 0 && p.last_seq == Some(0)),
        )
        .await
        .expect("progress within 5s")
        .expect("sender alive")
        .clone();
        assert_eq!(p.segments, 1);
        w.unregister(&dir);
        w.close();
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("dispatcher ends when the watcher closes")
            .expect("join");
    }
}
