//! The forwarder's decisions, without I/O: rows, publishes, outcomes and link changes come in
//! as calls, and what to do next comes out as an [`Action`]. No sockets, no sleeps, no clock of
//! its own (time is passed in), so every invariant of [`super`] is tested here directly.
//!
//! A turn of the driver's loop asks [`Core::next`] until it gets [`Action::Wait`], carrying out
//! each action and reporting its result ([`Core::sent`], [`Core::send_failed`]); while waiting,
//! whatever arrives goes back in ([`Core::outcome`], [`Core::rows_fetched`],
//! [`Core::link_opened`], ...).

use std::collections::VecDeque;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use crate::common::backoff::Backoff;
use crate::store::OutboxRow;

/// Rows read from the buffer at once. Constant, so SQLite keeps one plan for the read.
pub(super) const FETCH_ROWS: usize = 512;
/// Acknowledged rows reported to the store at once while more PubAcks are outstanding.
pub(super) const ACK_BATCH: usize = 256;
/// How often the driver looks again while it cannot send (no link, or a paused window).
pub(super) const RECHECK: Duration = Duration::from_millis(250);
/// The longest wait before a publish that got no PubAck is sent again on a live link: with
/// `ack_timeout`, what a stream's duplicate window must cover at the least.
pub(crate) const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why a publish got no PubAck, as the driver's edge classified it. Decisions read only the
/// kind; `detail` is for logs and dead-letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Try again from this row after a backoff.
    Transient { kind: Transient, detail: String },
    /// Never going to succeed: dead-letter the row (invariant 5).
    Permanent { refusal: Refusal, detail: String },
}

/// Failures that may pass; the kind names the `nats_publish_errors` reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transient {
    TimedOut,
    BrokenPipe,
    MaxAckPending,
    Other,
}

/// Refusals the server will repeat forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Over the server's `max_payload`, or the stream's maximum message size.
    PayloadTooLarge,
    /// No stream captures the subject. Unconfirmed until JetStream's own lookup says so: a
    /// cluster electing a leader answers the same way.
    NoStream,
    /// The server denies this connection publishing to the subject.
    Denied,
    /// The row cannot be decoded by this version.
    Undecodable,
}

impl Failure {
    /// Whether it trips the fence the moment it happens (invariant 4): every failure of the
    /// publish itself does; a permission refusal is the server's answer, not trouble.
    pub(crate) fn trips(&self) -> bool {
        !matches!(
            self,
            Failure::Permanent {
                refusal: Refusal::Denied,
                ..
            }
        )
    }
}

/// What the driver does next.
#[derive(Debug)]
pub(super) enum Action {
    /// Tell the store these rows were acknowledged (if any), then, if `Some`, that the
    /// forwarder may still publish only rows from this seq on (invariant 8).
    Report {
        acked: Vec<RangeInclusive<u64>>,
        holding: Option<Option<u64>>,
    },
    /// Commit what the store was told.
    Flush,
    /// Sleep this long, then start a new turn.
    Sleep(Duration),
    /// Forget the read of the buffer under way.
    CancelFetch,
    /// Drop the link with whatever its client still queued (invariant 6).
    DropLink,
    /// Open a new link after this delay.
    OpenLink(Duration),
    /// Check once whether a JetStream stream captures the gateway's subject.
    CheckStream,
    /// Read up to `limit` rows after seq `after`.
    Fetch { after: u64, limit: usize },
    /// Publish this row, then say how handing it over went ([`Core::sent`] or
    /// [`Core::send_failed`]).
    Publish(OutboxRow),
    /// Move the row to the dead-letters (invariant 5).
    DeadLetter { seq: u64, reason: String },
    /// Wait for what is under way; also wake on a commit if `on_commit`, and after `recheck`.
    Wait {
        on_commit: bool,
        recheck: Option<Duration>,
    },
}

/// The link as the core knows it: opened by its actions, reported by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    Down,
    Opening,
    Up,
}

/// Where [`Core::next`] is within a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Start,
    Stream,
    Fetch,
    Publish,
    Report,
    Wait,
}

/// A publish handed to the client and waiting for its outcome.
#[derive(Debug)]
struct InFlight {
    seq: u64,
    after: u64,
    at: Instant,
}

/// The forwarder's state between turns.
#[derive(Debug)]
pub(super) struct Core {
    window: Window,
    /// Rows read from the buffer and not yet handed to the client, in seq order.
    queue: VecDeque<OutboxRow>,
    /// The newest committed seq when the read under way began, if one is.
    fetching: Option<u64>,
    /// Publishes in flight, oldest first: outcomes come in this order.
    sent: VecDeque<InFlight>,
    /// Highest seq read from the buffer (queued, in flight or done).
    cursor: u64,
    /// Seq of the last row handed to the client (or refused); 0 after resuming.
    last_published: u64,
    /// The publish handed to the driver, until it says how sending it went.
    handing: Option<(u64, u64)>,
    acked: AckedRuns,
    /// The last `holding` told the store (invariant 8).
    reported: Option<Option<u64>>,
    fence: Fence,
    backoff: Backoff,
    link_backoff: Backoff,
    link: LinkState,
    first_link: bool,
    stream_checked: bool,
    /// The newest committed seq, as the driver last saw it.
    newest: u64,
    stage: Stage,
    /// Whether the link was up when the turn began.
    connected: bool,
    pending: VecDeque<Action>,
}

impl Core {
    pub(super) fn new(window: usize, ack_timeout: Duration) -> Self {
        Self {
            window: Window::new(window),
            queue: VecDeque::new(),
            fetching: None,
            sent: VecDeque::new(),
            cursor: 0,
            last_published: 0,
            handing: None,
            acked: AckedRuns::default(),
            reported: None,
            fence: Fence::new(ack_timeout),
            backoff: Backoff::new(Duration::from_millis(100), RETRY_BACKOFF_MAX),
            link_backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(8)),
            link: LinkState::Down,
            first_link: true,
            stream_checked: false,
            newest: 0,
            stage: Stage::Start,
            connected: false,
            pending: VecDeque::new(),
        }
    }

    /// The newest committed seq, read by the driver at the start of each turn (a commit after
    /// that wakes the turn's wait).
    pub(super) fn committed(&mut self, newest: u64) {
        self.newest = newest;
    }

    /// A publish in flight failed before its turn in seq order: stop sending now.
    pub(super) fn in_flight_failed(&mut self) {
        self.fence.tripped = true;
    }

    /// The next action. `connected`: the link is up and its client connected, now.
    pub(super) fn next(&mut self, now: Instant, connected: bool) -> Action {
        loop {
            if let Some(action) = self.pending.pop_front() {
                return action;
            }
            match self.stage {
                Stage::Start => self.start(connected),
                Stage::Stream => {
                    self.stage = Stage::Fetch;
                    if !self.stream_checked && self.link == LinkState::Up {
                        return Action::CheckStream;
                    }
                }
                Stage::Fetch => {
                    self.stage = Stage::Publish;
                    if let Some(fetch) = self.fetch() {
                        return fetch;
                    }
                }
                Stage::Publish => match self.publish(now, connected) {
                    Some(publish) => return publish,
                    None => self.stage = Stage::Report,
                },
                Stage::Report => {
                    self.stage = Stage::Wait;
                    if let Some(report) = self.report() {
                        return report;
                    }
                }
                Stage::Wait => {
                    self.stage = Stage::Start;
                    return self.wait(now);
                }
            }
        }
    }

    /// The start of a turn: trouble, settling and the link (invariants 4, 6 and 8).
    fn start(&mut self, connected: bool) {
        self.connected = connected;
        self.stage = Stage::Stream;
        if !connected {
            self.fence.trip();
        }
        if !self.sent.is_empty() {
            return;
        }
        if let Some(resume) = self.fence.settle() {
            self.resume_at(resume);
            self.window.restart();
            // Told even if it was the last word: a read just dropped may have claimed rows
            // after it. The flush commits the acks' deletion before the buffer is read again.
            self.reported = Some(None);
            self.pending.push_back(Action::Report {
                acked: self.acked.take(),
                holding: Some(None),
            });
            self.pending.push_back(Action::Flush);
            self.pending
                .push_back(Action::Sleep(self.backoff.next_delay()));
            self.stage = Stage::Start;
            return;
        }
        if !connected {
            if self.forget_read_ahead() {
                self.reported = None;
            }
            if self.link == LinkState::Up {
                self.link = LinkState::Down;
                self.pending.push_back(Action::DropLink);
            }
        }
        if self.link == LinkState::Down {
            self.link = LinkState::Opening;
            let delay = if std::mem::take(&mut self.first_link) {
                Duration::ZERO
            } else {
                self.link_backoff.next_delay()
            };
            self.pending.push_back(Action::OpenLink(delay));
        }
    }

    /// Reads ahead while the queue runs low (invariant 1).
    fn fetch(&mut self) -> Option<Action> {
        let low = self.queue.len() < FETCH_ROWS / 2;
        if !(self.connected && low && self.fetching.is_none() && self.cursor < self.newest) {
            return None;
        }
        self.fetching = Some(self.newest);
        Some(Action::Fetch {
            after: self.cursor,
            limit: FETCH_ROWS,
        })
    }

    /// The next row to hand to the client, if the window and the fence allow it.
    fn publish(&mut self, now: Instant, connected: bool) -> Option<Action> {
        if !connected || self.link != LinkState::Up || self.sent.len() >= self.window.open {
            return None;
        }
        if !self.fence.may_send(self.sent.front().map(|s| s.at), now) {
            return None;
        }
        let row = self.queue.pop_front()?;
        let after = std::mem::replace(&mut self.last_published, row.seq);
        self.handing = Some((row.seq, after));
        Some(Action::Publish(row))
    }

    /// The acks to report, and what the forwarder holds: told only with the acks of the rows
    /// below it (or with none waiting), so the store never sees a row released before its ack.
    fn report(&mut self) -> Option<Action> {
        let rows = self.acked.rows;
        let flush = rows >= ACK_BATCH || (rows > 0 && self.sent.is_empty());
        let holding = self.holding();
        let changed = rows == 0 && self.reported != Some(holding);
        if !(flush || changed) {
            return None;
        }
        let told = (self.reported != Some(holding)).then_some(holding);
        if told.is_some() {
            self.reported = told;
        }
        Some(Action::Report {
            acked: self.acked.take(),
            holding: told,
        })
    }

    fn wait(&mut self, now: Instant) -> Action {
        let oldest = self.sent.front().map(|s| s.at);
        let can_send = self.connected
            && self.link == LinkState::Up
            && self.sent.len() < self.window.open
            && self.fence.may_send(oldest, now);
        let idle = self.connected && self.fetching.is_none() && self.queue.len() < FETCH_ROWS / 2;
        let recheck = !self.connected || (!can_send && self.sent.is_empty());
        Action::Wait {
            on_commit: idle,
            recheck: recheck.then_some(RECHECK),
        }
    }

    /// The row from the last [`Action::Publish`] was handed to the client at `at`.
    pub(super) fn sent(&mut self, at: Instant) {
        let (seq, after) = self.handing.take().expect("a publish was handed out");
        self.sent.push_back(InFlight { seq, after, at });
    }

    /// The row from the last [`Action::Publish`] could not be handed to the client.
    pub(super) fn send_failed(&mut self, failure: Failure) -> Option<Action> {
        let (seq, _) = self.handing.take().expect("a publish was handed out");
        match failure {
            Failure::Permanent { detail, .. } => Some(Action::DeadLetter {
                seq,
                reason: detail,
            }),
            Failure::Transient { .. } => {
                self.fence.failed(seq);
                // Nothing more this turn.
                self.stage = Stage::Report;
                None
            }
        }
    }

    /// The outcome of the oldest publish in flight (`seq`): a PubAck, or why none came.
    pub(super) fn outcome(
        &mut self,
        seq: u64,
        result: Result<(), Failure>,
        now: Instant,
    ) -> Option<Action> {
        let flight = self.sent.pop_front();
        debug_assert_eq!(
            flight.as_ref().map(|f| f.seq),
            Some(seq),
            "outcomes in seq order"
        );
        match result {
            Ok(()) => {
                let after = flight.as_ref().map_or(0, |f| f.after);
                self.acked.push(seq, after);
                if let Some(f) = flight {
                    self.fence.acked(now.saturating_duration_since(f.at));
                }
                self.window.acked();
                self.backoff.reset();
                self.link_backoff.reset();
                None
            }
            Err(Failure::Permanent { detail, .. }) => Some(Action::DeadLetter {
                seq,
                reason: detail,
            }),
            Err(Failure::Transient { .. }) => {
                self.fence.failed(seq);
                None
            }
        }
    }

    /// The read under way returned these rows.
    pub(super) fn rows_fetched(&mut self, rows: Vec<OutboxRow>) {
        let newest_then = self.fetching.take().unwrap_or(0);
        // A short read returned every row committed when it began.
        let complete = rows.len() < FETCH_ROWS;
        if let Some(last) = rows.last() {
            self.cursor = last.seq;
        }
        if complete {
            self.cursor = self.cursor.max(newest_then);
        }
        self.queue.extend(rows);
    }

    /// The read under way failed: how long to wait before going on.
    pub(super) fn fetch_failed(&mut self) -> Duration {
        self.fetching = None;
        self.backoff.next_delay()
    }

    pub(super) fn cursor(&self) -> u64 {
        self.cursor
    }

    pub(super) fn link_opened(&mut self) {
        self.link = LinkState::Up;
        self.window.restart();
    }

    pub(super) fn link_failed(&mut self) {
        self.link = LinkState::Down;
    }

    /// The stream check's answer: true once it need not be asked again.
    pub(super) fn stream_checked(&mut self, done: bool) {
        self.stream_checked = self.connected && done;
    }

    /// On shutdown: the acknowledged runs not yet reported.
    pub(super) fn take_acked(&mut self) -> Vec<RangeInclusive<u64>> {
        self.acked.take()
    }

    /// Invariant 4: with nothing in flight, forget every row read ahead and resume at `seq`,
    /// the first row without a PubAck.
    fn resume_at(&mut self, seq: u64) {
        debug_assert!(self.sent.is_empty());
        self.sent.clear();
        self.queue.clear();
        if self.fetching.take().is_some() {
            self.pending.push_back(Action::CancelFetch);
        }
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

    /// The lowest seq read from the buffer that may still be published (invariant 8): failed
    /// and awaiting its resend, in flight, queued, or in a read under way.
    fn holding(&self) -> Option<u64> {
        [
            self.fence.resume_at,
            self.sent.front().map(|s| s.seq),
            self.queue.front().map(|r| r.seq),
            self.fetching.map(|_| self.cursor + 1),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// Acknowledged rows as runs of seqs for `StoreHandle::acked` (invariant 7).
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

/// How many publishes may be in flight (invariants 1 and 6): one on a new link and after a
/// resume, one more with each PubAck, up to `nats.max_in_flight`. A stream that has no leader
/// yet drops publishes without a reply, and a leader elected while a full window was in flight
/// would store its tail ahead of its lost head; one publish at a time cannot be overtaken.
#[derive(Debug)]
struct Window {
    max: usize,
    open: usize,
}

impl Window {
    fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            open: 1,
        }
    }

    /// A new link, or a resume after a publish got no PubAck: probe with one again.
    fn restart(&mut self) {
        self.open = 1;
    }

    /// Doubles the window each round trip, as every PubAck lets one more out.
    fn acked(&mut self) {
        self.open = (self.open + 1).min(self.max);
    }
}

/// When new publishes may go out (invariants 4 and 6): not while settling after trouble, and
/// not while the oldest in-flight publish has waited well past the usual PubAck time.
#[derive(Debug)]
struct Fence {
    /// Set when an in-flight publish fails, before its turn in `seq` order.
    tripped: bool,
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
            tripped: false,
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

    /// Whether a new publish may go out at `now`, given when the oldest in-flight one was sent.
    fn may_send(&mut self, oldest: Option<Instant>, now: Instant) -> bool {
        if self.tripped {
            self.settling = true;
        }
        !self.settling
            && oldest.is_none_or(|t| now.saturating_duration_since(t) <= self.stall_after())
    }

    /// With nothing in flight, ends settling; returns the row to resume at, if one failed.
    fn settle(&mut self) -> Option<u64> {
        self.settling = false;
        self.tripped = false;
        self.resume_at.take()
    }
}

#[cfg(test)]
mod tests;
