//! The streaming decoder on arbitrary bytes in arbitrary chunks: it never panics, holds at
//! most MAX_ENCODED bytes, always makes progress, agrees with the one-shot `decode`, and every
//! frame it accepts re-encodes to a frame that decodes to the same thing. The iterator
//! `frames()`, fed whole, yields the same items with the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sahool_wire::{decode, encode, DecodeError, Frame, FrameDecoder, MAX_ENCODED, MAX_FRAME};

fn wire(frame: &Frame) -> Vec<u8> {
    let mut out = [0u8; MAX_FRAME];
    let n = encode(frame, &mut out).expect("a decoded frame re-encodes");
    out[..n].to_vec()
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size the rest arrives in.
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let mut decoder = FrameDecoder::new();
    let mut items = Vec::new();
    for piece in stream.chunks(usize::from(chunk).max(1)) {
        let mut rest = piece;
        while !rest.is_empty() {
            let (item, tail) = decoder.feed(rest);
            assert!(tail.len() < rest.len(), "no progress");
            rest = tail;
            let Some(item) = item else { continue };
            let raw = decoder.frame_bytes();
            assert!(!raw.is_empty() && raw.len() <= MAX_ENCODED && !raw.contains(&0));
            items.push((item.clone(), raw.to_vec()));
            match item {
                Ok(frame) => {
                    // Compared by encoding: floats by their bits, so NaN equals itself.
                    let once = decode(raw).expect("the one-shot decoder agrees");
                    let bytes = wire(&frame);
                    assert_eq!(wire(&once), bytes);
                    let again = decode(&bytes).expect("a re-encoded frame decodes");
                    assert_eq!(wire(&again), bytes);
                }
                Err(DecodeError::Overlong { .. }) => assert_eq!(raw.len(), MAX_ENCODED),
                Err(e) => assert_eq!(decode(raw), Err(e)),
            }
        }
    }
    let whole: Vec<_> = FrameDecoder::new().frames(stream).collect();
    assert_eq!(whole.len(), items.len());
    for ((a, raw_a), (b, raw_b)) in whole.iter().zip(&items) {
        assert_eq!(&raw_a[..], &raw_b[..]);
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(wire(a), wire(b)),
            (a, b) => assert_eq!(a.as_ref().err(), b.as_ref().err()),
        }
    }
});
