//! Rebuilding a ledger from its records.
//!
//! Records are applied in the order they were appended, by the same
//! `apply_*` functions the live operations use. Append order is a valid
//! replay order (see [`crate::ledger::journal`]): a record's dependencies
//! were appended before it, and each wallet's entries were appended under
//! its lock, in sequence order. Across wallets a record may be appended a
//! moment after one with a higher number, so only per-wallet order is
//! checked. Entries are replayed onto their wallet's lots (a created lot, or
//! the exact draws recorded), and each replayed entry's `balance_after` is
//! checked. Nothing is granted, written off or voided
//! during replay: the first operation on each wallet (or a
//! [`Ledger::tick`]) catches it up to its `now`. Holds do not survive a
//! restart; they lived only in memory.

use std::collections::HashMap;
use std::sync::Arc;

use crate::ledger::ids::WalletId;
use crate::ledger::journal::{Journal, Record, RecordBody};
use crate::ledger::snapshot::LedgerSnapshot;
use crate::ledger::wallet::ReplayMismatch;
use crate::ledger::{Ledger, LedgerConfig};

/// Why records could not be replayed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// A wallet's entries arrived out of sequence order (or one twice).
    #[error("record {seq} arrived after record {previous} of the same wallet")]
    OutOfOrder {
        /// The record.
        seq: u64,
        /// The one before it.
        previous: u64,
    },
    /// An entry names a wallet no earlier record created.
    #[error("record {seq} names wallet {wallet}, which no earlier record created")]
    UnknownWallet {
        /// The record.
        seq: u64,
        /// The wallet.
        wallet: WalletId,
    },
    /// An entry does not fit its wallet.
    #[error(transparent)]
    Mismatch(#[from] ReplayMismatch),
}

impl Ledger {
    /// A ledger rebuilt from `records` (in append order), writing new
    /// records to `journal`.
    pub fn restore(
        config: LedgerConfig,
        journal: Arc<dyn Journal>,
        records: impl IntoIterator<Item = Record>,
    ) -> Result<Ledger, RestoreError> {
        Ledger::restore_from(config, journal, None, records)
    }

    /// A ledger rebuilt from a checkpoint's `snapshot` (when there is one)
    /// and the `records` after it, in append order. Records the snapshot
    /// already covers are skipped.
    pub fn restore_from(
        config: LedgerConfig,
        journal: Arc<dyn Journal>,
        snapshot: Option<&LedgerSnapshot>,
        records: impl IntoIterator<Item = Record>,
    ) -> Result<Ledger, RestoreError> {
        let (ledger, mut replayer) = match snapshot {
            Some(snapshot) => {
                (Ledger::from_snapshot(config, journal, snapshot)?, Replayer::after(snapshot.seq))
            }
            None => (Ledger::new(config, journal), Replayer::default()),
        };
        for record in records {
            replayer.apply(&ledger, record)?;
        }
        Ok(ledger)
    }

    /// Hands out new sequence numbers only above `seq`: numbers an earlier
    /// run reserved (and may have used for records a crash lost) are never
    /// used twice.
    pub fn skip_ids_through(&self, seq: u64) {
        self.shared.committer.skip_past(seq);
    }

    /// Applies one record another ledger made (a cluster follower replaying
    /// the shared log, in its order), numbering its own records above it.
    pub fn apply_replicated(&self, record: Record) -> Result<(), RestoreError> {
        let seq = record.seq;
        self.replay(record)?;
        self.shared.committer.skip_past(seq);
        Ok(())
    }

    /// Makes the ledger a follower (no records of its own, no new work) or,
    /// once it has replayed everything, the writer again.
    pub fn set_following(&self, following: bool) {
        self.shared.committer.set_following(following);
    }

    /// Whether the ledger is a follower.
    pub fn following(&self) -> bool {
        self.shared.committer.following()
    }

    pub(crate) fn replay(&self, record: Record) -> Result<(), RestoreError> {
        match record.body {
            RecordBody::Org(org) => self.apply_org(&org),
            RecordBody::User(user) => self.apply_user(&user, record.seq),
            RecordBody::App(app) => self.apply_app(&app, record.seq),
            RecordBody::Key(key) => self.apply_key(&key, record.seq),
            RecordBody::Entry(entry) => {
                let cell = self
                    .cell(entry.wallet)
                    .ok_or(RestoreError::UnknownWallet { seq: record.seq, wallet: entry.wallet })?;
                cell.state.lock().replay(&entry)?;
                self.remember_funding(&entry);
            }
        }
        Ok(())
    }
}

/// Applies records in append order, checking each wallet's entries arrive
/// in sequence order; skips what an earlier state already covers.
#[derive(Debug, Default)]
pub struct Replayer {
    /// Records up to this one are in the state already.
    covered: u64,
    last_of_wallet: HashMap<WalletId, u64>,
}

impl Replayer {
    /// A replayer for a state that covers every record up to `seq`.
    pub fn after(seq: u64) -> Replayer {
        Replayer { covered: seq, last_of_wallet: HashMap::new() }
    }

    /// Applies one record to `ledger` (unless already covered), moving its
    /// numbering past it.
    pub fn apply(&mut self, ledger: &Ledger, record: Record) -> Result<(), RestoreError> {
        if record.seq <= self.covered {
            return Ok(());
        }
        if let RecordBody::Entry(entry) = &record.body {
            let previous = self.last_of_wallet.entry(entry.wallet).or_insert(0);
            if record.seq <= *previous {
                return Err(RestoreError::OutOfOrder { seq: record.seq, previous: *previous });
            }
            *previous = record.seq;
        }
        let seq = record.seq;
        ledger.replay(record)?;
        ledger.shared.committer.skip_past(seq);
        Ok(())
    }
}
