//! Zero-cost access mode: nginx sends its access log to a unix datagram socket (syslog), one
//! datagram per request; every playback URI in it counts as a viewer access.
//!
//! nginx: `log_format farm_uri '$remote_addr $request_uri';` and
//! `access_log syslog:server=unix:<socket>,nohostname,tag=farm farm_uri;`
//! The request path pays nothing (no subrequest, no Redis); a full socket buffer drops log lines
//! in the kernel, never blocks nginx. Signed URLs are still checked here before an access counts,
//! so forged URIs cannot keep a channel alive (nginx itself cannot check HMAC tokens in this mode).
//! Counted accesses go to the same in-memory buffer as the node's own viewer requests (flushed to
//! `farm:access` once per `access_flush`), so a channel watched through nginx stays alive wherever
//! it runs.

use crate::node::authorize_uri;
use crate::node::Node;
use std::path::Path;
use std::sync::Arc;
use tokio::net::UnixDatagram;
use tracing::{debug, warn};

/// Binds the socket (replacing a stale one) so that nginx workers can write to it.
pub fn bind(path: &Path) -> std::io::Result<UnixDatagram> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let sock = UnixDatagram::bind(path)?;
    // nginx workers run as another user; the worst a local writer can do is keep a channel alive.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(sock)
}

/// Reads datagrams until cancelled.
pub async fn run(node: Arc<Node>, sock: UnixDatagram) {
    let mut buf = vec![0u8; 8192];
    loop {
        let n = tokio::select! {
            _ = node.cancel.cancelled() => return,
            r = sock.recv(&mut buf) => match r {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, "access socket read failed");
                    continue;
                }
            },
        };
        let Ok(line) = std::str::from_utf8(&buf[..n]) else {
            continue;
        };
        match parse(line) {
            Some((client, uri)) => match authorize_uri(&node.cfg, uri, client) {
                Ok(p) => {
                    node.metrics.access_log_lines.inc();
                    node.access.record(&p.id);
                }
                Err(e) => debug!(%uri, error = %e, "access-log line not counted"),
            },
            None => debug!(line, "access-log line without a playback URI"),
        }
    }
}

/// Finds `<client> /live/...` in a syslog line (`<190>Nov 22 04:38:05 farm: 10.0.0.1 /live/a/index.m3u8`).
pub fn parse(line: &str) -> Option<(&str, &str)> {
    let at = line.find(" /live/")?;
    let uri = line[at + 1..].split_whitespace().next()?;
    let client = line[..at].rsplit(' ').next().unwrap_or("");
    Some((client, uri))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn syslog_lines_give_client_and_uri() {
        assert_eq!(
            parse("<190>Nov 22 04:38:05 farm: 10.0.0.1 /live/a/index.m3u8"),
            Some(("10.0.0.1", "/live/a/index.m3u8"))
        );
        assert_eq!(parse("<190>Nov 22 04:38:05 farm: /nope"), None);
    }
}
