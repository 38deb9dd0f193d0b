//! The coordinator's Redis access: one multiplexed connection, every call bounded by
//! `redis_timeout`, and a record of how healthy this process's view of Redis is.
//!
//! Invariants: no call can hang (tokio timeout around each, plus the connection's own response
//! timeout set explicitly); a failed or timed-out connection is dropped and the next call dials
//! again; scripts go as EVALSHA and are loaded again when Redis lost them (NOSCRIPT). The health
//! record ([`Store::disturbed_at`]) notes every failure and every pause between two successful
//! round trips longer than the stall threshold: the tick refuses to reap for a while after one.

use farm_proto::scripts::{self, Call, ReplyError};
use farm_proto::Keys;
use redis::aio::MultiplexedConnection;
use redis::{FromRedisValue, Pipeline};
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid redis url: {0}")]
    Url(redis::RedisError),
    #[error("redis did not answer {what} within {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("redis failed {what}: {source}")]
    Redis {
        what: &'static str,
        source: redis::RedisError,
    },
    #[error("unexpected redis reply to {what}: {detail}")]
    Protocol { what: &'static str, detail: String },
}

impl StoreError {
    /// A reply that does not say what `what` answers.
    pub fn protocol(what: &'static str, detail: impl Into<String>) -> Self {
        Self::Protocol {
            what,
            detail: detail.into(),
        }
    }
}

impl From<ReplyError> for StoreError {
    fn from(e: ReplyError) -> Self {
        Self::Protocol {
            what: e.script,
            detail: e.detail,
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Default, Clone, Copy)]
struct Health {
    last_ok: Option<Instant>,
    disturbed_at: Option<Instant>,
}

pub struct Store {
    /// A plain URL or a Sentinel set: a new connection goes to the current primary.
    target: farm_proto::redis_url::Target,
    timeout: Duration,
    stall_threshold: Duration,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    health: Mutex<Health>,
}

impl Store {
    pub fn new(url: &str, timeout: Duration, stall_threshold: Duration) -> Result<Self> {
        Ok(Self {
            target: farm_proto::redis_url::parse(url).map_err(|m| {
                StoreError::Url(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "invalid Redis URL",
                    m,
                )))
            })?,
            timeout,
            stall_threshold,
            conn: tokio::sync::Mutex::new(None),
            health: Mutex::new(Health::default()),
        })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// When the last round trip succeeded.
    pub fn last_ok(&self) -> Option<Instant> {
        self.lock_health().last_ok
    }

    /// When a call last failed or a stall between successful calls ended.
    pub fn disturbed_at(&self) -> Option<Instant> {
        self.lock_health().disturbed_at
    }

    fn lock_health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_ok(&self) {
        let now = Instant::now();
        let mut h = self.lock_health();
        if let Some(prev) = h.last_ok {
            if now.duration_since(prev) > self.stall_threshold {
                h.disturbed_at = Some(now);
            }
        }
        h.last_ok = Some(now);
    }

    async fn record_failure(&self) {
        self.lock_health().disturbed_at = Some(Instant::now());
        // The connection may be wedged (a paused server, a half-open socket): dial again next time.
        *self.conn.lock().await = None;
    }

    async fn conn(&self) -> Result<MultiplexedConnection> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = self
            .target
            .connect(self.timeout)
            .await
            .map_err(|source| StoreError::Redis {
                what: "connect",
                source,
            })?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Runs one interaction on the shared connection, bounded by the timeout.
    async fn bounded<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let work = async {
            let conn = self.conn().await?;
            f(conn).await
        };
        let r = match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout {
                what,
                after: self.timeout,
            }),
        };
        match &r {
            Ok(_) => self.record_ok(),
            Err(_) => self.record_failure().await,
        }
        r
    }

    /// One command.
    pub async fn query<T: FromRedisValue>(
        &self,
        what: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T> {
        self.bounded(what, |mut c| async move {
            cmd.query_async(&mut c)
                .await
                .map_err(|source| StoreError::Redis { what, source })
        })
        .await
    }

    /// A pipeline. When it holds EVALSHA calls and Redis lost the scripts (a restart, a failover),
    /// the scripts are loaded and the pipeline sent again: keep such pipelines to one script, so that
    /// NOSCRIPT means none of them ran.
    pub async fn pipe<T: FromRedisValue>(&self, what: &'static str, pipe: &Pipeline) -> Result<T> {
        self.bounded(what, |mut c| async move {
            match pipe.query_async::<T>(&mut c).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    let mut load = redis::pipe();
                    for src in scripts::ALL_SOURCES {
                        load.cmd("SCRIPT").arg("LOAD").arg(*src).ignore();
                    }
                    load.query_async::<()>(&mut c)
                        .await
                        .map_err(|source| StoreError::Redis {
                            what: "SCRIPT LOAD",
                            source,
                        })?;
                    pipe.query_async::<T>(&mut c)
                        .await
                        .map_err(|source| StoreError::Redis { what, source })
                }
                other => other.map_err(|source| StoreError::Redis { what, source }),
            }
        })
        .await
    }

    /// One typed script call (EVALSHA, loading the script on NOSCRIPT), its reply parsed.
    pub async fn call<C: Call>(&self, keys: &Keys, call: &C) -> Result<C::Reply> {
        let what = C::FILE;
        let inv = call.invocation(keys).prepare();
        let reply: redis::Value = self
            .bounded(what, |mut c| async move {
                inv.invoke_async(&mut c)
                    .await
                    .map_err(|source| StoreError::Redis { what, source })
            })
            .await?;
        Ok(C::parse(reply)?)
    }
}

/// `TIME` as milliseconds.
pub fn time_ms(reply: &(String, String)) -> Option<u64> {
    let secs: u64 = reply.0.parse().ok()?;
    let micros: u64 = reply.1.parse().ok()?;
    Some(secs * 1000 + micros / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_reply_parses() {
        assert_eq!(
            time_ms(&("1700000000".into(), "123456".into())),
            Some(1_700_000_000_123)
        );
        assert_eq!(time_ms(&("x".into(), "1".into())), None);
    }

    #[tokio::test]
    async fn unreachable_redis_fails_within_the_timeout_and_counts_as_disturbed() {
        let store = Store::new(
            "redis://127.0.0.1:1/",
            Duration::from_millis(300),
            Duration::from_secs(1),
        )
        .expect("valid url");
        let t0 = Instant::now();
        let err = store
            .query::<String>("PING", &redis::cmd("PING"))
            .await
            .expect_err("nothing listens on port 1");
        assert!(t0.elapsed() < Duration::from_secs(2), "{err}");
        assert!(store.disturbed_at().is_some());
        assert!(store.last_ok().is_none());
    }
}
