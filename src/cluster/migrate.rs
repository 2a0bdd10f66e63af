//! Embedded, versioned schema migrations, applied at start-up.
//!
//! Replicas starting together race to migrate; an advisory lock, held by a
//! session of its own, makes one of them apply each missing version, in
//! order, and the rest find it done.
//! A database whose schema is newer than this binary knows is refused rather
//! than written with old assumptions.
//!
//! Most versions are applied together in one transaction. A version that
//! builds or drops an index on a table the running replicas write
//! (`concurrently`) is applied on its own, outside a transaction, with
//! `CREATE INDEX CONCURRENTLY` or `DROP INDEX CONCURRENTLY`: a plain build
//! would stop those writes (draws, renewals, shipments) for as long as it
//! took on large books, past the leases' TTL.

use super::{ClusterError, Database};

/// One schema version.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
    /// Its statements run one at a time outside a transaction (each
    /// `DROP INDEX CONCURRENTLY IF EXISTS` first, for an invalid index an
    /// interrupted build left).
    concurrently: bool,
}

/// A version applied in one transaction with the others.
const fn in_transaction(version: i32, name: &'static str, sql: &'static str) -> Migration {
    Migration { version, name, sql, concurrently: false }
}

/// A version that builds or drops indexes concurrently, on its own (see
/// the module doc).
const fn built_concurrently(version: i32, name: &'static str, sql: &'static str) -> Migration {
    Migration { version, name, sql, concurrently: true }
}

const MIGRATIONS: &[Migration] = &[
    in_transaction(1, "leases", include_str!("migrations/0001_leases.sql")),
    in_transaction(2, "log", include_str!("migrations/0002_log.sql")),
    in_transaction(3, "treasury", include_str!("migrations/0003_treasury.sql")),
    in_transaction(4, "posting", include_str!("migrations/0004_posting.sql")),
    in_transaction(5, "admin", include_str!("migrations/0005_admin.sql")),
    in_transaction(6, "limits", include_str!("migrations/0006_limits.sql")),
    in_transaction(7, "notify", include_str!("migrations/0007_notify.sql")),
    in_transaction(8, "reports", include_str!("migrations/0008_reports.sql")),
    in_transaction(9, "lot_expiry", include_str!("migrations/0009_lot_expiry.sql")),
    in_transaction(10, "treasury_renewal", include_str!("migrations/0010_treasury_renewal.sql")),
    in_transaction(11, "append_lookup", include_str!("migrations/0011_append_lookup.sql")),
    in_transaction(12, "posting_lookup", include_str!("migrations/0012_posting_lookup.sql")),
    in_transaction(13, "unposted_queue", include_str!("migrations/0013_unposted_queue.sql")),
    in_transaction(14, "alerts", include_str!("migrations/0014_alerts.sql")),
    in_transaction(15, "price_versions", include_str!("migrations/0015_price_versions.sql")),
    in_transaction(16, "refusals", include_str!("migrations/0016_refusals.sql")),
    in_transaction(17, "renew_known_leases", include_str!("migrations/0017_renew_known_leases.sql")),
    in_transaction(18, "limit_versions", include_str!("migrations/0018_limit_versions.sql")),
    in_transaction(
        19,
        "sweep_rechecks_deadline",
        include_str!("migrations/0019_sweep_rechecks_deadline.sql"),
    ),
    in_transaction(
        20,
        "debits_outlive_lost_leases",
        include_str!("migrations/0020_debits_outlive_lost_leases.sql"),
    ),
    in_transaction(21, "retire_unbounded_draw", include_str!("migrations/0021_retire_unbounded_draw.sql")),
    built_concurrently(22, "wallet_indexes", include_str!("migrations/0022_wallet_indexes.sql")),
    built_concurrently(
        23,
        "debits_one_index_fewer",
        include_str!("migrations/0023_debits_one_index_fewer.sql"),
    ),
    in_transaction(24, "keyed_duplicate_checks", include_str!("migrations/0024_keyed_duplicate_checks.sql")),
    in_transaction(
        25,
        "one_duplicate_check_per_append",
        include_str!("migrations/0025_one_duplicate_check_per_append.sql"),
    ),
    in_transaction(
        26,
        "debits_numbered_for_posting",
        include_str!("migrations/0026_debits_numbered_for_posting.sql"),
    ),
    built_concurrently(27, "posting_order_index", include_str!("migrations/0027_posting_order_index.sql")),
    in_transaction(28, "posting_by_number", include_str!("migrations/0028_posting_by_number.sql")),
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
    let (mut client, mut connection) = db.connect().await?;
    let driving = tokio::spawn(async move {
        while let Some(Ok(_)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {}
    });
    let result = migrate_on(&mut client, target).await;
    // Ending the session releases the migration lock whatever happened.
    drop(client);
    let _ = driving.await;
    result
}

/// How often a replica asks again for the migration lock another holds.
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(100);

async fn migrate_on(client: &mut tokio_postgres::Client, target: i32) -> Result<usize, ClusterError> {
    // A migration may rewrite a large table and wait for older replicas'
    // sessions however long that takes: no limits on this session.
    client
        .batch_execute(
            "SET lock_timeout = 0; SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0",
        )
        .await?;
    // Asked for again and again, not waited on: a session that waits for a
    // lock holds a snapshot, and an index built concurrently waits for
    // every older snapshot, so a replica waiting on the one that builds
    // would deadlock with it.
    while !client.query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK]).await?.get::<_, bool>(0) {
        tokio::time::sleep(LOCK_POLL).await;
    }
    let mut applied = 0;
    loop {
        let (done, next) = apply_in_one_transaction(client, target).await?;
        applied += done;
        let Some(migration) = next else { return Ok(applied) };
        apply_concurrently(client, migration).await?;
        applied += 1;
    }
}

/// Applies the missing versions up to `target` in one transaction, up to
/// the first that must run outside one (returned, not applied).
async fn apply_in_one_transaction(
    client: &mut tokio_postgres::Client,
    target: i32,
) -> Result<(usize, Option<&'static Migration>), ClusterError> {
    let tx = client.transaction().await?;
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
    let mut outside = None;
    let wanted = |migration: &&Migration| migration.version > current && migration.version <= target;
    for migration in MIGRATIONS.iter().filter(wanted) {
        if migration.concurrently {
            outside = Some(migration);
            break;
        }
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
    Ok((applied, outside))
}

/// Applies `migration` statement by statement outside a transaction (the
/// migration lock is the session's). An index an interrupted build left
/// invalid is dropped first; one it finished is kept (its statements say
/// `IF NOT EXISTS`), so a start cut short and tried again does not build
/// it twice.
async fn apply_concurrently(
    client: &tokio_postgres::Client,
    migration: &Migration,
) -> Result<(), ClusterError> {
    let invalid = client
        .query(
            "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE NOT i.indisvalid AND c.relnamespace = current_schema()::regnamespace
               AND starts_with(c.relname::text, 'cg_')",
            &[],
        )
        .await?;
    for row in invalid {
        let name: String = row.get(0);
        // Only names of ours: written into the statement, not bound.
        if name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            client.batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}")).await?;
        }
    }
    for statement in statements(migration.sql) {
        client.batch_execute(statement).await.map_err(|err| {
            ClusterError::Schema(format!("migration {} ({}): {err}", migration.version, migration.name))
        })?;
    }
    client
        .execute(
            "INSERT INTO cg_schema (version, name) VALUES ($1, $2)",
            &[&migration.version, &migration.name],
        )
        .await?;
    Ok(())
}

/// The statements of a migration's text, split at `;` (the text of a
/// migration run this way holds no `;` inside a statement, comments
/// included); a piece with nothing but comments is skipped.
fn statements(sql: &str) -> impl Iterator<Item = &str> {
    sql.split(';').map(str::trim).filter(|statement| {
        statement.lines().any(|line| !line.trim().is_empty() && !line.trim_start().starts_with("--"))
    })
}

#[cfg(test)]
mod tests {
    use super::{statements, MIGRATIONS};

    #[test]
    fn a_migration_run_outside_a_transaction_splits_into_whole_statements() {
        // Split at `;`: such a migration may hold no function body, quoted
        // text or comment with a `;` in it, and each piece is one statement.
        for migration in MIGRATIONS.iter().filter(|migration| migration.concurrently) {
            let pieces: Vec<&str> = statements(migration.sql).collect();
            assert!(!pieces.is_empty(), "migration {} has no statement", migration.version);
            for piece in pieces {
                let code: String =
                    piece.lines().filter(|line| !line.trim_start().starts_with("--")).collect();
                assert!(!code.contains("$$") && !code.contains('\'') && !code.contains('"'), "{piece}");
                let code = code.trim_start();
                assert!(
                    code.starts_with("CREATE INDEX CONCURRENTLY IF NOT EXISTS")
                        || code.starts_with("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS")
                        || code.starts_with("DROP INDEX CONCURRENTLY IF EXISTS"),
                    "{piece}"
                );
            }
        }
        assert_eq!(statements("-- only a comment;\n SELECT 1; ;").collect::<Vec<_>>(), ["SELECT 1"]);
    }
}
