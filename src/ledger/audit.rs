//! The auditor: recomputes every wallet from its entries alone.
//!
//! For each wallet, in entry order, it checks that
//! - entry ids increase,
//! - each amount has the sign its kind requires,
//! - the lots touched add up to the amount (plus the overrun for debits),
//! - `balance_after == previous balance_after + amount`,
//! - `balance_after == granted - debited - written_off` as summed so far,
//!
//! and, given the live wallets, that their balances and sums equal the
//! recomputed ones. Used by [`crate::ledger::Ledger::verify`] and by the
//! store's `verify_store`.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::Serialize;

use crate::ledger::entry::{EntryKind, LedgerEntry};
use crate::ledger::ids::{EntryId, WalletId};
use crate::ledger::wallet::Totals;

/// One broken rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// The wallet, when the problem is in one.
    pub wallet: Option<WalletId>,
    /// The entry, when the problem is in one.
    pub entry: Option<EntryId>,
    /// What is wrong.
    pub problem: String,
}

/// The auditor's findings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AuditReport {
    /// Wallets seen.
    pub wallets: usize,
    /// Entries checked.
    pub entries: usize,
    /// Recomputed balance of each wallet.
    pub balances: BTreeMap<WalletId, Decimal>,
    /// Everything that did not add up; empty when the ledger is sound.
    pub mismatches: Vec<Mismatch>,
}

impl AuditReport {
    /// True when nothing was found.
    pub fn is_clean(&self) -> bool {
        self.mismatches.is_empty()
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct WalletAudit {
    totals: Totals,
    balance: Decimal,
    last: Option<EntryId>,
}

/// Feeds on entries one at a time, so a store can stream them.
#[derive(Debug, Default)]
pub struct Audit {
    wallets: BTreeMap<WalletId, WalletAudit>,
    entries: usize,
    mismatches: Vec<Mismatch>,
}

impl Audit {
    /// An auditor that continues from a checkpoint: each wallet starts with
    /// the sums and balance the checkpoint saved.
    pub fn starting_from(snapshot: &crate::ledger::snapshot::LedgerSnapshot) -> Audit {
        let wallets = snapshot
            .wallets
            .iter()
            .map(|saved| {
                (saved.wallet, WalletAudit { totals: saved.totals, balance: saved.balance(), last: None })
            })
            .collect();
        Audit { wallets, entries: 0, mismatches: Vec::new() }
    }

    /// Checks one entry against its wallet's history so far.
    pub fn add(&mut self, entry: &LedgerEntry) {
        self.entries += 1;
        let wallet = self.wallets.entry(entry.wallet).or_default();
        let mut problems = Vec::new();
        if wallet.last.is_some_and(|last| last >= entry.id) {
            problems.push(format!("id does not increase after {:?}", wallet.last));
        }
        if let Some(problem) = sign_problem(entry) {
            problems.push(problem);
        }
        if let Some(problem) = lots_problem(entry) {
            problems.push(problem);
        }
        wallet.totals.count(&entry.kind, entry.amount);
        wallet.balance += entry.amount;
        wallet.last = Some(entry.id);
        if wallet.balance != entry.balance_after {
            problems.push(format!(
                "balance_after {} but previous balance plus amount is {}",
                entry.balance_after, wallet.balance
            ));
            // Resynchronize so one bad entry is reported once, not forever.
            wallet.balance = entry.balance_after;
        }
        if wallet.totals.balance() != entry.balance_after {
            problems.push(format!(
                "balance_after {} but granted - debited - written_off is {}",
                entry.balance_after,
                wallet.totals.balance()
            ));
        }
        self.mismatches.extend(problems.into_iter().map(|problem| Mismatch {
            wallet: Some(entry.wallet),
            entry: Some(entry.id),
            problem,
        }));
    }

    /// The report of the entries alone.
    pub fn finish(self) -> AuditReport {
        AuditReport {
            wallets: self.wallets.len(),
            entries: self.entries,
            balances: self.wallets.iter().map(|(id, w)| (*id, w.balance)).collect(),
            mismatches: self.mismatches,
        }
    }

    /// The report, also comparing live wallets (id, balance, sums) with the
    /// recomputed ones. A live wallet without entries must be empty.
    pub fn compare_live(mut self, live: Vec<(WalletId, Decimal, Totals)>) -> AuditReport {
        for (wallet, balance, totals) in live {
            let recomputed = self.wallets.get(&wallet).copied().unwrap_or_default();
            if recomputed.balance != balance || recomputed.totals != totals {
                self.mismatches.push(Mismatch {
                    wallet: Some(wallet),
                    entry: None,
                    problem: format!(
                        "live balance {balance} ({totals:?}) but entries give {} ({:?})",
                        recomputed.balance, recomputed.totals
                    ),
                });
            }
        }
        self.finish()
    }
}

fn sign_problem(entry: &LedgerEntry) -> Option<String> {
    let ok = match &entry.kind {
        EntryKind::Grant { .. } | EntryKind::Purchase { .. } | EntryKind::WriteOffReversed { .. } => {
            entry.amount > Decimal::ZERO
        }
        EntryKind::Adjustment { expires_at, .. } => {
            !entry.amount.is_zero() && (entry.amount > Decimal::ZERO) == expires_at.is_some()
        }
        EntryKind::Debit(_) | EntryKind::WriteOff { .. } => entry.amount < Decimal::ZERO,
    };
    (!ok).then(|| format!("amount {} has the wrong sign for its kind", entry.amount))
}

fn lots_problem(entry: &LedgerEntry) -> Option<String> {
    let touched: Decimal = entry.lots.iter().map(|touch| touch.amount).sum();
    let overrun = match &entry.kind {
        EntryKind::Debit(debit) => debit.overrun,
        _ => Decimal::ZERO,
    };
    let expected = entry.amount.abs();
    (touched + overrun != expected || entry.lots.iter().any(|t| t.amount <= Decimal::ZERO))
        .then(|| format!("lots touched sum to {touched} (overrun {overrun}) but the amount is {expected}"))
}
