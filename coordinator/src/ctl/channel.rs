//! `farmctl channel add|rm|list|show`: one catalog entry at a time.

use super::catalog;
use super::ctx::Ctx;
use super::error::CtlError;
use super::output::{or_dash, safe, table};
use clap::{Args, Subcommand};
use farm_proto::{validate, ChannelSpec};
use std::io::Write;

#[derive(Debug, Subcommand)]
pub enum ChannelCmd {
    /// Add a channel to the catalog (refuses to overwrite one unless --replace).
    Add(AddArgs),
    /// Remove a channel from the catalog.
    ///
    /// This only edits the catalog and does not stop a running stream: it keeps running until it
    /// goes idle or is stopped, and cannot be started again afterwards.
    Rm(IdArgs),
    /// List the catalog, sorted by id.
    List(ListArgs),
    /// Show one catalog entry.
    Show(ShowArgs),
}

#[derive(Debug, Clone, Args)]
pub struct AddArgs {
    /// Channel id: 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'.
    pub id: String,
    /// Primary upstream URL.
    pub url: String,
    /// Backup upstream URL, tried in order after the primary fails (repeatable).
    #[arg(long, value_name = "URL")]
    pub backup: Vec<String>,
    /// FFmpeg profile.
    #[arg(long, default_value = "copy")]
    pub profile: String,
    /// IPTV account whose connection limit applies.
    #[arg(long)]
    pub provider: Option<String>,
    /// Display name (default: the id).
    #[arg(long)]
    pub name: Option<String>,
    /// Group, e.g. "UK" or "News".
    #[arg(long)]
    pub group: Option<String>,
    /// Keep the channel running even when nobody watches.
    #[arg(long)]
    pub pinned: bool,
    /// Overwrite the channel if it exists.
    #[arg(long)]
    pub replace: bool,
}

#[derive(Debug, Clone, Args)]
pub struct IdArgs {
    /// Channel id.
    pub id: String,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ShowArgs {
    /// Channel id.
    pub id: String,
    /// Print a JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(ctx: &mut Ctx, cmd: ChannelCmd, out: &mut impl Write) -> Result<(), CtlError> {
    match cmd {
        ChannelCmd::Add(a) => add(ctx, a, out).await,
        ChannelCmd::Rm(a) => rm(ctx, a, out).await,
        ChannelCmd::List(a) => list(ctx, a, out).await,
        ChannelCmd::Show(a) => show(ctx, a, out).await,
    }
}

/// Profile and provider names end up in key names and config lookups: the channel-id alphabet.
pub(crate) fn check_label(option: &str, value: &str) -> Result<(), CtlError> {
    if validate::channel_id(value).is_ok() {
        Ok(())
    } else {
        Err(CtlError::Usage(format!(
            "invalid {option} {:?}: use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'",
            safe(value)
        )))
    }
}

fn check_text(option: &str, value: &str) -> Result<(), CtlError> {
    if value.chars().any(char::is_control) || value.len() > 256 {
        Err(CtlError::Usage(format!(
            "invalid {option} {:?}: use at most 256 bytes and no control characters",
            safe(value)
        )))
    } else {
        Ok(())
    }
}

fn spec_from_args(ctx: &Ctx, a: AddArgs) -> Result<ChannelSpec, CtlError> {
    validate::channel_id(&a.id)?;
    for url in std::iter::once(&a.url).chain(&a.backup) {
        validate::upstream_url(url, ctx.allowed_schemes())?;
    }
    check_label("--profile", &a.profile)?;
    if let Some(p) = &a.provider {
        check_label("--provider", p)?;
    }
    for (option, value) in [("--name", &a.name), ("--group", &a.group)] {
        if let Some(v) = value {
            check_text(option, v)?;
        }
    }
    Ok(ChannelSpec {
        name: a.name.unwrap_or_else(|| a.id.clone()),
        id: a.id,
        url: a.url,
        backup_urls: a.backup,
        profile: a.profile,
        provider: a.provider.unwrap_or_default(),
        pinned: a.pinned,
        group: a.group.unwrap_or_default(),
    })
}

async fn add(ctx: &mut Ctx, a: AddArgs, out: &mut impl Write) -> Result<(), CtlError> {
    let replace = a.replace;
    let spec = spec_from_args(ctx, a)?;
    catalog::write(ctx, std::slice::from_ref(&spec), replace).await?;
    writeln!(out, "added channel {}", spec.id)?;
    Ok(())
}

async fn rm(ctx: &mut Ctx, a: IdArgs, out: &mut impl Write) -> Result<(), CtlError> {
    validate::channel_id(&a.id)?;
    catalog::remove(ctx, &a.id).await?;
    writeln!(out, "removed channel {}", a.id)?;
    Ok(())
}

async fn list(ctx: &mut Ctx, a: ListArgs, out: &mut impl Write) -> Result<(), CtlError> {
    let entries = catalog::list(ctx).await?;
    if a.json {
        let specs: Vec<&ChannelSpec> = entries.iter().filter_map(|(_, s)| s.as_ref()).collect();
        serde_json::to_writer_pretty(&mut *out, &specs).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|(id, spec)| match spec {
            Some(s) => vec![
                safe(id).into_owned(),
                safe(or_dash(&s.name)).into_owned(),
                safe(&s.profile).into_owned(),
                safe(or_dash(&s.provider)).into_owned(),
                if s.pinned { "yes" } else { "no" }.to_string(),
                safe(&s.url).into_owned(),
            ],
            None => vec![
                safe(id).into_owned(),
                "(indexed, but its hash is missing)".to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ],
        })
        .collect();
    table(
        out,
        &["ID", "NAME", "PROFILE", "PROVIDER", "PINNED", "URL"],
        &rows,
    )?;
    Ok(())
}

async fn show(ctx: &mut Ctx, a: ShowArgs, out: &mut impl Write) -> Result<(), CtlError> {
    validate::channel_id(&a.id)?;
    let Some(spec) = catalog::get(ctx, &a.id).await? else {
        return Err(CtlError::NotFound(a.id));
    };
    if a.json {
        serde_json::to_writer_pretty(&mut *out, &spec).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    let backups = if spec.backup_urls.is_empty() {
        "-".to_string()
    } else {
        spec.backup_urls.join(" ")
    };
    let rows = [
        ("id", spec.id.as_str()),
        ("name", or_dash(&spec.name)),
        ("url", spec.url.as_str()),
        ("backup_urls", backups.as_str()),
        ("profile", spec.profile.as_str()),
        ("provider", or_dash(&spec.provider)),
        ("pinned", if spec.pinned { "yes" } else { "no" }),
        ("group", or_dash(&spec.group)),
    ];
    for (field, value) in rows {
        writeln!(out, "{:<12} {}", format!("{field}:"), safe(value))?;
    }
    Ok(())
}
