//! SIGHUP through the real binary: a new mapping, a new source and a new NATS setting take
//! effect without a restart, buffered readings are neither lost nor sent twice, and a broken
//! config is refused while the running one goes on.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::{probe_config, probe_readings, publish_all, Gateway, Mosquitto, Nats};

const PROBE_2: &str = r#"
  [[fields.sensors]]
  device_id = "probe-2"
  sensor_type = "water_level"
"#;

fn probe_2_reading(i: usize) -> (String, Vec<u8>) {
    (
        "sahool/sensors/probe-2/field-1/water_level".into(),
        format!(r#"{{"device_id":"probe-2","type":"water_level","value":{i}}}"#).into_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_config_and_keeps_the_buffer() {
    let mut nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let base = probe_config(&nats, &broker, "", "");
    let mut gateway = Gateway::start(&base);
    gateway.wait_subscribed(1).await;

    // probe-2 is not mapped yet.
    assert_eq!(
        publish_all(broker.port, "p2", vec![probe_2_reading(1000)]).await,
        1
    );
    gateway.wait_until("probe-2 rejected", Duration::from_secs(10), |g| {
        g.metric(
            "sahool_gateway_readings_rejected_total",
            "reason=\"unknown_device\"",
        ) == 1.0
    });

    // 200 readings buffered while NATS is down, then the reload.
    nats.stop();
    assert_eq!(
        publish_all(broker.port, "p1", probe_readings(0..200)).await,
        200
    );
    gateway.wait_until("buffered", Duration::from_secs(20), |g| {
        g.metric("sahool_gateway_buffer_readings", "") == 200.0
    });

    // A broken config is refused; the gateway keeps running the old one.
    gateway.write_raw_config("[gateway]\nid = \"gw-test\"\nthis is not toml");
    gateway.signal("HUP");
    gateway.wait_until("refusal logged", Duration::from_secs(10), |g| {
        g.log().contains("new config refused")
    });
    assert!(gateway.is_running());

    // The new config maps probe-2, adds a second broker connection and changes [nats].
    let second_source = format!(
        "\n[[mqtt]]\nname = \"second\"\nurl = \"{}\"\ntopics = [\"sahool/other/#\"]\nformat = \"sahool\"\n",
        broker.url()
    );
    let new =
        base.replace("ack_timeout = \"2s\"", "ack_timeout = \"3s\"") + &second_source + PROBE_2;
    gateway.rewrite_config(&new);
    gateway.signal("HUP");
    gateway.wait_until("reloaded with two sources", Duration::from_secs(20), |g| {
        g.log().contains("config reloaded") && g.metric("sahool_gateway_mqtt_connected", "") == 2.0
    });
    assert_eq!(
        gateway.metric("sahool_gateway_buffer_readings", ""),
        200.0,
        "the buffer is untouched"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        publish_all(broker.port, "p2", vec![probe_2_reading(2000)]).await,
        1
    );
    nats.resume();
    gateway.wait_until("everything forwarded", Duration::from_secs(60), |g| {
        g.metric("sahool_gateway_readings_forwarded_total", "") >= 201.0
            && g.metric("sahool_gateway_buffer_readings", "") == 0.0
    });
    let events = nats.read_readings("SAHOOL_IOT").await;
    let ids: HashSet<_> = events
        .iter()
        .map(|e| e.body["event_id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        events.len(),
        201,
        "200 buffered + the newly mapped probe-2 reading, once each"
    );
    assert_eq!(ids.len(), 201);
    let values: HashSet<u64> = events
        .iter()
        .filter(|e| e.body["payload"]["device_id"] == "probe-1")
        .filter_map(|e| e.body["payload"]["value"].as_f64().map(|v| v as u64))
        .collect();
    assert_eq!(values, (0..200).collect());
    assert!(events.iter().any(
        |e| e.body["payload"]["device_id"] == "probe-2" && e.body["payload"]["value"] == 2000.0
    ));
    assert_eq!(gateway.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_new_source_cannot_start_keeps_the_rest_running() {
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let base = probe_config(&nats, &broker, "", "");
    let mut gateway = Gateway::start(&base);
    gateway.wait_subscribed(1).await;

    // The new source's password file does not exist.
    let broken = format!(
        "{base}\n[[mqtt]]\nname = \"second\"\nurl = \"{}\"\ntopics = [\"x/#\"]\nformat = \"sahool\"\nusername = \"gw\"\npassword_file = \"/nonexistent/mqtt.password\"\n",
        broker.url()
    );
    gateway.rewrite_config(&broken);
    gateway.signal("HUP");
    gateway.wait_until("partial reload reported", Duration::from_secs(10), |g| {
        g.log().contains("reloaded in part")
    });
    assert!(gateway.is_running());
    assert!(
        gateway.log().contains("/nonexistent/mqtt.password"),
        "the error names the file"
    );

    // The running source still carries readings through.
    assert_eq!(
        publish_all(broker.port, "p1", probe_readings(0..5)).await,
        5
    );
    gateway.wait_until("forwarded", Duration::from_secs(20), |g| {
        g.metric("sahool_gateway_readings_forwarded_total", "") == 5.0
    });
    assert_eq!(gateway.terminate(), Some(0));
}
