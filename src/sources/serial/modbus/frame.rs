//! RTU response frames, checked byte by byte: a register or coil read's
//! `unit, function, byte count, data…, CRC-16/MODBUS (low byte first)`, a write's echo
//! `unit, function, address, value or quantity, CRC`, or the exception form
//! `unit, function | 0x80, code, CRC`. tokio-modbus does the decoding on the bus; this parser
//! tells the poller what the bytes of a failed request were (a partial answer, a corrupt one,
//! or noise), and gives fuzzers a pure entry point.

use super::RegisterKind;

const MODBUS_CRC: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_MODBUS);

/// CRC-16/MODBUS of `bytes`, as sent on the wire (low byte first).
pub fn crc16(bytes: &[u8]) -> [u8; 2] {
    MODBUS_CRC.checksum(bytes).to_le_bytes()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("the frame is not complete yet")]
    Incomplete,
    #[error("the frame fails its CRC check")]
    Crc,
    #[error("the frame is longer than its header says")]
    Trailing,
    #[error("the frame comes from unit {0}")]
    OtherUnit(u8),
    #[error("the frame answers function {0:#04x}")]
    OtherFunction(u8),
    #[error("the frame carries {got} data bytes where {expected} were asked for")]
    ByteCount { expected: usize, got: usize },
    #[error("Modbus exception {0:#04x}")]
    Exception(u8),
    /// A write's answer with another address or value than the request's.
    #[error("the answer echoes address {} value {:#06x} where address {} value {:#06x} was written", got.0, got.1, expected.0, expected.1)]
    Echo {
        expected: (u16, u16),
        got: (u16, u16),
    },
}

/// The registers in `frame`, the whole response to reading `count` registers of `kind` from
/// `unit`. Never panics, whatever the bytes.
pub fn parse_response(
    unit: u8,
    kind: RegisterKind,
    count: u16,
    frame: &[u8],
) -> Result<Vec<u16>, FrameError> {
    let data = counted_data(unit, kind.function_code(), frame)?;
    check_byte_count(data, usize::from(count) * 2)?;
    Ok(data
        .chunks_exact(2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .collect())
}

/// The coils in `frame`, the whole response to reading `count` coils (function 0x01) from
/// `unit`: one bit each, lowest address in the lowest bit of the first byte.
pub fn parse_coils(unit: u8, count: u16, frame: &[u8]) -> Result<Vec<bool>, FrameError> {
    let data = counted_data(unit, 0x01, frame)?;
    check_byte_count(data, usize::from(count).div_ceil(8))?;
    Ok((0..usize::from(count))
        .map(|i| data[i / 8] & (1 << (i % 8)) != 0)
        .collect())
}

/// What a write asked for, as its answer must echo it: function 0x05 (a coil: `value` is
/// 0xFF00 for on, 0x0000 for off), 0x06 (one register: the value written) or 0x10 (several
/// registers: `value` is how many).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Echo {
    pub function: u8,
    pub address: u16,
    pub value: u16,
}

/// Checks `frame` as the answer of `unit` to the write `echo` describes: all three functions
/// answer with the request's address and value, so anything else did not confirm this write.
pub fn parse_write_echo(unit: u8, echo: Echo, frame: &[u8]) -> Result<(), FrameError> {
    let body = checked_body(unit, echo.function, frame, |_| Some(6))?;
    let word = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
    let got = (word(2), word(4));
    if got != (echo.address, echo.value) {
        return Err(FrameError::Echo {
            expected: (echo.address, echo.value),
            got,
        });
    }
    Ok(())
}

/// The data of a response whose third byte counts the data bytes (functions 0x01 to 0x04).
fn counted_data(unit: u8, function: u8, frame: &[u8]) -> Result<&[u8], FrameError> {
    let body = checked_body(unit, function, frame, |f| {
        f.get(2).map(|&n| 3 + usize::from(n))
    })?;
    Ok(&body[3..])
}

fn check_byte_count(data: &[u8], expected: usize) -> Result<(), FrameError> {
    if data.len() != expected {
        return Err(FrameError::ByteCount {
            expected,
            got: data.len(),
        });
    }
    Ok(())
}

/// The frame without its CRC, once unit, function, length and CRC check out; an exception
/// answer is `Err(Exception)`. `body_len` gives the length of a normal answer's body from the
/// bytes so far (`None`: too few to tell).
fn checked_body(
    unit: u8,
    function: u8,
    frame: &[u8],
    body_len: impl Fn(&[u8]) -> Option<usize>,
) -> Result<&[u8], FrameError> {
    let (Some(&from), Some(&answered)) = (frame.first(), frame.get(1)) else {
        return Err(FrameError::Incomplete);
    };
    if from != unit {
        return Err(FrameError::OtherUnit(from));
    }
    let body_len = if answered == function | 0x80 {
        3
    } else if answered == function {
        body_len(frame).ok_or(FrameError::Incomplete)?
    } else {
        return Err(FrameError::OtherFunction(answered));
    };
    let (body, crc) = match frame.len() {
        n if n < body_len + 2 => return Err(FrameError::Incomplete),
        n if n > body_len + 2 => return Err(FrameError::Trailing),
        _ => frame.split_at(body_len),
    };
    if crc16(body) != crc {
        return Err(FrameError::Crc);
    }
    if answered & 0x80 != 0 {
        return Err(FrameError::Exception(body[2]));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn with_crc(body: &[u8]) -> Vec<u8> {
        let mut f = body.to_vec();
        f.extend_from_slice(&crc16(body));
        f
    }

    #[test]
    fn crc_matches_the_specification_example() {
        // Modbus over serial line V1.02, §6.2.2: "02 07" → CRC 0x1241, sent 41 12.
        assert_eq!(crc16(&[0x02, 0x07]), [0x41, 0x12]);
    }

    #[test]
    fn reads_registers_and_refuses_what_is_not_the_answer() {
        let h = RegisterKind::Holding;
        let good = with_crc(&[3, 0x03, 4, 0x00, 0xFA, 0xFF, 0x38]);
        assert_eq!(parse_response(3, h, 2, &good), Ok(vec![250, 0xFF38]));
        assert_eq!(
            parse_response(3, h, 2, &good[..5]),
            Err(FrameError::Incomplete)
        );
        assert_eq!(parse_response(3, h, 2, &[]), Err(FrameError::Incomplete));
        let mut bad = good.clone();
        bad[4] ^= 1;
        assert_eq!(parse_response(3, h, 2, &bad), Err(FrameError::Crc));
        assert_eq!(
            parse_response(4, h, 2, &good),
            Err(FrameError::OtherUnit(3))
        );
        assert_eq!(
            parse_response(3, RegisterKind::Input, 2, &good),
            Err(FrameError::OtherFunction(3))
        );
        assert!(matches!(
            parse_response(3, h, 1, &good),
            Err(FrameError::ByteCount {
                expected: 2,
                got: 4
            })
        ));
        let mut long = good.clone();
        long.push(0);
        assert_eq!(parse_response(3, h, 2, &long), Err(FrameError::Trailing));
        let exception = with_crc(&[3, 0x83, 0x02]);
        assert_eq!(
            parse_response(3, h, 2, &exception),
            Err(FrameError::Exception(2))
        );
    }

    #[test]
    fn reads_coils_bit_by_bit() {
        // Coils 0..10: on, off, on, then off but for the 10th (bit 1 of the second byte).
        let good = with_crc(&[5, 0x01, 2, 0b0000_0101, 0b0000_0010]);
        let expected = vec![
            true, false, true, false, false, false, false, false, false, true,
        ];
        assert_eq!(parse_coils(5, 10, &good), Ok(expected));
        assert_eq!(
            parse_coils(5, 1, &with_crc(&[5, 0x01, 1, 0xFF])),
            Ok(vec![true]),
            "padding bits beyond the count are ignored"
        );
        assert!(matches!(
            parse_coils(5, 20, &good),
            Err(FrameError::ByteCount {
                expected: 3,
                got: 2
            })
        ));
        assert_eq!(
            parse_coils(5, 1, &with_crc(&[5, 0x81, 0x02])),
            Err(FrameError::Exception(2))
        );
        assert_eq!(
            parse_coils(5, 1, &with_crc(&[5, 0x03, 1, 0xFF])),
            Err(FrameError::OtherFunction(3))
        );
        assert_eq!(parse_coils(5, 1, &good[..3]), Err(FrameError::Incomplete));
    }

    #[test]
    fn write_answers_must_echo_the_request() {
        let coil_on = Echo {
            function: 0x05,
            address: 3,
            value: 0xFF00,
        };
        let echo = with_crc(&[7, 0x05, 0x00, 0x03, 0xFF, 0x00]);
        assert_eq!(parse_write_echo(7, coil_on, &echo), Ok(()));
        let off = with_crc(&[7, 0x05, 0x00, 0x03, 0x00, 0x00]);
        let refused = parse_write_echo(7, coil_on, &off).unwrap_err();
        assert_eq!(
            refused,
            FrameError::Echo {
                expected: (3, 0xFF00),
                got: (3, 0)
            }
        );
        assert!(refused.to_string().contains("where address 3 value 0xff00"));
        let mut corrupt = echo.clone();
        corrupt[5] ^= 0x01;
        assert_eq!(parse_write_echo(7, coil_on, &corrupt), Err(FrameError::Crc));
        let many = Echo {
            function: 0x10,
            address: 10,
            value: 2,
        };
        let answer = with_crc(&[7, 0x10, 0x00, 0x0A, 0x00, 0x02]);
        assert_eq!(parse_write_echo(7, many, &answer), Ok(()));
        assert_eq!(
            parse_write_echo(7, many, &with_crc(&[7, 0x90, 0x04])),
            Err(FrameError::Exception(4))
        );
        assert_eq!(
            parse_write_echo(7, many, &answer[..7]),
            Err(FrameError::Incomplete)
        );
        assert_eq!(
            parse_write_echo(8, many, &answer),
            Err(FrameError::OtherUnit(7))
        );
    }

    proptest! {
        #[test]
        fn any_registers_round_trip(
            unit in 1u8..=247,
            input in any::<bool>(),
            regs in proptest::collection::vec(any::<u16>(), 1..=125)
        ) {
            let kind = if input { RegisterKind::Input } else { RegisterKind::Holding };
            let mut body = vec![unit, kind.function_code(), (regs.len() * 2) as u8];
            for r in &regs {
                body.extend_from_slice(&r.to_be_bytes());
            }
            let frame = with_crc(&body);
            prop_assert_eq!(parse_response(unit, kind, regs.len() as u16, &frame), Ok(regs.clone()));
            // Any single flipped bit is caught.
            for i in 0..frame.len() {
                let mut corrupt = frame.clone();
                corrupt[i] ^= 0x10;
                prop_assert!(parse_response(unit, kind, regs.len() as u16, &corrupt).is_err());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            count in 0u16..130
        ) {
            let unit = bytes.first().copied().unwrap_or(1);
            let _ = parse_response(unit, RegisterKind::Holding, count, &bytes);
            let _ = parse_coils(unit, count, &bytes);
            let echo = Echo { function: bytes.get(1).copied().unwrap_or(5), address: count, value: 0 };
            let _ = parse_write_echo(unit, echo, &bytes);
        }
    }
}
