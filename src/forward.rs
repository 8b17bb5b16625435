//! The forwarder: buffered rows → JetStream, in `seq` order, deleted only after their PubAck.
//!
//! # Invariants
//! 1. Rows are published in `seq` order with up to `nats.max_in_flight` PubAcks outstanding;
//!    results are consumed in the same order (`FuturesOrdered`). Rows are read from the buffer
//!    [`FETCH_ROWS`] at a time, the next read under way while the last ones are published.
//! 2. A row is deleted from the buffer only when its own PubAck arrived (`StoreHandle::acked`).
//!    A publish that was merely written to the socket or queued in the client counts for nothing.
//! 3. Every attempt for a row carries `Nats-Msg-Id = event_id`, so JetStream drops retries of a
//!    row it already stored (within the stream's duplicate window).
//! 4. After any sign of trouble (a publish that failed, in whatever position; a lost link) no new
//!    publish goes out until every in-flight one has its outcome; PubAcks that arrive meanwhile
//!    count. Publishing then resumes at the first row without a PubAck, after a backoff: rows
//!    read ahead are forgotten and read again, once the acknowledged ones have left the buffer.
//! 5. A refusal the server will repeat forever (payload over `max_payload`, no stream for the
//!    subject as JetStream itself confirms, a publish permission the server reports denied for
//!    the subject after the row was sent, a row this version cannot decode) moves that row to
//!    the dead-letter table and the queue goes on.
//! 6. No new publish is handed to the client while it is disconnected, nor while the oldest
//!    in-flight publish waits much longer than PubAcks usually take. A lost link is never
//!    resumed: once its publishes have their outcomes it is dropped with whatever its client
//!    still queued, and a new one is opened (`nats::Connector`), so no stale publish can land
//!    ahead of the resent ones.
//! 7. Acknowledged rows go to the store as runs of seqs, deleted by one statement each. An ack
//!    extends the current run only if its row was published right after the run's last row
//!    (no row refused, failed or resumed from in between), so a run covers no buffered row that
//!    did not get its own PubAck: rows read in one pass are consecutive in the buffer, and a seq
//!    between two of them without a row can never get one.
//!
//! 8. The store's bounds never delete a row the forwarder may still publish: a fetch claims the
//!    rows it returns, and the forwarder tells the store ([`StoreHandle::holding`]) the lowest
//!    seq it read that may still be published (in flight, failed and awaiting its resend,
//!    queued, or in a read under way), always after the acks of the rows below it. Without a
//!    link, once nothing is in flight, it forgets the rows read ahead and holds none, so the
//!    bounds can take the oldest rows during an outage. A reading counted as dropped thus never
//!    reaches the stream.
//!
//! Why 4 and 6: a publish sent past one that is lost can be stored before the lost one's
//! resend (a cluster elects a new stream leader, which takes the later publish), and the stream
//! would hold them out of order. So the forwarder stops sending as soon as trouble shows,
//! keeping the publishes past a lost one few and sent within a fraction of a leader election.

use std::collections::VecDeque;
use std::future::Future;
use std::future::IntoFuture;
use std::ops::RangeInclusive;
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
use futures_util::FutureExt;
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::event::{self, Event, Subjects};
use crate::log_limit::LogLimit;
use crate::metrics::Metrics;
use crate::nats::{Connector, Link, NatsError, PublishDenials};
use crate::store::{OutboxRow, StoreError, StoreHandle};

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

/// A publish's outcome, with the seq of the row published just before it (invariant 7).
type AckResult = (
    Event,
    u64,
    Result<async_nats::jetstream::publish::PublishAck, AckError>,
);
type InFlight = Pin<Box<dyn Future<Output = AckResult> + Send>>;
type Fetch = Pin<Box<dyn Future<Output = Result<Vec<OutboxRow>, StoreError>> + Send>>;
type Opening = Pin<Box<dyn Future<Output = Result<Link, NatsError>> + Send>>;

/// Rows read from the buffer at once. Constant, so SQLite keeps one plan for the read.
const FETCH_ROWS: usize = 512;
/// Acknowledged rows reported to the store at once while more PubAcks are outstanding.
const ACK_BATCH: usize = 256;

pub struct Forwarder {
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
}

/// One link and the JetStream context publishing over it.
struct Session {
    link: Link,
    js: Context,
}

/// The publishing state that resuming after trouble resets.
struct Pipeline {
    /// Rows read from the buffer and not yet handed to the client, in seq order.
    queue: VecDeque<OutboxRow>,
    /// The read of the buffer under way, if any, with the newest committed seq when it began.
    fetching: Option<(u64, Fetch)>,
    inflight: FuturesOrdered<InFlight>,
    /// When each in-flight publish was sent, and its seq, in the same order.
    sent: VecDeque<(Instant, u64)>,
    /// Highest seq read from the buffer (queued, in flight or done).
    cursor: u64,
    /// Seq of the last row handed to the client (or refused); 0 after resuming.
    last_published: u64,
}

impl Pipeline {
    /// Invariant 4: with nothing in flight, forget every row read ahead and resume at `seq`,
    /// the first row without a PubAck.
    fn resume_at(&mut self, seq: u64) {
        debug_assert!(self.inflight.is_empty());
        self.inflight.clear();
        self.sent.clear();
        self.queue.clear();
        self.fetching = None;
        self.cursor = seq - 1;
        self.last_published = 0;
    }

    /// With nothing in flight, forgets the rows read ahead, so the store's bounds may take them
    /// while there is no link to publish them (invariant 8). True if there were any.
    fn forget_read_ahead(&mut self) -> bool {
        let any = self.fetching.is_some() || !self.queue.is_empty();
        if any {
            let first = self.queue.front().map_or(self.cursor + 1, |r| r.seq);
            self.resume_at(first);
        }
        any
    }

    fn oldest_sent(&self) -> Option<&Instant> {
        self.sent.front().map(|(at, _)| at)
    }

    /// The lowest seq read from the buffer that may still be published (invariant 8): failed
    /// and awaiting its resend, in flight, queued, or in a read under way.
    fn holding(&self, fence: &Fence) -> Option<u64> {
        [
            fence.resume_at,
            self.sent.front().map(|(_, seq)| *seq),
            self.queue.front().map(|r| r.seq),
            self.fetching.as_ref().map(|_| self.cursor + 1),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// Acknowledged rows as runs of seqs for [`StoreHandle::acked`] (invariant 7).
#[derive(Debug, Default)]
struct AckedRuns {
    runs: Vec<RangeInclusive<u64>>,
    rows: usize,
}

impl AckedRuns {
    /// Row `seq` was acknowledged; `after` is the seq of the row published just before it.
    fn push(&mut self, seq: u64, after: u64) {
        match self.runs.last_mut() {
            Some(run) if after != 0 && *run.end() == after => *run = *run.start()..=seq,
            _ => self.runs.push(seq..=seq),
        }
        self.rows += 1;
    }

    fn take(&mut self) -> Vec<RangeInclusive<u64>> {
        self.rows = 0;
        std::mem::take(&mut self.runs)
    }
}

impl Forwarder {
    pub fn new(
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
        }
    }

    fn start_session(&mut self, link: Link) {
        let js = async_nats::jetstream::context::ContextBuilder::new()
            .timeout(self.ack_timeout)
            .max_ack_inflight(self.window * 2)
            .backpressure_on_inflight(true)
            .build(link.client.clone());
        self.session = Some(Session { link, js });
    }

    /// Opens a new link after `delay`.
    fn open_link(&self, delay: Duration) -> Opening {
        let connector = self.connector.clone();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            connector.open().await
        })
    }

    fn connected(&self) -> bool {
        self.session.as_ref().is_some_and(|s| s.link.connected())
    }

    /// Runs until `shutdown` turns true, then waits briefly for outstanding PubAcks.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut committed = self.store.committed();
        let mut p = Pipeline {
            queue: VecDeque::new(),
            fetching: None,
            inflight: FuturesOrdered::new(),
            sent: VecDeque::new(),
            cursor: 0,
            last_published: 0,
        };
        let mut acked = AckedRuns::default();
        // The last `holding` told the store (invariant 8).
        let mut reported: Option<Option<u64>> = None;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut link_backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(8));
        // The first link at once; each later one after the link backoff.
        let mut opening = Some(self.open_link(Duration::ZERO));
        let link_log = LogLimit::new(Duration::from_secs(60));
        let mut fence = Fence::new(self.ack_timeout);
        let mut stream_checked = false;
        // Goes round at least once a second, so the watchdog sees the loop alive.
        let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            if *shutdown.borrow() {
                break;
            }
            self.metrics.beat_forwarder();
            let connected = self.connected();
            if !connected {
                fence.trip();
            }
            if p.inflight.is_empty() {
                if let Some(resume) = fence.settle() {
                    // Rows acknowledged while settling leave the buffer before it is read
                    // again (the flush commits their deletion).
                    p.resume_at(resume);
                    // Told even if it was the last word: a read just dropped may have claimed
                    // rows after it.
                    reported = None;
                    if self.report(&mut acked, None, &mut reported).await.is_err() {
                        return;
                    }
                    if self.store.flush().await.is_err() {
                        return;
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
                if !connected {
                    if p.forget_read_ahead() {
                        reported = None;
                    }
                    if self.session.take().is_some() {
                        self.metrics.nats_connected.set(0);
                    }
                }
                if self.session.is_none() && opening.is_none() {
                    opening = Some(self.open_link(link_backoff.next_delay()));
                }
            }
            if let (false, Some(session)) = (stream_checked, &self.session) {
                stream_checked = connected && self.check_stream(session).await;
            }
            // Marks the value seen: a commit after this line wakes `changed()` below.
            let newest = *committed.borrow_and_update();
            let low = p.queue.len() < FETCH_ROWS / 2;
            if connected && low && p.fetching.is_none() && p.cursor < newest {
                let store = self.store.clone();
                let after = p.cursor;
                p.fetching = Some((
                    newest,
                    Box::pin(async move { store.fetch(after, FETCH_ROWS).await }),
                ));
            }
            while let Some(session) = self.session.as_ref().filter(|s| s.link.connected()) {
                if p.inflight.len() >= self.window || !fence.may_send(p.oldest_sent()) {
                    break;
                }
                let Some(row) = p.queue.pop_front() else {
                    break;
                };
                let after = std::mem::replace(&mut p.last_published, row.seq);
                match self
                    .publish(session, &row, after, fence.tripped.clone())
                    .await
                {
                    Ok(ack) => {
                        p.inflight.push_back(ack);
                        p.sent.push_back((Instant::now(), row.seq));
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
            let flush = acked.rows >= ACK_BATCH || (acked.rows > 0 && p.inflight.is_empty());
            // What it holds is told only with the acks of the rows below it (or with none
            // waiting), so the store never sees a row as released before it is acknowledged.
            let holding = p.holding(&fence);
            let changed = acked.rows == 0 && reported != Some(holding);
            if (flush || changed)
                && self
                    .report(&mut acked, holding, &mut reported)
                    .await
                    .is_err()
            {
                return;
            }
            let can_send =
                connected && p.inflight.len() < self.window && fence.may_send(p.oldest_sent());
            let idle = connected && p.fetching.is_none() && p.queue.len() < FETCH_ROWS / 2;
            tokio::select! {
                Some(first) = p.inflight.next(), if !p.inflight.is_empty() => {
                    // Every result already in takes one turn of the loop.
                    let mut next = Some(first);
                    while let Some((event, after, result)) = next.take() {
                        let sent_at = p.sent.pop_front().map(|(at, _)| at);
                        match result {
                            Ok(ack) => {
                                if ack.duplicate {
                                    tracing::debug!(seq = event.seq, "JetStream already had this event (duplicate window)");
                                }
                                acked.push(event.seq, after);
                                if let Some(at) = sent_at {
                                    fence.acked(at.elapsed());
                                }
                                backoff.reset();
                                link_backoff.reset();
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
                                        tracing::warn!(seq = event.seq, error = %why, in_flight = p.inflight.len(), repeats = held, "no PubAck; resending from this reading once every publish in flight has its outcome");
                                    }
                                    fence.failed(event.seq);
                                }
                            },
                        }
                        next = p.inflight.next().now_or_never().flatten();
                    }
                }
                Some(rows) = async { match p.fetching.as_mut() { Some((_, f)) => Some(f.await), None => None } }, if p.fetching.is_some() => {
                    let newest_then = p.fetching.take().map_or(0, |(n, _)| n);
                    match rows {
                        Ok(rows) => {
                            // A short read returned every row committed when it began.
                            let complete = rows.len() < FETCH_ROWS;
                            if let Some(last) = rows.last() {
                                p.cursor = last.seq;
                            }
                            if complete {
                                p.cursor = p.cursor.max(newest_then);
                            }
                            tracing::debug!(after = p.cursor, rows = rows.len(), in_flight = p.inflight.len(), "publishing");
                            p.queue.extend(rows);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot read the buffer");
                            tokio::time::sleep(backoff.next_delay()).await;
                        }
                    }
                }
                Some(opened) = async { match opening.as_mut() { Some(o) => Some(o.await), None => None } }, if opening.is_some() => {
                    opening = None;
                    match opened {
                        Ok(link) => self.start_session(link),
                        Err(e) => {
                            if let Some(held) = link_log.admit() {
                                tracing::warn!(error = %e, repeats = held, "cannot connect to NATS; readings stay buffered, retrying with backoff");
                            }
                        }
                    }
                }
                changed = committed.changed(), if idle => {
                    if changed.is_err() { break; }
                }
                _ = tokio::time::sleep(Duration::from_millis(250)), if !connected || (!can_send && p.inflight.is_empty()) => {}
                _ = shutdown.changed() => {}
                _ = heartbeat.tick() => {}
            }
        }
        self.drain(p.inflight, acked).await;
    }

    /// Reports the acknowledged rows, then that the forwarder may still publish only rows from
    /// `holding` on (invariant 8), unless it told the store so already.
    async fn report(
        &self,
        acked: &mut AckedRuns,
        holding: Option<u64>,
        reported: &mut Option<Option<u64>>,
    ) -> Result<(), StoreError> {
        if acked.rows > 0 {
            self.store.acked(acked.take()).await?;
        }
        if *reported != Some(holding) {
            self.store.holding(holding).await?;
            *reported = Some(holding);
        }
        Ok(())
    }

    /// Waits briefly for the PubAcks in flight. What the store was last told it holds stays
    /// claimed: it covers every row in flight.
    async fn drain(&self, mut inflight: FuturesOrdered<InFlight>, mut acked: AckedRuns) {
        let deadline = tokio::time::sleep(Duration::from_secs(3));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = inflight.next() => match next {
                    Some((event, after, Ok(_))) => acked.push(event.seq, after),
                    // Anything not acknowledged stays buffered for the next start.
                    Some((_, _, Err(_))) | None => break,
                },
                _ = &mut deadline => break,
            }
        }
        if acked.rows > 0 {
            let _ = self.store.acked(acked.take()).await;
        }
        let _ = self.store.flush().await;
    }

    /// Hands a row's event to the client; `after` is the seq of the row published before it,
    /// and `tripped` is set the moment this publish fails.
    async fn publish(
        &self,
        session: &Session,
        row: &OutboxRow,
        after: u64,
        tripped: Arc<AtomicBool>,
    ) -> Result<InFlight, (Option<Event>, Failure)> {
        let event = event::render(row, &self.gateway_id, &self.subjects)
            .map_err(|e| (None, Failure::Permanent(e.to_string())))?;
        let publish = PublishMessage::build()
            .payload(event.body.clone())
            .headers(event::headers(&event));
        // Taken before sending, so a refusal of this very publish cannot slip past them.
        let sent = Instant::now();
        let denials = session.link.denials.clone();
        let refusals = denials.watch();
        match session
            .js
            .send_publish(event.subject.clone(), publish)
            .await
        {
            Ok(fut) => Ok(Box::pin(async move {
                let result = await_ack(event, fut, denials, refusals, sent).await;
                if matches!(result.1, Err(AckError::Publish(_))) {
                    tripped.store(true, Ordering::Relaxed);
                }
                (result.0, after, result.1)
            })),
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
                let missing = match &self.session {
                    Some(s) => matches!(
                        s.js.stream_by_subject(subject.to_string()).await,
                        Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound
                    ),
                    None => false,
                };
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
        let raw = event.map(|e| e.body.to_vec()).unwrap_or_default();
        if self.store.refused(seq, why.to_string(), raw).await.is_err() {
            tracing::error!("buffer closed while dead-lettering");
        }
    }

    /// Says, once connected, whether a JetStream stream captures the gateway's subject.
    async fn check_stream(&self, session: &Session) -> bool {
        let sample = self.subjects.reading.render(|name| match name {
            "gateway_id" => self.gateway_id.clone(),
            _ => "x".into(),
        });
        match session.js.stream_by_subject(sample.clone()).await {
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
) -> (
    Event,
    Result<async_nats::jetstream::publish::PublishAck, AckError>,
) {
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

    #[test]
    fn acked_runs_span_only_rows_published_one_after_another() {
        let mut runs = AckedRuns::default();
        // 1, 2, 3 published in a row; 4 was refused; 5 and 7 follow it (6 no longer buffered
        // when read, so 7 was published right after 5).
        runs.push(1, 0);
        runs.push(2, 1);
        runs.push(3, 2);
        runs.push(5, 4);
        runs.push(7, 5);
        // After resuming nothing counts as published before the first row.
        runs.push(8, 0);
        assert_eq!(runs.rows, 6);
        assert_eq!(runs.take(), vec![1..=3, 5..=7, 8..=8]);
        assert_eq!(runs.rows, 0);
        // A new batch starts a new run, even for the next row.
        runs.push(9, 8);
        assert_eq!(runs.take(), vec![9..=9]);
        // 10..=13 in flight, 11 gets no PubAck while the others do: no run spans 11.
        runs.push(10, 9);
        runs.push(12, 11);
        runs.push(13, 12);
        assert_eq!(runs.take(), vec![10..=10, 12..=13]);
    }
}
