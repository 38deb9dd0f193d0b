//! The coordinator's settings, parsed once: command-line flag, then `FARM_*` environment variable,
//! then the default. Nothing else in the coordinator reads the environment.
//!
//! The TTLs are the farm's, not the coordinator's own: `--node-ttl` and `--lease-ttl` must match
//! what the nodes run with (they read the same `FARM_NODE_TTL` / `FARM_LEASE_TTL`).

use clap::Parser;
use farm_proto::duration;
use std::net::SocketAddr;
use std::time::Duration;

/// Command-line flags of `farm-coordinator`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "farm-coordinator",
    version,
    max_term_width = 100,
    about = "streamfarm coordinator: stops idle channels, reaps dead nodes and stale keys, \
re-homes watched channels; several may run, one leads"
)]
pub struct Args {
    /// Redis URL (redis://[user:password@]host:port/db).
    #[arg(
        long,
        env = "FARM_REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub redis_url: String,
    /// Key prefix in Redis.
    #[arg(long, env = "FARM_PREFIX", default_value = farm_proto::keys::DEFAULT_PREFIX)]
    pub prefix: String,
    /// This coordinator's id, unique among coordinators (A-Z a-z 0-9 _ - .). [default: <host>-<pid>]
    #[arg(long, env = "FARM_COORDINATOR_ID")]
    pub id: Option<String>,
    /// Address of the HTTP server (/metrics, /healthz).
    #[arg(long, env = "FARM_LISTEN", default_value = "127.0.0.1:9180")]
    pub listen: SocketAddr,
    /// A channel nobody requested for this long is stopped (unless pinned).
    #[arg(long, env = "FARM_IDLE_TIMEOUT", default_value = "60s", value_parser = duration::parse)]
    pub idle_timeout: Duration,
    /// How often the leader looks for idle channels, dead nodes and stale keys.
    #[arg(long, env = "FARM_TICK", default_value = "1s", value_parser = duration::parse)]
    pub tick: Duration,
    /// Node liveness TTL, as the nodes use it: a node silent for this long is dead.
    #[arg(long, env = "FARM_NODE_TTL", default_value = "10s", value_parser = duration::parse)]
    pub node_ttl: Duration,
    /// Channel owner lease TTL, as the nodes use it.
    #[arg(long, env = "FARM_LEASE_TTL", default_value = "10s", value_parser = duration::parse)]
    pub lease_ttl: Duration,
    /// TTL of the leader lease (farm:leader); renewed every third of it.
    #[arg(long, env = "FARM_LEADER_TTL", default_value = "10s", value_parser = duration::parse)]
    pub leader_ttl: Duration,
    /// Bound on every Redis call.
    #[arg(long, env = "FARM_REDIS_TIMEOUT", default_value = "2s", value_parser = duration::parse)]
    pub redis_timeout: Duration,
    /// Idle channels read from farm:access per round trip.
    #[arg(long, env = "FARM_IDLE_BATCH", default_value_t = 500)]
    pub idle_batch: usize,
    /// Most stop commands sent per tick (the rest wait for the next tick).
    #[arg(long, env = "FARM_MAX_IDLE_STOPS", default_value_t = 5000)]
    pub max_idle_stops: usize,
    /// Most keys reaped per tick (dead nodes' channels and stale keys); reaping is rate-limited.
    #[arg(long, env = "FARM_MAX_REAPS", default_value_t = 500)]
    pub max_reaps: usize,
    /// Channels checked per tick by the stale-key reconciliation (it cycles through them).
    #[arg(long, env = "FARM_RECONCILE_BATCH", default_value_t = 200)]
    pub reconcile_batch: usize,
    /// Bound on a graceful shutdown.
    #[arg(long, env = "FARM_SHUTDOWN_GRACE", default_value = "5s", value_parser = duration::parse)]
    pub shutdown_grace: Duration,
}

/// The coordinator's resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub redis_url: String,
    pub prefix: String,
    pub id: String,
    pub listen: SocketAddr,
    pub idle_timeout: Duration,
    pub tick: Duration,
    pub node_ttl: Duration,
    pub lease_ttl: Duration,
    pub leader_ttl: Duration,
    pub redis_timeout: Duration,
    pub idle_batch: usize,
    pub max_idle_stops: usize,
    pub max_reaps: usize,
    pub reconcile_batch: usize,
    pub shutdown_grace: Duration,
    /// How long a new leader (or one whose Redis view was disturbed) waits before it reaps.
    /// One `node_ttl` unless a test or benchmark says otherwise.
    pub reap_settle: Duration,
}

/// A setting that cannot be used, with the sentence to show the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Resolves and checks the flags.
    pub fn from_args(a: Args) -> Result<Self, ConfigError> {
        let id = a.id.unwrap_or_else(default_id);
        farm_proto::validate::node_id(&id).map_err(|e| {
            ConfigError(format!(
                "--id: {}",
                e.to_string().replace("node id", "coordinator id")
            ))
        })?;
        let cfg = Config {
            redis_url: a.redis_url,
            prefix: a.prefix,
            id,
            listen: a.listen,
            idle_timeout: a.idle_timeout,
            tick: a.tick,
            node_ttl: a.node_ttl,
            lease_ttl: a.lease_ttl,
            leader_ttl: a.leader_ttl,
            redis_timeout: a.redis_timeout,
            idle_batch: a.idle_batch,
            max_idle_stops: a.max_idle_stops,
            max_reaps: a.max_reaps,
            reconcile_batch: a.reconcile_batch,
            shutdown_grace: a.shutdown_grace,
            reap_settle: a.node_ttl,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// A configuration with the defaults for this Redis and id (tests and benchmarks adjust fields).
    /// Same values as the flags' defaults; reads no environment.
    pub fn new(redis_url: impl Into<String>, id: impl Into<String>) -> Self {
        Config {
            redis_url: redis_url.into(),
            prefix: farm_proto::keys::DEFAULT_PREFIX.into(),
            id: id.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 9180)),
            idle_timeout: Duration::from_secs(60),
            tick: Duration::from_secs(1),
            node_ttl: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(10),
            leader_ttl: Duration::from_secs(10),
            redis_timeout: Duration::from_secs(2),
            idle_batch: 500,
            max_idle_stops: 5000,
            max_reaps: 500,
            reconcile_batch: 200,
            shutdown_grace: Duration::from_secs(5),
            reap_settle: Duration::from_secs(10),
        }
    }

    /// Checks the relations between settings; the error says which one to change.
    pub fn check(&self) -> Result<(), ConfigError> {
        let pos = |name: &str, d: Duration| {
            if d.is_zero() {
                Err(ConfigError(format!("--{name} must be longer than 0")))
            } else {
                Ok(())
            }
        };
        pos("idle-timeout", self.idle_timeout)?;
        pos("tick", self.tick)?;
        pos("node-ttl", self.node_ttl)?;
        pos("lease-ttl", self.lease_ttl)?;
        pos("leader-ttl", self.leader_ttl)?;
        pos("redis-timeout", self.redis_timeout)?;
        if self.tick * 2 > self.node_ttl {
            return Err(ConfigError(format!(
                "--tick {} is too long for --node-ttl {}: use at most half of the node TTL",
                duration::format(self.tick),
                duration::format(self.node_ttl)
            )));
        }
        if self.leader_ttl < Duration::from_millis(300) {
            return Err(ConfigError(
                "--leader-ttl must be at least 300ms (it is renewed every third of it)".into(),
            ));
        }
        for (name, n) in [
            ("idle-batch", self.idle_batch),
            ("max-idle-stops", self.max_idle_stops),
            ("max-reaps", self.max_reaps),
            ("reconcile-batch", self.reconcile_batch),
        ] {
            if n == 0 {
                return Err(ConfigError(format!("--{name} must be at least 1")));
            }
        }
        if farm_proto::validate::channel_id(&self.prefix.replace([':', '.'], "_")).is_err() {
            return Err(ConfigError(format!(
                "invalid --prefix {:?}: use 1 to 64 characters from A-Z, a-z, 0-9, '_', '.', ':' and '-'",
                self.prefix
            )));
        }
        Ok(())
    }

    /// How often the leader renews (and a follower retries) the leader lease.
    pub fn leader_renew_interval(&self) -> Duration {
        self.leader_ttl / 3
    }

    /// The longest pause between two successful Redis round trips that is still normal. A longer one
    /// means Redis (or this process) stalled: heartbeats may look old for reasons that are not the
    /// nodes', so reaping waits `reap_settle`. A stall shorter than this cannot make a live node look
    /// dead: its heartbeat age stays below a third of the node TTL plus the stall.
    pub fn stall_threshold(&self) -> Duration {
        // Every coordinator makes a round trip each tick (followers too), so 2 ticks is abnormal.
        (self.node_ttl / 3).max(self.tick * 2)
    }

    /// How long a stop command is considered in flight before it may be sent again.
    pub fn stop_resend_after(&self) -> Duration {
        self.lease_ttl + self.node_ttl
    }

    /// `by` in the commands this coordinator sends.
    pub fn by(&self) -> String {
        format!("coordinator:{}", self.id)
    }
}

/// `<host>-<pid>`, made to fit the id alphabet.
fn default_id() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    let host = if host.is_empty() {
        "coordinator".to_string()
    } else {
        host
    };
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_and_bad_relations_are_refused() {
        let cfg = Config::from_args(Args::parse_from(["farm-coordinator", "--id", "c1"]))
            .expect("defaults are valid");
        assert_eq!(cfg.id, "c1");
        assert_eq!(cfg.idle_timeout, Duration::from_secs(60));
        assert_eq!(cfg.reap_settle, cfg.node_ttl);
        assert!(cfg.stall_threshold() < cfg.node_ttl * 2 / 3);

        let err = Config::from_args(Args::parse_from([
            "farm-coordinator",
            "--tick",
            "5s",
            "--node-ttl",
            "6s",
        ]))
        .expect_err("tick too long");
        assert!(err.to_string().contains("--tick 5s"), "{err}");
        let err = Config::from_args(Args::parse_from(["farm-coordinator", "--id", "a:b"]))
            .expect_err("bad id");
        assert!(err.to_string().contains("coordinator id"), "{err}");
        assert!(Args::try_parse_from(["farm-coordinator", "--idle-timeout", "soon"]).is_err());
        let err = Config::from_args(Args::parse_from(["farm-coordinator", "--tick", "0s"]))
            .expect_err("zero tick");
        assert!(
            err.to_string().contains("--tick must be longer than 0"),
            "{err}"
        );
    }

    #[test]
    fn new_gives_defaults_for_a_redis() {
        let cfg = Config::new("redis://127.0.0.1:1/", "bench");
        assert_eq!(cfg.id, "bench");
        assert_eq!(cfg.redis_url, "redis://127.0.0.1:1/");
        assert_eq!(cfg.by(), "coordinator:bench");
    }
}
