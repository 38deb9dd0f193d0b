//! What the phases share: the binaries under test, farmctl, HTTP, metrics and temp dirs.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use farm_tests::bins::bin_dir;

/// Builds the binaries the phases run (farm-node, fake-ffmpeg, farm-coordinator, farmctl) with the
/// cargo that runs this benchmark, in the same profile. Returns what could not be built; an error
/// when the essential ones are missing.
pub fn build_binaries(build: bool) -> Result<Vec<String>, String> {
    let profile_release = bin_dir().file_name().is_some_and(|n| n == "release");
    let mut warnings = Vec::new();
    if !profile_release {
        warnings.push(
            "not a release build: figures of a debug build say little (use cargo run --release)"
                .to_string(),
        );
    }
    let cargo = std::env::var_os("CARGO");
    if build {
        if let Some(cargo) = cargo {
            for (pkgs, essential) in [
                (&["farm-node", "farm-tests"][..], true),
                (&["farm-coordinator"][..], false),
            ] {
                let mut cmd = Command::new(&cargo);
                cmd.arg("build").arg("--bins");
                if profile_release {
                    cmd.arg("--release");
                }
                for p in pkgs {
                    cmd.arg("-p").arg(p);
                }
                eprintln!("farm-bench: building {} ...", pkgs.join(", "));
                let status = cmd
                    .current_dir(farm_tests::nginx::repo_root())
                    .stdin(Stdio::null())
                    .status()
                    .map_err(|e| format!("run cargo build: {e}"))?;
                if !status.success() {
                    let msg = format!("cargo build -p {} failed ({status})", pkgs.join(" -p "));
                    if essential {
                        return Err(msg);
                    }
                    warnings.push(msg);
                }
            }
        }
    }
    for name in ["farm-node", "farmctl", "fake-ffmpeg"] {
        if !bin_dir().join(name).is_file() {
            return Err(format!(
                "{name} not found in {}: build it first (cargo build{} --workspace --bins)",
                bin_dir().display(),
                if profile_release { " --release" } else { "" }
            ));
        }
    }
    Ok(warnings)
}

/// The farm-coordinator binary, when it is built.
pub fn coordinator_bin() -> Option<PathBuf> {
    let p = bin_dir().join("farm-coordinator");
    p.is_file().then_some(p)
}

/// Adds (or replaces) channels through `farmctl import` of an extended M3U (one process for all).
pub fn add_channels(redis_url: &str, channels: &[(String, String)]) -> Result<(), String> {
    let mut m3u = String::from("#EXTM3U\n");
    for (id, url) in channels {
        m3u.push_str(&format!("#EXTINF:-1 tvg-id=\"{id}\",{id}\n{url}\n"));
    }
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let path = dir.path().join("channels.m3u");
    std::fs::write(&path, m3u).map_err(|e| format!("write {}: {e}", path.display()))?;
    let path = path.to_string_lossy().into_owned();
    farmctl(redis_url, &["import", &path], "farmctl import")
}

/// Adds one channel with `farmctl channel add`.
pub fn add_channel(redis_url: &str, id: &str, url: &str) -> Result<(), String> {
    farmctl(
        redis_url,
        &["channel", "add", id, url],
        &format!("farmctl channel add {id}"),
    )
}

/// Runs farmctl; `<what> failed (<status>): <stderr>` unless it succeeds.
fn farmctl(redis_url: &str, args: &[&str], what: &str) -> Result<(), String> {
    let out = farm_tests::node::farmctl(redis_url, args);
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The bearer token the benchmark's nodes run with (their admin API stops channels between trials).
pub const ADMIN_TOKEN: &str = "farm-bench-admin-token";

/// An HTTP client that does not follow redirects.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// `(status, body)` of a GET.
pub async fn get(client: &reqwest::Client, url: &str) -> Result<(u16, Vec<u8>), String> {
    let r = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = r.status().as_u16();
    let body = r.bytes().await.map_err(|e| format!("read {url}: {e}"))?;
    Ok((status, body.to_vec()))
}

/// Stops a channel on a node through its admin API.
pub async fn admin_stop(client: &reqwest::Client, base: &str, id: &str) -> Result<(), String> {
    let url = format!("{base}/admin/streams/{id}/stop");
    let r = client
        .post(&url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    match r.status().as_u16() {
        200 | 404 => Ok(()),
        s => Err(format!("POST {url}: {s}")),
    }
}

/// Sum of the samples of a metric (any labels) in a Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let base = series.split('{').next().unwrap_or(series);
        if base == name {
            if let Ok(v) = value.parse::<f64>() {
                sum += v;
                found = true;
            }
        }
    }
    found.then_some(sum)
}

/// A node's `/metrics` text.
pub async fn node_metrics(client: &reqwest::Client, base: &str) -> Result<String, String> {
    let (status, body) = get(client, &format!("{base}/metrics")).await?;
    if status != 200 {
        return Err(format!("GET {base}/metrics: {status}"));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A temp dir named `prefix…` for what a phase starts; removed when dropped.
pub fn temp_dir(prefix: &str) -> Result<tempfile::TempDir, String> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))
}

/// Sleeps without blocking the runtime (pacing of the benchmark's own steps, not synchronisation).
pub async fn pause(d: Duration) {
    tokio::time::sleep(d).await;
}
