//! What the writer tells `/metrics` and the log: the counters of each committed transaction
//! (with a warning for every reading a bound dropped), and the gauges of the buffer's state.

use super::counts::DropReason;
use super::db;
use super::delta::Delta;
use super::writer::Writer;
use crate::config::WhenFull;
use crate::ingest::mapping::Reason;

impl Writer {
    /// Adds a committed transaction's counts to the metrics.
    pub(super) fn count(&self, d: &Delta) {
        let m = &self.metrics;
        m.readings_accepted.inc_by(d.accepted);
        m.readings_duplicates.inc_by(d.duplicates);
        m.timestamps_replaced.inc_by(d.timestamps_replaced);
        m.status_events.inc_by(d.status_changes);
        m.readings_forwarded.inc_by(d.forwarded);
        for reason in DropReason::ALL {
            let count = d.dropped[reason as usize];
            if count > 0 {
                m.dropped(reason.label()).inc_by(count);
                self.warn_dropped(reason, count, d.thin_rounds);
            }
        }
        m.buffer_thin_passes.inc_by(d.thin_passes);
        if d.results_dropped > 0 {
            tracing::warn!(
                count = d.results_dropped,
                "buffer bound dropped command results: the platform will not see them (`commands list` still shows each command's status)"
            );
        }
        if d.refused > 0 {
            m.rejected(Reason::PublishRefused.label()).inc_by(d.refused);
        }
        if d.dead_letters_evicted > 0 {
            m.dead_letters_evicted.inc_by(d.dead_letters_evicted);
            tracing::warn!(
                count = d.dead_letters_evicted,
                max = self.buffer.dead_letter_max,
                "dead-letter table full: the oldest dead-letters were removed ([buffer] dead_letter_max)"
            );
        }
        for r in &d.rejected {
            m.rejected(r.label()).inc();
        }
    }

    /// Readings a bound took are lost to the stream: each time, a warning says which bound.
    fn warn_dropped(&self, reason: DropReason, count: u64, thin_rounds: u64) {
        match reason {
            DropReason::BufferFull => tracing::warn!(
                count,
                "buffer full: dropped the oldest readings (when_full = {})",
                if self.buffer.when_full == WhenFull::Thin {
                    "thin, nothing left to thin"
                } else {
                    "drop_oldest"
                }
            ),
            DropReason::Thin => tracing::warn!(
                count,
                rounds = thin_rounds,
                "buffer full: thinned the oldest readings of each sensor (when_full = thin)"
            ),
            DropReason::MaxAge => {
                tracing::warn!(count, "dropped buffered readings older than max_age")
            }
        }
    }

    pub(super) fn publish_gauges(&self) {
        let m = &self.metrics;
        m.buffer_readings
            .set(self.rows.saturating_sub(self.event_rows) as i64);
        m.buffer_bytes.set(self.bytes as i64);
        m.dead_letters.set(self.dead_letters as i64);
        m.intake_paused.set(i64::from(self.disk_low || self.full));
        let oldest = db::oldest_stored_ms(&self.conn).ok().flatten();
        let age = oldest.map_or(0, |t| ((db::now_ms() - t) / 1000).max(0));
        m.buffer_oldest_age_seconds.set(age);
    }
}
