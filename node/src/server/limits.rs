//! What a connection to the node's HTTP server may cost, from the configuration, with the
//! connection cap fitted under the process's fd limit.

use crate::config::{Config, IpNet};
use std::net::IpAddr;
use std::time::Duration;

/// The most connections the default cap allows, whatever the fd limit.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;

/// What a connection may cost (see the module docs).
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    /// 0: no per-address cap.
    pub max_per_addr: usize,
    pub trusted: Vec<IpNet>,
    /// Why `max_connections` is what it is (logged at start).
    pub why: String,
}

/// The soft RLIMIT_NOFILE of this process (`None`: unlimited or unknown).
pub fn fd_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// File descriptors kept out of the connection cap: FFmpeg pipes (a few per channel), segment
/// files being read, Redis, the watcher, the guard.
pub fn fd_reserve(max_streams: u32) -> u64 {
    let streams = if max_streams == 0 { 250 } else { max_streams };
    128 + 4 * u64::from(streams)
}

impl Limits {
    /// The limits `cfg` asks for, the connection cap fitted under `nofile` (the fd limit).
    pub fn new(cfg: &Config, nofile: Option<u64>) -> Self {
        let reserve = fd_reserve(cfg.max_streams);
        // Room under the fd limit: what is left after the reserve (on a tiny limit, up to 64
        // connections but never more than half of it).
        let room = nofile.map(|n| n.saturating_sub(reserve).max((n / 2).min(64)).max(1));
        let (max, why) = match (cfg.http_max_connections, room, nofile) {
            (Some(want), Some(room), Some(n)) if u64::from(want) > room => (
                room,
                format!(
                    "--http-max-connections {want} lowered to {room}: the fd limit is {n} and \
{reserve} are kept for FFmpeg, files and Redis (raise LimitNOFILE / ulimit -n)"
                ),
            ),
            (Some(want), _, _) => (u64::from(want), "--http-max-connections".into()),
            (None, Some(room), Some(n)) => (
                room.min(DEFAULT_MAX_CONNECTIONS),
                format!("fd limit {n} minus {reserve} kept for FFmpeg, files and Redis"),
            ),
            _ => (DEFAULT_MAX_CONNECTIONS, "no fd limit".into()),
        };
        Self {
            header_timeout: cfg.http_header_timeout,
            idle_timeout: cfg.http_idle_timeout,
            max_header_bytes: usize::try_from(cfg.http_max_header_bytes)
                .unwrap_or(usize::MAX)
                .max(8 << 10),
            max_connections: usize::try_from(max).unwrap_or(usize::MAX).max(1),
            max_per_addr: cfg.http_max_connections_per_addr as usize,
            trusted: cfg.trusted_proxies.clone(),
            why,
        }
    }

    pub(super) fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_stays_under_the_fd_limit() {
        let mut cfg =
            crate::config::Config::from_args(<crate::config::Args as clap::Parser>::parse_from([
                "farm-node",
            ]))
            .expect("defaults");
        let l = Limits::new(&cfg, Some(1024));
        assert_eq!(l.max_connections, 1024 - 528);
        assert!(l.why.contains("1024"), "{}", l.why);
        let l = Limits::new(&cfg, Some(1 << 20));
        assert_eq!(l.max_connections, DEFAULT_MAX_CONNECTIONS as usize);
        cfg.http_max_connections = Some(5000);
        let l = Limits::new(&cfg, Some(1024));
        assert_eq!(l.max_connections, 496, "lowered to fit: {}", l.why);
        assert!(l.why.contains("lowered"), "{}", l.why);
    }
}
