//! `farmctl`, the operator CLI, as a library: [`Cli`] is the whole command line (clap derive,
//! `FARM_*` environment fallbacks), [`run`] executes it and writes the command's output to `out`.
//!
//! Layout, so commands can be added without restructuring: one module per command group with a
//! `run(ctx, args, out)` function, one variant in [`Command`], one arm in [`run`]. Shared pieces:
//! [`Ctx`] (keys, allowed schemes, a lazily opened Redis connection whose every call is bounded by
//! `--redis-timeout`), [`catalog`] (catalog reads and all-or-nothing writes) and [`CtlError`] (the
//! one place that maps failures to stderr and exit codes).
//!
//! Invariant: a command validates all of its input before its first Redis write, and a command that
//! fails with exit code 2 has changed nothing.

pub mod catalog;
mod channel;
mod ctx;
mod error;
mod events;
mod farm;
pub mod import;
mod ops;
mod output;
mod status;
mod token;

pub use channel::{AddArgs, ChannelCmd, IdArgs, ListArgs, ShowArgs};
pub use ctx::Ctx;
pub use error::{CtlError, EXIT_INPUT, EXIT_RUNTIME};
pub use events::EventsArgs;
pub use import::ImportArgs;
pub use ops::{PinArgs, StartArgs, StopArgs};
pub use status::StatusArgs;

use clap::{Args, Parser, Subcommand};
use farm_proto::validate::DEFAULT_ALLOWED_SCHEMES;
use std::io::Write;
use std::time::Duration;

/// Look at and drive a streamfarm through its Redis.
#[derive(Debug, Parser)]
#[command(name = "farmctl", version, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes (before or after the subcommand).
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Redis to talk to (redis://[user:password@]host:port/db).
    #[arg(
        long,
        global = true,
        env = "FARM_REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub redis_url: String,

    /// Key prefix of the farm (keys are <prefix>:channel:<id>, ...).
    #[arg(long, global = true, env = "FARM_PREFIX", default_value = farm_proto::keys::DEFAULT_PREFIX)]
    pub prefix: String,

    /// URL schemes upstream URLs may use, comma-separated.
    #[arg(
        long,
        global = true,
        env = "FARM_ALLOWED_SCHEMES",
        value_delimiter = ',',
        default_values_t = DEFAULT_ALLOWED_SCHEMES.iter().map(|s| s.to_string())
    )]
    pub allowed_schemes: Vec<String>,

    /// Bound on every Redis call, e.g. 500ms, 5s.
    #[arg(long, global = true, env = "FARM_REDIS_TIMEOUT", default_value = "5s", value_parser = parse_timeout)]
    pub redis_timeout: Duration,
}

impl GlobalArgs {
    /// The defaults, for tests and embedding: local Redis, prefix `farm`, default schemes, 5s.
    pub fn with_redis_url(redis_url: impl Into<String>) -> Self {
        Self {
            redis_url: redis_url.into(),
            prefix: farm_proto::keys::DEFAULT_PREFIX.into(),
            allowed_schemes: DEFAULT_ALLOWED_SCHEMES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            redis_timeout: Duration::from_secs(5),
        }
    }
}

pub(crate) fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = farm_proto::duration::parse(s)?;
    if d.is_zero() {
        return Err("the timeout must be longer than 0".into());
    }
    Ok(d)
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Add, remove, list and show catalog channels.
    #[command(subcommand)]
    Channel(ChannelCmd),
    /// Import every channel of an extended M3U playlist, all or nothing, in bounded chunks.
    Import(ImportArgs),
    /// Mint a signed playback token (for nodes running with --token-secret).
    Token(token::TokenArgs),
    /// Show the leader, the nodes and the running channels.
    Status(StatusArgs),
    /// Stop a running channel (a stop command with its owner's gen, reason "ops").
    Stop(StopArgs),
    /// Start a catalog channel on a node, without waiting for a viewer.
    Start(StartArgs),
    /// Keep a channel running even when nobody watches (it is never idle-stopped).
    Pin(PinArgs),
    /// Let a pinned channel be idle-stopped again.
    Unpin(PinArgs),
    /// Print the audit trail (farm:events), oldest first; --follow keeps printing.
    Events(EventsArgs),
}

/// Runs one farmctl command; its regular output goes to `out`, failures come back as
/// [`CtlError`] (see [`CtlError::report`] and [`CtlError::exit_code`]).
pub async fn run(cli: Cli, out: &mut impl Write) -> Result<(), CtlError> {
    if let Command::Token(args) = cli.command {
        return token::run(args, out);
    }
    let mut ctx = Ctx::new(cli.global)?;
    match cli.command {
        Command::Channel(cmd) => channel::run(&mut ctx, cmd, out).await,
        Command::Import(args) => import::run(&mut ctx, args, out).await,
        Command::Token(_) => Ok(()),
        Command::Status(args) => status::run(&mut ctx, args, out).await,
        Command::Stop(args) => ops::stop(&mut ctx, args, out).await,
        Command::Start(args) => ops::start(&mut ctx, args, out).await,
        Command::Pin(args) => ops::pin(&mut ctx, args, true, out).await,
        Command::Unpin(args) => ops::pin(&mut ctx, args, false, out).await,
        Command::Events(args) => events::run(&mut ctx, args, out).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn globals_have_defaults_and_go_anywhere() {
        let cli =
            Cli::try_parse_from(["farmctl", "channel", "list", "--prefix", "tv"]).expect("parses");
        assert_eq!(cli.global.prefix, "tv");
        assert_eq!(cli.global.redis_timeout, Duration::from_secs(5));
        assert_eq!(cli.global.allowed_schemes, DEFAULT_ALLOWED_SCHEMES);
        let cli = Cli::try_parse_from([
            "farmctl",
            "--allowed-schemes",
            "http,https",
            "--redis-timeout",
            "250ms",
            "import",
            "x.m3u",
        ])
        .expect("parses");
        assert_eq!(cli.global.allowed_schemes, ["http", "https"]);
        assert_eq!(cli.global.redis_timeout, Duration::from_millis(250));
        assert!(
            Cli::try_parse_from(["farmctl", "--redis-timeout", "0s", "channel", "list"]).is_err()
        );
    }

    #[test]
    fn channel_add_options() {
        let cli = Cli::try_parse_from([
            "farmctl",
            "channel",
            "add",
            "bbc1",
            "http://a/1",
            "--backup",
            "http://b/1",
            "--backup",
            "http://c/1",
            "--pinned",
            "--profile",
            "h264",
            "--provider",
            "acme",
            "--name",
            "BBC One",
            "--group",
            "UK",
            "--replace",
        ])
        .expect("parses");
        let Command::Channel(ChannelCmd::Add(a)) = cli.command else {
            panic!("wrong command: {:?}", cli.command);
        };
        assert_eq!(a.backup, ["http://b/1", "http://c/1"]);
        assert!(a.pinned && a.replace);
        assert_eq!(a.name.as_deref(), Some("BBC One"));
    }

    #[tokio::test]
    async fn bad_input_is_refused_before_dialing_redis() {
        // port 1 on localhost: nothing listens; the command must fail on its input first
        let global = GlobalArgs::with_redis_url("redis://127.0.0.1:1/");
        for argv in [
            &["farmctl", "channel", "add", "../x", "http://a/1"][..],
            &["farmctl", "channel", "add", "ok", "file:///etc/passwd"],
            &[
                "farmctl",
                "channel",
                "add",
                "ok",
                "http://a/1",
                "--backup",
                "concat:http://a|b",
            ],
            &[
                "farmctl",
                "channel",
                "add",
                "ok",
                "http://a/1",
                "--profile",
                "a b",
            ],
            &[
                "farmctl",
                "channel",
                "add",
                "ok",
                "http://a/1",
                "--name",
                "a\nb",
            ],
            &["farmctl", "channel", "rm", "a/b"],
            &["farmctl", "channel", "show", ""],
            &["farmctl", "import", "/nonexistent/list.m3u"],
            &["farmctl", "stop", "../etc"],
            &["farmctl", "start", "a b"],
            &["farmctl", "start", "ok", "--node", "n:1"],
            &["farmctl", "pin", "x/y"],
            &["farmctl", "unpin", ""],
            &["farmctl", "events", "--channel", "no/pe"],
            &["farmctl", "events", "--node", "bad node"],
        ] {
            let mut cli = Cli::try_parse_from(argv).expect("parses");
            cli.global = global.clone();
            let mut out = Vec::new();
            let err = run(cli, &mut out).await.expect_err("refused");
            assert_eq!(err.exit_code(), EXIT_INPUT, "{argv:?}: {err}");
            assert!(out.is_empty());
        }
    }

    #[test]
    fn ops_commands_parse() {
        let cli = Cli::try_parse_from(["farmctl", "stop", "bbc1", "--wait", "--timeout", "5s"])
            .expect("parses");
        let Command::Stop(a) = cli.command else {
            panic!("wrong command: {:?}", cli.command);
        };
        assert!(a.wait);
        assert_eq!(a.timeout, Duration::from_secs(5));
        let cli =
            Cli::try_parse_from(["farmctl", "start", "bbc1", "--node", "n2"]).expect("parses");
        let Command::Start(a) = cli.command else {
            panic!("wrong command: {:?}", cli.command);
        };
        assert_eq!(a.node.as_deref(), Some("n2"));
        let cli = Cli::try_parse_from(["farmctl", "events", "-f", "--count", "5"]).expect("parses");
        let Command::Events(a) = cli.command else {
            panic!("wrong command: {:?}", cli.command);
        };
        assert!(a.follow);
        assert_eq!(a.count, 5);
        for bad in [
            &["farmctl", "events", "--count", "0"][..],
            &["farmctl", "stop"],
            &["farmctl", "stop", "a", "--timeout", "0s"],
            &["farmctl", "status", "--bogus"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn unreachable_redis_is_a_runtime_failure() {
        let cli = Cli {
            global: GlobalArgs::with_redis_url("redis://127.0.0.1:1/"),
            command: Command::Channel(ChannelCmd::List(ListArgs {
                json: false,
                show_secrets: false,
            })),
        };
        let err = run(cli, &mut Vec::new()).await.expect_err("no redis");
        assert_eq!(err.exit_code(), EXIT_RUNTIME, "{err}");
        assert!(
            err.to_string()
                .contains("cannot connect to Redis at redis://127.0.0.1:1/"),
            "{err}"
        );
    }
}
