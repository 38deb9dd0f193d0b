//! How an FFmpeg is recognised in `/proc` before anything kills it: a process is killed only while
//! its kernel start time is the one recorded at its spawn (a reused pid is never hit) and, where
//! nobody recorded it (a leftover of an earlier incarnation, a child of the node not announced to
//! its guard), only when it carries the FFmpeg marker in its environment and leads its own group.
//!
//! Used by the node's start-up sweep (`sweep`), its guard's fence (`guard`) and the egress
//! gateways' peer check (`egress::peer`); it reads `/proc` and signals, and knows nothing else.

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::path::Path;

/// The environment variable that marks an FFmpeg as belonging to one channel folder of one node.
pub const MARKER_VAR: &str = "STREAMFARM_CHANNEL_DIR";

/// The fields of `/proc/<pid>/stat` the farm uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
    /// Clock ticks since boot (field 22).
    pub start: u64,
}

/// Parses the text of a `/proc/<pid>/stat` file (fields counted after the last `)`: the command
/// name may contain spaces and `)`).
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

/// The kernel's start time of a process (clock ticks since boot).
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|s| s.start)
}

/// Whether the process can still run (not a zombie, not dead).
fn live(s: &Stat) -> bool {
    !matches!(s.state, 'Z' | 'X' | 'x')
}

/// Whether process `pid` exists and can still run.
pub fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|s| live(&s))
}

/// SIGKILLs the process group `pid` leads, when `pid` is still the live process that started at
/// `start`. Whether it was signalled.
pub fn kill_group_verified(pid: u32, start: u64) -> bool {
    if pid <= 1 || i32::try_from(pid).is_err() {
        return false;
    }
    match stat(pid) {
        Some(s) if s.start == start && live(&s) => {
            match killpg(Pid::from_raw(pid as i32), Signal::SIGKILL) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(pid, error = %e, "could not kill an ffmpeg group");
                    false
                }
            }
        }
        _ => false,
    }
}

/// Whether the process's FFmpeg marker (the channel folder it was started for) passes `wanted`.
fn marker_matches(pid: u32, wanted: impl Fn(&[u8]) -> bool) -> bool {
    let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let key = format!("{MARKER_VAR}=");
    env.split(|b| *b == 0)
        .filter_map(|kv| kv.strip_prefix(key.as_bytes()))
        .any(wanted)
}

/// Whether the process carries the FFmpeg marker of the channel folder `dir`.
pub fn has_marker(pid: u32, dir: &Path) -> bool {
    marker_matches(pid, |m| m == dir.as_os_str().as_encoded_bytes())
}

/// Whether the process carries the FFmpeg marker of a folder under `root`.
fn has_marker_under(pid: u32, root: &Path) -> bool {
    let mut prefix = root.as_os_str().as_encoded_bytes().to_vec();
    prefix.push(b'/');
    marker_matches(pid, |m| m.starts_with(&prefix))
}

/// Kills a leftover FFmpeg of an earlier incarnation, only when pid, start time and the marker of
/// `dir` all match (a reused pid is never killed). Whether it killed something.
pub fn kill_if_ours(pid: u32, start: u64, dir: &Path) -> bool {
    has_marker(pid, dir) && kill_group_verified(pid, start)
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
            (s.ppid == parent && s.pgrp == pid && live(&s) && has_marker_under(pid, root))
                .then_some((pid, s.start))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command, Stdio};

    /// A `sleep` in its own process group, like an FFmpeg, with a channel folder's marker or none.
    fn sleeper(marker: Option<&str>) -> Child {
        let mut cmd = Command::new("sleep");
        cmd.arg("30").process_group(0).stdin(Stdio::null());
        if let Some(dir) = marker {
            cmd.env(MARKER_VAR, dir);
        }
        cmd.spawn().expect("sleep")
    }

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
        let mut marked = sleeper(Some("/nowhere/procs-test/ch"));
        let mut plain = sleeper(None);
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

    #[test]
    fn a_leftover_is_killed_only_with_its_start_time_and_its_folders_marker() {
        let me = std::process::id();
        assert!(start_time(me).is_some() && alive(me));
        assert!(!has_marker(me, Path::new("/nowhere")));
        assert!(!kill_if_ours(me, 0, Path::new("/nowhere")));
        let mut marked = sleeper(Some("/nowhere/procs-test/ch"));
        let (pid, start) = (marked.id(), start_time(marked.id()).expect("start"));
        let dir = Path::new("/nowhere/procs-test/ch");
        // spawn returns once the child's exec has let go of our memory (vfork), which is before
        // the kernel sets up the new program's environment: until then /proc/<pid>/environ is
        // empty. Wait for it (bounded) rather than race it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !has_marker(pid, dir) && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(has_marker(pid, dir));
        assert!(
            !has_marker(pid, Path::new("/nowhere/procs-test")),
            "exact folder only"
        );
        assert!(!kill_if_ours(pid, start + 1, dir), "a reused pid");
        assert!(!kill_if_ours(
            pid,
            start,
            Path::new("/nowhere/procs-test/other")
        ));
        assert!(alive(pid));
        assert!(kill_if_ours(pid, start, dir));
        assert!(!marked.wait().expect("wait").success());
    }
}
