//! One Redis connection type for both daemons and farmctl: every call bounded by one timeout, the
//! connection dialled on first use and again after it broke, scripts loaded again when Redis lost
//! them, one error type.
//!
//! Invariants: no call can hang (a tokio timeout around each, dial included, plus the connection's
//! own response timeout); a connection that timed out or failed at the I/O level is dropped and the
//! next call dials again (to the current primary, for a Sentinel set); a reply that is not what a
//! script documents is a [`ConnError::Reply`], which says nothing about the connection.
//!
//! A [`Conn`] is cheap to clone and its clones share one multiplexed connection (redis-rs pipelines
//! concurrent calls over it); [`Conn::dedicated`] gives one with a connection of its own.

use farm_proto::redis_url::Target;
use farm_proto::scripts::{self, Call, ReplyError};
use farm_proto::Keys;
use redis::aio::MultiplexedConnection;
use redis::{FromRedisValue, Pipeline, RedisError, Value};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// What a Redis call can end in.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// No connection could be opened (refused, unknown host, no primary known to the sentinels).
    #[error("cannot connect to redis: {0}")]
    Connect(RedisError),
    /// The call (dial included) did not finish within the timeout; `dialling`: it was still
    /// opening the connection.
    #[error("redis did not answer {what} within {after:?}")]
    Timeout {
        what: &'static str,
        after: Duration,
        dialling: bool,
    },
    /// Redis answered with an error, or the connection failed during the call.
    #[error("redis failed {what}: {source}")]
    Redis {
        what: &'static str,
        source: RedisError,
    },
    /// A script answered something it does not document.
    #[error(transparent)]
    Reply(#[from] ReplyError),
}

impl ConnError {
    /// The peer may be gone (a timeout, a failed dial, an I/O error): the connection is not trusted
    /// any more. A server error or a bad reply is about one piece of data, not the connection.
    pub fn is_disconnect(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Timeout { .. } => true,
            Self::Redis { source, .. } => {
                source.is_io_error() || source.is_connection_dropped() || source.is_timeout()
            }
            Self::Reply(_) => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, ConnError>;

/// A lazily dialled, shared, bounded Redis connection.
#[derive(Clone)]
pub struct Conn {
    target: Target,
    timeout: Duration,
    hot: Arc<tokio::sync::Mutex<Option<MultiplexedConnection>>>,
}

impl Conn {
    /// Dials nothing yet: the first call does.
    pub fn new(target: Target, timeout: Duration) -> Self {
        Self {
            target,
            timeout,
            hot: Default::default(),
        }
    }

    /// The same Redis through a connection of its own (for a loop whose calls must never queue
    /// behind another's burst).
    pub fn dedicated(&self) -> Self {
        Self::new(self.target.clone(), self.timeout)
    }

    /// Where Redis is (plain or Sentinel).
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The bound on every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Drops the connection: the next call dials again.
    pub async fn reset(&self) {
        *self.hot.lock().await = None;
    }

    /// The shared connection, dialled when there is none. Callers wait behind one dial.
    async fn conn(&self) -> Result<MultiplexedConnection> {
        let mut guard = self.hot.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        // The connection's own bounds sit a second behind the call's, so that the call's is the
        // one that fires and every timeout reads the same.
        let c = self
            .target
            .connect(self.timeout + Duration::from_secs(1))
            .await
            .map_err(ConnError::Connect)?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Runs one interaction (`what` names it in errors), bounded by the timeout, dial included. A
    /// connection that may be broken is dropped.
    pub async fn run<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let timed_out = |dialling| ConnError::Timeout {
            what,
            after: self.timeout,
            dialling,
        };
        let res = match tokio::time::timeout_at(deadline, self.conn()).await {
            Err(_) => Err(timed_out(true)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(c)) => match tokio::time::timeout_at(deadline, f(c)).await {
                Err(_) => Err(timed_out(false)),
                Ok(r) => r,
            },
        };
        if matches!(&res, Err(e) if e.is_disconnect()) {
            self.reset().await;
        }
        res
    }

    /// One command.
    pub async fn query<T: FromRedisValue>(
        &self,
        what: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T> {
        self.run(what, |mut c| async move {
            cmd.query_async(&mut c)
                .await
                .map_err(|source| ConnError::Redis { what, source })
        })
        .await
    }

    /// A pipeline (or a MULTI/EXEC transaction when it is `atomic()`). When it holds EVALSHA calls
    /// and Redis lost the scripts (a restart, a failover), the scripts are loaded and the pipeline
    /// sent again: keep such pipelines to one script, so that NOSCRIPT means none of them ran.
    pub async fn pipe<T: FromRedisValue>(&self, what: &'static str, pipe: &Pipeline) -> Result<T> {
        self.run(what, |mut c| async move {
            let redis_err = |source| ConnError::Redis { what, source };
            match pipe.query_async::<T>(&mut c).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    load_scripts(&mut c).await?;
                    pipe.query_async::<T>(&mut c).await.map_err(redis_err)
                }
                other => other.map_err(redis_err),
            }
        })
        .await
    }

    /// A pipeline in `ignore_errors` mode: one reply per call, a server error as its value (one
    /// bad key fails its own call, not the round trip). A missing script (NOSCRIPT in any reply)
    /// loads the scripts and sends the pipeline again.
    pub async fn pipe_values(&self, what: &'static str, pipe: &Pipeline) -> Result<Vec<Value>> {
        self.run(what, |mut c| async move {
            let redis_err = |source| ConnError::Redis { what, source };
            let out: Vec<Value> = pipe.query_async(&mut c).await.map_err(redis_err)?;
            let noscript = out
                .iter()
                .any(|v| matches!(v, Value::ServerError(e) if e.code() == "NOSCRIPT"));
            if !noscript {
                return Ok(out);
            }
            load_scripts(&mut c).await?;
            pipe.query_async(&mut c).await.map_err(redis_err)
        })
        .await
    }

    /// One typed script call (EVALSHA, the script loaded again on NOSCRIPT), its reply parsed.
    pub async fn call<C: Call>(&self, keys: &Keys, call: &C) -> Result<C::Reply> {
        let what = C::FILE;
        let inv = call.invocation(keys).prepare();
        let reply: Value = self
            .run(what, |mut c| async move {
                inv.invoke_async(&mut c)
                    .await
                    .map_err(|source| ConnError::Redis { what, source })
            })
            .await?;
        Ok(C::parse(reply)?)
    }
}

/// `SCRIPT LOAD` of every farm script, before a pipeline of EVALSHA calls is sent again.
async fn load_scripts(c: &mut MultiplexedConnection) -> Result<()> {
    let mut load = redis::pipe();
    for src in scripts::ALL_SOURCES {
        load.cmd("SCRIPT").arg("LOAD").arg(*src).ignore();
    }
    load.query_async::<()>(c)
        .await
        .map_err(|source| ConnError::Redis {
            what: "SCRIPT LOAD",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn an_unreachable_redis_fails_within_the_timeout() {
        let target = farm_proto::redis_url::parse("redis://127.0.0.1:1/").expect("valid url");
        let conn = Conn::new(target, Duration::from_millis(300));
        let t0 = Instant::now();
        let err = conn
            .query::<String>("PING", &redis::cmd("PING"))
            .await
            .expect_err("nothing listens on port 1");
        assert!(t0.elapsed() < Duration::from_secs(2), "{err}");
        assert!(err.is_disconnect(), "{err}");
    }

    #[test]
    fn a_bad_reply_is_not_a_disconnect() {
        let e = ConnError::Reply(ReplyError::new("claim.lua", "x"));
        assert!(!e.is_disconnect());
    }
}
