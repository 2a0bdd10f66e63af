//! Alert rules and their firings in the shared books (migration 14), so a
//! rule added through any replica is in force on all of them and a
//! threshold fires once for the cluster. The rules themselves, their
//! conditions and the webhook delivery are `crate::alerts`'s; this is only
//! where they are kept.

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::types::Json;

use super::{Books, ClusterError};

/// Deliveries one org's listing reads at most (the newest).
const DELIVERIES_SHOWN: i64 = 10_000;

/// A firing as the books keep it.
#[derive(Clone, Debug)]
pub struct DeliveryRow {
    /// Its id (the delivery's number in its event).
    pub id: i64,
    /// The rule that fired.
    pub rule: i64,
    /// The rule's organization.
    pub org: i64,
    /// The event sent (`None` until the firing replica built it).
    pub event: Option<Value>,
    /// pending, delivered or failed.
    pub status: String,
    /// Attempts made so far.
    pub attempts: i32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When it fired.
    pub created_at: DateTime<Utc>,
}

impl Books {
    /// The rules of `org`, or every org's, oldest first, as `(id, body)`.
    pub async fn alert_rules(&self, org: Option<i64>) -> Result<Vec<(i64, Value)>, ClusterError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, body FROM cg_alert_rules WHERE $1::bigint IS NULL OR org = $1 ORDER BY id",
                &[&org],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let Json(body) = row.try_get::<_, Json<Value>>(1)?;
                Ok((row.try_get(0)?, body))
            })
            .collect()
    }

    /// Adds a rule for `org` unless it keeps `max_rules` already; returns
    /// its id, or `None` at the cap. Every replica is told to reload.
    pub async fn add_alert_rule(
        &self,
        org: i64,
        body: &Value,
        max_rules: i32,
    ) -> Result<Option<i64>, ClusterError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT cg_add_alert_rule($1, $2, $3)", &[&org, &Json(body), &max_rules])
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Claims the firing of `rule` in `period` for `replica`, keeping
    /// `event` with the delivery's number set in it: the delivery's id and
    /// event if this call took it, `None` if some replica had fired it.
    pub async fn claim_alert(
        &self,
        rule: i64,
        org: i64,
        period: &str,
        replica: &str,
        event: &Value,
    ) -> Result<Option<(i64, Value)>, ClusterError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "WITH next AS (SELECT nextval(pg_get_serial_sequence('cg_alert_deliveries', 'id')) AS id)
                 INSERT INTO cg_alert_deliveries (id, rule, org, period, replica, event)
                 SELECT next.id, $1, $2, $3, $4, jsonb_set($5::jsonb, '{delivery}', to_jsonb(next.id))
                 FROM next
                 ON CONFLICT (rule, period) DO NOTHING RETURNING id, event",
                &[&rule, &org, &period, &replica, &Json(event)],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let Json(event) = row.try_get::<_, Json<Value>>(1)?;
        Ok(Some((row.try_get(0)?, event)))
    }

    /// Takes over, for `replica`, the pending deliveries nobody marked for
    /// `abandoned` (their replica stopped or lost its claim's answer): each
    /// as (id, event, rule id, rule body).
    pub async fn take_abandoned_alerts(
        &self,
        replica: &str,
        abandoned: std::time::Duration,
    ) -> Result<Vec<(i64, Value, i64, Value)>, ClusterError> {
        let client = self.client().await?;
        let seconds = abandoned.as_secs_f64();
        let rows = client
            .query(
                "UPDATE cg_alert_deliveries d SET replica = $1, updated_at = now()
                 FROM cg_alert_rules r
                 WHERE r.id = d.rule AND d.id IN (
                     SELECT id FROM cg_alert_deliveries
                     WHERE status = 'pending' AND event IS NOT NULL
                       AND updated_at < now() - make_interval(secs => $2)
                     ORDER BY id LIMIT 20 FOR UPDATE SKIP LOCKED)
                 RETURNING d.id, d.event, r.id, r.body",
                &[&replica, &seconds],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let (Json(event), Json(body)) =
                    (row.try_get::<_, Json<Value>>(1)?, row.try_get::<_, Json<Value>>(3)?);
                Ok((row.try_get(0)?, event, row.try_get(2)?, body))
            })
            .collect()
    }

    /// Records a delivery attempt's outcome.
    pub async fn update_alert_delivery(
        &self,
        id: i64,
        status: &str,
        attempts: i32,
        last_error: Option<&str>,
    ) -> Result<(), ClusterError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE cg_alert_deliveries
                 SET status = $2, attempts = $3, last_error = $4, updated_at = now()
                 WHERE id = $1",
                &[&id, &status, &attempts, &last_error],
            )
            .await?;
        Ok(())
    }

    /// Forgets deliveries finished (delivered or failed) longer than `kept`
    /// ago whose period can never come round again: an over-hold (one
    /// request's), a per-request cap's day, a spending limit's period once
    /// it has reset. A row is what keeps its (rule, period) from firing
    /// twice, so a threshold's (`granted:…`, one per credit to the wallet,
    /// and a lifetime credit can recur after a negative adjustment) and a
    /// limit period still running are kept. Returns how many went.
    pub async fn forget_old_alert_deliveries(&self, kept: std::time::Duration) -> Result<u64, ClusterError> {
        let client = self.client().await?;
        let forgotten = client
            .execute(
                "DELETE FROM cg_alert_deliveries d
                 WHERE d.status <> 'pending'
                   AND d.updated_at < now() - make_interval(secs => $1)
                   AND d.period NOT LIKE 'granted:%'
                   -- A limit period is named by when it resets (RFC 3339).
                   AND CASE WHEN d.period ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}T'
                            THEN d.period::timestamptz < now()
                            ELSE true END",
                &[&kept.as_secs_f64()],
            )
            .await?;
        Ok(forgotten)
    }

    /// `org`'s deliveries, oldest first: the newest [`DELIVERIES_SHOWN`].
    pub async fn alert_deliveries_of(&self, org: i64) -> Result<Vec<DeliveryRow>, ClusterError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT * FROM (
                     SELECT id, rule, org, event, status, attempts, last_error, created_at
                     FROM cg_alert_deliveries WHERE org = $1 ORDER BY id DESC LIMIT $2) newest
                 ORDER BY id",
                &[&org, &DELIVERIES_SHOWN],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(DeliveryRow {
                    id: row.try_get(0)?,
                    rule: row.try_get(1)?,
                    org: row.try_get(2)?,
                    event: row.try_get::<_, Option<Json<Value>>>(3)?.map(|Json(event)| event),
                    status: row.try_get(4)?,
                    attempts: row.try_get(5)?,
                    last_error: row.try_get(6)?,
                    created_at: row.try_get(7)?,
                })
            })
            .collect()
    }
}
