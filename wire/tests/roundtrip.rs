//! Every message kind survives encode → chunked streaming decode, whatever the chunking and
//! whatever garbage surrounds it; damaged, truncated and foreign-version frames are refused.

use proptest::prelude::*;
use sahool_wire::{
    decode, encode, Ack, AckStatus, ChannelValue, DecodeError, Frame, FrameDecoder, Message,
    Reading, CRC_LEN, MAX_ENCODED, MAX_FRAME, MAX_VALUES, VERSION,
};

fn reading() -> impl Strategy<Value = Reading> {
    (
        proptest::collection::vec((any::<u8>(), any::<f32>()), 0..=MAX_VALUES),
        proptest::option::of(any::<u8>()),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(values, battery, time_ms)| Reading {
            values: values
                .into_iter()
                .map(|(channel, value)| ChannelValue { channel, value })
                .collect(),
            battery,
            time_ms,
        })
}

fn ack() -> impl Strategy<Value = Ack> {
    (any::<bool>(), any::<u64>()).prop_map(|(dup, gateway_time_ms)| Ack {
        status: if dup {
            AckStatus::Duplicate
        } else {
            AckStatus::Stored
        },
        gateway_time_ms,
    })
}

fn frame() -> impl Strategy<Value = Frame> {
    let message = prop_oneof![
        reading().prop_map(Message::Reading),
        ack().prop_map(Message::Ack)
    ];
    (any::<u32>(), any::<u32>(), message).prop_map(|(node, seq, message)| Frame {
        node,
        seq,
        message,
    })
}

fn wire(frame: &Frame) -> Vec<u8> {
    let mut out = [0u8; MAX_FRAME];
    let n = encode(frame, &mut out).unwrap();
    out[..n].to_vec()
}

/// Frames compared by their encoding, which is injective (floats by their bits, so NaN too).
fn same(a: &Frame, b: &Frame) -> bool {
    wire(a) == wire(b)
}

/// Everything a decoder yields for `stream` fed in chunks of the given sizes (cycled).
fn decode_chunked(stream: &[u8], chunks: &[usize]) -> Vec<(Result<Frame, DecodeError>, Vec<u8>)> {
    let mut decoder = FrameDecoder::new();
    let mut items = Vec::new();
    let mut at = 0;
    for size in chunks.iter().cycle() {
        if at >= stream.len() {
            break;
        }
        let end = (at + size).min(stream.len());
        for (item, raw) in decoder.frames(&stream[at..end]) {
            items.push((item, raw.to_vec()));
        }
        at = end;
    }
    items
}

/// Re-encodes a frame's body (before COBS) with a fresh CRC, as a node of another build would.
fn reframe(body_without_crc: &[u8]) -> Vec<u8> {
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC).checksum(body_without_crc);
    let mut body = body_without_crc.to_vec();
    body.extend_from_slice(&crc.to_le_bytes());
    let mut out = vec![0u8; cobs::max_encoding_length(body.len()) + 1];
    let n = cobs::encode(&body, &mut out);
    out.truncate(n);
    out.push(0);
    out
}

fn unstuffed(wire: &[u8]) -> Vec<u8> {
    let mut body = vec![0u8; wire.len()];
    let n = cobs::decode(&wire[..wire.len() - 1], &mut body).unwrap();
    body.truncate(n);
    body
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn frames_round_trip_through_any_chunking(
        frames in proptest::collection::vec(frame(), 1..8),
        chunks in proptest::collection::vec(1usize..64, 1..8),
    ) {
        let stream: Vec<u8> = frames.iter().flat_map(wire).collect();
        let items = decode_chunked(&stream, &chunks);
        prop_assert_eq!(items.len(), frames.len());
        for ((item, raw), sent) in items.iter().zip(&frames) {
            let got = item.as_ref().unwrap();
            prop_assert!(same(got, sent), "{:?} != {:?}", got, sent);
            let mut framed = raw.clone();
            framed.push(0);
            prop_assert_eq!(&framed, &wire(sent));
        }
    }

    #[test]
    fn frames_survive_garbage_between_them(
        frames in proptest::collection::vec(frame(), 1..6),
        garbage in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..6),
        chunks in proptest::collection::vec(1usize..200, 1..4),
    ) {
        // Garbage, delimiter, frame, garbage, delimiter, frame...: every frame is found again.
        let mut stream = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            stream.extend_from_slice(&garbage[i % garbage.len()]);
            stream.push(0);
            stream.extend_from_slice(&wire(f));
        }
        let good: Vec<Frame> = decode_chunked(&stream, &chunks)
            .into_iter()
            .filter_map(|(item, raw)| {
                assert!(raw.len() <= MAX_ENCODED);
                item.ok()
            })
            .collect();
        // Garbage may by chance contain a valid frame (CRC-32 makes that ~2^-32 per piece);
        // the sent frames come out in order among what decodes.
        let mut sent = frames.iter();
        let mut next = sent.next();
        for g in &good {
            if let Some(want) = next {
                if same(g, want) {
                    next = sent.next();
                }
            }
        }
        prop_assert!(next.is_none(), "a frame was lost among garbage");
    }

    #[test]
    fn any_byte_changed_is_refused(f in frame(), at in any::<prop::sample::Index>(), to in 1u8..=255) {
        let mut w = wire(&f);
        let i = at.index(w.len() - 1); // not the delimiter
        prop_assume!(w[i] != to);
        w[i] = to;
        prop_assert!(decode(&w).is_err());
    }

    #[test]
    fn a_changed_body_byte_is_a_crc_error(f in frame(), at in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let mut body = unstuffed(&wire(&f));
        let i = at.index(body.len());
        body[i] ^= flip;
        let mut w = vec![0u8; MAX_FRAME];
        let n = cobs::encode(&body, &mut w);
        let got = decode(&w[..n]);
        prop_assert!(matches!(got, Err(DecodeError::Crc { .. })), "{:?}", got);
    }

    #[test]
    fn every_truncation_is_refused(f in frame()) {
        let w = wire(&f);
        for cut in 0..w.len() - 1 {
            prop_assert!(decode(&w[..cut]).is_err(), "prefix of {} bytes decoded", cut);
        }
    }

    #[test]
    fn arbitrary_input_never_panics_and_stays_bounded(
        stream in proptest::collection::vec(any::<u8>(), 0..2000),
        chunks in proptest::collection::vec(1usize..300, 1..6),
    ) {
        for (item, raw) in decode_chunked(&stream, &chunks) {
            prop_assert!(raw.len() <= MAX_ENCODED);
            prop_assert!(!raw.is_empty());
            if let Ok(f) = item {
                prop_assert!(same(&decode(&raw).unwrap(), &f));
            }
        }
    }
}

#[test]
fn another_version_with_a_good_crc_is_refused_by_version() {
    let mut body = unstuffed(&wire(&Frame::reading(1, 2, Reading::default())));
    body.truncate(body.len() - CRC_LEN);
    body[0] = VERSION + 1;
    assert_eq!(
        decode(&reframe(&body)),
        Err(DecodeError::UnsupportedVersion {
            found: VERSION + 1,
            supported: VERSION
        })
    );
}

#[test]
fn an_unknown_kind_is_refused_by_kind() {
    let mut body = unstuffed(&wire(&Frame::reading(1, 2, Reading::default())));
    body.truncate(body.len() - CRC_LEN);
    body[1] = 9;
    assert_eq!(
        decode(&reframe(&body)),
        Err(DecodeError::UnknownKind { kind: 9 })
    );
}

#[test]
fn extra_payload_bytes_are_refused() {
    let mut body = unstuffed(&wire(&Frame::reading(1, 2, Reading::default())));
    body.truncate(body.len() - CRC_LEN);
    body.push(0x55);
    assert!(matches!(
        decode(&reframe(&body)),
        Err(DecodeError::TrailingBytes { count: 1, .. })
    ));
}

#[test]
fn more_values_than_the_limit_are_refused() {
    // A length prefix of MAX_VALUES + 1 followed by that many values.
    let mut body = unstuffed(&wire(&Frame::reading(1, 2, Reading::default())));
    body.truncate(10);
    body.push(MAX_VALUES as u8 + 1);
    for c in 0..=MAX_VALUES as u8 {
        body.push(c);
        body.extend_from_slice(&1.0f32.to_le_bytes());
    }
    body.extend_from_slice(&[0, 0]);
    assert!(matches!(
        decode(&reframe(&body)),
        Err(DecodeError::Payload { .. })
    ));
}

#[test]
fn a_short_frame_is_truncated_and_noise_without_delimiters_is_overlong_once() {
    assert!(matches!(
        decode(&[0x03, 0x01, 0x01, 0x00]),
        Err(DecodeError::Truncated { len: 2, .. })
    ));
    let good = wire(&Frame::reading(5, 6, Reading::default()));
    let mut stream = vec![0x42; 10 * MAX_ENCODED];
    stream.push(0);
    stream.extend_from_slice(&good);
    let items = decode_chunked(&stream, &[7]);
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(
        items[0].0,
        Err(DecodeError::Overlong { limit: MAX_ENCODED })
    );
    assert_eq!(items[0].1.len(), MAX_ENCODED);
    assert_eq!(items[1].0.as_ref().unwrap().node, 5);
}

#[test]
fn a_zero_inside_a_frame_is_a_cobs_error_and_idle_delimiters_are_silent() {
    let mut w = wire(&Frame::reading(5, 6, Reading::default()));
    w.insert(3, 0);
    assert_eq!(decode(&w), Err(DecodeError::Cobs));
    assert!(decode_chunked(&[0, 0, 0, 0], &[1]).is_empty());
}
