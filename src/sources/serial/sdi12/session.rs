//! One SDI-12 conversation at a time over a transparent adapter.
//!
//! Every command first drops stale input, then waits at most the response timeout for its
//! answer line. Adapters that echo the command are handled: an echo at the start of the line
//! is skipped. After a fault the line is drained until quiet, so a late answer cannot be read
//! as the answer to the next command. A transport error or end of stream is
//! [`Sdi12Fault::Io`]: the port is gone and the caller reopens it.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::parse::{parse_address, parse_data, parse_measurement, Addressed, ParseError};
use super::{Address, MeasureCommand};
use crate::sources::serial::quiet;

/// Longest response line kept: a `D` response holds at most 75 value characters, plus the
/// address, a CRC and an echoed command.
pub(crate) const MAX_LINE: usize = 96;

/// Data commands tried before giving up on the announced count (`aD0!` … `aD9!`).
const DATA_COMMANDS: u8 = 10;

/// Quiet time that ends the drain after a fault: several characters at 1200 baud, longer
/// than an adapter's buffering.
const SETTLE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum Sdi12Fault {
    #[error("no answer to {command} within the response timeout")]
    Timeout { command: String },
    #[error("{0}")]
    Crc(ParseError),
    #[error("{0}")]
    Malformed(ParseError),
    #[error("sensor {got} answered a command for sensor {expected}")]
    WrongAddress { expected: Address, got: Address },
    #[error("the sensor announced {expected} values and sent {}", values.len())]
    FewerValues { expected: usize, values: Vec<f64> },
    /// The port is gone (error or end of stream): reopen it.
    #[error("the serial port failed: {0}")]
    Io(#[from] io::Error),
}

impl Sdi12Fault {
    /// The `outcome` label of the measurement counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "timeout",
            Self::Crc(_) => "crc",
            Self::Malformed(_) => "malformed",
            Self::WrongAddress { .. } => "wrong_address",
            Self::FewerValues { .. } => "fewer_values",
            Self::Io(_) => "io",
        }
    }

    pub fn is_port_lost(&self) -> bool {
        matches!(self, Self::Io(_))
    }
}

impl From<ParseError> for Sdi12Fault {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::Crc(_) => Self::Crc(e),
            _ => Self::Malformed(e),
        }
    }
}

/// The master side of one SDI-12 bus. Owns the port.
pub struct Session<T> {
    io: T,
    /// Bytes read but not yet consumed as a line.
    pending: Vec<u8>,
    response_timeout: Duration,
    /// Every byte read from the port, stale ones included.
    received: u64,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Session<T> {
    /// `response_timeout`: how long one answer line may take (the port's `timeout`).
    pub fn new(io: T, response_timeout: Duration) -> Self {
        Self {
            io,
            pending: Vec::with_capacity(MAX_LINE),
            response_timeout,
            received: 0,
        }
    }

    /// Bytes read from the port so far.
    pub(crate) fn bytes_received(&self) -> u64 {
        self.received
    }

    pub fn into_inner(self) -> T {
        self.io
    }

    /// `?!`: the address of the only sensor on the bus.
    pub async fn query_address(&mut self) -> Result<Address, Sdi12Fault> {
        let result = self.exchange("?!", None, parse_address).await;
        self.settle_after(result).await
    }

    /// Takes one measurement: its values in sensor order, exactly as many as announced.
    pub async fn measure(
        &mut self,
        address: Address,
        command: MeasureCommand,
    ) -> Result<Vec<f64>, Sdi12Fault> {
        let result = self.measure_once(address, command).await;
        self.settle_after(result).await
    }

    async fn measure_once(
        &mut self,
        address: Address,
        command: MeasureCommand,
    ) -> Result<Vec<f64>, Sdi12Fault> {
        let concurrent = command.concurrent();
        let announced = self
            .exchange(&command.text(address), Some(address), |line| {
                parse_measurement(line, concurrent)
            })
            .await?;
        let (seconds, count) = (announced.seconds, announced.count);
        let count = usize::from(count);
        if count == 0 {
            return Ok(Vec::new());
        }
        let ready = Instant::now() + Duration::from_secs(u64::from(seconds));
        if command.concurrent() {
            tokio::time::sleep_until(ready).await;
        } else if seconds > 0 {
            self.wait_service_request(address, ready).await?;
        }

        let mut values = Vec::with_capacity(count);
        for n in 0..DATA_COMMANDS {
            let crc = command.with_crc();
            let data = self
                .exchange(&format!("{address}D{n}!"), Some(address), |line| {
                    parse_data(line, crc)
                })
                .await?;
            if data.values.is_empty() {
                break;
            }
            values.extend(data.values);
            if values.len() >= count {
                values.truncate(count);
                return Ok(values);
            }
        }
        Err(Sdi12Fault::FewerValues {
            expected: count,
            values,
        })
    }

    /// Waits for the sensor's service request (`a<CR><LF>`) until `ready`, the announced time.
    /// Other lines (noise, another sensor's request) are ignored.
    async fn wait_service_request(
        &mut self,
        address: Address,
        ready: Instant,
    ) -> Result<(), Sdi12Fault> {
        while let Some(line) = self.read_line(ready).await? {
            if parse_address(&line) == Ok(address) {
                return Ok(());
            }
            tracing::debug!(line = %String::from_utf8_lossy(&line), "ignored while waiting for a service request");
        }
        Ok(())
    }

    /// Sends `command` and parses its answer, checking the address when one is given.
    async fn exchange<R: Addressed>(
        &mut self,
        command: &str,
        address: Option<Address>,
        parse: impl Fn(&[u8]) -> Result<R, ParseError>,
    ) -> Result<R, Sdi12Fault> {
        self.pending.clear();
        self.received += quiet::discard_available(&mut self.io)? as u64;
        self.io.write_all(command.as_bytes()).await?;
        self.io.flush().await?;
        let deadline = Instant::now() + self.response_timeout;
        loop {
            let Some(line) = self.read_line(deadline).await? else {
                return Err(Sdi12Fault::Timeout {
                    command: command.to_string(),
                });
            };
            let answer = line.strip_prefix(command.as_bytes()).unwrap_or(&line);
            if answer.is_empty() {
                continue; // the adapter's echo on a line of its own
            }
            let response = parse(answer)?;
            return match address {
                Some(expected) if response.address() != expected => Err(Sdi12Fault::WrongAddress {
                    expected,
                    got: response.address(),
                }),
                _ => Ok(response),
            };
        }
    }

    /// The next line without its terminator (`<CR><LF>`, or a bare `<LF>`), `None` at
    /// `deadline`. A run of more than [`MAX_LINE`] bytes without one comes back as a line of
    /// its own, which then fails to parse.
    async fn read_line(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(line));
            }
            if self.pending.len() > MAX_LINE {
                return Ok(Some(std::mem::take(&mut self.pending)));
            }
            let mut buf = [0u8; MAX_LINE];
            match tokio::time::timeout_at(deadline, self.io.read(&mut buf)).await {
                Err(_) => return Ok(None),
                Ok(Ok(0)) => return Err(quiet::closed()),
                Ok(Ok(n)) => {
                    self.received += n as u64;
                    self.pending.extend_from_slice(&buf[..n]);
                }
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// Drains the line after a fault other than a lost port, then passes `result` on.
    async fn settle_after<V>(&mut self, result: Result<V, Sdi12Fault>) -> Result<V, Sdi12Fault> {
        if let Err(fault) = &result {
            if !fault.is_port_lost() {
                self.pending.clear();
                let quiet = SETTLE.min(self.response_timeout);
                self.received +=
                    quiet::drain(&mut self.io, quiet, self.response_timeout).await? as u64;
            }
        }
        result
    }
}
