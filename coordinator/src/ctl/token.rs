//! `farmctl token`: mints a signed playback token (see `farm_proto::token`). Needs no Redis.

use super::error::CtlError;
use clap::Args;
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Channel the token opens.
    pub channel: String,
    /// How long the token is valid (e.g. 30m, 6h).
    #[arg(long, default_value = "1h", value_parser = farm_proto::duration::parse)]
    pub ttl: Duration,
    /// Bind the token to one viewer address (as nginx sees it in X-Real-IP).
    #[arg(long)]
    pub client_ip: Option<String>,
    /// The secret the nodes use (FARM_TOKEN_SECRET), at least 16 bytes.
    #[arg(long, env = "FARM_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,
    /// Print the playback path `/live/<token>/<channel>/index.m3u8` instead of the bare token.
    #[arg(long)]
    pub path: bool,
}

pub fn run(args: TokenArgs, out: &mut impl Write) -> Result<(), CtlError> {
    farm_proto::validate::channel_id(&args.channel)?;
    let secret = args.token_secret.filter(|s| !s.is_empty()).ok_or_else(|| {
        CtlError::Usage("no token secret: pass --token-secret or set FARM_TOKEN_SECRET".into())
    })?;
    if args.ttl.is_zero() {
        return Err(CtlError::Usage("--ttl must be longer than 0".into()));
    }
    if let Some(ip) = &args.client_ip {
        if ip.parse::<std::net::IpAddr>().is_err() {
            return Err(CtlError::Usage(format!(
                "--client-ip {ip:?} is not an IP address"
            )));
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let token = farm_proto::token::mint(
        secret.as_bytes(),
        &args.channel,
        now + args.ttl.as_secs().max(1),
        args.client_ip.as_deref(),
    )
    .map_err(|e| CtlError::Usage(e.to_string()))?;
    let line = if args.path {
        format!("/live/{token}/{}/index.m3u8", args.channel)
    } else {
        token
    };
    writeln!(out, "{line}").map_err(|e| CtlError::Usage(format!("cannot write output: {e}")))?;
    Ok(())
}
