//! The node's Prometheus metrics (prometheus-client; one registry per node, no global recorder, so
//! several nodes can live in one test process).

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    /// Viewer requests by kind (playlist, segment).
    pub requests: Family<KindLabel, Counter>,
    /// Bytes of segments this node served itself (0 when nginx serves every byte).
    pub segment_bytes: Counter,
    /// Redis round trips awaited inside a viewer request on a running channel (stays 0 by design).
    pub request_path_redis_calls: Counter,
    pub ffmpeg_spawns: Counter,
    pub ffmpeg_crashes: Counter,
    pub channel_starts: Counter,
    pub channel_stops: Family<ReasonLabel, Counter>,
    pub streams_running: Gauge,
    pub access_flushes: Counter,
    pub redis_errors: Counter,
    pub notify_overflows: Counter<u64, AtomicU64>,
    pub auth_allowed: Counter,
    pub auth_denied: Counter,
    /// Access-log lines read from nginx (zero-cost mode), counted or refused.
    pub access_log_lines: Counter,
    /// Connections FFmpeg's egress gateways refused, and opened.
    pub egress_refused: Counter,
    pub egress_connections: Counter,
    /// 1 when every FFmpeg runs in the Landlock network sandbox.
    pub ffmpeg_sandbox: Gauge,
    /// Published segments longer (rounded) than their channel's target duration.
    pub segments_over_target: Counter,
    /// Segments published without their timeline recorded in Redis first (Redis slow or away).
    pub publish_unrecorded: Counter,
    /// Playlists answered from Redis for channels another node runs (or ran: held during a failover).
    pub remote_playlists: Counter,
    /// Viewer requests refused before anything else (bad path, token missing or wrong).
    pub playback_refused: Counter,
    /// Guard processes that died and were replaced.
    pub guard_restarts: Counter,
    /// Fences by the guard (the deadline passed), and FFmpegs it killed.
    pub guard_fences: Counter,
    pub guard_kills: Counter,
    /// Limits the egress gateways applied, by kind (head, stall, rate, bandwidth, peer: a fixed set).
    pub egress_limited: Family<KindLabel, Counter>,
    /// 1 when each FFmpeg runs in a cgroup of its own (cpu.max, memory.max).
    pub ffmpeg_cgroups: Gauge,
    /// FFmpegs whose rlimits or cgroup could not be set.
    pub ffmpeg_limit_errors: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("farm_node");
        let m = Self {
            requests: Family::default(),
            segment_bytes: Counter::default(),
            request_path_redis_calls: Counter::default(),
            ffmpeg_spawns: Counter::default(),
            ffmpeg_crashes: Counter::default(),
            channel_starts: Counter::default(),
            channel_stops: Family::default(),
            streams_running: Gauge::default(),
            access_flushes: Counter::default(),
            redis_errors: Counter::default(),
            notify_overflows: Counter::default(),
            auth_allowed: Counter::default(),
            auth_denied: Counter::default(),
            access_log_lines: Counter::default(),
            egress_refused: Counter::default(),
            egress_connections: Counter::default(),
            ffmpeg_sandbox: Gauge::default(),
            segments_over_target: Counter::default(),
            publish_unrecorded: Counter::default(),
            remote_playlists: Counter::default(),
            playback_refused: Counter::default(),
            guard_restarts: Counter::default(),
            guard_fences: Counter::default(),
            guard_kills: Counter::default(),
            egress_limited: Family::default(),
            ffmpeg_cgroups: Gauge::default(),
            ffmpeg_limit_errors: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "Viewer requests by kind", m.requests.clone());
        registry.register(
            "segment_bytes",
            "Segment bytes served by the node itself",
            m.segment_bytes.clone(),
        );
        registry.register(
            "request_path_redis_calls",
            "Redis round trips awaited inside viewer requests on running channels",
            m.request_path_redis_calls.clone(),
        );
        registry.register(
            "ffmpeg_spawns",
            "FFmpeg processes started",
            m.ffmpeg_spawns.clone(),
        );
        registry.register(
            "ffmpeg_crashes",
            "FFmpeg exits and stalls counted as crashes",
            m.ffmpeg_crashes.clone(),
        );
        registry.register(
            "channel_starts",
            "Channels claimed and started",
            m.channel_starts.clone(),
        );
        registry.register(
            "channel_stops",
            "Channels stopped, by reason",
            m.channel_stops.clone(),
        );
        registry.register(
            "streams_running",
            "Channels this node runs",
            m.streams_running.clone(),
        );
        registry.register(
            "access_flushes",
            "Access flushes sent to Redis",
            m.access_flushes.clone(),
        );
        registry.register(
            "redis_errors",
            "Failed or timed-out Redis calls",
            m.redis_errors.clone(),
        );
        registry.register(
            "notify_overflows",
            "File events dropped by the bounded queue",
            m.notify_overflows.clone(),
        );
        registry.register(
            "auth_allowed",
            "nginx auth_request checks allowed",
            m.auth_allowed.clone(),
        );
        registry.register(
            "auth_denied",
            "nginx auth_request checks denied",
            m.auth_denied.clone(),
        );
        registry.register(
            "access_log_lines",
            "nginx access-log lines read (zero-cost mode)",
            m.access_log_lines.clone(),
        );
        registry.register(
            "egress_refused",
            "Connections FFmpeg asked its egress gateway for and was refused",
            m.egress_refused.clone(),
        );
        registry.register(
            "egress_connections",
            "Upstream connections made by the egress gateways",
            m.egress_connections.clone(),
        );
        registry.register(
            "ffmpeg_sandbox",
            "1 when FFmpeg runs in the Landlock network sandbox",
            m.ffmpeg_sandbox.clone(),
        );
        registry.register(
            "segments_over_target",
            "Published segments longer, rounded, than their channel's target duration",
            m.segments_over_target.clone(),
        );
        registry.register(
            "publish_unrecorded",
            "Segments published before their timeline could be recorded in Redis",
            m.publish_unrecorded.clone(),
        );
        registry.register(
            "remote_playlists",
            "Playlists answered from Redis for channels another node runs or ran",
            m.remote_playlists.clone(),
        );
        registry.register(
            "playback_refused",
            "Viewer requests refused for their path or token",
            m.playback_refused.clone(),
        );
        registry.register(
            "guard_restarts",
            "Guard processes that died and were replaced",
            m.guard_restarts.clone(),
        );
        registry.register(
            "guard_fences",
            "Fences by the guard: no lease renewal reached it for 2/3 of the lease TTL",
            m.guard_fences.clone(),
        );
        registry.register(
            "guard_kills",
            "FFmpegs killed by the guard",
            m.guard_kills.clone(),
        );
        registry.register(
            "egress_limited",
            "Limits applied by the egress gateways: head (response head too long), stall (no \
             response head in time), rate (requests answered 429), bandwidth (connections \
             throttled), peer (connections from other processes refused)",
            m.egress_limited.clone(),
        );
        for kind in crate::egress::LimitKind::ALL {
            // Every kind shows (at 0) before the first one happens.
            let _ = m.egress_limited.get_or_create(&KindLabel {
                kind: kind.as_str().into(),
            });
        }
        registry.register(
            "ffmpeg_cgroups",
            "1 when each FFmpeg runs in a cgroup of its own with cpu.max and memory.max",
            m.ffmpeg_cgroups.clone(),
        );
        registry.register(
            "ffmpeg_limit_errors",
            "FFmpegs whose rlimits or cgroup could not be set",
            m.ffmpeg_limit_errors.clone(),
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

    pub fn stopped(&self, reason: &str) {
        self.channel_stops
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
