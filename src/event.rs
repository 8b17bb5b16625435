//! The event contract (`contracts/sensor_reading_event.v1.json`): a buffered row rendered as
//! SAHOOL's IoT envelope around a `sensor_reading` payload, its subject and its headers.

use async_nats::header::{HeaderMap, HeaderName};
use async_nats::Subject;
use bytes::Bytes;
use serde::Serialize;

use crate::config::SubjectTemplate;
use crate::reading::{
    Reading, Rfc3339Text, SensorStatus, SensorType, StatusChange, Timestamp, KIND_READING,
    KIND_STATUS,
};
use crate::store::OutboxRow;

pub const SERVICE: &str = "sahool-gateway";
pub const SCHEMA_VERSION: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("buffered row {seq} cannot be decoded ({source}); it was written by an incompatible version")]
    Decode { seq: u64, source: postcard::Error },
    #[error("buffered row {seq} has unknown kind {kind}")]
    Kind { seq: u64, kind: u8 },
}

/// A row ready to publish. Subject and body are shared buffers: a publish and a later retry
/// or dead-letter use them without copying.
#[derive(Debug, Clone)]
pub struct Event {
    pub seq: u64,
    pub event_id: String,
    pub tenant_id: String,
    pub subject: Subject,
    pub body: Bytes,
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

#[derive(Serialize)]
struct Envelope<'a, P> {
    event_id: &'a str,
    event_type: &'static str,
    version: u32,
    aggregate_id: &'a str,
    tenant_id: &'a str,
    correlation_id: &'a str,
    timestamp: Rfc3339Text,
    source: Source<'a>,
    payload: P,
}

#[derive(Serialize)]
struct Source<'a> {
    service: &'static str,
    version: &'static str,
    gateway_id: &'a str,
    seq: u64,
}

/// `contracts/sahool/sensor_reading.v1.json`
#[derive(Serialize)]
struct ReadingPayload<'a> {
    device_id: &'a str,
    field_id: &'a str,
    sensor_type: &'static str,
    value: f64,
    unit: &'a str,
    timestamp: Rfc3339Text,
    #[serde(skip_serializing_if = "Metadata::is_empty")]
    metadata: Metadata,
}

#[derive(Serialize)]
struct Metadata {
    #[serde(skip_serializing_if = "Option::is_none")]
    battery: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rssi: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_value: Option<f64>,
    /// The device's own time when the timestamp policy replaced it.
    #[serde(skip_serializing_if = "Option::is_none")]
    original_timestamp: Option<Rfc3339Text>,
}

impl Metadata {
    fn is_empty(&self) -> bool {
        self.battery.is_none()
            && self.rssi.is_none()
            && self.raw_value.is_none()
            && self.original_timestamp.is_none()
    }
}

/// `contracts/sahool/device_status.v1.json`, for one sensor of the device.
#[derive(Serialize)]
struct StatusPayload<'a> {
    device_id: &'a str,
    field_id: &'a str,
    sensor_type: &'static str,
    status: &'static str,
    last_seen: Rfc3339Text,
    #[serde(skip_serializing_if = "Option::is_none")]
    battery_level: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signal_strength: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_message: Option<String>,
}

/// Where a row's event goes and what identifies it, whatever its kind.
struct Routing<'a> {
    row: &'a OutboxRow,
    gateway_id: &'a str,
    event_id: String,
    tenant_id: &'a str,
    field_id: &'a str,
    device_id: &'a str,
    sensor_type: SensorType,
}

impl Routing<'_> {
    fn event<P: Serialize>(
        self,
        event_type: &'static str,
        payload: P,
        subject: &SubjectTemplate,
        status: &str,
    ) -> Event {
        let envelope = Envelope {
            event_id: &self.event_id,
            event_type,
            version: 1,
            aggregate_id: self.field_id,
            tenant_id: self.tenant_id,
            correlation_id: &self.event_id,
            timestamp: Timestamp::from_unix_millis(self.row.stored_ms).rfc3339(),
            source: Source {
                service: SERVICE,
                version: env!("CARGO_PKG_VERSION"),
                gateway_id: self.gateway_id,
                seq: self.row.seq,
            },
            payload,
        };
        // Serializing a struct of strings and finite numbers cannot fail.
        let mut body = Vec::with_capacity(BODY_CAPACITY);
        let _ = serde_json::to_writer(&mut body, &envelope);
        let subject = subject.render(|name| match name {
            "tenant_id" => self.tenant_id.to_string(),
            "field_id" => self.field_id.to_string(),
            "gateway_id" => self.gateway_id.to_string(),
            "device_id" => self.device_id.to_string(),
            "sensor_type" => self.sensor_type.as_str().to_string(),
            "status" => status.to_string(),
            _ => String::new(),
        });
        Event {
            seq: self.row.seq,
            tenant_id: self.tenant_id.to_string(),
            event_id: self.event_id,
            subject: Subject::from(subject),
            body: Bytes::from(body),
        }
    }
}

/// Renders a buffered row as its event.
pub fn render(row: &OutboxRow, gateway_id: &str, subjects: &Subjects) -> Result<Event, EventError> {
    let decode_error = |source| EventError::Decode {
        seq: row.seq,
        source,
    };
    let event_id = uuid::Uuid::from_bytes(row.event_id)
        .hyphenated()
        .to_string();
    match row.kind {
        KIND_READING => {
            let r: Reading = postcard::from_bytes(&row.body).map_err(decode_error)?;
            let payload = ReadingPayload {
                device_id: &r.device_id,
                field_id: &r.field_id,
                sensor_type: r.sensor_type.as_str(),
                value: r.value,
                unit: &r.unit,
                timestamp: r.observed_at.rfc3339(),
                metadata: Metadata {
                    battery: r.battery,
                    rssi: r.rssi,
                    raw_value: r.raw_value,
                    original_timestamp: r.original_timestamp.map(Timestamp::rfc3339),
                },
            };
            let routing = Routing {
                row,
                gateway_id,
                event_id,
                tenant_id: &r.tenant_id,
                field_id: &r.field_id,
                device_id: &r.device_id,
                sensor_type: r.sensor_type,
            };
            Ok(routing.event("sensor_reading", payload, &subjects.reading, "reading"))
        }
        KIND_STATUS => {
            let c: StatusChange = postcard::from_bytes(&row.body).map_err(decode_error)?;
            let (status, subject_status, error_code, error_message) = match c.status {
                SensorStatus::Online => ("online", "connected", None, None),
                SensorStatus::Offline => ("offline", "disconnected", None, None),
                SensorStatus::LowBattery => (
                    "warning",
                    "warning",
                    Some("low_battery"),
                    Some(format!("battery at {}%", c.battery.unwrap_or(0.0))),
                ),
            };
            let payload = StatusPayload {
                device_id: &c.device_id,
                field_id: &c.field_id,
                sensor_type: c.sensor_type.as_str(),
                status,
                last_seen: c.last_seen.rfc3339(),
                battery_level: c.battery.map(|b| b.clamp(0.0, 100.0)),
                signal_strength: c.rssi,
                error_code,
                error_message,
            };
            let routing = Routing {
                row,
                gateway_id,
                event_id,
                tenant_id: &c.tenant_id,
                field_id: &c.field_id,
                device_id: &c.device_id,
                sensor_type: c.sensor_type,
            };
            Ok(routing.event("device_status", payload, &subjects.status, subject_status))
        }
        kind => Err(EventError::Kind { seq: row.seq, kind }),
    }
}

const NATS_MSG_ID: HeaderName = HeaderName::from_static("Nats-Msg-Id");
const X_EVENT_ID: HeaderName = HeaderName::from_static("X-Event-ID");
const X_TENANT_ID: HeaderName = HeaderName::from_static("X-Tenant-ID");
const X_CORRELATION_ID: HeaderName = HeaderName::from_static("X-Correlation-ID");
const X_SCHEMA_VERSION: HeaderName = HeaderName::from_static("X-Schema-Version");

/// The headers SAHOOL's publisher sets, plus `Nats-Msg-Id` for JetStream de-duplication.
pub fn headers(event: &Event) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(NATS_MSG_ID, event.event_id.as_str());
    h.insert(X_EVENT_ID, event.event_id.as_str());
    h.insert(X_TENANT_ID, event.tenant_id.as_str());
    h.insert(X_CORRELATION_ID, event.event_id.as_str());
    h.insert(X_SCHEMA_VERSION, SCHEMA_VERSION);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        let row = OutboxRow {
            seq: 42,
            event_id: [7; 16],
            stored_ms: 1_780_287_301_250,
            kind: 0,
            body: postcard::to_stdvec(&reading).unwrap(),
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
}
