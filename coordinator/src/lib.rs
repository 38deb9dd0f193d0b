//! farm-coordinator
