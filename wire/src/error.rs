//! Why a frame could not be decoded or encoded.

use crate::message::Kind;

/// A frame that could not be decoded. The receiver drops it (no ack), so a node resends it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("no 0x00 delimiter within {limit} bytes: overlong frame or garbage, skipped to the next delimiter")]
    Overlong { limit: usize },
    #[error("not valid COBS (a 0x00 inside the frame, or a block running past its end)")]
    Cobs,
    #[error("{len} bytes after COBS decoding, fewer than a header and CRC ({min}): truncated")]
    Truncated { len: usize, min: usize },
    #[error("CRC mismatch: the frame carries {carried:#010x} but its bytes give {computed:#010x}")]
    Crc { carried: u32, computed: u32 },
    #[error("protocol version {found} is not supported (this side speaks version {supported}); update the side that is behind")]
    UnsupportedVersion { found: u8, supported: u8 },
    #[error("unknown message kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("{kind} payload does not decode: {source}")]
    Payload { kind: Kind, source: postcard::Error },
    #[error("{count} unexpected bytes after the {kind} payload")]
    TrailingBytes { kind: Kind, count: usize },
}

impl DecodeError {
    /// A short stable name, for metric labels and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Overlong { .. } => "overlong",
            Self::Cobs => "cobs",
            Self::Truncated { .. } => "truncated",
            Self::Crc { .. } => "crc",
            Self::UnsupportedVersion { .. } => "version",
            Self::UnknownKind { .. } => "kind",
            Self::Payload { .. } => "payload",
            Self::TrailingBytes { .. } => "trailing_bytes",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("output buffer of {available} bytes is too small for this frame ({needed} bytes); crate::MAX_FRAME always suffices")]
    BufferTooSmall { needed: usize, available: usize },
    #[error("payload does not serialize: {0}")]
    Payload(postcard::Error),
}
