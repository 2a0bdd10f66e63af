//! The recent 402s of an org's summary in the shared books (migration 16),
//! so the summary on any replica counts every replica's refusals. What a
//! refusal is and how the summary shows it are `crate::alerts::refusals`'s;
//! this is only where the counts are kept.

use chrono::{DateTime, TimeDelta, Utc};

use super::{Books, ClusterError};

/// How long counts are kept: the summary's totals run from at most this
/// long ago.
pub const REFUSALS_KEPT: TimeDelta = TimeDelta::days(31);

/// One wallet's refusals for one reason in one minute (added), or over the
/// whole kept window (read back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusalRow {
    pub wallet: String,
    pub reason: String,
    pub minute: DateTime<Utc>,
    pub count: i64,
    pub last_at: DateTime<Utc>,
}

/// A wallet's refusals for one reason as the summary reads them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusalTotal {
    pub wallet: String,
    pub reason: String,
    /// Since [`RefusalTotals::since`].
    pub total: i64,
    /// In the day before `now`, to the minute.
    pub last_day: i64,
    pub last_at: DateTime<Utc>,
}

/// What the summary shows: counts since `since`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusalTotals {
    /// When counting began: when the books started counting, or the start
    /// of the kept window if that is later.
    pub since: DateTime<Utc>,
    pub totals: Vec<RefusalTotal>,
}

impl Books {
    /// Adds `rows` to the counts (one statement), and forgets counts older
    /// than [`REFUSALS_KEPT`]. Rows are written in key order, so replicas
    /// adding to the same rows at once wait for each other instead of
    /// deadlocking. An error whose statement did commit (the answer was
    /// lost) makes the caller add its rows again: counts may then run high,
    /// never low.
    pub async fn add_refusals(&self, rows: &[RefusalRow]) -> Result<(), ClusterError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut rows: Vec<&RefusalRow> = rows.iter().collect();
        rows.sort_by(|a, b| (&a.wallet, &a.reason, a.minute).cmp(&(&b.wallet, &b.reason, b.minute)));
        let wallets: Vec<&str> = rows.iter().map(|row| row.wallet.as_str()).collect();
        let reasons: Vec<&str> = rows.iter().map(|row| row.reason.as_str()).collect();
        let minutes: Vec<DateTime<Utc>> = rows.iter().map(|row| row.minute).collect();
        let counts: Vec<i64> = rows.iter().map(|row| row.count).collect();
        let last: Vec<DateTime<Utc>> = rows.iter().map(|row| row.last_at).collect();
        let kept = REFUSALS_KEPT.num_seconds();
        let client = self.client().await?;
        client
            .execute(
                "WITH added AS (
                     INSERT INTO cg_refusals AS r (wallet, reason, minute, count, last_at)
                     SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[], $5::timestamptz[])
                     ORDER BY 1, 2, 3
                     ON CONFLICT (wallet, reason, minute) DO UPDATE
                         SET count = r.count + EXCLUDED.count, last_at = GREATEST(r.last_at, EXCLUDED.last_at)
                     RETURNING 1)
                 DELETE FROM cg_refusals WHERE minute < now() - make_interval(secs => $6::bigint)",
                &[&wallets, &reasons, &minutes, &counts, &last, &kept],
            )
            .await?;
        Ok(())
    }

    /// The counts of `wallets` as of `now`, by wallet and reason.
    pub async fn refusal_totals(
        &self,
        wallets: &[String],
        now: DateTime<Utc>,
    ) -> Result<RefusalTotals, ClusterError> {
        let kept = REFUSALS_KEPT.num_seconds();
        let client = self.client().await?;
        let rows = client
            .query(
                "WITH kept AS (
                     SELECT GREATEST(applied_at, now() - make_interval(secs => $3::bigint)) AS since
                     FROM cg_schema WHERE version = 16)
                 SELECT kept.since, t.wallet, t.reason, t.total, t.last_day, t.last_at
                 FROM kept LEFT JOIN LATERAL (
                     SELECT wallet, reason, sum(count)::bigint AS total,
                            COALESCE(sum(count) FILTER (WHERE minute > $2::timestamptz - interval '1 day'), 0)::bigint
                                AS last_day,
                            max(last_at) AS last_at
                     FROM cg_refusals
                     WHERE wallet = ANY($1) AND minute >= kept.since - interval '1 minute'
                     GROUP BY wallet, reason) t ON true
                 ORDER BY t.wallet, t.reason",
                &[&wallets, &now, &kept],
            )
            .await?;
        let since = match rows.first() {
            Some(row) => row.try_get(0)?,
            None => return Err(ClusterError::Schema("the books do not record schema version 16".into())),
        };
        let mut totals = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(wallet) = row.try_get::<_, Option<String>>(1)? else { continue };
            totals.push(RefusalTotal {
                wallet,
                reason: row.try_get(2)?,
                total: row.try_get(3)?,
                last_day: row.try_get(4)?,
                last_at: row.try_get(5)?,
            });
        }
        Ok(RefusalTotals { since, totals })
    }
}
