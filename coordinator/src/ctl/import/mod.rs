//! `farmctl import`: an extended M3U playlist into the catalog, all channels or none, in bounded
//! chunks (see `catalog` for the stage → commit → apply phases). [`m3u`] is the playlist parser.

pub mod m3u;

use super::catalog::{self, DEFAULT_CHUNK};
use super::channel::{check_label, credential_warning};
use super::ctx::Ctx;
use super::error::CtlError;
use clap::Args;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

/// Default `--max-channels`.
pub const DEFAULT_MAX_CHANNELS: usize = 200_000;

#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// The playlist (#EXTM3U with #EXTINF entries). Channel ids come from tvg-id, else
    /// tvg-name, else the title, turned into slugs such as "bbc-one-hd".
    #[arg(required_unless_present = "resume")]
    pub file: Option<PathBuf>,
    /// IPTV account for every imported channel.
    #[arg(long)]
    pub provider: Option<String>,
    /// FFmpeg profile for every imported channel (default: copy).
    #[arg(long)]
    pub profile: Option<String>,
    /// Overwrite channels that already exist (default: refuse the whole import).
    #[arg(long)]
    pub replace: bool,
    /// Channels written per Redis command (1 to 10000): bounds how long Redis is busy with one.
    #[arg(long, default_value_t = DEFAULT_CHUNK, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    pub chunk: usize,
    /// Refuse playlists with more channels than this.
    #[arg(long, default_value_t = DEFAULT_MAX_CHANNELS)]
    pub max_channels: usize,
    /// Refuse files larger than this (bytes, or with K, M, G).
    #[arg(long, default_value = "256M", value_parser = parse_max_bytes)]
    pub max_bytes: u64,
    /// Only finish applying an import that was committed but not applied to the end (farmctl
    /// stopped half way); takes no file.
    #[arg(long, conflicts_with_all = ["file", "provider", "profile", "replace"])]
    pub resume: bool,
}

/// `--max-bytes`: a size as the daemons' settings read it, above 0.
fn parse_max_bytes(s: &str) -> Result<u64, String> {
    match farm_runtime::config::parse_size(s)? {
        0 => Err(format!("invalid size {s:?}: must be above 0")),
        n => Ok(n),
    }
}

/// Reads at most `max` bytes of `path`; a larger file is refused before it is read whole.
fn read_capped(path: &std::path::Path, max: u64) -> Result<Vec<u8>, CtlError> {
    let shown = path.display().to_string();
    let too_big = |size: String| {
        CtlError::Usage(format!(
            "{shown} is {size}, more than --max-bytes {max}: nothing was imported (raise --max-bytes to import it)"
        ))
    };
    let file = std::fs::File::open(path).map_err(|source| CtlError::ReadFile {
        path: shown.clone(),
        source,
    })?;
    if let Ok(m) = file.metadata() {
        if m.is_file() && m.len() > max {
            return Err(too_big(format!("{} bytes", m.len())));
        }
    }
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| CtlError::ReadFile {
            path: shown.clone(),
            source,
        })?;
    if bytes.len() as u64 > max {
        return Err(too_big("larger".into()));
    }
    Ok(bytes)
}

pub async fn run(ctx: &mut Ctx, a: ImportArgs, out: &mut impl Write) -> Result<(), CtlError> {
    if let Some(p) = &a.provider {
        check_label("--provider", p)?;
    }
    if let Some(p) = &a.profile {
        check_label("--profile", p)?;
    }
    let Some(path) = a.file.clone() else {
        // --resume
        let applied = catalog::finish_pending(ctx, a.chunk, out).await?;
        if applied == 0 {
            writeln!(out, "no import was waiting to be applied")?;
        }
        return Ok(());
    };
    let file = path.display().to_string();
    let bytes = read_capped(&path, a.max_bytes)?;
    // Providers' lists are UTF-8 in practice; a stray Latin-1 byte costs one letter of a name.
    let text = String::from_utf8_lossy(&bytes);
    let mut specs = m3u::parse(&text, ctx.allowed_schemes())
        .map_err(|errors| CtlError::Playlist { file, errors })?;
    drop(text);
    drop(bytes);
    if specs.len() > a.max_channels {
        return Err(CtlError::Usage(format!(
            "{} has {} channels, more than --max-channels {}: nothing was imported (raise --max-channels to import it)",
            path.display(),
            specs.len(),
            a.max_channels
        )));
    }
    for spec in &mut specs {
        if let Some(p) = &a.provider {
            spec.provider.clone_from(p);
        }
        if let Some(p) = &a.profile {
            spec.profile.clone_from(p);
        }
    }
    let started = Instant::now();
    let done = catalog::import(ctx, &specs, a.replace, a.chunk, out).await?;
    let n = done.channels;
    writeln!(
        out,
        "imported {n} channel{} in {:.1} s (chunks of {})",
        if n == 1 { "" } else { "s" },
        started.elapsed().as_secs_f64(),
        done.chunk
    )?;
    if let Some(w) = credential_warning(&specs) {
        writeln!(out, "{w}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_max_bytes("256M"), Ok(256 << 20));
        assert_eq!(parse_max_bytes("10k"), Ok(10 << 10));
        assert_eq!(parse_max_bytes("4096"), Ok(4096));
        for bad in ["", "0", "0K", "x", "-1M", "99999999999999999999G"] {
            assert!(parse_max_bytes(bad).is_err(), "{bad:?}");
        }
    }
}
