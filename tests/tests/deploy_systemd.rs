//! The shipped systemd units (`deploy/systemd/*.service`): `systemd-analyze verify` accepts them
//! with ExecStart pointing at the real built binaries, they carry the promised process, restart and
//! hardening settings, the node's unit clears its HLS folder's channel folders after every stop and
//! before every start (the cleanup command is run here against temp folders), and the example
//! environment files only set variables the binaries read.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

const UNITS: [(&str, &str); 2] = [
    ("farm-node.service", "farm-node"),
    ("farm-coordinator.service", "farm-coordinator"),
];

fn systemd_dir() -> PathBuf {
    farm_tests::nginx::repo_root().join("deploy/systemd")
}

/// Where the units expect the HLS cleanup script (`deploy/systemd/farm-hls-clear`).
const CLEAR: &str = "/usr/local/bin/farm-hls-clear";

/// Copies the unit into `dir` with ExecStart pointing at the binary of this build, and the cleanup
/// script at the shipped one.
fn render_unit(dir: &Path, unit: &str, bin: &str) -> PathBuf {
    let text = std::fs::read_to_string(systemd_dir().join(unit)).expect("read unit");
    let exec = format!("ExecStart=/usr/local/bin/{bin}");
    assert!(text.contains(&exec), "{unit} runs /usr/local/bin/{bin}");
    let real = farm_tests::bins::bin_path(bin);
    let path = dir.join(unit);
    let clear = systemd_dir().join("farm-hls-clear");
    std::fs::write(
        &path,
        text.replace(&exec, &format!("ExecStart={}", real.display()))
            .replace(CLEAR, &clear.display().to_string()),
    )
    .expect("write unit");
    path
}

fn verify(units: &[PathBuf]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(units)
        .output()
        .expect("run systemd-analyze (apt-get install systemd)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
fn systemd_analyze_verify_accepts_the_units() {
    let dir = tempfile::tempdir().expect("tempdir");
    let units: Vec<PathBuf> = UNITS
        .iter()
        .map(|(unit, bin)| render_unit(dir.path(), unit, bin))
        .collect();
    let (ok, complaints) = verify(&units);
    println!("systemd-analyze verify: ok={ok} {complaints:?}");
    assert!(ok && complaints.is_empty(), "{complaints}");

    // The check is strict enough to notice a mistake: a typo is reported.
    let broken = dir.path().join("broken.service");
    let text = std::fs::read_to_string(&units[0]).expect("read");
    std::fs::write(
        &broken,
        text.replace("KillMode=control-group", "KillMode=control-grup"),
    )
    .expect("write");
    let (_, complaints) = verify(&[broken]);
    println!("a typo: {complaints}");
    assert!(complaints.contains("kill mode"), "{complaints}");

    // systemd's own view of the hardening: lower is better, 10 is unprotected.
    for unit in &units {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(unit)
            .output()
            .expect("systemd-analyze security");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no exposure level for {}:\n{text}", unit.display()));
        println!("{}", line.trim());
        let level: f64 = line
            .split(':')
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("exposure level number");
        assert!(level <= 2.0, "{line}");
    }
}

/// `[section] key=value` pairs of a unit (a key may repeat).
fn directives(unit: &str) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(systemd_dir().join(unit)).expect("read unit");
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            out.push((section.clone(), k.to_string(), v.to_string()));
        }
    }
    out
}

#[test]
fn the_units_kill_the_whole_group_restart_with_a_limit_and_are_hardened() {
    for (unit, bin) in UNITS {
        let d = directives(unit);
        let get = |section: &str, key: &str| -> Vec<&str> {
            d.iter()
                .filter(|(s, k, _)| s == section && k == key)
                .map(|(_, _, v)| v.as_str())
                .collect()
        };
        let one = |section: &str, key: &str| -> String {
            let v = get(section, key);
            assert_eq!(v.len(), 1, "{unit}: [{section}] {key}: {v:?}");
            v[0].to_string()
        };
        assert_eq!(one("Service", "KillMode"), "control-group", "{unit}");
        assert_eq!(one("Service", "Restart"), "on-failure", "{unit}");
        assert!(
            one("Unit", "StartLimitIntervalSec").parse::<u64>().is_ok(),
            "{unit}"
        );
        assert!(one("Unit", "StartLimitBurst")
            .parse::<u64>()
            .is_ok_and(|n| n >= 1));
        assert_eq!(one("Service", "User"), "streamfarm", "{unit}");
        assert_eq!(
            one("Service", "EnvironmentFile"),
            format!("/etc/streamfarm/{}.env", bin.trim_start_matches("farm-")),
            "{unit}"
        );
        for (key, value) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("ProtectKernelTunables", "yes"),
            ("ProtectControlGroups", "yes"),
            ("RestrictSUIDSGID", "yes"),
            ("CapabilityBoundingSet", ""),
        ] {
            assert_eq!(one("Service", key), value, "{unit}: {key}");
        }
        let grace: u64 = one("Service", "TimeoutStopSec")
            .trim_end_matches('s')
            .parse()
            .expect("TimeoutStopSec in seconds");
        println!("{unit}: KillMode=control-group, Restart=on-failure, TimeoutStopSec={grace}s");
        if bin == "farm-node" {
            // Longer than the node's own shutdown bound (--shutdown-grace 15s), so systemd only
            // SIGKILLs what a wedged node left behind.
            assert!(grace > 15, "{unit}: TimeoutStopSec {grace}");
            assert_eq!(
                get("Service", "ReadWritePaths"),
                ["/var/lib/streamfarm/hls"]
            );
        } else {
            assert!(
                get("Service", "ReadWritePaths").is_empty(),
                "{unit} writes nothing"
            );
        }
    }
}

/// `FARM_*` names in the `[env: ...]` notes of `<bin> --help`.
fn env_vars_of(bin: &str) -> BTreeSet<String> {
    let out = Command::new(farm_tests::bins::bin_path(bin))
        .arg("--help")
        .output()
        .expect("run --help");
    let help = String::from_utf8_lossy(&out.stdout);
    help.split("[env: ")
        .skip(1)
        .filter_map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_' || c.is_ascii_digit())
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

#[test]
fn the_example_env_files_set_only_variables_the_binaries_read() {
    for (file, bin) in [
        ("node.env.example", "farm-node"),
        ("coordinator.env.example", "farm-coordinator"),
    ] {
        let known = env_vars_of(bin);
        assert!(known.contains("FARM_REDIS_URL"), "{bin} --help: {known:?}");
        let text = std::fs::read_to_string(systemd_dir().join(file)).expect("read env file");
        // Set and commented-out settings alike.
        let vars: HashMap<String, String> = text
            .lines()
            .map(|l| l.trim().trim_start_matches('#').trim())
            .filter_map(|l| l.split_once('='))
            .filter(|(k, _)| k.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        println!("{file}: {:?}", vars.keys().collect::<BTreeSet<_>>());
        for name in vars.keys() {
            assert!(
                name == "RUST_LOG" || known.contains(name),
                "{file} sets {name}, which {bin} does not read (it reads {known:?})"
            );
        }
        for needed in ["FARM_REDIS_URL", "RUST_LOG"] {
            assert!(vars.contains_key(needed), "{file} lacks {needed}");
        }
        if bin == "farm-node" {
            for needed in [
                "FARM_NODE_ID",
                "FARM_HLS_ROOT",
                "FARM_ACCEL_REDIRECT",
                "FARM_TOKEN_SECRET",
                "FARM_ACCESS_SOCKET",
            ] {
                assert!(vars.contains_key(needed), "{file} lacks {needed}");
            }
            assert_eq!(vars["FARM_HLS_ROOT"], "/var/lib/streamfarm/hls");
            assert_eq!(vars["FARM_ACCEL_REDIRECT"], "/_farm_owner");
        }
    }
}

/// Runs the unit's cleanup command (the shipped script in place of [`CLEAR`]) with `FARM_HLS_ROOT`
/// set to `root` (`None`: unset) in `cwd`; returns whether it succeeded and what it printed.
fn run_clear(command: &str, root: Option<&str>, cwd: &Path) -> (bool, String) {
    assert_eq!(
        command, CLEAR,
        "the unit runs the cleanup script with no arguments"
    );
    let mut cmd = Command::new(systemd_dir().join("farm-hls-clear"));
    cmd.current_dir(cwd)
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    if let Some(root) = root {
        cmd.env("FARM_HLS_ROOT", root);
    }
    let out = cmd.output().expect("run farm-hls-clear");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("FARM_HLS_ROOT={root:?}: {}", text.trim());
    (out.status.success(), text)
}

/// Every file and folder under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            out.push(
                p.strip_prefix(dir)
                    .expect("under dir")
                    .display()
                    .to_string(),
            );
            if p.is_dir() && !p.is_symlink() {
                todo.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_node_unit_removes_channel_folders_after_every_stop_and_before_every_start() {
    let d = directives("farm-node.service");
    let get = |key: &str| -> Vec<&str> {
        d.iter()
            .filter(|(s, k, _)| s == "Service" && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    };
    // After every stop (a crash or kill -9 included: systemd kills the rest of the cgroup first)
    // and before every start.
    assert_eq!(get("ExecStopPost"), [CLEAR]);
    assert_eq!(get("ExecStartPre"), [CLEAR]);
    // The folder it clears is the one the node writes: the node's default, set in the unit, and the
    // only folder the unit lets the node (and the script) write.
    assert_eq!(
        get("Environment"),
        ["FARM_HLS_ROOT=/var/lib/streamfarm/hls"]
    );
    assert_eq!(get("ReadWritePaths"), ["/var/lib/streamfarm/hls"]);
    let script = systemd_dir().join("farm-hls-clear");
    let mode = std::fs::metadata(&script)
        .expect("the script ships")
        .permissions();
    assert!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o111 != 0,
        "farm-hls-clear is executable"
    );

    // A node's folder after a kill -9: channel folders (segments, playlist, the FFmpeg owner file),
    // plus things that are not channel folders and must stay.
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("hls");
    let outside = tmp.path().join("outside");
    for dir in [
        "demo",
        "news-2_HD",
        "lost+found",
        ".hidden",
        &"x".repeat(65),
    ] {
        std::fs::create_dir_all(root.join(dir)).expect("mkdir");
    }
    for file in [
        "demo/index.m3u8",
        "demo/seg_41.ts",
        "demo/.ffmpeg.pid",
        "news-2_HD/seg_7.ts",
        "lost+found/keep",
        ".hidden/keep",
        "notes",
    ] {
        std::fs::write(root.join(file), "x").expect("write");
    }
    std::fs::create_dir_all(&outside).expect("mkdir");
    std::fs::write(outside.join("keep"), "x").expect("write");
    std::os::unix::fs::symlink(&outside, root.join("linked")).expect("symlink");
    let cmd = get("ExecStopPost")[0];
    let (ok, said) = run_clear(cmd, Some(&root.display().to_string()), tmp.path());
    assert!(ok, "{said}");
    assert!(said.contains("removed 3 channel folder(s)"), "{said}");
    assert!(root.is_dir(), "the HLS folder itself stays");
    assert_eq!(
        tree(&root),
        [
            ".hidden",
            ".hidden/keep",
            "lost+found",
            "lost+found/keep",
            "notes",
            &"x".repeat(65)
        ],
        "channel folders (and the symlink) gone, the rest untouched"
    );
    assert_eq!(
        tree(&outside),
        ["keep"],
        "a symlink's target is not followed"
    );

    // Empty, unset or relative: nothing is removed anywhere (not in the working directory either),
    // and the unit still starts. A missing folder is nothing to do.
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir_all(cwd.join("hls/demo")).expect("mkdir");
    std::fs::create_dir_all(cwd.join("demo")).expect("mkdir");
    for root in [Some(""), None, Some("hls"), Some("./hls")] {
        let (ok, said) = run_clear(cmd, root, &cwd);
        assert!(ok && said.contains("nothing removed"), "{root:?}: {said}");
        assert_eq!(tree(&cwd), ["demo", "hls", "hls/demo"], "{root:?}");
    }
    let missing = tmp.path().join("missing").display().to_string();
    let (ok, said) = run_clear(cmd, Some(&missing), &cwd);
    assert!(ok && said.contains("does not exist"), "{said}");
    assert!(!tmp.path().join("missing").exists());
}
