//! The systems compared, each started fresh for every measurement: the gateway fed through a
//! broker, and the NATS-native peer. [`SCENARIOS`] is the list the benchmark goes through; a
//! new way of feeding the gateway is one more entry with its own [`Ingest`].

use std::time::Duration;

use crate::measure::{self, secs, wait_stream, Arrivals, CpuMeter, PeakRss};
use crate::publisher::{read_send_log, Job, Publisher};
use crate::support::{free_port, wait_for_port, Gateway, Mosquitto, Nats};

/// The platform's stream, as the gateway publishes to it.
pub const GATEWAY_STREAM: &str = "SAHOOL_IOT";
pub const GATEWAY_SUBJECT: &str = "sahool.iot.sensor.reading";
/// The peer's stream: every MQTT topic under `sahool/sensors/` (NATS maps `/` to `.`).
const PEER_STREAM: &str = "PEER";
const PEER_SUBJECTS: &str = "sahool.sensors.>";

pub struct Scenario {
    /// Short name, in JSON keys.
    pub key: &'static str,
    /// What it is, in a few words, and the whole path for its throughput row.
    pub name: &'static str,
    pub label: &'static str,
    pub system: System,
}

pub enum System {
    /// The gateway binary, with readings coming in as `Ingest` says.
    Gateway(Ingest),
    /// nats-server with its MQTT listener and a JetStream stream capturing the MQTT subjects.
    NatsPeer,
}

/// How the publisher's readings reach the gateway.
pub struct Ingest {
    /// Whether a mosquitto broker stands between publisher and gateway (the gateway's
    /// `[[mqtt]]` client mode). Without one, the publisher connects straight to the port the
    /// gateway listens on.
    pub broker: bool,
    /// The gateway config section that takes readings in, given the port the publisher
    /// connects to (the broker's, or the one the gateway is to listen on).
    pub section: fn(publisher_port: u16) -> String,
}

/// Every system the benchmark compares, in table order: the gateway fed through a broker, the
/// gateway's own MQTT ingest listener (no broker), and the NATS-native peer.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        key: "gateway",
        name: "gateway via mosquitto",
        label: "gateway: publisher → mosquitto → [[mqtt]] → SQLite → JetStream",
        system: System::Gateway(Ingest {
            broker: true,
            section: mqtt_client_section,
        }),
    },
    Scenario {
        key: "listener",
        name: "gateway listener",
        label: "gateway: publisher → [[mqtt_listener]] → SQLite → JetStream",
        system: System::Gateway(Ingest {
            broker: false,
            section: mqtt_listener_section,
        }),
    },
    Scenario {
        key: "peer",
        name: "peer",
        label: "peer: publisher → nats-server MQTT → JetStream",
        system: System::NatsPeer,
    },
];

fn mqtt_client_section(port: u16) -> String {
    format!(
        r#"[[mqtt]]
name = "farm"
url = "mqtt://127.0.0.1:{port}"
topics = ["sahool/sensors/#"]
format = "sahool"
"#
    )
}

fn mqtt_listener_section(port: u16) -> String {
    format!(
        r#"[[mqtt_listener]]
name = "devices"
listen = "127.0.0.1:{port}"
auth = "none"
topics = ["sahool/sensors/#"]
format = "sahool"
max_in_flight = 256
"#
    )
}

/// The gateway's config (the harness adds `[gateway]` and `[http]`): product defaults, except
/// that one probe stands in for a farm's traffic, so flood limits are lifted for it.
pub fn gateway_config(nats_url: &str, ingest: &str) -> String {
    format!(
        r#"
[nats]
servers = ["{nats}"]

[buffer]
min_free_disk = "1MiB"

[quality]
device_rate = 1000000.0
device_burst = 1000000.0
source_rate = 1000000.0
source_burst = 1000000.0

{ingest}

[[fields]]
id = "field-1"
  [[fields.sensors]]
  device_id = "probe-1"
  sensor_type = "water_level"
"#,
        nats = nats_url
    )
}

/// A system up and waiting for the publisher.
pub struct Running {
    pub publisher_port: u16,
    pub stream: &'static str,
    pub subject: &'static str,
    /// Messages the stream gets besides the readings: the gateway's liveness event
    /// (`sensor.connected`) for the probe.
    pub extra: u64,
    pub nats: Nats,
    pub gateway: Option<Gateway>,
    broker: Option<Mosquitto>,
}

impl Running {
    /// The process whose memory counts: the gateway, or the peer's nats-server.
    pub fn pid(&self) -> u32 {
        match &self.gateway {
            Some(g) => g.pid(),
            None => self.nats.pid(),
        }
        .expect("system process running")
    }

    /// Every process of the system, by name.
    pub fn processes(&self) -> Vec<(&'static str, u32)> {
        let mut all = Vec::new();
        if let Some(pid) = self.gateway.as_ref().and_then(Gateway::pid) {
            all.push(("gateway", pid));
        }
        if let Some(pid) = self.broker.as_ref().and_then(Mosquitto::pid) {
            all.push(("mosquitto", pid));
        }
        if let Some(pid) = self.nats.pid() {
            all.push(("nats-server", pid));
        }
        all
    }
}

/// Readings/s, and CPU per reading of each process of the system.
pub struct Online {
    pub rate: f64,
    pub cpu_us: Vec<(&'static str, f64)>,
}

impl Scenario {
    pub async fn start(&self) -> Running {
        match &self.system {
            System::Gateway(ingest) => {
                let nats = Nats::with_platform_stream().await;
                let broker = ingest.broker.then(Mosquitto::start);
                let publisher_port = broker.as_ref().map_or_else(free_port, |b| b.port);
                let config = gateway_config(&nats.url(), &(ingest.section)(publisher_port));
                let gateway = Gateway::start(&config);
                // Readings are timed from the first publish: the NATS link must be up by then.
                gateway.wait_until("NATS connected", Duration::from_secs(20), |g| {
                    g.metric("sahool_gateway_nats_connected", "") >= 1.0
                });
                if broker.is_some() {
                    gateway.wait_subscribed(1).await;
                } else {
                    wait_for_port(publisher_port, Duration::from_secs(20));
                }
                Running {
                    publisher_port,
                    stream: GATEWAY_STREAM,
                    subject: GATEWAY_SUBJECT,
                    extra: 1,
                    nats,
                    gateway: Some(gateway),
                    broker,
                }
            }
            System::NatsPeer => {
                let mqtt_port = free_port();
                let nats = Nats::start_with(&format!(
                    "server_name: bench_peer\nmqtt {{ listen: \"127.0.0.1:{mqtt_port}\" }}"
                ));
                wait_for_port(mqtt_port, Duration::from_secs(20));
                nats.create_stream(PEER_STREAM, &[PEER_SUBJECTS]).await;
                Running {
                    publisher_port: mqtt_port,
                    stream: PEER_STREAM,
                    subject: PEER_SUBJECTS,
                    extra: 0,
                    nats,
                    gateway: None,
                    broker: None,
                }
            }
        }
    }
}

/// Publishes `count` readings (at `rate`, or as fast as they go with 0) and waits until the
/// stream holds them all; returns readings/s from the first publish to the last one stored.
async fn publish_until_stored(system: &Running, first: u64, count: u64, rate: f64) -> f64 {
    let js = measure::jetstream(&system.nats.url()).await;
    let publisher = Publisher::spawn(&Job {
        port: system.publisher_port,
        first,
        count,
        rate,
        send_log: None,
    });
    let sent = publisher.finish().await;
    let within = Duration::from_secs(600);
    let state = wait_stream(&js, system.stream, count + system.extra, within).await;
    count as f64 / secs(measure::ns_of(state.last_timestamp) - sent.first_send_ns)
}

/// Readings/s from the first publish to the moment the stream held the last of `count`.
pub async fn online(scenario: &Scenario, first: u64, count: u64) -> Online {
    let system = scenario.start().await;
    let cpu = CpuMeter::start(&system.processes());
    let rate = publish_until_stored(&system, first, count, 0.0).await;
    Online {
        rate,
        cpu_us: cpu.per_item_us(count),
    }
}

/// Milliseconds from each publish to its arrival in the stream, at a steady `rate`.
pub async fn latency(scenario: &Scenario, first: u64, rate: f64, seconds: u64) -> Vec<f64> {
    let system = scenario.start().await;
    let count = (rate * seconds as f64) as u64;
    let client = system.nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let arrivals =
        Arrivals::watch(&js, &client, system.stream, system.subject, count as usize).await;
    let log_dir = tempfile::tempdir().expect("tempdir");
    let log = log_dir.path().join("sent");
    let publisher = Publisher::spawn(&Job {
        port: system.publisher_port,
        first,
        count,
        rate,
        send_log: Some(log.clone()),
    });
    publisher.finish().await;
    let sent = read_send_log(&log);
    let arrived = arrivals.finish().await;
    arrived
        .iter()
        .map(|(index, at)| {
            let k = usize::try_from(index - first).expect("index");
            (at - sent[k]) as f64 / 1e6
        })
        .collect()
}

pub struct Steady {
    pub peak_rss_mib: f64,
    pub rate: f64,
}

/// Peak RSS of the system's process while readings come at a steady `rate`.
pub async fn steady(scenario: &Scenario, first: u64, rate: f64, seconds: u64) -> Steady {
    let system = scenario.start().await;
    let rss = PeakRss::start(system.pid());
    let rate = publish_until_stored(&system, first, (rate * seconds as f64) as u64, rate).await;
    Steady {
        peak_rss_mib: rss.finish(),
        rate,
    }
}
