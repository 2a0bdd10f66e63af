//! The journal: where committed changes go.
//!
//! The ledger never does I/O. Every change it commits (an entity version or
//! a ledger entry) is handed, as a [`Record`], to a [`Journal`] supplied by its
//! owner: the store's group-commit writer in production, [`MemoryJournal`] in
//! tests, [`NullJournal`] in benchmarks.
//!
//! Ordering contract: the ledger assigns each record a sequence number and
//! appends it inside the same critical section that makes the change visible
//! (the wallet lock for entries; before publication for entities). So for any
//! two records where one depends on the other, the dependency has the lower
//! sequence number *and* was appended first. A journal must keep append order
//! when it persists, so that whatever survives a crash is, per wallet, a
//! prefix of what was appended.

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::ledger::entity::{ApiKey, Application, Organization, User};
use crate::ledger::entry::LedgerEntry;

/// A committed change with its sequence number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Monotonic per ledger; ids of entities and entries are taken from it.
    pub seq: u64,
    /// The change.
    pub body: RecordBody,
}

/// The kinds of committed change. Entity variants carry the whole new
/// version of the entity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordBody {
    /// An organization was created or changed.
    Org(Organization),
    /// A user was created or changed.
    User(User),
    /// An application was created or changed.
    App(Application),
    /// A key was created or changed.
    Key(ApiKey),
    /// A balance changed.
    Entry(LedgerEntry),
}

/// Why the journal could not take or persist a record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// The journal was shut down.
    #[error("the journal is closed")]
    Closed,
    /// The storage underneath failed; the journal takes nothing more.
    #[error("the journal failed: {reason}")]
    Failed {
        /// The storage error.
        reason: String,
    },
    /// The storage underneath is failing and being retried: what was taken
    /// is kept and will be written once it works again, but nothing new is
    /// durable until then.
    #[error("the ledger store is unavailable: {reason}")]
    Unavailable {
        /// The storage error.
        reason: String,
    },
}

/// Receives committed records.
pub trait Journal: Send + Sync {
    /// Takes a record. Called inside the ledger's critical sections, so it
    /// must be quick: it may block only for back-pressure. Records must be
    /// persisted in the order they are appended.
    fn append(&self, record: Record) -> Result<(), JournalError>;

    /// Returns once every record this thread appended before the call is
    /// durable.
    fn sync(&self) -> Result<(), JournalError>;

    /// `Err` while the journal cannot make new records durable (its storage
    /// is failing); new work should be refused until it can.
    fn health(&self) -> Result<(), JournalError> {
        Ok(())
    }
}

/// Discards everything (in-memory benchmarks).
#[derive(Debug, Default)]
pub struct NullJournal;

impl Journal for NullJournal {
    fn append(&self, _record: Record) -> Result<(), JournalError> {
        Ok(())
    }

    fn sync(&self) -> Result<(), JournalError> {
        Ok(())
    }
}

/// Keeps every record in memory (tests, and the auditor's input).
#[derive(Debug, Default)]
pub struct MemoryJournal {
    records: Mutex<Vec<Record>>,
}

impl MemoryJournal {
    /// A copy of everything appended so far, in sequence order.
    pub fn records(&self) -> Vec<Record> {
        let mut records = self.records.lock().clone();
        records.sort_by_key(|record| record.seq);
        records
    }
}

impl Journal for MemoryJournal {
    fn append(&self, record: Record) -> Result<(), JournalError> {
        self.records.lock().push(record);
        Ok(())
    }

    fn sync(&self) -> Result<(), JournalError> {
        Ok(())
    }
}

/// Sequences records and hands them to the journal. A journal failure is
/// remembered rather than returned at each call site: the change it failed to
/// record is already visible in memory, so the ledger stops taking new work
/// (fail-stop) and the owner restarts it from the store. A journal that is
/// only `Unavailable` (retrying its storage, keeping every record) is not
/// remembered: new work is refused while it lasts ([`Committer::check_ready`])
/// and resumes after.
pub(crate) struct Committer {
    journal: std::sync::Arc<dyn Journal>,
    next_seq: std::sync::atomic::AtomicU64,
    failure: std::sync::OnceLock<JournalError>,
    /// Set on a cluster follower: its state comes only from the records it
    /// replays, so it makes none of its own (no catch-up grants, no new
    /// work) until it is promoted.
    following: std::sync::atomic::AtomicBool,
}

impl Committer {
    pub fn new(journal: std::sync::Arc<dyn Journal>, next_seq: u64) -> Self {
        Committer {
            journal,
            next_seq: std::sync::atomic::AtomicU64::new(next_seq),
            failure: std::sync::OnceLock::new(),
            following: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether the ledger only follows another's records.
    pub fn following(&self) -> bool {
        self.following.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Starts or stops following.
    pub fn set_following(&self, following: bool) {
        self.following.store(following, std::sync::atomic::Ordering::Release);
    }

    /// The next sequence number. Relaxed is enough: callers assign and
    /// append inside the lock that orders dependent records.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Moves the next sequence number past `seq` (after a replay).
    pub fn skip_past(&self, seq: u64) {
        self.next_seq.fetch_max(seq.saturating_add(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Appends, remembering the first failure.
    pub fn append(&self, record: Record) {
        if let Err(error) = self.journal.append(record) {
            let _first = self.failure.set(error);
        }
    }

    /// Waits until this thread's appends are durable.
    pub fn sync(&self) -> Result<(), JournalError> {
        self.check()?;
        let synced = self.journal.sync();
        if let Err(error) = &synced {
            if !matches!(error, JournalError::Unavailable { .. }) {
                let _first = self.failure.set(error.clone());
            }
        }
        synced
    }

    /// The first journal failure, if any. Work already under way (a settle)
    /// checks this: its record is kept even while the journal retries.
    pub fn check(&self) -> Result<(), JournalError> {
        self.failure.get().map_or(Ok(()), |error| Err(error.clone()))
    }

    /// [`Committer::check`], and also `Err` while the journal cannot make
    /// records durable: new work (a hold, an admin change) checks this.
    pub fn check_ready(&self) -> Result<(), JournalError> {
        self.check()?;
        if self.following() {
            return Err(JournalError::Unavailable {
                reason: "this replica follows the cluster's books and makes no changes itself".into(),
            });
        }
        self.journal.health()
    }
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer")
            .field("next_seq", &self.next_seq)
            .field("failure", &self.failure.get())
            .finish_non_exhaustive()
    }
}
