//! Sensor liveness kept in the buffer (`sensors` table), so it survives restarts: a sensor that
//! reports for the first time or after being stale becomes `Online`, one silent past its stale
//! timeout `Offline` (also when it died while the gateway was down), and a battery falling below
//! the threshold is flagged once per crossing. Each change is returned for the caller to buffer
//! as a status event in the same transaction. The statements are in [`super::db::sensors`].

use std::collections::hash_map::{Entry, HashMap};

use rusqlite::Transaction;

use super::db::sensors::{self, Seen};
use crate::reading::{Reading, SensorStatus, SensorType, StatusChange, Timestamp};

/// Records that the sensors of `readings` (in store order) reported at `now_ms`; returns the
/// status changes, in order: every low-battery crossing counts, even within one transaction.
pub(crate) fn observe(
    tx: &Transaction<'_>,
    readings: &[&Reading],
    now_ms: i64,
    low_battery: f64,
) -> rusqlite::Result<Vec<StatusChange>> {
    let mut sensors = Observed::default();
    let mut changes = Vec::new();
    for r in readings {
        let state = sensors.of(tx, r)?;
        changes.extend(state.step(r, now_ms, low_battery));
    }
    for key in &sensors.order {
        if let Some(s) = sensors.states.get(key) {
            sensors::record(tx, &s.seen, now_ms)?;
        }
    }
    Ok(changes)
}

/// Marks sensors silent past their stale timeout as offline; returns the changes.
pub(crate) fn expire(tx: &Transaction<'_>, now_ms: i64) -> rusqlite::Result<Vec<StatusChange>> {
    sensors::expire(tx, now_ms)
}

/// The sensors one transaction saw, in the order it first saw them.
#[derive(Default)]
struct Observed<'a> {
    states: HashMap<(&'a str, SensorType), State<'a>>,
    order: Vec<(&'a str, SensorType)>,
}

/// A sensor's liveness as the transaction goes along.
struct State<'a> {
    online: bool,
    seen: Seen<'a>,
}

impl<'a> Observed<'a> {
    /// The state of `r`'s sensor: as stored when first seen in this transaction.
    fn of(&mut self, tx: &Transaction<'_>, r: &'a Reading) -> rusqlite::Result<&mut State<'a>> {
        let key = (r.device_id.as_str(), r.sensor_type);
        Ok(match self.states.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let (online, low_battery) =
                    sensors::state(tx, &r.device_id, r.sensor_type)?.unwrap_or((false, false));
                self.order.push(key);
                e.insert(State {
                    online,
                    seen: Seen {
                        last: r,
                        low_battery,
                        count: 0,
                    },
                })
            }
        })
    }
}

impl<'a> State<'a> {
    /// Takes in one reading of the sensor; returns the changes it makes.
    fn step(&mut self, r: &'a Reading, now_ms: i64, low_battery: f64) -> Vec<StatusChange> {
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
        let mut changes = Vec::new();
        if !self.online {
            changes.push(change(SensorStatus::Online));
            self.online = true;
        }
        if let Some(b) = r.battery {
            let low = b < low_battery;
            if low && !self.seen.low_battery {
                changes.push(change(SensorStatus::LowBattery));
            }
            self.seen.low_battery = low;
        }
        self.seen.last = r;
        self.seen.count += 1;
        changes
    }
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
