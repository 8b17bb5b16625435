//! `[[fields.actuators]]`: what platform commands may drive (DESIGN §8). A command names an
//! actuator id, never an address, so everything a write needs, and every limit on it, is here:
//! its kind, the coil, register or MQTT topic it is bound to, the setpoint range, `max_on`,
//! `min_off` and the interlocks.
//!
//! Invariants of a config that parsed: actuator ids are unique across all fields; each actuator
//! has exactly one binding (`modbus` or `mqtt`), on a `[[serial]]` modbus-rtu port or an
//! `[[mqtt]]` source that exists; a switch is a coil with no range, a setpoint a holding register
//! with a range `lo < hi` that its register type can hold; `max_on` / `min_off` only on switches;
//! `requires_on` names other switches, without a cycle; `block_when` names a configured sensor;
//! no two actuators drive the same coil or register.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::Deserialize;
use toml::de::DeValue;
use toml::Spanned;

use super::lines::LineIndex;
use super::serial::{ModbusUnit, Protocol, RegisterType};
use super::{DurationValue, Ident, JsonPointer, Parts, SensorTypeName, TopicFilter};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Actuator {
    /// What commands name (`payload.actuator_id`); unique across all fields.
    pub id: Ident,
    pub kind: ActuatorKind,
    /// Switches: never on longer than this in one run, whatever was asked.
    pub max_on: Option<DurationValue>,
    /// Switches: rest between runs; an `on` sooner is refused.
    pub min_off: Option<DurationValue>,
    /// Switches that must be on for this one to switch on or be set.
    #[serde(default)]
    pub requires_on: Vec<Ident>,
    /// Refuse `on` / `set` while this sensor's live reading is beyond a limit, or missing.
    pub block_when: Option<BlockWhen>,
    /// Setpoints: `[lo, hi]` in the actuator's unit (after scale/offset); outside is refused.
    pub range: Option<[f64; 2]>,
    pub modbus: Option<ModbusActuator>,
    pub mqtt: Option<MqttActuator>,
    #[serde(skip)]
    pub line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActuatorKind {
    /// On or off: pumps, valves, relays.
    Switch,
    /// A value within `range`: dosing rates, target pressures.
    Setpoint,
}

/// `block_when = { sensor = "tank-5/water_level", below = 10.0 }`: one limit, below or above.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockWhen {
    pub sensor: SensorRef,
    pub below: Option<f64>,
    pub above: Option<f64>,
}

/// A configured sensor as `device_id/sensor_type`, the key readings are known by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct SensorRef {
    pub device_id: Ident,
    pub sensor_type: SensorTypeName,
}

impl TryFrom<String> for SensorRef {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let Some((device, sensor_type)) = s.split_once('/') else {
            return Err(format!(
                "sensor `{s}`: write it as \"device_id/sensor_type\", e.g. \"tank-5/water_level\""
            ));
        };
        Ok(Self {
            device_id: Ident::try_from(device.to_string())?,
            sensor_type: SensorTypeName::try_from(sensor_type.to_string())?,
        })
    }
}

impl fmt::Display for SensorRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.device_id, self.sensor_type.0.as_str())
    }
}

/// `[fields.actuators.modbus]`: a coil (switch) or a holding register (setpoint) of a slave.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusActuator {
    pub port: Ident,
    pub unit: ModbusUnit,
    /// Switches: the coil, 0-based as sent.
    pub coil: Option<u16>,
    /// Setpoints: the holding register, 0-based as sent (32-bit types: high word first).
    pub register: Option<u16>,
    #[serde(rename = "type")]
    pub value_type: Option<RegisterType>,
    /// value = raw * scale + offset, as for sensors.
    pub scale: Option<f64>,
    pub offset: Option<f64>,
}

impl ModbusActuator {
    pub fn value_type(&self) -> RegisterType {
        self.value_type.unwrap_or_default()
    }
    pub fn scale(&self) -> f64 {
        self.scale.unwrap_or(1.0)
    }
    pub fn offset(&self) -> f64 {
        self.offset.unwrap_or(0.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActuatorFormat {
    /// SAHOOL's own actuator devices, as the platform's iot-service drives them:
    /// `{"command": "ON"|"OFF", "timestamp", "source"}` on `.../actuator/.../command`, state
    /// `{"status": ...}` on the sibling `.../status` topic.
    Sahool,
}

/// The state topic of a `format = "sahool"` device: its command topic's sibling.
const SAHOOL_COMMAND_LEVEL: &str = "/command";
const SAHOOL_STATE_LEVEL: &str = "/status";
/// Where a SAHOOL device's state payload holds on or off.
const SAHOOL_STATE_POINTER: &str = "/status";

/// `[fields.actuators.mqtt]`: explicit topics and payloads, or `format = "sahool"` with the
/// device's command topic (the prefix before `/actuator/` is the farm's, so it is given, not
/// guessed).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttActuator {
    /// The `[[mqtt]]` client that publishes the commands.
    pub source: Ident,
    pub format: Option<ActuatorFormat>,
    pub command_topic: Option<String>,
    pub payload_on: Option<String>,
    pub payload_off: Option<String>,
    /// Where the device reports its state, for the read-back.
    pub state_topic: Option<TopicFilter>,
    pub state_pointer: Option<JsonPointer>,
}

impl MqttActuator {
    /// Where the device reports its state: `state_topic`, or for `format = "sahool"` the
    /// command topic's `/status` sibling.
    pub fn state_topic(&self) -> Option<TopicFilter> {
        if self.state_topic.is_some() || self.format != Some(ActuatorFormat::Sahool) {
            return self.state_topic.clone();
        }
        let base = self
            .command_topic
            .as_deref()?
            .strip_suffix(SAHOOL_COMMAND_LEVEL)?;
        TopicFilter::try_from(format!("{base}{SAHOOL_STATE_LEVEL}")).ok()
    }

    /// The JSON pointer to the state in the state payload, if any.
    pub fn state_pointer(&self) -> Option<&str> {
        match (&self.state_pointer, self.format) {
            (Some(p), _) => Some(p.as_str()),
            (None, Some(ActuatorFormat::Sahool)) => Some(SAHOOL_STATE_POINTER),
            (None, None) => None,
        }
    }
}

impl Actuator {
    /// The `device_id/sensor_type` of `block_when`, if any.
    pub fn blocking_sensor(&self) -> Option<&SensorRef> {
        self.block_when.as_ref().map(|b| &b.sensor)
    }
}

/// The line of each `[[fields.actuators]]` entry of a `[[fields]]` table, in order.
pub(super) fn entry_lines(lines: &LineIndex, field: &Spanned<DeValue<'_>>) -> Vec<usize> {
    let DeValue::Table(table) = field.get_ref() else {
        return Vec::new();
    };
    match table.get("actuators").map(|a| a.get_ref()) {
        Some(DeValue::Array(items)) => items.iter().map(|a| lines.line(a.span().start)).collect(),
        _ => Vec::new(),
    }
}

/// The checks of every actuator, on its own and against ports, sources, sensors and the
/// other actuators.
pub(super) fn check(parts: &Parts, push: &mut impl FnMut(usize, String)) {
    let all: Vec<&Actuator> = parts.fields.iter().flat_map(|f| &f.actuators).collect();
    let mut ids: HashMap<&str, &Actuator> = HashMap::new();
    for a in &all {
        if let Some(first) = ids.insert(a.id.as_str(), a) {
            push(a.line, format!(
                "actuator `{}` is already declared at line {}; actuator ids are unique across all fields",
                a.id, first.line
            ));
        }
    }
    let sensors: HashSet<SensorRef> = parts
        .fields
        .iter()
        .flat_map(|f| &f.sensors)
        .map(|s| SensorRef {
            device_id: s.device_id.clone(),
            sensor_type: s.sensor_type,
        })
        .collect();
    let mut driven: HashMap<String, usize> = HashMap::new();
    for a in &all {
        let mut problem = |what: String| push(a.line, format!("actuator `{}`: {what}", a.id));
        a.check_kind(&mut problem);
        a.check_interlocks(&ids, &sensors, &mut problem);
        if let Some(address) = a.check_binding(parts, &mut problem) {
            if let Some(first) = driven.insert(address.clone(), a.line) {
                problem(format!(
                    "{address} is already driven by the actuator at line {first}"
                ));
            }
        }
    }
    check_cycles(&ids, push);
}

impl Actuator {
    /// What the kind allows: a range and a register for setpoints, run limits and a coil for
    /// switches.
    fn check_kind(&self, problem: &mut impl FnMut(String)) {
        match self.kind {
            ActuatorKind::Switch => {
                if self.range.is_some() {
                    problem(
                        "range applies to kind = \"setpoint\" only; a switch is on or off".into(),
                    );
                }
            }
            ActuatorKind::Setpoint => {
                match self.range {
                    None => problem("kind = \"setpoint\" needs range = [lo, hi] in the actuator's unit; commands outside it are refused".into()),
                    Some([lo, hi]) if !(lo.is_finite() && hi.is_finite() && lo < hi) => {
                        problem("range must be [lo, hi] with lo < hi, both finite".into())
                    }
                    Some(_) => {}
                }
                for (key, set) in [
                    ("max_on", self.max_on.is_some()),
                    ("min_off", self.min_off.is_some()),
                ] {
                    if set {
                        problem(format!("{key} applies to kind = \"switch\" only"));
                    }
                }
            }
        }
        if self.max_on.is_some_and(|d| d.0.is_zero()) {
            problem("max_on must be longer than 0s".into());
        }
    }

    /// `requires_on` names other switches; `block_when` a configured sensor, with one finite
    /// limit.
    fn check_interlocks(
        &self,
        ids: &HashMap<&str, &Actuator>,
        sensors: &HashSet<SensorRef>,
        problem: &mut impl FnMut(String),
    ) {
        for other in &self.requires_on {
            match ids.get(other.as_str()) {
                _ if other == &self.id => problem("requires_on names the actuator itself".into()),
                None => problem(format!("requires_on: `{other}` is not a declared actuator")),
                Some(o) if o.kind != ActuatorKind::Switch => problem(format!(
                    "requires_on: `{other}` is a setpoint; only a switch can be required on"
                )),
                Some(_) => {}
            }
        }
        let Some(b) = &self.block_when else { return };
        if !sensors.contains(&b.sensor) {
            problem(format!(
                "block_when: sensor `{}` is not a configured [[fields.sensors]] (device_id/sensor_type)",
                b.sensor
            ));
        }
        match (b.below, b.above) {
            (Some(v), None) | (None, Some(v)) if v.is_finite() => {}
            (Some(_), None) | (None, Some(_)) => {
                problem("block_when: the limit must be finite".into())
            }
            _ => problem("block_when needs one limit: below = X or above = X".into()),
        }
    }

    /// The one binding, against the ports and sources; returns the address it drives, to find
    /// it driven twice.
    fn check_binding(&self, parts: &Parts, problem: &mut impl FnMut(String)) -> Option<String> {
        match (&self.modbus, &self.mqtt) {
            (Some(m), None) => m.check(self.kind, self.range, parts, problem),
            (None, Some(m)) => {
                m.check(self.kind, parts, problem);
                None
            }
            (Some(_), Some(_)) => {
                problem(
                    "has both a modbus and an mqtt binding; an actuator is driven from one place"
                        .into(),
                );
                None
            }
            (None, None) => {
                problem(
                    "needs a binding: [fields.actuators.modbus] or [fields.actuators.mqtt]".into(),
                );
                None
            }
        }
    }
}

impl ModbusActuator {
    /// Problems of the binding for an actuator of `kind`; returns the coil or register it
    /// drives.
    fn check(
        &self,
        kind: ActuatorKind,
        range: Option<[f64; 2]>,
        parts: &Parts,
        problem: &mut impl FnMut(String),
    ) -> Option<String> {
        match parts.serial.iter().find(|s| s.name == self.port) {
            None => problem(format!("modbus port `{}` is not a [[serial]] name", self.port)),
            Some(p) if p.protocol != Protocol::ModbusRtu => problem(format!(
                "modbus port `{}` is protocol = \"{}\"; an actuator needs a protocol = \"modbus-rtu\" port",
                self.port, p.protocol
            )),
            Some(_) => {}
        }
        let (what, address) = match (kind, self.coil, self.register) {
            (ActuatorKind::Switch, Some(coil), None) => {
                self.check_switch(problem);
                ("coil", coil)
            }
            (ActuatorKind::Setpoint, None, Some(register)) => {
                self.check_setpoint(register, range, problem);
                ("holding register", register)
            }
            (ActuatorKind::Switch, ..) => {
                problem("a switch is a coil: set coil = N (0-based) and no register".into());
                return None;
            }
            (ActuatorKind::Setpoint, ..) => {
                problem(
                    "a setpoint is a holding register: set register = N (0-based) and no coil"
                        .into(),
                );
                return None;
            }
        };
        Some(format!(
            "modbus unit {} {what} {address} on port `{}`",
            self.unit.0, self.port
        ))
    }

    fn check_switch(&self, problem: &mut impl FnMut(String)) {
        if self.value_type.is_some() || self.scale.is_some() || self.offset.is_some() {
            problem("type, scale and offset apply to setpoint registers, not coils".into());
        }
    }

    /// The register holds the value type, and the range fits it after scale and offset.
    fn check_setpoint(
        &self,
        register: u16,
        range: Option<[f64; 2]>,
        problem: &mut impl FnMut(String),
    ) {
        let kind = self.value_type();
        if u32::from(register) + u32::from(kind.registers()) - 1 > u32::from(u16::MAX) {
            problem("a 32-bit value cannot start at register 65535".into());
        }
        let (scale, offset) = (self.scale(), self.offset());
        if !(scale.is_finite() && scale != 0.0 && offset.is_finite()) {
            problem("scale must be finite and non-zero, offset finite".into());
            return;
        }
        let Some([lo, hi]) = range else { return };
        let (min, max) = kind.raw_bounds();
        let raw = [(lo - offset) / scale, (hi - offset) / scale];
        if raw.iter().any(|r| !(min..=max).contains(&r.round())) {
            problem(format!(
                "range [{lo}, {hi}] is raw {} to {} after scale and offset, beyond what a {kind:?} register holds ({min} to {max})",
                raw[0], raw[1]
            ).to_lowercase());
        }
    }
}

impl MqttActuator {
    fn check(&self, kind: ActuatorKind, parts: &Parts, problem: &mut impl FnMut(String)) {
        if !parts.mqtt.iter().any(|m| m.name == self.source) {
            let listener = parts.mqtt_listener.iter().any(|l| l.name == self.source);
            problem(format!(
                "mqtt source `{}` is not an [[mqtt]] name{}",
                self.source,
                if listener {
                    " (actuators are driven through an [[mqtt]] client, not an [[mqtt_listener]])"
                } else {
                    ""
                }
            ));
        }
        if self.format == Some(ActuatorFormat::Sahool) {
            self.check_sahool(kind, problem);
            return;
        }
        self.check_explicit(kind, problem);
    }

    /// A SAHOOL device: a switch, its `.../command` topic given, the payloads the format's.
    fn check_sahool(&self, kind: ActuatorKind, problem: &mut impl FnMut(String)) {
        if kind != ActuatorKind::Switch {
            problem("mqtt: format = \"sahool\" drives switches (ON/OFF); bind a setpoint with command_topic and state_topic".into());
        }
        match self.command_topic.as_deref() {
            None => problem("mqtt: format = \"sahool\" needs command_topic, the device's topic ending in /command (e.g. sahool/<tenant>/.../field/<field>/actuator/valve/<id>/command)".into()),
            Some(t) if t.contains(['+', '#']) || !t.ends_with(SAHOOL_COMMAND_LEVEL) || t.len() == SAHOOL_COMMAND_LEVEL.len() => problem(format!(
                "mqtt: command_topic `{t}` must be a topic name ending in /command for format = \"sahool\""
            )),
            Some(_) => {}
        }
        if self.payload_on.is_some() || self.payload_off.is_some() {
            problem("mqtt: format = \"sahool\" sends {\"command\": \"ON\"|\"OFF\"}; remove payload_on / payload_off".into());
        }
    }

    /// Explicit topics: a command topic without wildcards, payloads exactly for switches.
    fn check_explicit(&self, kind: ActuatorKind, problem: &mut impl FnMut(String)) {
        match &self.command_topic {
            None => problem(
                "mqtt: set command_topic (with payload_on / payload_off for a switch)".into(),
            ),
            Some(t) if t.is_empty() || t.contains(['+', '#']) => problem(format!(
                "mqtt: command_topic `{t}` must be a topic name, without wildcards"
            )),
            Some(_) => {}
        }
        let payloads = [self.payload_on.is_some(), self.payload_off.is_some()];
        match kind {
            ActuatorKind::Switch if payloads != [true, true] => {
                problem("mqtt: a switch needs payload_on and payload_off".into())
            }
            ActuatorKind::Setpoint if payloads.contains(&true) => problem(
                "mqtt: payload_on / payload_off apply to switches; a setpoint publishes its value"
                    .into(),
            ),
            _ => {}
        }
        if self.state_pointer.is_some() && self.state_topic.is_none() {
            problem("mqtt: state_pointer needs state_topic".into());
        }
    }
}

/// A cycle in `requires_on` means none of its switches could ever switch on.
fn check_cycles(ids: &HashMap<&str, &Actuator>, push: &mut impl FnMut(usize, String)) {
    let mut reported = HashSet::new();
    let mut by_line: Vec<&&Actuator> = ids.values().collect();
    by_line.sort_by_key(|a| a.line);
    for start in by_line {
        let mut path = vec![start.id.as_str()];
        if let Some(cycle) = find_cycle(ids, &mut path) {
            // The path ends where it began: its members are the rest.
            let mut members: Vec<&str> = cycle[1..].to_vec();
            members.sort_unstable();
            if reported.insert(members) {
                push(start.line, format!(
                    "actuator `{}`: requires_on forms a cycle ({}), so none of them could ever switch on",
                    start.id,
                    cycle.join(" → ")
                ));
            }
        }
    }
}

/// Depth-first from the last of `path`; the cycle back to `path[0]`, if there is one.
fn find_cycle<'a>(
    ids: &HashMap<&str, &'a Actuator>,
    path: &mut Vec<&'a str>,
) -> Option<Vec<&'a str>> {
    let last = *path.last()?;
    for next in ids
        .get(last)
        .map(|a| a.requires_on.as_slice())
        .unwrap_or_default()
    {
        let Some(next) = ids.get(next.as_str()).map(|a| a.id.as_str()) else {
            continue;
        };
        if next == path[0] && path.len() > 1 {
            let mut cycle = path.clone();
            cycle.push(next);
            return Some(cycle);
        }
        if !path.contains(&next) {
            path.push(next);
            if let Some(cycle) = find_cycle(ids, path) {
                return Some(cycle);
            }
            path.pop();
        }
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::{ActuatorKind, SensorRef};
    use crate::config::parse;
    use crate::config::test_support::{problems, MINIMAL};

    /// A Modbus bus, a lines port, an MQTT client and listener, and the tank's level sensor.
    pub(crate) const PLACES: &str = r#"
[[serial]]
name = "rs485-1"
path = "/dev/ttyUSB0"
protocol = "modbus-rtu"

[[serial]]
name = "talk"
path = "/dev/ttyS1"
protocol = "lines"
line_format = "kv"

[[mqtt]]
name = "farm-broker"
url = "mqtt://127.0.0.1:1883"
topics = ["sahool/#"]
format = "sahool"

[[mqtt_listener]]
name = "lan"
listen = "127.0.0.1:1884"
format = "sahool"
topics = ["sahool/#"]
auth = "none"

[[fields]]
id = "f-tank"
  [[fields.sensors]]
  device_id = "tank-5"
  sensor_type = "water_level"
"#;

    /// Problems of `PLACES` and one more field holding `actuators`, one a line.
    fn actuator_problems(actuators: &str) -> String {
        problems(&format!("{PLACES}\n[[fields]]\nid = \"f-1\"\n{actuators}"))
    }

    /// The problems of `actuators`, as [`actuator_problems`], each of `needles` among them.
    fn refused(actuators: &str, needles: &[&str]) -> String {
        let all = actuator_problems(actuators);
        for needle in needles {
            assert!(all.contains(needle), "{needle}:\n{all}");
        }
        all
    }

    const ISSUE_EXAMPLE: &str = r#"
  [[fields.actuators]]
  id = "valve-3"
  kind = "switch"
  [fields.actuators.mqtt]
  source = "farm-broker"
  command_topic = "valve/3/set"
  payload_on = "ON"
  payload_off = "OFF"
  state_topic = "valve/3/state"

  [[fields.actuators]]
  id = "pump-1"
  kind = "switch"
  max_on = "2h"
  min_off = "5m"
  requires_on = ["valve-3"]
  block_when = { sensor = "tank-5/water_level", below = 10.0 }
  [fields.actuators.modbus]
  port = "rs485-1"
  unit = 7
  coil = 0

  [[fields.actuators]]
  id = "dosing-1"
  kind = "setpoint"
  range = [0.0, 100.0]
  [fields.actuators.modbus]
  port = "rs485-1"
  unit = 7
  register = 10
  type = "u16"
  scale = 0.1
"#;

    #[test]
    fn the_issue_example_parses_with_lines_and_limits() {
        let text = format!("{MINIMAL}{PLACES}\n[[fields]]\nid = \"f-1\"\n{ISSUE_EXAMPLE}");
        let c = parse(&text).unwrap_or_else(|p| panic!("{p:?}"));
        let a = &c.fields[1].actuators;
        assert_eq!(a.len(), 3);
        let pump = &a[1];
        assert_eq!(
            (pump.id.as_str(), pump.kind),
            ("pump-1", ActuatorKind::Switch)
        );
        assert_eq!(pump.max_on.map(|d| d.0.as_secs()), Some(7200));
        assert_eq!(pump.min_off.map(|d| d.0.as_secs()), Some(300));
        assert_eq!(
            pump.blocking_sensor().map(SensorRef::to_string).as_deref(),
            Some("tank-5/water_level")
        );
        let line = text
            .lines()
            .position(|l| l.contains("id = \"pump-1\""))
            .unwrap();
        assert_eq!(
            pump.line, line,
            "the line of its [[fields.actuators]] header"
        );
        let dosing = a[2].modbus.as_ref().unwrap();
        assert_eq!((dosing.register, dosing.scale()), (Some(10), 0.1));
    }

    #[test]
    fn ids_are_unique_across_fields() {
        let all = problems(&format!(
            "{PLACES}{}",
            r#"
  [[fields.actuators]]
  id = "v"
  kind = "switch"
  mqtt = { source = "farm-broker", command_topic = "v/set", payload_on = "ON", payload_off = "OFF" }
[[fields]]
id = "f-2"
  [[fields.actuators]]
  id = "v"
  kind = "switch"
  mqtt = { source = "farm-broker", command_topic = "v/set", payload_on = "ON", payload_off = "OFF" }
"#
        ));
        assert!(
            all.contains("actuator `v` is already declared at line 39"),
            "{all}"
        );
    }

    #[test]
    fn a_switch_is_a_coil_without_range() {
        refused(
            r#"
  [[fields.actuators]]
  id = "s1"
  kind = "switch"
  range = [0.0, 1.0]
  modbus = { port = "rs485-1", unit = 1, register = 3 }
  [[fields.actuators]]
  id = "s2"
  kind = "switch"
  modbus = { port = "rs485-1", unit = 1, coil = 3, scale = 2.0 }
"#,
            &[
                "actuator `s1`: range applies to kind = \"setpoint\" only",
                "actuator `s1`: a switch is a coil: set coil = N",
                "actuator `s2`: type, scale and offset apply to setpoint registers",
            ],
        );
    }

    #[test]
    fn a_setpoint_is_a_register_with_a_range_it_can_hold() {
        refused(
            r#"
  [[fields.actuators]]
  id = "p1"
  kind = "setpoint"
  modbus = { port = "rs485-1", unit = 1, register = 1 }
  [[fields.actuators]]
  id = "p2"
  kind = "setpoint"
  range = [5.0, 5.0]
  max_on = "1h"
  min_off = "1m"
  modbus = { port = "rs485-1", unit = 1, coil = 1 }
  [[fields.actuators]]
  id = "p3"
  kind = "setpoint"
  range = [0.0, 100.0]
  modbus = { port = "rs485-1", unit = 1, register = 2, scale = 0.001 }
"#,
            &[
            "actuator `p1`: kind = \"setpoint\" needs range = [lo, hi]",
            "actuator `p2`: range must be [lo, hi] with lo < hi",
            "actuator `p2`: max_on applies to kind = \"switch\" only",
            "actuator `p2`: min_off applies to kind = \"switch\" only",
            "actuator `p2`: a setpoint is a holding register",
            "actuator `p3`: range [0, 100] is raw 0 to 100000 after scale and offset, beyond what a u16 register holds (0 to 65535)",
            ],
        );
    }

    #[test]
    fn bindings_name_a_modbus_port_or_an_mqtt_client() {
        refused(
            r#"
  [[fields.actuators]]
  id = "a"
  kind = "switch"
  modbus = { port = "talk", unit = 1, coil = 0 }
  [[fields.actuators]]
  id = "b"
  kind = "switch"
  modbus = { port = "nope", unit = 1, coil = 0 }
  [[fields.actuators]]
  id = "c"
  kind = "switch"
  mqtt = { source = "lan", command_topic = "v/set", payload_on = "ON", payload_off = "OFF" }
  [[fields.actuators]]
  id = "d"
  kind = "switch"
  [[fields.actuators]]
  id = "e"
  kind = "switch"
  modbus = { port = "rs485-1", unit = 1, coil = 0 }
  mqtt = { source = "farm-broker", command_topic = "v/set", payload_on = "ON", payload_off = "OFF" }
  [[fields.actuators]]
  id = "f"
  kind = "switch"
  modbus = { port = "rs485-1", unit = 1, coil = 0 }
  [[fields.actuators]]
  id = "g"
  kind = "switch"
  modbus = { port = "rs485-1", unit = 1, coil = 0 }
"#,
            &[
            "actuator `a`: modbus port `talk` is protocol = \"lines\"; an actuator needs a protocol = \"modbus-rtu\" port",
            "actuator `b`: modbus port `nope` is not a [[serial]] name",
            "actuator `c`: mqtt source `lan` is not an [[mqtt]] name (actuators are driven through an [[mqtt]] client",
            "actuator `d`: needs a binding",
            "actuator `e`: has both a modbus and an mqtt binding",
            "actuator `g`: modbus unit 1 coil 0 on port `rs485-1` is already driven by the actuator at line 62",
            ],
        );
    }

    #[test]
    fn mqtt_bindings_are_explicit_or_sahool_devices() {
        let all = refused(
            r#"
  [[fields.actuators]]
  id = "a"
  kind = "switch"
  mqtt = { source = "farm-broker", format = "sahool" }
  [[fields.actuators]]
  id = "b"
  kind = "switch"
  mqtt = { source = "farm-broker", command_topic = "relay/+/set", payload_on = "1" }
  [[fields.actuators]]
  id = "c"
  kind = "setpoint"
  range = [0.0, 1.0]
  mqtt = { source = "farm-broker", command_topic = "dose/set", payload_on = "1", state_pointer = "/v" }
  [[fields.actuators]]
  id = "d"
  kind = "switch"
  mqtt = { source = "farm-broker" }
  [[fields.actuators]]
  id = "ok"
  kind = "switch"
  mqtt = { source = "farm-broker", command_topic = "relay/1/set", payload_on = "ON", payload_off = "OFF", state_topic = "relay/1", state_pointer = "/state" }
  [[fields.actuators]]
  id = "e"
  kind = "setpoint"
  range = [0.0, 1.0]
  mqtt = { source = "farm-broker", format = "sahool", command_topic = "sahool/t/f/actuator/pump/command" }
  [[fields.actuators]]
  id = "f"
  kind = "switch"
  mqtt = { source = "farm-broker", format = "sahool", command_topic = "sahool/t/f/actuator/pump/set", payload_on = "1" }
  [[fields.actuators]]
  id = "ok-sahool"
  kind = "switch"
  mqtt = { source = "farm-broker", format = "sahool", command_topic = "sahool/t/farm/f/field/n/actuator/valve/v-3/command" }
"#,
            &[
            "actuator `a`: mqtt: format = \"sahool\" needs command_topic",
            "actuator `b`: mqtt: command_topic `relay/+/set` must be a topic name, without wildcards",
            "actuator `b`: mqtt: a switch needs payload_on and payload_off",
            "actuator `c`: mqtt: payload_on / payload_off apply to switches",
            "actuator `c`: mqtt: state_pointer needs state_topic",
            "actuator `d`: mqtt: set command_topic",
            "actuator `e`: mqtt: format = \"sahool\" drives switches",
            "actuator `f`: mqtt: command_topic `sahool/t/f/actuator/pump/set` must be a topic name ending in /command",
            "actuator `f`: mqtt: format = \"sahool\" sends {\"command\": \"ON\"|\"OFF\"}; remove payload_on / payload_off",
            ],
        );
        assert!(!all.contains("actuator `ok`"), "{all}");
        assert!(!all.contains("actuator `ok-sahool`"), "{all}");
    }

    #[test]
    fn a_sahool_device_reports_on_its_command_topics_status_sibling_unless_told() {
        let parsed = |mqtt: &str| {
            let c = parse(&format!(
                "{MINIMAL}{PLACES}\n[[fields]]\nid = \"f-1\"\n  [[fields.actuators]]\n  id = \"v\"\n  kind = \"switch\"\n  mqtt = {mqtt}\n"
            ))
            .unwrap();
            let actuator = c.fields.iter().flat_map(|f| &f.actuators).next();
            actuator
                .and_then(|a| a.mqtt.clone())
                .expect("an MQTT actuator")
        };
        let derived = parsed(
            r#"{ source = "farm-broker", format = "sahool", command_topic = "sahool/t/a/actuator/valve/v-3/command" }"#,
        );
        assert_eq!(
            derived.state_topic().map(|t| t.as_str().to_string()),
            Some("sahool/t/a/actuator/valve/v-3/status".into())
        );
        assert_eq!(derived.state_pointer(), Some("/status"));
        let told = parsed(
            r#"{ source = "farm-broker", format = "sahool", command_topic = "sahool/t/a/actuator/pump/command", state_topic = "sahool/t/a/actuator/pump", state_pointer = "/state" }"#,
        );
        assert_eq!(
            told.state_topic().map(|t| t.as_str().to_string()),
            Some("sahool/t/a/actuator/pump".into())
        );
        assert_eq!(told.state_pointer(), Some("/state"));
        let explicit = parsed(
            r#"{ source = "farm-broker", command_topic = "relay/1/set", payload_on = "ON", payload_off = "OFF" }"#,
        );
        assert_eq!(explicit.state_topic(), None);
        assert_eq!(explicit.state_pointer(), None);
    }

    #[test]
    fn interlocks_name_other_switches_and_configured_sensors() {
        let all = refused(
            r#"
  [[fields.actuators]]
  id = "pump"
  kind = "switch"
  requires_on = ["pump", "ghost", "dose"]
  block_when = { sensor = "tank-9/water_level", below = 10.0 }
  mqtt = { source = "farm-broker", command_topic = "v/set", payload_on = "ON", payload_off = "OFF" }
  [[fields.actuators]]
  id = "dose"
  kind = "setpoint"
  range = [0.0, 1.0]
  block_when = { sensor = "tank-5/water_level" }
  mqtt = { source = "farm-broker", command_topic = "dose/set" }
  [[fields.actuators]]
  id = "x"
  kind = "switch"
  requires_on = ["y"]
  mqtt = { source = "farm-broker", command_topic = "v/set", payload_on = "ON", payload_off = "OFF" }
  [[fields.actuators]]
  id = "y"
  kind = "switch"
  requires_on = ["x"]
  mqtt = { source = "farm-broker", command_topic = "v/set", payload_on = "ON", payload_off = "OFF" }
"#,
            &[
            "actuator `pump`: requires_on names the actuator itself",
            "actuator `pump`: requires_on: `ghost` is not a declared actuator",
            "actuator `pump`: requires_on: `dose` is a setpoint",
            "actuator `pump`: block_when: sensor `tank-9/water_level` is not a configured [[fields.sensors]]",
            "actuator `dose`: block_when needs one limit: below = X or above = X",
            "actuator `x`: requires_on forms a cycle (x → y → x)",
            ],
        );
        assert_eq!(all.matches("forms a cycle").count(), 1, "{all}");
        let all = actuator_problems(
            "  [[fields.actuators]]\n  id = \"z\"\n  kind = \"switch\"\n  block_when = { sensor = \"tank-5\", below = 1.0 }\n",
        );
        assert!(
            all.contains("write it as \"device_id/sensor_type\""),
            "{all}"
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let all = actuator_problems(
            "  [[fields.actuators]]\n  id = \"z\"\n  kind = \"switch\"\n  duration = \"1h\"\n  mqtt = { source = \"farm-broker\", command_topic = \"z/set\", payload_on = \"1\", payload_off = \"0\" }\n",
        );
        assert!(all.contains("unknown field `duration`"), "{all}");
        let all = actuator_problems(
            "  [[fields.actuators]]\n  id = \"z\"\n  kind = \"toggle\"\n  mqtt = { source = \"farm-broker\", command_topic = \"z/set\", payload_on = \"1\", payload_off = \"0\" }\n",
        );
        assert!(all.contains("toggle") && all.contains("line 4"), "{all}");
    }
}
