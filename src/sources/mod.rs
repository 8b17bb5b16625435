//! Inputs: each source receives bytes (an MQTT broker session, the built-in MQTT listener, a
//! serial port) and hands them to [`crate::ingest`], which maps, screens and commits them before
//! anything is acknowledged to the sender.

pub mod listener;
pub(crate) mod mqtt;
pub mod serial;
