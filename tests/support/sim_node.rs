//! A simulated firmware node speaking the wire crate on a serial line (one end of a pty pair,
//! or a serial device path through [`open_port`]): it measures into a ring buffer, sends each
//! measurement as a reading frame, resends every frame not acked within `resend_after`, and
//! records the acks it got. Faults on demand: lost acks, garbage on the line. It outlives the
//! gateway's end of the line closing and reopening (a gateway killed and restarted), as a
//! real node outlives its gateway.
//!
//! Values are derived from `(value_base, seq, channel)`, so a test can tell what was sent.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sahool_wire::{
    encode_to_vec, AckStatus, ChannelValue, Frame, FrameDecoder, Message, Reading, MAX_ENCODED,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Called with each ack's seq as the node accepts it.
pub type OnAck = Arc<dyn Fn(u32) + Send + Sync>;

#[derive(Clone)]
pub struct NodeSpec {
    pub id: u32,
    /// Seq of the first measurement; later ones count up, wrapping.
    pub first_seq: u32,
    /// Measurements to make in all.
    pub readings: u32,
    /// Values per frame, channels 0..channels.
    pub channels: u8,
    pub interval: Duration,
    pub resend_after: Duration,
    /// Unacked frames kept; when full the oldest is dropped (and counted).
    pub ring: usize,
    /// Added to every value: two runs of one node id with different bases send different frames.
    pub value_base: f32,
    /// The node's clock (Unix ms at the measurement) in each frame.
    pub with_time: bool,
    /// The first ack for every seq divisible by this is "lost" (ignored), forcing a resend.
    pub lose_first_ack_every: Option<u32>,
    /// Garbage on the line after every this many new frames.
    pub garbage_every: Option<u32>,
    pub on_ack: Option<OnAck>,
}

impl Default for NodeSpec {
    fn default() -> Self {
        Self {
            id: 1,
            first_seq: 0,
            readings: 10,
            channels: 2,
            interval: Duration::from_millis(20),
            resend_after: Duration::from_millis(500),
            ring: 64,
            value_base: 0.0,
            with_time: false,
            lose_first_ack_every: None,
            garbage_every: None,
            on_ack: None,
        }
    }
}

impl NodeSpec {
    /// The value a node with this spec sends on `channel` of frame `seq`.
    pub fn value(&self, seq: u32, channel: u8) -> f32 {
        self.value_base + (seq % 10_000) as f32 * 0.5 + f32::from(channel) * 0.01
    }
}

/// What the node saw, for the test to check.
#[derive(Debug, Default, Clone)]
pub struct NodeState {
    /// Measurements made so far.
    pub produced: u32,
    /// Seqs still waiting for an ack, oldest first.
    pub unacked: Vec<u32>,
    /// Every seq acked, with the status of the ack that settled it.
    pub acked: BTreeMap<u32, AckStatus>,
    /// Acks the node ignored on purpose (`lose_first_ack_every`).
    pub acks_lost: u32,
    /// Acks for seqs already settled (a resend crossed the first ack).
    pub late_acks: u32,
    /// Measurements dropped because the ring was full.
    pub overflowed: u32,
    pub frames_sent: u64,
    pub resends: u64,
    pub garbage_sent: u32,
    /// Reads or writes that failed (no one at the other end), survived.
    pub line_errors: u32,
}

struct Pending {
    seq: u32,
    bytes: Vec<u8>,
    last_sent: Instant,
}

/// A running node; stops when dropped.
pub struct SimNode {
    pub spec: NodeSpec,
    state: Arc<Mutex<NodeState>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl SimNode {
    pub fn start<T>(io: T, spec: NodeSpec) -> Self
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let state = Arc::new(Mutex::new(NodeState::default()));
        let task = tokio::spawn(run(io, spec.clone(), state.clone()));
        Self { spec, state, task }
    }

    pub fn state(&self) -> NodeState {
        self.state.lock().unwrap().clone()
    }

    /// True once every measurement was made and acked.
    pub fn done(&self) -> bool {
        let s = self.state();
        s.produced == self.spec.readings && s.unacked.is_empty()
    }

    /// Waits until `done`, or panics with the node's state after `within`.
    pub async fn wait_done(&self, within: Duration) {
        self.wait_for("every reading acked", within, |s| {
            s.produced == self.spec.readings && s.unacked.is_empty()
        })
        .await;
    }

    /// Waits until `f(state)`, or panics with the node's state after `within`.
    pub async fn wait_for(&self, what: &str, within: Duration, f: impl Fn(&NodeState) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            if f(&self.state()) {
                return;
            }
            if self.task.is_finished() {
                panic!(
                    "node {} stopped before {what}: {:?}",
                    self.spec.id,
                    self.state()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "node {}: not {what} within {within:?}: {:?}",
                    self.spec.id,
                    self.state()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Opens a serial device (or a pty's far end by its path) for a node.
pub fn open_port(path: &str) -> tokio_serial::SerialStream {
    use tokio_serial::SerialPortBuilderExt;
    tokio_serial::new(path, 115_200)
        .open_native_async()
        .unwrap_or_else(|e| panic!("cannot open {path}: {e}"))
}

/// The frame a node with `spec` sends as `seq`.
pub fn reading_frame(spec: &NodeSpec, seq: u32) -> Frame {
    let mut r = Reading::default();
    for channel in 0..spec.channels {
        r.values
            .push(ChannelValue {
                channel,
                value: spec.value(seq, channel),
            })
            .unwrap();
    }
    r.battery = Some(80);
    if spec.with_time {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        r.time_ms = Some(now.as_millis() as u64);
    }
    Frame::reading(spec.id, seq, r)
}

async fn run<T>(io: T, spec: NodeSpec, state: Arc<Mutex<NodeState>>) -> std::io::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut rx, mut tx) = tokio::io::split(io);
    let mut ring: VecDeque<Pending> = VecDeque::new();
    let mut decoder = FrameDecoder::new();
    let mut seq = spec.first_seq;
    let mut produced = 0u32;
    let mut next_measure = Instant::now();
    let mut buf = [0u8; 256];
    let mut lost = BTreeSet::new();
    // Idle line first: a leading delimiter lets the receiver sync at once.
    let mut out = vec![0u8];
    loop {
        let now = Instant::now();
        if produced < spec.readings && now >= next_measure {
            let bytes = encode_to_vec(&reading_frame(&spec, seq));
            if ring.len() == spec.ring {
                ring.pop_front();
                state.lock().unwrap().overflowed += 1;
            }
            out.extend_from_slice(&bytes);
            ring.push_back(Pending {
                seq,
                bytes,
                last_sent: now,
            });
            produced += 1;
            seq = seq.wrapping_add(1);
            next_measure = now + spec.interval;
            let garbage = spec
                .garbage_every
                .is_some_and(|n| produced.is_multiple_of(n));
            let mut s = state.lock().unwrap();
            if garbage {
                out.extend_from_slice(&garbage_for(s.garbage_sent, &ring.back().unwrap().bytes));
                s.garbage_sent += 1;
            }
            s.produced = produced;
            s.frames_sent += 1;
            s.unacked = ring.iter().map(|p| p.seq).collect();
        }
        for p in ring.iter_mut() {
            if now.duration_since(p.last_sent) >= spec.resend_after {
                out.extend_from_slice(&p.bytes);
                p.last_sent = now;
                let mut s = state.lock().unwrap();
                s.frames_sent += 1;
                s.resends += 1;
            }
        }
        if !out.is_empty() {
            // Like a UART with nobody listening, a failed write just loses the bytes.
            if tx.write_all(&out).await.is_err() || tx.flush().await.is_err() {
                state.lock().unwrap().line_errors += 1;
            }
            out.clear();
        }

        let wake = if produced < spec.readings {
            next_measure
        } else {
            now + spec.resend_after / 4
        };
        tokio::select! {
            n = rx.read(&mut buf) => match n {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    for (item, _) in decoder.frames(&buf[..n]) {
                        if let Ok(Frame { node, seq: acked, message: Message::Ack(ack) }) = item {
                            if node == spec.id {
                                on_ack(&spec, &state, &mut ring, &mut lost, acked, ack.status);
                            }
                        }
                    }
                }
                // A pty whose gateway end is closed (the gateway was killed or is restarting)
                // reads as an I/O error until it is opened again: wait, keep the ring.
                Err(_) => {
                    state.lock().unwrap().line_errors += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

fn on_ack(
    spec: &NodeSpec,
    state: &Mutex<NodeState>,
    ring: &mut VecDeque<Pending>,
    lost: &mut BTreeSet<u32>,
    seq: u32,
    status: AckStatus,
) {
    let mut s = state.lock().unwrap();
    if s.acked.contains_key(&seq) {
        s.late_acks += 1;
        return;
    }
    if spec
        .lose_first_ack_every
        .is_some_and(|n| seq.is_multiple_of(n))
        && lost.insert(seq)
    {
        s.acks_lost += 1;
        return;
    }
    ring.retain(|p| p.seq != seq);
    s.acked.insert(seq, status);
    s.unacked = ring.iter().map(|p| p.seq).collect();
    drop(s);
    if let Some(f) = &spec.on_ack {
        f(seq);
    }
}

/// Garbage of four kinds in turn, each a single bad frame to the receiver: a frame whose CRC
/// is wrong, an overlong run, the last frame with one byte changed, and broken COBS.
fn garbage_for(n: u32, last_frame: &[u8]) -> Vec<u8> {
    match n % 4 {
        0 => {
            let mut g: Vec<u8> = (0..=20).collect();
            g[0] = 21; // COBS: 20 bytes follow, no zero among them
            g.push(0);
            g
        }
        1 => {
            let mut g = vec![0x5a; MAX_ENCODED * 3];
            g.push(0);
            g
        }
        2 => {
            let mut g = last_frame.to_vec();
            let mid = g.len() / 2;
            g[mid] = if g[mid] == 0x01 { 0x02 } else { 0x01 };
            g
        }
        _ => vec![0xff, 0xfe, 0xfd, 0],
    }
}
