//! Sending signals to processes, without `unsafe` (the workspace denies it).

use rustix::process::{kill_process, Pid, Signal};

pub use rustix::process::Signal as Sig;

/// Sends `sig` to `pid`. Errors (ESRCH: no such process, EPERM) are returned, not panicked on.
pub fn send(pid: i32, sig: Signal) -> std::io::Result<()> {
    let pid = Pid::from_raw(pid).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid pid {pid}"),
        )
    })?;
    kill_process(pid, sig).map_err(std::io::Error::from)
}

/// SIGTERM.
pub fn term(pid: i32) -> std::io::Result<()> {
    send(pid, Signal::TERM)
}

/// SIGKILL.
pub fn kill9(pid: i32) -> std::io::Result<()> {
    send(pid, Signal::KILL)
}

/// SIGSTOP.
pub fn stop(pid: i32) -> std::io::Result<()> {
    send(pid, Signal::STOP)
}

/// SIGCONT.
pub fn cont(pid: i32) -> std::io::Result<()> {
    send(pid, Signal::CONT)
}

/// Sends `sig` to every process of the process group `pgid` (as a terminal's Ctrl-C does).
pub fn send_group(pgid: i32, sig: Signal) -> std::io::Result<()> {
    let pid = Pid::from_raw(pgid).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid process group {pgid}"),
        )
    })?;
    rustix::process::kill_process_group(pid, sig).map_err(std::io::Error::from)
}

/// SIGKILLs the process group `child` leads, then reaps it: a fixture's `Drop`.
pub fn kill_group_and_reap(child: &mut std::process::Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = send_group(pid, Signal::KILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}
