//! The latest value of the sensors an interlock watches (`block_when`), taken from every
//! append as it is queued, whatever the input. Memory only: after a restart an interlock waits
//! for a fresh reading, which is the safe side (a missing reading blocks).

use std::collections::HashMap;
use std::sync::RwLock;

use crate::reading::{Reading, SensorType, Timestamp};

/// Values by sensor (`device_id/sensor_type`), with the instant each stops being fresh.
#[derive(Debug, Default)]
pub(crate) struct Latest {
    watched: RwLock<HashMap<(String, SensorType), Option<Fresh>>>,
}

#[derive(Debug, Clone, Copy)]
struct Fresh {
    value: f64,
    observed_at: Timestamp,
    until: Timestamp,
}

impl Latest {
    /// Watches these sensors from now on (`device_id/sensor_type`); values already seen of
    /// sensors still watched are kept.
    pub(crate) fn watch(&self, sensors: impl IntoIterator<Item = (String, SensorType)>) {
        let mut watched = self.watched.write().unwrap_or_else(|e| e.into_inner());
        let old = std::mem::take(&mut *watched);
        for key in sensors {
            let kept = old.get(&key).copied().flatten();
            watched.insert(key, kept);
        }
    }

    /// Takes the newest observation of each watched sensor among `readings`.
    pub(crate) fn observe(&self, readings: &[Reading]) {
        let unwatched = self.watched.read().map_or(true, |w| w.is_empty());
        if unwatched {
            return;
        }
        let mut watched = self.watched.write().unwrap_or_else(|e| e.into_inner());
        for r in readings {
            // Looked up by a borrowed key first: most readings are of sensors nobody watches.
            let Some(slot) = watched
                .iter_mut()
                .find(|((device, kind), _)| *kind == r.sensor_type && *device == r.device_id)
                .map(|(_, slot)| slot)
            else {
                continue;
            };
            if slot.is_some_and(|f| f.observed_at > r.observed_at) {
                continue;
            }
            let stale_after = i64::try_from(r.stale_after_ms).unwrap_or(i64::MAX);
            let until = Timestamp::from_unix_millis(
                r.observed_at.unix_millis().saturating_add(stale_after),
            );
            *slot = Some(Fresh {
                value: r.value,
                observed_at: r.observed_at,
                until,
            });
        }
    }

    /// The sensor's value, if one was observed and is still fresh at `now`.
    pub(crate) fn fresh(
        &self,
        device_id: &str,
        sensor_type: SensorType,
        now: Timestamp,
    ) -> Option<f64> {
        let watched = self.watched.read().unwrap_or_else(|e| e.into_inner());
        watched
            .iter()
            .find(|((device, kind), _)| *kind == sensor_type && device == device_id)
            .and_then(|(_, slot)| *slot)
            .filter(|f| now < f.until)
            .map(|f| f.value)
    }
}
