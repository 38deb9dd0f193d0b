//! [`CoordinatorProcess`]: the real `farm-coordinator` binary as a child process, plus what the
//! coordinator tests share: readers of the farm's Redis state for assertions ([`events`], [`leader`],
//! [`owner`]), [`ffmpegs_for`] (a channel's FFmpegs on one node), [`node_args`] (short TTLs) and
//! [`fake_source`] (a fake-ffmpeg URL).
//!
//! A coordinator runs with a cleared environment (PATH, HOME, `RUST_LOG=info,farm_coordinator=debug`,
//! plus what the test adds), logs stdout+stderr to a file in its own temp dir, and is ready once its
//! `/healthz` answers (200 or 503: it answers before it has reached Redis). On drop it is SIGKILLed
//! and reaped; when the test panics, its log tail goes to stderr.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use crate::bins::bin_path;
use crate::ports::free_port;
use crate::procs::tail;
use crate::signal;

/// How long [`CoordinatorProcess::spawn`] waits for `/healthz`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How to start a coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorOpts {
    pub id: String,
    pub redis_url: String,
    /// Appended after the harness's own arguments (`--id`, `--redis-url`, `--listen`).
    pub extra_args: Vec<String>,
    /// Added to the cleared environment.
    pub env: Vec<(String, String)>,
}

impl CoordinatorOpts {
    pub fn new(id: impl Into<String>, redis_url: impl Into<String>) -> CoordinatorOpts {
        CoordinatorOpts {
            id: id.into(),
            redis_url: redis_url.into(),
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Appends extra command-line arguments.
    pub fn args<I, S>(mut self, args: I) -> CoordinatorOpts
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> CoordinatorOpts {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// A running `farm-coordinator`.
pub struct CoordinatorProcess {
    child: Child,
    exit: Option<ExitStatus>,
    addr: SocketAddr,
    opts: CoordinatorOpts,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl CoordinatorProcess {
    /// Starts `farm-coordinator` and waits until `/healthz` answers. Panics with its log if it exits
    /// first or never answers.
    pub fn spawn(opts: CoordinatorOpts) -> CoordinatorProcess {
        let bin = bin_path("farm-coordinator");
        let dir = tempfile::Builder::new()
            .prefix(&format!("farm-coordinator-{}-", opts.id))
            .tempdir()
            .expect("create temp dir for farm-coordinator");
        let log_path = dir.path().join("coordinator.log");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let mut child = start_child(&bin, &opts, addr, &log_path);
            match wait_ready(&mut child, addr, READY_TIMEOUT) {
                Ok(()) => {
                    return CoordinatorProcess {
                        child,
                        exit: None,
                        addr,
                        opts,
                        log_path,
                        _dir: dir,
                    }
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    if log.contains("ddress already in use") && attempt < 3 {
                        continue;
                    }
                    panic!(
                        "farm-coordinator {} not ready: {e}\n--- coordinator log ({}) ---\n{}\n--- end ---",
                        opts.id,
                        log_path.display(),
                        tail(&log, 60)
                    );
                }
            }
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn id(&self) -> &str {
        &self.opts.id
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits in i32")
    }

    pub fn opts(&self) -> &CoordinatorOpts {
        &self.opts
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Its log so far (stdout + stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `(status, body)` of `GET path` on its HTTP server, `None` if it does not answer within 1 s.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.addr, path)
    }

    /// Its `/metrics` text ("" when it does not answer).
    pub fn metrics(&self) -> String {
        self.get("/metrics").map(|(_, b)| b).unwrap_or_default()
    }

    /// Sum of the samples of one series in `/metrics` whose name (with labels) starts with `name`,
    /// e.g. `farm_coordinator_idle_stops_total` or `farm_coordinator_reaps_total{reason="node_dead"}`.
    pub fn metric(&self, name: &str) -> f64 {
        metric_value(&self.metrics(), name)
    }

    /// SIGTERM (graceful shutdown). Use [`CoordinatorProcess::wait_exit`] to wait for it.
    pub fn sigterm(&self) {
        self.signal(signal::Sig::TERM, "SIGTERM");
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if self.running() {
            self.signal(signal::Sig::KILL, "SIGKILL");
            if let Ok(status) = self.child.wait() {
                self.exit = Some(status);
            }
        }
    }

    /// SIGSTOP: it freezes, keeping its sockets.
    pub fn sigstop(&self) {
        self.signal(signal::Sig::STOP, "SIGSTOP");
    }

    /// SIGCONT after [`CoordinatorProcess::sigstop`].
    pub fn sigcont(&self) {
        self.signal(signal::Sig::CONT, "SIGCONT");
    }

    fn signal(&self, sig: signal::Sig, name: &str) {
        if self.exit.is_none() {
            signal::send(self.pid(), sig)
                .unwrap_or_else(|e| panic!("{name} farm-coordinator {}: {e}", self.pid()));
        }
    }

    /// True until it has exited (and been reaped by this handle).
    pub fn running(&mut self) -> bool {
        if self.exit.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
            }
        }
        self.exit.is_none()
    }

    /// Waits up to `timeout` for it to exit; its exit status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.running() {
                return self.exit;
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        // A stopped process cannot die of SIGKILL until it is continued on some kernels' views; be sure.
        if self.exit.is_none() {
            let _ = signal::cont(self.pid());
        }
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "--- farm-coordinator {} log tail ({}) ---\n{}\n--- end ---",
                self.opts.id,
                self.log_path.display(),
                tail(&self.log(), 60)
            );
        }
    }
}

fn start_child(bin: &Path, opts: &CoordinatorOpts, addr: SocketAddr, log_path: &Path) -> Child {
    let log = File::options()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap_or_else(|e| panic!("open coordinator log {}: {e}", log_path.display()));
    let log_err = log.try_clone().expect("clone coordinator log handle");
    let mut cmd = Command::new(bin);
    cmd.arg("--id")
        .arg(&opts.id)
        .arg("--redis-url")
        .arg(&opts.redis_url)
        .arg("--listen")
        .arg(addr.to_string())
        .args(&opts.extra_args)
        .env_clear()
        .env("RUST_LOG", "info,farm_coordinator=debug")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    for key in ["PATH", "HOME"] {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()))
}

fn wait_ready(child: &mut Child, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status} before /healthz answered"));
        }
        if http_get(addr, "/healthz").is_some() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "GET http://{addr}/healthz gave no answer within {timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `(status, body)` of a plain blocking `GET path` (HTTP/1.1, `Connection: close`), or `None` if the
/// request fails within 1 s. Usable from sync code and inside async tests alike.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Sum of the samples in a Prometheus text whose series (name plus labels) starts with `name`.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let matches = series == name
                || (series.starts_with(name)
                    && (name.ends_with('}') || series[name.len()..].starts_with('{')));
            matches.then(|| v.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// One entry of `farm:events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FarmEvent {
    pub id: String,
    pub fields: HashMap<String, String>,
}

impl FarmEvent {
    /// A field, "" when absent.
    pub fn get(&self, name: &str) -> &str {
        self.fields.get(name).map_or("", String::as_str)
    }

    /// The `event` field.
    pub fn kind(&self) -> &str {
        self.get("event")
    }
}

/// Every entry of `<prefix>:events`, oldest first.
pub async fn events(conn: &mut MultiplexedConnection, prefix: &str) -> Vec<FarmEvent> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("{prefix}:events"))
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("XRANGE events");
    reply
        .ids
        .into_iter()
        .map(|e| FarmEvent {
            fields: e
                .map
                .iter()
                .filter_map(|(k, v)| {
                    redis::from_redis_value::<String>(v.clone())
                        .ok()
                        .map(|v| (k.clone(), v))
                })
                .collect(),
            id: e.id,
        })
        .collect()
}

/// The coordinator id in `<prefix>:leader`, if any.
pub async fn leader(conn: &mut MultiplexedConnection, prefix: &str) -> Option<String> {
    let v: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}:leader"))
        .query_async(conn)
        .await
        .expect("GET leader");
    v.and_then(|v| v.rsplit_once(':').map(|(id, _)| id.to_string()))
}

/// `farm-node` arguments for coordinator tests: 1 s segments, lease and node TTL `ttl`, 500 ms
/// access flush, quick backoff and stop grace.
pub fn node_args(ttl: &str) -> Vec<String> {
    [
        "--hls-time",
        "1s",
        "--lease-ttl",
        ttl,
        "--node-ttl",
        ttl,
        "--access-flush",
        "500ms",
        "--backoff-base",
        "200ms",
        "--backoff-max",
        "2s",
        "--stop-grace",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A fake-ffmpeg source URL: a segment every `seg_ms` (the fake never opens it).
pub fn fake_source(name: &str, seg_ms: u64) -> String {
    format!("http://127.0.0.1:9/{name}.ts?mode=normal&seg_ms={seg_ms}")
}

/// Runs farmctl and panics with its stderr unless it succeeds; returns its stdout.
pub fn farmctl_ok(redis_url: &str, args: &[&str]) -> String {
    let out = crate::node::farmctl(redis_url, args);
    assert!(
        out.status.success(),
        "farmctl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Live processes (FFmpegs) writing into `<hls_root>/<channel>/`.
pub fn ffmpegs_for(hls_root: &Path, channel: &str) -> Vec<i32> {
    let needle = format!(
        "{}/{channel}/",
        hls_root.display().to_string().trim_end_matches('/')
    );
    crate::procs::processes_with_cmdline_containing(&needle)
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|pid| crate::procs::pid_alive(*pid))
        .collect()
}

/// The `(node, gen)` in `<prefix>:owner:<channel>`, if any.
pub async fn owner(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    channel: &str,
) -> Option<(String, u64)> {
    let v: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}:owner:{channel}"))
        .query_async(conn)
        .await
        .expect("GET owner");
    let v = v?;
    let (n, g) = v.rsplit_once(':')?;
    Some((n.to_string(), g.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_match_names_and_labels() {
        let text = "# HELP x\nfarm_coordinator_idle_stops_total 3\n\
farm_coordinator_reaps_total{reason=\"node_dead\"} 2\n\
farm_coordinator_reaps_total{reason=\"no_lease\"} 1\n\
farm_coordinator_reaps_total_other 9\n";
        assert_eq!(metric_value(text, "farm_coordinator_idle_stops_total"), 3.0);
        assert_eq!(metric_value(text, "farm_coordinator_reaps_total"), 3.0);
        assert_eq!(
            metric_value(text, "farm_coordinator_reaps_total{reason=\"node_dead\"}"),
            2.0
        );
        assert_eq!(metric_value(text, "farm_coordinator_missing"), 0.0);
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }
}
