//! Entry points of the fuzz targets, shared by `fuzz_targets/*.rs` (built by `cargo fuzz`) and by
//! the corpus replay test (`tests/fuzz_corpus.rs`, which includes this file), so CI re-checks every
//! committed corpus input through exactly the code the fuzzer ran.
//!
//! Each entry point feeds the input to the gateway and checks what must hold for any input:
//! no panic, a reason for every rejection, and every accepted reading finite, stored and
//! rendered as an event that validates against `contracts/` (what the platform will accept).
//!
//! Inputs of the mapping targets are `topic NUL payload`; without a NUL byte the whole input is
//! the payload on a default topic. Serial decoders get their own entry point here when they land.

use std::sync::LazyLock;

use sahool_gateway::config::{self, Config};
use sahool_gateway::event::{self, Subjects};
use sahool_gateway::mapping::{Mapped, Mapper};
use sahool_gateway::reading::{Reading, Timestamp, KIND_READING};
use sahool_gateway::store::OutboxRow;
use serde_json::Value;

/// The fixtures' sensors and more (see the file's comment).
pub const MAPPING: &str = include_str!("../mapping.toml");

/// Receive time of every fuzzed message: fixed, so a crash replays exactly.
const RECEIVED: &str = "2026-06-01T04:20:00Z";

struct Fixture {
    config: Config,
    mapper: Mapper,
    subjects: Subjects,
    received: Timestamp,
    event_schema: jsonschema::Validator,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let config = config::parse(MAPPING).expect("fuzz/mapping.toml is a valid config");
    let mut event: Value =
        serde_json::from_str(include_str!("../../contracts/sensor_reading_event.v1.json"))
            .expect("event contract is JSON");
    event["properties"]["payload"] = serde_json::from_str(include_str!(
        "../../contracts/sahool/sensor_reading.v1.json"
    ))
    .expect("payload contract is JSON");
    let event_schema = jsonschema::options()
        .should_validate_formats(true)
        .build(&event)
        .expect("event schema compiles");
    Fixture {
        mapper: Mapper::new(&config),
        subjects: Subjects {
            reading: config.nats.subject.clone(),
            status: config.nats.status_subject.clone(),
        },
        received: Timestamp::parse_rfc3339(RECEIVED).expect("fixed receive time"),
        event_schema,
        config,
    }
});

/// A SAHOOL device message (standard, compact or batch form) on the `format = "sahool"` source.
pub fn sahool_payload(data: &[u8]) {
    map_and_check("farm", "sahool/sensors/soil-probe-7/field-north-12", data);
}

/// A message on the `format = "json"` source: every JSON-pointer binding whose topic matches.
pub fn json_mapping(data: &[u8]) {
    map_and_check("bridges", "zigbee2mqtt/greenhouse-th-1", data);
}

/// Config text through the parser `run` and `validate` share.
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        // `config::load` refuses non-UTF-8 files before parsing.
        return;
    };
    match config::parse(text) {
        Ok(config) => {
            // Whatever parses must be usable by the parts that start from it.
            let _ = Mapper::new(&config);
            for m in &config.mqtt {
                let _ = m.host_port();
                let _ = m.client_id(&config.gateway);
            }
            for field in &config.fields {
                for sensor in &field.sensors {
                    let _ = config.stale_after(sensor);
                }
            }
        }
        Err(problems) => {
            assert!(!problems.is_empty(), "refused without a problem");
            let lines = text.lines().count().max(1);
            for p in &problems {
                assert!(
                    (1..=lines + 1).contains(&p.line),
                    "problem on line {} of {lines}: {}",
                    p.line,
                    p.message
                );
                assert!(!p.message.trim().is_empty(), "problem without a message");
            }
        }
    }
}

fn map_and_check(source: &str, default_topic: &str, data: &[u8]) {
    let (topic, payload) = match data.iter().position(|b| *b == 0) {
        Some(i) => (
            String::from_utf8_lossy(&data[..i]).into_owned(),
            &data[i + 1..],
        ),
        None => (default_topic.to_string(), data),
    };
    let f = &*FIXTURE;
    let mapped = f.mapper.map_mqtt(source, &topic, payload, f.received);
    check(f, &mapped);
}

fn check(f: &Fixture, mapped: &Mapped) {
    for r in &mapped.rejections {
        assert!(
            !r.detail.is_empty(),
            "rejection {:?} without detail",
            r.reason
        );
    }
    for (i, reading) in mapped.readings.iter().enumerate() {
        check_reading(f, i as u64 + 1, reading);
    }
}

/// An accepted reading survives the outbox (postcard) and renders as a contract-valid event.
fn check_reading(f: &Fixture, seq: u64, reading: &Reading) {
    assert!(reading.value.is_finite(), "non-finite value: {reading:?}");
    for (what, v) in [
        ("battery", reading.battery),
        ("raw_value", reading.raw_value),
    ] {
        assert!(
            v.is_none_or(f64::is_finite),
            "non-finite {what}: {reading:?}"
        );
    }
    assert!(
        f.config
            .fields
            .iter()
            .any(|field| field.id.as_str() == reading.field_id),
        "reading for an unconfigured field: {reading:?}"
    );
    let body = postcard::to_stdvec(reading).expect("a reading serializes");
    let back: Reading = postcard::from_bytes(&body).expect("a stored reading decodes");
    assert_eq!(
        (&back.device_id, back.value, back.observed_at),
        (&reading.device_id, reading.value, reading.observed_at),
        "outbox round trip changed the reading"
    );
    let row = OutboxRow {
        seq,
        event_id: [0x5a; 16],
        stored_ms: f.received.unix_millis(),
        kind: KIND_READING,
        body,
    };
    let event = event::render(&row, f.config.gateway.id.as_str(), &f.subjects)
        .expect("a stored reading renders");
    let json: Value = serde_json::from_slice(&event.body).expect("event body is JSON");
    if let Err(e) = f.event_schema.validate(&json) {
        panic!("event violates the contract ({e}): {json}");
    }
}
