//! Turns what a source received into readings of configured sensors, or rejections with a
//! reason. Pure: no I/O, no clock (the receive time is passed in), so every rule here is tested
//! directly and the same code serves `run` and any dry-run tooling.
//!
//! Two entry points share the per-reading rules (calibration, range, timestamp policy):
//! [`Mapper::map_mqtt`] for MQTT messages and [`Mapper::map_serial`] for values a serial
//! protocol engine decoded, identified by their [`SerialKey`].

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde_json::Value;

use crate::config::serial::RegisterKind;
use crate::config::{
    Config, Format, JsonBinding, Protocol, SerialBinding, TimestampFormat, TimestampPolicy,
};
use crate::reading::{normalize_unit, type_outside_schema, Reading, SensorType, Timestamp};

/// Why an input did not become a reading. The label is the `reason` in metrics and dead-letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Malformed,
    Oversized,
    UnmappedTopic,
    UnknownDevice,
    UnknownSensorType,
    FieldMismatch,
    MissingValue,
    NotFinite,
    OutOfRange,
    BadTimestamp,
    /// The server refused the publish for good (set by the forwarder, not the mapping).
    PublishRefused,
    /// Over a device's flood limit (see `flood`): dead-lettered with its raw bytes, replayable.
    RateLimited,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Oversized => "oversized",
            Self::UnmappedTopic => "unmapped_topic",
            Self::UnknownDevice => "unknown_device",
            Self::UnknownSensorType => "unknown_sensor_type",
            Self::FieldMismatch => "field_mismatch",
            Self::MissingValue => "missing_value",
            Self::NotFinite => "not_finite",
            Self::OutOfRange => "out_of_range",
            Self::BadTimestamp => "bad_timestamp",
            Self::PublishRefused => "publish_refused",
            Self::RateLimited => "rate_limited",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: Reason,
    pub detail: String,
    /// The reading refused, where the mapping knows it; `None`: the whole message. A message
    /// refused in part had its other readings stored, so a replay must take only this one.
    pub refused: Option<Refused>,
}

/// Which reading a rejection refused: a device's, of one type when the type is known.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Refused {
    pub device: String,
    /// `None`: every reading of the device in the message.
    pub sensor_type: Option<SensorType>,
}

impl Rejection {
    /// A rejection of the whole message.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            refused: None,
        }
    }

    /// Names the reading refused (the message's other readings may have been stored).
    pub fn of(mut self, device: &str, sensor_type: Option<SensorType>) -> Self {
        self.refused = Some(Refused {
            device: device.to_string(),
            sensor_type,
        });
        self
    }
}

/// What one input made: readings to store and rejections to dead-letter, both from one commit.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Mapped {
    pub readings: Vec<Reading>,
    pub rejections: Vec<Rejection>,
}

impl Mapped {
    fn rejected(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            readings: Vec::new(),
            rejections: vec![Rejection::new(reason, detail)],
        }
    }

    fn push(&mut self, result: Result<Reading, Rejection>) {
        match result {
            Ok(r) => self.readings.push(r),
            Err(r) => self.rejections.push(r),
        }
    }
}

/// A configured sensor: where its readings go and how its raw values are calibrated.
#[derive(Debug, Clone)]
struct Target {
    device_id: String,
    sensor_type: SensorType,
    field_id: String,
    tenant_id: String,
    unit: String,
    scale: f64,
    offset: f64,
    range: Option<(f64, f64)>,
    /// `None`: any source of the sensor's format.
    source: Option<String>,
    /// Silence after which the sensor counts as disconnected.
    stale_after: std::time::Duration,
}

/// Which observation times are plausible, and what to do with the others.
#[derive(Debug, Clone)]
struct TimePolicy {
    max_future_ns: i64,
    max_past_ns: i64,
    replace: bool,
}

impl TimePolicy {
    /// Why `at` is implausible at `received`, if it is.
    fn judge(&self, at: Timestamp, received: Timestamp) -> Option<&'static str> {
        if at.0 > received.0.saturating_add(self.max_future_ns) {
            Some("too far in the future")
        } else if at.0 < received.0.saturating_sub(self.max_past_ns) {
            Some("implausibly old")
        } else {
            None
        }
    }
}

/// What a device reported, before calibration and range checks.
struct Observed<'a> {
    value: f64,
    /// As sent, borrowed from the payload: only the normalized unit is copied.
    unit: Option<&'a str>,
    /// The device's own observation time, when it sent one.
    at: Option<Timestamp>,
    battery: Option<f64>,
    rssi: Option<i64>,
    /// The device's own metadata as JSON object text (SAHOOL format only).
    metadata: Option<String>,
}

impl Target {
    fn reads_from(&self, source: &str) -> bool {
        self.source.as_deref().is_none_or(|s| s == source)
    }

    fn reading(
        &self,
        o: Observed<'_>,
        received: Timestamp,
        time: &TimePolicy,
    ) -> Result<Reading, Rejection> {
        if !o.value.is_finite() {
            return Err(Rejection::new(
                Reason::NotFinite,
                format!(
                    "{} {}: value is not a finite number",
                    self.device_id, self.sensor_type
                ),
            ));
        }
        let calibrated = self.scale != 1.0 || self.offset != 0.0;
        let value = o.value * self.scale + self.offset;
        if !value.is_finite() {
            return Err(Rejection::new(
                Reason::NotFinite,
                format!(
                    "{} {}: {} calibrated (x {} + {}) is not a finite number",
                    self.device_id, self.sensor_type, o.value, self.scale, self.offset
                ),
            ));
        }
        let unit = o.unit.map_or_else(|| self.unit.clone(), normalize_unit);
        // The default range is in the default unit; a sensor reporting another unit is only
        // checked against a range its config gives.
        let range = self.range.or_else(|| {
            (unit == self.sensor_type.default_unit())
                .then(|| self.sensor_type.default_range())
                .flatten()
        });
        if let Some((lo, hi)) = range {
            if !(lo..=hi).contains(&value) {
                return Err(Rejection::new(
                    Reason::OutOfRange,
                    format!(
                        "{} {}: {value} {unit} is outside [{lo}, {hi}]",
                        self.device_id, self.sensor_type
                    ),
                ));
            }
        }
        let (observed_at, original_timestamp) = match o.at {
            None => (received, None),
            Some(at) => match time.judge(at, received) {
                None => (at, None),
                Some(_) if time.replace => (received, Some(at)),
                Some(why) => {
                    return Err(Rejection::new(
                        Reason::BadTimestamp,
                        format!(
                            "{} {}: observation time {} is {why}",
                            self.device_id,
                            self.sensor_type,
                            at.to_rfc3339()
                        ),
                    ))
                }
            },
        };
        Ok(Reading {
            device_id: self.device_id.clone(),
            field_id: self.field_id.clone(),
            tenant_id: self.tenant_id.clone(),
            sensor_type: self.sensor_type,
            value,
            unit,
            observed_at,
            battery: o.battery,
            rssi: o.rssi,
            raw_value: calibrated.then_some(o.value),
            original_timestamp,
            device_time: o.at.is_some() && original_timestamp.is_none(),
            stale_after_ms: u64::try_from(self.stale_after.as_millis()).unwrap_or(u64::MAX),
            metadata: o.metadata,
        })
    }
}

/// The mapping in force; a reload swaps the inner `Arc`, sources take a snapshot per message.
pub(crate) type SharedMapper = std::sync::Arc<std::sync::RwLock<std::sync::Arc<Mapper>>>;

/// The mapping in force now.
pub fn current(shared: &SharedMapper) -> std::sync::Arc<Mapper> {
    shared.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The config's sensors, indexed for lookup by device and type, by MQTT topic, and by serial
/// port and binding key.
#[derive(Debug, Clone)]
pub struct Mapper {
    /// Keyed by device first, so a lookup borrows the payload's device id (no copy per reading).
    by_sensor: HashMap<String, HashMap<SensorType, Target>>,
    /// Sensors with a JSON binding, in config order.
    json: Vec<(JsonBinding, Target)>,
    sources: HashMap<String, SourceRules>,
    /// Serial-bound sensors by port name.
    serial: HashMap<String, PortTargets>,
    time: TimePolicy,
}

/// What identifies a value on a serial port: the binding of the sensor it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SerialKey {
    /// A kv key, CSV column or JSON member of a `lines` port.
    Line(String),
    Modbus {
        unit: u8,
        kind: RegisterKind,
        register: u16,
    },
    /// `index` is 1-based, in the order the sensor returned its values.
    Sdi12 {
        address: char,
        index: u16,
    },
    Frame {
        node: u32,
        channel: u8,
    },
}

impl SerialKey {
    pub fn of(binding: &SerialBinding) -> Self {
        match binding {
            SerialBinding::Line(b) => Self::Line(b.key.as_str().to_string()),
            SerialBinding::Modbus(b) => Self::Modbus {
                unit: b.unit.0,
                kind: b.kind,
                register: b.register,
            },
            SerialBinding::Sdi12(b) => Self::Sdi12 {
                address: b.address.0,
                index: b.index.0,
            },
            SerialBinding::Frame(b) => Self::Frame {
                node: b.node,
                channel: b.channel,
            },
        }
    }

    /// The bus station a key belongs to (Modbus unit, SDI-12 address, node), if any.
    fn station(&self) -> Option<String> {
        match self {
            Self::Line(_) => None,
            Self::Modbus { unit, .. } => Some(format!("Modbus unit {unit}")),
            Self::Sdi12 { address, .. } => Some(format!("SDI-12 address {address}")),
            Self::Frame { node, .. } => Some(format!("node {node}")),
        }
    }
}

impl fmt::Display for SerialKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Line(key) => write!(f, "key `{key}`"),
            Self::Modbus {
                unit,
                kind,
                register,
            } => {
                let kind = match kind {
                    RegisterKind::Holding => "holding",
                    RegisterKind::Input => "input",
                };
                write!(f, "Modbus unit {unit} {kind} register {register}")
            }
            Self::Sdi12 { address, index } => write!(f, "SDI-12 address {address} value {index}"),
            Self::Frame { node, channel } => write!(f, "node {node} channel {channel}"),
        }
    }
}

/// A value as a protocol decoded it: a number, or text that should hold one (`lines`).
#[derive(Debug, Clone, PartialEq)]
pub enum RawValue {
    Number(f64),
    Text(String),
}

/// One value read from a serial port, before calibration and range checks.
#[derive(Debug, Clone, PartialEq)]
pub struct SerialValue {
    pub key: SerialKey,
    /// The device the value says it is from (`lines`); `None`: whichever sensor binds `key`.
    pub device: Option<String>,
    pub value: RawValue,
    /// The device's own observation time, when it sent one.
    pub at: Option<Timestamp>,
    pub battery: Option<f64>,
    pub rssi: Option<i64>,
}

impl SerialValue {
    /// A number under a key, with nothing else known about it.
    pub fn number(key: SerialKey, value: f64) -> Self {
        Self {
            key,
            device: None,
            value: RawValue::Number(value),
            at: None,
            battery: None,
            rssi: None,
        }
    }
}

/// The sensors bound on one serial port.
#[derive(Debug, Clone)]
struct PortTargets {
    protocol: Protocol,
    /// Several targets share a key on a `lines` port when lines name their device.
    by_key: HashMap<SerialKey, Vec<Target>>,
    devices: HashSet<String>,
}

impl PortTargets {
    /// The sensor a value belongs to; `Err(None)` when no sensor binds it.
    fn target(&self, port: &str, v: &SerialValue) -> Result<&Target, Option<Rejection>> {
        let candidates = self.by_key.get(&v.key).map_or(&[][..], Vec::as_slice);
        match (&v.device, candidates) {
            (Some(device), _) => match candidates.iter().find(|t| &t.device_id == device) {
                Some(t) => Ok(t),
                None if !self.devices.contains(device) => Err(Some(
                    Rejection::new(
                        Reason::UnknownDevice,
                        format!("device `{device}` has no sensor on port `{port}`"),
                    )
                    .of(device, None),
                )),
                None => Err(None),
            },
            (None, [t]) => Ok(t),
            (None, []) => Err(None),
            (None, many) => Err(Some(Rejection::new(
                Reason::UnknownDevice,
                format!(
                    "{} is bound for devices {} on port `{port}`, and the value names no device",
                    v.key,
                    many.iter()
                        .map(|t| t.device_id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ))),
        }
    }

    /// Why nothing binds `key`: an unknown station, or an unbound value of a known one.
    fn unbound(&self, port: &str, key: &SerialKey) -> Rejection {
        match key.station() {
            Some(station)
                if !self
                    .by_key
                    .keys()
                    .any(|k| k.station().as_ref() == Some(&station)) =>
            {
                Rejection::new(
                    Reason::UnknownDevice,
                    format!("no sensor on port `{port}` is at {station}"),
                )
            }
            _ => Rejection::new(
                Reason::UnknownSensorType,
                format!("no sensor is bound to {key} on port `{port}`"),
            ),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct SourceRules {
    format: Format,
    max_payload: usize,
}

impl Mapper {
    pub fn new(config: &Config) -> Self {
        let mut by_sensor = HashMap::new();
        let mut json = Vec::new();
        let mut serial: HashMap<String, PortTargets> = config
            .serial
            .iter()
            .map(|p| {
                let targets = PortTargets {
                    protocol: p.protocol,
                    by_key: HashMap::new(),
                    devices: HashSet::new(),
                };
                (p.name.to_string(), targets)
            })
            .collect();
        for field in &config.fields {
            for s in &field.sensors {
                let target = Target {
                    device_id: s.device_id.to_string(),
                    sensor_type: s.sensor_type.0,
                    field_id: field.id.to_string(),
                    tenant_id: config.tenant_of(field).to_string(),
                    unit: s.unit.as_deref().map_or_else(
                        || s.sensor_type.0.default_unit().to_string(),
                        normalize_unit,
                    ),
                    scale: s.scale,
                    offset: s.offset,
                    range: s.range.map(|[lo, hi]| (lo, hi)),
                    source: s.source.as_ref().map(|n| n.to_string()),
                    stale_after: config.stale_after(s),
                };
                match (&s.mqtt, s.serial_binding()) {
                    (_, Some(binding)) => {
                        if let Some(port) = serial.get_mut(binding.port().as_str()) {
                            let port: &mut PortTargets = port;
                            port.devices.insert(target.device_id.clone());
                            port.by_key
                                .entry(SerialKey::of(&binding))
                                .or_default()
                                .push(target);
                        }
                    }
                    (Some(binding), None) => json.push((binding.clone(), target)),
                    (None, None) => {
                        let device: &mut HashMap<_, _> =
                            by_sensor.entry(target.device_id.clone()).or_default();
                        device.insert(target.sensor_type, target);
                    }
                }
            }
        }
        let rules = |format, max_payload: u64| SourceRules {
            format,
            max_payload: usize::try_from(max_payload).unwrap_or(usize::MAX),
        };
        let clients = config
            .mqtt
            .iter()
            .map(|m| (m.name.to_string(), rules(m.format, m.max_payload.0)));
        // A listener refuses packets above max_packet_size, so every payload it passes on fits.
        let listeners = config
            .mqtt_listener
            .iter()
            .map(|l| (l.name.to_string(), rules(l.format, l.max_packet_size.0)));
        let sources = clients.chain(listeners).collect();
        let nanos = |d: std::time::Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        let time = TimePolicy {
            max_future_ns: nanos(config.quality.max_future.0),
            max_past_ns: nanos(config.quality.max_past.0),
            replace: config.quality.timestamp_policy == TimestampPolicy::Replace,
        };
        Self {
            by_sensor,
            json,
            sources,
            serial,
            time,
        }
    }

    /// Maps values a protocol engine read on the named serial port. Each value becomes a
    /// reading of the sensor bound to its key, or a rejection. On a `lines` port a key no sensor
    /// binds is skipped (talkers print more than is wired up), but a line of which nothing is
    /// bound is rejected whole; on other ports every unbound value is rejected.
    pub fn map_serial(&self, port: &str, values: &[SerialValue], received: Timestamp) -> Mapped {
        let Some(targets) = self.serial.get(port) else {
            return Mapped::rejected(
                Reason::UnmappedTopic,
                format!("port `{port}` is not configured"),
            );
        };
        let lines = targets.protocol == Protocol::Lines;
        let mut out = Mapped::default();
        for v in values {
            let result = match targets.target(port, v) {
                Ok(target) => serial_reading(target, v, received, &self.time)
                    .map_err(|r| r.of(&target.device_id, Some(target.sensor_type))),
                Err(None) if lines => continue,
                Err(None) => Err(targets.unbound(port, &v.key)),
                Err(Some(rejection)) => Err(rejection),
            };
            match result {
                Ok(reading) => out.readings.push(reading),
                // A line from an unknown device says so once, not once per key.
                Err(r) if !out.rejections.contains(&r) => out.rejections.push(r),
                Err(_) => {}
            }
        }
        if lines && out.readings.is_empty() && out.rejections.is_empty() {
            let keys: Vec<String> = values.iter().map(|v| v.key.to_string()).collect();
            out.rejections.push(Rejection::new(
                Reason::UnknownSensorType,
                if keys.is_empty() {
                    "the line holds no values".to_string()
                } else {
                    format!(
                        "no sensor on port `{port}` is bound to any value of the line ({})",
                        keys.join(", ")
                    )
                },
            ));
        }
        out
    }

    /// Maps one MQTT message from the named source (`[[mqtt]]` or `[[mqtt_listener]]`).
    pub fn map_mqtt(
        &self,
        source: &str,
        topic: &str,
        payload: &[u8],
        received: Timestamp,
    ) -> Mapped {
        let Some(rules) = self.sources.get(source) else {
            return Mapped::rejected(Reason::UnmappedTopic, format!("unknown source `{source}`"));
        };
        if payload.len() > rules.max_payload {
            return Mapped::rejected(
                Reason::Oversized,
                format!(
                    "payload of {} bytes exceeds max_payload {}",
                    payload.len(),
                    rules.max_payload
                ),
            );
        }
        let doc: Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(e) => return Mapped::rejected(Reason::Malformed, format!("not JSON: {e}")),
        };
        match rules.format {
            Format::Sahool => self.map_sahool(source, topic, &doc, received),
            Format::Json => self.map_json(source, topic, &doc, received),
        }
    }

    /// SAHOOL's device convention: one reading, a batch (`readings` or `data`), or a top-level
    /// array of readings. Device, field and type may come from the topic
    /// `sahool/sensors/{device_id}/{field_id}/{sensor_type}`; a payload's own values win.
    fn map_sahool(&self, source: &str, topic: &str, doc: &Value, received: Timestamp) -> Mapped {
        let from_topic = |i: usize| topic.split('/').nth(i).filter(|s| !s.is_empty());
        let topic = Shared {
            device: from_topic(2),
            field: from_topic(3),
            type_name: from_topic(4),
            ..Shared::default()
        };
        let mut out = Mapped::default();
        match doc {
            Value::Object(obj) => self.sahool_object(source, obj, &topic, received, &mut out),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    match item.as_object() {
                        Some(obj) => self.sahool_object(source, obj, &topic, received, &mut out),
                        None => out.rejections.push(Rejection::new(
                            Reason::Malformed,
                            format!("item {i} of the array is not an object"),
                        )),
                    }
                }
            }
            _ => {
                return Mapped::rejected(Reason::Malformed, "payload is not a JSON object or array")
            }
        }
        out
    }

    /// One object: a reading, or a batch whose items share its values.
    fn sahool_object(
        &self,
        source: &str,
        obj: &serde_json::Map<String, Value>,
        parent: &Shared<'_>,
        received: Timestamp,
        out: &mut Mapped,
    ) {
        let shared = match Shared::of(obj, parent) {
            Ok(s) => s,
            Err(r) => return out.rejections.push(r),
        };
        let Some((key, batch)) = BATCH_KEYS.iter().find_map(|k| obj.get(*k).map(|v| (*k, v)))
        else {
            return out.push(self.sahool_item(source, obj, &shared, received));
        };
        let Some(items) = batch.as_array() else {
            return out.rejections.push(Rejection::new(
                Reason::Malformed,
                format!("`{key}` is not an array"),
            ));
        };
        for (i, item) in items.iter().enumerate() {
            let result = item
                .as_object()
                .ok_or_else(|| {
                    Rejection::new(Reason::Malformed, format!("{key}[{i}] is not an object"))
                })
                .and_then(|item| {
                    let own = Shared::of(item, &shared)?;
                    self.sahool_item(source, item, &own, received)
                });
            out.push(result);
        }
    }

    /// One reading: `item`'s value and unit, with the rest as `view` resolved it.
    fn sahool_item(
        &self,
        source: &str,
        item: &serde_json::Map<String, Value>,
        view: &Shared<'_>,
        received: Timestamp,
    ) -> Result<Reading, Rejection> {
        let device = view
            .device
            .ok_or_else(|| Rejection::new(Reason::Malformed, "no device_id in payload or topic"))?;
        let type_name = view.type_name.ok_or_else(|| {
            Rejection::new(Reason::Malformed, format!("{device}: no sensor type")).of(device, None)
        })?;
        let sensor_type = SensorType::from_name(type_name).ok_or_else(|| {
            let detail = match type_outside_schema(type_name) {
                Some(t) => format!(
                    "{device}: `{type_name}` means {t}, which the sensor_reading schema does not have"
                ),
                None => format!("{device}: unknown sensor type `{type_name}`"),
            };
            Rejection::new(Reason::UnknownSensorType, detail).of(device, None)
        })?;
        self.sahool_reading(source, item, view, received, device, sensor_type)
            .map_err(|r| r.of(device, Some(sensor_type)))
    }

    /// [`Self::sahool_item`] once the reading's device and type are known.
    fn sahool_reading(
        &self,
        source: &str,
        item: &serde_json::Map<String, Value>,
        view: &Shared<'_>,
        received: Timestamp,
        device: &str,
        sensor_type: SensorType,
    ) -> Result<Reading, Rejection> {
        let sensors = self.by_sensor.get(device);
        let target = sensors
            .and_then(|s| s.get(&sensor_type))
            .filter(|t| t.reads_from(source))
            .ok_or_else(|| {
                if sensors.is_some() {
                    Rejection::new(
                        Reason::UnknownSensorType,
                        format!("{device}: no {sensor_type} sensor is configured"),
                    )
                } else {
                    Rejection::new(
                        Reason::UnknownDevice,
                        format!("device `{device}` is not configured"),
                    )
                }
            })?;
        if let Some(field) = view.field {
            if field != target.field_id {
                return Err(Rejection::new(
                    Reason::FieldMismatch,
                    format!(
                        "{device} {sensor_type}: reports field `{field}`, config says `{}`",
                        target.field_id
                    ),
                ));
            }
        }
        let raw = Key::Value.get(item).ok_or_else(|| {
            Rejection::new(
                Reason::MissingValue,
                format!("{device} {sensor_type}: no value"),
            )
        })?;
        let value = number(raw).ok_or_else(|| {
            Rejection::new(
                Reason::Malformed,
                format!("{device} {sensor_type}: value {raw} is not a number"),
            )
        })?;
        // Battery and RSSI inside the metadata are promoted (moved out of it) when the payload
        // does not set them itself.
        let from_meta = |key: Key, set: bool| {
            let m = view.meta.filter(|_| !set)?;
            let (k, v) = key.entry(m)?;
            Some((k, metadata(v)?))
        };
        let meta_battery = from_meta(Key::Battery, view.battery.is_some());
        let meta_rssi = from_meta(Key::Rssi, view.rssi.is_some());
        let promoted: Vec<&str> = [meta_battery, meta_rssi]
            .iter()
            .flatten()
            .map(|(k, _)| *k)
            .collect();
        target.reading(
            Observed {
                value,
                unit: Key::Unit.get(item).and_then(Value::as_str),
                at: view.at,
                battery: view.battery.or(meta_battery.map(|(_, b)| b)),
                rssi: view.rssi.or(meta_rssi.map(|(_, r)| r.round() as i64)),
                metadata: view.meta.and_then(|m| device_metadata(m, &promoted)),
            },
            received,
            &self.time,
        )
    }

    fn map_json(&self, source: &str, topic: &str, doc: &Value, received: Timestamp) -> Mapped {
        let mut out = Mapped::default();
        let mut matched = false;
        for (binding, target) in &self.json {
            if !target.reads_from(source) || !binding.topic.matches(topic) {
                continue;
            }
            matched = true;
            let reading = json_reading(binding, target, doc, received, &self.time);
            out.push(reading.map_err(|r| r.of(&target.device_id, Some(target.sensor_type))));
        }
        if !matched {
            out.rejections.push(Rejection::new(
                Reason::UnmappedTopic,
                format!("no sensor is bound to topic `{topic}`"),
            ));
        }
        out
    }
}

/// SAHOOL's payload keys with every spelling of the platform's normaliser (`payload_keys` in
/// `tests/fixtures/sahool-normalizer.json`), plus `b` and `r` for battery and RSSI.
#[derive(Debug, Clone, Copy)]
enum Key {
    Device,
    Field,
    Type,
    Value,
    Unit,
    Time,
    Metadata,
    Battery,
    Rssi,
}

impl Key {
    fn spellings(self) -> &'static [&'static str] {
        match self {
            Self::Device => &["device_id", "deviceId", "d", "id"],
            Self::Field => &["field_id", "fieldId", "f", "field"],
            Self::Type => &["type", "sensor_type", "sensorType", "t"],
            Self::Value => &["value", "v", "val"],
            Self::Unit => &["unit", "u"],
            Self::Time => &["timestamp", "ts", "time"],
            Self::Metadata => &["metadata", "meta"],
            Self::Battery => &["battery", "b"],
            Self::Rssi => &["rssi", "r"],
        }
    }

    /// The member under the first spelling present, with that spelling; `null` counts as
    /// absent.
    fn entry(self, obj: &serde_json::Map<String, Value>) -> Option<(&'static str, &Value)> {
        self.spellings()
            .iter()
            .find_map(|k| obj.get(*k).filter(|v| !v.is_null()).map(|v| (*k, v)))
    }

    fn get(self, obj: &serde_json::Map<String, Value>) -> Option<&Value> {
        self.entry(obj).map(|(_, v)| v)
    }

    fn text(self, obj: &serde_json::Map<String, Value>) -> Option<&str> {
        self.get(obj).and_then(Value::as_str)
    }
}

/// Members holding a batch of readings, in the order looked for.
const BATCH_KEYS: [&str; 2] = ["readings", "data"];

/// What a reading's object says, or inherits from its batch (and the topic) where it is silent.
#[derive(Debug, Clone, Copy, Default)]
struct Shared<'a> {
    device: Option<&'a str>,
    field: Option<&'a str>,
    type_name: Option<&'a str>,
    at: Option<Timestamp>,
    /// Battery and RSSI set as members (not inside the metadata).
    battery: Option<f64>,
    rssi: Option<i64>,
    /// The device's metadata object; an item's own replaces its batch's whole.
    meta: Option<&'a serde_json::Map<String, Value>>,
}

impl<'a> Shared<'a> {
    fn of(obj: &'a serde_json::Map<String, Value>, parent: &Shared<'a>) -> Result<Self, Rejection> {
        let at = Key::Time
            .get(obj)
            .map(|v| {
                parse_timestamp(v, TimestampFormat::Auto, None).ok_or_else(|| {
                    Rejection::new(Reason::BadTimestamp, format!("cannot read timestamp {v}"))
                })
            })
            .transpose()?
            .or(parent.at);
        Ok(Self {
            device: Key::Device.text(obj).or(parent.device),
            field: Key::Field.text(obj).or(parent.field),
            type_name: Key::Type.text(obj).or(parent.type_name),
            at,
            battery: Key::Battery.get(obj).and_then(metadata).or(parent.battery),
            rssi: Key::Rssi
                .get(obj)
                .and_then(metadata)
                .map(|r| r.round() as i64)
                .or(parent.rssi),
            // Metadata that is not an object is ignored, as if absent.
            meta: Key::Metadata
                .get(obj)
                .and_then(Value::as_object)
                .or(parent.meta),
        })
    }
}

/// Bounds of the device metadata carried into an event, so one chatty device cannot bloat
/// every buffered row: JSON text bytes and keys.
const DEVICE_METADATA_MAX_BYTES: usize = 1024;
const DEVICE_METADATA_MAX_KEYS: usize = 32;

/// Keys the gateway itself writes into `payload.metadata`. A device's own value under one of
/// them is kept as `device_<key>` (the gateway's key keeps the contract's type).
const GATEWAY_METADATA_KEYS: [&str; 4] = ["battery", "rssi", "raw_value", "original_timestamp"];

/// The device's metadata as it goes into the event: without the members promoted to battery
/// and RSSI, keys of the gateway's renamed, and over the bounds replaced by a note saying so.
fn device_metadata(meta: &serde_json::Map<String, Value>, promoted: &[&str]) -> Option<String> {
    let mut out = serde_json::Map::new();
    for (k, v) in meta.iter().filter(|(k, _)| !promoted.contains(&k.as_str())) {
        let mut key = k.clone();
        if GATEWAY_METADATA_KEYS.contains(&k.as_str()) {
            key.insert_str(0, "device_");
            while meta.contains_key(&key) {
                key.insert_str(0, "device_");
            }
        }
        out.insert(key, v.clone());
    }
    if out.is_empty() {
        return None;
    }
    let text = serde_json::to_string(&out).ok()?;
    if out.len() <= DEVICE_METADATA_MAX_KEYS && text.len() <= DEVICE_METADATA_MAX_BYTES {
        return Some(text);
    }
    let note = format!(
        "device metadata of {} keys and {} bytes exceeds {DEVICE_METADATA_MAX_KEYS} keys or {DEVICE_METADATA_MAX_BYTES} bytes",
        out.len(),
        text.len()
    );
    serde_json::to_string(&serde_json::json!({ "device_metadata_dropped": note })).ok()
}

fn json_reading(
    b: &JsonBinding,
    target: &Target,
    doc: &Value,
    received: Timestamp,
    time: &TimePolicy,
) -> Result<Reading, Rejection> {
    let who = || format!("{} {}", target.device_id, target.sensor_type);
    let raw = doc.pointer(b.value.as_str()).ok_or_else(|| {
        Rejection::new(
            Reason::MissingValue,
            format!("{}: nothing at {}", who(), b.value.as_str()),
        )
    })?;
    let value = number(raw).ok_or_else(|| {
        Rejection::new(
            Reason::Malformed,
            format!("{}: {raw} at {} is not a number", who(), b.value.as_str()),
        )
    })?;
    let at = match &b.timestamp {
        None => None,
        Some(ptr) => Some({
            let v = doc.pointer(ptr.as_str()).ok_or_else(|| {
                Rejection::new(
                    Reason::BadTimestamp,
                    format!("{}: no timestamp at {}", who(), ptr.as_str()),
                )
            })?;
            parse_timestamp(v, b.timestamp_format, b.utc_offset.map(|o| o.0)).ok_or_else(|| {
                Rejection::new(
                    Reason::BadTimestamp,
                    format!("{}: cannot read timestamp {v}", who()),
                )
            })?
        }),
    };
    let pointed = |p: &Option<crate::config::JsonPointer>| {
        p.as_ref()
            .and_then(|p| doc.pointer(p.as_str()))
            .and_then(metadata)
    };
    target.reading(
        Observed {
            value,
            unit: None,
            at,
            battery: pointed(&b.battery),
            rssi: pointed(&b.rssi).map(|r| r.round() as i64),
            metadata: None,
        },
        received,
        time,
    )
}

fn serial_reading(
    target: &Target,
    v: &SerialValue,
    received: Timestamp,
    time: &TimePolicy,
) -> Result<Reading, Rejection> {
    let value = match &v.value {
        RawValue::Number(n) => *n,
        RawValue::Text(text) => text.trim().parse().map_err(|_| {
            Rejection::new(
                Reason::Malformed,
                format!(
                    "{} {}: {} holds `{text}`, not a number",
                    target.device_id, target.sensor_type, v.key
                ),
            )
        })?,
    };
    target.reading(
        Observed {
            value,
            unit: None,
            at: v.at,
            // As for MQTT (`metadata`): a non-finite battery has no JSON form in the event.
            battery: v.battery.filter(|b| b.is_finite()),
            rssi: v.rssi,
            metadata: None,
        },
        received,
        time,
    )
}

/// A device's own observation time in any form `timestamp_format = "auto"` reads: RFC 3339,
/// or epoch seconds or milliseconds as a number or a string.
pub(crate) fn parse_device_time(v: &Value) -> Option<Timestamp> {
    parse_timestamp(v, TimestampFormat::Auto, None)
}

/// A JSON number, or a string holding one (`"24.61"`, as ChirpStack codecs often emit).
fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A metadata number (battery, RSSI). A non-finite one (`"nan"`, `"inf"`) has no JSON form in
/// the event, so it is left out rather than sent as `null` where the contract wants a number.
fn metadata(v: &Value) -> Option<f64> {
    number(v).filter(|n| n.is_finite())
}

fn parse_timestamp(
    v: &Value,
    format: TimestampFormat,
    offset: Option<time::UtcOffset>,
) -> Option<Timestamp> {
    match (format, v) {
        (TimestampFormat::EpochSeconds, v) => {
            number(v).and_then(|n| Timestamp::from_epoch_number(n.min(9.9e10)))
        }
        (TimestampFormat::EpochMillis, v) => {
            number(v).and_then(|n| Timestamp::from_epoch_number(n.max(1e11)))
        }
        (TimestampFormat::Local, Value::String(s)) => Timestamp::parse_local(s, offset?),
        (TimestampFormat::Rfc3339, Value::String(s)) => Timestamp::parse_rfc3339(s),
        (TimestampFormat::Auto, Value::String(s)) => Timestamp::parse_rfc3339(s)
            .or_else(|| offset.and_then(|o| Timestamp::parse_local(s, o)))
            .or_else(|| number(v).and_then(Timestamp::from_epoch_number)),
        (TimestampFormat::Auto, Value::Number(_)) => {
            number(v).and_then(Timestamp::from_epoch_number)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapper(extra: &str) -> Mapper {
        let text = format!(
            r#"
[gateway]
id = "gw"
tenant_id = "t"
[nats]
servers = ["nats://127.0.0.1:4222"]
[[mqtt]]
name = "farm"
url = "mqtt://127.0.0.1:1883"
topics = ["sahool/sensors/#"]
format = "sahool"
max_payload = "1KiB"
{extra}
"#
        );
        Mapper::new(&crate::config::parse(&text).unwrap())
    }

    const SOIL: &str = r#"
[[fields]]
id = "field-1"
  [[fields.sensors]]
  device_id = "probe"
  sensor_type = "soil_moisture"
"#;

    fn at() -> Timestamp {
        Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap()
    }

    #[test]
    fn rejects_with_reasons() {
        let m = mapper(SOIL);
        let cases: &[(&str, Reason)] = &[
            ("not json", Reason::Malformed),
            (r#"[1,2]"#, Reason::Malformed),
            (
                r#"{"device_id":"ghost","type":"vwc","value":1}"#,
                Reason::UnknownDevice,
            ),
            (
                r#"{"device_id":"probe","type":"rain","value":1}"#,
                Reason::UnknownSensorType,
            ),
            (
                r#"{"device_id":"probe","type":"bogus","value":1}"#,
                Reason::UnknownSensorType,
            ),
            (
                r#"{"device_id":"probe","type":"vwc","value":"NaN"}"#,
                Reason::NotFinite,
            ),
            (
                r#"{"device_id":"probe","type":"vwc","value":140}"#,
                Reason::OutOfRange,
            ),
            (
                r#"{"device_id":"probe","type":"vwc"}"#,
                Reason::MissingValue,
            ),
            (
                r#"{"device_id":"probe","field_id":"other","type":"vwc","value":1}"#,
                Reason::FieldMismatch,
            ),
            (
                r#"{"device_id":"probe","type":"vwc","value":1,"timestamp":"soon"}"#,
                Reason::BadTimestamp,
            ),
        ];
        for (payload, reason) in cases {
            let out = m.map_mqtt("farm", "sahool/sensors/x", payload.as_bytes(), at());
            assert!(out.readings.is_empty(), "{payload}");
            assert_eq!(out.rejections[0].reason, *reason, "{payload}: {out:?}");
        }
        let big = format!(
            r#"{{"device_id":"probe","type":"vwc","value":1,"pad":"{}"}}"#,
            "x".repeat(2000)
        );
        let out = m.map_mqtt("farm", "t", big.as_bytes(), at());
        assert_eq!(out.rejections[0].reason, Reason::Oversized);
    }

    #[test]
    fn batch_keeps_good_items_and_rejects_bad_ones() {
        let m = mapper(SOIL);
        let payload = r#"{"device_id":"probe","readings":[{"type":"vwc","value":20},{"type":"vwc","value":-5},7]}"#;
        let out = m.map_mqtt(
            "farm",
            "sahool/sensors/probe/field-1",
            payload.as_bytes(),
            at(),
        );
        assert_eq!(out.readings.len(), 1);
        assert_eq!(out.readings[0].value, 20.0);
        assert_eq!(out.readings[0].observed_at, at());
        let reasons: Vec<_> = out.rejections.iter().map(|r| r.reason).collect();
        assert_eq!(reasons, vec![Reason::OutOfRange, Reason::Malformed]);
    }

    /// What `dead-letters replay` needs to take only the refused readings of a message stored
    /// in part: each refused reading names itself; a whole-message rejection names nothing.
    #[test]
    fn partial_rejections_name_the_reading_refused_and_whole_messages_nothing() {
        let refused = |out: &Mapped| -> Vec<Option<(String, Option<SensorType>)>> {
            out.rejections
                .iter()
                .map(|r| r.refused.clone().map(|i| (i.device, i.sensor_type)))
                .collect()
        };
        let probe = |t| Some(("probe".to_string(), t));
        let m = mapper(SOIL);
        let sahool = |payload: &str| m.map_mqtt("farm", "sahool/sensors", payload.as_bytes(), at());
        let batch = r#"{"device_id":"probe","readings":[{"type":"vwc","value":20},{"type":"vwc","value":-5},{"type":"rain","value":1},{"type":"bogus","value":1},7]}"#;
        let out = sahool(batch);
        assert_eq!(out.readings.len(), 1);
        assert_eq!(
            refused(&out),
            vec![
                probe(Some(SensorType::SoilMoisture)),
                probe(Some(SensorType::Rainfall)),
                probe(None),
                None
            ]
        );
        for whole in ["not json", "42", r#"{"type":"vwc","value":1}"#] {
            assert_eq!(refused(&sahool(whole)), vec![None], "{whole}");
        }

        let m = mapper(
            r#"
[[mqtt]]
name = "bridges"
url = "mqtt://127.0.0.1:1883"
topics = ["tele/#"]
format = "json"
[[fields]]
id = "field-1"
  [[fields.sensors]]
  device_id = "pump"
  sensor_type = "air_temperature"
  mqtt = { topic = "tele/pump", value = "/t" }
  [[fields.sensors]]
  device_id = "pump"
  sensor_type = "air_humidity"
  mqtt = { topic = "tele/pump", value = "/h" }
"#,
        );
        let out = m.map_mqtt("bridges", "tele/pump", br#"{"t":21}"#, at());
        assert_eq!(out.readings.len(), 1);
        let humidity = Some(("pump".to_string(), Some(SensorType::AirHumidity)));
        assert_eq!(refused(&out), vec![humidity]);
        let out = m.map_mqtt("bridges", "tele/other", br#"{"t":21}"#, at());
        assert_eq!(refused(&out), vec![None], "an unmapped topic");

        let m = mapper(SERIAL);
        let text = |t: &str| RawValue::Text(t.into());
        let line = [
            line_value(Some("probe-b"), "t", text("21.5")),
            line_value(Some("probe-b"), "vwc", text("wet")),
        ];
        let out = m.map_serial("talk", &line, at());
        assert_eq!(out.readings.len(), 1);
        let vwc = Some(("probe-b".to_string(), Some(SensorType::SoilMoisture)));
        assert_eq!(refused(&out), vec![vwc]);
        let out = m.map_serial("talk", &[line_value(None, "nothing", text("1"))], at());
        assert_eq!(
            refused(&out),
            vec![None],
            "a line of which nothing is bound"
        );
    }

    /// Found by fuzzing: a finite value that calibration overflows, and metadata numbers
    /// without a JSON form, made events whose `value` or `battery` was `null`.
    #[test]
    fn non_finite_after_calibration_is_rejected_and_non_finite_metadata_left_out() {
        let m = mapper(
            r#"
[[fields]]
id = "f"
  [[fields.sensors]]
  device_id = "wx"
  sensor_type = "wind_speed"
  scale = 3.6
"#,
        );
        let topic = "sahool/sensors/wx/f/wind_speed";
        let out = m.map_mqtt("farm", topic, br#"{"v":1e308,"u":"km/h"}"#, at());
        assert!(out.readings.is_empty(), "{out:?}");
        assert_eq!(out.rejections[0].reason, Reason::NotFinite);
        let out = m.map_mqtt(
            "farm",
            topic,
            br#"{"v":2,"battery":"nan","rssi":"-inf"}"#,
            at(),
        );
        let r = &out.readings[0];
        assert_eq!((r.battery, r.rssi), (None, None), "{r:?}");
        assert!((r.value - 7.2).abs() < 1e-12);
    }

    #[test]
    fn calibration_keeps_raw_value_and_config_range() {
        let m = mapper(
            r#"
[[fields]]
id = "f"
  [[fields.sensors]]
  device_id = "ec-1"
  sensor_type = "soil_ec"
  scale = 0.001
  range = [0.0, 1.0]
"#,
        );
        let out = m.map_mqtt(
            "farm",
            "sahool/sensors/ec-1/f/soil_ec",
            br#"{"v":520}"#,
            at(),
        );
        let r = &out.readings[0];
        assert!((r.value - 0.52).abs() < 1e-12);
        assert_eq!(r.raw_value, Some(520.0));
        assert_eq!(r.unit, "mS/cm");
        let out = m.map_mqtt(
            "farm",
            "sahool/sensors/ec-1/f/soil_ec",
            br#"{"v":2000}"#,
            at(),
        );
        assert_eq!(out.rejections[0].reason, Reason::OutOfRange);
    }

    const SERIAL: &str = r#"
[[serial]]
name = "talk"
path = "/dev/ttyS1"
protocol = "lines"
line_format = "kv"

[[serial]]
name = "bus"
path = "/dev/ttyUSB0"
protocol = "modbus-rtu"

[[fields]]
id = "field-1"
  [[fields.sensors]]
  device_id = "probe-a"
  sensor_type = "soil_temperature"
  line = { port = "talk", key = "t" }
  [[fields.sensors]]
  device_id = "probe-b"
  sensor_type = "soil_temperature"
  line = { port = "talk", key = "t" }
  [[fields.sensors]]
  device_id = "probe-b"
  sensor_type = "soil_moisture"
  line = { port = "talk", key = "vwc" }
  [[fields.sensors]]
  device_id = "rs485-probe"
  sensor_type = "soil_moisture"
  modbus = { port = "bus", unit = 3, register = 0, scale = 0.1 }
"#;

    fn line_value(device: Option<&str>, key: &str, value: RawValue) -> SerialValue {
        SerialValue {
            device: device.map(str::to_string),
            value,
            ..SerialValue::number(SerialKey::Line(key.into()), 0.0)
        }
    }

    #[test]
    fn serial_values_map_through_the_shared_rules() {
        let m = mapper(SERIAL);
        let modbus = |register| SerialKey::Modbus {
            unit: 3,
            kind: RegisterKind::Holding,
            register,
        };
        let out = m.map_serial("bus", &[SerialValue::number(modbus(0), 235.0)], at());
        let r = &out.readings[0];
        assert_eq!(
            (r.device_id.as_str(), r.field_id.as_str()),
            ("rs485-probe", "field-1")
        );
        assert!((r.value - 23.5).abs() < 1e-9);
        assert_eq!(r.raw_value, Some(235.0));
        assert_eq!(r.observed_at, at());
        let out = m.map_serial("bus", &[SerialValue::number(modbus(0), 2000.0)], at());
        assert_eq!(out.rejections[0].reason, Reason::OutOfRange);
        let out = m.map_serial("bus", &[SerialValue::number(modbus(7), 1.0)], at());
        assert_eq!(
            out.rejections[0].reason,
            Reason::UnknownSensorType,
            "{out:?}"
        );
        let other_unit = SerialKey::Modbus {
            unit: 9,
            kind: RegisterKind::Holding,
            register: 0,
        };
        let out = m.map_serial("bus", &[SerialValue::number(other_unit, 1.0)], at());
        assert_eq!(out.rejections[0].reason, Reason::UnknownDevice, "{out:?}");
        let out = m.map_serial("nope", &[SerialValue::number(modbus(0), 1.0)], at());
        assert_eq!(out.rejections[0].reason, Reason::UnmappedTopic);
    }

    #[test]
    fn lines_pick_the_device_skip_unbound_keys_and_reject_what_is_left() {
        let m = mapper(SERIAL);
        let num = |n| RawValue::Number(n);
        let device_time = Timestamp(at().0 - 60_000_000_000);
        let mut with_time = line_value(Some("probe-b"), "t", num(21.5));
        with_time.at = Some(device_time);
        with_time.battery = Some(88.0);
        let out = m.map_serial(
            "talk",
            &[
                with_time,
                line_value(Some("probe-b"), "vwc", RawValue::Text(" 31.5 ".into())),
                line_value(Some("probe-b"), "uptime", num(5.0)),
            ],
            at(),
        );
        assert!(out.rejections.is_empty(), "{out:?}");
        assert_eq!(out.readings.len(), 2);
        assert_eq!(out.readings[0].observed_at, device_time);
        assert_eq!(out.readings[0].battery, Some(88.0));
        assert_eq!(out.readings[1].value, 31.5);
        let mut infinite = line_value(Some("probe-b"), "t", num(21.5));
        infinite.battery = Some(f64::INFINITY);
        let out = m.map_serial("talk", &[infinite], at());
        assert_eq!(
            out.readings[0].battery, None,
            "a battery of `inf` (or `974e44`) is left out, not sent as null"
        );

        let reasons = |values: &[SerialValue]| -> Vec<Reason> {
            let out = m.map_serial("talk", values, at());
            assert!(out.readings.is_empty(), "{out:?}");
            out.rejections.iter().map(|r| r.reason).collect()
        };
        // Two devices bind `t` and the line names neither.
        assert_eq!(
            reasons(&[line_value(None, "t", num(1.0))]),
            [Reason::UnknownDevice]
        );
        // An unknown device is reported once per line.
        assert_eq!(
            reasons(&[
                line_value(Some("ghost"), "t", num(1.0)),
                line_value(Some("ghost"), "vwc", num(1.0))
            ]),
            [Reason::UnknownDevice]
        );
        assert_eq!(
            reasons(&[line_value(
                Some("probe-a"),
                "t",
                RawValue::Text("warm".into())
            )]),
            [Reason::Malformed]
        );
        assert_eq!(
            reasons(&[line_value(
                Some("probe-a"),
                "t",
                RawValue::Text("NaN".into())
            )]),
            [Reason::NotFinite]
        );
        assert_eq!(
            reasons(&[line_value(Some("probe-a"), "uptime", num(1.0))]),
            [Reason::UnknownSensorType],
            "nothing of the line is bound"
        );
    }
}
