//! Viewer access: flushed to Redis for the coordinator's idle decisions.

use super::*;
use std::sync::Arc;
use tracing::warn;

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
