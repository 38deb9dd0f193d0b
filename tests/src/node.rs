//! [`NodeProcess`]: the real `farm-node` binary as a child process, and [`farmctl`].
//!
//! A node runs with a cleared environment (PATH, HOME, `RUST_LOG=info,farm_node=debug`, `NO_COLOR=1`,
//! plus what the test adds), logs stdout+stderr to a file in its own temp dir, and is ready once `GET /healthz`
//! answers 200. On drop it is SIGKILLed and reaped, and FFmpeg processes it left behind (found by the
//! node's `--hls-root` in their command line) are killed too, so a test never leaks processes. When
//! the test panics, the node's log tail goes to stderr.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::bins::bin_path;
use crate::ports::free_port;
use crate::procs::{self, tail};
use crate::signal;

/// How long [`NodeProcess::spawn`] waits for `/healthz`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How to start a node.
#[derive(Debug, Clone)]
pub struct NodeOpts {
    pub node_id: String,
    pub redis_url: String,
    pub hls_root: PathBuf,
    /// FFmpeg binary passed as `--ffmpeg`; default `ffmpeg` (the real one, from PATH).
    pub ffmpeg: PathBuf,
    /// Appended after the harness's own arguments.
    pub extra_args: Vec<String>,
    /// Added to the cleared environment.
    pub env: Vec<(String, String)>,
    /// A fixed listen address (kept across restarts, e.g. for an nginx in front); default: a
    /// free port at each start.
    pub listen: Option<SocketAddr>,
}

impl NodeOpts {
    pub fn new(
        node_id: impl Into<String>,
        redis_url: impl Into<String>,
        hls_root: impl Into<PathBuf>,
    ) -> NodeOpts {
        NodeOpts {
            node_id: node_id.into(),
            redis_url: redis_url.into(),
            hls_root: hls_root.into(),
            ffmpeg: PathBuf::from("ffmpeg"),
            extra_args: Vec::new(),
            env: Vec::new(),
            listen: None,
        }
    }

    /// Listens on this address at every start.
    pub fn listen(mut self, addr: SocketAddr) -> NodeOpts {
        self.listen = Some(addr);
        self
    }

    /// Uses the fake ffmpeg binary.
    pub fn with_fake_ffmpeg(mut self) -> NodeOpts {
        self.ffmpeg = crate::bins::fake_ffmpeg();
        self
    }

    /// Appends extra command-line arguments.
    pub fn args<I, S>(mut self, args: I) -> NodeOpts
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> NodeOpts {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// A running `farm-node`.
pub struct NodeProcess {
    child: Child,
    exit: Option<ExitStatus>,
    addr: SocketAddr,
    opts: NodeOpts,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// hls_root → number of live NodeProcess values using it, so leftover FFmpegs are only swept when
/// the last node of a root goes away.
fn roots_in_use() -> &'static Mutex<HashMap<PathBuf, usize>> {
    static ROOTS: OnceLock<Mutex<HashMap<PathBuf, usize>>> = OnceLock::new();
    ROOTS.get_or_init(Default::default)
}

impl NodeProcess {
    /// Starts `farm-node` and waits until `/healthz` answers 200 (up to [`READY_TIMEOUT`]). Panics
    /// with the node's log if it exits first or never gets ready.
    pub fn spawn(opts: NodeOpts) -> NodeProcess {
        let bin = bin_path("farm-node");
        let dir = tempfile::Builder::new()
            .prefix(&format!("farm-node-{}-", opts.node_id))
            .tempdir()
            .expect("create temp dir for farm-node");
        let log_path = dir.path().join("node.log");
        // free_port() is racy: retry on another port if the node could not bind its listener.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let addr = opts
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
            let mut child = start_child(&bin, &opts, addr, &log_path);
            match wait_ready(&mut child, addr, READY_TIMEOUT) {
                Ok(()) => {
                    *lock_roots().entry(opts.hls_root.clone()).or_default() += 1;
                    return NodeProcess {
                        child,
                        exit: None,
                        addr,
                        opts,
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
                        "farm-node {} not ready: {e}\n--- node log ({}) ---\n{}\n--- end ---",
                        opts.node_id,
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

    /// The options it was started with.
    pub fn opts(&self) -> &NodeOpts {
        &self.opts
    }

    /// Its node id.
    pub fn node_id(&self) -> &str {
        &self.opts.node_id
    }

    /// Its `--hls-root`.
    pub fn hls_root(&self) -> &Path {
        &self.opts.hls_root
    }

    /// Path of its log file (stdout + stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Its log so far (stdout + stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGTERM (graceful shutdown). Use [`NodeProcess::wait_exit`] to wait for it.
    pub fn sigterm(&self) {
        self.signal(signal::Sig::TERM, "SIGTERM");
    }

    /// SIGKILL and reap. Its FFmpegs are left running, as after a real crash (see the module docs
    /// for when the harness sweeps them).
    pub fn kill9(&mut self) {
        if self.running() {
            self.signal(signal::Sig::KILL, "SIGKILL");
            if let Ok(status) = self.child.wait() {
                self.exit = Some(status);
            }
        }
    }

    /// SIGSTOP: the node freezes (no heartbeats, no HTTP answers) but keeps its sockets.
    pub fn sigstop(&self) {
        self.signal(signal::Sig::STOP, "SIGSTOP");
    }

    /// SIGCONT after [`NodeProcess::sigstop`].
    pub fn sigcont(&self) {
        self.signal(signal::Sig::CONT, "SIGCONT");
    }

    fn signal(&self, sig: signal::Sig, name: &str) {
        if self.exit.is_none() {
            signal::send(self.pid(), sig)
                .unwrap_or_else(|e| panic!("{name} farm-node {}: {e}", self.pid()));
        }
    }

    /// True until it has exited (and been reaped by this handle).
    pub fn running(&mut self) -> bool {
        self.try_exit_status().is_none()
    }

    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
            }
        }
        self.exit
    }

    /// Waits up to `timeout` for it to exit; its exit status, or `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl std::fmt::Debug for NodeProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProcess")
            .field("node_id", &self.opts.node_id)
            .field("pid", &self.child.id())
            .field("addr", &self.addr)
            .field("exit", &self.exit)
            .field("log", &self.log_path)
            .finish()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
        let last_of_root = {
            let mut roots = lock_roots();
            let n = roots.entry(self.opts.hls_root.clone()).or_default();
            *n = n.saturating_sub(1);
            let last = *n == 0;
            if last {
                roots.remove(&self.opts.hls_root);
            }
            last
        };
        if last_of_root {
            kill_processes_under(&self.opts.hls_root);
        }
        if std::thread::panicking() {
            eprintln!(
                "--- farm-node {} log tail ({}) ---\n{}\n--- end ---",
                self.opts.node_id,
                self.log_path.display(),
                tail(&self.log(), 60)
            );
        }
    }
}

fn lock_roots() -> std::sync::MutexGuard<'static, HashMap<PathBuf, usize>> {
    roots_in_use().lock().unwrap_or_else(|e| e.into_inner())
}

/// SIGKILLs every process (other than a farm-node) whose command line mentions a path under `root`,
/// i.e. FFmpegs writing there. Returns their pids. Safe to call from any test at its end.
pub fn kill_processes_under(root: &Path) -> Vec<i32> {
    let needle = format!("{}/", root.display().to_string().trim_end_matches('/'));
    let mut killed = Vec::new();
    for (pid, cmdline) in procs::processes_with_cmdline_containing(&needle) {
        let exe = cmdline.split(' ').next().unwrap_or("");
        if exe.ends_with("farm-node") {
            continue;
        }
        if signal::kill9(pid).is_ok() {
            killed.push(pid);
        }
    }
    killed
}

fn start_child(bin: &Path, opts: &NodeOpts, addr: SocketAddr, log_path: &Path) -> Child {
    let log = File::options()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap_or_else(|e| panic!("open node log {}: {e}", log_path.display()));
    let log_err = log.try_clone().expect("clone node log handle");
    let mut cmd = Command::new(bin);
    cmd.arg("--node-id")
        .arg(&opts.node_id)
        .arg("--redis-url")
        .arg(&opts.redis_url)
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--hls-root")
        .arg(&opts.hls_root)
        .arg("--ffmpeg")
        .arg(&opts.ffmpeg)
        .args(&opts.extra_args)
        .env_clear()
        .env("RUST_LOG", "info,farm_node=debug")
        // The log goes to a file that tests read and print: no ANSI colour codes in it.
        .env("NO_COLOR", "1")
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
        if http_status(addr, "/healthz") == Some(200) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "GET http://{addr}/healthz gave no 200 within {timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Status code of a plain blocking `GET path` (HTTP/1.1, `Connection: close`), or `None` if the
/// request fails within 1 s. Usable from sync code and inside async tests alike.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
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

/// How long [`farmctl`] may run before it is killed.
pub const FARMCTL_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `farmctl <args>` with `FARM_REDIS_URL=<redis_url>` (environment otherwise cleared except
/// PATH/HOME) and returns its output. Panics if it cannot start or runs longer than
/// [`FARMCTL_TIMEOUT`].
pub fn farmctl(redis_url: &str, args: &[&str]) -> Output {
    let bin = bin_path("farmctl");
    let mut cmd = Command::new(&bin);
    cmd.args(args)
        .env_clear()
        .env("FARM_REDIS_URL", redis_url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for key in ["PATH", "HOME"] {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let pid = i32::try_from(child.id()).expect("pid fits in i32");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(FARMCTL_TIMEOUT) {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("wait for farmctl {args:?}: {e}"),
        Err(_) => {
            let _ = signal::kill9(pid);
            panic!("farmctl {args:?} ran longer than {FARMCTL_TIMEOUT:?}; killed");
        }
    }
}
