//! The gateway's TOML configuration: sections, defaults, and one `parse` that both `run` and
//! `validate` use, so what `validate` accepts is exactly what `run` starts with.
//!
//! Parsing reports every problem it can find in one pass: each section (and each `[[mqtt]]` /
//! `[[fields]]` entry) is deserialized on its own, so one bad entry does not hide the next, and
//! cross-section checks run over everything that parsed. Every problem carries its line.

mod listener;
pub mod serial;
mod values;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

pub use listener::{ListenerAuth, MqttListener};
pub use serial::{Protocol, SerialBinding, SerialSource};
pub use values::{
    ByteSize, DurationValue, Ident, JsonPointer, Secret, SensorTypeName, SubjectTemplate,
    TopicFilter, UtcOffsetValue,
};

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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    /// In every event's `source.gateway_id`; also the root of MQTT client ids.
    pub id: Ident,
    /// Tenant of fields that do not name their own.
    pub tenant_id: Ident,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nats {
    pub servers: Vec<String>,
    #[serde(default)]
    pub subject: SubjectTemplate,
    /// Subject of liveness events; `{status}` is `connected`, `disconnected` or `warning`.
    #[serde(default = "SubjectTemplate::default_status")]
    pub status_subject: SubjectTemplate,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
    pub nkey_seed_file: Option<PathBuf>,
    pub creds_file: Option<PathBuf>,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Name the servers' certificates must carry, when it differs from the host in `servers`
    /// (e.g. servers listed by IP address, or a cluster's shared certificate).
    pub tls_server_name: Option<String>,
    #[serde(default)]
    pub allow_insecure: bool,
    /// How long to wait for a PubAck before the publish counts as failed and is retried.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout: DurationValue,
    /// Publishes awaiting their PubAck at once.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Drop the oldest rows: recent data matters most.
    DropOldest,
    /// Drop every other reading of the oldest part of each sensor's series: a long outage
    /// keeps its whole time span at a coarser step.
    Thin,
    /// Stop accepting; the source keeps the data (MQTT: acks withheld).
    RejectNew,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    /// fsync at every commit: a committed reading survives power loss.
    Full,
    /// fsync at WAL checkpoints only: survives a crash of the process, not of the machine.
    Normal,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Buffer {
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    #[serde(default = "default_max_age")]
    pub max_age: DurationValue,
    #[serde(default = "default_when_full")]
    pub when_full: WhenFull,
    /// Intake pauses while the data directory's filesystem has less free space than this.
    #[serde(default = "default_min_free_disk")]
    pub min_free_disk: ByteSize,
    #[serde(default = "default_synchronous")]
    pub synchronous: Synchronous,
    /// Dead-letter rows kept; the oldest go first.
    #[serde(default = "default_dead_letter_max")]
    pub dead_letter_max: u32,
}

impl Default for Buffer {
    fn default() -> Self {
        Self {
            max_bytes: default_max_bytes(),
            max_age: default_max_age(),
            when_full: default_when_full(),
            min_free_disk: default_min_free_disk(),
            synchronous: default_synchronous(),
            dead_letter_max: default_dead_letter_max(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
}

impl Default for Http {
    fn default() -> Self {
        Self {
            listen: default_http_listen(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// SAHOOL device convention: topic `sahool/sensors/{device}/{field}/{type}`.
    Sahool,
    /// Per-sensor bindings: topic filter + JSON pointers.
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSource {
    pub name: Ident,
    pub url: String,
    pub topics: Vec<TopicFilter>,
    pub format: Format,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Name the broker's certificate must carry, when it differs from the host in `url`.
    pub tls_server_name: Option<String>,
    /// Defaults to `sahool-gw-{gateway.id}-{name}`: stable, so the broker keeps the session.
    pub client_id: Option<String>,
    /// MQTT 5 Receive Maximum: QoS 1 messages the broker may have in flight to us.
    #[serde(default = "default_receive_maximum")]
    pub receive_maximum: u16,
    #[serde(default = "default_keep_alive")]
    pub keep_alive: DurationValue,
    /// Larger payloads are dead-lettered (and refused by the client above 2× this).
    #[serde(default = "default_max_payload")]
    pub max_payload: ByteSize,
    /// How often sensors on this source report, unless the sensor says otherwise.
    pub expected_interval: Option<DurationValue>,
    /// Permit plaintext MQTT to a non-loopback broker (warned about at every start).
    #[serde(default)]
    pub allow_insecure: bool,
    #[serde(skip)]
    pub line: usize,
}

impl MqttSource {
    pub fn client_id(&self, gateway: &Gateway) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("sahool-gw-{}-{}", gateway.id, self.name))
    }

    /// `(host, port)` of `mqtt://host:port` or `mqtts://host:port` (default ports 1883, 8883).
    pub fn host_port(&self) -> Result<(String, u16), String> {
        let port = if self.uses_tls() { 8883 } else { 1883 };
        parse_host_port(&self.url, &["mqtt", "mqtts"], port)
    }

    /// TLS is chosen by the `mqtts://` scheme.
    pub fn uses_tls(&self) -> bool {
        self.url.starts_with("mqtts://")
    }

    /// The TLS settings, when the broker is reached over TLS.
    pub fn tls_files(&self) -> Option<crate::tls::TlsFiles<'_>> {
        self.uses_tls().then_some(crate::tls::TlsFiles::new(
            &self.tls_ca_file,
            &self.tls_cert_file,
            &self.tls_key_file,
            &self.tls_server_name,
        ))
    }
}

impl Nats {
    /// TLS is required by a `tls://` server or any TLS file.
    pub fn uses_tls(&self) -> bool {
        self.servers.iter().any(|s| s.starts_with("tls://"))
            || self.tls_ca_file.is_some()
            || self.tls_cert_file.is_some()
    }

    /// The TLS settings, when the servers are reached over TLS.
    pub fn tls_files(&self) -> Option<crate::tls::TlsFiles<'_>> {
        self.uses_tls().then_some(crate::tls::TlsFiles::new(
            &self.tls_ca_file,
            &self.tls_cert_file,
            &self.tls_key_file,
            &self.tls_server_name,
        ))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    pub id: Ident,
    pub tenant_id: Option<Ident>,
    pub name: Option<String>,
    #[serde(default)]
    pub sensors: Vec<Sensor>,
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
    pub line_binding: Option<serial::LineBinding>,
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

/// `[quality]`: sensor liveness, plausibility of observation times, and flood protection.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quality {
    /// How often sensors report unless the sensor or its source says otherwise.
    #[serde(default = "default_expected_interval")]
    pub expected_interval: DurationValue,
    /// A sensor silent for this many expected intervals is reported disconnected.
    #[serde(default = "default_stale_factor")]
    pub stale_factor: f64,
    /// Battery percentage below which a sensor is flagged (once per crossing).
    #[serde(default = "default_low_battery")]
    pub low_battery: f64,
    /// Observation times further ahead of the gateway clock than this are implausible.
    #[serde(default = "default_max_future")]
    pub max_future: DurationValue,
    /// Observation times further back than this are implausible.
    #[serde(default = "default_max_past")]
    pub max_past: DurationValue,
    /// What happens to an implausible observation time.
    #[serde(default)]
    pub timestamp_policy: TimestampPolicy,
    /// Per device: readings per second of the device's own observation time (readings it
    /// timestamps), and the pace of readings without a device time; see [`crate::flood`].
    #[serde(default = "default_device_rate")]
    pub device_rate: f64,
    /// Per device: readings that may claim one window of `device_burst / device_rate` seconds
    /// of observation time, and the burst of readings without a device time before they wait.
    #[serde(default = "default_device_burst")]
    pub device_burst: f64,
    /// Readings per second one source delivers before its acknowledgements are paced (never
    /// a reason to reject).
    #[serde(default = "default_source_rate")]
    pub source_rate: f64,
    #[serde(default = "default_source_burst")]
    pub source_burst: f64,
}

impl Default for Quality {
    fn default() -> Self {
        Self {
            expected_interval: default_expected_interval(),
            stale_factor: default_stale_factor(),
            low_battery: default_low_battery(),
            max_future: default_max_future(),
            max_past: default_max_past(),
            timestamp_policy: TimestampPolicy::default(),
            device_rate: default_device_rate(),
            device_burst: default_device_burst(),
            source_rate: default_source_rate(),
            source_burst: default_source_burst(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimestampPolicy {
    /// Use the receive time and keep the device's time in `metadata.original_timestamp`.
    #[default]
    Replace,
    /// Reject the reading (dead-letter `bad_timestamp`).
    Reject,
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
    pub timestamp_format: TimestampFormat,
    pub utc_offset: Option<UtcOffsetValue>,
    pub rssi: Option<JsonPointer>,
    pub battery: Option<JsonPointer>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/sahool-gateway")
}
fn default_ack_timeout() -> DurationValue {
    DurationValue(Duration::from_secs(5))
}
fn default_max_in_flight() -> u16 {
    1024
}
fn default_max_bytes() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_max_age() -> DurationValue {
    DurationValue(Duration::from_secs(30 * 24 * 3600))
}
fn default_when_full() -> WhenFull {
    WhenFull::DropOldest
}
fn default_min_free_disk() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_synchronous() -> Synchronous {
    Synchronous::Full
}
fn default_dead_letter_max() -> u32 {
    10_000
}
fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9108))
}
fn default_receive_maximum() -> u16 {
    1024
}
fn default_keep_alive() -> DurationValue {
    DurationValue(Duration::from_secs(30))
}
fn default_max_payload() -> ByteSize {
    ByteSize(64 << 10)
}
fn default_expected_interval() -> DurationValue {
    DurationValue(Duration::from_secs(300))
}
fn default_stale_factor() -> f64 {
    3.0
}
fn default_low_battery() -> f64 {
    20.0
}
fn default_max_future() -> DurationValue {
    DurationValue(Duration::from_secs(300))
}
fn default_max_past() -> DurationValue {
    // Nodes with their own ring buffer may deliver months-old readings after an outage.
    DurationValue(Duration::from_secs(365 * 24 * 3600))
}
fn default_device_rate() -> f64 {
    20.0
}
fn default_device_burst() -> f64 {
    200.0
}
fn default_source_rate() -> f64 {
    5000.0
}
fn default_source_burst() -> f64 {
    20000.0
}
fn one() -> f64 {
    1.0
}

/// The sections that parsed, for the cross-section checks.
struct Parts<'a> {
    nats: Option<&'a Nats>,
    buffer: &'a Buffer,
    quality: &'a Quality,
    mqtt: &'a [MqttSource],
    fields: &'a [Field],
    serial: &'a [SerialSource],
    mqtt_listener: &'a [MqttListener],
    http: &'a Http,
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
    parse(&text).map_err(|problems| ConfigError::Invalid {
        path: path.to_path_buf(),
        problems,
    })
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

    let mut gateway = None;
    let mut nats = None;
    let mut present = HashSet::new();
    let mut buffer = Buffer::default();
    let mut http = Http::default();
    let mut quality = Quality::default();
    let mut mqtt = Vec::new();
    let mut fields = Vec::new();
    let mut serial = Vec::new();
    let mut mqtt_listener = Vec::new();

    for (key, value) in root.into_inner() {
        let key_line = lines.line(key.span().start);
        present.insert(key.get_ref().to_string());
        match key.get_ref().as_ref() {
            "gateway" => gateway = lines.section(value, "[gateway]", &mut problems),
            "nats" => nats = lines.section(value, "[nats]", &mut problems),
            "buffer" => {
                if let Some(b) = lines.section(value, "[buffer]", &mut problems) {
                    buffer = b;
                }
            }
            "http" => {
                if let Some(h) = lines.section(value, "[http]", &mut problems) {
                    http = h;
                }
            }
            "quality" => {
                if let Some(q) = lines.section(value, "[quality]", &mut problems) {
                    quality = q;
                }
            }
            "mqtt" => {
                mqtt.extend(lines.entries(value, "[[mqtt]]", &mut problems, |m: &mut MqttSource, line| {
                    m.line = line
                }))
            }
            "fields" => {
                for (line, item) in lines.array(value, "[[fields]]", &mut problems) {
                    let sensor_lines = lines.sensor_lines(&item);
                    let calibration = sensor_calibration_keys(&item);
                    if let Some(mut f) = lines.section::<Field>(item, "[[fields]]", &mut problems) {
                        f.line = line;
                        for ((sensor, line), given) in
                            f.sensors.iter_mut().zip(sensor_lines).zip(calibration)
                        {
                            sensor.line = line;
                            problems.extend(serial::fold_calibration(sensor, given));
                        }
                        fields.push(f);
                    }
                }
            }
            "serial" => {
                serial.extend(lines.entries(value, "[[serial]]", &mut problems, |s: &mut SerialSource, line| {
                    s.line = line
                }))
            }
            "mqtt_listener" => {
                mqtt_listener.extend(lines.entries(value, "[[mqtt_listener]]", &mut problems, |l: &mut MqttListener, line| {
                    l.line = line
                }))
            }
            other => problems.push(Problem {
                line: key_line,
                message: format!(
                    "unknown section `{other}`; expected gateway, nats, buffer, http, quality, mqtt, mqtt_listener, serial or fields"
                ),
            }),
        }
    }

    let gateway = gateway.or_else(|| {
        if present.contains("gateway") {
            return None;
        }
        problems.push(Problem {
            line: 1,
            message: "missing section [gateway] (id and tenant_id are required)".into(),
        });
        None
    });
    let nats = nats.or_else(|| {
        if present.contains("nats") {
            return None;
        }
        problems.push(Problem {
            line: 1,
            message: "missing section [nats] (servers is required)".into(),
        });
        None
    });
    problems.extend(Config::check(
        &Parts {
            nats: nats.as_ref(),
            buffer: &buffer,
            quality: &quality,
            mqtt: &mqtt,
            fields: &fields,
            serial: &serial,
            mqtt_listener: &mqtt_listener,
            http: &http,
        },
        &lines,
    ));
    match (gateway, nats) {
        (Some(gateway), Some(nats)) if problems.is_empty() => Ok(Config {
            gateway,
            nats,
            buffer,
            http,
            quality,
            mqtt,
            fields,
            serial,
            mqtt_listener,
        }),
        _ => {
            problems.sort_by_key(|p| p.line);
            Err(problems)
        }
    }
}

impl Config {
    /// Tenant of a field: its own, or the gateway's default.
    pub fn tenant_of<'a>(&'a self, field: &'a Field) -> &'a Ident {
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

    /// Checks that span sections: names, references, combinations of keys. Runs on whatever
    /// parsed, so a broken section does not hide the problems of the others.
    fn check(parts: &Parts<'_>, lines: &LineIndex) -> Vec<Problem> {
        let mut p = Vec::new();
        let nats_line = lines.find_line("[nats]");
        let mut push = |line: usize, message: String| p.push(Problem { line, message });

        if let Some(n) = parts.nats {
            if n.servers.is_empty() {
                push(nats_line, "[nats] servers: list at least one server".into());
            }
            for server in &n.servers {
                match parse_host_port(server, &["nats", "tls"], 4222) {
                    Ok((host, _)) => {
                        if !n.uses_tls() && !is_loopback_host(&host) && !n.allow_insecure {
                            push(nats_line, format!(
                                "[nats] servers: `{server}` is plaintext to a non-loopback host; use tls:// with tls_ca_file, or set allow_insecure = true"
                            ));
                        }
                    }
                    Err(e) => push(nats_line, format!("[nats] servers: {e}")),
                }
            }
            if n.max_in_flight == 0 {
                push(nats_line, "[nats] max_in_flight must be at least 1".into());
            }
            if n.password.is_some() && n.password_file.is_some() {
                push(
                    nats_line,
                    "[nats] set password or password_file, not both".into(),
                );
            }
            if n.token.is_some() && n.token_file.is_some() {
                push(nats_line, "[nats] set token or token_file, not both".into());
            }
            if n.user.is_some() != (n.password.is_some() || n.password_file.is_some()) {
                push(
                    nats_line,
                    "[nats] user and password (or password_file) go together".into(),
                );
            }
            let auth_modes = [
                n.user.is_some(),
                n.token.is_some() || n.token_file.is_some(),
                n.nkey_seed_file.is_some(),
                n.creds_file.is_some(),
            ];
            if auth_modes.iter().filter(|m| **m).count() > 1 {
                push(nats_line, "[nats] choose one authentication: user/password, token, nkey_seed_file or creds_file".into());
            }
            if let Some(why) = n.password.as_ref().and_then(|p| weak_password(p.expose())) {
                push(nats_line, format!("[nats] password is {why}; use a long random one, from password_file or ${{CREDENTIALS_DIRECTORY}}"));
            }
            if n.tls_cert_file.is_some() != n.tls_key_file.is_some() {
                push(
                    nats_line,
                    "[nats] tls_cert_file and tls_key_file go together".into(),
                );
            }
            if let Some(problem) = check_server_name(n.tls_server_name.as_deref()) {
                push(nats_line, format!("[nats] {problem}"));
            }
        }

        let buffer_line = lines.find_line("[buffer]");
        if parts.buffer.max_bytes.0 < 16 << 10 {
            push(
                buffer_line,
                "[buffer] max_bytes must be at least 16KiB".into(),
            );
        }
        if parts.buffer.max_age.0 < Duration::from_secs(60) {
            push(buffer_line, "[buffer] max_age must be at least 1m".into());
        }

        let quality_line = lines.find_line("[quality]");
        let q = parts.quality;
        for (key, v) in [
            ("stale_factor", q.stale_factor),
            ("device_rate", q.device_rate),
            ("device_burst", q.device_burst),
            ("source_rate", q.source_rate),
            ("source_burst", q.source_burst),
        ] {
            if !(v.is_finite() && v > 0.0) {
                push(
                    quality_line,
                    format!("[quality] {key} must be a positive number"),
                );
            }
        }
        if q.device_burst < 1.0 || q.source_burst < 1.0 {
            push(
                quality_line,
                "[quality] bursts must allow at least one reading".into(),
            );
        }
        if !(0.0..=100.0).contains(&q.low_battery) {
            push(
                quality_line,
                "[quality] low_battery is a percentage, 0 to 100".into(),
            );
        }

        let mut names = HashSet::new();
        for m in parts.mqtt {
            if !names.insert(m.name.as_str()) {
                push(m.line, format!("[[mqtt]] name `{}` is used twice", m.name));
            }
            if let Err(e) = m.host_port() {
                push(m.line, format!("[[mqtt]] `{}` url: {e}", m.name));
            }
            if m.topics.is_empty() {
                push(
                    m.line,
                    format!(
                        "[[mqtt]] `{}` topics: list at least one topic filter",
                        m.name
                    ),
                );
            }
            if let Some(why) = m.password.as_ref().and_then(|p| weak_password(p.expose())) {
                push(
                    m.line,
                    format!(
                        "[[mqtt]] `{}` password is {why}; use a long random one",
                        m.name
                    ),
                );
            }
            if let Ok((host, _)) = m.host_port() {
                if !m.uses_tls() && !is_loopback_host(&host) && !m.allow_insecure {
                    push(m.line, format!(
                        "[[mqtt]] `{}`: `{}` is plaintext to a non-loopback broker; use mqtts:// (with tls_ca_file), keep the broker on loopback, or set allow_insecure = true",
                        m.name, m.url
                    ));
                }
            }
            if m.password.is_some() && m.password_file.is_some() {
                push(
                    m.line,
                    format!(
                        "[[mqtt]] `{}`: set password or password_file, not both",
                        m.name
                    ),
                );
            }
            let tls_keys = m.tls_ca_file.is_some()
                || m.tls_cert_file.is_some()
                || m.tls_key_file.is_some()
                || m.tls_server_name.is_some();
            if tls_keys && !m.uses_tls() {
                push(m.line, format!(
                    "[[mqtt]] `{}`: TLS settings need an mqtts:// url (TLS is chosen by the scheme)",
                    m.name
                ));
            }
            if m.tls_cert_file.is_some() != m.tls_key_file.is_some() {
                push(
                    m.line,
                    format!(
                        "[[mqtt]] `{}`: tls_cert_file and tls_key_file go together",
                        m.name
                    ),
                );
            }
            if let Some(problem) = check_server_name(m.tls_server_name.as_deref()) {
                push(m.line, format!("[[mqtt]] `{}`: {problem}", m.name));
            }
            if m.receive_maximum == 0 {
                push(
                    m.line,
                    format!("[[mqtt]] `{}` receive_maximum must be at least 1", m.name),
                );
            }
        }

        for l in parts.mqtt_listener {
            if !names.insert(l.name.as_str()) {
                push(l.line, format!(
                    "[[mqtt_listener]] name `{}` is already used by another [[mqtt]] or [[mqtt_listener]]",
                    l.name
                ));
            }
            l.check(&mut push);
        }
        listener::check_addresses(parts.mqtt_listener, parts.http.listen, &mut push);

        let inputs: Vec<MqttInputRef> = mqtt_inputs(parts.mqtt, parts.mqtt_listener).collect();
        let mut field_ids = HashSet::new();
        let mut sensors: HashMap<(&str, crate::reading::SensorType), usize> = HashMap::new();
        for f in parts.fields {
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
                if !s.scale.is_finite() || s.scale == 0.0 || !s.offset.is_finite() {
                    push(
                        s.line,
                        format!(
                            "sensor {}: scale must be finite and non-zero, offset finite",
                            s.device_id
                        ),
                    );
                }
                if let Some([lo, hi]) = s.range {
                    if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                        push(
                            s.line,
                            format!(
                                "sensor {}: range must be [min, max] with min < max",
                                s.device_id
                            ),
                        );
                    }
                }
                if s.serial_binding().is_some() {
                    // Read from a serial port: checked with the ports (serial::check).
                    continue;
                }
                let bound: Vec<&MqttInputRef> = match &s.source {
                    Some(name) => match inputs.iter().find(|m| m.name == name) {
                        Some(m) => vec![m],
                        None => {
                            push(
                                s.line,
                                format!(
                                    "sensor {}: source `{name}` is not an [[mqtt]] or [[mqtt_listener]] name",
                                    s.device_id
                                ),
                            );
                            continue;
                        }
                    },
                    None => inputs.iter().collect(),
                };
                let wants = if s.mqtt.is_some() {
                    Format::Json
                } else {
                    Format::Sahool
                };
                if !inputs.is_empty() && !bound.iter().any(|m| m.format == wants) {
                    let msg = match wants {
                        Format::Json => "has an [fields.sensors.mqtt] binding but no format = \"json\" source reads it",
                        Format::Sahool => "has no [fields.sensors.mqtt] binding, which a format = \"json\" source needs",
                    };
                    push(
                        s.line,
                        format!("sensor {} / {} {msg}", s.device_id, s.sensor_type.0),
                    );
                }
                if let Some(b) = &s.mqtt {
                    if b.utc_offset.is_some() && b.timestamp.is_none() {
                        push(
                            s.line,
                            format!(
                                "sensor {}: utc_offset needs a timestamp pointer",
                                s.device_id
                            ),
                        );
                    }
                    if b.timestamp_format == TimestampFormat::Local && b.utc_offset.is_none() {
                        push(
                            s.line,
                            format!(
                                "sensor {}: timestamp_format = \"local\" needs utc_offset",
                                s.device_id
                            ),
                        );
                    }
                }
            }
        }
        p.extend(serial::check(parts));
        p
    }
}

/// Which of `scale` and `offset` each sensor of a `[[fields]]` entry sets in its own table (a
/// Modbus binding may carry them instead, not as well).
fn sensor_calibration_keys(field: &Spanned<DeValue<'_>>) -> Vec<[bool; 2]> {
    let DeValue::Table(table) = field.get_ref() else {
        return Vec::new();
    };
    let Some(DeValue::Array(sensors)) = table.get("sensors").map(|s| s.get_ref()) else {
        return Vec::new();
    };
    sensors
        .iter()
        .map(|s| match s.get_ref() {
            DeValue::Table(t) => [t.contains_key("scale"), t.contains_key("offset")],
            _ => [false, false],
        })
        .collect()
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

/// `scheme://host:port` (or bare `host:port`) → `(host, port)`.
pub fn parse_host_port(
    url: &str,
    schemes: &[&str],
    default_port: u16,
) -> Result<(String, u16), String> {
    let rest = match url.split_once("://") {
        Some((scheme, rest)) => {
            if !schemes.contains(&scheme) {
                return Err(format!(
                    "`{url}`: scheme `{scheme}` is not supported here; use {}",
                    schemes
                        .iter()
                        .map(|s| format!("{s}://"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ));
            }
            rest
        }
        None => url,
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('@') || rest.contains('/') || rest.contains('?') {
        return Err(format!(
            "`{url}`: write only scheme://host:port here; credentials and options have their own keys"
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("`{url}`: unclosed `[`"))?;
        (host.to_string(), after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("`{url}`: `{p}` is not a port"))?,
        None => default_port,
    };
    Ok((host, port))
}

/// A `tls_server_name` must be something a certificate can carry.
fn check_server_name(name: Option<&str>) -> Option<String> {
    let name = name?;
    rustls::pki_types::ServerName::try_from(name)
        .is_err()
        .then(|| format!("tls_server_name `{name}` is not a DNS name or IP address"))
}

/// The line of a section header such as `[nats]` in config text, or 1 when it is absent.
pub fn section_line(text: &str, header: &str) -> usize {
    LineIndex::new(text).find_line(header)
}

/// Expands `${CREDENTIALS_DIRECTORY}` (set by systemd's `LoadCredential=`) in a file path.
pub fn resolve_path(path: &Path) -> Result<PathBuf, String> {
    const VAR: &str = "${CREDENTIALS_DIRECTORY}";
    let text = path.to_string_lossy();
    if !text.contains(VAR) {
        return Ok(path.to_path_buf());
    }
    let dir = std::env::var("CREDENTIALS_DIRECTORY").map_err(|_| {
        format!(
            "{} uses ${{CREDENTIALS_DIRECTORY}}, which is only set when systemd passes credentials (LoadCredential=)",
            path.display()
        )
    })?;
    Ok(PathBuf::from(text.replace(VAR, &dir)))
}

/// Passwords that are defaults somewhere or trivially guessed; `Some(why)` if `password` is one.
pub fn weak_password(password: &str) -> Option<&'static str> {
    const KNOWN: [&str; 20] = [
        "password",
        "passw0rd",
        "admin",
        "administrator",
        "changeme",
        "change-me",
        "secret",
        "nats",
        "mosquitto",
        "guest",
        "default",
        "test",
        "sahool",
        "root",
        "toor",
        "letmein",
        "qwerty",
        "123456",
        "12345678",
        "1234567890",
    ];
    let lower = password.to_ascii_lowercase();
    if KNOWN
        .iter()
        .any(|k| lower == *k || lower.trim_end_matches(|c: char| c.is_ascii_digit()) == *k)
    {
        Some("a known default")
    } else if password.chars().count() < 12 {
        Some("shorter than 12 characters")
    } else if password
        .chars()
        .all(|c| c == password.chars().next().unwrap_or(c))
    {
        Some("one repeated character")
    } else {
        None
    }
}

pub fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Byte offsets → 1-based line numbers, and the per-section deserialization that uses them.
struct LineIndex<'a> {
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(text: &'a str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self { text, starts }
    }

    fn line(&self, offset: usize) -> usize {
        self.starts.partition_point(|s| *s <= offset).max(1)
    }

    /// Line of a section header such as `[nats]`, or 1 when the section is absent.
    fn find_line(&self, header: &str) -> usize {
        self.text
            .lines()
            .position(|l| l.trim_start().starts_with(header))
            .map_or(1, |i| i + 1)
    }

    fn problem_from_toml(&self, e: &toml::de::Error, section: &str) -> Problem {
        let line = e.span().map_or(1, |s| self.line(s.start));
        let message = e.message().trim().replace('\n', " ");
        Problem {
            line,
            message: format!("{section}: {message}"),
        }
    }

    fn section<T: for<'de> Deserialize<'de>>(
        &self,
        value: Spanned<DeValue<'_>>,
        name: &str,
        problems: &mut Vec<Problem>,
    ) -> Option<T> {
        if !matches!(value.get_ref(), DeValue::Table(_)) {
            problems.push(Problem {
                line: self.line(value.span().start),
                message: format!("{name} must be a table"),
            });
            return None;
        }
        T::deserialize(ValueDeserializer::from(value))
            .map_err(|e| problems.push(self.problem_from_toml(&e, name)))
            .ok()
    }

    /// The entries of an array of tables such as `[[mqtt]]`, each parsed and given its line;
    /// entries with problems are left out (the problems are reported).
    fn entries<T: for<'de> Deserialize<'de>>(
        &self,
        value: Spanned<DeValue<'_>>,
        name: &str,
        problems: &mut Vec<Problem>,
        set_line: fn(&mut T, usize),
    ) -> Vec<T> {
        let mut out = Vec::new();
        for (line, item) in self.array(value, name, problems) {
            if let Some(mut entry) = self.section::<T>(item, name, problems) {
                set_line(&mut entry, line);
                out.push(entry);
            }
        }
        out
    }

    fn array<'i>(
        &self,
        value: Spanned<DeValue<'i>>,
        name: &str,
        problems: &mut Vec<Problem>,
    ) -> Vec<(usize, Spanned<DeValue<'i>>)> {
        let line = self.line(value.span().start);
        match value.into_inner() {
            DeValue::Array(items) => items
                .into_iter()
                .map(|item| (self.line(item.span().start), item))
                .collect(),
            _ => {
                problems.push(Problem {
                    line,
                    message: format!("{name} must be an array of tables (write it as {name})"),
                });
                Vec::new()
            }
        }
    }

    fn sensor_lines(&self, field: &Spanned<DeValue<'_>>) -> Vec<usize> {
        let DeValue::Table(table) = field.get_ref() else {
            return Vec::new();
        };
        let Some(sensors) = table.get("sensors") else {
            return Vec::new();
        };
        match sensors.get_ref() {
            DeValue::Array(items) => items.iter().map(|s| self.line(s.span().start)).collect(),
            _ => Vec::new(),
        }
    }
}

/// What the config tests of every section share: a minimal valid config, and the problems of
/// that config with more sections appended.
#[cfg(test)]
pub(crate) mod test_support {
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
}

#[cfg(test)]
mod tests {
    use super::test_support::MINIMAL;
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
    fn weak_passwords_and_plaintext_brokers_are_refused() {
        assert!(weak_password("changeme").is_some());
        assert!(weak_password("Password123").is_some());
        assert!(weak_password("short").is_some());
        assert!(weak_password("aaaaaaaaaaaaaaaa").is_some());
        assert!(weak_password("k3v-9Lq!tr8z-WmX").is_none());
        let text = format!(
            "{MINIMAL}\n{}",
            r##"
[[mqtt]]
name = "lan"
url = "mqtt://192.168.1.20:1883"
topics = ["#"]
format = "sahool"
username = "gw"
password = "mosquitto"
"##
        );
        let all = parse(&text)
            .unwrap_err()
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(all.contains("known default"), "{all}");
        assert!(all.contains("non-loopback broker"), "{all}");
        assert!(
            !all.contains("mosquitto\""),
            "the secret is not echoed: {all}"
        );
        let ok = text.replace(
            "password = \"mosquitto\"",
            "password_file = \"/etc/x\"\nallow_insecure = true",
        );
        assert!(parse(&ok).is_ok());
    }

    /// Every problem of a config that must not parse, one per line.
    fn all_problems(text: &str) -> String {
        parse(text)
            .unwrap_err()
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn mqtt_tls_is_chosen_by_the_scheme() {
        let source = |url: &str, extra: &str| {
            format!("{MINIMAL}\n[[mqtt]]\nname = \"lan\"\nurl = \"{url}\"\ntopics = [\"#\"]\nformat = \"sahool\"\n{extra}\n")
        };
        let c = parse(&source(
            "mqtts://broker.farm.example",
            "tls_ca_file = \"/etc/ca.pem\"",
        ))
        .unwrap();
        assert_eq!(
            c.mqtt[0].host_port().unwrap(),
            ("broker.farm.example".into(), 8883)
        );
        assert!(c.mqtt[0].tls_files().is_some());
        let text = all_problems(&source("mqtt://127.0.0.1", "tls_ca_file = \"/etc/ca.pem\""));
        assert!(text.contains("need an mqtts:// url"), "{text}");
        let text = all_problems(&source(
            "mqtts://10.0.0.2",
            "tls_cert_file = \"/etc/c.pem\"\ntls_server_name = \"not a name\"",
        ));
        assert!(
            text.contains("tls_cert_file and tls_key_file go together"),
            "{text}"
        );
        assert!(text.contains("`not a name` is not a DNS name"), "{text}");
        assert!(!text.contains("plaintext"), "{text}");
    }

    #[test]
    fn host_ports() {
        assert_eq!(
            parse_host_port("mqtt://127.0.0.1:1884", &["mqtt"], 1883).unwrap(),
            ("127.0.0.1".into(), 1884)
        );
        assert_eq!(
            parse_host_port("mqtt://broker", &["mqtt"], 1883).unwrap(),
            ("broker".into(), 1883)
        );
        assert_eq!(
            parse_host_port("[::1]:4222", &["nats"], 4222).unwrap(),
            ("::1".into(), 4222)
        );
        assert!(parse_host_port("http://x", &["mqtt"], 1).is_err());
        assert!(parse_host_port("mqtt://u:p@x", &["mqtt"], 1).is_err());
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
