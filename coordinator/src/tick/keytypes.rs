//! The farm-wide keys' types, checked by every coordinator each tick (one pipeline of TYPE): a
//! wrong-typed key (an operator's mistake) is reported every tick (log, metric) and, by the leader,
//! replaced when the farm can rebuild it. The catalog is only reported: it is the operator's data.

use super::fenced::Fence;
use super::TickError;
use crate::events::{self, Event};
use crate::shared::Shared;
use crate::store::StoreError;
use farm_proto::scripts::Repair;
use farm_proto::types::event;
use farm_proto::Keys;
use std::time::Instant;
use tracing::error;

/// A farm-wide key and the type the farm keeps in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FarmKey {
    pub key: String,
    pub wanted: &'static str,
    /// The farm rebuilds it (from claims, heartbeats, ...): the leader may replace a wrong one.
    pub rebuildable: bool,
}

pub(super) fn farm_keys(k: &Keys) -> Vec<FarmKey> {
    let key = |key: String, wanted, rebuildable| FarmKey {
        key,
        wanted,
        rebuildable,
    };
    vec![
        key(k.access(), "zset", true),
        key(k.nodes(), "zset", true),
        key(k.recovering(), "string", true),
        key(k.since(), "string", true),
        key(k.events(), "stream", true),
        key(k.channels(), "set", false),
        key(k.pinned(), "set", false),
    ]
}

/// What happens to one wrong-typed key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fix {
    /// This coordinator leads: it replaces the key.
    Replace,
    /// Another coordinator leads and will replace it.
    LeaveForLeader,
    /// The catalog: an operator must fix it.
    LeaveForOperator,
}

impl Fix {
    fn action(self) -> &'static str {
        match self {
            Fix::Replace => "replaced (the farm rebuilds it)",
            Fix::LeaveForLeader => "left for the leader to replace",
            Fix::LeaveForOperator => "left (the catalog: an operator must fix it)",
        }
    }
}

/// A farm-wide key found with another type than the farm keeps there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct WrongType<'a> {
    pub key: &'a FarmKey,
    pub found: String,
    pub fix: Fix,
}

/// The wrong-typed keys among `keys`, given what TYPE `found` for each (absent keys are fine).
pub(super) fn plan(keys: &[FarmKey], found: Vec<String>, leading: bool) -> Vec<WrongType<'_>> {
    keys.iter()
        .zip(found)
        .filter(|(k, found)| found != k.wanted && found != "none")
        .map(|(key, found)| {
            let fix = match (key.rebuildable, leading) {
                (false, _) => Fix::LeaveForOperator,
                (true, true) => Fix::Replace,
                (true, false) => Fix::LeaveForLeader,
            };
            WrongType { key, found, fix }
        })
        .collect()
}

/// Checks the farm-wide keys' types and, when leading, replaces what the farm rebuilds (recorded
/// as `key_repaired` events). `false` when `farm:nodes` is still wrong-typed: this tick cannot
/// read the nodes.
pub(super) async fn check(sh: &Shared, now_ms: u64) -> Result<bool, StoreError> {
    let keys = farm_keys(&sh.keys);
    let mut p = redis::pipe();
    for k in &keys {
        p.cmd("TYPE").arg(&k.key);
    }
    let found: Vec<String> = sh.store.pipe("TYPE of the farm-wide keys", &p).await?;
    let held = sh.leadership().leading(Instant::now()).map(str::to_string);
    let nodes_key = sh.keys.nodes();
    let mut nodes_ok = true;
    let mut events = Vec::new();
    for wrong in plan(&keys, found, held.is_some()) {
        sh.metrics.data_errors.inc();
        let mut fix = wrong.fix;
        if let (Fix::Replace, Some(held)) = (fix, &held) {
            match Fence::new(sh, held)
                .repair_key(&wrong.key.key, wrong.key.wanted)
                .await
            {
                Ok(Repair::Fine | Repair::Deleted(_)) => events.push(repaired(&wrong, now_ms)),
                Err(TickError::NotLeader) => fix = Fix::LeaveForLeader,
                Err(TickError::Store(e)) => return Err(e),
            }
        }
        let (key, found, wanted) = (&wrong.key.key, &wrong.found, wrong.key.wanted);
        error!(%key, %found, %wanted, action = fix.action(), "a farm-wide key has the wrong type");
        if *key == nodes_key && fix != Fix::Replace {
            nodes_ok = false;
        }
    }
    events::emit(&sh.store, &sh.keys.events(), &sh.cfg.by(), &mut events).await?;
    Ok(nodes_ok)
}

fn repaired(wrong: &WrongType<'_>, now_ms: u64) -> Event {
    Event::new(event::KEY_REPAIRED, now_ms)
        .field("key", &wrong.key.key)
        .field("found", &wrong.found)
        .field("wanted", wrong.key.wanted)
        .field("action", "replaced")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_wrong_types_are_planned_and_only_the_leader_replaces() {
        let keys = farm_keys(&Keys::new("farm"));
        let mut found: Vec<String> = keys.iter().map(|k| k.wanted.to_string()).collect();
        assert!(plan(&keys, found.clone(), true).is_empty());
        found[0] = "none".into(); // absent: fine
        found[1] = "string".into(); // farm:nodes
        found[5] = "hash".into(); // farm:channels
        let fixes = |leading| -> Vec<(String, Fix)> {
            plan(&keys, found.clone(), leading)
                .into_iter()
                .map(|w| (w.key.key.clone(), w.fix))
                .collect()
        };
        assert_eq!(
            fixes(true),
            [
                ("farm:nodes".to_string(), Fix::Replace),
                ("farm:channels".to_string(), Fix::LeaveForOperator)
            ]
        );
        assert_eq!(
            fixes(false),
            [
                ("farm:nodes".to_string(), Fix::LeaveForLeader),
                ("farm:channels".to_string(), Fix::LeaveForOperator)
            ]
        );
    }

    #[test]
    fn the_catalog_is_never_replaced() {
        let keys = farm_keys(&Keys::new("farm"));
        let catalog: Vec<_> = keys
            .iter()
            .filter(|k| !k.rebuildable)
            .map(|k| &k.key)
            .collect();
        assert_eq!(catalog, ["farm:channels", "farm:pinned"]);
    }
}
