//! The `frames` engine over real pseudo-terminal pairs, with simulated firmware nodes on the
//! far end and a sink that commits to a real store: acks only after the commit, resends acked
//! again but stored once (also across a restart), garbage dead-lettered and never acked, a
//! full buffer withholding acks until there is room.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sahool_gateway::common::metrics::Metrics;
use sahool_gateway::config::{Buffer, ByteSize, WhenFull};
use sahool_gateway::reading::{Reading, SensorType, Timestamp, KIND_READING};
use sahool_gateway::sources::serial::frames::{self, BadFrame, FrameSink, ReadingFrame};
use sahool_gateway::store::{
    self, db, Append, AppendOutcome, NewDeadLetter, StoreHandle, FRAME_WINDOW,
};
use sahool_wire::AckStatus;
use support::sim_node::{reading_frame, NodeSpec, SimNode};
use tokio_serial::SerialStream;

const PORT: &str = "frames-1";
const WAIT: Duration = Duration::from_secs(60);

struct Store {
    handle: StoreHandle,
    thread: std::thread::JoinHandle<()>,
    path: PathBuf,
}

fn open_store(dir: &Path, buffer: Buffer) -> Store {
    let path = dir.join("buffer.db");
    let (handle, thread) =
        store::start(path.clone(), buffer, 20.0, Arc::new(Metrics::new())).unwrap();
    Store {
        handle,
        thread,
        path,
    }
}

impl Store {
    /// Every buffered reading as `(node device id, seq, sensor type, value)`.
    async fn readings(&self) -> Vec<(String, u32, SensorType, f64)> {
        self.handle
            .fetch(0, 1_000_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|row| row.kind == KIND_READING)
            .map(|row| {
                let r: Reading = postcard::from_bytes(&row.body).unwrap();
                (
                    r.device_id,
                    r.raw_value.unwrap() as u32,
                    r.sensor_type,
                    r.value,
                )
            })
            .collect()
    }

    /// Stops the writer: every handle gone, then its thread joined.
    fn close(self, others: Vec<StoreHandle>) {
        drop(others);
        drop(self.handle);
        self.thread.join().unwrap();
    }
}

/// What the sink saw, shared with the test.
#[derive(Default)]
struct Seen {
    /// `(node, seq, outcome)` of every commit the store answered, in order.
    outcomes: Vec<(u32, u32, AppendOutcome)>,
    /// `(label, raw, keep)` of every bad frame.
    bad: Vec<(&'static str, Vec<u8>, bool)>,
    commit_calls: u32,
}

/// Maps each value to a reading of device `node-{node}` (channel c → the c-th sensor type,
/// seq in `raw_value`) and commits it to a real store with the frame's key. Optionally holds
/// commits until permitted, or fails the first few.
#[derive(Clone)]
struct StoreSink {
    store: StoreHandle,
    seen: Arc<Mutex<Seen>>,
    gate: Option<Arc<tokio::sync::Semaphore>>,
    fail_next: Arc<AtomicU32>,
}

impl StoreSink {
    fn new(store: &StoreHandle) -> Self {
        Self {
            store: store.clone(),
            seen: Arc::default(),
            gate: None,
            fail_next: Arc::default(),
        }
    }

    fn committed(&self, node: u32, seq: u32) -> bool {
        self.seen.lock().unwrap().outcomes.iter().any(|(n, s, o)| {
            (*n, *s) == (node, seq)
                && matches!(o, AppendOutcome::Stored { .. } | AppendOutcome::Duplicate)
        })
    }
}

impl FrameSink for StoreSink {
    type Error = String;

    async fn commit(&mut self, frame: &ReadingFrame<'_>) -> Result<AppendOutcome, String> {
        self.seen.lock().unwrap().commit_calls += 1;
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        if self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err("simulated commit failure".into());
        }
        let readings = frame
            .values
            .iter()
            .map(|v| Reading {
                device_id: format!("node-{}", frame.node),
                field_id: "field-1".into(),
                tenant_id: "tenant-a".into(),
                sensor_type: SensorType::ALL[usize::from(v.channel) % SensorType::ALL.len()],
                value: f64::from(v.value),
                unit: "%".into(),
                observed_at: Timestamp::now(),
                battery: frame.battery.map(f64::from),
                rssi: None,
                raw_value: Some(f64::from(frame.seq)),
                original_timestamp: None,
                device_time: false,
                stale_after_ms: 600_000,
                metadata: None,
            })
            .collect();
        let append = Append {
            readings,
            frame_key: Some(frame.key),
            ..Append::default()
        };
        let reply = self.store.append(append).await.map_err(|e| e.to_string())?;
        let outcome = reply
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        self.seen
            .lock()
            .unwrap()
            .outcomes
            .push((frame.node, frame.seq, outcome));
        Ok(outcome)
    }

    async fn bad_frame(&mut self, bad: &BadFrame<'_>) -> Result<(), String> {
        self.seen
            .lock()
            .unwrap()
            .bad
            .push((bad.error.label(), bad.raw.to_vec(), bad.keep));
        if !bad.keep {
            return Ok(());
        }
        let append = Append {
            dead_letters: vec![NewDeadLetter {
                source: PORT.into(),
                reason: bad.reason(),
                detail: bad.detail(),
                raw: bad.raw.into(),
                topic: None,
                device: None,
                sensor_type: None,
            }],
            ..Append::default()
        };
        let reply = self.store.append(append).await.map_err(|e| e.to_string())?;
        reply
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// A store, a sink on it, and the engine serving one pty pair at a time.
struct Rig {
    store: Store,
    sink: StoreSink,
    engine: Option<tokio::task::JoinHandle<()>>,
}

impl Rig {
    fn open(dir: &Path, buffer: Buffer) -> Self {
        let store = open_store(dir, buffer);
        let sink = StoreSink::new(&store.handle);
        Self {
            store,
            sink,
            engine: None,
        }
    }

    /// Serves a new pty pair, the engine on the gateway's end (as on a serial device), and
    /// returns the node's end. An engine serving an earlier pair is stopped.
    fn connect(&mut self) -> SerialStream {
        let (node_end, gateway_end) = SerialStream::pair().expect("a pseudo-terminal pair");
        self.serve(gateway_end);
        node_end
    }

    /// Runs the engine on `port`, stopping one already running.
    fn serve(&mut self, port: SerialStream) {
        self.stop();
        let mut sink = self.sink.clone();
        self.engine = Some(tokio::spawn(async move {
            let _ = frames::run(PORT, port, &mut sink).await;
        }));
    }

    /// Stops the engine, closing its end of the line.
    fn stop(&mut self) {
        if let Some(engine) = self.engine.take() {
            engine.abort();
        }
    }

    /// Stops the engine, then the store.
    async fn close(mut self) {
        if let Some(engine) = self.engine.take() {
            engine.abort();
            let _ = engine.await;
        }
        self.store.close(vec![self.sink.store]);
    }
}

/// Asserts that the store holds every value of `seqs` sent by `spec` exactly once.
fn assert_stored_once(
    stored: &[(String, u32, SensorType, f64)],
    spec: &NodeSpec,
    seqs: impl IntoIterator<Item = u32>,
) {
    let device = format!("node-{}", spec.id);
    let mut count: BTreeMap<(u32, SensorType), (usize, f64)> = BTreeMap::new();
    for (d, seq, t, v) in stored {
        if *d == device {
            let e = count.entry((*seq, *t)).or_insert((0, *v));
            e.0 += 1;
        }
    }
    for seq in seqs {
        for channel in 0..spec.channels {
            let t = SensorType::ALL[usize::from(channel)];
            let (n, v) = count.get(&(seq, t)).copied().unwrap_or((0, f64::NAN));
            assert_eq!(
                n, 1,
                "node {} seq {seq} channel {channel} stored {n} times",
                spec.id
            );
            assert_eq!(v, f64::from(spec.value(seq, channel)));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_after_lost_acks_are_acked_again_but_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = Rig::open(dir.path(), Buffer::default());
    let spec = NodeSpec {
        id: 7,
        readings: 40,
        channels: 3,
        resend_after: Duration::from_millis(300),
        lose_first_ack_every: Some(3),
        ..NodeSpec::default()
    };
    let node = SimNode::start(rig.connect(), spec.clone());
    node.wait_done(WAIT).await;

    let state = node.state();
    assert_eq!(
        state.acks_lost, 14,
        "seqs 0, 3, ..., 39 lost their first ack"
    );
    for (seq, status) in &state.acked {
        // The gateway sends one Stored ack per frame, for its first commit; that is the ack
        // the node lost for every third seq, so those were settled by the resend's ack.
        let want = if seq % 3 == 0 {
            AckStatus::Duplicate
        } else {
            AckStatus::Stored
        };
        assert_eq!(*status, want, "seq {seq}");
    }
    let stored = rig.store.readings().await;
    assert_eq!(stored.len(), 40 * 3);
    assert_stored_once(&stored, &spec, 0..40);
    let seen = rig.sink.seen.lock().unwrap();
    let stored_outcomes = seen
        .outcomes
        .iter()
        .filter(|(_, _, o)| matches!(o, AppendOutcome::Stored { .. }))
        .count();
    assert_eq!(stored_outcomes, 40);
    assert!(seen.bad.is_empty(), "{:?}", seen.bad);
    drop(seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_line_is_dead_lettered_never_acked_and_frames_still_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = Rig::open(dir.path(), Buffer::default());
    let spec = NodeSpec {
        id: 3,
        readings: 24,
        garbage_every: Some(2),
        resend_after: Duration::from_millis(300),
        with_time: true,
        ..NodeSpec::default()
    };
    let node = SimNode::start(rig.connect(), spec.clone());
    node.wait_done(WAIT).await;

    let stored = rig.store.readings().await;
    assert_eq!(stored.len(), 24 * 2);
    assert_stored_once(&stored, &spec, 0..24);

    // 12 pieces of garbage, four kinds in turn (see sim_node::garbage_for), each one bad frame.
    assert_eq!(node.state().garbage_sent, 12);
    let seen = rig.sink.seen.lock().unwrap();
    let mut labels: Vec<&str> = seen.bad.iter().map(|(l, _, _)| *l).collect();
    labels.sort_unstable();
    labels.dedup();
    for kind in ["crc", "overlong", "cobs"] {
        assert!(labels.contains(&kind), "{labels:?}");
    }
    assert_eq!(seen.bad.len(), 12, "{:?}", seen.bad);
    assert!(seen
        .bad
        .iter()
        .all(|(_, raw, keep)| *keep && !raw.is_empty()));
    drop(seen);

    let conn = db::open_read_only(&rig.store.path).unwrap();
    let letters = db::dead_letters(&conn, 100).unwrap();
    assert_eq!(letters.len(), 12);
    let reasons: Vec<&str> = letters.iter().map(|l| l.reason.as_str()).collect();
    assert!(reasons.contains(&"oversized") && reasons.contains(&"malformed"));
    assert!(letters
        .iter()
        .all(|l| l.source == PORT && !l.raw.is_empty() && l.detail.starts_with("bad frame")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_before_the_commit_and_none_for_a_failed_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = Rig::open(dir.path(), Buffer::default());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    rig.sink.gate = Some(gate.clone());
    rig.sink.fail_next.store(3, Ordering::SeqCst);

    // Every ack the node accepts must be for a frame the store had already answered.
    let early = Arc::new(Mutex::new(Vec::new()));
    let (check, record) = (rig.sink.clone(), early.clone());
    let spec = NodeSpec {
        id: 11,
        readings: 5,
        resend_after: Duration::from_millis(200),
        on_ack: Some(Arc::new(move |seq| {
            if !check.committed(11, seq) {
                record.lock().unwrap().push(seq);
            }
        })),
        ..NodeSpec::default()
    };
    let node = SimNode::start(rig.connect(), spec.clone());

    // The engine is inside a commit that cannot finish: nothing is acked, nothing stored,
    // while the node keeps resending.
    node.wait_for("resending", WAIT, |s| s.resends >= 3).await;
    assert!(rig.sink.seen.lock().unwrap().commit_calls >= 1);
    assert!(node.state().acked.is_empty());
    assert!(rig.store.readings().await.is_empty());

    // Open the gate: the first three commits fail (no ack), the resends get through.
    gate.add_permits(1_000_000);
    node.wait_done(WAIT).await;
    assert!(
        early.lock().unwrap().is_empty(),
        "acked before commit: {early:?}"
    );
    assert_eq!(rig.sink.fail_next.load(Ordering::SeqCst), 0);
    let stored = rig.store.readings().await;
    assert_eq!(stored.len(), 5 * 2);
    assert_stored_once(&stored, &spec, 0..5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_withholds_acks_until_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = Buffer {
        max_bytes: ByteSize(2_000),
        when_full: WhenFull::RejectNew,
        ..Buffer::default()
    };
    let mut rig = Rig::open(dir.path(), buffer);
    let spec = NodeSpec {
        id: 21,
        readings: 12,
        resend_after: Duration::from_millis(200),
        ..NodeSpec::default()
    };
    let node = SimNode::start(rig.connect(), spec.clone());

    let full = || {
        rig.sink
            .seen
            .lock()
            .unwrap()
            .outcomes
            .iter()
            .filter(|(_, _, o)| *o == AppendOutcome::Full)
            .count()
    };
    let deadline = std::time::Instant::now() + WAIT;
    while full() < 3 {
        assert!(std::time::Instant::now() < deadline, "buffer never filled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Refused frames are not acked: everything acked so far is in the buffer.
    let state = node.state();
    assert!(!state.unacked.is_empty());
    let stored = rig.store.readings().await;
    assert_stored_once(&stored, &spec, state.acked.keys().copied());

    // Forward (delete after "PubAck") what is buffered until the node has everything acked.
    let mut forwarded = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while !node.done() {
        assert!(std::time::Instant::now() < deadline, "{:?}", node.state());
        let rows = rig.store.handle.fetch(0, 1000).await.unwrap();
        for row in &rows {
            if row.kind == KIND_READING {
                let r: Reading = postcard::from_bytes(&row.body).unwrap();
                forwarded.push((
                    r.device_id,
                    r.raw_value.unwrap() as u32,
                    r.sensor_type,
                    r.value,
                ));
            }
        }
        rig.store
            .handle
            .acked(rows.iter().map(|r| r.seq..=r.seq).collect())
            .await
            .unwrap();
        // Deletions ride along with the next commit; this one makes them before the next read.
        rig.store.handle.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    forwarded.extend(rig.store.readings().await);
    assert_eq!(forwarded.len(), 12 * 2);
    assert_stored_once(&forwarded, &spec, 0..12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_are_recognised_across_a_restart_and_new_frames_after_a_reboot_or_wrap_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let spec = NodeSpec {
        id: 5,
        readings: 5,
        ..NodeSpec::default()
    };

    // The gateway commits five frames whose acks the node never sees, then stops.
    {
        let mut rig = Rig::open(dir.path(), Buffer::default());
        let node = SimNode::start(
            rig.connect(),
            NodeSpec {
                resend_after: Duration::from_secs(3600),
                lose_first_ack_every: Some(1),
                ..spec.clone()
            },
        );
        node.wait_for("five acks lost", WAIT, |s| s.acks_lost == 5)
            .await;
        assert!(node.state().acked.is_empty());
        drop(node);
        rig.close().await;
    }

    // After the restart the node resends all five: acked as duplicates, stored once.
    let mut rig = Rig::open(dir.path(), Buffer::default());
    let node = SimNode::start(rig.connect(), spec.clone());
    node.wait_done(WAIT).await;
    assert!(
        node.state()
            .acked
            .values()
            .all(|s| *s == AckStatus::Duplicate),
        "{:?}",
        node.state()
    );
    assert_eq!(rig.store.readings().await.len(), 5 * 2);
    drop(node);

    // The node reboots and counts from 0 again with new measurements: new frames, stored.
    let rebooted = NodeSpec {
        value_base: 100.0,
        ..spec.clone()
    };
    let node = SimNode::start(rig.connect(), rebooted.clone());
    node.wait_done(WAIT).await;
    assert!(node.state().acked.values().all(|s| *s == AckStatus::Stored));
    drop(node);

    // Its counter wraps: u32::MAX - 2 ..= 1, all new.
    let wrapping = NodeSpec {
        first_seq: u32::MAX - 2,
        value_base: 200.0,
        ..spec.clone()
    };
    let node = SimNode::start(rig.connect(), wrapping.clone());
    node.wait_done(WAIT).await;
    let acked: Vec<u32> = node.state().acked.keys().copied().collect();
    assert_eq!(acked, vec![0, 1, u32::MAX - 2, u32::MAX - 1, u32::MAX]);
    assert!(node.state().acked.values().all(|s| *s == AckStatus::Stored));
    assert_eq!(rig.store.readings().await.len(), 15 * 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_outlives_the_gateway_closing_its_port_and_resends_when_it_reopens() {
    use tokio_serial::SerialPort;
    let dir = tempfile::tempdir().unwrap();
    let mut rig = Rig::open(dir.path(), Buffer::default());
    let (node_end, gateway_end) = SerialStream::pair().unwrap();
    // The path a gateway would have in its config: the pty's device, opened by name.
    let path = gateway_end.name().unwrap();
    rig.serve(gateway_end);
    let spec = NodeSpec {
        id: 9,
        readings: 30,
        resend_after: Duration::from_millis(300),
        ..NodeSpec::default()
    };
    let node = SimNode::start(node_end, spec.clone());
    node.wait_for("some acks", WAIT, |s| s.acked.len() >= 5)
        .await;

    // The gateway's end closes mid-stream (as when the gateway is killed): the node keeps
    // measuring into its ring and finds no one to talk to.
    rig.stop();
    node.wait_for("the line down", WAIT, |s| s.line_errors > 0)
        .await;
    let before = node.state().acked.len();

    rig.serve(support::sim_node::open_port(&path));
    node.wait_done(WAIT).await;
    assert!(node.state().acked.len() > before);
    let stored = rig.store.readings().await;
    assert_eq!(stored.len(), 30 * 2);
    assert_stored_once(&stored, &spec, 0..30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_window_holds_its_last_frames_whatever_other_nodes_send() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), Buffer::default());
    let a = NodeSpec {
        id: 1,
        channels: 1,
        ..NodeSpec::default()
    };
    let b = NodeSpec { id: 2, ..a.clone() };
    // Queues every frame first, then awaits the outcomes: one group commit, not thousands.
    let commit_all = |frames: Vec<sahool_wire::Frame>| {
        let handle = store.handle.clone();
        async move {
            let mut replies = Vec::new();
            for f in &frames {
                let append = Append {
                    frame_key: Some(frames::frame_key(PORT, f)),
                    ..Append::default()
                };
                replies.push(handle.append(append).await.unwrap());
            }
            let mut outcomes = Vec::new();
            for r in replies {
                outcomes.push(r.await.unwrap().unwrap());
            }
            outcomes
        }
    };
    let first = reading_frame(&a, 0);
    assert!(matches!(
        commit_all(vec![first.clone()]).await[..],
        [AppendOutcome::Stored { .. }]
    ));
    // Thousands of frames from another node do not push node A's frame out.
    let others = (0..3 * FRAME_WINDOW as u32)
        .map(|s| reading_frame(&b, s))
        .collect();
    commit_all(others).await;
    assert_eq!(
        commit_all(vec![first.clone()]).await,
        vec![AppendOutcome::Duplicate]
    );
    // Node A's own later frames do, once the window is full.
    let window = FRAME_WINDOW as u32;
    commit_all((1..window).map(|s| reading_frame(&a, s)).collect()).await;
    assert_eq!(
        commit_all(vec![first.clone()]).await,
        vec![AppendOutcome::Duplicate],
        "the window holds {FRAME_WINDOW} frames"
    );
    commit_all(vec![reading_frame(&a, window)]).await;
    assert!(matches!(
        commit_all(vec![first]).await[..],
        [AppendOutcome::Stored { .. }]
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffer_from_before_frames_gains_the_window_when_opened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer.db");
    // A schema-2 file: what the gateway wrote before firmware frames (and the event salt of
    // schema 4, the dead-letter topic, device and sensor type of schema 5, the downlink's
    // tables of schema 6, the trace column of schema 7) existed.
    open_store(dir.path(), Buffer::default()).close(vec![]);
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TABLE recent_frames; DELETE FROM meta WHERE key LIKE 'event_salt_%';
             DROP INDEX dead_letters_by_time; ALTER TABLE dead_letters DROP COLUMN topic;
             ALTER TABLE dead_letters DROP COLUMN device;
             ALTER TABLE dead_letters DROP COLUMN sensor_type;
             DROP TABLE commands; DROP TABLE actuators; DROP INDEX outbox_results;
             ALTER TABLE outbox DROP COLUMN trace;
             PRAGMA user_version = 2;",
        )
        .unwrap();
    }
    let store = open_store(dir.path(), Buffer::default());
    let frame = reading_frame(&NodeSpec::default(), 0);
    let append = || Append {
        frame_key: Some(frames::frame_key(PORT, &frame)),
        ..Append::default()
    };
    let first = store.handle.append(append()).await.unwrap().await.unwrap();
    assert!(matches!(first, Ok(AppendOutcome::Stored { .. })));
    let again = store.handle.append(append()).await.unwrap().await.unwrap();
    assert!(matches!(again, Ok(AppendOutcome::Duplicate)));
    let conn = db::open_read_only(&path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, db::SCHEMA_VERSION);
}
