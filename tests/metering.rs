//! Every priced request is held, settled exactly from the mock's usage, or
//! refused with 402 — through a real gateway, mock upstream and sled store.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use creditgate::ledger::entity::KeyHash;
use creditgate::ledger::ids::WalletId;
use http::Request;
use http_body_util::Full;
use rust_decimal::Decimal;

fn dec(text: &str) -> Decimal {
    text.parse().unwrap()
}

/// The mock's documented usage rules, computed here on their own.
fn mock_input_tokens(body: &str) -> u64 {
    (body.len() as u64).div_ceil(4).max(1)
}

fn mock_output_tokens(max_tokens: u64, seed: u64) -> u64 {
    max_tokens.min(10 + seed % 41)
}

/// Cost from config/prices.toml, rounded up to 1e-9 as the price file says.
fn cost(input: u64, output: u64, input_per_mtok: &str, output_per_mtok: &str, fee: &str) -> Decimal {
    let million = Decimal::from(1_000_000u64);
    let exact = Decimal::from(input) * dec(input_per_mtok) / million
        + Decimal::from(output) * dec(output_per_mtok) / million
        + dec(fee);
    exact.round_dp_with_strategy(9, rust_decimal::RoundingStrategy::AwayFromZero)
}

fn wallet_of(stack: &Stack, key: &str) -> WalletId {
    stack.gateway.ledger().resolve_key(&KeyHash::of_secret(key)).unwrap().wallet
}

/// The wallet's balance, after checking the books balance.
fn balance(stack: &Stack, wallet: WalletId) -> Decimal {
    let b = stack.gateway.ledger().balance(wallet, chrono::Utc::now()).unwrap();
    assert_eq!(b.balance, b.totals.balance(), "balance == granted - debited - written_off for {wallet:?}");
    assert_eq!(b.open_holds, 0, "no hold is left open");
    b.balance
}

async fn post_raw(stack: &Stack, path: &str, key: &str, body: &str) -> Reply {
    let request = Request::post(stack.url(path))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    send(request).await
}

#[tokio::test]
async fn each_flavour_is_charged_exactly() {
    let stack = start().await;
    let pool = wallet_of(&stack, &stack.keys.pro);
    let key = stack.keys.pro.clone();
    let cases: Vec<(&str, String, Decimal)> = {
        let chat =
            r#"{"model":"mock-gpt","messages":[{"role":"user","content":"hello"}],"max_tokens":30,"seed":7}"#;
        let embed = r#"{"model":"mock-embed","input":"some text to embed"}"#;
        let responses = r#"{"model":"mock-gpt","input":"hi","max_output_tokens":12,"seed":3}"#;
        let messages = r#"{"model":"mock-claude","max_tokens":25,"seed":40,"messages":[]}"#;
        vec![
            (
                "/v1/chat/completions",
                chat.into(),
                cost(mock_input_tokens(chat), mock_output_tokens(30, 7), "1", "2", "0.0001"),
            ),
            ("/v1/embeddings", embed.into(), cost(mock_input_tokens(embed), 0, "0.1", "0", "0")),
            (
                "/v1/responses",
                responses.into(),
                cost(mock_input_tokens(responses), mock_output_tokens(12, 3), "1", "2", "0.0001"),
            ),
            (
                "/v1/messages",
                messages.into(),
                cost(mock_input_tokens(messages), mock_output_tokens(25, 40), "3", "15", "0"),
            ),
        ]
    };
    for (path, body, expected) in cases {
        let before = balance(&stack, pool);
        let reply = post_raw(&stack, path, &key, &body).await;
        assert_eq!(reply.status, 200, "{path}: {:?}", reply.body);
        assert!(reply.header("x-creditgate-available").is_some(), "{path}: available header");
        assert_eq!(before - balance(&stack, pool), expected, "{path} charged exactly");
    }
    // Tool: per call plus per unit reported in the header.
    let before = balance(&stack, pool);
    let reply = post_raw(&stack, "/v1/tools/web-search", &key, r#"{"query":"rust","num_results":7}"#).await;
    assert_eq!(reply.status, 200);
    assert_eq!(before - balance(&stack, pool), dec("0.005") + dec("0.001") * Decimal::from(7));
}

#[tokio::test]
async fn streams_are_charged_and_reach_the_client_as_a_direct_call_would() {
    let stack = start().await;
    let pool = wallet_of(&stack, &stack.keys.pro);
    for (body, label) in [
        (r#"{"model":"mock-gpt","stream":true,"max_tokens":6,"seed":1}"#, "without client usage"),
        (
            r#"{"model":"mock-gpt","stream":true,"max_tokens":6,"seed":1,"stream_options":{"include_usage":true}}"#,
            "with client usage",
        ),
        // OpenAI reads a null as absent (before, the gateway refused it as
        // not a JSON object when it added its own).
        (
            r#"{"model":"mock-gpt","stream":true,"max_tokens":6,"seed":1,"stream_options":null}"#,
            "with null options",
        ),
    ] {
        let direct = {
            let request = Request::post(format!("http://{}/v1/chat/completions", stack.mock.addr()))
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            send(request).await
        };
        let before = balance(&stack, pool);
        let reply = post_raw(&stack, "/v1/chat/completions", &stack.keys.pro, body).await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            String::from_utf8_lossy(&reply.body),
            String::from_utf8_lossy(&direct.body),
            "{label}: client bytes identical to a direct call"
        );
        let upstream_saw = stack.mock.journal().last().unwrap();
        let expected =
            cost(upstream_saw.usage.unwrap().input_tokens, mock_output_tokens(6, 1), "1", "2", "0.0001");
        assert_eq!(before - balance(&stack, pool), expected, "{label}: charged from the stream's usage");
    }
    // Anthropic stream: usage from message_start and message_delta.
    let body = r#"{"model":"mock-claude","stream":true,"max_tokens":9}"#;
    let before = balance(&stack, pool);
    let reply = post_raw(&stack, "/v1/messages", &stack.keys.pro, body).await;
    assert!(String::from_utf8_lossy(&reply.body).contains("message_stop"));
    assert_eq!(before - balance(&stack, pool), cost(mock_input_tokens(body), 9, "3", "15", "0"));
}

#[tokio::test]
async fn an_empty_lite_wallet_gets_402_while_the_pool_still_pays() {
    let stack = start().await;
    let keys = seed(&stack.gateway, "100", "0.002");
    // Each call costs ~$0.00018 and holds ~$0.00043: the $0.002 allowance
    // runs dry within a dozen calls.
    let body = r#"{"model":"mock-claude","max_tokens":20}"#;
    let pool = wallet_of(&stack, &keys.pro);
    let pool_before = balance(&stack, pool);
    let mut refused = None;
    let mut served = 0;
    for _ in 0..30 {
        let reply = post_raw(&stack, "/v1/messages", &keys.lite, body).await;
        if reply.status == 402 {
            refused = Some(reply);
            break;
        }
        assert_eq!(reply.status, 200);
        served += 1;
    }
    let refused = refused.expect("the Lite wallet never ran dry");
    assert_eq!(stack.mock.journal().entries().len(), served, "the refused call was never forwarded");
    assert_eq!(balance(&stack, pool), pool_before, "Lite spending never touches the pool");
    let error = &refused.json()["error"];
    assert_eq!(error["type"], "insufficient_credits");
    assert_eq!(error["wallet"], "lite");
    assert!(error["resets_at"].as_str().unwrap().contains("-01T00:00:00"), "resets on the 1st: {error}");
    assert!(dec(error["required"].as_str().unwrap()) > dec(error["available"].as_str().unwrap()));
    assert!(refused.header("x-creditgate-available").is_some());
    // The pool still serves a Pro user.
    let reply = post_raw(&stack, "/v1/messages", &keys.pro, body).await;
    assert_eq!(reply.status, 200);
    assert_eq!(stack.mock.journal().entries().len(), served + 1);
    assert!(balance(&stack, wallet_of(&stack, &keys.lite)) >= Decimal::ZERO);
    assert!(balance(&stack, pool) < pool_before, "the pool paid the Pro call");
}

#[tokio::test]
async fn bad_requests_are_refused_and_charge_nothing() {
    let stack = start().await;
    let pool = wallet_of(&stack, &stack.keys.pro);
    let before = balance(&stack, pool);
    let cases = [
        (stack.keys.pro.as_str(), r#"{"model":"no-such-model"}"#, 400, "model_not_priced"),
        (stack.keys.pro.as_str(), r#"{"model": "mock-gpt", "#, 400, "invalid_json"),
        (stack.keys.pro.as_str(), r#"{"messages":[]}"#, 400, "missing_model"),
        (stack.keys.pro.as_str(), r#"{"model":"mock-gpt","max_tokens":-5}"#, 400, "invalid_field"),
        (stack.keys.pro.as_str(), r#"{"model":"mock-gpt","stream":"yes"}"#, 400, "invalid_field"),
        ("cg_unknown_key", r#"{"model":"mock-gpt"}"#, 401, "invalid_api_key"),
    ];
    for (key, body, status, code) in cases {
        let reply = post_raw(&stack, "/v1/chat/completions", key, body).await;
        assert_eq!(reply.status, status, "{body}");
        assert_eq!(reply.json()["error"]["code"], code, "{body}");
    }
    let no_key =
        send(Request::post(stack.url("/v1/chat/completions")).body(Full::new(Bytes::from("{}"))).unwrap())
            .await;
    assert_eq!(no_key.status, 401);
    assert_eq!(no_key.json()["error"]["code"], "missing_api_key");
    assert!(stack.mock.journal().entries().is_empty(), "nothing was forwarded");
    assert_eq!(balance(&stack, pool), before, "nothing was charged");
}

#[tokio::test]
async fn upstream_errors_charge_nothing_but_an_edge_timeout_is_charged_the_hold() {
    let stack = start().await;
    let pool = wallet_of(&stack, &stack.keys.pro);
    let before = balance(&stack, pool);
    let request = Request::post(stack.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {}", stack.keys.pro))
        .header("x-mock-status", "500")
        .body(Full::new(Bytes::from(r#"{"model":"mock-gpt"}"#)))
        .unwrap();
    let reply = send(request).await;
    assert_eq!(reply.status, 500);
    assert_eq!(balance(&stack, pool), before, "an upstream 500 costs nothing");

    // 524: the edge in front of the upstream stopped waiting for an origin
    // that had the call, which runs on and is billed. Before, it cost nothing.
    let request = Request::post(stack.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {}", stack.keys.pro))
        .header("x-mock-status", "524")
        .body(Full::new(Bytes::from(SMALL_CALL)))
        .unwrap();
    assert_eq!(send(request).await.status, 524);
    let hold = cost(SMALL_CALL.len() as u64, 20, "1", "2", "0.0001");
    assert_eq!(before - balance(&stack, pool), hold, "a 524 is charged the hold");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_a_nearly_empty_wallet_never_overdraw() {
    let stack = start().await;
    let keys = seed(&stack.gateway, "0.01", "0");
    let pool = wallet_of(&stack, &keys.pro);
    let body = r#"{"model":"mock-gpt","max_tokens":100}"#; // hold ~ $0.0003
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let url = stack.url("/v1/chat/completions");
            let key = keys.pro.clone();
            tokio::spawn(
                async move { post_json(&url, &key, &serde_json::from_str(body).unwrap()).await.status },
            )
        })
        .collect();
    let mut ok = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap().as_u16() {
            200 => ok += 1,
            402 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    let left = balance(&stack, pool);
    assert!(left >= Decimal::ZERO, "the wallet was overdrawn: {left}");
    assert!(ok > 0 && refused > 0, "some calls were served ({ok}) and some refused ({refused})");
    let per_call = cost(mock_input_tokens(body), mock_output_tokens(100, 0), "1", "2", "0.0001");
    assert_eq!(dec("0.01") - left, per_call * Decimal::from(ok), "every served call was charged once");
}

#[tokio::test]
async fn ledger_verify_passes_after_traffic_and_a_restart_keeps_the_books() {
    let stack = start().await;
    let pool = wallet_of(&stack, &stack.keys.pro);
    for seed in 0..5 {
        let body = format!(r#"{{"model":"mock-gpt","max_tokens":40,"seed":{seed}}}"#);
        assert_eq!(post_raw(&stack, "/v1/chat/completions", &stack.keys.pro, &body).await.status, 200);
    }
    let before = balance(&stack, pool);
    let data_dir = stack.data_dir.path().to_owned();
    stack.shutdown.cancel();
    stack.gateway.wait().await;
    stack.mock.stop().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .args(["ledger", "verify", "--data-dir"])
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Reopen the same directory: the balance survives the restart.
    let mock = creditgate::mock::MockUpstream::start("127.0.0.1:0".parse().unwrap(), Default::default())
        .await
        .unwrap();
    let config = parse_config(&config_text(mock.addr(), "", ""), &data_dir);
    let gateway =
        creditgate::app::Gateway::start(config, tokio_util::sync::CancellationToken::new()).await.unwrap();
    let after = gateway.ledger().balance(pool, chrono::Utc::now()).unwrap();
    assert_eq!(after.balance, before, "restart rebuilt the same balance from sled");
    assert_eq!(after.balance, after.totals.balance());
}

use creditgate::ledger::entry::EntryKind;
use creditgate::ledger::ids::Owner;
use creditgate::ledger::limit::Limits;

fn resolved(stack: &Stack, key: &str) -> creditgate::ledger::ResolvedKey {
    stack.gateway.ledger().resolve_key(&KeyHash::of_secret(key)).unwrap()
}

const SMALL_CALL: &str = r#"{"model":"mock-gpt","max_tokens":20}"#;

#[tokio::test]
async fn a_revoked_key_gets_401() {
    let stack = start().await;
    assert_eq!(post_raw(&stack, "/v1/chat/completions", &stack.keys.pro, SMALL_CALL).await.status, 200);
    let key = resolved(&stack, &stack.keys.pro);
    stack.gateway.ledger().revoke_key(key.org, key.key).unwrap();
    let reply = post_raw(&stack, "/v1/chat/completions", &stack.keys.pro, SMALL_CALL).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json()["error"]["code"], "invalid_api_key");
}

#[tokio::test]
async fn a_key_limit_refuses_with_402_and_names_the_limit_while_other_keys_go_on() {
    let stack = start().await;
    let key = resolved(&stack, &stack.keys.pro);
    let limits = Limits { daily: Some(dec("0.001")), ..Limits::default() };
    stack.gateway.ledger().set_key_limits(key.org, key.key, limits).unwrap();
    let mut refused = None;
    for _ in 0..20 {
        let reply = post_raw(&stack, "/v1/chat/completions", &stack.keys.pro, SMALL_CALL).await;
        if reply.status == 402 {
            refused = Some(reply);
            break;
        }
        assert_eq!(reply.status, 200);
    }
    let refused = refused.expect("the daily key limit never applied");
    let error = &refused.json()["error"];
    assert_eq!(error["type"], "spend_limit_reached", "{error}");
    assert_eq!(error["limit"]["subject"], "key");
    assert_eq!(error["limit"]["period"], "day");
    assert_eq!(error["limit"]["cap"], "0.001");
    assert!(error["resets_at"].as_str().unwrap().ends_with("T00:00:00Z"), "resets at midnight: {error}");
    // The pool still has money: the app's key is not limited.
    assert_eq!(post_raw(&stack, "/v1/chat/completions", &stack.keys.app, SMALL_CALL).await.status, 200);
    balance(&stack, key.wallet);
}

#[tokio::test]
async fn a_user_limit_covers_all_of_the_users_keys() {
    let stack = start().await;
    let key = resolved(&stack, &stack.keys.pro);
    let Owner::User(user) = key.owner else { panic!("the pro key belongs to a user") };
    let limits = Limits { monthly: Some(dec("0.0005")), ..Limits::default() };
    stack.gateway.ledger().set_user_limits(key.org, user, limits).unwrap();
    // A second key of the same user, with no limits of its own.
    let second = "sk-second-key-of-the-pro-user-0123456789";
    let new = creditgate::ledger::NewKey {
        owner: Owner::User(user),
        hash: KeyHash::of_secret(second),
        label: "second".into(),
        limits: Limits::default(),
    };
    stack.gateway.ledger().create_key(key.org, new, chrono::Utc::now()).unwrap();
    // Spent with the first key until the user's limit refuses it…
    let mut refused = None;
    for _ in 0..10 {
        let reply = post_raw(&stack, "/v1/chat/completions", &stack.keys.pro, SMALL_CALL).await;
        if reply.status == 402 {
            refused = Some(reply);
            break;
        }
        assert_eq!(reply.status, 200);
    }
    let refused = refused.expect("the monthly user limit never applied");
    assert_eq!(refused.json()["error"]["limit"]["subject"], "user");
    assert_eq!(refused.json()["error"]["limit"]["period"], "month");
    // …and the user's other key is refused too: the limit is the user's, not a key's.
    let other = post_raw(&stack, "/v1/chat/completions", second, SMALL_CALL).await;
    assert_eq!(other.status, 402, "{}", String::from_utf8_lossy(&other.body));
    assert_eq!(other.json()["error"]["limit"]["subject"], "user");
    // The pool itself still pays: the app's key is not this user's.
    assert_eq!(post_raw(&stack, "/v1/chat/completions", &stack.keys.app, SMALL_CALL).await.status, 200);
}

#[tokio::test]
async fn an_app_key_records_its_end_user_on_the_debit() {
    let stack = start().await;
    let request = Request::post(stack.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {}", stack.keys.app))
        .header("x-creditgate-end-user", "customer-42")
        .body(Full::new(Bytes::from(SMALL_CALL)))
        .unwrap();
    let reply = send(request).await;
    assert_eq!(reply.status, 200);
    let request_id = reply.header("x-request-id").unwrap().to_owned();
    let debit = wait_for_debit(&stack).await;
    let EntryKind::Debit(debit) = debit.kind else { unreachable!() };
    assert_eq!(debit.end_user.as_deref(), Some("customer-42"));
    assert!(matches!(debit.owner, Owner::App(_)), "{:?}", debit.owner);
    assert_eq!(
        debit.request_id.0.simple().to_string(),
        request_id,
        "the ledger names the request id the client saw"
    );
    assert_eq!(&*debit.details.model, "mock-gpt");
    assert_eq!(&*debit.details.route, "/v1/chat/completions");
    assert!(
        debit.details.price_version.starts_with(&format!("{}@", "2025-11")),
        "{}",
        debit.details.price_version
    );
    assert_eq!(debit.details.usage.output_tokens, mock_output_tokens(20, 0));
}

async fn wait_for_debit(stack: &Stack) -> creditgate::ledger::entry::LedgerEntry {
    for _ in 0..200 {
        let entries = stack.gateway.ledger_entries(0, 10_000).unwrap();
        if let Some(debit) = entries.into_iter().find(|e| matches!(e.kind, EntryKind::Debit(_))) {
            return debit;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no debit entry reached the store");
}

#[tokio::test]
async fn requests_over_the_per_key_rate_get_429_and_cost_nothing() {
    let stack = start_edited(|text| format!("{text}\n[traffic]\nrequests_per_minute = 3\n")).await;
    let pool = wallet_of(&stack, &stack.keys.pro);
    let before = balance(&stack, pool);
    for _ in 0..3 {
        assert_eq!(post_raw(&stack, "/v1/chat/completions", &stack.keys.pro, SMALL_CALL).await.status, 200);
    }
    let spent_on_three = before - balance(&stack, pool);
    let reply = post_raw(&stack, "/v1/chat/completions", &stack.keys.pro, SMALL_CALL).await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.json()["error"]["code"], "traffic_cap");
    assert_eq!(reply.json()["error"]["cap"], "requests_per_minute");
    assert!(reply.header("retry-after").is_some());
    assert_eq!(stack.mock.journal().entries().len(), 3, "the fourth call was not forwarded");
    assert_eq!(before - balance(&stack, pool), spent_on_three, "nothing held or charged for the 429");
    // Another key has its own budget.
    assert_eq!(post_raw(&stack, "/v1/chat/completions", &stack.keys.app, SMALL_CALL).await.status, 200);
}

#[tokio::test]
async fn a_key_over_its_in_flight_cap_gets_429_until_a_request_ends() {
    let stack = start_edited(|text| format!("{text}\n[traffic]\nmax_in_flight = 1\n")).await;
    let slow = {
        let url = stack.url("/v1/chat/completions");
        let key = stack.keys.pro.clone();
        tokio::spawn(async move {
            let request = Request::post(url)
                .header("authorization", format!("Bearer {key}"))
                .header("x-mock-latency-ms", "2500")
                .body(Full::new(Bytes::from(SMALL_CALL)))
                .unwrap();
            send(request).await.status
        })
    };
    // Once the first is held (admitted), while the upstream keeps it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while stack.gateway.ledger().open_holds() == 0 {
        assert!(std::time::Instant::now() < deadline, "the first call was never held");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let reply = post_raw(&stack, "/v1/chat/completions", &stack.keys.pro, SMALL_CALL).await;
    assert_eq!(reply.status, 429, "a second request while one is open");
    assert_eq!(reply.json()["error"]["cap"], "max_in_flight");
    assert_eq!(slow.await.unwrap(), 200);
    assert_eq!(post_raw(&stack, "/v1/chat/completions", &stack.keys.pro, SMALL_CALL).await.status, 200);
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_charged_the_usage_the_upstream_reports() {
    // The gateway reads on after the client left, so the bill is the upstream's usage, not an
    // estimate of the part the client saw.
    let stack = start().await;
    let pool = wallet_of(&stack, &stack.keys.pro);
    let before = balance(&stack, pool);
    // 40 tokens, one event each, 30 ms apart: ~1.2 s in all.
    let body = r#"{"model":"mock-gpt","stream":true,"max_tokens":40,"seed":30}"#;
    let full_cost = cost(mock_input_tokens(body), 40, "1", "2", "0.0001");
    let hold = {
        let bytes = body.len() as u64;
        Decimal::from(bytes) / Decimal::from(1_000_000u64)
            + Decimal::from(40u64 * 2) / Decimal::from(1_000_000u64)
            + dec("0.0001")
    };
    {
        let mut sender = open_h1(stack.gateway.proxy_addr()).await;
        let request = Request::post(stack.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {}", stack.keys.pro))
            .header("x-mock-pace-ms", "30")
            .body(creditgate::mock::MockBody::Full(Some(Bytes::from(body))))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let mut stream = response.into_body();
        for _ in 0..5 {
            next_chunk(&mut stream).await.unwrap();
        }
        // Dropping the body and the connection: the client is gone.
    }
    let mut charged = Decimal::ZERO;
    for _ in 0..200 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        let b = stack.gateway.ledger().balance(pool, chrono::Utc::now()).unwrap();
        if b.open_holds == 0 {
            charged = before - b.balance;
            break;
        }
    }
    let reported = stack.mock.journal().entries().last().and_then(|e| e.usage).unwrap();
    let reported_cost = cost(reported.input_tokens, reported.output_tokens, "1", "2", "0.0001");
    assert_eq!(reported.output_tokens, 40, "the upstream wrote the whole stream");
    assert_eq!(charged, reported_cost, "charged the reported usage");
    assert!(charged > full_cost - dec("0.0001"), "far more than the 5 events the client saw");
    assert!(charged <= hold, "within the hold");
    balance(&stack, pool);
}

#[tokio::test]
async fn a_success_without_usage_is_charged_at_the_hold_and_counted() {
    let stack = start().await;
    let pool = wallet_of(&stack, &stack.keys.pro);
    let before = balance(&stack, pool);
    let request = Request::post(stack.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {}", stack.keys.pro))
        .header("x-mock-omit-usage", "1")
        .body(Full::new(Bytes::from(SMALL_CALL)))
        .unwrap();
    assert_eq!(send(request).await.status, 200);
    // Hold: 1 token per request byte at $1/M, 20 output tokens at $2/M, the fee.
    let hold = cost(SMALL_CALL.len() as u64, 20, "1", "2", "0.0001");
    assert_eq!(before - balance(&stack, pool), hold, "charged exactly the hold");
    let metrics =
        send(Request::get(stack.admin_url("/metrics")).body(Full::new(Bytes::new())).unwrap()).await;
    let metrics = String::from_utf8_lossy(&metrics.body);
    assert!(
        metrics.lines().any(|line| line == "creditgate_settles_total{result=\"debited_no_usage\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_drained_pool_refuses_pro_users_and_apps_but_not_lite_users() {
    let stack = start().await;
    let keys = seed(&stack.gateway, "0.002", "1");
    let mut drained = false;
    for _ in 0..40 {
        let reply = post_raw(&stack, "/v1/chat/completions", &keys.pro, SMALL_CALL).await;
        if reply.status == 402 {
            assert_eq!(reply.json()["error"]["wallet"], "org");
            drained = true;
            break;
        }
        assert_eq!(reply.status, 200);
    }
    assert!(drained, "the pool never ran dry");
    let app = post_raw(&stack, "/v1/chat/completions", &keys.app, SMALL_CALL).await;
    assert_eq!(app.status, 402, "the app draws on the same empty pool");
    assert_eq!(app.json()["error"]["type"], "insufficient_credits");
    let lite = post_raw(&stack, "/v1/chat/completions", &keys.lite, SMALL_CALL).await;
    assert_eq!(lite.status, 200, "the Lite wallet is separate from the pool");
    assert!(balance(&stack, wallet_of(&stack, &keys.pro)) >= Decimal::ZERO);
    balance(&stack, wallet_of(&stack, &keys.lite));
}

#[tokio::test]
async fn metrics_count_charges_refusals_and_ledger_latency_with_bounded_labels() {
    let stack = start().await;
    let keys = seed(&stack.gateway, "0.001", "0");
    let pool = wallet_of(&stack, &keys.pro);
    let mut refused = 0;
    for _ in 0..10 {
        match post_raw(&stack, "/v1/chat/completions", &keys.pro, SMALL_CALL).await.status.as_u16() {
            200 => {}
            402 => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert!(refused > 0);
    let charged = dec("0.001") - balance(&stack, pool);
    let metrics =
        send(Request::get(stack.admin_url("/metrics")).body(Full::new(Bytes::new())).unwrap()).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let nanodollars = (charged * Decimal::from(1_000_000_000u64)).normalize().to_string();
    assert!(
        text.lines()
            .any(|line| line
                == format!("creditgate_charged_nanodollars_total{{item=\"mock-gpt\"}} {nanodollars}")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|line| line
                == format!("creditgate_refusals_total{{reason=\"insufficient_credits\"}} {refused}")),
        "{text}"
    );
    assert!(
        text.lines().any(|line| line == "creditgate_hold_seconds_count 10"),
        "every hold attempt is timed: {text}"
    );
    assert!(text.lines().any(|line| line == "creditgate_open_holds 0"), "no hold left open: {text}");
    let flushes: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("creditgate_store_flushes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(flushes > 0, "the store has flushed: {text}");
    for gauge in ["creditgate_history_records_handed_over ", "creditgate_history_records_read_back "] {
        assert!(text.contains(gauge), "the checkpoint historian's intake is exported: {text}");
    }
    for gauge in ["creditgate_store_records_written_late ", "creditgate_store_sequence_gaps_open "] {
        assert!(text.contains(gauge), "the writer's late records are exported: {text}");
    }
    // Nothing failed, stalled or was left unbilled here, and each says so.
    for healthy in [
        "creditgate_store_failures 0",
        "creditgate_history_failing 0",
        "creditgate_price_reload_failing 0",
        "creditgate_holds_voided 0",
    ] {
        assert!(text.lines().any(|line| line == healthy), "{healthy}: {text}");
    }
    for gauge in ["creditgate_store_appends_waited ", "creditgate_history_checkpoint_seq "] {
        assert!(text.contains(gauge), "{gauge}: {text}");
    }
    assert!(!text.contains(&keys.pro) && !text.contains("org="), "no keys or org ids in labels");
}

#[tokio::test]
async fn without_write_through_requests_are_charged_in_memory_and_nothing_is_stored() {
    let stack =
        start_edited(|text| format!("{text}\n[ledger]\nwrite_through = false\nhold_ttl_ms = 5000\n")).await;
    let pool = wallet_of(&stack, &stack.keys.pro);
    let before = balance(&stack, pool);
    let chat =
        r#"{"model":"mock-gpt","messages":[{"role":"user","content":"hello"}],"max_tokens":30,"seed":7}"#;
    let reply = post_raw(&stack, "/v1/chat/completions", &stack.keys.pro, chat).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let expected = cost(mock_input_tokens(chat), mock_output_tokens(30, 7), "1", "2", "0.0001");
    assert_eq!(before - balance(&stack, pool), expected, "charged exactly, in memory");
    let error = stack.gateway.ledger_entries(0, 100).unwrap_err().to_string();
    assert!(error.contains("write_through = false"), "the export says why it is empty: {error}");
    assert!(
        !stack.data_dir.path().join("ledger").exists(),
        "no sled directory is created when write-through is off"
    );
}

#[tokio::test]
async fn an_expiry_on_a_wallet_nobody_touches_is_booked_when_it_falls_due() {
    // Before, only a request or a balance read on the wallet made its write-offs and
    // grants: an idle pool's expired credit was booked weeks late, or never.
    let now = chrono::Utc::now();
    let clock = creditgate::clock::ManualClock::new(now);
    let stack = start_with_clock(clock.clone()).await;
    let org = stack.keys.org;
    let short = creditgate::ledger::PurchaseRequest {
        org,
        amount: dec("5"),
        expires_at: Some(now + chrono::TimeDelta::hours(1)),
        reference: None,
        idempotency_key: "short".into(),
    };
    let pool = wallet_of(&stack, &stack.keys.pro);
    let before = stack.gateway.ledger().balance(pool, now).unwrap();
    stack.gateway.ledger().purchase(short, now).unwrap();
    clock.advance(chrono::TimeDelta::hours(2));
    // No request and no balance read: the listing reads the books as they are.
    let path = format!("/admin/v1/orgs/{}/ledger?kind=write_off", org.0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let entry = loop {
        let listed = admin_get(&stack, &path).await;
        if let Some(entry) = listed["entries"].as_array().and_then(|entries| entries.first().cloned()) {
            break entry;
        }
        assert!(std::time::Instant::now() < deadline, "the expired purchase was never written off");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(dec(entry["amount"].as_str().unwrap()).abs(), dec("5"), "{entry}");
    // Booked on the wallet, not only listed: the 5 came and went.
    let after = stack.gateway.ledger().balance(pool, creditgate::clock::Clock::now(&*clock)).unwrap();
    assert_eq!(after.balance, before.balance, "{after:?}");
    assert_eq!(after.totals.written_off - before.totals.written_off, dec("5"));
    assert_eq!(after.totals.granted - before.totals.granted, dec("5"));
    assert_eq!(after.balance, after.totals.balance());
}
