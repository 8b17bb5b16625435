//! Rate limits for log lines that repeat while a fault lasts (a dead link, a full disk), so the
//! journal shows the fault and how often it recurred, not thousands of identical lines.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets one line through per interval and counts the ones held back in between.
pub(crate) struct LogLimit {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimit {
    pub(crate) const fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(n)`: log now, `n` lines were held back since the last one. `None`: hold this one.
    pub(crate) fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last, held) = &mut *state;
        match last {
            Some(t) if t.elapsed() < self.every => {
                *held += 1;
                None
            }
            _ => {
                *last = Some(Instant::now());
                Some(std::mem::take(held))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let limit = LogLimit::new(Duration::from_millis(50));
        assert_eq!(limit.admit(), Some(0));
        assert_eq!(limit.admit(), None);
        assert_eq!(limit.admit(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(limit.admit(), Some(2));
    }
}
