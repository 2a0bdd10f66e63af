//! Storage: the narrow interface, its sled backend, and the group-commit
//! writer that connects it to the ledger's journal.
//!
//! - `codec`  — the segment layout: a batch of records per stored value
//! - `sled`   — [`SledStore`], segments in one sled tree, in number order
//! - `writer` — [`GroupCommit`], the bounded background writer (a [`crate::ledger::journal::Journal`])
//! - `verify` — [`verify_store`], the offline audit behind `ledger verify`
//! - `watermark` — the checksummed file that says how far the store must
//!   reach and which sequence numbers were handed out
//! - [`checkpoint`] — checkpoint files: the whole ledger state at a sequence
//!   number, so a restart replays only what follows
//! - [`export`] — day files of old records (JSON Lines, gzip) and their
//!   manifests, written before retention prunes them
//! - [`history`] — the background historian: checkpoints and retention,
//!   off the request path
//! - [`compact`] — `ledger compact`: a fresh copy of the store, so pruned
//!   space goes back to the file system
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
//! - **How restart recovers.** [`open_ledger`] loads the newest valid
//!   checkpoint (see [`history`]; a damaged one falls back to the one
//!   before, none means a full replay) and replays every record after it in
//!   the order it was appended (each wallet's entries in sequence order;
//!   across wallets a record can land a moment after a higher-numbered one)
//!   through the same code that applied it live, checking
//!   each entry's `balance_after`; a record that does not fit stops the
//!   start with an error naming it. Grants and write-offs lost in a crash are
//!   simply made again by the first operation on their wallet, because the
//!   ledger derives what is due from the lots it has.
//! - **When storage fails** (a full disk, an I/O error), the writer keeps
//!   every record it could not make durable, reports the store unavailable
//!   (`/readyz` answers 503; new holds and admin writes are refused with 503;
//!   settles of requests already served are kept), and retries: it reopens
//!   the store, writes again only the records the store does not hold, and
//!   resumes once a flush succeeds. Nothing is lost or stored twice unless the
//!   process stops while the store still fails; a shutdown then reports the
//!   failed last flush (the process exits non-zero). A reopen that finds
//!   records an earlier flush made durable gone stops the writer for good
//!   and records the loss in the watermark, so a restart refuses the store
//!   rather than write on over it. Each flush is sled's flush and an
//!   `fdatasync` of its file (sled's own writes survive a process crash,
//!   not a machine's).
//! - **Order and numbering.** The writer stores records in sequence order
//!   (putting back the few that were queued a moment out of order; one
//!   whose thread stalled past `gap_patience_ms` is written past and, when
//!   it comes, put in its place), so a reader paging by sequence number
//!   never skips one; readers serve only up to
//!   [`GroupCommit::durable_through`], which never passes a missing number. Numbers are reserved ahead in the
//!   watermark, and a restart numbers new records above the reservation, so
//!   a number a crash lost is never given to another record.
//! - **Damage.** The store refuses to open (an error, never a panic) when
//!   sled cannot read its files, or when it ends before the durable watermark
//!   written after the last acknowledged admin operation and at shutdown:
//!   acknowledged records were lost, and serving would hide it.
//! - **Back-pressure.** When the queue (`queue_capacity` records) is full, an
//!   append waits for room; the number of such waits is counted. Nothing is
//!   ever dropped.

pub mod checkpoint;
pub mod codec;
pub mod compact;
pub mod export;
pub mod history;
mod sled;
mod verify;
mod watermark;
mod writer;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

pub(crate) use self::sled::open_waiting_for_lock;
pub use self::sled::SledStore;
pub use self::verify::{verify_store, Report};
pub use self::writer::{DurableBatch, GroupCommit, WriterStats};

use crate::ledger::journal::Record;
use crate::ledger::snapshot::LedgerSnapshot;
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
    /// The files are damaged in a way the store cannot read past.
    #[error("the store is damaged: {reason}")]
    Corrupt {
        /// What was found.
        reason: String,
    },
    /// The store ends before a record that was acknowledged as durable.
    #[error(
        "the store ends at record {found_seq}, but record {acknowledged_seq} was acknowledged as durable \
         (watermark {}): its last writes were lost or damaged. Restore the data directory from a \
         backup; remove the watermark only to accept the loss knowingly",
        path.display()
    )]
    BehindWatermark {
        /// The highest sequence number the store holds.
        found_seq: u64,
        /// The highest sequence number acknowledged before the stop.
        acknowledged_seq: u64,
        /// The watermark file.
        path: std::path::PathBuf,
    },
    /// The watermark could not be written.
    #[error("cannot write the durable watermark: {0}")]
    Watermark(#[source] std::io::Error),
    /// The store is being reopened after a failure.
    #[error("the store is reopening after a failure")]
    Reopening,
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

    /// The records with a sequence number above `after`, in the order they
    /// were appended (restart after a checkpoint). Stores that can seek
    /// start there instead of reading everything.
    fn records_after(&self, after: u64) -> Box<dyn Iterator<Item = Result<Record, StoreError>> + '_> {
        Box::new(self.records().filter(move |record| record.as_ref().map_or(true, |r| r.seq > after)))
    }

    /// Every record up to this sequence number may have been removed
    /// ([`Store::prune_through`]); 0 when nothing was.
    fn pruned_through(&self) -> u64 {
        0
    }

    /// Removes records up to `seq` for good (retention, after they were
    /// checkpointed and exported), keeping at least the newest stored
    /// value so the store's end stays known. Returns how many stored values
    /// went. `pause` runs before each batch (a test hook).
    fn prune_through(&self, seq: u64, pause: &dyn Fn()) -> Result<usize, StoreError> {
        let _ = (seq, pause);
        Err(StoreError::Corrupt { reason: "this store cannot prune".into() })
    }

    /// Up to `limit` records with a sequence number above `after`, in order
    /// (paging for the admin API).
    fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Record>, StoreError>;

    /// Records durably that everything flushed so far was acknowledged (a
    /// later open refuses a store that ends before it) and that no sequence
    /// number up to `reserved_seq` may be handed out again.
    fn acknowledge(&self, reserved_seq: u64) -> Result<(), StoreError> {
        let _ = reserved_seq;
        Ok(())
    }

    /// The highest sequence number an earlier run may have handed out
    /// (see [`Store::acknowledge`]).
    fn reserved_seq(&self) -> u64 {
        0
    }

    /// Makes a failed store usable again, if it can be. Returns the sequence
    /// numbers of records it holds beyond the last successful flush (written
    /// before the failure and kept anyway), so the writer writes only the
    /// others again and no record is stored twice.
    fn reopen(&self) -> Result<HashSet<u64>, StoreError> {
        Err(StoreError::Corrupt { reason: "this store cannot be reopened".into() })
    }
}

/// Tunables of the group-commit writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Least time between two flushes; also the most a settle waits in the
    /// queue before its flush starts.
    pub flush_interval_ms: u64,
    /// Records the queue holds before appends wait. The channel allocates
    /// and touches every slot (a record's size, about 320 bytes) up front,
    /// so this is resident memory from the start: 16,384 slots are 5 MB and
    /// about 1.6 s of records at 10k records/s while the writer stalls.
    pub queue_capacity: usize,
    /// Most records written per sled batch.
    pub max_batch: usize,
    /// How long records wait behind a missing sequence number before they
    /// are written anyway. A number is taken and its record queued inside
    /// one critical section, so a gap normally closes within microseconds;
    /// one that does not is a stalled thread (or a bug), and the records
    /// after it must not wait on it. The durable mark readers serve up to
    /// still stops below the missing number until its record comes (the
    /// `store_sequence_gaps_open` gauge counts such numbers); a number that
    /// never comes holds readers back until the next start.
    pub gap_patience_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { flush_interval_ms: 5, queue_capacity: 16_384, max_batch: 8_192, gap_patience_ms: 200 }
    }
}

/// A ledger rebuilt from a store, with the writer that persists it.
#[derive(Debug)]
pub struct OpenLedger<S: Store> {
    /// The ledger; share it with the proxy and the admin API.
    pub ledger: Arc<Ledger>,
    /// The writer; call [`GroupCommit::shutdown`] after the last operation.
    pub writer: Arc<GroupCommit<S>>,
    /// The checkpoint the ledger started from (`None`: a full replay); the
    /// background historian continues from it.
    pub checkpoint: Option<LedgerSnapshot>,
    /// Newer checkpoints that were damaged and skipped, one line each.
    pub skipped_checkpoints: Vec<String>,
}

/// Opens (or creates) the sled store in `dir` and rebuilds the ledger from
/// its newest valid checkpoint (in `dir/checkpoints`) and the records after
/// it; with no valid checkpoint, from every record.
pub fn open_ledger(
    dir: &Path,
    ledger_config: LedgerConfig,
    store_config: StoreConfig,
) -> Result<OpenLedger<SledStore>, StoreError> {
    let store = SledStore::open(dir)?;
    let (snapshot, skipped) = checkpoint::load_newest(&checkpoint::dir_of(dir))
        .map_err(|error| StoreError::Corrupt { reason: error.to_string() })?;
    let mut opened = open_ledger_from(store, snapshot, ledger_config, store_config)?;
    opened.skipped_checkpoints = skipped;
    Ok(opened)
}

/// Rebuilds the ledger from any store and starts its writer.
pub fn open_ledger_on<S: Store>(
    store: S,
    ledger_config: LedgerConfig,
    store_config: StoreConfig,
) -> Result<OpenLedger<S>, StoreError> {
    open_ledger_from(store, None, ledger_config, store_config)
}

/// Rebuilds the ledger from `snapshot` (if any) and the store's records
/// after it, and starts the writer. Refuses a start that would skip
/// records: the store pruned records the snapshot does not cover.
pub fn open_ledger_from<S: Store>(
    store: S,
    snapshot: Option<LedgerSnapshot>,
    ledger_config: LedgerConfig,
    store_config: StoreConfig,
) -> Result<OpenLedger<S>, StoreError> {
    let covered = snapshot.as_ref().map_or(0, |snapshot| snapshot.seq);
    let pruned = store.pruned_through();
    if pruned > covered {
        return Err(StoreError::Corrupt {
            reason: format!(
                "records up to {pruned} were pruned after export, but the newest valid checkpoint covers \
                 only {covered}: restore a checkpoint covering {pruned} into the checkpoints directory \
                 (from a backup), or rebuild the store from the exports"
            ),
        });
    }
    let store = Arc::new(store);
    // Replay appends nothing, so the writer can start first and be handed
    // to the ledger as its journal.
    let writer = Arc::new(GroupCommit::start(Arc::clone(&store), store_config)?);
    let mut failure = None;
    let mut highest = covered;
    let records = store
        .records_after(covered)
        .map_while(|record| record.map_err(|error| failure = Some(error)).ok())
        .inspect(|record| highest = highest.max(record.seq));
    let replayed = Ledger::restore_from(ledger_config, writer.clone(), snapshot.as_ref(), records);
    if let Some(error) = failure {
        return Err(error);
    }
    let ledger = replayed?;
    // New numbers start above everything stored and everything an earlier
    // run reserved, so a number a crash lost is never used for another record.
    let begins_after = highest.max(store.reserved_seq());
    ledger.skip_ids_through(begins_after);
    writer.begin_after(begins_after)?;
    if let Some(snapshot) = &snapshot {
        tracing::info!(checkpoint_seq = snapshot.seq, through = highest, "ledger restored from a checkpoint");
    }
    Ok(OpenLedger { ledger: Arc::new(ledger), writer, checkpoint: snapshot, skipped_checkpoints: Vec::new() })
}

#[cfg(test)]
mod simulation;
#[cfg(test)]
mod tests;
