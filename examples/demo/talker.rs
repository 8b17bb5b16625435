//! The serial soil probe: a thread playing the device at the far end of a pseudo-terminal, which
//! the gateway opens as a `[[serial]]` `lines` port. Every `every` it prints one `key=value`
//! line with the observation time in it, so each reading is found in the stream by that time.
//! A serial line has no acknowledgement: the gateway's count of lines read stands in for one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::farm::{Device, Published, TALKER};
use crate::support::pty::Pty;

/// What the talker printed, once it has stopped. It hands back the pseudo-terminal, whose
/// closing the gateway would see as the device unplugged: close it after the gateway stops.
pub struct Outcome {
    pub pty: Pty,
    pub readings: Vec<Published>,
    pub lines: u64,
}

/// Starts printing on `pty` now, one line every `every`, until `talk_for` after `start`;
/// `lines` counts the lines written so far.
pub fn spawn(
    mut pty: Pty,
    start: Instant,
    talk_for: Duration,
    every: Duration,
    lines: Arc<AtomicU64>,
) -> JoinHandle<Outcome> {
    std::thread::spawn(move || {
        let mut device = Device::new(&TALKER, 0);
        let mut readings = Vec::new();
        // On a schedule, not sleep after sleep, so a slow write does not lower the rate.
        let mut next = Instant::now();
        while start.elapsed() < talk_for {
            for m in device.publish(start.elapsed()) {
                pty.write(&m.payload);
                readings.extend(m.readings);
                lines.fetch_add(1, Ordering::Relaxed);
            }
            next += every;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        Outcome {
            pty,
            readings,
            lines: lines.load(Ordering::Relaxed),
        }
    })
}
