//! The global record log: one order for every replica's commands.
//!
//! This is the spine of entity and admin replication (see the module doc of
//! [`crate::cluster`]): a replica appends what it originates, in batches,
//! idempotently by its own numbering, and tails everyone's records by their
//! global number. Bodies are opaque bytes here; what they mean is the
//! ledger's business.

use chrono::{DateTime, Utc};

use super::books::{retrying, Books};
use super::ClusterError;

/// A record read back from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    /// Its place in the global order (1, 2, 3, ... without gaps).
    pub gseq: i64,
    /// The replica that appended it.
    pub replica: String,
    /// That replica's own number for it.
    pub origin: i64,
    /// When it was appended (database time).
    pub at: DateTime<Utc>,
    /// The record.
    pub body: Vec<u8>,
}

impl Books {
    /// Appends `records` (origin number, body) for `replica`; returns the
    /// global number of each, in global order. Appending the same origins
    /// again returns the same numbers and adds nothing.
    pub async fn append(
        &self,
        replica: &str,
        records: &[(i64, Vec<u8>)],
    ) -> Result<Vec<(i64, i64)>, ClusterError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let origins: Vec<i64> = records.iter().map(|(origin, _)| *origin).collect();
        let bodies: Vec<&[u8]> = records.iter().map(|(_, body)| body.as_slice()).collect();
        retrying(|| async {
            let client = self.client().await?;
            let statement = client.prepare_cached("SELECT origin, gseq FROM cg_append($1, $2, $3)").await?;
            let rows = client.query(&statement, &[&replica, &origins, &bodies]).await?;
            Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
        })
        .await
    }

    /// Up to `limit` records after global number `after`, in order.
    pub async fn tail(&self, after: i64, limit: i64) -> Result<Vec<LogRecord>, ClusterError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT gseq, replica, origin, at, body FROM cg_log WHERE gseq > $1 ORDER BY gseq LIMIT $2",
            )
            .await?;
        let rows = client.query(&statement, &[&after, &limit]).await?;
        Ok(rows
            .iter()
            .map(|row| LogRecord {
                gseq: row.get(0),
                replica: row.get(1),
                origin: row.get(2),
                at: row.get(3),
                body: row.get(4),
            })
            .collect())
    }
}
