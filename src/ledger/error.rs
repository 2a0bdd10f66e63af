//! Errors of the ledger's admin operations (organizations, users, keys,
//! purchases, adjustments, balances). Hold refusals have their own closed
//! enum, [`crate::ledger::Refusal`]; settles have [`crate::ledger::SettleError`].

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::ledger::contract::ContractError;
use crate::ledger::ids::{AppId, KeyId, OrgId, UserId, WalletId};
use crate::ledger::journal::JournalError;
use crate::ledger::limit::LimitError;

/// Why an admin operation did nothing (or, for `Unavailable`, why its
/// durability is unknown).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// The journal failed; the ledger takes no more work until restarted.
    #[error("the ledger is unavailable: {0}")]
    Unavailable(#[from] JournalError),
    /// No such organization.
    #[error("organization {0} does not exist")]
    UnknownOrg(OrgId),
    /// No such user (or not in this organization's reach).
    #[error("user {0} does not exist")]
    UnknownUser(UserId),
    /// No such application.
    #[error("application {0} does not exist")]
    UnknownApp(AppId),
    /// No such key.
    #[error("key {0} does not exist")]
    UnknownKey(KeyId),
    /// No such wallet.
    #[error("wallet {0} does not exist")]
    UnknownWallet(WalletId),
    /// The call names something that belongs to another organization.
    /// Credits never move between organizations.
    #[error("{target} belongs to organization {target_org}, not {org}")]
    CrossOrg {
        /// The organization the call acts for.
        org: OrgId,
        /// What it named.
        target: String,
        /// The organization that owns it.
        target_org: OrgId,
    },
    /// An amount is out of range.
    #[error("{field} must be {expected}, got {amount}")]
    InvalidAmount {
        /// The field.
        field: &'static str,
        /// What is allowed.
        expected: &'static str,
        /// What was given.
        amount: Decimal,
    },
    /// A contract term was refused.
    #[error(transparent)]
    Contract(#[from] ContractError),
    /// A spending limit was refused.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// A purchase without an explicit expiry when no contract term is in force.
    #[error(
        "organization {org} has no contract term in force at {at}; give the purchase an explicit expiry"
    )]
    NoContractInForce {
        /// The organization.
        org: OrgId,
        /// When.
        at: DateTime<Utc>,
    },
    /// An expiry at or before the operation's time.
    #[error("expiry {expires_at} must be after {now}")]
    ExpiryNotInFuture {
        /// The expiry given.
        expires_at: DateTime<Utc>,
        /// The operation's time.
        now: DateTime<Utc>,
    },
    /// A positive adjustment needs an expiry (and a negative one takes none).
    #[error("a positive adjustment needs an expiry; a negative one must not have one")]
    AdjustmentExpiry,
    /// A negative adjustment larger than what is available.
    #[error("wallet {wallet} has {available} available, the adjustment takes {required}")]
    InsufficientAvailable {
        /// The wallet.
        wallet: WalletId,
        /// Balance less open holds.
        available: Decimal,
        /// The amount to take.
        required: Decimal,
    },
    /// The idempotency key was used before with a different request.
    #[error("idempotency key {key:?} was used with a different {field}; use a new key for a new request")]
    IdempotencyConflict {
        /// The key.
        key: String,
        /// The first field that differs.
        field: &'static str,
    },
    /// The idempotency key is empty or too long.
    #[error("idempotency key must be 1 to {max} bytes")]
    BadIdempotencyKey {
        /// The longest allowed.
        max: usize,
    },
    /// A key with this secret hash already exists.
    #[error("a key with this secret already exists")]
    DuplicateKey,
    /// The user is already on that plan.
    #[error("user {user} is already on {plan:?}")]
    SamePlan {
        /// The user.
        user: UserId,
        /// The plan.
        plan: crate::ledger::entity::Plan,
    },
    /// Credit for the Lite wallet of a user not on Lite now: nobody draws
    /// from it, and a later downgrade would make it spendable.
    #[error("user {user} is not on Lite: their Lite wallet takes no credit")]
    LiteWalletNotInUse {
        /// The user.
        user: UserId,
    },
    /// A revoked key takes no change: it can never be used again.
    #[error("key {key} is revoked: it takes no changes")]
    KeyRevoked {
        /// The key.
        key: KeyId,
    },
    /// End-user limits apply to applications only.
    #[error("end-user limits apply to applications only")]
    EndUserLimitsOnUser,
    /// A name, label or list is longer than the ledger keeps.
    #[error("{field} must be at most {max} {unit}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// The most allowed.
        max: usize,
        /// What `max` counts.
        unit: &'static str,
    },
    /// A name or label holds a control character (a line break, an escape)
    /// or an invisible formatting one (a bidi override, a zero-width
    /// space): shown in the dashboard, a prompt or a report, it could pass
    /// for another name.
    #[error("{field} must not hold control characters or invisible formatting characters")]
    Unprintable {
        /// The field.
        field: &'static str,
    },
    /// The organization has as many of these as one may have.
    #[error("an organization may have at most {max} {what}")]
    TooMany {
        /// Users, applications or keys.
        what: &'static str,
        /// The most allowed.
        max: usize,
    },
    /// A purchase's explicit expiry after the contract it falls under ends:
    /// purchased credits expire with the term.
    #[error("expiry {expires_at} is after the contract's end, {term_end}")]
    ExpiryAfterTerm {
        /// The expiry given.
        expires_at: DateTime<Utc>,
        /// The end of the last term agreed.
        term_end: DateTime<Utc>,
    },
}
