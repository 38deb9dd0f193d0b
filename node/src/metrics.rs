//! The node's Prometheus metrics (prometheus-client; one registry per node, no global recorder, so
//! several nodes can live in one test process), and the request-path scope that counts every Redis
//! call a viewer request makes ([`viewer_request`], [`redis_call`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

farm_runtime::metrics! {
    pub struct Metrics, prefix "farm_node" {
        /// Viewer requests by kind (playlist, segment).
        pub requests: Family<KindLabel, Counter> => (
            "requests",
            "Viewer requests by kind",
        ),
        /// Bytes of segments this node served itself (0 when nginx serves every byte).
        pub segment_bytes: Counter => (
            "segment_bytes",
            "Segment bytes served by the node itself",
        ),
        /// Redis calls made while answering viewer requests (routing, remote playlists, and the
        /// preflight of a start a viewer caused): 0 for a channel this node runs.
        pub request_path_redis_calls: Counter => (
            "request_path_redis_calls",
            "Redis calls made while answering viewer requests (and the preflight of the starts they caused)",
        ),
        pub ffmpeg_spawns: Counter => (
            "ffmpeg_spawns",
            "FFmpeg processes started",
        ),
        pub ffmpeg_crashes: Counter => (
            "ffmpeg_crashes",
            "FFmpeg exits and stalls counted as crashes",
        ),
        pub channel_starts: Counter => (
            "channel_starts",
            "Channels claimed and started",
        ),
        pub channel_stops: Family<ReasonLabel, Counter> => (
            "channel_stops",
            "Channels stopped, by reason",
        ),
        pub streams_running: Gauge => (
            "streams_running",
            "Channels this node runs",
        ),
        pub access_flushes: Counter => (
            "access_flushes",
            "Access flushes sent to Redis",
        ),
        pub redis_errors: Counter => (
            "redis_errors",
            "Failed or timed-out Redis calls",
        ),
        pub notify_overflows: Counter<u64, AtomicU64> => (
            "notify_overflows",
            "File events dropped by the bounded queue",
        ),
        pub auth_allowed: Counter => (
            "auth_allowed",
            "nginx auth_request checks allowed",
        ),
        pub auth_denied: Counter => (
            "auth_denied",
            "nginx auth_request checks denied",
        ),
        /// Access-log lines read from nginx (zero-cost mode), counted or refused.
        pub access_log_lines: Counter => (
            "access_log_lines",
            "nginx access-log lines read (zero-cost mode)",
        ),
        /// Connections FFmpeg's egress gateways refused, and opened.
        pub egress_refused: Counter => (
            "egress_refused",
            "Connections FFmpeg asked its egress gateway for and was refused",
        ),
        pub egress_connections: Counter => (
            "egress_connections",
            "Upstream connections made by the egress gateways",
        ),
        /// 1 when every FFmpeg runs in the Landlock network sandbox.
        pub ffmpeg_sandbox: Gauge => (
            "ffmpeg_sandbox",
            "1 when FFmpeg runs in the Landlock network sandbox",
        ),
        /// Published segments longer (rounded) than their channel's target duration.
        pub segments_over_target: Counter => (
            "segments_over_target",
            "Published segments longer, rounded, than their channel's target duration",
        ),
        /// Segments published without their timeline recorded in Redis first (Redis slow or away).
        pub publish_unrecorded: Counter => (
            "publish_unrecorded",
            "Segments published before their timeline could be recorded in Redis",
        ),
        /// Playlists answered from Redis for channels another node runs (or ran: held during a failover).
        pub remote_playlists: Counter => (
            "remote_playlists",
            "Playlists answered from Redis for channels another node runs or ran",
        ),
        /// Viewer requests refused before anything else (bad path, token missing or wrong).
        pub playback_refused: Counter => (
            "playback_refused",
            "Viewer requests refused for their path or token",
        ),
        /// Guard processes that died and were replaced.
        pub guard_restarts: Counter => (
            "guard_restarts",
            "Guard processes that died and were replaced",
        ),
        /// Fences by the guard (the deadline passed), and FFmpegs it killed.
        pub guard_fences: Counter => (
            "guard_fences",
            "Fences by the guard: no lease renewal reached it for 2/3 of the lease TTL",
        ),
        pub guard_kills: Counter => (
            "guard_kills",
            "FFmpegs killed by the guard",
        ),
        /// Keys Redis held with the wrong type (an operator's mistake): replaced, or the one channel
        /// whose key it is fenced.
        pub data_errors: Counter => (
            "data_errors",
            "Wrong-typed Redis keys met: replaced, or only their channel fenced",
        ),
        /// HTTP connections open now, the cap on them, and what happened to the others.
        pub http_connections: Gauge => (
            "http_connections",
            "HTTP connections open",
        ),
        pub http_connection_limit: Gauge => (
            "http_connection_limit",
            "HTTP connections the node keeps open at most",
        ),
        pub http_connections_accepted: Counter => (
            "http_connections_accepted",
            "HTTP connections accepted",
        ),
        /// Refused at accept, by reason (`limit`, `per_address`).
        pub http_connections_refused: Family<ReasonLabel, Counter> => (
            "http_connections_refused",
            "HTTP connections refused at accept, by reason (limit, per_address)",
        ),
        /// Closed to make room for a new one (idle, or never completed a request).
        pub http_connections_evicted: Counter => (
            "http_connections_evicted",
            "HTTP connections closed to make room for new ones",
        ),
        /// Closed for a timeout, by kind (`header`, `idle`).
        pub http_connections_timed_out: Family<KindLabel, Counter> => (
            "http_connections_timed_out",
            "HTTP connections closed for a timeout, by kind (header, idle)",
        ),
        /// accept() failures of the listener itself (EMFILE, ENFILE, ENOBUFS...; not a peer's reset).
        pub http_accept_errors: Counter => (
            "http_accept_errors",
            "Failed accept() calls (EMFILE, ENFILE, ...)",
        ),
        /// Requests that would start a channel refused by the per-client rate limit (429).
        pub first_requests_limited: Counter => (
            "first_requests_limited",
            "Requests that would start a channel refused by the per-client rate limit",
        ),
        /// Requests for channel ids the catalog did not know, answered from memory.
        pub unknown_channel_hits: Counter => (
            "unknown_channel_hits",
            "Requests for channel ids the catalog did not know, answered from memory",
        ),
        /// Channel starts that waited for a start slot longer than start_timeout (503).
        pub start_slot_timeouts: Counter => (
            "start_slot_timeouts",
            "Channel starts refused after waiting start_timeout for a start slot",
        ),
        /// Admin requests with a missing or wrong token, and those refused while their address waits.
        pub admin_auth_failures: Counter => (
            "admin_auth_failures",
            "Admin requests with a missing or wrong bearer token",
        ),
        pub admin_auth_throttled: Counter => (
            "admin_auth_throttled",
            "Admin requests refused while their address waits after wrong tokens",
        ),
        /// Times free memory was handed back to the system (`memory::release`).
        pub memory_releases: Counter => (
            "memory_releases",
            "Times free memory was handed back to the system after a burst",
        ),
        /// Limits the egress gateways applied, by kind (head, stall, rate, bandwidth, peer: a fixed set).
        pub egress_limited: Family<KindLabel, Counter> => (
            "egress_limited",
            "Limits applied by the egress gateways: head (response head too long), stall (no \
             response head in time), rate (requests answered 429), bandwidth (connections \
             throttled), peer (connections from other processes refused)",
        ),
        /// 1 when each FFmpeg runs in a cgroup of its own (cpu.max, memory.max).
        pub ffmpeg_cgroups: Gauge => (
            "ffmpeg_cgroups",
            "1 when each FFmpeg runs in a cgroup of its own with cpu.max and memory.max",
        ),
        /// FFmpegs whose rlimits or cgroup could not be set.
        pub ffmpeg_limit_errors: Counter => (
            "ffmpeg_limit_errors",
            "FFmpegs whose rlimits or cgroup could not be set",
        ),
    }
}

/// The `reason` label values of `farm_node_channel_stops`: a fixed set, so that a reason taken
/// from a command can neither grow the metric without bound nor forge a line of the exposition.
pub const STOP_REASONS: &[&str] = &[
    "ops",
    "idle",
    "shutdown",
    "drain",
    "drained",
    "guard_lost",
    "fenced",
    "failed",
    "pinned",
    "stale_access",
    "node_dead",
];

/// `reason` if it is one of [`STOP_REASONS`], else `other`.
pub fn stop_reason_label(reason: &str) -> &'static str {
    STOP_REASONS
        .iter()
        .find(|r| **r == reason)
        .copied()
        .unwrap_or("other")
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self::registered();
        for kind in crate::egress::LimitKind::ALL {
            // Every kind shows (at 0) before the first one happens.
            let _ = m.egress_limited.get_or_create(&KindLabel {
                kind: kind.as_str().into(),
            });
        }
        m
    }

    /// Counts a channel stop; `reason` is mapped to [`STOP_REASONS`] (`other` for the rest).
    pub fn stopped(&self, reason: &str) {
        self.channel_stops
            .get_or_create(&ReasonLabel {
                reason: stop_reason_label(reason).to_string(),
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

tokio::task_local! {
    /// Set while a viewer request is answered, and in the channel actor of a start that request
    /// caused until its preflight is done: where the Redis calls made meanwhile are counted.
    static REQUEST_PATH: RequestPath;
}

/// A request-path scope (see [`viewer_request`]).
#[derive(Clone)]
pub struct RequestPath {
    counter: Option<Counter>,
    active: Arc<AtomicBool>,
}

/// Runs `f` as a viewer request: every Redis call made in it (see [`redis_call`]), and in the
/// preflight of a channel start it causes, counts in `request_path_redis_calls`.
pub async fn viewer_request<F: Future>(metrics: &Metrics, f: F) -> F::Output {
    let scope = RequestPath {
        counter: Some(metrics.request_path_redis_calls.clone()),
        active: Arc::new(AtomicBool::new(true)),
    };
    REQUEST_PATH.scope(scope, f).await
}

/// One Redis call (the store calls it for every round trip): counted when a viewer request is
/// waiting on it.
pub fn redis_call() {
    let _ = REQUEST_PATH.try_with(|r| {
        if let (Some(c), true) = (&r.counter, r.active.load(Ordering::Acquire)) {
            c.inc();
        }
    });
}

/// Ends the request-path part of a task started by [`CarryRequestPath::carry_request_path`]: its
/// later Redis calls are its own (a channel's life after its claim), not a viewer's.
pub fn request_path_done() {
    let _ = REQUEST_PATH.try_with(|r| r.active.store(false, Ordering::Release));
}

/// For a task spawned while a viewer request is answered (a channel start): its Redis calls count
/// for that request until the task calls [`request_path_done`].
pub trait CarryRequestPath: Future + Sized {
    /// Captures the caller's request scope now (call it where the task is spawned).
    fn carry_request_path(self) -> tokio::task::futures::TaskLocalFuture<RequestPath, Self>;
}

impl<F: Future> CarryRequestPath for F {
    fn carry_request_path(self) -> tokio::task::futures::TaskLocalFuture<RequestPath, Self> {
        let counter = REQUEST_PATH
            .try_with(|r| {
                r.active
                    .load(Ordering::Acquire)
                    .then(|| r.counter.clone())
                    .flatten()
            })
            .ok()
            .flatten();
        let scope = RequestPath {
            active: Arc::new(AtomicBool::new(counter.is_some())),
            counter,
        };
        REQUEST_PATH.scope(scope, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_reason_cannot_forge_a_metric() {
        let m = Metrics::new();
        m.stopped("idle");
        m.stopped("x\"} 1\nfarm_node_forged_total 9\n# EOF\n");
        m.stopped(&"y".repeat(10_000));
        let text = m.render();
        for want in [
            "farm_node_channel_stops_total{reason=\"idle\"} 1",
            "farm_node_channel_stops_total{reason=\"other\"} 2",
        ] {
            assert!(text.contains(want), "{text}");
        }
        assert!(!text.contains("forged"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    }

    #[tokio::test]
    async fn redis_calls_count_inside_viewer_requests_and_the_preflight_they_cause() {
        let m = Metrics::new();
        redis_call();
        assert_eq!(m.request_path_redis_calls.get(), 0, "outside any request");
        viewer_request(&m, async { redis_call() }).await;
        assert_eq!(m.request_path_redis_calls.get(), 1);
        // A task the request spawns counts until its preflight is done.
        viewer_request(&m, async {
            tokio::spawn(
                async {
                    redis_call();
                    request_path_done();
                    redis_call();
                }
                .carry_request_path(),
            )
            .await
            .expect("task");
        })
        .await;
        assert_eq!(m.request_path_redis_calls.get(), 2);
        // A task spawned outside any request never counts.
        tokio::spawn(async { redis_call() }.carry_request_path())
            .await
            .expect("task");
        assert_eq!(m.request_path_redis_calls.get(), 2);
    }
}
