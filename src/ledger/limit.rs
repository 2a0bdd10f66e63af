//! Spending limits and the per-period spend counters behind them.
//!
//! A limit caps what one subject (a key, a user, an application, or one end
//! user of an application) may spend per local day, per local month, per
//! contract year, and optionally per request. Spend counts open holds at their
//! held amount and settled requests at their real cost, so a burst of
//! concurrent requests cannot slip past a cap. Counters live in the paying
//! wallet's state and are guarded by its lock, which makes check-and-reserve
//! atomic without a second lock. A limit set (or raised) mid-period counts spend
//! from the moment it is set; spend is rebuilt from the ledger on restart.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::ledger::ids::{AppId, KeyId, Owner, UserId};

/// Caps for one subject; `None` means no cap for that period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Most one request may hold.
    pub per_request: Option<Decimal>,
    /// Most per local day.
    pub daily: Option<Decimal>,
    /// Most per local month.
    pub monthly: Option<Decimal>,
    /// Most per contract year (calendar year outside any contract).
    pub contract_yearly: Option<Decimal>,
}

/// A negative cap.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("spending limit {period:?} must not be negative, got {cap}")]
pub struct LimitError {
    /// The offending period.
    pub period: LimitPeriod,
    /// The offending cap.
    pub cap: Decimal,
}

impl Limits {
    /// No caps at all.
    pub const NONE: Limits = Limits { per_request: None, daily: None, monthly: None, contract_yearly: None };

    /// True when no cap is set, so nothing needs counting.
    pub fn is_empty(&self) -> bool {
        *self == Limits::NONE
    }

    /// Refuses negative caps.
    pub fn validate(&self) -> Result<(), LimitError> {
        self.caps()
            .into_iter()
            .find(|(_, cap)| cap.is_some_and(|cap| cap.is_sign_negative()))
            .map_or(Ok(()), |(period, cap)| Err(LimitError { period, cap: cap.unwrap_or_default() }))
    }

    /// The caps in the order they are checked.
    fn caps(&self) -> [(LimitPeriod, Option<Decimal>); 4] {
        [
            (LimitPeriod::Request, self.per_request),
            (LimitPeriod::Day, self.daily),
            (LimitPeriod::Month, self.monthly),
            (LimitPeriod::ContractYear, self.contract_yearly),
        ]
    }
}

/// The period a cap applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitPeriod {
    /// A single request.
    Request,
    /// A local day.
    Day,
    /// A local month.
    Month,
    /// A contract year.
    ContractYear,
}

/// Whose limit it is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitSubject {
    /// An API key's own limit.
    Key(KeyId),
    /// A user's limit (all their keys together).
    User(UserId),
    /// An application's limit (all its keys together).
    App(AppId),
    /// The per-end-user limit of an application, for one end user.
    EndUser {
        /// The application.
        app: AppId,
        /// The end-user id from the request.
        end_user: String,
    },
}

impl From<Owner> for LimitSubject {
    fn from(owner: Owner) -> Self {
        match owner {
            Owner::User(user) => LimitSubject::User(user),
            Owner::App(app) => LimitSubject::App(app),
        }
    }
}

/// A cap that a hold would cross.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitBreach {
    /// Whose limit.
    pub subject: LimitSubject,
    /// Which period.
    pub period: LimitPeriod,
    /// The cap.
    pub cap: Decimal,
    /// Spent (settled plus held) in the current period.
    pub spent: Decimal,
    /// When the period resets; `None` for per-request caps.
    pub resets_at: Option<DateTime<Utc>>,
}

/// One period cap a spender draws on, in the period containing some instant
/// (cluster mode leases headroom under it like credit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeriodCap {
    /// Whose limit.
    pub subject: LimitSubject,
    /// Day, month or contract year (per-request caps need no sharing).
    pub period: LimitPeriod,
    /// The cap.
    pub cap: Decimal,
    /// When this period ends: with subject and period, it names the period.
    pub ends_at: DateTime<Utc>,
    /// The sequence number of the record (key, user or application version)
    /// the cap came from, or of a checkpoint that had it: every replica
    /// reads the same number for the same cap, and a newer cap has a
    /// larger one, so the shared books keep the newest whichever replica
    /// sets it last.
    pub version: u64,
}

impl PeriodCap {
    /// A stable name for this subject's period, safe for any end-user id
    /// (which is hashed, never written out).
    pub fn name(&self) -> String {
        use sha2::Digest as _;
        let subject = match &self.subject {
            LimitSubject::Key(key) => key.to_string(),
            LimitSubject::User(user) => user.to_string(),
            LimitSubject::App(app) => app.to_string(),
            LimitSubject::EndUser { app, end_user } => {
                let digest = sha2::Sha256::digest(end_user.as_bytes());
                format!("{app}_end_user_{}", hex::encode(&digest[..12]))
            }
        };
        let period = match self.period {
            LimitPeriod::Request => "request",
            LimitPeriod::Day => "day",
            LimitPeriod::Month => "month",
            LimitPeriod::ContractYear => "contract_year",
        };
        format!("limit:{subject}:{period}:{}", self.ends_at.timestamp())
    }
}

impl Limits {
    /// The periods capped here that `before` left uncapped.
    pub fn newly_capped(&self, before: &Limits) -> impl Iterator<Item = LimitPeriod> {
        self.caps()
            .into_iter()
            .zip(before.caps())
            .filter_map(|((period, now), (_, then))| (now.is_some() && then.is_none()).then_some(period))
    }

    /// The period caps set here (by the record numbered `version`), for
    /// `subject`, in the periods `ends`.
    pub fn period_caps(
        &self,
        subject: &LimitSubject,
        ends: &PeriodEnds,
        version: u64,
        out: &mut Vec<PeriodCap>,
    ) {
        for (period, cap) in self.caps() {
            if let (Some(cap), Some(ends_at)) = (cap, ends.of(period)) {
                out.push(PeriodCap { subject: subject.clone(), period, cap, ends_at, version });
            }
        }
    }
}

/// The ends of the periods containing one instant; the same for every
/// subject of a wallet, so it is computed once and cached per wallet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeriodEnds {
    /// End of the local day.
    pub day: DateTime<Utc>,
    /// End of the local month.
    pub month: DateTime<Utc>,
    /// End of the contract year.
    pub year: DateTime<Utc>,
}

impl PeriodEnds {
    fn of(&self, period: LimitPeriod) -> Option<DateTime<Utc>> {
        match period {
            LimitPeriod::Request => None,
            LimitPeriod::Day => Some(self.day),
            LimitPeriod::Month => Some(self.month),
            LimitPeriod::ContractYear => Some(self.year),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Counter {
    /// End of the period `spent` belongs to; a different current end means
    /// the period rolled and `spent` is stale.
    ends_at: DateTime<Utc>,
    /// Settled spend in the period, plus the open holds.
    spent: Decimal,
    /// The part of `spent` that open holds reserve. A call is counted in the
    /// period it settles in, so holds still open when a period rolls are
    /// carried into the next one: a limit cannot be passed twice over by
    /// holds taken just before a boundary and more just after it. Never in
    /// a checkpoint (open holds are not kept there).
    #[serde(default, skip_serializing_if = "Decimal::is_zero")]
    held: Decimal,
}

impl Default for Counter {
    fn default() -> Self {
        Counter { ends_at: DateTime::<Utc>::MIN_UTC, spent: Decimal::ZERO, held: Decimal::ZERO }
    }
}

impl Counter {
    fn spent_in(&self, ends_at: DateTime<Utc>) -> Decimal {
        if self.ends_at == ends_at {
            self.spent
        } else {
            self.held
        }
    }

    fn roll_to(&mut self, ends_at: DateTime<Utc>) {
        if self.ends_at != ends_at {
            self.ends_at = ends_at;
            self.spent = self.held;
        }
    }

    fn add(&mut self, ends_at: DateTime<Utc>, amount: Decimal) {
        self.roll_to(ends_at);
        self.spent += amount;
    }

    fn reserve(&mut self, ends_at: DateTime<Utc>, amount: Decimal) {
        self.add(ends_at, amount);
        self.held += amount;
    }

    /// Takes back an open hold, in whichever period it is now counted (as
    /// far as it is still counted: see [`Counter::forget_holds`]).
    fn unreserve(&mut self, amount: Decimal) {
        let counted = amount.min(self.held);
        self.held -= counted;
        self.spent = (self.spent - counted).max(Decimal::ZERO);
    }

    /// Counts the open holds as spent in full from now: they settle on a
    /// wallet this counter left, and will not take their reservation back
    /// here (nor add what they cost). The period then counts each at its
    /// worst case, never less than it costs.
    fn count_holds_as_spent(&mut self) {
        self.held = Decimal::ZERO;
    }

    /// Stops counting the open holds (the counter got a cap where it had
    /// none, so it never counted them).
    fn forget_holds(&mut self) {
        self.spent = (self.spent - self.held).max(Decimal::ZERO);
        self.held = Decimal::ZERO;
    }
}

/// Spend of one subject: a counter per period. Serialized in checkpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spend {
    day: Counter,
    month: Counter,
    year: Counter,
}

impl Spend {
    /// Counts `period` afresh from now, open holds only: a cap on it was
    /// just set where none was.
    pub fn restart(&mut self, period: LimitPeriod) {
        let counter = match period {
            LimitPeriod::Request => return,
            LimitPeriod::Day => &mut self.day,
            LimitPeriod::Month => &mut self.month,
            LimitPeriod::ContractYear => &mut self.year,
        };
        counter.spent = counter.held;
    }

    fn counter(&self, period: LimitPeriod) -> Option<&Counter> {
        match period {
            LimitPeriod::Request => None,
            LimitPeriod::Day => Some(&self.day),
            LimitPeriod::Month => Some(&self.month),
            LimitPeriod::ContractYear => Some(&self.year),
        }
    }

    /// The first cap `amount` would cross, in the order per request, day,
    /// month, contract year.
    pub fn check(
        &self,
        limits: &Limits,
        amount: Decimal,
        ends: &PeriodEnds,
    ) -> Option<(LimitPeriod, Decimal, Decimal, Option<DateTime<Utc>>)> {
        limits.caps().into_iter().find_map(|(period, cap)| {
            let cap = cap?;
            let spent = match (self.counter(period), ends.of(period)) {
                (Some(counter), Some(end)) => counter.spent_in(end),
                _ => Decimal::ZERO,
            };
            (spent + amount > cap).then_some((period, cap, spent, ends.of(period)))
        })
    }

    /// Counts settled spend of `amount` in the current periods.
    pub fn add(&mut self, ends: &PeriodEnds, amount: Decimal) {
        self.day.add(ends.day, amount);
        self.month.add(ends.month, amount);
        self.year.add(ends.year, amount);
    }

    /// Counts an open hold of `amount` in the current periods.
    pub fn reserve(&mut self, ends: &PeriodEnds, amount: Decimal) {
        self.day.reserve(ends.day, amount);
        self.month.reserve(ends.month, amount);
        self.year.reserve(ends.year, amount);
    }

    /// Takes back an open hold of `amount`.
    pub fn unreserve(&mut self, amount: Decimal) {
        self.day.unreserve(amount);
        self.month.unreserve(amount);
        self.year.unreserve(amount);
    }

    /// Stops counting open holds (see [`Counter::forget_holds`]).
    pub fn forget_holds(&mut self) {
        self.day.forget_holds();
        self.month.forget_holds();
        self.year.forget_holds();
    }

    /// [`Counter::count_holds_as_spent`] for every period, once each
    /// counter is in the current period (`ends`): holds carried over a
    /// period's end count in full in the new one.
    pub fn count_holds_as_spent(&mut self, ends: Option<&PeriodEnds>) {
        if let Some(ends) = ends {
            self.add(ends, Decimal::ZERO);
        }
        self.day.count_holds_as_spent();
        self.month.count_holds_as_spent();
        self.year.count_holds_as_spent();
    }

    /// True when forgetting these counters changes no answer under
    /// `limits`: no open hold is counted, and each capped period's counter
    /// belongs to a period that ended before `now` or has nothing spent.
    /// Counters of periods without a cap are not looked at: an end user
    /// capped daily is forgotten the next day, not when the contract year
    /// (which every counter tracks) ends.
    pub fn is_stale(&self, limits: &Limits, now: DateTime<Utc>) -> bool {
        let no_holds = [&self.day, &self.month, &self.year].iter().all(|counter| counter.held.is_zero());
        no_holds
            && limits.caps().into_iter().all(|(period, cap)| match (cap, self.counter(period)) {
                (Some(_), Some(counter)) => counter.ends_at <= now || counter.spent.is_zero(),
                _ => true,
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rust_decimal_macros::dec;

    fn ends(day: &str) -> PeriodEnds {
        PeriodEnds {
            day: day.parse().unwrap(),
            month: "2027-02-01T00:00:00Z".parse().unwrap(),
            year: "2028-01-01T00:00:00Z".parse().unwrap(),
        }
    }

    #[test]
    fn caps_are_checked_in_order_and_reset_with_their_period() {
        // Proves per-request caps win over daily caps and daily spend resets at the next day.
        let limits = Limits {
            per_request: Some(dec!(5)),
            daily: Some(dec!(8)),
            monthly: Some(dec!(20)),
            contract_yearly: None,
        };
        let today = ends("2027-01-02T00:00:00Z");
        let mut spend = Spend::default();
        assert_eq!(spend.check(&limits, dec!(6), &today).unwrap().0, LimitPeriod::Request);
        spend.add(&today, dec!(5));
        let breach = spend.check(&limits, dec!(4), &today).unwrap();
        assert_eq!((breach.0, breach.2), (LimitPeriod::Day, dec!(5)));
        let tomorrow = ends("2027-01-03T00:00:00Z");
        assert_eq!(spend.check(&limits, dec!(4), &tomorrow), None);
        spend.reserve(&today, dec!(2));
        spend.unreserve(dec!(2));
        assert_eq!(spend.check(&limits, dec!(3), &today), None, "a released hold counts for nothing");
    }

    #[test]
    fn holds_open_when_a_period_rolls_count_in_the_next_one() {
        // Proves a daily cap cannot be passed twice over at midnight: holds
        // taken just before it stay counted after it until they settle, and
        // their calls count in the day they settle in.
        let limits = Limits { daily: Some(dec!(100)), ..Limits::NONE };
        let (today, tomorrow) = (ends("2027-01-02T00:00:00Z"), ends("2027-01-03T00:00:00Z"));
        let mut spend = Spend::default();
        spend.add(&today, dec!(20));
        spend.reserve(&today, dec!(80));
        assert!(spend.check(&limits, dec!(1), &today).is_some(), "today is full");
        let breach = spend.check(&limits, dec!(21), &tomorrow).unwrap();
        assert_eq!(
            (breach.0, breach.2),
            (LimitPeriod::Day, dec!(80)),
            "the open holds carry over, not today's settled 20"
        );
        assert_eq!(spend.check(&limits, dec!(20), &tomorrow), None);
        spend.reserve(&tomorrow, dec!(20));
        assert!(spend.check(&limits, dec!(1), &tomorrow).is_some(), "tomorrow is full");
        // The holds of yesterday settle tomorrow, for 50 of their 80.
        spend.unreserve(dec!(80));
        spend.add(&tomorrow, dec!(50));
        let breach = spend.check(&limits, dec!(31), &tomorrow).unwrap();
        assert_eq!(breach.2, dec!(70), "tomorrow counts its own hold and the 50 that settled in it");
        assert!(!spend.is_stale(&limits, "2027-01-04T00:00:00Z".parse().unwrap()), "a hold is still counted");
    }

    #[test]
    fn negative_caps_are_refused() {
        // Proves a negative cap is reported with its period.
        let limits = Limits { monthly: Some(dec!(-1)), ..Limits::NONE };
        assert_eq!(limits.validate().unwrap_err().period, LimitPeriod::Month);
    }
}
