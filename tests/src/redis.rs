//! [`RedisServer`]: a real `redis-server` per test, on a free port, in its own temp dir.
//!
//! Invariants: the server never outlives the fixture (SIGKILL + wait on drop); its log is printed to
//! stderr when the test panics; `restart()` keeps the port and the dir, so URLs held by the code under
//! test stay valid across an outage. No persistence (`--save ""`, no AOF) unless a test asks for it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

use crate::ports::free_port;
use crate::signal;

/// How long [`RedisServer::start`] and [`RedisServer::restart`] wait for PING to answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `redis-server` owned by one test.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// A config file given before the harness's arguments ([`RedisServer::start_with_conf`]).
    conf: Option<PathBuf>,
    extra_args: Vec<String>,
}

impl RedisServer {
    /// Starts `redis-server` on a free port and waits until it answers PING.
    pub fn start() -> RedisServer {
        Self::start_with_args(&[])
    }

    /// Like [`RedisServer::start`], with extra command-line config appended, e.g.
    /// `&["--maxmemory-policy", "noeviction", "--notify-keyspace-events", "Ex"]`.
    pub fn start_with_args(extra_args: &[&str]) -> RedisServer {
        Self::start_in(None, &[], extra_args)
    }

    /// `redis-server <conf>` (e.g. the shipped `deploy/redis/redis.conf`, its persistence and
    /// limits kept), with only the port, bind address, folder and log file set by the harness.
    /// `files` are `(flag, file)` pairs: each file is copied into the server's folder and passed as
    /// `<flag> <copy>` (e.g. `--aclfile` and users.acl). Ready once PING answers, `+PONG` or (the
    /// default user switched off) `-NOAUTH`.
    pub fn start_with_conf(conf: &Path, files: &[(&str, &Path)]) -> RedisServer {
        Self::start_in(Some(conf.to_path_buf()), files, &[])
    }

    fn start_in(
        conf: Option<PathBuf>,
        files: &[(&str, &Path)],
        extra_args: &[&str],
    ) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("farm-redis-")
            .tempdir()
            .expect("create temp dir for redis-server");
        let mut args: Vec<String> = Vec::new();
        for (flag, file) in files {
            let copy = dir.path().join(file.file_name().expect("a file name"));
            std::fs::copy(file, &copy)
                .unwrap_or_else(|e| panic!("copy {} for redis-server: {e}", file.display()));
            args.extend([flag.to_string(), copy.display().to_string()]);
        }
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let mut server = RedisServer {
            child: None,
            port: 0,
            dir,
            conf,
            extra_args: args,
        };
        // free_port() is racy: if another process grabs the port first, redis exits; try another one.
        let mut last_err = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn_and_wait() {
                Ok(child) => {
                    server.child = Some(child);
                    return server;
                }
                Err(e) => last_err = e,
            }
        }
        panic!("redis-server did not start: {last_err}");
    }

    /// The TCP port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Its working dir (`--dir`), a temp dir removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of its log file.
    pub fn log_path(&self) -> PathBuf {
        log_path(self.dir.path())
    }

    /// Contents of its log file so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Pid of the running server; panics if it was killed and not restarted.
    pub fn pid(&self) -> i32 {
        let child = self
            .child
            .as_ref()
            .expect("redis-server is not running (killed?)");
        i32::try_from(child.id()).expect("pid fits in i32")
    }

    /// A new multiplexed connection (connect and response timeouts 5 s, longer than the redis crate's
    /// defaults so a loaded CI machine does not time out). Panics if it cannot connect.
    pub async fn conn(&self) -> MultiplexedConnection {
        self.try_conn()
            .await
            .unwrap_or_else(|e| panic!("connect to redis-server at {}: {e}", self.url()))
    }

    /// Like [`RedisServer::conn`] but returns the error (for tests of Redis outages).
    pub async fn try_conn(&self) -> redis::RedisResult<MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// SIGSTOP: the server stops answering but keeps its sockets open (a hung Redis).
    pub fn pause(&self) {
        signal::stop(self.pid()).expect("SIGSTOP redis-server");
    }

    /// SIGCONT after [`RedisServer::pause`].
    pub fn resume(&self) {
        signal::cont(self.pid()).expect("SIGCONT redis-server");
    }

    /// SIGKILL and reap: the server is gone, connections are reset, data is lost.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and dir (after [`RedisServer::kill9`]; kills it first
    /// if it is still running). Waits until PING answers; panics if it cannot bind the port again.
    pub fn restart(&mut self) {
        self.kill9();
        // The port may briefly be unavailable (e.g. a client still connecting); retry for a while.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) if Instant::now() >= deadline => {
                    panic!("redis-server restart on port {} failed: {e}", self.port)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// `INFO commandstats` as command → number of calls, e.g. `"evalsha" → 12`, `"client|setname" → 1`.
    /// The `INFO` call itself is counted by Redis too.
    pub async fn command_calls(&self) -> HashMap<String, u64> {
        parse_commandstats(&self.text_reply("INFO", "commandstats").await)
    }

    /// The text that `<command> <arg>` answers on a new connection; panics if it fails.
    async fn text_reply(&self, command: &str, arg: &str) -> String {
        let mut conn = self.conn().await;
        redis::cmd(command)
            .arg(arg)
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{command} {arg}: {e}"))
    }

    /// Starts a `MONITOR` connection: every command Redis receives from now on, as it logs it.
    pub fn monitor(&self) -> Monitor {
        Monitor::start(self.port)
    }

    /// `CLIENT LIST`: one map per connection (`id`, `addr`, `name`, `cmd`, ...).
    pub async fn client_list(&self) -> Vec<HashMap<String, String>> {
        parse_client_list(&self.text_reply("CLIENT", "LIST").await)
    }

    /// `connected_clients` from `INFO clients` (includes the connection used to ask).
    pub async fn connected_clients(&self) -> u64 {
        let info = self.text_reply("INFO", "clients").await;
        info_field(&info, "connected_clients")
            .and_then(|v| v.parse().ok())
            .expect("connected_clients in INFO clients")
    }
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("pid", &self.child.as_ref().map(Child::id))
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
        crate::procs::print_tail_if_panicking(
            format_args!(
                "redis-server :{} log tail ({})",
                self.port,
                self.log_path().display()
            ),
            40,
            || self.log(),
        );
    }
}

/// Parses `CLIENT LIST` output: one map per line of `key=value` fields.
pub fn parse_client_list(text: &str) -> Vec<HashMap<String, String>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// `CONFIG GET <param>`: `[param, value]`.
pub async fn config_get(conn: &mut MultiplexedConnection, param: &str) -> Vec<String> {
    redis::cmd("CONFIG")
        .arg("GET")
        .arg(param)
        .query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("CONFIG GET {param}: {e}"))
}

/// One command as `MONITOR` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Monitored {
    /// Redis's clock when it ran the command, µs since the Unix epoch.
    pub at_us: u64,
    /// The client's `addr` (`127.0.0.1:port`), or `lua` for a command a script ran.
    pub client: String,
    /// The command name, lower case.
    pub command: String,
    /// The whole line after the client.
    pub line: String,
}

impl Monitored {
    /// A command run inside a script (the script's own EVAL/EVALSHA is a client command).
    pub fn in_script(&self) -> bool {
        self.client == "lua"
    }
}

/// Parses one `MONITOR` line: `+1700000000.123456 [0 127.0.0.1:5000] "GET" "k"`.
pub fn parse_monitor_line(line: &str) -> Option<Monitored> {
    let line = line.strip_prefix('+').unwrap_or(line);
    let (ts, rest) = line.split_once(' ')?;
    let (secs, frac) = ts.split_once('.')?;
    let at_us =
        secs.parse::<u64>().ok()? * 1_000_000 + format!("{frac:0<6}")[..6].parse::<u64>().ok()?;
    let rest = rest.strip_prefix('[')?;
    let (who, cmd) = rest.split_once(']')?;
    let client = who.split_whitespace().nth(1)?.to_string();
    let cmd = cmd.trim();
    let command = cmd.split('"').nth(1).unwrap_or("").to_ascii_lowercase();
    Some(Monitored {
        at_us,
        client,
        command,
        line: cmd.to_string(),
    })
}

/// A `MONITOR` connection read by its own thread; [`Monitor::seen`] returns what it got so far.
pub struct Monitor {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Monitored>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The monitor's own address as Redis sees it.
    pub addr: String,
}

impl Monitor {
    fn start(port: u16) -> Monitor {
        use std::io::BufRead;
        use std::sync::atomic::Ordering;
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect for MONITOR");
        let addr = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
        s.write_all(b"MONITOR\r\n").expect("send MONITOR");
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let mut reader = std::io::BufReader::new(s);
        let mut ok = String::new();
        let deadline = Instant::now() + START_TIMEOUT;
        while !ok.ends_with('\n') {
            assert!(Instant::now() < deadline, "MONITOR did not answer");
            let _ = reader.read_line(&mut ok);
        }
        assert!(ok.starts_with("+OK"), "MONITOR answered {ok:?}");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sn, st) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut line = String::new();
            while !st.load(Ordering::Acquire) {
                match reader.read_line(&mut line) {
                    Ok(0) => return,
                    Ok(_) if line.ends_with('\n') => {
                        if let Some(m) = parse_monitor_line(line.trim_end()) {
                            sn.lock().unwrap_or_else(|p| p.into_inner()).push(m);
                        }
                        line.clear();
                    }
                    // A partial line (or a read timeout): keep what came, read on.
                    Ok(_) | Err(_) => {}
                }
            }
        });
        Monitor {
            seen,
            stop,
            thread: Some(thread),
            addr,
        }
    }

    /// Every command seen so far, in the order Redis ran them.
    pub fn seen(&self) -> Vec<Monitored> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Parses `INFO commandstats` output (`cmdstat_get:calls=3,usec=...`) into command → calls.
pub fn parse_commandstats(info: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for line in info.lines() {
        let Some(rest) = line.trim().strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, stats)) = rest.split_once(':') else {
            continue;
        };
        let calls = stats
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|v| v.parse().ok());
        if let Some(calls) = calls {
            out.insert(name.to_string(), calls);
        }
    }
    out
}

fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        l.trim()
            .strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
    })
}

/// Sends one inline command (`PING`) over a fresh TCP connection; the first reply line, trimmed,
/// or `None` if nothing answers within 500 ms.
pub fn inline_command(port: u16, command: &str) -> Option<String> {
    let addr = (Ipv4Addr::LOCALHOST, port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.set_write_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(format!("{command}\r\n").as_bytes()).ok()?;
    let mut buf = [0u8; 256];
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    Some(String::from_utf8_lossy(&got).trim().to_string())
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("redis.log")
}

impl RedisServer {
    /// Spawns redis-server on `self.port` with the harness's fixed config (or `self.conf`) and
    /// waits until it answers PING.
    fn spawn_and_wait(&self) -> Result<Child, String> {
        let log = self.log_path();
        let mut cmd = Command::new("redis-server");
        if let Some(conf) = &self.conf {
            cmd.arg(conf);
        }
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(self.dir.path());
        if self.conf.is_none() {
            cmd.args(["--save", "", "--appendonly", "no"]);
        }
        let child = cmd
            .arg("--logfile")
            .arg(&log)
            .arg("--daemonize")
            .arg("no")
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn redis-server (is it installed?): {e}"))?;
        let port = self.port;
        crate::procs::wait_answering(
            child,
            &format!("redis-server on port {port}"),
            &log,
            START_TIMEOUT,
            || {
                inline_command(port, "PING")
                    .is_some_and(|r| r.starts_with("+PONG") || r.starts_with("-NOAUTH"))
            },
            |c| {
                let _ = c.kill();
                let _ = c.wait();
            },
        )
    }
}

/// A thread that PINGs every 5 ms on its own connection: `(max round trip, pings, pings > 100 ms)`.
pub struct Pinger {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<(Duration, u64, u64), String>>,
}

impl Pinger {
    /// Connects to `url` and starts pinging.
    pub fn start(url: &str) -> Result<Pinger, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis url: {e}"))?;
        let mut c = client
            .get_connection()
            .map_err(|e| format!("pinger connects: {e}"))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut max, mut n, mut over) = (Duration::ZERO, 0u64, 0u64);
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                let t = Instant::now();
                let _: String = redis::cmd("PING")
                    .query(&mut c)
                    .map_err(|e| format!("PING: {e}"))?;
                let d = t.elapsed();
                max = max.max(d);
                n += 1;
                if d > Duration::from_millis(100) {
                    over += 1;
                }
                // Pacing, not synchronisation: one PING per 5 ms.
                std::thread::sleep(Duration::from_millis(5).saturating_sub(d));
            }
            Ok((max, n, over))
        });
        Ok(Pinger { stop, thread })
    }

    /// Stops the thread; what it saw.
    pub fn finish(self) -> Result<(Duration, u64, u64), String> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| "the pinger panicked".to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_lines_name_time_client_and_command() {
        let m =
            parse_monitor_line(r#"+1700000000.123456 [0 127.0.0.1:5000] "EVALSHA" "ab" "1" "k""#)
                .expect("parse");
        assert_eq!(m.at_us, 1_700_000_000_123_456);
        assert_eq!(m.client, "127.0.0.1:5000");
        assert_eq!(m.command, "evalsha");
        assert!(!m.in_script());
        let lua = parse_monitor_line(r#"1700000000.5 [0 lua] "get" "k""#).expect("parse");
        assert!(lua.in_script());
        assert_eq!(lua.at_us, 1_700_000_000_500_000);
    }

    #[test]
    fn client_lists_parse_into_fields() {
        let l = parse_client_list(
            "id=3 addr=127.0.0.1:5 name= cmd=xreadgroup\nid=4 addr=127.0.0.1:6 cmd=monitor\n",
        );
        assert_eq!(l.len(), 2);
        assert_eq!(l[0]["cmd"], "xreadgroup");
        assert_eq!(l[1]["addr"], "127.0.0.1:6");
    }
}
