//! The connection pool to the cluster's PostgreSQL.
//!
//! The URL is libpq's: `postgresql://user:pass@host1:5432,host2:5432/db`.
//! Every session must be able to write (leases and shipping are writes), so
//! `target_session_attrs=read-write` is always set: with several hosts the
//! driver tries them in order and keeps the primary, which is how a replica
//! follows a Patroni-managed failover. A short connect timeout (unless the
//! URL sets one) keeps a dead host from stalling that search.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::NoTls;

use super::ClusterError;

/// How long a statement may wait for a pooled connection.
const POOL_WAIT: Duration = Duration::from_secs(2);
/// Connect timeout per host when the URL sets none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A pool of connections to the primary.
///
/// A connection's I/O runs as a task on the runtime that opened it, so a
/// pool serves one runtime: a connection opened on a runtime whose thread
/// blocks stalls whoever else draws it. A thread with a runtime of its own
/// takes a pool of its own ([`Database::own_pool`]).
#[derive(Clone)]
pub struct Database {
    pool: Pool,
    /// The parsed URL (never shown: it carries the password), for sibling
    /// pools and connections outside the pool (the listener).
    config: tokio_postgres::Config,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it carries the password.
        f.debug_struct("Database").field("status", &self.pool.status()).finish()
    }
}

impl Database {
    /// A pool of up to `max_connections` for `url`. Connects lazily.
    pub fn new(url: &str, max_connections: usize) -> Result<Database, ClusterError> {
        let mut config = tokio_postgres::Config::from_str(url)
            // The driver's message does not echo the URL, so no password leaks.
            .map_err(|err| ClusterError::Config(format!("database URL: {err}")))?;
        config.target_session_attrs(TargetSessionAttrs::ReadWrite);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("creditgate");
        }
        Database::from_config(config, max_connections)
    }

    /// Another pool of up to `max_connections` to the same database.
    pub fn own_pool(&self, max_connections: usize) -> Result<Database, ClusterError> {
        Database::from_config(self.config.clone(), max_connections)
    }

    fn from_config(config: tokio_postgres::Config, max_connections: usize) -> Result<Database, ClusterError> {
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(max_connections.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT * 4))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|err| ClusterError::Config(format!("connection pool: {err}")))?;
        Ok(Database { pool, config })
    }

    /// A connection of its own, outside the pool, and the future that
    /// drives it (poll it to receive notifications).
    pub async fn connect(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
        ),
        ClusterError,
    > {
        self.config.connect(NoTls).await.map_err(|err| ClusterError::Unavailable(err.to_string()))
    }

    /// A connection from the pool.
    pub async fn client(&self) -> Result<Object, ClusterError> {
        self.pool.get().await.map_err(|err| ClusterError::Unavailable(err.to_string()))
    }
}
