//! Reading the books: ledger entries with cursor paging and filters, and
//! usage reports grouped by any mix of dimensions, as JSON or CSV.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use http::StatusCode;
use serde_json::{json, Value};

use super::aggregates;
use super::api::Answer;
use super::error::AdminError;
use super::rollup::{self, Grain, Rollups, RowKey, Totals};
use super::UsageSource;
use crate::ledger::entry::{EntryKind, LedgerEntry};
use crate::ledger::ids::{OrgId, Owner, UserId, WalletId};
use crate::ledger::Ledger;

/// Entries among the next records after a record id, and the last record
/// read (`None` at the end of the store).
pub type EntrySource<'a> = &'a dyn Fn(u64, usize) -> Result<(Vec<LedgerEntry>, Option<u64>), AdminError>;

/// Largest page a caller may ask for.
const MAX_PAGE: usize = 1_000;
const DEFAULT_PAGE: usize = 100;
/// Records read from the store per step of a scan.
const SCAN_STEP: usize = 2_000;
/// Most records one ledger-page request scans before it returns a cursor,
/// so a sparse filter cannot make one request read the whole store (the
/// caller follows the cursor for more).
const MAX_SCAN_PER_PAGE: usize = 20_000;

/// Query parameters as `name -> value`.
pub fn query_pairs(query: Option<&str>) -> BTreeMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(pair), String::new()),
        })
        .collect()
}

/// Percent-decoding of one query component (`+` is a space).
fn decode(text: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(high), Some(low)) => {
                out.push(high * 16 + low);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn kind_name(kind: &EntryKind) -> &'static str {
    match kind {
        EntryKind::Grant { .. } => "grant",
        EntryKind::Purchase { .. } => "purchase",
        EntryKind::Adjustment { .. } => "adjustment",
        EntryKind::Debit(_) => "debit",
        EntryKind::WriteOff { .. } => "write_off",
        EntryKind::WriteOffReversed { .. } => "write_off_reversed",
    }
}

fn time(params: &BTreeMap<String, String>, name: &str) -> Result<Option<DateTime<Utc>>, AdminError> {
    params
        .get(name)
        .map(|v| {
            v.parse::<DateTime<Utc>>()
                .map_err(|_| AdminError::bad(name, "an RFC 3339 time, e.g. 2026-11-01T00:00:00Z"))
        })
        .transpose()
}

/// A whole-number parameter. Digits past `u64::MAX` read as `u64::MAX`
/// (the document allows any run of digits): a page size that large is the
/// largest page, and no id or cursor is that large.
fn number(params: &BTreeMap<String, String>, name: &str) -> Result<Option<u64>, AdminError> {
    params
        .get(name)
        .map(|v| match v.parse::<u64>() {
            Ok(n) => Ok(n),
            Err(_) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => Ok(u64::MAX),
            Err(_) => Err(AdminError::bad(name, "a whole number")),
        })
        .transpose()
}

/// The filters of a ledger query; entries of other orgs never match.
struct Filter {
    org: OrgId,
    wallet: Option<WalletId>,
    kind: Option<String>,
    key: Option<u64>,
    user: Option<u64>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
}

impl Filter {
    fn parse(org: OrgId, params: &BTreeMap<String, String>) -> Result<Filter, AdminError> {
        let wallet = match params.get("wallet").map(String::as_str) {
            None => None,
            Some("pool") => Some(WalletId::Pool(org)),
            Some(other) => match other.strip_prefix("lite:").and_then(|id| id.parse().ok()) {
                Some(user) => Some(WalletId::Lite(UserId(user))),
                None => return Err(AdminError::bad("wallet", "\"pool\" or \"lite:USER_ID\"")),
            },
        };
        let kind = params.get("kind").cloned();
        if let Some(kind) = &kind {
            if !["grant", "purchase", "adjustment", "debit", "write_off", "write_off_reversed"]
                .contains(&kind.as_str())
            {
                return Err(AdminError::bad(
                    "kind",
                    "one of grant, purchase, adjustment, debit, write_off, write_off_reversed",
                ));
            }
        }
        Ok(Filter {
            org,
            wallet,
            kind,
            key: number(params, "key")?,
            user: number(params, "user")?,
            from: time(params, "from")?,
            to: time(params, "to")?,
        })
    }

    fn matches(&self, entry: &LedgerEntry) -> bool {
        let debit = match &entry.kind {
            EntryKind::Debit(debit) => Some(debit),
            _ => None,
        };
        entry.org == self.org
            && self.wallet.is_none_or(|w| w == entry.wallet)
            && self.kind.as_deref().is_none_or(|k| k == kind_name(&entry.kind))
            && self.key.is_none_or(|k| debit.is_some_and(|d| d.key.0 == k))
            && self.user.is_none_or(|u| {
                debit.is_some_and(|d| d.owner == Owner::User(UserId(u)))
                    || entry.wallet == WalletId::Lite(UserId(u))
            })
            && self.from.is_none_or(|from| entry.at >= from)
            && self.to.is_none_or(|to| entry.at < to)
    }
}

/// `GET /admin/v1/orgs/{org}/ledger?after=&limit=&wallet=&kind=&key=&user=&from=&to=`
pub fn ledger_page(
    source: EntrySource<'_>,
    org: OrgId,
    params: &BTreeMap<String, String>,
    costs: CostView,
) -> Answer {
    let filter = Filter::parse(org, params)?;
    let limit = number(params, "limit")?
        .map_or(DEFAULT_PAGE, |n| usize::try_from(n).unwrap_or(MAX_PAGE))
        .clamp(1, MAX_PAGE);
    let mut cursor = number(params, "after")?.unwrap_or(0);
    let mut found = Vec::new();
    let mut scanned = 0;
    let mut exhausted = false;
    'scan: while scanned < MAX_SCAN_PER_PAGE {
        let (step, last) = source(cursor, SCAN_STEP)?;
        let Some(last) = last else {
            exhausted = true;
            break;
        };
        scanned += SCAN_STEP;
        for entry in step {
            // Entry ids are record sequence numbers: resuming after one is exact.
            cursor = entry.id.0;
            if filter.matches(&entry) {
                found.push(entry);
                if found.len() == limit {
                    break 'scan;
                }
            }
        }
        cursor = last;
    }
    let next = if exhausted { Value::Null } else { json!(cursor) };
    let entries: Vec<Value> = found.iter().map(|entry| entry_json(entry, costs)).collect();
    Ok((StatusCode::OK, json!({ "entries": entries, "next_cursor": next })))
}

/// An organization's users, applications or keys (`list`), a page of at
/// most `limit` (1,000, also the default) after the id `after`, with the
/// cursor of the next page (`null` at the end). Paged so that an
/// organization of many keys, each with a large scope, cannot have one
/// answer copy them all.
pub fn list_page(ledger: &Ledger, org: OrgId, list: &str, params: &BTreeMap<String, String>) -> Answer {
    let limit = number(params, "limit")?
        .map_or(MAX_PAGE, |n| usize::try_from(n).unwrap_or(MAX_PAGE))
        .clamp(1, MAX_PAGE);
    let after = number(params, "after")?.unwrap_or(0);
    let (items, next): (Vec<Value>, Option<u64>) = match list {
        "users" => {
            let (users, next) = ledger.users_page(org, after, limit);
            (users.iter().map(super::api::shown).collect(), next)
        }
        "apps" => {
            let (apps, next) = ledger.apps_page(org, after, limit);
            (apps.iter().map(|app| json!(app)).collect(), next)
        }
        _ => {
            let (keys, next) = ledger.keys_page(org, after, limit);
            (keys.iter().map(super::api::key_view).collect(), next)
        }
    };
    let mut page = serde_json::Map::new();
    page.insert(list.to_owned(), Value::Array(items));
    page.insert("next_cursor".to_owned(), json!(next));
    Ok((StatusCode::OK, Value::Object(page)))
}

/// Whether a report shows what requests cost the operator before markup.
/// The operator's own figure: an organization's token sees what it was
/// charged, and the price table itself is closed to it, so its cost (and
/// with it the markup and the provider's rates) is left out for it too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CostView {
    WithOperatorCost,
    ChargedOnly,
}

/// An entry as the ledger export shows it: a debit's kind also carries
/// `operator_cost` (what the request cost the operator, before markup;
/// with [`CostView::WithOperatorCost`] only) and `price` (what the
/// customer paid: the amount debited), so an entry from before markups
/// shows them equal.
fn entry_json(entry: &LedgerEntry, costs: CostView) -> Value {
    let mut value = json!(entry);
    if let (Some((cost, price)), Some(kind)) = (entry.cost_and_price(), value.get_mut("kind")) {
        if costs == CostView::WithOperatorCost {
            kind["operator_cost"] = json!(cost.to_string());
        }
        kind["price"] = json!(price.to_string());
        if let Some(details) = kind.get_mut("details").and_then(Value::as_object_mut) {
            details.remove("operator_cost");
        }
    }
    value
}

/// Dimensions a usage report can group by.
pub const DIMENSIONS: [&str; 9] =
    ["user", "app", "key", "end_user", "model", "tool", "route", "day", "month"];

/// `GET /admin/v1/orgs/{org}/usage?group_by=model,day&from=&to=` as JSON;
/// with `csv` true, the same rows as CSV text.
/// Days and months are the organization's, in its time zone.
///
/// Single node: a range whose ends fall on quarter hours (or are open) is
/// read from the per-organization rollups, unless the rollup it needs went
/// over its cap; any other range scans the entries. Cluster mode: one SQL
/// aggregate over the shipped debits ([`super::aggregates`]).
pub fn usage(
    source: EntrySource<'_>,
    usage: &UsageSource,
    ledger: &Ledger,
    params: &BTreeMap<String, String>,
    report: Report,
) -> Result<(StatusCode, String, &'static str), AdminError> {
    let Report { org, time_zone, csv, costs, max_groups } = report;
    let group_by: Vec<String> = params
        .get("group_by")
        .map(|g| {
            g.split(',').map(|d| d.trim_matches(' ')).filter(|d| !d.is_empty()).map(str::to_owned).collect()
        })
        .unwrap_or_default();
    if let Some(bad) = group_by.iter().find(|d| !DIMENSIONS.contains(&d.as_str())) {
        return Err(AdminError::bad("group_by", format!("{bad:?} is not one of {DIMENSIONS:?}")));
    }
    // Each group's key holds every name given: thousands of repeats would
    // make every row thousands of strings.
    let mut named = BTreeSet::new();
    if let Some(twice) = group_by.iter().find(|d| !named.insert(d.as_str())) {
        // The document's pattern cannot say it: a rule (422).
        return Err(AdminError::rule("group_by", format!("{twice:?} is named twice")));
    }
    let (from, to) = (time(params, "from")?, time(params, "to")?);
    let mut groups = Groups::new(max_groups);
    match usage {
        UsageSource::Rollups(rollups) => {
            from_entries(source, rollups, org, time_zone, &group_by, (from, to), &mut groups)?
        }
        UsageSource::Database(read) => {
            aggregates::groups(read, ledger, org, time_zone, &group_by, (from, to), &mut groups)?
        }
    };
    Ok(render(&group_by, &groups.finish()?, csv, costs))
}

/// Whose usage report, and how it is shown.
#[derive(Clone, Copy, Debug)]
pub struct Report {
    pub org: OrgId,
    /// The zone days and months are counted in.
    pub time_zone: chrono_tz::Tz,
    pub csv: bool,
    pub costs: CostView,
    /// Groups past which the report is refused (`[admin] max_report_groups`).
    pub max_groups: usize,
}

/// A usage report's groups, at most `max` of them: clients name their end
/// users, so a report grouped by them could hold millions of rows, whole,
/// in the process every tenant shares.
pub struct Groups {
    map: BTreeMap<Vec<String>, Totals>,
    max: usize,
    over: bool,
}

impl Groups {
    pub fn new(max: usize) -> Groups {
        Groups { map: BTreeMap::new(), max, over: false }
    }

    /// Adds `totals` to the group `key`; a group past the cap is not kept.
    pub fn add(&mut self, key: Vec<String>, totals: &Totals) {
        if let Some(group) = self.map.get_mut(&key) {
            group.add(totals);
        } else if self.map.len() < self.max {
            self.map.entry(key).or_default().add(totals);
        } else {
            self.over = true;
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Refuses the report: it has more groups than the cap.
    pub fn refuse(&mut self) {
        self.over = true;
    }

    /// The groups; refused when there were more than the cap.
    pub fn finish(self) -> Result<BTreeMap<Vec<String>, Totals>, AdminError> {
        if self.over {
            // A request of the documented shape that its data makes too large: a rule (422).
            return Err(AdminError::rule(
                "group_by",
                format!(
                    "the report has more than {} groups; narrow it with from and to, or group by fewer dimensions",
                    self.max
                ),
            ));
        }
        Ok(self.map)
    }
}

/// The report's groups from the ledger entries: through the rollups when
/// the range allows, else by a scan.
fn from_entries(
    source: EntrySource<'_>,
    rollups: &Rollups,
    org: OrgId,
    time_zone: chrono_tz::Tz,
    group_by: &[String],
    (from, to): (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
    groups: &mut Groups,
) -> Result<(), AdminError> {
    let mut fold = |key: &RowKey, totals: &Totals| groups.add(group_key(group_by, key, time_zone), totals);
    let aligned = from.is_none_or(rollup::on_boundary) && to.is_none_or(rollup::on_boundary);
    let grain = if group_by.iter().any(|d| d == "end_user") { Grain::Fine } else { Grain::Coarse };
    let from_rollup = aligned
        && rollups
            .read(source, org, grain, |rows| {
                let (from, to) = (from.map(|f| f.timestamp()), to.map(|t| t.timestamp()));
                for (key, totals) in rows {
                    if from.is_none_or(|f| key.bucket >= f) && to.is_none_or(|t| key.bucket < t) {
                        fold(key, totals);
                    }
                }
            })?
            .is_some();
    if !from_rollup {
        let mut cursor = 0;
        loop {
            let (step, last) = source(cursor, SCAN_STEP)?;
            let Some(last) = last else { break };
            cursor = last;
            for entry in &step {
                if entry.org != org || from.is_some_and(|f| entry.at < f) || to.is_some_and(|t| entry.at >= t)
                {
                    continue;
                }
                if let Some((key, totals)) = rollup::debit_row(entry) {
                    fold(&key, &totals);
                }
            }
        }
    }
    Ok(())
}

/// The report's body and content type: JSON, or CSV when `csv`.
fn render(
    group_by: &[String],
    groups: &BTreeMap<Vec<String>, Totals>,
    csv: bool,
    costs: CostView,
) -> (StatusCode, String, &'static str) {
    if csv {
        return (StatusCode::OK, render_csv(group_by, groups, costs), "text/csv; charset=utf-8");
    }
    let mut total = Totals::default();
    let rows: Vec<Value> = groups
        .iter()
        .map(|(key, t)| {
            total.add(t);
            let mut row = totals_json(t, costs);
            for (dimension, value) in group_by.iter().zip(key) {
                row[dimension] = json!(value);
            }
            row
        })
        .collect();
    let body = json!({ "group_by": group_by, "rows": rows, "total": totals_json(&total, costs) });
    (StatusCode::OK, body.to_string(), "application/json")
}

/// The report's group of a row: its value for each dimension asked for.
fn group_key(group_by: &[String], row: &RowKey, time_zone: chrono_tz::Tz) -> Vec<String> {
    let local =
        || DateTime::<Utc>::from_timestamp(row.bucket, 0).unwrap_or_default().with_timezone(&time_zone);
    group_by
        .iter()
        .map(|dimension| match dimension.as_str() {
            "user" | "app" => owner_cell(dimension, Some(row.owner)),
            "key" => row.key.to_string(),
            "end_user" => row.end_user.as_deref().unwrap_or("").to_owned(),
            "model" if !row.is_tool => row.model.to_string(),
            "tool" if row.is_tool => row.model.to_string(),
            "route" => row.route.to_string(),
            "day" => local().format("%Y-%m-%d").to_string(),
            "month" => local().format("%Y-%m").to_string(),
            _ => String::new(),
        })
        .collect()
}

/// A row's `user` or `app` cell: the owner's id when it is one of those,
/// else empty (also when the owner is not known).
pub(super) fn owner_cell(dimension: &str, owner: Option<Owner>) -> String {
    match (dimension, owner) {
        ("user", Some(Owner::User(user))) => user.0.to_string(),
        ("app", Some(Owner::App(app))) => app.0.to_string(),
        _ => String::new(),
    }
}

/// The fields of a usage row's totals, in the order of the CSV columns.
pub const TOTALS_FIELDS: [&str; 7] = [
    "requests",
    "charged",
    "operator_cost",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "tool_units",
];

fn totals_json(t: &Totals, costs: CostView) -> Value {
    let mut totals = json!({
        "requests": t.requests,
        "charged": t.charged.normalize().to_string(),
        "input_tokens": t.input_tokens,
        "cached_input_tokens": t.cached_input_tokens,
        "output_tokens": t.output_tokens,
        "tool_units": t.tool_units,
    });
    if costs == CostView::WithOperatorCost {
        totals["operator_cost"] = json!(t.operator_cost.normalize().to_string());
    }
    totals
}

fn render_csv(group_by: &[String], groups: &BTreeMap<Vec<String>, Totals>, costs: CostView) -> String {
    let shown = |field: &str| costs == CostView::WithOperatorCost || field != "operator_cost";
    let mut out = String::new();
    let mut header: Vec<&str> = group_by.iter().map(String::as_str).collect();
    header.extend(TOTALS_FIELDS.into_iter().filter(|field| shown(field)));
    out.push_str(&header.join(","));
    out.push('\n');
    for (key, t) in groups {
        let mut cells: Vec<String> = key.iter().map(|v| csv_cell(v)).collect();
        cells.extend(
            [
                t.requests.to_string(),
                t.charged.normalize().to_string(),
                t.operator_cost.normalize().to_string(),
                t.input_tokens.to_string(),
                t.cached_input_tokens.to_string(),
                t.output_tokens.to_string(),
                t.tool_units.to_string(),
            ]
            .into_iter()
            .zip(TOTALS_FIELDS)
            .filter(|(_, field)| shown(field))
            .map(|(cell, _)| cell),
        );
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

/// Quote a CSV cell when it needs it (RFC 4180); also defuse cells that a
/// spreadsheet would run as a formula.
fn csv_cell(value: &str) -> String {
    let value = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    // Quoted with a `;` too: spreadsheets in some locales split on it.
    if value.contains([',', ';', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_decoded() {
        let q = query_pairs(Some("group_by=model%2Cday&from=2026-11-01T00%3A00%3A00Z&flag"));
        assert_eq!(q["group_by"], "model,day");
        assert_eq!(q["from"], "2026-11-01T00:00:00Z");
        assert_eq!(q["flag"], "");
        assert_eq!(decode("%E2%9C%93+x%zz%"), "✓ x%zz%", "bad escapes pass through, never panic");
    }

    #[test]
    fn csv_cells_are_quoted_and_defused() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("=cmd()"), "'=cmd()");
        assert_eq!(csv_cell("\t=cmd()"), "'\t=cmd()");
        assert_eq!(csv_cell("a;=1+1"), "\"a;=1+1\"");
    }
}
