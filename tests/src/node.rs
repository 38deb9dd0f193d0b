//! [`NodeProcess`]: the real `farm-node` binary as a child process (a [`Daemon`]), and [`farmctl`].
//!
//! A node runs as a [`Daemon`] with `RUST_LOG=info,farm_node=debug` and `NO_COLOR=1`, and is ready
//! once `GET /healthz` answers 200. On drop it is SIGKILLed and reaped, and FFmpeg processes it left
//! behind (found by the node's `--hls-root` in their command line) are killed too, so a test never
//! leaks processes. When the test panics, the node's log tail goes to stderr.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::bins::bin_path;
pub use crate::daemon::{http_status, READY_TIMEOUT};
use crate::daemon::{Daemon, DaemonSpec, Ready};
use crate::procs;
use crate::signal;

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
}

crate::daemon::args_and_env_builders!(NodeOpts);

/// A running `farm-node`: a [`Daemon`] (signals, log, exit; reached through `Deref`) with its options.
pub struct NodeProcess {
    daemon: Daemon,
    opts: NodeOpts,
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
        let mut env = opts.env.clone();
        // The log goes to a file that tests read and print: no ANSI colour codes in it.
        env.insert(0, ("NO_COLOR".to_string(), "1".to_string()));
        let daemon = Daemon::spawn(DaemonSpec {
            bin: "farm-node",
            id_flag: "--node-id",
            label: &opts.node_id,
            redis_url: &opts.redis_url,
            own_args: vec![
                "--hls-root".into(),
                opts.hls_root.clone().into(),
                "--ffmpeg".into(),
                opts.ffmpeg.clone().into(),
            ],
            extra_args: &opts.extra_args,
            rust_log: "info,farm_node=debug",
            env: &env,
            listen: opts.listen,
            ready: Ready::Ok200,
        });
        *lock_roots().entry(opts.hls_root.clone()).or_default() += 1;
        NodeProcess { daemon, opts }
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
}

crate::daemon::deref_to_daemon!(NodeProcess);

impl std::fmt::Debug for NodeProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProcess")
            .field("node_id", &self.opts.node_id)
            .field("daemon", &self.daemon)
            .finish()
    }
}

impl Drop for NodeProcess {
    /// Kills the node (its FFmpegs are left running, as after a real crash) and, when it was the
    /// last node of its `--hls-root`, sweeps the FFmpegs left there. The daemon's own drop then
    /// prints its log tail if the test panics.
    fn drop(&mut self) {
        self.daemon.kill9();
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

/// The stdout of a command that must have succeeded; panics naming `what` with its stderr if not.
pub fn output_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
