//! Guarantee 8, a burst is not a flood, through the real binary with real mosquitto and
//! nats-server and the shipped `[buffer]` and `[quality]` of `config/gateway.example.toml`:
//! a broker's queue delivered at once after the gateway was stopped, a probe uploading its day
//! of backlog, and live probes reporting meanwhile all arrive exactly once; a faulty device
//! stamping readings 1 ms apart is held to its limit without costing the others anything, and
//! everything it was refused is dead-lettered with its raw bytes.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use support::{publish_all, shipped_farm_config, Gateway, Mosquitto, Nats, StreamMessage};

/// The farm: a broker source, the shipped bounds and flood limits, and `devices` soil probes.
fn farm_config(nats: &Nats, broker: &Mosquitto, devices: &[String]) -> String {
    let devices: Vec<&str> = devices.iter().map(String::as_str).collect();
    shipped_farm_config(nats, broker, "soil_moisture", &devices)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn rfc3339_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .expect("a time");
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339")
}

fn topic(device: &str) -> String {
    format!("sahool/sensors/{device}/field-1/soil_moisture")
}

/// One reading in SAHOOL's standard form; `at_ms` None: the device sends no time.
fn reading(device: &str, value: f64, at_ms: Option<i64>) -> (String, Vec<u8>) {
    let ts = at_ms.map_or(String::new(), |ms| {
        format!(r#","timestamp":"{}""#, rfc3339_ms(ms))
    });
    let payload = format!(
        r#"{{"device_id":"{device}","field_id":"field-1","type":"soil_moisture","value":{value}{ts}}}"#
    );
    (topic(device), payload.into_bytes())
}

/// Readings in the stream per device, as value → times seen (values identify readings).
fn by_device(events: &[StreamMessage]) -> BTreeMap<String, BTreeMap<String, usize>> {
    let validator = support::event_validator();
    let mut out: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for e in events {
        assert!(validator.is_valid(&e.body), "invalid event: {}", e.body);
        let p = &e.body["payload"];
        let device = p["device_id"].as_str().expect("device_id").to_string();
        let value = p["value"].as_f64().expect("value");
        *out.entry(device)
            .or_default()
            .entry(format!("{value}"))
            .or_default() += 1;
    }
    out
}

/// Asserts the device's readings in the stream are exactly `values`, each once.
fn assert_once(seen: &BTreeMap<String, BTreeMap<String, usize>>, device: &str, values: &[f64]) {
    let got = seen.get(device).cloned().unwrap_or_default();
    let doubled: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "{device}: doubled {doubled:?}");
    let missing: Vec<_> = values
        .iter()
        .map(|v| format!("{v}"))
        .filter(|v| !got.contains_key(v))
        .collect();
    assert!(
        missing.is_empty(),
        "{device}: {} of {} readings lost, e.g. {:?}",
        missing.len(),
        values.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(got.len(), values.len(), "{device}: readings not sent");
}

async fn wait_in_stream(nats: &Nats, gateway: &Gateway, n: usize) -> Vec<StreamMessage> {
    gateway.wait_until(
        &format!("{n} readings forwarded"),
        Duration::from_secs(120),
        |g| {
            g.metric("sahool_gateway_readings_forwarded_total", "") >= n as f64
                && g.metric("sahool_gateway_buffer_readings", "") == 0.0
        },
    );
    nats.read_readings("SAHOOL_IOT").await
}

fn rate_limited(gateway: &Gateway) -> f64 {
    gateway.metric(
        "sahool_gateway_readings_rejected_total",
        "reason=\"rate_limited\"",
    )
}

/// The gateway is stopped for a while (an upgrade, a power cut); 12 probes keep reporting to
/// the farm's broker, which queues 300 readings each (10 s apart) in the gateway's persistent
/// session and delivers them all at once when it comes back, while three more probes report
/// live. Before guarantee 8, 1,188 of the queued readings and 6 live ones were discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_queue_delivered_at_once_after_a_restart_is_kept_whole() {
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let queued: Vec<String> = (1..=12).map(|i| format!("probe-{i}")).collect();
    let live: Vec<String> = (1..=3).map(|i| format!("live-{i}")).collect();
    let all: Vec<String> = queued.iter().chain(&live).cloned().collect();
    let mut gateway = Gateway::start(&farm_config(&nats, &broker, &all));
    gateway.wait_subscribed(1).await;
    assert_eq!(gateway.terminate(), Some(0));

    // 50 minutes of readings, 10 s apart, ending a minute ago.
    let start = now_ms() - 51 * 60_000;
    let per_probe = 300;
    let values: Vec<f64> = (0..per_probe).map(|k| k as f64 * 0.25).collect();
    let mut queue = Vec::new();
    for (k, value) in values.iter().enumerate() {
        for probe in &queued {
            queue.push(reading(probe, *value, Some(start + k as i64 * 10_000)));
        }
    }
    assert_eq!(
        publish_all(broker.port, "probes", queue).await,
        12 * per_probe
    );

    gateway.resume();
    // Live probes: one reading each every 250 ms while the queue comes in; live-3 sends no
    // time of its own.
    let port = broker.port;
    let live_sent = 40;
    let live_probes = live.clone();
    let live_task = tokio::spawn(async move {
        for i in 0..live_sent {
            let batch = live_probes
                .iter()
                .enumerate()
                .map(|(n, d)| reading(d, i as f64, (n < 2).then(now_ms)))
                .collect();
            publish_all(port, &format!("live-{i}"), batch).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    live_task.await.expect("live probes");

    let total = 12 * per_probe + 3 * live_sent;
    let events = wait_in_stream(&nats, &gateway, total).await;
    let seen = by_device(&events);
    for probe in &queued {
        assert_once(&seen, probe, &values);
    }
    let live_values: Vec<f64> = (0..live_sent).map(|i| i as f64).collect();
    for probe in &live {
        assert_once(&seen, probe, &live_values);
    }
    assert_eq!(events.len(), total);
    assert_eq!(rate_limited(&gateway), 0.0);
    assert!(gateway.dead_letters().is_empty(), "nothing dead-lettered");
}

/// A probe that was out of radio range uploads its own day of minute readings as SAHOOL batch
/// messages (60 items with a time each), as fast as the link allows. Before guarantee 8 only
/// 200 of the 1,440 were kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_uploading_its_day_of_backlog_keeps_every_reading() {
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let gateway = Gateway::start(&farm_config(&nats, &broker, &["probe-b".to_string()]));
    gateway.wait_subscribed(1).await;

    let start = now_ms() - 24 * 3_600_000;
    let values: Vec<f64> = (0..1440).map(|m| m as f64 / 20.0).collect();
    let messages: Vec<(String, Vec<u8>)> = values
        .chunks(60)
        .enumerate()
        .map(|(c, chunk)| {
            let items: Vec<String> = chunk
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let minute = (c * 60 + i) as i64;
                    format!(
                        r#"{{"type":"soil_moisture","value":{v},"ts":"{}"}}"#,
                        rfc3339_ms(start + minute * 60_000)
                    )
                })
                .collect();
            let payload = format!(
                r#"{{"device_id":"probe-b","field_id":"field-1","readings":[{}]}}"#,
                items.join(",")
            );
            (
                "sahool/sensors/probe-b/field-1".to_string(),
                payload.into_bytes(),
            )
        })
        .collect();
    assert_eq!(publish_all(broker.port, "probe-b", messages).await, 24);

    let events = wait_in_stream(&nats, &gateway, 1440).await;
    assert_once(&by_device(&events), "probe-b", &values);
    assert_eq!(rate_limited(&gateway), 0.0);
}

/// The faulty device's `i`th reading's value: distinct for every `i` below 100,000.
fn faulty_value(i: usize) -> f64 {
    (i % 100) as f64 + (i / 100) as f64 / 1000.0
}

/// A faulty device stamps readings 1 ms apart and sends them at 1 kHz for 10 s, beside three
/// normal probes reporting every half second. The normal ones lose nothing; of the faulty
/// one's 10,000, what its window allows is in the stream and every other one is dead-lettered
/// (reason rate_limited) with the message it came in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_claiming_1khz_is_held_to_its_limit_and_the_others_lose_nothing() {
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let normal: Vec<String> = (1..=3).map(|i| format!("probe-{i}")).collect();
    let devices: Vec<String> = normal.iter().cloned().chain(["faulty".into()]).collect();
    let gateway = Gateway::start(&farm_config(&nats, &broker, &devices));
    gateway.wait_subscribed(1).await;

    let port = broker.port;
    let start = now_ms() - 60_000;
    let sent = 10_000usize;
    // 100 messages every 100 ms: 1 kHz for 10 s.
    let faulty = tokio::spawn(async move {
        let mut acked = 0;
        for burst in 0..sent / 100 {
            let messages = (burst * 100..(burst + 1) * 100)
                .map(|i| reading("faulty", faulty_value(i), Some(start + i as i64)))
                .collect();
            acked += publish_all(port, &format!("faulty-{burst}"), messages).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        acked
    });
    let normal_sent = 20;
    let probes = normal.clone();
    let calm = tokio::spawn(async move {
        for i in 0..normal_sent {
            let batch = probes
                .iter()
                .map(|d| reading(d, i as f64, Some(now_ms())))
                .collect();
            publish_all(port, &format!("calm-{i}"), batch).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    assert_eq!(faulty.await.expect("faulty device"), sent);
    calm.await.expect("normal probes");

    gateway.wait_until(
        "every faulty reading stored or dead-lettered",
        Duration::from_secs(60),
        |g| {
            let stored = g.metric("sahool_gateway_readings_accepted_total", "");
            stored + rate_limited(g) >= (sent + 3 * normal_sent) as f64
        },
    );
    let in_stream = 3 * normal_sent + (sent as f64 - rate_limited(&gateway)) as usize;
    let events = wait_in_stream(&nats, &gateway, in_stream).await;
    let seen = by_device(&events);
    let normal_values: Vec<f64> = (0..normal_sent).map(|i| i as f64).collect();
    for probe in &normal {
        assert_once(&seen, probe, &normal_values);
    }
    let kept = seen.get("faulty").map_or(0, |v| v.values().sum::<usize>());
    // 10 s of its clock spans two windows of 10 s at most: 200 each.
    assert!(
        (200..=400).contains(&kept),
        "the faulty device got its limit, not its flood: {kept}"
    );
    let out = gateway.cli(&["dead-letters", "list", "--limit", "100000"]);
    assert!(out.status.success(), "{out:?}");
    let dead: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("dead-letter JSON"))
        .filter(|d| d["reason"] == "rate_limited")
        .collect();
    assert_eq!(
        kept + dead.len(),
        sent,
        "every faulty reading stored or dead-lettered"
    );
    assert_eq!(dead.len() as f64, rate_limited(&gateway));
    for d in dead.iter().take(50) {
        let raw = d["raw"].as_str().unwrap_or_default();
        assert!(
            raw.contains("\"device_id\":\"faulty\""),
            "raw bytes kept: {d}"
        );
        assert!(
            d["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("own clock"),
            "the reason says why: {d}"
        );
    }

    // The operator decides the burst was real after all: a replay brings back every refused
    // reading, once, beside the ones already forwarded.
    let replay = gateway.cli(&["dead-letters", "replay", "--reason", "rate_limited"]);
    assert!(replay.status.success(), "{replay:?}");
    let events = wait_in_stream(&nats, &gateway, 3 * normal_sent + sent).await;
    let faulty_values: Vec<f64> = (0..sent).map(faulty_value).collect();
    assert_once(&by_device(&events), "faulty", &faulty_values);
}
