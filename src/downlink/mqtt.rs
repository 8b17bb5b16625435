//! Actuators behind an MQTT broker (`[fields.actuators.mqtt]`): a write is a QoS 1 publish to
//! the binding's `command_topic` (a switch's `payload_on` / `payload_off`, a setpoint's number
//! as text; for `format = "sahool"` the platform's `{"command": "ON"|"OFF", ...}`), done when
//! the broker acknowledges it; a read-back is the device's next message on the state topic
//! after the write (or one that already arrived after it), bounded in time.
//!
//! One client per `[[mqtt]]` source named by a binding, apart from the source's own: the same
//! broker, credentials and TLS, client id `<source client id>-actuators`, a clean session (a
//! command is never worth replaying from an old session: the core retries within its life).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PubAck, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, Request};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

mod state;

use self::state::{number_state, switch_state};
use super::Value;
use crate::common::backoff::Backoff;
use crate::config::{self, ActuatorKind, Config, MqttSource, TopicFilter};
use crate::sources::mqtt::{broker_options, client_secrets};

/// How long a read-back waits for the device's state after a write.
const READ_BACK: Duration = Duration::from_secs(10);
/// How long a write waits for the broker's PUBACK.
const PUBACK: Duration = Duration::from_secs(5);
/// Publishes one client may have unacknowledged.
const IN_FLIGHT: u16 = 32;

/// Why a write or read-back of an MQTT-bound actuator failed, with what to check.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum MqttActuatorError {
    #[error("actuator `{actuator}` has no MQTT binding")]
    NotMqtt { actuator: String },
    #[error("MQTT source `{source_name}`: the actuators' client could not start ({detail}); fix the source's password or TLS files and reload")]
    Unavailable { source_name: String, detail: String },
    #[error("MQTT source `{source_name}`: the actuators' client (`{client_id}`) is not connected to the broker; check that the broker is up and accepts this client id and credentials (nothing was published)")]
    NotConnected {
        source_name: String,
        client_id: String,
    },
    #[error("MQTT source `{source_name}`: the command on `{topic}` could not be queued: {detail}")]
    Queue {
        source_name: String,
        topic: String,
        detail: String,
    },
    #[error("MQTT source `{source_name}`: the broker did not acknowledge the command on `{topic}` within {}s (the connection dropped or the broker is overloaded); check the broker's log", PUBACK.as_secs())]
    NoPubAck { source_name: String, topic: String },
    #[error("MQTT source `{source_name}`: the broker refused the command on `{topic}` ({reason}); check the ACL of client `{client_id}`")]
    Refused {
        source_name: String,
        topic: String,
        client_id: String,
        reason: String,
    },
    #[error("actuator `{actuator}`: no state on `{topic}` within {}s after the write; check that the device is online and reports its state there", READ_BACK.as_secs())]
    NoState { actuator: String, topic: String },
    #[error("actuator `{actuator}`: the state on `{topic}` ({payload}) is not {expected}; check state_topic, state_pointer and the payloads")]
    BadState {
        actuator: String,
        topic: String,
        payload: String,
        expected: &'static str,
    },
    #[error("actuator `{actuator}`: {detail}")]
    Value { actuator: String, detail: String },
}

/// Where the device reports its state.
#[derive(Debug, Clone, PartialEq)]
struct StateTopic {
    topic: TopicFilter,
    pointer: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
struct Binding {
    source: String,
    kind: ActuatorKind,
    command_topic: String,
    payload_on: String,
    payload_off: String,
    state: Option<StateTopic>,
    /// `format = "sahool"`: commands as the platform's JSON, with `payload_on` / `payload_off`
    /// its `ON` / `OFF`.
    sahool: bool,
}

/// The `source` a SAHOOL device sees in commands the gateway sends.
const SAHOOL_SOURCE: &str = "sahool-gateway";

impl Binding {
    /// `None` for bindings the config check refuses (no command topic).
    fn of(kind: ActuatorKind, m: &config::MqttActuator) -> Option<Self> {
        let sahool = m.format == Some(config::ActuatorFormat::Sahool);
        let payload = |given: &Option<String>, sahool_word: &str| match sahool {
            true => sahool_word.to_string(),
            false => given.clone().unwrap_or_default(),
        };
        Some(Self {
            source: m.source.to_string(),
            kind,
            command_topic: m.command_topic.clone()?,
            payload_on: payload(&m.payload_on, "ON"),
            payload_off: payload(&m.payload_off, "OFF"),
            state: m.state_topic().map(|topic| StateTopic {
                topic,
                pointer: m.state_pointer().map(str::to_string),
            }),
            sahool,
        })
    }

    /// The payload that carries `value` out, or why it cannot.
    fn payload(&self, value: Value) -> Result<String, String> {
        match (self.kind, value) {
            (ActuatorKind::Switch, Value::Switch(on)) => {
                let word = if on {
                    &self.payload_on
                } else {
                    &self.payload_off
                };
                if !self.sahool {
                    return Ok(word.clone());
                }
                // The platform's own command, without `duration`: the gateway keeps the off
                // deadline itself and switches off when it passes.
                Ok(serde_json::json!({
                    "command": word,
                    "timestamp": crate::reading::Timestamp::now().rfc3339().as_str(),
                    "source": SAHOOL_SOURCE,
                })
                .to_string())
            }
            (ActuatorKind::Setpoint, Value::Number(v)) if v.is_finite() => Ok(v.to_string()),
            (ActuatorKind::Switch, v) => Err(format!("a switch takes on or off, not {v:?}")),
            (ActuatorKind::Setpoint, v) => Err(format!("a setpoint takes a number, not {v:?}")),
        }
    }
}

/// The MQTT-bound actuators of a config and the clients that drive them.
#[derive(Clone, Default)]
pub(crate) struct MqttActuators {
    bindings: HashMap<String, Binding>,
    /// By source name; `Err` when the client could not start.
    links: HashMap<String, Result<Arc<Link>, String>>,
    /// When each actuator was last written: a read-back takes only state from after it.
    written: Arc<Mutex<HashMap<String, Instant>>>,
}

impl MqttActuators {
    /// The actuators of `config` with an `mqtt` binding. Clients of `previous` whose source did
    /// not change are kept (a new one with the same client id would take the old one's place
    /// at the broker anyway).
    pub(crate) fn new(config: &Config, previous: Option<&Self>) -> Self {
        let bindings: HashMap<String, Binding> = config
            .fields
            .iter()
            .flat_map(|f| &f.actuators)
            .filter_map(|a| Some((a.id.to_string(), Binding::of(a.kind, a.mqtt.as_ref()?)?)))
            .collect();
        let mut links = HashMap::new();
        for source in config
            .mqtt
            .iter()
            .filter(|s| bindings.values().any(|b| b.source == s.name.as_str()))
        {
            let client_id = format!("{}-actuators", source.client_id(&config.gateway));
            let kept = previous
                .and_then(|p| p.links.get(source.name.as_str()))
                .and_then(|l| l.as_ref().ok())
                .filter(|l| l.source == *source && l.client_id == client_id);
            let link = match kept {
                Some(l) => Ok(l.clone()),
                None => Link::start(source, client_id),
            };
            links.insert(source.name.to_string(), link);
        }
        let this = Self {
            bindings,
            links,
            written: previous.map(|p| p.written.clone()).unwrap_or_default(),
        };
        this.watch_states();
        this
    }

    /// After a reload: also the bindings (and clients) of actuators the new config removed,
    /// which the core still switches off before it forgets them; not those `rebound` elsewhere.
    pub(crate) fn keeping_removed(mut self, old: &Self, rebound: impl Fn(&str) -> bool) -> Self {
        for (id, binding) in &old.bindings {
            if self.bindings.contains_key(id) || rebound(id) {
                continue;
            }
            if let Some(link) = old.links.get(&binding.source) {
                self.links
                    .entry(binding.source.clone())
                    .or_insert_with(|| link.clone());
            }
            self.bindings.insert(id.clone(), binding.clone());
        }
        self
    }

    /// True when `actuator_id` is driven here.
    pub(crate) fn drives(&self, actuator_id: &str) -> bool {
        self.bindings.contains_key(actuator_id)
    }

    /// Each client subscribes to the state topics of its bindings.
    fn watch_states(&self) {
        for b in self.bindings.values() {
            if let (Some(state), Some(Ok(link))) = (&b.state, self.links.get(&b.source)) {
                link.watch(&state.topic);
            }
        }
    }

    fn binding(&self, actuator_id: &str) -> Result<(&Binding, &Arc<Link>), MqttActuatorError> {
        let not_mqtt = || MqttActuatorError::NotMqtt {
            actuator: actuator_id.to_string(),
        };
        let b = self.bindings.get(actuator_id).ok_or_else(not_mqtt)?;
        match self.links.get(&b.source) {
            Some(Ok(link)) => Ok((b, link)),
            Some(Err(detail)) => Err(MqttActuatorError::Unavailable {
                source_name: b.source.clone(),
                detail: detail.clone(),
            }),
            None => Err(not_mqtt()),
        }
    }

    /// Publishes `value` to the command topic and waits for the broker's acknowledgement.
    pub(crate) async fn write(
        &self,
        actuator_id: &str,
        value: Value,
    ) -> Result<(), MqttActuatorError> {
        let (b, link) = self.binding(actuator_id)?;
        let payload = b
            .payload(value)
            .map_err(|detail| MqttActuatorError::Value {
                actuator: actuator_id.to_string(),
                detail,
            })?;
        // Before the publish: the device may answer before the broker's PUBACK is read.
        lock(&self.written).insert(actuator_id.to_string(), Instant::now());
        link.publish(&b.command_topic, payload).await
    }

    /// The device's state after the latest write: the first state message since, waited for
    /// up to [`READ_BACK`].
    pub(crate) async fn read(&self, actuator_id: &str) -> Result<Value, MqttActuatorError> {
        let (b, link) = self.binding(actuator_id)?;
        let Some(state) = &b.state else {
            return Err(MqttActuatorError::Value {
                actuator: actuator_id.to_string(),
                detail: "has no state_topic to read back from".into(),
            });
        };
        let since = lock(&self.written).get(actuator_id).copied();
        let no_state = || MqttActuatorError::NoState {
            actuator: actuator_id.to_string(),
            topic: state.topic.as_str().to_string(),
        };
        let payload = tokio::time::timeout(READ_BACK, link.state_after(&state.topic, since))
            .await
            .map_err(|_| no_state())?
            .ok_or_else(no_state)?;
        let pointer = state.pointer.as_deref();
        let (value, expected) = match b.kind {
            ActuatorKind::Switch => (
                switch_state(&payload, pointer, &b.payload_on, &b.payload_off).map(Value::Switch),
                "on or off (true/false, 1/0, \"ON\"/\"OFF\" or the payloads)",
            ),
            ActuatorKind::Setpoint => (
                number_state(&payload, pointer).map(Value::Number),
                "a number",
            ),
        };
        value.ok_or_else(|| MqttActuatorError::BadState {
            actuator: actuator_id.to_string(),
            topic: state.topic.as_str().to_string(),
            payload: String::from_utf8_lossy(&payload).chars().take(80).collect(),
            expected,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding it leaves plain data behind: still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A state message as it arrived.
#[derive(Debug, Clone)]
struct State {
    at: Instant,
    payload: Bytes,
}

/// PUBACK waiters: in publish order until the client names the packet id, then by id.
#[derive(Default)]
struct Acks {
    connected: bool,
    queued: VecDeque<oneshot::Sender<Result<(), String>>>,
    by_pkid: HashMap<u16, oneshot::Sender<Result<(), String>>>,
}

/// What the client task shares with writers and readers.
#[derive(Default)]
struct Shared {
    acks: Mutex<Acks>,
    states: Mutex<Vec<(TopicFilter, watch::Sender<Option<State>>)>>,
}

/// One source's actuators client; its task ends when the last handle is dropped.
pub(crate) struct Link {
    source: MqttSource,
    client_id: String,
    client: AsyncClient,
    shared: Arc<Shared>,
    poller: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

impl Link {
    fn start(source: &MqttSource, client_id: String) -> Result<Arc<Self>, String> {
        let (password, tls) = client_secrets(source).map_err(|e| {
            tracing::error!(source = %source.name, error = %e, "MQTT actuators: cannot start the client");
            e.to_string()
        })?;
        let mut options =
            broker_options(source, client_id.clone(), password.as_ref(), tls.as_ref());
        options
            .set_clean_start(true)
            .set_session_expiry_interval(None)
            .set_outgoing_inflight_upper_limit(IN_FLIGHT);
        let (client, events) = AsyncClient::new(options, usize::from(IN_FLIGHT) * 2);
        let shared = Arc::new(Shared::default());
        let name = source.name.to_string();
        let poller = tokio::spawn(poll(events, client.clone(), shared.clone(), name));
        Ok(Arc::new(Self {
            source: source.clone(),
            client_id,
            client,
            shared,
            poller,
        }))
    }

    /// Keeps the latest message on `topic`, subscribing now if connected (and at each connect).
    fn watch(&self, topic: &TopicFilter) {
        let mut states = lock(&self.shared.states);
        if states.iter().any(|(t, _)| t == topic) {
            return;
        }
        states.push((topic.clone(), watch::Sender::new(None)));
        let filter = Filter::new(topic.as_str(), QoS::AtLeastOnce);
        if let Err(e) = self.client.try_subscribe_many([filter]) {
            tracing::warn!(source = %self.source.name, error = %e, "MQTT actuators: cannot subscribe yet; at the next connect");
        }
    }

    /// The first message on `topic` that arrived after `since` (any, without); `None` if the
    /// topic is not watched.
    async fn state_after(&self, topic: &TopicFilter, since: Option<Instant>) -> Option<Bytes> {
        let mut rx = lock(&self.shared.states)
            .iter()
            .find(|(t, _)| t == topic)
            .map(|(_, tx)| tx.subscribe())?;
        loop {
            if let Some(s) = rx.borrow_and_update().as_ref() {
                if since.is_none_or(|t| s.at >= t) {
                    return Some(s.payload.clone());
                }
            }
            rx.changed().await.ok()?;
        }
    }

    async fn publish(&self, topic: &str, payload: String) -> Result<(), MqttActuatorError> {
        let name = || self.source.name.to_string();
        let (tx, rx) = oneshot::channel();
        {
            // Held across the publish so waiters queue in the order the packets go out.
            let mut acks = lock(&self.shared.acks);
            if !acks.connected {
                return Err(MqttActuatorError::NotConnected {
                    source_name: name(),
                    client_id: self.client_id.clone(),
                });
            }
            self.client
                .try_publish(topic, QoS::AtLeastOnce, false, payload)
                .map_err(|e| MqttActuatorError::Queue {
                    source_name: name(),
                    topic: topic.to_string(),
                    detail: e.to_string(),
                })?;
            acks.queued.push_back(tx);
        }
        let no_ack = || MqttActuatorError::NoPubAck {
            source_name: name(),
            topic: topic.to_string(),
        };
        match tokio::time::timeout(PUBACK, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(reason))) => Err(MqttActuatorError::Refused {
                source_name: name(),
                topic: topic.to_string(),
                client_id: self.client_id.clone(),
                reason,
            }),
            Ok(Err(_)) | Err(_) => Err(no_ack()),
        }
    }
}

impl Shared {
    fn connected(&self, client: &AsyncClient) {
        lock(&self.acks).connected = true;
        // A clean session: subscriptions are made again at each connect.
        let filters: Vec<Filter> = lock(&self.states)
            .iter()
            .map(|(t, _)| Filter::new(t.as_str(), QoS::AtLeastOnce))
            .collect();
        if !filters.is_empty() {
            if let Err(e) = client.try_subscribe_many(filters) {
                tracing::warn!(error = %e, "MQTT actuators: cannot subscribe to the state topics");
            }
        }
    }

    /// The connection dropped: writes waiting for a PUBACK fail (dropped senders).
    fn lost(&self) {
        let mut acks = lock(&self.acks);
        acks.connected = false;
        acks.queued.clear();
        acks.by_pkid.clear();
    }

    fn sent(&self, pkid: u16) {
        let mut acks = lock(&self.acks);
        match acks.queued.pop_front() {
            Some(waiter) => {
                acks.by_pkid.insert(pkid, waiter);
            }
            None => tracing::warn!(
                pkid,
                "MQTT actuators: a publish went out that no write waits for"
            ),
        }
    }

    fn acked(&self, ack: &PubAck) {
        let Some(waiter) = lock(&self.acks).by_pkid.remove(&ack.pkid) else {
            return;
        };
        let outcome = match ack.reason {
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
            reason => Err(format!("{reason:?}")),
        };
        let _ = waiter.send(outcome);
    }

    fn state(&self, topic: &[u8], payload: &Bytes) {
        let Ok(topic) = std::str::from_utf8(topic) else {
            return;
        };
        let now = Instant::now();
        for (filter, tx) in lock(&self.states).iter() {
            if filter.matches(topic) {
                tx.send_replace(Some(State {
                    at: now,
                    payload: payload.clone(),
                }));
            }
        }
    }
}

/// Drives the client: reconnects with backoff; publishes not acknowledged before a drop are
/// discarded, not sent after the reconnect (their writes were reported failed, and the core
/// retries only while the command lives).
async fn poll(mut events: EventLoop, client: AsyncClient, shared: Arc<Shared>, name: String) {
    let mut reconnect = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut last_error = String::new();
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                reconnect.reset();
                last_error.clear();
                tracing::info!(source = %name, "MQTT actuators: connected to the broker");
                shared.connected(&client);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => shared.state(&p.topic, &p.payload),
            Ok(Event::Incoming(Packet::PubAck(ack))) => shared.acked(&ack),
            Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => shared.sent(pkid),
            Ok(_) => {}
            Err(e) => {
                shared.lost();
                events.pending.retain(|r| !matches!(r, Request::Publish(_)));
                let text = e.to_string();
                if text != last_error {
                    tracing::warn!(source = %name, error = %text, "MQTT actuators: connection lost; reconnecting with backoff");
                    last_error = text;
                }
                tokio::time::sleep(reconnect.next_delay()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(kind: ActuatorKind) -> Binding {
        Binding {
            source: "farm".into(),
            kind,
            command_topic: "relay/1/set".into(),
            payload_on: "ON".into(),
            payload_off: "OFF".into(),
            state: None,
            sahool: false,
        }
    }

    #[test]
    fn a_sahool_device_gets_the_platforms_command_json() {
        let b = Binding {
            sahool: true,
            ..binding(ActuatorKind::Switch)
        };
        for (value, word) in [(true, "ON"), (false, "OFF")] {
            let payload = b.payload(Value::Switch(value)).expect("a payload");
            let json: serde_json::Value = serde_json::from_str(&payload).expect("JSON");
            assert_eq!(json["command"], word, "{payload}");
            assert_eq!(json["source"], "sahool-gateway", "{payload}");
            let at = json["timestamp"].as_str().expect("a timestamp");
            assert!(
                time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                    .is_ok(),
                "{payload}"
            );
        }
        assert!(b.payload(Value::Number(1.0)).is_err());
    }

    #[test]
    fn commands_are_the_payloads_or_the_number_as_text() {
        let switch = binding(ActuatorKind::Switch);
        assert_eq!(switch.payload(Value::Switch(true)).as_deref(), Ok("ON"));
        assert_eq!(switch.payload(Value::Switch(false)).as_deref(), Ok("OFF"));
        let refused = switch.payload(Value::Number(1.0)).unwrap_err();
        assert!(refused.contains("takes on or off"), "{refused}");
        let setpoint = binding(ActuatorKind::Setpoint);
        assert_eq!(setpoint.payload(Value::Number(12.5)).as_deref(), Ok("12.5"));
        assert_eq!(setpoint.payload(Value::Number(40.0)).as_deref(), Ok("40"));
        assert_eq!(
            setpoint.payload(Value::Number(-0.25)).as_deref(),
            Ok("-0.25")
        );
        assert!(setpoint.payload(Value::Number(f64::NAN)).is_err());
        assert!(setpoint.payload(Value::Switch(true)).is_err());
    }

    #[tokio::test]
    async fn an_actuator_not_bound_here_or_unconnected_is_a_typed_error() {
        let none = MqttActuators::default();
        assert_eq!(
            none.write("pump-9", Value::Switch(true)).await,
            Err(MqttActuatorError::NotMqtt {
                actuator: "pump-9".into()
            })
        );
        let mut a = MqttActuators::default();
        a.bindings
            .insert("valve-1".into(), binding(ActuatorKind::Switch));
        a.links
            .insert("farm".into(), Err("password file missing".into()));
        let e = a.read("valve-1").await.unwrap_err();
        assert!(
            e.to_string()
                .contains("could not start (password file missing)"),
            "{e}"
        );
    }

    #[test]
    fn a_removed_actuator_keeps_its_binding_and_client_unless_bound_elsewhere() {
        let mut old = MqttActuators::default();
        for id in ["valve-1", "valve-2"] {
            old.bindings
                .insert(id.into(), binding(ActuatorKind::Switch));
        }
        old.links.insert("farm".into(), Err("kept".into()));
        let kept = MqttActuators::default().keeping_removed(&old, |id| id == "valve-2");
        assert!(kept.drives("valve-1"), "switched off where it was bound");
        assert!(
            !kept.drives("valve-2"),
            "moved to another bus: driven there only"
        );
        assert!(kept.links.contains_key("farm"), "with its source's client");
        let mut new = MqttActuators::default();
        let mut moved = binding(ActuatorKind::Switch);
        moved.command_topic = "relay/9/set".into();
        new.bindings.insert("valve-1".into(), moved.clone());
        let kept = new.keeping_removed(&old, |_| false);
        assert_eq!(
            kept.bindings.get("valve-1"),
            Some(&moved),
            "the new binding wins"
        );
    }
}
