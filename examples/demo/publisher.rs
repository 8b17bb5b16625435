//! The MQTT devices: they make readings at a steady rate and publish them at QoS 1 to the
//! gateway's listener over one connection, as devices with their own store-and-forward do.
//! A message is kept until its PUBACK; after any disconnect the devices connect afresh and
//! publish again, in order, every message not yet PUBACKed. PUBACKs are matched to messages by
//! packet id here, not left to rumqttc, which loses in-flight messages when it resumes a
//! session. Only PUBACKed messages are the gateway's responsibility.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::Notify;

use crate::farm::{Device, Message, Published, FARM};

/// Counters the publisher updates and the progress line reads.
#[derive(Default)]
pub struct Progress {
    pub readings: AtomicU64,
    pub messages: AtomicU64,
    pub acked_messages: AtomicU64,
    pub acked_readings: AtomicU64,
    pub reconnects: AtomicU64,
    pub resent: AtomicU64,
}

/// What the devices did, once every message is PUBACKed (or the wait for it gave up).
pub struct Outcome {
    pub readings: Vec<Published>,
    pub messages: u64,
    pub acked_messages: u64,
    pub acked_readings: u64,
    pub reconnects: u64,
    pub resent: u64,
}

/// Messages made and not yet PUBACKed, by the order they were made in.
#[derive(Default)]
struct Unacked {
    messages: BTreeMap<u64, Message>,
    /// Set once the devices have stopped making messages.
    finished: bool,
}

type Shared = Arc<(Mutex<Unacked>, Notify)>;

/// The devices make `rate` readings/s for `publish_for`, then wait (at most `ack_within`) until
/// every message is PUBACKed.
pub async fn run_devices(
    port: u16,
    rate: f64,
    publish_for: Duration,
    ack_within: Duration,
    start: Instant,
    progress: Arc<Progress>,
) -> Outcome {
    let shared: Shared = Arc::default();
    let connection = tokio::spawn(publish_until_acked(port, shared.clone(), progress.clone()));
    let readings = make_readings(rate, publish_for, start, &shared, &progress).await;
    if tokio::time::timeout(ack_within, connection).await.is_err() {
        eprintln!(
            "MQTT devices: not every message PUBACKed within {} s",
            ack_within.as_secs()
        );
    }
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    Outcome {
        readings,
        messages: load(&progress.messages),
        acked_messages: load(&progress.acked_messages),
        acked_readings: load(&progress.acked_readings),
        reconnects: load(&progress.reconnects),
        resent: load(&progress.resent),
    }
}

/// The devices in turn, at `rate` readings/s: each message goes to the unacknowledged ones,
/// each reading to the list returned.
async fn make_readings(
    rate: f64,
    publish_for: Duration,
    start: Instant,
    shared: &Shared,
    progress: &Progress,
) -> Vec<Published> {
    let mut devices: Vec<Device> = FARM
        .iter()
        .enumerate()
        .map(|(n, spec)| Device::new(spec, n))
        .collect();
    let mut readings = Vec::new();
    let mut made = 0u64;
    let mut turn = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while start.elapsed() < publish_for {
        tick.tick().await;
        // Catch up with the schedule rather than count ticks, so late ticks don't lower the rate.
        let due = (start.elapsed().as_secs_f64() * rate) as usize;
        let mut batch = Vec::new();
        while readings.len() < due {
            let device = &mut devices[turn % FARM.len()];
            turn += 1;
            for m in device.publish(start.elapsed()) {
                readings.extend(m.readings.iter().cloned());
                batch.push(m);
            }
        }
        let (lock, notify) = &**shared;
        let mut unacked = lock.lock().expect("no panic holds the lock");
        for m in batch {
            progress.messages.fetch_add(1, Ordering::Relaxed);
            unacked.messages.insert(made, m);
            made += 1;
        }
        drop(unacked);
        notify.notify_one();
        progress
            .readings
            .store(readings.len() as u64, Ordering::Relaxed);
    }
    let (lock, notify) = &**shared;
    lock.lock().expect("no panic holds the lock").finished = true;
    notify.notify_one();
    readings
}

/// Connections, one after another, until the devices have finished and every message is
/// PUBACKed.
async fn publish_until_acked(port: u16, shared: Shared, progress: Arc<Progress>) {
    // Messages up to this one went out on an earlier connection: sending them again is a resend.
    let mut sent_before: Option<u64> = None;
    loop {
        let (all_acked, last_sent) = one_connection(port, &shared, &progress, sent_before).await;
        if all_acked {
            return;
        }
        sent_before = sent_before.max(last_sent);
        progress.reconnects.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One connection from a fresh client: sends every unacknowledged message in order, then new
/// ones as they are made, and removes each as its PUBACK comes. Returns whether it ended with
/// everything PUBACKed (and the devices finished), and the last message that went out.
async fn one_connection(
    port: u16,
    shared: &Shared,
    progress: &Progress,
    sent_before: Option<u64>,
) -> (bool, Option<u64>) {
    let mut options = MqttOptions::new("sahool-demo-devices", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    // The listener's default `max_in_flight`: more would only wait in its socket.
    options.set_inflight(32);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    // The message of each PUBLISH the client queued and has not sent yet, in queue order: a
    // fresh client sends in that order, so the next PUBLISH out is the front one.
    let queued: Arc<Mutex<VecDeque<u64>>> = Arc::default();
    let sender = tokio::spawn(send_unacked(client, shared.clone(), queued.clone()));
    let (lock, notify) = &**shared;
    let mut in_flight: HashMap<u16, u64> = HashMap::new();
    let mut last_sent = None;
    let all_acked = loop {
        let event = match tokio::time::timeout(Duration::from_secs(30), eventloop.poll()).await {
            Ok(Ok(event)) => event,
            Ok(Err(e)) => {
                eprintln!("MQTT devices: {e}; connecting again");
                break false;
            }
            Err(_) => {
                eprintln!("MQTT devices: no event for 30 s; connecting again");
                break false;
            }
        };
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let Some(index) = queued.lock().expect("no panic holds the lock").pop_front()
                else {
                    continue;
                };
                in_flight.insert(pkid, index);
                if sent_before.is_some_and(|before| index <= before) {
                    progress.resent.fetch_add(1, Ordering::Relaxed);
                }
                last_sent = last_sent.max(Some(index));
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let Some(index) = in_flight.remove(&ack.pkid) else {
                    continue;
                };
                if let Some(m) = lock
                    .lock()
                    .expect("no panic holds the lock")
                    .messages
                    .remove(&index)
                {
                    progress.acked_messages.fetch_add(1, Ordering::Relaxed);
                    progress
                        .acked_readings
                        .fetch_add(m.readings.len() as u64, Ordering::Relaxed);
                }
                notify.notify_one();
            }
            // The sender disconnects once everything is PUBACKed.
            Event::Outgoing(Outgoing::Disconnect) => break true,
            _ => {}
        }
    };
    sender.abort();
    (all_acked, last_sent)
}

/// Queues on `client`, in order, every unacknowledged message after the last one queued,
/// waiting for the devices when there is none; disconnects once the devices have finished and
/// every message is PUBACKed. `queued` gets each message's index before the client has it.
async fn send_unacked(client: AsyncClient, shared: Shared, queued: Arc<Mutex<VecDeque<u64>>>) {
    let (lock, notify) = &*shared;
    let mut cursor: Option<u64> = None;
    loop {
        let next = {
            let unacked = lock.lock().expect("no panic holds the lock");
            let after = cursor.map_or(Bound::Unbounded, Bound::Excluded);
            match unacked.messages.range((after, Bound::Unbounded)).next() {
                Some((&index, m)) => Some((index, m.to.clone(), m.payload.clone())),
                None if unacked.finished && unacked.messages.is_empty() => break,
                None => None,
            }
        };
        // Nothing to send: wait for the devices to make more, or for a PUBACK.
        let Some((index, topic, payload)) = next else {
            notify.notified().await;
            continue;
        };
        queued
            .lock()
            .expect("no panic holds the lock")
            .push_back(index);
        if client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .is_err()
        {
            return;
        }
        cursor = Some(index);
    }
    let _ = client.disconnect().await;
}
