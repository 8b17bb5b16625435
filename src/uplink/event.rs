//! The event contract (`contracts/sensor_reading_event.v1.json`): a buffered row rendered as
//! SAHOOL's IoT envelope around a `sensor_reading` payload, its subject and its headers; and
//! likewise liveness changes (`device_status`), command results
//! (`contracts/actuator_command_result.v1.json`) and heartbeats
//! (`contracts/gateway_status.v1.json`).

use std::sync::Arc;

use async_nats::header::{HeaderMap, HeaderName};
use async_nats::Subject;
use bytes::Bytes;
use serde::Serialize;

use crate::common::trace::{self, TraceParent, TraceText};
use crate::config::SubjectTemplate;
use crate::reading::{
    BodyError, ReadingView, SensorStatus, SensorType, StatusChange, Timestamp, KIND_CONFIG,
    KIND_HEARTBEAT, KIND_READING, KIND_READING_META, KIND_RESULT, KIND_STATUS,
};
use crate::store::inbox::ResultBody;
use crate::store::OutboxRow;

pub(crate) const SERVICE: &str = "sahool-gateway";
pub const SCHEMA_VERSION: &str = "1";
/// Where command results go (DESIGN §8), whatever the reading subjects are.
pub const RESULT_SUBJECT: &str = "sahool.iot.actuator.result";
/// Where heartbeats go (DESIGN §9).
pub const GATEWAY_STATUS_SUBJECT: &str = "sahool.iot.gateway.status";
/// Where remote config outcomes go (DESIGN §9).
pub const GATEWAY_CONFIG_SUBJECT: &str = "sahool.iot.gateway.config";

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("buffered row {seq} cannot be decoded ({source}); it was written by an incompatible version")]
    Decode { seq: u64, source: BodyError },
    #[error("buffered row {seq} has unknown kind {kind}")]
    Kind { seq: u64, kind: u8 },
    #[error("buffered command result or heartbeat {seq} cannot be decoded ({source})")]
    Result { seq: u64, source: serde_json::Error },
}

/// A row ready to publish. Subject and body are shared buffers: a publish and a later retry
/// or dead-letter use them without copying.
#[derive(Debug, Clone)]
pub struct Event {
    pub seq: u64,
    pub event_id: String,
    pub tenant_id: String,
    /// The event's own id, or for a command result the command's correlation id.
    pub correlation_id: String,
    pub subject: Subject,
    pub body: Bytes,
    /// The `traceparent` header: the device's, or derived from the event id (`common::trace`).
    pub traceparent: TraceText,
    /// The device's `tracestate`, passed on with its `traceparent`.
    pub tracestate: Option<Arc<str>>,
}

/// Room for a rendered event, so the body is written without growing its buffer.
const BODY_CAPACITY: usize = 768;

/// The subjects events go to: readings, and liveness changes (`{status}` is `connected`,
/// `disconnected` or `warning`).
#[derive(Debug, Clone)]
pub struct Subjects {
    pub reading: SubjectTemplate,
    pub status: SubjectTemplate,
}

/// A JSON object written straight into a buffer. Keys are constants of this module and need
/// no escaping; string values are escaped by serde_json, numbers formatted by it. Cheaper than
/// serializing structs: every event goes through here.
struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> JsonObject<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, empty: true }
    }

    fn key(&mut self, key: &str) {
        if !std::mem::take(&mut self.empty) {
            self.out.push(b',');
        }
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *self.out, value);
    }

    /// A value made of digits and punctuation only (a UUID, an RFC 3339 time).
    fn plain_str(&mut self, key: &str, value: &str) {
        self.key(key);
        self.out.push(b'"');
        self.out.extend_from_slice(value.as_bytes());
        self.out.push(b'"');
    }

    fn number<N: Serialize>(&mut self, key: &str, value: N) {
        self.key(key);
        let _ = serde_json::to_writer(&mut *self.out, &value);
    }

    fn optional<V>(&mut self, key: &str, value: Option<V>, write: impl FnOnce(&mut Self, &str, V)) {
        if let Some(v) = value {
            write(self, key, v);
        }
    }

    /// Members already in JSON form (`"a":1,"b":[2]`), as the text of an object without its
    /// braces.
    fn raw_members(&mut self, members: &str) {
        if !std::mem::take(&mut self.empty) {
            self.out.push(b',');
        }
        self.out.extend_from_slice(members.as_bytes());
    }

    fn object(&mut self, key: &str) -> JsonObject<'_> {
        self.key(key);
        JsonObject::new(self.out)
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

/// Where a row's event goes and what identifies it, whatever its kind.
struct Routing<'a> {
    row: &'a OutboxRow,
    gateway_id: &'a str,
    tenant_id: &'a str,
    field_id: &'a str,
    /// The command's, for a result; otherwise (`None`, or empty) the event id stands in.
    correlation_id: Option<&'a str>,
}

impl Routing<'_> {
    /// A sensor event's subject from its template.
    fn subject(
        &self,
        template: &SubjectTemplate,
        device_id: &str,
        sensor_type: SensorType,
        status: &str,
    ) -> String {
        template.render(|name| match name {
            "tenant_id" => self.tenant_id.to_string(),
            "field_id" => self.field_id.to_string(),
            "gateway_id" => self.gateway_id.to_string(),
            "device_id" => device_id.to_string(),
            "sensor_type" => sensor_type.as_str().to_string(),
            "status" => status.to_string(),
            _ => String::new(),
        })
    }

    /// SAHOOL's envelope around the payload `write_payload` writes.
    fn event(
        self,
        event_type: &'static str,
        write_payload: impl FnOnce(&mut JsonObject<'_>),
        subject: String,
    ) -> Event {
        let mut id = uuid::Uuid::encode_buffer();
        let event_id = uuid::Uuid::from_bytes(self.row.event_id)
            .hyphenated()
            .encode_lower(&mut id);
        let mut body = Vec::with_capacity(BODY_CAPACITY);
        let mut envelope = JsonObject::new(&mut body);
        envelope.plain_str("event_id", event_id);
        envelope.plain_str("event_type", event_type);
        envelope.number("version", 1);
        envelope.str("aggregate_id", self.field_id);
        envelope.str("tenant_id", self.tenant_id);
        let correlation_id = self.correlation_id.filter(|c| !c.is_empty());
        let correlation_id = correlation_id.unwrap_or(event_id);
        envelope.str("correlation_id", correlation_id);
        let stored = Timestamp::from_unix_millis(self.row.stored_ms).rfc3339();
        envelope.plain_str("timestamp", stored.as_str());
        let mut source = envelope.object("source");
        source.plain_str("service", SERVICE);
        source.str("version", env!("CARGO_PKG_VERSION"));
        source.str("gateway_id", self.gateway_id);
        source.number("seq", self.row.seq);
        source.end();
        let mut payload = envelope.object("payload");
        write_payload(&mut payload);
        payload.end();
        envelope.end();
        let (parent, tracestate) = match &self.row.trace {
            Some(device) => (device.parent, device.state.clone()),
            None => (TraceParent::derived(&self.row.event_id), None),
        };
        Event {
            seq: self.row.seq,
            traceparent: parent.text(),
            tracestate,
            tenant_id: self.tenant_id.to_string(),
            correlation_id: correlation_id.to_string(),
            event_id: event_id.to_string(),
            subject: Subject::from(subject),
            body: Bytes::from(body),
        }
    }
}

/// `contracts/sahool/sensor_reading.v1.json`
fn reading_payload(p: &mut JsonObject<'_>, r: &ReadingView<'_>) {
    p.str("device_id", r.device_id);
    p.str("field_id", r.field_id);
    p.plain_str("sensor_type", r.sensor_type.as_str());
    p.number("value", r.value);
    p.str("unit", r.unit);
    p.plain_str("timestamp", r.observed_at.rfc3339().as_str());
    let original = r.original_timestamp.map(Timestamp::rfc3339);
    // The device's own members; the mapping renamed any key of ours, so none repeats.
    let device = r
        .metadata
        .and_then(|m| m.trim().strip_prefix('{')?.strip_suffix('}'))
        .filter(|members| !members.trim().is_empty());
    if r.battery.is_some()
        || r.rssi.is_some()
        || r.raw_value.is_some()
        || original.is_some()
        || device.is_some()
    {
        let mut m = p.object("metadata");
        m.optional("battery", r.battery, JsonObject::number);
        m.optional("rssi", r.rssi, JsonObject::number);
        m.optional("raw_value", r.raw_value, JsonObject::number);
        // The device's own time when the timestamp policy replaced it.
        m.optional("original_timestamp", original, |m, k, t| {
            m.plain_str(k, t.as_str())
        });
        if let Some(members) = device {
            m.raw_members(members);
        }
        m.end();
    }
}

/// `contracts/sahool/device_status.v1.json`, for one sensor of the device.
fn status_payload(p: &mut JsonObject<'_>, c: &StatusChange) {
    let (status, error) = match c.status {
        SensorStatus::Online => ("online", None),
        SensorStatus::Offline => ("offline", None),
        SensorStatus::LowBattery => ("warning", Some("low_battery")),
    };
    p.str("device_id", &c.device_id);
    p.str("field_id", &c.field_id);
    p.plain_str("sensor_type", c.sensor_type.as_str());
    p.plain_str("status", status);
    p.plain_str("last_seen", c.last_seen.rfc3339().as_str());
    p.optional(
        "battery_level",
        c.battery.map(|b| b.clamp(0.0, 100.0)),
        JsonObject::number,
    );
    p.optional("signal_strength", c.rssi, JsonObject::number);
    if let Some(code) = error {
        p.plain_str("error_code", code);
        p.str(
            "error_message",
            &format!("battery at {}%", c.battery.unwrap_or(0.0)),
        );
    }
}

/// Renders a buffered row as its event.
pub fn render(row: &OutboxRow, gateway_id: &str, subjects: &Subjects) -> Result<Event, EventError> {
    let decode_error = |source| EventError::Decode {
        seq: row.seq,
        source,
    };
    match row.kind {
        KIND_READING | KIND_READING_META => {
            let r = ReadingView::from_row(row.kind, &row.body).map_err(decode_error)?;
            let routing = Routing {
                row,
                gateway_id,
                tenant_id: r.tenant_id,
                field_id: r.field_id,
                correlation_id: None,
            };
            let subject = routing.subject(&subjects.reading, r.device_id, r.sensor_type, "reading");
            let payload = |p: &mut JsonObject<'_>| reading_payload(p, &r);
            Ok(routing.event("sensor_reading", payload, subject))
        }
        KIND_STATUS => {
            let c: StatusChange =
                postcard::from_bytes(&row.body).map_err(|e| decode_error(e.into()))?;
            let subject_status = match c.status {
                SensorStatus::Online => "connected",
                SensorStatus::Offline => "disconnected",
                SensorStatus::LowBattery => "warning",
            };
            let routing = Routing {
                row,
                gateway_id,
                tenant_id: &c.tenant_id,
                field_id: &c.field_id,
                correlation_id: None,
            };
            let subject = routing.subject(
                &subjects.status,
                &c.device_id,
                c.sensor_type,
                subject_status,
            );
            let payload = |p: &mut JsonObject<'_>| status_payload(p, &c);
            Ok(routing.event("device_status", payload, subject))
        }
        KIND_RESULT => json_event(row, gateway_id, "actuator_command_result", RESULT_SUBJECT),
        KIND_HEARTBEAT => json_event(row, gateway_id, "gateway_status", GATEWAY_STATUS_SUBJECT),
        KIND_CONFIG => json_event(row, gateway_id, "gateway_config", GATEWAY_CONFIG_SUBJECT),
        kind => Err(EventError::Kind { seq: row.seq, kind }),
    }
}

/// A row whose body is a [`ResultBody`]: a command result (the payload as the core made it, in
/// the command's envelope: its tenant and correlation id) or a heartbeat (the gateway's tenant,
/// no correlation id). aggregate_id is the field the payload names, else the gateway.
fn json_event(
    row: &OutboxRow,
    gateway_id: &str,
    event_type: &'static str,
    subject: &str,
) -> Result<Event, EventError> {
    let b: ResultBody = serde_json::from_slice(&row.body).map_err(|source| EventError::Result {
        seq: row.seq,
        source,
    })?;
    let field_id = b.payload.get("field_id").and_then(|f| f.as_str());
    let field_id = field_id.unwrap_or(gateway_id);
    let routing = Routing {
        row,
        gateway_id,
        tenant_id: &b.tenant_id,
        field_id,
        correlation_id: Some(&b.correlation_id),
    };
    // Written whole by serde_json, so the keys are escaped too (they come from the file).
    let members = serde_json::to_string(&b.payload).unwrap_or_default();
    let members = members
        .strip_prefix('{')
        .and_then(|m| m.strip_suffix('}'))
        .unwrap_or_default()
        .to_string();
    let payload = |p: &mut JsonObject<'_>| p.raw_members(&members);
    Ok(routing.event(event_type, payload, subject.to_string()))
}

const NATS_MSG_ID: HeaderName = HeaderName::from_static("Nats-Msg-Id");
const X_EVENT_ID: HeaderName = HeaderName::from_static("X-Event-ID");
const X_TENANT_ID: HeaderName = HeaderName::from_static("X-Tenant-ID");
const X_CORRELATION_ID: HeaderName = HeaderName::from_static("X-Correlation-ID");
const X_SCHEMA_VERSION: HeaderName = HeaderName::from_static("X-Schema-Version");
const TRACEPARENT: HeaderName = HeaderName::from_static(trace::TRACEPARENT);
const TRACESTATE: HeaderName = HeaderName::from_static(trace::TRACESTATE);

/// The headers SAHOOL's publisher sets, plus `Nats-Msg-Id` for JetStream de-duplication and
/// W3C `traceparent` (and the device's `tracestate`) so the platform's traces start at the
/// sensor.
pub fn headers(event: &Event) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(NATS_MSG_ID, event.event_id.as_str());
    h.insert(X_EVENT_ID, event.event_id.as_str());
    h.insert(X_TENANT_ID, event.tenant_id.as_str());
    h.insert(X_CORRELATION_ID, event.correlation_id.as_str());
    h.insert(X_SCHEMA_VERSION, SCHEMA_VERSION);
    h.insert(TRACEPARENT, event.traceparent.as_str());
    if let Some(state) = &event.tracestate {
        h.insert(TRACESTATE, &**state);
    }
    h
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::reading::Reading;

    #[test]
    fn renders_envelope_and_subject() {
        let reading = Reading {
            device_id: "probe-1".into(),
            field_id: "field-9".into(),
            tenant_id: "tenant-x".into(),
            sensor_type: SensorType::SoilMoisture,
            value: 31.4,
            unit: "%".into(),
            observed_at: Timestamp::parse_rfc3339("2026-06-01T04:15:00Z").unwrap(),
            battery: Some(87.5),
            rssi: Some(-71),
            raw_value: None,
            original_timestamp: None,
            device_time: true,
            stale_after_ms: 0,
            metadata: None,
        };
        let row = OutboxRow {
            seq: 42,
            event_id: [7; 16],
            stored_ms: 1_780_287_301_250,
            kind: 0,
            body: postcard::to_stdvec(&reading).unwrap(),
            trace: None,
        };
        let subject =
            SubjectTemplate::try_from("sahool.tenant.{tenant_id}.iot.sensor.reading".to_string())
                .unwrap();
        let subjects = Subjects {
            reading: subject,
            status: SubjectTemplate::default(),
        };
        let e = render(&row, "gw-1", &subjects).unwrap();
        assert_eq!(
            e.subject.as_str(),
            "sahool.tenant.tenant-x.iot.sensor.reading"
        );
        let v: serde_json::Value = serde_json::from_slice(&e.body).unwrap();
        assert_eq!(v["event_id"], "07070707-0707-0707-0707-070707070707");
        assert_eq!(v["aggregate_id"], "field-9");
        assert_eq!(v["source"]["seq"], 42);
        assert_eq!(v["timestamp"], "2026-06-01T04:15:01.250Z");
        assert_eq!(v["payload"]["timestamp"], "2026-06-01T04:15:00Z");
        assert_eq!(v["payload"]["metadata"]["rssi"], -71);
        assert!(v["payload"]["metadata"].get("raw_value").is_none());
        let h = headers(&e);
        assert_eq!(
            h.get("Nats-Msg-Id").map(|v| v.as_str()),
            Some(e.event_id.as_str())
        );
    }

    fn row(kind: u8, body: Vec<u8>) -> OutboxRow {
        OutboxRow {
            seq: 9,
            event_id: [0xab; 16],
            stored_ms: 1_780_287_301_000,
            kind,
            body,
            trace: None,
        }
    }

    fn subjects() -> Subjects {
        Subjects {
            reading: SubjectTemplate::default(),
            status: SubjectTemplate::default_status(),
        }
    }

    fn body(e: &Event) -> serde_json::Value {
        serde_json::from_slice(&e.body).expect("the body is JSON")
    }

    #[test]
    fn renders_every_field_of_a_reading_and_leaves_out_empty_metadata() {
        let mut r = Reading {
            device_id: "probe \"7\"".into(),
            field_id: "field-9".into(),
            tenant_id: "tenant-x".into(),
            sensor_type: SensorType::SoilEc,
            value: 1.25,
            unit: "mS/cm".into(),
            observed_at: Timestamp::parse_rfc3339("2026-06-01T04:15:00.5Z").unwrap(),
            battery: Some(12.0),
            rssi: Some(-80),
            raw_value: Some(1250.0),
            original_timestamp: Timestamp::parse_rfc3339("2031-01-01T00:00:00Z"),
            device_time: false,
            stale_after_ms: 0,
            metadata: None,
        };
        let e = render(
            &row(KIND_READING, postcard::to_stdvec(&r).unwrap()),
            "gw-1",
            &subjects(),
        )
        .unwrap();
        let id = "abababab-abab-abab-abab-abababababab";
        assert_eq!(
            body(&e),
            serde_json::json!({
                "event_id": id,
                "event_type": "sensor_reading",
                "version": 1,
                "aggregate_id": "field-9",
                "tenant_id": "tenant-x",
                "correlation_id": id,
                "timestamp": "2026-06-01T04:15:01Z",
                "source": {"service": "sahool-gateway", "version": env!("CARGO_PKG_VERSION"), "gateway_id": "gw-1", "seq": 9},
                "payload": {
                    "device_id": "probe \"7\"",
                    "field_id": "field-9",
                    "sensor_type": "soil_ec",
                    "value": 1.25,
                    "unit": "mS/cm",
                    "timestamp": "2026-06-01T04:15:00.500Z",
                    "metadata": {"battery": 12.0, "rssi": -80, "raw_value": 1250.0, "original_timestamp": "2031-01-01T00:00:00Z"}
                }
            })
        );
        assert_eq!(e.subject.as_str(), "sahool.iot.sensor.reading");
        (r.battery, r.rssi, r.raw_value, r.original_timestamp) = (None, None, None, None);
        let e = render(
            &row(KIND_READING, postcard::to_stdvec(&r).unwrap()),
            "gw-1",
            &subjects(),
        )
        .unwrap();
        assert!(body(&e)["payload"].get("metadata").is_none());
    }

    /// The event a gateway event row (heartbeat, config outcome) of gateway `gw-1` becomes,
    /// and its body as JSON.
    pub(crate) fn render_gateway_event(
        kind: u8,
        seq: u64,
        body: Vec<u8>,
    ) -> (Event, serde_json::Value) {
        let row = OutboxRow {
            seq,
            event_id: [seq as u8; 16],
            stored_ms: 1_780_287_301_000,
            kind,
            body,
            trace: None,
        };
        let subjects = Subjects {
            reading: SubjectTemplate::default(),
            status: SubjectTemplate::default_status(),
        };
        let e = render(&row, "gw-1", &subjects).expect("renders");
        let v = serde_json::from_slice(&e.body).expect("JSON");
        (e, v)
    }

    #[test]
    fn every_event_carries_a_traceparent_stable_per_row() {
        use crate::common::trace::TraceContext;
        let heartbeat = row(
            KIND_HEARTBEAT,
            br#"{"tenant_id":"t","correlation_id":"","payload":{}}"#.to_vec(),
        );
        let e = render(&heartbeat, "gw-1", &subjects()).unwrap();
        let h = headers(&e);
        let generated = "00-abababababababababababababababab-a5f2189c3b4e77c6-01";
        assert_eq!(h.get("traceparent").map(|v| v.as_str()), Some(generated));
        assert!(h.get("tracestate").is_none());
        let again = render(&heartbeat, "gw-1", &subjects()).unwrap();
        assert_eq!(
            again.traceparent, e.traceparent,
            "a retry carries the same header"
        );

        // A device's context goes on unchanged, tracestate too.
        let device = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut traced = heartbeat.clone();
        traced.trace = TraceContext::from_stored(&format!("{device} vendor=x"));
        let e = render(&traced, "gw-1", &subjects()).unwrap();
        let h = headers(&e);
        assert_eq!(h.get("traceparent").map(|v| v.as_str()), Some(device));
        assert_eq!(h.get("tracestate").map(|v| v.as_str()), Some("vendor=x"));
    }

    /// A contract's schema (its JSON text), checking formats (uuid, date-time) too.
    pub(crate) fn contract_validator(schema: &str) -> jsonschema::Validator {
        let schema: serde_json::Value = serde_json::from_str(schema).expect("schema JSON");
        jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .expect("schema compiles")
    }

    fn result_validator() -> jsonschema::Validator {
        contract_validator(include_str!(
            "../../contracts/actuator_command_result.v1.json"
        ))
    }

    fn result_row(result: &crate::downlink::CommandResult, correlation_id: &str) -> OutboxRow {
        let body = ResultBody::encode("tenant-a".into(), correlation_id.into(), result);
        row(KIND_RESULT, body)
    }

    #[test]
    fn renders_command_results_that_fit_their_schema() {
        use crate::downlink::{CommandResult, Reason, Status, Value};
        let mut r = CommandResult {
            command_id: "9b2d7e5a-3c1f-4e8b-a6d2-0f4e5c6b7a81".into(),
            actuator_id: "pump-1".into(),
            field_id: "field-1".into(),
            status: Status::Failed,
            reason: Some(Reason::ReadbackMismatch),
            requested: Some(Value::Number(42.5)),
            readback: Some(Value::Number(40.0)),
            at: Timestamp::parse_rfc3339("2026-06-01T04:15:00.5Z").unwrap(),
        };
        let validator = result_validator();
        let e = render(&result_row(&r, "corr-1"), "gw-1", &subjects()).unwrap();
        let v = body(&e);
        assert!(validator.is_valid(&v), "{v}");
        assert_eq!(e.subject.as_str(), RESULT_SUBJECT);
        let id = "abababab-abab-abab-abab-abababababab";
        assert_eq!(
            (&v["event_id"], &v["event_type"], &v["aggregate_id"]),
            (
                &id.into(),
                &"actuator_command_result".into(),
                &"field-1".into()
            )
        );
        assert_eq!(
            (&v["tenant_id"], &v["correlation_id"]),
            (&"tenant-a".into(), &"corr-1".into())
        );
        assert_eq!(v["source"]["seq"], 9);
        assert_eq!(
            v["payload"],
            serde_json::json!({
                "command_id": "9b2d7e5a-3c1f-4e8b-a6d2-0f4e5c6b7a81",
                "actuator_id": "pump-1",
                "field_id": "field-1",
                "status": "failed",
                "reason": "readback_mismatch",
                "requested": 42.5,
                "readback": 40.0,
                "at": "2026-06-01T04:15:00.500Z"
            })
        );
        let h = headers(&e);
        assert_eq!(h.get("Nats-Msg-Id").map(|v| v.as_str()), Some(id));
        assert_eq!(
            h.get("X-Correlation-ID").map(|v| v.as_str()),
            Some("corr-1")
        );
        // A removal's switched_off: no command, no correlation id of its own.
        (r.command_id, r.status, r.reason) = (String::new(), Status::SwitchedOff, None);
        (r.requested, r.readback) = (Some(Value::Switch(false)), None);
        let e = render(&result_row(&r, ""), "gw-1", &subjects()).unwrap();
        let v = body(&e);
        assert!(validator.is_valid(&v), "{v}");
        assert_eq!(
            (&v["correlation_id"], &v["payload"]["requested"]),
            (&id.into(), &false.into())
        );
        // A body that is not a result is an error, not an empty event.
        let err = render(&row(KIND_RESULT, b"[1]".to_vec()), "gw-1", &subjects()).unwrap_err();
        assert!(matches!(err, EventError::Result { seq: 9, .. }), "{err}");
    }

    #[test]
    fn renders_liveness_changes_with_their_subjects() {
        let mut c = StatusChange {
            device_id: "probe-1".into(),
            field_id: "field-1".into(),
            tenant_id: "tenant-a".into(),
            sensor_type: SensorType::SoilMoisture,
            status: SensorStatus::LowBattery,
            last_seen: Timestamp::parse_rfc3339("2026-06-01T04:15:00Z").unwrap(),
            battery: Some(150.0),
            rssi: Some(-90),
        };
        let e = render(
            &row(KIND_STATUS, postcard::to_stdvec(&c).unwrap()),
            "gw-1",
            &subjects(),
        )
        .unwrap();
        assert_eq!(e.subject.as_str(), "sahool.iot.sensor.warning");
        let v = body(&e);
        assert_eq!(v["event_type"], "device_status");
        assert_eq!(
            v["payload"],
            serde_json::json!({
                "device_id": "probe-1",
                "field_id": "field-1",
                "sensor_type": "soil_moisture",
                "status": "warning",
                "last_seen": "2026-06-01T04:15:00Z",
                "battery_level": 100.0,
                "signal_strength": -90,
                "error_code": "low_battery",
                "error_message": "battery at 150%"
            })
        );
        (c.status, c.battery, c.rssi) = (SensorStatus::Online, None, None);
        let e = render(
            &row(KIND_STATUS, postcard::to_stdvec(&c).unwrap()),
            "gw-1",
            &subjects(),
        )
        .unwrap();
        assert_eq!(e.subject.as_str(), "sahool.iot.sensor.connected");
        assert_eq!(
            body(&e)["payload"],
            serde_json::json!({
                "device_id": "probe-1",
                "field_id": "field-1",
                "sensor_type": "soil_moisture",
                "status": "online",
                "last_seen": "2026-06-01T04:15:00Z"
            })
        );
    }
}
