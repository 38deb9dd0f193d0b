//! The runtime reads farmctl's ops commands share: Redis time, the nodes with their hashes, and who
//! owns a channel. Read-only; the writes are in the command modules.

use super::ctx::Ctx;
use super::error::CtlError;
use crate::store::time_ms;
use crate::view::NodeView;
use farm_proto::records::NodeRecord;
use farm_proto::scripts::split_owner;
use farm_proto::types::Command;

/// A node with everything its hash says.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub view: NodeView,
    pub record: NodeRecord,
}

/// Redis `TIME` in ms (the farm's clock; this machine's may differ).
pub async fn now_ms(ctx: &mut Ctx) -> Result<u64, CtlError> {
    let t: (String, String) = ctx.query("TIME", &redis::cmd("TIME")).await?;
    time_ms(&t).ok_or_else(|| CtlError::Usage(format!("Redis answered TIME with {t:?}")))
}

/// Every member of `farm:nodes`, sorted by id, with liveness and hash.
pub async fn nodes(ctx: &mut Ctx) -> Result<Vec<NodeInfo>, CtlError> {
    let members: Vec<(String, f64)> = ctx
        .query(
            "ZRANGE nodes",
            redis::cmd("ZRANGE")
                .arg(ctx.keys().nodes())
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES"),
        )
        .await?;
    if members.is_empty() {
        return Ok(Vec::new());
    }
    let mut p = redis::pipe();
    for (id, _) in &members {
        NodeView::queue_reads(&mut p, ctx.keys(), id);
    }
    let replies: Vec<redis::Value> = ctx.query_pipe("node hashes", &p).await?;
    let mut out: Vec<NodeInfo> = members
        .iter()
        .zip(replies.chunks(NodeView::READS))
        .map(|((id, score), reads)| {
            let (view, record) = NodeView::from_reads(id, *score, reads);
            NodeInfo { view, record }
        })
        .collect();
    out.sort_by(|a, b| a.view.id.cmp(&b.view.id));
    Ok(out)
}

/// `(node, gen)` holding the channel's lease, if any.
pub async fn owner(ctx: &mut Ctx, id: &str) -> Result<Option<(String, u64)>, CtlError> {
    let v: Option<String> = ctx
        .query("GET owner", redis::cmd("GET").arg(ctx.keys().owner(id)))
        .await?;
    Ok(v.as_deref()
        .and_then(split_owner)
        .map(|(n, g)| (n.to_string(), g)))
}

/// Appends a command to a node's stream (capped like every writer's).
pub async fn send_command(ctx: &mut Ctx, node: &str, cmd: &Command) -> Result<String, CtlError> {
    let xadd = cmd.xadd(ctx.keys(), node);
    ctx.query("XADD command", &xadd).await
}
