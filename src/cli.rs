//! Commands that inspect a config or a buffer without running the gateway.

use std::io::Write;
use std::path::Path;

use crate::config::{self, ConfigError};
use crate::store::{self, db, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading the buffer: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

/// `validate`: prints every problem and returns false, or prints a summary and returns true.
pub fn validate(path: &Path, out: &mut impl Write) -> Result<bool, CliError> {
    match config::load(path) {
        Ok(c) => {
            let sensors: usize = c.fields.iter().map(|f| f.sensors.len()).sum();
            writeln!(
                out,
                "{}: ok (gateway {}, {} MQTT source(s), {} field(s), {} sensor(s))",
                path.display(),
                c.gateway.id,
                c.mqtt.len(),
                c.fields.len(),
                sensors
            )?;
            Ok(true)
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
    let conn = db::open_read_only(&path)?;
    let s = store::stats(&conn)?;
    let age_s = s
        .oldest_stored_ms
        .map(|t| ((db::now_ms() - t) / 1000).max(0));
    if json {
        let v = serde_json::json!({
            "file": path.display().to_string(),
            "readings": s.rows,
            "bytes": s.bytes,
            "max_bytes": c.buffer.max_bytes.0,
            "oldest_age_seconds": age_s,
            "next_seq": s.next_seq,
            "dead_letters": s.dead_letters_by_reason.iter().map(|(r, n)| (r.clone(), *n)).collect::<std::collections::BTreeMap<_, _>>(),
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(out, "buffer:        {}", path.display())?;
    writeln!(out, "readings:      {}", s.rows)?;
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
    let c = config::load(config_path)?;
    let conn = db::open_read_only(&c.store_path())?;
    for d in db::dead_letters(&conn, limit)? {
        let raw = String::from_utf8(d.raw.clone())
            .map(serde_json::Value::String)
            .unwrap_or_else(|_| {
                serde_json::Value::String(d.raw.iter().map(|b| format!("{b:02x}")).collect())
            });
        let v = serde_json::json!({
            "id": d.id,
            "at": crate::reading::Timestamp::from_unix_millis(d.at_ms).to_rfc3339(),
            "source": d.source,
            "reason": d.reason,
            "detail": d.detail,
            "raw": raw,
        });
        writeln!(out, "{v}")?;
    }
    Ok(())
}
