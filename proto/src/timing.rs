//! The farm-wide timing relations: how the TTLs, the tick and the segment duration that nodes and
//! coordinators are configured with turn into the intervals and deadlines they act on. Both daemons
//! call these functions, so the two sides of a promise (a node fences before a coordinator
//! re-homes; a live node never looks dead) are written in one place.

use std::time::Duration;

/// A node that could not renew its leases for this long stops its FFmpegs: ⅔ of the lease TTL, so
/// the fence falls before the lease can expire in Redis and another node claims the channel.
pub fn fence_after(lease_ttl: Duration) -> Duration {
    lease_ttl * 2 / 3
}

/// Interval of a node's keepalive loop (heartbeat + lease renewal): a sixth of the shorter TTL.
///
/// A Redis outage costs nothing while the renewal sent after it ends still lands before the fence
/// time ([`fence_after`] the last renewal sent): outages up to ⅔ TTL minus one interval. A sixth
/// makes that half the lease TTL, whatever the phase of the outage; a third left one third, and a
/// 1.5 s outage on a 4 s lease fenced in one run out of eight.
pub fn keepalive_interval(lease_ttl: Duration, node_ttl: Duration) -> Duration {
    lease_ttl.min(node_ttl) / 6
}

/// How long after its last record a channel's playlist is still served while nobody publishes (its
/// owner died, froze or hands it over): until the failover had time to happen (node TTL, then the
/// lease) and the new owner to start. After that, a viewer waits for a new start like on a cold one.
pub fn hold_max(node_ttl: Duration, lease_ttl: Duration, start_timeout: Duration) -> Duration {
    node_ttl + lease_ttl + start_timeout
}

/// A running FFmpeg that publishes no new segment for this long has stalled: three segment
/// durations (a live encoder publishes one per `hls_time`; two late ones are still jitter).
pub fn stall_after(hls_time: Duration) -> Duration {
    hls_time * 3
}

/// How often a coordinator renews (and a follower retries) the leader lease: a third of its TTL,
/// so two renewals may fail before the lease lapses.
pub fn leader_renew_interval(leader_ttl: Duration) -> Duration {
    leader_ttl / 3
}

/// The longest pause between two successful Redis round trips of a coordinator that is still
/// normal. A longer one means Redis (or the process) stalled: heartbeats may look old for reasons
/// that are not the nodes', so reaping waits. A stall shorter than this cannot make a live node
/// look dead: its heartbeat age stays below a third of the node TTL plus the stall. Every
/// coordinator makes a round trip each tick (followers too), so two ticks is abnormal.
pub fn stall_threshold(node_ttl: Duration, tick: Duration) -> Duration {
    (node_ttl / 3).max(tick * 2)
}

/// How long a stop command a coordinator sent is considered in flight before it may be sent again:
/// long enough for the node to act on it or to be found dead and its lease to lapse.
pub fn stop_resend_after(lease_ttl: Duration, node_ttl: Duration) -> Duration {
    lease_ttl + node_ttl
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_fences_before_its_lease_lapses_and_renews_well_before_the_fence() {
        let s = Duration::from_secs;
        assert_eq!(fence_after(s(9)), s(6));
        assert!(fence_after(s(10)) < s(10));
        assert_eq!(keepalive_interval(s(12), s(6)), s(1));
        assert!(keepalive_interval(s(10), s(10)) * 3 < fence_after(s(10)));
        assert_eq!(hold_max(s(10), s(10), s(10)), s(30));
        assert_eq!(stall_after(s(2)), s(6));
        assert_eq!(leader_renew_interval(s(9)), s(3));
        assert_eq!(stall_threshold(s(9), s(1)), s(3));
        assert_eq!(stall_threshold(s(3), s(1)), s(2));
        assert_eq!(stop_resend_after(s(10), s(5)), s(15));
    }
}
