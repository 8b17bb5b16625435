//! The `sdi12` engine on a gateway port: at every poll, each sensor address bound on the port
//! takes one measurement with its configured command, and value `index` of the answer (1-based)
//! goes to the sensor bound to it; the poll's values are committed as one batch.
//!
//! Measurements run one address after the other, `C` (concurrent) ones included: the
//! [`Session`] waits out each measurement before the next command, so a bus of `n` sensors
//! takes the sum of their announced times per poll. Polls that overrun the interval skip the
//! ticks they missed ([`Schedule`]).
//!
//! - Observation time of a value: when its measurement's last data response arrived.
//! - Every measurement is counted in `sdi12_measurements_total{port, address, outcome}`; a
//!   bound index the answer does not reach in `serial_errors_total{port, reason =
//!   "missing_value"}`.
//! - A wrong CRC, an unreadable or misaddressed answer, fewer values than announced and a
//!   missing index are bad input: logged and dead-lettered (with the response text where there
//!   is one), rate-limited per address and reason ([`StationFaults`]); a `timeout` is logged
//!   (rate-limited) and counted only.
//! - A lost port, or the gateway stopping, ends the engine after the values measured before
//!   are committed.

use tokio::time::Instant;
use tokio_serial::SerialStream;

use super::{Address, MeasureCommand, ParseError, Sdi12Fault, Session};
use crate::config::serial::{Sdi12Command, SerialBinding};
use crate::ingest::mapping::{Reason, SerialKey, SerialValue};
use crate::reading::Timestamp;
use crate::sources::serial::polling::{Schedule, StationFault, StationFaults};
use crate::sources::serial::{hold, idle, stop_requested, PortContext, PortFault, PortSensor};

impl From<Sdi12Command> for MeasureCommand {
    fn from(c: Sdi12Command) -> Self {
        match c {
            Sdi12Command::M => Self::M,
            Sdi12Command::MC => Self::MC,
            Sdi12Command::C => Self::C,
            Sdi12Command::CC => Self::CC,
        }
    }
}

/// One sensor address on the bus and the values bound to it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Station {
    pub address: Address,
    pub command: MeasureCommand,
    /// (1-based index, key) of each bound value.
    pub bound: Vec<(u16, SerialKey)>,
}

impl Station {
    fn name(&self) -> String {
        format!("SDI-12 address {}", self.address)
    }
}

/// The SDI-12 addresses of a port's sensors, in the order they first appear in the config.
pub(crate) fn stations(sensors: &[PortSensor]) -> Result<Vec<Station>, super::AddressError> {
    let mut stations: Vec<Station> = Vec::new();
    for sensor in sensors {
        let SerialBinding::Sdi12(b) = &sensor.binding else {
            continue;
        };
        let address = Address::new(b.address.0)?;
        let key = SerialKey::of(&sensor.binding);
        match stations.iter_mut().find(|s| s.address == address) {
            // The config gives one command per address.
            Some(station) => station.bound.push((b.index.0, key)),
            None => stations.push(Station {
                address,
                command: b.command.into(),
                bound: vec![(b.index.0, key)],
            }),
        }
    }
    Ok(stations)
}

/// A measurement's values for the sensors bound to them, and the indexes it did not reach.
fn bound_values(station: &Station, values: &[f64], at: Timestamp) -> (Vec<SerialValue>, Vec<u16>) {
    let mut out = Vec::with_capacity(station.bound.len());
    let mut missing = Vec::new();
    for (index, key) in &station.bound {
        match values.get(usize::from(*index) - 1) {
            Some(v) => out.push(SerialValue {
                at: Some(at),
                ..SerialValue::number(key.clone(), *v)
            }),
            None => missing.push(*index),
        }
    }
    (out, missing)
}

/// Values in the form a sensor sends them: `0+21.5-1.25`.
fn sdi12_text(address: Address, values: &[f64]) -> Vec<u8> {
    let mut text = address.to_string();
    for v in values {
        text.push_str(&format!("{v:+}"));
    }
    text.into_bytes()
}

/// The response text a fault carries, kept with its dead-letter.
fn fault_raw(address: Address, fault: &Sdi12Fault) -> Vec<u8> {
    match fault {
        Sdi12Fault::Crc(e) | Sdi12Fault::Malformed(e) => match e {
            ParseError::Crc(text) | ParseError::Malformed { text, .. } => text.clone().into_bytes(),
            ParseError::Address(c) => c.to_string().into_bytes(),
            ParseError::Empty => Vec::new(),
        },
        Sdi12Fault::FewerValues { values, .. } => sdi12_text(address, values),
        Sdi12Fault::Timeout { .. } | Sdi12Fault::WrongAddress { .. } | Sdi12Fault::Io(_) => {
            Vec::new()
        }
    }
}

impl Station {
    /// A failed measurement as reported: bad input is dead-lettered with the response it
    /// carries (a wrong CRC, an unreadable or misaddressed answer as malformed, fewer values
    /// than announced as a missing value), silence only counted.
    fn fault(&self, fault: &Sdi12Fault) -> StationFault {
        StationFault {
            station: self.name(),
            label: fault.reason(),
            detail: format!("{}: {fault}", self.name()),
            dead_letter: match fault {
                Sdi12Fault::Timeout { .. } | Sdi12Fault::Io(_) => None,
                Sdi12Fault::FewerValues { .. } => Some(Reason::MissingValue),
                Sdi12Fault::Crc(_) | Sdi12Fault::Malformed(_) | Sdi12Fault::WrongAddress { .. } => {
                    Some(Reason::Malformed)
                }
            },
            raw: fault_raw(self.address, fault),
        }
    }

    /// Bound indexes a measurement did not reach, with its values.
    fn missing(&self, measured: &[f64], missing: &[u16]) -> StationFault {
        let indexes: Vec<String> = missing.iter().map(u16::to_string).collect();
        StationFault {
            station: self.name(),
            label: "missing_value",
            detail: format!(
                "{}: the measurement has {} values; value {} is bound but missing",
                self.name(),
                measured.len(),
                indexes.join(", ")
            ),
            dead_letter: Some(Reason::MissingValue),
            raw: sdi12_text(self.address, measured),
        }
    }
}

/// Measures the port's sensors at every poll until the port is lost or the gateway stops.
pub async fn run(io: SerialStream, ctx: &mut PortContext) -> Result<(), PortFault> {
    let stations = match stations(&ctx.sensors) {
        Ok(s) => s,
        Err(e) => {
            let why = format!("an SDI-12 binding cannot be read ({e}); the port is not polled");
            return idle(io, ctx, "plan", why).await;
        }
    };
    if stations.is_empty() {
        tracing::warn!(port = %ctx.name(), "no sensor is bound to this SDI-12 port; nothing to poll");
        return hold(io, ctx).await;
    }
    let mut session = Session::new(io, ctx.port.timeout.0);
    let mut schedule = Schedule::new([ctx.port.poll_interval()], Instant::now());
    let mut faults = StationFaults::new();
    let mut stop = ctx.stop_signal();
    let mut counted_bytes = 0;
    while let Some((group, due)) = schedule.next() {
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stop_requested(&mut stop) => return Err(PortFault::Stopping),
        }
        let mut values = Vec::new();
        let mut reported = Vec::new();
        // Why the poll ended early; what was measured before is committed first.
        let mut ended = None;
        for station in &stations {
            let measured = tokio::select! {
                m = session.measure(station.address, station.command) => m,
                _ = stop_requested(&mut stop) => {
                    ended = Some(PortFault::Stopping);
                    break;
                }
            };
            let outcome = match &measured {
                Ok(_) => "ok",
                Err(fault) => fault.reason(),
            };
            ctx.metrics
                .sdi12_measurement(ctx.name(), station.address.as_char(), outcome)
                .inc();
            match measured {
                Ok(measured) => {
                    ctx.messages.inc();
                    faults.answered(ctx.name(), &station.name());
                    let (bound, missing) = bound_values(station, &measured, Timestamp::now());
                    values.extend(bound);
                    if !missing.is_empty() {
                        ctx.error("missing_value");
                        reported.push(station.missing(&measured, &missing));
                    }
                }
                Err(Sdi12Fault::Io(e)) => {
                    ended = Some(PortFault::Io(e));
                    break;
                }
                Err(fault) => reported.push(station.fault(&fault)),
            }
        }
        let bytes = session.bytes_received();
        ctx.bytes.inc_by(bytes - counted_bytes);
        counted_bytes = bytes;
        faults.commit_poll(ctx, values, reported).await?;
        if let Some(fault) = ended {
            return Err(fault);
        }
        schedule.polled(group, Instant::now());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::serial::{Sdi12Address, Sdi12Binding, Sdi12Index};
    use crate::config::Ident;
    use crate::reading::SensorType;

    fn sensor(address: char, index: u16, command: Sdi12Command) -> PortSensor {
        PortSensor {
            device_id: format!("probe-{address}"),
            field_id: "f".into(),
            sensor_type: SensorType::SoilMoisture,
            binding: SerialBinding::Sdi12(Sdi12Binding {
                port: Ident::try_from("sdi".to_string()).unwrap(),
                address: Sdi12Address(address),
                index: Sdi12Index(index),
                command,
            }),
        }
    }

    #[test]
    fn sensors_are_grouped_by_address_in_config_order() {
        let sensors = [
            sensor('1', 2, Sdi12Command::MC),
            sensor('0', 1, Sdi12Command::M),
            sensor('1', 1, Sdi12Command::MC),
        ];
        let s = stations(&sensors).unwrap();
        let shape: Vec<(char, MeasureCommand, Vec<u16>)> = s
            .iter()
            .map(|s| {
                (
                    s.address.as_char(),
                    s.command,
                    s.bound.iter().map(|(i, _)| *i).collect(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                ('1', MeasureCommand::MC, vec![2, 1]),
                ('0', MeasureCommand::M, vec![1])
            ]
        );
        assert!(stations(&[sensor('?', 1, Sdi12Command::M)]).is_err());
    }

    #[test]
    fn values_go_to_their_index_and_missing_ones_are_named() {
        let s = stations(&[
            sensor('0', 3, Sdi12Command::M),
            sensor('0', 1, Sdi12Command::M),
        ])
        .unwrap()
        .remove(0);
        let (values, missing) = bound_values(&s, &[21.5, 30.0, -1.25], Timestamp(7));
        let got: Vec<(SerialKey, Option<Timestamp>)> =
            values.iter().map(|v| (v.key.clone(), v.at)).collect();
        assert_eq!(
            got,
            vec![
                (s.bound[0].1.clone(), Some(Timestamp(7))),
                (s.bound[1].1.clone(), Some(Timestamp(7)))
            ]
        );
        assert_eq!(
            values.iter().map(|v| v.value.clone()).collect::<Vec<_>>(),
            vec![
                crate::ingest::mapping::RawValue::Number(-1.25),
                crate::ingest::mapping::RawValue::Number(21.5)
            ]
        );
        assert!(missing.is_empty());
        let (values, missing) = bound_values(&s, &[21.5], Timestamp(7));
        assert_eq!((values.len(), missing), (1, vec![3]));
    }

    #[test]
    fn faults_keep_the_response_they_carry() {
        let a = Address::new('0').unwrap();
        let crc = Sdi12Fault::Crc(ParseError::Crc("0+3.14OqY".into()));
        assert_eq!(fault_raw(a, &crc), b"0+3.14OqY");
        let fewer = Sdi12Fault::FewerValues {
            expected: 3,
            values: vec![1.5, -2.0],
        };
        assert_eq!(fault_raw(a, &fewer), b"0+1.5-2");
        let timeout = Sdi12Fault::Timeout {
            command: "0M!".into(),
        };
        assert!(fault_raw(a, &timeout).is_empty());

        let station = stations(&[sensor('0', 3, Sdi12Command::MC)])
            .unwrap()
            .remove(0);
        let reported = station.fault(&crc);
        assert_eq!(
            (
                reported.label,
                reported.dead_letter,
                reported.raw.as_slice()
            ),
            ("crc", Some(Reason::Malformed), &b"0+3.14OqY"[..])
        );
        assert_eq!(
            station.fault(&timeout).dead_letter,
            None,
            "silence is only counted"
        );
        assert_eq!(
            station.fault(&fewer).dead_letter,
            Some(Reason::MissingValue)
        );
        let missing = station.missing(&[1.5, -2.0], &[3]);
        assert_eq!(
            (missing.detail.as_str(), missing.raw.as_slice()),
            (
                "SDI-12 address 0: the measurement has 2 values; value 3 is bound but missing",
                &b"0+1.5-2"[..]
            )
        );
    }
}
