//! The systems compared, each started fresh for every measurement: the gateway fed through a
//! broker or its own listener, and the NATS-native peers (the leaf→hub pair of record, and one
//! nats-server alone). [`SCENARIOS`] is the list the benchmark goes through; a
//! new way of feeding the gateway is one more entry with its own [`Ingest`].

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use crate::leaf::{LeafHub, HUB_STREAM, LEAF_STREAM, LEAF_SUBJECTS};
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
    /// The peer of record: a leaf nats-server on the gateway (MQTT listener, a JetStream
    /// domain of its own, a local stream) and the hub's stream sourcing it over the leaf-node
    /// link ([`crate::leaf`]). With `sync_always`, the leaf fsyncs every write
    /// (`sync_interval: always`), the gateway's durability.
    LeafHub { sync_always: bool },
}

impl System {
    pub fn is_gateway(&self) -> bool {
        matches!(self, Self::Gateway(_))
    }
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
/// gateway's own MQTT ingest listener (no broker), the leaf→hub peer of record (as shipped, and
/// with `sync_interval: always`), and one nats-server alone. The runs go through all of them in
/// turn, so each run interleaves the systems.
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
        key: "leafhub",
        name: "leaf→hub peer",
        label: "peer of record: publisher → leaf MQTT → leaf stream → hub stream",
        system: System::LeafHub { sync_always: false },
    },
    Scenario {
        key: "leafhub_sync",
        name: "leaf→hub peer, sync_interval: always",
        label: "peer of record, leaf with sync_interval: always",
        system: System::LeafHub { sync_always: true },
    },
    Scenario {
        key: "peer",
        name: "single-server peer",
        label: "single server: publisher → nats-server MQTT → JetStream",
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
    /// Where the stream is read: the platform's nats-server, the single peer, or the hub.
    pub nats_url: String,
    nats: Option<Nats>,
    leaf_hub: Option<LeafHub>,
    pub gateway: Option<Gateway>,
    broker: Option<Mosquitto>,
}

impl Running {
    /// The platform's nats-server of a gateway scenario, to stop and start it.
    pub fn nats_mut(&mut self) -> Option<&mut Nats> {
        self.gateway.as_ref().and(self.nats.as_mut())
    }

    /// The process whose memory counts: the gateway, the leaf, or the single peer.
    pub fn pid(&self) -> u32 {
        if let Some(g) = &self.gateway {
            return g.pid().expect("gateway running");
        }
        if let Some(lh) = &self.leaf_hub {
            return lh.leaf.pid();
        }
        self.nats
            .as_ref()
            .and_then(Nats::pid)
            .expect("nats-server running")
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
        if let Some(pid) = self.nats.as_ref().and_then(Nats::pid) {
            all.push(("nats-server", pid));
        }
        if let Some(lh) = &self.leaf_hub {
            all.push((LEAF_PROCESS, lh.leaf.pid()));
            all.push(("hub nats-server", lh.hub.pid()));
        }
        all
    }
}

pub const LEAF_PROCESS: &str = "leaf nats-server";

/// The processes that run on the gateway's box (a Raspberry Pi on the farm): the gateway and
/// the broker feeding it, or the leaf; the single-server peer is all on the box. The platform's
/// nats-server and the hub are not.
pub fn on_box(system: &System, process: &str) -> bool {
    match system {
        System::Gateway(_) => process != "nats-server",
        System::LeafHub { .. } => process == LEAF_PROCESS,
        System::NatsPeer => true,
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
                    nats_url: nats.url(),
                    nats: Some(nats),
                    leaf_hub: None,
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
                    nats_url: nats.url(),
                    nats: Some(nats),
                    leaf_hub: None,
                    gateway: None,
                    broker: None,
                }
            }
            System::LeafHub { sync_always } => {
                let lh = LeafHub::start(*sync_always).await;
                Running {
                    publisher_port: lh.mqtt_port,
                    stream: HUB_STREAM,
                    subject: LEAF_SUBJECTS,
                    // The probe that showed the link up.
                    extra: 1,
                    nats_url: lh.hub.url(),
                    nats: None,
                    leaf_hub: Some(lh),
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
    let js = measure::jetstream(&system.nats_url).await;
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
    if let Some(lh) = &system.leaf_hub {
        // The hub stamps a sourced message when it stores it (a mirror would keep the leaf's
        // stamp): the lag says so, and how far the hub trails the leaf.
        let leaf =
            measure::stream_state(&measure::jetstream(&lh.leaf.url()).await, LEAF_STREAM).await;
        eprintln!(
            "bench: the hub stored the last reading {:.1} ms after the leaf did",
            (measure::ns_of(state.last_timestamp) - measure::ns_of(leaf.last_timestamp)) as f64
                / 1e6
        );
    }
    count as f64 / secs(measure::ns_of(state.last_timestamp) - sent.first_send_ns)
}

/// With `--perf DIR`: where the gateway's profile of each online measurement goes.
pub static PERF_DIR: OnceLock<PathBuf> = OnceLock::new();

/// `perf record` of one process, stopped (SIGINT, so perf writes its file) on `finish`.
struct PerfRecord(std::process::Child);

impl PerfRecord {
    fn start(pid: u32, out: &std::path::Path) -> Self {
        eprintln!("bench: perf record of pid {pid} into {}", out.display());
        let child = std::process::Command::new("perf")
            .args(["record", "-F", "2999", "-p", &pid.to_string(), "-o"])
            .arg(out)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("perf (Debian: apt-get install linux-perf)");
        // perf needs a moment to attach before the load starts.
        std::thread::sleep(Duration::from_millis(500));
        Self(child)
    }

    fn finish(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// Readings/s from the first publish to the moment the stream held the last of `count`.
pub async fn online(scenario: &Scenario, first: u64, count: u64) -> Online {
    let system = scenario.start().await;
    let perf = PERF_DIR.get().zip(system.gateway.as_ref()).map(|(dir, g)| {
        PerfRecord::start(
            g.pid().expect("gateway running"),
            &dir.join(format!("{}.data", scenario.key)),
        )
    });
    let cpu = CpuMeter::start(&system.processes());
    let rate = publish_until_stored(&system, first, count, 0.0).await;
    if let Some(perf) = perf {
        perf.finish();
    }
    Online {
        rate,
        cpu_us: cpu.per_item_us(count),
    }
}

/// Milliseconds from each publish to its arrival in the stream, at a steady `rate`.
pub async fn latency(scenario: &Scenario, first: u64, rate: f64, seconds: u64) -> Vec<f64> {
    let system = scenario.start().await;
    let count = (rate * seconds as f64) as u64;
    let client = async_nats::connect(&system.nats_url)
        .await
        .expect("bench connects to nats-server");
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
