//! Several nodes on one Redis behave as one server: any node answers for any channel, one FFmpeg
//! per channel in the farm, capacity-aware forwarding, provider connection limits as leases.

use farm_tests::farm::{coordinator_args, Farm};
use farm_tests::fixtures::*;
use farm_tests::node::NodeProcess;
use farm_tests::provider::FakeProvider;
use farm_tests::redis::RedisServer;
use farm_tests::wait::eventually;
use redis::AsyncCommands;
use std::time::{Duration, Instant};

fn following() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

fn nodes(
    redis: &RedisServer,
    root: &std::path::Path,
    n: usize,
    fake: bool,
    extra: &[&str],
) -> Vec<NodeProcess> {
    (1..=n)
        .map(|i| node(redis, &format!("n{i}"), root, fake, extra))
        .collect()
}

async fn running_on(redis: &RedisServer, node: &str) -> usize {
    let mut c = redis.conn().await;
    let s: Vec<String> = c
        .smembers(format!("farm:node:{node}:streams"))
        .await
        .expect("SMEMBERS");
    s.len()
}

/// The invariant checker over the nodes, after 7 s to settle: its figure, and nothing may be wrong.
async fn assert_clean(redis: &RedisServer, ns: &[NodeProcess], what: &str) {
    let nodes: Vec<&NodeProcess> = ns.iter().collect();
    assert_settled(redis, &nodes, Duration::from_secs(7), what).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_first_requests_over_three_nodes_start_one_ffmpeg() {
    let farm = Farm::builder()
        .provider_channel("big", "/big.ts")
        .nodes(&["n1", "n2", "n3"])
        .start()
        .await;
    let (redis, provider, root) = (&farm.redis, farm.provider(), &farm.root);
    let ns = &farm.nodes;
    let urls: Vec<String> = ns
        .iter()
        .map(|n| format!("{}/live/big/index.m3u8", n.base_url()))
        .collect();
    let c = following();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (c, url) = (c.clone(), urls[i % 3].clone());
        tasks.push(tokio::spawn(async move {
            let r = c.get(&url).send().await.expect("GET");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }));
    }
    for t in tasks {
        let (status, body) = t.await.expect("join");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(".ts"), "a playlist with a segment: {body}");
        // Fifty viewers, one first playlist each: one strict checker each.
        let found = farm_tests::hls::PlaylistChecker::new().observe_playlist(&urls[0], &body);
        assert!(found.is_empty(), "{found:?}");
    }
    println!("50 viewers over 3 nodes served in {:?}", t0.elapsed());
    assert_eq!(
        ffmpegs_under(root.path()).len(),
        1,
        "one FFmpeg in the farm"
    );
    assert_eq!(
        provider.total_connections_for("/big.ts"),
        1,
        "one upstream connection"
    );
    let spawns: f64 = {
        let mut s = 0.0;
        for n in ns {
            s += metric(n, "farm_node_ffmpeg_spawns_total").await;
        }
        s
    };
    assert_eq!(spawns, 1.0);
    assert_clean(redis, ns, "fifty first requests").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_channels_round_robin_over_three_equal_nodes_are_balanced() {
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    for i in 0..30 {
        add_channel(
            &redis,
            &format!("c{i}"),
            &format!("http://127.0.0.1:9/c{i}.ts?mode=normal&seg_ms=500"),
            &[],
        );
    }
    let ns = nodes(&redis, root.path(), 3, true, &["--max-streams", "12"]);
    let c = following();
    for i in 0..30 {
        let r = c
            .get(format!("{}/live/c{i}/index.m3u8", ns[i % 3].base_url()))
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status().as_u16(), 200, "c{i}");
    }
    let mut counts = Vec::new();
    for n in ["n1", "n2", "n3"] {
        counts.push(running_on(&redis, n).await);
    }
    println!("running per node: {counts:?}");
    assert_eq!(counts.iter().sum::<usize>(), 30);
    let (min, max) = (
        counts.iter().min().copied().unwrap_or(0),
        counts.iter().max().copied().unwrap_or(0),
    );
    assert!(max - min <= 1, "{counts:?}");
    assert_eq!(ffmpegs_under(root.path()).len(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_at_its_limit_refuses_new_channels_and_a_dead_nodes_holding_expires() {
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    let mut c = redis.conn().await;
    let _: () = c
        .hset("farm:provider:acme", "max_connections", 2)
        .await
        .expect("HSET");
    for i in 0..5 {
        add_channel(
            &redis,
            &format!("p{i}"),
            &format!("http://127.0.0.1:9/p{i}.ts?mode=normal&seg_ms=500"),
            &["--provider", "acme"],
        );
    }
    let mut ns = nodes(&redis, root.path(), 3, true, &[]);
    // The farm's coordinator reaps the node killed below (node TTL 3 s).
    let _co = farm_tests::coordinator::CoordinatorProcess::spawn(
        farm_tests::coordinator::CoordinatorOpts::new("c1", redis.url())
            .args(coordinator_args(&[("--tick", "500ms")], &["--leader-ttl"])),
    );
    let http = following();
    let mut tasks = Vec::new();
    for i in 0..5 {
        let (http, url) = (
            http.clone(),
            format!("{}/live/p{i}/index.m3u8", ns[i % 3].base_url()),
        );
        tasks.push(tokio::spawn(async move {
            let r = http.get(&url).send().await.expect("GET");
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            if status == 200 {
                farm_tests::hls::observe(&url, &body);
            }
            (i, status, body)
        }));
    }
    let mut ok = Vec::new();
    for t in tasks {
        let (i, status, body) = t.await.expect("join");
        match status {
            200 => ok.push(i),
            503 => assert!(
                body.contains("provider acme") && body.contains("limit of 2"),
                "{body}"
            ),
            other => panic!("p{i}: unexpected {other}: {body}"),
        }
    }
    println!("running: {ok:?}");
    assert_eq!(ok.len(), 2, "exactly the provider's limit runs");
    assert_eq!(
        ffmpegs_under(root.path()).len(),
        2,
        "nothing spawned for the refused ones"
    );
    let holding: u64 = c.zcard("farm:provider:acme:conns").await.expect("ZCARD");
    assert_eq!(holding, 2);

    // kill -9 the node of one running channel: its holding is a lease and frees by itself.
    let victim_ch = format!("p{}", ok[0]);
    let owner: String = c
        .get(format!("farm:owner:{victim_ch}"))
        .await
        .expect("owner");
    let victim = ns
        .iter()
        .position(|n| owner.starts_with(&format!("{}:", n.node_id())))
        .expect("owner node");
    let killed_at = Instant::now();
    ns[victim].kill9();
    let survivor = ns
        .iter()
        .enumerate()
        .find(|(i, _)| *i != victim)
        .map(|(_, n)| n.base_url())
        .expect("a live node");
    let waiting: Vec<usize> = (0..5).filter(|i| !ok.contains(i)).collect();
    let url = format!("{survivor}/live/p{}/index.m3u8", waiting[0]);
    eventually(
        "a waiting channel of the provider starts",
        Duration::from_secs(15),
        || async {
            let r = following().get(&url).send().await.ok()?;
            let status = r.status().as_u16();
            let body = r.text().await.ok()?;
            (status == 200).then(|| farm_tests::hls::observe(&url, &body))
        },
    )
    .await;
    let started = killed_at.elapsed();
    // The holding ends with the lease (3 s after its last renewal, at most the kill); then the
    // next try (50 ms) starts the channel, whose first playlist lists 3 segments of 500 ms
    // (a cold start's first playlist waits for 1.5 target durations, or 3 segments).
    let bound = Duration::from_secs(3) + Duration::from_millis(50 + 1500 + 500);
    println!("the dead node's provider holding freed; a waiting channel started {started:?} after kill -9 (lease TTL 3 s, bound {bound:?})");
    assert!(
        started <= bound,
        "a waiting channel started {started:?} after the kill"
    );
    let settle =
        farm_tests::invariants::settle_time(Duration::from_secs(3), Duration::from_millis(500));
    assert_settled(
        &redis,
        &ns.iter().collect::<Vec<_>>(),
        settle,
        "provider limit",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_forwards_to_one_with_room_and_a_full_farm_says_so() {
    let (redis, root) = redis_with_fake_channels(&["c1", "c2", "c3"]);
    let ns = nodes(&redis, root.path(), 2, true, &["--max-streams", "1"]);
    let n1 = ns[0].base_url();
    let http = following();
    let c1 = format!("{n1}/live/c1/index.m3u8");
    assert_eq!(get_observed(&c1).await.status, 200);
    // n1 is full: c2 is forwarded to n2, which starts it.
    let to = redirect_of(&format!("{n1}/live/c2/index.m3u8")).await;
    assert!(to.starts_with(&ns[1].base_url()), "{to}");
    let c2 = format!("{n1}/live/c2/index.m3u8");
    let r = http.get(&c2).send().await.expect("GET");
    assert_eq!(r.status().as_u16(), 200);
    farm_tests::hls::observe(&c2, &r.text().await.expect("playlist"));
    assert_eq!(running_on(&redis, "n2").await, 1);
    // Both full: a clear 503, nothing spawned.
    wait_node_field(
        &redis,
        "n2",
        "running",
        "1",
        "n2's heartbeat shows it full",
        Duration::from_secs(5),
    )
    .await;
    let r = get_with(&http, &format!("{n1}/live/c3/index.m3u8")).await;
    let body = r.text();
    println!("{} {}", r.status, body.trim());
    assert_eq!(r.status, 503);
    assert!(body.contains("farm is full"), "{body}");
    assert_eq!(
        ffmpegs_under(root.path()).len(),
        2,
        "nothing spawned for c3"
    );
    assert!(!exists(&redis, "farm:owner:c3").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_watched_channels_make_before_break_and_the_node_ends_empty() {
    use farm_tests::hls::HlsClient;
    let redis = RedisServer::start();
    let provider = FakeProvider::start().await;
    let root = tempfile::tempdir().expect("tempdir");
    let ids: Vec<String> = (0..5).map(|i| format!("d{i}")).collect();
    for id in &ids {
        add_channel(&redis, id, &provider.url(&format!("/{id}.ts")), &[]);
    }
    let ns = nodes(&redis, root.path(), 3, false, &[]);
    let n1 = ns[0].base_url();
    assert_all_play(ids.iter().map(|id| format!("{n1}/live/{id}/index.m3u8"))).await;
    assert_eq!(running_on(&redis, "n1").await, 5);

    // Viewers keep watching through n1 while it drains.
    let mut viewers = Vec::new();
    for id in &ids {
        let url = format!("{n1}/live/{id}/index.m3u8");
        viewers.push(tokio::spawn(async move {
            HlsClient::new(&url)
                .pull(Duration::from_secs(14), Duration::from_secs(60))
                .await
        }));
    }
    eventually("viewers are pulling", Duration::from_secs(10), || async {
        (metric(&ns[0], "farm_node_requests_total{kind=\"segment\"}").await >= 5.0).then_some(())
    })
    .await;
    let mut c = redis.conn().await;
    let t0 = Instant::now();
    send_command(&mut c, "n1", &[("op", "drain"), ("by", "test")]).await;
    eventually("n1 drained", Duration::from_secs(60), || async {
        let h = hgetall(&redis, "farm:node:n1").await;
        (h.get("drained").map(String::as_str) == Some("1") && running_on(&redis, "n1").await == 0)
            .then_some(())
    })
    .await;
    println!("drain of 5 watched channels took {:?}", t0.elapsed());
    for id in &ids {
        let owner: String = c.get(format!("farm:owner:{id}")).await.expect("owner");
        assert!(!owner.starts_with("n1:"), "{id} runs elsewhere: {owner}");
    }
    assert!(
        ffmpegs_under(&root.path().join("n1")).is_empty(),
        "the drained node runs nothing"
    );
    assert_eq!(
        ffmpegs_under(root.path()).len(),
        5,
        "one FFmpeg per channel after the drain"
    );
    let mut worst = Duration::ZERO;
    for report in join_viewers(&ids, viewers, 14.0).await {
        worst = worst.max(report.max_wall_gap_between_new_segments);
    }
    println!(
        "longest gap a viewer saw during the drain: {worst:?} (hls_time 1 s; goal 2 × hls_time)"
    );
    assert!(
        worst <= Duration::from_millis(2500),
        "gap {worst:?} above 2 × hls_time (+ 0.5 s)"
    );
    // A drained node takes no new channel: it sends the viewer elsewhere.
    add_channel(&redis, "late", &provider.url("/late.ts"), &[]);
    let to = redirect_of(&format!("{n1}/live/late/index.m3u8")).await;
    assert!(!to.starts_with(&n1), "{to}");
    assert_clean(&redis, &ns, "drain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transcode_counts_its_weight_against_capacity() {
    let (redis, root) = redis_with_channel(
        "hd",
        &farm_tests::coordinator::fake_source("hd", 500),
        &["--profile", "h264-720p"],
    );
    add_fake_channels(&redis, &["c1", "c2", "c3"], 500);
    // Capacity 6: the transcode (weight 4) and two copies fit; a third copy does not.
    let n = node(&redis, "n1", root.path(), true, &["--max-streams", "6"]);
    for id in ["hd", "c1", "c2"] {
        let r = get_observed(&format!("{}/live/{id}/index.m3u8", n.base_url())).await;
        assert_eq!(r.status, 200, "{id}: {}", r.text());
    }
    let r = get_observed(&format!("{}/live/c3/index.m3u8", n.base_url())).await;
    println!("{} {}", r.status, r.text().trim());
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("farm is full"), "{}", r.text());
    wait_node_field(
        &redis,
        "n1",
        "load",
        "6",
        "the heartbeat reports the weighted load",
        Duration::from_secs(5),
    )
    .await;
    // Stopping the transcode frees its whole weight.
    let mut c = redis.conn().await;
    let gen: String = c.get("farm:gen:hd").await.expect("gen");
    send_stop(&mut c, "n1", "hd", &gen, &[]).await;
    eventually("hd stopped", Duration::from_secs(10), || async {
        (!exists(&redis, "farm:owner:hd").await).then_some(())
    })
    .await;
    let w: Option<String> = c.hget("farm:node:n1:load", "hd").await.expect("HGET");
    assert_eq!(w, None, "its weight entry is gone with it");
    let r = get_observed(&format!("{}/live/c3/index.m3u8", n.base_url())).await;
    assert_eq!(r.status, 200, "{}", r.text());
}
