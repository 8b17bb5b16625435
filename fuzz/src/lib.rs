//! Entry points of the fuzz targets, shared by `fuzz_targets/*.rs` (built by `cargo fuzz`) and by
//! the corpus replay test (`tests/fuzz_corpus.rs`, which includes this file), so CI re-checks every
//! committed corpus input through exactly the code the fuzzer ran.
//!
//! Each entry point feeds the input to the gateway and checks what must hold for any input:
//! no panic, a reason for every rejection, and every accepted reading finite, stored and
//! rendered as an event that validates against `contracts/` (what the platform will accept).
//!
//! Inputs of the mapping targets are `topic NUL payload`; without a NUL byte the whole input is
//! the payload on a default topic. The serial targets take what a port reads (see each entry
//! point for its few header bytes) and map what decodes through the fuzz mapping's ports.

use std::sync::LazyLock;

use sahool_gateway::config::{self, Config};
use sahool_gateway::ingest::mapping::{Mapped, Mapper, SerialKey, SerialValue};
use sahool_gateway::reading::{Reading, Timestamp};
use sahool_gateway::sources::serial::lines::{self, Framed, LineBuffer, LineSpec};
use sahool_gateway::sources::serial::modbus::{self, frame::crc16, port::Bus, RegisterKind};
use sahool_gateway::sources::serial::sdi12::{self, Expect, Response};
use sahool_gateway::sources::serial::PortPlan;
use sahool_gateway::store::OutboxRow;
use sahool_gateway::uplink::event::{self, Subjects};
use serde_json::Value;

/// The fixtures' sensors and more (see the file's comment).
pub const MAPPING: &str = include_str!("../mapping.toml");

/// Receive time of every fuzzed message: fixed, so a crash replays exactly.
const RECEIVED: &str = "2026-06-01T04:20:00Z";

struct Fixture {
    config: Config,
    mapper: Mapper,
    /// The `bus` port's sensors as its Modbus engine polls them.
    bus: Bus,
    /// The `lines` ports by name.
    line_ports: Vec<(String, LineSpec)>,
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
    let ports = PortPlan::all(&config);
    let bus = ports
        .iter()
        .find(|p| p.port.name.as_str() == "bus")
        .map(|p| Bus::of(&p.sensors, p.port.poll_interval()).expect("the fuzz bus plans"))
        .expect("fuzz/mapping.toml has a port `bus`");
    let line_ports = config
        .serial
        .iter()
        .filter(|p| p.protocol == config::Protocol::Lines)
        .map(|p| (p.name.to_string(), LineSpec::of(p)))
        .collect();
    Fixture {
        mapper: Mapper::new(&config),
        bus,
        line_ports,
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
                assert!(!m.url.host.is_empty() && m.url.port != 0, "{}", m.url);
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

/// A Modbus RTU answer to a register read. Input: `unit, flags, count, frame…`.
///
/// The frame is parsed as the answer to reading `count` registers (any byte, so 0 and counts
/// over 125 too) of the kind `flags & 1` from `unit`; with `flags & 0x80` its last two bytes are
/// replaced by the right CRC first, so the fuzzer explores frame bodies rather than checksums.
/// An accepted frame must be exactly the canonical answer to that read. The same frame is
/// parsed as the answer to reading `count` coils and to a write of address `count`, value
/// `flags` (accepted only as that exact echo). Then the frame's bytes,
/// taken as registers, are decoded by each request of the fuzz bus's poll plan and mapped.
pub fn modbus_response(data: &[u8]) {
    let [unit, flags, count, frame @ ..] = data else {
        return;
    };
    let kind = if flags & 1 == 0 {
        RegisterKind::Holding
    } else {
        RegisterKind::Input
    };
    let mut frame = frame.to_vec();
    if flags & 0x80 != 0 && frame.len() >= 2 {
        let body = frame.len() - 2;
        let crc = crc16(&frame[..body]);
        frame[body..].copy_from_slice(&crc);
    }
    if let Ok(registers) = modbus::parse_response(*unit, kind, u16::from(*count), &frame) {
        assert_eq!(registers.len(), usize::from(*count), "register count");
        let byte_count = u8::try_from(2 * u16::from(*count)).expect("a byte count fits a byte");
        let mut canonical = vec![*unit, kind.function_code(), byte_count];
        for r in &registers {
            canonical.extend_from_slice(&r.to_be_bytes());
        }
        let crc = crc16(&canonical);
        canonical.extend_from_slice(&crc);
        assert_eq!(
            canonical, frame,
            "accepted a frame that is not the canonical answer"
        );
    }

    // The same bytes as the answer to a coil read and to a write (an actuator's).
    if let Ok(coils) = modbus::parse_coils(*unit, u16::from(*count), &frame) {
        assert_eq!(coils.len(), usize::from(*count), "coil count");
    }
    let echo = modbus::Echo {
        function: frame.get(1).copied().unwrap_or(0x05) & 0x7F,
        address: u16::from(*count),
        value: u16::from(*flags),
    };
    if modbus::parse_write_echo(*unit, echo, &frame).is_ok() {
        assert_eq!(frame.len(), 8, "a write's answer is 8 bytes");
        assert_eq!(
            frame[2..6],
            [0, *count, 0, *flags],
            "only the request's echo"
        );
    }

    let f = &*FIXTURE;
    let registers: Vec<u16> = frame
        .chunks_exact(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]))
        .collect();
    for group in &f.bus.groups {
        for request in &group.plan.requests {
            let values: Vec<SerialValue> = request
                .decode(&registers)
                .into_iter()
                .filter_map(|(id, value)| {
                    let value = value.ok()?;
                    assert!(value.is_finite(), "decoded a non-finite value");
                    Some(SerialValue::number(f.bus.keys[id].clone(), value))
                })
                .collect();
            check(f, &f.mapper.map_serial("bus", &values, f.received));
        }
    }
}

/// An SDI-12 response line, parsed as each kind of response. A data response's values are
/// mapped as address `a`'s values 1, 2, … on the fuzz SDI-12 port.
pub fn sdi12_response(data: &[u8]) {
    let f = &*FIXTURE;
    for expect in Expect::ALL {
        let Ok(response) = sdi12::parse_response(expect, data) else {
            continue;
        };
        match response {
            Response::Address(a) => assert!(a.as_char().is_ascii_alphanumeric()),
            Response::Measurement(m) => {
                assert!(m.seconds <= 999 && m.count <= 99, "{m:?}");
                if !matches!(expect, Expect::Measurement { concurrent: true }) {
                    assert!(m.count <= 9, "{m:?}");
                }
            }
            Response::Data(d) => {
                assert!(d.values.iter().all(|v| v.is_finite()), "{d:?}");
                if expect == (Expect::Data { crc: true }) {
                    // Without its three CRC characters the line is the same data.
                    let line = data.strip_suffix(b"\r\n").unwrap_or(data);
                    let plain =
                        sdi12::parse_response(Expect::Data { crc: false }, &line[..line.len() - 3]);
                    assert_eq!(plain, Ok(Response::Data(d.clone())), "CRC changed the data");
                }
                let values: Vec<SerialValue> = d
                    .values
                    .iter()
                    .zip(1u16..)
                    .map(|(v, index)| {
                        let key = SerialKey::Sdi12 {
                            address: d.address.as_char(),
                            index,
                        };
                        SerialValue::number(key, *v)
                    })
                    .collect();
                check(f, &f.mapper.map_serial("sdi", &values, f.received));
            }
        }
    }
}

/// Bytes from a line talker, framed into lines (in one read and cut in two, which must frame
/// alike) and each line read and mapped in each form: `kv`, `csv` and `json`.
pub fn serial_line(data: &[u8]) {
    let f = &*FIXTURE;
    for (port, spec) in &f.line_ports {
        let whole = frame_lines(spec.max_line, &[data]);
        let (a, b) = data.split_at(data.len() / 2);
        assert_eq!(
            frame_lines(spec.max_line, &[a, b]),
            whole,
            "framing depends on the read cut"
        );
        for framed in whole {
            let line = match framed {
                Framed::Line(line) => {
                    assert!(line.len() <= spec.max_line && !line.contains(&b'\n'));
                    line
                }
                Framed::Overlong(head) => {
                    assert_eq!(head.len(), spec.max_line);
                    continue;
                }
            };
            if let Ok(Some(parsed)) = lines::parse_line(spec, &line) {
                for (key, _) in &parsed.values {
                    assert!(
                        !config::serial::RESERVED_LINE_KEYS.contains(&key.as_str()),
                        "the gateway's own key {key} taken as a value"
                    );
                }
            }
            check(
                f,
                &lines::map_line(&f.mapper, port, spec, &line, f.received),
            );
        }
    }
}

fn frame_lines(max_line: usize, reads: &[&[u8]]) -> Vec<Framed> {
    let mut buffer = LineBuffer::new(max_line);
    let mut out = Vec::new();
    for read in reads {
        buffer.push(read, &mut out);
    }
    out
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
    let (kind, body) = reading.to_row();
    let back = Reading::from_row(kind, &body).expect("a stored reading decodes");
    assert_eq!(
        (
            &back.device_id,
            back.value,
            back.observed_at,
            &back.metadata
        ),
        (
            &reading.device_id,
            reading.value,
            reading.observed_at,
            &reading.metadata
        ),
        "outbox round trip changed the reading"
    );
    let row = OutboxRow {
        seq,
        event_id: [0x5a; 16],
        stored_ms: f.received.unix_millis(),
        kind,
        body,
        trace: None,
    };
    let event = event::render(&row, f.config.gateway.id.as_str(), &f.subjects)
        .expect("a stored reading renders");
    let json: Value = serde_json::from_slice(&event.body).expect("event body is JSON");
    if let Err(e) = f.event_schema.validate(&json) {
        panic!("event violates the contract ({e}): {json}");
    }
}
