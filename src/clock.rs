//! The injectable clock every time-dependent rule reads, so tests can cross
//! month, year and price-schedule boundaries without waiting.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
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
/// never leases credit past its expiry by its own clock. It never runs
/// backwards, though each reading moves the offset (by the time the
/// answer took to be read).
pub struct DatabaseClock {
    local: Arc<dyn Clock>,
    /// Microseconds the local clock ran ahead at the last reading (0: not ahead).
    ahead_micros: AtomicI64,
    /// The latest time answered since the first reading, in microseconds
    /// since the epoch (before it, the local clock is answered as it is,
    /// and must not hold the clock ahead once a reading says otherwise).
    latest_micros: AtomicI64,
    read: AtomicBool,
}

impl DatabaseClock {
    pub fn new(local: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(DatabaseClock {
            local,
            ahead_micros: AtomicI64::new(0),
            latest_micros: AtomicI64::new(i64::MIN),
            read: AtomicBool::new(false),
        })
    }

    /// Records the database's clock as a statement that has just answered
    /// read it. The local reading comes after the database's, so a correct
    /// local clock is held back by up to one round trip, never put ahead.
    pub fn observe(&self, database_now: DateTime<Utc>) {
        let ahead = (self.local.now() - database_now).num_microseconds().unwrap_or(i64::MAX).max(0);
        self.ahead_micros.store(ahead, Ordering::Relaxed);
        self.read.store(true, Ordering::Release);
    }
}

impl std::fmt::Debug for DatabaseClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseClock").field("ahead_micros", &self.ahead_micros).finish_non_exhaustive()
    }
}

impl Clock for DatabaseClock {
    fn now(&self) -> DateTime<Utc> {
        // First: once it says a reading was made, that reading's offset is
        // seen below (a local time must never be kept as the latest).
        let read = self.read.load(Ordering::Acquire);
        let local = self.local.now();
        let now = match self.ahead_micros.load(Ordering::Relaxed) {
            0 => local,
            ahead => local - TimeDelta::microseconds(ahead),
        };
        if !read {
            return now;
        }
        let micros = now.timestamp_micros();
        let latest = self.latest_micros.fetch_max(micros, Ordering::Relaxed);
        if latest > micros {
            return DateTime::from_timestamp_micros(latest).unwrap_or(now);
        }
        now
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
        // A reading that finds it further ahead (an answer read late) never moves it back.
        clock.observe(database + TimeDelta::minutes(59));
        assert_eq!(clock.now(), database + TimeDelta::hours(1));
        local.advance(TimeDelta::seconds(30));
        assert_eq!(clock.now(), database + TimeDelta::hours(1), "held until it catches up");
        clock.observe(database + TimeDelta::hours(1) + TimeDelta::seconds(30));
        assert_eq!(clock.now(), database + TimeDelta::hours(1) + TimeDelta::seconds(30));
        // A local clock behind the database's is not moved forward.
        let local = ManualClock::new(database - TimeDelta::minutes(5));
        let clock = DatabaseClock::new(local.clone());
        clock.observe(database);
        assert_eq!(clock.now(), database - TimeDelta::minutes(5));
    }
}
