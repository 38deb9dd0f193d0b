//! Looking at processes through `/proc`: who runs, with which command line, which are zombies.
//!
//! Used to prove process promises (one FFmpeg per channel, no orphans, no zombies). A pid alone can be
//! reused, so checks that must identify one process over time pair it with [`process_start_time`].

use std::fs;

/// Parsed `/proc/<pid>/stat` fields the harness uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    /// Single-letter state: R, S, D, Z (zombie), T (stopped), t, X, I...
    pub state: char,
    pub ppid: i32,
    /// Start time in clock ticks since boot (field 22).
    pub start_time: u64,
}

/// Reads and parses `/proc/<pid>/stat`; `None` if the process does not exist (any more).
pub fn stat(pid: i32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses the text of a `/proc/<pid>/stat` file. The command name (field 2) may contain spaces and
/// parentheses, so fields are counted from after the LAST `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let (head, rest) = text.rsplit_once(')')?;
    let pid = head.split_once('(')?.0.trim().parse().ok()?;
    // rest starts at field 3 (state); field N is rest_fields[N - 3].
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let start_time = fields.get(22 - 3)?.parse().ok()?;
    Some(ProcStat {
        pid,
        state,
        ppid,
        start_time,
    })
}

/// All pids currently listed in `/proc`.
pub fn all_pids() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The command line of `pid`, arguments joined by single spaces; `None` if the process is gone.
/// Kernel threads and zombies have an empty command line.
pub fn cmdline(pid: i32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(args.join(" "))
}

/// Every live (non-zombie) process whose command line contains `needle`, excluding the calling
/// process itself, as `(pid, cmdline)`, sorted by pid.
pub fn processes_with_cmdline_containing(needle: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut out: Vec<(i32, String)> = all_pids()
        .into_iter()
        .filter(|pid| *pid != me)
        .filter_map(|pid| {
            let cmd = cmdline(pid)?;
            (cmd.contains(needle) && !is_zombie(pid)).then_some((pid, cmd))
        })
        .collect();
    out.sort();
    out
}

/// True if `pid` is a zombie (exited, not yet reaped by its parent).
pub fn is_zombie(pid: i32) -> bool {
    stat(pid).is_some_and(|s| s.state == 'Z')
}

/// True if `pid` exists and is not a zombie or dead (`Z`/`X`): a process that can still run.
/// A stopped (SIGSTOP) process is alive.
pub fn pid_alive(pid: i32) -> bool {
    stat(pid).is_some_and(|s| s.state != 'Z' && s.state != 'X')
}

/// Start time of `pid` in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
pub fn process_start_time(pid: i32) -> Option<u64> {
    stat(pid).map(|s| s.start_time)
}

/// Parent pid of `pid`.
pub fn parent_of(pid: i32) -> Option<i32> {
    stat(pid).map(|s| s.ppid)
}

/// Pids whose parent is `parent_pid` (any state, zombies included), sorted.
pub fn children_of(parent_pid: i32) -> Vec<i32> {
    let mut out: Vec<i32> = all_pids()
        .into_iter()
        .filter(|pid| stat(*pid).is_some_and(|s| s.ppid == parent_pid))
        .collect();
    out.sort();
    out
}

/// Zombie children of `parent_pid`, sorted.
pub fn zombies_of(parent_pid: i32) -> Vec<i32> {
    let mut out: Vec<i32> = all_pids()
        .into_iter()
        .filter(|pid| stat(*pid).is_some_and(|s| s.ppid == parent_pid && s.state == 'Z'))
        .collect();
    out.sort();
    out
}

/// Last `max_lines` lines of `text` (for printing log tails on failure).
pub fn tail(text: &str, max_lines: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(max_lines);
    lines[start..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_parens_in_name() {
        let text = "1234 (my (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        let s = parse_stat(text).expect("parse");
        assert_eq!(s.pid, 1234);
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.start_time, 987654);
    }

    #[test]
    fn self_is_alive_with_start_time() {
        let me = std::process::id() as i32;
        assert!(pid_alive(me));
        assert!(!is_zombie(me));
        assert!(process_start_time(me).is_some());
        assert!(cmdline(me).is_some_and(|c| !c.is_empty()));
    }
}
