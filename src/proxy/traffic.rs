//! Per-key traffic caps: requests per minute (a sliding window per key)
//! and requests in flight (pingora-limits' estimator). Over a cap the
//! answer is 429 with `Retry-After`, before anything is held or charged.

use std::time::Duration;

use pingora_limits::inflight::{Guard, Inflight};

use super::error::ProxyError;
use crate::config::TrafficConfig;
use crate::ledger::ids::KeyId;
use crate::rate_window::RequestWindows;

/// The window for the requests-per-minute cap.
const RATE_WINDOW: Duration = Duration::from_secs(60);

pub struct TrafficCaps {
    config: TrafficConfig,
    rate: RequestWindows,
    /// A count-min estimator: a collision can only over-count, so a cap may
    /// refuse a little early under extreme key cardinality, never late.
    in_flight: Inflight,
}

impl TrafficCaps {
    pub fn new(config: TrafficConfig) -> Self {
        TrafficCaps::with_window(config, RATE_WINDOW)
    }

    fn with_window(config: TrafficConfig, window: Duration) -> Self {
        TrafficCaps { config, rate: RequestWindows::new(window), in_flight: Inflight::new() }
    }

    /// Admit one request of `key`, or say which cap it hit. The guard keeps
    /// the request counted as in flight until it is dropped (at settle).
    /// A refused request counts against neither cap: a key over its cap
    /// still gets the cap, not nothing.
    pub fn admit(&self, key: KeyId) -> Result<Option<Guard>, ProxyError> {
        let caps = self.config.caps_for(key.0);
        let guard = match caps.max_in_flight {
            None => None,
            Some(limit) => {
                let (guard, open) = self.in_flight.incr(key.0, 1);
                if open > isize::try_from(limit).unwrap_or(isize::MAX) {
                    // Dropping the guard takes this request back out of the count.
                    return Err(ProxyError::TrafficCap { cap: "max_in_flight", limit, retry_after_secs: 1 });
                }
                Some(guard)
            }
        };
        if let Some(limit) = caps.requests_per_minute {
            if !self.rate.admit(key.0, limit) {
                return Err(ProxyError::TrafficCap {
                    cap: "requests_per_minute",
                    limit,
                    retry_after_secs: RATE_WINDOW.as_secs(),
                });
            }
        }
        Ok(guard)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::TrafficConfig;

    /// Caps for every key, counted in windows of `window`.
    fn caps(requests_per_minute: u32, max_in_flight: Option<u32>, window: Duration) -> TrafficCaps {
        let defaults =
            crate::config::TrafficCaps { requests_per_minute: Some(requests_per_minute), max_in_flight };
        TrafficCaps::with_window(TrafficConfig { defaults, per_key: Default::default() }, window)
    }

    fn admitted(caps: &TrafficCaps, key: KeyId, tries: usize) -> usize {
        (0..tries).filter(|_| caps.admit(key).is_ok()).count()
    }

    // The rate window's arithmetic is tested in `crate::rate_window`, on a clock the test sets.
    #[test]
    fn a_request_refused_by_one_cap_counts_against_neither() {
        let caps = caps(3, Some(1), Duration::from_secs(60));
        let open = caps.admit(KeyId(2)).unwrap();
        assert!(caps.admit(KeyId(2)).is_err(), "one in flight");
        drop(open);
        assert_eq!(admitted(&caps, KeyId(2), 5), 2, "the in-flight refusal took none of the rate");
    }
}
