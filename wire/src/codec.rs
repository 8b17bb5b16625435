//! One frame to bytes and back: header, postcard payload, CRC-32, COBS, delimiter.
//!
//! Decoding checks in this order, so each fault gets its own error: COBS, length, CRC, version,
//! kind, payload. The CRC comes before the version so that line noise reads as a CRC error;
//! a frame with a good CRC and another version is a real frame from a newer (or older) node.

use crc::{Crc, CRC_32_ISO_HDLC};
use serde::{de::DeserializeOwned, Serialize};

use crate::error::{DecodeError, EncodeError};
use crate::message::{Ack, Frame, Kind, Message, Reading, MAX_VALUES};
use crate::{CRC_LEN, VERSION};

/// Bytes before the payload: version, kind, node, seq.
pub const HEADER_LEN: usize = 10;

/// The largest payload: a reading with [`MAX_VALUES`] values (length varint, then channel byte
/// and 4-byte float each), a battery (tag + byte) and a time (tag + varint of up to 10 bytes).
/// An ack is smaller (status varint + time varint).
pub const MAX_PAYLOAD: usize = 1 + MAX_VALUES * (1 + 4) + 2 + 11;

/// The largest frame before COBS: header, payload, CRC.
pub const MAX_BODY: usize = HEADER_LEN + MAX_PAYLOAD + CRC_LEN;

/// The largest frame after COBS, without its delimiter: what a receiver must buffer.
pub const MAX_ENCODED: usize = cobs::max_encoding_length(MAX_BODY);

/// The largest frame on the wire, delimiter included: a buffer this size always suffices
/// for [`encode`].
pub const MAX_FRAME: usize = MAX_ENCODED + 1;

const CRC: Crc<u32> = Crc::<u32>::new(&CRC_32_ISO_HDLC);

/// Writes `frame` into `out` as it goes on the wire (COBS-encoded, ending with the 0x00
/// delimiter) and returns the number of bytes written.
pub fn encode(frame: &Frame, out: &mut [u8]) -> Result<usize, EncodeError> {
    let mut body = [0u8; MAX_BODY];
    body[0] = VERSION;
    body[1] = frame.kind() as u8;
    body[2..6].copy_from_slice(&frame.node.to_le_bytes());
    body[6..10].copy_from_slice(&frame.seq.to_le_bytes());
    let payload_area = &mut body[HEADER_LEN..MAX_BODY - CRC_LEN];
    let payload_len = match &frame.message {
        Message::Reading(r) => serialize(r, payload_area)?,
        Message::Ack(a) => serialize(a, payload_area)?,
    };
    let crc_at = HEADER_LEN + payload_len;
    let crc = CRC.checksum(&body[..crc_at]);
    body[crc_at..crc_at + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    let body = &body[..crc_at + CRC_LEN];

    let needed = cobs::max_encoding_length(body.len()) + 1;
    if out.len() < needed {
        return Err(EncodeError::BufferTooSmall {
            needed,
            available: out.len(),
        });
    }
    let n = cobs::try_encode(body, out).map_err(|_| EncodeError::BufferTooSmall {
        needed,
        available: out.len(),
    })?;
    out[n] = 0;
    Ok(n + 1)
}

/// A frame as a `Vec`, delimiter included.
#[cfg(feature = "use-std")]
pub fn encode_to_vec(frame: &Frame) -> std::vec::Vec<u8> {
    let mut out = [0u8; MAX_FRAME];
    // MAX_FRAME holds every frame and every message serializes within MAX_PAYLOAD.
    let n = encode(frame, &mut out).unwrap_or(0);
    out[..n].to_vec()
}

fn serialize<T: Serialize>(message: &T, area: &mut [u8]) -> Result<usize, EncodeError> {
    postcard::to_slice(message, area)
        .map(|used| used.len())
        .map_err(EncodeError::Payload)
}

/// Decodes one frame from its bytes as received: COBS-encoded, with or without the trailing
/// 0x00 delimiter.
pub fn decode(bytes: &[u8]) -> Result<Frame, DecodeError> {
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if bytes.len() > MAX_ENCODED {
        return Err(DecodeError::Overlong { limit: MAX_ENCODED });
    }
    let mut body = [0u8; MAX_ENCODED];
    let len = unstuff(bytes, &mut body)?;
    decode_body(&body[..len])
}

/// COBS-decodes one frame's bytes (no delimiter) into `out`.
fn unstuff(bytes: &[u8], out: &mut [u8]) -> Result<usize, DecodeError> {
    // `cobs::decode` stops at the first 0x00 and ignores what follows; inside one frame that
    // is a fault, not an end.
    if bytes.is_empty() || bytes.contains(&0) {
        return Err(DecodeError::Cobs);
    }
    cobs::decode(bytes, out).map_err(|_| DecodeError::Cobs)
}

/// Checks and parses a frame after COBS decoding.
fn decode_body(body: &[u8]) -> Result<Frame, DecodeError> {
    const MIN: usize = HEADER_LEN + CRC_LEN;
    if body.len() < MIN {
        return Err(DecodeError::Truncated {
            len: body.len(),
            min: MIN,
        });
    }
    let (covered, trailer) = body.split_at(body.len() - CRC_LEN);
    let carried = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let computed = CRC.checksum(covered);
    if carried != computed {
        return Err(DecodeError::Crc { carried, computed });
    }
    if covered[0] != VERSION {
        return Err(DecodeError::UnsupportedVersion {
            found: covered[0],
            supported: VERSION,
        });
    }
    let kind = Kind::from_byte(covered[1]).ok_or(DecodeError::UnknownKind { kind: covered[1] })?;
    let node = u32::from_le_bytes([covered[2], covered[3], covered[4], covered[5]]);
    let seq = u32::from_le_bytes([covered[6], covered[7], covered[8], covered[9]]);
    let payload = &covered[HEADER_LEN..];
    let message = match kind {
        Kind::Reading => Message::Reading(deserialize::<Reading>(kind, payload)?),
        Kind::Ack => Message::Ack(deserialize::<Ack>(kind, payload)?),
    };
    Ok(Frame { node, seq, message })
}

fn deserialize<T: DeserializeOwned>(kind: Kind, payload: &[u8]) -> Result<T, DecodeError> {
    let (message, rest) = postcard::take_from_bytes::<T>(payload)
        .map_err(|source| DecodeError::Payload { kind, source })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            kind,
            count: rest.len(),
        });
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{AckStatus, ChannelValue};

    fn largest_reading() -> Frame {
        let mut r = Reading {
            battery: Some(100),
            time_ms: Some(u64::MAX),
            ..Reading::default()
        };
        for c in 0..MAX_VALUES as u8 {
            r.push(c, f32::MAX).unwrap();
        }
        Frame::reading(u32::MAX, u32::MAX, r)
    }

    #[test]
    fn the_largest_frame_fills_the_limits_exactly() {
        let mut out = [0u8; MAX_FRAME];
        let n = encode(&largest_reading(), &mut out).unwrap();
        assert_eq!(n, MAX_FRAME, "MAX_PAYLOAD must be the real worst case");
        let ack = Frame::ack(
            u32::MAX,
            u32::MAX,
            Ack {
                status: AckStatus::Duplicate,
                gateway_time_ms: u64::MAX,
            },
        );
        assert!(encode(&ack, &mut out).unwrap() < MAX_FRAME);
    }

    #[test]
    fn a_small_buffer_is_refused_not_overrun() {
        let mut out = [0u8; 20];
        assert!(matches!(
            encode(&largest_reading(), &mut out),
            Err(EncodeError::BufferTooSmall { available: 20, .. })
        ));
    }

    #[test]
    fn the_bytes_are_as_documented() {
        let mut r = Reading::default();
        r.push(3, 1.5).unwrap();
        r.battery = Some(87);
        let frame = Frame::reading(0x0403_0201, 7, r);
        let mut out = [0u8; MAX_FRAME];
        let n = encode(&frame, &mut out).unwrap();
        let mut body = [0u8; MAX_FRAME];
        let len = unstuff(&out[..n - 1], &mut body).unwrap();
        let body = &body[..len];
        let expected_head = [
            1, 1, // version, kind
            1, 2, 3, 4, // node LE
            7, 0, 0, 0, // seq LE
            1, // one value
            3, 0x00, 0x00, 0xc0, 0x3f, // channel 3, 1.5f32 LE
            1, 87, // battery Some(87)
            0,  // time None
        ];
        assert_eq!(&body[..body.len() - CRC_LEN], &expected_head);
        let crc = CRC.checksum(&expected_head).to_le_bytes();
        assert_eq!(&body[body.len() - CRC_LEN..], &crc);
        assert_eq!(out[n - 1], 0);
        assert!(!out[..n - 1].contains(&0));
        assert_eq!(decode(&out[..n]).unwrap(), frame);
        assert_eq!(
            decode(&out[..n - 1]).unwrap().message,
            Message::Reading(Reading {
                values: heapless::Vec::from_slice(&[ChannelValue {
                    channel: 3,
                    value: 1.5
                }])
                .unwrap(),
                battery: Some(87),
                time_ms: None,
            })
        );
    }
}
