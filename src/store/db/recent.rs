//! Statements on the deduplication tables: `recent_messages`, `recent_readings` and
//! `recent_frames` ([`crate::store::dedupe`]).

use rusqlite::{params, Connection, Transaction};

/// The keys of the newest `limit` messages, newest first.
pub(crate) fn message_keys(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<Vec<u8>>> {
    let mut stmt = conn.prepare("SELECT key FROM recent_messages ORDER BY id DESC LIMIT ?1")?;
    let keys = stmt.query_map([limit as i64], |r| r.get(0))?;
    keys.collect()
}

pub(crate) fn remember_message(tx: &Transaction<'_>, key: &[u8; 16]) -> rusqlite::Result<()> {
    tx.prepare_cached("INSERT INTO recent_messages (key) VALUES (?1)")?
        .execute([&key[..]])?;
    Ok(())
}

/// Remembers an observation's key: the row id it got, or `None` if it was there already.
pub(crate) fn remember_observation(
    tx: &Transaction<'_>,
    key: &[u8; 16],
) -> rusqlite::Result<Option<i64>> {
    let inserted = tx
        .prepare_cached("INSERT OR IGNORE INTO recent_readings (key) VALUES (?1)")?
        .execute([&key[..]])?;
    Ok((inserted > 0).then(|| tx.last_insert_rowid()))
}

/// Forgets the observation keys remembered from row `id` on.
pub(crate) fn forget_observations_from(tx: &Transaction<'_>, id: i64) -> rusqlite::Result<()> {
    tx.prepare_cached("DELETE FROM recent_readings WHERE id >= ?1")?
        .execute([id])?;
    Ok(())
}

pub(crate) fn frame_seen(tx: &Transaction<'_>, frame: &[u8; 16]) -> rusqlite::Result<bool> {
    tx.prepare_cached("SELECT 1 FROM recent_frames WHERE key = ?1")?
        .exists([&frame[..]])
}

/// Adds a frame to its node's window and lets the node's oldest beyond `window` go.
pub(crate) fn remember_frame(
    tx: &Transaction<'_>,
    node: i64,
    frame: &[u8; 16],
    window: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached("INSERT OR IGNORE INTO recent_frames (node, key) VALUES (?1, ?2)")?
        .execute(params![node, &frame[..]])?;
    tx.prepare_cached(
        "DELETE FROM recent_frames WHERE node = ?1 AND id <= (SELECT id FROM recent_frames WHERE node = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
    )?
    .execute(params![node, window])?;
    Ok(())
}

/// Row bounds of the three tables; the oldest beyond them go.
pub(crate) struct Keep {
    pub(crate) messages: i64,
    pub(crate) readings: i64,
    pub(crate) frames: i64,
}

pub(crate) fn trim(tx: &Transaction<'_>, keep: &Keep) -> rusqlite::Result<()> {
    for (table, keep) in [
        ("recent_messages", keep.messages),
        ("recent_readings", keep.readings),
        ("recent_frames", keep.frames),
    ] {
        tx.prepare_cached(&format!(
            "DELETE FROM {table} WHERE id <= (SELECT max(id) FROM {table}) - ?1"
        ))?
        .execute([keep])?;
    }
    Ok(())
}
