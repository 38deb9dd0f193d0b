//! The leader's writes: one typed call per Lua script, each script first checking that
//! `farm:leader` still holds this coordinator's value. Replies are parsed here, once, into one type
//! per script; a script that finds another leader becomes [`TickError::NotLeader`].
//!
//! Calls of one kind go in one pipeline (one script per pipeline, so that NOSCRIPT means none of
//! them ran and the store can load the scripts and send it again). A pipeline's replies are
//! answered in call order up to the first `notleader` ([`Replies`]): the calls before it took
//! effect and are accounted for, the rest did not.

use super::TickError;
use crate::shared::Shared;
use crate::store::{eval, StoreError};
use farm_proto::scripts::{self, split_owner};
use farm_proto::types::{Command, Op};

pub use farm_proto::keys::CMD_MAXLEN;

/// What the fenced scripts answer when the caller no longer leads.
const NOT_LEADER: &str = "notleader";

/// Writes fenced by the leader value `held`.
pub(super) struct Fence<'a> {
    sh: &'a Shared,
    held: &'a str,
}

/// The replies of one pipeline of fenced calls, in call order, up to the first call that found
/// another leader.
#[derive(Debug)]
pub(super) struct Replies<T> {
    pub done: Vec<T>,
    lost: bool,
}

impl<T> Replies<T> {
    /// [`TickError::NotLeader`] when a call found another leader; call it after accounting for
    /// `done`.
    pub fn finish(&self) -> Result<(), TickError> {
        if self.lost {
            Err(TickError::NotLeader)
        } else {
            Ok(())
        }
    }
}

/// A script's reply other than `notleader`.
trait Reply: Sized {
    const SCRIPT: &'static str;
    fn parse(reply: &str) -> Option<Self>;
}

/// `idle_stop.lua`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IdleStop {
    /// A stop with the owner's gen was sent.
    Stop,
    /// Nobody owns the channel: its stale access entry was removed.
    Dropped,
    Pinned,
    /// Accessed since the caller looked, or no access entry.
    Fresh,
    /// The owner changed since the caller looked.
    Changed,
}

impl Reply for IdleStop {
    const SCRIPT: &'static str = "idle_stop.lua";
    fn parse(reply: &str) -> Option<Self> {
        Some(match reply {
            "stop" => Self::Stop,
            "dropped" => Self::Dropped,
            "pinned" => Self::Pinned,
            "fresh" => Self::Fresh,
            "changed" => Self::Changed,
            _ => return None,
        })
    }
}

/// `reap_channel.lua`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReapChannel {
    /// The dead node's lease was deleted.
    Released,
    /// Only leftovers were removed (the lease was gone or another node's).
    Cleared,
    /// The node's alive key is back: nothing was done.
    Alive,
}

impl Reply for ReapChannel {
    const SCRIPT: &'static str = "reap_channel.lua";
    fn parse(reply: &str) -> Option<Self> {
        Some(match reply {
            "released" => Self::Released,
            "cleared" => Self::Cleared,
            "alive" => Self::Alive,
            _ => return None,
        })
    }
}

/// `reap_node.lua`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReapNode {
    Reaped,
    /// Its alive key is back, or a newer heartbeat.
    Alive,
    /// Channels are still listed in its set.
    Busy,
}

impl Reply for ReapNode {
    const SCRIPT: &'static str = "reap_node.lua";
    fn parse(reply: &str) -> Option<Self> {
        Some(match reply {
            "reaped" => Self::Reaped,
            "alive" => Self::Alive,
            "busy" => Self::Busy,
            _ => return None,
        })
    }
}

/// What `reconcile.lua` removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Removed {
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

impl Reply for Removed {
    const SCRIPT: &'static str = "reconcile.lua";
    fn parse(reply: &str) -> Option<Self> {
        Some(match reply {
            "" => Self::default(),
            "u" => Self {
                set: true,
                stream: false,
            },
            "s" => Self {
                set: false,
                stream: true,
            },
            "us" => Self {
                set: true,
                stream: true,
            },
            _ => return None,
        })
    }
}

/// `repair_key.lua`'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Repair {
    /// The key has the right type by now, or is gone.
    Fine,
    /// The wrong-typed key (of this type) was deleted: the farm rebuilds it.
    Deleted(String),
}

impl Reply for Repair {
    const SCRIPT: &'static str = "repair_key.lua";
    fn parse(reply: &str) -> Option<Self> {
        Some(match reply {
            "ok" => Self::Fine,
            "" => return None,
            found => Self::Deleted(found.to_string()),
        })
    }
}

/// Parses a pipeline's replies up to the first `notleader`; an unknown reply is a protocol error.
fn parse_all<T: Reply>(raw: Vec<String>) -> Result<Replies<T>, StoreError> {
    let mut done = Vec::with_capacity(raw.len());
    for r in raw {
        if r == NOT_LEADER {
            return Ok(Replies { done, lost: true });
        }
        done.push(T::parse(&r).ok_or_else(|| StoreError::protocol(T::SCRIPT, format!("{r:?}")))?);
    }
    Ok(Replies { done, lost: false })
}

impl<'a> Fence<'a> {
    pub fn new(sh: &'a Shared, held: &'a str) -> Self {
        Self { sh, held }
    }

    /// Sends `pipe` (calls of `T`'s script only) and parses its replies.
    async fn send<T: Reply>(&self, pipe: &redis::Pipeline) -> Result<Replies<T>, TickError> {
        let raw: Vec<String> = self.sh.store.pipe(T::SCRIPT, pipe).await?;
        Ok(parse_all(raw)?)
    }

    /// One call: its reply, or [`TickError::NotLeader`].
    async fn one<T: Reply>(
        &self,
        keys: &[&str],
        args: &[&str],
        script: &redis::Script,
    ) -> Result<T, TickError> {
        let mut p = redis::pipe();
        eval(&mut p, script, keys, args);
        let mut r = self.send::<T>(&p).await?;
        r.finish()?;
        r.done
            .pop()
            .ok_or_else(|| StoreError::protocol(T::SCRIPT, "no reply").into())
    }

    /// `idle_stop.lua` for each `(channel, owner value seen)`: stops the channels still idle
    /// (last access before `cutoff_ms`) and still owned as seen.
    pub async fn idle_stops(
        &self,
        cutoff_ms: u64,
        batch: &[(&str, Option<&str>)],
    ) -> Result<Replies<IdleStop>, TickError> {
        let k = &self.sh.keys;
        let (leader, access) = (k.leader(), k.access());
        let (cutoff, maxlen, by) = (
            cutoff_ms.to_string(),
            CMD_MAXLEN.to_string(),
            self.sh.cfg.by(),
        );
        let mut p = redis::pipe();
        for (id, owner) in batch {
            // The command goes to the owner seen; without one the script only drops the entry.
            let node = owner.and_then(split_owner).map_or("", |(n, _)| n);
            let keys = [
                leader.as_str(),
                &k.owner(id),
                &access,
                &k.channel(id),
                &k.cmd(node),
            ];
            let args = [self.held, id, &cutoff, owner.unwrap_or(""), &maxlen, &by];
            eval(&mut p, &scripts::IDLE_STOP, &keys, &args);
        }
        self.send(&p).await
    }

    /// `reap_channel.lua` for each `(channel, provider)` of the dead `node`.
    pub async fn reap_channels(
        &self,
        node: &str,
        batch: &[(&str, Option<&str>)],
    ) -> Result<Replies<ReapChannel>, TickError> {
        let k = &self.sh.keys;
        let (leader, alive, streams, access, load) = (
            k.leader(),
            k.node_alive(node),
            k.node_streams(node),
            k.access(),
            k.node_load(node),
        );
        let mut p = redis::pipe();
        for (id, provider) in batch {
            // Without a provider the conns key is unused: any key of the farm's slot will do.
            let conns = provider.map_or_else(|| k.access(), |p| k.provider_conns(p));
            let keys = [
                leader.as_str(),
                &alive,
                &k.owner(id),
                &streams,
                &k.stream(id),
                &access,
                &conns,
                &load,
            ];
            let has_provider = if provider.is_some() { "1" } else { "0" };
            eval(
                &mut p,
                &scripts::REAP_CHANNEL,
                &keys,
                &[self.held, node, id, has_provider],
            );
        }
        self.send(&p).await
    }

    /// `reap_node.lua`: removes the dead `node`'s own keys when its last heartbeat is older than
    /// `hb_cutoff_ms` and it lists no channel any more.
    pub async fn reap_node(&self, node: &str, hb_cutoff_ms: u64) -> Result<ReapNode, TickError> {
        let k = &self.sh.keys;
        let keys = [
            k.leader(),
            k.node(node),
            k.node_alive(node),
            k.nodes(),
            k.node_streams(node),
            k.cmd(node),
            k.node_load(node),
        ];
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let args = [self.held, node, &hb_cutoff_ms.to_string()];
        self.one(&keys, &args, &scripts::REAP_NODE).await
    }

    /// `reconcile.lua` for each `(node, channel)`: drops what no lease of the node backs.
    pub async fn reconcile(&self, batch: &[(&str, &str)]) -> Result<Replies<Removed>, TickError> {
        let k = &self.sh.keys;
        let leader = k.leader();
        let mut p = redis::pipe();
        for (node, id) in batch {
            let keys = [
                leader.as_str(),
                &k.owner(id),
                &k.node_streams(node),
                &k.stream(id),
                &k.node_load(node),
            ];
            eval(&mut p, &scripts::RECONCILE, &keys, &[self.held, node, id]);
        }
        self.send(&p).await
    }

    /// `repair_key.lua`: replaces the farm-wide `key` when it does not have the type `wanted`.
    pub async fn repair_key(&self, key: &str, wanted: &str) -> Result<Repair, TickError> {
        let leader = self.sh.keys.leader();
        self.one(&[&leader, key], &[self.held, wanted], &scripts::REPAIR_KEY)
            .await
    }

    /// `command.lua`: a `start` of `channel` on `target`'s command stream.
    pub async fn start(&self, target: &str, channel: &str, reason: &str) -> Result<(), TickError> {
        let k = &self.sh.keys;
        let cmd = Command {
            reason: reason.to_string(),
            by: self.sh.cfg.by(),
            ..Command::new(Op::Start, channel)
        };
        let mut inv = scripts::COMMAND.prepare_invoke();
        inv.key(k.leader())
            .key(k.cmd(target))
            .arg(self.held)
            .arg(CMD_MAXLEN.to_string());
        for (field, value) in cmd.to_fields() {
            inv.arg(field).arg(value);
        }
        // The entry id, or nil when this coordinator no longer leads (nothing was written).
        let sent: Option<String> = self.sh.store.script("command.lua", inv).await?;
        sent.map(drop).ok_or(TickError::NotLeader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn replies_stop_at_the_first_notleader() {
        let r: Replies<IdleStop> =
            parse_all(raw(&["stop", "dropped", "notleader", "stop"])).expect("parses");
        assert_eq!(r.done, [IdleStop::Stop, IdleStop::Dropped]);
        assert!(matches!(r.finish(), Err(TickError::NotLeader)));
        let r: Replies<ReapChannel> =
            parse_all(raw(&["released", "cleared", "alive"])).expect("parses");
        assert_eq!(r.done.len(), 3);
        assert!(r.finish().is_ok());
    }

    #[test]
    fn an_unknown_reply_is_a_protocol_error() {
        assert!(parse_all::<ReapNode>(raw(&["reaped", "gone"])).is_err());
        assert!(parse_all::<IdleStop>(raw(&[""])).is_err());
        assert!(parse_all::<Removed>(raw(&["x"])).is_err());
    }

    #[test]
    fn reconcile_replies_name_what_went() {
        let r: Replies<Removed> = parse_all(raw(&["", "u", "s", "us"])).expect("parses");
        let labels: Vec<_> = r.done.iter().map(|r| r.label()).collect();
        assert_eq!(
            labels,
            [None, Some("set"), Some("stream"), Some("set,stream")]
        );
    }

    #[test]
    fn repair_replies() {
        assert_eq!(Repair::parse("ok"), Some(Repair::Fine));
        assert_eq!(
            Repair::parse("string"),
            Some(Repair::Deleted("string".into()))
        );
        let r: Replies<Repair> = parse_all(raw(&["notleader"])).expect("parses");
        assert!(r.done.is_empty() && r.finish().is_err());
    }
}
