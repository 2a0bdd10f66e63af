//! A replica's side of the leases: holds and settles run in memory against
//! leased credit; the database is met only to draw, renew, ship and give
//! back, in the background except when a hold finds no lease to cover it.
//!
//! Per wallet the book keeps its open leases, each with what is still free
//! to hold (`free = granted - held - spent`). A hold takes from one lease;
//! its settle returns `held - debit` to that lease and queues the debit in
//! the outbox. A lease that is near its deadline takes no new holds, and a
//! lease is given back only when no hold on it is open and its debits have
//! shipped, so the database always learns a lease's spend before it returns
//! the rest to the wallet.
//!
//! A lease left idle for `target` is given back at the next maintenance
//! round, so credit parked on a replica that stopped seeing the wallet's
//! traffic returns to the others within `target` plus one round: that is
//! how long a hold elsewhere can be refused while credit sits unused.

use std::collections::{HashMap, HashSet};

use dashmap::DashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use rust_decimal::Decimal;

use super::books::{empty_detail, Books, ShippedDebit};
use super::ClusterError;
use crate::telemetry::metrics::ClusterMetrics;

/// How often a hold waiting for credit that other replicas' leases hold
/// asks again ([`LeaseSettings::leased_elsewhere_wait`]): at first soon,
/// then less often, so a wallet that is truly spent costs the database a
/// few statements rather than one every few milliseconds.
const LEASED_ELSEWHERE_RETRY: Duration = Duration::from_millis(10);
const LEASED_ELSEWHERE_RETRY_MAX: Duration = Duration::from_millis(50);
/// Longest a request waits on the database (draws, balance checks, a limit
/// row): a database that stops answering without closing its connections
/// (a partition, a frozen host) is then a 503, as a refused connection is,
/// instead of requests that hang until their clients give up.
const REQUEST_WAIT: Duration = Duration::from_secs(5);
/// How long a replica that gave a wallet's leases up to another's ask keeps
/// from drawing on it: several of the asker's tries.
const YIELD_TO_ASKER: Duration = Duration::from_millis(200);

/// How leases are sized and kept.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// The replica's name in the books (unique per data directory).
    pub replica: String,
    /// A lease's lifetime from its last renewal.
    pub ttl: Duration,
    /// How far before its deadline a lease stops taking holds.
    pub safety: Duration,
    /// The window a wallet's spend rate is measured over, and how long a
    /// lease may sit idle before it is given back.
    pub target: Duration,
    /// How much spend a lease aims to cover (about this long of it).
    pub cover: Duration,
    /// The smallest lease worth drawing when the wallet has more.
    pub min_lease: Decimal,
    /// The largest lease.
    pub max_lease: Decimal,
    /// Longest a hold waits for credit that other replicas' leases hold
    /// (near empty) before it is refused.
    pub leased_elsewhere_wait: Duration,
    /// How long a replica remembers that a wallet's balance in the books
    /// was below a hold it refused: a hold at least that large is refused
    /// again without a statement. A balance falls with every debit and
    /// rises only by funding, so within this a purchase waits at most this
    /// long to be spendable on a replica that just refused the wallet, and
    /// a wallet that is spent costs the books two statements per replica
    /// per this, not two per request.
    pub short_memory: Duration,
}

impl LeaseSettings {
    /// Credit that expires within this is not leased, so a lease bounded by
    /// the next expiry is usable for at least `target`.
    pub fn horizon(&self) -> Duration {
        self.safety + self.target
    }

    /// Defaults: 10 s leases renewed every 2.5 s, 4 s of spend each, given
    /// back after 1 s idle; a hold waits up to 0.5 s for credit leased
    /// elsewhere, and a short balance is remembered for 0.5 s.
    pub fn new(replica: impl Into<String>) -> LeaseSettings {
        LeaseSettings {
            replica: replica.into(),
            ttl: Duration::from_secs(10),
            safety: Duration::from_secs(2),
            target: Duration::from_secs(1),
            cover: Duration::from_secs(4),
            min_lease: Decimal::new(1, 2),
            max_lease: Decimal::new(100, 0),
            leased_elsewhere_wait: Duration::from_millis(500),
            short_memory: Duration::from_millis(500),
        }
    }
}

/// Why a hold was not covered.
#[derive(Debug, thiserror::Error)]
pub enum LeaseRefusal {
    /// The database says the wallet cannot cover it (402).
    #[error("the wallet's credit does not cover {required}")]
    InsufficientCredit {
        /// The hold asked for.
        required: Decimal,
    },
    /// No lease covers it and the database could not be asked (503).
    #[error("no lease covers the hold and the books are unavailable: {0}")]
    Unavailable(ClusterError),
}

/// Credit held under a lease; give it to [`LeaseBook::settle`] or
/// [`LeaseBook::release`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a lease hold keeps its credit until settled or released"]
pub struct LeaseHold {
    wallet: String,
    lease: i64,
    amount: Decimal,
}

impl LeaseHold {
    /// The lease it was taken from.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// The amount held.
    pub fn amount(&self) -> Decimal {
        self.amount
    }
}

#[derive(Debug)]
struct Lease {
    id: i64,
    /// Still free to hold; may go below zero when a debit exceeded its hold.
    free: Decimal,
    open_holds: u32,
    /// Debits settled under it that have not shipped yet.
    unshipped: u32,
    /// When it stops taking holds, on this process's clock.
    usable_until: Instant,
    /// Set once it stopped being usable: give it back when idle.
    retiring: bool,
    /// The books granted less than was asked: the wallet is near empty, so
    /// what this lease cannot use is given back at once.
    short: bool,
    /// When its draw returned: a renewal sent before then may not name it;
    /// one sent after names it while it is open.
    drawn_at: Instant,
}

#[derive(Debug, Default)]
struct WalletLeases {
    leases: Vec<Lease>,
    /// Debits settled in the current rate window, and when it began.
    window_spend: Decimal,
    window_start: Option<Instant>,
    /// Spend per `target`, smoothed over windows.
    rate: Decimal,
    /// The largest hold asked for: a refill smaller than it is no use.
    largest_hold: Decimal,
    /// When the wallet last took a hold here: no refill for a quiet wallet.
    last_hold: Option<Instant>,
    refill_running: bool,
    /// Until when this replica leaves the wallet's credit to the replica that
    /// asked for it (`cg_wanted`): its own draws wait, or the credit it gave
    /// back would be drawn again here before the asker's next try.
    yielding_until: Option<Instant>,
    /// The wallet's balance in the books when a hold larger than it was
    /// refused, and until when that is trusted ([`LeaseSettings::short_memory`]).
    short: Option<(Instant, Decimal)>,
}

impl WalletLeases {
    fn free(&self, now: Instant) -> Decimal {
        self.leases
            .iter()
            .filter(|lease| !lease.retiring && lease.usable_until > now && lease.free > Decimal::ZERO)
            .map(|lease| lease.free)
            .sum()
    }

    fn record_spend(&mut self, amount: Decimal, now: Instant, target: Duration) {
        let start = *self.window_start.get_or_insert(now);
        self.window_spend += amount;
        if now.duration_since(start) >= target {
            // Half the old rate, half the last window: quick to follow a
            // burst, quick to forget one.
            self.rate = (self.rate + self.window_spend) / Decimal::TWO;
            if self.window_spend.is_zero() {
                // A quiet window: the wallet's traffic has moved on.
                self.largest_hold = Decimal::ZERO;
                if self.rate < Decimal::new(1, 9) {
                    self.rate = Decimal::ZERO;
                }
            }
            self.window_spend = Decimal::ZERO;
            self.window_start = Some(now);
        }
    }
}

/// A replica's leases and outbox.
pub struct LeaseBook {
    books: Books,
    /// Where the renewals go: the books' pool, unless
    /// [`LeaseBook::with_renewal_pool`] gives them one of their own (a
    /// replica's does), so draws and shipments that fill the pool (a slow
    /// database) cannot hold up the statement that keeps every lease of
    /// this replica alive.
    renewals: Books,
    settings: LeaseSettings,
    wallets: DashMap<String, Arc<Mutex<WalletLeases>>>,
    /// The caps (with their versions) this book set on limit rows, so each
    /// is set once per change.
    limit_caps: DashMap<String, (Decimal, u64)>,
    /// Serializes draws per wallet so concurrent misses share one draw.
    drawing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    outbox: Mutex<Outbox>,
    /// Where the outbox is kept until shipped (the replica's data
    /// directory); `None` keeps it in memory only.
    durable: Option<DurableOutbox>,
    next_entry: AtomicI64,
    holds: AtomicU64,
    metrics: Option<ClusterMetrics>,
    /// Wallets whose leases ran low on a hold, waiting for a refill.
    refills: Mutex<Vec<(String, Decimal)>>,
    /// Set when a settle left a lease that cannot cover another hold.
    spent_leases: std::sync::atomic::AtomicBool,
    /// Wakes the errand task: refills wanted, or spent leases to give back.
    refill_wanted: tokio::sync::Notify,
    /// Set when the outbox may hold debits not on disk (a settle, a
    /// shipment put back, a failed flush); a flush takes it before it reads
    /// the outbox, so a debit pushed meanwhile sets it again.
    unflushed: std::sync::atomic::AtomicBool,
    /// Batches out for shipping now: each one's size and oldest settle,
    /// still unshipped (a shipment can hang for as long as the database).
    shipping: Mutex<Vec<(u64, usize, Instant)>>,
    next_shipment: AtomicU64,
}

/// Debits settled on this replica and not yet in the shared books.
#[derive(Clone, Copy, Debug)]
pub struct Unshipped {
    pub debits: usize,
    /// When the oldest of them was settled.
    pub oldest: Option<Instant>,
}

/// A batch taken from the outbox to ship: put back in front if the
/// shipment is dropped or fails, with a flush asked for when it holds
/// debits not yet on disk.
struct OutForShipping<'a> {
    book: &'a LeaseBook,
    batch: Option<Outbox>,
    /// Its place in the book's list of shipments out.
    ticket: u64,
}

impl<'a> OutForShipping<'a> {
    fn new(book: &'a LeaseBook, batch: Outbox) -> OutForShipping<'a> {
        let ticket = book.next_shipment.fetch_add(1, Ordering::Relaxed);
        if let Some(oldest) = batch.queued.first() {
            book.shipping.lock().push((ticket, batch.debits.len(), *oldest));
        }
        OutForShipping { book, batch: Some(batch), ticket }
    }

    fn debits(&self) -> &[ShippedDebit] {
        self.batch.as_ref().map_or(&[], |batch| &batch.debits)
    }

    /// The batch, shipped: nothing goes back.
    fn landed(mut self) -> Outbox {
        self.book.no_longer_shipping(self.ticket);
        self.batch.take().unwrap_or_default()
    }
}

impl Drop for OutForShipping<'_> {
    fn drop(&mut self) {
        if let Some(batch) = self.batch.take() {
            self.book.no_longer_shipping(self.ticket);
            // Refused, or cut off while it waited (a round's time ran out).
            if let Some(metrics) = &self.book.metrics {
                metrics.shipment_failures.inc();
            }
            let unflushed = batch.chunks.iter().any(Option::is_none);
            self.book.outbox.lock().put_back(batch);
            // After the put-back: a flush that takes the flag then writes them.
            if unflushed {
                self.book.unflushed.store(true, Ordering::Release);
            }
        }
    }
}

/// The waiting end of a draw. The grant can arrive between a request's
/// polls, and the request be dropped before the next (its client left, its
/// wait ran out): dropped with a grant in it, it gives the lease back, as
/// the drawing task does when nobody waits any more.
struct AwaitingGrant {
    received: tokio::sync::oneshot::Receiver<Result<Option<super::books::LeaseGrant>, ClusterError>>,
    books: Books,
    replica: String,
}

impl Drop for AwaitingGrant {
    fn drop(&mut self) {
        self.received.close();
        if let Ok(Ok(Some(grant))) = self.received.try_recv() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(give_back_unheard(self.books.clone(), self.replica.clone(), grant.id));
                }
                Err(_) => tracing::warn!("a lease drawn for a cancelled hold is left to expire"),
            }
        }
    }
}

/// Gives back a lease drawn for a hold that stopped waiting.
async fn give_back_unheard(books: Books, replica: String, lease: i64) {
    if let Err(error) = books.give_back(&replica, &[lease]).await {
        tracing::warn!(%error, "a lease drawn for a cancelled hold is left to expire");
    }
}

/// `work` on the database, bounded by [`REQUEST_WAIT`].
async fn within_request_wait<T>(
    work: impl std::future::Future<Output = Result<T, ClusterError>>,
) -> Result<T, ClusterError> {
    tokio::time::timeout(REQUEST_WAIT, work).await.unwrap_or_else(|_| Err(no_answer()))
}

fn no_answer() -> ClusterError {
    ClusterError::Unavailable(format!("the database did not answer within {} s", REQUEST_WAIT.as_secs()))
}

/// Settled debits waiting to ship, in settle order, when each was queued
/// (for the outbox lag), and the chunk on disk that keeps it (`None` until
/// the next flush writes it).
#[derive(Default)]
struct Outbox {
    debits: Vec<ShippedDebit>,
    queued: Vec<Instant>,
    chunks: Vec<Option<u64>>,
}

impl Outbox {
    fn push(&mut self, debit: ShippedDebit, at: Instant, chunk: Option<u64>) {
        self.debits.push(debit);
        self.queued.push(at);
        self.chunks.push(chunk);
    }

    /// Puts a batch that failed to ship back in front, keeping settle order.
    fn put_back(&mut self, mut batch: Outbox) {
        batch.debits.append(&mut self.debits);
        batch.queued.append(&mut self.queued);
        batch.chunks.append(&mut self.chunks);
        *self = batch;
    }
}

/// The outbox on disk. Each flush writes the debits settled since the last
/// one as a single chunk (one sled key, a JSON array), not one key per
/// settle, and a chunk is removed once every debit in it has shipped. Until
/// the flush a debit is in memory only, as it was in sled's own cache
/// before: a crash loses what was settled since the last flush, not more.
struct DurableOutbox {
    tree: sled::Tree,
    /// sled's data file, `fdatasync`ed after each flush: sled's own flush
    /// (`sync_file_range`) survives a process crash, not a machine's (see
    /// `SledStore::flushed_to_disk`). `None` where the caller gave none.
    file: Option<Arc<std::fs::File>>,
    /// Writing a chunk and removing one take turns, so a chunk is never
    /// removed before it was written (it would then stay on disk for good).
    chunks: Mutex<Chunks>,
}

#[derive(Default)]
struct Chunks {
    next: u64,
    /// Debits of each chunk on disk that have not shipped.
    unshipped: HashMap<u64, usize>,
    /// Chunks whose write, flush or sync failed: their debits are written
    /// again by a later flush, and the chunk goes once none is left in it.
    failed: HashSet<u64>,
    /// Chunks written since the last sync that succeeded. A failed sync
    /// fails them all: the kernel may have dropped their pages and marked
    /// them clean, and a later sync that succeeds would not bring them back.
    unsynced: HashSet<u64>,
}

impl Chunks {
    /// `moved` debits of `chunk` are written in another chunk now: the
    /// chunk goes from the disk once none of its debits is left in it
    /// (a shipment may have some of them out).
    fn moved_out(&mut self, tree: &sled::Tree, chunk: u64, moved: usize) {
        let left = self.unshipped.get(&chunk).map_or(0, |left| left.saturating_sub(moved));
        if left > 0 {
            self.unshipped.insert(chunk, left);
            return;
        }
        self.forget(chunk);
        // A failed removal only ships its debits again at the next start:
        // they are unique by entry.
        let _ = tree.remove(chunk.to_be_bytes());
    }

    fn forget(&mut self, chunk: u64) {
        self.unshipped.remove(&chunk);
        self.failed.remove(&chunk);
        self.unsynced.remove(&chunk);
    }
}

/// Reads an outbox value: a chunk, or one debit as written before chunks.
fn read_outbox_value(value: &[u8]) -> Result<Vec<ShippedDebit>, serde_json::Error> {
    if value.first() == Some(&b'[') {
        serde_json::from_slice(value)
    } else {
        serde_json::from_slice(value).map(|debit| vec![debit])
    }
}

impl std::fmt::Debug for LeaseBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseBook").field("replica", &self.settings.replica).finish_non_exhaustive()
    }
}

/// Deadline on this process's clock for a database deadline, less `safety`.
fn usable_until(lifetime: Duration, safety: Duration, asked_at: Instant) -> Instant {
    // Counted from when the request was sent, so the round trip only makes
    // the local deadline earlier, never later.
    asked_at + lifetime.saturating_sub(safety)
}

impl LeaseBook {
    /// A book for one replica; `first_entry` numbers its debits (restart it
    /// above every number this replica shipped before).
    pub fn new(books: Books, settings: LeaseSettings, first_entry: i64) -> LeaseBook {
        LeaseBook {
            renewals: books.clone(),
            books,
            settings,
            wallets: DashMap::new(),
            limit_caps: DashMap::new(),
            drawing: Mutex::new(HashMap::new()),
            outbox: Mutex::new(Outbox::default()),
            durable: None,
            next_entry: AtomicI64::new(first_entry),
            holds: AtomicU64::new(0),
            metrics: None,
            refills: Mutex::new(Vec::new()),
            spent_leases: std::sync::atomic::AtomicBool::new(false),
            unflushed: std::sync::atomic::AtomicBool::new(false),
            shipping: Mutex::new(Vec::new()),
            next_shipment: AtomicU64::new(0),
            refill_wanted: tokio::sync::Notify::new(),
        }
    }

    /// A book whose outbox is kept in `tree` until shipped. Debits a
    /// previous run left there are queued first, and new ones are numbered
    /// above them and above `first_entry`.
    pub fn with_outbox(
        books: Books,
        settings: LeaseSettings,
        first_entry: i64,
        tree: sled::Tree,
    ) -> Result<LeaseBook, ClusterError> {
        let mut pending = Outbox::default();
        let mut chunks = Chunks::default();
        let now = Instant::now();
        let mut read = Vec::new();
        for item in tree.iter() {
            let (key, value) = item.map_err(|err| ClusterError::Config(format!("outbox: {err}")))?;
            let chunk = <[u8; 8]>::try_from(key.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| ClusterError::Schema("an outbox key is not 8 bytes long".into()))?;
            let debits = read_outbox_value(&value)
                .map_err(|err| ClusterError::Schema(format!("outbox record cannot be read: {err}")))?;
            chunks.next = chunks.next.max(chunk + 1);
            read.push((chunk, debits));
        }
        // A debit written again after a failed sync may be in two chunks
        // (the first kept while a shipment had some of its debits out): it
        // is queued once, from the later chunk, and a chunk left with none
        // goes.
        let mut latest: HashMap<i64, u64> = HashMap::new();
        for (chunk, debits) in &read {
            for debit in debits {
                latest.insert(debit.entry, *chunk);
            }
        }
        for (chunk, debits) in read {
            let mine: Vec<ShippedDebit> =
                debits.into_iter().filter(|debit| latest[&debit.entry] == chunk).collect();
            if mine.is_empty() {
                let _ = tree.remove(chunk.to_be_bytes());
                continue;
            }
            chunks.unshipped.insert(chunk, mine.len());
            for debit in mine {
                pending.push(debit, now, Some(chunk));
            }
        }
        let next = pending.debits.iter().map(|debit| debit.entry + 1).max().unwrap_or(0).max(first_entry);
        let mut book = LeaseBook::new(books, settings, next);
        *book.outbox.get_mut() = pending;
        book.durable = Some(DurableOutbox { tree, file: None, chunks: Mutex::new(chunks) });
        Ok(book)
    }

    /// Syncs `file` (the outbox's sled data file) after each outbox flush.
    pub fn syncing_outbox_file(mut self, file: std::fs::File) -> LeaseBook {
        if let Some(durable) = &mut self.durable {
            durable.file = Some(Arc::new(file));
        }
        self
    }

    /// Debits a previous run of this replica left unshipped are shipped,
    /// then every lease it still had open is given back: this run does not
    /// know them, and would otherwise keep renewing them. Call once, before
    /// serving.
    pub async fn recover(&self) -> Result<Decimal, ClusterError> {
        self.ship().await?;
        let open = self.books.open_leases(&self.settings.replica).await?;
        if open.is_empty() {
            return Ok(Decimal::ZERO);
        }
        self.books.give_back(&self.settings.replica, &open).await
    }

    /// Renewals through `books` (a pool of their own, see [`Books::with_own_pool`]).
    pub fn with_renewal_pool(mut self, books: Books) -> LeaseBook {
        self.renewals = books;
        self
    }

    /// A book that records its draw times and outbox lag in `metrics`.
    pub fn with_metrics(mut self, metrics: Option<ClusterMetrics>) -> LeaseBook {
        self.metrics = metrics;
        self
    }

    /// Makes the outbox durable (what was settled so far survives a crash):
    /// writes the debits not on disk yet, and those of chunks that failed,
    /// as one chunk, then flushes and syncs. A failed flush or sync fails
    /// every chunk not known synced, so the next flush writes their debits
    /// again rather than trust pages the kernel may have dropped.
    pub async fn flush_outbox(&self) -> Result<(), ClusterError> {
        let Some(durable) = &self.durable else { return Ok(()) };
        self.unflushed.store(false, Ordering::Release);
        let flushed = self.write_and_sync(durable).await;
        if flushed.is_err() {
            self.unflushed.store(true, Ordering::Release);
        }
        flushed
    }

    async fn write_and_sync(&self, durable: &DurableOutbox) -> Result<(), ClusterError> {
        // Written under the lock, flushed after it: a shipment may remove
        // the chunk before the flush (sled keeps both in order), so no
        // settle's ship waits on the disk.
        let syncing = {
            let mut chunks = durable.chunks.lock();
            let chunk = chunks.next;
            chunks.next += 1;
            let mut moved: HashMap<u64, usize> = HashMap::new();
            let written = {
                let mut outbox = self.outbox.lock();
                let Outbox { debits, chunks: on_disk, .. } = &mut *outbox;
                let fresh: Vec<&ShippedDebit> = debits
                    .iter()
                    .zip(on_disk.iter_mut())
                    .filter(|(_, on_disk)| on_disk.is_none_or(|chunk| chunks.failed.contains(&chunk)))
                    .map(|(debit, on_disk)| {
                        if let Some(old) = on_disk.replace(chunk) {
                            *moved.entry(old).or_default() += 1;
                        }
                        debit
                    })
                    .collect();
                (!fresh.is_empty()).then(|| (fresh.len(), serde_json::to_vec(&fresh)))
            };
            if let Some((count, value)) = written {
                let kept = value.map_err(|err| err.to_string()).and_then(|value| {
                    durable.tree.insert(chunk.to_be_bytes(), value).map_err(|err| err.to_string())
                });
                if let Err(error) = kept {
                    chunks.failed.insert(chunk);
                    return Err(ClusterError::Unavailable(format!("outbox write: {error}")));
                }
                chunks.unshipped.insert(chunk, count);
                chunks.unsynced.insert(chunk);
                // Removed after the new chunk went in: sled keeps the two in
                // order, so no crash finds the old gone and the new missing.
                for (old, count) in moved {
                    chunks.moved_out(&durable.tree, old, count);
                }
            }
            if chunks.unsynced.is_empty() {
                return Ok(()); // Nothing new, and all of it synced.
            }
            chunks.unsynced.clone()
        };
        let synced = self.flush_and_sync(durable).await;
        let mut chunks = durable.chunks.lock();
        match synced {
            Ok(()) => chunks.unsynced.retain(|chunk| !syncing.contains(chunk)),
            Err(_) => {
                let unsynced = std::mem::take(&mut chunks.unsynced);
                chunks.failed.extend(unsynced);
            }
        }
        synced
    }

    async fn flush_and_sync(&self, durable: &DurableOutbox) -> Result<(), ClusterError> {
        durable
            .tree
            .flush_async()
            .await
            .map_err(|err| ClusterError::Unavailable(format!("outbox flush: {err}")))?;
        let Some(file) = durable.file.clone() else { return Ok(()) };
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(|err| ClusterError::Unavailable(format!("outbox sync: {err}")))?
            .map_err(|err| ClusterError::Unavailable(format!("outbox sync: {err}")))
    }

    /// Takes the debits written in a chunk that was synced, leaving the rest
    /// for the next flush.
    fn take_on_disk(&self) -> Outbox {
        let Some(durable) = &self.durable else { return std::mem::take(&mut *self.outbox.lock()) };
        // The chunks' lock first, as a flush takes them.
        let chunks = durable.chunks.lock();
        let mut outbox = self.outbox.lock();
        let mut taken = Outbox::default();
        let mut left = Outbox::default();
        let Outbox { debits, queued, chunks: on_disk } = std::mem::take(&mut *outbox);
        for ((debit, at), chunk) in debits.into_iter().zip(queued).zip(on_disk) {
            // Written and synced: a chunk whose sync is running may yet fail.
            let written = chunk
                .is_some_and(|chunk| !chunks.failed.contains(&chunk) && !chunks.unsynced.contains(&chunk));
            let to = if written { &mut taken } else { &mut left };
            to.push(debit, at, chunk);
        }
        *outbox = left;
        taken
    }

    /// Removes the chunks on disk whose debits have all shipped now.
    /// Synchronous: it runs after a shipment landed, where a drop of the
    /// caller (a hold's request) must not leave a shipped chunk counted.
    fn forget_shipped(&self, shipped: &[Option<u64>]) {
        let Some(durable) = &self.durable else { return };
        let mut chunks = durable.chunks.lock();
        for chunk in shipped.iter().flatten() {
            let Some(left) = chunks.unshipped.get_mut(chunk) else { continue };
            *left = left.saturating_sub(1);
            if *left == 0 {
                chunks.forget(*chunk);
                // A failed removal only ships its debits again at the next
                // start: they are unique by entry.
                let _ = durable.tree.remove(chunk.to_be_bytes());
            }
        }
    }

    /// Every wallet's cell, so no map shard is locked while one is used.
    fn snapshot(&self) -> Vec<(String, Arc<Mutex<WalletLeases>>)> {
        self.wallets.iter().map(|entry| (entry.key().clone(), entry.value().clone())).collect()
    }

    fn wallet(&self, wallet: &str) -> Arc<Mutex<WalletLeases>> {
        // A lookup by `&str` first: no allocation on the hot path.
        if let Some(cell) = self.wallets.get(wallet) {
            return cell.clone();
        }
        self.wallets.entry(wallet.to_owned()).or_default().clone()
    }

    /// Credit reached `wallet` (a purchase, grant or adjustment this
    /// replica's view replayed): the books' balance it last refused on is
    /// stale, so the next hold asks them again.
    pub fn credit_arrived(&self, wallet: &str) {
        if let Some(cell) = self.wallets.get(wallet) {
            cell.lock().short = None;
        }
    }

    /// Holds granted and database operations sent so far: their ratio is
    /// the database cost per request.
    pub fn stats(&self) -> (u64, u64) {
        (self.holds.load(Ordering::Relaxed), self.books.operations())
    }

    /// Makes sure the books' row for a limit period carries `cap`, set by
    /// the record numbered `version`, unless a newer record set it (one
    /// statement the first time, and again only when the cap changed).
    pub async fn set_limit(
        &self,
        name: &str,
        org: i64,
        cap: Decimal,
        version: u64,
    ) -> Result<(), ClusterError> {
        if self.limit_caps.get(name).is_some_and(|known| *known == (cap, version)) {
            return Ok(());
        }
        // Refused when this replica's view lags a newer cap: the row keeps
        // that one, and holds here draw on it until the view catches up.
        within_request_wait(self.books.set_limit(name, org, cap, version)).await?;
        self.limit_caps.insert(name.to_owned(), (cap, version));
        // A new cap may leave headroom the last refusal did not see.
        self.wallet(name).lock().short = None;
        Ok(())
    }

    /// Holds `amount` from a lease on `wallet`, drawing one first if none
    /// covers it.
    pub async fn hold(&self, wallet: &str, amount: Decimal) -> Result<LeaseHold, LeaseRefusal> {
        // Dropped at the deadline wherever it waits: a draw still on its way
        // gives its lease back, a shipment puts its batch back.
        let hold = match tokio::time::timeout(REQUEST_WAIT, self.hold_inner(wallet, amount)).await {
            Ok(hold) => hold,
            Err(_) => Err(LeaseRefusal::Unavailable(no_answer())),
        };
        if hold.is_ok() {
            self.holds.fetch_add(1, Ordering::Relaxed);
        }
        hold
    }

    async fn hold_inner(&self, wallet: &str, amount: Decimal) -> Result<LeaseHold, LeaseRefusal> {
        if let Some(hold) = self.take(wallet, amount) {
            return Ok(hold);
        }
        {
            let cell = self.wallet(wallet);
            let mut state = cell.lock();
            state.largest_hold = state.largest_hold.max(amount);
            // The books said a moment ago that the wallet holds less than this.
            if state.short.is_some_and(|(until, balance)| until > Instant::now() && amount > balance) {
                return Err(LeaseRefusal::InsufficientCredit { required: amount });
            }
        }
        // Another replica asked for this wallet's credit: let it draw first.
        let yielding = self.wallet(wallet).lock().yielding_until.filter(|until| *until > Instant::now());
        if let Some(until) = yielding {
            tokio::time::sleep_until(until.into()).await;
        }
        let draw_lock = self.drawing.lock().entry(wallet.to_owned()).or_default().clone();
        // Shared with the draws' tasks: a hold that stops waiting (its 5 s
        // ran out) leaves its draw running, and the next hold on the wallet
        // waits for that draw rather than send another beside it.
        let drawing = Arc::new(draw_lock.lock_owned().await);
        // Another hold may have drawn while this one waited.
        if let Some(hold) = self.take(wallet, amount) {
            return Ok(hold);
        }
        // This replica's own leftovers too small for the hold go back first,
        // so near empty they can be drawn again as one lease.
        if let Err(err) = self.consolidate(wallet, amount).await {
            return Err(LeaseRefusal::Unavailable(err));
        }
        // Near empty, the credit a hold needs may sit in another replica's
        // lease that it cannot use (its leftover after a settle): that
        // replica gives it back within moments, so wait for it rather than
        // refuse a wallet that still has the credit.
        // At every try the replicas holding it are asked to give back what
        // they do not use (`cg_wanted`; a lease one drew while the last ask
        // was on its way is given back at the next), and the draw is retried
        // at growing intervals.
        let started = Instant::now();
        let mut retry = LEASED_ELSEWHERE_RETRY;
        loop {
            match self.draw(wallet, amount, Some(drawing.clone())).await {
                Ok(Some(hold)) => return Ok(hold),
                Ok(None) => {}
                Err(err) => return Err(LeaseRefusal::Unavailable(err)),
            }
            let balance =
                match self.books.balance_asking_if_it_covers(&self.settings.replica, wallet, amount).await {
                    Ok(balance) => balance,
                    Err(err) => return Err(LeaseRefusal::Unavailable(err)),
                };
            let leased_elsewhere = balance >= amount;
            if !leased_elsewhere {
                self.wallet(wallet).lock().short =
                    Some((Instant::now() + self.settings.short_memory, balance));
            }
            if !leased_elsewhere || started.elapsed() >= self.settings.leased_elsewhere_wait {
                return Err(LeaseRefusal::InsufficientCredit { required: amount });
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(LEASED_ELSEWHERE_RETRY_MAX);
        }
    }

    /// Gives back this replica's idle leases on `wallet` that cannot cover
    /// `amount`, after shipping their debits.
    async fn consolidate(&self, wallet: &str, amount: Decimal) -> Result<(), ClusterError> {
        let cell = self.wallet(wallet);
        let small = |lease: &Lease| lease.open_holds == 0 && lease.free < amount;
        let (any, unshipped) = {
            let state = cell.lock();
            let mut small_leases = state.leases.iter().filter(|lease| small(lease));
            let any = small_leases.next().is_some();
            (any, state.leases.iter().any(|lease| small(lease) && lease.unshipped > 0))
        };
        if !any {
            return Ok(());
        }
        if unshipped {
            self.ship().await?;
        }
        let ids: Vec<i64> = {
            let mut state = cell.lock();
            let ids = state
                .leases
                .iter()
                .filter(|lease| small(lease) && lease.unshipped == 0)
                .map(|lease| lease.id)
                .collect::<Vec<_>>();
            // Out of use from here, whether or not the give-back succeeds;
            // expiry returns them otherwise.
            for lease in state.leases.iter_mut().filter(|lease| ids.contains(&lease.id)) {
                lease.retiring = true;
            }
            ids
        };
        if ids.is_empty() {
            return Ok(());
        }
        self.books.give_back(&self.settings.replica, &ids).await?;
        cell.lock().leases.retain(|lease| !ids.contains(&lease.id));
        Ok(())
    }

    /// The size of the next lease on a wallet: `cover` of its spend, within
    /// the bounds.
    fn lease_size(&self, state: &WalletLeases) -> Decimal {
        let target_ms = self.settings.target.as_millis().max(1);
        let windows = Decimal::from(self.settings.cover.as_millis().max(1)) / Decimal::from(target_ms);
        // While the spend ramps up the smoothed rate lags it: the window
        // under way, scaled to a whole one, counts too.
        let under_way = state.window_start.map_or(0, |start| start.elapsed().as_millis());
        let current = if under_way >= target_ms / 10 {
            state.window_spend * Decimal::from(target_ms) / Decimal::from(under_way)
        } else {
            Decimal::ZERO
        };
        (state.rate.max(current) * windows).max(self.settings.min_lease).min(self.settings.max_lease)
    }

    /// Whether a wallet's free credit fell low enough to draw ahead: below
    /// half a lease, or below its largest hold.
    fn wants_refill(&self, state: &WalletLeases, now: Instant) -> bool {
        let threshold = (self.lease_size(state) / Decimal::TWO).max(state.largest_hold);
        state.rate > Decimal::ZERO && !state.refill_running && state.free(now) < threshold
    }

    /// Takes `amount` from the first usable lease that has it. When that
    /// leaves the wallet's leases low, asks for a refill ahead of need.
    fn take(&self, wallet: &str, amount: Decimal) -> Option<LeaseHold> {
        let cell = self.wallet(wallet);
        let mut state = cell.lock();
        let now = Instant::now();
        let lease = state
            .leases
            .iter_mut()
            .find(|lease| !lease.retiring && lease.usable_until > now && lease.free >= amount)?;
        lease.free -= amount;
        lease.open_holds += 1;
        let id = lease.id;
        state.last_hold = Some(now);
        if self.wants_refill(&state, now) {
            state.refill_running = true;
            let need = state.largest_hold.max(self.settings.min_lease);
            self.refills.lock().push((wallet.to_owned(), need));
            self.refill_wanted.notify_one();
        }
        Some(LeaseHold { wallet: wallet.to_owned(), lease: id, amount })
    }

    /// Waits for errands: wallets that ran low on a hold (returned with
    /// the least each refill must bring), or spent leases to give back
    /// (`true`). Run by one task, which calls [`LeaseBook::refill`] for
    /// each wallet and [`LeaseBook::give_back_spent`] for the leases.
    pub async fn errands(&self) -> (Vec<(String, Decimal)>, bool) {
        loop {
            let wanted = std::mem::take(&mut *self.refills.lock());
            let spent = self.spent_leases.swap(false, Ordering::AcqRel);
            if !wanted.is_empty() || spent {
                return (wanted, spent);
            }
            self.refill_wanted.notified().await;
        }
    }

    /// Ships the outbox and gives back every retired lease with no open
    /// hold (their debits shipped with it).
    pub async fn give_back_spent(&self) -> Result<(), ClusterError> {
        self.ship().await?;
        let wallets = self.snapshot();
        let mut give_back = Vec::new();
        for (_, cell) in &wallets {
            let state = cell.lock();
            give_back.extend(
                state
                    .leases
                    .iter()
                    .filter(|lease| lease.retiring && lease.open_holds == 0 && lease.unshipped == 0)
                    .map(|lease| lease.id),
            );
        }
        if give_back.is_empty() {
            return Ok(());
        }
        self.books.give_back(&self.settings.replica, &give_back).await?;
        for (_, cell) in &wallets {
            cell.lock().leases.retain(|lease| !give_back.contains(&lease.id));
        }
        Ok(())
    }

    /// Draws a lease ahead of need on `wallet` (off the request path).
    pub async fn refill(&self, wallet: &str, need: Decimal) -> Result<(), ClusterError> {
        {
            let cell = self.wallet(wallet);
            let mut state = cell.lock();
            if state.yielding_until.is_some_and(|until| until > Instant::now()) {
                state.refill_running = false;
                return Ok(());
            }
        }
        let drawn = self.draw(wallet, need, None).await;
        self.wallet(wallet).lock().refill_running = false;
        drawn.map(drop)
    }

    /// Draws one lease sized from the wallet's spend, at least `need`; for
    /// a hold (which holds the wallet's draw lock, kept until the draw ends),
    /// holds `need` from it before any other hold can see it.
    async fn draw(
        &self,
        wallet: &str,
        need: Decimal,
        for_hold: Option<Arc<tokio::sync::OwnedMutexGuard<()>>>,
    ) -> Result<Option<LeaseHold>, ClusterError> {
        let hold_need = for_hold.is_some();
        let want = {
            let cell = self.wallet(wallet);
            let state = cell.lock();
            self.lease_size(&state).max(need)
        };
        let asked_at = Instant::now();
        // The draw runs as its own task: a request that stops waiting (its
        // client left) must not leave a lease the books granted and this
        // book never learned of. Nobody left to take it, it goes back.
        let (sent, received) = tokio::sync::oneshot::channel();
        let (books, replica, named, ttl, horizon) = (
            self.books.clone(),
            self.settings.replica.clone(),
            wallet.to_owned(),
            self.settings.ttl,
            self.settings.horizon(),
        );
        let mut awaiting = AwaitingGrant { received, books: books.clone(), replica: replica.clone() };
        tokio::spawn(async move {
            let drawn = books.draw_lease(&replica, &named, want, need, ttl, ttl, horizon).await;
            // Not held while an unheard grant goes back (which can wait on
            // a silent database as long as its connection lives).
            drop(for_hold);
            if let Err(Ok(Some(grant))) = sent.send(drawn) {
                give_back_unheard(books, replica, grant.id).await;
            }
        });
        let grant = (&mut awaiting.received)
            .await
            .map_err(|_| ClusterError::Unavailable("the lease draw was cut short".into()))??;
        if let Some(metrics) = &self.metrics {
            metrics.lease_draw_seconds.observe(asked_at.elapsed().as_secs_f64());
        }
        let Some(grant) = grant else { return Ok(None) };
        let held = if hold_need { need } else { Decimal::ZERO };
        self.wallet(wallet).lock().leases.push(Lease {
            id: grant.id,
            free: grant.granted - held,
            open_holds: u32::from(hold_need),
            unshipped: 0,
            usable_until: usable_until(grant.lifetime(), self.settings.safety, asked_at),
            retiring: false,
            short: grant.granted < want,
            // When the grant came back, not when it was asked for: a renewal
            // sent between the two may not see a draw that commits after
            // its snapshot, and must not take the lease for closed.
            drawn_at: Instant::now(),
        });
        Ok(hold_need.then(|| LeaseHold { wallet: wallet.to_owned(), lease: grant.id, amount: need }))
    }

    /// Settles a hold at `debit` (which may exceed the hold: the upstream's
    /// report is charged in full) and queues the debit for shipping.
    pub fn settle(&self, hold: LeaseHold, debit: Decimal, at: DateTime<Utc>, detail: impl serde::Serialize) {
        let cell = self.wallet(&hold.wallet);
        {
            let mut state = cell.lock();
            let largest_hold = state.largest_hold.max(hold.amount);
            if let Some(lease) = state.leases.iter_mut().find(|lease| lease.id == hold.lease) {
                lease.free += hold.amount - debit;
                lease.open_holds -= 1;
                lease.unshipped += 1;
                if lease.short && lease.open_holds == 0 && lease.free < largest_hold {
                    // Near empty, what is left cannot cover another hold
                    // here and may be what a hold on another replica needs:
                    // give it back now rather than when it has sat idle.
                    lease.retiring = true;
                }
                if lease.retiring && lease.open_holds == 0 {
                    self.spent_leases.store(true, Ordering::Release);
                    self.refill_wanted.notify_one();
                }
            }
            state.record_spend(debit, Instant::now(), self.settings.target);
        }
        let entry = self.next_entry.fetch_add(1, Ordering::Relaxed);
        // Serialized once here; the outbox, the shipment and the books
        // carry the same text.
        let detail = serde_json::value::to_raw_value(&detail).unwrap_or_else(|error| {
            tracing::error!(%error, entry, "a debit's detail cannot be written; it ships without it");
            empty_detail()
        });
        let debit = ShippedDebit { entry, wallet: hold.wallet, lease: hold.lease, amount: debit, at, detail };
        self.outbox.lock().push(debit, Instant::now(), None);
        self.unflushed.store(true, Ordering::Release);
    }

    /// Releases a hold that spent nothing (the request failed before the
    /// upstream answered).
    pub fn release(&self, hold: LeaseHold) {
        let cell = self.wallet(&hold.wallet);
        let mut state = cell.lock();
        if let Some(lease) = state.leases.iter_mut().find(|lease| lease.id == hold.lease) {
            lease.free += hold.amount;
            lease.open_holds -= 1;
            if lease.retiring && lease.open_holds == 0 {
                self.spent_leases.store(true, Ordering::Release);
                self.refill_wanted.notify_one();
            }
        }
    }

    /// Answers other replicas' `cg_wanted` until the task is dropped: see
    /// [`LeaseBook::give_up`].
    pub async fn answer_wanted(&self, wakeups: &super::Wakeups) {
        loop {
            for wallet in wakeups.wanted(&self.settings.replica).await {
                if let Err(error) = self.give_up(&wallet).await {
                    tracing::warn!(%error, "cannot give back leases another replica wants; they go back when idle");
                }
            }
        }
    }

    /// Another replica needs credit on `wallet` that this one's leases hold:
    /// every lease on it takes no more holds, the idle ones go back now and
    /// the others once their last hold settles. This replica's next hold on
    /// the wallet draws again, from what is then left.
    pub async fn give_up(&self, wallet: &str) -> Result<(), ClusterError> {
        let Some(cell) = self.wallets.get(wallet).map(|cell| cell.clone()) else {
            return Ok(());
        };
        let idle = {
            let mut state = cell.lock();
            state.yielding_until = Some(Instant::now() + YIELD_TO_ASKER);
            for lease in &mut state.leases {
                lease.retiring = true;
            }
            state.leases.iter().any(|lease| lease.open_holds == 0)
        };
        if idle {
            self.give_back_spent().await?;
        }
        Ok(())
    }

    /// The number the next settle's debit gets: it changes with every settle.
    pub fn settled_through(&self) -> i64 {
        self.next_entry.load(Ordering::Relaxed)
    }

    /// Whether the outbox may hold debits not on disk yet.
    pub fn unflushed(&self) -> bool {
        self.unflushed.load(Ordering::Acquire)
    }

    /// Debits waiting to ship.
    pub fn outbox_len(&self) -> usize {
        self.outbox.lock().debits.len()
    }

    /// Debits not yet in the shared books: queued, and out for shipping.
    pub fn unshipped(&self) -> Unshipped {
        let (mut debits, mut oldest) = {
            let outbox = self.outbox.lock();
            (outbox.debits.len(), outbox.queued.first().copied())
        };
        for (_, count, since) in self.shipping.lock().iter() {
            debits += count;
            oldest = Some(oldest.map_or(*since, |oldest| oldest.min(*since)));
        }
        Unshipped { debits, oldest }
    }

    fn no_longer_shipping(&self, ticket: u64) {
        self.shipping.lock().retain(|(out, ..)| *out != ticket);
    }

    /// Ships the outbox in one batch; on failure the batch stays queued.
    /// With an outbox on disk, the batch is what is on disk: a shipment can
    /// hang for as long as the database is silent, and no flush sees the
    /// debits it has out, so none may be in memory only.
    pub async fn ship(&self) -> Result<u64, ClusterError> {
        let mut on_disk_only = self.durable.is_some();
        // Also when nothing is new: a chunk another flush is still syncing
        // is synced here, not left out of the batch (at shutdown it would
        // ship only at the next start).
        if on_disk_only {
            if let Err(error) = self.flush_outbox().await {
                // The shipment is then the only way to keep them.
                tracing::warn!(%error, "cannot make the outbox durable; shipping it as it is");
                on_disk_only = false;
            }
        }
        let batch = if on_disk_only { self.take_on_disk() } else { std::mem::take(&mut *self.outbox.lock()) };
        if batch.debits.is_empty() {
            return Ok(0);
        }
        // A hold ships from its request (to give back leftovers), and a
        // request stops when its client leaves: dropped mid-shipment, the
        // batch goes back to the outbox (shipping again is idempotent).
        let out = OutForShipping::new(self, batch);
        match self.books.ship(&self.settings.replica, out.debits()).await {
            Ok(new) => {
                let batch = out.landed();
                if let Some(metrics) = &self.metrics {
                    for queued in &batch.queued {
                        metrics.outbox_lag_seconds.observe(queued.elapsed().as_secs_f64());
                    }
                }
                // Before the next await: the leases may go back once shipped.
                for debit in &batch.debits {
                    if let Some(cell) = self.wallets.get(&debit.wallet) {
                        let mut state = cell.lock();
                        if let Some(lease) = state.leases.iter_mut().find(|lease| lease.id == debit.lease) {
                            lease.unshipped -= 1;
                        }
                    }
                }
                self.forget_shipped(&batch.chunks);
                Ok(new)
            }
            Err(err) => {
                drop(out);
                // A batch shipped as it was (the disk failing) goes back with
                // debits no flush wrote, and nothing new may come to make the
                // next one (leases lapse in an outage): try them now.
                if self.unflushed() {
                    if let Err(error) = self.flush_outbox().await {
                        tracing::warn!(%error, "cannot make the outbox durable after a failed shipment");
                    }
                }
                Err(err)
            }
        }
    }

    /// One background round: renew leases, retire the ones past their
    /// usable deadline, give back idle retired leases whose debits shipped,
    /// and draw ahead for wallets whose free credit fell below half their
    /// spend target. Call every `ttl / 4` or so.
    pub async fn maintain(&self) -> Result<(), ClusterError> {
        // A shipment that fails (one the database times out on) does not
        // stop the renewal: leases left to lapse on a live replica would be
        // closed by the sweep and their credit spent again by others while
        // this replica's open holds still settle on them.
        // Nor does a slow one (wallet locks, a silent server) delay it past
        // the leases' deadline: it is cut at a quarter of the TTL (the batch
        // goes back to the outbox) and the shipping rounds go on with it.
        match tokio::time::timeout(self.settings.ttl / 4, self.ship()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot ship the outbox; renewing the leases all the same")
            }
            Err(_) => tracing::warn!("the outbox's shipment is slow; renewing the leases first"),
        }
        let asked_at = Instant::now();
        let outbox = {
            let outbox = self.outbox.lock();
            (
                i64::try_from(outbox.debits.len()).unwrap_or(i64::MAX),
                outbox.debits.iter().map(|debit| debit.at).min(),
            )
        };
        // Only the leases this replica knows are renewed (retiring ones
        // included): one whose draw reply was lost lapses on its own.
        let wallets = self.snapshot();
        let mut known = Vec::new();
        for (_, cell) in &wallets {
            known.extend(cell.lock().leases.iter().map(|lease| lease.id));
        }
        let renewal = self
            .renewals
            .renew(&self.settings.replica, self.settings.ttl, self.settings.horizon(), outbox, &known)
            .await?;
        let usable = |lease: i64| {
            renewal.lifetime(lease).map(|lifetime| usable_until(lifetime, self.settings.safety, asked_at))
        };
        let now = Instant::now();
        let mut give_back = Vec::new();
        let mut refill = Vec::new();
        for (wallet, cell) in &wallets {
            let mut state = cell.lock();
            // A lease drawn before the renewal went out but not renewed was
            // closed by the expiry sweep (this replica was cut off past its
            // deadline and grace): its credit went back to the wallet, so it
            // takes no more holds; settles of holds still open on it ship as
            // uncovered.
            state.leases.retain(|lease| lease.drawn_at >= asked_at || renewal.lifetime(lease.id).is_some());
            state.record_spend(Decimal::ZERO, now, self.settings.target);
            // The wallet's traffic here, not one lease's: a lease drawn
            // ahead of need waits unused while the one before it is spent.
            let quiet = state.last_hold.is_none_or(|at| now.duration_since(at) > self.settings.target);
            for lease in &mut state.leases {
                if lease.retiring {
                    // Renewal keeps a retiring lease open until given back.
                } else if lease.open_holds == 0 && (lease.free <= Decimal::ZERO || quiet) {
                    // Spent, or the wallet was quiet here for a spend
                    // target's time: let other replicas have what is left.
                    lease.retiring = true;
                } else if let Some(until) = usable(lease.id) {
                    lease.usable_until = until;
                }
                if !lease.retiring && lease.usable_until <= now {
                    // Past its deadline (the credit it draws on expires, or
                    // no longer covers the wallet's leases): no more holds.
                    lease.retiring = true;
                }
                if lease.retiring && lease.open_holds == 0 && lease.unshipped == 0 {
                    give_back.push(lease.id);
                }
            }
            let busy = state.last_hold.is_some_and(|at| now.duration_since(at) <= self.settings.target);
            if busy && self.wants_refill(&state, now) {
                state.refill_running = true;
                refill.push((wallet.clone(), state.largest_hold.max(self.settings.min_lease)));
            }
        }
        // Every wallet marked for a refill above is refilled or unmarked
        // whatever fails before it: a mark left set would keep the wallet
        // from drawing ahead, and from being forgotten, for good.
        let mut outcome = Ok(());
        if !give_back.is_empty() {
            match self.books.give_back(&self.settings.replica, &give_back).await {
                Ok(_) => {
                    for (_, cell) in &wallets {
                        cell.lock().leases.retain(|lease| !give_back.contains(&lease.id));
                    }
                }
                Err(err) => outcome = Err(err),
            }
        }
        // Before forgetting: a cell held outside the map is not forgotten.
        drop(wallets);
        self.forget_quiet(now);
        // Refills asked for on holds that no task took (a book run without
        // one) are drawn here.
        refill.append(&mut self.refills.lock());
        for (wallet, need) in refill {
            if outcome.is_err() {
                // The database is failing: unmark the rest, do not wait on it
                // once per wallet.
                self.wallet(&wallet).lock().refill_running = false;
            } else if let Err(err) = self.refill(&wallet, need).await {
                outcome = Err(err);
            }
        }
        // The round reached the books if the renewal did (on its own
        // connection, however full the pool): the leases live on, and what
        // failed after it (a give-back, a refill, waiting for a pooled
        // connection) is tried again next round, as a failed shipment is.
        if let Err(error) = outcome {
            tracing::warn!(%error, "leases renewed; giving back or drawing ahead failed and is tried again");
        }
        Ok(())
    }

    /// Forgets wallets with no lease that took no hold for a while (and
    /// their draw locks), and the caps of limit periods that ended: limit
    /// rows are named per period, so without this the book would grow by a
    /// row per subject and period.
    fn forget_quiet(&self, now: Instant) {
        let quiet = self.settings.ttl * 6;
        self.wallets.retain(|_, cell| {
            // Held outside the map: a draw took the cell (under the shard's
            // lock) and is about to push its lease into it. Forgotten, the
            // lease would sit in a cell nobody renews or settles against.
            if Arc::strong_count(cell) > 1 {
                return true;
            }
            let state = cell.lock();
            !state.leases.is_empty()
                || state.refill_running
                || state.last_hold.is_some_and(|at| now.duration_since(at) < quiet)
        });
        // A draw lock nobody holds or waits on, of a wallet forgotten above.
        self.drawing
            .lock()
            .retain(|wallet, lock| Arc::strong_count(lock) > 1 || self.wallets.contains_key(wallet));
        let now = Utc::now().timestamp();
        self.limit_caps.retain(|name, _| {
            name.rsplit(':').next().and_then(|end| end.parse::<i64>().ok()).is_none_or(|end| end > now)
        });
    }

    /// Stops spending: retires every lease, ships the outbox and gives back
    /// every lease with no open hold. Returns what went back to the wallets.
    pub async fn shutdown(&self) -> Result<Decimal, ClusterError> {
        self.ship().await?;
        let wallets = self.snapshot();
        let mut give_back = Vec::new();
        for (_, cell) in &wallets {
            let mut state = cell.lock();
            for lease in &mut state.leases {
                lease.retiring = true;
                if lease.open_holds == 0 && lease.unshipped == 0 {
                    give_back.push(lease.id);
                }
            }
        }
        if give_back.is_empty() {
            return Ok(Decimal::ZERO);
        }
        let returned = self.books.give_back(&self.settings.replica, &give_back).await?;
        // Forgotten only once the books took them back (else expiry does).
        for (_, cell) in &wallets {
            cell.lock().leases.retain(|lease| !give_back.contains(&lease.id));
        }
        Ok(returned)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_quiet_wallet_taken_by_a_draw_is_not_forgotten_under_it() {
        // A draw takes the wallet's cell, then pushes its lease into it: a
        // cell forgotten in between took a lease that nobody renewed or
        // settled against (its credit returned at its expiry, the hold still
        // open). No database is reached here.
        let db = crate::cluster::Database::new("postgresql://nobody@127.0.0.1:1/none", 1).unwrap();
        let book = LeaseBook::new(Books::new(db), LeaseSettings::new("r1"), 1);
        let taken = book.wallet("pool:org_1");
        drop(book.wallet("pool:org_2"));
        let later = Instant::now() + book.settings.ttl * 7;
        book.forget_quiet(later);
        assert!(book.wallets.contains_key("pool:org_1"), "the cell a draw holds stays");
        assert!(!book.wallets.contains_key("pool:org_2"), "a quiet cell nobody holds goes");
        drop(taken);
        book.forget_quiet(later);
        assert!(!book.wallets.contains_key("pool:org_1"));
    }
}
