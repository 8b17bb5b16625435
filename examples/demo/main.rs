//! The whole pipeline, live. Simulated SAHOOL devices publish readings over MQTT (QoS 1) to a
//! real mosquitto; the real gateway binary buffers them in SQLite and forwards them to a real
//! nats-server's JetStream. Midway nats-server is stopped for a few seconds, so the buffer fills,
//! then started again, so it drains. At the end the stream is read back and checked: every
//! published reading exactly once, valid against the event contract, in `seq` order.
//!
//! Run `scripts/demo` (installs nats-server and mosquitto when missing), or:
//! `cargo build --release --bin sahool-gateway && cargo run --release --example demo`.
//! Exits non-zero when a check fails.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{json, Value};
use support::{Gateway, Mosquitto, Nats, StreamMessage};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Readings per second, all devices together.
const RATE: f64 = 200.0;
const PUBLISH_FOR: Duration = Duration::from_secs(25);
const OUTAGE_AT: Duration = Duration::from_secs(8);
const OUTAGE_FOR: Duration = Duration::from_secs(6);
/// How long the buffer may take to drain once the devices stop.
const DRAIN_WITHIN: Duration = Duration::from_secs(60);
/// The platform's stream, as `Nats::create_stream` makes it (120 s duplicate window).
const STREAM: &str = "SAHOOL_IOT";

// ---------------------------------------------------------------------------------------------
// The simulated farm
// ---------------------------------------------------------------------------------------------

/// The three payload forms SAHOOL firmware sends (`tests/fixtures/mqtt/sahool-*.json`).
#[derive(Clone, Copy)]
enum Form {
    /// One reading per message, full key names, RFC 3339 time, battery and RSSI.
    Standard,
    /// One reading per message, one-letter keys, epoch time (milliseconds here).
    Compact,
    /// Every sensor of the device in one message on `sahool/sensors/{device}/{field}`.
    Batch,
}

struct Sensor {
    /// SAHOOL's name: used in the config, the topic, and what the event must say.
    sensor_type: &'static str,
    /// What the firmware sends instead (`vwc`, `temp`, ...); the gateway folds it.
    alias: &'static str,
    /// As the firmware spells it; `None` leaves it to SAHOOL's default unit.
    unit: Option<&'static str>,
    /// The value drifts around `mean` by up to `swing`, and never leaves `range`.
    mean: f64,
    swing: f64,
    range: (f64, f64),
}

struct DeviceSpec {
    id: &'static str,
    field: &'static str,
    form: Form,
    sensors: &'static [Sensor],
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

/// Six devices on three fields, using all three payload forms.
#[rustfmt::skip] // a table: one sensor per line reads better than rustfmt's one argument per line
const FARM: [DeviceSpec; 6] = [
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

/// The gateway config for `FARM`: one SAHOOL-format MQTT source, every sensor on its field.
/// `Gateway::start` adds `[gateway]` and `[http]`.
fn gateway_config(nats: &Nats, broker: &Mosquitto) -> String {
    let mut config = format!(
        "[nats]\nservers = [\"{}\"]\n\n[quality]\n# The simulated devices report far faster than field devices.\n\
         device_rate = 1000.0\ndevice_burst = 1000.0\n\n[[mqtt]]\nname = \"farm\"\nurl = \"{}\"\n\
         topics = [\"sahool/sensors/#\"]\nformat = \"sahool\"\n",
        nats.url(),
        broker.url()
    );
    let mut fields: Vec<&str> = Vec::new();
    for d in &FARM {
        if !fields.contains(&d.field) {
            fields.push(d.field);
        }
    }
    for field in fields {
        let _ = write!(config, "\n[[fields]]\nid = \"{field}\"\n");
        for device in FARM.iter().filter(|d| d.field == field) {
            for s in device.sensors {
                let _ = write!(
                    config,
                    "  [[fields.sensors]]\n  device_id = \"{}\"\n  sensor_type = \"{}\"\n",
                    device.id, s.sensor_type
                );
            }
        }
    }
    config
}

/// One reading a device published: what its event in the stream must carry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ReadingKey {
    device_id: String,
    sensor_type: String,
    /// Observation time, ms since the epoch. Unique per device, so with device and type it
    /// identifies the reading.
    at_ms: i64,
}

struct Published {
    key: ReadingKey,
    value: f64,
}

struct Message {
    topic: String,
    payload: Vec<u8>,
    readings: Vec<Published>,
}

impl Message {
    fn new(topic: String, payload: &Value, readings: Vec<Published>) -> Self {
        Self {
            topic,
            payload: payload.to_string().into_bytes(),
            readings,
        }
    }
}

/// A device's state between publishes.
struct Device {
    spec: &'static DeviceSpec,
    /// Observation times strictly increase, so no two readings of a sensor share one.
    last_ms: i64,
    battery: f64,
    noise: u64,
}

impl Device {
    fn new(spec: &'static DeviceSpec, n: usize) -> Self {
        Self {
            spec,
            last_ms: 0,
            battery: 96.0 - 7.0 * n as f64,
            noise: 0x9E37_79B9_7F4A_7C15 ^ (n as u64 + 1),
        }
    }

    /// What the device publishes now: one message per sensor, or one batch with all of them.
    fn publish(&mut self, elapsed: Duration) -> Vec<Message> {
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
            key: ReadingKey {
                device_id: spec.id.to_string(),
                sensor_type: s.sensor_type.to_string(),
                at_ms,
            },
            value,
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
                    Message::new(topic(s), &payload, vec![published(s, v)])
                })
                .collect(),
            Form::Compact => values
                .iter()
                .map(|&(s, v)| {
                    let payload =
                        json!({"d": spec.id, "f": spec.field, "t": s.alias, "v": v, "ts": at_ms});
                    Message::new(topic(s), &payload, vec![published(s, v)])
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
                let readings = values.iter().map(|&(s, v)| published(s, v)).collect();
                let topic = format!("sahool/sensors/{}/{}", spec.id, spec.field);
                vec![Message::new(topic, &payload, readings)]
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

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn rfc3339(ms: i64) -> String {
    sahool_gateway::reading::Timestamp::from_unix_millis(ms).to_rfc3339()
}

// ---------------------------------------------------------------------------------------------
// Publishing
// ---------------------------------------------------------------------------------------------

/// Counters the publisher updates and the progress line reads.
#[derive(Default)]
struct Progress {
    readings: AtomicU64,
    messages: AtomicU64,
    acked: AtomicU64,
}

/// What the devices published, once they have stopped.
struct Outcome {
    readings: Vec<Published>,
    messages: u64,
    acked: u64,
}

/// All devices over one MQTT connection at QoS 1, at `RATE` readings/s for `PUBLISH_FOR`, then
/// waits for the broker's PUBACKs: only acknowledged messages are the gateway's responsibility.
async fn run_devices(broker_port: u16, start: Instant, progress: Arc<Progress>) -> Outcome {
    let mut options = MqttOptions::new("sahool-demo-devices", "127.0.0.1", broker_port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_inflight(100);
    let (client, eventloop) = AsyncClient::new(options, 256);
    let poller = tokio::spawn(count_acks(eventloop, progress.clone()));

    let mut devices: Vec<Device> = FARM
        .iter()
        .enumerate()
        .map(|(n, spec)| Device::new(spec, n))
        .collect();
    let mut readings = Vec::new();
    let mut turn = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while start.elapsed() < PUBLISH_FOR {
        tick.tick().await;
        // Catch up with the schedule rather than count ticks, so late ticks don't lower the rate.
        let due = (start.elapsed().as_secs_f64() * RATE) as usize;
        while readings.len() < due {
            let device = &mut devices[turn % FARM.len()];
            turn += 1;
            for m in device.publish(start.elapsed()) {
                client
                    .publish(m.topic, QoS::AtLeastOnce, false, m.payload)
                    .await
                    .expect("the MQTT client's queue is open");
                progress.messages.fetch_add(1, Ordering::Relaxed);
                progress
                    .readings
                    .fetch_add(m.readings.len() as u64, Ordering::Relaxed);
                readings.extend(m.readings);
            }
        }
    }

    let messages = progress.messages.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while progress.acked.load(Ordering::Relaxed) < messages && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = client.disconnect().await;
    if tokio::time::timeout(Duration::from_secs(2), poller)
        .await
        .is_err()
    {
        eprintln!("MQTT publisher did not disconnect cleanly");
    }
    Outcome {
        readings,
        messages,
        acked: progress.acked.load(Ordering::Relaxed),
    }
}

/// Drives the MQTT connection and counts PUBACKs, until the client disconnects.
async fn count_acks(mut eventloop: rumqttc::EventLoop, progress: Arc<Progress>) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                progress.acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            // rumqttc reconnects on the next poll; unacked messages then count as not published.
            Err(e) => {
                eprintln!("MQTT publisher: {e}; reconnecting");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Watching the gateway
// ---------------------------------------------------------------------------------------------

/// The gateway's own view, from one scrape of `/metrics`.
struct Snapshot {
    accepted: u64,
    buffered: u64,
    forwarded: u64,
    rejected: u64,
    nats_up: bool,
}

fn snapshot(gateway: &Gateway) -> Snapshot {
    let body = gateway
        .get("/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default();
    let metric = |name: &str| support::metric_value(&body, name, "");
    Snapshot {
        accepted: metric("sahool_gateway_readings_accepted_total") as u64,
        buffered: metric("sahool_gateway_buffer_readings") as u64,
        forwarded: metric("sahool_gateway_readings_forwarded_total") as u64,
        rejected: metric("sahool_gateway_readings_rejected_total") as u64,
        nats_up: metric("sahool_gateway_nats_connected") == 1.0,
    }
}

fn print_progress(start: Instant, progress: &Progress, s: &Snapshot) {
    println!(
        "{:>4}s  published {:>5}  accepted {:>5}  buffered {:>5}  forwarded {:>5}  NATS {}",
        start.elapsed().as_secs(),
        progress.readings.load(Ordering::Relaxed),
        s.accepted,
        s.buffered,
        s.forwarded,
        if s.nats_up { "connected" } else { "DOWN" }
    );
}

/// Where the NATS outage stands.
#[derive(PartialEq)]
enum Outage {
    Ahead,
    Ongoing,
    Over,
}

// ---------------------------------------------------------------------------------------------
// Checking the stream
// ---------------------------------------------------------------------------------------------

/// What the stream holds, compared with what the devices published.
struct StreamReport {
    events: usize,
    duplicate_ids: usize,
    /// Published readings with no event carrying their device, type, time and value.
    missing: usize,
    /// Published readings with more than one event (under different ids).
    doubled: usize,
    /// Events that match no published reading.
    unexpected: usize,
    schema_valid: usize,
    first_schema_error: Option<String>,
    seq_increasing: bool,
}

fn check_stream(events: &[StreamMessage], published: &[Published]) -> StreamReport {
    let validator = support::event_validator();
    let mut seen: HashMap<&ReadingKey, (f64, usize)> =
        published.iter().map(|p| (&p.key, (p.value, 0))).collect();
    let mut ids = HashSet::new();
    let (mut duplicate_ids, mut unexpected, mut schema_valid) = (0, 0, 0);
    let mut first_schema_error = None;
    let mut last_seq = 0;
    let mut seq_increasing = true;
    for e in events {
        let errors: Vec<String> = validator
            .iter_errors(&e.body)
            .map(|err| err.to_string())
            .collect();
        if errors.is_empty() {
            schema_valid += 1;
        } else if first_schema_error.is_none() {
            first_schema_error = Some(format!("{errors:?} in {}", e.body));
        }
        if !ids.insert(e.body["event_id"].as_str().unwrap_or_default().to_string()) {
            duplicate_ids += 1;
        }
        // The stream's order must be the buffer's order.
        let seq = e.body["source"]["seq"].as_u64().unwrap_or(0);
        seq_increasing &= seq > last_seq;
        last_seq = seq;
        let hit = reading_key(&e.body["payload"]).and_then(|key| seen.get_mut(&key));
        match hit {
            Some((value, count)) if e.body["payload"]["value"].as_f64() == Some(*value) => {
                *count += 1
            }
            _ => unexpected += 1,
        }
    }
    StreamReport {
        events: events.len(),
        duplicate_ids,
        missing: seen.values().filter(|(_, n)| *n == 0).count(),
        doubled: seen.values().filter(|(_, n)| *n > 1).count(),
        unexpected,
        schema_valid,
        first_schema_error,
        seq_increasing,
    }
}

/// The reading an event's payload describes; `None` if the payload is not a reading at all.
fn reading_key(payload: &Value) -> Option<ReadingKey> {
    let at = OffsetDateTime::parse(payload["timestamp"].as_str()?, &Rfc3339).ok()?;
    Some(ReadingKey {
        device_id: payload["device_id"].as_str()?.to_string(),
        sensor_type: payload["sensor_type"].as_str()?.to_string(),
        at_ms: i64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()?,
    })
}

/// One line of the summary; the demo fails if any line does not hold.
struct Check {
    label: &'static str,
    value: String,
    ok: bool,
}

fn check(label: &'static str, value: impl ToString, ok: bool) -> Check {
    Check {
        label,
        value: value.to_string(),
        ok,
    }
}

/// The demo's verdict, one line per promise of the pipeline.
fn verdict(
    outcome: &Outcome,
    last: &Snapshot,
    drained: bool,
    report: &StreamReport,
    exit_code: Option<i32>,
) -> Vec<Check> {
    let published = outcome.readings.len();
    let all_acked = outcome.acked == outcome.messages;
    let all_accepted = last.accepted == published as u64;
    let all_in_stream = report.events == published;
    let all_valid = report.schema_valid == report.events;
    let clean_exit = exit_code == Some(0);
    let acked = format!("{} / {}", outcome.acked, outcome.messages);
    let valid = format!("{} / {}", report.schema_valid, report.events);
    let in_order = if report.seq_increasing { "yes" } else { "no" };
    let exit = exit_code.map_or("killed by a signal".to_string(), |c| c.to_string());
    let zero = |label, n: usize| check(label, n, n == 0);
    vec![
        check("MQTT messages acked by the broker", acked, all_acked),
        check("readings published (broker-acked)", published, all_acked),
        check(
            "readings accepted by the gateway",
            last.accepted,
            all_accepted,
        ),
        zero("readings rejected by the gateway", last.rejected as usize),
        check("buffer drained", format!("{} left", last.buffered), drained),
        check("events in stream", report.events, all_in_stream),
        zero("duplicate event_ids", report.duplicate_ids),
        zero("readings in stream more than once", report.doubled),
        zero("readings missing from stream", report.missing),
        zero("events matching no published reading", report.unexpected),
        check("events valid against the contract schema", valid, all_valid),
        check(
            "source.seq strictly increasing",
            in_order,
            report.seq_increasing,
        ),
        check("gateway exit code after SIGTERM", exit, clean_exit),
    ]
}

fn print_summary(checks: &[Check]) -> bool {
    println!("\n== Summary ==");
    for c in checks {
        println!(
            "  {:<6} {:<44} {}",
            if c.ok { "ok" } else { "FAIL" },
            c.label,
            c.value
        );
    }
    let passed = checks.iter().all(|c| c.ok);
    println!(
        "\n{}",
        if passed {
            "PASS: every reading reached JetStream exactly once"
        } else {
            "FAIL"
        }
    );
    passed
}

// ---------------------------------------------------------------------------------------------
// The demo
// ---------------------------------------------------------------------------------------------

// Blocking harness calls (metrics scrapes, starting and stopping nats-server) are made straight
// from `main`'s future: it runs on the main thread, the publisher on the runtime's workers.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    stop_children_on_panic();
    let passed = run().await;
    // `run` has returned, so the harness has stopped every process it started.
    std::process::exit(if passed { 0 } else { 1 });
}

async fn run() -> bool {
    println!("== Starting nats-server, mosquitto and the gateway ==");
    let mut nats = Nats::start();
    nats.create_stream(STREAM, &["sahool.iot.>"]).await;
    let broker = Mosquitto::start();
    let mut gateway = Gateway::start(&gateway_config(&nats, &broker));
    gateway.wait_until("MQTT and NATS connected", Duration::from_secs(20), |g| {
        snapshot(g).nats_up && g.metric("sahool_gateway_mqtt_connected", "") == 1.0
    });
    // The gateway subscribes right after CONNACK; give the broker a moment to register it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    print_setup(&nats, &broker, &gateway);

    let progress = Arc::new(Progress::default());
    let start = Instant::now();
    let outcome = publish_through_outage(&mut nats, &gateway, broker.port, start, &progress).await;
    let drained = wait_for_drain(&gateway, start, &progress, outcome.readings.len() as u64).await;
    let last = snapshot(&gateway);

    println!(">>> reading the stream back from JetStream");
    let events = nats.read_readings(STREAM).await;
    let report = check_stream(&events, &outcome.readings);
    println!(">>> stopping the gateway with SIGTERM");
    let exit_code = gateway.terminate();

    if let Some(error) = &report.first_schema_error {
        println!("first contract violation: {error}");
    }
    let passed = print_summary(&verdict(&outcome, &last, drained, &report, exit_code));
    if !passed {
        print_log_tail(&gateway);
    }
    passed
}

fn print_setup(nats: &Nats, broker: &Mosquitto, gateway: &Gateway) {
    println!(
        "  nats-server  {}  (stream {STREAM} on sahool.iot.>)",
        nats.url()
    );
    println!("  mosquitto    {}", broker.url());
    println!(
        "  gateway      http://127.0.0.1:{}/metrics",
        gateway.http_port
    );
    for d in &FARM {
        let types: Vec<&str> = d.sensors.iter().map(|s| s.sensor_type).collect();
        let form = match d.form {
            Form::Standard => "standard",
            Form::Compact => "compact",
            Form::Batch => "batch",
        };
        let (id, field) = (d.id, d.field);
        println!(
            "  device {id:<14} {field:<14} {form:<9} {}",
            types.join(", ")
        );
    }
}

/// Runs the devices to the end, printing progress every second, with nats-server down from
/// `OUTAGE_AT` for `OUTAGE_FOR`.
async fn publish_through_outage(
    nats: &mut Nats,
    gateway: &Gateway,
    broker_port: u16,
    start: Instant,
    progress: &Arc<Progress>,
) -> Outcome {
    println!(
        "\n== Devices publish {RATE} readings/s at QoS 1 for {} s; nats-server is down from {} s to {} s ==",
        PUBLISH_FOR.as_secs(),
        OUTAGE_AT.as_secs(),
        (OUTAGE_AT + OUTAGE_FOR).as_secs()
    );
    let devices = tokio::spawn(run_devices(broker_port, start, progress.clone()));
    let mut outage = Outage::Ahead;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while !devices.is_finished() {
        tick.tick().await;
        if outage == Outage::Ahead && start.elapsed() >= OUTAGE_AT {
            nats.stop();
            outage = Outage::Ongoing;
            println!(
                ">>> nats-server stopped: the gateway keeps acking MQTT and buffers in SQLite"
            );
        } else if outage == Outage::Ongoing && start.elapsed() >= OUTAGE_AT + OUTAGE_FOR {
            nats.resume();
            outage = Outage::Over;
            println!(">>> nats-server started again: the gateway reconnects and drains the buffer");
        }
        print_progress(start, progress, &snapshot(gateway));
    }
    let outcome = devices.await.expect("the device simulation finished");
    println!(
        ">>> devices stopped: {} readings in {} MQTT messages",
        outcome.readings.len(),
        outcome.messages
    );
    outcome
}

/// Waits until the gateway has forwarded every published reading and its buffer is empty,
/// printing progress; false if that takes longer than `DRAIN_WITHIN`.
async fn wait_for_drain(
    gateway: &Gateway,
    start: Instant,
    progress: &Progress,
    published: u64,
) -> bool {
    let deadline = Instant::now() + DRAIN_WITHIN;
    loop {
        let s = snapshot(gateway);
        print_progress(start, progress, &s);
        if s.buffered == 0 && s.forwarded >= published {
            println!(">>> buffer drained");
            return true;
        }
        if Instant::now() >= deadline {
            println!(">>> buffer not drained after {} s", DRAIN_WITHIN.as_secs());
            return false;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn print_log_tail(gateway: &Gateway) {
    let log = gateway.log();
    let lines: Vec<&str> = log.lines().collect();
    println!("\n--- last lines of the gateway log ---");
    for line in &lines[lines.len().saturating_sub(30)..] {
        println!("{line}");
    }
}

/// The release profile aborts on panic, which skips the harness's `Drop`s that stop
/// nats-server, mosquitto and the gateway. Kill this process's children in the panic hook so a
/// failed demo leaves nothing running.
fn stop_children_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        for pid in child_pids() {
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg(&pid)
                .status();
        }
    }));
}

/// Children of every thread of this process (Linux lists them per thread under /proc).
fn child_pids() -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|pids| {
            pids.split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}
