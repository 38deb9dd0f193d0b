//! The nginx instances of the throughput comparisons, all `worker_processes auto` (nginx, like the
//! node, may use every core):
//!
//! - [`Variant::Best`], the anchor: plain nginx at its best for static HLS files, written here and not
//!   taken from the template: `sendfile on`, `tcp_nopush on`, `access_log off`, `open_file_cache on`
//!   (`max=10000 inactive=20s`, `open_file_cache_valid 1s`: a playlist it serves may be up to 1 s
//!   stale, a cost the node does not take), `keepalive_requests` unbounded like the node's and ONE prefix location (`location /live/ { alias <root>/; }`):
//!   no regex, no `auth_request`, no variables, no `try_files`.
//! - [`Variant::Template`]: the shipped front (`deploy/nginx/farm.conf.template` rendered by
//!   `deploy/nginx/render`) as shipped: `auth_request` to the node, regex locations, access log,
//!   `open_file_cache off`.
//! - [`Variant::TemplateNoAuth`]: the same rendered config with only `auth_request` switched off
//!   (what `auth_request` costs is Template / TemplateNoAuth).
//!
//! Without the shipped template (an older checkout), a minimal config with the template's properties
//! is written for the two template variants instead, and the report says so.
//!
//! Invariants: each instance runs in the foreground in its own process group and its own temp dir;
//! drop sends SIGTERM, waits, SIGKILLs the group and reaps the master.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use farm_tests::nginx::{render_cmd, template_path, NginxOpts};
use farm_tests::ports::free_port;
use farm_tests::signal;

/// Which front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Plain nginx at its best: the anchor of the node's figures.
    Best,
    /// The shipped template: `auth_request` to the node's `/auth` for every playlist and segment.
    Template,
    /// The shipped template without the subrequest.
    TemplateNoAuth,
}

/// Where a config came from, for the report.
pub fn config_source() -> &'static str {
    if template_path().is_file() {
        "deploy/nginx/farm.conf.template (workers auto)"
    } else {
        "farm-bench's built-in minimal config (no shipped template in this checkout)"
    }
}

/// A running nginx.
pub struct BenchNginx {
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl BenchNginx {
    /// Starts nginx in front of `node` sending files from `root`.
    pub fn start(variant: Variant, node: SocketAddr, root: &Path) -> Result<BenchNginx, String> {
        let mut last = String::new();
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("farm-bench-nginx-")
                .tempdir()
                .map_err(|e| format!("temp dir for nginx: {e}"))?;
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let text = config(variant, node, root, addr, dir.path())?;
            let conf = dir.path().join("nginx.conf");
            std::fs::write(&conf, text).map_err(|e| format!("write {}: {e}", conf.display()))?;
            match spawn(dir.path(), &conf, addr) {
                Ok(child) => {
                    return Ok(BenchNginx {
                        child: Some(child),
                        addr,
                        dir,
                    })
                }
                Err(e) if e.contains("ddress already in use") => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The master's pid (its workers are its children).
    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .unwrap_or(0)
    }

    /// Its error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("logs/error.log")).unwrap_or_default()
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal::term_then_kill_group(&mut child, Duration::from_secs(5));
    }
}

impl Drop for BenchNginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The config text for `variant`.
fn config(
    variant: Variant,
    node: SocketAddr,
    root: &Path,
    listen: SocketAddr,
    run_dir: &Path,
) -> Result<String, String> {
    if variant == Variant::Best {
        return Ok(best_config(root, listen, run_dir));
    }
    if !template_path().is_file() {
        return Ok(minimal_config(variant, node, root, listen, run_dir));
    }
    let opts = NginxOpts::new().node(node).root(root);
    let out = render_cmd(&opts, listen, run_dir)
        .arg("--workers")
        .arg("auto")
        .output()
        .map_err(|e| format!("run deploy/nginx/render: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "deploy/nginx/render failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match variant {
        Variant::Template | Variant::Best => Ok(text),
        Variant::TemplateNoAuth => {
            const AUTH: &str = "auth_request /_farm_auth;";
            if !text.contains(AUTH) {
                return Err(format!(
                    "the rendered template has no `{AUTH}` line to switch off for the plain anchor"
                ));
            }
            Ok(text.replace(AUTH, "auth_request off;"))
        }
    }
}

/// A stand-in for the shipped front with the properties the comparisons rely on.
fn minimal_config(
    variant: Variant,
    node: SocketAddr,
    root: &Path,
    listen: SocketAddr,
    run_dir: &Path,
) -> String {
    let run = run_dir.display();
    let root = root.display();
    let auth = match variant {
        Variant::Template => "auth_request /_farm_auth;",
        Variant::TemplateNoAuth | Variant::Best => "",
    };
    let server = format!(
        r#"    access_log {run}/logs/access.log;
    upstream farm_nodes {{ server {node}; keepalive 32; }}
    server {{
        listen {listen};
        location ~ "^/live/(?<farm_id>[A-Za-z0-9_-]{{1,64}})/(?<farm_file>[A-Za-z0-9_-]{{1,64}}\.(m3u8|ts))$" {{
            {auth}
            root /;
            try_files {root}/$farm_id/$farm_file =404;
        }}
        location = /_farm_auth {{
            internal;
            proxy_pass http://farm_nodes/auth;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
        }}
        location / {{ return 404; }}
    }}
"#
    );
    built_in_config(run_dir, "    open_file_cache off;\n", &server)
}

/// Plain nginx at its best for static files under `/live/`: see the module docs.
fn best_config(root: &Path, listen: SocketAddr, run_dir: &Path) -> String {
    let root = root.display();
    let tuning = "    keepalive_requests 1000000;
    access_log off;
    open_file_cache max=10000 inactive=20s;
    open_file_cache_valid 1s;
    open_file_cache_min_uses 1;
    open_file_cache_errors on;
";
    let server = format!(
        "    server {{
        listen {listen};
        location /live/ {{ alias {root}/; }}
    }}
"
    );
    built_in_config(run_dir, tuning, &server)
}

/// What the built-in configs share: nginx running from `run_dir` (created), sendfile on, the temp
/// paths and types; `tuning` goes after the keep-alive timeout, `server` (the server block and what
/// it needs) ends the `http` block.
fn built_in_config(run_dir: &Path, tuning: &str, server: &str) -> String {
    let run = run_dir.display();
    let user = if rustix::process::geteuid().is_root() {
        "user root;"
    } else {
        ""
    };
    let _ = std::fs::create_dir_all(run_dir.join("logs"));
    let _ = std::fs::create_dir_all(run_dir.join("tmp"));
    format!(
        r#"{user}
worker_processes auto;
pid {run}/nginx.pid;
error_log {run}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    server_tokens off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65s;
{tuning}    client_body_temp_path {run}/tmp/body;
    proxy_temp_path {run}/tmp/proxy;
    fastcgi_temp_path {run}/tmp/fastcgi;
    uwsgi_temp_path {run}/tmp/uwsgi;
    scgi_temp_path {run}/tmp/scgi;
    types {{ application/vnd.apple.mpegurl m3u8; video/mp2t ts; }}
{server}}}
"#
    )
}

fn spawn(dir: &Path, conf: &Path, addr: SocketAddr) -> Result<Child, String> {
    farm_tests::nginx::start_and_wait(
        dir,
        conf,
        &dir.join("logs/error.log"),
        addr,
        "/farm-bench-ready",
    )
}
