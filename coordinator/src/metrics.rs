//! The coordinator's Prometheus metrics: one registry per instance (no global recorder), so several
//! coordinators can live in one test process.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Buckets of `tick_duration_seconds`, seconds.
const TICK_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

farm_runtime::metrics! {
    pub struct Metrics, prefix "farm_coordinator" {
        /// Wall time of one leader tick (idle cleanup, reaping, reconciliation), seconds.
        pub tick_duration: Histogram = Histogram::new(TICK_BUCKETS) => (
            "tick_duration_seconds",
            "Wall time of one leader tick",
        ),
        pub ticks: Counter => (
            "ticks",
            "Leader ticks run",
        ),
        /// Wrong-typed keys met (an operator's mistake): replaced by the leader, or reported.
        pub data_errors: Counter => (
            "data_errors",
            "Wrong-typed keys met: replaced by the leader, or reported",
        ),
        /// Stop commands sent for idle channels.
        pub idle_stops: Counter => (
            "idle_stops",
            "Stop commands sent for idle channels",
        ),
        /// Keys or nodes reaped, by reason (node_dead, no_lease, not_owner, stale_access).
        pub reaps: Family<ReasonLabel, Counter> => (
            "reaps",
            "Keys and nodes reaped, by reason",
        ),
        /// Ticks in which reaping was refused for safety, by reason (many_dead, redis_stale, settling).
        pub reaps_refused: Family<ReasonLabel, Counter> => (
            "reaps_refused",
            "Ticks in which reaping was refused for safety, by reason",
        ),
        /// Channels of dead nodes sent to another node.
        pub failovers: Counter => (
            "failovers",
            "Channels of dead nodes re-homed to another node",
        ),
        pub nodes_alive: Gauge => (
            "nodes_alive",
            "Nodes with a live heartbeat",
        ),
        pub nodes_dead: Gauge => (
            "nodes_dead",
            "Nodes that look dead and are not reaped yet",
        ),
        /// 1 while this instance leads.
        pub is_leader: Gauge => (
            "is_leader",
            "1 while this coordinator leads",
        ),
        pub leader_changes: Counter => (
            "leader_changes",
            "Times this coordinator became leader",
        ),
        pub redis_errors: Counter => (
            "redis_errors",
            "Failed or timed-out Redis interactions",
        ),
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::registered()
    }

    pub fn reaped(&self, reason: &str, n: u64) {
        if n > 0 {
            self.reaps
                .get_or_create(&ReasonLabel {
                    reason: reason.to_string(),
                })
                .inc_by(n);
        }
    }

    pub fn refused(&self, reason: &str) {
        self.reaps_refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_promised_series() {
        let m = Metrics::new();
        m.tick_duration.observe(0.002);
        m.idle_stops.inc();
        m.reaped("node_dead", 2);
        m.is_leader.set(1);
        let text = m.render();
        for name in [
            "farm_coordinator_tick_duration_seconds_bucket",
            "farm_coordinator_idle_stops_total 1",
            "farm_coordinator_reaps_total{reason=\"node_dead\"} 2",
            "farm_coordinator_nodes_alive 0",
            "farm_coordinator_is_leader 1",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }
}
