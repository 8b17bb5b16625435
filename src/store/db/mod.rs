//! Every SQL statement of the buffer, and the functions that run them: the rest of the store
//! calls these typed functions and holds no SQL text. Here: opening the file (with corruption
//! recovery), the schema and its migrations, and the totals read at open; per table:
//! - [`outbox`]: the rows waiting for their PubAck, and `meta.next_seq`;
//! - [`dead_letter`]: the `dead_letters` table;
//! - [`meta`]: the lifetime totals, the thinning position, the event-id salt;
//! - [`sensors`]: liveness per sensor;
//! - [`recent`]: the deduplication tables;
//! - [`commands`]: the downlink's inbox; [`actuators`]: each actuator's persisted state.
//!
//! Everything here is synchronous and runs on the caller's connection.

pub(crate) mod actuators;
pub(crate) mod commands;
pub(crate) mod dead_letter;
pub(crate) mod meta;
pub(crate) mod outbox;
pub(crate) mod recent;
pub(crate) mod sensors;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OpenFlags};

use super::StoreError;
use crate::config::Synchronous;
use crate::reading::{KIND_HEARTBEAT, KIND_RESULT, KIND_STATUS};

pub(crate) use dead_letter::DeadLetterText;
pub use dead_letter::{dead_letters, dead_letters_by_reason, DeadLetterRow};
pub(crate) use meta::event_salt;
pub use outbox::OutboxRow;
pub(crate) use outbox::{fetch_after, oldest_stored_ms, ScannedRow};

/// Bumped whenever the schema changes; a file with a higher version is refused, not touched.
pub const SCHEMA_VERSION: i64 = 7;

/// Per-row bytes beyond the record itself (event id, seq, time, SQLite cell header), counted
/// against `max_bytes` so the bound holds for many small readings too.
pub(crate) const ROW_OVERHEAD: u64 = 40;

/// Dead-letter payloads are cut to this many bytes.
pub(crate) const DEAD_LETTER_RAW_MAX: usize = 64 << 10;

const SCHEMA: &str = "
CREATE TABLE outbox (
    seq        INTEGER PRIMARY KEY,
    event_id   BLOB    NOT NULL,
    stored_ms  INTEGER NOT NULL,
    kind       INTEGER NOT NULL,
    body       BLOB    NOT NULL
);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE dead_letters (
    id      INTEGER PRIMARY KEY,
    at_ms   INTEGER NOT NULL,
    source  TEXT    NOT NULL,
    reason  TEXT    NOT NULL,
    detail  TEXT    NOT NULL,
    raw     BLOB    NOT NULL
);
CREATE TABLE recent_messages (
    id  INTEGER PRIMARY KEY,
    key BLOB NOT NULL UNIQUE
);
INSERT INTO meta (key, value) VALUES ('next_seq', 1);
";

/// Added in schema version 2: liveness per sensor, and readings already stored by their
/// device's own (device, type, observation time).
const SCHEMA_V2: &str = "
CREATE TABLE sensors (
    device_id      TEXT    NOT NULL,
    sensor_type    INTEGER NOT NULL,
    field_id       TEXT    NOT NULL,
    tenant_id      TEXT    NOT NULL,
    last_seen_ms   INTEGER NOT NULL,
    stale_after_ms INTEGER NOT NULL,
    online         INTEGER NOT NULL,
    low_battery    INTEGER NOT NULL,
    battery        REAL,
    rssi           INTEGER,
    readings       INTEGER NOT NULL,
    PRIMARY KEY (device_id, sensor_type)
) WITHOUT ROWID;
CREATE TABLE recent_readings (
    id  INTEGER PRIMARY KEY,
    key BLOB NOT NULL UNIQUE
);
";

/// Added in schema version 3: frames of firmware nodes already committed, a window per node.
const SCHEMA_V3: &str = "
CREATE TABLE recent_frames (
    id   INTEGER PRIMARY KEY,
    node INTEGER NOT NULL,
    key  BLOB    NOT NULL UNIQUE
);
CREATE INDEX recent_frames_by_node ON recent_frames (node, id);
";

/// Schema version 4: `recent_messages` without an index on its random keys (looked up in
/// memory instead, see [`super::recent`]); `recent_readings` keys that begin with the
/// observation time, so its index grows at one end (old-style keys can never match a new one,
/// so they are dropped); and a random salt from which rows stored from now on derive their
/// event id ([`event_id`]), leaving their `event_id` column empty. Rows stored before keep the
/// id they were given.
const SCHEMA_V4: &str = "
INSERT INTO meta (key, value) VALUES ('event_salt_0', random()), ('event_salt_1', random());
CREATE TABLE recent_messages_v4 (
    id  INTEGER PRIMARY KEY,
    key BLOB NOT NULL
);
INSERT INTO recent_messages_v4 (id, key) SELECT id, key FROM recent_messages;
DROP TABLE recent_messages;
ALTER TABLE recent_messages_v4 RENAME TO recent_messages;
DELETE FROM recent_readings;
";

/// Schema version 5: what `dead-letters replay` needs. `topic`: the MQTT topic of a message
/// (NULL for other sources); rows from before take it from their detail, which intake wrote as
/// `topic {topic}: ...`. `device`, and `sensor_type` when one type was: set when only that
/// device's readings of the message were rejected (rate limits, one bad item of a batch), so a
/// replay keeps only those and does not double the others.
const SCHEMA_V5: &str = "
ALTER TABLE dead_letters ADD COLUMN topic TEXT;
ALTER TABLE dead_letters ADD COLUMN device TEXT;
ALTER TABLE dead_letters ADD COLUMN sensor_type TEXT;
CREATE INDEX dead_letters_by_time ON dead_letters (at_ms);
UPDATE dead_letters SET topic = substr(detail, 7, instr(detail, ': ') - 7)
    WHERE detail LIKE 'topic %' AND instr(detail, ': ') > 7;
";

/// Schema version 6: the downlink (DESIGN §8). `commands`: the inbox, one row per command
/// id ever received (until the bound takes done rows), with the message's raw bytes so a
/// restart can hand open commands to the core again; `state` is `queued`, `writing` or `done`,
/// `status` and `reason` the last result committed. `actuators`: what must survive a restart
/// per actuator (the core's `Restored`), and what the CLI shows (the last confirmed value as
/// text: `on`, `off` or a number; the last result). The partial index finds a buffered result
/// by its stored event id, so the same result is never buffered twice.
const SCHEMA_V6: &str = "
CREATE TABLE commands (
    command_id     TEXT    PRIMARY KEY,
    actuator_id    TEXT    NOT NULL,
    field_id       TEXT    NOT NULL,
    tenant_id      TEXT    NOT NULL,
    correlation_id TEXT    NOT NULL,
    action         TEXT    NOT NULL,
    value          REAL,
    issued_ms      INTEGER NOT NULL,
    expires_ms     INTEGER NOT NULL,
    received_ms    INTEGER NOT NULL,
    raw            BLOB    NOT NULL,
    state          TEXT    NOT NULL,
    status         TEXT,
    reason         TEXT,
    updated_ms     INTEGER NOT NULL
);
CREATE INDEX commands_by_state ON commands (state, updated_ms);
CREATE INDEX commands_by_received ON commands (received_ms);
CREATE TABLE actuators (
    actuator_id         TEXT PRIMARY KEY,
    newest_written_ms   INTEGER,
    off_since_ms        INTEGER,
    deadline_ms         INTEGER,
    deadline_command_id TEXT,
    run_since_ms        INTEGER,
    confirmed           TEXT,
    last_command_id     TEXT,
    last_status         TEXT,
    last_reason         TEXT,
    last_at_ms          INTEGER,
    updated_ms          INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX outbox_results ON outbox (event_id) WHERE kind = 3;
";

/// Schema version 7: a device's W3C trace context, kept with each of its readings so every
/// publish of the row, after a restart too, carries it (`common::trace`: the `traceparent`,
/// then a space and the `tracestate` if any). NULL for every other row: their context derives
/// from the event id. Adding a nullable column rewrites nothing.
const SCHEMA_V7: &str = "
ALTER TABLE outbox ADD COLUMN trace TEXT;
";

/// The steps from each version to the next: `STEPS[v..]` brings a file at version `v` (0: a
/// new file) to [`SCHEMA_VERSION`].
const STEPS: [&str; SCHEMA_VERSION as usize] = [
    SCHEMA, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5, SCHEMA_V6, SCHEMA_V7,
];

const TABLES: [&str; 9] = [
    "outbox",
    "meta",
    "dead_letters",
    "recent_messages",
    "sensors",
    "recent_readings",
    "recent_frames",
    "commands",
    "actuators",
];

/// SQLite's verdict that the file's pages are damaged (as opposed to a full disk, a busy
/// lock or an I/O error, which a retry may get past).
pub(crate) fn is_corrupt(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What opening found: a healthy file, or a corrupt one that was moved aside.
pub struct Opened {
    pub conn: Connection,
    pub(crate) moved_aside: Option<PathBuf>,
}

/// Opens (or creates) the buffer. A file that is not a database, fails `quick_check`, or lacks
/// our tables is renamed to `<name>.corrupt-<unix-seconds>` with its WAL, and a fresh file is
/// started: a corrupt buffer must never keep the gateway from running. So is an empty file
/// (no WAL either) when `has_held_rows`: SQLite would take it for a new database and the rows
/// it held would vanish without an alarm.
pub fn open(path: &Path, sync: Synchronous, has_held_rows: bool) -> Result<Opened, StoreError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let opened = if has_held_rows && is_emptied(path) {
        Err(corrupt(
            path,
            "the file is empty, though this buffer has held rows (seq.floor)".into(),
        ))
    } else {
        open_checked(path, sync)
    };
    match opened {
        Ok(conn) => Ok(Opened {
            conn,
            moved_aside: None,
        }),
        Err(StoreError::Corrupt { detail, .. }) => {
            let aside = move_aside(path)?;
            tracing::error!(
                file = %path.display(),
                moved_to = %aside.display(),
                %detail,
                "buffer file is corrupt: moved aside, starting a fresh buffer; readings in the old file are not forwarded"
            );
            let conn = open_checked(path, sync)?;
            Ok(Opened {
                conn,
                moved_aside: Some(aside),
            })
        }
        Err(e) => Err(e),
    }
}

/// An existing database file of zero bytes without a WAL that could hold its pages.
fn is_emptied(path: &Path) -> bool {
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    len(path) == Some(0) && len(Path::new(&wal)).unwrap_or(0) == 0
}

/// Opens the file and brings its schema to [`SCHEMA_VERSION`]; [`StoreError::Corrupt`] if it
/// is damaged or not ours.
fn open_checked(path: &Path, sync: Synchronous) -> Result<Connection, StoreError> {
    let classify = |e: rusqlite::Error| classify(path, e);
    let conn = connect(path, sync).map_err(classify)?;
    let check: String = conn
        .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
        .map_err(classify)?;
    if check != "ok" {
        return Err(corrupt(path, format!("quick_check: {check}")));
    }
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(classify)?;
    match version {
        0 => {
            let tables: i64 = conn
                .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                .map_err(classify)?;
            if tables != 0 {
                return Err(corrupt(path, "tables present but no schema version".into()));
            }
            migrate(&conn, 0).map_err(classify)?;
        }
        1..SCHEMA_VERSION => migrate(&conn, version).map_err(classify)?,
        SCHEMA_VERSION => check_tables(path, &conn)?,
        newer => {
            return Err(StoreError::NewerSchema {
                path: path.to_path_buf(),
                found: newer,
            })
        }
    }
    Ok(conn)
}

fn corrupt(path: &Path, detail: String) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        detail,
    }
}

/// SQLite's verdict that the file is damaged or no database becomes [`StoreError::Corrupt`];
/// anything else (a full disk, a busy lock) stays an error a retry may get past.
fn classify(path: &Path, e: rusqlite::Error) -> StoreError {
    if is_corrupt(&e) {
        corrupt(path, e.to_string())
    } else {
        StoreError::Sqlite {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

/// The connection with the writer's settings: WAL, `sync`, bounded journal.
fn connect(path: &Path, sync: Synchronous) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Without the planner stability guarantee, rebinding a parameter SQLite may plan around
    // (a LIMIT, for one) recompiles the statement at its next step: a parse per fetch.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    let sync = match sync {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = {sync};
         PRAGMA journal_size_limit = 67108864;
         PRAGMA temp_store = MEMORY;"
    ))?;
    Ok(conn)
}

/// Runs the steps from version `from` to [`SCHEMA_VERSION`] in one transaction.
fn migrate(conn: &Connection, from: i64) -> rusqlite::Result<()> {
    let steps = STEPS[from as usize..].join("\n");
    conn.execute_batch(&format!(
        "BEGIN; {steps} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
    ))
}

/// A file at the current version must have every table of it.
fn check_tables(path: &Path, conn: &Connection) -> Result<(), StoreError> {
    let list = TABLES.map(|t| format!("'{t}'")).join(", ");
    let found: i64 = conn
        .query_row(
            &format!(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ({list})"
            ),
            [],
            |r| r.get(0),
        )
        .map_err(|e| classify(path, e))?;
    if found != TABLES.len() as i64 {
        return Err(corrupt(
            path,
            format!(
                "schema version {SCHEMA_VERSION} but {found} of {} tables",
                TABLES.len()
            ),
        ));
    }
    Ok(())
}

fn move_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // A second damaged file within the same second (or after the clock stepped back) must not
    // replace the first one kept for inspection.
    let aside = (0..)
        .map(|n: u32| {
            let mut aside = path.as_os_str().to_owned();
            aside.push(format!(".corrupt-{stamp}"));
            if n > 0 {
                aside.push(format!(".{n}"));
            }
            PathBuf::from(aside)
        })
        .find(|p| !p.exists())
        .unwrap_or_else(|| PathBuf::from(format!("{}.corrupt", path.display())));
    let io = |source| StoreError::DataDir {
        path: path.to_path_buf(),
        source,
    };
    std::fs::rename(path, &aside).map_err(io)?;
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let side = PathBuf::from(side);
        if side.exists() {
            let mut to = aside.as_os_str().to_owned();
            to.push(suffix);
            std::fs::rename(&side, PathBuf::from(to)).map_err(io)?;
        }
    }
    Ok(aside)
}

/// Folds the WAL into the main file and truncates it, so the next open is quick.
pub(crate) fn checkpoint(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
}

/// Opens an existing buffer read-only, for the CLI while the gateway may be running.
pub fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
    if !path.exists() {
        return Err(StoreError::Missing {
            path: path.to_path_buf(),
        });
    }
    let sqlite = |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sqlite)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(sqlite)?;
    Ok(conn)
}

/// A row's event id when its `event_id` column is empty: a hash of the buffer's random salt
/// and the row's seq, laid out as a version 4 UUID. Fixed by the row's seq, so it never
/// changes; unique per buffer because seqs are; unlike other buffers' ids because salts are.
pub fn event_id(salt: &[u8; 16], seq: u64) -> [u8; 16] {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(salt);
    h.update(&seq.to_le_bytes());
    as_uuid_v4(h.digest128())
}

/// A 128-bit hash laid out as a version 4 (random) UUID: what event ids look like.
pub(crate) fn as_uuid_v4(hash: u128) -> [u8; 16] {
    let mut id = hash.to_le_bytes();
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

/// Totals read once at open; afterwards the owner thread keeps them current.
pub struct Totals {
    pub rows: u64,
    pub(crate) status_rows: u64,
    pub(crate) result_rows: u64,
    pub(crate) heartbeat_rows: u64,
    pub bytes: u64,
    pub(crate) next_seq: u64,
    pub dead_letters: u64,
}

impl Totals {
    /// Rows that are readings: neither status events, command results nor heartbeats.
    pub(crate) fn readings(&self) -> u64 {
        self.rows.saturating_sub(self.event_rows())
    }

    /// Rows that are not readings.
    pub(crate) fn event_rows(&self) -> u64 {
        self.status_rows + self.result_rows + self.heartbeat_rows
    }
}

pub fn totals(conn: &Connection) -> rusqlite::Result<Totals> {
    let (rows, body): (i64, i64) = conn.query_row(
        "SELECT count(*), coalesce(sum(length(body) + coalesce(length(trace), 0)), 0) FROM outbox",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let next_seq: i64 =
        conn.query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
            r.get(0)
        })?;
    let max_seq: Option<i64> = conn.query_row("SELECT max(seq) FROM outbox", [], |r| r.get(0))?;
    let dead_letters: i64 =
        conn.query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0))?;
    let (status_rows, result_rows, heartbeat_rows): (i64, i64, i64) = conn.query_row(
        "SELECT count(*) FILTER (WHERE kind = ?1), count(*) FILTER (WHERE kind = ?2), \
         count(*) FILTER (WHERE kind = ?3) FROM outbox",
        [KIND_STATUS, KIND_RESULT, KIND_HEARTBEAT],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let rows = u64::try_from(rows).unwrap_or(0);
    Ok(Totals {
        rows,
        status_rows: u64::try_from(status_rows).unwrap_or(0),
        result_rows: u64::try_from(result_rows).unwrap_or(0),
        heartbeat_rows: u64::try_from(heartbeat_rows).unwrap_or(0),
        bytes: u64::try_from(body).unwrap_or(0) + rows * ROW_OVERHEAD,
        // The meta row is the authority; max(seq)+1 guards against a meta row older than rows.
        next_seq: u64::try_from(next_seq.max(max_seq.unwrap_or(0) + 1)).unwrap_or(1),
        dead_letters: u64::try_from(dead_letters).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corrupt_files(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
            .count()
    }

    /// Found by the chaos suite: a buffer truncated to nothing opened as a new database, so
    /// the rows it held vanished without an alarm.
    #[test]
    fn an_emptied_buffer_that_held_rows_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        drop(open(&path, Synchronous::Normal, false).unwrap());
        std::fs::write(&path, b"").unwrap();
        let opened = open(&path, Synchronous::Normal, true).unwrap();
        assert!(opened.moved_aside.is_some(), "emptied file set aside");
        assert_eq!(totals(&opened.conn).unwrap().rows, 0);
        drop(opened);
        // A buffer that never held rows may be empty: a crash right after creating it.
        std::fs::write(&path, b"").unwrap();
        assert!(open(&path, Synchronous::Normal, false)
            .unwrap()
            .moved_aside
            .is_none());
    }

    /// Two damaged files in one second (or after the clock stepped back) used to keep only the
    /// last.
    #[test]
    fn damaged_files_in_the_same_second_are_all_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        for _ in 0..3 {
            std::fs::write(&path, vec![0x5a; 8192]).unwrap();
            assert!(open(&path, Synchronous::Normal, false)
                .unwrap()
                .moved_aside
                .is_some());
        }
        assert_eq!(corrupt_files(dir.path()), 3);
    }

    /// A buffer as `version` (1 to 6) left it: a row waiting, a message remembered and two
    /// dead-letters (MQTT and serial); from version 2 a reading remembered, from version 3 a
    /// firmware frame.
    fn old_file(path: &Path, version: usize) {
        let conn = Connection::open(path).unwrap();
        let steps = STEPS[..version].join("\n");
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; BEGIN; {steps} PRAGMA user_version = {version}; COMMIT;"
        ))
        .unwrap();
        conn.execute(
            "INSERT INTO outbox (seq, event_id, stored_ms, kind, body) VALUES (7, ?1, 1000, 0, x'0102')",
            [&[9u8; 16][..]],
        )
        .unwrap();
        conn.execute("UPDATE meta SET value = 8 WHERE key = 'next_seq'", [])
            .unwrap();
        conn.execute(
            "INSERT INTO recent_messages (key) VALUES (?1)",
            [&[5u8; 16][..]],
        )
        .unwrap();
        conn.execute_batch(
            "INSERT INTO dead_letters (at_ms, source, reason, detail, raw) VALUES
                (500, 'farm', 'unknown_device', 'topic sahool/sensors/p-9/f: unknown device p-9: add it', x'7b7d'),
                (600, 'talker', 'malformed', 'port talker: `x` is not key=value', x'78');",
        )
        .unwrap();
        if version >= 2 {
            conn.execute(
                "INSERT INTO recent_readings (key) VALUES (?1)",
                [&[6u8; 16][..]],
            )
            .unwrap();
        }
        if version >= 3 {
            conn.execute(
                "INSERT INTO recent_frames (node, key) VALUES (3, ?1)",
                [&[4u8; 16][..]],
            )
            .unwrap();
        }
        if version >= 5 {
            // Version 5 stored the topic itself.
            conn.execute(
                "UPDATE dead_letters SET topic = 'sahool/sensors/p-9/f' WHERE at_ms = 500",
                [],
            )
            .unwrap();
        }
    }

    #[test]
    fn buffers_of_every_older_version_are_migrated_keeping_rows_and_remembered_keys() {
        for version in 1..SCHEMA_VERSION as usize {
            migrates_from(version);
        }
    }

    fn migrates_from(version: usize) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        old_file(&path, version);

        let opened = open(&path, Synchronous::Full, true).unwrap();
        assert!(opened.moved_aside.is_none(), "version {version}");
        let conn = opened.conn;
        let found: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(found, SCHEMA_VERSION, "version {version}");
        let salt = event_salt(&conn).unwrap();
        let rows = fetch_after(&conn, 0, 10, &salt).unwrap();
        assert_eq!(rows.len(), 1, "version {version}");
        assert_eq!(
            (rows[0].seq, rows[0].event_id),
            (7, [9u8; 16]),
            "ids given before stay (version {version})"
        );
        assert_eq!(rows[0].body, vec![1, 2]);
        assert_eq!(rows[0].trace, None, "version {version}: no device context");
        assert_eq!(totals(&conn).unwrap().next_seq, 8);
        remembered_keys_kept(&conn, version);
        dead_letters_kept(&conn, version);
        // Version 6: the downlink's tables, empty.
        assert!(
            commands::open(&conn).unwrap().is_empty(),
            "version {version}"
        );
        assert!(actuators::states(&conn).unwrap().is_empty());
        // No index on the message keys any more: the same key may be stored twice.
        conn.execute(
            "INSERT INTO recent_messages (key) VALUES (?1)",
            [&[5u8; 16][..]],
        )
        .unwrap();

        // A row stored now gets its id from the salt, the same at every read; version 7 keeps
        // a device's trace context with it, counted in the bytes.
        let traced = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 v=1";
        let tx = conn.unchecked_transaction().unwrap();
        outbox::insert(&tx, 8, 1000, 0, &[3], Some(traced)).unwrap();
        tx.commit().unwrap();
        let new = fetch_after(&conn, 7, 10, &salt).unwrap().remove(0);
        assert_eq!(new.event_id, event_id(&salt, 8));
        let trace = new.trace.expect("the stored context reads back");
        assert_eq!(trace.stored().as_str(), traced);
        assert_eq!(
            totals(&conn).unwrap().bytes,
            2 + 1 + traced.len() as u64 + 2 * ROW_OVERHEAD
        );
        let new_id = new.event_id;
        drop(conn);

        // Opening again finds the current version and changes nothing, the salt included.
        let again = open(&path, Synchronous::Full, true).unwrap();
        assert!(again.moved_aside.is_none());
        assert_eq!(event_salt(&again.conn).unwrap(), salt);
        let rows = fetch_after(&again.conn, 0, 10, &salt).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.event_id).collect::<Vec<_>>(),
            vec![[9u8; 16], new_id]
        );
    }

    /// The message, observation and frame keys an older version remembered.
    fn remembered_keys_kept(conn: &Connection, version: usize) {
        let kept: Vec<u8> = conn
            .query_row("SELECT key FROM recent_messages", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kept, vec![5u8; 16], "version {version}");
        let readings: i64 = conn
            .query_row("SELECT count(*) FROM recent_readings", [], |r| r.get(0))
            .unwrap();
        // Keys from before version 4 are old-style and dropped; version 4 keys stay.
        assert_eq!(
            readings,
            i64::from(version >= 4),
            "observation keys (version {version})"
        );
        let frames: Vec<(i64, Vec<u8>)> = conn
            .prepare("SELECT node, key FROM recent_frames")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let expected = if version >= 3 {
            vec![(3, vec![4u8; 16])]
        } else {
            vec![]
        };
        assert_eq!(frames, expected, "frames kept (version {version})");
    }

    /// Dead-letters of an older version, with the topic taken from their detail.
    fn dead_letters_kept(conn: &Connection, version: usize) {
        let mut letters = dead_letters(conn, 10).unwrap();
        letters.reverse();
        assert_eq!(letters.len(), 2, "dead-letters kept (version {version})");
        assert_eq!(
            (letters[0].at_ms, letters[0].raw.as_slice()),
            (500, &b"{}"[..])
        );
        assert_eq!(
            letters[0].topic.as_deref(),
            Some("sahool/sensors/p-9/f"),
            "topic taken from the detail (version {version})"
        );
        assert_eq!(
            (
                &letters[1].topic,
                &letters[1].device,
                &letters[1].sensor_type
            ),
            (&None, &None, &None)
        );
    }

    #[test]
    fn fresh_buffer_has_the_current_schema() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("buffer.db"), Synchronous::Full, false)
            .unwrap()
            .conn;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let indexed: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'recent_messages'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexed, 0);
    }

    #[test]
    fn derived_event_ids_are_v4_uuids_distinct_per_seq_and_per_buffer() {
        let a = [1u8; 16];
        let b = [2u8; 16];
        let ids: std::collections::HashSet<[u8; 16]> = (1..=10_000)
            .flat_map(|seq| [event_id(&a, seq), event_id(&b, seq)])
            .collect();
        assert_eq!(ids.len(), 20_000);
        let id = uuid::Uuid::from_bytes(event_id(&a, 1));
        assert_eq!(id.get_version_num(), 4);
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(event_id(&a, 1), event_id(&a, 1));
    }
}
