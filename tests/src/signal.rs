//! Sending signals to processes, without `unsafe` (the workspace denies it).

use rustix::process::{kill_process, Pid, Signal};

pub use rustix::process::Signal as Sig;

/// `raw` as a [`Pid`]; an error naming `what` when it is not one (0 or negative).
fn valid(raw: i32, what: &str) -> std::io::Result<Pid> {
    Pid::from_raw(raw).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid {what} {raw}"),
        )
    })
}

/// Sends `sig` to `pid`. Errors (ESRCH: no such process, EPERM) are returned, not panicked on.
pub fn send(pid: i32, sig: Signal) -> std::io::Result<()> {
    kill_process(valid(pid, "pid")?, sig).map_err(std::io::Error::from)
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
    rustix::process::kill_process_group(valid(pgid, "process group")?, sig)
        .map_err(std::io::Error::from)
}

/// SIGKILLs the process group `child` leads, then reaps it: a fixture's `Drop`.
pub fn kill_group_and_reap(child: &mut std::process::Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = send_group(pid, Signal::KILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGTERM to `child`, up to `grace` for it to exit, then SIGKILL to the process group it leads
/// (its workers may not outlive it); always reaped.
pub fn term_then_kill_group(child: &mut std::process::Child, grace: std::time::Duration) {
    let Ok(pid) = i32::try_from(child.id()) else {
        let _ = child.kill();
        let _ = child.wait();
        return;
    };
    let _ = term(pid);
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    kill_group_and_reap(child);
}
