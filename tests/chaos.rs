//! The chaos suite: the real binary between real mosquitto and real nats-server, a publisher at a
//! steady rate, faults injected at random moments, and at the end the stream checked by reading
//! identity: 0 lost (every reading the broker acknowledged is there), 0 doubled, `seq` order
//! kept. Each scenario prints its summary table (see it with `-- --nocapture`).
//!
//! Short runs by default (the whole target in a few minutes on 2 cores); `CHAOS_LONG=1` runs the
//! full durations and the 10-minute soak; `CHAOS_SEED=N` replays a run's fault timings.
//!
//! New inputs join by producing a `support::steady::Ledger` of what their far end confirmed
//! (e.g. a simulated serial node that counts acked frames) and by a probe config for the rig.

mod support;

#[path = "chaos/audit.rs"]
mod audit;
#[path = "chaos/faults.rs"]
mod faults;
#[path = "chaos/rig.rs"]
mod rig;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use audit::{check_accounts, settle_and_judge, Verdict};
use faults::{Clock, Damage, Disk};
use rig::{finish, pick, scenario, sleep, Rig};
use support::steady::Steady;
use support::{probe_reading, Gateway};

/// Time for the stream to settle after the last fault.
const SETTLE: Duration = Duration::from_secs(120);

async fn judge(name: &str, rig: &Rig, ledger: &support::steady::Ledger) -> Verdict {
    settle_and_judge(
        name,
        &rig.nats,
        &rig.gateway,
        ledger,
        &BTreeSet::new(),
        SETTLE,
    )
    .await
}

fn now_ms() -> i64 {
    sahool_gateway::reading::Timestamp::now().unix_millis()
}

fn metric(g: &Gateway, name: &str) -> f64 {
    g.metric(name, "")
}

#[test]
fn s1_sigkill_20_times_at_random_moments() {
    scenario(|mut rng, seed| async move {
        let mut rig = Rig::start("").await;
        let publisher = rig.publisher("s1");
        let run = pick(Duration::from_secs(30), Duration::from_secs(60));
        let kills = 20;
        let started = Instant::now();
        for k in 0..kills {
            // Spread over the run, each at a random point of its slot.
            let slot_end = run * (k + 1) / kills;
            let at = run * k / kills + rng.between(Duration::ZERO, run / kills);
            sleep(at.saturating_sub(started.elapsed())).await;
            rig.gateway.kill9();
            sleep(rng.between(Duration::ZERO, Duration::from_millis(300))).await;
            rig.gateway.resume();
            sleep(slot_end.saturating_sub(started.elapsed())).await;
        }
        let ledger = finish(publisher);
        let mut v = judge("1 SIGKILL x20", &rig, &ledger).await;
        v.row.note += &format!("{kills} kills in {}s", run.as_secs());
        check_accounts(&mut v, &rig.nats, &mut rig.gateway, true).await;
        Verdict::report(&[v], seed);
    });
}

#[test]
fn s2_nats_stopped_then_frozen() {
    scenario(|mut rng, seed| async move {
        let mut rig = Rig::start("").await;
        let publisher = rig.publisher("s2");
        let (down, frozen) = pick(
            (Duration::from_secs(12), Duration::from_secs(8)),
            (Duration::from_secs(60), Duration::from_secs(30)),
        );
        sleep(rng.between(Duration::from_secs(2), Duration::from_secs(4))).await;
        rig.nats.stop();
        sleep(down).await;
        rig.nats.resume();
        sleep(rng.between(Duration::from_secs(3), Duration::from_secs(5))).await;

        // SIGSTOP: the TCP connection stays up and nothing answers. PubAcks already on the
        // wire may still land in the first moment; after that nothing may count as delivered.
        rig.nats.freeze();
        sleep(Duration::from_secs(1)).await;
        let forwarded = metric(&rig.gateway, "sahool_gateway_readings_forwarded_total");
        sleep(frozen.saturating_sub(Duration::from_secs(1))).await;
        let forwarded_frozen = metric(&rig.gateway, "sahool_gateway_readings_forwarded_total");
        rig.nats.thaw();
        sleep(Duration::from_secs(3)).await;
        let ledger = finish(publisher);
        let mut v = judge("2 NATS down+frozen", &rig, &ledger).await;
        v.row.note += &format!("stopped {}s, frozen {}s", down.as_secs(), frozen.as_secs());
        if forwarded_frozen != forwarded {
            v.problems.push(format!(
                "{} readings counted as forwarded while nats-server was frozen",
                forwarded_frozen - forwarded
            ));
        }
        check_accounts(&mut v, &rig.nats, &mut rig.gateway, true).await;
        Verdict::report(&[v], seed);
    });
}

#[test]
fn s3_mosquitto_restarted_mid_run() {
    scenario(|mut rng, seed| async move {
        let mut rig = Rig::start("").await;
        let publisher = rig.publisher("s3");
        let restarts = pick(2, 4);
        for _ in 0..restarts {
            sleep(rng.between(Duration::from_secs(3), Duration::from_secs(8))).await;
            rig.broker.stop();
            sleep(rng.between(Duration::from_millis(200), Duration::from_secs(2))).await;
            rig.broker.resume();
        }
        sleep(Duration::from_secs(3)).await;
        let ledger = finish(publisher);
        let mut v = judge("3 mosquitto restarts", &rig, &ledger).await;
        v.row.note += &format!(
            "{restarts} restarts; publisher reconnected {}x, re-sent {}",
            ledger.reconnects, ledger.resent
        );
        check_accounts(&mut v, &rig.nats, &mut rig.gateway, true).await;
        Verdict::report(&[v], seed);
    });
}

/// Scenario 4: the buffer bound reached during an outage, under each policy.
#[test]
fn s4_buffer_bound_during_an_outage() {
    scenario(|mut rng, seed| async move {
        let outage = pick(Duration::from_secs(10), Duration::from_secs(60));
        let mut verdicts = Vec::new();
        for policy in ["drop_oldest", "reject_new"] {
            let mut rig =
                Rig::start(&format!("max_bytes = \"64KiB\"\nwhen_full = \"{policy}\"")).await;
            let publisher = rig.publisher(&format!("s4-{policy}"));
            sleep(rng.between(Duration::from_secs(1), Duration::from_secs(3))).await;
            rig.nats.stop();
            let mut paused_seen = false;
            let until = Instant::now() + outage;
            while Instant::now() < until {
                paused_seen |= metric(&rig.gateway, "sahool_gateway_intake_paused") == 1.0;
                sleep(Duration::from_millis(200)).await;
            }
            let dropped = rig.gateway.metric(
                "sahool_gateway_readings_dropped_total",
                "reason=\"buffer_full\"",
            ) as usize;
            rig.nats.resume();
            sleep(Duration::from_secs(2)).await;
            let ledger = finish(publisher);
            let name = format!("4 bound, {policy}");
            let mut v = if policy == "drop_oldest" {
                // Exactly the counted readings may be missing, and they are the oldest of the
                // outage's backlog: one run of consecutive readings.
                let all: BTreeSet<usize> = ledger.acked_readings().collect();
                let mut v =
                    settle_and_judge(&name, &rig.nats, &rig.gateway, &ledger, &all, SETTLE).await;
                let missing = v.excused_missing.clone();
                let dropped_now = rig.gateway.metric(
                    "sahool_gateway_readings_dropped_total",
                    "reason=\"buffer_full\"",
                ) as usize;
                if missing.len() != dropped_now {
                    v.problems.push(format!(
                        "{} readings missing but {dropped_now} counted as dropped",
                        missing.len()
                    ));
                }
                if dropped == 0 {
                    v.problems.push("the bound was never reached".into());
                }
                if let (Some(lo), Some(hi)) = (missing.first(), missing.last()) {
                    if hi - lo + 1 != missing.len() {
                        v.problems.push(format!(
                            "missing readings are not the oldest run of the backlog: {} between {lo} and {hi}",
                            missing.len()
                        ));
                    }
                }
                v.row.note += &format!("dropped {} (counted {dropped_now})", missing.len());
                v
            } else {
                let mut v = judge(&name, &rig, &ledger).await;
                if !paused_seen {
                    v.problems.push("intake never paused at the bound".into());
                }
                if metric(&rig.gateway, "sahool_gateway_readings_dropped_total") != 0.0 {
                    v.problems.push("reject_new dropped readings".into());
                }
                v.row.note += "intake paused at the bound; broker held the rest";
                v
            };
            v.row.note = format!("outage {}s; {}", outage.as_secs(), v.row.note);
            check_accounts(&mut v, &rig.nats, &mut rig.gateway, true).await;
            verdicts.push(v);
        }
        Verdict::report(&verdicts, seed);
    });
}

#[test]
fn s5_disk_reserve_reached_then_space_returns() {
    scenario(|mut rng, seed| async move {
        let scratch = tempfile::tempdir().expect("scratch dir");
        // The data directory is known only once the gateway is configured; the reserve must be
        // in its config, so the config is written twice.
        let (nats, broker, mut gateway) = Rig::parts("", &[]).await;
        let disk = Disk::new(&gateway.data_dir(), scratch.path());
        let cfg = support::probe_config(
            &nats,
            &broker,
            &format!("min_free_disk = \"{}\"", disk.reserve),
            "",
        )
        .replacen("min_free_disk = \"1MiB\"\n", "", 1);
        gateway.rewrite_config(&cfg);
        gateway.resume();
        let mut rig = Rig {
            nats,
            broker,
            gateway,
        };
        rig.ready().await;
        let publisher = rig.publisher("s5");
        // A backlog first, so forwarding has something to do while intake is paused.
        sleep(rng.between(Duration::from_secs(1), Duration::from_secs(3))).await;
        rig.nats.stop();
        sleep(pick(Duration::from_secs(4), Duration::from_secs(20))).await;
        disk.fill_to(disk.reserve / 2);
        rig.gateway
            .wait_until("intake paused", Duration::from_secs(20), |g| {
                g.metric("sahool_gateway_intake_paused", "") == 1.0
            });
        let accepted = metric(&rig.gateway, "sahool_gateway_readings_accepted_total");
        let backlog = metric(&rig.gateway, "sahool_gateway_buffer_readings");
        rig.nats.resume();
        rig.gateway.wait_until(
            "backlog forwarded while intake paused",
            Duration::from_secs(60),
            |g| g.metric("sahool_gateway_buffer_readings", "") == 0.0,
        );
        let accepted_paused = metric(&rig.gateway, "sahool_gateway_readings_accepted_total");
        sleep(pick(Duration::from_secs(3), Duration::from_secs(20))).await;
        disk.free_up();
        rig.gateway
            .wait_until("intake resumed", Duration::from_secs(20), |g| {
                g.metric("sahool_gateway_intake_paused", "") == 0.0
            });
        sleep(Duration::from_secs(3)).await;
        let ledger = finish(publisher);
        let mut v = judge("5 disk reserve", &rig, &ledger).await;
        if accepted_paused != accepted {
            v.problems.push(format!(
                "{} readings accepted while free disk was below the reserve",
                accepted_paused - accepted
            ));
        }
        if backlog == 0.0 {
            v.problems.push("no backlog to forward while paused".into());
        }
        v.row.note += &format!("{}; {backlog} forwarded while paused", disk.kind());
        check_accounts(&mut v, &rig.nats, &mut rig.gateway, true).await;
        drop(rig);
        drop(disk);
        Verdict::report(&[v], seed);
    });
}

#[test]
fn s6_wall_clock_jumps_back_and_forth_by_hours() {
    scenario(|mut rng, seed| async move {
        let scratch = tempfile::tempdir().expect("scratch dir");
        let clock = Clock::new(scratch.path());
        let env = clock.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut rig = Rig::start_with("", &env).await;
        let real_start = now_ms() - 60_000;
        let publisher = rig.publisher("s6");
        let jumps = pick(6, 12);
        let mut offsets = Vec::new();
        for _ in 0..jumps {
            sleep(rng.between(Duration::from_secs(2), Duration::from_secs(5))).await;
            // Up to a day either way, in minutes.
            let minutes = rng.below(2 * 24 * 60) as i64 - 24 * 60;
            clock.set_offset_minutes(minutes);
            offsets.push(format!("{:+.1}h", minutes as f64 / 60.0));
        }
        clock.set_offset_minutes(0);
        sleep(Duration::from_secs(2)).await;
        let ledger = finish(publisher);
        let mut v = judge("6 clock jumps", &rig, &ledger).await;
        let real_end = now_ms() + 60_000;
        // Device times are kept as sent, whatever the gateway's clock said meanwhile; the
        // envelope's time (when the gateway stored the reading) shows the jumps took effect.
        let mut moved = 0;
        let mut stored_off_clock = 0;
        rig.nats
            .visit_stream("SAHOOL_IOT", |m| {
                let p = &m.body["payload"];
                if m.body["event_type"] != "sensor_reading" {
                    return;
                }
                let stored = m.body["timestamp"].as_str().unwrap_or_default();
                let stored = sahool_gateway::reading::Timestamp::parse_rfc3339(stored)
                    .expect("envelope timestamp")
                    .unix_millis();
                if !(real_start..real_end).contains(&stored) {
                    stored_off_clock += 1;
                }
                let n = p["value"].as_f64().unwrap_or(-1.0) as usize;
                let (_, sent) = probe_reading(n);
                let sent: serde_json::Value = serde_json::from_slice(&sent).expect("payload");
                let ms = sent["timestamp"].as_i64().expect("timestamp");
                let at = sahool_gateway::reading::Timestamp::from_unix_millis(ms).to_rfc3339();
                if p["timestamp"] != at.as_str() {
                    moved += 1;
                }
            })
            .await;
        if moved > 0 {
            v.problems.push(format!(
                "{moved} readings carry another time than their device sent"
            ));
        }
        if stored_off_clock == 0 {
            v.problems.push(
                "no reading was stored under a jumped clock: libfaketime had no effect".into(),
            );
        }
        v.row.note += &format!(
            "offsets {}; {stored_off_clock} stored off the real clock",
            offsets.join(" ")
        );
        check_accounts(&mut v, &rig.nats, &mut rig.gateway, true).await;
        Verdict::report(&[v], seed);
    });
}

#[test]
fn s7_buffer_file_damaged_while_stopped() {
    scenario(|mut rng, seed| async move {
        let mut rig = Rig::start("").await;
        let publisher = rig.publisher("s7");
        let rounds = pick(4, 10);
        let db = rig.gateway.data_dir().join("buffer.db");
        let mut excused = BTreeSet::new();
        let mut kinds = Vec::new();
        // Every kind of damage in every four rounds, from a random start.
        let first_kind = rng.below(Damage::ALL.len() as u64) as usize;
        for round in 0..rounds {
            sleep(rng.between(Duration::from_secs(2), Duration::from_secs(5))).await;
            // Every other round with NATS down for a moment, so the file holds a backlog.
            let outage = round % 2 == 1;
            if outage {
                rig.nats.stop();
                sleep(rng.between(Duration::from_secs(1), Duration::from_secs(2))).await;
            }
            assert_eq!(rig.gateway.terminate(), Some(0), "SIGTERM exits 0");
            // What the damaged file still held is lost by design (moved aside, alarmed).
            excused.extend(faults::pending_readings(&db));
            let damage = Damage::ALL[(first_kind + round) % Damage::ALL.len()];
            damage.apply(&db, &mut rng);
            kinds.push(format!("{damage:?}"));
            if outage {
                rig.nats.resume();
            }
            rig.gateway.resume();
            rig.ready().await;
            let recovered = metric(
                &rig.gateway,
                "sahool_gateway_store_corruption_recovered_total",
            );
            assert_eq!(
                recovered,
                1.0,
                "{damage:?}: the damaged file is moved aside and counted\n{}",
                rig.gateway.log()
            );
        }
        sleep(Duration::from_secs(2)).await;
        let ledger = finish(publisher);
        let mut v = settle_and_judge(
            "7 damaged buffer",
            &rig.nats,
            &rig.gateway,
            &ledger,
            &excused,
            SETTLE,
        )
        .await;
        let aside = std::fs::read_dir(rig.gateway.data_dir())
            .expect("data dir")
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("buffer.db.corrupt-")
                    && !name.ends_with("-wal")
                    && !name.ends_with("-shm")
            })
            .count();
        if aside != rounds {
            v.problems.push(format!(
                "{rounds} damaged files but {aside} kept aside for inspection"
            ));
        }
        v.row.note += &format!(
            "{}; {} pending in damaged files, {} of them missing",
            kinds.join(" "),
            excused.len(),
            v.excused_missing.len()
        );
        check_accounts(&mut v, &rig.nats, &mut rig.gateway, false).await;
        Verdict::report(&[v], seed);
    });
}

#[test]
fn s8_soak_with_nats_flapping() {
    scenario(|mut rng, seed| async move {
        let mut rig = Rig::start("").await;
        let (run, every, rate) = pick(
            (Duration::from_secs(40), Duration::from_secs(10), 300.0),
            (Duration::from_secs(600), Duration::from_secs(60), 1000.0),
        );
        let publisher = Steady::start(rig.broker.port, "s8", rate, 0, probe_reading);
        sleep(Duration::from_secs(3)).await;
        let pid = rig.gateway.pid().expect("gateway running");
        let (rss_start, fds_start) = faults::process_figures(pid);
        let started = Instant::now();
        let mut flaps = 0;
        // RSS before each flap, to tell a warming cache (flattening) from a leak (a slope).
        let mut rss_curve = Vec::new();
        while started.elapsed() + every <= run {
            sleep(every.saturating_sub(Duration::from_secs(3))).await;
            rss_curve.push((faults::process_figures(pid).0 / 1024).to_string());
            rig.nats.stop();
            flaps += 1;
            sleep(rng.between(Duration::from_secs(1), Duration::from_secs(3))).await;
            rig.nats.resume();
        }
        sleep(run.saturating_sub(started.elapsed())).await;
        let ledger = finish(publisher);
        let mut v = judge("8 soak", &rig, &ledger).await;
        let (rss_end, fds_end) = faults::process_figures(pid);
        v.row.note += &format!(
            "{}s at {rate}/s, {flaps} NATS flaps; RSS {} -> {} MiB (before each flap: {}), fds {fds_start} -> {fds_end}",
            run.as_secs(),
            rss_start / 1024,
            rss_end / 1024,
            rss_curve.join(" ")
        );
        if fds_end > fds_start + 8 {
            v.problems
                .push(format!("open files grew from {fds_start} to {fds_end}"));
        }
        // Generous: the page cache and allocator settle in the first minutes; a leak at this
        // rate grows without bound.
        if rss_end > rss_start * 2 + 64 * 1024 {
            v.problems
                .push(format!("RSS grew from {rss_start} KiB to {rss_end} KiB"));
        }
        check_accounts(&mut v, &rig.nats, &mut rig.gateway, true).await;
        Verdict::report(&[v], seed);
    });
}

/// Everything at once: kills, NATS stopped and frozen, broker restarts, at random.
#[test]
fn s9_storm_of_mixed_faults() {
    scenario(|mut rng, seed| async move {
        let mut rig = Rig::start("").await;
        let publisher = rig.publisher("s9");
        let run = pick(Duration::from_secs(30), Duration::from_secs(120));
        let started = Instant::now();
        let mut faults = Vec::new();
        while started.elapsed() < run {
            sleep(rng.between(Duration::from_millis(500), Duration::from_secs(3))).await;
            let hold = rng.between(Duration::from_millis(200), Duration::from_secs(3));
            match rng.below(4) {
                0 => {
                    faults.push("kill");
                    rig.gateway.kill9();
                    sleep(hold / 4).await;
                    rig.gateway.resume();
                }
                1 => {
                    faults.push("nats-stop");
                    rig.nats.stop();
                    sleep(hold).await;
                    rig.nats.resume();
                }
                2 => {
                    faults.push("nats-freeze");
                    rig.nats.freeze();
                    sleep(hold).await;
                    rig.nats.thaw();
                }
                _ => {
                    faults.push("broker-restart");
                    rig.broker.stop();
                    sleep(hold / 2).await;
                    rig.broker.resume();
                }
            }
        }
        sleep(Duration::from_secs(2)).await;
        let ledger = finish(publisher);
        let mut v = judge("9 storm", &rig, &ledger).await;
        v.row.note += &format!("{} faults: {}", faults.len(), faults.join(" "));
        check_accounts(&mut v, &rig.nats, &mut rig.gateway, true).await;
        Verdict::report(&[v], seed);
    });
}
