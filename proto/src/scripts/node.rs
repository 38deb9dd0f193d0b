//! The calls a node makes: its leases (claim, renew, release, handover), its gen-checked writes
//! (stream hash, timeline), its heartbeat and viewer access. KEYS and ARGV are documented in each
//! script's header in `proto/lua/`; each call below names its replies.

use super::{call, decode, invoke, ms, owner_value, split_owner, FromReply, ReplyError, Tagged};
use crate::records::{NodeRecord, StreamField};
use redis::Value;
use std::time::Duration;

call! {
    /// `claim.lua`: take a channel's lease for `node`.
    ///
    /// KEYS: owner, gen, node streams, stream, access, provider, provider conns, node load,
    /// recovering, node alive. ARGV: node, lease ms, capacity (0 = unlimited), channel, provider
    /// ("" = none), weight. Replies: [`ClaimResult`].
    pub struct Claim<'a>: CLAIM -> ClaimResult {
        pub id: &'a str,
        pub node: &'a str,
        pub lease: Duration,
        pub capacity: u32,
        pub provider: Option<&'a str>,
        pub weight: u32,
    }

    fn invocation(&self, k) {
        let (id, node, p) = (self.id, self.node, self.provider.unwrap_or(""));
        invoke!(
            keys: k.owner(id), k.gen(id), k.node_streams(node), k.stream(id), k.access(),
                k.provider(p), k.provider_conns(p), k.node_load(node), k.recovering(),
                k.node_alive(node);
            args: node, ms(self.lease), self.capacity, id, p, self.weight)
    }
}

/// What the claim script answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimResult {
    /// `{"ok", gen}`: the lease is ours, with this fencing token.
    Claimed { gen: u64 },
    /// `{"owned", "<node>:<gen>"}`: someone holds the lease.
    Owned { node: String, gen: u64 },
    /// `{"full", running}`: the node is at capacity.
    Full { running: u64 },
    /// `{"provider_full", max}`: the channel's provider account is at its connection limit.
    ProviderFull { max: u64 },
    /// `{"recovering", why}`: Redis lost keys moments ago (or this node has not heartbeated yet):
    /// retry shortly. `not_alive`: Redis does not know this node as alive (no heartbeat landed
    /// yet, or it was reaped); otherwise the recovery window after Redis lost keys is open.
    Recovering { not_alive: bool },
    /// `{"busy", node}`: the lease is free but this node's lease would still run (its owner key was
    /// deleted by hand): it may still run FFmpeg until it notices and fences; retry shortly.
    Busy { node: String },
}

impl Tagged for ClaimResult {
    fn parse(reply: &[String]) -> Result<Self, String> {
        match reply {
            [tag, v] if tag == "ok" => Ok(Self::Claimed {
                gen: lease_gen("claim", v)?,
            }),
            [tag, v] if tag == "owned" => {
                lease_owner("claim", v).map(|(node, gen)| Self::Owned { node, gen })
            }
            [tag, v] if tag == "full" => Ok(Self::Full {
                running: v.parse().unwrap_or(0),
            }),
            [tag, v] if tag == "provider_full" => Ok(Self::ProviderFull {
                max: v.parse().unwrap_or(0),
            }),
            [tag, why] if tag == "recovering" => Ok(Self::Recovering {
                not_alive: why == "not_alive",
            }),
            [tag, v] if tag == "busy" => Ok(Self::Busy { node: v.clone() }),
            other => Err(format!("claim: unexpected reply {other:?}")),
        }
    }
}

/// The fencing token of a lease answer (`ok <gen>`).
fn lease_gen(script: &str, v: &str) -> Result<u64, String> {
    v.parse().map_err(|_| format!("{script}: bad gen {v:?}"))
}

/// The `<node>:<gen>` holder a lease answer names.
fn lease_owner(script: &str, v: &str) -> Result<(String, u64), String> {
    split_owner(v)
        .map(|(node, gen)| (node.to_string(), gen))
        .ok_or_else(|| format!("{script}: bad owner {v:?}"))
}

call! {
    /// `renew.lua`: extend a lease we hold, and with it the provider holding.
    ///
    /// KEYS: owner, stream, provider conns (only with a provider). ARGV: owner value, lease ms,
    /// channel, expected Redis time ms ("" unknown), max lag ms. Replies `true` when renewed,
    /// `false` when the lease is gone or another's (the caller is fenced) or the renewal arrived
    /// too late.
    pub struct Renew<'a>: RENEW -> bool {
        pub id: &'a str,
        /// `<node>:<gen>`.
        pub owner: &'a str,
        pub provider: Option<&'a str>,
        pub lease: Duration,
        pub expected_now_ms: Option<u64>,
        pub max_lag: Duration,
    }

    fn invocation(&self, k) {
        let id = self.id;
        invoke!(
            keys: k.owner(id), k.stream(id);
            args: self.owner, ms(self.lease), id, or_empty(self.expected_now_ms), ms(self.max_lag))
        .key_if(self.provider.map(|p| k.provider_conns(p)))
    }
}

/// An optional number as the scripts take it ("" for none).
fn or_empty(t: Option<u64>) -> String {
    t.map_or(String::new(), |t| t.to_string())
}

call! {
    /// `release.lua`: give a lease up by compare.
    ///
    /// KEYS: owner, node streams, stream, access, node load, timeline, provider conns (only with a
    /// provider). ARGV: owner value, channel, final state ("" deletes the stream hash), last error,
    /// ms to keep the final hash. Replies `true` when released, `false` when the lease was not
    /// ours.
    pub struct Release<'a>: RELEASE -> bool {
        pub id: &'a str,
        pub node: &'a str,
        pub owner: &'a str,
        pub provider: Option<&'a str>,
        /// `(state, last_error)` kept in the stream hash for `keep`; `None` deletes it.
        pub final_state: Option<(&'a str, &'a str)>,
        pub keep: Duration,
    }

    fn invocation(&self, k) {
        let (id, node) = (self.id, self.node);
        let (state, reason) = self.final_state.unwrap_or(("", ""));
        invoke!(
            keys: k.owner(id), k.node_streams(node), k.stream(id), k.access(), k.node_load(node),
                k.timeline(id);
            args: self.owner, id, state, reason, ms(self.keep).max(1))
        .key_if(self.provider.map(|p| k.provider_conns(p)))
    }
}

call! {
    /// `stream_set.lua`: a gen-checked write of fields of `farm:stream:<id>` ([`StreamField`]; a
    /// value `$now` becomes Redis time in ms).
    ///
    /// KEYS: owner, stream. ARGV: owner value, then the pairs. Replies `true` when written, `false`
    /// when the writer no longer owns the channel (nothing written).
    pub struct StreamSet<'a>: STREAM_SET -> bool {
        pub id: &'a str,
        pub owner: &'a str,
        pub fields: &'a [StreamField],
    }

    fn invocation(&self, k) {
        invoke!(keys: k.owner(self.id), k.stream(self.id); args: self.owner)
            .pairs(StreamField::to_fields(self.fields))
    }
}

/// Channels one `touch.lua` call stamps at most (bounded work per script call).
pub const TOUCH_BATCH: usize = 500;

call! {
    /// `touch.lua`: record viewer access of channels (at most [`TOUCH_BATCH`]) at Redis time.
    ///
    /// KEYS: access, then the owner key of each channel. ARGV: the channel ids. Replies the Redis
    /// time used (ms), or `None` when `farm:access` has the wrong type (nothing stamped).
    pub struct Touch<'a>: TOUCH -> Option<u64> {
        pub ids: &'a [String],
    }

    fn invocation(&self, k) {
        let mut inv = invoke!(keys: k.access());
        for id in self.ids {
            inv = inv.key(k.owner(id)).arg(id);
        }
        inv
    }
}

call! {
    /// `heartbeat.lua`: the node is alive; learns whether Redis lost its keys.
    ///
    /// KEYS: node, node alive, nodes, recovering, since. ARGV: node, ttl ms, incarnation, "1" when
    /// it heartbeated before, "1" when it runs channels, lease ms, expected Redis time ms (""
    /// before the first reply), max lag ms, then the node hash's field, value pairs
    /// ([`NodeRecord`]). Replies [`HeartbeatReply`].
    pub struct Heartbeat<'a>: HEARTBEAT -> HeartbeatReply {
        pub node: &'a str,
        pub ttl: Duration,
        pub incarnation: &'a str,
        pub before: bool,
        pub runs_channels: bool,
        pub lease: Duration,
        pub expected_now_ms: Option<u64>,
        pub max_lag: Duration,
        /// What the node says of itself: its hash's fields.
        pub record: &'a NodeRecord,
    }

    fn invocation(&self, k) {
        let one = |b: bool| if b { "1" } else { "0" };
        let node = self.node;
        invoke!(
            keys: k.node(node), k.node_alive(node), k.nodes(), k.recovering(), k.since();
            args: node, ms(self.ttl), self.incarnation, one(self.before), one(self.runs_channels),
                ms(self.lease), or_empty(self.expected_now_ms), ms(self.max_lag))
        .pairs(self.record.to_fields())
    }
}

/// `{now ms, lost, repaired[, stale]}` of `heartbeat.lua`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatReply {
    /// Redis time when the heartbeat ran.
    pub now_ms: u64,
    /// The node's alive key had vanished although it heartbeated before: Redis lost its keys.
    pub lost: bool,
    /// Wrong-typed keys of this node replaced (+100: `farm:nodes` is wrong-typed).
    pub repaired: i64,
    /// It arrived later than allowed and changed nothing.
    pub stale: bool,
}

impl FromReply for HeartbeatReply {
    fn from_reply(script: &'static str, reply: Value) -> Result<Self, ReplyError> {
        let (now_ms, lost, repaired, stale): (u64, i64, i64, i64) = decode(script, reply)?;
        Ok(Self {
            now_ms,
            lost: lost == 1,
            repaired,
            stale: stale == 1,
        })
    }
}

call! {
    /// `release_node.lua`: clear what an old incarnation of `node` left for one channel.
    ///
    /// KEYS: owner, node streams, stream, node load, access. ARGV: node, channel. Replies `true`
    /// when a lease of that node was released.
    pub struct ReleaseNode<'a>: RELEASE_NODE -> bool {
        pub node: &'a str,
        pub id: &'a str,
    }

    fn invocation(&self, k) {
        let (id, node) = (self.id, self.node);
        invoke!(
            keys: k.owner(id), k.node_streams(node), k.stream(id), k.node_load(node), k.access();
            args: node, id)
    }
}

call! {
    /// `handover.lua`: move a lease from the draining `from` (holding `gen`) to `to`.
    ///
    /// KEYS: owner, gen, from streams, to streams, stream, from load, to load. ARGV:
    /// `<from>:<gen>`, to, lease ms, channel, to's capacity (0 = unlimited), weight. Replies
    /// [`HandoverResult`].
    pub struct Handover<'a>: HANDOVER -> HandoverResult {
        pub id: &'a str,
        pub from: &'a str,
        pub gen: u64,
        pub to: &'a str,
        pub lease: Duration,
        pub capacity: u32,
        pub weight: u32,
    }

    fn invocation(&self, k) {
        let (id, from, to) = (self.id, self.from, self.to);
        invoke!(
            keys: k.owner(id), k.gen(id), k.node_streams(from), k.node_streams(to), k.stream(id),
                k.node_load(from), k.node_load(to);
            args: owner_value(from, self.gen), to, ms(self.lease), id, self.capacity, self.weight)
    }
}

/// What the handover script answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoverResult {
    /// `{"ok", gen}`: the lease moved to the new owner, with this fencing token.
    Moved { gen: u64 },
    /// `{"stale", owner or ""}`: the lease is no longer `<from>:<gen>`: someone else holds it
    /// (`owner`), or nobody. A normal race (the old owner stopped, or another node took over
    /// first), not an error.
    Stale { owner: Option<(String, u64)> },
    /// `{"full", running}`: the new owner is at capacity.
    Full { running: u64 },
}

impl Tagged for HandoverResult {
    fn parse(reply: &[String]) -> Result<Self, String> {
        match reply {
            [tag, v] if tag == "ok" => Ok(Self::Moved {
                gen: lease_gen("handover", v)?,
            }),
            [tag, v] if tag == "stale" && v.is_empty() => Ok(Self::Stale { owner: None }),
            [tag, v] if tag == "stale" => Ok(Self::Stale {
                owner: Some(lease_owner("handover", v)?),
            }),
            [tag, v] if tag == "full" => Ok(Self::Full {
                running: v.parse().unwrap_or(0),
            }),
            other => Err(format!("handover: unexpected reply {other:?}")),
        }
    }
}

call! {
    /// `timeline.lua`: record the channel's published HLS timeline, gen-checked.
    ///
    /// KEYS: owner, timeline. ARGV: owner value, gen, target duration (s), last media sequence (""
    /// for none), discontinuity number, playlist text, ms to keep the record. Replies `true` when
    /// recorded, `false` when the lease is not ours (nothing written).
    pub struct Timeline<'a>: TIMELINE -> bool {
        pub id: &'a str,
        pub owner: &'a str,
        pub gen: u64,
        pub target: u64,
        pub last: Option<u64>,
        pub disc: u64,
        pub playlist: &'a [u8],
        pub keep: Duration,
    }

    fn invocation(&self, k) {
        invoke!(
            keys: k.owner(self.id), k.timeline(self.id);
            args: self.owner, self.gen, self.target, or_empty(self.last), self.disc, self.playlist,
                ms(self.keep).max(1))
    }
}
