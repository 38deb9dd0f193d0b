//! The scale phase's viewers: one player-like viewer per stream, counting its requests and errors.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ScaleFarm;
use crate::util::get;
use farm_tests::hls::MediaPlaylist;

/// One player-like viewer per stream, spread over one reload interval.
pub(super) struct Viewers {
    stop: Arc<AtomicBool>,
    pub(super) requests: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    tasks: tokio::task::JoinSet<()>,
    /// When the first viewer started.
    pub(super) since: Instant,
}

impl Viewers {
    pub(super) fn start(farm: &ScaleFarm) -> Viewers {
        let n = farm.channels.len();
        let mut viewers = Viewers {
            stop: Arc::new(AtomicBool::new(false)),
            requests: Arc::new(AtomicU64::new(0)),
            errors: Arc::new(AtomicU64::new(0)),
            tasks: tokio::task::JoinSet::new(),
            since: Instant::now(),
        };
        for (i, (id, _)) in farm.channels.iter().enumerate() {
            let v = Viewer {
                client: farm.client.clone(),
                base: format!("{}/live/{id}", farm.base),
                stop: viewers.stop.clone(),
                requests: viewers.requests.clone(),
                errors: viewers.errors.clone(),
                // Spread over one reload interval.
                offset: Duration::from_millis((i as u64 * 2000) / n.max(1) as u64),
            };
            viewers.tasks.spawn(v.run());
        }
        viewers
    }

    /// Stops every viewer and waits for them; returns the viewers' errors.
    pub(super) async fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
        self.errors.load(Ordering::Relaxed)
    }
}

/// A player: reloads the playlist every 2 s and downloads each new segment once.
struct Viewer {
    client: reqwest::Client,
    base: String,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    offset: Duration,
}

impl Viewer {
    async fn run(self) {
        crate::util::pause(self.offset).await;
        let mut interval = tokio::time::interval(Duration::from_secs(2));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_seq: Option<u64> = None;
        while !self.stop.load(Ordering::Relaxed) {
            interval.tick().await;
            let pl = match self.fetch("index.m3u8").await {
                Some(body) => MediaPlaylist::parse(&String::from_utf8_lossy(&body)).ok(),
                None => None,
            };
            let Some(pl) = pl else {
                continue;
            };
            for seg in &pl.segments {
                if next_seq.is_some_and(|n| seg.sequence < n) {
                    continue;
                }
                // A new viewer starts at the live edge.
                if next_seq.is_none() && Some(seg.sequence) != pl.last_sequence() {
                    continue;
                }
                if self.fetch(&seg.uri).await.is_none() {
                    break;
                }
                next_seq = Some(seg.sequence + 1);
            }
        }
    }

    async fn fetch(&self, file: &str) -> Option<Vec<u8>> {
        let r = get(&self.client, &format!("{}/{file}", self.base)).await;
        self.requests.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok((200, body)) => Some(body),
            _ => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}
