//! The treasurer's journal: the ledger's records go to the shared log.
//!
//! [`LogJournal`] is the cluster counterpart of the store's group-commit
//! writer. The ledger appends records inside its critical sections; a
//! background thread appends them to `cg_log` in batches, in that order,
//! fenced by the treasury epoch; [`Journal::sync`] returns once everything
//! appended before it is committed there, so an admin change is
//! acknowledged only once every replica can read it.
//!
//! - While the database cannot be reached the records are kept and retried,
//!   and [`Journal::health`] reports the journal unavailable (new work gets
//!   503), exactly as the store writer does for a failing disk.
//! - Once the epoch is over (another replica took the treasury), nothing
//!   more can be appended: the journal fails for good and the ledger stops
//!   taking work, because it holds records the log will never have. The
//!   replica must be restarted, and then follows the new treasurer.
//! - Until a replica is promoted it has no epoch, and an append fails: a
//!   follower's ledger makes no records (see `Committer::following`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use rust_decimal::Decimal;

use chrono::{DateTime, Utc};

use crate::ledger::entry::{EntryKind, LedgerEntry};
use crate::ledger::ids::RequestId;
use crate::ledger::journal::{Journal, JournalError, Record, RecordBody};
use crate::ledger::lot::LotTouch;
use crate::store::codec;

use super::books::Books;
use super::ClusterError;

/// The appender's own connections: one appends, one spare for a retry.
const JOURNAL_CONNECTIONS: usize = 2;
/// Records sent to the log in one statement at most.
const BATCH: usize = 2_000;
/// How long a record nobody syncs may wait for more. Records are appended
/// when someone syncs (an admin change, the end of a posting round), a
/// batch fills, the journal closes, or the first queued has waited this
/// long; records queued while a [`Gathering`] is open wait for the sync
/// (unless older records go first and take them along). So a posting
/// round, a record per debit, goes to the log in one append, where it went
/// in as many as the appender happened to wake for (about two a round
/// under load, three to five for 1,500 debits in a test).
const LINGER: Duration = Duration::from_millis(20);
/// First wait before retrying an append the database refused or missed.
const RETRY_FIRST: Duration = Duration::from_millis(50);
/// Longest wait between retries.
const RETRY_MAX: Duration = Duration::from_secs(1);

/// The treasurer's journal, appending to the shared log.
#[derive(Clone)]
pub struct LogJournal {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Wakes the appender (records queued) and syncers (records committed).
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// Who appends, once promoted.
    writer: Option<Writer>,
    queue: Vec<Queued>,
    /// The shipped debits being posted, by request: each one's number in
    /// the posting order (`cg_debits.post_seq`), which its record carries
    /// to the log (see [`LogJournal::will_post`]).
    posting: HashMap<RequestId, i64>,
    /// When the oldest record in the queue was queued.
    oldest_queued: Option<Instant>,
    /// Records ever queued, and ever committed to the log.
    queued: u64,
    committed: u64,
    /// The most records a sync is waiting to see committed.
    sync_wanted: u64,
    /// Open [`Gathering`]s, and how many records were queued when the
    /// first of them opened: records queued since wait for a sync.
    gathering: usize,
    gathered_after: u64,
    /// Set for good: the epoch is over, or a record cannot be encoded.
    failed: Option<JournalError>,
    /// The last append's error while it is being retried.
    retrying: Option<String>,
    closed: bool,
}

/// A record waiting for the log, with the number of the shipped debit it
/// posts, if it posts one.
#[derive(Clone)]
struct Queued {
    record: Record,
    post: Option<i64>,
}

#[derive(Clone)]
struct Writer {
    replica: String,
    epoch: i64,
}

impl std::fmt::Debug for LogJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.inner.state.lock();
        f.debug_struct("LogJournal")
            .field("epoch", &state.writer.as_ref().map(|writer| writer.epoch))
            .field("queued", &state.queued)
            .field("committed", &state.committed)
            .finish_non_exhaustive()
    }
}

impl Default for LogJournal {
    fn default() -> Self {
        LogJournal { inner: Arc::new(Inner { state: Mutex::new(State::default()), changed: Condvar::new() }) }
    }
}

impl LogJournal {
    /// A journal that takes no records until [`LogJournal::start`].
    pub fn new() -> LogJournal {
        LogJournal::default()
    }

    /// Starts appending as `replica`, treasurer of `epoch`, on a thread of
    /// its own (so a sync may block any thread, as with the store writer).
    pub fn start(&self, books: Books, replica: String, epoch: i64) -> Result<(), ClusterError> {
        // Connections of its own: the appender's runtime blocks its thread
        // while it waits for records, and a connection it opened in a
        // shared pool would stall whoever drew it meanwhile (a report, a
        // lease draw, the treasury's renewal) until the next record.
        let books = books.with_own_pool(JOURNAL_CONNECTIONS)?;
        self.inner.state.lock().writer = Some(Writer { replica, epoch });
        let inner = Arc::clone(&self.inner);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| ClusterError::Config(format!("log journal runtime: {err}")))?;
        std::thread::Builder::new()
            .name("creditgate-log-journal".into())
            .spawn(move || {
                let appending =
                    std::panic::AssertUnwindSafe(|| runtime.block_on(append_loop(inner.clone(), books)));
                if std::panic::catch_unwind(appending).is_err() {
                    // A sync waiting on the appender would wait forever, and
                    // the replica would go on as treasurer posting nothing:
                    // failed for good, the node restarts it.
                    let reason = "the log journal's appender panicked".to_owned();
                    tracing::error!(%reason, "the treasurer's records it had not appended are lost");
                    inner.state.lock().failed.get_or_insert(JournalError::Failed { reason });
                    inner.changed.notify_all();
                }
            })
            .map_err(|err| ClusterError::Config(format!("log journal thread: {err}")))?;
        Ok(())
    }

    /// Stops the appender once the queue is empty (or for good has failed).
    pub fn close(&self) {
        self.inner.state.lock().closed = true;
        self.inner.changed.notify_all();
    }

    /// Until the returned guard is dropped, records queued from now on wait
    /// for the next sync (or a full batch), however long that takes: for
    /// records made in one go and then synced, such as a posting round.
    /// Records queued before it keep their own wait, and when they go they
    /// take what is queued behind them.
    pub fn gather(&self) -> Gathering {
        let mut state = self.inner.state.lock();
        if state.gathering == 0 {
            state.gathered_after = state.queued;
        }
        state.gathering += 1;
        Gathering { inner: Arc::clone(&self.inner) }
    }

    /// The next debit record for `request` posts the shipped debit numbered
    /// `post_seq`: the append that logs it moves the posting mark past it,
    /// in the same transaction. For the posting round, before it posts.
    pub fn will_post(&self, request: RequestId, post_seq: i64) {
        self.inner.state.lock().posting.insert(request, post_seq);
    }

    /// Forgets the numbers of debits the round did not post (refused, cut
    /// short, or settled already): their records were never made. Whether
    /// there were any.
    pub fn posting_round_over(&self) -> bool {
        let mut state = self.inner.state.lock();
        let unrecorded = !state.posting.is_empty();
        state.posting.clear();
        unrecorded
    }

    /// Waits up to `limit` for every record queued so far to reach the log;
    /// whether they did. Blocks the thread. For a treasurer stepping down:
    /// once it gives up its term, a new treasurer fences off its appends.
    pub fn drain_within(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut state = self.inner.state.lock();
        let target = state.queued;
        if target > state.sync_wanted {
            state.sync_wanted = target;
            self.inner.changed.notify_all();
        }
        while state.committed < target && state.failed.is_none() {
            if self.inner.changed.wait_until(&mut state, deadline).timed_out() {
                break;
            }
        }
        state.committed >= target
    }

    /// Why the journal stopped for good (its epoch is over, or a record
    /// could not be encoded), if it did.
    pub fn failure(&self) -> Option<String> {
        self.inner.state.lock().failed.as_ref().map(ToString::to_string)
    }

    /// Records committed to the log so far.
    pub fn committed(&self) -> u64 {
        self.inner.state.lock().committed
    }
}

impl Journal for LogJournal {
    fn append(&self, record: Record) -> Result<(), JournalError> {
        let mut state = self.inner.state.lock();
        if let Some(failed) = &state.failed {
            return Err(failed.clone());
        }
        if state.writer.is_none() || state.closed {
            return Err(JournalError::Failed {
                reason: "this replica is not the cluster's treasurer and cannot make records".into(),
            });
        }
        let post = match &record.body {
            RecordBody::Entry(LedgerEntry { kind: EntryKind::Debit(debit), .. }) => {
                state.posting.remove(&debit.request_id)
            }
            _ => None,
        };
        state.queue.push(Queued { record, post });
        state.queued += 1;
        // The appender needs telling only when it has a new wait to start
        // (the queue was empty) or a batch to take; not once per record.
        let wake = state.oldest_queued.is_none() || state.queue.len() == BATCH;
        state.oldest_queued.get_or_insert_with(Instant::now);
        drop(state);
        if wake {
            self.inner.changed.notify_all();
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), JournalError> {
        let mut state = self.inner.state.lock();
        let target = state.queued;
        if target > state.sync_wanted {
            state.sync_wanted = target;
            self.inner.changed.notify_all();
        }
        loop {
            if let Some(failed) = &state.failed {
                return Err(failed.clone());
            }
            if state.committed >= target {
                return Ok(());
            }
            self.inner.changed.wait(&mut state);
        }
    }

    fn health(&self) -> Result<(), JournalError> {
        let state = self.inner.state.lock();
        if let Some(failed) = &state.failed {
            return Err(failed.clone());
        }
        match &state.retrying {
            Some(reason) => Err(JournalError::Unavailable { reason: reason.clone() }),
            None => Ok(()),
        }
    }
}

async fn append_loop(inner: Arc<Inner>, books: Books) {
    let mut retry = RETRY_FIRST;
    loop {
        let (batch, writer) = {
            let mut state = inner.state.lock();
            loop {
                if state.failed.is_some() || (state.closed && state.queue.is_empty()) {
                    return;
                }
                let Some(oldest) = state.oldest_queued else {
                    inner.changed.wait(&mut state);
                    continue;
                };
                let wanted =
                    state.sync_wanted > state.committed || state.queue.len() >= BATCH || state.closed;
                if wanted {
                    break;
                }
                // Records from before the gathering, or a failed append to
                // retry, keep the timed wait.
                let gathered_only = state.committed >= state.gathered_after;
                if state.gathering > 0 && gathered_only && state.retrying.is_none() {
                    inner.changed.wait(&mut state);
                    continue;
                }
                let left = LINGER.saturating_sub(oldest.elapsed());
                if left.is_zero() {
                    break;
                }
                inner.changed.wait_for(&mut state, left);
            }
            let take = state.queue.len().min(BATCH);
            let Some(writer) = state.writer.clone() else { return };
            (state.queue[..take].to_vec(), writer)
        };
        let outcome = match encode(&batch) {
            Ok(appended) => books.append_books(writer.epoch, &writer.replica, &appended).await,
            Err(reason) => Err(ClusterError::Schema(reason)),
        };
        let waiting = {
            let mut state = inner.state.lock();
            match outcome {
                Ok(()) => {
                    state.queue.drain(..batch.len());
                    // What is left keeps the oldest taken's time: outside a
                    // gathering it goes at once.
                    if state.queue.is_empty() {
                        state.oldest_queued = None;
                    }
                    state.committed += batch.len() as u64;
                    state.retrying = None;
                    retry = RETRY_FIRST;
                }
                Err(err @ (ClusterError::Fenced(_) | ClusterError::Schema(_))) => {
                    tracing::error!(error = %err, "the treasurer's journal stops: its records cannot reach the log");
                    state.failed = Some(JournalError::Failed { reason: err.to_string() });
                }
                Err(err) => {
                    if state.retrying.is_none() {
                        tracing::warn!(error = %err, "cannot append to the cluster log; retrying");
                    }
                    state.retrying = Some(err.to_string());
                }
            }
            state.retrying.is_some()
        };
        inner.changed.notify_all();
        if waiting {
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(RETRY_MAX);
        }
    }
}

/// See [`LogJournal::gather`].
#[must_use = "records gather only while the guard is held"]
pub struct Gathering {
    inner: Arc<Inner>,
}

impl Drop for Gathering {
    fn drop(&mut self) {
        self.inner.state.lock().gathering -= 1;
        self.inner.changed.notify_all();
    }
}

/// A record on its way to the log, with what it does to the shared books.
#[derive(Debug)]
pub struct Appended {
    /// The treasurer's sequence number for it.
    pub origin: i64,
    /// The record, as a one-record segment.
    pub body: Vec<u8>,
    /// A credit or write-off: wallet, org and signed amount.
    pub funding: Option<(String, i64, Decimal)>,
    /// A posted shipped debit: its number in the posting order.
    pub posts: Option<i64>,
    /// What it does to the wallet's lots (see [`LotMove`]).
    pub lots: Vec<LotMove>,
}

/// A record's effect on one lot, as `cg_lots` keeps them (migration 9).
#[derive(Debug)]
pub struct LotMove {
    pub wallet: String,
    pub lot: i64,
    /// Set when the record creates the lot: its expiry.
    pub expires_at: Option<DateTime<Utc>>,
    /// The created lot's remainder, or the signed amount taken from it.
    pub delta: Decimal,
}

/// Each record as its own one-record segment (the store's encoding, so the
/// log and the sled store read back through one decoder), with its effect
/// on the shared books: debits were taken off when they shipped; every
/// other balance change moves what replicas may lease.
fn encode(queued: &[Queued]) -> Result<Vec<Appended>, String> {
    queued
        .iter()
        .map(|Queued { record, post }| {
            let mut body = Vec::new();
            codec::encode_segment(std::slice::from_ref(record), usize::MAX, &mut body)
                .map_err(|err| format!("record {} cannot be encoded: {err}", record.seq))?;
            let origin =
                i64::try_from(record.seq).map_err(|_| format!("record {} is out of range", record.seq))?;
            let (mut funding, mut lots) = (None, Vec::new());
            if let RecordBody::Entry(entry) = &record.body {
                lots = lot_moves(entry).map_err(|err| format!("record {}: {err}", record.seq))?;
                match &entry.kind {
                    EntryKind::Debit(_) => {}
                    _ if entry.amount.is_zero() => {}
                    _ => {
                        let org = i64::try_from(entry.org.0)
                            .map_err(|_| format!("record {}: org out of range", record.seq))?;
                        funding = Some((entry.wallet.to_string(), org, entry.amount));
                    }
                }
            }
            Ok(Appended { origin, body, funding, posts: *post, lots })
        })
        .collect()
}

/// An entry's lot moves: a created lot with its expiry and what is left of
/// it (a credit first repays a deficit, and a wallet in deficit has no
/// credit left in any lot, so what is left is the balance after, up to the
/// amount); otherwise each lot touched, taken from.
fn lot_moves(entry: &LedgerEntry) -> Result<Vec<LotMove>, String> {
    let wallet = entry.wallet.to_string();
    let lot_id = |touch: &LotTouch| i64::try_from(touch.lot.0).map_err(|_| "lot out of range".to_owned());
    if let Some((_, expires_at)) = entry.kind.created_lot() {
        let Some(touch) = entry.lots.first() else { return Ok(Vec::new()) };
        let left = entry.amount.min(entry.balance_after.max(Decimal::ZERO));
        return Ok(vec![LotMove { wallet, lot: lot_id(touch)?, expires_at: Some(expires_at), delta: left }]);
    }
    entry
        .lots
        .iter()
        .map(|touch| {
            Ok(LotMove {
                wallet: wallet.clone(),
                lot: lot_id(touch)?,
                expires_at: None,
                delta: -touch.amount,
            })
        })
        .collect()
}

/// The record in a log body.
pub fn decode(gseq: i64, body: &[u8]) -> Result<Record, ClusterError> {
    let mut records = codec::decode_value(body)
        .map_err(|err| ClusterError::Schema(format!("log record {gseq} cannot be decoded: {err}")))?;
    match (records.pop(), records.is_empty()) {
        (Some(record), true) => Ok(record),
        _ => Err(ClusterError::Schema(format!("log record {gseq} does not hold exactly one record"))),
    }
}
