//! The group-commit writer: a bounded queue and one thread that batches
//! records into the store and flushes at most once per interval.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::ledger::journal::{Journal, JournalError, Record};
use crate::store::{Store, StoreConfig, StoreError};

// Records are most of the traffic; boxing them would allocate per record.
#[allow(clippy::large_enum_variant)]
enum Message {
    Record(Record),
    /// Answered after the flush that covers everything queued before it.
    Barrier(SyncSender<Result<(), JournalError>>),
    /// Flush, answer, stop.
    Shutdown(SyncSender<Result<(), JournalError>>),
}

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
}

#[derive(Debug, Default)]
struct Counters {
    appended: AtomicU64,
    waited_for_room: AtomicU64,
    flushes: AtomicU64,
    written: AtomicU64,
    flush_micros: AtomicU64,
}

/// The journal the ledger writes to in production.
pub struct GroupCommit<S: Store> {
    queue: SyncSender<Message>,
    failure: Arc<OnceLock<JournalError>>,
    counters: Arc<Counters>,
    thread: Mutex<Option<JoinHandle<()>>>,
    store: Arc<S>,
}

impl<S: Store> std::fmt::Debug for GroupCommit<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("stats", &self.stats())
            .field("failure", &self.failure.get())
            .finish_non_exhaustive()
    }
}

impl<S: Store> GroupCommit<S> {
    /// Starts the writer thread over `store`.
    pub fn start(store: Arc<S>, config: StoreConfig) -> Result<Self, StoreError> {
        let (queue, receiver) = mpsc::sync_channel(config.queue_capacity.max(1));
        let failure = Arc::new(OnceLock::new());
        let counters = Arc::new(Counters::default());
        let worker = Worker {
            store: Arc::clone(&store),
            receiver,
            interval: Duration::from_millis(config.flush_interval_ms),
            max_batch: config.max_batch.max(1),
            failure: Arc::clone(&failure),
            counters: Arc::clone(&counters),
        };
        let thread = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || worker.run())
            .map_err(StoreError::Spawn)?;
        Ok(GroupCommit { queue, failure, counters, thread: Mutex::new(Some(thread)), store })
    }

    /// The store underneath (for paging reads).
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Counters for metrics.
    pub fn stats(&self) -> WriterStats {
        WriterStats {
            appended: self.counters.appended.load(Ordering::Relaxed),
            waited_for_room: self.counters.waited_for_room.load(Ordering::Relaxed),
            flushes: self.counters.flushes.load(Ordering::Relaxed),
            written: self.counters.written.load(Ordering::Relaxed),
            flush_micros: self.counters.flush_micros.load(Ordering::Relaxed),
        }
    }

    /// Flushes everything queued and stops the thread. Appends after this
    /// fail with [`JournalError::Closed`]. Safe to call more than once.
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
        result
    }

    fn send(&self, message: Message) -> Result<(), JournalError> {
        match self.queue.try_send(message) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(message)) => {
                self.counters.waited_for_room.fetch_add(1, Ordering::Relaxed);
                self.queue.send(message).map_err(|_| self.closed())
            }
            Err(TrySendError::Disconnected(_)) => Err(self.closed()),
        }
    }

    fn closed(&self) -> JournalError {
        self.failure.get().cloned().unwrap_or(JournalError::Closed)
    }
}

impl<S: Store> Journal for GroupCommit<S> {
    fn append(&self, record: Record) -> Result<(), JournalError> {
        if let Some(error) = self.failure.get() {
            return Err(error.clone());
        }
        // Counted by the writer as it takes them: a counter every request
        // thread bumped would be one more cache line they pass around.
        self.send(Message::Record(record))
    }

    fn sync(&self) -> Result<(), JournalError> {
        let (answer, answered) = mpsc::sync_channel(1);
        self.send(Message::Barrier(answer))?;
        answered.recv().unwrap_or_else(|_| Err(self.closed()))
    }
}

impl<S: Store> Drop for GroupCommit<S> {
    fn drop(&mut self) {
        // Best effort: the owner should have called shutdown and seen its result.
        let _ = self.shutdown();
    }
}

struct Worker<S: Store> {
    store: Arc<S>,
    receiver: Receiver<Message>,
    interval: Duration,
    max_batch: usize,
    failure: Arc<OnceLock<JournalError>>,
    counters: Arc<Counters>,
}

/// One group: the records and the waiters its flush will answer.
#[derive(Default)]
struct Group {
    /// Records not yet handed to the store.
    records: Vec<Record>,
    /// Records in the group, handed over or not.
    count: u64,
    barriers: Vec<SyncSender<Result<(), JournalError>>>,
    shutdown: Option<SyncSender<Result<(), JournalError>>>,
}

impl Group {
    fn take(&mut self, message: Message, counters: &Counters) {
        match message {
            Message::Record(record) => {
                self.records.push(record);
                self.count += 1;
                counters.appended.fetch_add(1, Ordering::Relaxed);
            }
            Message::Barrier(answer) => self.barriers.push(answer),
            Message::Shutdown(answer) => self.shutdown = Some(answer),
        }
    }
}

impl<S: Store> Worker<S> {
    fn run(self) {
        let mut last_flush: Option<Instant> = None;
        // The record buffer outlives its group: grown once, not per flush.
        let mut spare_records = Vec::new();
        while let Ok(first) = self.receiver.recv() {
            let mut group = Group { records: std::mem::take(&mut spare_records), ..Group::default() };
            group.take(first, &self.counters);
            // The group stays open until one interval after the last flush
            // (at once after a quiet spell), so flushes never come closer
            // together than the interval and a lone purchase waits no longer
            // than it must.
            let deadline = last_flush.map_or_else(Instant::now, |at| at + self.interval);
            let gathered = self.gather(&mut group, deadline);
            let result = gathered
                .and_then(|()| self.hand_over(&mut group.records))
                .and_then(|()| self.flush(group.count));
            last_flush = Some(Instant::now());
            group.records.clear();
            spare_records = std::mem::take(&mut group.records);
            for barrier in group.barriers {
                let _gone = barrier.send(result.clone());
            }
            if let Some(answer) = group.shutdown {
                let _gone = answer.send(result);
                return;
            }
        }
        // Every sender is gone: nothing can be waiting, and records queued
        // by now were taken above.
    }

    /// Takes messages until the deadline (or a shutdown), handing full
    /// batches to the store on the way; only the flush waits for the deadline.
    ///
    /// Between drains the writer sleeps rather than waiting on the queue: a
    /// receiver blocked on the queue makes every append pay a thread wakeup
    /// (a futex call and a context switch, several microseconds on the
    /// request path), while a sleeping one is woken by nobody. The first
    /// record of a group still wakes it, at most once per flush interval.
    fn gather(&self, group: &mut Group, deadline: Instant) -> Result<(), JournalError> {
        let mut result = Ok(());
        loop {
            for taken in 0_u64.. {
                if group.shutdown.is_some() {
                    return result;
                }
                if group.records.len() >= self.max_batch {
                    result = result.and_then(|()| self.hand_over(&mut group.records));
                }
                // Past the deadline the group closes even if more is queued:
                // under steady load the queue is never empty, and the group
                // would never flush. (The clock is read every 64 records.)
                if taken % 64 == 63 && Instant::now() >= deadline {
                    return result;
                }
                match self.receiver.try_recv() {
                    Ok(message) => group.take(message, &self.counters),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return result;
            }
            std::thread::sleep(left);
        }
    }

    /// Writes (without flushing) and clears `records`.
    fn hand_over(&self, records: &mut Vec<Record>) -> Result<(), JournalError> {
        if let Some(error) = self.failure.get() {
            records.clear();
            return Err(error.clone());
        }
        let written = self.store.append(records);
        records.clear();
        written.map_err(|error| self.fail(error))
    }

    fn flush(&self, count: u64) -> Result<(), JournalError> {
        if let Some(error) = self.failure.get() {
            return Err(error.clone());
        }
        let started = Instant::now();
        self.store.flush().map_err(|error| self.fail(error))?;
        let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.counters.flush_micros.fetch_add(took, Ordering::Relaxed);
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        self.counters.written.fetch_add(count, Ordering::Relaxed);
        Ok(())
    }

    fn fail(&self, error: StoreError) -> JournalError {
        let error = JournalError::Failed { reason: error.to_string() };
        let _first = self.failure.set(error.clone());
        error
    }
}
