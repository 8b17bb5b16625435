//! Statements on `dead_letters`: inputs that could not become readings and publishes the
//! server refused for good, kept with their raw bytes.

use rusqlite::{params, Connection, Transaction};

use super::DEAD_LETTER_RAW_MAX;
use crate::ingest::mapping::Reason;
use crate::reading::SensorType;
use crate::store::{NewDeadLetter, ReplayFilter};

/// Dead-letter row for listing.
#[derive(Debug, Clone)]
pub struct DeadLetterRow {
    pub id: i64,
    pub at_ms: i64,
    pub source: String,
    pub reason: String,
    pub detail: String,
    pub raw: Vec<u8>,
    /// The MQTT topic of the message (schema 5).
    pub topic: Option<String>,
    /// Only this device's readings of the message were rejected (schema 5).
    pub device: Option<String>,
    /// With `device`: only its readings of this type (schema 5).
    pub sensor_type: Option<String>,
}

/// A dead-letter's columns besides its time and raw bytes.
pub(crate) struct DeadLetterText<'a> {
    pub(crate) source: &'a str,
    pub(crate) reason: Reason,
    pub(crate) detail: &'a str,
    pub(crate) topic: Option<&'a str>,
    pub(crate) device: Option<&'a str>,
    pub(crate) sensor_type: Option<&'static str>,
}

impl<'a> From<&'a NewDeadLetter> for DeadLetterText<'a> {
    fn from(d: &'a NewDeadLetter) -> Self {
        Self {
            source: &d.source,
            reason: d.reason,
            detail: &d.detail,
            topic: d.topic.as_deref(),
            device: d.device.as_deref(),
            sensor_type: d.sensor_type.map(SensorType::as_str),
        }
    }
}

/// Columns read into a [`DeadLetterRow`] by [`row`].
const COLUMNS: &str = "id, at_ms, source, reason, detail, raw, topic, device, sensor_type";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetterRow> {
    Ok(DeadLetterRow {
        id: r.get(0)?,
        at_ms: r.get(1)?,
        source: r.get(2)?,
        reason: r.get(3)?,
        detail: r.get(4)?,
        raw: r.get(5)?,
        topic: r.get(6)?,
        device: r.get(7)?,
        sensor_type: r.get(8)?,
    })
}

/// The newest `limit` dead-letters, newest first.
pub fn dead_letters(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<DeadLetterRow>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM dead_letters ORDER BY id DESC LIMIT ?1"
    ))?;
    let rows = stmt.query_map([limit as i64], row)?;
    rows.collect()
}

pub fn dead_letters_by_reason(conn: &Connection) -> rusqlite::Result<Vec<(String, u64)>> {
    let mut stmt =
        conn.prepare("SELECT reason, count(*) FROM dead_letters GROUP BY reason ORDER BY reason")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
    rows.collect()
}

/// Keeps a dead-letter, its raw bytes cut at [`DEAD_LETTER_RAW_MAX`].
pub(crate) fn insert(
    tx: &Transaction<'_>,
    now: i64,
    d: &DeadLetterText<'_>,
    raw: &[u8],
) -> rusqlite::Result<()> {
    let raw = &raw[..raw.len().min(DEAD_LETTER_RAW_MAX)];
    tx.prepare_cached(
        "INSERT INTO dead_letters (at_ms, source, reason, detail, raw, topic, device, sensor_type) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![now, d.source, d.reason.label(), d.detail, raw, d.topic, d.device, d.sensor_type])?;
    Ok(())
}

/// The `dead_letter_max` bound: the oldest beyond the newest `keep` go. Returns how many.
pub(crate) fn trim(tx: &Transaction<'_>, keep: u32) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - ?1",
    )?
    .execute([i64::from(keep)])
}

/// The rows a replay filter selects, oldest first.
pub(crate) fn selected(
    tx: &Transaction<'_>,
    f: &ReplayFilter,
) -> rusqlite::Result<Vec<DeadLetterRow>> {
    let limit = f.limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
    let mut stmt = tx.prepare(&format!(
        "SELECT {COLUMNS} FROM dead_letters WHERE (?1 IS NULL OR reason = ?1) AND (?2 IS NULL OR source = ?2) AND (?3 IS NULL OR at_ms >= ?3) ORDER BY id LIMIT ?4"
    ))?;
    let rows = stmt.query_map(params![f.reason, f.source, f.since_ms, limit], row)?;
    rows.collect()
}

/// Every dead-letter the message of `of` left, `of` among them: one commit wrote them all,
/// at one time, with the same source, topic and raw bytes.
pub(crate) fn of_message(
    tx: &Transaction<'_>,
    of: &DeadLetterRow,
) -> rusqlite::Result<Vec<DeadLetterRow>> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM dead_letters WHERE at_ms = ?1 AND source = ?2 AND topic IS ?3 AND raw = ?4 ORDER BY id"
    ))?;
    let rows = stmt.query_map(params![of.at_ms, of.source, of.topic, of.raw], row)?;
    rows.collect()
}

pub(crate) fn delete(tx: &Transaction<'_>, rows: &[DeadLetterRow]) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached("DELETE FROM dead_letters WHERE id = ?1")?;
    for r in rows {
        stmt.execute([r.id])?;
    }
    Ok(())
}
