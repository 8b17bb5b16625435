//! Listener-path throughput: devices publish MQTT QoS 1 straight to the gateway's
//! `[[mqtt_listener]]` (loopback, `auth = "none"`), no broker in between → committed → JetStream
//! PubAck, with a real nats-server. Prints readings/s; asserts nothing about speed.
//!
//! `cargo build --release --bin sahool-gateway --example listener_throughput &&
//!  cargo run --release --example listener_throughput -- [READINGS] [CLIENTS]`
//! (defaults 50,000 readings over 4 connections)

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{free_port, probe_listener_config, probe_readings, publish_all, Gateway, Nats};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map(|a| a.parse().expect("READINGS is a number"))
        .unwrap_or(50_000);
    let clients: usize = args
        .next()
        .map(|a| a.parse().expect("CLIENTS is a number"))
        .unwrap_or(4)
        .max(1);
    let nats = Nats::with_platform_stream().await;
    let port = free_port();
    // publish_all keeps up to 200 QoS 1 messages in flight per connection.
    let gateway = Gateway::start(&probe_listener_config(
        &nats,
        port,
        "",
        "max_in_flight = 256",
    ));

    let per_client = n / clients;
    let n = per_client * clients;
    let started = Instant::now();
    let publishers: Vec<_> = (0..clients)
        .map(|c| {
            let messages = probe_readings(c * per_client..(c + 1) * per_client);
            tokio::spawn(async move { publish_all(port, &format!("device-{c}"), messages).await })
        })
        .collect();
    let mut acked = 0;
    for p in publishers {
        acked += p.await.expect("publisher");
    }
    let ingested = started.elapsed();
    gateway.wait_until("all forwarded", Duration::from_secs(600), |g| {
        g.metric("sahool_gateway_readings_forwarded_total", "") >= n as f64
    });
    let elapsed = started.elapsed();
    let commits = gateway.metric("sahool_gateway_store_commits_total", "");
    let pubacks = gateway.metric(
        "sahool_gateway_mqtt_listener_puback_seconds_count",
        "listener=\"devices\"",
    );
    let puback_sum = gateway.metric(
        "sahool_gateway_mqtt_listener_puback_seconds_sum",
        "listener=\"devices\"",
    );
    println!(
        "{n} readings over {clients} connection(s), {acked} PUBACKed: ingest {:.2} s ({:.0} readings/s published → PUBACK), \
         end to end {:.2} s ({:.0} readings/s → JetStream PubAck), {:.1} readings per commit, mean PUBACK latency {:.1} ms",
        ingested.as_secs_f64(),
        n as f64 / ingested.as_secs_f64(),
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        n as f64 / commits.max(1.0),
        puback_sum * 1000.0 / pubacks.max(1.0),
    );
}
