use super::*;
use crate::types::{Command, Op};
use std::time::Duration;

fn s(a: &str, b: &str) -> Vec<String> {
    vec![a.to_string(), b.to_string()]
}

fn bulk(items: &[&str]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|i| Value::BulkString(i.as_bytes().to_vec()))
            .collect(),
    )
}

fn text(v: &str) -> Value {
    Value::BulkString(v.as_bytes().to_vec())
}

/// Each `{tag, value}` answer parses as the reply given.
#[track_caller]
fn tagged_parse<T: Tagged + PartialEq + std::fmt::Debug>(cases: Vec<(&str, &str, T)>) {
    for (tag, value, want) in cases {
        assert_eq!(T::parse(&s(tag, value)), Ok(want), "{{{tag:?}, {value:?}}}");
    }
}

#[test]
fn claim_replies_parse() {
    tagged_parse(vec![
        ("ok", "7", ClaimResult::Claimed { gen: 7 }),
        (
            "owned",
            "node-a:3",
            ClaimResult::Owned {
                node: "node-a".into(),
                gen: 3,
            },
        ),
        ("full", "4", ClaimResult::Full { running: 4 }),
    ]);
    assert!(ClaimResult::parse(&s("what", "4")).is_err());
    assert_eq!(
        Claim::parse(bulk(&["recovering", "not_alive"])),
        Ok(ClaimResult::Recovering { not_alive: true })
    );
    assert!(Claim::parse(Value::Int(1)).is_err());
}

#[test]
fn handover_replies_parse() {
    tagged_parse(vec![
        ("ok", "9", HandoverResult::Moved { gen: 9 }),
        (
            "stale",
            "node-c:4",
            HandoverResult::Stale {
                owner: Some(("node-c".into(), 4)),
            },
        ),
        ("full", "2", HandoverResult::Full { running: 2 }),
    ]);
    assert_eq!(
        Handover::parse(bulk(&["stale", ""])),
        Ok(HandoverResult::Stale { owner: None })
    );
    assert!(HandoverResult::parse(&s("stale", "garbage")).is_err());
    assert!(HandoverResult::parse(&s("ok", "x")).is_err());
}

#[test]
fn flag_replies_parse() {
    assert_eq!(Renew::parse(Value::Int(1)), Ok(true));
    assert_eq!(Release::parse(Value::Int(0)), Ok(false));
    assert!(StreamSet::parse(Value::Int(2)).is_err());
    assert_eq!(Touch::parse(Value::Int(1_700)), Ok(Some(1_700)));
    assert_eq!(Touch::parse(Value::Int(-1)), Ok(None));
}

#[test]
fn heartbeat_reply_parses() {
    let r = Heartbeat::parse(Value::Array(vec![
        Value::Int(5),
        Value::Int(1),
        Value::Int(0),
        Value::Int(0),
    ]));
    assert_eq!(
        r,
        Ok(HeartbeatReply {
            now_ms: 5,
            lost: true,
            repaired: 0,
            stale: false
        })
    );
}

#[test]
fn leader_replies_parse() {
    assert_eq!(
        Leader::parse(bulk(&["acquired", "c1:7"])),
        Ok(LeaderReply::Acquired {
            value: "c1:7".into(),
            epoch: 7
        })
    );
    assert_eq!(
        Leader::parse(bulk(&["follower", "c2:3", "-2"])),
        Ok(LeaderReply::Follower {
            value: "c2:3".into(),
            pttl_ms: None
        })
    );
    assert!(Leader::parse(bulk(&["renewed"])).is_err());
}

#[test]
fn fenced_replies_parse() {
    assert_eq!(
        IdleStop::parse(text("stop")),
        Ok(Fenced::Done(IdleStopReply::Stop))
    );
    assert_eq!(IdleStop::parse(text("notleader")), Ok(Fenced::NotLeader));
    assert!(IdleStop::parse(text("")).is_err());
    assert!(ReapNode::parse(text("gone")).is_err());
    assert_eq!(
        Reconcile::parse(text("us")),
        Ok(Fenced::Done(Removed {
            set: true,
            stream: true
        }))
    );
    assert!(Reconcile::parse(text("x")).is_err());
    assert_eq!(RepairKey::parse(text("ok")), Ok(Fenced::Done(Repair::Fine)));
    assert_eq!(
        RepairKey::parse(text("string")),
        Ok(Fenced::Done(Repair::Deleted("string".into())))
    );
    assert_eq!(SendCommand::parse(Value::Nil), Ok(Fenced::NotLeader));
    assert_eq!(
        SendCommand::parse(text("1-0")),
        Ok(Fenced::Done("1-0".into()))
    );
}

#[test]
fn pipelined_replies_stop_at_the_first_notleader() {
    let raw = |v: &[&str]| v.iter().map(|s| text(s)).collect::<Vec<_>>();
    let r = FencedReplies::parse::<IdleStop>(raw(&["stop", "dropped", "notleader", "stop"]))
        .expect("parses");
    assert_eq!(r.done, [IdleStopReply::Stop, IdleStopReply::Dropped]);
    assert!(r.lost);
    let r = FencedReplies::parse::<ReapChannel>(raw(&["released", "cleared", "alive"]))
        .expect("parses");
    assert_eq!((r.done.len(), r.lost), (3, false));
    assert!(FencedReplies::parse::<ReapNode>(raw(&["reaped", "gone"])).is_err());
    let r = FencedReplies::parse::<RepairKey>(raw(&["notleader"])).expect("parses");
    assert!(r.done.is_empty() && r.lost);
}

#[test]
fn reconcile_labels_name_what_went() {
    let labels: Vec<_> = ["", "u", "s", "us"]
        .iter()
        .map(|r| match Reconcile::parse(text(r)) {
            Ok(Fenced::Done(removed)) => removed.label(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        labels,
        [None, Some("set"), Some("stream"), Some("set,stream")]
    );
}

/// The `-- KEYS[n] name  key` lines of a script's header.
fn header_keys(file: &str) -> Vec<String> {
    let path = format!("{}/lua/{file}", env!("CARGO_MANIFEST_DIR"));
    let src = std::fs::read_to_string(path).expect("script is readable");
    src.lines()
        .filter_map(|l| l.strip_prefix("-- KEYS["))
        .filter(|l| {
            l.split(']')
                .next()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .map(|l| l.split_whitespace().nth(2).unwrap_or("").to_string())
        .collect()
}

/// Turns a built key back into the header's notation (`farm:owner:<id>`).
fn shape(key: &str) -> String {
    key.replace("demo", "<id>")
        .replace("node-a", "<node>")
        .replace("node-b", "<node>")
        .replace("acme", "<name>")
}

/// Every call builds KEYS in the header's order: each key has the shape the header names.
fn check<C: Call>(call: &C) {
    let inv = call.invocation(&Keys::default());
    let header = header_keys(C::FILE);
    for (i, key) in inv.keys().iter().enumerate() {
        let want = header.get(i).map_or("<missing>".to_string(), |h| {
            h.replace("<from>", "<node>").replace("<to>", "<node>")
        });
        let got = shape(key);
        assert!(
            want == got,
            "{}: KEYS[{}] is {got}, the header says {want}",
            C::FILE,
            i + 1
        );
    }
}

#[test]
fn every_call_builds_keys_in_the_header_order() {
    let lease = Duration::from_secs(10);
    let fields = [crate::records::StreamField::Restarts(1)];
    let ids = ["demo".to_string()];
    let cmd = Command::new(Op::Stop, "demo");
    let p = Some("acme");
    check(&Claim {
        id: "demo",
        node: "node-a",
        lease,
        capacity: 1,
        provider: p,
        weight: 1,
    });
    let renew = Renew {
        id: "demo",
        owner: "node-a:1",
        provider: p,
        lease,
        expected_now_ms: None,
        max_lag: lease,
    };
    check(&renew);
    check(&Release {
        id: "demo",
        node: "node-a",
        owner: "node-a:1",
        provider: p,
        final_state: None,
        keep: lease,
    });
    check(&StreamSet {
        id: "demo",
        owner: "node-a:1",
        fields: &fields,
    });
    check(&Heartbeat {
        node: "node-a",
        ttl: lease,
        incarnation: "i",
        before: true,
        runs_channels: false,
        lease,
        expected_now_ms: Some(1),
        max_lag: lease,
        record: &crate::records::NodeRecord::default(),
    });
    check(&ReleaseNode {
        node: "node-a",
        id: "demo",
    });
    check(&Handover {
        id: "demo",
        from: "node-a",
        gen: 1,
        to: "node-b",
        lease,
        capacity: 0,
        weight: 1,
    });
    check(&Timeline {
        id: "demo",
        owner: "node-a:1",
        gen: 1,
        target: 2,
        last: None,
        disc: 0,
        playlist: b"#EXTM3U",
        keep: lease,
    });
    check(&Leader {
        id: "c",
        ttl: lease,
        held: "",
    });
    check(&LeaderRelease { held: "c:1" });
    check(&IdleStop {
        held: "c:1",
        id: "demo",
        cutoff_ms: 1,
        owner: Some("node-a:1"),
        by: "c",
    });
    check(&ReapChannel {
        held: "c:1",
        node: "node-a",
        id: "demo",
        provider: p,
    });
    check(&ReapNode {
        held: "c:1",
        node: "node-a",
        hb_cutoff_ms: 1,
    });
    check(&Reconcile {
        held: "c:1",
        node: "node-a",
        id: "demo",
    });
    check(&SendCommand {
        held: "c:1",
        node: "node-a",
        cmd: &cmd,
    });
    check(&Pin {
        id: "demo",
        pinned: true,
    });
    // touch.lua's header names its keys as a range.
    let touch = Touch { ids: &ids }.invocation(&Keys::default());
    assert_eq!(touch.keys(), ["farm:access", "farm:owner:demo"]);
    let repair = RepairKey {
        held: "c:1",
        key: "farm:nodes",
        wanted: "zset",
    }
    .invocation(&Keys::default());
    assert_eq!(repair.keys(), ["farm:leader", "farm:nodes"]);
    // Without a provider the optional key is left out.
    let plain = Renew {
        provider: None,
        ..renew
    }
    .invocation(&Keys::default());
    assert_eq!(plain.keys(), ["farm:owner:demo", "farm:stream:demo"]);
}
