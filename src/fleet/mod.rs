//! What the platform sees of a fleet of gateways and how it steers them (DESIGN §9): the
//! heartbeat ([`heartbeat`]) and remote config from NATS KV with probation and rollback
//! ([`remote`]), both reporting through the outbox like a reading.

pub(crate) mod heartbeat;
pub mod remote;

use serde::Serialize;

use crate::store::inbox::ResultBody;

/// The outbox body of a gateway event: the envelope's tenant and the event's payload (no
/// correlation id: the event id stands in).
pub(crate) fn event_body(tenant_id: &str, payload: &impl Serialize) -> Vec<u8> {
    // Structs of strings, numbers and maps with string keys always serialize, as an object.
    let payload = match serde_json::to_value(payload) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let body = ResultBody {
        tenant_id: tenant_id.to_string(),
        correlation_id: String::new(),
        payload,
    };
    serde_json::to_vec(&body).unwrap_or_default()
}
