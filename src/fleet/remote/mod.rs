//! Remote config (DESIGN §9): the whole gateway TOML in a NATS KV bucket
//! (`[fleet] config_bucket`), key `{gateway_id}`. A new revision is checked as `validate`
//! checks a file, written beside the gateway's data, applied the way SIGHUP applies a file,
//! and watched for `[fleet] probation`; then kept as the last known good, or rolled back. Each
//! outcome is a `sahool.iot.gateway.config` event through the outbox
//! (`contracts/gateway_config.v1.json`).
//!
//! [`core`] decides (sans-IO); [`kv`] makes the KV requests, each on a subject naming the key
//! (least privilege); this file carries the core's actions out: the watch, the files, the
//! reload, the health samples and the events.
//!
//! # On disk
//! `<data_dir>/remote/` (the data directory, because the service may not write `/etc`):
//! `state.json` (the core's [`Memory`]: last revision acted on, the good one, a trial) and
//! `revision-<N>.toml` for the good revision and a trial. Both written atomically (temp,
//! fsync, rename, folder fsync); the state file alone says which revision is what.
//!
//! # Invariants
//! 1. The gateway never waits for KV: it starts from [`choose`] (the last known good remote
//!    revision, or the local file) and watches KV in the background, reconnecting with
//!    backoff, logging at most a line a minute while KV cannot be reached.
//! 2. At most one revision is under probation; revisions arriving meanwhile wait in order and
//!    the core ignores those not newer than the last one acted on.
//! 3. A stop during probation (SIGKILL, power cut, SIGTERM) leaves the trial in the state file;
//!    the next start runs the good config and reports the trial rolled back. A SIGHUP during
//!    probation applies the good config (the precedence) and ends the trial rolled back.
//!
//! # Precedence
//! With `config_bucket` set, the last known good remote revision is in force over the local
//! file, at start and on SIGHUP alike ([`choose`]); the local file is the bootstrap and the
//! fallback. Its `[gateway]`, `[buffer]`, `[http]` and `config_bucket` always win: a remote
//! revision that differs there is refused, and a kept one that no longer matches an edited
//! local file is set aside.

pub(crate) mod core;
pub(crate) mod kv;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};

use self::core::{
    needs_restart, revision_file, Action, Core, Health, Memory, Outcome, SAMPLE_EVERY,
};
use crate::common::backoff::Backoff;
use crate::common::files;
use crate::common::log_limit::LogLimit;
use crate::common::metrics::Metrics;
use crate::common::status::StatusReport;
use crate::config::{self, Config};
use crate::reading::KIND_CONFIG;
use crate::store::StoreHandle;
use crate::uplink::nats::Connector;

/// A config for the app to apply as it applies a SIGHUP's; `done` once it is.
pub(crate) struct Apply {
    pub(crate) config: Config,
    /// What the log names as the reload's cause.
    pub(crate) cause: String,
    pub(crate) done: oneshot::Sender<()>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RemoteError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a remote config state file ({source})", path.display())]
    State {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Why the KV watch left a link; the next one starts after a backoff.
#[derive(Debug, thiserror::Error)]
enum Lost {
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    #[error(transparent)]
    Kv(kv::KvError),
    #[error("the watch ended (link lost)")]
    Ended,
}

/// Where remote config keeps its files.
pub(crate) fn dir(config: &Config) -> PathBuf {
    config.gateway.data_dir.join("remote")
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

/// The remembered state; nothing remembered yet is the default.
pub(crate) fn load_memory(dir: &Path) -> Result<Memory, RemoteError> {
    let path = state_path(dir);
    match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|source| RemoteError::State { path, source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Memory::default()),
        Err(source) => Err(RemoteError::Io { path, source }),
    }
}

fn persist(dir: &Path, memory: &Memory) -> Result<(), RemoteError> {
    create_dir(dir)?;
    let path = state_path(dir);
    let bytes = serde_json::to_vec_pretty(memory).unwrap_or_default();
    files::write_atomic(&path, &bytes).map_err(|source| RemoteError::Io { path, source })
}

/// The folder, made on first use (a rejection may be the first thing remembered).
fn create_dir(dir: &Path) -> Result<(), RemoteError> {
    std::fs::create_dir_all(dir).map_err(|source| RemoteError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn write_revision(dir: &Path, revision: u64, text: &str) -> Result<(), RemoteError> {
    create_dir(dir)?;
    let path = revision_file(dir, revision);
    files::write_atomic(&path, text.as_bytes()).map_err(|source| RemoteError::Io { path, source })
}

/// The config to run, from the local file's: the last known good remote revision when remote
/// config is on and one was kept (see the precedence above), else the local one. Used at start
/// and on SIGHUP.
pub fn choose(local: Config) -> Config {
    if local.fleet.config_bucket.is_none() {
        return local;
    }
    let dir = dir(&local);
    let good = match load_memory(&dir) {
        Ok(m) => m.good,
        Err(e) => {
            tracing::error!(error = %e, "remote config: state unreadable; running the local file");
            return local;
        }
    };
    let Some(revision) = good else {
        return local;
    };
    match config::load(&revision_file(&dir, revision)) {
        Ok(mut remote) => {
            if let Some(why) = needs_restart(&remote, &local) {
                tracing::warn!(revision, reason = %why, "remote config: the local file changed what remote config may not; running the local file");
                return local;
            }
            remote.origin.remote_revision = Some(revision);
            remote
        }
        Err(e) => {
            tracing::error!(revision, error = %e, "remote config: the last known good revision does not load; running the local file");
            local
        }
    }
}

/// The remote config task: KV watch, core, files, reloads, probation, events.
pub(crate) struct Remote {
    pub(crate) bucket: String,
    pub(crate) key: String,
    pub(crate) tenant_id: String,
    pub(crate) dir: PathBuf,
    pub(crate) store_path: PathBuf,
    pub(crate) probation: Duration,
    pub(crate) store: StoreHandle,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) apply: mpsc::Sender<Apply>,
    /// The config in force (SIGHUP may change it too).
    pub(crate) current: watch::Receiver<Arc<Config>>,
}

impl Remote {
    /// The task for `config`, when it turns remote config on.
    pub(crate) fn of(
        config: &Config,
        store: StoreHandle,
        metrics: Arc<Metrics>,
        apply: mpsc::Sender<Apply>,
        current: watch::Receiver<Arc<Config>>,
    ) -> Option<Self> {
        Some(Self {
            bucket: config.fleet.bucket(&config.gateway)?,
            key: config.gateway.id.to_string(),
            tenant_id: config.gateway.tenant_id.to_string(),
            dir: dir(config),
            store_path: config.store_path(),
            probation: config.fleet.probation.0,
            store,
            metrics,
            apply,
            current,
        })
    }

    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let memory = match load_memory(&self.dir) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "remote config: state unreadable; remote config stays off until it is fixed or removed");
                return;
            }
        };
        let (mut core, actions) = Core::start(memory, self.dir.clone(), self.probation);
        self.carry_out(actions).await;
        tracing::info!(bucket = %self.bucket, key = %self.key, last_revision = core.memory().last_revision, "remote config: watching");
        let (entries, mut revisions) = mpsc::channel(16);
        let watcher = tokio::spawn(watch_kv(
            self.bucket.clone(),
            self.key.clone(),
            self.current.clone(),
            self.metrics.clone(),
            entries,
            stop.clone(),
        ));
        loop {
            let (revision, text) = tokio::select! {
                _ = stop.changed() => break,
                r = revisions.recv() => match r {
                    Some(r) => r,
                    None => break,
                },
            };
            let running = self.current.borrow().clone();
            let health = self.health(&running).await;
            let actions = core.revision(revision, &text, &running, health);
            // Reloads from here on are not this revision's.
            let mut reloaded = self.current.clone();
            reloaded.mark_unchanged();
            let Some(trial) = self.carry_out(actions).await else {
                continue;
            };
            reloaded.mark_unchanged();
            // Stopped during probation: the next start rolls the trial back.
            let Some(actions) = self
                .probation(&mut core, &trial, &mut reloaded, &mut stop)
                .await
            else {
                break;
            };
            self.carry_out(actions).await;
        }
        let _ = watcher.await;
    }

    /// Samples the health of the config applied for a probation into the core until it
    /// decides (keep or roll back) or a SIGHUP applies the last known good config meanwhile;
    /// `None` when the gateway stops first.
    async fn probation(
        &self,
        core: &mut Core,
        applied: &Config,
        reloaded: &mut watch::Receiver<Arc<Config>>,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Vec<Action>> {
        let start = tokio::time::Instant::now();
        let mut samples = tokio::time::interval_at(start + SAMPLE_EVERY, SAMPLE_EVERY);
        samples.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => return None,
                _ = reloaded.changed() => return Some(core.superseded()),
                _ = samples.tick() => {
                    let health = self.health(applied).await;
                    let actions = core.probation_sample(start.elapsed(), health);
                    if !actions.is_empty() {
                        return Some(actions);
                    }
                }
            }
        }
    }

    /// Carries the actions out in order; returns the config applied for a probation. A file
    /// that cannot be written stops the rest (the revision is not applied; the next start
    /// finds at worst a trial not yet applied, which it rolls back).
    async fn carry_out(&self, actions: Vec<Action>) -> Option<Config> {
        let mut applied = None;
        for action in actions {
            let done = match action {
                Action::Ignore { revision, last } => {
                    tracing::info!(
                        revision,
                        last,
                        "remote config: revision not newer than the last one acted on; ignored"
                    );
                    Ok(())
                }
                Action::WriteFile { revision, text } => write_revision(&self.dir, revision, &text),
                Action::Persist(memory) => persist(&self.dir, &memory),
                Action::Apply(config) => {
                    let revision = config.origin.remote_revision.unwrap_or_default();
                    applied = Some((*config).clone());
                    self.apply(*config, format!("remote config revision {revision}"))
                        .await;
                    Ok(())
                }
                Action::RollBack(config) => {
                    self.apply(*config, "remote config rollback".into()).await;
                    Ok(())
                }
                Action::Probation { revision } => {
                    tracing::info!(revision, probation = %humantime::format_duration(self.probation), "remote config: revision applied; on probation");
                    return applied;
                }
                Action::Remove { revision } => {
                    let path = revision_file(&self.dir, revision);
                    match std::fs::remove_file(&path) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            Err(RemoteError::Io { path, source: e })
                        }
                        _ => files::sync_dir(&path)
                            .map_err(|source| RemoteError::Io { path, source }),
                    }
                }
                Action::Report(outcome) => {
                    self.report(&outcome).await;
                    Ok(())
                }
            };
            if let Err(e) = done {
                tracing::error!(error = %e, "remote config: cannot write its files; this revision is not applied");
                return None;
            }
        }
        None
    }

    /// Hands `config` to the app and waits until it is applied (or the app stopped).
    async fn apply(&self, config: Config, cause: String) {
        let (done, applied) = oneshot::channel();
        let apply = Apply {
            config,
            cause,
            done,
        };
        if self.apply.send(apply).await.is_ok() {
            let _ = applied.await;
        }
    }

    async fn report(&self, outcome: &Outcome) {
        match outcome.check.as_deref() {
            None => {
                tracing::info!(revision = outcome.revision, status = ?outcome.status, "remote config: {}", outcome.reason)
            }
            Some(check) => {
                tracing::warn!(revision = outcome.revision, status = ?outcome.status, check, "remote config: {}", outcome.reason)
            }
        }
        let body = body(outcome, &self.key, &self.tenant_id);
        match self.store.gateway_event(KIND_CONFIG, body).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!("remote config event not buffered: the buffer is full (reject_new) or the disk reserve reached"),
            Err(e) => tracing::warn!(error = %e, "remote config event not buffered"),
        }
    }

    /// The gateway's health now, for the parts `config` declares.
    async fn health(&self, config: &Config) -> Health {
        let mut report = StatusReport::from_metrics(&self.metrics);
        let path = self.store_path.clone();
        let report = tokio::task::spawn_blocking(move || {
            report.read_dead_letters(&path);
            report
        })
        .await
        .unwrap_or_else(|_| StatusReport::from_metrics(&self.metrics));
        Health::of(&report, config)
    }
}

/// The outbox body of an outcome (see [`super::event_body`]).
pub(crate) fn body(outcome: &Outcome, gateway_id: &str, tenant_id: &str) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Payload<'a> {
        gateway_id: &'a str,
        #[serde(flatten)]
        outcome: &'a Outcome,
    }
    super::event_body(
        tenant_id,
        &Payload {
            gateway_id,
            outcome,
        },
    )
}

/// Follows the key's revisions (the newest first, then each put) into `entries`, over a link
/// of its own from the running config's `[nats]`, reconnecting with backoff until stopped.
async fn watch_kv(
    bucket: String,
    key: String,
    current: watch::Receiver<Arc<Config>>,
    metrics: Arc<Metrics>,
    entries: mpsc::Sender<(u64, String)>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let log = LogLimit::new(Duration::from_secs(60));
    loop {
        let nats = current.borrow().nats.clone();
        let lost = tokio::select! {
            _ = stop.changed() => return,
            lost = follow(&nats, &bucket, &key, &metrics, &entries, &mut backoff) => lost,
        };
        if entries.is_closed() {
            return;
        }
        if let Some(held) = log.admit() {
            tracing::warn!(error = %lost, repeats = held, "remote config: KV not reachable; the gateway runs on its config and retries");
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// One link: connect, open the bucket, watch the key until the link is lost.
async fn follow(
    nats: &config::Nats,
    bucket: &str,
    key: &str,
    metrics: &Arc<Metrics>,
    entries: &mpsc::Sender<(u64, String)>,
    backoff: &mut Backoff,
) -> Lost {
    let connector = match Connector::secondary(nats, "sahool-gateway config", metrics.clone()) {
        Ok(c) => c,
        Err(e) => return Lost::Connect(e.to_string()),
    };
    let link = match connector.open().await {
        Ok(link) => link,
        Err(e) => return Lost::Connect(e.to_string()),
    };
    let js = jetstream::new(link.client.clone());
    let stream = match kv::open(&js, bucket).await {
        Ok(s) => s,
        Err(e) => return Lost::Kv(e),
    };
    let mut watch = match kv::watch(&link.client, &stream, bucket, key).await {
        Ok(w) => w,
        Err(e) => return Lost::Kv(e),
    };
    backoff.reset();
    while let Some(message) = watch.next().await {
        let entry = match message {
            Ok(m) => kv::revision_of(&m),
            Err(e) => return Lost::Kv(kv::KvError::Watch(e.to_string())),
        };
        let entry = match entry {
            Ok(e) => e,
            Err(e) => return Lost::Kv(e),
        };
        // A deleted key leaves the gateway on its last known good config.
        let Some(text) = entry.text else {
            continue;
        };
        if entries.send((entry.revision, text)).await.is_err() {
            return Lost::Ended;
        }
    }
    Lost::Ended
}

#[cfg(test)]
mod tests {
    use super::core::{Status, GRACE};
    use super::*;
    use crate::config::test_support::MINIMAL;
    use crate::reading::KIND_CONFIG;
    use crate::uplink::event::{self, GATEWAY_CONFIG_SUBJECT};

    fn rendered(outcome: &Outcome) -> (event::Event, serde_json::Value) {
        event::tests::render_gateway_event(KIND_CONFIG, 3, body(outcome, "gw-1", "tenant-a"))
    }

    #[test]
    fn outcomes_render_to_their_schema() {
        let schema = include_str!("../../../contracts/gateway_config.v1.json");
        let validator = event::tests::contract_validator(schema);
        for (status, check) in [
            (Status::Applied, None),
            (Status::Rejected, Some("validate")),
            (Status::RolledBack, Some("source farm")),
        ] {
            let (e, v) = rendered(&Outcome {
                status,
                revision: 12,
                reason: "why".into(),
                check: check.map(String::from),
            });
            assert!(validator.is_valid(&v), "{v}");
            assert_eq!(e.subject.as_str(), GATEWAY_CONFIG_SUBJECT);
            assert_eq!(v["event_type"], "gateway_config");
            assert_eq!(v["aggregate_id"], "gw-1");
            assert_eq!(v["payload"]["revision"], 12);
            assert_eq!(v["payload"]["gateway_id"], "gw-1");
            assert_eq!(v["payload"]["check"].as_str(), check);
        }
        let (_, v) = rendered(&Outcome {
            status: Status::RolledBack,
            revision: 1,
            reason: "x".into(),
            check: None,
        });
        assert_eq!(v["payload"]["status"], "rolled_back");
    }

    /// What an action leaves on disk (the rest is lost with the process).
    fn on_disk(dir: &Path, action: &Action) {
        match action {
            Action::WriteFile { revision, text } => write_revision(dir, *revision, text).unwrap(),
            Action::Persist(memory) => persist(dir, memory).unwrap(),
            Action::Remove { revision } => {
                let _ = std::fs::remove_file(revision_file(dir, *revision));
            }
            _ => {}
        }
    }

    /// The local config of a gateway whose data is in `data`, with remote config on.
    fn local_text(data: &Path) -> String {
        format!(
            "{}\n[fleet]\nconfig_bucket = \"cfg_{{tenant_id}}\"\n",
            MINIMAL.replace(
                "tenant_id = \"tenant-a\"",
                &format!(
                    "tenant_id = \"tenant-a\"\ndata_dir = \"{}\"",
                    data.display()
                )
            )
        )
    }

    #[test]
    fn a_stop_after_any_action_leaves_a_usable_config_and_a_consistent_state() {
        // Revision 5 kept, 7 rolled back (its source fails), 9 kept: every action in order.
        let actions_of = |data: &Path| -> Vec<Action> {
            let local = config::parse(&local_text(data)).unwrap();
            let text = |q: f64| format!("{}\n[quality]\nstale_factor = {q}\n", local_text(data));
            let broken = format!(
                "{}\n[[mqtt]]\nname = \"farm\"\nurl = \"mqtt://127.0.0.1:1\"\ntopics = [\"x/#\"]\nformat = \"json\"\n",
                local_text(data)
            );
            let ok = Health([("nats".to_string(), None)].into());
            let mut failing = ok.clone();
            failing.0.insert("source farm".into(), Some("down".into()));
            let (mut core, mut all) = Core::start(Memory::default(), dir(&local), GRACE);
            all.extend(core.revision(5, &text(3.0), &local, ok.clone()));
            all.extend(core.probation_sample(GRACE, ok.clone()));
            let five = config::parse(&text(3.0)).unwrap();
            all.extend(core.revision(7, &broken, &five, ok.clone()));
            all.extend(core.probation_sample(GRACE, failing));
            all.extend(core.revision(9, &text(5.0), &five, ok.clone()));
            all.extend(core.probation_sample(GRACE, ok));
            all
        };
        let n = actions_of(Path::new("/x")).len();
        for stop_after in 0..=n {
            let tmp = tempfile::tempdir().unwrap();
            let local = config::parse(&local_text(tmp.path())).unwrap();
            let dir = dir(&local);
            for action in actions_of(tmp.path()).iter().take(stop_after) {
                on_disk(&dir, action);
            }
            // The next start: a config that parsed and checked, the good revision's or the
            // local file's, never a trial's.
            let memory = load_memory(&dir).unwrap();
            let chosen = choose(local.clone());
            assert_eq!(
                chosen.origin.remote_revision, memory.good,
                "stop after {stop_after}"
            );
            let expected_factor = match memory.good {
                None => local.quality.stale_factor,
                Some(5) => 3.0,
                Some(9) => 5.0,
                Some(other) => panic!("revision {other} kept"),
            };
            assert_eq!(chosen.quality.stale_factor, expected_factor);
            assert!(
                chosen.mqtt.is_empty(),
                "the broken revision never runs after a restart"
            );
            // A trial is reported rolled back and its file goes; then only the good one stays.
            let (core, start) = Core::start(memory.clone(), dir.clone(), GRACE);
            assert_eq!(
                start
                    .iter()
                    .filter(|a| matches!(a, Action::Report(_)))
                    .count(),
                usize::from(memory.trial.is_some())
            );
            for action in &start {
                on_disk(&dir, action);
            }
            assert_eq!(load_memory(&dir).unwrap(), *core.memory());
            assert_eq!(core.memory().trial, None);
            if let Some(good) = core.memory().good {
                assert!(
                    revision_file(&dir, good).exists(),
                    "stop after {stop_after}"
                );
            }
        }
    }

    #[test]
    fn the_state_and_revision_files_survive_a_reload_and_choose_the_good_one() {
        let tmp = tempfile::tempdir().unwrap();
        let local_text = format!(
            "{}\n[fleet]\nconfig_bucket = \"cfg_{{tenant_id}}\"\n",
            MINIMAL.replace(
                "tenant_id = \"tenant-a\"",
                &format!(
                    "tenant_id = \"tenant-a\"\ndata_dir = \"{}\"",
                    tmp.path().display()
                )
            )
        );
        let local = config::parse(&local_text).unwrap();
        let dir = dir(&local);
        assert_eq!(load_memory(&dir).unwrap(), Memory::default());
        // The first thing remembered may be a rejection: the folder is made for it.
        let rejected = Memory {
            last_revision: 4,
            ..Memory::default()
        };
        persist(&dir, &rejected).unwrap();
        assert_eq!(load_memory(&dir).unwrap(), rejected);
        // Nothing kept: the local file.
        assert_eq!(choose(local.clone()).origin.remote_revision, None);
        let remote_text = format!("{local_text}\n[quality]\nstale_factor = 4.0\n");
        write_revision(&dir, 8, &remote_text).unwrap();
        let memory = Memory {
            last_revision: 9,
            good: Some(8),
            trial: Some(9),
        };
        persist(&dir, &memory).unwrap();
        assert_eq!(load_memory(&dir).unwrap(), memory);
        let chosen = choose(local.clone());
        assert_eq!(chosen.origin.remote_revision, Some(8));
        assert_eq!(chosen.quality.stale_factor, 4.0);
        // A kept revision that no longer matches the local [buffer] is set aside.
        let edited =
            config::parse(&format!("{local_text}\n[buffer]\nmax_bytes = \"1MiB\"\n")).unwrap();
        assert_eq!(choose(edited).origin.remote_revision, None);
        // A broken state file: the local one.
        std::fs::write(state_path(&dir), "{").unwrap();
        assert!(load_memory(&dir).is_err());
        assert_eq!(choose(local).origin.remote_revision, None);
    }
}
