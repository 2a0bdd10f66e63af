//! Usage reports in cluster mode: one SQL aggregate over the shipped debits.
//!
//! A single node folds its ledger entries through in-memory rollups; in a
//! cluster the debits are already rows of `cg_debits`, so the database groups
//! and sums them. The query reads an organization's wallets (`cg_wallets.org`)
//! and, per wallet, the debits in the time range through the partial index
//! `cg_debits_usage` (migration 8): limit counters (`limit:%` rows, which are
//! not usage) and debits the treasurer refused to post are not in it.
//!
//! Because the report reads PostgreSQL, it includes debits shipped but not yet
//! posted to the treasurer's ledger: a report is as fresh as the last
//! shipment, ahead of the ledger by up to one posting round.
//!
//! The query returns the raw columns a report groups by (the key, not its
//! owner: the shipped body does not carry the owner, the replica's ledger
//! does); the admin API maps them to its dimensions.

use chrono::{DateTime, TimeDelta, Utc};

use super::{Books, ClusterError};
use crate::admin::UsageTotals as Totals;

/// What to aggregate: an organization's debits in `[from, to)`, grouped by
/// the columns whose flag is set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageQuery {
    pub org: u64,
    /// IANA name of the zone days and months are counted in.
    pub time_zone: String,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub by_key: bool,
    pub by_end_user: bool,
    /// Model (or tool) name, and whether it is a tool.
    pub by_model: bool,
    pub by_route: bool,
    pub by_day: bool,
    pub by_month: bool,
    /// Rows past which the aggregate stops (0: all).
    pub max_rows: usize,
}

/// One group's columns (`None` when not grouped by, or absent) and totals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageGroup {
    pub key: Option<u64>,
    pub end_user: Option<String>,
    pub model: Option<String>,
    /// A tool call (units reported, or a `/tools/` route); false when not
    /// grouped by model.
    pub is_tool: bool,
    pub route: Option<String>,
    /// `YYYY-MM-DD` in the query's zone.
    pub day: Option<String>,
    /// `YYYY-MM` in the query's zone.
    pub month: Option<String>,
    /// The same totals a single node's rollup keeps (the operator's cost is
    /// the debit where none was recorded).
    pub totals: Totals,
}

/// The aggregate. `$1` org, `$2`/`$3` the range (NULL: open), `$4` the zone,
/// `$5..$10` the grouping flags, `$11` the most rows (NULL: all). Written so the wallet and range conditions
/// match `cg_debits_usage`'s predicate and columns.
pub const USAGE_SQL: &str = "
    SELECT CASE WHEN $5 THEN d.body->>'key' END,
           CASE WHEN $6 THEN d.body->>'end_user' END,
           CASE WHEN $7 THEN d.body->'details'->>'model' END,
           CASE WHEN $7 THEN COALESCE((d.body->'details'->'usage'->>'tool_units')::numeric > 0, false)
                          OR strpos(d.body->'details'->>'route', '/tools/') > 0
                ELSE false END,
           CASE WHEN $8 THEN d.body->'details'->>'route' END,
           CASE WHEN $9 THEN to_char(d.at AT TIME ZONE $4::text, 'YYYY-MM-DD') END,
           CASE WHEN $10 THEN to_char(d.at AT TIME ZONE $4::text, 'YYYY-MM') END,
           count(*),
           sum(d.amount),
           sum(COALESCE((d.body->'details'->>'operator_cost')::numeric, d.amount)),
           COALESCE(sum((d.body->'details'->'usage'->>'input_tokens')::numeric), 0)::text,
           COALESCE(sum((d.body->'details'->'usage'->>'cached_input_tokens')::numeric), 0)::text,
           COALESCE(sum((d.body->'details'->'usage'->>'output_tokens')::numeric), 0)::text,
           COALESCE(sum((d.body->'details'->'usage'->>'tool_units')::numeric), 0)::text
    FROM cg_wallets w
    JOIN cg_debits d ON d.wallet = w.wallet
    WHERE w.org = $1 AND w.wallet NOT LIKE 'limit:%'
      AND d.wallet NOT LIKE 'limit:%' AND d.post_error IS NULL
      AND d.at >= COALESCE($2::timestamptz, '-infinity') AND d.at < COALESCE($3::timestamptz, 'infinity')
    GROUP BY 1, 2, 3, 4, 5, 6, 7
    LIMIT $11";

impl Books {
    /// The usage groups of `query`, in no particular order.
    pub async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageGroup>, ClusterError> {
        let org = i64::try_from(query.org)
            .map_err(|_| ClusterError::Schema(format!("organization {} is out of range", query.org)))?;
        // The column keeps microseconds: `at >= from` over microseconds is
        // `at >= from rounded up`, for either end, so a bound with
        // nanoseconds selects exactly what the ledger's comparison would.
        let (from, to) = (query.from.map(up_to_micros), query.to.map(up_to_micros));
        let max_rows = (query.max_rows > 0).then(|| i64::try_from(query.max_rows).unwrap_or(i64::MAX));
        let mut client = self.client().await?;
        let statement = client.prepare_cached(USAGE_SQL).await?;
        // An organization's whole history may take longer than the pool's
        // backstop for one statement; ten minutes still bounds a runaway.
        let tx = client.transaction().await?;
        tx.batch_execute("SET LOCAL statement_timeout = '10min'").await?;
        let rows = tx
            .query(
                &statement,
                &[
                    &org,
                    &from,
                    &to,
                    &query.time_zone,
                    &query.by_key,
                    &query.by_end_user,
                    &query.by_model,
                    &query.by_route,
                    &query.by_day,
                    &query.by_month,
                    &max_rows,
                ],
            )
            .await?;
        tx.commit().await?;
        rows.iter().map(group).collect()
    }
}

fn group(row: &tokio_postgres::Row) -> Result<UsageGroup, ClusterError> {
    let whole = |index: usize| -> Result<u64, ClusterError> {
        let text: String = row.try_get(index)?;
        text.parse().map_err(|_| ClusterError::Schema(format!("a usage total is not a whole number: {text}")))
    };
    let key = row
        .try_get::<_, Option<String>>(0)?
        .map(|key| {
            key.parse().map_err(|_| ClusterError::Schema(format!("a debit's key is not an id: {key}")))
        })
        .transpose()?;
    let requests: i64 = row.try_get(7)?;
    Ok(UsageGroup {
        key,
        end_user: row.try_get(1)?,
        model: row.try_get(2)?,
        is_tool: row.try_get(3)?,
        route: row.try_get(4)?,
        day: row.try_get(5)?,
        month: row.try_get(6)?,
        totals: Totals {
            requests: u64::try_from(requests).unwrap_or(0),
            charged: row.try_get(8)?,
            operator_cost: row.try_get(9)?,
            input_tokens: whole(10)?,
            cached_input_tokens: whole(11)?,
            output_tokens: whole(12)?,
            tool_units: whole(13)?,
        },
    })
}

/// `at` rounded up to a whole microsecond.
fn up_to_micros(at: DateTime<Utc>) -> DateTime<Utc> {
    let below = i64::from(at.timestamp_subsec_nanos() % 1_000);
    if below == 0 {
        at
    } else {
        at.checked_add_signed(TimeDelta::nanoseconds(1_000 - below)).unwrap_or(at)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn bounds_round_up_to_the_columns_microseconds() {
        let at = |text: &str| text.parse::<DateTime<Utc>>().unwrap();
        assert_eq!(up_to_micros(at("2026-01-01T00:00:00.000001Z")), at("2026-01-01T00:00:00.000001Z"));
        assert_eq!(up_to_micros(at("2026-01-01T00:00:00.0000001Z")), at("2026-01-01T00:00:00.000001Z"));
        assert_eq!(up_to_micros(at("2026-01-01T00:00:00.5Z")), at("2026-01-01T00:00:00.5Z"));
    }
}
