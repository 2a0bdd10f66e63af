//! A sliding-window request count per key, for the caps a client's
//! traffic meets (API keys' request rate, organization tokens' admin
//! writes).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::ledger::ids::IdDashMap;

/// Each key's requests in the current and the previous window,
/// windows aligned on a fixed start. A request is admitted while the
/// requests of the last window's length before it (this window's, and the
/// previous one's in proportion to how much of it is still that recent)
/// stay within the cap. Counting this window alone let a key send the cap
/// just before a boundary and again just after it.
pub struct RequestWindows {
    window_ms: u64,
    start: Instant,
    keys: IdDashMap<u64, Window>,
    /// The window in which idle keys were last forgotten.
    pruned: AtomicU64,
}

#[derive(Clone, Copy)]
struct Window {
    index: u64,
    previous: u64,
    current: u64,
}

impl RequestWindows {
    pub fn new(window: Duration) -> Self {
        RequestWindows {
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1),
            start: Instant::now(),
            keys: IdDashMap::default(),
            pruned: AtomicU64::new(0),
        }
    }

    /// Counts one request of `key` if `limit` a window allows it.
    pub fn admit(&self, key: u64, limit: u32) -> bool {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.admit_at(key, limit, now)
    }

    /// [`RequestWindows::admit`] at `now` ms after the windows' start (the
    /// tests set the time rather than sleep through it).
    fn admit_at(&self, key: u64, limit: u32, now: u64) -> bool {
        let (index, into) = (now / self.window_ms, now % self.window_ms);
        self.forget_idle(index);
        let mut window = self.keys.entry(key).or_insert(Window { index, previous: 0, current: 0 });
        // A thread that read the clock before another moved the window on
        // counts at the start of the newer window: never back.
        let (index, into) = if index < window.index { (window.index, 0) } else { (index, into) };
        if window.index != index {
            let previous = if window.index + 1 == index { window.current } else { 0 };
            *window = Window { index, previous, current: 0 };
        }
        // previous × (window − into) / window + current + 1 ≤ limit, in integers.
        let recent = u128::from(window.previous) * u128::from(self.window_ms - into)
            + u128::from(window.current + 1) * u128::from(self.window_ms);
        if recent > u128::from(limit) * u128::from(self.window_ms) {
            return false;
        }
        window.current += 1;
        true
    }

    /// Once per window, forgets keys with no request in this or the last.
    fn forget_idle(&self, index: u64) {
        let pruned = self.pruned.load(Ordering::Relaxed);
        if pruned < index
            && self.pruned.compare_exchange(pruned, index, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.keys.retain(|_, window| window.index + 1 >= index);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::RequestWindows;

    fn admitted(windows: &RequestWindows, key: u64, limit: u32, at_ms: u64, tries: usize) -> usize {
        (0..tries).filter(|_| windows.admit_at(key, limit, at_ms)).count()
    }

    #[test]
    fn the_cap_holds_across_a_window_boundary() {
        let windows = RequestWindows::new(Duration::from_millis(400));
        // The whole cap just before the boundary...
        assert_eq!(admitted(&windows, 7, 20, 340, 30), 20, "the cap, and no more, within a window");
        // ...and just after it: a fixed window would admit the cap again.
        // At 420 ms, 95% of the last window is still that recent: one more.
        assert_eq!(admitted(&windows, 7, 20, 420, 20), 1, "admitted just after the boundary");
        // Halfway into the next window half of those still count.
        assert_eq!(admitted(&windows, 7, 20, 600, 20), 9);
        // Two windows on, the old ones weigh nothing.
        assert_eq!(admitted(&windows, 7, 20, 1_200, 30), 20);
    }

    #[test]
    fn requests_older_than_a_window_never_count_however_quiet_the_key_was() {
        // pingora-limits moves to a new window only when a request comes: after a quiet
        // spell its "previous" window held requests far older than one window, at full weight.
        let windows = RequestWindows::new(Duration::from_millis(200));
        assert_eq!(admitted(&windows, 1, 10, 0, 10), 10);
        // Nine tenths of the next window later, a tenth of those requests is that recent.
        assert_eq!(admitted(&windows, 1, 10, 380, 10), 9, "only a tenth of the old window counts");
        // Quiet for more than a window: none of it counts.
        assert_eq!(admitted(&windows, 1, 10, 1_000, 20), 10);
        // The same, for a key the pruning has not removed: a window two
        // back is not the previous one.
        let windows = RequestWindows::new(Duration::from_millis(100));
        assert!(windows.admit_at(9, 5, 250), "prunes at window 2");
        assert_eq!(admitted(&windows, 1, 5, 50, 5), 5, "a stale clock puts key 1 in window 0");
        assert_eq!(admitted(&windows, 1, 5, 250, 5), 5, "window 0 is not window 2's previous");
    }

    #[test]
    fn a_clock_read_before_another_thread_moved_the_window_counts_in_the_newer_one() {
        let windows = RequestWindows::new(Duration::from_millis(100));
        assert_eq!(admitted(&windows, 3, 5, 150, 5), 5);
        // Read at 90 ms, counted at the start of the window from 100 ms: full.
        assert_eq!(admitted(&windows, 3, 5, 90, 5), 0);
    }

    #[test]
    fn keys_idle_for_a_window_are_forgotten() {
        let windows = RequestWindows::new(Duration::from_millis(100));
        assert!(windows.admit_at(1, 5, 0));
        assert!(windows.admit_at(2, 5, 150));
        assert_eq!(windows.keys.len(), 2);
        assert!(windows.admit_at(2, 5, 250));
        assert_eq!(windows.keys.len(), 1, "key 1, last seen two windows ago, is gone");
    }
}
