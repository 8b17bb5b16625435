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
