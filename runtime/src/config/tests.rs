use super::*;
use clap::Parser;

crate::settings! {
    /// A test daemon.
    #[derive(Debug, Clone, Default, clap::Parser)]
    #[command(name = "testd")]
    pub struct Args;
    /// Its settings.
    #[derive(Debug, Clone)]
    pub struct Settings {
        /// Not a flag.
        pub extra: u32,
    }
    /// The file.
    #[arg(long)]
    config;
    /// A duration.
    #[arg(env = "FARM_RUNTIME_TEST_WAIT")]
    wait: Duration = "2s",
    /// A count.
    #[arg(env = "FARM_RUNTIME_TEST_COUNT")]
    count: u32 = "6",
    /// A size.
    size: u64 = "256M",
    /// A list.
    names: Vec<String> = "a,b",
    /// No default.
    socket: PathBuf,
    /// Depends on `count`. [default: count + 1]
    more: u32 => count + 1,
}

fn file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("testd.toml");
    std::fs::write(&path, text).expect("write");
    let path = path.to_str().expect("utf8").to_string();
    (dir, path)
}

fn resolve(argv: &[&str]) -> Result<Settings, ConfigError> {
    let mut all = vec!["testd"];
    all.extend_from_slice(argv);
    let (s, file) = Args::parse_from(all).resolve()?;
    file.finish()?;
    Ok(s)
}

#[test]
fn defaults_apply_when_nothing_is_set() {
    let s = resolve(&[]).expect("defaults");
    assert_eq!(s.wait, Duration::from_secs(2));
    assert_eq!((s.count, s.more, s.extra), (6, 7, 0));
    assert_eq!(s.size, 256 << 20);
    assert_eq!(s.names, ["a", "b"]);
    assert_eq!(s.socket, None);
}

#[test]
fn the_file_wins_over_defaults_and_flags_over_the_file() {
    let (_dir, path) =
        file("wait = \"4s\"\ncount = 9\nsize = \"1G\"\nnames = [\"x\"]\nsocket = \"/run/s\"\n");
    let s = resolve(&["--config", &path]).expect("file");
    assert_eq!(s.wait, Duration::from_secs(4));
    assert_eq!(
        (s.count, s.more),
        (9, 10),
        "a computed default sees the file"
    );
    assert_eq!(s.size, 1 << 30);
    assert_eq!(s.names, ["x"]);
    assert_eq!(s.socket, Some(PathBuf::from("/run/s")));
    let s = resolve(&[
        "--config", &path, "--wait", "500ms", "--names", "p,q", "--size", "2K",
    ])
    .expect("flags");
    assert_eq!(s.size, 2 << 10);
    assert_eq!(s.wait, Duration::from_millis(500));
    assert_eq!(s.names, ["p", "q"]);
    assert_eq!(s.count, 9);
}

/// Environment over file, flag over environment: run in a child process of this test binary
/// with the variables set (tests never change their own environment).
#[test]
fn the_environment_sits_between_flag_and_file() {
    let out = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "config::tests::child_with_environment",
            "--nocapture",
        ])
        .env("FARM_RUNTIME_TEST_CHILD", "1")
        .env("FARM_RUNTIME_TEST_WAIT", "3s")
        .env("FARM_RUNTIME_TEST_COUNT", "11")
        .output()
        .expect("run the child");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("child checked"), "the child ran: {text}");
}

#[test]
fn child_with_environment() {
    if std::env::var_os("FARM_RUNTIME_TEST_CHILD").is_none() {
        return;
    }
    let (_dir, path) = file("wait = \"4s\"\ncount = 9\n");
    let s = resolve(&["--config", &path]).expect("env and file");
    assert_eq!(s.wait, Duration::from_secs(3), "env over file");
    assert_eq!(s.count, 11, "env over file");
    let s = resolve(&["--config", &path, "--count", "1"]).expect("flag, env and file");
    assert_eq!(s.count, 1, "flag over env");
    println!("child checked");
}

#[test]
fn a_bad_file_is_refused_with_a_sentence_naming_the_key() {
    for (text, says) in [
        ("wait = \"soon\"\n", "wait: invalid duration \"soon\""),
        ("count = -1\n", "count: -1 is out of range"),
        ("count = \"many\"\n", "count: invalid number \"many\""),
        ("size = \"12Q\"\n", "size: invalid size \"12Q\""),
        ("names = 3\n", "names: expected a list, found integer"),
        ("socket = 1\n", "socket: expected a string, found integer"),
        ("no_such = 1\n", "unknown setting `no_such`"),
        ("wait = \n", "config file"),
    ] {
        let (_dir, path) = file(text);
        let err = resolve(&["--config", &path]).expect_err(text);
        let err = err.to_string();
        assert!(err.contains(says), "{text:?}: {err}");
        assert!(err.contains(&path), "{text:?} names the file: {err}");
    }
    let err = resolve(&["--config", "/nonexistent/testd.toml"]).expect_err("missing");
    assert!(
        err.to_string().starts_with("cannot read config file"),
        "{err}"
    );
}

#[test]
fn help_shows_literal_defaults() {
    let help = <Args as clap::CommandFactory>::command()
        .render_help()
        .to_string();
    assert!(help.contains("A duration. [default: 2s]"), "{help}");
    assert!(
        help.contains("No default [env: FARM_SOCKET=]"),
        "the variable is the name's: {help}"
    );
    assert!(
        help.contains("A count. [default: 6] [env: FARM_RUNTIME_TEST_COUNT=]"),
        "{help}"
    );
}

#[test]
fn values_read_text_and_toml() {
    assert_eq!(parse_size("512M"), Ok(512 << 20));
    assert_eq!(parse_size(" 16K "), Ok(16 << 10));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert!(parse_size("12Q").is_err() && parse_size("").is_err());
    assert!(parse_size("99999999999T").is_err());
    assert_eq!(<f64 as Value>::from_toml(toml::Value::Integer(2)), Ok(2.0));
    assert_eq!(
        <u64 as Value>::from_toml(toml::Value::Integer(4096)),
        Ok(4096)
    );
    assert_eq!(
        <Vec<String> as Value>::parse(" a, ,b "),
        Ok(vec!["a".into(), "b".into()])
    );
    assert!(<SocketAddr as Value>::parse("nowhere").is_err());
}
