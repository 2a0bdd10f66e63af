//! Cluster mode: many replicas, one set of books in PostgreSQL (DESIGN.md §7).
//!
//! Without a `[cluster]` section nothing here runs: a single node keeps its
//! books in the embedded sled store.
//!
//! - [`db`]      — the connection pool: libpq URLs, multi-host, read-write
//! - [`migrate`] — embedded, versioned schema migrations under an advisory lock
//! - [`books`]   — the statements on the shared books: funding, leases, shipped
//!   debits, expiry, audit (one statement each)
//! - [`log`]     — the global record log: one gapless order for all replicas
//! - [`leases`]  — a replica's side: [`LeaseBook`] holds and settles in memory
//!   against leased credit and ships its debits in batches
//! - [`replica`] — a replica's ledger: a follower replaying the log, or the
//!   treasurer (one at a time, fenced by epoch) whose ledger makes records
//! - [`journal`] — [`LogJournal`], the treasurer's journal into the log
//! - [`name_lock`] — one live process per replica name (an advisory lock)
//! - [`node`]    — a replica at run time: its view, leases, outbox and rounds
//! - [`spend`]   — a request's hold across the view, limits and credit
//! - [`wakeups`] — `LISTEN`/`NOTIFY` instead of polling
//! - [`usage`]   — usage reports as one SQL aggregate over the shipped debits
//! - [`alert_books`] — alert rules and their firings, shared by every replica
//!
//! # Zero overdraft without a round trip per request
//!
//! A replica spends only credit it has leased. A lease is drawn in one
//! statement (`cg_draw_lease`) that locks the wallet's row and grants at most
//! `balance - leased`, so the open leases of all replicas together never
//! exceed the balance. Holds and settles run in memory against the lease;
//! a hold that no lease covers waits for one draw and is refused (402) when
//! the database says the credit is not there. Debits are shipped in batches
//! (`cg_ship_debits`), unique by (replica, entry), so a retry or a restart
//! never debits twice; each is charged to its lease while the lease is open.
//!
//! Lease size follows the wallet's recent spend (about 4 s of it), is
//! capped by an even share of what is left among live replicas, and shrinks
//! to one hold near empty. Refills are drawn ahead of need, off the request
//! path, as soon as a hold leaves a wallet's leased credit below half a
//! lease. Near empty, a lease that cannot cover another hold goes back as
//! soon as its debits ship, and a refused draw waits briefly (up to 500 ms)
//! while the wallet's balance still covers the hold. It asks the others for
//! that credit once (`NOTIFY cg_wanted`, see [`Wakeups`]): each gives back
//! its idle leases on the wallet at once and its busy ones when their holds
//! settle. So the last cents are shared instead of being refused on one
//! replica while parked on another.
//!
//! # Expiry and late shipping (the bound)
//!
//! A lease carries a database-time deadline and is renewed while its replica
//! lives. A replica stops starting holds on a lease `safety_ms` before the
//! deadline it last heard (measured on its own monotonic clock from the
//! database's `now()`, so clock skew does not matter). Once a lease is
//! `grace_ms` past its deadline, any replica's sweep (`cg_close_leases`)
//! returns its unspent part to the wallet.
//!
//! A debit that ships after its lease was closed (its replica was killed and
//! restarted on its data directory after the grace, or was cut off from the
//! database alone for longer than the grace: it settles what it served under
//! its leases until `safety_ms` before their deadline, and none of it ships)
//! is still posted, never dropped: the part no open lease covered is recorded
//! in `cg_debits.uncovered` and counted as the wallet's overrun. So the
//! overspend is zero while every replica ships within the grace, and is in
//! any case bounded by the leases the late replica held, and always visible.
//!
//! # Running it
//!
//! With a `[cluster]` section, `serve` makes the process a replica
//! ([`node`]): it migrates the schema, replays the log into its view,
//! opens its outbox in the data directory, and serves holds through
//! [`spend`] (its view's checks, limit headroom and credit under leases).
//! One replica at a time, the treasurer, holds the treasury (fenced by
//! epoch) and runs the ledger as the single node does, journaling its
//! records to [`log`] through [`LogJournal`] and posting every shipped
//! debit; the others follow its log, forward admin writes to it, and take
//! the treasury when it lapses or is given up. Lot expiry, Lite resets and
//! renewals are therefore applied once. A treasurer deposed without
//! stepping down exits for its supervisor to restart it: its ledger is
//! rebuilt from the log.
//!
//! Nobody polls the database: [`wakeups`] listens for the log growing,
//! debits shipped and a treasurer stepping down, with a slow timer (and the
//! old 50 ms poll while the listener is down) behind it.
//!
//! Expiring credit: the treasurer mirrors its ledger's live lots into
//! `cg_lots` (whole when it takes the treasury, then moved by every record
//! it appends, in the append's transaction). A draw leases only credit that
//! outlives [`LeaseSettings::horizon`] and ends the lease at the wallet's
//! next expiry; a renewal extends a lease only to that expiry, and only
//! while the wallet's lasting credit still covers all its leases. Debits
//! shipped but not posted only make the mirrored remainders too large, so
//! the bound errs toward refusing, never toward spending expired credit.
//!
//! Not yet: debits partitioned by month for retention (issue 19).
pub mod alert_books;
pub mod books;
pub mod db;
pub mod journal;
pub mod leases;
pub mod log;
pub mod migrate;
pub mod name_lock;
pub mod node;
pub mod refusal_books;
pub mod replica;
pub mod spend;
pub mod usage;
pub mod wakeups;

pub use alert_books::DeliveryRow;
pub use books::{
    empty_detail, Books, FundingReceipt, LeaseGrant, PostingBacklog, Renewal, ReplicaStatus, ShippedDebit,
    WalletAudit,
};
pub use db::Database;
pub use journal::LogJournal;
pub use leases::{LeaseBook, LeaseHold, LeaseRefusal, LeaseSettings, Unshipped};
pub use node::{ClusterNode, NodeOptions};
pub use replica::{DebitDetail, Replica, ReplicaSettings};
pub use spend::ClusterHold;
pub use wakeups::Wakeups;

/// What can go wrong talking to the cluster's database.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The URL or settings are unusable.
    #[error("cluster config: {0}")]
    Config(String),
    /// No connection could be had (database down, pool exhausted).
    #[error("cluster database unavailable: {0}")]
    Unavailable(String),
    /// A statement failed.
    #[error("cluster database: {}", describe(.0))]
    Statement(#[from] tokio_postgres::Error),
    /// The database's schema is not one this binary knows, or what it holds
    /// cannot be read.
    #[error("cluster schema: {0}")]
    Schema(String),
    /// This replica's treasury epoch is over: another replica is treasurer.
    #[error("treasury epoch {0} is over: another replica is the treasurer")]
    Fenced(i64),
}

/// The server's message and code when there is one: tokio-postgres's own
/// `Display` says only "db error".
fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => err.to_string(),
    }
}
