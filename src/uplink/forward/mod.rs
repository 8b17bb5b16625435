//! The forwarder: buffered rows → JetStream, in `seq` order, deleted only after their PubAck.
//!
//! Two halves: `core` decides (a state machine without I/O: events in, actions out) and
//! `driver` carries out its actions with the store and NATS, through the [`Publisher`]
//! trait, mapping every NATS error to a [`Failure`] kind at that edge. `inflight` holds the
//! publishes awaiting their PubAcks, which come in on one subscription per link.
//!
//! # Invariants
//! 1. Rows are published in `seq` order with up to `nats.max_in_flight` PubAcks outstanding;
//!    results are consumed in the same order (`inflight`). Rows are read from the buffer
//!    `FETCH_ROWS` at a time, the next read under way while the last ones are published.
//!    A new link, and every resume after a publish without PubAck, starts with one publish in
//!    flight; each PubAck lets one more out, up to the maximum (a slow start).
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
//!    rows it returns, and the forwarder tells the store ([`crate::store::StoreHandle::holding`]) the lowest
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
//! Why the slow start in 1: a stream without a leader (a cluster that is still coming back, or
//! electing after the trouble that made the forwarder resume) drops publishes without a reply.
//! A full window sent into it loses its head and, once a leader is up mid-window, stores its
//! tail first. The first publish on a link, or after a resume, is alone until it has its PubAck:
//! the stream then has a leader that stores in order.

mod core;
pub(crate) use self::core::RETRY_BACKOFF_MAX;
mod driver;
mod inflight;

pub(crate) use self::driver::Forwarder;
