//! The outbox: every accepted reading, durable in SQLite until JetStream has acknowledged it.
//!
//! # On disk (`{data_dir}/buffer.db`, WAL mode, `PRAGMA user_version` = 7; older files are
//! migrated when opened, see [`db`])
//! - `outbox(seq PK, event_id BLOB, stored_ms, kind, body, trace)`: one row per event. `event_id` is
//!   empty for rows stored since version 4: their id derives from the seq ([`db::event_id`]),
//!   16 bytes saved per row. `kind` 0 is a reading (`body` = [`Reading`] as postcard bytes), 1
//!   a liveness change (`body` = [`crate::reading::StatusChange`]), 2 a reading with its
//!   device's metadata (the kind-0 body, then the metadata's JSON text; see
//!   [`Reading::to_row`]), 3 a command result (`body` = [`inbox::ResultBody`] as JSON; its
//!   `event_id` stored, stable per command id and status), 4 a heartbeat (`body` = the same
//!   JSON shape, the gateway's state; its id derived from the seq); the event JSON is rendered
//!   at publish time. Kinds 1, 3 and 4 are not readings: outside the readings' totals.
//!   `trace` (version 7; NULL otherwise): the W3C trace context a device sent with the message
//!   (`traceparent`, then a space and `tracestate` if any; [`crate::common::trace`]), on each
//!   of its readings; it counts against `max_bytes` with the body. Rows without one publish a
//!   context derived from their event id, so every attempt at a row carries the same header.
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
//!   last [`dedupe::RECENT_READINGS`] readings stored, so the same observation delivered twice is
//!   stored once. The key starts with the time, so new keys land at one end of the index.
//! - `recent_frames(id PK, node, key UNIQUE)`: frames of firmware nodes committed, the last
//!   [`FRAME_WINDOW`] per node (`node` = the node's [`FrameKey::node`]), so a resend after a lost
//!   ack is acknowledged again but not stored twice, however long the node waited and whatever
//!   else was stored meanwhile. At most [`dedupe::RECENT_FRAMES_MAX`] rows over all nodes.
//! - `sensors(device_id, sensor_type PK, field_id, tenant_id, last_seen_ms, stale_after_ms,
//!   online, low_battery, battery, rssi, readings)`: liveness per sensor ([`liveness`]), written
//!   in the same transaction as the readings and status events it follows from.
//! - `commands(command_id PK, actuator_id, field_id, tenant_id, correlation_id, action, value,
//!   issued_ms, expires_ms, received_ms, raw, state, status, reason, updated_ms)`: the
//!   downlink's inbox (`inbox.rs`); `state` is `queued`, `writing` (accepted: a write may have
//!   reached the device) or `done` (a final result committed).
//! - `actuators(actuator_id PK, newest_written_ms, off_since_ms, deadline_ms,
//!   deadline_command_id, run_since_ms, confirmed, last_command_id, last_status, last_reason,
//!   last_at_ms, updated_ms)`: what the downlink core restores at start, and the last confirmed
//!   value (`on`, `off` or a number) and result for the CLI.
//!
//! Every statement is in [`db`] (one file per table), called through typed functions; the
//! rest of the store holds no SQL text. Readers besides the writer (the CLI, `/status`) go
//! through [`Inspector`] (`inspect.rs`): the file opened read-only, typed queries only, so
//! nothing outside this module touches SQLite.
//!
//! # Invariants
//! 1. One thread owns the connection; every write goes through its queue. Writes queued while a
//!    commit is running are committed together in the next transaction (group commit: one fsync
//!    for all of them). A caller learns its outcome only after that commit returned
//!    (`writer.rs`; what the transaction writes: `transaction.rs`).
//! 2. `seq` is strictly increasing and never reused: `next_seq` is written in the same
//!    transaction as the rows it numbers, so it survives restarts and deleting every row; and
//!    `seq.floor` covers it before the commit, so it survives losing the file too
//!    (`Writer::reserve_seqs` in `writer.rs`, `seq_floor.rs`).
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
//!    Bounds and the claim: `bounds.rs`; the totals: [`counts`], recorded by `transaction.rs`.
//! 5. With `reject_new`, or while free disk is below `min_free_disk`, appends that carry
//!    readings are refused whole ([`AppendOutcome::Full`]): nothing of them is stored, so the
//!    source keeps the input (MQTT: no ack) and offers it again later (`bounds.rs`,
//!    `disk.rs`).
//! 6. A corrupt file at open is moved aside and replaced ([`db::open`]); an error from SQLite
//!    at run time fails the affected callers, who retry: nothing is acknowledged that was not
//!    committed. A file found corrupt at run time is never written again: the writer reports
//!    it on [`StoreHandle::fatal`] and fails every later append, fetch and replay with
//!    [`StoreError::Corrupt`], and the gateway stops in order so its next start moves the file
//!    aside (`corruption.rs`).
//! 7. Deduplication keys are remembered only for readings actually stored, so a reading refused
//!    by a bound is not mistaken for a repeat when it is offered again (`dedupe.rs`).
//! 8. A dead-letter leaves `dead_letters` only by the `dead_letter_max` bound, or by a replay
//!    ([`StoreHandle::replay`]) in the transaction that stores its message's readings; rows of a
//!    message the current mapping still rejects, or that cannot be replayed, stay unchanged
//!    (`replay.rs`).
//! 9. A command is in `commands` once its [`StoreHandle::command_received`] returned (the
//!    caller acks JetStream only then); a command id found there again writes nothing
//!    ([`Received::Known`]), so a redelivery is never handed to the core twice. Rows leave
//!    only by the inbox bound, and only when `done` (older than 30 days, or the oldest beyond
//!    10,000 rows): an open command is never forgotten.
//! 10. A result commits in one transaction with its inbox row's new state and its actuator's
//!     state ([`StoreHandle::command_result`]); a failed commit leaves none of them. Its outbox
//!     row's event id derives from the command id and status (for a result without a command:
//!     the actuator and time), so the same result has the same id whenever it is committed; one
//!     already recorded (still buffered, or the inbox row's last status) adds no second row.
//! 11. Result rows are events, not readings: not counted as accepted, forwarded, dropped or
//!     refused, so the identity of invariant 4 holds unchanged. Bounds treat them as status
//!     rows: `thin` never takes them (it takes readings of a series only); `drop_oldest` and
//!     `max_age` take them with the rows around them, since a full buffer must shrink and they
//!     are a few small rows among many. A result lost so is still in `commands` (its status)
//!     and `actuators`, for `commands list` and `actuators`. Like status rows, they are stored
//!     without `make_room` and despite `reject_new` or the disk reserve: they are not input a
//!     source could offer again.

// The module map. Callers see the handle below ([`start`], [`StoreHandle`], [`Append`],
// [`AppendOutcome`], [`StoreError`]) and [`Inspector`]; behind them:
pub mod counts; // lifetime totals of readings, the identity they keep
pub mod db; // every SQL statement: open, schema, migrations, and the typed functions per table
pub mod inbox; // the downlink's inbox, command results and actuator state (types; writer ops)
mod inspect; // `Inspector`: the file read-only, for the CLI and `/status`
mod latest; // the latest values of the sensors interlocks watch (memory only)
pub mod liveness; // sensors online, offline, low on battery
mod lock; // the advisory lock beside the file
mod recent; // the recent message keys, in memory
mod replay; // `dead-letters replay` as one more command of the writer
mod seq_floor; // `seq.floor`, the reserved high-water mark of `seq`

// The writer thread, one job a file:
mod bounds; // max_bytes (reject_new, drop_oldest, thin), max_age, dead_letter_max, the claim
mod corruption; // stop writing once the file is found corrupt, and say so
mod dedupe; // repeated messages, frames and observations
mod delta; // what a transaction changed, applied once it committed
mod disk; // the free-disk reserve
pub(crate) use disk::free_disk;
mod gauges; // counters, gauges and warnings of each commit
mod transaction; // what one transaction writes
mod writer; // the thread: open, queue, group commit

#[cfg(test)]
mod testkit;

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot, watch};

use crate::common::metrics::Metrics;
use crate::common::trace::TraceContext;
use crate::config::Buffer;
use crate::downlink::Restored;
use crate::ingest::mapping::Reason;
use crate::reading::{Reading, SensorType};
use counts::Counts;
pub use db::{DeadLetterRow, OutboxRow};
pub use dedupe::FRAME_WINDOW;
pub use inbox::{
    ActuatorRow, CommandRow, InboxCommand, InboxState, OpenCommand, Received, ResultRow,
};
use inbox::{InboxDone, InboxOp};
pub use inspect::Inspector;
pub(crate) use latest::Latest;
pub use replay::{ReasonReport, ReplayFilter, ReplayMapper, ReplayReport, Replayed};
pub(crate) use writer::start_locked;
use writer::{Command, Refusal};

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
    /// The W3C trace context the message came with (MQTT 5 user properties), kept with each of
    /// its readings.
    pub trace: Option<TraceContext>,
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
    /// Command results waiting (not readings either).
    pub command_results: u64,
    /// Heartbeats waiting (not readings either).
    pub heartbeats: u64,
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
        readings: t.readings(),
        status_events: t.status_rows,
        command_results: t.result_rows,
        heartbeats: t.heartbeat_rows,
        bytes: t.bytes,
        oldest_stored_ms: db::oldest_stored_ms(conn)?,
        next_seq: t.next_seq,
        dead_letters_by_reason: db::dead_letters_by_reason(conn)?,
        counts: db::meta::load_counts(conn)?,
    })
}

/// Cloneable access to the owner thread.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Command>,
    committed: watch::Receiver<u64>,
    fatal: watch::Receiver<Option<String>>,
    /// The values interlocks watch, taken from appends as they are queued.
    latest: Arc<Latest>,
}

impl StoreHandle {
    /// Queues a command; awaiting the send is the back-pressure when the writer falls behind.
    async fn send(&self, command: Command) -> Result<(), StoreError> {
        self.tx.send(command).await.map_err(|_| StoreError::Closed)
    }

    /// Queues a command that answers, and waits for its answer.
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(command(reply)).await?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    /// Queues an append; the returned receiver resolves after the commit. Awaiting the send is
    /// the back-pressure when the writer falls behind. The store only reads the append, so a
    /// caller that may have to offer it again keeps a shared copy instead of cloning it.
    pub async fn append(
        &self,
        append: impl Into<Arc<Append>>,
    ) -> Result<oneshot::Receiver<Result<AppendOutcome, StoreError>>, StoreError> {
        let append = append.into();
        self.latest.observe(&append.readings);
        let (reply, rx) = oneshot::channel();
        self.send(Command::Append(append, reply)).await?;
        Ok(rx)
    }

    /// Committed rows with `seq > after`, oldest first.
    pub async fn fetch(&self, after: u64, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        self.ask(|reply| Command::Fetch {
            after,
            limit,
            reply,
        })
        .await?
    }

    /// Rows JetStream acknowledged, as runs of seqs: every row still buffered in a run had its
    /// own PubAck (seqs in a run without a row are gone for good). Deleted in the next
    /// transaction.
    pub async fn acked(&self, runs: Vec<RangeInclusive<u64>>) -> Result<(), StoreError> {
        self.send(Command::Acked(runs)).await
    }

    /// What the forwarder may still publish of the rows it fetched: those with seq `>= from`
    /// (`None`: none). Everything it fetched below `from` has had its outcome reported
    /// (`acked`, `refused`) before this call. Bounds never delete a row it may still publish
    /// (invariant 4); a fetch claims the rows it returns.
    pub async fn holding(&self, from: Option<u64>) -> Result<(), StoreError> {
        self.send(Command::Holding(from)).await
    }

    /// A row the server will never accept: moved to dead-letters with the rendered event.
    pub async fn refused(&self, seq: u64, detail: String, raw: Vec<u8>) -> Result<(), StoreError> {
        self.send(Command::Refused(Refusal { seq, detail, raw }))
            .await
    }

    /// A downlink write, committed with the group; its outcome once the commit returned.
    async fn inbox(&self, op: InboxOp) -> Result<InboxDone, StoreError> {
        self.ask(|reply| Command::Inbox(op, reply)).await?
    }

    /// Stores a command received from JetStream as `queued`, or finds its id known (a
    /// redelivery or republish: nothing written). Ack the message only after this returned
    /// `Ok`, and hand it to the core only if [`Received::New`].
    pub async fn command_received(&self, command: InboxCommand) -> Result<Received, StoreError> {
        match self.inbox(InboxOp::Received(command)).await? {
            InboxDone::Received(r) => Ok(r),
            _ => Err(StoreError::Closed),
        }
    }

    /// Commits a result in one transaction with what follows from it: its outbox row (event
    /// id stable per command id and status), its inbox row's state (`accepted`: writing; any
    /// other: done) and, with `actuator`, that actuator's persisted state. False: the same
    /// result was committed before; no second row (the actuator state is saved either way).
    pub async fn command_result(
        &self,
        result: ResultRow,
        actuator: Option<(String, Restored)>,
    ) -> Result<bool, StoreError> {
        match self.inbox(InboxOp::Result(result, actuator)).await? {
            InboxDone::Result(new) => Ok(new),
            _ => Err(StoreError::Closed),
        }
    }

    /// Saves an actuator's persisted state (an off deadline before its write: invariant 6 of
    /// [`crate::downlink`]).
    pub async fn actuator_state(
        &self,
        actuator_id: String,
        state: Restored,
    ) -> Result<(), StoreError> {
        self.inbox(InboxOp::State(actuator_id, state))
            .await
            .map(drop)
    }

    /// Buffers a heartbeat (`body`: see [`crate::fleet`]); false when the bounds or the disk
    /// reserve refused it.
    pub(crate) async fn heartbeat(&self, body: Vec<u8>) -> Result<bool, StoreError> {
        self.gateway_event(crate::reading::KIND_HEARTBEAT, body)
            .await
    }

    /// Buffers a gateway event of `kind` (a heartbeat, a remote config outcome: see
    /// [`crate::fleet`]); false when the bounds or the disk reserve refused it.
    pub(crate) async fn gateway_event(&self, kind: u8, body: Vec<u8>) -> Result<bool, StoreError> {
        match self.inbox(InboxOp::Event(kind, body)).await? {
            InboxDone::Event(stored) => Ok(stored),
            _ => Err(StoreError::Closed),
        }
    }

    /// Commands not done yet, in received order, with their raw messages: for the core at start.
    pub async fn commands_open(&self) -> Result<Vec<OpenCommand>, StoreError> {
        self.ask(Command::CommandsOpen).await?
    }

    /// Every actuator's persisted state, by id: for [`crate::downlink::Core::restore`].
    pub async fn actuator_states(&self) -> Result<Vec<(String, Restored)>, StoreError> {
        self.ask(Command::ActuatorStates).await?
    }

    /// Resolves after everything queued before it is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.ask(Command::Flush).await
    }

    /// `dead-letters replay`: maps the kept messages `filter` selects again with `mapper` and
    /// stores their readings, deleting their dead-letters in the same transaction (see
    /// `replay.rs`). With `filter.dry_run`, reports what would happen and changes nothing.
    pub async fn replay(
        &self,
        filter: ReplayFilter,
        mapper: Arc<dyn ReplayMapper>,
    ) -> Result<ReplayReport, StoreError> {
        self.ask(|reply| Command::Replay {
            filter,
            mapper,
            reply,
        })
        .await?
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

    /// The latest values of the sensors interlocks watch ([`Latest::watch`] says which).
    pub(crate) fn latest(&self) -> Arc<Latest> {
        self.latest.clone()
    }
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
