//! The control pipe between a node and its guard: one JSON object per line, each way.
//!
//! Node → guard on the guard's stdin ([`ToGuard`]), guard → node on its stdout ([`FromGuard`]).
//! Lines are bounded ([`MAX_LINE`]): a longer one is skipped whole, a line that is not a message is
//! reported and skipped; neither side panics or stops on bad input. Gateways get the `host:port`s
//! a catalog names, never its URLs; the only secrets that cross this private pipe are the upstream
//! credentials a gateway adds for FFmpeg ([`farm_proto::redact::OriginSecrets`], whose `Debug`
//! shows `***`), so they never have to be in FFmpeg's world-readable argv.

use crate::egress::{LimitKind, Limits, PolicySpec};
use serde::{Deserialize, Serialize};

/// The longest line either side accepts.
pub const MAX_LINE: usize = 64 * 1024;

/// Node → guard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToGuard {
    /// First message: whose guard this is, its HLS root (FFmpegs carry a marker under it), the
    /// egress policy every gateway asks and what each channel's upstreams may cost.
    Init {
        node_pid: u32,
        hls_root: std::path::PathBuf,
        policy: PolicySpec,
        #[serde(default)]
        limits: Limits,
    },
    /// The fence time, CLOCK_MONOTONIC ns: when the last successful renewal was sent + ⅔ lease TTL.
    Deadline { mono_ns: u64 },
    /// An FFmpeg was spawned: the leader of its own process group, with its kernel start time.
    Spawned {
        pid: u32,
        start: u64,
        channel: String,
    },
    /// That FFmpeg was reaped.
    Reaped { pid: u32 },
    /// Open a gateway for a channel.
    Open {
        id: u64,
        channel: String,
        vouched: Vec<(String, u16)>,
        timeout_ms: u64,
        max_connections: usize,
        /// Credentials to put back into requests for the masked catalog URLs.
        #[serde(default)]
        secrets: Vec<farm_proto::redact::OriginSecrets>,
    },
    /// Close a gateway (and every connection through it).
    Close { id: u64 },
}

/// Guard → node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case", deny_unknown_fields)]
pub enum FromGuard {
    /// Initialised; its pid.
    Ready {
        pid: u32,
    },
    Opened {
        id: u64,
        port: u16,
    },
    OpenFailed {
        id: u64,
        error: String,
    },
    /// A gateway's policy refused a destination.
    Refused {
        id: u64,
        why: String,
    },
    /// A gateway made an upstream connection.
    Connected {
        id: u64,
    },
    /// A gateway applied a limit `count` times since its last report; the last sentence.
    Limited {
        id: u64,
        kind: LimitKind,
        count: u64,
        why: String,
    },
    /// The deadline passed: FFmpegs killed, gateway connections dropped. `late_ms`: how long after
    /// the deadline the guard got to it (0 unless the guard itself was frozen).
    Fenced {
        killed: u32,
        late_ms: u64,
    },
    /// An FFmpeg the guard killed outside a fence (spawned while the fence was closed).
    Killed {
        pid: u32,
        channel: String,
        why: String,
    },
}

/// One message as a line (with its `\n`).
pub fn encode<T: Serialize>(msg: &T) -> String {
    // Serialising these plain enums cannot fail; an empty line would be skipped by the peer.
    let mut s = serde_json::to_string(msg).unwrap_or_default();
    s.push('\n');
    s
}

/// Parses one line (without its `\n`); the error is a sentence without the line's content.
pub fn decode<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, String> {
    serde_json::from_slice(line).map_err(|e| format!("bad control message: {e}"))
}

/// What a [`LineSplitter`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Line(Vec<u8>),
    /// A line longer than the bound was skipped.
    TooLong,
}

/// Splits a byte stream into bounded lines; fed chunk by chunk (sync or async readers alike).
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
    /// Inside an overlong line: drop bytes until its end.
    skipping: bool,
}

impl LineSplitter {
    pub fn new(max: usize) -> Self {
        LineSplitter {
            buf: Vec::new(),
            max,
            skipping: false,
        }
    }

    /// Feeds a chunk; complete lines (and skipped overlong ones) are appended to `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<Frame>) {
        while !data.is_empty() {
            let nl = data.iter().position(|b| *b == b'\n');
            let (part, rest, ended) = match nl {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &[][..], false),
            };
            data = rest;
            if !self.skipping {
                if self.buf.len() + part.len() > self.max {
                    self.buf.clear();
                    self.skipping = true;
                    out.push(Frame::TooLong);
                } else {
                    self.buf.extend_from_slice(part);
                }
            }
            if ended {
                if !self.skipping && !self.buf.is_empty() {
                    out.push(Frame::Line(std::mem::take(&mut self.buf)));
                }
                self.buf.clear();
                self.skipping = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_survives_a_round_trip() {
        let to = [
            ToGuard::Init {
                node_pid: 42,
                hls_root: "/var/lib/streamfarm/hls".into(),
                policy: PolicySpec {
                    farm: vec![("Redis".into(), 6379, Some("127.0.0.1".parse().expect("ip")))],
                    allow: vec!["10.0.0.0/8".into()],
                    deny: vec![],
                },
                limits: Limits::new(8, 3),
            },
            ToGuard::Deadline { mono_ns: u64::MAX },
            ToGuard::Spawned {
                pid: 7,
                start: 123,
                channel: "c1".into(),
            },
            ToGuard::Reaped { pid: 7 },
            ToGuard::Open {
                id: 1,
                channel: "c1".into(),
                vouched: vec![("::1".into(), 80)],
                timeout_ms: 10_000,
                max_connections: 64,
                secrets: vec![farm_proto::redact::OriginSecrets {
                    host: "h".into(),
                    port: 80,
                    swaps: vec![("sfxz0".into(), farm_proto::redact::Secret("pw".into()))],
                    basic: Some(farm_proto::redact::Secret("u:p".into())),
                }],
            },
            ToGuard::Close { id: 1 },
        ];
        for m in to {
            let line = encode(&m);
            assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
            assert_eq!(decode::<ToGuard>(line.trim_end().as_bytes()), Ok(m));
        }
        let from = [
            FromGuard::Ready { pid: 1 },
            FromGuard::Opened { id: 1, port: 4000 },
            FromGuard::OpenFailed {
                id: 1,
                error: "x\ny".into(),
            },
            FromGuard::Refused {
                id: 1,
                why: "no".into(),
            },
            FromGuard::Connected { id: 1 },
            FromGuard::Limited {
                id: 1,
                kind: LimitKind::Rate,
                count: 12,
                why: "over".into(),
            },
            FromGuard::Fenced {
                killed: 2,
                late_ms: 0,
            },
            FromGuard::Killed {
                pid: 3,
                channel: "c".into(),
                why: "w".into(),
            },
        ];
        for m in from {
            assert_eq!(decode::<FromGuard>(encode(&m).trim_end().as_bytes()), Ok(m));
        }
    }

    #[test]
    fn bad_lines_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"{",
            b"null",
            b"[]",
            b"\xff\xfe",
            br#"{"op":"nope"}"#,
            br#"{"op":"deadline"}"#,
            br#"{"op":"deadline","mono_ns":-1}"#,
            br#"{"op":"deadline","mono_ns":18446744073709551616}"#,
            br#"{"op":"reaped","pid":"7"}"#,
            br#"{"op":"reaped","pid":7,"extra":1}"#,
            br#"{"op":"open","id":1,"channel":"c","vouched":[["h"]],"timeout_ms":1,"max_connections":1}"#,
            br#"{"op":"open","id":1,"channel":"c","vouched":[["h",70000]],"timeout_ms":1,"max_connections":1}"#,
        ] {
            let e = decode::<ToGuard>(bad).expect_err(&String::from_utf8_lossy(bad));
            assert!(e.starts_with("bad control message"), "{e}");
        }
        assert!(decode::<FromGuard>(br#"{"ev":"opened","id":1,"port":65536}"#).is_err());
        assert!(decode::<FromGuard>(
            br#"{"ev":"limited","id":1,"kind":"nonsense","count":1,"why":""}"#
        )
        .is_err());
        // An init without limits (an older node) gets the defaults.
        let old = br#"{"op":"init","node_pid":9,"hls_root":"/h","policy":{"farm":[],"allow":[],"deny":[]}}"#;
        assert!(matches!(
            decode::<ToGuard>(old),
            Ok(ToGuard::Init { limits, .. }) if limits == Limits::default()
        ));
    }

    #[test]
    fn lines_are_split_across_chunks_and_overlong_ones_skipped() {
        let mut s = LineSplitter::new(8);
        let mut out = Vec::new();
        s.push(b"abc", &mut out);
        assert!(out.is_empty());
        s.push(b"de\nfg\n\n", &mut out);
        assert_eq!(
            out,
            [Frame::Line(b"abcde".to_vec()), Frame::Line(b"fg".to_vec())]
        );
        out.clear();
        // 12 bytes in two chunks: skipped whole, once; the next line is whole again.
        s.push(b"0123456", &mut out);
        s.push(b"789ab\nok\n", &mut out);
        assert_eq!(out, [Frame::TooLong, Frame::Line(b"ok".to_vec())]);
        out.clear();
        s.push(b"12345678\n123456789", &mut out);
        assert_eq!(out, [Frame::Line(b"12345678".to_vec()), Frame::TooLong]);
        out.clear();
        s.push(b"still the long one\nx\n", &mut out);
        assert_eq!(out, [Frame::Line(b"x".to_vec())]);
    }
}
