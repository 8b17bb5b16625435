//! `[[serial]]` ports: one task per port owns the device, opens it (again) with backoff, and
//! hands the open port to the protocol engine of its `protocol` ([`run_protocol`]).
//!
//! Invariants:
//! - A port is opened by its configured path at every attempt, so a `/dev/serial/by-id/` link
//!   follows an adapter that came back as another `ttyUSBn`.
//! - A port that is missing, refuses to open, or is lost (read error, end of file: a USB
//!   adapter unplugged, the far end of a pseudo-terminal closed) is closed, reported
//!   (`serial_port_up`, `serial_errors_total{reason}`, `/readyz`, the log) and opened again with
//!   backoff. Nothing else waits on it: other ports and MQTT sources carry on.
//! - Engines commit through [`PortContext::commit`], which maps values through the mapping in
//!   force, screens them by the ingest rules every input shares ([`crate::ingest::admission`]) and
//!   appends readings and dead-letters in one commit. A port whose readings must wait for their
//!   flood budget is not read meanwhile: the wire paces the device. Serial devices cannot be
//!   asked to resend, so a full buffer (`reject_new`, disk reserve) holds the values and retries
//!   with backoff; an engine that can withhold an acknowledgement uses
//!   [`PortContext::try_commit`].
//!
//! Plugging in a protocol engine: an engine is an `async fn(SerialStream, &mut PortContext) ->
//! Result<(), PortFault>` that reads (and writes) the port until it is lost
//! ([`PortFault::Closed`] / [`PortFault::Io`]) or the gateway stops ([`PortFault::Stopping`]),
//! and gets its arm in [`run_protocol`].

pub mod frames;
pub(crate) mod frames_port;
pub mod lines;
pub mod modbus;
pub(crate) mod polling;
mod quiet;
mod rs485;
pub mod sdi12;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio_serial::{SerialPort, SerialStream};

use crate::common::backoff::Backoff;
use crate::common::log_limit::LogLimit;
use crate::common::metrics::Metrics;
use crate::config::serial::Parity;
use crate::config::{Config, Protocol, Quality, SerialBinding, SerialSource};
use crate::ingest::mapping::{self, Mapped, Rejection, SerialValue, SharedMapper};
use crate::reading::{SensorType, Timestamp};
use crate::store::{Append, AppendOutcome, FrameKey, StoreError, StoreHandle};

use self::modbus::BusRequests;
use crate::ingest::admission::{self, Admission};
use crate::ingest::intake::append_once;

/// First and longest wait between attempts to open a port.
const REOPEN_FIRST: Duration = Duration::from_millis(250);
const REOPEN_MAX: Duration = Duration::from_secs(10);
/// A port that stayed open this long was not flapping: the next loss starts the backoff anew.
const STABLE: Duration = Duration::from_secs(10);

/// A sensor bound to a port, as its engine needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct PortSensor {
    pub device_id: String,
    pub field_id: String,
    pub sensor_type: SensorType,
    pub binding: SerialBinding,
}

/// A port with the sensors bound to it: what a port task runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct PortPlan {
    pub port: SerialSource,
    /// In config order.
    pub sensors: Vec<PortSensor>,
}

impl PortPlan {
    /// Every `[[serial]]` port of the config with its sensors.
    pub fn all(config: &Config) -> Vec<PortPlan> {
        config
            .serial
            .iter()
            .map(|port| PortPlan {
                port: port.clone(),
                sensors: config
                    .fields
                    .iter()
                    .flat_map(|f| f.sensors.iter().map(move |s| (f, s)))
                    .filter_map(|(f, s)| {
                        let binding = s.serial_binding()?;
                        (binding.port() == &port.name).then(|| PortSensor {
                            device_id: s.device_id.to_string(),
                            field_id: f.id.to_string(),
                            sensor_type: s.sensor_type.0,
                            binding,
                        })
                    })
                    .collect(),
            })
            .collect()
    }

    /// True when a port running with `self` can go on under `new`. Polled protocols read their
    /// sensor list at start, so a change of their bindings restarts them; other ports take
    /// binding changes from the shared mapping without closing the device.
    pub(crate) fn unchanged(&self, new: &PortPlan) -> bool {
        let same_port = SerialSource {
            line: 0,
            ..self.port.clone()
        } == SerialSource {
            line: 0,
            ..new.port.clone()
        };
        let polled = matches!(self.port.protocol, Protocol::ModbusRtu | Protocol::Sdi12);
        same_port && (!polled || self.sensors == new.sensors)
    }
}

/// Why a protocol engine gave the port back.
#[derive(Debug, thiserror::Error)]
pub enum PortFault {
    /// The gateway is stopping (or the port's config changed): not a fault.
    #[error("stopping")]
    Stopping,
    /// The device reported end of file: unplugged, or the far end of a pseudo-terminal closed.
    #[error("the device closed (end of file): unplugged?")]
    Closed,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the buffer is closed")]
    StoreClosed,
}

/// Why a port could not be opened; `reason` is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: no such device (unplugged, or a wrong path: `ls -l /dev/serial/by-id/` lists the USB adapters plugged in)")]
    Missing { path: PathBuf },
    #[error("{path}: permission denied (the service user needs the `dialout` group)")]
    Permission { path: PathBuf },
    #[error("{path}: busy (another program holds the port open)")]
    Busy { path: PathBuf },
    #[error("{path}: {detail}")]
    Other { path: PathBuf, detail: String },
    #[error("{path}: kernel RS-485 mode cannot be set ({source}); does the UART's driver support it? Remove `rs485` for adapters that switch direction themselves")]
    Rs485 {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl OpenError {
    fn reason(&self) -> &'static str {
        match self {
            Self::Missing { .. } => "missing",
            Self::Permission { .. } => "permission",
            Self::Busy { .. } => "busy",
            Self::Other { .. } => "open_failed",
            Self::Rs485 { .. } => "rs485",
        }
    }
}

/// Opens the port by its configured path, with its line settings and, if set, RS-485 mode.
/// Returns the open port and the device the path led to.
pub fn open(port: &SerialSource) -> Result<(SerialStream, PathBuf), OpenError> {
    let path = port.path.clone();
    let device = std::fs::canonicalize(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => OpenError::Missing { path: path.clone() },
        std::io::ErrorKind::PermissionDenied => OpenError::Permission { path: path.clone() },
        _ => OpenError::Other {
            path: path.clone(),
            detail: e.to_string(),
        },
    })?;
    let s = port.settings();
    let builder = tokio_serial::new(path.to_string_lossy(), s.baud)
        .data_bits(match s.data_bits {
            5 => tokio_serial::DataBits::Five,
            6 => tokio_serial::DataBits::Six,
            7 => tokio_serial::DataBits::Seven,
            _ => tokio_serial::DataBits::Eight,
        })
        .parity(match s.parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        })
        .stop_bits(match s.stop_bits {
            2 => tokio_serial::StopBits::Two,
            _ => tokio_serial::StopBits::One,
        })
        .flow_control(tokio_serial::FlowControl::None)
        .timeout(port.timeout.0);
    let io = SerialStream::open(&builder).map_err(|e| {
        use tokio_serial::ErrorKind as K;
        match e.kind {
            K::Io(std::io::ErrorKind::NotFound) => OpenError::Missing { path: path.clone() },
            K::Io(std::io::ErrorKind::PermissionDenied) => {
                OpenError::Permission { path: path.clone() }
            }
            // serialport reports a port locked by another opener (TIOCEXCL, flock) so.
            K::NoDevice => OpenError::Busy { path: path.clone() },
            _ => OpenError::Other {
                path: path.clone(),
                detail: e.description,
            },
        }
    })?;
    if let Some(config) = &port.rs485 {
        rs485::enable(&io, config).map_err(|source| OpenError::Rs485 {
            path: path.clone(),
            source,
        })?;
    }
    // Bytes that waited in the driver belong to before this session.
    let _ = io.clear(tokio_serial::ClearBuffer::Input);
    Ok((io, device))
}

/// Resolves once `stop` turns true or its sender is gone.
pub(crate) async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// What a protocol produced from one message (a line, a frame, a poll cycle): values to map,
/// and what it rejected itself (framing, syntax), all committed together.
#[derive(Debug, Clone)]
pub struct Batch {
    pub received: Timestamp,
    pub values: Vec<SerialValue>,
    /// Rejected before mapping, e.g. a line that does not parse.
    pub rejected: Vec<Rejection>,
    /// Kept with every dead-letter of the batch.
    pub raw: Arc<[u8]>,
    /// Identity of the message for redelivery detection (a resent frame); see the store.
    pub message_key: Option<[u8; 16]>,
    /// The sender says this may be a resend: check `message_key` against recent messages.
    pub maybe_duplicate: bool,
    /// A firmware frame's identity, checked against its node's recent frames (see the store).
    pub frame_key: Option<FrameKey>,
}

impl Batch {
    /// Values received now, with the bytes they came from.
    pub fn values(values: Vec<SerialValue>, raw: &[u8]) -> Self {
        Self {
            received: Timestamp::now(),
            values,
            rejected: Vec::new(),
            raw: Arc::from(raw),
            message_key: None,
            maybe_duplicate: false,
            frame_key: None,
        }
    }

    /// A message rejected whole, with its bytes.
    pub fn rejected(rejection: Rejection, raw: &[u8]) -> Self {
        Self {
            rejected: vec![rejection],
            ..Self::values(Vec::new(), raw)
        }
    }
}

/// What a protocol engine works with: its port's config and sensors, the mapping, the buffer,
/// metrics, and the stop signal.
pub struct PortContext {
    pub port: SerialSource,
    pub sensors: Vec<PortSensor>,
    pub mapper: SharedMapper,
    pub store: StoreHandle,
    pub metrics: Arc<Metrics>,
    /// `serial_bytes_received_total{port}`: engines count what they read.
    pub bytes: Counter,
    /// `serial_messages_received_total{port}`: lines, frames or responses.
    pub messages: Counter,
    /// Where others' requests to a `modbus-rtu` port come from (actuator writes): its engine
    /// registers the port here while it runs.
    pub bus: BusRequests,
    admission: Admission,
    stop: watch::Receiver<bool>,
    full_log: LogLimit,
    rejected_log: LogLimit,
}

impl PortContext {
    pub fn new(input: &SerialInput, stop: watch::Receiver<bool>) -> Self {
        let q = &input.quality;
        let name = input.plan.port.name.as_str();
        let label = input.metrics.port(name);
        Self {
            port: input.plan.port.clone(),
            sensors: input.plan.sensors.clone(),
            mapper: input.mapper.clone(),
            store: input.store.clone(),
            metrics: input.metrics.clone(),
            bytes: input.metrics.serial_bytes.get_or_create(&label).clone(),
            messages: input.metrics.serial_messages.get_or_create(&label).clone(),
            bus: input.bus.clone(),
            admission: Admission::new(name, admission::flood_guard(q), &input.metrics),
            stop,
            full_log: LogLimit::new(Duration::from_secs(10)),
            rejected_log: LogLimit::new(Duration::from_secs(10)),
        }
    }

    pub fn name(&self) -> &str {
        self.port.name.as_str()
    }

    /// Counts a fault or protocol error: `serial_errors_total{port, reason}`.
    pub fn error(&self, reason: &str) {
        self.metrics.serial_error(self.name(), reason).inc();
    }

    /// A receiver of the stop signal, to `select!` on with [`stop_requested`].
    pub(crate) fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.clone()
    }

    /// Maps `batch` through the mapping in force and appends it once: readings, plus
    /// dead-letters for what was rejected. `Full` (or an error) means nothing was stored.
    pub(crate) async fn try_commit(&mut self, batch: &Batch) -> Result<AppendOutcome, StoreError> {
        let Some(append) = self.prepare(batch).await else {
            return Err(StoreError::Closed);
        };
        append_once(&self.store, append).await
    }

    /// As [`try_commit`](Self::try_commit), but holds the values and retries with backoff while
    /// the buffer refuses them or a commit fails; ends early only when the gateway stops.
    pub async fn commit(&mut self, batch: &Batch) -> Result<AppendOutcome, PortFault> {
        let prepared = self.prepare(batch).await.ok_or(PortFault::Stopping)?;
        let mut retry = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut stop = self.stop.clone();
        loop {
            let why = match append_once(&self.store, prepared.clone()).await {
                Ok(outcome @ (AppendOutcome::Stored { .. } | AppendOutcome::Duplicate)) => {
                    return Ok(outcome)
                }
                Ok(AppendOutcome::Full) => "buffer full or disk reserve reached".to_string(),
                Err(StoreError::Closed) => return Err(PortFault::StoreClosed),
                Err(e) => e.to_string(),
            };
            if let Some(held) = self.full_log.admit() {
                tracing::warn!(port = %self.name(), readings = prepared.readings.len(), repeats = held, reason = %why, "not stored; holding the values and retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(retry.next_delay()) => {}
                _ = stop_requested(&mut stop) => {
                    tracing::warn!(port = %self.name(), readings = prepared.readings.len(), "stopping with values the buffer had no room for; they are lost");
                    return Err(PortFault::Stopping);
                }
            }
        }
    }

    /// Maps and screens a batch into what one commit appends, after the wait its flood budget
    /// asks for (the port is not read meanwhile). `None` if the gateway stops while waiting.
    async fn prepare(&mut self, batch: &Batch) -> Option<Append> {
        let mapped = if batch.values.is_empty() {
            Mapped::default()
        } else {
            mapping::current(&self.mapper).map_serial(self.name(), &batch.values, batch.received)
        };
        let name = self.port.name.to_string();
        if let Some(first) = batch.rejected.iter().chain(&mapped.rejections).next() {
            if let Some(held) = self.rejected_log.admit() {
                tracing::warn!(port = %name, reason = first.reason.label(), detail = %first.detail, repeats = held, "serial input rejected (kept in dead-letters)");
            }
        }
        let admitted = self.admission.admit(
            mapped,
            &batch.rejected,
            &format!("port {name}"),
            None,
            &batch.raw,
            Instant::now(),
        );
        if let Some(at) = admitted.wait_until {
            let mut stop = self.stop.clone();
            tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = stop_requested(&mut stop) => return None,
            }
        }
        Some(Append {
            readings: admitted.readings,
            dead_letters: admitted.dead_letters,
            message_key: batch.message_key,
            maybe_duplicate: batch.maybe_duplicate,
            frame_key: batch.frame_key,
            // Serial protocols carry no trace context: the event id gives one.
            trace: None,
        })
    }
}

/// The protocol engine of a port: each arm owns the open port until it is lost or the gateway
/// stops.
async fn run_protocol(io: SerialStream, ctx: &mut PortContext) -> Result<(), PortFault> {
    match ctx.port.protocol {
        Protocol::Lines => lines::run(io, ctx).await,
        Protocol::ModbusRtu => modbus::run(io, ctx).await,
        Protocol::Sdi12 => sdi12::run(io, ctx).await,
        Protocol::Frames => frames_port::run(io, ctx).await,
    }
}

/// Holds a port its engine cannot serve: logs `why`, counts `reason`, reports the port down
/// with `why`, and keeps it open (see [`hold`]).
pub(crate) async fn idle(
    io: SerialStream,
    ctx: &mut PortContext,
    reason: &str,
    why: String,
) -> Result<(), PortFault> {
    tracing::error!(port = %ctx.name(), "{why}");
    ctx.error(reason);
    ctx.metrics.set_serial_state(ctx.name(), Err(why));
    hold(io, ctx).await
}

/// Keeps an open port that has nothing to do: reads and drops what arrives, so that an unplug
/// is noticed, until the port is lost or the gateway stops.
pub(crate) async fn hold(mut io: SerialStream, ctx: &mut PortContext) -> Result<(), PortFault> {
    let mut stop = ctx.stop_signal();
    let mut buf = [0u8; 256];
    loop {
        tokio::select! {
            read = io.read(&mut buf) => match read? {
                0 => return Err(PortFault::Closed),
                n => {
                    ctx.bytes.inc_by(n as u64);
                }
            },
            _ = stop_requested(&mut stop) => return Err(PortFault::Stopping),
        }
    }
}

/// A `[[serial]]` port's task.
pub struct SerialInput {
    pub plan: PortPlan,
    pub quality: Quality,
    pub mapper: SharedMapper,
    pub store: StoreHandle,
    pub metrics: Arc<Metrics>,
    /// The registry the port enters while it runs (a `modbus-rtu` port), shared with whoever
    /// drives actuators on it.
    pub bus: BusRequests,
}

impl SerialInput {
    /// Opens the port, runs its engine, and opens it again whenever it is lost, until `stop`.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let name = self.plan.port.name.to_string();
        let mut ctx = PortContext::new(&self, stop.clone());
        let reconnects = self
            .metrics
            .serial_reconnects
            .get_or_create(&self.metrics.port(&name))
            .clone();
        let mut backoff = Backoff::new(REOPEN_FIRST, REOPEN_MAX);
        let mut was_open = false;
        let mut last_error: Option<String> = None;
        self.metrics
            .set_serial_state(&name, Err("not opened yet".into()));
        loop {
            if *stop.borrow() {
                break;
            }
            match open(&ctx.port) {
                Ok((io, device)) => {
                    if was_open {
                        reconnects.inc();
                    }
                    was_open = true;
                    last_error = None;
                    tracing::info!(port = %name, path = %ctx.port.path.display(), device = %device.display(), protocol = %ctx.port.protocol, "serial port open");
                    self.metrics.set_serial_state(&name, Ok(()));
                    let since = Instant::now();
                    match run_protocol(io, &mut ctx).await {
                        Ok(()) | Err(PortFault::Stopping) => break,
                        Err(PortFault::StoreClosed) => {
                            tracing::error!(port = %name, "buffer closed; stopping serial port");
                            break;
                        }
                        Err(fault @ (PortFault::Closed | PortFault::Io(_))) => {
                            ctx.error("lost");
                            tracing::warn!(port = %name, error = %fault, "serial port lost; opening it again with backoff");
                            self.metrics
                                .set_serial_state(&name, Err(format!("lost: {fault}")));
                            if since.elapsed() >= STABLE {
                                backoff.reset();
                            }
                        }
                    }
                }
                Err(e) => {
                    ctx.error(e.reason());
                    let text = e.to_string();
                    // Logged when the fault starts or changes, not at every attempt.
                    if last_error.as_deref() != Some(text.as_str()) {
                        tracing::warn!(port = %name, error = %text, "cannot open serial port; retrying with backoff");
                        last_error = Some(text.clone());
                    }
                    self.metrics.set_serial_state(&name, Err(text));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = stop_requested(&mut stop) => break,
            }
        }
        self.metrics.forget_serial_port(&name);
    }
}
