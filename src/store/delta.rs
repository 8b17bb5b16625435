//! What one transaction changed, gathered while it runs and applied to the writer's totals,
//! its in-memory keys and the metrics only once it committed: a failed transaction leaves
//! them as they were.

use super::db;
use super::writer::Writer;
use crate::ingest::mapping::Reason;
use crate::reading::{is_reading_kind, KIND_RESULT};

#[derive(Default)]
pub(super) struct Delta {
    pub(super) rows_added: u64,
    pub(super) bytes_added: u64,
    pub(super) rows_removed: u64,
    pub(super) bytes_removed: u64,
    /// The seq the next row of the transaction gets.
    pub(super) next_seq: u64,
    pub(super) dead_letters_added: u64,
    pub(super) accepted: u64,
    /// Readings dropped by a bound, indexed like [`super::counts::DropReason::ALL`].
    pub(super) dropped: [u64; 3],
    /// Thinning rounds that freed something.
    pub(super) thin_rounds: u64,
    /// Of them, the ones that began a new sweep over the buffer.
    pub(super) thin_passes: u64,
    /// Where the next thinning round starts, if a round ran.
    pub(super) thin_after: Option<u64>,
    pub(super) dead_letters_removed: u64,
    /// Of `dead_letters_removed`, those the `dead_letter_max` bound pushed out.
    pub(super) dead_letters_evicted: u64,
    pub(super) refused_full: u64,
    pub(super) rejected: Vec<Reason>,
    pub(super) refused: u64,
    /// Of `refused`, the readings.
    pub(super) refused_readings: u64,
    pub(super) forwarded: u64,
    pub(super) duplicates: u64,
    pub(super) timestamps_replaced: u64,
    pub(super) status_changes: u64,
    /// Rows added and removed that are not readings (status events, command results).
    pub(super) event_rows_added: u64,
    pub(super) event_rows_removed: u64,
    /// Command results deleted (acknowledged or dropped), and of them those a bound dropped.
    pub(super) results_removed: u64,
    pub(super) results_dropped: u64,
    /// Fingerprints of the source messages stored, in order.
    pub(super) messages: Vec<u64>,
}

impl Delta {
    /// A transaction whose first new row gets `next_seq`.
    pub(super) fn numbering_from(next_seq: u64) -> Self {
        Self {
            next_seq,
            ..Self::default()
        }
    }

    /// Counts in the row just written at `next_seq`, and moves `next_seq` past it.
    pub(super) fn added(&mut self, kind: u8, len: usize) {
        self.next_seq += 1;
        self.rows_added += 1;
        self.bytes_added += len as u64 + db::ROW_OVERHEAD;
        if !is_reading_kind(i64::from(kind)) {
            self.event_rows_added += 1;
        }
    }

    /// Counts a deleted row out; true if it was a reading.
    pub(super) fn removed(&mut self, kind: i64, len: i64) -> bool {
        self.rows_removed += 1;
        self.bytes_removed += len as u64 + db::ROW_OVERHEAD;
        let reading = is_reading_kind(kind);
        if kind == i64::from(KIND_RESULT) {
            self.results_removed += 1;
        }
        if !reading {
            self.event_rows_removed += 1;
        }
        reading
    }
}

impl Writer {
    /// A committed transaction's changes: totals, the `reject_new` state, the thinning
    /// position, the remembered messages, the metrics, and the new high-water seq.
    pub(super) fn apply(&mut self, d: &Delta) {
        self.rows = (self.rows + d.rows_added).saturating_sub(d.rows_removed);
        self.event_rows =
            (self.event_rows + d.event_rows_added).saturating_sub(d.event_rows_removed);
        self.bytes = (self.bytes + d.bytes_added).saturating_sub(d.bytes_removed);
        self.dead_letters =
            (self.dead_letters + d.dead_letters_added).saturating_sub(d.dead_letters_removed);
        if d.refused_full > 0 {
            self.full = true;
        } else if d.accepted > 0 {
            self.full = false;
        }
        if let Some(after) = d.thin_after {
            self.thin_after = after;
        }
        self.recent.extend(&d.messages);
        self.count(d);
        if d.next_seq != self.next_seq {
            self.next_seq = d.next_seq;
            self.committed.send_replace(self.next_seq - 1);
        }
        self.publish_gauges();
    }
}
