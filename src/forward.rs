//! The forwarder: buffered rows → JetStream, in `seq` order, deleted only after their PubAck.
//!
//! # Invariants
//! 1. Rows are published in `seq` order with up to `nats.max_in_flight` PubAcks outstanding;
//!    results are consumed in the same order (`FuturesOrdered`).
//! 2. A row is deleted from the buffer only when its own PubAck arrived (`StoreHandle::acked`).
//!    A publish that was merely written to the socket or queued in the client counts for nothing.
//! 3. Every attempt for a row carries `Nats-Msg-Id = event_id`, so JetStream drops retries of a
//!    row it already stored (within the stream's duplicate window).
//! 4. After any sign of trouble (a publish that failed, in whatever position; a lost link) no new
//!    publish goes out until every in-flight one has its outcome; PubAcks that arrive meanwhile
//!    count. Publishing then resumes at the first row without a PubAck, after a backoff.
//! 5. A refusal the server will repeat forever (payload over `max_payload`, no stream for the
//!    subject as JetStream itself confirms, a publish permission the server reports denied for
//!    the subject after the row was sent, a row this version cannot decode) moves that row to
//!    the dead-letter table and the queue goes on.
//! 6. No new publish is handed to the client while it is disconnected (its own queue would
//!    replay a stale window after reconnecting), nor while the oldest in-flight publish waits
//!    much longer than PubAcks usually take.
//!
//! Why 4 and 6: a publish sent past one that is lost can be stored before the lost one's
//! resend (a cluster elects a new stream leader, which takes the later publish), and the stream
//! would hold them out of order. So the forwarder stops sending as soon as trouble shows,
//! keeping the publishes past a lost one few and sent within a fraction of a leader election.

use std::collections::VecDeque;
use std::future::Future;
use std::future::IntoFuture;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{
    GetStreamByNameErrorKind, PublishAckFuture, PublishError, PublishErrorKind,
};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::Context;
use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::event::{self, Event, Subjects};
use crate::log_limit::LogLimit;
use crate::metrics::Metrics;
use crate::nats::PublishDenials;
use crate::store::{OutboxRow, StoreHandle};

/// How a failed publish is handled.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// Try again from this row after a backoff.
    Transient(String),
    /// Never going to succeed: dead-letter the row.
    Permanent(String),
}

/// Why a publish got no PubAck.
#[derive(Debug)]
enum AckError {
    Publish(PublishError),
    /// The server reported this connection may not publish to the event's subject.
    Denied,
}

type AckResult = (
    Event,
    Result<async_nats::jetstream::publish::PublishAck, AckError>,
);
type InFlight = Pin<Box<dyn Future<Output = AckResult> + Send>>;

pub struct Forwarder {
    pub store: StoreHandle,
    pub client: async_nats::Client,
    pub js: Context,
    pub gateway_id: String,
    pub subjects: Subjects,
    pub window: usize,
    pub metrics: Arc<Metrics>,
    pub denials: Arc<PublishDenials>,
    ack_timeout: Duration,
    failure_log: LogLimit,
}

impl Forwarder {
    pub fn new(
        store: StoreHandle,
        link: crate::nats::Link,
        gateway_id: String,
        subjects: Subjects,
        window: usize,
        ack_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let crate::nats::Link { client, denials } = link;
        let js = async_nats::jetstream::context::ContextBuilder::new()
            .timeout(ack_timeout)
            .max_ack_inflight(window.max(1) * 2)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Self {
            store,
            client,
            js,
            gateway_id,
            subjects,
            window: window.max(1),
            metrics,
            denials,
            ack_timeout,
            failure_log: LogLimit::new(Duration::from_secs(10)),
        }
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Runs until `shutdown` turns true, then waits briefly for outstanding PubAcks.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut committed = self.store.committed();
        let mut inflight: FuturesOrdered<InFlight> = FuturesOrdered::new();
        // When each in-flight publish was sent, in the same order.
        let mut sent: VecDeque<Instant> = VecDeque::new();
        let mut acked: Vec<u64> = Vec::new();
        // Highest seq handed to the client (in flight or done).
        let mut cursor = 0u64;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut fence = Fence::new(self.ack_timeout);
        let mut stream_checked = false;

        loop {
            if *shutdown.borrow() {
                break;
            }
            self.metrics.beat_forwarder();
            let connected = self.connected();
            if !connected {
                fence.trip();
            }
            if inflight.is_empty() {
                if let Some(resume) = fence.settle() {
                    // Rows acknowledged while settling leave the buffer before it is read again.
                    if self.store.acked(std::mem::take(&mut acked)).await.is_err() {
                        return;
                    }
                    cursor = resume - 1;
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            }
            if connected && !stream_checked {
                stream_checked = self.check_stream().await;
            }
            // Marks the value seen: a commit after this line wakes `changed()` below.
            let newest = *committed.borrow_and_update();
            let more = cursor < newest;
            let can_send =
                connected && inflight.len() < self.window && fence.may_send(sent.front());
            if can_send && more {
                match self.store.fetch(cursor, self.window - inflight.len()).await {
                    Ok(rows) if rows.is_empty() => cursor = newest,
                    Ok(rows) => {
                        tracing::debug!(
                            after = cursor,
                            rows = rows.len(),
                            in_flight = inflight.len(),
                            "publishing"
                        );
                        for row in rows {
                            if !self.connected() || !fence.may_send(sent.front()) {
                                break;
                            }
                            cursor = row.seq;
                            match self.publish(&row, fence.tripped.clone()).await {
                                Ok(fut) => {
                                    inflight.push_back(fut);
                                    sent.push_back(Instant::now());
                                }
                                Err((event, Failure::Permanent(why))) => {
                                    self.refuse(row.seq, &why, event).await
                                }
                                Err((_, Failure::Transient(why))) => {
                                    if let Some(held) = self.failure_log.admit() {
                                        tracing::warn!(seq = row.seq, error = %why, repeats = held, "publish failed; will retry");
                                    }
                                    fence.failed(row.seq);
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the buffer");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            }
            let flush = !acked.is_empty() && (inflight.is_empty() || acked.len() >= 256);
            if flush && self.store.acked(std::mem::take(&mut acked)).await.is_err() {
                return;
            }
            let can_send =
                connected && inflight.len() < self.window && fence.may_send(sent.front());
            tokio::select! {
                Some((event, result)) = inflight.next(), if !inflight.is_empty() => {
                    let sent_at = sent.pop_front();
                    match result {
                        Ok(ack) => {
                            if ack.duplicate {
                                tracing::debug!(seq = event.seq, "JetStream already had this event (duplicate window)");
                            }
                            acked.push(event.seq);
                            if let Some(at) = sent_at {
                                fence.acked(at.elapsed());
                            }
                            backoff.reset();
                        }
                        Err(AckError::Denied) => {
                            let why = format!("permission denied: the NATS server does not let this user publish to {}", event.subject);
                            self.refuse(event.seq, &why, Some(event)).await;
                        }
                        Err(AckError::Publish(e)) => match self.judge(&e, &event.subject).await {
                            Failure::Permanent(why) => self.refuse(event.seq, &why, Some(event)).await,
                            Failure::Transient(why) => {
                                self.metrics.nats_publish_errors.get_or_create(&crate::metrics::ReasonLabel { reason: kind_label(&e) }).inc();
                                if let Some(held) = self.failure_log.admit() {
                                    tracing::warn!(seq = event.seq, error = %why, in_flight = inflight.len(), repeats = held, "no PubAck; resending from this reading once every publish in flight has its outcome");
                                }
                                fence.failed(event.seq);
                            }
                        },
                    }
                }
                changed = committed.changed(), if can_send => {
                    if changed.is_err() { break; }
                }
                _ = tokio::time::sleep(Duration::from_millis(250)), if !connected || (!can_send && inflight.is_empty()) => {}
                _ = shutdown.changed() => {}
                // Goes round at least once a second, so the watchdog sees the loop alive.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        self.drain(inflight, acked).await;
    }

    async fn drain(&self, mut inflight: FuturesOrdered<InFlight>, mut acked: Vec<u64>) {
        let deadline = tokio::time::sleep(Duration::from_secs(3));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = inflight.next() => match next {
                    Some((event, Ok(_))) => acked.push(event.seq),
                    // Anything not acknowledged stays buffered for the next start.
                    Some((_, Err(_))) | None => break,
                },
                _ = &mut deadline => break,
            }
        }
        if !acked.is_empty() {
            let _ = self.store.acked(acked).await;
        }
        let _ = self.store.flush().await;
    }

    /// Hands one row to the client; `tripped` is set the moment its publish fails.
    async fn publish(
        &self,
        row: &OutboxRow,
        tripped: Arc<AtomicBool>,
    ) -> Result<InFlight, (Option<Event>, Failure)> {
        let event = event::render(row, &self.gateway_id, &self.subjects)
            .map_err(|e| (None, Failure::Permanent(e.to_string())))?;
        let publish = PublishMessage::build()
            .payload(event.body.clone().into())
            .headers(event::headers(&event));
        // Taken before sending, so a refusal of this very publish cannot slip past them.
        let sent = Instant::now();
        let refusals = self.denials.watch();
        match self.js.send_publish(event.subject.clone(), publish).await {
            Ok(fut) => {
                let denials = self.denials.clone();
                Ok(Box::pin(async move {
                    let result = await_ack(event, fut, denials, refusals, sent).await;
                    if matches!(result.1, Err(AckError::Publish(_))) {
                        tripped.store(true, Ordering::Relaxed);
                    }
                    result
                }))
            }
            Err(e) => {
                let failure = self.judge(&e, &event.subject).await;
                Err((Some(event), failure))
            }
        }
    }

    /// Classifies a failure. "No stream" comes from a 503 no-responders reply, which a cluster
    /// can also give while electing a leader: it is permanent only if JetStream's own stream
    /// lookup confirms that no stream captures the subject.
    async fn judge(&self, e: &PublishError, subject: &str) -> Failure {
        match classify(e) {
            Failure::Permanent(why) if e.kind() == PublishErrorKind::StreamNotFound => {
                let missing = matches!(
                    self.js.stream_by_subject(subject.to_string()).await,
                    Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound
                );
                if missing {
                    Failure::Permanent(why)
                } else {
                    Failure::Transient(why)
                }
            }
            other => other,
        }
    }

    async fn refuse(&self, seq: u64, why: &str, event: Option<Event>) {
        self.metrics
            .nats_publish_errors
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: "refused".into(),
            })
            .inc();
        tracing::error!(seq, reason = %why, "the server refuses this reading for good: moved to dead-letters");
        let raw = event.map(|e| e.body).unwrap_or_default();
        if self.store.refused(seq, why.to_string(), raw).await.is_err() {
            tracing::error!("buffer closed while dead-lettering");
        }
    }

    /// Says, once connected, whether a JetStream stream captures the gateway's subject.
    async fn check_stream(&self) -> bool {
        let sample = self.subjects.reading.render(|name| match name {
            "gateway_id" => self.gateway_id.clone(),
            _ => "x".into(),
        });
        match self.js.stream_by_subject(sample.clone()).await {
            Ok(stream) => {
                self.metrics.set_stream_found(true);
                tracing::info!(%stream, subject = %sample, "JetStream stream captures the gateway's subject");
                true
            }
            Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => {
                self.metrics.set_stream_found(false);
                tracing::error!(subject = %sample, "no JetStream stream captures the gateway's subject: readings will be dead-lettered as `publish_refused` until the platform creates one (e.g. SAHOOL_IOT on sahool.iot.>)");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot check JetStream streams yet");
                false
            }
        }
    }
}

/// When new publishes may go out (invariants 4 and 6): not while settling after trouble, and
/// not while the oldest in-flight publish has waited well past the usual PubAck time.
struct Fence {
    /// Set by an in-flight publish the moment it fails, before its turn in `seq` order.
    tripped: Arc<AtomicBool>,
    /// No new publish until every in-flight one has its outcome.
    settling: bool,
    /// The first row that failed: publishing resumes there once settled.
    resume_at: Option<u64>,
    /// Smoothed time from send to PubAck.
    ack_latency: Duration,
    ack_timeout: Duration,
}

impl Fence {
    fn new(ack_timeout: Duration) -> Self {
        Self {
            tripped: Arc::new(AtomicBool::new(false)),
            settling: false,
            resume_at: None,
            ack_latency: Duration::from_millis(50),
            ack_timeout,
        }
    }

    /// Trouble without a row to blame yet (a lost link): settle what is in flight.
    fn trip(&mut self) {
        self.settling = true;
    }

    /// Row `seq` got no PubAck.
    fn failed(&mut self, seq: u64) {
        self.settling = true;
        self.resume_at = Some(self.resume_at.map_or(seq, |r| r.min(seq)));
    }

    fn acked(&mut self, latency: Duration) {
        self.ack_latency = (self.ack_latency * 7 + latency) / 8;
    }

    /// How long the oldest publish may wait before sending pauses: well past the usual PubAck
    /// time, yet far shorter than a stream leader election (seconds).
    fn stall_after(&self) -> Duration {
        (self.ack_latency * 4).clamp(Duration::from_millis(250), self.ack_timeout)
    }

    /// Whether a new publish may go out, given when the oldest in-flight one was sent.
    fn may_send(&mut self, oldest: Option<&Instant>) -> bool {
        if self.tripped.load(Ordering::Relaxed) {
            self.settling = true;
        }
        !self.settling && oldest.is_none_or(|t| t.elapsed() <= self.stall_after())
    }

    /// With nothing in flight, ends settling; returns the row to resume at, if one failed.
    fn settle(&mut self) -> Option<u64> {
        self.settling = false;
        self.tripped.store(false, Ordering::Relaxed);
        self.resume_at.take()
    }
}

/// The PubAck of one publish, or `Denied` as soon as the server reports the subject refused
/// after `sent`. Only a PubAck counts as delivered; a refusal never does.
async fn await_ack(
    event: Event,
    fut: PublishAckFuture,
    denials: Arc<PublishDenials>,
    mut refusals: watch::Receiver<u64>,
    sent: Instant,
) -> AckResult {
    let ack = fut.into_future();
    tokio::pin!(ack);
    loop {
        tokio::select! {
            result = &mut ack => {
                let result = match result {
                    Err(_) if denials.denied_since(&event.subject, sent) => Err(AckError::Denied),
                    other => other.map_err(AckError::Publish),
                };
                return (event, result);
            }
            Ok(()) = refusals.changed() => {
                if denials.denied_since(&event.subject, sent) {
                    return (event, Err(AckError::Denied));
                }
            }
        }
    }
}

fn classify(e: &PublishError) -> Failure {
    let text = e.to_string();
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => {
            Failure::Permanent(format!("payload too large: {text}"))
        }
        PublishErrorKind::StreamNotFound => {
            Failure::Permanent(format!("no stream captures the subject: {text}"))
        }
        PublishErrorKind::Other if text.contains("message size exceeds maximum") => {
            Failure::Permanent(format!("payload too large for the stream: {text}"))
        }
        _ => Failure::Transient(text),
    }
}

fn kind_label(e: &PublishError) -> String {
    match e.kind() {
        PublishErrorKind::TimedOut => "timeout",
        PublishErrorKind::BrokenPipe => "broken_pipe",
        PublishErrorKind::MaxAckPending => "max_ack_pending",
        _ => "other",
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trouble_stops_sending_until_everything_in_flight_settled() {
        let mut fence = Fence::new(Duration::from_secs(5));
        assert!(fence.may_send(None));
        // A later publish failing first (it completes out of turn) trips the fence at once.
        fence.tripped.store(true, Ordering::Relaxed);
        assert!(!fence.may_send(None));
        fence.failed(7);
        fence.failed(5);
        assert!(!fence.may_send(None));
        assert_eq!(
            fence.settle(),
            Some(5),
            "resume at the first row without PubAck"
        );
        assert!(fence.may_send(None));
        // A lost link settles what was sent on it; nothing to resend if all was acked.
        fence.trip();
        assert!(!fence.may_send(None));
        assert_eq!(fence.settle(), None);
        assert!(fence.may_send(None));
    }

    #[test]
    fn a_late_oldest_publish_pauses_sending() {
        let mut fence = Fence::new(Duration::from_secs(5));
        for _ in 0..32 {
            fence.acked(Duration::from_millis(10));
        }
        assert_eq!(fence.stall_after(), Duration::from_millis(250));
        let now = Instant::now();
        assert!(fence.may_send(Some(&now)));
        let long_ago = now - Duration::from_secs(1);
        assert!(!fence.may_send(Some(&long_ago)));
        // Slow links: the pause follows the PubAck time they really have, up to the timeout.
        for _ in 0..64 {
            fence.acked(Duration::from_millis(800));
        }
        assert!(fence.may_send(Some(&long_ago)));
        for _ in 0..64 {
            fence.acked(Duration::from_secs(30));
        }
        assert_eq!(fence.stall_after(), Duration::from_secs(5));
    }
}
