//! Alerts in cluster mode: rules, firings and deliveries kept in the shared
//! books (`crate::cluster::alert_books`, migration 14).
//!
//! - A rule added through any replica is saved there before the answer and
//!   is in force on that replica at once; the others reload their rules
//!   when the database tells them (`NOTIFY cg_alerts`), and on a slow timer
//!   in case a notification was missed.
//! - Every replica evaluates the rules on its own view of the books, which
//!   every replica's debits reach (see `crate::cluster::Replica::watch_wallets`),
//!   and on the refusals it answers itself.
//! - A firing is claimed by inserting `(rule, period)`: the replica whose
//!   insert takes the row delivers it; the others find it taken. So a
//!   threshold fires once for the cluster, and a restart does not fire it again.
//! - The firing's row holds its event from the claim on, and each attempt
//!   is written to it, so every replica's admin API lists every delivery,
//!   and a delivery its replica abandoned (it stopped, or lost the answer
//!   to its claim) is sent by another: webhooks arrive at least once.
//! - The recent 402s an org's summary shows are added to the books by each
//!   replica about once a second, so every replica's summary counts them all.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::refusals::{RefusalCount, RefusalReason};
use super::{AlertError, Alerts, Delivery, Rule, MAX_RULES_PER_ORG};
use crate::cluster::refusal_books::RefusalRow;
use crate::cluster::{Books, ClusterError, Wakeups};
use crate::ledger::ids::{OrgId, WalletId};

/// How often a replica adds its refusals to the books (only when it has
/// some): how far behind the summary on another replica may be.
const REFUSALS_EVERY: Duration = Duration::from_secs(1);

/// How often rules are reloaded while notifications are heard (a missed
/// one is caught up within this), and while they are not.
const RELOAD_SLOW: Duration = Duration::from_secs(30);
const RELOAD_POLL: Duration = Duration::from_secs(1);

fn unreachable(error: ClusterError) -> AlertError {
    AlertError::Cluster(error.to_string())
}

/// The rules in rows whose body carries all but the id. A row this
/// version cannot read (a condition a newer replica wrote, during a rolling
/// upgrade) is left out and logged, so it stops neither the start nor the
/// other rules.
fn rules_from_rows(rows: Vec<(i64, Value)>) -> Vec<Rule> {
    rows.into_iter()
        .filter_map(|(id, mut body)| {
            if let Some(fields) = body.as_object_mut() {
                fields.insert("id".into(), Value::from(id));
            }
            serde_json::from_value(body)
                .map_err(|error| tracing::error!(rule = id, %error, "an alert rule in the books cannot be read; skipped"))
                .ok()
        })
        .collect()
}

pub(super) async fn read_rules(books: &Books) -> Result<Vec<Rule>, AlertError> {
    Ok(rules_from_rows(books.alert_rules(None).await.map_err(unreachable)?))
}

pub(super) async fn rules_of(books: &Books, org: OrgId) -> Result<Vec<Rule>, AlertError> {
    let org =
        i64::try_from(org.0).map_err(|_| AlertError::Cluster(format!("org {} is out of range", org.0)))?;
    Ok(rules_from_rows(books.alert_rules(Some(org)).await.map_err(unreachable)?))
}

/// Saves `rule` (its id ignored); returns the id the books gave it.
pub(super) async fn add_rule(books: &Books, rule: &Rule) -> Result<u64, AlertError> {
    let org = i64::try_from(rule.org.0).map_err(|_| AlertError::Cluster("org out of range".into()))?;
    let mut body = serde_json::to_value(rule).map_err(|e| AlertError::Cluster(e.to_string()))?;
    if let Some(fields) = body.as_object_mut() {
        fields.remove("id");
    }
    let max = i32::try_from(MAX_RULES_PER_ORG).unwrap_or(i32::MAX);
    match books.add_alert_rule(org, &body, max).await.map_err(unreachable)? {
        Some(id) => u64::try_from(id).map_err(|_| AlertError::Cluster(format!("rule id {id}"))),
        None => Err(AlertError::TooMany { max: MAX_RULES_PER_ORG }),
    }
}

pub(super) async fn deliveries_of(books: &Books, org: OrgId) -> Result<Vec<Delivery>, AlertError> {
    let org =
        i64::try_from(org.0).map_err(|_| AlertError::Cluster(format!("org {} is out of range", org.0)))?;
    let rows = books.alert_deliveries_of(org).await.map_err(unreachable)?;
    Ok(rows
        .into_iter()
        .map(|row| Delivery {
            id: u64::try_from(row.id).unwrap_or_default(),
            rule: u64::try_from(row.rule).unwrap_or_default(),
            org: OrgId(u64::try_from(row.org).unwrap_or_default()),
            event: row.event.unwrap_or(Value::Null),
            status: match row.status.as_str() {
                "delivered" => "delivered",
                "failed" => "failed",
                _ => "pending",
            },
            attempts: u32::try_from(row.attempts).unwrap_or_default(),
            last_error: row.last_error,
            created_at: row.created_at,
        })
        .collect())
}

/// Claims the firing of `rule` in `period` with its `event` (which gets
/// the delivery's number): the delivery's id and event if this replica took
/// it, `None` if it had fired already.
pub(super) async fn claim(
    books: &Books,
    rule: &Rule,
    period: &str,
    replica: &str,
    event: &Value,
) -> Result<Option<(u64, Value)>, AlertError> {
    let (Ok(id), Ok(org)) = (i64::try_from(rule.id), i64::try_from(rule.org.0)) else {
        return Err(AlertError::Cluster(format!("rule {} is out of range", rule.id)));
    };
    let claimed = books.claim_alert(id, org, period, replica, event).await.map_err(unreachable)?;
    Ok(claimed.map(|(id, event)| (u64::try_from(id).unwrap_or_default(), event)))
}

/// Writes a delivery attempt's outcome; a failure is logged.
pub(super) async fn update(books: &Books, id: u64, status: &str, attempts: u32, error: Option<&str>) {
    let (Ok(row), Ok(attempts)) = (i64::try_from(id), i32::try_from(attempts)) else { return };
    if let Err(failure) = books.update_alert_delivery(row, status, attempts, error).await {
        tracing::warn!(delivery = id, error = %failure, "cannot record an alert delivery's attempt in the books");
    }
}

/// A delivery left pending longer than this was dropped by the replica
/// that claimed it (it stopped, or lost the answer to its claim): another
/// replica sends it. Far longer than a delivery's attempts take (five
/// 5 s timeouts and their backoff), each of which marks the row.
const ABANDONED_AFTER: Duration = Duration::from_secs(60);
/// How often a replica looks for abandoned deliveries.
const RESUME_EVERY: Duration = Duration::from_secs(5);
/// How long finished deliveries are listed before those whose period can
/// never come round again are forgotten, and how often a replica does it.
const DELIVERIES_KEPT: Duration = Duration::from_secs(90 * 24 * 3600);
const FORGET_EVERY: Duration = Duration::from_secs(3600);

/// The recent 402s of `wallets`, every replica's, from the books.
pub(super) async fn refusal_counts(
    books: &Books,
    wallets: &[WalletId],
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, Vec<RefusalCount>), AlertError> {
    let names: Vec<String> = wallets.iter().map(ToString::to_string).collect();
    let read = books.refusal_totals(&names, now).await.map_err(unreachable)?;
    let counts = read
        .totals
        .into_iter()
        .filter_map(|total| {
            let wallet = *wallets.iter().zip(&names).find(|(_, name)| **name == total.wallet)?.0;
            Some(RefusalCount {
                wallet,
                reason: RefusalReason::from_code(&total.reason)?,
                total: u64::try_from(total.total).unwrap_or(0),
                last_day: u64::try_from(total.last_day).unwrap_or(0),
                last_day_capped: false,
                last_at: Some(total.last_at),
            })
        })
        .collect();
    Ok((read.since, counts))
}

impl Alerts {
    /// Adds this replica's refusals to the books about once a second, and
    /// once more at `shutdown`; what cannot be added waits for the next try.
    pub async fn ship_refusals(self: Arc<Self>, shutdown: CancellationToken) {
        let super::Keeping::Cluster { books, .. } = &self.keeping else { return };
        let mut dropped_told = 0;
        loop {
            let stopping = tokio::select! {
                () = shutdown.cancelled() => true,
                () = tokio::time::sleep(REFUSALS_EVERY) => false,
            };
            let dropped = self.refusals.unshipped_dropped();
            if dropped > dropped_told {
                tracing::warn!(
                    dropped,
                    "402s not kept for the books while they were out of reach; the summary's counts run low"
                );
                dropped_told = dropped;
            }
            let taken = self.refusals.take_unshipped();
            if !taken.is_empty() {
                let rows: Vec<RefusalRow> = taken
                    .iter()
                    .map(|((wallet, reason, minute), (count, last_at))| RefusalRow {
                        wallet: wallet.to_string(),
                        reason: reason.code().to_owned(),
                        minute: *minute,
                        count: i64::try_from(*count).unwrap_or(i64::MAX),
                        last_at: *last_at,
                    })
                    .collect();
                if let Err(error) = books.add_refusals(&rows).await {
                    tracing::warn!(%error, "cannot add this replica's recent 402s to the books; retrying");
                    self.refusals.put_back(taken);
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// Sends the deliveries other replicas claimed and abandoned, until
    /// `shutdown`: a firing claimed in the books is delivered at least once
    /// (receivers tell repeats apart by the event's `delivery` number).
    /// Once an hour it also forgets deliveries finished over 90 days ago
    /// whose period is over for good (see `Books::forget_old_alert_deliveries`).
    pub async fn resume_deliveries(self: Arc<Self>, shutdown: CancellationToken) {
        let super::Keeping::Cluster { books, replica } = &self.keeping else { return };
        let mut forgot_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RESUME_EVERY) => {}
            }
            if forgot_at.is_none_or(|at| at.elapsed() >= FORGET_EVERY) {
                forgot_at = Some(tokio::time::Instant::now());
                match books.forget_old_alert_deliveries(DELIVERIES_KEPT).await {
                    Ok(0) => {}
                    Ok(forgotten) => tracing::info!(forgotten, "forgot old alert deliveries"),
                    Err(error) => tracing::debug!(%error, "cannot forget old alert deliveries"),
                }
            }
            let taken = match books.take_abandoned_alerts(replica, ABANDONED_AFTER).await {
                Ok(taken) => taken,
                Err(error) => {
                    tracing::debug!(%error, "cannot look for abandoned alert deliveries");
                    continue;
                }
            };
            for (id, event, rule_id, rule_body) in taken {
                let Some(rule) = rules_from_rows(vec![(rule_id, rule_body)]).pop() else { continue };
                let Ok(delivery) = u64::try_from(id) else { continue };
                tracing::info!(
                    delivery,
                    rule = rule.id,
                    "sending an alert delivery another replica abandoned"
                );
                let alerts = self.clone();
                tokio::spawn(async move { alerts.send(&rule, delivery, &event.to_string()).await });
            }
        }
    }

    /// Reloads the rules from the cluster's books whenever one is added
    /// anywhere (and on a slow timer), until `shutdown`.
    pub async fn follow_cluster_rules(self: Arc<Self>, wakeups: Arc<Wakeups>, shutdown: CancellationToken) {
        let super::Keeping::Cluster { books, .. } = &self.keeping else { return };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = wakeups.alert_rules_changed() => {}
                () = tokio::time::sleep(wakeups.fallback(RELOAD_SLOW, RELOAD_POLL)) => {}
            }
            match read_rules(books).await {
                Ok(rules) => self.replace_rules(rules),
                Err(error) => {
                    tracing::warn!(%error, "cannot reload the cluster's alert rules; keeping the last ones")
                }
            }
        }
    }

    /// Moves the rules a single node kept in `path` (this replica's data
    /// directory, from before it joined a cluster) into the cluster's books,
    /// then renames the file to `<path>.imported`. A rule the books already
    /// hold the same (org, wallet, condition, webhook and secret) is not
    /// added again, so an import a crash cut short is finished by the next
    /// start without doubling what it had moved. Rules the books refuse (an
    /// org at its cap, a webhook the policy now refuses) are logged and
    /// left out. Returns how many moved.
    pub async fn import_rules_file(&self, path: &std::path::Path) -> Result<usize, AlertError> {
        if !path.exists() {
            return Ok(0);
        }
        let super::Keeping::Cluster { books, .. } = &self.keeping else { return Ok(0) };
        let rules = super::read_rules_file(path)?;
        let held = read_rules(books).await?;
        let mut moved = 0;
        for rule in rules {
            let old_id = rule.id;
            let same = |other: &Rule| {
                (other.org, other.wallet, &other.condition, &other.webhook_url, &other.secret)
                    == (rule.org, rule.wallet, &rule.condition, &rule.webhook_url, &rule.secret)
            };
            if held.iter().any(same) {
                tracing::info!(old_id, "an alert rule from the data directory is in the books already");
                continue;
            }
            match self.add_rule(rule.org, rule.wallet, rule.condition, rule.webhook_url, rule.secret).await {
                Ok(added) => {
                    tracing::info!(old_id, id = added.id, "moved an alert rule into the cluster's books");
                    moved += 1;
                }
                Err(AlertError::Cluster(reason)) => return Err(AlertError::Cluster(reason)),
                Err(error) => {
                    tracing::error!(old_id, %error, "an alert rule from the data directory was not moved")
                }
            }
        }
        let imported = path.with_extension("json.imported");
        std::fs::rename(path, &imported)
            .map_err(|e| AlertError::Save { path: imported.display().to_string(), reason: e.to_string() })?;
        Ok(moved)
    }
}
