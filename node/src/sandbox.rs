//! The FFmpeg network sandbox: Landlock (Linux ≥ 6.7, ABI 4) limits the TCP ports FFmpeg may
//! connect to (its egress gateway's, or the RTMP/TCP upstream's own) and forbids TCP binds.
//!
//! Landlock restricts the calling thread and what it starts, never the node: each spawn runs on a
//! fresh, short-lived thread that restricts itself and then forks FFmpeg, which inherits the
//! restriction (and `no_new_privs`) for life. The rest of the node is untouched.
//!
//! Modes: `auto` enforces it where the kernel can and says so once at start-up where it cannot;
//! `require` refuses to start the node without it; `off` never applies it.

use landlock::{
    AccessNet, CompatLevel, Compatible, NetPort, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, ABI,
};
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    Require,
    Off,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Mode::Auto),
            "require" => Ok(Mode::Require),
            "off" => Ok(Mode::Off),
            other => Err(format!(
                "invalid ffmpeg sandbox mode {other:?}: use auto, require or off"
            )),
        }
    }
}

/// Whether spawns are sandboxed, decided once at start-up.
#[derive(Debug, Clone, Copy)]
pub struct Sandbox {
    enforced: bool,
}

/// Restricts the calling thread: TCP connects only to `ports`, no TCP bind.
fn restrict_thread(ports: &[u16]) -> Result<RulesetStatus, String> {
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)
        .and_then(|r| r.create())
        .and_then(|r| {
            r.add_rules(
                ports
                    .iter()
                    .map(|p| Ok(NetPort::new(*p, AccessNet::ConnectTcp))),
            )
        })
        .and_then(|r| r.restrict_self())
        .map_err(|e| format!("landlock: {e}"))?;
    Ok(status.ruleset)
}

impl Sandbox {
    /// Finds out whether this kernel enforces Landlock's TCP rules, on a throwaway thread.
    pub fn probe(mode: Mode) -> Result<Sandbox, String> {
        if mode == Mode::Off {
            return Ok(Sandbox { enforced: false });
        }
        let probe = std::thread::spawn(|| restrict_thread(&[]))
            .join()
            .map_err(|_| "landlock probe thread panicked".to_string())?;
        match (probe, mode) {
            (Ok(RulesetStatus::FullyEnforced), _) => Ok(Sandbox { enforced: true }),
            (other, Mode::Require) => Err(format!(
                "--ffmpeg-sandbox require: this kernel cannot limit FFmpeg's TCP connections \
                 (Landlock ABI {} or later needed, Linux 6.7): {}",
                ABI::V4 as u32,
                match other {
                    Ok(s) => format!("{s:?}"),
                    Err(e) => e,
                }
            )),
            (other, _) => {
                tracing::warn!(
                    result = ?other,
                    "FFmpeg runs without the network sandbox: this kernel has no Landlock TCP \
                     rules (Linux 6.7+). The egress gateway still decides every http/https \
                     request, but an upstream playlist naming an `httpproxy:` URL reaches FFmpeg's \
                     own TCP; use --ffmpeg-sandbox require where that matters"
                );
                Ok(Sandbox { enforced: false })
            }
        }
    }

    pub fn enforced(&self) -> bool {
        self.enforced
    }

    /// Runs `spawn` on a thread restricted to TCP connects to `ports` (unrestricted when the
    /// sandbox is not enforced). The caller must be inside a Tokio runtime: the thread enters it,
    /// so a `tokio::process::Command` can be spawned there.
    ///
    /// The thread then stays, parked, until the returned [`Keeper`] is dropped: a parent-death
    /// signal (setpriv's `--pdeathsig`) fires when the *thread* that forked the child ends, so it
    /// must live exactly as long as the child's supervision, and die with the node.
    pub fn spawn<T: Send + 'static>(
        &self,
        ports: &[u16],
        spawn: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<(T, Option<Keeper>)> {
        if !self.enforced {
            return spawn().map(|t| (t, None));
        }
        let handle = tokio::runtime::Handle::current();
        let ports = ports.to_vec();
        let (result_tx, result_rx) = std::sync::mpsc::sync_channel(1);
        let (keep_tx, keep_rx) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("ffmpeg-spawn".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let spawned = {
                    let _rt = handle.enter();
                    match restrict_thread(&ports) {
                        Ok(RulesetStatus::FullyEnforced) => spawn(),
                        Ok(other) => Err(std::io::Error::other(format!(
                            "network sandbox not enforced ({other:?})"
                        ))),
                        Err(e) => Err(std::io::Error::other(e)),
                    }
                };
                let ok = spawned.is_ok();
                let _ = result_tx.send(spawned);
                if ok {
                    // Returns when the Keeper is dropped.
                    let _ = keep_rx.recv();
                }
            })?;
        let t = result_rx
            .recv()
            .map_err(|_| std::io::Error::other("sandbox spawn thread ended without a result"))??;
        Ok((t, Some(Keeper { _tx: keep_tx })))
    }
}

/// Keeps a sandboxed child's spawning thread alive; dropping it lets the thread end.
#[derive(Debug)]
pub struct Keeper {
    _tx: std::sync::mpsc::Sender<()>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::process::Stdio;

    /// bash's `/dev/tcp` connects to a port and exits 0, or fails.
    async fn connects(sandbox: &Sandbox, allowed: &[u16], port: u16) -> bool {
        let (mut child, _keeper) = sandbox
            .spawn(allowed, move || {
                tokio::process::Command::new("bash")
                    .args(["-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{port}")])
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
            })
            .expect("spawn bash");
        child.wait().await.expect("wait").success()
    }

    #[tokio::test]
    async fn a_sandboxed_child_connects_only_to_its_ports_and_the_node_is_untouched() {
        let sandbox = Sandbox::probe(Mode::Require).expect(
            "this machine's kernel must enforce Landlock TCP rules (the suite runs on Linux 6.7+)",
        );
        let a = TcpListener::bind("127.0.0.1:0").expect("bind");
        let b = TcpListener::bind("127.0.0.1:0").expect("bind");
        let (pa, pb) = (
            a.local_addr().expect("addr").port(),
            b.local_addr().expect("addr").port(),
        );
        assert!(connects(&sandbox, &[pa], pa).await, "allowed port refused");
        assert!(!connects(&sandbox, &[pa], pb).await, "other port reached");
        assert!(
            !connects(&sandbox, &[], pa).await,
            "no port allowed, still reached"
        );
        // The calling (node) thread and an unsandboxed child are not restricted.
        assert!(std::net::TcpStream::connect(("127.0.0.1", pb)).is_ok());
        let off = Sandbox::probe(Mode::Off).expect("off");
        assert!(!off.enforced());
        assert!(connects(&off, &[], pb).await);
    }

    #[test]
    fn modes_parse_with_a_sentence_for_bad_ones() {
        assert_eq!("AUTO".parse::<Mode>(), Ok(Mode::Auto));
        assert_eq!("require".parse::<Mode>(), Ok(Mode::Require));
        assert!("maybe"
            .parse::<Mode>()
            .expect_err("bad")
            .contains("auto, require or off"));
    }
}
