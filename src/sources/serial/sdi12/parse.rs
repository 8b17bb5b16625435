//! SDI-12 responses, without their `<CR><LF>`:
//! - `a`: the answer to `?!` and `a!`, and the service request at the end of `aM!`;
//! - `atttn` (to `aM!`, `aMC!`) and `atttnn` (to `aC!`, `aCC!`): seconds until the data is
//!   ready and how many values there will be;
//! - `a<values>` or `a<values><crc>` (to `aDn!`): values in `+1.23-4.5+6` form, each a sign and
//!   1 to 7 digits with at most one decimal point.
//!
//! The CRC (§4.4.12) is CRC-16/ARC over everything from the address to the last value,
//! sent as three characters `0x40 | bits` of 4, 6 and 6 bits, high bits first.

use super::Address;

const ARC: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_ARC);

/// Digits a value may have (§4.4.7).
const MAX_DIGITS: usize = 7;

/// The three CRC characters for a response body (address through last value).
pub fn crc_chars(body: &[u8]) -> [u8; 3] {
    let crc = ARC.checksum(body);
    [
        0x40 | (crc >> 12) as u8,
        0x40 | ((crc >> 6) & 0x3F) as u8,
        0x40 | (crc & 0x3F) as u8,
    ]
}

/// Which response the line should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// `a` alone.
    Address,
    /// `atttn`, or `atttnn` when `concurrent`.
    Measurement { concurrent: bool },
    /// `a<values>`, followed by a CRC when `crc`.
    Data { crc: bool },
}

impl Expect {
    /// Every kind of response, for checks that try a line as each.
    pub const ALL: [Expect; 5] = [
        Expect::Address,
        Expect::Measurement { concurrent: false },
        Expect::Measurement { concurrent: true },
        Expect::Data { crc: false },
        Expect::Data { crc: true },
    ];
}

/// The answer to `aM!`/`aMC!` (`atttn`) or `aC!`/`aCC!` (`atttnn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    pub address: Address,
    /// Seconds until the values are ready.
    pub seconds: u16,
    /// Values the measurement will have.
    pub count: u8,
}

/// The answer to `aDn!`.
#[derive(Debug, Clone, PartialEq)]
pub struct Data {
    pub address: Address,
    pub values: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    Address(Address),
    Measurement(Measurement),
    Data(Data),
}

/// What a response says about who sent it.
pub trait Addressed {
    fn address(&self) -> Address;
}

impl Addressed for Address {
    fn address(&self) -> Address {
        *self
    }
}

impl Addressed for Measurement {
    fn address(&self) -> Address {
        self.address
    }
}

impl Addressed for Data {
    fn address(&self) -> Address {
        self.address
    }
}

impl Addressed for Response {
    fn address(&self) -> Address {
        match self {
            Self::Address(a) => *a,
            Self::Measurement(m) => m.address,
            Self::Data(d) => d.address,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty response")]
    Empty,
    #[error("response starts with {0:?}, not an address")]
    Address(char),
    #[error("CRC missing or wrong in {0:?}")]
    Crc(String),
    #[error("malformed {what} response {text:?}")]
    Malformed { what: &'static str, text: String },
}

/// Parses one response line of the kind `expect` says (a trailing `<CR><LF>` is allowed).
/// Never panics, whatever the bytes: the entry point for fuzzers.
pub fn parse_response(expect: Expect, line: &[u8]) -> Result<Response, ParseError> {
    match expect {
        Expect::Address => parse_address(line).map(Response::Address),
        Expect::Measurement { concurrent } => {
            parse_measurement(line, concurrent).map(Response::Measurement)
        }
        Expect::Data { crc } => parse_data(line, crc).map(Response::Data),
    }
}

/// `a`: the answer to `?!` and `a!`, and the service request.
pub(crate) fn parse_address(line: &[u8]) -> Result<Address, ParseError> {
    let (address, rest, line) = split_address(line)?;
    if !rest.is_empty() {
        return Err(malformed("address", line));
    }
    Ok(address)
}

/// `atttn`, or `atttnn` when `concurrent`.
pub(crate) fn parse_measurement(line: &[u8], concurrent: bool) -> Result<Measurement, ParseError> {
    let (address, rest, line) = split_address(line)?;
    let count_digits = if concurrent { 2 } else { 1 };
    if rest.len() != 3 + count_digits || !rest.iter().all(u8::is_ascii_digit) {
        return Err(malformed("measurement", line));
    }
    let number = |digits: &[u8]| {
        digits
            .iter()
            .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'))
    };
    Ok(Measurement {
        address,
        seconds: number(&rest[..3]),
        // At most two digits, so at most 99.
        count: number(&rest[3..]) as u8,
    })
}

/// `a<values>`, followed by the three CRC characters when `crc`.
pub(crate) fn parse_data(line: &[u8], crc: bool) -> Result<Data, ParseError> {
    let (address, rest, line) = split_address(line)?;
    let values = if crc {
        let crc_error = || ParseError::Crc(String::from_utf8_lossy(line).into_owned());
        let at = rest.len().checked_sub(3).ok_or_else(crc_error)?;
        let (values, sent) = rest.split_at(at);
        if crc_chars(&line[..=at]) != sent {
            return Err(crc_error());
        }
        values
    } else {
        rest
    };
    let values = parse_values(values).ok_or_else(|| malformed("data", line))?;
    Ok(Data { address, values })
}

/// The sender's address, the rest, and the line without its `<CR><LF>`.
fn split_address(line: &[u8]) -> Result<(Address, &[u8], &[u8]), ParseError> {
    let line = line.strip_suffix(b"\r\n").unwrap_or(line);
    let (&first, rest) = line.split_first().ok_or(ParseError::Empty)?;
    let address = Address::new(char::from(first)).map_err(|e| ParseError::Address(e.0))?;
    Ok((address, rest, line))
}

fn malformed(what: &'static str, line: &[u8]) -> ParseError {
    ParseError::Malformed {
        what,
        text: String::from_utf8_lossy(line).into_owned(),
    }
}

/// `+1.23-4.5+6` → `[1.23, -4.5, 6.0]`; `None` if any value breaks the form.
fn parse_values(mut text: &[u8]) -> Option<Vec<f64>> {
    let mut values = Vec::new();
    while let Some((&sign, rest)) = text.split_first() {
        if sign != b'+' && sign != b'-' {
            return None;
        }
        let len = rest
            .iter()
            .position(|&b| b == b'+' || b == b'-')
            .unwrap_or(rest.len());
        let (number, next) = rest.split_at(len);
        let digits = number.iter().filter(|b| b.is_ascii_digit()).count();
        let points = number.iter().filter(|&&b| b == b'.').count();
        if digits == 0 || digits > MAX_DIGITS || points > 1 || digits + points != number.len() {
            return None;
        }
        // Sign, digits and one point: ASCII, and a form `f64::from_str` accepts.
        let value: f64 = std::str::from_utf8(&text[..=len]).ok()?.parse().ok()?;
        values.push(value);
        text = next;
    }
    Some(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `value` in SDI-12 form with `decimals` decimals (e.g. `+3.14`), or `None` if that takes
    /// more than 7 digits or the value is not finite.
    fn format_value(value: f64, decimals: usize) -> Option<String> {
        if !value.is_finite() {
            return None;
        }
        let text = format!("{value:+.decimals$}");
        let digits = text.bytes().filter(u8::is_ascii_digit).count();
        (digits <= MAX_DIGITS).then_some(text)
    }

    fn addr(c: char) -> Address {
        Address::new(c).unwrap()
    }

    #[test]
    #[allow(clippy::approx_constant)] // the specification's own example value
    fn crc_matches_the_specification_example() {
        // SDI-12 v1.4 §4.4.12.3: "0D0!" answered "0+3.14OqZ<CR><LF>".
        assert_eq!(&crc_chars(b"0+3.14"), b"OqZ");
        assert_eq!(
            parse_response(Expect::Data { crc: true }, b"0+3.14OqZ\r\n"),
            Ok(Response::Data(Data {
                address: addr('0'),
                values: vec![3.14]
            }))
        );
        // The same arithmetic on longer bodies, computed independently (CRC-16/ARC):
        // "0+3.14+2.718+1.414" → 0x9C3A, "0+1.23-4.5+6" → 0x88FB.
        assert_eq!(&crc_chars(b"0+3.14+2.718+1.414"), b"Ipz");
        assert_eq!(&crc_chars(b"0+1.23-4.5+6"), b"Hc{");
        assert!(matches!(
            parse_response(Expect::Data { crc: true }, b"0+3.14OqY"),
            Err(ParseError::Crc(_))
        ));
        // A sensor that ignores the C and sends no CRC.
        assert!(matches!(
            parse_response(Expect::Data { crc: true }, b"0+3.14"),
            Err(ParseError::Crc(_))
        ));
        assert!(matches!(
            parse_response(Expect::Data { crc: true }, b"0"),
            Err(ParseError::Crc(_))
        ));
        // No values left: address and CRC only.
        let mut empty = b"0".to_vec();
        empty.extend_from_slice(&crc_chars(b"0"));
        assert_eq!(
            parse_response(Expect::Data { crc: true }, &empty),
            Ok(Response::Data(Data {
                address: addr('0'),
                values: vec![]
            }))
        );
    }

    #[test]
    fn responses_of_each_kind() {
        assert_eq!(
            parse_response(Expect::Address, b"b\r\n"),
            Ok(Response::Address(addr('b')))
        );
        assert_eq!(
            parse_response(Expect::Measurement { concurrent: false }, b"00013"),
            Ok(Response::Measurement(Measurement {
                address: addr('0'),
                seconds: 1,
                count: 3
            }))
        );
        assert_eq!(
            parse_response(Expect::Measurement { concurrent: true }, b"512012"),
            Ok(Response::Measurement(Measurement {
                address: addr('5'),
                seconds: 120,
                count: 12
            }))
        );
        assert_eq!(
            parse_response(Expect::Data { crc: false }, b"1+1.23-4.5+6"),
            Ok(Response::Data(Data {
                address: addr('1'),
                values: vec![1.23, -4.5, 6.0]
            }))
        );
        assert_eq!(
            parse_response(Expect::Data { crc: false }, b"1-.5+7."),
            Ok(Response::Data(Data {
                address: addr('1'),
                values: vec![-0.5, 7.0]
            }))
        );
    }

    #[test]
    fn malformed_responses_are_refused() {
        let data = Expect::Data { crc: false };
        let m = Expect::Measurement { concurrent: false };
        assert_eq!(parse_response(data, b""), Err(ParseError::Empty));
        assert_eq!(parse_response(data, b"\r\n"), Err(ParseError::Empty));
        assert_eq!(parse_response(data, b"?+1"), Err(ParseError::Address('?')));
        for bad in [
            &b"01.5"[..],
            b"0+",
            b"0+1..5",
            b"0+12345678",
            b"0+1e5",
            b"0+1 ",
            b"0++1",
        ] {
            assert!(
                matches!(parse_response(data, bad), Err(ParseError::Malformed { .. })),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse_response(data, b"0+1234567").is_ok());
        for bad in [&b"0001"[..], b"000123", b"00a13", b"0"] {
            assert!(parse_response(m, bad).is_err());
        }
        assert!(parse_response(Expect::Measurement { concurrent: true }, b"00013").is_err());
        assert!(parse_response(Expect::Address, b"0+1").is_err());
    }

    #[test]
    fn formatting_keeps_to_seven_digits() {
        assert_eq!(format_value(1.23456, 2).as_deref(), Some("+1.23"));
        assert_eq!(format_value(-4.5, 1).as_deref(), Some("-4.5"));
        assert_eq!(format_value(6.0, 0).as_deref(), Some("+6"));
        assert_eq!(format_value(12345.678, 2).as_deref(), Some("+12345.68"));
        assert_eq!(format_value(123456.78, 2), None);
        assert_eq!(format_value(f64::NAN, 2), None);
    }

    fn address_char() -> impl Strategy<Value = char> {
        prop_oneof![
            proptest::char::range('0', '9'),
            proptest::char::range('a', 'z'),
            proptest::char::range('A', 'Z')
        ]
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(
            a in address_char(),
            raw in proptest::collection::vec((-9_999_999i64..=9_999_999, 0usize..=6), 0..9),
            crc in any::<bool>(),
        ) {
            // Values with at most 7 digits in all: mantissa / 10^decimals.
            let mut line = a.to_string();
            let mut expected = Vec::new();
            for (mantissa, decimals) in raw {
                // Both exact in f64, so the quotient is the f64 nearest the decimal text.
                let value = mantissa as f64 / [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6][decimals];
                let text = format_value(value, decimals);
                prop_assert!(text.is_some(), "{} with {} decimals", value, decimals);
                line.push_str(&text.unwrap_or_default());
                expected.push(value);
            }
            let mut bytes = line.into_bytes();
            if crc {
                let chars = crc_chars(&bytes);
                bytes.extend_from_slice(&chars);
            }
            bytes.extend_from_slice(b"\r\n");
            let parsed = parse_response(Expect::Data { crc }, &bytes);
            prop_assert_eq!(parsed, Ok(Response::Data(Data { address: addr(a), values: expected })));
        }

        #[test]
        fn measurement_responses_round_trip(
            a in address_char(),
            seconds in 0u16..=999,
            count in 0u8..=99,
            concurrent in any::<bool>(),
        ) {
            let count = if concurrent { count } else { count % 10 };
            let line = if concurrent {
                format!("{a}{seconds:03}{count:02}\r\n")
            } else {
                format!("{a}{seconds:03}{count}\r\n")
            };
            prop_assert_eq!(
                parse_response(Expect::Measurement { concurrent }, line.as_bytes()),
                Ok(Response::Measurement(Measurement { address: addr(a), seconds, count }))
            );
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            for expect in Expect::ALL {
                let _ = parse_response(expect, &bytes);
            }
        }
    }
}
