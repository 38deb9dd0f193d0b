//! The shipped nginx config (`deploy/nginx/farm.conf.template`, rendered by `deploy/nginx/render`):
//! `nginx -t` accepts it in both access modes, each mode has the directives it promises (the
//! per-client limits and production sizing included), and the renderer refuses options that would
//! produce a broken or unsafe config.

use farm_tests::nginx::{render_cmd, render_only, NginxOpts};
use std::net::SocketAddr;

fn listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], farm_tests::ports::free_port()))
}

fn opts(roots: &tempfile::TempDir) -> NginxOpts {
    NginxOpts::new()
        .node("127.0.0.1:18001".parse().expect("addr"))
        .node("127.0.0.1:18002".parse().expect("addr"))
        .root(roots.path().join("n1"))
        .root(roots.path().join("n2"))
}

/// Lines of the rendered config without comments, trimmed.
fn directives(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

fn has(lines: &[String], wanted: &str) -> bool {
    lines.iter().any(|l| l == wanted)
}

#[test]
fn nginx_t_accepts_the_rendered_template_in_both_access_modes() {
    let roots = tempfile::tempdir().expect("tempdir");
    let sock1 = roots.path().join("n1.sock");
    let sock2 = roots.path().join("n2.sock");
    let modes = [
        ("auth", opts(&roots)),
        (
            "access-log",
            opts(&roots).access_log([sock1.clone(), sock2.clone()]),
        ),
    ];
    for (name, o) in modes {
        let rendered = render_only(&o, listen());
        let text = rendered.text();
        assert!(!text.contains("{{"), "placeholder left in {name}:\n{text}");
        match rendered.check() {
            Ok(out) => println!("nginx -t ({name}): ok {}", out.trim()),
            Err(e) => panic!("nginx -t rejects the {name} config: {e}\n{text}"),
        }
        let lines = directives(&text);
        for d in [
            "sendfile on;",
            "open_file_cache off;",
            "hash $farm_id consistent;",
            "server 127.0.0.1:18001 max_fails=1 fail_timeout=2s;",
            "server 127.0.0.1:18002 max_fails=1 fail_timeout=2s;",
            "proxy_next_upstream_tries 3;",
            "proxy_hide_header Access-Control-Allow-Origin;",
            "add_header Cache-Control \"public, max-age=3600, immutable\";",
            "application/vnd.apple.mpegurl m3u8;",
            "video/mp2t ts;",
            "proxy_set_header X-Original-URI /live/$farm_tok$farm_id/$farm_file;",
            "proxy_pass http://$farm_owner$farm_owner_path$is_args$args;",
            // Production sizing and what one client may cost (deploy/nginx/README.md).
            "worker_processes auto;",
            "worker_connections 16384;",
            "worker_rlimit_nofile 65536;",
            "client_header_timeout 10s;",
            "client_body_timeout 10s;",
            "client_header_buffer_size 1k;",
            "large_client_header_buffers 4 8k;",
            "reset_timedout_connection on;",
            "limit_req_zone $farm_limit_key zone=farm_playlists:10m rate=20r/s;",
            "limit_conn_zone $farm_limit_key zone=farm_playlist_conns:10m;",
            "limit_req zone=farm_playlists burst=100 nodelay;",
            "limit_conn farm_playlist_conns 20;",
            "limit_req_status 429;",
            "limit_conn_status 429;",
            "error_page 429 = @farm_limited;",
            "add_header Retry-After 1 always;",
            "127.0.0.1 1;",
            "::1 1;",
            "keepalive_timeout 50s;",
        ] {
            assert!(has(&lines, d), "{name} config lacks `{d}`:\n{text}");
        }
        let upstreams = [
            "upstream farm_node_0 {",
            "server 127.0.0.1:18001;",
            "upstream farm_node_1 {",
            "server 127.0.0.1:18002;",
            "proxy_pass http://$farm_auth_node/auth;",
            "set $farm_auth_node farm_nodes;",
        ];
        for d in upstreams {
            assert!(has(&lines, d), "{name} config lacks `{d}`:\n{text}");
        }
        let routed = |i: usize| {
            format!(
                "if (-f {}/n{}$farm_auth_path) {{",
                roots.path().display(),
                i + 1
            )
        };
        let routing = (0..2).filter(|i| has(&lines, &routed(*i))).count();
        let try_files = format!(
            "try_files {root}/n1/$farm_id/$farm_file {root}/n2/$farm_id/$farm_file @node;",
            root = roots.path().display()
        );
        assert!(has(&lines, &try_files), "{name}: no `{try_files}`:\n{text}");
        let syslog = |s: &std::path::Path| {
            format!(
                "access_log syslog:server=unix:{},nohostname,tag=farm farm_uri;",
                s.display()
            )
        };
        let auth_lines = lines
            .iter()
            .filter(|l| *l == "auth_request /_farm_auth;")
            .count();
        let syslog_lines = lines
            .iter()
            .filter(|l| **l == syslog(&sock1) || **l == syslog(&sock2))
            .count();
        if name == "auth" {
            // Segments ask the node (playlists come from a node anyway), nothing is logged to a
            // socket.
            assert_eq!((auth_lines, syslog_lines), (1, 0), "{text}");
            // The auth subrequest of a file on node i's disk goes to node i.
            assert_eq!(routing, 2, "{text}");
        } else {
            // No subrequest at all; the segment location logs to every node's socket.
            assert_eq!((auth_lines, syslog_lines), (0, 2), "{text}");
            assert_eq!(routing, 0, "no file checks without subrequests: {text}");
            assert_eq!(
                lines.iter().filter(|l| *l == "auth_request off;").count(),
                1
            );
        }
    }
}

/// The limits sit in the playlist location only: segments come from disk and stay unlimited.
#[test]
fn per_client_limits_guard_playlists_only() {
    let roots = tempfile::tempdir().expect("tempdir");
    let text = render_only(&opts(&roots), listen()).text();
    let locations: Vec<&str> = text.split("\n        location ").skip(1).collect();
    let playlist = locations
        .iter()
        .find(|l| l.contains("\\.m3u8)$\""))
        .expect("a playlist location");
    let segment = locations
        .iter()
        .find(|l| l.contains("\\.ts)$\""))
        .expect("a segment location");
    for d in [
        "limit_req zone=farm_playlists",
        "limit_conn farm_playlist_conns",
    ] {
        assert!(playlist.contains(d), "playlists lack {d}:\n{playlist}");
        assert!(!segment.contains(d), "segments must not be limited: {d}");
    }
}

#[test]
fn sizing_and_exempt_addresses_are_options_of_the_renderer() {
    let roots = tempfile::tempdir().expect("tempdir");
    let run = tempfile::tempdir().expect("tempdir");
    let render = |extra: &[&str]| {
        let out = render_cmd(&opts(&roots), listen(), run.path())
            .args(extra)
            .output()
            .expect("run render");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, text, err) = render(&[
        "--workers",
        "4",
        "--worker-connections",
        "1000",
        "--rlimit-nofile",
        "2000",
        "--limit-exempt",
        "10.1.0.0/16",
        "--limit-exempt",
        "fd00::/8",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let lines = directives(&text);
    for d in [
        "worker_processes 4;",
        "worker_connections 1000;",
        "worker_rlimit_nofile 2000;",
        "10.1.0.0/16 1;",
        "fd00::/8 1;",
    ] {
        assert!(has(&lines, d), "lacks `{d}`:\n{text}");
    }
    assert!(
        !has(&lines, "127.0.0.1 1;"),
        "given exemptions replace the default"
    );
    let (code, text, err) = render(&["--limit-exempt", "none"]);
    assert_eq!(code, Some(0), "{err}");
    let lines = directives(&text);
    assert!(
        !has(&lines, "127.0.0.1 1;") && !has(&lines, "::1 1;"),
        "none: loopback is limited too"
    );
    for (what, extra) in [
        (
            "an fd limit below two per connection",
            &["--rlimit-nofile", "1000"][..],
        ),
        (
            "a word for connections",
            &["--worker-connections", "many"][..],
        ),
        ("zero workers", &["--workers", "0"][..]),
        (
            "an exemption that is not an address",
            &["--limit-exempt", "all;"][..],
        ),
    ] {
        let (code, text, err) = render(extra);
        println!("render with {what}: exit {code:?}: {}", err.trim());
        assert_eq!(code, Some(2), "{what}: {err}");
        assert!(text.is_empty(), "{what}: printed a config anyway");
    }
}

#[test]
fn nginx_t_fails_on_a_broken_config_so_the_check_means_something() {
    let roots = tempfile::tempdir().expect("tempdir");
    let rendered = render_only(&opts(&roots), listen());
    let broken = rendered.text().replace("sendfile on;", "sendfile maybe;");
    std::fs::write(&rendered.conf, broken).expect("write");
    let err = rendered.check().expect_err("nginx -t must reject it");
    println!("nginx -t on a broken config: {}", err.trim());
    assert!(err.contains("sendfile"), "{err}");
}

#[test]
fn the_renderer_refuses_options_that_would_break_the_config() {
    let roots = tempfile::tempdir().expect("tempdir");
    let run = tempfile::tempdir().expect("tempdir");
    let ok = opts(&roots);
    let cases: Vec<(&str, NginxOpts)> = vec![
        ("no node", {
            let mut o = ok.clone();
            o.nodes.clear();
            o
        }),
        ("no root", {
            let mut o = ok.clone();
            o.roots.clear();
            o
        }),
        ("a root without its node", ok.clone().root("/srv/hls3")),
        ("a relative root", {
            let mut o = ok.clone();
            o.roots[1] = "relative/hls".into();
            o
        }),
        ("a root that would inject a directive", {
            let mut o = ok.clone();
            o.roots[1] = "/srv/hls; include /etc/passwd".into();
            o
        }),
        ("a root with a space", {
            let mut o = ok.clone();
            o.roots[1] = "/srv/my hls".into();
            o
        }),
        ("access-log mode without a socket", {
            let mut o = ok.clone();
            o.mode = farm_tests::nginx::AccessMode::AccessLog(Vec::new());
            o
        }),
    ];
    for (what, o) in cases {
        let out = render_cmd(&o, listen(), run.path())
            .output()
            .expect("run render");
        let err = String::from_utf8_lossy(&out.stderr);
        println!(
            "render with {what}: exit {:?}: {}",
            out.status.code(),
            err.trim()
        );
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(out.stdout.is_empty(), "{what}: printed a config anyway");
    }
    // Host names are refused too: nginx would need a resolver for them.
    let out = std::process::Command::new("bash")
        .arg(farm_tests::nginx::render_script())
        .args(["--listen", "127.0.0.1:1", "--run-dir"])
        .arg(run.path())
        .args(["--node", "node-a:8080", "--root", "/srv/hls"])
        .output()
        .expect("run render");
    assert_eq!(out.status.code(), Some(2));
    // And an auth-mode config with a socket is a mistake, not a silent no-op.
    let out = std::process::Command::new("bash")
        .arg(farm_tests::nginx::render_script())
        .args(["--listen", "127.0.0.1:1", "--run-dir"])
        .arg(run.path())
        .args(["--node", "127.0.0.1:8080", "--root", "/srv/hls"])
        .args(["--mode", "auth", "--access-socket", "/run/x.sock"])
        .output()
        .expect("run render");
    assert_eq!(out.status.code(), Some(2));
}
