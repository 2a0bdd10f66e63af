//! The dashboard in a real browser: Debian's headless Chromium, driven over
//! WebDriver, against a real gateway and mock upstream over TCP. Proves
//! that what the pages show is what the admin API says, that the pages'
//! writes (a key, a purchase) land in the books exactly, that an org token
//! cannot open another org's pages, and that no page logs a console error.
//! Screenshots of every page at 1280 and 390 px go to
//! `target/dashboard-screenshots/`.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{TimeDelta, Utc};
use common::webdriver::{Driver, Session, WAIT};
use common::{admin_get, post_json, send, Stack, ADMIN_TOKEN, ORG_TOKEN};
use creditgate::clock::ManualClock;
use http::Request;
use http_body_util::Full;
use rust_decimal::Decimal;
use serde_json::{json, Value};

const WIDE: (u32, u32) = (1280, 1400);
const NARROW: (u32, u32) = (390, 1400);

fn dec(value: &Value) -> Decimal {
    value.as_str().unwrap_or_else(|| panic!("not a decimal string: {value}")).parse().unwrap()
}

fn pool_balance(balances: &Value) -> Decimal {
    let pool = balances["balances"].as_array().unwrap().iter().find(|b| b["wallet"].get("pool").is_some());
    dec(&pool.expect("no pool wallet")["balance"])
}

/// The exact amount a money span on the page carries (`data-exact`).
async fn exact(session: &Session, css: &str) -> Decimal {
    session.wait_for(css).await;
    let script = "const e = document.querySelector(arguments[0]); return e && e.dataset.exact;";
    dec(&session.script(script, json!([css])).await)
}

/// Opens a dashboard route and waits for `ready` (a selector only that page
/// has) on a fresh render: the page on screen is marked stale first, and a
/// unique `view` parameter makes even the same route render again.
async fn open(session: &Session, stack: &Stack, route: &str, ready: &str) {
    static VIEWS: AtomicU64 = AtomicU64::new(0);
    let view = VIEWS.fetch_add(1, Ordering::Relaxed);
    session
        .script(
            "const page = document.getElementById('page'); if (page) page.dataset.ready = 'stale';",
            json!([]),
        )
        .await;
    let separator = if route.contains('?') { '&' } else { '?' };
    session.goto(&stack.admin_url(&format!("/ui/{route}{separator}view={view}"))).await;
    session.wait_for(&format!("#page:not([data-ready='stale']) {ready}")).await;
}

async fn sign_in(session: &Session, stack: &Stack, token: &str) {
    session.goto(&stack.admin_url("/ui/")).await;
    let field = session.wait_for("#token").await;
    session.type_text(&field, token).await;
    let submit = session.wait_for("#sign-in-form button[type=submit]").await;
    session.click(&submit).await;
    session.wait_for("#nav a").await;
}

async fn sign_out(session: &Session) {
    let button = session.wait_for("#sign-out").await;
    session.click(&button).await;
    session.wait_for("#sign-in:not([hidden])").await;
}

/// A chat call through the proxy with `key`; must be served.
async fn chat(stack: &Stack, key: &str, model: &str, max_tokens: u32) {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": max_tokens});
    let reply = post_json(&stack.url("/v1/chat/completions"), key, &body).await;
    assert_eq!(reply.status, 200, "{model}: {:?}", reply.body);
}

/// Waits until the org's ledger holds `count` debits (they are written after the last byte).
async fn wait_for_debits(stack: &Stack, org: u64, count: usize) {
    let started = Instant::now();
    loop {
        let page = admin_get(stack, &format!("/admin/v1/orgs/{org}/ledger?kind=debit&limit=1000")).await;
        if page["entries"].as_array().unwrap().len() >= count {
            return;
        }
        assert!(started.elapsed() < WAIT, "{count} debits were not recorded in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Caps the seeded app key at a tiny daily spend, so its next call is a 402.
async fn limit_the_app_key(stack: &Stack, org: u64) {
    let keys = admin_get(stack, &format!("/admin/v1/orgs/{org}/keys")).await;
    let app = keys["keys"].as_array().unwrap().iter().find(|k| k["label"] == "app").expect("the app key");
    let request = Request::put(stack.admin_url(&format!("/admin/v1/orgs/{org}/keys/{}/limits", app["id"])))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::new(Bytes::from(json!({"daily": "0.000001"}).to_string())))
        .unwrap();
    let reply = send(request).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
}

fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"), PathBuf::from);
    target.join("dashboard-screenshots")
}

/// Every console entry at level SEVERE (errors), to fail on.
fn errors(entries: &[Value]) -> Vec<Value> {
    entries.iter().filter(|e| e["level"] == "SEVERE").cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_books_as_the_api_does() {
    // The gateway's clock starts five days back, so the usage has several days.
    let days = 5;
    let clock = ManualClock::new(Utc::now() - TimeDelta::days(days));
    let stack = common::start_with_clock(clock.clone()).await;
    let org = stack.keys.org.0;
    // A second organization, which the org token must not reach.
    let other = send(
        Request::post(stack.admin_url("/admin/v1/orgs"))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Full::new(Bytes::from(json!({"name": "other-org", "time_zone": "Asia/Tokyo"}).to_string())))
            .unwrap(),
    )
    .await;
    assert_eq!(other.status, 201, "{:?}", other.body);
    let other_id = other.json()["id"].as_u64().unwrap();

    let driver = Driver::start().await;
    let session = driver.session(WIDE.0, WIDE.1).await;
    let mut console = Vec::new();

    // Sign in with the org token: the overview's balance is the API's.
    sign_in(&session, &stack, ORG_TOKEN).await;
    open(&session, &stack, &format!("#/org/{org}/overview"), "#pool-balance").await;
    let api_balance = pool_balance(&admin_get(&stack, &format!("/admin/v1/orgs/{org}/balances")).await);
    assert_eq!(exact(&session, "#pool-balance [data-exact]").await, api_balance, "overview balance");

    // Bursts of calls on two models over several days, and one 402 (a key
    // over its daily limit): each day's bar totals the usage report's day.
    for day in 0..days {
        clock.set(Utc::now() - TimeDelta::days(days - day));
        for i in 0..(2 + day) {
            let model = if i % 2 == 0 { "mock-gpt" } else { "mock-claude" };
            chat(&stack, &stack.keys.pro, model, 40 + u32::try_from(i).unwrap()).await;
        }
    }
    clock.set(Utc::now());
    chat(&stack, &stack.keys.app, "mock-gpt", 40).await;
    // End users named as a client may name them (the chart keeps its groups
    // in a Map: in a plain object "__proto__" was lost and "constructor"
    // summed into a string).
    for end_user in ["__proto__", "constructor"] {
        let request = Request::post(stack.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {}", stack.keys.app))
            .header("x-creditgate-end-user", end_user)
            .body(Full::new(Bytes::from(json!({"model": "mock-gpt", "max_tokens": 40}).to_string())))
            .unwrap();
        assert_eq!(send(request).await.status, 200, "{end_user}");
    }
    let debits = (0..days).map(|day| 2 + day as usize).sum::<usize>() + 3;
    wait_for_debits(&stack, org, debits).await;
    limit_the_app_key(&stack, org).await;
    let body =
        json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40});
    let refused = post_json(&stack.url("/v1/chat/completions"), &stack.keys.app, &body).await;
    assert_eq!(refused.status, 402, "{:?}", refused.body);
    open(&session, &stack, &format!("#/org/{org}/overview"), "tr[data-reason='spend_limit_reached']").await;

    open(&session, &stack, &format!("#/org/{org}/usage?group=model"), "#usage-chart").await;
    // The CSV download defuses cells a spreadsheet would run (an end user's id is the client's).
    let cells = session
        .script(
            "return ['=HYPERLINK(\"x\")', '+1', '@SUM(A1)', '-2+3', '\\tx', '0.001', '-0.5', 'a,b'].map(csvField);",
            json!([]),
        )
        .await;
    assert_eq!(
        cells,
        json!([
            "\"'=HYPERLINK(\"\"x\"\")\"",
            "'+1",
            "'@SUM(A1)",
            "'-2+3",
            "'\tx",
            "0.001",
            "-0.5",
            "\"a,b\""
        ])
    );
    let bars = session
        .script(
            "return [...document.querySelectorAll('#usage-chart g.bar')].map(g => ({day: g.dataset.day, \
             total: g.dataset.total, parts: [...g.querySelectorAll('rect')].map(r => r.dataset.amount)}));",
            json!([]),
        )
        .await;
    let report = admin_get(&stack, &format!("/admin/v1/orgs/{org}/usage?group_by=day")).await;
    let by_day: BTreeMap<String, Decimal> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| (row["day"].as_str().unwrap().to_owned(), dec(&row["charged"])))
        .collect();
    let mut charted = BTreeMap::new();
    for bar in bars.as_array().unwrap() {
        let parts: Vec<Decimal> = bar["parts"].as_array().unwrap().iter().map(dec).collect();
        if parts.is_empty() {
            continue;
        }
        let sum: Decimal = parts.iter().sum();
        assert_eq!(sum, dec(&bar["total"]), "a bar's parts add up to its total");
        charted.insert(bar["day"].as_str().unwrap().to_owned(), sum);
    }
    assert_eq!(charted, by_day, "bars per day equal the usage report");
    assert!(by_day.len() >= usize::try_from(days).unwrap(), "calls on {days} days or more: {by_day:?}");
    let stacked = admin_get(&stack, &format!("/admin/v1/orgs/{org}/usage?group_by=day,model")).await;
    let rects =
        session.script("return document.querySelectorAll('#usage-chart rect').length;", json!([])).await;
    assert_eq!(rects, stacked["rows"].as_array().unwrap().len(), "one stacked part per day and model");
    let total = admin_get(&stack, &format!("/admin/v1/orgs/{org}/usage?group_by=model")).await;
    assert_eq!(
        exact(&session, "#usage-total [data-exact]").await,
        dec(&total["total"]["charged"]),
        "table total"
    );

    // By end user: every client-named group is in the legend, in a colour,
    // and no id passes for the calls with no end user.
    open(&session, &stack, &format!("#/org/{org}/usage?group=end_user"), "#usage-chart").await;
    let legend = session
        .script("return [...document.querySelectorAll('.legend span')].map(s => s.textContent);", json!([]))
        .await;
    for name in ["__proto__", "constructor", "\u{2014} none \u{2014}"] {
        assert!(legend.as_array().unwrap().iter().any(|shown| shown == name), "{name} in {legend}");
    }
    let uncoloured =
        session.script("return document.querySelectorAll('#usage-chart rect.c-1').length;", json!([])).await;
    assert_eq!(uncoloured, 0, "every part has its group's colour");

    // Create a key in the page, use it through the proxy, find its debit in the ledger page.
    open(&session, &stack, &format!("#/org/{org}/keys"), "#create-key").await;
    let label = session.wait_for("#key-label").await;
    session.type_text(&label, "made-in-the-ui").await;
    let create = session.wait_for("#create-key button[type=submit]").await;
    session.click(&create).await;
    let secret = session.wait_for("#new-secret").await;
    let secret = session.text(&secret).await;
    assert!(secret.starts_with("cg_"), "the secret is shown once: {secret:?}");
    let key_box = session.wait_for(".secret[data-key]").await;
    let key_id: u64 = session.attribute(&key_box, "data-key").await.unwrap().parse().unwrap();
    chat(&stack, &secret, "mock-gpt", 30).await;
    wait_for_debits(&stack, org, debits + 1).await;
    let ledger = admin_get(&stack, &format!("/admin/v1/orgs/{org}/ledger?kind=debit&key={key_id}")).await;
    let entry = &ledger["entries"][0];
    let row = format!("tr[data-entry='{}'][data-key='{key_id}']", entry["id"]);
    open(&session, &stack, &format!("#/org/{org}/ledger?key={key_id}&kind=debit"), &row).await;
    assert_eq!(
        exact(&session, &format!("{row} [data-exact]")).await,
        dec(&entry["amount"]),
        "the debit shown"
    );

    // Another org's pages are not there for this token, and the API agrees.
    open(&session, &stack, &format!("#/org/{other_id}/overview"), "#not-found").await;
    let refused = send(
        Request::get(stack.admin_url(&format!("/admin/v1/orgs/{other_id}/balances")))
            .header("authorization", format!("Bearer {ORG_TOKEN}"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(refused.status, 404, "the API hides other orgs from an org token");
    console.extend(session.console().await);

    // As the operator: a purchase through the page raises the balance by exactly its amount.
    sign_out(&session).await;
    sign_in(&session, &stack, ADMIN_TOKEN).await;
    open(&session, &stack, &format!("#/org/{org}/purchases"), "#purchase-form").await;
    let before = pool_balance(&admin_get(&stack, &format!("/admin/v1/orgs/{org}/balances")).await);
    let amount: Decimal = "12.345678901".parse().unwrap();
    let field = session.wait_for("#purchase-amount").await;
    session.type_text(&field, &amount.to_string()).await;
    let buy = session.wait_for("#purchase-submit").await;
    session.click(&buy).await;
    let shown = exact(&session, "#new-balance [data-exact]").await;
    let after = pool_balance(&admin_get(&stack, &format!("/admin/v1/orgs/{org}/balances")).await);
    assert_eq!(after - before, amount, "the purchase added exactly its amount");
    assert_eq!(shown, after, "the page shows the new balance");

    // Every page at both widths, as the operator (who sees them all).
    let dir = screenshot_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let pages = [
        ("orgs", "#/orgs".to_owned(), "tr[data-org]"),
        ("overview", format!("#/org/{org}/overview"), "#pool-balance"),
        ("usage", format!("#/org/{org}/usage"), "#usage-chart"),
        ("ledger", format!("#/org/{org}/ledger"), "tr[data-entry]"),
        ("keys", format!("#/org/{org}/keys"), "#create-key"),
        ("purchases", format!("#/org/{org}/purchases"), "#purchase-form"),
        ("prices", "#/prices".to_owned(), "#price-version"),
    ];
    for (width, height) in [WIDE, NARROW] {
        session.resize(width, height).await;
        for (name, route, ready) in &pages {
            open(&session, &stack, route, ready).await;
            session.script("return document.fonts.ready.then(() => true);", json!([])).await;
            let png = session.screenshot().await;
            assert!(png.starts_with(b"\x89PNG"), "{name} screenshot is a PNG");
            std::fs::write(dir.join(format!("{name}-{width}.png")), png).unwrap();
        }
    }

    console.extend(session.console().await);
    assert!(errors(&console).is_empty(), "console errors: {:#?}", errors(&console));
    session.quit().await;
}
