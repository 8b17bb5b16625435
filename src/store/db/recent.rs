//! Statements on the deduplication tables: `recent_messages`, `recent_readings` and
//! `recent_frames` ([`crate::store::dedupe`]).

use rusqlite::{params, CachedStatement, Connection, Transaction};

/// The keys of the newest `limit` messages, newest first.
pub(crate) fn message_keys(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<Vec<u8>>> {
    let mut stmt = conn.prepare("SELECT key FROM recent_messages ORDER BY id DESC LIMIT ?1")?;
    let keys = stmt.query_map([limit as i64], |r| r.get(0))?;
    keys.collect()
}

/// The inserts of the message and observation keys, for the many appends of one
/// transaction: taken from the connection's cache once (they go back when this drops), not
/// looked up per key.
pub(crate) struct Remember<'c> {
    conn: &'c Connection,
    message: CachedStatement<'c>,
    observation: CachedStatement<'c>,
}

impl<'c> Remember<'c> {
    pub(crate) fn prepare(conn: &'c Connection) -> rusqlite::Result<Self> {
        Ok(Self {
            conn,
            message: conn.prepare_cached("INSERT INTO recent_messages (key) VALUES (?1)")?,
            observation: conn
                .prepare_cached("INSERT OR IGNORE INTO recent_readings (key) VALUES (?1)")?,
        })
    }

    pub(crate) fn message(&mut self, key: &[u8; 16]) -> rusqlite::Result<()> {
        self.message.execute([&key[..]]).map(drop)
    }

    /// Remembers an observation's key: the row id it got, or `None` if it was there already.
    pub(crate) fn observation(&mut self, key: &[u8; 16]) -> rusqlite::Result<Option<i64>> {
        let inserted = self.observation.execute([&key[..]])?;
        Ok((inserted > 0).then(|| self.conn.last_insert_rowid()))
    }
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
