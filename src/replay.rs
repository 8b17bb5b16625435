//! `dead-letters replay`: which kept messages can be mapped again, with what, and how the
//! command reaches the store.
//!
//! Replayable: messages of `[[mqtt]]` sources and `[[mqtt_listener]]`s (mapped with their
//! recorded topic, as intake maps them) and lines of `lines` serial ports (parsed with the
//! port's current settings). Not replayable, reported as skipped and kept: events the server
//! refused (`publish_refused`, already rendered), Modbus, SDI-12 and frames ports (bus faults,
//! frames), rows cut at [`db::DEAD_LETTER_RAW_MAX`] bytes or `max_line`, rows kept before
//! schema 5 whose topic could not be recovered, and sources no longer configured.
//!
//! The mapping is the one in force: the running gateway swaps its [`Plan`] on SIGHUP with the
//! mapper. A reading without a device timestamp gets the dead-letter's receive time (`at_ms`),
//! as live intake would have given it. Flood protection is not applied: the operator asked for
//! these readings. A message stored in part the first time (a device over its rate limit, one
//! bad item of a batch, one unreadable key of a line) is mapped whole but stored in part: only
//! the readings its dead-letters name (device, and type when one), so the others, already
//! stored and without a device time to recognise them by, are not stored twice.
//!
//! Reaching the store: the gateway's owner thread is the only writer (store invariant 1), so
//! the CLI posts the request to the running gateway (`POST /dead-letters/replay` on `[http]
//! listen`, loopback peers only, the [`ReplayFilter`] as a JSON body, a [`ReplayReport`] back).
//! With no gateway listening, the CLI starts the store itself under the buffer's lock; a
//! gateway started meanwhile waits for that lock (see `store::lock`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use crate::config::{Config, Protocol};
use crate::ingest::mapping::{Mapper, Reason};
use crate::reading::Timestamp;
use crate::sources::serial::lines::{self, LineSpec};
use crate::store::{
    db, DeadLetterRow, ReplayFilter, ReplayMapper, ReplayReport, Replayed, StoreError, StoreHandle,
};

/// The path of the gateway's replay endpoint.
pub(crate) const PATH: &str = "/dead-letters/replay";

/// What the config says about replaying each source's dead-letters.
pub(crate) struct Plan {
    mapper: Mapper,
    /// `[[mqtt]]` sources and `[[mqtt_listener]]`s.
    mqtt: HashSet<String>,
    lines: HashMap<String, LineSpec>,
    /// Other `[[serial]]` ports.
    polled: HashSet<String>,
}

impl Plan {
    pub(crate) fn new(config: &Config) -> Self {
        let mqtt = config
            .mqtt
            .iter()
            .map(|m| m.name.to_string())
            .chain(config.mqtt_listener.iter().map(|l| l.name.to_string()))
            .collect();
        let (lines, polled): (Vec<_>, Vec<_>) = config
            .serial
            .iter()
            .partition(|p| p.protocol == Protocol::Lines);
        Self {
            mapper: Mapper::new(config),
            mqtt,
            lines: lines
                .into_iter()
                .map(|p| (p.name.to_string(), LineSpec::of(p)))
                .collect(),
            polled: polled.into_iter().map(|p| p.name.to_string()).collect(),
        }
    }
}

impl ReplayMapper for Plan {
    fn map(&self, row: &DeadLetterRow) -> Replayed {
        let skip = |why: &str| Replayed::Skip(why.to_string());
        if row.reason == Reason::PublishRefused.label() {
            return skip("an event the server refused: already rendered, not a source message");
        }
        if row.raw.len() >= db::DEAD_LETTER_RAW_MAX {
            return skip("its raw bytes were cut at 64 KiB when it was kept");
        }
        let received = Timestamp::from_unix_millis(row.at_ms);
        if self.mqtt.contains(&row.source) {
            return match &row.topic {
                Some(topic) => {
                    Replayed::Mapped(self.mapper.map_mqtt(&row.source, topic, &row.raw, received))
                }
                None => skip("no topic recorded (kept by an older gateway)"),
            };
        }
        if let Some(spec) = self.lines.get(&row.source) {
            if row.reason == Reason::Oversized.label() {
                return skip("a line longer than max_line: only its head was kept");
            }
            return Replayed::Mapped(lines::map_line(
                &self.mapper,
                &row.source,
                spec,
                &row.raw,
                received,
            ));
        }
        if self.polled.contains(&row.source) {
            return skip("a Modbus, SDI-12 or frames port: bus faults and frames are not replayed");
        }
        Replayed::Skip(format!(
            "source `{}` is not in the config (any more)",
            row.source
        ))
    }
}

/// The plan in force in a running gateway, swapped on SIGHUP.
pub(crate) type SharedPlan = Arc<RwLock<Arc<Plan>>>;

pub(crate) fn shared(config: &Config) -> SharedPlan {
    Arc::new(RwLock::new(Arc::new(Plan::new(config))))
}

/// Puts the plan of a reloaded config in force.
pub(crate) fn reload(plan: &SharedPlan, config: &Config) {
    *plan.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Plan::new(config));
}

/// The gateway's side of the endpoint. [`Service::close`] lets go of the store, so an HTTP
/// connection left open cannot keep the store from closing at shutdown.
#[derive(Clone)]
pub(crate) struct Service {
    handle: Arc<RwLock<Option<StoreHandle>>>,
    plan: SharedPlan,
}

impl Service {
    pub(crate) fn new(store: &StoreHandle, plan: SharedPlan) -> Self {
        Self {
            handle: Arc::new(RwLock::new(Some(store.clone()))),
            plan,
        }
    }

    /// Lets go of the store: called when the gateway stops, before the store closes.
    pub(crate) fn close(&self) {
        *self.handle.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub(crate) async fn replay(&self, filter: ReplayFilter) -> Result<ReplayReport, StoreError> {
        let store = self
            .handle
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(StoreError::Closed)?;
        let plan: Arc<Plan> = self.plan.read().unwrap_or_else(|e| e.into_inner()).clone();
        store.replay(filter, plan).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[gateway]
id = "gw"
tenant_id = "t"
[nats]
servers = ["nats://127.0.0.1:4222"]
[[mqtt]]
name = "farm"
url = "mqtt://127.0.0.1:1883"
topics = ["sahool/sensors/#"]
format = "sahool"
[[serial]]
name = "talker"
path = "/dev/null"
protocol = "lines"
line_format = "kv"
device_id = "talker-1"
[[serial]]
name = "bus"
path = "/dev/null"
protocol = "modbus-rtu"
[[fields]]
id = "field-1"
  [[fields.sensors]]
  device_id = "probe-1"
  sensor_type = "water_level"
  [[fields.sensors]]
  device_id = "talker-1"
  sensor_type = "soil_temperature"
  line = { port = "talker", key = "soil_t" }
"#;

    fn row(source: &str, reason: &str, topic: Option<&str>, raw: &[u8]) -> DeadLetterRow {
        DeadLetterRow {
            id: 1,
            at_ms: 1_780_287_300_000,
            source: source.into(),
            reason: reason.into(),
            detail: String::new(),
            raw: raw.to_vec(),
            topic: topic.map(String::from),
            device: None,
            sensor_type: None,
        }
    }

    fn skipped(r: Replayed) -> String {
        match r {
            Replayed::Skip(why) => why,
            Replayed::Mapped(m) => panic!("mapped: {m:?}"),
        }
    }

    fn mapped(r: Replayed) -> crate::ingest::mapping::Mapped {
        match r {
            Replayed::Mapped(m) => m,
            Replayed::Skip(why) => panic!("skipped: {why}"),
        }
    }

    #[test]
    fn mqtt_messages_map_with_their_topic_and_the_time_they_were_received() {
        let plan = Plan::new(&crate::config::parse(CONFIG).unwrap());
        let raw = br#"{"device_id":"probe-1","type":"water_level","value":7}"#;
        let topic = Some("sahool/sensors/probe-1/field-1/water_level");
        let m = mapped(plan.map(&row("farm", "unknown_device", topic, raw)));
        assert_eq!(m.readings.len(), 1, "{m:?}");
        assert_eq!(
            m.readings[0].observed_at,
            Timestamp::from_unix_millis(1_780_287_300_000),
            "no device time: the receive time"
        );
        assert!(skipped(plan.map(&row("farm", "unknown_device", None, raw))).contains("no topic"));
    }

    #[test]
    fn lines_parse_again_with_the_port_settings() {
        let plan = Plan::new(&crate::config::parse(CONFIG).unwrap());
        let m = mapped(plan.map(&row("talker", "unknown_sensor_type", None, b"soil_t=21.5")));
        assert_eq!(m.readings.len(), 1, "{m:?}");
        assert_eq!(m.readings[0].device_id, "talker-1");
        assert_eq!(m.readings[0].value, 21.5);
        assert!(
            skipped(plan.map(&row("talker", "oversized", None, b"soil_t=2"))).contains("max_line")
        );
    }

    #[test]
    fn bus_faults_refused_events_cut_rows_and_removed_sources_are_skipped() {
        let plan = Plan::new(&crate::config::parse(CONFIG).unwrap());
        assert!(skipped(plan.map(&row("bus", "malformed", None, b"\x01\x03"))).contains("Modbus"));
        assert!(
            skipped(plan.map(&row("forwarder", "publish_refused", None, b"{}")))
                .contains("refused")
        );
        let cut = vec![b'x'; db::DEAD_LETTER_RAW_MAX];
        assert!(skipped(plan.map(&row("farm", "oversized", Some("t"), &cut))).contains("cut"));
        assert!(
            skipped(plan.map(&row("gone", "malformed", Some("t"), b"{}")))
                .contains("not in the config")
        );
    }
}
