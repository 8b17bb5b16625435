//! Dropping stale bytes on a serial line, so a late or stray answer is never read as the
//! answer to the next command. Both engines use it before each command and after a fault.

use std::io;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// Reads and drops whatever has already arrived, without waiting. End of stream is an error:
/// the port is gone.
pub(crate) fn discard_available<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<usize> {
    let mut buf = [0u8; 256];
    let mut dropped = 0;
    while let Some(read) = reader.read(&mut buf).now_or_never() {
        match read? {
            0 => return Err(closed()),
            n => dropped += n,
        }
    }
    Ok(dropped)
}

/// Reads and drops bytes until the line has been quiet for `quiet`, or `cap` has passed (a
/// line that never falls quiet must not stall the port for longer than that).
pub(crate) async fn drain<R: AsyncRead + Unpin>(
    reader: &mut R,
    quiet: Duration,
    cap: Duration,
) -> io::Result<usize> {
    let mut buf = [0u8; 256];
    let mut dropped = 0;
    let deadline = Instant::now() + cap;
    loop {
        let wait = quiet.min(deadline.saturating_duration_since(Instant::now()));
        if wait.is_zero() {
            return Ok(dropped);
        }
        match tokio::time::timeout(wait, reader.read(&mut buf)).await {
            Err(_) => return Ok(dropped),
            Ok(Ok(0)) => return Err(closed()),
            Ok(Ok(n)) => dropped += n,
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// The error for a port whose stream ended (the far end closed, the adapter was unplugged).
pub(crate) fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the serial port was closed")
}
