//! Markup for operators who resell credits: the price table's prices are the
//! operator's cost, the customer pays cost × (1 + percent/100), rounded up
//! once over the whole call, and the debit's ledger entry shows both. Each
//! test runs a real gateway against the mock upstream over TCP, with a real
//! sled directory, and reads the books back through the admin API.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use creditgate::app::Gateway;
use creditgate::ledger::entity::KeyHash;
use creditgate::pricing::HoldRequest;
use http::Request;
use http_body_util::Full;
use rust_decimal::Decimal;
use serde_json::{json, Value};

/// 20% on the whole table; the Anthropic model 33.333% of its own,
/// embeddings none, and the search tool 35%.
const RESALE: &str = r#"label = "resale"
[markup]
percent = "20"

[models."mock-gpt"]
input_per_mtok = "1"
output_per_mtok = "2"
default_max_output_tokens = 100

[models."mock-claude"]
input_per_mtok = "3"
output_per_mtok = "15"
default_max_output_tokens = 100
markup_percent = "33.333"

[models."mock-embed"]
input_per_mtok = "0.1"
markup_percent = "0"

[tools."web-search"]
per_call = "0.005"
per_unit = "0.001"
unit = "results"
markup_percent = "35"
"#;

/// A gateway priced by `prices`, its org's pool holding $100.
async fn start_priced(prices: &str) -> Stack {
    start_priced_at(prices, None).await
}

/// The same in front of `upstream` instead of the stack's mock.
async fn start_priced_at(prices: &str, upstream: Option<std::net::SocketAddr>) -> Stack {
    let stack = start().await;
    let path = stack.data_dir.path().join("prices.toml");
    std::fs::write(&path, prices).unwrap();
    let upstream = upstream.unwrap_or_else(|| stack.mock.addr());
    let text = config_text(upstream, "", "").replace(PRICES_FILE, path.to_str().unwrap());
    let config = parse_config(&text, &stack.data_dir.path().join("data"));
    let gateway = Gateway::start(config, stack.shutdown.clone()).await.unwrap();
    let keys = seed(&gateway, "100", "1");
    Stack { books: BooksCheck::of(&gateway), gateway, keys, ..stack }
}

fn dec(value: &Value) -> Decimal {
    value.as_str().unwrap_or_else(|| panic!("{value} is not a decimal string")).parse().unwrap()
}

/// `nanos` nanodollars as a 9-place amount.
fn nanos(nanos: i64) -> Decimal {
    Decimal::new(nanos, 9)
}

/// The org's debit entries once there are `count`, as the ledger export shows them.
async fn debits(stack: &Stack, count: usize) -> Vec<Value> {
    let path = format!("/admin/v1/orgs/{}/ledger?kind=debit&limit=1000", stack.keys.org.0);
    for _ in 0..500 {
        let entries = admin_get(stack, &path).await["entries"].as_array().unwrap().clone();
        if entries.len() >= count {
            assert_eq!(entries.len(), count, "{entries:#?}");
            return entries;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{count} debits never reached the ledger");
}

/// The pool's balance once no hold is open, checking the balance identity.
async fn settled_pool(stack: &Stack) -> Decimal {
    let wallet = stack.gateway.ledger().resolve_key(&KeyHash::of_secret(&stack.keys.pro)).unwrap().wallet;
    for _ in 0..500 {
        let balance = stack.gateway.ledger().balance(wallet, chrono::Utc::now()).unwrap();
        if balance.open_holds == 0 {
            assert_eq!(
                balance.balance,
                balance.totals.balance(),
                "balance == granted - debited - written_off"
            );
            return balance.balance;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("a hold stayed open");
}

async fn post(stack: &Stack, path: &str, headers: &[(&str, &str)], body: &Value) -> Reply {
    let mut request = Request::post(stack.url(path))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {}", stack.keys.pro));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let reply = send(request.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply
}

/// The operator cost and customer price a debit entry shows, checking that
/// the price is what was debited.
fn cost_and_price(entry: &Value) -> (Decimal, Decimal) {
    let (cost, price) = (dec(&entry["kind"]["operator_cost"]), dec(&entry["kind"]["price"]));
    assert_eq!(-dec(&entry["amount"]), price, "the wallet is debited the customer's price: {entry}");
    (cost, price)
}

#[tokio::test]
async fn a_20_percent_markup_charges_exactly_cost_times_1_2_and_the_entry_shows_both() {
    let stack = start_priced(RESALE).await;
    let body =
        json!({"model": "mock-gpt", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]});
    let usage = r#"{"prompt_tokens": 1000, "completion_tokens": 50, "total_tokens": 1050}"#;
    let reply = post(&stack, "/v1/chat/completions", &[("x-mock-usage", usage)], &body).await;

    // The hold, and so the available balance reported, is the customer's: marked up.
    let table = stack.gateway.prices().unwrap().current();
    let price = table.model("mock-gpt", chrono::Utc::now()).unwrap();
    let request = HoldRequest { input_bytes: body.to_string().len() as u64, max_output_tokens: Some(50) };
    let held = price.hold_amount(&request).unwrap();
    assert_eq!(held, price.hold_cost(&request).unwrap() * Decimal::new(12, 1), "the hold is cost × 1.2");
    let available: Decimal = reply.header("x-creditgate-available").unwrap().parse().unwrap();
    assert_eq!(available, Decimal::from(100) - held, "the header reports what the customer can spend");

    // 1000 × $1/M + 50 × $2/M = $0.0011 to the operator; × 1.2 = $0.00132 to the customer.
    let balance = settled_pool(&stack).await;
    assert_eq!(Decimal::from(100) - balance, Decimal::new(132, 5), "charged exactly cost × 1.2");
    let entries = debits(&stack, 1).await;
    assert_eq!(cost_and_price(&entries[0]), (Decimal::new(11, 4), Decimal::new(132, 5)), "both in the entry");
    assert_eq!(
        entries[0]["kind"]["details"]["price_version"].as_str().unwrap().split('@').next(),
        Some("resale")
    );

    // The usage report sums both sides.
    let report =
        admin_get(&stack, &format!("/admin/v1/orgs/{}/usage?group_by=model", stack.keys.org.0)).await;
    assert_eq!(dec(&report["total"]["charged"]), Decimal::new(132, 5), "{report}");
    assert_eq!(dec(&report["total"]["operator_cost"]), Decimal::new(11, 4), "{report}");

    // The organization's own token sees what it was charged, never the
    // operator's cost (from which its markup and the provider's rates follow).
    assert_eq!(stack.keys.org.0, 1, "the org token's org");
    let org = stack.keys.org.0;
    for path in [
        format!("/admin/v1/orgs/{org}/ledger?kind=debit"),
        format!("/admin/v1/orgs/{org}/usage?group_by=model"),
        format!("/admin/v1/orgs/{org}/usage?group_by=model&format=csv"),
    ] {
        let request = Request::get(stack.admin_url(&path))
            .header("authorization", format!("Bearer {ORG_TOKEN}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let reply = send(request).await;
        let text = String::from_utf8_lossy(&reply.body);
        assert_eq!(reply.status, 200, "{path}: {text}");
        assert!(!text.contains("operator_cost"), "{path} shows the org the operator's cost: {text}");
        assert!(text.contains("0.00132"), "{path} shows what the org was charged: {text}");
    }
}

#[tokio::test]
async fn a_markup_beyond_nine_places_is_rounded_up_once_over_the_whole_call() {
    let stack = start_priced(RESALE).await;
    // mock-claude at 33.333%: 6 input tokens at $3/M (18,000 nanodollars) and
    // 19 output tokens at $15/M (285,000) cost 303,000 nanodollars; × 1.33333
    // = 403,998.99, rounded up once to 403,999. Rounding each part would give
    // ⌈23,999.94⌉ + ⌈379,999.05⌉ = 404,000.
    let body =
        json!({"model": "mock-claude", "max_tokens": 50, "messages": [{"role": "user", "content": "x"}]});
    let usage = r#"{"input_tokens": 6, "output_tokens": 19}"#;
    post(&stack, "/v1/messages", &[("x-mock-usage", usage)], &body).await;
    let balance = settled_pool(&stack).await;
    let (cost, price) = cost_and_price(&debits(&stack, 1).await[0]);
    assert_eq!(cost, nanos(303_000), "the operator's cost");
    assert_eq!(price, nanos(403_999), "303,000 × 1.33333 = 403,998.99 nanodollars, rounded up once");
    assert_eq!(Decimal::from(100) - balance, price, "the wallet paid the rounded price");
    let per_part = |cost: u64| (cost * 133_333).div_ceil(100_000);
    assert_eq!(per_part(18_000) + per_part(285_000), 404_000, "per-component rounding would charge more");
}

#[tokio::test]
async fn a_model_with_markup_zero_is_charged_its_cost() {
    let stack = start_priced(RESALE).await;
    let body = json!({"model": "mock-embed", "input": "some text"});
    let usage = r#"{"prompt_tokens": 1234, "total_tokens": 1234}"#;
    post(&stack, "/v1/embeddings", &[("x-mock-usage", usage)], &body).await;
    let (cost, price) = cost_and_price(&debits(&stack, 1).await[0]);
    assert_eq!(cost, Decimal::new(1234, 7), "1234 × $0.1/M");
    assert_eq!(price, cost, "markup_percent = \"0\" turns the table's 20% off for this model");
}

#[tokio::test]
async fn a_tool_fee_is_marked_up_by_the_tool_s_own_percent() {
    let stack = start_priced(RESALE).await;
    // 7 results: $0.005 + 7 × $0.001 = $0.012 to the operator; × 1.35 = $0.0162.
    post(&stack, "/v1/tools/web-search", &[], &json!({"query": "q", "num_results": 7})).await;
    let balance = settled_pool(&stack).await;
    let (cost, price) = cost_and_price(&debits(&stack, 1).await[0]);
    assert_eq!(cost, Decimal::new(12, 3));
    assert_eq!(price, Decimal::new(162, 4), "the tool's 35%, not the table's 20%");
    assert_eq!(Decimal::from(100) - balance, price);
}

#[tokio::test]
async fn a_streamed_request_is_charged_the_marked_up_price_of_its_streamed_usage() {
    let stack = start_priced(RESALE).await;
    let body = json!({"model": "mock-claude", "max_tokens": 40, "seed": 7, "stream": true,
                      "messages": [{"role": "user", "content": "stream me something"}]});
    let reply = post(&stack, "/v1/messages", &[], &body).await;
    assert!(String::from_utf8_lossy(&reply.body).contains("message_stop"), "a real stream");
    let balance = settled_pool(&stack).await;
    let usage = stack.mock.journal().last().unwrap().usage.unwrap();
    // Worked out here in integers: $3/M input is 3,000 nanodollars a token,
    // $15/M output 15,000; the 33.333% markup is × 133,333 / 100,000, up.
    let cost_nanos = 3_000 * usage.input_tokens + 15_000 * usage.output_tokens;
    let price_nanos = (cost_nanos * 133_333).div_ceil(100_000);
    assert_ne!(price_nanos * 100_000, cost_nanos * 133_333, "a price beyond nine places: {usage:?}");
    let (cost_nanos, price_nanos) = (i64::try_from(cost_nanos).unwrap(), i64::try_from(price_nanos).unwrap());
    let (cost, price) = cost_and_price(&debits(&stack, 1).await[0]);
    assert_eq!(cost, nanos(cost_nanos), "the streamed usage at the table's prices: {usage:?}");
    assert_eq!(price, nanos(price_nanos), "× 1.33333, rounded up once");
    assert_eq!(Decimal::from(100) - balance, price);
}

#[tokio::test]
async fn hosted_tool_calls_take_their_tool_s_markup_inside_the_call_s_single_rounding() {
    // A Responses call to mock-claude (33.333%) that runs 3 web searches
    // (web_search_call: $0.01 a call, 7.5% of its own), against an upstream
    // that reports its usage and tool calls like the real providers.
    let provider = common::provider::Provider::start().await;
    let prices =
        format!("{RESALE}\n[tools.\"web_search_call\"]\nper_call = \"0.01\"\nmarkup_percent = \"7.5\"\n");
    let stack = start_priced_at(&prices, Some(provider.addr())).await;
    let body = json!({"model": "mock-claude", "max_output_tokens": 50, "input": "news?",
                      "tools": [{"type": "web_search"}]});
    post(&stack, "/v1/responses", &[("x-provider-tool-calls", "3")], &body).await;
    let balance = settled_pool(&stack).await;
    let last = provider.last();
    assert_eq!(last.hosted_calls, 3);
    let tokens_nanos = 3_000 * last.input_tokens + 15_000 * last.output_tokens;
    let searches_nanos = 3 * 10_000_000;
    // Σ cost × (1 + percent/100), in hundred-thousandths, rounded up once.
    let price_nanos = (tokens_nanos * 133_333 + searches_nanos * 107_500).div_ceil(100_000);
    let (cost, price) = cost_and_price(&debits(&stack, 1).await[0]);
    let as_decimal = |nanos: u64| Decimal::new(i64::try_from(nanos).unwrap(), 9);
    assert_eq!(cost, as_decimal(tokens_nanos + searches_nanos), "tokens plus 3 searches at cost");
    assert_eq!(price, as_decimal(price_nanos), "each part at its own markup, rounded once");
    assert_eq!(Decimal::from(100) - balance, price);
}

#[tokio::test]
async fn entries_without_a_markup_show_cost_equal_to_price() {
    let stack = start().await;
    let body = json!({"model": "mock-gpt", "max_tokens": 20});
    post(&stack, "/v1/chat/completions", &[], &body).await;
    let (cost, price) = cost_and_price(&debits(&stack, 1).await[0]);
    assert!(price > Decimal::ZERO);
    assert_eq!(cost, price, "the example table sets no markup");
}

#[tokio::test]
async fn a_reload_with_a_changed_markup_is_a_new_version_and_prices_the_next_call() {
    let stack = start_priced(RESALE).await;
    let before = stack.gateway.prices().unwrap().current().version().clone();
    assert_eq!(admin_get(&stack, "/admin/v1/prices").await["markup_percent"], "20", "the API shows it");
    let usage = r#"{"prompt_tokens": 1000, "completion_tokens": 0, "total_tokens": 1000}"#;
    let body = json!({"model": "mock-gpt", "max_tokens": 5});
    post(&stack, "/v1/chat/completions", &[("x-mock-usage", usage)], &body).await;
    let path = stack.data_dir.path().join("prices.toml");
    std::fs::write(&path, RESALE.replace("percent = \"20\"", "percent = \"30\"")).unwrap();
    let reload = Request::post(stack.admin_url("/admin/v1/prices/reload"))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(reload).await.status, 200);
    let after = stack.gateway.prices().unwrap().current().version().clone();
    assert_eq!(after.label, before.label, "same label");
    assert_ne!(after, before, "only the markup changed, and it is a new version");
    assert_eq!(admin_get(&stack, "/admin/v1/prices").await["markup_percent"], "30");
    post(&stack, "/v1/chat/completions", &[("x-mock-usage", usage)], &body).await;
    let entries = debits(&stack, 2).await;
    let version = |entry: &Value| entry["kind"]["details"]["price_version"].as_str().unwrap().to_owned();
    assert_eq!((version(&entries[0]), version(&entries[1])), (before.to_string(), after.to_string()));
    assert_eq!(cost_and_price(&entries[0]), (Decimal::new(1, 3), Decimal::new(12, 4)), "× 1.2 before");
    assert_eq!(cost_and_price(&entries[1]), (Decimal::new(1, 3), Decimal::new(13, 4)), "× 1.3 after");
}

/// Runs the real binary.
fn creditgate(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .args(args)
        .env("MOCK_UPSTREAM_KEY", UPSTREAM_SECRET)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("ORG_TOKEN", ORG_TOKEN)
        .output()
        .unwrap()
}

#[test]
fn check_config_reports_every_bad_markup_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.toml");
    let bad = RESALE
        .replace("percent = \"20\"", "percent = \"-20\"")
        .replace("markup_percent = \"33.333\"", "markup_percent = \"33.33333\"")
        .replace("markup_percent = \"35\"", "markup_percent = \"2000\"");
    std::fs::write(&prices, bad).unwrap();
    let gateway = dir.path().join("gateway.toml");
    let text =
        config_text("127.0.0.1:9".parse().unwrap(), "", "").replace(PRICES_FILE, prices.to_str().unwrap());
    std::fs::write(&gateway, format!("{text}\n")).unwrap();
    let out = creditgate(&["check-config", "--config", gateway.to_str().unwrap()]);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{said}");
    for (line, part) in [
        (3, "percent = \"-20\": a markup cannot be negative"),
        (14, "markup_percent = \"33.33333\": 5 decimal places"),
        (24, "markup_percent = \"2000\": above 1000%"),
    ] {
        assert!(
            said.contains(&format!("prices.toml:{line}:")) && said.contains(part),
            "line {line}, {part}: {said}"
        );
    }
    std::fs::write(&prices, RESALE).unwrap();
    let good = creditgate(&["check-config", "--config", gateway.to_str().unwrap()]);
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
}

#[test]
fn prices_diff_reports_a_markup_change() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.toml");
    let new = dir.path().join("new.toml");
    std::fs::write(&old, RESALE).unwrap();
    std::fs::write(
        &new,
        RESALE.replace("percent = \"20\"", "percent = \"25\"").replace("\"33.333\"", "\"0\""),
    )
    .unwrap();
    let out = creditgate(&["prices", "diff", old.to_str().unwrap(), new.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "a change exits 1");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "table [markup]: percent 20 -> 25 (+25%)\nmodel mock-claude: markup_percent 33.333 -> 0 (-100%)\n"
    );
}
