//! An HTTPS HLS upstream plays through a node with real FFmpeg: a live HLS source (real ffmpeg
//! writing `live.m3u8` and 1 s segments into a folder) served by a real nginx over TLS on
//! 127.0.0.1, with a self-signed certificate made at test time by the `openssl` CLI. The channel's
//! catalog URL is `https://127.0.0.1:<port>/live.m3u8`; its segments are named relative to it, or
//! (second case) by absolute `https://127.0.0.1:<port>/...` URLs.
//!
//! nginx's access log (scheme, TLS protocol and user agent of every request) shows that FFmpeg
//! itself fetched the playlist and the segments over TLS from that nginx, whether it connects
//! directly or through the node's egress gateway (`CONNECT`: the TLS session still ends at nginx).

use farm_tests::fixtures::*;
use farm_tests::hls::{ffprobe_codecs, HlsClient, MediaPlaylist};
use farm_tests::ports::free_port;
use farm_tests::procs::print_tail_if_panicking;
use farm_tests::redis::RedisServer;
use farm_tests::signal;
use farm_tests::wait::eventually;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A self-signed certificate for `CN=127.0.0.1` and its key, in a temp dir.
struct SelfSigned {
    cert: PathBuf,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

impl SelfSigned {
    /// Runs `openssl req -x509`. Panics with what to install if the `openssl` CLI is missing.
    fn make() -> SelfSigned {
        let dir = tempfile::Builder::new()
            .prefix("farm-tls-")
            .tempdir()
            .expect("tempdir for the certificate");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes"])
            .args(["-subj", "/CN=127.0.0.1", "-days", "1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run the openssl CLI ({e}): this test makes its TLS certificate with it; \
                     install the `openssl` package (apt-get install openssl)"
                )
            });
        assert!(
            out.status.success() && cert.is_file() && key.is_file(),
            "openssl req -x509 failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        SelfSigned {
            cert,
            key,
            _dir: dir,
        }
    }
}

/// A live HLS source: real ffmpeg playing the test media in a loop at its real rate (`-re`) into
/// `<dir>/live.m3u8`, five 1 s segments, old ones deleted. Killed (its whole process group) and
/// reaped on drop.
struct LiveHls {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl LiveHls {
    /// Writes into `dir`; `base_url` goes before every segment name in the playlist
    /// (`-hls_base_url`).
    fn start(dir: &Path, base_url: Option<&str>) -> LiveHls {
        // The log lives outside the folder nginx serves.
        let log_dir = tempfile::Builder::new()
            .prefix("farm-live-hls-log-")
            .tempdir()
            .expect("tempdir for the source log");
        let log = log_dir.path().join("ffmpeg.log");
        let log_file = std::fs::File::create(&log).expect("create source log");
        let mut cmd = Command::new("ffmpeg");
        cmd.args(["-hide_banner", "-nostdin", "-loglevel", "warning"])
            .args(["-re", "-stream_loop", "-1", "-i"])
            .arg(farm_tests::media::source_ts())
            .args(["-c", "copy", "-f", "hls", "-hls_time", "1"])
            .args(["-hls_list_size", "5", "-hls_flags", "delete_segments"]);
        if let Some(base) = base_url {
            cmd.args(["-hls_base_url", base]);
        }
        let child = cmd
            .arg(dir.join("live.m3u8"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn ffmpeg for the live source (is it installed?): {e}"));
        LiveHls {
            child,
            dir: dir.to_path_buf(),
            log,
            _log_dir: log_dir,
        }
    }

    /// Its playlist, read from disk (not through nginx, whose log is FFmpeg's alone).
    fn playlist(&self) -> Option<MediaPlaylist> {
        let text = std::fs::read_to_string(self.dir.join("live.m3u8")).ok()?;
        MediaPlaylist::parse(&text).ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for LiveHls {
    fn drop(&mut self) {
        signal::kill_group_and_reap(&mut self.child);
        print_tail_if_panicking(format_args!("live HLS source ffmpeg log tail"), 30, || {
            self.log()
        });
    }
}

/// A real nginx serving one folder over TLS on 127.0.0.1, with an access log that records the
/// scheme, TLS protocol and user agent of every request. Its process group is SIGKILLed and the
/// master reaped on drop.
struct TlsNginx {
    child: Child,
    addr: SocketAddr,
    run: tempfile::TempDir,
}

/// One request in [`TlsNginx`]'s access log.
#[derive(Debug, Clone)]
struct Hit {
    path: String,
    status: u16,
    scheme: String,
    tls: String,
    agent: String,
}

impl Hit {
    /// Answered with the file (200, or 206 to FFmpeg's `Range: bytes=0-`) over TLS.
    fn served_over_tls(&self) -> bool {
        matches!(self.status, 200 | 206) && self.scheme == "https" && self.tls.starts_with("TLS")
    }
}

impl TlsNginx {
    fn start(root: &Path, tls: &SelfSigned) -> TlsNginx {
        let mut last_err = String::new();
        for _ in 0..3 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            match Self::try_start(root, tls, addr) {
                Ok(n) => return n,
                Err(e) if e.contains("ddress already in use") => last_err = e,
                Err(e) => panic!("nginx (TLS) did not start: {e}"),
            }
        }
        panic!("nginx (TLS) did not start: {last_err}");
    }

    fn try_start(root: &Path, tls: &SelfSigned, addr: SocketAddr) -> Result<TlsNginx, String> {
        let run = tempfile::Builder::new()
            .prefix("farm-nginx-tls-")
            .tempdir()
            .expect("tempdir for nginx");
        let r = run.path().display();
        std::fs::create_dir(run.path().join("tmp")).expect("nginx tmp dir");
        // As root, nginx would run its workers as `nobody`, who cannot read the temp dirs.
        let user = if rustix::process::geteuid().is_root() {
            "user root;"
        } else {
            ""
        };
        let conf = format!(
            r#"{user}
worker_processes 1;
pid {r}/nginx.pid;
error_log {r}/error.log info;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {r}/tmp/body;
    proxy_temp_path {r}/tmp/proxy;
    fastcgi_temp_path {r}/tmp/fastcgi;
    uwsgi_temp_path {r}/tmp/uwsgi;
    scgi_temp_path {r}/tmp/scgi;
    types {{
        application/vnd.apple.mpegurl m3u8;
        video/mp2t ts;
    }}
    default_type application/octet-stream;
    open_file_cache off;
    log_format upstream_tls '$remote_addr "$request" $status $body_bytes_sent $scheme $ssl_protocol "$http_user_agent"';
    access_log {r}/access.log upstream_tls;
    server {{
        listen {addr} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {root};
        location / {{
            add_header Cache-Control no-cache;
        }}
    }}
}}
"#,
            cert = tls.cert.display(),
            key = tls.key.display(),
            root = root.display(),
        );
        let conf_path = run.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = farm_tests::nginx::start_and_wait(
            run.path(),
            &conf_path,
            &run.path().join("error.log"),
            addr,
            "/farm-tests-ready",
        )?;
        // Any answer means the worker accepts requests: plain HTTP to a TLS port gets a 400.
        Ok(TlsNginx { child, addr, run })
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.run.path().join("error.log")).unwrap_or_default()
    }

    /// The access log so far: `ip "GET /path HTTP/1.1" status bytes scheme tls "agent"`.
    fn hits(&self) -> Vec<Hit> {
        let text = std::fs::read_to_string(self.run.path().join("access.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let parts: Vec<&str> = l.split('"').collect();
                let path = parts.get(1)?.split_whitespace().nth(1)?.to_string();
                let mut mid = parts.get(2)?.split_whitespace();
                let status = mid.next()?.parse().ok()?;
                let _bytes = mid.next()?;
                let scheme = mid.next()?.to_string();
                let tls = mid.next()?.to_string();
                let agent = parts.get(3)?.to_string();
                Some(Hit {
                    path,
                    status,
                    scheme,
                    tls,
                    agent,
                })
            })
            .collect()
    }
}

impl Drop for TlsNginx {
    fn drop(&mut self) {
        signal::kill_group_and_reap(&mut self.child);
        print_tail_if_panicking(
            format_args!("nginx (TLS) {} error log tail", self.addr),
            30,
            || self.error_log(),
        );
    }
}

/// Writes a catalog entry directly (as security_upstreams.rs does).
async fn put_channel(redis: &RedisServer, id: &str, url: &str) {
    let mut c = redis.conn().await;
    let _: () = redis::pipe()
        .hset(format!("farm:channel:{id}"), "url", url)
        .sadd("farm:channels", id)
        .query_async(&mut c)
        .await
        .expect("seed catalog");
}

/// The whole case: source, TLS nginx, node; the channel plays and FFmpeg's requests are in
/// nginx's log.
async fn https_upstream_plays(absolute_segment_urls: bool) {
    let redis = RedisServer::start();
    let tls = SelfSigned::make();
    // nginx first (the absolute segment URLs name its port), serving the source's folder.
    let served = tempfile::Builder::new()
        .prefix("farm-live-hls-")
        .tempdir()
        .expect("tempdir for the live source");
    let nginx = TlsNginx::start(served.path(), &tls);
    let origin = format!("https://127.0.0.1:{}", nginx.port());
    let base = absolute_segment_urls.then(|| format!("{origin}/"));
    let source = LiveHls::start(served.path(), base.as_deref());

    let t_source = Instant::now();
    let pl = eventually(
        "the live source to list 3 segments",
        Duration::from_secs(30),
        || async { source.playlist().filter(|p| p.segments.len() >= 3) },
    )
    .await;
    println!(
        "source ready in {:?}: {} segments, first URI {:?}",
        t_source.elapsed(),
        pl.segments.len(),
        pl.segments[0].uri
    );
    if absolute_segment_urls {
        assert!(
            pl.segments
                .iter()
                .all(|s| s.uri.starts_with(&format!("{origin}/"))),
            "the source playlist names its segments by absolute {origin}/ URLs: {:?}",
            pl.segments
        );
    } else {
        assert!(
            pl.segments.iter().all(|s| !s.uri.contains("://")),
            "the source playlist names its segments relatively: {:?}",
            pl.segments
        );
    }

    let id = "tls";
    let catalog_url = format!("{origin}/live.m3u8");
    put_channel(&redis, id, &catalog_url).await;
    let root = tempfile::tempdir().expect("tempdir");
    let node = node(&redis, "n1", root.path(), false, &[]);
    let playlist_url = format!("{}/live/{id}/index.m3u8", node.base_url());

    let t0 = Instant::now();
    let first = get(&playlist_url).await;
    println!(
        "first request for {catalog_url} -> {} after {:?}",
        first.status,
        t0.elapsed()
    );
    let parse_ok = |r: &Resp| {
        (r.status == 200)
            .then(|| MediaPlaylist::parse(&r.text()).ok())
            .flatten()
    };
    let first_ok = match parse_ok(&first) {
        Some(p) => p,
        None => {
            eventually(
                "the node to serve the playlist",
                Duration::from_secs(30),
                || async { parse_ok(&get(&playlist_url).await) },
            )
            .await
        }
    };
    let ttfp = t0.elapsed();
    println!(
        "time to first playlist: {ttfp:?} ({} segments)",
        first_ok.segments.len()
    );

    let three = eventually(
        "the node's playlist to list 3 segments",
        Duration::from_secs(30),
        || async {
            let p = parse_ok(&get(&playlist_url).await)?;
            (p.segments.len() >= 3).then_some(p)
        },
    )
    .await;
    println!(
        "node playlist lists {} segments after {:?}",
        three.segments.len(),
        t0.elapsed()
    );

    // 5 s of media like a player: no gap, every segment downloads, real H.264 + AAC.
    let mut hls = HlsClient::new(&playlist_url);
    let report = hls
        .pull(Duration::from_secs(5), Duration::from_secs(60))
        .await
        .expect("pull");
    println!("{report:?}");
    assert_eq!(report.gaps, 0, "{report:?}");
    assert_eq!(report.failed_segments, 0, "{report:?}");
    assert_eq!(report.sequence_resets, 0, "{report:?}");
    let codecs = ffprobe_codecs(report.last_segment.as_ref().expect("a segment"));
    println!("codecs of the last segment: {codecs:?}");
    assert!(codecs.iter().any(|c| c == "h264"), "{codecs:?}");
    assert!(codecs.iter().any(|c| c == "aac"), "{codecs:?}");

    let stream = hgetall(&redis, &format!("farm:stream:{id}")).await;
    println!(
        "stream: state {:?}, restarts {:?}, source {:?}, last_error {:?}",
        stream.get("state"),
        stream.get("restarts"),
        stream.get("source"),
        stream.get("last_error")
    );
    assert_eq!(
        stream.get("state").map(String::as_str),
        Some("running"),
        "{stream:?}"
    );

    // How FFmpeg reached nginx: through the node's egress gateway (CONNECT).
    print_egress(&node).await;

    // FFmpeg (user agent Lavf) fetched the playlist and the segments from this nginx over TLS.
    let hits = nginx.hits();
    let by_ffmpeg: Vec<&Hit> = hits
        .iter()
        .filter(|h| h.agent.starts_with("Lavf"))
        .collect();
    let served_over_tls = |wanted: fn(&str) -> bool| {
        by_ffmpeg
            .iter()
            .filter(|h| wanted(&h.path) && h.served_over_tls())
            .count()
    };
    let playlists = served_over_tls(|p| p == "/live.m3u8");
    let segments = served_over_tls(|p| p.ends_with(".ts"));
    let mut protocols: Vec<&str> = by_ffmpeg.iter().map(|h| h.tls.as_str()).collect();
    protocols.sort_unstable();
    protocols.dedup();
    println!(
        "nginx access log: {} requests, {} by FFmpeg ({:?}); 200/206 over TLS: {playlists} of \
         /live.m3u8, {segments} segments; TLS protocols {protocols:?}",
        hits.len(),
        by_ffmpeg.len(),
        by_ffmpeg.first().map(|h| h.agent.as_str()).unwrap_or("")
    );
    let mut statuses: Vec<u16> = by_ffmpeg.iter().map(|h| h.status).collect();
    statuses.sort_unstable();
    statuses.dedup();
    println!("statuses nginx gave FFmpeg: {statuses:?}");
    assert!(
        playlists >= 1,
        "FFmpeg never fetched /live.m3u8 over TLS from nginx: {hits:?}"
    );
    assert!(
        segments >= 3,
        "FFmpeg fetched {segments} segments over TLS from nginx: {hits:?}"
    );
    assert!(
        by_ffmpeg.iter().all(|h| h.scheme == "https"),
        "every FFmpeg request came over TLS: {by_ffmpeg:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_hls_upstream_with_relative_segments_plays_through_the_node() {
    https_upstream_plays(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_hls_upstream_with_absolute_https_segment_urls_plays_through_the_node() {
    https_upstream_plays(true).await;
}
