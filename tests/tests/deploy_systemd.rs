//! The shipped systemd units (`deploy/systemd/*.service`): `systemd-analyze verify` accepts them
//! with ExecStart pointing at the real built binaries, they carry the promised process, restart and
//! hardening settings, and the example environment files only set variables the binaries read.

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

/// Copies the unit into `dir` with ExecStart pointing at the binary of this build.
fn render_unit(dir: &Path, unit: &str, bin: &str) -> PathBuf {
    let text = std::fs::read_to_string(systemd_dir().join(unit)).expect("read unit");
    let exec = format!("ExecStart=/usr/local/bin/{bin}");
    assert!(text.contains(&exec), "{unit} runs /usr/local/bin/{bin}");
    let real = farm_tests::bins::bin_path(bin);
    let path = dir.join(unit);
    std::fs::write(
        &path,
        text.replace(&exec, &format!("ExecStart={}", real.display())),
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
