//! Pseudo-terminals standing in for serial devices. The gateway opens the slave end by path;
//! the test holds the master end and plays the device (a line talker, a Modbus slave, a node).
//! Closing the master is the far end going away: the gateway's reads end, as when a USB adapter
//! is unplugged. [`SerialLink`] adds a stable path, a symlink like those in
//! `/dev/serial/by-id/`, that a re-plug repoints to a new pseudo-terminal. [`AsyncPty`] is the
//! master end as a tokio stream, for the simulated devices (`sim_modbus`, `sim_sdi12`);
//! [`DeviceSide`] lets a device simulated by a tokio task (a firmware node) stay the same across
//! unplug and re-plug.

use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::Gateway;

/// One pseudo-terminal pair: the master end in the test, the slave end's path for the gateway.
pub struct Pty {
    master: File,
    slave: PathBuf,
}

impl Pty {
    pub fn open() -> Self {
        // CLOEXEC: a process the test starts later (the gateway) must not hold the master too,
        // or closing it here would not be the far end going away.
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
            .expect("open a pty master");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let name = ptsname(&master, Vec::new()).expect("ptsname");
        let slave = PathBuf::from(name.to_str().expect("pty name is UTF-8"));
        Self {
            master: File::from(master),
            slave,
        }
    }

    /// The device path the gateway opens (`/dev/pts/N`).
    pub fn slave_path(&self) -> &Path {
        &self.slave
    }

    /// Sends bytes as the device would.
    pub fn write(&mut self, bytes: &[u8]) {
        self.master
            .write_all(bytes)
            .expect("write to the pty master");
        self.master.flush().expect("flush the pty master");
    }

    /// Reads what the gateway sent, waiting at most `within` for the first byte.
    pub fn read(&mut self, within: Duration) -> Vec<u8> {
        let fd = rustix::fd::AsFd::as_fd(&self.master);
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        let timeout = rustix::event::Timespec::try_from(within).expect("a short timeout");
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(n) if n > 0 => {
                let mut buf = vec![0u8; 4096];
                let n = self.master.read(&mut buf).unwrap_or(0);
                buf.truncate(n);
                buf
            }
            _ => Vec::new(),
        }
    }

    /// The master end, for tests that drive it with their own I/O.
    pub fn master(&self) -> &File {
        &self.master
    }

    /// The master end as a tokio stream (call inside a runtime). Dropping it is the device
    /// going away.
    pub fn into_async(self) -> AsyncPty {
        let flags = rustix::fs::fcntl_getfl(&self.master).expect("pty flags");
        rustix::fs::fcntl_setfl(&self.master, flags | rustix::fs::OFlags::NONBLOCK)
            .expect("non-blocking pty");
        // SAFETY: the File owns the descriptor, which stays open and the same until the
        // AsyncFd drops the File.
        let fd = unsafe { AsyncFd::register(self.master) }.expect("register the pty with tokio");
        AsyncPty { fd, idle: None }
    }
}

/// How often a device with nobody on the other end checks again whether the port is open.
const NOBODY_THERE: Duration = Duration::from_millis(20);

/// A pty master as a tokio stream. While no process has the slave end open (before the gateway
/// opens the port, or between its attempts) reads on a master fail with EIO; this stream waits
/// and reads again instead, as a device keeps listening on a quiet line.
pub struct AsyncPty {
    fd: AsyncFd<File>,
    idle: Option<Pin<Box<Sleep>>>,
}

impl AsyncRead for AsyncPty {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if let Some(idle) = self.idle.as_mut() {
                ready!(idle.as_mut().poll(cx));
                self.idle = None;
            }
            let read = {
                let mut guard = ready!(self.fd.poll_read_ready(cx))?;
                let unfilled = buf.initialize_unfilled();
                match guard.try_io(|fd| fd.get_ref().read(unfilled)) {
                    Ok(read) => read,
                    Err(_would_block) => continue,
                }
            };
            match read {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) => {
                    self.idle = Some(Box::pin(tokio::time::sleep(NOBODY_THERE)));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for AsyncPty {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            if let Ok(written) = guard.try_io(|fd| fd.get_ref().write(data)) {
                return Poll::Ready(written);
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The device's side of a [`SerialLink`] for a simulated device that outlives being unplugged,
/// as a firmware node keeps its buffer: reads and writes reach the pseudo-terminal plugged in
/// now ([`SerialLink::plug_into`]) and fail while none is, like a UART with nothing attached.
#[derive(Clone, Default)]
pub struct DeviceSide(Arc<Mutex<Option<AsyncPty>>>);

impl DeviceSide {
    /// Pulls the device: its master end closes, so the gateway's reads end.
    pub fn unplug(&self) {
        *self.0.lock().unwrap() = None;
    }

    fn poll<T>(
        &self,
        f: impl FnOnce(Pin<&mut AsyncPty>) -> Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match self.0.lock().unwrap().as_mut() {
            Some(master) => f(Pin::new(master)),
            None => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
}

impl AsyncRead for DeviceSide {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.poll(|m| m.poll_read(cx, buf))
    }
}

impl AsyncWrite for DeviceSide {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll(|m| m.poll_write(cx, bytes))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A device path that can be unplugged and plugged in again: a symlink in a temp directory
/// (like `/dev/serial/by-id/usb-...`) to the current pseudo-terminal's slave end.
pub struct SerialLink {
    pub path: PathBuf,
    pty: Option<Pty>,
    _dir: tempfile::TempDir,
}

impl SerialLink {
    /// A path with nothing plugged in yet.
    pub fn unplugged(name: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let by_id = dir.path().join("by-id");
        std::fs::create_dir(&by_id).expect("by-id dir");
        Self {
            path: by_id.join(name),
            pty: None,
            _dir: dir,
        }
    }

    /// A path with a device plugged in.
    pub fn plugged(name: &str) -> Self {
        let mut link = Self::unplugged(name);
        link.plug();
        link
    }

    /// Plugs a new device in: a fresh pseudo-terminal, the link repointed to it atomically.
    pub fn plug(&mut self) {
        let pty = Pty::open();
        let tmp = self.path.with_extension("new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(pty.slave_path(), &tmp).expect("symlink");
        std::fs::rename(&tmp, &self.path).expect("repoint the link");
        self.pty = Some(pty);
    }

    /// Pulls the device: the master end closes, and the link is left dangling.
    pub fn unplug(&mut self) {
        self.pty = None;
    }

    /// Plugs a new device in, as [`plug`](Self::plug), with `side` driving its master end.
    pub fn plug_into(&mut self, side: &DeviceSide) {
        self.plug();
        let master = self.pty.take().expect("just plugged in").into_async();
        *side.0.lock().unwrap() = Some(master);
    }

    pub fn pty(&mut self) -> &mut Pty {
        self.pty.as_mut().expect("a device is plugged in")
    }

    /// Hands the plugged-in device's master end to the test (e.g. to a simulator): dropping it
    /// is the unplug. The link keeps pointing at its slave end.
    pub fn take_pty(&mut self) -> Pty {
        self.pty.take().expect("a device is plugged in")
    }

    /// Sends bytes from the plugged-in device.
    pub fn write(&mut self, bytes: &[u8]) {
        self.pty().write(bytes);
    }
}

/// Waits until the gateway has the named port open, then past the moment after opening in
/// which bytes may still belong to a line begun before (`lines::SETTLE`), so that what the test
/// writes next is read from its first byte.
pub fn wait_port_open(gateway: &Gateway, port: &str) {
    let label = format!("port=\"{port}\"");
    gateway.wait_until(
        &format!("serial port {port} open"),
        Duration::from_secs(30),
        |g| g.metric("sahool_gateway_serial_port_up", &label) == 1.0,
    );
    std::thread::sleep(Duration::from_millis(300));
}
