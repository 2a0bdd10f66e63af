//! Calendar boundaries in an organization's time zone.
//!
//! Every period the ledger knows (days, months, contract years) starts at
//! local midnight in the org's zone and is stored as a UTC instant. Two
//! facts of real zones shape the helpers here:
//! - A local midnight can be ambiguous (clocks fall back across midnight):
//!   the period starts at the earlier of the two instants.
//! - A local midnight can be missing (clocks spring forward at midnight, as in
//!   America/Sao_Paulo until 2019): the period starts at the transition
//!   instant, which is the first instant of that local day.
//!
//! Boundaries beyond chrono's range saturate to `DateTime::<Utc>::MAX_UTC`
//! ("never"), so no date arithmetic here can panic.

use chrono::{
    DateTime, Datelike, Months, NaiveDate, NaiveDateTime, NaiveTime, Offset, TimeDelta, TimeZone, Utc,
};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// The instant at which `date` begins in `tz`.
pub fn local_midnight(tz: Tz, date: NaiveDate) -> DateTime<Utc> {
    let naive = date.and_time(NaiveTime::MIN);
    match tz.from_local_datetime(&naive) {
        chrono::LocalResult::Single(at) => at.with_timezone(&Utc),
        chrono::LocalResult::Ambiguous(earliest, _) => earliest.with_timezone(&Utc),
        chrono::LocalResult::None => start_of_gap(tz, naive),
    }
}

/// Midnight fell into a spring-forward gap: read it with the offset in force
/// before the gap, which yields the transition instant itself.
fn start_of_gap(tz: Tz, naive: NaiveDateTime) -> DateTime<Utc> {
    let day_before = naive.checked_sub_signed(TimeDelta::days(1)).unwrap_or(naive);
    let offset_before = tz.offset_from_utc_datetime(&day_before).fix();
    let utc = naive.checked_sub_signed(TimeDelta::seconds(i64::from(offset_before.local_minus_utc())));
    utc.map_or(DateTime::<Utc>::MAX_UTC, |utc| Utc.from_utc_datetime(&utc))
}

/// The local calendar date of `at` in `tz`.
pub fn local_date(tz: Tz, at: DateTime<Utc>) -> NaiveDate {
    at.with_timezone(&tz).date_naive()
}

/// The instant the local day containing `at` ends (next local midnight).
pub fn day_end(tz: Tz, at: DateTime<Utc>) -> DateTime<Utc> {
    local_date(tz, at).succ_opt().map_or(DateTime::<Utc>::MAX_UTC, |next| local_midnight(tz, next))
}

/// `date` plus whole years; 29 February becomes 28 February in common years.
pub fn add_years(date: NaiveDate, years: u32) -> Option<NaiveDate> {
    date.checked_add_months(Months::new(years.checked_mul(12)?))
}

/// A calendar month, the unit of the Lite allowance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct YearMonth {
    /// Calendar year.
    pub year: i32,
    /// Month of the year, 1 to 12.
    pub month: u32,
}

impl YearMonth {
    /// The local month that contains `at` in `tz`.
    pub fn containing(tz: Tz, at: DateTime<Utc>) -> Self {
        let local = at.with_timezone(&tz);
        YearMonth { year: local.year(), month: local.month() }
    }

    /// The month after this one.
    pub fn next(self) -> Self {
        if self.month >= 12 {
            YearMonth { year: self.year.saturating_add(1), month: 1 }
        } else {
            YearMonth { year: self.year, month: self.month + 1 }
        }
    }

    /// 00:00 on the 1st of this month in `tz`.
    pub fn start(self, tz: Tz) -> DateTime<Utc> {
        NaiveDate::from_ymd_opt(self.year, self.month, 1)
            .map_or(DateTime::<Utc>::MAX_UTC, |first| local_midnight(tz, first))
    }

    /// 00:00 on the 1st of the next month in `tz`.
    pub fn end(self, tz: Tz) -> DateTime<Utc> {
        self.next().start(tz)
    }
}

impl std::fmt::Display for YearMonth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// The instant the local calendar year containing `at` ends.
pub fn calendar_year_end(tz: Tz, at: DateTime<Utc>) -> DateTime<Utc> {
    let year = at.with_timezone(&tz).year();
    year.checked_add(1)
        .and_then(|next| NaiveDate::from_ymd_opt(next, 1, 1))
        .map_or(DateTime::<Utc>::MAX_UTC, |first| local_midnight(tz, first))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn month_bounds_follow_the_zone() {
        // Proves months start at local midnight, across February and leap years.
        let cases = [
            (Tz::UTC, "2028-02-15T12:00:00Z", "2028-02-01T00:00:00Z", "2028-03-01T00:00:00Z"),
            (Tz::UTC, "2027-02-28T23:59:59Z", "2027-02-01T00:00:00Z", "2027-03-01T00:00:00Z"),
            (Tz::UTC, "2027-12-31T23:59:59Z", "2027-12-01T00:00:00Z", "2028-01-01T00:00:00Z"),
            // New York: EST (-5) in February/March 1st, EDT (-4) from 2028-03-12.
            (Tz::America__New_York, "2028-03-01T04:59:59Z", "2028-02-01T05:00:00Z", "2028-03-01T05:00:00Z"),
            (Tz::America__New_York, "2028-03-20T00:00:00Z", "2028-03-01T05:00:00Z", "2028-04-01T04:00:00Z"),
            // Tokyo (+9, no DST): local March 1st starts on Feb 29 UTC.
            (Tz::Asia__Tokyo, "2028-02-29T15:00:00Z", "2028-02-29T15:00:00Z", "2028-03-31T15:00:00Z"),
            (Tz::Asia__Tokyo, "2028-02-29T14:59:59Z", "2028-01-31T15:00:00Z", "2028-02-29T15:00:00Z"),
        ];
        for (tz, at, start, end) in cases {
            let month = YearMonth::containing(tz, utc(at));
            assert_eq!(month.start(tz), utc(start), "start of month of {at} in {tz}");
            assert_eq!(month.end(tz), utc(end), "end of month of {at} in {tz}");
        }
    }

    #[test]
    fn missing_midnight_starts_at_the_transition() {
        // Proves a day whose midnight is skipped by DST starts at the jump.
        // Sao Paulo sprang from 00:00 -03 to 01:00 -02 on 2018-11-04.
        let tz = Tz::America__Sao_Paulo;
        let start = local_midnight(tz, NaiveDate::from_ymd_opt(2018, 11, 4).unwrap());
        assert_eq!(start, utc("2018-11-04T03:00:00Z"));
    }

    #[test]
    fn ambiguous_midnight_takes_the_earlier_instant() {
        // Proves a doubled midnight (fall back at 00:00) starts the day at its first occurrence.
        // Sao Paulo fell back from 00:00 -02 to 23:00 -03 on 2019-02-17 (so 23:00-00:00 repeats
        // on the 16th); midnight of the 17th is single there, so use Havana, which fell back at
        // 01:00 -> 00:00 on 2020-11-01, making 00:00-01:00 ambiguous.
        let tz = Tz::America__Havana;
        let start = local_midnight(tz, NaiveDate::from_ymd_opt(2020, 11, 1).unwrap());
        assert_eq!(start, utc("2020-11-01T04:00:00Z"));
    }

    #[test]
    fn leap_day_anniversary_clamps() {
        // Proves a contract starting on 29 February has its anniversary on 28 February.
        let start = NaiveDate::from_ymd_opt(2028, 2, 29).unwrap();
        assert_eq!(add_years(start, 1), NaiveDate::from_ymd_opt(2029, 2, 28));
        assert_eq!(add_years(start, 4), NaiveDate::from_ymd_opt(2032, 2, 29));
    }

    #[test]
    fn day_end_is_next_local_midnight() {
        // Proves daily periods end at local midnight, including on a 23-hour DST day.
        let ny = Tz::America__New_York;
        assert_eq!(day_end(ny, utc("2028-03-12T04:59:00Z")), utc("2028-03-12T05:00:00Z"));
        assert_eq!(day_end(ny, utc("2028-03-12T05:00:00Z")), utc("2028-03-13T04:00:00Z"));
        assert_eq!(
            calendar_year_end(Tz::Asia__Tokyo, utc("2027-12-31T15:00:00Z")),
            utc("2028-12-31T15:00:00Z")
        );
    }
}
