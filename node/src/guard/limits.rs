//! What one channel may cost the node: the caps its egress gateway applies to upstreams (sent to
//! the guard, see [`crate::egress::Limits`]) and each FFmpeg's own memory and CPU, set by the node
//! the moment it spawns one ([`super::Guard::track`]), before FFmpeg has read a byte of input.
//!
//! - Memory: `RLIMIT_DATA` (heap, anonymous mappings, thread stacks: what a hostile input makes a
//!   demuxer allocate; address space reserved but not writable does not count, so it does not
//!   trip on glibc's per-thread arenas as `RLIMIT_AS` would) and `RLIMIT_CORE` 0 (a crash dumps
//!   no upstream credentials to disk), with `prlimit(2)` on the new pid: no code runs between
//!   fork and exec (the workspace forbids `unsafe`, so no `pre_exec`), and a limit set on a
//!   process is kept across its `exec` (setpriv → FFmpeg).
//! - CPU: a cgroup v2 leaf per FFmpeg with `cpu.max` (and `memory.max`, which also bounds its page
//!   cache), when the node runs in a cgroup delegated to it (systemd `Delegate=yes`: the unit's
//!   cgroup is marked `trusted.delegate`/`user.delegate`, or owned by the node's non-root user).
//!   The node then moves itself (and so its guard) into `<its cgroup>/node` and puts FFmpegs in
//!   `<its cgroup>/ffmpeg/<channel>-<pid>` (cgroup v2 lets only leaves hold processes once
//!   controllers are enabled for children). Anywhere else FFmpeg runs at nice
//!   [`crate::ffmpeg::NICE`] and nothing bounds its CPU rate: `RLIMIT_CPU` counts CPU seconds
//!   over a whole life, so it would kill a healthy channel after some hours and is not used. What
//!   an upstream can make FFmpeg do is still bounded by the gateway's caps (request rate,
//!   bandwidth, head size) and the empty-run rule.

use crate::config::Config;
use std::io;
use std::path::{Path, PathBuf};

/// Everything the node bounds per channel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub gateway: crate::egress::Limits,
    pub ffmpeg: FfmpegLimits,
}

impl Limits {
    pub fn from_config(cfg: &Config) -> Limits {
        Limits {
            gateway: crate::egress::Limits::new(cfg.egress_bandwidth, cfg.egress_rate),
            ffmpeg: FfmpegLimits {
                memory: cfg.ffmpeg_memory,
                cpu: cfg.ffmpeg_cpu,
            },
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            gateway: crate::egress::Limits::default(),
            ffmpeg: FfmpegLimits {
                memory: 2 << 30,
                cpu: 2.0,
            },
        }
    }
}

/// One FFmpeg's bounds; 0 is none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FfmpegLimits {
    /// Bytes (`RLIMIT_DATA`, and `memory.max` in a cgroup).
    pub memory: u64,
    /// Cores (`cpu.max` in a cgroup).
    pub cpu: f64,
}

/// Sets FFmpeg's rlimits on the running process `pid` (soft and hard: FFmpeg cannot raise them).
pub fn set_rlimits(pid: u32, limits: &FfmpegLimits) -> io::Result<()> {
    use rustix::process::{prlimit, Resource, Rlimit};
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::other("bad pid"))?;
    let exactly = |v: u64| Rlimit {
        current: Some(v),
        maximum: Some(v),
    };
    prlimit(Some(pid), Resource::Core, exactly(0))?;
    if limits.memory > 0 {
        prlimit(Some(pid), Resource::Data, exactly(limits.memory))?;
    }
    Ok(())
}

/// The cgroup v2 subtree the node manages for its FFmpegs.
#[derive(Debug, Clone)]
pub struct Cgroups {
    /// `<node cgroup>/ffmpeg`.
    ffmpeg: PathBuf,
}

/// cgroup v2's default `cpu.max` period, µs.
const CPU_PERIOD: u64 = 100_000;

impl Cgroups {
    /// Takes over the node's own cgroup when it may (see the module docs); the reason when not.
    pub fn detect(limits: &FfmpegLimits) -> Result<Cgroups, String> {
        if limits.cpu <= 0.0 && limits.memory == 0 {
            return Err("no CPU or memory limit is set".into());
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let mount = cgroup2_mount(&mountinfo).ok_or("no cgroup v2 file system is mounted")?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("this process is in no cgroup v2")?;
        let rel = path.trim().trim_start_matches('/');
        if rel.is_empty() {
            return Err("the node runs in the root cgroup".into());
        }
        let dir = mount.join(rel);
        if !delegated(&dir) {
            return Err(format!(
                "{} is not delegated to the node (systemd: Delegate=yes)",
                dir.display()
            ));
        }
        Cgroups::take_over(&dir, std::process::id(), limits)
    }

    /// Sets up `<dir>/node` (where the node and its guard run) and `<dir>/ffmpeg`, with the
    /// controllers the limits need enabled for FFmpegs' leaves.
    fn take_over(dir: &Path, me: u32, limits: &FfmpegLimits) -> Result<Cgroups, String> {
        let at = |p: &Path, e: io::Error| format!("{}: {e}", p.display());
        let available = std::fs::read_to_string(dir.join("cgroup.controllers"))
            .map_err(|e| at(&dir.join("cgroup.controllers"), e))?;
        let has = |c: &str| available.split_whitespace().any(|a| a == c);
        let mut want = Vec::new();
        if limits.cpu > 0.0 {
            want.push("cpu");
        }
        if limits.memory > 0 {
            want.push("memory");
        }
        if let Some(missing) = want.iter().find(|c| !has(c)) {
            return Err(format!(
                "the {missing} controller is not available in {}",
                dir.display()
            ));
        }
        // Only leaves hold processes once controllers are enabled for children: the node's own
        // processes (itself, nothing else started yet) move to a leaf of their own first.
        let node = dir.join("node");
        mkdir(&node).map_err(|e| at(&node, e))?;
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let mut pids: Vec<u32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if !pids.contains(&me) {
            pids.push(me);
        }
        for pid in pids {
            std::fs::write(node.join("cgroup.procs"), pid.to_string())
                .map_err(|e| at(&node.join("cgroup.procs"), e))?;
        }
        let enable = want
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        std::fs::write(dir.join("cgroup.subtree_control"), &enable)
            .map_err(|e| at(&dir.join("cgroup.subtree_control"), e))?;
        let ffmpeg = dir.join("ffmpeg");
        mkdir(&ffmpeg).map_err(|e| at(&ffmpeg, e))?;
        std::fs::write(ffmpeg.join("cgroup.subtree_control"), &enable)
            .map_err(|e| at(&ffmpeg.join("cgroup.subtree_control"), e))?;
        // Leaves of an earlier incarnation (their FFmpegs are gone or swept): empty ones go.
        if let Ok(rd) = std::fs::read_dir(&ffmpeg) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        Ok(Cgroups { ffmpeg })
    }

    /// Puts `pid` in a leaf of its own with the limits; the leaf (remove it with
    /// [`Cgroups::release`] once the process is reaped).
    pub fn place(&self, pid: u32, channel: &str, limits: &FfmpegLimits) -> io::Result<PathBuf> {
        let leaf = self.ffmpeg.join(format!("{channel}-{pid}"));
        mkdir(&leaf)?;
        let set = || -> io::Result<()> {
            if limits.cpu > 0.0 {
                let quota = ((limits.cpu * CPU_PERIOD as f64) as u64).max(1_000);
                std::fs::write(leaf.join("cpu.max"), format!("{quota} {CPU_PERIOD}"))?;
            }
            if limits.memory > 0 {
                std::fs::write(leaf.join("memory.max"), limits.memory.to_string())?;
            }
            std::fs::write(leaf.join("cgroup.procs"), pid.to_string())
        };
        match set() {
            Ok(()) => Ok(leaf),
            Err(e) => {
                let _ = std::fs::remove_dir(&leaf);
                Err(e)
            }
        }
    }

    /// Removes a leaf whose process is gone.
    pub fn release(leaf: &Path) {
        if let Err(e) = std::fs::remove_dir(leaf) {
            tracing::debug!(leaf = %leaf.display(), error = %e, "cannot remove an ffmpeg cgroup");
        }
    }
}

fn mkdir(p: &Path) -> io::Result<()> {
    match std::fs::create_dir(p) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// Where the cgroup v2 file system is mounted, from `/proc/self/mountinfo` (field 5 is the mount
/// point; the file system type follows the ` - ` separator).
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// Whether the cgroup `dir` was handed to this process to manage: systemd marks a delegated
/// cgroup with an extended attribute, and gives a non-root service user the directory.
fn delegated(dir: &Path) -> bool {
    let marked = ["trusted.delegate", "user.delegate"].iter().any(|name| {
        let mut buf = [0u8; 8];
        rustix::fs::getxattr(dir, *name, &mut buf[..]).is_ok_and(|n| buf[..n] == *b"1")
    });
    let euid = rustix::process::geteuid().as_raw();
    let owned = std::os::unix::fs::MetadataExt::uid(&match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(_) => return false,
    }) == euid;
    marked || (owned && euid != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rlimits_are_set_on_a_running_process_and_seen_in_proc() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let l = FfmpegLimits {
            memory: 300 << 20,
            cpu: 0.0,
        };
        set_rlimits(child.id(), &l).expect("prlimit on a child");
        let limits =
            std::fs::read_to_string(format!("/proc/{}/limits", child.id())).expect("limits");
        let line = |name: &str| {
            limits
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("{name} in {limits}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            line("Max data size"),
            "Max data size 314572800 314572800 bytes"
        );
        assert_eq!(line("Max core file size"), "Max core file size 0 0 bytes");
        let _ = child.kill();
        let _ = child.wait();
        assert!(set_rlimits(0, &l).is_err());
    }

    #[test]
    fn the_cgroup2_mount_is_found_in_mountinfo() {
        let info = "24 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n\
                    35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(info), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_mount("garbage\n\n1 2 - \n"), None);
        let hybrid = "40 30 0:35 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    /// The file writes of a take-over and a placement, on a directory laid out like cgroupfs (the
    /// kernel side needs a delegated cgroup v2 with the cpu and memory controllers).
    #[test]
    fn a_delegated_cgroup_gets_a_node_leaf_and_a_limited_leaf_per_ffmpeg() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let l = FfmpegLimits {
            memory: 1 << 30,
            cpu: 1.5,
        };
        std::fs::write(dir.join("cgroup.controllers"), "cpuset io pids\n").expect("write");
        let e = Cgroups::take_over(dir, 4242, &l).expect_err("no cpu controller");
        assert!(e.contains("cpu controller"), "{e}");
        std::fs::write(dir.join("cgroup.controllers"), "cpu io memory pids\n").expect("write");
        std::fs::write(dir.join("cgroup.procs"), "").expect("write");
        std::fs::create_dir_all(dir.join("ffmpeg/old-1")).expect("leftover leaf");
        let cg = Cgroups::take_over(dir, 4242, &l).expect("take over");
        let read = |p: &str| std::fs::read_to_string(dir.join(p)).expect(p);
        assert_eq!(read("node/cgroup.procs"), "4242");
        assert_eq!(read("cgroup.subtree_control"), "+cpu +memory");
        assert_eq!(read("ffmpeg/cgroup.subtree_control"), "+cpu +memory");
        assert!(!dir.join("ffmpeg/old-1").exists(), "empty leftover removed");
        let leaf = cg.place(777, "ch1", &l).expect("place");
        assert_eq!(leaf, dir.join("ffmpeg/ch1-777"));
        assert_eq!(read("ffmpeg/ch1-777/cpu.max"), "150000 100000");
        assert_eq!(read("ffmpeg/ch1-777/memory.max"), "1073741824");
        assert_eq!(read("ffmpeg/ch1-777/cgroup.procs"), "777");
        // On cgroupfs the kernel's files vanish with the leaf; here they are plain files.
        for f in ["cpu.max", "memory.max", "cgroup.procs"] {
            std::fs::remove_file(leaf.join(f)).expect("rm");
        }
        Cgroups::release(&leaf);
        assert!(!leaf.exists());
        // Not delegated: a temp dir owned by root (or by this user, as root) is not a cgroup of ours.
        if rustix::process::geteuid().is_root() {
            assert!(!delegated(dir));
        }
    }
}
