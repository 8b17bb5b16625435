//! The messages a frame carries. Payloads are postcard-encoded in field order (see `README.md`
//! for the bytes); any change to a payload's layout is a new protocol version.

use core::fmt;

use serde::{Deserialize, Serialize};

/// Values one reading frame carries at most.
pub const MAX_VALUES: usize = 16;

/// One frame: who sent it (or whom it answers), its sequence number and its message.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// The node's id, unique on its serial port.
    pub node: u32,
    /// The node's frame counter (wrapping). An ack repeats the seq it acknowledges.
    pub seq: u32,
    pub message: Message,
}

impl Frame {
    pub fn reading(node: u32, seq: u32, reading: Reading) -> Self {
        Self {
            node,
            seq,
            message: Message::Reading(reading),
        }
    }

    /// The gateway's answer to the reading frame `(node, seq)`.
    pub fn ack(node: u32, seq: u32, ack: Ack) -> Self {
        Self {
            node,
            seq,
            message: Message::Ack(ack),
        }
    }

    pub fn kind(&self) -> Kind {
        match self.message {
            Message::Reading(_) => Kind::Reading,
            Message::Ack(_) => Kind::Ack,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Reading(Reading),
    Ack(Ack),
}

/// The message kind: byte 1 of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Node → gateway: measured values.
    Reading = 1,
    /// Gateway → node: a reading frame is committed (or was already).
    Ack = 2,
}

impl Kind {
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Reading),
            2 => Some(Self::Ack),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Reading => "reading",
            Self::Ack => "ack",
        })
    }
}

/// Values a node measured at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// Up to [`MAX_VALUES`] values, each tagged with the node's channel number; the gateway's
    /// config binds `(port, node, channel)` to a sensor.
    pub values: heapless::Vec<ChannelValue, MAX_VALUES>,
    /// Battery charge in percent (0..=100), if the node knows it.
    pub battery: Option<u8>,
    /// When the values were measured: Unix time in milliseconds (UTC), if the node has a clock.
    /// Without it the gateway stamps the reading with the time it received it, which is late
    /// for a frame that waited in the node's buffer; nodes without a clock can set theirs from
    /// [`Ack::gateway_time_ms`].
    pub time_ms: Option<u64>,
}

impl Reading {
    /// Adds a value; `Err` gives it back when the frame already holds [`MAX_VALUES`].
    pub fn push(&mut self, channel: u8, value: f32) -> Result<(), ChannelValue> {
        self.values.push(ChannelValue { channel, value })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChannelValue {
    pub channel: u8,
    pub value: f32,
}

/// The gateway's acknowledgement of one reading frame, sent only after its values are durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub status: AckStatus,
    /// The gateway's clock (Unix milliseconds, UTC) when it sent the ack.
    pub gateway_time_ms: u64,
}

/// Either way the node may forget the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckStatus {
    /// Committed now.
    Stored,
    /// Committed earlier: this was a resend (the first ack was lost or late).
    Duplicate,
}
