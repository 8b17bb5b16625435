//! Serial protocol engines, each generic over the byte transport of one port.

pub mod modbus;
pub mod sdi12;
