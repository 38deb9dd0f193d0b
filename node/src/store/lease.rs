//! The node's scripted calls: each one a typed call of [`farm_proto::scripts`], whose docs name the
//! script's KEYS, ARGV and replies.

use super::{Result, Store};
use farm_proto::records::StreamField;
use farm_proto::scripts::{
    Claim, ClaimResult, Handover, HandoverResult, Release, ReleaseNode, StreamSet, Timeline,
};
use std::time::Duration;

impl Store {
    /// The claim script: the lease and a fresh gen, or who holds it, or "full".
    pub async fn claim(
        &self,
        id: &str,
        node: &str,
        lease: Duration,
        capacity: u32,
        provider: Option<&str>,
        weight: u32,
    ) -> Result<ClaimResult> {
        self.call(&Claim {
            id,
            node,
            lease,
            capacity,
            provider,
            weight,
        })
        .await
    }

    /// A gen-checked write to `farm:stream:<id>`; `false` means we no longer own the channel.
    pub async fn stream_set(&self, id: &str, owner: &str, fields: &[StreamField]) -> Result<bool> {
        self.call(&StreamSet { id, owner, fields }).await
    }

    /// Releases a lease by compare. `final_state` keeps the stream hash (e.g. `failed` with its
    /// reason) for `keep`; otherwise the hash is deleted. The access entry goes either way.
    pub async fn release(
        &self,
        id: &str,
        node: &str,
        owner: &str,
        provider: Option<&str>,
        final_state: Option<(&str, &str)>,
        keep: Duration,
    ) -> Result<bool> {
        self.call(&Release {
            id,
            node,
            owner,
            provider,
            final_state,
            keep,
        })
        .await
    }

    /// Records the channel's published timeline (gen-checked); `false` means the lease is not ours.
    pub async fn record_timeline(
        &self,
        id: &str,
        owner: &str,
        gen: u64,
        rec: &crate::playlist::Recorded,
        playlist: &[u8],
        keep: Duration,
    ) -> Result<bool> {
        self.call(&Timeline {
            id,
            owner,
            gen,
            target: rec.target,
            last: rec.last,
            disc: rec.disc,
            playlist,
            keep,
        })
        .await
    }

    /// The handover script: moves the lease from `from` (holding `gen`) to `to`.
    #[allow(clippy::too_many_arguments)] // one per script argument; a struct would only rename them
    pub async fn handover(
        &self,
        id: &str,
        from: &str,
        gen: u64,
        to: &str,
        lease: Duration,
        capacity: u32,
        weight: u32,
    ) -> Result<HandoverResult> {
        self.call(&Handover {
            id,
            from,
            gen,
            to,
            lease,
            capacity,
            weight,
        })
        .await
    }

    /// Clears one channel of an old incarnation of `node` (lease and hash only if they still name it).
    pub async fn release_node_channel(&self, node: &str, id: &str) -> Result<bool> {
        self.call(&ReleaseNode { node, id }).await
    }
}
