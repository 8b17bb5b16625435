//! The gateway's TOML configuration: sections, defaults, and one `parse` that both `run` and
//! `validate` use, so what `validate` accepts is exactly what `run` starts with.
//!
//! Parsing reports every problem it can find in one pass: each section (and each `[[mqtt]]` /
//! `[[fields]]` entry) is deserialized on its own, so one bad entry does not hide the next, and
//! cross-section checks run over everything that parsed. Every problem carries its line.
//!
//! One file per section, each with its types, defaults and a `check` of the section on its own:
//! `gateway.rs`, `nats.rs`, `buffer.rs`, `http.rs`, `quality.rs`, `mqtt.rs` (`[[mqtt]]`
//! clients), `listener.rs` (`[[mqtt_listener]]`), [`serial`] (`[[serial]]` and serial bindings),
//! `fields.rs` (`[[fields]]`, sensors, MQTT bindings), `actuators.rs` (`[[fields.actuators]]`),
//! `commands.rs` (`[commands]`, the downlink's stream and consumer), `fleet.rs` (`[fleet]`, the
//! heartbeat). Below them: `values.rs`
//! (value types checked while parsing), `address.rs` (server URLs), `credentials.rs` (secret and
//! TLS file paths, the password policy) and `lines.rs` (line numbers). This file keeps [`Config`],
//! [`parse`] and the checks that span sections. Every public type is re-exported here, and
//! `config` uses nothing of the crate but [`crate::reading`], so any module may depend on it.

mod actuators;
mod address;
mod buffer;
mod commands;
mod credentials;
mod fields;
mod fleet;
mod gateway;
mod http;
mod lines;
mod listener;
mod mqtt;
mod nats;
mod quality;
pub mod serial;
mod values;

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use lines::LineIndex;

pub use actuators::{
    Actuator, ActuatorFormat, ActuatorKind, BlockWhen, ModbusActuator, MqttActuator, SensorRef,
};
pub use address::ServerUrl;
pub use buffer::{Buffer, Synchronous, WhenFull};
pub use commands::{Commands, ConsumerTemplate};
pub use credentials::TlsFiles;
pub(crate) use credentials::{resolve_path, weak_password};
pub use fields::{Field, JsonBinding, Sensor, TimestampFormat};
pub use fleet::{BucketTemplate, Fleet};
pub use gateway::Gateway;
pub use http::Http;
pub(crate) use lines::section_line;
pub use listener::{ListenerAuth, MqttListener};
pub use mqtt::{Format, MqttSource};
pub use nats::Nats;
pub use quality::{Quality, TimestampPolicy};
pub use serial::{Protocol, SerialBinding, SerialSource};
pub use values::{ByteSize, Ident, JsonPointer, Secret, SubjectTemplate, TopicFilter};
pub(crate) use values::{DurationValue, SensorTypeName, UtcOffsetValue};

#[derive(Debug, Clone)]
pub struct Config {
    pub gateway: Gateway,
    pub nats: Nats,
    pub buffer: Buffer,
    pub http: Http,
    pub quality: Quality,
    pub mqtt: Vec<MqttSource>,
    pub fields: Vec<Field>,
    pub serial: Vec<SerialSource>,
    pub mqtt_listener: Vec<MqttListener>,
    pub commands: Commands,
    pub fleet: Fleet,
    /// The xxh3-128 hash of the file text this config was parsed from, in hex: the config
    /// revision the heartbeat reports for a local file.
    pub text_hash: String,
    /// Where this config came from: the file [`load`] read, and the KV revision when it is a
    /// remote one (`crate::fleet::remote`).
    pub origin: Origin,
}

/// Where a running config came from (shown by `status` and the heartbeat).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// The file it was read from; `None` for text parsed in memory.
    pub file: Option<PathBuf>,
    /// The KV revision of a remote config; `None` for the local file.
    pub remote_revision: Option<u64>,
}

/// The sections as they are read, for the checks that span them: a section that failed to
/// parse is absent (`gateway`, `nats`) or has its defaults, and an entry that failed is left out.
#[derive(Default)]
struct Parts {
    gateway: Option<Gateway>,
    nats: Option<Nats>,
    /// Top-level keys seen, so a section that failed to parse is not also called missing.
    present: HashSet<String>,
    buffer: Buffer,
    http: Http,
    quality: Quality,
    mqtt: Vec<MqttSource>,
    fields: Vec<Field>,
    serial: Vec<SerialSource>,
    mqtt_listener: Vec<MqttListener>,
    commands: Commands,
    fleet: Fleet,
}

impl Parts {
    /// Reads one top-level key of the file into its section.
    fn read(
        &mut self,
        key: &Spanned<Cow<'_, str>>,
        value: Spanned<DeValue<'_>>,
        lines: &LineIndex,
        problems: &mut Vec<Problem>,
    ) {
        self.present.insert(key.get_ref().to_string());
        match key.get_ref().as_ref() {
            "gateway" => self.gateway = lines.section(value, "[gateway]", problems),
            "nats" => self.nats = lines.section(value, "[nats]", problems),
            "buffer" => {
                if let Some(b) = lines.section(value, "[buffer]", problems) {
                    self.buffer = b;
                }
            }
            "http" => {
                if let Some(h) = lines.section(value, "[http]", problems) {
                    self.http = h;
                }
            }
            "quality" => {
                if let Some(q) = lines.section(value, "[quality]", problems) {
                    self.quality = q;
                }
            }
            "commands" => {
                if let Some(c) = lines.section(value, "[commands]", problems) {
                    self.commands = c;
                }
            }
            "fleet" => {
                if let Some(f) = lines.section(value, "[fleet]", problems) {
                    self.fleet = f;
                }
            }
            "mqtt" => self.mqtt.extend(lines.entries(value, "[[mqtt]]", problems, |m: &mut MqttSource, line| {
                m.line = line
            })),
            "fields" => self.fields.extend(fields::entries(lines, value, problems)),
            "serial" => self.serial.extend(lines.entries(value, "[[serial]]", problems, |s: &mut SerialSource, line| {
                s.line = line
            })),
            "mqtt_listener" => self.mqtt_listener.extend(lines.entries(value, "[[mqtt_listener]]", problems, |l: &mut MqttListener, line| {
                l.line = line
            })),
            other => problems.push(Problem {
                line: lines.line(key.span().start),
                message: format!(
                    "unknown section `{other}`; expected gateway, nats, buffer, http, quality, mqtt, mqtt_listener, serial, fields, commands or fleet"
                ),
            }),
        }
    }

    /// Problems for the required sections that are not in the file at all.
    fn missing(&self) -> Vec<Problem> {
        [
            (
                self.gateway.is_some(),
                "gateway",
                "missing section [gateway] (id and tenant_id are required)",
            ),
            (
                self.nats.is_some(),
                "nats",
                "missing section [nats] (servers is required)",
            ),
        ]
        .into_iter()
        .filter(|(parsed, key, _)| !parsed && !self.present.contains(*key))
        .map(|(_, _, message)| Problem {
            line: 1,
            message: message.into(),
        })
        .collect()
    }
}

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

/// Reads and checks a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut config = parse(&text).map_err(|problems| ConfigError::Invalid {
        path: path.to_path_buf(),
        problems,
    })?;
    config.origin.file = Some(path.to_path_buf());
    Ok(config)
}

/// Parses and checks config text; returns every problem found.
pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
    let lines = LineIndex::new(text);
    let (root, syntax_errors) = DeTable::parse_recoverable(text);
    let mut problems: Vec<Problem> = syntax_errors
        .into_iter()
        .map(|e| lines.problem_from_toml(&e, "syntax"))
        .collect();
    if !problems.is_empty() {
        return Err(problems);
    }

    let mut parts = Parts::default();
    for (key, value) in root.into_inner() {
        parts.read(&key, value, &lines, &mut problems);
    }
    problems.extend(parts.missing());
    problems.extend(Config::check(&parts, &lines));
    let (Some(gateway), Some(nats), true) = (parts.gateway, parts.nats, problems.is_empty()) else {
        problems.sort_by_key(|p| p.line);
        return Err(problems);
    };
    Ok(Config {
        gateway,
        nats,
        buffer: parts.buffer,
        http: parts.http,
        quality: parts.quality,
        mqtt: parts.mqtt,
        fields: parts.fields,
        serial: parts.serial,
        mqtt_listener: parts.mqtt_listener,
        commands: parts.commands,
        fleet: parts.fleet,
        text_hash: format!("{:032x}", xxhash_rust::xxh3::xxh3_128(text.as_bytes())),
        origin: Origin::default(),
    })
}

impl Config {
    /// Tenant of a field: its own, or the gateway's default.
    pub(crate) fn tenant_of<'a>(&'a self, field: &'a Field) -> &'a Ident {
        field.tenant_id.as_ref().unwrap_or(&self.gateway.tenant_id)
    }

    /// How long a sensor may stay silent before it counts as disconnected.
    pub fn stale_after(&self, sensor: &Sensor) -> Duration {
        let source = sensor
            .source
            .as_ref()
            .and_then(|name| mqtt_inputs(&self.mqtt, &self.mqtt_listener).find(|m| m.name == name))
            .and_then(|m| m.expected_interval);
        let port = sensor.serial_binding().and_then(|b| {
            let port = self.serial.iter().find(|s| &s.name == b.port())?;
            match b {
                SerialBinding::Modbus(m) => port
                    .expected_interval
                    .map(|d| d.0)
                    .or(m.poll_interval.map(|d| d.0))
                    .or_else(|| port.report_interval()),
                _ => port.report_interval(),
            }
        });
        let interval = sensor
            .expected_interval
            .or(source)
            .map(|d| d.0)
            .or(port)
            .unwrap_or(self.quality.expected_interval.0);
        interval.mul_f64(self.quality.stale_factor)
    }

    /// The SQLite file of the outbox.
    pub fn store_path(&self) -> PathBuf {
        self.gateway.data_dir.join("buffer.db")
    }

    /// Checks that span sections (names, references), after each section's own. Runs on
    /// whatever parsed, so a broken section does not hide the problems of the others.
    fn check(parts: &Parts, lines: &LineIndex) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut push = |line: usize, message: String| p.push(Problem { line, message });
        if let Some(n) = &parts.nats {
            n.check(lines.find_line("[nats]"), &mut push);
        }
        parts.buffer.check(lines.find_line("[buffer]"), &mut push);
        parts.quality.check(lines.find_line("[quality]"), &mut push);
        parts.fleet.check(
            lines.find_line("[fleet]"),
            parts.gateway.as_ref(),
            &mut push,
        );

        // A name is unique among all MQTT inputs, clients and listeners alike.
        let mut names = HashSet::new();
        for m in &parts.mqtt {
            if !names.insert(m.name.as_str()) {
                push(m.line, format!("[[mqtt]] name `{}` is used twice", m.name));
            }
            m.check(&mut push);
        }
        for l in &parts.mqtt_listener {
            if !names.insert(l.name.as_str()) {
                push(l.line, format!(
                    "[[mqtt_listener]] name `{}` is already used by another [[mqtt]] or [[mqtt_listener]]",
                    l.name
                ));
            }
            l.check(&mut push);
        }
        listener::check_addresses(&parts.mqtt_listener, parts.http.listen, &mut push);

        let inputs: Vec<MqttInputRef> = mqtt_inputs(&parts.mqtt, &parts.mqtt_listener).collect();
        fields::check(&parts.fields, &inputs, &mut push);
        let declared = parts.fields.iter().map(|f| f.actuators.len()).sum();
        let commands_line = lines.find_line("[commands]");
        parts.commands.check(commands_line, declared, &mut push);
        actuators::check(parts, &mut push);
        p.extend(serial::check(parts));
        p
    }
}

/// What sensor bindings need of an MQTT input, whether a `[[mqtt]]` client or a listener.
struct MqttInputRef<'a> {
    name: &'a Ident,
    format: Format,
    expected_interval: Option<DurationValue>,
}

/// Every MQTT input by name: the `[[mqtt]]` sources, then the `[[mqtt_listener]]`s.
fn mqtt_inputs<'a>(
    mqtt: &'a [MqttSource],
    listeners: &'a [MqttListener],
) -> impl Iterator<Item = MqttInputRef<'a>> {
    let clients = mqtt.iter().map(|m| MqttInputRef {
        name: &m.name,
        format: m.format,
        expected_interval: m.expected_interval,
    });
    let listeners = listeners.iter().map(|l| MqttInputRef {
        name: &l.name,
        format: l.format,
        expected_interval: l.expected_interval,
    });
    clients.chain(listeners)
}

/// What the config tests of every section share: a minimal valid config, and the problems of a
/// config, one a line.
#[cfg(test)]
pub(crate) mod test_support {
    /// Ports, MQTT inputs and a sensor for actuators to name (see `actuators.rs`).
    pub(crate) use super::actuators::tests::PLACES as ACTUATOR_PLACES;

    pub(crate) const MINIMAL: &str = r#"
[gateway]
id = "gw-1"
tenant_id = "tenant-a"

[nats]
servers = ["nats://127.0.0.1:4222"]
"#;

    /// Every problem of `MINIMAL` + `extra`, one per line; empty when it parses.
    pub(crate) fn problems(extra: &str) -> String {
        super::parse(&format!("{MINIMAL}{extra}"))
            .err()
            .unwrap_or_default()
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every problem of a config that must not parse, one per line.
    pub(crate) fn all_problems(text: &str) -> String {
        super::parse(text)
            .unwrap_err()
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{all_problems, MINIMAL};
    use super::*;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.buffer.max_bytes.0, 256 << 20);
        assert_eq!(c.buffer.when_full, WhenFull::DropOldest);
        let thin = format!("{MINIMAL}\n[buffer]\nwhen_full = \"thin\"\n");
        assert_eq!(parse(&thin).unwrap().buffer.when_full, WhenFull::Thin);
        assert_eq!(c.nats.subject.as_str(), "sahool.iot.sensor.reading");
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:9108");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = format!("{MINIMAL}\n[buffer]\nmax_bytes = \"1MiB\"\nmax_rows = 5\n");
        let problems = parse(&text).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("max_rows"), "{problems:?}");
        assert_eq!(problems[0].line, 11, "{problems:?}");
    }

    #[test]
    fn every_problem_is_reported() {
        let text = r#"
[gateway]
id = "gw 1"
tenant_id = "t"

[nats]
servers = ["nats://10.0.0.5:4222"]

[buffer]
when_full = "explode"

[[mqtt]]
name = "a"
url = "mqtt://127.0.0.1:1883"
topics = ["x/#"]
format = "sahool"

[[fields]]
id = "f1"
  [[fields.sensors]]
  device_id = "d"
  sensor_type = "soil_moisture"
  [[fields.sensors]]
  device_id = "d"
  sensor_type = "soil_moisture"

[[fields]]
id = "f2"
  [[fields.sensors]]
  device_id = "d2"
  sensor_type = "nitrogen"
"#;
        let problems = parse(text).unwrap_err();
        let all = problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(all.contains("line 3") && all.contains("gw 1"), "{all}");
        assert!(all.contains("explode"), "{all}");
        assert!(all.contains("nitrogen") && all.contains("line 31"), "{all}");
        assert!(
            all.contains("plaintext"),
            "a broken [gateway] does not hide [nats]: {all}"
        );
        assert!(all.contains("already mapped at line 20"), "{all}");
        assert_eq!(problems.len(), 5, "{all}");
    }

    #[test]
    fn cross_section_problems() {
        let text = format!(
            "{}\n{}",
            MINIMAL.replace("127.0.0.1", "10.1.2.3"),
            r#"
[[mqtt]]
name = "z2m"
url = "mqtt://127.0.0.1"
topics = ["zigbee2mqtt/#"]
format = "json"

[[fields]]
id = "f1"
  [[fields.sensors]]
  device_id = "d"
  sensor_type = "soil_moisture"
  [[fields.sensors]]
  device_id = "d"
  sensor_type = "soil_moisture"
  source = "nope"
"#
        );
        let problems = parse(&text).unwrap_err();
        let all = problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(all.contains("plaintext"), "{all}");
        assert!(all.contains("already mapped at line"), "{all}");
        assert!(all.contains("`nope`"), "{all}");
        assert!(all.contains("needs"), "{all}");
    }

    #[test]
    fn a_secret_of_the_wrong_type_is_not_quoted() {
        for value in [
            "982451653982451",
            "98245.1653",
            "[\"98245165\"]",
            "{ x = \"98245165\" }",
            "1979-05-27T07:32:00Z",
        ] {
            let text = MINIMAL.replace("[nats]", &format!("[nats]\ntoken = {value}"));
            let all = all_problems(&text);
            assert!(all.contains("a secret must be a string"), "{all}");
            assert!(!all.contains("98245") && !all.contains("1979"), "{all}");
        }
    }

    #[test]
    fn secrets_are_masked_in_debug() {
        let text = MINIMAL.replace(
            "[nats]",
            "[nats]\nuser = \"gw\"\npassword = \"hunter2-long-secret\"",
        );
        let c = parse(&text).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
