//! Whether the system clock is synchronised, as the kernel's own NTP state says.
//!
//! On Linux, `adjtimex(2)` with no mode bits only reads that state and is allowed to every
//! user. Time services that discipline the clock (chrony, systemd-timesyncd, ntpd) clear
//! `STA_UNSYNC` once they are locked to a source; the kernel sets it again by itself when no
//! service has corrected the clock for a while (its estimated error grows past 16 s). No
//! daemon needs to run for the answer, unlike `timedatectl`, which asks systemd over D-Bus.

/// The kernel's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClockSync {
    /// Synchronised, with the kernel's estimated maximum error in microseconds.
    Synchronised {
        max_error_us: i64,
    },
    Unsynchronised,
    /// The state cannot be read (not Linux, or the call failed).
    Unknown(String),
}

/// Reads the clock state now.
#[cfg(target_os = "linux")]
pub(crate) fn read() -> ClockSync {
    // SAFETY: `timex` is plain data, for which all zeroes is a valid value; with `modes` 0
    // adjtimex only fills in the struct it is given, which lives until the call returns.
    let mut t: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut t) };
    if state == -1 {
        return ClockSync::Unknown(format!("adjtimex: {}", std::io::Error::last_os_error()));
    }
    // `maxerror` is a C long: 32 bits on armhf, 64 on arm64 and amd64.
    #[allow(clippy::useless_conversion)]
    let max_error_us = i64::from(t.maxerror);
    judge(t.status, max_error_us)
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn read() -> ClockSync {
    ClockSync::Unknown("the kernel's clock state is read on Linux only".into())
}

/// The kernel status bit that says no time service has the clock in hand.
const STA_UNSYNC: i32 = 0x0040;

/// What `adjtimex`'s `status` bits and `maxerror` say.
pub(crate) fn judge(status: i32, max_error_us: i64) -> ClockSync {
    if status & STA_UNSYNC != 0 {
        ClockSync::Unsynchronised
    } else {
        ClockSync::Synchronised { max_error_us }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unsync_bit_decides() {
        // As the kernel reports a clock disciplined by chrony: STA_PLL | STA_NANO.
        assert_eq!(
            judge(0x2001, 12_000),
            ClockSync::Synchronised {
                max_error_us: 12_000
            }
        );
        // A freshly booted machine with no time service: STA_UNSYNC alone.
        assert_eq!(judge(0x0040, 16_000_000), ClockSync::Unsynchronised);
        assert_eq!(judge(0x2041, 0), ClockSync::Unsynchronised);
    }

    #[cfg(all(target_os = "linux", not(miri)))]
    #[test]
    fn the_libc_constant_is_the_kernel_one() {
        assert_eq!(STA_UNSYNC, libc::STA_UNSYNC);
        assert!(!matches!(read(), ClockSync::Unknown(_)));
    }
}
