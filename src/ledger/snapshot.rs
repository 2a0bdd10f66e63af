//! A ledger's whole state as one value, for checkpoints.
//!
//! [`LedgerSnapshot`] is everything a restart would rebuild from the records
//! up to and including sequence number `seq`: the entity tables (the newest
//! version of each organization, user, application and key), every wallet's
//! lots, deficit, lifetime sums, granted periods and limit counters, and the
//! idempotency keys of purchases and adjustments. Holds are not in it: they
//! do not survive a restart either.
//!
//! [`Ledger::from_snapshot`] installs the entities through the same `apply_*`
//! functions replay uses (so wallets, calendars, Lite schedules and payers
//! come out as replay makes them), then puts each wallet's saved state back
//! and checks its balance identity. Still pure: the store decides where the
//! bytes go (see `crate::store::checkpoint`).

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::ledger::admin::calendar_of;
use crate::ledger::calendar::YearMonth;
use crate::ledger::contract::OrgCalendar;
use crate::ledger::entity::{ApiKey, Application, Organization, User};
use crate::ledger::funding::Replay;
use crate::ledger::ids::{OrgId, WalletId};
use crate::ledger::journal::Journal;
use crate::ledger::lot::{ExpiredLot, Lot};
use crate::ledger::payer::PayerSpends;
use crate::ledger::wallet::{ReplayMismatch, Totals, WalletState};
use crate::ledger::{Ledger, LedgerConfig, RestoreError};

/// The ledger's state after every record up to `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerSnapshot {
    /// Every record with a sequence number up to this one is in the state;
    /// none above it is.
    pub seq: u64,
    /// Organizations, by id.
    pub orgs: Vec<Organization>,
    /// Users, by id.
    pub users: Vec<User>,
    /// Applications, by id.
    pub apps: Vec<Application>,
    /// Keys (hashes, never secrets), by id.
    pub keys: Vec<ApiKey>,
    /// Every wallet, by id.
    pub wallets: Vec<WalletSnapshot>,
    /// Idempotency keys of purchases and adjustments, with what each was
    /// first used for. Kept for good, as the live ledger keeps them.
    pub(crate) idempotency: Vec<IdempotencyKey>,
}

/// One remembered idempotency key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IdempotencyKey {
    pub org: OrgId,
    pub key: String,
    pub first: Replay,
}

/// One wallet's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletSnapshot {
    /// The wallet.
    pub wallet: WalletId,
    /// Its organization.
    pub org: OrgId,
    /// The latest time it saw.
    pub clock: DateTime<Utc>,
    /// Live lots in consumption order.
    pub lots: Vec<Lot>,
    /// Lots written off at their expiry whose write-off a late debit may
    /// still take back (absent from checkpoints written before them).
    #[serde(default)]
    pub expired: Vec<ExpiredLot>,
    /// Debits no lot covered, paid back by the next lot.
    pub deficit: Decimal,
    /// Lifetime sums of its entries.
    pub totals: Totals,
    /// Contract years whose lots were granted, as `(term, year)`.
    pub granted_years: Vec<(u32, u32)>,
    /// Last month whose Lite allowance was granted.
    pub lite_granted_through: Option<YearMonth>,
    /// Limit counters of the keys and owners paying from it.
    pub spends: PayerSpends,
}

impl WalletSnapshot {
    /// Sum of the live lots less the deficit.
    pub fn balance(&self) -> Decimal {
        self.lots.iter().map(|lot| lot.remaining).sum::<Decimal>() - self.deficit
    }
}

impl Ledger {
    /// The whole state, stating that it covers every record up to `seq`.
    /// Meant for a ledger nobody else changes (the checkpointer's shadow,
    /// a test): on a live one, wallets would be read at different moments.
    pub fn snapshot(&self, seq: u64) -> LedgerSnapshot {
        let mut orgs: Vec<Organization> = self.orgs.iter().map(|o| o.clone()).collect();
        orgs.sort_by_key(|o| o.id);
        let mut users: Vec<User> = self.users.iter().map(|u| u.clone()).collect();
        users.sort_by_key(|u| u.id);
        let mut apps: Vec<Application> = self.apps.iter().map(|a| a.clone()).collect();
        apps.sort_by_key(|a| a.id);
        let mut keys: Vec<ApiKey> = self.keys.iter().map(|k| k.clone()).collect();
        keys.sort_by_key(|k| k.id);
        let mut wallets: Vec<WalletSnapshot> =
            self.wallets.iter().map(|cell| cell.value().state.lock().snapshot()).collect();
        wallets.sort_by_key(|w| w.wallet);
        let mut idempotency: Vec<IdempotencyKey> = self
            .idempotency
            .lock()
            .iter()
            .map(|((org, key), first)| IdempotencyKey { org: *org, key: key.clone(), first: first.clone() })
            .collect();
        idempotency.sort_by(|a, b| (a.org, &a.key).cmp(&(b.org, &b.key)));
        LedgerSnapshot { seq, orgs, users, apps, keys, wallets, idempotency }
    }

    /// A ledger in the state `snapshot` saved, numbering new records above
    /// its `seq` and writing them to `journal`. A snapshot whose wallets do
    /// not add up is refused.
    pub fn from_snapshot(
        config: LedgerConfig,
        journal: Arc<dyn Journal>,
        snapshot: &LedgerSnapshot,
    ) -> Result<Ledger, RestoreError> {
        let ledger = Ledger::new(config, journal);
        for org in &snapshot.orgs {
            ledger.apply_org(org);
        }
        // Wallets before users: a Lite wallet outlives its user's upgrade
        // to Pro, and applying that user's newest version alone would not
        // create it.
        let calendars: HashMap<OrgId, OrgCalendar> =
            snapshot.orgs.iter().map(|org| (org.id, calendar_of(org))).collect();
        for saved in &snapshot.wallets {
            if !ledger.wallets.contains_key(&saved.wallet) {
                let calendar = calendars.get(&saved.org).cloned().ok_or_else(|| {
                    RestoreError::Mismatch(ReplayMismatch {
                        entry: crate::ledger::ids::EntryId(0),
                        wallet: saved.wallet,
                        problem: format!("the checkpoint has no organization {}", saved.org),
                    })
                })?;
                let state = WalletState::new(saved.wallet, saved.org, calendar, None);
                ledger.wallets.insert(saved.wallet, ledger.new_cell(state));
            }
        }
        // The checkpoint does not keep each version's own number; its own is
        // at least as new, and every later version is numbered above it.
        for user in &snapshot.users {
            ledger.apply_user(user, snapshot.seq);
        }
        for app in &snapshot.apps {
            ledger.apply_app(app, snapshot.seq);
        }
        for key in &snapshot.keys {
            ledger.apply_key(key, snapshot.seq);
        }
        for saved in &snapshot.wallets {
            if let Some(cell) = ledger.cell(saved.wallet) {
                cell.state.lock().restore(saved)?;
            }
        }
        {
            let mut idempotency = ledger.idempotency.lock();
            for saved in &snapshot.idempotency {
                idempotency.insert((saved.org, saved.key.clone()), saved.first.clone());
            }
        }
        ledger.shared.committer.skip_past(snapshot.seq);
        Ok(ledger)
    }
}
