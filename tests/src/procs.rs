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

/// Wall-clock now, in ms since the Unix epoch (the clock Redis's `TIME` reads on this host).
pub fn now_ms() -> u64 {
    now_us() / 1000
}

/// Wall-clock now, in µs since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// When `pid` started, in ms since the Unix epoch, from the kernel's start time (clock ticks since
/// boot, so a 10 ms grain at 100 Hz, rounded down). `None` if the process is gone.
pub fn start_unix_ms(pid: i32) -> Option<u64> {
    let ticks = process_start_time(pid)?;
    Some(ticks_to_unix_ms(ticks))
}

/// A `/proc/<pid>/stat` start time (clock ticks since boot) as ms since the Unix epoch.
pub fn ticks_to_unix_ms(ticks: u64) -> u64 {
    let hz = rustix::param::clock_ticks_per_second().max(1);
    let boot = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let since_boot_us = boot.tv_sec as u64 * 1_000_000 + boot.tv_nsec as u64 / 1000;
    let boot_unix_us = now_us().saturating_sub(since_boot_us);
    (boot_unix_us + ticks * 1_000_000 / hz) / 1000
}

/// How a process was seen to end by [`watch_exit`]: it ran at `last_alive_ms` and was gone at
/// `gone_ms` (ms since the Unix epoch), so it exited in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitSeen {
    pub last_alive_ms: u64,
    pub gone_ms: u64,
}

/// How often [`watch_exit`] looks: one `stat` read, cheap enough to bracket an exit closely.
pub const EXIT_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Watches the process `pid` that started at `start_time` (ticks, so a reused pid is not it) until
/// it is gone or a zombie, looking every [`EXIT_POLL`]; `None` if it still runs after `timeout`.
/// Async: the polling sleeps on the runtime's timer.
pub async fn watch_exit(
    pid: i32,
    start_time: u64,
    timeout: std::time::Duration,
) -> Option<ExitSeen> {
    let deadline = std::time::Instant::now() + timeout;
    let mut last_alive_ms = now_ms();
    loop {
        let before = now_ms();
        let alive = stat(pid)
            .is_some_and(|s| s.start_time == start_time && s.state != 'Z' && s.state != 'X');
        if !alive {
            return Some(ExitSeen {
                last_alive_ms,
                gone_ms: now_ms(),
            });
        }
        last_alive_ms = before;
        if std::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(EXIT_POLL).await;
    }
}

/// A process [`Spawns`] saw: its pid, kernel start time (ms since the epoch) and when it was last
/// seen running and first seen gone (ms since the epoch; `None` while it runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenProcess {
    pub pid: i32,
    pub start_ms: u64,
    pub last_alive_ms: u64,
    pub gone_ms: Option<u64>,
}

/// Records every process whose command line contains a needle, from a thread that scans `/proc`
/// every few milliseconds: the start times are the kernel's, whenever the scan first sees them; a
/// process that lives shorter than one scan may be missed (the caller checks the count).
pub struct Spawns {
    seen: std::sync::Arc<std::sync::Mutex<Vec<SeenProcess>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spawns {
    /// Starts scanning for processes whose command line contains `needle` (and whose program is
    /// not a `farm-node`), every `every`.
    pub fn start(needle: &str, every: std::time::Duration) -> Spawns {
        use std::sync::atomic::Ordering;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<SeenProcess>::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, st, needle) = (seen.clone(), stop.clone(), needle.to_string());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Acquire) {
                let now = now_ms();
                let live: Vec<(i32, u64)> = processes_with_cmdline_containing(&needle)
                    .into_iter()
                    .filter(|(_, cmd)| !cmd.split(' ').next().unwrap_or("").ends_with("farm-node"))
                    .filter_map(|(pid, _)| Some((pid, process_start_time(pid)?)))
                    .collect();
                let mut seen = s.lock().unwrap_or_else(|p| p.into_inner());
                for (pid, ticks) in &live {
                    let start_ms = ticks_to_unix_ms(*ticks);
                    match seen
                        .iter_mut()
                        .find(|p| p.pid == *pid && p.gone_ms.is_none())
                    {
                        Some(p) => p.last_alive_ms = now,
                        None => seen.push(SeenProcess {
                            pid: *pid,
                            start_ms,
                            last_alive_ms: now,
                            gone_ms: None,
                        }),
                    }
                }
                for p in seen.iter_mut().filter(|p| p.gone_ms.is_none()) {
                    if !live.iter().any(|(pid, _)| *pid == p.pid) {
                        p.gone_ms = Some(now);
                    }
                }
                drop(seen);
                std::thread::sleep(every);
            }
        });
        Spawns {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// What it saw so far, in start order.
    pub fn seen(&self) -> Vec<SeenProcess> {
        let mut v = self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        v.sort_by_key(|p| (p.start_ms, p.pid));
        v
    }
}

impl Drop for Spawns {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Last `max_lines` lines of `text` (for printing log tails on failure).
pub fn tail(text: &str, max_lines: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(max_lines);
    lines[start..].join("\n")
}

/// A fixture's `Drop` when the test failed: while the thread panics, prints the last `max_lines`
/// lines of `log()` to stderr between `--- <title> ---` and `--- end ---`.
pub fn print_tail_if_panicking(
    title: std::fmt::Arguments<'_>,
    max_lines: usize,
    log: impl FnOnce() -> String,
) {
    if std::thread::panicking() {
        eprintln!("--- {title} ---\n{}\n--- end ---", tail(&log(), max_lines));
    }
}

/// Waits up to `timeout` for a server process just started as `child` to answer (`answers()`,
/// polled every 20 ms; a server says nothing when it is ready). When it exits first or never
/// answers, `stop` ends it and the error names `what` and carries the tail of its log.
pub fn wait_answering(
    mut child: std::process::Child,
    what: &str,
    log: &std::path::Path,
    timeout: std::time::Duration,
    mut answers: impl FnMut() -> bool,
    stop: impl FnOnce(&mut std::process::Child),
) -> Result<std::process::Child, String> {
    let read_log = || tail(&fs::read_to_string(log).unwrap_or_default(), 30);
    let interval = std::time::Duration::from_millis(20);
    let ended = crate::wait::poll_every(interval, timeout, || {
        if answers() {
            return Some(None);
        }
        child.try_wait().ok().flatten().map(Some)
    });
    match ended {
        Some(None) => Ok(child),
        Some(Some(status)) => Err(format!(
            "{what} exited with {status}; {}:\n{}",
            log.display(),
            read_log()
        )),
        None => {
            stop(&mut child);
            Err(format!(
                "{what} did not answer within {timeout:?}; {}:\n{}",
                log.display(),
                read_log()
            ))
        }
    }
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

    #[test]
    fn kernel_start_times_read_as_wall_clock() {
        let before = now_ms();
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep");
        let after = now_ms();
        let start = start_unix_ms(child.id() as i32).expect("start");
        let _ = child.kill();
        let _ = child.wait();
        // The kernel's grain is one clock tick (10 ms at 100 Hz), rounded down.
        assert!(
            start + 20 >= before && start <= after + 20,
            "{before} <= {start} <= {after}"
        );
    }
}
