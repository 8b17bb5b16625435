//! The port shared between tokio-modbus and the poller. tokio-modbus gets a [`Tap`] that
//! records the bytes read during the current request and any transport failure; the poller
//! keeps the [`Line`] to drain stale bytes and to hand a fresh [`Tap`] to a new client after
//! a fault (a tokio-modbus client whose decoder once failed reports its next read as a broken
//! pipe, so it is never reused after a fault).
//!
//! Only one of them reads or writes at a time (the poller awaits each step), so the mutex is
//! never contended and is held only inside a single poll.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::sources::serial::quiet;

/// Bytes of one answer kept for classification: a register read's answer is at most 255 bytes.
const CAPTURE_LIMIT: usize = 512;

struct Shared<T> {
    io: T,
    captured: Vec<u8>,
    /// Every byte read from the port, captured or not.
    received: u64,
    /// The first transport failure (error or end of stream): the port is gone.
    failure: Option<io::Error>,
}

pub(super) struct Line<T> {
    shared: Arc<Mutex<Shared<T>>>,
}

/// A handle on the port that records what it reads (when `capture` is set) and failures.
pub(super) struct Tap<T> {
    shared: Arc<Mutex<Shared<T>>>,
    capture: bool,
}

fn lock<T>(shared: &Mutex<Shared<T>>) -> MutexGuard<'_, Shared<T>> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T> Shared<T> {
    /// Records `e` as the port's failure and returns an equivalent error for the caller.
    fn fail(&mut self, e: io::Error) -> io::Error {
        let copy = io::Error::new(e.kind(), e.to_string());
        self.failure.get_or_insert(e);
        copy
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Line<T> {
    pub(super) fn new(io: T) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                io,
                captured: Vec::new(),
                received: 0,
                failure: None,
            })),
        }
    }

    /// A capturing handle for tokio-modbus.
    pub(super) fn tap(&self) -> Tap<T> {
        Tap {
            shared: Arc::clone(&self.shared),
            capture: true,
        }
    }

    pub(super) fn begin_capture(&self) {
        lock(&self.shared).captured.clear();
    }

    pub(super) fn captured(&self) -> Vec<u8> {
        lock(&self.shared).captured.clone()
    }

    /// Bytes read from the port so far.
    pub(super) fn received(&self) -> u64 {
        lock(&self.shared).received
    }

    pub(super) fn take_failure(&self) -> Option<io::Error> {
        lock(&self.shared).failure.take()
    }

    /// Reads and drops whatever has already arrived, without waiting.
    pub(super) fn discard_pending(&self) -> io::Result<usize> {
        quiet::discard_available(&mut self.reader())
    }

    /// Reads and drops bytes until the line has been quiet for `quiet` (at most for `cap`).
    pub(super) async fn drain(&self, quiet: Duration, cap: Duration) -> io::Result<usize> {
        quiet::drain(&mut self.reader(), quiet, cap).await
    }

    /// A handle that reads without capturing.
    fn reader(&self) -> Tap<T> {
        Tap {
            shared: Arc::clone(&self.shared),
            capture: false,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tap<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.shared);
        let before = buf.filled().len();
        let wanted = buf.remaining() > 0;
        match Pin::new(&mut shared.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                shared.received += new.len() as u64;
                if new.is_empty() && wanted {
                    shared.failure.get_or_insert_with(quiet::closed);
                } else if self.capture {
                    let room = CAPTURE_LIMIT.saturating_sub(shared.captured.len());
                    let keep = &new[..new.len().min(room)];
                    shared.captured.extend_from_slice(keep);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(shared.fail(e))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tap<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut shared = lock(&self.shared);
        match Pin::new(&mut shared.io).poll_write(cx, data) {
            Poll::Ready(Ok(0)) if !data.is_empty() => {
                Poll::Ready(Err(shared.fail(io::Error::from(io::ErrorKind::WriteZero))))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(shared.fail(e))),
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.shared);
        match Pin::new(&mut shared.io).poll_flush(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(shared.fail(e))),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.shared);
        Pin::new(&mut shared.io).poll_shutdown(cx)
    }
}
