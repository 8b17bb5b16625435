//! The `frames` protocol on a `[[serial]]` port: the engine of [`super::frames`] with the
//! port's mapping and buffer as its [`FrameSink`].
//!
//! A reading frame becomes one [`Batch`]: a [`SerialValue`] per `(channel, value)` under
//! [`SerialKey::Frame`], with the node's battery and, when the node sent its time, that time as
//! the observation time (judged by the mapping's timestamp policy; without one the receive time
//! is used). The batch carries the frame's [`FrameKey`], so the store recognises a resend in the
//! same transaction that would store it. Values the mapping rejects (an unbound channel, an
//! unknown node, out of range) are dead-lettered with the frame's bytes in that same commit,
//! and the frame is acked: it was handled, and sending it again would change nothing.
//!
//! # Invariants
//! 1. One commit attempt per frame ([`PortContext::try_commit`]), never a retry loop: `Full`
//!    or a failed commit means no ack, and the node's resend is the retry. Holding the frame
//!    here would only hold up the frames of every other node on the bus.
//! 2. A frame that does not decode is dead-lettered with its bytes while within the engine's
//!    rate ([`BadFrame::keep`]), and otherwise only counted
//!    (`readings_rejected_total{reason}`); either way it is counted per port and decode error
//!    (`serial_errors_total{port, reason="frame_<error>"}`) and never acked.
//! 3. Every frame is counted once in `serial_frames_total{port, outcome}` (see
//!    [`Metrics::serial_frame`]) and in `serial_messages_received_total{port}`; every byte
//!    read in `serial_bytes_received_total{port}`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use super::frames::{self, BadFrame, FrameSink, FramesError, ReadingFrame};
use super::{stop_requested, Batch, PortContext, PortFault};
#[cfg(doc)]
use crate::common::metrics::Metrics;
use crate::ingest::mapping::{RawValue, Rejection, SerialKey, SerialValue};
use crate::reading::Timestamp;
#[cfg(doc)]
use crate::store::FrameKey;
use crate::store::{AppendOutcome, StoreError};

/// Serves firmware nodes on the open port until it is lost, the gateway stops, or the buffer
/// closes. Stopping in the middle of a commit is safe: the ack was not sent, so the node
/// resends, and the store recognises the resend if the commit went through.
pub(crate) async fn run<T>(io: T, ctx: &mut PortContext) -> Result<(), PortFault>
where
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut stop = ctx.stop_signal();
    let store_closed = Notify::new();
    let port = ctx.name().to_string();
    let io = Counted {
        io,
        bytes: ctx.bytes.clone(),
    };
    let mut sink = PortSink::new(ctx, &store_closed);
    tokio::select! {
        served = frames::run(&port, io, &mut sink) => match served {
            Ok(()) => Err(PortFault::Closed),
            Err(FramesError::Read(e) | FramesError::Write(e)) => Err(PortFault::Io(e)),
        },
        _ = stop_requested(&mut stop) => Err(PortFault::Stopping),
        _ = store_closed.notified() => Err(PortFault::StoreClosed),
    }
}

/// What one reading frame commits: its values for the mapping, its bytes for dead-letters,
/// and its key for resend detection.
pub(crate) fn batch_of(frame: &ReadingFrame<'_>) -> Batch {
    let at = frame
        .node_time_ms
        .map(|ms| Timestamp::from_unix_millis(i64::try_from(ms).unwrap_or(i64::MAX)));
    let battery = frame.battery.map(f64::from);
    let values = frame
        .values
        .iter()
        .map(|v| SerialValue {
            key: SerialKey::Frame {
                node: frame.node,
                channel: v.channel,
            },
            device: None,
            value: RawValue::Number(widen(v.value)),
            at,
            battery,
            rssi: None,
        })
        .collect();
    Batch {
        frame_key: Some(frame.key),
        ..Batch::values(values, frame.raw)
    }
}

/// The f64 a node meant by its f32: the shortest decimal that reads back as the same f32, so
/// `0.1` arrives as `0.1` rather than `0.10000000149011612`.
fn widen(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(f64::from(v))
}

/// `serial_frames_total{port, outcome}` of one port, created up front so every outcome is
/// exported from the start.
struct FrameCounters {
    stored: Counter,
    duplicate: Counter,
    refused: Counter,
    failed: Counter,
    bad: Counter,
}

/// The port's mapping and buffer, as the engine's sink.
struct PortSink<'a> {
    ctx: &'a mut PortContext,
    frames: FrameCounters,
    /// Notified when the buffer's writer has stopped: the port cannot go on.
    store_closed: &'a Notify,
}

impl<'a> PortSink<'a> {
    fn new(ctx: &'a mut PortContext, store_closed: &'a Notify) -> Self {
        let counter = |outcome| ctx.metrics.serial_frame(ctx.name(), outcome);
        let frames = FrameCounters {
            stored: counter("stored"),
            duplicate: counter("duplicate"),
            refused: counter("refused"),
            failed: counter("failed"),
            bad: counter("bad"),
        };
        Self {
            ctx,
            frames,
            store_closed,
        }
    }

    /// A buffer that closed ends the port; other failures are the node's to retry.
    fn note_failure(&self, e: &StoreError) {
        if matches!(e, StoreError::Closed) {
            self.store_closed.notify_one();
        }
    }
}

impl FrameSink for PortSink<'_> {
    type Error = StoreError;

    async fn commit(&mut self, frame: &ReadingFrame<'_>) -> Result<AppendOutcome, StoreError> {
        self.ctx.messages.inc();
        let outcome = self.ctx.try_commit(&batch_of(frame)).await;
        match &outcome {
            Ok(AppendOutcome::Stored { .. }) => self.frames.stored.inc(),
            Ok(AppendOutcome::Duplicate) => self.frames.duplicate.inc(),
            Ok(AppendOutcome::Full) => self.frames.refused.inc(),
            Err(e) => {
                self.note_failure(e);
                self.frames.failed.inc()
            }
        };
        outcome
    }

    async fn bad_frame(&mut self, bad: &BadFrame<'_>) -> Result<(), StoreError> {
        self.ctx.messages.inc();
        self.frames.bad.inc();
        self.ctx.error(&format!("frame_{}", bad.error.label()));
        if !bad.keep {
            self.ctx.metrics.rejected(bad.reason().label()).inc();
            return Ok(());
        }
        let batch = Batch::rejected(Rejection::new(bad.reason(), bad.detail()), bad.raw);
        self.ctx
            .try_commit(&batch)
            .await
            .map(drop)
            .inspect_err(|e| self.note_failure(e))
    }
}

/// The port, with every byte read counted.
struct Counted<T> {
    io: T,
    bytes: Counter,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        self.bytes.inc_by((buf.filled().len() - before) as u64);
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, RwLock};
    use std::time::Duration;

    use sahool_wire::{encode_to_vec, AckStatus, ChannelValue, Frame, FrameDecoder, Message};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::super::{PortPlan, SerialInput};
    use super::*;
    use crate::common::metrics::{sample, Metrics};
    use crate::ingest::mapping::Mapper;
    use crate::reading::{Reading, SensorType, KIND_READING};
    use crate::store::{self, FrameKey};

    const KEY: FrameKey = FrameKey {
        node: 42,
        frame: [7; 16],
    };

    #[test]
    fn a_frame_becomes_values_with_the_node_time_battery_and_key() {
        let values = [
            ChannelValue {
                channel: 0,
                value: 0.1,
            },
            ChannelValue {
                channel: 3,
                value: -21.25,
            },
        ];
        let frame = ReadingFrame {
            node: 7,
            seq: 9,
            values: &values,
            battery: Some(87),
            node_time_ms: Some(1_780_287_300_123),
            raw: b"raw",
            key: KEY,
        };
        let batch = batch_of(&frame);
        assert_eq!(batch.frame_key, Some(KEY));
        assert_eq!(&*batch.raw, b"raw");
        assert!(batch.rejected.is_empty());
        let got: Vec<(SerialKey, RawValue)> = batch
            .values
            .iter()
            .map(|v| (v.key.clone(), v.value.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    SerialKey::Frame {
                        node: 7,
                        channel: 0
                    },
                    RawValue::Number(0.1)
                ),
                (
                    SerialKey::Frame {
                        node: 7,
                        channel: 3
                    },
                    RawValue::Number(-21.25)
                ),
            ],
            "values as the node meant them, not 0.10000000149011612"
        );
        for v in &batch.values {
            assert_eq!(v.at, Some(Timestamp::from_unix_millis(1_780_287_300_123)));
            assert_eq!(v.battery, Some(87.0));
            assert_eq!(v.device, None, "the binding names the device");
        }

        let clockless = ReadingFrame {
            battery: None,
            node_time_ms: None,
            ..frame
        };
        let batch = batch_of(&clockless);
        assert!(batch
            .values
            .iter()
            .all(|v| v.at.is_none() && v.battery.is_none()));
    }

    const CONFIG: &str = r#"
[nats]
servers = ["nats://127.0.0.1:4222"]

[[serial]]
name = "nodes"
path = "/dev/ttyUSB0"
protocol = "frames"

[[fields]]
id = "f"
  [[fields.sensors]]
  device_id = "mast-7"
  sensor_type = "air_temperature"
  frame = { port = "nodes", node = 7, channel = 0 }
  [[fields.sensors]]
  device_id = "mast-7"
  sensor_type = "air_humidity"
  frame = { port = "nodes", node = 7, channel = 1 }
"#;

    fn reading(node: u32, seq: u32, values: &[(u8, f32)], time_ms: Option<u64>) -> Vec<u8> {
        let mut r = sahool_wire::Reading::default();
        for (channel, value) in values {
            r.push(*channel, *value).unwrap();
        }
        r.battery = Some(87);
        r.time_ms = time_ms;
        encode_to_vec(&Frame::reading(node, seq, r))
    }

    /// Reads acks from the gateway until `n` arrived: `(node, seq, status)`.
    async fn acks(node: &mut tokio::io::DuplexStream, n: usize) -> Vec<(u32, u32, AckStatus)> {
        let mut decoder = FrameDecoder::new();
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        while out.len() < n {
            let read = tokio::time::timeout(Duration::from_secs(30), node.read(&mut buf)).await;
            let n = read.expect("acks within 30 s").unwrap();
            assert!(n > 0, "the gateway closed the line after {out:?}");
            for (item, _) in decoder.frames(&buf[..n]) {
                if let Ok(Frame {
                    node,
                    seq,
                    message: Message::Ack(ack),
                }) = item
                {
                    out.push((node, seq, ack.status));
                }
            }
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_are_mapped_committed_acked_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[gateway]\nid = \"gw-1\"\ntenant_id = \"t\"\ndata_dir = \"{}\"\n{CONFIG}",
            dir.path().display()
        );
        let config = crate::config::parse(&text).unwrap();
        let metrics = Arc::new(Metrics::new());
        let (store, store_thread) = store::start(
            config.store_path(),
            config.buffer.clone(),
            config.quality.low_battery,
            metrics.clone(),
        )
        .unwrap();
        let input = SerialInput {
            plan: PortPlan::all(&config).remove(0),
            quality: config.quality.clone(),
            mapper: Arc::new(RwLock::new(Arc::new(Mapper::new(&config)))),
            store: store.clone(),
            metrics: metrics.clone(),
            bus: Default::default(),
        };
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut ctx = PortContext::new(&input, stop_rx);
        let (mut node, gateway) = tokio::io::duplex(4096);
        let port = tokio::spawn(async move { run(gateway, &mut ctx).await });

        let node_time = Timestamp::now().unix_millis() as u64 - 60_000;
        let first = reading(7, 1, &[(0, 21.5), (1, 55.25)], Some(node_time));
        let mut line = vec![0u8];
        line.extend_from_slice(&first);
        line.extend_from_slice(&first); // a resend
        line.extend_from_slice(&reading(7, 2, &[(0, 22.0), (5, 1.0)], None)); // channel 5 unbound
        line.extend_from_slice(&[0x42, 0x42, 0x00]); // garbage
        line.extend_from_slice(&reading(9, 1, &[(0, 3.0)], None)); // a node without sensors
        node.write_all(&line).await.unwrap();

        // Every frame that decoded is acked once handled, in order; the garbage is not.
        assert_eq!(
            acks(&mut node, 4).await,
            vec![
                (7, 1, AckStatus::Stored),
                (7, 1, AckStatus::Duplicate),
                (7, 2, AckStatus::Stored),
                (9, 1, AckStatus::Stored),
            ]
        );
        stop.send(true).unwrap();
        assert!(matches!(port.await.unwrap(), Err(PortFault::Stopping)));

        let readings: Vec<Reading> = store
            .fetch(0, 100)
            .await
            .unwrap()
            .into_iter()
            .filter(|row| row.kind == KIND_READING)
            .map(|row| postcard::from_bytes(&row.body).unwrap())
            .collect();
        let got: Vec<(&str, SensorType, f64, Option<f64>)> = readings
            .iter()
            .map(|r| (r.device_id.as_str(), r.sensor_type, r.value, r.battery))
            .collect();
        assert_eq!(
            got,
            vec![
                ("mast-7", SensorType::AirTemperature, 21.5, Some(87.0)),
                ("mast-7", SensorType::AirHumidity, 55.25, Some(87.0)),
                ("mast-7", SensorType::AirTemperature, 22.0, Some(87.0)),
            ]
        );
        assert_eq!(
            readings[0].observed_at,
            Timestamp::from_unix_millis(node_time as i64),
            "the node's own time"
        );
        assert_ne!(
            readings[2].observed_at, readings[0].observed_at,
            "no node time: the receive time"
        );

        let mut letters: Vec<(String, String, bool)> = store::Inspector::open(&config.store_path())
            .unwrap()
            .dead_letters(10)
            .unwrap()
            .into_iter()
            .map(|l| (l.reason, l.source, l.raw.len() > 2))
            .collect();
        letters.sort();
        let nodes = || "nodes".to_string();
        assert_eq!(
            letters,
            vec![
                ("malformed".into(), nodes(), false),
                ("unknown_device".into(), nodes(), true),
                ("unknown_sensor_type".into(), nodes(), true),
            ],
            "the garbage with its two bytes, the others with their frame's"
        );

        let text = metrics.encode();
        let frames = |outcome: &str| {
            sample(
                &text,
                "sahool_gateway_serial_frames_total",
                &format!("port=\"nodes\",outcome=\"{outcome}\""),
            )
        };
        assert_eq!(
            [
                frames("stored"),
                frames("duplicate"),
                frames("refused"),
                frames("failed"),
                frames("bad")
            ],
            [3.0, 1.0, 0.0, 0.0, 1.0]
        );
        assert_eq!(
            sample(
                &text,
                "sahool_gateway_serial_messages_received_total",
                "port=\"nodes\""
            ),
            5.0
        );
        assert_eq!(
            sample(
                &text,
                "sahool_gateway_serial_bytes_received_total",
                "port=\"nodes\""
            ),
            line.len() as f64
        );
        assert_eq!(
            sample(
                &text,
                "sahool_gateway_serial_errors_total",
                "reason=\"frame_cobs\""
            ),
            1.0
        );
        drop((store, input));
        store_thread.join().unwrap();
    }
}
