//! `farmctl status`: the leader, the nodes and the channels with runtime state, as tables or JSON.
//!
//! Channels come from the catalog index, `farm:access` and the nodes' stream sets (no KEYS); a
//! channel is listed when it has a stream hash, an owner or an access entry (`--all`: every catalog
//! channel).

use super::ctx::Ctx;
use super::error::CtlError;
use super::farm;
use super::output::{fmt_ago, fmt_bytes, or_dash, safe, table};
use clap::Args;
use farm_proto::records::StreamRecord;
use farm_proto::scripts::split_owner;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::io::Write;

const CHUNK: usize = 1000;

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Also list catalog channels that are not running.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Serialize)]
struct Status {
    now_ms: u64,
    leader: Option<Leader>,
    nodes: Vec<NodeRow>,
    channels: Vec<ChannelRow>,
}

#[derive(Debug, Serialize)]
struct Leader {
    coordinator: String,
    epoch: u64,
}

#[derive(Debug, Serialize)]
struct NodeRow {
    id: String,
    address: String,
    alive: bool,
    running: u64,
    capacity: u64,
    disk_free: Option<u64>,
    version: String,
    heartbeat_ms_ago: Option<u64>,
}

#[derive(Debug, Serialize)]
struct ChannelRow {
    id: String,
    state: String,
    node: Option<String>,
    gen: Option<u64>,
    pid: Option<u64>,
    last_access_ms_ago: Option<u64>,
    restarts: u64,
    last_error: String,
    pinned: bool,
}

pub async fn run(ctx: &mut Ctx, a: StatusArgs, out: &mut impl Write) -> Result<(), CtlError> {
    let now = farm::now_ms(ctx).await?;
    let leader = read_leader(ctx).await?;
    let nodes = farm::nodes(ctx).await?;
    let status = Status {
        now_ms: now,
        leader,
        nodes: node_rows(&nodes, now),
        channels: channel_rows(ctx, &nodes, now, a.all).await?,
    };
    if a.json {
        serde_json::to_writer_pretty(&mut *out, &status).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    match &status.leader {
        Some(l) => writeln!(out, "leader: {} (epoch {})", safe(&l.coordinator), l.epoch)?,
        None => writeln!(out, "leader: none (no coordinator leads)")?,
    }
    writeln!(out)?;
    print_nodes(out, &status.nodes)?;
    writeln!(out)?;
    print_channels(out, &status.channels)
}

/// The leader lease's holder, if any.
async fn read_leader(ctx: &mut Ctx) -> Result<Option<Leader>, CtlError> {
    let leader: Option<String> = ctx
        .query("GET leader", redis::cmd("GET").arg(ctx.keys().leader()))
        .await?;
    let leader = leader
        .as_deref()
        .and_then(split_owner)
        .map(|(c, e)| Leader {
            coordinator: c.to_string(),
            epoch: e,
        });
    Ok(leader)
}

fn node_rows(nodes: &[farm::NodeInfo], now: u64) -> Vec<NodeRow> {
    nodes
        .iter()
        .map(|n| {
            let r = &n.record;
            let address = r.address().unwrap_or_default().to_string();
            NodeRow {
                id: n.view.id.clone(),
                address,
                alive: n.view.alive,
                running: n.view.running,
                capacity: n.view.capacity,
                disk_free: r.disk_free,
                version: r.version.clone().unwrap_or_default(),
                heartbeat_ms_ago: (n.view.heartbeat_ms > 0)
                    .then(|| now.saturating_sub(n.view.heartbeat_ms)),
            }
        })
        .collect()
}

/// Every channel with a stream hash, an owner or an access entry (`all`: every catalog channel).
async fn channel_rows(
    ctx: &mut Ctx,
    nodes: &[farm::NodeInfo],
    now: u64,
    all: bool,
) -> Result<Vec<ChannelRow>, CtlError> {
    let (ids, access) = channel_ids(ctx, nodes).await?;
    let k = ctx.keys().clone();
    let mut channels = Vec::new();
    for chunk in ids.chunks(CHUNK) {
        let mut p = redis::pipe();
        for id in chunk {
            p.hgetall(k.stream(id))
                .get(k.owner(id))
                .hget(k.channel(id), "pinned");
        }
        // A key of the wrong type (a hand edit) reads as missing instead of failing the status.
        p.ignore_errors();
        let replies: Vec<redis::RedisResult<redis::Value>> =
            ctx.query_pipe("stream hashes", &p).await?;
        for (id, r) in chunk.iter().zip(replies.chunks(3)) {
            let conv = |i: usize| {
                r.get(i)
                    .and_then(|v| v.as_ref().ok())
                    .cloned()
                    .unwrap_or(redis::Value::Nil)
            };
            let hash: HashMap<String, String> =
                redis::from_redis_value(conv(0)).unwrap_or_default();
            let stream = (!hash.is_empty()).then(|| StreamRecord::from_fields(&hash));
            let owner: Option<String> = redis::from_redis_value(conv(1)).unwrap_or(None);
            let pinned: Option<String> = redis::from_redis_value(conv(2)).unwrap_or(None);
            let last = access.get(id).copied();
            if stream.is_none() && owner.is_none() && last.is_none() && !all {
                continue;
            }
            channels.push(channel_row(id, stream, owner, pinned, last, now));
        }
    }
    Ok(channels)
}

/// Channel ids (catalog, access entries, node sets, sorted) and the access scores (ms).
async fn channel_ids(
    ctx: &mut Ctx,
    nodes: &[farm::NodeInfo],
) -> Result<(Vec<String>, HashMap<String, u64>), CtlError> {
    let k = ctx.keys().clone();
    // SSCAN in chunks: the catalog may hold 100k ids, and Redis is shared.
    let catalog: Vec<String> = super::catalog::ids(ctx).await?;
    let access: Vec<(String, f64)> = ctx
        .query(
            "ZRANGE access",
            redis::cmd("ZRANGE")
                .arg(k.access())
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES"),
        )
        .await?;
    let access: HashMap<String, u64> = access
        .into_iter()
        .map(|(id, s)| (id, s.max(0.0) as u64))
        .collect();
    let mut ids: BTreeSet<String> = catalog.iter().cloned().collect();
    ids.extend(access.keys().cloned());
    for n in nodes {
        let members: Vec<String> = ctx
            .query(
                "SMEMBERS node streams",
                redis::cmd("SMEMBERS").arg(k.node_streams(&n.view.id)),
            )
            .await?;
        ids.extend(members);
    }
    Ok((ids.into_iter().collect(), access))
}

/// One channel's row from its stream hash, lease value, catalog `pinned` field and last access.
fn channel_row(
    id: &str,
    stream: Option<StreamRecord>,
    owner: Option<String>,
    pinned: Option<String>,
    last: Option<u64>,
    now: u64,
) -> ChannelRow {
    let owner = owner.as_deref().and_then(split_owner);
    let state = if let Some(s) = &stream {
        s.state.clone().unwrap_or_default()
    } else if owner.is_some() {
        "claimed".into()
    } else {
        "stopped".into()
    };
    let stream = stream.unwrap_or_default();
    ChannelRow {
        id: id.to_string(),
        state,
        node: owner
            .map(|(n, _)| n.to_string())
            .or_else(|| stream.node.clone().filter(|s| !s.is_empty())),
        gen: owner.map(|(_, g)| g).or(stream.gen),
        pid: stream.pid.map(u64::from),
        last_access_ms_ago: last.map(|t| now.saturating_sub(t)),
        restarts: stream.restarts.unwrap_or(0),
        // Nodes store it redacted; redacted again here for older or hand-written data.
        last_error: farm_proto::redact::text(stream.last_error.as_deref().unwrap_or_default()),
        pinned: matches!(pinned.as_deref(), Some("1" | "true")),
    }
}

fn print_nodes(out: &mut impl Write, nodes: &[NodeRow]) -> Result<(), CtlError> {
    let header = [
        "ID",
        "ADDRESS",
        "ALIVE",
        "RUNNING",
        "DISK FREE",
        "VERSION",
        "HEARTBEAT",
    ];
    counted_table(out, "nodes", &header, nodes, |n| {
        vec![
            safe(&n.id).into_owned(),
            safe(or_dash(&n.address)).into_owned(),
            if n.alive { "yes" } else { "NO" }.to_string(),
            if n.capacity == 0 {
                format!("{}/unlimited", n.running)
            } else {
                format!("{}/{}", n.running, n.capacity)
            },
            n.disk_free.map_or("-".into(), fmt_bytes),
            safe(or_dash(&n.version)).into_owned(),
            n.heartbeat_ms_ago
                .map_or("-".into(), |ms| format!("{} ago", fmt_ago(ms))),
        ]
    })
}

fn print_channels(out: &mut impl Write, channels: &[ChannelRow]) -> Result<(), CtlError> {
    let header = [
        "ID",
        "STATE",
        "NODE",
        "GEN",
        "PID",
        "LAST ACCESS",
        "RESTARTS",
        "PINNED",
        "LAST ERROR",
    ];
    counted_table(out, "channels", &header, channels, |c| {
        vec![
            safe(&c.id).into_owned(),
            safe(or_dash(&c.state)).into_owned(),
            c.node
                .as_deref()
                .map_or("-".into(), |n| safe(n).into_owned()),
            c.gen.map_or("-".into(), |g| g.to_string()),
            c.pid.map_or("-".into(), |p| p.to_string()),
            c.last_access_ms_ago
                .map_or("-".into(), |ms| format!("{} ago", fmt_ago(ms))),
            c.restarts.to_string(),
            if c.pinned { "yes" } else { "no" }.to_string(),
            safe(or_dash(&c.last_error)).chars().take(80).collect(),
        ]
    })
}

/// `<what>: <count>`, then a table of the items, one row each.
fn counted_table<T>(
    out: &mut impl Write,
    what: &str,
    header: &[&str],
    items: &[T],
    row: impl Fn(&T) -> Vec<String>,
) -> Result<(), CtlError> {
    writeln!(out, "{what}: {}", items.len())?;
    let rows: Vec<Vec<String>> = items.iter().map(row).collect();
    table(out, header, &rows)?;
    Ok(())
}
