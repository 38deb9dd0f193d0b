//! `farmctl events`: the audit trail in `farm:events`, oldest first, optionally followed live.

use super::ctx::Ctx;
use super::error::CtlError;
use super::output::{fmt_time, safe};
use clap::Args;
use redis::streams::{StreamRangeReply, StreamReadReply};
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct EventsArgs {
    /// How many of the latest events to print.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub count: u64,
    /// Keep printing new events as they come (Ctrl-C ends).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only events of this channel.
    #[arg(long)]
    pub channel: Option<String>,
    /// Only events of this node.
    #[arg(long)]
    pub node: Option<String>,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

struct Filter {
    channel: Option<String>,
    node: Option<String>,
}

impl Filter {
    fn accepts(&self, f: &BTreeMap<String, String>) -> bool {
        let want = |w: &Option<String>, field: &str| {
            w.as_ref()
                .is_none_or(|w| f.get(field).is_some_and(|v| v == w))
        };
        want(&self.channel, "channel") && want(&self.node, "node")
    }
}

pub async fn run(ctx: &mut Ctx, a: EventsArgs, out: &mut impl Write) -> Result<(), CtlError> {
    if let Some(c) = &a.channel {
        farm_proto::validate::channel_id(c)?;
    }
    if let Some(n) = &a.node {
        farm_proto::validate::node_id(n)?;
    }
    let filter = Filter {
        channel: a.channel.clone(),
        node: a.node.clone(),
    };
    let key = ctx.keys().events();
    // With a filter, look further back so --count counts matching events.
    let fetch = if a.channel.is_some() || a.node.is_some() {
        (a.count * 50).min(farm_proto::keys::EVENTS_MAXLEN as u64 * 2)
    } else {
        a.count
    };
    let latest: StreamRangeReply = ctx
        .query(
            "XREVRANGE events",
            redis::cmd("XREVRANGE")
                .arg(&key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(fetch),
        )
        .await?;
    // An empty stream: every entry that appears is new.
    let mut last_id = "0-0".to_string();
    if let Some(newest) = latest.ids.first() {
        last_id = newest.id.clone();
    }
    let mut shown: Vec<(String, BTreeMap<String, String>)> = latest
        .ids
        .into_iter()
        .map(|e| (e.id.clone(), fields(&e.map)))
        .filter(|(_, f)| filter.accepts(f))
        .take(a.count as usize)
        .collect();
    shown.reverse();
    for (id, f) in &shown {
        print_event(out, id, f, a.json)?;
    }
    out.flush()?;
    if !a.follow {
        return Ok(());
    }
    follow(ctx, &filter, last_id, a.json, out).await
}

/// Prints the entries added after `last_id` as they come, until Ctrl-C.
async fn follow(
    ctx: &mut Ctx,
    filter: &Filter,
    mut last_id: String,
    json: bool,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    let key = ctx.keys().events();
    // Each read blocks for less than the Redis timeout, so a dead Redis still surfaces as an error.
    let block = (ctx.timeout() / 2)
        .min(Duration::from_secs(1))
        .max(Duration::from_millis(10));
    loop {
        let mut xread = redis::cmd("XREAD");
        xread
            .arg("COUNT")
            .arg(100)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&key)
            .arg(&last_id);
        let read = ctx.query::<Option<StreamReadReply>>("XREAD events", &xread);
        let read = tokio::select! {
            r = read => r?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(read) = read else { continue };
        for k in read.keys {
            for e in k.ids {
                let f = fields(&e.map);
                if filter.accepts(&f) {
                    print_event(out, &e.id, &f, json)?;
                }
                last_id = e.id;
            }
        }
        out.flush()?;
    }
}

fn fields(map: &std::collections::HashMap<String, redis::Value>) -> BTreeMap<String, String> {
    farm_proto::types::entry_text_fields(map)
        // Events written by nodes are redacted already; older or hand-written ones may still
        // quote an upstream URL with its credentials.
        .map(|(k, v)| (k, farm_proto::redact::text(&v)))
        .collect()
}

fn print_event(
    out: &mut impl Write,
    id: &str,
    f: &BTreeMap<String, String>,
    json: bool,
) -> Result<(), CtlError> {
    if json {
        let mut obj = serde_json::Map::new();
        obj.insert("id".into(), id.into());
        for (k, v) in f {
            obj.insert(k.clone(), v.clone().into());
        }
        serde_json::to_writer(&mut *out, &obj).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    let at = f
        .get("at")
        .and_then(|v| v.parse().ok())
        .or_else(|| id.split_once('-').and_then(|(ms, _)| ms.parse().ok()))
        .map_or_else(|| "-".to_string(), fmt_time);
    let kind = f.get("event").map_or("?", String::as_str);
    let mut line = format!("{at}  {:<14}", safe(kind));
    // The usual fields first, in a fixed order; then the rest.
    let first = ["channel", "node", "gen", "reason"];
    for k in first {
        if let Some(v) = f.get(k).filter(|v| !v.is_empty()) {
            line.push_str(&format!(" {k}={}", safe(v)));
        }
    }
    for (k, v) in f {
        if first.contains(&k.as_str()) || k == "event" || k == "at" || v.is_empty() {
            continue;
        }
        line.push_str(&format!(" {}={}", safe(k), safe(v)));
    }
    writeln!(out, "{line}")?;
    Ok(())
}
