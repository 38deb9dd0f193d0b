//! The guard: a fence that does not need the node process to run (promises 1 and 2).
//!
//! Every node runs one guard, the same binary re-executed as `farm-node __guard`, with its stdin
//! and stdout as a control pipe ([`proto`]). The node keeps moving its deadline: after each
//! successful lease renewal it sends the time the renewal was sent + ⅔ of the lease TTL, on
//! CLOCK_MONOTONIC ([`fence`]). The node announces each FFmpeg it spawns (pid + kernel start time)
//! and each reap. When the deadline passes, the guard SIGKILLs every announced FFmpeg group whose
//! start time still matches, and every marked FFmpeg child of the node it finds in `/proc`, and
//! closes every upstream connection: the egress gateways FFmpeg reads through live in the guard
//! ([`crate::egress`]), so a frozen or wedged node cannot keep them open. Until a later deadline
//! arrives the gateways answer 503 and an FFmpeg announced meanwhile is killed at once.
//!
//! Lifetimes: the guard ends when the node does (EOF on its stdin), killing what it tracks; when the
//! guard dies, the node stops every channel and starts a new guard ([`GuardTask::run`]). A frozen
//! host (node, FFmpeg and guard alike) cannot fence while frozen; when it thaws, the guard looks at
//! the clock before anything else, and its gateways relay nothing past the deadline.

mod client;
mod control;
pub mod fence;
pub mod limits;
mod process;
pub mod proto;
mod server;

pub use client::{GatewayHandle, Guard, Tracked};
pub use limits::Limits;
pub use process::GuardTask;
pub use server::main;

/// The hidden first argument that runs the binary as a guard.
pub const ARG: &str = "__guard";

/// Whether this process was started as a guard (checked in `main` before argument parsing).
pub fn is_guard_invocation() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a == ARG)
}
