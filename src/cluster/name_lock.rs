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
//! (a database restart or failover) the lock goes with it: until it is
//! claimed again the replica's books send nothing ([`NameLock::held`],
//! [`super::Books::fenced_by`]), so a twin that takes the name in between
//! never writes beside it. A lock still held by this process's own lost
//! session (the server has not noticed it closed, or a proxy in between
//! keeps it) is ended and claimed again; one held by another process means
//! this one must stop ([`NameLock::lost`]).

use std::sync::atomic::{AtomicBool, Ordering};
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

/// The session holding the lock of a name in this database (a 64-bit
/// advisory key is split into classid, the high half, and objid), with
/// when it started: a pid alone can be reused.
const HOLDER: &str = "SELECT l.pid, a.backend_start FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND ((l.classid::bigint << 32) | l.objid::bigint)
           = ('x' || left(md5('creditgate replica ' || $1), 16))::bit(64)::bigint";

/// This session, as [`HOLDER`] names one.
const ITSELF: &str = "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()";

/// A server session: its pid and when it started.
type SessionId = (i32, Option<chrono::DateTime<chrono::Utc>>);

/// A replica's hold on its name; released when the lock's task ends.
#[derive(Debug)]
pub struct NameLock {
    held: Arc<AtomicBool>,
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
        let session = loop {
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
        let (held, lost) = (Arc::new(AtomicBool::new(true)), Arc::new(parking_lot::Mutex::new(None)));
        let kept =
            Kept { db: db.clone(), replica: replica.to_owned(), held: held.clone(), lost: lost.clone() };
        tokio::spawn(kept.keep(session, stop));
        Ok(NameLock { held, lost })
    }

    /// Set while this process holds its name: the flag its books are
    /// fenced by.
    pub fn held(&self) -> Arc<AtomicBool> {
        self.held.clone()
    }

    /// Why this process no longer holds its name, once another took it.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().clone()
    }
}

/// What the lock's task keeps up to date.
struct Kept {
    db: Database,
    replica: String,
    held: Arc<AtomicBool>,
    lost: Arc<parking_lot::Mutex<Option<String>>>,
}

impl Kept {
    /// Holds the lock while the session lives; when the session is lost,
    /// claims the name again on a new one, or records that another has it.
    async fn keep(self, mut session: Session, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    session.close().await;
                    return;
                }
                () = session.ended() => {}
            }
            // From here until the name is ours again, nothing is written under it.
            self.held.store(false, Ordering::Release);
            let replica = &self.replica;
            tracing::warn!(replica, "lost the connection that holds this replica's name; claiming it again");
            let lost_session = session.id;
            session = loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(RETRY) => {}
                }
                let Ok(mut next) = Session::open(&self.db).await else { continue };
                match next.try_lock(replica).await {
                    Ok(true) => break next,
                    Ok(false) => match next.holder(replica).await {
                        // Our own lost session, not yet ended on the server
                        // (or kept by a proxy): end it and try again.
                        Ok(Some(holder)) if holder == lost_session => {
                            let ended =
                                next.client.query_one("SELECT pg_terminate_backend($1)", &[&holder.0]).await;
                            match ended.map(|row| row.get::<_, bool>(0)) {
                                Ok(true) => tracing::info!(
                                    replica,
                                    pid = holder.0,
                                    "ended this replica's own old session, which still held its name"
                                ),
                                Ok(false) => tracing::warn!(
                                    replica,
                                    pid = holder.0,
                                    "could not end this replica's own old session; retrying"
                                ),
                                Err(error) => {
                                    tracing::warn!(replica, %error, "could not end this replica's own old session; retrying")
                                }
                            }
                            next.close().await;
                        }
                        // Let go meanwhile, or unknown: try again.
                        Ok(None) | Err(_) => next.close().await,
                        Ok(Some(_)) => {
                            next.close().await;
                            let reason = format!("another process took this replica's name {replica:?}");
                            tracing::error!(%reason, "two processes run under one replica name");
                            *self.lost.lock() = Some(reason);
                            return;
                        }
                    },
                    Err(_) => next.close().await,
                }
            };
            self.held.store(true, Ordering::Release);
            tracing::info!(replica, "holds this replica's name again");
        }
    }
}

/// A connection of its own and the task that drives it.
struct Session {
    client: tokio_postgres::Client,
    driver: tokio::task::JoinHandle<()>,
    /// Its server session, as the lock tables name it.
    id: SessionId,
}

impl Session {
    async fn open(db: &Database) -> Result<Session, ClusterError> {
        let (client, mut connection) = db.connect().await?;
        let driver = tokio::spawn(async move {
            while let Some(Ok(_)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {}
        });
        let mut session = Session { client, driver, id: (0, None) };
        if let Err(err) = session.client.batch_execute(KEEPALIVES).await {
            session.close().await;
            return Err(err.into());
        }
        match session.client.query_one(ITSELF, &[]).await {
            Ok(row) => session.id = (row.get(0), row.get(1)),
            Err(err) => {
                session.close().await;
                return Err(err.into());
            }
        }
        Ok(session)
    }

    async fn try_lock(&mut self, replica: &str) -> Result<bool, ClusterError> {
        Ok(self.client.query_one(TRY_LOCK, &[&replica]).await?.get(0))
    }

    /// The server session holding `replica`'s lock, if any.
    async fn holder(&mut self, replica: &str) -> Result<Option<SessionId>, ClusterError> {
        Ok(self.client.query_opt(HOLDER, &[&replica]).await?.map(|row| (row.get(0), row.get(1))))
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
