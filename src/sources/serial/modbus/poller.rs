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

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_modbus::client::{rtu, Client, Context};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{Request, Response, Slave};

use super::bus::{BusReply, BusRequestKind, Read, Write};
use super::frame::{parse_coils, parse_response, parse_write_echo, Echo, FrameError};
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

    /// The wait for an answer: the timeout plus the wire time of the request and the answer,
    /// `bytes` together. At 9600 baud a 125-register answer alone takes 290 ms.
    fn exchange_timeout(&self, bytes: u32) -> Duration {
        self.timeout + self.char_time * bytes
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
            if let Err(error) = self.poll_request(request, &mut report).await {
                return Err(PortLost {
                    error,
                    partial: report,
                });
            }
        }
        Ok(report)
    }

    /// Runs one request of a plan and adds its values and outcome to `report`; `Err` only
    /// when the port is gone.
    pub async fn poll_request(
        &mut self,
        request: &ReadRequest,
        report: &mut CycleReport,
    ) -> io::Result<()> {
        let result = self.read(request).await?;
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
        Ok(())
    }

    /// One request: its registers or a fault; `Err` only when the port is gone.
    pub async fn read(&mut self, request: &ReadRequest) -> io::Result<Result<Vec<u16>, Fault>> {
        let op = Op::Registers {
            unit: request.unit,
            kind: request.kind,
            start: request.start,
            count: request.count,
        };
        Ok(self.exchange(&op).await?.and_then(|answer| match answer {
            Answer::Registers(words) => Ok(words),
            _ => Err(Fault::Unexpected),
        }))
    }

    /// One write or read from outside the poll loop (an actuator's); `Err` only when the port
    /// is gone.
    pub async fn serve(&mut self, request: &BusRequestKind) -> io::Result<Result<BusReply, Fault>> {
        let op = Op::from(request);
        Ok(self.exchange(&op).await?.and_then(|answer| match answer {
            Answer::Written => Ok(BusReply::Written),
            Answer::Registers(words) => Ok(BusReply::Registers(words)),
            Answer::Coils(coils) => coils
                .first()
                .map(|&c| BusReply::Coil(c))
                .ok_or(Fault::Unexpected),
        }))
    }

    /// One request and its answer, after the inter-frame gap; on a fault other than an
    /// exception the line is drained and the client replaced.
    async fn exchange(&mut self, op: &Op) -> io::Result<Result<Answer, Fault>> {
        tokio::time::sleep(self.timing.gap).await;
        let stale = self.line.discard_pending()?;
        if stale > 0 {
            tracing::debug!(stale, "dropped bytes that arrived between requests");
        }
        self.line.begin_capture();

        let slave = Slave(op.unit());
        let line = &self.line;
        let client = self
            .client
            .get_or_insert_with(|| rtu::attach_slave(line.tap(), slave));
        client.set_slave(slave);
        let wait = self.timing.exchange_timeout(op.wire_bytes());
        let answer = tokio::time::timeout(wait, client.call(op.request())).await;
        if let Some(error) = self.line.take_failure() {
            self.client = None;
            return Err(error);
        }

        let result = match answer {
            Err(_elapsed) => Err(self.classify_captured(op, true)),
            Ok(Ok(Ok(response))) => op.accept(response),
            Ok(Ok(Err(exception))) => Err(Fault::Exception(exception.into())),
            Ok(Err(tokio_modbus::Error::Protocol(_))) => Err(Fault::Unexpected),
            // The line did not fail, so this is tokio-modbus's decoder giving up on the bytes.
            Ok(Err(tokio_modbus::Error::Transport(_))) => Err(self.classify_captured(op, false)),
        };
        if let Err(fault) = &result {
            tracing::debug!(unit = op.unit(), request = ?op, %fault, "Modbus request failed");
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
    fn classify_captured(&self, op: &Op, timed_out: bool) -> Fault {
        match op.check_frame(&self.line.captured()) {
            // Silence, the start of an answer, or an answer complete only as time ran out.
            Err(FrameError::Incomplete) | Ok(()) if timed_out => Fault::Timeout,
            Err(FrameError::Exception(code)) => Fault::Exception(code),
            Err(FrameError::ByteCount { .. } | FrameError::Echo { .. }) | Ok(()) => {
                Fault::Unexpected
            }
            Err(_) => Fault::Crc,
        }
    }
}

/// One exchange on the bus, whoever asked for it.
#[derive(Debug)]
enum Op {
    Registers {
        unit: u8,
        kind: RegisterKind,
        start: u16,
        count: u16,
    },
    Coil {
        unit: u8,
        coil: u16,
    },
    WriteCoil {
        unit: u8,
        coil: u16,
        on: bool,
    },
    WriteRegisters {
        unit: u8,
        start: u16,
        words: Vec<u16>,
    },
}

/// What an exchange got, checked against its request.
enum Answer {
    Registers(Vec<u16>),
    Coils(Vec<bool>),
    Written,
}

/// The value function 0x05 carries for a coil.
fn coil_word(on: bool) -> u16 {
    if on {
        0xFF00
    } else {
        0x0000
    }
}

impl From<&BusRequestKind> for Op {
    fn from(kind: &BusRequestKind) -> Self {
        match kind.clone() {
            BusRequestKind::Write(Write::Coil { unit, coil, on }) => {
                Op::WriteCoil { unit, coil, on }
            }
            BusRequestKind::Write(Write::Registers {
                unit,
                register,
                words,
            }) => Op::WriteRegisters {
                unit,
                start: register,
                words,
            },
            BusRequestKind::Read(Read::Coil { unit, coil }) => Op::Coil { unit, coil },
            BusRequestKind::Read(Read::Registers {
                unit,
                register,
                count,
            }) => Op::Registers {
                unit,
                kind: RegisterKind::Holding,
                start: register,
                count,
            },
        }
    }
}

impl Op {
    fn unit(&self) -> u8 {
        match self {
            Op::Registers { unit, .. }
            | Op::Coil { unit, .. }
            | Op::WriteCoil { unit, .. }
            | Op::WriteRegisters { unit, .. } => *unit,
        }
    }

    fn request(&self) -> Request<'static> {
        match self {
            Op::Registers {
                kind: RegisterKind::Holding,
                start,
                count,
                ..
            } => Request::ReadHoldingRegisters(*start, *count),
            Op::Registers { start, count, .. } => Request::ReadInputRegisters(*start, *count),
            Op::Coil { coil, .. } => Request::ReadCoils(*coil, 1),
            Op::WriteCoil { coil, on, .. } => Request::WriteSingleCoil(*coil, *on),
            Op::WriteRegisters { start, words, .. } => match words.as_slice() {
                [word] => Request::WriteSingleRegister(*start, *word),
                _ => Request::WriteMultipleRegisters(*start, Cow::Owned(words.clone())),
            },
        }
    }

    /// Bytes of the request and its answer on the wire.
    fn wire_bytes(&self) -> u32 {
        match self {
            Op::Registers { count, .. } => 13 + 2 * u32::from(*count),
            Op::Coil { .. } => 8 + 6,
            Op::WriteCoil { .. } => 8 + 8,
            Op::WriteRegisters { words, .. } => 9 + 2 * words.len() as u32 + 8,
        }
    }

    /// The function code and echo a write's answer must carry.
    fn echo(&self) -> Option<Echo> {
        let (function, address, value) = match self {
            Op::WriteCoil { coil, on, .. } => (0x05, *coil, coil_word(*on)),
            Op::WriteRegisters { start, words, .. } => match words.as_slice() {
                [word] => (0x06, *start, *word),
                _ => (0x10, *start, u16::try_from(words.len()).unwrap_or(u16::MAX)),
            },
            Op::Registers { .. } | Op::Coil { .. } => return None,
        };
        Some(Echo {
            function,
            address,
            value,
        })
    }

    /// `response` if it answers this request; a late answer to another is `Unexpected`.
    fn accept(&self, response: Response) -> Result<Answer, Fault> {
        let written = |address: u16, value: u16| {
            self.echo()
                .filter(|e| (e.address, e.value) == (address, value))
                .map(|_| Answer::Written)
        };
        let answer = match (self, response) {
            (
                Op::Registers { count, .. },
                Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words),
            ) if words.len() == usize::from(*count) => Some(Answer::Registers(words)),
            (Op::Coil { .. }, Response::ReadCoils(coils)) if !coils.is_empty() => {
                Some(Answer::Coils(coils))
            }
            (Op::WriteCoil { .. }, Response::WriteSingleCoil(address, on)) => {
                written(address, coil_word(on))
            }
            (
                Op::WriteRegisters { .. },
                Response::WriteSingleRegister(address, value)
                | Response::WriteMultipleRegisters(address, value),
            ) => written(address, value),
            _ => None,
        };
        answer.ok_or(Fault::Unexpected)
    }

    /// Checks the raw bytes of an answer to this request.
    fn check_frame(&self, frame: &[u8]) -> Result<(), FrameError> {
        match self {
            Op::Registers {
                unit, kind, count, ..
            } => parse_response(*unit, *kind, *count, frame).map(drop),
            Op::Coil { unit, .. } => parse_coils(*unit, 1, frame).map(drop),
            Op::WriteCoil { unit, .. } | Op::WriteRegisters { unit, .. } => match self.echo() {
                Some(echo) => parse_write_echo(*unit, echo, frame),
                None => Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registers(count: u16) -> Op {
        Op::Registers {
            unit: 1,
            kind: RegisterKind::Holding,
            start: 0,
            count,
        }
    }

    #[test]
    fn a_write_is_confirmed_only_by_its_own_echo() {
        let coil = Op::WriteCoil {
            unit: 7,
            coil: 3,
            on: true,
        };
        assert!(matches!(
            coil.accept(Response::WriteSingleCoil(3, true)),
            Ok(Answer::Written)
        ));
        for other in [
            Response::WriteSingleCoil(3, false),
            Response::WriteSingleCoil(4, true),
            Response::ReadCoils(vec![true]),
        ] {
            assert!(matches!(coil.accept(other), Err(Fault::Unexpected)));
        }
        let float = Op::WriteRegisters {
            unit: 7,
            start: 20,
            words: vec![0x41AC, 0],
        };
        assert!(matches!(
            float.request(),
            Request::WriteMultipleRegisters(20, _)
        ));
        assert!(matches!(
            float.accept(Response::WriteMultipleRegisters(20, 2)),
            Ok(Answer::Written)
        ));
        assert!(matches!(
            float.accept(Response::WriteMultipleRegisters(20, 1)),
            Err(Fault::Unexpected)
        ));
        let wrong_echo = [7, 0x10, 0x00, 0x14, 0x00, 0x01];
        let mut frame = wrong_echo.to_vec();
        frame.extend_from_slice(&super::super::frame::crc16(&wrong_echo));
        assert!(matches!(
            float.check_frame(&frame),
            Err(FrameError::Echo { .. })
        ));
    }

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
            t.exchange_timeout(registers(125).wire_bytes()).as_micros(),
            500_000 + 263 * 1_145_833 / 1000
        );
    }
}
