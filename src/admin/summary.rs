//! Read-only views that the dashboard needs and the other resources do not
//! give: an organization's summary (its zone, how much of this contract
//! year's allocation is consumed, recent 402s by reason) and the price table's
//! entries.

use chrono::{DateTime, Utc};
use http::StatusCode;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::api::Answer;
use super::error::AdminError;
use crate::alerts::refusals::RefusalCount;
use crate::ledger::contract::OrgCalendar;
use crate::ledger::ids::{OrgId, WalletId};
use crate::ledger::lot::LotOrigin;
use crate::ledger::Ledger;
use crate::pricing::PriceTable;

/// `GET /admin/v1/orgs/{org}/summary`.
/// `refusals` are the org's wallets' recent 402s and since when they are
/// counted ([`crate::alerts::Alerts::refusal_counts`]).
pub fn org_summary(
    ledger: &Ledger,
    refusals: (DateTime<Utc>, Vec<RefusalCount>),
    org: OrgId,
    now: DateTime<Utc>,
) -> Answer {
    let found = ledger.org(org).ok_or_else(|| AdminError::NotFound(format!("no org {}", org.0)))?;
    let contract_year = contract_year(ledger, &found, now)?;
    let (since, counts) = refusals;
    Ok((
        StatusCode::OK,
        json!({
            "org": org,
            "time_zone": found.time_zone.name(),
            "now": now,
            "contract_year": contract_year,
            "refusals": {"since": since, "counts": counts},
        }),
    ))
}

/// The contract year in force: its allocation (platform plus seats) and how
/// much of it is consumed. An allocation lot that ran empty is dropped from
/// the wallet, so what is not found live counts as consumed.
fn contract_year(
    ledger: &Ledger,
    org: &crate::ledger::entity::Organization,
    now: DateTime<Utc>,
) -> Result<Value, AdminError> {
    let calendar = OrgCalendar { tz: org.time_zone, terms: std::sync::Arc::from(org.contracts.clone()) };
    let Some(year) = calendar.year_at(now) else { return Ok(Value::Null) };
    let Some(term) = usize::try_from(year.term).ok().and_then(|t| org.contracts.get(t)) else {
        return Ok(Value::Null);
    };
    let seats = term.seat_allocation().map_err(|e| AdminError::Store(e.to_string()))?;
    let allocated = term.platform_allocation_per_year.checked_add(seats).unwrap_or(Decimal::MAX);
    let pool = ledger.balance(WalletId::Pool(org.id), now)?;
    let remaining = pool
        .lots
        .iter()
        .filter(|lot| match lot.origin {
            LotOrigin::Platform { term, year: y } | LotOrigin::Seat { term, year: y } => {
                term == year.term && y == year.year
            }
            _ => false,
        })
        .try_fold(Decimal::ZERO, |sum, lot| sum.checked_add(lot.remaining))
        .unwrap_or(Decimal::MAX);
    let consumed = allocated.checked_sub(remaining).unwrap_or(Decimal::ZERO).max(Decimal::ZERO);
    Ok(json!({
        "term": year.term, "year": year.year, "start": year.start, "end": year.end,
        "allocated": allocated.normalize().to_string(),
        "remaining": remaining.normalize().to_string(),
        "consumed": consumed.normalize().to_string(),
    }))
}

/// `GET /admin/v1/prices/table`: every model and tool with its prices in
/// force now, in dollars (per 1M tokens for token prices).
pub fn price_table(table: &PriceTable, now: DateTime<Utc>) -> Value {
    let text = |d: Decimal| d.normalize().to_string();
    let models: Vec<Value> = table
        .model_names()
        .filter_map(|name| table.model(name, now).map(|price| (name, price)))
        .map(|(name, price)| {
            json!({
                "name": name,
                "input_per_mtok": text(price.input_per_mtok()),
                "cached_input_per_mtok": text(price.cached_input_per_mtok()),
                "output_per_mtok": text(price.output_per_mtok()),
                "per_request": text(price.per_request()),
                "markup_percent": text(price.markup().percent()),
            })
        })
        .collect();
    let tools: Vec<Value> = table
        .tool_names()
        .filter_map(|name| table.tool(name, now).map(|price| (name, price)))
        .map(|(name, price)| {
            json!({
                "name": name,
                "per_call": text(price.per_call()),
                "per_unit": text(price.per_unit()),
                "unit": table.tool_unit(name),
                "markup_percent": text(price.markup().percent()),
            })
        })
        .collect();
    json!({"version": table.version_text().as_ref(), "models": models, "tools": tools})
}
