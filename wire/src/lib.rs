//! The frame format between SAHOOL firmware nodes and the gateway, shared by both sides.
//!
//! `no_std` and allocation-free unless the `use-std` feature is on (the gateway side), so the
//! same code runs on a microcontroller and in the gateway.
//!
//! # A frame on the wire
//! ```text
//! COBS( version u8 | kind u8 | node u32 LE | seq u32 LE | payload (postcard) | CRC-32 LE ) 0x00
//! ```
//! - `version` is [`VERSION`]; a frame of another version is refused with
//!   [`DecodeError::UnsupportedVersion`]. The version byte, the CRC-32 trailer and the COBS
//!   framing never change between versions, so any version can be recognised and refused cleanly.
//! - `kind` says which message the payload is: [`Kind::Reading`] (node → gateway) or
//!   [`Kind::Ack`] (gateway → node). In an ack, `node` and `seq` are those of the reading frame
//!   it acknowledges.
//! - The CRC is CRC-32/ISO-HDLC (the zlib/Ethernet CRC) over every byte before it.
//! - COBS removes every 0x00 from the frame, so 0x00 delimits frames: a receiver that joins
//!   mid-stream, or meets noise, resynchronises at the next 0x00.
//!
//! # Modules
//! - [`message`]: the messages and their limits ([`MAX_VALUES`] values per reading).
//! - [`codec`]: one frame to bytes ([`encode`]) and back ([`decode`]).
//! - [`stream`]: [`FrameDecoder`], frames out of a byte stream cut into arbitrary chunks, with a
//!   fixed buffer: overlong input and garbage are skipped to the next delimiter and reported.
//!
//! `README.md` beside this crate describes the format byte by byte for firmware written in
//! other languages.
#![no_std]
#![forbid(unsafe_code)]

#[cfg(feature = "use-std")]
extern crate std;

pub mod codec;
pub mod error;
pub mod message;
pub mod stream;

#[cfg(feature = "use-std")]
pub use codec::encode_to_vec;
pub use codec::{decode, encode, HEADER_LEN, MAX_BODY, MAX_ENCODED, MAX_FRAME, MAX_PAYLOAD};
pub use error::{DecodeError, EncodeError};
pub use message::{Ack, AckStatus, ChannelValue, Frame, Kind, Message, Reading, MAX_VALUES};
pub use stream::{FrameDecoder, Frames, RawFrame};

/// The protocol version this crate speaks (byte 0 of every frame).
pub const VERSION: u8 = 1;

/// Bytes of the CRC-32 trailer.
pub const CRC_LEN: usize = 4;
