//! `farm-coordinator`: the farm's coordinator and the operator CLI's logic.
//!
//! - [`ctl`]: `farmctl`, the operator CLI, as a library (`ctl::run`) so it can be tested without
//!   spawning a process; `src/bin/farmctl.rs` only parses arguments and maps errors to exit codes.

pub mod ctl;
