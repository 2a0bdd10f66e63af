//! A replica at run time: its [`Replica`] (the ledger it serves from),
//! its [`LeaseBook`] (the credit it may spend), the durable outbox in its
//! data directory, and the rounds that keep them going.
//!
//! - every 50 ms: flush the outbox to disk; every `ship_interval`: ship it;
//! - every lease TTL / 4: renew leases, give back idle ones, refill ahead
//!   of need, and close any replica's leases past their deadline;
//! - whenever a hold leaves a wallet's leases low: draw the next one ahead
//!   of need;
//! - the replica's own loop follows the log, or posts shipped debits and
//!   keeps the treasury while it is the treasurer.
//!
//! Admin writes can be made only by the treasurer's ledger; a follower
//! forwards them ([`ClusterNode::forward_admin`]) and answers with the
//! treasurer's reply once its own view has read the log that far.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rust_decimal::Decimal;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, DatabaseClock};
use crate::ledger::LedgerConfig;
use crate::proxy::headers::strip_hop_by_hop;

use super::migrate::migrate;
use super::name_lock::NameLock;
use super::{Books, ClusterError, Database, LeaseBook, LeaseSettings, Replica, ReplicaSettings};

/// Header on an admin request a follower forwarded: the receiver handles it
/// or refuses it, never forwards it again.
pub const FORWARDED: &str = "x-creditgate-forwarded";
/// Largest forwarded reply read.
const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;
/// How often settles in the outbox are made durable on disk.
const OUTBOX_FLUSH: Duration = Duration::from_millis(50);
/// How long a reservation for a change holds its credit if nobody gives it
/// back: far longer than a change waits for the books (8 s).
const RESERVATION_TTL: Duration = Duration::from_secs(60);
/// How long a reservation waits for replicas to give leased credit back,
/// and how often it tries (they yield to an ask for 200 ms).
const RESERVE_PATIENCE: Duration = Duration::from_secs(3);
const RESERVE_RETRY: Duration = Duration::from_millis(50);
/// Credit that expires within this is not reserved: the change lands up to
/// 8 s after the draw, and credit written off meanwhile would leave the
/// change to take what replicas lease (an overdraft). A change near an
/// expiry waits for it (409, retried) instead.
const RESERVATION_HORIZON: Duration = Duration::from_secs(10);

/// What [`ClusterNode::reserve`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    /// The credit, under this lease.
    Lease(i64),
    /// The wallet holds less than that in the books.
    Short { balance: Decimal },
    /// Enough, but leased to replicas that did not give it back in time.
    Leased,
}
/// Longest wait for the treasurer's reply.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
/// The least a start waits for its name to be let go: long enough for the
/// server's keepalive to notice a holder whose machine vanished.
const NAME_PATIENCE: Duration = Duration::from_secs(12);

/// How a replica joins the cluster.
#[derive(Clone)]
pub struct NodeOptions {
    /// The database URL (it carries the password: never log it).
    pub database_url: String,
    /// This replica's name, unique per data directory.
    pub replica: String,
    /// Where the other replicas reach this one's admin API.
    pub admin_url: String,
    pub max_connections: usize,
    pub lease_ttl: Duration,
    pub treasury_ttl: Duration,
    pub ship_interval: Duration,
    /// Where the replica records its draw times and outbox lag.
    pub metrics: Option<crate::telemetry::metrics::ClusterMetrics>,
    /// The clock the replica runs on, to be told the database's time
    /// (`None`: a test's replica left on its own clock).
    pub clock: Option<Arc<DatabaseClock>>,
    /// Watches the replica's rounds: one that panics stops the gateway.
    pub supervisor: crate::supervise::Supervisor,
}

/// A running replica.
pub struct ClusterNode {
    replica: Arc<Replica>,
    book: Arc<LeaseBook>,
    books: Books,
    name: String,
    client: Client<HttpConnector, Full<Bytes>>,
    /// Stops the shipping and lease rounds (after the proxy drained).
    rounds: CancellationToken,
    /// When a lease round last reached the books, and the lease TTL: past
    /// it without one, this replica's leases have lapsed (see [`ClusterNode::health`]).
    last_reached: parking_lot::Mutex<std::time::Instant>,
    lease_ttl: Duration,
    tasks: parking_lot::Mutex<Vec<JoinHandle<()>>>,
    /// What the database's notifications wake.
    wakeups: Arc<super::Wakeups>,
    /// This process's hold on the replica name.
    name_lock: NameLock,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode").field("replica", &self.name).finish_non_exhaustive()
    }
}

/// Opens the outbox in `data_dir` for `replica`: its debits tree. Debits are
/// unique in the books by replica and entry, and covered by their replica's
/// leases, so a run under another name must not ship what an earlier run
/// left (already shipped debits would post twice; covered ones would ship
/// as uncovered while the old name's leases returned their credit). The
/// outbox records its replica's name, and a non-empty one refuses any other;
/// an empty one is taken over. One written before names were recorded is
/// judged by the data directory's `replica-name` file, where there is one.
fn open_outbox(data_dir: &Path, replica: &str) -> Result<sled::Tree, ClusterError> {
    let unusable = |err: sled::Error| {
        ClusterError::Config(format!("cannot open the outbox in {}: {err}", data_dir.display()))
    };
    let config = sled::Config::new()
        .path(data_dir.join("outbox"))
        // Flushed by the shipping round, just before each shipment.
        .flush_every_ms(None);
    let db = crate::store::open_waiting_for_lock(&config).map_err(unusable)?;
    let debits = db.open_tree("debits").map_err(unusable)?;
    let owner = match db.get(OUTBOX_OWNER).map_err(unusable)? {
        Some(owner) => Some(owner.to_vec()),
        // Written before the outbox recorded its name: the name this data
        // directory was started under, when it kept one.
        None => std::fs::read_to_string(data_dir.join("replica-name"))
            .ok()
            .map(|name| name.trim().as_bytes().to_vec())
            .filter(|name| !name.is_empty()),
    };
    match owner {
        Some(owner) if owner != replica.as_bytes() && !debits.is_empty() => {
            Err(ClusterError::Config(format!(
                "the outbox in {} holds debits replica {:?} has not shipped; start this data directory as that replica \
                 ([cluster] replica = {:?}) to ship them, since shipped under {replica:?} they would be posted twice",
                data_dir.display(),
                String::from_utf8_lossy(&owner),
                String::from_utf8_lossy(&owner),
            )))
        }
        _ => {
            db.insert(OUTBOX_OWNER, replica.as_bytes()).map_err(unusable)?;
            db.flush().map_err(unusable)?;
            Ok(debits)
        }
    }
}

/// Key of the outbox's replica name, in the outbox store's default tree.
const OUTBOX_OWNER: &[u8] = b"replica";

impl ClusterNode {
    /// Joins the cluster: migrates the schema, replays the log, opens the
    /// outbox in `data_dir` and ships what a previous run left there, then
    /// starts the rounds. The replica's ledger is [`ClusterNode::ledger`].
    pub async fn start(
        options: NodeOptions,
        data_dir: &Path,
        ledger_config: LedgerConfig,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> Result<Arc<ClusterNode>, ClusterError> {
        // The outbox first: debits a run under another name left there are
        // refused before anything is written under this one.
        let outbox = open_outbox(data_dir, &options.replica)?;
        let db = Database::new(&options.database_url, options.max_connections)?;
        if !db.encrypted() {
            tracing::info!(
                "connecting to PostgreSQL in the clear (no sslmode=require or verify-full in the URL)"
            );
        }
        migrate(&db).await?;
        if db.names_standbys() {
            match db.failover_risk().await {
                Ok(Some(why)) => tracing::error!(
                    why,
                    "the database URL names standbys to fail over to, but the primary replicates asynchronously: \
                     a failover can lose commits the replicas saw acknowledged, which breaks the shared log \
                     (replicas stop on a balance mismatch and cannot restart) and can post debits twice; \
                     run a synchronous standby (Patroni: synchronous_mode)"
                ),
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "cannot read the primary's replication settings"),
            }
        }
        let rounds = CancellationToken::new();
        // Before anything is written under the name, and kept until the
        // leases went back (the rounds stop last).
        let patience = (options.lease_ttl * 2).max(NAME_PATIENCE);
        let name_lock = NameLock::claim(&db, &options.replica, patience, rounds.clone()).await?;
        // A start that fails from here lets the name go.
        let started = rounds.clone().drop_guard();
        let mut books = Books::new(db.clone()).fenced_by(name_lock.held());
        if let Some(clock) = options.clock.clone() {
            books = books.keeping_time(clock);
            books.read_database_time().await?;
        }
        books.register(&options.replica, &options.admin_url).await?;
        let replica_settings = ReplicaSettings {
            treasury_ttl: options.treasury_ttl,
            ..ReplicaSettings::new(options.replica.clone())
        };
        let replica = Arc::new(Replica::open(books.clone(), ledger_config, replica_settings).await?);

        let lease_settings = LeaseSettings {
            ttl: options.lease_ttl,
            safety: options.lease_ttl / 5,
            ..LeaseSettings::new(options.replica.clone())
        };
        let first_entry = books.last_entry(&options.replica).await? + 1;
        let outbox_file = std::fs::File::open(data_dir.join("outbox").join("db")).map_err(|err| {
            ClusterError::Config(format!("cannot open the outbox file in {}: {err}", data_dir.display()))
        })?;
        let book = Arc::new(
            LeaseBook::with_outbox(books.clone(), lease_settings, first_entry, outbox)?
                .syncing_outbox_file(outbox_file)
                .with_renewal_pool(books.with_own_pool(1)?)
                .with_metrics(options.metrics.clone()),
        );
        let returned = book.recover().await?;
        if returned > Decimal::ZERO {
            tracing::info!(%returned, "gave back the leases a previous run of this replica left open");
        }

        let credited = book.clone();
        replica.watch_wallets(Box::new(move |wallet, credit| {
            if credit {
                credited.credit_arrived(&wallet.to_string());
            }
        }));
        let wakeups = super::Wakeups::start(db, rounds.clone());
        let node = Arc::new(ClusterNode {
            replica: replica.clone(),
            book,
            books,
            name: options.replica.clone(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            rounds: rounds.clone(),
            tasks: parking_lot::Mutex::new(Vec::new()),
            last_reached: parking_lot::Mutex::new(std::time::Instant::now()),
            lease_ttl: options.lease_ttl,
            wakeups: wakeups.clone(),
            name_lock,
        });
        let watched = &options.supervisor;
        let mut tasks =
            vec![watched.spawn("treasury", replica.run(clock, wakeups.clone(), shutdown.clone()))];
        tasks.push(watched.spawn("answer_wanted", node.clone().answer_wanted(wakeups)));
        tasks.push(watched.spawn("flush_rounds", node.clone().flush_rounds()));
        tasks.push(watched.spawn("ship_rounds", node.clone().ship_rounds(options.ship_interval)));
        tasks.push(watched.spawn("lease_rounds", node.clone().lease_rounds(options.lease_ttl)));
        tasks.push(watched.spawn("errands", node.clone().errands()));
        tasks.push(watched.spawn("watch_ledger", node.clone().watch_ledger(shutdown.clone())));
        *node.tasks.lock() = tasks;
        started.disarm();
        tracing::info!(replica = %options.replica, "joined the cluster");
        Ok(node)
    }

    /// The replica's ledger (its view of the books).
    pub fn ledger(&self) -> &Arc<crate::ledger::Ledger> {
        self.replica.ledger()
    }

    /// The replica.
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    /// The leases this replica spends from.
    pub fn lease_book(&self) -> &Arc<LeaseBook> {
        &self.book
    }

    /// The database's wake-ups this replica listens to.
    pub fn wakeups(&self) -> &Arc<super::Wakeups> {
        &self.wakeups
    }

    /// The shared books.
    pub fn books(&self) -> &Books {
        &self.books
    }

    /// `Ok` while this replica can spend: its lease rounds reached the
    /// books within a lease TTL. Past that its leases have lapsed and every
    /// hold is answered 503 `ledger_unavailable`, so `/readyz` says so and a
    /// load balancer sends the traffic to replicas that can serve it. Nor
    /// while its view of the books is stuck on a log record it cannot read
    /// (a newer treasurer's): it still spends inside leases, but its keys,
    /// limits and balances no longer move.
    pub fn health(&self) -> Result<(), String> {
        if let Some(reason) = self.replica.unreadable() {
            return Err(reason);
        }
        let since = self.last_reached.lock().elapsed();
        if since > self.lease_ttl {
            return Err(format!(
                "the cluster database has not been reached for {} ms (lease TTL {} ms): leases lapsed",
                since.as_millis(),
                self.lease_ttl.as_millis()
            ));
        }
        Ok(())
    }

    /// How long since a lease round last reached the database.
    pub fn database_unreached_for(&self) -> std::time::Duration {
        self.last_reached.lock().elapsed()
    }

    /// This replica's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Takes `amount` of `wallet`'s credit out of reach of every replica's
    /// leases while a change lowers its balance (a negative adjustment, a
    /// Lite wallet written off): otherwise credit leased out before the
    /// change would still be spent after it, below zero. A lease under this
    /// replica's name that its rounds do not know, so none renews it; give
    /// it back with [`ClusterNode::release`] once the change is in the
    /// books, or it lapses after [`RESERVATION_TTL`]. While the credit is
    /// leased out, the replicas holding it are asked to give back what they
    /// are not using, and the draw is tried again for [`RESERVE_PATIENCE`].
    pub async fn reserve(&self, wallet: &str, amount: Decimal) -> Result<Reserved, ClusterError> {
        let deadline = tokio::time::Instant::now() + RESERVE_PATIENCE;
        loop {
            let grant = self
                .books
                .draw_lease(
                    &self.name,
                    wallet,
                    amount,
                    amount,
                    RESERVATION_TTL,
                    self.lease_ttl,
                    RESERVATION_HORIZON,
                )
                .await?;
            match grant {
                Some(grant) if grant.granted >= amount => return Ok(Reserved::Lease(grant.id)),
                Some(grant) => self.release(grant.id).await,
                None => {}
            }
            // This replica's own leases on it go back too: the ask below
            // reaches only the others.
            if let Err(error) = self.book.give_up(wallet).await {
                tracing::warn!(%error, "cannot give back this replica's own leases for a reservation");
            }
            let balance = self.books.balance_asking_if_it_covers(&self.name, wallet, amount).await?;
            if balance < amount {
                return Ok(Reserved::Short { balance });
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Reserved::Leased);
            }
            tokio::time::sleep(RESERVE_RETRY).await;
        }
    }

    /// Gives back a [`ClusterNode::reserve`]d lease: the change that lowered
    /// the balance is in the books now (or was refused).
    pub async fn release(&self, lease: i64) {
        if let Err(error) = self.books.give_back(&self.name, &[lease]).await {
            tracing::warn!(%error, lease, "cannot give back a reservation; it lapses at its deadline");
        }
    }

    /// Makes settles durable in the outbox every [`OUTBOX_FLUSH`] (a local
    /// fsync, no database statement), so a SIGKILL loses at most the last
    /// flush window. A task of its own: a shipment can hang for as long as
    /// the database is silent, and settles go on inside the leases.
    async fn flush_rounds(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = self.rounds.cancelled() => return,
                () = tokio::time::sleep(OUTBOX_FLUSH) => {}
            }
            if self.book.unflushed() {
                if let Err(error) = self.book.flush_outbox().await {
                    tracing::warn!(%error, "cannot make the outbox durable; retrying");
                }
            }
        }
    }

    /// Ships the outbox every `every`, so the database sees one shipment
    /// per `every`.
    async fn ship_rounds(self: Arc<Self>, every: Duration) {
        loop {
            tokio::select! {
                () = self.rounds.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            if self.book.outbox_len() == 0 {
                continue;
            }
            if let Err(error) = self.book.ship().await {
                tracing::warn!(%error, outbox = self.book.outbox_len(), "cannot ship settled debits; retrying");
            }
        }
    }

    /// Stops the gateway (gracefully: requests drain, the outbox ships,
    /// leases go back) once this replica's ledger cannot go on; the process
    /// then exits with [`ClusterNode::must_restart`]'s reason so its
    /// supervisor starts it again, and the restart rebuilds the ledger
    /// from the log.
    async fn watch_ledger(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = self.rounds.cancelled() => return,
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            if let Some(reason) = self.must_restart() {
                tracing::error!(%reason, "this replica's ledger cannot go on: stopping to be restarted");
                shutdown.cancel();
                return;
            }
        }
    }

    /// Why this replica stopped to be restarted, if it did.
    pub fn must_restart(&self) -> Option<String> {
        self.replica.must_restart().or_else(|| self.name_lock.lost())
    }

    /// Draws leases ahead of need for wallets whose holds ran them low, and
    /// gives back leases a settle left unable to cover another hold.
    async fn errands(self: Arc<Self>) {
        loop {
            let (refills, spent) = tokio::select! {
                () = self.rounds.cancelled() => return,
                errands = self.book.errands() => errands,
            };
            for (wallet, need) in refills {
                if let Err(error) = self.book.refill(&wallet, need).await {
                    tracing::warn!(%error, "cannot draw a lease ahead of need; holds will draw their own");
                }
            }
            if spent {
                if let Err(error) = self.book.give_back_spent().await {
                    tracing::warn!(%error, "cannot give back spent leases; they go back at the next round");
                }
            }
        }
    }

    /// Gives back leases on wallets other replicas ask for (`cg_wanted`).
    async fn answer_wanted(self: Arc<Self>, wakeups: Arc<super::Wakeups>) {
        tokio::select! {
            () = self.rounds.cancelled() => {}
            () = self.book.answer_wanted(&wakeups) => {}
        }
    }

    async fn lease_rounds(self: Arc<Self>, ttl: Duration) {
        let every = ttl / 4;
        let grace = ttl / 2;
        // Since when this replica's rounds have reached the books without a
        // break (`None` while they cannot).
        let mut reachable_since: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                () = self.rounds.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            // A round that succeeds renewed in the database (its shipment may
            // have failed: the shipping rounds try it again).
            match self.book.maintain().await {
                Ok(()) => {
                    reachable_since.get_or_insert_with(tokio::time::Instant::now);
                    *self.last_reached.lock() = std::time::Instant::now();
                }
                Err(error) => {
                    reachable_since = None;
                    tracing::warn!(%error, "cannot renew or refill leases");
                }
            }
            // The grace lets a lease's replica ship its spend before the
            // lease closes, but while the database was unreachable (an
            // outage, a failover) no replica could ship, and every lease
            // went past its deadline. So the grace also runs from when this
            // replica reached the books again: live replicas, back at about
            // the same time, ship their outboxes first instead of seeing
            // them posted as uncovered.
            if reachable_since.is_none_or(|since| since.elapsed() < grace) {
                continue;
            }
            // Any replica may close what a dead one left: the statement is
            // idempotent and locks the rows it closes.
            match self.books.expire(grace).await {
                Ok(returned) if returned > Decimal::ZERO => {
                    tracing::info!(%returned, "closed expired leases of a replica that stopped renewing");
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "cannot close expired leases"),
            }
        }
    }

    /// After the proxy drained: ships the outbox, gives back the leases and
    /// stops the rounds. What cannot be shipped now stays in the outbox for
    /// the next start.
    pub async fn stop(&self) {
        match self.book.flush_outbox().await {
            Ok(()) => match self.book.shutdown().await {
                Ok(returned) => tracing::info!(%returned, "gave back this replica's leases"),
                Err(error) => tracing::warn!(%error, "leases are left to expire"),
            },
            Err(error) => tracing::error!(%error, "the outbox could not be flushed"),
        }
        self.rounds.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Whether this replica is the treasurer now (it makes admin changes).
    pub fn is_treasurer(&self) -> bool {
        self.replica.epoch().is_some()
    }

    /// An admin write for the treasurer: `None` when this replica is the
    /// treasurer (handle it here); otherwise the treasurer's reply, or 503
    /// when no treasurer can be reached.
    pub async fn forward_admin(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
    ) -> Option<Result<Response<Bytes>, String>> {
        if self.replica.epoch().is_some() {
            return None;
        }
        if parts.headers.contains_key(FORWARDED) {
            return Some(Err("this replica is no longer the treasurer; retry".into()));
        }
        Some(self.forward(parts, body).await)
    }

    async fn forward(&self, parts: &http::request::Parts, body: Bytes) -> Result<Response<Bytes>, String> {
        let (treasurer, url) = match self.books.treasurer().await {
            Ok(Some((name, Some(url)))) => (name, url),
            Ok(_) => return Err("no replica is the treasurer right now; retry shortly".into()),
            Err(err) => return Err(err.to_string()),
        };
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = format!("{}{path}", url.trim_end_matches('/'));
        // The caller's own headers (its token, its Idempotency-Key) go
        // along; hop-by-hop ones and the length of a body re-sent whole do not.
        let mut headers = parts.headers.clone();
        strip_hop_by_hop(&mut headers);
        headers.remove(http::header::HOST);
        headers.remove(http::header::CONTENT_LENGTH);
        headers.insert(FORWARDED, HeaderValue::from_static("1"));
        let mut request = Request::builder()
            .method(parts.method.clone())
            .uri(&uri)
            .body(Full::new(body))
            .map_err(|err| format!("cannot forward to the treasurer: {err}"))?;
        *request.headers_mut() = headers;
        let response = tokio::time::timeout(FORWARD_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| format!("the treasurer ({treasurer}) did not answer in time"))?
            .map_err(|err| format!("the treasurer ({treasurer}) cannot be reached: {err}"))?;
        let (mut head, body) = response.into_parts();
        strip_hop_by_hop(&mut head.headers);
        let body = tokio::time::timeout(FORWARD_TIMEOUT, Limited::new(body, MAX_REPLY_BYTES).collect())
            .await
            .map_err(|_| format!("the treasurer ({treasurer}) did not finish its reply"))?
            .map_err(|err| format!("the treasurer's reply cannot be read: {err}"))?
            .to_bytes();
        // The treasurer acknowledged once its records were in the log: read
        // it to the end so a read on this replica sees the change.
        loop {
            match self.replica.catch_up().await {
                Ok(0) => break,
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read the log after a forwarded write");
                    break;
                }
            }
        }
        Ok(Response::from_parts(head, body))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_outbox_with_debits_ships_under_its_own_replica_name_only() {
        // Before, a data directory started under another explicit name (a
        // pod's name, say) shipped the earlier run's outbox under the new
        // one: debits already shipped were posted twice, and covered ones
        // shipped as uncovered while the old name's leases gave their
        // credit back.
        let dir = tempfile::tempdir().unwrap();
        let debits = open_outbox(dir.path(), "replica-a").unwrap();
        debits.insert(7u64.to_be_bytes(), &b"a debit"[..]).unwrap();
        debits.flush().unwrap();
        drop(debits);
        let refused = open_outbox(dir.path(), "replica-b").unwrap_err().to_string();
        assert!(refused.contains("\"replica-a\"") && refused.contains("posted twice"), "{refused}");
        let debits = open_outbox(dir.path(), "replica-a").unwrap();
        assert_eq!(debits.len(), 1, "its own name opens it, debits and all");
        // Shipped and emptied, it is taken over by a new name.
        debits.clear().unwrap();
        debits.flush().unwrap();
        drop(debits);
        assert!(open_outbox(dir.path(), "replica-b").unwrap().is_empty());
        assert!(
            open_outbox(dir.path(), "replica-a").is_ok(),
            "an empty outbox belongs to whoever starts on it"
        );

        // An outbox from before names were recorded (no owner in it) is
        // judged by the data directory's own name.
        let old = tempfile::tempdir().unwrap();
        std::fs::write(old.path().join("replica-name"), "replica-a\n").unwrap();
        {
            let store = sled::Config::new().path(old.path().join("outbox")).open().unwrap();
            store.open_tree("debits").unwrap().insert(7u64.to_be_bytes(), &b"a debit"[..]).unwrap();
            store.flush().unwrap();
        }
        assert!(open_outbox(old.path(), "replica-b").is_err(), "its name file says replica-a");
        assert_eq!(open_outbox(old.path(), "replica-a").unwrap().len(), 1);
    }
}
