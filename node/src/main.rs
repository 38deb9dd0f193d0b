//! The `farm-node` binary: parse settings, set up logging, run until SIGTERM or Ctrl-C (see
//! `farm_runtime::daemon`). Run as `farm-node __guard` by the node itself, it is the node's guard
//! process.

use clap::Parser;
use farm_node::config::{Args, Config};
use std::process::ExitCode;

fn main() -> ExitCode {
    // The node's guard is this binary too (see `farm_node::guard`); it takes no flags.
    if farm_node::guard::is_guard_invocation() {
        return farm_node::guard::main();
    }
    farm_runtime::daemon::main(
        "farm-node",
        Config::from_args(Args::parse()),
        |cfg| cfg.listen,
        // One line per event, whatever a field holds (a command's reason, an FFmpeg line...).
        farm_node::logging::Escaping(std::io::stderr),
        farm_node::run,
    )
}
