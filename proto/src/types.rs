//! The records the farm keeps in Redis and the commands it sends, with their hash/stream field names.

use crate::validate::InvalidInput;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// A catalog entry: `farm:channel:<id>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelSpec {
    pub id: String,
    pub name: String,
    pub url: String,
    /// Tried in order after the primary URL fails.
    pub backup_urls: Vec<String>,
    /// FFmpeg profile: `copy` unless set.
    pub profile: String,
    /// IPTV account whose connection limit applies; empty for none.
    pub provider: String,
    /// Pinned channels are kept running and never idle-stopped.
    pub pinned: bool,
    /// `group-title` from an M3U import.
    pub group: String,
}

impl ChannelSpec {
    /// The fields written to `farm:channel:<id>`. `backup_urls` is a space-separated list
    /// (URLs never contain whitespace: the validator refuses it).
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("name", self.name.clone()),
            ("url", self.url.clone()),
            ("backup_urls", self.backup_urls.join(" ")),
            ("profile", self.profile.clone()),
            ("provider", self.provider.clone()),
            ("pinned", if self.pinned { "1" } else { "0" }.to_string()),
            ("group", self.group.clone()),
        ]
    }

    /// Reads a catalog hash; `None` when the hash is empty (no such channel).
    pub fn from_fields(id: &str, h: &HashMap<String, String>) -> Option<Self> {
        let url = h.get("url")?.clone();
        let get = |k: &str| h.get(k).cloned().unwrap_or_default();
        let profile = get("profile");
        Some(Self {
            id: id.to_string(),
            name: get("name"),
            url,
            backup_urls: get("backup_urls")
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            profile: if profile.is_empty() {
                "copy".into()
            } else {
                profile
            },
            provider: get("provider"),
            pinned: matches!(get("pinned").as_str(), "1" | "true"),
            group: get("group"),
        })
    }

    /// Checks every field against the catalog's bounds: a valid id, URLs that pass
    /// [`crate::validate::upstream_url`] (at most [`crate::validate::MAX_BACKUPS`] backups),
    /// `profile` and `provider` (if set) from the id alphabet, `name` and `group` at most
    /// [`crate::validate::MAX_TEXT_LEN`] bytes without control characters. Readers never need
    /// this (they take what Redis holds and show it safely); writers call it before writing.
    pub fn validate(&self, allowed_schemes: &[impl AsRef<str>]) -> Result<(), InvalidInput> {
        use crate::validate;
        validate::channel_id(&self.id)?;
        for url in std::iter::once(&self.url).chain(&self.backup_urls) {
            validate::upstream_url(url, allowed_schemes)?;
        }
        if self.backup_urls.len() > validate::MAX_BACKUPS {
            return Err(InvalidInput::Field {
                field: "backup URLs",
                why: format!(
                    "{} given, at most {} are allowed",
                    self.backup_urls.len(),
                    validate::MAX_BACKUPS
                ),
            });
        }
        validate::label("profile", &self.profile)?;
        if !self.provider.is_empty() {
            validate::label("provider", &self.provider)?;
        }
        validate::text_field("name", &self.name)?;
        validate::text_field("group", &self.group)?;
        Ok(())
    }

    /// The primary URL followed by the backups.
    pub fn sources(&self) -> Vec<String> {
        std::iter::once(self.url.clone())
            .chain(self.backup_urls.iter().cloned())
            .collect()
    }
}

/// `state` in `farm:stream:<id>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamState {
    Starting,
    Running,
    Restarting,
    Failed,
    Stopping,
}

impl StreamState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Restarting => "restarting",
            Self::Failed => "failed",
            Self::Stopping => "stopping",
        }
    }

    /// The state a stream hash names, if it is one of the five.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Starting,
            Self::Running,
            Self::Restarting,
            Self::Failed,
            Self::Stopping,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

impl fmt::Display for StreamState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a command asks a node to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Stop,
    Start,
    Restart,
    Drain,
    Undrain,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Stop => "stop",
            Op::Start => "start",
            Op::Restart => "restart",
            Op::Drain => "drain",
            Op::Undrain => "undrain",
        }
    }
}

impl FromStr for Op {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stop" => Ok(Op::Stop),
            "start" => Ok(Op::Start),
            "restart" => Ok(Op::Restart),
            "drain" => Ok(Op::Drain),
            "undrain" => Ok(Op::Undrain),
            other => Err(format!(
                "unknown op {other:?} (stop, start, restart, drain, undrain)"
            )),
        }
    }
}

/// One entry of `farm:cmd:<node>`: fields `op`, `channel`, `gen`, `reason`, `by`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub op: Op,
    /// Empty only for node-wide ops (`drain`).
    pub channel: String,
    /// The gen the sender saw; a command for another gen is stale and ignored. `None` = whatever runs.
    pub gen: Option<u64>,
    pub reason: String,
    pub by: String,
    /// For a `start` that takes a channel over from a draining node: that node (with `gen` its gen).
    pub from: String,
    /// For a handover: the media sequence number the new owner continues at.
    pub seq: Option<u64>,
}

/// The text fields of one stream entry (`farm:cmd:<node>`, `farm:events`) as redis-rs reads it; a
/// field whose value is not text is left out.
pub fn entry_text_fields(
    map: &HashMap<String, redis::Value>,
) -> impl Iterator<Item = (String, String)> + '_ {
    map.iter().filter_map(|(k, v)| {
        redis::from_redis_value::<String>(v.clone())
            .ok()
            .map(|v| (k.clone(), v))
    })
}

impl Command {
    /// Parses a stream entry's fields; the error says what is wrong, for the log and the event.
    pub fn from_fields(f: &HashMap<String, String>) -> Result<Self, String> {
        let op: Op = f.get("op").ok_or("command has no 'op' field")?.parse()?;
        let channel = f.get("channel").cloned().unwrap_or_default();
        if !matches!(op, Op::Drain | Op::Undrain) {
            crate::validate::channel_id(&channel).map_err(|e| e.to_string())?;
        }
        let gen = match f.get("gen").map(String::as_str) {
            None | Some("") => None,
            Some(g) => Some(
                g.parse()
                    .map_err(|_| format!("invalid gen {g:?}: expected a whole number"))?,
            ),
        };
        Ok(Self {
            op,
            channel,
            gen,
            reason: f.get("reason").cloned().unwrap_or_default(),
            by: f.get("by").cloned().unwrap_or_default(),
            from: f.get("from").cloned().unwrap_or_default(),
            seq: match f.get("seq").map(String::as_str) {
                None | Some("") => None,
                Some(s) => Some(
                    s.parse()
                        .map_err(|_| format!("invalid seq {s:?}: expected a whole number"))?,
                ),
            },
        })
    }

    /// A command with no gen, reason, sender or handover fields.
    pub fn new(op: Op, channel: impl Into<String>) -> Self {
        Self {
            op,
            channel: channel.into(),
            gen: None,
            reason: String::new(),
            by: String::new(),
            from: String::new(),
            seq: None,
        }
    }

    /// The `XADD` that appends this command to `farm:cmd:<node>`, capped at
    /// [`CMD_MAXLEN`](crate::keys::CMD_MAXLEN) like every writer's.
    pub fn xadd(&self, keys: &crate::keys::Keys, node: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(keys.cmd(node))
            .arg("MAXLEN")
            .arg("~")
            .arg(crate::keys::CMD_MAXLEN)
            .arg("*");
        for (k, v) in self.to_fields() {
            cmd.arg(k).arg(v);
        }
        cmd
    }

    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("op", self.op.as_str().to_string()),
            ("channel", self.channel.clone()),
        ];
        if let Some(g) = self.gen {
            v.push(("gen", g.to_string()));
        }
        v.push(("reason", self.reason.clone()));
        v.push(("by", self.by.clone()));
        if !self.from.is_empty() {
            v.push(("from", self.from.clone()));
        }
        if let Some(s) = self.seq {
            v.push(("seq", s.to_string()));
        }
        v
    }
}

/// Kinds of audit events in `farm:events` (field `event`).
pub mod event {
    pub const STARTED: &str = "started";
    pub const STOPPED: &str = "stopped";
    pub const RESTARTED: &str = "restarted";
    pub const FAILED: &str = "failed";
    pub const REAPED: &str = "reaped";
    pub const FAILOVER: &str = "failover";
    pub const NODE_DEAD: &str = "node_dead";
    pub const LEADER_CHANGED: &str = "leader_changed";
    /// A farm-wide key had the wrong type (`key`, `found`, `wanted`, `action`: replaced or left).
    pub const KEY_REPAIRED: &str = "key_repaired";

    /// Every kind, for the schema's documentation check (`proto/tests/readme_schema.rs`).
    pub const ALL: &[&str] = &[
        STARTED,
        STOPPED,
        RESTARTED,
        FAILED,
        REAPED,
        FAILOVER,
        NODE_DEAD,
        LEADER_CHANGED,
        KEY_REPAIRED,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn channel_round_trips_through_hash_fields() {
        let c = ChannelSpec {
            id: "a".into(),
            name: "A".into(),
            url: "http://x/1".into(),
            backup_urls: vec!["http://y/1".into(), "http://z/1".into()],
            profile: "copy".into(),
            provider: "acme".into(),
            pinned: true,
            group: "News".into(),
        };
        let h: HashMap<String, String> = c
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert!(c.validate(crate::validate::DEFAULT_ALLOWED_SCHEMES).is_ok());
        assert_eq!(ChannelSpec::from_fields("a", &h), Some(c));
        assert_eq!(ChannelSpec::from_fields("a", &HashMap::new()), None);
    }

    #[test]
    fn catalog_fields_are_bounded() {
        let ok = ChannelSpec {
            id: "a".into(),
            name: "A".into(),
            url: "http://x/1".into(),
            profile: "copy".into(),
            ..ChannelSpec::default()
        };
        let allowed = crate::validate::DEFAULT_ALLOWED_SCHEMES;
        assert!(ok.validate(allowed).is_ok());
        let bad = [
            ChannelSpec {
                name: "n".repeat(1 << 20),
                ..ok.clone()
            },
            ChannelSpec {
                group: "g\n".into(),
                ..ok.clone()
            },
            ChannelSpec {
                provider: "a b".into(),
                ..ok.clone()
            },
            ChannelSpec {
                profile: String::new(),
                ..ok.clone()
            },
            ChannelSpec {
                backup_urls: vec!["http://b/1".into(); 9],
                ..ok.clone()
            },
            ChannelSpec {
                url: format!("http://x/{}", "u".repeat(3000)),
                ..ok.clone()
            },
            ChannelSpec {
                id: "../x".into(),
                ..ok.clone()
            },
        ];
        for b in bad {
            let e = b.validate(allowed).expect_err("refused");
            assert!(e.to_string().len() < 300, "{e}");
        }
    }

    #[test]
    fn commands_parse_or_say_why() {
        let c = Command::from_fields(&map(&[("op", "stop"), ("channel", "bbc"), ("gen", "4")]))
            .expect("valid");
        assert_eq!(c.op, Op::Stop);
        assert_eq!(c.gen, Some(4));
        assert!(Command::from_fields(&map(&[("op", "explode"), ("channel", "a")])).is_err());
        assert!(Command::from_fields(&map(&[("op", "stop"), ("channel", "../a")])).is_err());
        assert!(
            Command::from_fields(&map(&[("op", "stop"), ("channel", "a"), ("gen", "x")])).is_err()
        );
        assert!(Command::from_fields(&map(&[("channel", "a")])).is_err());
    }
}
