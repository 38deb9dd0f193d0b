//! Locating the workspace's binaries (farm-node, farmctl, farm-coordinator, fake-ffmpeg).
//!
//! A test executable lives in `target/<profile>/deps/`; binaries of the same build are in
//! `target/<profile>/`. Cargo builds a package's own binaries (fake-ffmpeg) before its integration
//! tests, but not other packages' binaries: build those first (`cargo build --workspace --bins`).

use std::path::PathBuf;

/// Directory holding the workspace binaries of the running test's profile.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe of the test binary");
    let dir = exe
        .parent()
        .expect("test binary has a parent directory")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(|p| p.to_path_buf()).unwrap_or(dir)
    } else {
        dir
    }
}

/// Path of the workspace binary `name`. Panics with how to build it if it is missing.
pub fn bin_path(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    if !path.is_file() {
        panic!(
            "binary {name:?} not found at {}: build it first: cargo build --workspace --bins",
            path.display()
        );
    }
    path
}

/// Path of the fake ffmpeg binary (`tests/src/bin/fake-ffmpeg.rs`).
pub fn fake_ffmpeg() -> PathBuf {
    bin_path("fake-ffmpeg")
}
