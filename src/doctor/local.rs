//! This machine: serial ports, free disk under the buffer, the clock.

use std::path::{Path, PathBuf};

use super::{Check, Verdict};
use crate::common::clock::{self, ClockSync};
use crate::config::{Config, SerialSource};
use crate::sources::serial::{self, OpenError};

/// Opens the port as the gateway does (line settings, RS-485 mode) and closes it again;
/// nothing is sent. Opening a tty may still toggle its modem lines, as any open does.
pub(super) async fn serial(port: &SerialSource) -> Check {
    let name = format!("serial {}", port.name);
    let owned = port.clone();
    match tokio::task::spawn_blocking(move || serial::open(&owned)).await {
        Ok(Ok((io, device))) => {
            drop(io);
            let shown = port.path.display();
            let device = if device == port.path {
                String::new()
            } else {
                format!(" ({})", device.display())
            };
            Check::ok(name, format!("{shown}{device} opens and closes"))
        }
        Ok(Err(e)) => Check::fail(name, e.to_string(), open_fix(&e, &port.path)),
        Err(e) => Check::fail(
            name,
            format!("opening {} failed: {e}", port.path.display()),
            "run doctor again",
        ),
    }
}

fn open_fix(e: &OpenError, path: &Path) -> String {
    let path = path.display();
    match e {
        OpenError::Missing { .. } => format!("plug the adapter in, or set path to one that `ls -l /dev/serial/by-id/` lists (not {path})"),
        OpenError::Permission { .. } => format!("add the user to the group that owns {path} (`ls -l {path}`; usually `usermod -aG dialout sahool-gateway`), then log in again or restart the service"),
        OpenError::Busy { .. } => format!("stop what holds {path} (`fuser -v {path}`); a running gateway holds its own ports, so stop it for doctor"),
        OpenError::Rs485 { .. } => "remove `rs485` from this [[serial]] if the adapter switches direction itself".into(),
        OpenError::Other { .. } => format!("check that {path} is a serial device"),
    }
}

/// Free space on the buffer's filesystem against `[buffer] min_free_disk`.
pub(super) async fn disk(config: &Config) -> Check {
    let dir = existing_ancestor(&config.gateway.data_dir);
    let reserve = config.buffer.min_free_disk.0;
    let max_bytes = config.buffer.max_bytes.0;
    let probe = dir.clone();
    let free = tokio::task::spawn_blocking(move || crate::store::free_disk(&probe)).await;
    let shown = dir.display();
    match free {
        Ok(Ok(free)) if free < reserve => Check::fail(
            "disk",
            format!("{} free at {shown}, below the reserve min_free_disk = {}: the gateway stops taking readings", size(free), size(reserve)),
            "free space on that filesystem, or lower [buffer] min_free_disk",
        ),
        Ok(Ok(free)) if free < reserve.saturating_add(max_bytes) => Check::with_fix(
            Verdict::Warn,
            "disk",
            format!("{} free at {shown}: above the reserve ({}), but a full buffer (max_bytes = {}) would not fit", size(free), size(reserve), size(max_bytes)),
            "free space, or lower [buffer] max_bytes",
        ),
        Ok(Ok(free)) => Check::ok("disk", format!("{} free at {shown} (reserve {}, buffer up to {})", size(free), size(reserve), size(max_bytes))),
        Ok(Err(e)) => Check::fail("disk", format!("cannot read free space at {shown}: {e}"), "check [gateway] data_dir"),
        Err(e) => Check::fail("disk", format!("cannot read free space at {shown}: {e}"), "run doctor again"),
    }
}

/// The data directory, or its nearest ancestor that exists (the gateway creates it at start).
fn existing_ancestor(dir: &Path) -> PathBuf {
    dir.ancestors()
        .find(|d| d.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

/// Bytes in MiB, or KiB when small.
fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// The kernel's clock state (see [`clock`]).
pub(super) fn clock(config: &Config) -> Check {
    let commands = if config.commands.enabled && config.commands.require_clock_sync {
        "; commands other than `off` are refused until it is"
    } else {
        ""
    };
    match clock::read() {
        ClockSync::Synchronised { max_error_us } => Check::ok(
            "clock",
            format!("synchronised (kernel's estimated maximum error {} ms)", max_error_us / 1000),
        ),
        ClockSync::Unsynchronised => Check::fail(
            "clock",
            format!("not synchronised: the kernel says no time service disciplines the clock{commands}"),
            "run a time service that sets the kernel clock (chrony, systemd-timesyncd or ntpd) and let it reach a time server (`chronyc tracking` shows how it does)",
        ),
        ClockSync::Unknown(why) => Check::with_fix(
            Verdict::Warn,"clock", format!("state unknown: {why}"), "check the clock by hand"),
    }
}
