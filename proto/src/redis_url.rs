//! Where the farm's Redis is: a plain URL (`redis://[user:password@]host:port/db`) or a Sentinel
//! set (`redis+sentinel://[user:password@]host1:port1,host2:port2,.../<master name>[/db]`), in
//! which case every new connection asks the sentinels for the current primary, so a component
//! that drops a broken connection follows a failover by itself.

use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, RedisConnectionInfo};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Direct {
        url: String,
    },
    Sentinel {
        /// `redis://host:port` of each sentinel.
        sentinels: Vec<String>,
        master: String,
        username: Option<String>,
        password: Option<String>,
        db: i64,
    },
}

/// Parses a plain or `redis+sentinel://` URL; the error is a sentence for the operator.
pub fn parse(url: &str) -> Result<Target, String> {
    let Some(rest) = url.strip_prefix("redis+sentinel://") else {
        redis::Client::open(url).map_err(|e| format!("invalid Redis URL {}: {e}", redact(url)))?;
        return Ok(Target::Direct {
            url: url.to_string(),
        });
    };
    let bad = |why: &str| format!("invalid Sentinel URL {}: {why}", redact(url));
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((a, r)) => (Some(a), r),
        None => (None, rest),
    };
    let (hosts, path) = rest
        .split_once('/')
        .ok_or_else(|| bad("no master name after the hosts"))?;
    let mut parts = path.split('/');
    let master = parts
        .next()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| bad("no master name"))?;
    let db = match parts.next() {
        None | Some("") => 0,
        Some(d) => d.parse().map_err(|_| bad("the database is not a number"))?,
    };
    let sentinels: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("redis://{h}/"))
        .collect();
    if sentinels.is_empty() {
        return Err(bad("no sentinel host"));
    }
    for s in &sentinels {
        redis::Client::open(s.as_str()).map_err(|e| bad(&e.to_string()))?;
    }
    let (username, password) = match auth {
        None => (None, None),
        Some(a) => match a.split_once(':') {
            Some((u, p)) => ((!u.is_empty()).then(|| u.to_string()), Some(p.to_string())),
            None => (None, Some(a.to_string())),
        },
    };
    Ok(Target::Sentinel {
        sentinels,
        master: master.to_string(),
        username,
        password,
        db,
    })
}

/// The URL with any password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let auth = &url[s + 3..at];
            match auth.split_once(':') {
                Some((u, _)) => format!("{}{u}:***{}", &url[..s + 3], &url[at..]),
                None => format!("{}***{}", &url[..s + 3], &url[at..]),
            }
        }
        _ => url.to_string(),
    }
}

impl Target {
    /// The `(host, port)` of every server this target names (the Redis, or each sentinel).
    pub fn addresses(&self) -> Vec<(String, u16)> {
        let urls: Vec<&str> = match self {
            Target::Direct { url } => vec![url.as_str()],
            Target::Sentinel { sentinels, .. } => sentinels.iter().map(String::as_str).collect(),
        };
        urls.into_iter()
            .filter_map(|u| host_port(u, 6379))
            .collect()
    }

    /// The connection settings of the primary a Sentinel set names.
    pub fn node_info(&self) -> Option<SentinelNodeConnectionInfo> {
        let Target::Sentinel {
            username,
            password,
            db,
            ..
        } = self
        else {
            return None;
        };
        let mut info = RedisConnectionInfo::default().set_db(*db);
        if let Some(u) = username {
            info = info.set_username(u);
        }
        if let Some(p) = password {
            info = info.set_password(p);
        }
        Some(SentinelNodeConnectionInfo::default().set_redis_connection_info(info))
    }

    /// A new multiplexed connection (to the current primary, for a Sentinel set).
    pub async fn connect(
        &self,
        response_timeout: Duration,
    ) -> redis::RedisResult<MultiplexedConnection> {
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(response_timeout))
            .set_response_timeout(Some(response_timeout));
        match self {
            Target::Direct { url } => {
                redis::Client::open(url.as_str())?
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await
            }
            Target::Sentinel {
                sentinels, master, ..
            } => {
                let mut client = SentinelClient::build(
                    sentinels.clone(),
                    master.clone(),
                    self.node_info(),
                    SentinelServerType::Master,
                )?;
                client.get_async_connection_with_config(&cfg).await
            }
        }
    }
}

/// Host (lowercase, IPv6 without brackets) and port of a URL's authority, `default_port` when none
/// is written. `None` without a host, or with a port that is not 1–65535.
pub fn host_port(url: &str, default_port: u16) -> Option<(String, u16)> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    split_host_port(authority.rsplit('@').next()?, default_port)
}

/// Splits `host[:port]` or `[v6][:port]` (a URL authority without credentials, a `CONNECT`
/// target) like [`host_port`].
pub fn split_host_port(hostport: &str, default_port: u16) -> Option<(String, u16)> {
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, tail) = v6.split_once(']')?;
        (h, tail.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => default_port,
    };
    if host.is_empty() || port == 0 {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_sentinel_urls() {
        assert_eq!(
            parse("redis://127.0.0.1:6379/"),
            Ok(Target::Direct {
                url: "redis://127.0.0.1:6379/".into()
            })
        );
        assert_eq!(
            parse("redis+sentinel://u:pw@10.0.0.1:26379,10.0.0.2:26379/farm/2"),
            Ok(Target::Sentinel {
                sentinels: vec![
                    "redis://10.0.0.1:26379/".into(),
                    "redis://10.0.0.2:26379/".into()
                ],
                master: "farm".into(),
                username: Some("u".into()),
                password: Some("pw".into()),
                db: 2,
            })
        );
        assert!(parse("redis+sentinel://10.0.0.1:26379").is_err());
        assert!(parse("redis+sentinel://10.0.0.1:26379/").is_err());
        assert!(parse("redis+sentinel://10.0.0.1:26379/m/x").is_err());
        assert!(parse("http://x").is_err());
        assert_eq!(
            redact("redis://farm-node:s3cret@h:1/"),
            "redis://farm-node:***@h:1/"
        );
        assert!(parse("redis+sentinel://u:s3cret@h:1/m")
            .expect("ok")
            .node_info()
            .is_some());
    }

    #[test]
    fn authorities() {
        assert_eq!(
            host_port("redis://u:pw@Redis.Example/", 6379),
            Some(("redis.example".into(), 6379))
        );
        assert_eq!(
            split_host_port("[::1]:26379", 0),
            Some(("::1".into(), 26379))
        );
        assert_eq!(split_host_port("h", 80), Some(("h".into(), 80)));
        for bad in ["", ":80", "h:0", "h:99999", "[::1", "h:x"] {
            assert_eq!(split_host_port(bad, 80), None, "{bad}");
        }
        assert_eq!(split_host_port("h", 0), None, "no port and no default");
    }
}
