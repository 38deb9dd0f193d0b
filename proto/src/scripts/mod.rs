//! The farm's Lua scripts, loaded from `proto/lua/*.lua` at compile time, and one typed call per
//! script: nothing outside this module lists a script's KEYS or matches its reply.
//!
//! `redis::Script` sends EVALSHA and reloads the script on NOSCRIPT, so a Redis restart or failover
//! costs one extra round trip, never an error. Each script documents its KEYS and ARGV in its header;
//! each typed call ([`Call`]) builds them in that order from [`Keys`] and parses the reply once into
//! its own type:
//!
//! - a node's calls ([`node`]): [`Claim`], [`Renew`], [`Release`], [`StreamSet`], [`Touch`],
//!   [`Heartbeat`], [`ReleaseNode`], [`Handover`], [`Timeline`];
//! - the leader's calls ([`leader`]), each fenced by `farm:leader` ([`Fenced`]): [`Leader`],
//!   [`LeaderRelease`], [`IdleStop`], [`ReapChannel`], [`ReapNode`], [`Reconcile`], [`SendCommand`],
//!   [`RepairKey`];
//! - farmctl's catalog write ([`catalog`]): [`Pin`].
//!
//! A call runs alone ([`Invocation::prepare`] gives the `redis::ScriptInvocation`) or in a pipeline
//! ([`Invocation::add_to`] appends its EVALSHA; [`Call::parse`] reads its reply from the pipeline's
//! answers).

use crate::keys::Keys;
use redis::{Pipeline, Script, ScriptInvocation, ToRedisArgs, Value};
use std::sync::LazyLock;

pub mod catalog;
pub mod leader;
pub mod node;

pub use catalog::Pin;
pub use leader::{
    Fenced, FencedAnswer, FencedReplies, IdleStop, IdleStopReply, Leader, LeaderRelease,
    LeaderReply, ReapChannel, ReapChannelReply, ReapNode, ReapNodeReply, Reconcile, Removed,
    Repair, RepairKey, SendCommand,
};
pub use node::{
    Claim, ClaimResult, Handover, HandoverResult, Heartbeat, HeartbeatReply, Release, ReleaseNode,
    Renew, StreamSet, Timeline, Touch, TOUCH_BATCH,
};

macro_rules! scripts {
    ($($name:ident => $file:literal),* $(,)?) => {
        $(
            pub static $name: LazyLock<Script> =
                LazyLock::new(|| Script::new(include_str!(concat!("../../lua/", $file))));
        )*
        /// The source of every script, for `SCRIPT LOAD` before a pipeline of EVALSHA calls.
        pub const ALL_SOURCES: &[&str] = &[$(include_str!(concat!("../../lua/", $file))),*];

        /// Each script's file name in `proto/lua/` (what a [`ReplyError`] names).
        mod file {
            $(pub const $name: &str = $file;)*
        }
    };
}

scripts! {
    CLAIM => "claim.lua",
    RENEW => "renew.lua",
    RELEASE => "release.lua",
    STREAM_SET => "stream_set.lua",
    TOUCH => "touch.lua",
    HEARTBEAT => "heartbeat.lua",
    RELEASE_NODE => "release_node.lua",
    HANDOVER => "handover.lua",
    LEADER => "leader.lua",
    LEADER_RELEASE => "leader_release.lua",
    IDLE_STOP => "idle_stop.lua",
    REAP_CHANNEL => "reap_channel.lua",
    REAP_NODE => "reap_node.lua",
    RECONCILE => "reconcile.lua",
    COMMAND => "command.lua",
    PIN => "pin.lua",
    TIMELINE => "timeline.lua",
    REPAIR_KEY => "repair_key.lua",
}

/// A reply that is not one of the answers its script documents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected reply to {script}: {detail}")]
pub struct ReplyError {
    /// The script's file name.
    pub script: &'static str,
    pub detail: String,
}

impl ReplyError {
    pub fn new(script: &'static str, detail: impl Into<String>) -> Self {
        Self {
            script,
            detail: detail.into(),
        }
    }
}

/// One script call with its KEYS and ARGV, ready to run alone or in a pipeline.
#[derive(Debug, Clone)]
pub struct Invocation {
    script: &'static Script,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl Invocation {
    fn new(script: &'static LazyLock<Script>) -> Self {
        Self {
            script,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Appends KEYS[n+1].
    fn key(mut self, key: String) -> Self {
        self.keys.push(key);
        self
    }

    /// Appends the next ARGV (each value one argument).
    fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        self.args.extend(arg.to_redis_args());
        self
    }

    /// Appends KEYS[n+1] when there is one.
    fn key_if(mut self, key: Option<String>) -> Self {
        self.keys.extend(key);
        self
    }

    /// Appends field, value pairs to ARGV.
    fn pairs<F: ToRedisArgs, V: ToRedisArgs>(
        self,
        pairs: impl IntoIterator<Item = (F, V)>,
    ) -> Self {
        pairs
            .into_iter()
            .fold(self, |inv, (f, v)| inv.arg(f).arg(v))
    }

    /// The call on its own (EVALSHA, and the script loaded again on NOSCRIPT).
    pub fn prepare(&self) -> ScriptInvocation<'static> {
        let mut inv = self.script.prepare_invoke();
        for k in &self.keys {
            inv.key(k);
        }
        for a in &self.args {
            inv.arg(a.as_slice());
        }
        inv
    }

    /// Appends the call's EVALSHA to `pipe`. Redis that lost its scripts answers NOSCRIPT: the
    /// caller loads [`ALL_SOURCES`] and sends the pipeline again.
    pub fn add_to(&self, pipe: &mut Pipeline) {
        let cmd = pipe
            .cmd("EVALSHA")
            .arg(self.script.get_hash())
            .arg(self.keys.len());
        for k in &self.keys {
            cmd.arg(k);
        }
        for a in &self.args {
            cmd.arg(a.as_slice());
        }
    }

    /// The KEYS, in the script header's order.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }
}

/// A typed call of one script: its KEYS and ARGV from typed fields, its reply parsed once.
pub trait Call {
    /// What the script answers.
    type Reply: FromReply;
    /// The script's file in `proto/lua/`.
    const FILE: &'static str;
    /// KEYS in the order of the script's header, then ARGV.
    fn invocation(&self, keys: &Keys) -> Invocation;
    /// Reads the script's reply.
    fn parse(reply: Value) -> Result<Self::Reply, ReplyError> {
        Self::Reply::from_reply(Self::FILE, reply)
    }
}

/// A reply type: how a script's answer reads, once for every script that answers this way.
pub trait FromReply: Sized {
    /// Reads `reply` of `script` (named in the error).
    fn from_reply(script: &'static str, reply: Value) -> Result<Self, ReplyError>;
}

/// A `0`/`1` answer: `1` is true.
impl FromReply for bool {
    fn from_reply(script: &'static str, reply: Value) -> Result<Self, ReplyError> {
        match decode::<i64>(script, reply)? {
            1 => Ok(true),
            0 => Ok(false),
            n => Err(ReplyError::new(script, n.to_string())),
        }
    }
}

/// A Redis time in ms, or `None` when the script answers a negative number (it did nothing).
impl FromReply for Option<u64> {
    fn from_reply(script: &'static str, reply: Value) -> Result<Self, ReplyError> {
        let t: i64 = decode(script, reply)?;
        Ok(u64::try_from(t).ok())
    }
}

/// `reply` as `T`, or a [`ReplyError`] naming `script`.
fn decode<T: redis::FromRedisValue>(script: &'static str, reply: Value) -> Result<T, ReplyError> {
    let shown = format!("{reply:?}");
    redis::from_redis_value(reply).map_err(|e| ReplyError::new(script, format!("{shown}: {e}")))
}

/// A script's `{tag, value}` answer.
pub trait Tagged: Sized {
    /// Parses the answer's strings; the error describes what was wrong.
    fn parse(reply: &[String]) -> Result<Self, String>;
}

impl<T: Tagged> FromReply for T {
    fn from_reply(script: &'static str, reply: Value) -> Result<Self, ReplyError> {
        let v: Vec<String> = decode(script, reply)?;
        T::parse(&v).map_err(|d| ReplyError::new(script, d))
    }
}

/// A typed call of the script in static `$script`: the struct of its arguments and its [`Call`]
/// (`Reply` = `$reply`, `FILE` = the script's file), whose `invocation` builds the KEYS and ARGV
/// from `self` and the farm's [`Keys`] with [`invoke!`].
///
/// ```ignore
/// call! {
///     /// `pin.lua`: ...
///     pub struct Pin<'a>: PIN -> bool {
///         pub id: &'a str,
///     }
///
///     fn invocation(&self, k) {
///         invoke!(keys: k.channel(self.id), k.pinned(); args: "1", self.id)
///     }
/// }
/// ```
macro_rules! call {
    (
        $(#[$meta:meta])*
        pub struct $name:ident<$lt:lifetime>: $script:ident -> $reply:ty {
            $($(#[$fmeta:meta])* pub $field:ident: $ty:ty,)*
        }

        fn invocation(&$this:ident, $k:ident) $body:block
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone)]
        pub struct $name<$lt> {
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl $name<'_> {
            /// The script it calls.
            const SCRIPT: &'static std::sync::LazyLock<redis::Script> = &$crate::scripts::$script;
        }

        impl $crate::scripts::Call for $name<'_> {
            type Reply = $reply;
            const FILE: &'static str = $crate::scripts::file::$script;
            fn invocation(&$this, $k: &$crate::keys::Keys) -> $crate::scripts::Invocation $body
        }
    };
}
use call;

/// Inside [`call!`]: an [`Invocation`] of the call's script, with KEYS in the order of the
/// script's header, then ARGV: `invoke!(keys: k.channel(id), k.pinned(); args: "1", id)`.
macro_rules! invoke {
    (keys: $($key:expr),+ $(; args: $($arg:expr),+)? $(,)?) => {
        $crate::scripts::Invocation::new(Self::SCRIPT)
            $(.key($key))+
            $($(.arg($arg))+)?
    };
}
use invoke;

/// Lease and TTL lengths go to the scripts in ms.
fn ms(d: std::time::Duration) -> u64 {
    d.as_millis() as u64
}

/// The value stored in `farm:owner:<id>`.
pub fn owner_value(node: &str, gen: u64) -> String {
    format!("{node}:{gen}")
}

/// Splits `<node>:<gen>` (node ids never contain `:`).
pub fn split_owner(v: &str) -> Option<(&str, u64)> {
    let (node, gen) = v.rsplit_once(':')?;
    Some((node, gen.parse().ok()?))
}

#[cfg(test)]
mod tests;
