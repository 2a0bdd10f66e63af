//! Per-organization usage rollups: debit totals per quarter hour and per
//! (owner, key, end user, model, route), kept up to date from the durable
//! ledger. A usage report reads these totals instead of every entry; each
//! call only folds in the records made since the last one. The gateway
//! builds them at start-up in the background, so the first report does not
//! scan the store (unless it comes before the build is done, and then it
//! waits for the build, not for a scan of its own).

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Timelike, Utc};
use parking_lot::{Mutex, RwLock};
use rust_decimal::Decimal;

use super::error::AdminError;
use super::reports::EntrySource;
use crate::ledger::entry::{EntryKind, LedgerEntry};
use crate::ledger::ids::{OrgId, Owner};

/// Width of a bucket. Every time zone's offset is a whole number of quarter
/// hours, so each bucket lies inside one day (and month) of any zone.
pub const BUCKET_SECONDS: i64 = 15 * 60;
/// Records read from the store per step while catching up.
const CATCH_UP_STEP: usize = 2_000;

/// What a usage row is grouped by, before the report picks dimensions.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RowKey {
    /// Start of the quarter hour, in seconds since the epoch (UTC).
    pub bucket: i64,
    pub owner: Owner,
    pub key: u64,
    pub end_user: Option<Arc<str>>,
    pub model: Arc<str>,
    pub is_tool: bool,
    pub route: Arc<str>,
}

/// One group's totals.
#[derive(Default, Clone, Debug, PartialEq, Eq)]
pub struct Totals {
    pub requests: u64,
    /// What the customers paid (the debits).
    pub charged: Decimal,
    /// What those requests cost the operator, before markup.
    pub operator_cost: Decimal,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub tool_units: u64,
}

impl Totals {
    pub fn add(&mut self, other: &Totals) {
        // Counts past u64 stay at its top rather than wrap (a release
        // build would) into a small total.
        self.requests = self.requests.saturating_add(other.requests);
        self.charged += other.charged;
        self.operator_cost += other.operator_cost;
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.cached_input_tokens = self.cached_input_tokens.saturating_add(other.cached_input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.tool_units = self.tool_units.saturating_add(other.tool_units);
    }
}

/// The row and totals of one debit entry of `org`; `None` for anything else.
pub fn debit_row(entry: &LedgerEntry) -> Option<(RowKey, Totals)> {
    let EntryKind::Debit(debit) = &entry.kind else {
        return None;
    };
    let usage = &debit.details.usage;
    let (operator_cost, charged) = entry.cost_and_price()?;
    let key = RowKey {
        bucket: bucket_of(entry.at),
        owner: debit.owner,
        key: debit.key.0,
        end_user: debit.end_user.clone(),
        model: debit.details.model.clone(),
        is_tool: usage.tool_units > 0 || debit.details.route.contains("/tools/"),
        route: debit.details.route.clone(),
    };
    let totals = Totals {
        requests: 1,
        charged,
        operator_cost,
        input_tokens: usage.input_tokens,
        cached_input_tokens: usage.cached_input_tokens,
        output_tokens: usage.output_tokens,
        tool_units: usage.tool_units,
    };
    Some((key, totals))
}

fn bucket_of(at: DateTime<Utc>) -> i64 {
    at.timestamp().div_euclid(BUCKET_SECONDS) * BUCKET_SECONDS
}

/// Whether `at` is a bucket boundary, so a range ending there can be read
/// from the rollups exactly.
pub fn on_boundary(at: DateTime<Utc>) -> bool {
    at.nanosecond() == 0 && at.timestamp().rem_euclid(BUCKET_SECONDS) == 0
}

/// The rollups of every organization, and how far into the ledger they reach.
///
/// Two rollups per organization: `coarse` leaves the end user out (its
/// size follows keys, models and time, not the app's customers) and answers
/// every report not grouped by end user; `fine` keeps the end user. Each is
/// capped at `max_rows`; one over its cap is dropped for good and the
/// reports it would answer scan the entries (slower, never wrong).
#[derive(Debug)]
pub struct Rollups {
    /// The totals. Locked only to fold in records already read, or to answer:
    /// never across a read of the store.
    rows: RwLock<State>,
    /// Held by whoever is catching up with the store, so each record is read
    /// and folded once; others wait here for the rollups to be current
    /// without blocking readers of `rows`.
    catching_up: Mutex<()>,
    max_rows: usize,
}

#[derive(Debug, Default)]
struct State {
    /// The last record folded in.
    through: u64,
    orgs: HashMap<OrgId, OrgRollups>,
}

#[derive(Debug, Default)]
struct OrgRollups {
    coarse: Capped,
    fine: Capped,
}

/// A rollup and whether it ever went over its cap.
#[derive(Debug, Default)]
struct Capped {
    rows: HashMap<RowKey, Totals>,
    over_cap: bool,
}

impl Capped {
    fn add(&mut self, key: RowKey, totals: &Totals, max_rows: usize) {
        if self.over_cap {
            return;
        }
        if let Some(row) = self.rows.get_mut(&key) {
            row.add(totals);
        } else if self.rows.len() < max_rows {
            self.rows.insert(key, totals.clone());
        } else {
            // Partial totals would be wrong totals: drop them all.
            self.over_cap = true;
            self.rows = HashMap::new();
        }
    }
}

/// Which rollup a report needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grain {
    /// Everything but the end user.
    Coarse,
    /// With the end user.
    Fine,
}

impl Default for Rollups {
    fn default() -> Self {
        Rollups::new(crate::config::DEFAULT_USAGE_ROLLUP_MAX_ROWS)
    }
}

impl Rollups {
    pub fn new(max_rows: usize) -> Rollups {
        Rollups { rows: RwLock::default(), catching_up: Mutex::new(()), max_rows }
    }

    /// Folds in every record made since the last call. Reads the store a
    /// step at a time holding only `catching_up`; `rows` is locked per step,
    /// just to fold in what was read. Stops early (`Ok(false)`) once `stop`
    /// says so.
    pub fn catch_up(&self, source: EntrySource<'_>, stop: &dyn Fn() -> bool) -> Result<bool, AdminError> {
        let _only_one = self.catching_up.lock();
        loop {
            if stop() {
                return Ok(false);
            }
            let through = self.rows.read().through;
            let (entries, last) = source(through, CATCH_UP_STEP)?;
            let Some(last) = last else { return Ok(true) };
            let mut state = self.rows.write();
            for entry in &entries {
                if let Some((key, totals)) = debit_row(entry) {
                    let org = state.orgs.entry(entry.org).or_default();
                    let coarse = RowKey { end_user: None, ..key.clone() };
                    org.coarse.add(coarse, &totals, self.max_rows);
                    org.fine.add(key, &totals, self.max_rows);
                }
            }
            state.through = last;
        }
    }

    /// Catches up, then calls `read` with `org`'s rows of `grain`; `None`
    /// when that rollup went over its cap (the caller scans instead).
    pub fn read<T>(
        &self,
        source: EntrySource<'_>,
        org: OrgId,
        grain: Grain,
        read: impl FnOnce(&HashMap<RowKey, Totals>) -> T,
    ) -> Result<Option<T>, AdminError> {
        self.catch_up(source, &|| false)?;
        let state = self.rows.read();
        let empty = Capped::default();
        let org = state.orgs.get(&org);
        let capped = match grain {
            Grain::Coarse => org.map_or(&empty, |o| &o.coarse),
            Grain::Fine => org.map_or(&empty, |o| &o.fine),
        };
        Ok((!capped.over_cap).then(|| read(&capped.rows)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicBool, Ordering};

    use chrono::{NaiveDate, TimeZone};
    use chrono_tz::Tz;

    use super::*;
    use crate::ledger::contract::ContractTerm;
    use crate::ledger::entity::{KeyHash, Plan};
    use crate::ledger::entry::{SettleDetails, Usage};
    use crate::ledger::ids::{KeyId, RequestId, WalletId};
    use crate::ledger::journal::{MemoryJournal, RecordBody};
    use crate::ledger::limit::Limits;
    use crate::ledger::{Ledger, LedgerConfig, NewApp, NewKey, NewOrg, NewUser, SpendContext};

    /// An org's books: `debits` debits by an app key spread over `end_users`
    /// end users (one in five by a Pro user's key, without one), as
    /// (record sequence, entry), oldest first.
    fn books(debits: u64, end_users: u64) -> (OrgId, Vec<(u64, LedgerEntry)>) {
        let journal = Arc::new(MemoryJournal::default());
        let ledger = Ledger::new(LedgerConfig::default(), journal.clone());
        let now = Utc.with_ymd_and_hms(2026, 11, 10, 12, 0, 0).unwrap();
        let contract = ContractTerm {
            start: NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
            years: 1,
            platform_allocation_per_year: Decimal::new(1_000_000, 0),
            pro_seats: 0,
            seat_allocation_per_year: Decimal::ZERO,
        };
        let new_org = NewOrg { name: "o".into(), time_zone: Tz::UTC, contract: Some(contract) };
        let org = ledger.create_org(new_org, now).unwrap().id;
        let user = NewUser {
            name: "u".into(),
            plan: Plan::Pro,
            lite_monthly_allowance: Decimal::ZERO,
            prorate_on_downgrade: false,
            limits: Limits::NONE,
        };
        let user = ledger.create_user(org, user, now).unwrap().id;
        let app = NewApp { name: "a".into(), limits: Limits::NONE, end_user_limits: Limits::NONE };
        let app = ledger.create_app(org, app, now).unwrap().id;
        let key = |owner, n: u32| -> KeyId {
            let hash = KeyHash::of_secret(&format!("secret-{n}"));
            let new = NewKey { owner, hash, label: "k".into(), limits: Limits::NONE };
            ledger.create_key(org, new, now).unwrap().id
        };
        let (user_key, app_key) = (key(Owner::User(user), 1), key(Owner::App(app), 2));
        for n in 0..debits {
            let end_user = format!("customer-{}", n % end_users);
            let context = if n % 5 == 0 {
                SpendContext { key: user_key, end_user: None }
            } else {
                SpendContext { key: app_key, end_user: Some(&end_user) }
            };
            let at = now + chrono::TimeDelta::minutes(i64::try_from(n).unwrap());
            let request = RequestId(uuid::Uuid::from_u128(u128::from(n) + 1));
            let hold = ledger.hold(WalletId::Pool(org), request, Decimal::ONE, context, at).unwrap();
            let details = SettleDetails {
                route: Arc::from("/v1/chat/completions"),
                model: Arc::from("mock-gpt"),
                usage: Usage { input_tokens: n, output_tokens: 1, cached_input_tokens: 0, tool_units: 0 },
                price_version: Arc::from("v"),
                operator_cost: None,
            };
            hold.settle(Decimal::new(i64::try_from(n % 7).unwrap() + 1, 2), details, at).unwrap();
        }
        let entries = journal
            .records()
            .into_iter()
            .filter_map(|record| match record.body {
                RecordBody::Entry(entry) => Some((record.seq, entry)),
                _ => None,
            })
            .collect();
        (org, entries)
    }

    /// The store as an entry source: entries after a sequence number.
    fn source_of(
        entries: &[(u64, LedgerEntry)],
        after: u64,
        limit: usize,
    ) -> (Vec<LedgerEntry>, Option<u64>) {
        let step: Vec<_> = entries.iter().filter(|(seq, _)| *seq > after).take(limit).collect();
        let last = step.last().map(|(seq, _)| *seq);
        (step.into_iter().map(|(_, entry)| entry.clone()).collect(), last)
    }

    fn total_requests(rows: &HashMap<RowKey, Totals>) -> u64 {
        rows.values().map(|t| t.requests).sum()
    }

    #[test]
    fn catching_up_reads_the_store_without_locking_the_rows() {
        // Proves a long catch-up (the first report on a big store) never
        // holds the rows while it reads the store, so it does not block
        // readers of the rows for the length of the scan.
        let (org, entries) = books(5_000, 10);
        let rollups = Rollups::new(1_000);
        let rows_locked_during_a_read = AtomicBool::new(false);
        let source = |after: u64, limit: usize| {
            if rollups.rows.try_write().is_none() {
                rows_locked_during_a_read.store(true, Ordering::Relaxed);
            }
            Ok(source_of(&entries, after, limit))
        };
        let requests = rollups.read(&source, org, Grain::Coarse, total_requests).unwrap();
        assert_eq!(requests, Some(5_000), "every debit folded in once");
        assert!(
            !rows_locked_during_a_read.load(Ordering::Relaxed),
            "the rows were locked while the store was read"
        );
        let again = rollups.read(&source, org, Grain::Coarse, total_requests).unwrap();
        assert_eq!(again, Some(5_000), "a second read folds nothing twice");
    }

    #[test]
    fn a_rollup_over_its_cap_holds_no_rows_and_its_reports_scan() {
        // Proves rollup memory is bounded: 40 end users do not fit in 30
        // rows, so the end-user rollup is dropped (reports by end user then
        // scan), while the rollup without end users still answers.
        let (org, entries) = books(200, 40);
        let rollups = Rollups::new(30);
        let source = |after: u64, limit: usize| Ok(source_of(&entries, after, limit));
        assert_eq!(rollups.read(&source, org, Grain::Fine, total_requests).unwrap(), None, "over its cap");
        let held = rollups.rows.read().orgs.get(&org).map(|o| o.fine.rows.len());
        assert_eq!(held, Some(0), "the dropped rollup frees its rows");
        assert_eq!(rollups.read(&source, org, Grain::Coarse, total_requests).unwrap(), Some(200));
    }

    #[test]
    fn a_usage_report_by_end_user_over_the_cap_equals_the_scan() {
        // Proves the fallback gives the right numbers: a report by end user
        // (and by model) from capped rollups equals the same report from an
        // uncapped rollup and from a scan of an unaligned range.
        let (org, entries) = books(300, 50);
        let source = |after: u64, limit: usize| Ok(source_of(&entries, after, limit));
        // The single-node path reads no entity from the ledger.
        let ledger = Ledger::new(LedgerConfig::default(), Arc::new(MemoryJournal::default()));
        let report_at_most = |rollups: &Arc<Rollups>, group_by: &str, from: &str, max_groups: usize| {
            let params = [("group_by".to_owned(), group_by.to_owned()), ("from".to_owned(), from.to_owned())]
                .into_iter()
                .collect();
            let usage = super::super::UsageSource::Rollups(rollups.clone());
            let costs = super::super::reports::CostView::WithOperatorCost;
            let shown =
                super::super::reports::Report { org, time_zone: Tz::UTC, csv: false, costs, max_groups };
            super::super::reports::usage(&source, &usage, &ledger, &params, shown).map(|(_, body, _)| body)
        };
        let report = |rollups: &Arc<Rollups>, group_by: &str, from: &str| {
            report_at_most(rollups, group_by, from, 100_000).unwrap()
        };
        let (capped, uncapped) = (Arc::new(Rollups::new(20)), Arc::new(Rollups::new(100_000)));
        // More end users than a report may have groups: refused, from the
        // rollup and from the scan alike, not held whole.
        let ends =
            serde_json::from_str::<serde_json::Value>(&report(&uncapped, "end_user", "2000-01-01T00:00:00Z"));
        let groups = ends.unwrap()["rows"].as_array().map_or(0, Vec::len);
        assert!(groups > 10, "{groups}");
        for from in ["2000-01-01T00:00:00Z", "2000-01-01T00:00:00.5Z"] {
            let refused = report_at_most(&uncapped, "end_user", from, 10).unwrap_err();
            assert!(refused.to_string().contains("more than 10 groups"), "{refused}");
            assert!(report_at_most(&uncapped, "end_user", from, groups).is_ok(), "exactly the cap is shown");
        }
        for group_by in ["end_user", "model,day", "end_user,key"] {
            let scanned = report(&uncapped, group_by, "2000-01-01T00:00:00.5Z");
            assert_eq!(report(&capped, group_by, "2000-01-01T00:00:00Z"), scanned, "capped, by {group_by}");
            assert_eq!(
                report(&uncapped, group_by, "2000-01-01T00:00:00Z"),
                scanned,
                "uncapped, by {group_by}"
            );
        }
    }
}
