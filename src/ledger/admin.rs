//! Entity operations: organizations, contracts, users, applications, keys.
//!
//! Every change follows one pattern, shared with replay: take a sequence
//! number, append the entity's new version to the journal, then *apply* it
//! (update the maps and the affected wallets). Replay calls the same
//! `apply_*` functions, so a restarted ledger reaches the same state by the
//! same code. Changes that also move money (the first grants of an org or a
//! Lite user, plan changes) record those as entries after the entity.
//!
//! Every call names the organization it acts for; naming anything of
//! another organization is refused with [`LedgerError::CrossOrg`]. Each
//! operation waits for the journal to make it durable before returning.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use parking_lot::Mutex;
use rust_decimal::Decimal;

use crate::ledger::calendar::YearMonth;
use crate::ledger::contract::{ContractTerm, OrgCalendar};
use crate::ledger::entity::{ApiKey, Application, KeyHash, KeyScope, Organization, Plan, User};
use crate::ledger::funding::check_key;
use crate::ledger::ids::{AppId, KeyId, OrgId, Owner, UserId, WalletId};
use crate::ledger::journal::{Record, RecordBody};
use crate::ledger::limit::Limits;
use crate::ledger::wallet::{LiteSchedule, WalletCell, WalletState};
use crate::ledger::{Ledger, LedgerError};

/// The largest amount any single allocation, purchase or adjustment may
/// carry (one trillion credits). Keeps every product and sum the ledger
/// computes far inside `Decimal`'s range.
pub const MAX_AMOUNT: Decimal = Decimal::from_parts(0xD4A5_1000, 0xE8, 0, false, 0);

/// A new organization.
#[derive(Clone, Debug)]
pub struct NewOrg {
    /// Display name.
    pub name: String,
    /// Zone for days, months and contract years (UTC if unsure).
    pub time_zone: Tz,
    /// First contract term, if signed already.
    pub contract: Option<ContractTerm>,
}

/// A new user.
#[derive(Clone, Debug)]
pub struct NewUser {
    /// Display name.
    pub name: String,
    /// Starting plan.
    pub plan: Plan,
    /// Monthly allowance while on Lite.
    pub lite_monthly_allowance: Decimal,
    /// Pro-rate the allowance on a Pro -> Lite downgrade.
    pub prorate_on_downgrade: bool,
    /// The user's spending limits.
    pub limits: Limits,
}

/// A new application.
#[derive(Clone, Debug)]
pub struct NewApp {
    /// Display name.
    pub name: String,
    /// Limits of the application as a whole.
    pub limits: Limits,
    /// Limits applied to each end user separately.
    pub end_user_limits: Limits,
}

/// A new API key. The admin API generates the secret, shows it once, and
/// passes only its hash here.
#[derive(Clone, Debug)]
pub struct NewKey {
    /// The user or application it speaks for.
    pub owner: Owner,
    /// SHA-256 of the secret.
    pub hash: KeyHash,
    /// Operator label.
    pub label: String,
    /// The key's own limits.
    pub limits: Limits,
}

/// The most decimal places a money input may carry: the cost scale (a
/// nano-dollar), so every amount the ledger adds is a whole number of
/// nano-dollars. With amounts up to [`MAX_AMOUNT`] that is at most 22
/// digits, and sums of millions of them stay below `Decimal`'s 28 exact
/// digits; an input with 28 places would make a sum round silently (and a
/// replay disagree with the balance it recorded).
pub const MAX_AMOUNT_SCALE: u32 = 9;

/// Whether `amount` has more decimal places than [`MAX_AMOUNT_SCALE`]
/// (trailing zeros do not count).
pub fn too_fine(amount: Decimal) -> bool {
    amount.scale() > MAX_AMOUNT_SCALE && amount.normalize().scale() > MAX_AMOUNT_SCALE
}

/// Longest name, label, reference or reason, in bytes: text for people to
/// read, journalled whole with every change of what it names.
pub const MAX_TEXT_BYTES: usize = 256;
/// Most routes, and most models, one key's scope may list.
pub const MAX_SCOPE_ENTRIES: usize = 64;
/// Most bytes one key's scope may hold, routes and models together: it is
/// kept in memory for the key's life and journalled with each change.
pub const MAX_SCOPE_BYTES: usize = 4096;
/// Most keys, revoked ones included, one organization may ever have:
/// revoked keys cannot be deleted, and each stays in memory (without its
/// scope) for the books' sake.
pub const MAX_KEYS_EVER_PER_ORG: usize = 1_000_000;
/// Most users, applications and live keys (of each) one organization may
/// have: each lives in every replica's memory. (Counted only once the whole
/// gateway has that many, so a create scans nothing before.)
pub const MAX_PER_ORG: usize = 100_000;

pub(crate) fn check_text(field: &'static str, text: &str) -> Result<(), LedgerError> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(LedgerError::TooLong { field, max: MAX_TEXT_BYTES, unit: "bytes" });
    }
    if text.chars().any(|c| c.is_control() || is_invisible_format(c)) {
        return Err(LedgerError::Unprintable { field });
    }
    Ok(())
}

/// A free text (a reason, a reference): as [`check_text`], but it may run
/// over several lines.
pub(crate) fn check_prose(field: &'static str, text: &str) -> Result<(), LedgerError> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(LedgerError::TooLong { field, max: MAX_TEXT_BYTES, unit: "bytes" });
    }
    text.split(['\n', '\r']).try_for_each(|line| check_text(field, line))
}

/// Unicode's format characters (category Cf) that change how the text
/// around them shows without showing themselves: bidi controls, zero-width
/// spaces and joiners of words, the soft hyphen. (The zero-width joiner and
/// non-joiner, which scripts and emoji need, and the tags of flag emoji
/// pass.) The admin API's document states the same set
/// (`crate::admin::openapi`).
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'
            | '\u{200E}'
            | '\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
    )
}

fn check_scope(scope: &KeyScope) -> Result<(), LedgerError> {
    for (field, list) in [("routes", &scope.routes), ("models", &scope.models)] {
        if list.len() > MAX_SCOPE_ENTRIES {
            return Err(LedgerError::TooLong { field, max: MAX_SCOPE_ENTRIES, unit: "entries" });
        }
        list.iter().try_for_each(|entry| check_text(field, entry))?;
    }
    let bytes: usize = scope.routes.iter().chain(&scope.models).map(String::len).sum();
    if bytes > MAX_SCOPE_BYTES {
        return Err(LedgerError::TooLong {
            field: "scope",
            max: MAX_SCOPE_BYTES,
            unit: "bytes of routes and models",
        });
    }
    Ok(())
}

pub(crate) fn check_amount(field: &'static str, amount: Decimal) -> Result<(), LedgerError> {
    if amount.is_sign_negative() || amount > MAX_AMOUNT || too_fine(amount) {
        return Err(LedgerError::InvalidAmount {
            field,
            expected: "between 0 and 1,000,000,000,000, with at most 9 decimal places",
            amount,
        });
    }
    Ok(())
}

fn check_term(term: &ContractTerm) -> Result<(), LedgerError> {
    term.validate()?;
    check_amount("platform_allocation_per_year", term.platform_allocation_per_year)?;
    check_amount("seat_allocation", term.seat_allocation()?)
}

impl Ledger {
    /// Creates an organization and its pool; grants the contract year in
    /// force, if any.
    pub fn create_org(&self, new: NewOrg, now: DateTime<Utc>) -> Result<Organization, LedgerError> {
        self.create_org_once(new, None, now)
    }

    /// [`Ledger::create_org`] under an idempotency key: a retry of the same
    /// request answers the org the first one created (once it is durable),
    /// a different request under the key is refused naming the field.
    pub fn create_org_once(
        &self,
        new: NewOrg,
        idempotency_key: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<Organization, LedgerError> {
        let _admin = self.lock_admin()?;
        if let Some(key) = &idempotency_key {
            check_key(key)?;
            let first =
                self.orgs.iter().find(|org| org.idempotency_key.as_ref() == Some(key)).map(|org| org.clone());
            if let Some(first) = first {
                let differs = [
                    ("name", first.name != new.name),
                    ("time_zone", first.time_zone != new.time_zone),
                    ("contract", first.contracts.first() != new.contract.as_ref()),
                ];
                return self.replayed(key, first, &differs);
            }
        }
        check_text("name", &new.name)?;
        let mut calendar = OrgCalendar::new(new.time_zone);
        if let Some(term) = &new.contract {
            check_term(term)?;
            calendar = calendar.with_term(term.clone())?;
        }
        let record = self.commit(|seq| {
            RecordBody::Org(Organization {
                id: OrgId(seq),
                name: new.name,
                time_zone: new.time_zone,
                contracts: calendar.terms.to_vec(),
                created_at: now,
                idempotency_key,
            })
        });
        let RecordBody::Org(org) = record.body else {
            unreachable!("commit returns the record it was given")
        };
        self.apply_org(&org);
        self.advance_wallet(WalletId::Pool(org.id), now);
        self.shared.committer.sync()?;
        Ok(org)
    }

    /// Adds a contract term (a renewal). It must start on or after the end of
    /// the last term; its years are granted as they begin. Lots of earlier
    /// terms keep their own expiry.
    pub fn renew_contract(
        &self,
        org: OrgId,
        term: ContractTerm,
        now: DateTime<Utc>,
    ) -> Result<Organization, LedgerError> {
        let _admin = self.lock_admin()?;
        let mut current = self.org(org).ok_or(LedgerError::UnknownOrg(org))?;
        check_term(&term)?;
        let calendar = calendar_of(&current).with_term(term)?;
        current.contracts = calendar.terms.to_vec();
        let record = self.commit(|_| RecordBody::Org(current.clone()));
        debug_assert!(matches!(record.body, RecordBody::Org(_)));
        self.apply_org(&current);
        self.advance_wallet(WalletId::Pool(org), now);
        self.shared.committer.sync()?;
        Ok(current)
    }

    /// Creates a user. A Lite user gets a wallet and this month's allowance in
    /// full at once; a Pro user draws on the pool.
    pub fn create_user(&self, org: OrgId, new: NewUser, now: DateTime<Utc>) -> Result<User, LedgerError> {
        self.create_user_once(org, new, None, now)
    }

    /// [`Ledger::create_user`] under an idempotency key, scoped to `org`: a
    /// retry of the same request answers the user the first one created; a
    /// different request, or one for a user changed since, is refused
    /// naming the field.
    pub fn create_user_once(
        &self,
        org: OrgId,
        new: NewUser,
        idempotency_key: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<User, LedgerError> {
        let _admin = self.lock_admin()?;
        let tz = self.org(org).ok_or(LedgerError::UnknownOrg(org))?.time_zone;
        if let Some(key) = &idempotency_key {
            check_key(key)?;
            let first = self
                .users
                .iter()
                .find(|user| user.org == org && user.idempotency_key.as_ref() == Some(key))
                .map(|user| user.clone());
            if let Some(first) = first {
                let differs = [
                    ("name", first.name != new.name),
                    ("plan", first.plan != new.plan),
                    ("lite_monthly_allowance", first.lite_monthly_allowance != new.lite_monthly_allowance),
                    ("prorate_on_downgrade", first.prorate_on_downgrade != new.prorate_on_downgrade),
                    ("limits", first.limits != new.limits),
                ];
                return self.replayed(key, first, &differs);
            }
        }
        check_text("name", &new.name)?;
        if self.users.len() >= MAX_PER_ORG
            && self.users.iter().filter(|user| user.org == org).count() >= MAX_PER_ORG
        {
            return Err(LedgerError::TooMany { what: "users", max: MAX_PER_ORG });
        }
        check_amount("lite_monthly_allowance", new.lite_monthly_allowance)?;
        new.limits.validate()?;
        let record = self.commit(|seq| {
            RecordBody::User(User {
                id: UserId(seq),
                org,
                name: new.name,
                plan: new.plan,
                lite_monthly_allowance: new.lite_monthly_allowance,
                prorate_on_downgrade: new.prorate_on_downgrade,
                lite_allowance_from: (new.plan == Plan::Lite).then(|| YearMonth::containing(tz, now)),
                limits: new.limits,
                created_at: now,
                idempotency_key,
            })
        });
        let RecordBody::User(user) = record.body else {
            unreachable!("commit returns the record it was given")
        };
        self.apply_user(&user, record.seq);
        if user.plan == Plan::Lite {
            self.advance_wallet(WalletId::Lite(user.id), now);
        }
        self.shared.committer.sync()?;
        Ok(user)
    }

    /// Changes a user's limits.
    pub fn set_user_limits(&self, org: OrgId, user: UserId, limits: Limits) -> Result<User, LedgerError> {
        limits.validate()?;
        self.update_user(org, user, |user| {
            user.limits = limits;
            Ok(())
        })
    }

    /// Changes a user's Lite allowance and downgrade setting. A Lite user's
    /// new allowance is granted from next month: this month's grant, if due,
    /// is made at the old one first. The user record says so
    /// (`lite_allowance_from`), because a replay knows which months were
    /// granted only from their grant entries, and a grant of 0 writes none:
    /// after a restart this month would be granted again at the new amount.
    pub fn set_lite_allowance(
        &self,
        org: OrgId,
        user: UserId,
        allowance: Decimal,
        prorate_on_downgrade: bool,
        now: DateTime<Utc>,
    ) -> Result<User, LedgerError> {
        check_amount("lite_monthly_allowance", allowance)?;
        self.update_user(org, user, |current| {
            if current.plan == Plan::Lite && current.lite_monthly_allowance != allowance {
                let tz = self.org(org).ok_or(LedgerError::UnknownOrg(org))?.time_zone;
                let now = self.advance_wallet(WalletId::Lite(user), now);
                let next = YearMonth::containing(tz, now).next();
                current.lite_allowance_from = current.lite_allowance_from.max(Some(next));
            }
            current.lite_monthly_allowance = allowance;
            current.prorate_on_downgrade = prorate_on_downgrade;
            Ok(())
        })
    }

    pub(crate) fn update_user(
        &self,
        org: OrgId,
        user: UserId,
        change: impl FnOnce(&mut User) -> Result<(), LedgerError>,
    ) -> Result<User, LedgerError> {
        let _admin = self.lock_admin()?;
        let mut current = self.user_in(org, user)?;
        change(&mut current)?;
        let record = self.commit(|_| RecordBody::User(current.clone()));
        self.apply_user(&current, record.seq);
        self.shared.committer.sync()?;
        Ok(current)
    }

    /// Creates an application drawing on the pool.
    pub fn create_app(
        &self,
        org: OrgId,
        new: NewApp,
        now: DateTime<Utc>,
    ) -> Result<Application, LedgerError> {
        let _admin = self.lock_admin()?;
        if !self.orgs.contains_key(&org) {
            return Err(LedgerError::UnknownOrg(org));
        }
        check_text("name", &new.name)?;
        if self.apps.len() >= MAX_PER_ORG
            && self.apps.iter().filter(|app| app.org == org).count() >= MAX_PER_ORG
        {
            return Err(LedgerError::TooMany { what: "applications", max: MAX_PER_ORG });
        }
        new.limits.validate()?;
        new.end_user_limits.validate()?;
        let record = self.commit(|seq| {
            RecordBody::App(Application {
                id: AppId(seq),
                org,
                name: new.name,
                limits: new.limits,
                end_user_limits: new.end_user_limits,
                created_at: now,
            })
        });
        let RecordBody::App(app) = record.body else {
            unreachable!("commit returns the record it was given")
        };
        self.apply_app(&app, record.seq);
        self.shared.committer.sync()?;
        Ok(app)
    }

    /// Changes an application's limits.
    pub fn set_app_limits(
        &self,
        org: OrgId,
        app: AppId,
        limits: Limits,
        end_user_limits: Limits,
    ) -> Result<Application, LedgerError> {
        let _admin = self.lock_admin()?;
        limits.validate()?;
        end_user_limits.validate()?;
        let mut current = self.app(app).ok_or(LedgerError::UnknownApp(app))?;
        self.ensure_same_org(org, current.org, &app.to_string())?;
        current.limits = limits;
        current.end_user_limits = end_user_limits;
        let record = self.commit(|_| RecordBody::App(current.clone()));
        self.apply_app(&current, record.seq);
        self.shared.committer.sync()?;
        Ok(current)
    }

    /// Registers a key for a user or application of `org`.
    pub fn create_key(&self, org: OrgId, new: NewKey, now: DateTime<Utc>) -> Result<ApiKey, LedgerError> {
        let _admin = self.lock_admin()?;
        let owner_org = self.owner_org(new.owner)?;
        self.ensure_same_org(org, owner_org, &new.owner.to_string())?;
        check_text("label", &new.label)?;
        // Revoked keys cannot be deleted: live ones count against one cap,
        // all against a larger one (revoked keys keep no scope, so each is small).
        let live = |key: &ApiKey| key.org == org && !key.revoked;
        if self.keys.len() >= MAX_PER_ORG && self.keys.iter().filter(|key| live(key)).count() >= MAX_PER_ORG {
            return Err(LedgerError::TooMany { what: "keys", max: MAX_PER_ORG });
        }
        if self.keys.len() >= MAX_KEYS_EVER_PER_ORG
            && self.keys.iter().filter(|key| key.org == org).count() >= MAX_KEYS_EVER_PER_ORG
        {
            return Err(LedgerError::TooMany {
                what: "keys (revoked ones included)",
                max: MAX_KEYS_EVER_PER_ORG,
            });
        }
        new.limits.validate()?;
        if self.key_index.contains_key(&new.hash) {
            return Err(LedgerError::DuplicateKey);
        }
        let record = self.commit(|seq| {
            RecordBody::Key(ApiKey {
                id: KeyId(seq),
                org,
                owner: new.owner,
                hash: new.hash,
                label: new.label,
                limits: new.limits,
                revoked: false,
                created_at: now,
                scope: KeyScope::default(),
            })
        });
        let RecordBody::Key(key) = record.body else {
            unreachable!("commit returns the record it was given")
        };
        self.apply_key(&key, record.seq);
        self.shared.committer.sync()?;
        Ok(key)
    }

    /// Revokes a key: it resolves to nothing and cannot hold. Open holds
    /// taken with it still settle. Its scope, which nothing reads again, is
    /// dropped (the key stays in memory for good).
    pub fn revoke_key(&self, org: OrgId, key: KeyId) -> Result<ApiKey, LedgerError> {
        // Revoked for good: a repeated revocation answers the key.
        if let Some(found) = self.key(key).filter(|found| found.revoked && found.org == org) {
            return self.durable(found);
        }
        self.update_key(org, key, |key| {
            key.revoked = true;
            key.scope = KeyScope::default();
        })
    }

    /// Changes a key's limits.
    pub fn set_key_limits(&self, org: OrgId, key: KeyId, limits: Limits) -> Result<ApiKey, LedgerError> {
        limits.validate()?;
        self.update_key(org, key, |key| key.limits = limits)
    }

    /// Restricts a key to some routes and models (empty lists: everything).
    pub fn set_key_scope(&self, org: OrgId, key: KeyId, scope: KeyScope) -> Result<ApiKey, LedgerError> {
        check_scope(&scope)?;
        self.update_key(org, key, |key| key.scope = scope)
    }

    fn update_key(
        &self,
        org: OrgId,
        key: KeyId,
        change: impl FnOnce(&mut ApiKey),
    ) -> Result<ApiKey, LedgerError> {
        let _admin = self.lock_admin()?;
        let mut current = self.key(key).ok_or(LedgerError::UnknownKey(key))?;
        self.ensure_same_org(org, current.org, &key.to_string())?;
        let before = current.clone();
        change(&mut current);
        // A revoked key takes no change (a repeated revocation is answered
        // before); a change that changes nothing (the same scope sent
        // again) writes nothing.
        if before.revoked {
            return Err(LedgerError::KeyRevoked { key });
        }
        if current == before {
            return self.durable(current);
        }
        let record = self.commit(|_| RecordBody::Key(current.clone()));
        self.apply_key(&current, record.seq);
        self.shared.committer.sync()?;
        Ok(current)
    }

    /// Takes a sequence number, builds the record with it, appends it.
    pub(crate) fn commit(&self, make: impl FnOnce(u64) -> RecordBody) -> Record {
        let seq = self.shared.committer.next_seq();
        let record = Record { seq, body: make(seq) };
        self.shared.committer.append(record.clone());
        record
    }

    pub(crate) fn user_in(&self, org: OrgId, user: UserId) -> Result<User, LedgerError> {
        let current = self.user(user).ok_or(LedgerError::UnknownUser(user))?;
        self.ensure_same_org(org, current.org, &user.to_string())?;
        Ok(current)
    }

    fn owner_org(&self, owner: Owner) -> Result<OrgId, LedgerError> {
        match owner {
            Owner::User(user) => self.user(user).map(|u| u.org).ok_or(LedgerError::UnknownUser(user)),
            Owner::App(app) => self.app(app).map(|a| a.org).ok_or(LedgerError::UnknownApp(app)),
        }
    }

    fn ensure_same_org(&self, org: OrgId, target_org: OrgId, target: &str) -> Result<(), LedgerError> {
        if org == target_org {
            Ok(())
        } else {
            Err(LedgerError::CrossOrg { org, target: target.to_owned(), target_org })
        }
    }

    /// Brings `wallet` up to `now`; returns the wallet's own time after,
    /// which the tick may have moved past `now` (a request's time is read
    /// when it arrives): months and years are reckoned from that.
    pub(crate) fn advance_wallet(&self, wallet: WalletId, now: DateTime<Utc>) -> DateTime<Utc> {
        match self.cell(wallet) {
            Some(cell) => cell.state.lock().advance(now, &self.shared.committer),
            None => now,
        }
    }

    pub(crate) fn new_cell(&self, state: WalletState) -> Arc<WalletCell> {
        Arc::new(WalletCell { shared: Arc::clone(&self.shared), state: Mutex::new(state) })
    }

    // ---- apply: shared by live changes and replay -------------------------

    /// Installs an org version: its pool exists and every wallet of the org
    /// sees its calendar.
    pub(crate) fn apply_org(&self, org: &Organization) {
        self.orgs.insert(org.id, org.clone());
        let calendar = calendar_of(org);
        let pool = WalletId::Pool(org.id);
        if !self.wallets.contains_key(&pool) {
            let state = WalletState::new(pool, org.id, calendar.clone(), None);
            self.wallets.insert(pool, self.new_cell(state));
        }
        for wallet in self.wallets_of(org.id) {
            if let Some(cell) = self.cell(wallet) {
                cell.state.lock().set_calendar(calendar.clone());
            }
        }
    }

    /// Installs a user version (the record numbered `version`): creates their Lite wallet on first need,
    /// moves their spend and keys when their paying wallet changes, and sets
    /// the Lite schedule.
    pub(crate) fn apply_user(&self, user: &User, version: u64) {
        let previous = self.users.insert(user.id, user.clone());
        let wallet = match user.plan {
            Plan::Pro => WalletId::Pool(user.org),
            Plan::Lite => WalletId::Lite(user.id),
        };
        let lite_wallet = WalletId::Lite(user.id);
        if user.plan == Plan::Lite && !self.wallets.contains_key(&lite_wallet) {
            let calendar = self.org(user.org).map_or(OrgCalendar::new(Tz::UTC), |org| calendar_of(&org));
            let state = WalletState::new(lite_wallet, user.org, calendar, None);
            self.wallets.insert(lite_wallet, self.new_cell(state));
        }
        if let Some(cell) = self.cell(lite_wallet) {
            cell.state.lock().set_lite(LiteSchedule {
                allowance: user.lite_monthly_allowance,
                allowance_from: user.lite_allowance_from,
            });
        }
        let owner = Owner::User(user.id);
        if let Some(previous) = previous.filter(|previous| previous.plan != user.plan) {
            let from = match previous.plan {
                Plan::Pro => WalletId::Pool(user.org),
                Plan::Lite => lite_wallet,
            };
            let moved = self.cell(from).and_then(|cell| cell.state.lock().take_owner(owner));
            if let (Some(moved), Some(to)) = (moved, self.cell(wallet)) {
                to.state.lock().payers.put_owner(moved);
            }
        }
        if let Some(cell) = self.cell(wallet) {
            cell.state.lock().payers.set_owner(owner, user.limits, Limits::NONE, version);
        }
    }

    /// Installs an application version (the record numbered `version`) on
    /// its org's pool.
    pub(crate) fn apply_app(&self, app: &Application, version: u64) {
        self.apps.insert(app.id, app.clone());
        if let Some(cell) = self.cell(WalletId::Pool(app.org)) {
            let mut state = cell.state.lock();
            state.payers.set_owner(Owner::App(app.id), app.limits, app.end_user_limits, version);
        }
    }

    /// Installs a key version (the record numbered `version`) on its
    /// owner's wallet (or removes it there when revoked).
    pub(crate) fn apply_key(&self, key: &ApiKey, version: u64) {
        self.keys.insert(key.id, key.clone());
        self.key_index.insert(key.hash, key.id);
        let Some(cell) = self.wallet_of(key.owner).ok().and_then(|wallet| self.cell(wallet)) else {
            return;
        };
        let mut state = cell.state.lock();
        if key.revoked {
            state.payers.remove_key(key.id);
        } else {
            state.payers.set_key(key.id, key.owner, key.limits, version);
        }
    }
}

/// The calendar an org's wallets use.
pub(crate) fn calendar_of(org: &Organization) -> OrgCalendar {
    OrgCalendar { tz: org.time_zone, terms: Arc::from(org.contracts.clone()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_of_finer_amounts_would_round_and_are_refused() {
        // Proves why the scale is capped: 28 places make a plain sum round.
        let fine: Decimal = "0.0000000000000000000000000001".parse().unwrap_or_default();
        let sum = Decimal::from(1_000_000) + fine;
        assert_eq!(sum - Decimal::from(1_000_000), Decimal::ZERO, "the sum lost the input");
        assert!(check_amount("amount", fine).is_err());
        // At the cap, the largest amounts add exactly.
        let finest: Decimal = "999999999999.999999999".parse().unwrap_or_default();
        assert!(check_amount("amount", finest).is_ok());
        let total = (0..1000).fold(Decimal::ZERO, |total, _| total + finest);
        assert_eq!(total, finest * Decimal::from(1000), "sums at the cap stay exact");
        assert_eq!(total.scale(), MAX_AMOUNT_SCALE);
        assert!(
            check_amount("amount", "1.500000000000".parse().unwrap_or_default()).is_ok(),
            "zeros do not count"
        );
    }

    #[test]
    fn max_amount_is_one_trillion() {
        // Proves the hand-built constant is what its doc says.
        assert_eq!(MAX_AMOUNT, Decimal::from(1_000_000_000_000_i64));
    }
}
