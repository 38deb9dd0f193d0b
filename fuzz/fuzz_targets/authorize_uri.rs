//! `farm_node::http::authorize_uri` (nginx's `/auth`, the access socket): never panics, and what it
//! lets through names one file inside one channel folder: an id and a file name from the strict
//! patterns, joined under the HLS root without leaving it.
#![no_main]

use arbitrary::Arbitrary;
use clap::Parser;
use farm_node::config::{Args, Config};
use farm_node::http::authorize_uri;
use libfuzzer_sys::fuzz_target;
use std::path::{Component, Path};
use std::sync::OnceLock;

fn config(signed: bool) -> &'static Config {
    static PLAIN: OnceLock<Config> = OnceLock::new();
    static SIGNED: OnceLock<Config> = OnceLock::new();
    let make = |extra: &[&str]| {
        let mut argv = vec!["farm-node", "--node-id", "fuzz", "--hls-root", "/srv/hls"];
        argv.extend_from_slice(extra);
        Config::from_args(Args::parse_from(argv)).expect("fuzz config")
    };
    if signed {
        SIGNED.get_or_init(|| make(&["--token-secret", "fuzz-secret-0123456789"]))
    } else {
        PLAIN.get_or_init(|| make(&[]))
    }
}

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    uri: &'a str,
    client: &'a str,
    signed: bool,
}

fuzz_target!(|input: Input<'_>| {
    let Ok(p) = authorize_uri(config(input.signed), input.uri, input.client) else {
        return;
    };
    assert!(farm_proto::validate::channel_id(&p.id).is_ok(), "{p:?}");
    assert_eq!(farm_proto::validate::hls_file(&p.file), Ok(p.kind), "{p:?}");
    let root = Path::new("/srv/hls");
    let path = root.join(&p.id).join(&p.file);
    assert!(
        path.strip_prefix(root)
            .map(|rel| rel.components().count() == 2
                && rel.components().all(|c| matches!(c, Component::Normal(_))))
            .unwrap_or(false),
        "{} escapes its channel folder ({:?})",
        path.display(),
        input.uri
    );
    // What was authorized is what the path says, not a decoded or normalised variant of it.
    let path_part = input.uri.split(['?', '#']).next().unwrap_or("");
    assert!(
        path_part.ends_with(&format!("/{}/{}", p.id, p.file)),
        "{input:?} -> {p:?}"
    );
});
