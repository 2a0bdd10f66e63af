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
