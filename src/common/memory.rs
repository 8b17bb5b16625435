//! What the allocators keep after a burst. A reconnect after a NATS outage drains the
//! backlog at full speed on every thread, and what an allocator keeps of that peak stays in
//! RSS (the chaos soak's plateau) unless it is told to give it back.
//!
//! The binary allocates with mimalloc (`src/main.rs`): glibc's malloc cost about a sixth of
//! the CPU per reading (arena locks, merging freed chunks). SQLite's C code still calls glibc's
//! malloc, so both are tuned:
//! - mimalloc commits its arena as pages are used. On Linux it otherwise commits the arena
//!   whole, and the 1,000,000-reading drain peaked at 36–42 MiB instead of 21–25
//!   (BENCHMARKS.md). The arena is reserved before `main`, so this is a build setting
//!   (`-DMI_DEFAULT_ARENA_EAGER_COMMIT=0` in `.cargo/config.toml`); the option set at run
//!   time would come too late.
//! - glibc gets fewer arenas, so threads share their peaks.
//! - Every [`TRIM_EVERY`] both hand free pages back: `malloc_trim` releases those in the
//!   middle of glibc's arenas (on its own it only shrinks an arena from its top), and a forced
//!   `mi_collect` those mimalloc holds for its purge delay, which otherwise go only when it
//!   allocates again.
//!
//! Elsewhere than glibc the glibc settings are no-ops; an operator's own `MALLOC_ARENA_MAX` or
//! `MIMALLOC_ARENA_EAGER_COMMIT` (both read at start) wins.

use std::time::Duration;

/// Arenas for the whole process, instead of glibc's eight per core: each busy thread would
/// keep its own peak. In the bench's soak with trims the listener idled at 16.3 MiB with
/// glibc's arenas, 15.5 with two and 15.2 with one; one arena's lock cost about 2 µs of CPU
/// per reading on the listener path, two about 1 µs (BENCHMARKS.md, measured before mimalloc
/// took the Rust side's allocations; SQLite's are what is left on glibc).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENAS: libc::c_int = 2;

/// How often freed memory is given back: soon after a drain ends, since the next outage may
/// be a while off. A trim costs well under a millisecond on heaps this size, and the pages it
/// releases that load touches again cost a page fault each.
pub(crate) const TRIM_EVERY: Duration = Duration::from_secs(2);

/// Limits glibc's arenas; call before any thread is started.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tunable; called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        }
    }
}

/// Hands both allocators' free pages back to the kernel.
pub(crate) fn give_back() {
    // SAFETY: a forced collect frees only what no allocation holds; callable from any thread.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
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
    fn mimalloc_was_built_to_commit_its_arena_as_used() {
        // libmimalloc-sys names no constant for `arena_eager_commit`: it is option 4 in the
        // pinned version, and the purge delay (15, 1000 ms) beside it anchors the numbering.
        // SAFETY: reads tunables.
        let (eager, purge_delay) = unsafe {
            (
                libmimalloc_sys::mi_option_get(4),
                libmimalloc_sys::mi_option_get(15),
            )
        };
        assert_eq!(
            (eager, purge_delay),
            (0, 1000),
            "is CFLAGS from .cargo/config.toml overridden?"
        );
    }

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
