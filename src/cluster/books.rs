//! The statements on the shared books. Each operation is one statement (the
//! multi-step ones are PL/pgSQL functions in the schema), so a replica's
//! database traffic is one round trip per lease draw, renewal or shipped
//! batch, never one per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use super::{ClusterError, Database};

/// A lease the database granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseGrant {
    /// The lease's id.
    pub id: i64,
    /// How much may be spent under it.
    pub granted: Decimal,
    /// Its deadline, in database time.
    pub expires_at: DateTime<Utc>,
    /// The database's clock when it was granted.
    pub db_now: DateTime<Utc>,
}

impl LeaseGrant {
    /// How long the lease lasts from the moment it was granted.
    pub fn lifetime(&self) -> Duration {
        (self.expires_at - self.db_now).to_std().unwrap_or(Duration::ZERO)
    }
}

/// A settled debit on its way from a replica's outbox to the books.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ShippedDebit {
    /// The replica's own number for it; (replica, entry) is unique.
    pub entry: i64,
    /// The wallet it debits.
    pub wallet: String,
    /// The lease it was held under.
    pub lease: i64,
    /// The amount debited.
    pub amount: Decimal,
    /// When it was settled.
    pub at: DateTime<Utc>,
    /// What the books keep about it (request id, model, usage), as JSON
    /// text: written once at the settle and carried as it is.
    pub detail: Box<serde_json::value::RawValue>,
}

/// The detail of a debit that carries none.
pub fn empty_detail() -> Box<serde_json::value::RawValue> {
    serde_json::value::RawValue::from_string("{}".to_owned())
        .unwrap_or_else(|_| unreachable!("`{{}}` is JSON"))
}

/// The answer to a funding call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FundingReceipt {
    /// False when the idempotency key had been used: nothing new was added.
    pub created: bool,
    /// The wallet's balance afterwards.
    pub balance: Decimal,
}

/// One wallet's books, recomputed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WalletAudit {
    /// The wallet.
    pub wallet: String,
    /// The stored balance.
    pub balance: Decimal,
    /// Sum of funding.
    pub funded: Decimal,
    /// Sum of shipped debits.
    pub debited: Decimal,
    /// Sum of the debits no open lease covered (recorded overrun).
    pub uncovered: Decimal,
    /// The stored sum of open leases' unspent part.
    pub leased: Decimal,
    /// That sum recomputed from the open leases.
    pub open_leases: Decimal,
}

impl WalletAudit {
    /// `balance == funded - debited` and `leased` matches the open leases.
    pub fn balances(&self) -> bool {
        self.balance == self.funded - self.debited && self.leased == self.open_leases
    }
}

/// What a renewal did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Renewal {
    /// The database's clock.
    pub db_now: DateTime<Utc>,
    /// Every open lease of the replica with its deadline: `ttl` from now,
    /// or its wallet's next lot expiry if that comes first, or unchanged
    /// where the wallet's lasting credit no longer covers its leases.
    pub open: Vec<(i64, DateTime<Utc>)>,
}

impl Renewal {
    /// How long `lease` lasts from the renewal, or `None` if it was closed.
    pub fn lifetime(&self, lease: i64) -> Option<Duration> {
        let (_, deadline) = self.open.iter().find(|(id, _)| *id == lease)?;
        Some((*deadline - self.db_now).to_std().unwrap_or(Duration::ZERO))
    }
}

/// A replica as `cluster status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReplicaStatus {
    /// Its name.
    pub replica: String,
    /// When it first registered.
    pub started_at: DateTime<Utc>,
    /// Its last renewal.
    pub last_seen: DateTime<Utc>,
    /// Settles waiting in its outbox at that renewal.
    pub outbox_len: i64,
    /// How long the oldest of them has waited, now.
    pub outbox_lag_ms: Option<i64>,
    /// Its open leases.
    pub open_leases: i64,
    /// Sum of their unspent part.
    pub leased: Decimal,
    /// The price table it runs (`label@hash`), as it last reported.
    pub price_version: Option<String>,
    /// Whether it renewed within the last minute (by the database's clock).
    pub live: bool,
    /// Whether it holds the treasury now (posts the shipped debits, applies
    /// expiry, resets and grants).
    pub treasurer: bool,
}

/// Debits shipped to the books and not yet posted by the treasurer.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct PostingBacklog {
    pub debits: i64,
    /// How long the oldest has waited, by the database's clock.
    pub oldest_ms: Option<i64>,
}

/// The shared books, through a [`Database`].
#[derive(Clone, Debug)]
pub struct Books {
    db: Database,
    /// Operations sent (each one statement, or one short transaction).
    operations: Arc<AtomicU64>,
    /// Set while this process holds its replica name (see
    /// [`super::name_lock`]); while it does not, no statement is sent, so a
    /// process that lost its name cannot write under it. `None`: unfenced
    /// (the command-line tools).
    name_held: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The replica's clock, told the database's time at each treasury claim.
    pub(super) clock: Option<Arc<crate::clock::DatabaseClock>>,
}

/// Deadlock (40P01) and serialization (40001) failures roll the whole
/// transaction back, and every statement here is safe to run again.
fn retryable(err: &ClusterError) -> bool {
    let ClusterError::Statement(err) = err else { return false };
    err.code().is_some_and(|code| {
        *code == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
            || *code == tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
    })
}

pub(super) async fn retrying<T, F, Fut>(mut op: F) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClusterError>>,
{
    let mut attempts = 0;
    loop {
        match op().await {
            Err(err) if retryable(&err) && attempts < 3 => attempts += 1,
            other => return other,
        }
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Books {
    /// Books in `db` (migrated with [`super::migrate::migrate`]).
    pub fn new(db: Database) -> Books {
        Books { db, operations: Arc::new(AtomicU64::new(0)), name_held: None, clock: None }
    }

    /// The same books through a pool of their own, for a thread that runs
    /// its own runtime (see [`Database`]); operations are counted together.
    pub fn with_own_pool(&self, max_connections: usize) -> Result<Books, ClusterError> {
        Ok(Books {
            db: self.db.own_pool(max_connections)?,
            operations: self.operations.clone(),
            name_held: self.name_held.clone(),
            clock: self.clock.clone(),
        })
    }

    /// These books, sending statements only while `held` is set.
    pub fn fenced_by(mut self, held: Arc<std::sync::atomic::AtomicBool>) -> Books {
        self.name_held = Some(held);
        self
    }

    /// These books, telling `clock` the database's time at each treasury
    /// claim or renewal (every replica makes one each `treasury_ttl_ms / 6`,
    /// a second at the default).
    pub fn keeping_time(mut self, clock: Arc<crate::clock::DatabaseClock>) -> Books {
        self.clock = Some(clock);
        self
    }

    /// Tells the clock the database's time now (a replica's first reading,
    /// before it serves).
    pub async fn read_database_time(&self) -> Result<(), ClusterError> {
        let Some(clock) = &self.clock else { return Ok(()) };
        let client = self.client().await?;
        let row = client.query_one("SELECT clock_timestamp()", &[]).await?;
        clock.observe(row.get(0));
        Ok(())
    }

    /// A connection for one operation, counted.
    pub(super) async fn client(&self) -> Result<deadpool_postgres::Object, ClusterError> {
        if self.name_held.as_ref().is_some_and(|held| !held.load(Ordering::Acquire)) {
            return Err(ClusterError::Unavailable("this process does not hold its replica name now".into()));
        }
        self.operations.fetch_add(1, Ordering::Relaxed);
        self.db.client().await
    }

    /// How many operations these books (and their clones) have sent.
    pub fn operations(&self) -> u64 {
        self.operations.load(Ordering::Relaxed)
    }

    /// Adds credit to a wallet, once per `(org, idempotency_key)`; creates the
    /// wallet's row on first use. A wallet belongs to one org for ever, so
    /// credit never moves between organizations.
    pub async fn fund(
        &self,
        org: i64,
        wallet: &str,
        amount: Decimal,
        idempotency_key: &str,
    ) -> Result<FundingReceipt, ClusterError> {
        // Lowering a balance below what is leased would let replicas spend
        // credit that is gone; debit adjustments go through the treasurer.
        if amount <= Decimal::ZERO {
            return Err(ClusterError::Config(format!("funding adds credit: {amount} is not above 0")));
        }
        retrying(|| async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let owner = tx
                .query_opt(
                    "INSERT INTO cg_wallets (wallet, org) VALUES ($1, $2)
                     ON CONFLICT (wallet) DO UPDATE SET org = cg_wallets.org RETURNING org",
                    &[&wallet, &org],
                )
                .await?;
            if owner.map(|row| row.get::<_, i64>(0)) != Some(org) {
                return Err(ClusterError::Config(format!("wallet {wallet} belongs to another organization")));
            }
            let inserted = tx
                .execute(
                    "INSERT INTO cg_funding (org, wallet, amount, idempotency_key) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (org, idempotency_key) DO NOTHING",
                    &[&org, &wallet, &amount, &idempotency_key],
                )
                .await?;
            let balance: Decimal = if inserted == 1 {
                tx.query_one(
                    "UPDATE cg_wallets SET balance = balance + $2 WHERE wallet = $1 RETURNING balance",
                    &[&wallet, &amount],
                )
                .await?
                .get(0)
            } else {
                tx.query_one("SELECT balance FROM cg_wallets WHERE wallet = $1", &[&wallet]).await?.get(0)
            };
            tx.commit().await?;
            Ok(FundingReceipt { created: inserted == 1, balance })
        })
        .await
    }

    /// Draws a lease of up to `want`, at least `min`; `None` when the wallet
    /// cannot cover `min`. `live` is how recently a replica must have been
    /// seen to count for the fair share. Credit of lots that expire within
    /// `horizon` is not leased, and the lease ends by the next expiry.
    #[allow(clippy::too_many_arguments)]
    pub async fn draw_lease(
        &self,
        replica: &str,
        wallet: &str,
        want: Decimal,
        min: Decimal,
        ttl: Duration,
        live: Duration,
        horizon: Duration,
    ) -> Result<Option<LeaseGrant>, ClusterError> {
        retrying(|| async move {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(
                    "SELECT lease, granted, expires_at, db_now FROM cg_draw_lease($1, $2, $3, $4, $5, $6, $7)",
                )
                .await?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
                [&replica, &wallet, &want, &min, &millis(ttl), &millis(live), &millis(horizon)];
            let row = client.query_opt(&statement, &params).await?;
            Ok(row.map(|row| LeaseGrant {
                id: row.get(0),
                granted: row.get(1),
                expires_at: row.get(2),
                db_now: row.get(3),
            }))
        })
        .await
    }

    /// Extends the open leases of `replica` named in `known` to `ttl` from
    /// now (bounded as [`Renewal::open`] says, with lots expiring within
    /// `horizon` counted as expired; a lease the replica does not know of,
    /// its draw's reply lost, is left to lapse), marks it live and records its outbox (length, oldest
    /// unshipped settle); returns the database's `now()` and every open
    /// lease with its deadline (a lease missing from them was closed: it
    /// must not be used).
    pub async fn renew(
        &self,
        replica: &str,
        ttl: Duration,
        horizon: Duration,
        outbox: (i64, Option<DateTime<Utc>>),
        known: &[i64],
    ) -> Result<Renewal, ClusterError> {
        retrying(|| self.renew_once(replica, ttl, horizon, outbox, known)).await
    }

    /// Ships a batch of debits; returns how many were new.
    pub async fn ship(&self, replica: &str, debits: &[ShippedDebit]) -> Result<u64, ClusterError> {
        retrying(|| self.ship_once(replica, debits)).await
    }

    /// Closes leases of `replica` whose debits have all shipped and returns
    /// their unspent part to their wallets; returns the total returned.
    pub async fn give_back(&self, replica: &str, leases: &[i64]) -> Result<Decimal, ClusterError> {
        retrying(|| self.give_back_once(replica, leases)).await
    }

    /// Records where `replica`'s admin API listens (registering it).
    pub async fn register(&self, replica: &str, admin_url: &str) -> Result<(), ClusterError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO cg_replicas (replica, admin_url) VALUES ($1, $2)
                 ON CONFLICT (replica) DO UPDATE SET admin_url = $2, last_seen = now()",
                &[&replica, &admin_url],
            )
            .await?;
        Ok(())
    }

    /// Records the price table `replica` runs now.
    pub async fn report_price_version(&self, replica: &str, version: &str) -> Result<(), ClusterError> {
        let client = self.client().await?;
        client
            .execute("UPDATE cg_replicas SET price_version = $2 WHERE replica = $1", &[&replica, &version])
            .await?;
        Ok(())
    }

    /// Asks every replica to re-read its price file (`NOTIFY cg_prices`).
    pub async fn ask_price_reload(&self) -> Result<(), ClusterError> {
        let client = self.client().await?;
        client.execute("SELECT pg_notify('cg_prices', '')", &[]).await?;
        Ok(())
    }

    /// The treasurer while its treasury stands: its name and admin URL.
    pub async fn treasurer(&self) -> Result<Option<(String, Option<String>)>, ClusterError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT t.replica, r.admin_url FROM cg_treasurer t LEFT JOIN cg_replicas r USING (replica)
                 WHERE t.expires_at > clock_timestamp()",
                &[],
            )
            .await?;
        Ok(row.map(|row| (row.get(0), row.get(1))))
    }

    /// Sets a limit row's cap from the record numbered `version` (creating
    /// the row): see migrations 6 and 18. Returns false when a newer record
    /// set it already, and the row keeps that cap.
    pub async fn set_limit(
        &self,
        name: &str,
        org: i64,
        cap: Decimal,
        version: u64,
    ) -> Result<bool, ClusterError> {
        let version = i64::try_from(version)
            .map_err(|_| ClusterError::Schema(format!("limit version {version} is past the books' range")))?;
        retrying(|| async move {
            let client = self.client().await?;
            let statement = client.prepare_cached("SELECT cg_set_limit($1, $2, $3, $4)").await?;
            Ok(client.query_one(&statement, &[&name, &org, &cap, &version]).await?.get(0))
        })
        .await
    }

    /// `wallet`'s balance in the books (zero for a wallet they do not know)
    /// and, when it covers `amount` (the credit is leased to other replicas,
    /// then), tells them in the same statement that `replica` needs it: each
    /// gives back what it is not using (see [`super::Wakeups::wanted`]). The
    /// ask is a hint.
    pub async fn balance_asking_if_it_covers(
        &self,
        replica: &str,
        wallet: &str,
        amount: Decimal,
    ) -> Result<Decimal, ClusterError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT w.balance,
                        (SELECT count(*) FROM (SELECT pg_notify('cg_wanted', $3) WHERE w.balance >= $2) ask)
                 FROM cg_wallets w WHERE w.wallet = $1",
            )
            .await?;
        let payload = super::wakeups::wanted_payload(replica, wallet);
        let row = client.query_opt(&statement, &[&wallet, &amount, &payload]).await?;
        Ok(row.map_or(Ok(Decimal::ZERO), |row| row.try_get(0))?)
    }

    /// The open leases of `replica`.
    pub async fn open_leases(&self, replica: &str) -> Result<Vec<i64>, ClusterError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT id FROM cg_leases WHERE replica = $1 AND closed_at IS NULL", &[&replica])
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// The highest entry `replica` ever shipped (0 if none): a restarted
    /// replica numbers its debits above it.
    pub async fn last_entry(&self, replica: &str) -> Result<i64, ClusterError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT COALESCE(max(entry), 0) FROM cg_debits WHERE replica = $1", &[&replica])
            .await?;
        Ok(row.get(0))
    }

    /// Closes every lease more than `grace` past its deadline (its replica
    /// stopped renewing) and returns the unspent part to its wallet.
    pub async fn expire(&self, grace: Duration) -> Result<Decimal, ClusterError> {
        retrying(|| self.expire_once(grace)).await
    }

    async fn renew_once(
        &self,
        replica: &str,
        ttl: Duration,
        horizon: Duration,
        (outbox_len, oldest_unshipped): (i64, Option<DateTime<Utc>>),
        known: &[i64],
    ) -> Result<Renewal, ClusterError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "WITH seen AS (
                     INSERT INTO cg_replicas (replica, outbox_len, oldest_unshipped) VALUES ($1, $4, $5)
                     ON CONFLICT (replica) DO UPDATE
                     SET last_seen = now(), outbox_len = $4, oldest_unshipped = $5)
                 SELECT now(), r.ids, r.deadlines FROM cg_renew_leases($1, $2, $3, $6) r",
            )
            .await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
            [&replica, &millis(ttl), &millis(horizon), &outbox_len, &oldest_unshipped, &known];
        let row = client.query_one(&statement, &params).await?;
        let (ids, deadlines): (Vec<i64>, Vec<DateTime<Utc>>) = (row.get(1), row.get(2));
        Ok(Renewal { db_now: row.get(0), open: ids.into_iter().zip(deadlines).collect() })
    }

    async fn ship_once(&self, replica: &str, debits: &[ShippedDebit]) -> Result<u64, ClusterError> {
        if debits.is_empty() {
            return Ok(0);
        }
        let entries: Vec<i64> = debits.iter().map(|debit| debit.entry).collect();
        let wallets: Vec<&str> = debits.iter().map(|debit| debit.wallet.as_str()).collect();
        let leases: Vec<i64> = debits.iter().map(|debit| debit.lease).collect();
        let amounts: Vec<Decimal> = debits.iter().map(|debit| debit.amount).collect();
        let ats: Vec<DateTime<Utc>> = debits.iter().map(|debit| debit.at).collect();
        let details: Vec<tokio_postgres::types::Json<&serde_json::value::RawValue>> =
            debits.iter().map(|debit| tokio_postgres::types::Json(&*debit.detail)).collect();
        let client = self.client().await?;
        let statement = client.prepare_cached("SELECT cg_ship_debits($1, $2, $3, $4, $5, $6, $7)").await?;
        let row = client
            .query_one(&statement, &[&replica, &entries, &wallets, &leases, &amounts, &ats, &details])
            .await?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    async fn give_back_once(&self, replica: &str, leases: &[i64]) -> Result<Decimal, ClusterError> {
        let client = self.client().await?;
        let row = client.query_one("SELECT cg_close_leases($1, $2, 0)", &[&replica, &leases]).await?;
        Ok(row.get(0))
    }

    async fn expire_once(&self, grace: Duration) -> Result<Decimal, ClusterError> {
        let client = self.client().await?;
        let none: Option<Vec<i64>> = None;
        let row = client.query_one("SELECT cg_close_leases('', $1, $2)", &[&none, &millis(grace)]).await?;
        Ok(row.get(0))
    }

    /// Every replica the books know, with its open leases and outbox.
    pub async fn replicas(&self) -> Result<Vec<ReplicaStatus>, ClusterError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT r.replica, r.started_at, r.last_seen, r.outbox_len,
                        (EXTRACT(EPOCH FROM (now() - r.oldest_unshipped)) * 1000)::bigint,
                        (SELECT count(*) FROM cg_leases l WHERE l.replica = r.replica AND l.closed_at IS NULL),
                        COALESCE((SELECT sum(granted - spent) FROM cg_leases l
                                  WHERE l.replica = r.replica AND l.closed_at IS NULL), 0),
                        r.price_version, r.last_seen > now() - interval '1 minute',
                        EXISTS (SELECT 1 FROM cg_treasurer t
                                WHERE t.replica = r.replica AND t.expires_at > clock_timestamp())
                 FROM cg_replicas r ORDER BY r.replica",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| ReplicaStatus {
                replica: row.get(0),
                started_at: row.get(1),
                last_seen: row.get(2),
                outbox_len: row.get(3),
                outbox_lag_ms: row.get(4),
                open_leases: row.get(5),
                leased: row.get(6),
                price_version: row.get(7),
                live: row.get(8),
                treasurer: row.get(9),
            })
            .collect())
    }

    /// The debits shipped and waiting for the treasurer to post them.
    pub async fn posting_backlog(&self) -> Result<PostingBacklog, ClusterError> {
        let client = self.client().await?;
        // The mark as a value, not a subquery: planned for it, the count
        // reads the index from the mark, not the whole table.
        let mark: i64 = client.query_one("SELECT posted_through FROM cg_posting", &[]).await?.get(0);
        let row = client
            .query_one(
                "SELECT count(*), (EXTRACT(EPOCH FROM (now() - min(shipped_at))) * 1000)::bigint FROM cg_debits
                 WHERE post_seq > $1 AND post_error IS NULL",
                &[&mark],
            )
            .await?;
        Ok(PostingBacklog { debits: row.get(0), oldest_ms: row.get(1) })
    }

    /// Every wallet's books recomputed from funding, debits and open leases.
    pub async fn audit(&self) -> Result<Vec<WalletAudit>, ClusterError> {
        let mut client = self.client().await?;
        // Every wallet's every row: not cut at the pool's statement limit.
        let tx = client.transaction().await?;
        tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
        let rows = tx
            .query(
                // Debits summed in one pass over the table (no index per
                // wallet: each would cost every shipped debit an entry).
                "SELECT w.wallet, w.balance, w.leased,
                        COALESCE((SELECT sum(amount) FROM cg_funding f WHERE f.wallet = w.wallet), 0),
                        COALESCE(d.amount, 0),
                        COALESCE(d.uncovered, 0),
                        COALESCE((SELECT sum(granted - spent) FROM cg_leases l
                                  WHERE l.wallet = w.wallet AND l.closed_at IS NULL), 0)
                 FROM cg_wallets w
                 LEFT JOIN (SELECT wallet, sum(amount) AS amount, sum(uncovered) AS uncovered
                            FROM cg_debits GROUP BY wallet) d ON d.wallet = w.wallet
                 ORDER BY w.wallet",
                &[],
            )
            .await?;
        tx.commit().await?;
        Ok(rows
            .iter()
            .map(|row| WalletAudit {
                wallet: row.get(0),
                balance: row.get(1),
                leased: row.get(2),
                funded: row.get(3),
                debited: row.get(4),
                uncovered: row.get(5),
                open_leases: row.get(6),
            })
            .collect())
    }
}
