//! Serial sources: sensors and firmware nodes on serial ports, one protocol per port.

pub mod frames;
