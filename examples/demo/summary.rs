//! The demo's verdict: the stream read back and compared with what the devices sent (each
//! reading exactly once, valid against the event contract, in `seq` order), one check per
//! promise of the pipeline, and a table per input with the outage and throughput figures.

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::farm::{Input, Published, ReadingKey};
use crate::support::{self, StreamMessage};

/// What the stream holds, compared with what the devices sent.
pub struct StreamReport {
    pub events: usize,
    duplicate_ids: usize,
    /// Readings found at least once, per input.
    found: HashMap<Input, usize>,
    /// Sent readings with no event carrying their device, type, time and value.
    missing: usize,
    /// Sent readings with more than one event (under different ids).
    doubled: usize,
    /// Events that match no sent reading.
    unexpected: usize,
    schema_valid: usize,
    pub first_schema_error: Option<String>,
    seq_increasing: bool,
}

pub fn check_stream(events: &[StreamMessage], sent: &[Published]) -> StreamReport {
    let validator = support::event_validator();
    let mut seen: HashMap<&ReadingKey, (&Published, usize)> =
        sent.iter().map(|p| (&p.key, (p, 0))).collect();
    let mut ids = HashSet::new();
    let (mut duplicate_ids, mut unexpected, mut schema_valid) = (0, 0, 0);
    let mut first_schema_error = None;
    let mut last_seq = 0;
    let mut seq_increasing = true;
    for e in events {
        let errors: Vec<String> = validator
            .iter_errors(&e.body)
            .map(|err| err.to_string())
            .collect();
        if errors.is_empty() {
            schema_valid += 1;
        } else if first_schema_error.is_none() {
            first_schema_error = Some(format!("{errors:?} in {}", e.body));
        }
        if !ids.insert(e.body["event_id"].as_str().unwrap_or_default().to_string()) {
            duplicate_ids += 1;
        }
        // The stream's order must be the buffer's order.
        let seq = e.body["source"]["seq"].as_u64().unwrap_or(0);
        seq_increasing &= seq > last_seq;
        last_seq = seq;
        let hit = reading_key(&e.body["payload"]).and_then(|key| seen.get_mut(&key));
        match hit {
            Some((p, count)) if e.body["payload"]["value"].as_f64() == Some(p.value) => *count += 1,
            _ => unexpected += 1,
        }
    }
    let mut found = HashMap::new();
    for (p, _) in seen.values().filter(|(_, n)| *n > 0) {
        *found.entry(p.input).or_default() += 1;
    }
    StreamReport {
        events: events.len(),
        duplicate_ids,
        found,
        missing: seen.values().filter(|(_, n)| *n == 0).count(),
        doubled: seen.values().filter(|(_, n)| *n > 1).count(),
        unexpected,
        schema_valid,
        first_schema_error,
        seq_increasing,
    }
}

/// The reading an event's payload describes; `None` if the payload is not a reading at all.
fn reading_key(payload: &Value) -> Option<ReadingKey> {
    let at = observed_at(payload)?;
    Some(ReadingKey {
        device_id: payload["device_id"].as_str()?.to_string(),
        sensor_type: payload["sensor_type"].as_str()?.to_string(),
        at_ms: i64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()?,
    })
}

fn observed_at(payload: &Value) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(payload["timestamp"].as_str()?, &Rfc3339).ok()
}

/// How fast the backlog of the outage reached JetStream, by the server's own timestamps: from
/// the first event stored after NATS went down (at `down_at`), every reading made before that
/// moment, up to the last of them stored.
pub fn catch_up(events: &[StreamMessage], down_at: OffsetDateTime) -> Option<CatchUp> {
    let resumed = events
        .iter()
        .map(|e| e.stored)
        .filter(|t| *t > down_at)
        .min()?;
    let backlog: Vec<OffsetDateTime> = events
        .iter()
        .filter(|e| e.stored >= resumed)
        .filter(|e| observed_at(&e.body["payload"]).is_some_and(|t| t < resumed))
        .map(|e| e.stored)
        .collect();
    let secs = (*backlog.iter().max()? - resumed).as_seconds_f64();
    (secs > 0.0).then_some(CatchUp {
        readings: backlog.len() as u64,
        secs,
    })
}

/// One input's row of the table: readings sent, acknowledged, found in the stream.
pub struct InputRow {
    pub label: &'static str,
    pub input: Input,
    pub sent: usize,
    pub acked: u64,
    /// What `acked` means for this input.
    pub acked_means: String,
}

/// Everything the verdict looks at besides the stream.
pub struct Run {
    pub inputs: Vec<InputRow>,
    /// MQTT messages PUBACKed / sent.
    pub messages: (u64, u64),
    /// Serial lines the gateway read / the talker wrote.
    pub lines: (u64, u64),
    pub accepted: u64,
    pub rejected: u64,
    pub buffered: u64,
    pub drained: bool,
    pub exit_code: Option<i32>,
}

/// How fast the gateway forwarded its backlog once NATS was back.
pub struct CatchUp {
    /// Readings made before the first was stored after the outage.
    pub readings: u64,
    /// From that first one stored to the last of them.
    pub secs: f64,
}

impl CatchUp {
    pub fn rate(&self) -> f64 {
        self.readings as f64 / self.secs
    }
}

/// Figures worth printing that no check depends on.
pub struct Figures {
    pub outage_secs: f64,
    pub max_buffered: u64,
    pub publish_secs: f64,
    pub catch_up: Option<CatchUp>,
    pub mean_puback_ms: f64,
    pub reconnects: u64,
    pub resent: u64,
}

/// One line of the verdict; the demo fails if any line does not hold.
struct Check {
    label: &'static str,
    value: String,
    ok: bool,
}

fn check(label: &'static str, value: impl ToString, ok: bool) -> Check {
    Check {
        label,
        value: value.to_string(),
        ok,
    }
}

fn verdict(run: &Run, report: &StreamReport) -> Vec<Check> {
    let sent: usize = run.inputs.iter().map(|r| r.sent).sum();
    let ratio = |(a, b): (u64, u64)| (format!("{a} / {b}"), a == b);
    let (messages, all_acked) = ratio(run.messages);
    let (lines, all_read) = ratio(run.lines);
    let (valid, all_valid) = ratio((report.schema_valid as u64, report.events as u64));
    let zero = |label, n: usize| check(label, n, n == 0);
    let exit = run
        .exit_code
        .map_or("killed by a signal".to_string(), |c| c.to_string());
    vec![
        check(
            "MQTT messages PUBACKed by the listener",
            messages,
            all_acked,
        ),
        check("serial lines read by the gateway", lines, all_read),
        check(
            "readings accepted by the gateway",
            format!("{} / {sent}", run.accepted),
            run.accepted == sent as u64,
        ),
        zero("readings rejected by the gateway", run.rejected as usize),
        check(
            "buffer drained",
            format!("{} left", run.buffered),
            run.drained,
        ),
        check(
            "events in stream",
            format!("{} / {sent}", report.events),
            report.events == sent,
        ),
        zero("duplicates", report.duplicate_ids + report.doubled),
        zero("missing", report.missing),
        zero("events matching no reading sent", report.unexpected),
        check("schema-valid events", valid, all_valid),
        check(
            "source.seq strictly increasing",
            if report.seq_increasing { "yes" } else { "no" },
            report.seq_increasing,
        ),
        check(
            "gateway exit code after SIGTERM",
            exit,
            run.exit_code == Some(0),
        ),
    ]
}

/// Prints the table, the checks and the figures; true if every check holds.
pub fn print(run: &Run, report: &StreamReport, figures: &Figures) -> bool {
    println!("\n== Summary ==");
    println!(
        "  {:<16} {:>13} {:>7} {:>10}  acked means",
        "input", "readings sent", "acked", "in stream"
    );
    for row in &run.inputs {
        let found = report.found.get(&row.input).copied().unwrap_or(0);
        println!(
            "  {:<16} {:>13} {:>7} {:>10}  {}",
            row.label, row.sent, row.acked, found, row.acked_means
        );
    }
    if report.duplicate_ids + report.doubled > 0 {
        println!(
            "  duplicates: {} repeated event_ids, {} readings in the stream more than once",
            report.duplicate_ids, report.doubled
        );
    }
    println!();
    let checks = verdict(run, report);
    for c in &checks {
        println!(
            "  {:<6} {:<40} {}",
            if c.ok { "ok" } else { "FAIL" },
            c.label,
            c.value
        );
    }
    let sent: usize = run.inputs.iter().map(|r| r.sent).sum();
    println!();
    println!(
        "  {:<6} {:<40} {:.1} s, up to {} readings buffered meanwhile",
        "", "NATS outage", figures.outage_secs, figures.max_buffered
    );
    println!(
        "  {:<6} {:<40} in: {:.0} readings/s for {:.0} s, mean PUBACK {:.1} ms",
        "",
        "throughput",
        sent as f64 / figures.publish_secs,
        figures.publish_secs,
        figures.mean_puback_ms,
    );
    let out = figures
        .catch_up
        .as_ref()
        .map_or("not measured".into(), |c| {
            format!(
                "out: the outage's backlog at {:.0} readings/s ({} stored by JetStream in {:.3} s)",
                c.rate(),
                c.readings,
                c.secs
            )
        });
    println!("  {:<6} {:<40} {out}", "", "");
    println!(
        "  {:<6} {:<40} {} ({} messages sent again)",
        "", "MQTT reconnects", figures.reconnects, figures.resent
    );
    let passed = checks.iter().all(|c| c.ok);
    println!(
        "\n{}",
        if passed {
            "PASS: every reading reached JetStream exactly once"
        } else {
            "FAIL"
        }
    );
    passed
}
