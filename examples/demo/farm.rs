//! The simulated farm: SAHOOL devices publishing over MQTT in all three payload forms, a soil
//! probe printing `key=value` lines on a serial port, and the gateway config that maps them.
//! Every reading a device makes is recorded with the key that finds its event in the stream:
//! device, sensor type and observation time, which strictly increases per device.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use time::OffsetDateTime;

/// How a device sends its readings.
#[derive(Clone, Copy)]
pub enum Form {
    /// MQTT, one reading per message, full key names, RFC 3339 time, battery and RSSI.
    Standard,
    /// MQTT, one reading per message, one-letter keys, epoch time (milliseconds here).
    Compact,
    /// MQTT, every sensor of the device in one message on `sahool/sensors/{device}/{field}`.
    Batch,
    /// A serial `lines` talker: `ts=...,KEY=VALUE,...,battery=...` lines on the named port.
    Lines { port: &'static str },
}

/// The gateway input a reading goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    Listener,
    Serial,
}

pub struct Sensor {
    /// SAHOOL's name: used in the config, the topic, and what the event must say.
    pub sensor_type: &'static str,
    /// What the firmware sends instead (`vwc`, `temp`, ...): the gateway folds it, or, on a
    /// serial line, the key the sensor's binding names.
    alias: &'static str,
    /// As the firmware spells it; `None` leaves it to SAHOOL's default unit.
    unit: Option<&'static str>,
    /// The value drifts around `mean` by up to `swing`, and never leaves `range`.
    mean: f64,
    swing: f64,
    range: (f64, f64),
}

pub struct DeviceSpec {
    pub id: &'static str,
    pub field: &'static str,
    pub form: Form,
    pub sensors: &'static [Sensor],
}

impl DeviceSpec {
    pub fn input(&self) -> Input {
        match self.form {
            Form::Lines { .. } => Input::Serial,
            _ => Input::Listener,
        }
    }

    pub fn form_name(&self) -> &'static str {
        match self.form {
            Form::Standard => "standard",
            Form::Compact => "compact",
            Form::Batch => "batch",
            Form::Lines { .. } => "kv lines",
        }
    }
}

const fn sensor(
    sensor_type: &'static str,
    alias: &'static str,
    unit: Option<&'static str>,
    mean: f64,
    swing: f64,
    range: (f64, f64),
) -> Sensor {
    Sensor {
        sensor_type,
        alias,
        unit,
        mean,
        swing,
        range,
    }
}

// SAHOOL's plausible ranges, which the gateway enforces for readings in the default unit.
const MOISTURE: (f64, f64) = (0.0, 100.0);
const SOIL_TEMP: (f64, f64) = (-20.0, 60.0);
const AIR_TEMP: (f64, f64) = (-50.0, 70.0);
const HUMIDITY: (f64, f64) = (0.0, 100.0);
const SOIL_EC: (f64, f64) = (0.0, 20.0);

/// Six MQTT devices on three fields, using all three payload forms.
#[rustfmt::skip] // a table: one sensor per line reads better than rustfmt's one argument per line
pub const FARM: [DeviceSpec; 6] = [
    DeviceSpec {
        id: "soil-probe-01",
        field: "field-north-1",
        form: Form::Standard,
        sensors: &[
            //     SAHOOL type         alias            unit              mean  swing  range
            sensor("soil_moisture",    "vwc",           Some("percent"),  31.0,  4.0,  MOISTURE),
        ],
    },
    DeviceSpec {
        id: "soil-probe-02",
        field: "field-north-1",
        form: Form::Standard,
        sensors: &[
            sensor("soil_temperature", "soil_temp",     Some("C"),        22.0,  3.0,  SOIL_TEMP),
        ],
    },
    DeviceSpec {
        id: "wx-station-1",
        field: "field-south-2",
        form: Form::Compact,
        sensors: &[
            sensor("air_temperature",  "temp",          None,             29.0,  5.0,  AIR_TEMP),
            sensor("air_humidity",     "rh",            None,             42.0, 12.0,  HUMIDITY),
        ],
    },
    DeviceSpec {
        id: "soil-probe-03",
        field: "field-south-2",
        form: Form::Compact,
        sensors: &[
            sensor("soil_moisture",    "moisture",      None,             24.0,  3.0,  MOISTURE),
        ],
    },
    DeviceSpec {
        id: "node-11",
        field: "field-east-3",
        form: Form::Batch,
        sensors: &[
            sensor("soil_moisture",    "soil_moisture", None,             27.0,  5.0,  MOISTURE),
            sensor("soil_temperature", "st",            None,             19.0,  2.0,  SOIL_TEMP),
            sensor("soil_ec",          "ec",            Some("mS/cm"),     1.3,  0.2,  SOIL_EC),
        ],
    },
    DeviceSpec {
        id: "node-12",
        field: "field-east-3",
        form: Form::Batch,
        sensors: &[
            sensor("soil_moisture",    "vwc",           Some("%"),        35.0,  4.0,  MOISTURE),
            sensor("soil_temperature", "soil_temp",     Some("C"),        20.0,  2.5,  SOIL_TEMP),
        ],
    },
];

/// The serial port the soil probe talks on: the `[[serial]]` name and its bindings' `port`.
pub const SERIAL_PORT: &str = "soil-talker";

/// A soil probe on a serial line, printing one `key=value` line per observation.
#[rustfmt::skip]
pub const TALKER: DeviceSpec = DeviceSpec {
    id: "soil-talker-1",
    field: "field-west-4",
    form: Form::Lines { port: SERIAL_PORT },
    sensors: &[
        //     SAHOOL type         key      unit  mean  swing  range
        sensor("soil_moisture",    "vwc",    None, 29.0,  4.0,  MOISTURE),
        sensor("soil_temperature", "soil_t", None, 21.0,  2.0,  SOIL_TEMP),
    ],
};

/// The gateway config: the MQTT devices publish to an `[[mqtt_listener]]` on loopback
/// `listen_port` (no authentication: loopback only), the talker is a `[[serial]]` `lines` port
/// on `serial_path`, and every sensor is on its field. `Gateway::start` adds `[gateway]` and
/// `[http]`.
pub fn gateway_config(nats_url: &str, listen_port: u16, serial_path: &Path) -> String {
    let mut config = format!(
        "[nats]\nservers = [\"{nats_url}\"]\n\n[quality]\n# The simulated devices report far faster than field devices.\n\
         device_rate = 1000.0\ndevice_burst = 1000.0\n\n[[mqtt_listener]]\nname = \"devices\"\n\
         listen = \"127.0.0.1:{listen_port}\"\nauth = \"none\"\ntopics = [\"sahool/sensors/#\"]\nformat = \"sahool\"\n\n\
         [[serial]]\nname = \"{SERIAL_PORT}\"\npath = \"{}\"\nprotocol = \"lines\"\nline_format = \"kv\"\ndevice_id = \"{}\"\n",
        serial_path.display(),
        TALKER.id,
    );
    let devices: Vec<&DeviceSpec> = FARM.iter().chain([&TALKER]).collect();
    let mut fields: Vec<&str> = Vec::new();
    for d in &devices {
        if !fields.contains(&d.field) {
            fields.push(d.field);
        }
    }
    for field in fields {
        let _ = write!(config, "\n[[fields]]\nid = \"{field}\"\n");
        for device in devices.iter().filter(|d| d.field == field) {
            for s in device.sensors {
                let _ = write!(
                    config,
                    "  [[fields.sensors]]\n  device_id = \"{}\"\n  sensor_type = \"{}\"\n",
                    device.id, s.sensor_type
                );
                if let Form::Lines { port } = device.form {
                    let _ = writeln!(
                        config,
                        "  line = {{ port = \"{port}\", key = \"{}\" }}",
                        s.alias
                    );
                }
            }
        }
    }
    config
}

/// One reading a device made: what its event in the stream must carry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReadingKey {
    pub device_id: String,
    pub sensor_type: String,
    /// Observation time, ms since the epoch. Unique per device, so with device and type it
    /// identifies the reading.
    pub at_ms: i64,
}

#[derive(Clone)]
pub struct Published {
    pub input: Input,
    pub key: ReadingKey,
    pub value: f64,
}

/// What a device sends at once: an MQTT message, or a line on its serial port.
pub struct Message {
    /// The MQTT topic; for a serial line, the port's name.
    pub to: String,
    pub payload: Vec<u8>,
    pub readings: Vec<Published>,
}

/// A device's state between observations.
pub struct Device {
    spec: &'static DeviceSpec,
    /// Observation times strictly increase, so no two readings of a sensor share one.
    last_ms: i64,
    battery: f64,
    noise: u64,
}

impl Device {
    pub fn new(spec: &'static DeviceSpec, n: usize) -> Self {
        Self {
            spec,
            last_ms: 0,
            battery: 96.0 - 7.0 * n as f64,
            noise: 0x9E37_79B9_7F4A_7C15 ^ (n as u64 + 1),
        }
    }

    /// What the device sends now: one message per sensor, or one with all of them.
    pub fn publish(&mut self, elapsed: Duration) -> Vec<Message> {
        let spec = self.spec;
        let at_ms = self.next_observation_ms();
        self.battery = (self.battery - 0.0005).max(5.0);
        let battery = round2(self.battery);
        let rssi = -65 - (self.jitter().abs() * 12.0) as i64;
        let values: Vec<(&Sensor, f64)> = spec
            .sensors
            .iter()
            .enumerate()
            .map(|(i, s)| (s, self.value(i, elapsed)))
            .collect();
        let published = |s: &Sensor, value: f64| Published {
            input: spec.input(),
            key: ReadingKey {
                device_id: spec.id.to_string(),
                sensor_type: s.sensor_type.to_string(),
                at_ms,
            },
            value,
        };
        let all = || values.iter().map(|&(s, v)| published(s, v)).collect();
        let message = |to: String, payload: Vec<u8>, readings| Message {
            to,
            payload,
            readings,
        };
        let topic = |s: &Sensor| {
            format!(
                "sahool/sensors/{}/{}/{}",
                spec.id, spec.field, s.sensor_type
            )
        };
        match spec.form {
            Form::Standard => values
                .iter()
                .map(|&(s, v)| {
                    let payload = json!({
                        "device_id": spec.id,
                        "field_id": spec.field,
                        "type": s.alias,
                        "value": v,
                        "unit": s.unit,
                        "timestamp": rfc3339(at_ms),
                        "battery": battery,
                        "rssi": rssi,
                    });
                    message(topic(s), json_bytes(&payload), vec![published(s, v)])
                })
                .collect(),
            Form::Compact => values
                .iter()
                .map(|&(s, v)| {
                    let payload =
                        json!({"d": spec.id, "f": spec.field, "t": s.alias, "v": v, "ts": at_ms});
                    message(topic(s), json_bytes(&payload), vec![published(s, v)])
                })
                .collect(),
            Form::Batch => {
                let items: Vec<Value> = values
                    .iter()
                    .map(|&(s, v)| match s.unit {
                        Some(unit) => json!({"type": s.alias, "value": v, "unit": unit}),
                        None => json!({"type": s.alias, "value": v}),
                    })
                    .collect();
                let payload = json!({
                    "device_id": spec.id,
                    "field_id": spec.field,
                    "timestamp": rfc3339(at_ms),
                    "battery": battery,
                    "readings": items,
                });
                let topic = format!("sahool/sensors/{}/{}", spec.id, spec.field);
                vec![message(topic, json_bytes(&payload), all())]
            }
            Form::Lines { port } => {
                // As an Arduino sketch prints it: `println` ends lines in CR LF.
                let mut line = format!("ts={at_ms}");
                for (s, v) in &values {
                    let _ = write!(line, ",{}={v}", s.alias);
                }
                let _ = write!(line, ",battery={battery}\r\n");
                vec![message(port.to_string(), line.into_bytes(), all())]
            }
        }
    }

    /// Now, in ms since the epoch, but always after the previous reading: the gateway's events
    /// carry the observation time, and the demo finds each reading in the stream by it.
    fn next_observation_ms(&mut self) -> i64 {
        let now_ms = i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
            .expect("the clock is within i64 milliseconds");
        self.last_ms = now_ms.max(self.last_ms + 1);
        self.last_ms
    }

    /// A slow daily-cycle-like wave (compressed to 30 s so it shows) plus a little noise,
    /// rounded to 2 decimals as firmware does, kept inside SAHOOL's range.
    fn value(&mut self, sensor: usize, elapsed: Duration) -> f64 {
        let s = &self.spec.sensors[sensor];
        let phase = sensor as f64 + self.spec.id.len() as f64;
        let wave = (elapsed.as_secs_f64() * std::f64::consts::TAU / 30.0 + phase).sin();
        let v = s.mean + s.swing * (0.9 * wave + 0.1 * self.jitter());
        round2(v.clamp(s.range.0, s.range.1))
    }

    /// Deterministic noise in [-1, 1) (xorshift64): no `rand` dependency for a demo.
    fn jitter(&mut self) -> f64 {
        self.noise ^= self.noise << 13;
        self.noise ^= self.noise >> 7;
        self.noise ^= self.noise << 17;
        (self.noise >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

fn json_bytes(payload: &Value) -> Vec<u8> {
    payload.to_string().into_bytes()
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn rfc3339(ms: i64) -> String {
    sahool_gateway::reading::Timestamp::from_unix_millis(ms).to_rfc3339()
}
