//! Credit lots and the order in which debits consume them.
//!
//! A wallet's balance is the sum of its live lots minus any deficit (see
//! the `wallet` module). Lots are kept sorted in consumption order:
//! soonest expiry first; on equal expiry platform, seat, lite-monthly,
//! purchase, adjustment; then oldest (lowest id). Lite-monthly sits with the
//! allocations because it is the Lite wallet's allocation; it never meets a
//! purchase, which only pool wallets receive. Because the order starts with
//! expiry, the expired lots are always a prefix of the list.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::ledger::calendar::YearMonth;
use crate::ledger::ids::LotId;

/// What a lot is and which period produced it; the period lets a restarted
/// ledger know which allocations were already granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LotOrigin {
    /// Yearly platform allocation of a contract year.
    Platform {
        /// Term index.
        term: u32,
        /// Year within the term.
        year: u32,
    },
    /// Yearly seat allocation of a contract year.
    Seat {
        /// Term index.
        term: u32,
        /// Year within the term.
        year: u32,
    },
    /// A Lite user's allowance for one month (full or pro-rated).
    LiteMonthly {
        /// The month it funds.
        month: YearMonth,
    },
    /// Credits bought by the org.
    Purchase,
    /// An operator correction.
    Adjustment,
}

/// A lot written off at its expiry, remembered for a while so that a debit
/// which settled before the expiry but reaches the ledger after it (a
/// cluster replica ships its settles a moment later) is still paid from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiredLot {
    /// The lot.
    pub lot: LotId,
    /// Its origin.
    pub origin: LotOrigin,
    /// When it became spendable.
    pub effective_at: DateTime<Utc>,
    /// When it expired.
    pub expires_at: DateTime<Utc>,
    /// What its write-off still holds: written off, not yet taken back.
    pub written_off: Decimal,
}

impl ExpiredLot {
    /// How long after its expiry a lot's write-off can still be taken back.
    /// A debit posted later than this is charged to the credit live when it
    /// is posted.
    pub const MEMORY: chrono::TimeDelta = chrono::TimeDelta::days(31);

    /// The lot, written off whole at its expiry.
    pub fn written_off(lot: &Lot) -> ExpiredLot {
        ExpiredLot {
            lot: lot.id,
            origin: lot.origin,
            effective_at: lot.effective_at,
            expires_at: lot.expires_at,
            written_off: lot.remaining,
        }
    }

    /// The lot, written off whole when its Lite user moved to Pro at `at`.
    /// It counts as live through that instant: a hold taken at it was taken
    /// before the move (the user's keys draw on the pool from then on).
    pub fn upgraded_away(lot: &Lot, at: DateTime<Utc>) -> ExpiredLot {
        let expires_at = at.checked_add_signed(chrono::TimeDelta::nanoseconds(1)).unwrap_or(at);
        ExpiredLot { expires_at, ..ExpiredLot::written_off(lot) }
    }

    /// Whether a debit settled at `at` would have drawn on this lot.
    pub fn was_live_at(&self, at: DateTime<Utc>) -> bool {
        self.effective_at <= at && at < self.expires_at
    }
}

/// The kind of a lot, without its period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LotKind {
    /// Yearly platform allocation.
    Platform,
    /// Yearly seat allocation.
    Seat,
    /// Lite monthly allowance.
    LiteMonthly,
    /// Purchased credits.
    Purchase,
    /// Operator correction.
    Adjustment,
}

impl LotOrigin {
    /// The kind of lot.
    pub fn kind(self) -> LotKind {
        match self {
            LotOrigin::Platform { .. } => LotKind::Platform,
            LotOrigin::Seat { .. } => LotKind::Seat,
            LotOrigin::LiteMonthly { .. } => LotKind::LiteMonthly,
            LotOrigin::Purchase => LotKind::Purchase,
            LotOrigin::Adjustment => LotKind::Adjustment,
        }
    }
}

impl LotKind {
    /// Tie-break rank between lots that expire at the same instant.
    fn rank(self) -> u8 {
        match self {
            LotKind::Platform => 0,
            LotKind::Seat => 1,
            LotKind::LiteMonthly => 2,
            LotKind::Purchase => 3,
            LotKind::Adjustment => 4,
        }
    }
}

/// A live lot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lot {
    /// Equal to the id of the entry that granted it.
    pub id: LotId,
    /// Kind and period.
    pub origin: LotOrigin,
    /// Amount granted.
    pub granted: Decimal,
    /// Amount left; never negative.
    pub remaining: Decimal,
    /// When it became usable.
    pub effective_at: DateTime<Utc>,
    /// When its remainder is written off.
    pub expires_at: DateTime<Utc>,
}

impl Lot {
    fn order_key(&self) -> (DateTime<Utc>, u8, LotId) {
        (self.expires_at, self.origin.kind().rank(), self.id)
    }
}

/// The lots an entry touched; see [`crate::ledger::entry::LedgerEntry::lots`].
pub type LotTouches = SmallVec<[LotTouch; 1]>;

/// How much of one lot an entry moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LotTouch {
    /// The lot.
    pub lot: LotId,
    /// Amount moved, always positive; the entry kind says which way.
    pub amount: Decimal,
}

/// A wallet's live lots in consumption order.
#[derive(Clone, Debug, Default)]
pub struct Lots {
    /// A Lite wallet lives on one lot a month: kept inline, a debit finds it
    /// in the wallet's own memory.
    lots: SmallVec<[Lot; 1]>,
    total: Decimal,
}

impl Lots {
    /// Sum of the remainders.
    pub fn total(&self) -> Decimal {
        self.total
    }

    /// Lots in consumption order.
    pub fn iter(&self) -> impl Iterator<Item = &Lot> {
        self.lots.iter()
    }

    /// The soonest expiry, if any lot is live.
    pub fn next_expiry(&self) -> Option<DateTime<Utc>> {
        self.lots.first().map(|lot| lot.expires_at)
    }

    /// Adds a lot at its place in consumption order.
    pub fn insert(&mut self, lot: Lot) {
        assert!(!lot.remaining.is_sign_negative(), "lot {} inserted with a negative remainder", lot.id);
        self.total += lot.remaining;
        let key = lot.order_key();
        let at = self.lots.partition_point(|existing| existing.order_key() < key);
        self.lots.insert(at, lot);
    }

    /// Takes up to `amount` in consumption order, appending what it took to
    /// `touches`; returns the part it could not cover.
    pub fn draw(&mut self, amount: Decimal, touches: &mut LotTouches) -> Decimal {
        let mut left = amount;
        let mut exhausted = 0;
        for lot in self.lots.iter_mut() {
            if left.is_zero() {
                break;
            }
            let take = left.min(lot.remaining);
            lot.remaining -= take;
            left -= take;
            if !take.is_zero() {
                touches.push(LotTouch { lot: lot.id, amount: take });
            }
            if lot.remaining.is_zero() {
                exhausted += 1;
            } else {
                break;
            }
        }
        // Draws stop at the first lot they leave non-empty, so the emptied
        // lots are exactly the leading `exhausted` ones.
        self.lots.drain(..exhausted);
        self.total -= amount - left;
        left
    }

    /// Takes `amount` from the lot `id` (replaying a recorded draw). Returns
    /// false when the lot is unknown or holds less than `amount`.
    pub fn take_from(&mut self, id: LotId, amount: Decimal) -> bool {
        let Some(at) = self.lots.iter().position(|lot| lot.id == id) else {
            return false;
        };
        let lot = &mut self.lots[at];
        if lot.remaining < amount {
            return false;
        }
        lot.remaining -= amount;
        self.total -= amount;
        if lot.remaining.is_zero() {
            self.lots.remove(at);
        }
        true
    }

    /// Removes and returns the first lot if it has expired at `now`.
    pub fn pop_expired(&mut self, now: DateTime<Utc>) -> Option<Lot> {
        if self.lots.first()?.expires_at > now {
            return None;
        }
        let lot = self.lots.remove(0);
        self.total -= lot.remaining;
        Some(lot)
    }

    /// Removes every lot (an upgrade writes the whole Lite wallet off).
    pub fn take_all(&mut self) -> Vec<Lot> {
        self.total = Decimal::ZERO;
        std::mem::take(&mut self.lots).into_vec()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rust_decimal_macros::dec;

    fn lot(id: u64, origin: LotOrigin, amount: Decimal, expires: &str) -> Lot {
        Lot {
            id: LotId(id),
            origin,
            granted: amount,
            remaining: amount,
            effective_at: "2027-01-01T00:00:00Z".parse().unwrap(),
            expires_at: expires.parse().unwrap(),
        }
    }

    #[test]
    fn draws_follow_expiry_then_kind_then_age() {
        // Proves the consumption order: soonest expiry, then platform/seat/purchase/adjustment, then oldest.
        let year_end = "2028-01-01T00:00:00Z";
        let mut lots = Lots::default();
        lots.insert(lot(1, LotOrigin::Adjustment, dec!(1), year_end));
        lots.insert(lot(2, LotOrigin::Purchase, dec!(1), year_end));
        lots.insert(lot(3, LotOrigin::Seat { term: 0, year: 0 }, dec!(1), year_end));
        lots.insert(lot(4, LotOrigin::Platform { term: 0, year: 0 }, dec!(1), year_end));
        lots.insert(lot(5, LotOrigin::Purchase, dec!(1), year_end));
        lots.insert(lot(6, LotOrigin::Adjustment, dec!(1), "2027-06-01T00:00:00Z"));
        let mut touches = LotTouches::new();
        let shortfall = lots.draw(dec!(6.5), &mut touches);
        let order: Vec<u64> = touches.iter().map(|t| t.lot.0).collect();
        assert_eq!(order, [6, 4, 3, 2, 5, 1]);
        assert_eq!(shortfall, dec!(0.5));
        assert_eq!(lots.total(), dec!(0));
    }

    #[test]
    fn partial_draw_keeps_the_lot() {
        // Proves a draw that leaves a lot non-empty keeps it first in line with the remainder.
        let mut lots = Lots::default();
        lots.insert(lot(1, LotOrigin::Purchase, dec!(10), "2028-01-01T00:00:00Z"));
        let mut touches = LotTouches::new();
        assert_eq!(lots.draw(dec!(2.25), &mut touches), dec!(0));
        assert_eq!(lots.total(), dec!(7.75));
        assert_eq!(lots.iter().next().unwrap().remaining, dec!(7.75));
        assert!(lots.take_from(LotId(1), dec!(7.75)));
        assert_eq!(lots.iter().count(), 0);
    }
}
