//! No error reaches a viewer when the owner node dies (promise 11), through nginx in both access
//! modes and both topologies of deploy/nginx/README.md: one nginx in front of every node of a
//! machine, and one nginx per machine (its own node, the other machine's as `--fallback-node`).
//!
//! A prober per nginx asks for the channel's playlist every 50 ms, and for the newest segment it
//! lists, from before the `kill -9` of the owner until the other node has published for 2 s. Every
//! playlist answer must be a 200 with a playlist (the last window, held, until the new owner
//! publishes); every answer that is not a 200 (a segment of the dead node) must carry
//! `Access-Control-Allow-Origin`, so a browser player sees the status, not a CORS failure. The
//! dead node's folder is removed at the kill, as the launcher and the systemd unit do.

use farm_tests::coordinator::{owner, CoordinatorOpts, CoordinatorProcess};
use farm_tests::farm::coordinator_args;
use farm_tests::fixtures::*;
use farm_tests::hls::MediaPlaylist;
use farm_tests::nginx::{NginxOpts, NginxServer};
use farm_tests::node::NodeProcess;
use farm_tests::redis::RedisServer;
use farm_tests::wait::eventually;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Behind nginx, a node hands requests for a channel another node owns to nginx.
const ACCEL: &[&str] = &["--accel-redirect", "/_farm_owner"];

#[derive(Clone, Copy, Debug)]
enum Topology {
    /// One nginx in front of both nodes, with both roots.
    Shared,
    /// One nginx per node; the other node as `--fallback-node`.
    PerMachine,
}

#[derive(Clone, Copy, Debug)]
enum Access {
    Auth,
    Log,
}

#[derive(Default)]
struct Seen {
    /// (kind, status) -> count.
    statuses: BTreeMap<(String, u16), u64>,
    /// Answers that were not a 200 and carried no CORS header.
    no_cors: Vec<String>,
    /// Playlist answers that were not a parseable playlist.
    bad_playlists: Vec<String>,
}

fn prober(
    nginx_base: String,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = client();
        let url = format!("{nginx_base}/live/tv/index.m3u8");
        let mut pace = tokio::time::interval(Duration::from_millis(50));
        while !stop.load(Ordering::Acquire) {
            pace.tick().await;
            let mut targets = vec![("playlist", url.clone())];
            if let Ok(r) = http.get(&url).send().await {
                let st = r.status().as_u16();
                let cors = r.headers().contains_key("access-control-allow-origin");
                let body = r.text().await.unwrap_or_default();
                let mut s = seen.lock().expect("lock");
                *s.statuses.entry(("playlist".into(), st)).or_default() += 1;
                if st != 200 && !cors {
                    s.no_cors.push(format!("playlist {st}"));
                }
                match MediaPlaylist::parse(&body) {
                    Ok(p) if st == 200 => {
                        farm_tests::hls::observe(&url, &body);
                        if let Some(seg) = p.segments.last() {
                            targets.push(("segment", format!("{nginx_base}/live/tv/{}", seg.uri)));
                        }
                    }
                    _ if st == 200 => s.bad_playlists.push(body.chars().take(200).collect()),
                    _ => {}
                }
            } else {
                let mut s = seen.lock().expect("lock");
                *s.statuses.entry(("playlist".into(), 0)).or_default() += 1;
            }
            for (kind, u) in targets.into_iter().skip(1) {
                let (st, cors) = match http.get(&u).send().await {
                    Ok(r) => (
                        r.status().as_u16(),
                        r.headers().contains_key("access-control-allow-origin"),
                    ),
                    Err(_) => (0, false),
                };
                let mut s = seen.lock().expect("lock");
                *s.statuses.entry((kind.into(), st)).or_default() += 1;
                if st != 200 && !cors {
                    s.no_cors.push(format!("{kind} {st} {u}"));
                }
            }
        }
    })
}

async fn scenario(topology: Topology, access: Access) {
    let (redis, root) = redis_with_fake_channels(&["tv"]);
    let socks: Vec<String> = ["n1", "n2"]
        .iter()
        .map(|n| root.path().join(format!("{n}.sock")).display().to_string())
        .collect();
    let node_of = |i: usize| -> NodeProcess {
        let id = ["n1", "n2"][i];
        match access {
            Access::Auth => node(&redis, id, root.path(), true, ACCEL),
            Access::Log => node(
                &redis,
                id,
                root.path(),
                true,
                &[ACCEL, &["--access-socket", &socks[i]]].concat(),
            ),
        }
    };
    let mut n1 = node_of(0);
    let n2 = node_of(1);
    let _co = CoordinatorProcess::spawn(
        CoordinatorOpts::new("co", redis.url()).args(coordinator_args(&[("--tick", "500ms")], &[])),
    );
    let with_mode = |o: NginxOpts, which: &[usize]| match access {
        Access::Auth => o,
        Access::Log => o.access_log(which.iter().map(|i| socks[*i].clone())),
    };
    let fronts: Vec<NginxServer> = match topology {
        Topology::Shared => vec![NginxServer::start(&with_mode(
            NginxOpts::for_nodes([&n1, &n2]),
            &[0, 1],
        ))],
        Topology::PerMachine => vec![
            NginxServer::start(&with_mode(
                NginxOpts::for_nodes([&n1]).fallback(n2.addr()),
                &[0],
            )),
            NginxServer::start(&with_mode(
                NginxOpts::for_nodes([&n2]).fallback(n1.addr()),
                &[1],
            )),
        ],
    };
    // The channel runs on n1 and has published a window.
    let direct = format!("{}/live/tv/index.m3u8", n1.base_url());
    eventually("tv runs on n1", Duration::from_secs(20), || async {
        let r = get(&direct).await;
        let p = MediaPlaylist::parse(&r.text()).ok()?;
        (r.status == 200 && p.segments.len() >= 4).then_some(())
    })
    .await;
    let mut c = redis.conn().await;
    let (_, gen) = owner(&mut c, "farm", "tv").await.expect("owned");

    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let probers: Vec<_> = fronts
        .iter()
        .map(|f| prober(f.base_url(), stop.clone(), seen.clone()))
        .collect();
    eventually(
        "the probers got playlists",
        Duration::from_secs(10),
        || async {
            let s = seen.lock().expect("lock");
            (s.statuses
                .get(&("playlist".to_string(), 200))
                .copied()
                .unwrap_or(0)
                >= 10)
                .then_some(())
        },
    )
    .await;

    n1.kill9();
    // As the launcher and the unit's ExecStopPost do: a dead node's files go at once.
    let _ = std::fs::remove_dir_all(n1.hls_root().join("tv"));
    let moved = eventually("n2 owns tv", Duration::from_secs(20), || async {
        owner(&mut redis.conn().await, "farm", "tv")
            .await
            .filter(|(n, g)| n == "n2" && *g > gen)
    })
    .await;
    // Every nginx answers with the new owner's segments.
    for f in &fronts {
        let url = format!("{}/live/tv/index.m3u8", f.base_url());
        let needle = format!("seg_{}_", moved.1);
        eventually(
            "the new owner's playlist through nginx",
            Duration::from_secs(20),
            || async {
                let r = get(&url).await;
                r.text().contains(&needle).then_some(())
            },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // probing goes on: viewer time, not sync
    stop.store(true, Ordering::Release);
    for p in probers {
        p.await.expect("prober");
    }
    let s = seen.lock().expect("lock");
    println!(
        "{topology:?} topology, {access:?} mode: statuses through nginx around the kill: {:?}",
        s.statuses
    );
    let bad_playlist_statuses: Vec<_> = s
        .statuses
        .iter()
        .filter(|((kind, st), _)| kind == "playlist" && *st != 200)
        .collect();
    assert!(
        bad_playlist_statuses.is_empty(),
        "playlist answers that were not 200: {bad_playlist_statuses:?}"
    );
    assert!(s.bad_playlists.is_empty(), "{:?}", s.bad_playlists);
    // A segment of the dead owner is gone with it: a 404, never a 5xx (nor a redirect).
    let bad_segment_statuses: Vec<_> = s
        .statuses
        .iter()
        .filter(|((kind, st), _)| kind == "segment" && !matches!(st, 200 | 404))
        .collect();
    assert!(
        bad_segment_statuses.is_empty(),
        "segment answers other than 200/404: {bad_segment_statuses:?}"
    );
    assert!(s.no_cors.is_empty(), "errors without CORS: {:?}", s.no_cors);
}

/// One test per topology and access mode (each its own farm, so nextest runs them in parallel).
macro_rules! scenarios {
    ($($test:ident: $topology:ident, $access:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            scenario(Topology::$topology, Access::$access).await;
        }
    )*};
}

scenarios! {
    one_nginx_for_all_nodes_auth_mode_no_playlist_error_on_the_owners_death: Shared, Auth;
    one_nginx_for_all_nodes_access_log_mode_no_playlist_error_on_the_owners_death: Shared, Log;
    one_nginx_per_machine_auth_mode_no_playlist_error_on_the_owners_death: PerMachine, Auth;
    one_nginx_per_machine_access_log_mode_no_playlist_error_on_the_owners_death: PerMachine, Log;
}

/// Errors nginx makes itself (no node involved) carry CORS headers too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_nginx_sends_carries_cors_headers() {
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    let n1 = node(&redis, "n1", root.path(), true, &[]);
    let nginx = NginxServer::start(&NginxOpts::for_nodes([&n1]));
    let addr = nginx.addr();
    for (method, path) in [
        ("GET", "/live/a/b/c/d"),
        ("GET", "/nothing"),
        ("POST", "/live/tv/index.m3u8"),
        ("GET", "/live/unknown/index.m3u8"),
        ("GET", "/live/unknown/seg_1_1.ts"),
    ] {
        let r = farm_tests::nginx::raw_request(addr, method, path);
        println!("{method} {path} -> {}", r.status);
        assert!(r.status >= 400, "{method} {path}: {}", r.status);
        assert_eq!(
            r.header("access-control-allow-origin"),
            "*",
            "{method} {path} -> {} without CORS",
            r.status
        );
    }
    // The only node gone: nginx's own 502.
    drop(n1);
    let r = farm_tests::nginx::raw_request(addr, "GET", "/live/tv/index.m3u8");
    println!("GET with no node alive -> {}", r.status);
    assert!(r.status >= 500);
    assert_eq!(r.header("access-control-allow-origin"), "*");
}
