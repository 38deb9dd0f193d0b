//! What every farmctl command gets: the key names, the allowed URL schemes and a lazily opened
//! Redis connection whose every call is bounded by `--redis-timeout`.
//!
//! The connection is opened on first use, so commands validate their input before touching the
//! network (bad input exits 2 even when Redis is down) and commands that need no Redis never dial.

use super::error::CtlError;
use super::GlobalArgs;
use farm_proto::scripts::Call;
use farm_proto::Keys;
use redis::aio::MultiplexedConnection;
use redis::{FromRedisValue, Pipeline};
use std::future::Future;
use std::time::Duration;

pub struct Ctx {
    keys: Keys,
    allowed_schemes: Vec<String>,
    /// A plain URL or a Sentinel set.
    target: farm_proto::redis_url::Target,
    /// The URL with any password masked, for messages.
    shown_url: String,
    timeout: Duration,
    conn: Option<MultiplexedConnection>,
}

impl Ctx {
    /// Checks the global options; opens nothing.
    pub fn new(global: GlobalArgs) -> Result<Self, CtlError> {
        let shown_url = mask_password(&global.redis_url);
        let target = farm_proto::redis_url::parse(&global.redis_url)
            .map_err(|e| CtlError::Usage(format!("invalid --redis-url {shown_url:?}: {e}")))?;
        check_prefix(&global.prefix)?;
        let allowed_schemes: Vec<String> = global
            .allowed_schemes
            .iter()
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        if allowed_schemes.is_empty() {
            return Err(CtlError::Usage(
                "--allowed-schemes is empty: list at least one URL scheme, e.g. http,https".into(),
            ));
        }
        Ok(Self {
            keys: Keys::new(global.prefix),
            allowed_schemes,
            target,
            shown_url,
            timeout: global.redis_timeout,
            conn: None,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn allowed_schemes(&self) -> &[String] {
        &self.allowed_schemes
    }

    async fn conn(&mut self) -> Result<&mut MultiplexedConnection, CtlError> {
        if self.conn.is_none() {
            // tokio's timeout below is the bound that fires (the connection's own is set a second
            // later), so every timeout surfaces as CtlError::Timeout with the same wording.
            let connect = self.target.connect(self.timeout + Duration::from_secs(1));
            let conn = match tokio::time::timeout(self.timeout, connect).await {
                Ok(Ok(c)) => c,
                Ok(Err(source)) => {
                    return Err(CtlError::Connect {
                        url: self.shown_url.clone(),
                        source,
                    })
                }
                Err(_) => return Err(self.timed_out("the connection attempt")),
            };
            self.conn = Some(conn);
        }
        match self.conn.as_mut() {
            Some(c) => Ok(c),
            None => Err(CtlError::Usage("no Redis connection".into())), // unreachable: set above
        }
    }

    fn timed_out(&self, what: &'static str) -> CtlError {
        CtlError::Timeout {
            url: self.shown_url.clone(),
            what,
            after: self.timeout,
        }
    }

    async fn bounded<T>(
        &self,
        what: &'static str,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, CtlError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(CtlError::Redis { what, source }),
            Err(_) => Err(self.timed_out(what)),
        }
    }

    /// Runs one command; `what` names it in errors (e.g. "HGETALL").
    pub async fn query<T: FromRedisValue>(
        &mut self,
        what: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, CtlError> {
        let mut conn = self.conn().await?.clone();
        self.bounded(what, cmd.query_async(&mut conn)).await
    }

    /// Runs one typed script call (EVALSHA, loading the script on NOSCRIPT), its reply parsed.
    pub async fn call<C: Call>(&mut self, call: &C) -> Result<C::Reply, CtlError> {
        let what = C::FILE;
        let inv = call.invocation(&self.keys).prepare();
        let mut conn = self.conn().await?.clone();
        let reply: redis::Value = self.bounded(what, inv.invoke_async(&mut conn)).await?;
        C::parse(reply).map_err(|e| CtlError::Redis {
            what,
            source: redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "unexpected reply",
                e.detail,
            )),
        })
    }

    /// The bound on every Redis call (`--redis-timeout`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs a pipeline (or a MULTI/EXEC transaction when it is `atomic()`).
    pub async fn query_pipe<T: FromRedisValue>(
        &mut self,
        what: &'static str,
        pipe: &Pipeline,
    ) -> Result<T, CtlError> {
        let mut conn = self.conn().await?.clone();
        self.bounded(what, pipe.query_async(&mut conn)).await
    }
}

/// Key prefixes: 1 to 64 of `A-Z a-z 0-9 _ . : -` (no spaces, no glob characters).
fn check_prefix(prefix: &str) -> Result<(), CtlError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(CtlError::Usage(format!(
            "invalid --prefix {prefix:?}: use 1 to 64 characters from A-Z, a-z, 0-9, '_', '.', ':' and '-'"
        )))
    }
}

/// `redis://user:secret@host/` → `redis://user:***@host/`, for messages.
fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(), // a user name only
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            mask_password("redis://127.0.0.1:6379/"),
            "redis://127.0.0.1:6379/"
        );
        assert_eq!(
            mask_password("redis://farm:s3cret@h:6379/0"),
            "redis://farm:***@h:6379/0"
        );
        assert_eq!(mask_password("redis://:s3cret@h/"), "redis://:***@h/");
        assert_eq!(mask_password("rediss://a:b@c@h"), "rediss://a:***@h");
        assert_eq!(mask_password("redis://farm@h/"), "redis://farm@h/");
        assert_eq!(mask_password("nonsense"), "nonsense");
    }

    #[test]
    fn prefixes() {
        for ok in ["farm", "tenant:farm", "a.b-c_d"] {
            assert!(check_prefix(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "farm*", "x\n", &"p".repeat(65)] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
    }
}
