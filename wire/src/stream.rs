//! Frames out of a byte stream that arrives in arbitrary chunks.
//!
//! Invariants: the decoder holds at most [`MAX_ENCODED`] bytes and never allocates; every byte
//! fed ends up in exactly one reported item (a frame or an error) or is a delimiter, except the
//! tail of an overlong run, which is skipped (reported once, when the limit is reached).
//! Empty frames (0x00 after 0x00, as an idle or resynchronising sender emits) are not reported.

use crate::codec::{decode, MAX_ENCODED};
use crate::error::DecodeError;
use crate::message::Frame;

/// Splits a stream at 0x00 delimiters and decodes each frame.
///
/// ```
/// use sahool_wire::{FrameDecoder, Frame, Reading, encode, MAX_FRAME};
///
/// let mut wire = [0u8; MAX_FRAME];
/// let n = encode(&Frame::reading(7, 1, Reading::default()), &mut wire).unwrap();
///
/// let mut decoder = FrameDecoder::new();
/// // Input arrives in pieces; a frame may span several.
/// for chunk in wire[..n].chunks(5) {
///     for (item, raw) in decoder.frames(chunk) {
///         assert_eq!(item.unwrap().node, 7);
///         assert_eq!(raw.len(), n - 1);
///     }
/// }
/// ```
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    buf: [u8; MAX_ENCODED],
    /// Bytes of the frame being received.
    len: usize,
    /// Bytes of the item last returned, at the start of `buf` until the next byte arrives.
    last: usize,
    /// Past the limit: dropping bytes until the next delimiter.
    skipping: bool,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    pub const fn new() -> Self {
        Self {
            buf: [0; MAX_ENCODED],
            len: 0,
            last: 0,
            skipping: false,
        }
    }

    /// Consumes `input` up to the end of the first item (a frame or an error) and returns that
    /// item with the input not consumed yet; `(None, [])` when `input` ran out mid-frame.
    /// Call again with the rest until it is empty.
    pub fn feed<'i>(&mut self, input: &'i [u8]) -> (Option<Result<Frame, DecodeError>>, &'i [u8]) {
        for (i, &byte) in input.iter().enumerate() {
            if let Some(item) = self.push(byte) {
                return (Some(item), &input[i + 1..]);
            }
        }
        (None, &[])
    }

    /// Takes one byte; returns an item when it completes one.
    pub fn push(&mut self, byte: u8) -> Option<Result<Frame, DecodeError>> {
        self.last = 0;
        if byte == 0 {
            let len = core::mem::take(&mut self.len);
            if core::mem::take(&mut self.skipping) || len == 0 {
                return None;
            }
            self.last = len;
            return Some(decode(&self.buf[..len]));
        }
        if self.skipping {
            return None;
        }
        if self.len == MAX_ENCODED {
            // The buffer keeps the first MAX_ENCODED bytes for `frame_bytes`.
            self.skipping = true;
            self.last = core::mem::take(&mut self.len);
            return Some(Err(DecodeError::Overlong { limit: MAX_ENCODED }));
        }
        self.buf[self.len] = byte;
        self.len += 1;
        None
    }

    /// The bytes, as received and without the delimiter, of the item just returned by
    /// [`feed`](Self::feed) or [`push`](Self::push) (for an overlong run, its first
    /// [`MAX_ENCODED`] bytes). Empty once more input was given.
    pub fn frame_bytes(&self) -> &[u8] {
        &self.buf[..self.last]
    }

    /// Every item `input` completes, each with a copy of its bytes (see
    /// [`frame_bytes`](Self::frame_bytes)); a frame left incomplete at the end of `input`
    /// continues with the next call.
    pub fn frames<'d, 'i>(&'d mut self, input: &'i [u8]) -> Frames<'d, 'i> {
        Frames {
            decoder: self,
            input,
        }
    }

    /// Forgets a partly received frame, e.g. after the port was reopened.
    pub fn reset(&mut self) {
        *self = Self::new();
    }
}

/// A frame's bytes as received, without the delimiter.
pub type RawFrame = heapless::Vec<u8, MAX_ENCODED>;

/// The items of one chunk of input: see [`FrameDecoder::frames`].
pub struct Frames<'d, 'i> {
    decoder: &'d mut FrameDecoder,
    input: &'i [u8],
}

impl Iterator for Frames<'_, '_> {
    type Item = (Result<Frame, DecodeError>, RawFrame);

    fn next(&mut self) -> Option<Self::Item> {
        while !self.input.is_empty() {
            let (item, rest) = self.decoder.feed(self.input);
            self.input = rest;
            if let Some(item) = item {
                // frame_bytes() never exceeds MAX_ENCODED, the capacity.
                let raw = RawFrame::from_slice(self.decoder.frame_bytes()).unwrap_or_default();
                return Some((item, raw));
            }
        }
        None
    }
}
