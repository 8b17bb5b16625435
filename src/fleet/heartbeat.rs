//! The heartbeat: `sahool.iot.gateway.status` every `[fleet] status_interval`, through the
//! outbox like a reading (`contracts/gateway_status.v1.json`).
//!
//! # Late but complete
//!
//! Every heartbeat is an outbox row of its own ([`crate::reading::KIND_HEARTBEAT`]), so a
//! gateway offline for a day delivers that day's heartbeats afterwards, in order, each once
//! (its event id derives from its seq: a resend is dropped by JetStream's duplicate window).
//! They are not coalesced into one because the history is what an SRE needs after an outage:
//! when the link went, how fast the backlog grew, whether the disk filled or the clock lost
//! its sync, which port dropped first. The newest heartbeat gives the current state; the
//! envelope's `timestamp` (the store time) tells a late one from a live one. The cost is
//! small: about 1 KB a heartbeat, 1.4 MB a day at the default minute, under 1% of the default
//! 256 MiB buffer. Under pressure they yield like readings: `drop_oldest` and `max_age` take
//! them in store order, `thin` halves them as one more series (the newest hour kept whole,
//! see `store::bounds`), `reject_new` and the disk reserve refuse new ones. They never count
//! as readings (`accepted = forwarded + dropped + refused + buffered` is about data).
//!
//! The report is [`StatusReport::from_metrics`], the same typed state `/status` serves, with
//! what only the heartbeat says: version, uptime, config revision, clock sync and free disk.
//! The config revision is the KV revision of a remote config (`fleet::remote`), or the hash
//! of the local file's text.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::common::clock::{self, ClockSync};
use crate::common::metrics::Metrics;
use crate::common::status::{ListenerStatus, SourceStatus, StatusReport};
use crate::config::Config;
use crate::store::{self, StoreHandle};

/// The first heartbeat comes this long after start (or a reload that changes the plan), or
/// after the interval if that is shorter: soon, so the platform sees a restarted gateway and
/// its config at once rather than a minute later, yet after the sources have had a moment to
/// connect (the first report would otherwise show them all down).
const FIRST_AFTER: Duration = Duration::from_secs(10);

/// What a heartbeat task runs with; a reload that changes it restarts the task.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    pub(crate) interval: Duration,
    pub(crate) gateway_id: String,
    pub(crate) tenant_id: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) store_path: PathBuf,
    pub(crate) config_hash: String,
    /// The KV revision of a remote config; `None` for the local file.
    pub(crate) remote_revision: Option<u64>,
}

impl Plan {
    pub(crate) fn of(config: &Config) -> Self {
        Self {
            interval: config.fleet.status_interval.0,
            gateway_id: config.gateway.id.to_string(),
            tenant_id: config.gateway.tenant_id.to_string(),
            data_dir: config.gateway.data_dir.clone(),
            store_path: config.store_path(),
            config_hash: config.text_hash.clone(),
            remote_revision: config.origin.remote_revision,
        }
    }
}

/// What the heartbeat reports besides the status report, read for each one.
#[derive(Debug, Clone)]
pub(crate) struct Extras {
    pub(crate) uptime: Duration,
    pub(crate) clock: ClockSync,
    pub(crate) free_disk: Result<u64, String>,
}

#[derive(Serialize)]
struct Payload<'a> {
    gateway_id: &'a str,
    version: &'static str,
    uptime_s: u64,
    config: ConfigState<'a>,
    ready: bool,
    backlog: Backlog,
    readings: Readings,
    dead_letters: DeadLetters<'a>,
    nats: Link<'a>,
    sources: &'a [SourceStatus],
    listeners: &'a [ListenerStatus],
    commands: State<'a>,
    clock: Clock<'a>,
    disk: Disk<'a>,
}

#[derive(Serialize)]
struct ConfigState<'a> {
    /// The remote revision of a remote config; the file's hash for the local one.
    revision: String,
    hash: &'a str,
    source: &'static str,
}

#[derive(Serialize)]
struct Backlog {
    readings: i64,
    bytes: i64,
    oldest_age_s: i64,
}

#[derive(Serialize)]
struct Readings {
    accepted_total: u64,
    forwarded_total: u64,
    dropped_total: u64,
}

#[derive(Serialize)]
struct DeadLetters<'a> {
    total: u64,
    by_reason: &'a BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<&'a str>,
}

#[derive(Serialize)]
struct Link<'a> {
    connected: bool,
    stream_found: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<&'a str>,
}

/// A part's state by name, and why when it is not working.
#[derive(Serialize)]
struct State<'a> {
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<&'a str>,
}

#[derive(Serialize)]
struct Clock<'a> {
    /// `null` when the kernel's state cannot be read.
    synchronised: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_error_us: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<&'a str>,
}

#[derive(Serialize)]
struct Disk<'a> {
    free_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<&'a str>,
}

fn commands_state(commands: &Option<Result<(), String>>) -> State<'_> {
    let (state, problem) = match commands {
        None => ("disabled", None),
        Some(Ok(())) => ("bound", None),
        Some(Err(why)) => ("unbound", Some(why.as_str())),
    };
    State { state, problem }
}

fn clock_state(c: &ClockSync) -> Clock<'_> {
    let (synchronised, max_error_us, problem) = match c {
        ClockSync::Synchronised { max_error_us } => (Some(true), Some(*max_error_us), None),
        ClockSync::Unsynchronised => (Some(false), None, None),
        ClockSync::Unknown(why) => (None, None, Some(why.as_str())),
    };
    Clock {
        synchronised,
        max_error_us,
        problem,
    }
}

/// The outbox body of one heartbeat: the envelope's tenant and the event's payload.
pub(crate) fn body(report: &StatusReport, plan: &Plan, extras: &Extras) -> Vec<u8> {
    let payload = Payload {
        gateway_id: &plan.gateway_id,
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: extras.uptime.as_secs(),
        config: ConfigState {
            revision: plan
                .remote_revision
                .map_or_else(|| plan.config_hash.clone(), |r| r.to_string()),
            hash: &plan.config_hash,
            source: if plan.remote_revision.is_some() {
                "remote"
            } else {
                "local"
            },
        },
        ready: report.ready,
        backlog: Backlog {
            readings: report.backlog_readings,
            bytes: report.backlog_bytes,
            oldest_age_s: report.oldest_age_seconds.max(0),
        },
        readings: Readings {
            accepted_total: report.readings_accepted_total,
            forwarded_total: report.readings_forwarded_total,
            dropped_total: report.readings_dropped_total,
        },
        dead_letters: DeadLetters {
            total: report.dead_letters_by_reason.values().sum(),
            by_reason: &report.dead_letters_by_reason,
            problem: report.dead_letters_error.as_deref(),
        },
        nats: Link {
            connected: report.nats_connected,
            stream_found: report.stream_found,
            problem: report.nats_problem.as_deref(),
        },
        sources: &report.sources,
        listeners: &report.listeners,
        commands: commands_state(&report.commands),
        clock: clock_state(&extras.clock),
        disk: Disk {
            free_bytes: extras.free_disk.as_ref().ok().copied(),
            problem: extras.free_disk.as_ref().err().map(String::as_str),
        },
    };
    super::event_body(&plan.tenant_id, &payload)
}

/// The task that buffers a heartbeat every interval until stopped.
pub(crate) struct Heartbeat {
    pub(crate) plan: Plan,
    pub(crate) store: StoreHandle,
    pub(crate) metrics: Arc<Metrics>,
    /// When the gateway started (not the task: a reload restarts the task).
    pub(crate) started: Instant,
}

impl Heartbeat {
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let first = tokio::time::Instant::now() + FIRST_AFTER.min(self.plan.interval);
        let mut tick = tokio::time::interval_at(first, self.plan.interval);
        // After a stall, one heartbeat and on at the interval: no burst of identical ones.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !*stop.borrow() {
            tokio::select! {
                _ = tick.tick() => self.beat().await,
                _ = stop.changed() => return,
            }
        }
    }

    /// Reads the state and buffers one heartbeat.
    async fn beat(&self) {
        let mut report = StatusReport::from_metrics(&self.metrics);
        let (plan, uptime) = (self.plan.clone(), self.started.elapsed());
        // The dead-letters, the clock and the disk are read from files and the kernel.
        let read = tokio::task::spawn_blocking(move || {
            report.read_dead_letters(&plan.store_path);
            let extras = Extras {
                uptime,
                clock: clock::read(),
                free_disk: store::free_disk(&plan.data_dir).map_err(|e| e.to_string()),
            };
            body(&report, &plan, &extras)
        })
        .await;
        let body = match read {
            Ok(body) => body,
            Err(e) => return tracing::warn!(error = %e, "heartbeat not built"),
        };
        match self.store.heartbeat(body).await {
            Ok(true) => tracing::debug!("heartbeat buffered"),
            Ok(false) => {
                tracing::warn!("heartbeat not buffered: the buffer is full (reject_new) or the disk reserve reached")
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat not buffered"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::KIND_HEARTBEAT;
    use crate::uplink::event::{self, GATEWAY_STATUS_SUBJECT};

    fn validator() -> jsonschema::Validator {
        let schema = include_str!("../../contracts/gateway_status.v1.json");
        event::tests::contract_validator(schema)
    }

    fn plan() -> Plan {
        Plan {
            interval: Duration::from_secs(60),
            gateway_id: "gw-1".into(),
            tenant_id: "tenant-a".into(),
            data_dir: PathBuf::from("/var/lib/sahool-gateway"),
            store_path: PathBuf::from("/var/lib/sahool-gateway/buffer.db"),
            config_hash: "0123456789abcdef0123456789abcdef".into(),
            remote_revision: None,
        }
    }

    /// The event a heartbeat with this report and these extras becomes, as JSON.
    fn rendered(report: &StatusReport, extras: &Extras) -> (event::Event, serde_json::Value) {
        event::tests::render_gateway_event(KIND_HEARTBEAT, 0x5a, body(report, &plan(), extras))
    }

    #[test]
    fn a_heartbeat_renders_the_status_report_to_its_schema() {
        let m = Metrics::new();
        m.set_store_healthy(true);
        m.set_serial_state("rs485", Err("unplugged".into()));
        m.mqtt_messages.get_or_create(&m.mqtt_source("farm")).inc();
        m.set_listener_bound("yard", Some(true));
        m.set_commands_consumer(Some(Err("no stream".into())));
        let mut report = StatusReport::from_metrics(&m);
        report.dead_letters_by_reason = [("unknown_device".to_string(), 3)].into();
        let extras = Extras {
            uptime: Duration::from_secs(3_700),
            clock: ClockSync::Synchronised { max_error_us: 900 },
            free_disk: Ok(5 << 30),
        };
        let (e, v) = rendered(&report, &extras);
        assert!(validator().is_valid(&v), "{v}");
        assert_eq!(e.subject.as_str(), GATEWAY_STATUS_SUBJECT);
        let id = "5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a5a";
        assert_eq!(
            (&v["event_type"], &v["event_id"]),
            (&"gateway_status".into(), &id.into())
        );
        assert_eq!(
            (&v["aggregate_id"], &v["correlation_id"]),
            (&"gw-1".into(), &id.into())
        );
        assert_eq!(v["tenant_id"], "tenant-a");
        let h = event::headers(&e);
        assert_eq!(h.get("Nats-Msg-Id").map(|v| v.as_str()), Some(id));
        let p = &v["payload"];
        assert_eq!(
            (&p["uptime_s"], &p["ready"]),
            (&3_700.into(), &false.into())
        );
        assert_eq!(p["config"]["revision"], p["config"]["hash"]);
        assert_eq!(
            p["dead_letters"],
            serde_json::json!({"total": 3, "by_reason": {"unknown_device": 3}})
        );
        assert_eq!(
            p["commands"],
            serde_json::json!({"state": "unbound", "problem": "no stream"})
        );
        assert_eq!(
            p["clock"],
            serde_json::json!({"synchronised": true, "max_error_us": 900})
        );
        assert_eq!(p["disk"]["free_bytes"], 5u64 << 30);
        let kinds: Vec<_> = p["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (&s["kind"], &s["up"]))
            .collect();
        assert_eq!(
            kinds,
            [
                (&"mqtt".into(), &false.into()),
                (&"serial".into(), &false.into())
            ]
        );
        assert_eq!(p["sources"][1]["problem"], "unplugged");
    }

    #[test]
    fn a_remote_config_reports_its_revision_and_source() {
        let report = StatusReport::from_metrics(&Metrics::new());
        let extras = Extras {
            uptime: Duration::ZERO,
            clock: ClockSync::Unsynchronised,
            free_disk: Ok(1),
        };
        let plan = Plan {
            remote_revision: Some(42),
            ..plan()
        };
        let (_, v) =
            event::tests::render_gateway_event(KIND_HEARTBEAT, 7, body(&report, &plan, &extras));
        assert!(validator().is_valid(&v), "{v}");
        assert_eq!(
            v["payload"]["config"],
            serde_json::json!({"revision": "42", "hash": plan.config_hash, "source": "remote"})
        );
        let (_, v) = rendered(&report, &extras);
        assert_eq!(v["payload"]["config"]["source"], "local");
    }

    #[test]
    fn what_cannot_be_read_is_said_and_still_fits_the_schema() {
        let mut report = StatusReport::from_metrics(&Metrics::new());
        report.dead_letters_error = Some("no such file".into());
        let extras = Extras {
            uptime: Duration::ZERO,
            clock: ClockSync::Unknown("adjtimex: EPERM".into()),
            free_disk: Err("statvfs: ENOENT".into()),
        };
        let (_, v) = rendered(&report, &extras);
        assert!(validator().is_valid(&v), "{v}");
        let p = &v["payload"];
        assert_eq!(
            p["clock"],
            serde_json::json!({"synchronised": null, "problem": "adjtimex: EPERM"})
        );
        assert_eq!(
            p["disk"],
            serde_json::json!({"free_bytes": null, "problem": "statvfs: ENOENT"})
        );
        assert_eq!(p["commands"]["state"], "disabled");
        assert_eq!(p["dead_letters"]["problem"], "no such file");
        // Unsynchronised is a plain false.
        let extras = Extras {
            clock: ClockSync::Unsynchronised,
            ..extras
        };
        let (_, v) = rendered(&report, &extras);
        assert!(validator().is_valid(&v), "{v}");
        assert_eq!(
            v["payload"]["clock"],
            serde_json::json!({"synchronised": false})
        );
    }
}
