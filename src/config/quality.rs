//! `[quality]`: sensor liveness, plausibility of observation times, and flood protection.

use std::time::Duration;

use serde::Deserialize;

use super::DurationValue;

/// `[quality]`; see the module documentation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quality {
    /// How often sensors report unless the sensor or its source says otherwise.
    #[serde(default = "default_expected_interval")]
    pub expected_interval: DurationValue,
    /// A sensor silent for this many expected intervals is reported disconnected.
    #[serde(default = "default_stale_factor")]
    pub(crate) stale_factor: f64,
    /// Battery percentage below which a sensor is flagged (once per crossing).
    #[serde(default = "default_low_battery")]
    pub low_battery: f64,
    /// Observation times further ahead of the gateway clock than this are implausible.
    #[serde(default = "default_max_future")]
    pub max_future: DurationValue,
    /// Observation times further back than this are implausible.
    #[serde(default = "default_max_past")]
    pub(crate) max_past: DurationValue,
    /// What happens to an implausible observation time.
    #[serde(default)]
    pub(crate) timestamp_policy: TimestampPolicy,
    /// Per device: readings per second of the device's own observation time (readings it
    /// timestamps), and the pace of readings without a device time; see [`crate::ingest::flood`].
    #[serde(default = "default_device_rate")]
    pub device_rate: f64,
    /// Per device: readings that may claim one window of `device_burst / device_rate` seconds
    /// of observation time, and the burst of readings without a device time before they wait.
    #[serde(default = "default_device_burst")]
    pub device_burst: f64,
    /// Readings per second one source delivers before its acknowledgements are paced (never
    /// a reason to reject).
    #[serde(default = "default_source_rate")]
    pub source_rate: f64,
    #[serde(default = "default_source_burst")]
    pub source_burst: f64,
}

impl Default for Quality {
    fn default() -> Self {
        Self {
            expected_interval: default_expected_interval(),
            stale_factor: default_stale_factor(),
            low_battery: default_low_battery(),
            max_future: default_max_future(),
            max_past: default_max_past(),
            timestamp_policy: TimestampPolicy::default(),
            device_rate: default_device_rate(),
            device_burst: default_device_burst(),
            source_rate: default_source_rate(),
            source_burst: default_source_burst(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimestampPolicy {
    /// Use the receive time and keep the device's time in `metadata.original_timestamp`.
    #[default]
    Replace,
    /// Reject the reading (dead-letter `bad_timestamp`).
    Reject,
}

impl Quality {
    /// Problems of the section on its own; `line` is its header's.
    pub(super) fn check(&self, line: usize, push: &mut impl FnMut(usize, String)) {
        for (key, v) in [
            ("stale_factor", self.stale_factor),
            ("device_rate", self.device_rate),
            ("device_burst", self.device_burst),
            ("source_rate", self.source_rate),
            ("source_burst", self.source_burst),
        ] {
            if !(v.is_finite() && v > 0.0) {
                push(line, format!("[quality] {key} must be a positive number"));
            }
        }
        if self.device_burst < 1.0 || self.source_burst < 1.0 {
            push(
                line,
                "[quality] bursts must allow at least one reading".into(),
            );
        }
        if !(0.0..=100.0).contains(&self.low_battery) {
            push(
                line,
                "[quality] low_battery is a percentage, 0 to 100".into(),
            );
        }
    }
}

fn default_expected_interval() -> DurationValue {
    DurationValue(Duration::from_secs(300))
}
fn default_stale_factor() -> f64 {
    3.0
}
fn default_low_battery() -> f64 {
    20.0
}
fn default_max_future() -> DurationValue {
    DurationValue(Duration::from_secs(300))
}
fn default_max_past() -> DurationValue {
    // Nodes with their own ring buffer may deliver months-old readings after an outage.
    DurationValue(Duration::from_secs(365 * 24 * 3600))
}
fn default_device_rate() -> f64 {
    20.0
}
fn default_device_burst() -> f64 {
    200.0
}
fn default_source_rate() -> f64 {
    5000.0
}
fn default_source_burst() -> f64 {
    20000.0
}
