//! Path traversal corpus (promise 10) against the node itself, its `/auth` check, and nginx with the
//! shipped template in both access modes, sent as raw bytes on the socket (no client
//! normalisation): `..`, `%2e%2e`, `%2f`, `%5c`, NUL, overlong names, double encoding, Unicode
//! look-alikes (fullwidth dots and slashes, overlong UTF-8 `%c0%af`), absolute paths, `//`,
//! backslashes.
//!
//! Canary files sit OUTSIDE the HLS root (next to it, and in a folder directly in /tmp), named like
//! the files a viewer may ask for (`index.m3u8`, `seg_1.ts`). Every answer must be a 4xx, no answer
//! may contain a canary's bytes, no canary's access time may move (checked to be able to move by
//! reading one at the end), and nothing starts: one FFmpeg (the channel that was running) before
//! and after.

use farm_tests::fixtures::*;
use farm_tests::nginx::{NginxOpts, NginxServer};
use farm_tests::node::NodeProcess;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// What every canary file contains; never in a file name, so an error message that echoes the
/// requested path cannot contain it.
const MARK: &str = "SECRET-CANARY-CONTENT";

/// Files outside the HLS root that a traversal would reach, with their access times set to the
/// past so that a read moves them even on a `relatime` mount.
struct Canaries {
    files: Vec<PathBuf>,
    atimes: Vec<SystemTime>,
    /// A folder directly in /tmp, removed on drop.
    _tmp: tempfile::TempDir,
}

impl Canaries {
    fn plant(next_to_root: &Path) -> Canaries {
        let tmp = tempfile::Builder::new()
            .prefix("farm-canary-dir-")
            .tempdir_in("/tmp")
            .expect("canary dir in /tmp");
        let outside = next_to_root.join("outside");
        std::fs::create_dir_all(&outside).expect("mkdir");
        let files = vec![
            next_to_root.join("canary.ts"),
            next_to_root.join("index.m3u8"),
            outside.join("index.m3u8"),
            outside.join("seg_1.ts"),
            tmp.path().join("index.m3u8"),
            tmp.path().join("seg_1.ts"),
            tmp.path().join("canary.ts"),
        ];
        let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 86_400);
        for f in &files {
            std::fs::write(f, format!("#EXTM3U\n{MARK} {}\n", f.display())).expect("canary");
            set_atime(f, two_days_ago);
        }
        let atimes = files.iter().map(|f| atime(f)).collect();
        Canaries {
            files,
            atimes,
            _tmp: tmp,
        }
    }

    /// The canaries whose access time moved since they were planted.
    fn read_since_planted(&self) -> Vec<&Path> {
        self.files
            .iter()
            .zip(&self.atimes)
            .filter(|(f, t)| atime(f) != **t)
            .map(|(f, _)| f.as_path())
            .collect()
    }
}

fn set_atime(f: &Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(f)
        .and_then(|h| h.set_times(std::fs::FileTimes::new().set_accessed(t)))
        .unwrap_or_else(|e| panic!("set atime of {}: {e}", f.display()));
}

fn atime(f: &Path) -> SystemTime {
    std::fs::metadata(f)
        .and_then(|m| m.accessed())
        .unwrap_or_else(|e| panic!("stat {}: {e}", f.display()))
}

/// Sends `GET <target> HTTP/1.1` with the target's bytes exactly as given (they may be invalid
/// UTF-8, NUL, backslashes) and an optional extra header; returns the status (0 when the server
/// closed without answering) and everything it sent.
fn raw_get(addr: SocketAddr, target: &[u8], header: Option<(&str, &[u8])>) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut req = b"GET ".to_vec();
    req.extend_from_slice(target);
    req.extend_from_slice(format!(" HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n").as_bytes());
    if let Some((name, value)) = header {
        req.extend_from_slice(name.as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    // A server may refuse and close before the whole request is written (a huge target).
    let _ = s.write_all(&req);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let status = raw
        .strip_prefix(b"HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| std::str::from_utf8(c).ok())
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, raw)
}

/// Separators and dot-dots in the spellings a traversal tries, raw and encoded.
const SPELLINGS: &[(&str, &str)] = &[
    ("..", "/"),
    ("%2e%2e", "/"),
    ("%2E%2E", "%2F"),
    ("..", "%2f"),
    ("%2e%2e", "%2f"),
    (".%2e", "/"),
    ("%252e%252e", "%252f"),
    ("..", "%5c"),
    ("..", "\\"),
    ("%c0%ae%c0%ae", "%c0%af"),
    ("%e0%80%ae%e0%80%ae", "%e0%80%af"),
    ("%ef%bc%8e%ef%bc%8e", "%ef%bc%8f"),
    ("\u{ff0e}\u{ff0e}", "\u{ff0f}"),
    ("\u{2024}\u{2024}", "\u{2215}"),
    ("%u002e%u002e", "%u2215"),
    ("..;", "/"),
    ("....", "//"),
    ("..", "%00/"),
];

/// Request targets that try to name `file` (an absolute path) from the places a playback path has:
/// after a channel folder, in the id slot, and as an absolute path.
fn traversals(file: &Path, depth: usize) -> Vec<Vec<u8>> {
    let abs = file.to_string_lossy();
    let rel = abs.trim_start_matches('/');
    let mut out = Vec::new();
    for (dots, sep) in SPELLINGS {
        let up = format!("{dots}{sep}").repeat(depth + 2);
        let rel_enc = rel.replace('/', sep);
        let (dir_enc, name) = rel_enc
            .rsplit_once(*sep)
            .map_or((String::new(), rel_enc.clone()), |(d, n)| {
                (d.to_string(), n.to_string())
            });
        // from inside a running channel's folder
        out.push(format!("/live/c1/{up}{rel_enc}"));
        // the id slot: <root>/<id>/<file> with id = ../../<canary dir>
        out.push(format!("/live/{up}{dir_enc}/{name}"));
        // the token slot of a signed URL
        out.push(format!("/live/{up}/c1/{name}"));
        // absolute paths
        out.push(format!("/live/{sep}{rel_enc}"));
        out.push(format!("/live/c1/{sep}{rel_enc}"));
        out.push(format!("/live{sep}{sep}{rel_enc}"));
    }
    out.push(abs.to_string());
    out.push(format!("//{rel}"));
    out.push(format!("/live//{rel}"));
    out.push(format!("http://127.0.0.1{abs}"));
    out.push(format!("file://{abs}"));
    out.into_iter().map(String::into_bytes).collect()
}

/// Targets that are wrong in ways other than a traversal: NUL, control bytes, overlong names,
/// invalid UTF-8, look-alike names of real files.
fn odd_targets() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = [
        "/live/c1/index.m3u8%00",
        "/live/c1/index.m3u8%00.ts",
        "/live/c1/seg_1.ts%00.m3u8",
        "/live/c1%00/index.m3u8",
        "/live/c1/.ffmpeg.pid",
        "/live/c1/index.m3u8.tmp",
        "/live/c1/index.m3u8/",
        "/live/c1/index.m3u8/.",
        "/live/c1/index.m3u8;.ts",
        "/live/c1/index.M3U8",
        "/live/c1/index%252em3u8",
        "/live/c1/..",
        "/live/c1/...",
        "/live/c1/.ts",
        "/live/c1%5cindex.m3u8",
        "/live/c1\\index.m3u8",
        "/live/c1/canary.ts",
        "/live/outside/index.m3u8",
        "/live/../index.m3u8",
        "/live/%2e%2e/index.m3u8",
        "/live/%2e%2e/canary.ts",
        "/live/..%2fcanary.ts/index.m3u8",
        "/live/c\u{ff11}/index.m3u8",
        "/live/\u{ff43}1/index.m3u8",
        "/live/c1/index\u{ff0e}m3u8",
        "/live/c1/index%ef%bc%8em3u8",
        "/live/c1/index%c0%aem3u8",
        "/live/c1/seg_1\u{2024}ts",
        "/live/",
        "/live",
        "/",
        "*",
        "canary.ts",
        "../canary.ts",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    // Raw bytes no client library would send.
    out.push(b"/live/c1/index.m3u8\0".to_vec());
    out.push(b"/live/c1\0/../../canary.ts".to_vec());
    out.push(b"/live/c1/\xc0\xae\xc0\xae/canary.ts".to_vec());
    out.push(b"/live/\xc0\xaf\xc0\xae\xc0\xae\xc0\xafcanary.ts/index.m3u8".to_vec());
    out.push(b"/live/c1/index.m3u8\x7f".to_vec());
    out.push(b"/live/c1/\xff\xfe.ts".to_vec());
    out.push(b"/live/c1/index.m3u8\t".to_vec());
    // Overlong names and paths.
    out.push(format!("/live/{}/index.m3u8", "a".repeat(65)).into_bytes());
    out.push(format!("/live/c1/{}.ts", "a".repeat(65)).into_bytes());
    out.push(format!("/live/{}/c1/index.m3u8", "a".repeat(129)).into_bytes());
    out.push(format!("/live/c1/{}canary.ts", "../".repeat(3000)).into_bytes());
    out.push(format!("/live/{}/index.m3u8", "a".repeat(70_000)).into_bytes());
    out
}

/// Sends every target to `addr`: each answer must be a 4xx and contain no canary byte. A server
/// may also close without an answer (status 0), which serves nothing either.
fn probe(name: &str, addr: SocketAddr, targets: &[Vec<u8>]) -> (usize, usize) {
    let (mut refused, mut closed) = (0, 0);
    for t in targets {
        let (status, raw) = raw_get(addr, t, None);
        let shown = String::from_utf8_lossy(&t[..t.len().min(160)]).into_owned();
        assert!(
            !String::from_utf8_lossy(&raw).contains(MARK),
            "{name}: GET {shown:?} served a canary: {}",
            String::from_utf8_lossy(&raw)
        );
        match status {
            400..=499 => refused += 1,
            0 => closed += 1,
            _ => panic!(
                "{name}: GET {shown:?} answered {status}, not a 4xx: {}",
                String::from_utf8_lossy(&raw[..raw.len().min(400)])
            ),
        }
    }
    println!(
        "{name}: {} targets, {refused} refused with a 4xx, {closed} closed without an answer",
        targets.len()
    );
    (refused, closed)
}

/// nginx's `auth_request` check on the node: the node must refuse (403) every target given as
/// `X-Original-URI`, except those of the exact form `/live/<id>/<file>` (a file inside a channel
/// folder by construction), which it may let through.
fn probe_auth(node: &NodeProcess, targets: &[Vec<u8>]) {
    let (mut checked, mut allowed) = (0, 0);
    for t in targets {
        // Header values cannot carry NUL, CR or LF, and lose leading and trailing blanks (HTTP's
        // optional white space); the others go as they are.
        if t.iter().any(|b| matches!(b, 0 | b'\r' | b'\n'))
            || t.len() > 8_000
            || t.first().is_some_and(|b| matches!(b, b' ' | b'\t'))
            || t.last().is_some_and(|b| matches!(b, b' ' | b'\t'))
        {
            continue;
        }
        let (status, raw) = raw_get(node.addr(), b"/auth", Some(("X-Original-URI", t)));
        let shown = String::from_utf8_lossy(&t[..t.len().min(160)]).into_owned();
        if names_a_channel_file(t) {
            // `/live/c1/canary.ts`: a file inside a channel folder by its form; whether it exists
            // is nginx's try_files business (inside the HLS root).
            assert!(status == 204 || status == 403, "{shown:?}: {status}");
            allowed += 1;
        } else {
            assert!(
                status == 403 || status == 400,
                "/auth with X-Original-URI {shown:?}: {status}: {}",
                String::from_utf8_lossy(&raw)
            );
            checked += 1;
        }
    }
    println!(
        "node /auth: {checked} X-Original-URI values refused, {allowed} of the form \
         /live/<id>/<file> (inside a channel folder) let through"
    );
}

/// `/live/<id>/<file>` with both parts from the strict patterns (model written out, no regex).
fn names_a_channel_file(t: &[u8]) -> bool {
    let ok = |s: &[u8]| {
        (1..=64).contains(&s.len())
            && s.iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
    };
    let Some(rest) = t.strip_prefix(b"/live/") else {
        return false;
    };
    let parts: Vec<&[u8]> = rest.split(|b| *b == b'/').collect();
    let [id, file] = parts.as_slice() else {
        return false;
    };
    let stem = file
        .strip_suffix(b".m3u8")
        .or_else(|| file.strip_suffix(b".ts"));
    ok(id) && stem.is_some_and(ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_corpus_gets_4xx_from_node_and_nginx_and_no_canary_outside_the_root_is_read() {
    let (redis, root) = redis_with_fake_channels(&["c1"]);
    let sock = root.path().join("n1-access.sock");
    let sock_arg = sock.to_string_lossy().to_string();
    let node = node(
        &redis,
        "n1",
        root.path(),
        true,
        &["--access-socket", &sock_arg],
    );
    let auth_nginx = NginxServer::start(&NginxOpts::for_nodes([&node]));
    let log_nginx = NginxServer::start(&NginxOpts::for_nodes([&node]).access_log([&sock]));
    // c1 runs: its folder exists, so traversals start from a real channel folder.
    let r = get(&format!("{}/live/c1/index.m3u8", auth_nginx.base_url())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(ffmpegs_under(node.hls_root()).len(), 1);

    // The HLS root is <root>/n1: the canaries sit next to it in <root>, and in /tmp.
    let canaries = Canaries::plant(root.path());
    let depth = node.hls_root().join("c1").components().count();
    let mut targets: Vec<Vec<u8>> = canaries
        .files
        .iter()
        .flat_map(|f| traversals(f, depth))
        .collect();
    targets.extend(odd_targets());

    let (_, node_closed) = probe("node", node.addr(), &targets);
    probe_auth(&node, &targets);
    let (_, auth_closed) = probe("nginx auth_request", auth_nginx.addr(), &targets);
    let (_, log_closed) = probe("nginx access-log", log_nginx.addr(), &targets);
    // Closing without an answer is only how a server may treat the 70,000-byte target.
    assert!(node_closed <= 1 && auth_closed <= 1 && log_closed <= 1);

    let read = canaries.read_since_planted();
    assert!(read.is_empty(), "canaries read: {read:?}");
    assert_eq!(
        ffmpegs_under(node.hls_root()).len(),
        1,
        "nothing but c1 runs"
    );
    assert_eq!(metric(&node, "farm_node_ffmpeg_spawns_total").await, 1.0);
    let owners: Vec<String> = all_keys(&redis)
        .await
        .into_iter()
        .filter(|k| k.starts_with("farm:owner:"))
        .collect();
    assert_eq!(owners, vec!["farm:owner:c1".to_string()]);

    // Control: the access-time check can fail. Reading a canary moves its access time.
    let probe_file = &canaries.files[4];
    let _ = std::fs::read(probe_file).expect("read canary");
    assert_eq!(
        canaries.read_since_planted(),
        vec![probe_file.as_path()],
        "reading a canary must move its access time, or the check above proves nothing \
         (is the file system mounted noatime?)"
    );
}
