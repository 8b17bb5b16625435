//! Statements on `actuators`: what the downlink core must find again after a restart
//! ([`Restored`]), and the last confirmed value and result for the CLI.

use rusqlite::{params, Connection, Row, Transaction};

use crate::downlink::{CommandResult, Deadline, Restored, Value};
use crate::reading::Timestamp;
use crate::store::inbox::ActuatorRow;

fn ms(t: Timestamp) -> i64 {
    t.unix_millis()
}

/// A value as stored: `on`, `off`, or the number's text.
fn value_text(v: Value) -> String {
    match v {
        Value::Switch(true) => "on".into(),
        Value::Switch(false) => "off".into(),
        Value::Number(n) => n.to_string(),
    }
}

/// A stored value; text this version cannot read counts as unknown.
fn value(text: &str) -> Option<Value> {
    match text {
        "on" => Some(Value::Switch(true)),
        "off" => Some(Value::Switch(false)),
        n => n.parse().ok().map(Value::Number),
    }
}

/// Saves the core's persisted state of one actuator (times to the millisecond, floored).
pub(crate) fn save_state(
    tx: &Transaction<'_>,
    actuator_id: &str,
    r: &Restored,
    now_ms: i64,
) -> rusqlite::Result<()> {
    let d = r.deadline.as_ref();
    tx.prepare_cached(
        "INSERT INTO actuators (actuator_id, newest_written_ms, off_since_ms, deadline_ms,
           deadline_command_id, run_since_ms, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (actuator_id) DO UPDATE SET
           newest_written_ms = ?2, off_since_ms = ?3, deadline_ms = ?4,
           deadline_command_id = ?5, run_since_ms = ?6, updated_ms = ?7",
    )?
    .execute(params![
        actuator_id,
        r.newest_written.map(ms),
        r.off_since.map(ms),
        d.map(|d| ms(d.at)),
        d.map(|d| d.command_id.as_str()),
        d.map(|d| ms(d.run_since)),
        now_ms,
    ])?;
    Ok(())
}

/// Records a result as its actuator's last one; `confirmed`: `Some` changes the last
/// confirmed value (`Some(None)`: now unknown), `None` leaves it.
pub(crate) fn record_result(
    tx: &Transaction<'_>,
    r: &CommandResult,
    confirmed: Option<Option<Value>>,
    now_ms: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO actuators (actuator_id, confirmed, last_command_id, last_status, last_reason,
           last_at_ms, updated_ms)
         VALUES (?1, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (actuator_id) DO UPDATE SET
           confirmed = CASE WHEN ?2 THEN ?3 ELSE confirmed END,
           last_command_id = ?4, last_status = ?5, last_reason = ?6, last_at_ms = ?7,
           updated_ms = ?8",
    )?
    .execute(params![
        r.actuator_id,
        confirmed.is_some(),
        confirmed.flatten().map(value_text),
        r.command_id,
        r.status.as_str(),
        r.reason.map(|x| x.as_str()),
        ms(r.at),
        now_ms,
    ])?;
    Ok(())
}

/// The persisted state in columns 1 to 5 of `row`.
fn restored(row: &Row<'_>) -> rusqlite::Result<Restored> {
    let at = |i| -> rusqlite::Result<Option<Timestamp>> {
        Ok(row
            .get::<_, Option<i64>>(i)?
            .map(Timestamp::from_unix_millis))
    };
    let deadline = match (at(3)?, row.get::<_, Option<String>>(4)?, at(5)?) {
        (Some(at), Some(command_id), Some(run_since)) => Some(Deadline {
            at,
            command_id,
            run_since,
        }),
        _ => None,
    };
    Ok(Restored {
        newest_written: at(1)?,
        off_since: at(2)?,
        deadline,
    })
}

/// Every actuator with a stored state, by id.
pub(crate) fn states(conn: &Connection) -> rusqlite::Result<Vec<(String, Restored)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT actuator_id, newest_written_ms, off_since_ms, deadline_ms, deadline_command_id,
                run_since_ms
         FROM actuators ORDER BY actuator_id",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, restored(r)?)))?;
    rows.collect()
}

/// Every actuator the store knows, by id, for the CLI.
pub(crate) fn list(conn: &Connection) -> rusqlite::Result<Vec<ActuatorRow>> {
    let mut stmt = conn.prepare(
        "SELECT actuator_id, newest_written_ms, off_since_ms, deadline_ms, deadline_command_id,
                run_since_ms, confirmed, last_command_id, last_status, last_reason, last_at_ms
         FROM actuators ORDER BY actuator_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(ActuatorRow {
            actuator_id: r.get(0)?,
            restored: restored(r)?,
            confirmed: r.get::<_, Option<String>>(6)?.as_deref().and_then(value),
            last_command_id: r.get(7)?,
            last_status: r.get(8)?,
            last_reason: r.get(9)?,
            last_at_ms: r.get(10)?,
        })
    })?;
    rows.collect()
}
