//! What the parts allow on this machine, measured in the same run as the rest: JetStream
//! publishing the gateway's own events with pipelined acks, the gateway's store committing
//! appends in groups, and the disk's fsync rate.

use std::future::IntoFuture;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use futures_util::stream::{FuturesOrdered, StreamExt};
use sahool_gateway::ingest::mapping::Mapper;
use sahool_gateway::reading::Timestamp;
use sahool_gateway::store::OutboxRow;
use sahool_gateway::uplink::event::{self, Subjects};

use crate::backlog::{bench_config, write_readings};
use crate::publisher::payload;
use crate::scenarios::GATEWAY_STREAM;
use crate::support::Nats;

/// Messages/s publishing `count` of the gateway's events (body and headers as it renders
/// them) to the platform's stream, with up to `window` PubAcks outstanding; and nats-server's
/// CPU per message (µs).
pub async fn jetstream(count: u64, window: usize) -> (f64, f64) {
    let nats = Nats::with_platform_stream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = bench_config(dir.path());
    let mapper = Mapper::new(&config);
    let subjects = Subjects {
        reading: config.nats.subject.clone(),
        status: config.nats.status_subject.clone(),
    };
    let events: Vec<event::Event> = (0..count)
        .map(|i| {
            let (topic, body) = payload(i);
            let reading = mapper
                .map_mqtt("farm", &topic, &body, Timestamp::now())
                .readings
                .pop()
                .expect("a reading");
            let row = OutboxRow {
                seq: i + 1,
                event_id: uuid::Uuid::new_v4().into_bytes(),
                stored_ms: Timestamp::now().unix_millis(),
                kind: 0,
                body: postcard::to_stdvec(&reading).expect("postcard"),
                trace: None,
            };
            event::render(&row, "gw-test", &subjects).expect("render")
        })
        .collect();
    let js = async_nats::jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_ack_inflight(window * 2)
        .backpressure_on_inflight(true)
        .build(nats.client().await);

    let cpu = crate::measure::CpuMeter::start(&[("nats-server", nats.pid().expect("nats-server"))]);
    let started = Instant::now();
    let mut inflight = FuturesOrdered::new();
    for e in events {
        if inflight.len() >= window {
            let ack: Result<_, _> = inflight.next().await.expect("in flight");
            ack.expect("PubAck");
        }
        let headers = event::headers(&e);
        let message = PublishMessage::build().payload(e.body).headers(headers);
        let ack = js.send_publish(e.subject, message).await.expect("publish");
        inflight.push_back(ack.into_future());
    }
    while let Some(ack) = inflight.next().await {
        ack.expect("PubAck");
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    let server_us = cpu.per_item_us(count)[0].1;
    let stored = crate::measure::stream_state(&js, GATEWAY_STREAM)
        .await
        .messages;
    assert_eq!(stored, count, "every event stored");
    (rate, server_us)
}

/// Rows/s through the gateway's store with its default settings (`synchronous = FULL`), one
/// reading per append and 1,024 appends awaiting their commit, as MQTT intake with the
/// default receive window.
pub async fn store(count: u64) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = bench_config(dir.path());
    count as f64 / write_readings(&config, 0, count, 1024).await
}

/// fsyncs/s: a 4 KiB write and `fdatasync`, over and over, in the temp directory the
/// gateway's buffer lives in during the benchmark. The writes go round a preallocated MiB,
/// as a WAL in steady state does, so no fsync has a file size to update.
pub fn fsync(seconds: f64) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut file = std::fs::File::create(dir.path().join("fsync")).expect("file");
    let block = [0x5au8; 4096];
    for _ in 0..256 {
        file.write_all(&block).expect("write");
    }
    file.sync_all().expect("fsync");
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        file.write_all_at(&block, (n % 256) * 4096).expect("write");
        file.sync_data().expect("fdatasync");
        n += 1;
    }
    n as f64 / started.elapsed().as_secs_f64()
}
