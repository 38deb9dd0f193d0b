//! Running the local launchers (`deploy/local/cluster`, `deploy/local/run`) as a user does, and
//! watching them from outside.
//!
//! [`Launched::start`] in [`Mode::Background`] starts a launcher the way `deploy/local/run &` in a
//! script does: in the background of a non-interactive bash, so it inherits SIGINT ignored and only
//! SIGTERM can stop it; in [`Mode::Foreground`] it runs as a terminal runs it, leading its own
//! process group, which [`Launched::interrupt`] sends Ctrl-C. [`LaunchPorts`] are the ports a
//! launcher is told to use, and what is checked to be free again after it. Its stdout and stderr
//! lines are kept with the instant each arrived. The processes it started
//! are found in `/proc` (each runs in its own session, listed in `STATE_DIR/pids`), and
//! [`Launched::sigterm_and_watch`] samples `/proc` every 2 ms while it stops, so a test can tell in
//! which order they really exited. A `Drop` that finds the launcher still running sends it SIGTERM,
//! then SIGKILLs what is left (launcher and every session it started).

use crate::ports::{free_port, free_port_run};
use crate::procs;
use crate::signal;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lines of one output stream of a launcher, each with the instant the test read it.
#[derive(Default)]
pub struct Lines(Mutex<Vec<(Instant, String)>>);

impl Lines {
    /// The lines read so far.
    pub fn snapshot(&self) -> Vec<(Instant, String)> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits for the first line matching `pred`.
    pub async fn first(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> (Instant, String) {
        crate::wait::eventually(what, timeout, || {
            let found = self.snapshot().into_iter().find(|(_, l)| pred(l));
            async move { found }
        })
        .await
    }
}

/// Reads `stream` to its end (so the launcher never writes into a closed pipe), printing and
/// keeping every line.
fn read_lines(
    stream: impl Read + Send + 'static,
    label: String,
    into: Arc<Lines>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            println!("{label}: {line}");
            if let Ok(mut l) = into.0.lock() {
                l.push((Instant::now(), line));
            }
        }
    })
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
        self.gone_after(pick).max()
    }

    /// Time from SIGTERM until the first process whose name satisfies `pick` was gone.
    pub fn first_gone(&self, pick: impl Fn(&str) -> bool) -> Option<Duration> {
        self.gone_after(pick).min()
    }

    /// When each process whose name satisfies `pick` was gone, after SIGTERM.
    fn gone_after<'a>(
        &'a self,
        pick: impl Fn(&str) -> bool + 'a,
    ) -> impl Iterator<Item = Duration> + 'a {
        self.gone
            .iter()
            .filter(move |(t, _)| pick(&t.name))
            .map(|(_, d)| *d)
    }
}

/// Where a launcher runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// As `"$@" &` inside `bash -c`: the background job of a non-interactive shell, which inherits
    /// SIGINT ignored (only SIGTERM stops it).
    Background,
    /// As a terminal runs a command: in the foreground, leading its own process group (which
    /// [`Launched::interrupt`] sends Ctrl-C).
    Foreground,
}

/// A launcher started by the test, in the background of a non-interactive shell or in the
/// foreground of its own process group.
pub struct Launched {
    shell: Option<Child>,
    mode: Mode,
    pid: i32,
    state: PathBuf,
    out: Arc<Lines>,
    err: Arc<Lines>,
    stdout_reader: Option<std::thread::JoinHandle<()>>,
}

impl Launched {
    /// `deploy/local/cluster --nodes 3` on `ports` in the background, restarting a process that
    /// dies after 1 s, with `envs` added. Checks that it has SIGINT ignored (as every background
    /// job of a non-interactive shell has), waits up to 120 s for its ready line and checks that it
    /// names nginx's and Redis's URLs.
    pub async fn cluster(ports: &LaunchPorts, envs: &[(&str, String)], state: &Path) -> Self {
        let mut env = ports.env(&[("RESTART_SEC", "1".to_string())]);
        env.extend(envs.iter().cloned());
        let farm = Self::start(
            Mode::Background,
            &script("cluster"),
            &ports.cluster_args(),
            &env,
            state,
        );
        assert!(
            farm.ignores_sigint(),
            "started as `cluster &` from a script, the launcher has SIGINT ignored"
        );
        let (_, ready) = farm
            .stdout()
            .first("the ready line", Duration::from_secs(120), |l| {
                l.starts_with("ready ")
            })
            .await;
        assert_eq!(ready, ports.ready_line());
        farm
    }

    /// Runs `bash <script> <args>` as `mode` says, with `STATE_DIR=state` and `envs`.
    pub fn start(
        mode: Mode,
        script: &Path,
        args: &[String],
        envs: &[(&str, String)],
        state: &Path,
    ) -> Self {
        let label = script
            .file_name()
            .map_or("launcher".into(), |n| n.to_string_lossy().into_owned());
        // A test stopped on its timeout (SIGTERM to the test's process group, which the launcher's
        // own group escapes) never runs `Drop`. So the launcher gets SIGTERM when the test's
        // thread ends (setpriv's parent-death signal, on the shell and on a background launcher),
        // and it writes through relays that ignore SIGPIPE and SIGINT and drain to /dev/null once
        // the test is gone: it stops everything it started without dying on a closed pipe.
        let term_with_parent: Vec<OsString> = setpriv()
            .map(|p| vec![p.into(), "--pdeathsig".into(), "TERM".into(), "--".into()])
            .unwrap_or_default();
        let relays = r#"relay() { trap '' PIPE INT; cat || cat >/dev/null; }; exec > >(relay) 2> >(relay >&2); "#;
        let then = match mode {
            Mode::Background => {
                r#""$@" & echo "launcher-pid $!" >&2; wait $!; echo "launcher-exit $?" >&2"#
            }
            Mode::Foreground => r#"exec "$@""#,
        };
        let mut argv = term_with_parent.clone();
        argv.extend(["bash", "-c", &format!("{relays}{then}"), "bash"].map(OsString::from));
        if mode == Mode::Background {
            argv.extend(term_with_parent);
        }
        argv.extend([OsString::from("bash"), script.into()]);
        argv.extend(args.iter().map(OsString::from));
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env("STATE_DIR", state)
            .env_remove("FARM_TOKEN_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut shell = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
        let (out, err) = (Arc::new(Lines::default()), Arc::new(Lines::default()));
        let stdout_reader = read_lines(
            shell.stdout.take().expect("stdout"),
            format!("{label} stdout"),
            out.clone(),
        );
        read_lines(
            shell.stderr.take().expect("stderr"),
            format!("{label} stderr"),
            err.clone(),
        );
        let pid = match mode {
            Mode::Foreground => i32::try_from(shell.id()).expect("pid fits in i32"),
            Mode::Background => crate::wait::poll_until(Duration::from_secs(10), || {
                err.snapshot()
                    .iter()
                    .find_map(|(_, l)| l.strip_prefix("launcher-pid ")?.trim().parse().ok())
            })
            .expect("the shell reports the launcher's pid"),
        };
        Launched {
            shell: Some(shell),
            mode,
            pid,
            state: state.to_path_buf(),
            out,
            err,
            stdout_reader: Some(stdout_reader),
        }
    }

    /// Ctrl-C to the launcher's process group, as a terminal sends it (for a launcher in
    /// [`Mode::Foreground`]); its exit status, or `None` if it still runs after `timeout` (then
    /// `Drop` stops it).
    pub fn interrupt(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let shell = self.shell.as_mut()?;
        signal::send_group(self.pid, signal::Sig::INT).expect("SIGINT to the launcher's group");
        let status = crate::wait::poll_until(timeout, || shell.try_wait().ok().flatten());
        if status.is_some() {
            self.shell = None;
        }
        status
    }

    /// Waits up to `timeout` until the launcher's stdout is closed (every process that held it has
    /// exited), so that [`Self::stdout`] holds all it wrote; whether it was.
    pub fn wait_stdout_closed(&mut self, timeout: Duration) -> bool {
        let Some(reader) = self.stdout_reader.take() else {
            return true;
        };
        let closed = crate::wait::poll_until(timeout, || reader.is_finished().then_some(()));
        if closed.is_some() {
            let _ = reader.join();
            true
        } else {
            self.stdout_reader = Some(reader);
            false
        }
    }

    /// The launcher's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// What the launcher writes to stdout.
    pub fn stdout(&self) -> &Lines {
        &self.out
    }

    /// What the launcher (and its shell) writes to stderr.
    pub fn stderr(&self) -> &Lines {
        &self.err
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

    /// [`Self::sigterm_and_watch`] (up to 60 s, on a blocking thread), then
    /// [`assert_orderly_stop`]; the report. The launcher is gone after it.
    pub async fn stop_in_order(self) -> StopReport {
        let state = self.state.clone();
        let report = tokio::task::spawn_blocking(move || {
            let mut launched = self;
            launched.sigterm_and_watch(Duration::from_secs(60))
        })
        .await
        .expect("join");
        println!("launcher exit status {:?}", report.exit_status);
        assert_orderly_stop(&report, &state);
        report
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
                    if let Ok(Some(status)) = shell.try_wait() {
                        exit_status = match self.mode {
                            Mode::Foreground => status.code(),
                            Mode::Background => {
                                crate::wait::poll_until(Duration::from_secs(2), || self.exit_line())
                            }
                        };
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

/// util-linux's `setpriv`, when installed: it sets a parent-death signal and execs the program
/// (same pid). The signal fires when the *thread* that started the process ends: a [`Launched`]
/// is started on the test's own thread.
fn setpriv() -> Option<PathBuf> {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// The launchers in `deploy/local/`: `run`, `cluster`.
pub fn script(name: &str) -> PathBuf {
    crate::nginx::repo_root().join("deploy/local").join(name)
}

/// The ports a launcher is told to use: nginx's (the playback URL's), Redis's, the UDP demo
/// source's, and five consecutive from `node` (the nodes', then the two coordinators').
#[derive(Debug, Clone, Copy)]
pub struct LaunchPorts {
    pub nginx: u16,
    pub redis: u16,
    pub source: u16,
    pub node: u16,
}

impl LaunchPorts {
    /// Ports that were free a moment ago.
    pub fn free() -> LaunchPorts {
        LaunchPorts {
            nginx: free_port(),
            redis: free_port(),
            source: free_port(),
            node: free_port_run(5),
        }
    }

    /// `deploy/local/cluster`'s arguments: three nodes, nginx's and Redis's ports.
    pub fn cluster_args(&self) -> Vec<String> {
        let (nginx, redis) = (self.nginx.to_string(), self.redis.to_string());
        ["--nodes", "3", "--port", &nginx, "--redis-port", &redis]
            .map(String::from)
            .into()
    }

    /// The environment both launchers read (the workspace's binaries, the source's and the first
    /// node's ports), then `extra`.
    pub fn env(&self, extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("FARM_BIN_DIR", crate::bins::bin_dir().display().to_string()),
            ("SOURCE_PORT", self.source.to_string()),
            ("NODE_PORT", self.node.to_string()),
        ];
        env.extend(extra.iter().cloned());
        env
    }

    /// `deploy/local/run`'s environment: [`Self::env`] with nginx's and Redis's ports (`PORT`,
    /// `REDIS_PORT`), then `extra`.
    pub fn run_env(&self, extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
        let mut env = self.env(&[
            ("PORT", self.nginx.to_string()),
            ("REDIS_PORT", self.redis.to_string()),
        ]);
        env.extend(extra.iter().cloned());
        env
    }

    /// `http://127.0.0.1:<nginx>`
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.nginx)
    }

    /// `redis://127.0.0.1:<redis>/`
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.redis)
    }

    /// The line `deploy/local/cluster` prints once the farm serves.
    pub fn ready_line(&self) -> String {
        format!("ready {} {}", self.base_url(), self.redis_url())
    }

    /// The demo channel's playlist through nginx.
    pub fn demo_url(&self) -> String {
        format!("{}/live/demo/index.m3u8", self.base_url())
    }

    /// A connection to the launched farm's Redis.
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the cluster's redis")
    }

    /// Waits up to 15 s until no process of a launcher on these ports with this `state` folder
    /// runs: none names the folder, the UDP source or redis-server's address in its command line.
    pub async fn wait_none_left(&self, state: &Path) {
        let needles = [
            state.to_string_lossy().to_string(),
            format!("udp://127.0.0.1:{}", self.source),
            // redis-server retitles itself "redis-server 127.0.0.1:<port>".
            format!("127.0.0.1:{}", self.redis),
        ];
        crate::wait::eventually(
            "no process of the launcher left",
            Duration::from_secs(15),
            || async {
                let left: Vec<_> = needles
                    .iter()
                    .flat_map(|n| procs::processes_with_cmdline_containing(n))
                    .collect();
                if !left.is_empty() {
                    println!("still running: {left:?}");
                }
                left.is_empty().then_some(())
            },
        )
        .await;
    }

    /// nginx's, Redis's and the first `nodes` node ports can be bound again.
    pub fn assert_released(&self, nodes: u16) {
        for p in [self.nginx, self.redis]
            .into_iter()
            .chain(self.node..self.node + nodes)
        {
            assert!(
                TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok(),
                "port {p} is still taken"
            );
        }
    }
}

/// Waits up to `timeout` until a GET of `url` answers 200.
pub async fn wait_200(http: &reqwest::Client, what: &str, url: &str, timeout: Duration) {
    crate::wait::eventually(what, timeout, || async {
        let r = http.get(url).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
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
