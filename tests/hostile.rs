//! Hostile input and upstream faults: every malformed request gets a clear
//! 4xx and costs nothing; broken upstreams never break the books.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use creditgate::ledger::entity::KeyHash;
use http::Request;
use http_body_util::Full;
use rust_decimal::Decimal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn pool_balance(stack: &Stack) -> Decimal {
    let wallet = stack.gateway.ledger().resolve_key(&KeyHash::of_secret(&stack.keys.pro)).unwrap().wallet;
    let b = stack.gateway.ledger().balance(wallet, chrono::Utc::now()).unwrap();
    assert_eq!(b.balance, b.totals.balance(), "the books balance");
    b.balance
}

async fn wait_settled(stack: &Stack) -> Decimal {
    let wallet = stack.gateway.ledger().resolve_key(&KeyHash::of_secret(&stack.keys.pro)).unwrap().wallet;
    for _ in 0..300 {
        let b = stack.gateway.ledger().balance(wallet, chrono::Utc::now()).unwrap();
        if b.open_holds == 0 {
            assert_eq!(b.balance, b.totals.balance(), "the books balance");
            return b.balance;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("a hold stayed open");
}

/// Send raw bytes on a fresh connection and return the status line.
async fn raw(stack: &Stack, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(stack.gateway.proxy_addr()).await.unwrap();
    let _ = stream.write_all(request).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).lines().next().unwrap_or("").to_owned()
}

#[tokio::test]
async fn a_matrix_of_malformed_requests_gets_clear_4xx_and_costs_nothing() {
    let stack =
        start_with("max_body_bytes = 65536\nbody_read_timeout_ms = 300", "", Default::default()).await;
    let before = pool_balance(&stack);
    let key = stack.keys.pro.clone();
    let bodies: Vec<(String, u16)> = vec![
        (String::new(), 400),
        ("{".into(), 400),
        ("[]".into(), 400),
        ("null".into(), 400),
        ("\"just a string\"".into(), 400),
        (r#"{"model": 5}"#.into(), 400),
        (r#"{"model": ""}"#.into(), 400),
        (r#"{"model": null}"#.into(), 400),
        (r#"{"model": "mock-gpt", "max_tokens": -1}"#.into(), 400),
        (r#"{"model": "mock-gpt", "max_tokens": 1.5}"#.into(), 400),
        (r#"{"model": "mock-gpt", "max_tokens": 1e30}"#.into(), 400),
        (r#"{"model": "mock-gpt", "max_tokens": "10"}"#.into(), 400),
        (r#"{"model": "mock-gpt", "max_tokens": 18446744073709551615}"#.into(), 402),
        (r#"{"model": "mock-gpt", "stream": "yes"}"#.into(), 400),
        // Keys an upstream matching keys as Go does reads as a priced field.
        (r#"{"model": "mock-gpt", "Model": "mock-gpt-dear"}"#.into(), 400),
        (r#"{"model": "mock-gpt", "MAX_TOKENS": 100000}"#.into(), 400),
        (r#"{"model": "mock-gpt", "max_toKens": 100000}"#.into(), 400),
        (r#"{"model": "mock-gpt", "N": 128}"#.into(), 400),
        ("{\"model\": \"mock-gpt\u{0000}\"}".into(), 400),
        ("{\"model\": \"\u{202e}tpg-kcom\"}".into(), 400),
        ("{\"model\": \"𝓂𝑜𝒸𝓀-gpt\"}".into(), 400),
        ("{\"model\": \"mock-gpt\", \"max_tokens\": 5, \"x\": \"\u{fffd}\"}".into(), 200),
        (format!("{{\"model\": \"{}\"}}", "m".repeat(10_000)), 400),
        (format!("{{\"model\": \"mock-gpt\", \"pad\": \"{}\"}}", "x".repeat(70_000)), 413),
    ];
    let mut tried = 0;
    for (body, status) in &bodies {
        let reply = post_raw_body(&stack, &key, body.as_bytes()).await;
        assert_eq!(reply.status, *status, "body {:?}: {:?}", &body[..body.len().min(60)], reply.body);
        if *status != 200 {
            assert!(reply.json()["error"]["code"].is_string(), "a clear error code");
        }
        tried += 1;
    }
    // A name or path of the client's length is echoed (and logged) clipped.
    let long_model = format!("{{\"model\": \"{}\"}}", "m".repeat(60_000));
    let reply = post_raw_body(&stack, &key, long_model.as_bytes()).await;
    assert_eq!(reply.json()["error"]["code"], "model_not_priced");
    assert!(reply.body.len() < 1_024, "an error of {} bytes", reply.body.len());
    let long_path = format!("/{}", "p".repeat(60_000));
    let reply = send(Request::get(stack.url(&long_path)).body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(reply.status, 404);
    assert!(reply.body.len() < 1_024, "an error of {} bytes", reply.body.len());
    // Bytes that are not UTF-8 at all.
    let reply = post_raw_body(&stack, &key, &[0xff, 0xfe, b'{', 0x80]).await;
    assert_eq!(reply.status, 400);
    tried += 1;
    // Header tricks: an overlong or non-ASCII end-user id, or one with a
    // tab (shown in a report, "a<TAB>b" passed for "a b").
    for end_user in ["x".repeat(500), "ünïcödé".to_owned(), "a\tb".to_owned()] {
        let request = Request::post(stack.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {key}"))
            .header("x-creditgate-end-user", http::HeaderValue::from_bytes(end_user.as_bytes()).unwrap())
            .body(Full::new(Bytes::from(r#"{"model":"mock-gpt"}"#)))
            .unwrap();
        assert_eq!(send(request).await.status, 400, "end user {end_user:?}");
        tried += 1;
    }
    // An encoded body: the gateway prices the bytes as sent, and an upstream
    // that decodes them (raw deflate starts with `{` as well) could read
    // another document.
    for encoding in ["deflate", "br", "gzip, identity"] {
        let request = Request::post(stack.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {key}"))
            .header("content-encoding", encoding)
            .body(Full::new(Bytes::from(r#"{"model":"mock-gpt","max_tokens":5}"#)))
            .unwrap();
        let reply = send(request).await;
        assert_eq!(reply.status, 415, "content-encoding {encoding}: {:?}", reply.body);
        assert_eq!(reply.json()["error"]["code"], "request_encoding_not_supported");
        tried += 1;
    }
    // Nor behind an `identity` given first: the upstream reads both.
    let request = Request::post(stack.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-encoding", "identity")
        .header("content-encoding", "deflate")
        .body(Full::new(Bytes::from(r#"{"model":"mock-gpt","max_tokens":5}"#)))
        .unwrap();
    assert_eq!(send(request).await.status, 415, "a second content-encoding");
    tried += 1;
    // Header injection never gets through the parser.
    let status = raw(
        &stack,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-creditgate-end-user: a\rb: c\r\n\r\n",
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 4"), "{status}");
    // Oversized headers.
    let big =
        format!("GET /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(1 << 20));
    let status = raw(&stack, big.as_bytes()).await;
    assert!(
        status.is_empty() || status.starts_with("HTTP/1.1 431") || status.starts_with("HTTP/1.1 4"),
        "{status}"
    );
    // A body that stalls half-way gets 408.
    let slow = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-length: 100\r\n\r\n{{\"model\":"
    );
    let status = raw(&stack, slow.as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    tried += 4;

    let forwarded = stack.mock.journal().entries().len();
    assert_eq!(forwarded, 1, "only the one well-formed call reached the upstream");
    let after = wait_settled(&stack).await;
    let one_call = before - after;
    // One debit, of the well-formed call's reported usage: no refused
    // request held, let alone kept, anything.
    audit(&stack.gateway).await;
    let entries = stack.gateway.ledger_entries(0, usize::MAX).unwrap();
    let debits: Vec<_> = entries
        .iter()
        .filter_map(|entry| match &entry.kind {
            creditgate::ledger::entry::EntryKind::Debit(debit) => Some((entry.amount, debit)),
            _ => None,
        })
        .collect();
    assert_eq!(debits.len(), 1, "only the well-formed call was charged: {debits:?}");
    let (amount, debit) = debits[0];
    assert_eq!(-amount, one_call, "the pool paid that debit and nothing else");
    let reported = stack.mock.journal().entries()[0].usage.expect("the mock reported usage");
    assert_eq!(debit.details.usage.input_tokens, reported.input_tokens, "the input the upstream reported");
    assert_eq!(debit.details.usage.output_tokens, reported.output_tokens, "the output the upstream reported");
    println!("malformed cases tried: {tried}");
}

#[tokio::test]
async fn a_pass_through_on_a_metered_upstream_forwards_reads_only_unless_it_lists_more() {
    // Before, a pass-through written for `/v1/models` on the model upstream passed every
    // other create call under its prefix (batches, images, speech) on unmetered.
    let on_the_model_upstream = |text: String| {
        text.replace(
            "host = \"passthrough.test\"\nupstream = \"mock-direct\"\npassthrough = true\nmethods = [\"GET\", \"HEAD\", \"POST\", \"PUT\", \"PATCH\", \"DELETE\", \"OPTIONS\"]",
            "host = \"passthrough.test\"\nupstream = \"mock\"\npassthrough = true",
        )
    };
    let stack = start_edited(on_the_model_upstream).await;
    let before = pool_balance(&stack);
    let call = |method: &str, path: &str, extra: Option<(&str, &str)>| {
        let mut request = Request::builder()
            .method(method)
            .uri(stack.url(path))
            .header("host", "passthrough.test")
            .header("authorization", format!("Bearer {}", stack.keys.pro));
        if let Some((name, value)) = extra {
            request = request.header(name, value);
        }
        request.body(Full::new(Bytes::from(r#"{"model":"mock-gpt","prompt":"a cat"}"#))).unwrap()
    };
    for (method, path) in [
        ("POST", "/v1/images/generations"),
        ("POST", "/v1/batches"),
        ("PUT", "/v1/files/f1"),
        ("DELETE", "/v1/files/f1"),
    ] {
        let reply = send(call(method, path, None)).await;
        assert_eq!(reply.status, 405, "{method} {path}");
        assert_eq!(reply.json()["error"]["code"], "method_not_forwarded");
        assert_eq!(reply.header("allow"), Some("GET, HEAD, OPTIONS"));
    }
    // A read passes; a read that names another method in a header does not.
    // (The mock answers it 405 itself: it serves create calls only.)
    let read = send(call("GET", "/v1/models", None)).await;
    assert_eq!(read.json()["error"]["type"], "mock_error", "the read reached the upstream");
    for name in ["x-http-method-override", "X-HTTP-Method", "x-method-override"] {
        let reply = send(call("GET", "/v1/images/generations", Some((name, "POST")))).await;
        assert_eq!(reply.status, 400, "{name}");
        assert_eq!(reply.json()["error"]["code"], "method_override_not_allowed");
    }
    // Nor may a metered call read stored objects by naming GET.
    let request = Request::post(stack.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {}", stack.keys.pro))
        .header("x-http-method-override", "GET")
        .body(Full::new(Bytes::from(r#"{"model":"mock-gpt","max_tokens":5}"#)))
        .unwrap();
    assert_eq!(send(request).await.status, 400);
    let seen: Vec<(String, String)> =
        stack.mock.journal().entries().iter().map(|e| (e.method.clone(), e.uri.clone())).collect();
    assert_eq!(
        seen,
        [("GET".to_owned(), "/v1/models".to_owned())],
        "only the plain read reached the upstream"
    );
    assert_eq!(wait_settled(&stack).await, before, "nothing was charged");

    // The operator who lists POST forwards it, as configured.
    let listed = start_edited(|text| {
        on_the_model_upstream(text).replace(
            "host = \"passthrough.test\"\nupstream = \"mock\"\npassthrough = true",
            "host = \"passthrough.test\"\nupstream = \"mock\"\npassthrough = true\nmethods = [\"GET\", \"POST\"]",
        )
    })
    .await;
    let request = Request::post(listed.url("/v1/batches"))
        .header("host", "passthrough.test")
        .header("authorization", format!("Bearer {}", listed.keys.pro))
        .body(Full::new(Bytes::from("{}")))
        .unwrap();
    assert_ne!(send(request).await.status, 405);
    assert_eq!(listed.mock.journal().last().unwrap().uri, "/v1/batches");

    // A second upstream entry for the same API (kept for its timeouts, say),
    // spelled otherwise, is the same upstream: the metered route claims its
    // create calls, and its pass-through forwards reads only, unlisted.
    let second_entry = start_edited(|text| {
        let at = text.find("base_url = \"http://127.0.0.1:").unwrap() + "base_url = \"http://127.0.0.1:".len();
        let port: String = text[at..].chars().take_while(char::is_ascii_digit).collect();
        let entry = format!("[upstreams.mock-again]\nbase_url = \"HTTP://127.0.0.1:{port}/\"\n\n[[routes]]\n");
        text.replacen("[[routes]]\n", &entry, 1).replace(
            "upstream = \"mock-direct\"\npassthrough = true\nmethods = [\"GET\", \"HEAD\", \"POST\", \"PUT\", \"PATCH\", \"DELETE\", \"OPTIONS\"]",
            "upstream = \"mock-again\"\npassthrough = true",
        )
    })
    .await;
    let call = |path: &str| {
        Request::post(second_entry.url(path))
            .header("host", "passthrough.test")
            .header("authorization", format!("Bearer {}", second_entry.keys.pro))
            .body(Full::new(Bytes::from(r#"{"model":"mock-gpt","max_tokens":5}"#)))
            .unwrap()
    };
    let chat = send(call("/v1/chat/completions")).await;
    assert_eq!(chat.status, 200, "{}", String::from_utf8_lossy(&chat.body));
    assert!(chat.header("x-creditgate-available").is_some(), "metered: the chat call is the metered route's");
    let batch = send(call("/v1/batches")).await;
    assert_eq!(batch.status, 405, "{}", String::from_utf8_lossy(&batch.body));
    assert_eq!(batch.json()["error"]["code"], "method_not_forwarded");
    assert_eq!(second_entry.mock.journal().entries().len(), 1, "only the metered call reached the upstream");
}

/// Sends `request` and reads its 200 stream, which the mock breaks.
async fn read_a_stream_the_upstream_cuts(request: Request<Full<Bytes>>) {
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let result = http_body_util::BodyExt::collect(response.into_body()).await;
    assert!(result.is_err(), "the client sees the stream break, not a clean end");
}

async fn post_raw_body(stack: &Stack, key: &str, body: &[u8]) -> Reply {
    let request = Request::post(stack.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    send(request).await
}

#[tokio::test]
async fn garbage_usage_costs_the_hold_absurd_usage_the_ceiling_and_usage_past_the_cap_is_charged_in_full() {
    // Proves the settle never bills less than the upstream reported: a report above the hold is
    // debited whole (not cut to the hold), garbage that is no report at all costs the hold, and a
    // count past the route's ceiling (10M tokens by default) is charged at the ceiling.
    let stack = start().await;
    let body = r#"{"model":"mock-gpt","max_tokens":20}"#;
    let per_mtok = |tokens: u64, dollars: u64| Decimal::from(tokens * dollars) / Decimal::from(1_000_000u64);
    let fee = Decimal::new(1, 4);
    // The hold: one token per request byte at $1/M, 20 output tokens at $2/M, the fee.
    let hold = per_mtok(body.len() as u64, 1) + per_mtok(20, 2) + fee;
    for (usage, expected) in [
        (r#"{"prompt_tokens": -5, "completion_tokens": -9}"#, hold),
        (r#"{"prompt_tokens": "many", "completion_tokens": null}"#, hold),
        (r#"[1,2,3]"#, hold),
        (r#"{"prompt_tokens": 3, "completion_tokens": 999999}"#, per_mtok(3, 1) + per_mtok(999_999, 2) + fee),
        (
            r#"{"prompt_tokens": 1000000000000, "completion_tokens": 1000000000000}"#,
            per_mtok(10_000_000, 1) + per_mtok(10_000_000, 2) + fee,
        ),
    ] {
        let before = pool_balance(&stack);
        let request = Request::post(stack.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {}", stack.keys.pro))
            .header("x-mock-usage", usage)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        assert_eq!(send(request).await.status, 200, "the client still gets its answer");
        let charged = before - wait_settled(&stack).await;
        assert_eq!(charged, expected, "usage {usage}");
    }
}

#[tokio::test]
async fn an_upstream_that_resets_mid_stream_is_charged_for_what_was_delivered() {
    let stack = start().await;
    let before = pool_balance(&stack);
    let body = r#"{"model":"mock-gpt","stream":true,"max_tokens":40,"seed":30}"#;
    let request = Request::post(stack.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {}", stack.keys.pro))
        .header("x-mock-reset-after", "6")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    read_a_stream_the_upstream_cuts(request).await;
    let charged = before - wait_settled(&stack).await;
    // $1/M in, $2/M out and a $0.0001 fee: the estimate is the request's
    // input and fee, and the output delivered before the cut (six events
    // of text: at least a token), under the 40 tokens held.
    let input = Decimal::from((body.len() as u64).div_ceil(4));
    let full = (input + Decimal::from(80u64)) / Decimal::from(1_000_000u64) + Decimal::new(1, 4);
    let least = (input + Decimal::from(2u64)) / Decimal::from(1_000_000u64) + Decimal::new(1, 4);
    assert!(charged >= least && charged < full, "partial charge {charged}: from {least}, below {full}");
    // The gateway keeps serving.
    let reply = post_json(
        &stack.url("/v1/chat/completions"),
        &stack.keys.pro,
        &serde_json::json!({"model": "mock-gpt"}),
    )
    .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn a_running_total_reported_before_a_cut_is_charged_even_above_the_hold() {
    // Anthropic's `message_start` carries the whole input, which context the
    // request's bytes do not bound can make far larger than the hold. Before,
    // a stream cut after it was charged at most the hold.
    let stack = start().await;
    let before = pool_balance(&stack);
    let body = r#"{"model":"mock-claude","stream":true,"max_tokens":9}"#;
    let request = Request::post(stack.url("/v1/messages"))
        .header("authorization", format!("Bearer {}", stack.keys.pro))
        .header("x-mock-input-tokens", "400000")
        .header("x-mock-reset-after", "2")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    read_a_stream_the_upstream_cuts(request).await;
    let charged = before - wait_settled(&stack).await;
    // The reported input, at the long-context rate its size calls for ($6 per million).
    let table = stack.gateway.prices().unwrap().current();
    let price = table.model("mock-claude", chrono::Utc::now()).unwrap();
    let input = creditgate::pricing::TokenUsage { input_tokens: 400_000, ..Default::default() };
    assert_eq!(price.cost(&input).unwrap(), Decimal::new(24, 1));
    assert_eq!(charged, Decimal::new(24, 1), "the reported input is a floor on the bill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_organization_holds_at_most_its_share_of_the_body_budget() {
    // Before, one tenant's slow bodies (its keys are many, each with its own
    // in-flight cap) could hold the whole budget, and every other tenant's
    // model requests got 503. Now an organization holds at most its share.
    let server =
        "max_body_bytes = 65536\nmax_buffered_body_bytes = 262144\nmax_buffered_body_bytes_per_org = 65536";
    let stack = start_with(server, "", Default::default()).await;
    let other = common::seed(&stack.gateway, "100", "1");
    assert_ne!(other.org, stack.keys.org, "a second organization");
    let padded = |bytes: usize| {
        let head = r#"{"model":"mock-gpt","max_tokens":5,"user":""#;
        format!("{head}{}\"}}", "a".repeat(bytes - head.len() - 2))
    };
    let post = |key: String, body: String| {
        let url = stack.url("/v1/chat/completions");
        async move {
            let request = Request::post(url)
                .header("authorization", format!("Bearer {key}"))
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            send(request).await
        }
    };
    // The first organization's slow body holds 40,000 bytes of its 65,536.
    let mut slow = tokio::net::TcpStream::connect(stack.gateway.proxy_addr()).await.unwrap();
    let body = padded(60_000);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-length: {}\r\n\r\n",
        stack.keys.pro,
        body.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&body.as_bytes()[..40_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let refused = post(stack.keys.pro.clone(), padded(30_000)).await;
    assert_eq!(refused.status, 503, "past its share: {:?}", String::from_utf8_lossy(&refused.body));
    assert_eq!(refused.json()["error"]["code"], "gateway_busy");
    assert_eq!(post(stack.keys.pro.clone(), padded(20_000)).await.status, 200, "within its share");
    assert_eq!(post(other.pro.clone(), padded(60_000)).await.status, 200, "the other organization is served");
    drop(slow);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while post(stack.keys.pro.clone(), padded(60_000)).await.status != 200 {
        assert!(std::time::Instant::now() < deadline, "the share never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn bodies_read_whole_share_one_memory_budget() {
    // Each body is bounded by max_body_bytes, but before, not their sum: many
    // connections sending large bodies slowly held gigabytes between them.
    let server = "max_body_bytes = 65536\nmax_buffered_body_bytes = 65536";
    let stack = start_with(server, "", Default::default()).await;
    let key = stack.keys.pro.clone();
    let padded = |bytes: usize| {
        let head = r#"{"model":"mock-gpt","max_tokens":5,"user":""#;
        let pad = "a".repeat(bytes - head.len() - 2);
        format!("{head}{pad}\"}}")
    };
    let post = |body: String| {
        let key = key.clone();
        let url = stack.url("/v1/chat/completions");
        async move {
            let request = Request::post(url)
                .header("authorization", format!("Bearer {key}"))
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            send(request).await
        }
    };
    // A body is counted as it arrives, not as declared: declaring the whole
    // budget and sending nothing holds none of it.
    let mut idle = tokio::net::TcpStream::connect(stack.gateway.proxy_addr()).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-length: 65000\r\n\r\n"
    );
    idle.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(post(padded(30_000)).await.status, 200, "a declared length holds nothing");
    // A body that declares 60,000 bytes and stops after 40,000 holds its share.
    let mut slow = tokio::net::TcpStream::connect(stack.gateway.proxy_addr()).await.unwrap();
    let body = padded(60_000);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&body.as_bytes()[..40_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let refused = post(padded(30_000)).await;
    assert_eq!(refused.status, 503, "{:?}", String::from_utf8_lossy(&refused.body));
    assert_eq!(refused.json()["error"]["code"], "gateway_busy");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(post(padded(2_000)).await.status, 200, "what fits is served");
    // The slow client leaves: its share comes back.
    drop((slow, idle));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let reply = post(padded(30_000)).await;
        if reply.status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the budget never came back: {}", reply.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = post(padded(70_000)).await;
    assert_eq!(reply.status, 413, "the per-body bound still holds");
}

#[tokio::test]
async fn an_unwritable_data_directory_stops_the_start_with_a_clear_error() {
    let mock = creditgate::mock::MockUpstream::start("127.0.0.1:0".parse().unwrap(), Default::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A file where the data directory should be: nothing can be created in it.
    let blocked = dir.path().join("data");
    std::fs::write(&blocked, b"not a directory").unwrap();
    let config = parse_config(&config_text(mock.addr(), "", ""), &blocked);
    let error =
        creditgate::app::Gateway::start(config, tokio_util::sync::CancellationToken::new()).await.err();
    let message = format!("{:#}", error.expect("the gateway must refuse to start"));
    assert!(message.contains("data directory"), "{message}");
}

#[tokio::test]
async fn a_price_file_deleted_or_truncated_keeps_the_prices_in_force() {
    let stack = start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prices.toml");
    std::fs::copy(PRICES_FILE, &path).unwrap();
    let text = config_text(stack.mock.addr(), "", "").replace(PRICES_FILE, path.to_str().unwrap());
    let config = parse_config(&text, &dir.path().join("data"));
    let gateway =
        creditgate::app::Gateway::start(config, tokio_util::sync::CancellationToken::new()).await.unwrap();
    let prices = gateway.prices().unwrap();
    let version = prices.current().version().clone();
    let full = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, &full[..full.len() / 3]).unwrap();
    assert!(prices.reload(chrono::Utc::now(), "test").is_err(), "a truncated file is refused");
    std::fs::remove_file(&path).unwrap();
    assert!(prices.reload(chrono::Utc::now(), "test").is_err(), "a missing file is refused");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(prices.current().version(), &version, "the old table stays in force");
    let keys = seed(&gateway, "10", "1");
    let reply = post_json(
        &format!("http://{}/v1/chat/completions", gateway.proxy_addr()),
        &keys.pro,
        &serde_json::json!({"model": "mock-gpt"}),
    )
    .await;
    assert_eq!(reply.status, 200, "requests are still priced and served");
}

#[tokio::test]
async fn naming_the_host_of_a_pass_through_route_does_not_make_a_billed_endpoint_free() {
    // The client picks the Host. Before, a host-bound pass-through route on the same upstream as
    // the metered routes came first for every path under its prefix: any key holder who named
    // that host had chat completions forwarded unmetered.
    let stack = start_edited(|text| {
        text.replace(
            "host = \"passthrough.test\"\nupstream = \"mock-direct\"\npassthrough = true\nmethods = [\"GET\", \"HEAD\", \"POST\", \"PUT\", \"PATCH\", \"DELETE\", \"OPTIONS\"]",
            "host = \"passthrough.test\"\nupstream = \"mock\"\npassthrough = true",
        )
    })
    .await;
    let body = r#"{"model":"mock-gpt","max_tokens":20}"#;
    let per_mtok = |tokens: u64, dollars: u64| Decimal::from(tokens * dollars) / Decimal::from(1_000_000u64);
    for host in ["passthrough.test", "PASSTHROUGH.test:8080"] {
        let before = pool_balance(&stack);
        let request = Request::post(stack.url("/v1/chat/completions"))
            .header("host", host)
            .header("authorization", format!("Bearer {}", stack.keys.pro))
            .header("x-mock-usage", r#"{"prompt_tokens": 3, "completion_tokens": 7}"#)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let reply = send(request).await;
        assert_eq!(reply.status, 200);
        assert!(reply.header("x-creditgate-available").is_some(), "metered, for {host}");
        let charged = before - wait_settled(&stack).await;
        assert_eq!(charged, per_mtok(3, 1) + per_mtok(7, 2) + Decimal::new(1, 4), "for {host}");
    }
}

#[tokio::test]
async fn absurd_hosted_call_counts_are_charged_at_the_bound_sent_and_a_clipped_input_keeps_its_cache_split() {
    // Before, an upstream's count of hosted tool calls was charged whole:
    // 4,294,967,295 web searches were a debit of $42.9M, though the request
    // was sent a bound of 2 and the ceiling rule promised that a count past
    // it is garbage, not a bill. And a usage clipped at the route's ceiling
    // lost its cache split: hour-long cache writes were charged as plain
    // input. A top-level `max_tool_calls`, which Anthropic does not read,
    // held for none and sent none.
    let stack = start_edited(|text| {
        text.replacen(
            "flavour = \"anthropic-messages\"\n",
            "flavour = \"anthropic-messages\"\nusage_ceiling = 100000\n",
            1,
        )
    })
    .await;
    let table = stack.gateway.prices().unwrap().current();
    let now = chrono::Utc::now();
    let price = table.model("mock-claude", now).unwrap();
    let per_search = table.tool("web_search_requests", now).unwrap().cost(0).unwrap();
    let post = |body: serde_json::Value, usage: &'static str| {
        let request = Request::post(stack.url("/v1/messages"))
            .header("authorization", format!("Bearer {}", stack.keys.pro))
            .header("x-mock-usage", usage)
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        send(request)
    };
    let absurd =
        r#"{"input_tokens":10,"output_tokens":5,"server_tool_use":{"web_search_requests":4294967295}}"#;
    let tokens = price
        .cost(&creditgate::pricing::TokenUsage { input_tokens: 10, output_tokens: 5, ..Default::default() })
        .unwrap();
    let search = |max_uses: Option<u64>| match max_uses {
        Some(uses) => {
            serde_json::json!({"type": "web_search_20250305", "name": "web_search", "max_uses": uses})
        }
        None => serde_json::json!({"type": "web_search_20250305", "name": "web_search"}),
    };
    // One tool bounded at 2; then one at 2 and one the gateway bounds at the route's 10.
    for (tools, bound) in [(vec![search(Some(2))], 2u64), (vec![search(Some(2)), search(None)], 12)] {
        let before = pool_balance(&stack);
        let body =
            serde_json::json!({"model": "mock-claude", "max_tokens": 50, "messages": [], "tools": tools});
        let reply = post(body, absurd).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        let charged = before - wait_settled(&stack).await;
        assert_eq!(
            charged,
            tokens + per_search * Decimal::from(bound),
            "searches at the bound sent, {bound}"
        );
    }
    let body = serde_json::json!({"model": "mock-claude", "max_tokens": 50, "messages": [],
                                  "max_tool_calls": 0, "tools": [search(None)]});
    let reply = post(body, absurd).await;
    assert_eq!(reply.status, 400, "{:?}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "invalid_field");

    // 150,000 input tokens, 140,000 of them hour-long cache writes, past the
    // route's ceiling of 100,000: the writes keep their share of what is charged.
    let before = pool_balance(&stack);
    let usage = concat!(
        r#"{"input_tokens":10000,"cache_creation_input_tokens":140000,"#,
        r#""cache_creation":{"ephemeral_1h_input_tokens":140000},"output_tokens":5}"#
    );
    let body = serde_json::json!({"model": "mock-claude", "max_tokens": 50, "messages": []});
    assert_eq!(post(body, usage).await.status, 200);
    let charged = before - wait_settled(&stack).await;
    let clipped = creditgate::pricing::TokenUsage {
        input_tokens: 100_000,
        cache_write_1h_tokens: 93_334,
        output_tokens: 5,
        ..Default::default()
    };
    let plain =
        creditgate::pricing::TokenUsage { input_tokens: 100_000, output_tokens: 5, ..Default::default() };
    assert_eq!(charged, price.cost(&clipped).unwrap(), "the writes' share, 14/15, at the hour-long rate");
    assert!(charged > price.cost(&plain).unwrap(), "more than the same tokens as plain input");
}

#[tokio::test]
async fn a_stream_broken_off_by_the_upstream_costs_the_hold_on_a_model_that_reasons_unseen() {
    // OpenAI's reasoning models bill reasoning tokens they never stream.
    // Before, a stream the upstream (or a load balancer's idle timeout in
    // front of it) broke off was charged the text it had delivered: 15,000
    // reasoning tokens and a few words of answer cost the few words. Now a
    // model marked `hidden_reasoning` is charged its hold; others as before.
    let stack = start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prices.toml");
    let prices = std::fs::read_to_string(PRICES_FILE).unwrap();
    let reasoning =
        prices.replacen("[models.\"mock-gpt\"]", "[models.\"mock-gpt\"]\nhidden_reasoning = true", 1);
    assert_ne!(reasoning, prices);
    std::fs::write(&path, reasoning).unwrap();
    let text = config_text(stack.mock.addr(), "", "").replace(PRICES_FILE, path.to_str().unwrap());
    let config = parse_config(&text, &dir.path().join("data"));
    let gateway =
        creditgate::app::Gateway::start(config, tokio_util::sync::CancellationToken::new()).await.unwrap();
    let keys = seed(&gateway, "10", "1");
    let wallet = gateway.ledger().resolve_key(&KeyHash::of_secret(&keys.pro)).unwrap().wallet;
    let balance = |gateway: &creditgate::app::Gateway| {
        let b = gateway.ledger().balance(wallet, chrono::Utc::now()).unwrap();
        assert_eq!(b.balance, b.totals.balance(), "the books balance");
        (b.balance, b.open_holds)
    };
    let body = r#"{"model":"mock-gpt","stream":true,"max_tokens":40,"seed":30}"#;
    let per_mtok = |tokens: u64, dollars: u64| Decimal::from(tokens * dollars) / Decimal::from(1_000_000u64);
    let hold = per_mtok(body.len() as u64, 1) + per_mtok(40, 2) + Decimal::new(1, 4);
    let before = balance(&gateway).0;
    let request = Request::post(format!("http://{}/v1/chat/completions", gateway.proxy_addr()))
        .header("authorization", format!("Bearer {}", keys.pro))
        .header("x-mock-reset-after", "6")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    read_a_stream_the_upstream_cuts(request).await;
    let mut after = balance(&gateway);
    for _ in 0..300 {
        if after.1 == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        after = balance(&gateway);
    }
    assert_eq!(before - after.0, hold, "the hold, not the text delivered");

    // On any model, a request that asks for reasoning (Claude 4 streams only
    // a summary of its thinking and bills all of it) is charged its hold too;
    // one that turns reasoning off is charged what it delivered.
    for (options, charged_hold) in [
        (r#""reasoning_effort":"high""#, true),
        (r#""thinking":{"type":"enabled","budget_tokens":1024}"#, true),
        (r#""reasoning":{"effort":"none"}"#, false),
    ] {
        let body = format!(r#"{{"model":"mock-gpt","stream":true,"max_tokens":40,"seed":30,{options}}}"#);
        let hold = per_mtok(body.len() as u64, 1) + per_mtok(40, 2) + Decimal::new(1, 4);
        let before = pool_balance(&stack);
        let request = Request::post(stack.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {}", stack.keys.pro))
            .header("x-mock-reset-after", "6")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        read_a_stream_the_upstream_cuts(request).await;
        let charged = before - wait_settled(&stack).await;
        assert_eq!(charged == hold, charged_hold, "{options}: {charged} against a hold of {hold}");
        assert!(charged > Decimal::ZERO && charged <= hold, "{options}: {charged}");
    }
}

#[tokio::test]
async fn what_an_upstream_reads_beside_the_body_cannot_name_another_model() {
    // LiteLLM's proxy takes `?model=` over the body's `model`, and one-api-style
    // aggregators pick their body parser by content-type. Before, both went
    // upstream while the gateway priced the body's cheap model. (Its legacy
    // `/engines/{model}/...` paths: `check_deployment`'s unit test.)
    let stack = start().await;
    let before = pool_balance(&stack);
    let body = r#"{"model":"mock-gpt","max_tokens":5}"#;
    let call = |path: &str, content_type: Option<&str>| {
        let mut request =
            Request::post(stack.url(path)).header("authorization", format!("Bearer {}", stack.keys.pro));
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.body(Full::new(Bytes::from(body))).unwrap()
    };
    for (path, content_type, status, code) in [
        ("/v1/chat/completions?model=mock-claude", None, 400, "query_param_not_accepted"),
        ("/v1/chat/completions?stream=true&m%6Fdel=mock-claude", None, 400, "query_param_not_accepted"),
        (
            "/v1/chat/completions",
            Some("application/x-www-form-urlencoded"),
            415,
            "content_type_not_supported",
        ),
        ("/v1/chat/completions", Some("multipart/form-data; boundary=x"), 415, "content_type_not_supported"),
    ] {
        let reply = send(call(path, content_type)).await;
        assert_eq!(reply.status, status, "{path} {content_type:?}: {}", String::from_utf8_lossy(&reply.body));
        assert_eq!(reply.json()["error"]["code"], code, "{path}");
    }
    assert!(stack.mock.journal().entries().is_empty(), "none reached the upstream");
    assert_eq!(wait_settled(&stack).await, before, "none was charged");
    // What the upstream needs passes: Azure's `api-version` (the default
    // allowance), JSON with a charset.
    let reply =
        send(call("/v1/chat/completions?api-version=2024-10-21", Some("application/json; charset=utf-8")))
            .await;
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    assert_eq!(stack.mock.journal().last().unwrap().uri, "/v1/chat/completions?api-version=2024-10-21");
}
