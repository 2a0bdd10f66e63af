//! Why a hold was refused.
//!
//! [`Refusal`] is closed and its variants are listed in precedence order:
//! when several apply, the first one listed is returned, so the same request
//! against the same state always gets the same answer.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use crate::ledger::ids::{AppId, KeyId, RequestId, WalletId, WalletKind};
use crate::ledger::limit::LimitBreach;

/// The paying wallet as the refused caller should see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WalletView {
    /// The wallet.
    pub wallet: WalletId,
    /// Pool or Lite.
    pub kind: WalletKind,
    /// Balance (sum of live lots, less any overrun).
    pub balance: Decimal,
    /// Balance less open holds.
    pub available: Decimal,
    /// For a Lite wallet on an allowance, when the next allowance arrives.
    pub resets_at: Option<DateTime<Utc>>,
}

/// A refused hold, in precedence order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "code")]
pub enum Refusal {
    /// 1. The ledger's journal failed; nothing can be committed (503).
    #[error("the ledger is unavailable: {reason}")]
    Unavailable {
        /// The journal's error.
        reason: String,
    },
    /// 2. The hold amount is negative (a pricing bug upstream of the ledger).
    #[error("hold amount must not be negative, got {required}")]
    InvalidAmount {
        /// The amount asked for.
        required: Decimal,
    },
    /// 3. No such wallet.
    #[error("wallet {wallet} does not exist")]
    UnknownWallet {
        /// The wallet asked for.
        wallet: WalletId,
    },
    /// 4. The key does not pay from this wallet (revoked, another org, or
    ///    its owner draws on another wallet).
    #[error("key {key} does not pay from wallet {wallet}")]
    NotAPayer {
        /// The wallet asked for.
        wallet: WalletId,
        /// The key presented.
        key: KeyId,
    },
    /// 5. The request id already has an open or recently settled hold.
    #[error("request {request_id} already holds on wallet {wallet}")]
    DuplicateRequest {
        /// The wallet.
        wallet: WalletId,
        /// The repeated request id.
        request_id: RequestId,
    },
    /// 6. The wallet already has its maximum of open holds.
    #[error("wallet {} has {limit} holds open, the most allowed", .wallet.wallet)]
    TooManyOpenHolds {
        /// The wallet.
        wallet: WalletView,
        /// `max_open_holds_per_wallet`.
        limit: usize,
    },
    /// 7. The application tracks the most end-user ids it may.
    #[error("application {app} already tracks {limit} end users this period")]
    EndUserCapacity {
        /// The wallet.
        wallet: WalletView,
        /// The application.
        app: AppId,
        /// `max_end_users_per_app`.
        limit: usize,
    },
    /// 8. A spending limit would be crossed. Subjects are checked key, then
    ///    user or application, then end user; within one subject per request,
    ///    day, month, contract year.
    #[error("spending limit {:?} {:?} of {} would be crossed", .limit.subject, .limit.period, .limit.cap)]
    SpendingLimit {
        /// The wallet.
        wallet: WalletView,
        /// The amount asked for.
        required: Decimal,
        /// The limit, its spend so far and when it resets (boxed to keep
        /// `Result<Hold, Refusal>` small on the hot path).
        limit: Box<LimitBreach>,
    },
    /// 9. The wallet's available balance does not cover the hold.
    #[error("wallet {} has {} available, {required} required", .wallet.wallet, .wallet.available)]
    InsufficientFunds {
        /// The wallet.
        wallet: WalletView,
        /// The amount asked for.
        required: Decimal,
    },
}

impl Refusal {
    /// Stable, low-cardinality code for responses and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Unavailable { .. } => "ledger_unavailable",
            Refusal::InvalidAmount { .. } => "invalid_amount",
            Refusal::UnknownWallet { .. } => "unknown_wallet",
            Refusal::NotAPayer { .. } => "not_a_payer",
            Refusal::DuplicateRequest { .. } => "duplicate_request",
            Refusal::TooManyOpenHolds { .. } => "too_many_open_holds",
            Refusal::EndUserCapacity { .. } => "end_user_capacity",
            Refusal::SpendingLimit { .. } => "spending_limit",
            Refusal::InsufficientFunds { .. } => "insufficient_funds",
        }
    }
}
