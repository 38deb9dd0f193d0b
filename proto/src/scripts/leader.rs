//! The coordinator's calls: leadership (acquire, renew, release) and the leader's writes. Every
//! write first checks that `farm:leader` still holds the caller's value (`held`) and answers
//! [`Fenced::NotLeader`] otherwise, having changed nothing.

use super::{call, decode, invoke, ms, split_owner, Call, FromReply, ReplyError};
use crate::keys::CMD_MAXLEN;
use crate::types::Command;
use redis::Value;
use std::time::Duration;

/// A fenced script's answer: its own, or `notleader` (the caller no longer leads; nothing done).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fenced<T> {
    Done(T),
    NotLeader,
}

/// The replies of one pipeline of fenced calls of script `C`, in call order, up to the first
/// `notleader`: the calls before it took effect, the rest did not (`lost`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FencedReplies<T> {
    pub done: Vec<T>,
    /// A call found another leader.
    pub lost: bool,
}

impl<T> FencedReplies<T> {
    /// Parses a pipeline's replies of `C`; an undocumented reply is an error.
    pub fn parse<C>(raw: Vec<Value>) -> Result<Self, ReplyError>
    where
        C: Call<Reply = Fenced<T>>,
    {
        let mut done = Vec::with_capacity(raw.len());
        for r in raw {
            match C::parse(r)? {
                Fenced::Done(t) => done.push(t),
                Fenced::NotLeader => return Ok(Self { done, lost: true }),
            }
        }
        Ok(Self { done, lost: false })
    }
}

/// The answers of a fenced script that answers one string (besides `notleader`).
pub trait FencedAnswer: Sized {
    /// The answer `s`; `None` when the script does not document it.
    fn from_answer(s: &str) -> Option<Self>;
}

/// A fenced script's string answer; `notleader` is [`Fenced::NotLeader`].
impl<T: FencedAnswer> FromReply for Fenced<T> {
    fn from_reply(script: &'static str, reply: Value) -> Result<Self, ReplyError> {
        let s: String = decode(script, reply)?;
        if s == "notleader" {
            return Ok(Fenced::NotLeader);
        }
        T::from_answer(&s)
            .map(Fenced::Done)
            .ok_or_else(|| ReplyError::new(script, format!("{s:?}")))
    }
}

/// An enum of a fenced script's one-word answers, each variant with its word.
macro_rules! answers {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$doc:meta])* $variant:ident = $word:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$doc])* $variant,)*
        }

        impl FencedAnswer for $name {
            fn from_answer(s: &str) -> Option<Self> {
                match s {
                    $($word => Some(Self::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

call! {
    /// `leader.lua`: acquire or renew coordinator leadership.
    ///
    /// KEYS: leader, leader epoch. ARGV: coordinator id, lease ms, the value the caller believes it
    /// holds ("" for none). Replies [`LeaderReply`].
    pub struct Leader<'a>: LEADER -> LeaderReply {
        pub id: &'a str,
        pub ttl: Duration,
        pub held: &'a str,
    }

    fn invocation(&self, k) {
        invoke!(keys: k.leader(), k.leader_epoch(); args: self.id, ms(self.ttl), self.held)
    }
}

/// What `leader.lua` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderReply {
    /// `{"renewed", value}`: our lease was extended.
    Renewed { value: String },
    /// `{"acquired", "<id>:<epoch>"}`: the lease is ours with a new epoch.
    Acquired { value: String, epoch: u64 },
    /// `{"follower", value, pttl}`: another coordinator leads; its lease has `pttl_ms` left (`None`
    /// when Redis gave no TTL).
    Follower { value: String, pttl_ms: Option<u64> },
}

impl FromReply for LeaderReply {
    fn from_reply(script: &'static str, reply: Value) -> Result<Self, ReplyError> {
        let v: Vec<String> = decode(script, reply)?;
        match <[String; 2]>::try_from(v.clone()) {
            Ok([tag, value]) if tag == "renewed" => return Ok(Self::Renewed { value }),
            Ok([tag, value]) if tag == "acquired" => {
                let epoch = value
                    .rsplit_once(':')
                    .and_then(|(_, e)| e.parse().ok())
                    .unwrap_or(0);
                return Ok(Self::Acquired { value, epoch });
            }
            _ => {}
        }
        match <[String; 3]>::try_from(v) {
            Ok([tag, value, pttl]) if tag == "follower" => Ok(Self::Follower {
                value,
                pttl_ms: pttl.parse::<i64>().ok().and_then(|t| u64::try_from(t).ok()),
            }),
            other => Err(ReplyError::new(script, format!("{other:?}"))),
        }
    }
}

call! {
    /// `leader_release.lua`: give leadership up by compare-and-delete.
    ///
    /// KEYS: leader. ARGV: the value held. Replies `true` when released, `false` when it was not
    /// ours.
    pub struct LeaderRelease<'a>: LEADER_RELEASE -> bool {
        pub held: &'a str,
    }

    fn invocation(&self, k) {
        invoke!(keys: k.leader(); args: self.held)
    }
}

call! {
    /// `idle_stop.lua`: stop `id` when it is still idle (last access before `cutoff_ms`) and still
    /// owned as the caller saw it (`owner`, `<node>:<gen>`); the stop goes to that owner's command
    /// stream.
    ///
    /// KEYS: leader, owner, access, channel, the owner node's cmd stream (`farm:cmd:` without one).
    /// ARGV: leader value, channel, cutoff ms, owner seen ("" none), cmd MAXLEN, by.
    /// Replies [`IdleStopReply`].
    pub struct IdleStop<'a>: IDLE_STOP -> Fenced<IdleStopReply> {
        pub held: &'a str,
        pub id: &'a str,
        pub cutoff_ms: u64,
        pub owner: Option<&'a str>,
        pub by: &'a str,
    }

    fn invocation(&self, k) {
        let id = self.id;
        // The command goes to the owner seen; without one the script only drops the entry.
        let node = self.owner.and_then(split_owner).map_or("", |(n, _)| n);
        invoke!(
            keys: k.leader(), k.owner(id), k.access(), k.channel(id), k.cmd(node);
            args: self.held, id, self.cutoff_ms, self.owner.unwrap_or(""), CMD_MAXLEN, self.by)
    }
}

answers! {
    /// What `idle_stop.lua` answered.
    pub enum IdleStopReply {
        /// `stop`: a stop with the owner's gen was sent.
        Stop = "stop",
        /// `dropped`: nobody owns the channel: its stale access entry was removed.
        Dropped = "dropped",
        /// `pinned`.
        Pinned = "pinned",
        /// `fresh`: accessed since the caller looked, or no access entry.
        Fresh = "fresh",
        /// `changed`: the owner changed since the caller looked.
        Changed = "changed",
    }
}

call! {
    /// `reap_channel.lua`: release channel `id` of the dead `node`.
    ///
    /// KEYS: leader, node alive, owner, node streams, stream, access, provider conns (`farm:access`
    /// stands in without a provider), node load. ARGV: leader value, node, channel, "1" with a
    /// provider. Replies [`ReapChannelReply`].
    pub struct ReapChannel<'a>: REAP_CHANNEL -> Fenced<ReapChannelReply> {
        pub held: &'a str,
        pub node: &'a str,
        pub id: &'a str,
        pub provider: Option<&'a str>,
    }

    fn invocation(&self, k) {
        let (node, id) = (self.node, self.id);
        // Without a provider the conns key is unused: any key of the farm's slot will do.
        let conns = self
            .provider
            .map_or_else(|| k.access(), |p| k.provider_conns(p));
        let with_provider = if self.provider.is_some() { "1" } else { "0" };
        invoke!(
            keys: k.leader(), k.node_alive(node), k.owner(id), k.node_streams(node), k.stream(id),
                k.access(), conns, k.node_load(node);
            args: self.held, node, id, with_provider)
    }
}

answers! {
    /// What `reap_channel.lua` answered.
    pub enum ReapChannelReply {
        /// `released`: the dead node's lease was deleted.
        Released = "released",
        /// `cleared`: only leftovers were removed (the lease was gone or another node's).
        Cleared = "cleared",
        /// `alive`: the node's alive key is back: nothing was done.
        Alive = "alive",
    }
}

call! {
    /// `reap_node.lua`: remove the dead `node`'s own keys when its last heartbeat is older than
    /// `hb_cutoff_ms` and it lists no channel any more.
    ///
    /// KEYS: leader, node, node alive, nodes, node streams, cmd, node load. ARGV: leader value,
    /// node, cutoff ms. Replies [`ReapNodeReply`].
    pub struct ReapNode<'a>: REAP_NODE -> Fenced<ReapNodeReply> {
        pub held: &'a str,
        pub node: &'a str,
        pub hb_cutoff_ms: u64,
    }

    fn invocation(&self, k) {
        let node = self.node;
        invoke!(
            keys: k.leader(), k.node(node), k.node_alive(node), k.nodes(), k.node_streams(node),
                k.cmd(node), k.node_load(node);
            args: self.held, node, self.hb_cutoff_ms)
    }
}

answers! {
    /// What `reap_node.lua` answered.
    pub enum ReapNodeReply {
        /// `reaped`.
        Reaped = "reaped",
        /// `alive`: its alive key is back, or a newer heartbeat.
        Alive = "alive",
        /// `busy`: channels are still listed in its set.
        Busy = "busy",
    }
}

call! {
    /// `reconcile.lua`: drop runtime keys of channel `id` that no lease of `node` backs.
    ///
    /// KEYS: leader, owner, node streams, stream, node load. ARGV: leader value, node, channel.
    /// Replies what was removed ([`Removed`]: "" nothing, "u" the set entry, "s" the stream hash).
    pub struct Reconcile<'a>: RECONCILE -> Fenced<Removed> {
        pub held: &'a str,
        pub node: &'a str,
        pub id: &'a str,
    }

    fn invocation(&self, k) {
        let (node, id) = (self.node, self.id);
        invoke!(
            keys: k.leader(), k.owner(id), k.node_streams(node), k.stream(id), k.node_load(node);
            args: self.held, node, id)
    }
}

/// What `reconcile.lua` removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed {
    /// The node's set entry.
    pub set: bool,
    /// The stream hash.
    pub stream: bool,
}

impl Removed {
    /// How the audit trail names what went; `None` when nothing did.
    pub fn label(self) -> Option<&'static str> {
        match (self.set, self.stream) {
            (false, false) => None,
            (true, false) => Some("set"),
            (false, true) => Some("stream"),
            (true, true) => Some("set,stream"),
        }
    }
}

impl FencedAnswer for Removed {
    fn from_answer(s: &str) -> Option<Self> {
        let (set, stream) = match s {
            "" => (false, false),
            "u" => (true, false),
            "s" => (false, true),
            "us" => (true, true),
            _ => return None,
        };
        Some(Self { set, stream })
    }
}

call! {
    /// `repair_key.lua`: replace the farm-wide `key` when it does not have the type `wanted`
    /// (TYPE's answer).
    ///
    /// KEYS: leader, the key. ARGV: leader value, wanted type. Replies [`Repair`].
    pub struct RepairKey<'a>: REPAIR_KEY -> Fenced<Repair> {
        pub held: &'a str,
        pub key: &'a str,
        pub wanted: &'a str,
    }

    fn invocation(&self, k) {
        invoke!(keys: k.leader(), self.key.to_string(); args: self.held, self.wanted)
    }
}

/// What `repair_key.lua` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// `ok`: the key has the right type by now, or is gone.
    Fine,
    /// The type found: the wrong-typed key was deleted; the farm rebuilds it.
    Deleted(String),
}

impl FencedAnswer for Repair {
    fn from_answer(s: &str) -> Option<Self> {
        match s {
            "ok" => Some(Self::Fine),
            "" => None,
            found => Some(Self::Deleted(found.to_string())),
        }
    }
}

call! {
    /// `command.lua`: append `cmd` to `node`'s command stream, fenced by the leader lease.
    ///
    /// KEYS: leader, cmd stream. ARGV: leader value, MAXLEN (~, [`CMD_MAXLEN`]), then the command's
    /// field, value pairs ([`Command::to_fields`]). Replies the entry id, or [`Fenced::NotLeader`]
    /// (nothing written).
    pub struct SendCommand<'a>: COMMAND -> Fenced<String> {
        pub held: &'a str,
        pub node: &'a str,
        pub cmd: &'a Command,
    }

    fn invocation(&self, k) {
        invoke!(keys: k.leader(), k.cmd(self.node); args: self.held, CMD_MAXLEN)
            .pairs(self.cmd.to_fields())
    }
}

/// `command.lua`'s answer: the entry id, or nil (false) when the caller no longer leads.
impl FromReply for Fenced<String> {
    fn from_reply(script: &'static str, reply: Value) -> Result<Self, ReplyError> {
        let id: Option<String> = decode(script, reply)?;
        Ok(id.map_or(Fenced::NotLeader, Fenced::Done))
    }
}
