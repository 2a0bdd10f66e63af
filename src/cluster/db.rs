//! The connection pool to the cluster's PostgreSQL.
//!
//! The URL is libpq's: `postgresql://user:pass@host1:5432,host2:5432/db`.
//! Every session must be able to write (leases and shipping are writes), so
//! `target_session_attrs=read-write` is always set: with several hosts the
//! driver tries them in order and keeps the primary, which is how a replica
//! follows a Patroni-managed failover. A short connect timeout (unless the
//! URL sets one) keeps a dead host from stalling that search.
//!
//! Every pooled session starts with bounds on waiting (see
//! [`SESSION_LIMITS`]) unless the URL's `options` sets them: a wallet row
//! locked by a session that stopped mid-transaction (a frozen process,
//! whose kernel still answers keepalives) must fail the draws queued behind
//! it, not hold their connections until the pool is gone.
//!
//! TLS follows libpq's `sslmode`, always verified: `require`, `verify-ca`
//! and `verify-full` connect only over TLS to a server whose certificate
//! chains to a trusted root and names the host (rustls checks both; a
//! `require` that does not verify would let anyone on the path read the
//! books). The roots are the URL's `sslrootcert` file (PEM) when given,
//! else the public web roots. `disable`, `allow` and `prefer` (the default)
//! connect in the clear.

use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use deadpool_postgres::{
    ClientWrapper, Hook, HookError, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_postgres::config::{SslMode, TargetSessionAttrs};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::ClusterError;

/// How long a statement may wait for a pooled connection.
const POOL_WAIT: Duration = Duration::from_secs(2);
/// Connect timeout per host when the URL sets none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The driver's keepalive idle time when the URL sets none (libpq's too).
const DRIVER_KEEPALIVE_IDLE: Duration = Duration::from_secs(2 * 60 * 60);
/// TCP keepalives unless the URL sets them: a silent peer is found in
/// about 10 + 3 × 5 s.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;
/// How long sent data may go unacknowledged before the connection fails
/// (TCP_USER_TIMEOUT), unless the URL sets it.
const UNACKED_TIMEOUT: Duration = Duration::from_secs(20);

/// What a pooled session may wait, each set when the URL's `options` does
/// not name it:
/// - `lock_timeout`: a row or advisory lock another session holds (every
///   caller retries: a draw at the next hold, a shipment or posting at its
///   next round);
/// - `idle_in_transaction_session_timeout`: a session of ours that stopped
///   between the statements of a transaction is ended, its locks released;
/// - `statement_timeout`: a backstop for a statement that never ends (a
///   connection handed back after its caller stopped waiting serves the next
///   borrower only when the statement it runs has ended). Migrations and
///   the audit lift it for their own transaction.
pub const SESSION_LIMITS: [(&str, &str); 3] =
    [("lock_timeout", "5s"), ("idle_in_transaction_session_timeout", "60s"), ("statement_timeout", "60s")];

/// The `SET` statements for the limits `options` (the URL's) leaves unset.
fn session_limits_sql(options: Option<&str>) -> String {
    let named = settings_named(options.unwrap_or_default());
    SESSION_LIMITS
        .iter()
        .filter(|(name, _)| !named.iter().any(|named| named == name))
        .map(|(name, value)| format!("SET {name} = '{value}';"))
        .collect()
}

/// The settings libpq's `options` names: `-c name=value`, `-cname=value`
/// and `--name=value` (where `-` in a name stands for `_`).
fn settings_named(options: &str) -> Vec<String> {
    let mut named = Vec::new();
    let mut tokens = options.split_whitespace();
    while let Some(token) = tokens.next() {
        let setting = match token {
            "-c" => tokens.next(),
            _ => token.strip_prefix("--").or_else(|| token.strip_prefix("-c")),
        };
        if let Some((name, _)) = setting.and_then(|setting| setting.split_once('=')) {
            named.push(name.replace('-', "_").to_ascii_lowercase());
        }
    }
    named
}

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
    tls: Tls,
}

/// How connections are made: in the clear, or over verified TLS.
#[derive(Clone)]
enum Tls {
    Off,
    Verified(MakeRustlsConnect),
}

/// A connection outside the pool, plain or over TLS: poll its messages to
/// drive it and to receive notifications (`None` once it closed).
pub trait Messages: Send {
    /// The next notification, notice or error.
    fn poll_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<AsyncMessage, tokio_postgres::Error>>>;
}

impl<S, T> Messages for tokio_postgres::Connection<S, T>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    fn poll_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<AsyncMessage, tokio_postgres::Error>>> {
        tokio_postgres::Connection::poll_message(self, cx)
    }
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
        let (url, root_file, verify) = take_tls_options(url);
        let mut config = tokio_postgres::Config::from_str(&url)
            // The driver's message does not echo the URL, so no password leaks.
            .map_err(|err| ClusterError::Config(format!("database URL: {err}")))?;
        config.target_session_attrs(TargetSessionAttrs::ReadWrite);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A connection whose peer went silent (a partition, a host that
        // froze) must fail, not wait for the kernel's defaults (two hours
        // idle before a keepalive; some fifteen minutes of retransmission):
        // a failed connection is a 503 and a fresh one from the pool, which
        // finds the new primary after a failover.
        if config.get_keepalives_idle() == DRIVER_KEEPALIVE_IDLE {
            config.keepalives_idle(KEEPALIVE_IDLE);
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(KEEPALIVE_INTERVAL);
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(KEEPALIVE_RETRIES);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(UNACKED_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("creditgate");
        }
        let tls = if verify || config.get_ssl_mode() == SslMode::Require {
            config.ssl_mode(SslMode::Require);
            Tls::Verified(MakeRustlsConnect::new(tls_config(root_file.as_deref())?))
        } else {
            if root_file.is_some() {
                return Err(ClusterError::Config(
                    "database URL: sslrootcert is set but sslmode does not ask for TLS; add sslmode=verify-full".into(),
                ));
            }
            // `prefer` would try TLS first: with no connector it never does.
            Tls::Off
        };
        Database::from_config(config, tls, max_connections)
    }

    /// Another pool of up to `max_connections` to the same database.
    pub fn own_pool(&self, max_connections: usize) -> Result<Database, ClusterError> {
        Database::from_config(self.config.clone(), self.tls.clone(), max_connections)
    }

    /// Whether connections are made over TLS.
    pub fn encrypted(&self) -> bool {
        matches!(self.tls, Tls::Verified(_))
    }

    /// Whether the URL names more than one host: a failover is expected.
    pub fn names_standbys(&self) -> bool {
        self.config.get_hosts().len() > 1
    }

    /// What is wrong with failing over to a standby of this server, if
    /// anything: a primary that replicates asynchronously acknowledges
    /// commits a promoted standby may never have had.
    pub async fn failover_risk(&self) -> Result<Option<String>, ClusterError> {
        let client = self.client().await?;
        let setting = |row: tokio_postgres::Row| row.try_get::<_, String>(0);
        let standbys = setting(client.query_one("SHOW synchronous_standby_names", &[]).await?)?;
        let commit = setting(client.query_one("SHOW synchronous_commit", &[]).await?)?;
        Ok(if standbys.trim().is_empty() {
            Some("synchronous_standby_names is empty".to_owned())
        } else if commit == "off" || commit == "local" {
            Some(format!("synchronous_commit is {commit}"))
        } else {
            None
        })
    }

    fn from_config(
        config: tokio_postgres::Config,
        tls: Tls,
        max_connections: usize,
    ) -> Result<Database, ClusterError> {
        let settings = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = match &tls {
            Tls::Off => Manager::from_config(config.clone(), NoTls, settings),
            Tls::Verified(connector) => Manager::from_config(config.clone(), connector.clone(), settings),
        };
        let limits = session_limits_sql(config.get_options());
        let set_limits = Hook::async_fn(move |client: &mut ClientWrapper, _| {
            let limits = limits.clone();
            Box::pin(async move {
                if !limits.is_empty() {
                    client.batch_execute(&limits).await.map_err(HookError::Backend)?;
                }
                Ok(())
            })
        });
        let pool = Pool::builder(manager)
            .post_create(set_limits)
            .max_size(max_connections.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT * 4))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|err| ClusterError::Config(format!("connection pool: {err}")))?;
        Ok(Database { pool, config, tls })
    }

    /// A connection of its own, outside the pool, and its messages (poll
    /// them to drive it and to receive notifications).
    pub async fn connect(&self) -> Result<(tokio_postgres::Client, Box<dyn Messages>), ClusterError> {
        // The connect timeout covers each host's TCP connect only; TLS and
        // authentication are bounded as the pool bounds making a connection.
        tokio::time::timeout(CONNECT_TIMEOUT * 4, self.connect_unbounded())
            .await
            .map_err(|_| ClusterError::Unavailable("connecting to the database took too long".into()))?
    }

    async fn connect_unbounded(&self) -> Result<(tokio_postgres::Client, Box<dyn Messages>), ClusterError> {
        let unavailable = |err: tokio_postgres::Error| ClusterError::Unavailable(err.to_string());
        Ok(match &self.tls {
            Tls::Off => {
                let (client, connection) = self.config.connect(NoTls).await.map_err(unavailable)?;
                (client, Box::new(connection) as Box<dyn Messages>)
            }
            Tls::Verified(connector) => {
                let (client, connection) =
                    self.config.connect(connector.clone()).await.map_err(unavailable)?;
                (client, Box::new(connection) as Box<dyn Messages>)
            }
        })
    }

    /// A connection from the pool.
    pub async fn client(&self) -> Result<Object, ClusterError> {
        self.pool.get().await.map_err(|err| ClusterError::Unavailable(err.to_string()))
    }
}

/// Takes libpq's TLS options the driver does not read out of a URL:
/// `sslrootcert` (returned), and `sslmode=verify-ca|verify-full` (returned
/// as `true`, passed on as `require`), and `sslmode=allow` (passed on as
/// `prefer`, which the driver knows). Other forms pass unchanged; libpq's
/// `key=value` connection strings are not read (the URL form is).
fn take_tls_options(url: &str) -> (String, Option<String>, bool) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None, false);
    };
    let (mut kept, mut root_file, mut verify) = (Vec::new(), None, false);
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("sslrootcert", file)) => {
                // A path as written (not percent-decoded).
                root_file = Some(file.to_owned());
            }
            Some(("sslmode", "verify-ca" | "verify-full")) => {
                verify = true;
                kept.push("sslmode=require");
            }
            // libpq's `allow` (clear first, TLS if the server insists),
            // which the driver does not know: in the clear, as `prefer` is here.
            Some(("sslmode", "allow")) => kept.push("sslmode=prefer"),
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
    (url, root_file, verify)
}

/// A client configuration that trusts the roots in `root_file` (PEM), or
/// the public web roots.
fn tls_config(root_file: Option<&str>) -> Result<rustls::ClientConfig, ClusterError> {
    let mut roots = rustls::RootCertStore::empty();
    match root_file {
        Some(file) => {
            let bad =
                |err: &dyn std::fmt::Display| ClusterError::Config(format!("sslrootcert {file}: {err}"));
            for cert in CertificateDer::pem_file_iter(file).map_err(|err| bad(&err))? {
                roots.add(cert.map_err(|err| bad(&err))?).map_err(|err| bad(&err))?;
            }
            if roots.is_empty() {
                return Err(bad(&"no certificate in the file"));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|builder| builder.with_root_certificates(roots).with_no_client_auth())
        .map_err(|err| ClusterError::Config(format!("TLS: {err}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_session_limits_a_url_sets_are_left_to_it_and_only_those() {
        let all = "SET lock_timeout = '5s';SET idle_in_transaction_session_timeout = '60s';SET statement_timeout = '60s';";
        assert_eq!(session_limits_sql(None), all);
        // Another setting whose name holds one of ours is not one of ours.
        assert_eq!(session_limits_sql(Some("-c deadlock_timeout=2s")), all);
        assert_eq!(
            session_limits_sql(Some(
                "-c lock_timeout=1s -cstatement_timeout=0 --idle-in-transaction-session-timeout=9s"
            )),
            ""
        );
        assert_eq!(
            session_limits_sql(Some("-c search_path=books -c Lock_Timeout=1s")),
            "SET idle_in_transaction_session_timeout = '60s';SET statement_timeout = '60s';"
        );
    }

    #[test]
    fn a_silent_peer_is_given_up_on_in_seconds_unless_the_url_says_otherwise() {
        let db = Database::new("postgresql://cg@db1:5432,db2:5432/books", 2).unwrap();
        assert_eq!(db.config.get_keepalives_idle(), KEEPALIVE_IDLE);
        assert_eq!(db.config.get_keepalives_interval(), Some(KEEPALIVE_INTERVAL));
        assert_eq!(db.config.get_keepalives_retries(), Some(KEEPALIVE_RETRIES));
        assert_eq!(db.config.get_tcp_user_timeout(), Some(&UNACKED_TIMEOUT));

        let own = "postgresql://cg@db1/books?keepalives_idle=30&keepalives_interval=7&keepalives_retries=9&tcp_user_timeout=4";
        let db = Database::new(own, 2).unwrap();
        assert_eq!(db.config.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(db.config.get_keepalives_interval(), Some(Duration::from_secs(7)));
        assert_eq!(db.config.get_keepalives_retries(), Some(9));
        assert_eq!(db.config.get_tcp_user_timeout(), Some(&Duration::from_secs(4)));
    }

    #[test]
    fn every_sslmode_the_readme_names_is_read() {
        for mode in ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] {
            let db = Database::new(&format!("postgresql://cg@db1/books?sslmode={mode}"), 2);
            assert!(db.is_ok(), "sslmode={mode}: {:?}", db.err());
        }
    }
}
