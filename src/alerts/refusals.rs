//! Recent 402 answers per wallet and reason, in memory, for the admin API's
//! org summary (the dashboard's "recent 402s by reason").
//!
//! The proxy already tells the alerts about every money refusal (an empty
//! wallet, a spending limit reached); this log counts those signals as they
//! arrive, so the request path gains no new call. It is not a ledger record:
//! it starts empty at every start of the process, which the summary says
//! (`since`).
//!
//! In a cluster the summary on any replica must count every replica's
//! refusals: a replica then keeps only what it has not yet added to the
//! shared books (per wallet, reason and minute), and adds it about once a
//! second ([`RefusalLog::take_unshipped`]); the summary reads the sums from
//! the books (`crate::cluster::refusal_books`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Duration, DurationRound, Utc};
use parking_lot::Mutex;
use serde::Serialize;

use crate::ledger::ids::WalletId;

/// Times kept per wallet and reason, to count the last day: past this many
/// the oldest are forgotten and the day's count is a lower bound
/// (`last_day_capped`).
const TIMES_PER_TALLY: usize = 1_000;

/// Most (wallet, reason, minute) rows a replica keeps for the books while
/// they are out of reach (some 8 MB): a long outage with many dry wallets
/// would otherwise grow them without bound. Past it, a refusal of a new row
/// is only counted in [`RefusalLog::unshipped_dropped`], and the summary's
/// counts run low.
const MAX_UNSHIPPED: usize = 100_000;

/// Why a request was answered 402, by the proxy's stable error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    InsufficientCredits,
    SpendLimitReached,
}

impl RefusalReason {
    /// The error code, as the books keep it.
    pub fn code(self) -> &'static str {
        match self {
            RefusalReason::InsufficientCredits => "insufficient_credits",
            RefusalReason::SpendLimitReached => "spend_limit_reached",
        }
    }

    pub const ALL: [RefusalReason; 2] =
        [RefusalReason::InsufficientCredits, RefusalReason::SpendLimitReached];

    pub fn from_code(code: &str) -> Option<RefusalReason> {
        RefusalReason::ALL.into_iter().find(|reason| reason.code() == code)
    }
}

/// A replica's refusals not yet added to the cluster's books: count and
/// latest time per wallet, reason and minute.
pub type Unshipped = HashMap<(WalletId, RefusalReason, DateTime<Utc>), (u64, DateTime<Utc>)>;

#[derive(Default)]
struct Tally {
    total: u64,
    /// Newest last, at most [`TIMES_PER_TALLY`].
    times: VecDeque<DateTime<Utc>>,
}

/// One wallet's 402s for one reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RefusalCount {
    pub wallet: WalletId,
    pub reason: RefusalReason,
    /// Since `since`.
    pub total: u64,
    /// In the 24 hours before the summary was asked for.
    pub last_day: u64,
    /// Whether more than [`TIMES_PER_TALLY`] came in that day (then
    /// `last_day` counts only the latest of them).
    pub last_day_capped: bool,
    pub last_at: Option<DateTime<Utc>>,
}

/// Per wallet and reason, how many 402s and when. Wallets come only from
/// refusals the ledger made, so the map holds at most one entry per
/// existing wallet and reason.
pub struct RefusalLog {
    since: DateTime<Utc>,
    tallies: Mutex<HashMap<(WalletId, RefusalReason), Tally>>,
    /// In a cluster, what goes to the shared books instead of `tallies`.
    unshipped: Option<Mutex<Unshipped>>,
    /// Refusals left out of `unshipped`, full at [`MAX_UNSHIPPED`] rows.
    dropped: AtomicU64,
}

impl RefusalLog {
    pub fn new(since: DateTime<Utc>) -> Self {
        RefusalLog { since, tallies: Mutex::new(HashMap::new()), unshipped: None, dropped: AtomicU64::new(0) }
    }

    /// A cluster replica's log: refusals wait for [`RefusalLog::take_unshipped`].
    pub fn for_cluster(since: DateTime<Utc>) -> Self {
        RefusalLog {
            since,
            tallies: Mutex::new(HashMap::new()),
            unshipped: Some(Mutex::new(HashMap::new())),
            dropped: AtomicU64::new(0),
        }
    }

    /// What was refused since the last call (a cluster replica's), to add
    /// to the books; [`RefusalLog::put_back`] if that fails.
    pub fn take_unshipped(&self) -> Unshipped {
        self.unshipped.as_ref().map(|unshipped| std::mem::take(&mut *unshipped.lock())).unwrap_or_default()
    }

    /// Puts back what could not be added, to go with the next batch.
    pub fn put_back(&self, taken: Unshipped) {
        let Some(unshipped) = &self.unshipped else { return };
        let mut unshipped = unshipped.lock();
        for (key, (count, last_at)) in taken {
            self.add_unshipped(&mut unshipped, key, count, last_at);
        }
    }

    /// Adds to a row, or makes one while there is room.
    fn add_unshipped(
        &self,
        unshipped: &mut Unshipped,
        key: (WalletId, RefusalReason, DateTime<Utc>),
        count: u64,
        last_at: DateTime<Utc>,
    ) {
        let full = unshipped.len() >= MAX_UNSHIPPED;
        match unshipped.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut row) => {
                let slot = row.get_mut();
                slot.0 = slot.0.saturating_add(count);
                slot.1 = slot.1.max(last_at);
            }
            std::collections::hash_map::Entry::Vacant(row) if !full => {
                row.insert((count, last_at));
            }
            std::collections::hash_map::Entry::Vacant(_) => {
                self.dropped.fetch_add(count, Ordering::Relaxed);
            }
        }
    }

    /// Refusals a cluster replica could not keep for the books (see
    /// [`MAX_UNSHIPPED`]), since the start.
    pub fn unshipped_dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// When counting began (the process start).
    pub fn since(&self) -> DateTime<Utc> {
        self.since
    }

    pub fn record(&self, wallet: WalletId, reason: RefusalReason, at: DateTime<Utc>) {
        if let Some(unshipped) = &self.unshipped {
            let minute = at.duration_trunc(Duration::minutes(1)).unwrap_or(at);
            self.add_unshipped(&mut unshipped.lock(), (wallet, reason, minute), 1, at);
            return;
        }
        let mut tallies = self.tallies.lock();
        let tally = tallies.entry((wallet, reason)).or_default();
        tally.total = tally.total.saturating_add(1);
        if tally.times.len() == TIMES_PER_TALLY {
            tally.times.pop_front();
        }
        tally.times.push_back(at);
    }

    /// The counts of `wallets`, by wallet then reason, as of `now`. Each is
    /// looked up, not found by a scan of every organization's tallies: the
    /// proxy records refusals under the same lock.
    pub fn counts(&self, wallets: &[WalletId], now: DateTime<Utc>) -> Vec<RefusalCount> {
        let day_ago = now - Duration::hours(24);
        let tallies = self.tallies.lock();
        let keys = wallets.iter().flat_map(|&wallet| RefusalReason::ALL.map(|reason| (wallet, reason)));
        let mut counts: Vec<RefusalCount> = keys
            .filter_map(|key| tallies.get(&key).map(|tally| (key, tally)))
            .map(|((wallet, reason), tally)| {
                let last_day = tally.times.iter().filter(|&&t| t > day_ago).count();
                RefusalCount {
                    wallet,
                    reason,
                    total: tally.total,
                    last_day: last_day as u64,
                    last_day_capped: last_day == TIMES_PER_TALLY,
                    last_at: tally.times.back().copied(),
                }
            })
            .collect();
        counts.sort_by_key(|c| (c.wallet, c.reason));
        counts
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ledger::ids::{OrgId, UserId};

    #[test]
    fn counts_each_wallet_and_reason_over_the_last_day() {
        // Proves the day window, the per-wallet filter and the cap on kept times.
        let start: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        let log = RefusalLog::new(start);
        let pool = WalletId::Pool(OrgId(1));
        let lite = WalletId::Lite(UserId(2));
        log.record(pool, RefusalReason::InsufficientCredits, start);
        for minute in 0..(TIMES_PER_TALLY as i64 + 5) {
            log.record(
                lite,
                RefusalReason::SpendLimitReached,
                start + Duration::hours(30) + Duration::minutes(minute),
            );
        }
        let now = start + Duration::hours(48);
        let counts = log.counts(&[pool, lite], now);
        assert_eq!(counts.len(), 2, "{counts:?}");
        let pool_count = counts.iter().find(|c| c.wallet == pool).unwrap();
        assert_eq!((pool_count.total, pool_count.last_day, pool_count.last_day_capped), (1, 0, false));
        let lite_count = counts.iter().find(|c| c.wallet == lite).unwrap();
        assert_eq!(lite_count.total, TIMES_PER_TALLY as u64 + 5);
        assert_eq!(lite_count.last_day, TIMES_PER_TALLY as u64, "only the kept times count");
        assert!(lite_count.last_day_capped);
        assert!(log.counts(&[WalletId::Pool(OrgId(9))], now).is_empty(), "other wallets are not shown");
    }

    #[test]
    fn a_replica_keeps_a_bounded_number_of_rows_for_the_books() {
        // Proves the rows waiting for the books stop growing at MAX_UNSHIPPED
        // (the database out of reach for hours, many dry wallets): refusals of
        // rows already kept still count, others are counted as dropped.
        let start: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        let log = RefusalLog::for_cluster(start);
        let reason = RefusalReason::InsufficientCredits;
        let minute = |n: usize| start + Duration::minutes(i64::try_from(n).unwrap());
        for n in 0..MAX_UNSHIPPED + 10 {
            log.record(WalletId::Pool(OrgId(1 + (n % 7) as u64)), reason, minute(n));
        }
        assert_eq!(log.unshipped_dropped(), 10);
        log.record(WalletId::Pool(OrgId(1)), reason, minute(0));
        let taken = log.take_unshipped();
        assert_eq!(taken.len(), MAX_UNSHIPPED);
        assert_eq!(taken[&(WalletId::Pool(OrgId(1)), reason, minute(0))].0, 2, "a kept row still counts");
        // Put back after a failed shipment beside new rows: still bounded.
        for n in 0..5 {
            log.record(WalletId::Lite(UserId(2)), reason, minute(n));
        }
        log.put_back(taken);
        assert_eq!(log.take_unshipped().len(), MAX_UNSHIPPED);
        assert_eq!(log.unshipped_dropped(), 15);
    }
}
