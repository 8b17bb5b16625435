//! The outbox against a model queue (proptest): random interleavings of append, fetch (what the
//! forwarder publishes), ack, flush, restart and crash (the handle dropped with acks still
//! queued) must keep the queue's promises: seqs strictly increase and are never reused, a
//! row's `event_id` never changes, acknowledged rows never come back once their ack committed,
//! every unacknowledged row comes back in order, and nothing appears twice.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use sahool_gateway::common::metrics::Metrics;
use sahool_gateway::config::{Buffer, ByteSize, Synchronous};
use sahool_gateway::reading::{Reading, SensorType, Timestamp, KIND_READING};
use sahool_gateway::store::{self, Append, AppendOutcome, StoreHandle};

#[derive(Debug, Clone)]
enum Op {
    /// One source message with this many readings.
    Append(usize),
    /// The forwarder's read: up to this many rows after its cursor.
    Fetch(usize),
    /// Acknowledge the first this many rows of the last fetch (PubAcks arrive in order).
    Ack(usize),
    Flush,
    /// Clean stop and start.
    Restart,
    /// Handle dropped with acks queued and not awaited, then start.
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..4).prop_map(Op::Append),
        3 => (1usize..8).prop_map(Op::Fetch),
        3 => (0usize..8).prop_map(Op::Ack),
        1 => Just(Op::Flush),
        1 => Just(Op::Restart),
        1 => Just(Op::Crash),
    ]
}

/// A reading identified by `n` (its value), a distinct device observation each.
fn reading(n: u64) -> Reading {
    Reading {
        device_id: "probe".into(),
        field_id: "field".into(),
        tenant_id: "tenant".into(),
        sensor_type: SensorType::WaterLevel,
        value: n as f64,
        unit: "cm".into(),
        observed_at: Timestamp::from_unix_millis(1_780_287_300_000 + n as i64 * 1000),
        battery: None,
        rssi: None,
        raw_value: None,
        original_timestamp: None,
        device_time: true,
        stale_after_ms: 3_600_000,
        metadata: None,
    }
}

/// What the queue must hold: readings by seq, and what is known about their acks.
#[derive(Default)]
struct Model {
    /// seq → reading number, for readings not durably acknowledged.
    live: BTreeMap<u64, u64>,
    /// Acked, but the ack may not have committed yet (queued when a crash came).
    maybe_acked: BTreeMap<u64, u64>,
    /// Durably acknowledged: must never come back.
    gone: BTreeMap<u64, u64>,
    /// seq → event id, as first seen.
    ids: HashMap<u64, [u8; 16]>,
    /// Highest seq ever handed out (readings or status events).
    highest: u64,
    next_reading: u64,
    /// The forwarder's cursor and its last fetch.
    cursor: u64,
    fetched: Vec<u64>,
}

struct Store {
    handle: Option<StoreHandle>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn open(path: &Path) -> Store {
    let buffer = Buffer {
        min_free_disk: ByteSize(0),
        synchronous: Synchronous::Normal,
        ..Buffer::default()
    };
    let (handle, thread) =
        store::start(path.to_path_buf(), buffer, 20.0, Arc::new(Metrics::new())).expect("open");
    Store {
        handle: Some(handle),
        thread: Some(thread),
    }
}

impl Store {
    fn h(&self) -> &StoreHandle {
        self.handle.as_ref().expect("open store")
    }

    fn close(&mut self) {
        drop(self.handle.take());
        if let Some(t) = self.thread.take() {
            t.join().expect("store thread");
        }
    }
}

/// Reads every row after `after` and checks it against the model; returns the row seqs.
async fn check_rows(store: &Store, m: &mut Model, after: u64, limit: usize) -> Vec<u64> {
    let rows = store.h().fetch(after, limit).await.expect("fetch");
    let mut last = after;
    let mut readings = Vec::new();
    for row in &rows {
        assert!(row.seq > last, "seq {} after {last}", row.seq);
        last = row.seq;
        assert!(row.seq <= m.highest, "seq {} was never handed out", row.seq);
        let id = *m.ids.entry(row.seq).or_insert(row.event_id);
        assert_eq!(id, row.event_id, "event_id of seq {} changed", row.seq);
        if row.kind == KIND_READING {
            let r: Reading = postcard::from_bytes(&row.body).expect("decodes");
            readings.push((row.seq, r.value as u64));
        }
    }
    assert!(
        readings.iter().all(|(seq, _)| !m.gone.contains_key(seq)),
        "an acknowledged row came back: {readings:?} / gone {:?}",
        m.gone
    );
    // Unacknowledged readings come back, in order; a maybe-acknowledged one may or may not.
    let window_end = if rows.len() < limit { u64::MAX } else { last };
    let expected: Vec<(u64, u64)> = m
        .live
        .range(after + 1..=window_end)
        .map(|(s, n)| (*s, *n))
        .collect();
    let without_maybe: Vec<(u64, u64)> = readings
        .iter()
        .filter(|(s, _)| !m.maybe_acked.contains_key(s))
        .copied()
        .collect();
    assert_eq!(
        without_maybe, expected,
        "the unacknowledged readings, in order"
    );
    for (seq, n) in &readings {
        if let Some(n_maybe) = m.maybe_acked.get(seq) {
            assert_eq!(n, n_maybe);
        }
    }
    rows.iter().map(|r| r.seq).collect()
}

async fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    let mut store = open(&path);
    let mut m = Model::default();
    for op in ops {
        match op {
            Op::Append(k) => {
                let readings: Vec<Reading> = (0..k)
                    .map(|_| {
                        m.next_reading += 1;
                        reading(m.next_reading)
                    })
                    .collect();
                let numbers: Vec<u64> = readings.iter().map(|r| r.value as u64).collect();
                let rx = store
                    .h()
                    .append(Append {
                        readings,
                        ..Append::default()
                    })
                    .await
                    .expect("queue append");
                match rx.await.expect("reply").expect("commit") {
                    AppendOutcome::Stored { first_seq, count } => {
                        assert_eq!(count as usize, k);
                        assert!(first_seq > m.highest, "seq {first_seq} reused");
                        for (i, n) in numbers.into_iter().enumerate() {
                            m.live.insert(first_seq + i as u64, n);
                        }
                        m.highest = first_seq + count - 1;
                    }
                    other => panic!("append not stored: {other:?}"),
                }
                // Status events (a sensor's first reading) take seqs too.
                m.highest = m.highest.max(*store.h().committed().borrow());
            }
            Op::Fetch(limit) => {
                let after = m.cursor;
                m.fetched = check_rows(&store, &mut m, after, limit).await;
                if let Some(last) = m.fetched.last() {
                    m.cursor = *last;
                }
            }
            Op::Ack(j) => {
                let acked: Vec<u64> = m.fetched.drain(..j.min(m.fetched.len())).collect();
                for seq in &acked {
                    if let Some(n) = m.live.remove(seq) {
                        m.maybe_acked.insert(*seq, n);
                    }
                }
                // As the forwarder reports them: rows of one read are consecutive in the
                // buffer, so their acks form one run of seqs.
                let runs = match (acked.first(), acked.last()) {
                    (Some(first), Some(last)) => vec![*first..=*last],
                    _ => Vec::new(),
                };
                store.h().acked(runs).await.expect("queue ack");
            }
            Op::Flush => {
                store.h().flush().await.expect("flush");
                m.gone.append(&mut m.maybe_acked);
            }
            Op::Restart | Op::Crash => {
                if matches!(op, Op::Restart) {
                    store.h().flush().await.expect("flush");
                    m.gone.append(&mut m.maybe_acked);
                }
                store.close();
                store = open(&path);
                // A new forwarder starts from the beginning.
                m.cursor = 0;
                m.fetched.clear();
                let all = check_rows(&store, &mut m, 0, usize::MAX >> 1).await;
                // What a crash left unsure is now settled either way.
                let present: std::collections::HashSet<u64> = all.into_iter().collect();
                let maybe = std::mem::take(&mut m.maybe_acked);
                for (seq, n) in maybe {
                    if present.contains(&seq) {
                        m.live.insert(seq, n);
                    } else {
                        m.gone.insert(seq, n);
                    }
                }
            }
        }
    }
    store.h().flush().await.expect("flush");
    m.gone.append(&mut m.maybe_acked);
    check_rows(&store, &mut m, 0, usize::MAX >> 1).await;
    store.close();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_outbox_behaves_like_a_queue(ops in proptest::collection::vec(op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(run(ops));
    }
}
