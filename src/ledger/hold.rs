//! Holds: reserve before forwarding, settle (or release) when the response ends.
//!
//! A [`Hold`] is a move-only token: not `Clone`, `#[must_use]`, consumed by
//! [`Hold::settle`] or [`Hold::release`]. Dropping it unspent is a bug in the
//! caller: the hold becomes an orphan, and the TTL voids it once its time is
//! up. The TTL voids nothing else: while its token lives the request may
//! still be running (a slow stream, a client that stopped reading), and
//! voiding it would free credit the request is about to spend. A settle by
//! id ([`crate::ledger::Ledger::settle_request`]) never finds a voided hold.
//!
//! Settles are idempotent per request id: each wallet remembers its most
//! recent settlements (`settled_memory_per_wallet`), and settling a request
//! again, through [`crate::ledger::Ledger::settle_request`], returns the first
//! [`Settlement`] without debiting twice.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use smallvec::SmallVec;

use crate::ledger::entry::{Debit, EntryKind, SettleDetails};
use crate::ledger::ids::{EntryId, IdMap, KeyId, Owner, RequestId, WalletId};
use crate::ledger::payer::{PayerRefusal, Spender};
use crate::ledger::refusal::Refusal;
use crate::ledger::wallet::{WalletCell, WalletState};
use crate::ledger::Shared;

/// An open reservation on a wallet. Settle it or release it.
#[must_use = "a hold must be settled or released; a dropped hold stays open until its TTL voids it"]
#[derive(Debug)]
pub struct Hold {
    cell: Arc<WalletCell>,
    wallet: WalletId,
    request_id: RequestId,
    amount: Decimal,
    payer: HoldPayer,
    /// Settled or released: dropping the token then changes nothing.
    spent: bool,
}

/// Who a hold counts against; kept by the token so a late settle (after the
/// hold was voided) can still be attributed.
#[derive(Clone, Debug)]
pub(crate) struct HoldPayer {
    pub key: KeyId,
    pub owner: Owner,
    pub end_user: Option<Arc<str>>,
}

impl HoldPayer {
    fn spender(&self) -> Spender<'_> {
        Spender { key: self.key, owner: self.owner, end_user: self.end_user.as_deref() }
    }
}

/// The outcome of a settle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Settlement {
    /// The request.
    pub request_id: RequestId,
    /// The wallet debited.
    pub wallet: WalletId,
    /// The debit entry; `None` when the cost was zero.
    pub entry: Option<EntryId>,
    /// The real cost debited.
    pub debited: Decimal,
    /// Held but not debited (zero when the cost exceeded the hold).
    pub released: Decimal,
    /// Part of the cost no lot covered: the wallet is below zero by this.
    pub overrun: Decimal,
    /// Balance after the debit.
    pub balance_after: Decimal,
    /// The hold had been voided by its TTL before this settle.
    pub late: bool,
}

/// Why a settle did nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SettleError {
    /// The ledger's journal failed; restart from the store.
    #[error("the ledger is unavailable: {reason}")]
    Unavailable {
        /// The journal's error.
        reason: String,
    },
    /// A negative cost (a metering bug).
    #[error("settled cost must not be negative, got {cost}")]
    InvalidCost {
        /// The cost given.
        cost: Decimal,
    },
    /// No such wallet.
    #[error("wallet {wallet} does not exist")]
    UnknownWallet {
        /// The wallet given.
        wallet: WalletId,
    },
    /// Settling by id a request with no open hold and no remembered settlement.
    #[error("request {request_id} has no open hold or recent settlement on {wallet}")]
    UnknownRequest {
        /// The wallet.
        wallet: WalletId,
        /// The request.
        request_id: RequestId,
    },
}

impl Hold {
    pub(crate) fn new(
        cell: Arc<WalletCell>,
        wallet: WalletId,
        request_id: RequestId,
        amount: Decimal,
        payer: HoldPayer,
    ) -> Self {
        Hold { cell, wallet, request_id, amount, payer, spent: false }
    }

    /// The wallet that holds.
    pub fn wallet(&self) -> WalletId {
        self.wallet
    }

    /// The request it was taken for.
    pub fn request_id(&self) -> RequestId {
        self.request_id
    }

    /// The amount reserved.
    pub fn amount(&self) -> Decimal {
        self.amount
    }

    /// Debits `actual_cost` and releases the rest of the hold. A cost above
    /// the hold is debited in full; if the lots cannot cover it the wallet
    /// goes below zero by the difference (the overrun) and later holds are
    /// refused until it is paid back.
    pub fn settle(
        mut self,
        actual_cost: Decimal,
        details: SettleDetails,
        now: DateTime<Utc>,
    ) -> Result<Settlement, SettleError> {
        // Voided by the TTL meanwhile: paid from the credit live now.
        let late = LateSettle { held: self.amount, payer: self.payer.clone(), made_at: now };
        let settled = settle_in(&self.cell, self.request_id, actual_cost, details, now, Some(late));
        // A settle refused before it took the hold (a failing store, a
        // negative cost) leaves it open: orphaned, so its TTL voids it rather
        // than it staying held until a restart.
        self.spent = settled.is_ok();
        settled
    }

    /// Ends the hold without a debit (the request was never forwarded, or
    /// the upstream failed on a route that charges nothing). Returns the
    /// amount released (zero if the TTL had already voided it).
    pub fn release(mut self, now: DateTime<Utc>) -> Decimal {
        self.spent = true;
        let mut state = self.cell.state.lock();
        state.advance(now, &self.cell.shared.committer);
        state.release(self.request_id)
    }
}

impl Drop for Hold {
    /// An unspent token leaves an orphan: from now on its TTL applies.
    fn drop(&mut self) {
        if !self.spent {
            self.cell.state.lock().orphan_hold(self.request_id);
        }
    }
}

/// What a token knows that the wallet forgot when the TTL voided the hold.
pub(crate) struct LateSettle {
    pub held: Decimal,
    pub payer: HoldPayer,
    /// When the call was made: it is paid from the credit live then.
    pub made_at: DateTime<Utc>,
}

/// Settles `request_id` on the wallet in `cell`.
pub(crate) fn settle_in(
    cell: &WalletCell,
    request_id: RequestId,
    actual_cost: Decimal,
    details: SettleDetails,
    now: DateTime<Utc>,
    late: Option<LateSettle>,
) -> Result<Settlement, SettleError> {
    let unavailable =
        |error: crate::ledger::journal::JournalError| SettleError::Unavailable { reason: error.to_string() };
    cell.shared.committer.check().map_err(unavailable)?;
    if actual_cost < Decimal::ZERO {
        return Err(SettleError::InvalidCost { cost: actual_cost });
    }
    let settled = cell.state.lock().settle(&cell.shared, request_id, actual_cost, details, now, late)?;
    cell.shared.committer.check().map_err(unavailable)?;
    Ok(settled)
}

/// A hold as the wallet keeps it.
#[derive(Debug)]
pub(crate) struct OpenHold {
    pub amount: Decimal,
    pub payer: HoldPayer,
    /// When it was taken: its call is paid from the credit live then, even
    /// if that expired (a Lite month's end, a contract year's) before the
    /// call settled.
    pub held_at: DateTime<Utc>,
    /// The payers' epoch its limit reservation was made in.
    pub limits_epoch: u64,
    /// When the TTL voids it, once it is an orphan.
    pub expires_at: DateTime<Utc>,
    /// Its token was dropped unspent: nothing will settle it.
    pub orphaned: bool,
}

impl OpenHold {
    pub fn spender(&self) -> Spender<'_> {
        self.payer.spender()
    }
}

/// A wallet's open holds by request id.
///
/// Most wallets have one or two requests in flight, so the holds live in
/// the wallet's own memory and are found by a short scan: no hash-table
/// lines to fetch on a cold wallet. Past [`OpenHolds::INDEX_FROM`] holds (a
/// busy pool) an index by request id keeps lookups constant-time.
#[derive(Debug, Default)]
pub(crate) struct OpenHolds {
    holds: SmallVec<[(RequestId, OpenHold); 1]>,
    /// Position of each hold in `holds`, kept only while many are open.
    index: Option<IdMap<RequestId, usize>>,
    /// No orphaned hold expires before this (a lower bound, refreshed on
    /// scans), so most operations skip the TTL scan. Holds whose token lives
    /// never expire and are not counted.
    earliest_expiry: Option<DateTime<Utc>>,
}

impl OpenHolds {
    /// Holds open at once beyond which lookups go through an index.
    const INDEX_FROM: usize = 8;

    pub fn len(&self) -> usize {
        self.holds.len()
    }

    fn position(&self, request_id: &RequestId) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(request_id).copied(),
            None => self.holds.iter().position(|(id, _)| id == request_id),
        }
    }

    pub fn contains(&self, request_id: &RequestId) -> bool {
        self.position(request_id).is_some()
    }

    pub fn insert(&mut self, request_id: RequestId, hold: OpenHold) {
        assert!(!self.contains(&request_id), "request {request_id} held twice on one wallet");
        if hold.orphaned {
            self.schedule(hold.expires_at);
        }
        self.holds.push((request_id, hold));
        match &mut self.index {
            Some(index) => {
                index.insert(request_id, self.holds.len() - 1);
            }
            None if self.holds.len() > Self::INDEX_FROM => self.reindex(),
            None => {}
        }
    }

    pub fn remove(&mut self, request_id: &RequestId) -> Option<OpenHold> {
        let at = self.position(request_id)?;
        let (_, hold) = self.holds.swap_remove(at);
        if let Some(index) = &mut self.index {
            index.remove(request_id);
            if let Some((moved, _)) = self.holds.get(at) {
                index.insert(*moved, at);
            }
            if self.holds.len() <= Self::INDEX_FROM / 2 {
                self.index = None;
            }
        }
        Some(hold)
    }

    /// Rebuilds the index from the holds (when it is first needed, and after
    /// a TTL scan moved holds around).
    fn reindex(&mut self) {
        if self.holds.len() <= Self::INDEX_FROM {
            self.index = None;
            return;
        }
        let index = self.holds.iter().enumerate().map(|(at, (id, _))| (*id, at)).collect();
        self.index = Some(index);
    }

    fn schedule(&mut self, expires_at: DateTime<Utc>) {
        self.earliest_expiry = Some(self.earliest_expiry.map_or(expires_at, |at| at.min(expires_at)));
    }

    /// Marks a hold an orphan; returns when its TTL voids it.
    pub fn orphan(&mut self, request_id: &RequestId) -> Option<DateTime<Utc>> {
        let at = self.position(request_id)?;
        let hold = &mut self.holds[at].1;
        hold.orphaned = true;
        let expires_at = hold.expires_at;
        self.schedule(expires_at);
        Some(expires_at)
    }

    pub fn next_expiry(&self) -> DateTime<Utc> {
        self.earliest_expiry.unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// Removes the orphaned holds whose TTL has passed at `now`.
    pub fn take_expired(&mut self, now: DateTime<Utc>) -> Vec<OpenHold> {
        if self.next_expiry() > now {
            return Vec::new();
        }
        let (expired, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.holds)
            .into_iter()
            .partition(|(_, hold)| hold.orphaned && hold.expires_at <= now);
        self.holds = SmallVec::from_vec(kept);
        // Back inline when one hold is left (`from_vec` keeps the heap buffer).
        self.holds.shrink_to_fit();
        self.earliest_expiry =
            self.holds.iter().filter(|(_, hold)| hold.orphaned).map(|(_, hold)| hold.expires_at).min();
        self.reindex();
        expired.into_iter().map(|(_, hold)| hold).collect()
    }
}

/// The last settlements of a wallet, oldest first out: a ring. Request ids
/// sit apart from the settlements, inside the wallet for the default ring
/// of eight, so the duplicate check of every hold and settle scans two
/// cache lines the wallet already has; remembering writes one slot.
#[derive(Debug, Default)]
pub(crate) struct RecentSettlements {
    ids: SmallVec<[RequestId; 8]>,
    settlements: Vec<Settlement>,
    /// The slot the next settlement overwrites once the ring is full.
    next: usize,
}

impl RecentSettlements {
    pub fn get(&self, request_id: &RequestId) -> Option<Settlement> {
        let slot = self.ids.iter().position(|id| id == request_id)?;
        self.settlements.get(slot).copied()
    }

    pub fn contains(&self, request_id: &RequestId) -> bool {
        self.ids.contains(request_id)
    }

    pub fn remember(&mut self, settlement: Settlement, capacity: usize) {
        if capacity == 0 {
            return;
        }
        if self.ids.len() < capacity {
            if self.settlements.is_empty() {
                self.settlements.reserve_exact(capacity.min(64));
            }
            self.ids.push(settlement.request_id);
            self.settlements.push(settlement);
            return;
        }
        // Full (the capacity is the ledger's, fixed): overwrite the oldest.
        let slot = self.next;
        self.ids[slot] = settlement.request_id;
        self.settlements[slot] = settlement;
        self.next = (slot + 1) % self.ids.len();
    }
}

/// A hold request as the wallet sees it.
pub(crate) struct HoldArgs<'a> {
    pub request_id: RequestId,
    pub amount: Decimal,
    pub key: KeyId,
    pub end_user: Option<&'a str>,
}

impl WalletState {
    /// Reserves `args.amount` if every rule allows it; on success returns the
    /// payer the hold counts against. Checks follow [`Refusal`]'s order.
    pub(crate) fn try_hold(
        &mut self,
        shared: &Shared,
        args: &HoldArgs<'_>,
        now: DateTime<Utc>,
    ) -> Result<HoldPayer, Refusal> {
        let now = self.advance(now, &shared.committer);
        let owner =
            self.payers.owner_of(args.key).ok_or(Refusal::NotAPayer { wallet: self.id, key: args.key })?;
        if self.holds.contains(&args.request_id) || self.settled.contains(&args.request_id) {
            return Err(Refusal::DuplicateRequest { wallet: self.id, request_id: args.request_id });
        }
        let config = &shared.config;
        if self.holds.len() >= config.max_open_holds_per_wallet {
            return Err(Refusal::TooManyOpenHolds {
                wallet: self.view(),
                limit: config.max_open_holds_per_wallet,
            });
        }
        let ends = self.period_ends(now);
        let spender = Spender { key: args.key, owner, end_user: args.end_user };
        self.payers.check(spender, args.amount, &ends, now, config.max_end_users_per_app).map_err(
            |refusal| self.payer_refusal(refusal, owner, args.amount, config.max_end_users_per_app),
        )?;
        if self.available() < args.amount {
            return Err(Refusal::InsufficientFunds { wallet: self.view(), required: args.amount });
        }
        self.payers.reserve(spender, args.amount, &ends);
        self.held += args.amount;
        let payer =
            HoldPayer { key: args.key, owner, end_user: crate::ledger::payer::end_user_arc(args.end_user) };
        let hold = OpenHold {
            amount: args.amount,
            payer: payer.clone(),
            held_at: now,
            limits_epoch: self.payers.epoch(),
            expires_at: WalletState::hold_ttl_expiry(now, config.hold_ttl()),
            orphaned: false,
        };
        self.add_open_hold(args.request_id, hold);
        Ok(payer)
    }

    fn payer_refusal(
        &self,
        refusal: PayerRefusal,
        owner: Owner,
        required: Decimal,
        end_user_limit: usize,
    ) -> Refusal {
        match refusal {
            PayerRefusal::Limit(limit) => {
                Refusal::SpendingLimit { wallet: self.view(), required, limit: Box::new(limit) }
            }
            PayerRefusal::EndUserCapacity => Refusal::EndUserCapacity {
                wallet: self.view(),
                app: match owner {
                    Owner::App(app) => app,
                    Owner::User(_) => unreachable!("only applications track end users"),
                },
                limit: end_user_limit,
            },
        }
    }

    /// Settles a request: the first settle debits, later ones return the
    /// remembered result.
    pub(crate) fn settle(
        &mut self,
        shared: &Shared,
        request_id: RequestId,
        actual_cost: Decimal,
        details: SettleDetails,
        now: DateTime<Utc>,
        late: Option<LateSettle>,
    ) -> Result<Settlement, SettleError> {
        let settled_at = now;
        let now = self.advance(now, &shared.committer);
        if let Some(first) = self.settled.get(&request_id) {
            return Ok(first);
        }
        // The credit that pays is what was live when the call was made: its
        // hold's time (a late debit's says when).
        let (held, payer, made_at, is_late) = match (self.holds.remove(&request_id), late) {
            (Some(open), _) => {
                self.held -= open.amount;
                self.payers.unreserve(open.spender(), open.amount, open.limits_epoch);
                (open.amount, open.payer, open.held_at, false)
            }
            (None, Some(late)) => (late.held, late.payer, late.made_at.min(settled_at), true),
            (None, None) => return Err(SettleError::UnknownRequest { wallet: self.id, request_id }),
        };
        let ends = self.period_ends(now);
        self.payers.add(payer.spender(), actual_cost, &ends);
        let (entry, overrun) = if actual_cost.is_zero() {
            (None, Decimal::ZERO)
        } else {
            if made_at < now {
                // Credit that expired while the call ran (or before a cluster
                // replica's late debit was posted) still pays for it.
                self.take_back_write_offs(&shared.committer, now, made_at, request_id, actual_cost);
            }
            let (id, overrun) = self.draw(&shared.committer, now, actual_cost, |overrun| {
                EntryKind::Debit(Debit {
                    request_id,
                    key: payer.key,
                    owner: payer.owner,
                    end_user: payer.end_user.clone(),
                    details,
                    held,
                    overrun,
                })
            });
            (Some(id), overrun)
        };
        let settlement = Settlement {
            request_id,
            wallet: self.id,
            entry,
            debited: actual_cost,
            released: (held - actual_cost).max(Decimal::ZERO),
            overrun,
            balance_after: self.balance(),
            late: is_late,
        };
        self.settled.remember(settlement, shared.config.settled_memory_per_wallet);
        Ok(settlement)
    }

    /// Ends an open hold without a debit; returns the amount released.
    pub(crate) fn release(&mut self, request_id: RequestId) -> Decimal {
        let Some(open) = self.holds.remove(&request_id) else {
            return Decimal::ZERO;
        };
        self.held -= open.amount;
        self.payers.unreserve(open.spender(), open.amount, open.limits_epoch);
        open.amount
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rust_decimal::Decimal;
    use uuid::Uuid;

    use super::*;
    use crate::ledger::ids::OrgId;

    fn settled(n: u128) -> Settlement {
        Settlement {
            request_id: RequestId(Uuid::from_u128(n)),
            wallet: WalletId::Pool(OrgId(1)),
            entry: None,
            debited: Decimal::from(n as u64),
            released: Decimal::ZERO,
            overrun: Decimal::ZERO,
            balance_after: Decimal::ZERO,
            late: false,
        }
    }

    #[test]
    fn recent_settlements_forget_the_oldest_first() {
        let mut recent = RecentSettlements::default();
        for n in 1..=5 {
            recent.remember(settled(n), 3);
        }
        let id = |n| RequestId(Uuid::from_u128(n));
        assert!(!recent.contains(&id(1)) && !recent.contains(&id(2)), "the two oldest are forgotten");
        for n in 3..=5 {
            assert_eq!(recent.get(&id(n)), Some(settled(n)), "settlement {n} is remembered");
        }
        recent.remember(settled(6), 3);
        assert!(!recent.contains(&id(3)) && recent.contains(&id(4)) && recent.contains(&id(6)));
        let mut none = RecentSettlements::default();
        none.remember(settled(1), 0);
        assert!(!none.contains(&id(1)), "capacity 0 remembers nothing");
    }

    fn open_hold(amount: u64, expires_at: DateTime<Utc>) -> OpenHold {
        let payer =
            HoldPayer { key: KeyId(1), owner: Owner::User(crate::ledger::ids::UserId(1)), end_user: None };
        OpenHold {
            amount: Decimal::from(amount),
            payer,
            held_at: expires_at,
            limits_epoch: 0,
            expires_at,
            orphaned: true,
        }
    }

    #[test]
    fn open_holds_agree_with_a_map_through_the_index_threshold() {
        // Proves the scan and the index give the same answers: holds are
        // added and removed in a scrambled order across INDEX_FROM both ways,
        // and a TTL scan takes exactly the expired ones.
        let base: DateTime<Utc> = "2027-03-10T12:00:00Z".parse().unwrap();
        let at = |n: u64| base + chrono::TimeDelta::seconds(i64::try_from(n).unwrap());
        let id = |n: u64| RequestId(Uuid::from_u128(u128::from(n)));
        let mut holds = OpenHolds::default();
        let mut model = std::collections::BTreeMap::new();
        let mut state = 7_u64;
        for step in 0..2_000_u64 {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let n = (state >> 33) % 40;
            // Grow for a while, then shrink, so the index is built and dropped.
            let adding = (step / 200) % 2 == 0;
            if adding && !model.contains_key(&n) {
                holds.insert(id(n), open_hold(n, at(n)));
                model.insert(n, n);
            } else if !adding {
                let removed = holds.remove(&id(n)).map(|hold| hold.amount);
                assert_eq!(removed, model.remove(&n).map(Decimal::from), "step {step}: remove {n}");
            }
            assert_eq!(holds.len(), model.len(), "step {step}");
            for probe in 0..40 {
                assert_eq!(holds.contains(&id(probe)), model.contains_key(&probe), "step {step}: {probe}");
            }
        }
        for n in 0..40 {
            if let std::collections::btree_map::Entry::Vacant(slot) = model.entry(n) {
                holds.insert(id(n), open_hold(n, at(n)));
                slot.insert(n);
            }
        }
        let mut expired: Vec<Decimal> =
            holds.take_expired(at(14)).into_iter().map(|hold| hold.amount).collect();
        expired.sort();
        assert_eq!(expired, (0..=14).map(Decimal::from).collect::<Vec<_>>(), "holds due by 14 s are taken");
        assert_eq!(holds.next_expiry(), at(15));
        for n in 15..40 {
            assert_eq!(
                holds.remove(&id(n)).map(|hold| hold.amount),
                Some(Decimal::from(n)),
                "{n} stays open"
            );
        }
        assert_eq!(holds.len(), 0);
    }
}
