//! RSS over a run with NATS flaps: readings at a steady rate while the platform's nats-server
//! is stopped and started again and again (the chaos soak, shortened; each restart drains
//! what the outage buffered), then idle once the stream holds every reading. The gateway's RSS
//! is sampled every second; the curve is printed per phase, so a warming cache (flat) reads
//! apart from a leak (a slope) and from memory the allocator keeps after each drain (a step
//! up per outage, never given back).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::measure::{self, rss_kib, wait_stream};
use crate::publisher::{Job, Publisher};
use crate::scenarios::Scenario;

/// The phases of a soak, in order.
pub const PHASES: [&str; 2] = ["load with flaps", "idle after"];

/// How long the platform's nats-server stays up, then down, in each flap.
const UP: Duration = Duration::from_secs(6);
const DOWN: Duration = Duration::from_secs(2);
const SECOND: Duration = Duration::from_secs(1);
/// Seconds of idle sampling once the last reading is stored.
const IDLE_SECS: u64 = 5;

/// RSS samples (KiB) of each phase, and the flaps made.
pub struct Soak {
    pub samples: [Vec<u64>; 2],
    pub flaps: usize,
}

impl Soak {
    /// Min, median and max of a phase, in MiB.
    pub fn summary(&self, phase: usize) -> (f64, f64, f64) {
        let mib: Vec<f64> = self.samples[phase]
            .iter()
            .map(|k| *k as f64 / 1024.0)
            .collect();
        let min = mib.iter().copied().fold(f64::INFINITY, f64::min);
        let max = mib.iter().copied().fold(0.0, f64::max);
        (min, measure::quantile(&mib, 0.5), max)
    }

    /// The whole curve in MiB, one figure a second, phases split by ` | `.
    pub fn curve(&self) -> String {
        self.samples
            .iter()
            .map(|phase| {
                phase
                    .iter()
                    .map(|k| format!("{:.1}", *k as f64 / 1024.0))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

/// Samples a process's RSS every second on its own thread, into the phase `phase` names.
struct Sampler {
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<[Vec<u64>; 2]>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let phase = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (phase.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut samples: [Vec<u64>; 2] = Default::default();
            let mut last: Option<(usize, Instant)> = None;
            while !s.load(Ordering::Relaxed) {
                // Once a second, and at once when a phase begins.
                let phase = p.load(Ordering::Relaxed).min(1);
                let due = last.is_none_or(|(was, at)| was != phase || at.elapsed() >= SECOND);
                if due {
                    if let Some(kib) = rss_kib(pid) {
                        samples[phase].push(kib);
                    }
                    last = Some((phase, Instant::now()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            samples
        });
        Self {
            phase,
            stop,
            thread,
        }
    }

    fn next_phase(&self) {
        self.phase.fetch_add(1, Ordering::Relaxed);
    }

    fn finish(self) -> [Vec<u64>; 2] {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("RSS sampler")
    }
}

/// `rate` readings/s for `seconds` into a gateway scenario, NATS down for [`DOWN`] after
/// every [`UP`]; then, once the stream holds every reading, [`IDLE_SECS`] of idle.
pub async fn flaps(scenario: &Scenario, first: u64, rate: f64, seconds: u64) -> Soak {
    let mut system = scenario.start().await;
    let sampler = Sampler::start(system.pid());
    let count = (rate * seconds as f64) as u64;
    let publisher = tokio::spawn(
        Publisher::spawn(&Job {
            port: system.publisher_port,
            first,
            count,
            rate,
            send_log: None,
        })
        .finish(),
    );
    let mut flaps = 0;
    while !publisher.is_finished() {
        tokio::time::sleep(UP).await;
        if publisher.is_finished() {
            break;
        }
        let nats = system.nats_mut().expect("a gateway scenario has NATS");
        nats.stop();
        flaps += 1;
        tokio::time::sleep(DOWN).await;
        nats.resume();
    }
    publisher.await.expect("publisher task");
    let js = measure::jetstream(&system.nats_url).await;
    wait_stream(
        &js,
        system.stream,
        count + system.extra,
        Duration::from_secs(600),
    )
    .await;
    sampler.next_phase();
    tokio::time::sleep(Duration::from_secs(IDLE_SECS)).await;
    Soak {
        samples: sampler.finish(),
        flaps,
    }
}
