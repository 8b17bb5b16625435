//! One listener connection, in its own task: CONNECT and authentication, then PUBLISHes
//! committed through an [`Intake`] and acknowledged (PUBACK, or PUBREC for QoS 2) only after
//! the commit, in arrival order.
//!
//! Invariants:
//! - Nothing is acknowledged that is not committed. Many PUBLISHes are in flight at once (up to
//!   `max_in_flight`), so the store commits them together.
//! - Memory is bounded: at most `max_in_flight` publishes wait for their commit, plus one
//!   parked publish; the read buffer holds at most one incomplete packet (its size is checked
//!   from its header); replies are not read past [`OUT_HIGH_WATER`] unsent bytes.
//! - When the connection cannot take more (in-flight limit, or the store refusing with
//!   `reject_new`), it stops reading: the client's own window fills and it waits, keeping its
//!   data. Keep-alive is not held against a client while the gateway is the one not reading.
//! - A connection ends by stopping reading, settling what it already took (acks written),
//!   then telling an MQTT 5 client why, and closing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::auth::Authenticator;
use super::session::{
    Close, Connect, Grant, Inbound, Outbound, Publish, Qos, Refusal, Session, Version, Violation,
};
use crate::common::log_limit::LogLimit;
use crate::common::metrics::Metrics;
use crate::config::TopicFilter;
use crate::ingest::intake::{Intake, Message, Outcome, SharedFloodGuard};
use crate::ingest::mapping::SharedMapper;
use crate::reading::Timestamp;
use crate::store::StoreHandle;

/// A client must finish its TLS handshake and CONNECT within this.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Unsent reply bytes above which the connection stops reading (the client is not reading).
const OUT_HIGH_WATER: usize = 64 << 10;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 8 << 10;
/// How long a closing connection may take to write its last replies.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// How clients of a listener authenticate.
pub(crate) enum Auth {
    Password(Authenticator),
    /// The TLS handshake verified a client certificate: nothing more to check.
    Certificate,
    None,
}

/// What every connection of one listener shares.
pub(crate) struct Context {
    pub name: String,
    pub topics: Vec<TopicFilter>,
    pub auth: Auth,
    pub max_in_flight: u16,
    pub(crate) max_packet_size: u32,
    /// Keep-alive bounds in seconds.
    pub keep_alive: (u16, u16),
    pub mapper: SharedMapper,
    pub store: StoreHandle,
    pub flood: SharedFloodGuard,
    pub metrics: Arc<Metrics>,
    pub clients: Arc<Clients>,
    connections: Counter,
    publishes: Counter,
    puback_seconds: Histogram,
    reject_log: LogLimit,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: &str,
        topics: Vec<TopicFilter>,
        auth: Auth,
        max_in_flight: u16,
        max_packet_size: u32,
        keep_alive: (u16, u16),
        mapper: SharedMapper,
        store: StoreHandle,
        flood: SharedFloodGuard,
        metrics: Arc<Metrics>,
    ) -> Self {
        let label = metrics.listener(name);
        // Present from the start, so a listener nobody connected to shows 0.
        let _ = metrics.listener_connections_open.get_or_create(&label);
        let connections = metrics.listener_connections.get_or_create(&label).clone();
        let publishes = metrics.listener_publishes.get_or_create(&label).clone();
        let puback_seconds = metrics
            .listener_puback_seconds
            .get_or_create(&label)
            .clone();
        Self {
            connections,
            publishes,
            puback_seconds,
            name: name.to_string(),
            topics,
            auth,
            max_in_flight,
            max_packet_size,
            keep_alive,
            mapper,
            store,
            flood,
            metrics,
            clients: Arc::default(),
            reject_log: LogLimit::new(Duration::from_secs(10)),
        }
    }

    /// Counts a refusal by reason and logs it, rate-limited (a flood of bad clients must not
    /// flood the journal).
    pub(crate) fn reject(&self, reason: &str, peer: SocketAddr, detail: &str) {
        self.metrics.count_listener_reject(&self.name, reason);
        if let Some(held) = self.reject_log.admit() {
            tracing::warn!(listener = %self.name, %peer, reason, detail, similar_held_back = held, "MQTT listener refused a client");
        }
    }

    fn accepts(&self, topic: &str) -> bool {
        self.topics.iter().any(|f| f.matches(topic))
    }
}

/// Connections by client id, so a new CONNECT with the same id takes the old one over (as
/// MQTT requires; it also clears half-open connections a device left behind).
#[derive(Default)]
pub(crate) struct Clients {
    next: AtomicU64,
    by_id: Mutex<HashMap<String, (u64, oneshot::Sender<()>)>>,
}

impl Clients {
    fn register(self: &Arc<Self>, client_id: &str) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let old = self
            .by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client_id.to_string(), (id, tx));
        if let Some((_, old)) = old {
            let _ = old.send(());
        }
        Registration {
            clients: self.clone(),
            client_id: client_id.to_string(),
            id,
            taken_over: Some(rx),
        }
    }
}

/// A connection's entry in [`Clients`]; removed when the connection ends.
struct Registration {
    clients: Arc<Clients>,
    client_id: String,
    id: u64,
    /// Fires when another connection takes this client id.
    taken_over: Option<oneshot::Receiver<()>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self.clients.by_id.lock().unwrap_or_else(|e| e.into_inner());
        if map
            .get(&self.client_id)
            .is_some_and(|(id, _)| *id == self.id)
        {
            map.remove(&self.client_id);
        }
    }
}

/// Whether a connection is served, or only told the listener is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Open,
    /// Over `max_connections`: the CONNECT is answered "server busy".
    Busy,
}

/// What a publish needs to be answered once settled.
struct Ack {
    pkid: u16,
    qos: Qos,
    /// False: refused (MQTT 5 reason code), answered without a commit.
    accepted: bool,
    arrived: Instant,
}

/// Serves one client until it leaves, breaks a rule, or `shutdown`.
pub(crate) async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    cx: Arc<Context>,
    shutdown: watch::Receiver<bool>,
    admission: Admission,
) where
    S: AsyncRead + AsyncWrite + Send,
{
    let (reader, writer) = tokio::io::split(stream);
    let mut conn = Connection {
        session: Session::new(cx.max_packet_size as usize),
        cx,
        peer,
        reader,
        writer,
        buf: BytesMut::with_capacity(4096),
        out: BytesMut::with_capacity(1024),
    };
    if let Some((connect, keep_alive)) = conn.handshake(admission).await {
        let registration = conn.cx.clients.register(&connect.client_id);
        conn.run(keep_alive, registration, shutdown).await;
    }
}

struct Connection<S> {
    cx: Arc<Context>,
    peer: SocketAddr,
    session: Session,
    reader: ReadHalf<S>,
    writer: WriteHalf<S>,
    /// Bytes read and not yet decoded.
    buf: BytesMut,
    /// Replies not yet written.
    out: BytesMut,
}

/// Why the main loop stopped reading.
enum Ending {
    /// The client sent DISCONNECT, closed the socket, or the socket failed.
    ClientLeft,
    /// The gateway ends it (MQTT 5 clients are told why).
    Closed(Violation),
}

fn closed(close: Close, detail: &str) -> Ending {
    Ending::Closed(Violation {
        close,
        detail: detail.into(),
    })
}

impl<S: AsyncRead + AsyncWrite + Send> Connection<S> {
    /// CONNECT in, CONNACK out. Returns the client's CONNECT (client id assigned if empty) and
    /// the keep-alive in force, or `None` if the client was refused or left.
    async fn handshake(&mut self, admission: Admission) -> Option<(Connect, Duration)> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let mut connect = loop {
            match self.session.decode(&mut self.buf) {
                Ok(Some(Inbound::Connect(c))) => break c,
                Ok(Some(_)) => return None,
                Ok(None) => {}
                Err(v) => {
                    self.cx.reject(reject_reason(&v), self.peer, &v.detail);
                    if v.close == Close::UnsupportedVersion {
                        self.reply(Outbound::ConnAck(Err(Refusal::UnsupportedVersion)));
                    }
                    self.finish(None).await;
                    return None;
                }
            }
            self.make_room();
            match tokio::time::timeout_at(deadline, self.reader.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return None,
                Err(_) => {
                    let detail = format!(
                        "no CONNECT within {} s of connecting",
                        CONNECT_TIMEOUT.as_secs()
                    );
                    self.cx.reject("protocol", self.peer, &detail);
                    return None;
                }
            }
        };
        if admission == Admission::Busy {
            // Counted as too_many_connections when it was accepted.
            self.reply(Outbound::ConnAck(Err(Refusal::ServerBusy)));
            self.finish(None).await;
            return None;
        }
        let v5 = self.session.version() == Some(Version::V5);
        let refusal = if connect.auth_method.is_some() {
            Some((
                Refusal::BadAuthMethod,
                "auth",
                "enhanced authentication is not offered",
            ))
        } else if connect.client_id.is_empty() && !connect.clean_start && !v5 {
            Some((
                Refusal::BadClientId,
                "protocol",
                "an empty client id needs a clean session",
            ))
        } else if !self.authenticated(&connect).await {
            Some((Refusal::BadCredentials, "auth", "bad user name or password"))
        } else {
            None
        };
        if let Some((refusal, reason, detail)) = refusal {
            let detail = format!(
                "{detail} (client id `{}`, user `{}`)",
                connect.client_id,
                connect.username.as_deref().unwrap_or("")
            );
            self.cx.reject(reason, self.peer, &detail);
            self.reply(Outbound::ConnAck(Err(refusal)));
            self.finish(None).await;
            return None;
        }
        let assigned = connect
            .client_id
            .is_empty()
            .then(|| format!("auto-{}", uuid::Uuid::new_v4().simple()));
        if let Some(id) = &assigned {
            connect.client_id = id.clone();
        }
        let (min, max) = self.cx.keep_alive;
        let keep_alive = match connect.keep_alive {
            0 => max,
            k => k.clamp(min, max),
        };
        let grant = Grant {
            // No session state is kept: the session of a publisher is empty, so it is present
            // whenever the client asks to resume one. That makes clients resend unacknowledged
            // PUBLISHes after a reconnect (a gateway restart included).
            session_present: !connect.clean_start && assigned.is_none(),
            receive_maximum: self.cx.max_in_flight,
            max_packet_size: self.cx.max_packet_size,
            server_keep_alive: (keep_alive != connect.keep_alive).then_some(keep_alive),
            assigned_client_id: assigned,
        };
        self.reply(Outbound::ConnAck(Ok(&grant)));
        self.cx.connections.inc();
        tracing::debug!(listener = %self.cx.name, peer = %self.peer, client_id = %connect.client_id, "MQTT client connected");
        Some((connect, Duration::from_secs(u64::from(keep_alive))))
    }

    async fn authenticated(&self, connect: &Connect) -> bool {
        match &self.cx.auth {
            Auth::None | Auth::Certificate => true,
            Auth::Password(auth) => match (&connect.username, &connect.password) {
                (Some(user), Some(password)) => auth.check(user, password).await,
                _ => false,
            },
        }
    }

    async fn run(
        &mut self,
        keep_alive: Duration,
        mut registration: Registration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let idle_limit = keep_alive + keep_alive / 2;
        let mut intake: Intake<Ack> = Intake::new(
            &self.cx.name,
            self.cx.mapper.clone(),
            self.cx.store.clone(),
            self.cx.flood.clone(),
            &self.cx.metrics,
        );
        let max_in_flight = usize::from(self.cx.max_in_flight);
        let mut parked: Option<(Publish, Instant)> = None;
        let mut deadline = Instant::now() + idle_limit;
        // One timer for the connection, armed at a deadline that may have moved on since and
        // re-armed when it fires early: not a timer entry per loop round.
        let idle = tokio::time::sleep_until(deadline);
        tokio::pin!(idle);
        let mut ending: Option<Ending> = None;
        let mut taken_over = registration.taken_over.take();

        loop {
            // A parked publish goes in as soon as there is room and the store takes again.
            if ending.is_none() && intake.len() < max_in_flight && !intake.refusing() {
                if let Some((p, arrived)) = parked.take() {
                    if let Err(e) = self.offer(&mut intake, p, arrived).await {
                        ending = Some(Ending::Closed(e));
                    }
                    // Time spent parked was the gateway's, not the client's.
                    deadline = Instant::now() + idle_limit;
                }
            }
            if ending.is_none() {
                ending = self
                    .handle_buffered(&mut intake, &mut parked, &mut deadline, idle_limit)
                    .await;
            }
            if let Some(end) = &ending {
                // Settle what was taken, then go: what the store refuses now stays with the
                // client, unacknowledged. A client that left gets no more replies.
                intake.give_up();
                if matches!(end, Ending::ClientLeft) || intake.is_empty() {
                    break;
                }
            }
            let can_read = ending.is_none() && parked.is_none() && self.out.len() < OUT_HIGH_WATER;
            if can_read {
                self.make_room();
            }
            tokio::select! {
                // In this order: the signals to stop are never starved by a busy client; the
                // acknowledgements settled together go out in one write, before more is read.
                biased;
                _ = shutdown.changed(), if ending.is_none() => {
                    // Already committed publishes are acknowledged; the rest the client resends.
                    ending = Some(closed(Close::ShuttingDown, "the gateway is shutting down"));
                }
                taken = async {
                    match taken_over.as_mut() {
                        Some(rx) => rx.await,
                        None => std::future::pending().await,
                    }
                }, if taken_over.is_some() => {
                    // A oneshot answers once; only a sent signal means a takeover.
                    taken_over = None;
                    if taken.is_ok() {
                        ending = Some(closed(Close::TakenOver, "another connection took over this client id"));
                    }
                }
                Some((ack, outcome)) = intake.next(), if !intake.is_empty() => {
                    self.settled(ack, outcome);
                    // What the same group commit settled is answered in this round, not one
                    // loop round (and timer) per message; the next select polls with a waker.
                    while let Some((ack, outcome)) = intake.next().now_or_never().flatten() {
                        self.settled(ack, outcome);
                    }
                }
                written = self.writer.write_buf(&mut self.out), if !self.out.is_empty() => {
                    if written.is_err() {
                        ending = Some(Ending::ClientLeft);
                        break;
                    }
                }
                read = self.reader.read_buf(&mut self.buf), if can_read => match read {
                    Ok(n) if n > 0 => {}
                    _ => ending = Some(Ending::ClientLeft),
                },
                _ = &mut idle, if ending.is_none() && parked.is_none() => {
                    if Instant::now() < deadline {
                        idle.as_mut().reset(deadline);
                        continue;
                    }
                    ending = Some(Ending::Closed(Violation {
                        close: Close::KeepAliveTimeout,
                        detail: format!("nothing received for {}s (1.5 × keep-alive)", idle_limit.as_secs()),
                    }));
                    tracing::debug!(listener = %self.cx.name, peer = %self.peer, "MQTT client idle past its keep-alive; closing");
                }
            }
        }
        let last = match ending {
            Some(Ending::Closed(v)) => Some(v),
            _ => None,
        };
        self.finish(last.as_ref()).await;
    }

    /// Handles everything already read before more is read, until a packet parks, the output
    /// backs up, or the connection is to end (`Some`).
    async fn handle_buffered(
        &mut self,
        intake: &mut Intake<Ack>,
        parked: &mut Option<(Publish, Instant)>,
        deadline: &mut Instant,
        idle_limit: Duration,
    ) -> Option<Ending> {
        while parked.is_none() && self.out.len() < OUT_HIGH_WATER {
            match self.session.decode(&mut self.buf) {
                Ok(Some(packet)) => {
                    *deadline = Instant::now() + idle_limit;
                    if let Some(end) = self.handle(packet, intake, parked).await {
                        return Some(end);
                    }
                }
                Ok(None) => break,
                Err(v) => {
                    self.cx.reject(reject_reason(&v), self.peer, &v.detail);
                    return Some(Ending::Closed(v));
                }
            }
        }
        None
    }

    /// Handles one packet; `Some` when the connection is to end.
    async fn handle(
        &mut self,
        packet: Inbound,
        intake: &mut Intake<Ack>,
        parked: &mut Option<(Publish, Instant)>,
    ) -> Option<Ending> {
        match packet {
            Inbound::Publish(p) => {
                self.cx.publishes.inc();
                let arrived = Instant::now();
                if intake.len() >= usize::from(self.cx.max_in_flight) || intake.refusing() {
                    *parked = Some((p, arrived));
                    return None;
                }
                self.offer(intake, p, arrived)
                    .await
                    .err()
                    .map(Ending::Closed)
            }
            Inbound::PubRel(pkid) => {
                self.reply(Outbound::PubComp(pkid));
                None
            }
            Inbound::Subscribe { pkid, filters } => {
                self.cx.reject(
                    "subscribe",
                    self.peer,
                    "SUBSCRIBE refused: this endpoint only takes publishes",
                );
                self.reply(Outbound::SubAck { pkid, filters });
                None
            }
            Inbound::Unsubscribe { pkid, filters } => {
                self.reply(Outbound::UnsubAck { pkid, filters });
                None
            }
            Inbound::PingReq => {
                self.reply(Outbound::PingResp);
                None
            }
            Inbound::Disconnect => Some(Ending::ClientLeft),
            Inbound::Connect(_) => Some(Ending::Closed(Violation {
                close: Close::Protocol,
                detail: "a second CONNECT".into(),
            })),
        }
    }

    /// Queues a publish for its commit, or answers it at once when it needs none.
    async fn offer(
        &mut self,
        intake: &mut Intake<Ack>,
        p: Publish,
        arrived: Instant,
    ) -> Result<(), Violation> {
        let ack = |accepted| Ack {
            pkid: p.pkid,
            qos: p.qos,
            accepted,
            arrived,
        };
        let topic = String::from_utf8_lossy(&p.topic);
        if !self.cx.accepts(&topic) {
            let detail = format!("PUBLISH to `{topic}`, which is not in this listener's topics");
            self.cx.reject("topic", self.peer, &detail);
            return match (self.session.version(), p.qos) {
                (_, Qos::AtMostOnce) => Ok(()),
                (Some(Version::V5), _) => {
                    intake.pass(ack(false));
                    Ok(())
                }
                // 3.1.1 has no way to refuse one publish: the connection is closed instead.
                _ => Err(Violation {
                    close: Close::TopicNotAccepted,
                    detail,
                }),
            };
        }
        if p.qos == Qos::ExactlyOnce && self.session.awaiting_release(p.pkid) {
            // A resend of a QoS 2 publish already stored and PUBREC'd: PUBREC again.
            intake.pass(ack(true));
            return Ok(());
        }
        let message = Message {
            topic: p.topic.clone(),
            payload: p.payload.clone(),
            dup: p.dup,
            received: Timestamp::now(),
            trace: p.trace.clone(),
        };
        intake.offer(ack(true), message).await.map_err(|e| {
            tracing::error!(listener = %self.cx.name, error = %e, "buffer closed; closing connection");
            Violation {
                close: Close::ShuttingDown,
                detail: "the buffer is closed".into(),
            }
        })
    }

    /// A publish's commit finished: answer it in order.
    fn settled(&mut self, ack: Ack, outcome: Outcome) {
        let accepted = match outcome {
            Outcome::Stored | Outcome::Duplicate => true,
            Outcome::Passed => ack.accepted,
            Outcome::NotStored => return,
        };
        let reply = match ack.qos {
            Qos::AtMostOnce => return,
            Qos::AtLeastOnce => Outbound::PubAck {
                pkid: ack.pkid,
                accepted,
            },
            Qos::ExactlyOnce => Outbound::PubRec {
                pkid: ack.pkid,
                accepted,
            },
        };
        self.reply(reply);
        if accepted {
            self.cx
                .puback_seconds
                .observe(ack.arrived.elapsed().as_secs_f64());
        }
    }

    /// Room for the next read. The buffer never holds more than one incomplete packet (its
    /// size checked from its header) plus one read.
    fn make_room(&mut self) {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
            self.buf.reserve(READ_CHUNK);
        }
    }

    fn reply(&mut self, packet: Outbound<'_>) {
        if let Err(e) = self.session.encode(packet, &mut self.out) {
            tracing::warn!(listener = %self.cx.name, error = %e, "cannot encode an MQTT reply");
        }
    }

    /// Writes what is left (and the reason, to MQTT 5 clients), then closes the socket.
    async fn finish(&mut self, reason: Option<&Violation>) {
        if let Some(v) = reason {
            if self.session.version() == Some(Version::V5) {
                self.reply(Outbound::Disconnect(v));
            }
        }
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, async {
            let _ = self.writer.write_all(&self.out).await;
            let _ = self.writer.shutdown().await;
        })
        .await;
        self.out.clear();
    }
}

/// The reject reason a violation is counted under.
fn reject_reason(v: &Violation) -> &'static str {
    match v.close {
        Close::PacketTooLarge => "oversize",
        Close::TopicNotAccepted => "topic",
        _ => "protocol",
    }
}
