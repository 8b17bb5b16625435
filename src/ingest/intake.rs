//! The commit queue every MQTT input shares: a message is mapped, screened by the shared ingest
//! rules ([`super::admission`]: flood protection, dead-letters) and handed to the store; its
//! outcome comes back in arrival order, so the input acknowledges in that order and only after
//! the commit.
//!
//! A message whose readings must wait for their flood budget is committed after the wait, and
//! after every message that waited before it, so waiting never reorders an input's messages.
//! Messages that need not wait are not held back from the store; only their acknowledgements
//! keep their order, which is what slows a fast sender down (MQTT Receive Maximum, the
//! listener's `max_in_flight`).
//!
//! A message the store could not take (buffer full with `reject_new`, disk reserve, a failed
//! commit) is offered again after a backoff and stays at the head of the queue meanwhile: nothing
//! behind it is reported before it, and it is never acknowledged while uncommitted. It is offered
//! again as it was first screened, so a retry is never charged twice against the flood limits.
//!
//! Cost per message: a message that need not wait is queued at the store at once and held as
//! the plain receiver of its commit reply; only the head of the queue is polled, so only the
//! head's receiver holds a waker and the writer's group commit wakes the input once, not once
//! per message (the rest are found answered when they reach the head). Only a message that
//! waits (flood budget, a waiting message ahead, a retry's backoff) keeps a future; those are
//! driven wherever they stand, so their waits still overlap.
//!
//! The [`Append`] is shared with the store, not copied: the store only reads it, so a retry
//! offers again the message as it was screened.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::common::backoff::Backoff;
use crate::common::metrics::Metrics;
use crate::common::trace::TraceContext;
use crate::ingest::mapping::{self, SharedMapper};
use crate::reading::Timestamp;
use crate::store::{Append, AppendOutcome, StoreError, StoreHandle};

pub(crate) use super::admission::flood_guard;
use super::admission::Admission;
pub use super::admission::SharedFloodGuard;

/// One MQTT message as an input received it.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: Bytes,
    pub payload: Bytes,
    /// The sender marked it as a possible resend (MQTT DUP).
    pub(crate) dup: bool,
    pub received: Timestamp,
    /// The W3C trace context of its MQTT 5 user properties, if valid.
    pub trace: Option<TraceContext>,
}

/// How a queued message ended, in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Committed: acknowledge it.
    Stored,
    /// The same message was committed before (a resend); nothing stored again. Acknowledge it.
    Duplicate,
    /// Refused by the store after [`Intake::give_up`]: never acknowledge it.
    NotStored,
    /// Queued with [`Intake::pass`]: answered without a commit, in its place in the order.
    Passed,
}

/// A queued message's result: its commit, or nothing to commit.
enum Settled {
    Commit(Arc<Append>, Result<AppendOutcome, StoreError>),
    Passed,
}

type Reply = oneshot::Receiver<Result<AppendOutcome, StoreError>>;

/// A message that waits before it is queued at the store; yields its commit.
type Later = Pin<Box<dyn Future<Output = (Arc<Append>, Result<AppendOutcome, StoreError>)> + Send>>;

/// One queued message and where it stands.
struct Entry<T> {
    tag: T,
    state: State,
}

enum State {
    /// Queued at the store: the writer answers on the receiver (the common case, no future).
    Queued(Arc<Append>, Reply),
    /// Still waiting to be queued at the store.
    Later(Later),
    /// Settled: a commit answered, or a message passed ([`Intake::pass`]).
    Done(Settled),
}

/// Messages of one input awaiting their commit, in arrival order. `T` is what the input needs
/// to acknowledge a message (the packet, or its id).
pub(crate) struct Intake<T> {
    source: String,
    mapper: SharedMapper,
    store: StoreHandle,
    admission: Admission,
    pending: VecDeque<Entry<T>>,
    /// How many entries of `pending` are [`State::Later`]: none, no scan for them.
    later: usize,
    retry: Backoff,
    /// The last outcome was a refusal; cleared by the next commit.
    refused_last: bool,
    /// Refused messages are handed back instead of retried (the input is stopping).
    give_up: bool,
    /// Resolves once the last message that had to wait is queued at the store: the next one
    /// that waits goes after it, so waiting never reorders an input's messages.
    last_waiting: Option<oneshot::Receiver<()>>,
}

impl<T> Intake<T> {
    pub(crate) fn new(
        source: &str,
        mapper: SharedMapper,
        store: StoreHandle,
        flood: SharedFloodGuard,
        metrics: &Metrics,
    ) -> Self {
        Self {
            source: source.to_string(),
            mapper,
            store,
            admission: Admission::new(source, flood, metrics),
            pending: VecDeque::new(),
            later: 0,
            retry: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
            refused_last: false,
            give_up: false,
            last_waiting: None,
        }
    }

    /// Maps and screens `message` and queues its commit: at once, or after the wait its flood
    /// budget asks for. Awaiting the store's queue is the back-pressure when the writer falls
    /// behind.
    pub(crate) async fn offer(&mut self, tag: T, message: Message) -> Result<(), StoreError> {
        let (append, wait_until) = self.prepare(&message);
        let append = Arc::new(append);
        // Behind a message still waiting, even one that need not wait queues after it.
        let wait_until = wait_until.or_else(|| self.waiting_ahead().then(Instant::now));
        let state = match wait_until {
            None => {
                let reply = self.store.append(Arc::clone(&append)).await?;
                State::Queued(append, reply)
            }
            Some(at) => {
                let store = self.store.clone();
                let (queued, next) = oneshot::channel();
                let before = self.last_waiting.replace(next);
                self.later += 1;
                State::Later(Box::pin(async move {
                    tokio::time::sleep_until(at.into()).await;
                    if let Some(before) = before {
                        let _ = before.await;
                    }
                    let in_store = store.append(Arc::clone(&append)).await;
                    let _ = queued.send(());
                    let result = committed(in_store).await;
                    (append, result)
                }))
            }
        };
        self.pending.push_back(Entry { tag, state });
        Ok(())
    }

    /// Queues a message that needs no commit (its answer is already decided), so that answer
    /// keeps its place among the acknowledgements.
    pub(crate) fn pass(&mut self, tag: T) {
        self.pending.push_back(Entry {
            tag,
            state: State::Done(Settled::Passed),
        });
    }

    /// The next message in arrival order once it is settled. Refusals are retried here, so
    /// this may take a while; it is cancel-safe. `None` when nothing is pending.
    pub(crate) async fn next(&mut self) -> Option<(T, Outcome)> {
        loop {
            // Cancel-safe: an entry leaves the queue only when this returns it, and nothing
            // below awaits.
            let (tag, settled) = std::future::poll_fn(|cx| self.poll_head(cx)).await?;
            let (append, result) = match settled {
                Settled::Passed => return Some((tag, Outcome::Passed)),
                Settled::Commit(append, result) => (append, result),
            };
            match result {
                Ok(AppendOutcome::Stored { .. }) | Ok(AppendOutcome::Duplicate) => {
                    self.retry.reset();
                    self.refused_last = false;
                    let how = if matches!(result, Ok(AppendOutcome::Duplicate)) {
                        Outcome::Duplicate
                    } else {
                        Outcome::Stored
                    };
                    return Some((tag, how));
                }
                Ok(AppendOutcome::Full) | Err(_) => {
                    if let Err(e) = &result {
                        tracing::warn!(source = %self.source, error = %e, "commit failed; message kept unacknowledged and retried");
                    }
                    if self.give_up {
                        return Some((tag, Outcome::NotStored));
                    }
                    // A refusal that came before the last success is stale: retry at once.
                    // Only consecutive refusals back off.
                    let delay = if self.refused_last {
                        self.retry.next_delay()
                    } else {
                        Duration::ZERO
                    };
                    self.refused_last = true;
                    let store = self.store.clone();
                    self.later += 1;
                    let retry: Later = Box::pin(async move {
                        tokio::time::sleep(delay).await;
                        let result = append_once(&store, Arc::clone(&append)).await;
                        (append, result)
                    });
                    self.pending.push_front(Entry {
                        tag,
                        state: State::Later(retry),
                    });
                }
            }
        }
    }

    /// The head of the queue once it is settled. Only the head's reply is polled (and so holds
    /// the waker); waiting messages are driven wherever they stand.
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Option<(T, Settled)>> {
        self.drive_later(cx);
        let Some(head) = self.pending.front_mut() else {
            return Poll::Ready(None);
        };
        if let State::Queued(_, reply) = &mut head.state {
            let Poll::Ready(answer) = Pin::new(reply).poll(cx) else {
                return Poll::Pending;
            };
            let result = answer.unwrap_or(Err(StoreError::Closed));
            if let State::Queued(append, _) =
                std::mem::replace(&mut head.state, State::Done(Settled::Passed))
            {
                head.state = State::Done(Settled::Commit(append, result));
            }
        }
        match self.pending.pop_front() {
            Some(Entry {
                tag,
                state: State::Done(settled),
            }) => Poll::Ready(Some((tag, settled))),
            Some(waiting) => {
                self.pending.push_front(waiting);
                Poll::Pending
            }
            None => Poll::Ready(None),
        }
    }

    /// Polls every message still waiting to be queued; one that is through is kept as done.
    fn drive_later(&mut self, cx: &mut Context<'_>) {
        if self.later == 0 {
            return;
        }
        for entry in self.pending.iter_mut() {
            if let State::Later(run) = &mut entry.state {
                if let Poll::Ready((append, result)) = run.as_mut().poll(cx) {
                    entry.state = State::Done(Settled::Commit(append, result));
                    self.later -= 1;
                }
            }
        }
    }

    /// True while a message that waited is not yet queued at the store.
    fn waiting_ahead(&mut self) -> bool {
        match self.last_waiting.as_mut().map(oneshot::Receiver::try_recv) {
            Some(Err(oneshot::error::TryRecvError::Empty)) => true,
            _ => {
                self.last_waiting = None;
                false
            }
        }
    }

    /// Messages offered and not yet handed back by [`Intake::next`].
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// True while the store refuses the message at the head of the queue.
    pub(crate) fn refusing(&self) -> bool {
        self.refused_last
    }

    /// From now on, a refused message is handed back unstored instead of retried, so a stopping
    /// input is not held up by a full buffer. Its sender keeps it (no acknowledgement).
    pub(crate) fn give_up(&mut self) {
        self.give_up = true;
    }

    /// Maps a message and packs what one commit appends, with the time it may commit.
    fn prepare(&self, m: &Message) -> (Append, Option<Instant>) {
        let topic = String::from_utf8_lossy(&m.topic);
        let mapped =
            mapping::current(&self.mapper).map_mqtt(&self.source, &topic, &m.payload, m.received);
        let admitted = self.admission.admit(
            mapped,
            &[],
            &format_args!("topic {topic}"),
            Some(&topic),
            &m.payload,
            Instant::now(),
        );
        let append = Append {
            readings: admitted.readings,
            dead_letters: admitted.dead_letters,
            message_key: Some(message_key(&self.source, &m.topic, &m.payload)),
            maybe_duplicate: m.dup,
            frame_key: None,
            trace: m.trace.clone(),
        };
        (append, admitted.wait_until)
    }
}

/// Appends once and awaits the commit: `Full` (or an error) means nothing was stored.
pub(crate) async fn append_once(
    store: &StoreHandle,
    append: impl Into<Arc<Append>>,
) -> Result<AppendOutcome, StoreError> {
    committed(store.append(append).await).await
}

/// The outcome of an append queued at the store (or the error that kept it from the queue).
async fn committed(
    queued: Result<oneshot::Receiver<Result<AppendOutcome, StoreError>>, StoreError>,
) -> Result<AppendOutcome, StoreError> {
    queued?.await.unwrap_or(Err(StoreError::Closed))
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
