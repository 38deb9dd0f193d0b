//! The calls a node makes: its leases (claim, renew, release, handover), its gen-checked writes
//! (stream hash, timeline), its heartbeat and viewer access. KEYS and ARGV are documented in each
//! script's header in `proto/lua/`; each call below names its replies.

use super::{decode, flag, ms, owner_value, split_owner, Call, Invocation, ReplyError};
use crate::records::{NodeRecord, StreamField};
use crate::Keys;
use redis::Value;
use std::time::Duration;

/// `claim.lua`: take a channel's lease for `node`.
///
/// KEYS: owner, gen, node streams, stream, access, provider, provider conns, node load, recovering,
/// node alive. ARGV: node, lease ms, capacity (0 = unlimited), channel, provider ("" = none),
/// weight. Replies: [`ClaimResult`].
#[derive(Debug, Clone)]
pub struct Claim<'a> {
    pub id: &'a str,
    pub node: &'a str,
    pub lease: Duration,
    pub capacity: u32,
    pub provider: Option<&'a str>,
    pub weight: u32,
}

impl Call for Claim<'_> {
    type Reply = ClaimResult;
    const FILE: &'static str = "claim.lua";
    fn invocation(&self, k: &Keys) -> Invocation {
        let (id, node) = (self.id, self.node);
        let p = self.provider.unwrap_or("");
        Invocation::new(&super::CLAIM)
            .key(k.owner(id))
            .key(k.gen(id))
            .key(k.node_streams(node))
            .key(k.stream(id))
            .key(k.access())
            .key(k.provider(p))
            .key(k.provider_conns(p))
            .key(k.node_load(node))
            .key(k.recovering())
            .key(k.node_alive(node))
            .arg(node)
            .arg(ms(self.lease))
            .arg(self.capacity)
            .arg(id)
            .arg(p)
            .arg(self.weight)
    }
    fn parse(reply: Value) -> Result<ClaimResult, ReplyError> {
        let v: Vec<String> = decode(Self::FILE, reply)?;
        ClaimResult::parse(&v).map_err(|d| ReplyError::new(Self::FILE, d))
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

impl ClaimResult {
    /// Parses the script's `{tag, value}` reply.
    pub fn parse(reply: &[String]) -> Result<Self, String> {
        match reply {
            [tag, v] if tag == "ok" => v
                .parse()
                .map(|gen| Self::Claimed { gen })
                .map_err(|_| format!("claim: bad gen {v:?}")),
            [tag, v] if tag == "owned" => {
                let (node, gen) =
                    split_owner(v).ok_or_else(|| format!("claim: bad owner {v:?}"))?;
                Ok(Self::Owned {
                    node: node.to_string(),
                    gen,
                })
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

/// `renew.lua`: extend a lease we hold, and with it the provider holding.
///
/// KEYS: owner, stream, provider conns (only with a provider). ARGV: owner value, lease ms,
/// channel, expected Redis time ms ("" unknown), max lag ms. Replies `true` when renewed, `false`
/// when the lease is gone or another's (the caller is fenced) or the renewal arrived too late.
#[derive(Debug, Clone)]
pub struct Renew<'a> {
    pub id: &'a str,
    /// `<node>:<gen>`.
    pub owner: &'a str,
    pub provider: Option<&'a str>,
    pub lease: Duration,
    pub expected_now_ms: Option<u64>,
    pub max_lag: Duration,
}

impl Call for Renew<'_> {
    type Reply = bool;
    const FILE: &'static str = "renew.lua";
    fn invocation(&self, k: &Keys) -> Invocation {
        let mut inv = Invocation::new(&super::RENEW)
            .key(k.owner(self.id))
            .key(k.stream(self.id));
        if let Some(p) = self.provider {
            inv = inv.key(k.provider_conns(p));
        }
        inv.arg(self.owner)
            .arg(ms(self.lease))
            .arg(self.id)
            .arg(or_empty(self.expected_now_ms))
            .arg(ms(self.max_lag))
    }
    fn parse(reply: Value) -> Result<bool, ReplyError> {
        flag(Self::FILE, reply)
    }
}

/// An optional number as the scripts take it ("" for none).
fn or_empty(t: Option<u64>) -> String {
    t.map_or(String::new(), |t| t.to_string())
}

/// `release.lua`: give a lease up by compare.
///
/// KEYS: owner, node streams, stream, access, node load, timeline, provider conns (only with a
/// provider). ARGV: owner value, channel, final state ("" deletes the stream hash), last error,
/// ms to keep the final hash. Replies `true` when released, `false` when the lease was not ours.
#[derive(Debug, Clone)]
pub struct Release<'a> {
    pub id: &'a str,
    pub node: &'a str,
    pub owner: &'a str,
    pub provider: Option<&'a str>,
    /// `(state, last_error)` kept in the stream hash for `keep`; `None` deletes it.
    pub final_state: Option<(&'a str, &'a str)>,
    pub keep: Duration,
}

impl Call for Release<'_> {
    type Reply = bool;
    const FILE: &'static str = "release.lua";
    fn invocation(&self, k: &Keys) -> Invocation {
        let (id, node) = (self.id, self.node);
        let (state, reason) = self.final_state.unwrap_or(("", ""));
        let mut inv = Invocation::new(&super::RELEASE)
            .key(k.owner(id))
            .key(k.node_streams(node))
            .key(k.stream(id))
            .key(k.access())
            .key(k.node_load(node))
            .key(k.timeline(id));
        if let Some(p) = self.provider {
            inv = inv.key(k.provider_conns(p));
        }
        inv.arg(self.owner)
            .arg(id)
            .arg(state)
            .arg(reason)
            .arg(ms(self.keep).max(1))
    }
    fn parse(reply: Value) -> Result<bool, ReplyError> {
        flag(Self::FILE, reply)
    }
}

/// `stream_set.lua`: a gen-checked write of fields of `farm:stream:<id>` ([`StreamField`]; a value
/// `$now` becomes Redis time in ms).
///
/// KEYS: owner, stream. ARGV: owner value, then the pairs. Replies `true` when written, `false`
/// when the writer no longer owns the channel (nothing written).
#[derive(Debug, Clone)]
pub struct StreamSet<'a> {
    pub id: &'a str,
    pub owner: &'a str,
    pub fields: &'a [StreamField],
}

impl Call for StreamSet<'_> {
    type Reply = bool;
    const FILE: &'static str = "stream_set.lua";
    fn invocation(&self, k: &Keys) -> Invocation {
        let mut inv = Invocation::new(&super::STREAM_SET)
            .key(k.owner(self.id))
            .key(k.stream(self.id))
            .arg(self.owner);
        for (f, v) in StreamField::to_fields(self.fields) {
            inv = inv.arg(f).arg(v);
        }
        inv
    }
    fn parse(reply: Value) -> Result<bool, ReplyError> {
        flag(Self::FILE, reply)
    }
}

/// Channels one `touch.lua` call stamps at most (bounded work per script call).
pub const TOUCH_BATCH: usize = 500;

/// `touch.lua`: record viewer access of channels (at most [`TOUCH_BATCH`]) at Redis time.
///
/// KEYS: access, then the owner key of each channel. ARGV: the channel ids. Replies the Redis time
/// used (ms), or `None` when `farm:access` has the wrong type (nothing stamped).
#[derive(Debug, Clone)]
pub struct Touch<'a> {
    pub ids: &'a [String],
}

impl Call for Touch<'_> {
    type Reply = Option<u64>;
    const FILE: &'static str = "touch.lua";
    fn invocation(&self, k: &Keys) -> Invocation {
        let mut inv = Invocation::new(&super::TOUCH).key(k.access());
        for id in self.ids {
            inv = inv.key(k.owner(id));
        }
        for id in self.ids {
            inv = inv.arg(id);
        }
        inv
    }
    fn parse(reply: Value) -> Result<Option<u64>, ReplyError> {
        let t: i64 = decode(Self::FILE, reply)?;
        Ok(u64::try_from(t).ok())
    }
}

/// `heartbeat.lua`: the node is alive; learns whether Redis lost its keys.
///
/// KEYS: node, node alive, nodes, recovering, since. ARGV: node, ttl ms, incarnation, "1" when it
/// heartbeated before, "1" when it runs channels, lease ms, expected Redis time ms ("" before the
/// first reply), max lag ms, then the node hash's field, value pairs ([`NodeRecord`]). Replies [`HeartbeatReply`].
#[derive(Debug, Clone)]
pub struct Heartbeat<'a> {
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

impl Call for Heartbeat<'_> {
    type Reply = HeartbeatReply;
    const FILE: &'static str = "heartbeat.lua";
    fn invocation(&self, k: &Keys) -> Invocation {
        let one = |b: bool| if b { "1" } else { "0" };
        let node = self.node;
        let mut inv = Invocation::new(&super::HEARTBEAT)
            .key(k.node(node))
            .key(k.node_alive(node))
            .key(k.nodes())
            .key(k.recovering())
            .key(k.since())
            .arg(node)
            .arg(ms(self.ttl))
            .arg(self.incarnation)
            .arg(one(self.before))
            .arg(one(self.runs_channels))
            .arg(ms(self.lease))
            .arg(or_empty(self.expected_now_ms))
            .arg(ms(self.max_lag));
        for (f, v) in self.record.to_fields() {
            inv = inv.arg(f).arg(v);
        }
        inv
    }
    fn parse(reply: Value) -> Result<HeartbeatReply, ReplyError> {
        let (now_ms, lost, repaired, stale): (u64, i64, i64, i64) = decode(Self::FILE, reply)?;
        Ok(HeartbeatReply {
            now_ms,
            lost: lost == 1,
            repaired,
            stale: stale == 1,
        })
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

/// `release_node.lua`: clear what an old incarnation of `node` left for one channel.
///
/// KEYS: owner, node streams, stream, node load, access. ARGV: node, channel. Replies `true` when
/// a lease of that node was released.
#[derive(Debug, Clone)]
pub struct ReleaseNode<'a> {
    pub node: &'a str,
    pub id: &'a str,
}

impl Call for ReleaseNode<'_> {
    type Reply = bool;
    const FILE: &'static str = "release_node.lua";
    fn invocation(&self, k: &Keys) -> Invocation {
        let (id, node) = (self.id, self.node);
        Invocation::new(&super::RELEASE_NODE)
            .key(k.owner(id))
            .key(k.node_streams(node))
            .key(k.stream(id))
            .key(k.node_load(node))
            .key(k.access())
            .arg(node)
            .arg(id)
    }
    fn parse(reply: Value) -> Result<bool, ReplyError> {
        flag(Self::FILE, reply)
    }
}

/// `handover.lua`: move a lease from the draining `from` (holding `gen`) to `to`.
///
/// KEYS: owner, gen, from streams, to streams, stream, from load, to load. ARGV: `<from>:<gen>`,
/// to, lease ms, channel, to's capacity (0 = unlimited), weight. Replies [`HandoverResult`].
#[derive(Debug, Clone)]
pub struct Handover<'a> {
    pub id: &'a str,
    pub from: &'a str,
    pub gen: u64,
    pub to: &'a str,
    pub lease: Duration,
    pub capacity: u32,
    pub weight: u32,
}

impl Call for Handover<'_> {
    type Reply = HandoverResult;
    const FILE: &'static str = "handover.lua";
    fn invocation(&self, k: &Keys) -> Invocation {
        let (id, from, to) = (self.id, self.from, self.to);
        Invocation::new(&super::HANDOVER)
            .key(k.owner(id))
            .key(k.gen(id))
            .key(k.node_streams(from))
            .key(k.node_streams(to))
            .key(k.stream(id))
            .key(k.node_load(from))
            .key(k.node_load(to))
            .arg(owner_value(from, self.gen))
            .arg(to)
            .arg(ms(self.lease))
            .arg(id)
            .arg(self.capacity)
            .arg(self.weight)
    }
    fn parse(reply: Value) -> Result<HandoverResult, ReplyError> {
        let v: Vec<String> = decode(Self::FILE, reply)?;
        HandoverResult::parse(&v).map_err(|d| ReplyError::new(Self::FILE, d))
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

impl HandoverResult {
    /// Parses the script's `{tag, value}` reply.
    pub fn parse(reply: &[String]) -> Result<Self, String> {
        match reply {
            [tag, v] if tag == "ok" => v
                .parse()
                .map(|gen| Self::Moved { gen })
                .map_err(|_| format!("handover: bad gen {v:?}")),
            [tag, v] if tag == "stale" && v.is_empty() => Ok(Self::Stale { owner: None }),
            [tag, v] if tag == "stale" => {
                let (node, gen) =
                    split_owner(v).ok_or_else(|| format!("handover: bad owner {v:?}"))?;
                Ok(Self::Stale {
                    owner: Some((node.to_string(), gen)),
                })
            }
            [tag, v] if tag == "full" => Ok(Self::Full {
                running: v.parse().unwrap_or(0),
            }),
            other => Err(format!("handover: unexpected reply {other:?}")),
        }
    }
}

/// `timeline.lua`: record the channel's published HLS timeline, gen-checked.
///
/// KEYS: owner, timeline. ARGV: owner value, gen, target duration (s), last media sequence ("" for
/// none), discontinuity number, playlist text, ms to keep the record. Replies `true` when recorded,
/// `false` when the lease is not ours (nothing written).
#[derive(Debug, Clone)]
pub struct Timeline<'a> {
    pub id: &'a str,
    pub owner: &'a str,
    pub gen: u64,
    pub target: u64,
    pub last: Option<u64>,
    pub disc: u64,
    pub playlist: &'a [u8],
    pub keep: Duration,
}

impl Call for Timeline<'_> {
    type Reply = bool;
    const FILE: &'static str = "timeline.lua";
    fn invocation(&self, k: &Keys) -> Invocation {
        Invocation::new(&super::TIMELINE)
            .key(k.owner(self.id))
            .key(k.timeline(self.id))
            .arg(self.owner)
            .arg(self.gen)
            .arg(self.target)
            .arg(or_empty(self.last))
            .arg(self.disc)
            .arg(self.playlist)
            .arg(ms(self.keep).max(1))
    }
    fn parse(reply: Value) -> Result<bool, ReplyError> {
        flag(Self::FILE, reply)
    }
}
