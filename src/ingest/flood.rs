//! Flood protection that tells a burst from a flood. Sans-IO: the caller passes the clock and
//! carries out the waits it is told about.
//!
//! Two different questions, each with its own answer:
//! - **What does a device claim?** A reading carrying the device's own observation time claims
//!   a moment of that device's clock. Per device, at most `device_burst` readings may claim any
//!   window of `device_burst / device_rate` seconds of observation time (200 per 10 s with the
//!   defaults). A probe cannot measure soil moisture a thousand times a second, but a day of
//!   minute readings uploaded at once, or a broker's queue delivered after a restart, claims
//!   one reading per window however fast it arrives. What claims more is rejected (the caller
//!   dead-letters it with its raw bytes, so `dead-letters replay` can bring it back).
//! - **How fast does it arrive?** A reading without a device time has nothing but its arrival,
//!   so it is paced: per device at `device_rate` per second with bursts of `device_burst`.
//!   Over the bucket it waits: the caller withholds its acknowledgement (the broker or client
//!   slows down) or stops reading the connection or port. Only a device that would have to wait
//!   longer than one window is rejected, so one device's flood holds the acks of others on a
//!   shared broker session for no more than that. Every reading of a source is also paced at
//!   `source_rate` / `source_burst`, which only ever waits.
//!
//! Invariants: a reading is admitted, rejected or delayed, never silently discarded; the
//! readings of one device in one message are judged together when they have no device time
//! (all wait or all are rejected), so a message is never half-paced; memory is bounded by
//! [`MAX_DEVICES`] devices of at most [`MAX_WINDOWS`] claimed windows each.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::reading::{Reading, Timestamp};

/// Devices tracked at most; idle ones are forgotten beyond this.
const MAX_DEVICES: usize = 10_000;

/// Observation windows remembered per device; the oldest go first. A backlog in time order
/// moves forward through windows, so only a device claiming far-apart times ever evicts one
/// it claims again.
const MAX_WINDOWS: usize = 256;

/// The `[quality]` limits, as the guard applies them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub device_rate: f64,
    pub device_burst: f64,
    pub source_rate: f64,
    pub source_burst: f64,
}

impl Limits {
    /// The observation-time window a device's burst may fill, and the longest a paced reading
    /// waits: `device_burst / device_rate`.
    pub fn window(&self) -> Duration {
        Duration::try_from_secs_f64(self.device_burst / self.device_rate)
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_millis(1))
    }

    fn claims_per_window(&self) -> u32 {
        self.device_burst.clamp(1.0, f64::from(u32::MAX)) as u32
    }
}

/// A token bucket that can run into debt: a reservation it cannot pay now says when it can.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token if there is one now.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        self.reserve(1.0, now, Some(Duration::ZERO)).is_some()
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now.max(self.last);
    }

    /// Takes `n` tokens and returns when they are paid for (`now` if they are there), or
    /// `None`, taking nothing, if that would be more than `max_wait` away.
    fn reserve(&mut self, n: f64, now: Instant, max_wait: Option<Duration>) -> Option<Instant> {
        self.refill(now);
        let wait = ((n - self.tokens) / self.rate).max(0.0);
        let wait = Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX);
        if max_wait.is_some_and(|max| wait > max) {
            return None;
        }
        self.tokens -= n;
        now.checked_add(wait)
    }

    fn is_idle(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// What one device has claimed and how fast it arrives.
#[derive(Debug, Clone)]
struct Device {
    arrivals: TokenBucket,
    /// Readings claimed per observation window (index = observation time / window).
    claims: BTreeMap<i64, u32>,
}

impl Device {
    /// Counts one reading into `window`; false if the window is full.
    fn claim(&mut self, window: i64, limit: u32) -> bool {
        let count = self.claims.entry(window).or_insert(0);
        if *count >= limit {
            return false;
        }
        *count += 1;
        if self.claims.len() > MAX_WINDOWS {
            self.claims.pop_first();
        }
        true
    }
}

/// Readings of one device the guard rejected from one message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rejected {
    pub device: String,
    pub count: usize,
    /// Why, in words an operator can act on.
    pub detail: String,
}

/// The guard's answer for the readings of one message.
#[derive(Debug, Default)]
pub(crate) struct Screened {
    pub(crate) admitted: Vec<Reading>,
    pub rejected: Vec<Rejected>,
    /// Store the admitted readings no earlier than this (and hold the sender until then).
    pub wait_until: Option<Instant>,
}

/// The flood state of one source: its pacer and its devices. Shared by every connection
/// that feeds the source.
pub struct FloodGuard {
    limits: Limits,
    window_ns: i64,
    source: TokenBucket,
    devices: HashMap<String, Device>,
}

impl FloodGuard {
    pub fn new(limits: Limits, now: Instant) -> Self {
        Self {
            limits,
            window_ns: i64::try_from(limits.window().as_nanos()).unwrap_or(i64::MAX),
            source: TokenBucket::new(limits.source_rate, limits.source_burst, now),
            devices: HashMap::new(),
        }
    }

    /// Judges the readings one message produced.
    pub(crate) fn screen(&mut self, readings: Vec<Reading>, now: Instant) -> Screened {
        let mut out = Screened::default();
        if readings.is_empty() {
            return out;
        }
        out.admitted.reserve(readings.len());
        let limits = self.limits;
        let per_window = limits.claims_per_window();
        let max_wait = limits.window();
        // Readings without a device time, per device: paced together.
        let mut arriving: Vec<(String, Vec<Reading>)> = Vec::new();
        for r in readings {
            if !r.device_time {
                match arriving.iter_mut().find(|(d, _)| *d == r.device_id) {
                    Some((_, group)) => group.push(r),
                    None => arriving.push((r.device_id.clone(), vec![r])),
                }
                continue;
            }
            let window = r.observed_at.0.div_euclid(self.window_ns);
            if self.device(&r.device_id, now).claim(window, per_window) {
                out.admitted.push(r);
            } else {
                let start = Timestamp(window.saturating_mul(self.window_ns));
                reject(&mut out.rejected, &r.device_id, || {
                    format!(
                            "device `{}` claims more than {per_window} readings within {} of its own clock (window from {}); [quality] device_burst / device_rate",
                            r.device_id,
                            humantime::format_duration(max_wait),
                            start.to_rfc3339()
                        )
                });
            }
        }
        let mut wait_until: Option<Instant> = None;
        for (device, group) in arriving {
            let n = group.len() as f64;
            match self
                .device(&device, now)
                .arrivals
                .reserve(n, now, Some(max_wait))
            {
                Some(at) => {
                    wait_until = wait_until.max(Some(at));
                    out.admitted.extend(group);
                }
                None => {
                    let count = group.len();
                    out.rejected.push(Rejected {
                        detail: format!(
                            "device `{device}` sends readings without a device time faster than {}/s (burst {}) and would wait more than {}; [quality] device_rate / device_burst",
                            limits.device_rate,
                            limits.device_burst,
                            humantime::format_duration(max_wait)
                        ),
                        device,
                        count,
                    });
                }
            }
        }
        if !out.admitted.is_empty() {
            let source = self.source.reserve(out.admitted.len() as f64, now, None);
            wait_until = wait_until.max(source);
        }
        out.wait_until = wait_until.filter(|at| *at > now);
        out
    }

    fn device(&mut self, device: &str, now: Instant) -> &mut Device {
        // Looked up before inserting: the key is allocated only for a device seen first.
        if !self.devices.contains_key(device) {
            if self.devices.len() >= MAX_DEVICES {
                self.devices.retain(|_, d| !d.arrivals.is_idle(now));
            }
            let limits = self.limits;
            let new = Device {
                arrivals: TokenBucket::new(limits.device_rate, limits.device_burst, now),
                claims: BTreeMap::new(),
            };
            self.devices.insert(device.to_string(), new);
        }
        self.devices.get_mut(device).expect("inserted above")
    }
}

/// Counts a rejected reading into its device's entry of this message.
fn reject(rejected: &mut Vec<Rejected>, device: &str, detail: impl FnOnce() -> String) {
    match rejected.iter_mut().find(|r| r.device == device) {
        Some(r) => r.count += 1,
        None => rejected.push(Rejected {
            device: device.to_string(),
            count: 1,
            detail: detail(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::SensorType;

    const SECOND: i64 = 1_000_000_000;

    fn limits(device_rate: f64, device_burst: f64) -> Limits {
        Limits {
            device_rate,
            device_burst,
            source_rate: 1e9,
            source_burst: 1e9,
        }
    }

    fn reading(device: &str, at_ns: i64, device_time: bool) -> Reading {
        Reading {
            device_id: device.into(),
            field_id: "f".into(),
            tenant_id: "t".into(),
            sensor_type: SensorType::SoilMoisture,
            value: 1.0,
            unit: "%".into(),
            observed_at: Timestamp(at_ns),
            battery: None,
            rssi: None,
            raw_value: None,
            original_timestamp: None,
            device_time,
            stale_after_ms: 0,
            metadata: None,
        }
    }

    fn admitted(s: &Screened) -> usize {
        s.admitted.len()
    }

    #[test]
    fn a_day_of_minute_readings_arriving_at_once_is_all_kept() {
        let now = Instant::now();
        let mut g = FloodGuard::new(limits(20.0, 200.0), now);
        let day: Vec<Reading> = (0..1440)
            .map(|m| reading("probe", m * 60 * SECOND, true))
            .collect();
        let s = g.screen(day, now);
        assert_eq!(admitted(&s), 1440);
        assert!(s.rejected.is_empty() && s.wait_until.is_none());
    }

    #[test]
    fn a_device_claiming_readings_a_millisecond_apart_is_held_to_its_window() {
        let now = Instant::now();
        let mut g = FloodGuard::new(limits(20.0, 200.0), now);
        // 10 s of its clock at 1 kHz, starting on a window boundary: one window of 10 s.
        let flood: Vec<Reading> = (0..10_000)
            .map(|i| reading("faulty", 1_000 * SECOND + i * 1_000_000, true))
            .collect();
        let s = g.screen(flood, now);
        assert_eq!(admitted(&s), 200);
        assert_eq!(s.rejected.len(), 1, "one entry per device and message");
        assert_eq!(s.rejected[0].count, 9_800);
        assert!(s.rejected[0].detail.contains("faulty"), "{:?}", s.rejected);
        // Another device is judged on its own clock.
        let other = g.screen(vec![reading("calm", 1_000 * SECOND, true)], now);
        assert_eq!(admitted(&other), 1);
    }

    #[test]
    fn claims_are_counted_by_observation_time_whatever_the_arrival_order() {
        let now = Instant::now();
        let mut g = FloodGuard::new(limits(1.0, 2.0), now);
        // Windows of 2 s holding 2 readings each; arrivals interleave a backlog with live ones.
        let times = [
            0,
            100 * SECOND,
            SECOND / 2,
            100 * SECOND + 1,
            SECOND,
            4 * SECOND,
        ];
        let kept: Vec<bool> = times
            .iter()
            .map(|t| admitted(&g.screen(vec![reading("d", *t, true)], now)) == 1)
            .collect();
        assert_eq!(kept, [true, true, true, true, false, true]);
    }

    #[test]
    fn readings_without_a_device_time_wait_before_they_are_rejected() {
        let t0 = Instant::now();
        let mut g = FloodGuard::new(limits(10.0, 5.0), t0);
        // The burst passes at once.
        for _ in 0..5 {
            let s = g.screen(vec![reading("d", 0, false)], t0);
            assert_eq!((admitted(&s), s.wait_until), (1, None));
        }
        // Then each waits one more tenth of a second, up to the window (0.5 s)...
        let mut waits = Vec::new();
        loop {
            let s = g.screen(vec![reading("d", 0, false)], t0);
            if admitted(&s) == 0 {
                assert_eq!(s.rejected[0].count, 1);
                break;
            }
            let wait = s.wait_until.expect("paced").duration_since(t0);
            waits.push((wait.as_secs_f64() * 1000.0).round() as u64);
        }
        assert_eq!(waits, [100, 200, 300, 400, 500]);
        // ...and a second later the device has earned ten more.
        let later = t0 + Duration::from_secs(1);
        let s = g.screen(vec![reading("d", 0, false); 5], later);
        assert_eq!(
            admitted(&s),
            5,
            "all of a message's readings are judged together"
        );
        assert!(g
            .screen(vec![reading("other", 0, false)], t0)
            .wait_until
            .is_none());
    }

    #[test]
    fn the_source_pacer_delays_but_never_rejects() {
        let t0 = Instant::now();
        let mut g = FloodGuard::new(
            Limits {
                device_rate: 1e9,
                device_burst: 1e9,
                source_rate: 100.0,
                source_burst: 10.0,
            },
            t0,
        );
        let s = g.screen(
            (0..1000)
                .map(|i| reading(&format!("d{i}"), 0, false))
                .collect(),
            t0,
        );
        assert_eq!(admitted(&s), 1000);
        let wait = s.wait_until.expect("paced").duration_since(t0);
        assert!((9.8..=9.95).contains(&wait.as_secs_f64()), "{wait:?}");
    }
}
