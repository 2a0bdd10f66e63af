//! Contracts: terms, contract years, and the org calendar built from them.

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::ledger::calendar::{self, add_years, local_midnight};

/// Terms longer than this are refused: no real contract runs a century, and
/// the bound keeps every anniversary inside chrono's range.
pub const MAX_TERM_YEARS: u32 = 100;

/// One contract term: allocations granted at the start of each contract year.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContractTerm {
    /// First day of the term, a local date in the org's zone.
    pub start: NaiveDate,
    /// Length of the term in whole years (1 to [`MAX_TERM_YEARS`]).
    pub years: u32,
    /// The platform lot granted at the start of each contract year.
    pub platform_allocation_per_year: Decimal,
    /// Pro seats bought; a billing quantity that sizes the seat lot.
    pub pro_seats: u32,
    /// Allocation per Pro seat and contract year.
    pub seat_allocation_per_year: Decimal,
}

/// Why a contract term was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    /// The term has no years or too many.
    #[error("contract term must last 1 to {MAX_TERM_YEARS} whole years, got {years}")]
    BadLength {
        /// The requested length.
        years: u32,
    },
    /// An allocation is negative.
    #[error("contract allocations must not be negative (platform {platform}, per seat {per_seat})")]
    NegativeAllocation {
        /// Platform allocation per year.
        platform: Decimal,
        /// Allocation per seat per year.
        per_seat: Decimal,
    },
    /// seats x per-seat allocation does not fit a decimal.
    #[error("seat allocation overflows: {seats} seats x {per_seat}")]
    SeatOverflow {
        /// Pro seats.
        seats: u32,
        /// Allocation per seat.
        per_seat: Decimal,
    },
    /// The term starts before the previous term ends.
    #[error("a renewal must start on or after {previous_end} (the end of the current term), got {start}")]
    Overlaps {
        /// Requested start.
        start: NaiveDate,
        /// Last day + 1 of the previous term.
        previous_end: NaiveDate,
    },
    /// The start date is outside the supported range.
    #[error("contract start {start} is outside the supported years 1970-9000")]
    OutOfRange {
        /// Requested start.
        start: NaiveDate,
    },
}

/// One contract year of one term.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContractYear {
    /// Index of the term in the org's contract list.
    pub term: u32,
    /// Year within the term, from 0.
    pub year: u32,
    /// First instant of the year.
    pub start: DateTime<Utc>,
    /// First instant after the year.
    pub end: DateTime<Utc>,
}

impl ContractTerm {
    /// Checks the term on its own; overlap is checked by [`OrgCalendar::with_term`].
    pub fn validate(&self) -> Result<(), ContractError> {
        if self.years == 0 || self.years > MAX_TERM_YEARS {
            return Err(ContractError::BadLength { years: self.years });
        }
        if self.platform_allocation_per_year.is_sign_negative()
            || self.seat_allocation_per_year.is_sign_negative()
        {
            return Err(ContractError::NegativeAllocation {
                platform: self.platform_allocation_per_year,
                per_seat: self.seat_allocation_per_year,
            });
        }
        let year = chrono::Datelike::year(&self.start);
        if !(1970..=9000).contains(&year) {
            return Err(ContractError::OutOfRange { start: self.start });
        }
        self.seat_allocation().map(|_| ())
    }

    /// The seat lot of one contract year: seats x per-seat allocation.
    pub fn seat_allocation(&self) -> Result<Decimal, ContractError> {
        self.seat_allocation_per_year.checked_mul(Decimal::from(self.pro_seats)).ok_or(
            ContractError::SeatOverflow { seats: self.pro_seats, per_seat: self.seat_allocation_per_year },
        )
    }

    /// The local date after the last day of the term.
    pub fn end_date(&self) -> NaiveDate {
        add_years(self.start, self.years).unwrap_or(NaiveDate::MAX)
    }

    fn year_bounds(&self, tz: Tz, year: u32) -> (DateTime<Utc>, DateTime<Utc>) {
        let bound =
            |k: u32| add_years(self.start, k).map_or(DateTime::<Utc>::MAX_UTC, |d| local_midnight(tz, d));
        (bound(year), bound(year.saturating_add(1)))
    }
}

/// An org's zone and contract terms: everything a wallet needs to place an
/// instant in its periods. Shared (`Arc`) by the org's wallets so a renewal
/// swaps one pointer per wallet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrgCalendar {
    /// The org's zone; all periods start at local midnight.
    pub tz: Tz,
    /// Terms in start order, never overlapping.
    pub terms: Arc<[ContractTerm]>,
}

impl OrgCalendar {
    /// A calendar with no contract.
    pub fn new(tz: Tz) -> Self {
        OrgCalendar { tz, terms: Arc::from(Vec::new()) }
    }

    /// This calendar plus `term`, which must be valid and start on or after
    /// the end of the last term.
    pub fn with_term(&self, term: ContractTerm) -> Result<Self, ContractError> {
        term.validate()?;
        if let Some(last) = self.terms.last() {
            let previous_end = last.end_date();
            if term.start < previous_end {
                return Err(ContractError::Overlaps { start: term.start, previous_end });
            }
        }
        let mut terms = self.terms.to_vec();
        terms.push(term);
        Ok(OrgCalendar { tz: self.tz, terms: Arc::from(terms) })
    }

    /// The contract year in force at `at`, if any term covers it.
    pub fn year_at(&self, at: DateTime<Utc>) -> Option<ContractYear> {
        self.terms.iter().enumerate().find_map(|(index, term)| {
            let term_start = local_midnight(self.tz, term.start);
            let term_end = local_midnight(self.tz, term.end_date());
            if at < term_start || at >= term_end {
                return None;
            }
            (0..term.years).find_map(|year| {
                let (start, end) = term.year_bounds(self.tz, year);
                (start <= at && at < end).then_some(ContractYear {
                    term: u32::try_from(index).unwrap_or(u32::MAX),
                    year,
                    start,
                    end,
                })
            })
        })
    }

    /// Every contract year of every term, in time order.
    pub fn years(&self) -> impl Iterator<Item = (ContractYear, &ContractTerm)> + '_ {
        self.terms.iter().enumerate().flat_map(move |(index, term)| {
            (0..term.years).map(move |year| {
                let (start, end) = term.year_bounds(self.tz, year);
                let year = ContractYear { term: u32::try_from(index).unwrap_or(u32::MAX), year, start, end };
                (year, term)
            })
        })
    }

    /// End of the term in force at `at` (purchases expire then).
    pub fn term_end_at(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.terms.iter().find_map(|term| {
            let start = local_midnight(self.tz, term.start);
            let end = local_midnight(self.tz, term.end_date());
            (start <= at && at < end).then_some(end)
        })
    }

    /// End of the last term agreed (a renewal's included), if any.
    pub fn last_term_end(&self) -> Option<DateTime<Utc>> {
        self.terms.last().map(|term| local_midnight(self.tz, term.end_date()))
    }

    /// End of the contract year containing `at`; outside any term, the end of
    /// the local calendar year (so yearly limits still reset).
    pub fn limit_year_end(&self, at: DateTime<Utc>) -> DateTime<Utc> {
        self.year_at(at).map_or_else(|| calendar::calendar_year_end(self.tz, at), |y| y.end)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rust_decimal_macros::dec;

    fn term(start: &str, years: u32) -> ContractTerm {
        ContractTerm {
            start: start.parse().unwrap(),
            years,
            platform_allocation_per_year: dec!(1000),
            pro_seats: 3,
            seat_allocation_per_year: dec!(100),
        }
    }

    #[test]
    fn contract_years_start_at_local_midnight() {
        // Proves contract years are anniversaries at local midnight, in order, across terms.
        let calendar = OrgCalendar::new(Tz::Asia__Tokyo)
            .with_term(term("2027-03-01", 2))
            .unwrap()
            .with_term(term("2029-03-01", 1))
            .unwrap();
        let starts: Vec<String> = calendar.years().map(|(y, _)| y.start.to_rfc3339()).collect();
        assert_eq!(
            starts,
            ["2027-02-28T15:00:00+00:00", "2028-02-29T15:00:00+00:00", "2029-02-28T15:00:00+00:00"]
        );
        let at = "2028-06-01T00:00:00Z".parse().unwrap();
        let year = calendar.year_at(at).unwrap();
        assert_eq!((year.term, year.year), (0, 1));
        assert_eq!(calendar.term_end_at(at), Some("2029-02-28T15:00:00Z".parse().unwrap()));
    }

    #[test]
    fn bad_terms_are_refused() {
        // Proves overlapping, empty and negative terms are refused with a reason.
        let calendar = OrgCalendar::new(Tz::UTC).with_term(term("2027-01-01", 1)).unwrap();
        assert!(matches!(calendar.with_term(term("2027-06-01", 1)), Err(ContractError::Overlaps { .. })));
        assert!(matches!(
            calendar.with_term(term("2028-01-01", 0)),
            Err(ContractError::BadLength { years: 0 })
        ));
        let mut negative = term("2028-01-01", 1);
        negative.platform_allocation_per_year = dec!(-1);
        assert!(matches!(calendar.with_term(negative), Err(ContractError::NegativeAllocation { .. })));
    }
}
