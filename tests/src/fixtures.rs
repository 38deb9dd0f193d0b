//! Small fixtures shared by the end-to-end tests: a test's own Redis and temp root with channels,
//! nodes with the fast timing profile ([`crate::farm::Timing::Fast`]), farmctl channel adds,
//! admin-API and command-stream requests, signed playback tokens, and HTTP, viewer and Redis helpers
//! for assertions (the invariant checker's verdict included). A whole farm (Redis, provider, nodes,
//! coordinators, nginx) is [`crate::farm::Farm`].

use crate::node::{farmctl, NodeOpts, NodeProcess};
use crate::procs;
use crate::redis::RedisServer;
use redis::AsyncCommands;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use tempfile::TempDir;

pub use crate::farm::FAST;

/// [`FAST`] with some of its values replaced, e.g. `fast_with(&[("--backoff-base", "1s")])` (a flag
/// may be given once).
pub fn fast_with(overrides: &[(&str, &str)]) -> Vec<String> {
    crate::farm::with_values(FAST, overrides)
}

/// A node with [`fast_with`]`(overrides)` and `extra` arguments.
pub fn node_with(
    redis: &RedisServer,
    id: &str,
    root: &Path,
    fake: bool,
    overrides: &[(&str, &str)],
    extra: &[&str],
) -> NodeProcess {
    let mut opts = NodeOpts::new(id, redis.url(), root.join(id))
        .args(fast_with(overrides))
        .args(extra.iter().copied());
    if fake {
        opts = opts.with_fake_ffmpeg();
    }
    NodeProcess::spawn(opts)
}

pub fn node(redis: &RedisServer, id: &str, root: &Path, fake: bool, extra: &[&str]) -> NodeProcess {
    let mut opts = NodeOpts::new(id, redis.url(), root.join(id))
        .args(FAST.iter().copied())
        .args(extra.iter().copied());
    if fake {
        opts = opts.with_fake_ffmpeg();
    }
    NodeProcess::spawn(opts)
}

/// The start of a test that runs its own nodes (each with its own arguments): its own Redis, a temp
/// root for the nodes' folders, and channel `id` reading `url` (`extra`: more `farmctl channel add`
/// arguments, e.g. `--profile`). A test that wants the nodes started too uses [`crate::farm::Farm`].
pub fn redis_with_channel(id: &str, url: &str, extra: &[&str]) -> (RedisServer, TempDir) {
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    add_channel(&redis, id, url, extra);
    (redis, root)
}

/// [`redis_with_channel`] with channels `ids` reading the fake FFmpeg's source, a segment every
/// 500 ms.
pub fn redis_with_fake_channels(ids: &[&str]) -> (RedisServer, TempDir) {
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    add_fake_channels(&redis, ids, 500);
    (redis, root)
}

/// The invariant checker over `nodes` once `settle` has passed (promise 9's bound,
/// [`crate::invariants::settle_time`]): prints its figure after `what` and panics on anything it
/// finds. A [`crate::farm::Farm`] knows its own bound: [`crate::farm::Farm::assert_settled`].
pub async fn assert_settled(
    redis: &RedisServer,
    nodes: &[&NodeProcess],
    settle: Duration,
    what: &str,
) {
    let report = crate::invariants::check_nodes(redis, nodes, settle).await;
    println!("{what}: {}", report.figure());
    report.assert_clean();
}

/// Adds a channel with farmctl and checks that it worked.
pub fn add_channel(redis: &RedisServer, id: &str, url: &str, extra: &[&str]) {
    let mut args = vec!["channel", "add", id, url];
    args.extend_from_slice(extra);
    let out = farmctl(&redis.url(), &args);
    assert!(
        out.status.success(),
        "farmctl channel add failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Adds channels reading the fake FFmpeg's source, a segment every `seg_ms`.
pub fn add_fake_channels(redis: &RedisServer, ids: &[&str], seg_ms: u64) {
    for id in ids {
        add_channel(redis, id, &crate::coordinator::fake_source(id, seg_ms), &[]);
    }
}

/// A request to `node`'s admin API: `method` on `/admin<path>` with bearer `token` (`None`: no
/// Authorization header).
pub async fn admin_request(
    node: &NodeProcess,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
) -> reqwest::Result<reqwest::Response> {
    let mut req = client().request(method, format!("{}/admin{path}", node.base_url()));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    req.send().await
}

/// `POST /admin/streams/<id>/stop` ([`admin_request`]): its status. Panics when the request fails.
pub async fn admin_stop(node: &NodeProcess, id: &str, token: Option<&str>) -> u16 {
    let path = format!("/streams/{id}/stop");
    admin_request(node, reqwest::Method::POST, &path, token)
        .await
        .unwrap_or_else(|e| panic!("POST /admin{path}: {e}"))
        .status()
        .as_u16()
}

/// A playback token for `channel` signed with `secret` (what `farmctl token` mints), expiring
/// `expires_in` seconds from now (negative: already expired), bound to `client` when given.
pub fn signed_token(secret: &str, channel: &str, expires_in: i64, client: Option<&str>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let expiry = now.saturating_add_signed(expires_in);
    farm_proto::token::mint(secret.as_bytes(), channel, expiry, client).expect("mint")
}

/// A client that does not follow redirects, with a 30 s timeout per request.
pub fn client() -> reqwest::Client {
    no_redirects_within(Duration::from_secs(30))
}

/// A client that does not follow redirects, with `timeout` per request.
pub fn no_redirects_within(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()
        .expect("http client")
}

pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }
}

/// The first playlist request for channel `id` on `node` is refused: 502, naming an invalid
/// upstream URL.
pub async fn assert_invalid_upstream(node: &NodeProcess, id: &str) {
    let r = get(&format!("{}/live/{id}/index.m3u8", node.base_url())).await;
    assert_eq!(r.status, 502, "{id}: {}", r.text());
    assert!(
        r.text().contains("invalid upstream URL"),
        "{id}: {}",
        r.text()
    );
}

pub async fn get(url: &str) -> Resp {
    get_with(&client(), url).await
}

/// [`get`] with this client (e.g. one that follows redirects).
pub async fn get_with(http: &reqwest::Client, url: &str) -> Resp {
    let r = http
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
    Resp {
        status,
        headers,
        body,
    }
}

/// Where `url` sends the viewer: the `Location` of its answer, which must be a 307.
pub async fn redirect_of(url: &str) -> String {
    let r = get(url).await;
    assert_eq!(r.status, 307, "{url}: {}", r.text());
    r.header("location")
}

/// Joins viewer tasks (each an [`crate::hls::HlsClient::pull`], one per channel of `ids`): prints
/// each report and asserts that each played at least `min_media` seconds. The reports.
pub async fn join_viewers<Id: std::fmt::Display>(
    ids: impl IntoIterator<Item = Id>,
    viewers: Vec<tokio::task::JoinHandle<Result<crate::hls::PullReport, String>>>,
    min_media: f64,
) -> Vec<crate::hls::PullReport> {
    let mut reports = Vec::new();
    for (id, v) in ids.into_iter().zip(viewers) {
        let r = v.await.expect("join").expect("pull");
        println!("{id}: {r:?}");
        assert!(
            r.media_seconds >= min_media,
            "{id} played {} s of media, not {min_media}: {r:?}",
            r.media_seconds
        );
        reports.push(r);
    }
    reports
}

/// [`get`] of a playlist whose 200 body goes to the strict RFC 8216 checker of its channel
/// ([`crate::hls::observe`]: panics on a violation). For one viewer's sequence of fetches.
pub async fn get_observed(url: &str) -> Resp {
    let r = get(url).await;
    if r.status == 200 {
        crate::hls::observe(url, &r.text());
    }
    r
}

/// Live (non-zombie) processes whose command line mentions this folder: the node's FFmpegs.
pub fn ffmpegs_under(root: &Path) -> Vec<i32> {
    let needle = root.to_string_lossy().to_string();
    procs::processes_with_cmdline_containing(&needle)
        .into_iter()
        .filter(|(_, cmd)| {
            // The program name, not the node (whose own arguments mention the folder too).
            let prog = cmd.split_whitespace().next().unwrap_or("");
            Path::new(prog)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().contains("ffmpeg"))
        })
        .map(|(pid, _)| pid)
        .filter(|pid| !procs::is_zombie(*pid) && procs::pid_alive(*pid))
        .collect()
}

pub async fn hgetall(redis: &RedisServer, key: &str) -> HashMap<String, String> {
    let mut c = redis.conn().await;
    c.hgetall(key).await.expect("HGETALL")
}

pub async fn exists(redis: &RedisServer, key: &str) -> bool {
    let mut c = redis.conn().await;
    c.exists(key).await.expect("EXISTS")
}

pub async fn zscore(redis: &RedisServer, key: &str, member: &str) -> Option<f64> {
    let mut c = redis.conn().await;
    c.zscore(key, member).await.expect("ZSCORE")
}

/// A counter from the node's /metrics (prometheus text), 0 when absent.
pub async fn metric(node: &NodeProcess, name: &str) -> f64 {
    let text = get(&format!("{}/metrics", node.base_url())).await.text();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name).then(|| v.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Prints what a node's egress gateways did and whether its FFmpegs run sandboxed.
pub async fn print_egress(node: &NodeProcess) {
    println!(
        "node egress gateway: {} connections, {} refused; FFmpeg sandboxed: {}",
        metric(node, "farm_node_egress_connections_total").await,
        metric(node, "farm_node_egress_refused_total").await,
        metric(node, "farm_node_ffmpeg_sandbox").await
    );
}

/// Adds a command to node `node`'s command stream (`farm:cmd:<node>`), as an operator with
/// redis-cli would: its stream id.
pub async fn send_command(
    c: &mut redis::aio::MultiplexedConnection,
    node: &str,
    fields: &[(&str, &str)],
) -> String {
    c.xadd(format!("farm:cmd:{node}"), "*", fields)
        .await
        .expect("XADD")
}

/// [`send_command`] of a stop of `channel`'s run `gen`, with more fields (e.g. `("reason", "ops")`).
pub async fn send_stop(
    c: &mut redis::aio::MultiplexedConnection,
    node: &str,
    channel: &str,
    gen: impl std::fmt::Display,
    extra: &[(&str, &str)],
) -> String {
    let gen = gen.to_string();
    let mut fields = vec![("op", "stop"), ("channel", channel), ("gen", gen.as_str())];
    fields.extend_from_slice(extra);
    send_command(c, node, &fields).await
}

/// Every key in the (test's own) Redis, sorted. Only for assertions in tests.
pub async fn all_keys(redis: &RedisServer) -> Vec<String> {
    let mut c = redis.conn().await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .expect("KEYS");
    keys.sort();
    keys
}

/// A client that does not follow redirects, with a 15 s timeout per request.
pub fn no_redirects() -> reqwest::Client {
    no_redirects_within(Duration::from_secs(15))
}

/// GET of a playlist; a 200 body goes to the strict checker ([`crate::hls::observe`]). The status
/// and body; `(0, "")` when the request fails.
pub async fn observed_playlist(http: &reqwest::Client, url: &str) -> (u16, String) {
    match http.get(url).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            if status == 200 {
                crate::hls::observe(url, &body);
            }
            (status, body)
        }
        Err(_) => (0, String::new()),
    }
}

/// The first segment that `playlist` (the 200 body of `playlist_url`) lists of a run newer than
/// `gen`, fetched next to the playlist: its bytes (which go to the strict checker,
/// [`crate::hls::observe_segment`]) when it answers 200; `None` when the playlist lists none or the
/// fetch fails. How a viewer learns that a channel was started again elsewhere.
pub async fn newer_segment(
    http: &reqwest::Client,
    playlist_url: &str,
    playlist: &str,
    gen: u64,
) -> Option<bytes::Bytes> {
    let pl = crate::hls::MediaPlaylist::parse(playlist).expect("playlist");
    let seg = pl
        .segments
        .iter()
        .find(|s| segment_gen(&s.uri).is_some_and(|g| g > gen))?;
    let (folder, _) = playlist_url.rsplit_once('/')?;
    let url = format!("{folder}/{}", seg.uri);
    let r = http.get(&url).send().await.ok()?;
    if r.status().as_u16() != 200 {
        return None;
    }
    let bytes = r.bytes().await.unwrap_or_default();
    crate::hls::observe_segment(&url, &bytes);
    Some(bytes)
}

/// The gen in a segment URI `seg_<gen>_<msn>.ts`.
pub fn segment_gen(uri: &str) -> Option<u64> {
    uri.strip_prefix("seg_")?.split('_').next()?.parse().ok()
}

/// Redis's clock, ms (the clock `farm:access` is written with).
pub async fn redis_now_ms(redis: &RedisServer) -> u64 {
    let mut c = redis.conn().await;
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await.expect("TIME");
    s * 1000 + us / 1000
}

/// A channel's last access in `farm:access`, ms of Redis's clock.
pub async fn access(redis: &RedisServer, id: &str) -> Option<u64> {
    zscore(redis, "farm:access", id).await.map(|v| v as u64)
}

/// A first request for each of these playlist URLs, each answered 200 (which starts its channel).
pub async fn assert_all_play(urls: impl IntoIterator<Item = String>) {
    for url in urls {
        let r = get_observed(&url).await;
        assert_eq!(r.status, 200, "{url}: {}", r.text());
    }
}

/// Round `round` of a viewer: 5 s of media (within 20 s); panics naming the round on an error.
pub async fn watch_round(viewer: &mut crate::hls::HlsClient, round: u32) -> crate::hls::PullReport {
    viewer
        .pull(Duration::from_secs(5), Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("round {round}: {e}"))
}

/// Waits (up to 5 s: a node flushes its access records every 500 ms) until channel `id`'s access time
/// is past `after`; returns it.
pub async fn access_after(redis: &RedisServer, id: &str, after: u64) -> u64 {
    crate::wait::eventually("farm:access to advance", Duration::from_secs(5), || async {
        access(redis, id).await.filter(|a| *a > after)
    })
    .await
}

/// Waits (up to 20 s) until channel `id` has no owner any more: how long after `left` (when its
/// last viewer left) it stopped.
pub async fn stopped_after_its_viewer_left(
    c: &redis::aio::MultiplexedConnection,
    id: &str,
    left: std::time::Instant,
) -> Duration {
    let what = format!("{id} to stop after its viewer left");
    crate::coordinator::wait_unowned(c, id, &what, Duration::from_secs(20)).await;
    left.elapsed()
}

/// Waits up to `timeout` until `field` of node `node`'s hash (`farm:node:<node>`, its heartbeat) is
/// `value`; panics naming `what` otherwise.
pub async fn wait_node_field(
    redis: &RedisServer,
    node: &str,
    field: &str,
    value: &str,
    what: &str,
    timeout: Duration,
) {
    let key = format!("farm:node:{node}");
    crate::wait::eventually(what, timeout, || async {
        (hgetall(redis, &key).await.get(field).map(String::as_str) == Some(value)).then_some(())
    })
    .await;
}
