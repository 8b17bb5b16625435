//! A steady-rate MQTT publisher for long fault-injection runs: QoS 1 over its own minimal
//! MQTT 3.1.1 client, so every PUBACK is attributed to exactly the reading it acknowledges
//! (packet id → reading number), which a general client's retries and id reuse would blur.
//!
//! Like a field device it survives the broker going away: it reconnects and re-sends every
//! reading that was sent but not acknowledged. The [`Ledger`] it returns says which readings
//! the broker acknowledged: those the gateway must deliver.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Publishes sent and not yet acknowledged, at most.
const MAX_IN_FLIGHT: usize = 1000;

/// Makes reading `n`: (topic, payload).
pub type MakeReading = fn(usize) -> (String, Vec<u8>);

/// What the publisher did.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// Readings `first..first + sent` were sent at least once.
    pub first: usize,
    pub sent: usize,
    /// `acked[i]`: reading `first + i` was acknowledged by the broker.
    pub acked: Vec<bool>,
    /// Publishes sent again after a reconnect.
    pub resent: usize,
    pub reconnects: usize,
}

impl Ledger {
    pub fn acked_count(&self) -> usize {
        self.acked.iter().filter(|a| **a).count()
    }

    /// Numbers of the readings the broker acknowledged.
    pub fn acked_readings(&self) -> impl Iterator<Item = usize> + '_ {
        self.acked
            .iter()
            .enumerate()
            .filter(|(_, a)| **a)
            .map(|(i, _)| self.first + i)
    }
}

#[derive(Default)]
struct Shared {
    /// Packet id → reading number, for publishes awaiting their PUBACK on this connection.
    in_flight: HashMap<u16, usize>,
    acked: Vec<bool>,
    broken: bool,
    /// Connection number: acks and errors of an older connection are ignored.
    generation: u64,
}

struct State {
    shared: Mutex<Shared>,
    changed: Condvar,
    paused: AtomicBool,
    stopping: AtomicBool,
    acked: AtomicUsize,
    sent: AtomicUsize,
    /// After `stopping`: how long to keep trying for the last acknowledgements.
    drain_ms: AtomicU64,
}

/// A running publisher; [`Steady::finish`] stops it and returns its ledger.
pub struct Steady {
    state: Arc<State>,
    thread: Option<JoinHandle<Ledger>>,
}

impl Steady {
    /// Publishes readings `first, first + 1, ...` at `rate` per second to the broker on `port`.
    pub fn start(port: u16, client_id: &str, rate: f64, first: usize, make: MakeReading) -> Self {
        let state = Arc::new(State {
            shared: Mutex::new(Shared::default()),
            changed: Condvar::new(),
            paused: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            acked: AtomicUsize::new(0),
            sent: AtomicUsize::new(0),
            drain_ms: AtomicU64::new(0),
        });
        let run = Run {
            port,
            client_id: client_id.to_string(),
            rate,
            first,
            make,
            state: state.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("steady-{client_id}"))
            .spawn(move || run.run())
            .expect("spawn publisher");
        Self {
            state,
            thread: Some(thread),
        }
    }

    /// Readings acknowledged so far.
    pub fn acked(&self) -> usize {
        self.state.acked.load(Ordering::Relaxed)
    }

    /// Distinct readings sent so far.
    pub fn sent(&self) -> usize {
        self.state.sent.load(Ordering::Relaxed)
    }

    /// Stops (or resumes) sending new readings; re-sends and acks go on.
    pub fn pause(&self, paused: bool) {
        self.state.paused.store(paused, Ordering::Relaxed);
    }

    /// Stops sending new readings, waits up to `within` for the broker to acknowledge (or a
    /// reconnect to re-send) the rest, and returns the ledger.
    pub fn finish(mut self, within: Duration) -> Ledger {
        self.state
            .drain_ms
            .store(within.as_millis() as u64, Ordering::Relaxed);
        self.state.stopping.store(true, Ordering::Relaxed);
        self.state.changed.notify_all();
        let thread = self.thread.take().expect("publisher running");
        thread.join().expect("publisher thread")
    }
}

impl Drop for Steady {
    fn drop(&mut self) {
        self.state.stopping.store(true, Ordering::Relaxed);
    }
}

struct Run {
    port: u16,
    client_id: String,
    rate: f64,
    first: usize,
    make: MakeReading,
    state: Arc<State>,
}

impl Run {
    fn run(self) -> Ledger {
        let mut ledger = Ledger {
            first: self.first,
            ..Ledger::default()
        };
        let mut resend: VecDeque<usize> = VecDeque::new();
        let mut next_pkid: u16 = 0;
        let mut conn: Option<TcpStream> = None;
        let started = Instant::now();
        let mut paced = 0usize;
        let mut stop_at: Option<Instant> = None;
        loop {
            let stopping = self.state.stopping.load(Ordering::Relaxed);
            if stopping && stop_at.is_none() {
                let drain = self.state.drain_ms.load(Ordering::Relaxed);
                stop_at = Some(Instant::now() + Duration::from_millis(drain));
            }
            if stop_at.is_some_and(|t| Instant::now() > t) {
                break;
            }
            // A broken connection: everything in flight goes out again on the next one.
            let broken = {
                let mut s = self.lock();
                if s.broken {
                    let mut lost: Vec<usize> = s.in_flight.drain().map(|(_, n)| n).collect();
                    lost.sort_unstable();
                    resend.extend(lost);
                    s.broken = false;
                    true
                } else {
                    false
                }
            };
            if broken {
                if let Some(c) = conn.take() {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                }
            }
            let Some(stream) = conn.as_mut() else {
                match self.connect() {
                    Ok(c) => {
                        if ledger.sent > 0 {
                            ledger.reconnects += 1;
                        }
                        conn = Some(c);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
                continue;
            };
            let (in_flight, unacked_total) = {
                let s = self.lock();
                (s.in_flight.len(), s.in_flight.len() + resend.len())
            };
            if stopping && unacked_total == 0 {
                break;
            }
            if in_flight >= MAX_IN_FLIGHT {
                self.wait_for_change();
                continue;
            }
            let n = if let Some(n) = resend.pop_front() {
                ledger.resent += 1;
                n
            } else if stopping || self.state.paused.load(Ordering::Relaxed) {
                self.wait_for_change();
                // Pacing restarts after a pause instead of bursting to catch up.
                paced = ((started.elapsed().as_secs_f64()) * self.rate) as usize;
                continue;
            } else {
                let due = started + Duration::from_secs_f64(paced as f64 / self.rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait.min(Duration::from_millis(50)));
                    continue;
                }
                paced += 1;
                let n = self.first + ledger.sent;
                ledger.sent += 1;
                self.lock().acked.push(false);
                self.state.sent.store(ledger.sent, Ordering::Relaxed);
                n
            };
            let pkid = {
                let mut s = self.lock();
                loop {
                    next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                    if !s.in_flight.contains_key(&next_pkid) {
                        break;
                    }
                }
                s.in_flight.insert(next_pkid, n);
                next_pkid
            };
            let (topic, payload) = (self.make)(n);
            if stream
                .write_all(&publish_packet(&topic, pkid, &payload))
                .is_err()
            {
                self.lock().broken = true;
            }
        }
        if let Some(mut c) = conn {
            let _ = c.write_all(&[0xE0, 0x00]);
        }
        ledger.acked = std::mem::take(&mut self.lock().acked);
        ledger
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.state.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_for_change(&self) {
        let s = self.lock();
        let _ = self
            .state
            .changed
            .wait_timeout(s, Duration::from_millis(50));
    }

    /// CONNECT with a clean session, CONNACK, then a reader thread for the PUBACKs.
    fn connect(&self) -> std::io::Result<TcpStream> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(&connect_packet(&self.client_id))?;
        let (kind, body) = read_packet(&mut stream)?;
        if kind != 0x20 || body.get(1) != Some(&0) {
            return Err(std::io::Error::other(format!(
                "CONNACK refused: {kind:#x} {body:?}"
            )));
        }
        stream.set_read_timeout(None)?;
        let mut reader = stream.try_clone()?;
        let state = self.state.clone();
        let first = self.first;
        let generation = {
            let mut s = self.lock();
            s.generation += 1;
            s.generation
        };
        std::thread::spawn(move || loop {
            let packet = read_packet(&mut reader);
            let mut s = state.shared.lock().unwrap_or_else(|e| e.into_inner());
            if s.generation != generation {
                return;
            }
            match packet {
                Ok((0x40, body)) if body.len() >= 2 => {
                    let pkid = u16::from_be_bytes([body[0], body[1]]);
                    if let Some(n) = s.in_flight.remove(&pkid) {
                        if let Some(acked) = s.acked.get_mut(n - first) {
                            if !*acked {
                                *acked = true;
                                state.acked.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    drop(s);
                    state.changed.notify_all();
                }
                Ok(_) => {}
                Err(_) => {
                    s.broken = true;
                    drop(s);
                    state.changed.notify_all();
                    return;
                }
            }
        });
        Ok(stream)
    }
}

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return;
        }
    }
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    // Level 4 (3.1.1), clean session, no keep-alive timeout.
    body.extend_from_slice(&[4, 0x02, 0, 0]);
    string(client_id.as_bytes(), &mut body);
    let mut p = vec![0x10];
    remaining_length(body.len(), &mut p);
    p.extend_from_slice(&body);
    p
}

fn publish_packet(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(topic.len() + payload.len() + 4);
    string(topic.as_bytes(), &mut body);
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(payload);
    // PUBLISH at QoS 1.
    let mut p = vec![0x32];
    remaining_length(body.len(), &mut p);
    p.extend_from_slice(&body);
    p
}

/// One packet: (type and flags byte, body).
fn read_packet(r: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut first = [0u8; 1];
    r.read_exact(&mut first)?;
    let mut len = 0usize;
    for shift in 0..4 {
        let mut b = [0u8; 1];
        r.read_exact(&mut b)?;
        len |= usize::from(b[0] & 0x7f) << (7 * shift);
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok((first[0], body))
}
