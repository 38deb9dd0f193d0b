//! `farm-coordinator`: the farm's coordinator and the operator CLI's logic.
//!
//! The coordinator is the only component that decides a channel is idle or a node is dead. Several
//! may run; one leads ([`leader`]). Each tick the leader ([`tick`]) stops idle channels, reaps dead
//! nodes and re-homes their watched channels, reconciles stale keys and keeps pinned channels
//! running; every write it makes is a Lua script fenced by the leader lease. [`run`] ([`daemon`])
//! owns the process's life: the named background tasks (`leader`, `tick`, `http`), their
//! supervision, and a bounded graceful shutdown that gives the leader lease up. [`Shared`] is what
//! those tasks share.
//!
//! - [`ctl`]: `farmctl`, the operator CLI, as a library (`ctl::run`) so it can be tested without
//!   spawning a process; `src/bin/farmctl.rs` only parses arguments and maps errors to exit codes.

pub mod config;
pub mod ctl;
pub mod daemon;
pub mod error;
pub mod events;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod shared;
pub mod store;
pub mod tick;
pub mod view;

pub use daemon::{run, Coordinator};
pub use error::CoordinatorError;
pub use shared::Shared;
