//! Pinned channels (keep-warm): running somewhere at all times without a viewer, started again
//! when they run nowhere, never idle-stopped; unpinned, they go idle like any other.

use farm_tests::coordinator::{fake_source, farmctl_ok, owner, wait_unowned};
use farm_tests::farm::Farm;
use farm_tests::wait::eventually;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_keeps_a_pinned_channel_running_and_lets_it_go_once_unpinned() {
    let mut farm = Farm::pair()
        .fake_ffmpeg()
        .coordinator_value("--idle-timeout", "4s")
        .coordinator_value("--tick", "500ms")
        .start()
        .await;
    let _nodes = farm.take_nodes::<2>();
    let [_coord] = farm.take_coordinators();
    let (redis, url) = (&farm.redis, farm.url());
    farmctl_ok(
        &url,
        &[
            "channel",
            "add",
            "warm",
            &fake_source("warm", 500),
            "--pinned",
        ],
    );
    let mut c = redis.conn().await;

    // Nobody watches it, yet it runs.
    let t0 = Instant::now();
    let (node, gen) = eventually(
        "the pinned channel runs somewhere",
        Duration::from_secs(15),
        || async {
            let mut c = redis.conn().await;
            owner(&mut c, "farm", "warm").await
        },
    )
    .await;
    println!(
        "pinned channel started on {node} {:?} after it was added",
        t0.elapsed()
    );

    // Stopped by ops while pinned: the coordinator starts it again (keep-warm).
    farmctl_ok(&url, &["stop", "warm", "--wait"]);
    let (_, gen2) = eventually(
        "the pinned channel runs again",
        Duration::from_secs(20),
        || async {
            let mut c = redis.conn().await;
            owner(&mut c, "farm", "warm")
                .await
                .filter(|(_, g)| *g != gen)
        },
    )
    .await;
    assert!(gen2 > gen);

    // Still running well past idle_timeout with no viewer.
    let past_idle = Instant::now() + Duration::from_secs(6);
    eventually("idle_timeout passes", Duration::from_secs(10), || async {
        (Instant::now() >= past_idle).then_some(())
    })
    .await;
    assert_eq!(
        owner(&mut c, "farm", "warm").await.map(|o| o.1),
        Some(gen2),
        "never idle-stopped while pinned"
    );

    // Unpinned: it goes idle like any other.
    farmctl_ok(&url, &["unpin", "warm"]);
    let t1 = Instant::now();
    let idle_stopped = "the unpinned channel is idle-stopped";
    wait_unowned(&c, "warm", idle_stopped, Duration::from_secs(20)).await;
    println!("unpinned channel stopped {:?} after unpin", t1.elapsed());
    let pinned: Vec<String> = redis::cmd("SMEMBERS")
        .arg("farm:pinned")
        .query_async(&mut c)
        .await
        .expect("SMEMBERS");
    assert!(
        pinned.is_empty(),
        "the pinned index follows unpin: {pinned:?}"
    );
}
