//! The node's Redis access: every call it makes, each bounded by `redis_timeout`.
//!
//! Keys come only from [`farm_proto::Keys`], script calls only from [`farm_proto::scripts`]' typed
//! calls (KEYS, ARGV and replies live there). A [`Store`] keeps one multiplexed connection for its
//! calls, reopened when it fails, with a small `deadpool-redis` pool behind it for the reconnects
//! ([`pool`]); [`Store::dedicated`] gives a second `Store` with a connection of its own, which the
//! keepalive uses so that its renewals never queue behind request or start traffic. Calls that a
//! background loop makes in bulk (keepalive, access flush) are one pipeline each. Viewer requests
//! for a channel this node runs make no call here; a playlist of a channel another node runs is read
//! from its timeline (cached 100 ms), and starts (first requests) claim through here.
//!
//! - [`lease`]: the scripted, gen-checked calls (claim, release, handover, stream hash, timeline,
//!   an old incarnation's leftovers).
//! - [`keepalive`]: the heartbeat and every renewal in one round trip.
//! - [`read`]: plain reads (catalog, owners, nodes, timelines) and the node's own plain writes.

mod keepalive;
mod lease;
mod pool;
mod read;

pub use keepalive::{Beat, Keepalive, Renewal};
pub use read::RemoteView;

use farm_proto::scripts::{self, Call, ReplyError};
use farm_proto::Keys;
use pool::Pools;
use redis::aio::MultiplexedConnection;
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

impl From<ReplyError> for StoreError {
    fn from(e: ReplyError) -> Self {
        Self::Protocol(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Redis access for one node. deadpool-redis creates and health-checks connections; the store keeps
/// one multiplexed connection checked out and shares it between all callers (redis-rs pipelines
/// concurrent calls over it), so a call costs one round trip, not a recycle PING plus the call.
/// A connection that fails or times out is dropped and the next call gets a fresh one.
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
        let target = farm_proto::redis_url::parse(url).map_err(StoreError::Pool)?;
        Ok(Self {
            pool: Pools::new(&target, timeout)?,
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
        let c = self.pool.take().await?;
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

    /// One typed script call (EVALSHA, the script loaded again on NOSCRIPT), its reply parsed.
    async fn call<C: Call>(&self, call: &C) -> Result<C::Reply> {
        let inv = call.invocation(&self.keys).prepare();
        let reply: redis::Value = self
            .with(|mut c| async move { Ok(inv.invoke_async(&mut c).await?) })
            .await?;
        Ok(C::parse(reply)?)
    }

    /// A pipeline of EVALSHA calls in `ignore_errors` mode (a missing script shows up as an error
    /// value, not as an error of the call): loads the scripts and sends it again when Redis lost
    /// them.
    async fn run_pipe(&self, pipe: redis::Pipeline) -> Result<Vec<redis::Value>> {
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

    pub async fn ping(&self) -> Result<()> {
        self.with(|mut c| async move {
            let _: String = redis::cmd("PING").query_async(&mut c).await?;
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
