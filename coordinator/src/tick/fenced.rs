//! The leader's writes: one typed call per Lua script ([`farm_proto::scripts`], where each call's
//! KEYS, ARGV and replies are documented), each script first checking that `farm:leader` still
//! holds this coordinator's value. A script that finds another leader becomes
//! [`TickError::NotLeader`].
//!
//! Calls of one kind go in one pipeline (one script per pipeline, so that NOSCRIPT means none of
//! them ran and the store can load the scripts and send it again). A pipeline's replies are
//! answered in call order up to the first `notleader` ([`Replies`]): the calls before it took
//! effect and are accounted for, the rest did not.

use super::TickError;
use crate::shared::Shared;
use crate::store::StoreError;
use farm_proto::scripts::{
    Call, Fenced, FencedReplies, IdleStop, IdleStopReply, ReapChannel, ReapChannelReply, ReapNode,
    ReapNodeReply, Reconcile, Removed, Repair, RepairKey, SendCommand,
};
use farm_proto::types::{Command, Op};

pub use farm_proto::keys::CMD_MAXLEN;

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

impl<'a> Fence<'a> {
    pub fn new(sh: &'a Shared, held: &'a str) -> Self {
        Self { sh, held }
    }

    /// Sends the `call` (of one script) of each item of `batch` in one pipeline and parses their
    /// replies.
    async fn send<'b, I, C, T>(
        &self,
        batch: &'b [I],
        call: impl Fn(&'b I) -> C,
    ) -> Result<Replies<T>, TickError>
    where
        C: Call<Reply = Fenced<T>>,
    {
        let mut p = redis::pipe();
        for item in batch {
            call(item).invocation(&self.sh.keys).add_to(&mut p);
        }
        let raw: Vec<redis::Value> = self.sh.store.pipe(C::FILE, &p).await?;
        let r = FencedReplies::parse::<C>(raw).map_err(StoreError::from)?;
        Ok(Replies {
            done: r.done,
            lost: r.lost,
        })
    }

    /// One call: its reply, or [`TickError::NotLeader`].
    async fn one<C, T>(&self, call: C) -> Result<T, TickError>
    where
        C: Call<Reply = Fenced<T>>,
    {
        match self.sh.store.call(&self.sh.keys, &call).await? {
            Fenced::Done(t) => Ok(t),
            Fenced::NotLeader => Err(TickError::NotLeader),
        }
    }

    /// `idle_stop.lua` for each `(channel, owner value seen)`: stops the channels still idle
    /// (last access before `cutoff_ms`) and still owned as seen.
    pub async fn idle_stops(
        &self,
        cutoff_ms: u64,
        batch: &[(&str, Option<&str>)],
    ) -> Result<Replies<IdleStopReply>, TickError> {
        let by = self.sh.cfg.by();
        self.send(batch, |&(id, owner)| IdleStop {
            held: self.held,
            id,
            cutoff_ms,
            owner,
            by: &by,
        })
        .await
    }

    /// `reap_channel.lua` for each `(channel, provider)` of the dead `node`.
    pub async fn reap_channels(
        &self,
        node: &str,
        batch: &[(&str, Option<&str>)],
    ) -> Result<Replies<ReapChannelReply>, TickError> {
        self.send(batch, |&(id, provider)| ReapChannel {
            held: self.held,
            node,
            id,
            provider,
        })
        .await
    }

    /// `reap_node.lua`: removes the dead `node`'s own keys when its last heartbeat is older than
    /// `hb_cutoff_ms` and it lists no channel any more.
    pub async fn reap_node(
        &self,
        node: &str,
        hb_cutoff_ms: u64,
    ) -> Result<ReapNodeReply, TickError> {
        self.one(ReapNode {
            held: self.held,
            node,
            hb_cutoff_ms,
        })
        .await
    }

    /// `reconcile.lua` for each `(node, channel)`: drops what no lease of the node backs.
    pub async fn reconcile(&self, batch: &[(&str, &str)]) -> Result<Replies<Removed>, TickError> {
        self.send(batch, |&(node, id)| Reconcile {
            held: self.held,
            node,
            id,
        })
        .await
    }

    /// `repair_key.lua`: replaces the farm-wide `key` when it does not have the type `wanted`.
    pub async fn repair_key(&self, key: &str, wanted: &str) -> Result<Repair, TickError> {
        self.one(RepairKey {
            held: self.held,
            key,
            wanted,
        })
        .await
    }

    /// `command.lua`: a `start` of `channel` on `target`'s command stream.
    pub async fn start(&self, target: &str, channel: &str, reason: &str) -> Result<(), TickError> {
        let cmd = Command {
            reason: reason.to_string(),
            by: self.sh.cfg.by(),
            ..Command::new(Op::Start, channel)
        };
        self.one(SendCommand {
            held: self.held,
            node: target,
            cmd: &cmd,
        })
        .await
        .map(drop)
    }
}
