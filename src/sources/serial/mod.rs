//! Serial protocol engines, each generic over the byte transport of one port.

pub mod modbus;
mod quiet;
pub mod sdi12;
