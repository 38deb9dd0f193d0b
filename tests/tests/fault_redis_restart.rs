//! Redis restarts (promise 8 and 1): `kill -9` of redis-server and a new one on the same port, two
//! nodes with the fake FFmpeg and one coordinator; lease and node TTL 3 s, tick 500 ms.
//!
//! - With AOF (`appendfsync always`) nothing is lost: the restart is an outage shorter than the lease
//!   TTL and must cost nothing (same gen, same FFmpeg, no stop, no restart).
//! - Without persistence every key is gone: leases, gens, node registrations, command streams and
//!   groups, the leader, the scripts. The catalog comes back at once (as from a replica or a backup:
//!   the test DUMPs it before and RESTOREs it right after), the leases do not. The farm must rebuild
//!   itself: nodes register again, the command streams work again, a viewer gets the channel back,
//!   no channel ever runs twice (sampled every 50 ms), and the checker finds nothing left.

use farm_tests::coordinator::{
    events, farmctl_ok, ffmpegs_for, leader, owner, wait_alive, wait_leader, wait_unowned,
};
use farm_tests::farm::Farm;
use farm_tests::fixtures::send_stop;
use farm_tests::hls::HlsClient;
use farm_tests::invariants::FarmNode;
use farm_tests::redis::RedisServer;
use farm_tests::wait::eventually_with;
use redis::AsyncCommands;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const NODE_TTL: Duration = Duration::from_secs(3);

/// Nodes n1 and n2 (fake FFmpeg) and coordinator c1 ticking every 500 ms on `redis`; channels
/// watched and spare.
async fn farm(redis: RedisServer) -> Farm {
    Farm::pair()
        .fake_ffmpeg()
        .coordinator_value("--tick", "500ms")
        .fake_channels(&["watched", "spare"], 500)
        .start_with(redis)
        .await
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(15))
        .build()
        .expect("http client")
}

async fn status(http: &reqwest::Client, url: &str) -> u16 {
    match http.get(url).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// What a viewer gets for a playlist: a 307 is followed (once) to the owner, a 200 body goes to
/// the strict checker (its violations are collected: see [`violations`]). The first status, and
/// whether it ended in a playlist that lists a segment.
async fn watch(http: &reqwest::Client, url: &str) -> (u16, bool) {
    let Ok(r) = http.get(url).send().await else {
        return (0, false);
    };
    let first = r.status().as_u16();
    let r = if first == 307 {
        let Some(to) = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
        else {
            return (first, false);
        };
        match http.get(&to).send().await {
            Ok(r) => r,
            Err(_) => return (first, false),
        }
    } else {
        r
    };
    if r.status().as_u16() != 200 {
        return (first, false);
    }
    let body = r.text().await.unwrap_or_default();
    let _ = farm_tests::hls::try_observe(url, &body);
    (first, body.contains("#EXTINF"))
}

/// Fails with what the strict checker found in the playlists [`watch`] fetched for `url`'s channel.
fn assert_rfc8216(url: &str) {
    let found = farm_tests::hls::observed_violations(url);
    assert!(
        found.is_empty(),
        "the viewer's playlists break RFC 8216:\n{}",
        found
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_redis_restart_with_aof_costs_nothing() {
    let mut f = farm(RedisServer::start_with_args(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ]))
    .await;
    let ([n1, n2], [co]) = (f.take_nodes(), f.take_coordinators());
    let mut c = f.redis.conn().await;
    let mut player = HlsClient::new(&format!("{}/live/watched/index.m3u8", n1.base_url()));
    player
        .pull(Duration::from_secs(2), Duration::from_secs(20))
        .await
        .expect("watched plays");
    wait_leader(&c).await;
    let before = owner(&mut c, "farm", "watched")
        .await
        .expect("watched runs");
    let pids = ffmpegs_for(n1.hls_root(), "watched");
    assert_eq!(pids.len(), 1);
    let mark = events(&mut c, "farm")
        .await
        .last()
        .map(|e| e.id.clone())
        .unwrap_or_default();
    drop(c);

    let pull = tokio::spawn(async move {
        player
            .pull(Duration::from_secs(10), Duration::from_secs(40))
            .await
    });
    let t0 = Instant::now();
    f.redis.restart();
    let down = t0.elapsed();
    let report = pull
        .await
        .expect("player task")
        .expect("the player kept playing across the restart");
    let mut c = f.redis.conn().await;
    println!("Redis restart with AOF: down {down:?}; player across it: {report:?}");
    assert_eq!(report.sequence_resets, 0, "{report:?}");
    assert_eq!(owner(&mut c, "farm", "watched").await, Some(before));
    assert_eq!(
        ffmpegs_for(n1.hls_root(), "watched"),
        pids,
        "FFmpeg replaced"
    );
    let ev = events(&mut c, "farm").await;
    let since: Vec<_> = ev.iter().filter(|e| e.id > mark).collect();
    assert!(
        since.iter().all(|e| !matches!(
            e.kind(),
            "stopped" | "started" | "reaped" | "node_dead" | "failover" | "failed" | "restarted"
        )),
        "a short Redis restart cost something: {since:?}"
    );
    f.assert_settled(&[&n1, &n2], "redis restart (AOF)").await;
    let _ = &co;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_redis_restart_losing_every_key_the_farm_rebuilds_itself_without_running_a_channel_twice(
) {
    let mut f = farm(RedisServer::start()).await;
    let ([n1, n2], [co]) = (f.take_nodes(), f.take_coordinators());
    let mut c = f.redis.conn().await;
    let http = no_redirects();
    assert_eq!(
        watch(&http, &format!("{}/live/watched/index.m3u8", n1.base_url())).await,
        (200, true)
    );
    wait_leader(&c).await;
    // The catalog as a replica or a backup would hold it.
    let mut catalog: Vec<(String, Vec<u8>)> = Vec::new();
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("farm:channel*")
        .query_async(&mut c)
        .await
        .expect("KEYS");
    keys.push("farm:pinned".into());
    for k in keys {
        let dump: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(&k)
            .query_async(&mut c)
            .await
            .expect("DUMP");
        if let Some(d) = dump {
            catalog.push((k, d));
        }
    }
    drop(c);

    // n1, the owner, is frozen across the restart so that n2, which runs nothing, is the first to
    // find Redis empty: the order in which an owner learns last, and the one that once let n2 claim
    // while n1's FFmpeg still ran (n2's heartbeat opened no recovery window because it ran nothing).
    n1.sigstop();
    let t0 = Instant::now();
    f.redis.restart();
    let mut c = f.redis.conn().await;
    let mut p = redis::pipe();
    for (k, d) in &catalog {
        p.cmd("RESTORE").arg(k).arg(0).arg(d.as_slice()).ignore();
    }
    let () = p.query_async(&mut c).await.expect("RESTORE catalog");
    let restored = t0.elapsed();
    wait_alive(
        &c,
        "n2",
        "n2 to heartbeat into the empty Redis",
        Duration::from_secs(10),
    )
    .await;
    let window: i64 = redis::cmd("PTTL")
        .arg("farm:recovering")
        .query_async(&mut c)
        .await
        .expect("PTTL");
    let url2 = format!("{}/live/watched/index.m3u8", n2.base_url());
    let first = status(&http, &url2).await;
    let claimed: Option<String> = c.get("farm:owner:watched").await.expect("GET owner");
    n1.sigcont();
    println!(
        "n2 heartbeated first after {:?}: recovery window {window} ms left, a viewer on n2 got {first}, owner {claimed:?}",
        t0.elapsed()
    );
    assert!(
        window > 0,
        "n2 found Redis empty but opened no recovery window (PTTL farm:recovering = {window})"
    );
    assert_eq!(
        first, 503,
        "n2 must not serve watched while n1 may still run it"
    );
    assert_eq!(
        claimed, None,
        "n2 claimed watched while n1's FFmpeg still ran"
    );

    // A viewer asks n2 every 50 ms while FFmpegs are sampled: n1's FFmpeg keeps running until n1
    // learns that its lease is gone; n2 must not start a second one meanwhile.
    let roots = [FarmNode::of(&n1).hls_root, FarmNode::of(&n2).hls_root];
    let viewer = tokio::spawn({
        let http = http.clone();
        let url2 = url2.clone();
        async move {
            let mut statuses: BTreeMap<u16, u32> = BTreeMap::new();
            while t0.elapsed() < Duration::from_secs(20) {
                let (s, served) = watch(&http, &url2).await;
                *statuses.entry(s).or_default() += 1;
                if served {
                    return (Some((t0.elapsed(), s)), statuses);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (None, statuses)
        }
    });
    let (mut samples, mut doubles, mut n1_fenced, mut rejoined, mut new_leader) =
        (0u32, 0u32, None, None, None);
    let mut double_seen: Vec<String> = Vec::new();
    while t0.elapsed() < Duration::from_secs(20) {
        samples += 1;
        let (p1, p2) = (
            ffmpegs_for(&roots[0], "watched"),
            ffmpegs_for(&roots[1], "watched"),
        );
        let (on1, on2) = (p1.len(), p2.len());
        let t = t0.elapsed();
        if on1 + on2 > 1 {
            doubles += 1;
            if double_seen.len() < 3 {
                double_seen.push(format!("at {t:?}: n1 {p1:?}, n2 {p2:?}"));
            }
        }
        if n1_fenced.is_none() && on1 == 0 {
            n1_fenced = Some(t);
        }
        if rejoined.is_none() {
            let a: bool = c.exists("farm:node:n1:alive").await.unwrap_or(false);
            let b: bool = c.exists("farm:node:n2:alive").await.unwrap_or(false);
            if a && b {
                rejoined = Some(t);
            }
        }
        if new_leader.is_none() && leader(&mut c, "farm").await.is_some() {
            new_leader = Some(t);
        }
        if viewer.is_finished() && n1_fenced.is_some() && rejoined.is_some() && t > NODE_TTL * 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (served_again, statuses) = viewer.await.expect("viewer task");
    println!(
        "Redis restart without persistence: catalog restored {restored:?} after the kill; nodes registered again after {rejoined:?}; \
leader again after {new_leader:?}; n1's old FFmpeg gone after {n1_fenced:?}; viewer on n2 served again after {served_again:?} ({statuses:?}); \
{doubles} of {samples} samples (every 50 ms) saw two FFmpegs: overlap {:.2}s {double_seen:?}",
        doubles as f64 * 0.05
    );

    // The command streams and their groups were lost too: a stop must still reach the owner.
    let (node, gen) = eventually_with(
        &c,
        "watched to run somewhere",
        Duration::from_secs(20),
        |mut c| async move {
            let o = owner(&mut c, "farm", "watched").await?;
            let state: Option<String> = c.hget("farm:stream:watched", "state").await.ok()?;
            (state.as_deref() == Some("running")).then_some(o)
        },
    )
    .await;
    let sent = Instant::now();
    send_stop(&mut c, &node, "watched", gen, &[("reason", "test")]).await;
    wait_unowned(
        &c,
        "watched",
        "the stop sent after the restart to take effect",
        Duration::from_secs(15),
    )
    .await;
    println!(
        "stop command on the recreated stream farm:cmd:{node} done in {:?}",
        sent.elapsed()
    );
    farmctl_ok(&f.redis.url(), &["start", "spare", "--wait"]);

    f.assert_settled(&[&n1, &n2], "redis restart (no persistence)")
        .await;
    assert!(
        served_again.is_some(),
        "the viewer never got the channel back"
    );
    assert_eq!(
        doubles, 0,
        "two FFmpegs ran for one channel after the Redis restart"
    );
    assert_rfc8216(&url2);
    let _ = &co;
}
