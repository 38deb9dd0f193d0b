use super::*;
use clap::Parser;

#[test]
fn flags_win_over_file_and_file_over_defaults() {
    let defaults = Config::from_args(Args::parse_from(["farm-node"])).expect("defaults");
    assert_eq!(
        defaults.allowed_schemes,
        farm_proto::validate::DEFAULT_ALLOWED_SCHEMES,
        "the node's default schemes are the farm's"
    );
    assert_eq!(defaults.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
    assert_eq!(defaults.public_url, "http://127.0.0.1:8080");
    assert_eq!(defaults.ffmpeg_sandbox, crate::sandbox::Mode::Auto);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        "node_id = \"from-file\"\nhls_time = \"4s\"\nmin_free = \"1G\"\n[profiles.low]\nargs = [\"-c:v\", \"libx264\"]\nweight = 3\n",
    )
    .expect("write");
    let args = Args::parse_from([
        "farm-node",
        "--config",
        path.to_str().expect("utf8"),
        "--node-id",
        "from-flag",
    ]);
    let cfg = Config::from_args(args).expect("valid");
    assert_eq!(cfg.node_id, "from-flag");
    assert_eq!(cfg.hls_time, Duration::from_secs(4));
    assert_eq!(cfg.min_free, 1 << 30);
    assert_eq!(cfg.profiles["low"].weight, 3);
    assert!(cfg.profiles.contains_key("copy"));
    assert_eq!(cfg.start_timeout, Duration::from_secs(10));
}

#[test]
fn every_kind_of_setting_reads_from_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:9000\"\nffmpeg_cpu = 1\nhls_list_size = 4\n\
         egress_deny = [\"10.0.0.0/8\", \"::1\"]\nffmpeg_sandbox = \"off\"\n\
         allowed_schemes = [\"HTTP\"]\naccel_redirect = \"/_owner/\"\nadmin_token = \"\"\n",
    )
    .expect("write");
    let cfg = Config::from_args(Args::parse_from([
        "farm-node",
        "--config",
        path.to_str().expect("utf8"),
    ]))
    .expect("valid");
    assert_eq!(
        cfg.public_url, "http://127.0.0.1:9000",
        "derived from the file's listen"
    );
    assert_eq!((cfg.ffmpeg_cpu, cfg.hls_list_size), (1.0, 4));
    assert_eq!(cfg.egress_deny.len(), 2);
    assert_eq!(cfg.ffmpeg_sandbox, crate::sandbox::Mode::Off);
    assert_eq!(cfg.allowed_schemes, ["http"]);
    assert_eq!(cfg.accel_redirect.as_deref(), Some("/_owner"));
    assert_eq!(cfg.admin_token, None, "empty is unset");

    for (text, says) in [
        (
            "egress_allow = [\"nope\"]\n",
            "egress_allow: invalid network \"nope\"",
        ),
        (
            "hls_time = 4\n",
            "hls_time: expected a string, found integer",
        ),
        ("[profiles.x]\nweight = 2\n", "[profiles]"),
    ] {
        std::fs::write(&path, text).expect("write");
        let err = Config::from_args(Args::parse_from([
            "farm-node",
            "--config",
            path.to_str().expect("utf8"),
        ]))
        .expect_err(text);
        assert!(err.to_string().contains(says), "{text:?}: {err}");
    }
}

#[test]
fn bad_settings_are_refused_with_a_sentence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node.toml");
    std::fs::write(&path, "no_such_setting = 1\n").expect("write");
    let err = Config::from_args(Args::parse_from([
        "farm-node",
        "--config",
        path.to_str().expect("utf8"),
    ]))
    .expect_err("unknown key");
    assert!(err.to_string().contains("no_such_setting"), "{err}");
    let err =
        Config::from_args(Args::parse_from(["farm-node", "--node-id", "a:b"])).expect_err("bad id");
    assert!(err.to_string().contains("invalid node id"), "{err}");
    assert!(Args::try_parse_from(["farm-node", "--hls-time", "soon"]).is_err());
    assert_eq!(parse_size("512M"), Ok(512 << 20));
    let net = IpNet::parse("10.1.0.0/16").expect("cidr");
    assert!(net.contains("10.1.200.3".parse().expect("ip")));
    assert!(!net.contains("10.2.0.1".parse().expect("ip")));
    assert!(IpNet::parse("0.0.0.0/0")
        .expect("all")
        .contains("8.8.8.8".parse().expect("ip")));
    assert!(IpNet::parse("::1")
        .expect("v6")
        .contains("::1".parse().expect("ip")));
    assert!(IpNet::parse("10.0.0.0/33").is_err() && IpNet::parse("nope").is_err());
    assert!(parse_size("12Q").is_err());
    // Networks and the sandbox mode are read by their flags' parsers: clap says which flag.
    for (flag, value, says) in [
        (
            "--egress-allow",
            "10.0.0.0/8,nope",
            "\"nope\": use an IP or a CIDR",
        ),
        ("--egress-deny", "10.0.0.0/40", "use an IP or a CIDR"),
        ("--trusted-proxies", "x", "use an IP or a CIDR"),
        ("--ffmpeg-sandbox", "maybe", "auto, require or off"),
    ] {
        let err = Args::try_parse_from(["farm-node", flag, value]).expect_err(flag);
        let err = err.to_string();
        assert!(
            err.contains(says) && err.contains(flag),
            "{flag} {value}: {err}"
        );
    }
    let ok = Config::from_args(Args::parse_from([
        "farm-node",
        "--egress-allow",
        "192.168.0.0/16, 10.9.9.9",
        "--ffmpeg-sandbox",
        "require",
    ]))
    .expect("good egress settings");
    assert_eq!(ok.egress_allow.len(), 2);
    assert!(ok.egress_deny.is_empty());
    assert_eq!(ok.ffmpeg_sandbox, crate::sandbox::Mode::Require);
    assert_eq!(
        (ok.max_empty_runs, ok.egress_bandwidth, ok.egress_rate),
        (5, 50, 20)
    );
    assert_eq!((ok.ffmpeg_memory, ok.ffmpeg_cpu), (2 << 30, 2.0));
    for (flag, value, says) in [
        ("--max-empty-runs", "0", "max_empty_runs"),
        ("--ffmpeg-cpu", "2000", "ffmpeg_cpu"),
        ("--ffmpeg-cpu", "NaN", "ffmpeg_cpu"),
        ("--ffmpeg-memory", "1M", "ffmpeg_memory"),
    ] {
        let err = Config::from_args(Args::parse_from(["farm-node", flag, value])).expect_err(flag);
        assert!(err.to_string().contains(says), "{flag} {value}: {err}");
    }
}

#[test]
fn http_and_admission_settings_have_safe_defaults_and_checks() {
    let cfg = Config::from_args(Args::parse_from(["farm-node"])).expect("defaults");
    assert_eq!(cfg.http_header_timeout, Duration::from_secs(10));
    assert_eq!(cfg.http_idle_timeout, Duration::from_secs(75));
    assert_eq!(cfg.http_max_header_bytes, 16 << 10);
    assert_eq!(cfg.http_max_connections, None);
    assert_eq!(cfg.http_max_connections_per_addr, 64);
    assert_eq!(
        (cfg.max_concurrent_starts, cfg.start_rate, cfg.start_burst),
        (8, 5, 20)
    );
    assert_eq!(cfg.unknown_channel_ttl, Duration::from_secs(5));
    let trusted: Vec<String> = cfg.trusted_proxies.iter().map(|n| n.to_string()).collect();
    assert_eq!(trusted, ["127.0.0.1/32", "::1/128"], "not all of 127/8");
    for (args, says) in [
        (
            &["--admin-token", "short"][..],
            "admin_token is 5 bytes long; it must be at least 16",
        ),
        (&["--admin-token", "sixteen bytes ok"][..], "visible ASCII"),
        (&["--http-max-header-bytes", "4K"][..], "at least 8K"),
        (&["--http-header-timeout", "0s"][..], "above zero"),
        (&["--max-concurrent-starts", "0"][..], "at least 1"),
        (&["--http-max-connections", "0"][..], "at least 1"),
    ] {
        let mut argv = vec!["farm-node"];
        argv.extend_from_slice(args);
        let err = Config::from_args(Args::parse_from(argv)).expect_err(args[0]);
        assert!(err.to_string().contains(says), "{args:?}: {err}");
        assert!(
            !err.to_string().contains("short"),
            "the token is not echoed: {err}"
        );
    }
    let ok = Config::from_args(Args::parse_from([
        "farm-node",
        "--admin-token",
        "0123456789abcdef",
        "--http-max-connections",
        "300",
    ]))
    .expect("a 16-byte token");
    assert_eq!(ok.http_max_connections, Some(300));
}

#[test]
fn networks_read_as_before() {
    let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
    let net = IpNet::parse(" 10.1.2.3/8 ").expect("host bits kept, spaces ignored");
    assert!(net.contains(ip("10.9.9.9")) && !net.contains(ip("11.0.0.1")));
    assert_eq!(net.to_string(), "10.1.2.3/8");
    assert!(!IpNet::parse("0.0.0.0/0").expect("v4").contains(ip("::1")));
    assert_eq!(IpNet::parse("::1").expect("v6").to_string(), "::1/128");
    for bad in ["10.0.0.0/33", "::/129", "10.0.0.0/", "nope", ""] {
        assert!(IpNet::parse(bad).is_err(), "{bad:?}");
    }
}
