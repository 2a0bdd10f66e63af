//! The historian: checkpoints and retention, on a thread of their own.
//!
//! # Checkpoints without stopping the world
//!
//! The historian never looks at the live ledger. It keeps a *shadow* ledger
//! of its own: the checkpoint the gateway started from (or an empty ledger)
//! plus every durable record, in sequence order, up to
//! [`GroupCommit::durable_through`] — a contiguous durable prefix (the writer
//! stores records in sequence order and serves readers only that far), so
//! the shadow is, by construction, exactly the state after record `N` with
//! nothing missing below `N` and nothing above it. The records come from
//! the writer itself, handed over after each flush
//! ([`GroupCommit::hand_durable_to`]), as long as they follow on without a
//! gap; whatever the hand-over missed (records from before the historian
//! started, a batch dropped while it was busy) is read back from the store.
//! A checkpoint is that shadow serialized ([`crate::ledger::snapshot`]) and
//! written atomically ([`super::checkpoint`]). Settles never wait for any of
//! it: the only shared things are the store (read), the writer's durable
//! counter and the hand-over channel, which the writer never waits on.
//!
//! The catching up runs at normal priority: it is about half a microsecond
//! a record and must keep pace with the writer. Under the idle policy a
//! saturated machine can starve it (an idle thread's weight is 3 against a
//! normal one's 1,024): the hand-over then fills and drops, what it dropped
//! is read back from the store later, and the checkpoint falls behind for as
//! long as the load lasts. Writing a checkpoint and the retention after it
//! run on a thread of their own under the idle policy, from a snapshot taken
//! at once, while the shadow goes on catching up; one at a time.
//!
//! A checkpoint is due every `checkpoint_every_records` records or every
//! `checkpoint_interval_ms` of the injected clock (if anything happened),
//! whichever comes first. Start-up loads the newest valid checkpoint and
//! replays only the records after it ([`super::open_ledger`]).
//!
//! # Retention
//!
//! With `retain_days` set, after each checkpoint the historian moves old
//! records out of the hot store: whole UTC days that ended more than
//! `retain_days` ago *and* lie at or below the older of the two kept
//! checkpoints (so the newest one still has a fallback) are first exported
//! ([`super::export`]: day files and manifests, fsynced) and only then
//! pruned ([`Store::prune_through`]). With `export = false` (an explicit
//! opt-out) they are pruned without export. Nothing else is ever pruned.
//!
//! # Cluster mode (not built; how the same design maps)
//!
//! In cluster mode PostgreSQL is the book of record: the `cg_*` log tables
//! would be partitioned by month (`PARTITION BY RANGE (at)`). A replica's
//! follower ledger is already a replay of the shared log, so the same
//! historian checkpoints it: a checkpoint covers the log's `gseq` up to the
//! highest contiguous sequence the replica has replayed, and start-up loads
//! it and tails the log from there. Retention detaches a month's partition
//! once it is older than `retain_days` and below the oldest kept checkpoint
//! of every replica, exports it with the same format (one file per day, the
//! same manifests), fsyncs, and only then drops it; exactly one replica does
//! this, under the advisory lock the time rules already take.
//!
//! # Test hook
//!
//! `CREDITGATE_TEST_PAUSE=STEP=MS` (test-only, read by debug builds only) makes
//! the checkpoint thread stop for `MS` milliseconds in the middle of `STEP`
//! (`checkpoint`: halfway through the temporary file; `export`: after the
//! first record of a day file; `prune`: once the new floor is durable, before each batch is removed),
//! creating the file `test-paused-STEP` in the ledger directory while it
//! waits, so a crash test can SIGKILL the process at exactly that moment.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use parking_lot::Mutex;

use crate::clock::Clock;
use crate::ledger::journal::{NullJournal, Record};
use crate::ledger::snapshot::LedgerSnapshot;
use crate::ledger::{Ledger, LedgerConfig, Replayer};
use crate::store::export::{export_days, ExportPlan};
use crate::store::{checkpoint, DurableBatch, GroupCommit, Store, StoreError};

/// `[ledger]` settings for checkpoints and retention.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryConfig {
    /// A checkpoint is written after this many records.
    pub checkpoint_every_records: u64,
    /// ... or this long after the last one, whichever comes first.
    pub checkpoint_interval_ms: u64,
    /// Keep this many whole days of records in the hot store; `None` keeps
    /// everything (no pruning).
    pub retain_days: Option<u32>,
    /// Export records before pruning them (the default). `false` prunes
    /// without export: an explicit opt-out.
    pub export: bool,
    /// Where exports go; `None` is `<data_dir>/exports`.
    pub export_dir: Option<PathBuf>,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            checkpoint_every_records: 1_000_000,
            checkpoint_interval_ms: 300_000,
            retain_days: None,
            export: true,
            export_dir: None,
        }
    }
}

/// What the historian has done, for the admin API and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HistoryStatus {
    /// The newest checkpoint covers every record up to this one.
    pub checkpoint_seq: u64,
    /// When it was written (by the injected clock).
    pub checkpoint_at: Option<DateTime<Utc>>,
    /// Checkpoints written by this process.
    pub checkpoints_written: u64,
    /// Records up to this one may have left the hot store.
    pub pruned_through: u64,
    /// Where older records were exported, when exports are on.
    pub export_dir: Option<PathBuf>,
    /// The newest exported day.
    pub exported_through: Option<NaiveDate>,
    /// The last failure, if the last attempt failed.
    pub last_error: Option<String>,
    /// Records the shadow took as the writer handed them over after a flush.
    pub records_handed_over: u64,
    /// Records the shadow read back from the store instead (those before
    /// it started, and any batch the hand-over dropped).
    pub records_read_back: u64,
}

/// The background historian; stop it before the writer shuts down.
#[derive(Debug)]
pub struct Historian {
    stop: SyncSender<()>,
    thread: Mutex<Option<JoinHandle<()>>>,
    status: Arc<Mutex<HistoryStatus>>,
}

/// How often the shadow catches up with the store (at most).
const POLL: Duration = Duration::from_millis(500);
/// Records read from the store per step.
const READ_BATCH: usize = 8_192;
/// Flushed batches the writer may hand over between two steps (a flush
/// every few milliseconds, a step every [`POLL`]); more are dropped and
/// read back from the store.
const HANDED_BATCHES: usize = 1_024;

struct Work<S: Store> {
    writer: Arc<GroupCommit<S>>,
    ledger_dir: PathBuf,
    export_dir: PathBuf,
    config: HistoryConfig,
    clock: Arc<dyn Clock>,
    shadow: Ledger,
    replayer: Replayer,
    /// Batches the writer made durable, in sequence order.
    handed: Receiver<DurableBatch>,
    /// The shadow holds every record up to this one.
    covered: u64,
    since_checkpoint: u64,
    last_checkpoint_at: DateTime<Utc>,
    last_checkpoint_seq: u64,
    status: Arc<Mutex<HistoryStatus>>,
    /// Set when the shadow could not apply a record: a bug, and checkpoints
    /// stop rather than save a state that may be wrong.
    broken: Option<String>,
    /// The checkpoint being written, if any.
    job: Option<CheckpointJob>,
}

/// A checkpoint being written (and retention after it) on its own thread.
struct CheckpointJob {
    /// The snapshot's number and when it was taken.
    seq: u64,
    at: DateTime<Utc>,
    /// Records the shadow had applied since the last checkpoint when the
    /// snapshot was taken.
    since: u64,
    /// Whether the checkpoint was written, and how retention went.
    thread: JoinHandle<(Result<(), String>, Result<(), String>)>,
}

impl Historian {
    /// Starts the historian from the checkpoint the ledger was opened from
    /// (`None`: from the first record).
    pub fn start<S: Store>(
        writer: Arc<GroupCommit<S>>,
        ledger_dir: &Path,
        export_dir: PathBuf,
        config: HistoryConfig,
        ledger_config: LedgerConfig,
        start: Option<LedgerSnapshot>,
        clock: Arc<dyn Clock>,
    ) -> Result<Historian, StoreError> {
        let covered = start.as_ref().map_or(0, |snapshot| snapshot.seq);
        let status = Arc::new(Mutex::new(HistoryStatus {
            checkpoint_seq: covered,
            pruned_through: writer.store().pruned_through(),
            export_dir: config.export.then(|| export_dir.clone()),
            exported_through: crate::store::export::exported_days(&export_dir).last().copied(),
            ..HistoryStatus::default()
        }));
        let (stop, stopped) = mpsc::sync_channel(1);
        let (hand, handed) = mpsc::sync_channel(HANDED_BATCHES);
        writer.hand_durable_to(hand);
        let shared = status.clone();
        let ledger_dir = ledger_dir.to_owned();
        // The shadow is built on the historian's own thread: start-up (and
        // readiness) never waits for it.
        let thread = std::thread::Builder::new()
            .name("historian".into())
            .spawn(move || {
                // A panic (a bug) stops the historian: said in its status, so
                // the metrics and the admin API show it, not the log alone.
                let said = shared.clone();
                let run = std::panic::AssertUnwindSafe(move || {
                    // Catching up stays at normal priority (see the module doc);
                    // the writer and the proxy never wait on it.
                    let shadow = match &start {
                        Some(snapshot) => Ledger::from_snapshot(ledger_config, Arc::new(NullJournal), snapshot),
                        None => Ok(Ledger::new(ledger_config, Arc::new(NullJournal))),
                    };
                    drop(start);
                    let shadow = match shadow {
                        Ok(shadow) => shadow,
                        Err(error) => {
                            tracing::error!(%error, "ledger history: the checkpoint shadow cannot be built");
                            shared.lock().last_error = Some(error.to_string());
                            return;
                        }
                    };
                    // The shadow only follows: it must never make catch-up records.
                    shadow.set_following(true);
                    let now = clock.now();
                    let mut work = Work {
                        writer,
                        ledger_dir,
                        export_dir,
                        config,
                        clock,
                        shadow,
                        replayer: Replayer::after(covered),
                        handed,
                        covered,
                        since_checkpoint: 0,
                        last_checkpoint_at: now,
                        last_checkpoint_seq: covered,
                        status: shared,
                        broken: None,
                        job: None,
                    };
                    loop {
                        work.step();
                        match stopped.recv_timeout(POLL) {
                            Err(RecvTimeoutError::Timeout) => {}
                            _ => {
                                // A checkpoint or prune in progress ends first.
                                if let Some(job) = work.job.take() {
                                    if let Err(error) = work.finish(job) {
                                        tracing::error!(%error, "ledger history: the last checkpoint or retention failed");
                                    }
                                }
                                return;
                            }
                        }
                    }
                });
                if std::panic::catch_unwind(run).is_err() {
                    said.lock().last_error =
                        Some("the historian stopped (it panicked; see the log): checkpoints and pruning wait for a restart".into());
                }
            })
            .map_err(StoreError::Spawn)?;
        Ok(Historian { stop, thread: Mutex::new(Some(thread)), status })
    }

    /// What it has done so far.
    pub fn status(&self) -> HistoryStatus {
        self.status.lock().clone()
    }

    /// Stops the thread, waiting for a checkpoint or prune in progress.
    pub fn stop(&self) {
        let _ = self.stop.try_send(());
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

impl<S: Store> Work<S> {
    fn step(&mut self) {
        if self.broken.is_some() {
            return;
        }
        let result = self.catch_up().and_then(|()| self.checkpoint_if_due());
        let mut status = self.status.lock();
        match result {
            Ok(()) => status.last_error = None,
            Err(error) => {
                tracing::error!(%error, "ledger history: checkpoint or retention failed; retrying");
                status.last_error = Some(error);
            }
        }
    }

    /// Replays the durable records the shadow does not have yet: first
    /// those the writer handed over, while they follow on from what the
    /// shadow holds without a gap and lie within the durable mark; then,
    /// read back from the store, whatever that left out.
    fn catch_up(&mut self) -> Result<(), String> {
        let mut handed = Vec::new();
        while let Ok(batch) = self.handed.try_recv() {
            handed.push(batch);
        }
        // The shadow catches up to the newest mark the batches carry, not to
        // the writer's mark now: batches flushed while these are applied
        // come in the next hand-over, where reading them back from the store
        // (as every step under load did) cost a read of its pages. Without
        // a batch (at start, or nothing flushed since): the writer's mark.
        let target = handed.last().map_or_else(|| self.writer.durable_through(), |batch| batch.through);
        let mut taken = 0;
        'handed: for batch in handed {
            for record in batch.records {
                if record.seq <= self.covered {
                    continue;
                }
                if record.seq != self.covered + 1 || record.seq > batch.through {
                    // A dropped batch or a gap: the store has the rest.
                    break 'handed;
                }
                self.apply(record)?;
                taken += 1;
            }
        }
        self.status.lock().records_handed_over += taken;
        loop {
            let batch = self
                .writer
                .read_durable_between(self.covered, target, READ_BATCH)
                .map_err(|e| e.to_string())?;
            if batch.is_empty() {
                break;
            }
            self.status.lock().records_read_back += batch.len() as u64;
            for record in batch {
                self.apply(record)?;
            }
        }
        // Numbers up to the durable mark that no record holds were lost in
        // a crash (or reserved): they never will be written.
        self.covered = self.covered.max(target);
        Ok(())
    }

    fn apply(&mut self, record: Record) -> Result<(), String> {
        self.covered = self.covered.max(record.seq);
        self.since_checkpoint += 1;
        if let Err(error) = self.replayer.apply(&self.shadow, record) {
            let message = format!("the checkpoint shadow cannot apply a stored record: {error}");
            tracing::error!(%message, "ledger history: checkpoints stop");
            self.broken = Some(message.clone());
            return Err(message);
        }
        Ok(())
    }

    fn checkpoint_if_due(&mut self) -> Result<(), String> {
        match self.job.take() {
            Some(job) if !job.thread.is_finished() => {
                self.job = Some(job);
                return Ok(());
            }
            Some(job) => self.finish(job)?,
            None => {}
        }
        let now = self.clock.now();
        let interval =
            TimeDelta::milliseconds(i64::try_from(self.config.checkpoint_interval_ms).unwrap_or(i64::MAX));
        let by_count = self.since_checkpoint >= self.config.checkpoint_every_records;
        let by_time = self.since_checkpoint > 0 && now - self.last_checkpoint_at >= interval;
        if (by_count || by_time) && self.covered > self.last_checkpoint_seq {
            let snapshot = self.shadow.snapshot(self.covered);
            let seq = snapshot.seq;
            let disk = DiskWork {
                writer: self.writer.clone(),
                ledger_dir: self.ledger_dir.clone(),
                export_dir: self.export_dir.clone(),
                config: self.config.clone(),
                status: self.status.clone(),
            };
            let thread = std::thread::Builder::new()
                .name("checkpoint".into())
                .spawn(move || {
                    crate::server::idle_priority("a ledger checkpoint");
                    let written = disk.write_checkpoint(&snapshot, now);
                    let retained = if written.is_ok() { disk.retain(now) } else { Ok(()) };
                    (written, retained)
                })
                .map_err(|error| format!("the checkpoint thread could not start: {error}"))?;
            self.job = Some(CheckpointJob { seq, at: now, since: self.since_checkpoint, thread });
        }
        Ok(())
    }

    /// Waits for `job` and takes its outcome: a written checkpoint resets
    /// the counts; a failed one is tried again at a later step.
    fn finish(&mut self, job: CheckpointJob) -> Result<(), String> {
        let (written, retained) =
            job.thread.join().unwrap_or_else(|_| (Err("the checkpoint thread panicked".to_owned()), Ok(())));
        written?;
        self.since_checkpoint = self.since_checkpoint.saturating_sub(job.since);
        self.last_checkpoint_at = job.at;
        self.last_checkpoint_seq = job.seq;
        retained
    }
}

/// What writing a checkpoint and retention need, moved to their thread.
struct DiskWork<S: Store> {
    writer: Arc<GroupCommit<S>>,
    ledger_dir: PathBuf,
    export_dir: PathBuf,
    config: HistoryConfig,
    status: Arc<Mutex<HistoryStatus>>,
}

impl<S: Store> DiskWork<S> {
    fn write_checkpoint(&self, snapshot: &LedgerSnapshot, now: DateTime<Utc>) -> Result<(), String> {
        let dir = checkpoint::dir_of(&self.ledger_dir);
        let path = checkpoint::write(&dir, snapshot, || test_pause(&self.ledger_dir, "checkpoint"))
            .map_err(|e| e.to_string())?;
        tracing::info!(checkpoint = %path.display(), seq = snapshot.seq, "ledger checkpoint written");
        let mut status = self.status.lock();
        status.checkpoint_seq = snapshot.seq;
        status.checkpoint_at = Some(now);
        status.checkpoints_written += 1;
        Ok(())
    }

    /// Exports and prunes what retention allows; see the module doc.
    fn retain(&self, now: DateTime<Utc>) -> Result<(), String> {
        let Some(days) = self.config.retain_days else {
            return Ok(());
        };
        let dir = checkpoint::dir_of(&self.ledger_dir);
        let kept = checkpoint::list(&dir).map_err(|e| e.to_string())?;
        if kept.len() < checkpoint::KEPT {
            return Ok(());
        }
        // The older kept checkpoint must read back whole: it is the fallback.
        let Some((limit, path)) = kept.last() else {
            return Ok(());
        };
        checkpoint::read(path).map_err(|e| e.to_string())?;
        let Some(before) = now.checked_sub_signed(TimeDelta::days(i64::from(days))) else {
            return Ok(()); // Before any date: nothing is old enough to go.
        };
        let before = before.date_naive();
        let outcome = retain_through(
            self.writer.store(),
            &self.export_dir,
            self.config.export,
            ExportPlan { after: 0, through: *limit, before, from: None },
            &self.ledger_dir,
        )
        .map_err(|e| e.to_string())?;
        let mut status = self.status.lock();
        status.pruned_through = self.writer.store().pruned_through();
        if let Some(day) = outcome {
            status.exported_through = Some(day);
        }
        Ok(())
    }
}

/// Exports (unless `export` is false) and then prunes the whole days `plan`
/// allows, starting after what the store already pruned. Returns the newest
/// day exported. Shared by the historian and the `ledger` commands.
pub fn retain_through<S: Store + ?Sized>(
    store: &S,
    export_dir: &Path,
    export: bool,
    plan: ExportPlan,
    ledger_dir: &Path,
) -> Result<Option<NaiveDate>, String> {
    let pruned = store.pruned_through();
    let plan = ExportPlan {
        after: pruned.max(plan.after),
        // Without export, days are read to find the cut but not written.
        from: if export { plan.from } else { Some(NaiveDate::MAX) },
        ..plan
    };
    let exported =
        export_days(store.records_after(plan.after), export_dir, plan, &|| test_pause(ledger_dir, "export"))
            .map_err(|e| e.to_string())?;
    let newest = exported.days.last().map(|manifest| manifest.day);
    if exported.complete_through > pruned {
        let removed = store
            .prune_through(exported.complete_through, &|| test_pause(ledger_dir, "prune"))
            .map_err(|e| e.to_string())?;
        tracing::info!(
            through = exported.complete_through,
            removed,
            days = exported.days.len(),
            "ledger history pruned"
        );
    }
    Ok(newest)
}

/// The test-only pause; see the module doc.
pub fn test_pause(ledger_dir: &Path, step: &str) {
    // Read by debug builds (the test suite's) only.
    if !cfg!(debug_assertions) {
        return;
    }
    let Ok(setting) = std::env::var("CREDITGATE_TEST_PAUSE") else {
        return;
    };
    let Some(ms) =
        setting.strip_prefix(step).and_then(|rest| rest.strip_prefix('=')).and_then(|ms| ms.parse().ok())
    else {
        return;
    };
    let marker = ledger_dir.join(format!("test-paused-{step}"));
    let _ = std::fs::write(&marker, b"");
    std::thread::sleep(Duration::from_millis(ms));
    let _ = std::fs::remove_file(&marker);
}

/// Writes a checkpoint of the store at `ledger_dir` as it stands (the
/// gateway stopped): the newest valid checkpoint plus every record after
/// it. Returns the sequence number it covers (`None`: an empty store).
pub fn checkpoint_offline(ledger_dir: &Path, ledger_config: LedgerConfig) -> Result<Option<u64>, StoreError> {
    let store = crate::store::SledStore::open(ledger_dir)?;
    let dir = checkpoint::dir_of(ledger_dir);
    let (start, _) =
        checkpoint::load_newest(&dir).map_err(|error| StoreError::Corrupt { reason: error.to_string() })?;
    let mut seq = start.as_ref().map_or(0, |snapshot| snapshot.seq);
    let mut failure = None;
    let records = store
        .records_after(seq)
        .map_while(|record| record.map_err(|error| failure = Some(error)).ok())
        .inspect(|record| seq = seq.max(record.seq));
    let ledger = Ledger::restore_from(ledger_config, Arc::new(NullJournal), start.as_ref(), records);
    if let Some(error) = failure {
        return Err(error);
    }
    let ledger = ledger?;
    if seq == 0 || start.as_ref().is_some_and(|snapshot| snapshot.seq == seq) {
        return Ok(None);
    }
    checkpoint::write(&dir, &ledger.snapshot(seq), || {})
        .map_err(|error| StoreError::Corrupt { reason: error.to_string() })?;
    Ok(Some(seq))
}

#[cfg(test)]
mod tests;
