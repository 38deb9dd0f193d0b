//! Start-up sweep: what an earlier incarnation of this node left behind (after SIGKILL, a panic or
//! a power cut) is killed and removed before the node takes new work.
//!
//! An FFmpeg is killed only when its pid, its kernel start time and its marker (the channel folder
//! in its environment) all match a record: from the folder's `.ffmpeg.pid` or from the stream hash in
//! Redis. A pid that was reused by an unrelated process fails the start-time or marker check and is
//! left alone.

use crate::ffmpeg;
use crate::store::Store;
use std::path::Path;
use std::time::{Duration, Instant};
use tracing::{info, warn};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    pub killed: u32,
    pub folders_removed: u32,
    pub leases_released: u32,
}

/// Kills recorded leftovers and removes every channel folder under HLS_ROOT.
pub fn sweep_disk(root: &Path) -> SweepReport {
    let mut report = SweepReport::default();
    let Ok(rd) = std::fs::read_dir(root) else {
        return report;
    };
    for e in rd.flatten() {
        let path = e.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if farm_proto::validate::channel_id(name).is_err() || !path.is_dir() {
            continue;
        }
        if let Some((pid, start)) = ffmpeg::read_owner_file(&path) {
            if ffmpeg::kill_if_ours(pid, start, &path) {
                wait_gone(pid);
                report.killed += 1;
                info!(pid, dir = %path.display(), "killed ffmpeg left by an earlier incarnation");
            }
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => report.folders_removed += 1,
            Err(err) => {
                warn!(dir = %path.display(), error = %err, "could not remove leftover folder")
            }
        }
    }
    report
}

/// Kills FFmpegs recorded in Redis for this node and releases what still names it.
pub async fn sweep_redis(
    store: &Store,
    node: &str,
    root: &Path,
) -> Result<SweepReport, crate::store::StoreError> {
    let mut report = SweepReport::default();
    for (id, h) in store.leftovers(node).await? {
        if h.node.as_deref() == Some(node) {
            if let (Some(pid), Some(start)) = (h.pid, h.pid_start) {
                let dir = ffmpeg::channel_dir(root, &id);
                if ffmpeg::kill_if_ours(pid, start, &dir) {
                    wait_gone(pid);
                    report.killed += 1;
                    info!(pid, channel = %id, "killed ffmpeg recorded in redis by an earlier incarnation");
                }
            }
        }
        if store.release_node_channel(node, &id).await? {
            report.leases_released += 1;
        }
    }
    // Weights of channels an earlier incarnation ran; this one runs nothing yet.
    store.clear_load(node).await?;
    Ok(report)
}

/// After SIGKILL, waits (bounded) until the process is gone or a zombie awaiting its reaper.
fn wait_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(s) => {
                let state = s
                    .rfind(')')
                    .and_then(|i| s[i + 1..].split_whitespace().next().map(str::to_string));
                if matches!(state.as_deref(), Some("Z" | "X")) {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    warn!(pid, "leftover ffmpeg still present 2s after SIGKILL");
}
