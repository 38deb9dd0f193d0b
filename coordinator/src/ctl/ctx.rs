//! What every farmctl command gets: the key names, the allowed URL schemes and a lazily opened
//! Redis connection (the runtime's [`Conn`]) whose every call is bounded by `--redis-timeout`.
//!
//! The connection is opened on first use, so commands validate their input before touching the
//! network (bad input exits 2 even when Redis is down) and commands that need no Redis never dial.

use super::error::CtlError;
use super::GlobalArgs;
use farm_proto::scripts::Call;
use farm_proto::Keys;
use farm_runtime::conn::{Conn, ConnError};
use redis::{FromRedisValue, Pipeline};
use std::time::Duration;

pub struct Ctx {
    keys: Keys,
    allowed_schemes: Vec<String>,
    /// The URL with any password masked, for messages.
    shown_url: String,
    /// Dialled on first use; every call bounded by `--redis-timeout`.
    conn: Conn,
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
            shown_url,
            conn: Conn::new(target, global.redis_timeout),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn allowed_schemes(&self) -> &[String] {
        &self.allowed_schemes
    }

    /// A runtime error as farmctl reports it (the URL shown with its password masked).
    fn error(&self, e: ConnError) -> CtlError {
        match e {
            ConnError::Connect(source) => CtlError::Connect {
                url: self.shown_url.clone(),
                source,
            },
            ConnError::Timeout {
                what,
                after,
                dialling,
            } => CtlError::Timeout {
                url: self.shown_url.clone(),
                what: if dialling {
                    "the connection attempt"
                } else {
                    what
                },
                after,
            },
            ConnError::Redis { what, source } => CtlError::Redis { what, source },
            ConnError::Reply(e) => CtlError::Redis {
                what: e.script,
                source: redis::RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "unexpected reply",
                    e.detail,
                )),
            },
        }
    }

    /// Runs one command; `what` names it in errors (e.g. "HGETALL").
    pub async fn query<T: FromRedisValue>(
        &mut self,
        what: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, CtlError> {
        self.conn.query(what, cmd).await.map_err(|e| self.error(e))
    }

    /// Runs one typed script call (EVALSHA, loading the script on NOSCRIPT), its reply parsed.
    pub async fn call<C: Call>(&mut self, call: &C) -> Result<C::Reply, CtlError> {
        self.conn
            .call(&self.keys, call)
            .await
            .map_err(|e| self.error(e))
    }

    /// The bound on every Redis call (`--redis-timeout`).
    pub fn timeout(&self) -> Duration {
        self.conn.timeout()
    }

    /// Runs a pipeline (or a MULTI/EXEC transaction when it is `atomic()`).
    pub async fn query_pipe<T: FromRedisValue>(
        &mut self,
        what: &'static str,
        pipe: &Pipeline,
    ) -> Result<T, CtlError> {
        self.conn.pipe(what, pipe).await.map_err(|e| self.error(e))
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
