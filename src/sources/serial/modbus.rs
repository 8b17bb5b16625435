//! The `modbus-rtu` engine: reads holding and input registers of the slaves on one RS-485 bus
//! and turns them into raw (unscaled) values, one per configured point.
//!
//! - [`plan`]: sans-IO. Points → read requests, one per run of nearby registers of one slave
//!   and register kind, so a slave with several sensors is asked once per cycle.
//! - [`decode`]: sans-IO. A request's registers → each point's value by type and word order.
//! - [`frame`]: sans-IO. Checks a raw RTU response frame (CRC-16/MODBUS, unit, function, byte
//!   count); the poller uses it to tell a corrupt answer from silence.
//! - [`poller`]: async. Runs a plan over any byte transport through tokio-modbus, one request
//!   at a time, each bounded by the response timeout, and reports a value or a [`Fault`] per
//!   point. A lost port ends the cycle with [`PortLost`] so the caller can reopen it.
//! - [`bus`]: writes and reads from outside the poll loop (actuators): the [`BusRequests`]
//!   registry of running ports and the typed [`BusError`].
//! - [`port`]: the engine on a gateway port ([`run`]): the port's sensors as poll groups, the
//!   schedule, and each poll's values and faults committed, counted and logged; bus requests
//!   served between poll requests.
//!
//! Invariants: requests on one bus (polls, writes, read-backs) never overlap in time; every point of a plan gets exactly
//! one result per cycle; a value is never taken from a frame that failed its CRC or answered
//! another request; scale and offset are not applied here (the mapping does that).

pub mod bus;
pub mod decode;
pub mod frame;
mod line;
pub mod plan;
pub mod poller;
pub mod port;

pub use bus::{BusError, BusReply, BusRequest, BusRequestKind, BusRequests, Read, Write};
pub use decode::{DecodeError, EncodeError};
pub use frame::{parse_coils, parse_response, parse_write_echo, Echo, FrameError};
pub use plan::{plan, Plan, PointError, ReadRequest, Slot};
pub use poller::{CycleReport, Poller, PortLost, RequestOutcome, Timing};
pub use port::run;

/// The caller's handle for one configured point (e.g. its index in the port's sensor list).
pub(crate) type PointId = usize;

/// Highest unit id a slave may have; 0 is broadcast and gets no answers.
pub(crate) const MAX_UNIT: u8 = 247;

/// Which register table a point lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RegisterKind {
    /// Function 0x03.
    Holding,
    /// Function 0x04.
    Input,
}

impl RegisterKind {
    /// `holding` or `input`, as the config names it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Holding => "holding",
            Self::Input => "input",
        }
    }

    pub fn function_code(self) -> u8 {
        match self {
            Self::Holding => 0x03,
            Self::Input => 0x04,
        }
    }
}

/// How a point's register(s) encode its value: the config's own type, so the bounds and
/// widths the config checks are the ones the bus uses.
pub use crate::config::serial::RegisterType as ValueType;

/// Order of the two registers of a 32-bit value (bytes within a register are always big-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WordOrder {
    /// High word first, at the lower register ("ABCD").
    #[default]
    Big,
    /// Low word first ("CDAB"), as many meters and PLCs send it.
    Little,
}

/// One configured value on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    pub id: PointId,
    /// Slave id, 1..=247.
    pub unit: u8,
    pub kind: RegisterKind,
    /// Zero-based register address (as sent on the wire).
    pub register: u16,
    pub value_type: ValueType,
    pub word_order: WordOrder,
}

/// Why a point has no value this cycle. [`Fault::reason`] is the metrics label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// Nothing (or only the start of an answer) arrived within the response timeout.
    #[error("no answer within the response timeout")]
    Timeout,
    /// Bytes arrived but no frame passed the CRC-16 check (corrupt answer or line noise).
    #[error("the answer failed its CRC check")]
    Crc,
    /// The slave refused the request with a Modbus exception.
    #[error("Modbus exception {0:#04x} ({desc})", desc = exception_name(*.0))]
    Exception(u8),
    /// A valid frame arrived that does not answer the request: another unit or function, or
    /// the wrong number of registers (typically a late answer to an earlier request).
    #[error("an answer that does not match the request")]
    Unexpected,
    /// A float register pair holds NaN or infinity, which is no measurement.
    #[error("the register value is not a finite number")]
    NotFinite,
}

impl Fault {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Crc => "crc",
            Self::Exception(_) => "exception",
            Self::Unexpected => "unexpected",
            Self::NotFinite => "not_finite",
        }
    }
}

/// The standard name of a Modbus exception code, for messages.
pub(crate) fn exception_name(code: u8) -> &'static str {
    match code {
        0x01 => "illegal function",
        0x02 => "illegal data address",
        0x03 => "illegal data value",
        0x04 => "server device failure",
        0x05 => "acknowledge",
        0x06 => "server device busy",
        0x08 => "memory parity error",
        0x0A => "gateway path unavailable",
        0x0B => "gateway target device failed to respond",
        _ => "unknown",
    }
}
