//! The channel catalog in Redis (`farm:channel:<id>` hashes indexed by the `farm:channels` set):
//! the reads and writes every farmctl command shares.
//!
//! Redis is shared by the whole farm, so every command sent here does bounded work: at most one
//! chunk (`--chunk`, default [`DEFAULT_CHUNK`]) of channels per command or transaction, and no
//! WATCH over more than three keys (Redis 7.0's WATCH is quadratic in the keys one client watches:
//! one WATCH over 100k channel keys blocked Redis for 75 s).
//!
//! An import is written in three phases:
//! 1. **stage**: the channels go, chunk by chunk, into their own list `farm:catalog:import:<gen>`
//!    (JSON, with a TTL); nothing any reader looks at changes, so an import that fails here (a
//!    Redis error, Redis killed, farmctl killed) leaves the catalog exactly as it was, and its
//!    staging list is removed in bounded steps (or expires);
//! 2. **commit**: one small transaction (WATCH on the version counter, the pending marker and
//!    the list) records `farm:catalog:importing = <gen>` and bumps `farm:catalog:version`; from
//!    here on the import is decided and will be completed;
//! 3. **apply**: chunk by chunk, one MULTI/EXEC each, every channel's hash is replaced (DEL + HSET,
//!    so no stale field survives and a reader never sees half an entry), its id added to the
//!    index and the pinned set updated, and the applied chunk trimmed off the list. If farmctl
//!    stops here, the next farmctl catalog write (or `farmctl import --resume`) finishes it.
//!
//! Invariants kept here: a hash and its index member are written and removed in the same
//! MULTI/EXEC; a write never overwrites an entry it was not told to replace (without `--replace`
//! the ids are checked first and the commit is refused if any catalog write happened since);
//! every catalog write first finishes a committed import, so writes apply in commit order.

use super::ctx::Ctx;
use super::error::CtlError;
use farm_proto::ChannelSpec;
use std::collections::HashMap;
use std::io::Write;

/// Channels per Redis command or transaction unless `--chunk` says otherwise.
pub const DEFAULT_CHUNK: usize = 1000;
/// How often a transaction is retried when a watched key changed under it.
const WRITE_ATTEMPTS: usize = 5;
/// An uncommitted staging list lives this long after its last chunk (an abandoned import's data
/// disappears by itself).
const STAGING_TTL_MS: u64 = 3_600_000;

/// Writes `specs` (unique, validated ids; at most a few, e.g. `channel add`) and adds them to the
/// index in one transaction. Refuses with [`CtlError::Exists`] (nothing written) when one of them
/// exists and `replace` is false; with `replace`, an existing hash is deleted first so no stale
/// field survives.
pub async fn write(ctx: &mut Ctx, specs: &[ChannelSpec], replace: bool) -> Result<(), CtlError> {
    if specs.is_empty() {
        return Ok(());
    }
    if specs.len() > DEFAULT_CHUNK {
        return Err(CtlError::Usage(format!(
            "{} channels in one write: use farmctl import for more than {DEFAULT_CHUNK}",
            specs.len()
        )));
    }
    finish_pending(ctx, DEFAULT_CHUNK, &mut std::io::sink()).await?;
    check_index_type(ctx).await?;
    let version_key = ctx.keys().catalog_version();
    let importing_key = ctx.keys().catalog_importing();
    let keys: Vec<String> = specs.iter().map(|s| ctx.keys().channel(&s.id)).collect();

    for _ in 0..WRITE_ATTEMPTS {
        // The version counter stands for the whole catalog: every farmctl catalog write bumps it,
        // so watching it (and the import marker) is enough; no per-channel WATCH.
        ctx.query::<()>(
            "WATCH",
            redis::cmd("WATCH").arg(&version_key).arg(&importing_key),
        )
        .await?;
        let pending: bool = ctx
            .query("EXISTS", redis::cmd("EXISTS").arg(&importing_key))
            .await?;
        if pending {
            ctx.query::<()>("UNWATCH", &redis::cmd("UNWATCH")).await?;
            finish_pending(ctx, DEFAULT_CHUNK, &mut std::io::sink()).await?;
            continue;
        }
        let existing = existing_ids(ctx, specs).await?;
        if !existing.is_empty() && !replace {
            ctx.query::<()>("UNWATCH", &redis::cmd("UNWATCH")).await?;
            return Err(CtlError::Exists(existing));
        }
        let mut tx = redis::pipe();
        tx.atomic();
        for (spec, key) in specs.iter().zip(&keys) {
            put_channel(&mut tx, ctx, spec, key);
        }
        tx.cmd("INCR").arg(&version_key).ignore();
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

/// Adds to `tx`: the channel's hash replaced whole (DEL + HSET), its index entry, its pinned
/// entry following its `pinned` field.
fn put_channel(tx: &mut redis::Pipeline, ctx: &Ctx, spec: &ChannelSpec, key: &str) {
    tx.cmd("DEL").arg(key).ignore();
    let mut hset = redis::cmd("HSET");
    hset.arg(key);
    for (field, value) in spec.to_fields() {
        hset.arg(field).arg(value);
    }
    tx.add_command(hset).ignore();
    tx.cmd("SADD")
        .arg(ctx.keys().channels())
        .arg(&spec.id)
        .ignore();
    tx.cmd(if spec.pinned { "SADD" } else { "SREM" })
        .arg(ctx.keys().pinned())
        .arg(&spec.id)
        .ignore();
}

/// The ids among `specs` whose hash exists (one EXISTS per id, pipelined: O(1) each).
async fn existing_ids(ctx: &mut Ctx, specs: &[ChannelSpec]) -> Result<Vec<String>, CtlError> {
    let mut check = redis::pipe();
    for s in specs {
        check.cmd("EXISTS").arg(ctx.keys().channel(&s.id));
    }
    let exists: Vec<bool> = ctx.query_pipe("EXISTS", &check).await?;
    Ok(specs
        .iter()
        .zip(&exists)
        .filter(|(_, e)| **e)
        .map(|(s, _)| s.id.clone())
        .collect())
}

/// Refuses to write into a catalog index that is not a set (a damaged catalog).
async fn check_index_type(ctx: &mut Ctx) -> Result<(), CtlError> {
    let set_key = ctx.keys().channels();
    let set_type: String = ctx.query("TYPE", redis::cmd("TYPE").arg(&set_key)).await?;
    if set_type != "set" && set_type != "none" {
        return Err(CtlError::Usage(format!(
            "{set_key} is a {set_type}, not a set: the catalog index is damaged, fix it with redis-cli first"
        )));
    }
    Ok(())
}

/// Removes a channel's hash and index entry in one transaction; [`CtlError::NotFound`] when
/// neither existed.
pub async fn remove(ctx: &mut Ctx, id: &str) -> Result<(), CtlError> {
    finish_pending(ctx, DEFAULT_CHUNK, &mut std::io::sink()).await?;
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
        .ignore()
        .cmd("INCR")
        .arg(ctx.keys().catalog_version())
        .ignore();
    let (deleted, unindexed): (i64, i64) = ctx.query_pipe("MULTI/EXEC", &tx).await?;
    if deleted == 0 && unindexed == 0 {
        return Err(CtlError::NotFound(id.to_string()));
    }
    Ok(())
}

/// How an import went, for its report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub channels: usize,
    pub chunk: usize,
    pub gen: u64,
}

/// Imports `specs` (unique, validated ids): stage in chunks, commit, apply in chunks (see the
/// module docs). Progress lines go to `progress`. Without `replace`, refuses with
/// [`CtlError::Exists`] when an id exists, and with [`CtlError::Conflict`] when another catalog
/// write commits while this one stages; in both cases nothing is changed.
pub async fn import(
    ctx: &mut Ctx,
    specs: &[ChannelSpec],
    replace: bool,
    chunk: usize,
    progress: &mut dyn Write,
) -> Result<Imported, CtlError> {
    let chunk = chunk.max(1);
    finish_pending(ctx, chunk, progress).await?;
    // One chunk is one write: no progress to show.
    let mut sink = std::io::sink();
    let progress: &mut dyn Write = if specs.len() <= chunk {
        &mut sink
    } else {
        progress
    };
    check_index_type(ctx).await?;
    let version_key = ctx.keys().catalog_version();
    let base: Option<u64> = ctx
        .query("GET", redis::cmd("GET").arg(&version_key))
        .await?;
    if !replace {
        let mut existing = Vec::new();
        for part in specs.chunks(chunk) {
            existing.extend(existing_ids(ctx, part).await?);
        }
        if !existing.is_empty() {
            return Err(CtlError::Exists(existing));
        }
    }
    let gen: u64 = ctx
        .query("INCR", redis::cmd("INCR").arg(ctx.keys().catalog_gen()))
        .await?;
    let list = ctx.keys().catalog_staging(gen);
    let staged = stage(ctx, specs, &list, chunk, progress).await;
    let committed = match staged {
        Ok(()) => commit(ctx, gen, &list, specs.len(), (!replace).then_some(base)).await,
        Err(e) => Err(e),
    };
    if let Err(e) = committed {
        // Best effort: if Redis is gone, the list's TTL removes it.
        let _ = drop_list(ctx, &list, chunk).await;
        return Err(e);
    }
    writeln!(progress, "committed import {gen}")?;
    progress.flush()?;
    apply(ctx, chunk, progress, false).await?;
    Ok(Imported {
        channels: specs.len(),
        chunk,
        gen,
    })
}

/// Prints `what done/total` at about every tenth of the way.
fn report(progress: &mut dyn Write, what: &str, done: usize, total: usize, chunk: usize) {
    let step = (total / 10).max(chunk).max(1);
    if done == total || done / step != (done - chunk.min(done)) / step {
        let _ = writeln!(progress, "{what} {done}/{total}");
        // Shown as it happens, not when farmctl ends (its stdout is buffered).
        let _ = progress.flush();
    }
}

async fn stage(
    ctx: &mut Ctx,
    specs: &[ChannelSpec],
    list: &str,
    chunk: usize,
    progress: &mut dyn Write,
) -> Result<(), CtlError> {
    let mut done = 0;
    for part in specs.chunks(chunk) {
        let mut pipe = redis::pipe();
        let mut push = redis::cmd("RPUSH");
        push.arg(list);
        for spec in part {
            let json = serde_json::to_string(spec).map_err(std::io::Error::from)?;
            push.arg(json);
        }
        pipe.add_command(push)
            .ignore()
            .cmd("PEXPIRE")
            .arg(list)
            .arg(STAGING_TTL_MS)
            .ignore();
        ctx.query_pipe::<()>("RPUSH", &pipe).await?;
        done += part.len();
        report(progress, "staged", done, specs.len(), chunk);
    }
    Ok(())
}

/// The commit: one transaction that marks `gen` as the import to apply. `base`: the catalog
/// version the existence check saw (None: any version will do, `--replace`).
async fn commit(
    ctx: &mut Ctx,
    gen: u64,
    list: &str,
    total: usize,
    base: Option<Option<u64>>,
) -> Result<(), CtlError> {
    let version_key = ctx.keys().catalog_version();
    let importing_key = ctx.keys().catalog_importing();
    for _ in 0..WRITE_ATTEMPTS {
        ctx.query::<()>(
            "WATCH",
            redis::cmd("WATCH")
                .arg(&version_key)
                .arg(&importing_key)
                .arg(list),
        )
        .await?;
        let mut pipe = redis::pipe();
        pipe.cmd("GET")
            .arg(&version_key)
            .cmd("EXISTS")
            .arg(&importing_key)
            .cmd("LLEN")
            .arg(list);
        let (version, pending, len): (Option<u64>, bool, usize) =
            ctx.query_pipe("GET", &pipe).await?;
        if pending {
            // Another import committed first: it applies first.
            ctx.query::<()>("UNWATCH", &redis::cmd("UNWATCH")).await?;
            finish_pending(ctx, DEFAULT_CHUNK, &mut std::io::sink()).await?;
            continue;
        }
        if base.is_some_and(|b| b != version) {
            ctx.query::<()>("UNWATCH", &redis::cmd("UNWATCH")).await?;
            return Err(CtlError::Conflict {
                what: "importing (another farmctl wrote to it)",
            });
        }
        if len != total {
            ctx.query::<()>("UNWATCH", &redis::cmd("UNWATCH")).await?;
            return Err(CtlError::Usage(format!(
                "the staged import holds {len} of {total} channels (did it expire or was it touched?), nothing was imported"
            )));
        }
        let mut tx = redis::pipe();
        tx.atomic()
            .cmd("SET")
            .arg(&importing_key)
            .arg(gen)
            .ignore()
            .cmd("PERSIST")
            .arg(list)
            .ignore()
            .cmd("INCR")
            .arg(&version_key)
            .ignore();
        let done: Option<redis::Value> = ctx.query_pipe("MULTI/EXEC", &tx).await?;
        if done.is_some() {
            return Ok(());
        }
    }
    Err(CtlError::Conflict {
        what: "committing the import",
    })
}

/// Removes a staging list in bounded steps (LTRIM of one chunk at a time).
async fn drop_list(ctx: &mut Ctx, list: &str, chunk: usize) -> Result<(), CtlError> {
    loop {
        let mut pipe = redis::pipe();
        pipe.cmd("LTRIM")
            .arg(list)
            .arg(chunk)
            .arg(-1)
            .ignore()
            .cmd("LLEN")
            .arg(list);
        let (left,): (usize,) = ctx.query_pipe("LTRIM", &pipe).await?;
        if left == 0 {
            return Ok(());
        }
    }
}

/// What a committed but unfinished import still has to apply, if any: `(gen, channels left)`.
pub async fn pending(ctx: &mut Ctx) -> Result<Option<(u64, usize)>, CtlError> {
    let gen: Option<u64> = ctx
        .query("GET", redis::cmd("GET").arg(ctx.keys().catalog_importing()))
        .await?;
    let Some(gen) = gen else {
        return Ok(None);
    };
    let left: usize = ctx
        .query(
            "LLEN",
            redis::cmd("LLEN").arg(ctx.keys().catalog_staging(gen)),
        )
        .await?;
    Ok(Some((gen, left)))
}

/// Applies a committed import to the end, chunk by chunk (each chunk one MULTI/EXEC that also
/// trims it off the staging list, so any number of farmctls can do this at once, and one killed
/// half way leaves a list the next one continues). Returns how many channels it applied.
pub async fn finish_pending(
    ctx: &mut Ctx,
    chunk: usize,
    progress: &mut dyn Write,
) -> Result<usize, CtlError> {
    apply(ctx, chunk, progress, true).await
}

/// [`finish_pending`]; `announce`: say which import is being finished (it is not the caller's).
async fn apply(
    ctx: &mut Ctx,
    chunk: usize,
    progress: &mut dyn Write,
    announce: bool,
) -> Result<usize, CtlError> {
    let importing_key = ctx.keys().catalog_importing();
    let mut applied = 0usize;
    let mut conflicts = 0usize;
    let mut announced = false;
    loop {
        ctx.query::<()>("WATCH", redis::cmd("WATCH").arg(&importing_key))
            .await?;
        let gen: Option<u64> = ctx
            .query("GET", redis::cmd("GET").arg(&importing_key))
            .await?;
        let Some(gen) = gen else {
            ctx.query::<()>("UNWATCH", &redis::cmd("UNWATCH")).await?;
            return Ok(applied);
        };
        let list = ctx.keys().catalog_staging(gen);
        ctx.query::<()>("WATCH", redis::cmd("WATCH").arg(&list))
            .await?;
        let mut read = redis::pipe();
        read.cmd("LRANGE")
            .arg(&list)
            .arg(0)
            .arg(chunk.saturating_sub(1))
            .cmd("LLEN")
            .arg(&list);
        let (items, len): (Vec<String>, usize) = ctx.query_pipe("LRANGE", &read).await?;
        if announce && !announced && applied == 0 && len > 0 {
            announced = true;
            let _ = writeln!(progress, "applying import {gen}: {len} channels left");
            let _ = progress.flush();
        }
        let tx = apply_tx(ctx, gen, &list, &items, progress);
        let done: Option<redis::Value> = ctx.query_pipe("MULTI/EXEC", &tx).await?;
        match done {
            Some(_) if items.is_empty() => {
                if announced {
                    let _ = writeln!(progress, "import {gen} applied");
                }
            }
            Some(_) => {
                applied += items.len();
                report(
                    progress,
                    "applied",
                    applied,
                    len + applied - items.len(),
                    chunk,
                );
            }
            None => {
                // Another farmctl applied this chunk first; go on from where it is.
                conflicts += 1;
                if conflicts > 1000 {
                    return Err(CtlError::Conflict {
                        what: "applying the import",
                    });
                }
            }
        }
    }
}

/// The transaction that writes one staged chunk of import `gen` (`items`, read from `list`) into
/// the catalog and trims it off the list; with no items left, it ends the import.
fn apply_tx(
    ctx: &Ctx,
    gen: u64,
    list: &str,
    items: &[String],
    progress: &mut dyn Write,
) -> redis::Pipeline {
    let importing_key = ctx.keys().catalog_importing();
    let mut tx = redis::pipe();
    tx.atomic();
    if items.is_empty() {
        tx.cmd("DEL")
            .arg(&importing_key)
            .ignore()
            .cmd("DEL")
            .arg(list)
            .ignore();
    } else {
        for item in items {
            // Written by an import as JSON of a validated spec; anything else (a hand edit)
            // is skipped rather than written.
            match serde_json::from_str::<ChannelSpec>(item) {
                Ok(spec) if farm_proto::validate::channel_id(&spec.id).is_ok() => {
                    let key = ctx.keys().channel(&spec.id);
                    put_channel(&mut tx, ctx, &spec, &key);
                }
                _ => {
                    let _ = writeln!(
                        progress,
                        "skipped an unreadable staged entry of import {gen}"
                    );
                }
            }
        }
        tx.cmd("LTRIM").arg(list).arg(items.len()).arg(-1).ignore();
    }
    tx
}

/// A hash as Redis holds it, bytes that are not UTF-8 shown as U+FFFD (catalog data may come
/// from redis-cli; reading it never fails on its spelling).
fn lossy(h: HashMap<Vec<u8>, Vec<u8>>) -> HashMap<String, String> {
    h.into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(&k).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .collect()
}

/// One catalog entry, `None` when its hash does not exist.
pub async fn get(ctx: &mut Ctx, id: &str) -> Result<Option<ChannelSpec>, CtlError> {
    let key = ctx.keys().channel(id);
    let h: HashMap<Vec<u8>, Vec<u8>> = ctx.query("HGETALL", redis::cmd("HGETALL").arg(key)).await?;
    Ok(ChannelSpec::from_fields(id, &lossy(h)))
}

/// What the index says about one id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Channel(ChannelSpec),
    /// Indexed, but its hash is missing (or has no `url`).
    Missing,
    /// Its key cannot be read as a hash (e.g. WRONGTYPE): Redis's error.
    Unreadable(String),
}

/// Every id in the index (read with SSCAN, a chunk per call), sorted.
pub async fn ids(ctx: &mut Ctx) -> Result<Vec<String>, CtlError> {
    let set_key = ctx.keys().channels();
    let mut cursor: u64 = 0;
    let mut ids: Vec<String> = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = ctx
            .query(
                "SSCAN",
                redis::cmd("SSCAN")
                    .arg(&set_key)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(DEFAULT_CHUNK),
            )
            .await?;
        ids.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Every id in the index, sorted, with its entry. Odd data (a missing hash, a key of another
/// type, bytes that are not UTF-8) is shown to the operator rather than hidden or fatal.
pub async fn list(ctx: &mut Ctx) -> Result<Vec<(String, Entry)>, CtlError> {
    let ids = ids(ctx).await?;
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(DEFAULT_CHUNK) {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for id in chunk {
            pipe.cmd("HGETALL").arg(ctx.keys().channel(id));
        }
        let hashes: Vec<redis::RedisResult<HashMap<Vec<u8>, Vec<u8>>>> =
            ctx.query_pipe("HGETALL", &pipe).await?;
        for (id, h) in chunk.iter().zip(hashes) {
            let entry = match h {
                Ok(h) => match ChannelSpec::from_fields(id, &lossy(h)) {
                    Some(spec) => Entry::Channel(spec),
                    None => Entry::Missing,
                },
                Err(e) => Entry::Unreadable(e.to_string()),
            };
            out.push((id.clone(), entry));
        }
    }
    Ok(out)
}
