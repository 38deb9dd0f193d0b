//! The coordinator's settings, parsed once: command-line flag, then `FARM_*` environment variable,
//! then the optional TOML file (`--config`, keys as the long flag names with `_` for `-`, as the
//! node's), then the default (the mechanism is `farm_runtime::config`). Nothing else in the
//! coordinator reads the environment.
//!
//! The TTLs are the farm's, not the coordinator's own: `--node-ttl` and `--lease-ttl` must match
//! what the nodes run with (they read the same `FARM_NODE_TTL` / `FARM_LEASE_TTL`). The timing
//! relations built on them are `farm_proto::timing`'s.

use farm_proto::{duration, timing};
use std::net::SocketAddr;
use std::time::Duration;

pub use farm_runtime::config::ConfigError;

farm_runtime::settings! {
    /// Command-line flags of `farm-coordinator`.
    #[derive(Debug, Clone, Default, clap::Parser)]
    #[command(
        name = "farm-coordinator",
        version,
        max_term_width = 100,
        about = "streamfarm coordinator: stops idle channels, reaps dead nodes and stale keys, \
re-homes watched channels; several may run, one leads"
    )]
    pub struct Args;
    /// The coordinator's resolved configuration.
    #[derive(Debug, Clone)]
    pub struct Config {
        /// How long a new leader (or one whose Redis view was disturbed) waits before it reaps.
        /// One `node_ttl` unless a test or benchmark says otherwise.
        pub reap_settle: Duration,
    }
    /// TOML file with any of the settings below (keys as the long flag names, with '_' for '-').
    /// Flags and environment win over the file.
    #[arg(long, env = "FARM_COORDINATOR_CONFIG")]
    config;
    /// Redis URL (redis://[user:password@]host:port/db).
    #[arg(hide_env_values = true)]
    redis_url: String = "redis://127.0.0.1:6379/",
    /// Key prefix in Redis.
    prefix: String = "farm",
    /// This coordinator's id, unique among coordinators (A-Z a-z 0-9 _ - .). [default: <host>-<pid>]
    #[arg(env = "FARM_COORDINATOR_ID")]
    id: String => default_id(),
    /// Address of the HTTP server (/metrics, /healthz).
    listen: SocketAddr = "127.0.0.1:9180",
    /// A channel nobody requested for this long is stopped (unless pinned).
    idle_timeout: Duration = "60s",
    /// How often the leader looks for idle channels, dead nodes and stale keys.
    tick: Duration = "1s",
    /// Node liveness TTL, as the nodes use it: a node silent for this long is dead.
    node_ttl: Duration = "10s",
    /// Channel owner lease TTL, as the nodes use it.
    lease_ttl: Duration = "10s",
    /// TTL of the leader lease (farm:leader); renewed every third of it.
    leader_ttl: Duration = "10s",
    /// Bound on every Redis call.
    redis_timeout: Duration = "2s",
    /// Idle channels read from farm:access per round trip.
    idle_batch: usize = "500",
    /// Most stop commands sent per tick (the rest wait for the next tick).
    max_idle_stops: usize = "5000",
    /// Most keys reaped per tick (dead nodes' channels and stale keys); reaping is rate-limited.
    max_reaps: usize = "500",
    /// Channels checked per tick by the stale-key reconciliation (it cycles through them).
    reconcile_batch: usize = "200",
    /// Bound on a graceful shutdown.
    shutdown_grace: Duration = "5s",
}

impl Config {
    /// Resolves flags/env over the optional file over defaults, and checks the result.
    pub fn from_args(a: Args) -> Result<Self, ConfigError> {
        let (mut cfg, file) = a.resolve()?;
        file.finish()?;
        farm_proto::validate::node_id(&cfg.id).map_err(|e| {
            ConfigError(format!(
                "--id: {}",
                e.to_string().replace("node id", "coordinator id")
            ))
        })?;
        cfg.reap_settle = cfg.node_ttl;
        cfg.check()?;
        Ok(cfg)
    }

    /// A configuration with the defaults for this Redis and id (tests and benchmarks adjust fields).
    /// The flags' defaults; reads no environment and no file.
    pub fn new(redis_url: impl Into<String>, id: impl Into<String>) -> Self {
        let (mut cfg, _) = Args::default()
            .resolve()
            .expect("the declared defaults are valid (a unit test checks it)");
        cfg.redis_url = redis_url.into();
        cfg.id = id.into();
        cfg.reap_settle = cfg.node_ttl;
        cfg
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
        timing::leader_renew_interval(self.leader_ttl)
    }

    /// The longest pause between two successful Redis round trips that is still normal; see
    /// [`timing::stall_threshold`]. A longer one makes reaping wait `reap_settle`.
    pub fn stall_threshold(&self) -> Duration {
        timing::stall_threshold(self.node_ttl, self.tick)
    }

    /// How long a stop command is considered in flight before it may be sent again.
    pub fn stop_resend_after(&self) -> Duration {
        timing::stop_resend_after(self.lease_ttl, self.node_ttl)
    }

    /// `by` in the commands this coordinator sends.
    pub fn by(&self) -> String {
        format!("coordinator:{}", self.id)
    }
}

/// `<host>-<pid>`, made to fit the id alphabet.
fn default_id() -> String {
    let host = farm_runtime::config::host_name(48, "coordinator");
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

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
        assert_eq!(cfg.prefix, farm_proto::keys::DEFAULT_PREFIX);
        assert_eq!(cfg.reap_settle, Duration::from_secs(10));
        assert_eq!(
            (cfg.idle_batch, cfg.max_idle_stops, cfg.max_reaps),
            (500, 5000, 500)
        );
        assert_eq!(cfg.listen, SocketAddr::from(([127, 0, 0, 1], 9180)));
        cfg.check().expect("the defaults are valid");
    }

    #[test]
    fn the_file_sits_between_flags_and_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("coordinator.toml");
        std::fs::write(
            &path,
            "id = \"from-file\"\ntick = \"500ms\"\nidle_batch = 50\nlisten = \"127.0.0.1:9999\"\n",
        )
        .expect("write");
        let path = path.to_str().expect("utf8");
        let cfg = Config::from_args(Args::parse_from(["farm-coordinator", "--config", path]))
            .expect("valid");
        assert_eq!(cfg.id, "from-file");
        assert_eq!(cfg.tick, Duration::from_millis(500));
        assert_eq!(cfg.idle_batch, 50);
        assert_eq!(cfg.listen.port(), 9999);
        assert_eq!(cfg.node_ttl, Duration::from_secs(10), "default");
        let cfg = Config::from_args(Args::parse_from([
            "farm-coordinator",
            "--config",
            path,
            "--tick",
            "2s",
        ]))
        .expect("valid");
        assert_eq!(cfg.tick, Duration::from_secs(2), "the flag wins");

        std::fs::write(path, "tick = \"soon\"\n").expect("write");
        let err = Config::from_args(Args::parse_from(["farm-coordinator", "--config", path]))
            .expect_err("bad duration");
        assert!(err.to_string().contains("tick: invalid duration"), "{err}");
        std::fs::write(path, "node_id = \"x\"\n").expect("write");
        let err = Config::from_args(Args::parse_from(["farm-coordinator", "--config", path]))
            .expect_err("a node setting");
        assert!(
            err.to_string().contains("unknown setting `node_id`"),
            "{err}"
        );
    }
}
