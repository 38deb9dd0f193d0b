//! The farm's Lua scripts, loaded from `proto/lua/*.lua` at compile time.
//!
//! `redis::Script` sends EVALSHA and reloads the script on NOSCRIPT, so a Redis restart or failover
//! costs one extra round trip, never an error. Each script documents its KEYS and ARGV in its header.

use redis::Script;
use std::sync::LazyLock;

macro_rules! scripts {
    ($($name:ident => $file:literal),* $(,)?) => {
        $(
            pub static $name: LazyLock<Script> =
                LazyLock::new(|| Script::new(include_str!(concat!("../lua/", $file))));
        )*
        /// The source of every script, for `SCRIPT LOAD` before a pipeline of EVALSHA calls.
        pub const ALL_SOURCES: &[&str] = &[$(include_str!(concat!("../lua/", $file))),*];
    };
}

scripts! {
    CLAIM => "claim.lua",
    RENEW => "renew.lua",
    RELEASE => "release.lua",
    STREAM_SET => "stream_set.lua",
    TOUCH => "touch.lua",
    HEARTBEAT => "heartbeat.lua",
    RELEASE_NODE => "release_node.lua",
    HANDOVER => "handover.lua",
    LEADER => "leader.lua",
    LEADER_RELEASE => "leader_release.lua",
    IDLE_STOP => "idle_stop.lua",
    REAP_CHANNEL => "reap_channel.lua",
    REAP_NODE => "reap_node.lua",
    RECONCILE => "reconcile.lua",
    COMMAND => "command.lua",
    PIN => "pin.lua",
    TIMELINE => "timeline.lua",
    REPAIR_KEY => "repair_key.lua",
}

/// What the claim script answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimResult {
    /// The lease is ours, with this fencing token.
    Claimed { gen: u64 },
    /// Someone holds the lease: `<node>:<gen>`.
    Owned { node: String, gen: u64 },
    /// The node is at capacity.
    Full { running: u64 },
    /// The channel's provider account is at its connection limit.
    ProviderFull { max: u64 },
    /// Redis lost keys moments ago (or this node has not heartbeated yet): retry shortly.
    /// `not_alive`: Redis does not know this node as alive (no heartbeat landed yet, or it was
    /// reaped); otherwise the recovery window after Redis lost keys is open.
    Recovering { not_alive: bool },
    /// The lease is free but this node's lease would still run (its owner key was deleted by
    /// hand): it may still run FFmpeg until it notices and fences; retry shortly.
    Busy { node: String },
}

impl ClaimResult {
    /// Parses the script's `{tag, value}` reply.
    pub fn parse(reply: &[String]) -> Result<Self, String> {
        match reply {
            [tag, v] if tag == "ok" => v
                .parse()
                .map(|gen| Self::Claimed { gen })
                .map_err(|_| format!("claim: bad gen {v:?}")),
            [tag, v] if tag == "owned" => {
                let (node, gen) =
                    split_owner(v).ok_or_else(|| format!("claim: bad owner {v:?}"))?;
                Ok(Self::Owned {
                    node: node.to_string(),
                    gen,
                })
            }
            [tag, v] if tag == "full" => Ok(Self::Full {
                running: v.parse().unwrap_or(0),
            }),
            [tag, v] if tag == "provider_full" => Ok(Self::ProviderFull {
                max: v.parse().unwrap_or(0),
            }),
            [tag, why] if tag == "recovering" => Ok(Self::Recovering {
                not_alive: why == "not_alive",
            }),
            [tag, v] if tag == "busy" => Ok(Self::Busy { node: v.clone() }),
            other => Err(format!("claim: unexpected reply {other:?}")),
        }
    }
}

/// What the handover script answered (`proto/lua/handover.lua`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoverResult {
    /// The lease moved to the new owner, with this fencing token.
    Moved { gen: u64 },
    /// The lease is no longer `<from>:<gen>`: someone else holds it (`owner`), or nobody.
    /// A normal race (the old owner stopped, or another node took over first), not an error.
    Stale { owner: Option<(String, u64)> },
    /// The new owner is at capacity.
    Full { running: u64 },
}

impl HandoverResult {
    /// Parses the script's `{tag, value}` reply.
    pub fn parse(reply: &[String]) -> Result<Self, String> {
        match reply {
            [tag, v] if tag == "ok" => v
                .parse()
                .map(|gen| Self::Moved { gen })
                .map_err(|_| format!("handover: bad gen {v:?}")),
            [tag, v] if tag == "stale" && v.is_empty() => Ok(Self::Stale { owner: None }),
            [tag, v] if tag == "stale" => {
                let (node, gen) =
                    split_owner(v).ok_or_else(|| format!("handover: bad owner {v:?}"))?;
                Ok(Self::Stale {
                    owner: Some((node.to_string(), gen)),
                })
            }
            [tag, v] if tag == "full" => Ok(Self::Full {
                running: v.parse().unwrap_or(0),
            }),
            other => Err(format!("handover: unexpected reply {other:?}")),
        }
    }
}

/// The value stored in `farm:owner:<id>`.
pub fn owner_value(node: &str, gen: u64) -> String {
    format!("{node}:{gen}")
}

/// Splits `<node>:<gen>` (node ids never contain `:`).
pub fn split_owner(v: &str) -> Option<(&str, u64)> {
    let (node, gen) = v.rsplit_once(':')?;
    Some((node, gen.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_replies_parse() {
        let s = |a: &str, b: &str| vec![a.to_string(), b.to_string()];
        assert_eq!(
            ClaimResult::parse(&s("ok", "7")),
            Ok(ClaimResult::Claimed { gen: 7 })
        );
        assert_eq!(
            ClaimResult::parse(&s("owned", "node-a:3")),
            Ok(ClaimResult::Owned {
                node: "node-a".into(),
                gen: 3
            })
        );
        assert_eq!(
            ClaimResult::parse(&s("full", "4")),
            Ok(ClaimResult::Full { running: 4 })
        );
        assert!(ClaimResult::parse(&s("what", "4")).is_err());
    }

    #[test]
    fn handover_replies_parse() {
        let s = |a: &str, b: &str| vec![a.to_string(), b.to_string()];
        assert_eq!(
            HandoverResult::parse(&s("ok", "9")),
            Ok(HandoverResult::Moved { gen: 9 })
        );
        assert_eq!(
            HandoverResult::parse(&s("stale", "")),
            Ok(HandoverResult::Stale { owner: None })
        );
        assert_eq!(
            HandoverResult::parse(&s("stale", "node-c:4")),
            Ok(HandoverResult::Stale {
                owner: Some(("node-c".into(), 4))
            })
        );
        assert_eq!(
            HandoverResult::parse(&s("full", "2")),
            Ok(HandoverResult::Full { running: 2 })
        );
        assert!(HandoverResult::parse(&s("stale", "garbage")).is_err());
        assert!(HandoverResult::parse(&s("ok", "x")).is_err());
    }
}
