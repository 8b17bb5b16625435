//! An `[[mqtt]]` source: subscribes at QoS 1 in a persistent MQTT 5 session and acknowledges
//! each message only after the readings made from it are committed.
//!
//! One task owns the client's event loop and the queue of messages awaiting their commit, so
//! acks and polling never wait on each other. Acks go out in arrival order. A message the store
//! could not take (buffer full with `reject_new`, disk reserve, a failed commit) is offered again
//! after a backoff and stays unacknowledged meanwhile: the broker keeps it, and stops sending
//! once `receive_maximum` messages are unacknowledged.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, StreamExt};
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::{mpsc, watch};

use crate::backoff::Backoff;
use crate::config::{Gateway, MqttSource, Quality};
use crate::flood::FloodGuard;
use crate::mapping::{self, Mapper, Reason, SharedMapper};
use crate::metrics::Metrics;
use crate::reading::Timestamp;
use crate::store::{Append, AppendOutcome, NewDeadLetter, StoreError, StoreHandle};

/// Sessions outlive a gateway restart or a long outage by this much (MQTT 5 seconds).
const SESSION_EXPIRY_SECS: u32 = 7 * 24 * 3600;

/// Packet ids the client may have outstanding: only its SUBSCRIBEs use any.
const OUTGOING_IN_FLIGHT: u16 = 16;

type Commit =
    Pin<Box<dyn Future<Output = (Publish, Timestamp, Result<AppendOutcome, StoreError>)> + Send>>;

pub struct MqttInput {
    pub source: MqttSource,
    pub quality: Quality,
    pub gateway: Gateway,
    pub password: Option<String>,
    pub mapper: SharedMapper,
    pub store: StoreHandle,
    pub metrics: Arc<Metrics>,
}

impl MqttInput {
    fn options(&self) -> Result<MqttOptions, String> {
        let (host, port) = self.source.host_port()?;
        let mut o = MqttOptions::new(self.source.client_id(&self.gateway), host, port);
        o.set_clean_start(false)
            // The gateway only subscribes. Without a limit the client keeps a slot for 65,535
            // outgoing publishes: 14 MB of memory for nothing.
            .set_outgoing_inflight_upper_limit(OUTGOING_IN_FLIGHT)
            .set_session_expiry_interval(Some(SESSION_EXPIRY_SECS))
            .set_manual_acks(true)
            .set_receive_maximum(Some(self.source.receive_maximum))
            .set_keep_alive(self.source.keep_alive.0)
            .set_max_packet_size(Some(
                u32::try_from(self.source.max_payload.0.saturating_mul(2) + 1024)
                    .unwrap_or(u32::MAX),
            ))
            .set_connection_timeout(5);
        if let Some(user) = &self.source.username {
            o.set_credentials(user.clone(), self.password.clone().unwrap_or_default());
        }
        Ok(o)
    }

    /// Runs until `shutdown`; then finishes the acks of everything already committed.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let name = self.source.name.to_string();
        let options = match self.options() {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(source = %name, error = %e, "MQTT source not started");
                return;
            }
        };
        // Acks never outnumber unacknowledged messages: this capacity is not reached while the
        // broker honours our Receive Maximum; `unsent` catches the rest.
        let (client, eventloop) =
            AsyncClient::new(options, usize::from(self.source.receive_maximum) * 2 + 64);
        let mut unsent: VecDeque<Publish> = VecDeque::new();
        let label = self.metrics.source(&name);
        let connected = self.metrics.mqtt_connected.get_or_create(&label).clone();
        let messages = self.metrics.mqtt_messages.get_or_create(&label).clone();
        let duplicates = self.metrics.mqtt_duplicates.get_or_create(&label).clone();
        // rumqttc's poll() is not cancel-safe (a request taken from its queue can be lost
        // mid-write), so it runs alone in its own task and hands events over a channel.
        let (events_tx, mut events) =
            mpsc::channel(usize::from(self.source.receive_maximum) * 2 + 64);
        let poller = tokio::spawn(poll(eventloop, events_tx, name.clone(), connected.clone()));
        let mut commits: FuturesOrdered<Commit> = FuturesOrdered::new();
        let mut retry = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut stopping = false;
        let mut refused_last = false;
        let q = &self.quality;
        let mut flood =
            FloodGuard::new(q.device_rate, q.device_burst, q.source_rate, q.source_burst);
        let rate_limited = self.metrics.rejected(Reason::RateLimited.label());

        loop {
            if stopping && commits.is_empty() && unsent.is_empty() {
                break;
            }
            tokio::select! {
                event = events.recv() => match event {
                    Some(Incoming::Publish(p)) => {
                        let p = *p;
                        if stopping {
                            // Not acknowledged: the broker keeps it for the next start.
                            continue;
                        }
                        messages.inc();
                        let received = Timestamp::now();
                        let mut append = self.append_for(&p, received);
                        let now = std::time::Instant::now();
                        let before = append.readings.len();
                        append.readings.retain(|r| flood.admit(&r.device_id, now));
                        rate_limited.inc_by((before - append.readings.len()) as u64);
                        match self.store.append(append).await {
                            Ok(rx) => commits.push_back(Box::pin(async move {
                                let result = rx.await.unwrap_or(Err(StoreError::Closed));
                                (p, received, result)
                            })),
                            Err(e) => {
                                tracing::error!(source = %name, error = %e, "buffer closed; stopping source");
                                break;
                            }
                        }
                    }
                    Some(Incoming::Connected) => {
                        let filters: Vec<Filter> = self.source.topics.iter().map(|t| Filter::new(t.as_str(), QoS::AtLeastOnce)).collect();
                        if let Err(e) = client.try_subscribe_many(filters) {
                            tracing::error!(source = %name, error = %e, "cannot subscribe");
                        }
                    }
                    None => break,
                },
                Some((p, received, result)) = commits.next(), if !commits.is_empty() => match result {
                    Ok(AppendOutcome::Stored { .. }) | Ok(AppendOutcome::Duplicate) => {
                        if matches!(result, Ok(AppendOutcome::Duplicate)) {
                            duplicates.inc();
                        }
                        retry.reset();
                        refused_last = false;
                        unsent.push_back(p);
                        send_acks(&client, &mut unsent);
                    }
                    Ok(AppendOutcome::Full) | Err(_) => {
                        if let Err(e) = &result {
                            tracing::warn!(source = %name, error = %e, "commit failed; message kept unacknowledged and retried");
                        }
                        // A refusal that came before the last success is stale: retry at once.
                        // Only consecutive refusals back off.
                        let delay = if refused_last { retry.next_delay() } else { Duration::ZERO };
                        refused_last = true;
                        let store = self.store.clone();
                        let append = self.append_for(&p, received);
                        commits.push_front(Box::pin(async move {
                            tokio::time::sleep(delay).await;
                            let result = match store.append(append).await {
                                Ok(rx) => rx.await.unwrap_or(Err(StoreError::Closed)),
                                Err(e) => Err(e),
                            };
                            (p, received, result)
                        }));
                    }
                },
                _ = tokio::time::sleep(Duration::from_millis(10)), if !unsent.is_empty() => {
                    send_acks(&client, &mut unsent);
                }
                _ = shutdown.changed(), if !stopping => {
                    stopping = true;
                    // Messages held for lack of space will be redelivered after restart.
                    tracing::info!(source = %name, pending = commits.len(), "MQTT source stopping");
                }
            }
        }
        // The poller writes the last acks, then the DISCONNECT, and ends.
        let _ = client.try_disconnect();
        let finish = async {
            tokio::pin!(poller);
            loop {
                tokio::select! {
                    _ = &mut poller => break,
                    // Unacknowledged messages still arriving are left to the broker.
                    _ = events.recv() => {}
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(2), finish)
            .await
            .is_err()
        {
            tracing::warn!(source = %name, "MQTT client did not disconnect in time");
        }
        connected.set(0);
    }

    fn append_for(&self, p: &Publish, received: Timestamp) -> Append {
        build_append(
            &mapping::current(&self.mapper),
            self.source.name.as_str(),
            p,
            received,
        )
    }
}

/// Queues acks in order until the client's request queue is full; the rest wait for the next try.
fn send_acks(client: &AsyncClient, unsent: &mut VecDeque<Publish>) {
    while let Some(p) = unsent.front() {
        if client.try_ack(p).is_err() {
            return;
        }
        unsent.pop_front();
    }
}

/// What the poller hands to the source task.
enum Incoming {
    Publish(Box<Publish>),
    Connected,
}

/// Drives the client's event loop: reconnects with backoff, and ends after our DISCONNECT.
async fn poll(
    mut eventloop: rumqttc::v5::EventLoop,
    events: mpsc::Sender<Incoming>,
    name: String,
    connected: prometheus_client::metrics::gauge::Gauge,
) {
    let mut reconnect = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut last_error = String::new();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if events.send(Incoming::Publish(Box::new(p))).await.is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                connected.set(1);
                reconnect.reset();
                last_error.clear();
                tracing::info!(source = %name, session_present = ack.session_present, "connected to MQTT broker");
                if events.send(Incoming::Connected).await.is_err() {
                    return;
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                connected.set(0);
                if events.is_closed() {
                    return;
                }
                let text = e.to_string();
                if text != last_error {
                    tracing::warn!(source = %name, error = %text, "MQTT connection lost; reconnecting with backoff");
                    last_error = text;
                }
                tokio::time::sleep(reconnect.next_delay()).await;
            }
        }
    }
}

/// Maps a message and packs readings, rejections and the message's identity for one commit.
fn build_append(mapper: &Mapper, source: &str, p: &Publish, received: Timestamp) -> Append {
    let topic = String::from_utf8_lossy(&p.topic);
    let mapped = mapper.map_mqtt(source, &topic, &p.payload, received);
    let raw: Arc<[u8]> = if mapped.rejections.is_empty() {
        Arc::from(&[][..])
    } else {
        Arc::from(&p.payload[..])
    };
    let dead_letters = mapped
        .rejections
        .into_iter()
        .map(|r| NewDeadLetter {
            source: source.to_string(),
            reason: r.reason,
            detail: format!("topic {topic}: {}", r.detail),
            raw: raw.clone(),
        })
        .collect();
    Append {
        readings: mapped.readings,
        dead_letters,
        message_key: Some(message_key(source, &p.topic, &p.payload)),
        maybe_duplicate: p.dup,
    }
}

/// Identity of a message for redelivery detection: source, topic and payload.
pub fn message_key(source: &str, topic: &[u8], payload: &[u8]) -> [u8; 16] {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(source.as_bytes());
    h.update(&[0]);
    h.update(topic);
    h.update(&[0]);
    h.update(payload);
    h.digest128().to_le_bytes()
}
