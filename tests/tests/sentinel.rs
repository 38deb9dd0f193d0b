//! Redis Sentinel: nodes reach Redis through three sentinels; kill -9 of the primary while
//! channels are watched; the farm follows the failover, no channel ever runs twice, and commands
//! work against the new primary.

use farm_tests::coordinator::wait_unowned;
use farm_tests::farm::coordinator_args;
use farm_tests::fixtures::*;
use farm_tests::hls::HlsClient;
use farm_tests::node::{NodeOpts, NodeProcess};
use farm_tests::ports::free_port;
use farm_tests::redis::RedisServer;
use farm_tests::wait::eventually;
use redis::AsyncCommands;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One `redis-server --sentinel` on a free port in its own temp dir.
struct Sentinel {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    fn start(primary_port: u16) -> Sentinel {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor farm 127.0.0.1 {primary_port} 2\n\
                 sentinel down-after-milliseconds farm 1000\nsentinel failover-timeout farm 5000\n\
                 sentinel parallel-syncs farm 1\n",
                dir.path().display()
            ),
        )
        .expect("sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel");
        Sentinel {
            port,
            child,
            _dir: dir,
        }
    }

    async fn master_port(&self) -> Option<u16> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).ok()?;
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        let addr: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg("farm")
            .query_async(&mut c)
            .await
            .ok()?;
        addr.and_then(|(_, p)| p.parse().ok())
    }

    async fn replicas(&self) -> usize {
        let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)) else {
            return 0;
        };
        let Ok(mut c) = client.get_multiplexed_async_connection().await else {
            return 0;
        };
        let r: redis::RedisResult<Vec<redis::Value>> = redis::cmd("SENTINEL")
            .arg("replicas")
            .arg("farm")
            .query_async(&mut c)
            .await;
        r.map(|v| v.len()).unwrap_or(0)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_farm_follows_a_sentinel_failover_and_no_channel_runs_twice() {
    // Redis 7 waits 5 s before a diskless full sync by default; the test wants it now.
    let mut primary = RedisServer::start_with_args(&["--repl-diskless-sync-delay", "0"]);
    let replica =
        RedisServer::start_with_args(&["--replicaof", "127.0.0.1", &primary.port().to_string()]);
    let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(primary.port())).collect();
    eventually(
        "sentinels see the replica",
        Duration::from_secs(30),
        || async {
            let mut n = 0;
            for s in &sentinels {
                if s.replicas().await >= 1 && s.master_port().await == Some(primary.port()) {
                    n += 1;
                }
            }
            (n == 3).then_some(())
        },
    )
    .await;
    let url = format!(
        "redis+sentinel://{}/farm",
        sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    );
    let root = tempfile::tempdir().expect("tempdir");
    let ids = ["s1", "s2", "s3"];
    add_fake_channels(&primary, &ids, 500);
    eventually(
        "the replica holds the catalog",
        Duration::from_secs(20),
        || async {
            let mut c = replica.conn().await;
            let n: u64 = c.scard("farm:channels").await.ok()?;
            (n == 3).then_some(())
        },
    )
    .await;
    // Leases of 10 s: a failover of a few seconds must cost nothing (promise 8).
    let ttl = [
        "--lease-ttl",
        "10s",
        "--node-ttl",
        "10s",
        "--access-flush",
        "500ms",
        "--hls-time",
        "1s",
    ];
    let nodes: Vec<NodeProcess> = ["n1", "n2"]
        .iter()
        .map(|n| {
            NodeProcess::spawn(
                NodeOpts::new(*n, url.clone(), root.path().join(n))
                    .with_fake_ffmpeg()
                    .args(ttl),
            )
        })
        .collect();
    // A coordinator through the same sentinels: idle stops must work after the failover too.
    let _coordinator = farm_tests::coordinator::CoordinatorProcess::spawn(
        farm_tests::coordinator::CoordinatorOpts::new("c1", url.clone()).args(coordinator_args(
            &[
                ("--idle-timeout", "4s"),
                ("--tick", "500ms"),
                ("--node-ttl", "10s"),
                ("--lease-ttl", "10s"),
                ("--leader-ttl", "6s"),
            ],
            &[],
        )),
    );
    for (i, id) in ids.iter().enumerate() {
        let r = get_observed(&format!("{}/live/{id}/index.m3u8", nodes[i % 2].base_url())).await;
        assert_eq!(r.status, 200, "{id}: {}", r.text());
    }

    // Sample every 100 ms: never two FFmpegs for one channel.
    let stop = Arc::new(AtomicBool::new(false));
    let worst = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, worst, root) = (stop.clone(), worst.clone(), root.path().to_path_buf());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !stop.load(Ordering::Acquire) {
                tick.tick().await;
                for id in ["s1", "s2", "s3"] {
                    let n = ffmpegs_under(&root)
                        .into_iter()
                        .filter(|p| {
                            farm_tests::procs::cmdline(*p)
                                .is_some_and(|c| c.contains(&format!("/{id}/")))
                        })
                        .count();
                    worst.fetch_max(n, Ordering::AcqRel);
                }
            }
        })
    };
    let viewers: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let url = format!("{}/live/{id}/index.m3u8", nodes[i % 2].base_url());
            tokio::spawn(async move {
                HlsClient::new(&url)
                    .pull(Duration::from_secs(12), Duration::from_secs(60))
                    .await
            })
        })
        .collect();

    let killed = Instant::now();
    primary.kill9();
    let new_port = eventually("a sentinel failover", Duration::from_secs(30), || async {
        sentinels[0]
            .master_port()
            .await
            .filter(|p| *p == replica.port())
    })
    .await;
    let failover = killed.elapsed();
    // The nodes write to the new primary again (heartbeats newer than the kill).
    let mut c = replica.conn().await;
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as f64)
            .unwrap_or(0.0)
    };
    let killed_ms = now_ms() - killed.elapsed().as_millis() as f64;
    eventually(
        "both nodes heartbeat on the new primary",
        Duration::from_secs(30),
        || async {
            let mut conn = replica.conn().await;
            let a: Option<f64> = conn.zscore("farm:nodes", "n1").await.ok()?;
            let b: Option<f64> = conn.zscore("farm:nodes", "n2").await.ok()?;
            (a? > killed_ms && b? > killed_ms).then_some(())
        },
    )
    .await;
    println!(
        "primary killed: sentinel failover to :{new_port} after {failover:?}; nodes writing again after {:?}",
        killed.elapsed()
    );
    join_viewers(ids, viewers, 12.0).await;
    stop.store(true, Ordering::Release);
    sampler.await.expect("sampler");
    assert_eq!(
        worst.load(Ordering::Acquire),
        1,
        "no channel ever ran twice"
    );
    for id in ids {
        assert!(
            c.exists::<_, bool>(format!("farm:owner:{id}"))
                .await
                .expect("EXISTS"),
            "{id} still owned"
        );
    }
    // Keep s1 watched; nobody watches s2 and s3 any more: idle cleanup works on the new primary.
    let watcher_url = format!("{}/live/s1/index.m3u8", nodes[0].base_url());
    let keep = tokio::spawn(async move {
        HlsClient::new(&watcher_url)
            .pull(Duration::from_secs(60), Duration::from_secs(60))
            .await
    });
    let viewers_left = Instant::now();
    // Both within 40 s of the viewers leaving.
    for id in ["s2", "s3"] {
        let what = format!("{id} idle-stopped after the failover");
        let left = Duration::from_secs(40).saturating_sub(viewers_left.elapsed());
        wait_unowned(&c, id, &what, left).await;
    }
    println!(
        "idle channels stopped {:?} after their viewers left (after the failover)",
        viewers_left.elapsed()
    );
    assert!(
        c.exists::<_, bool>("farm:owner:s1").await.expect("EXISTS"),
        "the watched one runs on"
    );
    // Commands work against the new primary: stop s1 on its node.
    let owner: String = c.get("farm:owner:s1").await.expect("owner");
    let (node, gen) = owner.split_once(':').expect("node:gen");
    send_stop(&mut c, node, "s1", gen, &[]).await;
    wait_unowned(
        &c,
        "s1",
        "s1 stopped after the failover",
        Duration::from_secs(15),
    )
    .await;
    keep.abort();
    // The farm on the new primary holds the invariants (node TTL 10 s, tick 500 ms).
    let farm: Vec<&NodeProcess> = nodes.iter().collect();
    let report = farm_tests::invariants::check_nodes(
        &replica,
        &farm,
        farm_tests::invariants::settle_time(Duration::from_secs(10), Duration::from_millis(500)),
    )
    .await;
    println!("sentinel failover: {}", report.figure());
    report.assert_clean();
}
