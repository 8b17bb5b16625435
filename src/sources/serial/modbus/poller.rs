//! Runs a [`Plan`] on one bus through tokio-modbus's RTU client, switching the slave id per
//! request.
//!
//! Each request: wait the RTU inter-frame gap, drop bytes that arrived since the last answer,
//! send, and wait at most the response timeout. Faults are classified from what the transport
//! actually carried, not from tokio-modbus's error kinds alone:
//! - `timeout`: nothing, or only the start of an answer, arrived in time;
//! - `crc`: bytes arrived but formed no frame that passes CRC-16/MODBUS. tokio-modbus does not
//!   report a bad CRC as such: its decoder drops the frame byte by byte looking for a valid one
//!   and then either waits for more bytes (our timeout fires) or gives up with an I/O error of
//!   kind `InvalidData`. Either way the captured bytes are checked with [`parse_response`];
//! - `exception`: the slave answered with a Modbus exception (its code is kept);
//! - `unexpected`: a valid frame that answers something else (another unit or function, or
//!   the wrong number of registers), typically a late answer to an earlier request;
//! - a transport error or end of stream means the port is gone: the cycle ends with
//!   [`PortLost`] and the caller reopens the port.
//!
//! After a timeout, a corrupt or an unexpected answer, the line is drained until it has been
//! quiet for [`Timing::settle`], so a late answer is not read as the next request's, and the
//! tokio-modbus client is replaced (its decoder state may be poisoned).

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_modbus::client::{rtu, Client, Context};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{Request, Response, Slave};

use super::frame::{parse_response, FrameError};
use super::line::Line;
use super::plan::{Plan, ReadRequest};
use super::{Fault, PointId, RegisterKind};
use crate::reading::Timestamp;

/// Smallest quiet time that ends a drain. USB adapters hand bytes over in bursts (FTDI's
/// latency timer is 16 ms), so the character-time gap alone would end a drain mid-answer.
const SETTLE_FLOOR: Duration = Duration::from_millis(100);

/// Timing of one bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a slave has to answer one request (the port's `timeout`), on top of the time
    /// the request and its answer take on the wire.
    pub timeout: Duration,
    /// Wire time of one character (11 bits in RTU: start, 8 data, parity or second stop, stop).
    pub char_time: Duration,
    /// Silence kept before each request: 3.5 character times.
    pub gap: Duration,
    /// Quiet time that ends the drain after a failed request.
    pub settle: Duration,
}

impl Timing {
    pub fn new(timeout: Duration, baud: u32) -> Self {
        let gap = frame_gap(baud);
        Self {
            timeout,
            char_time: Duration::from_nanos(11_000_000_000 / u64::from(baud.max(1))),
            gap,
            settle: gap.max(SETTLE_FLOOR).min(timeout),
        }
    }

    /// The wait for the answer to a read of `count` registers: the timeout plus the wire time
    /// of the 8-byte request and the answer (5 bytes of frame and 2 per register). At 9600
    /// baud a 125-register answer alone takes 290 ms.
    pub(crate) fn request_timeout(&self, count: u16) -> Duration {
        self.timeout + self.char_time * (13 + 2 * u32::from(count))
    }
}

/// The RTU inter-frame gap: 3.5 characters of 11 bits, fixed at 1.75 ms above 19200 baud
/// (Modbus over serial line V1.02, §2.5.1.1).
pub(crate) fn frame_gap(baud: u32) -> Duration {
    if baud == 0 || baud > 19_200 {
        return Duration::from_micros(1750);
    }
    Duration::from_micros(38_500_000 / u64::from(baud))
}

/// What one request got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestOutcome {
    pub unit: u8,
    pub kind: RegisterKind,
    pub start: u16,
    pub count: u16,
    pub result: Result<(), Fault>,
    /// When the answer (or the timeout) came: the observation time of the request's values.
    pub at: Timestamp,
    /// The bytes that arrived for a failed request (at most 512; empty for a success or
    /// silence), to keep with a dead-letter.
    pub raw: Vec<u8>,
}

impl RequestOutcome {
    /// `"ok"` or the fault's reason: the `outcome` label of the request counter.
    pub fn outcome(&self) -> &'static str {
        match &self.result {
            Ok(()) => "ok",
            Err(fault) => fault.reason(),
        }
    }
}

/// One cycle's results: one entry per point of the plan, in plan order, and one per request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CycleReport {
    pub values: Vec<(PointId, Result<f64, Fault>)>,
    pub requests: Vec<RequestOutcome>,
}

impl CycleReport {
    /// Requests per (unit, outcome) in this cycle.
    pub fn outcome_counts(&self) -> BTreeMap<(u8, &'static str), u32> {
        let mut counts = BTreeMap::new();
        for r in &self.requests {
            *counts.entry((r.unit, r.outcome())).or_insert(0) += 1;
        }
        counts
    }
}

/// The port failed mid-cycle; `partial` holds the requests done before.
#[derive(Debug, thiserror::Error)]
#[error("the serial port failed: {error}")]
pub struct PortLost {
    #[source]
    pub error: io::Error,
    pub partial: CycleReport,
}

/// The master of one bus. Owns the port; drop it after [`PortLost`] and make a new one on the
/// reopened port.
pub struct Poller<T> {
    line: Line<T>,
    client: Option<Context>,
    timing: Timing,
}

impl<T> Poller<T>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    pub fn new(transport: T, timing: Timing) -> Self {
        Self {
            line: Line::new(transport),
            client: None,
            timing,
        }
    }

    /// Bytes read from the port so far (answers, late answers and noise alike).
    pub(crate) fn bytes_received(&self) -> u64 {
        self.line.received()
    }

    /// Runs every request of `plan` in turn.
    pub async fn poll(&mut self, plan: &Plan) -> Result<CycleReport, PortLost> {
        let mut report = CycleReport::default();
        for request in &plan.requests {
            let result = match self.read(request).await {
                Ok(result) => result,
                Err(error) => {
                    return Err(PortLost {
                        error,
                        partial: report,
                    })
                }
            };
            let at = Timestamp::now();
            let raw = match &result {
                Ok(registers) => {
                    report.values.extend(request.decode(registers));
                    Vec::new()
                }
                Err(fault) => {
                    report.values.extend(request.fail(fault));
                    self.line.captured()
                }
            };
            report.requests.push(RequestOutcome {
                unit: request.unit,
                kind: request.kind,
                start: request.start,
                count: request.count,
                result: result.map(drop),
                at,
                raw,
            });
        }
        Ok(report)
    }

    /// One request: its registers or a fault; `Err` only when the port is gone.
    pub async fn read(&mut self, request: &ReadRequest) -> io::Result<Result<Vec<u16>, Fault>> {
        tokio::time::sleep(self.timing.gap).await;
        let stale = self.line.discard_pending()?;
        if stale > 0 {
            tracing::debug!(stale, "dropped bytes that arrived between requests");
        }
        self.line.begin_capture();

        let slave = Slave(request.unit);
        let line = &self.line;
        let client = self
            .client
            .get_or_insert_with(|| rtu::attach_slave(line.tap(), slave));
        client.set_slave(slave);
        let call = match request.kind {
            RegisterKind::Holding => Request::ReadHoldingRegisters(request.start, request.count),
            RegisterKind::Input => Request::ReadInputRegisters(request.start, request.count),
        };
        let wait = self.timing.request_timeout(request.count);
        let answer = tokio::time::timeout(wait, client.call(call)).await;
        if let Some(error) = self.line.take_failure() {
            self.client = None;
            return Err(error);
        }

        let result = match answer {
            Err(_elapsed) => Err(self.classify_captured(request, true)),
            Ok(Ok(Ok(
                Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words),
            ))) if words.len() == usize::from(request.count) => Ok(words),
            Ok(Ok(Ok(_))) => Err(Fault::Unexpected),
            Ok(Ok(Err(exception))) => Err(Fault::Exception(exception.into())),
            Ok(Err(tokio_modbus::Error::Protocol(_))) => Err(Fault::Unexpected),
            // The line did not fail, so this is tokio-modbus's decoder giving up on the bytes.
            Ok(Err(tokio_modbus::Error::Transport(_))) => {
                Err(self.classify_captured(request, false))
            }
        };
        if let Err(fault) = &result {
            tracing::debug!(unit = request.unit, start = request.start, %fault, "Modbus request failed");
            if !matches!(fault, Fault::Exception(_)) {
                self.client = None;
                self.line
                    .drain(self.timing.settle, self.timing.timeout)
                    .await?;
            }
        }
        Ok(result)
    }

    /// What the bytes read during a request that got no usable answer were.
    fn classify_captured(&self, request: &ReadRequest, timed_out: bool) -> Fault {
        let captured = self.line.captured();
        match parse_response(request.unit, request.kind, request.count, &captured) {
            // Silence, the start of an answer, or an answer complete only as time ran out.
            Err(FrameError::Incomplete) | Ok(_) if timed_out => Fault::Timeout,
            Err(FrameError::Exception(code)) => Fault::Exception(code),
            Err(FrameError::ByteCount { .. }) | Ok(_) => Fault::Unexpected,
            Err(_) => Fault::Crc,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_follows_the_baud_rate() {
        assert_eq!(frame_gap(9600), Duration::from_micros(4010));
        assert_eq!(frame_gap(1200), Duration::from_micros(32_083));
        assert_eq!(frame_gap(115_200), Duration::from_micros(1750));
        let t = Timing::new(Duration::from_millis(500), 9600);
        assert_eq!(t.settle, SETTLE_FLOOR);
        let short = Timing::new(Duration::from_millis(40), 9600);
        assert_eq!(short.settle, Duration::from_millis(40));
        // 125 registers at 9600 baud: 263 bytes of 1.146 ms on the wire.
        assert_eq!(
            t.request_timeout(125).as_micros(),
            500_000 + 263 * 1_145_833 / 1000
        );
    }
}
