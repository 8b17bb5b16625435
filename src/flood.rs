//! Flood protection: token buckets per device and per source, so one misbehaving node cannot
//! fill the buffer or starve the others. What exceeds them is rejected (`rate_limited`) but the
//! message is still acknowledged, so the node does not resend it forever.

use std::collections::HashMap;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// Devices tracked at most; idle ones (full buckets) are forgotten beyond this.
const MAX_DEVICES: usize = 10_000;

/// The buckets of one source: its own and one per device seen on it.
pub struct FloodGuard {
    device_rate: f64,
    device_burst: f64,
    source: TokenBucket,
    devices: HashMap<String, TokenBucket>,
}

impl FloodGuard {
    pub fn new(device_rate: f64, device_burst: f64, source_rate: f64, source_burst: f64) -> Self {
        Self {
            device_rate,
            device_burst,
            source: TokenBucket::new(source_rate, source_burst, Instant::now()),
            devices: HashMap::new(),
        }
    }

    /// True if a reading from `device` may pass now.
    pub fn admit(&mut self, device: &str, now: Instant) -> bool {
        if self.devices.len() >= MAX_DEVICES && !self.devices.contains_key(device) {
            self.devices.retain(|_, b| !b.is_full(now));
        }
        let (rate, burst) = (self.device_rate, self.device_burst);
        let bucket = self
            .devices
            .entry(device.to_string())
            .or_insert_with(|| TokenBucket::new(rate, burst, now));
        bucket.take(now) && self.source.take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_flooding_device_does_not_use_up_another_devices_tokens() {
        let t0 = Instant::now();
        let mut g = FloodGuard::new(10.0, 5.0, 1000.0, 1000.0);
        let flood = (0..100).filter(|_| g.admit("noisy", t0)).count();
        assert_eq!(flood, 5, "the burst, then nothing");
        assert!(g.admit("calm", t0), "another device still passes");
        // One second later the noisy device has earned 10 more tokens, capped at its burst.
        let t1 = t0 + Duration::from_secs(1);
        let later = (0..100).filter(|_| g.admit("noisy", t1)).count();
        assert_eq!(later, 5);
    }

    #[test]
    fn the_source_bucket_caps_all_devices_together() {
        let t0 = Instant::now();
        let mut g = FloodGuard::new(100.0, 100.0, 1.0, 3.0);
        let passed = (0..10).filter(|i| g.admit(&format!("d{i}"), t0)).count();
        assert_eq!(passed, 3);
    }
}
