//! Storage: the narrow interface, its sled backend, and the group-commit
//! writer that connects it to the ledger's journal.
//!
//! - `codec`  — the segment layout: a batch of records per stored value
//! - `sled`   — [`SledStore`], segments in one sled tree, in append order
//! - `writer` — [`GroupCommit`], the bounded background writer (a [`crate::ledger::journal::Journal`])
//! - `verify` — [`verify_store`], the offline audit behind `ledger verify`
//!
//! # Durability contract
//!
//! The ledger commits in memory and appends each committed change (entity
//! version or ledger entry) as a record to [`GroupCommit`], in the order the
//! changes became visible. A background thread takes records off a bounded
//! queue in that order, writes them to sled in batches and calls sled's
//! `flush()` (write + fsync) at most once every `flush_interval_ms` (default
//! 5 ms), right away after a quiet period. sled's own periodic flusher is
//! turned off: only these flushes make data durable.
//!
//! - **What an `Ok` promises.** An admin operation (creating or changing an
//!   organization, contract, user, application or key, a purchase, an
//!   adjustment) returns `Ok` only after a flush that covers its records *and
//!   every record appended before them*, by any thread. A settle returns as
//!   soon as its debit is committed in memory and queued; it becomes durable
//!   with the next flush, normally within `flush_interval_ms` plus the fsync.
//! - **What `kill -9` can lose.** Only records appended after the last
//!   completed flush: the settles (and the catch-up grants and write-offs
//!   that operations record) of the last group window. Never an admin
//!   operation that returned `Ok`. Because records are persisted in append
//!   order and a wallet's records are appended under its lock, what survives
//!   is, per wallet, a prefix of its history, so replay never meets an entry
//!   whose predecessor is missing. (sled recovers its log up to the first
//!   incomplete write, which preserves that prefix.)
//! - **What is never stored.** Holds. They live in memory; after a restart
//!   every hold is void, and the money they reserved is available again.
//! - **How restart recovers.** [`open_ledger`] replays every record in
//!   the order it was appended (each wallet's entries in sequence order;
//!   across wallets a record can land a moment after a higher-numbered one)
//!   through the same code that applied it live, checking
//!   each entry's `balance_after`; a record that does not fit stops the
//!   start with an error naming it. Grants and write-offs lost in a crash are
//!   simply made again by the first operation on their wallet, because the
//!   ledger derives what is due from the lots it has.
//! - **When storage fails.** The writer stops taking records and every
//!   later operation fails (`Unavailable`) until the process restarts and
//!   recovers from what was flushed: the ledger never runs ahead of its store
//!   for longer than one failed batch.
//! - **Back-pressure.** When the queue (`queue_capacity` records) is full, an
//!   append waits for room; the number of such waits is counted. Nothing is
//!   ever dropped.

pub mod codec;
mod sled;
mod verify;
mod writer;

use std::path::Path;
use std::sync::Arc;

pub use self::sled::SledStore;
pub use self::verify::{verify_store, Report};
pub use self::writer::{GroupCommit, WriterStats};

use crate::ledger::journal::Record;
use crate::ledger::{Ledger, LedgerConfig, RestoreError};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an error.
    #[error("sled: {0}")]
    Sled(#[from] ::sled::Error),
    /// A stored record could not be read back.
    #[error("record {seq} cannot be decoded: {reason}")]
    Decode {
        /// The record's key.
        seq: u64,
        /// The decoder's message.
        reason: String,
    },
    /// A record could not be encoded.
    #[error("record {seq} cannot be encoded: {reason}")]
    Encode {
        /// The record.
        seq: u64,
        /// The encoder's message.
        reason: String,
    },
    /// The directory holds data in a format this build does not know.
    #[error("store format {found:?} is not supported (expected {expected})")]
    Format {
        /// What the directory says.
        found: String,
        /// What this build writes.
        expected: &'static str,
    },
    /// The stored records do not replay.
    #[error("the stored ledger does not replay: {0}")]
    Restore(#[from] RestoreError),
    /// The writer thread could not be started.
    #[error("cannot start the store writer: {0}")]
    Spawn(#[source] std::io::Error),
}

/// The storage interface. Narrow on purpose, so a shared backend can replace
/// sled when one machine is not enough.
pub trait Store: Send + Sync + 'static {
    /// Writes records; they are durable only after [`Store::flush`].
    fn append(&self, records: &[Record]) -> Result<(), StoreError>;

    /// Makes everything appended so far durable.
    fn flush(&self) -> Result<(), StoreError>;

    /// Every record in the order it was appended.
    fn records(&self) -> Box<dyn Iterator<Item = Result<Record, StoreError>> + '_>;

    /// Up to `limit` records with a sequence number above `after`, in order
    /// (paging for the admin API).
    fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Record>, StoreError>;
}

/// Tunables of the group-commit writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Least time between two flushes; also the most a settle waits in the
    /// queue before its flush starts.
    pub flush_interval_ms: u64,
    /// Records the queue holds before appends wait.
    pub queue_capacity: usize,
    /// Most records written per sled batch.
    pub max_batch: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { flush_interval_ms: 5, queue_capacity: 65_536, max_batch: 8_192 }
    }
}

/// A ledger rebuilt from a store, with the writer that persists it.
#[derive(Debug)]
pub struct OpenLedger<S: Store> {
    /// The ledger; share it with the proxy and the admin API.
    pub ledger: Arc<Ledger>,
    /// The writer; call [`GroupCommit::shutdown`] after the last operation.
    pub writer: Arc<GroupCommit<S>>,
}

/// Opens (or creates) the sled store in `dir` and rebuilds the ledger.
pub fn open_ledger(
    dir: &Path,
    ledger_config: LedgerConfig,
    store_config: StoreConfig,
) -> Result<OpenLedger<SledStore>, StoreError> {
    open_ledger_on(SledStore::open(dir)?, ledger_config, store_config)
}

/// Rebuilds the ledger from any store and starts its writer.
pub fn open_ledger_on<S: Store>(
    store: S,
    ledger_config: LedgerConfig,
    store_config: StoreConfig,
) -> Result<OpenLedger<S>, StoreError> {
    let store = Arc::new(store);
    // Replay appends nothing, so the writer can start first and be handed
    // to the ledger as its journal.
    let writer = Arc::new(GroupCommit::start(Arc::clone(&store), store_config)?);
    let mut failure = None;
    let records = store.records().map_while(|record| record.map_err(|error| failure = Some(error)).ok());
    let replayed = Ledger::restore(ledger_config, writer.clone(), records);
    if let Some(error) = failure {
        return Err(error);
    }
    Ok(OpenLedger { ledger: Arc::new(replayed?), writer })
}

#[cfg(test)]
mod simulation;
#[cfg(test)]
mod tests;
