//! Inputs: each source turns what it receives into readings through the mapping and commits
//! them to the store before acknowledging anything to its sender.

pub mod admission;
pub mod intake;
pub mod listener;
pub mod mqtt;
pub mod serial;
