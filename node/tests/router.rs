//! The node's router through `tower::ServiceExt::oneshot`: playback authorization, routing to the
//! owner node, CORS, and the admin token, against a real redis-server. The node has no guard,
//! so nothing here spawns an FFmpeg.

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use farm_node::config::{Args, Config};
use farm_node::node::Node;
use farm_proto::keys::Keys;
use farm_tests::redis::RedisServer;
use http_body_util::BodyExt;
use std::sync::Arc;
use tower::ServiceExt;

const SECRET: &str = "0123456789abcdef0123456789abcdef";
const ADMIN: &str = "an-admin-token-for-tests";

/// A node on its own redis-server and HLS folder, and its router.
struct Fixture {
    redis: RedisServer,
    _hls: tempfile::TempDir,
    app: Router,
}

async fn fixture(tune: impl FnOnce(&mut Config)) -> Fixture {
    let redis = RedisServer::start();
    let hls = tempfile::tempdir().expect("tempdir");
    let mut cfg =
        Config::from_args(<Args as clap::Parser>::parse_from(["farm-node"])).expect("defaults");
    cfg.node_id = "n1".into();
    cfg.redis_url = redis.url();
    cfg.hls_root = hls.path().to_path_buf();
    cfg.admin_token = None;
    cfg.token_secret = None;
    cfg.accel_redirect = None;
    tune(&mut cfg);
    let cfg = Arc::new(cfg);
    let store = farm_node::store::Store::new(&cfg.redis_url, &cfg.prefix, cfg.redis_timeout)
        .expect("store");
    let metrics = Arc::new(farm_node::metrics::Metrics::new());
    let (watcher, _dispatcher) =
        farm_node::watcher::HlsWatcher::new(16, metrics.notify_overflows.clone()).expect("watcher");
    let egress = Arc::new(
        farm_node::egress::Policy::new(&[], cfg.egress_allow.clone(), cfg.egress_deny.clone())
            .await,
    );
    let sandbox =
        farm_node::sandbox::Sandbox::probe(farm_node::sandbox::Mode::Off).expect("sandbox off");
    let node = Node::new(cfg, store, watcher, metrics, egress, sandbox, None);
    Fixture {
        redis,
        _hls: hls,
        app: farm_node::http::app(node),
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn send(app: &Router, req: Request<Body>) -> Answer {
    let resp = app
        .clone()
        .oneshot(req)
        .await
        .expect("the router never fails");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn get(app: &Router, uri: &str) -> Answer {
    send(app, Request::get(uri).body(Body::empty()).expect("request")).await
}

fn admin(method: &str, uri: &str, token: Option<&str>) -> Request<Body> {
    let mut r = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        r = r.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    r.body(Body::empty()).expect("request")
}

/// Another node, `n2`, alive and holding the lease of `channel`.
async fn owned_by_n2(redis: &RedisServer, channel: &str) {
    let keys = Keys::default();
    let mut c = redis.conn().await;
    let _: () = redis::pipe()
        .set(keys.owner(channel), "n2:5")
        .hset(keys.node("n2"), "public_url", "http://10.0.0.2:8080")
        .set(keys.node_alive("n2"), "1")
        .query_async(&mut c)
        .await
        .expect("redis");
}

#[tokio::test]
async fn unknown_paths_get_a_plain_404_with_cors() {
    let f = fixture(|_| {}).await;
    let a = get(&f.app, "/nope").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.body, "no such endpoint\n");
    assert_eq!(a.header("content-type"), "text/plain; charset=utf-8");
    assert_eq!(a.header("cache-control"), "no-store");
    assert_eq!(a.header("access-control-allow-origin"), "*");
}

#[tokio::test]
async fn cors_preflight_allows_browser_players() {
    let f = fixture(|_| {}).await;
    for uri in ["/live/a/index.m3u8", "/live/t/a/index.m3u8"] {
        let req = Request::builder()
            .method("OPTIONS")
            .uri(uri)
            .header("origin", "https://player.example")
            .body(Body::empty())
            .expect("request");
        let a = send(&f.app, req).await;
        assert_eq!(a.status, StatusCode::NO_CONTENT, "{uri}");
        assert_eq!(a.header("access-control-allow-origin"), "*");
        assert_eq!(
            a.header("access-control-expose-headers"),
            "Content-Length, Retry-After"
        );
        assert_eq!(
            a.header("access-control-allow-methods"),
            "GET, HEAD, OPTIONS"
        );
        assert_eq!(
            a.header("access-control-allow-headers"),
            "Range, Origin, Accept"
        );
        assert_eq!(a.header("access-control-max-age"), "86400");
    }
}

#[tokio::test]
async fn playback_paths_are_checked_before_anything_else() {
    let f = fixture(|_| {}).await;
    let bad_id = get(&f.app, "/live/bad.id/index.m3u8").await;
    assert_eq!(bad_id.status, StatusCode::BAD_REQUEST, "{}", bad_id.body);
    let bad_file = get(&f.app, "/live/a/run.sh").await;
    assert_eq!(
        bad_file.status,
        StatusCode::BAD_REQUEST,
        "{}",
        bad_file.body
    );
    let signed = get(&f.app, "/live/token/a/index.m3u8").await;
    assert_eq!(signed.status, StatusCode::NOT_FOUND);
    assert_eq!(signed.body, "no such path: signed playback URLs are off\n");
    let wrong_name = get(&f.app, "/live/a/other.m3u8").await;
    assert_eq!(wrong_name.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn signed_urls_need_a_valid_token() {
    let f = fixture(|c| c.token_secret = Some(SECRET.into())).await;
    let plain = get(&f.app, "/live/ghost/index.m3u8").await;
    assert_eq!(plain.status, StatusCode::FORBIDDEN);
    assert_eq!(plain.body, "playback token required\n");
    let forged = get(&f.app, "/live/1.a.00/ghost/index.m3u8").await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    // A token for another channel does not open this one.
    let expiry = unix_now() + 60;
    let other = farm_proto::token::mint(SECRET.as_bytes(), "other", expiry, None).expect("mint");
    let a = get(&f.app, &format!("/live/{other}/ghost/index.m3u8")).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    // A valid token passes: the channel is then looked up (and is not in the catalog).
    let token = farm_proto::token::mint(SECRET.as_bytes(), "ghost", expiry, None).expect("mint");
    let a = get(&f.app, &format!("/live/{token}/ghost/index.m3u8")).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(
        a.body,
        "unknown channel \"ghost\": it is not in the catalog\n"
    );
}

#[tokio::test]
async fn the_nginx_auth_hook_answers_204_or_403() {
    let f = fixture(|c| c.token_secret = Some(SECRET.into())).await;
    let hook = |uri: &str| {
        Request::get("/auth")
            .header("x-original-uri", uri)
            .body(Body::empty())
            .expect("request")
    };
    let token =
        farm_proto::token::mint(SECRET.as_bytes(), "a", unix_now() + 60, None).expect("mint");
    let ok = send(&f.app, hook(&format!("/live/{token}/a/seg1.ts?x=1"))).await;
    assert_eq!(ok.status, StatusCode::NO_CONTENT);
    let denied = send(&f.app, hook("/live/a/seg1.ts")).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(denied.body, "playback token required\n");
    let elsewhere = send(&f.app, hook("/admin/streams")).await;
    assert_eq!(elsewhere.status, StatusCode::FORBIDDEN);
    assert_eq!(elsewhere.body, "not a playback path\n");
}

#[tokio::test]
async fn an_unknown_channel_is_404_and_remembered() {
    let f = fixture(|_| {}).await;
    for _ in 0..2 {
        let a = get(&f.app, "/live/ghost/index.m3u8").await;
        assert_eq!(a.status, StatusCode::NOT_FOUND);
        assert_eq!(
            a.body,
            "unknown channel \"ghost\": it is not in the catalog\n"
        );
        assert_eq!(a.header("access-control-allow-origin"), "*");
    }
    let seg = get(&f.app, "/live/ghost/seg1.ts").await;
    assert_eq!(seg.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_segment_nobody_runs_is_404() {
    let f = fixture(|_| {}).await;
    let a = get(&f.app, "/live/idle/seg1.ts").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(
        a.body,
        "channel idle is not running; request its playlist first\n"
    );
}

#[tokio::test]
async fn requests_for_a_channel_another_node_runs_are_redirected_there() {
    let f = fixture(|_| {}).await;
    owned_by_n2(&f.redis, "c1").await;
    let seg = get(&f.app, "/live/c1/seg1.ts?x=1").await;
    assert_eq!(seg.status, StatusCode::TEMPORARY_REDIRECT, "{}", seg.body);
    assert_eq!(
        seg.header("location"),
        "http://10.0.0.2:8080/live/c1/seg1.ts?x=1"
    );
    // Its owner has recorded no playlist yet: the owner answers the playlist too.
    let pl = get(&f.app, "/live/c1/index.m3u8").await;
    assert_eq!(pl.status, StatusCode::TEMPORARY_REDIRECT, "{}", pl.body);
    assert_eq!(
        pl.header("location"),
        "http://10.0.0.2:8080/live/c1/index.m3u8"
    );
}

#[tokio::test]
async fn behind_nginx_the_redirect_is_an_internal_one() {
    let f = fixture(|c| c.accel_redirect = Some("/_owner".into())).await;
    owned_by_n2(&f.redis, "c1").await;
    let a = get(&f.app, "/live/c1/seg1.ts").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.header("x-accel-redirect"),
        "/_owner/10.0.0.2:8080/live/c1/seg1.ts"
    );
    assert_eq!(a.header("location"), "");
}

#[tokio::test]
async fn the_admin_api_is_off_without_a_token() {
    let f = fixture(|_| {}).await;
    let a = send(&f.app, admin("GET", "/admin/streams", Some("anything"))).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(
        a.body,
        "admin API disabled: start the node with --admin-token (FARM_ADMIN_TOKEN)\n"
    );
}

#[tokio::test]
async fn the_admin_api_takes_only_its_bearer_token() {
    let f = fixture(|c| c.admin_token = Some(ADMIN.into())).await;
    let ok = send(&f.app, admin("GET", "/admin/streams", Some(ADMIN))).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.body, "[]");
    let stop = send(&f.app, admin("POST", "/admin/streams/c1/stop", Some(ADMIN))).await;
    assert_eq!(stop.status, StatusCode::NOT_FOUND);
    assert_eq!(stop.body, "channel c1 is not running on this node\n");
    let bad = send(
        &f.app,
        admin("POST", "/admin/streams/bad.id/stop", Some(ADMIN)),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let none = send(&f.app, admin("GET", "/admin/streams", None)).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.body, "missing or wrong bearer token\n");
}

#[tokio::test]
async fn wrong_admin_tokens_are_throttled() {
    let f = fixture(|c| c.admin_token = Some(ADMIN.into())).await;
    // A few are free; the next one after them waits (429 with Retry-After), even the right one.
    for _ in 0..=farm_node::limits::AuthFailures::FREE {
        let a = send(&f.app, admin("GET", "/admin/streams", Some("wrong"))).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    }
    let a = send(&f.app, admin("GET", "/admin/streams", Some(ADMIN))).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(a.header("retry-after"), "1");
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
