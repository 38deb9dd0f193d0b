//! In-memory copies of what viewers ask for most: each channel's newest segments (the playlist is
//! composed in memory by [`crate::playlist`]). Segments are immutable once renamed into place, so a
//! copy never goes stale. Copies are filled on the first request, dropped as segments leave the
//! window, and bounded by one node-wide budget (past it, files are served from disk uncached).

use bytes::Bytes;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The node-wide byte budget of all copies.
#[derive(Debug)]
pub struct Budget {
    used: AtomicU64,
    max: u64,
}

impl Budget {
    pub fn new(max: u64) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicU64::new(0),
            max,
        })
    }

    fn take(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= self.max).then_some(u + n)
            })
            .is_ok()
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// One channel's copies.
pub struct HotFiles {
    budget: Arc<Budget>,
    /// Segments older than the newest minus this are dropped.
    window: u64,
    segments: Mutex<BTreeMap<u64, Bytes>>,
}

impl HotFiles {
    pub fn new(budget: Arc<Budget>, window: u64) -> Self {
        Self {
            budget,
            window,
            segments: Mutex::new(BTreeMap::new()),
        }
    }

    /// Segment `seq` (file `path`); `newest` is the newest finished segment, for the window.
    pub async fn segment(
        &self,
        path: &Path,
        seq: u64,
        newest: Option<u64>,
    ) -> std::io::Result<Bytes> {
        if let Some(b) = self.lock_segments().get(&seq) {
            return Ok(b.clone());
        }
        let b = Bytes::from(tokio::fs::read(path).await?);
        let mut segs = self.lock_segments();
        if let Some(newest) = newest {
            let floor = newest.saturating_sub(self.window);
            let old: Vec<u64> = segs.range(..floor).map(|(k, _)| *k).collect();
            for k in old {
                if let Some(v) = segs.remove(&k) {
                    self.budget.give(v.len() as u64);
                }
            }
            if seq >= floor && !segs.contains_key(&seq) && self.budget.take(b.len() as u64) {
                segs.insert(seq, b.clone());
            }
        }
        Ok(b)
    }

    fn lock_segments(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Bytes>> {
        self.segments.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for HotFiles {
    fn drop(&mut self) {
        let segs = self.segments.get_mut().unwrap_or_else(|p| p.into_inner());
        let n: u64 = segs.values().map(|b| b.len() as u64).sum();
        self.budget.give(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn copies_are_bounded_windowed_and_returned_to_the_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..6u64 {
            std::fs::write(dir.path().join(format!("seg_{i}.ts")), vec![i as u8; 100])
                .expect("write");
        }
        let budget = Budget::new(250);
        let hot = HotFiles::new(budget.clone(), 3);
        for i in 0..3u64 {
            let b = hot
                .segment(&dir.path().join(format!("seg_{i}.ts")), i, Some(2))
                .await
                .expect("read");
            assert_eq!(b.len(), 100);
        }
        assert_eq!(budget.used(), 200, "the third copy does not fit the budget");
        // A newer segment moves the window: 0 and 1 leave, their bytes return.
        std::fs::remove_file(dir.path().join("seg_1.ts")).expect("rm");
        hot.segment(&dir.path().join("seg_5.ts"), 5, Some(5))
            .await
            .expect("read");
        assert_eq!(budget.used(), 100);
        assert!(
            hot.segment(&dir.path().join("seg_1.ts"), 1, Some(5))
                .await
                .is_err(),
            "gone from disk and cache"
        );
        drop(hot);
        assert_eq!(budget.used(), 0);
    }
}
