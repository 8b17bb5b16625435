//! The commit queue every MQTT input shares: a message is mapped, rate-limited and handed to the
//! store; its outcome comes back in arrival order, so the input acknowledges in that order and
//! only after the commit.
//!
//! A message the store could not take (buffer full with `reject_new`, disk reserve, a failed
//! commit) is offered again after a backoff and stays at the head of the queue meanwhile: nothing
//! behind it is reported before it, and it is never acknowledged while uncommitted.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, StreamExt};
use prometheus_client::metrics::counter::Counter;

use crate::backoff::Backoff;
use crate::config::Quality;
use crate::flood::FloodGuard;
use crate::mapping::{self, Mapper, Reason, SharedMapper};
use crate::metrics::Metrics;
use crate::reading::Timestamp;
use crate::store::{Append, AppendOutcome, NewDeadLetter, StoreError, StoreHandle};

/// One MQTT message as an input received it.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: Bytes,
    pub payload: Bytes,
    /// The sender marked it as a possible resend (MQTT DUP).
    pub dup: bool,
    pub received: Timestamp,
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

/// The flood guard of one source, shared by every connection that feeds it.
pub type SharedFloodGuard = Arc<Mutex<FloodGuard>>;

pub fn flood_guard(q: &Quality) -> SharedFloodGuard {
    Arc::new(Mutex::new(FloodGuard::new(
        q.device_rate,
        q.device_burst,
        q.source_rate,
        q.source_burst,
    )))
}

/// A queued message's result: its commit, or nothing to commit.
enum Settled {
    Commit(Message, Result<AppendOutcome, StoreError>),
    Passed,
}

type Pending<T> = Pin<Box<dyn Future<Output = (T, Settled)> + Send>>;

/// Messages of one input awaiting their commit, in arrival order. `T` is what the input needs
/// to acknowledge a message (the packet, or its id).
pub struct Intake<T> {
    source: String,
    mapper: SharedMapper,
    store: StoreHandle,
    flood: SharedFloodGuard,
    rate_limited: Counter,
    pending: FuturesOrdered<Pending<T>>,
    retry: Backoff,
    /// The last outcome was a refusal; cleared by the next commit.
    refused_last: bool,
    /// Refused messages are handed back instead of retried (the input is stopping).
    give_up: bool,
}

impl<T: Send + 'static> Intake<T> {
    pub fn new(
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
            flood,
            rate_limited: metrics.rejected(Reason::RateLimited.label()),
            pending: FuturesOrdered::new(),
            retry: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
            refused_last: false,
            give_up: false,
        }
    }

    /// Maps `message`, drops readings over the flood limits, and queues the commit. Awaiting
    /// the store's queue is the back-pressure when the writer falls behind.
    pub async fn offer(&mut self, tag: T, message: Message) -> Result<(), StoreError> {
        let mut append = self.append_for(&message);
        let before = append.readings.len();
        if before > 0 {
            let now = Instant::now();
            let mut flood = self.flood.lock().unwrap_or_else(|e| e.into_inner());
            append.readings.retain(|r| flood.admit(&r.device_id, now));
        }
        self.rate_limited
            .inc_by((before - append.readings.len()) as u64);
        let rx = self.store.append(append).await?;
        self.pending.push_back(Box::pin(async move {
            let result = rx.await.unwrap_or(Err(StoreError::Closed));
            (tag, Settled::Commit(message, result))
        }));
        Ok(())
    }

    /// Queues a message that needs no commit (its answer is already decided), so that answer
    /// keeps its place among the acknowledgements.
    pub fn pass(&mut self, tag: T) {
        self.pending
            .push_back(Box::pin(std::future::ready((tag, Settled::Passed))));
    }

    /// The next message in arrival order once it is settled. Refusals are retried here, so
    /// this may take a while; it is cancel-safe. `None` when nothing is pending.
    pub async fn next(&mut self) -> Option<(T, Outcome)> {
        loop {
            let (tag, settled) = self.pending.next().await?;
            let (message, result) = match settled {
                Settled::Passed => return Some((tag, Outcome::Passed)),
                Settled::Commit(message, result) => (message, result),
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
                    let append = self.append_for(&message);
                    self.pending.push_front(Box::pin(async move {
                        tokio::time::sleep(delay).await;
                        let result = match store.append(append).await {
                            Ok(rx) => rx.await.unwrap_or(Err(StoreError::Closed)),
                            Err(e) => Err(e),
                        };
                        (tag, Settled::Commit(message, result))
                    }));
                }
            }
        }
    }

    /// Messages offered and not yet handed back by [`Intake::next`].
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// True while the store refuses the message at the head of the queue.
    pub fn refusing(&self) -> bool {
        self.refused_last
    }

    /// From now on, a refused message is handed back unstored instead of retried, so a stopping
    /// input is not held up by a full buffer. Its sender keeps it (no acknowledgement).
    pub fn give_up(&mut self) {
        self.give_up = true;
    }

    fn append_for(&self, m: &Message) -> Append {
        build_append(&mapping::current(&self.mapper), &self.source, m)
    }
}

/// Maps a message and packs readings, rejections and the message's identity for one commit.
fn build_append(mapper: &Mapper, source: &str, m: &Message) -> Append {
    let topic = String::from_utf8_lossy(&m.topic);
    let mapped = mapper.map_mqtt(source, &topic, &m.payload, m.received);
    let raw: Arc<[u8]> = if mapped.rejections.is_empty() {
        Arc::from(&[][..])
    } else {
        Arc::from(&m.payload[..])
    };
    let dead_letters = mapped
        .rejections
        .into_iter()
        .map(|r| NewDeadLetter {
            source: source.to_string(),
            reason: r.reason,
            detail: format!("topic {topic}: {}", r.detail),
            raw: raw.clone(),
            topic: Some(topic.to_string()),
            device: None,
        })
        .collect();
    Append {
        readings: mapped.readings,
        dead_letters,
        message_key: Some(message_key(source, &m.topic, &m.payload)),
        maybe_duplicate: m.dup,
        frame_key: None,
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
