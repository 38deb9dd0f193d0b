//! Log output that input cannot forge: every event is one line, whatever its fields hold.
//!
//! tracing's formatter escapes terminal escapes (ESC, BEL...) but writes a field's `\n` or `\r`
//! as is, so a command's `reason`, an FFmpeg error line or a header value could start a fake log
//! line. [`EscapingWriter`] escapes every control character of an event as `\xNN` (`\n`, `\r`,
//! `\t` as themselves, backslashed) except the newline that ends the event. It relies on the fmt
//! layer writing each event with one `write_all` into a fresh writer, which tracing-subscriber does.

use std::io::{self, Write};
use tracing_subscriber::fmt::MakeWriter;

/// A [`MakeWriter`] around another one that escapes control characters (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Escaping<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Escaping<M> {
    type Writer = EscapingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        EscapingWriter(self.0.make_writer())
    }
}

/// Escapes control characters in what it is given, except a final newline.
pub struct EscapingWriter<W>(W);

/// `buf` with control characters escaped, except one `\n` at its very end.
pub fn escape_line(buf: &[u8]) -> Vec<u8> {
    let (body, end) = match buf.split_last() {
        Some((b'\n', body)) => (body, &b"\n"[..]),
        _ => (buf, &b""[..]),
    };
    let mut out = Vec::with_capacity(buf.len() + 8);
    for &b in body {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out.extend_from_slice(end);
    out
}

impl<W: Write> Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(&escape_line(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_stays_one_line() {
        let forged = b"INFO channel stopped reason=x\nERROR forged line\r\x1b[2J# EOF\n";
        let out = escape_line(forged);
        let text = String::from_utf8(out).expect("utf8");
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(text.ends_with('\n'));
        assert!(
            text.contains("reason=x\\nERROR forged line\\r\\x1b[2J# EOF"),
            "{text}"
        );
        assert_eq!(escape_line(b"plain\n"), b"plain\n");
        assert_eq!(escape_line(b"tab\there"), b"tab\\there");
    }

    #[test]
    fn the_writer_escapes_what_it_is_given() {
        let mut sink = Vec::new();
        EscapingWriter(&mut sink)
            .write_all(b"a\nb\n")
            .expect("write");
        assert_eq!(sink, b"a\\nb\n");
        let mut sink = Vec::new();
        EscapingWriter(&mut sink)
            .write_all("ünïcode stays\n".as_bytes())
            .expect("write");
        assert_eq!(sink, "ünïcode stays\n".as_bytes());
    }
}
