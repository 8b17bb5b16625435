//! Prometheus metrics, one registry per process. Counters get the `_total` suffix from the
//! encoder, so `readings_accepted` is exported as `sahool_gateway_readings_accepted_total`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::common::status::ConfigStatus;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

/// One Modbus request's slave and outcome (`ok` or a fault reason).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ModbusRequestLabel {
    pub port: String,
    pub unit: u8,
    pub outcome: &'static str,
}

/// One SDI-12 measurement's sensor and outcome (`ok` or a fault reason).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Sdi12MeasurementLabel {
    pub port: String,
    pub address: String,
    pub outcome: &'static str,
}

/// One firmware frame's port and what became of it (see [`Metrics::serial_frame`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FrameOutcomeLabel {
    pub port: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabel {
    pub port: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PortReasonLabel {
    pub port: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ListenerReasonLabel {
    pub listener: String,
    pub reason: String,
}

/// A command result's status (`accepted`, `applied`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CommandStatusLabel {
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ActuatorLabel {
    pub actuator: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn puback_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
    ])
}

pub struct Metrics {
    registry: Registry,
    pub(crate) readings_accepted: Counter,
    pub(crate) readings_forwarded: Counter,
    pub(crate) readings_rejected: Family<ReasonLabel, Counter>,
    pub(crate) readings_dropped: Family<ReasonLabel, Counter>,
    pub(crate) buffer_readings: Gauge,
    pub(crate) buffer_bytes: Gauge,
    /// Thinning sweeps over the buffer begun (`when_full = "thin"`).
    pub(crate) buffer_thin_passes: Counter,
    pub(crate) buffer_oldest_age_seconds: Gauge,
    pub dead_letters: Gauge,
    pub nats_connected: Gauge,
    pub(crate) nats_publish_errors: Family<ReasonLabel, Counter>,
    pub(crate) intake_paused: Gauge,
    pub(crate) store_commits: Counter,
    pub(crate) store_commit_seconds: Histogram,
    pub(crate) store_corruption_recovered: Counter,
    /// Every MQTT source started since start, for `/status`.
    mqtt_sources: Mutex<BTreeSet<String>>,
    pub(crate) mqtt_connected: Family<SourceLabel, Gauge>,
    pub(crate) mqtt_messages: Family<SourceLabel, Counter>,
    pub(crate) mqtt_duplicates: Family<SourceLabel, Counter>,
    pub(crate) readings_duplicates: Counter,
    pub(crate) timestamps_replaced: Counter,
    /// Readings stored only after a wait for their flood budget (the sender was slowed).
    pub(crate) readings_paced: Counter,
    /// Dead-letters the `dead_letter_max` bound removed (their inputs are gone for good).
    pub(crate) dead_letters_evicted: Counter,
    pub status_events: Counter,
    pub(crate) modbus_requests: Family<ModbusRequestLabel, Counter>,
    pub(crate) sdi12_measurements: Family<Sdi12MeasurementLabel, Counter>,
    pub(crate) serial_port_up: Family<PortLabel, Gauge>,
    pub(crate) serial_reconnects: Family<PortLabel, Counter>,
    pub(crate) serial_bytes: Family<PortLabel, Counter>,
    pub(crate) serial_messages: Family<PortLabel, Counter>,
    pub(crate) serial_errors: Family<PortReasonLabel, Counter>,
    pub(crate) serial_frames: Family<FrameOutcomeLabel, Counter>,
    /// Each running serial port's state for `/readyz`: `Ok(())` up, `Err(why)` not.
    serial_states: Mutex<BTreeMap<String, Result<(), String>>>,
    store_healthy: AtomicBool,
    stream_found: AtomicBool,
    /// When the forwarder's loop last went round, for the watchdog.
    forwarder_beat: Mutex<Instant>,
    /// Whether the last progress check passed (the watchdog was fed), for remote config's
    /// probation.
    pipeline_progressing: AtomicBool,
    /// Why the NATS link last failed (never a secret), shown by `/readyz` while disconnected.
    nats_problem: Mutex<Option<String>>,
    /// The commands consumer's state with `[commands]` enabled, for `/readyz` and `status`.
    commands_consumer: Mutex<Option<Result<(), String>>>,
    /// The running config's origin, for `status` and `/status`.
    config: Mutex<Option<ConfigStatus>>,
    pub(crate) listener_connections_open: Family<ListenerLabel, Gauge>,
    pub(crate) listener_connections: Family<ListenerLabel, Counter>,
    pub(crate) listener_publishes: Family<ListenerLabel, Counter>,
    pub(crate) listener_puback_seconds: HistogramFamily<ListenerLabel>,
    pub(crate) listener_rejects: Family<ListenerReasonLabel, Counter>,
    /// `listener_rejects` summed over reasons, for `/status` (not exported).
    listener_rejects_all: Family<ListenerLabel, Counter>,
    /// Each configured listener: whether its socket is bound (for `/readyz`).
    listeners_bound: Mutex<BTreeMap<String, bool>>,
    /// Command results committed, by status (DESIGN §8).
    commands: Family<CommandStatusLabel, Counter>,
    /// 1 while a switch is confirmed on, 0 while confirmed off; absent while unknown.
    actuator_on: Family<ActuatorLabel, Gauge>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sahool_gateway");
        let m = Self {
            readings_accepted: Counter::default(),
            readings_forwarded: Counter::default(),
            readings_rejected: Family::default(),
            readings_dropped: Family::default(),
            buffer_readings: Gauge::default(),
            buffer_bytes: Gauge::default(),
            buffer_thin_passes: Counter::default(),
            buffer_oldest_age_seconds: Gauge::default(),
            dead_letters: Gauge::default(),
            nats_connected: Gauge::default(),
            nats_publish_errors: Family::default(),
            intake_paused: Gauge::default(),
            store_commits: Counter::default(),
            store_commit_seconds: Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0,
            ]),
            store_corruption_recovered: Counter::default(),
            mqtt_sources: Mutex::new(BTreeSet::new()),
            mqtt_connected: Family::default(),
            mqtt_messages: Family::default(),
            mqtt_duplicates: Family::default(),
            readings_duplicates: Counter::default(),
            timestamps_replaced: Counter::default(),
            readings_paced: Counter::default(),
            dead_letters_evicted: Counter::default(),
            status_events: Counter::default(),
            modbus_requests: Family::default(),
            sdi12_measurements: Family::default(),
            serial_port_up: Family::default(),
            serial_reconnects: Family::default(),
            serial_bytes: Family::default(),
            serial_messages: Family::default(),
            serial_errors: Family::default(),
            serial_frames: Family::default(),
            serial_states: Mutex::new(BTreeMap::new()),
            store_healthy: AtomicBool::new(false),
            stream_found: AtomicBool::new(false),
            forwarder_beat: Mutex::new(Instant::now()),
            pipeline_progressing: AtomicBool::new(true),
            nats_problem: Mutex::new(None),
            commands_consumer: Mutex::new(None),
            config: Mutex::new(None),
            listener_connections_open: Family::default(),
            listener_connections: Family::default(),
            listener_publishes: Family::default(),
            listener_puback_seconds: Family::new_with_constructor(puback_histogram),
            listener_rejects: Family::default(),
            listener_rejects_all: Family::default(),
            listeners_bound: Mutex::new(BTreeMap::new()),
            commands: Family::default(),
            actuator_on: Family::default(),
            registry: Registry::default(),
        };
        m.register_pipeline(&mut registry);
        m.register_nats(&mut registry);
        m.register_mqtt(&mut registry);
        m.register_serial(&mut registry);
        m.register_listener(&mut registry);
        m.register_downlink(&mut registry);
        Self { registry, ..m }
    }

    /// Readings through the pipeline: intake, buffer, store and dead-letters.
    fn register_pipeline(&self, registry: &mut Registry) {
        registry.register(
            "readings_accepted",
            "Readings committed to the buffer",
            self.readings_accepted.clone(),
        );
        registry.register(
            "readings_forwarded",
            "Readings acknowledged by JetStream and removed from the buffer",
            self.readings_forwarded.clone(),
        );
        registry.register(
            "readings_rejected",
            "Inputs rejected, by reason (kept in dead-letters)",
            self.readings_rejected.clone(),
        );
        registry.register(
            "readings_dropped",
            "Buffered readings dropped, by reason",
            self.readings_dropped.clone(),
        );
        registry.register(
            "buffer_thin_passes",
            "Thinning sweeps over the buffer begun at its bound (when_full = thin); each at most doubles the gaps in a sensor's readings",
            self.buffer_thin_passes.clone(),
        );
        registry.register(
            "buffer_readings",
            "Readings waiting in the buffer",
            self.buffer_readings.clone(),
        );
        registry.register(
            "buffer_bytes",
            "Bytes of readings waiting in the buffer",
            self.buffer_bytes.clone(),
        );
        registry.register(
            "buffer_oldest_age_seconds",
            "Age of the oldest buffered reading",
            self.buffer_oldest_age_seconds.clone(),
        );
        registry.register(
            "dead_letters",
            "Rows in the dead-letter table",
            self.dead_letters.clone(),
        );
        registry.register(
            "intake_paused",
            "1 while intake is paused (buffer full with reject_new, or disk reserve reached)",
            self.intake_paused.clone(),
        );
        registry.register(
            "store_commits",
            "SQLite transactions committed",
            self.store_commits.clone(),
        );
        registry.register(
            "store_commit_seconds",
            "Time to commit one group of writes, fsync included",
            self.store_commit_seconds.clone(),
        );
        registry.register(
            "store_corruption_recovered",
            "Times a corrupt buffer file was moved aside and a fresh one started",
            self.store_corruption_recovered.clone(),
        );
        registry.register(
            "readings_duplicates",
            "Readings already stored from the same device observation (device, type, time)",
            self.readings_duplicates.clone(),
        );
        registry.register(
            "dead_letters_evicted",
            "Dead-letters removed by the dead_letter_max bound, oldest first: their inputs cannot be replayed any more",
            self.dead_letters_evicted.clone(),
        );
        registry.register(
            "readings_paced",
            "Readings that waited for their device's or source's flood budget before being stored (their sender was slowed down, nothing dropped)",
            self.readings_paced.clone(),
        );
        registry.register("timestamps_replaced", "Implausible observation times replaced by the receive time (kept as metadata.original_timestamp)", self.timestamps_replaced.clone());
        registry.register(
            "status_events",
            "Sensor connected / disconnected / low-battery events buffered",
            self.status_events.clone(),
        );
    }

    /// The NATS link.
    fn register_nats(&self, registry: &mut Registry) {
        registry.register(
            "nats_connected",
            "1 while connected to a NATS server",
            self.nats_connected.clone(),
        );
        registry.register(
            "nats_publish_errors",
            "Failed JetStream publishes, by reason",
            self.nats_publish_errors.clone(),
        );
    }

    /// MQTT broker sessions.
    fn register_mqtt(&self, registry: &mut Registry) {
        registry.register(
            "mqtt_connected",
            "1 while connected to the MQTT broker",
            self.mqtt_connected.clone(),
        );
        registry.register(
            "mqtt_messages",
            "MQTT messages received",
            self.mqtt_messages.clone(),
        );
        registry.register(
            "mqtt_duplicates",
            "MQTT redeliveries of messages already committed",
            self.mqtt_duplicates.clone(),
        );
    }

    /// Serial ports and their protocol engines.
    fn register_serial(&self, registry: &mut Registry) {
        registry.register(
            "modbus_requests",
            "Modbus RTU requests, by port, slave and outcome (ok, timeout, crc, exception, unexpected)",
            self.modbus_requests.clone(),
        );
        registry.register(
            "sdi12_measurements",
            "SDI-12 measurements, by port, sensor address and outcome",
            self.sdi12_measurements.clone(),
        );
        registry.register(
            "serial_port_up",
            "1 while the serial port is open",
            self.serial_port_up.clone(),
        );
        registry.register(
            "serial_reconnects",
            "Serial ports opened again after they were lost",
            self.serial_reconnects.clone(),
        );
        registry.register(
            "serial_bytes_received",
            "Bytes read from the serial port",
            self.serial_bytes.clone(),
        );
        registry.register(
            "serial_messages_received",
            "Lines, frames or responses received on the serial port",
            self.serial_messages.clone(),
        );
        registry.register(
            "serial_errors",
            "Serial port faults and protocol errors, by reason",
            self.serial_errors.clone(),
        );
        registry.register(
            "serial_frames",
            "Firmware frames on frames ports, by outcome: stored and duplicate (acked), refused (buffer full) and failed (commit failed) not acked but resent by the node, bad (did not decode, never acked)",
            self.serial_frames.clone(),
        );
    }

    /// The built-in MQTT listeners.
    fn register_listener(&self, registry: &mut Registry) {
        registry.register(
            "mqtt_listener_connections_open",
            "Connections open on each MQTT listener",
            self.listener_connections_open.clone(),
        );
        registry.register(
            "mqtt_listener_connections",
            "Connections accepted by each MQTT listener (CONNACK sent)",
            self.listener_connections.clone(),
        );
        registry.register(
            "mqtt_listener_publishes",
            "PUBLISH packets received by each MQTT listener",
            self.listener_publishes.clone(),
        );
        registry.register(
            "mqtt_listener_puback_seconds",
            "From a PUBLISH arriving to its PUBACK (the commit included)",
            self.listener_puback_seconds.clone(),
        );
        registry.register(
            "mqtt_listener_rejects",
            "Connections and packets an MQTT listener refused, by reason (auth, oversize, subscribe, protocol, too_many_connections, topic, tls)",
            self.listener_rejects.clone(),
        );
    }

    /// Platform commands to actuators.
    fn register_downlink(&self, registry: &mut Registry) {
        registry.register(
            "commands",
            "Command results committed to the outbox, by status (accepted, applied, failed, rejected, expired, superseded, switched_off)",
            self.commands.clone(),
        );
        registry.register(
            "actuator_on",
            "1 while a switch actuator is confirmed on, 0 while confirmed off (absent while unknown)",
            self.actuator_on.clone(),
        );
    }

    /// Counts a command result once it is committed.
    pub fn count_command(&self, status: crate::downlink::Status) {
        self.commands
            .get_or_create(&CommandStatusLabel {
                status: status.as_str(),
            })
            .inc();
    }

    /// A switch's confirmed state: `Some(on)`, or `None` when unknown or removed by a reload.
    pub fn set_actuator_on(&self, actuator: &str, on: Option<bool>) {
        let label = ActuatorLabel {
            actuator: actuator.into(),
        };
        match on {
            Some(on) => {
                self.actuator_on.get_or_create(&label).set(i64::from(on));
            }
            None => {
                self.actuator_on.remove(&label);
            }
        }
    }

    pub fn listener(&self, listener: &str) -> ListenerLabel {
        ListenerLabel {
            listener: listener.into(),
        }
    }

    /// Counts one refusal by a listener.
    pub(crate) fn count_listener_reject(&self, listener: &str, reason: &str) {
        self.listener_rejects
            .get_or_create(&ListenerReasonLabel {
                listener: listener.into(),
                reason: reason.into(),
            })
            .inc();
        self.listener_rejects_all
            .get_or_create(&self.listener(listener))
            .inc();
    }

    /// A listener's refusals since start, every reason.
    pub(crate) fn listener_rejects_total(&self, listener: &str) -> u64 {
        self.listener_rejects_all
            .get(&self.listener(listener))
            .map_or(0, |c| c.get())
    }

    /// Records whether a configured listener's socket is bound; `None` forgets a removed one.
    pub(crate) fn set_listener_bound(&self, listener: &str, bound: Option<bool>) {
        if let Ok(mut m) = self.listeners_bound.lock() {
            match bound {
                Some(b) => {
                    m.insert(listener.to_string(), b);
                }
                None => {
                    m.remove(listener);
                }
            }
        }
    }

    /// Every configured listener and whether it is bound.
    pub(crate) fn listeners_bound(&self) -> Vec<(String, bool)> {
        self.listeners_bound
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }

    pub fn rejected(&self, reason: &str) -> Counter {
        self.readings_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .clone()
    }

    pub fn dropped(&self, reason: &str) -> Counter {
        self.readings_dropped
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .clone()
    }

    /// The label of an MQTT source that starts, remembered for [`Metrics::mqtt_sources`].
    pub(crate) fn mqtt_source(&self, source: &str) -> SourceLabel {
        if let Ok(mut s) = self.mqtt_sources.lock() {
            s.insert(source.to_string());
        }
        self.source(source)
    }

    /// Every MQTT source started since start, by name.
    pub(crate) fn mqtt_sources(&self) -> Vec<String> {
        self.mqtt_sources
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn source(&self, source: &str) -> SourceLabel {
        SourceLabel {
            source: source.into(),
        }
    }

    pub fn modbus_request(&self, port: &str, unit: u8, outcome: &'static str) -> Counter {
        self.modbus_requests
            .get_or_create(&ModbusRequestLabel {
                port: port.into(),
                unit,
                outcome,
            })
            .clone()
    }

    pub fn sdi12_measurement(&self, port: &str, address: char, outcome: &'static str) -> Counter {
        self.sdi12_measurements
            .get_or_create(&Sdi12MeasurementLabel {
                port: port.into(),
                address: address.into(),
                outcome,
            })
            .clone()
    }

    /// Readings dropped for `reason` since start.
    pub(crate) fn dropped_total(&self, reason: &str) -> u64 {
        self.readings_dropped
            .get(&ReasonLabel {
                reason: reason.into(),
            })
            .map_or(0, |c| c.get())
    }

    pub fn port(&self, port: &str) -> PortLabel {
        PortLabel { port: port.into() }
    }

    pub(crate) fn serial_error(&self, port: &str, reason: &str) -> Counter {
        self.serial_errors
            .get_or_create(&PortReasonLabel {
                port: port.into(),
                reason: reason.into(),
            })
            .clone()
    }

    /// `serial_frames_total{port, outcome}`: `stored` and `duplicate` (acked), `refused`
    /// (buffer full) and `failed` (commit failed), not acked and resent by the node, and `bad`.
    pub(crate) fn serial_frame(&self, port: &str, outcome: &'static str) -> Counter {
        self.serial_frames
            .get_or_create(&FrameOutcomeLabel {
                port: port.into(),
                outcome,
            })
            .clone()
    }

    /// Records a serial port as up (`Ok`) or not (`Err(why)`), for `/readyz` and the gauge.
    pub(crate) fn set_serial_state(&self, port: &str, state: Result<(), String>) {
        self.serial_port_up
            .get_or_create(&self.port(port))
            .set(i64::from(state.is_ok()));
        if let Ok(mut states) = self.serial_states.lock() {
            states.insert(port.to_string(), state);
        }
    }

    /// A serial port that no longer runs (stopped, or removed by a reload).
    pub(crate) fn forget_serial_port(&self, port: &str) {
        self.serial_port_up.remove(&self.port(port));
        if let Ok(mut states) = self.serial_states.lock() {
            states.remove(port);
        }
    }

    /// Every running serial port's state, by name.
    pub(crate) fn serial_states(&self) -> Vec<(String, Result<(), String>)> {
        self.serial_states.lock().map_or_else(
            |_| Vec::new(),
            |s| s.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        )
    }

    pub(crate) fn set_store_healthy(&self, ok: bool) {
        self.store_healthy.store(ok, Ordering::Relaxed);
    }

    pub(crate) fn store_healthy(&self) -> bool {
        self.store_healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn set_stream_found(&self, ok: bool) {
        self.stream_found.store(ok, Ordering::Relaxed);
    }

    pub(crate) fn stream_found(&self) -> bool {
        self.stream_found.load(Ordering::Relaxed)
    }

    pub(crate) fn beat_forwarder(&self) {
        if let Ok(mut t) = self.forwarder_beat.lock() {
            *t = Instant::now();
        }
    }

    pub(crate) fn set_pipeline_progressing(&self, progressing: bool) {
        self.pipeline_progressing
            .store(progressing, Ordering::Relaxed);
    }

    pub(crate) fn pipeline_progressing(&self) -> bool {
        self.pipeline_progressing.load(Ordering::Relaxed)
    }

    pub(crate) fn forwarder_idle_for(&self) -> Duration {
        self.forwarder_beat
            .lock()
            .map_or(Duration::MAX, |t| t.elapsed())
    }

    pub(crate) fn nats_is_connected(&self) -> bool {
        self.nats_connected.get() == 1
    }

    pub(crate) fn set_nats_problem(&self, problem: Option<String>) {
        if let Ok(mut p) = self.nats_problem.lock() {
            *p = problem;
        }
    }

    pub(crate) fn nats_problem(&self) -> Option<String> {
        self.nats_problem.lock().ok().and_then(|p| p.clone())
    }

    /// Prometheus text exposition.
    pub(crate) fn set_commands_consumer(&self, state: Option<Result<(), String>>) {
        *self
            .commands_consumer
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = state;
    }

    pub(crate) fn set_config(&self, config: ConfigStatus) {
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = Some(config);
    }

    pub(crate) fn config(&self) -> Option<ConfigStatus> {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn commands_consumer(&self) -> Option<Result<(), String>> {
        self.commands_consumer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Sum of a metric's samples in Prometheus text whose labels contain `labels` (e.g.
/// `source="farm"`, or "" for all). Used by the tests, which read `/metrics`.
pub fn sample(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (metric, rest) = key.split_once('{').unwrap_or((key, ""));
            (metric == name && rest.contains(labels)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downlink_metrics_are_exported() {
        let m = Metrics::new();
        m.count_command(crate::downlink::Status::Applied);
        m.count_command(crate::downlink::Status::Applied);
        m.set_actuator_on("pump-1", Some(true));
        m.set_actuator_on("valve-3", Some(false));
        let text = m.encode();
        let commands = "sahool_gateway_commands_total";
        assert_eq!(sample(&text, commands, r#"status="applied""#), 2.0);
        assert_eq!(sample(&text, "sahool_gateway_actuator_on", "pump-1"), 1.0);
        m.set_actuator_on("pump-1", None);
        assert!(!m.encode().contains("pump-1"), "an unknown state is absent");
    }
}
