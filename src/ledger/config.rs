//! Ledger limits and timeouts. Every bound the ledger enforces is named here.

use chrono::TimeDelta;

/// Tunables of the ledger; [`LedgerConfig::default`] is sized for one gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerConfig {
    /// How long a hold may stay open before `void_expired_holds` (or the next
    /// operation on its wallet) voids it. Ten minutes outlasts any streamed
    /// completion a sane upstream timeout lets through.
    pub hold_ttl_ms: u64,
    /// Most holds open at once on one wallet; protects memory and bounds
    /// the scan that voids expired holds.
    pub max_open_holds_per_wallet: usize,
    /// How many recent settlements per wallet are remembered so a repeated
    /// settle of the same request (through `settle_request`) returns the
    /// first result. A repeat older than that gets `UnknownRequest`; it can
    /// never debit twice, because a settle by id only debits an open hold.
    /// Each remembered settlement costs about 150 bytes per wallet, and a
    /// retried settle comes within moments, so the memory is kept short.
    pub settled_memory_per_wallet: usize,
    /// Most end-user ids tracked per application for end-user limits;
    /// end-user ids come from a request header, so this bounds memory an
    /// application's callers can make us spend.
    pub max_end_users_per_app: usize,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            hold_ttl_ms: 10 * 60 * 1000,
            max_open_holds_per_wallet: 10_000,
            settled_memory_per_wallet: 8,
            max_end_users_per_app: 100_000,
        }
    }
}

impl LedgerConfig {
    /// The hold TTL as a duration.
    pub fn hold_ttl(&self) -> TimeDelta {
        TimeDelta::milliseconds(i64::try_from(self.hold_ttl_ms).unwrap_or(i64::MAX))
    }
}
