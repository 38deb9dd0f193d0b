//! The channel catalog in Redis (`farm:channel:<id>` hashes indexed by the `farm:channels` set):
//! the reads and the all-or-nothing writes every farmctl command shares.
//!
//! Invariant kept here: a hash and its set member are written and removed in the same MULTI/EXEC,
//! and a write never overwrites an existing entry it was not told to replace (checked under WATCH,
//! so a concurrent writer makes the transaction fail instead of being overwritten).

use super::ctx::Ctx;
use super::error::CtlError;
use farm_proto::ChannelSpec;
use std::collections::HashMap;

/// How many commands go into one read pipeline.
const READ_CHUNK: usize = 1000;
/// How often a write is retried when a watched key changed under it.
const WRITE_ATTEMPTS: usize = 3;

/// Writes `specs` (unique, validated ids) and adds them to the index, all in one transaction.
/// Refuses with [`CtlError::Exists`] (nothing written) when one of them exists and `replace` is
/// false; with `replace`, an existing hash is deleted first so no stale field survives.
pub async fn write(ctx: &mut Ctx, specs: &[ChannelSpec], replace: bool) -> Result<(), CtlError> {
    if specs.is_empty() {
        return Ok(());
    }
    let set_key = ctx.keys().channels();
    let keys: Vec<String> = specs.iter().map(|s| ctx.keys().channel(&s.id)).collect();

    for _ in 0..WRITE_ATTEMPTS {
        ctx.query::<()>("WATCH", redis::cmd("WATCH").arg(&keys).arg(&set_key))
            .await?;

        let set_type: String = ctx.query("TYPE", redis::cmd("TYPE").arg(&set_key)).await?;
        let mut check = redis::pipe();
        for k in &keys {
            check.cmd("EXISTS").arg(k);
        }
        let exists: Vec<bool> = ctx.query_pipe("EXISTS", &check).await?;
        if set_type != "set" && set_type != "none" {
            ctx.query::<()>("UNWATCH", &redis::cmd("UNWATCH")).await?;
            return Err(CtlError::Usage(format!(
                "{set_key} is a {set_type}, not a set: the catalog index is damaged, fix it with redis-cli first"
            )));
        }
        let existing: Vec<String> = specs
            .iter()
            .zip(&exists)
            .filter(|(_, e)| **e)
            .map(|(s, _)| s.id.clone())
            .collect();
        if !existing.is_empty() && !replace {
            ctx.query::<()>("UNWATCH", &redis::cmd("UNWATCH")).await?;
            return Err(CtlError::Exists(existing));
        }

        let mut tx = redis::pipe();
        tx.atomic();
        for (spec, key) in specs.iter().zip(&keys) {
            if replace {
                tx.cmd("DEL").arg(key).ignore();
            }
            let mut hset = redis::cmd("HSET");
            hset.arg(key);
            for (field, value) in spec.to_fields() {
                hset.arg(field).arg(value);
            }
            tx.add_command(hset).ignore();
        }
        tx.cmd("SADD")
            .arg(&set_key)
            .arg(specs.iter().map(|s| s.id.as_str()).collect::<Vec<_>>())
            .ignore();
        // The pinned index follows the catalog's `pinned` field.
        let pinned_key = ctx.keys().pinned();
        for spec in specs.iter() {
            tx.cmd(if spec.pinned { "SADD" } else { "SREM" })
                .arg(&pinned_key)
                .arg(&spec.id)
                .ignore();
        }
        // None: EXEC was refused because a watched key changed; nothing was written.
        let done: Option<redis::Value> = ctx.query_pipe("MULTI/EXEC", &tx).await?;
        if done.is_some() {
            return Ok(());
        }
    }
    Err(CtlError::Conflict {
        what: "writing channels",
    })
}

/// Removes a channel's hash and index entry in one transaction; [`CtlError::NotFound`] when
/// neither existed.
pub async fn remove(ctx: &mut Ctx, id: &str) -> Result<(), CtlError> {
    let mut tx = redis::pipe();
    tx.atomic()
        .cmd("DEL")
        .arg(ctx.keys().channel(id))
        .cmd("SREM")
        .arg(ctx.keys().channels())
        .arg(id)
        .cmd("SREM")
        .arg(ctx.keys().pinned())
        .arg(id)
        .ignore();
    let (deleted, unindexed): (i64, i64) = ctx.query_pipe("MULTI/EXEC", &tx).await?;
    if deleted == 0 && unindexed == 0 {
        return Err(CtlError::NotFound(id.to_string()));
    }
    Ok(())
}

/// One catalog entry, `None` when its hash does not exist.
pub async fn get(ctx: &mut Ctx, id: &str) -> Result<Option<ChannelSpec>, CtlError> {
    let key = ctx.keys().channel(id);
    let h: HashMap<String, String> = ctx.query("HGETALL", redis::cmd("HGETALL").arg(key)).await?;
    Ok(ChannelSpec::from_fields(id, &h))
}

/// Every id in the index, sorted, with its entry (`None` for an index member whose hash is
/// missing: shown to the operator rather than hidden).
pub async fn list(ctx: &mut Ctx) -> Result<Vec<(String, Option<ChannelSpec>)>, CtlError> {
    let set_key = ctx.keys().channels();
    let mut ids: Vec<String> = ctx
        .query("SMEMBERS", redis::cmd("SMEMBERS").arg(set_key))
        .await?;
    ids.sort_unstable();
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(READ_CHUNK) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("HGETALL").arg(ctx.keys().channel(id));
        }
        let hashes: Vec<HashMap<String, String>> = ctx.query_pipe("HGETALL", &pipe).await?;
        for (id, h) in chunk.iter().zip(hashes) {
            out.push((id.clone(), ChannelSpec::from_fields(id, &h)));
        }
    }
    Ok(out)
}
