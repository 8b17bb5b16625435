//! The forwarder's invariants (see [`crate::uplink::forward`]) checked on the core alone: a simulated
//! buffer, link and clock carry out its actions, and every action is checked as it comes out.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use proptest::prelude::*;

use super::*;

const WINDOW: usize = 4;

fn row(seq: u64) -> OutboxRow {
    let mut event_id = [0; 16];
    event_id[..8].copy_from_slice(&seq.to_be_bytes());
    OutboxRow {
        seq,
        event_id,
        stored_ms: 0,
        kind: 0,
        body: Vec::new(),
        trace: None,
    }
}

fn transient() -> Failure {
    Failure::Transient {
        kind: Transient::TimedOut,
        detail: String::new(),
    }
}

fn refused() -> Failure {
    Failure::Permanent {
        refusal: Refusal::Denied,
        detail: "denied".into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SimLink {
    Down,
    Opening,
    Up,
}

/// What the driver would do, with a buffer in memory and JetStream as outcomes the test picks.
struct Sim {
    core: Core,
    now: Instant,
    buffer: BTreeMap<u64, OutboxRow>,
    newest: u64,
    link: SimLink,
    connected: bool,
    fetch: Option<Vec<OutboxRow>>,
    inflight: VecDeque<u64>,
    /// In-flight seqs that will fail when their turn comes (a failure out of turn).
    doomed: BTreeSet<u64>,
    pubacked: BTreeSet<u64>,
    /// Every publish: seq and event id.
    published: Vec<(u64, [u8; 16])>,
    /// Sleeps, link drops and opens, in order.
    log: Vec<String>,
    dead: Vec<u64>,
    /// The store's claim as `StoreHandle::fetch` and `holding` set it.
    claim: Option<(u64, u64)>,
    /// Trouble seen while publishes were in flight: nothing new may go out until they settle.
    fenced: bool,
    /// A PubAck came on this link since it opened and since the last publish that got none
    /// (a transient failure): the stream has a leader, so more than one may be in flight.
    answered: bool,
}

impl Sim {
    fn new(rows: u64) -> Self {
        let mut sim = Self {
            core: Core::new(WINDOW, Duration::from_secs(5)),
            now: Instant::now(),
            buffer: BTreeMap::new(),
            newest: 0,
            link: SimLink::Down,
            connected: false,
            fetch: None,
            inflight: VecDeque::new(),
            doomed: BTreeSet::new(),
            pubacked: BTreeSet::new(),
            published: Vec::new(),
            log: Vec::new(),
            dead: Vec::new(),
            claim: None,
            fenced: false,
            answered: false,
        };
        sim.commit(rows);
        sim
    }

    fn commit(&mut self, rows: u64) {
        for seq in self.newest + 1..=self.newest + rows {
            self.buffer.insert(seq, row(seq));
        }
        self.newest += rows;
    }

    fn claimed(&self, seq: u64) -> bool {
        self.claim.is_some_and(|(lo, hi)| (lo..=hi).contains(&seq))
    }

    /// One turn of the driver's loop: actions carried out up to the wait (or a sleep).
    fn turn(&mut self) {
        self.core.committed(self.newest);
        loop {
            let connected = self.link == SimLink::Up && self.connected;
            match self.core.next(self.now, connected) {
                Action::Report { acked, holding } => self.report(acked, holding),
                Action::Flush | Action::CheckStream => {}
                Action::Sleep(delay) => {
                    self.now += delay;
                    self.log.push(format!("sleep {delay:?}"));
                    return;
                }
                Action::CancelFetch => self.fetch = None,
                Action::DropLink => {
                    self.link = SimLink::Down;
                    self.log.push("drop".into());
                }
                Action::OpenLink(delay) => {
                    self.link = SimLink::Opening;
                    self.log.push(format!("open after {delay:?}"));
                }
                Action::Fetch { after, limit } => {
                    let rows: Vec<_> = self
                        .buffer
                        .range(after + 1..)
                        .take(limit)
                        .map(|(_, r)| r.clone())
                        .collect();
                    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
                        self.claim = Some(match self.claim {
                            Some((lo, hi)) => (lo.min(first.seq), hi.max(last.seq)),
                            None => (first.seq, last.seq),
                        });
                    }
                    self.fetch = Some(rows);
                }
                Action::Publish(row) => self.publish(row),
                Action::DeadLetter { .. } => panic!("dead-letters come only from outcomes"),
                Action::Wait { .. } => break,
            }
        }
        for seq in &self.inflight {
            assert!(
                self.claimed(*seq),
                "in-flight row {seq} not claimed: {:?}",
                self.claim
            );
        }
    }

    fn report(&mut self, acked: Vec<RangeInclusive<u64>>, holding: Option<Option<u64>>) {
        for run in acked {
            let buffered: Vec<u64> = self.buffer.range(run.clone()).map(|(s, _)| *s).collect();
            for seq in buffered {
                assert!(
                    self.pubacked.contains(&seq),
                    "run {run:?} spans row {seq} without PubAck"
                );
                self.buffer.remove(&seq);
            }
        }
        if let Some(from) = holding {
            self.claim = from.and_then(|from| {
                self.claim
                    .and_then(|(_, hi)| (from <= hi).then_some((from, hi)))
            });
        }
    }

    fn publish(&mut self, row: OutboxRow) {
        let seq = row.seq;
        assert!(
            self.link == SimLink::Up && self.connected,
            "published {seq} without a link"
        );
        assert!(
            !self.fenced,
            "published {seq} before the trouble in flight settled"
        );
        assert!(self.inflight.len() < WINDOW, "window exceeded by {seq}");
        assert!(
            self.answered || self.inflight.is_empty(),
            "published {seq} beside {:?} before the link answered",
            self.inflight
        );
        let skipped: Vec<u64> = self
            .buffer
            .range(..seq)
            .map(|(s, _)| *s)
            .filter(|s| !self.pubacked.contains(s) && !self.inflight.contains(s))
            .collect();
        assert!(
            skipped.is_empty(),
            "published {seq} ahead of rows {skipped:?}"
        );
        assert!(
            self.claimed(seq),
            "published {seq} unclaimed: {:?}",
            self.claim
        );
        self.published.push((seq, row.event_id));
        self.inflight.push_back(seq);
        self.core.sent(self.now);
    }

    /// The oldest publish in flight gets its outcome: a PubAck unless `failure` (or doomed).
    fn outcome(&mut self, failure: Option<Failure>) -> Option<Action> {
        let seq = self.inflight.pop_front()?;
        let failure = match self.doomed.remove(&seq) {
            true => Some(failure.unwrap_or_else(transient)),
            false => failure,
        };
        let result = match failure {
            None => {
                self.pubacked.insert(seq);
                self.answered = true;
                Ok(())
            }
            Some(f) => {
                if matches!(f, Failure::Transient { .. }) {
                    self.answered = false;
                }
                if f.trips() && !self.inflight.is_empty() {
                    self.fenced = true;
                }
                Err(f)
            }
        };
        let action = self
            .core
            .outcome(seq, result, self.now + Duration::from_millis(5));
        if let Some(Action::DeadLetter { seq: dead, .. }) = &action {
            assert_eq!(*dead, seq);
            self.buffer.remove(&seq);
            self.dead.push(seq);
        }
        if self.inflight.is_empty() {
            self.fenced = false;
        }
        self.turn();
        action
    }

    fn ack_all(&mut self) {
        while !self.inflight.is_empty() {
            self.outcome(None);
        }
    }

    /// A later publish fails out of turn: the driver trips the core at once.
    fn fail_out_of_turn(&mut self) {
        if let Some(&last) = self.inflight.back() {
            self.doomed.insert(last);
            self.fenced = true;
            self.core.in_flight_failed();
            self.turn();
        }
    }

    fn lose_link(&mut self) {
        self.connected = false;
        self.fenced |= !self.inflight.is_empty();
        self.turn();
    }

    fn link_opens(&mut self, ok: bool) {
        if self.link != SimLink::Opening {
            return;
        }
        if ok {
            self.link = SimLink::Up;
            self.connected = true;
            self.answered = false;
            self.core.link_opened();
        } else {
            self.link = SimLink::Down;
            self.core.link_failed();
        }
        self.turn();
    }

    fn rows_arrive(&mut self) {
        if let Some(rows) = self.fetch.take() {
            self.core.rows_fetched(rows);
            self.turn();
        }
    }

    fn tick(&mut self, by: Duration) {
        self.now += by;
        self.turn();
    }

    /// Link up and the first rows in flight.
    fn started(rows: u64) -> Self {
        let mut sim = Self::new(rows);
        sim.turn();
        sim.link_opens(true);
        sim.rows_arrive();
        sim
    }

    /// Started, and the window opened to `WINDOW` by the PubAcks of rows 1 to 3: 4 to 7 in
    /// flight.
    fn warmed(rows: u64) -> Self {
        let mut sim = Self::started(rows);
        for _ in 0..3 {
            sim.outcome(None);
        }
        assert_eq!(sim.seqs(), (1..=7).collect::<Vec<_>>());
        assert_eq!(sim.inflight, [4, 5, 6, 7]);
        sim
    }

    fn seqs(&self) -> Vec<u64> {
        self.published.iter().map(|(s, _)| *s).collect()
    }
}

#[test]
fn publishes_go_out_in_seq_order_within_the_window() {
    let mut sim = Sim::started(10);
    assert_eq!(sim.seqs(), vec![1], "one alone on a new link");
    sim.outcome(None);
    assert_eq!(sim.seqs(), vec![1, 2, 3], "each PubAck lets one more out");
    sim.outcome(None);
    assert_eq!(sim.seqs(), (1..=5).collect::<Vec<_>>());
    sim.outcome(None);
    assert_eq!(sim.seqs(), (1..=7).collect::<Vec<_>>(), "up to the window");
    sim.outcome(None);
    assert_eq!(sim.inflight, [5, 6, 7, 8], "never past it");
    sim.ack_all();
    sim.tick(Duration::from_millis(10));
    sim.ack_all();
    sim.tick(Duration::from_millis(10));
    sim.ack_all();
    assert_eq!(sim.seqs(), (1..=10).collect::<Vec<_>>());
    assert!(
        sim.buffer.is_empty(),
        "every acknowledged row left the buffer"
    );
}

#[test]
fn only_rows_with_their_own_puback_are_reported_acked() {
    let mut sim = Sim::warmed(7);
    sim.outcome(Some(transient()));
    // 5 to 7 are acknowledged while settling; 4 is not, so no run spans it.
    sim.outcome(None);
    sim.outcome(None);
    sim.outcome(None);
    assert_eq!(sim.buffer.keys().copied().collect::<Vec<_>>(), vec![4]);
}

#[test]
fn after_a_failure_nothing_new_goes_out_until_in_flight_settled() {
    let mut sim = Sim::warmed(13);
    sim.fail_out_of_turn();
    // 4 to 6 get PubAcks: still nothing new while 7 is outstanding.
    for _ in 0..3 {
        sim.outcome(None);
        assert_eq!(sim.seqs(), (1..=7).collect::<Vec<_>>());
    }
    sim.outcome(None); // 7 fails, as doomed
    assert!(
        sim.log.last().unwrap().starts_with("sleep"),
        "backoff before resuming: {:?}",
        sim.log
    );
    sim.turn();
    sim.rows_arrive();
    assert_eq!(
        sim.seqs()[7..],
        [7],
        "resumed at the row without PubAck, alone until it has one"
    );
    sim.outcome(None);
    assert_eq!(sim.seqs()[7..], [7, 8, 9]);
}

#[test]
fn a_resend_carries_the_same_event_id() {
    let mut sim = Sim::started(2);
    sim.outcome(Some(transient()));
    sim.outcome(None);
    sim.turn();
    sim.rows_arrive();
    let first: Vec<_> = sim.published.iter().filter(|(s, _)| *s == 1).collect();
    assert_eq!(first.len(), 2, "row 1 sent twice: {:?}", sim.seqs());
    assert_eq!(first[0].1, first[1].1);
}

#[test]
fn a_permanent_refusal_is_dead_lettered_and_the_queue_goes_on() {
    let mut sim = Sim::started(6);
    let action = sim.outcome(Some(refused()));
    assert!(
        matches!(action, Some(Action::DeadLetter { seq: 1, .. })),
        "{action:?}"
    );
    assert_eq!(sim.seqs(), vec![1, 2], "no settling: the next row went out");
    sim.ack_all();
    assert_eq!(sim.dead, vec![1]);
    assert!(sim.buffer.is_empty());
}

#[test]
fn a_row_that_cannot_be_sent_for_good_is_dead_lettered_at_once() {
    let mut core = Core::new(1, Duration::from_secs(5));
    core.link_opened();
    core.committed(2);
    core.rows_fetched(vec![row(1), row(2)]);
    let now = Instant::now();
    let mut next = || loop {
        match core.next(now, true) {
            Action::Publish(row) => return row.seq,
            Action::Wait { .. } => panic!("nothing published"),
            _ => {}
        }
    };
    assert_eq!(next(), 1);
    let undecodable = Failure::Permanent {
        refusal: Refusal::Undecodable,
        detail: "bad row".into(),
    };
    let action = core.send_failed(undecodable);
    assert!(matches!(action, Some(Action::DeadLetter { seq: 1, reason }) if reason == "bad row"));
}

#[test]
fn a_lost_link_is_dropped_once_settled_and_reopened_after_a_backoff() {
    let mut sim = Sim::warmed(9);
    assert_eq!(sim.log, vec!["open after 0ns"]);
    sim.lose_link();
    assert_eq!(
        sim.log,
        vec!["open after 0ns"],
        "kept while publishes settle"
    );
    sim.outcome(None);
    sim.outcome(None);
    sim.outcome(Some(transient()));
    sim.outcome(Some(transient()));
    assert_eq!(
        sim.log[1..],
        ["sleep 100ms".to_string()],
        "settled: back off, resume at 6"
    );
    sim.turn();
    assert_eq!(
        sim.log[2..],
        ["drop".to_string(), "open after 250ms".to_string()]
    );
    sim.link_opens(false);
    sim.turn();
    assert_eq!(
        sim.log[4..],
        ["open after 500ms".to_string()],
        "longer each failure"
    );
    sim.link_opens(true);
    sim.rows_arrive();
    assert_eq!(sim.seqs()[7..], [6], "one alone on the new link");
    sim.outcome(None);
    assert_eq!(sim.seqs()[7..], [6, 7, 8]);
}

#[test]
fn without_a_link_the_rows_read_ahead_are_released() {
    let mut sim = Sim::started(10);
    sim.outcome(None);
    sim.outcome(None);
    assert_eq!(sim.seqs(), vec![1, 2, 3, 4, 5]);
    // 1 and 2 are acknowledged but not yet reported: the claim may not pass them yet.
    assert_eq!(sim.claim.map(|(lo, _)| lo), Some(1));
    sim.lose_link();
    sim.ack_all();
    assert_eq!(sim.claim, None, "nothing held while there is no link");
    assert_eq!(
        sim.buffer.keys().copied().collect::<Vec<_>>(),
        (6..=10).collect::<Vec<_>>()
    );
}

#[test]
fn trouble_stops_sending_until_everything_in_flight_settled() {
    let mut fence = Fence::new(Duration::from_secs(5));
    let now = Instant::now();
    assert!(fence.may_send(None, now));
    // A later publish failing first (it completes out of turn) trips the fence at once.
    fence.tripped = true;
    assert!(!fence.may_send(None, now));
    fence.failed(7);
    fence.failed(5);
    assert!(!fence.may_send(None, now));
    assert_eq!(
        fence.settle(),
        Some(5),
        "resume at the first row without PubAck"
    );
    assert!(fence.may_send(None, now));
    // A lost link settles what was sent on it; nothing to resend if all was acked.
    fence.trip();
    assert!(!fence.may_send(None, now));
    assert_eq!(fence.settle(), None);
    assert!(fence.may_send(None, now));
}

#[test]
fn a_late_oldest_publish_pauses_sending() {
    let mut fence = Fence::new(Duration::from_secs(5));
    for _ in 0..32 {
        fence.acked(Duration::from_millis(10));
    }
    assert_eq!(fence.stall_after(), Duration::from_millis(250));
    let now = Instant::now();
    assert!(fence.may_send(Some(now), now));
    let long_ago = now - Duration::from_secs(1);
    assert!(!fence.may_send(Some(long_ago), now));
    // Slow links: the pause follows the PubAck time they really have, up to the timeout.
    for _ in 0..64 {
        fence.acked(Duration::from_millis(800));
    }
    assert!(fence.may_send(Some(long_ago), now));
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

/// What happens next in a random run.
#[derive(Debug, Clone)]
enum Step {
    Ack,
    Fail,
    Refuse,
    FailOutOfTurn,
    LoseLink,
    Open(bool),
    RowsArrive,
    Commit(u64),
    Tick(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => Just(Step::Ack),
        1 => Just(Step::Fail),
        1 => Just(Step::Refuse),
        1 => Just(Step::FailOutOfTurn),
        1 => Just(Step::LoseLink),
        2 => any::<bool>().prop_map(Step::Open),
        3 => Just(Step::RowsArrive),
        2 => (1..40u64).prop_map(Step::Commit),
        2 => (1..600u64).prop_map(Step::Tick),
    ]
}

proptest! {
    /// Every check in `Sim` (order, no row skipped, window, fence, runs, claim) holds whatever
    /// happens, and once everything goes well every row is delivered or dead-lettered.
    #[test]
    fn invariants_hold_whatever_happens(rows in 0..30u64, steps in proptest::collection::vec(step(), 0..80)) {
        let mut sim = Sim::new(rows);
        sim.turn();
        for step in steps {
            match step {
                Step::Ack => { sim.outcome(None); }
                Step::Fail => { sim.outcome(Some(transient())); }
                Step::Refuse => { sim.outcome(Some(refused())); }
                Step::FailOutOfTurn => sim.fail_out_of_turn(),
                Step::LoseLink => sim.lose_link(),
                Step::Open(ok) => sim.link_opens(ok),
                Step::RowsArrive => sim.rows_arrive(),
                Step::Commit(n) => { sim.commit(n); sim.turn(); }
                Step::Tick(ms) => sim.tick(Duration::from_millis(ms)),
            }
        }
        // Then all goes well: everything left is delivered.
        for _ in 0..10_000 {
            if sim.buffer.is_empty() {
                break;
            }
            sim.link_opens(true);
            sim.rows_arrive();
            sim.ack_all();
            sim.tick(Duration::from_millis(300));
        }
        prop_assert!(sim.buffer.is_empty(), "left in the buffer: {:?}", sim.buffer.keys().collect::<Vec<_>>());
    }
}
