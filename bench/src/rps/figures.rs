//! The rps phase's figures: the five comparisons' ratios, Redis commands per viewer request and the
//! node's request-path Redis calls.

use std::collections::{BTreeMap, HashMap};

use serde_json::json;

use super::{Cmp, Rounds, Side};
use crate::phase::Settings;
use crate::report::{num, Figure, Goal, PhaseOutput};

/// One comparison's figure: what A and B are, and the goal of A / B.
struct Comparison {
    cmp: Cmp,
    figure: &'static str,
    goal: Goal,
    a_is: &'static str,
    b_is: &'static str,
}

const COMPARISONS: [Comparison; 5] = [
    Comparison {
        cmp: Cmp::Segment,
        figure: "segment_rps_ratio",
        goal: Goal::AtLeast(1.0),
        a_is: "node",
        b_is: "plain nginx at its best",
    },
    Comparison {
        cmp: Cmp::Playlist,
        figure: "playlist_rps_ratio",
        goal: Goal::AtLeast(0.5),
        a_is: "node",
        b_is: "plain nginx at its best",
    },
    Comparison {
        cmp: Cmp::TemplateSegment,
        figure: "template_segment_rps_ratio",
        goal: Goal::Context,
        a_is: "shipped template (auth_request)",
        b_is: "plain nginx at its best",
    },
    Comparison {
        cmp: Cmp::TemplatePlaylist,
        figure: "template_playlist_rps_ratio",
        goal: Goal::Context,
        a_is: "shipped template (auth_request)",
        b_is: "plain nginx at its best",
    },
    Comparison {
        cmp: Cmp::AuthSegment,
        figure: "auth_segment_rps_ratio",
        goal: Goal::AtLeast(0.7),
        a_is: "template with auth_request",
        b_is: "template without auth_request",
    },
];

/// Each comparison's sides under its name, and its ratio figure; `no_nginx`: why nginx is missing.
pub(super) fn report_comparisons(
    out: &mut PhaseOutput,
    s: &Settings,
    sides: &BTreeMap<(&'static str, char), Side>,
    no_nginx: Option<&String>,
) {
    let shape = format!(
        "{} conns, {} ABBA rounds x {:.1} s per side",
        s.connections,
        s.rounds,
        s.round.as_secs_f64()
    );
    for c in &COMPARISONS {
        let a = sides.get(&(c.cmp.name(), 'A')).cloned().unwrap_or_default();
        let b = sides.get(&(c.cmp.name(), 'B')).cloned().unwrap_or_default();
        out.set(
            c.cmp.name(),
            json!({ "a": a.json(), "b": b.json(), "a_is": c.a_is, "b_is": c.b_is }),
        );
        out.fig(comparison_figure(c, &a, &b, no_nginx, &shape));
    }
}

fn comparison_figure(
    c: &Comparison,
    a: &Side,
    b: &Side,
    no_nginx: Option<&String>,
    shape: &str,
) -> Figure {
    let (what_a, what_b) = (c.a_is, c.b_is);
    let node_share = if matches!(
        c.cmp,
        Cmp::AuthSegment | Cmp::TemplateSegment | Cmp::TemplatePlaylist
    ) {
        format!(", node's /auth {} us of it", num(a.per_request(a.node_cpu)))
    } else {
        String::new()
    };
    let node_meanwhile = if no_nginx.is_none() {
        format!(
            "; the node meanwhile {} us per nginx request",
            num(b.per_request(b.node_cpu))
        )
    } else {
        String::new()
    };
    let mut f = Figure::new(c.figure, "ratio", c.goal).detail(format!(
        "{what_a} {} rps ({} us server CPU/req{node_share}) vs {what_b} {} rps ({} us{node_meanwhile}); load generator {} / {} us/req; {shape}",
        num(a.rps()),
        num(a.cpu_us_per_request()),
        num(b.rps()),
        num(b.cpu_us_per_request()),
        num(a.per_request(a.client_cpu)),
        num(b.per_request(b.client_cpu)),
    ));
    if let Some(e) = no_nginx {
        f = f.note(format!("no nginx to compare with: {e}"));
    } else if a.errors + b.errors > 0 || a.requests == 0 || b.requests == 0 {
        f = f.note(format!(
            "errors A {} B {} (last: {:?} / {:?})",
            a.errors, b.errors, a.last_error, b.last_error
        ));
    }
    if b.rps() > 0.0 && a.requests > 0 {
        f = f.value(a.rps() / b.rps());
    }
    f
}

/// Redis commands per 1,000 viewer requests (every A request reached the node); returns how many
/// viewer requests were monitored.
pub(super) fn report_redis(
    out: &mut PhaseOutput,
    rounds: &Rounds,
    stats_before: &HashMap<String, u64>,
    stats_after: &HashMap<String, u64>,
) -> u64 {
    let redis_cmds = &rounds.redis_cmds;
    let a_responses: u64 = rounds
        .sides
        .iter()
        .filter(|((_, side), _)| *side == 'A')
        .map(|(_, v)| v.all_responses)
        .sum();
    let cmds: u64 = redis_cmds.values().sum();
    let stat_delta: BTreeMap<String, u64> = stats_after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.saturating_sub(*stats_before.get(k).unwrap_or(&0)),
            )
        })
        .filter(|(_, v)| *v > 0)
        .collect();
    out.set(
        "redis",
        json!({
            "viewer_requests_monitored": a_responses,
            "client_commands": redis_cmds,
            "commandstats_delta_whole_phase_including_lua_and_bench": stat_delta,
        }),
    );
    let mut f = Figure::new("redis_cmds_per_1k_requests", "", Goal::AtMost(5.0)).detail(format!(
        "{cmds} commands sent by clients (MONITOR, script-internal ones excluded) during {a_responses} viewer requests to the node, {}",
        redis_cmds
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if a_responses > 0 {
        f = f.value(cmds as f64 * 1000.0 / a_responses as f64);
    }
    out.fig(f);
    a_responses
}

/// The node's request-path Redis calls over the rounds: none is the goal.
pub(super) fn request_path_figure(
    before: Option<f64>,
    after: Option<f64>,
    a_responses: u64,
) -> Figure {
    match (before, after) {
        (Some(b), Some(a)) => Figure::new("request_path_redis_rtt", "", Goal::AtMost(0.0))
            .value(a - b)
            .detail(format!(
                "farm_node_request_path_redis_calls_total delta over {a_responses} viewer requests (total since start {a})"
            )),
        _ => Figure::missing(
            "request_path_redis_rtt",
            "",
            Goal::AtMost(0.0),
            "the node exports no farm_node_request_path_redis_calls_total".into(),
        ),
    }
}
