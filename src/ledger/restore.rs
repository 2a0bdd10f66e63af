//! Rebuilding a ledger from its records.
//!
//! Records are applied in sequence order by the same `apply_*` functions the
//! live operations use; entries are replayed onto their wallet's lots (a
//! created lot, or the exact draws recorded), and each replayed entry's
//! `balance_after` is checked. Nothing is granted, written off or voided
//! during replay: the first operation on each wallet (or a
//! [`Ledger::tick`]) catches it up to its `now`. Holds do not survive a
//! restart; they lived only in memory.

use std::sync::Arc;

use crate::ledger::ids::WalletId;
use crate::ledger::journal::{Journal, Record, RecordBody};
use crate::ledger::wallet::ReplayMismatch;
use crate::ledger::{Ledger, LedgerConfig};

/// Why records could not be replayed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// Records arrived out of sequence order.
    #[error("record {seq} arrived after record {previous}")]
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
    /// A ledger rebuilt from `records` (in sequence order), writing new
    /// records to `journal`.
    pub fn restore(
        config: LedgerConfig,
        journal: Arc<dyn Journal>,
        records: impl IntoIterator<Item = Record>,
    ) -> Result<Ledger, RestoreError> {
        let ledger = Ledger::new(config, journal);
        let mut previous = 0;
        for record in records {
            if record.seq <= previous {
                return Err(RestoreError::OutOfOrder { seq: record.seq, previous });
            }
            previous = record.seq;
            ledger.replay(record)?;
        }
        ledger.shared.committer.skip_past(previous);
        Ok(ledger)
    }

    fn replay(&self, record: Record) -> Result<(), RestoreError> {
        match record.body {
            RecordBody::Org(org) => self.apply_org(&org),
            RecordBody::User(user) => self.apply_user(&user),
            RecordBody::App(app) => self.apply_app(&app),
            RecordBody::Key(key) => self.apply_key(&key),
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
