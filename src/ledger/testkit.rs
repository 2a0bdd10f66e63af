//! Helpers shared by the ledger's and the store's tests.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::ledger::contract::ContractTerm;
use crate::ledger::entity::{KeyHash, Plan};
use crate::ledger::entry::{LedgerEntry, SettleDetails, Usage};
use crate::ledger::ids::{KeyId, OrgId, Owner, RequestId, UserId};
use crate::ledger::journal::{MemoryJournal, RecordBody};
use crate::ledger::limit::Limits;
use crate::ledger::{Ledger, LedgerConfig, NewKey, NewOrg, NewUser};

/// Parses an RFC 3339 instant.
pub fn at(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

/// A ledger over an in-memory journal the test can read back.
pub fn ledger() -> (Ledger, Arc<MemoryJournal>) {
    ledger_with(LedgerConfig::default())
}

/// Same, with a config.
pub fn ledger_with(config: LedgerConfig) -> (Ledger, Arc<MemoryJournal>) {
    let journal = Arc::new(MemoryJournal::default());
    (Ledger::new(config, journal.clone()), journal)
}

/// A contract term.
pub fn term(start: &str, years: u32, platform: Decimal, seats: u32, per_seat: Decimal) -> ContractTerm {
    ContractTerm {
        start: start.parse().unwrap(),
        years,
        platform_allocation_per_year: platform,
        pro_seats: seats,
        seat_allocation_per_year: per_seat,
    }
}

/// An org with an optional contract.
pub fn org(ledger: &Ledger, tz: Tz, contract: Option<ContractTerm>, now: DateTime<Utc>) -> OrgId {
    let new = NewOrg { name: "acme".into(), time_zone: tz, contract };
    ledger.create_org(new, now).unwrap().id
}

/// A user on `plan`.
pub fn user(ledger: &Ledger, org: OrgId, plan: Plan, allowance: Decimal, now: DateTime<Utc>) -> UserId {
    let new = NewUser {
        name: "ada".into(),
        plan,
        lite_monthly_allowance: allowance,
        prorate_on_downgrade: false,
        limits: Limits::NONE,
    };
    ledger.create_user(org, new, now).unwrap().id
}

/// A key for `owner`, with limits; the secret is derived from a counter.
pub fn key(ledger: &Ledger, org: OrgId, owner: Owner, limits: Limits, now: DateTime<Utc>) -> KeyId {
    let secret = format!("secret-{}", Uuid::now_v7());
    let new = NewKey { owner, hash: KeyHash::of_secret(&secret), label: "test".into(), limits };
    ledger.create_key(org, new, now).unwrap().id
}

/// A purchase of `amount` for `org` under an idempotency key, no expiry
/// override, no reference.
pub fn purchase(org: OrgId, amount: Decimal, idempotency_key: &str) -> crate::ledger::PurchaseRequest {
    crate::ledger::PurchaseRequest {
        org,
        amount,
        expires_at: None,
        reference: None,
        idempotency_key: idempotency_key.into(),
    }
}

/// A fresh request id.
pub fn request() -> RequestId {
    RequestId(Uuid::now_v7())
}

/// Plain settle details.
pub fn details() -> SettleDetails {
    SettleDetails {
        route: Arc::from("/v1/chat/completions"),
        model: Arc::from("gpt-test"),
        usage: Usage { input_tokens: 10, output_tokens: 20, cached_input_tokens: 0, tool_units: 0 },
        price_version: Arc::from("prices-v1"),
        operator_cost: None,
    }
}

/// Every entry the journal holds, in id order.
pub fn entries(journal: &MemoryJournal) -> Vec<LedgerEntry> {
    journal
        .records()
        .into_iter()
        .filter_map(|record| match record.body {
            RecordBody::Entry(entry) => Some(entry),
            _ => None,
        })
        .collect()
}

/// Asserts the auditor finds nothing wrong.
pub fn assert_verified(ledger: &Ledger, journal: &MemoryJournal) {
    let entries = entries(journal);
    let report = ledger.verify(&entries);
    assert!(report.is_clean(), "audit found: {:#?}", report.mismatches);
}

/// A tiny seeded PRNG (splitmix64): reproducible workloads without a dependency.
#[derive(Clone, Debug)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (bound > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A random amount in cents, `0..=max_cents`.
    pub fn cents(&mut self, max_cents: u64) -> Decimal {
        Decimal::new(i64::try_from(self.below(max_cents + 1)).unwrap(), 2)
    }
}
