//! The owner thread (invariant 1): opening the buffer, the queue, and the group commit. Each
//! batch taken from the queue is sorted into what needs the transaction (appends, refusals,
//! maintenance, acknowledged runs) and what is served at once (fetches, claims); one
//! transaction then commits the group (`transaction.rs`), and replays follow in their own.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot, watch};

use super::delta::Delta;
use super::inbox::{InboxOp, InboxReply, OpenCommand};
use super::{
    db, lock, recent, seq_floor, Append, AppendOutcome, OutboxRow, ReplayFilter, ReplayMapper,
    ReplayReport, StoreError, StoreHandle,
};
use crate::common::log_limit::LogLimit;
use crate::common::metrics::Metrics;
use crate::config::Buffer;
use crate::downlink::Restored;

/// Commands queued for one transaction at most.
const MAX_GROUP: usize = 8192;
/// Commands the batch buffer keeps room for between groups.
const KEEP_GROUP_CAPACITY: usize = 1024;

/// Acknowledged seqs held back from a transaction of their own until this many are waiting:
/// deletes need no fsync of their own, so they ride along with the next commit (an append, a
/// flush, the once-a-second maintenance) or go in groups of this size.
const ACKED_COMMIT_AT: u64 = 4096;

/// Where an append's outcome goes once its transaction committed (or failed).
pub(super) type AppendReply = oneshot::Sender<Result<AppendOutcome, StoreError>>;
type ReplayReply = oneshot::Sender<Result<ReplayReport, StoreError>>;

pub(super) enum Command {
    Append(Arc<Append>, AppendReply),
    Fetch {
        after: u64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<OutboxRow>, StoreError>>,
    },
    Acked(Vec<RangeInclusive<u64>>),
    Holding(Option<u64>),
    Refused(Refusal),
    Flush(oneshot::Sender<()>),
    Maintain,
    Replay {
        filter: ReplayFilter,
        mapper: Arc<dyn ReplayMapper>,
        reply: ReplayReply,
    },
    /// A downlink write, committed with the group (`inbox.rs`).
    Inbox(InboxOp, InboxReply),
    CommandsOpen(Reply<Vec<OpenCommand>>),
    ActuatorStates(Reply<Vec<(String, Restored)>>),
}

/// Where a read's answer goes.
pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A row the server will never accept, to move to dead-letters with its rendered event.
pub(super) struct Refusal {
    pub(super) seq: u64,
    pub(super) detail: String,
    pub(super) raw: Vec<u8>,
}

pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) path: PathBuf,
    pub(super) data_dir: PathBuf,
    pub(super) buffer: Buffer,
    pub(super) metrics: Arc<Metrics>,
    pub(super) rows: u64,
    /// Of `rows`, the status events, command results and heartbeats (the rest are readings).
    pub(super) event_rows: u64,
    pub(super) bytes: u64,
    pub(super) next_seq: u64,
    pub(super) dead_letters: u64,
    pub(super) disk_low: bool,
    /// Last append refused for `reject_new`; cleared by the next one stored.
    pub(super) full: bool,
    pub(super) committed: watch::Sender<u64>,
    /// Where a corrupt file is reported to the process (see [`StoreHandle::fatal`]).
    pub(super) fatal: watch::Sender<Option<String>>,
    /// Set once SQLite found the file corrupt: no transaction runs after (invariant 6).
    pub(super) corrupt: Option<String>,
    pub(super) floor: seq_floor::SeqFloor,
    failure_log: LogLimit,
    /// Battery percentage below which a sensor is flagged.
    pub(super) low_battery: f64,
    /// Acknowledged runs not yet deleted, and how many seqs they span.
    acked: Vec<RangeInclusive<u64>>,
    acked_seqs: u64,
    pub(super) recent: recent::RecentMessages,
    pub(super) event_salt: [u8; 16],
    /// Held as long as the writer lives: no other process writes the buffer meanwhile.
    _lock: lock::BufferLock,
    /// Seqs the forwarder fetched and may still publish (`lo..=hi`): no bound deletes them, so
    /// a reading counted as dropped never reaches the stream (invariant 4).
    pub(super) claim: Option<(u64, u64)>,
    /// Where the next thinning round starts (`meta.thin_after`; 0: at the oldest row).
    pub(super) thin_after: u64,
}

/// The buffer as opening found it, before a writer takes it over.
struct Opening {
    conn: Connection,
    lock: lock::BufferLock,
    floor: seq_floor::SeqFloor,
    totals: db::Totals,
    recent: recent::RecentMessages,
    thin_after: u64,
    event_salt: [u8; 16],
}

/// Locks and opens the buffer (waiting at most `lock_wait` for another process to release
/// it), then starts its owner thread and the once-a-second maintenance.
pub(crate) fn start_locked(
    path: PathBuf,
    buffer: Buffer,
    low_battery: f64,
    metrics: Arc<Metrics>,
    lock_wait: Duration,
) -> Result<(StoreHandle, std::thread::JoinHandle<()>), StoreError> {
    let opening = open_buffer(&path, &buffer, lock_wait, &metrics)?;
    let (tx, rx) = mpsc::channel(4096);
    let (committed_tx, committed) = watch::channel(opening.totals.next_seq.saturating_sub(1));
    let (fatal_tx, fatal) = watch::channel(None);
    let reports = (committed_tx, fatal_tx);
    let mut writer = Writer::new(opening, path, buffer, low_battery, metrics, reports);
    writer.publish_gauges();
    writer.check_disk();
    let thread = std::thread::Builder::new()
        .name("store".into())
        .spawn(move || writer.run(rx))
        .map_err(|source| StoreError::DataDir {
            path: PathBuf::from("(store thread)"),
            source,
        })?;
    tick_maintenance(tx.downgrade());
    let handle = StoreHandle {
        tx,
        committed,
        fatal,
        latest: Default::default(),
    };
    Ok((handle, thread))
}

fn open_buffer(
    path: &Path,
    buffer: &Buffer,
    lock_wait: Duration,
    metrics: &Metrics,
) -> Result<Opening, StoreError> {
    let lock = lock::acquire(path, lock_wait)?;
    let floor = seq_floor::SeqFloor::load(&path.with_file_name("seq.floor"));
    // Sequence numbers were handed out: this buffer has held rows, so an empty file lost them.
    let has_held_rows = floor.reserved() > 1;
    let opened = db::open(path, buffer.synchronous, has_held_rows)?;
    if opened.moved_aside.is_some() {
        metrics.store_corruption_recovered.inc();
    }
    let sqlite = |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let conn = opened.conn;
    let mut totals = db::totals(&conn).map_err(sqlite)?;
    let recent = recent::RecentMessages::load(&conn).map_err(sqlite)?;
    let buffered_readings = totals.readings();
    db::meta::init_counts(&conn, buffered_readings).map_err(sqlite)?;
    let thin_after = db::meta::thin_after(&conn).map_err(sqlite)?;
    let event_salt = db::event_salt(&conn).map_err(sqlite)?;
    if totals.next_seq == 1 {
        // A new (or replaced) database continues above everything handed out before.
        totals.next_seq = floor.reserved();
    }
    Ok(Opening {
        conn,
        lock,
        floor,
        totals,
        recent,
        thin_after,
        event_salt,
    })
}

/// Queues `Maintain` once a second: the disk check, the age bound, sensors gone silent. A
/// weak sender: the ticker must not keep the writer alive once every handle is gone.
fn tick_maintenance(ticker: mpsc::WeakSender<Command>) {
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
}

/// One batch from the queue, sorted by what the transaction does with it.
#[derive(Default)]
pub(super) struct Group {
    pub(super) appends: Vec<(Arc<Append>, AppendReply)>,
    pub(super) refused: Vec<Refusal>,
    pub(super) flushes: Vec<oneshot::Sender<()>>,
    pub(super) replays: Vec<(ReplayFilter, Arc<dyn ReplayMapper>, ReplayReply)>,
    pub(super) maintain: bool,
    pub(super) inbox: Vec<(InboxOp, InboxReply)>,
}

impl Writer {
    fn new(
        opening: Opening,
        path: PathBuf,
        buffer: Buffer,
        low_battery: f64,
        metrics: Arc<Metrics>,
        (committed, fatal): (watch::Sender<u64>, watch::Sender<Option<String>>),
    ) -> Self {
        let data_dir = path
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        let totals = opening.totals;
        Writer {
            conn: opening.conn,
            path,
            data_dir,
            buffer,
            metrics,
            rows: totals.rows,
            event_rows: totals.event_rows(),
            bytes: totals.bytes,
            next_seq: totals.next_seq,
            dead_letters: totals.dead_letters,
            disk_low: false,
            full: false,
            committed,
            fatal,
            corrupt: None,
            floor: opening.floor,
            failure_log: LogLimit::new(Duration::from_secs(10)),
            low_battery,
            acked: Vec::new(),
            acked_seqs: 0,
            recent: opening.recent,
            event_salt: opening.event_salt,
            _lock: opening.lock,
            claim: None,
            thin_after: opening.thin_after,
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        // One buffer for every batch: a group of hundreds of commands would otherwise grow a
        // new one, copying it at each doubling.
        let mut batch = Vec::new();
        while rx.blocking_recv_many(&mut batch, MAX_GROUP) > 0 {
            self.run_batch(batch.drain(..), false);
            // A burst's full group is not kept for good.
            batch.shrink_to(KEEP_GROUP_CAPACITY);
        }
        if self.corrupt.is_some() {
            // Left as it is for the next start to move aside and keep for inspection.
            return;
        }
        // Every handle is gone: delete what was acknowledged, and fold the WAL into the main
        // file so the next open is quick.
        self.run_batch(std::iter::empty(), true);
        let _ = db::checkpoint(&self.conn);
    }

    /// Runs a group of commands; `closing` commits whatever is pending.
    fn run_batch(&mut self, batch: impl ExactSizeIterator<Item = Command>, closing: bool) {
        let mut group = self.take_in(batch);
        if self.corrupt.is_some() {
            // Found before or by a fetch of this batch: nothing queued with it is written.
            self.refuse(group);
            return;
        }
        if group.maintain {
            self.check_disk();
        }
        self.reserve_seqs(&mut group);
        self.commit_group(&mut group, closing);
        self.run_replays(std::mem::take(&mut group.replays));
        for f in group.flushes {
            let _ = f.send(());
        }
    }

    /// Sorts a batch into a [`Group`], serving fetches and claims on the way.
    fn take_in(&mut self, batch: impl ExactSizeIterator<Item = Command>) -> Group {
        let mut group = Group {
            appends: Vec::with_capacity(batch.len()),
            ..Group::default()
        };
        for c in batch {
            match c {
                Command::Append(a, reply) => group.appends.push((a, reply)),
                Command::Acked(runs) if self.corrupt.is_none() => {
                    self.acked_seqs += runs.iter().map(|r| r.end() - r.start() + 1).sum::<u64>();
                    self.acked.extend(runs);
                }
                // A corrupt file is not written again: nothing to delete from it.
                Command::Acked(_) => {}
                Command::Refused(refusal) => group.refused.push(refusal),
                Command::Holding(from) => self.hold(from),
                Command::Flush(reply) => group.flushes.push(reply),
                Command::Maintain => group.maintain = true,
                Command::Replay {
                    filter,
                    mapper,
                    reply,
                } => group.replays.push((filter, mapper, reply)),
                // Served in command order, so a claim and a release the forwarder sent after
                // it apply in the order it sent them. Rows acknowledged in this batch are not
                // deleted yet, but the forwarder never fetches below its acknowledged rows
                // without a flush first.
                Command::Fetch {
                    after,
                    limit,
                    reply,
                } => {
                    let _ = reply.send(self.fetch(after, limit));
                }
                Command::Inbox(op, reply) => group.inbox.push((op, reply)),
                Command::CommandsOpen(reply) => {
                    let _ = reply.send(self.read(db::commands::open));
                }
                Command::ActuatorStates(reply) => {
                    let _ = reply.send(self.read(db::actuators::states));
                }
            }
        }
        group
    }

    /// A read of the downlink's tables on the writer's connection (it sees every commit).
    fn read<T>(&mut self, query: fn(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        if self.corrupt.is_some() {
            return Err(self.corrupt_error());
        }
        query(&self.conn).map_err(|e| {
            if db::is_corrupt(&e) {
                self.became_corrupt(&e);
                return self.corrupt_error();
            }
            StoreError::Sqlite {
                path: self.path.clone(),
                source: e,
            }
        })
    }

    /// Rows for the forwarder, claimed until it releases them ([`StoreHandle::holding`]).
    fn fetch(&mut self, after: u64, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        if self.corrupt.is_some() {
            return Err(self.corrupt_error());
        }
        match db::fetch_after(&self.conn, after, limit, &self.event_salt) {
            Ok(rows) => {
                if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
                    self.claim_fetched(first.seq, last.seq);
                }
                Ok(rows)
            }
            Err(e) if db::is_corrupt(&e) => {
                self.became_corrupt(&e);
                Err(self.corrupt_error())
            }
            Err(source) => Err(StoreError::Sqlite {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Invariant 2: `seq.floor` covers every seq the group may hand out before it commits. If
    /// it cannot be written, the group's appends and downlink writes fail and their callers
    /// retry.
    fn reserve_seqs(&mut self, group: &mut Group) {
        // Each reading may bring up to two status events (connected, low battery); each
        // downlink write at most one result.
        let most_new: usize = group
            .appends
            .iter()
            .map(|(a, _)| a.readings.len() * 3)
            .sum::<usize>()
            + group.inbox.len();
        if let Err(e) = self.floor.ensure(self.next_seq + most_new as u64) {
            tracing::error!(error = %e, dir = %self.data_dir.display(), "cannot write seq.floor; not committing");
            self.metrics.set_store_healthy(false);
            let error = || StoreError::Commit(format!("seq.floor: {e}"));
            for (_, reply) in group.appends.drain(..) {
                let _ = reply.send(Err(error()));
            }
            for (_, reply) in group.inbox.drain(..) {
                let _ = reply.send(Err(error()));
            }
        }
    }

    /// The group's transaction, if it has anything to write: acknowledged runs ride along with
    /// other writes, or go alone once enough are waiting or someone waits for them.
    fn commit_group(&mut self, group: &mut Group, closing: bool) {
        let other_writes = !group.appends.is_empty()
            || !group.refused.is_empty()
            || !group.inbox.is_empty()
            || group.maintain;
        let delete = !self.acked.is_empty()
            && (other_writes
                || closing
                || !group.flushes.is_empty()
                || self.acked_seqs >= ACKED_COMMIT_AT);
        if !other_writes && !delete {
            return;
        }
        let started = Instant::now();
        let mut delta = Delta::numbering_from(self.next_seq);
        let appends = std::mem::take(&mut group.appends);
        delta.messages.reserve(appends.len());
        let inbox = std::mem::take(&mut group.inbox);
        let acked: &[RangeInclusive<u64>] = if delete { &self.acked } else { &[] };
        match self.write(&appends, acked, group, &inbox, &mut delta) {
            Ok((outcomes, done)) => {
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
                for ((_, reply), done) in inbox.into_iter().zip(done) {
                    let _ = reply.send(Ok(done));
                }
            }
            Err(e) => self.group_failed(&e, appends, inbox),
        }
    }

    /// Nothing of the group was written: each append learns why (invariant 6: never a success).
    fn group_failed(
        &mut self,
        e: &rusqlite::Error,
        appends: Vec<(Arc<Append>, AppendReply)>,
        inbox: Vec<(InboxOp, InboxReply)>,
    ) {
        self.metrics.set_store_healthy(false);
        if let Some(held) = self.failure_log.admit() {
            tracing::error!(error = %e, file = %self.path.display(), repeats = held, "buffer transaction failed; callers will retry");
        }
        if db::is_corrupt(e) {
            self.became_corrupt(e);
        }
        let msg = e.to_string();
        let error = || match self.corrupt {
            Some(_) => self.corrupt_error(),
            None => StoreError::Commit(msg.clone()),
        };
        for (_, reply) in appends {
            let _ = reply.send(Err(error()));
        }
        for (_, reply) in inbox {
            let _ = reply.send(Err(error()));
        }
    }

    /// In a transaction each, after the group: a replay maps many messages and must not hold
    /// up the commits of live intake queued with it.
    fn run_replays(&mut self, replays: Vec<(ReplayFilter, Arc<dyn ReplayMapper>, ReplayReply)>) {
        for (filter, mapper, reply) in replays {
            if self.corrupt.is_some() {
                let _ = reply.send(Err(self.corrupt_error()));
                continue;
            }
            let result = self.replay(&filter, &*mapper);
            if let Err(StoreError::Sqlite { source, .. }) = &result {
                if db::is_corrupt(source) {
                    self.became_corrupt(source);
                }
            }
            let _ = reply.send(result);
        }
    }
}
