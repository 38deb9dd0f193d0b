//! Consumes `farm:cmd:<node>` through the consumer group `node`, as consumer `<node id>`.
//!
//! Pending entries (delivered to an earlier incarnation of this node and never acked) are handled
//! first, then new ones. An entry is acked (and deleted) only after its effect: a stop is acked once
//! FFmpeg is gone and the lease released. A command for another gen is stale and only acked.
//! A malformed command is logged and acked, so it cannot wedge the stream.

use crate::node::{ClaimMode, Ctl, Node};
use farm_proto::keys::CMD_GROUP;
use farm_proto::{Command, Op};
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;
use tracing::{info, warn};

const BLOCK_MS: usize = 1000;

pub async fn command_loop(node: Arc<Node>) {
    // Commands wait for the first heartbeat: until then the claim script refuses this node.
    let mut ready = node.ready.subscribe();
    tokio::select! {
        _ = node.cancel.cancelled() => return,
        _ = ready.wait_for(|r| *r) => {}
    }
    let mut delay = Duration::from_millis(200);
    while !node.cancel.is_cancelled() {
        match consume(&node).await {
            Ok(()) => return,
            Err(e) => {
                node.metrics.redis_errors.inc();
                warn!(error = %e, retry_in = ?delay, "command stream unavailable");
                tokio::select! {
                    _ = node.cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn consume(node: &Arc<Node>) -> Result<(), redis::RedisError> {
    let cfg = &node.cfg;
    let key = node.store.keys().cmd(&cfg.node_id);
    let t = node.store.timeout();
    let timed = |e: tokio::time::error::Elapsed| {
        redis::RedisError::from((redis::ErrorKind::Io, "timeout", e.to_string()))
    };
    // A dedicated connection: a blocking read must not hold up the pool's multiplexed calls.
    // Its response timeout must cover BLOCK (redis-rs defaults to 500ms). For a Sentinel set,
    // a new connection goes to the current primary.
    let connect = node
        .store
        .target()
        .connect(t + Duration::from_millis(BLOCK_MS as u64));
    let mut conn = tokio::time::timeout(t, connect).await.map_err(timed)??;
    let created: Result<(), redis::RedisError> =
        tokio::time::timeout(t, conn.xgroup_create_mkstream(&key, CMD_GROUP, "0"))
            .await
            .map_err(timed)?;
    if let Err(e) = created {
        if e.code() != Some("BUSYGROUP") {
            return Err(e);
        }
    }
    // "0": our own pending entries first (after a restart), then ">" for new ones.
    let mut cursor = "0";
    loop {
        let mut opts = StreamReadOptions::default()
            .group(CMD_GROUP, &cfg.node_id)
            .count(32);
        if cursor == ">" {
            opts = opts.block(BLOCK_MS);
        }
        let (keys, ids) = ([&key], [cursor]);
        let call = conn.xread_options::<_, _, Option<StreamReadReply>>(&keys, &ids, &opts);
        let read = tokio::select! {
            _ = node.cancel.cancelled() => return Ok(()),
            r = tokio::time::timeout(t + Duration::from_millis(BLOCK_MS as u64), call) => r.map_err(timed)??,
        };
        let entries: Vec<_> = read
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default();
        if entries.is_empty() && cursor == "0" {
            cursor = ">";
            continue;
        }
        for entry in entries {
            let fields: HashMap<String, String> =
                farm_proto::types::entry_text_fields(&entry.map).collect();
            apply(node, &entry.id, &fields).await;
            let _: () = tokio::time::timeout(
                t,
                redis::pipe()
                    .xack(&key, CMD_GROUP, &[&entry.id])
                    .ignore()
                    .xdel(&key, &[&entry.id])
                    .ignore()
                    .query_async(&mut conn),
            )
            .await
            .map_err(timed)??;
        }
    }
}

async fn apply(node: &Arc<Node>, entry_id: &str, fields: &HashMap<String, String>) {
    let cmd = match Command::from_fields(fields) {
        Ok(c) => c,
        Err(why) => {
            warn!(entry = entry_id, %why, "ignoring malformed command");
            return;
        }
    };
    let reason: String = if cmd.reason.is_empty() {
        "ops".into()
    } else {
        cmd.reason.chars().take(64).collect()
    };
    match cmd.op {
        Op::Stop => match node.stop_channel(&cmd.channel, &reason, cmd.gen).await {
            Ok(true) => {
                info!(channel = %cmd.channel, gen = ?cmd.gen, %reason, by = %cmd.by, "stopped by command")
            }
            _ => {
                info!(channel = %cmd.channel, gen = ?cmd.gen, "stop command ignored: not running here with that gen (stale)")
            }
        },
        Op::Restart => match node.local(&cmd.channel) {
            Some(e) if cmd.gen.is_none_or(|g| g == e.gen()) => {
                let _ = e.inbox.send(Ctl::Restart).await;
                info!(channel = %cmd.channel, "restart requested by command");
            }
            _ => {
                info!(channel = %cmd.channel, gen = ?cmd.gen, "restart command ignored: not running here with that gen (stale)")
            }
        },
        Op::Start if !cmd.from.is_empty() => {
            let Some(gen) = cmd.gen else {
                warn!(channel = %cmd.channel, "handover without the old gen; ignored");
                return;
            };
            let mode = ClaimMode::Handover {
                from: cmd.from.clone(),
                gen,
            };
            match node.get_or_start_with(&cmd.channel, mode) {
                Ok(_) => {
                    info!(channel = %cmd.channel, from = %cmd.from, "taking the channel over (drain)")
                }
                Err(e) => warn!(channel = %cmd.channel, error = %e, "handover refused"),
            }
        }
        Op::Start => match node.get_or_start(&cmd.channel) {
            Ok(_) => info!(channel = %cmd.channel, by = %cmd.by, "start requested by command"),
            Err(e) => warn!(channel = %cmd.channel, error = %e, "start command refused"),
        },
        Op::Drain => {
            if !node
                .draining
                .swap(true, std::sync::atomic::Ordering::AcqRel)
            {
                info!(by = %cmd.by, "drain requested");
                node.tracker.spawn(
                    crate::node::drain(node.clone()).instrument(tracing::info_span!("drain")),
                );
            }
        }
        Op::Undrain => {
            node.draining
                .store(false, std::sync::atomic::Ordering::Release);
            info!(by = %cmd.by, "undrained: taking new channels again");
        }
    }
}
