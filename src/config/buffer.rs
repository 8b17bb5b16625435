//! `[buffer]`: the SQLite outbox's bounds, what happens when it is full, and how hard it syncs.

use std::time::Duration;

use serde::Deserialize;

use super::{ByteSize, DurationValue};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Drop the oldest rows: recent data matters most.
    DropOldest,
    /// Drop every other reading of the oldest part of each sensor's series: a long outage
    /// keeps its whole time span at a coarser step.
    Thin,
    /// Stop accepting; the source keeps the data (MQTT: acks withheld).
    RejectNew,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    /// fsync at every commit: a committed reading survives power loss.
    Full,
    /// fsync at WAL checkpoints only: survives a crash of the process, not of the machine.
    Normal,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Buffer {
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    #[serde(default = "default_max_age")]
    pub max_age: DurationValue,
    #[serde(default = "default_when_full")]
    pub when_full: WhenFull,
    /// Intake pauses while the data directory's filesystem has less free space than this.
    #[serde(default = "default_min_free_disk")]
    pub min_free_disk: ByteSize,
    #[serde(default = "default_synchronous")]
    pub synchronous: Synchronous,
    /// Dead-letter rows kept; the oldest go first.
    #[serde(default = "default_dead_letter_max")]
    pub dead_letter_max: u32,
}

impl Default for Buffer {
    fn default() -> Self {
        Self {
            max_bytes: default_max_bytes(),
            max_age: default_max_age(),
            when_full: default_when_full(),
            min_free_disk: default_min_free_disk(),
            synchronous: default_synchronous(),
            dead_letter_max: default_dead_letter_max(),
        }
    }
}

impl Buffer {
    /// Problems of the section on its own; `line` is its header's.
    pub(super) fn check(&self, line: usize, push: &mut impl FnMut(usize, String)) {
        if self.max_bytes.0 < 16 << 10 {
            push(line, "[buffer] max_bytes must be at least 16KiB".into());
        }
        if self.max_age.0 < Duration::from_secs(60) {
            push(line, "[buffer] max_age must be at least 1m".into());
        }
    }
}

fn default_max_bytes() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_max_age() -> DurationValue {
    DurationValue(Duration::from_secs(30 * 24 * 3600))
}
fn default_when_full() -> WhenFull {
    WhenFull::DropOldest
}
fn default_min_free_disk() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_synchronous() -> Synchronous {
    Synchronous::Full
}
fn default_dead_letter_max() -> u32 {
    10_000
}
