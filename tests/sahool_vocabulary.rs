//! `format = "sahool"` understands every device the SAHOOL platform understands: this walks the
//! platform's own normaliser rules (`tests/fixtures/sahool-normalizer.json`) through
//! `Mapper::map_mqtt`, so an alias, key or batch form added there fails here until supported.

use std::path::Path;

use serde_json::{json, Map, Value};

use sahool_gateway::config::{self, SubjectTemplate};
use sahool_gateway::ingest::mapping::{Mapped, Mapper, Reason};
use sahool_gateway::reading::{normalize_unit, Reading, SensorType, Timestamp};
use sahool_gateway::store::OutboxRow;
use sahool_gateway::uplink::event::{render, Subjects};

fn normalizer() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sahool-normalizer.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("normaliser rules"))
        .expect("normaliser JSON")
}

fn section(name: &str) -> Map<String, Value> {
    normalizer()[name]
        .as_object()
        .unwrap_or_else(|| panic!("`{name}` is an object"))
        .clone()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

/// `dev` in `field-1` with a sensor of every type; `p1` in `f1` as the platform's own tests use.
fn mapper() -> Mapper {
    let mut text = String::from(
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
max_payload = "8KiB"

[[fields]]
id = "field-1"
"#,
    );
    for t in SensorType::ALL {
        text.push_str(&format!(
            "  [[fields.sensors]]\n  device_id = \"dev\"\n  sensor_type = \"{t}\"\n"
        ));
    }
    text.push_str(
        r#"
[[fields]]
id = "f1"
  [[fields.sensors]]
  device_id = "p1"
  sensor_type = "soil_ec"
  [[fields.sensors]]
  device_id = "p1"
  sensor_type = "water_level"
"#,
    );
    Mapper::new(&config::parse(&text).expect("config"))
}

/// 2026-01-01T00:00:00Z, the receive time of every message here.
fn received() -> Timestamp {
    Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").expect("time")
}

/// A minute before `received`, in Unix seconds (how SAHOOL devices send numeric times).
const DEVICE_SECONDS: i64 = 1_767_225_540;

fn device_time() -> Timestamp {
    Timestamp(DEVICE_SECONDS * 1_000_000_000)
}

fn map(m: &Mapper, topic: &str, payload: &Value) -> Mapped {
    m.map_mqtt("farm", topic, payload.to_string().as_bytes(), received())
}

/// The one reading `payload` makes, or a panic saying what happened instead.
fn one(m: &Mapper, topic: &str, payload: &Value) -> Reading {
    let out = map(m, topic, payload);
    assert!(
        out.rejections.is_empty() && out.readings.len() == 1,
        "{payload}: {out:?}"
    );
    out.readings[0].clone()
}

/// A value inside the type's default range, so only the vocabulary decides.
fn plausible(t: SensorType) -> f64 {
    t.default_range().map_or(1.0, |(lo, hi)| (lo + hi) / 2.0)
}

fn casings(s: &str) -> Vec<String> {
    let mut title = s.to_string();
    if let Some(first) = title.get(..1) {
        title.replace_range(..1, &first.to_uppercase());
    }
    vec![s.to_string(), s.to_uppercase(), title, s.to_lowercase()]
}

#[test]
fn every_sensor_type_alias_maps_or_is_rejected_naming_its_type() {
    let m = mapper();
    let aliases = section("sensor_type_aliases");
    assert!(aliases.len() >= 17, "the rules list every type");
    for (name, list) in &aliases {
        let mut spellings = strings(list);
        spellings.push(name.clone());
        let known = SensorType::ALL.iter().find(|t| t.as_str() == name).copied();
        for alias in spellings.iter().flat_map(|a| casings(a)) {
            assert_eq!(SensorType::from_name(&alias), known, "`{alias}`");
            let value = known.map_or(1.0, plausible);
            let payload = json!({"device_id": "dev", "type": alias, "value": value});
            let out = map(&m, "sahool/sensors", &payload);
            match known {
                Some(t) => {
                    assert!(out.rejections.is_empty(), "`{alias}`: {out:?}");
                    assert_eq!(out.readings.len(), 1, "`{alias}`");
                    assert_eq!(out.readings[0].sensor_type, t, "`{alias}`");
                }
                None => {
                    assert!(out.readings.is_empty(), "`{alias}` is not renamed: {out:?}");
                    let r = &out.rejections[0];
                    assert_eq!(r.reason, Reason::UnknownSensorType, "`{alias}`");
                    assert!(
                        r.detail.contains(name.as_str()) && r.detail.contains("schema"),
                        "`{alias}`: the detail names {name}: {}",
                        r.detail
                    );
                }
            }
        }
    }
    let r = map(
        &m,
        "sahool/sensors",
        &json!({"device_id": "dev", "type": "tds", "value": 300}),
    );
    assert_eq!(
        r.rejections[0].detail,
        "dev: `tds` means water_quality, which the sensor_reading schema does not have"
    );
}

#[test]
fn every_unit_alias_normalises_to_the_platform_spelling() {
    let m = mapper();
    for (unit, list) in &section("unit_aliases") {
        let mut spellings = strings(list);
        spellings.push(unit.clone());
        for alias in spellings.iter().flat_map(|a| casings(a)) {
            assert_eq!(&normalize_unit(&alias), unit, "`{alias}`");
            assert_eq!(&normalize_unit(&format!("  {alias} ")), unit, "`{alias}`");
            let payload =
                json!({"device_id": "dev", "type": "soil_moisture", "value": 10, "unit": alias});
            assert_eq!(&one(&m, "sahool/sensors", &payload).unit, unit, "`{alias}`");
        }
    }
    // Unknown units are kept as sent, trimmed.
    let payload =
        json!({"device_id": "dev", "type": "water_pressure", "value": 2, "unit": " kPa "});
    assert_eq!(one(&m, "sahool/sensors", &payload).unit, "kPa");
}

#[test]
fn a_reading_without_unit_gets_the_platform_default() {
    let m = mapper();
    for (name, unit) in &section("default_units") {
        let t = SensorType::from_name(name).expect("a type of the schema");
        let unit = unit.as_str().expect("a unit");
        assert_eq!(t.default_unit(), unit, "{name}");
        let payload = json!({"device_id": "dev", "type": name, "value": plausible(t)});
        assert_eq!(one(&m, "sahool/sensors", &payload).unit, unit, "{name}");
    }
}

/// The standard single-reading payload, every key in its canonical spelling.
fn standard() -> Map<String, Value> {
    json!({
        "device_id": "dev",
        "field_id": "field-1",
        "type": "soil_moisture",
        "value": 12.5,
        "unit": "lx",
        "timestamp": DEVICE_SECONDS,
        "metadata": {"fw": "1.2"},
    })
    .as_object()
    .expect("object")
    .clone()
}

/// `standard()` with the member `canonical` renamed to `spelling`.
fn respelled(canonical: &str, spelling: &str) -> Value {
    let mut p = standard();
    let v = p.remove(canonical).expect("a standard key");
    p.insert(spelling.to_string(), v);
    Value::Object(p)
}

#[test]
fn every_payload_key_spelling_is_read() {
    let m = mapper();
    // No device, field or type in the topic: each must come from the payload.
    let topic = "sahool/sensors";
    for (key, spellings) in &section("payload_keys") {
        if key == "note" {
            continue;
        }
        for s in strings(spellings) {
            let what = format!("`{s}` for {key}");
            match key.as_str() {
                "device_id" => assert_eq!(one(&m, topic, &respelled(key, &s)).device_id, "dev"),
                "field_id" => {
                    assert_eq!(one(&m, topic, &respelled(key, &s)).field_id, "field-1");
                    let mut wrong = standard();
                    wrong.remove("field_id");
                    wrong.insert(s.clone(), json!("field-9"));
                    let out = map(&m, topic, &Value::Object(wrong));
                    assert_eq!(out.rejections[0].reason, Reason::FieldMismatch, "{what}");
                }
                "sensor_type" => {
                    let r = one(&m, topic, &respelled("type", &s));
                    assert_eq!(r.sensor_type, SensorType::SoilMoisture, "{what}");
                }
                "value" => assert_eq!(one(&m, topic, &respelled(key, &s)).value, 12.5),
                "unit" => assert_eq!(one(&m, topic, &respelled(key, &s)).unit, "lux"),
                "timestamp" => {
                    let r = one(&m, topic, &respelled(key, &s));
                    assert_eq!(r.observed_at, device_time(), "{what}");
                    let mut p = standard();
                    p.remove("timestamp");
                    // Milliseconds and RFC 3339 are read too.
                    for t in [json!(DEVICE_SECONDS * 1000), json!("2025-12-31T23:59:00Z")] {
                        p.insert(s.clone(), t);
                        let r = one(&m, topic, &Value::Object(p.clone()));
                        assert_eq!(r.observed_at, device_time(), "{what}");
                    }
                }
                "metadata" => {
                    let r = one(&m, topic, &respelled(key, &s));
                    assert_eq!(r.metadata.as_deref(), Some(r#"{"fw":"1.2"}"#), "{what}");
                }
                "metadata_promoted" => promoted(&m, &s),
                other => panic!(
                    "the rules have a new payload key `{other}`: support it and test it here"
                ),
            }
        }
    }
}

/// `battery` / `rssi` from the reading, from the batch, or from inside the metadata.
fn promoted(m: &Mapper, key: &str) {
    let got = |r: &Reading| match key {
        "battery" => r.battery,
        "rssi" => r.rssi.map(|n| n as f64),
        other => panic!("the rules promote a new metadata key `{other}`: support it here"),
    };
    let topic = "sahool/sensors";
    let mut own = standard();
    own.insert(key.into(), json!(-60));
    assert_eq!(
        got(&one(m, topic, &Value::Object(own))),
        Some(-60.0),
        "{key}"
    );
    let in_meta = json!({"device_id": "dev", "type": "soil_moisture", "value": 1, "meta": {key: -61, "fw": "1.2"}});
    let r = one(m, topic, &in_meta);
    assert_eq!(got(&r), Some(-61.0), "{key} inside metadata");
    assert_eq!(
        r.metadata.as_deref(),
        Some(r#"{"fw":"1.2"}"#),
        "a promoted {key} leaves the device metadata"
    );
    let batch =
        json!({"device_id": "dev", key: -62, "readings": [{"type": "soil_moisture", "value": 1}]});
    assert_eq!(
        got(&one(m, topic, &batch)),
        Some(-62.0),
        "{key} of the batch"
    );
}

#[test]
fn every_batch_form_is_read() {
    let m = mapper();
    let forms = normalizer()["batch_forms"].clone();
    for form in strings(&forms) {
        if let Some(rest) = form.strip_prefix("{\"") {
            let key = rest.split('"').next().expect("a member name");
            batch_object(&m, key);
        } else if form.starts_with("a top-level JSON array") {
            top_level_array(&m);
        } else {
            panic!("the rules have a new batch form `{form}`: support it and test it here");
        }
    }
}

/// Items share the batch's device, field, time, battery, RSSI and metadata unless they set
/// their own; a malformed item is rejected alone.
fn batch_object(m: &Mapper, key: &str) {
    let payload = json!({
        "d": "dev", "f": "field-1", "ts": DEVICE_SECONDS, "battery": 80, "rssi": -70,
        "meta": {"fw": "1.2"},
        key: [
            {"t": "soil_moisture", "v": 20},
            {"type": "air_temperature", "val": 21.5, "u": "celsius", "time": DEVICE_SECONDS - 60,
             "battery": 79, "metadata": {"slot": 2}},
            7,
            {"type": "soil_ph", "value": 99},
        ],
    });
    let out = map(m, "sahool/sensors", &payload);
    let reasons: Vec<Reason> = out.rejections.iter().map(|r| r.reason).collect();
    assert_eq!(
        reasons,
        [Reason::Malformed, Reason::OutOfRange],
        "{key}: {out:?}"
    );
    let [first, second] = out.readings.as_slice() else {
        panic!("{key}: two readings: {out:?}")
    };
    assert_eq!(
        (first.device_id.as_str(), first.sensor_type, first.value),
        ("dev", SensorType::SoilMoisture, 20.0)
    );
    assert_eq!(first.observed_at, device_time(), "{key}");
    assert_eq!(
        (first.battery, first.rssi),
        (Some(80.0), Some(-70)),
        "{key}"
    );
    assert_eq!(first.metadata.as_deref(), Some(r#"{"fw":"1.2"}"#), "{key}");
    assert_eq!(
        (second.sensor_type, second.value, second.unit.as_str()),
        (SensorType::AirTemperature, 21.5, "°C")
    );
    assert_eq!(
        second.observed_at,
        Timestamp(device_time().0 - 60_000_000_000)
    );
    assert_eq!(
        (second.battery, second.rssi),
        (Some(79.0), Some(-70)),
        "{key}"
    );
    assert_eq!(second.metadata.as_deref(), Some(r#"{"slot":2}"#), "{key}");
}

/// Each object of a top-level array is a reading of its own; the topic still fills in.
fn top_level_array(m: &Mapper) {
    let payload = json!([
        {"deviceId": "dev", "sensorType": "wl", "val": 120, "u": "cm"},
        {"deviceId": "p1", "fieldId": "f1", "sensorType": "soil_ec", "val": 2.5, "u": "ms_cm"},
        "junk",
        {"value": 1},
    ]);
    let out = map(m, "sahool/sensors", &payload);
    assert_eq!(out.readings.len(), 2, "{out:?}");
    assert_eq!(
        (
            out.readings[0].device_id.as_str(),
            out.readings[0].sensor_type
        ),
        ("dev", SensorType::WaterLevel)
    );
    assert_eq!(
        (
            out.readings[1].field_id.as_str(),
            out.readings[1].unit.as_str()
        ),
        ("f1", "mS/cm")
    );
    let reasons: Vec<Reason> = out.rejections.iter().map(|r| r.reason).collect();
    assert_eq!(reasons, [Reason::Malformed, Reason::Malformed], "{out:?}");
    let with_topic = json!([{"v": 1}, {"v": 2}]);
    let out = map(m, "sahool/sensors/p1/f1/water_level", &with_topic);
    assert_eq!(out.readings.len(), 2, "{out:?}");
}

/// The payloads of the platform normaliser's own tests.
#[test]
fn the_platform_normaliser_test_payloads_are_accepted() {
    let m = mapper();
    let r = one(
        &m,
        "sahool/sensors",
        &json!({"deviceId": "p1", "fieldId": "f1", "sensorType": "soil_ec", "val": 2.5, "u": "mS/cm"}),
    );
    assert_eq!(
        (
            r.device_id.as_str(),
            r.field_id.as_str(),
            r.sensor_type,
            r.value,
            r.unit.as_str()
        ),
        ("p1", "f1", SensorType::SoilEc, 2.5, "mS/cm")
    );
    let r = one(
        &m,
        "sahool/sensors",
        &json!({"device_id": "p1", "field_id": "f1", "type": "wl", "value": 120}),
    );
    assert_eq!(
        (r.sensor_type, r.unit.as_str()),
        (SensorType::WaterLevel, "cm")
    );
    let r = one(
        &m,
        "sahool/sensors",
        &json!({"d": "p1", "f": "f1", "t": "WL", "v": 1, "ts": DEVICE_SECONDS}),
    );
    assert_eq!(r.observed_at, device_time());
}

/// The event of a reading with device metadata, as the forwarder renders it.
fn event_of(r: &Reading) -> Value {
    let (kind, body) = r.to_row();
    let row = OutboxRow {
        seq: 1,
        event_id: [1; 16],
        stored_ms: 1_767_225_600_000,
        kind,
        body,
        trace: None,
    };
    let subjects = Subjects {
        reading: SubjectTemplate::default(),
        status: SubjectTemplate::default_status(),
    };
    let e = render(&row, "gw", &subjects).expect("renders");
    serde_json::from_slice(&e.body).expect("JSON")
}

fn event_validator() -> jsonschema::Validator {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("contracts");
    let read = |p: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(root.join(p)).expect("contract"))
            .expect("contract JSON")
    };
    let mut event = read("sensor_reading_event.v1.json");
    event["properties"]["payload"] = read("sahool/sensor_reading.v1.json");
    jsonschema::validator_for(&event).expect("schema compiles")
}

#[test]
fn device_metadata_is_carried_bounded_and_never_overrides_the_gateways_keys() {
    let m = mapper();
    let validator = event_validator();
    let valid = |v: &Value| {
        let errors: Vec<String> = validator.iter_errors(v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}\n{v:#}");
    };
    // Colliding keys: the gateway's win, the device's are kept as `device_<key>`.
    let payload = json!({"device_id": "dev", "type": "soil_moisture", "value": 10, "battery": 90,
        "metadata": {"battery": "low", "raw_value": "x", "original_timestamp": 3, "rssi": -50,
                     "device_raw_value": 1, "nested": {"a": [1, 2]}}});
    let r = one(&m, "sahool/sensors", &payload);
    assert_eq!((r.battery, r.rssi), (Some(90.0), Some(-50)));
    let e = event_of(&r);
    valid(&e);
    assert_eq!(
        e["payload"]["metadata"],
        json!({"battery": 90.0, "rssi": -50, "device_battery": "low",
               "device_device_raw_value": "x", "device_raw_value": 1,
               "device_original_timestamp": 3, "nested": {"a": [1, 2]}})
    );

    // Not an object: ignored, the reading kept.
    let payload = json!({"device_id": "dev", "type": "soil_moisture", "value": 10, "meta": [1]});
    let r = one(&m, "sahool/sensors", &payload);
    assert_eq!(r.metadata, None);
    assert!(event_of(&r)["payload"].get("metadata").is_none());

    // Over a bound (33 keys, or over 1 KiB of text): the reading kept, a note instead.
    let many: Map<String, Value> = (0..33).map(|i| (format!("k{i}"), json!(i))).collect();
    let long = json!({"blob": "x".repeat(1100)});
    for meta in [Value::Object(many), long] {
        let payload =
            json!({"device_id": "dev", "type": "soil_moisture", "value": 10, "meta": meta});
        let r = one(&m, "sahool/sensors", &payload);
        let e = event_of(&r);
        valid(&e);
        let note = e["payload"]["metadata"]["device_metadata_dropped"]
            .as_str()
            .expect("a note");
        assert!(note.contains("exceeds 32 keys or 1024 bytes"), "{note}");
        assert_eq!(e["payload"]["metadata"].as_object().map(Map::len), Some(1));
    }
    // At the bound: kept.
    let full: Map<String, Value> = (0..32).map(|i| (format!("k{i}"), json!(i))).collect();
    let payload = json!({"device_id": "dev", "type": "soil_moisture", "value": 10, "meta": full});
    let e = event_of(&one(&m, "sahool/sensors", &payload));
    valid(&e);
    assert_eq!(e["payload"]["metadata"].as_object().map(Map::len), Some(32));
}
