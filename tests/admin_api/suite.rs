//! The admin API suite: every resource, idempotent money writes, paging,
//! usage reports as JSON and CSV, strict bodies, and org isolation for
//! org-scoped tokens. Run twice: by `tests/admin_api.rs` against a single
//! node and by `tests/admin_api_cluster.rs` against a cluster replica; each
//! gives it its own `common` harness (`start`, `start_with_clock`,
//! `start_edited`).

use super::common::*;
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use rust_decimal::Decimal;
use serde_json::{json, Value};

async fn call(
    stack: &Stack,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
    extra: &[(&str, &str)],
) -> Reply {
    let mut request = Request::builder()
        .method(method)
        .uri(stack.admin_url(path))
        .header("authorization", format!("Bearer {token}"));
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    send(request.body(Full::new(Bytes::from(body))).unwrap()).await
}

fn dec(value: &Value) -> Decimal {
    value.as_str().unwrap_or_else(|| panic!("not a decimal string: {value}")).parse().unwrap()
}

/// Creates org "B" with a contract, a Pro and a Lite user, an app and keys.
async fn org_b(stack: &Stack) -> (u64, Value) {
    let today = chrono::Utc::now().date_naive().to_string();
    let org = call(stack, ADMIN_TOKEN, Method::POST, "/admin/v1/orgs", Some(json!({
        "name": "org-b", "time_zone": "Europe/Berlin",
        "contract": {"start": today, "years": 1, "platform_allocation_per_year": "50", "pro_seats": 2, "seat_allocation_per_year": "5"}
    })), &[]).await;
    assert_eq!(org.status, 201, "{:?}", org.body);
    let id = org.json()["id"].as_u64().unwrap();
    let base = format!("/admin/v1/orgs/{id}");
    let pro = call(
        stack,
        ADMIN_TOKEN,
        Method::POST,
        &format!("{base}/users"),
        Some(json!({"name": "pat", "plan": "pro"})),
        &[],
    )
    .await;
    assert_eq!(pro.status, 201, "{:?}", pro.body);
    let lite = call(
        stack,
        ADMIN_TOKEN,
        Method::POST,
        &format!("{base}/users"),
        Some(json!({"name": "lee", "plan": "lite", "lite_monthly_allowance": "3"})),
        &[],
    )
    .await;
    assert_eq!(lite.status, 201, "{:?}", lite.body);
    let app =
        call(stack, ADMIN_TOKEN, Method::POST, &format!("{base}/apps"), Some(json!({"name": "widget"})), &[])
            .await;
    assert_eq!(app.status, 201, "{:?}", app.body);
    let key = call(
        stack,
        ADMIN_TOKEN,
        Method::POST,
        &format!("{base}/keys"),
        Some(json!({"user": pro.json()["id"], "label": "pat's key"})),
        &[],
    )
    .await;
    assert_eq!(key.status, 201, "{:?}", key.body);
    let ids = json!({
        "pro": pro.json()["id"], "lite": lite.json()["id"], "app": app.json()["id"],
        "key": key.json()["id"], "secret": key.json()["secret"],
    });
    (id, ids)
}

#[tokio::test]
async fn an_operator_sets_up_an_org_whose_keys_are_charged_through_the_proxy() {
    let stack = start().await;
    let (org, ids) = org_b(&stack).await;
    let base = format!("/admin/v1/orgs/{org}");
    let secret = ids["secret"].as_str().unwrap();
    assert!(secret.starts_with("cg_"), "the secret is shown once at creation");

    let keys = call(&stack, ADMIN_TOKEN, Method::GET, &format!("{base}/keys"), None, &[]).await;
    let listed = keys.body.clone();
    assert!(!String::from_utf8_lossy(&listed).contains(secret), "lists never show the secret");
    assert!(!String::from_utf8_lossy(&listed).contains("hash"), "nor its hash");

    let balances =
        call(&stack, ADMIN_TOKEN, Method::GET, &format!("{base}/balances"), None, &[]).await.json();
    let pool = &balances["balances"][0];
    assert_eq!(dec(&pool["balance"]), Decimal::from(60), "platform 50 + 2 seats x 5");
    assert_eq!(dec(&balances["balances"][1]["balance"]), Decimal::from(3), "the Lite user's allowance");

    let reply =
        post_json(&stack.url("/v1/chat/completions"), secret, &json!({"model": "mock-gpt", "max_tokens": 5}))
            .await;
    assert_eq!(reply.status, 200);
    // A single node shows the debit at once; a cluster once the replica
    // shipped it and the treasurer posted it (a few tens of milliseconds).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let after =
            call(&stack, ADMIN_TOKEN, Method::GET, &format!("{base}/balances"), None, &[]).await.json();
        if dec(&after["balances"][0]["balance"]) < Decimal::from(60) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the call was charged to org B's pool");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    // Revoke: the key stops working at once.
    let revoked =
        call(&stack, ADMIN_TOKEN, Method::POST, &format!("{base}/keys/{}/revoke", ids["key"]), None, &[])
            .await;
    assert_eq!(revoked.status, 200);
    assert_eq!(revoked.json()["revoked"], true);
    let reply = post_json(&stack.url("/v1/chat/completions"), secret, &json!({"model": "mock-gpt"})).await;
    assert_eq!(reply.status, 401);

    // A patch with one bad part records none of it.
    let user_path = format!("{base}/users/{}", ids["lite"]);
    let lite_user = || async {
        let users = call(&stack, ADMIN_TOKEN, Method::GET, &format!("{base}/users"), None, &[]).await.json();
        let listed = users["users"].as_array().cloned().unwrap_or_default();
        listed.into_iter().find(|user| user["id"] == json!(ids["lite"])).unwrap()
    };
    let before = lite_user().await;
    let bad = call(
        &stack,
        ADMIN_TOKEN,
        Method::PATCH,
        &user_path,
        Some(json!({"lite_monthly_allowance": "50", "limits": {"daily": "-1"}})),
        &[],
    )
    .await;
    assert_eq!(bad.status, 422, "{:?}", bad.body);
    let after = lite_user().await;
    assert!(before["lite_monthly_allowance"].is_string(), "{before:?}");
    assert_eq!(after, before, "the allowance was not changed by the refused patch");

    // Upgrade the Lite user to Pro: its Lite remainder is written off.
    let patched = call(
        &stack,
        ADMIN_TOKEN,
        Method::PATCH,
        &format!("{base}/users/{}", ids["lite"]),
        Some(json!({"plan": "pro"})),
        &[],
    )
    .await;
    assert_eq!(patched.status, 200, "{:?}", patched.body);
    assert_eq!(patched.json()["plan"], "pro");
    let write_offs =
        call(&stack, ADMIN_TOKEN, Method::GET, &format!("{base}/ledger?kind=write_off"), None, &[]).await;
    assert_eq!(write_offs.json()["entries"].as_array().unwrap().len(), 1, "{:?}", write_offs.body);

    // Renewal adds a term.
    let next_year = (chrono::Utc::now().date_naive() + chrono::Months::new(12)).to_string();
    let renewed = call(
        &stack,
        ADMIN_TOKEN,
        Method::POST,
        &format!("{base}/contracts"),
        Some(json!({"start": next_year, "years": 1, "platform_allocation_per_year": "70"})),
        &[],
    )
    .await;
    assert_eq!(renewed.status, 201, "{:?}", renewed.body);
    assert_eq!(renewed.json()["contracts"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn purchases_are_idempotent_and_a_conflicting_replay_names_the_field() {
    let stack = start().await;
    let (org, _) = org_b(&stack).await;
    let path = format!("/admin/v1/orgs/{org}/purchases");
    let body = json!({"amount": "25.50", "reference": "INV-1"});
    let missing = call(&stack, ADMIN_TOKEN, Method::POST, &path, Some(body.clone()), &[]).await;
    assert_eq!(missing.status, 400, "Idempotency-Key is required");
    let first =
        call(&stack, ADMIN_TOKEN, Method::POST, &path, Some(body.clone()), &[("idempotency-key", "buy-1")])
            .await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    let replay =
        call(&stack, ADMIN_TOKEN, Method::POST, &path, Some(body.clone()), &[("idempotency-key", "buy-1")])
            .await;
    assert_eq!(replay.json(), first.json(), "a replay returns the original receipt");
    let conflict = call(
        &stack,
        ADMIN_TOKEN,
        Method::POST,
        &path,
        Some(json!({"amount": "30", "reference": "INV-1"})),
        &[("idempotency-key", "buy-1")],
    )
    .await;
    assert_eq!(conflict.status, 409);
    assert!(conflict.json()["error"]["message"].as_str().unwrap().contains("amount"), "{:?}", conflict.body);
    let balances =
        call(&stack, ADMIN_TOKEN, Method::GET, &format!("/admin/v1/orgs/{org}/balances"), None, &[])
            .await
            .json();
    assert_eq!(
        dec(&balances["balances"][0]["balance"]),
        dec(&json!("85.50")),
        "60 granted + 25.50 bought once"
    );
    let purchases = call(
        &stack,
        ADMIN_TOKEN,
        Method::GET,
        &format!("/admin/v1/orgs/{org}/ledger?kind=purchase"),
        None,
        &[],
    )
    .await
    .json();
    assert_eq!(purchases["entries"].as_array().unwrap().len(), 1);

    let adjust = call(
        &stack,
        ADMIN_TOKEN,
        Method::POST,
        &format!("/admin/v1/orgs/{org}/adjustments"),
        Some(json!({"wallet": "pool", "amount": "-0.50", "reason": "correction"})),
        &[("idempotency-key", "adj-1")],
    )
    .await;
    assert_eq!(adjust.status, 201, "{:?}", adjust.body);
}

#[tokio::test]
async fn an_org_or_a_user_created_under_an_idempotency_key_is_created_once_however_often_retried() {
    // Before, a retried create made a second org, granted its allocation, or a second
    // Lite user, granted a month's allowance at once; neither can be deleted.
    let stack = start().await;
    let today = chrono::Utc::now().date_naive().to_string();
    let org_body = json!({"name": "retried", "contract": {"start": today, "years": 1, "platform_allocation_per_year": "40"}});
    let create_org = |body: Value, key: &'static str| {
        let stack = &stack;
        async move {
            call(stack, ADMIN_TOKEN, Method::POST, "/admin/v1/orgs", Some(body), &[("idempotency-key", key)])
                .await
        }
    };
    let first = create_org(org_body.clone(), "org-1").await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    let again = create_org(org_body.clone(), "org-1").await;
    assert_eq!(again.status, 201, "{:?}", again.body);
    assert_eq!(again.json()["id"], first.json()["id"], "the retry answers the first org");
    assert!(first.json().get("idempotency_key").is_none(), "the key stays in the books: {:?}", first.body);
    let renamed = create_org(json!({"name": "other"}), "org-1").await;
    assert_eq!(renamed.status, 409, "{:?}", renamed.body);
    assert!(renamed.json()["error"]["message"].as_str().unwrap().contains("name"), "{:?}", renamed.body);
    let orgs = call(&stack, ADMIN_TOKEN, Method::GET, "/admin/v1/orgs", None, &[]).await.json();
    let named = orgs["orgs"].as_array().unwrap().iter().filter(|org| org["name"] == "retried").count();
    assert_eq!(named, 1);
    let org = first.json()["id"].as_u64().unwrap();
    let balances =
        call(&stack, ADMIN_TOKEN, Method::GET, &format!("/admin/v1/orgs/{org}/balances"), None, &[]).await;
    assert_eq!(dec(&balances.json()["balances"][0]["balance"]), dec(&json!("40")), "granted once");

    let user_body = json!({"name": "lee", "plan": "lite", "lite_monthly_allowance": "5"});
    let create_user = |org: u64, body: Value| {
        let stack = &stack;
        let path = format!("/admin/v1/orgs/{org}/users");
        async move {
            call(stack, ADMIN_TOKEN, Method::POST, &path, Some(body), &[("idempotency-key", "user-1")]).await
        }
    };
    let first = create_user(org, user_body.clone()).await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    let again = create_user(org, user_body.clone()).await;
    assert_eq!(again.status, 201, "{:?}", again.body);
    assert_eq!(again.json()["id"], first.json()["id"], "the retry answers the first user");
    let changed = create_user(org, json!({"name": "lee", "plan": "pro"})).await;
    assert_eq!(changed.status, 409, "{:?}", changed.body);
    assert!(changed.json()["error"]["message"].as_str().unwrap().contains("plan"), "{:?}", changed.body);
    let users =
        call(&stack, ADMIN_TOKEN, Method::GET, &format!("/admin/v1/orgs/{org}/users"), None, &[]).await;
    assert_eq!(users.json()["users"].as_array().unwrap().len(), 1, "{:?}", users.body);
    let balances =
        call(&stack, ADMIN_TOKEN, Method::GET, &format!("/admin/v1/orgs/{org}/balances"), None, &[]).await;
    let lite: Decimal = balances.json()["balances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|wallet| wallet["wallet"] != json!("pool") && wallet["wallet"].get("pool").is_none())
        .map(|wallet| dec(&wallet["balance"]))
        .sum();
    assert_eq!(lite, dec(&json!("5")), "one month's allowance, once: {:?}", balances.body);
    // Keys are scoped to the org: another org's user under the same key is its own.
    let (other, _) = org_b(&stack).await;
    let elsewhere = create_user(other, user_body).await;
    assert_eq!(elsewhere.status, 201, "{:?}", elsewhere.body);
    assert_ne!(elsewhere.json()["id"], first.json()["id"]);
}

#[tokio::test]
async fn invalid_bodies_get_400_naming_the_field() {
    let stack = start().await;
    let cases = [
        (json!({"name": "x", "colour": "red"}), "colour"),
        (json!({"name": "x", "time_zone": "Mars/Olympus"}), "time_zone"),
        (
            json!({"name": "x", "contract": {"start": "2026-01-01", "years": 1, "platform_allocation_per_year": 10}}),
            "contract.platform_allocation_per_year",
        ),
        (
            json!({"name": "x", "contract": {"start": "someday", "years": 1, "platform_allocation_per_year": "10"}}),
            "contract.start",
        ),
        (json!({"nom": "x"}), "nom"),
    ];
    for (body, field) in cases {
        let reply = call(&stack, ADMIN_TOKEN, Method::POST, "/admin/v1/orgs", Some(body.clone()), &[]).await;
        assert_eq!(reply.status, 400, "{body}");
        let error = reply.json()["error"].clone();
        assert!(
            error["field"].as_str().unwrap().contains(field)
                || error["message"].as_str().unwrap().contains(field),
            "{body} -> {error}"
        );
    }
    let bad_json = send(
        Request::post(stack.admin_url("/admin/v1/orgs"))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Full::new(Bytes::from("{oops")))
            .unwrap(),
    )
    .await;
    assert_eq!(bad_json.status, 400);
}

#[tokio::test]
async fn ledger_pages_and_usage_reports_agree_with_each_other() {
    let stack = start().await;
    let org = stack.keys.org.0;
    for (model, seed) in [("mock-gpt", 1), ("mock-gpt", 2), ("mock-claude", 3)] {
        let path = if model == "mock-claude" { "/v1/messages" } else { "/v1/chat/completions" };
        let reply = post_json(
            &stack.url(path),
            &stack.keys.pro,
            &json!({"model": model, "max_tokens": 30, "seed": seed}),
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(
        post_json(
            &stack.url("/v1/tools/web-search"),
            &stack.keys.app,
            &json!({"query": "q", "num_results": 4})
        )
        .await
        .status,
        200
    );
    let base = format!("/admin/v1/orgs/{org}");
    // Settles are served once durable (within a flush window): wait for the
    // four debits rather than for a fixed time, which a loaded machine
    // outlasts.
    let started = std::time::Instant::now();
    let whole: Vec<Value> = loop {
        let whole = call(&stack, ADMIN_TOKEN, Method::GET, &format!("{base}/ledger?limit=1000"), None, &[])
            .await
            .json();
        let whole = whole["entries"].as_array().unwrap().clone();
        let debits = whole.iter().filter(|e| e["kind"]["type"] == "debit").count();
        if debits >= 4 || started.elapsed() > std::time::Duration::from_secs(5) {
            break whole;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };

    // Walk the ledger two entries at a time; the pages add up to the whole.
    let mut paged = Vec::new();
    let mut cursor = 0;
    loop {
        let page = call(
            &stack,
            ADMIN_TOKEN,
            Method::GET,
            &format!("{base}/ledger?limit=2&after={cursor}"),
            None,
            &[],
        )
        .await
        .json();
        paged.extend(page["entries"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_u64() {
            Some(next) => cursor = next,
            None => break,
        }
    }
    assert_eq!(paged, whole, "cursor paging visits every entry once, in order");
    let debits: Vec<&Value> = whole.iter().filter(|e| e["kind"]["type"] == "debit").collect();
    assert_eq!(debits.len(), 4);
    let ledger_total: Decimal = debits.iter().map(|e| -dec(&e["amount"])).sum();

    let report =
        call(&stack, ADMIN_TOKEN, Method::GET, &format!("{base}/usage?group_by=model,tool,day"), None, &[])
            .await
            .json();
    assert_eq!(dec(&report["total"]["charged"]), ledger_total, "JSON total equals the ledger");
    assert_eq!(report["total"]["requests"], 4);
    assert_eq!(report["rows"].as_array().unwrap().len(), 3, "mock-gpt, mock-claude, web-search: {report}");

    let csv = call(
        &stack,
        ADMIN_TOKEN,
        Method::GET,
        &format!("{base}/usage?group_by=model,tool,day"),
        None,
        &[("accept", "text/csv")],
    )
    .await;
    assert!(csv.header("content-type").unwrap().starts_with("text/csv"));
    let text = String::from_utf8(csv.body.to_vec()).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let charged_at = header.iter().position(|h| *h == "charged").unwrap();
    let csv_total: Decimal =
        lines.map(|l| l.split(',').nth(charged_at).unwrap().parse::<Decimal>().unwrap()).sum();
    assert_eq!(csv_total, ledger_total, "CSV rows add up to the ledger");
    let same = call(
        &stack,
        ADMIN_TOKEN,
        Method::GET,
        &format!("{base}/usage?group_by=model,tool,day&format=csv"),
        None,
        &[],
    )
    .await;
    assert_eq!(same.body, csv.body, "format=csv and Accept: text/csv agree");

    let bad =
        call(&stack, ADMIN_TOKEN, Method::GET, &format!("{base}/usage?group_by=colour"), None, &[]).await;
    assert_eq!(bad.status, 400);
    // Every group's key holds each name given: thousands of repeats would
    // make each row thousands of strings.
    let repeated = vec!["model"; 5000].join(",");
    let bad =
        call(&stack, ADMIN_TOKEN, Method::GET, &format!("{base}/usage?group_by={repeated}"), None, &[]).await;
    // Of the documented shape (its pattern cannot count names): a rule.
    assert_eq!(bad.status, 422);
    assert!(String::from_utf8_lossy(&bad.body).contains("named twice"));
}

#[tokio::test]
async fn an_org_token_cannot_see_or_change_another_org_through_any_route() {
    let stack = start().await;
    assert_eq!(stack.keys.org.0, 1, "the org token is configured for the first org");
    let (b, ids) = org_b(&stack).await;
    let own = call(&stack, ORG_TOKEN, Method::GET, "/admin/v1/orgs", None, &[]).await;
    assert_eq!(own.status, 200, "{:?}", own.body);
    let own = own.json();
    let listed: Vec<u64> =
        own["orgs"].as_array().unwrap().iter().map(|o| o["id"].as_u64().unwrap()).collect();
    assert_eq!(listed, [1], "an org token lists only its own org");
    assert_eq!(
        call(&stack, ORG_TOKEN, Method::GET, "/admin/v1/orgs/1/balances", None, &[]).await.status,
        200
    );

    let b_base = format!("/admin/v1/orgs/{b}");
    let routes: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, b_base.clone(), None),
        (
            Method::POST,
            format!("{b_base}/contracts"),
            Some(json!({"start": "2030-01-01", "years": 1, "platform_allocation_per_year": "1"})),
        ),
        (Method::GET, format!("{b_base}/users"), None),
        (Method::POST, format!("{b_base}/users"), Some(json!({"name": "x", "plan": "pro"}))),
        (
            Method::PATCH,
            format!("{b_base}/users/{}", ids["pro"]),
            Some(json!({"plan": "lite", "lite_monthly_allowance": "1"})),
        ),
        (Method::GET, format!("{b_base}/apps"), None),
        (Method::POST, format!("{b_base}/apps"), Some(json!({"name": "x"}))),
        (Method::PUT, format!("{b_base}/apps/{}/limits", ids["app"]), Some(json!({}))),
        (Method::GET, format!("{b_base}/keys"), None),
        (Method::POST, format!("{b_base}/keys"), Some(json!({"user": ids["pro"]}))),
        (Method::POST, format!("{b_base}/keys/{}/revoke", ids["key"]), None),
        (Method::PUT, format!("{b_base}/keys/{}/limits", ids["key"]), Some(json!({"daily": "1"}))),
        (Method::PUT, format!("{b_base}/keys/{}/scope", ids["key"]), Some(json!({"models": ["x"]}))),
        (Method::GET, format!("{b_base}/alerts"), None),
        (
            Method::POST,
            format!("{b_base}/alerts"),
            Some(
                json!({"wallet": "pool", "condition": {"type": "lite_wallet_empty"}, "webhook_url": "http://127.0.0.1:9/x", "secret": "0123456789abcdef"}),
            ),
        ),
        (Method::GET, format!("{b_base}/alerts/deliveries"), None),
        (Method::POST, format!("{b_base}/purchases"), Some(json!({"amount": "1"}))),
        (
            Method::POST,
            format!("{b_base}/adjustments"),
            Some(
                json!({"wallet": "pool", "amount": "1", "reason": "x", "expires_at": "2030-01-01T00:00:00Z"}),
            ),
        ),
        (Method::GET, format!("{b_base}/balances"), None),
        (Method::GET, format!("{b_base}/ledger"), None),
        (Method::GET, format!("{b_base}/usage"), None),
    ];
    for (method, path, body) in routes {
        let reply = call(&stack, ORG_TOKEN, method.clone(), &path, body, &[("idempotency-key", "k")]).await;
        assert_eq!(reply.status, 404, "{method} {path} must not reach org {b}: {:?}", reply.body);
    }
    // Naming org B's things through org A's own path is refused too, without saying whose they are.
    let cross = call(
        &stack,
        ORG_TOKEN,
        Method::POST,
        &format!("/admin/v1/orgs/1/keys/{}/revoke", ids["key"]),
        None,
        &[],
    )
    .await;
    assert_eq!(cross.status, 404);
    assert!(!String::from_utf8_lossy(&cross.body).contains(&format!("organization {b}")), "{:?}", cross.body);
    // And reads exactly as an id no organization has, so ids cannot be probed.
    let unknown =
        call(&stack, ORG_TOKEN, Method::POST, "/admin/v1/orgs/1/keys/987654321/revoke", None, &[]).await;
    assert_eq!(unknown.status, 404);
    let message =
        |reply: &Reply, id: &str| reply.json()["error"]["message"].as_str().unwrap().replace(id, "N");
    assert_eq!(message(&cross, &ids["key"].to_string()), message(&unknown, "987654321"));
    let cross_key = call(
        &stack,
        ORG_TOKEN,
        Method::POST,
        "/admin/v1/orgs/1/keys",
        Some(json!({"user": ids["pro"]})),
        &[],
    )
    .await;
    assert_eq!(cross_key.status, 404, "a key for another org's user");
    let cross_wallet = call(&stack, ORG_TOKEN, Method::POST, "/admin/v1/orgs/1/adjustments",
        Some(json!({"wallet": {"lite_user": ids["lite"]}, "amount": "5", "reason": "move", "expires_at": "2030-01-01T00:00:00Z"})), &[("idempotency-key", "x")]).await;
    assert_eq!(
        cross_wallet.status, 403,
        "moving credit needs finance, before anything else: {:?}",
        cross_wallet.body
    );
    // Operator-only endpoints.
    assert_eq!(
        call(&stack, ORG_TOKEN, Method::POST, "/admin/v1/orgs", Some(json!({"name": "x"})), &[]).await.status,
        403
    );
    assert_eq!(call(&stack, ORG_TOKEN, Method::GET, "/admin/v1/prices", None, &[]).await.status, 403);
    assert_eq!(call(&stack, "nope", Method::GET, "/admin/v1/orgs", None, &[]).await.status, 401);
    // And org B's books are untouched.
    let b_balance =
        call(&stack, ADMIN_TOKEN, Method::GET, &format!("{b_base}/balances"), None, &[]).await.json();
    assert_eq!(dec(&b_balance["balances"][0]["balance"]), Decimal::from(60));
}

#[tokio::test]
async fn the_openapi_document_matches_the_routes() {
    let stack = start().await;
    let (org, ids) = org_b(&stack).await;
    let doc = call(&stack, ADMIN_TOKEN, Method::GET, "/admin/v1/openapi.json", None, &[]).await;
    assert_eq!(doc.status, 200);
    let doc = doc.json();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 15, "{paths:?}");
    let concrete = |template: &str| {
        template
            .replace("{org}", &org.to_string())
            .replace("{user}", &ids["pro"].to_string())
            .replace("{app}", &ids["app"].to_string())
            .replace("{key}", &ids["key"].to_string())
    };
    let all_methods = [Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE];
    let mut documented = 0;
    for (template, operations) in paths {
        let path = concrete(template);
        for method in &all_methods {
            let name = method.as_str().to_lowercase();
            let listed = operations.get(&name).is_some();
            let body = (method != Method::GET).then(|| json!({}));
            let reply =
                call(&stack, ADMIN_TOKEN, method.clone(), &path, body, &[("idempotency-key", "doc-check")])
                    .await;
            let code = serde_json::from_slice::<Value>(&reply.body)
                .ok()
                .map(|v| v["error"]["code"].clone())
                .unwrap_or(Value::Null);
            if listed {
                documented += 1;
                assert_ne!(reply.status, 405, "{method} {template} is documented but not served");
                assert_ne!(code, "no_route", "{method} {template} is documented but not served");
            } else {
                assert_eq!(
                    reply.status, 405,
                    "{method} {template} is served but not documented, or answers 404 for a known path: {:?}",
                    reply.body
                );
                assert_eq!(code, "method_not_allowed");
                let allow = reply.header("allow").unwrap_or_default().to_lowercase();
                let expected: Vec<&str> =
                    operations.as_object().unwrap().keys().map(String::as_str).collect();
                assert_eq!(
                    allow.split(", ").collect::<Vec<_>>(),
                    expected,
                    "Allow lists the documented methods"
                );
            }
        }
    }
    assert_eq!(documented, creditgate::admin::openapi::ROUTES.len());
    // An unknown path is still 404.
    let nowhere = call(&stack, ADMIN_TOKEN, Method::GET, "/admin/v1/nowhere", None, &[]).await;
    assert_eq!(nowhere.status, 404);
}

#[tokio::test]
async fn every_request_body_is_described_and_empty_query_values_mean_absent() {
    let stack = start().await;
    let doc = call(&stack, ADMIN_TOKEN, Method::GET, "/admin/v1/openapi.json", None, &[]).await.json();
    for (path, operations) in doc["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            let responses = operation["responses"].as_object().unwrap();
            for code in ["400", "401", "403", "404", "405", "503"] {
                assert!(responses.contains_key(code), "{method} {path} declares {code}");
            }
            if method == "get" {
                continue;
            }
            let reads_body = !path.ends_with("/revoke") && !path.ends_with("/reload");
            let schema = &operation["requestBody"]["content"]["application/json"]["schema"];
            assert_eq!(schema.is_object(), reads_body, "{method} {path}: {schema}");
            if reads_body {
                assert_eq!(schema["type"], "object", "{method} {path}");
                assert_eq!(schema["additionalProperties"], false, "{method} {path}: strict");
                assert!(schema["properties"].as_object().is_some_and(|p| !p.is_empty()), "{method} {path}");
            }
        }
    }
    let purchases = &doc["paths"]["/admin/v1/orgs/{org}/purchases"]["post"]["responses"];
    assert!(purchases.get("409").is_some(), "idempotency conflicts are declared");
    // Empty values, as documented, are the same as leaving the parameter out.
    let empty =
        call(&stack, ADMIN_TOKEN, Method::GET, "/admin/v1/orgs/1/ledger?limit=&after=&from=", None, &[])
            .await;
    assert_eq!(empty.status, 200, "{:?}", empty.body);
    let usage =
        call(&stack, ADMIN_TOKEN, Method::GET, "/admin/v1/orgs/1/usage?group_by=&format=", None, &[]).await;
    assert_eq!(usage.status, 200, "{:?}", usage.body);
}

#[tokio::test]
async fn a_key_scoped_to_some_models_and_routes_is_refused_elsewhere_and_charged_nothing() {
    let stack = start().await;
    let (org, ids) = org_b(&stack).await;
    let secret = ids["secret"].as_str().unwrap();
    let scope = json!({"routes": ["/v1/messages"], "models": ["mock-claude"]});
    let set = call(
        &stack,
        ADMIN_TOKEN,
        Method::PUT,
        &format!("/admin/v1/orgs/{org}/keys/{}/scope", ids["key"]),
        Some(scope),
        &[],
    )
    .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    assert_eq!(set.json()["scope"]["models"][0], "mock-claude");
    let before = call(&stack, ADMIN_TOKEN, Method::GET, &format!("/admin/v1/orgs/{org}/balances"), None, &[])
        .await
        .json();

    let wrong_route =
        post_json(&stack.url("/v1/chat/completions"), secret, &json!({"model": "mock-claude"})).await;
    assert_eq!(wrong_route.status, 403);
    assert_eq!(wrong_route.json()["error"]["code"], "not_allowed_for_key");
    let wrong_model =
        post_json(&stack.url("/v1/messages"), secret, &json!({"model": "claude-sonnet-4", "max_tokens": 5}))
            .await;
    assert_eq!(wrong_model.status, 403);
    let after = call(&stack, ADMIN_TOKEN, Method::GET, &format!("/admin/v1/orgs/{org}/balances"), None, &[])
        .await
        .json();
    assert_eq!(before["balances"][0]["balance"], after["balances"][0]["balance"], "refusals charge nothing");
    assert!(stack.mock.journal().entries().is_empty(), "nothing was forwarded");

    let allowed =
        post_json(&stack.url("/v1/messages"), secret, &json!({"model": "mock-claude", "max_tokens": 5}))
            .await;
    assert_eq!(allowed.status, 200);
}

#[tokio::test]
async fn usage_days_are_the_organizations_days() {
    // 20:00 UTC on the 25th is 05:00 on the 26th in Tokyo.
    let clock = creditgate::clock::ManualClock::new("2026-11-25T20:00:00Z".parse().unwrap());
    let stack = start_with_clock(clock).await;
    let org = call(
        &stack,
        ADMIN_TOKEN,
        Method::POST,
        "/admin/v1/orgs",
        Some(json!({
            "name": "tokyo", "time_zone": "Asia/Tokyo",
            "contract": {"start": "2026-11-01", "years": 1, "platform_allocation_per_year": "10"}
        })),
        &[],
    )
    .await
    .json();
    let id = org["id"].as_u64().unwrap();
    let user = call(
        &stack,
        ADMIN_TOKEN,
        Method::POST,
        &format!("/admin/v1/orgs/{id}/users"),
        Some(json!({"name": "k", "plan": "pro"})),
        &[],
    )
    .await
    .json();
    let key = call(
        &stack,
        ADMIN_TOKEN,
        Method::POST,
        &format!("/admin/v1/orgs/{id}/keys"),
        Some(json!({"user": user["id"]})),
        &[],
    )
    .await
    .json();
    let reply = post_json(
        &stack.url("/v1/chat/completions"),
        key["secret"].as_str().unwrap(),
        &json!({"model": "mock-gpt", "max_tokens": 5}),
    )
    .await;
    assert_eq!(reply.status, 200);
    // The report reads the debit once it is written through (no fixed wait).
    let started = std::time::Instant::now();
    let report = loop {
        let path = format!("/admin/v1/orgs/{id}/usage?group_by=day,month");
        let report = call(&stack, ADMIN_TOKEN, Method::GET, &path, None, &[]).await.json();
        if !report["rows"].as_array().unwrap().is_empty() {
            break report;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "the debit was never reported");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(report["rows"][0]["day"], "2026-11-26", "{report}");
    assert_eq!(report["rows"][0]["month"], "2026-11");
}

/// The pool and every Lite wallet of `org`, with balances, as the operator sees them.
async fn balances_of(stack: &Stack, org: u64) -> Value {
    call(stack, ADMIN_TOKEN, Method::GET, &format!("/admin/v1/orgs/{org}/balances"), None, &[]).await.json()
}

#[tokio::test]
async fn an_org_token_without_finance_cannot_create_credit_by_any_route() {
    let stack = start().await;
    let base = "/admin/v1/orgs/1";
    let users = call(&stack, ORG_TOKEN, Method::GET, &format!("{base}/users"), None, &[]).await.json();
    let user_id = |plan: &str| {
        users["users"].as_array().unwrap().iter().find(|u| u["plan"] == plan).unwrap()["id"].clone()
    };
    let (pro, lite) = (user_id("pro"), user_id("lite"));
    // A Pro user with no allowance: creating them grants nothing, so the org token may.
    let plain = call(
        &stack,
        ORG_TOKEN,
        Method::POST,
        &format!("{base}/users"),
        Some(json!({"name": "pat", "plan": "pro"})),
        &[],
    )
    .await;
    assert_eq!(plain.status, 201, "org tokens keep users: {:?}", plain.body);
    let before = balances_of(&stack, 1).await;

    let money_routes: Vec<(Method, String, Value)> = vec![
        (Method::POST, format!("{base}/purchases"), json!({"amount": "1000000"})),
        (
            Method::POST,
            format!("{base}/adjustments"),
            json!({"wallet": "pool", "amount": "500", "reason": "gift", "expires_at": "2099-01-01T00:00:00Z"}),
        ),
        (
            Method::POST,
            format!("{base}/adjustments"),
            json!({"wallet": "pool", "amount": "-1", "reason": "take"}),
        ),
        (
            Method::POST,
            format!("{base}/contracts"),
            json!({"start": "2099-01-01", "years": 1, "platform_allocation_per_year": "1000000"}),
        ),
        (
            Method::POST,
            format!("{base}/users"),
            json!({"name": "rich", "plan": "lite", "lite_monthly_allowance": "1000"}),
        ),
        (
            Method::POST,
            format!("{base}/users"),
            json!({"name": "later", "plan": "pro", "lite_monthly_allowance": "1000"}),
        ),
        (Method::PATCH, format!("{base}/users/{lite}"), json!({"lite_monthly_allowance": "1000"})),
        (Method::PATCH, format!("{base}/users/{pro}"), json!({"prorate_on_downgrade": true})),
        (
            Method::PATCH,
            format!("{base}/users/{pro}"),
            json!({"plan": "lite", "lite_monthly_allowance": "50"}),
        ),
    ];
    for (method, path, body) in money_routes {
        let reply = call(
            &stack,
            ORG_TOKEN,
            method.clone(),
            &path,
            Some(body.clone()),
            &[("idempotency-key", "mint")],
        )
        .await;
        assert_eq!(reply.status, 403, "{method} {path} {body} must need finance: {:?}", reply.body);
        assert_eq!(reply.json()["error"]["code"], "finance_scope_required");
    }
    assert_eq!(balances_of(&stack, 1).await, before, "no wallet changed");

    // Upgrading a Lite user moves them onto the pool and grants nothing: allowed.
    let up = call(
        &stack,
        ORG_TOKEN,
        Method::PATCH,
        &format!("{base}/users/{lite}"),
        Some(json!({"plan": "pro"})),
        &[],
    )
    .await;
    assert_eq!(up.status, 200, "{:?}", up.body);
    // But back down to Lite would grant their allowance again (Pro -> Lite -> Pro mints per cycle).
    let after_up = balances_of(&stack, 1).await;
    let down = call(
        &stack,
        ORG_TOKEN,
        Method::PATCH,
        &format!("{base}/users/{lite}"),
        Some(json!({"plan": "lite"})),
        &[],
    )
    .await;
    assert_eq!(down.status, 403, "{:?}", down.body);
    assert_eq!(balances_of(&stack, 1).await, after_up, "the refused downgrade granted nothing");
    // Limits, keys, apps stay the org token's.
    let limits = call(
        &stack,
        ORG_TOKEN,
        Method::PATCH,
        &format!("{base}/users/{pro}"),
        Some(json!({"limits": {"daily": "5"}})),
        &[],
    )
    .await;
    assert_eq!(limits.status, 200, "{:?}", limits.body);
    let key =
        call(&stack, ORG_TOKEN, Method::POST, &format!("{base}/keys"), Some(json!({"user": pro})), &[]).await;
    assert_eq!(key.status, 201, "{:?}", key.body);
}

#[tokio::test]
async fn an_org_token_the_operator_grants_finance_may_buy_credit_for_its_own_org_only() {
    let stack = start_edited(|text| {
        text.replace(
            r#"org_tokens = [{ org = 1, token_env = "ORG_TOKEN" }]"#,
            r#"org_tokens = [{ org = 1, token_env = "ORG_TOKEN" }, { org = 1, token_env = "FINANCE_TOKEN", finance = true }]"#,
        )
    })
    .await;
    let (b, ids) = org_b(&stack).await;
    let buy = |org: u64, token: &'static str| {
        let stack = &stack;
        async move {
            call(
                stack,
                token,
                Method::POST,
                &format!("/admin/v1/orgs/{org}/purchases"),
                Some(json!({"amount": "5"})),
                &[("idempotency-key", "fin-1")],
            )
            .await
        }
    };
    assert_eq!(buy(1, ORG_TOKEN).await.status, 403, "a plain org token still may not");
    let bought = buy(1, FINANCE_TOKEN).await;
    assert_eq!(bought.status, 201, "{:?}", bought.body);
    assert_eq!(dec(&bought.json()["balance_after"]), Decimal::from(105));
    assert_eq!(buy(b, FINANCE_TOKEN).await.status, 404, "finance is for its own org only");
    let cross_wallet = call(&stack, FINANCE_TOKEN, Method::POST, "/admin/v1/orgs/1/adjustments",
        Some(json!({"wallet": {"lite_user": ids["lite"]}, "amount": "5", "reason": "move", "expires_at": "2099-01-01T00:00:00Z"})), &[("idempotency-key", "x")]).await;
    assert_eq!(cross_wallet.status, 404, "credits never move between orgs: {:?}", cross_wallet.body);
}

/// Sends each (method, path, body) as the operator and asserts a 400 whose
/// `field` is (or ends with) the one given.
async fn assert_each_refused_naming_its_field(stack: &Stack, cases: Vec<(Method, String, Value, &str)>) {
    for (method, path, body, field) in cases {
        let reply = call(
            stack,
            ADMIN_TOKEN,
            method.clone(),
            &path,
            Some(body.clone()),
            &[("idempotency-key", "refused")],
        )
        .await;
        assert_eq!(reply.status, 400, "{method} {path} {body}: {:?}", reply.body);
        let error = reply.json()["error"].clone();
        assert!(
            error["field"].as_str().unwrap_or_default().ends_with(field),
            "{method} {path} {body}: {error}"
        );
    }
}

#[tokio::test]
async fn array_bodies_are_refused_naming_the_field_and_change_nothing() {
    let stack = start().await;
    let (b, ids) = org_b(&stack).await;
    let base = format!("/admin/v1/orgs/{b}");
    let before = balances_of(&stack, b).await;
    let users_before =
        call(&stack, ADMIN_TOKEN, Method::GET, &format!("{base}/users"), None, &[]).await.json();
    let cases: Vec<(Method, String, Value, &str)> = vec![
        (Method::POST, format!("{base}/purchases"), json!(["1.00", null, null]), "body"),
        (Method::PATCH, format!("{base}/users/{}", ids["lite"]), json!(["pro", null, null, null]), "body"),
        (
            Method::PATCH,
            format!("{base}/users/{}", ids["pro"]),
            json!({"limits": ["1", null, null, null]}),
            "limits",
        ),
        (Method::POST, format!("{base}/contracts"), json!(["2099-01-01", 1, "10", 0, null]), "body"),
        (
            Method::POST,
            "/admin/v1/orgs".to_owned(),
            json!({"name": "x", "contract": ["2099-01-01", 1, "10", 0, null]}),
            "contract",
        ),
        (
            Method::POST,
            format!("{base}/alerts"),
            json!({"wallet": "pool", "condition": ["balance_below", "5"], "webhook_url": "http://127.0.0.1:9/x", "secret": "0123456789abcdef"}),
            "condition",
        ),
        (
            Method::POST,
            format!("{base}/adjustments"),
            json!({"wallet": {"lite_user": [ids["lite"]]}, "amount": "1", "reason": "x", "expires_at": "2099-01-01T00:00:00Z"}),
            "wallet.lite_user",
        ),
    ];
    assert_each_refused_naming_its_field(&stack, cases).await;
    assert_eq!(balances_of(&stack, b).await, before, "no wallet changed");
    let users_after =
        call(&stack, ADMIN_TOKEN, Method::GET, &format!("{base}/users"), None, &[]).await.json();
    assert_eq!(users_after, users_before, "no user changed plan or limits");
    let orgs = call(&stack, ADMIN_TOKEN, Method::GET, "/admin/v1/orgs", None, &[]).await.json();
    assert_eq!(orgs["orgs"].as_array().unwrap().len(), 2, "no org was created");
}

#[tokio::test]
async fn money_inputs_finer_than_a_nano_dollar_are_refused_everywhere() {
    let stack = start().await;
    let (b, ids) = org_b(&stack).await;
    let base = format!("/admin/v1/orgs/{b}");
    let before = balances_of(&stack, b).await;
    let fine = "1.0000000000000000000000000001";
    let cases: Vec<(Method, String, Value, &str)> = vec![
        (Method::POST, format!("{base}/purchases"), json!({"amount": fine}), "amount"),
        (Method::POST, format!("{base}/purchases"), json!({"amount": "0.0000000001"}), "amount"),
        (
            Method::POST,
            format!("{base}/adjustments"),
            json!({"wallet": "pool", "amount": fine, "reason": "x", "expires_at": "2099-01-01T00:00:00Z"}),
            "amount",
        ),
        (
            Method::POST,
            format!("{base}/contracts"),
            json!({"start": "2099-01-01", "years": 1, "platform_allocation_per_year": fine}),
            "platform_allocation_per_year",
        ),
        (
            Method::PATCH,
            format!("{base}/users/{}", ids["lite"]),
            json!({"lite_monthly_allowance": fine}),
            "lite_monthly_allowance",
        ),
        (Method::PUT, format!("{base}/keys/{}/limits", ids["key"]), json!({"daily": fine}), "daily"),
        (
            Method::POST,
            format!("{base}/alerts"),
            json!({"wallet": "pool", "condition": {"type": "balance_below", "amount": fine}, "webhook_url": "https://hooks.example.com/x", "secret": "0123456789abcdef"}),
            "condition.amount",
        ),
        (
            Method::POST,
            format!("{base}/alerts"),
            json!({"wallet": "pool", "condition": {"type": "balance_below", "amount": 0.1}, "webhook_url": "https://hooks.example.com/x", "secret": "0123456789abcdef"}),
            "condition",
        ),
    ];
    assert_each_refused_naming_its_field(&stack, cases).await;
    assert_eq!(balances_of(&stack, b).await, before, "no wallet changed");
    // Nine places, the cost scale, are taken exactly.
    let exact = call(
        &stack,
        ADMIN_TOKEN,
        Method::POST,
        &format!("{base}/purchases"),
        Some(json!({"amount": "0.000000001"})),
        &[("idempotency-key", "nano")],
    )
    .await;
    assert_eq!(exact.status, 201, "{:?}", exact.body);
    assert_eq!(dec(&exact.json()["balance_after"]), dec(&json!("60.000000001")));
}

#[tokio::test]
async fn schema_valid_bodies_that_a_rule_refuses_answer_422_naming_the_field() {
    // Proves 400 means "not the documented shape" and 422 `rule_refused`
    // means "well-formed, but the books' rules refuse it": an expiry already
    // past, a term overlapping the current one, a Lite user without an
    // allowance and a key with two owners all answer 422, and change nothing.
    let stack = start().await;
    let (org, ids) = org_b(&stack).await;
    let base = format!("/admin/v1/orgs/{org}");
    let today = chrono::Utc::now().date_naive().to_string();
    let cases = [
        (format!("{base}/purchases"), json!({"amount": "5", "expires_at": "2001-01-01T00:00:00Z"}), None),
        // Purchased credit expires with the contract it is bought under.
        (format!("{base}/purchases"), json!({"amount": "5", "expires_at": "2999-01-01T00:00:00Z"}), None),
        (
            format!("{base}/contracts"),
            json!({"start": today, "years": 1, "platform_allocation_per_year": "10"}),
            None,
        ),
        (format!("{base}/users"), json!({"name": "l", "plan": "lite"}), Some("lite_monthly_allowance")),
        (format!("{base}/keys"), json!({"user": ids["pro"], "app": ids["app"]}), Some("user")),
    ];
    let before = call(&stack, ADMIN_TOKEN, Method::GET, &format!("{base}/balances"), None, &[]).await;
    for (path, body, field) in cases {
        let reply = call(
            &stack,
            ADMIN_TOKEN,
            Method::POST,
            &path,
            Some(body.clone()),
            &[("idempotency-key", "rule")],
        )
        .await;
        assert_eq!(reply.status, 422, "{path} {body}: {:?}", reply.body);
        let error = reply.json()["error"].clone();
        assert_eq!(error["code"], "rule_refused", "{path}: {error}");
        if let Some(field) = field {
            assert_eq!(error["field"], field, "{path}: {error}");
        }
    }
    let after = call(&stack, ADMIN_TOKEN, Method::GET, &format!("{base}/balances"), None, &[]).await;
    assert_eq!(before.json(), after.json(), "no refused call changed a wallet");
}

#[tokio::test]
async fn names_labels_and_key_scopes_are_bounded() {
    // Proves an org token cannot grow the journal and every replica's memory
    // without bound through one entity: names, labels and scope entries are
    // at most 256 bytes, and a scope lists at most 64 routes and 64 models.
    let stack = start().await;
    let base = "/admin/v1/orgs/1";
    let long = "x".repeat(257);
    let post = |path: String, body: Value| {
        let stack = &stack;
        async move { call(stack, ORG_TOKEN, Method::POST, &path, Some(body), &[]).await }
    };
    let user = post(format!("{base}/users"), json!({"name": long, "plan": "pro"})).await;
    assert_eq!(user.status, 400, "{:?}", user.body);
    let app = post(format!("{base}/apps"), json!({"name": long})).await;
    assert_eq!(app.status, 400, "{:?}", app.body);
    let fine = post(format!("{base}/users"), json!({"name": "x".repeat(256), "plan": "pro"})).await;
    assert_eq!(fine.status, 201, "{:?}", fine.body);
    let user_id = fine.json()["id"].clone();
    let key = post(format!("{base}/keys"), json!({"user": user_id, "label": long})).await;
    assert_eq!(key.status, 400, "{:?}", key.body);
    let key = post(format!("{base}/keys"), json!({"user": user_id, "label": "ok"})).await;
    assert_eq!(key.status, 201, "{:?}", key.body);
    let scope = format!("{base}/keys/{}/scope", key.json()["id"]);
    let many: Vec<String> = (0..65).map(|i| format!("/v1/r{i}")).collect();
    for body in [json!({"routes": many}), json!({"models": [long]})] {
        let reply = call(&stack, ORG_TOKEN, Method::PUT, &scope, Some(body.clone()), &[]).await;
        assert_eq!(reply.status, 400, "{body}: {:?}", reply.body);
        assert_eq!(reply.json()["error"]["code"], "invalid_field");
    }
    let reply =
        call(&stack, ORG_TOKEN, Method::PUT, &scope, Some(json!({"models": ["mock-gpt"]})), &[]).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);

    // A name shown to the operator (the dashboard, its confirmations, the
    // CLI) cannot hold a line break, an escape, a bidi override or a
    // zero-width character: before, "Bob (#7)" with a right-to-left
    // override or an extra line could pass for another row or prompt.
    for name in ["a\nb", "a\u{1b}[31mb", "a\u{202e}b", "a\u{200b}b", "a\tb"] {
        let user = post(format!("{base}/users"), json!({"name": name, "plan": "pro"})).await;
        assert_eq!(user.status, 400, "{name:?}: {:?}", user.body);
        assert_eq!(user.json()["error"]["code"], "invalid_field", "{name:?}");
        let key = post(format!("{base}/keys"), json!({"user": user_id, "label": name})).await;
        assert_eq!(key.status, 400, "{name:?}: {:?}", key.body);
    }
    let named = post(format!("{base}/users"), json!({"name": "Zoë Ñandú 東京", "plan": "pro"})).await;
    assert_eq!(named.status, 201, "letters of any script are names: {:?}", named.body);
}

#[tokio::test]
async fn the_dashboard_reads_scope_summary_and_price_entries() {
    // Proves the three read endpoints the dashboard added: whoami, an org's
    // summary (allocation consumed this contract year, in the org's zone)
    // and the price table's entries (operator only).
    let stack = start().await;
    let (org, ids) = org_b(&stack).await;
    let whoami = call(&stack, ORG_TOKEN, Method::GET, "/admin/v1/whoami", None, &[]).await.json();
    assert_eq!(whoami, json!({"scope": "org", "org": 1, "finance": false}));
    let whoami = call(&stack, ADMIN_TOKEN, Method::GET, "/admin/v1/whoami", None, &[]).await.json();
    assert_eq!(whoami["scope"], "operator");

    let secret = ids["secret"].as_str().unwrap();
    let body =
        json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20});
    assert_eq!(post_json(&stack.url("/v1/chat/completions"), secret, &body).await.status, 200);
    // The debit is in the ledger's store once it has been written through.
    let ledger_path = format!("/admin/v1/orgs/{org}/ledger?kind=debit");
    let started = std::time::Instant::now();
    let debit = loop {
        let ledger = call(&stack, ADMIN_TOKEN, Method::GET, &ledger_path, None, &[]).await.json();
        if let Some(entry) = ledger["entries"].get(0) {
            break entry.clone();
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "the debit was never recorded");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let path = format!("/admin/v1/orgs/{org}/summary");
    let summary = call(&stack, ADMIN_TOKEN, Method::GET, &path, None, &[]).await.json();
    assert_eq!(summary["time_zone"], "Europe/Berlin");
    let year = &summary["contract_year"];
    // 50 platform + 2 seats x 5, starting at local midnight in Berlin.
    assert_eq!(dec(&year["allocated"]), Decimal::from(60), "{summary}");
    assert_eq!(dec(&year["consumed"]) + dec(&year["remaining"]), Decimal::from(60));
    let start = year["start"].as_str().unwrap();
    assert!(start.ends_with("T23:00:00Z") || start.ends_with("T22:00:00Z"), "Berlin midnight: {start}");
    assert_eq!(dec(&year["consumed"]), -dec(&debit["amount"]), "consumed is the one debit");
    assert_eq!(call(&stack, ORG_TOKEN, Method::GET, &path, None, &[]).await.status, 404, "another org's");

    assert_eq!(call(&stack, ORG_TOKEN, Method::GET, "/admin/v1/prices/table", None, &[]).await.status, 403);
    let table = call(&stack, ADMIN_TOKEN, Method::GET, "/admin/v1/prices/table", None, &[]).await.json();
    let models = table["models"].as_array().unwrap();
    assert!(models.iter().any(|m| m["name"] == "mock-gpt" && m["input_per_mtok"].is_string()), "{table}");
}

#[tokio::test]
async fn an_org_token_s_writes_are_capped_per_minute_and_its_reads_and_the_operator_s_are_not() {
    // A tenant's token could loop writes (a label changed back and forth) and grow every
    // replica's journal without bound; the entities are bounded, the writes were not.
    let stack = start_edited(|text| {
        text.replace("token_env = \"ADMIN_TOKEN\"", "token_env = \"ADMIN_TOKEN\"\norg_writes_per_minute = 3")
    })
    .await;
    let add_user = |token: &'static str, name: &'static str| {
        let stack = &stack;
        async move {
            let body = json!({"name": name, "plan": "pro"});
            call(stack, token, Method::POST, "/admin/v1/orgs/1/users", Some(body), &[]).await
        }
    };
    for name in ["u1", "u2", "u3"] {
        assert_eq!(add_user(ORG_TOKEN, name).await.status, 201);
    }
    let refused = add_user(ORG_TOKEN, "u4").await;
    assert_eq!(refused.status, 429, "{:?}", refused.body);
    assert_eq!(refused.json()["error"]["code"], "admin_rate_limited");
    assert_eq!(refused.header("retry-after"), Some("60"));
    let users = call(&stack, ORG_TOKEN, Method::GET, "/admin/v1/orgs/1/users", None, &[]).await;
    assert_eq!(users.status, 200, "reads are not capped");
    assert!(!String::from_utf8_lossy(&users.body).contains("\"u4\""), "the refused write did nothing");
    // Refused before its body is read: a capped token's writes hold no memory
    // and wait for nothing (this one never sends the body it announces).
    let mut stream = tokio::net::TcpStream::connect(stack.gateway.admin_addr()).await.unwrap();
    let head = format!(
        "POST /admin/v1/orgs/1/users HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {ORG_TOKEN}\r\n\
         content-type: application/json\r\ncontent-length: 100000\r\n\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes()).await.unwrap();
    let mut answer = [0_u8; 12];
    let read = tokio::io::AsyncReadExt::read_exact(&mut stream, &mut answer);
    tokio::time::timeout(std::time::Duration::from_secs(2), read).await.expect("answered at once").unwrap();
    assert_eq!(&answer, b"HTTP/1.1 429");
    assert_eq!(add_user(ADMIN_TOKEN, "by-operator").await.status, 201, "the operator is not capped");
}

/// Users, applications and keys are listed a page at a time, by id: the
/// cursors walk every item once, and another org's never appear. Before,
/// a list copied every item of its kind into one answer, which an org
/// with many keys of large scopes could make as large as it pleased.
#[tokio::test]
async fn users_apps_and_keys_are_listed_a_page_at_a_time() {
    let stack = start().await;
    // The org token's org, and another.
    let org = stack.keys.org.0;
    let (other, _) = org_b(&stack).await;
    let base = format!("/admin/v1/orgs/{org}");
    for n in 0..5 {
        let app = json!({"name": format!("paged-{n}")});
        let made = call(&stack, ADMIN_TOKEN, Method::POST, &format!("{base}/apps"), Some(app), &[]).await;
        assert_eq!(made.status, 201, "{:?}", made.body);
        let key = json!({"app": made.json()["id"]});
        let made = call(&stack, ADMIN_TOKEN, Method::POST, &format!("{base}/keys"), Some(key), &[]).await;
        assert_eq!(made.status, 201, "{:?}", made.body);
    }
    for list in ["users", "apps", "keys"] {
        let whole = call(&stack, ORG_TOKEN, Method::GET, &format!("{base}/{list}"), None, &[]).await;
        assert_eq!(whole.status, 200, "{list}: {:?}", whole.body);
        let whole = whole.json();
        assert_eq!(whole["next_cursor"], Value::Null, "{list}: one page holds them all");
        let ids = |page: &Value| -> Vec<u64> {
            page[list].as_array().unwrap().iter().map(|item| item["id"].as_u64().unwrap()).collect()
        };
        let all = ids(&whole);
        let mut walked = Vec::new();
        let mut path = format!("{base}/{list}?limit=2");
        loop {
            let page = call(&stack, ORG_TOKEN, Method::GET, &path, None, &[]).await.json();
            assert!(ids(&page).len() <= 2, "{list}: {page}");
            walked.extend(ids(&page));
            match page["next_cursor"].as_u64() {
                Some(next) => path = format!("{base}/{list}?limit=2&after={next}"),
                None => break,
            }
        }
        assert_eq!(walked, all, "{list}: the pages walk every item once, in order");
        let mut sorted = all.clone();
        sorted.sort_unstable();
        assert_eq!(all, sorted, "{list}: by id");
        let theirs_path = format!("/admin/v1/orgs/{other}/{list}");
        let theirs = ids(&call(&stack, ADMIN_TOKEN, Method::GET, &theirs_path, None, &[]).await.json());
        assert!(theirs.iter().all(|id| !all.contains(id)), "{list}: another org's items");
    }
    let apps = call(&stack, ORG_TOKEN, Method::GET, &format!("{base}/apps"), None, &[]).await.json();
    assert!(apps["apps"].as_array().unwrap().len() >= 5);
    let bad = call(&stack, ORG_TOKEN, Method::GET, &format!("{base}/keys?after=x"), None, &[]).await;
    assert_eq!(bad.status, 400, "{:?}", bad.body);
}
