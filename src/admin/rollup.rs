//! Per-organization usage rollups: debit totals per quarter hour and per
//! (owner, key, end user, model, route), kept up to date from the durable
//! ledger. A usage report reads these totals instead of every entry; each
//! call only folds in the records made since the last one.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Timelike, Utc};
use parking_lot::Mutex;
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
    pub charged: Decimal,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub tool_units: u64,
}

impl Totals {
    pub fn add(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.charged += other.charged;
        self.input_tokens += other.input_tokens;
        self.cached_input_tokens += other.cached_input_tokens;
        self.output_tokens += other.output_tokens;
        self.tool_units += other.tool_units;
    }
}

/// The row and totals of one debit entry of `org`; `None` for anything else.
pub fn debit_row(entry: &LedgerEntry) -> Option<(RowKey, Totals)> {
    let EntryKind::Debit(debit) = &entry.kind else {
        return None;
    };
    let usage = &debit.details.usage;
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
        charged: -entry.amount,
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
#[derive(Debug, Default)]
pub struct Rollups {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The last record folded in.
    through: u64,
    orgs: HashMap<OrgId, HashMap<RowKey, Totals>>,
}

impl Rollups {
    /// Folds in the records made since the last call, then calls `read` with
    /// `org`'s rows. Holds the lock throughout, so two reports never fold
    /// the same records twice.
    pub fn read<T>(
        &self,
        source: EntrySource<'_>,
        org: OrgId,
        read: impl FnOnce(&HashMap<RowKey, Totals>) -> T,
    ) -> Result<T, AdminError> {
        let mut state = self.state.lock();
        loop {
            let (entries, last) = source(state.through, CATCH_UP_STEP)?;
            let Some(last) = last else { break };
            for entry in &entries {
                if let Some((key, totals)) = debit_row(entry) {
                    state.orgs.entry(entry.org).or_default().entry(key).or_default().add(&totals);
                }
            }
            state.through = last;
        }
        let empty = HashMap::new();
        Ok(read(state.orgs.get(&org).unwrap_or(&empty)))
    }
}
