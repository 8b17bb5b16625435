//! Kernel RS-485 mode (`TIOCSRS485`): the UART driver raises RTS to enable the transceiver's
//! driver for exactly as long as it sends, so half-duplex buses work without GPIO timing in user
//! space. Drivers without RS-485 support (and pseudo-terminals) refuse it with `ENOTTY`/`EINVAL`.

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::config::serial::Rs485;

/// `struct serial_rs485` of `<linux/serial.h>`: 32 bytes, the reserved tail zeroed.
#[repr(C)]
#[derive(Debug, Default)]
struct SerialRs485 {
    flags: u32,
    delay_rts_before_send: u32,
    delay_rts_after_send: u32,
    padding: [u32; 5],
}

const SER_RS485_ENABLED: u32 = 1 << 0;
const SER_RS485_RTS_ON_SEND: u32 = 1 << 1;
const SER_RS485_RTS_AFTER_SEND: u32 = 1 << 2;
const SER_RS485_RX_DURING_TX: u32 = 1 << 4;
const SER_RS485_TERMINATE_BUS: u32 = 1 << 5;

/// Switches the open port into RS-485 mode with the configured RTS levels and delays.
pub(super) fn enable(port: &impl AsRawFd, config: &Rs485) -> std::io::Result<()> {
    let ms = |d: Option<crate::config::DurationValue>| {
        d.map_or(0, |d| u32::try_from(d.0.as_millis()).unwrap_or(u32::MAX))
    };
    let flag = |on: bool, bit: u32| if on { bit } else { 0 };
    let mut value = SerialRs485 {
        flags: SER_RS485_ENABLED
            | flag(config.rts_on_send, SER_RS485_RTS_ON_SEND)
            | flag(config.rts_after_send, SER_RS485_RTS_AFTER_SEND)
            | flag(config.rx_during_tx, SER_RS485_RX_DURING_TX)
            | flag(config.terminate_bus, SER_RS485_TERMINATE_BUS),
        delay_rts_before_send: ms(config.delay_before_send),
        delay_rts_after_send: ms(config.delay_after_send),
        ..SerialRs485::default()
    };
    set(port, &mut value)
}

/// The generic ioctl number (x86, ARM, AArch64, RISC-V); other architectures number it apart.
#[cfg(any(
    target_arch = "x86",
    target_arch = "x86_64",
    target_arch = "arm",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
fn set(port: &impl AsRawFd, value: &mut SerialRs485) -> std::io::Result<()> {
    const TIOCSRS485: rustix::ioctl::Opcode = 0x542F;
    // SAFETY: the descriptor stays open while `port` is borrowed, which outlives this call;
    // TIOCSRS485 reads a `struct serial_rs485` and writes the settings the driver applied back
    // into it, which `SerialRs485` mirrors field for field (repr(C), 32 bytes), passed as `&mut`.
    unsafe {
        let fd = BorrowedFd::borrow_raw(port.as_raw_fd());
        rustix::ioctl::ioctl(
            fd,
            rustix::ioctl::Updater::<TIOCSRS485, SerialRs485>::new(value),
        )
    }
    .map_err(std::io::Error::from)
}

#[cfg(not(any(
    target_arch = "x86",
    target_arch = "x86_64",
    target_arch = "arm",
    target_arch = "aarch64",
    target_arch = "riscv64"
)))]
fn set(_port: &impl AsRawFd, _value: &mut SerialRs485) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "kernel RS-485 mode is not built for this architecture",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_struct_matches_the_kernels() {
        assert_eq!(std::mem::size_of::<SerialRs485>(), 32);
    }
}
