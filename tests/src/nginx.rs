//! [`NginxServer`]: a real nginx running the shipped config (`deploy/nginx/farm.conf.template`,
//! rendered by `deploy/nginx/render`, the same script the launchers use) as the test's user, on a
//! free port, in its own temp dir.
//!
//! Invariants: nginx runs in the foreground (`daemon off`) in its own process group; on drop the
//! master gets SIGTERM (fast shutdown) and is waited for, then the whole group is SIGKILLed, so no
//! worker outlives the fixture. Its error log is printed when the test panics. Nothing is shared
//! with other tests: the rendered config, pid file, logs and temp files live in its own temp dir.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::node::http_status;
use crate::ports::free_port;
use crate::procs;
use crate::signal;

/// How long [`NginxServer::start`] waits for nginx to answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long drop waits for nginx to exit after SIGTERM before SIGKILLing its process group.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// How nginx tells the farm about viewers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessMode {
    /// `auth_request` to a node's `GET /auth` for every playlist and segment request.
    Auth,
    /// No subrequest: nginx writes each request path to these datagram sockets (the nodes'
    /// `--access-socket`).
    AccessLog(Vec<PathBuf>),
}

/// What to render the template with.
#[derive(Debug, Clone)]
pub struct NginxOpts {
    /// farm-node HTTP addresses (the upstream).
    pub nodes: Vec<SocketAddr>,
    /// farm-node HLS roots nginx sends files from.
    pub roots: Vec<PathBuf>,
    pub mode: AccessMode,
    /// farm-nodes of other machines (`--fallback-node`): asked when every node is unreachable.
    pub fallbacks: Vec<SocketAddr>,
}

impl NginxOpts {
    /// Auth mode, no nodes or roots yet.
    pub fn new() -> NginxOpts {
        NginxOpts {
            nodes: Vec::new(),
            roots: Vec::new(),
            mode: AccessMode::Auth,
            fallbacks: Vec::new(),
        }
    }

    /// Auth mode in front of these nodes, sending files from their HLS roots.
    pub fn for_nodes<'a>(nodes: impl IntoIterator<Item = &'a crate::node::NodeProcess>) -> Self {
        nodes
            .into_iter()
            .fold(NginxOpts::new(), |o, n| o.node(n.addr()).root(n.hls_root()))
    }

    /// Adds a node address to the upstream.
    pub fn node(mut self, addr: SocketAddr) -> Self {
        self.nodes.push(addr);
        self
    }

    /// Adds a node of another machine (`--fallback-node`).
    pub fn fallback(mut self, addr: SocketAddr) -> Self {
        self.fallbacks.push(addr);
        self
    }

    /// Adds an HLS root.
    pub fn root(mut self, root: impl Into<PathBuf>) -> Self {
        self.roots.push(root.into());
        self
    }

    /// Switches to the zero-cost access-log mode, reporting to these sockets.
    pub fn access_log<I, P>(mut self, sockets: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<PathBuf>,
    {
        self.mode = AccessMode::AccessLog(sockets.into_iter().map(Into::into).collect());
        self
    }
}

impl Default for NginxOpts {
    fn default() -> Self {
        NginxOpts::new()
    }
}

/// A rendered config in its own run dir (for `nginx -t` tests).
#[derive(Debug)]
pub struct Rendered {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
}

impl Rendered {
    /// The run dir (`nginx -p`): pid file, logs/, tmp/.
    pub fn run_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The rendered text.
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.conf).unwrap_or_default()
    }

    /// `nginx -t` on it: `Ok(stderr)` when nginx accepts it, `Err(stderr)` otherwise.
    pub fn check(&self) -> Result<String, String> {
        let out = self.nginx(&["-t", "-q"]).unwrap_or_else(|e| panic!("{e}"));
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(text)
        }
    }

    fn nginx_cmd(&self, extra: &[&str]) -> Command {
        let dir = self.dir.path();
        let mut cmd = Command::new(nginx_bin());
        cmd.arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("logs/error.log"))
            .arg("-c")
            .arg(&self.conf)
            .args(extra)
            .stdin(Stdio::null());
        cmd
    }

    fn nginx(&self, extra: &[&str]) -> Result<Output, String> {
        self.nginx_cmd(extra)
            .output()
            .map_err(|e| format!("run nginx (is it installed?): {e}"))
    }
}

/// Path of the shipped template.
pub fn template_path() -> PathBuf {
    repo_root().join("deploy/nginx/farm.conf.template")
}

/// Path of the renderer script.
pub fn render_script() -> PathBuf {
    repo_root().join("deploy/nginx/render")
}

/// The repository's root folder: the parent of the running package's folder, which cargo (test,
/// nextest, run) passes in `CARGO_MANIFEST_DIR`, else of this crate's folder when it was compiled.
/// The running value comes first because a build can outlive its folder: the mutation check builds
/// in a scratch worktree that it then removes, and a later run in the checkout can reuse that build.
pub fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.join("Cargo.toml").is_file())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .parent()
        .expect("a package folder has a parent")
        .to_path_buf()
}

/// The nginx binary: from PATH, else Debian's `/usr/sbin/nginx`.
pub fn nginx_bin() -> PathBuf {
    let in_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("nginx"))
            .find(|p| p.is_file())
    });
    in_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
}

/// Renders the template for `opts` listening on `listen`, into a new run dir. Panics with the
/// renderer's message if it refuses the options.
pub fn render_only(opts: &NginxOpts, listen: SocketAddr) -> Rendered {
    let dir = tempfile::Builder::new()
        .prefix("farm-nginx-")
        .tempdir()
        .expect("create temp dir for nginx");
    let conf = dir.path().join("farm.conf");
    let out = render_cmd(opts, listen, dir.path())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", render_script().display()));
    assert!(
        out.status.success(),
        "deploy/nginx/render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&conf, &out.stdout).expect("write rendered nginx config");
    Rendered { dir, conf }
}

/// The renderer's command line for `opts` (exposed so tests can check what it refuses).
pub fn render_cmd(opts: &NginxOpts, listen: SocketAddr, run_dir: &Path) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(render_script())
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--run-dir")
        .arg(run_dir)
        .stdin(Stdio::null());
    for n in &opts.nodes {
        cmd.arg("--node").arg(n.to_string());
    }
    for r in &opts.roots {
        cmd.arg("--root").arg(r);
    }
    for f in &opts.fallbacks {
        cmd.arg("--fallback-node").arg(f.to_string());
    }
    match &opts.mode {
        AccessMode::Auth => {
            cmd.arg("--mode").arg("auth");
        }
        AccessMode::AccessLog(sockets) => {
            cmd.arg("--mode").arg("access-log");
            for s in sockets {
                cmd.arg("--access-socket").arg(s);
            }
        }
    }
    cmd
}

/// One line of nginx's `farm_main` access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub bytes: u64,
    /// `disk` (sent from an HLS root), `node` (proxied to a node), `owner` (X-Accel-Redirect to the
    /// owner node).
    pub via: String,
}

impl AccessEntry {
    /// Parses `ip [time] "GET /path HTTP/1.1" 200 1234 via=disk upstream="-" rt=0.001`.
    pub fn parse(line: &str) -> Option<AccessEntry> {
        let (_, rest) = line.split_once("] \"")?;
        let (request, rest) = rest.split_once("\" ")?;
        let mut req = request.split_whitespace();
        let method = req.next()?.to_string();
        let path = req.next()?.to_string();
        let mut fields = rest.split_whitespace();
        let status = fields.next()?.parse().ok()?;
        let bytes = fields.next()?.parse().ok()?;
        let via = fields.next()?.strip_prefix("via=")?.to_string();
        Some(AccessEntry {
            method,
            path,
            status,
            bytes,
            via,
        })
    }
}

/// How many of `entries` nginx sent `via` (`disk`, `node`, `owner`), and their bytes.
pub fn sent_via<'a>(entries: impl IntoIterator<Item = &'a AccessEntry>, via: &str) -> (usize, u64) {
    entries
        .into_iter()
        .filter(|e| e.via == via)
        .fold((0, 0), |(n, bytes), e| (n + 1, bytes + e.bytes))
}

/// A running nginx owned by one test.
pub struct NginxServer {
    child: Option<Child>,
    addr: SocketAddr,
    rendered: Rendered,
}

impl NginxServer {
    /// Renders the shipped template for `opts` on a free port and starts nginx; waits until it
    /// answers HTTP. Panics with its error log if it does not start.
    pub fn start(opts: &NginxOpts) -> NginxServer {
        let mut last_err = String::new();
        for _ in 0..3 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let rendered = render_only(opts, addr);
            match spawn_and_wait(&rendered, addr) {
                Ok(child) => {
                    return NginxServer {
                        child: Some(child),
                        addr,
                        rendered,
                    }
                }
                Err(e) if e.contains("ddress already in use") => last_err = e,
                Err(e) => panic!("nginx did not start: {e}"),
            }
        }
        panic!("nginx did not start: {last_err}");
    }

    /// `http://127.0.0.1:<port>`, no trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The master's pid.
    pub fn pid(&self) -> i32 {
        let child = self.child.as_ref().expect("nginx is running");
        i32::try_from(child.id()).expect("pid fits in i32")
    }

    /// The rendered config file.
    pub fn conf_path(&self) -> &Path {
        &self.rendered.conf
    }

    /// Its run dir (pid, logs, temp files).
    pub fn run_dir(&self) -> &Path {
        self.rendered.run_dir()
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.run_dir().join("logs/error.log")).unwrap_or_default()
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.run_dir().join("logs/access.log")).unwrap_or_default()
    }

    /// The access log so far, parsed. nginx writes a line when a request completes, unbuffered.
    pub fn access_entries(&self) -> Vec<AccessEntry> {
        self.access_log()
            .lines()
            .filter_map(AccessEntry::parse)
            .collect()
    }

    /// SIGTERM, wait up to [`STOP_GRACE`], then SIGKILL the whole process group; always reaped.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal::term_then_kill_group(&mut child, STOP_GRACE);
    }
}

impl std::fmt::Debug for NginxServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NginxServer")
            .field("addr", &self.addr)
            .field("pid", &self.child.as_ref().map(Child::id))
            .field("conf", &self.rendered.conf)
            .finish()
    }
}

impl Drop for NginxServer {
    fn drop(&mut self) {
        self.stop();
        procs::print_tail_if_panicking(
            format_args!(
                "nginx {} error log tail ({})",
                self.addr,
                self.run_dir().join("logs/error.log").display()
            ),
            40,
            || self.error_log(),
        );
    }
}

/// A response read by [`raw_request`].
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first header `name` (case-insensitive), or "".
    pub fn header(&self, name: &str) -> &str {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map_or("", |(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `method path` byte for byte (no client-side normalisation of `..` or `%2e`, unlike a URL
/// library), HTTP/1.1 with `Connection: close`, and reads the whole answer. For path-handling
/// tests. Panics if the server does not answer within 10 s.
pub fn raw_request(addr: SocketAddr, method: &str, path: &str) -> RawResponse {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set_read_timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap_or_else(|e| panic!("send {method} {path}: {e}"));
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("read answer to {method} {path}: {e}"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in the answer to {method} {path}"));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in the answer to {method} {path}: {head}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    if chunked {
        body = dechunk(&body);
    }
    RawResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..eol]).into_owned();
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
        else {
            break;
        };
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or(&[]);
    }
    out
}

fn spawn_and_wait(rendered: &Rendered, addr: SocketAddr) -> Result<Child, String> {
    let dir = rendered.dir.path();
    start_and_wait(
        dir,
        &rendered.conf,
        &dir.join("logs/error.log"),
        addr,
        "/farm-tests-ready",
    )
}

/// Starts nginx in the foreground (`daemon off`) with prefix `dir`, config `conf` and its errors in
/// `error_log`, as the leader of its own process group, and waits until it answers `ready_path` on
/// `addr` (any status: a worker accepts requests). The error carries the error log's tail.
pub fn start_and_wait(
    dir: &Path,
    conf: &Path,
    error_log: &Path,
    addr: SocketAddr,
    ready_path: &str,
) -> Result<Child, String> {
    let child = Command::new(nginx_bin())
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(error_log)
        .arg("-c")
        .arg(conf)
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("spawn nginx (is it installed?): {e}"))?;
    procs::wait_answering(
        child,
        &format!("nginx on {addr}"),
        error_log,
        START_TIMEOUT,
        || http_status(addr, ready_path).is_some(),
        signal::kill_group_and_reap,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_access_line() {
        let line = r#"127.0.0.1 [22/Nov/2026:04:43:17 +0000] "GET /live/demo/seg_1.ts HTTP/1.1" 200 4 via=disk upstream="-" rt=0.001"#;
        let e = AccessEntry::parse(line).expect("parse");
        assert_eq!(e.method, "GET");
        assert_eq!(e.path, "/live/demo/seg_1.ts");
        assert_eq!((e.status, e.bytes), (200, 4));
        assert_eq!(e.via, "disk");
    }
}
