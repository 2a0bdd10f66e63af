//! Purchases and adjustments: the admin writes that move money.
//!
//! Both carry an idempotency key, scoped to the organization. Replaying a
//! key with the same request returns the original receipt and changes
//! nothing; replaying it with a different request is refused with the name of
//! the first field that differs. Both wait for the journal to make them
//! durable before returning `Ok`.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::ledger::admin::{check_amount, check_prose, too_fine, MAX_AMOUNT};
use crate::ledger::entity::Plan;
use crate::ledger::entry::{EntryKind, LedgerEntry};
use crate::ledger::ids::{EntryId, LotId, OrgId, WalletId};
use crate::ledger::{Ledger, LedgerError};

/// Longest accepted idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 200;

/// Credits bought by an organization, for its pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseRequest {
    /// The buying organization.
    pub org: OrgId,
    /// Amount bought; positive.
    pub amount: Decimal,
    /// Explicit expiry; by default the end of the contract term in force.
    pub expires_at: Option<DateTime<Utc>>,
    /// Invoice or order reference.
    pub reference: Option<String>,
    /// Caller's idempotency key.
    pub idempotency_key: String,
}

/// The result of a purchase (the same on every replay).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseReceipt {
    /// The purchase entry.
    pub entry: EntryId,
    /// The lot created.
    pub lot: LotId,
    /// The pool credited.
    pub wallet: WalletId,
    /// Amount credited.
    pub amount: Decimal,
    /// When the lot expires.
    pub expires_at: DateTime<Utc>,
    /// Pool balance right after.
    pub balance_after: Decimal,
}

/// An operator correction to one wallet of an organization.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdjustmentRequest {
    /// The organization acting; the wallet must be one of its own.
    pub org: OrgId,
    /// The wallet corrected.
    pub wallet: WalletId,
    /// Signed amount, non-zero. Positive creates an adjustment lot; negative
    /// draws from the lots in consumption order and may not exceed what is
    /// available.
    pub amount: Decimal,
    /// Why (shown in the ledger).
    pub reason: String,
    /// Expiry of the created lot: required when positive, absent when negative.
    pub expires_at: Option<DateTime<Utc>>,
    /// Caller's idempotency key.
    pub idempotency_key: String,
}

/// The result of an adjustment (the same on every replay).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdjustmentReceipt {
    /// The adjustment entry.
    pub entry: EntryId,
    /// The lot created, for positive adjustments.
    pub lot: Option<LotId>,
    /// The wallet corrected.
    pub wallet: WalletId,
    /// Signed amount.
    pub amount: Decimal,
    /// Balance right after.
    pub balance_after: Decimal,
}

/// What an idempotency key was first used for (kept in checkpoints).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Replay {
    Purchase(PurchaseRequest, PurchaseReceipt),
    Adjustment(AdjustmentRequest, AdjustmentReceipt),
}

fn purchase_differences(first: &PurchaseRequest, again: &PurchaseRequest) -> [(&'static str, bool); 3] {
    [
        ("amount", first.amount != again.amount),
        ("expires_at", first.expires_at != again.expires_at),
        ("reference", first.reference != again.reference),
    ]
}

fn adjustment_differences(first: &AdjustmentRequest, again: &AdjustmentRequest) -> [(&'static str, bool); 4] {
    [
        ("wallet", first.wallet != again.wallet),
        ("amount", first.amount != again.amount),
        ("reason", first.reason != again.reason),
        ("expires_at", first.expires_at != again.expires_at),
    ]
}

pub(crate) fn check_key(key: &str) -> Result<(), LedgerError> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(LedgerError::BadIdempotencyKey { max: MAX_IDEMPOTENCY_KEY_BYTES });
    }
    Ok(())
}

impl Ledger {
    /// Credits the org's pool with purchased credits.
    pub fn purchase(
        &self,
        request: PurchaseRequest,
        now: DateTime<Utc>,
    ) -> Result<PurchaseReceipt, LedgerError> {
        // Held through the sync on purpose: a replay of this key must never
        // see a receipt that is not yet durable. Refused while the store
        // cannot record the money.
        let _admin = self.lock_admin()?;
        check_key(&request.idempotency_key)?;
        let slot = (request.org, request.idempotency_key.clone());
        let remembered = self.idempotency.lock().get(&slot).cloned();
        match remembered {
            Some(Replay::Purchase(first, receipt)) => {
                return self.replayed(
                    &request.idempotency_key,
                    receipt,
                    &purchase_differences(&first, &request),
                );
            }
            Some(Replay::Adjustment(..)) => return Err(conflict(&request.idempotency_key, "operation")),
            None => {}
        }
        // A failed journal takes nothing more: no credit only memory knows.
        self.shared.committer.check()?;
        if request.amount <= Decimal::ZERO {
            return Err(LedgerError::InvalidAmount {
                field: "amount",
                expected: "positive",
                amount: request.amount,
            });
        }
        check_amount("amount", request.amount)?;
        let wallet = WalletId::Pool(request.org);
        let cell = self.cell(wallet).ok_or(LedgerError::UnknownOrg(request.org))?;
        let mut state = cell.state.lock();
        let now = state.advance(now, &self.shared.committer);
        if let Some(reference) = &request.reference {
            check_prose("reference", reference)?;
        }
        let expires_at = match request.expires_at {
            // Only outside any contract may a purchase outlive the terms.
            Some(at) => {
                match state.calendar.last_term_end().filter(|_| state.calendar.term_end_at(now).is_some()) {
                    Some(term_end) if at > term_end => {
                        return Err(LedgerError::ExpiryAfterTerm { expires_at: at, term_end })
                    }
                    _ => at,
                }
            }
            None => state
                .calendar
                .term_end_at(now)
                .ok_or(LedgerError::NoContractInForce { org: request.org, at: now })?,
        };
        if expires_at <= now {
            return Err(LedgerError::ExpiryNotInFuture { expires_at, now });
        }
        let kind = EntryKind::Purchase {
            idempotency_key: request.idempotency_key.clone(),
            expires_at,
            expiry_override: request.expires_at,
            reference: request.reference.clone(),
        };
        let entry = state.credit(&self.shared.committer, now, kind, request.amount);
        let receipt = PurchaseReceipt {
            entry,
            lot: LotId(entry.0),
            wallet,
            amount: request.amount,
            expires_at,
            balance_after: state.balance(),
        };
        drop(state);
        self.idempotency.lock().insert(slot, Replay::Purchase(request, receipt));
        self.shared.committer.sync()?;
        Ok(receipt)
    }

    /// Whether `org` used `idempotency_key` for a purchase or adjustment
    /// already: sent again, it changes nothing.
    pub fn idempotency_key_used(&self, org: OrgId, idempotency_key: &str) -> bool {
        self.idempotency.lock().contains_key(&(org, idempotency_key.to_owned()))
    }

    /// Corrects a wallet of `request.org` by a signed amount.
    pub fn adjust(
        &self,
        request: AdjustmentRequest,
        now: DateTime<Utc>,
    ) -> Result<AdjustmentReceipt, LedgerError> {
        // Money is not credited while the store cannot record it.
        let _admin = self.lock_admin()?;
        check_key(&request.idempotency_key)?;
        let slot = (request.org, request.idempotency_key.clone());
        let remembered = self.idempotency.lock().get(&slot).cloned();
        match remembered {
            Some(Replay::Adjustment(first, receipt)) => {
                return self.replayed(
                    &request.idempotency_key,
                    receipt,
                    &adjustment_differences(&first, &request),
                );
            }
            Some(Replay::Purchase(..)) => return Err(conflict(&request.idempotency_key, "operation")),
            None => {}
        }
        // Checked after the replay: a retry of an adjustment made before the
        // check answers its receipt, not an error that invites a new key.
        check_prose("reason", &request.reason)?;
        self.shared.committer.check()?;
        self.ensure_wallet_in(request.org, request.wallet)?;
        // Taking stale credit back from it stays possible.
        if let (WalletId::Lite(user), true) = (request.wallet, request.amount > Decimal::ZERO) {
            if self.users.get(&user).is_some_and(|user| user.plan != Plan::Lite) {
                return Err(LedgerError::LiteWalletNotInUse { user });
            }
        }
        if request.amount.is_zero() || request.amount.abs() > MAX_AMOUNT || too_fine(request.amount) {
            return Err(LedgerError::InvalidAmount {
                field: "amount",
                expected: "non-zero, at most 1,000,000,000,000 either way, with at most 9 decimal places",
                amount: request.amount,
            });
        }
        if (request.amount > Decimal::ZERO) != request.expires_at.is_some() {
            return Err(LedgerError::AdjustmentExpiry);
        }
        let cell = self.cell(request.wallet).ok_or(LedgerError::UnknownWallet(request.wallet))?;
        let mut state = cell.state.lock();
        let now = state.advance(now, &self.shared.committer);
        let kind = EntryKind::Adjustment {
            idempotency_key: request.idempotency_key.clone(),
            reason: request.reason.clone(),
            expires_at: request.expires_at,
        };
        let (entry, lot) = match request.expires_at {
            Some(expires_at) => {
                if expires_at <= now {
                    return Err(LedgerError::ExpiryNotInFuture { expires_at, now });
                }
                let entry = state.credit(&self.shared.committer, now, kind, request.amount);
                (entry, Some(LotId(entry.0)))
            }
            None => {
                let required = -request.amount;
                if state.available() < required {
                    return Err(LedgerError::InsufficientAvailable {
                        wallet: request.wallet,
                        available: state.available(),
                        required,
                    });
                }
                let (entry, overrun) = state.draw(&self.shared.committer, now, required, |_| kind);
                assert!(overrun.is_zero(), "negative adjustment overran a checked balance");
                (entry, None)
            }
        };
        let receipt = AdjustmentReceipt {
            entry,
            lot,
            wallet: request.wallet,
            amount: request.amount,
            balance_after: state.balance(),
        };
        drop(state);
        self.idempotency.lock().insert(slot, Replay::Adjustment(request, receipt));
        self.shared.committer.sync()?;
        Ok(receipt)
    }

    /// A remembered receipt, answered only once its record is durable. The
    /// key's slot is taken before the first call's sync, so a retry never
    /// credits twice; if that sync failed, the retry must not report success
    /// either: it waits for the journal to confirm everything appended so far
    /// (the journal keeps order and never drops a record it then confirms),
    /// and a failed journal answers its failure.
    /// A retry under `key` of a request first answered `first`: that answer
    /// (once durable) when no field `differs`, else a conflict naming the
    /// first that does.
    pub(crate) fn replayed<R>(
        &self,
        key: &str,
        first: R,
        differs: &[(&'static str, bool)],
    ) -> Result<R, LedgerError> {
        match differs.iter().find_map(|(field, differs)| differs.then_some(*field)) {
            None => self.durable(first),
            Some(field) => Err(conflict(key, field)),
        }
    }

    pub(crate) fn durable<R>(&self, receipt: R) -> Result<R, LedgerError> {
        self.shared.committer.sync()?;
        Ok(receipt)
    }

    /// Rebuilds the idempotency memory from a replayed entry.
    pub(crate) fn remember_funding(&self, entry: &LedgerEntry) {
        let replay = match &entry.kind {
            EntryKind::Purchase { idempotency_key, expires_at, expiry_override, reference } => {
                Replay::Purchase(
                    PurchaseRequest {
                        org: entry.org,
                        amount: entry.amount,
                        expires_at: *expiry_override,
                        reference: reference.clone(),
                        idempotency_key: idempotency_key.clone(),
                    },
                    PurchaseReceipt {
                        entry: entry.id,
                        lot: LotId(entry.id.0),
                        wallet: entry.wallet,
                        amount: entry.amount,
                        expires_at: *expires_at,
                        balance_after: entry.balance_after,
                    },
                )
            }
            EntryKind::Adjustment { idempotency_key, reason, expires_at } => Replay::Adjustment(
                AdjustmentRequest {
                    org: entry.org,
                    wallet: entry.wallet,
                    amount: entry.amount,
                    reason: reason.clone(),
                    expires_at: *expires_at,
                    idempotency_key: idempotency_key.clone(),
                },
                AdjustmentReceipt {
                    entry: entry.id,
                    lot: expires_at.map(|_| LotId(entry.id.0)),
                    wallet: entry.wallet,
                    amount: entry.amount,
                    balance_after: entry.balance_after,
                },
            ),
            _ => return,
        };
        let key = match &replay {
            Replay::Purchase(request, _) => request.idempotency_key.clone(),
            Replay::Adjustment(request, _) => request.idempotency_key.clone(),
        };
        self.idempotency.lock().insert((entry.org, key), replay);
    }
}

fn conflict(key: &str, field: &'static str) -> LedgerError {
    LedgerError::IdempotencyConflict { key: key.to_owned(), field }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use rust_decimal_macros::dec;

    use super::*;
    use crate::ledger::journal::{Journal, JournalError, MemoryJournal, Record, RecordBody};
    use crate::ledger::testkit::{at, org, term};
    use crate::ledger::LedgerConfig;

    /// A memory journal whose syncs fail once `failing` is set, as a full
    /// disk's would.
    #[derive(Default)]
    struct FailingSync {
        records: MemoryJournal,
        failing: AtomicBool,
    }

    impl Journal for FailingSync {
        fn append(&self, record: Record) -> Result<(), JournalError> {
            self.records.append(record)
        }

        fn sync(&self) -> Result<(), JournalError> {
            if self.failing.load(Ordering::Relaxed) {
                return Err(JournalError::Failed { reason: "no space left on device".into() });
            }
            Ok(())
        }
    }

    fn funded_ledger() -> (Ledger, Arc<FailingSync>, OrgId) {
        let journal = Arc::new(FailingSync::default());
        let ledger = Ledger::new(LedgerConfig::default(), journal.clone());
        let now = at("2026-03-01T00:00:00Z");
        let org = org(&ledger, chrono_tz::UTC, Some(term("2026-01-01", 1, dec!(10), 0, dec!(0))), now);
        (ledger, journal, org)
    }

    fn purchase_of_25(org: OrgId) -> PurchaseRequest {
        PurchaseRequest {
            org,
            amount: dec!(25),
            expires_at: None,
            reference: None,
            idempotency_key: "buy-1".into(),
        }
    }

    #[test]
    fn a_purchase_whose_sync_failed_is_never_acknowledged_on_retry() {
        // Proves the retry of a purchase that was not made durable does not answer success.
        let (ledger, journal, org) = funded_ledger();
        journal.failing.store(true, Ordering::Relaxed);
        let now = at("2026-03-02T00:00:00Z");
        let request = purchase_of_25(org);
        let first = ledger.purchase(request.clone(), now);
        assert!(matches!(first, Err(LedgerError::Unavailable(_))), "{first:?}");
        let retry = ledger.purchase(request.clone(), now);
        assert!(matches!(retry, Err(LedgerError::Unavailable(_))), "a retry must not ack: {retry:?}");
        let other = PurchaseRequest { idempotency_key: "buy-2".into(), ..request };
        assert!(ledger.purchase(other, now).is_err(), "a failed journal takes no new credit");
        let purchases = journal
            .records
            .records()
            .into_iter()
            .filter(
                |r| matches!(&r.body, RecordBody::Entry(e) if matches!(e.kind, EntryKind::Purchase { .. })),
            )
            .count();
        assert_eq!(purchases, 1, "the retry credited nothing more");
    }

    #[test]
    fn an_adjustment_whose_sync_failed_is_never_acknowledged_on_retry() {
        // Proves the same for adjustments, the other idempotent money write.
        let (ledger, journal, org) = funded_ledger();
        journal.failing.store(true, Ordering::Relaxed);
        let now = at("2026-03-02T00:00:00Z");
        let request = AdjustmentRequest {
            org,
            wallet: WalletId::Pool(org),
            amount: dec!(5),
            reason: "goodwill".into(),
            expires_at: Some(at("2026-06-01T00:00:00Z")),
            idempotency_key: "adj-1".into(),
        };
        assert!(ledger.adjust(request.clone(), now).is_err());
        let retry = ledger.adjust(request, now);
        assert!(matches!(retry, Err(LedgerError::Unavailable(_))), "a retry must not ack: {retry:?}");
    }

    #[test]
    fn a_durable_purchase_replays_its_receipt() {
        // Proves the durability check leaves the ordinary replay alone.
        let (ledger, _journal, org) = funded_ledger();
        let now = at("2026-03-02T00:00:00Z");
        let request = purchase_of_25(org);
        let first = ledger.purchase(request.clone(), now).unwrap();
        assert_eq!(ledger.purchase(request, now).unwrap(), first);
    }
}
