//! The `sdi12` engine: SDI-12 sensors behind a transparent serial adapter (the adapter does the
//! 1200 baud 7E1 line, break and marking; commands and responses pass as ASCII).
//!
//! - [`parse`]: sans-IO. Responses (`a`, `atttn`, `atttnn`, `a+1.23-4.5…`) and the CRC of
//!   SDI-12 v1.4 §4.4.12, with a pure [`parse_response`] entry point for fuzzers.
//! - [`session`]: async. One measurement end to end: `aM!` (or `aMC!`, `aC!`, `aCC!`), the
//!   announced wait or the service request, then `aD0!`, `aD1!`… until every announced value
//!   is read.
//! - [`port`]: the engine on a gateway port ([`run`]): each bound address measured at every
//!   poll, its values mapped by index, faults counted and logged.
//!
//! Invariants: a value is only returned from a response that carries the asked address and,
//! for the CRC variants, a matching CRC; a measurement returns exactly the announced number of
//! values or a fault; stale bytes are dropped before each command.

pub mod parse;
pub mod port;
pub mod session;

use std::fmt;
use std::str::FromStr;

pub use parse::{
    crc_chars, parse_response, Addressed, Data, Expect, Measurement, ParseError, Response,
};
pub use port::run;
pub use session::{Sdi12Fault, Session};

/// A sensor address: `0`-`9`, `a`-`z` or `A`-`Z`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address(u8);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an SDI-12 address (0-9, a-z, A-Z)")]
pub struct AddressError(pub char);

impl Address {
    pub fn new(c: char) -> Result<Self, AddressError> {
        match u8::try_from(c) {
            Ok(b) if b.is_ascii_alphanumeric() => Ok(Self(b)),
            _ => Err(AddressError(c)),
        }
    }

    pub fn as_char(self) -> char {
        char::from(self.0)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_char())
    }
}

/// Which measurement command starts a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MeasureCommand {
    /// `aM!`: the sensor sends a service request when done.
    M,
    /// `aMC!`: as `M`, data responses carry a CRC.
    MC,
    /// `aC!`: concurrent; no service request, the announced time is waited.
    C,
    /// `aCC!`: concurrent with CRC.
    CC,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a measurement command (M, MC, C, CC)")]
pub struct CommandError(pub String);

impl MeasureCommand {
    pub(crate) fn with_crc(self) -> bool {
        matches!(self, Self::MC | Self::CC)
    }

    pub fn concurrent(self) -> bool {
        matches!(self, Self::C | Self::CC)
    }

    fn letters(self) -> &'static str {
        match self {
            Self::M => "M",
            Self::MC => "MC",
            Self::C => "C",
            Self::CC => "CC",
        }
    }

    /// The command as sent, e.g. `0MC!`.
    pub fn text(self, address: Address) -> String {
        format!("{address}{}!", self.letters())
    }
}

impl FromStr for MeasureCommand {
    type Err = CommandError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "M" => Ok(Self::M),
            "MC" => Ok(Self::MC),
            "C" => Ok(Self::C),
            "CC" => Ok(Self::CC),
            other => Err(CommandError(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_commands() {
        assert_eq!(Address::new('0').map(Address::as_char), Ok('0'));
        assert!(Address::new('z').is_ok() && Address::new('Z').is_ok());
        assert_eq!(Address::new('?'), Err(AddressError('?')));
        assert!(Address::new('é').is_err());
        let a = Address::new('3').unwrap();
        assert_eq!(MeasureCommand::M.text(a), "3M!");
        assert_eq!(
            "CC".parse::<MeasureCommand>().map(|c| c.text(a)),
            Ok("3CC!".into())
        );
        assert!("MX".parse::<MeasureCommand>().is_err());
        assert!(MeasureCommand::MC.with_crc() && !MeasureCommand::MC.concurrent());
    }
}
