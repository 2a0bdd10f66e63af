//! Embedded, versioned schema migrations, applied at start-up.
//!
//! Replicas starting together race to migrate; a transaction-scoped advisory
//! lock makes one of them apply each missing version, in order, and the rest
//! find it done. A database whose schema is newer than this binary knows is
//! refused rather than written with old assumptions.

use super::{ClusterError, Database};

/// One schema version.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "leases", sql: include_str!("migrations/0001_leases.sql") },
    Migration { version: 2, name: "log", sql: include_str!("migrations/0002_log.sql") },
    Migration { version: 3, name: "treasury", sql: include_str!("migrations/0003_treasury.sql") },
    Migration { version: 4, name: "posting", sql: include_str!("migrations/0004_posting.sql") },
    Migration { version: 5, name: "admin", sql: include_str!("migrations/0005_admin.sql") },
    Migration { version: 6, name: "limits", sql: include_str!("migrations/0006_limits.sql") },
    Migration { version: 7, name: "notify", sql: include_str!("migrations/0007_notify.sql") },
    Migration { version: 8, name: "reports", sql: include_str!("migrations/0008_reports.sql") },
    Migration { version: 9, name: "lot_expiry", sql: include_str!("migrations/0009_lot_expiry.sql") },
    Migration {
        version: 10,
        name: "treasury_renewal",
        sql: include_str!("migrations/0010_treasury_renewal.sql"),
    },
    Migration { version: 11, name: "append_lookup", sql: include_str!("migrations/0011_append_lookup.sql") },
    Migration {
        version: 12,
        name: "posting_lookup",
        sql: include_str!("migrations/0012_posting_lookup.sql"),
    },
    Migration {
        version: 13,
        name: "unposted_queue",
        sql: include_str!("migrations/0013_unposted_queue.sql"),
    },
    Migration { version: 14, name: "alerts", sql: include_str!("migrations/0014_alerts.sql") },
    Migration {
        version: 15,
        name: "price_versions",
        sql: include_str!("migrations/0015_price_versions.sql"),
    },
    Migration { version: 16, name: "refusals", sql: include_str!("migrations/0016_refusals.sql") },
    Migration {
        version: 17,
        name: "renew_known_leases",
        sql: include_str!("migrations/0017_renew_known_leases.sql"),
    },
    Migration {
        version: 18,
        name: "limit_versions",
        sql: include_str!("migrations/0018_limit_versions.sql"),
    },
    Migration {
        version: 19,
        name: "sweep_rechecks_deadline",
        sql: include_str!("migrations/0019_sweep_rechecks_deadline.sql"),
    },
    Migration {
        version: 20,
        name: "debits_outlive_lost_leases",
        sql: include_str!("migrations/0020_debits_outlive_lost_leases.sql"),
    },
    Migration {
        version: 21,
        name: "retire_unbounded_draw",
        sql: include_str!("migrations/0021_retire_unbounded_draw.sql"),
    },
    Migration {
        version: 22,
        name: "wallet_indexes",
        sql: include_str!("migrations/0022_wallet_indexes.sql"),
    },
];

/// The advisory lock key migrations take ("cgmigrat" in ASCII).
const MIGRATION_LOCK: i64 = 0x6367_6d69_6772_6174;

/// The newest schema version this binary knows.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |migration| migration.version)
}

/// Brings the schema to [`latest_version`]; returns how many versions this
/// call applied.
pub async fn migrate(db: &Database) -> Result<usize, ClusterError> {
    migrate_to(db, latest_version()).await
}

/// Brings the schema to `target` (at most [`latest_version`]): an older
/// schema, for tests of what a later version does to books it finds.
pub async fn migrate_to(db: &Database, target: i32) -> Result<usize, ClusterError> {
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    // A migration may rewrite a large table and wait for sessions of older
    // replicas: the pool's session limits do not apply to it.
    tx.batch_execute("SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0").await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS cg_schema (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let current: i32 = tx.query_one("SELECT COALESCE(max(version), 0) FROM cg_schema", &[]).await?.get(0);
    if current > latest_version() {
        return Err(ClusterError::Schema(format!(
            "the database is at schema version {current}, newer than this binary's {}; upgrade the binary",
            latest_version()
        )));
    }
    let mut applied = 0;
    let wanted = |migration: &&Migration| migration.version > current && migration.version <= target;
    for migration in MIGRATIONS.iter().filter(wanted) {
        tx.batch_execute(migration.sql).await.map_err(|err| {
            ClusterError::Schema(format!("migration {} ({}): {err}", migration.version, migration.name))
        })?;
        tx.execute(
            "INSERT INTO cg_schema (version, name) VALUES ($1, $2)",
            &[&migration.version, &migration.name],
        )
        .await?;
        applied += 1;
    }
    tx.commit().await?;
    Ok(applied)
}
