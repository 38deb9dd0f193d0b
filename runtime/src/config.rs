//! One configuration mechanism for both daemons: every setting is read from its command-line flag,
//! else its `FARM_*` environment variable, else the optional TOML file (`--config`), else its
//! default, and each setting is declared once, in a [`settings!`](crate::settings) list.
//!
//! A declaration is a clap field (doc comment = `--help` text) with its type and its default. The
//! macro makes of the list:
//! - the clap `Args` struct, every field an `Option` (clap reads flag and environment), plus the
//!   `config` flag. Each setting is the long flag of its name (`hls_time`: `--hls-time`), reads the
//!   environment variable `FARM_<NAME>` (`FARM_HLS_TIME`) and its text with its type's
//!   [`Value::value_parser`]; an `#[arg(...)]` on the setting adds to that or overrides it (e.g.
//!   `hide_env_values = true`, another `env`). A literal default is added to the help text as
//!   `[default: ...]`;
//! - the resolved struct, every setting with a default as its plain type, the others as `Option`;
//! - `Args::resolve`, which fills what flag and environment left empty from the file (its keys are
//!   the field names, i.e. the long flag names with `_` for `-`), then from the default.
//!
//! A default is either a literal, parsed like the flag's text (`= "2s"`), or an expression for a
//! default that depends on the machine or on settings declared before it (`=> hostname()`; its help
//! text then says the default in words). How a setting's text and its file value are read is its
//! type's [`Value`] implementation, its flag's value parser included.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A setting that cannot be used, with the sentence to show the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// How a setting's value is read from text (a default, or a string in the file), from a TOML
/// value in the file, and from its flag or environment variable.
pub trait Value: Sized + Clone + Send + Sync + 'static {
    /// The delimiter of the flag's text when a setting is a list of values.
    const DELIMITER: Option<char> = None;

    /// Reads the value from text: a default, a string in the file, and the flag's text unless
    /// [`Value::value_parser`] reads that its own way.
    fn parse(text: &str) -> Result<Self, String>;

    /// The flag's clap value parser (of an item, for a list): [`Value::parse`], unless the flag
    /// reads the text its own way (clap's parser for the type, or other messages).
    fn value_parser() -> clap::builder::ValueParser {
        clap::builder::ValueParser::new(Self::parse)
    }

    /// Reads the value from the file. A string is read as text; other TOML types where they fit.
    fn from_toml(value: toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::String(s) => Self::parse(&s),
            other => Err(format!("expected a string, found {}", other.type_str())),
        }
    }
}

impl Value for String {
    fn parse(text: &str) -> Result<Self, String> {
        Ok(text.to_string())
    }

    fn value_parser() -> clap::builder::ValueParser {
        clap::value_parser!(String)
    }
}

impl Value for PathBuf {
    fn parse(text: &str) -> Result<Self, String> {
        Ok(PathBuf::from(text))
    }

    fn value_parser() -> clap::builder::ValueParser {
        clap::value_parser!(PathBuf)
    }
}

impl Value for SocketAddr {
    fn parse(text: &str) -> Result<Self, String> {
        trimmed(text, || {
            format!("invalid address {text:?}: use e.g. 127.0.0.1:8080")
        })
    }

    fn value_parser() -> clap::builder::ValueParser {
        clap::value_parser!(SocketAddr).into()
    }
}

/// Durations as operators write them (`500ms`, `5s`, `2m`), see [`farm_proto::duration`].
impl Value for Duration {
    fn parse(text: &str) -> Result<Self, String> {
        farm_proto::duration::parse(text)
    }
}

/// `text` without the white space around it, read with `FromStr`; `error` says why not.
fn trimmed<T: std::str::FromStr>(text: &str, error: impl FnOnce() -> String) -> Result<T, String> {
    text.trim().parse().map_err(|_| error())
}

/// A TOML integer as is, a string read as text (`what` names the expected kind in errors).
fn integer_or_text<T: Value + TryFrom<i64>>(value: toml::Value, what: &str) -> Result<T, String> {
    match value {
        toml::Value::Integer(n) => T::try_from(n).map_err(|_| format!("{n} is out of range")),
        toml::Value::String(s) => T::parse(&s),
        other => Err(format!("expected {what}, found {}", other.type_str())),
    }
}

/// A count: a whole number, in the file also as a TOML integer.
macro_rules! count {
    ($($t:ty),*) => {$(
        impl Value for $t {
            fn parse(text: &str) -> Result<Self, String> {
                trimmed(text, || format!("invalid number {text:?}: use a whole number from 0"))
            }

            fn from_toml(value: toml::Value) -> Result<Self, String> {
                integer_or_text(value, "a number")
            }

            fn value_parser() -> clap::builder::ValueParser {
                clap::value_parser!($t).into()
            }
        }
    )*};
}
count!(u32, usize);

/// A size in bytes: `512M`, `2G`, `16K` or bytes (powers of 1024; see [`parse_size`]). In the file
/// also a TOML integer (bytes). Every `u64` setting of the farm is a size.
impl Value for u64 {
    fn parse(text: &str) -> Result<Self, String> {
        parse_size(text)
    }

    fn from_toml(value: toml::Value) -> Result<Self, String> {
        integer_or_text(value, "a size")
    }
}

impl Value for f64 {
    fn parse(text: &str) -> Result<Self, String> {
        trimmed(text, || format!("invalid number {text:?}"))
    }

    fn value_parser() -> clap::builder::ValueParser {
        clap::value_parser!(f64).into()
    }

    fn from_toml(value: toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Float(f) => Ok(f),
            toml::Value::Integer(n) => Ok(n as f64),
            toml::Value::String(s) => Self::parse(&s),
            other => Err(format!("expected a number, found {}", other.type_str())),
        }
    }
}

/// A list: comma-separated text (empty items skipped), in the file a TOML array.
impl<T: Value> Value for Vec<T> {
    const DELIMITER: Option<char> = Some(',');

    fn parse(text: &str) -> Result<Self, String> {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(T::parse)
            .collect()
    }

    fn from_toml(value: toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Array(items) => items.into_iter().map(T::from_toml).collect(),
            toml::Value::String(s) => Self::parse(&s),
            other => Err(format!("expected a list, found {}", other.type_str())),
        }
    }

    fn value_parser() -> clap::builder::ValueParser {
        T::value_parser()
    }
}

/// Parses `512M`, `2G`, `100k`, `1048576` (bytes; powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid size {s:?}: use e.g. 512M, 2G or bytes");
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return Err(bad()),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// The settings file: a TOML table whose keys are taken one by one as settings are resolved; a key
/// nobody took is a mistake ([`File::finish`]).
#[derive(Debug, Default)]
pub struct File {
    /// For messages; empty without a file.
    path: String,
    table: toml::Table,
}

impl File {
    /// Reads the file at `path`; without one, an empty file.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {shown}: {e}")))?;
        Self::parse(&shown, &text)
    }

    /// Parses `text` as the file `path` (named in errors).
    pub fn parse(path: &str, text: &str) -> Result<Self, ConfigError> {
        let table = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError(format!("config file {path}: {e}")))?;
        Ok(Self {
            path: path.to_string(),
            table,
        })
    }

    /// The setting `key`: `flag` (flag or environment) if set, else the file's value. The file's
    /// key is taken either way (so it is not left over), but read only when used.
    pub fn setting<T: Value>(
        &mut self,
        flag: Option<T>,
        key: &str,
    ) -> Result<Option<T>, ConfigError> {
        let raw = self.table.remove(key);
        match (flag, raw) {
            (Some(v), _) => Ok(Some(v)),
            (None, None) => Ok(None),
            (None, Some(v)) => T::from_toml(v)
                .map(Some)
                .map_err(|e| ConfigError(format!("config file {}: {key}: {e}", self.path))),
        }
    }

    /// Takes the table `key` (e.g. `[profiles.<name>]`), read with serde.
    pub fn take_section<T: serde::de::DeserializeOwned>(
        &mut self,
        key: &str,
    ) -> Result<BTreeMap<String, T>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(BTreeMap::new()),
            Some(v) => v
                .try_into()
                .map_err(|e| ConfigError(format!("config file {}: [{key}]: {e}", self.path))),
        }
    }

    /// Refuses the keys no setting took.
    pub fn finish(self) -> Result<(), ConfigError> {
        match self.table.keys().next() {
            None => Ok(()),
            Some(key) => Err(ConfigError(format!(
                "config file {}: unknown setting `{key}` (settings are the long flag names, with '_' for '-')",
                self.path
            ))),
        }
    }
}

/// Adds its literal default to the help of a flag, as a sentence of its own: `<help>. [default: X]`
/// (clap's derive drops a single sentence's final period; it is put back).
pub fn show_default(arg: clap::Arg, defaults: &[(&str, &str)]) -> clap::Arg {
    let Some((_, default)) = defaults.iter().find(|(id, _)| arg.get_id() == *id) else {
        return arg;
    };
    let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
    let end = if help.ends_with('.') || help.is_empty() {
        ""
    } else {
        "."
    };
    arg.help(format!("{help}{end} [default: {default}]"))
}

/// The machine's host name, made to fit the id alphabet (A-Z a-z 0-9 _ - .; others become `-`),
/// at most `max` characters; `fallback` when it has none. A default for node and coordinator ids.
pub fn host_name(max: usize, fallback: &str) -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let id: String = raw
        .trim()
        .chars()
        .map(|c| match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '-' | '_' | '.' => c,
            _ => '-',
        })
        .take(max)
        .collect();
    if id.is_empty() {
        fallback.into()
    } else {
        id
    }
}

/// The declared default `text` of the setting `name`, read like the flag's text.
pub fn default_value<T: Value>(name: &str, text: &str) -> Result<T, ConfigError> {
    T::parse(text).map_err(|e| ConfigError(format!("the default of {name}: {e}")))
}

/// `FARM_` and `name` in upper case, at compile time: the environment variable of a setting.
#[doc(hidden)]
#[macro_export]
macro_rules! env_name {
    ($name:ident) => {{
        const NAME: &str = concat!("FARM_", stringify!($name));
        const UPPER: [u8; NAME.len()] = $crate::config::ascii_upper(NAME);
        const TEXT: &str = match ::std::str::from_utf8(&UPPER) {
            Ok(text) => text,
            Err(_) => panic!("a setting's name is ASCII"),
        };
        TEXT
    }};
}

/// `text` in upper case (ASCII letters), as an array of its `N` bytes; for [`env_name!`].
#[doc(hidden)]
pub const fn ascii_upper<const N: usize>(text: &str) -> [u8; N] {
    let bytes = text.as_bytes();
    let mut upper = [0; N];
    let mut i = 0;
    while i < N {
        upper[i] = bytes[i].to_ascii_uppercase();
        i += 1;
    }
    upper
}

/// Declares a daemon's settings once; see the [module docs](crate::config). Input:
///
/// ```text
/// settings! {
///     /// docs of the clap struct
///     #[derive(Debug, Clone, Default, clap::Parser)]
///     #[command(name = "...")]
///     pub struct Args;
///     /// docs of the resolved struct
///     #[derive(Debug, Clone)]
///     pub struct Config {
///         /// fields that are no flag, set after `resolve` (start as `Default::default()`)
///         pub profiles: BTreeMap<String, Profile>,
///     }
///     /// help of --config
///     #[arg(long, env = "FARM_CONFIG")]
///     config;
///     /// help of --hls-time (its variable is FARM_HLS_TIME)
///     hls_time: Duration = "2s",
///     /// help of --node-id ... [default: the host name]
///     node_id: String => hostname(),
///     /// help of --admin-token (no default: `Option<String>` in Config)
///     #[arg(hide_env_values = true)]
///     admin_token: String,
/// }
/// ```
#[macro_export]
macro_rules! settings {
    (
        $(#[$am:meta])*
        pub struct $args:ident;
        $(#[$cm:meta])*
        pub struct $cfg:ident { $( $(#[$xm:meta])* pub $x:ident : $xt:ty ),* $(,)? }
        $(#[$fm:meta])*
        config;
        $(
            $(#[$m:meta])*
            $field:ident : $ty:ty $(= $def:literal)? $(=> $computed:expr)?
        ),* $(,)?
    ) => {
        $(#[$am])*
        #[command(mut_args = |a| $crate::config::show_default(a, $args::DEFAULTS))]
        pub struct $args {
            $(#[$fm])*
            pub config: Option<::std::path::PathBuf>,
            $(
                #[arg(
                    long,
                    env = $crate::env_name!($field),
                    value_parser = <$ty as $crate::config::Value>::value_parser(),
                    value_delimiter = <$ty as $crate::config::Value>::DELIMITER,
                )]
                $(#[$m])*
                // Plain `Option`: clap recognises it by name.
                pub $field: Option<$ty>,
            )*
        }

        $(#[$cm])*
        pub struct $cfg {
            $( pub $field: $crate::settings!(@ty $ty ; $($def)? ; $($computed)?), )*
            $( $(#[$xm])* pub $x: $xt, )*
        }

        impl $args {
            /// The literal defaults, by setting (the help shows them).
            pub const DEFAULTS: &'static [(&'static str, &'static str)] =
                &[$( $( (stringify!($field), $def), )? )*];

            /// Each setting from its flag or environment variable, else the file (`--config`),
            /// else its default; the file is returned for the sections and keys left in it.
            pub fn resolve(
                self,
            ) -> ::std::result::Result<($cfg, $crate::config::File), $crate::config::ConfigError> {
                let mut file = $crate::config::File::load(self.config.as_deref())?;
                $(
                    let $field = $crate::settings!(
                        @value self.$field, file, stringify!($field), $ty ; $($def)? ; $($computed)?
                    );
                )*
                Ok(($cfg { $($field,)* $($x: ::std::default::Default::default(),)* }, file))
            }
        }
    };
    (@ty $t:ty ; ; ) => { ::std::option::Option<$t> };
    (@ty $t:ty ; $d:literal ; ) => { $t };
    (@ty $t:ty ; ; $c:expr) => { $t };
    (@value $v:expr, $file:ident, $name:expr, $t:ty ; ; ) => {
        $file.setting::<$t>($v, $name)?
    };
    (@value $v:expr, $file:ident, $name:expr, $t:ty ; $d:literal ; ) => {
        match $file.setting::<$t>($v, $name)? {
            Some(v) => v,
            None => $crate::config::default_value::<$t>($name, $d)?,
        }
    };
    (@value $v:expr, $file:ident, $name:expr, $t:ty ; ; $c:expr) => {
        match $file.setting::<$t>($v, $name)? {
            Some(v) => v,
            None => $c,
        }
    };
}

#[cfg(test)]
mod tests;
