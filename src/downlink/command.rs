//! One actuator command as the platform publishes it (`contracts/actuator_command.v1.json`),
//! parsed and checked into a [`Command`], or a [`CommandError`] that says what is wrong with it.
//!
//! Only the message's own shape is judged here; whether the command may be applied (actuator,
//! range, interlocks, time) is the core's decision, since it depends on the config and state.

use std::time::Duration;

use serde::Deserialize;

use crate::reading::Timestamp;

/// A command that parsed: absolute (a state or a value), never relative.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub event_id: String,
    pub tenant_id: String,
    pub correlation_id: String,
    /// The idempotency key: applied at most once, however often delivered.
    pub command_id: String,
    pub field_id: String,
    pub actuator_id: String,
    pub request: Request,
    pub issued_at: Timestamp,
    /// Never applied at or after this instant (gateway clock).
    pub expires_at: Timestamp,
    pub requested_by: Option<String>,
    pub reason: Option<String>,
}

/// What a command asks of its actuator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Request {
    /// Switch on, and off again after `duration` if given.
    On {
        duration: Option<Duration>,
    },
    Off,
    /// Set a setpoint to this value, in the actuator's unit.
    Set(f64),
}

impl Request {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::On { .. } => "on",
            Self::Off => "off",
            Self::Set(_) => "set",
        }
    }
}

/// Why a message is not a command this gateway can act on. The message has no trustworthy ids
/// then, so it gets no result: the driver dead-letters it with its raw bytes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommandError {
    #[error("not an actuator command envelope: {0}")]
    Malformed(String),
    #[error("event_type is `{0}`, not `actuator_command`")]
    WrongEventType(String),
    #[error("version {0} is not supported; this gateway reads actuator_command version 1")]
    WrongVersion(i64),
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} `{value}` is not a UUID")]
    NotUuid { field: &'static str, value: String },
    #[error("{field} `{value}` is not an RFC 3339 date-time with an offset")]
    BadTime { field: &'static str, value: String },
    #[error("unknown action `{0}`; expected on, off or set")]
    UnknownAction(String),
    #[error("action `set` needs a value")]
    SetWithoutValue,
    #[error("value applies to action `set` only, not `{0}`")]
    ValueNotAllowed(&'static str),
    #[error("duration_s applies to action `on` only, not `{0}`")]
    DurationNotAllowed(&'static str),
    #[error("duration_s must be a whole number of seconds of at least 1, not {0}")]
    BadDuration(i64),
    #[error("command for gateway `{got}`, but this gateway is `{ours}`")]
    OtherGateway { ours: String, got: String },
}

/// The envelope as sent; unknown envelope keys are allowed, as the schema says.
#[derive(Deserialize)]
struct Envelope {
    event_id: String,
    event_type: String,
    version: i64,
    tenant_id: String,
    correlation_id: String,
    payload: Payload,
}

/// The payload as sent; unknown keys are refused (`additionalProperties: false`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    command_id: String,
    gateway_id: String,
    field_id: String,
    actuator_id: String,
    action: String,
    value: Option<f64>,
    duration_s: Option<i64>,
    issued_at: String,
    expires_at: String,
    requested_by: Option<String>,
    reason: Option<String>,
}

impl Command {
    /// Parses a message from the command subject for the gateway `ours`.
    pub fn parse(bytes: &[u8], ours: &str) -> Result<Self, CommandError> {
        let e: Envelope =
            serde_json::from_slice(bytes).map_err(|e| CommandError::Malformed(e.to_string()))?;
        if e.event_type != "actuator_command" {
            return Err(CommandError::WrongEventType(e.event_type));
        }
        if e.version != 1 {
            return Err(CommandError::WrongVersion(e.version));
        }
        let p = e.payload;
        if p.gateway_id != ours {
            return Err(CommandError::OtherGateway {
                ours: ours.to_string(),
                got: p.gateway_id,
            });
        }
        uuid("event_id", &e.event_id)?;
        uuid("payload.command_id", &p.command_id)?;
        for (field, text) in [
            ("tenant_id", &e.tenant_id),
            ("correlation_id", &e.correlation_id),
            ("payload.field_id", &p.field_id),
            ("payload.actuator_id", &p.actuator_id),
        ] {
            if text.is_empty() {
                return Err(CommandError::Empty { field });
            }
        }
        Ok(Self {
            request: request(&p.action, p.value, p.duration_s)?,
            issued_at: time("payload.issued_at", &p.issued_at)?,
            expires_at: time("payload.expires_at", &p.expires_at)?,
            event_id: e.event_id,
            tenant_id: e.tenant_id,
            correlation_id: e.correlation_id,
            command_id: p.command_id,
            field_id: p.field_id,
            actuator_id: p.actuator_id,
            requested_by: p.requested_by,
            reason: p.reason,
        })
    }
}

/// The action with the keys that belong to it, and none that do not.
fn request(
    action: &str,
    value: Option<f64>,
    duration_s: Option<i64>,
) -> Result<Request, CommandError> {
    let request = match action {
        "on" => Request::On {
            duration: duration_s.map(seconds).transpose()?,
        },
        "off" => Request::Off,
        "set" => Request::Set(value.ok_or(CommandError::SetWithoutValue)?),
        other => return Err(CommandError::UnknownAction(other.to_string())),
    };
    let name = request.as_str();
    if value.is_some() && !matches!(request, Request::Set(_)) {
        return Err(CommandError::ValueNotAllowed(name));
    }
    if duration_s.is_some() && !matches!(request, Request::On { .. }) {
        return Err(CommandError::DurationNotAllowed(name));
    }
    Ok(request)
}

fn seconds(n: i64) -> Result<Duration, CommandError> {
    u64::try_from(n)
        .ok()
        .filter(|s| *s >= 1)
        .map(Duration::from_secs)
        .ok_or(CommandError::BadDuration(n))
}

fn uuid(field: &'static str, text: &str) -> Result<(), CommandError> {
    uuid::Uuid::try_parse(text)
        .map(drop)
        .map_err(|_| CommandError::NotUuid {
            field,
            value: text.to_string(),
        })
}

fn time(field: &'static str, text: &str) -> Result<Timestamp, CommandError> {
    Timestamp::parse_rfc3339(text).ok_or_else(|| CommandError::BadTime {
        field,
        value: text.to_string(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid command message; `edit` changes its JSON before it is serialized.
    pub(crate) fn message(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v = serde_json::json!({
            "event_id": "5f0c6f1e-8a43-4a5e-9c59-1b7c1f0e2a11",
            "event_type": "actuator_command",
            "version": 1,
            "aggregate_id": "f-1",
            "tenant_id": "tenant-a",
            "correlation_id": "corr-1",
            "timestamp": "2026-06-01T04:15:00Z",
            "payload": {
                "command_id": "9b2d7e5a-3c1f-4e8b-a6d2-0f4e5c6b7a81",
                "gateway_id": "gw-1",
                "field_id": "f-1",
                "actuator_id": "pump-1",
                "action": "on",
                "duration_s": 300,
                "issued_at": "2026-06-01T04:15:00Z",
                "expires_at": "2026-06-01T04:20:00+00:00"
            }
        });
        edit(&mut v);
        serde_json::to_vec(&v).expect("json")
    }

    #[test]
    fn a_valid_command_parses() {
        let c = Command::parse(&message(|_| {}), "gw-1").unwrap();
        assert_eq!(
            c.request,
            Request::On {
                duration: Some(Duration::from_secs(300))
            }
        );
        assert_eq!(c.actuator_id, "pump-1");
        assert_eq!(
            c.expires_at.0 - c.issued_at.0,
            Duration::from_secs(300).as_nanos() as i64
        );
    }

    #[test]
    fn the_example_in_the_schema_validates_against_it() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../contracts/actuator_command.v1.json")).unwrap();
        let instance: serde_json::Value = serde_json::from_slice(&message(|_| {})).unwrap();
        assert!(jsonschema::is_valid(&schema, &instance));
    }

    #[test]
    fn each_defect_has_its_own_error() {
        let payload = |key: &'static str, value: serde_json::Value| {
            message(move |v| v["payload"][key] = value)
        };
        let cases: Vec<(Vec<u8>, CommandError)> = vec![
            (b"{".to_vec(), CommandError::Malformed(String::new())),
            (
                message(|v| v["event_type"] = "reading".into()),
                CommandError::WrongEventType("reading".into()),
            ),
            (
                message(|v| v["version"] = 2.into()),
                CommandError::WrongVersion(2),
            ),
            (
                payload("gateway_id", "gw-2".into()),
                CommandError::OtherGateway {
                    ours: "gw-1".into(),
                    got: "gw-2".into(),
                },
            ),
            (
                payload("command_id", "42".into()),
                CommandError::NotUuid {
                    field: "payload.command_id",
                    value: "42".into(),
                },
            ),
            (
                payload("actuator_id", "".into()),
                CommandError::Empty {
                    field: "payload.actuator_id",
                },
            ),
            (
                payload("expires_at", "tomorrow".into()),
                CommandError::BadTime {
                    field: "payload.expires_at",
                    value: "tomorrow".into(),
                },
            ),
            (
                payload("action", "toggle".into()),
                CommandError::UnknownAction("toggle".into()),
            ),
            (
                payload("action", "set".into()),
                CommandError::SetWithoutValue,
            ),
            (
                payload("duration_s", 0.into()),
                CommandError::BadDuration(0),
            ),
            (
                payload("value", 1.5.into()),
                CommandError::ValueNotAllowed("on"),
            ),
            (
                payload("action", "off".into()),
                CommandError::DurationNotAllowed("off"),
            ),
        ];
        for (bytes, expected) in cases {
            let got = Command::parse(&bytes, "gw-1").unwrap_err();
            match expected {
                CommandError::Malformed(_) => assert!(matches!(got, CommandError::Malformed(_))),
                expected => assert_eq!(got, expected),
            }
        }
        let extra = payload("address", 3.into());
        let err = Command::parse(&extra, "gw-1").unwrap_err();
        assert!(err.to_string().contains("unknown field `address`"), "{err}");
    }

    #[test]
    fn set_carries_its_value() {
        let bytes = message(|v| {
            let p = &mut v["payload"];
            p["action"] = "set".into();
            p["value"] = 42.5.into();
            p.as_object_mut().unwrap().remove("duration_s");
        });
        let c = Command::parse(&bytes, "gw-1").unwrap();
        assert_eq!(c.request, Request::Set(42.5));
    }
}
