//! `farm-proto`: the written contract between farm nodes, coordinators, farmctl and operators.
//!
//! - [`keys`]: one constructor per Redis key; the schema with redis-cli examples is in `proto/README.md`.
//! - [`scripts`]: the Lua scripts (`proto/lua/*.lua`) that claim, renew and release leases and make
//!   gen-checked writes. Times inside them come from Redis `TIME`, never from a node's clock.
//! - [`records`]: the node heartbeat hash and the stream hash as typed records.
//! - [`types`]: catalog entries, stream states, commands and event names.
//! - [`timing`]: the farm-wide timing relations (fence, keepalive, stall, leader renewal).
//! - [`validate`]: every id, file name and URL that comes from outside is checked here.
//! - [`redact`]: credentials out of every URL that is shown, stored or put in FFmpeg's argv.

pub mod duration;
pub mod keys;
pub mod placement;
pub mod records;
pub mod redact;
pub mod redis_url;
pub mod scripts;
pub mod timing;
pub mod token;
pub mod types;
pub mod validate;

pub use keys::Keys;
pub use types::{ChannelSpec, Command, Op, StreamState};

/// How many cases a property test runs: `PROPTEST_CASES` when set (a deeper run), else `default`
/// (kept modest so CI is quick). For the property tests of every crate.
#[doc(hidden)]
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
