//! The leading coordinator killed in the middle of its idle cleanup (promise 3 and 9): 40 channels
//! go idle at once on two nodes with the fake FFmpeg; two coordinators with `--max-idle-stops 8`,
//! so the cleanup takes several ticks; idle timeout 3 s, tick 500 ms, leader TTL 3 s.
//!
//! As soon as the leader has sent its first stops it gets `kill -9`. The other coordinator takes
//! over within the leader TTL and finishes the cleanup: every channel is stopped exactly once (one
//! `stopped` event per channel), and the checker finds nothing left.

use farm_tests::coordinator::{
    events, fake_source, farmctl_ok, wait_leader, wait_new_leader, CoordinatorProcess,
};
use farm_tests::farm::Farm;
use farm_tests::invariants::{self, settle_time, FarmNode};
use farm_tests::node::NodeProcess;
use farm_tests::wait::{eventually, eventually_with};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const CHANNELS: usize = 40;
const LEADER_TTL: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_leader_killed_mid_cleanup_the_next_one_finishes_it_and_nothing_stops_twice() {
    let farm = Farm::builder()
        .fake_ffmpeg()
        .coordinator_value("--idle-timeout", "3s")
        .coordinator_value("--tick", "500ms")
        .coordinator_args(&["--max-idle-stops", "8"])
        .start()
        .await;
    let (redis, root, url) = (&farm.redis, &farm.root, farm.url());
    let mut m3u = String::from("#EXTM3U\n");
    for i in 0..CHANNELS {
        m3u.push_str(&format!(
            "#EXTINF:-1 tvg-id=\"i{i}\",Idle {i}\n{}\n",
            fake_source(&format!("i{i}"), 500)
        ));
    }
    let m3u_path = root.path().join("idle.m3u");
    std::fs::write(&m3u_path, m3u).expect("write m3u");
    farmctl_ok(&url, &["import", &m3u_path.to_string_lossy()]);
    let nodes: Vec<NodeProcess> = ["n1", "n2"].map(|id| farm.spawn_node(id)).into();
    let mut coords: BTreeMap<String, CoordinatorProcess> = ["c1", "c2"]
        .map(|id| (id.to_string(), farm.spawn_coordinator(id)))
        .into();
    let mut c = redis.conn().await;
    let first = wait_leader(&c).await;

    // All channels start within a moment of each other (and nobody watches them afterwards).
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client");
    let mut starts = tokio::task::JoinSet::new();
    for i in 0..CHANNELS {
        let url = format!("{}/live/i{i}/index.m3u8", nodes[i % 2].base_url());
        let http = http.clone();
        starts.spawn(async move {
            let r = http.get(&url).send().await?;
            let status = r.status().as_u16();
            let body = r.text().await?;
            if status == 200 {
                farm_tests::hls::observe(&url, &body);
            }
            Ok::<u16, reqwest::Error>(status)
        });
    }
    while let Some(r) = starts.join_next().await {
        assert_eq!(r.expect("join").expect("GET"), 200);
    }

    // Kill the leader right after it has sent its first batch of stops.
    let lead = coords.get(&first).expect("leader process");
    let sent = eventually(
        "the leader's first idle stops",
        Duration::from_secs(20),
        || async {
            let n = lead.metric("farm_coordinator_idle_stops_total");
            (n >= 1.0).then_some(n)
        },
    )
    .await;
    coords.get_mut(&first).expect("leader").kill9();
    let killed = Instant::now();
    let second = wait_new_leader(&c, &first).await;
    let took_over = killed.elapsed();
    eventually_with(
        &c,
        "every channel stopped",
        Duration::from_secs(30),
        |mut c| async move {
            let owned: usize = redis::cmd("EVAL")
                .arg("return #redis.call('KEYS', 'farm:owner:*')")
                .arg(0)
                .query_async(&mut c)
                .await
                .ok()?;
            (owned == 0).then_some(())
        },
    )
    .await;
    let all_stopped = killed.elapsed();
    let mut stops: BTreeMap<String, usize> = BTreeMap::new();
    for e in events(&mut c, "farm").await {
        if e.kind() == "stopped" {
            assert_eq!(e.get("reason"), "idle", "{e:?}");
            *stops.entry(e.get("channel").to_string()).or_default() += 1;
        }
    }
    let twice: Vec<_> = stops.iter().filter(|(_, n)| **n > 1).collect();
    let second_stops = coords
        .get(&second)
        .expect("new leader")
        .metric("farm_coordinator_idle_stops_total");
    println!(
        "leader {first} killed after {sent} idle stops; {second} led {took_over:?} later (leader TTL {LEADER_TTL:?}) and sent {second_stops}; \
all {CHANNELS} channels stopped {all_stopped:?} after the kill; channels stopped twice: {twice:?}"
    );
    assert!(
        took_over <= LEADER_TTL + Duration::from_millis(500),
        "{took_over:?}"
    );
    assert_eq!(stops.len(), CHANNELS, "{stops:?}");
    assert!(twice.is_empty(), "stopped twice: {twice:?}");
    let report = invariants::check(
        redis,
        &nodes.iter().map(FarmNode::of).collect::<Vec<_>>(),
        settle_time(Duration::from_secs(3), Duration::from_millis(500)),
    )
    .await;
    println!("leader kill: {}", report.figure());
    report.assert_clean();
}
