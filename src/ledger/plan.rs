//! Plan changes: Lite -> Pro (upgrade) and Pro -> Lite (downgrade).
//!
//! Upgrade: the Lite wallet's remainder is written off (nothing follows the
//! user), and the user and their keys draw on the pool at once, spend
//! counters included. Holds open on the Lite wallet still settle there and
//! may leave it below zero; a later Lite allowance pays that back first.
//!
//! Downgrade: the user and their keys move to their Lite wallet (created on
//! first need). The allowance arrives on the next 1st; with
//! `prorate_on_downgrade`, a pro-rated allowance for the rest of this month is
//! granted at once (see [`prorated_allowance`]).

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use rust_decimal::{Decimal, RoundingStrategy};

use crate::ledger::calendar::YearMonth;
use crate::ledger::entity::{Plan, User};
use crate::ledger::ids::{OrgId, UserId, WalletId};
use crate::ledger::journal::RecordBody;
use crate::ledger::{Ledger, LedgerError};

/// The allowance for the rest of the month containing `now`:
/// `allowance x (seconds left in the month) / (seconds in the month)`,
/// rounded down to the cent. Months are measured in the org's zone in real
/// seconds, so a DST month has 743 or 745 hours. The product is exact and
/// the quotient carries 28 significant digits; as the divisor is below 2.7
/// million, the quotient lies at least 3.7e-9 away from any cent boundary
/// it does not sit on, so rounding the 28-digit quotient down to cents gives
/// the same cent as the exact fraction would.
pub fn prorated_allowance(allowance: Decimal, now: DateTime<Utc>, tz: Tz) -> Decimal {
    let month = YearMonth::containing(tz, now);
    let (start, end) = (month.start(tz), month.end(tz));
    let total = (end - start).num_seconds();
    let left = (end - now).num_seconds().clamp(0, total);
    if total <= 0 {
        return Decimal::ZERO;
    }
    allowance
        .checked_mul(Decimal::from(left))
        .and_then(|scaled| scaled.checked_div(Decimal::from(total)))
        .map_or(Decimal::ZERO, |share| share.round_dp_with_strategy(2, RoundingStrategy::ToZero))
}

impl Ledger {
    /// Moves a user to `plan`.
    pub fn set_user_plan(
        &self,
        org: OrgId,
        user: UserId,
        plan: Plan,
        now: DateTime<Utc>,
    ) -> Result<User, LedgerError> {
        let _admin = self.lock_admin()?;
        let mut current = self.user_in(org, user)?;
        if current.plan == plan {
            return Err(LedgerError::SamePlan { user, plan });
        }
        let tz = self.org(org).ok_or(LedgerError::UnknownOrg(org))?.time_zone;
        let lite_wallet = WalletId::Lite(user);
        // Settle the Lite wallet's schedule up to now under the old plan, so
        // the write-off or pro-rated grant below starts from a current state;
        // the pool too, so the counters that leave it are in today's periods.
        let now = self.advance_wallet(lite_wallet, now);
        if plan == Plan::Lite {
            self.advance_wallet(WalletId::Pool(org), now);
        }
        // An upgrade writes the Lite credit off before it records the plan:
        // a crash between the two records then leaves a Lite user with
        // nothing to carry over, whose retried upgrade completes. (The other
        // way round left a Pro user whose Lite credit lived on, a downgrade
        // could spend it, and the retry was refused as the same plan.)
        if plan == Plan::Pro {
            if let Some(cell) = self.cell(lite_wallet) {
                let mut state = cell.state.lock();
                let now = state.advance(now, &self.shared.committer);
                state.write_off_all(&self.shared.committer, now);
            }
        }
        current.plan = plan;
        current.lite_allowance_from = match plan {
            Plan::Pro => None,
            Plan::Lite => Some(YearMonth::containing(tz, now).next()),
        };
        let record = self.commit(|_| RecordBody::User(current.clone()));
        self.apply_user(&current, record.seq);
        // A downgrade's pro-rated grant follows the plan: granted first, a
        // crash before the plan would leave the grant for the retry to make
        // twice.
        if let (Plan::Lite, true, Some(cell)) = (plan, current.prorate_on_downgrade, self.cell(lite_wallet)) {
            let mut state = cell.state.lock();
            let now = state.advance(now, &self.shared.committer);
            let amount = prorated_allowance(current.lite_monthly_allowance, now, tz);
            state.grant_prorated(now, amount, &self.shared.committer);
        }
        self.shared.committer.sync()?;
        Ok(current)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn prorata_is_exact_and_rounds_down() {
        // Proves pro-rating uses real seconds in the org's zone and floors to the cent.
        let cases = [
            // Half of a 30-day April in UTC.
            (dec!(100), "2027-04-16T00:00:00Z", Tz::UTC, dec!(50.00)),
            // One third of 30 days: 33.333.. floors to 33.33.
            (dec!(100), "2027-04-21T00:00:00Z", Tz::UTC, dec!(33.33)),
            // Start of month: the whole allowance.
            (dec!(100), "2027-04-01T00:00:00Z", Tz::UTC, dec!(100.00)),
            // Leap February: 1 day left of 29.
            (dec!(29), "2028-02-29T00:00:00Z", Tz::UTC, dec!(1.00)),
            // New York March 2028 has 743 hours (DST); 24h left -> 100*24/743 = 3.230..
            (dec!(100), "2028-04-01T03:59:59Z", Tz::America__New_York, dec!(0)),
            (dec!(100), "2028-03-31T04:00:00Z", Tz::America__New_York, dec!(3.23)),
        ];
        for (allowance, now, tz, expected) in cases {
            let now = now.parse().unwrap();
            assert_eq!(prorated_allowance(allowance, now, tz), expected, "{allowance} at {now} in {tz}");
        }
    }
}
