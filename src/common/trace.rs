//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>) across the gateway's hop: the
//! `traceparent` (and `tracestate`) a device sends as MQTT 5 user properties, checked and kept
//! with its rows, and the `traceparent` header every published event carries.
//!
//! A device's context is passed on unchanged, parent-id included: the gateway records no
//! spans, so a parent-id of its own would name a span no collector ever receives and cut the
//! platform's spans off from the device's. An event without one gets a context derived from
//! its event id alone (trace-id = the event id's 16 bytes, parent-id = a hash of them), so
//! every retry of a row, across restarts too, carries the same header without storing it.
//!
//! A `traceparent` is fixed-size: parsing, deriving and formatting it allocate nothing; only a
//! device's `tracestate` is kept on the heap, once per message. Property names are matched as
//! written here, in lowercase.

use std::fmt;
use std::sync::Arc;

use rumqttc::v5::mqttbytes::v5;

/// The header and MQTT user property names.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// `00-` + 32 + `-` + 16 + `-` + 2.
pub const TRACEPARENT_LEN: usize = 55;

/// Longest `tracestate` passed on; W3C asks propagators to keep at least 512 characters.
const TRACESTATE_MAX: usize = 512;

/// Flags of a generated context: sampled, so a platform sampling by parent records the events
/// the gateway originates as it does those a device traced.
const SAMPLED: u8 = 0x01;

/// Why a device's `traceparent` is not used (a fresh one is generated instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    #[error("not {TRACEPARENT_LEN} characters")]
    Length,
    #[error("version is not 00")]
    Version,
    #[error("not `00-<32 hex>-<16 hex>-<2 hex>` in lowercase hex")]
    Format,
    #[error("all-zero trace-id or parent-id")]
    Zero,
    #[error("sent more than once")]
    Repeated,
}

/// A checked `traceparent`: version 00, non-zero ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Parses a version-00 `traceparent` by the W3C rules: exact length, lowercase hex,
    /// non-zero trace-id and parent-id. Higher versions are refused rather than guessed at.
    pub fn parse(text: &[u8]) -> Result<Self, TraceError> {
        if text.len() != TRACEPARENT_LEN {
            return Err(TraceError::Length);
        }
        if !text.starts_with(b"00-") {
            return Err(TraceError::Version);
        }
        if text[35] != b'-' || text[52] != b'-' {
            return Err(TraceError::Format);
        }
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        let mut flags = [0u8; 1];
        hex_decode(&text[3..35], &mut trace_id)?;
        hex_decode(&text[36..52], &mut parent_id)?;
        hex_decode(&text[53..55], &mut flags)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return Err(TraceError::Zero);
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags: flags[0],
        })
    }

    /// The context of an event no device traced, from its event id: the same for every
    /// publish of the row. Neither id can be zero (an event id is a version 4 UUID; a zero
    /// hash is replaced).
    pub fn derived(event_id: &[u8; 16]) -> Self {
        let mut trace_id = *event_id;
        if trace_id == [0; 16] {
            trace_id[15] = 1;
        }
        let hash =
            xxhash_rust::xxh3::xxh3_64_with_seed(event_id, u64::from_le_bytes(*b"gw-span\0"));
        Self {
            trace_id,
            parent_id: hash.max(1).to_be_bytes(),
            flags: SAMPLED,
        }
    }

    /// The header text, in a fixed buffer.
    pub fn text(&self) -> TraceText {
        let mut out = [0u8; TRACEPARENT_LEN];
        out[..3].copy_from_slice(b"00-");
        hex_encode(&self.trace_id, &mut out[3..35]);
        out[35] = b'-';
        hex_encode(&self.parent_id, &mut out[36..52]);
        out[52] = b'-';
        hex_encode(&[self.flags], &mut out[53..55]);
        TraceText(out)
    }
}

/// A formatted `traceparent`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceText([u8; TRACEPARENT_LEN]);

impl TraceText {
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits and dashes are ever written.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl fmt::Debug for TraceText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for TraceText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device's trace context as it rides with its rows. `state` is shared by every reading of
/// one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub parent: TraceParent,
    pub state: Option<Arc<str>>,
}

impl TraceContext {
    /// The context in a message's MQTT 5 user properties, if it sent a valid one. An invalid
    /// or repeated `traceparent` is ignored (with its `tracestate`, as W3C asks) and logged at
    /// debug: the reading is kept and gets a generated context. Repeated `tracestate`s are
    /// joined as list members; one too long or with characters a header cannot carry is
    /// dropped, keeping the `traceparent`.
    pub fn from_user_properties<'a>(
        properties: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Option<Self> {
        let mut parent: Option<Result<TraceParent, TraceError>> = None;
        let mut states: Vec<&str> = Vec::new();
        for (key, value) in properties {
            if key == TRACEPARENT {
                parent = Some(match parent {
                    None => TraceParent::parse(value.as_bytes()),
                    Some(_) => Err(TraceError::Repeated),
                });
            } else if key == TRACESTATE {
                states.push(value);
            }
        }
        let parent = match parent? {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "device traceparent ignored; a new trace starts at the gateway");
                return None;
            }
        };
        let state = match states.as_slice() {
            [] => None,
            [one] => Some(Arc::from(*one)),
            many => Some(Arc::from(many.join(","))),
        };
        let state = state.filter(|s: &Arc<str>| tracestate_ok(s));
        Some(Self { parent, state })
    }

    /// The context of an MQTT 5 PUBLISH (broker client and built-in listener alike).
    pub fn from_publish(properties: Option<&v5::PublishProperties>) -> Option<Self> {
        let user = &properties?.user_properties;
        if user.is_empty() {
            return None;
        }
        Self::from_user_properties(user.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// How the store keeps it (the outbox's `trace` column): the `traceparent`, then a space
    /// and the `tracestate` if there is one. Allocates only for a `tracestate`.
    pub fn stored(&self) -> StoredTrace {
        let parent = self.parent.text();
        match &self.state {
            None => StoredTrace::Parent(parent),
            Some(state) => StoredTrace::WithState(format!("{parent} {state}")),
        }
    }

    /// A context read back from the store (checked when it was stored; checked again here,
    /// so a damaged value falls back to a generated one instead of failing the row).
    pub fn from_stored(text: &str) -> Option<Self> {
        let parent = TraceParent::parse(text.as_bytes().get(..TRACEPARENT_LEN)?).ok()?;
        let state = text
            .get(TRACEPARENT_LEN..)
            .and_then(|rest| rest.strip_prefix(' '))
            .filter(|s| tracestate_ok(s))
            .map(Arc::from);
        Some(Self { parent, state })
    }
}

/// A context in its stored form; see [`TraceContext::stored`].
pub enum StoredTrace {
    Parent(TraceText),
    WithState(String),
}

impl StoredTrace {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Parent(p) => p.as_str(),
            Self::WithState(s) => s,
        }
    }
}

/// Whether a `tracestate` can be passed on: bounded, printable ASCII (no CR/LF, which would
/// break the header), not blank.
fn tracestate_ok(s: &str) -> bool {
    !s.trim().is_empty()
        && s.len() <= TRACESTATE_MAX
        && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// Lowercase hex only: W3C makes uppercase invalid.
fn hex_decode(text: &[u8], out: &mut [u8]) -> Result<(), TraceError> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(TraceError::Format),
    };
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Ok(())
}

fn hex_encode(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0x0f)];
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SPEC_EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_the_spec_example_unchanged() {
        let p = TraceParent::parse(SPEC_EXAMPLE.as_bytes()).unwrap();
        assert_eq!(p.trace_id[..4], [0x4b, 0xf9, 0x2f, 0x35]);
        assert_eq!(p.parent_id[7], 0xb7);
        assert_eq!(p.flags, 1);
        assert_eq!(p.text().as_str(), SPEC_EXAMPLE);
    }

    #[test]
    fn refuses_what_w3c_makes_invalid() {
        let cases = [
            ("", TraceError::Length),
            (&SPEC_EXAMPLE[..54], TraceError::Length),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
                TraceError::Length,
            ),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceError::Version,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceError::Version,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                TraceError::Format,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
                TraceError::Format,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                TraceError::Format,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
                TraceError::Format,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                TraceError::Zero,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                TraceError::Zero,
            ),
        ];
        for (text, want) in cases {
            assert_eq!(TraceParent::parse(text.as_bytes()), Err(want), "{text:?}");
        }
        // Non-ASCII of the right byte length is a format error, not a panic.
        let odd = format!("00-{}-00f067aa0ba902b7-01", "é".repeat(16));
        assert!(TraceParent::parse(odd.as_bytes()).is_err());
    }

    #[test]
    fn derived_contexts_are_stable_valid_and_distinct() {
        let a = TraceParent::derived(&[7; 16]);
        assert_eq!(a, TraceParent::derived(&[7; 16]), "same row, same header");
        assert_eq!(a.trace_id, [7; 16], "trace-id is the event id");
        assert_eq!(a.flags, SAMPLED);
        assert_eq!(TraceParent::parse(a.text().as_str().as_bytes()), Ok(a));
        let b = TraceParent::derived(&[8; 16]);
        assert_ne!((a.trace_id, a.parent_id), (b.trace_id, b.parent_id));
        let zero = TraceParent::derived(&[0; 16]);
        assert!(TraceParent::parse(zero.text().as_str().as_bytes()).is_ok());
        // Pinned: a change here changes the header of rows already buffered.
        assert_eq!(
            TraceParent::derived(&[0xab; 16]).text().as_str(),
            "00-abababababababababababababababab-a5f2189c3b4e77c6-01"
        );
    }

    #[test]
    fn user_properties_give_the_device_context_or_nothing() {
        let ctx = TraceContext::from_user_properties([
            ("site", "north"),
            (TRACEPARENT, SPEC_EXAMPLE),
            (TRACESTATE, "vendor=a"),
            (TRACESTATE, "other=b"),
        ])
        .unwrap();
        assert_eq!(ctx.parent.text().as_str(), SPEC_EXAMPLE);
        assert_eq!(ctx.state.as_deref(), Some("vendor=a,other=b"));

        assert_eq!(
            TraceContext::from_user_properties([("site", "north")]),
            None
        );
        let bad = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        assert_eq!(
            TraceContext::from_user_properties([(TRACEPARENT, bad), (TRACESTATE, "a=b")]),
            None,
            "an invalid traceparent takes its tracestate with it"
        );
        assert_eq!(
            TraceContext::from_user_properties([(TRACEPARENT, SPEC_EXAMPLE); 2]),
            None,
            "repeated"
        );
        let long = "a=".to_string() + &"b".repeat(TRACESTATE_MAX);
        for state in [long.as_str(), "a=b\r\nX-Evil: 1", " "] {
            let ctx = TraceContext::from_user_properties([
                (TRACEPARENT, SPEC_EXAMPLE),
                (TRACESTATE, state),
            ])
            .unwrap();
            assert_eq!(ctx.state, None, "{state:?} dropped, traceparent kept");
        }
    }

    #[test]
    fn stored_contexts_read_back_or_fall_back() {
        let parent = TraceParent::parse(SPEC_EXAMPLE.as_bytes()).unwrap();
        for state in [None, Some("v=1, w=2")] {
            let ctx = TraceContext {
                parent,
                state: state.map(Arc::from),
            };
            let stored = ctx.stored();
            assert_eq!(TraceContext::from_stored(stored.as_str()), Some(ctx));
        }
        assert_eq!(
            ctx_text(&TraceContext::from_stored(SPEC_EXAMPLE)),
            SPEC_EXAMPLE
        );
        for damaged in ["", "garbage", &SPEC_EXAMPLE[..50], "é"] {
            assert_eq!(TraceContext::from_stored(damaged), None, "{damaged:?}");
        }
        // A damaged tracestate is dropped, the traceparent kept.
        let ctx = TraceContext::from_stored(&format!("{SPEC_EXAMPLE} a=\nb")).unwrap();
        assert_eq!(ctx.state, None);
    }

    fn ctx_text(ctx: &Option<TraceContext>) -> String {
        ctx.as_ref()
            .map(|c| c.parent.text().to_string())
            .unwrap_or_default()
    }

    proptest! {
        #[test]
        fn any_valid_context_round_trips(
            trace_id in any::<[u8; 16]>(),
            parent_id in any::<[u8; 8]>(),
            flags in any::<u8>(),
        ) {
            prop_assume!(trace_id != [0; 16] && parent_id != [0; 8]);
            let p = TraceParent { trace_id, parent_id, flags };
            prop_assert_eq!(TraceParent::parse(p.text().as_str().as_bytes()), Ok(p));
        }

        #[test]
        fn any_bytes_parse_or_are_refused_without_panic(text in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(p) = TraceParent::parse(&text) {
                let again = p.text();
                prop_assert_eq!(again.as_str().as_bytes(), &text[..]);
            }
            if let Ok(s) = std::str::from_utf8(&text) {
                let _ = TraceContext::from_stored(s);
            }
        }
    }
}
