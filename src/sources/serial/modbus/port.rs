//! The `modbus-rtu` engine on a gateway port: the port's sensors become poll groups (one per
//! poll interval, each a [`Plan`]), polled on a [`Schedule`] by one [`Poller`]; each poll's
//! values are committed as one batch.
//!
//! - Observation time of a value: when its request's answer arrived.
//! - Every request is counted in `modbus_requests_total{port, unit, outcome}`; a float that
//!   holds NaN or infinity in `serial_errors_total{port, reason="not_finite"}`.
//! - A corrupt answer (`crc`), a refusal (`exception`), an answer to something else
//!   (`unexpected`) and a non-finite float are bad input: logged and dead-lettered with the
//!   bytes that arrived, both rate-limited per slave and reason ([`StationFaults`]). A
//!   `timeout` is logged (rate-limited) and counted only.
//! - A lost port ends the engine after the values read before the loss are committed.
//! - Bus requests (actuator writes and read-backs, [`super::bus`]) are taken while the engine
//!   runs: between polls, and one before each poll request, so a request waits for the
//!   request in progress, never a whole cycle, and a poll is held up by at most one request
//!   per request of its own. While a poll's values wait for room in the buffer, requests are
//!   still served (a pump's `off` must not wait for disk space). A port with no sensors
//!   serves requests only.
//!
//! The sensor list is read at start: a change of the port's bindings restarts the port
//! ([`PortPlan::unchanged`](crate::sources::serial::PortPlan::unchanged)).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_serial::SerialStream;

use super::{
    plan, BusError, BusRequest, CycleReport, Fault, Plan, Point, PointError, Poller, PortLost,
    RegisterKind, Timing, WordOrder,
};
use crate::common::metrics::Metrics;
use crate::config::serial::{self as config, SerialBinding};
use crate::ingest::mapping::{Reason, SerialKey, SerialValue};
use crate::sources::serial::polling::{Schedule, StationFault, StationFaults};
use crate::sources::serial::{idle, stop_requested, PortContext, PortFault, PortSensor};

impl From<config::RegisterKind> for RegisterKind {
    fn from(kind: config::RegisterKind) -> Self {
        match kind {
            config::RegisterKind::Holding => Self::Holding,
            config::RegisterKind::Input => Self::Input,
        }
    }
}

impl From<config::WordOrder> for WordOrder {
    fn from(order: config::WordOrder) -> Self {
        match order {
            config::WordOrder::Big => Self::Big,
            config::WordOrder::Little => Self::Little,
        }
    }
}

/// Sensors polled at one interval.
#[derive(Debug, Clone, PartialEq)]
pub struct PollGroup {
    pub every: Duration,
    pub plan: Plan,
}

/// The port's sensors as the poller reads them: a [`PointId`](super::PointId) is an index into `keys`.
#[derive(Debug, Clone, PartialEq)]
pub struct Bus {
    pub keys: Vec<SerialKey>,
    /// By poll interval, shortest first.
    pub groups: Vec<PollGroup>,
}

impl Bus {
    /// The Modbus sensors of a port; a sensor without its own `poll_interval` is polled at
    /// `port_interval`.
    pub fn of(sensors: &[PortSensor], port_interval: Duration) -> Result<Self, PointError> {
        let mut keys = Vec::new();
        let mut by_interval: BTreeMap<Duration, Vec<Point>> = BTreeMap::new();
        for sensor in sensors {
            let SerialBinding::Modbus(b) = &sensor.binding else {
                continue;
            };
            let point = Point {
                id: keys.len(),
                unit: b.unit.0,
                kind: b.kind.into(),
                register: b.register,
                value_type: b.value_type,
                word_order: b.word_order().into(),
            };
            keys.push(SerialKey::of(&sensor.binding));
            let every = b.poll_interval.map_or(port_interval, |d| d.0);
            by_interval.entry(every).or_default().push(point);
        }
        let groups = by_interval
            .into_iter()
            .map(|(every, points)| {
                Ok(PollGroup {
                    every,
                    plan: plan(&points)?,
                })
            })
            .collect::<Result<_, PointError>>()?;
        Ok(Self { keys, groups })
    }
}

/// What one poll gave: values to commit, and faults to report.
#[derive(Debug, Default)]
struct Outcome {
    values: Vec<SerialValue>,
    faults: Vec<StationFault>,
}

/// How logs and dead-letters name a slave.
fn station(unit: u8) -> String {
    format!("Modbus unit {unit}")
}

/// A Modbus fault as reported: bad input is dead-lettered (a corrupt or unexpected answer as
/// malformed, a refusal as a missing value), silence only counted.
fn station_fault(unit: u8, what: &str, fault: &Fault, raw: Vec<u8>) -> StationFault {
    let station = station(unit);
    StationFault {
        detail: format!("{station} {what}: {fault}"),
        station,
        label: fault.reason(),
        dead_letter: match fault {
            Fault::Timeout => None,
            Fault::NotFinite => Some(Reason::NotFinite),
            Fault::Exception(_) => Some(Reason::MissingValue),
            Fault::Crc | Fault::Unexpected => Some(Reason::Malformed),
        },
        raw,
    }
}

impl Bus {
    /// Sorts one poll's report into values (timed by their answer) and faults.
    fn outcome(&self, plan: &Plan, report: &CycleReport) -> Outcome {
        let mut out = Outcome::default();
        let mut answered = HashMap::new();
        for (request, result) in plan.requests.iter().zip(&report.requests) {
            for slot in &request.slots {
                answered.insert(slot.id, result.at);
            }
            if let Err(fault) = &result.result {
                let end = u32::from(result.start) + u32::from(result.count);
                let what = format!("{} registers {}..{end}", result.kind.name(), result.start);
                out.faults
                    .push(station_fault(result.unit, &what, fault, result.raw.clone()));
            }
        }
        for (id, value) in &report.values {
            let Some(key) = self.keys.get(*id) else {
                continue;
            };
            match (value, key) {
                (Ok(v), _) => out.values.push(SerialValue {
                    at: answered.get(id).copied(),
                    ..SerialValue::number(key.clone(), *v)
                }),
                (
                    Err(fault @ Fault::NotFinite),
                    SerialKey::Modbus {
                        unit,
                        kind,
                        register,
                    },
                ) => {
                    let kind = RegisterKind::from(*kind).name();
                    let what = format!("{kind} register {register}");
                    out.faults
                        .push(station_fault(*unit, &what, fault, Vec::new()));
                }
                // Request faults are reported once per request, above.
                (Err(_), _) => {}
            }
        }
        out
    }
}

/// Polls the port's sensors, and serves bus requests (actuator writes and read-backs) in
/// between, until the port is lost or the gateway stops. The port takes requests (is in
/// [`PortContext::bus`]) while this runs.
pub async fn run(io: SerialStream, ctx: &mut PortContext) -> Result<(), PortFault> {
    let bus = match Bus::of(&ctx.sensors, ctx.port.poll_interval()) {
        Ok(bus) => bus,
        Err(e) => {
            let why = format!("a Modbus binding cannot be read ({e}); the port is not polled");
            return idle(io, ctx, "plan", why).await;
        }
    };
    if bus.groups.is_empty() {
        tracing::info!(port = %ctx.name(), "no sensor is bound to this Modbus port; it serves actuator requests only");
    }
    let (_registration, requests) = ctx.bus.register(ctx.name());
    let timing = Timing::new(ctx.port.timeout.0, ctx.port.settings().baud);
    let mut master = Master {
        poller: Poller::new(io, timing),
        requests,
        port: ctx.name().to_string(),
        metrics: ctx.metrics.clone(),
    };
    let mut schedule = Schedule::new(bus.groups.iter().map(|g| g.every), Instant::now());
    let mut faults = StationFaults::new();
    let mut stop = ctx.stop_signal();
    let mut counted_bytes = 0;
    loop {
        count_bytes(&master.poller, ctx, &mut counted_bytes);
        let next = schedule.next();
        // Only waits race here; a request on the bus is never cancelled but by a stop.
        let step = tokio::select! {
            biased;
            _ = stop_requested(&mut stop) => return Err(PortFault::Stopping),
            group = due(next) => Ok(group),
            Some(request) = master.requests.recv() => Err(request),
        };
        let group = match step {
            Ok(group) => group,
            Err(request) => {
                tokio::select! {
                    served = master.serve(request) => served?,
                    _ = stop_requested(&mut stop) => return Err(PortFault::Stopping),
                };
                continue;
            }
        };
        let plan = &bus.groups[group].plan;
        let polled = tokio::select! {
            polled = master.poll(plan) => polled,
            _ = stop_requested(&mut stop) => return Err(PortFault::Stopping),
        };
        count_bytes(&master.poller, ctx, &mut counted_bytes);
        match polled {
            Ok(report) => {
                let committing = commit(ctx, &bus, plan, &report, &mut faults);
                master.serving(committing).await?;
            }
            Err(PortLost { error, partial }) => {
                commit(ctx, &bus, plan, &partial, &mut faults).await?;
                return Err(PortFault::Io(error));
            }
        }
        schedule.polled(group, Instant::now());
    }
}

/// Adds the bytes read since the last count to `serial_bytes_received_total`.
fn count_bytes(poller: &Poller<SerialStream>, ctx: &PortContext, counted: &mut u64) {
    let bytes = poller.bytes_received();
    ctx.bytes.inc_by(bytes - *counted);
    *counted = bytes;
}

/// The group `next` names, once it is due; never, when nothing is polled.
async fn due(next: Option<(usize, Instant)>) -> usize {
    match next {
        Some((group, at)) => {
            tokio::time::sleep_until(at).await;
            group
        }
        None => std::future::pending().await,
    }
}

/// The master end of the bus: the poller, and the requests others wait on.
struct Master {
    poller: Poller<SerialStream>,
    requests: mpsc::Receiver<BusRequest>,
    port: String,
    metrics: Arc<Metrics>,
}

impl Master {
    /// One poll of `plan`, serving at most one waiting bus request before each poll request:
    /// a request waits for the poll request in progress, not the whole cycle, and a poll is
    /// held up by one request at a time, not by a queue of them.
    async fn poll(&mut self, plan: &Plan) -> Result<CycleReport, PortLost> {
        let mut report = CycleReport::default();
        for request in &plan.requests {
            let step = async {
                if let Ok(waiting) = self.requests.try_recv() {
                    self.serve(waiting).await?;
                }
                self.poller.poll_request(request, &mut report).await
            };
            if let Err(error) = step.await {
                return Err(PortLost {
                    error,
                    partial: report,
                });
            }
        }
        Ok(report)
    }

    /// Runs `work` (a commit, which waits while the buffer is full) to its end, serving bus
    /// requests meanwhile: a full buffer must not hold up a pump's `off`. A port lost while
    /// serving is reported once `work` is done.
    async fn serving(
        &mut self,
        work: impl Future<Output = Result<(), PortFault>>,
    ) -> Result<(), PortFault> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                done = &mut work => return done,
                Some(request) = self.requests.recv() => {
                    if let Err(lost) = self.serve(request).await {
                        work.await?;
                        return Err(PortFault::Io(lost));
                    }
                }
            }
        }
    }

    /// Carries out one bus request and answers it; `Err` only when the port is gone. A
    /// request whose caller stopped waiting is dropped unsent: the caller counts it as failed,
    /// and a write it does not know of must not land.
    async fn serve(&mut self, request: BusRequest) -> std::io::Result<()> {
        let BusRequest { kind, reply } = request;
        let port = self.port.as_str();
        if reply.is_closed() {
            tracing::debug!(port, request = ?kind, "the caller stopped waiting; not sent");
            return Ok(());
        }
        let result = self.poller.serve(&kind).await;
        let answer = match &result {
            Ok(Ok(answer)) => Ok(answer.clone()),
            Ok(Err(fault)) => Err(BusError::from_fault(port, &kind, fault)),
            Err(e) => Err(BusError::PortLost {
                port: port.to_string(),
                what: kind.describe(),
                detail: e.to_string(),
            }),
        };
        if let Ok(outcome) = &result {
            let label = outcome.as_ref().map_or_else(Fault::reason, |_| "ok");
            self.metrics.modbus_request(port, kind.unit(), label).inc();
        }
        match &answer {
            Ok(_) => tracing::debug!(port, request = ?kind, "bus request served"),
            Err(e) => tracing::warn!(port, error = %e, "bus request failed"),
        }
        let _ = reply.send(answer);
        result.map(drop)
    }
}

/// Counts one poll's requests and commits its values, then the faults kept as dead-letters.
async fn commit(
    ctx: &mut PortContext,
    bus: &Bus,
    plan: &Plan,
    report: &CycleReport,
    faults: &mut StationFaults,
) -> Result<(), PortFault> {
    for r in &report.requests {
        ctx.metrics
            .modbus_request(ctx.name(), r.unit, r.outcome())
            .inc();
        if r.result != Err(Fault::Timeout) {
            ctx.messages.inc();
        }
        if r.result.is_ok() {
            faults.answered(ctx.name(), &station(r.unit));
        }
    }
    let outcome = bus.outcome(plan, report);
    for f in &outcome.faults {
        if f.label == Fault::NotFinite.reason() {
            ctx.error(f.label);
        }
    }
    faults
        .commit_poll(ctx, outcome.values, outcome.faults)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::serial::{ModbusBinding, ModbusUnit, RegisterType};
    use crate::config::{DurationValue, Ident};
    use crate::reading::{SensorType, Timestamp};
    use crate::sources::serial::modbus::RequestOutcome;

    fn sensor(unit: u8, register: u16, t: RegisterType, every: Option<u64>) -> PortSensor {
        PortSensor {
            device_id: format!("probe-{unit}"),
            field_id: "f".into(),
            sensor_type: SensorType::SoilMoisture,
            binding: SerialBinding::Modbus(ModbusBinding {
                port: Ident::try_from("bus".to_string()).unwrap(),
                unit: ModbusUnit(unit),
                register,
                kind: config::RegisterKind::Holding,
                value_type: t,
                word_order: None,
                scale: None,
                offset: None,
                poll_interval: every.map(|s| DurationValue(Duration::from_secs(s))),
            }),
        }
    }

    #[test]
    fn sensors_are_grouped_by_poll_interval_and_planned() {
        let sensors = [
            sensor(1, 0, RegisterType::U16, None),
            sensor(1, 1, RegisterType::I16, None),
            sensor(2, 4, RegisterType::F32, Some(600)),
            sensor(1, 2, RegisterType::U32, Some(30)),
        ];
        let bus = Bus::of(&sensors, Duration::from_secs(30)).unwrap();
        assert_eq!(bus.keys.len(), 4);
        assert_eq!(bus.keys[2], SerialKey::of(&sensors[2].binding));
        /// (unit, start, count) of a request.
        type Read = (u8, u16, u16);
        let shape: Vec<(u64, Vec<Read>)> = bus
            .groups
            .iter()
            .map(|g| {
                let requests = g
                    .plan
                    .requests
                    .iter()
                    .map(|r| (r.unit, r.start, r.count))
                    .collect();
                (g.every.as_secs(), requests)
            })
            .collect();
        assert_eq!(
            shape,
            vec![(30, vec![(1, 0, 4)]), (600, vec![(2, 4, 2)])],
            "unit 1's three registers in one read; the 10-minute sensor on its own"
        );
    }

    #[test]
    fn a_report_becomes_values_timed_by_their_answer_and_faults_per_request() {
        let sensors = [
            sensor(1, 0, RegisterType::U16, None),
            sensor(1, 1, RegisterType::F32, None),
            sensor(3, 0, RegisterType::U16, None),
        ];
        let bus = Bus::of(&sensors, Duration::from_secs(1)).unwrap();
        let plan = &bus.groups[0].plan;
        let outcome = |unit, result: Result<(), Fault>, at, raw: &[u8]| RequestOutcome {
            unit,
            kind: RegisterKind::Holding,
            start: 0,
            count: 3,
            result,
            at: Timestamp(at),
            raw: raw.to_vec(),
        };
        let report = CycleReport {
            values: vec![
                (0, Ok(250.0)),
                (1, Err(Fault::NotFinite)),
                (2, Err(Fault::Crc)),
            ],
            requests: vec![
                outcome(1, Ok(()), 10, b""),
                outcome(3, Err(Fault::Crc), 20, b"\x03\x03\x02"),
            ],
        };
        let out = bus.outcome(plan, &report);
        assert_eq!(out.values.len(), 1);
        assert_eq!(out.values[0].key, bus.keys[0]);
        assert_eq!(out.values[0].at, Some(Timestamp(10)));
        let fault = |station: &str, label, detail: &str, dead_letter, raw: &[u8]| StationFault {
            station: station.into(),
            label,
            detail: detail.into(),
            dead_letter,
            raw: raw.to_vec(),
        };
        assert_eq!(
            out.faults,
            vec![
                fault(
                    "Modbus unit 3",
                    "crc",
                    "Modbus unit 3 holding registers 0..3: the answer failed its CRC check",
                    Some(Reason::Malformed),
                    b"\x03\x03\x02"
                ),
                fault(
                    "Modbus unit 1",
                    "not_finite",
                    "Modbus unit 1 holding register 1: the register value is not a finite number",
                    Some(Reason::NotFinite),
                    b""
                ),
            ]
        );
        let silent = station_fault(2, "holding registers 0..1", &Fault::Timeout, Vec::new());
        assert_eq!(silent.dead_letter, None, "silence is only counted");
        let refused = station_fault(4, "x", &Fault::Exception(2), Vec::new());
        assert_eq!(refused.dead_letter, Some(Reason::MissingValue));
        assert!(
            refused.detail.contains("illegal data address"),
            "{}",
            refused.detail
        );
    }
}
