//! Leadership end to end: three farm-coordinators (leader TTL 3 s) over two nodes with the fake
//! FFmpeg. kill -9 of the leader: another leads within the leader TTL, idle cleanup goes on under
//! the new leader, and the events show no channel stopped twice. A graceful stop hands over at once.

use farm_tests::coordinator::{
    events, fake_source, farmctl_ok, leader, wait_leader, wait_new_leader, wait_unowned,
    CoordinatorProcess,
};
use farm_tests::farm::Farm;
use farm_tests::node::NodeProcess;
use farm_tests::wait::eventually;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const LEADER_TTL: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_leader_killed_another_leads_within_the_ttl_and_nothing_stops_twice() {
    let channels = ["a1", "a2", "b1", "b2", "b3"];
    let mut farm = channels
        .iter()
        .fold(Farm::builder(), |f, ch| f.channel(ch, fake_source(ch, 500)))
        .nodes(&["n1", "n2"])
        .fake_ffmpeg()
        .coordinators(&["c1", "c2", "c3"])
        .coordinator_value("--idle-timeout", "3s")
        .coordinator_value("--tick", "500ms")
        .start()
        .await;
    let _nodes = farm.take_nodes::<2>();
    let mut coords: HashMap<String, CoordinatorProcess> = farm
        .take_coordinators::<3>()
        .into_iter()
        .map(|co| (co.id().to_string(), co))
        .collect();
    let (redis, url) = (&farm.redis, farm.url());
    let mut c = redis.conn().await;
    let first = wait_leader(&c).await;
    eventually(
        "exactly one coordinator to report is_leader",
        Duration::from_secs(5),
        || async {
            let leading: Vec<&String> = coords
                .iter()
                .filter(|(_, p)| p.metric("farm_coordinator_is_leader") == 1.0)
                .map(|(id, _)| id)
                .collect();
            (leading == [&first]).then_some(())
        },
    )
    .await;

    // The first leader stops a1, a2 (started, never watched).
    for ch in ["a1", "a2"] {
        farmctl_ok(&url, &["start", ch, "--wait"]);
    }
    for ch in ["a1", "a2"] {
        let what = format!("{ch} to be stopped by the first leader");
        wait_unowned(&c, ch, &what, Duration::from_secs(15)).await;
    }

    // b1..b3 start, then the leader dies before they are idle.
    for ch in ["b1", "b2", "b3"] {
        farmctl_ok(&url, &["start", ch, "--wait"]);
    }
    coords.get_mut(&first).expect("leader process").kill9();
    let killed = Instant::now();
    let second = wait_new_leader(&c, &first).await;
    let took = killed.elapsed();
    println!("leader {first} killed; {second} leads {took:?} later (leader TTL {LEADER_TTL:?})");
    assert!(
        took <= LEADER_TTL + Duration::from_millis(500),
        "new leader after {took:?}"
    );

    for ch in ["b1", "b2", "b3"] {
        let what = format!("{ch} to be stopped by the new leader");
        wait_unowned(&c, ch, &what, Duration::from_secs(15)).await;
    }
    let new_leader = coords.get(&second).expect("new leader process");
    assert!(new_leader.metric("farm_coordinator_idle_stops_total") >= 1.0);
    assert_eq!(new_leader.metric("farm_coordinator_is_leader"), 1.0);

    let ev = events(&mut c, "farm").await;
    let mut stops: HashMap<(String, String), usize> = HashMap::new();
    for e in ev.iter().filter(|e| e.kind() == "stopped") {
        assert_eq!(e.get("reason"), "idle", "{e:?}");
        *stops
            .entry((e.get("channel").to_string(), e.get("gen").to_string()))
            .or_default() += 1;
    }
    for ch in channels {
        let n: usize = stops
            .iter()
            .filter(|((c, _), _)| c == ch)
            .map(|(_, n)| *n)
            .sum();
        assert_eq!(n, 1, "channel {ch} stopped {n} times: {stops:?}");
    }
    let changes: Vec<_> = ev.iter().filter(|e| e.kind() == "leader_changed").collect();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(changes[1].get("coordinator"), second);
    assert_eq!(changes[1].get("previous"), format!("{first}:1"));
    assert!(
        ev.iter().all(|e| e.kind() != "node_dead"),
        "a leadership change reaped a node"
    );

    // A graceful stop releases the lease: the last one takes over without waiting for the TTL.
    coords.get(&second).expect("leader").sigterm();
    let stopped = Instant::now();
    let third = eventually("the third leader", Duration::from_secs(10), || {
        let mut c = c.clone();
        let second = second.clone();
        async move { leader(&mut c, "farm").await.filter(|l| *l != second) }
    })
    .await;
    println!(
        "{second} stopped gracefully; {third} leads {:?} later",
        stopped.elapsed()
    );
    assert!(stopped.elapsed() < LEADER_TTL, "{:?}", stopped.elapsed());
    let status = coords
        .get_mut(&second)
        .expect("process")
        .wait_exit(Duration::from_secs(10))
        .expect("graceful exit");
    assert!(status.success(), "{status}");
    let nodes: Vec<&NodeProcess> = _nodes.iter().collect();
    let report = farm_tests::invariants::check_nodes(
        redis,
        &nodes,
        farm_tests::invariants::settle_time(Duration::from_secs(3), Duration::from_millis(500)),
    )
    .await;
    println!("leader changes: {}", report.figure());
    report.assert_clean();
}
