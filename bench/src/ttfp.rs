//! Time to first playlist: through the node vs raw FFmpeg with the same input and arguments.
//!
//! Input: the fake IPTV provider's real-time MPEG-TS (H.264/AAC, 1 s GOP), a fresh path per run so
//! each run starts at the same point of the source with the same initial burst. Output: `hls_time`
//! 2 s (the node's default).
//!
//! A warm-up start through the node (not counted) also captures the node's exact FFmpeg argv from
//! `/proc/<pid>/cmdline`; the anchor runs that argv itself (input URL and output folder swapped, and
//! without `-http_proxy`: raw FFmpeg reads the provider directly, so the node's figure includes its
//! egress gateway), in
//! a new process group with a cleared environment like the node does, and is timed from spawn until
//! its output playlist appears (the node's FFmpeg writes its own `.ffmpeg.m3u8` when the first
//! segment is complete; the node answers when its composed playlist lists one). A third run uses
//! FFmpeg's default probing (a plain `-c copy` HLS argv) to show what probing costs. Each trial
//! runs the three one after the other, the order rotating.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::phase::Settings;
use crate::report::{num, percentile, Figure, Goal, PhaseOutput};
use crate::util::{add_channel, admin_stop, get, http, ADMIN_TOKEN};
use farm_tests::node::{NodeOpts, NodeProcess};
use farm_tests::provider::FakeProvider;
use farm_tests::redis::RedisServer;
use farm_tests::signal;

/// The node's default segment length, which the figures are relative to.
const HLS_TIME_S: f64 = 2.0;
/// Upper bound of one start.
const START_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Node,
    SameArgv,
    DefaultProbe,
}

pub async fn run(s: &Settings) -> Result<PhaseOutput, String> {
    let farm = TtfpFarm::start().await?;
    let warm = farm.warm_up().await?;
    let mut runs = Runs::default();
    let kinds = [Kind::Node, Kind::SameArgv, Kind::DefaultProbe];
    for i in 0..s.ttfp_trials {
        let mut order = kinds;
        order.rotate_left(i % 3);
        let (mut n, mut a) = (None, None);
        for kind in order {
            match kind {
                Kind::Node => {
                    let took = farm.start_through_node(i).await?;
                    runs.node_s.push(took);
                    n = Some(took);
                }
                Kind::SameArgv => {
                    let dir = farm.anchor_root.join(format!("s{i}"));
                    let input = farm.provider.url(&format!("/ttfp/s{i}.ts"));
                    let args = swap(&warm.argv, &warm.dir, &dir, &input)?;
                    let took = raw_ffmpeg(&args, &dir).await?;
                    runs.same_s.push(took);
                    a = Some(took);
                }
                Kind::DefaultProbe => {
                    let dir = farm.anchor_root.join(format!("d{i}"));
                    let args = default_argv(&dir, &farm.provider.url(&format!("/ttfp/d{i}.ts")));
                    runs.default_s.push(raw_ffmpeg(&args, &dir).await?);
                }
            }
        }
        if let (Some(n), Some(a)) = (n, a) {
            runs.diffs_ms.push((n - a) * 1000.0);
        }
    }
    drop(farm);
    Ok(report(&runs, &warm.argv_text()))
}

/// Redis, the fake provider and one node (admin token, 30 s start timeout); raw FFmpeg writes under
/// `anchor_root`. Fields drop in this order: the node first, Redis last.
struct TtfpFarm {
    _node: NodeProcess,
    client: reqwest::Client,
    base: String,
    node_root: PathBuf,
    anchor_root: PathBuf,
    provider: FakeProvider,
    _root: tempfile::TempDir,
    redis: RedisServer,
}

/// The node's FFmpeg argv, captured on the warm-up start, and the folder it wrote to.
struct Warm {
    argv: Vec<OsString>,
    dir: PathBuf,
}

impl Warm {
    fn argv_text(&self) -> String {
        self.argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl TtfpFarm {
    async fn start() -> Result<TtfpFarm, String> {
        let redis = RedisServer::start();
        let provider = FakeProvider::start().await;
        let root = crate::util::temp_dir("farm-bench-ttfp-")?;
        let node_root = root.path().join("n1");
        let anchor_root = root.path().join("raw");
        std::fs::create_dir_all(&anchor_root).map_err(|e| format!("create anchor dir: {e}"))?;
        let node = NodeProcess::spawn(NodeOpts::new("bench-n1", redis.url(), &node_root).args([
            "--admin-token",
            ADMIN_TOKEN,
            "--start-timeout",
            "30s",
        ]));
        Ok(TtfpFarm {
            base: node.base_url(),
            _node: node,
            client: http(),
            node_root,
            anchor_root,
            provider,
            _root: root,
            redis,
        })
    }

    /// Warm-up start through the node (not counted), capturing its FFmpeg argv.
    async fn warm_up(&self) -> Result<Warm, String> {
        let (client, base) = (&self.client, &self.base);
        add_channel(
            &self.redis.url(),
            "warm",
            &self.provider.url("/ttfp/warm.ts"),
        )?;
        let (st, body) = get(client, &format!("{base}/live/warm/index.m3u8")).await?;
        if st != 200 {
            return Err(format!(
                "warm-up start through the node: {st}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        let pid = stream_pid(&self.redis, "warm").await?;
        let argv = cmdline(pid)?;
        let dir = self.node_root.join("warm");
        admin_stop(client, base, "warm").await?;
        Ok(Warm { argv, dir })
    }

    /// Trial `i` through the node: the first playlist request of a new channel, timed; the channel
    /// is stopped again.
    async fn start_through_node(&self, i: usize) -> Result<f64, String> {
        let (client, base) = (&self.client, &self.base);
        let id = format!("t{i}");
        add_channel(
            &self.redis.url(),
            &id,
            &self.provider.url(&format!("/ttfp/n{i}.ts")),
        )?;
        let t0 = Instant::now();
        let (st, body) = get(client, &format!("{base}/live/{id}/index.m3u8")).await?;
        let took = t0.elapsed().as_secs_f64();
        admin_stop(client, base, &id).await?;
        if st != 200 {
            return Err(format!(
                "trial {i}: node answered {st}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        Ok(took)
    }
}

/// Seconds to the first playlist of every start, per kind, and the paired node - same-argv
/// differences.
#[derive(Debug, Default)]
struct Runs {
    node_s: Vec<f64>,
    same_s: Vec<f64>,
    default_s: Vec<f64>,
    diffs_ms: Vec<f64>,
}

/// The runs, the overhead's p50 and p99, and the node's start against `hls_time`.
fn report(runs: &Runs, node_args_text: &str) -> PhaseOutput {
    let Runs {
        node_s,
        same_s,
        default_s,
        diffs_ms,
    } = runs;
    let mut out = PhaseOutput::default();
    out.set(
        "runs",
        json!({
            "node_s": node_s,
            "raw_same_argv_s": same_s,
            "raw_default_probe_s": default_s,
            "overhead_ms": diffs_ms,
            "node_argv": node_args_text,
            "hls_time_s": HLS_TIME_S,
        }),
    );
    let med = |v: &[f64]| percentile(v, 50.0).unwrap_or(f64::NAN);
    let trials = format!("{} trials", diffs_ms.len());
    for (name, p) in [
        ("ttfp_overhead_ms_p50", 50.0),
        ("ttfp_overhead_ms_p99", 99.0),
    ] {
        let goal = if p < 60.0 {
            Goal::AtMost(30.0)
        } else {
            Goal::AtMost(100.0)
        };
        let mut f = Figure::new(name, "ms", goal).detail(format!(
            "node p{p:.0} {} s vs raw ffmpeg with the node's argv p{p:.0} {} s, paired per trial; {trials}",
            num(percentile(node_s, p).unwrap_or(f64::NAN)),
            num(percentile(same_s, p).unwrap_or(f64::NAN)),
        ));
        if let Some(v) = percentile(diffs_ms, p) {
            f = f.value(v);
        }
        out.fig(f);
    }
    out.fig(
        Figure::new("ttfp_ts_over_hls_time", "ratio", Goal::AtMost(0.75))
            .value(med(node_s) / HLS_TIME_S)
            .detail(format!(
                "node p50 {} s / hls_time 2 s; raw ffmpeg, node's argv {} s ({}); raw ffmpeg, default probing {} s ({}); {trials}",
                num(med(node_s)),
                num(med(same_s)),
                num(med(same_s) / HLS_TIME_S),
                num(med(default_s)),
                num(med(default_s) / HLS_TIME_S),
            )),
    );
    out
}

/// The FFmpeg pid in the channel's stream hash.
async fn stream_pid(redis: &RedisServer, id: &str) -> Result<i32, String> {
    let mut c = redis.conn().await;
    let pid: Option<String> = redis::cmd("HGET")
        .arg(farm_proto::Keys::new("farm").stream(id))
        .arg("pid")
        .query_async(&mut c)
        .await
        .map_err(|e| format!("HGET stream pid: {e}"))?;
    pid.and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("no pid in farm:stream:{id}"))
}

/// A process's argv, exactly (NUL-separated in `/proc/<pid>/cmdline`).
fn cmdline(pid: i32) -> Result<Vec<OsString>, String> {
    use std::os::unix::ffi::OsStrExt;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map_err(|e| format!("read /proc/{pid}/cmdline: {e}"))?;
    let args: Vec<OsString> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| std::ffi::OsStr::from_bytes(a).to_os_string())
        .collect();
    if args.len() < 4 {
        return Err(format!(
            "ffmpeg {pid} has an unexpected command line: {args:?}"
        ));
    }
    Ok(args)
}

/// The node's argv with another input URL and output folder, reading the input directly (the
/// node's `-http_proxy` is its channel's egress gateway).
fn swap(
    argv: &[OsString],
    from_dir: &Path,
    to_dir: &Path,
    url: &str,
) -> Result<Vec<OsString>, String> {
    let from = from_dir.to_string_lossy().into_owned();
    let to = to_dir.to_string_lossy().into_owned();
    let mut out = Vec::with_capacity(argv.len());
    let mut next_is_input = false;
    let mut swapped_input = false;
    let mut skip_next = false;
    for a in argv {
        let s = a.to_string_lossy();
        if std::mem::take(&mut skip_next) {
            continue;
        }
        if s == "-http_proxy" {
            skip_next = true;
            continue;
        }
        if next_is_input {
            out.push(OsString::from(url));
            next_is_input = false;
            swapped_input = true;
            continue;
        }
        next_is_input = s == "-i";
        if let Some(rest) = s.strip_prefix(from.as_str()) {
            out.push(OsString::from(format!("{to}{rest}")));
        } else {
            out.push(a.clone());
        }
    }
    if !swapped_input {
        return Err("the node's ffmpeg argv has no -i".into());
    }
    Ok(out)
}

/// FFmpeg with its default probing: the copy profile into HLS, nothing else.
fn default_argv(dir: &Path, url: &str) -> Vec<OsString> {
    let d = dir.to_string_lossy();
    [
        "ffmpeg",
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "error",
        "-i",
        url,
        "-map",
        "0:v:0?",
        "-map",
        "0:a:0?",
        "-c",
        "copy",
        "-f",
        "hls",
        "-hls_time",
        "2",
        "-hls_list_size",
        "6",
        "-hls_flags",
        "delete_segments+temp_file",
        "-hls_segment_filename",
        &format!("{d}/seg_%d.ts"),
        &format!("{d}/index.m3u8"),
    ]
    .iter()
    .map(OsString::from)
    .collect()
}

/// Runs `argv` (program first) like the node runs FFmpeg and returns the seconds from spawn until
/// its output playlist (the last argument: `index.m3u8`, or the node's own `.ffmpeg.m3u8` in the
/// node's argv) exists; the process group is stopped afterwards.
async fn raw_ffmpeg(argv: &[OsString], dir: &Path) -> Result<f64, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let playlist: PathBuf = argv.last().map(PathBuf::from).ok_or("empty argv")?;
    if !playlist.starts_with(dir) {
        return Err(format!(
            "the argv's output {} is not in {}",
            playlist.display(),
            dir.display()
        ));
    }
    let log = std::fs::File::create(dir.join("ffmpeg.log"))
        .map_err(|e| format!("create ffmpeg log: {e}"))?;
    let (program, args) = argv.split_first().ok_or("empty argv")?;
    let t0 = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", program.to_string_lossy()))?;
    let result = loop {
        if playlist.exists() {
            break Ok(t0.elapsed().as_secs_f64());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("ffmpeg.log")).unwrap_or_default();
            break Err(format!(
                "raw ffmpeg exited with {status} before its first playlist: {log}"
            ));
        }
        if t0.elapsed() > START_LIMIT {
            break Err(format!(
                "raw ffmpeg wrote no playlist within {START_LIMIT:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = signal::send_group(pid, signal::Sig::TERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = signal::send_group(pid, signal::Sig::KILL);
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_argv_gets_a_new_input_and_folder() {
        let argv: Vec<OsString> = [
            "ffmpeg",
            "-probesize",
            "500000",
            "-http_proxy",
            "http://127.0.0.1:4000",
            "-i",
            "http://p/warm.ts",
            "-f",
            "hls",
            "-hls_segment_filename",
            "/r/n1/warm/seg_%d.ts",
            "/r/n1/warm/index.m3u8",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let out = swap(
            &argv,
            Path::new("/r/n1/warm"),
            Path::new("/r/raw/s1"),
            "http://p/s1.ts",
        )
        .expect("swap");
        let out: Vec<String> = out
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(out[4], "http://p/s1.ts");
        assert_eq!(out[2], "500000");
        assert_eq!(out[8], "/r/raw/s1/seg_%d.ts");
        assert_eq!(out[9], "/r/raw/s1/index.m3u8");
        assert!(!out
            .iter()
            .any(|a| a.contains("http_proxy") || a.contains(":4000")));
        assert!(swap(&argv[..3], Path::new("/r"), Path::new("/x"), "u").is_err());
    }
}
