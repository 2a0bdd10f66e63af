//! The group-commit writer: a bounded queue and one thread that batches
//! records into the store, in sequence order, and flushes at most once per
//! interval. When the store fails it keeps what it could not write, retries,
//! and resumes once writes succeed again.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::ledger::journal::{Journal, JournalError, Record};
use crate::store::{Store, StoreConfig, StoreError};

enum Message {
    /// Boxed, so the queue's slots (all allocated up front) are small: an
    /// allocation a record (about 300 instructions) against 5 MB resident
    /// from the start (bench/README.md).
    Record(Box<Record>),
    /// Answered after the flush that covers everything queued before it.
    Barrier(SyncSender<Result<(), JournalError>>),
    /// Flush, answer, stop.
    Shutdown(SyncSender<Result<(), JournalError>>),
}

/// First and longest pause between two attempts to recover a failed store.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MOST: Duration = Duration::from_secs(2);
/// Attempts to recover a failed store once shutdown was asked for, before
/// giving up and reporting the last flush as failed.
const RETRIES_AT_SHUTDOWN: u32 = 3;

/// Counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Records the writer has taken off its queue.
    pub appended: u64,
    /// Appends that found the queue full and waited.
    pub waited_for_room: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Records written by completed flushes.
    pub written: u64,
    /// Time spent in flushes (fsync), in microseconds.
    pub flush_micros: u64,
    /// Failed writes or flushes (each one retried).
    pub store_failures: u64,
    /// Records that came after the writer had written past their number
    /// (their gap outlasted `gap_patience_ms`): stored late, at their
    /// number's place in the store.
    pub written_out_of_order: u64,
    /// Numbers the writer wrote past whose records have not come yet: the
    /// durable mark readers serve up to stops below the lowest of them.
    pub sequence_gaps_open: u64,
}

#[derive(Debug, Default)]
struct Counters {
    appended: AtomicU64,
    waited_for_room: AtomicU64,
    flushes: AtomicU64,
    written: AtomicU64,
    flush_micros: AtomicU64,
    store_failures: AtomicU64,
    written_out_of_order: AtomicU64,
    sequence_gaps_open: AtomicU64,
}

/// State the writer thread shares with its handle.
#[derive(Debug, Default)]
struct Shared {
    counters: Counters,
    /// A failure retrying cannot mend (a record that cannot be encoded):
    /// from then on the journal takes nothing.
    failure: OnceLock<JournalError>,
    /// While set, the store is failing and the writer retries; nothing is
    /// lost, but nothing new becomes durable either.
    trouble: Mutex<Option<String>>,
    /// Whether `trouble` is set: every hold checks this, so it must not
    /// take a lock all request threads share.
    troubled: AtomicBool,
    /// The ledger hands out sequence numbers after this one (set once the
    /// ledger is restored; everything up to it is already stored).
    begins_after: AtomicU64,
    /// Every record with a sequence number up to this one is durable.
    durable_through: AtomicU64,
    /// Where each flushed batch goes, in sequence order, so the historian
    /// need not read it back from the store (see [`GroupCommit::hand_durable_to`]).
    durable_to: OnceLock<SyncSender<DurableBatch>>,
}

/// Records one flush made durable, as handed to the historian, with the
/// durable mark that flush set: the receiver catches up to `through` from
/// this batch and the earlier ones, and reads from the store only what they
/// miss (a dropped batch, records a retry found already stored).
#[derive(Debug)]
pub struct DurableBatch {
    pub through: u64,
    pub records: Vec<Record>,
}

impl Shared {
    fn health(&self) -> Result<(), JournalError> {
        if let Some(error) = self.failure.get() {
            return Err(error.clone());
        }
        if !self.troubled.load(Ordering::Acquire) {
            return Ok(());
        }
        match &*self.trouble.lock() {
            Some(reason) => Err(JournalError::Unavailable { reason: reason.clone() }),
            None => Ok(()),
        }
    }

    fn set_trouble(&self, trouble: Option<String>) {
        let mut current = self.trouble.lock();
        self.troubled.store(trouble.is_some(), Ordering::Release);
        *current = trouble;
    }
}

/// The journal the ledger writes to in production.
pub struct GroupCommit<S: Store> {
    queue: SyncSender<Message>,
    /// See [`reserve_ahead`].
    reserve_ahead: u64,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    store: Arc<S>,
}

impl<S: Store> std::fmt::Debug for GroupCommit<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("stats", &self.stats())
            .field("health", &self.shared.health())
            .finish_non_exhaustive()
    }
}

impl<S: Store> GroupCommit<S> {
    /// Starts the writer thread over `store`.
    pub fn start(store: Arc<S>, config: StoreConfig) -> Result<Self, StoreError> {
        let (queue, receiver) = mpsc::sync_channel(config.queue_capacity.max(1));
        let shared = Arc::new(Shared::default());
        let worker = Worker {
            store: Arc::clone(&store),
            receiver,
            interval: Duration::from_millis(config.flush_interval_ms),
            max_batch: config.max_batch.max(1),
            max_unflushed: config.queue_capacity.max(config.max_batch).max(1),
            reserve_ahead: reserve_ahead(config.queue_capacity),
            gap_patience: Duration::from_millis(config.gap_patience_ms),
            shared: Arc::clone(&shared),
        };
        let failed = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || {
                // A writer that died (a bug) must not leave the journal
                // looking healthy: every hold would be refused as closed
                // while readiness said 200. It fails for good instead.
                // (`FailOnUnwind` has marked it already, before the waiters
                // were woken; this covers a panic outside a group.)
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run())).is_err() {
                    tracing::error!(reason = WRITER_PANICKED, "records it had not written are lost");
                    let _first = failed.failure.set(JournalError::Failed { reason: WRITER_PANICKED.into() });
                }
            })
            .map_err(StoreError::Spawn)?;
        let reserve_ahead = reserve_ahead(config.queue_capacity);
        Ok(GroupCommit { queue, reserve_ahead, shared, thread: Mutex::new(Some(thread)), store })
    }

    /// Tells the writer where the ledger's numbering resumes: every record
    /// up to `seq` is already stored, and new ones are numbered after it.
    /// Call once, after the restore and before the first append.
    ///
    /// Reserves numbers ahead at once, so a crash before the first flush
    /// cannot lose numbers the next run would hand out again.
    pub fn begin_after(&self, seq: u64) -> Result<(), StoreError> {
        self.store.acknowledge(seq.saturating_add(self.reserve_ahead))?;
        self.shared.begins_after.store(seq, Ordering::SeqCst);
        self.shared.durable_through.store(seq, Ordering::SeqCst);
        Ok(())
    }

    /// Every record numbered up to this is durable, and no record with a
    /// lower number will be stored later: readers may serve up to here.
    pub fn durable_through(&self) -> u64 {
        self.shared.durable_through.load(Ordering::Acquire)
    }

    /// `Err` while the store is failing (the writer is retrying) or after a
    /// failure it cannot mend.
    pub fn health(&self) -> Result<(), JournalError> {
        self.shared.health()
    }

    /// Up to `limit` durable records numbered above `after`, in order. Only
    /// up to [`GroupCommit::durable_through`]: a reader resuming after the
    /// last number it saw gets every record exactly once, however records
    /// are appended meanwhile.
    pub fn read_durable_after(&self, after: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        self.read_durable_between(after, u64::MAX, limit)
    }

    /// As [`GroupCommit::read_durable_after`], but no record above `through`.
    pub fn read_durable_between(
        &self,
        after: u64,
        through: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let durable = self.durable_through().min(through);
        if after >= durable {
            return Ok(Vec::new());
        }
        let wanted = usize::try_from(durable - after).unwrap_or(usize::MAX).min(limit);
        let mut records = self.store.read_after(after, wanted)?;
        records.retain(|record| record.seq <= durable);
        Ok(records)
    }

    /// After each flush, hands the records it made durable to `to`, in
    /// sequence order (set once; later calls are ignored). A batch that
    /// does not fit is dropped, never waited for: the receiver must read
    /// what it missed from the store, up to the mark of the newest batch it
    /// has, and use no record above a batch's own mark.
    pub fn hand_durable_to(&self, to: SyncSender<DurableBatch>) {
        let _ = self.shared.durable_to.set(to);
    }

    /// The store underneath (for paging reads).
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Counters for metrics.
    pub fn stats(&self) -> WriterStats {
        let counters = &self.shared.counters;
        WriterStats {
            appended: counters.appended.load(Ordering::Relaxed),
            waited_for_room: counters.waited_for_room.load(Ordering::Relaxed),
            flushes: counters.flushes.load(Ordering::Relaxed),
            written: counters.written.load(Ordering::Relaxed),
            flush_micros: counters.flush_micros.load(Ordering::Relaxed),
            store_failures: counters.store_failures.load(Ordering::Relaxed),
            written_out_of_order: counters.written_out_of_order.load(Ordering::Relaxed),
            sequence_gaps_open: counters.sequence_gaps_open.load(Ordering::Relaxed),
        }
    }

    /// Flushes everything queued and stops the thread. Appends after this
    /// fail with [`JournalError::Closed`]. Safe to call more than once; an
    /// `Err` means records were left unwritten.
    pub fn shutdown(&self) -> Result<(), JournalError> {
        let Some(thread) = self.thread.lock().take() else {
            return Ok(());
        };
        let (answer, answered) = mpsc::sync_channel(1);
        let result = match self.queue.send(Message::Shutdown(answer)) {
            Ok(()) => answered.recv().unwrap_or(Err(JournalError::Closed)),
            Err(_) => Err(JournalError::Closed),
        };
        if thread.join().is_err() {
            return Err(JournalError::Failed { reason: "the writer thread panicked".into() });
        }
        // A writer that panicked earlier answered nothing: say why.
        result.map_err(|error| self.shared.failure.get().cloned().unwrap_or(error))
    }

    fn send(&self, message: Message) -> Result<(), JournalError> {
        match self.queue.try_send(message) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(message)) => {
                self.shared.counters.waited_for_room.fetch_add(1, Ordering::Relaxed);
                self.queue.send(message).map_err(|_| self.closed())
            }
            Err(TrySendError::Disconnected(_)) => Err(self.closed()),
        }
    }

    fn closed(&self) -> JournalError {
        self.shared.failure.get().cloned().unwrap_or(JournalError::Closed)
    }
}

/// How far ahead of the highest number seen the reservation reaches. Numbers
/// the ledger handed out but the writer has not seen yet are at most a queue
/// (plus one per thread inside a critical section), so reserving well over a
/// queue ahead, and renewing at half, keeps every handed-out number reserved.
fn reserve_ahead(queue_capacity: usize) -> u64 {
    u64::try_from(queue_capacity).unwrap_or(u64::MAX / 8).saturating_mul(4).max(1 << 20)
}

impl<S: Store> Journal for GroupCommit<S> {
    fn append(&self, record: Record) -> Result<(), JournalError> {
        if let Some(error) = self.shared.failure.get() {
            return Err(error.clone());
        }
        // Counted by the writer as it takes them: a counter every request
        // thread bumped would be one more cache line they pass around.
        self.send(Message::Record(Box::new(record)))
    }

    fn sync(&self) -> Result<(), JournalError> {
        // While the store fails, say so at once rather than wait for it.
        self.shared.health()?;
        let (answer, answered) = mpsc::sync_channel(1);
        self.send(Message::Barrier(answer))?;
        answered.recv().unwrap_or_else(|_| Err(self.closed()))
    }

    fn health(&self) -> Result<(), JournalError> {
        self.shared.health()
    }
}

impl<S: Store> Drop for GroupCommit<S> {
    fn drop(&mut self) {
        // Best effort: the owner should have called shutdown and seen its result.
        let _ = self.shutdown();
    }
}

/// Why the journal failed when the writer thread panicked.
const WRITER_PANICKED: &str = "the ledger writer thread panicked; restart the gateway";

/// Marks the journal failed if the writer unwinds while it is alive: a sync
/// woken by its barrier being dropped then reads the reason, not "closed".
struct FailOnUnwind<'a>(&'a Shared);

impl Drop for FailOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _first = self.0.failure.set(JournalError::Failed { reason: WRITER_PANICKED.into() });
        }
    }
}

struct Worker<S: Store> {
    store: Arc<S>,
    receiver: Receiver<Message>,
    interval: Duration,
    max_batch: usize,
    /// Most records kept while the store fails; past it, appends wait.
    max_unflushed: usize,
    reserve_ahead: u64,
    /// See [`StoreConfig::gap_patience_ms`].
    gap_patience: Duration,
    shared: Arc<Shared>,
}

/// Puts records back in sequence order. Records are queued in the order
/// their changes became visible, which differs from number order only for
/// records of different wallets numbered a moment apart; writing them in
/// number order makes the store's order the paging order, so a reader
/// resuming after a number never skips one that was written later.
///
/// A record whose thread stalls between taking its number and queueing it
/// for longer than the gap patience is written past (the records after it
/// must not wait on one slow thread); its number is then *missing*, and the
/// durable mark stops below it until the record comes, so no reader (the
/// historian, the entries feed) moves past a number whose record may still
/// be stored (a checkpoint taken past it would lack it for good).
#[derive(Default)]
struct Sequencer {
    /// The next number to write; `None` until the first record.
    next: Option<u64>,
    held: BinaryHeap<Reverse<Held>>,
    /// Numbers written past whose records have not come, as ranges by
    /// their first number (a gap is normally one number, one per stalled
    /// thread).
    missing: BTreeMap<u64, Gap>,
}

/// Missing numbers from a range's key through `last`.
#[derive(Clone, Copy)]
struct Gap {
    last: u64,
    since: Instant,
    reported: bool,
}

/// How long a missing number may stay missing before it is logged as an
/// error (at the first flush after): by then its thread is not slow but
/// gone (a panic between taking the number and queueing the record), and
/// readers wait until a restart.
const GAP_REPORTED_AFTER: Duration = Duration::from_secs(30);

/// A record ordered by its number alone, with when it was taken.
struct Held(Record, Instant);

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.0.seq == other.0.seq
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.seq.cmp(&other.0.seq)
    }
}

impl Sequencer {
    /// Takes a record; pushes onto `ready` what can be written now, in order.
    /// True when the record came after its number was passed.
    fn take(&mut self, record: Record, begins_after: u64, ready: &mut Vec<Record>) -> bool {
        // Numbering resumes after `begins_after` (set once the ledger is
        // restored); records taken before that were numbered below it.
        let resumes_at = begins_after.saturating_add(1);
        let next = self.next.get_or_insert(resumes_at);
        if *next < resumes_at {
            *next = resumes_at;
            // Nothing below where numbering resumes is waited for.
            self.missing.retain(|&first, _| first >= resumes_at);
        }
        if record.seq > *next {
            self.held.push(Reverse(Held(record, Instant::now())));
            return false;
        }
        let late = record.seq < *next;
        if !late {
            *next += 1;
        } else if self.fill(record.seq) {
            // The store puts it at its number's place; once flushed, the
            // durable mark moves past it.
            tracing::warn!(seq = record.seq, "a record came after its number was written past; stored now");
        } else {
            // A number below the resumption point, or a test's hand-made
            // record repeating one: write it as it comes.
            tracing::warn!(seq = record.seq, "a record arrived after its number was passed");
        }
        ready.push(record);
        self.release_in_order(ready);
        late
    }

    fn release_in_order(&mut self, ready: &mut Vec<Record>) {
        let Some(next) = self.next.as_mut() else { return };
        while self.held.peek().is_some_and(|Reverse(Held(record, _))| record.seq == *next) {
            if let Some(Reverse(Held(record, _))) = self.held.pop() {
                *next += 1;
                ready.push(record);
            }
        }
    }

    /// Writes held records past a gap that has lasted too long (or all of
    /// them when `now_anyway`); the gap's numbers are noted as missing.
    fn release_stuck(&mut self, patience: Duration, now_anyway: bool, ready: &mut Vec<Record>) {
        loop {
            let stuck = self.held.peek().is_some_and(|Reverse(Held(_, since))| since.elapsed() >= patience);
            if !(stuck || now_anyway) {
                return;
            }
            let Some(Reverse(Held(record, _))) = self.held.pop() else { return };
            let next = self.next.unwrap_or(record.seq);
            if record.seq > next {
                tracing::warn!(
                    first_missing = next,
                    seq = record.seq,
                    "sequence numbers before this record have not arrived; writing past them (readers of \
                     the durable records wait for them)"
                );
                self.missing
                    .insert(next, Gap { last: record.seq - 1, since: Instant::now(), reported: false });
            }
            self.next = Some(record.seq.saturating_add(1).max(next));
            ready.push(record);
            self.release_in_order(ready);
        }
    }

    /// Takes `seq` out of the missing numbers; false if it was not missing.
    fn fill(&mut self, seq: u64) -> bool {
        let Some((&first, &gap)) = self.missing.range(..=seq).next_back() else { return false };
        if gap.last < seq {
            return false;
        }
        self.missing.remove(&first);
        if first < seq {
            self.missing.insert(first, Gap { last: seq - 1, ..gap });
        }
        if seq < gap.last {
            self.missing.insert(seq + 1, gap);
        }
        true
    }

    /// How many numbers are missing; logs, once each, those missing too long.
    fn missing_count(&mut self) -> u64 {
        let mut count = 0;
        for (&first, gap) in &mut self.missing {
            count += gap.last - first + 1;
            if !gap.reported && gap.since.elapsed() >= GAP_REPORTED_AFTER {
                gap.reported = true;
                tracing::error!(
                    first,
                    last = gap.last,
                    "ledger sequence numbers never came: checkpoints, retention and the entries feed wait \
                     below them until the gateway restarts (the records after them are stored)"
                );
            }
        }
        count
    }

    fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Every number up to this has been taken (or lies below where this
    /// run's numbering began): the durable mark once they are flushed.
    fn contiguous_through(&self, begins_after: u64) -> u64 {
        let written = self.next.map_or(begins_after, |next| next.saturating_sub(1));
        match self.missing.keys().next() {
            Some(&first) => written.min(first.saturating_sub(1)),
            None => written,
        }
    }
}

/// One group: the records and the waiters its flush will answer.
#[derive(Default)]
struct Group {
    /// Records ready to be handed to the store, in order.
    records: Vec<Record>,
    /// Records taken into the group.
    count: u64,
    barriers: Vec<SyncSender<Result<(), JournalError>>>,
    shutdown: Option<SyncSender<Result<(), JournalError>>>,
}

/// What the writer keeps between groups.
#[derive(Default)]
struct State {
    sequencer: Sequencer,
    /// Records handed to the store since the last successful flush: kept
    /// until then, so a failed store can be given them again.
    unflushed: Vec<Record>,
    /// Barriers waiting for held records to be written.
    carried: Vec<SyncSender<Result<(), JournalError>>>,
    highest_seen: u64,
    reserved: u64,
}

impl<S: Store> Worker<S> {
    fn run(self) {
        let mut last_flush: Option<Instant> = None;
        let mut state = State { reserved: self.store.reserved_seq(), ..State::default() };
        loop {
            let first = if state.sequencer.is_holding() || !state.carried.is_empty() {
                match self.receiver.recv_timeout(self.gap_patience) {
                    Ok(message) => Some(message),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match self.receiver.recv() {
                    Ok(message) => Some(message),
                    // Every sender is gone: nothing can be waiting.
                    Err(_) => return,
                }
            };
            let mut group = Group { barriers: std::mem::take(&mut state.carried), ..Group::default() };
            // Dropped before the group and the state: a panic marks the
            // journal failed before their barriers wake anyone.
            let _fail_on_unwind = FailOnUnwind(&self.shared);
            if let Some(first) = first {
                self.take(&mut group, &mut state, first);
            }
            // The group stays open until one interval after the last flush
            // (at once after a quiet spell), so flushes never come closer
            // together than the interval and a lone purchase waits no longer
            // than it must.
            let deadline = last_flush.map_or_else(Instant::now, |at| at + self.interval);
            let (gathered, read_empty) = self.gather(&mut group, &mut state, deadline);
            // A missing number may still wait in a queue not read empty (a
            // backlog): its gap is given ten times the patience then.
            let patience = if read_empty { self.gap_patience } else { self.gap_patience.saturating_mul(10) };
            state.sequencer.release_stuck(patience, group.shutdown.is_some(), &mut group.records);
            if state.sequencer.is_holding() {
                // Records queued before these barriers may still be held:
                // answer them once the gap closes.
                state.carried = std::mem::take(&mut group.barriers);
            }
            let needs_mark = !group.barriers.is_empty() || group.shutdown.is_some();
            let mut result = gathered
                .and_then(|()| self.hand_over(&mut group.records, &mut state))
                .and_then(|()| self.flush(&mut state, group.count, needs_mark));
            last_flush = Some(Instant::now());
            if let Err(JournalError::Unavailable { .. }) = &result {
                // Those carried over a gap too: a purchase waiting on one
                // holds the admin lock, and must fail now, not at recovery.
                for barrier in group.barriers.drain(..).chain(state.carried.drain(..)) {
                    let _gone = barrier.send(result.clone());
                }
                result = self.recover(&mut state, &mut group, needs_mark);
            }
            for barrier in group.barriers {
                let _gone = barrier.send(result.clone());
            }
            if let Some(answer) = group.shutdown {
                let _gone = answer.send(result);
                return;
            }
        }
    }

    fn take(&self, group: &mut Group, state: &mut State, message: Message) {
        match message {
            Message::Record(record) => {
                group.count += 1;
                state.highest_seen = state.highest_seen.max(record.seq);
                self.shared.counters.appended.fetch_add(1, Ordering::Relaxed);
                let begins_after = self.shared.begins_after.load(Ordering::Relaxed);
                if state.sequencer.take(*record, begins_after, &mut group.records) {
                    self.shared.counters.written_out_of_order.fetch_add(1, Ordering::Relaxed);
                }
            }
            Message::Barrier(answer) => group.barriers.push(answer),
            Message::Shutdown(answer) => group.shutdown = Some(answer),
        }
    }

    /// Takes messages until the deadline (or a shutdown), handing full
    /// batches to the store on the way; only the flush waits for the deadline.
    ///
    /// Between drains the writer sleeps rather than waiting on the queue: a
    /// receiver blocked on the queue makes every append pay a thread wakeup
    /// (a futex call and a context switch, several microseconds on the
    /// request path), while a sleeping one is woken by nobody. The first
    /// record of a group still wakes it, at most once per flush interval.
    /// Takes what is queued until `deadline`; also says whether the queue
    /// was read empty (else more may wait in it).
    fn gather(
        &self,
        group: &mut Group,
        state: &mut State,
        deadline: Instant,
    ) -> (Result<(), JournalError>, bool) {
        let mut result = Ok(());
        loop {
            for taken in 0_u64.. {
                if group.shutdown.is_some() {
                    return (result, false);
                }
                if group.records.len() >= self.max_batch {
                    result = result.and_then(|()| self.hand_over(&mut group.records, state));
                }
                // Past the deadline the group closes even if more is queued:
                // under steady load the queue is never empty, and the group
                // would never flush. (The clock is read every 64 records.)
                if taken % 64 == 63 && Instant::now() >= deadline {
                    return (result, false);
                }
                match self.receiver.try_recv() {
                    Ok(message) => self.take(group, state, message),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (result, true);
            }
            std::thread::sleep(left);
        }
    }

    /// Writes (without flushing) `records`, keeping them as unflushed.
    /// After a failure, records are only kept: recovery writes them.
    fn hand_over(&self, records: &mut Vec<Record>, state: &mut State) -> Result<(), JournalError> {
        if let Some(error) = self.shared.failure.get() {
            records.clear();
            return Err(error.clone());
        }
        let written = if records.is_empty() { Ok(()) } else { self.store.append(records) };
        state.unflushed.append(records);
        written.map_err(|error| self.fail(error))
    }

    /// Flushes; see [`Worker::flush_and_mark`].
    fn flush(&self, state: &mut State, count: u64, acknowledging: bool) -> Result<(), JournalError> {
        if let Some(error) = self.shared.failure.get() {
            return Err(error.clone());
        }
        self.flush_and_mark(state, count, acknowledging).map_err(|error| self.fail(error))
    }

    /// Flushes, then renews the watermark when an acknowledgement needs it
    /// (`acknowledging`) or the reserved numbers run short, and moves the
    /// durable floor up.
    fn flush_and_mark(&self, state: &mut State, count: u64, acknowledging: bool) -> Result<(), StoreError> {
        let started = Instant::now();
        self.store.flush()?;
        // Durable now, whatever happens to the watermark: a retry must not
        // write them again.
        let begins_after = self.shared.begins_after.load(Ordering::Relaxed);
        let through = state.sequencer.contiguous_through(begins_after);
        self.shared.durable_through.fetch_max(through, Ordering::Release);
        self.shared.counters.sequence_gaps_open.store(state.sequencer.missing_count(), Ordering::Relaxed);
        match self.shared.durable_to.get() {
            Some(to) if !state.unflushed.is_empty() => {
                // With the mark this flush set: the receiver uses no record
                // above it, and catches up to it without reading the store.
                let records = std::mem::take(&mut state.unflushed);
                let _full = to.try_send(DurableBatch { through, records });
            }
            _ => state.unflushed.clear(),
        }
        state.reserved = state.reserved.max(self.store.reserved_seq());
        let renew = state.highest_seen.saturating_add(self.reserve_ahead / 2) > state.reserved;
        if acknowledging || renew {
            let reserved =
                if renew { state.highest_seen.saturating_add(self.reserve_ahead) } else { state.reserved };
            self.store.acknowledge(reserved)?;
            state.reserved = reserved;
        }
        let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let counters = &self.shared.counters;
        counters.flush_micros.fetch_add(took, Ordering::Relaxed);
        counters.flushes.fetch_add(1, Ordering::Relaxed);
        counters.written.fetch_add(count, Ordering::Relaxed);
        Ok(())
    }

    /// Retries a failed store until it takes the unflushed records again.
    /// Meanwhile the queue keeps moving: records are kept (up to a bound),
    /// waiting writes are told the store is unavailable. Returns once the
    /// store works again, or with the error when shutdown was asked for and
    /// the store still fails.
    fn recover(&self, state: &mut State, group: &mut Group, acknowledging: bool) -> Result<(), JournalError> {
        let mut pause = RETRY_FIRST;
        let mut attempts_since_shutdown = 0;
        loop {
            std::thread::sleep(pause);
            pause = (pause * 2).min(RETRY_MOST);
            self.drain_while_failing(state, group);
            let attempt = self.retry(state, group, acknowledging || group.shutdown.is_some());
            match attempt {
                Ok(()) => {
                    self.shared.set_trouble(None);
                    tracing::info!("the ledger store works again; writes resumed");
                    return Ok(());
                }
                Err(error @ JournalError::Unavailable { .. }) => {
                    if group.shutdown.is_some() {
                        attempts_since_shutdown += 1;
                        if attempts_since_shutdown >= RETRIES_AT_SHUTDOWN {
                            return Err(error);
                        }
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// While the store fails: keep records (up to the bound), answer
    /// barriers at once, note a shutdown.
    fn drain_while_failing(&self, state: &mut State, group: &mut Group) {
        let mut drained = false;
        while state.unflushed.len() + group.records.len() < self.max_unflushed && group.shutdown.is_none() {
            match self.receiver.try_recv() {
                Ok(Message::Barrier(answer)) => {
                    let _gone = answer.send(self.shared.health());
                }
                Ok(message) => self.take(group, state, message),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => {
                    drained = true;
                    break;
                }
            }
        }
        // Past the bound the queue is not read, so a missing number may be
        // waiting in it: only a gap the queue does not hold is one that
        // will never close.
        if drained || group.shutdown.is_some() {
            state.sequencer.release_stuck(self.gap_patience, group.shutdown.is_some(), &mut group.records);
        }
    }

    /// Reopens the store and writes again what it does not hold.
    fn retry(&self, state: &mut State, group: &mut Group, acknowledging: bool) -> Result<(), JournalError> {
        let present = self.store.reopen().map_err(|error| match error {
            error @ StoreError::BehindWatermark { .. } => self.fail(error),
            error => self.trouble(error),
        })?;
        state.unflushed.retain(|record| !present.contains(&record.seq));
        state.unflushed.append(&mut group.records);
        if !state.unflushed.is_empty() {
            self.store.append(&state.unflushed).map_err(|error| self.trouble(error))?;
        }
        self.flush_and_mark(state, group.count, acknowledging).map_err(|error| self.trouble(error))
    }

    /// Records a store error: retried unless it is one retrying cannot mend.
    fn fail(&self, error: StoreError) -> JournalError {
        // A record that cannot be encoded, or a store that lost what it had
        // made durable: retrying mends neither.
        if let StoreError::Encode { .. } | StoreError::BehindWatermark { .. } = error {
            let error = JournalError::Failed { reason: error.to_string() };
            let _first = self.shared.failure.set(error.clone());
            tracing::error!(%error, "the ledger store writer stopped");
            return error;
        }
        tracing::error!(%error, "the ledger store failed; retrying until it works again");
        self.trouble(error)
    }

    fn trouble(&self, error: StoreError) -> JournalError {
        self.shared.counters.store_failures.fetch_add(1, Ordering::Relaxed);
        let reason = error.to_string();
        self.shared.set_trouble(Some(reason.clone()));
        JournalError::Unavailable { reason }
    }
}

#[cfg(test)]
mod tests {
    /// The queue's slots (a message and the channel's stamp each) are
    /// allocated and touched at start: they must stay a small part of the
    /// gateway's resident memory.
    #[test]
    fn the_default_queue_takes_at_most_8_mib_up_front() {
        let slot = std::mem::size_of::<super::Message>() + std::mem::size_of::<usize>();
        let bytes = slot * crate::store::StoreConfig::default().queue_capacity;
        assert!(bytes <= 8 << 20, "{bytes} bytes in {slot}-byte slots");
    }
}
