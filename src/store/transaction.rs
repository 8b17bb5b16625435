//! What one transaction of the writer does: delete acknowledged runs, move refused rows to
//! dead-letters, store each append (after the dedupe checks and the bounds), buffer the status
//! events the readings cause, and record `next_seq` and the lifetime totals with the rows they
//! describe (invariants 2 and 4). The statements run per stored row ([`PerRow`]) are taken
//! from the connection's statement cache once per transaction, not looked up per row.

use std::ops::RangeInclusive;
use std::sync::Arc;

use rusqlite::{Connection, Transaction};

use super::bounds::Room;
use super::counts::Counts;
use super::db::{self, DeadLetterText};
use super::delta::Delta;
use super::inbox::{InboxDone, InboxOp, InboxReply};
use super::writer::{AppendReply, Group, Refusal, Writer};
use super::{dedupe, liveness, Append, AppendOutcome, NewDeadLetter};
use crate::common::trace::{StoredTrace, TraceContext};
use crate::ingest::mapping::Reason;
use crate::reading::{Reading, KIND_STATUS};

impl Writer {
    /// One transaction for the whole group; returns each append's outcome, in order.
    /// `group` gives the refusals, the downlink writes (`inbox`, taken out of it) and whether
    /// maintenance is due; returns the appends' outcomes, then the downlink writes'.
    pub(super) fn write(
        &self,
        appends: &[(Arc<Append>, AppendReply)],
        acked: &[RangeInclusive<u64>],
        group: &Group,
        inbox: &[(InboxOp, InboxReply)],
        delta: &mut Delta,
    ) -> rusqlite::Result<(Vec<AppendOutcome>, Vec<InboxDone>)> {
        let tx = self.conn.unchecked_transaction()?;
        let now = db::now_ms();
        let maintain = group.maintain;
        for run in acked {
            delete_run(&tx, run, delta)?;
        }
        for refusal in &group.refused {
            dead_letter_refusal(&tx, refusal, now, delta)?;
        }
        let mut outcomes = Vec::with_capacity(appends.len());
        let mut stored: Vec<&Reading> = Vec::new();
        if !appends.is_empty() {
            let mut rows = PerRow::prepare(&tx)?;
            for (append, _) in appends {
                let (outcome, kept) = self.append_one(&tx, &mut rows, append, now, delta)?;
                if let AppendOutcome::Stored { .. } = outcome {
                    stored.extend(kept);
                }
                outcomes.push(outcome);
            }
        }
        let done = inbox
            .iter()
            .map(|(op, _)| self.inbox_op(&tx, op, now, delta))
            .collect::<rusqlite::Result<Vec<_>>>()?;
        self.status_and_seq(&tx, &stored, now, maintain, delta)?;
        if maintain {
            self.expire(&tx, now, delta)?;
        }
        record_totals(&tx, delta)?;
        tx.commit()?;
        Ok((outcomes, done))
    }

    /// The end of every transaction that stores readings: status events from the readings
    /// stored (with `maintain`, also from sensors gone silent), and `next_seq` past every row
    /// numbered.
    pub(super) fn status_and_seq(
        &self,
        tx: &Transaction<'_>,
        stored: &[&Reading],
        now: i64,
        maintain: bool,
        delta: &mut Delta,
    ) -> rusqlite::Result<()> {
        let mut changes = liveness::observe(tx, stored, now, self.low_battery)?;
        if maintain {
            changes.extend(liveness::expire(tx, now)?);
        }
        for change in &changes {
            let body = postcard::to_stdvec(change).unwrap_or_default();
            insert_row(tx, KIND_STATUS, &body, now, delta)?;
        }
        delta.status_changes += changes.len() as u64;
        if delta.next_seq != self.next_seq {
            db::outbox::set_next_seq(tx, delta.next_seq)?;
        }
        Ok(())
    }

    /// Stores one source message whole, or nothing of it: a repeat is [`AppendOutcome::Duplicate`],
    /// one the bounds or the disk reserve refuse [`AppendOutcome::Full`] (invariants 5 and 7).
    /// Returns the readings it stored, without the observations stored before.
    pub(super) fn append_one<'a>(
        &self,
        tx: &Transaction<'_>,
        rows: &mut PerRow<'_>,
        append: &'a Append,
        now: i64,
        delta: &mut Delta,
    ) -> rusqlite::Result<(AppendOutcome, Vec<&'a Reading>)> {
        if self.is_repeat(tx, append, delta)? {
            return Ok((AppendOutcome::Duplicate, Vec::new()));
        }
        let (kept, seen) = dedupe::unseen_observations(&mut rows.keys, &append.readings)?;
        let bodies: Vec<(u8, Vec<u8>)> = kept.iter().map(|r| r.to_row()).collect();
        // Once per message: every reading of it keeps the same context.
        let trace = append.trace.as_ref().map(TraceContext::stored);
        let trace = trace.as_ref().map(StoredTrace::as_str);
        let trace_len = trace.map_or(0, str::len);
        match self.make_room(tx, &bodies, trace_len, delta)? {
            Room::Made => {}
            refusal => {
                seen.forget(tx)?;
                delta.refused_full += u64::from(refusal == Room::Full);
                return Ok((AppendOutcome::Full, Vec::new()));
            }
        }
        delta.duplicates += seen.duplicates;
        let first_seq = delta.next_seq;
        for (kind, body) in &bodies {
            rows.outbox
                .insert(delta.next_seq, now, *kind, body, trace)?;
            delta.added(*kind, body.len() + trace_len);
        }
        delta.accepted += bodies.len() as u64;
        delta.timestamps_replaced += kept
            .iter()
            .filter(|r| r.original_timestamp.is_some())
            .count() as u64;
        insert_dead_letters(tx, &append.dead_letters, now, delta)?;
        dedupe::remember_keys(tx, &mut rows.keys, append, delta)?;
        let stored = AppendOutcome::Stored {
            first_seq,
            count: bodies.len() as u64,
        };
        Ok((stored, kept))
    }
}

/// The statements an append runs per row it stores, held for all appends of a transaction.
pub(super) struct PerRow<'c> {
    outbox: db::outbox::Inserts<'c>,
    keys: db::recent::Remember<'c>,
}

impl<'c> PerRow<'c> {
    pub(super) fn prepare(conn: &'c Connection) -> rusqlite::Result<Self> {
        Ok(Self {
            outbox: db::outbox::Inserts::prepare(conn)?,
            keys: db::recent::Remember::prepare(conn)?,
        })
    }
}

/// The end of every transaction that changes the outbox: the lifetime totals and the thinning
/// position move with the rows they describe, so they survive `kill -9` exactly.
pub(super) fn record_totals(tx: &Transaction<'_>, delta: &Delta) -> rusqlite::Result<()> {
    if let Some(after) = delta.thin_after {
        db::meta::set_thin_after(tx, after)?;
    }
    db::meta::add_counts(
        tx,
        &Counts {
            accepted: delta.accepted,
            forwarded: delta.forwarded,
            dropped: delta.dropped,
            refused: delta.refused_readings,
        },
    )
}

/// Buffers one row with the next seq; its event id (and trace context) derive from the seq.
pub(super) fn insert_row(
    tx: &Transaction<'_>,
    kind: u8,
    body: &[u8],
    now: i64,
    delta: &mut Delta,
) -> rusqlite::Result<()> {
    db::outbox::insert(tx, delta.next_seq, now, kind, body, None)?;
    delta.added(kind, body.len());
    Ok(())
}

/// The rejected inputs a source message left, kept with it.
fn insert_dead_letters(
    tx: &Transaction<'_>,
    letters: &[NewDeadLetter],
    now: i64,
    delta: &mut Delta,
) -> rusqlite::Result<()> {
    for d in letters {
        db::dead_letter::insert(tx, now, &DeadLetterText::from(d), &d.raw)?;
        delta.dead_letters_added += 1;
        delta.rejected.push(d.reason);
    }
    Ok(())
}

/// A row the server refused for good leaves the outbox for `dead_letters`, unless a bound
/// took it meanwhile.
fn dead_letter_refusal(
    tx: &Transaction<'_>,
    refusal: &Refusal,
    now: i64,
    delta: &mut Delta,
) -> rusqlite::Result<()> {
    let Some(is_reading) = delete_row(tx, refusal.seq, delta)? else {
        return Ok(());
    };
    delta.refused += 1;
    delta.refused_readings += u64::from(is_reading);
    let text = DeadLetterText {
        source: "forwarder",
        reason: Reason::PublishRefused,
        detail: &refusal.detail,
        topic: None,
        device: None,
        sensor_type: None,
    };
    db::dead_letter::insert(tx, now, &text, &refusal.raw)?;
    delta.dead_letters_added += 1;
    Ok(())
}

/// Deletes the buffered rows of an acknowledged run of seqs, counting them out of the totals
/// and the readings among them as forwarded.
fn delete_run(
    tx: &Transaction<'_>,
    run: &RangeInclusive<u64>,
    delta: &mut Delta,
) -> rusqlite::Result<()> {
    db::outbox::delete_run(tx, run, |kind, len| {
        if delta.removed(kind, len) {
            delta.forwarded += 1;
        }
    })
}

/// Deletes one buffered row, counting it out of the totals: `Some(is_reading)`, or `None` if
/// it was already gone (dropped by a bound meanwhile).
pub(super) fn delete_row(
    tx: &Transaction<'_>,
    seq: u64,
    delta: &mut Delta,
) -> rusqlite::Result<Option<bool>> {
    let row = db::outbox::delete(tx, seq)?;
    Ok(row.map(|(kind, len)| delta.removed(kind, len)))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rusqlite::Connection;

    use crate::common::metrics::Metrics;
    use crate::config::Buffer;
    use crate::reading::{Reading, KIND_READING};
    use crate::store::testkit::*;
    use crate::store::{start, OutboxRow};

    /// A store with the default bounds in `dir`, and its metrics.
    fn started(
        dir: &std::path::Path,
    ) -> (
        crate::store::StoreHandle,
        std::thread::JoinHandle<()>,
        Arc<Metrics>,
    ) {
        let metrics = Arc::new(Metrics::new());
        let (store, thread) = start(
            dir.join("buffer.db"),
            Buffer::default(),
            20.0,
            metrics.clone(),
        )
        .unwrap();
        (store, thread, metrics)
    }

    #[tokio::test]
    async fn acknowledged_runs_delete_exactly_their_rows() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread, metrics) = started(dir.path());
        for i in 1..=6 {
            append(&store, message(i, false)).await;
        }
        // Seqs: 1 and 2 readings, then the sensor's `connected` event, then readings 3..=6.
        let rows = store.fetch(0, 100).await.unwrap();
        let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
        assert_eq!(seqs.len(), 7);
        let first = seqs[0];
        // Acknowledged: all but the fourth row; the run past the last row covers nothing.
        store
            .acked(vec![first..=first + 2, first + 4..=first + 10])
            .await
            .unwrap();
        store.flush().await.unwrap();
        let left: Vec<u64> = store
            .fetch(0, 100)
            .await
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(left, vec![first + 3]);
        let is_reading = |r: &&OutboxRow| r.kind == KIND_READING;
        let deleted = rows.iter().filter(|r| r.seq != first + 3);
        assert_eq!(
            metrics.readings_forwarded.get(),
            deleted.filter(is_reading).count() as u64
        );
        assert_eq!(
            metrics.buffer_readings.get(),
            i64::from(is_reading(&&rows[3]))
        );
        close(store, thread).await;
    }

    /// A device's trace context rides with each reading of its message (not with the status
    /// event they cause), and counts against the byte bound from store to delete.
    #[tokio::test]
    async fn a_message_trace_context_is_kept_with_each_of_its_readings() {
        use crate::common::trace::TraceContext;
        let dir = tempfile::tempdir().unwrap();
        let (store, thread, metrics) = started(dir.path());
        let stored = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 v=1";
        let mut traced = message(1, false);
        traced.readings.push(reading(2));
        traced.trace = TraceContext::from_stored(stored);
        append(&store, traced).await;
        let rows = store.fetch(0, 100).await.unwrap();
        let traces: Vec<(u8, Option<String>)> = rows
            .iter()
            .map(|r| {
                (
                    r.kind,
                    r.trace.as_ref().map(|t| t.stored().as_str().to_string()),
                )
            })
            .collect();
        let with = (KIND_READING, Some(stored.to_string()));
        assert_eq!(
            traces,
            vec![with.clone(), with, (1, None)],
            "readings, then `connected`"
        );
        let bodies: u64 = rows.iter().map(|r| r.body.len() as u64 + 40).sum();
        let traced_bytes = 2 * stored.len() as u64;
        assert_eq!(metrics.buffer_bytes.get() as u64, bodies + traced_bytes);
        let (first, last) = (rows[0].seq, rows[2].seq);
        store.acked(vec![first..=last]).await.unwrap();
        store.flush().await.unwrap();
        assert_eq!(metrics.buffer_bytes.get(), 0, "removed as counted");
        close(store, thread).await;
    }

    #[tokio::test]
    async fn totals_start_for_a_buffer_from_before_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let readings: Vec<Reading> = (0..5).map(reading).collect();
        bytes_of(&path, &readings).await;
        // As a buffer written by a version without the totals.
        let conn = Connection::open(&path).unwrap();
        conn.execute("DELETE FROM meta WHERE key LIKE 'count_%'", [])
            .unwrap();
        drop(conn);
        let (store, thread) = start(
            path.clone(),
            Buffer::default(),
            20.0,
            Arc::new(Metrics::new()),
        )
        .unwrap();
        append(&store, message(5, false)).await;
        close(store, thread).await;
        let c = totals_hold(&path);
        assert_eq!(
            c.accepted, 6,
            "the 5 it held count as accepted, then 1 more"
        );
    }
}
