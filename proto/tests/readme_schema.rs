//! `proto/README.md` is the Redis schema operators follow: it must name every key the farm builds,
//! every script, every command op and field, and every event kind. A key, script, op or event added
//! without its row fails here.

use farm_proto::types::{event, Command, Op};
use farm_proto::Keys;
use std::collections::HashMap;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("proto/README.md is readable")
}

/// The README's key column: every `farm:...` name in backticks at the start of a table row.
fn documented_keys(readme: &str) -> Vec<String> {
    readme
        .lines()
        .filter(|l| l.starts_with("| `farm:"))
        .flat_map(|l| {
            let first_cell = l.split('|').nth(1).unwrap_or("");
            first_cell
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every key constructor, with placeholder arguments named as the README names them.
fn every_key(k: &Keys) -> Vec<String> {
    vec![
        k.channel("<id>"),
        k.channels(),
        k.catalog_version(),
        k.catalog_gen(),
        k.catalog_staging(0).replace(":0", ":<gen>"),
        k.catalog_importing(),
        k.pinned(),
        k.provider("<name>"),
        k.provider_conns("<name>"),
        k.owner("<id>"),
        k.gen("<id>"),
        k.stream("<id>"),
        k.timeline("<id>"),
        k.access(),
        k.node("<node>"),
        k.node_alive("<node>"),
        k.nodes(),
        k.node_streams("<node>"),
        k.node_load("<node>"),
        k.cmd("<node>"),
        k.recovering(),
        k.since(),
        k.events(),
        k.leader(),
        k.leader_epoch(),
    ]
}

#[test]
fn every_key_has_a_row() {
    let text = readme();
    let documented = documented_keys(&text);
    let missing: Vec<String> = every_key(&Keys::default())
        .into_iter()
        .filter(|k| !documented.contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "keys without a row in proto/README.md: {missing:?}"
    );
}

#[test]
fn every_script_has_a_row() {
    let text = readme();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/lua");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("proto/lua is readable")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".lua"))
        .collect();
    names.sort();
    assert_eq!(
        names.len(),
        farm_proto::scripts::ALL_SOURCES.len(),
        "every file in proto/lua is one of the scripts the farm loads"
    );
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !text.contains(&format!("| `{n}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "scripts without a row in proto/README.md: {missing:?}"
    );
}

/// Every op; the match has no wildcard, so a new op does not compile until it is listed here.
fn every_op() -> Vec<Op> {
    let all = [Op::Stop, Op::Start, Op::Restart, Op::Drain, Op::Undrain];
    for op in all {
        match op {
            Op::Stop | Op::Start | Op::Restart | Op::Drain | Op::Undrain => {}
        }
    }
    all.to_vec()
}

fn row<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(&format!("| `{key}`")))
        .unwrap_or_else(|| panic!("no row for {key}"))
}

#[test]
fn every_command_op_and_field_is_documented() {
    let text = readme();
    let cmd_row = row(&text, "farm:cmd:<node>");
    for op in every_op() {
        assert!(
            cmd_row.contains(op.as_str()),
            "op {:?} is not in the farm:cmd row",
            op.as_str()
        );
    }
    // A command with every optional field set writes every field there is.
    let full = Command {
        op: Op::Start,
        channel: "demo".into(),
        gen: Some(3),
        reason: "r".into(),
        by: "b".into(),
        from: "node-a".into(),
        seq: Some(9),
    };
    let fields = full.to_fields();
    let map: HashMap<String, String> = fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    assert_eq!(
        Command::from_fields(&map).as_ref(),
        Ok(&full),
        "to_fields writes every field"
    );
    for (field, _) in fields {
        assert!(
            cmd_row.contains(&format!("`{field}`")),
            "command field {field:?} is not in the farm:cmd row"
        );
    }
}

#[test]
fn every_event_kind_is_documented() {
    let text = readme();
    let events_row = row(&text, "farm:events");
    for kind in event::ALL {
        assert!(
            events_row.contains(kind),
            "event {kind:?} is not in the farm:events row"
        );
    }
}

/// Every field of the typed records is in its key's row.
#[test]
fn every_record_field_is_documented() {
    use farm_proto::records::{NodeRecord, StreamRecord};
    let text = readme();
    let full_node = NodeRecord {
        public_url: Some(String::new()),
        addr: Some(String::new()),
        incarnation: Some(String::new()),
        pid: Some(1),
        started_at: Some(1),
        version: Some(String::new()),
        capacity: Some(1),
        running: Some(1),
        load: Some(1),
        disk_free: Some(1),
        draining: Some(true),
        drained: Some(true),
        heartbeat_at: Some(1),
    };
    let node_row = row(&text, "farm:node:<node>");
    let mut node_fields: Vec<&str> = full_node.to_fields().iter().map(|(f, _)| *f).collect();
    node_fields.push("heartbeat_at");
    for field in node_fields {
        assert!(
            node_row.contains(&format!("`{field}`")),
            "node field {field:?} is not in the farm:node row"
        );
    }
    let full_stream = StreamRecord {
        node: Some(String::new()),
        gen: Some(1),
        state: Some(String::new()),
        pid: Some(1),
        pid_start: Some(1),
        started_at: Some(1),
        restarts: Some(1),
        source: Some(String::new()),
        last_error: Some(String::new()),
        last_segment_at: Some(1),
        provider: Some(String::new()),
        lease_until: Some(1),
    };
    let stream_row = row(&text, "farm:stream:<id>");
    for (field, _) in full_stream.to_fields() {
        assert!(
            stream_row.contains(&format!("`{field}`")),
            "stream field {field:?} is not in the farm:stream row"
        );
    }
}
