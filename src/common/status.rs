//! The gateway's state as one typed report: served as JSON on `GET /status`, read by the
//! `status` command (printed for a person, or as JSON with `--json`). `/readyz` renders its
//! readiness part, so both say the same thing.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::common::metrics::Metrics;
use crate::store::counts::DropReason;
use crate::store::Inspector;

/// The path the running gateway serves the report on.
pub(crate) const PATH: &str = "/status";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// What `/readyz` answers 200 for: store writes, NATS connected, every listener bound.
    pub ready: bool,
    pub(crate) store_healthy: bool,
    pub nats_connected: bool,
    /// Why the NATS link last failed, while it is down.
    pub(crate) nats_problem: Option<String>,
    pub(crate) stream_found: bool,
    pub backlog_readings: i64,
    pub(crate) backlog_bytes: i64,
    pub(crate) oldest_age_seconds: i64,
    pub(crate) readings_accepted_total: u64,
    pub(crate) readings_forwarded_total: u64,
    /// Buffered readings dropped by a bound since start, every reason.
    pub(crate) readings_dropped_total: u64,
    /// MQTT sources, then serial ports, each by name.
    pub sources: Vec<SourceStatus>,
    pub listeners: Vec<ListenerStatus>,
    /// The commands consumer with `[commands]` enabled: `Ok` while bound, else why not.
    /// Reported, not required for readiness: the uplink serves on without it.
    #[serde(default)]
    pub(crate) commands: Option<Result<(), String>>,
    pub dead_letters_by_reason: BTreeMap<String, u64>,
    /// Set when the dead-letter table could not be read.
    pub(crate) dead_letters_error: Option<String>,
    /// Whether the last progress check passed (store answering, forwarder going round): the
    /// systemd watchdog is fed only then.
    #[serde(default = "progressing")]
    pub(crate) pipeline_progressing: bool,
    /// The running config: its file, its source and its remote revision.
    #[serde(default)]
    pub config: Option<ConfigStatus>,
}

fn progressing() -> bool {
    true
}

/// Which config runs and where it came from (DESIGN §9: local file or remote revision).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigStatus {
    /// `local` (the `--config` file) or `remote` (a KV revision kept as last known good).
    pub source: String,
    pub file: String,
    /// The KV revision of a remote config.
    pub revision: Option<u64>,
    /// xxh3-128 of the config text, in hex.
    pub hash: String,
}

impl ConfigStatus {
    pub(crate) fn of(config: &crate::config::Config) -> Self {
        let origin = &config.origin;
        Self {
            source: if origin.remote_revision.is_some() {
                "remote"
            } else {
                "local"
            }
            .into(),
            file: origin
                .file
                .as_ref()
                .map(|f| f.display().to_string())
                .unwrap_or_default(),
            revision: origin.remote_revision,
            hash: config.text_hash.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Mqtt,
    Serial,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceStatus {
    pub name: String,
    pub kind: SourceKind,
    /// MQTT: connected to its broker; serial: the port is open.
    pub up: bool,
    /// Why a serial port is down.
    pub problem: Option<String>,
    /// MQTT messages, or serial lines/frames/responses, received since start.
    pub(crate) messages_total: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub bound: bool,
    pub(crate) clients_open: i64,
    pub(crate) publishes_total: u64,
    pub(crate) rejects_total: u64,
}

impl StatusReport {
    /// Everything but the dead-letters, from what the gateway holds in memory.
    pub(crate) fn from_metrics(m: &Metrics) -> Self {
        let mqtt = m.mqtt_sources().into_iter().map(|name| {
            let label = m.source(&name);
            SourceStatus {
                up: m.mqtt_connected.get(&label).is_some_and(|g| g.get() == 1),
                messages_total: m.mqtt_messages.get(&label).map_or(0, |c| c.get()),
                name,
                kind: SourceKind::Mqtt,
                problem: None,
            }
        });
        let serial = m.serial_states().into_iter().map(|(name, state)| {
            let label = m.port(&name);
            SourceStatus {
                up: state.is_ok(),
                problem: state.err(),
                messages_total: m.serial_messages.get(&label).map_or(0, |c| c.get()),
                name,
                kind: SourceKind::Serial,
            }
        });
        let listeners: Vec<ListenerStatus> = m
            .listeners_bound()
            .into_iter()
            .map(|(name, bound)| {
                let label = m.listener(&name);
                ListenerStatus {
                    bound,
                    clients_open: m
                        .listener_connections_open
                        .get(&label)
                        .map_or(0, |g| g.get()),
                    publishes_total: m.listener_publishes.get(&label).map_or(0, |c| c.get()),
                    rejects_total: m.listener_rejects_total(&name),
                    name,
                }
            })
            .collect();
        let store_healthy = m.store_healthy();
        let nats_connected = m.nats_is_connected();
        Self {
            ready: store_healthy && nats_connected && listeners.iter().all(|l| l.bound),
            store_healthy,
            nats_connected,
            nats_problem: m.nats_problem(),
            stream_found: m.stream_found(),
            backlog_readings: m.buffer_readings.get(),
            backlog_bytes: m.buffer_bytes.get(),
            oldest_age_seconds: m.buffer_oldest_age_seconds.get(),
            readings_accepted_total: m.readings_accepted.get(),
            readings_forwarded_total: m.readings_forwarded.get(),
            readings_dropped_total: DropReason::ALL
                .iter()
                .map(|r| m.dropped_total(r.label()))
                .sum(),
            sources: mqtt.chain(serial).collect(),
            listeners,
            commands: m.commands_consumer(),
            dead_letters_by_reason: BTreeMap::new(),
            dead_letters_error: None,
            pipeline_progressing: m.pipeline_progressing(),
            config: m.config(),
        }
    }

    /// Adds the dead-letters by reason, read from the buffer file (blocking).
    pub(crate) fn read_dead_letters(&mut self, store_path: &Path) {
        let counts = Inspector::open(store_path).and_then(|i| i.dead_letters_by_reason());
        match counts {
            Ok(reasons) => self.dead_letters_by_reason = reasons.into_iter().collect(),
            Err(e) => self.dead_letters_error = Some(e.to_string()),
        }
    }

    /// `/readyz`'s body: one line per part (store, NATS, stream, serial ports, listeners).
    /// A serial port that is down is reported but does not make the gateway unready: one
    /// unplugged sensor must not take the buffer and the other inputs out of service.
    pub(crate) fn readiness_lines(&self) -> Vec<String> {
        let link = match (self.nats_connected, &self.nats_problem) {
            (true, _) => "connected".to_string(),
            (false, Some(problem)) => format!("disconnected ({problem})"),
            (false, None) => "disconnected".to_string(),
        };
        let mut lines = vec![
            format!(
                "store: {}",
                if self.store_healthy { "ok" } else { "failing" }
            ),
            format!("nats: {link}"),
            format!(
                "stream: {}",
                if self.stream_found {
                    "found"
                } else {
                    "not found"
                }
            ),
        ];
        for s in self.sources.iter().filter(|s| s.kind == SourceKind::Serial) {
            lines.push(match &s.problem {
                None => format!("serial {}: up", s.name),
                Some(why) => format!("serial {}: down ({why})", s.name),
            });
        }
        for l in &self.listeners {
            let state = if l.bound { "listening" } else { "not bound" };
            lines.push(format!("listener {}: {state}", l.name));
        }
        match &self.commands {
            Some(Ok(())) => lines.push("commands: consumer bound".into()),
            Some(Err(why)) => lines.push(format!("commands: no consumer ({why})")),
            None => {}
        }
        lines
    }

    /// The `status` command's text. `earlier`, taken `interval` before, gives the rates.
    pub(crate) fn write_text(
        &self,
        earlier: &StatusReport,
        interval: std::time::Duration,
        gateway_id: &str,
        nats_servers: &str,
        out: &mut impl std::io::Write,
    ) -> std::io::Result<()> {
        let rate = Rate(interval.as_secs_f64());
        self.write_pipeline(earlier, rate, gateway_id, nats_servers, out)?;
        self.write_sources(earlier, rate, out)?;
        self.write_listeners(earlier, rate, out)?;
        self.write_losses(out)
    }

    /// Readiness, the NATS link, the backlog and the pipeline's rates.
    fn write_pipeline(
        &self,
        earlier: &StatusReport,
        rate: Rate,
        gateway_id: &str,
        nats_servers: &str,
        out: &mut impl std::io::Write,
    ) -> std::io::Result<()> {
        let state = if self.ready { "ready" } else { "NOT READY" };
        let readiness = self.readiness_lines().join(", ");
        writeln!(out, "gateway {gateway_id}: {state} ({readiness})")?;
        let link = if self.nats_connected {
            "connected"
        } else {
            "DISCONNECTED"
        };
        writeln!(out, "NATS:          {link} ({nats_servers})")?;
        if let Some(c) = &self.config {
            let revision = c
                .revision
                .map(|r| format!(" revision {r}"))
                .unwrap_or_default();
            writeln!(out, "config:        {}{revision} ({})", c.source, c.file)?;
        }
        let oldest = std::time::Duration::from_secs(self.oldest_age_seconds.max(0) as u64);
        writeln!(
            out,
            "backlog:       {} readings, {} bytes, oldest {}",
            self.backlog_readings,
            self.backlog_bytes,
            humantime::format_duration(oldest),
        )?;
        writeln!(
            out,
            "rates:         {:.1} accepted/s, {:.1} forwarded/s",
            rate.of(
                self.readings_accepted_total,
                earlier.readings_accepted_total
            ),
            rate.of(
                self.readings_forwarded_total,
                earlier.readings_forwarded_total
            ),
        )
    }

    fn write_sources(
        &self,
        earlier: &StatusReport,
        rate: Rate,
        out: &mut impl std::io::Write,
    ) -> std::io::Result<()> {
        writeln!(out, "sources:")?;
        for s in &self.sources {
            let then = earlier
                .sources
                .iter()
                .find(|e| e.kind == s.kind && e.name == s.name)
                .map_or(s.messages_total, |e| e.messages_total);
            let (state, what) = match (s.kind, s.up) {
                (SourceKind::Mqtt, true) => ("connected", "messages"),
                (SourceKind::Mqtt, false) => ("DISCONNECTED", "messages"),
                (SourceKind::Serial, true) => ("open", "lines/frames/responses; serial"),
                (SourceKind::Serial, false) => ("DOWN", "lines/frames/responses; serial"),
            };
            writeln!(
                out,
                "  {:<20} {state:<13} {:.1} msg/s ({} {what})",
                s.name,
                rate.of(s.messages_total, then),
                s.messages_total,
            )?;
        }
        Ok(())
    }

    fn write_listeners(
        &self,
        earlier: &StatusReport,
        rate: Rate,
        out: &mut impl std::io::Write,
    ) -> std::io::Result<()> {
        if !self.listeners.is_empty() {
            writeln!(out, "listeners:")?;
        }
        for l in &self.listeners {
            let then = earlier
                .listeners
                .iter()
                .find(|e| e.name == l.name)
                .map_or(l.publishes_total, |e| e.publishes_total);
            writeln!(
                out,
                "  {:<20} {:<13} {:.1} msg/s ({} publishes, {} refused)",
                l.name,
                format!("{} clients", l.clients_open),
                rate.of(l.publishes_total, then),
                l.publishes_total,
                l.rejects_total,
            )?;
        }
        Ok(())
    }

    /// Readings dropped by a bound and inputs kept as dead-letters.
    fn write_losses(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        if self.readings_dropped_total > 0 {
            writeln!(
                out,
                "dropped:       {} readings since start (see readings_dropped_total)",
                self.readings_dropped_total
            )?;
        }
        match &self.dead_letters_error {
            None => {
                let total: u64 = self.dead_letters_by_reason.values().sum();
                writeln!(out, "dead-letters:  {total}")?;
                for (reason, n) in &self.dead_letters_by_reason {
                    writeln!(out, "  {reason:<20} {n}")?;
                }
                Ok(())
            }
            Some(e) => writeln!(out, "dead-letters:  (cannot read the buffer: {e})"),
        }
    }
}

/// Per-second rates between two reports taken this many seconds apart.
#[derive(Clone, Copy)]
struct Rate(f64);

impl Rate {
    fn of(self, now: u64, then: u64) -> f64 {
        now.saturating_sub(then) as f64 / self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_reads_the_typed_state_and_survives_json() {
        let m = Metrics::new();
        m.set_store_healthy(true);
        m.nats_connected.set(1);
        m.set_serial_state("rs485", Err("unplugged".into()));
        m.set_listener_bound("yard", Some(true));
        m.count_listener_reject("yard", "auth");
        m.count_listener_reject("yard", "topic");
        m.dropped("thin").inc_by(3);
        m.mqtt_messages.get_or_create(&m.mqtt_source("farm")).inc();
        let report = StatusReport::from_metrics(&m);
        assert!(report.ready, "a serial port down does not make it unready");
        assert_eq!(report.readings_dropped_total, 3);
        assert_eq!(report.listeners[0].rejects_total, 2);
        assert_eq!(
            (report.sources[0].kind, report.sources[0].messages_total),
            (SourceKind::Mqtt, 1)
        );
        assert_eq!(
            report.readiness_lines(),
            [
                "store: ok",
                "nats: connected",
                "stream: not found",
                "serial rs485: down (unplugged)",
                "listener yard: listening",
            ]
        );
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<StatusReport>(&json).unwrap(), report);
    }

    #[test]
    fn the_running_configs_origin_is_reported_and_printed() {
        let m = Metrics::new();
        let mut config = crate::config::parse(crate::config::test_support::MINIMAL).unwrap();
        config.origin = crate::config::Origin {
            file: Some("/var/lib/sahool-gateway/remote/revision-12.toml".into()),
            remote_revision: Some(12),
        };
        m.set_config(ConfigStatus::of(&config));
        let report = StatusReport::from_metrics(&m);
        let c = report.config.as_ref().expect("config");
        assert_eq!((c.source.as_str(), c.revision), ("remote", Some(12)));
        let mut text = Vec::new();
        report
            .write_text(
                &report,
                std::time::Duration::from_secs(1),
                "gw-1",
                "nats://x",
                &mut text,
            )
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("config:        remote revision 12 (/var/lib/sahool-gateway/remote/revision-12.toml)"),
            "{text}"
        );
        // A report from before the field still reads.
        let mut json = serde_json::to_value(&report).unwrap();
        json.as_object_mut().unwrap().remove("config");
        let old: StatusReport = serde_json::from_value(json).unwrap();
        assert_eq!(old.config, None);
        config.origin.remote_revision = None;
        assert_eq!(ConfigStatus::of(&config).source, "local");
    }
}
