//! FFmpeg output profiles: the built-in ones and those a config file adds (`[profiles.<name>]`).

use serde::Deserialize;
use std::collections::BTreeMap;

/// FFmpeg arguments for one output profile: what goes between the input and the HLS muxer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Profile {
    /// Codec/filter arguments, e.g. `["-c", "copy"]`.
    pub args: Vec<String>,
    /// A transcode costs more than a copy when placing channels (used for capacity accounting).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// The built-in profiles: `copy` (default) and `h264-720p` (H.264/AAC transcode).
pub fn builtin_profiles() -> BTreeMap<String, Profile> {
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let mut m = BTreeMap::new();
    m.insert(
        "copy".to_string(),
        Profile {
            args: s(&["-map", "0:v:0?", "-map", "0:a:0?", "-c", "copy"]),
            weight: 1,
        },
    );
    m.insert(
        "h264-720p".to_string(),
        Profile {
            args: s(&[
                "-map",
                "0:v:0?",
                "-map",
                "0:a:0?",
                "-c:v",
                "libx264",
                "-preset",
                "veryfast",
                "-tune",
                "zerolatency",
                "-vf",
                "scale=-2:720",
                "-b:v",
                "2500k",
                "-maxrate",
                "3000k",
                "-bufsize",
                "5000k",
                "-force_key_frames",
                "expr:gte(t,n_forced*1)",
                "-sc_threshold",
                "0",
                "-c:a",
                "aac",
                "-b:a",
                "128k",
                "-ac",
                "2",
            ]),
            weight: 4,
        },
    );
    m
}
