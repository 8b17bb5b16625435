//! Whole-pipeline throughput: MQTT QoS 1 in → committed → JetStream PubAck, with real
//! mosquitto and nats-server on loopback. Prints readings/s; asserts nothing about speed.
//!
//! `cargo run --release --example throughput -- [READINGS]` (default 50,000)

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{probe_config, probe_readings, publish_all, Gateway, Mosquitto, Nats};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("READINGS is a number"))
        .unwrap_or(50_000);
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let gateway = Gateway::start(&probe_config(&nats, &broker, "", ""));
    gateway.wait_subscribed(1).await;

    // ~300-byte SAHOOL standard payloads, as the benchmark issue specifies.
    let messages = probe_readings(0..n);
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
