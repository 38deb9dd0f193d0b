//! Hostile HTTP clients against a farm whose watched channels must play on (issue 14): each
//! scenario runs under [`AbuseFarm`] (2 nodes with a 1,024 fd limit, nginx from the shipped
//! template, 3 channels played through nginx), which at the end asserts that the viewers saw no
//! error and no gap longer than one segment, that nothing was fenced, and that node memory returned
//! to within 20 % of its baseline. Attackers connect from other loopback addresses than the viewers.
//!
//! Scenarios: 500 concurrent first requests (from 500 addresses at the nodes, from one through
//! nginx); 5,000 idle, 3,000 slow and 2,500 unterminated 390 KB headers on a node and through
//! nginx; admin token guessing; unknown channel ids; a stop reason that tries to forge a log line
//! and a metric; bad `Range` headers; a short admin token at start.
//!
//! Figures printed (`--no-capture`): answers per status, node connection counters, time until the
//! attack's connections were closed, Redis lookups, peak and final memory, worst viewer gap.

use farm_tests::abuse::RawAnswer;
use farm_tests::abuse::{
    attacker_ip, connect_from, raise_fd_limit, still_open, wait_all_closed, AbuseFarm, AbuseOpts,
    ADMIN_TOKEN, MAX_STREAMS, WATCHED,
};
use farm_tests::coordinator::metric_value;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// `GET path` from `src` to `dst` with `Connection: close` and `extra` header lines; the whole
/// answer, or what went wrong.
async fn raw_get(
    src: IpAddr,
    dst: SocketAddr,
    path: &str,
    extra: &str,
    timeout: Duration,
) -> Result<RawAnswer, String> {
    tokio::time::timeout(timeout, farm_tests::abuse::raw_get(src, dst, path, extra))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// Tallies answers: the status (`200+accel` for an X-Accel-Redirect), or the error.
fn tally(answers: &[Result<RawAnswer, String>]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in answers {
        let key = match a {
            Ok(a) if a.header("x-accel-redirect").is_some() => format!("{}+accel", a.status),
            Ok(a) => a.status.to_string(),
            Err(e) => format!("error: {}", e.split(':').next().unwrap_or(e)),
        };
        *m.entry(key).or_default() += 1;
    }
    m
}

/// 500 first requests at once, for 500 different catalog channels.
async fn burst(
    dst: SocketAddr,
    ids: std::ops::Range<usize>,
    src: impl Fn(usize) -> IpAddr,
) -> (Vec<Result<RawAnswer, String>>, Duration) {
    let t0 = Instant::now();
    let tasks: Vec<_> = ids
        .enumerate()
        .map(|(i, id)| {
            let src = src(i);
            tokio::spawn(async move {
                raw_get(
                    src,
                    dst,
                    &format!("/live/b{id}/index.m3u8"),
                    "",
                    Duration::from_secs(30),
                )
                .await
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("join"));
    }
    (out, t0.elapsed())
}

/// Channels the nodes run, from their `farm:node:<id>:streams` sets.
async fn running(farm: &AbuseFarm) -> usize {
    let mut c = farm.redis.conn().await;
    let mut n = 0;
    for node in ["n1", "n2"] {
        let k: usize = redis::cmd("SCARD")
            .arg(format!("farm:node:{node}:streams"))
            .query_async(&mut c)
            .await
            .expect("SCARD");
        n += k;
    }
    n
}

/// The abuse farm with `extra_channels` catalog channels besides the watched ones.
async fn farm_with_extra_channels(extra_channels: usize) -> AbuseFarm {
    AbuseFarm::start(AbuseOpts {
        extra_channels,
        ..AbuseOpts::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_first_requests_fence_nothing_and_watched_channels_play_on() {
    let farm = farm_with_extra_channels(1000).await;
    let nodes: Vec<SocketAddr> = farm.nodes.iter().map(|n| n.addr()).collect();

    // 1. Straight at the nodes, one request per client address: only the start slots, the nodes'
    //    capacity and the farm's Redis stand in the way.
    let before_starts = farm.metric("farm_node_channel_starts_total").await;
    let (answers, took) = {
        let n = nodes.clone();
        let mut all = Vec::new();
        let (a, b) = tokio::join!(
            burst(n[0], 0..250, |i| attacker_ip(1, i)),
            burst(n[1], 250..500, |i| attacker_ip(2, i))
        );
        all.extend(a.0);
        all.extend(b.0);
        (all, a.1.max(b.1))
    };
    let statuses = tally(&answers);
    let starts = farm.metric("farm_node_channel_starts_total").await - before_starts;
    let ffmpegs = ffmpegs_under(farm.root());
    println!(
        "500 first requests from 500 addresses straight at the nodes: answered in {:.1}s: {statuses:?}; \
{starts} channels started, {ffmpegs} FFmpegs running; start slot timeouts {}; worst viewer gap so far {:.2}s",
        took.as_secs_f64(),
        farm.metric("farm_node_start_slot_timeouts_total").await,
        farm.worst_gap().as_secs_f64()
    );
    for a in &answers {
        match a {
            Ok(a) => assert!(
                matches!(a.status, 200 | 503 | 429),
                "unexpected answer {}: {}",
                a.head,
                String::from_utf8_lossy(&a.body)
            ),
            Err(e) => panic!("a first request got no answer: {e}"),
        }
        if let Ok(a) = a {
            if a.status == 503 || a.status == 429 {
                assert!(
                    a.header("retry-after").is_some(),
                    "{} without Retry-After",
                    a.status
                );
            }
        }
    }
    assert!(
        ffmpegs <= 2 * MAX_STREAMS as usize,
        "{ffmpegs} FFmpegs for a capacity of {MAX_STREAMS} per node"
    );

    // 2. Through nginx, all from one address: nginx's limit_req/limit_conn and the nodes'
    //    per-client limit cut it down.
    let before_limited = farm.metric("farm_node_first_requests_limited_total").await;
    let (answers, took) = burst(farm.nginx.addr(), 500..1000, |_| attacker_ip(3, 0)).await;
    let statuses = tally(&answers);
    let node_limited = farm.metric("farm_node_first_requests_limited_total").await - before_limited;
    // nginx's own refusals: 429 with no upstream.
    let nginx_429 = farm
        .nginx
        .access_log()
        .lines()
        .filter(|l| l.contains("\" 429 ") && l.contains("upstream=\"-\""))
        .count();
    println!(
        "500 first requests from one address through nginx: answered in {:.1}s: {statuses:?}; \
nginx refused {nginx_429}, the nodes {node_limited} (429)",
        took.as_secs_f64()
    );
    assert!(
        nginx_429 >= 300,
        "nginx's per-client limits let {} of 500 through",
        500 - nginx_429
    );
    for a in answers.iter().flatten() {
        if a.status == 429 {
            assert_eq!(a.header("retry-after").as_deref(), Some("1"), "{}", a.head);
            assert!(
                String::from_utf8_lossy(&a.body).contains("too many"),
                "a sentence: {:?}",
                String::from_utf8_lossy(&a.body)
            );
        }
    }

    // The coordinator stops what the burst started (idle 5 s); then the verdict.
    let t0 = Instant::now();
    farm_tests::wait::eventually(
        "the burst's channels to be stopped as idle",
        Duration::from_secs(40),
        || async { (running(&farm).await == WATCHED.len()).then_some(()) },
    )
    .await;
    println!(
        "burst channels stopped {:.1}s later; worst viewer gap {:.2}s",
        t0.elapsed().as_secs_f64(),
        farm.worst_gap().as_secs_f64()
    );
    farm.finish("500 first requests").await;
}

/// Live FFmpegs writing under `root`.
fn ffmpegs_under(root: &std::path::Path) -> usize {
    let needle = root.to_string_lossy().to_string();
    farm_tests::procs::processes_with_cmdline_containing(&needle)
        .into_iter()
        .filter(|(_, cmd)| {
            cmd.split_whitespace()
                .next()
                .is_some_and(|p| p.ends_with("ffmpeg"))
        })
        .filter(|(pid, _)| !farm_tests::procs::is_zombie(*pid))
        .count()
}

/// Asks `target` for a watched playlist (and `/healthz` on a node) every 200 ms from 127.0.0.1,
/// on a new connection each time, until `stop`: the slowest answer and the failures.
fn probe(
    target: SocketAddr,
    node: bool,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<(Duration, Vec<String>, usize)> {
    tokio::spawn(async move {
        let (mut worst, mut failures, mut n) = (Duration::ZERO, Vec::new(), 0);
        let local: IpAddr = "127.0.0.1".parse().expect("ip");
        while !stop.is_cancelled() {
            let paths: &[&str] = if node {
                &["/healthz", "/live/w0/index.m3u8"]
            } else {
                &["/live/w0/index.m3u8"]
            };
            for p in paths {
                let t0 = Instant::now();
                let r = raw_get(local, target, p, "", Duration::from_secs(5)).await;
                worst = worst.max(t0.elapsed());
                n += 1;
                match r {
                    Ok(a) if a.status == 200 => {}
                    Ok(a) => failures.push(format!("{p}: {}", a.head.lines().next().unwrap_or(""))),
                    Err(e) => failures.push(format!("{p}: {e}")),
                }
            }
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        (worst, failures, n)
    })
}

/// Opens `n` connections to `dst`, 50 per source address of loopback net `net`.
async fn open_many(dst: SocketAddr, net: u8, n: usize) -> (Vec<TcpStream>, usize) {
    let mut conns = Vec::with_capacity(n);
    let mut failed = 0;
    for i in 0..n {
        match tokio::time::timeout(
            Duration::from_secs(2),
            connect_from(attacker_ip(net, i / 50), dst),
        )
        .await
        {
            Ok(Ok(s)) => conns.push(s),
            _ => failed += 1,
        }
    }
    (conns, failed)
}

/// Node connection counters (summed over both nodes).
async fn conn_counters(farm: &AbuseFarm) -> BTreeMap<&'static str, f64> {
    let mut m = BTreeMap::new();
    for (k, name) in [
        ("evicted", "farm_node_http_connections_evicted_total"),
        ("refused", "farm_node_http_connections_refused_total"),
        (
            "header timeouts",
            "farm_node_http_connections_timed_out_total{kind=\"header\"}",
        ),
        (
            "idle timeouts",
            "farm_node_http_connections_timed_out_total{kind=\"idle\"}",
        ),
        ("accept errors", "farm_node_http_accept_errors_total"),
    ] {
        m.insert(k, farm.metric(name).await);
    }
    m
}

fn delta(
    after: &BTreeMap<&'static str, f64>,
    before: &BTreeMap<&'static str, f64>,
) -> BTreeMap<&'static str, f64> {
    after
        .iter()
        .map(|(k, v)| (*k, v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slow_and_oversized_connections_on_a_node_and_through_nginx() {
    let farm = AbuseFarm::start(AbuseOpts::default()).await;
    let fds = raise_fd_limit();
    assert!(
        fds >= 9_000,
        "this test holds 8,000 sockets; the fd limit is {fds}"
    );
    let targets = [
        ("node n1", farm.nodes[0].addr(), true),
        ("nginx", farm.nginx.addr(), false),
    ];
    for (name, dst, is_node) in targets {
        // 5,000 idle and 3,000 slow (a header byte every 2 s) connections.
        let before = conn_counters(&farm).await;
        let stop = CancellationToken::new();
        let probing = probe(dst, is_node, stop.clone());
        let t0 = Instant::now();
        let (idle, idle_failed) = open_many(dst, 1, 5_000).await;
        let (slow, slow_failed) = open_many(dst, 2, 3_000).await;
        let opened = t0.elapsed();
        let slow = std::sync::Arc::new(slow);
        let drip = {
            let (slow, stop) = (slow.clone(), stop.clone());
            tokio::spawn(async move {
                for s in slow.iter() {
                    let _ = s.try_write(b"GET /live/w0/index.m3u8 HTTP/1.1\r\n");
                }
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                    for s in slow.iter() {
                        let _ = s.try_write(b"X");
                    }
                }
            })
        };
        let open_after_burst = (still_open(&idle), still_open(&slow));
        let idle_closed = wait_all_closed(&idle, Duration::from_secs(20)).await;
        let slow_closed = wait_all_closed(&slow, Duration::from_secs(20)).await;
        stop.cancel();
        let _ = drip.await;
        let (worst, failures, probes) = probing.await.expect("probe");
        let counters = delta(&conn_counters(&farm).await, &before);
        println!(
            "{name}: 5,000 idle + 3,000 slow connections opened in {:.1}s ({} + {} connects failed); \
still open right after: {} idle, {} slow; all idle closed after {:?}, all slow after {:?} (from the end of the burst); \
{probes} probes from 127.0.0.1 meanwhile, slowest {:.0} ms, failures {:?}; node counters {counters:?}; worst viewer gap {:.2}s",
            opened.as_secs_f64(),
            idle_failed,
            slow_failed,
            open_after_burst.0,
            open_after_burst.1,
            idle_closed,
            slow_closed,
            worst.as_secs_f64() * 1000.0,
            failures,
            farm.worst_gap().as_secs_f64()
        );
        assert!(
            idle_closed.is_ok(),
            "{name} kept idle connections open: {idle_closed:?}"
        );
        assert!(
            slow_closed.is_ok(),
            "{name} kept slow connections open: {slow_closed:?}"
        );
        assert!(failures.is_empty(), "{name}: probes failed: {failures:?}");
        assert!(
            worst < Duration::from_secs(2),
            "{name}: a probe took {worst:?}"
        );
        if is_node {
            assert!(
                counters["evicted"] + counters["refused"] > 0.0,
                "the node never hit its connection cap: {counters:?}"
            );
            // Accept errors (EMFILE while evicted sockets are still closing) are counted and
            // logged, never silent.
            let log = farm.nodes[0].log();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("cannot accept connections"))
                .collect();
            println!("node n1 accept-error log lines: {lines:?}");
            assert_eq!(
                counters["accept errors"] > 0.0,
                !lines.is_empty(),
                "accept errors counted {} but logged {} times",
                counters["accept errors"],
                lines.len()
            );
        }
        drop(idle);
        drop(slow);

        // 2,500 connections each sending an unterminated 390 KB header.
        let before = conn_counters(&farm).await;
        let t0 = Instant::now();
        let mut big = b"GET /live/w0/index.m3u8 HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        big.resize(big.len() + 390 * 1024, b'a');
        let big: std::sync::Arc<[u8]> = big.into();
        let tasks: Vec<_> = (0..2_500)
            .map(|i| {
                let (src, big) = (attacker_ip(3, i / 50), big.clone());
                tokio::spawn(async move { oversized_header(src, dst, &big).await })
            })
            .collect();
        let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
        for t in tasks {
            *outcomes.entry(t.await.expect("join")).or_default() += 1;
        }
        let counters = delta(&conn_counters(&farm).await, &before);
        println!(
            "{name}: 2,500 unterminated 390 KB headers over in {:.1}s: {outcomes:?}; node counters {counters:?}; \
node peaks (RSS KiB, fds) {:?}",
            t0.elapsed().as_secs_f64(),
            farm.peaks()
        );
        assert!(
            !outcomes.keys().any(|k| k.starts_with("still open")),
            "{name} kept an oversized header's connection open: {outcomes:?}"
        );
    }
    farm.finish("idle, slow and oversized connections").await;
}

/// Sends `big` (a request line and 390 KB of one header, never ended), then waits (up to 15 s) for
/// the other side to answer or close. What happened, in words.
async fn oversized_header(src: IpAddr, dst: SocketAddr, big: &[u8]) -> String {
    let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(5), connect_from(src, dst)).await
    else {
        return "connect failed".into();
    };
    let wrote = tokio::time::timeout(Duration::from_secs(15), s.write_all(big)).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut answer)).await;
    let status = String::from_utf8_lossy(&answer)
        .split_whitespace()
        .nth(1)
        .map(|s| format!("answered {s}"));
    match (wrote, read, status) {
        (_, Ok(_), Some(st)) => st,
        (Ok(Err(_)), _, None) | (_, Ok(Err(_)), None) => "reset".into(),
        (_, Ok(Ok(_)), None) => "closed without an answer".into(),
        (_, Err(_), _) => "still open after 15 s".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guessing_unknown_ids_a_forged_reason_and_bad_ranges_are_refused_cheaply() {
    let farm = farm_with_extra_channels(1).await;
    let node = &farm.nodes[0];
    let dst = node.addr();

    // Token guessing from one address, 20 at a time for 3 s.
    let attacker = attacker_ip(4, 0);
    let t0 = Instant::now();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut guess = 0usize;
    while t0.elapsed() < Duration::from_secs(3) {
        let batch: Vec<_> = (0..20)
            .map(|_| {
                guess += 1;
                let auth = format!("Authorization: Bearer guess-{guess:08}-abcdef\r\n");
                tokio::spawn(async move {
                    raw_get(
                        attacker,
                        dst,
                        "/admin/streams",
                        &auth,
                        Duration::from_secs(5),
                    )
                    .await
                })
            })
            .collect();
        for t in batch {
            let a = t.await.expect("join").expect("an answer");
            *statuses.entry(a.status).or_default() += 1;
            if a.status == 429 {
                assert!(a.header("retry-after").is_some(), "{}", a.head);
            }
        }
    }
    let wrong = statuses.get(&401).copied().unwrap_or(0);
    let throttled = statuses.get(&429).copied().unwrap_or(0);
    let metrics = farm.node_metrics(0).await;
    let logged: Vec<String> = node
        .log()
        .lines()
        .filter(|l| l.contains("admin API: missing or wrong bearer token"))
        .map(str::to_string)
        .collect();
    println!(
        "admin token guessing: {guess} guesses in {:.1}s from one address: {statuses:?}; \
node counted {} failures, {} throttled; log lines: {}",
        t0.elapsed().as_secs_f64(),
        metric_value(&metrics, "farm_node_admin_auth_failures_total"),
        metric_value(&metrics, "farm_node_admin_auth_throttled_total"),
        logged.len()
    );
    assert_eq!(wrong + throttled, guess, "only 401 and 429: {statuses:?}");
    assert!(
        wrong <= 12,
        "{wrong} guesses were checked in 3 s: the delay does not grow"
    );
    assert_eq!(
        metric_value(&metrics, "farm_node_admin_auth_failures_total"),
        wrong as f64
    );
    assert_eq!(
        logged.len(),
        1,
        "one log line per address per minute: {logged:#?}"
    );
    assert!(logged[0].contains(&attacker.to_string()), "{}", logged[0]);
    let log = node.log();
    assert!(!log.contains("guess-"), "a guessed token reached the log");
    assert!(!log.contains(ADMIN_TOKEN), "the token reached the log");
    // While it waits, even the right token is not checked for that address (429); another address
    // is not affected (200).
    let right = format!("Authorization: Bearer {ADMIN_TOKEN}\r\n");
    for (from, want) in [(attacker, 429), (attacker_ip(4, 1), 200)] {
        let a = raw_get(from, dst, "/admin/streams", &right, Duration::from_secs(5))
            .await
            .expect("answer");
        assert_eq!(a.status, want, "the right token from {from}: {}", a.head);
    }

    // Unknown channel ids: the same one 2,000 times, then 2,000 different ones, from one address.
    let unknown = reqwest::Client::builder()
        .local_address(attacker_ip(5, 0))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let base = node.base_url();
    for (what, same) in [
        ("the same unknown id", true),
        ("2,000 different unknown ids", false),
    ] {
        let calls_before = farm.redis.command_calls().await.values().sum::<u64>();
        let lookups_before = farm
            .metric("farm_node_request_path_redis_calls_total")
            .await;
        let t0 = Instant::now();
        let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
        for batch in 0..100 {
            let reqs: Vec<_> = (0..20)
                .map(|k| {
                    let id = if same {
                        "no-such-channel".to_string()
                    } else {
                        format!("nope-{}", batch * 20 + k)
                    };
                    unknown.get(format!("{base}/live/{id}/index.m3u8")).send()
                })
                .collect();
            for r in futures::future::join_all(reqs).await {
                *statuses
                    .entry(r.expect("answer").status().as_u16())
                    .or_default() += 1;
            }
        }
        let calls = farm.redis.command_calls().await.values().sum::<u64>() - calls_before;
        let lookups = farm
            .metric("farm_node_request_path_redis_calls_total")
            .await
            - lookups_before;
        println!(
            "{what} 2,000 times from one address in {:.1}s: {statuses:?}; the node looked up Redis {lookups} times (all Redis commands meanwhile, viewers and keepalives included: {calls}); unknown-id cache hits {}, rate limited {}",
            t0.elapsed().as_secs_f64(),
            farm.metric("farm_node_unknown_channel_hits_total").await,
            farm.metric("farm_node_first_requests_limited_total").await
        );
        assert_eq!(
            statuses.values().sum::<usize>(),
            2000,
            "{what}: every request answered"
        );
        assert!(
            statuses.keys().all(|s| *s == 404 || *s == 429),
            "{what}: only 404 and 429: {statuses:?}"
        );
        assert!(
            lookups <= 60.0,
            "{what}: {lookups} Redis lookups for 2,000 requests"
        );
    }

    // A command's reason cannot forge a log line or a metric.
    let local: IpAddr = "127.0.0.1".parse().expect("ip");
    let a = raw_get(
        local,
        dst,
        "/live/b0/index.m3u8",
        "",
        Duration::from_secs(20),
    )
    .await
    .expect("start b0");
    assert_eq!(a.status, 200, "{}", a.head);
    {
        let mut c = farm.redis.conn().await;
        let _: String = redis::cmd("XADD")
            .arg("farm:cmd:n1")
            .arg("*")
            .arg("op")
            .arg("stop")
            .arg("channel")
            .arg("b0")
            .arg("reason")
            .arg("x\nERROR forged line\n# EOF\nfarm_node_forged_total 1")
            .arg("by")
            .arg("abuse-test")
            .query_async(&mut c)
            .await
            .expect("XADD");
    }
    let metrics = farm_tests::wait::eventually(
        "the stop command to be applied",
        Duration::from_secs(20),
        || async {
            let m = farm.node_metrics(0).await;
            (metric_value(&m, "farm_node_channel_stops_total{reason=\"other\"}") >= 1.0)
                .then_some(m)
        },
    )
    .await;
    assert!(
        !metrics.contains("forged"),
        "a reason forged a metric:\n{metrics}"
    );
    assert_eq!(metrics.matches("# EOF").count(), 1);
    let log = node.log();
    let forged: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.starts_with("ERROR forged")
                || l.starts_with("# EOF")
                || l.starts_with("farm_node_forged")
        })
        .collect();
    assert!(forged.is_empty(), "forged log lines: {forged:?}");
    assert!(
        log.contains("x\\nERROR forged line\\n# EOF"),
        "the reason, escaped, in one line"
    );
    println!(
        "a stop reason with newlines and # EOF: one escaped log line, counted as reason=\"other\""
    );

    // Range on a segment the node serves itself.
    let (owner_idx, seg) = newest_segment(&farm).await;
    let owner = farm.nodes[owner_idx].addr();
    let path = format!("/live/w0/{seg}");
    let full = raw_get(local, owner, &path, "", Duration::from_secs(5))
        .await
        .expect("segment");
    assert_eq!(full.status, 200, "{}", full.head);
    let len = full.body.len();
    assert!(len > 1000, "a real segment: {len} bytes");
    assert_eq!(full.header("accept-ranges").as_deref(), Some("bytes"));
    let range = |r: &str| {
        let extra = format!("Range: {r}\r\n");
        let path = path.clone();
        async move {
            raw_get(local, owner, &path, &extra, Duration::from_secs(5))
                .await
                .expect("answer")
        }
    };
    // What a Range gets: 206 with those bytes, 416 naming the length, or the whole segment (200).
    enum Want {
        Part(usize, usize),
        Unsatisfiable,
        Whole,
    }
    let cases = [
        ("bytes=0-99".to_string(), Want::Part(0, 99)),
        (
            format!("bytes={}-", len - 10),
            Want::Part(len - 10, len - 1),
        ),
        ("bytes=-188".to_string(), Want::Part(len - 188, len - 1)),
        (
            "bytes=100-99999999999999999999999".to_string(),
            Want::Part(100, len - 1),
        ),
        (format!("bytes={len}-"), Want::Unsatisfiable),
        ("bytes=-0".to_string(), Want::Unsatisfiable),
        ("bytes=5-2".to_string(), Want::Unsatisfiable),
        ("bytes=abc".to_string(), Want::Unsatisfiable),
        ("bytes=".to_string(), Want::Unsatisfiable),
        ("bytes=1-2-3".to_string(), Want::Unsatisfiable),
        ("items=0-10".to_string(), Want::Whole),
        ("bytes=0-1,5-6".to_string(), Want::Whole),
    ];
    let mut seen = Vec::new();
    for (r, want) in &cases {
        let a = range(r).await;
        let (status, content_range) = match want {
            Want::Part(first, last) => {
                assert_eq!(a.body, full.body[*first..=*last], "{r}: the right bytes");
                (206, Some(format!("bytes {first}-{last}/{len}")))
            }
            Want::Unsatisfiable => (416, Some(format!("bytes */{len}"))),
            Want::Whole => {
                assert_eq!(a.body.len(), len, "{r}: the whole segment");
                (200, None)
            }
        };
        assert_eq!(a.status, status, "{r}: {}", a.head);
        if content_range.is_some() {
            assert_eq!(a.header("content-range"), content_range, "{r}");
        }
        seen.push(format!("{r} -> {status}"));
    }
    println!("Range on a {len}-byte segment served by the node: {seen:?}");
    farm.finish("admin token guessing, unknown ids, a forged reason and bad ranges")
        .await;
}

/// The node that runs `w0` (index into `farm.nodes`) and its newest segment's file name.
async fn newest_segment(farm: &AbuseFarm) -> (usize, String) {
    let owners = farm.owners().await;
    let owner = owners[0].as_ref().expect("w0 has an owner").0.clone();
    let idx = farm
        .nodes
        .iter()
        .position(|n| n.node_id() == owner)
        .expect("owner is a node of the farm");
    let dir = farm.nodes[idx].hls_root().join("w0");
    let mut segs: Vec<(std::time::SystemTime, String)> = std::fs::read_dir(&dir)
        .expect("w0's folder")
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let t = e.metadata().ok()?.modified().ok()?;
            name.ends_with(".ts").then_some((t, name))
        })
        .collect();
    segs.sort();
    // The one before the newest: FFmpeg may still be writing the newest.
    let pick = segs.len().saturating_sub(2);
    (idx, segs.get(pick).expect("segments on disk").1.clone())
}

#[test]
fn a_short_admin_token_keeps_the_node_from_starting_and_is_not_echoed() {
    let bin = farm_tests::bins::bin_path("farm-node");
    for (how, token) in [("flag", "short-token"), ("env", "0123456789abcde")] {
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["--node-id", "short", "--redis-url", "redis://127.0.0.1:1/"])
            .env_clear()
            .stdin(std::process::Stdio::null());
        if how == "flag" {
            cmd.args(["--admin-token", token]);
        } else {
            cmd.env("FARM_ADMIN_TOKEN", token);
        }
        let out = cmd.output().expect("run farm-node");
        let err = String::from_utf8_lossy(&out.stderr);
        println!(
            "farm-node with a {}-byte admin token ({how}): exit {:?}: {}",
            token.len(),
            out.status.code(),
            err.trim()
        );
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("at least 16"), "{err}");
        assert!(!err.contains(token), "the token is echoed: {err}");
    }
}
