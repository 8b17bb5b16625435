//! Deduplication: an input stored once is not stored again when it comes back.
//! - a source message flagged as a possible resend, by its key among the recent messages
//!   (`recent.rs` keeps them in memory);
//! - a firmware frame, by its key in its node's window of [`FRAME_WINDOW`] frames;
//! - a device observation (the same reading through two gateways), by device, type and the
//!   device's own time among the last [`RECENT_READINGS`].
//!
//! Keys are remembered only for what was actually stored (invariant 7). The statements are in
//! [`super::db::recent`].

use rusqlite::Transaction;

use super::db::{self, recent::Keep, recent::Remember};
use super::delta::Delta;
use super::recent::{fingerprint, RECENT_MESSAGES};
use super::writer::Writer;
use super::Append;
use crate::reading::Reading;

/// Device observations remembered for duplicate detection.
pub(crate) const RECENT_READINGS: i64 = 200_000;

/// Frames remembered per firmware node for resend detection. A node that keeps fewer frames
/// than this in flight (sent, not yet acked) never gets a resend stored twice.
pub const FRAME_WINDOW: i64 = 1024;

/// Rows of `recent_frames` over all nodes; beyond it the oldest go, whichever node sent them.
pub(crate) const RECENT_FRAMES_MAX: i64 = 256 * FRAME_WINDOW;

impl Writer {
    /// A frame its node sent before, or a message flagged as resent that was stored before
    /// (also earlier in this transaction).
    pub(super) fn is_repeat(
        &self,
        tx: &Transaction<'_>,
        append: &Append,
        delta: &Delta,
    ) -> rusqlite::Result<bool> {
        if let Some(frame) = &append.frame_key {
            if db::recent::frame_seen(tx, &frame.frame)? {
                return Ok(true);
            }
        }
        if let (Some(key), true) = (append.message_key, append.maybe_duplicate) {
            let fingerprint = fingerprint(&key);
            return Ok(self.recent.contains(fingerprint) || delta.messages.contains(&fingerprint));
        }
        Ok(false)
    }
}

/// What [`unseen_observations`] left out of an append, and how to take it back.
pub(super) struct SeenObservations {
    /// The row of the first key it remembered, if any.
    first_remembered: Option<i64>,
    /// Readings dropped as observations stored before.
    pub(super) duplicates: u64,
}

impl SeenObservations {
    /// The append was refused after all: its keys are forgotten again (invariant 7).
    pub(super) fn forget(&self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        match self.first_remembered {
            Some(id) => db::recent::forget_observations_from(tx, id),
            None => Ok(()),
        }
    }
}

/// The same device observation delivered twice (e.g. a LoRaWAN uplink through two gateways)
/// is stored once: remembering its key is the check (nothing inserted: seen before). Returns
/// the readings to store, in order; readings without a device time carry no observation
/// identity and are kept. The append itself is left as it came: a refused one is offered again
/// as it was.
pub(super) fn unseen_observations<'a>(
    keys: &mut Remember<'_>,
    readings: &'a [Reading],
) -> rusqlite::Result<(Vec<&'a Reading>, SeenObservations)> {
    let mut kept = Vec::with_capacity(readings.len());
    let mut first_remembered = None;
    for r in readings {
        if r.device_time {
            match keys.observation(&observation_key(r))? {
                Some(id) => {
                    first_remembered.get_or_insert(id);
                }
                None => continue,
            }
        }
        kept.push(r);
    }
    let seen = SeenObservations {
        first_remembered,
        duplicates: (readings.len() - kept.len()) as u64,
    };
    Ok((kept, seen))
}

/// Once an append is stored: its message key, for a redelivery, and its frame, in its node's
/// window.
pub(super) fn remember_keys(
    tx: &Transaction<'_>,
    keys: &mut Remember<'_>,
    append: &Append,
    delta: &mut Delta,
) -> rusqlite::Result<()> {
    if let Some(key) = append.message_key {
        keys.message(&key)?;
        delta.messages.push(fingerprint(&key));
    }
    if let Some(frame) = &append.frame_key {
        db::recent::remember_frame(tx, frame.node, &frame.frame, FRAME_WINDOW)?;
    }
    Ok(())
}

/// The bounds of the key tables; the oldest keys beyond them go.
pub(super) fn trim_keys(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    let keep = Keep {
        messages: RECENT_MESSAGES as i64,
        readings: RECENT_READINGS,
        frames: RECENT_FRAMES_MAX,
    };
    db::recent::trim(tx, &keep)
}

/// Identity of a device observation: the device's own time (big-endian with the sign bit
/// flipped, so keys sort by time and new ones land at the end of the index), then a hash of
/// device and sensor type.
fn observation_key(r: &Reading) -> [u8; 16] {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(r.device_id.as_bytes());
    h.update(&[0, r.sensor_type as u8]);
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&((r.observed_at.0 as u64) ^ (1 << 63)).to_be_bytes());
    key[8..].copy_from_slice(&h.digest().to_le_bytes());
    key
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::common::metrics::Metrics;
    use crate::config::{Buffer, WhenFull};
    use crate::reading::Timestamp;
    use crate::store::testkit::*;
    use crate::store::{start, AppendOutcome};

    #[test]
    fn observation_keys_sort_by_time() {
        let mut early = reading(0);
        early.observed_at = Timestamp(-5);
        let keys = [early, reading(0), reading(1), reading(1_000_000)].map(|r| observation_key(&r));
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
    }

    #[tokio::test]
    async fn resent_messages_are_recognised_also_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let metrics = Arc::new(Metrics::new());
        let (store, thread) =
            start(path.clone(), Buffer::default(), 20.0, metrics.clone()).unwrap();
        assert!(matches!(
            append(&store, message(1, false)).await,
            AppendOutcome::Stored { .. }
        ));
        assert_eq!(
            append(&store, message(1, true)).await,
            AppendOutcome::Duplicate
        );
        // Not flagged as resent: not looked up (its reading is then dropped as a repeat of
        // the same observation, but the message itself is stored).
        assert!(matches!(
            append(&store, message(1, false)).await,
            AppendOutcome::Stored { count: 0, .. }
        ));
        close(store, thread).await;

        let (store, thread) = start(path, Buffer::default(), 20.0, metrics).unwrap();
        assert_eq!(
            append(&store, message(1, true)).await,
            AppendOutcome::Duplicate
        );
        assert!(matches!(
            append(&store, message(2, true)).await,
            AppendOutcome::Stored { count: 1, .. }
        ));
        close(store, thread).await;
    }

    #[tokio::test]
    async fn a_refused_reading_is_not_remembered_as_seen() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = Buffer {
            max_bytes: crate::config::ByteSize(250),
            when_full: WhenFull::RejectNew,
            min_free_disk: crate::config::ByteSize(0),
            ..Buffer::default()
        };
        let metrics = Arc::new(Metrics::new());
        let (store, thread) = start(dir.path().join("buffer.db"), buffer, 20.0, metrics).unwrap();
        assert!(matches!(
            append(&store, message(1, false)).await,
            AppendOutcome::Stored { count: 1, .. }
        ));
        assert_eq!(append(&store, message(2, false)).await, AppendOutcome::Full);
        let all = store.fetch(0, 100).await.unwrap();
        let last = all.last().unwrap().seq;
        store.acked(vec![1..=last]).await.unwrap();
        store.flush().await.unwrap();
        // Offered again once there is room: stored, not taken for a repeat of itself.
        assert!(matches!(
            append(&store, message(2, false)).await,
            AppendOutcome::Stored { count: 1, .. }
        ));
        assert!(matches!(
            append(&store, message(2, false)).await,
            AppendOutcome::Stored { count: 0, .. }
        ));
        // Twice in one message: once.
        let mut twice = message(3, false);
        twice.readings.push(reading(3));
        store.acked(vec![1..=1000]).await.unwrap();
        store.flush().await.unwrap();
        assert!(matches!(
            append(&store, twice).await,
            AppendOutcome::Stored { count: 1, .. }
        ));
        close(store, thread).await;
    }
}
