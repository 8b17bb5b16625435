//! The platform's side of the downlink (DESIGN §8) for tests and the demo: commands as
//! `contracts/actuator_command.v1.json` has them, published the way the platform does
//! (`SAHOOL_COMMANDS`, `Nats-Msg-Id` = command id), the result events read back and checked,
//! and an [`Uplink`]: the farm's link to NATS, which a test cuts while the platform stays up.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::{contract_validator, StreamMessage};

/// The harness's `[gateway]` (`Gateway::compose`).
pub const TENANT: &str = "tenant-a";
pub const GATEWAY_ID: &str = "gw-test";
/// `[commands] consumer`'s default for that gateway.
pub const CONSUMER: &str = "gw-gw-test";
pub const COMMANDS_STREAM: &str = "SAHOOL_COMMANDS";
pub const RESULTS: &str = "sahool.iot.actuator.result";

/// Publishes a command as the platform does; `msg_id` is its `Nats-Msg-Id` (the command id,
/// unless a test wants JetStream to store a repeat). Retries for `within` while the stream has
/// no leader.
pub async fn publish_command(
    client: async_nats::Client,
    command: &Value,
    msg_id: &str,
    within: Duration,
) {
    let js = jetstream::new(client);
    let subject = format!("sahool.commands.iot.actuator.{TENANT}.{GATEWAY_ID}");
    let payload = serde_json::to_vec(command).expect("command JSON");
    let deadline = Instant::now() + within;
    loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        let stored = match js
            .publish_with_headers(subject.clone(), headers, payload.clone().into())
            .await
        {
            Ok(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match stored {
            Ok(()) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("publish {msg_id}: {e}; again");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("command {msg_id} not stored: {e}"),
        }
    }
}

/// The result events in `SAHOOL_IOT`, in stream order.
pub async fn read_results(client: async_nats::Client) -> Vec<StreamMessage> {
    let mut all = super::read_stream_from(client, "SAHOOL_IOT").await;
    all.retain(|m| m.subject == RESULTS);
    all
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).expect("RFC 3339")
}

pub fn parse_time(text: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(text.as_str().expect("a time string"), &Rfc3339).expect("RFC 3339")
}

pub fn command_at(
    field: &str,
    actuator: &str,
    action: &str,
    issued: OffsetDateTime,
    expires: OffsetDateTime,
) -> Value {
    let command_id = uuid::Uuid::new_v4().to_string();
    json!({
        "event_id": uuid::Uuid::new_v4().to_string(),
        "event_type": "actuator_command",
        "version": 1,
        "aggregate_id": field,
        "tenant_id": TENANT,
        "correlation_id": format!("corr-{command_id}"),
        "timestamp": rfc3339(OffsetDateTime::now_utc()),
        "payload": {
            "command_id": command_id,
            "gateway_id": GATEWAY_ID,
            "field_id": field,
            "actuator_id": actuator,
            "action": action,
            "issued_at": rfc3339(issued),
            "expires_at": rfc3339(expires),
            "requested_by": "the platform (tests/support)",
        }
    })
}

pub fn id_of(command: &Value) -> &str {
    command["payload"]["command_id"]
        .as_str()
        .expect("command_id")
}

pub fn statuses(results: &[StreamMessage], command_id: &str) -> Vec<String> {
    results
        .iter()
        .filter(|m| m.body["payload"]["command_id"] == command_id)
        .map(|m| {
            m.body["payload"]["status"]
                .as_str()
                .unwrap_or("?")
                .to_string()
        })
        .collect()
}

/// The payload of the command's final result (anything but `accepted`).
pub fn final_of<'a>(results: &'a [StreamMessage], command_id: &str) -> Option<&'a Value> {
    results
        .iter()
        .map(|m| &m.body["payload"])
        .find(|p| p["command_id"] == command_id && p["status"] != "accepted")
}

pub fn final_status(results: &[StreamMessage], command_id: &str) -> String {
    final_of(results, command_id)
        .and_then(|p| p["status"].as_str())
        .unwrap_or("none")
        .to_string()
}

pub fn show(results: &[StreamMessage]) -> String {
    results
        .iter()
        .map(|m| m.body["payload"].to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// What every test checks of the results it read: each valid against the contract, with
/// `Nats-Msg-Id` = `event_id`; one event per (command, status) and so exactly as many messages
/// as distinct results (a result published twice under another id would show here); per
/// actuator in stream order, `seq` increasing and `at` not going back; per command `accepted`
/// before its one final result.
pub fn check_results(results: &[StreamMessage]) {
    let validator = contract_validator("actuator_command_result.v1.json");
    let mut distinct = HashSet::new();
    let mut last: BTreeMap<String, (u64, OffsetDateTime)> = BTreeMap::new();
    let mut finals: BTreeMap<String, usize> = BTreeMap::new();
    for m in results {
        let body = &m.body;
        let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{body}: {errors:?}");
        let event_id = body["event_id"].as_str().expect("event_id");
        assert_eq!(m.header("Nats-Msg-Id"), Some(event_id), "{body}");
        assert_eq!(body["tenant_id"], TENANT, "{body}");
        assert_eq!(body["source"]["gateway_id"], GATEWAY_ID, "{body}");
        let p = &body["payload"];
        let command_id = p["command_id"].as_str().expect("command_id").to_string();
        let status = p["status"].as_str().expect("status").to_string();
        let key = if command_id.is_empty() {
            // A switched_off without a command (max_on, removal): one per event.
            format!("{status}@{event_id}")
        } else {
            format!("{command_id}/{status}")
        };
        assert!(
            distinct.insert(key.clone()),
            "{key} reported twice:\n{}",
            show(results)
        );
        if !command_id.is_empty() {
            if status == "accepted" {
                assert_eq!(
                    finals.get(&command_id),
                    None,
                    "{command_id}: accepted after its final result:\n{}",
                    show(results)
                );
            } else if status != "switched_off" {
                *finals.entry(command_id.clone()).or_default() += 1;
                assert_eq!(finals[&command_id], 1, "{command_id}: two final results");
            }
        }
        let actuator = p["actuator_id"].as_str().expect("actuator_id").to_string();
        let seq = body["source"]["seq"].as_u64().expect("seq");
        let at = parse_time(&p["at"]);
        if let Some((seq0, at0)) = last.get(&actuator) {
            assert!(
                seq > *seq0 && at >= *at0,
                "{actuator}: results out of order (seq {seq0} then {seq}, at {at0} then {at}):\n{}",
                show(results)
            );
        }
        last.insert(actuator, (seq, at));
    }
    assert_eq!(results.len(), distinct.len());
}

/// A TCP link between the gateway and nats-server that the test can cut (every connection
/// dropped, new ones refused), hold (what the gateway sends waits in the link, what the
/// platform sends goes through) and restore: the farm's uplink, with the platform still up.
pub struct Uplink {
    port: u16,
    state: Arc<watch::Sender<Link>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    /// Gateway → platform bytes wait (acks, publishes); platform → gateway bytes flow.
    Holding,
    Down,
}

impl Uplink {
    pub async fn to(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the uplink");
        let port = listener.local_addr().expect("uplink address").port();
        let state = Arc::new(watch::channel(Link::Up).0);
        let link = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((farm, _)) = listener.accept().await {
                if *link.borrow() == Link::Down {
                    continue; // dropped: the connection is refused
                }
                let mut down = link.subscribe();
                let hold = link.subscribe();
                tokio::spawn(async move {
                    let Ok(platform) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = forward(farm, platform, hold) => {}
                        _ = down.wait_for(|s| *s == Link::Down) => {}
                    }
                });
            }
        });
        Self { port, state, task }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Drops every connection (and what a hold kept); refuses new ones.
    pub fn cut(&self) {
        self.state.send_replace(Link::Down);
    }

    pub fn hold(&self) {
        self.state.send_replace(Link::Holding);
    }

    pub fn restore(&self) {
        self.state.send_replace(Link::Up);
    }
}

/// Both directions of one connection until either side closes; gateway → platform bytes wait
/// while the link holds.
async fn forward(
    farm: tokio::net::TcpStream,
    platform: tokio::net::TcpStream,
    mut hold: watch::Receiver<Link>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut farm_in, mut farm_out) = farm.into_split();
    let (mut platform_in, mut platform_out) = platform.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match farm_in.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if hold.wait_for(|s| *s == Link::Up).await.is_err()
                || platform_out.write_all(&buf[..n]).await.is_err()
            {
                return;
            }
        }
    };
    let down = tokio::io::copy(&mut platform_in, &mut farm_out);
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
