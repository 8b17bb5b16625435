//! `doctor`: what an operator checks by hand before trusting a gateway, one line per check
//! with its fix (DESIGN §9). Each check uses the code the gateway itself runs: the config is
//! read by [`config::load`], NATS is reached through [`crate::uplink::nats::Connector`], MQTT
//! brokers with the options of [`crate::sources::mqtt`], serial ports by
//! [`crate::sources::serial::open`]. Each check is bounded by [`CHECK_TIMEOUT`], so doctor
//! never hangs on a silent server.
//!
//! - [`nats`]: the connection, the streams that capture [`published_subjects`] and their
//!   duplicate windows, the commands stream and consumer;
//! - [`config_bucket`]: with `[fleet] config_bucket`, the bucket, the gateway's key readable
//!   with these credentials, and its latest revision one the gateway would take;
//! - [`mqtt`]: each `[[mqtt]]` broker and its subscriptions;
//! - [`local`]: serial ports, free disk, clock.

mod config_bucket;
mod local;
mod mqtt;
mod nats;

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::config::{self, Config, ConfigError};

/// How long one check may take.
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// How a check came out. Only `Fail` makes doctor exit 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Ok,
    Warn,
    Fail,
    /// Not run, because what it needs failed (its own line says why).
    Skip,
}

/// One line of doctor's report: what was checked, what was found and, unless it passed, the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Check {
    pub(crate) verdict: Verdict,
    /// The group, e.g. `nats`, `stream`, `mqtt farm`.
    pub(crate) name: String,
    pub(crate) found: String,
    pub(crate) fix: Option<String>,
}

impl Check {
    pub(crate) fn ok(name: impl Into<String>, found: impl Into<String>) -> Self {
        Self::new(Verdict::Ok, name, found, None)
    }

    pub(crate) fn fail(
        name: impl Into<String>,
        found: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self::with_fix(Verdict::Fail, name, found, fix)
    }

    /// Failed, or with [`Verdict::Warn`] passed with something to look at; `fix` says what to do.
    pub(crate) fn with_fix(
        verdict: Verdict,
        name: impl Into<String>,
        found: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self::new(verdict, name, found, Some(fix.into()))
    }

    pub(crate) fn skip(name: impl Into<String>, why: impl Into<String>) -> Self {
        Self::new(Verdict::Skip, name, why, None)
    }

    fn new(
        verdict: Verdict,
        name: impl Into<String>,
        found: impl Into<String>,
        fix: Option<String>,
    ) -> Self {
        Self {
            verdict,
            name: name.into(),
            found: found.into(),
            fix,
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = match self.verdict {
            Verdict::Ok => "ok",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "skip",
        };
        write!(f, "{label:<6}{}: {}", self.name, self.found)?;
        match &self.fix {
            Some(fix) => write!(f, " — fix: {fix}"),
            None => Ok(()),
        }
    }
}

/// Runs every check on the config at `path`, printing each line as it comes; true if none
/// failed.
pub fn run(path: &Path, out: &mut impl Write) -> Result<bool, DoctorError> {
    let (check, config) = config_check(path);
    writeln!(out, "{check}")?;
    let Some(config) = config else {
        writeln!(
            out,
            "{}",
            Check::skip("all", "the other checks need a valid config")
        )?;
        return Ok(false);
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DoctorError::Runtime)?;
    let passed = runtime.block_on(remote_and_local(&config, out));
    // A check that timed out may still hold a blocking thread (a hung filesystem, a serial
    // driver): doctor does not wait for it.
    runtime.shutdown_background();
    passed
}

/// The checks after the config's, in the order an operator would go.
async fn remote_and_local(config: &Config, out: &mut impl Write) -> Result<bool, DoctorError> {
    let mut passed = true;
    let mut report = |checks: Vec<Check>| -> Result<(), DoctorError> {
        for c in checks {
            passed &= c.verdict != Verdict::Fail;
            writeln!(out, "{c}")?;
        }
        Ok(())
    };
    report(nats::checks(config).await)?;
    for source in &config.mqtt {
        let name = format!("mqtt {}", source.name);
        report(vec![bounded(&name, mqtt::check(config, source)).await])?;
    }
    for port in &config.serial {
        let name = format!("serial {}", port.name);
        report(vec![bounded(&name, local::serial(port)).await])?;
    }
    report(vec![bounded("disk", local::disk(config)).await])?;
    report(vec![local::clock(config)])?;
    Ok(passed)
}

/// `check`, or a failure naming `name` if it takes longer than [`CHECK_TIMEOUT`].
pub(crate) async fn bounded(name: &str, check: impl Future<Output = Check>) -> Check {
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| timed_out(name))
}

/// A check that took longer than [`CHECK_TIMEOUT`].
pub(crate) fn timed_out(name: &str) -> Check {
    Check::fail(
        name,
        format!("no answer within {}s", CHECK_TIMEOUT.as_secs()),
        "see that the server or device answers at all (firewall, address, power)",
    )
}

/// The config, read and checked as `validate` does (secret and TLS files included).
fn config_check(path: &Path) -> (Check, Option<Config>) {
    let shown = path.display();
    let fix = format!("correct it, then run `sahool-gateway validate --config {shown}`");
    match config::load(path) {
        Ok(c) => {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let nats_line = config::section_line(&text, "[nats]");
            let problems: Vec<String> = crate::common::secrets::check_files(&c, nats_line)
                .into_iter()
                .filter(|f| f.problem)
                .map(|f| format!("line {}: {}", f.line, f.message))
                .collect();
            if problems.is_empty() {
                (Check::ok("config", format!("{shown} is valid")), Some(c))
            } else {
                let found = format!("{shown}: {}", problems.join("; "));
                (Check::fail("config", found, fix), None)
            }
        }
        Err(ConfigError::Invalid { problems, .. }) => {
            let listed: Vec<String> = problems.iter().map(ToString::to_string).collect();
            let found = format!("{shown}: {}", listed.join("; "));
            (Check::fail("config", found, fix), None)
        }
        Err(e) => (
            Check::fail(
                "config",
                e.to_string(),
                "give the path of the gateway's config file",
            ),
            None,
        ),
    }
}

/// Every subject this gateway publishes to, as configured: readings and sensor liveness for
/// each configured sensor (their templates may name the tenant, field, device or type), and
/// the gateway's own events. Later publishers add theirs here, so `doctor` checks them too.
pub(crate) fn published_subjects(config: &Config) -> Vec<String> {
    let mut subjects = BTreeSet::new();
    for field in &config.fields {
        let tenant = config.tenant_of(field).as_str();
        for sensor in &field.sensors {
            let fill = |status: &str, name: &str| match name {
                "tenant_id" => tenant.to_string(),
                "field_id" => field.id.to_string(),
                "gateway_id" => config.gateway.id.to_string(),
                "device_id" => sensor.device_id.to_string(),
                "sensor_type" => sensor.sensor_type.0.as_str().to_string(),
                "status" => status.to_string(),
                _ => String::new(),
            };
            subjects.insert(config.nats.subject.render(|n| fill("", n)));
            for status in ["connected", "disconnected"] {
                subjects.insert(config.nats.status_subject.render(|n| fill(status, n)));
            }
        }
    }
    let mut list: Vec<String> = subjects.into_iter().collect();
    list.extend(GATEWAY_SUBJECTS.map(String::from));
    list
}

/// The gateway's own events: heartbeat, remote config outcomes, actuator results. The
/// renderer's constants where it publishes them already, so the two cannot drift apart.
const GATEWAY_SUBJECTS: [&str; 3] = [
    crate::uplink::event::GATEWAY_STATUS_SUBJECT,
    "sahool.iot.gateway.config",
    crate::uplink::event::RESULT_SUBJECT,
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::config::test_support::MINIMAL;

    #[test]
    fn lines_name_the_check_and_the_fix() {
        let ok = Check::ok("nats", "connected");
        assert_eq!(ok.to_string(), "ok    nats: connected");
        let fail = Check::fail("stream", "no stream captures a.b", "add it");
        assert_eq!(
            fail.to_string(),
            "FAIL  stream: no stream captures a.b — fix: add it"
        );
    }

    #[test]
    fn every_published_subject_is_listed_once() {
        let c = parse(&format!(
            "{MINIMAL}subject = \"sahool.tenant.{{tenant_id}}.iot.sensor.reading\"\n\
             [[fields]]\nid = \"f1\"\n  [[fields.sensors]]\n  device_id = \"d1\"\n  sensor_type = \"soil_moisture\"\n\
               [[fields.sensors]]\n  device_id = \"d2\"\n  sensor_type = \"soil_moisture\"\n\
             [[fields]]\nid = \"f2\"\ntenant_id = \"tenant-b\"\n  [[fields.sensors]]\n  device_id = \"d3\"\n  sensor_type = \"soil_moisture\"\n"
        ))
        .unwrap();
        assert_eq!(
            published_subjects(&c),
            [
                "sahool.iot.sensor.connected",
                "sahool.iot.sensor.disconnected",
                "sahool.tenant.tenant-a.iot.sensor.reading",
                "sahool.tenant.tenant-b.iot.sensor.reading",
                "sahool.iot.gateway.status",
                "sahool.iot.gateway.config",
                "sahool.iot.actuator.result",
            ]
        );
    }
}
