//! `[[serial]]` ports and the serial bindings of `[fields.sensors]` (`line`, `modbus`, `sdi12`,
//! `frame`): their types, values checked while parsing, and the checks that span sections.
//!
//! Invariants of a config that parsed: port names are unique among all sources; every serial
//! binding names an existing port of the matching protocol; a sensor has at most one binding;
//! no two sensors share a binding; keys that only one protocol reads are set only on its ports.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ByteSize, DurationValue, Ident, Parts, Problem, Sensor};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSource {
    /// Unique among all sources; the `port` of bindings, metric labels and dead-letters.
    pub name: Ident,
    /// Device path, opened anew at every attempt (a `/dev/serial/by-id/` link follows the
    /// adapter to whatever `ttyUSBn` it gets after a re-plug).
    pub path: PathBuf,
    pub protocol: Protocol,
    /// Line settings; defaults per protocol, see [`SerialSource::settings`].
    pub baud: Option<Baud>,
    pub(crate) data_bits: Option<DataBits>,
    pub(crate) parity: Option<Parity>,
    pub(crate) stop_bits: Option<StopBits>,
    /// How long to wait for a response (modbus-rtu, sdi12) or the rest of a frame.
    #[serde(default = "default_timeout")]
    pub timeout: DurationValue,
    /// How often polled protocols (modbus-rtu, sdi12) read their sensors.
    pub poll_interval: Option<DurationValue>,
    /// How often sensors on this port report (liveness); default: `poll_interval` when polled,
    /// then `[quality] expected_interval`.
    pub expected_interval: Option<DurationValue>,
    /// `lines` only: the form of each line.
    pub line_format: Option<LineFormat>,
    /// `lines` with `line_format = "csv"`: the column names, in order.
    pub columns: Option<Vec<String>>,
    /// `lines`: pair separator (kv) or delimiter (csv).
    pub(crate) separator: Option<Separator>,
    /// `lines`: longest line accepted, terminator excluded.
    pub max_line: Option<ByteSize>,
    /// `lines`: the device of lines that name none.
    pub device_id: Option<Ident>,
    /// Kernel RS-485 mode (driver-enable through RTS), for UARTs wired to a transceiver.
    pub rs485: Option<Rs485>,
    #[serde(skip)]
    pub line: usize,
}

/// The framing and speed a port is opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineSettings {
    pub baud: u32,
    pub(crate) data_bits: u8,
    pub(crate) parity: Parity,
    pub(crate) stop_bits: u8,
}

impl SerialSource {
    /// Baud rate and framing: what the config says, else the protocol's usual settings
    /// (SDI-12: 1200 7E1, as its standard fixes; others: 9600 8N1).
    pub fn settings(&self) -> LineSettings {
        let (baud, data_bits, parity) = match self.protocol {
            Protocol::Sdi12 => (1200, 7, Parity::Even),
            _ => (9600, 8, Parity::None),
        };
        LineSettings {
            baud: self.baud.map_or(baud, |b| b.0),
            data_bits: self.data_bits.map_or(data_bits, |d| d.0),
            parity: self.parity.unwrap_or(parity),
            stop_bits: self.stop_bits.map_or(1, |s| s.0),
        }
    }

    pub fn poll_interval(&self) -> Duration {
        self.poll_interval.map_or(DEFAULT_POLL_INTERVAL, |d| d.0)
    }

    pub fn max_line(&self) -> usize {
        self.max_line.map_or(DEFAULT_MAX_LINE, |b| {
            usize::try_from(b.0).unwrap_or(usize::MAX)
        })
    }

    /// How often this port's sensors report when neither they nor the port say.
    pub(crate) fn report_interval(&self) -> Option<Duration> {
        self.expected_interval.map(|d| d.0).or_else(|| {
            matches!(self.protocol, Protocol::ModbusRtu | Protocol::Sdi12)
                .then(|| self.poll_interval())
        })
    }
}

pub(crate) const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_MAX_LINE: usize = 1024;

fn default_timeout() -> DurationValue {
    DurationValue(Duration::from_secs(1))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Modbus RTU master polling slaves on an RS-485 bus.
    ModbusRtu,
    /// SDI-12 sensors behind a transparent serial adapter.
    Sdi12,
    /// ASCII talkers printing one reading set per line.
    Lines,
    /// Firmware nodes speaking the wire crate's COBS frames.
    Frames,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ModbusRtu => "modbus-rtu",
            Self::Sdi12 => "sdi12",
            Self::Lines => "lines",
            Self::Frames => "frames",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Rates termios offers on Linux; others cannot be set on a standard UART driver.
pub const STANDARD_BAUDS: [u32; 29] = [
    50, 75, 110, 134, 150, 200, 300, 600, 1200, 1800, 2400, 4800, 9600, 19200, 38400, 57600,
    115200, 230400, 460800, 500000, 576000, 921600, 1000000, 1152000, 1500000, 2000000, 2500000,
    3000000, 4000000,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "i64")]
pub struct Baud(pub u32);

impl TryFrom<i64> for Baud {
    type Error = String;
    fn try_from(n: i64) -> Result<Self, String> {
        u32::try_from(n)
            .ok()
            .filter(|b| STANDARD_BAUDS.contains(b))
            .map(Self)
            .ok_or_else(|| {
                format!("{n} is not a standard baud rate; use e.g. 1200, 9600, 19200 or 115200")
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "i64")]
pub(crate) struct DataBits(pub u8);

impl TryFrom<i64> for DataBits {
    type Error = String;
    fn try_from(n: i64) -> Result<Self, String> {
        u8::try_from(n)
            .ok()
            .filter(|b| (5..=8).contains(b))
            .map(Self)
            .ok_or_else(|| format!("data_bits is 5, 6, 7 or 8, not {n}"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "i64")]
pub(crate) struct StopBits(pub u8);

impl TryFrom<i64> for StopBits {
    type Error = String;
    fn try_from(n: i64) -> Result<Self, String> {
        match n {
            1 | 2 => Ok(Self(n as u8)),
            _ => Err(format!("stop_bits is 1 or 2, not {n}")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Parity {
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineFormat {
    /// `key=value` pairs.
    Kv,
    /// Values in the order of `columns`.
    Csv,
    /// One JSON object per line.
    Json,
}

/// A one-character separator. `" "` means any run of whitespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub(crate) struct Separator(pub char);

impl TryFrom<String> for Separator {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let mut chars = s.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) if matches!(c, ',' | ';' | '|' | ':' | '\t' | ' ' | '&') => Ok(Self(c)),
            _ => Err(format!(
                "separator `{s}`: use one of \",\" \";\" \"|\" \":\" \"&\" \"\\t\" or \" \" (any whitespace)"
            )),
        }
    }
}

/// Kernel RS-485 mode: the UART driver switches the transceiver with RTS around each send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rs485 {
    /// RTS level while sending: true = logical high (the usual driver-enable wiring).
    #[serde(default = "yes")]
    pub rts_on_send: bool,
    /// RTS level after sending.
    #[serde(default)]
    pub(crate) rts_after_send: bool,
    /// Receive while sending (full-duplex transceivers, or to read back one's own frames).
    #[serde(default)]
    pub(crate) rx_during_tx: bool,
    /// Switch on the bus termination resistor where the board wires one to a GPIO.
    #[serde(default)]
    pub(crate) terminate_bus: bool,
    /// RTS set this long before the first bit is sent (at most 100ms, millisecond steps).
    pub(crate) delay_before_send: Option<DurationValue>,
    /// RTS held this long after the last bit (at most 100ms, millisecond steps).
    pub(crate) delay_after_send: Option<DurationValue>,
}

fn yes() -> bool {
    true
}

/// `line = { port, key }`: the value under `key` (a kv key, CSV column or JSON member).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineBinding {
    pub port: Ident,
    pub key: LineKey,
}

/// Keys the `lines` protocol reads itself; sensors cannot bind them.
pub const RESERVED_LINE_KEYS: [&str; 5] = ["device", "device_id", "ts", "timestamp", "battery"];

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct LineKey(String);

impl LineKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for LineKey {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.is_empty() || s.len() > 64 {
            return Err("a line key has 1 to 64 characters".into());
        }
        if let Some(c) = s
            .chars()
            .find(|c| !c.is_ascii_graphic() || matches!(c, '=' | ',' | ';' | '"' | '|' | '&'))
        {
            return Err(format!(
                "line key `{s}` contains `{c}`; keys are printable ASCII without spaces, `=`, `,`, `;`, `|`, `&` or quotes"
            ));
        }
        if RESERVED_LINE_KEYS.contains(&s.as_str()) {
            return Err(format!(
                "line key `{s}` is read by the gateway itself (device, timestamp or battery of the line); bind another key"
            ));
        }
        Ok(Self(s))
    }
}

/// `modbus = { port, unit, register, kind, type, word_order, scale, offset }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusBinding {
    pub port: Ident,
    /// Slave id, 1–247.
    pub unit: ModbusUnit,
    /// First register (0-based protocol address).
    pub register: u16,
    #[serde(default)]
    pub kind: RegisterKind,
    #[serde(rename = "type", default)]
    pub value_type: RegisterType,
    /// Which register holds the high word of a 32-bit value; default big (high word first).
    pub word_order: Option<WordOrder>,
    /// Calibration given here instead of on the sensor; folded into the sensor's at parse time.
    pub scale: Option<f64>,
    pub offset: Option<f64>,
    /// This sensor's poll interval, when it differs from its port's.
    pub poll_interval: Option<DurationValue>,
}

impl ModbusBinding {
    pub fn word_order(&self) -> WordOrder {
        self.word_order.unwrap_or(WordOrder::Big)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "i64")]
pub struct ModbusUnit(pub u8);

impl TryFrom<i64> for ModbusUnit {
    type Error = String;
    fn try_from(n: i64) -> Result<Self, String> {
        u8::try_from(n)
            .ok()
            .filter(|u| (1..=247).contains(u))
            .map(Self)
            .ok_or_else(|| format!("a Modbus unit (slave id) is 1 to 247, not {n}"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterKind {
    /// Function 3.
    #[default]
    Holding,
    /// Function 4.
    Input,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterType {
    #[default]
    U16,
    I16,
    U32,
    I32,
    F32,
}

impl RegisterType {
    /// Registers the value spans.
    pub fn registers(self) -> u16 {
        match self {
            Self::U16 | Self::I16 => 1,
            Self::U32 | Self::I32 | Self::F32 => 2,
        }
    }

    /// The raw values the register(s) can hold: what a setpoint's range must fit and what a
    /// write may send.
    pub fn raw_bounds(self) -> (f64, f64) {
        match self {
            Self::U16 => (0.0, f64::from(u16::MAX)),
            Self::I16 => (f64::from(i16::MIN), f64::from(i16::MAX)),
            Self::U32 => (0.0, f64::from(u32::MAX)),
            Self::I32 => (f64::from(i32::MIN), f64::from(i32::MAX)),
            Self::F32 => (f64::from(f32::MIN), f64::from(f32::MAX)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// High word in the first register.
    Big,
    /// Low word in the first register.
    Little,
}

/// `sdi12 = { port, address, index, command }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sdi12Binding {
    pub port: Ident,
    pub address: Sdi12Address,
    /// 1-based position of the value in the sensor's response to the measurement.
    pub index: Sdi12Index,
    #[serde(default)]
    pub command: Sdi12Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Sdi12Address(pub char);

impl TryFrom<String> for Sdi12Address {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let mut chars = s.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) if c.is_ascii_alphanumeric() => Ok(Self(c)),
            _ => Err(format!(
                "SDI-12 address `{s}`: one character, '0'-'9', 'a'-'z' or 'A'-'Z'"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "i64")]
pub struct Sdi12Index(pub u16);

impl TryFrom<i64> for Sdi12Index {
    type Error = String;
    fn try_from(n: i64) -> Result<Self, String> {
        u16::try_from(n)
            .ok()
            .filter(|i| (1..=999).contains(i))
            .map(Self)
            .ok_or_else(|| format!("SDI-12 value index is 1-based (1 to 999), not {n}"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
pub enum Sdi12Command {
    /// `aM!`: start measurement.
    #[default]
    M,
    /// `aMC!`: start measurement, values with CRC.
    MC,
    /// `aC!`: start concurrent measurement.
    C,
    /// `aCC!`: concurrent measurement with CRC.
    CC,
}

/// `frame = { port, node, channel }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrameBinding {
    pub port: Ident,
    pub node: u32,
    pub channel: u8,
}

/// A sensor's serial binding, whichever protocol it is for.
#[derive(Debug, Clone, PartialEq)]
pub enum SerialBinding {
    Line(LineBinding),
    Modbus(ModbusBinding),
    Sdi12(Sdi12Binding),
    Frame(FrameBinding),
}

impl SerialBinding {
    pub fn port(&self) -> &Ident {
        match self {
            Self::Line(b) => &b.port,
            Self::Modbus(b) => &b.port,
            Self::Sdi12(b) => &b.port,
            Self::Frame(b) => &b.port,
        }
    }

    /// The protocol a port must speak for this binding.
    pub fn protocol(&self) -> Protocol {
        match self {
            Self::Line(_) => Protocol::Lines,
            Self::Modbus(_) => Protocol::ModbusRtu,
            Self::Sdi12(_) => Protocol::Sdi12,
            Self::Frame(_) => Protocol::Frames,
        }
    }

    fn table(&self) -> &'static str {
        match self {
            Self::Line(_) => "line",
            Self::Modbus(_) => "modbus",
            Self::Sdi12(_) => "sdi12",
            Self::Frame(_) => "frame",
        }
    }
}

impl Sensor {
    /// Every serial binding the sensor has (a valid config has at most one).
    pub(crate) fn serial_bindings(&self) -> Vec<SerialBinding> {
        let mut out = Vec::new();
        out.extend(self.line_binding.clone().map(SerialBinding::Line));
        out.extend(self.modbus.clone().map(SerialBinding::Modbus));
        out.extend(self.sdi12.clone().map(SerialBinding::Sdi12));
        out.extend(self.frame.clone().map(SerialBinding::Frame));
        out
    }

    /// The sensor's serial binding, if it is read from a serial port.
    pub fn serial_binding(&self) -> Option<SerialBinding> {
        self.serial_bindings().into_iter().next()
    }
}

/// Applies a Modbus binding's `scale` / `offset` to the sensor; `given` says which of the two
/// the sensor's own table sets. Both places at once is a problem, reported at the sensor.
pub(super) fn fold_calibration(sensor: &mut Sensor, given: [bool; 2]) -> Option<Problem> {
    let b = sensor.modbus.as_ref()?;
    let (scale, offset) = (b.scale, b.offset);
    if (scale.is_some() && given[0]) || (offset.is_some() && given[1]) {
        return Some(Problem {
            line: sensor.line,
            message: format!(
                "sensor {}: set scale and offset on the sensor or in its modbus binding, not both",
                sensor.device_id
            ),
        });
    }
    sensor.scale = scale.unwrap_or(sensor.scale);
    sensor.offset = offset.unwrap_or(sensor.offset);
    None
}

/// The checks of `[[serial]]` and of serial bindings, over whatever parsed.
pub(super) fn check(parts: &Parts) -> Vec<Problem> {
    let mut p = Vec::new();
    let mut push = |line: usize, message: String| p.push(Problem { line, message });

    let mqtt_names: HashSet<&str> = parts.mqtt.iter().map(|m| m.name.as_str()).collect();
    let mut names = HashSet::new();
    for s in &parts.serial {
        if !names.insert(s.name.as_str()) || mqtt_names.contains(s.name.as_str()) {
            push(
                s.line,
                format!(
                    "[[serial]] name `{}` is already used by another source",
                    s.name
                ),
            );
        }
        s.check(&mut |what| push(s.line, format!("[[serial]] `{}`: {what}", s.name)));
    }
    check_bindings(parts, &mut push);
    p
}

impl SerialSource {
    /// Problems of this port on its own (its name's uniqueness is checked with the others').
    fn check(&self, problem: &mut impl FnMut(String)) {
        if !self.path.is_absolute() {
            problem(format!(
                "path `{}` must be absolute, e.g. /dev/ttyUSB0 or /dev/serial/by-id/...",
                self.path.display()
            ));
        }
        let lines = self.protocol == Protocol::Lines;
        let polled = matches!(self.protocol, Protocol::ModbusRtu | Protocol::Sdi12);
        const LINES: &str = "protocol = \"lines\"";
        for (key, set, allowed, for_what) in [
            (
                "poll_interval",
                self.poll_interval.is_some(),
                polled,
                "modbus-rtu and sdi12",
            ),
            ("line_format", self.line_format.is_some(), lines, LINES),
            ("columns", self.columns.is_some(), lines, LINES),
            ("separator", self.separator.is_some(), lines, LINES),
            ("max_line", self.max_line.is_some(), lines, LINES),
            ("device_id", self.device_id.is_some(), lines, LINES),
        ] {
            if set && !allowed {
                problem(format!("{key} applies to {for_what} ports only"));
            }
        }
        if self.timeout.0 < Duration::from_millis(10) || self.timeout.0 > Duration::from_secs(60) {
            problem("timeout must be between 10ms and 60s".into());
        }
        if self
            .poll_interval
            .is_some_and(|d| d.0 < Duration::from_millis(100))
        {
            problem("poll_interval must be at least 100ms".into());
        }
        if let Some(max) = self.max_line {
            if !(16..=65536).contains(&max.0) {
                problem("max_line must be between 16 bytes and 64KiB".into());
            }
        }
        if let Some(r) = &self.rs485 {
            for d in [r.delay_before_send, r.delay_after_send]
                .into_iter()
                .flatten()
            {
                if d.0 > Duration::from_millis(100) {
                    problem("rs485 delays are at most 100ms".into());
                }
            }
        }
        if lines {
            self.check_line_format(problem);
        }
    }

    /// A `lines` port's form: a line format, and columns exactly where CSV needs them.
    fn check_line_format(&self, problem: &mut impl FnMut(String)) {
        match (self.line_format, &self.columns) {
            (None, _) => problem(
                "protocol = \"lines\" needs line_format = \"kv\", \"csv\" or \"json\"".into(),
            ),
            (Some(LineFormat::Csv), None) => {
                problem("line_format = \"csv\" needs columns = [\"name\", ...]".into())
            }
            (Some(LineFormat::Csv), Some(cols)) => {
                let mut seen = HashSet::new();
                for c in cols {
                    if c.trim().is_empty() || c.trim() != c {
                        problem("column names must not be empty or padded".into());
                    } else if !seen.insert(c.as_str()) {
                        problem(format!("column `{c}` is listed twice"));
                    }
                }
                if cols.is_empty() {
                    problem("columns: list at least one column".into());
                }
            }
            (Some(_), Some(_)) => problem("columns applies to line_format = \"csv\" only".into()),
            (Some(_), None) => {}
        }
        if self.line_format == Some(LineFormat::Json) && self.separator.is_some() {
            problem("separator does not apply to line_format = \"json\"".into());
        }
    }
}

/// Sensors' serial bindings: one binding a sensor, on an existing port of its protocol, and no
/// binding twice.
fn check_bindings(parts: &Parts, push: &mut impl FnMut(usize, String)) {
    let ports: HashMap<&str, &SerialSource> =
        parts.serial.iter().map(|s| (s.name.as_str(), s)).collect();
    // Binding identity → line of the first sensor with it.
    let mut bound: HashMap<String, usize> = HashMap::new();
    let mut sdi12_commands = HashMap::new();
    for f in &parts.fields {
        for s in &f.sensors {
            let who = format!("sensor {} / {}", s.device_id, s.sensor_type.0);
            let Some((binding, port)) = binding_and_port(s, &who, &ports, push) else {
                continue;
            };
            let mut problem = |what: String| push(s.line, format!("{who}: {what}"));
            let identity = match &binding {
                SerialBinding::Line(b) => b.check(&s.device_id, port, &mut problem),
                SerialBinding::Modbus(b) => b.check(port, &mut problem),
                SerialBinding::Sdi12(b) => b.check(port, &mut sdi12_commands, &mut problem),
                SerialBinding::Frame(b) => format!(
                    "frame node {} channel {} on port `{}`",
                    b.node, b.channel, port.name
                ),
            };
            if let Some(first) = bound.insert(identity.clone(), s.line) {
                problem(format!("{identity} is already bound at line {first}"));
            }
        }
    }
}

/// The sensor's one serial binding and the port it names, when both are usable; problems when
/// the sensor has more than one binding or the port is missing or of another protocol.
fn binding_and_port<'p>(
    s: &Sensor,
    who: &str,
    ports: &HashMap<&str, &'p SerialSource>,
    push: &mut impl FnMut(usize, String),
) -> Option<(SerialBinding, &'p SerialSource)> {
    let bindings = s.serial_bindings();
    if bindings.len() + usize::from(s.mqtt.is_some()) > 1 {
        let tables: Vec<&str> = s
            .mqtt
            .iter()
            .map(|_| "mqtt")
            .chain(bindings.iter().map(SerialBinding::table))
            .collect();
        push(
            s.line,
            format!(
                "{who} has {} bindings ({}); a sensor is read from one place",
                tables.len(),
                tables.join(", ")
            ),
        );
        return None;
    }
    let binding = bindings.into_iter().next()?;
    if s.source.is_some() {
        push(s.line, format!(
            "{who}: `source` names an [[mqtt]] source; a sensor with a {} binding is read from its port",
            binding.table()
        ));
    }
    let port_name = binding.port().as_str();
    let Some(port) = ports.get(port_name).copied() else {
        push(
            s.line,
            format!("{who}: port `{port_name}` is not a [[serial]] name"),
        );
        return None;
    };
    if port.protocol != binding.protocol() {
        push(
            s.line,
            format!(
                "{who}: a {} binding needs a protocol = \"{}\" port, but `{port_name}` is \"{}\"",
                binding.table(),
                binding.protocol(),
                port.protocol
            ),
        );
        return None;
    }
    Some((binding, port))
}

impl LineBinding {
    /// Problems of the binding on its `lines` port; returns what it reads, to find it twice.
    fn check(
        &self,
        device: &Ident,
        port: &SerialSource,
        problem: &mut impl FnMut(String),
    ) -> String {
        let key = self.key.as_str();
        if port.line_format == Some(LineFormat::Csv) {
            let cols = port.columns.as_deref().unwrap_or_default();
            if !cols.iter().any(|c| c == key) {
                problem(format!(
                    "key `{key}` is not one of port `{}`'s columns",
                    port.name
                ));
            }
        }
        format!(
            "line key `{key}` of device {device} on port `{}`",
            port.name
        )
    }
}

impl ModbusBinding {
    /// Problems of the binding on its Modbus port; returns what it reads, to find it twice.
    fn check(&self, port: &SerialSource, problem: &mut impl FnMut(String)) -> String {
        let last = u32::from(self.register) + u32::from(self.value_type.registers()) - 1;
        if last > u32::from(u16::MAX) {
            problem("a 32-bit value cannot start at register 65535".into());
        }
        if self.word_order.is_some() && self.value_type.registers() == 1 {
            problem("word_order applies to u32, i32 and f32 only".into());
        }
        if let Some(scale) = self.scale {
            if !scale.is_finite() || scale == 0.0 {
                problem("scale must be finite and non-zero".into());
            }
        }
        if self
            .poll_interval
            .is_some_and(|d| d.0 < Duration::from_millis(100))
        {
            problem("poll_interval must be at least 100ms".into());
        }
        format!(
            "Modbus unit {} {:?} register {} on port `{}`",
            self.unit.0, self.kind, self.register, port.name
        )
        .to_lowercase()
    }
}

impl Sdi12Binding {
    /// Problems of the binding on its SDI-12 port; returns what it reads, to find it twice.
    /// `commands`: the measurement command of each (port, address) seen so far, which the
    /// sensors of one address share.
    fn check<'p>(
        &self,
        port: &'p SerialSource,
        commands: &mut HashMap<(&'p str, char), Sdi12Command>,
        problem: &mut impl FnMut(String),
    ) -> String {
        let command = commands
            .entry((port.name.as_str(), self.address.0))
            .or_insert(self.command);
        if *command != self.command {
            problem(format!(
                "the sensors of SDI-12 address {} on port `{}` use one measurement command ({:?}), not also {:?}",
                self.address.0, port.name, command, self.command
            ));
        }
        format!(
            "SDI-12 address {} value {} on port `{}`",
            self.address.0, self.index.0, port.name
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::config::parse;

    use crate::config::test_support::{problems, MINIMAL as BASE};

    #[test]
    fn ports_get_protocol_defaults() {
        let c = parse(&format!(
            "{BASE}{}",
            r#"
[[serial]]
name = "talker"
path = "/dev/serial/by-id/usb-FTDI_FT232R-if00-port0"
protocol = "lines"
line_format = "kv"

[[serial]]
name = "sdi"
path = "/dev/ttyUSB1"
protocol = "sdi12"

[[serial]]
name = "bus"
path = "/dev/ttyAMA0"
protocol = "modbus-rtu"
baud = 19200
parity = "even"
poll_interval = "10s"
rs485 = { rts_on_send = true, delay_after_send = "1ms" }
"#
        ))
        .unwrap();
        let s: Vec<_> = c.serial.iter().map(|s| s.settings()).collect();
        assert_eq!((s[0].baud, s[0].data_bits, s[0].stop_bits), (9600, 8, 1));
        assert_eq!(s[0].parity, super::Parity::None);
        assert_eq!((s[1].baud, s[1].data_bits), (1200, 7));
        assert_eq!(s[1].parity, super::Parity::Even);
        assert_eq!((s[2].baud, s[2].parity), (19200, super::Parity::Even));
        assert_eq!(c.serial[0].max_line(), 1024);
        assert_eq!(c.serial[0].timeout.0.as_secs(), 1);
        assert_eq!(c.serial[1].poll_interval().as_secs(), 30);
        assert_eq!(c.serial[2].report_interval().map(|d| d.as_secs()), Some(10));
        assert_eq!(c.serial[0].report_interval(), None);
        assert!(c.serial[2].rs485.is_some_and(|r| r.rts_on_send));
    }

    #[test]
    fn bad_port_values_are_reported_with_their_line() {
        let all = problems(
            r#"
[[serial]]
name = "a"
path = "/dev/ttyS1"
protocol = "lines"
line_format = "csv"
baud = 9601

[[serial]]
name = "b"
path = "ttyS2"
protocol = "modbus-rtu"
data_bits = 9
line_format = "kv"

[[serial]]
name = "c"
path = "/dev/ttyS3"
protocol = "morse"
"#,
        );
        assert!(all.contains("line 14") && all.contains("9601"), "{all}");
        assert!(
            all.contains("line 20") && all.contains("data_bits"),
            "{all}"
        );
        assert!(all.contains("morse"), "{all}");
    }

    #[test]
    fn cross_checks_of_ports() {
        let all = problems(
            r#"
[[mqtt]]
name = "a"
url = "mqtt://127.0.0.1"
topics = ["x/#"]
format = "sahool"

[[serial]]
name = "a"
path = "ttyS1"
protocol = "lines"
line_format = "csv"

[[serial]]
name = "b"
path = "/dev/ttyS2"
protocol = "lines"
poll_interval = "5s"
max_line = 4

[[serial]]
name = "c"
path = "/dev/ttyS3"
protocol = "frames"
device_id = "x"
"#,
        );
        for needle in [
            "name `a` is already used",
            "must be absolute",
            "needs columns",
            "poll_interval applies to modbus-rtu and sdi12 ports only",
            "needs line_format",
            "max_line must be",
            "device_id applies to protocol = \"lines\" ports only",
        ] {
            assert!(all.contains(needle), "{needle}: {all}");
        }
    }

    const PORTS: &str = r#"
[[serial]]
name = "talk"
path = "/dev/ttyS1"
protocol = "lines"
line_format = "csv"
columns = ["soil_t", "vwc"]

[[serial]]
name = "bus"
path = "/dev/ttyUSB0"
protocol = "modbus-rtu"

[[serial]]
name = "sdi"
path = "/dev/ttyUSB1"
protocol = "sdi12"

[[serial]]
name = "nodes"
path = "/dev/ttyUSB2"
protocol = "frames"
"#;

    #[test]
    fn bindings_parse_fully() {
        let c = parse(&format!(
            "{BASE}{PORTS}{}",
            r#"
[[fields]]
id = "f"
  [[fields.sensors]]
  device_id = "probe"
  sensor_type = "soil_temperature"
  line = { port = "talk", key = "soil_t" }
  [[fields.sensors]]
  device_id = "rs485-probe"
  sensor_type = "soil_moisture"
  [fields.sensors.modbus]
  port = "bus"
  unit = 3
  register = 0
  kind = "holding"
  type = "u16"
  scale = 0.1
  offset = 0.0
  [[fields.sensors]]
  device_id = "rs485-probe"
  sensor_type = "soil_ec"
  modbus = { port = "bus", unit = 3, register = 2, kind = "input", type = "f32", word_order = "little", poll_interval = "1m" }
  [[fields.sensors]]
  device_id = "sdi-probe"
  sensor_type = "soil_moisture"
  sdi12 = { port = "sdi", address = "a", index = 2, command = "MC" }
  [[fields.sensors]]
  device_id = "node-7"
  sensor_type = "air_temperature"
  frame = { port = "nodes", node = 7, channel = 1 }
"#
        ))
        .unwrap();
        let s = &c.fields[0].sensors;
        assert!(
            matches!(s[0].serial_binding(), Some(super::SerialBinding::Line(b)) if b.key.as_str() == "soil_t")
        );
        assert_eq!(s[1].scale, 0.1, "the binding's scale is the sensor's");
        let Some(super::SerialBinding::Modbus(m)) = s[2].serial_binding() else {
            panic!("modbus binding")
        };
        assert_eq!(
            (m.unit.0, m.register, m.kind, m.value_type, m.word_order()),
            (
                3,
                2,
                super::RegisterKind::Input,
                super::RegisterType::F32,
                super::WordOrder::Little
            )
        );
        let Some(super::SerialBinding::Sdi12(d)) = s[3].serial_binding() else {
            panic!("sdi12 binding")
        };
        assert_eq!(
            (d.address.0, d.index.0, d.command),
            ('a', 2, super::Sdi12Command::MC)
        );
        assert!(matches!(
            s[4].serial_binding(),
            Some(super::SerialBinding::Frame(f)) if f.node == 7 && f.channel == 1
        ));
    }

    #[test]
    fn binding_problems() {
        // Values that fail to parse spoil their whole [[fields]] entry, so each has its own.
        let all = problems(&format!(
            "{PORTS}{}",
            r#"
[[fields]]
id = "f"
  [[fields.sensors]]
  device_id = "a"
  sensor_type = "soil_temperature"
  line = { port = "talk", key = "soil_t" }
  modbus = { port = "bus", unit = 1, register = 0 }
  [[fields.sensors]]
  device_id = "b"
  sensor_type = "soil_temperature"
  line = { port = "bus", key = "x" }
  [[fields.sensors]]
  device_id = "c"
  sensor_type = "soil_temperature"
  line = { port = "nope", key = "x" }
  [[fields.sensors]]
  device_id = "e"
  sensor_type = "soil_moisture"
  modbus = { port = "bus", unit = 2, register = 0, scale = 0.1 }
  scale = 0.5
  [[fields.sensors]]
  device_id = "f"
  sensor_type = "soil_moisture"
  modbus = { port = "bus", unit = 2, register = 0, kind = "holding" }
  [[fields.sensors]]
  device_id = "h"
  sensor_type = "soil_moisture"
  line = { port = "talk", key = "ec" }
  [[fields.sensors]]
  device_id = "j"
  sensor_type = "soil_moisture"
  modbus = { port = "bus", unit = 4, register = 0, word_order = "big" }
  source = "x"
[[fields]]
id = "g1"
  [[fields.sensors]]
  device_id = "d"
  sensor_type = "soil_moisture"
  modbus = { port = "bus", unit = 248, register = 0 }
[[fields]]
id = "g2"
  [[fields.sensors]]
  device_id = "g"
  sensor_type = "soil_moisture"
  sdi12 = { port = "sdi", address = "?", index = 1 }
[[fields]]
id = "g3"
  [[fields.sensors]]
  device_id = "i"
  sensor_type = "soil_moisture"
  line = { port = "talk", key = "ts" }
"#
        ));
        for needle in [
            "has 2 bindings (line, modbus)",
            "needs a protocol = \"lines\" port, but `bus` is \"modbus-rtu\"",
            "port `nope` is not a [[serial]] name",
            "1 to 247, not 248",
            "not both",
            "modbus unit 2 holding register 0 on port `bus` is already bound at line",
            "SDI-12 address `?`",
            "key `ec` is not one of port `talk`'s columns",
            "read by the gateway itself",
            "word_order applies to u32, i32 and f32 only",
            "`source` names an [[mqtt]] source",
        ] {
            assert!(all.contains(needle), "{needle}:\n{all}");
        }
    }
}
