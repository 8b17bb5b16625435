//! `when_full = "thin"` through the real binary: a month-long outage of several sensors into a
//! 1 MiB buffer keeps every sensor's whole month at a coarser step, and the counts add up.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::{probe_config, publish_all, values_in_order, Gateway, Mosquitto, Nats};

const SENSORS: usize = 4;
const DAYS: u64 = 30;
const STEP_MIN: u64 = 5;
/// Readings per sensor: one every `STEP_MIN` minutes for `DAYS` days.
const PER_SENSOR: usize = (DAYS * 24 * 60 / STEP_MIN) as usize;
/// A reading's value: sensor `s`, reading `i` of its series.
const VALUE_BASE: usize = 100_000;

/// Reading `i` of sensor `s` (device `probe-{s+1}`), observed `i` steps after the outage began
/// (30 days before now, so the last one is a few minutes old).
fn reading(s: usize, i: usize, start_ms: u64) -> (String, Vec<u8>) {
    let device = format!("probe-{}", s + 1);
    let ts = start_ms + i as u64 * STEP_MIN * 60_000;
    let value = s * VALUE_BASE + i;
    let payload = format!(
        r#"{{"device_id":"{device}","field_id":"field-1","type":"water_level","value":{value},"unit":"cm","timestamp":{ts}}}"#
    );
    (
        format!("sahool/sensors/{device}/field-1/water_level"),
        payload.into_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thin_keeps_a_30_day_outage_of_every_sensor_at_a_coarser_step() {
    let started = Instant::now();
    let mut nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let mut config = probe_config(
        &nats,
        &broker,
        "max_bytes = \"1MiB\"\nwhen_full = \"thin\"",
        "",
    );
    // probe-1 is configured; the other sensors join the same field.
    for s in 1..SENSORS {
        config += &format!(
            "  [[fields.sensors]]\n  device_id = \"probe-{}\"\n  sensor_type = \"water_level\"\n",
            s + 1
        );
    }
    let mut gateway = Gateway::start(&config);
    gateway.wait_subscribed(1).await;
    nats.stop();

    let now_ms = sahool_gateway::reading::Timestamp::now().unix_millis() as u64;
    let start_ms = now_ms - DAYS * 24 * 3_600_000;
    // Sensors report side by side, as a farm's would.
    let messages: Vec<_> = (0..PER_SENSOR)
        .flat_map(|i| (0..SENSORS).map(move |s| reading(s, i, start_ms)))
        .collect();
    let sent = messages.len();
    assert_eq!(publish_all(broker.port, "thin", messages).await, sent);
    gateway.wait_until("all accepted", Duration::from_secs(120), |g| {
        g.metric("sahool_gateway_readings_accepted_total", "") == sent as f64
    });
    let thinned =
        gateway.metric("sahool_gateway_readings_dropped_total", "reason=\"thin\"") as usize;
    let full = gateway.metric(
        "sahool_gateway_readings_dropped_total",
        "reason=\"buffer_full\"",
    ) as usize;
    let passes = gateway.metric("sahool_gateway_buffer_thin_passes_total", "") as u32;
    let buffered = gateway.metric("sahool_gateway_buffer_readings", "") as usize;
    assert!(thinned > 0, "the bound was reached and thinned");
    assert_eq!(thinned + full + buffered, sent, "buffered or counted");
    assert!(gateway.metric("sahool_gateway_buffer_bytes", "") <= (1 << 20) as f64);

    nats.resume();
    gateway.wait_until("backlog drained", Duration::from_secs(120), |g| {
        g.metric("sahool_gateway_buffer_readings", "") == 0.0
            && g.metric("sahool_gateway_readings_forwarded_total", "") == buffered as f64
    });
    let events = nats.read_readings("SAHOOL_IOT").await;
    // Unique event ids, seq increasing in stream order.
    let values = values_in_order(&events);
    assert_eq!(values.len(), buffered, "in stream");
    assert_eq!(
        values.len() + thinned + full,
        sent,
        "in stream + dropped == sent"
    );

    let mut series: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for v in &values {
        series
            .entry(v / VALUE_BASE)
            .or_default()
            .push(v % VALUE_BASE);
    }
    assert_eq!(series.len(), SENSORS, "every sensor kept");
    let day = (24 * 60 / STEP_MIN) as usize;
    let mut report = Vec::new();
    for (s, kept) in &series {
        assert!(
            kept.windows(2).all(|w| w[0] < w[1]),
            "sensor {s}: in order, no doubles"
        );
        let (first, last) = (kept[0], kept[kept.len() - 1]);
        let gap = kept.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        // Each thinning sweep over the buffer drops no two neighbours of a series, so it at
        // most doubles a gap; nothing else takes readings unless thinning ran dry.
        if full == 0 {
            assert_eq!(first, 0, "sensor {s}: the oldest reading stays");
            assert!(
                gap <= 1 << passes,
                "sensor {s}: gap of {gap} steps after {passes} sweeps"
            );
        }
        assert!(first < day, "sensor {s}: kept from the first day ({first})");
        assert_eq!(last, PER_SENSOR - 1, "sensor {s}: kept to the last reading");
        report.push(format!(
            "sensor {s}: {} kept, steps {first}..={last}, largest gap {gap} steps",
            kept.len()
        ));
    }

    assert_eq!(gateway.terminate(), Some(0));
    let out = gateway.cli(&["buffer", "stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    assert_eq!(stats["accepted"], sent);
    assert_eq!(stats["forwarded"], values.len());
    assert_eq!(stats["dropped"]["thin"], thinned);
    assert_eq!(stats["dropped"]["buffer_full"], full);
    assert_eq!(stats["readings"], 0);
    println!(
        "thin: sent {sent} ({SENSORS} sensors x {PER_SENSOR}, {STEP_MIN} min over {DAYS} days), \
         in stream {}, thinned {thinned}, buffer_full {full}, {passes} sweeps, {:.1} s\n{}",
        values.len(),
        started.elapsed().as_secs_f64(),
        report.join("\n")
    );
}
