//! streamfarm's test harness: fixtures that run the real things a test needs.
//!
//! Every fixture owns what it starts (a redis-server, a fake IPTV provider, a farm-node, temp dirs) and
//! cleans it up on drop, also when the test panics, printing the tail of the relevant log in that case.
//! Nothing here shares state between tests: nextest runs each test in its own process, concurrently,
//! so every fixture takes its own free port and its own temp dir. The only thing shared between
//! processes is the generated test media file (see [`media`]), created race-free once per machine.
//!
//! No fixture synchronises with `sleep`: waits poll a condition with a deadline ([`wait::eventually`]).

pub mod abuse;
pub mod bins;
pub mod coordinator;
pub mod daemon;
pub mod farm;
pub mod fixtures;
pub mod hls;
pub mod invariants;
pub mod launch;
pub mod media;
pub mod netproxy;
pub mod nginx;
pub mod node;
pub mod player;
pub mod ports;
pub mod procs;
pub mod provider;
pub mod redis;
pub mod signal;
pub mod ts;
pub mod wait;
