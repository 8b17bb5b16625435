//! The ingest rules every input shares between its mapping and the store: flood protection
//! ([`crate::ingest::flood`]), and every rejection turned into a dead-letter with the raw bytes it came
//! from. MQTT messages ([`super::intake`]) and serial batches ([`super::serial`]) both come
//! through here, so a reading is judged the same whichever way it arrived.
//!
//! Nothing is dropped here: a reading is admitted (perhaps after a wait the caller carries
//! out, holding its sender), or it becomes a dead-letter counted by reason when it commits.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use crate::common::log_limit::LogLimit;
use crate::common::metrics::Metrics;
use crate::config::Quality;
use crate::ingest::flood::{FloodGuard, Limits};
use crate::ingest::mapping::{Mapped, Reason, Rejection};
use crate::reading::Reading;
use crate::store::NewDeadLetter;

/// The flood guard of one source, shared by every connection that feeds it.
pub type SharedFloodGuard = Arc<Mutex<FloodGuard>>;

pub(crate) fn flood_guard(q: &Quality) -> SharedFloodGuard {
    let limits = Limits {
        device_rate: q.device_rate,
        device_burst: q.device_burst,
        source_rate: q.source_rate,
        source_burst: q.source_burst,
    };
    Arc::new(Mutex::new(FloodGuard::new(limits, Instant::now())))
}

/// What one message becomes: readings to store (no earlier than `wait_until`) and
/// dead-letters, committed together.
#[derive(Debug, Default)]
pub(crate) struct Admitted {
    pub readings: Vec<Reading>,
    pub dead_letters: Vec<NewDeadLetter>,
    pub wait_until: Option<Instant>,
}

/// One source's ingest rules.
pub(crate) struct Admission {
    source: String,
    flood: SharedFloodGuard,
    /// `readings_paced_total`: readings that waited for their flood budget.
    paced: Counter,
    rate_log: LogLimit,
}

impl Admission {
    pub(crate) fn new(source: &str, flood: SharedFloodGuard, metrics: &Metrics) -> Self {
        Self {
            source: source.to_string(),
            flood,
            paced: metrics.readings_paced.clone(),
            rate_log: LogLimit::new(Duration::from_secs(10)),
        }
    }

    /// Screens what the mapping made of one message. `rejected` are the input's own
    /// rejections (framing, syntax); `context` starts every dead-letter's detail (`topic T`,
    /// `port P`; formatted only when there is one); `raw` (and the MQTT `topic`) is kept with every dead-letter of the message,
    /// so `dead-letters replay` can map it again.
    pub(crate) fn admit(
        &self,
        mapped: Mapped,
        rejected: &[Rejection],
        context: &dyn std::fmt::Display,
        topic: Option<&str>,
        raw: &[u8],
        now: Instant,
    ) -> Admitted {
        let screened = if mapped.readings.is_empty() {
            Default::default()
        } else {
            let mut flood = self.flood.lock().unwrap_or_else(|e| e.into_inner());
            flood.screen(mapped.readings, now)
        };
        if screened.wait_until.is_some() {
            self.paced.inc_by(screened.admitted.len() as u64);
        }
        if let Some(first) = screened.rejected.first() {
            if let Some(held) = self.rate_log.admit() {
                tracing::warn!(source = %self.source, device = %first.device, readings = first.count, repeats = held, detail = %first.detail, "flood limit: readings dead-lettered (reason rate_limited; `dead-letters replay --reason rate_limited` brings them back)");
            }
        }
        // A refused reading that names itself (a device over its rate limit, one bad item of
        // a batch) is replayed without the rest of the message, which was stored.
        let rate_limited = screened.rejected.into_iter().map(|r| {
            let readings = if r.count == 1 { "reading" } else { "readings" };
            let why = format!("{} {readings}: {}", r.count, r.detail);
            Rejection::new(Reason::RateLimited, why).of(&r.device, None)
        });
        let rejections: Vec<Rejection> = rejected
            .iter()
            .cloned()
            .chain(mapped.rejections)
            .chain(rate_limited)
            .collect();
        let dead_letters = if rejections.is_empty() {
            Vec::new()
        } else {
            let raw: Arc<[u8]> = Arc::from(raw);
            rejections
                .into_iter()
                .map(|r| {
                    let (device, sensor_type) = r
                        .refused
                        .map_or((None, None), |i| (Some(i.device), i.sensor_type));
                    NewDeadLetter {
                        source: self.source.clone(),
                        reason: r.reason,
                        detail: format!("{context}: {}", r.detail),
                        raw: raw.clone(),
                        topic: topic.map(str::to_string),
                        device,
                        sensor_type,
                    }
                })
                .collect()
        };
        Admitted {
            readings: screened.admitted,
            dead_letters,
            wait_until: screened.wait_until,
        }
    }
}
