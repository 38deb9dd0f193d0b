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

    /// `farm:channel:<id>` hash: the catalog entry (`name`, `url`, `backup_urls`, `profile`, `provider`, `pinned`, `group`).
    pub fn channel(&self, id: &str) -> String {
        format!("{}:channel:{id}", self.prefix)
    }
    /// `farm:channels` set: the catalog index.
    pub fn channels(&self) -> String {
        format!("{}:channels", self.prefix)
    }
    /// `farm:catalog:version` counter: bumped by every farmctl catalog write (add, rm, an import's
    /// commit), so an import that checked for existing ids sees a concurrent write and refuses.
    pub fn catalog_version(&self) -> String {
        format!("{}:catalog:version", self.prefix)
    }
    /// `farm:catalog:gen` counter: numbers imports (their staging lists).
    pub fn catalog_gen(&self) -> String {
        format!("{}:catalog:gen", self.prefix)
    }
    /// `farm:catalog:import:<gen>` list: one import's channels (JSON), staged in chunks before its
    /// commit, with a TTL until then (an abandoned import disappears by itself); consumed chunk by
    /// chunk as it is applied.
    pub fn catalog_staging(&self, gen: u64) -> String {
        format!("{}:catalog:import:{gen}", self.prefix)
    }
    /// `farm:catalog:importing` string: the gen of the committed import being applied. While it
    /// exists, every farmctl catalog write first finishes applying it.
    pub fn catalog_importing(&self) -> String {
        format!("{}:catalog:importing", self.prefix)
    }
    /// `farm:pinned` set: the pinned channels (kept running by the coordinator), maintained with the
    /// catalog's `pinned` field.
    pub fn pinned(&self) -> String {
        format!("{}:pinned", self.prefix)
    }
    /// `farm:provider:<name>` hash: `max_connections`.
    pub fn provider(&self, name: &str) -> String {
        format!("{}:provider:{name}", self.prefix)
    }
    /// `farm:provider:<name>:conns` zset: channel -> lease expiry (ms).
    pub fn provider_conns(&self, name: &str) -> String {
        format!("{}:provider:{name}:conns", self.prefix)
    }
    /// `farm:owner:<id>` string with a PX lease: `<node>:<gen>`.
    pub fn owner(&self, id: &str) -> String {
        format!("{}:owner:{id}", self.prefix)
    }
    /// `farm:gen:<id>` counter: the fencing token, INCR on every claim.
    pub fn gen(&self, id: &str) -> String {
        format!("{}:gen:{id}", self.prefix)
    }
    /// `farm:stream:<id>` hash: runtime state of a running channel.
    pub fn stream(&self, id: &str) -> String {
        format!("{}:stream:{id}", self.prefix)
    }
    /// `farm:timeline:<id>` hash with a TTL: the channel's published HLS timeline (`target`, `last`,
    /// `disc`, `gen`, `at`, `playlist`), recorded by the owner before it publishes a segment, so a new
    /// owner continues it and any node can answer the current playlist.
    pub fn timeline(&self, id: &str) -> String {
        format!("{}:timeline:{id}", self.prefix)
    }
    /// `farm:access` zset: channel -> last viewer access (ms, Redis time).
    pub fn access(&self) -> String {
        format!("{}:access", self.prefix)
    }
    /// `farm:node:<node>` hash: the node's description.
    pub fn node(&self, node: &str) -> String {
        format!("{}:node:{node}", self.prefix)
    }
    /// `farm:node:<node>:alive` string with a PX TTL: the node's incarnation; gone = dead.
    pub fn node_alive(&self, node: &str) -> String {
        format!("{}:node:{node}:alive", self.prefix)
    }
    /// `farm:nodes` zset: node -> last heartbeat (ms).
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }
    /// `farm:node:<node>:streams` set: channels the node runs.
    pub fn node_streams(&self, node: &str) -> String {
        format!("{}:node:{node}:streams", self.prefix)
    }
    /// `farm:node:<node>:load` hash: channel -> weight (a copy 1, a transcode its profile's weight),
    /// for the channels in the node's set; the claim script sums it over the set's members only.
    pub fn node_load(&self, node: &str) -> String {
        format!("{}:node:{node}:load", self.prefix)
    }
    /// `farm:cmd:<node>` stream: commands to one node, read through the consumer group [`CMD_GROUP`].
    pub fn cmd(&self, node: &str) -> String {
        format!("{}:cmd:{node}", self.prefix)
    }
    /// `farm:recovering` string with a PX TTL: set when a node finds that Redis lost its keys; no
    /// channel is claimed while it exists (every old owner fences first).
    pub fn recovering(&self) -> String {
        format!("{}:recovering", self.prefix)
    }
    /// `farm:since` string, no TTL: Redis time (ms) of the first node heartbeat this data set saw.
    /// A node that heartbeated before and finds it gone knows Redis lost every key (restarted
    /// empty), not just its own (reaped), and opens the recovery window even if it runs nothing.
    pub fn since(&self) -> String {
        format!("{}:since", self.prefix)
    }
    /// `farm:events` capped stream: the audit trail.
    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }
    /// `farm:leader` string with a PX lease: the leading coordinator.
    pub fn leader(&self) -> String {
        format!("{}:leader", self.prefix)
    }
    /// `farm:leader:epoch` counter: the leader's fencing token.
    pub fn leader_epoch(&self) -> String {
        format!("{}:leader:epoch", self.prefix)
    }
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
