//! One replica's ledger in a cluster: a follower of the shared log, or its
//! treasurer.
//!
//! Every replica keeps a full [`Ledger`] in memory, rebuilt from `cg_log`
//! and kept current by replaying what is appended to it, so keys, users,
//! limits, lots and balances are known everywhere within one poll. Exactly
//! one replica, the treasurer (the holder of the treasury lease, see
//! `migrations/0003_treasury.sql`), makes records: its ledger runs as a
//! single node's does, with a [`LogJournal`] in place of the sled writer.
//! A follower's ledger makes none: it takes no new work of its own and
//! catches no wallet up to the clock (the treasurer's grants and write-offs
//! reach it as records).
//!
//! When the treasury lapses (its holder died, paused or lost the database
//! for longer than the treasury's lease), the first follower to claim it
//! reads the log to its end (no record of the old epoch can be appended
//! after the claim), becomes the writer, and catches every wallet up to
//! its clock. A treasurer that finds its epoch over fails its journal and
//! must be restarted: it cannot know which of its records the log took.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::ledger::entry::SettleDetails;
use crate::ledger::ids::{KeyId, RequestId, WalletId};
use crate::ledger::lot::Lot;
use crate::ledger::{Ledger, LedgerConfig, SettleError};

use super::books::{retrying, Books};
use super::journal::{decode, Appended, LogJournal};
use super::wakeups::Wakeups;
use super::ClusterError;

/// Records read from the log per statement.
const TAIL_BATCH: i64 = 5_000;
const TAIL_BATCH_LEN: usize = TAIL_BATCH as usize;
/// Shipped debits posted per round.
const POST_BATCH: i64 = 2_000;
const POST_BATCH_LEN: usize = POST_BATCH as usize;
/// How long a treasurer stepping down waits for its records to reach the log.
const STEP_DOWN_DRAIN: Duration = Duration::from_secs(2);

/// What a replica ships with a debit so the treasurer can post it: the
/// settle its own ledger would have made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebitDetail {
    /// The request.
    pub request_id: RequestId,
    /// The wallet it paid from.
    pub wallet: WalletId,
    /// The key it came with.
    pub key: KeyId,
    /// The end user an application named, if any.
    pub end_user: Option<String>,
    /// What was held for it.
    pub held: Decimal,
    /// When its hold was taken, by the replica's clock: the call is paid
    /// from the credit live then (absent from debits shipped before it was
    /// recorded, which are paid from the credit live when they settled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_at: Option<DateTime<Utc>>,
    /// Route, model, usage and price version.
    pub details: SettleDetails,
}

/// A shipped debit not yet posted.
#[derive(Clone, Debug)]
pub struct UnpostedDebit {
    /// The replica that shipped it, and its number there.
    pub replica: String,
    /// That replica's number for it.
    pub entry: i64,
    /// Its number in the posting order (`cg_debits.post_seq`).
    pub post_seq: i64,
    /// The amount.
    pub amount: Decimal,
    /// When it was settled by the replica's clock, or when the lease it was
    /// spent from was drawn (the database's clock) if that is later: a
    /// replica whose clock runs behind cannot date a debit before its
    /// lease, so a lease drawn after a lot expired never takes back that
    /// lot's write-off.
    pub at: DateTime<Utc>,
    /// When the lease it was spent from was drawn (the database's clock): no
    /// hold on it was taken before.
    pub drawn_at: Option<DateTime<Utc>>,
    /// Its [`DebitDetail`], as shipped (the books' JSON text).
    pub body: Box<serde_json::value::RawValue>,
}

/// How a replica follows and keeps the treasury.
#[derive(Clone, Debug)]
pub struct ReplicaSettings {
    /// The replica's name (unique per data directory).
    pub replica: String,
    /// The treasury lease's length; the treasurer renews it every sixth.
    pub treasury_ttl: Duration,
    /// How often a follower reads the log (and the treasurer looks for
    /// shipped debits) while the database's wake-ups are not heard.
    pub poll: Duration,
    /// How long the treasurer, told of a shipment, waits for others to
    /// post them together.
    pub gather: Duration,
}

impl ReplicaSettings {
    /// Defaults: a 6 s treasury; the log read every 50 ms while no
    /// wake-ups come.
    pub fn new(replica: impl Into<String>) -> ReplicaSettings {
        ReplicaSettings {
            replica: replica.into(),
            treasury_ttl: Duration::from_secs(6),
            poll: Duration::from_millis(50),
            gather: Duration::from_millis(100),
        }
    }
}

/// A replica's ledger and its place in the shared log.
pub struct Replica {
    books: Books,
    settings: ReplicaSettings,
    ledger: Arc<Ledger>,
    journal: LogJournal,
    /// The last log record applied (while following).
    applied: AtomicI64,
    /// The treasury epoch held, once promoted.
    epoch: Mutex<Option<i64>>,
    /// Set once this replica was treasurer and lost the treasury.
    deposed: AtomicBool,
    /// Set when it lost it without stepping down (a pause, a partition).
    lost_treasury: AtomicBool,
    /// Why its view of the books stopped: a log record that does not
    /// replay, or its log-following task ended before shutdown (a panic).
    /// Serving on would answer from a frozen view (a revoked key still
    /// working, a purchase never spendable), so it must restart.
    stopped: Mutex<Option<String>>,
    /// A log record this version cannot read (a newer treasurer's, during
    /// an upgrade done out of order): restarting the same binary cannot
    /// mend it, so the replica stays up, inside its leases, and says it is
    /// not ready until it runs the new binary.
    unreadable: Mutex<Option<String>>,
    /// Serializes reading the log, so records apply once and in order.
    tailing: tokio::sync::Mutex<()>,
    /// Told of each wallet a record changes once the replica runs: alerts
    /// evaluate on it (this replica's view is where every replica's
    /// spending shows), and the lease book forgets a balance it refused on
    /// once credit arrives.
    watchers: parking_lot::RwLock<Vec<WalletWatcher>>,
}

/// Stops the treasury keeper whenever [`Replica::run`] ends, and marks the
/// replica stopped when it is dropped unfinished (a panic unwinds out of
/// it and tokio drops it).
struct EndedBeforeShutdown {
    replica: Arc<Replica>,
    keeper_stop: CancellationToken,
    finished: bool,
}

impl Drop for EndedBeforeShutdown {
    fn drop(&mut self) {
        self.keeper_stop.cancel();
        if !self.finished {
            let reason = "its log-following task ended before shutdown (a panic, or a start that failed)";
            tracing::error!(reason, "this replica must restart");
            self.replica.stopped.lock().get_or_insert_with(|| reason.to_owned());
        }
    }
}

/// Told the wallet whose balance a record just changed, and whether the
/// record credited it (a grant, purchase, positive adjustment, or a
/// write-off taken back for a late debit: it frees what the debit's
/// shipping had taken off the books' balance) rather than debiting it.
pub type WalletWatcher = Box<dyn Fn(WalletId, bool) + Send + Sync>;

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("replica", &self.settings.replica)
            .field("applied", &self.applied)
            .field("epoch", &*self.epoch.lock())
            .finish_non_exhaustive()
    }
}

impl Replica {
    /// A follower with the whole log replayed.
    pub async fn open(
        books: Books,
        config: LedgerConfig,
        settings: ReplicaSettings,
    ) -> Result<Replica, ClusterError> {
        let journal = LogJournal::new();
        let ledger = Arc::new(Ledger::new(config, Arc::new(journal.clone())));
        ledger.set_following(true);
        let replica = Replica {
            books,
            settings,
            ledger,
            journal,
            applied: AtomicI64::new(0),
            epoch: Mutex::new(None),
            deposed: AtomicBool::new(false),
            lost_treasury: AtomicBool::new(false),
            stopped: Mutex::new(None),
            unreadable: Mutex::new(None),
            tailing: tokio::sync::Mutex::new(()),
            watchers: parking_lot::RwLock::new(Vec::new()),
        };
        while replica.catch_up().await? > 0 {}
        Ok(replica)
    }

    /// Tells `watcher` of every wallet a record changes from now on: the
    /// records this replica replays and the debits it posts as treasurer.
    pub fn watch_wallets(&self, watcher: WalletWatcher) {
        self.watchers.write().push(watcher);
    }

    fn changed(&self, wallet: WalletId, credited: bool) {
        for watcher in self.watchers.read().iter() {
            watcher(wallet, credited);
        }
    }

    /// The ledger: serve from it; changes succeed only on the treasurer.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// The treasury epoch this replica holds, if it is the treasurer.
    pub fn epoch(&self) -> Option<i64> {
        *self.epoch.lock()
    }

    /// Waits until every record the treasurer's ledger made so far is in
    /// the log (settles are not acknowledged one by one). Blocks the thread.
    pub fn sync(&self) -> Result<(), crate::ledger::journal::JournalError> {
        use crate::ledger::journal::Journal as _;
        self.journal.sync()
    }

    /// Why this replica's ledger cannot go on, if it cannot: it lost the
    /// treasury without stepping down, or its journal stopped. Its ledger
    /// may hold changes the log never took, so it must be rebuilt from the
    /// log, which a restart does.
    pub fn must_restart(&self) -> Option<String> {
        if self.lost_treasury.load(Ordering::Acquire) {
            return Some("it lost the treasury (its renewal came too late)".into());
        }
        if let Some(reason) = self.stopped.lock().clone() {
            return Some(reason);
        }
        self.journal.failure().map(|reason| format!("its journal stopped: {reason}"))
    }

    /// Why this replica's view cannot move on although a restart would not
    /// help (a log record from a newer version), if so: it is not ready.
    pub fn unreadable(&self) -> Option<String> {
        self.unreadable.lock().clone()
    }

    /// Whether it holds the treasury now: it took it and was not deposed
    /// (a deposed treasurer keeps its epoch until it exits).
    pub fn holds_treasury(&self) -> bool {
        self.epoch().is_some() && !self.deposed.load(Ordering::Acquire)
    }

    /// The last log record this replica applied as a follower (a treasurer
    /// makes the records after it and does not read them back).
    pub fn applied(&self) -> i64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Applies the records appended since the last call (up to one batch);
    /// returns how many. Nothing for the treasurer: it made them.
    pub async fn catch_up(&self) -> Result<usize, ClusterError> {
        let _tailing = self.tailing.lock().await;
        // A treasurer made the records; one that stepped down or lost the
        // term never follows again (it exits, or restarts): reading on from
        // where it stopped following would replay its own epoch twice.
        if self.epoch().is_some() || self.deposed.load(Ordering::Acquire) {
            return Ok(0);
        }
        let records = self.books.tail(self.applied(), TAIL_BATCH).await?;
        // A record that does not replay stops the view for good: retrying
        // cannot mend it (a replay is not undone), and every later record
        // waits behind it. A restart rebuilds the view from the log (or
        // refuses to start, which is seen).
        let stop = |reason: String| {
            tracing::error!(%reason, "this replica's view of the books stopped; it must restart");
            self.stopped.lock().get_or_insert_with(|| reason.clone());
            ClusterError::Schema(reason)
        };
        for record in &records {
            let decoded = decode(record.gseq, &record.body).map_err(|err| {
                let reason = format!(
                    "log record {} cannot be read by this version ({err}): run the treasurer's version",
                    record.gseq
                );
                if self.unreadable.lock().replace(reason.clone()).is_none() {
                    tracing::error!(%reason, "this replica's view of the books stopped");
                }
                ClusterError::Schema(reason)
            })?;
            let changed = match &decoded.body {
                crate::ledger::journal::RecordBody::Entry(entry) => {
                    Some((entry.wallet, entry.kind.created_lot().is_some()))
                }
                _ => None,
            };
            self.ledger
                .apply_replicated(decoded)
                .map_err(|err| stop(format!("log record {} does not replay: {err}", record.gseq)))?;
            self.applied.store(record.gseq, Ordering::Release);
            if let Some((wallet, credited)) = changed {
                self.changed(wallet, credited);
            }
        }
        Ok(records.len())
    }

    /// Takes the treasury if it is free and becomes the writer: reads the
    /// log to its end, starts the journal and catches every wallet up to
    /// `clock`. Returns whether this replica is the treasurer afterwards.
    pub async fn try_promote(&self, clock: &dyn Clock) -> Result<bool, ClusterError> {
        if self.epoch().is_some() {
            return Ok(true);
        }
        if self.deposed.load(Ordering::Acquire) {
            return Ok(false);
        }
        let Some(epoch) =
            self.books.claim_treasury(&self.settings.replica, None, self.settings.treasury_ttl).await?
        else {
            return Ok(false);
        };
        while self.catch_up().await? > 0 {}
        // Before the first append: the lots' moves are applied from there.
        self.books.publish_lots(epoch, &self.settings.replica, &self.ledger.live_lots()).await?;
        self.journal.start(self.books.clone(), self.settings.replica.clone(), epoch)?;
        *self.epoch.lock() = Some(epoch);
        self.ledger.set_following(false);
        self.ledger.tick(clock.now());
        tracing::info!(replica = %self.settings.replica, epoch, "this replica is the cluster's treasurer");
        Ok(true)
    }

    /// Posts the debits replicas shipped to the treasurer's ledger, in the
    /// order they were numbered as they shipped, up to one batch; returns
    /// how many it read. The append that logs a debit's settle record moves
    /// the posting mark (`cg_posting`) past it in the same transaction, so
    /// it is posted once however often the treasury changes hands. A debit
    /// that cannot be posted (a body this version does not read, a wallet
    /// or key the ledger does not know) is marked with the reason instead,
    /// passed over, and stays in the shared books, where the audit counts
    /// it.
    pub async fn post_shipped(&self) -> Result<usize, ClusterError> {
        if self.epoch().is_none() {
            return Ok(0);
        }
        let shipped = self.books.unposted(POST_BATCH).await?;
        // The round's records go to the log together, at the sync below.
        let _together = self.journal.gather();
        let posted = self.post_each(&shipped).await;
        let unrecorded = self.journal.posting_round_over();
        // Synced also when the round stopped short: the next round reads
        // from the mark, which moves only as the records reach the log, and
        // would post again a debit whose record was still waiting.
        let journal = self.journal.clone();
        let synced = tokio::task::spawn_blocking(move || crate::ledger::journal::Journal::sync(&journal))
            .await
            .map_err(|err| ClusterError::Unavailable(err.to_string()))
            .and_then(|synced| synced.map_err(|err| ClusterError::Unavailable(err.to_string())));
        let passed_over = posted?;
        synced?;
        // A debit that made no record (refused, or of nothing) moved no
        // mark. Every debit of the round is behind it now, so the mark
        // passes them all and none is read again.
        if let (true, Some(last), Some(epoch)) = (passed_over || unrecorded, shipped.last(), self.epoch()) {
            self.books.pass_posted(&self.settings.replica, epoch, last.post_seq).await?;
        }
        Ok(shipped.len())
    }

    /// Posts each debit; whether it passed over any without posting it.
    async fn post_each(&self, shipped: &[UnpostedDebit]) -> Result<bool, ClusterError> {
        let mut passed_over = false;
        for debit in shipped {
            let detail = match serde_json::from_str::<DebitDetail>(debit.body.get()) {
                Ok(detail) => detail,
                Err(err) => {
                    self.refuse_posting(debit, &format!("the debit's detail cannot be read: {err}")).await?;
                    passed_over = true;
                    continue;
                }
            };
            let wallet = detail.wallet;
            if debit.amount.is_zero() {
                // Costs nothing, so posting would make no record. A guard
                // only: shipments do not number such debits, and migration
                // 28 numbered none of those the queue held.
                passed_over = true;
                continue;
            }
            // The hold's time, by the replica's clock, bounded by the
            // lease's draw and the settle (as the settle time is).
            let made_at = detail.held_at.map_or(debit.at, |held_at| {
                debit.drawn_at.map_or(held_at, |drawn_at| held_at.max(drawn_at)).min(debit.at)
            });
            self.journal.will_post(detail.request_id, debit.post_seq);
            let posted = self.ledger.post_debit(
                detail.wallet,
                detail.request_id,
                detail.key,
                detail.end_user.as_deref(),
                detail.held,
                debit.amount,
                detail.details,
                made_at,
                debit.at,
            );
            match posted {
                Ok(_) => self.changed(wallet, false),
                // The journal stopped (this epoch is over): the rest are the
                // next treasurer's to post, never to be marked refused here.
                Err(SettleError::Unavailable { reason }) => return Err(ClusterError::Unavailable(reason)),
                Err(err) => {
                    self.refuse_posting(debit, &err.to_string()).await?;
                    passed_over = true;
                }
            }
        }
        Ok(passed_over)
    }

    async fn refuse_posting(&self, debit: &UnpostedDebit, reason: &str) -> Result<(), ClusterError> {
        tracing::error!(replica = %debit.replica, entry = debit.entry, %reason, "a shipped debit cannot be posted");
        let Some(epoch) = self.epoch() else { return Ok(()) };
        self.books.refuse_posting(&self.settings.replica, epoch, debit, reason).await
    }

    /// Renews the treasury. `false` once it is lost: the ledger then stops
    /// (its journal fails at its next append, and so does every change).
    pub async fn renew(&self) -> Result<bool, ClusterError> {
        self.renew_with(&self.books).await
    }

    async fn renew_with(&self, books: &Books) -> Result<bool, ClusterError> {
        let Some(epoch) = self.epoch() else { return Ok(false) };
        let renewed =
            books.claim_treasury(&self.settings.replica, Some(epoch), self.settings.treasury_ttl).await?;
        if renewed.is_none() {
            tracing::error!(replica = %self.settings.replica, epoch, "the treasury lapsed; this replica must restart");
            self.deposed.store(true, Ordering::Release);
            self.lost_treasury.store(true, Ordering::Release);
            self.ledger.set_following(true);
        }
        Ok(renewed.is_some())
    }

    /// Follows the log and keeps (or claims) the treasury until `shutdown`;
    /// then gives the treasury up so another replica takes it at once.
    ///
    /// A follower reads the log when `wakeups` says it grew, and tries for
    /// the treasury every `treasury_ttl / 6` and as soon as a treasurer
    /// steps down; the treasurer posts shipped debits when told there are
    /// some, and a thread of its own renews its term every `treasury_ttl / 6`.
    /// Without wake-ups (the listener is down) both poll every `poll`.
    pub async fn run(
        self: Arc<Self>,
        clock: Arc<dyn Clock>,
        wakeups: Arc<Wakeups>,
        shutdown: CancellationToken,
    ) {
        // Renewal runs apart from the posting work, which a busy moment can
        // keep going for longer than a term.
        let keeper_stop = CancellationToken::new();
        let keeper = self.clone().keep_treasury(keeper_stop.clone());
        // If this task ends before shutdown, the keeper must not renew a
        // term nobody uses (posting, ticks and replay would stop for the
        // whole cluster while no follower could claim it), and the replica
        // must restart.
        let mut ended =
            EndedBeforeShutdown { replica: self.clone(), keeper_stop: keeper_stop.clone(), finished: false };
        let mut last_claim: Option<tokio::time::Instant> = None;
        // When the books were last out of reach: after an outage the
        // treasurer, back too, renews its own term (its epoch is still the
        // books' own) before any follower may claim it, so an outage does
        // not depose it.
        let mut last_failure: Option<tokio::time::Instant> = None;
        let mut tick_at = tokio::time::Instant::now();
        // What there is to do: everything at first, what the last wake-up
        // said since, and everything again while no wake-ups are heard.
        let (mut read_log, mut post) = (true, true);
        loop {
            if !wakeups.listening() {
                (read_log, post) = (true, true);
            }
            // A full batch read or posted: go on at once, not after a wait.
            let mut more = false;
            let outcome = if self.epoch().is_some() {
                Ok(())
            } else {
                let claim_every = wakeups.fallback(self.settings.treasury_ttl / 6, self.settings.poll);
                let read = if std::mem::take(&mut read_log) { self.catch_up().await } else { Ok(0) };
                match read {
                    Ok(read) => {
                        more = read >= TAIL_BATCH_LEN;
                        read_log = more;
                        let settled =
                            last_failure.is_none_or(|at| at.elapsed() >= self.settings.treasury_ttl / 2);
                        if settled && last_claim.is_none_or(|at| at.elapsed() >= claim_every) {
                            last_claim = Some(tokio::time::Instant::now());
                            self.try_promote(clock.as_ref()).await.map(|promoted| post |= promoted)
                        } else {
                            Ok(())
                        }
                    }
                    Err(err) => {
                        read_log = true;
                        Err(err)
                    }
                }
            };
            if let Err(err) = outcome {
                last_failure = Some(tokio::time::Instant::now());
                tracing::warn!(error = %err, "cluster log");
            }
            if std::mem::take(&mut post) {
                match self.post_shipped().await {
                    Ok(posted) => {
                        post = posted >= POST_BATCH_LEN;
                        more |= post;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot post shipped debits");
                        post = true;
                    }
                }
            }
            if self.epoch().is_some() && tick_at.elapsed() >= Duration::from_secs(1) {
                // Idle wallets get their grants and write-offs on time.
                tick_at = tokio::time::Instant::now();
                self.ledger.tick(clock.now());
            }
            if more && !shutdown.is_cancelled() {
                tokio::task::yield_now().await;
                continue;
            }
            let treasurer = self.epoch().is_some();
            // The next renewal, claim or tick is due within the slow wait.
            let slow = (self.settings.treasury_ttl / 6).min(Duration::from_secs(1));
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = wakeups.log_appended(), if !treasurer => read_log = true,
                () = wakeups.treasury_released(), if !treasurer => last_claim = None,
                // Shipments from several replicas are gathered into one
                // posting round (one read and one append for all of them).
                () = wakeups.debits_shipped(), if treasurer => {
                    tokio::time::sleep(self.settings.gather).await;
                    post = true;
                }
                () = tokio::time::sleep(wakeups.fallback(slow, self.settings.poll)) => {}
            }
        }
        // No renewal may land after the step-down gives the term up.
        keeper_stop.cancel();
        if let Some(keeper) = keeper {
            let _ = keeper.await;
        }
        self.step_down().await;
        ended.finished = true;
    }

    /// Renews the treasury every `treasury_ttl / 6` while this replica
    /// holds it, until `stop`; the receiver hears when it stopped (`None`
    /// if its thread could not start: the term then lapses unrenewed).
    ///
    /// On a thread of its own, with a runtime and a connection of its own:
    /// neither a busy runtime (posting a large batch, a flood of requests)
    /// nor a pool drained by lease draws and shipments may delay it past
    /// the term.
    fn keep_treasury(self: Arc<Self>, stop: CancellationToken) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let (done, stopped) = tokio::sync::oneshot::channel();
        let books = match self.books.with_own_pool(1) {
            Ok(books) => books,
            Err(err) => {
                tracing::error!(error = %err, "cannot open the treasury keeper's connection");
                return None;
            }
        };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
        let runtime = match runtime {
            Ok(runtime) => runtime,
            Err(err) => {
                tracing::error!(error = %err, "cannot start the treasury keeper's runtime");
                return None;
            }
        };
        let keeper = move || {
            runtime.block_on(async {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(self.settings.treasury_ttl / 6) => {}
                    }
                    if self.epoch().is_none() || self.deposed.load(Ordering::Acquire) {
                        continue;
                    }
                    if let Err(err) = self.renew_with(&books).await {
                        tracing::warn!(error = %err, "cannot renew the treasury; retrying");
                    }
                }
            });
            let _ = done.send(());
        };
        match std::thread::Builder::new().name("creditgate-treasury".into()).spawn(keeper) {
            Ok(_) => Some(stopped),
            Err(err) => {
                tracing::error!(error = %err, "cannot start the treasury keeper's thread");
                None
            }
        }
    }

    /// Lets the journal drain and gives the treasury up.
    pub async fn step_down(&self) {
        let Some(epoch) = self.epoch.lock().take() else { return };
        // Its journal is closed for good: to lead again it must restart.
        self.deposed.store(true, Ordering::Release);
        self.ledger.set_following(true);
        self.journal.close();
        // What the ledger made goes to the log before the term is given up:
        // a follower that claims it then fences off every later append.
        let journal = self.journal.clone();
        let drained =
            tokio::task::spawn_blocking(move || journal.drain_within(STEP_DOWN_DRAIN)).await.unwrap_or(false);
        if !drained {
            // A tick's grants and write-offs are made again by the next
            // treasurer's tick, a posting by its posting (the posting mark
            // moves only with the log row); a change nobody synced was never
            // acknowledged.
            tracing::warn!(
                failure = self.journal.failure().as_deref().unwrap_or("none: still appending after 2 s"),
                "records of the stepping-down treasurer are not all in the log"
            );
        }
        if let Err(err) = self.books.release_treasury(&self.settings.replica, epoch).await {
            tracing::warn!(error = %err, "cannot release the treasury; it lapses by itself");
        }
    }
}

impl Books {
    /// Up to `limit` shipped debits not yet posted, in the order they were
    /// numbered as they shipped.
    pub async fn unposted(&self, limit: i64) -> Result<Vec<UnpostedDebit>, ClusterError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                // Read along cg_debits_post_seq from the mark. The lease's
                // draw, in the database's time, bounds when the debit can
                // have settled whatever the replica's clock says. And it
                // settled before it was shipped (the database's clock
                // again): a replica whose clock runs ahead cannot move the
                // books into its future.
                "SELECT d.replica, d.entry, d.amount, LEAST(GREATEST(d.at, l.drawn_at), d.shipped_at), d.body,
                        l.drawn_at, d.post_seq
                 FROM (SELECT * FROM cg_debits
                       WHERE post_seq > (SELECT posted_through FROM cg_posting) AND post_error IS NULL
                       ORDER BY post_seq LIMIT $1) d
                 LEFT JOIN LATERAL (SELECT drawn_at FROM cg_leases l WHERE l.id = d.lease) l ON true
                 ORDER BY d.post_seq",
            )
            .await?;
        let rows = client.query(&statement, &[&limit]).await?;
        // A row this version cannot read is an error to log and retry, not
        // a panic that would stop the treasurer's posting.
        rows.iter()
            .map(|row| {
                Ok(UnpostedDebit {
                    replica: row.try_get(0)?,
                    entry: row.try_get(1)?,
                    post_seq: row.try_get(6)?,
                    amount: row.try_get(2)?,
                    at: row.try_get(3)?,
                    drawn_at: row.try_get(5)?,
                    body: row
                        .try_get::<_, tokio_postgres::types::Json<Box<serde_json::value::RawValue>>>(4)?
                        .0,
                })
            })
            .collect()
    }

    /// Moves the posting mark up to `post_seq`, for a round whose last
    /// debits made no record; only while `treasurer` holds `epoch`.
    pub async fn pass_posted(&self, treasurer: &str, epoch: i64, post_seq: i64) -> Result<(), ClusterError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE cg_posting SET posted_through = $3 WHERE posted_through < $3
                   AND EXISTS (SELECT 1 FROM cg_treasurer WHERE epoch = $2 AND replica = $1)",
                &[&treasurer, &epoch, &post_seq],
            )
            .await?;
        Ok(())
    }

    /// Marks a shipped debit that cannot be posted with the reason, so
    /// posting passes over it; only while `treasurer` holds `epoch`, so a
    /// deposed treasurer marks nothing, and only while it is unposted.
    pub async fn refuse_posting(
        &self,
        treasurer: &str,
        epoch: i64,
        debit: &UnpostedDebit,
        reason: &str,
    ) -> Result<(), ClusterError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE cg_debits d SET post_error = $3
                 WHERE d.replica = $1 AND d.entry = $2 AND d.post_error IS NULL
                   AND d.post_seq > (SELECT posted_through FROM cg_posting)
                   AND EXISTS (SELECT 1 FROM cg_treasurer WHERE epoch = $4 AND replica = $5)",
                &[&debit.replica, &debit.entry, &reason, &epoch, &treasurer],
            )
            .await?;
        Ok(())
    }

    /// Renews `epoch` for `replica`, or (with `None`) takes a vacant or
    /// lapsed treasury; the epoch held afterwards, if any.
    pub async fn claim_treasury(
        &self,
        replica: &str,
        epoch: Option<i64>,
        ttl: Duration,
    ) -> Result<Option<i64>, ClusterError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        retrying(|| async {
            let client = self.client().await?;
            let statement =
                client.prepare_cached("SELECT cg_claim_treasury($1, $2, $3), clock_timestamp()").await?;
            let row = client.query_one(&statement, &[&replica, &epoch, &ttl_ms]).await?;
            if let Some(clock) = &self.clock {
                clock.observe(row.get(1));
            }
            Ok(row.get(0))
        })
        .await
    }

    /// Lets `epoch` lapse now.
    pub async fn release_treasury(&self, replica: &str, epoch: i64) -> Result<(), ClusterError> {
        let client = self.client().await?;
        client.execute("SELECT cg_release_treasury($1, $2)", &[&replica, &epoch]).await?;
        Ok(())
    }

    /// Appends the treasurer's records (origin = its sequence number) and
    /// moves the shared books with them, in one transaction;
    /// [`ClusterError::Fenced`] once `epoch` is over.
    pub async fn append_books(
        &self,
        epoch: i64,
        replica: &str,
        records: &[Appended],
    ) -> Result<(), ClusterError> {
        let origins: Vec<i64> = records.iter().map(|record| record.origin).collect();
        let bodies: Vec<&[u8]> = records.iter().map(|record| record.body.as_slice()).collect();
        fn funding(record: &Appended) -> Option<&(String, i64, Decimal)> {
            record.funding.as_ref()
        }
        let wallets: Vec<Option<&str>> = records.iter().map(|r| funding(r).map(|f| f.0.as_str())).collect();
        let orgs: Vec<Option<i64>> = records.iter().map(|r| funding(r).map(|f| f.1)).collect();
        let deltas: Vec<Option<Decimal>> = records.iter().map(|r| funding(r).map(|f| f.2)).collect();
        // As text: the functions kept their signatures (migration 28).
        let posts: Vec<Option<String>> = records.iter().map(|r| r.posts.map(|seq| seq.to_string())).collect();
        let moves =
            || records.iter().flat_map(|record| record.lots.iter().map(move |lot| (record.origin, lot)));
        let lot_origins: Vec<i64> = moves().map(|(origin, _)| origin).collect();
        let lot_wallets: Vec<&str> = moves().map(|(_, lot)| lot.wallet.as_str()).collect();
        let lot_ids: Vec<i64> = moves().map(|(_, lot)| lot.lot).collect();
        let lot_expires: Vec<Option<DateTime<Utc>>> = moves().map(|(_, lot)| lot.expires_at).collect();
        let lot_deltas: Vec<Decimal> = moves().map(|(_, lot)| lot.delta).collect();
        let outcome = retrying(|| async {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(
                    "SELECT cg_append_books($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                )
                .await?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 13] = [
                &epoch,
                &replica,
                &origins,
                &bodies,
                &wallets,
                &orgs,
                &deltas,
                &posts,
                &lot_origins,
                &lot_wallets,
                &lot_ids,
                &lot_expires,
                &lot_deltas,
            ];
            client.query_one(&statement, &params).await?;
            Ok(())
        })
        .await;
        fenced(outcome, epoch)
    }

    /// Writes the treasurer's live lots whole (on taking the treasury, before
    /// its first append), so leases are bounded by their expiry from then on.
    pub async fn publish_lots(
        &self,
        epoch: i64,
        replica: &str,
        lots: &[(WalletId, Lot)],
    ) -> Result<(), ClusterError> {
        let wallets: Vec<String> = lots.iter().map(|(wallet, _)| wallet.to_string()).collect();
        let ids: Vec<i64> = lots.iter().map(|(_, lot)| i64::try_from(lot.id.0).unwrap_or(i64::MAX)).collect();
        let expires: Vec<DateTime<Utc>> = lots.iter().map(|(_, lot)| lot.expires_at).collect();
        let remaining: Vec<Decimal> = lots.iter().map(|(_, lot)| lot.remaining).collect();
        let outcome = retrying(|| async {
            let client = self.client().await?;
            let statement = client.prepare_cached("SELECT cg_publish_lots($1, $2, $3, $4, $5, $6)").await?;
            client.execute(&statement, &[&epoch, &replica, &wallets, &ids, &expires, &remaining]).await?;
            Ok(())
        })
        .await;
        fenced(outcome, epoch)
    }
}

/// [`ClusterError::Fenced`] for the books' refusal of an `epoch` that is over.
fn fenced(outcome: Result<(), ClusterError>, epoch: i64) -> Result<(), ClusterError> {
    match outcome {
        Err(ClusterError::Statement(err))
            if err.as_db_error().is_some_and(|db| db.code().code() == "CG001") =>
        {
            Err(ClusterError::Fenced(epoch))
        }
        other => other,
    }
}
