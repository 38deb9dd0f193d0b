//! Every way a farmctl command can fail, and the one place that turns a failure into stderr lines
//! and an exit code: 2 for bad input (nothing was changed), 1 for runtime failures.

use super::import::m3u::M3uError;
use farm_proto::validate::InvalidInput;
use std::io::{self, Write};
use std::time::Duration;
use thiserror::Error;

/// Exit code for bad input or usage (clap uses it for its own errors too).
pub const EXIT_INPUT: u8 = 2;
/// Exit code for runtime failures: Redis unreachable, timeouts, refused writes.
pub const EXIT_RUNTIME: u8 = 1;

/// Why a farmctl command failed. Each message is one sentence without the final period.
#[derive(Debug, Error)]
pub enum CtlError {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error("{0}")]
    Usage(String),
    #[error("channel {0:?} does not exist")]
    NotFound(String),
    #[error("{}", exists_message(.0))]
    Exists(Vec<String>),
    #[error("{file} has {} error{}, nothing was imported", .errors.len(), plural(.errors.len()))]
    Playlist { file: String, errors: Vec<M3uError> },
    #[error("cannot read {path}: {source}")]
    ReadFile { path: String, source: io::Error },
    #[error("cannot connect to Redis at {url}: {source}")]
    Connect {
        url: String,
        source: redis::RedisError,
    },
    #[error("Redis at {url} did not answer {what} within {}", farm_proto::duration::format(*.after))]
    Timeout {
        url: String,
        what: &'static str,
        after: Duration,
    },
    #[error("Redis failed {what}: {source}")]
    Redis {
        what: &'static str,
        source: redis::RedisError,
    },
    #[error("the catalog kept changing while {what}, nothing was written; try again")]
    Conflict { what: &'static str },
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
    #[error("channel {0:?} is not running (no node holds its lease), nothing to stop")]
    NotRunning(String),
    #[error("node {0:?} is not alive (no heartbeat within its TTL)")]
    NodeNotAlive(String),
    #[error("no live node has room to start channel {0:?}")]
    NoLiveNode(String),
    #[error("{what} after {}", farm_proto::duration::format(*.after))]
    WaitTimeout { what: String, after: Duration },
    #[error("channel {id:?} failed: {reason}")]
    ChannelFailed { id: String, reason: String },
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn exists_message(ids: &[String]) -> String {
    const SHOWN: usize = 10;
    match ids {
        [one] => format!("channel {one:?} already exists (use --replace to overwrite it)"),
        _ => {
            let mut list = ids
                .iter()
                .take(SHOWN)
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            if ids.len() > SHOWN {
                list.push_str(&format!(" and {} more", ids.len() - SHOWN));
            }
            format!(
                "{} channels already exist: {list} (use --replace to overwrite them)",
                ids.len()
            )
        }
    }
}

impl CtlError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Invalid(_)
            | CtlError::Usage(_)
            | CtlError::NotFound(_)
            | CtlError::Exists(_)
            | CtlError::Playlist { .. }
            | CtlError::ReadFile { .. }
            | CtlError::NotRunning(_)
            | CtlError::NodeNotAlive(_) => EXIT_INPUT,
            CtlError::Connect { .. }
            | CtlError::Timeout { .. }
            | CtlError::Redis { .. }
            | CtlError::Conflict { .. }
            | CtlError::Output(_)
            | CtlError::NoLiveNode(_)
            | CtlError::WaitTimeout { .. }
            | CtlError::ChannelFailed { .. } => EXIT_RUNTIME,
        }
    }

    /// Writes what the operator sees on stderr: the details (one `<file>:<line>: <message>` line
    /// per playlist error), then `farmctl: <sentence>.`
    pub fn report(&self, w: &mut impl Write) -> io::Result<()> {
        if let CtlError::Playlist { file, errors } = self {
            for e in errors {
                writeln!(w, "{file}:{}: {}", e.line, e.message)?;
            }
        }
        let msg = self.to_string();
        let msg = msg.trim_end();
        let stop = if msg.ends_with(['.', '!', '?']) {
            ""
        } else {
            "."
        };
        writeln!(w, "farmctl: {msg}{stop}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reported(e: &CtlError) -> String {
        let mut buf = Vec::new();
        e.report(&mut buf).expect("write to a Vec");
        String::from_utf8_lossy(&buf).into_owned()
    }

    #[test]
    fn reports_are_one_sentence_with_details_first() {
        let e = CtlError::NotFound("bbc1".into());
        assert_eq!(reported(&e), "farmctl: channel \"bbc1\" does not exist.\n");
        assert_eq!(e.exit_code(), EXIT_INPUT);

        let e = CtlError::Playlist {
            file: "list.m3u".into(),
            errors: vec![
                M3uError {
                    line: 3,
                    message: "bad".into(),
                },
                M3uError {
                    line: 9,
                    message: "worse".into(),
                },
            ],
        };
        assert_eq!(
            reported(&e),
            "list.m3u:3: bad\nlist.m3u:9: worse\nfarmctl: list.m3u has 2 errors, nothing was imported.\n"
        );
    }

    #[test]
    fn exists_lists_ids_up_to_a_cap() {
        let one = CtlError::Exists(vec!["a".into()]).to_string();
        assert!(one.contains("\"a\" already exists"), "{one}");
        let many: Vec<String> = (0..13).map(|i| format!("c{i}")).collect();
        let msg = CtlError::Exists(many).to_string();
        assert!(
            msg.starts_with("13 channels already exist: c0, c1"),
            "{msg}"
        );
        assert!(msg.contains("and 3 more"), "{msg}");
    }

    #[test]
    fn runtime_failures_exit_1() {
        let e = CtlError::Timeout {
            url: "redis://h/".into(),
            what: "HGETALL",
            after: Duration::from_millis(300),
        };
        assert_eq!(e.exit_code(), EXIT_RUNTIME);
        assert_eq!(
            reported(&e),
            "farmctl: Redis at redis://h/ did not answer HGETALL within 300ms.\n"
        );
    }
}
