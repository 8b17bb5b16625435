//! Statements on `outbox`, the rows waiting for their PubAck, and on `meta.next_seq`, which
//! numbers them.

use std::ops::RangeInclusive;

use rusqlite::{params, CachedStatement, Connection, OptionalExtension, Transaction};

use super::event_id;
use crate::common::trace::TraceContext;
use crate::reading::KIND_READING;

/// One buffered row as the forwarder needs it.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub seq: u64,
    pub event_id: [u8; 16],
    pub stored_ms: i64,
    pub kind: u8,
    pub body: Vec<u8>,
    /// The device's trace context, if it sent one; `None` derives one from the event id.
    pub trace: Option<TraceContext>,
}

/// What a row counts against `max_bytes` (plus [`super::ROW_OVERHEAD`]): its body and its
/// trace context.
macro_rules! row_len {
    () => {
        "length(body) + coalesce(length(trace), 0)"
    };
}

/// A row as the bounds scan it (`body` only when asked for; `len` counts its trace context).
pub(crate) struct ScannedRow {
    pub(crate) seq: u64,
    pub(crate) kind: i64,
    pub(crate) stored_ms: i64,
    pub(crate) len: i64,
    pub(crate) body: Vec<u8>,
}

/// A seq as SQLite stores it; seqs past `i64::MAX` never occur, the clamp keeps a bound open.
fn sql_seq(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Committed rows with `seq > after`, oldest first, with their event ids (`salt`: see
/// [`event_id`]).
pub(crate) fn fetch_after(
    conn: &Connection,
    after: u64,
    limit: usize,
    salt: &[u8; 16],
) -> rusqlite::Result<Vec<OutboxRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, event_id, stored_ms, kind, body, trace FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after as i64, limit as i64], |r| {
        let seq = r.get::<_, i64>(0)? as u64;
        let stored = r.get_ref(1)?.as_blob()?;
        let event_id = <[u8; 16]>::try_from(stored).unwrap_or_else(|_| event_id(salt, seq));
        Ok(OutboxRow {
            seq,
            event_id,
            stored_ms: r.get(2)?,
            kind: r.get::<_, i64>(3)? as u8,
            body: r.get(4)?,
            trace: r
                .get_ref(5)?
                .as_str_or_null()?
                .and_then(TraceContext::from_stored),
        })
    })?;
    rows.collect()
}

/// Oldest buffered row's store time.
pub(crate) fn oldest_stored_ms(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT stored_ms FROM outbox ORDER BY seq LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()
}

/// Up to `limit` rows with `after < seq < below`, oldest first; `with_body` reads the bodies
/// too (an empty body otherwise).
pub(crate) fn scan(
    tx: &Transaction<'_>,
    after: u64,
    below: u64,
    limit: usize,
    with_body: bool,
) -> rusqlite::Result<Vec<ScannedRow>> {
    let sql = if with_body {
        concat!(
            "SELECT seq, kind, stored_ms, ",
            row_len!(),
            ", body FROM outbox WHERE seq > ?1 AND seq < ?2 ORDER BY seq LIMIT ?3"
        )
    } else {
        concat!(
            "SELECT seq, kind, stored_ms, ",
            row_len!(),
            ", x'' FROM outbox WHERE seq > ?1 AND seq < ?2 ORDER BY seq LIMIT ?3"
        )
    };
    let mut stmt = tx.prepare_cached(sql)?;
    let rows = stmt.query_map(params![sql_seq(after), sql_seq(below), limit as i64], |r| {
        Ok(ScannedRow {
            seq: r.get::<_, i64>(0)? as u64,
            kind: r.get(1)?,
            stored_ms: r.get(2)?,
            len: r.get(3)?,
            body: r.get(4)?,
        })
    })?;
    rows.collect()
}

/// The bodies of the newest `limit` readings buffered, newest first.
pub(crate) fn newest_reading_bodies(
    tx: &Transaction<'_>,
    limit: usize,
) -> rusqlite::Result<Vec<Vec<u8>>> {
    let mut stmt =
        tx.prepare_cached("SELECT body FROM outbox WHERE kind = ?1 ORDER BY seq DESC LIMIT ?2")?;
    let bodies = stmt.query_map(params![KIND_READING, limit as i64], |r| r.get(0))?;
    bodies.collect()
}

/// Buffers one row under `seq`, with a device's trace context in its stored form
/// ([`TraceContext::stored`]); its `event_id` column stays empty (the id derives from the seq).
pub(crate) fn insert(
    tx: &Transaction<'_>,
    seq: u64,
    now: i64,
    kind: u8,
    body: &[u8],
    trace: Option<&str>,
) -> rusqlite::Result<()> {
    Inserts::prepare(tx)?.insert(seq, now, kind, body, trace)
}

/// [`insert`] for the many rows of one transaction: the statement is taken from the
/// connection's cache once (it goes back when this drops), not looked up per row.
pub(crate) struct Inserts<'c>(CachedStatement<'c>);

impl<'c> Inserts<'c> {
    pub(crate) fn prepare(conn: &'c Connection) -> rusqlite::Result<Self> {
        conn.prepare_cached(
            "INSERT INTO outbox (seq, event_id, stored_ms, kind, body, trace) VALUES (?1, x'', ?2, ?3, ?4, ?5)",
        )
        .map(Self)
    }

    /// As [`insert`].
    pub(crate) fn insert(
        &mut self,
        seq: u64,
        now: i64,
        kind: u8,
        body: &[u8],
        trace: Option<&str>,
    ) -> rusqlite::Result<()> {
        self.0
            .execute(params![seq as i64, now, kind, body, trace])
            .map(drop)
    }
}

/// Buffers one row under `seq` with an id of its own (a command result: stable per command
/// and status, not per seq).
pub(crate) fn insert_with_id(
    tx: &Transaction<'_>,
    seq: u64,
    event_id: &[u8; 16],
    now: i64,
    kind: u8,
    body: &[u8],
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO outbox (seq, event_id, stored_ms, kind, body) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![seq as i64, &event_id[..], now, kind, body])?;
    Ok(())
}

/// Whether a command result with this event id is buffered (through `outbox_results`).
pub(crate) fn has_result(tx: &Transaction<'_>, event_id: &[u8; 16]) -> rusqlite::Result<bool> {
    // `kind = 3` ([`crate::reading::KIND_RESULT`]) as a literal: only then may SQLite use the partial index.
    tx.prepare_cached("SELECT 1 FROM outbox WHERE kind = 3 AND event_id = ?1")?
        .query_row([&event_id[..]], |_| Ok(()))
        .optional()
        .map(|found| found.is_some())
}

/// Deletes the buffered rows of a run of seqs; `each` gets every deleted row's kind and length
/// (body and trace context).
pub(crate) fn delete_run(
    tx: &Transaction<'_>,
    run: &RangeInclusive<u64>,
    mut each: impl FnMut(i64, i64),
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(concat!(
        "DELETE FROM outbox WHERE seq BETWEEN ?1 AND ?2 RETURNING kind, ",
        row_len!()
    ))?;
    let mut rows = stmt.query([*run.start() as i64, *run.end() as i64])?;
    while let Some(row) = rows.next()? {
        each(row.get(0)?, row.get(1)?);
    }
    Ok(())
}

/// Deletes one buffered row: its kind and length, or `None` if it was already gone.
pub(crate) fn delete(tx: &Transaction<'_>, seq: u64) -> rusqlite::Result<Option<(i64, i64)>> {
    tx.prepare_cached(concat!(
        "DELETE FROM outbox WHERE seq = ?1 RETURNING kind, ",
        row_len!()
    ))?
    .query_row([seq as i64], |r| Ok((r.get(0)?, r.get(1)?)))
    .optional()
}

/// Records the next seq to hand out, in the transaction that numbered rows below it.
pub(crate) fn set_next_seq(tx: &Transaction<'_>, next_seq: u64) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'next_seq'")?
        .execute([next_seq as i64])?;
    Ok(())
}
