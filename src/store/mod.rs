//! The outbox: every accepted reading, durable in SQLite until JetStream has acknowledged it.
//!
//! # On disk (`{data_dir}/buffer.db`, WAL mode, `PRAGMA user_version` = 5; older files are
//! migrated when opened, see [`db`])
//! - `outbox(seq PK, event_id BLOB, stored_ms, kind, body)`: one row per event. `event_id` is
//!   empty for rows stored since version 4: their id derives from the seq ([`db::event_id`]),
//!   16 bytes saved per row. `kind` 0 is a reading (`body` = [`Reading`] as postcard bytes), 1
//!   a liveness change (`body` = [`crate::reading::StatusChange`]), 2 a reading with its
//!   device's metadata (the kind-0 body, then the metadata's JSON text; see
//!   [`Reading::to_row`]); the event JSON is rendered at publish time.
//! - `meta(key, value)`: `next_seq`, the next sequence number to hand out; `event_salt_0` and
//!   `event_salt_1`, the random salt of derived event ids; `count_*`, lifetime totals of
//!   readings accepted, forwarded, dropped by reason and refused ([`counts`]).
//! - `dead_letters(id PK, at_ms, source, reason, detail, raw, topic, device, sensor_type)`:
//!   inputs that could not become readings and publishes the server refused for good, with their
//!   raw bytes; bounded by `buffer.dead_letter_max` rows and [`db::DEAD_LETTER_RAW_MAX`] bytes
//!   each. `topic`: an MQTT message's topic; `device` (and `sensor_type`, when one type was):
//!   only that device's readings of the message were rejected, the others were stored; both
//!   NULL: the whole message was. Indexed by `at_ms`: the rows one message left share it
//!   (`replay.rs`).
//! - `{file}.lock` (beside the database): an advisory `flock` held by the one process that
//!   writes the buffer (the gateway, or `dead-letters replay` when none runs), see `lock.rs`.
//! - `seq.floor` (a text file beside the database): a reserved high-water mark of `seq`, so a
//!   fresh database after corruption recovery continues above every seq ever handed out.
//! - `recent_messages(id PK, key)`: hashes of the last [`recent::RECENT_MESSAGES`] source
//!   messages committed, so a redelivery of a message already stored (an MQTT ack lost to a
//!   crash) is acknowledged again but not stored twice. Append-only; looked up in memory.
//! - `recent_readings(id PK, key UNIQUE)`: (device timestamp, hash of device and type) of the
//!   last [`RECENT_READINGS`] readings stored, so the same observation delivered twice is stored
//!   once. The key starts with the time, so new keys land at one end of the index.
//! - `recent_frames(id PK, node, key UNIQUE)`: frames of firmware nodes committed, the last
//!   [`FRAME_WINDOW`] per node (`node` = the node's [`FrameKey::node`]), so a resend after a lost
//!   ack is acknowledged again but not stored twice, however long the node waited and whatever
//!   else was stored meanwhile. At most [`RECENT_FRAMES_MAX`] rows over all nodes.
//! - `sensors(device_id, sensor_type PK, field_id, tenant_id, last_seen_ms, stale_after_ms,
//!   online, low_battery, battery, rssi, readings)`: liveness per sensor ([`liveness`]), written
//!   in the same transaction as the readings and status events it follows from.
//!
//! Readers besides the writer (the CLI, `/status`) go through [`Inspector`]: the file opened
//! read-only, typed queries only, so nothing outside this module touches SQLite.
//!
//! # Invariants
//! 1. One thread owns the connection; every write goes through its queue. Writes queued while a
//!    commit is running are committed together in the next transaction (group commit: one fsync
//!    for all of them). A caller learns its outcome only after that commit returned.
//! 2. `seq` is strictly increasing and never reused: `next_seq` is written in the same
//!    transaction as the rows it numbers, so it survives restarts and deleting every row; and
//!    `seq.floor` covers it before the commit, so it survives losing the file too.
//! 3. `event_id` is fixed when the row is committed (by its seq and the buffer's salt, or
//!    stored) and never changes.
//! 4. A row leaves `outbox` only by: a PubAck for its seq ([`StoreHandle::acked`], which takes
//!    runs of seqs whose every buffered row was acknowledged, so one statement deletes a run);
//!    a permanent publish refusal (moved to `dead_letters` in the same transaction); or a bound
//!    (`max_bytes` with `drop_oldest` or `thin`, `max_age`), counted in
//!    `readings_dropped_total{reason}`. Every bound deletes through one path that skips the
//!    forwarder's claim: the rows it fetched and may still publish (a fetch claims what it
//!    returns; [`StoreHandle::holding`] releases). So a reading counted as dropped never
//!    reaches the stream; while the claim holds the oldest rows, a bound takes the rows after
//!    it, and `max_bytes` may be exceeded by the claimed rows until their PubAcks arrive.
//!    Each way out adds to its lifetime total in `meta` in the same transaction, so
//!    `accepted = forwarded + dropped + refused + buffered` (readings) holds at every commit.
//! 5. With `reject_new`, or while free disk is below `min_free_disk`, appends that carry
//!    readings are refused whole ([`AppendOutcome::Full`]): nothing of them is stored, so the
//!    source keeps the input (MQTT: no ack) and offers it again later.
//! 6. A corrupt file at open is moved aside and replaced ([`db::open`]); an error from SQLite
//!    at run time fails the affected callers, who retry: nothing is acknowledged that was not
//!    committed. A file found corrupt at run time is never written again: the writer reports
//!    it on [`StoreHandle::fatal`] and fails every later append, fetch and replay with
//!    [`StoreError::Corrupt`], and the gateway stops in order so its next start moves the file
//!    aside.
//! 7. Deduplication keys are remembered only for readings actually stored, so a reading refused
//!    by a bound is not mistaken for a repeat when it is offered again.
//! 8. A dead-letter leaves `dead_letters` only by the `dead_letter_max` bound, or by a replay
//!    ([`StoreHandle::replay`]) in the transaction that stores its message's readings; rows of a
//!    message the current mapping still rejects, or that cannot be replayed, stay unchanged.

pub mod counts;
pub mod db;
mod inspect;
pub mod liveness;
mod lock;
mod recent;
mod replay;
mod seq_floor;

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot, watch};

use crate::common::log_limit::LogLimit;
use crate::common::metrics::Metrics;
use crate::config::{Buffer, WhenFull};
use crate::ingest::mapping::Reason;
use crate::reading::{Reading, SensorType, Timestamp, KIND_READING, KIND_STATUS};
use counts::{Counts, DropReason};
pub use db::{DeadLetterRow, OutboxRow};
pub use inspect::Inspector;
pub use replay::{ReasonReport, ReplayFilter, ReplayMapper, ReplayReport, Replayed};

/// Device observations remembered for duplicate detection.
pub(crate) const RECENT_READINGS: i64 = 200_000;

/// Frames remembered per firmware node for resend detection. A node that keeps fewer frames
/// than this in flight (sent, not yet acked) never gets a resend stored twice.
pub const FRAME_WINDOW: i64 = 1024;

/// Rows of `recent_frames` over all nodes; beyond it the oldest go, whichever node sent them.
pub(crate) const RECENT_FRAMES_MAX: i64 = 256 * FRAME_WINDOW;

/// Rows one thinning round considers at most (the oldest half of the buffer, up to this), so
/// a round's decoding stays bounded however large `max_bytes` is.
const THIN_ROUND_ROWS: u64 = 65_536;

/// Rounds of thinning for one append at most before falling back to dropping the oldest.
const THIN_ROUNDS_MAX: u32 = 16;

/// Readings observed within this time of the newest observation in the buffer are never
/// thinned.
const THIN_SPARE_NS: i64 = 3_600 * 1_000_000_000;

/// Commands queued for one transaction at most.
const MAX_GROUP: usize = 8192;

/// Acknowledged seqs held back from a transaction of their own until this many are waiting:
/// deletes need no fsync of their own, so they ride along with the next commit (an append, a
/// flush, the once-a-second maintenance) or go in groups of this size.
const ACKED_COMMIT_AT: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("buffer {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("buffer {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("buffer {path} has schema version {found}, newer than this gateway understands ({}); run the newer gateway or move the file away", db::SCHEMA_VERSION)]
    NewerSchema { path: PathBuf, found: i64 },
    #[error("no buffer at {path}: has the gateway run with this config?")]
    Missing { path: PathBuf },
    #[error("buffer {path} is in use by another process: a running gateway or `dead-letters replay` holds {lock}")]
    Locked { path: PathBuf, lock: PathBuf },
    #[error("the buffer's writer thread has stopped")]
    Closed,
    #[error("commit failed: {0}")]
    Commit(String),
}

/// A rejected input to keep in `dead_letters`.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub source: String,
    pub reason: Reason,
    pub detail: String,
    pub raw: Arc<[u8]>,
    /// The MQTT topic the message came on: `dead-letters replay` maps the message again with it.
    pub topic: Option<String>,
    /// Set when only this device's readings of the message were rejected: a replay keeps only
    /// its readings, so the others of the message (stored the first time) are not doubled.
    pub device: Option<String>,
    /// With `device`: only its reading of this type was rejected.
    pub sensor_type: Option<SensorType>,
}

/// Everything one source message produced, committed together or not at all.
#[derive(Debug, Default, Clone)]
pub struct Append {
    pub readings: Vec<Reading>,
    pub dead_letters: Vec<NewDeadLetter>,
    /// Hash identifying the source message; see `recent_messages`.
    pub message_key: Option<[u8; 16]>,
    /// Check `message_key` against recent messages first (the source says it may be a resend).
    pub maybe_duplicate: bool,
    /// A firmware frame's identity: always checked against its node's recent frames, and
    /// remembered there once stored; see `recent_frames`.
    pub frame_key: Option<FrameKey>,
}

/// Identity of a firmware node's frame, for resend detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameKey {
    /// The node (a hash of port and node id): whose window remembers the frame.
    pub node: i64,
    /// The frame (a hash of port, node id, seq and content).
    pub frame: [u8; 16],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Committed; readings got seqs `first_seq..first_seq + count`.
    Stored { first_seq: u64, count: u64 },
    /// The same message was committed before; nothing stored again.
    Duplicate,
    /// Not stored: buffer full with `reject_new`, or the disk reserve reached. Retry later.
    Full,
}

/// Buffer totals for `buffer stats` and `/metrics`.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Readings waiting (status events not counted).
    pub readings: u64,
    pub status_events: u64,
    pub bytes: u64,
    pub(crate) oldest_stored_ms: Option<i64>,
    pub(crate) next_seq: u64,
    pub dead_letters_by_reason: Vec<(String, u64)>,
    /// Lifetime totals of readings (see [`counts`]).
    pub counts: Counts,
}

pub fn stats(conn: &Connection) -> rusqlite::Result<Stats> {
    let t = db::totals(conn)?;
    Ok(Stats {
        readings: t.rows - t.status_rows.min(t.rows),
        status_events: t.status_rows,
        bytes: t.bytes,
        oldest_stored_ms: db::oldest_stored_ms(conn)?,
        next_seq: t.next_seq,
        dead_letters_by_reason: db::dead_letters_by_reason(conn)?,
        counts: counts::load(conn)?,
    })
}

enum Command {
    Append(Append, oneshot::Sender<Result<AppendOutcome, StoreError>>),
    Fetch {
        after: u64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<OutboxRow>, StoreError>>,
    },
    Acked(Vec<RangeInclusive<u64>>),
    Holding(Option<u64>),
    Refused {
        seq: u64,
        detail: String,
        raw: Vec<u8>,
    },
    Flush(oneshot::Sender<()>),
    Maintain,
    Replay {
        filter: ReplayFilter,
        mapper: Arc<dyn ReplayMapper>,
        reply: oneshot::Sender<Result<ReplayReport, StoreError>>,
    },
}

/// Cloneable access to the owner thread.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Command>,
    committed: watch::Receiver<u64>,
    fatal: watch::Receiver<Option<String>>,
}

impl StoreHandle {
    /// Queues an append; the returned receiver resolves after the commit. Awaiting the send is
    /// the back-pressure when the writer falls behind.
    pub async fn append(
        &self,
        append: Append,
    ) -> Result<oneshot::Receiver<Result<AppendOutcome, StoreError>>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Append(append, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    /// Committed rows with `seq > after`, oldest first.
    pub async fn fetch(&self, after: u64, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Fetch {
                after,
                limit,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Rows JetStream acknowledged, as runs of seqs: every row still buffered in a run had its
    /// own PubAck (seqs in a run without a row are gone for good). Deleted in the next
    /// transaction.
    pub async fn acked(&self, runs: Vec<RangeInclusive<u64>>) -> Result<(), StoreError> {
        self.tx
            .send(Command::Acked(runs))
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// What the forwarder may still publish of the rows it fetched: those with seq `>= from`
    /// (`None`: none). Everything it fetched below `from` has had its outcome reported
    /// (`acked`, `refused`) before this call. Bounds never delete a row it may still publish
    /// (invariant 4); a fetch claims the rows it returns.
    pub async fn holding(&self, from: Option<u64>) -> Result<(), StoreError> {
        self.tx
            .send(Command::Holding(from))
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// A row the server will never accept: moved to dead-letters with the rendered event.
    pub async fn refused(&self, seq: u64, detail: String, raw: Vec<u8>) -> Result<(), StoreError> {
        self.tx
            .send(Command::Refused { seq, detail, raw })
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Resolves after everything queued before it is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Flush(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    /// `dead-letters replay`: maps the kept messages `filter` selects again with `mapper` and
    /// stores their readings, deleting their dead-letters in the same transaction (see
    /// `replay.rs`). With `filter.dry_run`, reports what would happen and changes nothing.
    pub async fn replay(
        &self,
        filter: ReplayFilter,
        mapper: Arc<dyn ReplayMapper>,
    ) -> Result<ReplayReport, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Replay {
                filter,
                mapper,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Highest committed seq; changes whenever new rows commit.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// `Some(cause)` once the file was found corrupt while running: from then on nothing is
    /// stored (invariant 6), so the process should stop in order and restart.
    pub(crate) fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.fatal.clone()
    }
}

/// SQLite's verdict that the file's pages are damaged (as opposed to a full disk, a busy
/// lock or an I/O error, which a retry may get past).
fn is_corrupt(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// How long [`start`] waits for the buffer's lock (`lock.rs`): a `dead-letters replay` run
/// without a gateway holds it for a moment.
pub(crate) const LOCK_WAIT: Duration = Duration::from_secs(60);

/// Opens the buffer and starts its owner thread. The thread ends when every handle is dropped.
pub fn start(
    path: PathBuf,
    buffer: Buffer,
    low_battery: f64,
    metrics: Arc<Metrics>,
) -> Result<(StoreHandle, std::thread::JoinHandle<()>), StoreError> {
    start_locked(path, buffer, low_battery, metrics, LOCK_WAIT)
}

/// As [`start`], waiting at most `lock_wait` for another process to release the buffer.
pub(crate) fn start_locked(
    path: PathBuf,
    buffer: Buffer,
    low_battery: f64,
    metrics: Arc<Metrics>,
    lock_wait: Duration,
) -> Result<(StoreHandle, std::thread::JoinHandle<()>), StoreError> {
    let lock = lock::acquire(&path, lock_wait)?;
    let floor = seq_floor::SeqFloor::load(&path.with_file_name("seq.floor"));
    // Sequence numbers were handed out: this buffer has held rows, so an empty file lost them.
    let has_held_rows = floor.reserved() > 1;
    let opened = db::open(&path, buffer.synchronous, has_held_rows)?;
    if opened.moved_aside.is_some() {
        metrics.store_corruption_recovered.inc();
    }
    let mut totals = db::totals(&opened.conn).map_err(|source| StoreError::Sqlite {
        path: path.clone(),
        source,
    })?;
    let sqlite = |source| StoreError::Sqlite {
        path: path.clone(),
        source,
    };
    let recent = recent::RecentMessages::load(&opened.conn).map_err(sqlite)?;
    counts::init(
        &opened.conn,
        totals.rows - totals.status_rows.min(totals.rows),
    )
    .map_err(sqlite)?;
    let thin_after = counts::thin_after(&opened.conn).map_err(sqlite)?;
    let event_salt = db::event_salt(&opened.conn).map_err(sqlite)?;
    if totals.next_seq == 1 {
        // A new (or replaced) database continues above everything handed out before.
        totals.next_seq = floor.reserved();
    }
    let (tx, rx) = mpsc::channel(4096);
    let (committed_tx, committed) = watch::channel(totals.next_seq.saturating_sub(1));
    let (fatal_tx, fatal) = watch::channel(None);
    let data_dir = path
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut writer = Writer {
        conn: opened.conn,
        path,
        data_dir,
        buffer,
        metrics,
        rows: totals.rows,
        status_rows: totals.status_rows,
        bytes: totals.bytes,
        next_seq: totals.next_seq,
        dead_letters: totals.dead_letters,
        disk_low: false,
        full: false,
        committed: committed_tx,
        fatal: fatal_tx,
        corrupt: None,
        floor,
        failure_log: LogLimit::new(Duration::from_secs(10)),
        low_battery,
        acked: Vec::new(),
        acked_seqs: 0,
        recent,
        event_salt,
        _lock: lock,
        claim: None,
        thin_after,
    };
    writer.publish_gauges();
    writer.check_disk();
    let thread = std::thread::Builder::new()
        .name("store".into())
        .spawn(move || writer.run(rx))
        .map_err(|source| StoreError::DataDir {
            path: PathBuf::from("(store thread)"),
            source,
        })?;
    // A weak sender: the ticker must not keep the writer alive once every handle is gone.
    let ticker = tx.downgrade();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(tx) = ticker.upgrade() else { break };
            if tx.send(Command::Maintain).await.is_err() {
                break;
            }
        }
    });
    let handle = StoreHandle {
        tx,
        committed,
        fatal,
    };
    Ok((handle, thread))
}

struct Writer {
    conn: Connection,
    path: PathBuf,
    data_dir: PathBuf,
    buffer: Buffer,
    metrics: Arc<Metrics>,
    rows: u64,
    /// Of `rows`, the status events (the rest are readings).
    status_rows: u64,
    bytes: u64,
    next_seq: u64,
    dead_letters: u64,
    disk_low: bool,
    /// Last append refused for `reject_new`; cleared by the next one stored.
    full: bool,
    committed: watch::Sender<u64>,
    /// Where a corrupt file is reported to the process (see [`StoreHandle::fatal`]).
    fatal: watch::Sender<Option<String>>,
    /// Set once SQLite found the file corrupt: no transaction runs after (invariant 6).
    corrupt: Option<String>,
    floor: seq_floor::SeqFloor,
    failure_log: LogLimit,
    /// Battery percentage below which a sensor is flagged.
    low_battery: f64,
    /// Acknowledged runs not yet deleted, and how many seqs they span.
    acked: Vec<RangeInclusive<u64>>,
    acked_seqs: u64,
    recent: recent::RecentMessages,
    event_salt: [u8; 16],
    /// Held as long as the writer lives: no other process writes the buffer meanwhile.
    _lock: lock::BufferLock,
    /// Seqs the forwarder fetched and may still publish (`lo..=hi`): no bound deletes them, so
    /// a reading counted as dropped never reaches the stream (invariant 4).
    claim: Option<(u64, u64)>,
    /// Where the next thinning round starts (`meta.thin_after`; 0: at the oldest row).
    thin_after: u64,
}

/// What a transaction changed, applied to the writer's totals only once it committed.
#[derive(Default)]
struct Delta {
    rows_added: u64,
    bytes_added: u64,
    rows_removed: u64,
    bytes_removed: u64,
    next_seq: u64,
    dead_letters_added: u64,
    accepted: u64,
    /// Readings dropped by a bound, indexed like [`DropReason::ALL`].
    dropped: [u64; 3],
    /// Thinning rounds that freed something.
    thin_rounds: u64,
    /// Of them, the ones that began a new sweep over the buffer.
    thin_passes: u64,
    /// Where the next thinning round starts, if a round ran.
    thin_after: Option<u64>,
    dead_letters_removed: u64,
    /// Of `dead_letters_removed`, those the `dead_letter_max` bound pushed out.
    dead_letters_evicted: u64,
    refused_full: u64,
    rejected: Vec<Reason>,
    refused: u64,
    /// Of `refused`, the readings.
    refused_readings: u64,
    forwarded: u64,
    duplicates: u64,
    timestamps_replaced: u64,
    status_changes: u64,
    status_rows_added: u64,
    status_rows_removed: u64,
    /// Fingerprints of the source messages stored, in order.
    messages: Vec<u64>,
}

impl Delta {
    fn added(&mut self, kind: u8, len: usize) {
        self.rows_added += 1;
        self.bytes_added += len as u64 + db::ROW_OVERHEAD;
        if kind == KIND_STATUS {
            self.status_rows_added += 1;
        }
    }

    /// Counts a deleted row out; true if it was a reading.
    fn removed(&mut self, kind: i64, len: i64) -> bool {
        self.rows_removed += 1;
        self.bytes_removed += len as u64 + db::ROW_OVERHEAD;
        let status = kind == i64::from(KIND_STATUS);
        if status {
            self.status_rows_removed += 1;
        }
        !status
    }
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            self.run_batch(batch, false);
        }
        if self.corrupt.is_some() {
            // Left as it is for the next start to move aside and keep for inspection.
            return;
        }
        // Every handle is gone: delete what was acknowledged, and fold the WAL into the main
        // file so the next open is quick.
        self.run_batch(Vec::new(), true);
        let _ = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
    }

    /// Runs a group of commands; `closing` commits whatever is pending.
    fn run_batch(&mut self, batch: Vec<Command>, closing: bool) {
        if self.corrupt.is_some() {
            self.refuse(batch);
            return;
        }
        let mut appends = Vec::new();
        let mut refused = Vec::new();
        let mut flushes = Vec::new();
        let mut replays = Vec::new();
        let mut maintain = false;
        for c in batch {
            match c {
                Command::Append(a, reply) => appends.push((a, reply)),
                Command::Acked(runs) => {
                    self.acked_seqs += runs.iter().map(|r| r.end() - r.start() + 1).sum::<u64>();
                    self.acked.extend(runs);
                }
                Command::Refused { seq, detail, raw } => refused.push((seq, detail, raw)),
                Command::Holding(from) => {
                    self.claim = from.and_then(|from| {
                        self.claim
                            .and_then(|(_, hi)| (from <= hi).then_some((from, hi)))
                    });
                }
                Command::Flush(reply) => flushes.push(reply),
                Command::Maintain => maintain = true,
                Command::Replay {
                    filter,
                    mapper,
                    reply,
                } => replays.push((filter, mapper, reply)),
                // Served in command order, so a claim and a release the forwarder sent after
                // it apply in the order it sent them. Rows acknowledged in this batch are not
                // deleted yet, but the forwarder never fetches below its acknowledged rows
                // without a flush first.
                Command::Fetch {
                    after,
                    limit,
                    reply,
                } => {
                    let rows = db::fetch_after(&self.conn, after, limit, &self.event_salt);
                    if let Err(e) = &rows {
                        if is_corrupt(e) {
                            self.became_corrupt(e);
                            let _ = reply.send(Err(self.corrupt_error()));
                            continue;
                        }
                    }
                    if let Some((first, last)) = rows
                        .as_ref()
                        .ok()
                        .and_then(|r| Some((r.first()?.seq, r.last()?.seq)))
                    {
                        self.claim = Some(match self.claim {
                            Some((lo, hi)) => (lo.min(first), hi.max(last)),
                            None => (first, last),
                        });
                    }
                    let _ = reply.send(rows.map_err(|source| StoreError::Sqlite {
                        path: self.path.clone(),
                        source,
                    }));
                }
            }
        }
        if self.corrupt.is_some() {
            // A fetch of this batch found the damage: what was queued with it is not written.
            for (_, reply) in appends {
                let _ = reply.send(Err(self.corrupt_error()));
            }
            for (_, _, reply) in replays {
                let _ = reply.send(Err(self.corrupt_error()));
            }
            for f in flushes {
                let _ = f.send(());
            }
            return;
        }
        if maintain {
            self.check_disk();
        }
        // Each reading may bring up to two status events (connected, low battery).
        let most_new: usize = appends.iter().map(|(a, _)| a.readings.len() * 3).sum();
        if let Err(e) = self.floor.ensure(self.next_seq + most_new as u64) {
            tracing::error!(error = %e, dir = %self.data_dir.display(), "cannot write seq.floor; not committing");
            self.metrics.set_store_healthy(false);
            for (_, reply) in appends.drain(..) {
                let _ = reply.send(Err(StoreError::Commit(format!("seq.floor: {e}"))));
            }
        }
        let other_writes = !appends.is_empty() || !refused.is_empty() || maintain;
        let delete = !self.acked.is_empty()
            && (other_writes
                || closing
                || !flushes.is_empty()
                || self.acked_seqs >= ACKED_COMMIT_AT);
        if other_writes || delete {
            let started = Instant::now();
            let mut delta = Delta {
                next_seq: self.next_seq,
                ..Delta::default()
            };
            let acked: &[RangeInclusive<u64>] = if delete { &self.acked } else { &[] };
            let result = self.write(&mut appends, acked, &refused, maintain, &mut delta);
            match result {
                Ok(outcomes) => {
                    if delete {
                        self.acked.clear();
                        self.acked_seqs = 0;
                    }
                    self.apply(&delta);
                    self.metrics.store_commits.inc();
                    self.metrics
                        .store_commit_seconds
                        .observe(started.elapsed().as_secs_f64());
                    self.metrics.set_store_healthy(true);
                    for ((_, reply), outcome) in appends.into_iter().zip(outcomes) {
                        let _ = reply.send(Ok(outcome));
                    }
                }
                Err(e) => {
                    self.metrics.set_store_healthy(false);
                    if let Some(held) = self.failure_log.admit() {
                        tracing::error!(error = %e, file = %self.path.display(), repeats = held, "buffer transaction failed; callers will retry");
                    }
                    if is_corrupt(&e) {
                        self.became_corrupt(&e);
                    }
                    let msg = e.to_string();
                    for (_, reply) in appends {
                        let error = match self.corrupt {
                            Some(_) => self.corrupt_error(),
                            None => StoreError::Commit(msg.clone()),
                        };
                        let _ = reply.send(Err(error));
                    }
                }
            }
        }
        // In a transaction of their own, after the group: a replay maps many messages and must
        // not hold up the commits of live intake queued with it.
        for (filter, mapper, reply) in replays {
            if self.corrupt.is_some() {
                let _ = reply.send(Err(self.corrupt_error()));
                continue;
            }
            let result = self.replay(&filter, &*mapper);
            if let Err(StoreError::Sqlite { source, .. }) = &result {
                if is_corrupt(source) {
                    self.became_corrupt(source);
                }
            }
            let _ = reply.send(result);
        }
        for f in flushes {
            let _ = f.send(());
        }
    }

    /// Stops all writing and tells the process, once. Nothing uncommitted was acknowledged,
    /// so the ordered stop that follows loses nothing; the next start moves the file aside.
    fn became_corrupt(&mut self, e: &rusqlite::Error) {
        if self.corrupt.is_some() {
            return;
        }
        self.metrics.set_store_healthy(false);
        let cause = e.to_string();
        self.corrupt = Some(cause.clone());
        self.fatal.send_replace(Some(cause));
    }

    fn corrupt_error(&self) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            detail: self.corrupt.clone().unwrap_or_default(),
        }
    }

    /// After corruption: no transaction runs; callers that wait get an error, never a success,
    /// and a flush returns at once so the ordered stop does not hang.
    fn refuse(&self, batch: Vec<Command>) {
        for c in batch {
            match c {
                Command::Append(_, reply) => {
                    let _ = reply.send(Err(self.corrupt_error()));
                }
                Command::Fetch { reply, .. } => {
                    let _ = reply.send(Err(self.corrupt_error()));
                }
                Command::Replay { reply, .. } => {
                    let _ = reply.send(Err(self.corrupt_error()));
                }
                Command::Flush(reply) => {
                    let _ = reply.send(());
                }
                Command::Acked(_)
                | Command::Holding(_)
                | Command::Refused { .. }
                | Command::Maintain => {}
            }
        }
    }

    /// One transaction for the whole group; returns each append's outcome, in order.
    fn write(
        &self,
        appends: &mut [(Append, oneshot::Sender<Result<AppendOutcome, StoreError>>)],
        acked: &[RangeInclusive<u64>],
        refused: &[(u64, String, Vec<u8>)],
        maintain: bool,
        delta: &mut Delta,
    ) -> rusqlite::Result<Vec<AppendOutcome>> {
        let tx = self.conn.unchecked_transaction()?;
        let now = db::now_ms();
        for run in acked {
            delete_run(&tx, run, delta)?;
        }
        for (seq, detail, raw) in refused {
            if let Some(is_reading) = delete_row(&tx, *seq, delta)? {
                delta.refused += 1;
                delta.refused_readings += u64::from(is_reading);
                let refusal = DeadLetterText {
                    source: "forwarder",
                    reason: Reason::PublishRefused,
                    detail,
                    topic: None,
                    device: None,
                    sensor_type: None,
                };
                insert_dead_letter(&tx, now, &refusal, raw)?;
                delta.dead_letters_added += 1;
            }
        }
        let mut outcomes = Vec::with_capacity(appends.len());
        for (append, _) in appends.iter_mut() {
            outcomes.push(self.append_one(&tx, append, now, delta)?);
        }
        let stored: Vec<&Reading> = appends
            .iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| matches!(outcome, AppendOutcome::Stored { .. }))
            .flat_map(|((append, _), _)| &append.readings)
            .collect();
        self.status_and_seq(&tx, &stored, now, maintain, delta)?;
        if maintain {
            self.expire(&tx, now, delta)?;
        }
        record_totals(&tx, delta)?;
        tx.commit()?;
        Ok(outcomes)
    }

    /// The end of every transaction that stores readings: status events from the readings
    /// stored (with `maintain`, also from sensors gone silent), and `next_seq` past every row
    /// numbered.
    fn status_and_seq(
        &self,
        tx: &rusqlite::Transaction<'_>,
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
            insert_row(
                tx,
                KIND_STATUS,
                &postcard::to_stdvec(change).unwrap_or_default(),
                now,
                delta,
            )?;
        }
        delta.status_changes += changes.len() as u64;
        if delta.next_seq != self.next_seq {
            tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'next_seq'")?
                .execute([delta.next_seq as i64])?;
        }
        Ok(())
    }

    fn append_one(
        &self,
        tx: &rusqlite::Transaction<'_>,
        append: &mut Append,
        now: i64,
        delta: &mut Delta,
    ) -> rusqlite::Result<AppendOutcome> {
        if let Some(frame) = &append.frame_key {
            let seen = tx
                .prepare_cached("SELECT 1 FROM recent_frames WHERE key = ?1")?
                .exists([&frame.frame[..]])?;
            if seen {
                return Ok(AppendOutcome::Duplicate);
            }
        }
        if let (Some(key), true) = (append.message_key, append.maybe_duplicate) {
            let fingerprint = recent::fingerprint(&key);
            if self.recent.contains(fingerprint) || delta.messages.contains(&fingerprint) {
                return Ok(AppendOutcome::Duplicate);
            }
        }
        // The same device observation delivered twice (e.g. a LoRaWAN uplink through two
        // gateways) is stored once: remembering its key is the check (nothing inserted: seen
        // before). Keys of an append that is then refused are forgotten again (invariant 7).
        let before = append.readings.len();
        let mut remember =
            tx.prepare_cached("INSERT OR IGNORE INTO recent_readings (key) VALUES (?1)")?;
        let mut first_remembered = None;
        let mut keep = Vec::with_capacity(before);
        for r in append.readings.drain(..) {
            if r.device_time {
                if remember.execute([&observation_key(&r)[..]])? == 0 {
                    continue;
                }
                first_remembered.get_or_insert_with(|| tx.last_insert_rowid());
            }
            keep.push(r);
        }
        append.readings = keep;
        let refuse = |delta: &mut Delta, full: bool| -> rusqlite::Result<AppendOutcome> {
            if let Some(id) = first_remembered {
                tx.prepare_cached("DELETE FROM recent_readings WHERE id >= ?1")?
                    .execute([id])?;
            }
            delta.refused_full += u64::from(full);
            Ok(AppendOutcome::Full)
        };
        let duplicates = (before - append.readings.len()) as u64;
        let bodies: Vec<(u8, Vec<u8>)> = append.readings.iter().map(Reading::to_row).collect();
        let incoming: u64 = bodies
            .iter()
            .map(|(_, b)| b.len() as u64 + db::ROW_OVERHEAD)
            .sum();
        if !bodies.is_empty() {
            if self.disk_low {
                return refuse(delta, false);
            }
            let in_use = self.bytes + delta.bytes_added - delta.bytes_removed;
            let limit = self.buffer.max_bytes.0;
            if in_use + incoming > limit {
                match self.buffer.when_full {
                    WhenFull::RejectNew => return refuse(delta, true),
                    WhenFull::DropOldest => {
                        self.drop_oldest(tx, in_use + incoming - limit, delta)?;
                    }
                    WhenFull::Thin => self.thin(tx, in_use + incoming - limit, delta)?,
                }
            }
        }
        delta.duplicates += duplicates;
        let first_seq = delta.next_seq;
        for (kind, body) in &bodies {
            insert_row(tx, *kind, body, now, delta)?;
        }
        delta.accepted += bodies.len() as u64;
        delta.timestamps_replaced += append
            .readings
            .iter()
            .filter(|r| r.original_timestamp.is_some())
            .count() as u64;
        for d in &append.dead_letters {
            insert_dead_letter(tx, now, &DeadLetterText::of(d), &d.raw)?;
            delta.dead_letters_added += 1;
            delta.rejected.push(d.reason);
        }
        if let Some(key) = append.message_key {
            tx.prepare_cached("INSERT INTO recent_messages (key) VALUES (?1)")?
                .execute([&key[..]])?;
            delta.messages.push(recent::fingerprint(&key));
        }
        if let Some(frame) = &append.frame_key {
            remember_frame(tx, frame)?;
        }
        Ok(AppendOutcome::Stored {
            first_seq,
            count: bodies.len() as u64,
        })
    }

    /// The one way a bound deletes rows: each of `seqs` still buffered and not claimed by the
    /// forwarder, counted as dropped for `reason` if a reading. Returns the bytes freed.
    fn drop_rows(
        &self,
        tx: &rusqlite::Transaction<'_>,
        seqs: &[u64],
        reason: DropReason,
        delta: &mut Delta,
    ) -> rusqlite::Result<u64> {
        let before = delta.bytes_removed;
        for &seq in seqs.iter().filter(|&&seq| !self.claimed(seq)) {
            if delete_row(tx, seq, delta)? == Some(true) {
                delta.dropped[reason as usize] += 1;
            }
        }
        Ok(delta.bytes_removed - before)
    }

    fn claimed(&self, seq: u64) -> bool {
        self.claim.is_some_and(|(lo, hi)| (lo..=hi).contains(&seq))
    }

    /// Up to `limit` buffered rows with seq above `after`, oldest first, the forwarder's claim
    /// left out (it is skipped by range, not row by row).
    fn unclaimed_after(
        &self,
        tx: &rusqlite::Transaction<'_>,
        after: u64,
        limit: usize,
        with_body: bool,
    ) -> rusqlite::Result<Vec<ScannedRow>> {
        let sql = if with_body {
            "SELECT seq, kind, stored_ms, length(body), body FROM outbox WHERE seq > ?1 AND seq < ?2 ORDER BY seq LIMIT ?3"
        } else {
            "SELECT seq, kind, stored_ms, length(body), x'' FROM outbox WHERE seq > ?1 AND seq < ?2 ORDER BY seq LIMIT ?3"
        };
        let mut stmt = tx.prepare_cached(sql)?;
        let mut scan =
            |after: u64, below: u64, limit: usize| -> rusqlite::Result<Vec<ScannedRow>> {
                stmt.query_map(
                    params![
                        i64::try_from(after).unwrap_or(i64::MAX),
                        i64::try_from(below).unwrap_or(i64::MAX),
                        limit as i64
                    ],
                    |r| {
                        Ok(ScannedRow {
                            seq: r.get::<_, i64>(0)? as u64,
                            kind: r.get(1)?,
                            stored_ms: r.get(2)?,
                            len: r.get(3)?,
                            body: r.get(4)?,
                        })
                    },
                )?
                .collect()
            };
        match self.claim {
            Some((lo, hi)) if after < hi => {
                let mut rows = if after + 1 < lo {
                    scan(after, lo, limit)?
                } else {
                    Vec::new()
                };
                if rows.len() < limit {
                    rows.extend(scan(hi, u64::MAX, limit - rows.len())?);
                }
                Ok(rows)
            }
            _ => scan(after, u64::MAX, limit),
        }
    }

    /// Drops the oldest rows (the forwarder's claim aside) until at least `need` bytes are
    /// free, counted as `buffer_full`.
    fn drop_oldest(
        &self,
        tx: &rusqlite::Transaction<'_>,
        need: u64,
        delta: &mut Delta,
    ) -> rusqlite::Result<()> {
        let mut freed = 0u64;
        let mut after = 0;
        while freed < need {
            let rows = self.unclaimed_after(tx, after, 256, false)?;
            let Some(last) = rows.last() else { break };
            after = last.seq;
            let mut planned = freed;
            let seqs: Vec<u64> = rows
                .iter()
                .take_while(|r| {
                    let take = planned < need;
                    planned += r.len as u64 + db::ROW_OVERHEAD;
                    take
                })
                .map(|r| r.seq)
                .collect();
            freed += self.drop_rows(tx, &seqs, DropReason::BufferFull, delta)?;
        }
        Ok(())
    }

    /// `when_full = "thin"`: thinning rounds until `need` bytes are free; what they cannot
    /// free (every reading recent, or series of one reading) goes by [`Self::drop_oldest`].
    ///
    /// Rounds sweep the buffer from the oldest row to the newest, each taking up where the last
    /// one stopped (`meta.thin_after`), and a new sweep begins at the oldest once one reached
    /// the end. So the whole buffer is thinned once before any part of it twice: a long outage
    /// keeps its whole span at one coarser step, and every sweep (counted in
    /// `buffer_thin_passes_total`) at most doubles any gap in a series.
    fn thin(
        &self,
        tx: &rusqlite::Transaction<'_>,
        need: u64,
        delta: &mut Delta,
    ) -> rusqlite::Result<()> {
        let mut freed = 0;
        for _ in 0..THIN_ROUNDS_MAX {
            if freed >= need {
                return Ok(());
            }
            let after = delta.thin_after.unwrap_or(self.thin_after);
            let (round, next) = self.thin_round(tx, after, delta)?;
            delta.thin_after = Some(next);
            if round > 0 {
                delta.thin_rounds += 1;
                delta.thin_passes += u64::from(after == 0);
                freed += round;
            } else if after == 0 {
                // A whole new sweep found nothing to thin.
                break;
            }
        }
        if freed < need {
            self.drop_oldest(tx, need - freed, delta)?;
        }
        Ok(())
    }

    /// One thinning round over the rows after seq `after`: half the buffer's rows at most (and
    /// [`THIN_ROUND_ROWS`]). In each series (device, sensor type) every other reading goes,
    /// starting with the series' second in this round; readings observed within
    /// [`THIN_SPARE_NS`] of the newest observation, status rows and the forwarder's claim stay.
    /// A reading goes only if the one before it in its series stays (the first of a series in
    /// a round always does), and so does the one after it (the next in the alternation, or the
    /// first of the next round), so no gap in a series more than doubles in a sweep, and each
    /// series keeps its oldest reading. Returns the bytes freed and where the next round starts
    /// (0: this one reached the end of the buffer, the next sweep starts over).
    fn thin_round(
        &self,
        tx: &rusqlite::Transaction<'_>,
        after: u64,
        delta: &mut Delta,
    ) -> rusqlite::Result<(u64, u64)> {
        let rows_now = (self.rows + delta.rows_added).saturating_sub(delta.rows_removed);
        let budget = (rows_now / 2).clamp(2, THIN_ROUND_ROWS) as usize;
        let spare_from =
            newest_observation(tx)?.map_or(i64::MIN, |t| t.0.saturating_sub(THIN_SPARE_NS));
        // Per series: whether its last reading seen this round goes.
        let mut last_goes: std::collections::HashMap<(String, u8), bool> = Default::default();
        let mut doomed = Vec::new();
        let (mut next, mut seen) = (after, 0);
        while seen < budget {
            let want = (budget - seen).min(1024);
            let rows = self.unclaimed_after(tx, next, want, true)?;
            next = rows.last().map_or(0, |r| r.seq);
            seen += rows.len();
            for row in rows.iter().filter(|r| r.kind == i64::from(KIND_READING)) {
                // A body this version cannot decode is left alone (the forwarder dead-letters it).
                let Ok(r) = postcard::from_bytes::<Reading>(&row.body) else {
                    continue;
                };
                // The first reading of a series counts as following a dropped one: it stays.
                let prev_goes = last_goes
                    .entry((r.device_id, r.sensor_type as u8))
                    .or_insert(true);
                let goes = !*prev_goes && r.observed_at.0 < spare_from;
                *prev_goes = goes;
                if goes {
                    doomed.push(row.seq);
                }
            }
            if rows.len() < want {
                next = 0;
                break;
            }
        }
        Ok((self.drop_rows(tx, &doomed, DropReason::Thin, delta)?, next))
    }

    /// Age bound, and the bounds of the side tables.
    fn expire(
        &self,
        tx: &rusqlite::Transaction<'_>,
        now: i64,
        delta: &mut Delta,
    ) -> rusqlite::Result<()> {
        let cutoff = now - i64::try_from(self.buffer.max_age.0.as_millis()).unwrap_or(i64::MAX);
        // Rows are stored in time order, so while the oldest is within the bound there is
        // nothing to scan. (A row stored after the clock went back waits for the rows before it.)
        let oldest = db::oldest_stored_ms(tx)?;
        if oldest.is_some_and(|t| t < cutoff) {
            let expired: Vec<u64> = self
                .unclaimed_after(tx, 0, 10_000, false)?
                .iter()
                .filter(|r| r.stored_ms < cutoff)
                .map(|r| r.seq)
                .collect();
            self.drop_rows(tx, &expired, DropReason::MaxAge, delta)?;
        }
        for (table, keep) in [
            ("recent_messages", recent::RECENT_MESSAGES as i64),
            ("recent_readings", RECENT_READINGS),
            ("recent_frames", RECENT_FRAMES_MAX),
        ] {
            tx.prepare_cached(&format!(
                "DELETE FROM {table} WHERE id <= (SELECT max(id) FROM {table}) - ?1"
            ))?
            .execute([keep])?;
        }
        let cut = tx
            .prepare_cached(
                "DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - ?1",
            )?
            .execute([i64::from(self.buffer.dead_letter_max)])?;
        delta.dead_letters_removed += cut as u64;
        delta.dead_letters_evicted += cut as u64;
        Ok(())
    }

    fn apply(&mut self, d: &Delta) {
        self.rows = (self.rows + d.rows_added).saturating_sub(d.rows_removed);
        self.status_rows =
            (self.status_rows + d.status_rows_added).saturating_sub(d.status_rows_removed);
        self.bytes = (self.bytes + d.bytes_added).saturating_sub(d.bytes_removed);
        self.dead_letters =
            (self.dead_letters + d.dead_letters_added).saturating_sub(d.dead_letters_removed);
        if d.refused_full > 0 {
            self.full = true;
        } else if d.accepted > 0 {
            self.full = false;
        }
        let m = &self.metrics;
        m.readings_accepted.inc_by(d.accepted);
        m.readings_duplicates.inc_by(d.duplicates);
        m.timestamps_replaced.inc_by(d.timestamps_replaced);
        m.status_events.inc_by(d.status_changes);
        m.readings_forwarded.inc_by(d.forwarded);
        for reason in DropReason::ALL {
            let count = d.dropped[reason as usize];
            if count == 0 {
                continue;
            }
            m.dropped(reason.label()).inc_by(count);
            match reason {
                DropReason::BufferFull => tracing::warn!(
                    count,
                    "buffer full: dropped the oldest readings (when_full = {})",
                    if self.buffer.when_full == WhenFull::Thin {
                        "thin, nothing left to thin"
                    } else {
                        "drop_oldest"
                    }
                ),
                DropReason::Thin => tracing::warn!(
                    count,
                    rounds = d.thin_rounds,
                    "buffer full: thinned the oldest readings of each sensor (when_full = thin)"
                ),
                DropReason::MaxAge => {
                    tracing::warn!(count, "dropped buffered readings older than max_age")
                }
            }
        }
        m.buffer_thin_passes.inc_by(d.thin_passes);
        if let Some(after) = d.thin_after {
            self.thin_after = after;
        }
        if d.refused > 0 {
            m.rejected(Reason::PublishRefused.label()).inc_by(d.refused);
        }
        if d.dead_letters_evicted > 0 {
            m.dead_letters_evicted.inc_by(d.dead_letters_evicted);
            tracing::warn!(
                count = d.dead_letters_evicted,
                max = self.buffer.dead_letter_max,
                "dead-letter table full: the oldest dead-letters were removed ([buffer] dead_letter_max)"
            );
        }
        for r in &d.rejected {
            m.rejected(r.label()).inc();
        }
        self.recent.extend(&d.messages);
        if d.next_seq != self.next_seq {
            self.next_seq = d.next_seq;
            self.committed.send_replace(self.next_seq - 1);
        }
        self.publish_gauges();
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        m.buffer_readings
            .set(self.rows.saturating_sub(self.status_rows) as i64);
        m.buffer_bytes.set(self.bytes as i64);
        m.dead_letters.set(self.dead_letters as i64);
        m.intake_paused.set(i64::from(self.disk_low || self.full));
        let oldest = db::oldest_stored_ms(&self.conn).ok().flatten();
        let age = oldest.map_or(0, |t| ((db::now_ms() - t) / 1000).max(0));
        m.buffer_oldest_age_seconds.set(age);
    }

    /// Free space on the data directory's filesystem against `min_free_disk`.
    fn check_disk(&mut self) {
        let low = match free_disk(&self.data_dir) {
            Ok(free) => free < self.buffer.min_free_disk.0,
            Err(e) => {
                tracing::warn!(error = %e, dir = %self.data_dir.display(), "cannot read free disk space");
                false
            }
        };
        if low != self.disk_low {
            if low {
                tracing::error!(dir = %self.data_dir.display(), reserve = self.buffer.min_free_disk.0, "free disk below min_free_disk: intake paused, forwarding continues");
            } else {
                tracing::info!("free disk above min_free_disk again: intake resumed");
            }
        }
        self.disk_low = low;
        self.metrics.intake_paused.set(i64::from(low || self.full));
    }
}

/// A row as the bounds scan it (`body` only when asked for).
struct ScannedRow {
    seq: u64,
    kind: i64,
    stored_ms: i64,
    len: i64,
    body: Vec<u8>,
}

/// The newest observation among the newest readings buffered: the reference for what counts
/// as recent when thinning. Not the clock: a gateway may boot without time sync, and a backlog
/// uploaded late carries device times far behind it. Store order follows observation time
/// closely enough that the newest rows hold the newest observation.
/// Bytes free to unprivileged users on the filesystem of `dir`, as `min_free_disk` counts them.
pub(crate) fn free_disk(dir: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(dir)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

fn newest_observation(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<Option<Timestamp>> {
    let mut stmt =
        tx.prepare_cached("SELECT body FROM outbox WHERE kind = ?1 ORDER BY seq DESC LIMIT 64")?;
    let bodies = stmt.query_map([KIND_READING], |r| r.get::<_, Vec<u8>>(0))?;
    let mut newest = None;
    for body in bodies {
        if let Ok(r) = postcard::from_bytes::<Reading>(&body?) {
            newest = newest.max(Some(r.observed_at));
        }
    }
    Ok(newest)
}

/// The end of every transaction that changes the outbox: the lifetime totals and the thinning
/// position move with the rows they describe, so they survive `kill -9` exactly.
fn record_totals(tx: &rusqlite::Transaction<'_>, delta: &Delta) -> rusqlite::Result<()> {
    if let Some(after) = delta.thin_after {
        counts::set_thin_after(tx, after)?;
    }
    counts::add(
        tx,
        &Counts {
            accepted: delta.accepted,
            forwarded: delta.forwarded,
            dropped: delta.dropped,
            refused: delta.refused_readings,
        },
    )
}

/// Buffers one row with the next seq; its event id derives from the seq.
fn insert_row(
    tx: &rusqlite::Transaction<'_>,
    kind: u8,
    body: &[u8],
    now: i64,
    delta: &mut Delta,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO outbox (seq, event_id, stored_ms, kind, body) VALUES (?1, x'', ?2, ?3, ?4)",
    )?
    .execute(params![delta.next_seq as i64, now, kind, body])?;
    delta.next_seq += 1;
    delta.added(kind, body.len());
    Ok(())
}

/// Adds a stored frame to its node's window and lets the node's oldest beyond
/// [`FRAME_WINDOW`] go.
fn remember_frame(tx: &rusqlite::Transaction<'_>, frame: &FrameKey) -> rusqlite::Result<()> {
    tx.prepare_cached("INSERT OR IGNORE INTO recent_frames (node, key) VALUES (?1, ?2)")?
        .execute(params![frame.node, &frame.frame[..]])?;
    tx.prepare_cached(
        "DELETE FROM recent_frames WHERE node = ?1 AND id <= (SELECT id FROM recent_frames WHERE node = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
    )?
    .execute(params![frame.node, FRAME_WINDOW])?;
    Ok(())
}

/// Identity of a device observation: the device's own time (big-endian with the sign bit
/// flipped, so keys sort by time and new ones land at the end of the index), then a hash of
/// device and sensor type.
fn observation_key(r: &Reading) -> [u8; 16] {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(r.device_id.as_bytes());
    h.update(&[0, r.sensor_type as u8]);
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&((r.observed_at.0 as u64) ^ (1 << 63)).to_be_bytes());
    key[8..].copy_from_slice(&h.digest().to_le_bytes());
    key
}

/// Deletes the buffered rows of an acknowledged run of seqs, counting them out of the totals
/// and the readings among them as forwarded.
fn delete_run(
    tx: &rusqlite::Transaction<'_>,
    run: &RangeInclusive<u64>,
    delta: &mut Delta,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "DELETE FROM outbox WHERE seq BETWEEN ?1 AND ?2 RETURNING kind, length(body)",
    )?;
    let mut rows = stmt.query([*run.start() as i64, *run.end() as i64])?;
    while let Some(row) = rows.next()? {
        if delta.removed(row.get(0)?, row.get(1)?) {
            delta.forwarded += 1;
        }
    }
    Ok(())
}

/// Deletes one buffered row, counting it out of the totals: `Some(is_reading)`, or `None` if
/// it was already gone (dropped by a bound meanwhile).
fn delete_row(
    tx: &rusqlite::Transaction<'_>,
    seq: u64,
    delta: &mut Delta,
) -> rusqlite::Result<Option<bool>> {
    let row: Option<(i64, i64)> = tx
        .prepare_cached("DELETE FROM outbox WHERE seq = ?1 RETURNING kind, length(body)")?
        .query_row([seq as i64], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(row.map(|(kind, len)| delta.removed(kind, len)))
}

/// A dead-letter's columns besides its time and raw bytes.
struct DeadLetterText<'a> {
    source: &'a str,
    reason: Reason,
    detail: &'a str,
    topic: Option<&'a str>,
    device: Option<&'a str>,
    sensor_type: Option<&'static str>,
}

impl<'a> DeadLetterText<'a> {
    fn of(d: &'a NewDeadLetter) -> Self {
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

fn insert_dead_letter(
    tx: &rusqlite::Transaction<'_>,
    now: i64,
    d: &DeadLetterText<'_>,
    raw: &[u8],
) -> rusqlite::Result<()> {
    let raw = &raw[..raw.len().min(db::DEAD_LETTER_RAW_MAX)];
    tx.prepare_cached(
        "INSERT INTO dead_letters (at_ms, source, reason, detail, raw, topic, device, sensor_type) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![now, d.source, d.reason.label(), d.detail, raw, d.topic, d.device, d.sensor_type])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Buffer;
    use crate::reading::{SensorType, Timestamp, KIND_READING};

    fn reading(i: i64) -> Reading {
        Reading {
            device_id: "probe-1".into(),
            field_id: "field-1".into(),
            tenant_id: "tenant-a".into(),
            sensor_type: SensorType::WaterLevel,
            value: i as f64,
            unit: "cm".into(),
            observed_at: Timestamp(1_780_287_300_000_000_000 + i * 1_000_000_000),
            battery: None,
            rssi: None,
            raw_value: None,
            original_timestamp: None,
            device_time: true,
            stale_after_ms: 3_600_000,
            metadata: None,
        }
    }

    fn message(i: i64, resent: bool) -> Append {
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&i.to_le_bytes());
        Append {
            readings: vec![reading(i)],
            dead_letters: Vec::new(),
            message_key: Some(key),
            maybe_duplicate: resent,
            frame_key: None,
        }
    }

    async fn append(store: &StoreHandle, a: Append) -> AppendOutcome {
        store.append(a).await.unwrap().await.unwrap().unwrap()
    }

    async fn close(store: StoreHandle, thread: std::thread::JoinHandle<()>) {
        drop(store);
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }

    #[test]
    fn observation_keys_sort_by_time() {
        let mut early = reading(0);
        early.observed_at = Timestamp(-5);
        let keys = [early, reading(0), reading(1), reading(1_000_000)].map(|r| observation_key(&r));
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
    }

    #[tokio::test]
    async fn resent_messages_are_recognised_also_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let metrics = Arc::new(Metrics::new());
        let (store, thread) =
            start(path.clone(), Buffer::default(), 20.0, metrics.clone()).unwrap();
        assert!(matches!(
            append(&store, message(1, false)).await,
            AppendOutcome::Stored { .. }
        ));
        assert_eq!(
            append(&store, message(1, true)).await,
            AppendOutcome::Duplicate
        );
        // Not flagged as resent: not looked up (its reading is then dropped as a repeat of
        // the same observation, but the message itself is stored).
        assert!(matches!(
            append(&store, message(1, false)).await,
            AppendOutcome::Stored { count: 0, .. }
        ));
        close(store, thread).await;

        let (store, thread) = start(path, Buffer::default(), 20.0, metrics).unwrap();
        assert_eq!(
            append(&store, message(1, true)).await,
            AppendOutcome::Duplicate
        );
        assert!(matches!(
            append(&store, message(2, true)).await,
            AppendOutcome::Stored { count: 1, .. }
        ));
        close(store, thread).await;
    }

    #[tokio::test]
    async fn a_file_found_corrupt_while_running_is_reported_and_never_written_again() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let metrics = Arc::new(Metrics::new());
        let (store, thread) =
            start(path.clone(), Buffer::default(), 20.0, metrics.clone()).unwrap();
        for i in 0..300 {
            append(&store, message(i, false)).await;
        }
        let mut fatal = store.fatal();
        assert!(fatal.borrow().is_none());
        // A commit and checkpoint by another connection make the writer's page cache stale, so
        // its next transaction reads the pages from the file, as after a crash of the disk.
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('poke', 1);
                 PRAGMA wal_checkpoint(TRUNCATE);",
            )
            .unwrap();
        // Every page after the first (header and schema) overwritten with garbage.
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len > 3 * 4096, "the file spans several pages: {len}");
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.seek(SeekFrom::Start(4096)).unwrap();
        file.write_all(&vec![0xA5; len as usize - 4096]).unwrap();
        file.sync_all().unwrap();

        let first = store
            .append(message(1000, false))
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            matches!(first, Err(StoreError::Corrupt { .. })),
            "{first:?}"
        );
        let cause = tokio::time::timeout(Duration::from_secs(5), fatal.wait_for(Option::is_some))
            .await
            .expect("corruption reported on the fatal channel")
            .unwrap()
            .clone()
            .unwrap();
        assert!(cause.contains("malformed"), "{cause}");
        // Later callers get an error, never an acknowledgement; a flush does not hang.
        let later = store
            .append(message(1001, false))
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            matches!(later, Err(StoreError::Corrupt { .. })),
            "{later:?}"
        );
        assert!(matches!(
            store.fetch(0, 10).await,
            Err(StoreError::Corrupt { .. })
        ));
        store.flush().await.unwrap();
        close(store, thread).await;

        // Left unwritten for the next start, which moves it aside.
        let (store, thread) = start(path, Buffer::default(), 20.0, metrics.clone()).unwrap();
        assert_eq!(metrics.store_corruption_recovered.get(), 1);
        assert!(store.fetch(0, 10).await.unwrap().is_empty());
        close(store, thread).await;
    }

    #[tokio::test]
    async fn a_refused_reading_is_not_remembered_as_seen() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = Buffer {
            max_bytes: crate::config::ByteSize(250),
            when_full: WhenFull::RejectNew,
            min_free_disk: crate::config::ByteSize(0),
            ..Buffer::default()
        };
        let metrics = Arc::new(Metrics::new());
        let (store, thread) = start(dir.path().join("buffer.db"), buffer, 20.0, metrics).unwrap();
        assert!(matches!(
            append(&store, message(1, false)).await,
            AppendOutcome::Stored { count: 1, .. }
        ));
        assert_eq!(append(&store, message(2, false)).await, AppendOutcome::Full);
        let all = store.fetch(0, 100).await.unwrap();
        let last = all.last().unwrap().seq;
        store.acked(vec![1..=last]).await.unwrap();
        store.flush().await.unwrap();
        // Offered again once there is room: stored, not taken for a repeat of itself.
        assert!(matches!(
            append(&store, message(2, false)).await,
            AppendOutcome::Stored { count: 1, .. }
        ));
        assert!(matches!(
            append(&store, message(2, false)).await,
            AppendOutcome::Stored { count: 0, .. }
        ));
        // Twice in one message: once.
        let mut twice = message(3, false);
        twice.readings.push(reading(3));
        store.acked(vec![1..=1000]).await.unwrap();
        store.flush().await.unwrap();
        assert!(matches!(
            append(&store, twice).await,
            AppendOutcome::Stored { count: 1, .. }
        ));
        close(store, thread).await;
    }

    #[tokio::test]
    async fn acknowledged_runs_delete_exactly_their_rows() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (store, thread) = start(
            dir.path().join("buffer.db"),
            Buffer::default(),
            20.0,
            metrics.clone(),
        )
        .unwrap();
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
    const MINUTE_NS: i64 = 60 * 1_000_000_000;

    /// Device `device`'s reading `i`, observed `i * step_min` minutes after a fixed start.
    fn series_reading(device: &str, sensor_type: SensorType, i: i64, step_min: i64) -> Reading {
        Reading {
            device_id: device.into(),
            sensor_type,
            value: i as f64,
            observed_at: Timestamp(1_780_287_300_000_000_000 + i * step_min * MINUTE_NS),
            ..reading(0)
        }
    }

    fn one(r: Reading) -> Append {
        Append {
            readings: vec![r],
            ..Append::default()
        }
    }

    fn bounded(max_bytes: u64, when_full: WhenFull) -> Buffer {
        Buffer {
            max_bytes: crate::config::ByteSize(max_bytes),
            when_full,
            min_free_disk: crate::config::ByteSize(0),
            ..Buffer::default()
        }
    }

    /// Buffered readings of `device`, by value, in seq order.
    async fn buffered(store: &StoreHandle, device: &str) -> Vec<i64> {
        let mut seqs = Vec::new();
        let rows = store.fetch(0, 1_000_000).await.unwrap();
        // Not a forwarder: nothing of what it read is held.
        store.holding(None).await.unwrap();
        assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
        for row in rows.iter().filter(|r| r.kind == KIND_READING) {
            let r: Reading = postcard::from_bytes(&row.body).unwrap();
            if r.device_id == device {
                seqs.push(r.value as i64);
            }
        }
        seqs
    }

    /// The stored totals, checked against the identity of [`counts`].
    fn totals_hold(path: &std::path::Path) -> Counts {
        let conn = db::open_read_only(path).unwrap();
        let s = stats(&conn).unwrap();
        let c = s.counts;
        assert_eq!(
            c.accepted,
            c.forwarded + c.dropped_total() + c.refused + s.readings,
            "{c:?}, {} buffered",
            s.readings
        );
        c
    }

    /// The bytes a buffer holds after `readings` were appended (the bound for the next step).
    async fn bytes_of(path: &std::path::Path, readings: &[Reading]) -> u64 {
        let (store, thread) = start(
            path.to_path_buf(),
            Buffer::default(),
            20.0,
            Arc::new(Metrics::new()),
        )
        .unwrap();
        for r in readings {
            append(&store, one(r.clone())).await;
        }
        close(store, thread).await;
        let conn = db::open_read_only(path).unwrap();
        stats(&conn).unwrap().bytes
    }

    #[tokio::test]
    async fn a_fetched_row_is_not_dropped_while_its_publish_may_be_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let metrics = Arc::new(Metrics::new());
        let (store, thread) = start(
            path.clone(),
            bounded(2_000, WhenFull::DropOldest),
            20.0,
            metrics.clone(),
        )
        .unwrap();
        for i in 0..5 {
            append(&store, message(i, false)).await;
        }
        // The forwarder reads them and hands them to the client: their PubAcks may come.
        let published = store.fetch(0, 100).await.unwrap();
        for i in 5..60 {
            append(&store, message(i, false)).await;
        }
        assert!(
            metrics.dropped("buffer_full").get() > 0,
            "the bound was hit"
        );
        let left: Vec<u64> = store
            .fetch(0, 1000)
            .await
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        for row in &published {
            assert!(
                left.contains(&row.seq),
                "row {} in flight was dropped",
                row.seq
            );
        }
        // Their PubAcks: counted forwarded, never also dropped.
        let (first, last) = (published[0].seq, published[published.len() - 1].seq);
        store.acked(vec![first..=last]).await.unwrap();
        store.holding(None).await.unwrap();
        store.flush().await.unwrap();
        let readings = published.iter().filter(|r| r.kind == KIND_READING).count();
        assert_eq!(metrics.readings_forwarded.get(), readings as u64);
        // Released: the bound takes the oldest again, and the rows after the claim went first.
        let before = store.fetch(0, 1).await.unwrap()[0].seq;
        store.holding(None).await.unwrap();
        for i in 60..80 {
            append(&store, message(i, false)).await;
        }
        assert!(store.fetch(0, 1).await.unwrap()[0].seq > before);
        close(store, thread).await;
        let c = totals_hold(&path);
        assert_eq!(c.forwarded, readings as u64);
        assert_eq!(
            c.dropped(DropReason::BufferFull),
            metrics.dropped("buffer_full").get()
        );
        assert_eq!(c.accepted, 80);
    }

    #[tokio::test]
    async fn a_thinning_round_drops_every_other_old_reading_of_each_series() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        // Two series at a 10-minute step, interleaved; the last 6 of each within the newest
        // hour of observations.
        let n = 40;
        let all: Vec<Reading> = (0..n)
            .flat_map(|i| {
                [
                    series_reading("a", SensorType::WaterLevel, i, 10),
                    series_reading("b", SensorType::SoilMoisture, i, 10),
                ]
            })
            .collect();
        let bound = bytes_of(&path, &all).await;
        let metrics = Arc::new(Metrics::new());
        let (store, thread) = start(
            path.clone(),
            bounded(bound, WhenFull::Thin),
            20.0,
            metrics.clone(),
        )
        .unwrap();
        // One more reading past the bound: one round.
        append(
            &store,
            one(series_reading("a", SensorType::WaterLevel, n, 10)),
        )
        .await;
        assert_eq!(metrics.buffer_thin_passes.get(), 1);
        assert_eq!(metrics.dropped("buffer_full").get(), 0);
        let mut missing_total = 0;
        for device in ["a", "b"] {
            let kept = buffered(&store, device).await;
            let missing: Vec<i64> = (0..n).filter(|i| !kept.contains(i)).collect();
            assert!(!missing.is_empty(), "{device}: thinned");
            assert_eq!(kept[0], 0, "{device}: the first reading stays");
            assert!(
                missing.windows(2).all(|w| w[1] > w[0] + 1),
                "{device}: two consecutive readings dropped in one round: {missing:?}"
            );
            // Only the oldest part (the oldest half of the rows, so about the first half of each
            // series) and nothing of the newest hour.
            assert!(
                missing.iter().all(|&i| i < n / 2 + 1),
                "{device}: {missing:?}"
            );
            assert_eq!(
                missing,
                (1..=missing.len() as i64)
                    .map(|k| 2 * k - 1)
                    .collect::<Vec<_>>()
            );
            missing_total += missing.len() as u64;
        }
        assert_eq!(metrics.dropped("thin").get(), missing_total);
        close(store, thread).await;
        assert_eq!(totals_hold(&path).dropped(DropReason::Thin), missing_total);
    }

    #[tokio::test]
    async fn thinning_keeps_the_whole_span_and_gaps_double_at_most_per_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let metrics = Arc::new(Metrics::new());
        let (store, thread) = start(
            path.clone(),
            bounded(6_000, WhenFull::Thin),
            20.0,
            metrics.clone(),
        )
        .unwrap();
        let n = 600;
        for i in 0..n {
            append(
                &store,
                one(series_reading("a", SensorType::WaterLevel, i, 5)),
            )
            .await;
            append(
                &store,
                one(series_reading("b", SensorType::SoilMoisture, i, 5)),
            )
            .await;
        }
        let passes = metrics.buffer_thin_passes.get();
        assert!(passes >= 2, "{passes} sweeps");
        for device in ["a", "b"] {
            let kept = buffered(&store, device).await;
            assert_eq!(kept[0], 0, "{device}: the span starts at the first reading");
            assert_eq!(*kept.last().unwrap(), n - 1);
            let gap = kept.windows(2).map(|w| w[1] - w[0]).max().unwrap();
            assert!(
                gap <= 1 << passes,
                "{device}: gap {gap} steps after {passes} sweeps"
            );
            // The newest hour (12 readings at 5 minutes) is whole.
            assert!(kept.ends_with(&(n - 12..n).collect::<Vec<_>>()), "{device}");
        }
        close(store, thread).await;
        let c = totals_hold(&path);
        assert_eq!(c.dropped(DropReason::Thin), metrics.dropped("thin").get());
        assert_eq!(c.accepted, 2 * n as u64);
    }

    #[tokio::test]
    async fn when_nothing_can_be_thinned_the_oldest_go_as_buffer_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let metrics = Arc::new(Metrics::new());
        let (store, thread) = start(
            path.clone(),
            bounded(3_000, WhenFull::Thin),
            20.0,
            metrics.clone(),
        )
        .unwrap();
        // One reading a second: all within the newest hour.
        for i in 0..100 {
            append(&store, message(i, false)).await;
        }
        let dropped = metrics.dropped("buffer_full").get();
        assert!(dropped > 0);
        assert_eq!(metrics.dropped("thin").get(), 0);
        assert_eq!(metrics.buffer_thin_passes.get(), 0);
        let kept = buffered(&store, "probe-1").await;
        assert_eq!(
            kept,
            (dropped as i64..100).collect::<Vec<_>>(),
            "the oldest went"
        );
        close(store, thread).await;
        totals_hold(&path);
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
