//! The data path in cluster mode: a request holds twice, in the replica's
//! view of the books (key, payer, limits: the checks a single node makes)
//! and under a lease (the credit itself, which no other replica can spend
//! at the same time). Its settle releases the first and ships the debit
//! from the second; the treasurer posts it to the books, and every
//! replica's view learns it from the log.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::ledger::entry::SettleDetails;
use crate::ledger::ids::{KeyId, RequestId, WalletId};
use crate::ledger::limit::LimitBreach;
use crate::ledger::{Hold, Ledger, Refusal, SpendContext};

use super::{DebitDetail, LeaseBook, LeaseHold, LeaseRefusal};

/// A request's reservation in cluster mode: settle or release it.
#[must_use = "a cluster hold keeps its lease credit until settled or released"]
#[derive(Debug)]
pub struct ClusterHold {
    view: Hold,
    lease: LeaseHold,
    /// Headroom held under each period cap the spender draws on.
    limits: Vec<LeaseHold>,
    book: Arc<LeaseBook>,
    key: KeyId,
    end_user: Option<String>,
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
    let view = ledger.hold_in_view(wallet, request_id, amount, context, now)?;
    let mut limits = Vec::new();
    let caps = ledger.period_caps(wallet, context, now);
    if !caps.is_empty() {
        let org = ledger.wallet_org(wallet).map_err(|_| Refusal::UnknownWallet { wallet })?;
        let org = i64::try_from(org.0).map_err(|_| Refusal::UnknownWallet { wallet })?;
        for cap in caps {
            let name = cap.name();
            let held = match book.set_limit(&name, org, cap.cap).await {
                Ok(()) => book.hold(&name, amount).await,
                Err(err) => Err(LeaseRefusal::Unavailable(err)),
            };
            match held {
                Ok(lease) => limits.push(lease),
                Err(refusal) => {
                    view.release(now);
                    limits.into_iter().for_each(|lease| book.release(lease));
                    return Err(match refusal {
                        LeaseRefusal::InsufficientCredit { required } => Refusal::SpendingLimit {
                            wallet: ledger.wallet_view(wallet).ok_or(Refusal::UnknownWallet { wallet })?,
                            required,
                            limit: Box::new(LimitBreach {
                                subject: cap.subject,
                                period: cap.period,
                                cap: cap.cap,
                                // What the other replicas hold or spent is
                                // not known here: the cap is what binds.
                                spent: (cap.cap - required).max(Decimal::ZERO),
                                resets_at: Some(cap.ends_at),
                            }),
                        },
                        LeaseRefusal::Unavailable(err) => Refusal::Unavailable { reason: err.to_string() },
                    });
                }
            }
        }
    }
    match book.hold(&wallet.to_string(), amount).await {
        Ok(lease) => Ok(ClusterHold {
            view,
            lease,
            limits,
            book: book.clone(),
            key: context.key,
            end_user: context.end_user.map(str::to_owned),
        }),
        Err(refusal) => {
            view.release(now);
            limits.into_iter().for_each(|lease| book.release(lease));
            Err(match refusal {
                LeaseRefusal::InsufficientCredit { required } => {
                    // The view may lag the books (debits not yet posted), so
                    // what it shows available is at most what a smaller
                    // retry could get, never a promise.
                    let view = ledger.wallet_view(wallet).ok_or(Refusal::UnknownWallet { wallet })?;
                    Refusal::InsufficientFunds { wallet: view, required }
                }
                LeaseRefusal::Unavailable(err) => Refusal::Unavailable { reason: err.to_string() },
            })
        }
    }
}

impl ClusterHold {
    /// The amount held.
    pub fn amount(&self) -> Decimal {
        self.lease.amount()
    }

    /// Charges `cost` (in full, even above the hold) and queues the debit
    /// for the books; returns the amount debited.
    pub fn settle(self, cost: Decimal, details: SettleDetails, now: DateTime<Utc>) -> Decimal {
        let detail = DebitDetail {
            request_id: self.view.request_id(),
            wallet: self.view.wallet(),
            key: self.key,
            end_user: self.end_user,
            held: self.lease.amount(),
            details,
        };
        self.view.release(now);
        for limit in self.limits {
            // Counted against the limit only; the credit debit carries the detail.
            let detail = serde_json::json!({ "request_id": detail.request_id });
            self.book.settle(limit, cost, now, detail);
        }
        let detail = serde_json::to_value(&detail).unwrap_or_default();
        self.book.settle(self.lease, cost, now, detail);
        cost
    }

    /// Ends the hold without a debit.
    pub fn release(self, now: DateTime<Utc>) -> Decimal {
        let amount = self.lease.amount();
        self.view.release(now);
        self.limits.into_iter().for_each(|limit| self.book.release(limit));
        self.book.release(self.lease);
        amount
    }
}
