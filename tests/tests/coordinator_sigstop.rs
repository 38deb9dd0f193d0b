//! A frozen owner: SIGSTOP of a node and its FFmpeg for 2 x the lease TTL, with the fake FFmpeg;
//! node and lease TTL 3 s, tick 500 ms. The node's guard process is not stopped (a whole frozen host,
//! guard included, is `fault_freeze`'s cgroup test).
//!
//! What it proves: the guard fences the node although neither the node nor its FFmpeg can run: at
//! the fence time (the last renewal + ⅔ TTL) it SIGKILLs the stopped FFmpeg (a stopped process dies
//! of SIGKILL; it stays a zombie until the frozen node reaps it), before the coordinator declares
//! the node dead and moves its recently watched channel to the other node. Sampled every 50 ms,
//! every live FFmpeg of the channel counts, stopped or running (only zombies do not): there are
//! never two. After SIGCONT the old node runs nothing of the channel, none of its writes land (its
//! gen is refused), and it rejoins cleanly.

use farm_tests::coordinator::{events, fake_source, ffmpegs_for, owner, wait_alive};
use farm_tests::farm::Farm;
use farm_tests::hls::HlsClient;
use farm_tests::procs;
use farm_tests::signal;
use redis::AsyncCommands;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const LEASE: Duration = Duration::from_secs(3);

/// Live FFmpegs of the channel on either node, stopped ones included (zombies are not live), and
/// how many of them are stopped.
fn live(roots: &[&std::path::Path]) -> (usize, usize) {
    let pids: Vec<i32> = roots.iter().flat_map(|r| ffmpegs_for(r, "ch")).collect();
    let stopped = pids
        .iter()
        .filter(|pid| procs::stat(**pid).is_some_and(|s| s.state == 'T' || s.state == 't'))
        .count();
    (pids.len(), stopped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_moves_a_channel_off_a_frozen_node_and_the_node_fences_on_wake() {
    let mut farm = Farm::pair()
        .fake_ffmpeg()
        .coordinator_value("--tick", "500ms")
        .channel("ch", fake_source("ch", 500))
        .start()
        .await;
    let ([n1, n2], [_co]) = farm.take_daemons();
    let redis = &farm.redis;
    let mut c = redis.conn().await;
    let (status, body) = HlsClient::new(&format!("{}/live/ch/index.m3u8", n1.base_url()))
        .get_playlist()
        .await
        .expect("first playlist");
    assert_eq!(status, 200, "{body}");
    let (_, old_gen) = owner(&mut c, "farm", "ch").await.expect("ch runs on n1");
    let old = ffmpegs_for(n1.hls_root(), "ch");
    assert_eq!(old.len(), 1, "{old:?}");
    let old = old[0];
    let roots = [n1.hls_root(), n2.hls_root()];

    // Freeze the node and its FFmpeg (not the guard).
    n1.sigstop();
    signal::stop(old).expect("SIGSTOP ffmpeg");
    let frozen = Instant::now();
    // The guard's deadline is the last renewal it got + ⅔ TTL, at the latest this lease's end - ⅓ TTL.
    let pttl: i64 = c.pttl("farm:owner:ch").await.expect("PTTL");
    let fence_by = Duration::from_millis(pttl.max(0) as u64).saturating_sub(LEASE / 3);
    let mut samples = 0u32;
    let mut doubles = 0u32;
    let mut stopped_samples = 0u32;
    let mut moved_after = None;
    let mut killed_after = None;
    // 2 x the lease TTL, sampling (the freeze is the fault; the samples are the measurement).
    while frozen.elapsed() < LEASE * 2 {
        samples += 1;
        let (n, stopped) = live(&roots);
        if n > 1 {
            doubles += 1;
        }
        if stopped > 0 {
            stopped_samples += 1;
        }
        if killed_after.is_none() && !procs::pid_alive(old) {
            killed_after = Some(frozen.elapsed());
        }
        if moved_after.is_none()
            && owner(&mut c, "farm", "ch").await.map(|o| o.0).as_deref() == Some("n2")
        {
            moved_after = Some(frozen.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let moved_after = moved_after.expect("ch moved to n2 while n1 was frozen");
    let killed_after = killed_after.expect("the guard killed n1's stopped FFmpeg");
    assert_eq!(
        doubles, 0,
        "two live FFmpegs (stopped or running) for the channel while n1 was frozen"
    );
    assert!(
        killed_after <= fence_by + Duration::from_millis(200),
        "n1's stopped FFmpeg killed {killed_after:?} into the freeze, fence by {fence_by:?}"
    );
    assert!(killed_after < moved_after);
    let (_, new_gen) = owner(&mut c, "farm", "ch").await.expect("ch runs on n2");
    assert!(new_gen > old_gen);
    let ev = events(&mut c, "farm").await;
    assert!(
        ev.iter()
            .any(|e| e.kind() == "node_dead" && e.get("node") == "n1"),
        "{ev:?}"
    );
    let stream_before: HashMap<String, String> =
        c.hgetall("farm:stream:ch").await.expect("HGETALL");
    assert_eq!(stream_before.get("node").map(String::as_str), Some("n2"));

    println!(
        "frozen n1 and its FFmpeg: the guard killed the stopped FFmpeg {killed_after:?} into the freeze (fence by {fence_by:?}), \
ch owned by n2 {moved_after:?} into it; {samples} samples, {stopped_samples} with a stopped FFmpeg, {doubles} with two live FFmpegs"
    );

    // Wake the node. Its FFmpeg is a zombie it now reaps: nothing to wake there.
    n1.sigcont();
    let _ = signal::cont(old);
    // n1 is back (alive again) and none of its writes landed: the hash and lease are n2's.
    wait_alive(&c, "n1", "n1 to heartbeat again", Duration::from_secs(10)).await;
    assert_eq!(
        owner(&mut c, "farm", "ch").await,
        Some(("n2".to_string(), new_gen))
    );
    let stream_after: HashMap<String, String> = c.hgetall("farm:stream:ch").await.expect("HGETALL");
    assert_eq!(stream_after.get("node"), stream_before.get("node"));
    assert_eq!(stream_after.get("gen"), Some(&new_gen.to_string()));
    let n1_set: Vec<String> = c.smembers("farm:node:n1:streams").await.expect("SMEMBERS");
    assert!(n1_set.is_empty(), "{n1_set:?}");
    assert_eq!(ffmpegs_for(n2.hls_root(), "ch").len(), 1);
    assert!(ffmpegs_for(n1.hls_root(), "ch").is_empty());
    let ev = events(&mut c, "farm").await;
    let late: Vec<_> = ev
        .iter()
        // Written by n1 itself (the coordinator's events carry `by`).
        .filter(|e| e.get("by").is_empty() && e.get("node") == "n1" && e.kind() != "started")
        .collect();
    assert!(
        late.is_empty(),
        "n1 wrote events for its fenced gen: {late:?}"
    );
    farm.assert_settled(&[&n1, &n2], "frozen node").await;
}
