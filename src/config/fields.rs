//! `[[fields]]` and their `[[fields.sensors]]`: which device's reading of which type belongs to
//! which field, calibrated how, and bound to which input (an MQTT JSON binding here, serial
//! bindings in [`super::serial`]). A field's `[[fields.actuators]]` are in `actuators.rs`.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;
use toml::de::DeValue;
use toml::Spanned;

use super::lines::LineIndex;
use super::{
    actuators, serial, Actuator, DurationValue, Format, Ident, JsonPointer, MqttInputRef, Problem,
    SensorTypeName, TopicFilter, UtcOffsetValue,
};
use crate::reading::SensorType;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    pub id: Ident,
    pub tenant_id: Option<Ident>,
    pub name: Option<String>,
    #[serde(default)]
    pub sensors: Vec<Sensor>,
    /// What platform commands may drive in this field (DESIGN §8).
    #[serde(default)]
    pub actuators: Vec<Actuator>,
    #[serde(skip)]
    pub line: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sensor {
    pub device_id: Ident,
    pub sensor_type: SensorTypeName,
    pub unit: Option<String>,
    #[serde(default = "one")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    /// `[min, max]` of plausible values after scaling; defaults to SAHOOL's range for the type.
    pub range: Option<[f64; 2]>,
    /// The `[[mqtt]]` source or `[[mqtt_listener]]` this sensor is read from; default: every
    /// MQTT input of its format.
    pub source: Option<Ident>,
    /// Binding for `format = "json"` sources.
    pub mqtt: Option<JsonBinding>,
    /// Binding to a `lines` serial port (TOML key `line`).
    #[serde(rename = "line")]
    pub(crate) line_binding: Option<serial::LineBinding>,
    /// Binding to a `modbus-rtu` serial port.
    pub modbus: Option<serial::ModbusBinding>,
    /// Binding to an `sdi12` serial port.
    pub sdi12: Option<serial::Sdi12Binding>,
    /// Binding to a `frames` serial port.
    pub frame: Option<serial::FrameBinding>,
    /// How often this sensor reports; default: its source's, then `[quality] expected_interval`.
    pub expected_interval: Option<DurationValue>,
    #[serde(skip)]
    pub line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimestampFormat {
    /// RFC 3339 strings, epoch numbers (s or ms), or local time when `utc_offset` is set.
    #[default]
    Auto,
    Rfc3339,
    EpochSeconds,
    EpochMillis,
    Local,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonBinding {
    pub topic: TopicFilter,
    pub value: JsonPointer,
    pub timestamp: Option<JsonPointer>,
    #[serde(default)]
    pub(crate) timestamp_format: TimestampFormat,
    pub utc_offset: Option<UtcOffsetValue>,
    pub rssi: Option<JsonPointer>,
    pub battery: Option<JsonPointer>,
}

fn one() -> f64 {
    1.0
}

/// The `[[fields]]` entries, each with its line and its sensors' lines, a Modbus binding's
/// calibration folded into its sensor; entries with problems are left out (the problems are
/// reported).
pub(super) fn entries(
    lines: &LineIndex,
    value: Spanned<DeValue<'_>>,
    problems: &mut Vec<Problem>,
) -> Vec<Field> {
    let mut fields = Vec::new();
    for (line, item) in lines.array(value, "[[fields]]", problems) {
        let sensors = sensor_keys(lines, &item);
        let actuator_lines = actuators::entry_lines(lines, &item);
        if let Some(mut f) = lines.section::<Field>(item, "[[fields]]", problems) {
            f.line = line;
            for (actuator, line) in f.actuators.iter_mut().zip(actuator_lines) {
                actuator.line = line;
            }
            for (sensor, (line, given)) in f.sensors.iter_mut().zip(sensors) {
                sensor.line = line;
                problems.extend(serial::fold_calibration(sensor, given));
            }
            fields.push(f);
        }
    }
    fields
}

/// The line of each sensor of a `[[fields]]` entry, and which of `scale` and `offset` it sets
/// in its own table (a Modbus binding may carry them instead, not as well).
fn sensor_keys(lines: &LineIndex, field: &Spanned<DeValue<'_>>) -> Vec<(usize, [bool; 2])> {
    let DeValue::Table(table) = field.get_ref() else {
        return Vec::new();
    };
    let Some(DeValue::Array(sensors)) = table.get("sensors").map(|s| s.get_ref()) else {
        return Vec::new();
    };
    sensors
        .iter()
        .map(|s| {
            let given = match s.get_ref() {
                DeValue::Table(t) => [t.contains_key("scale"), t.contains_key("offset")],
                _ => [false, false],
            };
            (lines.line(s.span().start), given)
        })
        .collect()
}

/// Problems of the fields and their sensors, and of sensors' MQTT bindings against `inputs`
/// (serial bindings are checked with the ports, in [`serial::check`]).
pub(super) fn check(
    fields: &[Field],
    inputs: &[MqttInputRef<'_>],
    push: &mut impl FnMut(usize, String),
) {
    let mut field_ids = HashSet::new();
    let mut sensors: HashMap<(&str, SensorType), usize> = HashMap::new();
    for f in fields {
        if !field_ids.insert(f.id.as_str()) {
            push(f.line, format!("[[fields]] id `{}` is used twice", f.id));
        }
        for s in &f.sensors {
            let key = (s.device_id.as_str(), s.sensor_type.0);
            if let Some(first) = sensors.insert(key, s.line) {
                push(s.line, format!(
                    "sensor {} / {} is already mapped at line {first}; a sensor belongs to one field",
                    s.device_id, s.sensor_type.0
                ));
            }
            s.check(inputs, &mut |message| push(s.line, message));
        }
    }
}

impl Sensor {
    /// Problems of this sensor on its own and of its MQTT binding.
    fn check(&self, inputs: &[MqttInputRef<'_>], problem: &mut impl FnMut(String)) {
        let id = &self.device_id;
        if !self.scale.is_finite() || self.scale == 0.0 || !self.offset.is_finite() {
            problem(format!(
                "sensor {id}: scale must be finite and non-zero, offset finite"
            ));
        }
        if let Some([lo, hi]) = self.range {
            if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                problem(format!(
                    "sensor {id}: range must be [min, max] with min < max"
                ));
            }
        }
        if self.serial_binding().is_some() {
            // Read from a serial port: checked with the ports (serial::check).
            return;
        }
        let bound: Vec<&MqttInputRef> = match &self.source {
            Some(name) => match inputs.iter().find(|m| m.name == name) {
                Some(m) => vec![m],
                None => {
                    problem(format!(
                        "sensor {id}: source `{name}` is not an [[mqtt]] or [[mqtt_listener]] name"
                    ));
                    return;
                }
            },
            None => inputs.iter().collect(),
        };
        let wants = if self.mqtt.is_some() {
            Format::Json
        } else {
            Format::Sahool
        };
        if !inputs.is_empty() && !bound.iter().any(|m| m.format == wants) {
            let msg = match wants {
                Format::Json => {
                    "has an [fields.sensors.mqtt] binding but no format = \"json\" source reads it"
                }
                Format::Sahool => {
                    "has no [fields.sensors.mqtt] binding, which a format = \"json\" source needs"
                }
            };
            problem(format!("sensor {id} / {} {msg}", self.sensor_type.0));
        }
        if let Some(b) = &self.mqtt {
            if b.utc_offset.is_some() && b.timestamp.is_none() {
                problem(format!("sensor {id}: utc_offset needs a timestamp pointer"));
            }
            if b.timestamp_format == TimestampFormat::Local && b.utc_offset.is_none() {
                problem(format!(
                    "sensor {id}: timestamp_format = \"local\" needs utc_offset"
                ));
            }
        }
    }
}
