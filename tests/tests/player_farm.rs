//! The viewer never notices (promise 11): a real player — hls.js with its default configuration, in
//! headless Chromium, on a page of another origin, with no retry code — plays the demo channel of
//! `deploy/local/cluster --nodes 3` through its shipped nginx: from a cold start, through the death
//! (`kill -9`) of the node that owns the channel, and through a drain of that node.
//!
//! Each test asserts what the person watching would see: no fatal hls.js error, no fragment with a
//! lower sequence number loaded after a higher one, one target duration, playback advancing again
//! within `node_ttl + tick + 2 × hls_time` of a kill (the freeze is printed), and the strict
//! playlist checker finds nothing in any playlist the player loaded. Around the kill, a prober
//! requests the playlist through nginx every 50 ms: no answer may be a 5xx.

use farm_tests::launch::{LaunchPorts, Launched};
use farm_tests::player::{BrowserPlayer, PlayerReport};
use farm_tests::wait::eventually;
use redis::AsyncCommands;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NODE_TTL: Duration = Duration::from_secs(3);
const TICK: Duration = Duration::from_millis(500);
const HLS_TIME: Duration = Duration::from_secs(2);
const IDLE: Duration = Duration::from_secs(8);

/// A 3-node farm from the shipped launcher, with short TTLs so that a failover takes seconds.
struct Farm {
    launched: Launched,
    nginx: String,
    redis: redis::aio::MultiplexedConnection,
    _state: tempfile::TempDir,
}

impl Farm {
    async fn start() -> Farm {
        let state = tempfile::tempdir().expect("tempdir");
        let ports = LaunchPorts::free();
        let secs = |d: Duration| format!("{}ms", d.as_millis());
        // Read by the nodes and coordinators from the environment the launcher passes on.
        let env = [
            ("FARM_NODE_TTL", secs(NODE_TTL)),
            ("FARM_LEASE_TTL", secs(NODE_TTL)),
            ("FARM_LEADER_TTL", secs(NODE_TTL)),
            ("FARM_TICK", secs(TICK)),
            ("FARM_HLS_TIME", secs(HLS_TIME)),
            ("FARM_IDLE_TIMEOUT", secs(IDLE)),
        ];
        let launched = Launched::cluster(&ports, &env, state.path()).await;
        Farm {
            launched,
            nginx: ports.base_url(),
            redis: ports.redis().await,
            _state: state,
        }
    }

    /// A farm with a player that has played `secs` s of the demo.
    async fn watched_for(secs: u64) -> (Farm, BrowserPlayer) {
        let farm = Farm::start().await;
        let player = BrowserPlayer::start(&farm.demo()).await;
        player.wait_first_frame(Duration::from_secs(30)).await;
        player
            .wait_played(Duration::from_secs(secs), Duration::from_secs(60))
            .await;
        (farm, player)
    }

    fn demo(&self) -> String {
        format!("{}/live/demo/index.m3u8", self.nginx)
    }

    async fn owner(&self) -> Option<(String, u64)> {
        let mut r = self.redis.clone();
        let v: Option<String> = redis::cmd("GET")
            .arg("farm:owner:demo")
            .query_async(&mut r)
            .await
            .ok()?;
        let (node, gen) = v?
            .rsplit_once(':')
            .map(|(n, g)| (n.to_string(), g.to_string()))?;
        Some((node, gen.parse().ok()?))
    }

    async fn node_pid(&self, node: &str) -> i32 {
        let mut r = self.redis.clone();
        let pid: String = redis::cmd("HGET")
            .arg(format!("farm:node:{node}"))
            .arg("pid")
            .query_async(&mut r)
            .await
            .expect("node pid in redis");
        pid.parse().expect("pid")
    }

    /// Waits up to 30 s until the demo runs on a node other than `owner`, at a later generation
    /// than `gen`.
    async fn moved_from(&self, owner: &str, gen: u64) -> (String, u64) {
        eventually("the demo moves", Duration::from_secs(30), || async {
            self.owner().await.filter(|(n, g)| n != owner && *g > gen)
        })
        .await
    }

    async fn events(&self) -> Vec<BTreeMap<String, String>> {
        let mut r = self.redis.clone();
        let raw: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg("farm:events")
            .arg("-")
            .arg("+")
            .query_async(&mut r)
            .await
            .unwrap_or_default();
        raw.into_iter()
            .map(|(_, f)| f.into_iter().collect())
            .collect()
    }

    /// Every pid the launcher started, but `except`, is alive; and the launcher itself.
    fn assert_running_but(&self, except: &[i32]) {
        assert!(
            farm_tests::procs::pid_alive(self.launched.pid()),
            "the launcher died"
        );
        for (name, pid) in self.launched.pids() {
            if except.contains(&pid) {
                continue;
            }
            assert!(
                farm_tests::procs::pid_alive(pid),
                "{name} (pid {pid}) is not running"
            );
        }
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        let report = self.launched.sigterm_and_watch(Duration::from_secs(60));
        farm_tests::launch::assert_orderly_stop(&report, self.launched.state_dir());
    }
}

/// Requests the playlist through nginx every 50 ms and counts the statuses it gets.
struct Prober {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(Duration, u16)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Prober {
    fn start(url: String) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Vec<(Duration, u16)>>> = Arc::default();
        let (s, v) = (stop.clone(), seen.clone());
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("client");
            let t0 = Instant::now();
            let mut pace = tokio::time::interval(Duration::from_millis(50));
            while !s.load(Ordering::Acquire) {
                pace.tick().await;
                let status = match http.get(&url).send().await {
                    Ok(r) => {
                        let st = r.status().as_u16();
                        if let Ok(body) = r.text().await {
                            if st == 200 {
                                farm_tests::hls::observe(&url, &body);
                            }
                        }
                        st
                    }
                    Err(_) => 0,
                };
                v.lock().expect("lock").push((t0.elapsed(), status));
            }
        });
        Prober { stop, seen, task }
    }

    /// Stops probing; asserts that every playlist request through nginx `during` the disruption
    /// got a 200.
    async fn assert_all_200(self, during: &str) {
        self.stop.store(true, Ordering::Release);
        self.task.await.expect("prober");
        let mut statuses = BTreeMap::new();
        for (_, s) in self.seen.lock().expect("lock").iter() {
            *statuses.entry(*s).or_insert(0) += 1;
        }
        println!("playlist statuses through nginx {during}: {statuses:?}");
        assert!(
            statuses.keys().all(|s| *s == 200),
            "a playlist request through nginx got {statuses:?}"
        );
    }
}

fn print(label: &str, r: &PlayerReport) {
    println!("--- {label}\n{r}");
    for j in &r.backward_jumps {
        println!("  jumped back at {:?}: {:.3} -> {:.3}", j.at, j.from, j.to);
    }
    for j in &r.forward_jumps {
        println!("  skipped at {:?}: {:.3} -> {:.3}", j.at, j.from, j.to);
    }
    for (at, f) in &r.frags_loaded {
        println!(
            "  {at:?} frag sn {:?} cc {:?} start {:.3} dur {:.3} {}",
            f.sn,
            f.cc,
            f.start.unwrap_or(-1.0),
            f.duration.unwrap_or(-1.0),
            f.uri.as_deref().unwrap_or("")
        );
    }
    for (at, m) in &r.marks {
        println!("  {at:?} mark: {m}");
    }
}

/// What every scenario asserts of the player.
fn assert_player(r: &PlayerReport) {
    assert!(r.fatal_errors.is_empty(), "fatal hls.js errors: {r}");
    assert!(r.page_errors.is_empty(), "page errors: {r}");
    assert!(
        r.frags_out_of_order.is_empty(),
        "a fragment with a lower sequence number was loaded after a higher one: {r}"
    );
    assert!(
        r.backward_jumps.is_empty(),
        "the picture jumped back (media replayed): {r}"
    );
    assert_eq!(
        r.target_durations.len(),
        1,
        "the target duration changed: {:?}",
        r.target_durations
    );
    assert!(
        r.playlist_violations.is_empty(),
        "RFC 8216 violations in what the player loaded: {r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_plays_30_s_without_rebuffering() {
    let farm = Farm::start().await;
    let player = BrowserPlayer::start(&farm.demo()).await;
    let first = player.wait_first_frame(Duration::from_secs(30)).await;
    let ttff = first.first_frame.expect("a first frame");
    let r = player
        .wait_played(Duration::from_secs(30), Duration::from_secs(60))
        .await;
    print("cold start", &r);
    println!("cold start: first frame after {ttff:?}");
    assert_player(&r);
    assert!(
        r.rebuffers.is_empty() && r.freezes.is_empty(),
        "the picture stopped in the first 30 s of a cold start: rebuffers {:?}, freezes {:?}",
        r.rebuffers,
        r.freezes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_owner_node_the_player_rides_through() {
    let (farm, player) = Farm::watched_for(20).await;
    let (owner, gen) = farm.owner().await.expect("the demo runs");
    let pid = farm.node_pid(&owner).await;
    let prober = Prober::start(farm.demo());
    let before = player.report().played;

    player.mark(format!("kill -9 {owner} (pid {pid})"));
    let killed = Instant::now();
    farm_tests::signal::kill9(pid).expect("kill -9 the owner");
    // Playback advances again: currentTime moves past where it was when the last fragment of the
    // dead owner ran out, within the promised bound.
    let bound = NODE_TTL + TICK + HLS_TIME * 2;
    let moved = farm.moved_from(&owner, gen).await;
    println!(
        "the demo moved to {} (gen {}) after {:?}",
        moved.0,
        moved.1,
        killed.elapsed()
    );
    let r = player
        .wait_played(
            Duration::from_secs_f64(before + 15.0),
            Duration::from_secs(60),
        )
        .await;
    let freeze = r
        .freezes
        .iter()
        .filter(|f| f.start + f.length >= r.marks[0].0)
        .map(|f| f.length)
        .max()
        .unwrap_or_default();
    print("failover", &r);
    println!(
        "failover: the picture froze {freeze:?} (bound node_ttl + tick + 2 x hls_time = {bound:?}); played {:.1} s before the kill",
        before
    );
    prober.assert_all_200("around the kill").await;
    assert_player(&r);
    assert!(freeze <= bound, "froze {freeze:?}, bound {bound:?}");
    farm.assert_running_but(&[pid]);

    // The launcher restarts the killed node; the channel stays where it moved, and a viewer
    // requesting it through nginx keeps it alive for 2 x idle_timeout.
    let viewer_until = Instant::now() + IDLE * 2;
    let moved_to = farm.owner().await.expect("owned");
    while Instant::now() < viewer_until {
        let r = player.report();
        assert!(r.fatal_errors.is_empty(), "{r}");
        tokio::time::sleep(Duration::from_secs(1)).await; // the viewer's pace, not synchronisation
    }
    assert_eq!(
        farm.owner().await,
        Some(moved_to.clone()),
        "the channel was stopped or moved while watched"
    );
    let idle_stops: Vec<_> = farm
        .events()
        .await
        .into_iter()
        .filter(|e| e.get("event").map(String::as_str) == Some("stopped"))
        .filter(|e| e.get("reason").map(String::as_str) == Some("idle"))
        .collect();
    assert!(
        idle_stops.is_empty(),
        "idle stop of a watched channel: {idle_stops:?}"
    );
    let r = player.report();
    print("2 x idle_timeout after the failover", &r);
    assert_player(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_of_the_owner_node_the_player_rides_through() {
    let (farm, player) = Farm::watched_for(15).await;
    let (owner, gen) = farm.owner().await.expect("the demo runs");
    let prober = Prober::start(farm.demo());
    let before = player.report().played;
    player.mark(format!("drain {owner}"));
    let mut r = farm.redis.clone();
    let _: String = r
        .xadd(
            format!("farm:cmd:{owner}"),
            "*",
            &[("op", "drain"), ("by", "test")],
        )
        .await
        .expect("XADD drain");
    let moved = farm.moved_from(&owner, gen).await;
    println!("drained: the demo moved to {} (gen {})", moved.0, moved.1);
    let r = player
        .wait_played(
            Duration::from_secs_f64(before + 20.0),
            Duration::from_secs(60),
        )
        .await;
    print("drain", &r);
    prober.assert_all_200("during the drain").await;
    assert_player(&r);
    // Break before make: the old FFmpeg stops before the new owner's starts; viewers play from
    // their buffer meanwhile. When the new owner's first segment comes later than a player's
    // buffer lasts, the picture waits; it must move again within the bound of a failover.
    let freeze = r.freezes.iter().map(|f| f.length).max().unwrap_or_default();
    let bound = NODE_TTL + TICK + HLS_TIME * 2;
    println!("drain: longest freeze {freeze:?} (bound {bound:?})");
    assert!(
        freeze <= bound,
        "the picture stopped {freeze:?} during a drain"
    );
}
