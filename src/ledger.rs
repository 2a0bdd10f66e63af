//! The credit ledger: organizations, wallets, lots, holds, limits and entries.
//!
//! Pure and synchronous: every operation takes the time as `now` and never
//! reads a clock or does I/O. Committed changes are handed to an injected
//! [`Journal`] (the store's group-commit writer in production).
//!
//! - [`calendar`]  — period boundaries in an org's time zone
//! - [`contract`]  — contract terms and contract years
//! - [`entity`]    — organizations, users, applications, API keys
//! - [`entry`]     — ledger entries
//! - [`ids`]       — identifier newtypes
//! - [`journal`]   — where committed records go
//! - [`limit`]     — spending limits and period counters
//! - [`lot`]       — credit lots and consumption order
//! - `admin`       — entity operations; `plan` — upgrades and downgrades
//! - `funding`     — purchases and adjustments, idempotent
//! - `spend`       — the data path: resolve key, hold, settle, void, tick
//! - `hold`        — the hold token and open-hold bookkeeping
//! - `payer`       — who may pay from a wallet, and their spend
//! - `wallet`      — one wallet's state and balance changes
//! - `restore`     — rebuilding a ledger from its records
//! - [`snapshot`]  — the whole state as one value, for checkpoints
//! - `audit`       — recomputing balances from entries
//!
//! Concurrency: each wallet is a `parking_lot::Mutex` in a `DashMap`, so
//! operations on different wallets never contend; a wallet's state carries
//! everything its operations read. Entity changes and purchases are
//! serialized by one admin mutex (they are rare), and the lock order is
//! admin -> entity maps -> one wallet. No lock is held across a journal sync.

mod admin;
mod audit;
pub mod calendar;
pub mod config;
pub mod contract;
pub mod entity;
pub mod entry;
mod error;
mod funding;
mod hold;
pub mod ids;
pub mod journal;
pub mod limit;
pub mod lot;
mod payer;
mod plan;
mod refusal;
mod restore;
pub mod snapshot;
mod spend;
mod wallet;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use parking_lot::Mutex;
use rust_decimal::Decimal;
use serde::Serialize;

pub(crate) use admin::check_amount;
pub use admin::{too_fine, NewApp, NewKey, NewOrg, NewUser, MAX_AMOUNT_SCALE};
pub use audit::{Audit, AuditReport, Mismatch};
pub use config::LedgerConfig;
pub use error::LedgerError;
pub use funding::{AdjustmentReceipt, AdjustmentRequest, PurchaseReceipt, PurchaseRequest};
pub use hold::{Hold, SettleError, Settlement};
pub use refusal::{Refusal, WalletView};
pub use restore::{Replayer, RestoreError};
pub use spend::{ResolvedKey, SpendContext, TickReport};
pub use wallet::{ReplayMismatch, Totals};

use entity::{ApiKey, Application, KeyHash, Organization, Plan, User};
use ids::{AppId, IdDashMap, KeyId, OrgId, Owner, UserId, WalletId};
use journal::{Committer, Journal};
use lot::Lot;
use wallet::WalletCell;

/// Configuration and the committer, shared by the ledger and every wallet.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: LedgerConfig,
    pub committer: Committer,
}

/// Shards of the wallet map. dashmap's default (4 x cores) leaves 8 on two
/// cores, and each lookup writes its shard's lock word, so two threads on
/// different wallets would still trade that cache line most of the time.
const WALLET_SHARDS: usize = 128;

/// The ledger. Share it behind an `Arc`; every method takes `&self`.
pub struct Ledger {
    shared: Arc<Shared>,
    wallets: IdDashMap<WalletId, Arc<WalletCell>>,
    orgs: IdDashMap<OrgId, Organization>,
    users: IdDashMap<UserId, User>,
    apps: IdDashMap<AppId, Application>,
    keys: IdDashMap<KeyId, ApiKey>,
    /// By the SHA-256 of a secret: a client cannot choose where its digest
    /// lands, and only the admin API adds to the map.
    key_index: IdDashMap<KeyHash, KeyId>,
    /// Idempotency keys of purchases and adjustments, per organization.
    idempotency: Mutex<HashMap<(OrgId, String), funding::Replay>>,
    /// Serializes entity changes, purchases and adjustments.
    admin: Mutex<()>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("wallets", &self.wallets.len())
            .field("orgs", &self.orgs.len())
            .finish_non_exhaustive()
    }
}

/// A wallet's balance and lots, as the admin API shows them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WalletBalance {
    /// The wallet.
    pub wallet: WalletId,
    /// Its organization.
    pub org: OrgId,
    /// Sum of live lots, less any overrun.
    pub balance: Decimal,
    /// Balance less open holds.
    pub available: Decimal,
    /// Sum of open holds.
    pub held: Decimal,
    /// Number of open holds.
    pub open_holds: usize,
    /// Live lots in consumption order.
    pub lots: Vec<Lot>,
    /// Lifetime sums behind the balance.
    #[serde(skip)]
    pub totals: Totals,
    /// For a Lite wallet on an allowance, when the next allowance arrives.
    pub resets_at: Option<DateTime<Utc>>,
}

impl Ledger {
    /// An empty ledger writing to `journal`.
    pub fn new(config: LedgerConfig, journal: Arc<dyn Journal>) -> Self {
        Ledger {
            shared: Arc::new(Shared { config, committer: Committer::new(journal, 1) }),
            wallets: DashMap::with_hasher_and_shard_amount(Default::default(), WALLET_SHARDS),
            orgs: DashMap::default(),
            users: DashMap::default(),
            apps: DashMap::default(),
            keys: DashMap::default(),
            key_index: DashMap::default(),
            idempotency: Mutex::new(HashMap::new()),
            admin: Mutex::new(()),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LedgerConfig {
        &self.shared.config
    }

    /// An organization.
    pub fn org(&self, org: OrgId) -> Option<Organization> {
        self.orgs.get(&org).map(|o| o.clone())
    }

    /// A user.
    pub fn user(&self, user: UserId) -> Option<User> {
        self.users.get(&user).map(|u| u.clone())
    }

    /// An application.
    pub fn app(&self, app: AppId) -> Option<Application> {
        self.apps.get(&app).map(|a| a.clone())
    }

    /// A key record.
    pub fn key(&self, key: KeyId) -> Option<ApiKey> {
        self.keys.get(&key).map(|k| k.clone())
    }

    /// Every organization, by id.
    pub fn orgs(&self) -> Vec<Organization> {
        let mut orgs: Vec<Organization> = self.orgs.iter().map(|o| o.clone()).collect();
        orgs.sort_by_key(|o| o.id);
        orgs
    }

    /// The key records of an organization (hashes only, never secrets), by id.
    pub fn keys_of(&self, org: OrgId) -> Vec<ApiKey> {
        let mut keys: Vec<ApiKey> = self.keys.iter().filter(|k| k.org == org).map(|k| k.clone()).collect();
        keys.sort_by_key(|k| k.id);
        keys
    }

    /// Up to `limit` of an organization's users with ids above `after`, by
    /// id, and the last id given when more follow.
    pub fn users_page(&self, org: OrgId, after: u64, limit: usize) -> (Vec<User>, Option<u64>) {
        page_of(&self.users, |id| id.0, |user| user.org == org, after, limit)
    }

    /// [`Ledger::users_page`] for applications.
    pub fn apps_page(&self, org: OrgId, after: u64, limit: usize) -> (Vec<Application>, Option<u64>) {
        page_of(&self.apps, |id| id.0, |app| app.org == org, after, limit)
    }

    /// [`Ledger::users_page`] for key records (hashes only, never secrets).
    pub fn keys_page(&self, org: OrgId, after: u64, limit: usize) -> (Vec<ApiKey>, Option<u64>) {
        page_of(&self.keys, |id| id.0, |key| key.org == org, after, limit)
    }

    /// Every wallet of an organization: its pool, then its Lite wallets.
    pub fn wallets_of(&self, org: OrgId) -> Vec<WalletId> {
        let mut wallets: Vec<WalletId> = self
            .users
            .iter()
            .filter(|user| user.org == org)
            .map(|user| WalletId::Lite(user.id))
            .filter(|wallet| self.wallets.contains_key(wallet))
            .collect();
        wallets.sort();
        if self.wallets.contains_key(&WalletId::Pool(org)) {
            wallets.insert(0, WalletId::Pool(org));
        }
        wallets
    }

    /// The wallet an owner draws from right now.
    pub fn wallet_of(&self, owner: Owner) -> Result<WalletId, LedgerError> {
        match owner {
            Owner::App(app) => {
                let app = self.apps.get(&app).ok_or(LedgerError::UnknownApp(app))?;
                Ok(WalletId::Pool(app.org))
            }
            Owner::User(user) => {
                let user = self.users.get(&user).ok_or(LedgerError::UnknownUser(user))?;
                Ok(match user.plan {
                    Plan::Pro => WalletId::Pool(user.org),
                    Plan::Lite => WalletId::Lite(user.id),
                })
            }
        }
    }

    /// The organization a wallet belongs to.
    pub fn wallet_org(&self, wallet: WalletId) -> Result<OrgId, LedgerError> {
        match wallet {
            WalletId::Pool(org) if self.orgs.contains_key(&org) => Ok(org),
            WalletId::Pool(_) => Err(LedgerError::UnknownWallet(wallet)),
            WalletId::Lite(user) => {
                self.users.get(&user).map(|user| user.org).ok_or(LedgerError::UnknownWallet(wallet))
            }
        }
    }

    /// Refuses `wallet` unless it belongs to `org`.
    pub(crate) fn ensure_wallet_in(&self, org: OrgId, wallet: WalletId) -> Result<(), LedgerError> {
        let target_org = self.wallet_org(wallet)?;
        if target_org != org {
            return Err(LedgerError::CrossOrg { org, target: wallet.to_string(), target_org });
        }
        if !self.wallets.contains_key(&wallet) {
            return Err(LedgerError::UnknownWallet(wallet));
        }
        Ok(())
    }

    /// The wallet's balance, lots and holds, after bringing it up to `now`.
    pub fn balance(&self, wallet: WalletId, now: DateTime<Utc>) -> Result<WalletBalance, LedgerError> {
        let cell = self.cell(wallet).ok_or(LedgerError::UnknownWallet(wallet))?;
        let mut state = cell.state.lock();
        state.advance(now, &self.shared.committer);
        let balance = WalletBalance {
            wallet,
            org: state.org,
            balance: state.balance(),
            available: state.available(),
            held: state.held,
            open_holds: state.holds.len(),
            lots: state.lots.iter().cloned().collect(),
            totals: state.totals,
            resets_at: state.resets_at(),
        };
        drop(state);
        self.shared.committer.check()?;
        Ok(balance)
    }

    /// Whether a key may use a route and a model or tool; checked without
    /// copying the key record.
    pub fn key_allows(&self, key: KeyId, route: &str, model: Option<&str>) -> bool {
        self.keys
            .get(&key)
            .is_some_and(|k| k.scope.allows_route(route) && model.is_none_or(|m| k.scope.allows_model(m)))
    }

    /// What a refused caller is told about a wallet.
    pub fn wallet_view(&self, wallet: WalletId) -> Option<WalletView> {
        self.wallets.get(&wallet).map(|cell| cell.value().state.lock().view())
    }

    /// Balance less open holds, without copying the wallet's lots (for the
    /// `x-creditgate-available` header on every response).
    pub fn available(&self, wallet: WalletId) -> Option<Decimal> {
        self.wallets.get(&wallet).map(|cell| cell.value().state.lock().available())
    }

    /// Takes the admin lock for a change, refusing while the journal cannot
    /// take new work (failing storage, or a cluster follower). Checked once
    /// the lock is held: the store may fail while a change waits for it.
    fn lock_admin(&self) -> Result<parking_lot::MutexGuard<'_, ()>, LedgerError> {
        let admin = self.admin.lock();
        self.shared.committer.check_ready()?;
        Ok(admin)
    }

    fn cell(&self, wallet: WalletId) -> Option<Arc<WalletCell>> {
        self.wallets.get(&wallet).map(|cell| Arc::clone(cell.value()))
    }

    /// Recomputes every wallet from `entries` (all entries ever made, in id
    /// order) and compares with the live state; see [`Audit`].
    pub fn verify<'a>(&self, entries: impl IntoIterator<Item = &'a entry::LedgerEntry>) -> AuditReport {
        let mut audit = Audit::default();
        for entry in entries {
            audit.add(entry);
        }
        self.compare_with(audit)
    }

    /// Finishes `audit`, comparing its recomputed wallets with the live ones.
    pub fn compare_with(&self, audit: Audit) -> AuditReport {
        audit.compare_live(self.wallet_totals())
    }

    /// Every wallet's balance and lifetime sums, by wallet id.
    pub fn wallet_totals(&self) -> Vec<(WalletId, Decimal, Totals)> {
        let mut live: Vec<(WalletId, Decimal, Totals)> = self
            .wallets
            .iter()
            .map(|cell| {
                let state = cell.value().state.lock();
                (*cell.key(), state.balance(), state.totals)
            })
            .collect();
        live.sort_by_key(|(wallet, _, _)| *wallet);
        live
    }
}

/// Up to `limit` values of `map` that `belongs` with ids above `after`, by
/// id, and the last id given when more follow. Ids are gathered first and
/// only the page is copied: an organization with many keys costs one page
/// of memory to list, not all of them.
fn page_of<K, V: Clone>(
    map: &IdDashMap<K, V>,
    id: impl Fn(&K) -> u64,
    belongs: impl Fn(&V) -> bool,
    after: u64,
    limit: usize,
) -> (Vec<V>, Option<u64>)
where
    K: Copy + Eq + std::hash::Hash,
{
    let mut ids: Vec<K> = map
        .iter()
        .filter(|entry| id(entry.key()) > after && belongs(entry.value()))
        .map(|e| *e.key())
        .collect();
    ids.sort_unstable_by_key(&id);
    let more = ids.len() > limit;
    ids.truncate(limit);
    let next = if more { ids.last().map(&id) } else { None };
    (ids.iter().filter_map(|key| map.get(key).map(|value| value.clone())).collect(), next)
}

#[cfg(test)]
mod concurrency;
#[cfg(test)]
mod scenarios;
#[cfg(test)]
pub(crate) mod testkit;
