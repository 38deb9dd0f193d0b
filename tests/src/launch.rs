//! Running the local launchers (`deploy/local/cluster`, `deploy/local/run`) as a user does, and
//! watching them from outside.
//!
//! [`Launched::in_background`] starts a launcher the way `deploy/local/run &` in a script does: in
//! the background of a non-interactive bash, so it inherits SIGINT ignored and only SIGTERM can stop
//! it. Its stdout and stderr lines are kept with the instant each arrived. The processes it started
//! are found in `/proc` (each runs in its own session, listed in `STATE_DIR/pids`), and
//! [`Launched::sigterm_and_watch`] samples `/proc` every 2 ms while it stops, so a test can tell in
//! which order they really exited. A `Drop` that finds the launcher still running sends it SIGTERM,
//! then SIGKILLs what is left (launcher and every session it started).

use crate::procs;
use crate::signal;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lines of one output stream, each with the instant the test read it.
#[derive(Default)]
struct Lines(Mutex<Vec<(Instant, String)>>);

impl Lines {
    fn snapshot(&self) -> Vec<(Instant, String)> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

fn read_lines(stream: impl Read + Send + 'static, label: String, into: Arc<Lines>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            println!("{label}: {line}");
            if let Ok(mut l) = into.0.lock() {
                l.push((Instant::now(), line));
            }
        }
    });
}

/// A process the launcher started (or one in its session), identified by pid and start time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracked {
    /// `launcher`, a name from `STATE_DIR/pids` (`node1`, `redis`, ...), or `<name>/<comm>` for
    /// another member of that process's session (an FFmpeg of a node, an nginx worker).
    pub name: String,
    pub pid: i32,
    pub start: u64,
}

impl Tracked {
    /// Whether this very process (not a reused pid) still runs.
    pub fn alive(&self) -> bool {
        procs::stat(self.pid)
            .is_some_and(|s| s.start_time == self.start && s.state != 'Z' && s.state != 'X')
    }
}

/// When each tracked process exited after SIGTERM to the launcher.
#[derive(Debug)]
pub struct StopReport {
    /// The launcher's exit status, as its parent shell saw it.
    pub exit_status: Option<i32>,
    /// Every tracked process with the time from SIGTERM to the first `/proc` sample without it.
    pub gone: Vec<(Tracked, Duration)>,
    /// Tracked processes still running when the watch ended.
    pub left: Vec<Tracked>,
}

impl StopReport {
    /// Time from SIGTERM until the last process whose name satisfies `pick` was gone.
    pub fn last_gone(&self, pick: impl Fn(&str) -> bool) -> Option<Duration> {
        self.gone
            .iter()
            .filter(|(t, _)| pick(&t.name))
            .map(|(_, d)| *d)
            .max()
    }

    /// Time from SIGTERM until the first process whose name satisfies `pick` was gone.
    pub fn first_gone(&self, pick: impl Fn(&str) -> bool) -> Option<Duration> {
        self.gone
            .iter()
            .filter(|(t, _)| pick(&t.name))
            .map(|(_, d)| *d)
            .min()
    }
}

/// A launcher running in the background of a non-interactive shell.
pub struct Launched {
    shell: Option<Child>,
    pid: i32,
    state: PathBuf,
    out: Arc<Lines>,
    err: Arc<Lines>,
}

impl Launched {
    /// Runs `bash <script> <args>` as `"$@" &` inside `bash -c`, with `STATE_DIR=state` and `envs`.
    pub fn in_background(
        script: &Path,
        args: &[String],
        envs: &[(&str, String)],
        state: &Path,
    ) -> Self {
        let label = script
            .file_name()
            .map_or("launcher".into(), |n| n.to_string_lossy().into_owned());
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(r#""$@" & echo "launcher-pid $!" >&2; wait $!; echo "launcher-exit $?" >&2"#)
            .arg("bash")
            .arg("bash")
            .arg(script)
            .args(args)
            .env("STATE_DIR", state)
            .env_remove("FARM_TOKEN_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut shell = cmd.spawn().expect("run the launcher in a background shell");
        let (out, err) = (Arc::new(Lines::default()), Arc::new(Lines::default()));
        read_lines(
            shell.stdout.take().expect("stdout"),
            format!("{label} stdout"),
            out.clone(),
        );
        read_lines(
            shell.stderr.take().expect("stderr"),
            format!("{label} stderr"),
            err.clone(),
        );
        let pid = crate::wait::poll_until(Duration::from_secs(10), || {
            err.snapshot()
                .iter()
                .find_map(|(_, l)| l.strip_prefix("launcher-pid ")?.trim().parse().ok())
        })
        .expect("the shell reports the launcher's pid");
        Launched {
            shell: Some(shell),
            pid,
            state: state.to_path_buf(),
            out,
            err,
        }
    }

    /// The launcher's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// Lines the launcher wrote to stdout so far.
    pub fn stdout_lines(&self) -> Vec<(Instant, String)> {
        self.out.snapshot()
    }

    /// Lines the launcher (and its shell) wrote to stderr so far.
    pub fn stderr_lines(&self) -> Vec<(Instant, String)> {
        self.err.snapshot()
    }

    /// Waits for the first stdout line matching `pred`.
    pub async fn stdout_line(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> (Instant, String) {
        crate::wait::eventually(what, timeout, || {
            let found = self.out.snapshot().into_iter().find(|(_, l)| pred(l));
            async move { found }
        })
        .await
    }

    /// Waits for the first stderr line matching `pred`.
    pub async fn stderr_line(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> (Instant, String) {
        crate::wait::eventually(what, timeout, || {
            let found = self.err.snapshot().into_iter().find(|(_, l)| pred(l));
            async move { found }
        })
        .await
    }

    /// `STATE_DIR/pids`: name → pid of every process the launcher runs now.
    pub fn pids(&self) -> BTreeMap<String, i32> {
        std::fs::read_to_string(self.state.join("pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (name, pid) = l.split_once(' ')?;
                Some((name.to_string(), pid.trim().parse().ok()?))
            })
            .collect()
    }

    /// Whether the launcher process inherited SIGINT as ignored (what a background job of a
    /// non-interactive shell gets).
    pub fn ignores_sigint(&self) -> bool {
        sig_ignored(self.pid, 2)
    }

    /// The launcher, every process in `STATE_DIR/pids` and every other process in their sessions
    /// (each one runs in a session of its own), with start times.
    pub fn farm_processes(&self) -> Vec<Tracked> {
        let mut out = Vec::new();
        if let Some(s) = procs::stat(self.pid) {
            out.push(Tracked {
                name: "launcher".into(),
                pid: self.pid,
                start: s.start_time,
            });
        }
        let named = self.pids();
        let named_pids: Vec<i32> = named.values().copied().collect();
        // Its own children and theirs (deploy/local/run's cluster, timers), by parent pid; the
        // named processes and their sessions are counted below.
        let mut family = vec![self.pid];
        let mut i = 0;
        while i < family.len() {
            for child in procs::children_of(family[i]) {
                if !family.contains(&child) && !named_pids.contains(&child) {
                    family.push(child);
                }
            }
            i += 1;
        }
        for pid in family.into_iter().skip(1) {
            if let Some(s) = procs::stat(pid).filter(|s| s.state != 'Z') {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                out.push(Tracked {
                    name: format!("launcher/{}", comm.trim()),
                    pid,
                    start: s.start_time,
                });
            }
        }
        let sessions: BTreeMap<i32, &String> = named.iter().map(|(n, p)| (*p, n)).collect();
        for pid in procs::all_pids() {
            let Some((sid, start, state)) = session_of(pid) else {
                continue;
            };
            if state == 'Z' {
                continue;
            }
            let Some(leader) = sessions.get(&sid) else {
                continue;
            };
            let name = if pid == sid {
                (*leader).clone()
            } else {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                format!("{leader}/{}", comm.trim())
            };
            out.push(Tracked { name, pid, start });
        }
        out
    }

    /// Sends SIGTERM to the launcher alone (not its group) and samples `/proc` every 2 ms until
    /// every process of [`Self::farm_processes`] (taken just before) is gone and the launcher's
    /// shell has exited, or `timeout` passes.
    pub fn sigterm_and_watch(&mut self, timeout: Duration) -> StopReport {
        let tracked = self.farm_processes();
        let mut gone: Vec<Option<Duration>> = vec![None; tracked.len()];
        let began = Instant::now();
        signal::term(self.pid).expect("SIGTERM to the launcher");
        let mut exit_status = None;
        loop {
            let elapsed = began.elapsed();
            for (t, g) in tracked.iter().zip(gone.iter_mut()) {
                if g.is_none() && !t.alive() {
                    *g = Some(elapsed);
                }
            }
            if exit_status.is_none() {
                if let Some(shell) = self.shell.as_mut() {
                    if let Ok(Some(_)) = shell.try_wait() {
                        exit_status =
                            crate::wait::poll_until(Duration::from_secs(2), || self.exit_line());
                        self.shell = None;
                    }
                }
            }
            let done = gone.iter().all(Option::is_some) && self.shell.is_none();
            if done || elapsed > timeout {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut report = StopReport {
            exit_status,
            gone: Vec::new(),
            left: Vec::new(),
        };
        for (t, g) in tracked.into_iter().zip(gone) {
            match g {
                Some(d) => report.gone.push((t, d)),
                None => report.left.push(t),
            }
        }
        report.gone.sort_by_key(|(_, d)| *d);
        report
    }

    fn exit_line(&self) -> Option<i32> {
        self.err
            .snapshot()
            .iter()
            .find_map(|(_, l)| l.strip_prefix("launcher-exit ")?.trim().parse().ok())
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        let Some(mut shell) = self.shell.take() else {
            return;
        };
        let leftovers = self.farm_processes();
        let _ = signal::term(self.pid);
        let exited =
            crate::wait::poll_until(Duration::from_secs(45), || shell.try_wait().ok().flatten());
        if exited.is_none() {
            eprintln!(
                "the launcher did not stop within 45 s of SIGTERM: SIGKILL to all it started"
            );
        }
        for t in leftovers.iter().filter(|t| t.alive()) {
            eprintln!("left running: {t:?}; SIGKILL");
            let _ = signal::send_group(t.pid, signal::Sig::KILL);
            let _ = signal::kill9(t.pid);
        }
        signal::kill_group_and_reap(&mut shell);
    }
}

/// Session id, start time and state of `pid` (fields 6, 22 and 3 of `/proc/<pid>/stat`).
pub fn session_of(pid: i32) -> Option<(i32, u64, char)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((
        f.get(3)?.parse().ok()?,
        f.get(19)?.parse().ok()?,
        f.first()?.chars().next()?,
    ))
}

/// Whether `pid` ignores signal number `sig` (`SigIgn` in `/proc/<pid>/status`).
pub fn sig_ignored(pid: i32, sig: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("SigIgn:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|mask| mask & (1 << (sig - 1)) != 0)
}

/// Seconds since boot (`/proc/uptime`, 10 ms resolution) in clock ticks: the clock of a process's
/// start time in `/proc/<pid>/stat`.
pub fn uptime_ticks() -> u64 {
    let text = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let secs: f64 = text
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    let hz = rustix::param::clock_ticks_per_second();
    (secs * hz as f64) as u64
}

/// Every `*.log` under `dir` (recursively) with its text.
pub fn logs_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "log") {
                let text =
                    String::from_utf8_lossy(&std::fs::read(&p).unwrap_or_default()).into_owned();
                out.push((p, text));
            }
        }
    }
    out.sort();
    out
}

/// Checks a [`StopReport`] against the launchers' promise: everything stopped and the launcher
/// exited; nginx and the coordinators went first, then the nodes (with their FFmpegs), then the
/// demo source, and redis-server last; no node logged "could not release lease". Prints the order.
pub fn assert_orderly_stop(report: &StopReport, state: &Path) {
    for (t, d) in &report.gone {
        println!(
            "  gone after {:>6.1} ms: {} (pid {})",
            d.as_secs_f64() * 1e3,
            t.name,
            t.pid
        );
    }
    assert!(
        report.left.is_empty(),
        "still running after the launcher stopped: {:?}",
        report.left
    );
    assert!(
        report.exit_status.is_some(),
        "the launcher's shell saw it exit"
    );
    let is = |prefix: &'static str| move |n: &str| n.starts_with(prefix);
    let front = |n: &str| n.starts_with("nginx") || n.starts_with("coord");
    let farm = |n: &str| !n.starts_with("launcher");
    let redis_gone = report
        .first_gone(is("redis"))
        .expect("redis-server was tracked");
    let nodes_first = report.first_gone(is("node")).expect("a node was tracked");
    let nodes_last = report.last_gone(is("node")).expect("a node was tracked");
    let source_gone = report
        .first_gone(is("source"))
        .expect("the demo source was tracked");
    let front_last = report.last_gone(front).expect("nginx was tracked");
    let others_last = report
        .last_gone(|n| farm(n) && !n.starts_with("redis"))
        .expect("farm processes were tracked");
    println!(
        "stop order (ms after SIGTERM): nginx+coordinators done {:.1}, nodes {:.1}..{:.1}, source {:.1}, redis {:.1}, launcher {:.1}",
        front_last.as_secs_f64() * 1e3,
        nodes_first.as_secs_f64() * 1e3,
        nodes_last.as_secs_f64() * 1e3,
        source_gone.as_secs_f64() * 1e3,
        redis_gone.as_secs_f64() * 1e3,
        report.last_gone(is("launcher")).unwrap_or_default().as_secs_f64() * 1e3,
    );
    assert!(
        front_last <= nodes_first,
        "a node stopped before nginx and the coordinators had"
    );
    assert!(
        nodes_last <= source_gone,
        "the source stopped before every node had"
    );
    assert!(
        others_last < redis_gone,
        "redis-server stopped after {redis_gone:?}, not after every other farm process ({others_last:?})"
    );
    for (path, text) in logs_under(state) {
        assert!(
            !text.contains("could not release"),
            "{} says it could not release a lease:\n{}",
            path.display(),
            procs::tail(&text, 20)
        );
    }
}
