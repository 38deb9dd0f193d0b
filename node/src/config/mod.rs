//! The node's settings, parsed once: command-line flag, then `FARM_*` environment variable, then the
//! optional TOML file (`--config`), then the default (the mechanism is `farm_runtime::config`).
//! Each setting is declared once below; nothing else in the node reads the environment.
//!
//! The farm-wide timing relations (fence, keepalive, hold) are `farm_proto::timing`'s; the methods
//! here apply them to this node's settings.

mod ipnet;
mod profiles;

pub use self::ipnet::IpNet;
pub use self::profiles::{builtin_profiles, Profile};
pub use farm_runtime::config::{parse_size, ConfigError};

use crate::sandbox::Mode;
use farm_proto::timing;
use farm_runtime::config::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

farm_runtime::settings! {
    /// Command-line flags. Every flag falls back to its `FARM_*` variable, then to the TOML file.
    #[derive(Debug, Clone, Default, clap::Parser)]
    #[command(
        name = "farm-node",
        version,
        about = "streamfarm worker node: serves live channels as HLS, \
starting one FFmpeg per channel for the whole farm on the first viewer"
    )]
    pub struct Args;
    /// The node's resolved configuration: every setting of [`Args`], defaults applied.
    #[derive(Debug, Clone)]
    pub struct Config {
        /// The built-in profiles and the file's `[profiles.<name>]`.
        pub profiles: BTreeMap<String, Profile>,
    }

    /// TOML file with any of the settings below (keys as the long flag names, with '_' for '-';
    /// plus `[profiles.<name>] args = [...]`). Flags and environment win over the file.
    #[arg(long, env = "FARM_CONFIG")]
    config;

    /// Redis URL: redis://[user:password@]host:port/db, or a Sentinel set as
    /// redis+sentinel://[user:password@]host1:port1,host2:port2/<master>[/db].
    #[arg(hide_env_values = true)]
    redis_url: String = "redis://127.0.0.1:6379/",

    /// Key prefix in Redis.
    prefix: String = "farm",

    /// This node's id, unique in the farm (A-Z a-z 0-9 _ - .). [default: the host name]
    node_id: String => farm_runtime::config::host_name(64, "node"),

    /// Address the HTTP server listens on.
    listen: SocketAddr = "127.0.0.1:8080",

    /// URL other nodes and viewers use to reach this node (for redirects). [default: http://<listen>]
    public_url: String => format!("http://{listen}"),

    /// Folder for HLS output; one sub-folder per running channel. Must belong to this node alone.
    hls_root: PathBuf = "/var/lib/streamfarm/hls",

    /// FFmpeg binary.
    ffmpeg: PathBuf = "ffmpeg",

    /// Bearer token for /admin; the admin API is disabled without one.
    #[arg(hide_env_values = true)]
    admin_token: String,

    /// How long a first playlist request waits for the first segment before 503.
    start_timeout: Duration = "10s",

    /// HLS segment duration.
    hls_time: Duration = "2s",

    /// Segments kept in the live playlist (older ones are deleted from disk).
    hls_list_size: u32 = "6",

    /// How often viewer access is flushed to Redis in one call.
    access_flush: Duration = "1s",

    /// Owner lease TTL; a node that cannot renew for 2/3 of it stops its FFmpegs.
    lease_ttl: Duration = "10s",

    /// Node liveness TTL (`farm:node:<id>:alive`).
    node_ttl: Duration = "10s",

    /// Timeout of every Redis call.
    redis_timeout: Duration = "2s",

    /// New starts are refused while HLS_ROOT has less free space than this (e.g. 512M, 2G).
    min_free: u64 = "256M",

    /// Capacity in weight units: a copy counts 1, a transcode its profile's weight (h264-720p: 4);
    /// the claim script refuses past it. 0 = unlimited.
    max_streams: u32 = "100",

    /// Grace between SIGTERM and SIGKILL when stopping an FFmpeg.
    stop_grace: Duration = "3s",

    /// Bound on a graceful shutdown of the whole node.
    shutdown_grace: Duration = "15s",

    /// Upstream read timeout handed to FFmpeg (-rw_timeout).
    read_timeout: Duration = "10s",

    /// First restart delay after a crash; doubles per crash, with jitter.
    backoff_base: Duration = "500ms",

    /// Largest restart delay.
    backoff_max: Duration = "30s",

    /// This many crashes inside --crash-window end a channel in state `failed`.
    max_crashes: u32 = "5",

    /// Window for counting crashes.
    crash_window: Duration = "60s",

    /// How long a failed channel answers 503 with its reason before a new request may retry it.
    failed_hold: Duration = "30s",

    /// This many FFmpeg runs in a row that publish no segment end a channel in state `failed`,
    /// however long each run lasted (a stalled upstream).
    max_empty_runs: u32 = "5",

    /// Bandwidth one channel's upstreams may send FFmpeg, in Mbit/s (0 = no cap).
    egress_bandwidth: u32 = "50",

    /// Upstream requests one channel's FFmpeg may make per second, with a burst of twice as many;
    /// beyond, it gets 429 (0 = no cap).
    egress_rate: u32 = "20",

    /// Memory one FFmpeg may allocate (RLIMIT_DATA; also memory.max when the node has a delegated
    /// cgroup), e.g. 1G (0 = no limit).
    ffmpeg_memory: u64 = "2G",

    /// CPU one FFmpeg may use, in cores (cgroup cpu.max; only when the node has a delegated cgroup
    /// v2, e.g. systemd Delegate=yes), e.g. 1.5 (0 = no limit).
    ffmpeg_cpu: f64 = "2",

    /// Upstream URL schemes a channel may use (comma list).
    allowed_schemes: Vec<String> = "http,https,rtmp,rtmps,udp,rtp,srt",

    /// Secret for signed playback URLs (at least 16 bytes). When set, playback is
    /// `/live/<token>/<id>/<file>` and a request without a valid token gets 403.
    #[arg(hide_env_values = true)]
    token_secret: String,

    /// Behind nginx: answer requests for channels another node owns with
    /// `X-Accel-Redirect: <prefix>/<owner host:port>/live/...` instead of a 307 (e.g. /_farm_owner).
    accel_redirect: String,

    /// Memory for copies of hot playlists and segments (e.g. 256M; 0 serves every file from disk).
    segment_cache: u64 = "256M",

    /// FFmpeg input probing: how much of a new upstream it analyses before the first segment.
    probe_duration: Duration = "1s",

    /// Peers whose `X-Real-IP` header is believed as the viewer's address (for client-bound
    /// tokens and per-client limits): IPs or CIDRs, comma list.
    trusted_proxies: Vec<IpNet> = "127.0.0.1,::1",

    /// Time a client has to send a whole request head, counted from the connection's accept (or
    /// from the first byte after an idle pause); the connection is closed after it.
    http_header_timeout: Duration = "10s",

    /// A keep-alive connection that moves no byte for this long (no request in progress) is
    /// closed. Keep it above nginx's upstream `keepalive_timeout`.
    http_idle_timeout: Duration = "75s",

    /// Largest request head (request line and headers) a connection may buffer; larger gets
    /// 431 and the connection closed (at least 8K).
    http_max_header_bytes: u64 = "16K",

    /// Open HTTP connections at most; past it the longest-idle connection that never completed a
    /// request (then the longest-idle one) is closed to make room, else the new one is refused.
    /// [default: the fd limit (RLIMIT_NOFILE) minus a reserve for FFmpeg pipes, files and Redis,
    /// at most 10000]
    http_max_connections: u32,

    /// Open HTTP connections per client address at most (trusted proxies are exempt: nginx
    /// limits its own clients); 0 = no per-address cap.
    http_max_connections_per_addr: u32 = "64",

    /// Channel starts this node claims at once (catalog, upstream check, lease: the Redis work of
    /// a start); more wait their turn, up to --start-timeout, then get 503 with Retry-After.
    max_concurrent_starts: u32 = "8",

    /// Requests per second that would start a channel (or look up one nobody runs) allowed per
    /// client; more get 429 with Retry-After. 0 = no limit.
    start_rate: u32 = "5",

    /// Burst of such requests a client may make at once before --start-rate applies.
    start_burst: u32 = "20",

    /// How long a channel id the catalog does not know is answered 404 from memory, without
    /// asking Redis again. 0 = no cache.
    unknown_channel_ttl: Duration = "5s",

    /// Zero-cost access mode: a unix datagram socket where nginx sends its access log (syslog);
    /// every logged playback URI counts as a viewer access.
    access_socket: PathBuf,

    /// Internal networks (loopback, private, link-local) FFmpeg may reach when an upstream sends
    /// it there (playlist URIs, redirects): IPs or CIDRs, comma list. A `host:port` the catalog
    /// names is always allowed; the farm's own Redis and ports never. [default: none]
    egress_allow: Vec<IpNet> => Vec::new(),

    /// Networks FFmpeg never reaches, even when the catalog names them: IPs or CIDRs, comma list.
    /// [default: none]
    egress_deny: Vec<IpNet> => Vec::new(),

    /// The FFmpeg network sandbox (Landlock, Linux 6.7+): `auto` uses it where the kernel has it,
    /// `require` refuses to start without it, `off` never uses it.
    ffmpeg_sandbox: Mode = "auto",

}

/// `--ffmpeg-sandbox` in the file and as a default.
impl Value for Mode {
    fn parse(text: &str) -> Result<Self, String> {
        text.parse()
    }
}

impl Config {
    /// Resolves flags/env over the optional file over defaults, and checks the result.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let (mut cfg, mut file) = args.resolve()?;
        cfg.profiles = builtin_profiles();
        cfg.profiles
            .extend(file.take_section::<Profile>("profiles")?);
        file.finish()?;
        farm_proto::validate::node_id(&cfg.node_id).map_err(|e| ConfigError(e.to_string()))?;
        cfg.normalize();
        farm_proto::redis_url::parse(&cfg.redis_url).map_err(ConfigError)?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Empty secrets are unset ones; schemes compare in lower case; a trailing `/` of the
    /// redirect prefix is dropped.
    fn normalize(&mut self) {
        self.admin_token.take_if(|t| t.is_empty());
        self.token_secret.take_if(|t| t.is_empty());
        self.accel_redirect = self
            .accel_redirect
            .take()
            .map(|p| p.trim_end_matches('/').to_string())
            .filter(|p| !p.is_empty());
        for s in &mut self.allowed_schemes {
            *s = s.trim().to_ascii_lowercase();
        }
    }

    /// Checks the settings and their relations; the error names the setting to change.
    fn check(&self) -> Result<(), ConfigError> {
        self.check_times()?;
        self.check_counts()?;
        self.check_secrets()?;
        self.check_profiles()
    }

    fn check_times(&self) -> Result<(), ConfigError> {
        if self.hls_time < Duration::from_millis(500) {
            return bad(format!(
                "hls_time {:?} is too short (at least 500ms)",
                self.hls_time
            ));
        }
        if self.lease_ttl < Duration::from_millis(300) || self.node_ttl < Duration::from_millis(300)
        {
            return bad("lease_ttl and node_ttl must be at least 300ms");
        }
        if self.redis_timeout.is_zero() || self.access_flush.is_zero() {
            return bad("redis_timeout and access_flush must be above zero");
        }
        if self.http_header_timeout.is_zero() || self.http_idle_timeout.is_zero() {
            return bad("http_header_timeout and http_idle_timeout must be above zero");
        }
        Ok(())
    }

    fn check_counts(&self) -> Result<(), ConfigError> {
        if self.hls_list_size < 2 {
            return bad("hls_list_size must be at least 2");
        }
        for (name, n) in [
            ("max_crashes", self.max_crashes),
            ("max_empty_runs", self.max_empty_runs),
            ("max_concurrent_starts", self.max_concurrent_starts),
        ] {
            if n == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if !(0.0..=1024.0).contains(&self.ffmpeg_cpu) {
            return bad(format!(
                "ffmpeg_cpu {} is not a number of cores (0 for no limit)",
                self.ffmpeg_cpu
            ));
        }
        if self.ffmpeg_memory != 0 && self.ffmpeg_memory < 64 << 20 {
            return bad("ffmpeg_memory must be at least 64M (or 0 for no limit)");
        }
        if self.http_max_header_bytes < 8 << 10 {
            return bad(format!(
                "http_max_header_bytes {} is too small: at least 8K",
                self.http_max_header_bytes
            ));
        }
        if self.http_max_connections == Some(0) {
            return bad("http_max_connections must be at least 1 (leave it unset for the default)");
        }
        if self.start_rate > 0 && self.start_burst == 0 {
            return bad("start_burst must be at least 1 when start_rate is set");
        }
        Ok(())
    }

    fn check_secrets(&self) -> Result<(), ConfigError> {
        if self.token_secret.as_ref().is_some_and(|t| t.len() < 16) {
            return bad("token_secret must be at least 16 bytes");
        }
        if let Some(t) = &self.admin_token {
            if t.len() < 16 {
                return bad(format!(
                    "admin_token is {} bytes long; it must be at least 16 (e.g. `openssl rand -hex 16`), \
or leave it unset to turn the admin API off",
                    t.len()
                ));
            }
            if t.bytes().any(|b| !b.is_ascii_graphic()) {
                return bad(
                    "admin_token may hold only visible ASCII characters (no spaces or control characters)",
                );
            }
        }
        if self
            .accel_redirect
            .as_ref()
            .is_some_and(|p| !p.starts_with('/'))
        {
            return bad("accel_redirect must be a path starting with '/', e.g. /_farm_owner");
        }
        Ok(())
    }

    fn check_profiles(&self) -> Result<(), ConfigError> {
        if !self.profiles.contains_key("copy") {
            return bad("the profile 'copy' cannot be removed");
        }
        for (name, p) in &self.profiles {
            if p.args.iter().any(|a| a == "-i" || a == "-f") {
                return bad(format!(
                    "profile {name:?} may not set -i or -f: the node sets input and output"
                ));
            }
        }
        Ok(())
    }

    /// Interval of the keepalive loop (heartbeat + lease renewal); see [`timing::keepalive_interval`].
    pub fn keepalive_interval(&self) -> Duration {
        timing::keepalive_interval(self.lease_ttl, self.node_ttl)
    }

    /// A node that could not renew its leases for this long stops its FFmpegs; see
    /// [`timing::fence_after`].
    pub fn fence_after(&self) -> Duration {
        timing::fence_after(self.lease_ttl)
    }

    /// A running FFmpeg without a new segment for this long has stalled; see [`timing::stall_after`].
    pub fn stall_after(&self) -> Duration {
        timing::stall_after(self.hls_time)
    }

    /// How long a new segment waits for its timeline to be recorded in Redis before it is
    /// published anyway (half a segment: a Redis outage delays viewers by at most that).
    pub fn publish_wait(&self) -> Duration {
        (self.hls_time / 2).min(self.redis_timeout)
    }

    /// How long after its last record a channel's playlist is still served while nobody
    /// publishes; see [`timing::hold_max`].
    pub fn hold_max(&self) -> Duration {
        timing::hold_max(self.node_ttl, self.lease_ttl, self.start_timeout)
    }
}

fn bad(sentence: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError(sentence.into()))
}

#[cfg(test)]
mod tests;
