//! The `frames` protocol: firmware nodes speaking the `sahool-wire` format on a serial port.
//!
//! Bytes from the port go through a [`FrameDecoder`]; each reading frame is handed to a
//! [`FrameSink`] (the port's mapping and the store), and the ack goes back to the node only
//! once the sink reports the frame committed. The node keeps every frame in its own buffer
//! until acked and resends it after a timeout, so readings are store-and-forward from the
//! sensor on: a frame lost on the line, refused by a full buffer, or whose ack was lost, is
//! simply sent again.
//!
//! # Invariants
//! 1. An ack is written only after the sink returned [`AppendOutcome::Stored`] (committed now)
//!    or [`AppendOutcome::Duplicate`] (committed before) for that frame. `Full` or an error:
//!    no ack, the node keeps the frame.
//! 2. Frames are handled one at a time in arrival order, so acks leave in that order.
//! 3. A frame that does not decode is never acked. It goes to the sink as a [`BadFrame`] with
//!    its bytes: kept as a dead letter up to a rate ([`BAD_FRAMES_PER_SECOND`], burst
//!    [`BAD_FRAMES_BURST`]), counted only beyond it. The one exception is the fragment before
//!    the first delimiter after the port opened (a frame the node was in the middle of): if it
//!    does not decode it is dropped silently.
//! 4. Ack frames arriving here (the gateway's own, echoed by a half-duplex RS-485 adapter) are
//!    ignored.
//!
//! # Resends: the `(node, seq)` window
//! A resend is the same frame again: same node, same seq, same content. [`frame_key`] hashes
//! port, node, seq and the frame's canonical encoding into the store's [`FrameKey`], and the
//! store checks it against the last [`FRAME_WINDOW`] frames committed from that node, in the
//! same transaction that would store it (`recent_frames`, persisted, so restarts change
//! nothing). Hence:
//! - a node that has fewer than [`FRAME_WINDOW`] frames in flight (sent, not yet acked) never
//!   gets a resend stored twice, however long it waited (an outage of days) and however much
//!   other traffic the gateway stored meanwhile;
//! - seq wraparound needs no handling: frames are compared by equality, never by order;
//! - a node that reboots and starts counting again is not mistaken for resending: its new
//!   frames carry new content (new values, battery or time). Only a frame identical in every
//!   byte to one of the node's last [`FRAME_WINDOW`] committed frames would be taken for a
//!   resend, which is why firmware should start `seq` at a random value after a reboot or
//!   send a timestamp (see `wire/README.md`);
//! - a frame arriving out of order (an earlier one was corrupted and is resent later) is
//!   stored normally: there is no high-water mark that could swallow it.

use std::future::Future;
use std::time::{Duration, Instant};

use sahool_wire::{
    encode_to_vec, Ack, AckStatus, ChannelValue, DecodeError, Frame, FrameDecoder, Message,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::common::log_limit::LogLimit;
use crate::ingest::flood::TokenBucket;
use crate::ingest::mapping::Reason;
#[cfg(doc)]
use crate::store::FRAME_WINDOW;
use crate::store::{AppendOutcome, FrameKey};

/// Bad frames kept as dead letters per second on one port, after a burst of
/// [`BAD_FRAMES_BURST`]: a noisy line must not turn into a stream of writes.
pub(crate) const BAD_FRAMES_PER_SECOND: f64 = 1.0;
pub(crate) const BAD_FRAMES_BURST: f64 = 20.0;

/// Where the frames of one port go: the port's mapping and the store.
pub trait FrameSink: Send {
    type Error: std::fmt::Display + Send;

    /// Maps the frame's values and commits them with `frame.key` as
    /// [`crate::store::Append::frame_key`]; resolves once the store answered.
    fn commit(
        &mut self,
        frame: &ReadingFrame<'_>,
    ) -> impl Future<Output = Result<AppendOutcome, Self::Error>> + Send;

    /// A frame that did not decode: a dead letter when `bad.keep`, otherwise only counted.
    fn bad_frame(
        &mut self,
        bad: &BadFrame<'_>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// A decoded reading frame, for the sink.
#[derive(Debug)]
pub struct ReadingFrame<'a> {
    pub node: u32,
    pub seq: u32,
    /// `(channel, value)` pairs; sensors bind to `(port, node, channel)`.
    pub values: &'a [ChannelValue],
    /// Battery percent, as the node reported it.
    pub battery: Option<u8>,
    /// The node's measurement time, Unix milliseconds, if it has a clock.
    pub(crate) node_time_ms: Option<u64>,
    /// The frame as received (COBS-encoded, without the delimiter), for dead letters.
    pub raw: &'a [u8],
    /// Its identity for resend detection; goes into the store's `Append::frame_key`.
    pub key: FrameKey,
}

/// A frame that did not decode, for the sink.
#[derive(Debug)]
pub struct BadFrame<'a> {
    pub error: &'a DecodeError,
    /// The bytes as received, without the delimiter (the first `MAX_ENCODED` of an overlong run).
    pub raw: &'a [u8],
    /// Within the dead-letter rate: keep it. Otherwise count it only.
    pub keep: bool,
}

impl BadFrame<'_> {
    pub fn reason(&self) -> Reason {
        match self.error {
            DecodeError::Overlong { .. } => Reason::Oversized,
            _ => Reason::Malformed,
        }
    }

    /// The dead letter's detail line.
    pub fn detail(&self) -> String {
        format!("bad frame ({}): {}", self.error.label(), self.error)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FramesError {
    #[error("reading from the port: {0}")]
    Read(std::io::Error),
    #[error("writing an ack to the port: {0}")]
    Write(std::io::Error),
}

/// Serves one open port until it closes (`Ok` at end of input) or fails; the caller reopens
/// it. Cancelling the future at any await loses nothing: an ack not yet written is an ack the
/// node never saw, so it resends, and the store recognises the resend.
pub async fn run<T, S>(port: &str, mut transport: T, sink: &mut S) -> Result<(), FramesError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send,
    S: FrameSink,
{
    let mut decoder = FrameDecoder::new();
    let mut bad_frames = TokenBucket::new(BAD_FRAMES_PER_SECOND, BAD_FRAMES_BURST, Instant::now());
    let logs = Logs::default();
    // Until the first item, the input may start inside a frame the node was already sending.
    let mut synced = false;
    let mut buf = [0u8; 1024];
    loop {
        let n = transport.read(&mut buf).await.map_err(FramesError::Read)?;
        if n == 0 {
            return Ok(());
        }
        for (item, raw) in decoder.frames(&buf[..n]) {
            let first = !std::mem::replace(&mut synced, true);
            match item {
                Ok(frame) => {
                    if let Some(ack) = handle_frame(port, frame, &raw, sink, &logs).await {
                        transport
                            .write_all(&ack)
                            .await
                            .map_err(FramesError::Write)?;
                        transport.flush().await.map_err(FramesError::Write)?;
                    }
                }
                Err(error) if first => {
                    tracing::debug!(port, %error, "dropped the partial frame the port opened in");
                }
                Err(error) => {
                    let bad = BadFrame {
                        error: &error,
                        raw: &raw,
                        keep: bad_frames.take(Instant::now()),
                    };
                    if let Some(held) = logs.bad_frame.admit() {
                        tracing::warn!(port, error = %error, repeats = held, "bad frame on serial port; not acked");
                    }
                    if let Err(e) = sink.bad_frame(&bad).await {
                        if let Some(held) = logs.sink.admit() {
                            tracing::warn!(port, error = %e, repeats = held, "cannot keep a bad frame");
                        }
                    }
                }
            }
        }
    }
}

/// Rate limits for the lines that repeat while a port misbehaves.
struct Logs {
    bad_frame: LogLimit,
    sink: LogLimit,
    full: LogLimit,
}

impl Default for Logs {
    fn default() -> Self {
        Self {
            bad_frame: LogLimit::new(Duration::from_secs(10)),
            sink: LogLimit::new(Duration::from_secs(10)),
            full: LogLimit::new(Duration::from_secs(60)),
        }
    }
}

/// Commits one good frame; returns the ack to send, if the frame is durable.
async fn handle_frame<S: FrameSink>(
    port: &str,
    frame: Frame,
    raw: &[u8],
    sink: &mut S,
    logs: &Logs,
) -> Option<Vec<u8>> {
    let key = frame_key(port, &frame);
    let Frame { node, seq, message } = frame;
    let reading = match message {
        Message::Reading(r) => r,
        Message::Ack(_) => {
            tracing::trace!(port, node, seq, "ignoring an ack frame (echo of our own)");
            return None;
        }
    };
    let incoming = ReadingFrame {
        node,
        seq,
        values: &reading.values,
        battery: reading.battery,
        node_time_ms: reading.time_ms,
        raw,
        key,
    };
    let status = match sink.commit(&incoming).await {
        Ok(AppendOutcome::Stored { .. }) => AckStatus::Stored,
        Ok(AppendOutcome::Duplicate) => AckStatus::Duplicate,
        Ok(AppendOutcome::Full) => {
            if let Some(held) = logs.full.admit() {
                tracing::warn!(
                    port,
                    node,
                    seq,
                    repeats = held,
                    "buffer full: frame not acked, the node keeps it and resends"
                );
            }
            return None;
        }
        Err(e) => {
            if let Some(held) = logs.sink.admit() {
                tracing::warn!(port, node, seq, error = %e, repeats = held, "commit failed: frame not acked, the node resends it");
            }
            return None;
        }
    };
    let ack = Ack {
        status,
        gateway_time_ms: u64::try_from(crate::store::db::now_ms()).unwrap_or(0),
    };
    Some(encode_to_vec(&Frame::ack(node, seq, ack)))
}

/// The identity of a frame from `port`: its node's window and the frame itself (node, seq and
/// content, in canonical encoding so equal frames get equal keys).
pub fn frame_key(port: &str, frame: &Frame) -> FrameKey {
    let mut node = xxhash_rust::xxh3::Xxh3::new();
    node.update(port.as_bytes());
    node.update(&[0]);
    node.update(&frame.node.to_le_bytes());
    let mut this = xxhash_rust::xxh3::Xxh3::new();
    this.update(port.as_bytes());
    this.update(&[0]);
    this.update(&encode_to_vec(frame));
    FrameKey {
        node: node.digest() as i64,
        frame: this.digest128().to_le_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sahool_wire::Reading;
    use tokio::io::AsyncReadExt;

    /// Commits everything (Stored, or Duplicate for a key seen before) and records what came.
    #[derive(Default)]
    struct Recorder {
        keys: Vec<FrameKey>,
        committed: Vec<(u32, u32)>,
        bad: Vec<(&'static str, Vec<u8>)>,
    }

    impl FrameSink for Recorder {
        type Error = std::convert::Infallible;

        async fn commit(&mut self, frame: &ReadingFrame<'_>) -> Result<AppendOutcome, Self::Error> {
            self.committed.push((frame.node, frame.seq));
            if self.keys.contains(&frame.key) {
                return Ok(AppendOutcome::Duplicate);
            }
            self.keys.push(frame.key);
            Ok(AppendOutcome::Stored {
                first_seq: 1,
                count: frame.values.len() as u64,
            })
        }

        async fn bad_frame(&mut self, bad: &BadFrame<'_>) -> Result<(), Self::Error> {
            self.bad.push((bad.error.label(), bad.raw.to_vec()));
            Ok(())
        }
    }

    fn frame(node: u32, seq: u32, value: f32) -> Frame {
        let mut r = Reading::default();
        r.push(0, value).unwrap();
        Frame::reading(node, seq, r)
    }

    #[test]
    fn a_resend_has_the_key_of_the_original_and_anything_else_does_not() {
        let original = frame_key("rs485-1", &frame(7, 100, 1.5));
        assert_eq!(frame_key("rs485-1", &frame(7, 100, 1.5)), original);
        // Another seq, another value (a node that rebooted and counts again), another port,
        // another node: different frames.
        for other in [
            frame_key("rs485-1", &frame(7, 101, 1.5)),
            frame_key("rs485-1", &frame(7, 100, 1.25)),
            frame_key("rs485-2", &frame(7, 100, 1.5)),
            frame_key("rs485-1", &frame(8, 100, 1.5)),
        ] {
            assert_ne!(other.frame, original.frame);
        }
        // The window is per node and port, not per frame.
        assert_eq!(frame_key("rs485-1", &frame(7, 5, 9.0)).node, original.node);
        assert_ne!(
            frame_key("rs485-1", &frame(8, 100, 1.5)).node,
            original.node
        );
        assert_ne!(
            frame_key("rs485-2", &frame(7, 100, 1.5)).node,
            original.node
        );
    }

    #[tokio::test]
    async fn the_fragment_the_port_opens_in_is_dropped_quietly_later_garbage_is_reported() {
        let (mut node, gateway) = tokio::io::duplex(4096);
        let good = encode_to_vec(&frame(7, 1, 2.5));
        let mut input = good[good.len() / 2..].to_vec(); // the tail of a frame in flight
        input.extend_from_slice(&good);
        input.extend_from_slice(&[0x42, 0x42, 0x00]); // garbage
        input.extend_from_slice(&encode_to_vec(&Frame::ack(
            7,
            1,
            Ack {
                status: AckStatus::Stored,
                gateway_time_ms: 0,
            },
        ))); // our own ack, echoed
        input.extend_from_slice(&good); // a resend
        node.write_all(&input).await.unwrap();
        node.shutdown().await.unwrap();

        let mut sink = Recorder::default();
        run("p", gateway, &mut sink).await.unwrap();
        assert_eq!(sink.committed, vec![(7, 1), (7, 1)]);
        assert_eq!(sink.bad, vec![("cobs", vec![0x42, 0x42])]);

        let mut acks = Vec::new();
        node.read_to_end(&mut acks).await.unwrap();
        let statuses: Vec<AckStatus> = FrameDecoder::new()
            .frames(&acks)
            .filter_map(|(item, _)| match item {
                Ok(Frame {
                    node: 7,
                    seq: 1,
                    message: Message::Ack(a),
                }) => Some(a.status),
                _ => None,
            })
            .collect();
        assert_eq!(statuses, vec![AckStatus::Stored, AckStatus::Duplicate]);
    }
}
