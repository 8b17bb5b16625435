//! Lifetime totals of readings through the buffer, kept as keys in `meta` and updated in the
//! same transaction as the rows they count, so that at every commit, across restarts and
//! `kill -9`:
//!
//! `accepted = forwarded + dropped (all reasons) + refused + buffered readings`
//!
//! (`refused`: readings the server refused for good, moved to dead-letters.) A buffer from
//! before these keys starts them at open with `accepted` = the readings it holds. The
//! statements that keep them are in [`super::db::meta`].

/// Why a bound dropped a reading; the label of `readings_dropped_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// `max_bytes` with `drop_oldest` (or `thin` when thinning frees nothing).
    BufferFull,
    /// `max_bytes` with `thin`.
    Thin,
    /// `max_age`.
    MaxAge,
}

impl DropReason {
    pub const ALL: [DropReason; 3] = [Self::BufferFull, Self::Thin, Self::MaxAge];

    pub fn label(self) -> &'static str {
        match self {
            Self::BufferFull => "buffer_full",
            Self::Thin => "thin",
            Self::MaxAge => "max_age",
        }
    }

    /// Its total's key in `meta`.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Self::BufferFull => "count_dropped_buffer_full",
            Self::Thin => "count_dropped_thin",
            Self::MaxAge => "count_dropped_max_age",
        }
    }
}

/// Keys of the totals in `meta` (the drop reasons' in [`DropReason::key`]).
pub(crate) const ACCEPTED: &str = "count_accepted";
pub(crate) const FORWARDED: &str = "count_forwarded";
pub(crate) const REFUSED: &str = "count_refused";

/// Readings counted since the buffer was created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub accepted: u64,
    pub forwarded: u64,
    /// Indexed like [`DropReason::ALL`].
    pub dropped: [u64; 3],
    pub refused: u64,
}

impl Counts {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize]
    }

    pub(crate) fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }

    /// Each total with its key in `meta`.
    pub(crate) fn keys(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        [
            (ACCEPTED, self.accepted),
            (FORWARDED, self.forwarded),
            (REFUSED, self.refused),
        ]
        .into_iter()
        .chain(DropReason::ALL.map(|r| (r.key(), self.dropped(r))))
    }
}
