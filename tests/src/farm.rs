//! [`Farm`]: a whole farm for one test, from [`Farm::builder`]: its own redis-server, optionally the
//! fake IPTV provider, channels added with farmctl, N nodes and M coordinators on one temp root, and
//! optionally nginx in front of the nodes, all with one named timing profile ([`Timing`]).
//!
//! Everything is started in that order (channels before the daemons, as an operator would) and
//! stopped in the reverse one when the farm is dropped: nginx, coordinators, nodes, provider, temp
//! root, Redis. A test that needs a daemon as its own value (to kill it, or to borrow two at once)
//! takes them out with [`Farm::take_nodes`] / [`Farm::take_coordinators`]; those are then dropped
//! before the farm.

use crate::coordinator::{CoordinatorOpts, CoordinatorProcess};
use crate::nginx::{NginxOpts, NginxServer};
use crate::node::{NodeOpts, NodeProcess};
use crate::provider::FakeProvider;
use crate::redis::RedisServer;
use std::time::Duration;

/// Node settings of [`Timing::Fast`]: 1 s segments, lease and node TTL 3 s, 500 ms access flush,
/// quick backoff and stop grace.
pub const FAST: &[&str] = &[
    "--hls-time",
    "1s",
    "--lease-ttl",
    "3s",
    "--node-ttl",
    "3s",
    "--access-flush",
    "500ms",
    "--backoff-base",
    "200ms",
    "--backoff-max",
    "2s",
    "--stop-grace",
    "2s",
];

/// Coordinator settings of [`Timing::Fast`]: idle timeout 30 s, tick 1 s, node, lease and leader
/// TTL 3 s (the nodes' TTLs).
pub const FAST_COORDINATOR: &[&str] = &[
    "--idle-timeout",
    "30s",
    "--tick",
    "1s",
    "--node-ttl",
    "3s",
    "--lease-ttl",
    "3s",
    "--leader-ttl",
    "3s",
];

/// A farm's timing: the settings every node and every coordinator starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Timing {
    /// Short TTLs for quick end-to-end tests: [`FAST`] for nodes, [`FAST_COORDINATOR`] for
    /// coordinators.
    #[default]
    Fast,
}

impl Timing {
    /// The node arguments of this profile.
    pub fn node_args(self) -> &'static [&'static str] {
        match self {
            Timing::Fast => FAST,
        }
    }

    /// The coordinator arguments of this profile.
    pub fn coordinator_args(self) -> &'static [&'static str] {
        match self {
            Timing::Fast => FAST_COORDINATOR,
        }
    }
}

/// `base` (flag, value pairs) with some values replaced, e.g. `[("--tick", "500ms")]`. Panics when a
/// flag is not in `base` (a daemon refuses a flag given twice, so replacing is the only way).
pub fn with_values(base: &[&str], overrides: &[(&str, &str)]) -> Vec<String> {
    let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
    for (flag, value) in overrides {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{flag} is not in {base:?}"));
        args[i + 1] = value.to_string();
    }
    args
}

/// [`with_values`] with owned overrides (the builder's).
fn with_owned_values(base: &[&str], values: &[(String, String)]) -> Vec<String> {
    let values: Vec<(&str, &str)> = values
        .iter()
        .map(|(f, v)| (f.as_str(), v.as_str()))
        .collect();
    with_values(base, &values)
}

/// `base` (flag, value pairs) without the pairs of these flags.
pub fn without(base: &[&str], flags: &[&str]) -> Vec<String> {
    base.chunks(2)
        .filter(|pair| !flags.contains(&pair[0]))
        .flatten()
        .map(|s| s.to_string())
        .collect()
}

/// [`FAST_COORDINATOR`] with some values replaced and the flags `left_out` left out (the
/// coordinator's default then holds), e.g. `coordinator_args(&[("--tick", "500ms")], &[])`.
pub fn coordinator_args(values: &[(&str, &str)], left_out: &[&str]) -> Vec<String> {
    let kept = without(FAST_COORDINATOR, left_out);
    let kept: Vec<&str> = kept.iter().map(String::as_str).collect();
    with_values(&kept, values)
}

/// The duration `flag` has in `args` (flag, value pairs), read as the daemons read it
/// ([`farm_proto::duration::parse`]). Panics when the flag is missing or its value is not a duration.
fn duration_of(args: &[String], flag: &str) -> Duration {
    let value = args
        .iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .unwrap_or_else(|| panic!("{flag} is not in {args:?}"));
    farm_proto::duration::parse(value).unwrap_or_else(|e| panic!("{flag}: {e}"))
}

/// Where a channel added by the builder reads from.
#[derive(Debug, Clone)]
enum Source {
    /// A path on the farm's fake provider.
    Provider(String),
    /// A URL as it is.
    Url(String),
}

/// What [`Farm::builder`] starts.
#[derive(Debug, Clone, Default)]
pub struct FarmBuilder {
    timing: Timing,
    provider: bool,
    channels: Vec<(String, Source, Vec<String>)>,
    nodes: Vec<String>,
    fake_ffmpeg: bool,
    node_values: Vec<(String, String)>,
    node_extra: Vec<String>,
    coordinators: Vec<String>,
    coordinator_values: Vec<(String, String)>,
    coordinator_extra: Vec<String>,
    access_sockets: bool,
    nginx: bool,
}

impl FarmBuilder {
    /// The timing profile (default [`Timing::Fast`]).
    pub fn timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// Starts the fake IPTV provider.
    pub fn provider(mut self) -> Self {
        self.provider = true;
        self
    }

    /// Adds a channel reading `path` on the fake provider (which this turns on).
    pub fn provider_channel(self, id: &str, path: &str) -> Self {
        self.provider_channel_with(id, path, &[])
    }

    /// [`FarmBuilder::provider_channel`] with more `farmctl channel add` arguments (e.g. `--name`).
    pub fn provider_channel_with(mut self, id: &str, path: &str, extra: &[&str]) -> Self {
        self.provider = true;
        self.channels.push((
            id.to_string(),
            Source::Provider(path.to_string()),
            extra.iter().map(|s| s.to_string()).collect(),
        ));
        self
    }

    /// Adds a channel reading `url`.
    pub fn channel(self, id: &str, url: impl Into<String>) -> Self {
        self.channel_with(id, url, &[])
    }

    /// Adds a channel reading `url`, with more `farmctl channel add` arguments (e.g. `--pinned`).
    pub fn channel_with(mut self, id: &str, url: impl Into<String>, extra: &[&str]) -> Self {
        self.channels.push((
            id.to_string(),
            Source::Url(url.into()),
            extra.iter().map(|s| s.to_string()).collect(),
        ));
        self
    }

    /// Adds channels reading the fake FFmpeg's source ([`crate::coordinator::fake_source`]), a
    /// segment every `seg_ms`.
    pub fn fake_channels(self, ids: &[&str], seg_ms: u64) -> Self {
        ids.iter().fold(self, |b, id| {
            b.channel(id, crate::coordinator::fake_source(id, seg_ms))
        })
    }

    /// Every node takes access records on a datagram socket, `--access-socket <root>/<id>-access.sock`
    /// ([`Farm::access_socket`]).
    pub fn access_sockets(mut self) -> Self {
        self.access_sockets = true;
        self
    }

    /// Nodes with these ids, each with its own folder `<root>/<id>`.
    pub fn nodes(mut self, ids: &[&str]) -> Self {
        self.nodes.extend(ids.iter().map(|s| s.to_string()));
        self
    }

    /// The nodes run fake-ffmpeg rather than the real one.
    pub fn fake_ffmpeg(mut self) -> Self {
        self.fake_ffmpeg = true;
        self
    }

    /// Replaces a value of the profile's node arguments, e.g. `("--lease-ttl", "5s")`.
    pub fn node_value(mut self, flag: &str, value: &str) -> Self {
        self.node_values.push((flag.to_string(), value.to_string()));
        self
    }

    /// Appends arguments to every node's command line.
    pub fn node_args(mut self, args: &[&str]) -> Self {
        self.node_extra.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Coordinators with these ids.
    pub fn coordinators(mut self, ids: &[&str]) -> Self {
        self.coordinators.extend(ids.iter().map(|s| s.to_string()));
        self
    }

    /// Replaces a value of the profile's coordinator arguments, e.g. `("--idle-timeout", "5s")`.
    pub fn coordinator_value(mut self, flag: &str, value: &str) -> Self {
        self.coordinator_values
            .push((flag.to_string(), value.to_string()));
        self
    }

    /// Appends arguments to every coordinator's command line.
    pub fn coordinator_args(mut self, args: &[&str]) -> Self {
        self.coordinator_extra
            .extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Starts nginx (auth mode) in front of all the nodes.
    pub fn nginx(mut self) -> Self {
        self.nginx = true;
        self
    }

    /// Promise 9's bound for this farm ([`crate::invariants::settle_time`]): twice its nodes'
    /// `--node-ttl` plus its coordinators' `--tick`, with the builder's values.
    pub fn settle_time(&self) -> Duration {
        let node = with_owned_values(self.timing.node_args(), &self.node_values);
        let coordinator =
            with_owned_values(self.timing.coordinator_args(), &self.coordinator_values);
        crate::invariants::settle_time(
            duration_of(&node, "--node-ttl"),
            duration_of(&coordinator, "--tick"),
        )
    }

    /// Starts the farm: Redis, provider, channels, nodes, coordinators, nginx, in that order.
    pub async fn start(self) -> Farm {
        self.start_with(RedisServer::start()).await
    }

    /// [`FarmBuilder::start`] on a Redis the test started itself (e.g. with its own arguments).
    pub async fn start_with(self, redis: RedisServer) -> Farm {
        let provider = if self.provider {
            Some(FakeProvider::start().await)
        } else {
            None
        };
        let root = tempfile::tempdir().expect("tempdir for the farm's nodes");
        let mut farm = Farm {
            nginx: None,
            coordinators: Vec::new(),
            nodes: Vec::new(),
            provider,
            root,
            redis,
            builder: self,
        };
        for (id, source, extra) in farm.builder.channels.clone() {
            let url = match source {
                Source::Url(url) => url,
                Source::Provider(path) => farm.provider().url(&path),
            };
            let mut args = vec!["channel", "add", &id, &url];
            args.extend(extra.iter().map(String::as_str));
            crate::coordinator::farmctl_ok(&farm.url(), &args);
        }
        for id in farm.builder.nodes.clone() {
            let node = NodeProcess::spawn(farm.node_opts(&id));
            farm.nodes.push(node);
        }
        for id in farm.builder.coordinators.clone() {
            let co = CoordinatorProcess::spawn(farm.coordinator_opts(&id));
            farm.coordinators.push(co);
        }
        if farm.builder.nginx {
            farm.nginx = Some(NginxServer::start(&NginxOpts::for_nodes(&farm.nodes)));
        }
        farm
    }
}

/// A running farm (see the module docs). Fields are in drop order.
pub struct Farm {
    pub nginx: Option<NginxServer>,
    pub coordinators: Vec<CoordinatorProcess>,
    pub nodes: Vec<NodeProcess>,
    pub provider: Option<FakeProvider>,
    pub root: tempfile::TempDir,
    pub redis: RedisServer,
    builder: FarmBuilder,
}

impl Farm {
    /// What to start; [`FarmBuilder::start`] starts it.
    pub fn builder() -> FarmBuilder {
        FarmBuilder::default()
    }

    /// The farm most tests want: nodes n1 and n2 and coordinator c1, [`Timing::Fast`].
    pub fn pair() -> FarmBuilder {
        Farm::builder().nodes(&["n1", "n2"]).coordinators(&["c1"])
    }

    /// The farm of a single-node test: node n1 ([`Timing::Fast`], real FFmpeg) and the fake provider
    /// with these channels, `(id, path on the provider)`.
    pub async fn one_node(channels: &[(&str, &str)]) -> Farm {
        channels
            .iter()
            .fold(Farm::builder(), |b, (id, path)| {
                b.provider_channel(id, path)
            })
            .nodes(&["n1"])
            .start()
            .await
    }

    /// The farm's Redis URL.
    pub fn url(&self) -> String {
        self.redis.url()
    }

    /// The fake provider. Panics when the farm has none.
    pub fn provider(&self) -> &FakeProvider {
        self.provider
            .as_ref()
            .expect("the farm has no provider: Farm::builder().provider()")
    }

    /// The options a node `id` of this farm starts with: its folder `<root>/<id>`, the profile's
    /// node arguments (with the builder's values) and the builder's extra arguments.
    pub fn node_opts(&self, id: &str) -> NodeOpts {
        let mut opts = NodeOpts::new(id, self.url(), self.root.path().join(id))
            .args(with_owned_values(
                self.builder.timing.node_args(),
                &self.builder.node_values,
            ))
            .args(self.builder.node_extra.iter().cloned());
        if self.builder.access_sockets {
            let sock = self.access_socket(id).to_string_lossy().to_string();
            opts = opts.args(["--access-socket".to_string(), sock]);
        }
        if self.builder.fake_ffmpeg {
            opts.with_fake_ffmpeg()
        } else {
            opts
        }
    }

    /// The access socket of node `id` ([`FarmBuilder::access_sockets`]).
    pub fn access_socket(&self, id: &str) -> std::path::PathBuf {
        self.root.path().join(format!("{id}-access.sock"))
    }

    /// Its nginx. Panics when the farm has none.
    pub fn nginx(&self) -> &NginxServer {
        self.nginx
            .as_ref()
            .expect("the farm has no nginx: Farm::builder().nginx()")
    }

    /// The options a coordinator `id` of this farm starts with.
    pub fn coordinator_opts(&self, id: &str) -> CoordinatorOpts {
        CoordinatorOpts::new(id, self.url())
            .args(with_owned_values(
                self.builder.timing.coordinator_args(),
                &self.builder.coordinator_values,
            ))
            .args(self.builder.coordinator_extra.iter().cloned())
    }

    /// Node `id` of [`Farm::nodes`]. Panics when there is none.
    pub fn node(&self, id: &str) -> &NodeProcess {
        self.nodes
            .iter()
            .find(|n| n.node_id() == id)
            .unwrap_or_else(|| panic!("the farm has no node {id}"))
    }

    /// Coordinator `id` of [`Farm::coordinators`]. Panics when there is none.
    pub fn coordinator(&self, id: &str) -> &CoordinatorProcess {
        self.coordinators
            .iter()
            .find(|c| c.id() == id)
            .unwrap_or_else(|| panic!("the farm has no coordinator {id}"))
    }

    /// Starts one more node `id` with the farm's node options (not kept in [`Farm::nodes`]).
    pub fn spawn_node(&self, id: &str) -> NodeProcess {
        NodeProcess::spawn(self.node_opts(id))
    }

    /// Starts one more coordinator `id` with the farm's options (not kept in [`Farm::coordinators`]).
    pub fn spawn_coordinator(&self, id: &str) -> CoordinatorProcess {
        CoordinatorProcess::spawn(self.coordinator_opts(id))
    }

    /// Adds a channel with farmctl; panics unless it succeeds.
    pub fn add_channel(&self, id: &str, url: &str) {
        crate::coordinator::farmctl_ok(&self.url(), &["channel", "add", id, url]);
    }

    /// [`crate::fixtures::assert_settled`] over `nodes` (of this farm, or taken out of it) after
    /// the farm's [`FarmBuilder::settle_time`].
    pub async fn assert_settled(&self, nodes: &[&NodeProcess], what: &str) {
        let settle = self.builder.settle_time();
        crate::fixtures::assert_settled(&self.redis, nodes, settle, what).await;
    }

    /// Takes the nodes out of the farm, to be owned by the test. Panics unless there are `N`.
    pub fn take_nodes<const N: usize>(&mut self) -> [NodeProcess; N] {
        std::mem::take(&mut self.nodes)
            .try_into()
            .unwrap_or_else(|v: Vec<NodeProcess>| panic!("{} nodes, not {N}", v.len()))
    }

    /// [`Farm::take_nodes`] and [`Farm::take_coordinators`] at once.
    pub fn take_daemons<const N: usize, const M: usize>(
        &mut self,
    ) -> ([NodeProcess; N], [CoordinatorProcess; M]) {
        (self.take_nodes(), self.take_coordinators())
    }

    /// Takes the coordinators out of the farm. Panics unless there are `N`.
    pub fn take_coordinators<const N: usize>(&mut self) -> [CoordinatorProcess; N] {
        std::mem::take(&mut self.coordinators)
            .try_into()
            .unwrap_or_else(|v: Vec<CoordinatorProcess>| {
                panic!("{} coordinators, not {N}", v.len())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_replaced_and_flags_dropped_in_place() {
        let base = &["--a", "1", "--b", "2", "--c", "3"];
        assert_eq!(
            with_values(base, &[("--b", "9")]),
            ["--a", "1", "--b", "9", "--c", "3"]
        );
        assert_eq!(without(base, &["--a", "--c"]), ["--b", "2"]);
    }

    #[test]
    fn the_settle_time_follows_the_builders_node_ttl_and_tick() {
        assert_eq!(Farm::builder().settle_time(), Duration::from_secs(7));
        let farm = Farm::builder()
            .node_value("--node-ttl", "4s")
            .coordinator_value("--tick", "500ms");
        assert_eq!(farm.settle_time(), Duration::from_millis(8500));
    }
}
