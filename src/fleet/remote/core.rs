//! The sans-IO core of remote config: KV revisions, probation outcomes and the start in, the
//! actions that carry them out (write a file, persist the memory, apply a config, report an
//! outcome) back. The driver (`super`) does the I/O, in the order the actions come.
//!
//! # Invariants
//! 1. A revision is acted on at most once: at or below [`Memory::last_revision`] it is
//!    ignored, and every action on a revision persists `last_revision` before applying it.
//! 2. The running config is never touched by a revision that does not parse and check as
//!    `validate` would, nor by one that changes what needs a restart.
//! 3. A revision's file is written (atomically) before the memory names it as trial, and the
//!    memory names it as trial before it is applied: a restart at any step finds either the
//!    previous state, or a trial, which it rolls back.
//! 4. Only the memory says which revision is good; a file is removed only once the memory no
//!    longer names it.
//! 5. An outcome is reported (into the outbox) before the memory is updated past it: a crash
//!    in between reports twice, never never.
//! 6. A probation watches its whole period: the driver samples the health every
//!    [`SAMPLE_EVERY`]; a part failing (and not failing before) in any sample after
//!    [`GRACE`] rolls the revision back at once, and the sample at the end counts whatever
//!    the grace, so a part that fails and recovers within the probation does not pass.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::common::status::StatusReport;
use crate::config::{self, Config};

/// How often the driver samples the health during a probation.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// How long after the apply a failing part is forgiven: the sources the revision restarted
/// need a moment to connect (an MQTT session on the farm's network or a serial port's first
/// poll take well under a second; a TLS handshake over a cellular link a few seconds), while a
/// broken one shows within it (refused, unreachable, timed out). A probation shorter than
/// this is judged on its last sample alone.
pub(crate) const GRACE: Duration = Duration::from_secs(10);

/// What the gateway remembers of remote config across restarts (the driver keeps it in a
/// small state file, written atomically).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Memory {
    /// The newest revision acted on (applied, rejected or rolled back).
    pub(crate) last_revision: u64,
    /// The last known good remote revision; its text is in its revision file.
    pub(crate) good: Option<u64>,
    /// A revision under probation. Found at start, it is rolled back: the gateway stopped
    /// during its probation, which it did not pass.
    pub(crate) trial: Option<u64>,
}

/// How a revision ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Status {
    Applied,
    Rejected,
    RolledBack,
}

/// One `sahool.iot.gateway.config` event (`contracts/gateway_config.v1.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Outcome {
    pub(crate) status: Status,
    pub(crate) revision: u64,
    pub(crate) reason: String,
    /// The check that failed: `validate`, `restart_required`, a health part such as
    /// `source farm` or `nats`, `restart` (the gateway stopped during probation) or `sighup`
    /// (a local reload during probation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) check: Option<String>,
}

/// What the driver does, in order.
#[derive(Debug)]
pub(crate) enum Action {
    /// Log that a revision was ignored (not newer than `last`).
    Ignore { revision: u64, last: u64 },
    /// Write the revision's text to its file, atomically.
    WriteFile { revision: u64, text: String },
    /// Write the memory to the state file, atomically.
    Persist(Memory),
    /// Apply this revision's config as SIGHUP does, and wait until it is.
    Apply(Box<Config>),
    /// Apply the config a failed revision replaced, the same way.
    RollBack(Box<Config>),
    /// Sample the gateway's health every [`SAMPLE_EVERY`] into [`Core::probation_sample`]
    /// until it returns actions.
    Probation { revision: u64 },
    /// Remove a revision's file (no longer named by the memory).
    Remove { revision: u64 },
    /// Put the outcome into the outbox.
    Report(Outcome),
}

/// The parts of the gateway that can fail, each with its problem, `None` while it works:
/// `nats`, `watchdog` (the pipeline's progress check, which feeds systemd's watchdog),
/// `source <name>` (configured MQTT sources and serial ports), `listener <name>`, `commands`,
/// and `dead_letters <reason>` for each reason with dead-letters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Health(pub(crate) BTreeMap<String, Option<String>>);

impl Health {
    /// The health `report` shows of the parts `config` declares.
    pub(crate) fn of(report: &StatusReport, config: &Config) -> Self {
        let mut parts = BTreeMap::new();
        let nats = match (&report.nats_connected, &report.nats_problem) {
            (true, _) => None,
            (false, p) => Some(p.clone().unwrap_or_else(|| "not connected".into())),
        };
        parts.insert("nats".to_string(), nats);
        parts.insert(
            "watchdog".to_string(),
            (!report.pipeline_progressing)
                .then(|| "the pipeline made no progress: watchdog not fed".to_string()),
        );
        let declared: Vec<&str> = config
            .mqtt
            .iter()
            .map(|m| m.name.as_str())
            .chain(config.serial.iter().map(|s| s.name.as_str()))
            .collect();
        for s in report
            .sources
            .iter()
            .filter(|s| declared.contains(&s.name.as_str()))
        {
            let problem = (!s.up).then(|| s.problem.clone().unwrap_or_else(|| "down".into()));
            parts.insert(format!("source {}", s.name), problem);
        }
        // A declared source that has not reported yet has not come up.
        for name in declared {
            parts
                .entry(format!("source {name}"))
                .or_insert_with(|| Some("not started".into()));
        }
        for l in &report.listeners {
            parts.insert(
                format!("listener {}", l.name),
                (!l.bound).then(|| "not bound".to_string()),
            );
        }
        if let Some(c) = &report.commands {
            parts.insert("commands".into(), c.clone().err());
        }
        for (reason, n) in &report.dead_letters_by_reason {
            if *n > 0 {
                parts.insert(
                    format!("dead_letters {reason}"),
                    Some(format!("{n} dead-lettered")),
                );
            }
        }
        Self(parts)
    }

    /// The first part failing now that did not fail `before` (a part new since then counts as
    /// working before): its name and problem.
    pub(crate) fn new_failure(&self, before: &Health) -> Option<(String, String)> {
        self.0.iter().find_map(|(part, problem)| {
            let problem = problem.as_ref()?;
            let failed_before = before.0.get(part).is_some_and(Option::is_some);
            (!failed_before).then(|| (part.clone(), problem.clone()))
        })
    }
}

/// A revision under probation.
struct Trial {
    revision: u64,
    /// The config it replaced, to roll back to.
    previous: Box<Config>,
    /// The health before it was applied.
    baseline: Health,
}

pub(crate) struct Core {
    memory: Memory,
    trial: Option<Trial>,
    /// How long a revision is watched before it is kept (`[fleet] probation`).
    probation: Duration,
    /// Where revision `r`'s file is (for the config's origin).
    dir: PathBuf,
}

/// The file a revision's text is kept in, under the driver's directory.
pub(crate) fn revision_file(dir: &std::path::Path, revision: u64) -> PathBuf {
    dir.join(format!("revision-{revision}.toml"))
}

/// Why a remote config cannot replace `running` without a restart, if it cannot.
pub(crate) fn needs_restart(new: &Config, running: &Config) -> Option<String> {
    let changed: Vec<&str> = [
        ("[gateway]", new.gateway != running.gateway),
        ("[buffer]", new.buffer != running.buffer),
        ("[http]", new.http != running.http),
        (
            "[fleet] config_bucket",
            new.fleet.config_bucket != running.fleet.config_bucket,
        ),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect();
    (!changed.is_empty()).then(|| {
        format!(
            "{} changed: only a restart applies it, so remote config may not change it (edit the local file)",
            changed.join(", ")
        )
    })
}

/// Why a revision is refused: the check that failed (`validate` or `restart_required`) and
/// what it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) check: &'static str,
    pub(crate) reason: String,
}

/// A revision's text as the gateway would take it in place of `running`: parsed and checked
/// as `validate` checks a file, changing nothing that needs a restart. `doctor` asks the same.
pub(crate) fn vet(text: &str, running: &Config) -> Result<Config, Refusal> {
    let new = config::parse(text).map_err(|problems| Refusal {
        check: "validate",
        reason: problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("; "),
    })?;
    match needs_restart(&new, running) {
        Some(reason) => Err(Refusal {
            check: "restart_required",
            reason,
        }),
        None => Ok(new),
    }
}

impl Core {
    /// Starts from what was remembered. A trial found here did not pass its probation: it is
    /// reported rolled back and forgotten (the caller started from the good config).
    pub(crate) fn start(memory: Memory, dir: PathBuf, probation: Duration) -> (Self, Vec<Action>) {
        let mut core = Self {
            memory,
            trial: None,
            probation,
            dir,
        };
        let mut actions = Vec::new();
        if let Some(revision) = core.memory.trial.take() {
            actions.push(Action::Report(Outcome {
                status: Status::RolledBack,
                revision,
                reason: "the gateway stopped during the revision's probation; it started again from the last known good config".into(),
                check: Some("restart".into()),
            }));
            actions.push(Action::Persist(core.memory.clone()));
            if core.memory.good != Some(revision) {
                actions.push(Action::Remove { revision });
            }
        }
        (core, actions)
    }

    pub(crate) fn memory(&self) -> &Memory {
        &self.memory
    }

    /// A new KV entry: `running` is the config in force, `health` the gateway's now.
    pub(crate) fn revision(
        &mut self,
        revision: u64,
        text: &str,
        running: &Config,
        health: Health,
    ) -> Vec<Action> {
        let last = self.memory.last_revision;
        if revision <= last || self.trial.is_some() {
            return vec![Action::Ignore { revision, last }];
        }
        let new = match vet(text, running) {
            Ok(c) => c,
            Err(refusal) => return self.reject(revision, refusal.reason, refusal.check),
        };
        let mut new = Box::new(new);
        new.origin = config::Origin {
            file: Some(revision_file(&self.dir, revision)),
            remote_revision: Some(revision),
        };
        self.memory.last_revision = revision;
        self.memory.trial = Some(revision);
        self.trial = Some(Trial {
            revision,
            previous: Box::new(running.clone()),
            baseline: health,
        });
        vec![
            Action::WriteFile {
                revision,
                text: text.to_string(),
            },
            Action::Persist(self.memory.clone()),
            Action::Apply(new),
            Action::Probation { revision },
        ]
    }

    fn reject(&mut self, revision: u64, reason: String, check: &str) -> Vec<Action> {
        self.memory.last_revision = revision;
        vec![
            Action::Report(Outcome {
                status: Status::Rejected,
                revision,
                reason,
                check: Some(check.into()),
            }),
            Action::Persist(self.memory.clone()),
        ]
    }

    /// A reload from the local side (SIGHUP) replaced the config during the probation: it
    /// already runs the last known good config (the precedence), so the trial ends rolled back
    /// without applying anything.
    pub(crate) fn superseded(&mut self) -> Vec<Action> {
        let Some(trial) = self.trial.take() else {
            return Vec::new();
        };
        self.memory.trial = None;
        vec![
            Action::Report(Outcome {
                status: Status::RolledBack,
                revision: trial.revision,
                reason: "a reload (SIGHUP) during the probation applied the last known good config"
                    .into(),
                check: Some("sighup".into()),
            }),
            Action::Persist(self.memory.clone()),
            Action::Remove {
                revision: trial.revision,
            },
        ]
    }

    /// A health sample `elapsed` after the apply. Within the [`GRACE`] a failing part is
    /// forgiven; after it, a part failing that did not fail before rolls the revision back at
    /// once. Once the probation is over, the revision is kept if this last sample shows no
    /// new failure, else rolled back. Nothing to do yet: no actions.
    pub(crate) fn probation_sample(&mut self, elapsed: Duration, health: Health) -> Vec<Action> {
        let Some(trial) = &self.trial else {
            return Vec::new();
        };
        let failure = health.new_failure(&trial.baseline);
        let over = elapsed >= self.probation;
        match failure {
            Some((part, problem)) if over || elapsed >= GRACE => {
                self.roll_back(part, problem, elapsed)
            }
            None if over => self.keep(),
            _ => Vec::new(),
        }
    }

    /// The probation passed: the revision becomes the last known good.
    fn keep(&mut self) -> Vec<Action> {
        let Some(trial) = self.trial.take() else {
            return Vec::new();
        };
        let revision = trial.revision;
        self.memory.trial = None;
        let previous_good = self.memory.good.replace(revision);
        let mut actions = vec![
            Action::Report(Outcome {
                status: Status::Applied,
                revision,
                reason: "kept after its probation: every part up or as before throughout".into(),
                check: None,
            }),
            Action::Persist(self.memory.clone()),
        ];
        actions.extend(previous_good.map(|revision| Action::Remove { revision }));
        actions
    }

    /// `part` failed `elapsed` after the apply: back to the config the revision replaced.
    fn roll_back(&mut self, part: String, problem: String, elapsed: Duration) -> Vec<Action> {
        let Some(trial) = self.trial.take() else {
            return Vec::new();
        };
        let revision = trial.revision;
        self.memory.trial = None;
        vec![
            Action::RollBack(trial.previous),
            Action::Report(Outcome {
                status: Status::RolledBack,
                revision,
                reason: format!(
                    "{part} failed during probation, {}s after the apply: {problem}",
                    elapsed.as_secs()
                ),
                check: Some(part),
            }),
            Action::Persist(self.memory.clone()),
            Action::Remove { revision },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::MINIMAL;

    const PROBATION: Duration = Duration::from_secs(120);

    fn running() -> Config {
        config::parse(MINIMAL).unwrap()
    }

    fn healthy() -> Health {
        Health([("nats".to_string(), None)].into())
    }

    fn core(memory: Memory) -> Core {
        let (core, actions) = Core::start(memory, PathBuf::from("/d"), PROBATION);
        assert!(actions.is_empty());
        core
    }

    fn with_source(extra_port: u16) -> String {
        format!(
            "{MINIMAL}\n[[mqtt]]\nname = \"farm\"\nurl = \"mqtt://127.0.0.1:{extra_port}\"\ntopics = [\"x/#\"]\nformat = \"json\"\n"
        )
    }

    fn kinds(actions: &[Action]) -> Vec<&'static str> {
        actions
            .iter()
            .map(|a| match a {
                Action::Ignore { .. } => "ignore",
                Action::WriteFile { .. } => "write",
                Action::Persist(_) => "persist",
                Action::Apply(_) => "apply",
                Action::RollBack(_) => "roll back",
                Action::Probation { .. } => "probation",
                Action::Remove { .. } => "remove",
                Action::Report(_) => "report",
            })
            .collect()
    }

    fn outcome(actions: &[Action]) -> &Outcome {
        actions
            .iter()
            .find_map(|a| match a {
                Action::Report(o) => Some(o),
                _ => None,
            })
            .expect("an outcome")
    }

    #[test]
    fn a_good_revision_is_written_remembered_applied_then_kept() {
        let mut c = core(Memory::default());
        let a = c.revision(7, &with_source(1883), &running(), healthy());
        assert_eq!(kinds(&a), ["write", "persist", "apply", "probation"]);
        let Action::Apply(applied) = &a[2] else {
            unreachable!()
        };
        assert_eq!(applied.origin.remote_revision, Some(7));
        assert_eq!(
            applied.origin.file.as_deref(),
            Some(std::path::Path::new("/d/revision-7.toml"))
        );
        assert_eq!(c.memory().trial, Some(7));
        assert_eq!(c.memory().last_revision, 7);
        // A revision arriving during probation waits (the driver holds it back).
        let a = c.revision(8, &with_source(1883), &running(), healthy());
        assert!(matches!(a[..], [Action::Ignore { .. }]));
        let mut now = healthy();
        now.0.insert("source farm".into(), None);
        let a = c.probation_sample(PROBATION, now);
        assert_eq!(kinds(&a), ["report", "persist"]);
        assert_eq!(outcome(&a).status, Status::Applied);
        assert_eq!(
            c.memory(),
            &Memory {
                last_revision: 7,
                good: Some(7),
                trial: None
            }
        );
        // The next good one replaces it and its file goes.
        let a = c.revision(9, &with_source(1884), &running(), healthy());
        assert_eq!(kinds(&a), ["write", "persist", "apply", "probation"]);
        let a = c.probation_sample(PROBATION, healthy());
        assert_eq!(kinds(&a), ["report", "persist", "remove"]);
        assert!(matches!(a[2], Action::Remove { revision: 7 }));
    }

    #[test]
    fn older_and_equal_revisions_are_ignored() {
        let mut c = core(Memory {
            last_revision: 5,
            good: Some(5),
            trial: None,
        });
        for r in [3, 5] {
            let a = c.revision(r, &with_source(1883), &running(), healthy());
            assert!(matches!(a[..], [Action::Ignore { last: 5, .. }]), "{a:?}");
        }
    }

    #[test]
    fn a_revision_that_does_not_validate_is_rejected_and_remembered() {
        let mut c = core(Memory::default());
        let a = c.revision(2, "[gateway]\nid = \"gw-1\"\n", &running(), healthy());
        assert_eq!(kinds(&a), ["report", "persist"]);
        let o = outcome(&a);
        assert_eq!(
            (o.status, o.check.as_deref()),
            (Status::Rejected, Some("validate"))
        );
        assert!(o.reason.contains("missing section [nats]"), "{}", o.reason);
        assert_eq!(c.memory().last_revision, 2);
        assert_eq!(c.memory().good, None);
        assert_eq!(c.memory().trial, None);
    }

    #[test]
    fn sections_that_need_a_restart_are_refused_remotely() {
        let mut c = core(Memory::default());
        let text = format!(
            "{MINIMAL}\n[buffer]\nmax_bytes = \"1MiB\"\n[http]\nlisten = \"127.0.0.1:9\"\n"
        );
        let a = c.revision(3, &text, &running(), healthy());
        let o = outcome(&a);
        assert_eq!(o.check.as_deref(), Some("restart_required"));
        assert!(
            o.reason.starts_with("[buffer], [http] changed"),
            "{}",
            o.reason
        );
        let text = format!("{MINIMAL}\n[fleet]\nconfig_bucket = \"other\"\n");
        let a = c.revision(4, &text, &running(), healthy());
        assert!(outcome(&a).reason.contains("config_bucket"));
    }

    #[test]
    fn a_part_that_fails_in_probation_rolls_back_to_the_previous_config() {
        let mut c = core(Memory {
            last_revision: 1,
            good: Some(1),
            trial: None,
        });
        let before = running();
        c.revision(4, &with_source(1), &before, healthy());
        let mut now = healthy();
        now.0
            .insert("source farm".into(), Some("connection refused".into()));
        let a = c.probation_sample(PROBATION, now);
        assert_eq!(kinds(&a), ["roll back", "report", "persist", "remove"]);
        let Action::RollBack(back) = &a[0] else {
            unreachable!()
        };
        assert_eq!(back.text_hash, before.text_hash);
        let o = outcome(&a);
        assert_eq!(o.status, Status::RolledBack);
        assert_eq!(o.check.as_deref(), Some("source farm"));
        assert!(o.reason.contains("connection refused"));
        assert_eq!(
            c.memory(),
            &Memory {
                last_revision: 4,
                good: Some(1),
                trial: None
            }
        );
    }

    fn failing(part: &str) -> Health {
        let mut h = healthy();
        h.0.insert(part.into(), Some("connection refused".into()));
        h
    }

    #[test]
    fn a_part_failing_at_any_sample_after_the_grace_rolls_back_at_once() {
        let mut c = core(Memory::default());
        c.revision(2, &with_source(1), &running(), healthy());
        let secs = Duration::from_secs;
        // Sources connecting: forgiven within the grace.
        for t in 1..GRACE.as_secs() {
            assert!(c
                .probation_sample(secs(t), failing("source farm"))
                .is_empty());
        }
        assert!(c.probation_sample(GRACE, healthy()).is_empty());
        assert!(c.probation_sample(secs(30), healthy()).is_empty());
        // Fails once mid-probation (it would recover by the end): rolled back now.
        let a = c.probation_sample(secs(31), failing("source farm"));
        assert_eq!(kinds(&a), ["roll back", "report", "persist", "remove"]);
        let o = outcome(&a);
        assert_eq!(
            (o.status, o.check.as_deref()),
            (Status::RolledBack, Some("source farm"))
        );
        assert!(o.reason.contains("31s after the apply"), "{}", o.reason);
        assert_eq!(c.memory().trial, None);
        // The trial is over: later samples change nothing.
        assert!(c.probation_sample(PROBATION, healthy()).is_empty());
    }

    #[test]
    fn the_last_sample_counts_whatever_the_grace() {
        let short = Duration::from_secs(2);
        let start = |c: &mut Core| {
            c.revision(2, &with_source(1), &running(), healthy());
        };
        let (mut c, _) = Core::start(Memory::default(), PathBuf::from("/d"), short);
        start(&mut c);
        assert!(c
            .probation_sample(Duration::from_secs(1), failing("source farm"))
            .is_empty());
        let a = c.probation_sample(short, failing("source farm"));
        assert_eq!(outcome(&a).status, Status::RolledBack);
        let (mut c, _) = Core::start(Memory::default(), PathBuf::from("/d"), short);
        start(&mut c);
        let a = c.probation_sample(short, healthy());
        assert_eq!(outcome(&a).status, Status::Applied);
        assert_eq!(c.memory().good, Some(2));
    }

    #[test]
    fn a_sighup_during_probation_ends_it_rolled_back() {
        let mut c = core(Memory::default());
        c.revision(2, &with_source(1883), &running(), healthy());
        let a = c.superseded();
        assert_eq!(kinds(&a), ["report", "persist", "remove"]);
        let o = outcome(&a);
        assert_eq!(
            (o.status, o.check.as_deref()),
            (Status::RolledBack, Some("sighup"))
        );
        assert_eq!(c.memory().trial, None);
        assert_eq!(c.memory().good, None);
        assert!(c.probation_sample(PROBATION, healthy()).is_empty());
        assert!(c.superseded().is_empty());
    }

    #[test]
    fn what_failed_before_may_go_on_failing_but_nothing_new() {
        let before = Health(
            [
                ("nats".to_string(), Some("down".to_string())),
                ("source a".to_string(), None),
            ]
            .into(),
        );
        let mut now = before.clone();
        assert_eq!(now.new_failure(&before), None);
        now.0.insert(
            "dead_letters out_of_range".into(),
            Some("3 dead-lettered".into()),
        );
        assert_eq!(
            now.new_failure(&before).map(|(p, _)| p).as_deref(),
            Some("dead_letters out_of_range")
        );
        let mut now = before.clone();
        now.0.insert("source a".into(), Some("down".into()));
        assert_eq!(
            now.new_failure(&before).map(|(p, _)| p).as_deref(),
            Some("source a")
        );
    }

    #[test]
    fn a_trial_found_at_start_is_rolled_back_and_reported() {
        let (c, a) = Core::start(
            Memory {
                last_revision: 6,
                good: Some(2),
                trial: Some(6),
            },
            PathBuf::from("/d"),
            PROBATION,
        );
        assert_eq!(kinds(&a), ["report", "persist", "remove"]);
        let o = outcome(&a);
        assert_eq!((o.status, o.revision), (Status::RolledBack, 6));
        assert_eq!(o.check.as_deref(), Some("restart"));
        assert_eq!(
            c.memory(),
            &Memory {
                last_revision: 6,
                good: Some(2),
                trial: None
            }
        );
    }

    #[test]
    fn health_counts_only_declared_sources_and_waits_for_them() {
        let m = crate::common::metrics::Metrics::new();
        m.set_serial_state("old-port", Err("gone".into()));
        let report = StatusReport::from_metrics(&m);
        let h = Health::of(&report, &config::parse(&with_source(1)).unwrap());
        assert_eq!(h.0.get("source old-port"), None);
        assert_eq!(h.0["source farm"].as_deref(), Some("not started"));
        assert_eq!(h.0["nats"].as_deref(), Some("not connected"));
        assert_eq!(h.0["watchdog"], None);
        m.set_pipeline_progressing(false);
        let report = StatusReport::from_metrics(&m);
        let stalled = Health::of(&report, &config::parse(&with_source(1)).unwrap());
        assert_eq!(
            stalled.new_failure(&h).map(|(p, _)| p).as_deref(),
            Some("watchdog")
        );
    }
}
