//! Sensor liveness kept in the buffer (`sensors` table), so it survives restarts: a sensor that
//! reports for the first time or after being stale becomes `Online`, one silent past its stale
//! timeout `Offline` (also when it died while the gateway was down), and a battery falling below
//! the threshold is flagged once per crossing. Each change is returned for the caller to buffer
//! as a status event in the same transaction.

use std::collections::HashMap;

use rusqlite::{params, OptionalExtension, Transaction};

use crate::reading::{Reading, SensorStatus, SensorType, StatusChange, Timestamp};

/// Records that the sensors of `readings` (in store order) reported at `now_ms`; returns the
/// status changes, in order: every low-battery crossing counts, even within one transaction.
pub fn observe(
    tx: &Transaction<'_>,
    readings: &[&Reading],
    now_ms: i64,
    low_battery: f64,
) -> rusqlite::Result<Vec<StatusChange>> {
    struct State<'a> {
        online: bool,
        low: bool,
        last: &'a Reading,
        count: i64,
    }
    let mut get = tx.prepare_cached(
        "SELECT online, low_battery FROM sensors WHERE device_id = ?1 AND sensor_type = ?2",
    )?;
    let mut states: HashMap<(&str, SensorType), State<'_>> = HashMap::new();
    let mut order = Vec::new();
    let mut changes = Vec::new();
    for r in readings {
        let key = (r.device_id.as_str(), r.sensor_type);
        let state = match states.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let (online, low) = get
                    .query_row(params![r.device_id, r.sensor_type as i64], |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    })
                    .optional()?
                    .unwrap_or((false, false));
                order.push(key);
                e.insert(State {
                    online,
                    low,
                    last: r,
                    count: 0,
                })
            }
        };
        let change = |status| StatusChange {
            device_id: r.device_id.clone(),
            field_id: r.field_id.clone(),
            tenant_id: r.tenant_id.clone(),
            sensor_type: r.sensor_type,
            status,
            last_seen: Timestamp::from_unix_millis(now_ms),
            battery: r.battery,
            rssi: r.rssi,
        };
        if !state.online {
            changes.push(change(SensorStatus::Online));
            state.online = true;
        }
        if let Some(b) = r.battery {
            let low = b < low_battery;
            if low && !state.low {
                changes.push(change(SensorStatus::LowBattery));
            }
            state.low = low;
        }
        state.last = r;
        state.count += 1;
    }
    let mut put = tx.prepare_cached(
        "INSERT INTO sensors (device_id, sensor_type, field_id, tenant_id, last_seen_ms, stale_after_ms, online, low_battery, battery, rssi, readings)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7, ?8, ?9, ?10)
         ON CONFLICT (device_id, sensor_type) DO UPDATE SET
           field_id = ?3, tenant_id = ?4, last_seen_ms = ?5, stale_after_ms = ?6, online = 1,
           low_battery = ?7, battery = coalesce(?8, battery), rssi = coalesce(?9, rssi),
           readings = readings + ?10",
    )?;
    for key in order {
        let Some(s) = states.get(&key) else { continue };
        let r = s.last;
        put.execute(params![
            r.device_id,
            r.sensor_type as i64,
            r.field_id,
            r.tenant_id,
            now_ms,
            i64::try_from(r.stale_after_ms).unwrap_or(i64::MAX),
            s.low,
            r.battery,
            r.rssi,
            s.count,
        ])?;
    }
    Ok(changes)
}

/// Marks sensors silent past their stale timeout as offline; returns the changes.
pub(crate) fn expire(tx: &Transaction<'_>, now_ms: i64) -> rusqlite::Result<Vec<StatusChange>> {
    let stale: Vec<StatusChange> = tx
        .prepare_cached(
            "UPDATE sensors SET online = 0
             WHERE online = 1 AND stale_after_ms > 0 AND last_seen_ms + stale_after_ms < ?1
             RETURNING device_id, sensor_type, field_id, tenant_id, last_seen_ms, battery, rssi",
        )?
        .query_map([now_ms], |row| {
            let sensor_type: i64 = row.get(1)?;
            Ok(StatusChange {
                device_id: row.get(0)?,
                sensor_type: SensorType::from_u8(u8::try_from(sensor_type).unwrap_or(u8::MAX))
                    .unwrap_or(SensorType::SoilMoisture),
                field_id: row.get(2)?,
                tenant_id: row.get(3)?,
                status: SensorStatus::Offline,
                last_seen: Timestamp::from_unix_millis(row.get(4)?),
                battery: row.get(5)?,
                rssi: row.get(6)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(stale)
}

/// One row of the `sensors` table, for the `sensors` command.
#[derive(Debug, Clone)]
pub struct SensorRow {
    pub device_id: String,
    pub sensor_type: SensorType,
    pub field_id: String,
    pub(crate) last_seen_ms: i64,
    pub online: bool,
    pub low_battery: bool,
    pub battery: Option<f64>,
    pub readings: u64,
}

pub fn list(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<SensorRow>> {
    let mut stmt = conn.prepare(
        "SELECT device_id, sensor_type, field_id, last_seen_ms, online, low_battery, battery, readings
         FROM sensors ORDER BY field_id, device_id, sensor_type",
    )?;
    let rows = stmt.query_map([], |row| {
        let t: i64 = row.get(1)?;
        Ok(SensorRow {
            device_id: row.get(0)?,
            sensor_type: SensorType::from_u8(u8::try_from(t).unwrap_or(u8::MAX))
                .unwrap_or(SensorType::SoilMoisture),
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
