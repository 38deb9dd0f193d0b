//! How the node runs FFmpeg: the argv (never a shell), the process group, the environment, and the
//! record a leftover of an earlier incarnation is recognised by (pid + process start time + marker,
//! checked in `/proc` by [`crate::procs`], whose [`kill_if_ours`] and [`start_time`] are re-exported
//! here for the sweep and the channel actor).
//!
//! Invariants: FFmpeg's environment holds only `PATH` and the marker (no Redis URL, no token); it
//! reads its input under a protocol whitelist; it is the leader of its own process group, so the
//! whole group can be signalled; a pid is only ever killed when its start time and marker match;
//! it reads `http`/`https` only through its channel's egress gateway (`-http_proxy`) and, in the
//! network sandbox, can open TCP connections to nothing else.

use crate::config::{Config, Profile};
use crate::sandbox::{Keeper, Sandbox};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::{Child, Command};

pub use crate::procs::{kill_if_ours, start_time, MARKER_VAR};

/// The file in a channel folder that records the running FFmpeg (`pid start_time`).
pub const OWNER_FILE: &str = ".ffmpeg.pid";

/// Protocols FFmpeg may open for an input. No `file`, `concat`, `subfile`, `data`, `pipe`: an
/// upstream (or an upstream HLS playlist) cannot make FFmpeg read local files.
pub const PROTOCOL_WHITELIST: &str = "http,https,tls,tcp,udp,rtp,rtmp,rtmps,srt,crypto,httpproxy";

/// What one FFmpeg run should do.
pub struct RunSpec<'a> {
    pub url: &'a str,
    pub dir: &'a Path,
    pub profile: &'a Profile,
    /// First media sequence number: continues after a restart so players never see it go back.
    pub start_number: u64,
    /// The owner's gen, in every segment's file name.
    pub gen: u64,
    /// The channel's egress gateway (`http://127.0.0.1:<port>`), for `http`/`https` inputs.
    pub http_proxy: Option<&'a str>,
}

/// The TCP ports FFmpeg may connect to for `url`: its gateway's for `http`/`https`, the upstream's
/// own for RTMP and plain TCP, none for UDP-based inputs.
pub fn tcp_ports(url: &str, gateway: Option<u16>) -> Vec<u16> {
    if crate::egress::proxied(&crate::egress::scheme(url)) {
        return gateway.into_iter().collect();
    }
    crate::egress::endpoint(url)
        .map(|(_, port)| vec![port])
        .unwrap_or_default()
}

/// The argv (without the program) for one run.
pub fn args(cfg: &Config, run: &RunSpec<'_>) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::with_capacity(48);
    input_args(cfg, run, &mut |s| a.push(OsString::from(s)));
    for s in &run.profile.args {
        a.push(OsString::from(s));
    }
    output_args(cfg, run, &mut |s| a.push(OsString::from(s)));
    a.push(
        run.dir
            .join(crate::playlist::segment_pattern(run.gen))
            .into_os_string(),
    );
    a.push(
        run.dir
            .join(crate::playlist::FFMPEG_PLAYLIST)
            .into_os_string(),
    );
    a
}

/// Everything up to and with `-i <url>`: logging, the whitelist, timeouts, the gateway, probing.
fn input_args(cfg: &Config, run: &RunSpec<'_>, push: &mut dyn FnMut(&str)) {
    for s in [
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "level+warning",
        "-y",
    ] {
        push(s);
    }
    push("-protocol_whitelist");
    push(PROTOCOL_WHITELIST);
    push("-rw_timeout");
    push(&cfg.read_timeout.as_micros().to_string());
    if crate::egress::proxied(&crate::egress::scheme(run.url)) {
        if let Some(proxy) = run.http_proxy {
            // Every http/https request, nested playlists, keys and redirects included, goes to
            // the gateway (the HLS demuxer passes `http_proxy` on to what it opens).
            push("-http_proxy");
            push(proxy);
        }
        for s in [
            "-reconnect",
            "1",
            "-reconnect_streamed",
            "1",
            "-reconnect_on_network_error",
            "1",
            "-reconnect_delay_max",
            "2",
        ] {
            push(s);
        }
    }
    // Probe one `probe_duration` of input instead of FFmpeg's default 5 s: the first segment of a
    // live channel comes that much sooner.
    push("-analyzeduration");
    push(&cfg.probe_duration.as_micros().to_string());
    push("-probesize");
    push("4000000");
    push("-i");
    push(run.url);
}

/// The HLS muxer's options, up to `-hls_segment_filename` (the paths follow).
fn output_args(cfg: &Config, run: &RunSpec<'_>, push: &mut dyn FnMut(&str)) {
    let hls_time = format!("{:.3}", cfg.hls_time.as_secs_f64());
    // A short first segment (cut at the first key frame after it) makes the first playlist sooner.
    let hls_init_time = format!("{:.3}", (cfg.hls_time.as_secs_f64() / 2.0).max(0.5));
    // FFmpeg's own playlist is only read by the node, which publishes the channel's playlist and
    // deletes segments as they leave it (crate::playlist); FFmpeg marks and deletes nothing.
    for s in [
        "-f",
        "hls",
        "-hls_time",
        &hls_time,
        "-hls_init_time",
        &hls_init_time,
        "-hls_list_size",
        &cfg.hls_list_size.to_string(),
        "-hls_flags",
        "temp_file",
        "-start_number",
        &run.start_number.to_string(),
        "-hls_segment_filename",
    ] {
        push(s);
    }
}

/// `setpriv` from util-linux, when installed: it sets a parent-death signal and execs FFmpeg (same
/// pid), so FFmpeg dies with the node even on SIGKILL. The start-up sweep stays the second line.
pub fn pdeathsig_wrapper() -> Option<PathBuf> {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// FFmpeg's nice value: the node and its guard (renewals, the fence) get the CPU first on a
/// machine FFmpegs keep busy.
pub const NICE: i32 = 5;

/// Spawns FFmpeg as the leader of a new process group, stdin null, stderr piped, environment
/// cleared, at [`NICE`]; through `wrapper` (setpriv) when given; in `sandbox`, able to connect to
/// `tcp_ports` only. Keep the [`Keeper`] until the child is reaped.
pub fn spawn(
    program: &Path,
    argv: &[OsString],
    dir: &Path,
    wrapper: Option<&Path>,
    sandbox: &Sandbox,
    tcp_ports: &[u16],
) -> std::io::Result<(Child, Option<Keeper>)> {
    let mut cmd = match wrapper {
        Some(w) => {
            let mut c = Command::new(w);
            c.args(["--pdeathsig", "KILL", "--"]).arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(argv)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env(MARKER_VAR, dir)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    let (child, keeper) = sandbox.spawn(tcp_ports, move || cmd.spawn())?;
    // Set before FFmpeg starts its threads (they inherit it); a failure costs only the priority.
    if let Some(pid) = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(i32::try_from(p).ok()?))
    {
        if let Err(e) = rustix::process::setpriority_process(Some(pid), NICE) {
            tracing::debug!(error = %e, "cannot lower ffmpeg's priority");
        }
    }
    Ok((child, keeper))
}

/// Sends a signal to a whole process group (the group id is the leader's pid).
pub fn signal_group(pid: u32, sig: Signal) -> nix::Result<()> {
    killpg(Pid::from_raw(pid as i32), sig)
}

/// Records the running FFmpeg in its channel folder, for the next incarnation's sweep.
pub fn write_owner_file(dir: &Path, pid: u32, start: u64) -> std::io::Result<()> {
    let tmp = dir.join(format!("{OWNER_FILE}.tmp"));
    std::fs::write(&tmp, format!("{pid} {start}\n"))?;
    std::fs::rename(tmp, dir.join(OWNER_FILE))
}

/// Reads a channel folder's FFmpeg record.
pub fn read_owner_file(dir: &Path) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(dir.join(OWNER_FILE)).ok()?;
    let mut it = text.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The folder of one channel under HLS_ROOT.
pub fn channel_dir(root: &Path, id: &str) -> PathBuf {
    root.join(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn argv_is_whitelisted_bounded_and_shell_free() {
        let cfg = Config::from_args(crate::config::Args::parse_from([
            "farm-node",
            "--node-id",
            "n1",
        ]))
        .expect("config");
        let profile = &cfg.profiles["copy"];
        let dir = Path::new("/tmp/hls/ch1");
        let argv: Vec<String> = args(
            &cfg,
            &RunSpec {
                url: "http://p/x.ts",
                dir,
                profile,
                start_number: 0,
                gen: 3,
                http_proxy: Some("http://127.0.0.1:4000"),
            },
        )
        .into_iter()
        .map(|s| s.into_string().expect("utf8"))
        .collect();
        let pos = |s: &str| argv.iter().position(|a| a == s).expect(s);
        assert_eq!(argv[pos("-protocol_whitelist") + 1], PROTOCOL_WHITELIST);
        assert!(!PROTOCOL_WHITELIST
            .split(',')
            .any(|p| p == "file" || p == "concat" || p == "subfile"));
        assert!(
            pos("-protocol_whitelist") < pos("-i"),
            "whitelist must apply to the input"
        );
        assert_eq!(argv[pos("-i") + 1], "http://p/x.ts");
        assert_eq!(argv[pos("-hls_flags") + 1], "temp_file");
        assert_eq!(
            argv[argv.len() - 2].as_str(),
            "/tmp/hls/ch1/seg_3_%d.ts",
            "the gen names every segment file"
        );
        assert_eq!(
            argv.last().map(String::as_str),
            Some("/tmp/hls/ch1/.ffmpeg.m3u8")
        );
        assert!(argv.contains(&"-reconnect".to_string()));
        assert_eq!(argv[pos("-http_proxy") + 1], "http://127.0.0.1:4000");
        assert!(pos("-http_proxy") < pos("-i"));
    }

    #[test]
    fn tcp_ports_follow_the_scheme() {
        assert_eq!(tcp_ports("https://p/x.m3u8", Some(4000)), vec![4000]);
        assert_eq!(tcp_ports("http://p:81/x.ts", Some(4000)), vec![4000]);
        assert_eq!(tcp_ports("rtmp://p/live/x", Some(4000)), vec![1935]);
        assert_eq!(tcp_ports("rtmps://p:8443/live/x", None), vec![8443]);
        assert!(tcp_ports("udp://@239.0.0.1:1234", Some(4000)).is_empty());
    }
}
