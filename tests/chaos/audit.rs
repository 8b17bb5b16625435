//! The verdict of a chaos run, by reading identity: every reading a publisher's far end
//! confirmed (the broker's PUBACK) must be in the stream exactly once, stream order must follow
//! `seq`, and nothing may appear that was never sent. Readings a scenario may lose by design
//! (counted drops, a corrupt buffer moved aside) are passed in as excused and reported apart.
//!
//! Identity is the reading number a feed put in the reading's value (see `support::steady`); a
//! serial feed (simulated device on a pty) plugs in by producing the same [`Ledger`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use crate::support::steady::Ledger;
use crate::support::{Gateway, Nats, StreamMessage};

/// One line of a scenario's summary table.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub sent: usize,
    pub acked: usize,
    pub in_stream: usize,
    pub lost: usize,
    pub doubled: usize,
    pub note: String,
}

/// A row and everything found wrong.
pub struct Verdict {
    pub row: Row,
    pub problems: Vec<String>,
    /// Excused readings that are indeed missing from the stream.
    pub excused_missing: BTreeSet<usize>,
}

/// Which readings the stream holds, and what is wrong with the stream itself.
struct Seen {
    counts: BTreeMap<usize, usize>,
    readings: usize,
    problems: Vec<String>,
}

async fn read(nats: &Nats, device: &str) -> Seen {
    let mut seen = Seen {
        counts: BTreeMap::new(),
        readings: 0,
        problems: Vec::new(),
    };
    let mut ids = HashSet::new();
    let mut highest = 0u64;
    nats.visit_stream("SAHOOL_IOT", |m: StreamMessage| {
        let body = &m.body;
        let id = body["event_id"].as_str().unwrap_or_default().to_string();
        if m.header("Nats-Msg-Id") != Some(id.as_str()) {
            seen.problems
                .push(format!("event {id}: Nats-Msg-Id differs from event_id"));
        }
        let seq = body["source"]["seq"].as_u64().unwrap_or(0);
        if seq > highest {
            highest = seq;
        } else {
            seen.problems.push(format!(
                "seq {seq} after {highest}: stream order must follow seq"
            ));
        }
        if !ids.insert(id.clone()) {
            seen.problems
                .push(format!("event {id} is in the stream twice"));
        }
        if body["event_type"] != "sensor_reading" || body["payload"]["device_id"] != device {
            return;
        }
        seen.readings += 1;
        let value = body["payload"]["value"].as_f64().unwrap_or(-1.0);
        *seen.counts.entry(value as usize).or_default() += 1;
    })
    .await;
    seen
}

/// Waits until the stream holds every confirmed reading that is not excused (or `within`
/// passes), and the gateway's buffer is empty; then judges the stream.
pub async fn settle_and_judge(
    scenario: &str,
    nats: &Nats,
    gateway: &Gateway,
    ledger: &Ledger,
    excused: &BTreeSet<usize>,
    within: Duration,
) -> Verdict {
    let deadline = Instant::now() + within;
    let must: Vec<usize> = ledger
        .acked_readings()
        .filter(|n| !excused.contains(n))
        .collect();
    loop {
        let drained = gateway.metric("sahool_gateway_buffer_readings", "") == 0.0;
        if drained {
            // Anything doubled would arrive with the rest of the backlog: let it settle.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let seen = read(nats, "probe-1").await;
            let complete = must.iter().all(|n| seen.counts.contains_key(n));
            if complete || Instant::now() >= deadline {
                return judge(scenario, ledger, excused, seen);
            }
        } else if Instant::now() >= deadline {
            return judge(scenario, ledger, excused, read(nats, "probe-1").await);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn judge(scenario: &str, ledger: &Ledger, excused: &BTreeSet<usize>, seen: Seen) -> Verdict {
    let mut problems = seen.problems;
    let sent = ledger.first..ledger.first + ledger.sent;
    let lost: Vec<usize> = ledger
        .acked_readings()
        .filter(|n| !excused.contains(n) && !seen.counts.contains_key(n))
        .collect();
    let doubled: Vec<usize> = seen
        .counts
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, _)| *n)
        .collect();
    let phantoms: Vec<usize> = seen
        .counts
        .keys()
        .filter(|n| !sent.contains(n))
        .copied()
        .collect();
    let excused_missing: BTreeSet<usize> = excused
        .iter()
        .filter(|n| !seen.counts.contains_key(n))
        .copied()
        .collect();
    let sample = |v: &[usize]| format!("{:?}", &v[..v.len().min(10)]);
    if !lost.is_empty() {
        problems.push(format!(
            "{} acknowledged readings lost, e.g. {}",
            lost.len(),
            sample(&lost)
        ));
    }
    if !doubled.is_empty() {
        problems.push(format!(
            "{} readings doubled, e.g. {}",
            doubled.len(),
            sample(&doubled)
        ));
    }
    if !phantoms.is_empty() {
        problems.push(format!(
            "{} readings in the stream were never sent, e.g. {}",
            phantoms.len(),
            sample(&phantoms)
        ));
    }
    problems.truncate(20);
    Verdict {
        row: Row {
            scenario: scenario.to_string(),
            sent: ledger.sent,
            acked: ledger.acked_count(),
            in_stream: seen.readings,
            lost: lost.len(),
            doubled: seen.counts.values().map(|c| c.saturating_sub(1)).sum(),
            note: String::new(),
        },
        problems,
        excused_missing,
    }
}

/// The buffer's lifetime totals (`buffer stats --json`, read once the gateway stopped) against
/// the stream: `accepted = forwarded + dropped + refused + buffered`, and the readings counted
/// as forwarded are exactly the distinct readings in the stream (at most them when
/// `whole_history` is false: a damaged buffer file moved aside took its totals along).
pub async fn check_accounts(
    v: &mut Verdict,
    nats: &Nats,
    gateway: &mut Gateway,
    whole_history: bool,
) {
    if gateway.terminate() != Some(0) {
        v.problems
            .push("the gateway did not exit 0 on SIGTERM before the totals were read".into());
    }
    let out = gateway.cli(&["buffer", "stats", "--json"]);
    let stats: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(s) => s,
        Err(e) => {
            v.problems
                .push(format!("buffer stats --json: {e}: {out:?}"));
            return;
        }
    };
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(u64::MAX);
    let (accepted, forwarded, refused, buffered) = (
        n(&stats["accepted"]),
        n(&stats["forwarded"]),
        n(&stats["refused"]),
        n(&stats["readings"]),
    );
    let dropped: u64 = stats["dropped"]
        .as_object()
        .map_or(u64::MAX, |d| d.values().map(n).sum());
    if accepted != forwarded + dropped + refused + buffered {
        v.problems.push(format!(
            "totals do not add up: accepted {accepted} != forwarded {forwarded} + dropped {dropped} + refused {refused} + buffered {buffered}"
        ));
    }
    let mut ids = HashSet::new();
    nats.visit_stream("SAHOOL_IOT", |m: StreamMessage| {
        if m.body["event_type"] == "sensor_reading" {
            ids.insert(m.body["event_id"].as_str().unwrap_or_default().to_string());
        }
    })
    .await;
    let in_stream = ids.len() as u64;
    if forwarded > in_stream || (whole_history && forwarded != in_stream) {
        v.problems.push(format!(
            "{forwarded} readings counted as forwarded, {in_stream} distinct readings in the stream"
        ));
    }
    v.row.note += &format!(
        "; totals: {accepted} accepted = {forwarded} fwd + {dropped} dropped + {refused} refused + {buffered} buffered"
    );
}

impl Verdict {
    /// Prints the table row(s) of a scenario, then fails on any problem.
    pub fn report(verdicts: &[Verdict], seed: u64) {
        print_table(
            &verdicts.iter().map(|v| v.row.clone()).collect::<Vec<_>>(),
            seed,
        );
        let problems: Vec<String> = verdicts
            .iter()
            .flat_map(|v| {
                v.problems
                    .iter()
                    .map(|p| format!("{}: {p}", v.row.scenario))
            })
            .collect();
        assert!(
            problems.is_empty(),
            "chaos run failed (CHAOS_SEED={seed}):\n{}",
            problems.join("\n")
        );
    }
}

/// The summary table: one line per run.
pub fn print_table(rows: &[Row], seed: u64) {
    let width = rows
        .iter()
        .map(|r| r.scenario.len())
        .max()
        .unwrap_or(8)
        .max(8);
    println!(
        "\n{:<width$} | {:>8} | {:>8} | {:>9} | {:>5} | {:>7} | notes (CHAOS_SEED={seed})",
        "scenario", "sent", "acked", "in stream", "lost", "doubled"
    );
    println!("{}", "-".repeat(width + 60));
    for r in rows {
        println!(
            "{:<width$} | {:>8} | {:>8} | {:>9} | {:>5} | {:>7} | {}",
            r.scenario, r.sent, r.acked, r.in_stream, r.lost, r.doubled, r.note
        );
    }
}
