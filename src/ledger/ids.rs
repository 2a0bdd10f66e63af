//! Identifiers.
//!
//! Entities (orgs, users, applications, keys) and ledger entries are named by
//! `u64` newtypes. Every id is the sequence number of the record that created
//! it (see [`crate::ledger::journal::Record`]), so ids are unique across all
//! kinds, increase with time, and are restored for free when the ledger is
//! replayed from the store. Wallets are not allocated at all: a wallet is named
//! by what owns it, which makes "which org does this wallet belong to" a
//! lookup rather than a table. Request ids are UUIDs minted by the proxy.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! u64_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

u64_id!(
    /// An organization: the customer that owns a pool wallet.
    OrgId,
    "org_"
);
u64_id!(
    /// A named user of an organization (Lite or Pro).
    UserId,
    "user_"
);
u64_id!(
    /// An embedded application of an organization.
    AppId,
    "app_"
);
u64_id!(
    /// An API key record (never the secret).
    KeyId,
    "key_"
);
u64_id!(
    /// A ledger entry; equal to the sequence number of its record.
    EntryId,
    "entry_"
);
u64_id!(
    /// A credit lot; equal to the id of the entry that granted it.
    LotId,
    "lot_"
);

/// The id the proxy gives every request; ties the access log, the trace and the
/// debit entry together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub Uuid);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A wallet, named by its owner: the pool of an organization or the personal
/// wallet of a Lite user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WalletId {
    /// The shared pool of an organization.
    Pool(OrgId),
    /// The personal wallet of a (current or former) Lite user.
    Lite(UserId),
}

impl WalletId {
    /// Which kind of wallet this is.
    pub fn kind(self) -> WalletKind {
        match self {
            WalletId::Pool(_) => WalletKind::Pool,
            WalletId::Lite(_) => WalletKind::Lite,
        }
    }
}

impl fmt::Display for WalletId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalletId::Pool(org) => write!(f, "pool:{org}"),
            WalletId::Lite(user) => write!(f, "lite:{user}"),
        }
    }
}

/// The two kinds of wallet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WalletKind {
    /// An organization's shared pool (Pro users and applications).
    Pool,
    /// A Lite user's personal wallet.
    Lite,
}

/// Who a key speaks for: exactly one user or one application.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Owner {
    /// A named user.
    User(UserId),
    /// An application.
    App(AppId),
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::User(user) => user.fmt(f),
            Owner::App(app) => app.fmt(f),
        }
    }
}

/// A fast, non-cryptographic hasher for the ledger's own maps, keyed by
/// ledger-assigned ids, gateway-minted request ids and key digests (never by
/// strings a client chooses, which keep std's SipHash). It is the multiply-rotate
/// scheme of rustc's FxHasher; hold and settle each do several lookups, and
/// SipHash would dominate their cost.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdHasher(u64);

impl IdHasher {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    fn mix(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::SEED);
    }
}

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.mix(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.mix(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.mix(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `HashMap` keyed by ids, hashed with [`IdHasher`].
pub type IdMap<K, V> = std::collections::HashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;

/// A `DashMap` keyed by ids, hashed with [`IdHasher`].
pub type IdDashMap<K, V> = dashmap::DashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;
