//! Plain reads (catalog, owners, nodes, timelines) and the node's own plain writes (events,
//! commands, its keys at start and shutdown), plus the batched access stamp.

use super::{Result, Store, StoreError};
use farm_proto::records::{NodeRecord, StreamRecord};
use farm_proto::scripts::{self, Call, Touch, TOUCH_BATCH};
use farm_proto::ChannelSpec;
use redis::AsyncCommands;
use std::collections::HashMap;

/// `target`, `last`, `disc`, `at`, `playlist` of a timeline hash (HMGET).
type TimelineFields = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<Vec<u8>>,
);

/// A channel as Redis describes it to a node that does not run it.
#[derive(Debug, Clone, Default)]
pub struct RemoteView {
    /// The node holding the lease.
    pub owner: Option<String>,
    /// The recorded timeline (what a new owner continues).
    pub recorded: crate::playlist::Recorded,
    /// The last published playlist, unless the channel stopped.
    pub playlist: Option<bytes::Bytes>,
    /// How long ago it was recorded, ms.
    pub age_ms: Option<u64>,
}

impl Store {
    /// The catalog entry of a channel, or `None` when the catalog has no such channel.
    pub async fn catalog(&self, id: &str) -> Result<Option<ChannelSpec>> {
        let key = self.keys.channel(id);
        let h: HashMap<String, String> = self
            .with(|mut c| async move { c.hgetall(key).await })
            .await?;
        Ok(ChannelSpec::from_fields(id, &h))
    }

    /// Records viewer access for these channels at Redis time: one call for the whole batch.
    /// `false` when `farm:access` has the wrong type (nothing stamped; the coordinator repairs it).
    pub async fn touch(&self, ids: &[String]) -> Result<bool> {
        if ids.is_empty() {
            return Ok(true);
        }
        // Bounded work per script call: at most TOUCH_BATCH channels each, all in one pipeline.
        let mut pipe = redis::pipe();
        for chunk in ids.chunks(TOUCH_BATCH) {
            Touch { ids: chunk }
                .invocation(&self.keys)
                .add_to(&mut pipe);
        }
        pipe.ignore_errors();
        let mut stamped = true;
        for v in self.run_pipe("touch", pipe).await? {
            if let redis::Value::ServerError(e) = v {
                return Err(StoreError::Redis(e.into()));
            }
            stamped &= Touch::parse(v)?.is_some();
        }
        Ok(stamped)
    }

    /// What Redis recorded of a channel's timeline, its playlist and how old that is (ms, by Redis
    /// time), and the channel's current owner node.
    pub async fn timeline(&self, id: &str) -> Result<RemoteView> {
        let (owner_key, tl) = (self.keys.owner(id), self.keys.timeline(id));
        let (owner, fields, time): (Option<String>, TimelineFields, (u64, u64)) = self
            .with(|mut c| async move {
                redis::pipe()
                    .get(owner_key)
                    .cmd("HMGET")
                    .arg(tl)
                    .arg("target")
                    .arg("last")
                    .arg("disc")
                    .arg("at")
                    .arg("playlist")
                    .cmd("TIME")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let (target, last, disc, at, playlist) = fields;
        let now = time.0 * 1000 + time.1 / 1000;
        let num = |v: &Option<String>| v.as_deref().and_then(|s| s.parse::<u64>().ok());
        Ok(RemoteView {
            owner: owner.and_then(|v| scripts::split_owner(&v).map(|(n, _)| n.to_string())),
            recorded: crate::playlist::Recorded {
                target: num(&target).unwrap_or(0),
                last: num(&last),
                disc: num(&disc).unwrap_or(0),
            },
            playlist: playlist.filter(|p| !p.is_empty()).map(bytes::Bytes::from),
            age_ms: num(&at).map(|at| now.saturating_sub(at)),
        })
    }

    /// Appends an audit event to `farm:events` (capped).
    pub async fn event(&self, kind: &str, fields: &[(&str, &str)]) -> Result<()> {
        let key = self.keys.events();
        let mut items: Vec<(&str, &str)> = vec![("event", kind)];
        items.extend_from_slice(fields);
        let items: Vec<(String, String)> = items
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        self.with(|mut c| async move {
            let _: String = redis::cmd("XADD")
                .arg(key)
                .arg("MAXLEN")
                .arg("~")
                .arg(farm_proto::keys::EVENTS_MAXLEN)
                .arg("*")
                .arg(&items)
                .query_async(&mut c)
                .await?;
            Ok(())
        })
        .await
    }

    /// The node holding a channel's lease, if any.
    pub async fn owner_of(&self, id: &str) -> Result<Option<String>> {
        let key = self.keys.owner(id);
        let v: Option<String> = self.with(|mut c| async move { c.get(key).await }).await?;
        Ok(v.and_then(|v| scripts::split_owner(&v).map(|(n, _)| n.to_string())))
    }

    /// The public URL of a node if it is alive, for routing a viewer to the owner (only that field
    /// of its hash is read: this runs on the viewer's request).
    pub async fn live_node_url(&self, node: &str) -> Result<Option<String>> {
        let (alive, node_key) = (self.keys.node_alive(node), self.keys.node(node));
        let fields = farm_proto::record_fields!(NodeRecord: public_url);
        self.with(|mut c| async move {
            let (exists, values): (bool, Vec<Option<String>>) = redis::pipe()
                .exists(alive)
                .cmd("HMGET")
                .arg(node_key)
                .arg(&fields[..])
                .query_async(&mut c)
                .await?;
            Ok(if exists {
                NodeRecord::from_values(&fields, values).public_url
            } else {
                None
            })
        })
        .await
    }

    /// Appends a command to a node's command stream.
    pub async fn send_command(&self, node: &str, cmd: &farm_proto::Command) -> Result<()> {
        let xadd = cmd.xadd(&self.keys, node);
        self.with(|mut c| async move {
            let _: String = xadd.query_async(&mut c).await?;
            Ok(())
        })
        .await
    }

    /// `node` and `state` of a channel's stream hash.
    pub async fn stream_owner_state(&self, id: &str) -> Result<Option<(String, String)>> {
        let key = self.keys.stream(id);
        let h: HashMap<String, String> = self
            .with(|mut c| async move { c.hgetall(key).await })
            .await?;
        let r = StreamRecord::from_fields(&h);
        Ok(r.node.zip(r.state))
    }

    /// The live node (other than `except`) with the most free capacity, as (id, public URL).
    pub async fn roomiest_node(&self, except: &str) -> Result<Option<(String, String)>> {
        let all = self.keys.nodes();
        let ids: Vec<String> = self
            .with(|mut c| async move { c.zrange(all, 0, -1).await })
            .await?;
        let ids: Vec<String> = ids.into_iter().filter(|n| n != except).collect();
        if ids.is_empty() {
            return Ok(None);
        }
        let mut pipe = redis::pipe();
        for n in &ids {
            pipe.exists(self.keys.node_alive(n));
            pipe.hgetall(self.keys.node(n));
        }
        let replies: Vec<redis::Value> = self
            .with(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        let mut takers: Vec<(&str, u64, String)> = Vec::new();
        for (n, pair) in ids.iter().zip(replies.chunks(2)) {
            let alive: bool = redis::from_redis_value(pair[0].clone()).unwrap_or(false);
            let hash: HashMap<String, String> =
                redis::from_redis_value(pair[1].clone()).unwrap_or_default();
            let node = NodeRecord::from_fields(&hash);
            if node.draining == Some(true) {
                continue;
            }
            let (Some(cap), Some(url)) = (node.capacity, node.public_url.clone()) else {
                continue;
            };
            if alive {
                // Capacity is in weight units: a transcode counts its profile's weight.
                let free = farm_proto::placement::free(cap, node.used().unwrap_or(0));
                takers.push((n, free, url));
            }
        }
        Ok(farm_proto::placement::roomiest(
            takers
                .into_iter()
                .map(|(id, free, url)| (id, free, (id.to_string(), url))),
        ))
    }

    /// What a previous incarnation of `node` left: its channel set and their stream hashes.
    pub async fn leftovers(&self, node: &str) -> Result<Vec<(String, StreamRecord)>> {
        let set = self.keys.node_streams(node);
        let ids: Vec<String> = self
            .with(|mut c| async move { c.smembers(set).await })
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let key = self.keys.stream(&id);
            let h: HashMap<String, String> = self
                .with(|mut c| async move { c.hgetall(key).await })
                .await?;
            out.push((id, StreamRecord::from_fields(&h)));
        }
        Ok(out)
    }

    /// Drops the node's channel weights (at start, before it runs anything).
    pub async fn clear_load(&self, node: &str) -> Result<()> {
        let key = self.keys.node_load(node);
        self.with(|mut c| async move {
            let _: () = c.del(key).await?;
            Ok(())
        })
        .await
    }

    /// Removes the node's own keys on a graceful shutdown.
    pub async fn deregister(&self, node: &str) -> Result<()> {
        let k = &self.keys;
        let (n, a, s, l, all) = (
            k.node(node),
            k.node_alive(node),
            k.node_streams(node),
            k.node_load(node),
            k.nodes(),
        );
        let node = node.to_string();
        self.with(|mut c| async move {
            redis::pipe()
                .del(&[n, a, s, l])
                .ignore()
                .zrem(all, node)
                .ignore()
                .query_async::<()>(&mut c)
                .await?;
            Ok(())
        })
        .await
    }
}
