//! The price table reloads live: on file change (in place or renamed over),
//! on SIGHUP and on the admin call; a broken file changes nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use creditgate::app::Gateway;
use creditgate::clock::ManualClock;
use http::Request;
use http_body_util::Full;
use tokio_util::sync::CancellationToken;

const TABLE_A: &str = r#"label = "A"
[models."mock-gpt"]
input_per_mtok = "1"
output_per_mtok = "2"
default_max_output_tokens = 100
[tools."web-search"]
per_call = "0.005"
"#;

/// Same models, new prices, and a second model that a truncated copy would lack.
const TABLE_B: &str = r#"label = "B"
[models."mock-gpt"]
input_per_mtok = "3"
output_per_mtok = "4"
default_max_output_tokens = 100
[tools."web-search"]
per_call = "0.007"
[models."mock-claude"]
input_per_mtok = "5"
output_per_mtok = "6"
default_max_output_tokens = 100
"#;

/// A gateway whose price file is a copy the test can rewrite.
async fn start_with_prices(text: &str) -> (Stack, std::path::PathBuf) {
    let stack = start().await;
    let prices = stack.data_dir.path().join("prices.toml");
    std::fs::write(&prices, text).unwrap();
    let config_text = config_text(stack.mock.addr(), "", "").replace(PRICES_FILE, prices.to_str().unwrap());
    let data = stack.data_dir.path().join("data");
    let config = parse_config(&config_text, &data);
    let gateway = Gateway::start(config, stack.shutdown.clone()).await.unwrap();
    let keys = seed(&gateway, "100", "1");
    (Stack { books: BooksCheck::of(&gateway), gateway, keys, ..stack }, prices)
}

async fn admin(stack: &Stack, method: http::Method, path: &str) -> Reply {
    let request = Request::builder()
        .method(method)
        .uri(stack.admin_url(path))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(request).await
}

async fn wait_for_label(stack: &Stack, label: &str) {
    let prices = stack.gateway.prices().unwrap();
    for _ in 0..200 {
        if prices.current().version().label == label {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("price table {label} never came into force; status: {:?}", prices.status(chrono::Utc::now()));
}

fn write_atomically(path: &Path, text: &str) {
    let temp = path.with_extension("toml.tmp");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

#[tokio::test]
async fn an_invalid_file_keeps_the_old_prices_and_reports_file_and_line() {
    let (stack, path) = start_with_prices(TABLE_A).await;
    std::fs::write(
        &path,
        "label = \"broken\"\n[models.\"mock-gpt\"]\ninput_per_mtok = \"-1\"\n[tools.\"web-search\"]\nbogus = 1\n",
    )
    .unwrap();
    let reply = admin(&stack, http::Method::POST, "/admin/v1/prices/reload").await;
    assert_eq!(reply.status, 422, "{:?}", reply.body);
    let body = reply.json();
    let problems = body["error"]["problems"].as_array().unwrap();
    let text = format!("{problems:?}");
    assert!(text.contains("prices.toml:3:"), "negative price at line 3: {text}");
    assert!(text.contains("prices.toml:5:") && text.contains("bogus"), "unknown key at line 5: {text}");
    assert_eq!(body["error"]["active_version"].as_str().unwrap().split('@').next(), Some("A"));

    let status = admin(&stack, http::Method::GET, "/admin/v1/prices").await.json();
    assert_eq!(status["label"], "A", "old table still in force");
    assert!(status["last_reload_error"].as_str().unwrap().contains("prices.toml:3"), "{status}");
    assert_eq!(stack.gateway.prices().unwrap().current().version().label, "A");

    // The watcher sees the broken file too, and still keeps A.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stack.gateway.prices().unwrap().current().version().label, "A");
    let metrics =
        send(Request::get(stack.admin_url("/metrics")).body(Full::new(Bytes::new())).unwrap()).await;
    let metrics = String::from_utf8_lossy(&metrics.body);
    assert!(metrics.contains("creditgate_price_reloads_total{result=\"failed\"}"), "{metrics}");
    assert!(metrics.contains("creditgate_price_table_active{version=\"A@"), "{metrics}");
    // The failure stays visible while the broken file does (a counter's
    // increase would have cleared), and clears once a good one loads.
    let failing = |metrics: &str| {
        metrics.lines().find(|l| l.starts_with("creditgate_price_reload_failing ")).map(str::to_owned)
    };
    assert_eq!(failing(&metrics).as_deref(), Some("creditgate_price_reload_failing 1"), "{metrics}");
    write_atomically(&path, TABLE_B);
    wait_for_label(&stack, "B").await;
    // The table comes into force a moment before the reload's status is
    // written: poll for it.
    for _ in 0..200 {
        let metrics =
            send(Request::get(stack.admin_url("/metrics")).body(Full::new(Bytes::new())).unwrap()).await;
        let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
        if failing(&metrics).as_deref() == Some("creditgate_price_reload_failing 0") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the failure never cleared after a good file loaded");
}

#[tokio::test]
async fn admin_reload_needs_the_operator_token() {
    let (stack, _) = start_with_prices(TABLE_A).await;
    let request = Request::post(stack.admin_url("/admin/v1/prices/reload"))
        .header("authorization", "Bearer wrong")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(request).await.status, 401);
    let ok = admin(&stack, http::Method::POST, "/admin/v1/prices/reload").await;
    assert_eq!(ok.status, 200);
}

#[tokio::test]
async fn file_changes_are_picked_up_in_place_and_by_rename() {
    let (stack, path) = start_with_prices(TABLE_A).await;
    std::fs::write(&path, TABLE_B).unwrap();
    wait_for_label(&stack, "B").await;
    write_atomically(&path, TABLE_A);
    wait_for_label(&stack, "A").await;
    let status = stack.gateway.prices().unwrap().status(chrono::Utc::now());
    assert!(status.reloads_ok >= 2, "{status:?}");
}

#[tokio::test]
async fn sighup_reloads() {
    let (stack, path) = start_with_prices(TABLE_A).await;
    // Write without changing the fingerprint the watcher would see soon
    // enough; SIGHUP must reload at once regardless.
    write_atomically(&path, TABLE_B);
    let pid = std::process::id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    wait_for_label(&stack, "B").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_traffic_never_expose_a_half_written_table() {
    let (stack, path) = start_with_prices(TABLE_A).await;
    let prices = stack.gateway.prices().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Readers check every table they see is whole: A, or B with both models.
    let reader = {
        let prices = prices.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                let table = prices.current();
                let label = table.version().label.clone();
                let now = chrono::Utc::now();
                assert!(table.model("mock-gpt", now).is_some(), "table {label} lacks mock-gpt");
                if label == "B" {
                    assert!(table.model("mock-claude", now).is_some(), "a truncated B was put in force");
                }
                assert!(label == "A" || label == "B", "unexpected table {label}");
                seen.insert(label);
                tokio::task::yield_now().await;
            }
            seen
        })
    };
    // Priced traffic keeps flowing through the gateway meanwhile.
    const BODY: &str = r#"{"model":"mock-gpt","max_tokens":20}"#;
    let traffic = {
        let url = stack.url("/v1/chat/completions");
        let key = stack.keys.pro.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) {
                let reply = post_json(&url, &key, &serde_json::from_str(BODY).unwrap()).await;
                assert_eq!(reply.status, 200, "no request fails during reloads: {:?}", reply.body);
                sent += 1;
            }
            sent
        })
    };
    // Rewrite in place in two halves with a short pause, as a slow editor would.
    for round in 0..6 {
        let text = if round % 2 == 0 { TABLE_B } else { TABLE_A };
        let (first, second) = text.split_at(text.len() / 2);
        let mut file = std::fs::File::create(&path).unwrap();
        std::io::Write::write_all(&mut file, first.as_bytes()).unwrap();
        file.sync_all().unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
        std::io::Write::write_all(&mut file, second.as_bytes()).unwrap();
        drop(file);
        wait_for_label(&stack, if round % 2 == 0 { "B" } else { "A" }).await;
    }
    stop.store(true, Ordering::Relaxed);
    let seen = reader.await.unwrap();
    let sent = traffic.await.unwrap();
    assert_eq!(seen.len(), 2, "both tables were seen: {seen:?}");
    assert!(sent > 10, "traffic flowed during reloads: {sent}");
    // Every request was priced by a whole table, A or B, at that table's prices.
    let body_len =
        serde_json::to_vec(&serde_json::from_str::<serde_json::Value>(BODY).unwrap()).unwrap().len() as u64;
    let (input, output) = (body_len.div_ceil(4), 10u64);
    let price = |i: u64, o: u64| {
        rust_decimal::Decimal::from(input * i + output * o) / rust_decimal::Decimal::from(1_000_000u64)
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let debits: Vec<_> = stack
        .gateway
        .ledger_entries(0, 1_000_000)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.kind {
            creditgate::ledger::entry::EntryKind::Debit(d) => {
                Some((d.details.price_version.to_string(), -e.amount))
            }
            _ => None,
        })
        .collect();
    assert_eq!(debits.len(), sent, "every request was settled once");
    for (version, amount) in &debits {
        match version.split('@').next() {
            Some("A") => assert_eq!(*amount, price(1, 2), "{version}"),
            Some("B") => assert_eq!(*amount, price(3, 4), "{version}"),
            other => panic!("priced from an unexpected table {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_scheduled_price_switch_happens_at_the_injected_instant() {
    let mock = creditgate::mock::MockUpstream::start("127.0.0.1:0".parse().unwrap(), Default::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(mock.addr(), "", ""), dir.path());
    // The example file moves mock-gpt from 1/2 to 1.5/3 per Mtok at 2031-01-01.
    let switch: chrono::DateTime<chrono::Utc> = "2031-01-01T00:00:00Z".parse().unwrap();
    let clock = ManualClock::new(switch - chrono::TimeDelta::nanoseconds(1));
    let gateway = Gateway::start_with_clock(config, clock.clone(), CancellationToken::new()).await.unwrap();
    let table = gateway.prices().unwrap().current();
    use creditgate::clock::Clock;
    let before = table.model("mock-gpt", clock.now()).unwrap();
    clock.advance(chrono::TimeDelta::nanoseconds(1));
    let after = table.model("mock-gpt", clock.now()).unwrap();
    assert_eq!(before.input_per_mtok().to_string(), "1");
    assert_eq!(after.input_per_mtok().to_string(), "1.5");
    assert_eq!(after.output_per_mtok().to_string(), "3");

    // Through the gateway: a call before the switch and one after it are
    // priced by the gateway's clock, not the machine's (which is before both).
    clock.set(switch - chrono::TimeDelta::seconds(1));
    // Seeded at the gateway's time: a contract begun in the machine's year
    // would have run out by then.
    let spec = creditgate::demo::SeedSpec {
        org_name: "test-org".into(),
        pool: "100".parse().unwrap(),
        lite_allowance: "1".parse().unwrap(),
    };
    let keys = creditgate::demo::seed_org(&gateway.ledger(), &spec, clock.now()).unwrap();
    let url = format!("http://{}/v1/chat/completions", gateway.proxy_addr());
    let body = serde_json::json!({"model": "mock-gpt", "max_tokens": 20, "seed": 4});
    assert_eq!(post_json(&url, &keys.pro, &body).await.status, 200);
    clock.set(switch);
    assert_eq!(post_json(&url, &keys.pro, &body).await.status, 200);
    let debits = loop {
        let entries = gateway.ledger_entries(0, usize::MAX).unwrap();
        let debits: Vec<_> = entries
            .into_iter()
            .filter_map(|entry| match entry.kind {
                creditgate::ledger::entry::EntryKind::Debit(debit) => {
                    Some((-entry.amount, debit.details.usage))
                }
                _ => None,
            })
            .collect();
        if debits.len() == 2 {
            break debits;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // The same call, so the same usage: 1/2 per Mtok, then 1.5/3, plus the call fee.
    assert_eq!(debits[0].1, debits[1].1);
    let usage = &debits[0].1;
    let (input, output) =
        (rust_decimal::Decimal::from(usage.input_tokens), rust_decimal::Decimal::from(usage.output_tokens));
    // The per-call fee, priced by each table entry with no tokens.
    let (fee_before, fee_after) =
        (before.cost(&Default::default()).unwrap(), after.cost(&Default::default()).unwrap());
    let mtok = rust_decimal::Decimal::from(1_000_000u64);
    assert_eq!(
        debits[0].0,
        (input + output * rust_decimal::Decimal::TWO) / mtok + fee_before,
        "before the switch"
    );
    assert_eq!(
        debits[1].0,
        (input * rust_decimal::Decimal::new(15, 1) + output * rust_decimal::Decimal::from(3u64)) / mtok
            + fee_after,
        "after the switch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_settled_with_the_table_it_was_held_with() {
    use creditgate::ledger::entry::EntryKind;
    let (stack, path) = start_with_prices(TABLE_A).await;
    let body = r#"{"model":"mock-gpt","max_tokens":30,"seed":2}"#;
    let call = |latency: &'static str| {
        let url = stack.url("/v1/chat/completions");
        let key = stack.keys.pro.clone();
        async move {
            let request = Request::post(url)
                .header("authorization", format!("Bearer {key}"))
                .header("x-mock-latency-ms", latency)
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            send(request).await
        }
    };
    // A slow call is held under A; B comes into force while it is upstream.
    let slow = tokio::spawn(call("2500"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stack.gateway.ledger().open_holds() == 0 {
        assert!(std::time::Instant::now() < deadline, "the slow call was never held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    write_atomically(&path, TABLE_B);
    assert_eq!(admin(&stack, http::Method::POST, "/admin/v1/prices/reload").await.status, 200);
    assert_eq!(stack.gateway.ledger().open_holds(), 1, "B came into force while the slow call was upstream");
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(call("0").await.status, 200);

    let input = (body.len() as u64).div_ceil(4);
    // The mock answers min(max_tokens, 10 + seed % 41) = min(30, 12) tokens.
    let output = 12u64;
    let at = |input_price: u64, output_price: u64| {
        rust_decimal::Decimal::from(input * input_price + output * output_price)
            / rust_decimal::Decimal::from(1_000_000u64)
    };
    let mut debits = Vec::new();
    for _ in 0..200 {
        debits = stack
            .gateway
            .ledger_entries(0, 10_000)
            .unwrap()
            .into_iter()
            .filter_map(|e| match e.kind {
                EntryKind::Debit(d) => Some((d.details.price_version.to_string(), -e.amount)),
                _ => None,
            })
            .collect();
        if debits.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(debits.len(), 2, "{debits:?}");
    assert!(debits[0].0.starts_with("A@"), "the slow call settles under A: {debits:?}");
    assert_eq!(debits[0].1, at(1, 2), "priced at A");
    assert!(debits[1].0.starts_with("B@"), "the next call is held under B: {debits:?}");
    assert_eq!(debits[1].1, at(3, 4), "priced at B");
}

/// Freshness: the table's `as_of` shows in the admin API as a date and an
/// age in days by the gateway's clock, and as a metric; `check-config`
/// warns when it is older than `[pricing] max_age_days`, and a bad date is
/// refused with its line.
#[tokio::test]
async fn the_price_tables_age_shows_in_the_api_the_metrics_and_check_config() {
    let mock = creditgate::mock::MockUpstream::start("127.0.0.1:0".parse().unwrap(), Default::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.toml");
    std::fs::write(&prices, TABLE_A.replace("label = \"A\"", "label = \"A\"\nas_of = \"2026-05-01\""))
        .unwrap();
    let text = config_text(mock.addr(), "", "").replace(PRICES_FILE, prices.to_str().unwrap());
    let config = parse_config(&text, &dir.path().join("data"));
    let clock = ManualClock::new("2026-06-15T12:00:00Z".parse().unwrap());
    let gateway = Gateway::start_with_clock(config, clock, CancellationToken::new()).await.unwrap();
    let request = |path: &str| {
        Request::builder()
            .uri(format!("http://{}{path}", gateway.admin_addr()))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let status = send(request("/admin/v1/prices")).await;
    assert_eq!(status.status, 200);
    let body: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
    assert_eq!(body["as_of"], "2026-05-01");
    assert_eq!(body["age_days"], 45);
    let metrics = String::from_utf8(send(request("/metrics")).await.body.to_vec()).unwrap();
    // 2026-05-01T00:00:00Z
    assert!(
        metrics.lines().any(|line| line == "creditgate_price_table_as_of_seconds 1777593600"),
        "{metrics}"
    );

    // check-config, on the wall clock: a table checked 400 days ago is stale
    // under the default 30 days, one checked today is not.
    let today = chrono::Utc::now().date_naive();
    let check = |as_of: chrono::NaiveDate| {
        std::fs::write(
            &prices,
            TABLE_A.replace("label = \"A\"", &format!("label = \"A\"\nas_of = \"{as_of}\"")),
        )
        .unwrap();
        let gateway_toml = dir.path().join("gateway.toml");
        std::fs::write(&gateway_toml, &text).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_creditgate"))
            .args(["check-config", "--config", gateway_toml.to_str().unwrap()])
            .env("MOCK_UPSTREAM_KEY", UPSTREAM_SECRET)
            .env("ORG_TOKEN", ORG_TOKEN)
            .output()
            .unwrap()
    };
    let stale = check(today - chrono::Days::new(400));
    assert!(stale.status.success(), "{}", String::from_utf8_lossy(&stale.stderr));
    let stdout = String::from_utf8_lossy(&stale.stdout);
    assert!(stdout.contains("are 400 days old (more than [pricing] max_age_days = 30)"), "{stdout}");
    let fresh = check(today);
    assert!(fresh.status.success());
    assert!(!String::from_utf8_lossy(&fresh.stdout).contains("warning"));

    let bad = creditgate::pricing::PriceTable::parse(
        "p.toml",
        &TABLE_A.replace("label = \"A\"", "label = \"A\"\nas_of = \"2026-13-01\""),
    );
    let message = bad.unwrap_err().to_string();
    assert!(message.starts_with("p.toml:2:9: as_of = \"2026-13-01\""), "{message}");
}

/// A tool priced per unit on a route that counts no units (no
/// `units_header`) would be charged 0 units a call: served free where it
/// has no `per_call`. Such a table is refused at start and at reload, where
/// the table in force keeps billing.
#[tokio::test]
async fn a_price_per_unit_on_a_route_that_counts_no_units_is_refused() {
    let stack = start().await;
    let prices = stack.data_dir.path().join("prices.toml");
    let per_call = format!("{TABLE_A}[tools.lookup]\nper_call = \"0.001\"\n");
    let per_unit = format!("{TABLE_A}[tools.lookup]\nper_unit = \"0.001\"\nunit = \"rows\"\n")
        .replace("label = \"A\"", "label = \"per-unit\"");
    let route = "\n[[routes]]\nprefix = \"/v1/tools/lookup\"\nupstream = \"mock-tools\"\ntool = \"lookup\"\n";
    let config_text =
        config_text(stack.mock.addr(), "", "").replace(PRICES_FILE, prices.to_str().unwrap()) + route;
    let data = stack.data_dir.path().join("data");

    std::fs::write(&prices, &per_unit).unwrap();
    let refused = Gateway::start(parse_config(&config_text, &data), CancellationToken::new()).await;
    let error = format!("{:#}", refused.err().expect("a table that prices uncounted units started"));
    assert!(error.contains("units_header") && error.contains("lookup"), "{error}");

    std::fs::write(&prices, &per_call).unwrap();
    let gateway = Gateway::start(parse_config(&config_text, &data), stack.shutdown.clone()).await.unwrap();
    let keys = seed(&gateway, "100", "1");
    let stack = Stack { books: BooksCheck::of(&gateway), gateway, keys, ..stack };
    write_atomically(&prices, &per_unit);
    let reply = admin(&stack, http::Method::POST, "/admin/v1/prices/reload").await;
    assert_eq!(reply.status, 422, "{:?}", reply.body);
    let body = String::from_utf8_lossy(&reply.body);
    assert!(body.contains("units_header") && body.contains("lookup"), "{body}");
    assert_eq!(stack.gateway.prices().unwrap().current().version().label, "A");
    // The same table, on a route that counts units, loads.
    std::fs::write(&prices, &per_unit).unwrap();
    let counted =
        config_text.replace("tool = \"lookup\"\n", "tool = \"lookup\"\nunits_header = \"x-usage-units\"\n");
    let data = stack.data_dir.path().join("data-counted");
    let shutdown = CancellationToken::new();
    let counting = Gateway::start(parse_config(&counted, &data), shutdown.clone()).await.unwrap();
    assert_eq!(counting.prices().unwrap().current().version().label, "per-unit");
    shutdown.cancel();
    counting.wait_stopped().await;
}
