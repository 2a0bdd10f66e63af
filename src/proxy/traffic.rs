//! Per-key traffic caps: requests per minute and requests in flight, counted
//! with pingora-limits' estimators. Over a cap the answer is 429 with
//! `Retry-After`, before anything is held or charged.

use std::time::Duration;

use pingora_limits::inflight::{Guard, Inflight};
use pingora_limits::rate::{Rate, RateComponents};

use super::error::ProxyError;
use crate::config::TrafficConfig;
use crate::ledger::ids::KeyId;

/// The window for the requests-per-minute cap.
const RATE_WINDOW: Duration = Duration::from_secs(60);

pub struct TrafficCaps {
    config: TrafficConfig,
    /// Count-min estimators: a collision can only over-count, so a cap may
    /// refuse a little early under extreme key cardinality, never late.
    rate: Rate,
    in_flight: Inflight,
}

impl TrafficCaps {
    pub fn new(config: TrafficConfig) -> Self {
        TrafficCaps::with_window(config, RATE_WINDOW)
    }

    fn with_window(config: TrafficConfig, window: Duration) -> Self {
        TrafficCaps { config, rate: Rate::new(window), in_flight: Inflight::new() }
    }

    /// Admit one request of `key`, or say which cap it hit. The guard keeps
    /// the request counted as in flight until it is dropped (at settle).
    pub fn admit(&self, key: KeyId) -> Result<Option<Guard>, ProxyError> {
        let caps = self.config.caps_for(key.0);
        if let Some(limit) = caps.requests_per_minute {
            self.rate.observe(&key.0, 1);
            // The requests of the last full window before now: this
            // window's, and the last one's weighted by how much of it is
            // still within a window of now. Counting this window alone let
            // a key send the cap just before a boundary and again just
            // after it: twice the cap within a second.
            let seen = self.rate.rate_with(&key.0, sliding_count);
            if seen > f64::from(limit) {
                // Refused requests do not count: a key over its cap still
                // gets the cap, not nothing.
                self.rate.observe(&key.0, -1);
                return Err(ProxyError::TrafficCap {
                    cap: "requests_per_minute",
                    limit,
                    retry_after_secs: RATE_WINDOW.as_secs(),
                });
            }
        }
        let Some(limit) = caps.max_in_flight else {
            return Ok(None);
        };
        let (guard, open) = self.in_flight.incr(key.0, 1);
        if open > isize::try_from(limit).unwrap_or(isize::MAX) {
            // Dropping the guard takes this request back out of the count.
            drop(guard);
            return Err(ProxyError::TrafficCap { cap: "max_in_flight", limit, retry_after_secs: 1 });
        }
        Ok(Some(guard))
    }
}

/// The estimator's counts as one sliding window's. A request count, not
/// money: pingora-limits gives the window's elapsed part as a float.
#[allow(clippy::float_arithmetic, clippy::cast_precision_loss)]
fn sliding_count(counts: RateComponents) -> f64 {
    counts.prev_samples as f64 * (1.0 - counts.current_interval_fraction) + counts.curr_samples as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrafficConfig;

    fn admitted(caps: &TrafficCaps, key: KeyId, tries: usize) -> usize {
        (0..tries).filter(|_| caps.admit(key).is_ok()).count()
    }

    #[test]
    fn the_rate_cap_holds_across_a_window_boundary() {
        let defaults = crate::config::TrafficCaps { requests_per_minute: Some(20), max_in_flight: None };
        let config = TrafficConfig { defaults, per_key: Default::default() };
        let window = Duration::from_millis(400);
        let caps = TrafficCaps::with_window(config, window);
        let key = KeyId(7);
        // The whole cap just before the boundary...
        std::thread::sleep(window * 17 / 20);
        assert_eq!(admitted(&caps, key, 30), 20, "the cap, and no more, within a window");
        // ...and just after it: a fixed window would admit the cap again.
        std::thread::sleep(window * 4 / 20);
        let again = admitted(&caps, key, 20);
        assert!(again <= 10, "{again} more admitted just after the boundary");
        // A window later the last one's weight is gone.
        std::thread::sleep(window * 2);
        assert_eq!(admitted(&caps, key, 20), 20);
    }
}
