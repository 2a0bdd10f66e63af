//! The data path in cluster mode: a request holds twice, in the replica's
//! view of the books (key, payer, limits: the checks a single node makes)
//! and under a lease (the credit itself, which no other replica can spend
//! at the same time). Its settle releases the first and ships the debit
//! from the second; the treasurer posts it to the books, and every
//! replica's view learns it from the log.
//!
//! Taking the leases may wait for the database, and the request's future
//! may be dropped meanwhile (the client left): whatever was taken so far
//! lives in the [`ClusterHold`] from the start and is released by its
//! `Drop`, so no lease is left with a hold that never ends.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::ledger::entry::SettleDetails;
use crate::ledger::ids::{KeyId, RequestId, WalletId};
use crate::ledger::limit::LimitBreach;
use crate::ledger::{Hold, Ledger, Refusal, SpendContext};

use super::{DebitDetail, LeaseBook, LeaseHold, LeaseRefusal};

/// What a debit against a limit's headroom says: which request it was.
#[derive(serde::Serialize)]
struct LimitDebit {
    request_id: RequestId,
}

/// A request's reservation in cluster mode: settle or release it. Dropped
/// unspent (a request cancelled mid-hold, or a caller's bug), it releases
/// what it holds.
#[derive(Debug)]
pub struct ClusterHold {
    /// Taken while holding, for a release on drop.
    taken_at: DateTime<Utc>,
    view: Option<Hold>,
    /// The wallet's credit; `None` until the limits' headroom was held.
    lease: Option<LeaseHold>,
    /// Headroom held under each period cap the spender draws on.
    limits: Vec<LeaseHold>,
    book: Arc<LeaseBook>,
    key: KeyId,
    end_user: Option<String>,
}

impl Drop for ClusterHold {
    fn drop(&mut self) {
        self.release_taken(self.taken_at);
    }
}

/// Holds `amount` for `request_id` on `wallet`: first in the replica's view
/// (any refusal a single node would give), then under a lease of headroom
/// for each period cap the spender draws on (so limits hold across
/// replicas), then under a lease of the wallet's credit. 402 when the books
/// say the credit or headroom is not there, 503 when they cannot be asked
/// and no lease covers it.
pub async fn hold(
    ledger: &Ledger,
    book: &Arc<LeaseBook>,
    wallet: WalletId,
    request_id: RequestId,
    amount: Decimal,
    context: SpendContext<'_>,
    now: DateTime<Utc>,
) -> Result<ClusterHold, Refusal> {
    let (view, caps) = ledger.hold_in_view(wallet, request_id, amount, context, now)?;
    let mut hold = ClusterHold {
        taken_at: now,
        view: Some(view),
        lease: None,
        limits: Vec::new(),
        book: book.clone(),
        key: context.key,
        end_user: context.end_user.map(str::to_owned),
    };
    if !caps.is_empty() {
        let org = ledger.wallet_org(wallet).map_err(|_| Refusal::UnknownWallet { wallet })?;
        let org = i64::try_from(org.0).map_err(|_| Refusal::UnknownWallet { wallet })?;
        for cap in caps {
            let name = cap.name();
            let held = match book.set_limit(&name, org, cap.cap, cap.version).await {
                Ok(()) => book.hold(&name, amount).await,
                Err(err) => Err(LeaseRefusal::Unavailable(err)),
            };
            match held {
                Ok(lease) => hold.limits.push(lease),
                Err(LeaseRefusal::InsufficientCredit { required }) => {
                    return Err(Refusal::SpendingLimit {
                        wallet: ledger.wallet_view(wallet).ok_or(Refusal::UnknownWallet { wallet })?,
                        required,
                        limit: Box::new(LimitBreach {
                            subject: cap.subject,
                            period: cap.period,
                            cap: cap.cap,
                            // What the other replicas hold or spent is not
                            // known here: the cap is what binds.
                            spent: (cap.cap - required).max(Decimal::ZERO),
                            resets_at: Some(cap.ends_at),
                        }),
                    });
                }
                Err(LeaseRefusal::Unavailable(err)) => {
                    return Err(Refusal::Unavailable { reason: err.to_string() })
                }
            }
        }
    }
    match book.hold(&wallet.to_string(), amount).await {
        Ok(lease) => {
            hold.lease = Some(lease);
            Ok(hold)
        }
        // The view may lag the books (debits not yet posted), so what it
        // shows available is at most what a smaller retry could get.
        Err(LeaseRefusal::InsufficientCredit { required }) => Err(Refusal::InsufficientFunds {
            wallet: ledger.wallet_view(wallet).ok_or(Refusal::UnknownWallet { wallet })?,
            required,
        }),
        Err(LeaseRefusal::Unavailable(err)) => Err(Refusal::Unavailable { reason: err.to_string() }),
    }
}

impl ClusterHold {
    /// The amount held.
    pub fn amount(&self) -> Decimal {
        self.lease.as_ref().map_or(Decimal::ZERO, LeaseHold::amount)
    }

    /// Charges `cost` (in full, even above the hold) and queues the debit
    /// for the books; returns the amount debited.
    pub fn settle(mut self, cost: Decimal, details: SettleDetails, now: DateTime<Utc>) -> Decimal {
        if cost.is_zero() {
            // Nothing to debit or ship: the books make no entry for it.
            self.release_taken(now);
            return Decimal::ZERO;
        }
        let (Some(view), Some(lease)) = (self.view.take(), self.lease.take()) else {
            // Only a complete hold is handed out.
            return Decimal::ZERO;
        };
        let detail = DebitDetail {
            request_id: view.request_id(),
            wallet: view.wallet(),
            key: self.key,
            end_user: self.end_user.take(),
            held: lease.amount(),
            held_at: Some(self.taken_at),
            details,
        };
        view.release(now);
        for limit in std::mem::take(&mut self.limits) {
            // Counted against the limit only; the credit debit carries the detail.
            self.book.settle(limit, cost, now, LimitDebit { request_id: detail.request_id });
        }
        self.book.settle(lease, cost, now, &detail);
        cost
    }

    /// Ends the hold without a debit.
    pub fn release(mut self, now: DateTime<Utc>) -> Decimal {
        let amount = self.amount();
        self.release_taken(now);
        amount
    }

    fn release_taken(&mut self, now: DateTime<Utc>) {
        if let Some(view) = self.view.take() {
            view.release(now);
        }
        for limit in std::mem::take(&mut self.limits) {
            self.book.release(limit);
        }
        if let Some(lease) = self.lease.take() {
            self.book.release(lease);
        }
    }
}
