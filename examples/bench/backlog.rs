//! A backlog in the gateway's own buffer, and its drain. The backlog is written through the
//! gateway's store code (the same mapping, rows and group commits as MQTT intake, without the
//! broker), so a million readings take seconds instead of minutes to set up.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sahool_gateway::common::metrics::Metrics;
use sahool_gateway::config::Config;
use sahool_gateway::ingest::intake::message_key;
use sahool_gateway::ingest::mapping::Mapper;
use sahool_gateway::reading::Timestamp;
use sahool_gateway::store::{self, Append, AppendOutcome};

use crate::measure::{self, ns_of, secs, unix_ns, wait_stream, CpuMeter, PeakRss};
use crate::publisher::payload;
use crate::scenarios::{gateway_config, GATEWAY_STREAM};
use crate::support::{Gateway, Nats};

/// The name of the `[[mqtt]]` source readings are mapped as.
const SOURCE: &str = "farm";

/// The benchmark's mapping (one probe, SAHOOL format) as the gateway sees it, with its buffer
/// in `data_dir`.
pub fn bench_config(data_dir: &Path) -> Config {
    let text = format!(
        "[gateway]\nid = \"gw-test\"\ntenant_id = \"tenant-a\"\ndata_dir = \"{}\"\n{}",
        data_dir.display(),
        gateway_config(
            "nats://127.0.0.1:4222",
            &format!(
                "[[mqtt]]\nname = \"{SOURCE}\"\nurl = \"mqtt://127.0.0.1:1883\"\ntopics = [\"sahool/sensors/#\"]\nformat = \"sahool\"\n"
            )
        )
    );
    sahool_gateway::config::parse(&text).expect("the bench config is valid")
}

/// Appends readings `first..first + count` to the buffer at `config`'s data dir, one message
/// per append as MQTT intake does, with up to `in_flight` appends awaiting their commit.
/// Returns the seconds it took, the buffer closed.
pub async fn write_readings(config: &Config, first: u64, count: u64, in_flight: usize) -> f64 {
    let mapper = Mapper::new(config);
    let (handle, thread) = store::start(
        config.store_path(),
        config.buffer.clone(),
        config.quality.low_battery,
        Arc::new(Metrics::new()),
    )
    .expect("open the buffer");
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::with_capacity(in_flight);
    for i in first..first + count {
        let (topic, body) = payload(i);
        let mapped = mapper.map_mqtt(SOURCE, &topic, &body, Timestamp::now());
        assert!(mapped.rejections.is_empty(), "bench reading rejected");
        let append = Append {
            readings: mapped.readings,
            dead_letters: Vec::new(),
            message_key: Some(message_key(SOURCE, topic.as_bytes(), &body)),
            maybe_duplicate: false,
            frame_key: None,
            trace: None,
        };
        pending.push_back(handle.append(append).await.expect("store open"));
        if pending.len() >= in_flight {
            expect_stored(pending.pop_front()).await;
        }
    }
    while !pending.is_empty() {
        expect_stored(pending.pop_front()).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(handle);
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .expect("join")
        .expect("store thread");
    elapsed
}

async fn expect_stored(
    rx: Option<tokio::sync::oneshot::Receiver<Result<AppendOutcome, store::StoreError>>>,
) {
    let outcome = rx.expect("pending append").await.expect("store reply");
    assert!(
        matches!(outcome, Ok(AppendOutcome::Stored { count: 1, .. })),
        "append not stored: {outcome:?}"
    );
}

pub struct Drain {
    pub nats_up_to_first: f64,
    pub nats_up_to_last: f64,
    pub rate: f64,
    pub peak_rss_mib: f64,
    pub file_bytes_per_reading: f64,
    pub fill_rate: f64,
    /// CPU per drained reading: gateway, nats-server.
    pub cpu_us: Vec<(&'static str, f64)>,
}

/// `count` readings buffered while NATS is down; then NATS starts, and the gateway, running
/// all along, drains them.
pub async fn drain(count: u64) -> Drain {
    // The platform's stream exists; then the server goes down, keeping it.
    let mut nats = Nats::with_platform_stream().await;
    nats.stop();
    let mut gateway = Gateway::configure(&gateway_config(&nats.url(), ""), &[]);
    let config = bench_config(&gateway.data_dir());
    let fill = write_readings(&config, 0, count, 1024).await;
    let on_disk = buffer_file_bytes(&gateway.data_dir());
    let rows = {
        let conn = store::db::open_read_only(&config.store_path()).expect("buffer");
        let stats = store::stats(&conn).expect("buffer stats");
        assert_eq!(stats.readings, count, "backlog written");
        stats.readings + stats.status_events
    };

    gateway.resume();
    let rss = PeakRss::start(gateway.pid().expect("gateway running"));
    // The gateway has tried NATS once and waits to retry: start it now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let up = unix_ns();
    nats.resume();
    let gateway_pid = gateway.pid().expect("gateway running");
    let cpu = CpuMeter::start(&[
        ("gateway", gateway_pid),
        ("nats-server", nats.pid().expect("nats-server running")),
    ]);
    let js = measure::jetstream(&nats.url()).await;
    let state = wait_stream(&js, GATEWAY_STREAM, rows, Duration::from_secs(900)).await;
    let cpu_us = cpu.per_item_us(rows);
    let peak_rss_mib = rss.finish();
    let (first, last) = (ns_of(state.first_timestamp), ns_of(state.last_timestamp));
    Drain {
        nats_up_to_first: secs(first - up),
        nats_up_to_last: secs(last - up),
        rate: rows as f64 / secs(last - first).max(1e-9),
        peak_rss_mib,
        file_bytes_per_reading: on_disk as f64 / count as f64,
        fill_rate: count as f64 / fill,
        cpu_us,
    }
}

/// The buffer's files: the database and, if any, its WAL.
fn buffer_file_bytes(data_dir: &Path) -> u64 {
    std::fs::read_dir(data_dir)
        .expect("data dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("buffer.db"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}
