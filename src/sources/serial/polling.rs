//! What the polled protocols (`modbus-rtu`, `sdi12`) share: when to poll ([`Schedule`]), and
//! how the faults of the stations on a bus are reported ([`StationFaults`]).
//!
//! Invariants:
//! - Each poll group keeps its own period, counted from the port's start. A poll that ran late
//!   (a slow bus, a commit held while the buffer was full) skips the ticks it missed instead of
//!   catching up in a burst, so the schedule neither drifts nor piles up.
//! - A fault that repeats at every poll (a silent slave, a corrupt answer) is counted every
//!   time by the caller, but logged at most once per [`LOG_EVERY`] and kept as a dead-letter
//!   at most once per [`DEAD_LETTER_EVERY`] per station and reason, so one broken sensor
//!   cannot flood the journal or push the other dead-letters out of their bounded table.
//!   Timeouts are never dead-lettered: silence has no bytes to keep.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::{Batch, PortContext, PortFault};
use crate::common::log_limit::LogLimit;
use crate::ingest::mapping::{RawValue, Reason, Rejection, SerialValue};

/// Least time between two log lines of one station's repeating fault.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(600);
/// Least time between two dead-letters of one station's repeating fault.
pub(crate) const DEAD_LETTER_EVERY: Duration = Duration::from_secs(600);

/// Shortest period a group may have (the config allows 100 ms and more).
const MIN_PERIOD: Duration = Duration::from_millis(1);

/// When each poll group of a port is due next.
#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    /// Per group: next tick and period.
    groups: Vec<(Instant, Duration)>,
}

impl Schedule {
    /// Every group due at `start`: the first poll happens right away.
    pub(crate) fn new(periods: impl IntoIterator<Item = Duration>, start: Instant) -> Self {
        Self {
            groups: periods
                .into_iter()
                .map(|p| (start, p.max(MIN_PERIOD)))
                .collect(),
        }
    }

    /// The group due first and when; on a tie, the group listed first.
    pub(crate) fn next(&self) -> Option<(usize, Instant)> {
        self.groups
            .iter()
            .enumerate()
            .min_by_key(|(i, (due, _))| (*due, *i))
            .map(|(i, (due, _))| (i, *due))
    }

    /// Group `group` was polled (and its values committed) by `now`: its next tick is the
    /// first tick of its own period after `now`.
    pub(crate) fn polled(&mut self, group: usize, now: Instant) {
        let Some((due, period)) = self.groups.get_mut(group) else {
            return;
        };
        *due += *period;
        if *due <= now {
            let behind = now.duration_since(*due).as_nanos();
            let missed = behind / period.as_nanos() + 1;
            *due += period.saturating_mul(u32::try_from(missed).unwrap_or(u32::MAX));
        }
    }
}

/// A fault of one station in one poll, as an engine reports it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StationFault {
    /// Who failed: `Modbus unit 3`, `SDI-12 address 0`.
    pub station: String,
    /// The fault's reason as the metrics name it (`timeout`, `crc`, …).
    pub label: &'static str,
    /// The log line and dead-letter detail.
    pub detail: String,
    /// The dead-letter reason when the station sent something wrong; `None` for silence,
    /// which is only counted and logged.
    pub(crate) dead_letter: Option<Reason>,
    /// Bytes to keep with the dead-letter (what arrived, or the values as text).
    pub raw: Vec<u8>,
}

/// Rate limits of one station's fault of one reason.
struct Limits {
    log: LogLimit,
    dead_letter: LogLimit,
}

/// The faults of the stations (Modbus slaves, SDI-12 sensors) on one port, by station and
/// reason, for rate-limited log lines and dead-letters.
#[derive(Default)]
pub(crate) struct StationFaults {
    limits: HashMap<(String, &'static str), Limits>,
    /// Stations whose last poll failed, with the faults since their last success.
    failing: HashMap<String, u64>,
}

impl StationFaults {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Logs a fault (rate-limited) and says whether to keep it as a dead-letter now: `Some(n)`
    /// with the number of like faults not kept since the last one, `None` when it is only
    /// counted.
    pub(crate) fn fault(&mut self, port: &str, f: &StationFault) -> Option<u64> {
        *self.failing.entry(f.station.clone()).or_insert(0) += 1;
        let limits = self
            .limits
            .entry((f.station.clone(), f.label))
            .or_insert_with(|| Limits {
                log: LogLimit::new(LOG_EVERY),
                dead_letter: LogLimit::new(DEAD_LETTER_EVERY),
            });
        if let Some(repeats) = limits.log.admit() {
            tracing::warn!(port, station = %f.station, reason = f.label, repeats, "{}", f.detail);
        }
        f.dead_letter.and_then(|_| limits.dead_letter.admit())
    }

    /// Commits one poll: its values as one batch, then each fault this keeps as a dead-letter,
    /// with its bytes and how many like it were not kept since.
    pub(crate) async fn commit_poll(
        &mut self,
        ctx: &mut PortContext,
        values: Vec<SerialValue>,
        faults: Vec<StationFault>,
    ) -> Result<(), PortFault> {
        if !values.is_empty() {
            let raw = values_text(&values);
            ctx.commit(&Batch::values(values, &raw)).await?;
        }
        for f in faults {
            let (Some(since), Some(reason)) = (self.fault(ctx.name(), &f), f.dead_letter) else {
                continue;
            };
            let detail = if since > 0 {
                format!("{} ({since} more since the last one kept)", f.detail)
            } else {
                f.detail
            };
            ctx.commit(&Batch::rejected(Rejection::new(reason, detail), &f.raw))
                .await?;
        }
        Ok(())
    }

    /// `station` answered: says so once if it had been failing.
    pub(crate) fn answered(&mut self, port: &str, station: &str) {
        if let Some(faults) = self.failing.remove(station) {
            tracing::info!(port, station, faults, "answers again");
        }
    }
}

/// The values of a poll as text (`Modbus unit 1 holding register 0 = 250`, one per line): the
/// raw bytes kept with a dead-letter of the mapping (a value out of range), since a polled
/// value has no line or frame of its own.
pub(crate) fn values_text(values: &[SerialValue]) -> Vec<u8> {
    values
        .iter()
        .map(|v| match &v.value {
            RawValue::Number(n) => format!("{} = {n}", v.key),
            RawValue::Text(t) => format!("{} = {t}", v.key),
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::serial::RegisterKind;
    use crate::ingest::mapping::SerialKey;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn groups_start_together_and_keep_their_own_period() {
        let t0 = Instant::now();
        let mut s = Schedule::new([ms(1000), ms(300)], t0);
        assert_eq!(
            s.next(),
            Some((0, t0)),
            "both due at once, the first listed first"
        );
        s.polled(0, t0 + ms(50));
        assert_eq!(s.next(), Some((1, t0)));
        s.polled(1, t0 + ms(100));
        assert_eq!(s.next(), Some((1, t0 + ms(300))));
        s.polled(1, t0 + ms(310));
        assert_eq!(
            s.next(),
            Some((1, t0 + ms(600))),
            "no drift from a late poll"
        );
        s.polled(1, t0 + ms(620));
        assert_eq!(s.next(), Some((1, t0 + ms(900))));
        s.polled(1, t0 + ms(905));
        assert_eq!(s.next(), Some((0, t0 + ms(1000))));
        assert!(Schedule::new([], t0).next().is_none());
    }

    #[test]
    fn a_slow_poll_skips_the_ticks_it_missed() {
        let t0 = Instant::now();
        let mut s = Schedule::new([ms(100)], t0);
        // The commit was held for 1.05 s: ticks at 100 ms … 1000 ms are skipped, not burst.
        s.polled(0, t0 + ms(1050));
        assert_eq!(s.next(), Some((0, t0 + ms(1100))));
        // Ending exactly on a tick: that tick has passed, the next one is due.
        s.polled(0, t0 + ms(1200));
        assert_eq!(s.next(), Some((0, t0 + ms(1300))));
    }

    #[test]
    fn repeating_faults_are_dead_lettered_once_per_interval_and_timeouts_never() {
        let fault = |station: &str, label, dead_letter| StationFault {
            station: station.into(),
            label,
            detail: format!("{station}: {label}"),
            dead_letter,
            raw: Vec::new(),
        };
        let crc = |station| fault(station, "crc", Some(Reason::Malformed));
        let mut f = StationFaults::new();
        assert_eq!(f.fault("bus", &crc("unit 3")), Some(0));
        assert_eq!(f.fault("bus", &crc("unit 3")), None);
        assert_eq!(
            f.fault(
                "bus",
                &fault("unit 3", "exception", Some(Reason::MissingValue))
            ),
            Some(0),
            "another reason has its own limit"
        );
        assert_eq!(
            f.fault("bus", &crc("unit 4")),
            Some(0),
            "another station too"
        );
        let silent = fault("unit 2", "timeout", None);
        assert_eq!(f.fault("bus", &silent), None);
        assert_eq!(f.fault("bus", &silent), None);
        assert_eq!(f.failing.get("unit 3"), Some(&3));
        f.answered("bus", "unit 3");
        assert!(!f.failing.contains_key("unit 3"));
    }

    #[test]
    fn values_as_text() {
        let key = SerialKey::Modbus {
            unit: 1,
            kind: RegisterKind::Holding,
            register: 0,
        };
        let sdi = SerialKey::Sdi12 {
            address: '0',
            index: 2,
        };
        let text = values_text(&[
            SerialValue::number(key, 250.0),
            SerialValue::number(sdi, -1.5),
        ]);
        assert_eq!(
            String::from_utf8_lossy(&text),
            "Modbus unit 1 holding register 0 = 250\nSDI-12 address 0 value 2 = -1.5"
        );
    }
}
