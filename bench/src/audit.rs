//! The books of one gateway against what the mock served.
//!
//! Independently of the gateway, the harness knows every request it sent
//! (request number → [`Spec`], see [`Catalog`]), the mock's journal says what
//! usage it reported for each, and the price file prices it. From those:
//! - every wallet's balance at the end equals its balance after seeding less
//!   the computed cost of every request its keys got served (exact decimals);
//! - with the per-debit audit (durable store on): every ledger debit is one
//!   served request and its amount and hold are the computed ones;
//! - no wallet is below zero by more than the overruns its requests could
//!   make (cost above hold);
//! - every 402 `insufficient_credits` names the hold the request needed, and
//!   came from a wallet whose available balance at the end is below that
//!   hold plus what the requests in flight with it could have handed back
//!   (see [`in_flight_return`]); every wallet that ended dry (below the
//!   smallest hold its keys asked for) had 402s; no other 402 code appears
//!   (no limits are set);
//! - no hold is left open.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use creditgate::mock::{JournalEntry, MockUsage};
use creditgate::pricing::{PriceTable, TokenUsage};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::client::Admin;
use crate::drive::{Sequencer, LOAD_REQUEST_ID};
use crate::mix::{Call, Catalog, Spec};
use crate::stats::{Refused, Span};
use crate::tenants::{Tenants, WalletRef};

/// Longest wait for in-flight settles to close their holds.
const SETTLE_WAIT: Duration = Duration::from_secs(15);

/// How long after its client saw the last byte a request's hold may still
/// be open: the gateway settles when it polls the upstream body's end, which
/// can come after the client has read the whole (length-delimited) body.
const SETTLE_LAG_NS: u64 = 250_000_000;

/// A request id as plain lowercase hex (the gateway writes it without
/// hyphens to the upstream, the ledger with them).
fn hex_id(id: &str) -> String {
    id.chars().filter(|c| *c != '-').collect::<String>().to_ascii_lowercase()
}

/// What the mock served one gateway for one request.
#[derive(Debug, Clone)]
pub struct Served {
    pub seq: u64,
    /// The gateway's own request id, as the mock saw it (hex, no hyphens):
    /// its ledger debit carries the same one.
    pub ledger_id: Option<String>,
    pub path: String,
    pub model: Option<String>,
    pub status: u16,
    pub usage: Option<MockUsage>,
}

impl Served {
    /// Journal entries of this run's requests, keeping what the audit needs.
    pub fn from_journal(entries: Vec<JournalEntry>, sequencer: &Sequencer) -> Vec<Served> {
        entries
            .into_iter()
            .filter_map(|e| {
                let seq = e.header(LOAD_REQUEST_ID).and_then(|id| sequencer.seq_of(id))?;
                let path = e.uri.split('?').next().unwrap_or_default().to_owned();
                let ledger_id = e.header("x-request-id").map(hex_id);
                Some(Served { seq, ledger_id, path, model: e.model, status: e.status, usage: e.usage })
            })
            .collect()
    }

    /// This run's requests among the entries of a remote mock's
    /// `GET /_mock/journal` (a JSON list) numbered `next` or later; moves
    /// `next` past the newest entry. `true` as well when entries numbered
    /// `next` or later were already dropped (the journal overflowed), so
    /// some served requests may be missing.
    pub fn from_journal_json(
        entries: &Value,
        sequencer: &Sequencer,
        next: &mut u64,
    ) -> anyhow::Result<(Vec<Served>, bool)> {
        let list = entries.as_array().context("the mock's journal is not a JSON list")?;
        let mut served = Vec::new();
        let mut oldest: Option<u64> = None;
        let mut newest: Option<u64> = None;
        for entry in list {
            let mock_seq = entry["seq"].as_u64().context("a journal entry without seq")?;
            if mock_seq < *next {
                continue;
            }
            oldest = Some(oldest.map_or(mock_seq, |o| o.min(mock_seq)));
            newest = Some(newest.map_or(mock_seq, |n| n.max(mock_seq)));
            let header = |wanted: &str| {
                entry["headers"].as_array().and_then(|headers| {
                    headers.iter().find_map(|pair| {
                        let name = pair.get(0)?.as_str()?;
                        name.eq_ignore_ascii_case(wanted).then(|| pair.get(1)?.as_str()).flatten()
                    })
                })
            };
            let Some(seq) = header(LOAD_REQUEST_ID).and_then(|id| sequencer.seq_of(id)) else { continue };
            let ledger_id = header("x-request-id").map(hex_id);
            let uri = entry["uri"].as_str().unwrap_or_default();
            let count = |usage: &Value, field: &str| usage[field].as_u64().unwrap_or(0);
            let usage = entry.get("usage").filter(|u| u.is_object()).map(|u| MockUsage {
                input_tokens: count(u, "input_tokens"),
                output_tokens: count(u, "output_tokens"),
                units: count(u, "units"),
            });
            served.push(Served {
                seq,
                ledger_id,
                path: uri.split('?').next().unwrap_or_default().to_owned(),
                model: entry["model"].as_str().map(str::to_owned),
                status: entry["status"].as_u64().unwrap_or(0) as u16,
                usage,
            });
        }
        let gap = oldest.is_some_and(|o| o > *next);
        if let Some(newest) = newest {
            *next = newest + 1;
        }
        Ok((served, gap))
    }
}

/// A wallet as the admin API shows it.
#[derive(Debug, Clone, Copy)]
pub struct WalletState {
    pub balance: Decimal,
    pub available: Decimal,
    pub held: Decimal,
    pub open_holds: u64,
}

/// Every wallet of the gateway's organizations.
pub async fn wallets(admin: &Admin, orgs: &[u64]) -> anyhow::Result<BTreeMap<WalletRef, WalletState>> {
    let mut wallets = BTreeMap::new();
    for org in orgs {
        let page = admin.get(&format!("/admin/v1/orgs/{org}/balances")).await?;
        for wallet in page["balances"].as_array().context("balances: no list")? {
            let id =
                WalletRef::from_json(&wallet["wallet"]).with_context(|| format!("wallet id in {wallet}"))?;
            let amount = |field: &str| -> anyhow::Result<Decimal> {
                let text = wallet[field].as_str().with_context(|| format!("{id}: no {field}"))?;
                text.parse().with_context(|| format!("{id}: {field} {text:?} is not a decimal"))
            };
            let state = WalletState {
                balance: amount("balance")?,
                available: amount("available")?,
                held: amount("held")?,
                open_holds: wallet["open_holds"].as_u64().unwrap_or(0),
            };
            wallets.insert(id, state);
        }
    }
    Ok(wallets)
}

/// What one gateway's audit needs.
pub struct Books<'a> {
    pub name: &'a str,
    pub admin: &'a Admin,
    pub tenants: &'a Tenants,
    /// Balances right after seeding.
    pub seeded: &'a BTreeMap<WalletRef, WalletState>,
    pub served: &'a [Served],
    pub refused: &'a [Refused],
    /// When each request that was not refused was in flight, by number.
    pub spans: &'a [(u64, Span)],
    pub catalog: &'a Catalog,
    pub sequencer: &'a Sequencer,
    pub prices: &'a PriceTable,
    /// Match each ledger debit too (needs the durable store's entries export).
    pub per_debit: bool,
}

/// Findings: `failures` empty means the books are right.
#[derive(Debug, Default)]
pub struct Findings {
    pub notes: Vec<String>,
    pub failures: Vec<String>,
    pub json: Value,
}

/// Computed facts about one wallet.
#[derive(Debug, Default, Clone)]
struct Expected {
    cost: Decimal,
    overrun_sum: Decimal,
    overrun_max: Decimal,
    served: u64,
    refused: u64,
    smallest_hold: Option<Decimal>,
}

pub async fn audit(books: &Books<'_>) -> anyhow::Result<Findings> {
    let mut findings = Findings::default();
    let now = Utc::now();
    let wallets = settled_wallets(books).await?;
    let mut expected: BTreeMap<WalletRef, Expected> = BTreeMap::new();
    let mut costs: HashMap<u64, (Decimal, Decimal)> = HashMap::new();
    for served in books.served {
        let Some((spec, cost, hold)) = price_served(books, served, now, &mut findings)? else { continue };
        let wallet = books.tenants.keys.get(spec.key).map(|t| t.wallet).context("served key out of range")?;
        let e = expected.entry(wallet).or_default();
        e.cost += cost;
        let overrun = (cost - hold).max(Decimal::ZERO);
        e.overrun_sum += overrun;
        e.overrun_max = e.overrun_max.max(overrun);
        e.served += 1;
        e.smallest_hold = Some(e.smallest_hold.map_or(hold, |h| h.min(hold)));
        costs.insert(served.seq, (cost, hold));
    }
    check_refusals(books, &wallets, &costs, &mut expected, now, &mut findings)?;
    check_wallets(books, &wallets, &expected, &mut findings);
    if books.per_debit {
        check_debits(books, &costs, &mut findings).await?;
    }
    let served_total: u64 = expected.values().map(|e| e.served).sum();
    findings.notes.push(format!(
        "{}: {} wallets, {served_total} served requests priced from the mock's usage, {} refusals checked",
        books.name,
        wallets.len(),
        books.refused.len()
    ));
    findings.json = json!({
        "wallets": expected.iter().map(|(w, e)| {
            let state = wallets.get(w);
            json!({"wallet": w.to_string(), "served": e.served, "refused_402": e.refused,
                   "computed_cost": e.cost.to_string(), "balance": state.map(|s| s.balance.to_string()),
                   "available": state.map(|s| s.available.to_string()),
                   "max_overrun": e.overrun_max.to_string()})
        }).collect::<Vec<_>>(),
        "failures": findings.failures,
    });
    Ok(findings)
}

/// Wallets once every hold is closed (settles run as streams end).
async fn settled_wallets(books: &Books<'_>) -> anyhow::Result<BTreeMap<WalletRef, WalletState>> {
    let started = Instant::now();
    loop {
        let wallets = wallets(books.admin, &books.tenants.orgs).await?;
        let open = wallets.values().any(|w| w.open_holds > 0 || !w.held.is_zero());
        if !open || started.elapsed() > SETTLE_WAIT {
            return Ok(wallets);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The spec, computed cost and hold of one served request; `None` (with a
/// failure noted) when it cannot be priced.
fn price_served(
    books: &Books<'_>,
    served: &Served,
    now: chrono::DateTime<Utc>,
    findings: &mut Findings,
) -> anyhow::Result<Option<(Spec, Decimal, Decimal)>> {
    let Some(spec) = books.catalog.spec(served.seq) else {
        findings
            .failures
            .push(format!("{}: the mock served request {} that no phase sent", books.name, served.seq));
        return Ok(None);
    };
    let (Some(usage), 200) = (served.usage, served.status) else {
        findings.failures.push(format!(
            "{}: request {} answered {} without usage at the mock",
            books.name, served.seq, served.status
        ));
        return Ok(None);
    };
    if let Call::Model { model, .. } = &spec.call {
        if served.model.as_deref() != Some(model.as_str()) || served.path != spec.path() {
            findings.failures.push(format!(
                "{}: request {} reached the mock as {:?} {} (sent {model} {})",
                books.name,
                served.seq,
                served.model,
                served.path,
                spec.path()
            ));
        }
    }
    let tokens = TokenUsage {
        input_tokens: usage.input_tokens,
        cached_input_tokens: 0,
        output_tokens: usage.output_tokens,
        ..TokenUsage::default()
    };
    let cost = spec.cost(books.prices, now, &tokens, usage.units)?;
    let hold = spec.hold(books.prices, now)?;
    Ok(Some((spec, cost, hold)))
}

fn check_refusals(
    books: &Books<'_>,
    wallets: &BTreeMap<WalletRef, WalletState>,
    costs: &HashMap<u64, (Decimal, Decimal)>,
    expected: &mut BTreeMap<WalletRef, Expected>,
    now: chrono::DateTime<Utc>,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    let name = books.name;
    // Built on the first refusal the wallet's end alone does not explain.
    let mut spans_by_wallet: Option<HashMap<WalletRef, Vec<(u64, Span)>>> = None;
    let mut excused = 0;
    for refused in books.refused {
        let tenant = books.tenants.keys.get(refused.key).context("refused key out of range")?;
        let e = expected.entry(tenant.wallet).or_default();
        e.refused += 1;
        if refused.code != "insufficient_credits" {
            findings.failures.push(format!(
                "{name}: request {} got 402 {} although no spending limit is set",
                refused.seq, refused.code
            ));
            continue;
        }
        let Some(spec) = books.catalog.spec(refused.seq) else {
            findings.failures.push(format!("{name}: refused request {} was never sent", refused.seq));
            continue;
        };
        let hold = spec.hold(books.prices, now)?;
        e.smallest_hold = Some(e.smallest_hold.map_or(hold, |h| h.min(hold)));
        if refused.required != Some(hold) {
            findings.failures.push(format!(
                "{name}: request {} was refused as needing {:?}, the computed hold is {hold}",
                refused.seq, refused.required
            ));
        }
        let Some(available) = wallets.get(&tenant.wallet).map(|w| w.available) else {
            findings
                .failures
                .push(format!("{name}: request {} got 402 from unknown {}", refused.seq, tenant.wallet));
            continue;
        };
        if available < hold {
            continue;
        }
        let by_wallet = match &mut spans_by_wallet {
            Some(by_wallet) => by_wallet,
            None => spans_by_wallet.insert(spans_by_wallet_of(books)?),
        };
        let spans = by_wallet.get(&tenant.wallet).map_or(&[][..], Vec::as_slice);
        let (overlapping, returned) = in_flight_return(spans, refused.span, |seq| {
            let Some(spec) = books.catalog.spec(seq) else { return Ok(None) };
            let amount = match costs.get(&seq) {
                Some((cost, hold)) => (*hold - *cost).max(Decimal::ZERO),
                None => spec.hold(books.prices, now)?,
            };
            Ok(Some((spec.abandon, amount)))
        })?;
        if available >= hold + returned {
            findings.failures.push(format!(
                "{name}: request {} got 402 from {} which ends with {available} available, enough for its hold \
                 {hold} and the {returned} that {overlapping} requests in flight with it could have handed back",
                refused.seq, tenant.wallet
            ));
        } else {
            excused += 1;
        }
    }
    if excused > 0 {
        findings.notes.push(format!(
            "{name}: {excused} refusals came from wallets that end with enough for the hold, within what \
             requests in flight with them handed back"
        ));
    }
    Ok(())
}

/// The spans of requests that were not refused, by the wallet their key
/// draws from.
fn spans_by_wallet_of(books: &Books<'_>) -> anyhow::Result<HashMap<WalletRef, Vec<(u64, Span)>>> {
    let mut by_wallet: HashMap<WalletRef, Vec<(u64, Span)>> = HashMap::new();
    for &(seq, span) in books.spans {
        let Some(spec) = books.catalog.spec(seq) else { continue };
        let wallet = books.tenants.keys.get(spec.key).map(|t| t.wallet).context("sent key out of range")?;
        by_wallet.entry(wallet).or_default().push((seq, span));
    }
    Ok(by_wallet)
}

/// How much credit the requests of `spans` that may have held while
/// `refused` was decided can have handed back since, with how many there
/// were. `hand_back(seq)` says whether request `seq` was an abandoned stream
/// and what it could hand back: its hold less its cost, or its whole hold
/// if the mock never served it. A wallet short of a hold when it refused
/// can end no richer than that much above the hold (no grants run during a
/// phase), so this bounds the check of 402s without timing the gateway.
/// Abandoned streams count however long ago they were sent: the gateway
/// settles them when it notices the hang-up.
fn in_flight_return(
    spans: &[(u64, Span)],
    refused: Span,
    mut hand_back: impl FnMut(u64) -> anyhow::Result<Option<(bool, Decimal)>>,
) -> anyhow::Result<(u64, Decimal)> {
    let (mut count, mut total) = (0, Decimal::ZERO);
    for &(seq, span) in spans {
        if span.sent_ns >= refused.ended_ns {
            continue;
        }
        let Some((abandoned, amount)) = hand_back(seq)? else { continue };
        if !abandoned && span.ended_ns.saturating_add(SETTLE_LAG_NS) <= refused.sent_ns {
            continue;
        }
        count += 1;
        total += amount;
    }
    Ok((count, total))
}

fn check_wallets(
    books: &Books<'_>,
    wallets: &BTreeMap<WalletRef, WalletState>,
    expected: &BTreeMap<WalletRef, Expected>,
    findings: &mut Findings,
) {
    let name = books.name;
    for (wallet, small) in books.tenants.wallets() {
        let (Some(end), Some(start)) = (wallets.get(&wallet), books.seeded.get(&wallet)) else {
            findings.failures.push(format!("{name}: wallet {wallet} is missing from the admin API"));
            continue;
        };
        let e = expected.get(&wallet).cloned().unwrap_or_default();
        let debited = start.balance - end.balance;
        if debited != e.cost {
            findings.failures.push(format!(
                "{name}: {wallet} was debited {debited} ({} → {}), the mock's usage at list prices costs {}",
                start.balance, end.balance, e.cost
            ));
        }
        if end.balance < -e.overrun_sum {
            findings.failures.push(format!(
                "{name}: {wallet} is at {} below its possible overrun {} (largest single {})",
                end.balance, e.overrun_sum, e.overrun_max
            ));
        }
        if end.open_holds > 0 || !end.held.is_zero() {
            findings.failures.push(format!(
                "{name}: {wallet} still has {} holds open ({} held) after the run",
                end.open_holds, end.held
            ));
        }
        let dry = e.smallest_hold.is_some_and(|h| end.available < h);
        if dry && e.refused == 0 {
            findings.failures.push(format!(
                "{name}: {wallet} ended dry ({} available) but its keys saw no 402",
                end.available
            ));
        }
        if small && e.refused == 0 {
            findings.notes.push(format!(
                "{name}: small wallet {wallet} saw no 402 ({} available): a longer run or a larger --dry-share drains it",
                end.available
            ));
        }
    }
}

/// Each ledger debit is one served request, at the computed cost and hold.
async fn check_debits(
    books: &Books<'_>,
    costs: &HashMap<u64, (Decimal, Decimal)>,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    let name = books.name;
    let mut matched = 0usize;
    let seq_of: HashMap<&str, u64> =
        books.served.iter().filter_map(|s| Some((s.ledger_id.as_deref()?, s.seq))).collect();
    for org in &books.tenants.orgs {
        let mut cursor = 0u64;
        loop {
            let page = books
                .admin
                .get(&format!("/admin/v1/orgs/{org}/ledger?kind=debit&limit=1000&after={cursor}"))
                .await?;
            for debit in page["entries"].as_array().context("ledger page: no entries")? {
                let id = debit["kind"]["request_id"].as_str().context("debit without request id")?;
                let Some(seq) = seq_of.get(hex_id(id).as_str()).copied() else {
                    findings.failures.push(format!("{name}: debit for unknown request {id}"));
                    continue;
                };
                let Some((cost, hold)) = costs.get(&seq) else {
                    findings
                        .failures
                        .push(format!("{name}: debit for request {seq} that the mock never served"));
                    continue;
                };
                let amount = |field: &str| {
                    debit[field].as_str().and_then(|a| a.parse::<Decimal>().ok()).map(|a| a.abs())
                };
                let held = debit["kind"]["held"].as_str().and_then(|a| a.parse::<Decimal>().ok());
                if amount("amount") != Some(*cost) {
                    findings.failures.push(format!(
                        "{name}: request {seq} was debited {:?}, its usage costs {cost}",
                        debit["amount"]
                    ));
                }
                if held != Some(*hold) {
                    findings
                        .failures
                        .push(format!("{name}: request {seq} held {held:?}, the computed hold is {hold}"));
                }
                matched += 1;
            }
            match page["next_cursor"].as_u64() {
                Some(next) => cursor = next,
                None => break,
            }
        }
    }
    if matched != costs.len() {
        findings.failures.push(format!(
            "{name}: {matched} debits in the ledger for {} requests the mock served",
            costs.len()
        ));
    } else {
        findings.notes.push(format!("{name}: every one of {matched} ledger debits matches its request"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_journal_keeps_new_entries_of_this_run_and_sees_gaps() {
        let sequencer = Sequencer::new();
        let ours = sequencer.request_id(7);
        let entry = |seq: u64, id: &str| {
            json!({"seq": seq, "method": "POST", "uri": "/v1/chat/completions?x=1",
                   "headers": [["X-Load-Request-Id", id], ["x-request-id", "01A2-B3"]], "model": "mock-gpt", "status": 200,
                   "usage": {"input_tokens": 3, "output_tokens": 5, "units": 0}})
        };
        let journal = json!([entry(4, &ours), entry(5, &ours), entry(6, "someone-else")]);
        let mut next = 5;
        let (served, gap) = Served::from_journal_json(&journal, &sequencer, &mut next).unwrap();
        assert!(!gap);
        assert_eq!(next, 7);
        assert_eq!(served.len(), 1, "seq 4 was read before, seq 6 is not ours");
        assert_eq!((served[0].seq, served[0].path.as_str()), (7, "/v1/chat/completions"));
        assert_eq!(served[0].ledger_id.as_deref(), Some("01a2b3"), "the gateway's id, as plain hex");
        assert_eq!(served[0].usage, Some(MockUsage { input_tokens: 3, output_tokens: 5, units: 0 }));
        let (_, gap) = Served::from_journal_json(&json!([entry(9, &ours)]), &sequencer, &mut next).unwrap();
        assert!(gap, "entries 7 and 8 were dropped");
        let (none, gap) = Served::from_journal_json(&json!([]), &sequencer, &mut next).unwrap();
        assert!(none.is_empty() && !gap);
        assert_eq!(next, 10);
    }

    #[test]
    fn a_refusal_is_excused_only_by_requests_that_could_hold_while_it_was_decided() {
        const MS: u64 = 1_000_000;
        let span = |sent_ms: u64, ended_ms: u64| Span { sent_ns: sent_ms * MS, ended_ns: ended_ms * MS };
        let refused = span(1_000, 1_002);
        let spans = [
            (1, span(990, 1_001)),   // in flight across it
            (2, span(1_001, 1_010)), // sent while it was decided
            (3, span(900, 950)),     // ended 50 ms before: may not have settled yet
            (4, span(100, 200)),     // settled long before
            (5, span(100, 110)),     // abandoned long before: may settle any time
            (6, span(1_002, 1_010)), // sent once it was answered
            (7, span(995, 999)),     // never served: its whole hold came back
        ];
        let hand_back = |seq: u64| -> anyhow::Result<Option<(bool, Decimal)>> {
            Ok(Some((seq == 5, Decimal::new(1 << seq, 0))))
        };
        let (count, total) = in_flight_return(&spans, refused, hand_back).unwrap();
        let expected: i64 = [1, 2, 3, 5, 7].iter().map(|seq| 1 << seq).sum();
        assert_eq!((count, total), (5, Decimal::new(expected, 0)));
        let (count, total) = in_flight_return(&spans, refused, |_| Ok(None)).unwrap();
        assert_eq!((count, total), (0, Decimal::ZERO), "requests of no phase count nothing");
    }
}
