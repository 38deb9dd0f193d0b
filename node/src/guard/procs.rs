//! What the guard reads in `/proc` before it kills: a process is killed only while its kernel start
//! time is the one recorded at its spawn (a reused pid is never hit), and the second line (children
//! of the node nobody announced) only when the process leads its own group and carries the FFmpeg
//! marker in its environment.

use crate::ffmpeg::MARKER_VAR;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::path::Path;

/// The fields of `/proc/<pid>/stat` the guard uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
    /// Clock ticks since boot (field 22).
    pub start: u64,
}

/// Parses the text of a `/proc/<pid>/stat` file (fields counted after the last `)`).
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether the process can still run (not a zombie, not dead).
fn live(s: &Stat) -> bool {
    !matches!(s.state, 'Z' | 'X' | 'x')
}

/// SIGKILLs the process group `pid` leads, when `pid` is still the live process that started at
/// `start`. Whether it was signalled.
pub fn kill_group_verified(pid: u32, start: u64) -> bool {
    if pid <= 1 || i32::try_from(pid).is_err() {
        return false;
    }
    match stat(pid) {
        Some(s) if s.start == start && live(&s) => {
            killpg(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok()
        }
        _ => false,
    }
}

/// Whether the process carries the FFmpeg marker naming a folder under `root`.
fn has_marker(pid: u32, root: &Path) -> bool {
    let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let mut want = format!("{MARKER_VAR}=").into_bytes();
    want.extend_from_slice(root.as_os_str().as_encoded_bytes());
    want.push(b'/');
    env.split(|b| *b == 0).any(|kv| kv.starts_with(&want))
}

/// Live children of `parent` that lead their own process group and carry the FFmpeg marker of a
/// folder under `root`, as `(pid, start)`: FFmpegs the node spawned, announced or not.
pub fn ffmpeg_children_of(parent: u32, root: &Path) -> Vec<(u32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let s = stat(pid)?;
            (s.ppid == parent && s.pgrp == pid && live(&s) && has_marker(pid, root))
                .then_some((pid, s.start))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    #[test]
    fn stat_lines_parse_with_odd_names_and_bad_ones_do_not() {
        let t = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000";
        assert_eq!(
            parse_stat(t),
            Some(Stat {
                state: 'S',
                ppid: 1,
                pgrp: 1234,
                start: 987654
            })
        );
        for bad in [
            "",
            "1 (x",
            "1 (x) S",
            "1 (x) S a b",
            "1 (x) S 1 1 1 0 -1 0 0",
        ] {
            assert_eq!(parse_stat(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_the_recorded_process_is_killed_and_unannounced_children_are_found() {
        let mut marked = Command::new("sleep")
            .arg("30")
            .env(MARKER_VAR, "/nowhere/procs-test/ch")
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .expect("sleep");
        let mut plain = Command::new("sleep")
            .arg("30")
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .expect("sleep");
        let me = std::process::id();
        let found = ffmpeg_children_of(me, Path::new("/nowhere/procs-test"));
        assert!(ffmpeg_children_of(me, Path::new("/nowhere/procs")).is_empty());
        let (pid, start) = (marked.id(), stat(marked.id()).expect("stat").start);
        assert!(found.contains(&(pid, start)), "{found:?}");
        assert!(!found.iter().any(|(p, _)| *p == plain.id()), "{found:?}");
        // A wrong start time (a reused pid) is left alone.
        assert!(!kill_group_verified(pid, start + 1));
        assert!(stat(pid).is_some_and(|s| live(&s)));
        assert!(kill_group_verified(pid, start));
        let status = marked.wait().expect("wait");
        assert!(!status.success());
        assert!(!kill_group_verified(pid, start), "reaped: nothing to kill");
        assert!(!kill_group_verified(0, 0) && !kill_group_verified(1, 0));
        let _ = plain.kill();
        let _ = plain.wait();
    }
}
