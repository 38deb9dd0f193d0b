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

#[cfg(test)]
mod tests {
    use super::*;

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
