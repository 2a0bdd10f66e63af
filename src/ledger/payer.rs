//! Who may pay from a wallet, and their spend against their limits.
//!
//! Each wallet knows the keys that draw on it and their owners (users or
//! applications), with their limits and spend counters. Keeping this inside
//! the wallet's state means a hold takes exactly one lock, and moving a user
//! between wallets (upgrade, downgrade) carries their spend along.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::ledger::ids::{IdMap, KeyId, Owner};
use crate::ledger::limit::{LimitBreach, LimitPeriod, LimitSubject, Limits, PeriodCap, PeriodEnds, Spend};

#[derive(Clone, Debug)]
struct KeyPayer {
    owner: Owner,
    /// Boxed: every hold reads `owner`, few keys ever have caps, and a small
    /// entry keeps a pool's key list dense for the binary search. Kept (with
    /// empty limits) when the caps are lifted, so spend already counted in a
    /// period still counts if a cap returns within it, as for owners.
    capped: Option<Box<Capped>>,
}

/// A key's caps and its spend against them.
#[derive(Clone, Debug, Default)]
struct Capped {
    limits: Limits,
    spend: Spend,
    /// The sequence number of the key version that set `limits`.
    version: u64,
    /// The wallet's epoch when this counter last stopped counting the open
    /// holds: holds reserved before then take nothing back from it.
    forgot_at: u64,
}

impl KeyPayer {
    /// The key's caps and spend, while it has a cap.
    fn caps(&self) -> Option<&Capped> {
        self.capped.as_deref().filter(|capped| !capped.limits.is_empty())
    }

    fn caps_mut(&mut self) -> Option<&mut Capped> {
        self.capped.as_deref_mut().filter(|capped| !capped.limits.is_empty())
    }
}

/// An owner's limits and spend, carried between wallets on a plan change.
#[derive(Clone, Debug, Default)]
pub(crate) struct OwnerPayer {
    limits: Limits,
    spend: Spend,
    /// Applications only: caps applied to each end user separately.
    end_user_limits: Limits,
    end_users: HashMap<Box<str>, Spend>,
    /// The sequence number of the owner version that set both limits.
    version: u64,
    /// As [`Capped::forgot_at`], for its own counters...
    forgot_at: u64,
    /// ... and for its end users'.
    end_users_forgot_at: u64,
}

/// An owner with its keys, detached from one wallet to join another.
#[derive(Debug)]
pub(crate) struct MovedOwner {
    owner: Owner,
    payer: OwnerPayer,
    keys: Vec<(KeyId, KeyPayer)>,
}

/// Why a hold may not count against this wallet's payers.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PayerRefusal {
    /// The end-user table of an app is full of live counters.
    EndUserCapacity,
    /// A cap would be crossed.
    Limit(LimitBreach),
}

/// The keys and owners paying from one wallet.
#[derive(Debug, Default)]
pub(crate) struct Payers {
    /// Sorted by key id. A Lite wallet's usual single key sits inside the
    /// wallet, where a hash map costs two cold cache lines per hold; a pool's
    /// thousands of keys are found by binary search.
    keys: SmallVec<[(KeyId, KeyPayer); 1]>,
    owners: IdMap<Owner, OwnerPayer>,
    /// True when any key or owner here has a cap; when false the hot path
    /// skips limit bookkeeping altogether. Recomputed on every change.
    any_limits: bool,
    /// Bumped whenever a counter stops counting the open holds (it gets a
    /// cap where it had none, it began, it moved here): a hold reserved before takes
    /// nothing back from that counter, so it never takes another hold's
    /// reservation. Only that subject's counters forget; the others go on
    /// counting every open hold, so an edit of one cap lets no other be
    /// passed.
    epoch: u64,
}

/// The spend a hold or debit counts against: a key, its owner, and maybe an
/// end user of an application.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Spender<'a> {
    pub key: KeyId,
    pub owner: Owner,
    pub end_user: Option<&'a str>,
}

impl Payers {
    /// The owner of `key` if it pays from this wallet.
    pub fn owner_of(&self, key: KeyId) -> Option<Owner> {
        self.key(key).map(|payer| payer.owner)
    }

    /// Where `key` is in the sorted list, or where it would go.
    fn slot(&self, key: KeyId) -> Result<usize, usize> {
        self.keys.binary_search_by_key(&key, |(id, _)| *id)
    }

    fn key(&self, key: KeyId) -> Option<&KeyPayer> {
        Some(&self.keys[self.slot(key).ok()?].1)
    }

    fn key_mut(&mut self, key: KeyId) -> Option<&mut KeyPayer> {
        let at = self.slot(key).ok()?;
        Some(&mut self.keys[at].1)
    }

    /// Adds or updates an owner's limits, as set by the record numbered
    /// `version`.
    pub fn set_owner(&mut self, owner: Owner, limits: Limits, end_user_limits: Limits, version: u64) {
        // A new owner has no open holds to forget. A counter under a cap
        // counts every open hold, whichever caps it has: only one that
        // counted nothing (no cap) and now has one forgets the holds it
        // never counted. (Forgetting on every change let a cap be passed:
        // a cap lowered or raised while holds were open forgot them, so new
        // holds passed a check that the open ones, settling, then crossed.)
        let known = self.owners.contains_key(&owner);
        let payer = self.owners.entry(owner).or_default();
        let starts_counting = known && payer.limits.is_empty() && !limits.is_empty();
        let end_users_start_counting =
            known && payer.end_user_limits.is_empty() && !end_user_limits.is_empty();
        // An end user's counters are dropped once no cap needs them (see
        // `make_room`), so a period capped where none was counts every end
        // user from now, not only those still kept: the answer must not
        // depend on which were dropped.
        let newly_capped: Vec<LimitPeriod> = end_user_limits.newly_capped(&payer.end_user_limits).collect();
        payer.limits = limits;
        payer.end_user_limits = end_user_limits;
        payer.version = version;
        if starts_counting || end_users_start_counting {
            self.epoch += 1;
        }
        if starts_counting {
            payer.spend.forget_holds();
            payer.forgot_at = self.epoch;
        }
        if end_users_start_counting {
            payer.end_users.values_mut().for_each(Spend::forget_holds);
            payer.end_users_forgot_at = self.epoch;
        }
        if known {
            for spend in payer.end_users.values_mut() {
                newly_capped.iter().for_each(|period| spend.restart(*period));
            }
        }
        self.recount();
    }

    fn recount(&mut self) {
        self.any_limits = self.keys.iter().any(|(_, key)| key.caps().is_some())
            || self
                .owners
                .values()
                .any(|owner| !owner.limits.is_empty() || !owner.end_user_limits.is_empty());
    }

    /// Adds or updates a key, as set by the record numbered `version`; its
    /// owner must already be here.
    pub fn set_key(&mut self, key: KeyId, owner: Owner, limits: Limits, version: u64) {
        debug_assert!(self.owners.contains_key(&owner), "key {key} added before its owner {owner}");
        let at = match self.slot(key) {
            Ok(at) => at,
            Err(at) => {
                self.keys.insert(at, (key, KeyPayer { owner, capped: None }));
                at
            }
        };
        let payer = &mut self.keys[at].1;
        match (&mut payer.capped, limits.is_empty()) {
            (Some(capped), _) => {
                // As an owner's: only a key that counted nothing forgets.
                if capped.limits.is_empty() && !limits.is_empty() {
                    self.epoch += 1;
                    capped.spend.forget_holds();
                    capped.forgot_at = self.epoch;
                }
                capped.limits = limits;
                capped.version = version;
            }
            (None, true) => {}
            (None, false) => {
                // Holds open from before it was capped were never counted here.
                self.epoch += 1;
                let capped = Capped { limits, spend: Spend::default(), version, forgot_at: self.epoch };
                payer.capped = Some(Box::new(capped));
            }
        }
        self.recount();
    }

    /// Removes a key (revocation).
    pub fn remove_key(&mut self, key: KeyId) {
        self.keys.retain(|(id, _)| *id != key);
        self.recount();
    }

    /// Detaches an owner and its keys, spend included.
    pub fn take_owner(&mut self, owner: Owner, ends: Option<&PeriodEnds>) -> Option<MovedOwner> {
        if !self.owners.contains_key(&owner) {
            return None;
        }
        // Its open holds settle here, where the owner no longer is, so the
        // counters that move count them as spent in full: a call in flight
        // across a plan change is counted at its hold, never at nothing (a
        // key capped at 10 a day with 6 in flight could take 6 more on the
        // new wallet). The counters that stay take theirs back as before.
        let mut payer = self.owners.remove(&owner)?;
        payer.spend.count_holds_as_spent(ends);
        payer.end_users.values_mut().for_each(|spend| spend.count_holds_as_spent(ends));
        let (mut keys, stay): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.keys).into_iter().partition(|(_, key)| key.owner == owner);
        for capped in keys.iter_mut().filter_map(|(_, key)| key.capped.as_deref_mut()) {
            capped.spend.count_holds_as_spent(ends);
        }
        self.keys = SmallVec::from_vec(stay);
        // Back inline when one key is left (`from_vec` keeps the heap buffer).
        self.keys.shrink_to_fit();
        self.recount();
        Some(MovedOwner { owner, payer, keys })
    }

    /// Attaches an owner taken from another wallet. Holds open here from
    /// before take nothing back from its counters (they never counted them).
    pub fn put_owner(&mut self, mut moved: MovedOwner) {
        self.epoch += 1;
        moved.payer.forgot_at = self.epoch;
        moved.payer.end_users_forgot_at = self.epoch;
        self.owners.insert(moved.owner, moved.payer);
        for (key, mut payer) in moved.keys {
            if let Some(capped) = payer.capped.as_deref_mut() {
                capped.forgot_at = self.epoch;
            }
            match self.slot(key) {
                Ok(at) => self.keys[at].1 = payer,
                Err(at) => self.keys.insert(at, (key, payer)),
            }
        }
        self.recount();
    }

    /// The first cap `amount` would cross: key, then owner, then end user.
    pub fn check(
        &mut self,
        spender: Spender<'_>,
        amount: Decimal,
        ends: &PeriodEnds,
        now: DateTime<Utc>,
        max_end_users: usize,
    ) -> Result<(), PayerRefusal> {
        if !self.any_limits {
            return Ok(());
        }
        let breach = |subject: LimitSubject, spend: &Spend, limits: &Limits| {
            spend.check(limits, amount, ends).map(|(period, cap, spent, resets_at)| {
                PayerRefusal::Limit(LimitBreach { subject, period, cap, spent, resets_at })
            })
        };
        if let Some(Capped { limits, spend, .. }) = self.key(spender.key).and_then(KeyPayer::caps) {
            if let Some(refusal) = breach(LimitSubject::Key(spender.key), spend, limits) {
                return Err(refusal);
            }
        }
        let Some(owner) = self.owners.get_mut(&spender.owner) else {
            return Ok(());
        };
        if let Some(refusal) = breach(spender.owner.into(), &owner.spend, &owner.limits) {
            return Err(refusal);
        }
        let (Owner::App(app), Some(end_user)) = (spender.owner, spender.end_user) else {
            return Ok(());
        };
        if owner.end_user_limits.is_empty() {
            return Ok(());
        }
        let spend = match owner.end_users.get(end_user) {
            Some(spend) => *spend,
            None => {
                make_room(&mut owner.end_users, &owner.end_user_limits, now, max_end_users)?;
                Spend::default()
            }
        };
        // The subject (with its owned end-user id) is only built on refusal.
        if spend.check(&owner.end_user_limits, amount, ends).is_none() {
            return Ok(());
        }
        let subject = LimitSubject::EndUser { app, end_user: end_user.to_owned() };
        breach(subject, &spend, &owner.end_user_limits).map_or(Ok(()), Err)
    }

    /// Every period cap the spender draws on: key, then owner, then end user.
    pub fn period_caps(&self, spender: Spender<'_>, ends: &PeriodEnds) -> Vec<PeriodCap> {
        let mut caps = Vec::new();
        if !self.any_limits {
            return caps;
        }
        if let Some(Capped { limits, version, .. }) = self.key(spender.key).and_then(KeyPayer::caps) {
            limits.period_caps(&LimitSubject::Key(spender.key), ends, *version, &mut caps);
        }
        let Some(owner) = self.owners.get(&spender.owner) else {
            return caps;
        };
        owner.limits.period_caps(&spender.owner.into(), ends, owner.version, &mut caps);
        if let (Owner::App(app), Some(end_user)) = (spender.owner, spender.end_user) {
            let subject = LimitSubject::EndUser { app, end_user: end_user.to_owned() };
            owner.end_user_limits.period_caps(&subject, ends, owner.version, &mut caps);
        }
        caps
    }

    /// Counts settled spend of `amount` for the spender in the periods `ends`.
    pub fn add(&mut self, spender: Spender<'_>, amount: Decimal, ends: &PeriodEnds) {
        self.each_spend(spender, |spend| spend.add(ends, amount));
    }

    /// Counts an open hold of `amount` for the spender in the periods `ends`
    /// (and in the periods after them while it stays open).
    pub fn reserve(&mut self, spender: Spender<'_>, amount: Decimal, ends: &PeriodEnds) {
        self.each_spend(spender, |spend| spend.reserve(ends, amount));
    }

    /// Takes back an open hold (its call settles, or it is released) that
    /// was reserved in `epoch`, from each counter that has counted it since:
    /// not from one that forgot the open holds after it was reserved.
    pub fn unreserve(&mut self, spender: Spender<'_>, amount: Decimal, epoch: u64) {
        if !self.any_limits {
            return;
        }
        if let Some(capped) = self.key_mut(spender.key).and_then(KeyPayer::caps_mut) {
            if epoch >= capped.forgot_at {
                capped.spend.unreserve(amount);
            }
        }
        let Some(owner) = self.owners.get_mut(&spender.owner) else {
            return;
        };
        if !owner.limits.is_empty() && epoch >= owner.forgot_at {
            owner.spend.unreserve(amount);
        }
        if epoch < owner.end_users_forgot_at {
            return;
        }
        if let (Some(end_user), false) = (spender.end_user, owner.end_user_limits.is_empty()) {
            if let Some(spend) = owner.end_users.get_mut(end_user) {
                spend.unreserve(amount);
            }
        }
    }

    /// The epoch a hold reserved now belongs to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Applies `apply` to every counter the spender draws on (a hold or a
    /// debit), tracking a new end user (a take-back is [`Payers::unreserve`]).
    fn each_spend(&mut self, spender: Spender<'_>, mut apply: impl FnMut(&mut Spend)) {
        // Only counters under a cap count, so with no cap here there is
        // nothing to do and the lookups (cold on a wallet just woken) are
        // skipped.
        if !self.any_limits {
            return;
        }
        if let Some(capped) = self.key_mut(spender.key).and_then(KeyPayer::caps_mut) {
            apply(&mut capped.spend);
        }
        let Some(owner) = self.owners.get_mut(&spender.owner) else {
            return;
        };
        if !owner.limits.is_empty() {
            apply(&mut owner.spend);
        }
        let (Some(end_user), false) = (spender.end_user, owner.end_user_limits.is_empty()) else {
            return;
        };
        if let Some(spend) = owner.end_users.get_mut(end_user) {
            apply(spend);
        } else {
            let mut spend = Spend::default();
            apply(&mut spend);
            owner.end_users.insert(end_user.into(), spend);
        }
    }
}

impl Payers {
    /// The spend counters held here, for a checkpoint; counters never used
    /// are left out.
    pub fn spends(&self) -> PayerSpends {
        let keys = self
            .keys
            .iter()
            .filter_map(|(id, payer)| payer.capped.as_ref().map(|capped| (*id, capped.spend)))
            .filter(|(_, spend)| *spend != Spend::default())
            .collect();
        let mut owners: Vec<OwnerSpend> = self
            .owners
            .iter()
            .map(|(owner, payer)| {
                let mut end_users: Vec<(String, Spend)> =
                    payer.end_users.iter().map(|(id, spend)| (id.to_string(), *spend)).collect();
                end_users.sort_by(|a, b| a.0.cmp(&b.0));
                OwnerSpend { owner: *owner, spend: payer.spend, end_users }
            })
            .filter(|owner| owner.spend != Spend::default() || !owner.end_users.is_empty())
            .collect();
        owners.sort_by_key(|saved| match saved.owner {
            Owner::User(user) => (0, user.0),
            Owner::App(app) => (1, app.0),
        });
        PayerSpends { keys, owners }
    }

    /// Puts back counters taken by [`Payers::spends`] (restoring a
    /// checkpoint, after the keys and owners were installed). A key no
    /// longer here (revoked) has nothing left to count.
    pub fn restore_spends(&mut self, spends: &PayerSpends) {
        for (key, spend) in &spends.keys {
            if let Some(payer) = self.key_mut(*key) {
                payer.capped.get_or_insert_with(Box::default).spend = *spend;
            }
        }
        for saved in &spends.owners {
            let payer = self.owners.entry(saved.owner).or_default();
            payer.spend = saved.spend;
            payer.end_users =
                saved.end_users.iter().map(|(id, spend)| (id.as_str().into(), *spend)).collect();
        }
        self.recount();
    }
}

/// The spend counters of one wallet's payers, as a checkpoint keeps them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayerSpends {
    /// Capped keys (and keys whose cap was lifted within a period).
    pub keys: Vec<(KeyId, Spend)>,
    /// Owners with spend or end users.
    pub owners: Vec<OwnerSpend>,
}

/// An owner's counters and its end users' (applications).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerSpend {
    /// The user or application.
    pub owner: Owner,
    /// Its own counters.
    pub spend: Spend,
    /// Per end user, by id.
    pub end_users: Vec<(String, Spend)>,
}

/// Drops end users whose counters no cap needs any longer (see
/// [`Spend::is_stale`]); refuses when the table is still full.
fn make_room(
    end_users: &mut HashMap<Box<str>, Spend>,
    limits: &Limits,
    now: DateTime<Utc>,
    max_end_users: usize,
) -> Result<(), PayerRefusal> {
    if end_users.len() < max_end_users {
        return Ok(());
    }
    end_users.retain(|_, spend| !spend.is_stale(limits, now));
    if end_users.len() < max_end_users {
        Ok(())
    } else {
        Err(PayerRefusal::EndUserCapacity)
    }
}

/// Shares an end-user id between a hold token and the open hold.
pub(crate) fn end_user_arc(end_user: Option<&str>) -> Option<Arc<str>> {
    end_user.map(Arc::from)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ledger::ids::{AppId, UserId};

    fn check_against(payers: &Payers, model: &BTreeMap<u64, Owner>) {
        for id in 0..64 {
            assert_eq!(payers.owner_of(KeyId(id)), model.get(&id).copied(), "key {id}");
        }
        let ids: Vec<u64> = payers.keys.iter().map(|(id, _)| id.0).collect();
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "keys stay sorted: {ids:?}");
    }

    #[test]
    fn keys_stay_findable_through_adds_moves_and_revocations() {
        // Proves the sorted key list answers like a map: keys added out of
        // order, an owner moved out and back with its keys, a key revoked.
        let (alice, bob, app) = (Owner::User(UserId(1)), Owner::User(UserId(2)), Owner::App(AppId(3)));
        let mut payers = Payers::default();
        let mut model = BTreeMap::new();
        for owner in [alice, bob, app] {
            payers.set_owner(owner, Limits::NONE, Limits::NONE, 1);
        }
        for (id, owner) in [(40, bob), (3, alice), (17, app), (1, bob), (29, alice), (8, app)] {
            payers.set_key(KeyId(id), owner, Limits::NONE, 1);
            model.insert(id, owner);
            check_against(&payers, &model);
        }
        let now = Utc::now();
        let ends = PeriodEnds { day: now, month: now, year: now };
        let moved = payers.take_owner(alice, Some(&ends)).expect("alice pays here");
        model.retain(|_, owner| *owner != alice);
        check_against(&payers, &model);
        payers.put_owner(moved);
        model.extend([(3, alice), (29, alice)]);
        check_against(&payers, &model);
        payers.remove_key(KeyId(17));
        model.remove(&17);
        check_against(&payers, &model);
        assert!(!payers.any_limits, "no caps were set");
        let cap = Limits { daily: Some(Decimal::ONE), ..Limits::NONE };
        payers.set_key(KeyId(8), app, cap, 2);
        assert!(payers.any_limits, "a capped key counts");
        payers.set_key(KeyId(8), app, Limits::NONE, 3);
        assert!(!payers.any_limits && payers.key(KeyId(8)).is_some_and(|key| key.caps().is_none()));
        check_against(&payers, &model);
    }

    #[test]
    fn a_key_cap_lifted_and_restored_within_a_day_keeps_the_days_spend() {
        // Proves lifting a key's cap does not wipe what it spent: restored
        // the same day, the cap still counts the spend from before.
        let owner = Owner::User(UserId(1));
        let mut payers = Payers::default();
        payers.set_owner(owner, Limits::NONE, Limits::NONE, 1);
        let cap = Limits { daily: Some(Decimal::TEN), ..Limits::NONE };
        payers.set_key(KeyId(1), owner, cap, 4);
        let now: DateTime<Utc> = "2027-03-10T12:00:00Z".parse().unwrap();
        let day_end: DateTime<Utc> = "2027-03-11T00:00:00Z".parse().unwrap();
        let ends = PeriodEnds { day: day_end, month: day_end, year: day_end };
        let spender = Spender { key: KeyId(1), owner, end_user: None };
        payers.add(spender, Decimal::from(8), &ends);
        payers.set_key(KeyId(1), owner, Limits::NONE, 5);
        assert_eq!(payers.check(spender, Decimal::from(5), &ends, now, 10), Ok(()), "no cap, no refusal");
        payers.set_key(KeyId(1), owner, cap, 6);
        let refused = payers.check(spender, Decimal::from(5), &ends, now, 10);
        assert!(
            matches!(&refused, Err(PayerRefusal::Limit(breach)) if breach.spent == Decimal::from(8)),
            "8 spent before the lift + 5 > 10: {refused:?}"
        );
    }
}
