//! The coordinator's Redis access: the runtime's [`Conn`] (one multiplexed connection, every call
//! bounded by `redis_timeout`, scripts loaded again on NOSCRIPT), and a record of how healthy this
//! process's view of Redis is.
//!
//! Invariants: no call can hang; any failed call drops the connection and the next call dials
//! again. The health record ([`Store::disturbed_at`]) notes every failure and every pause between
//! two successful round trips longer than the stall threshold: the tick refuses to reap for a while
//! after one.

use farm_proto::scripts::{Call, ReplyError};
use farm_proto::Keys;
use farm_runtime::conn::{Conn, ConnError};
use redis::{FromRedisValue, Pipeline};
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

impl From<ConnError> for StoreError {
    fn from(e: ConnError) -> Self {
        match e {
            ConnError::Connect(source) => Self::Redis {
                what: "connect",
                source,
            },
            ConnError::Timeout { what, after, .. } => Self::Timeout { what, after },
            ConnError::Redis { what, source } => Self::Redis { what, source },
            ConnError::Reply(e) => e.into(),
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
    conn: Conn,
    stall_threshold: Duration,
    health: Mutex<Health>,
}

impl Store {
    pub fn new(url: &str, timeout: Duration, stall_threshold: Duration) -> Result<Self> {
        let target = farm_proto::redis_url::parse(url).map_err(|m| {
            StoreError::Url(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "invalid Redis URL",
                m,
            )))
        })?;
        Ok(Self {
            conn: Conn::new(target, timeout),
            stall_threshold,
            health: Mutex::new(Health::default()),
        })
    }

    pub fn timeout(&self) -> Duration {
        self.conn.timeout()
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

    /// Notes how the call went and turns its error into a [`StoreError`].
    /// A reply a script does not document came back over a working connection: the round trip
    /// counts as a success.
    async fn record<T>(&self, r: std::result::Result<T, ConnError>) -> Result<T> {
        match r {
            Ok(v) => {
                self.record_ok();
                Ok(v)
            }
            Err(ConnError::Reply(e)) => {
                self.record_ok();
                Err(e.into())
            }
            Err(e) => {
                self.lock_health().disturbed_at = Some(Instant::now());
                // The connection may be wedged (a paused server, a half-open socket): dial again
                // next time, whatever failed.
                self.conn.reset().await;
                Err(e.into())
            }
        }
    }

    /// One command.
    pub async fn query<T: FromRedisValue>(
        &self,
        what: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T> {
        let r = self.conn.query(what, cmd).await;
        self.record(r).await
    }

    /// A pipeline. When it holds EVALSHA calls and Redis lost the scripts (a restart, a failover),
    /// the scripts are loaded and the pipeline sent again: keep such pipelines to one script, so that
    /// NOSCRIPT means none of them ran.
    pub async fn pipe<T: FromRedisValue>(&self, what: &'static str, pipe: &Pipeline) -> Result<T> {
        let r = self.conn.pipe(what, pipe).await;
        self.record(r).await
    }

    /// One typed script call (EVALSHA, loading the script on NOSCRIPT), its reply parsed.
    pub async fn call<C: Call>(&self, keys: &Keys, call: &C) -> Result<C::Reply> {
        let r = self.conn.call(keys, call).await;
        self.record(r).await
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

    /// That the call fails within the timeout is the runtime's `Conn`'s test; the store notes it.
    #[tokio::test]
    async fn a_failed_call_counts_as_disturbed() {
        let store = Store::new(
            "redis://127.0.0.1:1/",
            Duration::from_millis(300),
            Duration::from_secs(1),
        )
        .expect("valid url");
        let err = store.query::<String>("PING", &redis::cmd("PING")).await;
        assert!(err.is_err(), "nothing listens on port 1");
        assert!(store.disturbed_at().is_some());
        assert!(store.last_ok().is_none());
    }
}
