//! `farm-bench`: every performance goal of the farm measured side by side with its anchor, in one run.
//!
//! The benchmark starts everything it measures (redis-server, nginx, farm-node, farm-coordinator, the
//! fake IPTV provider, real and fake FFmpeg) on 127.0.0.1 in temp dirs, and stops it again. It runs in
//! phases, one at a time so they do not share the machine:
//!
//! | phase | figures |
//! |---|---|
//! | [`rps`] | `segment_rps_ratio`, `playlist_rps_ratio` (node / plain nginx at its best), `template_segment_rps_ratio`, `template_playlist_rps_ratio` (shipped template / plain nginx at its best), `auth_segment_rps_ratio`, `redis_cmds_per_1k_requests`, `request_path_redis_rtt` |
//! | [`tick`] | `tick_ms_100k`, `tick_ratio_100k_1k` |
//! | [`ttfp`] | `ttfp_overhead_ms_p50`, `ttfp_overhead_ms_p99`, `ttfp_ts_over_hls_time` |
//! | [`scale`] | `node_cpu_per_stream_pct` (farm-node + guard, gateways relaying real bytes), `guard_cpu_per_stream_pct`, `node_rss_per_stream_kb`, `guard_rss_per_stream_kb` |
//! | [`failover`] | `failover_s_p50`, `failover_s_p99` |
//! | [`viewer`] | `viewer_freeze_s_p50`, `viewer_freeze_s_p99` (hls.js in headless Chromium through nginx, `kill -9` of the owner) |
//! | [`abuse`] | `burst_worst_gap_s`, `import_redis_max_latency_ms` (runs at least [`ABUSE_PHASE_LIMIT`]) |
//!
//! Invariants: A and B of a comparison are measured in the same run, interleaved (ABBA rounds), with
//! the same load generator ([`load`]); a figure that cannot be measured is `null` with the reason,
//! never a guess; a goal that is not met is reported as such. A phase that fails (or panics: the
//! harness fixtures panic on setup failures) is recorded with its error and the others still run;
//! every fixture is dropped at the end of its phase, so nothing it started outlives it.

pub mod abuse;
pub mod failover;
pub mod killfarm;
pub mod load;
pub mod nginx;
pub mod phase;
pub mod report;
pub mod rps;
pub mod scale;
pub mod sys;
pub mod tick;
pub mod ttfp;
pub mod util;
pub mod viewer;

pub use phase::{default_out, run, Options, Phase, Settings, ABUSE_PHASE_LIMIT};

#[cfg(test)]
mod tests {
    use crate::phase::Phase;
    use crate::util::metric_sum;

    #[test]
    fn phases_parse_by_name() {
        assert_eq!(Phase::parse("rps"), Ok(Phase::Rps));
        assert_eq!(Phase::parse(" failover"), Ok(Phase::Failover));
        assert!(Phase::parse("nope").is_err_and(|e| e.contains("rps, tick")));
    }

    #[test]
    fn metric_sums_cover_labels() {
        let text = "# TYPE x counter\nfarm_node_requests_total{kind=\"playlist\"} 3\nfarm_node_requests_total{kind=\"segment\"} 4\nfarm_node_requests_total_other 9\n";
        assert_eq!(metric_sum(text, "farm_node_requests_total"), Some(7.0));
        assert_eq!(metric_sum(text, "farm_node_missing"), None);
    }
}
