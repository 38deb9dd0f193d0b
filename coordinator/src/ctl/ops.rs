//! `farmctl stop|start|pin|unpin`: drive channels through the nodes' command streams and the catalog.
//!
//! A stop names the owner's gen, so it cannot stop a later run of the channel; a start goes to the
//! named node or to the live node with the most free capacity. Both return once the command is
//! queued, or with `--wait` once it took effect (bounded by `--timeout`).

use super::catalog;
use super::ctx::Ctx;
use super::error::CtlError;
use super::farm;
use super::output::safe;
use crate::view::pick_target;
use clap::Args;
use farm_proto::records::StreamRecord;
use farm_proto::types::{Command, Op, StreamState};
use farm_proto::{scripts, validate};
use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

/// How often `--wait` looks again.
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Args)]
pub struct StopArgs {
    /// Channel id.
    pub id: String,
    /// Wait until the owner has stopped it (its lease is gone).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "30s", value_parser = super::parse_timeout)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct StartArgs {
    /// Channel id (must be in the catalog).
    pub id: String,
    /// Node to start it on (default: the live node with the most free capacity).
    #[arg(long)]
    pub node: Option<String>,
    /// Wait until it is running (its playlist is ready).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "30s", value_parser = super::parse_timeout)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct PinArgs {
    /// Channel id.
    pub id: String,
}

pub async fn stop(ctx: &mut Ctx, a: StopArgs, out: &mut impl Write) -> Result<(), CtlError> {
    validate::channel_id(&a.id)?;
    let Some((node, gen)) = farm::owner(ctx, &a.id).await? else {
        return Err(CtlError::NotRunning(a.id));
    };
    send_ops(ctx, &node, Op::Stop, &a.id, Some(gen)).await?;
    if !a.wait {
        writeln!(
            out,
            "stop of channel {} (gen {gen}) sent to node {}",
            a.id,
            safe(&node)
        )?;
        return Ok(());
    }
    let deadline = Instant::now() + a.timeout;
    loop {
        match farm::owner(ctx, &a.id).await? {
            Some((n, g)) if n == node && g == gen => {}
            _ => break,
        }
        if Instant::now() >= deadline {
            return Err(CtlError::WaitTimeout {
                what: format!(
                    "channel {} still runs on node {} (gen {gen})",
                    a.id,
                    safe(&node)
                ),
                after: a.timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    }
    writeln!(
        out,
        "channel {} (gen {gen}) stopped on node {}",
        a.id,
        safe(&node)
    )?;
    Ok(())
}

pub async fn start(ctx: &mut Ctx, a: StartArgs, out: &mut impl Write) -> Result<(), CtlError> {
    validate::channel_id(&a.id)?;
    if let Some(n) = &a.node {
        validate::node_id(n)?;
    }
    if catalog::get(ctx, &a.id).await?.is_none() {
        return Err(CtlError::NotFound(a.id));
    }
    if let Some((node, gen)) = farm::owner(ctx, &a.id).await? {
        writeln!(
            out,
            "channel {} already runs on node {} (gen {gen})",
            a.id,
            safe(&node)
        )?;
        return Ok(());
    }
    let nodes = farm::nodes(ctx).await?;
    let target = match &a.node {
        Some(n) => {
            if !nodes.iter().any(|i| &i.view.id == n && i.view.alive) {
                return Err(CtlError::NodeNotAlive(n.clone()));
            }
            n.clone()
        }
        None => {
            let views: Vec<_> = nodes.iter().map(|n| n.view.clone()).collect();
            pick_target(&views, &[])
                .map(|v| v.id.clone())
                .ok_or_else(|| CtlError::NoLiveNode(a.id.clone()))?
        }
    };
    send_ops(ctx, &target, Op::Start, &a.id, None).await?;
    if !a.wait {
        writeln!(
            out,
            "start of channel {} sent to node {}",
            a.id,
            safe(&target)
        )?;
        return Ok(());
    }
    wait_running(ctx, &a.id, &target, a.timeout, out).await
}

/// Queues `op` of channel `id` on `node`'s command stream as an operator's (reason "ops", by
/// farmctl); a stop names the owner's `gen`.
async fn send_ops(
    ctx: &mut Ctx,
    node: &str,
    op: Op,
    id: &str,
    gen: Option<u64>,
) -> Result<(), CtlError> {
    let cmd = Command {
        gen,
        reason: "ops".into(),
        by: "farmctl".into(),
        ..Command::new(op, id)
    };
    farm::send_command(ctx, node, &cmd).await?;
    Ok(())
}

/// Polls the channel's stream hash until it runs (on any node), failed, or `timeout` passed.
async fn wait_running(
    ctx: &mut Ctx,
    id: &str,
    target: &str,
    timeout: Duration,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    let deadline = Instant::now() + timeout;
    let key = ctx.keys().stream(id);
    loop {
        let h: HashMap<String, String> = ctx
            .query("HGETALL stream", redis::cmd("HGETALL").arg(&key))
            .await?;
        let stream = StreamRecord::from_fields(&h);
        match stream.stream_state() {
            Some(StreamState::Running) => {
                let node = stream.node.unwrap_or_default();
                let gen = stream.gen.map_or(String::new(), |g| g.to_string());
                writeln!(
                    out,
                    "channel {} runs on node {} (gen {gen})",
                    id,
                    safe(&node)
                )?;
                return Ok(());
            }
            Some(StreamState::Failed) => {
                return Err(CtlError::ChannelFailed {
                    id: id.to_string(),
                    reason: safe(&farm_proto::redact::text(
                        stream.last_error.as_deref().unwrap_or_default(),
                    ))
                    .into_owned(),
                })
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(CtlError::WaitTimeout {
                what: format!("channel {} is not running on node {} yet", id, safe(target)),
                after: timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

pub async fn pin(
    ctx: &mut Ctx,
    a: PinArgs,
    pinned: bool,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    validate::channel_id(&a.id)?;
    let written = ctx.call(&scripts::Pin { id: &a.id, pinned }).await?;
    if !written {
        return Err(CtlError::NotFound(a.id));
    }
    if !pinned {
        writeln!(out, "unpinned channel {}: it stops when idle", a.id)?;
        return Ok(());
    }
    match farm::owner(ctx, &a.id).await? {
        Some((node, _)) => writeln!(
            out,
            "pinned channel {}: it keeps running on node {}",
            a.id,
            safe(&node)
        )?,
        None => writeln!(
            out,
            "pinned channel {}: it is not running; start it with: farmctl start {}",
            a.id, a.id
        )?,
    }
    Ok(())
}
