//! What the store's unit tests share: readings, messages, a started store and its stop, and
//! the check of the lifetime totals.

use std::sync::Arc;

use super::counts::Counts;
use super::{db, start, stats, Append, AppendOutcome, StoreHandle};
use crate::common::metrics::Metrics;
use crate::config::{Buffer, WhenFull};
use crate::reading::{Reading, SensorType, Timestamp, KIND_READING};

pub(crate) fn reading(i: i64) -> Reading {
    Reading {
        device_id: "probe-1".into(),
        field_id: "field-1".into(),
        tenant_id: "tenant-a".into(),
        sensor_type: SensorType::WaterLevel,
        value: i as f64,
        unit: "cm".into(),
        observed_at: Timestamp(1_780_287_300_000_000_000 + i * 1_000_000_000),
        battery: None,
        rssi: None,
        raw_value: None,
        original_timestamp: None,
        device_time: true,
        stale_after_ms: 3_600_000,
        metadata: None,
    }
}

pub(crate) fn message(i: i64, resent: bool) -> Append {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&i.to_le_bytes());
    Append {
        readings: vec![reading(i)],
        dead_letters: Vec::new(),
        message_key: Some(key),
        maybe_duplicate: resent,
        frame_key: None,
        trace: None,
    }
}

pub(crate) async fn append(store: &StoreHandle, a: Append) -> AppendOutcome {
    store.append(a).await.unwrap().await.unwrap().unwrap()
}

pub(crate) async fn close(store: StoreHandle, thread: std::thread::JoinHandle<()>) {
    drop(store);
    tokio::task::spawn_blocking(move || thread.join().unwrap())
        .await
        .unwrap();
}

const MINUTE_NS: i64 = 60 * 1_000_000_000;

/// Device `device`'s reading `i`, observed `i * step_min` minutes after a fixed start.
pub(crate) fn series_reading(
    device: &str,
    sensor_type: SensorType,
    i: i64,
    step_min: i64,
) -> Reading {
    Reading {
        device_id: device.into(),
        sensor_type,
        value: i as f64,
        observed_at: Timestamp(1_780_287_300_000_000_000 + i * step_min * MINUTE_NS),
        ..reading(0)
    }
}

pub(crate) fn one(r: Reading) -> Append {
    Append {
        readings: vec![r],
        ..Append::default()
    }
}

pub(crate) fn bounded(max_bytes: u64, when_full: WhenFull) -> Buffer {
    Buffer {
        max_bytes: crate::config::ByteSize(max_bytes),
        when_full,
        min_free_disk: crate::config::ByteSize(0),
        ..Buffer::default()
    }
}

/// Buffered readings of `device`, by value, in seq order.
pub(crate) async fn buffered(store: &StoreHandle, device: &str) -> Vec<i64> {
    let mut seqs = Vec::new();
    let rows = store.fetch(0, 1_000_000).await.unwrap();
    // Not a forwarder: nothing of what it read is held.
    store.holding(None).await.unwrap();
    assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
    for row in rows.iter().filter(|r| r.kind == KIND_READING) {
        let r: Reading = postcard::from_bytes(&row.body).unwrap();
        if r.device_id == device {
            seqs.push(r.value as i64);
        }
    }
    seqs
}

/// The stored totals, checked against the identity of [`counts`].
pub(crate) fn totals_hold(path: &std::path::Path) -> Counts {
    let conn = db::open_read_only(path).unwrap();
    let s = stats(&conn).unwrap();
    let c = s.counts;
    assert_eq!(
        c.accepted,
        c.forwarded + c.dropped_total() + c.refused + s.readings,
        "{c:?}, {} buffered",
        s.readings
    );
    c
}

/// The bytes a buffer holds after `readings` were appended (the bound for the next step).
pub(crate) async fn bytes_of(path: &std::path::Path, readings: &[Reading]) -> u64 {
    let (store, thread) = start(
        path.to_path_buf(),
        Buffer::default(),
        20.0,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    for r in readings {
        append(&store, one(r.clone())).await;
    }
    close(store, thread).await;
    let conn = db::open_read_only(path).unwrap();
    stats(&conn).unwrap().bytes
}
