//! The node's Redis access: every call it makes, each bounded by `redis_timeout`.
//!
//! Keys come only from [`farm_proto::Keys`], script calls only from [`farm_proto::scripts`]' typed
//! calls (KEYS, ARGV and replies live there). A [`Store`] runs every call over the runtime's
//! [`Conn`] (one multiplexed connection, dialled again when it broke, scripts loaded again on
//! NOSCRIPT); [`Store::dedicated`] gives a second `Store` with a connection of its own, which the
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
mod read;

pub use keepalive::{Beat, Keepalive, Renewal};
pub use read::RemoteView;

use farm_proto::scripts::{Call, ReplyError};
use farm_proto::Keys;
use farm_runtime::conn::{Conn, ConnError};
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

impl From<ConnError> for StoreError {
    fn from(e: ConnError) -> Self {
        match e {
            ConnError::Connect(e) => Self::Pool(e.to_string()),
            ConnError::Timeout { after, .. } => Self::Timeout(after),
            ConnError::Redis { source, .. } => Self::Redis(source),
            ConnError::Reply(e) => e.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Redis access for one node: cheap to clone, the clones share one connection.
#[derive(Clone)]
pub struct Store {
    conn: Conn,
    keys: Keys,
}

impl Store {
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self> {
        let target = farm_proto::redis_url::parse(url).map_err(StoreError::Pool)?;
        Ok(Self {
            conn: Conn::new(target, timeout),
            keys: Keys::new(prefix),
        })
    }

    /// The same Redis through a connection of its own: the keepalive's, so a renewal never waits
    /// behind a burst of starts on the shared one.
    pub fn dedicated(&self) -> Store {
        Store {
            conn: self.conn.dedicated(),
            keys: self.keys.clone(),
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Runs one Redis interaction, bounded by the timeout.
    async fn with<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        crate::metrics::redis_call();
        let what = "a call";
        let r = self
            .conn
            .run(what, |c| async move {
                f(c).await
                    .map_err(|source| ConnError::Redis { what, source })
            })
            .await;
        Ok(r?)
    }

    /// One typed script call (EVALSHA, the script loaded again on NOSCRIPT), its reply parsed.
    async fn call<C: Call>(&self, call: &C) -> Result<C::Reply> {
        crate::metrics::redis_call();
        Ok(self.conn.call(&self.keys, call).await?)
    }

    /// A pipeline of EVALSHA calls in `ignore_errors` mode: one reply per call, a server error as
    /// its value; the scripts loaded again when Redis lost them.
    async fn run_pipe(
        &self,
        what: &'static str,
        pipe: redis::Pipeline,
    ) -> Result<Vec<redis::Value>> {
        crate::metrics::redis_call();
        Ok(self.conn.pipe_values(what, &pipe).await?)
    }

    pub async fn ping(&self) -> Result<()> {
        self.with(|mut c| async move {
            let _: String = redis::cmd("PING").query_async(&mut c).await?;
            Ok(())
        })
        .await
    }

    /// Where Redis is (plain or Sentinel), for connections of their own.
    pub fn target(&self) -> &farm_proto::redis_url::Target {
        self.conn.target()
    }

    pub fn timeout(&self) -> Duration {
        self.conn.timeout()
    }
}
