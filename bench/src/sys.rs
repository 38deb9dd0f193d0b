//! What the benchmark reads about processes and Redis from outside: CPU time and RSS from `/proc`,
//! and the commands clients send to Redis, from `MONITOR`.
//!
//! `INFO commandstats` also counts the commands Lua scripts run inside Redis, so it cannot tell how
//! many commands a client sent; `MONITOR` can: it tags script-internal commands with `lua` instead of
//! the client's address. Only clients' commands are counted.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

/// CPU time (user + system) of `pid` in seconds, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: i32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3; utime is field 14, stime field 15.
    let utime: u64 = f.get(14 - 3)?.parse().ok()?;
    let stime: u64 = f.get(15 - 3)?.parse().ok()?;
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Some((utime + stime) as f64 / hz)
}

/// `VmRSS` of `pid` in KiB.
pub fn rss_kb(pid: i32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

/// `Pss` of `pid` in KiB, from `/proc/<pid>/smaps_rollup` (None where the kernel has no such file).
pub fn pss_kb(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The node's guard: its child re-executed as `farm-node __guard` (see node/src/guard).
pub fn guard_of(node_pid: i32) -> Option<i32> {
    farm_tests::procs::children_of(node_pid)
        .into_iter()
        .find(|c| {
            farm_tests::procs::cmdline(*c).is_some_and(|cl| cl.split(' ').nth(1) == Some("__guard"))
        })
}

/// Threads of `pid`.
pub fn threads(pid: i32) -> Option<u64> {
    status_field(pid, "Threads:")
}

fn status_field(pid: i32, name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// A `MONITOR` connection counting the commands clients send, by command name.
pub struct Monitor {
    stream: TcpStream,
    reader: Option<JoinHandle<BTreeMap<String, u64>>>,
}

impl Monitor {
    /// Connects to Redis on 127.0.0.1:`port` and starts counting.
    pub fn start(port: u16) -> Result<Monitor, String> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .map_err(|e| format!("connect to redis for MONITOR: {e}"))?;
        stream
            .write_all(b"MONITOR\r\n")
            .map_err(|e| format!("send MONITOR: {e}"))?;
        let read_side = stream
            .try_clone()
            .map_err(|e| format!("clone MONITOR socket: {e}"))?;
        read_side
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| format!("MONITOR read timeout: {e}"))?;
        let mut reader = BufReader::new(read_side);
        let mut first = String::new();
        reader
            .read_line(&mut first)
            .map_err(|e| format!("read MONITOR reply: {e}"))?;
        if first.trim_end() != "+OK" {
            return Err(format!("MONITOR answered {first:?}"));
        }
        let _ = reader.get_ref().set_read_timeout(None);
        let handle = std::thread::Builder::new()
            .name("farm-bench-monitor".into())
            .spawn(move || {
                let mut counts = BTreeMap::new();
                let mut line = String::new();
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            if let Some(cmd) = client_command(&line) {
                                *counts.entry(cmd).or_insert(0) += 1;
                            }
                        }
                    }
                }
                counts
            })
            .map_err(|e| format!("spawn MONITOR reader: {e}"))?;
        Ok(Monitor {
            stream,
            reader: Some(handle),
        })
    }

    /// Stops counting; command → number of times a client sent it.
    pub fn stop(mut self) -> BTreeMap<String, u64> {
        // Redis answers QUIT then closes; shutting our side down ends the reader either way.
        let _ = self.stream.write_all(b"QUIT\r\n");
        std::thread::sleep(Duration::from_millis(50));
        let _ = self.stream.shutdown(Shutdown::Both);
        self.reader
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// The command of a `MONITOR` line sent by a client, lower case; `None` for lines of commands a Lua
/// script ran, and for anything else.
/// Line shape: `+1700000000.123456 [0 127.0.0.1:5555] "evalsha" "abc" ...` (scripts: `[0 lua]`).
pub fn client_command(line: &str) -> Option<String> {
    let rest = line.strip_prefix('+')?;
    let (_, rest) = rest.split_once(" [")?;
    let (source, rest) = rest.split_once("] ")?;
    let origin = source.split_whitespace().nth(1)?;
    if origin == "lua" {
        return None;
    }
    let cmd = rest.trim_start().strip_prefix('"')?.split('"').next()?;
    Some(cmd.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_lines_from_clients_and_scripts() {
        assert_eq!(
            client_command("+1700000000.123456 [0 127.0.0.1:5555] \"EVALSHA\" \"ab\" \"1\"\r\n"),
            Some("evalsha".into())
        );
        assert_eq!(
            client_command("+1700000000.123457 [0 lua] \"SET\" \"k\" \"v\"\r\n"),
            None
        );
        assert_eq!(
            client_command("+1700000000.1 [0 unix:/tmp/r.sock] \"ping\"\r\n"),
            Some("ping".into())
        );
        assert_eq!(client_command("+OK\r\n"), None);
    }

    #[test]
    fn own_process_has_cpu_time_and_rss() {
        let me = std::process::id() as i32;
        assert!(cpu_seconds(me).is_some());
        assert!(rss_kb(me).is_some_and(|k| k > 0));
        assert!(threads(me).is_some_and(|t| t >= 1));
    }
}
