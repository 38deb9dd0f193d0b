//! The runtime layer both daemons and farmctl stand on: one Redis connection type ([`conn`]), one
//! task supervisor ([`tasks`]), one daemon `main` ([`daemon`]), one configuration mechanism
//! ([`config`]) and one declaration per metric ([`metrics!`]). Nothing here knows what a channel
//! is; that lives in `farm-proto` and the daemons.

pub mod config;
pub mod conn;
pub mod daemon;
pub mod metrics;
pub mod tasks;
