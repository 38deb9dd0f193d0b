//! Audit events the coordinator appends to `farm:events` (capped), batched in one pipeline.
//!
//! Events are written after the fenced action they describe succeeded, so the trail never claims an
//! action a deposed leader could not take.

use crate::store::{Result, Store};
use farm_proto::keys::EVENTS_MAXLEN;

/// One entry of `farm:events`: `event` plus its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: &'static str,
    pub fields: Vec<(&'static str, String)>,
}

impl Event {
    /// An event of `kind` at `at_ms` (ms since the epoch).
    pub fn new(kind: &'static str, at_ms: u64) -> Self {
        Self {
            kind,
            fields: vec![("at", at_ms.to_string())],
        }
    }

    pub fn field(mut self, name: &'static str, value: impl ToString) -> Self {
        self.fields.push((name, value.to_string()));
        self
    }
}

/// Writes and clears `events`; nothing is sent when it is empty.
pub async fn emit(store: &Store, key: &str, by: &str, events: &mut Vec<Event>) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for e in events.iter() {
        let cmd = pipe
            .cmd("XADD")
            .arg(key)
            .arg("MAXLEN")
            .arg("~")
            .arg(EVENTS_MAXLEN)
            .arg("*")
            .arg("event")
            .arg(e.kind);
        for (k, v) in &e.fields {
            cmd.arg(*k).arg(v);
        }
        cmd.arg("by").arg(by).ignore();
    }
    store.pipe::<()>("XADD events", &pipe).await?;
    events.clear();
    Ok(())
}

/// Wall-clock ms, for events not tied to a Redis `TIME` reading.
pub fn local_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
