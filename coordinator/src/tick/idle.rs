//! Idle cleanup: a stop (with the owner's gen) for each channel whose last access in `farm:access`
//! is older than `idle_timeout`, and the access entries of channels nobody owns removed. Candidates
//! come in batches from a score range; `idle_stop.lua` re-checks the score, the owner and the pin.
//!
//! Invariant: a stop is sent once per gen; it is considered in flight (not sent again) for
//! `stop_resend_after`.

use super::{Pass, TickError};
use crate::events::Event;
use crate::shared::Shared;
use crate::store::StoreError;
use farm_proto::scripts::split_owner;
use farm_proto::scripts::IdleStopReply;
use farm_proto::types::event;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tracing::{debug, info};

/// Stops in flight, between ticks.
#[derive(Debug, Default)]
pub(super) struct State {
    /// channel -> (gen, until): a stop for that gen is in flight; not sent again before `until`.
    in_flight: HashMap<String, (u64, Instant)>,
}

/// The access score (ms) below which a channel is idle.
pub(super) fn cutoff(now_ms: u64, idle_timeout: Duration) -> u64 {
    now_ms.saturating_sub(idle_timeout.as_millis() as u64)
}

/// An idle channel to ask `idle_stop.lua` about, with the owner value seen (the script re-checks it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Candidate {
    pub id: String,
    pub owner: Option<String>,
}

impl Candidate {
    fn gen(&self) -> Option<u64> {
        self.owner.as_deref().and_then(split_owner).map(|(_, g)| g)
    }
}

/// The channels of one batch to ask about: not those whose stop for the owner's current gen is
/// still in flight; at most `room`.
pub(super) fn plan(
    ids: Vec<String>,
    owners: Vec<Option<String>>,
    in_flight: &HashMap<String, (u64, Instant)>,
    room: usize,
) -> Vec<Candidate> {
    ids.into_iter()
        .zip(owners)
        .map(|(id, owner)| Candidate { id, owner })
        .filter(
            |c| !matches!((in_flight.get(&c.id), c.gen()), (Some((g, _)), Some(gen)) if *g == gen),
        )
        .take(room)
        .collect()
}

/// Where the next batch starts in the score range: entries this batch removed no longer take a rank.
pub(super) fn next_offset(offset: usize, read: usize, dropped: usize) -> usize {
    offset + read - dropped
}

pub(super) async fn run(pass: &mut Pass<'_>, st: &mut State) -> Result<(), TickError> {
    let cfg = &pass.sh.cfg;
    let cutoff = cutoff(pass.now_ms, cfg.idle_timeout);
    let now = Instant::now();
    st.in_flight.retain(|_, (_, until)| *until > now);
    let mut offset = 0usize;
    loop {
        let room = cfg.max_idle_stops.saturating_sub(pass.report.idle_stops);
        if room == 0 {
            break;
        }
        let ids = read_idle(pass.sh, cutoff, offset).await?;
        let read = ids.len();
        if read == 0 {
            break;
        }
        pass.report.idle_seen += read;
        let owners = read_owners(pass.sh, &ids).await?;
        let todo = plan(ids, owners, &st.in_flight, room);
        let dropped = stop(pass, st, cutoff, &todo).await?;
        if read < cfg.idle_batch {
            break;
        }
        offset = next_offset(offset, read, dropped);
    }
    Ok(())
}

/// One batch of idle channels, from rank `offset` of those with a score below `cutoff`.
async fn read_idle(sh: &Shared, cutoff: u64, offset: usize) -> Result<Vec<String>, StoreError> {
    let mut cmd = redis::cmd("ZRANGEBYSCORE");
    cmd.arg(sh.keys.access())
        .arg("-inf")
        .arg(format!("({cutoff}"))
        .arg("LIMIT")
        .arg(offset)
        .arg(sh.cfg.idle_batch);
    sh.store.query("ZRANGEBYSCORE access", &cmd).await
}

async fn read_owners(sh: &Shared, ids: &[String]) -> Result<Vec<Option<String>>, StoreError> {
    let mut p = redis::pipe();
    for id in ids {
        p.get(sh.keys.owner(id));
    }
    sh.store.pipe("GET owners", &p).await
}

/// Asks `idle_stop.lua` about `todo`; returns how many access entries it removed.
async fn stop(
    pass: &mut Pass<'_>,
    st: &mut State,
    cutoff: u64,
    todo: &[Candidate],
) -> Result<usize, TickError> {
    if todo.is_empty() {
        return Ok(0);
    }
    let batch: Vec<(&str, Option<&str>)> = todo
        .iter()
        .map(|c| (c.id.as_str(), c.owner.as_deref()))
        .collect();
    let replies = pass.fence.idle_stops(cutoff, &batch).await?;
    let resend_at = Instant::now() + pass.sh.cfg.stop_resend_after();
    let mut dropped = 0;
    for (c, reply) in todo.iter().zip(&replies.done) {
        match reply {
            IdleStopReply::Stop => {
                let (node, gen) = c.owner.as_deref().and_then(split_owner).unwrap_or(("", 0));
                st.in_flight.insert(c.id.clone(), (gen, resend_at));
                pass.report.idle_stops += 1;
                pass.sh.metrics.idle_stops.inc();
                info!(channel = %c.id, node, gen, "idle: stop sent");
            }
            IdleStopReply::Dropped => {
                dropped += 1;
                pass.report.stale_access += 1;
                pass.sh.metrics.reaped("stale_access", 1);
                debug!(channel = %c.id, "idle access entry of a channel nobody runs removed");
                pass.events.push(
                    Event::new(event::REAPED, pass.now_ms)
                        .field("channel", &c.id)
                        .field("reason", "stale_access"),
                );
            }
            IdleStopReply::Pinned | IdleStopReply::Fresh | IdleStopReply::Changed => {}
        }
    }
    replies.finish()?;
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_cutoff_is_idle_timeout_before_now() {
        assert_eq!(cutoff(100_000, Duration::from_secs(60)), 40_000);
        assert_eq!(cutoff(1_000, Duration::from_secs(60)), 0);
    }

    #[test]
    fn a_stop_in_flight_for_the_same_gen_is_not_sent_again() {
        let until = Instant::now() + Duration::from_secs(10);
        let in_flight: HashMap<String, (u64, Instant)> =
            [("a".to_string(), (5, until)), ("b".to_string(), (1, until))].into();
        let ids = strings(&["a", "b", "c", "d"]);
        let owners = vec![
            Some("n1:5".to_string()), // its stop for gen 5 is in flight
            Some("n1:2".to_string()), // a newer gen than the stop in flight
            None,                     // nobody owns it: the script drops its entry
            Some("n2:7".to_string()),
        ];
        let todo = plan(ids.clone(), owners.clone(), &in_flight, 10);
        let ids_of: Vec<&str> = todo.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids_of, ["b", "c", "d"]);
        assert_eq!(todo[0].owner.as_deref(), Some("n1:2"));
        assert_eq!(todo[0].gen(), Some(2));
        assert_eq!(todo[1].gen(), None);
        // Room bounds the plan.
        assert_eq!(plan(ids, owners, &in_flight, 2).len(), 2);
    }

    #[test]
    fn removed_entries_do_not_take_a_rank_in_the_next_batch() {
        assert_eq!(next_offset(0, 500, 0), 500);
        assert_eq!(next_offset(500, 500, 120), 880);
        assert_eq!(next_offset(0, 500, 500), 0);
    }
}
