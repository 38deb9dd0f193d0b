//! [`CoordinatorProcess`]: the real `farm-coordinator` binary as a child process, plus what the
//! coordinator tests share: readers of the farm's Redis state for assertions ([`events`], [`leader`],
//! [`owner`]), [`ffmpegs_for`] (a channel's FFmpegs on one node), [`node_args`] (short TTLs) and
//! [`fake_source`] (a fake-ffmpeg URL).
//!
//! A coordinator runs as a [`Daemon`] with `RUST_LOG=info,farm_coordinator=debug`, and is ready once
//! its `/healthz` answers (200 or 503: it answers before it has reached Redis). On drop it is
//! SIGKILLed and reaped; when the test panics, its log tail goes to stderr.

use std::collections::HashMap;
use std::path::Path;

use redis::aio::MultiplexedConnection;

pub use crate::daemon::{http_get, metric_value, READY_TIMEOUT};
use crate::daemon::{Daemon, DaemonSpec, Ready};

/// How to start a coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorOpts {
    pub id: String,
    pub redis_url: String,
    /// Appended after the harness's own arguments (`--id`, `--redis-url`, `--listen`).
    pub extra_args: Vec<String>,
    /// Added to the cleared environment.
    pub env: Vec<(String, String)>,
}

impl CoordinatorOpts {
    pub fn new(id: impl Into<String>, redis_url: impl Into<String>) -> CoordinatorOpts {
        CoordinatorOpts {
            id: id.into(),
            redis_url: redis_url.into(),
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

crate::daemon::args_and_env_builders!(CoordinatorOpts);

/// A running `farm-coordinator`: a [`Daemon`] (signals, log, `/metrics`, exit; reached through
/// `Deref`) with its options.
pub struct CoordinatorProcess {
    daemon: Daemon,
    opts: CoordinatorOpts,
}

impl CoordinatorProcess {
    /// Starts `farm-coordinator` and waits until `/healthz` answers. Panics with its log if it exits
    /// first or never answers.
    pub fn spawn(opts: CoordinatorOpts) -> CoordinatorProcess {
        let daemon = Daemon::spawn(DaemonSpec {
            bin: "farm-coordinator",
            id_flag: "--id",
            label: &opts.id,
            redis_url: &opts.redis_url,
            own_args: Vec::new(),
            extra_args: &opts.extra_args,
            rust_log: "info,farm_coordinator=debug",
            env: &opts.env,
            listen: None,
            ready: Ready::Answers,
        });
        CoordinatorProcess { daemon, opts }
    }

    pub fn id(&self) -> &str {
        &self.opts.id
    }

    pub fn opts(&self) -> &CoordinatorOpts {
        &self.opts
    }
}

crate::daemon::deref_to_daemon!(CoordinatorProcess);

/// One entry of `farm:events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FarmEvent {
    pub id: String,
    pub fields: HashMap<String, String>,
}

impl FarmEvent {
    /// A field, "" when absent.
    pub fn get(&self, name: &str) -> &str {
        self.fields.get(name).map_or("", String::as_str)
    }

    /// The `event` field.
    pub fn kind(&self) -> &str {
        self.get("event")
    }
}

/// Every entry of `<prefix>:events`, oldest first.
pub async fn events(conn: &mut MultiplexedConnection, prefix: &str) -> Vec<FarmEvent> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("{prefix}:events"))
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("XRANGE events");
    reply
        .ids
        .into_iter()
        .map(|e| FarmEvent {
            fields: e
                .map
                .iter()
                .filter_map(|(k, v)| {
                    redis::from_redis_value::<String>(v.clone())
                        .ok()
                        .map(|v| (k.clone(), v))
                })
                .collect(),
            id: e.id,
        })
        .collect()
}

/// The coordinator id in `<prefix>:leader`, if any.
pub async fn leader(conn: &mut MultiplexedConnection, prefix: &str) -> Option<String> {
    let v: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}:leader"))
        .query_async(conn)
        .await
        .expect("GET leader");
    v.and_then(|v| v.rsplit_once(':').map(|(id, _)| id.to_string()))
}

/// `farm-node` arguments for coordinator tests: [`crate::farm::FAST`] with lease and node TTL `ttl`.
pub fn node_args(ttl: &str) -> Vec<String> {
    crate::farm::with_values(
        crate::farm::FAST,
        &[("--lease-ttl", ttl), ("--node-ttl", ttl)],
    )
}

/// Waits up to `timeout` until `farm:owner:<channel>` is gone (the channel runs nowhere); panics
/// naming `what` otherwise.
pub async fn wait_unowned(
    conn: &MultiplexedConnection,
    channel: &str,
    what: &str,
    timeout: std::time::Duration,
) {
    crate::wait::eventually(what, timeout, || {
        let mut c = conn.clone();
        async move { owner(&mut c, "farm", channel).await.is_none().then_some(()) }
    })
    .await;
}

/// Seeds `n` running channels `ch<i>`, owned alternately by n1 and n2 at gen 1 (lease 600 s), as
/// `claim.lua` leaves them: owner key, the node's stream set, the stream hash (`node` and `fields`)
/// and an access time `now`, or `now - 2 × idle_timeout_ms` for every 100th channel. Returns those
/// idle channels.
pub async fn seed_running_channels(
    c: &mut MultiplexedConnection,
    n: usize,
    now: u64,
    idle_timeout_ms: u64,
    fields: &[(&str, &str)],
) -> redis::RedisResult<Vec<String>> {
    let mut idle = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
        let mut p = redis::pipe();
        for &i in chunk {
            let id = format!("ch{i}");
            let node = if i % 2 == 0 { "n1" } else { "n2" };
            let access = if i % 100 == 0 {
                idle.push(id.clone());
                now - 2 * idle_timeout_ms
            } else {
                now
            };
            let mut hash = vec![("node", node)];
            hash.extend_from_slice(fields);
            p.cmd("SET")
                .arg(format!("farm:owner:{id}"))
                .arg(format!("{node}:1"))
                .arg("PX")
                .arg(600_000)
                .ignore()
                .sadd(format!("farm:node:{node}:streams"), &id)
                .ignore()
                .hset_multiple(format!("farm:stream:{id}"), &hash)
                .ignore()
                .zadd("farm:access", &id, access)
                .ignore();
        }
        let _: () = p.query_async(c).await?;
    }
    Ok(idle)
}

/// Releases channels of n1 and n2 as the nodes' `release.lua` does after a stop: owner key, stream
/// hash, access entry and stream-set membership go.
pub async fn release_channels(
    c: &mut MultiplexedConnection,
    ids: &[String],
) -> redis::RedisResult<()> {
    let mut p = redis::pipe();
    for id in ids {
        p.del(format!("farm:owner:{id}"))
            .ignore()
            .del(format!("farm:stream:{id}"))
            .ignore()
            .zrem("farm:access", id)
            .ignore()
            .srem("farm:node:n1:streams", id)
            .ignore()
            .srem("farm:node:n2:streams", id)
            .ignore();
    }
    p.query_async(c).await
}

/// Waits up to `timeout` until `farm:node:<node>:alive` exists (the node heartbeats); panics naming
/// `what` otherwise.
pub async fn wait_alive(
    conn: &MultiplexedConnection,
    node: &str,
    what: &str,
    timeout: std::time::Duration,
) {
    let key = format!("farm:node:{node}:alive");
    crate::wait::eventually(what, timeout, || {
        let (mut c, key) = (conn.clone(), key.clone());
        async move {
            let alive: bool = redis::AsyncCommands::exists(&mut c, key).await.ok()?;
            alive.then_some(())
        }
    })
    .await;
}

/// Waits up to 10 s for a leader (prefix `farm`); its id.
pub async fn wait_leader(conn: &MultiplexedConnection) -> String {
    crate::wait::eventually("a leader", std::time::Duration::from_secs(10), || {
        let mut c = conn.clone();
        async move { leader(&mut c, "farm").await }
    })
    .await
}

/// Waits up to 10 s for a leader other than `previous`; its id.
pub async fn wait_new_leader(conn: &MultiplexedConnection, previous: &str) -> String {
    crate::wait::eventually("another leader", std::time::Duration::from_secs(10), || {
        let mut c = conn.clone();
        async move { leader(&mut c, "farm").await.filter(|l| l != previous) }
    })
    .await
}

/// A fake-ffmpeg source URL: a segment every `seg_ms` (the fake never opens it).
pub fn fake_source(name: &str, seg_ms: u64) -> String {
    format!("http://127.0.0.1:9/{name}.ts?mode=normal&seg_ms={seg_ms}")
}

/// Runs farmctl and panics with its stderr unless it succeeds; returns its stdout.
pub fn farmctl_ok(redis_url: &str, args: &[&str]) -> String {
    crate::node::output_ok(
        &crate::node::farmctl(redis_url, args),
        &format!("farmctl {args:?}"),
    )
}

/// Live processes (FFmpegs) writing into `<hls_root>/<channel>/`.
pub fn ffmpegs_for(hls_root: &Path, channel: &str) -> Vec<i32> {
    let needle = format!(
        "{}/{channel}/",
        hls_root.display().to_string().trim_end_matches('/')
    );
    crate::procs::processes_with_cmdline_containing(&needle)
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|pid| crate::procs::pid_alive(*pid))
        .collect()
}

/// The `(node, gen)` in `<prefix>:owner:<channel>`, if any.
pub async fn owner(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    channel: &str,
) -> Option<(String, u64)> {
    let v: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}:owner:{channel}"))
        .query_async(conn)
        .await
        .expect("GET owner");
    let v = v?;
    let (n, g) = v.rsplit_once(':')?;
    Some((n.to_string(), g.parse().ok()?))
}
