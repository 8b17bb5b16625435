//! `dead-letters replay` inside the store: kept messages mapped again, their readings appended
//! and their dead-letters deleted in one transaction of the owner thread.
//!
//! Why here and not in the CLI: the owner thread numbers rows and keeps the buffer's totals
//! (invariant 1), so a replay is one more command on its queue. Deleting the dead-letters in
//! the transaction that appends their readings, and skipping rows already gone, is what makes a
//! second replay, or one racing another, unable to store a reading twice.
//!
//! Rows are replayed per message: every dead-letter one message left (same source, topic,
//! receive time and raw bytes) is taken together, also those the filter did not select, so the
//! message is mapped and stored once. Rows that name the reading they refused (a device, and a
//! type when one was) take only those readings: the message was stored in part the first time,
//! and its other readings carry no key that would stop a second copy. The group takes the union
//! of its rows' readings, or the whole message when any row refused it whole. A message is
//! stored only when the current mapping accepts what the group takes; otherwise its rows stay
//! as they are.

use std::collections::{BTreeMap, HashSet};

use rusqlite::Transaction;
use serde::{Deserialize, Serialize};

use super::delta::Delta;
use super::transaction::{record_totals, PerRow};
use super::writer::Writer;
use super::{db, Append, AppendOutcome, DeadLetterRow, StoreError};
use crate::ingest::mapping::Mapped;
use crate::reading::{Reading, SensorType};

/// Which dead-letters a replay takes (all when every field is empty), oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplayFilter {
    /// A reason label, e.g. `unknown_device`.
    pub reason: Option<String>,
    /// A source name: an `[[mqtt]]` source, an `[[mqtt_listener]]`, a `[[serial]]` port.
    pub source: Option<String>,
    /// Kept at or after this time (Unix milliseconds).
    pub since_ms: Option<i64>,
    /// At most this many selected rows (rows of the same message come along on top).
    pub limit: Option<u64>,
    /// Report what would happen; change nothing.
    pub dry_run: bool,
}

/// What the mapping in force makes of one kept message.
#[derive(Debug)]
pub enum Replayed {
    /// Mapped again. Readings without a device timestamp carry the row's receive time.
    Mapped(Mapped),
    /// Cannot be replayed, and why (a bus fault, an event already rendered, a removed source).
    Skip(String),
}

/// Maps a dead-letter's message again; [`crate::replay::Plan`] in the gateway.
pub trait ReplayMapper: Send + Sync {
    fn map(&self, row: &DeadLetterRow) -> Replayed;
}

/// What a replay did (or, dry, would do), per reason of the rows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplayReport {
    pub dry_run: bool,
    pub reasons: BTreeMap<String, ReasonReport>,
    /// Stopped early: the buffer refused readings (full with `reject_new`, or the disk
    /// reserve). The rows not reached are kept and not counted.
    pub buffer_full: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReasonReport {
    /// Rows whose message was stored; deleted.
    pub replayed: u64,
    /// Readings stored from those messages (repeats of stored observations not counted).
    pub readings: u64,
    /// Rows whose message the current mapping still rejects; kept unchanged.
    pub(crate) still_rejected: u64,
    /// One of the current rejections, to show what is still wrong.
    pub example: Option<String>,
    /// Rows not replayable, by why; kept.
    pub(crate) skipped: BTreeMap<String, u64>,
}

impl ReplayReport {
    fn reason(&mut self, label: &str) -> &mut ReasonReport {
        self.reasons.entry(label.to_string()).or_default()
    }

    /// Rows of a message that cannot be replayed, counted by why.
    fn skipped(&mut self, group: &[DeadLetterRow], why: &str) {
        for r in group {
            *self
                .reason(&r.reason)
                .skipped
                .entry(why.to_string())
                .or_default() += 1;
        }
    }

    /// Rows of a message the current mapping still rejects, with one rejection to show.
    fn still_rejected(&mut self, group: &[DeadLetterRow], example: &str) {
        for r in group {
            let entry = self.reason(&r.reason);
            entry.still_rejected += 1;
            entry.example.get_or_insert_with(|| example.to_string());
        }
    }
}

impl Writer {
    /// Runs a replay in its own transaction; dry, the transaction is rolled back and the
    /// totals stay as they were.
    pub(super) fn replay(
        &mut self,
        filter: &ReplayFilter,
        mapper: &dyn ReplayMapper,
    ) -> Result<ReplayReport, StoreError> {
        let mut delta = Delta::numbering_from(self.next_seq);
        let report = self.replay_in(filter, mapper, &mut delta);
        match report {
            Ok(report) => {
                if !filter.dry_run {
                    self.apply(&delta);
                    let replayed: u64 = report.reasons.values().map(|r| r.replayed).sum();
                    let readings: u64 = report.reasons.values().map(|r| r.readings).sum();
                    tracing::info!(dead_letters = replayed, readings, "dead-letters replayed");
                }
                Ok(report)
            }
            Err(e) => {
                tracing::error!(error = %e, file = %self.path.display(), "dead-letter replay failed; nothing changed");
                Err(e)
            }
        }
    }

    /// The replay's transaction: each selected message once, then the status events and
    /// totals; committed unless dry.
    fn replay_in(
        &mut self,
        filter: &ReplayFilter,
        mapper: &dyn ReplayMapper,
        delta: &mut Delta,
    ) -> Result<ReplayReport, StoreError> {
        let sqlite = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let tx = self.conn.unchecked_transaction().map_err(sqlite)?;
        let now = db::now_ms();
        let mut report = ReplayReport {
            dry_run: filter.dry_run,
            ..ReplayReport::default()
        };
        let mut stored: Vec<Reading> = Vec::new();
        let selected = db::dead_letter::selected(&tx, filter).map_err(sqlite)?;
        let mut done: HashSet<i64> = HashSet::new();
        for row in &selected {
            if done.contains(&row.id) {
                continue;
            }
            let group = db::dead_letter::of_message(&tx, row).map_err(sqlite)?;
            done.extend(group.iter().map(|r| r.id));
            let message = Message {
                row,
                group: &group,
                now,
            };
            match self.replay_message(&tx, &message, mapper, &mut report, delta) {
                Ok(Some(readings)) => stored.extend(readings),
                Ok(None) => {}
                Err(Stop::BufferFull) => {
                    report.buffer_full = true;
                    break;
                }
                Err(Stop::Sqlite(e)) => return Err(sqlite(e)),
            }
        }
        let stored: Vec<&Reading> = stored.iter().collect();
        self.status_and_seq(&tx, &stored, now, false, delta)
            .map_err(sqlite)?;
        record_totals(&tx, delta).map_err(sqlite)?;
        if filter.dry_run {
            // Dropping the transaction rolls it back.
            return Ok(report);
        }
        // Invariant 2: seq.floor covers every seq before the commit that hands it out.
        self.floor
            .ensure(delta.next_seq)
            .map_err(|e| StoreError::Commit(format!("seq.floor: {e}")))?;
        tx.commit().map_err(sqlite)?;
        Ok(report)
    }

    /// One kept message: mapped again and, if the current mapping accepts what its rows take,
    /// its readings stored and its rows deleted. Returns the readings stored (`None`: the
    /// message stays as it is, counted in `report`).
    fn replay_message(
        &self,
        tx: &Transaction<'_>,
        message: &Message<'_>,
        mapper: &dyn ReplayMapper,
        report: &mut ReplayReport,
        delta: &mut Delta,
    ) -> Result<Option<Vec<Reading>>, Stop> {
        let group = message.group;
        let mapped = match mapper.map(message.row) {
            Replayed::Skip(why) => {
                report.skipped(group, &why);
                return Ok(None);
            }
            Replayed::Mapped(m) => m,
        };
        let takes = Takes::of(group);
        if let Some(example) = takes.still_rejected(&mapped) {
            report.still_rejected(group, &example);
            return Ok(None);
        }
        let readings: Vec<Reading> = mapped
            .readings
            .into_iter()
            .filter(|r| takes.reading(&r.device_id, Some(r.sensor_type.as_str())))
            .collect();
        if readings.is_empty() {
            report.skipped(group, "the message holds no reading to store");
            return Ok(None);
        }
        let append = Append {
            readings,
            ..Append::default()
        };
        let mut rows = PerRow::prepare(tx)?;
        let count = match self
            .append_one(tx, &mut rows, &append, message.now, delta)?
            .0
        {
            AppendOutcome::Stored { count, .. } => count,
            AppendOutcome::Full => return Err(Stop::BufferFull),
            // No message or frame key: never a duplicate message.
            AppendOutcome::Duplicate => 0,
        };
        db::dead_letter::delete(tx, group)?;
        delta.dead_letters_removed += group.len() as u64;
        report.reason(&message.row.reason).readings += count;
        for r in group {
            report.reason(&r.reason).replayed += 1;
        }
        Ok(Some(append.readings))
    }
}

/// A kept message: the row that selected it and every row it left, at `now`.
struct Message<'a> {
    row: &'a DeadLetterRow,
    group: &'a [DeadLetterRow],
    now: i64,
}

/// Why a replay ends before its last message.
enum Stop {
    /// The buffer refused readings: the rows not reached are kept.
    BufferFull,
    Sqlite(rusqlite::Error),
}

impl From<rusqlite::Error> for Stop {
    fn from(e: rusqlite::Error) -> Self {
        Stop::Sqlite(e)
    }
}

/// What a message's rows refused, so what a replay of it takes: `None`, the whole message
/// (one of the rows refused it whole); else the readings of these (device, type) pairs.
struct Takes<'a>(Option<Vec<(&'a str, Option<&'a str>)>>);

impl<'a> Takes<'a> {
    fn of(group: &'a [DeadLetterRow]) -> Self {
        Self(
            group
                .iter()
                .map(|r| Some((r.device.as_deref()?, r.sensor_type.as_deref())))
                .collect(),
        )
    }

    /// A type missing on either side stands for every type of the device.
    fn reading(&self, device: &str, sensor_type: Option<&str>) -> bool {
        self.0.as_ref().is_none_or(|ids| {
            ids.iter().any(|(d, t)| {
                *d == device && (t.is_none() || sensor_type.is_none() || *t == sensor_type)
            })
        })
    }

    /// The first rejection of what the replay takes, as an example for the report.
    /// Rejections of readings stored the first time do not hold the others back.
    fn still_rejected(&self, mapped: &Mapped) -> Option<String> {
        let first = mapped.rejections.iter().find(|r| {
            r.refused
                .as_ref()
                .is_none_or(|i| self.reading(&i.device, i.sensor_type.map(SensorType::as_str)))
        })?;
        Some(format!("{}: {}", first.reason.label(), first.detail))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::common::metrics::Metrics;
    use crate::config::Buffer;
    use crate::ingest::mapping::{Reason, Rejection};
    use crate::reading::{SensorType, Timestamp, KIND_READING};
    use crate::store::{start, NewDeadLetter, StoreHandle};

    /// Raw bytes `device=value,device/type=value` (type `water_level` unless given); `bad` is
    /// still rejected, and so is a pair whose device ends in `!` (naming its reading); source
    /// `bus` is not replayable. Readings carry no device time, so only the deleted rows keep
    /// them single.
    struct Lines;

    impl ReplayMapper for Lines {
        fn map(&self, row: &DeadLetterRow) -> Replayed {
            if row.source == "bus" {
                return Replayed::Skip("a bus fault".into());
            }
            let text = String::from_utf8_lossy(&row.raw);
            if text == "bad" {
                return Replayed::Mapped(Mapped {
                    readings: vec![],
                    rejections: vec![Rejection::new(Reason::OutOfRange, "still out of range")],
                });
            }
            let mut out = Mapped::default();
            for (key, value) in text.split(',').filter_map(|pair| pair.split_once('=')) {
                let (device, sensor_type) = match key.split_once('/') {
                    Some((d, t)) => (d, SensorType::from_name(t).unwrap()),
                    None => (key, SensorType::WaterLevel),
                };
                if let Some(device) = device.strip_suffix('!') {
                    let refused = Rejection::new(Reason::OutOfRange, "still out of range");
                    out.rejections.push(refused.of(device, Some(sensor_type)));
                    continue;
                }
                out.readings.push(Reading {
                    device_id: device.into(),
                    field_id: "field-1".into(),
                    tenant_id: "tenant-a".into(),
                    sensor_type,
                    value: value.parse().unwrap_or(0.0),
                    unit: "cm".into(),
                    observed_at: Timestamp::from_unix_millis(row.at_ms),
                    battery: None,
                    rssi: None,
                    raw_value: None,
                    original_timestamp: None,
                    device_time: false,
                    stale_after_ms: 3_600_000,
                    metadata: None,
                });
            }
            Replayed::Mapped(out)
        }
    }

    fn letter(source: &str, reason: Reason, raw: &str, device: Option<&str>) -> NewDeadLetter {
        NewDeadLetter {
            source: source.into(),
            reason,
            detail: format!("test: {raw}"),
            raw: Arc::from(raw.as_bytes()),
            topic: Some("t/1".into()),
            device: device.map(String::from),
            sensor_type: None,
        }
    }

    /// One message's dead-letters, committed together as intake does.
    async fn reject(store: &StoreHandle, letters: Vec<NewDeadLetter>) {
        let append = Append {
            dead_letters: letters,
            ..Append::default()
        };
        store.append(append).await.unwrap().await.unwrap().unwrap();
    }

    async fn replay(store: &StoreHandle, filter: ReplayFilter) -> ReplayReport {
        store.replay(filter, Arc::new(Lines)).await.unwrap()
    }

    /// Buffered reading values, in seq order.
    async fn values(store: &StoreHandle) -> Vec<f64> {
        store
            .fetch(0, 1000)
            .await
            .unwrap()
            .iter()
            .filter(|r| r.kind == KIND_READING)
            .map(|r| postcard::from_bytes::<Reading>(&r.body).unwrap().value)
            .collect()
    }

    async fn reasons_left(store: &StoreHandle, path: &std::path::Path) -> Vec<String> {
        store.flush().await.unwrap();
        let conn = db::open_read_only(path).unwrap();
        let mut left: Vec<String> = db::dead_letters(&conn, 100)
            .unwrap()
            .into_iter()
            .map(|d| format!("{} {}", d.source, d.reason))
            .collect();
        left.sort();
        left
    }

    fn setup() -> (tempfile::TempDir, std::path::PathBuf, Arc<Metrics>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        (dir, path, Arc::new(Metrics::new()))
    }

    #[tokio::test]
    async fn replays_once_keeps_what_is_still_rejected_and_what_is_not_replayable() {
        let (_dir, path, metrics) = setup();
        let (store, _thread) =
            start(path.clone(), Buffer::default(), 20.0, metrics.clone()).unwrap();
        reject(
            &store,
            vec![letter("farm", Reason::UnknownDevice, "a=1", None)],
        )
        .await;
        reject(
            &store,
            vec![letter("farm", Reason::UnknownDevice, "a=2,b=3", None)],
        )
        .await;
        reject(
            &store,
            vec![letter("farm", Reason::OutOfRange, "bad", None)],
        )
        .await;
        reject(&store, vec![letter("bus", Reason::Malformed, "crc", None)]).await;

        let dry = replay(
            &store,
            ReplayFilter {
                dry_run: true,
                ..ReplayFilter::default()
            },
        )
        .await;
        assert!(dry.dry_run);
        assert!(values(&store).await.is_empty(), "a dry run stores nothing");
        assert_eq!(
            reasons_left(&store, &path).await.len(),
            4,
            "and deletes nothing"
        );

        let done = replay(&store, ReplayFilter::default()).await;
        assert_eq!(
            ReplayReport {
                dry_run: true,
                ..done.clone()
            },
            dry,
            "dry says what happens"
        );
        let unknown = &done.reasons["unknown_device"];
        assert_eq!((unknown.replayed, unknown.readings), (2, 3));
        let rejected = &done.reasons["out_of_range"];
        assert_eq!(rejected.still_rejected, 1);
        assert_eq!(
            rejected.example.as_deref(),
            Some("out_of_range: still out of range")
        );
        assert_eq!(done.reasons["malformed"].skipped["a bus fault"], 1);
        assert_eq!(values(&store).await, vec![1.0, 2.0, 3.0]);
        assert_eq!(
            reasons_left(&store, &path).await,
            vec!["bus malformed", "farm out_of_range"]
        );
        assert_eq!(metrics.dead_letters.get(), 2);
        assert_eq!(metrics.buffer_readings.get(), 3);

        // Again: the replayed rows are gone, nothing is stored twice.
        let again = replay(&store, ReplayFilter::default()).await;
        assert!(!again.reasons.contains_key("unknown_device"));
        assert_eq!(values(&store).await, vec![1.0, 2.0, 3.0]);
    }

    #[tokio::test]
    async fn rows_of_one_message_are_replayed_together_and_a_named_device_takes_only_its_readings()
    {
        let (_dir, path, metrics) = setup();
        let (store, _thread) = start(path.clone(), Buffer::default(), 20.0, metrics).unwrap();
        // b and c of one message were rate limited (a was stored the first time).
        reject(
            &store,
            vec![
                letter("farm", Reason::RateLimited, "a=1,b=2,c=3", Some("b")),
                letter("farm", Reason::RateLimited, "a=1,b=2,c=3", Some("c")),
            ],
        )
        .await;
        // Two rejections of one message, only one of them selected by the filter.
        reject(
            &store,
            vec![
                letter("farm", Reason::UnknownDevice, "d=4", None),
                letter("farm", Reason::UnknownSensorType, "d=4", None),
            ],
        )
        .await;
        let report = replay(
            &store,
            ReplayFilter {
                reason: Some("rate_limited".into()),
                limit: Some(1),
                ..ReplayFilter::default()
            },
        )
        .await;
        assert_eq!(report.reasons["rate_limited"].replayed, 2);
        assert_eq!(
            values(&store).await,
            vec![2.0, 3.0],
            "a is not stored again"
        );
        let report = replay(
            &store,
            ReplayFilter {
                reason: Some("unknown_device".into()),
                ..ReplayFilter::default()
            },
        )
        .await;
        assert_eq!(report.reasons["unknown_device"].replayed, 1);
        assert_eq!(report.reasons["unknown_sensor_type"].replayed, 1);
        assert_eq!(
            values(&store).await,
            vec![2.0, 3.0, 4.0],
            "the message once"
        );
        assert!(reasons_left(&store, &path).await.is_empty());
    }

    /// A message stored in part the first time: its rows name the readings refused, and a
    /// replay takes their union and nothing else, unless a row refused the message whole.
    #[tokio::test]
    async fn a_message_stored_in_part_replays_only_the_readings_its_rows_name() {
        let (_dir, path, metrics) = setup();
        let (store, _thread) = start(path.clone(), Buffer::default(), 20.0, metrics).unwrap();
        let of_type = |raw: &str, device: &str, sensor_type| NewDeadLetter {
            sensor_type,
            ..letter("farm", Reason::UnknownSensorType, raw, Some(device))
        };
        let moisture = Some(SensorType::SoilMoisture);
        // a and b's water level were stored; b's moisture and all of c's were refused.
        let partial = "a=1,b/soil_moisture=20,b=3,c=4";
        reject(
            &store,
            vec![
                of_type(partial, "b", moisture),
                letter("farm", Reason::RateLimited, partial, Some("c")),
            ],
        )
        .await;
        // One row refused the message whole: all of it.
        let whole = "d=5,e/soil_moisture=6";
        reject(
            &store,
            vec![
                of_type(whole, "e", moisture),
                letter("farm", Reason::Malformed, whole, None),
            ],
        )
        .await;
        // f's reading (refused) maps now; g's (stored, now refused) does not hold it back.
        reject(
            &store,
            vec![of_type("f/soil_moisture=7,g!=8", "f", moisture)],
        )
        .await;
        // h's refused reading is still refused: kept.
        reject(
            &store,
            vec![letter("farm", Reason::OutOfRange, "i=9,h!=10", Some("h"))],
        )
        .await;

        let report = replay(&store, ReplayFilter::default()).await;
        assert_eq!(values(&store).await, vec![20.0, 4.0, 5.0, 6.0, 7.0]);
        assert_eq!(report.reasons["unknown_sensor_type"].replayed, 3);
        assert_eq!(report.reasons["out_of_range"].still_rejected, 1);
        assert_eq!(reasons_left(&store, &path).await, vec!["farm out_of_range"]);
    }

    #[tokio::test]
    async fn filters_select_by_reason_source_and_time() {
        let (_dir, path, metrics) = setup();
        let (store, _thread) = start(path.clone(), Buffer::default(), 20.0, metrics).unwrap();
        reject(
            &store,
            vec![letter("farm", Reason::UnknownDevice, "a=1", None)],
        )
        .await;
        reject(
            &store,
            vec![letter("yard", Reason::UnknownDevice, "a=2", None)],
        )
        .await;
        reject(
            &store,
            vec![letter("farm", Reason::OutOfRange, "a=3", None)],
        )
        .await;
        let by = |reason: Option<&str>, source: Option<&str>, since_ms| ReplayFilter {
            reason: reason.map(String::from),
            source: source.map(String::from),
            since_ms,
            ..ReplayFilter::default()
        };
        let future = db::now_ms() + 60_000;
        replay(&store, by(None, None, Some(future))).await;
        assert!(
            values(&store).await.is_empty(),
            "nothing kept since a minute from now"
        );
        replay(&store, by(Some("unknown_device"), Some("yard"), None)).await;
        assert_eq!(values(&store).await, vec![2.0]);
        replay(&store, by(None, Some("farm"), Some(0))).await;
        assert_eq!(values(&store).await, vec![2.0, 1.0, 3.0]);
    }

    #[tokio::test]
    async fn a_full_buffer_stops_the_replay_and_keeps_the_rows() {
        let (_dir, path, metrics) = setup();
        let buffer = Buffer {
            max_bytes: crate::config::ByteSize(1),
            when_full: crate::config::WhenFull::RejectNew,
            min_free_disk: crate::config::ByteSize(0),
            ..Buffer::default()
        };
        let (store, _thread) = start(path.clone(), buffer, 20.0, metrics).unwrap();
        reject(
            &store,
            vec![letter("farm", Reason::UnknownDevice, "a=1", None)],
        )
        .await;
        let report = replay(&store, ReplayFilter::default()).await;
        assert!(report.buffer_full);
        assert!(values(&store).await.is_empty());
        assert_eq!(
            reasons_left(&store, &path).await,
            vec!["farm unknown_device"]
        );
    }
}
