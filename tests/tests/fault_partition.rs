//! One node partitioned from Redis (promise 2 and 1): n1 reaches Redis through a [`TcpProxy`], n2
//! and the coordinator directly; the fake FFmpeg; lease and node TTL 3 s, tick 500 ms, the node's
//! default Redis timeout.
//!
//! The proxy blackholes n1's Redis traffic while n1 runs a watched channel and a viewer keeps asking
//! n2 for it. Measured, sampled every 100 ms: when n1's FFmpeg is gone (its self-fence: promised
//! within ⅔ of the lease TTL), when n2 takes the channel over (only after n1's lease has expired),
//! how long two FFmpegs ran for the channel (must be 0), and when the viewer is served again: a
//! segment of n2's run, within the end of n1's lease + one probe interval + the fake FFmpeg's
//! first segment (500 ms) + 0.5 s. Then the partition heals: n1 registers again and serves, and
//! the invariant checker finds nothing left. Every playlist a viewer gets goes to the strict
//! RFC 8216 checker.

use farm_tests::coordinator::{fake_source, ffmpegs_for, owner, wait_alive};
use farm_tests::farm::{Farm, FarmBuilder};
use farm_tests::fixtures::{newer_segment, no_redirects, observed_playlist};
use farm_tests::netproxy::TcpProxy;
use farm_tests::node::{NodeOpts, NodeProcess};
use farm_tests::wait::{eventually, eventually_with};
use redis::AsyncCommands;
use std::time::{Duration, Instant};

const LEASE: Duration = Duration::from_secs(3);
const SAMPLE: Duration = Duration::from_millis(100);
/// The fake FFmpeg's segment length (`fake_source(.., 500)`): a new run's first segment.
const FIRST_SEGMENT: Duration = Duration::from_millis(500);
const SLACK: Duration = Duration::from_millis(500);

/// Fake FFmpeg and a coordinator ticking every 500 ms ([`Farm::builder`] adds the daemons).
fn farm() -> FarmBuilder {
    Farm::builder()
        .fake_ffmpeg()
        .coordinator_value("--tick", "500ms")
}

/// A proxy in front of the farm's Redis and node n1 reaching Redis through it.
fn proxied_n1(farm: &Farm) -> (TcpProxy, NodeProcess) {
    let proxy = TcpProxy::start(farm.redis.port());
    let n1 = NodeProcess::spawn(NodeOpts {
        redis_url: proxy.redis_url(),
        ..farm.node_opts("n1")
    });
    (proxy, n1)
}

/// A first request for channel ch on `node` (answered 200): ch runs there.
async fn start_ch_on(node: &NodeProcess) {
    let url = format!("{}/live/ch/index.m3u8", node.base_url());
    let (status, _) = observed_playlist(&no_redirects(), &url).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_partitioned_node_fences_itself_before_its_lease_ends_and_rejoins_after_the_heal() {
    let farm = farm()
        .channel("ch", fake_source("ch", 500))
        .channel("after", fake_source("after", 500))
        .start()
        .await;
    let redis = &farm.redis;
    let (proxy, n1) = proxied_n1(&farm);
    let n2 = farm.spawn_node("n2");
    let _co = farm.spawn_coordinator("c1");
    let mut c = redis.conn().await;
    let http = no_redirects();
    start_ch_on(&n1).await;
    let (_, gen_before) = owner(&mut c, "farm", "ch").await.expect("ch runs on n1");
    assert_eq!(ffmpegs_for(n1.hls_root(), "ch").len(), 1);
    // Let n1 renew through the proxy a few times, so the partition cuts a steady node.
    eventually(
        "n1 to renew through the proxy",
        Duration::from_secs(10),
        || {
            let st = proxy.stats();
            async move { (st.bytes_up > 20_000).then_some(()) }
        },
    )
    .await;

    proxy.blackhole();
    let cut = Instant::now();
    // The lease n1 holds now is the last one it will get: note when it ends.
    let pttl: i64 = c.pttl("farm:owner:ch").await.expect("PTTL");
    let lease_end = cut + Duration::from_millis(pttl.max(0) as u64);

    // A viewer asks n2 for the channel every 100 ms (n1's recorded window, or a 307 to n1, while
    // n1's lease holds) until it gets a segment of a newer run than n1's.
    let probe_url = format!("{}/live/ch/index.m3u8", n2.base_url());
    let probe = tokio::spawn({
        let http = http.clone();
        async move {
            let mut statuses = std::collections::BTreeMap::new();
            while cut.elapsed() < Duration::from_secs(30) {
                let (s, body) = observed_playlist(&http, &probe_url).await;
                *statuses.entry(s).or_insert(0u32) += 1;
                if s == 200
                    && newer_segment(&http, &probe_url, &body, gen_before)
                        .await
                        .is_some()
                {
                    return (Some(cut.elapsed()), statuses);
                }
                tokio::time::sleep(SAMPLE).await;
            }
            (None, statuses)
        }
    });

    let (mut fenced, mut taken_over, mut n2_ffmpeg) = (None, None, None);
    let (mut samples, mut doubles) = (0u32, 0u32);
    while cut.elapsed() < Duration::from_secs(20) {
        samples += 1;
        let on1 = ffmpegs_for(n1.hls_root(), "ch").len();
        let on2 = ffmpegs_for(n2.hls_root(), "ch").len();
        let t = cut.elapsed();
        if on1 + on2 > 1 {
            doubles += 1;
        }
        if fenced.is_none() && on1 == 0 {
            fenced = Some(t);
        }
        if n2_ffmpeg.is_none() && on2 > 0 {
            n2_ffmpeg = Some(t);
        }
        if taken_over.is_none()
            && owner(&mut c, "farm", "ch").await.map(|o| o.0).as_deref() == Some("n2")
        {
            taken_over = Some(t);
        }
        if fenced.is_some() && n2_ffmpeg.is_some() && taken_over.is_some() && t > LEASE * 2 {
            break;
        }
        tokio::time::sleep(SAMPLE).await;
    }
    let (served, statuses) = probe.await.expect("probe task");
    let fenced = fenced.expect("n1's FFmpeg stopped during the partition");
    let taken_over = taken_over.expect("n2 took ch over");
    let lease_left = lease_end - cut;
    // How long before its lease ended n1 had stopped (negative: it ran past its own lease).
    let margin_ms = lease_left.as_millis() as i64 - fenced.as_millis() as i64;
    println!(
        "partition of n1 (lease {LEASE:?}, fence promised after {:?}): n1's FFmpeg gone {fenced:?} after the cut; \
n1's last lease ended {lease_left:?} after the cut (fence margin {margin_ms} ms, ⅓ TTL intended); n2 owner after {taken_over:?}, its FFmpeg seen after {:?}; \
viewer on n2 served after {served:?} ({statuses:?}); {doubles} of {samples} samples (every {SAMPLE:?}) saw two FFmpegs: overlap {:.1}s",
        LEASE * 2 / 3,
        n2_ffmpeg,
        doubles as f64 * SAMPLE.as_secs_f64()
    );
    assert_eq!(doubles, 0, "two FFmpegs ran for ch");
    let served = served.expect("the viewer on n2 was never served a segment of the new run");
    assert!(
        served <= lease_left + SAMPLE + FIRST_SEGMENT + SLACK,
        "the viewer on n2 was served again {served:?} after the cut; n1's lease ended {lease_left:?} after it"
    );
    // Takeover only once n1's lease has run out (50 ms for the sampling grain and clocks).
    assert!(
        taken_over + Duration::from_millis(50) >= lease_left,
        "n2 took over {taken_over:?} after the cut, before n1's lease ended ({lease_left:?})"
    );
    let (_, gen_after) = owner(&mut c, "farm", "ch").await.expect("ch on n2");
    assert!(gen_after > gen_before);
    // Heal: n1 comes back by itself, registers and serves again.
    proxy.pass();
    let healed = Instant::now();
    wait_alive(&c, "n1", "n1 to register again", Duration::from_secs(15)).await;
    let rejoined = healed.elapsed();
    let (status, _) =
        observed_playlist(&http, &format!("{}/live/after/index.m3u8", n1.base_url())).await;
    assert_eq!(status, 200, "n1 serves a new channel after the heal");
    assert_eq!(
        owner(&mut c, "farm", "after").await.map(|o| o.0).as_deref(),
        Some("n1")
    );
    let (status, _) =
        observed_playlist(&http, &format!("{}/live/ch/index.m3u8", n1.base_url())).await;
    assert_eq!(
        status, 200,
        "n1 answers ch's playlist as its owner n2 recorded it"
    );
    assert_eq!(
        owner(&mut c, "farm", "ch").await.map(|o| o.0).as_deref(),
        Some("n2"),
        "the request did not move ch"
    );
    println!(
        "after the heal: n1 registered again in {rejoined:?} and serves; proxy {:?}",
        proxy.stats()
    );

    farm.assert_settled(&[&n1, &n2], "partition").await;

    // Checked last, so that one run also shows the heal and the checker.
    // The promise: a node that cannot renew for 2/3 of the lease TTL stops its FFmpegs. The last
    // renewal was at or before the cut; allow one sample and the kill for the measurement.
    assert!(
        fenced <= LEASE * 2 / 3 + SAMPLE + Duration::from_millis(150),
        "n1 fenced {fenced:?} after the cut, promised within {:?} (its lease ended {lease_left:?} after the cut)",
        LEASE * 2 / 3
    );
}

/// Latency and short resets on n1's Redis link (below the fence time) cost nothing: the same gen,
/// the same FFmpeg, no event, nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_slow_or_briefly_reset_redis_link_costs_nothing() {
    // n1's keepalive (heartbeat and renewals in one pipeline, every 500 ms) ran at Redis at least
    // a second after this call: sent after it, so it did not sit in the faulty link's queue. Its
    // lease was renewed by it.
    async fn renewed(c: &redis::aio::MultiplexedConnection, when: &str) {
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut c.clone())
            .await
            .expect("TIME");
        let since_ms = secs * 1000 + micros / 1000;
        let t = Instant::now();
        eventually_with(
            c,
            &format!("n1 to renew {when}"),
            Duration::from_secs(5),
            |mut c| async move {
                let beat: Option<f64> = c.zscore("farm:nodes", "n1").await.ok()?;
                let pttl: i64 = c.pttl("farm:owner:ch").await.ok()?;
                (beat? as u64 >= since_ms + 1000 && pttl > 2500).then_some(())
            },
        )
        .await;
        println!("n1 renewed {when} in {:?}", t.elapsed());
    }
    let farm = farm().channel("ch", fake_source("ch", 500)).start().await;
    let redis = &farm.redis;
    let (proxy, n1) = proxied_n1(&farm);
    let _co = farm.spawn_coordinator("c1");
    let mut c = redis.conn().await;
    start_ch_on(&n1).await;
    let before = owner(&mut c, "farm", "ch").await.expect("ch runs on n1");
    let pid = ffmpegs_for(n1.hls_root(), "ch");
    assert_eq!(pid.len(), 1);
    let mark: Option<String> = farm_tests::coordinator::events(&mut c, "farm")
        .await
        .last()
        .map(|e| e.id.clone());

    // For `fault` (its duration is the fault's), sampled every SAMPLE: n1's FFmpeg stays the same
    // one. The least lease TTL left meanwhile, ms.
    let same_ffmpeg_for = |fault: Duration, during: &'static str| {
        let (mut c, root, pid) = (c.clone(), n1.hls_root().to_path_buf(), pid.clone());
        async move {
            let t = Instant::now();
            let mut worst_pttl = i64::MAX;
            while t.elapsed() < fault {
                let pttl: i64 = c.pttl("farm:owner:ch").await.expect("PTTL");
                worst_pttl = worst_pttl.min(pttl);
                assert_eq!(ffmpegs_for(&root, "ch"), pid, "FFmpeg replaced {during}");
                tokio::time::sleep(SAMPLE).await;
            }
            worst_pttl
        }
    };
    // 300 ms each way for two lease TTLs (fault injection: the durations are the fault).
    proxy.latency(Duration::from_millis(300));
    let worst_pttl = same_ffmpeg_for(LEASE * 2, "under latency").await;
    // Back to normal, and renewed, before the second fault: the two are separate outages, each
    // within what costs nothing (a renewal under 300 ms each way is credited from when it was sent,
    // 600 ms before its answer, so latency running straight into resets is a longer outage).
    proxy.pass();
    renewed(&c, "after the latency").await;
    // Then every connection reset, and new ones refused, for 1 s (with the reconnect, below half
    // the lease TTL: what a Redis outage may last and cost nothing).
    proxy.reset();
    same_ffmpeg_for(Duration::from_secs(1), "during resets").await;
    proxy.pass();
    renewed(&c, "after the resets").await;
    assert_eq!(owner(&mut c, "farm", "ch").await, Some(before));
    assert_eq!(ffmpegs_for(n1.hls_root(), "ch"), pid);
    let ev = farm_tests::coordinator::events(&mut c, "farm").await;
    let since: Vec<_> = ev
        .iter()
        .filter(|e| mark.as_ref().is_none_or(|m| e.id > *m))
        .filter(|e| e.kind() != "leader_changed")
        .collect();
    println!(
        "n1 behind 300 ms of latency each way for {:?}: lowest lease left {worst_pttl} ms (TTL {LEASE:?}); then 1 s of resets: same gen, same FFmpeg, events since: {}; proxy {:?}",
        LEASE * 2,
        since.len(),
        proxy.stats()
    );
    assert!(since.is_empty(), "{since:?}");
    farm.assert_settled(&[&n1], "slow link").await;
}

/// A lease taken away while its node renews fine (a lost write on a Redis failover, an operator's
/// `DEL`): another node claims the channel, and the old owner's next keepalive learns that its
/// renewal was refused and fences that channel (promise 2): its FFmpeg is gone within one
/// keepalive interval (TTL / 6 = 500 ms) of the other node's claim, plus 0.5 s; it is not started
/// again, and the checker finds nothing left. The channel's segments are 2.5 s long and the lease
/// is taken right after one was published, so the old owner's next gen-checked write (its next
/// segment) is 2.5 s away: only the keepalive can fence it in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_a_lease_taken_away_is_fenced_at_the_next_keepalive() {
    const KEEPALIVE: Duration = Duration::from_millis(500);
    let mut farm = farm()
        .channel("ch", fake_source("ch", 2500))
        .nodes(&["n1", "n2"])
        .coordinators(&["c1"])
        .start()
        .await;
    let ([n1, n2], [_co]) = farm.take_daemons();
    let redis = &farm.redis;
    let mut c = redis.conn().await;
    let http = no_redirects();
    let on_n1 = format!("{}/live/ch/index.m3u8", n1.base_url());
    let (status, first) = observed_playlist(&http, &on_n1).await;
    assert_eq!(status, 200);
    let (_, gen1) = owner(&mut c, "farm", "ch").await.expect("ch on n1");
    // Right after n1 published its next segment.
    let last = |body: &str| {
        farm_tests::hls::MediaPlaylist::parse(body)
            .ok()
            .and_then(|p| p.last_sequence())
    };
    let first_last = last(&first);
    eventually("n1 to publish a segment", Duration::from_secs(10), || {
        let (http, on_n1) = (http.clone(), on_n1.clone());
        async move {
            let r = http.get(&on_n1).send().await.ok()?;
            let body = r.text().await.ok()?;
            (last(&body) > first_last).then_some(())
        }
    })
    .await;
    let old = ffmpegs_for(n1.hls_root(), "ch");
    assert_eq!(old.len(), 1);
    let old_start = farm_tests::procs::process_start_time(old[0]).expect("start");

    // The lease vanishes (deleted by hand); a viewer on n2 asks for the channel at once and keeps
    // asking. n2 answers the recorded window meanwhile, and claims the channel only once n1's lease
    // would have run out (claim.lua waits on the stream hash's lease_until): by then n1 noticed at
    // its next keepalive and fenced, so the two FFmpegs never overlap.
    let _: () = c.del("farm:owner:ch").await.expect("DEL");
    let taken = Instant::now();
    let taken_ms = farm_tests::procs::now_ms();
    let on_n2 = format!("{}/live/ch/index.m3u8", n2.base_url());
    let (status, _) = observed_playlist(&http, &on_n2).await;
    assert_eq!(
        status, 200,
        "n2 answers ch's playlist at once (the recorded window)"
    );
    let exit = farm_tests::procs::watch_exit(old[0], old_start, Duration::from_secs(10))
        .await
        .expect("n1's FFmpeg to be fenced");
    let fenced = Duration::from_millis(exit.gone_ms.saturating_sub(taken_ms));
    let (node2, gen2) = eventually("n2 to take ch", Duration::from_secs(10), || {
        let (http, on_n2) = (http.clone(), on_n2.clone());
        let redis = &redis;
        async move {
            let (st, _) = observed_playlist(&http, &on_n2).await;
            let o = owner(&mut redis.conn().await, "farm", "ch").await?;
            (st == 200 && o.0 == "n2").then_some(o)
        }
    })
    .await;
    let claimed = taken.elapsed();
    assert!(gen2 > gen1, "{node2}:{gen2}");
    let new = eventually("n2's FFmpeg", Duration::from_secs(10), || async {
        ffmpegs_for(n2.hls_root(), "ch").first().copied()
    })
    .await;
    let new_started_ms = farm_tests::procs::start_unix_ms(new).expect("start of n2's FFmpeg");
    println!(
        "lease taken away: n1's FFmpeg gone {fenced:?} after (bound {:?}); n2 took ch {claimed:?} after, its FFmpeg started {} ms after n1's was gone",
        KEEPALIVE + SLACK,
        new_started_ms as i64 - exit.gone_ms as i64
    );
    assert!(
        fenced <= KEEPALIVE + SLACK,
        "n1 ran its FFmpeg {fenced:?} after losing its lease"
    );
    assert!(
        new_started_ms >= exit.gone_ms,
        "n2's FFmpeg started before n1's was gone: the channel ran twice"
    );
    // n1 starts nothing again for ch: only n2's FFmpeg runs, for a while.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        assert!(
            ffmpegs_for(n1.hls_root(), "ch").is_empty(),
            "n1 started ch again"
        );
        tokio::time::sleep(SAMPLE).await;
    }
    assert_eq!(ffmpegs_for(n2.hls_root(), "ch").len(), 1);
    farm.assert_settled(&[&n1, &n2], "lease taken away").await;
}
