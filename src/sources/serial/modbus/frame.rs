//! The RTU response frame of a register read, checked byte by byte:
//! `unit, function, byte count, data…, CRC-16/MODBUS (low byte first)`, or the exception form
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
}

/// The registers in `frame`, the whole response to reading `count` registers of `kind` from
/// `unit`. Never panics, whatever the bytes.
pub fn parse_response(
    unit: u8,
    kind: RegisterKind,
    count: u16,
    frame: &[u8],
) -> Result<Vec<u16>, FrameError> {
    let function = kind.function_code();
    let (Some(&from), Some(&answered)) = (frame.first(), frame.get(1)) else {
        return Err(FrameError::Incomplete);
    };
    if from != unit {
        return Err(FrameError::OtherUnit(from));
    }
    let body_len = if answered == function | 0x80 {
        3
    } else if answered == function {
        match frame.get(2) {
            Some(&byte_count) => 3 + usize::from(byte_count),
            None => return Err(FrameError::Incomplete),
        }
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
    let data = &body[3..];
    let expected = usize::from(count) * 2;
    if data.len() != expected {
        return Err(FrameError::ByteCount {
            expected,
            got: data.len(),
        });
    }
    Ok(data
        .chunks_exact(2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .collect())
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
            let _ = parse_response(bytes.first().copied().unwrap_or(1), RegisterKind::Holding, count, &bytes);
        }
    }
}
