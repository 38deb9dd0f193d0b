//! The test media: a 10 s MPEG-TS (H.264 + AAC, 1 s GOP) made once per machine with real ffmpeg.
//!
//! nextest runs each test in its own process, many at once, so generation is race-safe across
//! processes: an exclusive `flock` on a lock file lets one process run ffmpeg while the others wait,
//! the output goes to a unique temp name and is `rename`d into place (readers never see a partial
//! file), and a `OnceLock` makes it once per process. Bump the `-vN` in the name when the recipe changes.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{flock, FlockOperation};

use crate::ts;

/// File name of the cached source; the version changes with the ffmpeg recipe below.
pub const SOURCE_NAME: &str = "source-v1.ts";
/// Nominal length of the source, as asked of ffmpeg.
pub const SOURCE_SECONDS: u64 = 10;

/// The source file and what the fake provider needs to loop it.
#[derive(Debug)]
pub struct SourceInfo {
    pub path: PathBuf,
    /// The whole file, whole 188-byte packets only.
    pub bytes: Vec<u8>,
    /// Media length of one pass: timestamp span plus one frame (exactly 10 s for the default file).
    pub duration: Duration,
    /// Smallest PTS/DTS in the file (90 kHz).
    pub first_ts: u64,
    /// What to add to every timestamp per loop so that loop N+1 follows loop N: span + one frame
    /// (see [`ts::TsScan::loop_offset`]).
    pub loop_offset_90k: u64,
    /// Real-time byte rate: file size / duration.
    pub bytes_per_second: f64,
}

/// Directory of the cached media: `<temp_dir>/streamfarm-test-media`.
pub fn cache_dir() -> PathBuf {
    std::env::temp_dir().join("streamfarm-test-media")
}

/// Path of the 10 s test MPEG-TS, generating it first if this machine does not have it yet.
/// Panics (with ffmpeg's stderr) if it cannot be made.
pub fn source_ts() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| ensure_source(&cache_dir()).unwrap_or_else(|e| panic!("test media: {e}")))
        .clone()
}

/// The source file loaded and measured (once per process).
pub fn source_info() -> &'static SourceInfo {
    static INFO: OnceLock<SourceInfo> = OnceLock::new();
    INFO.get_or_init(|| {
        let path = source_ts();
        load_info(&path).unwrap_or_else(|e| panic!("test media {}: {e}", path.display()))
    })
}

/// Media duration of one pass of the source (about 10 s).
pub fn source_duration() -> Duration {
    source_info().duration
}

fn load_info(path: &Path) -> Result<SourceInfo, String> {
    let mut bytes = fs::read(path).map_err(|e| format!("read: {e}"))?;
    bytes.truncate(bytes.len() / ts::PACKET * ts::PACKET);
    if bytes.first() != Some(&ts::SYNC) {
        return Err("not an MPEG-TS file (no sync byte)".into());
    }
    let scan = ts::scan(&bytes);
    let (Some(min), Some(loop_offset_90k)) = (scan.min_ts, scan.loop_offset()) else {
        return Err("no PES timestamps found".into());
    };
    let duration = Duration::from_secs_f64(loop_offset_90k as f64 / ts::TS_HZ as f64);
    Ok(SourceInfo {
        path: path.to_path_buf(),
        bytes_per_second: bytes.len() as f64 / duration.as_secs_f64(),
        bytes,
        duration,
        first_ts: min,
        loop_offset_90k,
    })
}

/// Makes sure `dir/SOURCE_NAME` exists, generating it under an exclusive lock if needed.
fn ensure_source(dir: &Path) -> Result<PathBuf, String> {
    let target = dir.join(SOURCE_NAME);
    if target.is_file() {
        return Ok(target);
    }
    fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let lock_path = dir.join(format!("{SOURCE_NAME}.lock"));
    let lock: File = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("open {}: {e}", lock_path.display()))?;
    flock(&lock, FlockOperation::LockExclusive)
        .map_err(|e| format!("flock {}: {e}", lock_path.display()))?;
    // Another process may have made it while we waited for the lock.
    if target.is_file() {
        return Ok(target);
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(
        "{SOURCE_NAME}.tmp-{}-{nanos}.ts",
        std::process::id()
    ));
    let result = generate(&tmp).and_then(|()| {
        fs::rename(&tmp, &target).map_err(|e| format!("rename into {}: {e}", target.display()))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| target)
    // The lock is released when `lock` is dropped.
}

/// Runs ffmpeg: testsrc2 + 440 Hz sine, H.264 ultrafast with a fixed 1 s GOP, AAC 48 kHz stereo.
fn generate(out: &Path) -> Result<(), String> {
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-nostdin", "-loglevel", "error", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
        .args([
            "-t",
            &SOURCE_SECONDS.to_string(),
            "-map",
            "0:v",
            "-map",
            "1:a",
        ])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
        ])
        .args(["-g", "25", "-keyint_min", "25", "-sc_threshold", "0"])
        .args(["-c:a", "aac", "-b:a", "128k", "-ar", "48000", "-ac", "2"])
        .args(["-f", "mpegts"])
        .arg(out);
    run_tool(&mut cmd, "ffmpeg").map(drop)
}

/// Runs `cmd` (stdin null) to its end: its output when it exits 0, else an error with `what`, its
/// exit status and stderr.
pub(crate) fn run_tool(cmd: &mut Command, what: &str) -> Result<std::process::Output, String> {
    let output = cmd.stdin(Stdio::null()).output().map_err(|e| {
        let program = cmd.get_program().to_string_lossy();
        format!("run {program} (is it installed?): {e}")
    })?;
    if !output.status.success() {
        return Err(format!(
            "{what} exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(output)
}
