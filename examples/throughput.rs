//! Whole-pipeline throughput: MQTT QoS 1 in → committed → JetStream PubAck, with real
//! mosquitto and nats-server on loopback. Prints readings/s; asserts nothing about speed.
//!
//! `cargo run --release --example throughput -- [READINGS]` (default 50,000)

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{publish_all, Gateway, Mosquitto, Nats};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("READINGS is a number"))
        .unwrap_or(50_000);
    let nats = Nats::start();
    nats.create_stream("SAHOOL_IOT", &["sahool.iot.>"]).await;
    let broker = Mosquitto::start();
    let gateway = Gateway::start(&format!(
        r#"
[nats]
servers = ["{}"]

[[mqtt]]
name = "farm"
url = "{}"
topics = ["sahool/sensors/#"]
format = "sahool"

[[fields]]
id = "field-1"
  [[fields.sensors]]
  device_id = "probe-1"
  sensor_type = "water_level"
"#,
        nats.url(),
        broker.url()
    ));
    gateway.wait_until("MQTT connected", Duration::from_secs(20), |g| {
        g.metric("sahool_gateway_mqtt_connected", "") == 1.0
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // ~300-byte SAHOOL standard payloads, as the benchmark issue specifies.
    let messages: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let payload = format!(
                r#"{{"device_id":"probe-1","field_id":"field-1","type":"water_level","value":{i},"unit":"cm","timestamp":"2026-06-01T04:15:00Z","battery":90.5,"rssi":-70,"fw":"1.4.2","note":"{}"}}"#,
                "x".repeat(120)
            );
            ("sahool/sensors/probe-1/field-1/water_level".to_string(), payload.into_bytes())
        })
        .collect();
    let bytes = messages[0].1.len();
    let started = Instant::now();
    let publisher = tokio::spawn(publish_all(broker.port, "throughput-publisher", messages));
    gateway.wait_until("all forwarded", Duration::from_secs(600), |g| {
        g.metric("sahool_gateway_readings_forwarded_total", "") >= n as f64
    });
    let elapsed = started.elapsed();
    let acked = publisher.await.expect("publisher");
    let commits = gateway.metric("sahool_gateway_store_commits_total", "");
    println!(
        "{n} readings ({bytes}-byte payloads, {acked} broker-acked): {:.2} s, {:.0} readings/s MQTT QoS 1 in → PubAck, {:.1} readings per commit",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        n as f64 / commits.max(1.0)
    );
}
