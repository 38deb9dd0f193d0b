//! A tiny stand-in for `ffmpeg -f hls`, for supervision and scale tests.
//!
//! It understands only what it needs from ffmpeg's command line: the input URL after `-i`,
//! `-hls_time`, `-hls_list_size`, `-hls_delete_threshold`, `-start_number`, `-hls_flags` (only
//! `discont_start` and `delete_segments`), `-hls_segment_filename`, and the playlist path as the LAST
//! argument; everything
//! else is ignored. It opens the input only when asked to (`read=1`). Its behaviour comes from the
//! input URL's query string (the node clears its environment):
//!
//! - `mode=normal` (default): writes a segment every `seg_ms` and the playlist after each one.
//! - `mode=crash`: like normal, then exits with code 1 after `after_ms`.
//! - `mode=exit0`: like normal, then exits with code 0 after `after_ms`.
//! - `mode=stall`: like normal, then stops writing after `after_ms` but keeps running.
//! - `mode=fail`: prints "Server returned 403 Forbidden" to stderr and exits 1 at once.
//! - `after_ms=N` (default 1000), `seg_ms=N` (default `-hls_time` seconds, which defaults to 2),
//!   `bytes=N` (segment size, default 20000, rounded up to whole 188-byte TS null packets).
//! - `spawnlog=1`: appends `start <pid> <µs since the epoch>` when it starts and
//!   `exit <pid> <µs> <code>` when it exits by itself (not when killed) to `spawns.log` in the
//!   folder above the node's HLS root (the playlist's folder's grandparent: outside anything the
//!   node manages, shared by the nodes of one test), so a test can time the gaps between a crash
//!   and the next spawn from the processes' own clocks. (A path in the URL would not do: the node
//!   masks long query values in FFmpeg's argv as possible credentials.)
//! - `read=1` (`http://` inputs only): a thread reads the input like FFmpeg would and discards it:
//!   one `GET` of the whole URL through `-http_proxy` (absolute form, as FFmpeg sends it to a
//!   proxy) or, without one, straight to the URL's host; the body is read at whatever rate the
//!   upstream sends (for the fake provider: real time). When the connection ends it reconnects after
//!   500 ms, like FFmpeg's `-reconnect`. It writes segments on its own schedule either way; the
//!   point is that the node's egress gateway relays real bytes (farm-bench's scale phase).
//!
//! Files are written like ffmpeg's `hls_flags temp_file`: `<segment>.tmp` then rename,
//! `<playlist>.tmp` then rename; the playlist lists the last `-hls_list_size` segments (0 = all) and,
//! with `delete_segments`, like ffmpeg, `-hls_delete_threshold` (default 1) unlisted segments stay on
//! disk before older ones are deleted. Sequence numbers start at `-start_number` (default 0) and fill `%d` /
//! `%0Nd` in the pattern; with `discont_start` the first segment is preceded by
//! `#EXT-X-DISCONTINUITY` while it is listed.
//! SIGTERM/SIGINT make it exit 0 within ~20 ms.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    Crash,
    Exit0,
    Stall,
    Fail,
}

#[derive(Debug)]
struct Config {
    input: String,
    playlist: PathBuf,
    segment_pattern: String,
    list_size: usize,
    delete_threshold: usize,
    delete_segments: bool,
    start_number: u64,
    discont_start: bool,
    mode: Mode,
    after: Duration,
    seg_interval: Duration,
    seg_bytes: usize,
    spawnlog: Option<PathBuf>,
    /// Read the input (through this proxy, if any): `read=1`.
    read: bool,
    http_proxy: Option<String>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match parse_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fake-ffmpeg: {e}");
            std::process::exit(1);
        }
    };
    eprintln!(
        "fake-ffmpeg: pid {} starting: input {} mode {:?} after {:?} segment every {:?} ({} bytes) -> {}",
        std::process::id(),
        config.input,
        config.mode,
        config.after,
        config.seg_interval,
        config.seg_bytes,
        config.playlist.display()
    );
    log_spawn(&config, "start", "");
    if config.mode == Mode::Fail {
        eprintln!(
            "{}: Server returned 403 Forbidden (access denied)",
            config.input
        );
        exit(&config, 1);
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("fake-ffmpeg: cannot install signal handler: {e}");
            exit(&config, 1);
        }
    }
    if config.read {
        let (input, proxy, stop) = (
            config.input.clone(),
            config.http_proxy.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || read_input(&input, proxy.as_deref(), &stop));
    }
    let code = run(&config, &stop);
    exit(&config, code);
}

fn exit(config: &Config, code: i32) -> ! {
    log_spawn(config, "exit", &format!(" {code}"));
    std::process::exit(code);
}

/// One line in the `spawnlog` file, if asked for (append: the runs of one channel share it).
fn log_spawn(config: &Config, what: &str, extra: &str) {
    let Some(path) = &config.spawnlog else { return };
    let us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let line = format!("{what} {} {us}{extra}\n", std::process::id());
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
    if let Err(e) = written {
        eprintln!("fake-ffmpeg: spawnlog {}: {e}", path.display());
    }
}

fn run(config: &Config, stop: &AtomicBool) -> i32 {
    let started = Instant::now();
    let mut writer = HlsWriter::new(config);
    let mut next_segment_at = started + config.seg_interval;
    let mut stalled_logged = false;
    loop {
        if stop.load(Ordering::SeqCst) {
            eprintln!("fake-ffmpeg: signal received, exiting");
            return 0;
        }
        let now = Instant::now();
        let past_after = now.duration_since(started) >= config.after;
        match config.mode {
            Mode::Crash if past_after => {
                eprintln!("fake-ffmpeg: crashing as asked (mode=crash)");
                return 1;
            }
            Mode::Exit0 if past_after => {
                eprintln!("fake-ffmpeg: exiting 0 as asked (mode=exit0)");
                return 0;
            }
            Mode::Stall if past_after && !stalled_logged => {
                eprintln!("fake-ffmpeg: stalling as asked (mode=stall)");
                stalled_logged = true;
            }
            _ => {}
        }
        let writing = !(config.mode == Mode::Stall && past_after);
        if writing && now >= next_segment_at {
            if let Err(e) = writer.write_next() {
                eprintln!("fake-ffmpeg: {e}");
                return 1;
            }
            next_segment_at += config.seg_interval;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn parse_args(args: &[String]) -> Result<Config, String> {
    let playlist = args
        .last()
        .ok_or("no arguments; the last one must be the playlist")?;
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let input = value_of("-i").ok_or("no -i <input>")?;
    let hls_time: f64 = match value_of("-hls_time") {
        Some(v) => v.parse().map_err(|e| format!("-hls_time {v:?}: {e}"))?,
        None => 2.0,
    };
    let list_size: usize = match value_of("-hls_list_size") {
        Some(v) => v
            .parse()
            .map_err(|e| format!("-hls_list_size {v:?}: {e}"))?,
        None => 5,
    };
    let delete_threshold: usize = match value_of("-hls_delete_threshold") {
        Some(v) => v
            .parse()
            .map_err(|e| format!("-hls_delete_threshold {v:?}: {e}"))?,
        None => 1,
    };
    let start_number: u64 = match value_of("-start_number") {
        Some(v) => v.parse().map_err(|e| format!("-start_number {v:?}: {e}"))?,
        None => 0,
    };
    let flag =
        |name: &str| value_of("-hls_flags").is_some_and(|f| f.split('+').any(|flag| flag == name));
    let discont_start = flag("discont_start");
    let delete_segments = flag("delete_segments");
    let playlist = PathBuf::from(playlist);
    let segment_pattern = match value_of("-hls_segment_filename") {
        Some(p) => p,
        None => {
            let stem = playlist
                .file_stem()
                .map_or("index".into(), |s| s.to_string_lossy().into_owned());
            playlist
                .with_file_name(format!("{stem}%d.ts"))
                .to_string_lossy()
                .into_owned()
        }
    };
    let query = input
        .split_once('?')
        .map_or(String::new(), |(_, q)| q.to_string());
    let param = |key: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    };
    let num = |key: &str, default: u64| -> Result<u64, String> {
        match param(key) {
            Some(v) => v.parse().map_err(|e| format!("{key}={v:?}: {e}")),
            None => Ok(default),
        }
    };
    let mode = match param("mode").as_deref() {
        None | Some("normal") => Mode::Normal,
        Some("crash") => Mode::Crash,
        Some("exit0") => Mode::Exit0,
        Some("stall") => Mode::Stall,
        Some("fail") => Mode::Fail,
        Some(other) => return Err(format!("unknown mode={other}")),
    };
    let default_seg_ms = (hls_time * 1000.0).round().max(1.0) as u64;
    let spawnlog = (param("spawnlog").as_deref() == Some("1"))
        .then(|| {
            playlist
                .parent()?
                .parent()?
                .parent()
                .map(|d| d.join("spawns.log"))
        })
        .flatten();
    Ok(Config {
        input,
        playlist,
        segment_pattern,
        list_size,
        delete_threshold,
        delete_segments,
        start_number,
        discont_start,
        mode,
        after: Duration::from_millis(num("after_ms", 1000)?),
        seg_interval: Duration::from_millis(num("seg_ms", default_seg_ms)?.max(1)),
        seg_bytes: usize::try_from(num("bytes", 20_000)?).map_err(|e| e.to_string())?,
        spawnlog,
        read: param("read").as_deref() == Some("1"),
        http_proxy: value_of("-http_proxy"),
    })
}

/// `host:port` of an `http://` URL (port 80 by default).
fn http_authority(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let auth = rest.split(['/', '?']).next()?;
    let auth = auth.rsplit('@').next()?;
    if auth.is_empty() {
        return None;
    }
    Some(if auth.contains(':') {
        auth.to_string()
    } else {
        format!("{auth}:80")
    })
}

/// Reads `input` (through `proxy`) and discards it until `stop`; reconnects after 500 ms.
fn read_input(input: &str, proxy: Option<&str>, stop: &AtomicBool) {
    use std::io::{Read, Write};
    let Some(host) = http_authority(input) else {
        eprintln!("fake-ffmpeg: read=1 needs an http:// input, not {input}");
        return;
    };
    let Some(dest) = proxy.map_or(Some(host.clone()), http_authority) else {
        eprintln!("fake-ffmpeg: cannot use -http_proxy {proxy:?}");
        return;
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        let request = format!(
            "GET {input} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: fake-ffmpeg\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        match std::net::TcpStream::connect(&dest).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            s.write_all(request.as_bytes())?;
            Ok(s)
        }) {
            Ok(mut s) => loop {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                match s.read(&mut buf) {
                    Ok(0) => {
                        eprintln!("fake-ffmpeg: input ended after {total} bytes; reconnecting");
                        break;
                    }
                    Ok(n) => total += n as u64,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => {
                        eprintln!("fake-ffmpeg: reading the input: {e}; reconnecting");
                        break;
                    }
                }
            },
            Err(e) => eprintln!("fake-ffmpeg: connect {dest} for the input: {e}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Expands `%d` / `%0Nd` in an ffmpeg segment pattern.
fn segment_name(pattern: &str, seq: u64) -> String {
    let mut out = String::new();
    let mut rest = pattern;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let spec = &rest[i + 1..];
        let digits: String = spec.chars().take_while(|c| c.is_ascii_digit()).collect();
        if spec[digits.len()..].starts_with('d') {
            let width: usize = digits.trim_start_matches('0').parse().unwrap_or(0);
            out.push_str(&format!("{seq:0width$}"));
            rest = &spec[digits.len() + 1..];
        } else if let Some(after) = spec.strip_prefix('%') {
            out.push('%');
            rest = after;
        } else {
            out.push('%');
            rest = spec;
        }
    }
    out.push_str(rest);
    out
}

struct HlsWriter<'a> {
    config: &'a Config,
    seq: u64,
    /// (sequence, path) of segments on disk, oldest first.
    on_disk: VecDeque<(u64, PathBuf)>,
    payload: Vec<u8>,
}

impl<'a> HlsWriter<'a> {
    fn new(config: &'a Config) -> HlsWriter<'a> {
        // TS null packets (PID 0x1FFF): a valid, empty transport stream.
        let packets = config.seg_bytes.div_ceil(188).max(1);
        let mut payload = Vec::with_capacity(packets * 188);
        for _ in 0..packets {
            payload.extend_from_slice(&[0x47, 0x1f, 0xff, 0x10]);
            payload.extend(std::iter::repeat_n(0xffu8, 184));
        }
        HlsWriter {
            config,
            seq: config.start_number,
            on_disk: VecDeque::new(),
            payload,
        }
    }

    fn write_next(&mut self) -> Result<(), String> {
        let path = PathBuf::from(segment_name(&self.config.segment_pattern, self.seq));
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("create {}: {e}", dir.display()))?;
            }
        }
        write_atomically(&path, &self.payload)?;
        self.on_disk.push_back((self.seq, path));
        self.seq += 1;
        let listed = if self.config.list_size == 0 {
            self.on_disk.len()
        } else {
            self.config.list_size.min(self.on_disk.len())
        };
        let first_listed = self.on_disk.len() - listed;
        self.write_playlist(first_listed)?;
        // Keep `hls_delete_threshold` unlisted segments on disk, like ffmpeg.
        let keep = self.config.list_size + self.config.delete_threshold;
        while self.config.list_size > 0 && self.on_disk.len() > keep {
            if let Some((_, old)) = self.on_disk.pop_front() {
                if self.config.delete_segments {
                    let _ = std::fs::remove_file(&old);
                }
            }
        }
        Ok(())
    }

    fn write_playlist(&self, first_listed: usize) -> Result<(), String> {
        let secs = self.config.seg_interval.as_secs_f64();
        let target = secs.ceil().max(1.0) as u64;
        let first_seq = self.on_disk.get(first_listed).map_or(0, |(s, _)| *s);
        let mut text = format!(
            "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:{target}\n#EXT-X-MEDIA-SEQUENCE:{first_seq}\n"
        );
        for (seq, path) in self.on_disk.iter().skip(first_listed) {
            if self.config.discont_start && *seq == self.config.start_number {
                text.push_str("#EXT-X-DISCONTINUITY\n");
            }
            let name = path
                .file_name()
                .map_or(String::new(), |n| n.to_string_lossy().into_owned());
            text.push_str(&format!("#EXTINF:{secs:.6},\n{name}\n"));
        }
        write_atomically(&self.config.playlist, text.as_bytes())
    }
}

fn write_atomically(path: &Path, data: &[u8]) -> Result<(), String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, data).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("rename to {}: {e}", path.display()))
}
