//! Alerts fire once per threshold as signed webhooks to a real local
//! receiver, retried when the receiver fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use hmac::{Hmac, Mac};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use sha2::Sha256;

const SECRET: &str = "webhook-secret-0123456789";

/// Received webhook: its signature checked, its event parsed.
#[derive(Debug, Clone)]
struct Received {
    signature_ok: bool,
    event: Value,
}

/// A webhook receiver on 127.0.0.1:0 that answers 500 to the very first
/// request (to prove retries) and 200 afterwards.
async fn receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen: Arc<Mutex<Vec<Received>>> = Arc::default();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let store = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (store, calls) = (store.clone(), calls.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let (store, calls) = (store.clone(), calls.clone());
                    async move {
                        let timestamp =
                            request.headers()["x-creditgate-timestamp"].to_str().unwrap().to_owned();
                        let signature =
                            request.headers()["x-creditgate-signature"].to_str().unwrap().to_owned();
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
                        mac.update(format!("{timestamp}.").as_bytes());
                        mac.update(&body);
                        let expected = format!("v1={}", hex::encode(mac.finalize().into_bytes()));
                        let first = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
                        if !first {
                            store.lock().unwrap().push(Received {
                                signature_ok: expected == signature,
                                event: serde_json::from_slice(&body).unwrap(),
                            });
                        }
                        let status = if first { 500 } else { 200 };
                        Ok::<_, Infallible>(
                            Response::builder().status(status).body(Full::new(Bytes::new())).unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, seen)
}

/// A stack whose operator allows webhooks to loopback (the test receivers).
async fn start_with_loopback_webhooks() -> Stack {
    start_edited(|text| text.replace("[admin]\n", "[admin]\nalert_webhook_allow = [\"127.0.0.1/32\"]\n"))
        .await
}

async fn admin(stack: &Stack, method: Method, path: &str, body: Option<Value>) -> Reply {
    admin_as(stack, ADMIN_TOKEN, method, path, body).await
}

async fn admin_as(stack: &Stack, token: &str, method: Method, path: &str, body: Option<Value>) -> Reply {
    let request = Request::builder()
        .method(method)
        .uri(stack.admin_url(path))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body.map(|b| b.to_string()).unwrap_or_default())))
        .unwrap();
    send(request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_threshold_fires_exactly_once_as_a_signed_webhook() {
    let stack = start_with_loopback_webhooks().await;
    let keys = seed(&stack.gateway, "0.01", "0");
    let org = keys.org.0;
    let (url, seen) = receiver().await;
    let lite_user = match stack
        .gateway
        .ledger()
        .resolve_key(&creditgate::ledger::entity::KeyHash::of_secret(&keys.lite))
        .unwrap()
        .owner
    {
        creditgate::ledger::ids::Owner::User(user) => user.0,
        other => panic!("{other:?}"),
    };
    let rules = [
        json!({"wallet": "pool", "condition": {"type": "consumed_share", "percent": "50"}}),
        json!({"wallet": "pool", "condition": {"type": "consumed_share", "percent": "80"}}),
        json!({"wallet": "pool", "condition": {"type": "balance_below", "amount": "0.002"}}),
        json!({"wallet": {"lite_user": lite_user}, "condition": {"type": "lite_wallet_empty"}}),
    ];
    let mut rule_ids = Vec::new();
    for mut rule in rules {
        rule["webhook_url"] = json!(url);
        rule["secret"] = json!(SECRET);
        let reply = admin(&stack, Method::POST, &format!("/admin/v1/orgs/{org}/alerts"), Some(rule)).await;
        assert_eq!(reply.status, 201, "{:?}", reply.body);
        assert!(!String::from_utf8_lossy(&reply.body).contains(SECRET), "the secret is never shown back");
        rule_ids.push(reply.json()["id"].as_u64().unwrap());
    }
    let bad = admin(&stack, Method::POST, &format!("/admin/v1/orgs/{org}/alerts"),
        Some(json!({"wallet": "pool", "condition": {"type": "consumed_share", "percent": "50", "extra": 1}, "webhook_url": url, "secret": SECRET}))).await;
    assert_eq!(bad.status, 400, "strict bodies");

    // Drain the pool, then hit the empty Lite wallet twice.
    let body = json!({"model": "mock-gpt", "max_tokens": 200, "seed": 40});
    let mut drained = false;
    for _ in 0..100 {
        if post_json(&stack.url("/v1/chat/completions"), &keys.pro, &body).await.status == 402 {
            drained = true;
            break;
        }
    }
    assert!(drained);
    for _ in 0..2 {
        assert_eq!(post_json(&stack.url("/v1/chat/completions"), &keys.lite, &body).await.status, 402);
    }

    // Wait for every rule's webhook (one of them is retried after a 500).
    for _ in 0..300 {
        if seen.lock().unwrap().len() >= rule_ids.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Give a duplicate, if there were one, the time to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = seen.lock().unwrap().clone();
    assert!(received.iter().all(|r| r.signature_ok), "every signature verifies: {received:?}");
    let mut fired: Vec<u64> = received.iter().map(|r| r.event["rule"].as_u64().unwrap()).collect();
    fired.sort();
    assert_eq!(fired, rule_ids, "each rule fired exactly once: {received:#?}");
    let share = received.iter().find(|r| r.event["rule"] == rule_ids[1]).unwrap();
    assert!(share.event["facts"]["consumed_percent"].as_str().unwrap().parse::<f32>().is_ok());

    let deliveries =
        admin(&stack, Method::GET, &format!("/admin/v1/orgs/{org}/alerts/deliveries"), None).await.json();
    let deliveries = deliveries["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), rule_ids.len());
    assert!(deliveries.iter().all(|d| d["status"] == "delivered"), "{deliveries:#?}");
    assert!(deliveries.iter().any(|d| d["attempts"] == 2), "the first delivery was retried: {deliveries:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spending_limit_alert_fires_once_per_limit_period() {
    let clock = creditgate::clock::ManualClock::new(chrono::Utc::now());
    let stack = start_edited_with_clock(
        |text| text.replace("[admin]\n", "[admin]\nalert_webhook_allow = [\"127.0.0.1/32\"]\n"),
        clock.clone(),
    )
    .await;
    let org = stack.keys.org.0;
    let (url, seen) = receiver().await;
    let key = stack
        .gateway
        .ledger()
        .resolve_key(&creditgate::ledger::entity::KeyHash::of_secret(&stack.keys.pro))
        .unwrap();
    let limits =
        creditgate::ledger::limit::Limits { daily: Some("0.0005".parse().unwrap()), ..Default::default() };
    stack.gateway.ledger().set_key_limits(key.org, key.key, limits).unwrap();
    let rule = json!({"wallet": "pool", "condition": {"type": "spend_limit_reached"}, "webhook_url": url, "secret": SECRET});
    assert_eq!(
        admin(&stack, Method::POST, &format!("/admin/v1/orgs/{org}/alerts"), Some(rule)).await.status,
        201
    );
    let spend_until_refused = || async {
        let mut refusals = 0;
        for _ in 0..10 {
            let reply = post_json(
                &stack.url("/v1/chat/completions"),
                &stack.keys.pro,
                &json!({"model": "mock-gpt", "max_tokens": 20}),
            )
            .await;
            if reply.status == 402 {
                refusals += 1;
            }
        }
        refusals
    };
    // Deliveries arrive in their own time (the first attempt is failed on
    // purpose and retried): wait for `count`, then a moment more for any extra.
    let delivered = |count: usize| {
        let seen = seen.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while seen.lock().unwrap().len() < count && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            seen.lock().unwrap().clone()
        }
    };
    let refusals = spend_until_refused().await;
    assert!(refusals >= 2, "several refusals by the same limit: {refusals}");
    let received = delivered(1).await;
    assert_eq!(received.len(), 1, "one alert for the period, however many refusals: {received:#?}");
    assert_eq!(received[0].event["condition"]["type"], "spend_limit_reached");
    // The next day is another period: the limit is reached again, and told again.
    clock.advance(chrono::TimeDelta::days(1));
    let refusals = spend_until_refused().await;
    assert!(refusals >= 2, "the new day's limit is reached too: {refusals}");
    let received = delivered(2).await;
    assert_eq!(received.len(), 2, "one alert for each period: {received:#?}");
    assert_eq!(received[1].event["condition"]["type"], "spend_limit_reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_to_internal_addresses_are_refused_with_one_generic_answer() {
    // No allow-list: the receiver on 127.0.0.1 stands for any internal service.
    let stack = start().await;
    let org = stack.keys.org.0;
    let (url, seen) = receiver().await;
    let port = url.trim_start_matches("http://127.0.0.1:").trim_end_matches("/hook").to_owned();
    let path = format!("/admin/v1/orgs/{org}/alerts");
    let mut messages = Vec::new();
    for target in [
        url.clone(),
        "http://10.0.0.1/hook".to_owned(),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        format!("http://[::1]:{port}/hook"),
        format!("http://[::ffff:127.0.0.1]:{port}/hook"),
        format!("http://localhost:{port}/hook"),
    ] {
        let rule = json!({"wallet": "pool", "condition": {"type": "balance_below", "amount": "1000"}, "webhook_url": target, "secret": SECRET});
        let reply = admin_as(&stack, ORG_TOKEN, Method::POST, &path, Some(rule)).await;
        assert_eq!(reply.status, 422, "a well-formed URL the policy refuses: {target}: {:?}", reply.body);
        assert_eq!(reply.json()["error"]["field"], "webhook_url");
        messages.push(reply.json()["error"]["message"].clone());
    }
    messages.dedup();
    assert_eq!(messages.len(), 1, "one answer for every refused address: {messages:?}");

    // A spelling the URL check cannot judge without resolving (127.1 is 127.0.0.1)
    // is refused where it counts: on the address the delivery would connect to.
    let sneaky = json!({"wallet": "pool", "condition": {"type": "balance_below", "amount": "1000"}, "webhook_url": format!("http://127.1:{port}/hook"), "secret": SECRET});
    let added = admin_as(&stack, ORG_TOKEN, Method::POST, &path, Some(sneaky)).await;
    assert_eq!(added.status, 201, "{:?}", added.body);
    let reply = post_json(
        &stack.url("/v1/chat/completions"),
        &stack.keys.pro,
        &json!({"model": "mock-gpt", "max_tokens": 5}),
    )
    .await;
    assert_eq!(reply.status, 200);
    let deliveries_path = format!("/admin/v1/orgs/{org}/alerts/deliveries");
    let mut attempted = Value::Null;
    for _ in 0..500 {
        let deliveries = admin_as(&stack, ORG_TOKEN, Method::GET, &deliveries_path, None).await.json();
        if deliveries["deliveries"][0]["attempts"].as_u64().unwrap_or(0) >= 1 {
            attempted = deliveries["deliveries"][0].clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_ne!(attempted, Value::Null, "the alert fired and its delivery was attempted");
    assert_ne!(attempted["status"], "delivered");
    assert_eq!(
        attempted["last_error"], "not delivered",
        "org tokens learn nothing about the address: {attempted}"
    );
    assert!(seen.lock().unwrap().is_empty(), "nothing reached the internal receiver");
    let operator_view = admin(&stack, Method::GET, &deliveries_path, None).await.json();
    let reason = operator_view["deliveries"][0]["last_error"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("not an allowed webhook destination"), "the operator sees why: {reason}");
}
