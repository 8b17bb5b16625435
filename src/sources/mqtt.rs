//! An `[[mqtt]]` source: subscribes at QoS 1 in a persistent MQTT 5 session and acknowledges
//! each message only after the readings made from it are committed.
//!
//! One task owns the client's event loop and the [`Intake`] of messages awaiting their commit,
//! so acks and polling never wait on each other. Acks go out in arrival order. A message the
//! store could not take stays unacknowledged while the intake retries it: the broker keeps it,
//! and stops sending once `receive_maximum` messages are unacknowledged.
//!
//! `mqtts://` brokers are reached over TLS with the shared rustls config from [`crate::common::tls`]
//! (ring provider, the source's CA, client certificate and server name).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::{mpsc, watch};

use crate::common::backoff::Backoff;
use crate::common::metrics::Metrics;
use crate::common::trace::TraceContext;
use crate::config::{Gateway, MqttSource, Quality, Secret};
use crate::ingest::intake::{self, Intake, Message, Outcome};
use crate::ingest::mapping::SharedMapper;
use crate::reading::Timestamp;
use crate::store::StoreHandle;

/// Sessions outlive a gateway restart or a long outage by this much (MQTT 5 seconds).
const SESSION_EXPIRY_SECS: u32 = 7 * 24 * 3600;

/// Packet ids the client may have outstanding: only its SUBSCRIBEs use any.
const OUTGOING_IN_FLIGHT: u16 = 16;

pub(crate) struct MqttInput {
    pub source: MqttSource,
    pub quality: Quality,
    pub gateway: Gateway,
    pub password: Option<Secret>,
    /// Set for `mqtts://` brokers.
    pub tls: Option<crate::common::tls::ClientTls>,
    pub mapper: SharedMapper,
    pub store: StoreHandle,
    pub metrics: Arc<Metrics>,
}

impl MqttInput {
    fn options(&self) -> MqttOptions {
        let mut o = broker_options(
            &self.source,
            self.source.client_id(&self.gateway),
            self.password.as_ref(),
            self.tls.as_ref(),
        );
        o.set_clean_start(false)
            // The gateway only subscribes. Without a limit the client keeps a slot for 65,535
            // outgoing publishes: 14 MB of memory for nothing.
            .set_outgoing_inflight_upper_limit(OUTGOING_IN_FLIGHT)
            .set_session_expiry_interval(Some(SESSION_EXPIRY_SECS))
            .set_manual_acks(true)
            .set_receive_maximum(Some(self.source.receive_maximum));
        o
    }

    /// Runs until `shutdown`; then finishes the acks of everything already committed.
    pub(crate) async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let name = self.source.name.to_string();
        let options = self.options();
        // Acks never outnumber unacknowledged messages: this capacity is not reached while the
        // broker honours our Receive Maximum; `unsent` catches the rest.
        let (client, eventloop) =
            AsyncClient::new(options, usize::from(self.source.receive_maximum) * 2 + 64);
        let mut unsent: VecDeque<Publish> = VecDeque::new();
        let label = self.metrics.mqtt_source(&name);
        let connected = self.metrics.mqtt_connected.get_or_create(&label).clone();
        let messages = self.metrics.mqtt_messages.get_or_create(&label).clone();
        let duplicates = self.metrics.mqtt_duplicates.get_or_create(&label).clone();
        // rumqttc's poll() is not cancel-safe (a request taken from its queue can be lost
        // mid-write), so it runs alone in its own task and hands events over a channel.
        let (events_tx, mut events) =
            mpsc::channel(usize::from(self.source.receive_maximum) * 2 + 64);
        let poller = tokio::spawn(poll(eventloop, events_tx, name.clone(), connected.clone()));
        let mut intake = Intake::new(
            &name,
            self.mapper.clone(),
            self.store.clone(),
            intake::flood_guard(&self.quality),
            &self.metrics,
        );
        let mut stopping = false;

        loop {
            if stopping && intake.is_empty() && unsent.is_empty() {
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
                        let message = Message {
                            topic: p.topic.clone(),
                            payload: p.payload.clone(),
                            dup: p.dup,
                            received: Timestamp::now(),
                            trace: TraceContext::from_publish(p.properties.as_ref()),
                        };
                        if let Err(e) = intake.offer(p, message).await {
                            tracing::error!(source = %name, error = %e, "buffer closed; stopping source");
                            break;
                        }
                    }
                    Some(Incoming::Connected) => self.subscribe(&client),
                    None => break,
                },
                Some(first) = intake.next(), if !intake.is_empty() => {
                    // The rest of a group commit is answered too: take it in this round, not
                    // in a select round per message (`next` is cancel-safe).
                    let mut settled = Some(first);
                    while let Some((p, outcome)) = settled {
                        if outcome == Outcome::Duplicate {
                            duplicates.inc();
                        }
                        // NotStored (after give_up) stays unacknowledged: the broker keeps it.
                        if matches!(outcome, Outcome::Stored | Outcome::Duplicate) {
                            unsent.push_back(p);
                        }
                        settled = intake.next().now_or_never().flatten();
                    }
                    send_acks(&client, &mut unsent);
                }
                _ = tokio::time::sleep(Duration::from_millis(10)), if !unsent.is_empty() => {
                    send_acks(&client, &mut unsent);
                }
                _ = shutdown.changed(), if !stopping => {
                    stopping = true;
                    // Messages held for lack of space will be redelivered after restart.
                    intake.give_up();
                    tracing::info!(source = %name, pending = intake.len(), "MQTT source stopping");
                }
            }
        }
        disconnect(&client, poller, events, &name).await;
        connected.set(0);
    }

    fn subscribe(&self, client: &AsyncClient) {
        let filters: Vec<Filter> = self
            .source
            .topics
            .iter()
            .map(|t| Filter::new(t.as_str(), QoS::AtLeastOnce))
            .collect();
        if let Err(e) = client.try_subscribe_many(filters) {
            tracing::error!(source = %self.source.name, error = %e, "cannot subscribe");
        }
    }
}

/// The poller writes the last acks, then the DISCONNECT, and ends; given two seconds.
async fn disconnect(
    client: &AsyncClient,
    poller: tokio::task::JoinHandle<()>,
    mut events: mpsc::Receiver<Incoming>,
    name: &str,
) {
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

/// Why a source's password file or TLS files could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientSecretsError {
    #[error(transparent)]
    Password(#[from] crate::common::secrets::SecretError),
    #[error(transparent)]
    Tls(#[from] crate::common::tls::TlsError),
}

/// The source's password and TLS config, read as every client of the source reads them (the
/// source itself, doctor, the actuators' client).
pub(crate) fn client_secrets(
    source: &MqttSource,
) -> Result<(Option<Secret>, Option<crate::common::tls::ClientTls>), ClientSecretsError> {
    let password = match (&source.password, &source.password_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(path)) => Some(crate::common::secrets::read_password(
            "[[mqtt]] password",
            path,
        )?),
        (None, None) => None,
    };
    let peer = format!("MQTT source {}", source.name);
    let tls = source
        .tls_files()
        .map(|files| crate::common::tls::client_config(&files, &peer))
        .transpose()?;
    Ok((password, tls))
}

/// How `source` reaches its broker as `client_id`: address, keep-alive, packet size, credentials
/// and TLS. The session settings are the caller's (`doctor` connects with a clean one).
pub(crate) fn broker_options(
    source: &MqttSource,
    client_id: String,
    password: Option<&Secret>,
    tls: Option<&crate::common::tls::ClientTls>,
) -> MqttOptions {
    let url = &source.url;
    let mut o = MqttOptions::new(client_id, &url.host, url.port);
    o.set_keep_alive(source.keep_alive.0)
        .set_max_packet_size(Some(
            u32::try_from(source.max_payload.0.saturating_mul(2) + 1024).unwrap_or(u32::MAX),
        ))
        .set_connection_timeout(5);
    if let Some(user) = &source.username {
        o.set_credentials(
            user.clone(),
            password.map(Secret::expose).unwrap_or_default(),
        );
    }
    if let Some(tls) = tls {
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.config.clone()),
        ));
    }
    o
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
