//! The publishes awaiting their PubAcks, handed back in publish order with their outcomes.
//!
//! Every publish of a link names a reply subject under one inbox the link subscribed to once
//! (`<inbox>.<token>`, a token counted up per publish), so JetStream's PubAcks arrive on one
//! subscription: no reply inbox, `oneshot`, ack future and timer of its own per publish, and one
//! wake-up for all the PubAcks that came in together.
//!
//! # Invariants
//! 1. Outcomes leave in the order of the publishes (tokens rise with the queue), each once.
//! 2. Only a PubAck for the entry's own token settles it as delivered; a reply for a token no
//!    longer queued (it timed out) is ignored.
//! 3. A failure that trips the forwarder's fence is flagged the moment it is known, wherever the
//!    entry stands in the queue ([`InFlight::take_tripped`]).
//! 4. The head waits at most the ack timeout from its send; entries behind it were sent later, so
//!    their deadlines are later and one timer, re-armed only when it fires, serves them all.
//! 5. A refusal the server reports for a subject after an entry was sent settles that entry as
//!    denied; so does an error or missing reply once the subject has been refused since.
//! 6. When the link's client is gone (the subscription ends) every unsettled entry fails as a
//!    broken pipe: nothing more can come for it.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::{Message, StatusCode, Subscriber};
use futures_util::Stream;
use serde::de::IgnoredAny;
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Sleep;

use super::core::{Failure, Refusal};
use super::driver::{failure, AckOutcome};
use crate::uplink::event::Event;
use crate::uplink::nats::{Link, PublishDenials};

/// The PubAck subscription of one link, and the refusals its server reports.
pub(super) struct Replies {
    /// `<inbox>.`: a publish's reply subject is this and its token.
    prefix: String,
    subscriber: ReplyStream,
    denials: Arc<PublishDenials>,
    refusals: Refusals,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Message> + Send>>;

/// Resolves with the receiver again once a new refusal is recorded (`None`: never again).
type Refusals = Pin<Box<dyn Future<Output = Option<watch::Receiver<u64>>> + Send>>;

fn next_refusal(mut receiver: watch::Receiver<u64>) -> Refusals {
    Box::pin(async move { receiver.changed().await.ok().map(|()| receiver) })
}

impl Replies {
    /// Subscribes `link` to its PubAck inbox; the subscription is queued ahead of any publish,
    /// so the server knows it before the first reply.
    pub(super) async fn subscribe(link: &Link) -> Result<Self, async_nats::SubscribeError> {
        let inbox = link.client.new_inbox();
        let subscriber: Subscriber = link.client.subscribe(format!("{inbox}.*")).await?;
        Ok(Self::new(
            format!("{inbox}."),
            Box::pin(subscriber),
            link.denials.clone(),
        ))
    }

    fn new(prefix: String, subscriber: ReplyStream, denials: Arc<PublishDenials>) -> Self {
        Self {
            prefix,
            subscriber,
            refusals: next_refusal(denials.watch()),
            denials,
        }
    }
}

struct Entry {
    token: u64,
    event: Event,
    sent: Instant,
    outcome: Option<AckOutcome>,
}

/// The publishes in flight, as a stream of `(event, outcome)` in publish order.
pub(super) struct InFlight {
    queue: VecDeque<Entry>,
    replies: Option<Replies>,
    next_token: u64,
    ack_timeout: Duration,
    /// Fires at or before the head's deadline (invariant 4).
    timer: Option<Pin<Box<Sleep>>>,
    tripped: bool,
}

impl InFlight {
    pub(super) fn new(ack_timeout: Duration) -> Self {
        Self {
            queue: VecDeque::new(),
            replies: None,
            next_token: 0,
            ack_timeout,
            timer: None,
            tripped: false,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The PubAck subscription of a new link.
    pub(super) fn attach(&mut self, replies: Replies) {
        self.replies = Some(replies);
    }

    /// The link is dropped: its PubAcks can no longer come.
    pub(super) fn detach(&mut self) {
        self.replies = None;
    }

    /// The reply subject for the next publish, and its token for [`InFlight::push`].
    pub(super) fn reply_subject(&mut self) -> Option<(u64, String)> {
        let replies = self.replies.as_ref()?;
        let token = self.next_token;
        self.next_token += 1;
        Some((token, format!("{}{token}", replies.prefix)))
    }

    /// `event` was handed to the client with the reply subject of `token`.
    pub(super) fn push(&mut self, token: u64, event: Event, sent: Instant) {
        self.queue.push_back(Entry {
            token,
            event,
            sent,
            outcome: None,
        });
    }

    /// Whether a failure that trips the fence happened since the last call (invariant 3).
    pub(super) fn take_tripped(&mut self) -> bool {
        std::mem::take(&mut self.tripped)
    }

    fn settle(&mut self, index: usize, outcome: AckOutcome) {
        let entry = &mut self.queue[index];
        if entry.outcome.is_some() {
            return;
        }
        let outcome = match (outcome, &self.replies) {
            (Err(_), Some(r)) if r.denials.denied_since(&entry.event.subject, entry.sent) => {
                Err(denied(&entry.event.subject))
            }
            (outcome, _) => outcome,
        };
        if matches!(&outcome, Err(f) if f.trips()) {
            self.tripped = true;
        }
        entry.outcome = Some(outcome);
    }

    /// Settles the entries every reply received so far is for.
    fn take_replies(&mut self, cx: &mut Context<'_>) {
        loop {
            let Some(replies) = &mut self.replies else {
                return;
            };
            match replies.subscriber.as_mut().poll_next(cx) {
                Poll::Ready(Some(message)) => {
                    let token = message
                        .subject
                        .strip_prefix(replies.prefix.as_str())
                        .and_then(|t| t.parse::<u64>().ok());
                    let index =
                        token.and_then(|t| self.queue.binary_search_by_key(&t, |e| e.token).ok());
                    if let Some(index) = index {
                        self.settle(index, ack_outcome(&message));
                    }
                }
                Poll::Ready(None) => {
                    // Invariant 6: the client is gone with every reply it would have had.
                    for index in 0..self.queue.len() {
                        self.settle(index, Err(failed(PublishErrorKind::BrokenPipe)));
                    }
                    self.replies = None;
                    return;
                }
                Poll::Pending => return,
            }
        }
    }

    /// Settles the entries refused by a permission error reported since they were sent.
    fn take_refusals(&mut self, cx: &mut Context<'_>) {
        let Some(replies) = &mut self.replies else {
            return;
        };
        let mut changed = false;
        loop {
            match replies.refusals.as_mut().poll(cx) {
                Poll::Pending => break,
                Poll::Ready(Some(receiver)) => {
                    replies.refusals = next_refusal(receiver);
                    changed = true;
                }
                Poll::Ready(None) => {
                    replies.refusals = Box::pin(std::future::pending());
                    break;
                }
            }
        }
        if !changed {
            return;
        }
        for entry in self.queue.iter_mut().filter(|e| e.outcome.is_none()) {
            if replies
                .denials
                .denied_since(&entry.event.subject, entry.sent)
            {
                entry.outcome = Some(Err(denied(&entry.event.subject)));
            }
        }
    }

    /// Times the head out once its deadline passed; `Pending` while it may still get a reply.
    fn poll_head_deadline(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(head) = self.queue.front() else {
            return Poll::Ready(());
        };
        if head.outcome.is_some() {
            return Poll::Ready(());
        }
        let deadline = tokio::time::Instant::from_std(head.sent + self.ack_timeout);
        loop {
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if timer.deadline() >= deadline {
                break;
            }
            // Set for an earlier head: re-armed for this one.
            timer.as_mut().reset(deadline);
        }
        self.timer = None;
        self.settle(0, Err(failed(PublishErrorKind::TimedOut)));
        Poll::Ready(())
    }
}

impl Stream for InFlight {
    type Item = (Event, AckOutcome);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.take_replies(cx);
        this.take_refusals(cx);
        if this.poll_head_deadline(cx).is_pending() {
            return Poll::Pending;
        }
        let Some(entry) = this.queue.pop_front() else {
            return Poll::Ready(None);
        };
        // Always settled here: the head is, once its deadline is past.
        let outcome = entry
            .outcome
            .unwrap_or_else(|| Err(failed(PublishErrorKind::TimedOut)));
        Poll::Ready(Some((entry.event, outcome)))
    }
}

/// A failure of `kind` with nothing more to say, as async-nats would report it.
fn failed(kind: PublishErrorKind) -> Failure {
    failure(&PublishError::new(kind))
}

fn denied(subject: &str) -> Failure {
    Failure::Permanent {
        refusal: Refusal::Denied,
        detail: format!(
            "permission denied: the NATS server does not let this user publish to {subject}"
        ),
    }
}

/// JetStream's reply to a publish: a PubAck, or an API error.
#[derive(Deserialize)]
struct PubAckReply {
    error: Option<async_nats::jetstream::Error>,
    seq: Option<IgnoredAny>,
    #[serde(default)]
    duplicate: bool,
}

/// The outcome a reply gives, read as async-nats reads a PubAck.
fn ack_outcome(message: &Message) -> AckOutcome {
    if message.status == Some(StatusCode::NO_RESPONDERS) {
        return Err(failed(PublishErrorKind::StreamNotFound));
    }
    let reply: PubAckReply = serde_json::from_slice(&message.payload)
        .map_err(|e| failure(&PublishError::with_source(PublishErrorKind::Other, e)))?;
    match reply {
        PubAckReply {
            error: Some(error), ..
        } => {
            let kind = match error.error_code() {
                async_nats::jetstream::ErrorCode::STREAM_WRONG_LAST_MESSAGE_ID => {
                    PublishErrorKind::WrongLastMessageId
                }
                async_nats::jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE => {
                    PublishErrorKind::WrongLastSequence
                }
                _ => PublishErrorKind::Other,
            };
            Err(failure(&PublishError::with_source(kind, error)))
        }
        PubAckReply { seq: Some(_), .. } => Ok(reply.duplicate),
        PubAckReply { seq: None, .. } => Err(failure(&PublishError::with_source(
            PublishErrorKind::Other,
            "the reply is neither a PubAck nor a JetStream error",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uplink::forward::core::Transient;

    fn reply(payload: &str, status: Option<StatusCode>) -> Message {
        Message {
            subject: "_INBOX.x.7".into(),
            reply: None,
            payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
            headers: None,
            status,
            description: None,
            length: payload.len(),
        }
    }

    const ACK: &str = r#"{"stream":"S","seq":1}"#;
    const OFFLINE: &str = r#"{"error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}"#;

    /// A queue attached to a reply stream the test feeds, and the denials it watches.
    struct Harness {
        inflight: InFlight,
        replies: tokio::sync::mpsc::UnboundedSender<Message>,
        denials: Arc<PublishDenials>,
    }

    impl Harness {
        fn new(ack_timeout: Duration) -> Self {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|m| (m, rx))
            });
            let denials = Arc::new(PublishDenials::new());
            let mut inflight = InFlight::new(ack_timeout);
            inflight.attach(Replies::new(
                "_INBOX.t.".into(),
                Box::pin(stream),
                denials.clone(),
            ));
            Self {
                inflight,
                replies: tx,
                denials,
            }
        }

        /// Publishes the event of `seq` to `subject`; returns its token.
        fn publish(&mut self, seq: u64, subject: &str) -> u64 {
            let (token, reply) = self.inflight.reply_subject().expect("attached");
            assert_eq!(reply, format!("_INBOX.t.{token}"));
            let trace = crate::common::trace::TraceParent::derived(&[1; 16]);
            let event = Event {
                seq,
                event_id: format!("e{seq}"),
                tenant_id: "t".into(),
                correlation_id: format!("e{seq}"),
                subject: subject.into(),
                body: bytes::Bytes::new(),
                traceparent: trace.text(),
                tracestate: None,
            };
            self.inflight.push(token, event, Instant::now());
            token
        }

        fn reply(&self, token: u64, payload: &str) {
            let mut message = reply(payload, None);
            message.subject = format!("_INBOX.t.{token}").into();
            self.replies.send(message).expect("queue alive");
        }

        /// The next outcome, if one is ready now.
        fn ready(&mut self) -> Option<(u64, AckOutcome)> {
            use futures_util::{FutureExt, StreamExt};
            self.inflight
                .next()
                .now_or_never()
                .flatten()
                .map(|(e, o)| (e.seq, o))
        }
    }

    #[tokio::test]
    async fn outcomes_leave_in_publish_order_whatever_order_the_replies_come_in() {
        let mut h = Harness::new(Duration::from_secs(30));
        let tokens: Vec<u64> = (10..14).map(|seq| h.publish(seq, "a")).collect();
        h.reply(tokens[2], ACK);
        h.reply(tokens[1], r#"{"stream":"S","seq":2,"duplicate":true}"#);
        assert!(h.ready().is_none(), "the head has no reply yet");
        h.reply(tokens[0], ACK);
        assert!(matches!(h.ready(), Some((10, Ok(false)))));
        assert!(matches!(h.ready(), Some((11, Ok(true)))));
        assert!(matches!(h.ready(), Some((12, Ok(false)))));
        assert!(h.ready().is_none());
        // A second reply for a token settles nothing twice; an unknown token settles nothing.
        h.reply(tokens[3], ACK);
        h.reply(tokens[3], OFFLINE);
        h.reply(999, OFFLINE);
        assert!(matches!(h.ready(), Some((13, Ok(false)))));
        assert_eq!(h.inflight.len(), 0);
        assert!(!h.inflight.take_tripped());
    }

    #[tokio::test]
    async fn a_failure_behind_the_head_trips_at_once_and_leaves_in_its_turn() {
        let mut h = Harness::new(Duration::from_secs(30));
        let head = h.publish(1, "a");
        let behind = h.publish(2, "a");
        h.reply(behind, OFFLINE);
        assert!(h.ready().is_none());
        assert!(h.inflight.take_tripped(), "tripped before its turn");
        assert!(!h.inflight.take_tripped(), "once");
        h.reply(head, ACK);
        assert!(matches!(h.ready(), Some((1, Ok(false)))));
        assert!(matches!(
            h.ready(),
            Some((2, Err(Failure::Transient { .. })))
        ));
    }

    #[tokio::test]
    async fn the_head_times_out_and_its_late_puback_counts_for_nothing() {
        use futures_util::StreamExt;
        let mut h = Harness::new(Duration::from_millis(100));
        let head = h.publish(1, "a");
        tokio::time::sleep(Duration::from_millis(60)).await;
        let second = h.publish(2, "a");
        let started = Instant::now();
        let (event, outcome) = h.inflight.next().await.expect("an outcome");
        assert_eq!(event.seq, 1);
        assert!(matches!(
            outcome,
            Err(Failure::Transient {
                kind: Transient::TimedOut,
                ..
            })
        ));
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert!(h.inflight.take_tripped());
        h.reply(head, ACK);
        // The second waits its own full timeout, not the first's.
        assert!(h.ready().is_none());
        let (event, outcome) = h.inflight.next().await.expect("an outcome");
        assert_eq!(event.seq, 2);
        assert!(outcome.is_err());
        assert!(started.elapsed() >= Duration::from_millis(90));
        h.reply(second, ACK);
        assert!(h.ready().is_none() && h.inflight.is_empty());
    }

    #[tokio::test]
    async fn when_the_client_is_gone_every_unsettled_publish_fails_as_a_broken_pipe() {
        let mut h = Harness::new(Duration::from_secs(30));
        let first = h.publish(1, "a");
        h.publish(2, "a");
        h.reply(first, ACK);
        drop(h.replies);
        let mut inflight = h.inflight;
        use futures_util::{FutureExt, StreamExt};
        let mut ready = || {
            inflight
                .next()
                .now_or_never()
                .flatten()
                .map(|(e, o)| (e.seq, o))
        };
        assert!(matches!(ready(), Some((1, Ok(false)))));
        assert!(matches!(
            ready(),
            Some((
                2,
                Err(Failure::Transient {
                    kind: Transient::BrokenPipe,
                    ..
                })
            ))
        ));
        assert!(ready().is_none());
        assert!(inflight.take_tripped());
        assert!(
            inflight.reply_subject().is_none(),
            "no link, no reply subject"
        );
    }

    #[tokio::test]
    async fn a_subject_refused_after_the_send_settles_as_denied_without_tripping() {
        let mut h = Harness::new(Duration::from_secs(30));
        h.publish(1, "denied.subject");
        let other = h.publish(2, "allowed");
        assert!(h.ready().is_none());
        h.denials.record("denied.subject");
        assert_eq!(
            h.ready().map(|(seq, o)| (seq, refusal(o))),
            Some((1, Some(Refusal::Denied)))
        );
        assert!(!h.inflight.take_tripped());
        h.reply(other, ACK);
        assert!(matches!(h.ready(), Some((2, Ok(false)))));
    }

    fn refusal(outcome: AckOutcome) -> Option<Refusal> {
        match outcome {
            Err(Failure::Permanent { refusal, .. }) => Some(refusal),
            _ => None,
        }
    }

    #[test]
    fn pubacks_and_jetstream_errors_read_as_async_nats_reads_them() {
        let ack = r#"{"stream":"SAHOOL_IOT","seq":12,"domain":"hub"}"#;
        assert!(matches!(ack_outcome(&reply(ack, None)), Ok(false)));
        let again = r#"{"stream":"SAHOOL_IOT","seq":12,"duplicate":true}"#;
        assert!(matches!(ack_outcome(&reply(again, None)), Ok(true)));

        // No stream listens: the server answers for JetStream with a 503 status.
        let none = ack_outcome(&reply("", Some(StatusCode::NO_RESPONDERS)));
        assert_eq!(refusal(none), Some(Refusal::NoStream));

        let too_big = r#"{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum allowed"}}"#;
        assert_eq!(
            refusal(ack_outcome(&reply(too_big, None))),
            Some(Refusal::PayloadTooLarge)
        );
        let offline = r#"{"error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}"#;
        match ack_outcome(&reply(offline, None)) {
            Err(Failure::Transient { kind, detail }) => {
                assert_eq!(kind, Transient::Other);
                assert!(detail.contains("temporarily unavailable"), "{detail}");
            }
            other => panic!("a transient failure expected, got {other:?}"),
        }

        for garbage in ["", "not json", r#"{"stream":"S"}"#, "[1,2]"] {
            assert!(
                matches!(
                    ack_outcome(&reply(garbage, None)),
                    Err(Failure::Transient {
                        kind: Transient::Other,
                        ..
                    })
                ),
                "{garbage:?} is no PubAck"
            );
        }
    }
}
