//! Ledger entries: the append-only record of every balance change.
//!
//! `amount` is the signed change to the wallet balance (grants and purchases
//! positive, debits and write-offs negative, adjustments either, a write-off
//! taken back positive), so for every wallet
//! `balance_after(n) == balance_after(n-1) + amount(n)` and
//! `balance == granted - debited - written_off` where `granted` sums grants,
//! purchases and adjustments and `written_off` counts write-offs less what
//! was taken back.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::ledger::ids::{EntryId, KeyId, LotId, OrgId, Owner, RequestId, WalletId};
use crate::ledger::lot::{LotOrigin, LotTouches};

/// One balance change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Monotonic per ledger; also the sequence number of its record.
    pub id: EntryId,
    /// When it was recorded (the operation's `now`).
    pub at: DateTime<Utc>,
    /// The wallet whose balance changed.
    pub wallet: WalletId,
    /// The wallet's organization.
    pub org: OrgId,
    /// What happened.
    pub kind: EntryKind,
    /// Signed change to the balance.
    pub amount: Decimal,
    /// Balance right after this entry.
    pub balance_after: Decimal,
    /// Lots touched and by how much (a created lot for grants). Nearly
    /// always one: kept inline, so a debit allocates nothing for it (the
    /// allocation and its free on the store's writer thread were a fifth of
    /// a write-through settle).
    pub lots: LotTouches,
}

/// Why a lot's remainder left the wallet unspent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteOffReason {
    /// The lot reached its expiry.
    Expired,
    /// The Lite user moved to Pro; their Lite remainder does not follow.
    Upgraded,
}

/// What an entry records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum EntryKind {
    /// A scheduled allocation (platform, seat, lite-monthly) became effective.
    Grant {
        /// Kind and period of the created lot.
        origin: LotOrigin,
        /// Start of the period it funds (the grant may be recorded later).
        effective_at: DateTime<Utc>,
        /// When the lot expires.
        expires_at: DateTime<Utc>,
    },
    /// Credits bought by the org.
    Purchase {
        /// The caller's idempotency key.
        idempotency_key: String,
        /// When the lot expires.
        expires_at: DateTime<Utc>,
        /// The expiry the caller asked for, if any (kept so a replayed
        /// request compares equal after a restart).
        expiry_override: Option<DateTime<Utc>>,
        /// Caller's reference (invoice, order).
        reference: Option<String>,
    },
    /// An operator correction: positive creates a lot, negative draws.
    Adjustment {
        /// The caller's idempotency key.
        idempotency_key: String,
        /// Why.
        reason: String,
        /// Expiry of the created lot (positive adjustments only).
        expires_at: Option<DateTime<Utc>>,
    },
    /// A settled request.
    Debit(Debit),
    /// An unspent remainder removed.
    WriteOff {
        /// Why.
        reason: WriteOffReason,
    },
    /// Part of an expired lot's write-off taken back to pay a debit that
    /// settled before the expiry but reached the ledger after it (a cluster
    /// replica's settles are posted a moment after they happen). The credit
    /// becomes a lot again, already expired, and the debit recorded right
    /// after draws it first: the expired credit pays, as it did when the
    /// request settled (a wallet in deficit repays the deficit with it, as
    /// with any credit, and the debit then records that much as overrun).
    /// Counts against `written_off`, never as granted.
    WriteOffReversed {
        /// The request whose debit it pays.
        request_id: RequestId,
        /// The expired lot whose write-off it takes from.
        expired_lot: LotId,
        /// That lot's origin.
        origin: LotOrigin,
        /// When that lot became spendable (the recreated lot keeps it, so
        /// if it is written off again, say the debit's posting was cut
        /// short, a later try can still take it back).
        effective_at: DateTime<Utc>,
        /// That lot's expiry, in the past.
        expires_at: DateTime<Utc>,
    },
}

impl EntryKind {
    /// True for kinds that count as granted in the balance identity.
    pub fn is_credit_side(&self) -> bool {
        matches!(self, EntryKind::Grant { .. } | EntryKind::Purchase { .. } | EntryKind::Adjustment { .. })
    }

    /// The lot this entry creates, if it creates one.
    pub fn created_lot(&self) -> Option<(LotOrigin, DateTime<Utc>)> {
        match self {
            EntryKind::Grant { origin, expires_at, .. } => Some((*origin, *expires_at)),
            EntryKind::Purchase { expires_at, .. } => Some((LotOrigin::Purchase, *expires_at)),
            EntryKind::Adjustment { expires_at, .. } => {
                expires_at.map(|expires_at| (LotOrigin::Adjustment, expires_at))
            }
            EntryKind::WriteOffReversed { origin, expires_at, .. } => Some((*origin, *expires_at)),
            EntryKind::Debit(_) | EntryKind::WriteOff { .. } => None,
        }
    }
}

/// Token and unit counts reported for a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Input (prompt) tokens, excluding cached ones.
    pub input_tokens: u64,
    /// Output (completion) tokens.
    pub output_tokens: u64,
    /// Input tokens served from the provider's cache.
    pub cached_input_tokens: u64,
    /// Units reported by a tool (calls, pages, seconds...).
    pub tool_units: u64,
}

/// What the proxy knows when a request ends. Strings that repeat across
/// requests (route, model, price version) are shared `Arc<str>` so settling
/// does not copy them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleDetails {
    /// The route that served the request.
    pub route: Arc<str>,
    /// Model or tool name.
    pub model: Arc<str>,
    /// Reported usage.
    pub usage: Usage,
    /// Version of the price table used to hold and settle.
    pub price_version: Arc<str>,
    /// What the request cost the operator at the price table's prices,
    /// before the markup; the debit itself (the entry's amount) is the price
    /// the customer paid. `None` in entries recorded before markups existed:
    /// their cost was the debit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_cost: Option<Decimal>,
}

/// The debit of one request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Debit {
    /// The request.
    pub request_id: RequestId,
    /// The key it came with.
    pub key: KeyId,
    /// The user or application the key belongs to.
    pub owner: Owner,
    /// End-user id given by an application, for reports.
    pub end_user: Option<Arc<str>>,
    /// Route, model, usage and price version.
    pub details: SettleDetails,
    /// What was held for it.
    pub held: Decimal,
    /// The part of the cost no lot covered (the wallet went below zero).
    pub overrun: Decimal,
}

impl LedgerEntry {
    /// For a debit: what it cost the operator and what the customer paid
    /// (the amount debited). Equal for entries recorded before markups.
    pub fn cost_and_price(&self) -> Option<(Decimal, Decimal)> {
        let EntryKind::Debit(debit) = &self.kind else { return None };
        let price = -self.amount;
        Some((debit.details.operator_cost.unwrap_or(price), price))
    }
}

impl Debit {
    /// The spend this debit counts against.
    pub(crate) fn spender(&self) -> crate::ledger::payer::Spender<'_> {
        crate::ledger::payer::Spender { key: self.key, owner: self.owner, end_user: self.end_user.as_deref() }
    }
}
