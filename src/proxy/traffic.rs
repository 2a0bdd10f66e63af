//! Per-key traffic caps: requests per minute and requests in flight, counted
//! with pingora-limits' estimators. Over a cap the answer is 429 with
//! `Retry-After`, before anything is held or charged.

use std::time::Duration;

use pingora_limits::inflight::{Guard, Inflight};
use pingora_limits::rate::Rate;

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
        TrafficCaps { config, rate: Rate::new(RATE_WINDOW), in_flight: Inflight::new() }
    }

    /// Admit one request of `key`, or say which cap it hit. The guard keeps
    /// the request counted as in flight until it is dropped (at settle).
    pub fn admit(&self, key: KeyId) -> Result<Option<Guard>, ProxyError> {
        let caps = self.config.caps_for(key.0);
        if let Some(limit) = caps.requests_per_minute {
            let seen = self.rate.observe(&key.0, 1);
            if seen > isize::try_from(limit).unwrap_or(isize::MAX) {
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
