//! What the coordinator's tasks share: the configuration, the key names, the Redis store, the
//! metrics, and this process's view of its leadership ([`Leadership`]).
//!
//! Invariant: the leadership view is written only by the `leader` task (campaign, resign) and by a
//! tick whose fenced write found another leader; everyone else reads snapshots.

use crate::config::Config;
use crate::error::CoordinatorError;
use crate::metrics::Metrics;
use crate::store::Store;
use farm_proto::Keys;
use std::sync::Mutex;
use std::time::Instant;

/// This coordinator's view of its leadership.
#[derive(Debug, Clone, Default)]
pub struct Leadership {
    /// `<id>:<epoch>` while this coordinator holds the lease.
    pub held: Option<String>,
    pub epoch: u64,
    /// Leading is trusted until then.
    pub valid_until: Option<Instant>,
    /// When this term began (reaping waits `reap_settle` after it).
    pub since: Option<Instant>,
    /// The leader value another coordinator holds, as last seen.
    pub other: Option<String>,
}

impl Leadership {
    /// The held value when this coordinator may act now.
    pub fn leading(&self, now: Instant) -> Option<&str> {
        match (&self.held, self.valid_until) {
            (Some(v), Some(until)) if now < until => Some(v),
            _ => None,
        }
    }
}

/// What the coordinator's tasks share.
pub struct Shared {
    pub cfg: Config,
    pub keys: Keys,
    pub store: Store,
    pub metrics: Metrics,
    leadership: Mutex<Leadership>,
}

impl Shared {
    pub fn new(cfg: Config) -> Result<Self, CoordinatorError> {
        cfg.check()?;
        let store = Store::new(&cfg.redis_url, cfg.redis_timeout, cfg.stall_threshold())?;
        Ok(Self {
            keys: Keys::new(cfg.prefix.clone()),
            store,
            metrics: Metrics::new(),
            leadership: Mutex::new(Leadership::default()),
            cfg,
        })
    }

    /// A snapshot of this coordinator's leadership.
    pub fn leadership(&self) -> Leadership {
        self.leadership
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn update_leadership(&self, f: impl FnOnce(&mut Leadership)) {
        f(&mut self.leadership.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Stops trusting the leadership at once (a fenced write found another leader).
    pub(crate) fn lost_leadership(&self) {
        self.update_leadership(|l| l.valid_until = None);
        self.metrics.is_leader.set(0);
    }
}
