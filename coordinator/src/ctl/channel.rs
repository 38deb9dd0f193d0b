//! `farmctl channel add|rm|list|show`: one catalog entry at a time.

use super::catalog::{self, Entry};
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
    /// Print upstream URLs as written, credentials included (default: redacted).
    #[arg(long)]
    pub show_secrets: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ShowArgs {
    /// Channel id.
    pub id: String,
    /// Print a JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Print upstream URLs as written, credentials included (default: redacted).
    #[arg(long)]
    pub show_secrets: bool,
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
            safe(&clip(value))
        )))
    }
}

/// At most [`CELL`] characters of `s`, with `…` when cut: one odd value (a 1 MB name planted
/// with redis-cli) must not make a table unreadable.
pub(crate) fn clip(s: &str) -> String {
    if s.chars().count() <= CELL {
        s.to_string()
    } else {
        let mut c: String = s.chars().take(CELL - 1).collect();
        c.push('…');
        c
    }
}

/// Widest table cell.
const CELL: usize = 64;

/// A URL as farmctl shows it: redacted unless `--show-secrets`.
pub(crate) fn shown_url(url: &str, show_secrets: bool) -> String {
    if show_secrets {
        url.to_string()
    } else {
        farm_proto::redact::url(url)
    }
}

/// The spec with its URLs redacted (for JSON output without `--show-secrets`).
fn redacted(spec: &ChannelSpec, show_secrets: bool) -> ChannelSpec {
    ChannelSpec {
        url: shown_url(&spec.url, show_secrets),
        backup_urls: spec
            .backup_urls
            .iter()
            .map(|u| shown_url(u, show_secrets))
            .collect(),
        ..spec.clone()
    }
}

/// A warning for channels nodes will refuse to start: FFmpeg reads non-`http` URLs itself, so
/// credentials in them would be in its command line (readable by every local user).
pub(crate) fn credential_warning(specs: &[ChannelSpec]) -> Option<String> {
    let bad: Vec<&str> = specs
        .iter()
        .filter(|s| {
            s.sources().iter().any(|u| {
                !u.to_ascii_lowercase().starts_with("http://")
                    && farm_proto::redact::has_credentials(u)
            })
        })
        .map(|s| s.id.as_str())
        .collect();
    if bad.is_empty() {
        return None;
    }
    let shown: Vec<&str> = bad.iter().take(5).copied().collect();
    Some(format!(
        "warning: {} channel{} ({}{}) carr{} credentials in a non-http URL (userinfo, a token in the query, /live/<user>/<pass>/): nodes refuse to start {}, because FFmpeg would show them in its command line; use the provider's http:// URL (the node's egress gateway then adds the credentials)",
        bad.len(),
        if bad.len() == 1 { "" } else { "s" },
        shown.join(", "),
        if bad.len() > shown.len() { ", ..." } else { "" },
        if bad.len() == 1 { "ies" } else { "y" },
        if bad.len() == 1 { "it" } else { "them" },
    ))
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
    let spec = ChannelSpec {
        name: a.name.unwrap_or_else(|| a.id.clone()),
        id: a.id,
        url: a.url,
        backup_urls: a.backup,
        profile: a.profile,
        provider: a.provider.unwrap_or_default(),
        pinned: a.pinned,
        group: a.group.unwrap_or_default(),
    };
    spec.validate(ctx.allowed_schemes())?;
    Ok(spec)
}

async fn add(ctx: &mut Ctx, a: AddArgs, out: &mut impl Write) -> Result<(), CtlError> {
    let replace = a.replace;
    let spec = spec_from_args(ctx, a)?;
    catalog::write(ctx, std::slice::from_ref(&spec), replace).await?;
    writeln!(out, "added channel {}", spec.id)?;
    if let Some(w) = credential_warning(std::slice::from_ref(&spec)) {
        writeln!(out, "{w}")?;
    }
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
        let specs: Vec<ChannelSpec> = entries
            .iter()
            .filter_map(|(_, e)| match e {
                Entry::Channel(s) => Some(redacted(s, a.show_secrets)),
                _ => None,
            })
            .collect();
        serde_json::to_writer_pretty(&mut *out, &specs).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    let cell = |s: &str| safe(&clip(s)).into_owned();
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|(id, entry)| match entry {
            Entry::Channel(s) => vec![
                cell(id),
                cell(or_dash(&s.name)),
                cell(&s.profile),
                cell(or_dash(&s.provider)),
                if s.pinned { "yes" } else { "no" }.to_string(),
                // The last column is not padded: the whole URL fits.
                safe(&shown_url(&s.url, a.show_secrets)).into_owned(),
            ],
            Entry::Missing => vec![
                cell(id),
                "(indexed, but its hash is missing)".to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ],
            Entry::Unreadable(e) => vec![
                cell(id),
                format!("(unreadable: {})", cell(e)),
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
    if let Some((gen, left)) = catalog::pending(ctx).await? {
        writeln!(
            out,
            "note: import {gen} is committed but {left} of its channels are not applied yet; the next catalog write or `farmctl import --resume` finishes it"
        )?;
    }
    Ok(())
}

async fn show(ctx: &mut Ctx, a: ShowArgs, out: &mut impl Write) -> Result<(), CtlError> {
    validate::channel_id(&a.id)?;
    let Some(spec) = catalog::get(ctx, &a.id).await? else {
        return Err(CtlError::NotFound(a.id));
    };
    let spec = redacted(&spec, a.show_secrets);
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
