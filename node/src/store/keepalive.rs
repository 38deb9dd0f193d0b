//! The keepalive round trip: the node heartbeat, every lease renewal and each channel's last
//! segment time in one pipeline. A bad key of one channel (WRONGTYPE: an operator's mistake) fails
//! its own renewal, not the whole round trip.

use super::{Result, Store, StoreError};
use farm_proto::records::{NodeRecord, StreamField};
use farm_proto::scripts::{Call, Heartbeat, Renew, StreamSet};
use std::time::Duration;

/// One owned channel's lease to renew, with the runtime facts that ride along.
#[derive(Debug, Clone)]
pub struct Renewal {
    pub channel: String,
    pub owner: String,
    /// The channel's provider, whose connection holding is renewed with the lease.
    pub provider: Option<String>,
    /// Redis-free wall time of the last finished segment (ms since the epoch), if any.
    pub last_segment_at: Option<u64>,
}

/// What one keepalive round trip found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keepalive {
    /// Per renewal: whether the lease is still ours.
    pub held: Vec<bool>,
    /// The node's alive key had vanished although it heartbeated before: Redis lost its keys.
    pub lost: bool,
    /// Wrong-typed keys of this node the heartbeat replaced (+100: `farm:nodes` is wrong-typed).
    pub repaired: i64,
    /// Renewals Redis answered with an error (a wrong-typed key of that channel).
    pub data_errors: Vec<String>,
    /// Redis time when the heartbeat ran.
    pub redis_now_ms: u64,
    /// The heartbeat arrived later than allowed and changed nothing.
    pub stale: bool,
}

/// What a heartbeat says about its sender's view of time.
#[derive(Debug, Clone)]
pub struct Beat {
    /// This incarnation has heartbeated before.
    pub before: bool,
    /// The Redis time (ms) the node expects when the heartbeat arrives (from its last reply).
    pub expected_now_ms: Option<u64>,
    /// How late it may arrive: later, it sat in a partitioned link and must change nothing.
    pub max_lag: Duration,
}

impl Store {
    /// One round trip: the node heartbeat, every lease renewal and each channel's last segment time.
    /// Returns, per renewal, whether the lease is still ours.
    #[allow(clippy::too_many_arguments)] // the heartbeat's inputs and the renewals ride in one round trip
    pub async fn keepalive(
        &self,
        node: &str,
        node_ttl: Duration,
        incarnation: &str,
        record: &NodeRecord,
        lease: Duration,
        renewals: &[Renewal],
        beat: &Beat,
    ) -> Result<Keepalive> {
        let k = &self.keys;
        let mut pipe = redis::pipe();
        let heartbeat = Heartbeat {
            node,
            ttl: node_ttl,
            incarnation,
            before: beat.before,
            runs_channels: !renewals.is_empty(),
            lease,
            expected_now_ms: beat.expected_now_ms,
            max_lag: beat.max_lag,
            record,
        };
        heartbeat.invocation(k).add_to(&mut pipe);
        for r in renewals {
            let renew = Renew {
                id: &r.channel,
                owner: &r.owner,
                provider: r.provider.as_deref(),
                lease,
                expected_now_ms: beat.expected_now_ms,
                max_lag: beat.max_lag,
            };
            renew.invocation(k).add_to(&mut pipe);
            if let Some(t) = r.last_segment_at {
                let fields = [StreamField::LastSegmentAt(Some(t))];
                let set = StreamSet {
                    id: &r.channel,
                    owner: &r.owner,
                    fields: &fields,
                };
                set.invocation(k).add_to(&mut pipe);
                pipe.ignore();
            }
        }
        pipe.ignore_errors();
        let out = self.run_pipe("keepalive", pipe).await?;
        parse_keepalive(out, renewals)
    }
}

/// Reads the heartbeat's reply and one renewal reply per renewal.
fn parse_keepalive(out: Vec<redis::Value>, renewals: &[Renewal]) -> Result<Keepalive> {
    let mut out = out.into_iter();
    let Some(hb_reply) = out.next() else {
        return Err(StoreError::Protocol("keepalive: no heartbeat reply".into()));
    };
    let renewed: Vec<redis::Value> = out.collect();
    if renewed.len() != renewals.len() {
        return Err(StoreError::Protocol(format!(
            "keepalive: {} replies for {} renewals",
            renewed.len(),
            renewals.len()
        )));
    }
    if let redis::Value::ServerError(e) = &hb_reply {
        return Err(StoreError::Protocol(format!("heartbeat: {e:?}")));
    }
    let hb = Heartbeat::parse(hb_reply)?;
    let mut held = Vec::with_capacity(renewed.len());
    let mut data_errors = Vec::new();
    for (v, r) in renewed.into_iter().zip(renewals) {
        match v {
            redis::Value::ServerError(e) => {
                data_errors.push(format!("{}: {e:?}", r.channel));
                held.push(false);
            }
            v => held.push(Renew::parse(v)?),
        }
    }
    Ok(Keepalive {
        held,
        lost: hb.lost,
        repaired: hb.repaired,
        data_errors,
        redis_now_ms: hb.now_ms,
        stale: hb.stale,
    })
}
