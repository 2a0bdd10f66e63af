//! The data path: resolve a key, hold, settle, and the periodic catch-up.
//!
//! Each call takes one dashmap read lock to find the wallet and then that
//! wallet's mutex. Nothing here allocates but the end-user id, when there is
//! one: a wallet's usual key, open hold, first lot and recent request ids live
//! inline in its state, and so does the lot a debit entry touches.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use crate::ledger::entity::{KeyHash, Plan};
use crate::ledger::entry::SettleDetails;
use crate::ledger::hold::{self, Hold, HoldArgs, HoldPayer, LateSettle, SettleError, Settlement};
use crate::ledger::ids::{KeyId, OrgId, Owner, RequestId, WalletId};
use crate::ledger::limit::PeriodCap;
use crate::ledger::lot::Lot;
use crate::ledger::payer::Spender;
use crate::ledger::refusal::Refusal;
use crate::ledger::Ledger;

/// What a presented key resolves to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ResolvedKey {
    /// The key.
    pub key: KeyId,
    /// Its organization.
    pub org: OrgId,
    /// The user or application it speaks for.
    pub owner: Owner,
    /// The wallet that pays for it right now.
    pub wallet: WalletId,
}

/// Who is spending, for limits and the debit entry.
#[derive(Clone, Copy, Debug)]
pub struct SpendContext<'a> {
    /// The key the request came with.
    pub key: KeyId,
    /// The end-user id an application passed, if any.
    pub end_user: Option<&'a str>,
}

/// What a [`Ledger::tick`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TickReport {
    /// Wallets brought up to date.
    pub wallets: usize,
    /// Holds voided by their TTL.
    pub holds_voided: usize,
}

impl Ledger {
    /// Resolves the hash of a presented secret; `None` for unknown or
    /// revoked keys.
    pub fn resolve_key(&self, hash: &KeyHash) -> Option<ResolvedKey> {
        let key_id = *self.key_index.get(hash)?;
        let key = self.keys.get(&key_id)?;
        if key.revoked {
            return None;
        }
        let (org, owner) = (key.org, key.owner);
        drop(key);
        let wallet = match owner {
            Owner::App(_) => WalletId::Pool(org),
            Owner::User(user) => match self.users.get(&user)?.plan {
                Plan::Pro => WalletId::Pool(org),
                Plan::Lite => WalletId::Lite(user),
            },
        };
        Some(ResolvedKey { key: key_id, org, owner, wallet })
    }

    /// Reserves `amount` on `wallet` for `request_id`, or says why not (see
    /// [`Refusal`] for the order in which reasons are checked).
    pub fn hold(
        &self,
        wallet: WalletId,
        request_id: RequestId,
        amount: Decimal,
        context: SpendContext<'_>,
        now: DateTime<Utc>,
    ) -> Result<Hold, Refusal> {
        // A new hold needs a store that can record its settle.
        if let Err(error) = self.shared.committer.check_ready() {
            return Err(Refusal::Unavailable { reason: error.to_string() });
        }
        self.view_hold(wallet, request_id, amount, context, now, false).map(|(hold, _)| hold)
    }

    /// Cluster mode: reserves `amount` in this replica's view of the books,
    /// with every check [`Ledger::hold`] makes (key, payer, limits,
    /// balance), on a follower too. The credit itself is held under a lease
    /// and the debit shipped to the treasurer, so this hold is only ever
    /// released, never settled here. Also returns the period caps the hold
    /// draws on, under each of which headroom is leased: read under the same
    /// lock, since a plan change or a revocation replayed between two locks
    /// would leave the hold with no cap, and its cost counted under none.
    pub fn hold_in_view(
        &self,
        wallet: WalletId,
        request_id: RequestId,
        amount: Decimal,
        context: SpendContext<'_>,
        now: DateTime<Utc>,
    ) -> Result<(Hold, Vec<PeriodCap>), Refusal> {
        self.view_hold(wallet, request_id, amount, context, now, true)
    }

    /// A hold in this ledger's view, with the period caps it draws on when
    /// `with_caps` (none otherwise).
    fn view_hold(
        &self,
        wallet: WalletId,
        request_id: RequestId,
        amount: Decimal,
        context: SpendContext<'_>,
        now: DateTime<Utc>,
        with_caps: bool,
    ) -> Result<(Hold, Vec<PeriodCap>), Refusal> {
        if amount < Decimal::ZERO {
            return Err(Refusal::InvalidAmount { required: amount });
        }
        let cell = self.cell(wallet).ok_or(Refusal::UnknownWallet { wallet })?;
        let args = HoldArgs { request_id, amount, key: context.key, end_user: context.end_user };
        let (payer, caps) = {
            let mut state = cell.state.lock();
            let payer = state.try_hold(&self.shared, &args, now)?;
            let caps = if with_caps {
                let ends = state.period_ends(now);
                let spender =
                    Spender { key: payer.key, owner: payer.owner, end_user: payer.end_user.as_deref() };
                state.payers.period_caps(spender, &ends)
            } else {
                Vec::new()
            };
            (payer, caps)
        };
        Ok((Hold::new(cell, wallet, request_id, amount, payer), caps))
    }

    /// The period caps a spend on `wallet` with `context` draws on right
    /// now (none without limits, at no cost).
    pub fn period_caps(
        &self,
        wallet: WalletId,
        context: SpendContext<'_>,
        now: DateTime<Utc>,
    ) -> Vec<PeriodCap> {
        let Some(cell) = self.cell(wallet) else { return Vec::new() };
        let mut state = cell.state.lock();
        let Some(owner) = state.payers.owner_of(context.key) else { return Vec::new() };
        let ends = state.period_ends(now);
        let spender = Spender { key: context.key, owner, end_user: context.end_user };
        state.payers.period_caps(spender, &ends)
    }

    /// Settles a request by id, for callers that no longer have its
    /// [`Hold`] (a retried settle, a settle queue after a handover). A
    /// request already settled returns its first [`Settlement`] unchanged.
    pub fn settle_request(
        &self,
        wallet: WalletId,
        request_id: RequestId,
        actual_cost: Decimal,
        details: SettleDetails,
        now: DateTime<Utc>,
    ) -> Result<Settlement, SettleError> {
        let cell = self.cell(wallet).ok_or(SettleError::UnknownWallet { wallet })?;
        hold::settle_in(&cell, request_id, actual_cost, details, now, None)
    }

    /// Posts a debit another replica settled under a lease (cluster mode):
    /// charged in full, as a settle whose hold was `held`, and counted
    /// against the key's, owner's and end user's limits. Posting the same
    /// request again while the wallet remembers it changes nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn post_debit(
        &self,
        wallet: WalletId,
        request_id: RequestId,
        key: KeyId,
        end_user: Option<&str>,
        held: Decimal,
        cost: Decimal,
        details: SettleDetails,
        made_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Settlement, SettleError> {
        let cell = self.cell(wallet).ok_or(SettleError::UnknownWallet { wallet })?;
        let owner = self
            .keys
            .get(&key)
            .map(|key| key.owner)
            .ok_or(SettleError::UnknownRequest { wallet, request_id })?;
        let payer = HoldPayer { key, owner, end_user: crate::ledger::payer::end_user_arc(end_user) };
        hold::settle_in(&cell, request_id, cost, details, now, Some(LateSettle { held, payer, made_at }))
    }

    /// Voids every hold past its TTL; returns how many.
    pub fn void_expired_holds(&self, now: DateTime<Utc>) -> usize {
        self.all_cells().iter().map(|cell| cell.state.lock().void_expired_holds(now)).sum()
    }

    /// Brings every wallet up to `now`: grants what became effective, writes
    /// off what expired, voids expired holds. Run it periodically (say every
    /// minute) so idle wallets get their grants and write-offs on time;
    /// every operation on a wallet does the same for that wallet first.
    /// While the journal cannot make records durable, the grants and
    /// write-offs wait for it (their records would queue behind the failed
    /// store, and a full queue would block the caller under a wallet's
    /// lock); expired holds are still voided.
    pub fn tick(&self, now: DateTime<Utc>) -> TickReport {
        let advancing = self.shared.committer.check_ready().is_ok();
        let cells = self.all_cells();
        let mut report = TickReport { wallets: cells.len(), holds_voided: 0 };
        for cell in cells {
            let mut state = cell.state.lock();
            report.holds_voided += state.void_expired_holds(now);
            if advancing {
                state.advance(now, &self.shared.committer);
            }
        }
        report
    }

    /// The wallets, copied out so no map guard is held while they are locked.
    /// Holds open across every wallet (for the metrics endpoint; locks each
    /// wallet briefly in turn).
    pub fn open_holds(&self) -> usize {
        self.all_cells().iter().map(|cell| cell.state.lock().holds.len()).sum()
    }

    /// Holds voided by their TTL since start, across every wallet (by the
    /// tick, or by the wallet's own next operation), for the metrics.
    pub fn holds_voided(&self) -> u64 {
        self.all_cells().iter().map(|cell| cell.state.lock().holds_voided).sum()
    }

    /// Every lot with credit left, with its wallet (the cluster's treasurer
    /// publishes them so leases end before the credit they draw on does).
    pub fn live_lots(&self) -> Vec<(WalletId, Lot)> {
        let mut lots = Vec::new();
        for cell in self.all_cells() {
            let state = cell.state.lock();
            let live = state.lots.iter().filter(|lot| lot.remaining > Decimal::ZERO);
            lots.extend(live.map(|lot| (state.id, lot.clone())));
        }
        lots
    }

    fn all_cells(&self) -> Vec<Arc<crate::ledger::wallet::WalletCell>> {
        self.wallets.iter().map(|cell| Arc::clone(cell.value())).collect()
    }
}
