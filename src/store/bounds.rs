//! The buffer's bounds (invariant 4): `max_bytes` with `when_full` (`reject_new`,
//! `drop_oldest`, `thin`), `max_age`, `dead_letter_max`, and the free-disk reserve as an
//! append meets it. Every bound deletes through [`Writer::drop_rows`], which skips the
//! forwarder's claim: the rows it fetched and may still publish.

use std::collections::HashMap;

use rusqlite::Transaction;

use super::counts::DropReason;
use super::db::{self, ScannedRow};
use super::dedupe;
use super::delta::Delta;
use super::inbox::{INBOX_MAX_AGE_MS, INBOX_MAX_ROWS};
use super::transaction::delete_row;
use super::writer::Writer;
use crate::config::WhenFull;
use crate::reading::{Reading, Timestamp, KIND_HEARTBEAT, KIND_READING};

/// Rows one thinning round considers at most (the oldest half of the buffer, up to this), so
/// a round's decoding stays bounded however large `max_bytes` is.
const THIN_ROUND_ROWS: u64 = 65_536;

/// Rounds of thinning for one append at most before falling back to dropping the oldest.
const THIN_ROUNDS_MAX: u32 = 16;

/// Readings observed within this time of the newest observation in the buffer are never
/// thinned.
const THIN_SPARE_NS: i64 = 3_600 * 1_000_000_000;

/// Whether an append's rows fit.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Room {
    /// They fit, or a bound made room by dropping old rows.
    Made,
    /// Free disk is below `min_free_disk`.
    DiskLow,
    /// `max_bytes` reached with `reject_new`.
    Full,
}

impl Writer {
    /// Room for rows of `bodies` (kind, body), each with `extra` bytes more (its trace
    /// context): a full buffer drops or thins old rows, or refuses them (`reject_new`); free
    /// disk below the reserve refuses them too.
    pub(super) fn make_room(
        &self,
        tx: &Transaction<'_>,
        bodies: &[(u8, Vec<u8>)],
        extra: usize,
        delta: &mut Delta,
    ) -> rusqlite::Result<Room> {
        if bodies.is_empty() {
            return Ok(Room::Made);
        }
        if self.disk_low {
            return Ok(Room::DiskLow);
        }
        let incoming: u64 = bodies
            .iter()
            .map(|(_, b)| (b.len() + extra) as u64 + db::ROW_OVERHEAD)
            .sum();
        let in_use = self.bytes + delta.bytes_added - delta.bytes_removed;
        let limit = self.buffer.max_bytes.0;
        if in_use + incoming <= limit {
            return Ok(Room::Made);
        }
        let need = in_use + incoming - limit;
        match self.buffer.when_full {
            WhenFull::RejectNew => return Ok(Room::Full),
            WhenFull::DropOldest => self.drop_oldest(tx, need, delta)?,
            WhenFull::Thin => self.thin(tx, need, delta)?,
        }
        Ok(Room::Made)
    }

    /// A fetch claims the rows it returns, added to what the forwarder holds already.
    pub(super) fn claim_fetched(&mut self, first: u64, last: u64) {
        self.claim = Some(match self.claim {
            Some((lo, hi)) => (lo.min(first), hi.max(last)),
            None => (first, last),
        });
    }

    /// The forwarder may still publish the rows it fetched from `from` on (`None`: none).
    pub(super) fn hold(&mut self, from: Option<u64>) {
        self.claim = from.and_then(|from| {
            self.claim
                .and_then(|(_, hi)| (from <= hi).then_some((from, hi)))
        });
    }

    fn claimed(&self, seq: u64) -> bool {
        self.claim.is_some_and(|(lo, hi)| (lo..=hi).contains(&seq))
    }

    /// Up to `limit` buffered rows with seq above `after`, oldest first, the forwarder's claim
    /// left out (it is skipped by range, not row by row).
    fn unclaimed_after(
        &self,
        tx: &Transaction<'_>,
        after: u64,
        limit: usize,
        with_body: bool,
    ) -> rusqlite::Result<Vec<ScannedRow>> {
        let scan = |after, below, limit| db::outbox::scan(tx, after, below, limit, with_body);
        match self.claim {
            Some((lo, hi)) if after < hi => {
                let mut rows = if after + 1 < lo {
                    scan(after, lo, limit)?
                } else {
                    Vec::new()
                };
                if rows.len() < limit {
                    rows.extend(scan(hi, u64::MAX, limit - rows.len())?);
                }
                Ok(rows)
            }
            _ => scan(after, u64::MAX, limit),
        }
    }

    /// The one way a bound deletes rows: each of `seqs` still buffered and not claimed by the
    /// forwarder, counted as dropped for `reason` if a reading. Returns the bytes freed.
    fn drop_rows(
        &self,
        tx: &Transaction<'_>,
        seqs: &[u64],
        reason: DropReason,
        delta: &mut Delta,
    ) -> rusqlite::Result<u64> {
        let (before, results) = (delta.bytes_removed, delta.results_removed);
        for &seq in seqs.iter().filter(|&&seq| !self.claimed(seq)) {
            if delete_row(tx, seq, delta)? == Some(true) {
                delta.dropped[reason as usize] += 1;
            }
        }
        // Not readings, so outside the totals; but the platform never sees them: say so.
        delta.results_dropped += delta.results_removed - results;
        Ok(delta.bytes_removed - before)
    }

    /// Drops the oldest rows (the forwarder's claim aside) until at least `need` bytes are
    /// free, counted as `buffer_full`.
    fn drop_oldest(
        &self,
        tx: &Transaction<'_>,
        need: u64,
        delta: &mut Delta,
    ) -> rusqlite::Result<()> {
        let mut freed = 0u64;
        let mut after = 0;
        while freed < need {
            let rows = self.unclaimed_after(tx, after, 256, false)?;
            let Some(last) = rows.last() else { break };
            after = last.seq;
            let mut planned = freed;
            let seqs: Vec<u64> = rows
                .iter()
                .take_while(|r| {
                    let take = planned < need;
                    planned += r.len as u64 + db::ROW_OVERHEAD;
                    take
                })
                .map(|r| r.seq)
                .collect();
            freed += self.drop_rows(tx, &seqs, DropReason::BufferFull, delta)?;
        }
        Ok(())
    }

    /// `when_full = "thin"`: thinning rounds until `need` bytes are free; what they cannot
    /// free (every reading recent, or series of one reading) goes by [`Self::drop_oldest`].
    ///
    /// Rounds sweep the buffer from the oldest row to the newest, each taking up where the last
    /// one stopped (`meta.thin_after`), and a new sweep begins at the oldest once one reached
    /// the end. So the whole buffer is thinned once before any part of it twice: a long outage
    /// keeps its whole span at one coarser step, and every sweep (counted in
    /// `buffer_thin_passes_total`) at most doubles any gap in a series.
    fn thin(&self, tx: &Transaction<'_>, need: u64, delta: &mut Delta) -> rusqlite::Result<()> {
        let mut freed = 0;
        for _ in 0..THIN_ROUNDS_MAX {
            if freed >= need {
                return Ok(());
            }
            let after = delta.thin_after.unwrap_or(self.thin_after);
            let (round, next) = self.thin_round(tx, after, delta)?;
            delta.thin_after = Some(next);
            if round > 0 {
                delta.thin_rounds += 1;
                delta.thin_passes += u64::from(after == 0);
                freed += round;
            } else if after == 0 {
                // A whole new sweep found nothing to thin.
                break;
            }
        }
        if freed < need {
            self.drop_oldest(tx, need - freed, delta)?;
        }
        Ok(())
    }

    /// One thinning round over the rows after seq `after`: half the buffer's rows at most (and
    /// [`THIN_ROUND_ROWS`]). In each series (device, sensor type) every other reading goes,
    /// starting with the series' second in this round; readings observed within
    /// [`THIN_SPARE_NS`] of the newest observation, status rows and the forwarder's claim stay;
    /// heartbeats are a series too ([`thin_series`]).
    /// A reading goes only if the one before it in its series stays (the first of a series in
    /// a round always does), and so does the one after it (the next in the alternation, or the
    /// first of the next round), so no gap in a series more than doubles in a sweep, and each
    /// series keeps its oldest reading. Returns the bytes freed and where the next round starts
    /// (0: this one reached the end of the buffer, the next sweep starts over).
    fn thin_round(
        &self,
        tx: &Transaction<'_>,
        after: u64,
        delta: &mut Delta,
    ) -> rusqlite::Result<(u64, u64)> {
        let rows_now = (self.rows + delta.rows_added).saturating_sub(delta.rows_removed);
        let budget = (rows_now / 2).clamp(2, THIN_ROUND_ROWS) as usize;
        let spare_from =
            newest_observation(tx)?.map_or(i64::MIN, |t| t.0.saturating_sub(THIN_SPARE_NS));
        let spare_stored_from = db::now_ms().saturating_sub(THIN_SPARE_NS / 1_000_000);
        // Per series: whether its last reading seen this round goes.
        let mut last_goes: HashMap<(String, u8), bool> = HashMap::new();
        let mut doomed = Vec::new();
        let (mut next, mut seen) = (after, 0);
        while seen < budget {
            let want = (budget - seen).min(1024);
            let rows = self.unclaimed_after(tx, next, want, true)?;
            next = rows.last().map_or(0, |r| r.seq);
            seen += rows.len();
            for row in &rows {
                let Some((series, recent)) = thin_series(row, spare_from, spare_stored_from) else {
                    continue;
                };
                // The first reading of a series counts as following a dropped one: it stays.
                let prev_goes = last_goes.entry(series).or_insert(true);
                let goes = !*prev_goes && !recent;
                *prev_goes = goes;
                if goes {
                    doomed.push(row.seq);
                }
            }
            if rows.len() < want {
                next = 0;
                break;
            }
        }
        Ok((self.drop_rows(tx, &doomed, DropReason::Thin, delta)?, next))
    }

    /// Once a second: the age bound, and the bounds of the side tables.
    pub(super) fn expire(
        &self,
        tx: &Transaction<'_>,
        now: i64,
        delta: &mut Delta,
    ) -> rusqlite::Result<()> {
        let cutoff = now - i64::try_from(self.buffer.max_age.0.as_millis()).unwrap_or(i64::MAX);
        // Rows are stored in time order, so while the oldest is within the bound there is
        // nothing to scan. (A row stored after the clock went back waits for the rows before it.)
        let oldest = db::oldest_stored_ms(tx)?;
        if oldest.is_some_and(|t| t < cutoff) {
            let expired: Vec<u64> = self
                .unclaimed_after(tx, 0, 10_000, false)?
                .iter()
                .filter(|r| r.stored_ms < cutoff)
                .map(|r| r.seq)
                .collect();
            self.drop_rows(tx, &expired, DropReason::MaxAge, delta)?;
        }
        dedupe::trim_keys(tx)?;
        db::commands::trim(tx, now - INBOX_MAX_AGE_MS, INBOX_MAX_ROWS)?;
        let cut = db::dead_letter::trim(tx, self.buffer.dead_letter_max)? as u64;
        delta.dead_letters_removed += cut;
        delta.dead_letters_evicted += cut;
        Ok(())
    }
}

/// The series a row is thinned in, and whether it is too recent to go; `None`: never thinned
/// (status rows, command results, readings with device metadata, bodies this version cannot
/// decode, which the forwarder dead-letters).
///
/// Heartbeats are one series of their own, recent by their store time (they carry no device
/// time): a sweep halves them as it halves each sensor's readings, so an outage keeps the
/// gateway's own history over its whole span at the same coarser step as the data it explains,
/// and the newest hour of heartbeats stays whole.
fn thin_series(
    row: &ScannedRow,
    spare_from: i64,
    spare_stored_from: i64,
) -> Option<((String, u8), bool)> {
    match u8::try_from(row.kind) {
        Ok(KIND_READING) => {
            let r = postcard::from_bytes::<Reading>(&row.body).ok()?;
            let recent = r.observed_at.0 >= spare_from;
            Some(((r.device_id, r.sensor_type as u8), recent))
        }
        Ok(KIND_HEARTBEAT) => Some(((String::new(), u8::MAX), row.stored_ms >= spare_stored_from)),
        _ => None,
    }
}

/// The newest observation among the newest readings buffered: the reference for what counts
/// as recent when thinning. Not the clock: a gateway may boot without time sync, and a backlog
/// uploaded late carries device times far behind it. Store order follows observation time
/// closely enough that the newest rows hold the newest observation.
fn newest_observation(tx: &Transaction<'_>) -> rusqlite::Result<Option<Timestamp>> {
    let bodies = db::outbox::newest_reading_bodies(tx, 64)?;
    Ok(bodies
        .iter()
        .filter_map(|body| postcard::from_bytes::<Reading>(body).ok())
        .map(|r| r.observed_at)
        .max())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::common::metrics::Metrics;
    use crate::config::WhenFull;
    use crate::reading::{Reading, SensorType, KIND_READING};
    use crate::store::counts::DropReason;
    use crate::store::start;
    use crate::store::testkit::*;

    #[tokio::test]
    async fn a_fetched_row_is_not_dropped_while_its_publish_may_be_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let metrics = Arc::new(Metrics::new());
        let (store, thread) = start(
            path.clone(),
            bounded(2_000, WhenFull::DropOldest),
            20.0,
            metrics.clone(),
        )
        .unwrap();
        for i in 0..5 {
            append(&store, message(i, false)).await;
        }
        // The forwarder reads them and hands them to the client: their PubAcks may come.
        let published = store.fetch(0, 100).await.unwrap();
        for i in 5..60 {
            append(&store, message(i, false)).await;
        }
        assert!(
            metrics.dropped("buffer_full").get() > 0,
            "the bound was hit"
        );
        let left: Vec<u64> = store
            .fetch(0, 1000)
            .await
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        for row in &published {
            assert!(
                left.contains(&row.seq),
                "row {} in flight was dropped",
                row.seq
            );
        }
        // Their PubAcks: counted forwarded, never also dropped.
        let (first, last) = (published[0].seq, published[published.len() - 1].seq);
        store.acked(vec![first..=last]).await.unwrap();
        store.holding(None).await.unwrap();
        store.flush().await.unwrap();
        let readings = published.iter().filter(|r| r.kind == KIND_READING).count();
        assert_eq!(metrics.readings_forwarded.get(), readings as u64);
        // Released: the bound takes the oldest again, and the rows after the claim went first.
        let before = store.fetch(0, 1).await.unwrap()[0].seq;
        store.holding(None).await.unwrap();
        for i in 60..80 {
            append(&store, message(i, false)).await;
        }
        assert!(store.fetch(0, 1).await.unwrap()[0].seq > before);
        close(store, thread).await;
        let c = totals_hold(&path);
        assert_eq!(c.forwarded, readings as u64);
        assert_eq!(
            c.dropped(DropReason::BufferFull),
            metrics.dropped("buffer_full").get()
        );
        assert_eq!(c.accepted, 80);
    }

    #[tokio::test]
    async fn a_thinning_round_drops_every_other_old_reading_of_each_series() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        // Two series at a 10-minute step, interleaved; the last 6 of each within the newest
        // hour of observations.
        let n = 40;
        let all: Vec<Reading> = (0..n)
            .flat_map(|i| {
                [
                    series_reading("a", SensorType::WaterLevel, i, 10),
                    series_reading("b", SensorType::SoilMoisture, i, 10),
                ]
            })
            .collect();
        let bound = bytes_of(&path, &all).await;
        let metrics = Arc::new(Metrics::new());
        let (store, thread) = start(
            path.clone(),
            bounded(bound, WhenFull::Thin),
            20.0,
            metrics.clone(),
        )
        .unwrap();
        // One more reading past the bound: one round.
        append(
            &store,
            one(series_reading("a", SensorType::WaterLevel, n, 10)),
        )
        .await;
        assert_eq!(metrics.buffer_thin_passes.get(), 1);
        assert_eq!(metrics.dropped("buffer_full").get(), 0);
        let mut missing_total = 0;
        for device in ["a", "b"] {
            let kept = buffered(&store, device).await;
            let missing: Vec<i64> = (0..n).filter(|i| !kept.contains(i)).collect();
            assert!(!missing.is_empty(), "{device}: thinned");
            assert_eq!(kept[0], 0, "{device}: the first reading stays");
            assert!(
                missing.windows(2).all(|w| w[1] > w[0] + 1),
                "{device}: two consecutive readings dropped in one round: {missing:?}"
            );
            // Only the oldest part (the oldest half of the rows, so about the first half of each
            // series) and nothing of the newest hour.
            assert!(
                missing.iter().all(|&i| i < n / 2 + 1),
                "{device}: {missing:?}"
            );
            assert_eq!(
                missing,
                (1..=missing.len() as i64)
                    .map(|k| 2 * k - 1)
                    .collect::<Vec<_>>()
            );
            missing_total += missing.len() as u64;
        }
        assert_eq!(metrics.dropped("thin").get(), missing_total);
        close(store, thread).await;
        assert_eq!(totals_hold(&path).dropped(DropReason::Thin), missing_total);
    }

    #[tokio::test]
    async fn thinning_keeps_the_whole_span_and_gaps_double_at_most_per_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let metrics = Arc::new(Metrics::new());
        let (store, thread) = start(
            path.clone(),
            bounded(6_000, WhenFull::Thin),
            20.0,
            metrics.clone(),
        )
        .unwrap();
        let n = 600;
        for i in 0..n {
            append(
                &store,
                one(series_reading("a", SensorType::WaterLevel, i, 5)),
            )
            .await;
            append(
                &store,
                one(series_reading("b", SensorType::SoilMoisture, i, 5)),
            )
            .await;
        }
        let passes = metrics.buffer_thin_passes.get();
        assert!(passes >= 2, "{passes} sweeps");
        for device in ["a", "b"] {
            let kept = buffered(&store, device).await;
            assert_eq!(kept[0], 0, "{device}: the span starts at the first reading");
            assert_eq!(*kept.last().unwrap(), n - 1);
            let gap = kept.windows(2).map(|w| w[1] - w[0]).max().unwrap();
            assert!(
                gap <= 1 << passes,
                "{device}: gap {gap} steps after {passes} sweeps"
            );
            // The newest hour (12 readings at 5 minutes) is whole.
            assert!(kept.ends_with(&(n - 12..n).collect::<Vec<_>>()), "{device}");
        }
        close(store, thread).await;
        let c = totals_hold(&path);
        assert_eq!(c.dropped(DropReason::Thin), metrics.dropped("thin").get());
        assert_eq!(c.accepted, 2 * n as u64);
    }

    #[tokio::test]
    async fn when_nothing_can_be_thinned_the_oldest_go_as_buffer_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let metrics = Arc::new(Metrics::new());
        let (store, thread) = start(
            path.clone(),
            bounded(3_000, WhenFull::Thin),
            20.0,
            metrics.clone(),
        )
        .unwrap();
        // One reading a second: all within the newest hour.
        for i in 0..100 {
            append(&store, message(i, false)).await;
        }
        let dropped = metrics.dropped("buffer_full").get();
        assert!(dropped > 0);
        assert_eq!(metrics.dropped("thin").get(), 0);
        assert_eq!(metrics.buffer_thin_passes.get(), 0);
        let kept = buffered(&store, "probe-1").await;
        assert_eq!(
            kept,
            (dropped as i64..100).collect::<Vec<_>>(),
            "the oldest went"
        );
        close(store, thread).await;
        totals_hold(&path);
    }
}
