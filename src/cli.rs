//! Commands that inspect a config or a buffer without running the gateway.

use std::io::Write;
use std::path::Path;

use crate::common::status::StatusReport;
use crate::config::{self, ConfigError};
use crate::store::counts::DropReason;
use crate::store::{self, db, Inspector, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the gateway at http://{addr}{path}: {reason} (is it running with this config?)")]
    Unreachable {
        addr: std::net::SocketAddr,
        path: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A query on an opened buffer failed ([`Inspector`]): shows the SQLite error alone, as
    /// this message always has (the path is in the open step's errors).
    #[error("reading the buffer: {}", std::error::Error::source(.0).map_or_else(|| .0.to_string(), |e| e.to_string()))]
    Read(StoreError),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    #[error(transparent)]
    Passwd(#[from] crate::sources::listener::auth::AuthError),
    #[error("no password on standard input")]
    NoPassword,
    #[error("the gateway at http://{addr}{path} answered {status}: {body}")]
    Gateway {
        addr: std::net::SocketAddr,
        path: &'static str,
        status: u16,
        body: String,
    },
    #[error("no gateway answers at http://{addr} ({reason}), and another process holds the buffer's lock {}: is the gateway starting, or another replay running? Try again in a moment", lock.display())]
    Busy {
        addr: std::net::SocketAddr,
        reason: String,
        lock: std::path::PathBuf,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(
        "--since {0}: neither an RFC 3339 time (2026-06-01T04:00:00Z) nor a duration (2h, 30m)"
    )]
    Since(String),
}

/// `validate`: prints every problem and returns false, or prints a summary and returns true.
/// Besides the config itself, the secret and TLS files it names are read and checked as `run`
/// will (a weak password in a file, a damaged key, a missing CA file are problems).
pub fn validate(path: &Path, out: &mut impl Write) -> Result<bool, CliError> {
    match config::load(path) {
        Ok(c) => {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let findings =
                crate::common::secrets::check_files(&c, config::section_line(&text, "[nats]"));
            let (problems, notes): (Vec<_>, Vec<_>) = findings.into_iter().partition(|f| f.problem);
            if !problems.is_empty() {
                writeln!(out, "{}: {} problem(s)", path.display(), problems.len())?;
                for p in &problems {
                    writeln!(out, "  line {}: {}", p.line, p.message)?;
                }
            } else {
                let sensors: usize = c.fields.iter().map(|f| f.sensors.len()).sum();
                writeln!(
                    out,
                    "{}: ok (gateway {}, {} MQTT source(s), {} MQTT listener(s), {} serial port(s), {} field(s), {} sensor(s))",
                    path.display(),
                    c.gateway.id,
                    c.mqtt.len(),
                    c.mqtt_listener.len(),
                    c.serial.len(),
                    c.fields.len(),
                    sensors
                )?;
            }
            for n in &notes {
                writeln!(out, "  note: line {}: {}", n.line, n.message)?;
            }
            Ok(problems.is_empty())
        }
        Err(ConfigError::Invalid { path, problems }) => {
            writeln!(out, "{}: {} problem(s)", path.display(), problems.len())?;
            for p in problems {
                writeln!(out, "  {p}")?;
            }
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// `buffer stats`.
pub fn buffer_stats(config_path: &Path, json: bool, out: &mut impl Write) -> Result<(), CliError> {
    let c = config::load(config_path)?;
    let path = c.store_path();
    let s = Inspector::open(&path)?.stats().map_err(CliError::Read)?;
    let age_s = s
        .oldest_stored_ms
        .map(|t| ((db::now_ms() - t) / 1000).max(0));
    if json {
        let v = serde_json::json!({
            "file": path.display().to_string(),
            "readings": s.readings,
            "status_events": s.status_events,
            "command_results": s.command_results,
            "bytes": s.bytes,
            "max_bytes": c.buffer.max_bytes.0,
            "oldest_age_seconds": age_s,
            "next_seq": s.next_seq,
            "dead_letters": s.dead_letters_by_reason.iter().map(|(r, n)| (r.clone(), *n)).collect::<std::collections::BTreeMap<_, _>>(),
            // Lifetime totals: accepted = forwarded + dropped + refused + readings.
            "accepted": s.counts.accepted,
            "forwarded": s.counts.forwarded,
            "dropped": DropReason::ALL.map(|r| (r.label(), s.counts.dropped(r))).into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            "refused": s.counts.refused,
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(out, "buffer:        {}", path.display())?;
    writeln!(out, "readings:      {}", s.readings)?;
    writeln!(out, "status events: {}", s.status_events)?;
    writeln!(out, "cmd results:   {}", s.command_results)?;
    let pct = s.bytes as f64 * 100.0 / c.buffer.max_bytes.0.max(1) as f64;
    writeln!(
        out,
        "bytes:         {} ({pct:.1}% of max_bytes {})",
        s.bytes, c.buffer.max_bytes.0
    )?;
    match age_s {
        Some(a) => writeln!(
            out,
            "oldest:        {} ago",
            humantime::format_duration(std::time::Duration::from_secs(a as u64))
        )?,
        None => writeln!(out, "oldest:        (empty)")?,
    }
    writeln!(out, "next seq:      {}", s.next_seq)?;
    let c = &s.counts;
    writeln!(
        out,
        "since created: accepted {}, forwarded {}, dropped {}, refused {}, buffered {}",
        c.accepted,
        c.forwarded,
        c.dropped_total(),
        c.refused,
        s.readings
    )?;
    for r in DropReason::ALL {
        writeln!(out, "  dropped {:<12} {}", r.label(), c.dropped(r))?;
    }
    let total: u64 = s.dead_letters_by_reason.iter().map(|(_, n)| n).sum();
    writeln!(out, "dead-letters:  {total}")?;
    for (reason, n) in &s.dead_letters_by_reason {
        writeln!(out, "  {reason:<20} {n}")?;
    }
    Ok(())
}

/// `dead-letters list`: newest first, one JSON object per line.
pub fn dead_letters_list(
    config_path: &Path,
    limit: usize,
    out: &mut impl Write,
) -> Result<(), CliError> {
    json_lines(
        config_path,
        |i| i.dead_letters(limit),
        out,
        |d| {
            let raw = String::from_utf8(d.raw.clone())
                .map(serde_json::Value::String)
                .unwrap_or_else(|_| {
                    serde_json::Value::String(d.raw.iter().map(|b| format!("{b:02x}")).collect())
                });
            serde_json::json!({
                "id": d.id,
                "at": crate::reading::Timestamp::from_unix_millis(d.at_ms).to_rfc3339(),
                "source": d.source,
                "reason": d.reason,
                "detail": d.detail,
                "topic": d.topic,
                "device": d.device,
                "sensor_type": d.sensor_type,
                "raw": raw,
            })
        },
    )
}

/// Rows the buffer gives `read`, one JSON object (`json`) a line.
fn json_lines<T>(
    config_path: &Path,
    read: impl FnOnce(&Inspector) -> Result<Vec<T>, StoreError>,
    out: &mut impl Write,
    json: impl Fn(T) -> serde_json::Value,
) -> Result<(), CliError> {
    let c = config::load(config_path)?;
    let rows = read(&Inspector::open(&c.store_path())?).map_err(CliError::Read)?;
    for row in rows {
        writeln!(out, "{}", json(row))?;
    }
    Ok(())
}

/// GET on the gateway's loopback HTTP endpoint: (status code, body).
fn http_get(addr: std::net::SocketAddr, path: &'static str) -> Result<(u16, String), CliError> {
    let timeout = std::time::Duration::from_secs(5);
    let s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| {
        CliError::Unreachable {
            addr,
            path,
            reason: e.to_string(),
        }
    })?;
    http_exchange(s, addr, "GET", path, "", timeout)
}

/// One request on a connected stream: (status code, body).
fn http_exchange(
    mut s: std::net::TcpStream,
    addr: std::net::SocketAddr,
    method: &str,
    path: &'static str,
    body: &str,
    timeout: std::time::Duration,
) -> Result<(u16, String), CliError> {
    use std::io::Read;
    let fail = |reason: String| CliError::Unreachable { addr, path, reason };
    s.set_read_timeout(Some(timeout))
        .map_err(|e| fail(e.to_string()))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| fail(e.to_string()))?;
    let mut response = String::new();
    s.read_to_string(&mut response)
        .map_err(|e| fail(e.to_string()))?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| fail("not an HTTP response".into()))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// `status`: asks the running gateway for its [`StatusReport`] and prints a summary a person
/// can read (two reports a second apart, for the rates), or with `json` the report as JSON.
pub fn status(config_path: &Path, json: bool, out: &mut impl Write) -> Result<(), CliError> {
    let c = config::load(config_path)?;
    let addr = c.http.listen;
    let first = fetch_status(addr)?;
    if json {
        let text = serde_json::to_string_pretty(&first).unwrap_or_default();
        writeln!(out, "{text}")?;
        return Ok(());
    }
    let interval = std::time::Duration::from_secs(1);
    std::thread::sleep(interval);
    let now = fetch_status(addr)?;
    let servers: Vec<String> = c.nats.servers.iter().map(ToString::to_string).collect();
    now.write_text(
        &first,
        interval,
        &c.gateway.id.to_string(),
        &servers.join(", "),
        out,
    )?;
    Ok(())
}

/// `GET /status`, deserialised.
fn fetch_status(addr: std::net::SocketAddr) -> Result<StatusReport, CliError> {
    let path = crate::common::status::PATH;
    let (status, body) = http_get(addr, path)?;
    let gateway = |body: String| CliError::Gateway {
        addr,
        path,
        status,
        body,
    };
    if status != 200 {
        return Err(gateway(body.trim().to_string()));
    }
    serde_json::from_str(&body)
        .map_err(|e| gateway(format!("not a status report ({e}): {}", body.trim())))
}

/// `--since`: an RFC 3339 time, or a duration back from now (`2h`, `30m`); Unix milliseconds.
pub fn parse_since(text: &str) -> Result<i64, CliError> {
    if let Some(t) = crate::reading::Timestamp::parse_rfc3339(text) {
        return Ok(t.unix_millis());
    }
    let back = humantime::parse_duration(text.trim()).map_err(|_| CliError::Since(text.into()))?;
    Ok(db::now_ms().saturating_sub(i64::try_from(back.as_millis()).unwrap_or(i64::MAX)))
}

/// `dead-letters replay`: asks the running gateway to replay (the mapping in force, its store
/// thread); with no gateway listening, opens the buffer itself under its lock. See
/// [`crate::replay`].
pub fn dead_letters_replay(
    config_path: &Path,
    filter: store::ReplayFilter,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let c = config::load(config_path)?;
    let addr = c.http.listen;
    let path = crate::replay::PATH;
    let (report, via) =
        match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)) {
            Ok(s) => {
                let body = serde_json::to_string(&filter).unwrap_or_default();
                // A replay of many rows is one transaction: give it time.
                let timeout = std::time::Duration::from_secs(120);
                let (status, answer) = http_exchange(s, addr, "POST", path, &body, timeout)?;
                if status != 200 {
                    return Err(CliError::Gateway {
                        addr,
                        path,
                        status,
                        body: answer.trim().to_string(),
                    });
                }
                let report: store::ReplayReport =
                    serde_json::from_str(&answer).map_err(|e| CliError::Gateway {
                        addr,
                        path,
                        status,
                        body: format!("not a replay report ({e}): {}", answer.trim()),
                    })?;
                (report, format!("by the running gateway (http://{addr})"))
            }
            Err(e) => (
                replay_offline(&c, filter, e.to_string())?,
                format!("in {} (no gateway running)", c.store_path().display()),
            ),
        };
    print_replay(&report, &via, out)
}

/// The replay without a gateway: the store started here, holding the buffer's lock. A gateway
/// that starts meanwhile waits for the lock; one that holds it makes this fail ([`CliError::Busy`]).
fn replay_offline(
    c: &config::Config,
    filter: store::ReplayFilter,
    unreachable: String,
) -> Result<store::ReplayReport, CliError> {
    let path = c.store_path();
    if !path.exists() {
        return Err(StoreError::Missing { path }.into());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    runtime.block_on(async {
        let started = store::start_locked(
            path,
            c.buffer.clone(),
            c.quality.low_battery,
            std::sync::Arc::new(crate::common::metrics::Metrics::new()),
            std::time::Duration::ZERO,
        );
        let (handle, thread) = match started {
            Ok(s) => s,
            Err(StoreError::Locked { lock, .. }) => {
                return Err(CliError::Busy {
                    addr: c.http.listen,
                    reason: unreachable,
                    lock,
                })
            }
            Err(e) => return Err(e.into()),
        };
        let plan = std::sync::Arc::new(crate::replay::Plan::new(c));
        let report = handle.replay(filter, plan).await;
        // The writer commits what is pending and releases the lock once its last handle is gone.
        drop(handle);
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        Ok(report?)
    })
}

/// One line per reason: replayed (readings stored), still rejected, skipped, with why.
fn print_replay(
    report: &store::ReplayReport,
    via: &str,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let replayed: u64 = report.reasons.values().map(|r| r.replayed).sum();
    let readings: u64 = report.reasons.values().map(|r| r.readings).sum();
    if report.dry_run {
        writeln!(
            out,
            "dry run {via}: nothing changed. A replay would replay {replayed} dead-letter(s), storing {readings} reading(s):"
        )?;
    } else {
        writeln!(
            out,
            "replayed {replayed} dead-letter(s) {via}: {readings} reading(s) stored"
        )?;
    }
    if report.reasons.is_empty() {
        writeln!(out, "  no dead-letters match")?;
    }
    for (reason, r) in &report.reasons {
        let skipped: u64 = r.skipped.values().sum();
        writeln!(
            out,
            "  {reason:<20} replayed {} ({} readings), still rejected {}, skipped {skipped}",
            r.replayed, r.readings, r.still_rejected
        )?;
        if let Some(example) = &r.example {
            writeln!(out, "    still rejected, e.g. {example} (kept)")?;
        }
        for (why, n) in &r.skipped {
            writeln!(out, "    skipped {n}: {why} (kept)")?;
        }
    }
    if report.buffer_full {
        writeln!(
            out,
            "stopped early: the buffer is full or the disk reserve reached; the rest is kept, replay again later"
        )?;
    }
    Ok(())
}

/// `mappings test`: what the gateway would make of one MQTT message, without storing it.
/// Returns false when nothing became a reading.
pub fn mappings_test(
    config_path: &Path,
    source: Option<&str>,
    topic: &str,
    payload: &[u8],
    out: &mut impl Write,
) -> Result<bool, CliError> {
    let c = config::load(config_path)?;
    let source = match source {
        Some(name) => name.to_string(),
        None => {
            let clients = c.mqtt.iter().map(|m| (&m.name, &m.topics));
            let listeners = c.mqtt_listener.iter().map(|l| (&l.name, &l.topics));
            match clients
                .chain(listeners)
                .find(|(_, topics)| topics.iter().any(|t| t.matches(topic)))
            {
                Some((name, _)) => name.to_string(),
                None => {
                    writeln!(
                        out,
                        "rejected: unmapped_topic: no [[mqtt]] source or [[mqtt_listener]] takes `{topic}`"
                    )?;
                    return Ok(false);
                }
            }
        }
    };
    let mapper = crate::ingest::mapping::Mapper::new(&c);
    let mapped = mapper.map_mqtt(&source, topic, payload, crate::reading::Timestamp::now());
    print_mapped(&source, &mapped, out)
}

/// `mappings test --serial-line`: what the gateway would make of one line on a `lines` port.
/// Returns false when nothing became a reading.
pub fn mappings_test_serial_line(
    config_path: &Path,
    port: &str,
    line: &[u8],
    out: &mut impl Write,
) -> Result<bool, CliError> {
    use crate::sources::serial::lines;
    let c = config::load(config_path)?;
    let Some(spec) = c
        .serial
        .iter()
        .find(|s| s.name.as_str() == port && s.protocol == config::Protocol::Lines)
        .map(lines::LineSpec::of)
    else {
        let names: Vec<&str> = c
            .serial
            .iter()
            .filter(|s| s.protocol == config::Protocol::Lines)
            .map(|s| s.name.as_str())
            .collect();
        writeln!(
            out,
            "no [[serial]] port `{port}` with protocol = \"lines\" (lines ports: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )?;
        return Ok(false);
    };
    let mapper = crate::ingest::mapping::Mapper::new(&c);
    let mapped = lines::map_line(&mapper, port, &spec, line, crate::reading::Timestamp::now());
    if mapped.readings.is_empty() && mapped.rejections.is_empty() {
        writeln!(out, "skipped: a blank line or the CSV header")?;
        return Ok(false);
    }
    print_mapped(port, &mapped, out)
}

/// One JSON object per reading, then one `rejected:` line per rejection.
fn print_mapped(
    source: &str,
    mapped: &crate::ingest::mapping::Mapped,
    out: &mut impl Write,
) -> Result<bool, CliError> {
    for r in &mapped.readings {
        let v = serde_json::json!({
            "source": source,
            "tenant_id": r.tenant_id,
            "field_id": r.field_id,
            "device_id": r.device_id,
            "sensor_type": r.sensor_type.as_str(),
            "value": r.value,
            "unit": r.unit,
            "timestamp": r.observed_at.to_rfc3339(),
            "battery": r.battery,
            "rssi": r.rssi,
            "raw_value": r.raw_value,
            "original_timestamp": r.original_timestamp.map(|t| t.to_rfc3339()),
        });
        writeln!(out, "{v}")?;
    }
    for r in &mapped.rejections {
        writeln!(out, "rejected: {}: {}", r.reason.label(), r.detail)?;
    }
    Ok(!mapped.readings.is_empty())
}

/// `sensors`: every mapped sensor with its liveness as the buffer records it.
pub fn sensors(config_path: &Path, out: &mut impl Write) -> Result<(), CliError> {
    let c = config::load(config_path)?;
    let known = match Inspector::open(&c.store_path()) {
        Ok(inspector) => inspector.sensors().map_err(CliError::Read)?,
        Err(StoreError::Missing { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    writeln!(
        out,
        "{:<18} {:<20} {:<22} {:<9} {:>9} {:>8}  last seen",
        "field", "device", "sensor", "state", "readings", "battery"
    )?;
    let now = db::now_ms();
    for field in &c.fields {
        for s in &field.sensors {
            let row = known
                .iter()
                .find(|k| k.device_id == s.device_id.as_str() && k.sensor_type == s.sensor_type.0);
            let (state, readings, battery, seen) = match row {
                Some(k) => (
                    match (k.online, k.low_battery) {
                        (true, true) => "low-batt",
                        (true, false) => "online",
                        (false, _) => "offline",
                    },
                    k.readings.to_string(),
                    k.battery.map_or("-".to_string(), |b| format!("{b}%")),
                    format!(
                        "{} ({} ago)",
                        crate::reading::Timestamp::from_unix_millis(k.last_seen_ms).to_rfc3339(),
                        humantime::format_duration(std::time::Duration::from_secs(
                            ((now - k.last_seen_ms) / 1000).max(0) as u64
                        ))
                    ),
                ),
                None => (
                    "unknown",
                    "0".to_string(),
                    "-".to_string(),
                    "never".to_string(),
                ),
            };
            writeln!(
                out,
                "{:<18} {:<20} {:<22} {:<9} {:>9} {:>8}  {seen}",
                field.id.as_str(),
                s.device_id.as_str(),
                s.sensor_type.0.as_str(),
                state,
                readings,
                battery
            )?;
        }
    }
    Ok(())
}

/// `passwd FILE USER`: reads the password from the first line of `input` and stores its argon2
/// hash for `user` in the listener password file (created, mode 0600, if missing).
pub fn passwd(
    file: &Path,
    user: &str,
    input: &mut impl std::io::BufRead,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let mut line = String::new();
    input.read_line(&mut line)?;
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(CliError::NoPassword);
    }
    crate::sources::listener::auth::set_password(file, user, password)?;
    writeln!(out, "{}: password of {user} set", file.display())?;
    Ok(())
}

/// A value as the CLI shows it: `on`, `off`, a number, or `unknown`.
fn shown(v: Option<crate::downlink::Value>) -> String {
    match v {
        Some(crate::downlink::Value::Switch(true)) => "on".into(),
        Some(crate::downlink::Value::Switch(false)) => "off".into(),
        Some(crate::downlink::Value::Number(n)) => n.to_string(),
        None => "unknown".into(),
    }
}

fn rfc3339(ms: i64) -> String {
    crate::reading::Timestamp::from_unix_millis(ms).to_rfc3339()
}

/// `actuators`: each configured actuator (and any the buffer knows that the config no longer
/// has) with its last confirmed state, last command and status, and off deadline.
pub fn actuators(config_path: &Path, out: &mut impl Write) -> Result<(), CliError> {
    let c = config::load(config_path)?;
    let known = match Inspector::open(&c.store_path()) {
        Ok(inspector) => inspector.actuators().map_err(CliError::Read)?,
        Err(StoreError::Missing { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let configured = c.fields.iter().flat_map(|f| {
        f.actuators
            .iter()
            .map(move |a| (f.id.as_str(), a.id.as_str()))
    });
    let removed = known
        .iter()
        .filter(|k| {
            !c.fields
                .iter()
                .any(|f| f.actuators.iter().any(|a| a.id.as_str() == k.actuator_id))
        })
        .map(|k| ("(not in config)", k.actuator_id.as_str()));
    writeln!(
        out,
        "{:<18} {:<16} {:<8} {:<40} {:<26} off deadline",
        "field", "actuator", "state", "last command", "last status"
    )?;
    for (field, id) in configured.chain(removed) {
        let row = known.iter().find(|k| k.actuator_id == id);
        let last =
            |f: fn(&store::ActuatorRow) -> Option<&str>| row.and_then(f).unwrap_or("-").to_string();
        let status = match row.and_then(|r| r.last_reason.as_deref()) {
            Some(reason) => format!("{} ({reason})", last(|r| r.last_status.as_deref())),
            None => last(|r| r.last_status.as_deref()),
        };
        let command = match last(|r| r.last_command_id.as_deref()).as_str() {
            "" => "(none: off by the gateway)".to_string(),
            id => id.to_string(),
        };
        let deadline = row
            .and_then(|r| r.restored.deadline.as_ref())
            .map_or("-".to_string(), |d| d.at.to_rfc3339());
        writeln!(
            out,
            "{field:<18} {id:<16} {:<8} {command:<40} {status:<26} {deadline}",
            shown(row.and_then(|r| r.confirmed)),
        )?;
    }
    Ok(())
}

/// `commands list`: the newest commands received, newest first, one JSON object per line.
pub fn commands_list(
    config_path: &Path,
    limit: usize,
    out: &mut impl Write,
) -> Result<(), CliError> {
    json_lines(
        config_path,
        |i| i.commands(limit),
        out,
        |k| {
            serde_json::json!({
                "command_id": k.command_id,
                "actuator_id": k.actuator_id,
                "field_id": k.field_id,
                "action": k.action,
                "value": k.value,
                "state": k.state.as_str(),
                "status": k.status,
                "reason": k.reason,
                "issued_at": rfc3339(k.issued_ms),
                "expires_at": rfc3339(k.expires_ms),
                "received_at": rfc3339(k.received_ms),
                "updated_at": rfc3339(k.updated_ms),
            })
        },
    )
}
