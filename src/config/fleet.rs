//! `[fleet]`: what the platform sees of this gateway. For now only the heartbeat's interval
//! (DESIGN §9); remote config will add its keys when it is built.

use std::time::Duration;

use serde::Deserialize;

use super::DurationValue;

/// Heartbeats closer than this would mostly report the same state and crowd the outbox.
const MIN_STATUS_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// How often a heartbeat (`sahool.iot.gateway.status`) goes into the outbox.
    #[serde(default = "default_status_interval")]
    pub status_interval: DurationValue,
}

impl Default for Fleet {
    fn default() -> Self {
        Self {
            status_interval: default_status_interval(),
        }
    }
}

impl Fleet {
    /// Problems of the section on its own; `line` is its header's.
    pub(super) fn check(&self, line: usize, push: &mut impl FnMut(usize, String)) {
        if self.status_interval.0 < MIN_STATUS_INTERVAL {
            push(line, "[fleet] status_interval must be at least 5s".into());
        }
    }
}

fn default_status_interval() -> DurationValue {
    DurationValue(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{problems, MINIMAL};

    #[test]
    fn status_interval_defaults_to_a_minute_and_has_a_floor() {
        let c = super::super::parse(MINIMAL).unwrap();
        assert_eq!(c.fleet.status_interval.0.as_secs(), 60);
        let c = super::super::parse(&format!("{MINIMAL}\n[fleet]\nstatus_interval = \"5s\"\n"));
        assert_eq!(c.unwrap().fleet.status_interval.0.as_secs(), 5);
        assert_eq!(
            problems("\n[fleet]\nstatus_interval = \"2s\"\n"),
            "line 9: [fleet] status_interval must be at least 5s"
        );
        let unknown = problems("\n[fleet]\nconfig_bucket = \"x\"\n");
        assert!(
            unknown.starts_with("line 10") && unknown.contains("config_bucket"),
            "{unknown}"
        );
    }
}
