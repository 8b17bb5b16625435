//! The forwarder's async loop: carries out what [`Core`] decides, with the store and a NATS
//! link, and feeds back what happened. Every NATS error becomes a [`Failure`] kind here, at the
//! edge, before the core sees it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{GetStreamByNameErrorKind, PublishError, PublishErrorKind};
use async_nats::jetstream::Context;
use futures_util::stream::StreamExt;
use futures_util::FutureExt;
use tokio::sync::watch;

use super::core::{Action, Core, Failure, Refusal, Transient};
use super::inflight::{InFlight, Replies};
use crate::common::log_limit::LogLimit;
use crate::common::metrics::{Metrics, ReasonLabel};
use crate::store::{OutboxRow, StoreError, StoreHandle};
use crate::uplink::event::{self, Event, Subjects};
use crate::uplink::nats::{Connector, Link, NatsError};

/// A PubAck (`true` if JetStream already had the event), or why none came.
pub(crate) type AckOutcome = Result<bool, Failure>;

/// What the forwarder needs of a JetStream connection.
pub(crate) trait Publisher {
    /// Whether the client is connected now.
    fn connected(&self) -> bool;
    /// Hands `event` to the client with `Nats-Msg-Id = event_id` (invariant 3) and `reply` as
    /// the subject of its PubAck; resolves once it is queued.
    fn publish(
        &self,
        event: &Event,
        reply: String,
    ) -> impl Future<Output = Result<(), Failure>> + Send;
    /// The stream that captures `subject`, if JetStream says.
    fn stream_for(&self, subject: String) -> impl Future<Output = StreamLookup> + Send;
}

/// JetStream's answer to "which stream captures this subject?".
pub(crate) enum StreamLookup {
    Found(String),
    Missing,
    /// No answer (yet): the error, for logs.
    Unknown(String),
}

type Fetch = Pin<Box<dyn Future<Output = Result<Vec<OutboxRow>, StoreError>> + Send>>;
type Opening = Pin<Box<dyn Future<Output = Result<(Link, Replies), NatsError>> + Send>>;

pub(crate) struct Forwarder {
    pub store: StoreHandle,
    connector: Connector,
    /// The current link, while it is up or its publishes are settling.
    session: Option<Session>,
    pub gateway_id: String,
    pub subjects: Subjects,
    pub window: usize,
    pub metrics: Arc<Metrics>,
    ack_timeout: Duration,
    failure_log: LogLimit,
    link_log: LogLimit,
}

/// What is under way while the loop waits.
struct Pending {
    inflight: InFlight,
    fetch: Option<Fetch>,
    opening: Option<Opening>,
}

/// How a turn ended.
enum Turn {
    Go,
    Stop,
}

impl Forwarder {
    pub(crate) fn new(
        store: StoreHandle,
        connector: Connector,
        gateway_id: String,
        subjects: Subjects,
        window: usize,
        ack_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            connector,
            session: None,
            gateway_id,
            subjects,
            window: window.max(1),
            metrics,
            ack_timeout,
            failure_log: LogLimit::new(Duration::from_secs(10)),
            link_log: LogLimit::new(Duration::from_secs(60)),
        }
    }

    fn connected(&self) -> bool {
        self.session.as_ref().is_some_and(|s| s.connected())
    }

    /// Runs until `shutdown` turns true, then waits briefly for outstanding PubAcks.
    pub(crate) async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut committed = self.store.committed();
        let mut core = Core::new(self.window, self.ack_timeout);
        let mut pending = Pending {
            inflight: InFlight::new(self.ack_timeout),
            fetch: None,
            opening: None,
        };
        // Goes round at least once a second, so the watchdog sees the loop alive.
        let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !*shutdown.borrow() {
            self.metrics.beat_forwarder();
            // Marks the value seen: a commit after this line wakes the wait below.
            core.committed(*committed.borrow_and_update());
            let (on_commit, recheck) = match self.act(&mut core, &mut pending).await {
                Ok(Some(wait)) => wait,
                Ok(None) => continue,
                Err(Stop) => return,
            };
            let turn = tokio::select! {
                Some(first) = pending.inflight.next(), if !pending.inflight.is_empty() => {
                    self.outcomes(&mut core, &mut pending.inflight, first).await;
                    Turn::Go
                }
                Some(rows) = async { Some(pending.fetch.as_mut()?.await) }, if pending.fetch.is_some() => {
                    pending.fetch = None;
                    self.fetched(&mut core, rows, pending.inflight.len()).await;
                    Turn::Go
                }
                Some(opened) = async { Some(pending.opening.as_mut()?.await) }, if pending.opening.is_some() => {
                    pending.opening = None;
                    self.opened(&mut core, &mut pending.inflight, opened);
                    Turn::Go
                }
                changed = committed.changed(), if on_commit => match changed {
                    Ok(()) => Turn::Go,
                    Err(_) => Turn::Stop,
                },
                _ = tokio::time::sleep(recheck.unwrap_or_default()), if recheck.is_some() => Turn::Go,
                _ = shutdown.changed() => Turn::Go,
                _ = heartbeat.tick() => Turn::Go,
            };
            if let Turn::Stop = turn {
                break;
            }
        }
        self.drain(&mut core, pending.inflight).await;
    }

    /// Carries out the core's actions for one turn, up to its wait: `Some((on_commit,
    /// recheck))` then, `None` if the turn ended in a sleep.
    async fn act(
        &mut self,
        core: &mut Core,
        pending: &mut Pending,
    ) -> Result<Option<(bool, Option<Duration>)>, Stop> {
        loop {
            if pending.inflight.take_tripped() {
                core.in_flight_failed();
            }
            let now = Instant::now();
            match core.next(now, self.connected()) {
                Action::Report { acked, holding } => self.report(acked, holding).await?,
                Action::Flush => self.store.flush().await.map_err(|_| Stop)?,
                Action::Sleep(delay) => {
                    tokio::time::sleep(delay).await;
                    return Ok(None);
                }
                Action::CancelFetch => pending.fetch = None,
                Action::DropLink => {
                    pending.inflight.detach();
                    if self.session.take().is_some() {
                        self.metrics.nats_connected.set(0);
                    }
                }
                Action::OpenLink(delay) => {
                    let connector = self.connector.clone();
                    pending.opening = Some(Box::pin(async move {
                        tokio::time::sleep(delay).await;
                        let link = connector.open().await?;
                        let replies = Replies::subscribe(&link).await?;
                        Ok((link, replies))
                    }));
                }
                Action::CheckStream => {
                    let done = self.check_stream().await;
                    core.stream_checked(done);
                }
                Action::Fetch { after, limit } => {
                    let store = self.store.clone();
                    pending.fetch = Some(Box::pin(async move { store.fetch(after, limit).await }));
                }
                Action::Publish(row) => self.publish(core, &mut pending.inflight, &row, now).await,
                Action::DeadLetter { seq, reason } => self.refuse(seq, &reason, None).await,
                Action::Wait { on_commit, recheck } => return Ok(Some((on_commit, recheck))),
            }
        }
    }

    /// Publishes `row` over the session and tells the core how handing it over went. `sent`:
    /// when the core decided to publish it, just before it is rendered and sent, so a refusal
    /// of this very publish cannot slip past it; the core's stall and latency clocks start
    /// there too (one clock read per publish).
    async fn publish(
        &self,
        core: &mut Core,
        inflight: &mut InFlight,
        row: &OutboxRow,
        sent: Instant,
    ) {
        let event = match event::render(row, &self.gateway_id, &self.subjects) {
            Ok(event) => event,
            Err(e) => {
                let failure = Failure::Permanent {
                    refusal: Refusal::Undecodable,
                    detail: e.to_string(),
                };
                self.failed_to_send(core, row.seq, failure, None).await;
                return;
            }
        };
        let (Some(session), Some((token, reply))) = (&self.session, inflight.reply_subject())
        else {
            // Not reached: the core publishes only over a connected link.
            let detail = "no link".to_string();
            self.failed_to_send(
                core,
                row.seq,
                Failure::Transient {
                    kind: Transient::Other,
                    detail,
                },
                None,
            )
            .await;
            return;
        };
        match session.publish(&event, reply).await {
            Ok(()) => {
                core.sent(sent);
                inflight.push(token, event, sent);
            }
            Err(failure) => {
                let failure = self.judge(failure, &event.subject).await;
                self.failed_to_send(core, row.seq, failure, Some(event))
                    .await;
            }
        }
    }

    async fn failed_to_send(
        &self,
        core: &mut Core,
        seq: u64,
        failure: Failure,
        event: Option<Event>,
    ) {
        if let Failure::Transient { detail, .. } = &failure {
            if let Some(held) = self.failure_log.admit() {
                tracing::warn!(seq, error = %detail, repeats = held, "publish failed; will retry");
            }
        }
        if let Some(Action::DeadLetter { seq, reason }) = core.send_failed(failure) {
            self.refuse(seq, &reason, event).await;
        }
    }

    /// Every outcome already in, starting with `first`, in seq order.
    async fn outcomes(&self, core: &mut Core, inflight: &mut InFlight, first: (Event, AckOutcome)) {
        // They came in together: one clock read for the lot.
        let now = Instant::now();
        let mut next = Some(first);
        while let Some((event, outcome)) = next.take() {
            let outcome = match outcome {
                Ok(duplicate) => {
                    if duplicate {
                        tracing::debug!(
                            seq = event.seq,
                            "JetStream already had this event (duplicate window)"
                        );
                    }
                    Ok(())
                }
                Err(failure) => Err(self.judge(failure, &event.subject).await),
            };
            if let Err(Failure::Transient { kind, detail }) = &outcome {
                let reason = transient_label(*kind).to_string();
                self.metrics
                    .nats_publish_errors
                    .get_or_create(&ReasonLabel { reason })
                    .inc();
                if let Some(held) = self.failure_log.admit() {
                    tracing::warn!(seq = event.seq, error = %detail, in_flight = inflight.len(), repeats = held, "no PubAck; resending from this reading once every publish in flight has its outcome");
                }
            }
            let seq = event.seq;
            if let Some(Action::DeadLetter { seq, reason }) = core.outcome(seq, outcome, now) {
                self.refuse(seq, &reason, Some(event)).await;
            }
            next = inflight.next().now_or_never().flatten();
        }
    }

    async fn fetched(
        &self,
        core: &mut Core,
        rows: Result<Vec<OutboxRow>, StoreError>,
        in_flight: usize,
    ) {
        match rows {
            Ok(rows) => {
                let count = rows.len();
                core.rows_fetched(rows);
                tracing::debug!(after = core.cursor(), rows = count, in_flight, "publishing");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the buffer");
                tokio::time::sleep(core.fetch_failed()).await;
            }
        }
    }

    fn opened(
        &mut self,
        core: &mut Core,
        inflight: &mut InFlight,
        opened: Result<(Link, Replies), NatsError>,
    ) {
        match opened {
            Ok((link, replies)) => {
                self.session = Some(Session::new(link, self.ack_timeout));
                inflight.attach(replies);
                core.link_opened();
            }
            Err(e) => {
                if let Some(held) = self.link_log.admit() {
                    tracing::warn!(error = %e, repeats = held, "cannot connect to NATS; readings stay buffered, retrying with backoff");
                }
                core.link_failed();
            }
        }
    }

    /// Tells the store the acknowledged runs, then what the forwarder holds (invariant 8).
    async fn report(
        &self,
        acked: Vec<std::ops::RangeInclusive<u64>>,
        holding: Option<Option<u64>>,
    ) -> Result<(), Stop> {
        if !acked.is_empty() {
            self.store.acked(acked).await.map_err(|_| Stop)?;
        }
        if let Some(holding) = holding {
            self.store.holding(holding).await.map_err(|_| Stop)?;
        }
        Ok(())
    }

    /// Waits briefly for the PubAcks in flight. What the store was last told it holds stays
    /// claimed: it covers every row in flight.
    async fn drain(&self, core: &mut Core, mut inflight: InFlight) {
        let deadline = tokio::time::sleep(Duration::from_secs(3));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = inflight.next() => match next {
                    Some((event, Ok(_))) => {
                        core.outcome(event.seq, Ok(()), Instant::now());
                    }
                    // Anything not acknowledged stays buffered for the next start.
                    Some((_, Err(_))) | None => break,
                },
                _ = &mut deadline => break,
            }
        }
        let acked = core.take_acked();
        if !acked.is_empty() {
            let _ = self.store.acked(acked).await;
        }
        let _ = self.store.flush().await;
    }

    /// Confirms a "no stream" failure. It comes from a 503 no-responders reply, which a cluster
    /// also gives while electing a leader: it is permanent only if JetStream's own stream
    /// lookup confirms that no stream captures the subject.
    async fn judge(&self, failure: Failure, subject: &str) -> Failure {
        let Failure::Permanent {
            refusal: Refusal::NoStream,
            detail,
        } = failure
        else {
            return failure;
        };
        let missing = match &self.session {
            Some(s) => matches!(
                s.stream_for(subject.to_string()).await,
                StreamLookup::Missing
            ),
            None => false,
        };
        if missing {
            Failure::Permanent {
                refusal: Refusal::NoStream,
                detail,
            }
        } else {
            Failure::Transient {
                kind: Transient::Other,
                detail,
            }
        }
    }

    async fn refuse(&self, seq: u64, why: &str, event: Option<Event>) {
        self.metrics
            .nats_publish_errors
            .get_or_create(&ReasonLabel {
                reason: "refused".into(),
            })
            .inc();
        tracing::error!(seq, reason = %why, "the server refuses this reading for good: moved to dead-letters");
        let raw = event.map(|e| e.body.to_vec()).unwrap_or_default();
        if self.store.refused(seq, why.to_string(), raw).await.is_err() {
            tracing::error!("buffer closed while dead-lettering");
        }
    }

    /// Says, once connected, whether a JetStream stream captures the gateway's subject.
    async fn check_stream(&self) -> bool {
        let Some(session) = &self.session else {
            return false;
        };
        let sample = self.subjects.reading.render(|name| match name {
            "gateway_id" => self.gateway_id.clone(),
            _ => "x".into(),
        });
        match session.stream_for(sample.clone()).await {
            StreamLookup::Found(stream) => {
                self.metrics.set_stream_found(true);
                tracing::info!(%stream, subject = %sample, "JetStream stream captures the gateway's subject");
                true
            }
            StreamLookup::Missing => {
                self.metrics.set_stream_found(false);
                tracing::error!(subject = %sample, "no JetStream stream captures the gateway's subject: readings will be dead-lettered as `publish_refused` until the platform creates one (e.g. SAHOOL_IOT on sahool.iot.>)");
                true
            }
            StreamLookup::Unknown(e) => {
                tracing::warn!(error = %e, "cannot check JetStream streams yet");
                false
            }
        }
    }
}

/// The store is closed: the forwarder stops.
struct Stop;

/// One link and the JetStream context publishing over it.
struct Session {
    link: Link,
    js: Context,
}

impl Session {
    /// The context serves stream lookups; publishes go through the client (see `inflight`).
    fn new(link: Link, ack_timeout: Duration) -> Self {
        let js = async_nats::jetstream::context::ContextBuilder::new()
            .timeout(ack_timeout)
            .build(link.client.clone());
        Self { link, js }
    }
}

impl Publisher for Session {
    fn connected(&self) -> bool {
        self.link.connected()
    }

    async fn publish(&self, event: &Event, reply: String) -> Result<(), Failure> {
        self.link
            .client
            .publish_with_reply_and_headers(
                event.subject.clone(),
                reply,
                event::headers(event),
                event.body.clone(),
            )
            .await
            .map_err(|e| {
                let kind = match e.kind() {
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                        PublishErrorKind::MaxPayloadExceeded
                    }
                    async_nats::client::PublishErrorKind::Send => PublishErrorKind::BrokenPipe,
                    _ => PublishErrorKind::Other,
                };
                failure(&PublishError::with_source(kind, e))
            })
    }

    async fn stream_for(&self, subject: String) -> StreamLookup {
        match self.js.stream_by_subject(subject).await {
            Ok(stream) => StreamLookup::Found(stream),
            Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => StreamLookup::Missing,
            Err(e) => StreamLookup::Unknown(e.to_string()),
        }
    }
}

/// async-nats's publish error as our kind. The one place that reads an error's text: a stream
/// over its maximum message size comes as `Other`, named only by the server's description.
pub(super) fn failure(e: &PublishError) -> Failure {
    let text = e.to_string();
    let permanent = |refusal, detail| Failure::Permanent { refusal, detail };
    let transient = |kind| Failure::Transient {
        kind,
        detail: text.clone(),
    };
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => permanent(
            Refusal::PayloadTooLarge,
            format!("payload too large: {text}"),
        ),
        PublishErrorKind::StreamNotFound => permanent(
            Refusal::NoStream,
            format!("no stream captures the subject: {text}"),
        ),
        PublishErrorKind::Other if text.contains("message size exceeds maximum") => permanent(
            Refusal::PayloadTooLarge,
            format!("payload too large for the stream: {text}"),
        ),
        PublishErrorKind::TimedOut => transient(Transient::TimedOut),
        PublishErrorKind::BrokenPipe => transient(Transient::BrokenPipe),
        PublishErrorKind::MaxAckPending => transient(Transient::MaxAckPending),
        _ => transient(Transient::Other),
    }
}

/// The `nats_publish_errors` reason of a transient failure.
fn transient_label(kind: Transient) -> &'static str {
    match kind {
        Transient::TimedOut => "timeout",
        Transient::BrokenPipe => "broken_pipe",
        Transient::MaxAckPending => "max_ack_pending",
        Transient::Other => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_errors_map_to_kinds_at_the_edge() {
        let kind_of = |e: PublishError| match failure(&e) {
            Failure::Permanent { refusal, .. } => Err(refusal),
            Failure::Transient { kind, .. } => Ok(kind),
        };
        let too_big = PublishError::new(PublishErrorKind::MaxPayloadExceeded);
        assert_eq!(kind_of(too_big), Err(Refusal::PayloadTooLarge));
        let no_stream = PublishError::new(PublishErrorKind::StreamNotFound);
        assert_eq!(kind_of(no_stream), Err(Refusal::NoStream));
        // The server's description is all that names a stream's message size limit.
        let stream_limit = PublishError::with_source(
            PublishErrorKind::Other,
            "nats: message size exceeds maximum allowed",
        );
        assert_eq!(kind_of(stream_limit), Err(Refusal::PayloadTooLarge));
        let other = PublishError::with_source(PublishErrorKind::Other, "stream offline");
        assert_eq!(kind_of(other), Ok(Transient::Other));
        let timeout = PublishError::new(PublishErrorKind::TimedOut);
        assert_eq!(kind_of(timeout), Ok(Transient::TimedOut));
        assert_eq!(transient_label(Transient::TimedOut), "timeout");
    }
}
