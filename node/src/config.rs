//! The node's settings, parsed once: command-line flag, then `FARM_*` environment variable, then the
//! optional TOML file (`--config`), then the default. Nothing else in the node reads the environment.

use clap::Parser;
use farm_proto::duration;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// FFmpeg arguments for one output profile: what goes between the input and the HLS muxer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Profile {
    /// Codec/filter arguments, e.g. `["-c", "copy"]`.
    pub args: Vec<String>,
    /// A transcode costs more than a copy when placing channels (used for capacity accounting).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// The built-in profiles: `copy` (default) and `h264-720p` (H.264/AAC transcode).
pub fn builtin_profiles() -> BTreeMap<String, Profile> {
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let mut m = BTreeMap::new();
    m.insert(
        "copy".to_string(),
        Profile {
            args: s(&["-map", "0:v:0?", "-map", "0:a:0?", "-c", "copy"]),
            weight: 1,
        },
    );
    m.insert(
        "h264-720p".to_string(),
        Profile {
            args: s(&[
                "-map",
                "0:v:0?",
                "-map",
                "0:a:0?",
                "-c:v",
                "libx264",
                "-preset",
                "veryfast",
                "-tune",
                "zerolatency",
                "-vf",
                "scale=-2:720",
                "-b:v",
                "2500k",
                "-maxrate",
                "3000k",
                "-bufsize",
                "5000k",
                "-force_key_frames",
                "expr:gte(t,n_forced*1)",
                "-sc_threshold",
                "0",
                "-c:a",
                "aac",
                "-b:a",
                "128k",
                "-ac",
                "2",
            ]),
            weight: 4,
        },
    );
    m
}

/// Command-line flags. Every flag falls back to its `FARM_*` variable, then to the TOML file.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "farm-node",
    version,
    about = "streamfarm worker node: serves live channels as HLS, \
starting one FFmpeg per channel for the whole farm on the first viewer"
)]
pub struct Args {
    /// TOML file with any of the settings below (keys as the long flag names, with '_' for '-';
    /// plus `[profiles.<name>] args = [...]`). Flags and environment win over the file.
    #[arg(long, env = "FARM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Redis URL: redis://[user:password@]host:port/db, or a Sentinel set as
    /// redis+sentinel://[user:password@]host1:port1,host2:port2/<master>[/db]. [default: redis://127.0.0.1:6379/]
    #[arg(long, env = "FARM_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Key prefix in Redis. [default: farm]
    #[arg(long, env = "FARM_PREFIX")]
    pub prefix: Option<String>,
    /// This node's id, unique in the farm (A-Z a-z 0-9 _ - .). [default: the host name]
    #[arg(long, env = "FARM_NODE_ID")]
    pub node_id: Option<String>,
    /// Address the HTTP server listens on. [default: 127.0.0.1:8080]
    #[arg(long, env = "FARM_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// URL other nodes and viewers use to reach this node (for redirects). [default: http://<listen>]
    #[arg(long, env = "FARM_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Folder for HLS output; one sub-folder per running channel. Must belong to this node alone.
    /// [default: /var/lib/streamfarm/hls]
    #[arg(long, env = "FARM_HLS_ROOT")]
    pub hls_root: Option<PathBuf>,
    /// FFmpeg binary. [default: ffmpeg]
    #[arg(long, env = "FARM_FFMPEG")]
    pub ffmpeg: Option<PathBuf>,
    /// Bearer token for /admin; the admin API is disabled without one.
    #[arg(long, env = "FARM_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// How long a first playlist request waits for the first segment before 503. [default: 10s]
    #[arg(long, env = "FARM_START_TIMEOUT", value_parser = duration::parse)]
    pub start_timeout: Option<Duration>,
    /// HLS segment duration. [default: 2s]
    #[arg(long, env = "FARM_HLS_TIME", value_parser = duration::parse)]
    pub hls_time: Option<Duration>,
    /// Segments kept in the live playlist (older ones are deleted from disk). [default: 6]
    #[arg(long, env = "FARM_HLS_LIST_SIZE")]
    pub hls_list_size: Option<u32>,
    /// How often viewer access is flushed to Redis in one call. [default: 1s]
    #[arg(long, env = "FARM_ACCESS_FLUSH", value_parser = duration::parse)]
    pub access_flush: Option<Duration>,
    /// Owner lease TTL; a node that cannot renew for 2/3 of it stops its FFmpegs. [default: 10s]
    #[arg(long, env = "FARM_LEASE_TTL", value_parser = duration::parse)]
    pub lease_ttl: Option<Duration>,
    /// Node liveness TTL (`farm:node:<id>:alive`). [default: 10s]
    #[arg(long, env = "FARM_NODE_TTL", value_parser = duration::parse)]
    pub node_ttl: Option<Duration>,
    /// Timeout of every Redis call. [default: 2s]
    #[arg(long, env = "FARM_REDIS_TIMEOUT", value_parser = duration::parse)]
    pub redis_timeout: Option<Duration>,
    /// New starts are refused while HLS_ROOT has less free space than this (e.g. 512M, 2G). [default: 256M]
    #[arg(long, env = "FARM_MIN_FREE", value_parser = parse_size)]
    pub min_free: Option<u64>,
    /// Capacity in weight units: a copy counts 1, a transcode its profile's weight (h264-720p: 4);
    /// the claim script refuses past it. 0 = unlimited. [default: 100]
    #[arg(long, env = "FARM_MAX_STREAMS")]
    pub max_streams: Option<u32>,
    /// Grace between SIGTERM and SIGKILL when stopping an FFmpeg. [default: 3s]
    #[arg(long, env = "FARM_STOP_GRACE", value_parser = duration::parse)]
    pub stop_grace: Option<Duration>,
    /// Bound on a graceful shutdown of the whole node. [default: 15s]
    #[arg(long, env = "FARM_SHUTDOWN_GRACE", value_parser = duration::parse)]
    pub shutdown_grace: Option<Duration>,
    /// Upstream read timeout handed to FFmpeg (-rw_timeout). [default: 10s]
    #[arg(long, env = "FARM_READ_TIMEOUT", value_parser = duration::parse)]
    pub read_timeout: Option<Duration>,
    /// First restart delay after a crash; doubles per crash, with jitter. [default: 500ms]
    #[arg(long, env = "FARM_BACKOFF_BASE", value_parser = duration::parse)]
    pub backoff_base: Option<Duration>,
    /// Largest restart delay. [default: 30s]
    #[arg(long, env = "FARM_BACKOFF_MAX", value_parser = duration::parse)]
    pub backoff_max: Option<Duration>,
    /// This many crashes inside --crash-window end a channel in state `failed`. [default: 5]
    #[arg(long, env = "FARM_MAX_CRASHES")]
    pub max_crashes: Option<u32>,
    /// Window for counting crashes. [default: 60s]
    #[arg(long, env = "FARM_CRASH_WINDOW", value_parser = duration::parse)]
    pub crash_window: Option<Duration>,
    /// How long a failed channel answers 503 with its reason before a new request may retry it. [default: 30s]
    #[arg(long, env = "FARM_FAILED_HOLD", value_parser = duration::parse)]
    pub failed_hold: Option<Duration>,
    /// This many FFmpeg runs in a row that publish no segment end a channel in state `failed`,
    /// however long each run lasted (a stalled upstream). [default: 5]
    #[arg(long, env = "FARM_MAX_EMPTY_RUNS")]
    pub max_empty_runs: Option<u32>,
    /// Bandwidth one channel's upstreams may send FFmpeg, in Mbit/s (0 = no cap). [default: 50]
    #[arg(long, env = "FARM_EGRESS_BANDWIDTH")]
    pub egress_bandwidth: Option<u32>,
    /// Upstream requests one channel's FFmpeg may make per second, with a burst of twice as many;
    /// beyond, it gets 429 (0 = no cap). [default: 20]
    #[arg(long, env = "FARM_EGRESS_RATE")]
    pub egress_rate: Option<u32>,
    /// Memory one FFmpeg may allocate (RLIMIT_DATA; also memory.max when the node has a delegated
    /// cgroup), e.g. 1G (0 = no limit). [default: 2G]
    #[arg(long, env = "FARM_FFMPEG_MEMORY", value_parser = parse_size)]
    pub ffmpeg_memory: Option<u64>,
    /// CPU one FFmpeg may use, in cores (cgroup cpu.max; only when the node has a delegated cgroup
    /// v2, e.g. systemd Delegate=yes), e.g. 1.5 (0 = no limit). [default: 2]
    #[arg(long, env = "FARM_FFMPEG_CPU")]
    pub ffmpeg_cpu: Option<f64>,
    /// Upstream URL schemes a channel may use (comma list). [default: http,https,rtmp,rtmps,udp,rtp,srt]
    #[arg(long, env = "FARM_ALLOWED_SCHEMES", value_delimiter = ',')]
    pub allowed_schemes: Option<Vec<String>>,
    /// Secret for signed playback URLs (at least 16 bytes). When set, playback is
    /// `/live/<token>/<id>/<file>` and a request without a valid token gets 403.
    #[arg(long, env = "FARM_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,
    /// Behind nginx: answer requests for channels another node owns with
    /// `X-Accel-Redirect: <prefix>/<owner host:port>/live/...` instead of a 307 (e.g. /_farm_owner).
    #[arg(long, env = "FARM_ACCEL_REDIRECT")]
    pub accel_redirect: Option<String>,
    /// Memory for copies of hot playlists and segments (e.g. 256M; 0 serves every file from disk). [default: 256M]
    #[arg(long, env = "FARM_SEGMENT_CACHE", value_parser = parse_size)]
    pub segment_cache: Option<u64>,
    /// FFmpeg input probing: how much of a new upstream it analyses before the first segment. [default: 1s]
    #[arg(long, env = "FARM_PROBE_DURATION", value_parser = duration::parse)]
    pub probe_duration: Option<Duration>,
    /// Peers whose `X-Real-IP` header is believed as the viewer's address (for client-bound
    /// tokens and per-client limits): IPs or CIDRs, comma list. [default: 127.0.0.1,::1]
    #[arg(long, env = "FARM_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Time a client has to send a whole request head, counted from the connection's accept (or
    /// from the first byte after an idle pause); the connection is closed after it. [default: 10s]
    #[arg(long, env = "FARM_HTTP_HEADER_TIMEOUT", value_parser = duration::parse)]
    pub http_header_timeout: Option<Duration>,
    /// A keep-alive connection that moves no byte for this long (no request in progress) is
    /// closed. Keep it above nginx's upstream `keepalive_timeout`. [default: 75s]
    #[arg(long, env = "FARM_HTTP_IDLE_TIMEOUT", value_parser = duration::parse)]
    pub http_idle_timeout: Option<Duration>,
    /// Largest request head (request line and headers) a connection may buffer; larger gets
    /// 431 and the connection closed (at least 8K). [default: 16K]
    #[arg(long, env = "FARM_HTTP_MAX_HEADER_BYTES", value_parser = parse_size)]
    pub http_max_header_bytes: Option<u64>,
    /// Open HTTP connections at most; past it the longest-idle connection that never completed a
    /// request (then the longest-idle one) is closed to make room, else the new one is refused.
    /// [default: the fd limit (RLIMIT_NOFILE) minus a reserve for FFmpeg pipes, files and Redis,
    /// at most 10000]
    #[arg(long, env = "FARM_HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: Option<u32>,
    /// Open HTTP connections per client address at most (trusted proxies are exempt: nginx
    /// limits its own clients); 0 = no per-address cap. [default: 64]
    #[arg(long, env = "FARM_HTTP_MAX_CONNECTIONS_PER_ADDR")]
    pub http_max_connections_per_addr: Option<u32>,
    /// Channel starts this node claims at once (catalog, upstream check, lease: the Redis work of
    /// a start); more wait their turn, up to --start-timeout, then get 503 with Retry-After.
    /// [default: 8]
    #[arg(long, env = "FARM_MAX_CONCURRENT_STARTS")]
    pub max_concurrent_starts: Option<u32>,
    /// Requests per second that would start a channel (or look up one nobody runs) allowed per
    /// client; more get 429 with Retry-After. 0 = no limit. [default: 5]
    #[arg(long, env = "FARM_START_RATE")]
    pub start_rate: Option<u32>,
    /// Burst of such requests a client may make at once before --start-rate applies. [default: 20]
    #[arg(long, env = "FARM_START_BURST")]
    pub start_burst: Option<u32>,
    /// How long a channel id the catalog does not know is answered 404 from memory, without
    /// asking Redis again. 0 = no cache. [default: 5s]
    #[arg(long, env = "FARM_UNKNOWN_CHANNEL_TTL", value_parser = duration::parse)]
    pub unknown_channel_ttl: Option<Duration>,
    /// Zero-cost access mode: a unix datagram socket where nginx sends its access log (syslog);
    /// every logged playback URI counts as a viewer access.
    #[arg(long, env = "FARM_ACCESS_SOCKET")]
    pub access_socket: Option<PathBuf>,
    /// Internal networks (loopback, private, link-local) FFmpeg may reach when an upstream sends
    /// it there (playlist URIs, redirects): IPs or CIDRs, comma list. A `host:port` the catalog
    /// names is always allowed; the farm's own Redis and ports never. [default: none]
    #[arg(long, env = "FARM_EGRESS_ALLOW", value_delimiter = ',')]
    pub egress_allow: Option<Vec<String>>,
    /// Networks FFmpeg never reaches, even when the catalog names them: IPs or CIDRs, comma list.
    /// [default: none]
    #[arg(long, env = "FARM_EGRESS_DENY", value_delimiter = ',')]
    pub egress_deny: Option<Vec<String>>,
    /// The FFmpeg network sandbox (Landlock, Linux 6.7+): `auto` uses it where the kernel has it,
    /// `require` refuses to start without it, `off` never uses it. [default: auto]
    #[arg(long, env = "FARM_FFMPEG_SANDBOX")]
    pub ffmpeg_sandbox: Option<String>,
}

/// The file form of [`Args`]: the same settings, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    redis_url: Option<String>,
    prefix: Option<String>,
    node_id: Option<String>,
    listen: Option<SocketAddr>,
    public_url: Option<String>,
    hls_root: Option<PathBuf>,
    ffmpeg: Option<PathBuf>,
    admin_token: Option<String>,
    start_timeout: Option<String>,
    hls_time: Option<String>,
    hls_list_size: Option<u32>,
    access_flush: Option<String>,
    lease_ttl: Option<String>,
    node_ttl: Option<String>,
    redis_timeout: Option<String>,
    min_free: Option<String>,
    max_streams: Option<u32>,
    stop_grace: Option<String>,
    shutdown_grace: Option<String>,
    read_timeout: Option<String>,
    backoff_base: Option<String>,
    backoff_max: Option<String>,
    max_crashes: Option<u32>,
    crash_window: Option<String>,
    failed_hold: Option<String>,
    max_empty_runs: Option<u32>,
    egress_bandwidth: Option<u32>,
    egress_rate: Option<u32>,
    ffmpeg_memory: Option<String>,
    ffmpeg_cpu: Option<f64>,
    allowed_schemes: Option<Vec<String>>,
    token_secret: Option<String>,
    accel_redirect: Option<String>,
    access_socket: Option<PathBuf>,
    segment_cache: Option<String>,
    probe_duration: Option<String>,
    trusted_proxies: Option<Vec<String>>,
    http_header_timeout: Option<String>,
    http_idle_timeout: Option<String>,
    http_max_header_bytes: Option<String>,
    http_max_connections: Option<u32>,
    http_max_connections_per_addr: Option<u32>,
    max_concurrent_starts: Option<u32>,
    start_rate: Option<u32>,
    start_burst: Option<u32>,
    unknown_channel_ttl: Option<String>,
    egress_allow: Option<Vec<String>>,
    egress_deny: Option<Vec<String>>,
    ffmpeg_sandbox: Option<String>,
    #[serde(default)]
    profiles: BTreeMap<String, Profile>,
}

/// The node's resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub redis_url: String,
    pub prefix: String,
    pub node_id: String,
    pub listen: SocketAddr,
    pub public_url: String,
    pub hls_root: PathBuf,
    pub ffmpeg: PathBuf,
    pub admin_token: Option<String>,
    pub start_timeout: Duration,
    pub hls_time: Duration,
    pub hls_list_size: u32,
    pub access_flush: Duration,
    pub lease_ttl: Duration,
    pub node_ttl: Duration,
    pub redis_timeout: Duration,
    pub min_free: u64,
    pub max_streams: u32,
    pub stop_grace: Duration,
    pub shutdown_grace: Duration,
    pub read_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub max_crashes: u32,
    pub crash_window: Duration,
    pub failed_hold: Duration,
    pub max_empty_runs: u32,
    /// Mbit/s per channel, 0: no cap.
    pub egress_bandwidth: u32,
    /// Requests per second per channel, 0: no cap.
    pub egress_rate: u32,
    /// Bytes per FFmpeg, 0: no limit.
    pub ffmpeg_memory: u64,
    /// Cores per FFmpeg, 0: no limit.
    pub ffmpeg_cpu: f64,
    pub allowed_schemes: Vec<String>,
    pub token_secret: Option<String>,
    pub accel_redirect: Option<String>,
    pub access_socket: Option<PathBuf>,
    pub segment_cache: u64,
    pub probe_duration: Duration,
    pub trusted_proxies: Vec<IpNet>,
    pub http_header_timeout: Duration,
    pub http_idle_timeout: Duration,
    pub http_max_header_bytes: usize,
    /// `None`: derived from the fd limit at start (see `server::Limits`).
    pub http_max_connections: Option<u32>,
    pub http_max_connections_per_addr: u32,
    pub max_concurrent_starts: u32,
    pub start_rate: u32,
    pub start_burst: u32,
    pub unknown_channel_ttl: Duration,
    pub egress_allow: Vec<IpNet>,
    pub egress_deny: Vec<IpNet>,
    pub ffmpeg_sandbox: crate::sandbox::Mode,
    pub profiles: BTreeMap<String, Profile>,
}

/// An IP network (`10.0.0.0/8`, `192.168.1.7`, `::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: std::net::IpAddr,
    prefix: u8,
}

/// An operator's list of networks: `what` names a bad one in the error.
fn nets(what: &str, list: Vec<String>) -> Result<Vec<IpNet>, ConfigError> {
    list.iter()
        .map(|s| IpNet::parse(s.trim()).map_err(|e| ConfigError(format!("invalid {what} {e}"))))
        .collect()
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl IpNet {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: use an IP or a CIDR like 10.0.0.0/8");
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        match (self.addr, ip) {
            (V4(net), V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (V6(net), V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// A setting that cannot be used, with the sentence to show the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Parses `512M`, `2G`, `100k`, `1048576` (bytes; powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return Err(format!("invalid size {s:?}: use e.g. 512M, 2G or bytes")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {s:?}: use e.g. 512M, 2G or bytes"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

impl Config {
    /// Resolves flags/env over the optional file over defaults, and checks the result.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError(format!("cannot read config file {}: {e}", path.display()))
                })?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?
            }
            None => FileConfig::default(),
        };
        let dur =
            |cli: Option<Duration>, f: &Option<String>, name: &str, def: Duration| match (cli, f) {
                (Some(d), _) => Ok(d),
                (None, Some(s)) => {
                    duration::parse(s).map_err(|e| ConfigError(format!("{name}: {e}")))
                }
                (None, None) => Ok(def),
            };
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        let node_id = match args.node_id.or(file.node_id) {
            Some(id) => id,
            None => hostname(),
        };
        farm_proto::validate::node_id(&node_id).map_err(|e| ConfigError(e.to_string()))?;
        let min_free = match (args.min_free, &file.min_free) {
            (Some(v), _) => v,
            (None, Some(s)) => parse_size(s).map_err(|e| ConfigError(format!("min_free: {e}")))?,
            (None, None) => 256 << 20,
        };
        let mut profiles = builtin_profiles();
        profiles.extend(file.profiles);
        let cfg = Config {
            redis_url: args
                .redis_url
                .or(file.redis_url)
                .unwrap_or_else(|| "redis://127.0.0.1:6379/".into()),
            prefix: args.prefix.or(file.prefix).unwrap_or_else(|| "farm".into()),
            public_url: args
                .public_url
                .or(file.public_url)
                .unwrap_or_else(|| format!("http://{listen}")),
            node_id,
            listen,
            hls_root: args
                .hls_root
                .or(file.hls_root)
                .unwrap_or_else(|| "/var/lib/streamfarm/hls".into()),
            ffmpeg: args
                .ffmpeg
                .or(file.ffmpeg)
                .unwrap_or_else(|| "ffmpeg".into()),
            admin_token: args
                .admin_token
                .or(file.admin_token)
                .filter(|t| !t.is_empty()),
            start_timeout: dur(
                args.start_timeout,
                &file.start_timeout,
                "start_timeout",
                Duration::from_secs(10),
            )?,
            hls_time: dur(
                args.hls_time,
                &file.hls_time,
                "hls_time",
                Duration::from_secs(2),
            )?,
            hls_list_size: args.hls_list_size.or(file.hls_list_size).unwrap_or(6),
            access_flush: dur(
                args.access_flush,
                &file.access_flush,
                "access_flush",
                Duration::from_secs(1),
            )?,
            lease_ttl: dur(
                args.lease_ttl,
                &file.lease_ttl,
                "lease_ttl",
                Duration::from_secs(10),
            )?,
            node_ttl: dur(
                args.node_ttl,
                &file.node_ttl,
                "node_ttl",
                Duration::from_secs(10),
            )?,
            redis_timeout: dur(
                args.redis_timeout,
                &file.redis_timeout,
                "redis_timeout",
                Duration::from_secs(2),
            )?,
            min_free,
            max_streams: args.max_streams.or(file.max_streams).unwrap_or(100),
            stop_grace: dur(
                args.stop_grace,
                &file.stop_grace,
                "stop_grace",
                Duration::from_secs(3),
            )?,
            shutdown_grace: dur(
                args.shutdown_grace,
                &file.shutdown_grace,
                "shutdown_grace",
                Duration::from_secs(15),
            )?,
            read_timeout: dur(
                args.read_timeout,
                &file.read_timeout,
                "read_timeout",
                Duration::from_secs(10),
            )?,
            backoff_base: dur(
                args.backoff_base,
                &file.backoff_base,
                "backoff_base",
                Duration::from_millis(500),
            )?,
            backoff_max: dur(
                args.backoff_max,
                &file.backoff_max,
                "backoff_max",
                Duration::from_secs(30),
            )?,
            max_crashes: args.max_crashes.or(file.max_crashes).unwrap_or(5),
            crash_window: dur(
                args.crash_window,
                &file.crash_window,
                "crash_window",
                Duration::from_secs(60),
            )?,
            failed_hold: dur(
                args.failed_hold,
                &file.failed_hold,
                "failed_hold",
                Duration::from_secs(30),
            )?,
            max_empty_runs: args.max_empty_runs.or(file.max_empty_runs).unwrap_or(5),
            egress_bandwidth: args
                .egress_bandwidth
                .or(file.egress_bandwidth)
                .unwrap_or(50),
            egress_rate: args.egress_rate.or(file.egress_rate).unwrap_or(20),
            ffmpeg_memory: match (args.ffmpeg_memory, &file.ffmpeg_memory) {
                (Some(v), _) => v,
                (None, Some(s)) => {
                    parse_size(s).map_err(|e| ConfigError(format!("ffmpeg_memory: {e}")))?
                }
                (None, None) => 2 << 30,
            },
            ffmpeg_cpu: args.ffmpeg_cpu.or(file.ffmpeg_cpu).unwrap_or(2.0),
            allowed_schemes: args
                .allowed_schemes
                .or(file.allowed_schemes)
                .unwrap_or_else(|| {
                    farm_proto::validate::DEFAULT_ALLOWED_SCHEMES
                        .iter()
                        .map(|s| s.to_string())
                        .collect()
                })
                .into_iter()
                .map(|s| s.trim().to_ascii_lowercase())
                .collect(),
            token_secret: args
                .token_secret
                .or(file.token_secret)
                .filter(|t| !t.is_empty()),
            accel_redirect: args
                .accel_redirect
                .or(file.accel_redirect)
                .map(|p| p.trim_end_matches('/').to_string())
                .filter(|p| !p.is_empty()),
            access_socket: args.access_socket.or(file.access_socket),
            segment_cache: match (args.segment_cache, &file.segment_cache) {
                (Some(v), _) => v,
                (None, Some(s)) => {
                    parse_size(s).map_err(|e| ConfigError(format!("segment_cache: {e}")))?
                }
                (None, None) => 256 << 20,
            },
            probe_duration: dur(
                args.probe_duration,
                &file.probe_duration,
                "probe_duration",
                Duration::from_secs(1),
            )?,
            trusted_proxies: nets(
                "trusted proxy",
                args.trusted_proxies
                    .or(file.trusted_proxies)
                    .unwrap_or_else(|| vec!["127.0.0.1".into(), "::1".into()]),
            )?,
            http_header_timeout: dur(
                args.http_header_timeout,
                &file.http_header_timeout,
                "http_header_timeout",
                Duration::from_secs(10),
            )?,
            http_idle_timeout: dur(
                args.http_idle_timeout,
                &file.http_idle_timeout,
                "http_idle_timeout",
                Duration::from_secs(75),
            )?,
            http_max_header_bytes:
                match (args.http_max_header_bytes, &file.http_max_header_bytes) {
                    (Some(v), _) => v,
                    (None, Some(s)) => parse_size(s)
                        .map_err(|e| ConfigError(format!("http_max_header_bytes: {e}")))?,
                    (None, None) => 16 << 10,
                }
                .try_into()
                .unwrap_or(usize::MAX),
            http_max_connections: args.http_max_connections.or(file.http_max_connections),
            http_max_connections_per_addr: args
                .http_max_connections_per_addr
                .or(file.http_max_connections_per_addr)
                .unwrap_or(64),
            max_concurrent_starts: args
                .max_concurrent_starts
                .or(file.max_concurrent_starts)
                .unwrap_or(8),
            start_rate: args.start_rate.or(file.start_rate).unwrap_or(5),
            start_burst: args.start_burst.or(file.start_burst).unwrap_or(20),
            unknown_channel_ttl: dur(
                args.unknown_channel_ttl,
                &file.unknown_channel_ttl,
                "unknown_channel_ttl",
                Duration::from_secs(5),
            )?,
            egress_allow: nets(
                "--egress-allow network",
                args.egress_allow.or(file.egress_allow).unwrap_or_default(),
            )?,
            egress_deny: nets(
                "--egress-deny network",
                args.egress_deny.or(file.egress_deny).unwrap_or_default(),
            )?,
            ffmpeg_sandbox: args
                .ffmpeg_sandbox
                .or(file.ffmpeg_sandbox)
                .as_deref()
                .unwrap_or("auto")
                .parse()
                .map_err(ConfigError)?,
            profiles,
        };
        farm_proto::redis_url::parse(&cfg.redis_url).map_err(ConfigError)?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        if self.hls_time < Duration::from_millis(500) {
            return bad(format!(
                "hls_time {:?} is too short (at least 500ms)",
                self.hls_time
            ));
        }
        if self.hls_list_size < 2 {
            return bad("hls_list_size must be at least 2".into());
        }
        if self.lease_ttl < Duration::from_millis(300) || self.node_ttl < Duration::from_millis(300)
        {
            return bad("lease_ttl and node_ttl must be at least 300ms".into());
        }
        if self.redis_timeout.is_zero() || self.access_flush.is_zero() {
            return bad("redis_timeout and access_flush must be above zero".into());
        }
        if self.max_crashes == 0 {
            return bad("max_crashes must be at least 1".into());
        }
        if self.max_empty_runs == 0 {
            return bad("max_empty_runs must be at least 1".into());
        }
        if !(0.0..=1024.0).contains(&self.ffmpeg_cpu) {
            return bad(format!(
                "ffmpeg_cpu {} is not a number of cores (0 for no limit)",
                self.ffmpeg_cpu
            ));
        }
        if self.ffmpeg_memory != 0 && self.ffmpeg_memory < 64 << 20 {
            return bad("ffmpeg_memory must be at least 64M (or 0 for no limit)".into());
        }
        if self.token_secret.as_ref().is_some_and(|t| t.len() < 16) {
            return bad("token_secret must be at least 16 bytes".into());
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
                    "admin_token may hold only visible ASCII characters (no spaces or control characters)"
                        .into(),
                );
            }
        }
        if self.http_header_timeout.is_zero() || self.http_idle_timeout.is_zero() {
            return bad("http_header_timeout and http_idle_timeout must be above zero".into());
        }
        if self.http_max_header_bytes < 8 << 10 {
            return bad(format!(
                "http_max_header_bytes {} is too small: at least 8K",
                self.http_max_header_bytes
            ));
        }
        if self.http_max_connections == Some(0) {
            return bad(
                "http_max_connections must be at least 1 (leave it unset for the default)".into(),
            );
        }
        if self.max_concurrent_starts == 0 {
            return bad("max_concurrent_starts must be at least 1".into());
        }
        if self.start_rate > 0 && self.start_burst == 0 {
            return bad("start_burst must be at least 1 when start_rate is set".into());
        }
        if self
            .accel_redirect
            .as_ref()
            .is_some_and(|p| !p.starts_with('/'))
        {
            return bad(
                "accel_redirect must be a path starting with '/', e.g. /_farm_owner".into(),
            );
        }
        if !self.profiles.contains_key("copy") {
            return bad("the profile 'copy' cannot be removed".into());
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

    /// Interval of the keepalive loop (heartbeat + lease renewal): a sixth of the shorter TTL.
    ///
    /// A Redis outage costs nothing while the renewal sent after it ends still lands before the
    /// fence time (⅔ of the lease TTL after the last renewal sent): outages up to ⅔ TTL minus one
    /// interval. A sixth makes that half the lease TTL, whatever the phase of the outage; a third
    /// left one third, and a 1.5 s outage on a 4 s lease fenced in one run out of eight.
    pub fn keepalive_interval(&self) -> Duration {
        self.lease_ttl.min(self.node_ttl) / 6
    }

    /// A node that could not renew its leases for this long stops its FFmpegs (2/3 of the lease TTL).
    pub fn fence_after(&self) -> Duration {
        self.lease_ttl * 2 / 3
    }

    /// How long a new segment waits for its timeline to be recorded in Redis before it is
    /// published anyway (half a segment: a Redis outage delays viewers by at most that).
    pub fn publish_wait(&self) -> Duration {
        (self.hls_time / 2).min(self.redis_timeout)
    }

    /// How long after its last record a channel's playlist is still served while nobody publishes
    /// (its owner died, froze or hands it over): until the failover had time to happen and the new
    /// owner to start. After that, a viewer waits for a new start like on a cold one.
    pub fn hold_max(&self) -> Duration {
        self.node_ttl + self.lease_ttl + self.start_timeout
    }
}

fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let id: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if id.is_empty() {
        "node".into()
    } else {
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "node_id = \"from-file\"\nhls_time = \"4s\"\nmin_free = \"1G\"\n[profiles.low]\nargs = [\"-c:v\", \"libx264\"]\nweight = 3\n",
        )
        .expect("write");
        let args = Args::parse_from([
            "farm-node",
            "--config",
            path.to_str().expect("utf8"),
            "--node-id",
            "from-flag",
        ]);
        let cfg = Config::from_args(args).expect("valid");
        assert_eq!(cfg.node_id, "from-flag");
        assert_eq!(cfg.hls_time, Duration::from_secs(4));
        assert_eq!(cfg.min_free, 1 << 30);
        assert_eq!(cfg.profiles["low"].weight, 3);
        assert!(cfg.profiles.contains_key("copy"));
        assert_eq!(cfg.start_timeout, Duration::from_secs(10));
    }

    #[test]
    fn bad_settings_are_refused_with_a_sentence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "no_such_setting = 1\n").expect("write");
        let err = Config::from_args(Args::parse_from([
            "farm-node",
            "--config",
            path.to_str().expect("utf8"),
        ]))
        .expect_err("unknown key");
        assert!(err.to_string().contains("no_such_setting"), "{err}");
        let err = Config::from_args(Args::parse_from(["farm-node", "--node-id", "a:b"]))
            .expect_err("bad id");
        assert!(err.to_string().contains("invalid node id"), "{err}");
        assert!(Args::try_parse_from(["farm-node", "--hls-time", "soon"]).is_err());
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        let net = IpNet::parse("10.1.0.0/16").expect("cidr");
        assert!(net.contains("10.1.200.3".parse().expect("ip")));
        assert!(!net.contains("10.2.0.1".parse().expect("ip")));
        assert!(IpNet::parse("0.0.0.0/0")
            .expect("all")
            .contains("8.8.8.8".parse().expect("ip")));
        assert!(IpNet::parse("::1")
            .expect("v6")
            .contains("::1".parse().expect("ip")));
        assert!(IpNet::parse("10.0.0.0/33").is_err() && IpNet::parse("nope").is_err());
        assert!(parse_size("12Q").is_err());
        for (flag, value, says) in [
            (
                "--egress-allow",
                "10.0.0.0/8,nope",
                "invalid --egress-allow network \"nope\"",
            ),
            (
                "--egress-deny",
                "10.0.0.0/40",
                "invalid --egress-deny network",
            ),
            ("--trusted-proxies", "x", "invalid trusted proxy"),
            ("--ffmpeg-sandbox", "maybe", "auto, require or off"),
        ] {
            let err =
                Config::from_args(Args::parse_from(["farm-node", flag, value])).expect_err(flag);
            assert!(err.to_string().contains(says), "{flag} {value}: {err}");
        }
        let ok = Config::from_args(Args::parse_from([
            "farm-node",
            "--egress-allow",
            "192.168.0.0/16, 10.9.9.9",
            "--ffmpeg-sandbox",
            "require",
        ]))
        .expect("good egress settings");
        assert_eq!(ok.egress_allow.len(), 2);
        assert!(ok.egress_deny.is_empty());
        assert_eq!(ok.ffmpeg_sandbox, crate::sandbox::Mode::Require);
        assert_eq!(
            (ok.max_empty_runs, ok.egress_bandwidth, ok.egress_rate),
            (5, 50, 20)
        );
        assert_eq!((ok.ffmpeg_memory, ok.ffmpeg_cpu), (2 << 30, 2.0));
        for (flag, value, says) in [
            ("--max-empty-runs", "0", "max_empty_runs"),
            ("--ffmpeg-cpu", "2000", "ffmpeg_cpu"),
            ("--ffmpeg-cpu", "NaN", "ffmpeg_cpu"),
            ("--ffmpeg-memory", "1M", "ffmpeg_memory"),
        ] {
            let err =
                Config::from_args(Args::parse_from(["farm-node", flag, value])).expect_err(flag);
            assert!(err.to_string().contains(says), "{flag} {value}: {err}");
        }
    }

    #[test]
    fn http_and_admission_settings_have_safe_defaults_and_checks() {
        let cfg = Config::from_args(Args::parse_from(["farm-node"])).expect("defaults");
        assert_eq!(cfg.http_header_timeout, Duration::from_secs(10));
        assert_eq!(cfg.http_idle_timeout, Duration::from_secs(75));
        assert_eq!(cfg.http_max_header_bytes, 16 << 10);
        assert_eq!(cfg.http_max_connections, None);
        assert_eq!(cfg.http_max_connections_per_addr, 64);
        assert_eq!(
            (cfg.max_concurrent_starts, cfg.start_rate, cfg.start_burst),
            (8, 5, 20)
        );
        assert_eq!(cfg.unknown_channel_ttl, Duration::from_secs(5));
        let trusted: Vec<String> = cfg.trusted_proxies.iter().map(|n| n.to_string()).collect();
        assert_eq!(trusted, ["127.0.0.1/32", "::1/128"], "not all of 127/8");
        for (args, says) in [
            (
                &["--admin-token", "short"][..],
                "admin_token is 5 bytes long; it must be at least 16",
            ),
            (&["--admin-token", "sixteen bytes ok"][..], "visible ASCII"),
            (&["--http-max-header-bytes", "4K"][..], "at least 8K"),
            (&["--http-header-timeout", "0s"][..], "above zero"),
            (&["--max-concurrent-starts", "0"][..], "at least 1"),
            (&["--http-max-connections", "0"][..], "at least 1"),
        ] {
            let mut argv = vec!["farm-node"];
            argv.extend_from_slice(args);
            let err = Config::from_args(Args::parse_from(argv)).expect_err(args[0]);
            assert!(err.to_string().contains(says), "{args:?}: {err}");
            assert!(
                !err.to_string().contains("short"),
                "the token is not echoed: {err}"
            );
        }
        let ok = Config::from_args(Args::parse_from([
            "farm-node",
            "--admin-token",
            "0123456789abcdef",
            "--http-max-connections",
            "300",
        ]))
        .expect("a 16-byte token");
        assert_eq!(ok.http_max_connections, Some(300));
    }
}
