//! The node's Redis access: every call it makes, each bounded by `redis_timeout`.
//!
//! Keys come only from [`farm_proto::Keys`], scripts only from [`farm_proto::scripts`]. A [`Store`]
//! keeps one multiplexed connection for its calls, reopened when it fails, with a small
//! `deadpool-redis` pool behind it for the reconnects; [`Store::dedicated`] gives a second `Store`
//! with a connection of its own, which the keepalive uses so that its renewals never queue behind
//! request or start traffic. Calls that a background loop makes in bulk (keepalive, access flush)
//! are one pipeline each. Viewer requests for a channel this node runs make no call here; a
//! playlist of a channel another node runs is read from its timeline (cached 100 ms), and starts
//! (first requests) claim through here.
use deadpool_redis::{Manager, Pool, Runtime};
use farm_proto::scripts::{self, ClaimResult, HandoverResult};
use farm_proto::{ChannelSpec, Keys};
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis call timed out after {0:?}")]
    Timeout(Duration),
    #[error("redis unavailable: {0}")]
    Pool(String),
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected redis reply: {0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// One owned channel's lease to renew, with the runtime facts that ride along.
#[derive(Debug, Clone)]
pub struct Renewal {
    pub channel: String,
    pub owner: String,
    /// The channel's provider, whose connection holding is renewed with the lease.
    pub provider: Option<String>,
    /// Redis-free wall time of the last finished segment (ms since the epoch), if any.
    pub last_segment_at: Option<u64>,
}

/// Redis access for one node. deadpool-redis creates and health-checks connections; the store keeps
/// one multiplexed connection checked out and shares it between all callers (redis-rs pipelines
/// concurrent calls over it), so a call costs one round trip, not a recycle PING plus the call.
/// A connection that fails or times out is dropped and the next call gets a fresh one.
/// What one keepalive round trip found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keepalive {
    /// Per renewal: whether the lease is still ours.
    pub held: Vec<bool>,
    /// The node's alive key had vanished although it heartbeated before: Redis lost its keys.
    pub lost: bool,
    /// Wrong-typed keys of this node the heartbeat replaced (+100: `farm:nodes` is wrong-typed).
    pub repaired: i64,
    /// Renewals Redis answered with an error (a wrong-typed key of that channel).
    pub data_errors: Vec<String>,
    /// Redis time when the heartbeat ran.
    pub redis_now_ms: u64,
    /// The heartbeat arrived later than allowed and changed nothing.
    pub stale: bool,
}

/// What a heartbeat says about its sender's view of time.
#[derive(Debug, Clone)]
pub struct Beat {
    /// This incarnation has heartbeated before.
    pub before: bool,
    /// The Redis time (ms) the node expects when the heartbeat arrives (from its last reply).
    pub expected_now_ms: Option<u64>,
    /// How late it may arrive: later, it sat in a partitioned link and must change nothing.
    pub max_lag: Duration,
}

/// `capacity`, `running`, `public_url`, `draining`, `load` of a node hash (HMGET).
type NodeFields = (
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<i64>,
);

/// Channels one `touch.lua` call stamps at most.
const TOUCH_BATCH: usize = 500;

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

/// Connections come from a plain pool or, for a Sentinel URL, from one that asks the sentinels
/// for the current primary on every new connection.
#[derive(Clone)]
enum Pools {
    Direct(Pool),
    Sentinel(deadpool_redis::sentinel::Pool),
}

#[derive(Clone)]
pub struct Store {
    pool: Pools,
    target: farm_proto::redis_url::Target,
    hot: std::sync::Arc<std::sync::Mutex<Option<MultiplexedConnection>>>,
    keys: Keys,
    timeout: Duration,
}

impl Store {
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self> {
        // redis-rs defaults to a 500ms response timeout; the farm's own bound applies instead.
        let conn_cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let target = farm_proto::redis_url::parse(url).map_err(StoreError::Pool)?;
        let build_err = |e: deadpool_redis::BuildError| StoreError::Pool(e.to_string());
        let pool = match &target {
            farm_proto::redis_url::Target::Direct { url } => {
                let manager = Manager::new_with_config(url.as_str(), conn_cfg)?;
                Pools::Direct(
                    Pool::builder(manager)
                        .max_size(4)
                        .runtime(Runtime::Tokio1)
                        .wait_timeout(Some(timeout))
                        .create_timeout(Some(timeout))
                        .recycle_timeout(Some(timeout))
                        .build()
                        .map_err(build_err)?,
                )
            }
            farm_proto::redis_url::Target::Sentinel {
                sentinels,
                master,
                username,
                password,
                db,
            } => {
                use deadpool_redis::sentinel as ds;
                let info = ds::SentinelNodeConnectionInfo {
                    tls_mode: None,
                    redis_connection_info: Some(deadpool_redis::RedisConnectionInfo {
                        db: *db,
                        username: username.clone(),
                        password: password.clone(),
                        protocol: Default::default(),
                    }),
                };
                let manager = ds::Manager::new(
                    sentinels.clone(),
                    master.clone(),
                    Some(info),
                    ds::SentinelServerType::Master,
                )?;
                Pools::Sentinel(
                    ds::Pool::builder(manager)
                        .max_size(4)
                        .runtime(Runtime::Tokio1)
                        .wait_timeout(Some(timeout))
                        .create_timeout(Some(timeout))
                        .recycle_timeout(Some(timeout))
                        .build()
                        .map_err(build_err)?,
                )
            }
        };
        Ok(Self {
            pool,
            target,
            hot: Default::default(),
            keys: Keys::new(prefix),
            timeout,
        })
    }

    /// The same Redis through a connection of its own: the keepalive's, so a renewal never waits
    /// behind a burst of starts on the shared one.
    pub fn dedicated(&self) -> Store {
        Store {
            hot: Default::default(),
            ..self.clone()
        }
    }

    fn lock_hot(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        self.hot.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn conn(&self) -> Result<MultiplexedConnection> {
        if let Some(c) = self.lock_hot().as_ref() {
            return Ok(c.clone());
        }
        let pool_err = |e: deadpool_redis::PoolError| StoreError::Pool(e.to_string());
        let c = match &self.pool {
            Pools::Direct(p) => deadpool_redis::Connection::take(p.get().await.map_err(pool_err)?),
            Pools::Sentinel(p) => {
                deadpool_redis::sentinel::Connection::take(p.get().await.map_err(pool_err)?)
            }
        };
        *self.lock_hot() = Some(c.clone());
        Ok(c)
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Runs one Redis interaction on a pooled connection, bounded by the timeout.
    async fn with<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        crate::metrics::redis_call();
        let work = async { f(self.conn().await?).await };
        let res = tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| StoreError::Timeout(self.timeout))
            .and_then(|r| r);
        if let Err(e) = &res {
            let broken = match e {
                StoreError::Redis(r) => {
                    r.is_io_error() || r.is_connection_dropped() || r.is_timeout()
                }
                StoreError::Timeout(_) | StoreError::Pool(_) => true,
                StoreError::Protocol(_) => false,
            };
            if broken {
                self.lock_hot().take();
            }
        }
        res
    }

    /// A pipeline of EVALSHA calls; loads the scripts and retries once when Redis lost them.
    async fn run_pipe<T: redis::FromRedisValue + Send>(&self, pipe: redis::Pipeline) -> Result<T> {
        self.with(|mut c| async move {
            match pipe.query_async::<T>(&mut c).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    let mut load = redis::pipe();
                    for src in scripts::ALL_SOURCES {
                        load.cmd("SCRIPT").arg("LOAD").arg(*src).ignore();
                    }
                    load.query_async::<()>(&mut c).await?;
                    Ok(pipe.query_async::<T>(&mut c).await?)
                }
                other => Ok(other?),
            }
        })
        .await
    }

    pub async fn ping(&self) -> Result<()> {
        self.with(|mut c| async move {
            let _: String = redis::cmd("PING").query_async(&mut c).await?;
            Ok(())
        })
        .await
    }

    /// The catalog entry of a channel, or `None` when the catalog has no such channel.
    pub async fn catalog(&self, id: &str) -> Result<Option<ChannelSpec>> {
        let key = self.keys.channel(id);
        let h: HashMap<String, String> = self
            .with(|mut c| async move { Ok(c.hgetall(key).await?) })
            .await?;
        Ok(ChannelSpec::from_fields(id, &h))
    }

    /// The claim script: the lease and a fresh gen, or who holds it, or "full".
    pub async fn claim(
        &self,
        id: &str,
        node: &str,
        lease: Duration,
        capacity: u32,
        provider: Option<&str>,
        weight: u32,
    ) -> Result<ClaimResult> {
        let k = &self.keys;
        let p = provider.unwrap_or("");
        let mut inv = scripts::CLAIM.prepare_invoke();
        inv.key(k.owner(id))
            .key(k.gen(id))
            .key(k.node_streams(node))
            .key(k.stream(id))
            .key(k.access())
            .key(k.provider(p))
            .key(k.provider_conns(p))
            .key(k.node_load(node))
            .key(k.recovering())
            .key(k.node_alive(node))
            .arg(node)
            .arg(lease.as_millis() as u64)
            .arg(capacity)
            .arg(id)
            .arg(p)
            .arg(weight);
        let reply: Vec<String> = self
            .with(|mut c| async move { Ok(inv.invoke_async(&mut c).await?) })
            .await?;
        ClaimResult::parse(&reply).map_err(StoreError::Protocol)
    }

    /// A gen-checked write to `farm:stream:<id>`; `false` means we no longer own the channel.
    pub async fn stream_set(
        &self,
        id: &str,
        owner: &str,
        fields: &[(&str, String)],
    ) -> Result<bool> {
        let k = &self.keys;
        let mut inv = scripts::STREAM_SET.prepare_invoke();
        inv.key(k.owner(id)).key(k.stream(id)).arg(owner);
        for (f, v) in fields {
            inv.arg(*f).arg(v);
        }
        let n: i64 = self
            .with(|mut c| async move { Ok(inv.invoke_async(&mut c).await?) })
            .await?;
        Ok(n == 1)
    }

    /// Releases a lease by compare. `final_state` keeps the stream hash (e.g. `failed` with its
    /// reason) for `keep`; otherwise the hash is deleted. The access entry goes either way.
    pub async fn release(
        &self,
        id: &str,
        node: &str,
        owner: &str,
        provider: Option<&str>,
        final_state: Option<(&str, &str)>,
        keep: Duration,
    ) -> Result<bool> {
        let k = &self.keys;
        let (state, reason) = final_state.unwrap_or(("", ""));
        let mut inv = scripts::RELEASE.prepare_invoke();
        inv.key(k.owner(id))
            .key(k.node_streams(node))
            .key(k.stream(id))
            .key(k.access())
            .key(k.node_load(node))
            .key(k.timeline(id));
        if let Some(p) = provider {
            inv.key(k.provider_conns(p));
        }
        inv.arg(owner)
            .arg(id)
            .arg(state)
            .arg(reason)
            .arg(keep.as_millis().max(1) as u64);
        let n: i64 = self
            .with(|mut c| async move { Ok(inv.invoke_async(&mut c).await?) })
            .await?;
        Ok(n == 1)
    }

    /// One round trip: the node heartbeat, every lease renewal and each channel's last segment time.
    /// Returns, per renewal, whether the lease is still ours.
    #[allow(clippy::too_many_arguments)] // the heartbeat's inputs and the renewals ride in one round trip
    pub async fn keepalive(
        &self,
        node: &str,
        node_ttl: Duration,
        incarnation: &str,
        node_fields: &[(&str, String)],
        lease: Duration,
        renewals: &[Renewal],
        beat: &Beat,
    ) -> Result<Keepalive> {
        let expected = beat
            .expected_now_ms
            .map_or(String::new(), |t| t.to_string());
        let max_lag = beat.max_lag.as_millis() as u64;
        let k = &self.keys;
        let mut pipe = redis::pipe();
        let hb = pipe
            .cmd("EVALSHA")
            .arg(scripts::HEARTBEAT.get_hash())
            .arg(5)
            .arg(k.node(node))
            .arg(k.node_alive(node))
            .arg(k.nodes())
            .arg(k.recovering())
            .arg(k.since())
            .arg(node)
            .arg(node_ttl.as_millis() as u64)
            .arg(incarnation)
            .arg(if beat.before { "1" } else { "0" })
            .arg(if renewals.is_empty() { "0" } else { "1" })
            .arg(lease.as_millis() as u64)
            .arg(&expected)
            .arg(max_lag);
        for (f, v) in node_fields {
            hb.arg(*f).arg(v);
        }
        for r in renewals {
            let renew = pipe.cmd("EVALSHA").arg(scripts::RENEW.get_hash());
            match &r.provider {
                Some(p) => renew
                    .arg(3)
                    .arg(k.owner(&r.channel))
                    .arg(k.stream(&r.channel))
                    .arg(k.provider_conns(p)),
                None => renew
                    .arg(2)
                    .arg(k.owner(&r.channel))
                    .arg(k.stream(&r.channel)),
            };
            renew
                .arg(&r.owner)
                .arg(lease.as_millis() as u64)
                .arg(&r.channel)
                .arg(&expected)
                .arg(max_lag);
            if let Some(t) = r.last_segment_at {
                pipe.cmd("EVALSHA")
                    .arg(scripts::STREAM_SET.get_hash())
                    .arg(2)
                    .arg(k.owner(&r.channel))
                    .arg(k.stream(&r.channel))
                    .arg(&r.owner)
                    .arg("last_segment_at")
                    .arg(t)
                    .ignore();
            }
        }
        // A bad key of one channel (WRONGTYPE: an operator's mistake) fails its own renewal, not the
        // whole round trip: the other channels keep their leases.
        pipe.ignore_errors();
        let out: Vec<redis::Value> = self.run_pipe_tolerant(pipe).await?;
        let Some((hb_reply, renewed)) = out.split_first() else {
            return Err(StoreError::Protocol("keepalive: no heartbeat reply".into()));
        };
        if renewed.len() != renewals.len() {
            return Err(StoreError::Protocol(format!(
                "keepalive: {} replies for {} renewals",
                renewed.len(),
                renewals.len()
            )));
        }
        let bad = |e: redis::ParsingError| StoreError::Protocol(format!("keepalive: {e}"));
        if let redis::Value::ServerError(e) = hb_reply {
            return Err(StoreError::Protocol(format!("heartbeat: {e:?}")));
        }
        let (redis_now_ms, lost, repaired, stale): (u64, i64, i64, i64) =
            redis::from_redis_value(hb_reply.clone()).map_err(bad)?;
        let mut held = Vec::with_capacity(renewed.len());
        let mut data_errors = Vec::new();
        for (v, r) in renewed.iter().zip(renewals) {
            match v {
                redis::Value::ServerError(e) => {
                    data_errors.push(format!("{}: {e:?}", r.channel));
                    held.push(false);
                }
                v => held.push(redis::from_redis_value::<i64>(v.clone()).map_err(bad)? == 1),
            }
        }
        Ok(Keepalive {
            held,
            lost: lost == 1,
            repaired,
            data_errors,
            redis_now_ms,
            stale: stale == 1,
        })
    }

    /// [`Store::run_pipe`] for a pipeline in `ignore_errors` mode: a missing script shows up as
    /// an error value, not as an error of the call.
    async fn run_pipe_tolerant(&self, pipe: redis::Pipeline) -> Result<Vec<redis::Value>> {
        self.with(|mut c| async move {
            let out: Vec<redis::Value> = pipe.query_async(&mut c).await?;
            let noscript = out
                .iter()
                .any(|v| matches!(v, redis::Value::ServerError(e) if e.code() == "NOSCRIPT"));
            if !noscript {
                return Ok(out);
            }
            let mut load = redis::pipe();
            for src in scripts::ALL_SOURCES {
                load.cmd("SCRIPT").arg("LOAD").arg(*src).ignore();
            }
            load.query_async::<()>(&mut c).await?;
            Ok(pipe.query_async(&mut c).await?)
        })
        .await
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
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(scripts::TOUCH.get_hash())
                .arg(chunk.len() + 1)
                .arg(self.keys.access());
            for id in chunk {
                cmd.arg(self.keys.owner(id));
            }
            for id in chunk {
                cmd.arg(id);
            }
        }
        let stamped: Vec<i64> = self.run_pipe(pipe).await?;
        Ok(stamped.iter().all(|t| *t >= 0))
    }

    /// Records the channel's published timeline (gen-checked); `false` means the lease is not ours.
    pub async fn record_timeline(
        &self,
        id: &str,
        owner: &str,
        gen: u64,
        rec: &crate::playlist::Recorded,
        playlist: &[u8],
        keep: Duration,
    ) -> Result<bool> {
        let k = &self.keys;
        let mut inv = scripts::TIMELINE.prepare_invoke();
        inv.key(k.owner(id))
            .key(k.timeline(id))
            .arg(owner)
            .arg(gen)
            .arg(rec.target)
            .arg(rec.last.map_or(String::new(), |l| l.to_string()))
            .arg(rec.disc)
            .arg(playlist)
            .arg(keep.as_millis().max(1) as u64);
        let n: i64 = self
            .with(|mut c| async move { Ok(inv.invoke_async(&mut c).await?) })
            .await?;
        Ok(n == 1)
    }

    /// What Redis recorded of a channel's timeline, its playlist and how old that is (ms, by Redis
    /// time), and the channel's current owner node.
    pub async fn timeline(&self, id: &str) -> Result<RemoteView> {
        let (owner_key, tl) = (self.keys.owner(id), self.keys.timeline(id));
        let (owner, fields, time): (Option<String>, TimelineFields, (u64, u64)) = self
            .with(|mut c| async move {
                Ok(redis::pipe()
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
                    .await?)
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
        let v: Option<String> = self
            .with(|mut c| async move { Ok(c.get(key).await?) })
            .await?;
        Ok(v.and_then(|v| scripts::split_owner(&v).map(|(n, _)| n.to_string())))
    }

    /// The public URL of a node if it is alive, for routing a viewer to the owner.
    pub async fn live_node_url(&self, node: &str) -> Result<Option<String>> {
        let (alive, node_key) = (self.keys.node_alive(node), self.keys.node(node));
        self.with(|mut c| async move {
            let (exists, url): (bool, Option<String>) = redis::pipe()
                .exists(alive)
                .hget(node_key, "public_url")
                .query_async(&mut c)
                .await?;
            Ok(if exists { url } else { None })
        })
        .await
    }

    /// The handover script: moves the lease from `from` (holding `gen`) to `to`.
    #[allow(clippy::too_many_arguments)] // one per script argument; a struct would only rename them
    pub async fn handover(
        &self,
        id: &str,
        from: &str,
        gen: u64,
        to: &str,
        lease: Duration,
        capacity: u32,
        weight: u32,
    ) -> Result<HandoverResult> {
        let k = &self.keys;
        let mut inv = scripts::HANDOVER.prepare_invoke();
        inv.key(k.owner(id))
            .key(k.gen(id))
            .key(k.node_streams(from))
            .key(k.node_streams(to))
            .key(k.stream(id))
            .key(k.node_load(from))
            .key(k.node_load(to))
            .arg(scripts::owner_value(from, gen))
            .arg(to)
            .arg(lease.as_millis() as u64)
            .arg(id)
            .arg(capacity)
            .arg(weight);
        let reply: Vec<String> = self
            .with(|mut c| async move { Ok(inv.invoke_async(&mut c).await?) })
            .await?;
        HandoverResult::parse(&reply).map_err(StoreError::Protocol)
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
        let (node, state): (Option<String>, Option<String>) = self
            .with(|mut c| async move {
                Ok(redis::cmd("HMGET")
                    .arg(key)
                    .arg("node")
                    .arg("state")
                    .query_async(&mut c)
                    .await?)
            })
            .await?;
        Ok(node.zip(state))
    }

    /// The live node (other than `except`) with the most free capacity, as (id, public URL).
    pub async fn roomiest_node(&self, except: &str) -> Result<Option<(String, String)>> {
        let all = self.keys.nodes();
        let ids: Vec<String> = self
            .with(|mut c| async move { Ok(c.zrange(all, 0, -1).await?) })
            .await?;
        let ids: Vec<String> = ids.into_iter().filter(|n| n != except).collect();
        if ids.is_empty() {
            return Ok(None);
        }
        let mut pipe = redis::pipe();
        for n in &ids {
            pipe.exists(self.keys.node_alive(n));
            pipe.cmd("HMGET")
                .arg(self.keys.node(n))
                .arg("capacity")
                .arg("running")
                .arg("public_url")
                .arg("draining")
                .arg("load");
        }
        let replies: Vec<redis::Value> = self
            .with(|mut c| async move { Ok(pipe.query_async(&mut c).await?) })
            .await?;
        let mut takers: Vec<(&str, u64, String)> = Vec::new();
        for (n, pair) in ids.iter().zip(replies.chunks(2)) {
            let alive: bool = redis::from_redis_value(pair[0].clone()).unwrap_or(false);
            let (cap, running, url, draining, load): NodeFields =
                redis::from_redis_value(pair[1].clone()).unwrap_or_default();
            // Capacity is in weight units: a transcode counts its profile's weight.
            let running = load.or(running);
            if draining.as_deref() == Some("1") {
                continue;
            }
            let (Some(cap), Some(url)) = (cap, url) else {
                continue;
            };
            if alive {
                let free = farm_proto::placement::free(
                    cap.max(0) as u64,
                    running.unwrap_or(0).max(0) as u64,
                );
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
    pub async fn leftovers(&self, node: &str) -> Result<Vec<(String, HashMap<String, String>)>> {
        let set = self.keys.node_streams(node);
        let ids: Vec<String> = self
            .with(|mut c| async move { Ok(c.smembers(set).await?) })
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let key = self.keys.stream(&id);
            let h: HashMap<String, String> = self
                .with(|mut c| async move { Ok(c.hgetall(key).await?) })
                .await?;
            out.push((id, h));
        }
        Ok(out)
    }

    /// Clears one channel of an old incarnation of `node` (lease and hash only if they still name it).
    pub async fn release_node_channel(&self, node: &str, id: &str) -> Result<bool> {
        let k = &self.keys;
        let mut inv = scripts::RELEASE_NODE.prepare_invoke();
        inv.key(k.owner(id))
            .key(k.node_streams(node))
            .key(k.stream(id))
            .key(k.node_load(node))
            .key(k.access())
            .arg(node)
            .arg(id);
        let n: i64 = self
            .with(|mut c| async move { Ok(inv.invoke_async(&mut c).await?) })
            .await?;
        Ok(n == 1)
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

    /// Where Redis is (plain or Sentinel), for connections outside the pool.
    pub fn target(&self) -> &farm_proto::redis_url::Target {
        &self.target
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}
