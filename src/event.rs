//! The event contract (`contracts/sensor_reading_event.v1.json`): a buffered row rendered as
//! SAHOOL's IoT envelope around a `sensor_reading` payload, its subject and its headers.

use serde::Serialize;

use crate::config::SubjectTemplate;
use crate::reading::{Reading, Timestamp};
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

/// A row ready to publish.
#[derive(Debug, Clone)]
pub struct Event {
    pub seq: u64,
    pub event_id: String,
    pub tenant_id: String,
    pub subject: String,
    pub body: Vec<u8>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    event_id: &'a str,
    event_type: &'static str,
    version: u32,
    aggregate_id: &'a str,
    tenant_id: &'a str,
    correlation_id: &'a str,
    timestamp: String,
    source: Source<'a>,
    payload: Payload<'a>,
}

#[derive(Serialize)]
struct Source<'a> {
    service: &'static str,
    version: &'static str,
    gateway_id: &'a str,
    seq: u64,
}

#[derive(Serialize)]
struct Payload<'a> {
    device_id: &'a str,
    field_id: &'a str,
    sensor_type: &'static str,
    value: f64,
    unit: &'a str,
    timestamp: String,
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
}

impl Metadata {
    fn is_empty(&self) -> bool {
        self.battery.is_none() && self.rssi.is_none() && self.raw_value.is_none()
    }
}

/// Renders a buffered reading as its event.
pub fn render(
    row: &OutboxRow,
    gateway_id: &str,
    subject: &SubjectTemplate,
) -> Result<Event, EventError> {
    if row.kind != 0 {
        return Err(EventError::Kind {
            seq: row.seq,
            kind: row.kind,
        });
    }
    let reading: Reading =
        postcard::from_bytes(&row.body).map_err(|source| EventError::Decode {
            seq: row.seq,
            source,
        })?;
    let event_id = uuid::Uuid::from_bytes(row.event_id)
        .hyphenated()
        .to_string();
    let envelope = Envelope {
        event_id: &event_id,
        event_type: "sensor_reading",
        version: 1,
        aggregate_id: &reading.field_id,
        tenant_id: &reading.tenant_id,
        correlation_id: &event_id,
        timestamp: Timestamp::from_unix_millis(row.stored_ms).to_rfc3339(),
        source: Source {
            service: SERVICE,
            version: env!("CARGO_PKG_VERSION"),
            gateway_id,
            seq: row.seq,
        },
        payload: Payload {
            device_id: &reading.device_id,
            field_id: &reading.field_id,
            sensor_type: reading.sensor_type.as_str(),
            value: reading.value,
            unit: &reading.unit,
            timestamp: reading.observed_at.to_rfc3339(),
            metadata: Metadata {
                battery: reading.battery,
                rssi: reading.rssi,
                raw_value: reading.raw_value,
            },
        },
    };
    // Serializing a struct of strings and finite numbers cannot fail.
    let body = serde_json::to_vec(&envelope).unwrap_or_default();
    let subject = subject.render(|name| match name {
        "tenant_id" => reading.tenant_id.clone(),
        "field_id" => reading.field_id.clone(),
        "gateway_id" => gateway_id.to_string(),
        "device_id" => reading.device_id.clone(),
        "sensor_type" => reading.sensor_type.as_str().to_string(),
        _ => String::new(),
    });
    Ok(Event {
        seq: row.seq,
        tenant_id: reading.tenant_id,
        event_id,
        subject,
        body,
    })
}

/// The headers SAHOOL's publisher sets, plus `Nats-Msg-Id` for JetStream de-duplication.
pub fn headers(event: &Event) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", event.event_id.as_str());
    h.insert("X-Event-ID", event.event_id.as_str());
    h.insert("X-Tenant-ID", event.tenant_id.as_str());
    h.insert("X-Correlation-ID", event.event_id.as_str());
    h.insert("X-Schema-Version", SCHEMA_VERSION);
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::SensorType;

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
        let e = render(&row, "gw-1", &subject).unwrap();
        assert_eq!(e.subject, "sahool.tenant.tenant-x.iot.sensor.reading");
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
