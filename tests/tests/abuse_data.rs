//! Data errors are not outages: an operator's mistake in Redis — a key set with the wrong type, a
//! lease deleted by hand — touches at most the channel whose key it is, is replaced or reported,
//! and never shows a viewer Redis internals or lets a channel run twice.
//!
//! Each scenario runs while three watched channels are played on a 2-node farm (fake FFmpeg,
//! 500 ms segments) by player-like viewers, which must see no error and no gap, and whose owners
//! and gens must not change (nothing fenced).

use farm_tests::coordinator::{events, owner, CoordinatorOpts, CoordinatorProcess};
use farm_tests::farm::coordinator_args;
use farm_tests::fixtures::*;
use farm_tests::hls::HlsClient;
use farm_tests::node::NodeProcess;
use farm_tests::redis::RedisServer;
use farm_tests::wait::eventually;
use redis::AsyncCommands;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WATCHED: [&str; 3] = ["w1", "w2", "w3"];

struct Farm {
    redis: RedisServer,
    _root: tempfile::TempDir,
    nodes: Vec<NodeProcess>,
    _co: CoordinatorProcess,
    stop: Arc<AtomicBool>,
    viewers: Vec<tokio::task::JoinHandle<String>>,
    gens: Vec<(String, u64)>,
}

impl Farm {
    async fn start() -> Farm {
        let redis = RedisServer::start();
        let root = tempfile::tempdir().expect("tempdir");
        for id in WATCHED.iter().chain(["victim", "fresh"].iter()) {
            add_channel(
                &redis,
                id,
                &format!("http://127.0.0.1:9/{id}.ts?mode=normal&seg_ms=500"),
                &[],
            );
        }
        let nodes = vec![
            node(&redis, "n1", root.path(), true, &[]),
            node(&redis, "n2", root.path(), true, &[]),
        ];
        let co = CoordinatorProcess::spawn(CoordinatorOpts::new("co", redis.url()).args(
            coordinator_args(&[("--tick", "500ms"), ("--idle-timeout", "60s")], &[]),
        ));
        // Watched channels and the victim run on n1.
        for id in WATCHED.iter().chain(["victim"].iter()) {
            let url = format!("{}/live/{id}/index.m3u8", nodes[0].base_url());
            eventually(&format!("{id} plays"), Duration::from_secs(20), || async {
                (get(&url).await.status == 200).then_some(())
            })
            .await;
        }
        let mut c = redis.conn().await;
        let mut gens = Vec::new();
        for id in WATCHED {
            gens.push(owner(&mut c, "farm", id).await.expect("owned"));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let viewers = WATCHED
            .iter()
            .map(|id| {
                let url = format!("{}/live/{id}/index.m3u8", nodes[0].base_url());
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut hls = HlsClient::new(&url);
                    let mut problems = String::new();
                    while !stop.load(Ordering::Acquire) {
                        match hls
                            .pull(Duration::from_secs(2), Duration::from_secs(20))
                            .await
                        {
                            Ok(r) => {
                                if r.gaps > 0
                                    || r.failed_segments > 0
                                    || r.statuses_seen.keys().any(|s| *s != 200)
                                    || r.max_wall_gap_between_new_segments
                                        > Duration::from_millis(1500)
                                {
                                    problems.push_str(&format!("{r:?}\n"));
                                }
                            }
                            Err(e) => problems.push_str(&format!("pull failed: {e}\n")),
                        }
                    }
                    problems
                })
            })
            .collect();
        Farm {
            redis,
            _root: root,
            nodes,
            _co: co,
            stop,
            viewers,
            gens,
        }
    }

    /// Writes a string over `key` (the wrong type, as a lost write or an operator's redis-cli could
    /// leave it); the connection it used.
    async fn garbage_at(&self, key: &str) -> redis::aio::MultiplexedConnection {
        let mut c = self.conn().await;
        let _: () = c.set(key, "garbage").await.expect("SET");
        c
    }

    /// Waits (10 s) until `key`, overwritten with a string, is a hash again (`what` it is).
    async fn a_hash_again(&self, key: &str, what: &str) {
        let what = format!("{what} is a hash again");
        eventually(&what, Duration::from_secs(10), || async {
            let ty: String = redis::cmd("TYPE")
                .arg(key)
                .query_async(&mut self.conn().await)
                .await
                .ok()?;
            (ty == "hash").then_some(())
        })
        .await;
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.redis.conn().await
    }

    /// The watched channels played without a problem and nothing moved or was fenced
    /// (`fences_allowed`: the victim's own fence).
    async fn finish(self, fences_allowed: bool) {
        self.stop.store(true, Ordering::Release);
        for (v, id) in self.viewers.into_iter().zip(WATCHED) {
            let problems = v.await.expect("viewer");
            assert!(problems.is_empty(), "{id}'s viewer saw:\n{problems}");
        }
        let mut c = self.redis.conn().await;
        for (id, was) in WATCHED.iter().zip(&self.gens) {
            assert_eq!(
                owner(&mut c, "farm", id).await.as_ref(),
                Some(was),
                "{id} moved or restarted"
            );
        }
        let fenced: Vec<_> = events(&mut c, "farm")
            .await
            .into_iter()
            .filter(|e| e.kind() == "stopped" && e.get("channel") != "victim")
            .map(|e| format!("{} {}", e.get("channel"), e.get("reason")))
            .collect();
        assert!(fenced.is_empty(), "channels stopped: {fenced:?}");
        for n in &self.nodes {
            let fences = metric(n, "farm_node_channel_stops_total{reason=\"fenced\"}").await;
            assert!(
                fences == 0.0 || fences_allowed && fences == 1.0,
                "{} fenced {fences} channels",
                n.node_id()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_typed_stream_hash_touches_only_its_channel_and_is_replaced() {
    let farm = Farm::start().await;
    let mut c = farm.garbage_at("farm:stream:victim").await;
    let (_, victim_gen) = owner(&mut c, "farm", "victim").await.expect("victim runs");
    // The owner's next write replaces it (stream_set.lua); the keepalive renews every channel.
    farm.a_hash_again("farm:stream:victim", "the victim's stream hash")
        .await;
    // Keep watching a few keepalive intervals.
    tokio::time::sleep(Duration::from_secs(3)).await; // viewer time
    assert_eq!(
        owner(&mut c, "farm", "victim").await.map(|o| o.1),
        Some(victim_gen),
        "the victim itself kept running"
    );
    farm.finish(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_typed_access_zset_is_replaced_and_starts_go_on_meanwhile() {
    let farm = Farm::start().await;
    let mut c = farm.garbage_at("farm:access").await;
    // A new start meanwhile works, and its viewer sees no Redis internals.
    let r = get(&format!(
        "{}/live/fresh/index.m3u8",
        farm.nodes[1].base_url()
    ))
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let repaired = eventually(
        "the coordinator replaces farm:access",
        Duration::from_secs(10),
        || async {
            let mut c = farm.conn().await;
            events(&mut c, "farm")
                .await
                .into_iter()
                .find(|e| e.kind() == "key_repaired" && e.get("key") == "farm:access")
        },
    )
    .await;
    println!(
        "repaired: found {} wanted {}",
        repaired.get("found"),
        repaired.get("wanted")
    );
    // Access is recorded again.
    let t0: (u64, u64) = redis::cmd("TIME").query_async(&mut c).await.expect("TIME");
    let t0 = t0.0 * 1000;
    eventually("access recorded again", Duration::from_secs(10), || async {
        zscore(&farm.redis, "farm:access", "w1")
            .await
            .filter(|s| *s as u64 >= t0)
    })
    .await;
    farm.finish(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_typed_node_hash_is_replaced_by_its_heartbeat() {
    let farm = Farm::start().await;
    farm.garbage_at("farm:node:n1").await;
    farm.a_hash_again("farm:node:n1", "n1's hash").await;
    assert!(metric(&farm.nodes[0], "farm_node_data_errors_total").await >= 1.0);
    tokio::time::sleep(Duration::from_secs(3)).await; // viewer time
    farm.finish(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_deleted_by_hand_never_lets_the_channel_run_twice() {
    let farm = Farm::start().await;
    let mut c = farm.conn().await;
    let root_n1 = farm.nodes[0].hls_root().to_path_buf();
    let root_n2 = farm.nodes[1].hls_root().to_path_buf();
    let victims = |root: &std::path::Path| {
        ffmpegs_under(&root.join("victim")).len()
            + ffmpegs_under(root)
                .into_iter()
                .filter(|p| farm_tests::procs::cmdline(*p).is_some_and(|l| l.contains("/victim/")))
                .count()
    };
    let _: () = c.del("farm:owner:victim").await.expect("DEL");
    let t0 = Instant::now();
    // A viewer asks n2 for it at once and keeps asking: n2 must not start it while n1 may still run it.
    let url = format!("{}/live/victim/index.m3u8", farm.nodes[1].base_url());
    let mut worst = 0;
    let mut samples = 0;
    let mut statuses = std::collections::BTreeMap::new();
    while t0.elapsed() < Duration::from_secs(6) {
        let r = get(&url).await;
        *statuses.entry(r.status).or_insert(0) += 1;
        let both = (victims(&root_n1) > 0) as usize + (victims(&root_n2) > 0) as usize;
        worst = worst.max(both);
        samples += 1;
        tokio::time::sleep(Duration::from_millis(50)).await; // sampling period
    }
    println!(
        "DEL farm:owner:victim: {samples} samples every 50 ms, at most {worst} node(s) running it; n2's answers {statuses:?}"
    );
    assert!(worst <= 1, "the victim ran on two nodes at once");
    let now = owner(&mut c, "farm", "victim").await;
    println!("victim owned by {now:?} afterwards");
    assert!(now.is_some(), "the victim runs again somewhere");
    farm.finish(true).await;
}
