//! The coordinator's Prometheus metrics: one registry per instance (no global recorder), so several
//! coordinators can live in one test process.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    /// Wall time of one leader tick (idle cleanup, reaping, reconciliation), seconds.
    pub tick_duration: Histogram,
    pub ticks: Counter,
    /// Wrong-typed keys met (an operator's mistake): replaced by the leader, or reported.
    pub data_errors: Counter,
    /// Stop commands sent for idle channels.
    pub idle_stops: Counter,
    /// Keys or nodes reaped, by reason (node_dead, no_lease, not_owner, stale_access).
    pub reaps: Family<ReasonLabel, Counter>,
    /// Ticks in which reaping was refused for safety, by reason (many_dead, redis_stale, settling).
    pub reaps_refused: Family<ReasonLabel, Counter>,
    /// Channels of dead nodes sent to another node.
    pub failovers: Counter,
    pub nodes_alive: Gauge,
    pub nodes_dead: Gauge,
    /// 1 while this instance leads.
    pub is_leader: Gauge,
    pub leader_changes: Counter,
    pub redis_errors: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("farm_coordinator");
        let buckets = [
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        let m = Self {
            tick_duration: Histogram::new(buckets),
            ticks: Counter::default(),
            data_errors: Counter::default(),
            idle_stops: Counter::default(),
            reaps: Family::default(),
            reaps_refused: Family::default(),
            failovers: Counter::default(),
            nodes_alive: Gauge::default(),
            nodes_dead: Gauge::default(),
            is_leader: Gauge::default(),
            leader_changes: Counter::default(),
            redis_errors: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "tick_duration_seconds",
            "Wall time of one leader tick",
            m.tick_duration.clone(),
        );
        registry.register("ticks", "Leader ticks run", m.ticks.clone());
        registry.register(
            "data_errors",
            "Wrong-typed keys met: replaced by the leader, or reported",
            m.data_errors.clone(),
        );
        registry.register(
            "idle_stops",
            "Stop commands sent for idle channels",
            m.idle_stops.clone(),
        );
        registry.register("reaps", "Keys and nodes reaped, by reason", m.reaps.clone());
        registry.register(
            "reaps_refused",
            "Ticks in which reaping was refused for safety, by reason",
            m.reaps_refused.clone(),
        );
        registry.register(
            "failovers",
            "Channels of dead nodes re-homed to another node",
            m.failovers.clone(),
        );
        registry.register(
            "nodes_alive",
            "Nodes with a live heartbeat",
            m.nodes_alive.clone(),
        );
        registry.register(
            "nodes_dead",
            "Nodes that look dead and are not reaped yet",
            m.nodes_dead.clone(),
        );
        registry.register(
            "is_leader",
            "1 while this coordinator leads",
            m.is_leader.clone(),
        );
        registry.register(
            "leader_changes",
            "Times this coordinator became leader",
            m.leader_changes.clone(),
        );
        registry.register(
            "redis_errors",
            "Failed or timed-out Redis interactions",
            m.redis_errors.clone(),
        );
        Self { registry, ..m }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
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
