//! Hostile upstreams with real FFmpeg (promise 10): a catalog URL written behind farmctl's back, or
//! an upstream HLS playlist (served by a test HTTP server the channel points at) whose segments,
//! keys, init sections or variants name `file:` URLs, `concat:`, `subfile,`, `crypto:file:`, a bare
//! local path, or a Redis on this host: `http`, `https`, `httpproxy` or `tcp` to 127.0.0.1,
//! 127.0.0.2, `[::1]`, 0.0.0.0 or `localhost`, or a segment of the upstream that redirects there.
//!
//! - Local files: the canary (a real MPEG-TS, so a read would also show up as a working channel)
//!   is never read: its access time, set to the past first so that even a `relatime` mount
//!   records a read, does not move; the check is shown to be able to fail by reading the canary
//!   once at the end. The channels end `failed`, serving nothing.
//! - Redis: neither the farm's Redis nor another one on 127.0.0.1 hears from FFmpeg: no connection
//!   that comes and goes (`total_connections_received` against the clients still connected: the
//!   node keeps its pooled connections), no `GET` rejected for its arity (an HTTP request line),
//!   no cross-protocol warning in Redis's log (an HTTP `Host:` header). The upstream-playlist test
//!   holds only with the node's egress gateway and FFmpeg's network sandbox: without them nothing
//!   stops a URL inside an upstream playlist from naming 127.0.0.1 and any port.

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use farm_tests::fixtures::*;
use farm_tests::node::{NodeOpts, NodeProcess};
use farm_tests::redis::RedisServer;
use farm_tests::wait::eventually;
use redis::aio::MultiplexedConnection;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// An upstream HTTP server whose playlists are what a test says; it counts every request by path.
struct Upstream {
    addr: std::net::SocketAddr,
    hits: Arc<Mutex<HashMap<String, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct UpstreamState {
    /// path → playlist text; `{seq}` is replaced by the seconds since the server started, so a
    /// live playlist lists new (hostile) segments on every reload.
    playlists: Arc<HashMap<String, String>>,
    /// path → where a `302 Found` sends the client (`Location`).
    redirects: Arc<HashMap<String, String>>,
    hits: Arc<Mutex<HashMap<String, u64>>>,
    started: Instant,
}

async fn serve(State(st): State<UpstreamState>, uri: Uri) -> impl IntoResponse {
    let path = uri.path().to_string();
    *st.hits
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(path.clone())
        .or_default() += 1;
    if let Some(location) = st.redirects.get(&path) {
        return (StatusCode::FOUND, [("location", location.clone())]).into_response();
    }
    match st.playlists.get(&path) {
        Some(text) => (
            StatusCode::OK,
            [("content-type", "application/vnd.apple.mpegurl")],
            text.replace("{seq}", &st.started.elapsed().as_secs().to_string()),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

impl Upstream {
    async fn start(playlists: HashMap<String, String>) -> Upstream {
        Self::start_with_redirects(playlists, HashMap::new()).await
    }

    /// Like [`Upstream::start`]; each path of `redirects` answers `302 Found` to its `Location`.
    async fn start_with_redirects(
        playlists: HashMap<String, String>,
        redirects: HashMap<String, String>,
    ) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let hits: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let app = axum::Router::new()
            .fallback(serve)
            .with_state(UpstreamState {
                playlists: Arc::new(playlists),
                redirects: Arc::new(redirects),
                hits: hits.clone(),
                started: Instant::now(),
            });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream { addr, hits, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn hits(&self, path: &str) -> u64 {
        self.hits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A live media playlist of three segments at `uris` (the sequence moves every second).
fn media_playlist(head: &str, uri: &str) -> String {
    let mut s = format!(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXT-X-MEDIA-SEQUENCE:{{seq}}\n{head}"
    );
    for _ in 0..3 {
        s.push_str(&format!("#EXTINF:1.000,\n{uri}\n"));
    }
    s
}

/// A canary: a real MPEG-TS (so FFmpeg could make a channel of it) and a playlist naming it, in a
/// folder directly in /tmp, their access times set two days back.
struct Canary {
    ts: PathBuf,
    m3u8: PathBuf,
    atimes: Vec<SystemTime>,
    _dir: tempfile::TempDir,
}

impl Canary {
    fn plant() -> Canary {
        let dir = tempfile::Builder::new()
            .prefix("farm-canary-dir-")
            .tempdir_in("/tmp")
            .expect("canary dir");
        let ts = dir.path().join("canary.ts");
        let m3u8 = dir.path().join("canary.m3u8");
        std::fs::copy(farm_tests::media::source_ts(), &ts).expect("copy test media");
        std::fs::write(
            &m3u8,
            format!(
                "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{}\n#EXT-X-ENDLIST\n",
                ts.display()
            ),
        )
        .expect("write canary playlist");
        let past = SystemTime::now() - Duration::from_secs(2 * 86_400);
        for f in [&ts, &m3u8] {
            std::fs::File::options()
                .write(true)
                .open(f)
                .and_then(|h| h.set_times(std::fs::FileTimes::new().set_accessed(past)))
                .unwrap_or_else(|e| panic!("set atime of {}: {e}", f.display()));
        }
        let atimes = vec![atime(&ts), atime(&m3u8)];
        Canary {
            ts,
            m3u8,
            atimes,
            _dir: dir,
        }
    }

    fn read_since_planted(&self) -> Vec<PathBuf> {
        [&self.ts, &self.m3u8]
            .into_iter()
            .zip(&self.atimes)
            .filter(|(f, t)| atime(f) != **t)
            .map(|(f, _)| f.clone())
            .collect()
    }
}

fn atime(f: &Path) -> SystemTime {
    std::fs::metadata(f)
        .and_then(|m| m.accessed())
        .unwrap_or_else(|e| panic!("stat {}: {e}", f.display()))
}

/// Writes a catalog entry with redis-cli's power: no farmctl, no validation on the way in.
async fn put_channel(redis: &RedisServer, id: &str, url: &str, backups: &str) {
    let mut c = redis.conn().await;
    let _: () = redis::pipe()
        .hset(format!("farm:channel:{id}"), "url", url)
        .hset(format!("farm:channel:{id}"), "backup_urls", backups)
        .sadd("farm:channels", id)
        .query_async(&mut c)
        .await
        .expect("seed catalog");
}

/// A node with real FFmpeg that gives up on a channel fast: two crashes end it in `failed`.
fn hostile_node(redis: &RedisServer, root: &Path) -> NodeProcess {
    hostile_node_with(redis, root, &[])
}

fn hostile_node_with(redis: &RedisServer, root: &Path, extra: &[&str]) -> NodeProcess {
    let opts = NodeOpts::new("n1", redis.url(), root.join("n1"))
        .args(FAST.iter().copied())
        .args([
            "--read-timeout",
            "2s",
            "--start-timeout",
            "3s",
            "--max-crashes",
            "2",
            "--failed-hold",
            "120s",
        ])
        .args(extra.iter().copied())
        // FFmpeg's own messages go to the node log (target "ffmpeg").
        .env("RUST_LOG", "info,farm_node=debug,ffmpeg=debug");
    NodeProcess::spawn(opts)
}

async fn state(redis: &RedisServer, id: &str) -> String {
    hgetall(redis, &format!("farm:stream:{id}"))
        .await
        .get("state")
        .cloned()
        .unwrap_or_default()
}

/// Asks for each channel's playlist (it must not be served), then waits until each one's stream
/// state is `failed`.
async fn start_and_wait_failed(redis: &RedisServer, node: &NodeProcess, ids: &[&str]) {
    let requests = ids.iter().map(|id| {
        let url = format!("{}/live/{id}/index.m3u8", node.base_url());
        async move { (id.to_string(), get(&url).await) }
    });
    for (id, r) in futures::future::join_all(requests).await {
        println!("{id}: first request -> {} {}", r.status, r.text().trim());
        assert_ne!(r.status, 200, "{id} served a playlist: {}", r.text());
    }
    for id in ids {
        eventually(
            &format!("channel {id} to end failed"),
            Duration::from_secs(120),
            || async { (state(redis, id).await == "failed").then_some(()) },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_catalog_urls_and_upstream_playlists_never_make_ffmpeg_read_a_local_file() {
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    let canary = Canary::plant();
    let ts = canary.ts.display().to_string();
    let m3u8 = canary.m3u8.display().to_string();

    // Upstream playlists that point FFmpeg at the canary in every way an HLS playlist can.
    let cases: Vec<(&str, String)> = vec![
        ("seg_file", media_playlist("", &format!("file://{ts}"))),
        ("seg_file_short", media_playlist("", &format!("file:{ts}"))),
        ("seg_path", media_playlist("", &ts)),
        (
            "seg_concat",
            media_playlist("", &format!("concat:{ts}|{ts}")),
        ),
        (
            "seg_subfile",
            media_playlist("", &format!("subfile,,start,0,end,18800,,:{ts}")),
        ),
        (
            "seg_crypto",
            media_playlist("", &format!("crypto:file://{ts}")),
        ),
        (
            "key_file",
            media_playlist(
                &format!("#EXT-X-KEY:METHOD=AES-128,URI=\"file://{ts}\"\n"),
                "seg.ts",
            ),
        ),
        (
            "map_file",
            media_playlist(&format!("#EXT-X-MAP:URI=\"file://{ts}\"\n"), "seg.ts"),
        ),
        (
            "variant_file",
            format!("#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=100000\nfile://{m3u8}\n"),
        ),
        (
            "variant_path",
            format!("#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=100000\n{m3u8}\n"),
        ),
    ];
    let upstream = Upstream::start(
        cases
            .iter()
            .map(|(id, text)| (format!("/{id}.m3u8"), text.clone()))
            .collect(),
    )
    .await;
    for (id, _) in &cases {
        put_channel(&redis, id, &upstream.url(&format!("/{id}.m3u8")), "").await;
    }
    // Catalog URLs that name the canary directly, as primary or as backup: refused before FFmpeg.
    let direct = [
        ("cat_file", format!("file://{ts}"), String::new()),
        ("cat_path", ts.clone(), String::new()),
        ("cat_concat", format!("concat:{ts}|{ts}"), String::new()),
        (
            "cat_subfile",
            format!("subfile,,start,0,end,18800,,:{ts}"),
            String::new(),
        ),
        (
            "cat_backup",
            upstream.url("/seg_file.m3u8"),
            format!("file://{ts}"),
        ),
    ];
    for (id, url, backups) in &direct {
        put_channel(&redis, id, url, backups).await;
    }

    let node = hostile_node(&redis, root.path());
    for (id, _, _) in &direct {
        assert_invalid_upstream(&node, id).await;
    }
    assert_eq!(metric(&node, "farm_node_ffmpeg_spawns_total").await, 0.0);

    let ids: Vec<&str> = cases.iter().map(|(id, _)| *id).collect();
    start_and_wait_failed(&redis, &node, &ids).await;

    // FFmpeg did load each hostile playlist, so it met every hostile reference...
    for id in &ids {
        let hits = upstream.hits(&format!("/{id}.m3u8"));
        assert!(hits >= 1, "{id}: FFmpeg never fetched its playlist");
    }
    // ...resolved a bare path against the playlist's URL (an HTTP request, not a file read)...
    println!(
        "bare paths fetched over HTTP: segment {} times, variant {} times",
        upstream.hits(&ts),
        upstream.hits(&m3u8)
    );
    // ...and was refused the others by its protocol whitelist.
    let log = node.log();
    let refusals = log.matches("not on whitelist").count();
    println!(
        "FFmpeg refusals in the node log: {refusals} 'not on whitelist', {} 'Failed to open segment'",
        log.matches("Failed to open segment").count()
    );
    assert!(
        refusals > 0,
        "no whitelist refusal logged: is FFmpeg's stderr in the node log?"
    );

    let read = canary.read_since_planted();
    assert!(read.is_empty(), "FFmpeg read the canary: {read:?}");
    for id in &ids {
        let h = hgetall(&redis, &format!("farm:stream:{id}")).await;
        println!(
            "{id}: {}",
            h.get("last_error").map(String::as_str).unwrap_or("")
        );
        let r = get(&format!("{}/live/{id}/index.m3u8", node.base_url())).await;
        assert_eq!(r.status, 503, "{id}: {}", r.text());
    }
    assert!(
        ffmpegs_under(node.hls_root()).is_empty(),
        "every FFmpeg ended"
    );

    // Control: the access-time check can fail. A read moves the canary's access time.
    let _ = std::fs::read(&canary.ts).expect("read canary");
    assert_eq!(
        canary.read_since_planted(),
        vec![canary.ts.clone()],
        "a read must move the canary's access time, or the check above proves nothing"
    );
}

/// `INFO` fields of a Redis.
async fn info(c: &mut MultiplexedConnection, section: &str) -> HashMap<String, String> {
    let text: String = redis::cmd("INFO")
        .arg(section)
        .query_async(c)
        .await
        .expect("INFO");
    text.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn num(m: &HashMap<String, String>, k: &str) -> u64 {
    m.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Ids of the clients connected now.
async fn client_ids(c: &mut MultiplexedConnection) -> Vec<u64> {
    let text: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(c)
        .await
        .expect("CLIENT LIST");
    text.lines()
        .filter_map(|l| {
            l.split_whitespace()
                .next()?
                .strip_prefix("id=")?
                .parse()
                .ok()
        })
        .collect()
}

/// What a Redis saw of FFmpeg since [`RedisWatch::start`]: connections that came and went (the
/// node keeps its pooled connections open, so a connection opened since and closed again is not
/// the node's), GET calls rejected for their arity (the request line `GET /path HTTP/1.1`; the
/// farm never sends such a GET) and Redis's own cross-protocol warning (`Host:` header).
struct RedisWatch<'a> {
    redis: &'a RedisServer,
    conn: MultiplexedConnection,
    connections: u64,
    max_id: u64,
    rejected_get: u64,
    log_len: usize,
}

#[derive(Debug, PartialEq, Eq)]
struct Contact {
    connections_that_came_and_went: u64,
    rejected_gets: u64,
    cross_protocol_warnings: usize,
}

impl<'a> RedisWatch<'a> {
    async fn start(redis: &'a RedisServer) -> RedisWatch<'a> {
        let mut conn = redis.conn().await;
        let connections = num(
            &info(&mut conn, "stats").await,
            "total_connections_received",
        );
        let max_id = client_ids(&mut conn).await.into_iter().max().unwrap_or(0);
        let rejected_get = Self::rejected_get(&mut conn).await;
        RedisWatch {
            redis,
            conn,
            connections,
            max_id,
            rejected_get,
            log_len: redis.log().len(),
        }
    }

    async fn rejected_get(c: &mut MultiplexedConnection) -> u64 {
        info(c, "commandstats")
            .await
            .get("cmdstat_get")
            .and_then(|v| {
                v.split(',')
                    .find_map(|kv| kv.strip_prefix("rejected_calls="))
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    async fn contact(&self) -> Contact {
        let mut conn = self.conn.clone();
        let connections = num(
            &info(&mut conn, "stats").await,
            "total_connections_received",
        );
        let new_alive = client_ids(&mut conn)
            .await
            .into_iter()
            .filter(|id| *id > self.max_id)
            .count() as u64;
        let rejected = Self::rejected_get(&mut conn).await;
        Contact {
            connections_that_came_and_went: (connections - self.connections)
                .saturating_sub(new_alive),
            rejected_gets: rejected - self.rejected_get,
            cross_protocol_warnings: self.redis.log()[self.log_len..]
                .matches("SECURITY ATTACK")
                .count(),
        }
    }
}

const NO_CONTACT: Contact = Contact {
    connections_that_came_and_went: 0,
    rejected_gets: 0,
    cross_protocol_warnings: 0,
};

/// Asks for each channel's playlist (never served), then waits until each one is refused before
/// FFmpeg or has ended `failed`.
/// `conn` is opened by the caller before its Redis watch starts, so polling adds no connection.
async fn start_and_wait_ended(
    conn: &redis::aio::MultiplexedConnection,
    node: &NodeProcess,
    ids: &[&str],
) -> Vec<(String, Resp)> {
    let requests = ids.iter().map(|id| {
        let url = format!("{}/live/{id}/index.m3u8", node.base_url());
        async move { (id.to_string(), get(&url).await) }
    });
    let firsts = futures::future::join_all(requests).await;
    for (id, r) in &firsts {
        println!("{id}: first request -> {} {}", r.status, r.text().trim());
        assert_ne!(r.status, 200, "{id} served a playlist");
    }
    for id in ids {
        eventually(
            &format!("channel {id} to be refused or end failed"),
            Duration::from_secs(120),
            || {
                let mut conn = conn.clone();
                async move {
                    let s: Option<String> =
                        redis::AsyncCommands::hget(&mut conn, format!("farm:stream:{id}"), "state")
                            .await
                            .ok()?;
                    let s = s.unwrap_or_default();
                    (s == "failed" || s.is_empty()).then_some(())
                }
            },
        )
        .await;
    }
    eventually("every FFmpeg to end", Duration::from_secs(30), || async {
        ffmpegs_under(node.hls_root()).is_empty().then_some(())
    })
    .await;
    firsts
}

/// Who must refuse a hostile reference, and how the node log shows it.
#[derive(Debug, Clone)]
enum Refuser {
    /// The egress gateway: `egress to <dest> refused: ... channel=<id>`.
    Gateway(String),
    /// The network sandbox: FFmpeg's own TCP connect to `<dest>` fails with EACCES.
    Sandbox(String),
    /// FFmpeg itself, before any connection: the URI is not a segment it would open.
    Ffmpeg(String),
}

/// How many times the node log shows `refuser` refusing channel `id`.
fn refusals(log: &str, id: &str, refuser: &Refuser) -> usize {
    let channel_tag = format!("channel{{id={id}}}");
    log.lines()
        .filter(|l| match refuser {
            Refuser::Gateway(dest) => {
                l.contains(&format!("egress to {dest} refused:"))
                    && l.ends_with(&format!("channel={id}"))
            }
            Refuser::Sandbox(dest) => {
                l.contains(&channel_tag)
                    && l.contains(&format!(
                        "Connection to tcp://{dest} failed: Permission denied"
                    ))
            }
            Refuser::Ffmpeg(uri) => {
                l.contains(&channel_tag)
                    && l.contains(&format!("URL {uri} is not in allowed_segment_extensions"))
            }
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_urls_pointing_at_the_farm_redis_never_reach_it() {
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    let port = redis.port();
    let channels = [
        ("r_ip", format!("http://127.0.0.1:{port}/"), String::new()),
        (
            "r_name",
            format!("http://localhost:{port}/live.ts"),
            String::new(),
        ),
        (
            "r_https",
            format!("https://127.0.0.1:{port}/"),
            String::new(),
        ),
        (
            "r_rtmp",
            format!("rtmp://127.0.0.1:{port}/live/x"),
            String::new(),
        ),
        (
            "r_backup",
            "http://127.0.0.1:9/nothing.ts".to_string(),
            format!("http://127.0.0.1:{port}/"),
        ),
    ];
    for (id, url, backups) in &channels {
        put_channel(&redis, id, url, backups).await;
    }
    let node = hostile_node(&redis, root.path());
    let conn = redis.conn().await;
    let watch = RedisWatch::start(&redis).await;
    let ids: Vec<&str> = channels.iter().map(|(id, _, _)| *id).collect();
    let firsts = start_and_wait_ended(&conn, &node, &ids).await;
    let spawns = metric(&node, "farm_node_ffmpeg_spawns_total").await;
    let contact = watch.contact().await;
    println!("FFmpeg spawns: {spawns}; the farm Redis saw of FFmpeg: {contact:?}");
    // Each is refused before FFmpeg: 502 naming the farm's Redis, and nothing spawned.
    for (id, r) in &firsts {
        assert_eq!(r.status, 502, "{id}: {}", r.text());
        assert!(
            r.text().contains("cannot start") && r.text().contains("the farm's Redis"),
            "{id}: {}",
            r.text()
        );
    }
    assert_eq!(
        spawns, 0.0,
        "an FFmpeg was spawned for a catalog URL naming the farm's Redis"
    );
    assert_eq!(
        contact,
        NO_CONTACT,
        "a catalog URL made FFmpeg talk to the farm's Redis; its log:\n{}",
        &redis.log()[watch.log_len..]
    );

    // Control: a connection that comes and goes is seen.
    drop(redis.conn().await);
    let seen = eventually(
        "the control connection to be counted",
        Duration::from_secs(5),
        || async {
            let c = watch.contact().await;
            (c.connections_that_came_and_went > contact.connections_that_came_and_went).then_some(c)
        },
    )
    .await;
    println!("after one control connection: {seen:?}");
}

/// True if a TCP connection to `ip:port` is accepted (made before any [`RedisWatch`] starts).
fn reachable(ip: std::net::IpAddr, port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(1)).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_playlists_cannot_point_ffmpeg_at_redis_on_localhost() {
    // The harness binds a Redis to 127.0.0.1 only; these two also listen on 127.0.0.2 and ::1, so
    // that those spellings reach a Redis when nothing stops them (`-`: Redis skips an address the
    // host lacks, and the test then leaves that spelling out, saying so).
    let binds = ["--bind", "127.0.0.1", "-127.0.0.2", "-::1"];
    let redis = RedisServer::start_with_args(&binds);
    // A Redis on 127.0.0.1 that the farm does not use.
    let decoy = RedisServer::start_with_args(&binds);
    let root = tempfile::tempdir().expect("tempdir");
    let (farm_port, decoy_port) = (redis.port(), decoy.port());
    let loopback2: std::net::IpAddr = [127, 0, 0, 2].into();
    let ipv6: std::net::IpAddr = std::net::Ipv6Addr::LOCALHOST.into();
    let on_loopback2 = reachable(loopback2, farm_port) && reachable(loopback2, decoy_port);
    let on_ipv6 = reachable(ipv6, farm_port) && reachable(ipv6, decoy_port);
    println!("the Redis servers listen on 127.0.0.2: {on_loopback2}, on [::1]: {on_ipv6}");
    let (farm_at, decoy_at) = (
        format!("127.0.0.1:{farm_port}"),
        format!("127.0.0.1:{decoy_port}"),
    );
    // (channel, its upstream playlist, who must refuse its hostile reference).
    let mut cases: Vec<(String, String, Refuser)> = vec![
        (
            "seg_farm_redis".into(),
            media_playlist("", &format!("http://{farm_at}/seg.ts")),
            Refuser::Gateway(farm_at.clone()),
        ),
        (
            "key_farm_redis".into(),
            media_playlist(
                &format!("#EXT-X-KEY:METHOD=AES-128,URI=\"http://{farm_at}/key\"\n"),
                "seg.ts",
            ),
            Refuser::Gateway(farm_at.clone()),
        ),
        (
            "variant_farm_redis".into(),
            format!("#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=100000\nhttp://{farm_at}/v.m3u8\n"),
            Refuser::Gateway(farm_at.clone()),
        ),
        (
            "seg_decoy_redis".into(),
            media_playlist("", &format!("http://{decoy_at}/seg.ts")),
            Refuser::Gateway(decoy_at.clone()),
        ),
        (
            "seg_decoy_tcp".into(),
            media_playlist("", &format!("tcp://{decoy_at}")),
            Refuser::Ffmpeg(format!("tcp://{decoy_at}")),
        ),
    ];
    // The same Redis in other spellings, once for each Redis.
    let mut redirects = HashMap::new();
    for (who, port) in [("farm", farm_port), ("decoy", decoy_port)] {
        let mut seg = |spelling: &str, uri: String, refuser: Refuser| {
            cases.push((
                format!("seg_{who}_{spelling}"),
                media_playlist("", &uri),
                refuser,
            ));
        };
        let gw = |host: &str| Refuser::Gateway(format!("{host}:{port}"));
        // TLS: FFmpeg asks the gateway to CONNECT.
        seg(
            "https",
            format!("https://127.0.0.1:{port}/seg.ts"),
            gw("127.0.0.1"),
        );
        // FFmpeg's HLS demuxer opens any protocol whose name starts with "http": `httpproxy`
        // opens a raw TCP connection to that host and port and sends `CONNECT`. Debian's FFmpeg
        // refuses a segment URL without a media extension (`allowed_segment_extensions`), so the
        // bare `/` is refused there before any connection; `/seg.ts` is FFmpeg's own TCP
        // connection, which the sandbox refuses.
        seg(
            "httpproxy",
            format!("httpproxy://127.0.0.1:{port}/"),
            Refuser::Ffmpeg(format!("httpproxy://127.0.0.1:{port}/")),
        );
        seg(
            "httpproxy_ts",
            format!("httpproxy://127.0.0.1:{port}/seg.ts"),
            Refuser::Sandbox(format!("127.0.0.1:{port}")),
        );
        if on_loopback2 {
            seg(
                "loopback2",
                format!("http://127.0.0.2:{port}/seg.ts"),
                gw("127.0.0.2"),
            );
        } else {
            println!("127.0.0.2 left out: the Redis servers could not listen there");
        }
        if on_ipv6 {
            seg("ipv6", format!("http://[::1]:{port}/seg.ts"), gw("::1"));
        } else {
            println!("[::1] left out: this host has no IPv6 loopback for the Redis servers");
        }
        // Connecting to 0.0.0.0 reaches the host itself.
        seg(
            "any",
            format!("http://0.0.0.0:{port}/seg.ts"),
            gw("0.0.0.0"),
        );
        seg(
            "localhost",
            format!("http://localhost:{port}/seg.ts"),
            gw("localhost"),
        );
        // A segment on the upstream itself (relative URI) that answers 302 to the Redis.
        seg("redirect", format!("redirect_{who}.ts"), gw("127.0.0.1"));
        redirects.insert(
            format!("/redirect_{who}.ts"),
            format!("http://127.0.0.1:{port}/x.ts"),
        );
    }
    let upstream = Upstream::start_with_redirects(
        cases
            .iter()
            .map(|(id, text, _)| (format!("/{id}.m3u8"), text.clone()))
            .collect(),
        redirects.clone(),
    )
    .await;
    for (id, _, _) in &cases {
        put_channel(&redis, id, &upstream.url(&format!("/{id}.m3u8")), "").await;
    }
    let node = hostile_node(&redis, root.path());
    let conn = redis.conn().await;
    let farm = RedisWatch::start(&redis).await;
    let other = RedisWatch::start(&decoy).await;
    let ids: Vec<&str> = cases.iter().map(|(id, _, _)| id.as_str()).collect();
    start_and_wait_ended(&conn, &node, &ids).await;

    // Why each channel ended, for an operator reading a failure (on the connection opened before
    // the watch, so this adds no connection to the farm Redis).
    let mut c = conn.clone();
    for id in &ids {
        let h: HashMap<String, String> =
            redis::AsyncCommands::hgetall(&mut c, format!("farm:stream:{id}"))
                .await
                .expect("HGETALL stream");
        println!(
            "{id}: playlist fetched {} times; state {:?}; last_error: {}",
            upstream.hits(&format!("/{id}.m3u8")),
            h.get("state").map(String::as_str).unwrap_or(""),
            h.get("last_error").map(String::as_str).unwrap_or("")
        );
    }
    print_egress(&node).await;
    let mut redirect_paths: Vec<&String> = redirects.keys().collect();
    redirect_paths.sort();
    for path in &redirect_paths {
        println!(
            "{path} (302 to {}): asked {} times",
            redirects[*path],
            upstream.hits(path)
        );
    }

    for id in &ids {
        assert!(
            upstream.hits(&format!("/{id}.m3u8")) >= 1,
            "{id}: playlist never fetched"
        );
    }
    for path in &redirect_paths {
        assert!(
            upstream.hits(path) >= 1,
            "FFmpeg never asked the upstream for {path}, so it never met the redirect"
        );
    }
    // Each hostile reference was tried and refused, by whom the spelling says: the gateway
    // (counted per reference in its log), the sandbox, or FFmpeg before any connection.
    let log = node.log();
    let mut never: Vec<String> = Vec::new();
    for (id, _, refuser) in &cases {
        let n = refusals(&log, id, refuser);
        println!("{id}: refused {n} times by {refuser:?}");
        if n == 0 {
            never.push(format!("{id} ({refuser:?})"));
        }
    }
    assert!(
        never.is_empty(),
        "hostile references never seen refused (not tried, or let through): {never:?}"
    );
    let (farm_contact, other_contact) = (farm.contact().await, other.contact().await);
    println!("the farm Redis saw of FFmpeg: {farm_contact:?}; the other Redis: {other_contact:?}");
    assert_eq!(
        (farm_contact, other_contact),
        (NO_CONTACT, NO_CONTACT),
        "an upstream playlist made FFmpeg talk to a Redis on this host; farm Redis log since:\n{}\nother Redis log since:\n{}",
        &redis.log()[farm.log_len..],
        &decoy.log()[other.log_len..]
    );
}

/// The control for the test above: what the network sandbox adds. With `--ffmpeg-sandbox off` the
/// gateway still decides every `http`/`https` request, but an `httpproxy:` URI inside a playlist is
/// FFmpeg's own TCP connection, and it reaches a Redis on 127.0.0.1. So the test above holds
/// because of the sandbox, and its Redis watch sees such contact when it happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_sandbox_an_httpproxy_uri_in_a_playlist_reaches_redis() {
    let redis = RedisServer::start();
    let decoy = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    let port = decoy.port();
    let id = "seg_decoy_httpproxy";
    let upstream = Upstream::start(HashMap::from([(
        format!("/{id}.m3u8"),
        media_playlist("", &format!("httpproxy://127.0.0.1:{port}/seg.ts")),
    )]))
    .await;
    put_channel(&redis, id, &upstream.url(&format!("/{id}.m3u8")), "").await;
    let node = hostile_node_with(&redis, root.path(), &["--ffmpeg-sandbox", "off"]);
    let conn = redis.conn().await;
    let watch = RedisWatch::start(&decoy).await;
    start_and_wait_ended(&conn, &node, &[id]).await;
    assert_eq!(metric(&node, "farm_node_ffmpeg_sandbox").await, 0.0);
    let contact = watch.contact().await;
    println!("without the sandbox, the other Redis saw of FFmpeg: {contact:?}");
    assert!(
        contact.connections_that_came_and_went > 0,
        "an httpproxy: URI without the sandbox was expected to reach the Redis (FFmpeg changed?): {contact:?}"
    );
}
