//! `farmctl import`: an extended M3U playlist into the catalog, all channels or none.

use super::catalog;
use super::channel::check_label;
use super::ctx::Ctx;
use super::error::CtlError;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// The playlist (#EXTM3U with #EXTINF entries). Channel ids come from tvg-id, else
    /// tvg-name, else the title, turned into slugs such as "bbc-one-hd".
    pub file: PathBuf,
    /// IPTV account for every imported channel.
    #[arg(long)]
    pub provider: Option<String>,
    /// FFmpeg profile for every imported channel (default: copy).
    #[arg(long)]
    pub profile: Option<String>,
    /// Overwrite channels that already exist (default: refuse the whole import).
    #[arg(long)]
    pub replace: bool,
}

pub async fn run(ctx: &mut Ctx, a: ImportArgs, out: &mut impl Write) -> Result<(), CtlError> {
    if let Some(p) = &a.provider {
        check_label("--provider", p)?;
    }
    if let Some(p) = &a.profile {
        check_label("--profile", p)?;
    }
    let file = a.file.display().to_string();
    let bytes = std::fs::read(&a.file).map_err(|source| CtlError::ReadFile {
        path: file.clone(),
        source,
    })?;
    // Providers' lists are UTF-8 in practice; a stray Latin-1 byte costs one letter of a name.
    let text = String::from_utf8_lossy(&bytes);
    let mut specs = farm_proto::m3u::parse(&text, ctx.allowed_schemes())
        .map_err(|errors| CtlError::Playlist { file, errors })?;
    for spec in &mut specs {
        if let Some(p) = &a.provider {
            spec.provider.clone_from(p);
        }
        if let Some(p) = &a.profile {
            spec.profile.clone_from(p);
        }
    }
    catalog::write(ctx, &specs, a.replace).await?;
    let n = specs.len();
    writeln!(out, "imported {n} channel{}", if n == 1 { "" } else { "s" })?;
    Ok(())
}
