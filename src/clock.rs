//! The injectable clock every time-dependent rule reads, so tests can cross
//! month, year and price-schedule boundaries without waiting.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use parking_lot::Mutex;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// The wall clock moved by a fixed offset. Test-only: `creditgate serve`
/// runs on it when `CREDITGATE_TEST_CLOCK_SHIFT_DAYS` is set (debug builds only), so a crash
/// test can write records on past days and then restart in the present.
#[derive(Debug, Clone, Copy)]
pub struct ShiftedClock(pub TimeDelta);

impl Clock for ShiftedClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.0
    }
}

/// A cluster replica's clock: the local clock, held back by as much as it
/// was last seen running ahead of the database's. Every replica dates the
/// shared books by it, so one whose clock runs ahead (as the treasurer, or
/// taking admin writes) cannot expire lots, grant allowances or date
/// entries early. A clock that runs behind is left as it is: the database
/// never leases credit past its expiry by its own clock.
pub struct DatabaseClock {
    local: Arc<dyn Clock>,
    /// Microseconds the local clock ran ahead at the last reading (0: not ahead).
    ahead_micros: AtomicI64,
}

impl DatabaseClock {
    pub fn new(local: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(DatabaseClock { local, ahead_micros: AtomicI64::new(0) })
    }

    /// Records the database's clock as a statement that has just answered
    /// read it. The local reading comes after the database's, so a correct
    /// local clock is held back by up to one round trip, never put ahead.
    pub fn observe(&self, database_now: DateTime<Utc>) {
        let ahead = (self.local.now() - database_now).num_microseconds().unwrap_or(i64::MAX).max(0);
        self.ahead_micros.store(ahead, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for DatabaseClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseClock").field("ahead_micros", &self.ahead_micros).finish_non_exhaustive()
    }
}

impl Clock for DatabaseClock {
    fn now(&self) -> DateTime<Utc> {
        let local = self.local.now();
        match self.ahead_micros.load(Ordering::Relaxed) {
            0 => local,
            ahead => local - TimeDelta::microseconds(ahead),
        }
    }
}

/// A clock that moves only when told to (tests, simulations).
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Arc<Self> {
        Arc::new(ManualClock(Mutex::new(start)))
    }

    pub fn set(&self, to: DateTime<Utc>) {
        *self.0.lock() = to;
    }

    pub fn advance(&self, by: TimeDelta) {
        let mut now = self.0.lock();
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_database_clock_is_held_back_to_the_database_never_put_ahead() {
        let database: DateTime<Utc> = "2027-03-01T12:00:00Z".parse().unwrap();
        let local = ManualClock::new(database + TimeDelta::days(40));
        let clock = DatabaseClock::new(local.clone());
        assert_eq!(clock.now(), database + TimeDelta::days(40), "no reading yet: the local clock");
        clock.observe(database);
        assert_eq!(clock.now(), database);
        local.advance(TimeDelta::hours(1));
        assert_eq!(clock.now(), database + TimeDelta::hours(1), "it runs at the local clock's pace");
        // A local clock behind the database's is not moved forward.
        local.set(database - TimeDelta::minutes(5));
        clock.observe(database);
        assert_eq!(clock.now(), database - TimeDelta::minutes(5));
    }
}
