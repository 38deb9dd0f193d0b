use super::*;
use crate::procs::MARKER_VAR;
use std::os::unix::process::CommandExt;

/// A guard's control loop in this process, driven through its channels.
struct Harness {
    tx: Option<mpsc::Sender<Frame>>,
    replies: mpsc::UnboundedReceiver<String>,
    _events: mpsc::Receiver<String>,
    task: tokio::task::JoinHandle<ExitCode>,
}

impl Harness {
    fn start() -> Harness {
        // This test process is the FFmpeg of channel "ch" as far as the gateways' peer check
        // goes (never as far as the fence goes: that is the `Spawned` announcements).
        let peers = Arc::new(PeerTable::default());
        peers.add("ch", std::process::id());
        let (tx, rx) = mpsc::channel(16);
        let (out, replies, events) = Outbox::new();
        Harness {
            tx: Some(tx),
            replies,
            _events: events,
            task: tokio::spawn(run(rx, out, peers)),
        }
    }

    async fn line(&self, raw: &[u8]) {
        let tx = self.tx.as_ref().expect("open");
        tx.send(Frame::Line(raw.to_vec())).await.expect("send");
    }

    async fn send(&self, m: &ToGuard) {
        self.line(encode(m).trim_end().as_bytes()).await;
    }

    /// The node's word of an FFmpeg of channel `ch`.
    async fn spawned(&self, pid: u32, start: u64) {
        self.send(&ToGuard::Spawned {
            pid,
            start,
            channel: "ch".into(),
        })
        .await;
    }

    async fn reply(&mut self) -> FromGuard {
        let line = tokio::time::timeout(Duration::from_secs(5), self.replies.recv())
            .await
            .expect("a reply within 5 s")
            .expect("guard alive");
        decode(line.trim_end().as_bytes()).expect("a reply")
    }

    async fn eof(mut self) -> ExitCode {
        self.tx = None;
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("exits at EOF")
            .expect("no panic")
    }
}

fn init() -> ToGuard {
    init_with(crate::egress::PolicySpec::default())
}

fn init_with(policy: crate::egress::PolicySpec) -> ToGuard {
    ToGuard::Init {
        node_pid: std::process::id(),
        hls_root: "/nowhere/guard-test".into(),
        policy,
        limits: Limits::default(),
    }
}

fn open(id: u64) -> ToGuard {
    open_as(id, "ch", 1000)
}

fn open_as(id: u64, channel: &str, timeout_ms: u64) -> ToGuard {
    ToGuard::Open {
        id,
        channel: channel.into(),
        vouched: vec![("127.0.0.1".into(), 9)],
        timeout_ms,
        max_connections: 4,
        secrets: Vec::new(),
    }
}

/// A stand-in FFmpeg: a marked process-group leader, child of this process.
fn fake_ffmpeg(marked: bool) -> (std::process::Child, u32, u64) {
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("30").process_group(0);
    if marked {
        cmd.env(MARKER_VAR, "/nowhere/guard-test/ch");
    }
    let c = cmd.spawn().expect("sleep");
    let pid = c.id();
    let start = procs::stat(pid).expect("stat").start;
    (c, pid, start)
}

async fn gateway_answer(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(b"GET http://127.0.0.1:9/x HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

#[tokio::test]
async fn bad_input_is_reported_and_skipped_without_panic() {
    let mut g = Harness::start();
    for raw in [
        &b"not json"[..],
        b"{}",
        b"\xff",
        br#"{"op":"deadline","mono_ns":"soon"}"#,
        br#"{"op":"spawned","pid":-3,"start":1,"channel":"c"}"#,
    ] {
        g.line(raw).await;
    }
    g.tx.as_ref()
        .expect("open")
        .send(Frame::TooLong)
        .await
        .expect("send");
    // Before init nothing can be opened; answered, not ignored.
    g.send(&open(1)).await;
    assert!(
        matches!(g.reply().await, FromGuard::OpenFailed { id: 1, error } if error.contains("initialised"))
    );
    g.send(&init()).await;
    assert!(matches!(g.reply().await, FromGuard::Ready { .. }));
    g.send(&init()).await; // ignored
    g.spawned(1, 0).await;
    for bad in [open_as(2, "../etc", 1000), open_as(3, "ch", 0)] {
        g.send(&bad).await;
        assert!(matches!(g.reply().await, FromGuard::OpenFailed { .. }));
    }
    g.send(&open(4)).await;
    assert!(matches!(g.reply().await, FromGuard::Opened { id: 4, .. }));
    g.send(&open(4)).await;
    assert!(matches!(
        g.reply().await,
        FromGuard::OpenFailed { id: 4, .. }
    ));
    g.send(&ToGuard::Close { id: 99 }).await;
    g.send(&ToGuard::Reaped { pid: 12345 }).await;
    assert_eq!(g.eof().await, ExitCode::SUCCESS);

    // A bad policy in init ends the guard with an error.
    let g = Harness::start();
    g.send(&init_with(crate::egress::PolicySpec {
        allow: vec!["nonsense".into()],
        ..Default::default()
    }))
    .await;
    let code = tokio::time::timeout(Duration::from_secs(5), g.task)
        .await
        .expect("ends")
        .expect("no panic");
    assert_eq!(code, ExitCode::from(2));
}

#[tokio::test]
async fn at_the_deadline_ffmpegs_die_and_gateways_close_until_the_next_renewal() {
    let mut g = Harness::start();
    g.send(&init()).await;
    assert!(matches!(g.reply().await, FromGuard::Ready { .. }));
    g.send(&open(1)).await;
    let FromGuard::Opened { port, .. } = g.reply().await else {
        panic!("not opened")
    };
    // No deadline yet: the gateway is closed.
    assert!(gateway_answer(port).await.contains("503"));

    let armed_at = monotonic_ns();
    g.send(&ToGuard::Deadline {
        mono_ns: armed_at + 400_000_000,
    })
    .await;
    let (mut announced, pid, start) = fake_ffmpeg(true);
    let (mut unannounced, _, _) = fake_ffmpeg(true);
    let (mut unmarked, pid3, _) = fake_ffmpeg(false);
    g.spawned(pid, start).await;
    // Open now: the policy decides (port 9 on loopback is vouched for, nothing listens: 502).
    assert!(gateway_answer(port).await.contains("502"));

    let FromGuard::Fenced { killed, .. } = g.reply().await else {
        panic!("no fence")
    };
    let fenced_after = Duration::from_nanos(monotonic_ns() - armed_at);
    assert_eq!(killed, 2, "the announced and the unannounced marked child");
    assert!(
        (Duration::from_millis(400)..Duration::from_millis(1500)).contains(&fenced_after),
        "{fenced_after:?}"
    );
    assert!(!announced.wait().expect("wait").success());
    assert!(!unannounced.wait().expect("wait").success());
    assert!(
        procs::stat(pid3).is_some_and(|s| s.state != 'Z'),
        "unmarked child left alone"
    );
    assert!(gateway_answer(port).await.contains("fenced"));

    // Spawned while fenced: killed at once.
    let (mut late, pid, start) = fake_ffmpeg(true);
    g.spawned(pid, start).await;
    assert!(matches!(g.reply().await, FromGuard::Killed { pid: p, .. } if p == pid));
    assert!(!late.wait().expect("wait").success());

    // Renewed: open again, and nothing more is fenced until that deadline passes.
    g.send(&ToGuard::Deadline {
        mono_ns: monotonic_ns() + 60_000_000_000,
    })
    .await;
    let (mut again, pid, start) = fake_ffmpeg(true);
    g.spawned(pid, start).await;
    assert!(gateway_answer(port).await.contains("502"));
    // EOF: the node is gone; what it started goes with it.
    assert_eq!(g.eof().await, ExitCode::SUCCESS);
    assert!(!again.wait().expect("wait").success());
    let _ = unmarked.kill();
    let _ = unmarked.wait();
}
