//! What glibc's allocator keeps after a burst. A reconnect after a NATS outage drains the
//! backlog at full speed on every thread; each thread's malloc arena grows by a megabyte or
//! two for it and keeps the freed pages, so RSS steps up with the first outage and stays (the
//! chaos soak's plateau). Two settings bound that: fewer arenas, so threads share their
//! peaks, and a periodic `malloc_trim`, which hands freed pages in the middle of arenas back
//! to the kernel (glibc on its own only shrinks an arena from its top). Elsewhere than glibc
//! both are no-ops.

use std::time::Duration;

/// Arenas for the whole process, instead of glibc's eight per core: the busy threads (two
/// tokio workers, the store's writer) would each keep a drain's peak. In the bench's soak with
/// trims the listener idled at 16.3 MiB with glibc's arenas, 15.5 with two and 15.2 with one;
/// one arena's lock cost about 2 µs of CPU per reading on the listener path, two about 1 µs
/// (BENCHMARKS.md). A board short of CPU rather than memory can set `MALLOC_ARENA_MAX` in the
/// unit's environment.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENAS: libc::c_int = 2;

/// How often freed memory is given back: soon after a drain ends, since the next outage may
/// be a while off. A trim costs well under a millisecond on heaps this size, and the pages it
/// releases that load touches again cost a page fault each.
pub(crate) const TRIM_EVERY: Duration = Duration::from_secs(2);

/// Limits the allocator's arenas; call before any thread is started. An operator's own
/// `MALLOC_ARENA_MAX` (glibc reads it at start) wins.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tunable; called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        }
    }
}

/// Hands the allocator's free pages back to the kernel.
pub(crate) fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the arenas' locks itself and touches only free chunks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Gives freed memory back every [`TRIM_EVERY`], for as long as the runtime runs.
pub async fn give_back_periodically() {
    let mut every = tokio::time::interval(TRIM_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn giving_back_leaves_live_memory_alone() {
        let kept: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 64 << 10]).collect();
        drop((0..64).map(|_| vec![0u8; 64 << 10]).collect::<Vec<_>>());
        give_back();
        assert!(kept
            .iter()
            .enumerate()
            .all(|(i, v)| v.iter().all(|b| *b == i as u8)));
    }
}
