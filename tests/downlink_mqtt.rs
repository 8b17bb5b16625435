//! MQTT-bound actuators through the binary, against real nats-server and mosquitto: commands
//! published to `SAHOOL_COMMANDS`, simulated devices (an MQTT client of the test) on their
//! command topics, results read back from `SAHOOL_IOT`.
//!
//! One gateway drives four actuators at once, each a different device:
//! - `valve-1` obeys and reports `{"state": <payload>}` on its state topic → `applied`, read
//!   back `true`;
//! - `valve-2` is stuck: it answers every command with `OFF` → `failed`, `readback_mismatch`;
//! - `valve-3` never reports its state → read-backs time out, retried within the command's
//!   life → `failed`, `bus_error`;
//! - `dose-1` has no state topic → `applied` without a read-back, its value sent as text.
//!
//! And a reload that removes a switch while it is on: switched off through the kept client.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use support::{probe_config, Gateway, Mosquitto, Nats};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const SUBJECT: &str = "sahool.commands.iot.actuator.tenant-a.gw-test";

const ACTUATORS: &str = r#"
  [[fields.actuators]]
  id = "valve-1"
  kind = "switch"
  mqtt = { source = "farm", command_topic = "dev/valve-1/set", payload_on = "ON", payload_off = "OFF", state_topic = "dev/valve-1/state", state_pointer = "/state" }
  [[fields.actuators]]
  id = "valve-2"
  kind = "switch"
  mqtt = { source = "farm", command_topic = "dev/valve-2/set", payload_on = "open", payload_off = "close", state_topic = "dev/valve-2/state" }
  [[fields.actuators]]
  id = "valve-3"
  kind = "switch"
  mqtt = { source = "farm", command_topic = "dev/valve-3/set", payload_on = "1", payload_off = "0", state_topic = "dev/valve-3/state" }
  [[fields.actuators]]
  id = "dose-1"
  kind = "setpoint"
  range = [0.0, 100.0]
  mqtt = { source = "farm", command_topic = "dev/dose-1/set" }
"#;

const COMMANDS: &str = r#"
[commands]
enabled = true
# This machine's kernel may report an unsynchronised clock.
require_clock_sync = false
"#;

/// The commands each device received, by topic, in order.
type Received = Arc<Mutex<HashMap<String, Vec<String>>>>;

/// The simulated devices on `broker`: subscribed (SUBACK read) when this returns.
async fn devices(broker: &Mosquitto) -> Received {
    let received = Received::default();
    let seen = received.clone();
    device(
        broker,
        "sim-devices",
        "dev/+/set",
        move |client, topic, payload| {
            let payload = String::from_utf8_lossy(payload).to_string();
            seen.lock()
                .expect("lock")
                .entry(topic.to_string())
                .or_default()
                .push(payload.clone());
            answer(client, topic, &payload);
        },
    )
    .await;
    received
}

/// An MQTT client of the test subscribed to `filter` (SUBACK read when this returns), handing
/// every message to `on_message` with the client to answer through.
async fn device(
    broker: &Mosquitto,
    client_id: &str,
    filter: &str,
    on_message: impl Fn(&AsyncClient, &str, &[u8]) + Send + 'static,
) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 64);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (subscribed, ready) = tokio::sync::oneshot::channel();
    let mut subscribed = Some(subscribed);
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(s) = subscribed.take() {
                        let _ = s.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    on_message(&client, &p.topic, &p.payload)
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .expect("subscribed in time")
        .expect("device task alive");
}

/// What each device reports after a command.
fn answer(client: &AsyncClient, topic: &str, payload: &str) {
    let state = match topic {
        "dev/valve-1/set" => Some(("dev/valve-1/state", json!({ "state": payload }).to_string())),
        "dev/valve-2/set" => Some(("dev/valve-2/state", "OFF".to_string())),
        _ => None,
    };
    if let Some((topic, state)) = state {
        client
            .try_publish(topic, QoS::AtLeastOnce, false, state)
            .expect("device publishes its state");
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).expect("format")
}

/// Publishes a command for `actuator` living `life`, with `Nats-Msg-Id` = its command id.
async fn command(
    js: &async_nats::jetstream::Context,
    n: u8,
    actuator: &str,
    action: Value,
    life: Duration,
) -> String {
    let id = format!("00000000-0000-4000-8000-0000000000{n:02x}");
    let now = OffsetDateTime::now_utc();
    let mut payload = json!({
        "command_id": id, "gateway_id": "gw-test", "field_id": "field-1", "actuator_id": actuator,
        "issued_at": rfc3339(now), "expires_at": rfc3339(now + life),
    });
    for (k, v) in action.as_object().expect("an object") {
        payload[k] = v.clone();
    }
    let body = json!({
        "event_id": "5f0c6f1e-8a43-4a5e-9c59-1b7c1f0e2a11", "event_type": "actuator_command",
        "version": 1, "aggregate_id": "field-1", "tenant_id": "tenant-a",
        "correlation_id": format!("corr-{id}"), "timestamp": rfc3339(now), "payload": payload
    });
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id.as_str());
    js.publish_with_headers(SUBJECT, headers, body.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("stored in SAHOOL_COMMANDS");
    id
}

/// Every result payload in `SAHOOL_IOT`, in stream order.
async fn results(nats: &Nats) -> Vec<Value> {
    let events = nats.read_stream("SAHOOL_IOT").await;
    events
        .into_iter()
        .filter(|m| m.subject == "sahool.iot.actuator.result")
        .map(|m| m.body["payload"].clone())
        .collect()
}

/// The result payloads per command id, read until each of `ids` has a final status.
async fn finals(nats: &Nats, ids: &[&str], within: Duration) -> HashMap<String, Vec<Value>> {
    let deadline = Instant::now() + within;
    loop {
        let mut by_id: HashMap<String, Vec<Value>> = HashMap::new();
        for p in results(nats).await {
            let id = p["command_id"].as_str().unwrap_or_default().to_string();
            by_id.entry(id).or_default().push(p);
        }
        let done = |id: &&str| {
            by_id
                .get(*id)
                .is_some_and(|rs| rs.iter().any(|r| r["status"] != "accepted"))
        };
        if ids.iter().all(done) || Instant::now() > deadline {
            return by_id;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// NATS with both streams, a broker with the simulated devices, and the gateway on `actuators`.
async fn farm(actuators: &str) -> (Nats, Mosquitto, Received, Gateway) {
    let nats = Nats::start();
    nats.create_stream("SAHOOL_IOT", &["sahool.iot.>"]).await;
    nats.create_stream("SAHOOL_COMMANDS", &["sahool.commands.>"])
        .await;
    let broker = Mosquitto::start();
    let received = devices(&broker).await;
    let gateway = Gateway::start(&config(&nats, &broker, actuators));
    gateway.wait_until(
        "the actuators' client connected",
        Duration::from_secs(20),
        |g| g.log().contains("MQTT actuators: connected to the broker"),
    );
    (nats, broker, received, gateway)
}

fn config(nats: &Nats, broker: &Mosquitto, actuators: &str) -> String {
    format!(
        "{}{actuators}{COMMANDS}",
        probe_config(nats, broker, "", "")
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn mqtt_actuators_are_confirmed_by_their_state_topic() {
    let (nats, _broker, received, gateway) = farm(ACTUATORS).await;

    let js = async_nats::jetstream::new(nats.client().await);
    let minute = Duration::from_secs(60);
    let on = command(&js, 1, "valve-1", json!({"action": "on"}), minute).await;
    let stuck = command(&js, 2, "valve-2", json!({"action": "on"}), minute).await;
    let silent = command(
        &js,
        3,
        "valve-3",
        json!({"action": "on"}),
        Duration::from_secs(14),
    )
    .await;
    let set = json!({"action": "set", "value": 42.5});
    let dose = command(&js, 4, "dose-1", set, minute).await;

    let ids = [on.as_str(), &stuck, &silent, &dose];
    let results = finals(&nats, &ids, Duration::from_secs(45)).await;
    let last = |id: &str| -> Value {
        results
            .get(id)
            .and_then(|rs| rs.last().cloned())
            .unwrap_or_else(|| panic!("no result for {id}: {results:?}\n{}", gateway.log()))
    };
    let statuses = |id: &str| -> Vec<String> {
        results[id]
            .iter()
            .map(|r| r["status"].as_str().unwrap_or("?").to_string())
            .collect()
    };

    let r = last(&on);
    assert_eq!(
        (r["status"].as_str(), r["readback"].as_bool()),
        (Some("applied"), Some(true)),
        "{r}"
    );
    assert_eq!(statuses(&on), ["accepted", "applied"]);

    let r = last(&stuck);
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["reason"], "readback_mismatch", "{r}");
    assert_eq!(r["readback"], false, "{r}");

    let r = last(&silent);
    assert_eq!(
        (r["status"].as_str(), r["reason"].as_str()),
        (Some("failed"), Some("bus_error")),
        "{r}"
    );

    let r = last(&dose);
    assert_eq!(r["status"], "applied", "{r}");
    assert!(
        r["readback"].is_null(),
        "no read-back without a state topic: {r}"
    );

    let received = received.lock().expect("lock").clone();
    assert_eq!(
        received.get("dev/valve-1/set").map(Vec::as_slice),
        Some(&["ON".to_string()][..])
    );
    assert_eq!(
        received.get("dev/valve-2/set").map(Vec::as_slice),
        Some(&["open".to_string()][..])
    );
    assert_eq!(
        received.get("dev/dose-1/set").map(Vec::as_slice),
        Some(&["42.5".to_string()][..])
    );
    let silent_writes = received.get("dev/valve-3/set").map_or(0, Vec::len);
    assert!(silent_writes >= 1, "valve-3 was written: {received:?}");
    let log = gateway.log();
    assert!(
        log.contains("no state on `dev/valve-3/state` within 10s"),
        "{log}"
    );
}

/// SIGHUP removes `valve-1` while it is on: the gateway switches it off through the client it
/// kept, then drives the remaining actuator through the same source.
#[tokio::test(flavor = "multi_thread")]
async fn a_removed_mqtt_switch_is_switched_off_at_reload() {
    let valve = ACTUATORS
        .split("  [[fields.actuators]]")
        .find(|a| a.contains("valve-1"))
        .expect("valve-1");
    let dose = ACTUATORS
        .split("  [[fields.actuators]]")
        .find(|a| a.contains("dose-1"))
        .expect("dose-1");
    let both = format!("  [[fields.actuators]]{valve}  [[fields.actuators]]{dose}");
    let (nats, broker, received, mut gateway) = farm(&both).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let minute = Duration::from_secs(60);
    let on = command(&js, 1, "valve-1", json!({"action": "on"}), minute).await;
    let r = finals(&nats, &[on.as_str()], Duration::from_secs(20)).await;
    assert_eq!(
        r[&on].last().map(|r| r["status"].clone()),
        Some(json!("applied")),
        "{r:?}"
    );

    gateway.rewrite_config(&config(
        &nats,
        &broker,
        &format!("  [[fields.actuators]]{dose}"),
    ));
    gateway.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    let off = loop {
        let off = results(&nats)
            .await
            .into_iter()
            .find(|p| p["status"] == "switched_off");
        if off.is_some() || Instant::now() > deadline {
            break off;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let off = off.unwrap_or_else(|| panic!("no switched_off\n{}", gateway.log()));
    assert_eq!(
        (off["actuator_id"].as_str(), off["command_id"].as_str()),
        (Some("valve-1"), Some("")),
        "{off}"
    );
    assert_eq!(off["readback"], false, "{off}");

    let value = json!({"action": "set", "value": 7});
    let set = command(&js, 2, "dose-1", value, minute).await;
    let r = finals(&nats, &[set.as_str()], Duration::from_secs(20)).await;
    assert_eq!(
        r[&set].last().map(|r| r["status"].clone()),
        Some(json!("applied")),
        "{r:?}"
    );
    let received = received.lock().expect("lock").clone();
    assert_eq!(received["dev/valve-1/set"], ["ON", "OFF"]);
    assert_eq!(received["dev/dose-1/set"], ["7"]);
}

/// A SAHOOL actuator (`format = "sahool"`): the device gets the platform's own command JSON
/// on its `.../command` topic and reports `{"status": "ON"|"OFF"}` on the `.../status`
/// sibling, which the gateway reads back without being told where. An `on` for 2 s is
/// applied, confirmed, then switched off by the gateway on time.
#[tokio::test(flavor = "multi_thread")]
async fn a_sahool_valve_gets_the_platforms_commands_and_is_read_back_from_its_status() {
    const BASE: &str = "sahool/tenant-a/farm/farm-1/field/field-1/actuator/valve/v-7";
    let valve = format!(
        "  [[fields.actuators]]\n  id = \"v-7\"\n  kind = \"switch\"\n  mqtt = {{ source = \"farm\", format = \"sahool\", command_topic = \"{BASE}/command\" }}\n"
    );
    let (nats, broker, _received, gateway) = farm(&valve).await;
    let commands = sahool_valve(&broker, BASE).await;

    let js = async_nats::jetstream::new(nats.client().await);
    let on = command(
        &js,
        1,
        "v-7",
        json!({"action": "on", "duration_s": 2}),
        Duration::from_secs(60),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let statuses = loop {
        let statuses: Vec<String> = results(&nats)
            .await
            .into_iter()
            .filter(|p| p["command_id"] == on.as_str())
            .map(|p| format!("{}:{}", p["status"].as_str().unwrap_or("?"), p["readback"]))
            .collect();
        if statuses.len() >= 3 || Instant::now() > deadline {
            break statuses;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        statuses,
        ["accepted:null", "applied:true", "switched_off:false"],
        "{}",
        gateway.log()
    );
    let commands = commands.lock().expect("lock").clone();
    let words: Vec<&str> = commands
        .iter()
        .map(|c| c["command"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(words, ["ON", "OFF"], "{commands:?}");
    for c in &commands {
        assert_eq!(c["source"], "sahool-gateway", "{c}");
        let at = c["timestamp"].as_str().expect("timestamp");
        assert!(OffsetDateTime::parse(at, &Rfc3339).is_ok(), "{c}");
    }
}

/// A SAHOOL valve on `broker`: records each command JSON on `{base}/command` and answers with
/// its new state on `{base}/status`. Subscribed when this returns.
async fn sahool_valve(broker: &Mosquitto, base: &'static str) -> Arc<Mutex<Vec<Value>>> {
    let commands: Arc<Mutex<Vec<Value>>> = Arc::default();
    let seen = commands.clone();
    let filter = format!("{base}/command");
    device(
        broker,
        "sim-sahool-valve",
        &filter,
        move |client, _, payload| {
            let command: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
            let state = json!({ "status": command["command"] }).to_string();
            seen.lock().expect("lock").push(command);
            client
                .try_publish(format!("{base}/status"), QoS::AtLeastOnce, false, state)
                .expect("the valve reports its state");
        },
    )
    .await;
    commands
}
