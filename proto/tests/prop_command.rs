//! Property tests for the command-stream parser (`farm_proto::Command::from_fields`), which reads
//! entries anyone with write access to `farm:cmd:<node>` (an operator's `redis-cli XADD`) can
//! write: it never panics; a channel op never carries an invalid channel id; a command survives
//! `to_fields` → `from_fields` unchanged, and so does anything the parser accepted.

use farm_proto::{Command, Op};
use proptest::prelude::*;
use std::collections::HashMap;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig::with_cases(farm_proto::proptest_cases(cases))
}

const OPS: [Op; 5] = [Op::Stop, Op::Start, Op::Restart, Op::Drain, Op::Undrain];

fn free_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[ -~]{0,20}",
        1 => any::<String>(),
        1 => Just(String::new()),
    ]
}

fn command() -> impl Strategy<Value = Command> {
    (
        prop::sample::select(OPS.to_vec()),
        "[A-Za-z0-9_-]{1,64}",
        free_text(),
        prop::option::of(any::<u64>()),
        free_text(),
        free_text(),
        prop_oneof![Just(String::new()), "[A-Za-z0-9_.-]{1,64}"],
        prop::option::of(any::<u64>()),
    )
        .prop_map(
            |(op, id, node_wide_channel, gen, reason, by, from, seq)| Command {
                op,
                // Node-wide ops may carry anything (usually nothing) as channel; channel ops a valid id.
                channel: if matches!(op, Op::Drain | Op::Undrain) {
                    node_wide_channel
                } else {
                    id
                },
                gen,
                reason,
                by,
                from,
                seq,
            },
        )
}

fn to_map(c: &Command) -> HashMap<String, String> {
    c.to_fields()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// Stream entries as an operator might type them: known field names with plausible, hostile or
/// random values, plus unknown fields.
fn fields() -> impl Strategy<Value = HashMap<String, String>> {
    let key = prop_oneof![
        4 => prop::sample::select(vec!["op", "channel", "gen", "reason", "by", "from", "seq"])
            .prop_map(str::to_string),
        1 => any::<String>(),
    ];
    let value = prop_oneof![
        2 => prop::sample::select(vec![
            "stop", "start", "restart", "drain", "undrain", "STOP", "explode", "", "bbc1", "../a",
            "a/b", "0", "1", "-1", "+1", " 1", "18446744073709551615", "18446744073709551616",
            "1e3", "0x10", "\u{0}",
        ])
        .prop_map(str::to_string),
        1 => "[A-Za-z0-9_-]{1,70}",
        1 => any::<String>(),
    ];
    prop::collection::hash_map(key, value, 0..9)
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn a_command_round_trips_through_its_stream_fields(c in command()) {
        prop_assert_eq!(Command::from_fields(&to_map(&c)), Ok(c.clone()));
    }

    #[test]
    fn any_entry_parses_or_says_why_and_what_parses_round_trips(f in fields()) {
        match Command::from_fields(&f) {
            Ok(c) => {
                if !matches!(c.op, Op::Drain | Op::Undrain) {
                    prop_assert!(
                        farm_proto::validate::channel_id(&c.channel).is_ok(),
                        "a {:?} command for channel {:?}",
                        c.op,
                        c.channel
                    );
                }
                prop_assert_eq!(Some(c.op.as_str()), f.get("op").map(String::as_str));
                prop_assert_eq!(Command::from_fields(&to_map(&c)), Ok(c.clone()));
            }
            Err(why) => prop_assert!(!why.is_empty()),
        }
    }
}
