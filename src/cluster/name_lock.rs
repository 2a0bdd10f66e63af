//! One live process per replica name.
//!
//! Everything a replica writes to the books is keyed by its name: debits
//! are unique by (name, entry), log records by (name, origin), and a start
//! gives back every open lease of its name. Two live processes under one
//! name (a config file with `replica = "..."` copied to two machines, a
//! data directory cloned) would silently drop each other's debits as
//! duplicates and close each other's leases, so a replica holds its name
//! with a session-level advisory lock on a connection of its own, taken
//! before it touches the books and kept until it has given its leases back.
//!
//! A process that dies releases the lock when PostgreSQL sees its
//! connection close; a machine that vanishes, within the server-side TCP
//! keepalive this connection asks for. A claim that finds the name held
//! therefore waits a while before it gives up. If the connection is lost
//! (a database restart or failover) the lock goes with it and is claimed
//! again on the next connection; if another process took the name in
//! between, this one must stop ([`NameLock::lost`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{ClusterError, Database};

/// How often a claim that finds the name held, or a lost lock, tries again.
const RETRY: Duration = Duration::from_millis(250);

/// Asks the server to probe this connection after 5 s idle, every 2 s, and
/// give up after 3 misses: a vanished holder frees its name in about 11 s.
const KEEPALIVES: &str =
    "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 3";

/// The lock's key: a 64-bit digest of the name, so distinct names do not
/// collide in practice.
pub const TRY_LOCK: &str =
    "SELECT pg_try_advisory_lock(('x' || left(md5('creditgate replica ' || $1), 16))::bit(64)::bigint)";

/// A replica's hold on its name; released when the lock's task ends.
#[derive(Debug)]
pub struct NameLock {
    lost: Arc<parking_lot::Mutex<Option<String>>>,
}

impl NameLock {
    /// Claims `replica` for this process, waiting up to `patience` for a
    /// holder that went away to be noticed by the server. Keeps the claim
    /// until `stop` is cancelled.
    pub async fn claim(
        db: &Database,
        replica: &str,
        patience: Duration,
        stop: CancellationToken,
    ) -> Result<NameLock, ClusterError> {
        let deadline = Instant::now() + patience;
        let mut waited = false;
        let held = loop {
            let mut session = Session::open(db).await?;
            if session.try_lock(replica).await? {
                break session;
            }
            session.close().await;
            if Instant::now() >= deadline {
                return Err(ClusterError::Config(format!(
                    "replica name {replica:?} is held by another live process on this cluster's database; \
                     give each replica its own data directory and its own [cluster] replica name"
                )));
            }
            if !waited {
                waited = true;
                tracing::warn!(
                    replica,
                    patience_ms = patience.as_millis(),
                    "this replica's name is held by another session; waiting for it to go"
                );
            }
            tokio::time::sleep(RETRY).await;
        };
        let lost = Arc::new(parking_lot::Mutex::new(None));
        tokio::spawn(keep(db.clone(), replica.to_owned(), held, lost.clone(), stop));
        Ok(NameLock { lost })
    }

    /// Why this process no longer holds its name, once another took it.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().clone()
    }
}

/// Holds the lock while the session lives; when the session is lost,
/// claims the name again on a new one, or records that another has it.
async fn keep(
    db: Database,
    replica: String,
    mut session: Session,
    lost: Arc<parking_lot::Mutex<Option<String>>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                session.close().await;
                return;
            }
            () = session.ended() => {}
        }
        tracing::warn!(replica, "lost the connection that holds this replica's name; claiming it again");
        session = loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RETRY) => {}
            }
            let Ok(mut next) = Session::open(&db).await else { continue };
            match next.try_lock(&replica).await {
                Ok(true) => break next,
                Ok(false) => {
                    next.close().await;
                    let reason = format!("another process took this replica's name {replica:?}");
                    tracing::error!(%reason, "two processes run under one replica name");
                    *lost.lock() = Some(reason);
                    return;
                }
                Err(_) => next.close().await,
            }
        };
    }
}

/// A connection of its own and the task that drives it.
struct Session {
    client: tokio_postgres::Client,
    driver: tokio::task::JoinHandle<()>,
}

impl Session {
    async fn open(db: &Database) -> Result<Session, ClusterError> {
        let (client, mut connection) = db.connect().await?;
        let driver = tokio::spawn(async move {
            while let Some(Ok(_)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {}
        });
        let session = Session { client, driver };
        if let Err(err) = session.client.batch_execute(KEEPALIVES).await {
            session.close().await;
            return Err(err.into());
        }
        Ok(session)
    }

    async fn try_lock(&mut self, replica: &str) -> Result<bool, ClusterError> {
        Ok(self.client.query_one(TRY_LOCK, &[&replica]).await?.get(0))
    }

    /// Returns when the connection closed.
    async fn ended(&mut self) {
        let _ = (&mut self.driver).await;
    }

    /// Closes the connection, which releases the lock.
    async fn close(self) {
        drop(self.client);
        let _ = self.driver.await;
    }
}
