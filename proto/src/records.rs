//! The hashes one crate writes and another reads, as typed records: a node's heartbeat hash
//! `farm:node:<node>` ([`NodeRecord`]) and a channel's runtime hash `farm:stream:<id>`
//! ([`StreamRecord`]). Field names are the ones `proto/README.md` lists.
//!
//! Every field is optional: a field absent from the hash (or one that does not parse) reads as
//! `None`, and [`NodeRecord::to_fields`] writes only the fields that are set.

use crate::types::StreamState;
use std::collections::HashMap;

/// A field's value as the hash holds it.
trait FieldValue: Sized {
    /// The value in the hash; `None` when it does not parse.
    fn read(v: &str) -> Option<Self>;
    fn write(&self) -> String;
}

impl FieldValue for String {
    fn read(v: &str) -> Option<Self> {
        Some(v.to_string())
    }
    fn write(&self) -> String {
        self.clone()
    }
}

/// `1` (or `true`) is set; written as `1`/`0`.
impl FieldValue for bool {
    fn read(v: &str) -> Option<Self> {
        Some(matches!(v, "1" | "true"))
    }
    fn write(&self) -> String {
        if *self { "1" } else { "0" }.to_string()
    }
}

macro_rules! numbers {
    ($($t:ty),*) => {$(
        impl FieldValue for $t {
            fn read(v: &str) -> Option<Self> {
                v.parse().ok()
            }
            fn write(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
numbers!(u32, u64);

/// A record whose every field is an optional value stored under the field's own name: the struct,
/// its reading from a hash and its set fields, from one list of fields.
macro_rules! record {
    (
        $(#[$meta:meta])*
        pub struct $name:ident { $($(#[$doc:meta])* pub $field:ident: Option<$t:ty>,)* }
    ) => {
        $(#[$meta])*
        pub struct $name { $($(#[$doc])* pub $field: Option<$t>,)* }

        impl $name {
            /// Reads the hash (HGETALL).
            pub fn from_fields(h: &HashMap<String, String>) -> Self {
                Self { $($field: h.get(stringify!($field)).and_then(|v| FieldValue::read(v)),)* }
            }

            /// Reads what HMGET answered for `fields` ([`record_fields!`], in that order); the
            /// fields not asked for read as `None`.
            pub fn from_values(fields: &[&str], values: Vec<Option<String>>) -> Self {
                let h = fields
                    .iter()
                    .zip(values)
                    .filter_map(|(f, v)| Some((f.to_string(), v?)))
                    .collect();
                Self::from_fields(&h)
            }

            /// Every field that is set, as the hash holds it, in declaration order.
            fn set_fields(&self) -> Vec<(&'static str, String)> {
                let mut out = Vec::new();
                $(
                    if let Some(v) = &self.$field {
                        out.push((stringify!($field), v.write()));
                    }
                )*
                out
            }
        }
    };
}

/// The names of some fields of a record, for HMGET (read the answer with `from_values`), checked
/// against the struct when it compiles: `record_fields!(NodeRecord: public_url)`.
#[macro_export]
macro_rules! record_fields {
    ($record:ty: $($field:ident),+ $(,)?) => {{
        let _each_is_a_field = |r: &$record| {
            $(let _ = &r.$field;)+
        };
        [$(stringify!($field)),+]
    }};
}

record! {
    /// `farm:node:<node>`: what a node says of itself in every heartbeat (`heartbeat.lua` adds
    /// `heartbeat_at`, Redis time of the heartbeat).
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct NodeRecord {
        /// Where viewers and peers reach it.
        pub public_url: Option<String>,
        /// The address it listens on.
        pub addr: Option<String>,
        pub incarnation: Option<String>,
        pub pid: Option<u32>,
        /// Wall time it started, ms.
        pub started_at: Option<u64>,
        pub version: Option<String>,
        /// Most channel weight it runs at once; 0 = unlimited.
        pub capacity: Option<u64>,
        /// Channels it runs.
        pub running: Option<u64>,
        /// Sum of its channels' weights (a copy 1, a transcode its profile's weight).
        pub load: Option<u64>,
        /// Free bytes on its HLS disk.
        pub disk_free: Option<u64>,
        /// It takes no new channels.
        pub draining: Option<bool>,
        /// Its drain finished: it runs nothing.
        pub drained: Option<bool>,
        /// Redis time (ms) of its last heartbeat, written by `heartbeat.lua`.
        pub heartbeat_at: Option<u64>,
    }
}

impl NodeRecord {
    /// The hash's field, value pairs the node writes (`heartbeat_at` is the script's).
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut out = self.set_fields();
        out.retain(|(f, _)| *f != "heartbeat_at");
        out
    }

    /// What counts against its capacity: its load when it reports one (capacity is in weight
    /// units), its channel count otherwise.
    pub fn used(&self) -> Option<u64> {
        self.load.or(self.running)
    }

    /// Where to reach it: its public URL, or its listen address without one.
    pub fn address(&self) -> Option<&str> {
        self.public_url
            .as_deref()
            .filter(|u| !u.is_empty())
            .or(self.addr.as_deref())
    }
}

record! {
    /// `farm:stream:<id>`: a running channel's state, written by its owner (`claim.lua`,
    /// `stream_set.lua`, `renew.lua`, `release.lua`) and read by farmctl and by the node's next
    /// incarnation.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct StreamRecord {
        /// The owner node.
        pub node: Option<String>,
        pub gen: Option<u64>,
        /// starting, running, restarting, failed, stopping.
        pub state: Option<String>,
        /// The FFmpeg's pid and kernel start time ("" while none runs: reads as `None`).
        pub pid: Option<u32>,
        pub pid_start: Option<u64>,
        /// Redis time (ms) of the claim.
        pub started_at: Option<u64>,
        pub restarts: Option<u64>,
        /// The URL in use (redacted).
        pub source: Option<String>,
        /// Why it last restarted or failed (redacted).
        pub last_error: Option<String>,
        /// Time (ms) of the last finished segment.
        pub last_segment_at: Option<u64>,
        /// The provider account it holds a connection of.
        pub provider: Option<String>,
        /// Redis time (ms) its lease runs to.
        pub lease_until: Option<u64>,
    }
}

impl StreamRecord {
    /// `state` as one of the five states (`None`: absent or unknown).
    pub fn stream_state(&self) -> Option<StreamState> {
        self.state.as_deref().and_then(StreamState::parse)
    }

    /// Every field that is set, as the hash holds it.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        self.set_fields()
    }
}

/// One write to `farm:stream:<id>` by its owner (through `stream_set.lua`, gen-checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamField {
    State(StreamState),
    Restarts(u64),
    /// Why it last restarted or failed: redacted by the writer.
    LastError(String),
    /// The URL in use: redacted by the writer.
    Source(String),
    /// The FFmpeg's pid and kernel start time; `None` clears both (no FFmpeg runs).
    Process(Option<(u32, u64)>),
    /// Time (ms) of the last finished segment; `None` is Redis time of the write (`$now`).
    LastSegmentAt(Option<u64>),
}

impl StreamField {
    /// The hash's field, value pairs for these writes, in order.
    pub fn to_fields(writes: &[StreamField]) -> Vec<(&'static str, String)> {
        let mut out = Vec::with_capacity(writes.len() + 1);
        for w in writes {
            match w {
                Self::State(s) => out.push(("state", s.as_str().to_string())),
                Self::Restarts(n) => out.push(("restarts", n.to_string())),
                Self::LastError(e) => out.push(("last_error", e.clone())),
                Self::Source(u) => out.push(("source", u.clone())),
                Self::Process(p) => {
                    let (pid, start) = p.map_or((String::new(), String::new()), |(p, s)| {
                        (p.to_string(), s.to_string())
                    });
                    out.push(("pid", pid));
                    out.push(("pid_start", start));
                }
                Self::LastSegmentAt(t) => out.push((
                    "last_segment_at",
                    t.map_or_else(|| "$now".to_string(), |t| t.to_string()),
                )),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(fields: Vec<(&'static str, String)>) -> HashMap<String, String> {
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    #[test]
    fn a_few_fields_read_from_hmget() {
        let fields = record_fields!(NodeRecord: public_url, running);
        assert_eq!(fields, ["public_url", "running"]);
        let r = NodeRecord::from_values(&fields, vec![Some("http://n1:8080".into()), None]);
        assert_eq!(
            r,
            NodeRecord {
                public_url: Some("http://n1:8080".into()),
                ..NodeRecord::default()
            }
        );
    }

    #[test]
    fn node_records_round_trip() {
        let r = NodeRecord {
            public_url: Some("http://n1:8080".into()),
            addr: Some("0.0.0.0:8080".into()),
            incarnation: Some("i".into()),
            pid: Some(7),
            started_at: Some(1),
            version: Some("0.1.0".into()),
            capacity: Some(8),
            running: Some(3),
            load: Some(4),
            disk_free: Some(1 << 30),
            draining: Some(false),
            drained: Some(false),
            heartbeat_at: None,
        };
        let fields = r.to_fields();
        assert!(fields.contains(&("draining", "0".into())));
        assert_eq!(NodeRecord::from_fields(&map(fields)), r);
        assert_eq!(r.used(), Some(4));
        assert_eq!(r.address(), Some("http://n1:8080"));
    }

    #[test]
    fn missing_and_bad_fields_read_as_none() {
        let h = map(vec![("running", "3".into()), ("capacity", "x".into())]);
        let r = NodeRecord::from_fields(&h);
        assert_eq!((r.capacity, r.used(), r.draining), (None, Some(3), None));
        let s = StreamRecord::from_fields(&map(vec![("pid", String::new())]));
        assert_eq!(s.pid, None);
    }

    #[test]
    fn stream_writes_read_back() {
        let writes = [
            StreamField::State(StreamState::Running),
            StreamField::Process(Some((9, 11))),
            StreamField::Restarts(2),
            StreamField::LastSegmentAt(Some(5)),
        ];
        let r = StreamRecord::from_fields(&map(StreamField::to_fields(&writes)));
        assert_eq!(
            (r.stream_state(), r.pid, r.pid_start, r.restarts),
            (Some(StreamState::Running), Some(9), Some(11), Some(2))
        );
        let cleared = map(StreamField::to_fields(&[
            StreamField::Process(None),
            StreamField::LastSegmentAt(None),
        ]));
        assert_eq!(cleared.get("pid").map(String::as_str), Some(""));
        assert_eq!(
            cleared.get("last_segment_at").map(String::as_str),
            Some("$now")
        );
    }

    #[test]
    fn stream_records_round_trip() {
        let r = StreamRecord {
            node: Some("n1".into()),
            gen: Some(3),
            state: Some("running".into()),
            pid: Some(9),
            pid_start: Some(11),
            started_at: Some(1),
            restarts: Some(0),
            source: Some("http://up/x".into()),
            last_error: Some(String::new()),
            last_segment_at: Some(5),
            provider: Some("acme".into()),
            lease_until: Some(6),
        };
        assert_eq!(StreamRecord::from_fields(&map(r.to_fields())), r);
        assert_eq!(r.stream_state(), Some(StreamState::Running));
    }
}
