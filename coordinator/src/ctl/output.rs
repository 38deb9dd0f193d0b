//! Plain-text output helpers: aligned tables and terminal-safe cells (catalog values come from
//! M3U files and redis-cli, so they may hold escape sequences that must not reach a terminal).

use std::borrow::Cow;
use std::io::{self, Write};

/// Replaces control characters with `?`.
pub fn safe(s: &str) -> Cow<'_, str> {
    if s.chars().any(char::is_control) {
        Cow::Owned(
            s.chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
        )
    } else {
        Cow::Borrowed(s)
    }
}

/// `-` for an empty cell.
pub fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// Writes rows as columns separated by two spaces; the last column is not padded.
pub fn table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths.get(i).copied().unwrap_or(0);
                line.push_str(&format!("{cell:<pad$}  "));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// `2026-01-02T03:04:05.678Z` for ms since the epoch (UTC).
pub fn fmt_time(ms: u64) -> String {
    let (days, rem) = ((ms / 86_400_000) as i64, ms % 86_400_000);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

/// A short age: `850ms`, `12.3s`, `5m`, `3h`, `2d`.
pub fn fmt_ago(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m", ms / 60_000),
        3_600_000..=86_399_999 => format!("{}h", ms / 3_600_000),
        _ => format!("{}d", ms / 86_400_000),
    }
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `12.3 GiB`.
pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_ages_and_sizes() {
        assert_eq!(fmt_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(fmt_time(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(fmt_time(1_767_323_045_678), "2026-01-02T03:04:05.678Z");
        assert_eq!(fmt_ago(850), "850ms");
        assert_eq!(fmt_ago(12_340), "12.3s");
        assert_eq!(fmt_ago(300_000), "5m");
        assert_eq!(fmt_ago(3 * 86_400_000), "3d");
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(fmt_bytes(13_207_024_435), "12.3 GiB");
    }

    #[test]
    fn tables_align_and_cells_are_safe() {
        let mut buf = Vec::new();
        let rows = vec![
            vec![
                "a".to_string(),
                "Long name".to_string(),
                "http://x".to_string(),
            ],
            vec![
                "bbb".to_string(),
                safe("E\u{1b}[2J").into_owned(),
                "-".to_string(),
            ],
        ];
        table(&mut buf, &["ID", "NAME", "URL"], &rows).expect("write to a Vec");
        assert_eq!(
            String::from_utf8_lossy(&buf),
            "ID   NAME       URL\na    Long name  http://x\nbbb  E?[2J      -\n"
        );
    }
}
