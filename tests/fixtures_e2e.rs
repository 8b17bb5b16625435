//! Every device fixture, published to a real mosquitto, through the real gateway binary, into a
//! real JetStream stream: exactly its expected readings, as schema-valid events.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::{event_validator, fixture, matches_expected, publish_all, Gateway, Mosquitto, Nats};

const FIXTURES: [&str; 9] = [
    "mqtt/sahool-standard.json",
    "mqtt/sahool-compact-epoch.json",
    "mqtt/sahool-batch.json",
    // The platform's own vocabulary: camelCase and short keys, `meta`, unit aliases, a
    // top-level array and a `data` batch.
    "mqtt/sahool-platform-keys.json",
    "mqtt/sahool-top-level-array.json",
    "mqtt/sahool-data-batch.json",
    "mqtt/zigbee2mqtt-aqara.json",
    "mqtt/chirpstack-v4-uplink.json",
    "mqtt/tasmota-sensor.json",
];

/// The fixtures' `mapping` blocks, expressed in the gateway's config format.
fn config(nats: &Nats, broker: &Mosquitto) -> String {
    format!(
        r#"
[nats]
servers = ["{nats}"]

[[mqtt]]
name = "farm"
url = "{mqtt}"
topics = ["sahool/sensors/#"]
format = "sahool"

[[mqtt]]
name = "bridges"
url = "{mqtt}"
topics = ["zigbee2mqtt/#", "application/+/device/+/event/up", "tele/+/SENSOR"]
format = "json"

[[fields]]
id = "field-north-12"
  [[fields.sensors]]
  device_id = "soil-probe-7"
  sensor_type = "soil_moisture"

  [[fields.sensors]]
  device_id = "pump-house"
  sensor_type = "air_temperature"
  [fields.sensors.mqtt]
  topic = "tele/pump-house/SENSOR"
  value = "/BME280/Temperature"
  timestamp = "/Time"
  utc_offset = "+03:00"

  [[fields.sensors]]
  device_id = "pump-house"
  sensor_type = "air_humidity"
  [fields.sensors.mqtt]
  topic = "tele/pump-house/SENSOR"
  value = "/BME280/Humidity"
  timestamp = "/Time"
  utc_offset = "+03:00"

  [[fields.sensors]]
  device_id = "pump-house"
  sensor_type = "canopy_temperature"
  [fields.sensors.mqtt]
  topic = "tele/pump-house/SENSOR"
  value = "/DS18B20/Temperature"
  timestamp = "/Time"
  utc_offset = "+03:00"

[[fields]]
id = "field-orchard-3"
  [[fields.sensors]]
  device_id = "tank-2"
  sensor_type = "water_flow"
  [[fields.sensors]]
  device_id = "tank-2"
  sensor_type = "water_level"
  [[fields.sensors]]
  device_id = "wx-9"
  sensor_type = "wind_speed"
  [[fields.sensors]]
  device_id = "wx-9"
  sensor_type = "rainfall"
  [[fields.sensors]]
  device_id = "wx-9"
  sensor_type = "air_temperature"
  [[fields.sensors]]
  device_id = "wx-9"
  sensor_type = "leaf_wetness"

[[fields]]
id = "field-south-2"
  [[fields.sensors]]
  device_id = "wx-3"
  sensor_type = "air_temperature"

[[fields]]
id = "field-east-4"
  [[fields.sensors]]
  device_id = "node-11"
  sensor_type = "soil_moisture"
  [[fields.sensors]]
  device_id = "node-11"
  sensor_type = "soil_temperature"
  [[fields.sensors]]
  device_id = "node-11"
  sensor_type = "soil_ec"

[[fields]]
id = "greenhouse-1"
  [[fields.sensors]]
  device_id = "greenhouse-th-1"
  sensor_type = "air_temperature"
  [fields.sensors.mqtt]
  topic = "zigbee2mqtt/greenhouse-th-1"
  value = "/temperature"
  battery = "/battery"

  [[fields.sensors]]
  device_id = "greenhouse-th-1"
  sensor_type = "air_humidity"
  [fields.sensors.mqtt]
  topic = "zigbee2mqtt/greenhouse-th-1"
  value = "/humidity"
  battery = "/battery"

  [[fields.sensors]]
  device_id = "greenhouse-th-1"
  sensor_type = "atmospheric_pressure"
  [fields.sensors.mqtt]
  topic = "zigbee2mqtt/greenhouse-th-1"
  value = "/pressure"
  battery = "/battery"

[[fields]]
id = "field-west-9"
  [[fields.sensors]]
  device_id = "a84041000181c061"
  sensor_type = "soil_moisture"
  [fields.sensors.mqtt]
  topic = "application/+/device/a84041000181c061/event/up"
  value = "/object/water_SOIL"
  timestamp = "/time"
  rssi = "/rxInfo/0/rssi"

  [[fields.sensors]]
  device_id = "a84041000181c061"
  sensor_type = "soil_temperature"
  [fields.sensors.mqtt]
  topic = "application/+/device/a84041000181c061/event/up"
  value = "/object/temp_SOIL"
  timestamp = "/time"
  rssi = "/rxInfo/0/rssi"

  [[fields.sensors]]
  device_id = "a84041000181c061"
  sensor_type = "soil_ec"
  unit = "mS/cm"
  scale = 0.001
  [fields.sensors.mqtt]
  topic = "application/+/device/a84041000181c061/event/up"
  value = "/object/conduct_SOIL"
  timestamp = "/time"
  rssi = "/rxInfo/0/rssi"
"#,
        nats = nats.url(),
        mqtt = broker.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_becomes_exactly_its_expected_events() {
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let gateway = Gateway::start(&config(&nats, &broker));
    gateway.wait_until(
        "both MQTT sources connected",
        Duration::from_secs(20),
        |g| g.metric("sahool_gateway_mqtt_connected", "") == 2.0,
    );
    // The subscription is sent right after CONNACK; give the broker a moment to register it.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut messages = Vec::new();
    let mut expected = Vec::new();
    for name in FIXTURES {
        let f = fixture(name);
        messages.push((
            f["topic"].as_str().expect("topic").to_string(),
            f["payload"].as_str().expect("payload").as_bytes().to_vec(),
        ));
        for e in f["expect"].as_array().expect("expect") {
            expected.push((name, e.clone()));
        }
    }
    assert_eq!(
        publish_all(broker.port, "fixture-publisher", messages).await,
        FIXTURES.len()
    );

    let want = expected.len() as f64;
    gateway.wait_until("all readings forwarded", Duration::from_secs(30), |g| {
        g.metric("sahool_gateway_readings_forwarded_total", "") >= want
    });
    let all = nats.read_stream("SAHOOL_IOT").await;
    let events: Vec<_> = all
        .iter()
        .filter(|e| e.body["event_type"] == "sensor_reading")
        .cloned()
        .collect();
    assert_eq!(events.len(), expected.len(), "events: {events:#?}");

    // Every mapped sensor that reported announced itself once: `sensor.connected`.
    let status = support::status_validator();
    let mut connected = HashSet::new();
    for e in all
        .iter()
        .filter(|e| e.body["event_type"] == "device_status")
    {
        let errors: Vec<String> = status
            .iter_errors(&e.body["payload"])
            .map(|err| err.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "status payload violates device_status.v1.json: {errors:?}\n{:#}",
            e.body
        );
        assert_eq!(e.subject, "sahool.iot.sensor.connected");
        assert_eq!(e.body["payload"]["status"], "online");
        assert!(connected.insert(format!(
            "{}/{}",
            e.body["payload"]["device_id"], e.body["payload"]["sensor_type"]
        )));
    }
    assert_eq!(
        connected.len(),
        expected.len(),
        "one connected event per sensor: {connected:?}"
    );

    let validator = event_validator();
    let mut ids = HashSet::new();
    let mut last_seq = 0;
    for e in &events {
        let errors: Vec<String> = validator
            .iter_errors(&e.body)
            .map(|err| err.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "event violates the contract: {errors:?}\n{:#}",
            e.body
        );
        assert_eq!(e.subject, "sahool.iot.sensor.reading");
        let id = e.body["event_id"].as_str().expect("event_id");
        assert!(uuid::Uuid::parse_str(id).is_ok(), "event_id {id} is a UUID");
        assert_eq!(e.header("Nats-Msg-Id"), Some(id));
        assert_eq!(e.header("X-Event-ID"), Some(id));
        assert_eq!(e.header("X-Tenant-ID"), Some("tenant-a"));
        assert!(e.header("X-Correlation-ID").is_some() && e.header("X-Schema-Version").is_some());
        assert_eq!(e.body["event_type"], "sensor_reading");
        assert_eq!(e.body["aggregate_id"], e.body["payload"]["field_id"]);
        assert_eq!(e.body["source"]["gateway_id"], "gw-test");
        let seq = e.body["source"]["seq"].as_u64().expect("seq");
        assert!(seq > last_seq, "seq increases in stream order");
        last_seq = seq;
        assert!(ids.insert(id.to_string()), "duplicate event id");
    }
    for (name, expect) in &expected {
        let hits = events
            .iter()
            .filter(|e| matches_expected(&e.body["payload"], expect))
            .count();
        assert_eq!(
            hits,
            1,
            "{name}: expected reading {expect} found {hits} times in\n{:#?}",
            events
                .iter()
                .map(|e| &e.body["payload"])
                .collect::<Vec<_>>()
        );
    }
    assert_eq!(
        gateway.metric("sahool_gateway_readings_rejected_total", ""),
        0.0,
        "{}",
        gateway.log()
    );
}
