//! Statements on `commands`, the downlink's inbox ([`crate::store::inbox`]).

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::store::inbox::{CommandRow, InboxCommand, InboxState, OpenCommand};

/// What the inbox holds of one command id: its state, last status and envelope.
pub(crate) struct Known {
    pub(crate) state: InboxState,
    pub(crate) status: Option<String>,
    pub(crate) tenant_id: String,
    pub(crate) correlation_id: String,
}

/// A stored state; one this version does not know reads as done, so it is never replayed.
fn state(text: &str) -> InboxState {
    InboxState::from_name(text).unwrap_or(InboxState::Done)
}

/// Stores a new command as `queued`; false (nothing written) if its id is there already.
pub(crate) fn insert(tx: &Transaction<'_>, c: &InboxCommand) -> rusqlite::Result<bool> {
    let added = tx
        .prepare_cached(
            "INSERT INTO commands (command_id, actuator_id, field_id, tenant_id, correlation_id,
               action, value, issued_ms, expires_ms, received_ms, raw, state, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?10)
             ON CONFLICT (command_id) DO NOTHING",
        )?
        .execute(params![
            c.command_id,
            c.actuator_id,
            c.field_id,
            c.tenant_id,
            c.correlation_id,
            c.action,
            c.value,
            c.issued_ms,
            c.expires_ms,
            c.received_ms,
            c.raw,
            InboxState::Queued.as_str(),
        ])?;
    Ok(added == 1)
}

pub(crate) fn known(tx: &Transaction<'_>, command_id: &str) -> rusqlite::Result<Option<Known>> {
    tx.prepare_cached(
        "SELECT state, status, tenant_id, correlation_id FROM commands WHERE command_id = ?1",
    )?
    .query_row([command_id], |r| {
        Ok(Known {
            state: state(&r.get::<_, String>(0)?),
            status: r.get(1)?,
            tenant_id: r.get(2)?,
            correlation_id: r.get(3)?,
        })
    })
    .optional()
}

/// Records a command's latest result.
pub(crate) fn set_status(
    tx: &Transaction<'_>,
    command_id: &str,
    state: InboxState,
    (status, reason): (&str, Option<&str>),
    now_ms: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE commands SET state = ?2, status = ?3, reason = ?4, updated_ms = ?5 WHERE command_id = ?1",
    )?
    .execute(params![command_id, state.as_str(), status, reason, now_ms])?;
    Ok(())
}

/// Commands not done yet, in the order they were received.
pub(crate) fn open(conn: &Connection) -> rusqlite::Result<Vec<OpenCommand>> {
    let mut stmt = conn.prepare_cached(
        "SELECT command_id, state, received_ms, raw FROM commands
         WHERE state IN ('queued', 'writing') ORDER BY received_ms, rowid",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(OpenCommand {
            command_id: r.get(0)?,
            state: state(&r.get::<_, String>(1)?),
            received_ms: r.get(2)?,
            raw: r.get(3)?,
        })
    })?;
    rows.collect()
}

/// The newest `limit` commands received, newest first.
pub(crate) fn newest(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<CommandRow>> {
    let mut stmt = conn.prepare(
        "SELECT command_id, actuator_id, field_id, action, value, state, status, reason,
                issued_ms, expires_ms, received_ms, updated_ms
         FROM commands ORDER BY received_ms DESC, rowid DESC LIMIT ?1",
    )?;
    let rows = stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
        Ok(CommandRow {
            command_id: r.get(0)?,
            actuator_id: r.get(1)?,
            field_id: r.get(2)?,
            action: r.get(3)?,
            value: r.get(4)?,
            state: state(&r.get::<_, String>(5)?),
            status: r.get(6)?,
            reason: r.get(7)?,
            issued_ms: r.get(8)?,
            expires_ms: r.get(9)?,
            received_ms: r.get(10)?,
            updated_ms: r.get(11)?,
        })
    })?;
    rows.collect()
}

/// The inbox bound: done rows last updated before `cutoff_ms` go, and the oldest done rows
/// beyond `max_rows` in all. Open rows never go (the core still owes them a result); their
/// ids are what keeps a redelivery from being applied twice. Returns the rows deleted.
pub(crate) fn trim(tx: &Transaction<'_>, cutoff_ms: i64, max_rows: u64) -> rusqlite::Result<usize> {
    let old = tx
        .prepare_cached("DELETE FROM commands WHERE state = 'done' AND updated_ms < ?1")?
        .execute([cutoff_ms])?;
    let over = tx
        .prepare_cached(
            "DELETE FROM commands WHERE rowid IN (
               SELECT rowid FROM commands WHERE state = 'done' ORDER BY received_ms, rowid
               LIMIT max(0, (SELECT count(*) FROM commands) - ?1))",
        )?
        .execute([i64::try_from(max_rows).unwrap_or(i64::MAX)])?;
    Ok(old + over)
}
