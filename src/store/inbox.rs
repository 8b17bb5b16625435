//! The downlink's storage (DESIGN §8): the command inbox, command results through the outbox,
//! and each actuator's persisted state, written by the writer thread in the group's
//! transaction like appends (invariants 9 to 11 in the module comment).
//!
//! A result is an outbox row of kind [`KIND_RESULT`] whose body is a [`ResultBody`] (JSON:
//! the envelope's tenant and correlation id, and the payload as the core made it); its event
//! id is stored, derived from the command id and status ([`result_event_id`]), so the same
//! result committed again (after a crash, by a replaying driver) has the same id, and is not
//! buffered twice.

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::bounds::Room;
use super::delta::Delta;
use super::transaction::insert_row;
use super::writer::Writer;
use super::{db, StoreError};
use crate::downlink::{Command, CommandResult, Reason, Request, Restored, Status, Value};
use crate::reading::{Timestamp, KIND_RESULT};

/// Done rows older than this leave the inbox.
pub(crate) const INBOX_MAX_AGE_MS: i64 = 30 * 24 * 3600 * 1000;
/// The inbox keeps at most this many rows, open ones aside (the oldest done rows go first).
pub(crate) const INBOX_MAX_ROWS: u64 = 10_000;

/// Where a command stands in the inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxState {
    /// Received; no result yet, or results without a write.
    Queued,
    /// `accepted`: its write may have reached the device.
    Writing,
    /// A final result was committed.
    Done,
}

impl InboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Writing => "writing",
            Self::Done => "done",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Queued, Self::Writing, Self::Done]
            .into_iter()
            .find(|s| s.as_str() == name)
    }
}

/// A command as the inbox keeps it: a parsed [`Command`] and the message it came in.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxCommand {
    pub command_id: String,
    pub actuator_id: String,
    pub field_id: String,
    pub tenant_id: String,
    pub correlation_id: String,
    /// `on`, `off` or `set`.
    pub action: String,
    pub value: Option<f64>,
    pub issued_ms: i64,
    pub expires_ms: i64,
    pub received_ms: i64,
    /// The message as delivered, handed to the core again after a restart.
    pub raw: Vec<u8>,
}

impl InboxCommand {
    pub fn new(c: &Command, raw: Vec<u8>, received: Timestamp) -> Self {
        Self {
            command_id: c.command_id.clone(),
            actuator_id: c.actuator_id.clone(),
            field_id: c.field_id.clone(),
            tenant_id: c.tenant_id.clone(),
            correlation_id: c.correlation_id.clone(),
            action: c.request.as_str().to_string(),
            value: match c.request {
                Request::Set(v) => Some(v),
                _ => None,
            },
            issued_ms: c.issued_at.unix_millis(),
            expires_ms: c.expires_at.unix_millis(),
            received_ms: received.unix_millis(),
            raw,
        }
    }
}

/// What [`super::StoreHandle::command_received`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    /// Stored as `queued`: hand it to the core.
    New,
    /// A redelivery or republish of a command id the inbox has: nothing written; ack it and
    /// do not hand it to the core. `status`: its last result, if any.
    Known {
        state: InboxState,
        status: Option<Status>,
    },
}

/// A result to publish, with the envelope fields the core's result lacks.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    pub result: CommandResult,
    /// Used only when the inbox has no row for `result.command_id` (a removal's
    /// `switched_off`, or a command the inbox bound took); otherwise the command's own are.
    pub tenant_id: String,
    /// As `tenant_id`; empty: the result's event id stands in.
    pub correlation_id: String,
}

/// A command not done yet, for the core after a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenCommand {
    pub command_id: String,
    /// `Writing`: its write may have reached the device before the restart.
    pub state: InboxState,
    pub received_ms: i64,
    pub raw: Vec<u8>,
}

/// One inbox row, for `commands list`.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRow {
    pub command_id: String,
    pub actuator_id: String,
    pub field_id: String,
    pub action: String,
    pub value: Option<f64>,
    pub state: InboxState,
    pub status: Option<String>,
    pub reason: Option<String>,
    pub issued_ms: i64,
    pub expires_ms: i64,
    pub received_ms: i64,
    pub updated_ms: i64,
}

/// One actuator as the store knows it, for `actuators`.
#[derive(Debug, Clone, PartialEq)]
pub struct ActuatorRow {
    pub actuator_id: String,
    pub restored: Restored,
    /// The value last confirmed on the device (`None`: unknown).
    pub confirmed: Option<Value>,
    pub last_command_id: Option<String>,
    pub last_status: Option<String>,
    pub last_reason: Option<String>,
    pub last_at_ms: Option<i64>,
}

/// The body of a [`KIND_RESULT`] row: what `uplink::event` needs besides the row itself. A
/// [`crate::reading::KIND_HEARTBEAT`] row's too, with an empty correlation id (the event id stands in).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ResultBody {
    pub(crate) tenant_id: String,
    pub(crate) correlation_id: String,
    /// The [`CommandResult`] as JSON, as the payload of the event.
    pub(crate) payload: serde_json::Map<String, serde_json::Value>,
}

impl ResultBody {
    /// The row body of `result` in the envelope of a command.
    pub(crate) fn encode(tenant_id: String, correlation_id: String, r: &CommandResult) -> Vec<u8> {
        // A struct of strings and numbers always serializes, as an object.
        let payload = match serde_json::to_value(r) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        let body = Self {
            tenant_id,
            correlation_id,
            payload,
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// A result's event id: a hash of the buffer's salt with the command id and status (with no
/// command id: the actuator and the time), laid out as a version 4 UUID. The same result
/// always gets the same id, so JetStream drops a second publish of it (`Nats-Msg-Id`).
pub(crate) fn result_event_id(salt: &[u8; 16], r: &CommandResult) -> [u8; 16] {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(salt);
    h.update(b"command result\0");
    if r.command_id.is_empty() {
        h.update(b"actuator\0");
        h.update(r.actuator_id.as_bytes());
        h.update(&r.at.0.to_le_bytes());
    } else {
        h.update(r.command_id.as_bytes());
        h.update(b"\0");
    }
    h.update(r.status.as_str().as_bytes());
    db::as_uuid_v4(h.digest128())
}

/// What a result tells of its actuator's confirmed value: `Some(v)` to record `v` (`None`:
/// unknown after a bus error), `None` to leave it.
fn confirmed_by(r: &CommandResult) -> Option<Option<Value>> {
    match (r.status, r.reason) {
        (Status::Applied | Status::SwitchedOff, _) => Some(r.readback.or(r.requested)),
        (Status::Failed, Some(Reason::ReadbackMismatch)) => Some(r.readback),
        (Status::Failed, _) => Some(None),
        _ => None,
    }
}

/// A downlink write queued for the group's transaction; or a heartbeat, an event row written
/// the same way.
pub(super) enum InboxOp {
    Received(InboxCommand),
    Result(ResultRow, Option<(String, Restored)>),
    State(String, Restored),
    /// A gateway event's row: its kind ([`crate::reading::KIND_HEARTBEAT`] or
    /// [`crate::reading::KIND_CONFIG`]) and body (a
    /// [`ResultBody`] without correlation id).
    Event(u8, Vec<u8>),
}

/// What an [`InboxOp`] did, sent once its transaction committed.
pub(super) enum InboxDone {
    Received(Received),
    /// Whether the result became a new outbox row (false: committed before).
    Result(bool),
    State,
    /// Whether the gateway event was stored (false: the bounds or the disk reserve refused it).
    Event(bool),
}

pub(super) type InboxReply = oneshot::Sender<Result<InboxDone, StoreError>>;

impl Writer {
    /// One downlink write inside the group's transaction.
    pub(super) fn inbox_op(
        &self,
        tx: &rusqlite::Transaction<'_>,
        op: &InboxOp,
        now: i64,
        delta: &mut Delta,
    ) -> rusqlite::Result<InboxDone> {
        match op {
            InboxOp::Received(c) => {
                if db::commands::insert(tx, c)? {
                    db::commands::trim(tx, now - INBOX_MAX_AGE_MS, INBOX_MAX_ROWS)?;
                    return Ok(InboxDone::Received(Received::New));
                }
                let known = db::commands::known(tx, &c.command_id)?;
                Ok(InboxDone::Received(Received::Known {
                    state: known.as_ref().map_or(InboxState::Done, |k| k.state),
                    status: known
                        .and_then(|k| k.status)
                        .and_then(|s| Status::from_name(&s)),
                }))
            }
            InboxOp::Result(row, actuator) => {
                if let Some((id, restored)) = actuator {
                    db::actuators::save_state(tx, id, restored, now)?;
                }
                Ok(InboxDone::Result(self.store_result(tx, row, now, delta)?))
            }
            InboxOp::State(id, restored) => {
                db::actuators::save_state(tx, id, restored, now)?;
                Ok(InboxDone::State)
            }
            InboxOp::Event(kind, body) => self.store_event(tx, *kind, body, now, delta),
        }
    }

    /// A gateway event (heartbeat, config outcome) takes room like a reading: a full buffer
    /// drops or thins old rows for it, `reject_new` and the disk reserve refuse it (the next
    /// heartbeat reports why). Its event id derives from its seq, like a reading's.
    fn store_event(
        &self,
        tx: &rusqlite::Transaction<'_>,
        kind: u8,
        body: &[u8],
        now: i64,
        delta: &mut Delta,
    ) -> rusqlite::Result<InboxDone> {
        let rows = [(kind, body.to_vec())];
        if self.make_room(tx, &rows, 0, delta)? != Room::Made {
            return Ok(InboxDone::Event(false));
        }
        insert_row(tx, kind, body, now, delta)?;
        Ok(InboxDone::Event(true))
    }

    /// The result's outbox row, its inbox row's state and its actuator's last result; nothing
    /// of them if the same result was committed before (false).
    fn store_result(
        &self,
        tx: &rusqlite::Transaction<'_>,
        row: &ResultRow,
        now: i64,
        delta: &mut Delta,
    ) -> rusqlite::Result<bool> {
        let r = &row.result;
        let event_id = result_event_id(&self.event_salt, r);
        let known = match r.command_id.as_str() {
            "" => None,
            id => db::commands::known(tx, id)?,
        };
        let status = r.status.as_str();
        let repeat = db::outbox::has_result(tx, &event_id)?
            || known.as_ref().is_some_and(|k| {
                k.status.as_deref() == Some(status)
                    || (r.status == Status::Accepted && k.state == InboxState::Done)
            });
        if repeat {
            return Ok(false);
        }
        let (tenant_id, correlation_id) = match &known {
            Some(k) => (k.tenant_id.clone(), k.correlation_id.clone()),
            None => (row.tenant_id.clone(), row.correlation_id.clone()),
        };
        let body = ResultBody::encode(tenant_id, correlation_id, r);
        db::outbox::insert_with_id(tx, delta.next_seq, &event_id, now, KIND_RESULT, &body)?;
        delta.added(KIND_RESULT, body.len());
        if known.is_some() {
            let state = match r.status {
                Status::Accepted => InboxState::Writing,
                _ => InboxState::Done,
            };
            let reason = r.reason.map(Reason::as_str);
            db::commands::set_status(tx, &r.command_id, state, (status, reason), now)?;
        }
        db::actuators::record_result(tx, r, confirmed_by(r), now)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rusqlite::Connection;

    use super::*;
    use crate::common::metrics::Metrics;
    use crate::config::Buffer;
    use crate::downlink::command::tests::message;
    use crate::downlink::Deadline;
    use crate::reading::KIND_HEARTBEAT;
    use crate::store::testkit::*;
    use crate::store::{start, Inspector, StoreHandle};

    const ID: &str = "9b2d7e5a-3c1f-4e8b-a6d2-0f4e5c6b7a81";
    const T0: i64 = 1_780_287_300_000;

    /// The test command message with this command id, as received at `T0`.
    pub(crate) fn received(command_id: &str) -> InboxCommand {
        let raw = message(|v| v["payload"]["command_id"] = command_id.into());
        let c = Command::parse(&raw, "gw-1").unwrap();
        InboxCommand::new(&c, raw, Timestamp::from_unix_millis(T0))
    }

    pub(crate) fn result(command_id: &str, status: Status) -> ResultRow {
        ResultRow {
            result: CommandResult {
                command_id: command_id.into(),
                actuator_id: "pump-1".into(),
                field_id: "f-1".into(),
                status,
                reason: None,
                requested: Some(Value::Switch(true)),
                readback: (status == Status::Applied).then_some(Value::Switch(true)),
                at: Timestamp::from_unix_millis(T0 + 1_000),
            },
            tenant_id: "fallback-tenant".into(),
            correlation_id: "fallback-corr".into(),
        }
    }

    fn running() -> Restored {
        Restored {
            newest_written: Some(Timestamp::from_unix_millis(T0)),
            deadline: Some(Deadline {
                at: Timestamp::from_unix_millis(T0 + 300_000),
                command_id: ID.into(),
                run_since: Timestamp::from_unix_millis(T0 + 1_000),
            }),
            off_since: None,
        }
    }

    fn open_store(path: &std::path::Path) -> (StoreHandle, std::thread::JoinHandle<()>) {
        start(
            path.to_path_buf(),
            Buffer::default(),
            20.0,
            Arc::new(Metrics::new()),
        )
        .unwrap()
    }

    /// Every row of the inbox, as text, to see that nothing changed.
    fn inbox_rows(path: &std::path::Path) -> Vec<String> {
        let conn = Connection::open(path).unwrap();
        let mut stmt = conn
            .prepare("SELECT command_id, state, status, reason, updated_ms FROM commands")
            .unwrap();
        stmt.query_map([], |r| {
            Ok(format!(
                "{} {} {:?} {:?} {}",
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, i64>(4)?
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    #[tokio::test]
    async fn a_redelivered_command_is_known_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let (store, thread) = open_store(&path);
        assert_eq!(
            store.command_received(received(ID)).await.unwrap(),
            Received::New
        );
        let before = inbox_rows(&path);
        let committed = *store.committed().borrow();
        let again = store.command_received(received(ID)).await.unwrap();
        assert_eq!(
            again,
            Received::Known {
                state: InboxState::Queued,
                status: None
            }
        );
        assert_eq!(inbox_rows(&path), before);
        assert_eq!(*store.committed().borrow(), committed, "no outbox row");
        store
            .command_result(result(ID, Status::Accepted), None)
            .await
            .unwrap();
        assert_eq!(
            store.command_received(received(ID)).await.unwrap(),
            Received::Known {
                state: InboxState::Writing,
                status: Some(Status::Accepted)
            }
        );
        close(store, thread).await;
    }

    #[tokio::test]
    async fn a_result_moves_its_command_and_actuator_and_is_buffered_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let (store, thread) = open_store(&path);
        append(&store, message_reading(1)).await;
        store.command_received(received(ID)).await.unwrap();
        let actuator = Some(("pump-1".to_string(), running()));
        let accepted = result(ID, Status::Accepted);
        assert!(store
            .command_result(accepted.clone(), actuator.clone())
            .await
            .unwrap());
        let open = store.commands_open().await.unwrap();
        assert_eq!((open.len(), open[0].state), (1, InboxState::Writing));
        assert_eq!(open[0].raw, received(ID).raw);
        assert_eq!(
            store.actuator_states().await.unwrap(),
            vec![("pump-1".to_string(), running())]
        );
        // Committed again (a driver replaying after a crash): no second row.
        assert!(!store.command_result(accepted, actuator).await.unwrap());
        assert!(store
            .command_result(result(ID, Status::Applied), None)
            .await
            .unwrap());
        assert!(store.commands_open().await.unwrap().is_empty());
        let rows = store.fetch(0, 100).await.unwrap();
        let results: Vec<_> = rows.iter().filter(|r| r.kind == KIND_RESULT).collect();
        assert_eq!(results.len(), 2);
        let salt = db::event_salt(&Connection::open(&path).unwrap()).unwrap();
        let applied = result(ID, Status::Applied).result;
        assert_eq!(results[1].event_id, result_event_id(&salt, &applied));
        let body: ResultBody = serde_json::from_slice(&results[1].body).unwrap();
        // The command's own envelope, not the fallback.
        assert_eq!(
            (body.tenant_id.as_str(), body.correlation_id.as_str()),
            ("tenant-a", "corr-1")
        );
        assert_eq!(body.payload["status"], "applied");
        // Acknowledged and gone, the same result committed again still makes no row.
        let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
        store
            .acked(vec![seqs[0]..=seqs[seqs.len() - 1]])
            .await
            .unwrap();
        store.holding(None).await.unwrap();
        store.flush().await.unwrap();
        assert!(!store
            .command_result(result(ID, Status::Applied), None)
            .await
            .unwrap());
        close(store, thread).await;
        // Results are not readings: the identity holds, and the one reading was forwarded.
        assert_eq!(totals_hold(&path).forwarded, 1);
        let rows = Inspector::open(&path).unwrap().actuators().unwrap();
        assert_eq!(rows[0].confirmed, Some(Value::Switch(true)));
        assert_eq!(rows[0].last_status.as_deref(), Some("applied"));
    }

    fn message_reading(i: i64) -> crate::store::Append {
        crate::store::testkit::message(i, false)
    }

    #[tokio::test]
    async fn a_result_commit_that_fails_leaves_none_of_its_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let (store, thread) = open_store(&path);
        store.command_received(received(ID)).await.unwrap();
        // The last statement of the transaction (the actuator's last result) fails.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON actuators WHEN NEW.last_status IS NOT NULL
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
        )
        .unwrap();
        let actuator = Some(("pump-1".to_string(), running()));
        let err = store
            .command_result(result(ID, Status::Accepted), actuator.clone())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Commit(_)), "{err}");
        assert!(
            store.fetch(0, 10).await.unwrap().is_empty(),
            "no outbox row"
        );
        store.holding(None).await.unwrap();
        assert_eq!(
            store.commands_open().await.unwrap()[0].state,
            InboxState::Queued
        );
        assert!(store.actuator_states().await.unwrap().is_empty());
        // Once it can commit, all of it does.
        conn.execute_batch("DROP TRIGGER refuse;").unwrap();
        assert!(store
            .command_result(result(ID, Status::Accepted), actuator)
            .await
            .unwrap());
        assert_eq!(store.fetch(0, 10).await.unwrap().len(), 1);
        assert_eq!(
            store.commands_open().await.unwrap()[0].state,
            InboxState::Writing
        );
        assert_eq!(store.actuator_states().await.unwrap().len(), 1);
        close(store, thread).await;
    }

    #[tokio::test]
    async fn open_commands_and_actuator_states_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let ids = [
            "00000000-0000-4000-8000-000000000001",
            "00000000-0000-4000-8000-000000000002",
            "00000000-0000-4000-8000-000000000003",
        ];
        let (store, thread) = open_store(&path);
        for id in ids {
            store.command_received(received(id)).await.unwrap();
        }
        store
            .command_result(result(ids[1], Status::Expired), None)
            .await
            .unwrap();
        store
            .actuator_state("pump-1".into(), running())
            .await
            .unwrap();
        let off = Restored {
            off_since: Some(Timestamp::from_unix_millis(T0 + 9_000)),
            ..Restored::default()
        };
        store
            .actuator_state("valve-3".into(), off.clone())
            .await
            .unwrap();
        close(store, thread).await;

        let (store, thread) = open_store(&path);
        let open: Vec<String> = store
            .commands_open()
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.command_id)
            .collect();
        assert_eq!(open, vec![ids[0], ids[2]], "received order, done left out");
        assert_eq!(
            store.actuator_states().await.unwrap(),
            vec![("pump-1".into(), running()), ("valve-3".into(), off)]
        );
        close(store, thread).await;
    }

    /// A result's outbox seq, if it is still buffered.
    async fn result_seq(store: &StoreHandle) -> Option<u64> {
        let rows = store.fetch(0, 100_000).await.unwrap();
        store.holding(None).await.unwrap();
        rows.iter().find(|r| r.kind == KIND_RESULT).map(|r| r.seq)
    }

    #[tokio::test]
    async fn drop_oldest_takes_results_like_status_rows_outside_the_totals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let metrics = Arc::new(Metrics::new());
        let bound = bounded(3_000, crate::config::WhenFull::DropOldest);
        let (store, thread) = start(path.clone(), bound, 20.0, metrics.clone()).unwrap();
        store.command_received(received(ID)).await.unwrap();
        store
            .command_result(result(ID, Status::Accepted), None)
            .await
            .unwrap();
        assert!(result_seq(&store).await.is_some());
        for i in 0..60 {
            append(&store, message_reading(i)).await;
        }
        assert_eq!(result_seq(&store).await, None, "the oldest row went");
        assert!(metrics.dropped("buffer_full").get() > 0);
        close(store, thread).await;
        let c = totals_hold(&path);
        assert_eq!(c.accepted, 60, "the result is not a reading");
    }

    /// Reading `i` of a series at a 10-minute step.
    fn series(i: i64) -> crate::store::Append {
        one(series_reading(
            "a",
            crate::reading::SensorType::WaterLevel,
            i,
            10,
        ))
    }

    /// The store at `path` opened again bounded to `bytes` with `thin`, and the next reading
    /// of [`series`] (40) appended: one thinning.
    async fn thin_at(
        path: &std::path::Path,
        bytes: u64,
    ) -> (StoreHandle, std::thread::JoinHandle<()>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let bound = bounded(bytes, crate::config::WhenFull::Thin);
        let (store, thread) = start(path.to_path_buf(), bound, 20.0, metrics.clone()).unwrap();
        append(&store, series(40)).await;
        (store, thread, metrics)
    }

    #[tokio::test]
    async fn thinning_never_takes_a_result() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        // Readings at a 10-minute step, a result among the oldest of them.
        let (store, thread) = open_store(&path);
        for i in 0..40 {
            append(&store, series(i)).await;
            if i == 3 {
                store.command_received(received(ID)).await.unwrap();
                store
                    .command_result(result(ID, Status::Accepted), None)
                    .await
                    .unwrap();
            }
        }
        let seq = result_seq(&store).await;
        close(store, thread).await;
        let bytes = Inspector::open(&path).unwrap().stats().unwrap().bytes;
        let (store, thread, metrics) = thin_at(&path, bytes).await;
        assert!(metrics.dropped("thin").get() > 0, "a thinning round ran");
        assert_eq!(metrics.dropped("buffer_full").get(), 0);
        assert_eq!(result_seq(&store).await, seq, "the result stays");
        close(store, thread).await;
        totals_hold(&path);
    }

    /// The seqs of the heartbeats buffered.
    async fn heartbeat_seqs(store: &StoreHandle) -> Vec<u64> {
        let rows = store.fetch(0, 100_000).await.unwrap();
        store.holding(None).await.unwrap();
        let heartbeats = rows.iter().filter(|r| r.kind == KIND_HEARTBEAT);
        heartbeats.map(|r| r.seq).collect()
    }

    #[tokio::test]
    async fn heartbeats_stay_out_of_the_readings_and_thinning_halves_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let (store, thread) = open_store(&path);
        for i in 0..40 {
            append(&store, series(i)).await;
            assert!(store.heartbeat(b"{}".to_vec()).await.unwrap());
        }
        let all = heartbeat_seqs(&store).await;
        close(store, thread).await;
        let s = Inspector::open(&path).unwrap().stats().unwrap();
        assert_eq!((s.readings, s.heartbeats, all.len()), (40, 40, 40));
        // A day old by their store time, as after an outage.
        Connection::open(&path)
            .unwrap()
            .execute(
                "UPDATE outbox SET stored_ms = stored_ms - 86400000 WHERE kind = 4",
                [],
            )
            .unwrap();
        let (store, thread, metrics) = thin_at(&path, s.bytes).await;
        let left = heartbeat_seqs(&store).await;
        assert!(left.len() < all.len() && left[0] == all[0], "{left:?}");
        // Every other one at most: no two neighbours both went.
        let kept = |seq| left.contains(seq);
        assert!(
            all.windows(2).all(|w| kept(&w[0]) || kept(&w[1])),
            "{left:?}"
        );
        assert_eq!(metrics.dropped("buffer_full").get(), 0);
        close(store, thread).await;
        let c = totals_hold(&path);
        assert_eq!(c.accepted, 41, "heartbeats are not readings");
    }

    #[test]
    fn the_inbox_bound_takes_old_and_surplus_done_rows_never_open_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let mut conn = db::open(&path, crate::config::Synchronous::Normal, false)
            .unwrap()
            .conn;
        let tx = conn.transaction().unwrap();
        for i in 0..8 {
            let mut c = received(&format!("00000000-0000-4000-8000-00000000000{i}"));
            c.received_ms = T0 + i;
            db::commands::insert(&tx, &c).unwrap();
            if i % 4 != 0 {
                let state = InboxState::Done;
                let updated = if i == 7 { T0 - 1 } else { T0 + 100 };
                db::commands::set_status(&tx, &c.command_id, state, ("applied", None), updated)
                    .unwrap();
            }
        }
        // Open: 0 and 4. Done: 1, 2, 3, 5, 6, and 7, last updated before the cutoff.
        assert_eq!(db::commands::trim(&tx, T0, 5).unwrap(), 1 + 2);
        let left: Vec<String> = db::commands::newest(&tx, 10)
            .unwrap()
            .into_iter()
            .map(|c| c.command_id[35..].to_string())
            .collect();
        assert_eq!(left, vec!["6", "5", "4", "3", "0"]);
        // Open rows stay even beyond the bound.
        assert_eq!(db::commands::trim(&tx, T0, 0).unwrap(), 3);
        assert_eq!(db::commands::open(&tx).unwrap().len(), 2);
    }

    #[test]
    fn result_ids_are_stable_per_command_and_status_and_per_time_without_a_command() {
        let salt = [3u8; 16];
        let id = |r: &ResultRow| result_event_id(&salt, &r.result);
        let accepted = result(ID, Status::Accepted);
        assert_eq!(id(&accepted), id(&accepted.clone()));
        let mut later = accepted.clone();
        later.result.at = Timestamp::from_unix_millis(T0 + 60_000);
        assert_eq!(id(&accepted), id(&later), "the time does not matter");
        assert_ne!(id(&accepted), id(&result(ID, Status::Applied)));
        let removal = result("", Status::SwitchedOff);
        let mut other = removal.clone();
        other.result.at = later.result.at;
        assert_ne!(id(&removal), id(&other));
        assert_eq!(uuid::Uuid::from_bytes(id(&removal)).get_version_num(), 4);
    }
}
