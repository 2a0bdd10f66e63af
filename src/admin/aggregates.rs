//! Usage reports in cluster mode: the groups come from one SQL aggregate
//! over the shipped debits (see `crate::cluster::usage`), read through a
//! [`UsageReader`] the gateway sets up, so this module never sees the
//! database itself.
//!
//! The aggregate groups by key rather than by owner (shipped debits do not
//! carry the owner); the keys' owners come from this replica's ledger, the
//! same map the treasurer posts debits with. Rows are then folded into the
//! report's groups exactly as the single node folds its rollups, so both
//! answer in the same shape and order.

use chrono::{DateTime, Utc};

use super::error::AdminError;
use super::reports::{owner_cell, Groups};
use super::UsageReader;
use crate::cluster::usage::{UsageGroup, UsageQuery};
use crate::ledger::ids::{KeyId, OrgId};
use crate::ledger::Ledger;

/// The report's groups for `group_by` over `[from, to)`.
pub fn groups(
    read: &UsageReader,
    ledger: &Ledger,
    org: OrgId,
    time_zone: chrono_tz::Tz,
    group_by: &[String],
    (from, to): (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
    groups: &mut Groups,
) -> Result<(), AdminError> {
    let by = |names: &[&str]| group_by.iter().any(|d| names.contains(&d.as_str()));
    let query = UsageQuery {
        org: org.0,
        time_zone: time_zone.name().to_owned(),
        from,
        to,
        by_key: by(&["user", "app", "key"]),
        by_end_user: by(&["end_user"]),
        by_model: by(&["model", "tool"]),
        by_route: by(&["route"]),
        by_day: by(&["day"]),
        by_month: by(&["month"]),
        // A row per key folds into its owner's group: rows are groups only
        // when the report is not by user or application.
        max_rows: if by(&["user", "app"]) { 0 } else { groups.max().saturating_add(1) },
    };
    let rows = read(&query)?;
    // The aggregate stops one row past the cap, where its rows are groups.
    if query.max_rows > 0 && rows.len() > groups.max() {
        groups.refuse();
        return Ok(());
    }
    for row in rows {
        let cells = group_by.iter().map(|dimension| cell(dimension, &row, ledger)).collect();
        groups.add(cells, &row.totals);
    }
    Ok(())
}

/// A row's value for one dimension, as the single node's report shows it.
fn cell(dimension: &str, row: &UsageGroup, ledger: &Ledger) -> String {
    let text = |value: &Option<String>| value.clone().unwrap_or_default();
    match dimension {
        "user" | "app" => {
            let owner = row.key.and_then(|key| ledger.key(KeyId(key))).map(|key| key.owner);
            owner_cell(dimension, owner)
        }
        "key" => row.key.map(|key| key.to_string()).unwrap_or_default(),
        "end_user" => text(&row.end_user),
        "model" if !row.is_tool => text(&row.model),
        "tool" if row.is_tool => text(&row.model),
        "route" => text(&row.route),
        "day" => text(&row.day),
        "month" => text(&row.month),
        _ => String::new(),
    }
}
