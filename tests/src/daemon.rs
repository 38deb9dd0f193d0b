//! [`Daemon`]: one of the farm's daemons (`farm-node`, `farm-coordinator`) as a child process. The
//! node and coordinator handles ([`crate::node::NodeProcess`], [`crate::coordinator::CoordinatorProcess`])
//! are this type plus what is their own (arguments, readiness, the node's FFmpeg sweep).
//!
//! A daemon runs with a cleared environment (PATH, HOME, `RUST_LOG`, plus what the caller adds), logs
//! stdout+stderr to a file in its own temp dir, and is ready once its `GET /healthz` answers as
//! [`Ready`] says. On drop it is continued (in case it was stopped), SIGKILLed and reaped; when the
//! test panics, its log tail goes to stderr.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::bins::bin_path;
use crate::ports::free_port;
use crate::procs::tail;
use crate::signal;

/// `Deref`/`DerefMut` of a handle to its field `daemon`: a node or coordinator handle is a [`Daemon`]
/// plus what is its own.
macro_rules! deref_to_daemon {
    ($t:ty) => {
        impl std::ops::Deref for $t {
            type Target = $crate::daemon::Daemon;
            fn deref(&self) -> &$crate::daemon::Daemon {
                &self.daemon
            }
        }

        impl std::ops::DerefMut for $t {
            fn deref_mut(&mut self) -> &mut $crate::daemon::Daemon {
                &mut self.daemon
            }
        }
    };
}
pub(crate) use deref_to_daemon;

/// The `args` and `env` builder methods of a daemon's options type (fields `extra_args` and
/// `env`): a test passes arguments and environment to a node and a coordinator alike.
macro_rules! args_and_env_builders {
    ($t:ty) => {
        impl $t {
            /// Appends extra command-line arguments.
            pub fn args<I, S>(mut self, args: I) -> Self
            where
                I: IntoIterator<Item = S>,
                S: Into<String>,
            {
                self.extra_args.extend(args.into_iter().map(Into::into));
                self
            }

            /// Adds an environment variable.
            pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
                self.env.push((key.into(), value.into()));
                self
            }
        }
    };
}
pub(crate) use args_and_env_builders;

/// How long [`Daemon::spawn`] waits for `/healthz`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// When a daemon counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// `GET /healthz` answers 200.
    Ok200,
    /// `GET /healthz` answers at all (a coordinator answers 503 before it has reached Redis).
    Answers,
}

/// How to start a daemon: the binary, its id, Redis and arguments, and its environment. Its command
/// line is `<id_flag> <label> --redis-url <redis_url> --listen <addr> <own_args> <extra_args>`.
pub struct DaemonSpec<'a> {
    /// The binary's name, e.g. `farm-node`.
    pub bin: &'static str,
    /// The flag that takes its id, e.g. `--node-id`.
    pub id_flag: &'static str,
    /// Its id, also for the temp dir, the log and panic messages.
    pub label: &'a str,
    pub redis_url: &'a str,
    /// The harness's own arguments for this kind of daemon.
    pub own_args: Vec<OsString>,
    /// The test's arguments.
    pub extra_args: &'a [String],
    /// The `RUST_LOG` it runs with.
    pub rust_log: &'static str,
    /// Added to the cleared environment (after PATH, HOME, `RUST_LOG`).
    pub env: &'a [(String, String)],
    /// A fixed listen address; default: a free port at each attempt.
    pub listen: Option<SocketAddr>,
    pub ready: Ready,
}

/// A running daemon.
pub struct Daemon {
    child: Child,
    exit: Option<ExitStatus>,
    addr: SocketAddr,
    bin: &'static str,
    label: String,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `spec.bin` and waits until it is ready (up to [`READY_TIMEOUT`]). Panics with its log
    /// if it exits first or never gets ready.
    pub fn spawn(spec: DaemonSpec<'_>) -> Daemon {
        let bin = bin_path(spec.bin);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-{}-", spec.bin, spec.label))
            .tempdir()
            .unwrap_or_else(|e| panic!("create temp dir for {}: {e}", spec.bin));
        let short = spec.bin.trim_start_matches("farm-");
        let log_path = dir.path().join(format!("{short}.log"));
        // free_port() is racy: retry on another port if the daemon could not bind its listener.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let addr = spec
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
            let mut child = start_child(&bin, &spec, &command_line(&spec, addr), &log_path);
            match wait_ready(&mut child, addr, spec.ready, READY_TIMEOUT) {
                Ok(()) => {
                    return Daemon {
                        child,
                        exit: None,
                        addr,
                        bin: spec.bin,
                        label: spec.label.to_string(),
                        log_path,
                        _dir: dir,
                    };
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    if log.contains("ddress already in use") && attempt < 3 {
                        continue;
                    }
                    panic!(
                        "{} {} not ready: {e}\n--- {short} log ({}) ---\n{}\n--- end ---",
                        spec.bin,
                        spec.label,
                        log_path.display(),
                        tail(&log, 60)
                    );
                }
            }
        }
    }

    /// `http://127.0.0.1:<port>`, no trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Address of its HTTP listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits in i32")
    }

    /// Path of its log file (stdout + stderr).
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

    /// SIGTERM (graceful shutdown). Use [`Daemon::wait_exit`] to wait for it.
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

    /// SIGSTOP: it freezes (no heartbeats, no HTTP answers) but keeps its sockets.
    pub fn sigstop(&self) {
        self.signal(signal::Sig::STOP, "SIGSTOP");
    }

    /// SIGCONT after [`Daemon::sigstop`].
    pub fn sigcont(&self) {
        self.signal(signal::Sig::CONT, "SIGCONT");
    }

    fn signal(&self, sig: signal::Sig, name: &str) {
        if self.exit.is_none() {
            signal::send(self.pid(), sig)
                .unwrap_or_else(|e| panic!("{name} {} {}: {e}", self.bin, self.pid()));
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

    /// Waits up to `timeout` for it to exit; its exit status, or `None` if it is still running.
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

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("bin", &self.bin)
            .field("label", &self.label)
            .field("pid", &self.child.id())
            .field("addr", &self.addr)
            .field("exit", &self.exit)
            .field("log", &self.log_path)
            .finish()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A stopped process: continue it too, so nothing is left frozen whatever the kernel's view.
        if self.exit.is_none() {
            let _ = signal::cont(self.pid());
        }
        self.kill9();
        crate::procs::print_tail_if_panicking(
            format_args!(
                "{} {} log tail ({})",
                self.bin,
                self.label,
                self.log_path.display()
            ),
            60,
            || self.log(),
        );
    }
}

fn command_line(spec: &DaemonSpec<'_>, addr: SocketAddr) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        spec.id_flag,
        spec.label,
        "--redis-url",
        spec.redis_url,
        "--listen",
        &addr.to_string(),
    ]
    .map(OsString::from)
    .into();
    args.extend(spec.own_args.iter().cloned());
    args.extend(spec.extra_args.iter().map(OsString::from));
    args
}

fn start_child(bin: &Path, spec: &DaemonSpec<'_>, args: &[OsString], log_path: &Path) -> Child {
    let log = File::options()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap_or_else(|e| panic!("open {} log {}: {e}", spec.bin, log_path.display()));
    let log_err = log.try_clone().expect("clone daemon log handle");
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_clear()
        .env("RUST_LOG", spec.rust_log)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    for key in ["PATH", "HOME"] {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    for (k, v) in spec.env {
        cmd.env(k, v);
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()))
}

fn wait_ready(
    child: &mut Child,
    addr: SocketAddr,
    ready: Ready,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status} before /healthz answered"));
        }
        let ok = match ready {
            Ready::Ok200 => http_status(addr, "/healthz") == Some(200),
            Ready::Answers => http_get(addr, "/healthz").is_some(),
        };
        if ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let want = match ready {
                Ready::Ok200 => "no 200",
                Ready::Answers => "no answer",
            };
            return Err(format!(
                "GET http://{addr}/healthz gave {want} within {timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A connected stream with `GET path` (HTTP/1.1, `Connection: close`) sent, 1 s read/write timeouts.
fn send_get(addr: SocketAddr, path: &str) -> Option<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    Some(s)
}

/// Status code of a plain blocking `GET path` (HTTP/1.1, `Connection: close`), or `None` if the
/// request fails within 1 s. Reads the status line only. Usable from sync code and inside async
/// tests alike.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = send_get(addr, path)?;
    let mut buf = [0u8; 256];
    let mut head = Vec::new();
    while !head.contains(&b'\n') {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `(status, body)` of a plain blocking `GET path` (HTTP/1.1, `Connection: close`), or `None` if the
/// request fails within 1 s. Usable from sync code and inside async tests alike.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = send_get(addr, path)?;
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
