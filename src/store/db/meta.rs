//! Statements on `meta` besides `next_seq`: the lifetime totals ([`crate::store::counts`]),
//! the thinning position and the salt of derived event ids.

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::store::counts::{Counts, DropReason, ACCEPTED, FORWARDED, REFUSED};

/// Adds `delta` to the stored totals, inside the caller's transaction.
pub(crate) fn add_counts(tx: &Transaction<'_>, delta: &Counts) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
    )?;
    for (key, n) in delta.keys().filter(|(_, n)| *n > 0) {
        stmt.execute(params![key, i64::try_from(n).unwrap_or(i64::MAX)])?;
    }
    Ok(())
}

/// A non-negative value kept under `key`, if there is one.
fn value(conn: &Connection, key: &str) -> rusqlite::Result<Option<u64>> {
    let v: Option<i64> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?;
    Ok(v.map(|v| u64::try_from(v).unwrap_or(0)))
}

/// The stored totals (keys not yet written count 0).
pub(crate) fn load_counts(conn: &Connection) -> rusqlite::Result<Counts> {
    let get = |key: &str| -> rusqlite::Result<u64> { Ok(value(conn, key)?.unwrap_or(0)) };
    let mut c = Counts {
        accepted: get(ACCEPTED)?,
        forwarded: get(FORWARDED)?,
        refused: get(REFUSED)?,
        ..Counts::default()
    };
    for r in DropReason::ALL {
        c.dropped[r as usize] = get(r.key())?;
    }
    Ok(c)
}

/// At open: a buffer without totals yet (new, or from before them) starts them so that the
/// identity holds: the readings it already holds count as accepted.
pub(crate) fn init_counts(conn: &Connection, buffered_readings: u64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)",
        params![
            ACCEPTED,
            i64::try_from(buffered_readings).unwrap_or(i64::MAX)
        ],
    )?;
    Ok(())
}

/// Where the next thinning round starts (`when_full = "thin"`); 0 at the oldest row.
pub(crate) fn thin_after(conn: &Connection) -> rusqlite::Result<u64> {
    Ok(value(conn, "thin_after")?.unwrap_or(0))
}

pub(crate) fn set_thin_after(tx: &Transaction<'_>, after: u64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO meta (key, value) VALUES ('thin_after', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute([i64::try_from(after).unwrap_or(0)])?;
    Ok(())
}

/// The salt of [`super::event_id`], made when the schema was created or migrated to version 4.
pub(crate) fn event_salt(conn: &Connection) -> rusqlite::Result<[u8; 16]> {
    let mut salt = [0u8; 16];
    for (i, half) in salt.chunks_exact_mut(8).enumerate() {
        let value: i64 = conn.query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [format!("event_salt_{i}")],
            |r| r.get(0),
        )?;
        half.copy_from_slice(&value.to_le_bytes());
    }
    Ok(salt)
}
