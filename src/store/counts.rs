//! Lifetime totals of readings through the buffer, kept as keys in `meta` and updated in the
//! same transaction as the rows they count, so that at every commit, across restarts and
//! `kill -9`:
//!
//! `accepted = forwarded + dropped (all reasons) + refused + buffered readings`
//!
//! (`refused`: readings the server refused for good, moved to dead-letters.) A buffer from
//! before these keys starts them at open with `accepted` = the readings it holds.

use rusqlite::{params, Connection, OptionalExtension};

/// Why a bound dropped a reading; the label of `readings_dropped_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// `max_bytes` with `drop_oldest` (or `thin` when thinning frees nothing).
    BufferFull,
    /// `max_bytes` with `thin`.
    Thin,
    /// `max_age`.
    MaxAge,
}

impl DropReason {
    pub const ALL: [DropReason; 3] = [Self::BufferFull, Self::Thin, Self::MaxAge];

    pub fn label(self) -> &'static str {
        match self {
            Self::BufferFull => "buffer_full",
            Self::Thin => "thin",
            Self::MaxAge => "max_age",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::BufferFull => "count_dropped_buffer_full",
            Self::Thin => "count_dropped_thin",
            Self::MaxAge => "count_dropped_max_age",
        }
    }
}

const ACCEPTED: &str = "count_accepted";
const FORWARDED: &str = "count_forwarded";
const REFUSED: &str = "count_refused";

/// Readings counted since the buffer was created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub accepted: u64,
    pub forwarded: u64,
    /// Indexed like [`DropReason::ALL`].
    pub dropped: [u64; 3],
    pub refused: u64,
}

impl Counts {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize]
    }

    pub(crate) fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }

    fn keys(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        [
            (ACCEPTED, self.accepted),
            (FORWARDED, self.forwarded),
            (REFUSED, self.refused),
        ]
        .into_iter()
        .chain(DropReason::ALL.map(|r| (r.key(), self.dropped(r))))
    }
}

/// Adds `delta` to the stored totals, inside the caller's transaction.
pub fn add(tx: &rusqlite::Transaction<'_>, delta: &Counts) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
    )?;
    for (key, n) in delta.keys().filter(|(_, n)| *n > 0) {
        stmt.execute(params![key, i64::try_from(n).unwrap_or(i64::MAX)])?;
    }
    Ok(())
}

/// The stored totals (keys not yet written count 0).
pub fn load(conn: &Connection) -> rusqlite::Result<Counts> {
    let mut stmt = conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?;
    let mut get = |key: &str| -> rusqlite::Result<u64> {
        let v: Option<i64> = stmt.query_row([key], |r| r.get(0)).optional()?;
        Ok(v.map_or(0, |v| u64::try_from(v).unwrap_or(0)))
    };
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
pub fn init(conn: &Connection, buffered_readings: u64) -> rusqlite::Result<()> {
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
    let v: Option<i64> = conn
        .query_row("SELECT value FROM meta WHERE key = 'thin_after'", [], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(v.map_or(0, |v| u64::try_from(v).unwrap_or(0)))
}

pub(crate) fn set_thin_after(tx: &rusqlite::Transaction<'_>, after: u64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO meta (key, value) VALUES ('thin_after', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute([i64::try_from(after).unwrap_or(0)])?;
    Ok(())
}
