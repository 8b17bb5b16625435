//! Sensor liveness, data quality and flood protection through the real binary with real
//! brokers: connected / disconnected / low-battery events that survive restarts, repeated
//! observations stored once, implausible timestamps handled by policy, a flooding device that
//! cannot crowd out the others, and the `mappings test` and `sensors` commands.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use support::{publish_all, Gateway, Mosquitto, Nats, StreamMessage};

fn config(nats: &Nats, broker: &Mosquitto, quality: &str) -> String {
    format!(
        r#"
[nats]
servers = ["{}"]

[quality]
{quality}

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
  [[fields.sensors]]
  device_id = "probe-2"
  sensor_type = "water_level"
  [[fields.sensors]]
  device_id = "flood-1"
  sensor_type = "water_level"
"#,
        nats.url(),
        broker.url()
    )
}

/// A reading without a device timestamp (received time applies), with an optional battery.
fn msg(device: &str, value: usize, battery: Option<f64>) -> (String, Vec<u8>) {
    let battery = battery.map_or(String::new(), |b| format!(r#","battery":{b}"#));
    (
        format!("sahool/sensors/{device}/field-1/water_level"),
        format!(r#"{{"device_id":"{device}","type":"water_level","value":{value}{battery}}}"#)
            .into_bytes(),
    )
}

fn statuses(events: &[StreamMessage]) -> BTreeMap<(String, String), usize> {
    let validator = support::status_validator();
    let mut out = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e.body["event_type"] == "device_status")
    {
        let errors: Vec<String> = validator
            .iter_errors(&e.body["payload"])
            .map(|x| x.to_string())
            .collect();
        assert!(errors.is_empty(), "{errors:?}: {:#}", e.body);
        let p = &e.body["payload"];
        let key = (
            p["device_id"].as_str().unwrap_or("").to_string(),
            p["status"].as_str().unwrap_or("").to_string(),
        );
        *out.entry(key).or_default() += 1;
    }
    out
}

fn count(map: &BTreeMap<(String, String), usize>, device: &str, status: &str) -> usize {
    map.get(&(device.to_string(), status.to_string()))
        .copied()
        .unwrap_or(0)
}

async fn start(nats: &Nats, broker: &Mosquitto, quality: &str) -> Gateway {
    let gateway = Gateway::start(&config(nats, broker, quality));
    gateway.wait_subscribed(1).await;
    gateway
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_events_follow_sensors_across_restarts() {
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    // Stale after 4 s of silence.
    let q = "expected_interval = \"2s\"\nstale_factor = 2.0\nlow_battery = 20.0";
    let mut gateway = start(&nats, &broker, q).await;

    // First reports: one connected each. Battery 15 and 14: one low-battery flag; back to 50,
    // then 10: flagged again (once per crossing).
    let first = vec![
        msg("probe-1", 1, Some(90.0)),
        msg("probe-2", 1, None),
        msg("probe-1", 2, Some(15.0)),
        msg("probe-1", 3, Some(14.0)),
        msg("probe-1", 4, Some(50.0)),
        msg("probe-1", 5, Some(10.0)),
    ];
    for m in first {
        assert_eq!(publish_all(broker.port, "first", vec![m]).await, 1);
    }
    // probe-1 keeps reporting; probe-2 falls silent and goes stale.
    for i in 10..26 {
        assert_eq!(
            publish_all(broker.port, "steady", vec![msg("probe-1", i, Some(10.0))]).await,
            1
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    gateway.wait_until("probe-2 disconnected", Duration::from_secs(10), |g| {
        g.metric("sahool_gateway_status_events_total", "") >= 5.0
    });

    // A restart while probe-1 keeps reporting: no second `connected` for it.
    gateway.kill9();
    gateway.resume();
    for i in 20..24 {
        assert_eq!(
            publish_all(broker.port, "after", vec![msg("probe-1", i, Some(10.0))]).await,
            1
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // probe-1 dies while the gateway is down: the next start reports it disconnected.
    assert_eq!(gateway.terminate(), Some(0));
    tokio::time::sleep(Duration::from_secs(5)).await;
    gateway.resume();
    gateway.wait_until(
        "probe-1 disconnected after restart",
        Duration::from_secs(10),
        |g| {
            g.metric("sahool_gateway_buffer_readings", "") == 0.0
                && g.metric("sahool_gateway_status_events_total", "") >= 1.0
        },
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    let events = nats.read_stream("SAHOOL_IOT").await;
    let s = statuses(&events);
    assert_eq!(count(&s, "probe-1", "online"), 1, "{s:?}");
    assert_eq!(count(&s, "probe-2", "online"), 1, "{s:?}");
    assert_eq!(count(&s, "probe-1", "warning"), 2, "{s:?}");
    assert_eq!(count(&s, "probe-2", "offline"), 1, "{s:?}");
    assert_eq!(count(&s, "probe-1", "offline"), 1, "{s:?}");
    assert!(events
        .iter()
        .any(|e| e.subject == "sahool.iot.sensor.connected"));
    assert!(events
        .iter()
        .any(|e| e.subject == "sahool.iot.sensor.disconnected"));

    let listed = gateway.cli(&["sensors"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{text}");
    let line = |device: &str| {
        text.lines()
            .find(|l| l.contains(device))
            .unwrap_or("")
            .to_string()
    };
    assert!(line("probe-1").contains("offline"), "{text}");
    assert!(
        line("flood-1").contains("unknown") && line("flood-1").contains("never"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_observations_are_stored_once_and_implausible_times_follow_the_policy() {
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let mut gateway = start(&nats, &broker, "max_future = \"5m\"").await;

    let at = |ts: &str, v: usize| {
        (
            "sahool/sensors/probe-1/field-1/water_level".to_string(),
            format!(
                r#"{{"device_id":"probe-1","type":"water_level","value":{v},"timestamp":"{ts}"}}"#
            )
            .into_bytes(),
        )
    };
    let future = "2099-01-01T00:00:00Z";
    // The same uplink twice (as two LoRaWAN gateways deliver it), then a clock-less node.
    let messages = vec![
        at("2026-06-01T04:15:00Z", 1),
        at("2026-06-01T04:15:00Z", 1),
        at(future, 2),
    ];
    assert_eq!(publish_all(broker.port, "q", messages).await, 3);
    gateway.wait_until("forwarded", Duration::from_secs(20), |g| {
        g.metric("sahool_gateway_readings_forwarded_total", "") == 2.0
    });
    assert_eq!(
        gateway.metric("sahool_gateway_readings_duplicates_total", ""),
        1.0
    );
    assert_eq!(
        gateway.metric("sahool_gateway_timestamps_replaced_total", ""),
        1.0
    );
    let readings = nats.read_readings("SAHOOL_IOT").await;
    assert_eq!(readings.len(), 2);
    let replaced = &readings[1].body["payload"];
    assert_eq!(replaced["metadata"]["original_timestamp"], future);
    assert_ne!(
        replaced["timestamp"], future,
        "the receive time is used instead"
    );

    // Policy "reject": the same input is dead-lettered.
    let text = std::fs::read_to_string(&gateway.config_path).expect("config");
    gateway.write_raw_config(&text.replace(
        "max_future = \"5m\"",
        "max_future = \"5m\"\ntimestamp_policy = \"reject\"",
    ));
    gateway.signal("HUP");
    gateway.wait_until("reloaded", Duration::from_secs(10), |g| {
        g.log().contains("config reloaded")
    });
    gateway.wait_subscribed(1).await;
    assert_eq!(
        publish_all(broker.port, "q", vec![at("2098-01-01T00:00:00Z", 3)]).await,
        1
    );
    gateway.wait_until("rejected", Duration::from_secs(10), |g| {
        g.metric(
            "sahool_gateway_readings_rejected_total",
            "reason=\"bad_timestamp\"",
        ) == 1.0
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_device_is_limited_and_the_others_lose_nothing() {
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let gateway = start(&nats, &broker, "device_rate = 10.0\ndevice_burst = 10.0").await;

    let port = broker.port;
    // flood-1 sends 500 readings without a time of their own as fast as it can: 50× its pace
    // of 10/s. Over its burst its readings wait (acks withheld) up to a window (1 s), then it is
    // refused: dead-lettered, not dropped.
    let flood = tokio::spawn(async move {
        publish_all(
            port,
            "flood",
            (0..500).map(|i| msg("flood-1", i, None)).collect(),
        )
        .await
    });
    // probe-1 and probe-2 report normally meanwhile, within their limits.
    for i in 0..20 {
        let n = publish_all(
            broker.port,
            "calm",
            vec![msg("probe-1", i, None), msg("probe-2", i, None)],
        )
        .await;
        assert_eq!(n, 2);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(flood.await.expect("flood publisher"), 500);
    gateway.wait_until("everything processed", Duration::from_secs(30), |g| {
        let limited = g.metric(
            "sahool_gateway_readings_rejected_total",
            "reason=\"rate_limited\"",
        );
        let accepted = g.metric("sahool_gateway_readings_accepted_total", "");
        limited + accepted == 540.0 && g.metric("sahool_gateway_buffer_readings", "") == 0.0
    });
    let readings = nats.read_readings("SAHOOL_IOT").await;
    let from = |device: &str| {
        readings
            .iter()
            .filter(|e| e.body["payload"]["device_id"] == device)
            .count()
    };
    assert_eq!(from("probe-1"), 20, "the calm devices lose nothing");
    assert_eq!(from("probe-2"), 20);
    let flooded = from("flood-1");
    assert!(
        (10..100).contains(&flooded),
        "flood-1 got its burst and its rate, not its flood: {flooded}"
    );
    assert_eq!(
        gateway.metric(
            "sahool_gateway_readings_rejected_total",
            "reason=\"rate_limited\""
        ),
        (500 - flooded) as f64
    );
    assert!(
        gateway.metric("sahool_gateway_readings_paced_total", "") > 0.0,
        "the flood was slowed down before anything was refused"
    );
    let out = gateway.cli(&["dead-letters", "list", "--limit", "1000"]);
    let refused = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("rate_limited") && l.contains("flood-1"))
        .count();
    assert_eq!(
        refused,
        500 - flooded,
        "every refused reading is a dead-letter"
    );
}

#[test]
fn mappings_test_shows_readings_or_the_rejection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    let fixture = support::fixture("mqtt/sahool-standard.json");
    std::fs::write(
        &path,
        r#"
[gateway]
id = "gw"
tenant_id = "t"
[nats]
servers = ["nats://127.0.0.1:4222"]
[[mqtt]]
name = "farm"
url = "mqtt://127.0.0.1:1883"
topics = ["sahool/sensors/#"]
format = "sahool"
[[fields]]
id = "field-north-12"
  [[fields.sensors]]
  device_id = "soil-probe-7"
  sensor_type = "soil_moisture"
"#,
    )
    .expect("write");
    let run = |topic: &str, payload: &str| {
        std::process::Command::new(support::gateway_binary())
            .args(["mappings", "test", "--config"])
            .arg(&path)
            .args(["--topic", topic, "--payload", payload])
            .output()
            .expect("run")
    };
    let topic = fixture["topic"].as_str().expect("topic");
    let out = run(topic, fixture["payload"].as_str().expect("payload"));
    assert!(out.status.success());
    let reading: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(reading["field_id"], "field-north-12");
    assert_eq!(reading["sensor_type"], "soil_moisture");
    assert_eq!(reading["unit"], "%");
    assert_eq!(reading["value"], 31.4);
    assert_eq!(reading["timestamp"], "2026-06-01T04:15:00Z");

    let out = run(
        topic,
        r#"{"device_id":"soil-probe-7","type":"vwc","value":180}"#,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("rejected: out_of_range:"));
}
