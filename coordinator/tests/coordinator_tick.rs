//! The coordinator's decisions, driven step by step ([`Coordinator::campaign`], [`Coordinator::tick`])
//! against a real redis-server with hand-made farm state: leadership and fencing, idle cleanup,
//! dead-node reaping with failover, the safety refusals, stale-key reconciliation, and the tick-cost
//! benchmark (1k / 10k / 100k channels, 1 % idle).

use farm_coordinator::config::Config;
use farm_coordinator::leader::Campaign;
use farm_coordinator::tick::TickError;
use farm_coordinator::Coordinator;
use farm_tests::coordinator::{events, FarmEvent};
use farm_tests::redis::RedisServer;
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn config(redis: &RedisServer, id: &str) -> Config {
    let mut cfg = Config::new(redis.url(), id);
    cfg.reap_settle = Duration::ZERO;
    cfg.leader_ttl = Duration::from_secs(5);
    cfg
}

async fn leader(cfg: Config) -> Coordinator {
    let c = Coordinator::new(cfg).expect("coordinator");
    assert_eq!(
        c.campaign().await.expect("campaign"),
        Campaign::Leading { fresh: true }
    );
    c
}

/// A fresh Redis, a connection to it, coordinator `c1` leading it, and Redis's time.
async fn leading() -> (RedisServer, MultiplexedConnection, Coordinator, u64) {
    let redis = RedisServer::start();
    let mut c = redis.conn().await;
    let co = leader(config(&redis, "c1")).await;
    let now = redis_now(&mut c).await;
    (redis, c, co, now)
}

async fn redis_now(c: &mut MultiplexedConnection) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(c).await.expect("TIME");
    s * 1000 + us / 1000
}

/// A node as its keepalive leaves it: hash, alive key (when `alive`), zset score = heartbeat.
async fn node(
    c: &mut MultiplexedConnection,
    id: &str,
    heartbeat: u64,
    alive: bool,
    capacity: u64,
    running: u64,
) {
    let _: () = redis::pipe()
        .hset_multiple(
            format!("farm:node:{id}"),
            &[
                ("capacity", capacity.to_string()),
                ("running", running.to_string()),
                ("public_url", format!("http://{id}")),
            ],
        )
        .zadd("farm:nodes", id, heartbeat)
        .query_async(c)
        .await
        .expect("seed node");
    if alive {
        let _: () = c
            .set_ex(format!("farm:node:{id}:alive"), "inc", 60)
            .await
            .expect("alive");
    }
}

/// A channel as claim.lua leaves it (owner lease, set entry, stream hash, access score).
async fn running(c: &mut MultiplexedConnection, id: &str, node: &str, gen: u64, access: u64) {
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(format!("farm:owner:{id}"))
        .arg(format!("{node}:{gen}"))
        .arg("PX")
        .arg(60_000)
        .sadd(format!("farm:node:{node}:streams"), id)
        .hset_multiple(
            format!("farm:stream:{id}"),
            &[
                ("node", node.to_string()),
                ("gen", gen.to_string()),
                ("state", "running".into()),
            ],
        )
        .zadd("farm:access", id, access)
        .query_async(c)
        .await
        .expect("seed channel");
}

async fn commands(c: &mut MultiplexedConnection, node: &str) -> Vec<HashMap<String, String>> {
    let reply: redis::streams::StreamRangeReply = c
        .xrange_all(format!("farm:cmd:{node}"))
        .await
        .expect("XRANGE");
    reply
        .ids
        .into_iter()
        .map(|e| {
            e.map
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        redis::from_redis_value::<String>(v.clone()).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .collect()
}

async fn exists(c: &mut MultiplexedConnection, key: &str) -> bool {
    c.exists(key).await.expect("EXISTS")
}

fn of_kind<'a>(evs: &'a [FarmEvent], kind: &str) -> Vec<&'a FarmEvent> {
    evs.iter().filter(|e| e.kind() == kind).collect()
}

#[tokio::test]
async fn coordinator_leadership_is_exclusive_and_a_deposed_leader_cannot_write() {
    let redis = RedisServer::start();
    let mut c = redis.conn().await;
    let mut c1 = leader(config(&redis, "c1")).await;
    let c2 = Coordinator::new(config(&redis, "c2")).expect("coordinator");
    match c2.campaign().await.expect("campaign") {
        Campaign::Following { retry_in } => assert!(retry_in <= Duration::from_secs(5)),
        other => panic!("c2 must follow, got {other:?}"),
    }
    assert_eq!(
        c1.campaign().await.expect("renew"),
        Campaign::Leading { fresh: false }
    );
    let v: String = c.get("farm:leader").await.expect("GET");
    assert_eq!(v, "c1:1");

    // An idle channel the leader would stop.
    let now = redis_now(&mut c).await;
    node(&mut c, "n1", now, true, 10, 1).await;
    running(&mut c, "old", "n1", 3, now - 3_600_000).await;

    // c1's lease is lost (as if it had been frozen past the TTL); c2 takes over with a new epoch.
    let _: () = c.del("farm:leader").await.expect("DEL");
    assert_eq!(
        c2.campaign().await.expect("campaign"),
        Campaign::Leading { fresh: true }
    );
    // c1 still believes it leads: its tick reaches the fenced script, which refuses.
    let r = c1.tick().await;
    assert!(matches!(r, Err(TickError::NotLeader)), "{r:?}");
    assert!(
        commands(&mut c, "n1").await.is_empty(),
        "a deposed leader wrote a command"
    );
    assert!(c1.shared().leadership().leading(Instant::now()).is_none());
    // And it does not get the lease back by renewing.
    assert!(matches!(
        c1.campaign().await.expect("campaign"),
        Campaign::Following { .. }
    ));

    let evs = events(&mut c, "farm").await;
    let changes = of_kind(&evs, "leader_changed");
    assert_eq!(changes.len(), 2, "{evs:?}");
    assert_eq!(changes[0].get("coordinator"), "c1");
    assert_eq!(changes[1].get("coordinator"), "c2");
    assert_eq!(changes[1].get("epoch"), "2");

    // Graceful resign gives the lease up by compare; a resign by the non-holder changes nothing.
    c1.resign().await;
    let v: String = c.get("farm:leader").await.expect("GET");
    assert_eq!(v, "c2:2");
    c2.resign().await;
    assert!(!exists(&mut c, "farm:leader").await);
}

#[tokio::test]
async fn coordinator_idle_cleanup_stops_idle_owned_channels_once_per_gen() {
    let (_redis, mut c, mut co, now) = leading().await;
    let old = now - 3_600_000;
    node(&mut c, "n1", now, true, 10, 3).await;
    running(&mut c, "idle1", "n1", 5, old).await;
    running(&mut c, "pinned1", "n1", 2, old).await;
    let _: () = c
        .hset("farm:channel:pinned1", "pinned", "1")
        .await
        .expect("HSET");
    running(&mut c, "fresh1", "n1", 3, now).await;
    let _: () = c.zadd("farm:access", "orphan", old).await.expect("ZADD");

    let r = co.tick().await.expect("tick");
    assert!(r.leading, "{r:?}");
    assert_eq!(
        (r.idle_seen, r.idle_stops, r.stale_access),
        (3, 1, 1),
        "{r:?}"
    );
    let cmds = commands(&mut c, "n1").await;
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    let stop = &cmds[0];
    assert_eq!(stop["op"], "stop");
    assert_eq!(stop["channel"], "idle1");
    assert_eq!(stop["gen"], "5");
    assert_eq!(stop["reason"], "idle");
    assert_eq!(stop["by"], "coordinator:c1");
    let orphan: Option<f64> = c.zscore("farm:access", "orphan").await.expect("ZSCORE");
    assert_eq!(
        orphan, None,
        "the access entry of a channel nobody owns is dropped"
    );

    // The stop is in flight: not sent again.
    let r = co.tick().await.expect("tick");
    assert_eq!(r.idle_stops, 0, "{r:?}");
    assert_eq!(commands(&mut c, "n1").await.len(), 1);

    // A new run of the channel (new gen) that is idle again gets its own stop.
    let _: () = c.set("farm:owner:idle1", "n1:6").await.expect("SET");
    let r = co.tick().await.expect("tick");
    assert_eq!(r.idle_stops, 1, "{r:?}");
    let cmds = commands(&mut c, "n1").await;
    assert_eq!(cmds.last().map(|m| m["gen"].as_str()), Some("6"));

    let evs = events(&mut c, "farm").await;
    let reaped = of_kind(&evs, "reaped");
    assert_eq!(reaped.len(), 1, "{evs:?}");
    assert_eq!(reaped[0].get("channel"), "orphan");
    assert_eq!(reaped[0].get("reason"), "stale_access");
    let metrics = co.shared().metrics.render();
    assert!(
        metrics.contains("farm_coordinator_idle_stops_total 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn coordinator_reaps_a_dead_node_and_rehomes_its_watched_and_pinned_channels() {
    let (_redis, mut c, mut co, now) = leading().await;
    node(&mut c, "n1", now - 60_000, false, 10, 4).await;
    node(&mut c, "n2", now, true, 10, 1).await;
    node(&mut c, "n3", now, true, 10, 5).await;
    running(&mut c, "watched", "n1", 4, now - 1000).await;
    running(&mut c, "unwatched", "n1", 7, now - 3_600_000).await;
    running(&mut c, "pinned", "n1", 2, now - 3_600_000).await;
    let _: () = c
        .del("farm:owner:pinned")
        .await
        .expect("lease expired already");
    let _: () = c
        .hset("farm:channel:pinned", "pinned", "1")
        .await
        .expect("HSET");
    running(&mut c, "moved", "n2", 9, now).await;
    let _: () = c.sadd("farm:node:n1:streams", "moved").await.expect("SADD");
    let _: () = redis::cmd("XADD")
        .arg("farm:cmd:n1")
        .arg("*")
        .arg("op")
        .arg("stop")
        .arg("channel")
        .arg("watched")
        .query_async(&mut c)
        .await
        .expect("XADD");

    let r = co.tick().await.expect("tick");
    assert_eq!(
        (r.nodes_dead, r.nodes_reaped, r.channels_reaped, r.rehomed),
        (1, 1, 4, 2),
        "{r:?}"
    );

    for key in [
        "farm:node:n1",
        "farm:node:n1:alive",
        "farm:node:n1:streams",
        "farm:cmd:n1",
        "farm:owner:watched",
        "farm:owner:unwatched",
        "farm:stream:watched",
        "farm:stream:unwatched",
        "farm:stream:pinned",
    ] {
        assert!(!exists(&mut c, key).await, "{key} survived the reap");
    }
    let members: Vec<String> = c.zrange("farm:nodes", 0, -1).await.expect("ZRANGE");
    assert_eq!(members, ["n2", "n3"]);
    // Another node's channel is left alone.
    let moved: String = c.get("farm:owner:moved").await.expect("GET");
    assert_eq!(moved, "n2:9");
    assert!(exists(&mut c, "farm:stream:moved").await);
    // Access: kept for others' channels, dropped for the dead node's (the re-homed watched one too:
    // its new owner's claim stamps it, and a refused re-home leaves nothing behind). (The pinned
    // one had no lease left, so idle cleanup already dropped its old entry.)
    for (id, kept) in [("watched", false), ("moved", true), ("unwatched", false)] {
        let s: Option<f64> = c.zscore("farm:access", id).await.expect("ZSCORE");
        assert_eq!(s.is_some(), kept, "access of {id}");
    }
    // Re-homed to the node with the most room (n2: 9 free, then 8, still above n3's 5).
    let starts = commands(&mut c, "n2").await;
    let mut started: Vec<&str> = starts.iter().map(|m| m["channel"].as_str()).collect();
    started.sort();
    assert_eq!(started, ["pinned", "watched"], "{starts:?}");
    assert!(starts
        .iter()
        .all(|m| m["op"] == "start" && m["reason"] == "failover"));
    assert!(commands(&mut c, "n3").await.is_empty());

    let evs = events(&mut c, "farm").await;
    assert_eq!(of_kind(&evs, "node_dead").len(), 1, "{evs:?}");
    assert_eq!(of_kind(&evs, "node_dead")[0].get("node"), "n1");
    let reaped: Vec<_> = of_kind(&evs, "reaped")
        .into_iter()
        .filter(|e| e.get("reason") == "node_dead")
        .collect();
    assert_eq!(reaped.len(), 5, "4 channels and the node: {evs:?}");
    assert!(reaped.iter().all(|e| e.get("node") == "n1"));
    let failovers = of_kind(&evs, "failover");
    assert_eq!(failovers.len(), 2);
    let w = failovers
        .iter()
        .find(|e| e.get("channel") == "watched")
        .expect("failover of watched");
    assert_eq!(
        (w.get("from"), w.get("node"), w.get("gen")),
        ("n1", "n2", "4")
    );

    // Nothing left to do.
    let r = co.tick().await.expect("tick");
    assert_eq!(
        (r.nodes_dead, r.channels_reaped, r.rehomed),
        (0, 0, 0),
        "{r:?}"
    );
}

#[tokio::test]
async fn coordinator_refuses_to_reap_when_most_nodes_look_dead_or_while_settling() {
    let redis = RedisServer::start();
    let mut c = redis.conn().await;
    let now = redis_now(&mut c).await;
    node(&mut c, "n1", now - 60_000, false, 10, 1).await;
    node(&mut c, "n2", now - 60_000, false, 10, 1).await;
    node(&mut c, "n3", now, true, 10, 1).await;
    running(&mut c, "a", "n1", 1, now).await;

    let mut co = leader(config(&redis, "c1")).await;
    let r = co.tick().await.expect("tick");
    assert_eq!((r.nodes_dead, r.nodes_reaped), (2, 0), "{r:?}");
    assert_eq!(r.held, Some("many_dead"));
    assert!(exists(&mut c, "farm:node:n1").await && exists(&mut c, "farm:owner:a").await);
    assert!(co
        .shared()
        .metrics
        .render()
        .contains("farm_coordinator_reaps_refused_total{reason=\"many_dead\"} 1"));

    // One dead of three is reapable, but a new leader first waits its settle time.
    let _: () = c.del("farm:node:n2").await.expect("DEL");
    let _: () = c.zadd("farm:nodes", "n2", now).await.expect("ZADD");
    let _: () = c.set_ex("farm:node:n2:alive", "x", 60).await.expect("SET");
    co.resign().await;
    let mut cfg = config(&redis, "c2");
    cfg.reap_settle = Duration::from_secs(30);
    let mut co = leader(cfg).await;
    let r = co.tick().await.expect("tick");
    assert_eq!(r.held, Some("new_leader"), "{r:?}");
    assert!(exists(&mut c, "farm:node:n1").await);
}

#[tokio::test]
async fn coordinator_reconciles_stale_stream_hashes_and_set_entries() {
    let (_redis, mut c, mut co, now) = leading().await;
    node(&mut c, "n1", now, true, 10, 3).await;
    node(&mut c, "n2", now, true, 10, 1).await;
    running(&mut c, "mine", "n1", 1, now).await;
    // Fenced: the lease expired, the node touched nothing.
    running(&mut c, "gone", "n1", 2, now).await;
    let _: () = c.del("farm:owner:gone").await.expect("DEL");
    // Another node owns it now; n1's set entry is stale.
    running(&mut c, "other", "n2", 3, now).await;
    let _: () = c.sadd("farm:node:n1:streams", "other").await.expect("SADD");
    // Left by a node that is no longer in the farm.
    let _: () = redis::pipe()
        .hset("farm:stream:ghostch", "node", "ghost")
        .zadd("farm:access", "ghostch", now)
        .query_async(&mut c)
        .await
        .expect("seed");
    // A failed channel keeps its hash for a while (it has a TTL): not stale.
    let _: () = redis::pipe()
        .hset("farm:stream:failedch", "node", "n1")
        .hset("farm:stream:failedch", "state", "failed")
        .pexpire("farm:stream:failedch", 600_000)
        .zadd("farm:access", "failedch", now)
        .query_async(&mut c)
        .await
        .expect("seed");

    let r = co.tick().await.expect("tick");
    assert_eq!(r.reconciled, 3, "{r:?}");
    let n1: Vec<String> = c.smembers("farm:node:n1:streams").await.expect("SMEMBERS");
    assert_eq!(n1, ["mine"]);
    assert!(!exists(&mut c, "farm:stream:gone").await);
    assert!(!exists(&mut c, "farm:stream:ghostch").await);
    for key in [
        "farm:stream:mine",
        "farm:stream:other",
        "farm:stream:failedch",
        "farm:owner:other",
    ] {
        assert!(exists(&mut c, key).await, "{key} must stay");
    }
    let evs = events(&mut c, "farm").await;
    let mut reasons: Vec<(String, String)> = of_kind(&evs, "reaped")
        .iter()
        .map(|e| (e.get("channel").to_string(), e.get("reason").to_string()))
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            ("ghostch".to_string(), "no_lease".to_string()),
            ("gone".to_string(), "no_lease".to_string()),
            ("other".to_string(), "not_owner".to_string()),
        ]
    );
    let r = co.tick().await.expect("tick");
    assert_eq!(r.reconciled, 0, "{r:?}");
}

/// Seeds `n` running channels on two nodes, 1 % of them idle.
async fn seed_farm(
    c: &mut MultiplexedConnection,
    n: usize,
    now: u64,
    idle_timeout_ms: u64,
) -> Vec<String> {
    let _: () = redis::cmd("FLUSHALL")
        .query_async(c)
        .await
        .expect("FLUSHALL");
    node(c, "n1", now, true, 0, (n / 2) as u64).await;
    node(c, "n2", now, true, 0, (n / 2) as u64).await;
    farm_tests::coordinator::seed_running_channels(c, n, now, idle_timeout_ms, &[])
        .await
        .expect("seed channels")
}

/// Tick cost with 1k, 10k and 100k channels, 1 % idle: the first tick (which sends the stops) and
/// the steady state once the nodes have stopped them. Asserts on the median of seven steady ticks
/// that 100k channels cost at most 3 × the 1k tick (`tick_ratio_100k_1k`) and stay under a
/// debug-build ceiling; the benchmark measures both goals with the release binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_tick_cost_grows_with_idle_channels_not_with_all_channels() {
    let redis = RedisServer::start();
    let mut c = redis.conn().await;
    let mut cfg = config(&redis, "bench");
    cfg.idle_timeout = Duration::from_secs(60);
    let idle_ms = cfg.idle_timeout.as_millis() as u64;
    let mut figures = Vec::new();
    for n in [1_000usize, 10_000, 100_000] {
        let now = redis_now(&mut c).await;
        let seeding = Instant::now();
        let idle = seed_farm(&mut c, n, now, idle_ms).await;
        let seed_time = seeding.elapsed();
        let mut co = leader(cfg.clone()).await;
        let t = Instant::now();
        let r = co.tick().await.expect("tick");
        let first = t.elapsed();
        assert_eq!(r.idle_stops, n / 100, "{r:?}");
        assert_eq!((r.reconciled, r.channels_reaped), (0, 0), "{r:?}");
        // The nodes stop them: release.lua's effect.
        farm_tests::coordinator::release_channels(&mut c, &idle)
            .await
            .expect("release");
        let mut steady = Vec::new();
        for _ in 0..7 {
            let t = Instant::now();
            let r = co.tick().await.expect("tick");
            steady.push(t.elapsed());
            assert_eq!((r.idle_stops, r.reconciled), (0, 0), "{r:?}");
        }
        steady.sort();
        let median = steady[steady.len() / 2];
        println!(
            "tick cost, {n} channels ({} idle): first tick (sends the stops) {first:?}, steady median {median:?} (min {:?}, max {:?}); seeding took {seed_time:?}",
            idle.len(),
            steady[0],
            steady[steady.len() - 1]
        );
        figures.push((n, first, median));
        co.resign().await;
    }
    let (_, _, base) = figures[0];
    let (_, _, big) = figures[2];
    println!(
        "steady tick cost 100k / 1k = {:.2} (target <= 3), 100k steady = {big:?} (goal 5 ms in farm-bench, release build)",
        big.as_secs_f64() / base.as_secs_f64().max(1e-9)
    );
    // The absolute goal (tick_ms_100k <= 5 ms) is farm-bench's, on the release binary; this debug
    // build on a shared CI machine measured 3-9 ms. The ceiling here catches a tick that walks
    // every channel (tens of ms at 100k even in release), not noise.
    assert!(
        big <= Duration::from_millis(30),
        "a steady tick over 100k channels took {big:?} (debug-build ceiling 30 ms; goal tick_ms_100k <= 5 ms in farm-bench)"
    );
    assert!(
        big.as_secs_f64() <= 3.0 * base.as_secs_f64(),
        "a steady tick over 100k channels took {big:?}, 1k {base:?} (goal tick_ratio_100k_1k <= 3)"
    );
}
