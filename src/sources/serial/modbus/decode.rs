//! Registers → raw values, and back for writes. Bytes within a register are big-endian (Modbus); the order of the
//! two registers of a 32-bit value is the point's [`WordOrder`]. Pure functions, so fuzzers
//! and property tests can drive them directly.

use super::plan::ReadRequest;
use super::{Fault, PointId, ValueType, WordOrder};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{value_type:?} needs {needed} registers, {got} given")]
    Short {
        value_type: ValueType,
        needed: u16,
        got: usize,
    },
    #[error("the registers hold NaN or infinity")]
    NotFinite,
}

/// The value in `words` (the point's registers, lowest address first).
pub(crate) fn decode_value(
    value_type: ValueType,
    word_order: WordOrder,
    words: &[u16],
) -> Result<f64, DecodeError> {
    let needed = value_type.registers();
    if words.len() < usize::from(needed) {
        return Err(DecodeError::Short {
            value_type,
            needed,
            got: words.len(),
        });
    }
    let u32_value = || {
        let (high, low) = match word_order {
            WordOrder::Big => (words[0], words[1]),
            WordOrder::Little => (words[1], words[0]),
        };
        (u32::from(high) << 16) | u32::from(low)
    };
    Ok(match value_type {
        ValueType::U16 => f64::from(words[0]),
        ValueType::I16 => f64::from(words[0] as i16),
        ValueType::U32 => f64::from(u32_value()),
        ValueType::I32 => f64::from(u32_value() as i32),
        ValueType::F32 => {
            let v = f32::from_bits(u32_value());
            if !v.is_finite() {
                return Err(DecodeError::NotFinite);
            }
            f64::from(v)
        }
    })
}

/// Why a raw value cannot be written to a register of its type.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error("{raw} is not a number a register can hold")]
    NotFinite { raw: f64 },
    #[error("{raw} does not fit a {value_type:?} register ({min} to {max})")]
    OutOfRange {
        raw: f64,
        value_type: ValueType,
        min: f64,
        max: f64,
    },
}

/// The register image of `raw` (the inverse of [`decode_value`]): integer types take the
/// nearest integer, `f32` the nearest float; a value the type cannot hold is refused, never
/// wrapped or saturated.
pub(crate) fn encode_value(
    value_type: ValueType,
    word_order: WordOrder,
    raw: f64,
) -> Result<Vec<u16>, EncodeError> {
    if !raw.is_finite() {
        return Err(EncodeError::NotFinite { raw });
    }
    let (min, max) = value_type.raw_bounds();
    let rounded = if value_type == ValueType::F32 {
        raw
    } else {
        raw.round()
    };
    if !(min..=max).contains(&rounded) {
        return Err(EncodeError::OutOfRange {
            raw,
            value_type,
            min,
            max,
        });
    }
    // In range, so each cast is exact (integers) or the nearest float (f32).
    let bits = match value_type {
        ValueType::U16 => return Ok(vec![rounded as u16]),
        ValueType::I16 => return Ok(vec![rounded as i16 as u16]),
        ValueType::U32 => rounded as u32,
        ValueType::I32 => rounded as i32 as u32,
        ValueType::F32 => (rounded as f32).to_bits(),
    };
    let (high, low) = ((bits >> 16) as u16, bits as u16);
    Ok(match word_order {
        WordOrder::Big => vec![high, low],
        WordOrder::Little => vec![low, high],
    })
}

impl ReadRequest {
    /// Each slot's value from the registers this request returned. A response shorter than
    /// the request (which the poller never passes on) fails the slots it cannot fill.
    pub fn decode(&self, registers: &[u16]) -> Vec<(PointId, Result<f64, Fault>)> {
        self.slots
            .iter()
            .map(|s| {
                let words = registers.get(usize::from(s.offset)..).unwrap_or(&[]);
                let value = decode_value(s.value_type, s.word_order, words).map_err(|e| match e {
                    DecodeError::NotFinite => Fault::NotFinite,
                    DecodeError::Short { .. } => Fault::Unexpected,
                });
                (s.id, value)
            })
            .collect()
    }

    /// The same fault for every slot (the request got no usable answer).
    pub fn fail(&self, fault: &Fault) -> Vec<(PointId, Result<f64, Fault>)> {
        self.slots
            .iter()
            .map(|s| (s.id, Err(fault.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::serial::modbus::{plan, Point, RegisterKind};
    use proptest::prelude::*;

    /// Registers as a device would hold the value (the inverse of `decode_value`).
    fn encode(bits: u32, order: WordOrder) -> [u16; 2] {
        let (high, low) = ((bits >> 16) as u16, bits as u16);
        match order {
            WordOrder::Big => [high, low],
            WordOrder::Little => [low, high],
        }
    }

    #[test]
    fn known_register_images() {
        use ValueType::*;
        use WordOrder::*;
        assert_eq!(decode_value(U16, Big, &[0xFFFF]), Ok(65535.0));
        assert_eq!(decode_value(I16, Big, &[0xFFFF]), Ok(-1.0));
        assert_eq!(decode_value(I16, Big, &[0x00FA]), Ok(250.0));
        assert_eq!(decode_value(U32, Big, &[0x0001, 0x0002]), Ok(65538.0));
        assert_eq!(decode_value(U32, Little, &[0x0002, 0x0001]), Ok(65538.0));
        assert_eq!(decode_value(I32, Big, &[0xFFFF, 0xFFFE]), Ok(-2.0));
        // 21.5 = 0x41AC0000
        assert_eq!(decode_value(F32, Big, &[0x41AC, 0x0000]), Ok(21.5));
        assert_eq!(decode_value(F32, Little, &[0x0000, 0x41AC]), Ok(21.5));
        assert_eq!(
            decode_value(F32, Big, &[0x7FC0, 0x0000]),
            Err(DecodeError::NotFinite)
        );
        assert_eq!(
            decode_value(F32, Big, &[0x7F80, 0x0000]),
            Err(DecodeError::NotFinite)
        );
        assert!(matches!(
            decode_value(U32, Big, &[1]),
            Err(DecodeError::Short { needed: 2, .. })
        ));
    }

    #[test]
    fn request_decoding_places_each_point() {
        let points = [
            Point {
                id: 10,
                unit: 1,
                kind: RegisterKind::Holding,
                register: 100,
                value_type: ValueType::I16,
                word_order: WordOrder::Big,
            },
            Point {
                id: 11,
                unit: 1,
                kind: RegisterKind::Holding,
                register: 103,
                value_type: ValueType::F32,
                word_order: WordOrder::Little,
            },
        ];
        let req = &plan(&points).unwrap().requests[0];
        let regs = [0xFF38, 0, 0, 0x0000, 0x41AC]; // -200, two unused, 21.5 (CDAB)
        assert_eq!(req.decode(&regs), vec![(10, Ok(-200.0)), (11, Ok(21.5))]);
        assert_eq!(
            req.decode(&regs[..4]),
            vec![(10, Ok(-200.0)), (11, Err(Fault::Unexpected))]
        );
    }

    #[test]
    fn encoding_refuses_what_the_type_cannot_hold() {
        use ValueType::*;
        use WordOrder::*;
        assert_eq!(encode_value(U16, Big, 65535.0), Ok(vec![0xFFFF]));
        assert_eq!(
            encode_value(U16, Big, 12.4),
            Ok(vec![12]),
            "nearest integer"
        );
        assert_eq!(encode_value(I16, Big, -1.0), Ok(vec![0xFFFF]));
        assert_eq!(encode_value(U32, Little, 65538.0), Ok(vec![2, 1]));
        assert_eq!(encode_value(F32, Big, 21.5), Ok(vec![0x41AC, 0]));
        for (t, raw) in [
            (U16, -1.0),
            (U16, 65535.6),
            (I16, 32768.0),
            (I32, 3e9),
            (F32, 1e39),
        ] {
            assert!(
                matches!(
                    encode_value(t, Big, raw),
                    Err(EncodeError::OutOfRange { .. })
                ),
                "{t:?} {raw}"
            );
        }
        assert!(matches!(
            encode_value(U16, Big, f64::NAN),
            Err(EncodeError::NotFinite { .. })
        ));
        assert_eq!(
            encode_value(U16, Big, 70000.0).unwrap_err().to_string(),
            "70000 does not fit a U16 register (0 to 65535)"
        );
    }

    proptest! {
        #[test]
        fn u16_and_i16_round_trip(v in any::<u16>()) {
            prop_assert_eq!(decode_value(ValueType::U16, WordOrder::Big, &[v]), Ok(f64::from(v)));
            prop_assert_eq!(
                decode_value(ValueType::I16, WordOrder::Little, &[v]),
                Ok(f64::from(v as i16))
            );
        }

        #[test]
        fn u32_and_i32_round_trip(v in any::<u32>(), little in any::<bool>()) {
            let order = if little { WordOrder::Little } else { WordOrder::Big };
            let words = encode(v, order);
            prop_assert_eq!(decode_value(ValueType::U32, order, &words), Ok(f64::from(v)));
            prop_assert_eq!(decode_value(ValueType::I32, order, &words), Ok(f64::from(v as i32)));
        }

        #[test]
        fn f32_round_trips_or_is_refused(bits in any::<u32>(), little in any::<bool>()) {
            let order = if little { WordOrder::Little } else { WordOrder::Big };
            let v = f32::from_bits(bits);
            let decoded = decode_value(ValueType::F32, order, &encode(bits, order));
            if v.is_finite() {
                prop_assert_eq!(decoded, Ok(f64::from(v)));
            } else {
                prop_assert_eq!(decoded, Err(DecodeError::NotFinite));
            }
        }

        #[test]
        fn encoding_round_trips_through_the_decoder(
            raw in -5e9f64..5e9,
            type_index in 0usize..5,
            little in any::<bool>(),
        ) {
            let value_type = [ValueType::U16, ValueType::I16, ValueType::U32, ValueType::I32, ValueType::F32][type_index];
            let order = if little { WordOrder::Little } else { WordOrder::Big };
            match encode_value(value_type, order, raw) {
                Ok(words) => {
                    prop_assert_eq!(words.len(), usize::from(value_type.registers()));
                    let back = decode_value(value_type, order, &words).unwrap();
                    let expected = match value_type {
                        ValueType::F32 => f64::from(raw as f32),
                        _ => raw.round(),
                    };
                    prop_assert_eq!(back, expected);
                }
                Err(EncodeError::OutOfRange { min, max, .. }) => {
                    prop_assert!(raw.round() < min || raw.round() > max);
                }
                Err(e) => prop_assert!(false, "{e}"),
            }
        }

        #[test]
        fn any_registers_decode_without_panic(
            words in proptest::collection::vec(any::<u16>(), 0..4),
            offset in 0u16..6,
        ) {
            let points = [Point {
                id: 0,
                unit: 1,
                kind: RegisterKind::Input,
                register: offset,
                value_type: ValueType::F32,
                word_order: WordOrder::Big,
            }];
            let mut req = plan(&points).unwrap().requests.remove(0);
            req.start = 0;
            req.slots[0].offset = offset;
            let out = req.decode(&words);
            prop_assert_eq!(out.len(), 1);
        }
    }
}
