//! Statements on `sensors`, the liveness of each sensor ([`crate::store::liveness`]).

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::reading::{Reading, SensorStatus, SensorType, StatusChange, Timestamp};
use crate::store::liveness::SensorRow;

/// A stored sensor type; one this version does not know reads as soil moisture.
fn sensor_type(stored: i64) -> SensorType {
    SensorType::from_u8(u8::try_from(stored).unwrap_or(u8::MAX)).unwrap_or(SensorType::SoilMoisture)
}

/// Whether a sensor is online and flagged for a low battery; `None` if it never reported.
pub(crate) fn state(
    tx: &Transaction<'_>,
    device_id: &str,
    sensor_type: SensorType,
) -> rusqlite::Result<Option<(bool, bool)>> {
    tx.prepare_cached(
        "SELECT online, low_battery FROM sensors WHERE device_id = ?1 AND sensor_type = ?2",
    )?
    .query_row(params![device_id, sensor_type as i64], |row| {
        Ok((row.get(0)?, row.get(1)?))
    })
    .optional()
}

/// What one transaction learnt of a sensor that reported.
pub(crate) struct Seen<'a> {
    /// Its latest reading.
    pub(crate) last: &'a Reading,
    pub(crate) low_battery: bool,
    /// Its readings in the transaction.
    pub(crate) count: i64,
}

/// Records a sensor as online, seen at `now_ms`.
pub(crate) fn record(tx: &Transaction<'_>, seen: &Seen<'_>, now_ms: i64) -> rusqlite::Result<()> {
    let r = seen.last;
    tx.prepare_cached(
        "INSERT INTO sensors (device_id, sensor_type, field_id, tenant_id, last_seen_ms, stale_after_ms, online, low_battery, battery, rssi, readings)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7, ?8, ?9, ?10)
         ON CONFLICT (device_id, sensor_type) DO UPDATE SET
           field_id = ?3, tenant_id = ?4, last_seen_ms = ?5, stale_after_ms = ?6, online = 1,
           low_battery = ?7, battery = coalesce(?8, battery), rssi = coalesce(?9, rssi),
           readings = readings + ?10",
    )?
    .execute(params![
        r.device_id,
        r.sensor_type as i64,
        r.field_id,
        r.tenant_id,
        now_ms,
        i64::try_from(r.stale_after_ms).unwrap_or(i64::MAX),
        seen.low_battery,
        r.battery,
        r.rssi,
        seen.count,
    ])?;
    Ok(())
}

/// Marks sensors silent past their stale timeout as offline; returns the changes.
pub(crate) fn expire(tx: &Transaction<'_>, now_ms: i64) -> rusqlite::Result<Vec<StatusChange>> {
    tx.prepare_cached(
        "UPDATE sensors SET online = 0
         WHERE online = 1 AND stale_after_ms > 0 AND last_seen_ms + stale_after_ms < ?1
         RETURNING device_id, sensor_type, field_id, tenant_id, last_seen_ms, battery, rssi",
    )?
    .query_map([now_ms], |row| {
        Ok(StatusChange {
            device_id: row.get(0)?,
            sensor_type: sensor_type(row.get(1)?),
            field_id: row.get(2)?,
            tenant_id: row.get(3)?,
            status: SensorStatus::Offline,
            last_seen: Timestamp::from_unix_millis(row.get(4)?),
            battery: row.get(5)?,
            rssi: row.get(6)?,
        })
    })?
    .collect()
}

/// Every sensor, by field, device and type.
pub(crate) fn list(conn: &Connection) -> rusqlite::Result<Vec<SensorRow>> {
    let mut stmt = conn.prepare(
        "SELECT device_id, sensor_type, field_id, last_seen_ms, online, low_battery, battery, readings
         FROM sensors ORDER BY field_id, device_id, sensor_type",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok(SensorRow {
            device_id: row.get(0)?,
            sensor_type: sensor_type(row.get(1)?),
            field_id: row.get(2)?,
            last_seen_ms: row.get(3)?,
            online: row.get(4)?,
            low_battery: row.get(5)?,
            battery: row.get(6)?,
            readings: row.get::<_, i64>(7)? as u64,
        })
    })?;
    rows.collect()
}
