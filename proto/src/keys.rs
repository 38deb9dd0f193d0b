//! One constructor per Redis key. Nothing else in the farm formats a key name.
//!
//! Every key starts with a configurable prefix (default `farm`), so several farms can share one Redis
//! and an ACL can be limited to `~farm:*`.

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "farm";

/// Builds the farm's key names under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// One constructor per key: `name(args) => "format after the prefix"`.
macro_rules! keys {
    ($($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) => $fmt:literal;)*) => {
        impl Keys {
            $(
                $(#[$doc])*
                pub fn $name(&self, $($arg: $ty),*) -> String {
                    format!(concat!("{}:", $fmt), self.prefix, $($arg = $arg),*)
                }
            )*
        }
    };
}

keys! {
    /// `farm:channel:<id>` hash: the catalog entry (`name`, `url`, `backup_urls`, `profile`, `provider`, `pinned`, `group`).
    channel(id: &str) => "channel:{id}";
    /// `farm:channels` set: the catalog index.
    channels() => "channels";
    /// `farm:catalog:version` counter: bumped by every farmctl catalog write (add, rm, an import's
    /// commit), so an import that checked for existing ids sees a concurrent write and refuses.
    catalog_version() => "catalog:version";
    /// `farm:catalog:gen` counter: numbers imports (their staging lists).
    catalog_gen() => "catalog:gen";
    /// `farm:catalog:import:<gen>` list: one import's channels (JSON), staged in chunks before its
    /// commit, with a TTL until then (an abandoned import disappears by itself); consumed chunk by
    /// chunk as it is applied.
    catalog_staging(gen: u64) => "catalog:import:{gen}";
    /// `farm:catalog:importing` string: the gen of the committed import being applied. While it
    /// exists, every farmctl catalog write first finishes applying it.
    catalog_importing() => "catalog:importing";
    /// `farm:pinned` set: the pinned channels (kept running by the coordinator), maintained with the
    /// catalog's `pinned` field.
    pinned() => "pinned";
    /// `farm:provider:<name>` hash: `max_connections`.
    provider(name: &str) => "provider:{name}";
    /// `farm:provider:<name>:conns` zset: channel -> lease expiry (ms).
    provider_conns(name: &str) => "provider:{name}:conns";
    /// `farm:owner:<id>` string with a PX lease: `<node>:<gen>`.
    owner(id: &str) => "owner:{id}";
    /// `farm:gen:<id>` counter: the fencing token, INCR on every claim.
    gen(id: &str) => "gen:{id}";
    /// `farm:stream:<id>` hash: runtime state of a running channel.
    stream(id: &str) => "stream:{id}";
    /// `farm:timeline:<id>` hash with a TTL: the channel's published HLS timeline (`target`, `last`,
    /// `disc`, `gen`, `at`, `playlist`), recorded by the owner before it publishes a segment, so a new
    /// owner continues it and any node can answer the current playlist.
    timeline(id: &str) => "timeline:{id}";
    /// `farm:access` zset: channel -> last viewer access (ms, Redis time).
    access() => "access";
    /// `farm:node:<node>` hash: the node's description.
    node(node: &str) => "node:{node}";
    /// `farm:node:<node>:alive` string with a PX TTL: the node's incarnation; gone = dead.
    node_alive(node: &str) => "node:{node}:alive";
    /// `farm:nodes` zset: node -> last heartbeat (ms).
    nodes() => "nodes";
    /// `farm:node:<node>:streams` set: channels the node runs.
    node_streams(node: &str) => "node:{node}:streams";
    /// `farm:node:<node>:load` hash: channel -> weight (a copy 1, a transcode its profile's weight),
    /// for the channels in the node's set; the claim script sums it over the set's members only.
    node_load(node: &str) => "node:{node}:load";
    /// `farm:cmd:<node>` stream: commands to one node, read through the consumer group [`CMD_GROUP`].
    cmd(node: &str) => "cmd:{node}";
    /// `farm:recovering` string with a PX TTL: set when a node finds that Redis lost its keys; no
    /// channel is claimed while it exists (every old owner fences first).
    recovering() => "recovering";
    /// `farm:since` string, no TTL: Redis time (ms) of the first node heartbeat this data set saw.
    /// A node that heartbeated before and finds it gone knows Redis lost every key (restarted
    /// empty), not just its own (reaped), and opens the recovery window even if it runs nothing.
    since() => "since";
    /// `farm:events` capped stream: the audit trail.
    events() => "events";
    /// `farm:leader` string with a PX lease: the leading coordinator.
    leader() => "leader";
    /// `farm:leader:epoch` counter: the leader's fencing token.
    leader_epoch() => "leader:epoch";
}

/// The consumer group every node uses on its own command stream.
pub const CMD_GROUP: &str = "node";

/// Approximate cap of `farm:events` (XADD MAXLEN ~).
pub const EVENTS_MAXLEN: usize = 10_000;

/// Approximate cap of a node's command stream `farm:cmd:<node>` (XADD MAXLEN ~), for every writer:
/// far above what a node has pending.
pub const CMD_MAXLEN: usize = 10_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_written_schema() {
        let k = Keys::default();
        assert_eq!(k.channel("bbc1"), "farm:channel:bbc1");
        assert_eq!(k.owner("bbc1"), "farm:owner:bbc1");
        assert_eq!(k.node_streams("n1"), "farm:node:n1:streams");
        assert_eq!(k.node_alive("n1"), "farm:node:n1:alive");
        assert_eq!(k.cmd("n1"), "farm:cmd:n1");
        let k = Keys::new("tv");
        assert_eq!(k.access(), "tv:access");
        assert_eq!(k.provider_conns("acme"), "tv:provider:acme:conns");
    }
}
