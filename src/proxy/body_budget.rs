//! The memory the proxy spends on request bodies it reads whole (model
//! routes: it must see `model` and the cap before it holds credit). Each is
//! bounded by `max_body_bytes`, but not their sum: many connections sending
//! large bodies slowly, each inside its read timeout, could hold gigabytes.
//! A shared budget of `max_buffered_body_bytes` bounds the sum; a body that
//! would pass it is refused with 503 `gateway_busy` as it arrives. Each
//! organization may hold at most `max_buffered_body_bytes_per_org` of it, so
//! one tenant's slow bodies (its keys are many, each with its own in-flight
//! cap) cannot leave every other tenant refused.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::ProxyError;
use crate::ledger::ids::{IdDashMap, OrgId};

/// Budget units: KiB, so a budget of any size fits the semaphore.
const UNIT: u64 = 1024;

pub struct BodyBudget {
    units: Semaphore,
    /// Units each organization holds now (one entry per organization that
    /// ever sent a body: the operator creates them, so they are few).
    by_org: IdDashMap<OrgId, AtomicU64>,
    per_org_units: u64,
}

impl BodyBudget {
    pub fn new(max_buffered_bytes: u64, per_org_bytes: u64) -> BodyBudget {
        // Rounded up, as each body's share is: a budget equal to the largest
        // body always admits one.
        let units = usize::try_from(max_buffered_bytes.div_ceil(UNIT)).unwrap_or(Semaphore::MAX_PERMITS);
        BodyBudget {
            units: Semaphore::new(units.min(Semaphore::MAX_PERMITS)),
            by_org: IdDashMap::default(),
            per_org_units: per_org_bytes.div_ceil(UNIT),
        }
    }

    /// Reads `body` whole, up to `limit_bytes`, taking its size from the
    /// budget (and `org`'s share of it) as it arrives (not as declared: a
    /// client could declare large bodies it never sends and hold the
    /// budget); what it took goes back when the returned hold drops.
    pub async fn read(
        &self,
        mut body: Incoming,
        limit_bytes: u64,
        org: OrgId,
    ) -> Result<(Bytes, Taken<'_>), ProxyError> {
        use http_body::Body as _;
        if body.size_hint().lower() > limit_bytes {
            return Err(ProxyError::BodyTooLarge { limit_bytes });
        }
        let mut taken = Taken { budget: self, org, permit: None, units: 0 };
        // One frame (the common case) is kept as it came; more are joined.
        let mut first: Option<Bytes> = None;
        let mut joined: Option<BytesMut> = None;
        let mut size = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|error| ProxyError::InvalidField {
                field: "body",
                reason: format!("could not be read: {error}"),
            })?;
            let Ok(data) = frame.into_data() else { continue };
            size += data.len() as u64;
            if size > limit_bytes {
                return Err(ProxyError::BodyTooLarge { limit_bytes });
            }
            taken.cover(size)?;
            match (&mut joined, first.take()) {
                (Some(joined), _) => joined.extend_from_slice(&data),
                (None, None) => first = Some(data),
                (None, Some(earlier)) => {
                    let mut both = BytesMut::with_capacity(earlier.len() + data.len());
                    both.extend_from_slice(&earlier);
                    both.extend_from_slice(&data);
                    joined = Some(both);
                }
            }
        }
        let bytes = match (joined, first) {
            (Some(joined), _) => joined.freeze(),
            (None, first) => first.unwrap_or_default(),
        };
        Ok((bytes, taken))
    }
}

/// What one body took from the budget so far; given back when dropped.
pub struct Taken<'a> {
    budget: &'a BodyBudget,
    org: OrgId,
    permit: Option<SemaphorePermit<'a>>,
    units: u64,
}

impl Taken<'_> {
    /// Takes enough to cover `bytes` in all, or refuses the body.
    fn cover(&mut self, bytes: u64) -> Result<(), ProxyError> {
        let needed = bytes.div_ceil(UNIT);
        if needed <= self.units {
            return Ok(());
        }
        let more_units = needed - self.units;
        let more = u32::try_from(more_units).map_err(|_| ProxyError::BodyBudget)?;
        // The organization's share first, then the whole budget.
        let within_share = |held: &AtomicU64| {
            let mut before = held.load(Ordering::Acquire);
            loop {
                if before + more_units > self.budget.per_org_units {
                    return false;
                }
                match held.compare_exchange_weak(
                    before,
                    before + more_units,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return true,
                    Err(now) => before = now,
                }
            }
        };
        let admitted = match self.budget.by_org.get(&self.org) {
            Some(held) => within_share(&held),
            None => within_share(&self.budget.by_org.entry(self.org).or_default()),
        };
        if !admitted {
            return Err(ProxyError::BodyBudget);
        }
        let permit = match self.budget.units.try_acquire_many(more) {
            Ok(permit) => permit,
            Err(_) => {
                self.give_back_org(more_units);
                return Err(ProxyError::BodyBudget);
            }
        };
        match &mut self.permit {
            Some(taken) => taken.merge(permit),
            None => self.permit = Some(permit),
        }
        self.units = needed;
        Ok(())
    }

    fn give_back_org(&self, units: u64) {
        if let Some(held) = self.budget.by_org.get(&self.org) {
            held.fetch_sub(units, Ordering::AcqRel);
        }
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if self.units > 0 {
            self.give_back_org(self.units);
        }
    }
}
