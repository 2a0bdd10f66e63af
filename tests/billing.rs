//! Billing integrity against an upstream that behaves like the real
//! providers (tests/common/provider.rs): every request is charged what the
//! upstream reported, never less, and no wallet overdraws while the upstream
//! honours the cap it was sent. One test per way a hostile client or a real
//! provider broke the books before.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::provider::Provider;
use common::*;
use creditgate::app::Gateway;
use creditgate::demo::SeededKeys;
use creditgate::ledger::entity::KeyHash;
use creditgate::ledger::entry::EntryKind;
use creditgate::ledger::ids::WalletId;
use creditgate::pricing::TokenUsage;
use http::Request;
use http_body_util::{BodyExt, Full};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Books {
    /// First: dropped while the gateway still runs.
    _books: BooksCheck,
    provider: Provider,
    gateway: Gateway,
    keys: SeededKeys,
    _data_dir: tempfile::TempDir,
}

impl Books {
    async fn start(edit: impl FnOnce(String) -> String, pool: &str, lite: &str) -> Books {
        let provider = Provider::start().await;
        let data_dir = tempfile::tempdir().unwrap();
        let text = edit(config_text(provider.addr(), "", ""));
        let config = parse_config(&text, data_dir.path());
        let gateway = Gateway::start(config, tokio_util::sync::CancellationToken::new()).await.unwrap();
        let keys = seed(&gateway, pool, lite);
        Books { provider, _books: BooksCheck::of(&gateway), gateway, keys, _data_dir: data_dir }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.proxy_addr())
    }

    fn wallet(&self, key: &str) -> WalletId {
        self.gateway.ledger().resolve_key(&KeyHash::of_secret(key)).unwrap().wallet
    }

    /// The wallet's balance once no hold is open; the books must balance.
    async fn settled_balance(&self, key: &str) -> Decimal {
        let wallet = self.wallet(key);
        for _ in 0..500 {
            let b = self.gateway.ledger().balance(wallet, chrono::Utc::now()).unwrap();
            if b.open_holds == 0 {
                assert_eq!(b.balance, b.totals.balance(), "balance == granted - debited - written_off");
                return b.balance;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("a hold stayed open");
    }

    /// What the price table says `input`/`output` tokens of `model` cost.
    fn cost(&self, model: &str, input: u64, output: u64) -> Decimal {
        let table = self.gateway.prices().unwrap().current();
        let price = table.model(model, chrono::Utc::now()).unwrap();
        price
            .cost(&TokenUsage {
                input_tokens: input,
                cached_input_tokens: 0,
                output_tokens: output,
                ..TokenUsage::default()
            })
            .unwrap()
    }

    /// The cost of what the provider last reported.
    fn reported_cost(&self, model: &str) -> Decimal {
        let last = self.provider.last();
        self.cost(model, last.input_tokens, last.output_tokens)
    }

    async fn post(&self, path: &str, key: Option<&str>, headers: &[(&str, &str)], body: &Value) -> Reply {
        let mut request = Request::post(self.url(path)).header("content-type", "application/json");
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        send(request.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await
    }

    /// POST a body exactly as written (JSON spelled as a test needs it).
    async fn post_text(&self, path: &str, key: &str, body: &'static str) -> Reply {
        let request = Request::post(self.url(path))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"));
        send(request.body(Full::new(Bytes::from_static(body.as_bytes()))).unwrap()).await
    }

    /// POST `body` with `key` on a connection of its own; the response's body unread.
    async fn open_post(
        &self,
        path: &str,
        key: &str,
        headers: &[(&str, &str)],
        body: &Value,
    ) -> http::Response<hyper::body::Incoming> {
        let mut sender = open_h1(self.gateway.proxy_addr()).await;
        let mut request = Request::post(self.url(path)).header("authorization", format!("Bearer {key}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = creditgate::mock::MockBody::Full(Some(Bytes::from(body.to_string())));
        let response = sender.send_request(request.body(body).unwrap()).await.unwrap();
        // The connection lives on with its task; the sender is not needed to read the body.
        drop(sender);
        response
    }

    /// The hold of the durable debit of `amount` (entries are exported once durable).
    async fn debit_held(&self, amount: Decimal) -> Option<Decimal> {
        for _ in 0..200 {
            let held =
                self.gateway.ledger_entries(0, 1000).unwrap().iter().rev().find_map(|e| match &e.kind {
                    EntryKind::Debit(debit) if e.amount.abs() == amount => Some(debit.held),
                    _ => None,
                });
            if held.is_some() {
                return held;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.gateway.admin_addr());
        let reply = send(Request::get(url).body(Full::new(Bytes::new())).unwrap()).await;
        String::from_utf8_lossy(&reply.body).into_owned()
    }
}

const CHAT: &str = "/v1/chat/completions";

#[tokio::test]
async fn the_held_cap_goes_upstream_so_a_small_wallet_is_never_overdrawn() {
    // Proves defect 1: a request without max_tokens used to be held at the default cap but
    // forwarded without one, so a provider writing 1M tokens took a $0.001 Lite wallet to -$2.
    // Now the cap that was held is the cap sent, lowered to what the wallet can pay, then 402.
    let books = Books::start(|t| t, "100", "0.001").await;
    let lite = books.keys.lite.clone();
    let body = json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "write forever"}]});
    let mut served = 0;
    let mut lowered = false;
    loop {
        let before = books.settled_balance(&lite).await;
        let reply = books.post(CHAT, Some(&lite), &[("x-provider-output", "1000000")], &body).await;
        if reply.status == 402 {
            assert_eq!(reply.json()["error"]["code"], "insufficient_credits");
            break;
        }
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        served += 1;
        let cap: u64 = reply.header("x-creditgate-max-output-tokens").unwrap().parse().unwrap();
        let sent = books.provider.last().body["max_completion_tokens"].as_u64();
        assert_eq!(sent, Some(cap), "the cap that was held is the cap the upstream got");
        assert!((16..=256).contains(&cap), "between the route minimum and the default: {cap}");
        lowered |= cap < 256;
        let after = books.settled_balance(&lite).await;
        assert_eq!(before - after, books.reported_cost("mock-gpt"), "charged what the provider reported");
        assert!(after >= Decimal::ZERO, "the Lite wallet never goes below zero: {after}");
        assert!(served < 20, "the wallet must run dry");
    }
    assert!(served >= 2 && lowered, "small balances get an affordable cap before the 402 ({served} served)");
}

#[tokio::test]
async fn n_choices_are_held_and_usage_past_the_hold_is_charged_in_full() {
    // Proves defect 2: `n: 64` with max_tokens 10 used to be held and charged for 10 output
    // tokens. Now the hold covers 64 choices, and an upstream that ignores the cap is still
    // charged all it reported (flagged as over the hold), never cut to the hold.
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    let body = json!({"model": "mock-gpt", "max_tokens": 10, "n": 64, "messages": []});
    let before = books.settled_balance(&pro).await;
    let reply = books.post(CHAT, Some(&pro), &[("x-provider-output", "500")], &body).await;
    assert_eq!(reply.status, 200);
    assert_eq!(books.provider.last().output_tokens, 640, "64 choices of 10 tokens");
    let first = before - books.settled_balance(&pro).await;
    assert_eq!(first, books.reported_cost("mock-gpt"));

    let before = books.settled_balance(&pro).await;
    let headers = [("x-provider-output", "500"), ("x-provider-ignore-cap", "1")];
    assert_eq!(books.post(CHAT, Some(&pro), &headers, &body).await.status, 200);
    assert_eq!(books.provider.last().output_tokens, 32_000);
    let charged = before - books.settled_balance(&pro).await;
    assert_eq!(charged, books.reported_cost("mock-gpt"), "all 32,000 tokens are charged");
    assert!(charged > first, "more than the hold");
    assert!(books
        .metrics()
        .await
        .lines()
        .any(|line| line == "creditgate_settles_total{result=\"debited_over_hold\"} 1"));
    // Entries are exported once durable: wait for this one.
    let mut last_debit = None;
    for _ in 0..200 {
        let entries = books.gateway.ledger_entries(0, 1000).unwrap();
        last_debit = entries.iter().rev().find_map(|e| match &e.kind {
            EntryKind::Debit(debit) if e.amount.abs() == charged => Some(debit.clone()),
            _ => None,
        });
        if last_debit.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let debit = last_debit.expect("a debit entry");
    assert!(debit.held < charged, "the entry shows the hold it went past: {} < {charged}", debit.held);

    for n in ["0", "129", "\"2\""] {
        let bad: Value = serde_json::from_str(&format!(r#"{{"model":"mock-gpt","n":{n}}}"#)).unwrap();
        assert_eq!(books.post(CHAT, Some(&pro), &[], &bad).await.status, 400, "n = {n}");
    }
    let conflicting = json!({"model": "mock-gpt", "max_tokens": 10, "max_completion_tokens": 5000});
    assert_eq!(books.post(CHAT, Some(&pro), &[], &conflicting).await.status, 400, "two caps that disagree");
    let unread = json!({"model": "mock-gpt", "max_output_tokens": 10});
    assert_eq!(books.post(CHAT, Some(&pro), &[], &unread).await.status, 400, "a cap chat does not read");
}

#[tokio::test]
async fn context_the_upstream_reads_itself_is_held_for_and_charged() {
    // Proves defect 2 (server-side context): previous_response_id made the upstream read far
    // more input than the request carried, and that usage was charged at the small hold.
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    let body = json!({"model": "mock-gpt", "previous_response_id": "resp_1", "input": "and then?"});
    let before = books.settled_balance(&pro).await;
    assert_eq!(books.post("/v1/responses", Some(&pro), &[], &body).await.status, 200);
    assert!(books.provider.last().input_tokens > 50_000);
    assert_eq!(before - books.settled_balance(&pro).await, books.reported_cost("mock-gpt"));

    let refusing = Books::start(
        |t| {
            t.replace(
                "flavour = \"openai-responses\"",
                "flavour = \"openai-responses\"\ncontext_budget_tokens = 0",
            )
        },
        "100",
        "1",
    )
    .await;
    let reply = refusing.post("/v1/responses", Some(&refusing.keys.pro), &[], &body).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["code"], "server_context_not_allowed");
    // The same key spelled with JSON escapes is the same key to the upstream.
    let escaped = r#"{"model":"mock-gpt","\u0070revious_response_id":"resp_1","input":"and then?"}"#;
    let reply = refusing.post_text("/v1/responses", &refusing.keys.pro, escaped).await;
    assert_eq!(reply.status, 400, "{:?}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "server_context_not_allowed");
    assert!(refusing.provider.received().is_empty(), "nothing was forwarded");
    // Text that only mentions a marker, its quotes escaped, is not context.
    let text = r#"{"model":"mock-gpt","input":"what is a \u0022prompt\u0022 or a \"url\"?"}"#;
    assert_eq!(refusing.post_text("/v1/responses", &refusing.keys.pro, text).await.status, 200);
    // Tool servers, stored items, base64 media and every version of a fetching tool read
    // input the request does not carry (or whose tokens its bytes do not bound).
    for reads in [
        json!({"tools": [{"type": "mcp", "server_label": "x", "server_url": "https://tools.test/mcp"}]}),
        json!({"input": [{"type": "item_reference", "id": "msg_1"}]}),
        json!({"input": [{"role": "user", "content": [{"type": "input_file", "file_data": "data:application/pdf;base64,AA"}]}]}),
        json!({"tools": [{"type": "web_search_preview_2025_03_11"}]}),
        // Gemini's cached contents, Mistral's documents fetched by URL.
        json!({"extra_body": {"google": {"cached_content": "cachedContents/abc"}}}),
        json!({"input": [{"role": "user", "content": [{"type": "document_url", "document_url": "https://d.test/a.pdf"}]}]}),
    ] {
        let mut body = json!({"model": "mock-gpt", "input": "hi"});
        body.as_object_mut().unwrap().extend(reads.as_object().unwrap().clone());
        let reply = refusing.post("/v1/responses", Some(&refusing.keys.pro), &[], &body).await;
        assert_eq!(reply.status, 400, "{body}");
        assert_eq!(reply.json()["error"]["code"], "server_context_not_allowed");
    }
    // An embedding asked for in base64 reads nothing more.
    let body = json!({"model": "mock-embed", "input": "hi", "encoding_format": "base64"});
    assert_eq!(refusing.post("/v1/embeddings", Some(&refusing.keys.pro), &[], &body).await.status, 200);
    // A background response is billed after the connection ends, where no meter reads it.
    let body = json!({"model": "mock-gpt", "input": "think long", "background": true});
    let reply = books.post("/v1/responses", Some(&pro), &[], &body).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["code"], "background_not_supported");
}

#[tokio::test]
async fn a_path_that_spells_letters_as_escapes_is_routed_as_the_upstream_reads_it() {
    // `/v1/chat/%63ompletions` is `/v1/chat/completions` to the upstream; routed as written it
    // missed the metered route and, with a broad unmetered route configured, was served free.
    let books = Books::start(|t| t.replace("prefix = \"/echo\"", "prefix = \"/\""), "100", "1").await;
    let pro = books.keys.pro.clone();
    let before = books.settled_balance(&pro).await;
    let body = json!({"model": "mock-gpt", "max_tokens": 40});
    let reply = books.post("/v1/chat/%63omplet%69ons", Some(&pro), &[], &body).await;
    assert_eq!(reply.status, 200);
    assert_eq!(books.provider.last().path, "/v1/chat/completions");
    assert_eq!(before - books.settled_balance(&pro).await, books.reported_cost("mock-gpt"), "metered");
    // Other escapes are forwarded as written: `%20` is not an unreserved character.
    books.post("/v1/chat/%20x", Some(&pro), &[], &body).await;
    assert_eq!(books.provider.last().path, "/v1/chat/%20x");
    // A `%` that starts no escape could make one once its neighbours are decoded.
    let forwarded = books.provider.received().len();
    assert_eq!(books.post("/v1/chat/%%36%33ompletions", Some(&pro), &[], &body).await.status, 400);
    assert_eq!(books.provider.received().len(), forwarded, "not forwarded");
}

#[tokio::test]
async fn a_model_route_creates_calls_and_never_reaches_stored_objects() {
    // GET /v1/chat/completions lists, and /v1/responses/{id} reads, the stored objects of every
    // tenant on the operator's upstream account; priced by a body's `model`, they went through.
    // A broad unmetered route (here `/`) must not take what the model routes refuse.
    let books = Books::start(|t| t.replace("prefix = \"/echo\"", "prefix = \"/\""), "100", "1").await;
    let pro = books.keys.pro.clone();
    let body = json!({"model": "mock-gpt", "max_tokens": 1}).to_string();
    for (method, path, status) in [
        ("GET", CHAT, 405),
        ("DELETE", "/v1/responses", 405),
        ("GET", "/v1/responses/resp_1", 404),
        ("GET", "/v1/responses/resp_1/input_items", 404),
        ("POST", "/v1/messages/batches", 404),
        ("POST", "/v1/chat/completions/chatcmpl_1", 404),
    ] {
        let request = Request::builder()
            .method(method)
            .uri(books.url(path))
            .header("authorization", format!("Bearer {pro}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        let reply = send(request).await;
        assert_eq!(reply.status.as_u16(), status, "{method} {path}");
        if status == 405 {
            assert_eq!(reply.header("allow"), Some("POST"));
        }
    }
    assert!(books.provider.received().is_empty(), "nothing was forwarded");
}

#[tokio::test]
async fn an_end_user_is_an_applications_and_is_not_sent_upstream() {
    // A user key naming an end user put the user's spend on an application customer's
    // chargeback rows; and every end-user id went on to the provider.
    let books = Books::start(|t| t, "100", "1").await;
    let body = json!({"model": "mock-gpt", "max_tokens": 5});
    let end_user = [("x-creditgate-end-user", "customer-42")];
    assert_eq!(books.post(CHAT, Some(&books.keys.app), &end_user, &body).await.status, 200);
    assert!(!books.provider.last().headers.contains_key("x-creditgate-end-user"), "not forwarded");
    let reply = books.post(CHAT, Some(&books.keys.pro), &end_user, &body).await;
    assert_eq!(reply.status, 400);
    assert_eq!(books.provider.received().len(), 1, "the user key's call was not forwarded");
    // Nor are the client's keys under the names Azure and Google read them from.
    let pro = books.keys.pro.clone();
    let keys = [("api-key", pro.as_str()), ("x-goog-api-key", pro.as_str())];
    assert_eq!(books.post(CHAT, Some(&pro), &keys, &body).await.status, 200);
    let forwarded = &books.provider.last().headers;
    assert!(!forwarded.contains_key("api-key") && !forwarded.contains_key("x-goog-api-key"), "{forwarded:?}");
}

#[tokio::test]
async fn a_body_the_upstream_compressed_unasked_is_charged_its_hold_however_it_ends() {
    // The gateway asks for an unencoded body; one compressed anyway cannot be metered. Read to
    // its end it was charged the hold, but a client that left mid-body was charged an estimate
    // of its request alone.
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    for leave in [false, true] {
        let before = books.settled_balance(&pro).await;
        let headers = [("x-provider-gzip-anyway", "1"), ("x-provider-pace-ms", "500")];
        let body = json!({"model": "mock-gpt", "max_tokens": 100});
        let response = books.open_post(CHAT, &pro, &headers, &body).await;
        assert_eq!(response.headers()["content-encoding"], "gzip");
        if leave {
            let mut body = response.into_body();
            next_chunk(&mut body).await.unwrap();
            drop(body);
        } else {
            response.into_body().collect().await.unwrap();
        }
        let charged = before - books.settled_balance(&pro).await;
        assert_eq!(books.debit_held(charged).await, Some(charged), "left mid-body: {leave}");
    }
}

#[tokio::test]
async fn an_answer_longer_than_its_hold_that_ends_without_usage_is_charged_what_it_delivered() {
    // A server that reads another cap field (Ollama's OpenAI layer reads only
    // `max_tokens`) ignores the one sent and writes on. When such an answer
    // ended without usage (broken off, or cut), it was charged at most its
    // hold, whatever it had delivered: 40,000 bytes for the price of 10
    // tokens. Now what it delivered is charged, above the hold.
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    let before = books.settled_balance(&pro).await;
    let headers =
        [("x-provider-ignore-cap", "1"), ("x-provider-text-bytes", "40000"), ("x-provider-reset-after", "1")];
    let body = json!({"model": "mock-gpt", "max_tokens": 10, "stream": true});
    let response = books.open_post(CHAT, &pro, &headers, &body).await;
    let _ = response.into_body().collect().await;
    let charged = before - books.settled_balance(&pro).await;
    // 40,000 bytes at four a token: 10,000 output tokens at $2/M.
    assert!(charged > Decimal::new(2, 2), "charged {charged}, under what it delivered");
    let held = books.debit_held(charged).await.unwrap();
    assert!(charged > held, "above the hold of {held}");
}

#[tokio::test]
async fn an_upstream_whose_chat_reads_only_max_tokens_gets_the_held_cap_there() {
    // Ollama's OpenAI layer (and llama.cpp's, DeepSeek's) reads only
    // `max_tokens`: the cap the gateway wrote into `max_completion_tokens`,
    // or a client's own cap there, was ignored, and the answer ran past its
    // hold. Such an upstream is set `chat_cap_field = "max_tokens"`.
    let books = Books::start(
        |t| {
            t.replace(
                "credential_env = \"MOCK_UPSTREAM_KEY\"",
                "credential_env = \"MOCK_UPSTREAM_KEY\"\nchat_cap_field = \"max_tokens\"",
            )
        },
        "100",
        "1",
    )
    .await;
    let pro = books.keys.pro.clone();
    let body = json!({"model": "mock-gpt", "messages": []});
    assert_eq!(books.post(CHAT, Some(&pro), &[], &body).await.status, 200);
    let sent = books.provider.last().body;
    assert_eq!(sent["max_tokens"], 256, "the model's default cap, held and sent where it is read: {sent}");
    assert!(sent.get("max_completion_tokens").is_none(), "{sent}");
    let body = json!({"model": "mock-gpt", "messages": [], "max_completion_tokens": 5});
    let reply = books.post(CHAT, Some(&pro), &[], &body).await;
    assert_eq!(reply.status, 400, "a cap this upstream would not read");
    let message = reply.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("`max_completion_tokens`") && message.contains("use `max_tokens`"), "{message}");
    let body = json!({"model": "mock-gpt", "messages": [], "max_tokens": 5});
    assert_eq!(books.post(CHAT, Some(&pro), &[], &body).await.status, 200);
    assert_eq!(books.provider.last().body["max_tokens"], 5);
    // Caps other servers read in place of the API's are refused everywhere.
    for (field, value) in [
        ("n_predict", json!(-1)),
        ("num_predict", json!(100000)),
        ("max_new_tokens", json!(9)),
        ("options", json!({"num_predict": -1})),
    ] {
        let mut body = json!({"model": "mock-gpt", "messages": [], "max_tokens": 5});
        body[field] = value;
        let reply = books.post(CHAT, Some(&pro), &[], &body).await;
        assert_eq!(reply.status, 400, "{field}");
    }
}

#[tokio::test]
async fn an_edge_timeout_is_charged_its_hold_even_when_the_client_hangs_up_on_it() {
    // A 524 (the edge in front of the upstream stopped waiting; the origin
    // runs the call on, and bills it) is charged the hold. A client that hung
    // up on seeing its head was charged an estimate of its request and the
    // edge's page instead.
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    for leave in [false, true] {
        let before = books.settled_balance(&pro).await;
        let headers = [("x-provider-status", "524"), ("x-provider-pace-ms", "500")];
        let body = json!({"model": "mock-gpt", "max_tokens": 100});
        let response = books.open_post(CHAT, &pro, &headers, &body).await;
        assert_eq!(response.status(), 524);
        if leave {
            drop(response);
        } else {
            response.into_body().collect().await.unwrap();
        }
        let charged = before - books.settled_balance(&pro).await;
        assert!(charged > Decimal::ZERO, "left: {leave}");
        assert_eq!(books.debit_held(charged).await, Some(charged), "the hold, left: {leave}");
    }
}

#[tokio::test]
async fn a_call_the_client_leaves_before_its_answer_is_charged_what_the_upstream_bills() {
    // A client that hung up while the upstream was still thinking paid nothing, though the
    // upstream had the call and billed it: a long call that does not stream was free to any
    // client that closed its socket just before the answer.
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    let wallet = books.wallet(&pro);
    let before = books.settled_balance(&pro).await;
    let body = r#"{"model":"mock-gpt","max_tokens":100}"#;
    {
        let mut stream = tokio::net::TcpStream::connect(books.gateway.proxy_addr()).await.unwrap();
        let request = format!(
            "POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {pro}\r\n\
             x-provider-head-delay-ms: 2000\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        // Once the upstream has it (so it is held), while it thinks.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while books.provider.received().is_empty() {
            assert!(std::time::Instant::now() < deadline, "the call never reached the upstream");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let open = books.gateway.ledger().balance(wallet, chrono::Utc::now()).unwrap().open_holds;
        assert_eq!(open, 1, "the call holds while the upstream thinks");
    } // the client hangs up
    let charged = before - books.settled_balance(&pro).await;
    assert!(charged > Decimal::ZERO, "the upstream answered and billed the call");
    assert_eq!(charged, books.reported_cost("mock-gpt"), "charged what the upstream reported");
}

#[tokio::test]
async fn a_call_the_gateway_stops_waiting_for_is_charged_from_its_late_answer_or_its_hold() {
    // A 504 (the head later than the upstream's response_timeout) released the hold, though
    // the upstream went on with the call and billed it: a client could make a call slow
    // enough (a long prompt, a reasoning model) to be served free.
    let books = Books::start(
        |t| {
            t.replace("[upstreams.mock]", "[upstreams.mock]\nresponse_timeout_ms = 300")
                .replace("shutdown_grace_ms = 5000", "shutdown_grace_ms = 5000\nread_on_timeout_ms = 1000")
        },
        "100",
        "1",
    )
    .await;
    let pro = books.keys.pro.clone();
    let body = json!({"model": "mock-gpt", "max_tokens": 100});
    // Late, then answered within the read-on time: the answer's usage is the bill.
    let before = books.settled_balance(&pro).await;
    let reply = books.post(CHAT, Some(&pro), &[("x-provider-head-delay-ms", "600")], &body).await;
    assert_eq!(reply.status, 504, "{:?}", reply.body);
    let charged = before - books.settled_balance(&pro).await;
    assert!(charged > Decimal::ZERO);
    assert_eq!(charged, books.reported_cost("mock-gpt"), "charged what the late answer reported");
    // No answer at all within it: the upstream may bill up to the cap, so the hold.
    let before = books.settled_balance(&pro).await;
    let reply = books.post(CHAT, Some(&pro), &[("x-provider-head-delay-ms", "5000")], &body).await;
    assert_eq!(reply.status, 504, "{:?}", reply.body);
    let charged = before - books.settled_balance(&pro).await;
    assert!(charged > Decimal::ZERO);
    assert_eq!(books.debit_held(charged).await, Some(charged), "a call never answered is charged its hold");
    // Each 504 is one request answered, however late its call settled.
    let metrics = books.metrics().await;
    let answered =
        metrics.lines().find(|l| l.starts_with("creditgate_requests_total") && l.contains("\"504\""));
    assert!(answered.is_some_and(|l| l.ends_with(" 2")), "{metrics}");
}

#[tokio::test]
async fn a_client_request_id_names_no_hold_and_the_ttl_spares_running_requests() {
    // Proves defect 3: the client's x-request-id keyed the hold, so two requests with one id
    // collided, and the TTL voided a hold still streaming (freeing credit it was spending).
    let books =
        Books::start(|t| t.replace("[log]", "[ledger]\nhold_ttl_ms = 1000\n\n[log]"), "100", "1").await;
    let pro = books.keys.pro.clone();
    let wallet = books.wallet(&pro);
    let body = json!({"model": "mock-gpt", "stream": true, "max_tokens": 50});
    let headers = [
        ("x-request-id", "0192f0c4-7a1b-7cde-8f00-1234567890ab"),
        ("x-provider-pace-ms", "100"),
        ("x-provider-usage-delay-ms", "3000"),
    ];
    let before = books.settled_balance(&pro).await;
    let (first, second, ()) = tokio::join!(
        books.post(CHAT, Some(&pro), &headers, &body),
        books.post(CHAT, Some(&pro), &headers, &body),
        async {
            tokio::time::sleep(Duration::from_millis(2000)).await;
            let b = books.gateway.ledger().balance(wallet, chrono::Utc::now()).unwrap();
            assert_eq!(b.open_holds, 2, "past the 1 s TTL, both running requests keep their holds");
        }
    );
    assert_eq!((first.status.as_u16(), second.status.as_u16()), (200, 200), "one client id, two requests");
    assert_ne!(first.header("x-request-id"), second.header("x-request-id"));
    let charged = before - books.settled_balance(&pro).await;
    let each = books.reported_cost("mock-gpt");
    assert_eq!(charged, each + each, "both are charged in full");
}

#[tokio::test]
async fn a_client_that_accepts_gzip_is_still_metered() {
    // Proves defect 4: the SDKs send Accept-Encoding: gzip; the provider then compressed the
    // body, the meter saw no usage and a rewritten stream reached the client empty.
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    let gzip = [("accept-encoding", "gzip, deflate")];
    let before = books.settled_balance(&pro).await;
    let reply = books.post(CHAT, Some(&pro), &gzip, &json!({"model": "mock-gpt", "max_tokens": 40})).await;
    assert_eq!(reply.status, 200);
    assert_eq!(books.provider.last().headers["accept-encoding"], "identity");
    assert!(reply.json()["usage"].is_object(), "the client gets a body it can read");
    assert_eq!(before - books.settled_balance(&pro).await, books.reported_cost("mock-gpt"));

    let before = books.settled_balance(&pro).await;
    let reply = books
        .post(CHAT, Some(&pro), &gzip, &json!({"model": "mock-gpt", "max_tokens": 40, "stream": true}))
        .await;
    let text = String::from_utf8_lossy(&reply.body);
    assert!(text.contains("hello there") && text.contains("[DONE]"), "{text}");
    assert!(!text.contains("\"usage\""), "the usage the client did not ask for stays hidden: {text}");
    assert_eq!(before - books.settled_balance(&pro).await, books.reported_cost("mock-gpt"));

    // A stream the upstream sends whole with its content-length: the client
    // is not promised the upstream's length for the shorter body it gets
    // (hyper would send it again from the body's size, and the client would
    // see the body end early).
    let before = books.settled_balance(&pro).await;
    let whole = [("x-provider-stream-length", "1")];
    let reply = books
        .post(CHAT, Some(&pro), &whole, &json!({"model": "mock-gpt", "max_tokens": 40, "stream": true}))
        .await;
    assert_eq!(reply.status, 200);
    let text = String::from_utf8_lossy(&reply.body);
    assert!(text.contains("hello there") && text.ends_with("[DONE]\r\n\r\n"), "{text}");
    assert!(!text.contains("\"usage\""), "{text}");
    if let Some(length) = reply.header("content-length") {
        assert_eq!(length, reply.body.len().to_string(), "a length the body keeps");
    }
    assert_eq!(before - books.settled_balance(&pro).await, books.reported_cost("mock-gpt"));
}

/// What `pro` is charged for a stream of `mock-gpt` whose client hangs up
/// after the first chunk, the provider told by `headers` how to answer.
async fn charged_when_the_client_hangs_up(books: &Books, pro: &str, headers: &[(&str, &str)]) -> Decimal {
    let before = books.settled_balance(pro).await;
    let body = json!({"model": "mock-gpt", "stream": true, "max_tokens": 200});
    let mut request = Request::post(books.url(CHAT)).header("authorization", format!("Bearer {pro}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);
    drop(client);
    before - books.settled_balance(pro).await
}

#[tokio::test]
async fn a_client_that_hangs_up_before_the_usage_event_pays_the_reported_usage() {
    // Proves defect 5: a client that reset the stream just before the usage event paid an
    // estimate of the text it had seen. Now the gateway reads on to the usage.
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    let headers = [("x-provider-output", "200"), ("x-provider-usage-delay-ms", "400")];
    let charged = charged_when_the_client_hangs_up(&books, &pro, &headers).await;
    assert_eq!(charged, books.reported_cost("mock-gpt"), "all 200 output tokens, not the 2 it saw");
}

/// A stream that ends with its usage chunk, without `data: [DONE]` or a
/// last blank line, read on after its client left: the unterminated event is
/// still an event, and its usage the bill. Before, reading on never looked
/// at the event the rewriter held at the end, and the call paid its hold.
#[tokio::test]
async fn a_client_that_hangs_up_pays_the_usage_of_a_last_event_without_its_blank_line() {
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    let unterminated =
        [("x-provider-output", "100"), ("x-provider-no-done", "1"), ("x-provider-no-final-blank", "1")];
    let mut headers = unterminated.to_vec();
    headers.push(("x-provider-usage-delay-ms", "400"));
    let charged = charged_when_the_client_hangs_up(&books, &pro, &headers).await;
    assert_eq!(charged, books.reported_cost("mock-gpt"), "the reported usage, not the hold");
    // The client that stays gets the same bill, and the event.
    let before = books.settled_balance(&pro).await;
    let streamed = json!({"model": "mock-gpt", "stream": true, "max_tokens": 200});
    let reply = books.post(CHAT, Some(&pro), &unterminated, &streamed).await;
    assert_eq!(reply.status, 200);
    assert!(String::from_utf8_lossy(&reply.body).trim_end().ends_with('}'), "the last chunk, unterminated");
    assert_eq!(before - books.settled_balance(&pro).await, books.reported_cost("mock-gpt"));
}

/// Anthropic's built-in client tools bill input their few bytes do not
/// bound (a tool-use system prompt and each tool's own definition: some
/// 2,500 tokens for computer use, the text editor and bash, sent in about
/// 400 bytes). The hold allows for them, so the call is charged within it
/// and a wallet it fits is never overdrawn. Before, the hold counted only
/// the body's bytes, and such a call ran past it by five times.
#[tokio::test]
async fn anthropic_built_in_tools_are_held_for_the_input_they_add() {
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    let tools = json!([
        {"type": "computer_20250124", "name": "computer", "display_width_px": 1, "display_height_px": 1},
        {"type": "text_editor_20250429", "name": "str_replace_based_edit_tool"},
        {"type": "bash_20250124", "name": "bash"},
    ]);
    let body = json!({"model": "mock-claude", "max_tokens": 1, "tools": tools,
                      "messages": [{"role": "user", "content": "x"}]});
    let before = books.settled_balance(&pro).await;
    let reply = books.post("/v1/messages", Some(&pro), &[("x-provider-output", "1")], &body).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert!(books.provider.last().input_tokens > 2_500, "the provider billed the tools' prompts");
    let charged = before - books.settled_balance(&pro).await;
    assert_eq!(charged, books.reported_cost("mock-claude"));
    let held = books.debit_held(charged).await.expect("a debit");
    assert!(charged <= held, "charged {charged} past its hold {held}");
}

#[tokio::test]
async fn passthrough_needs_a_key_and_anonymous_requests_never_carry_the_upstream_credential() {
    // Proves defect 6: a client-supplied Host picked the unmetered route with no key at all,
    // and the operator's upstream credential went along.
    let books = Books::start(|t| t, "100", "1").await;
    let body = json!({"model": "mock-gpt", "max_tokens": 5});
    let host = [("host", "passthrough.test")];
    let reply = books.post(CHAT, None, &host, &body).await;
    assert_eq!(reply.status, 401, "no key, no service");
    assert!(books.provider.received().is_empty());
    let reply = books.post(CHAT, Some(&books.keys.pro), &host, &body).await;
    assert_eq!(reply.status, 200);
    let auth = books.provider.last().headers.get("authorization").cloned();
    assert_eq!(
        auth.unwrap(),
        format!("Bearer {UPSTREAM_SECRET}").as_str(),
        "a known caller gets the credential"
    );
    let reply = books.post(CHAT, None, &[("host", "public.test")], &body).await;
    assert_eq!(reply.status, 200, "a public route serves anyone");
    assert!(books.provider.last().headers.get("authorization").is_none(), "but without the credential");
}

#[tokio::test]
async fn tool_units_past_the_hold_are_charged_and_a_missing_count_costs_the_hold() {
    // Proves defect 7: units above the 100 held were cut to the hold, and a missing or
    // garbled units header billed zero units.
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    let table = books.gateway.prices().unwrap().current();
    let tool = table.tool("web-search", chrono::Utc::now()).unwrap();
    let hold = tool.cost(100).unwrap();
    for (units, expected) in
        [("7", tool.cost(7).unwrap()), ("500", tool.cost(500).unwrap()), ("none", hold), ("garbage", hold)]
    {
        let before = books.settled_balance(&pro).await;
        let reply =
            books.post("/v1/tools/web-search", Some(&pro), &[("x-provider-units", units)], &json!({})).await;
        assert_eq!(reply.status, 200);
        assert_eq!(before - books.settled_balance(&pro).await, expected, "units {units}");
    }
}

/// Send raw bytes on a fresh connection; the whole response as text.
async fn raw(books: &Books, request: String) -> String {
    let mut stream = tokio::net::TcpStream::connect(books.gateway.proxy_addr()).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn the_path_is_normalised_once_and_routed_priced_and_forwarded_as_one() {
    // Proves defect 8: `/v1/tools/web-search/../../chat/completions` was priced as a tool call
    // and forwarded as is (the upstream then resolved it to the chat endpoint).
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    let body = r#"{"model":"mock-gpt","max_tokens":5}"#;
    let request = |path: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {pro}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let before = books.settled_balance(&pro).await;
    let response = raw(&books, request("/v1/tools/web-search/../../chat//completions")).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(books.provider.last().path, "/v1/chat/completions");
    assert_eq!(before - books.settled_balance(&pro).await, books.reported_cost("mock-gpt"), "priced as chat");
    for path in [
        "/v1/tools/web-search%2F..%2F..%2Fchat/completions",
        "/v1/%2e%2e/chat/completions",
        "/../v1/chat/completions",
    ] {
        let response = raw(&books, request(path)).await;
        assert!(response.starts_with("HTTP/1.1 400"), "{path}: {response}");
    }
}

#[tokio::test]
async fn a_client_cannot_pick_the_upstream_account_that_pays() {
    // Proves defect 9 (headers): OpenAI-Project/OpenAI-Organization chose which of the
    // operator's upstream accounts was billed.
    let books = Books::start(|t| t, "100", "1").await;
    let headers = [("openai-project", "proj_other"), ("openai-organization", "org_other")];
    let reply = books.post(CHAT, Some(&books.keys.pro), &headers, &json!({"model": "mock-gpt"})).await;
    assert_eq!(reply.status, 200);
    let seen = books.provider.last().headers;
    assert!(seen.get("openai-project").is_none() && seen.get("openai-organization").is_none());

    // An operator's allow-list forwards only what it names, plus the gateway's own headers.
    let allowing = Books::start(
        |t| t.replace("credential_env = \"MOCK_UPSTREAM_KEY\"", "credential_env = \"MOCK_UPSTREAM_KEY\"\nforward_headers = [\"content-type\", \"anthropic-version\"]"),
        "100",
        "1",
    )
    .await;
    let headers = [
        ("anthropic-version", "2023-06-01"),
        ("x-debug-route", "elsewhere"),
        ("openai-beta", "assistants=v2"),
    ];
    let reply = allowing.post(CHAT, Some(&allowing.keys.pro), &headers, &json!({"model": "mock-gpt"})).await;
    assert_eq!(reply.status, 200);
    let seen = allowing.provider.last().headers;
    assert_eq!(seen["anthropic-version"], "2023-06-01");
    assert_eq!(seen["content-type"], "application/json");
    assert!(seen.get("x-debug-route").is_none() && seen.get("openai-beta").is_none(), "{seen:?}");
    assert!(
        seen.contains_key("authorization") && seen.contains_key("x-request-id"),
        "the gateway's own: {seen:?}"
    );
}

#[tokio::test]
async fn a_crlf_stream_with_spaced_json_and_no_final_blank_line_reaches_the_client_whole() {
    // Proves defect 11: the rewriter found events only by "\n\n" and the usage chunk only as
    // `"choices":[]`, so a CRLF stream reached the client as 0 bytes and was charged the hold,
    // and a final event without a blank line was dropped.
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    let body = json!({"model": "mock-gpt", "stream": true, "n": 2, "max_tokens": 30});
    let before = books.settled_balance(&pro).await;
    let reply = books.post(CHAT, Some(&pro), &[("x-provider-no-final-blank", "1")], &body).await;
    let text = String::from_utf8_lossy(&reply.body).into_owned();
    assert_eq!(text.matches("hello there").count(), 2, "both choices: {text}");
    assert!(text.ends_with("data: [DONE]"), "the last event, as the provider ended it: {text:?}");
    assert!(!text.contains("usage"), "neither the usage chunk nor `usage: null` fields: {text}");
    assert!(text.contains("\r\n\r\n"), "framing passes unchanged");
    assert_eq!(before - books.settled_balance(&pro).await, books.reported_cost("mock-gpt"));

    let claude = json!({"model": "mock-claude", "stream": true, "max_tokens": 64});
    let before = books.settled_balance(&pro).await;
    let reply = books.post("/v1/messages", Some(&pro), &[], &claude).await;
    assert_eq!(reply.status, 200);
    assert_eq!(before - books.settled_balance(&pro).await, books.reported_cost("mock-claude"));
}

#[tokio::test]
async fn a_call_is_charged_at_the_tier_the_upstream_says_served_it() {
    // Before, the tier the request named priced the call whatever served it:
    // a project whose default is priority served `auto` calls at 1.7x and
    // they were charged 1x; a priority call served at the default tier was
    // charged 1.7x. Now the tier the response names prices the call.
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    let table = books.gateway.prices().unwrap().current();
    let now = chrono::Utc::now();
    let in_tier = |tier: &str| {
        let last = books.provider.last();
        let usage = TokenUsage {
            input_tokens: last.input_tokens,
            output_tokens: last.output_tokens,
            ..TokenUsage::default()
        };
        let price = table.model("mock-gpt", now).unwrap();
        match tier {
            "default" => price.cost(&usage).unwrap(),
            tier => price.in_tier(table.service_tier("mock-gpt", tier).unwrap()).cost(&usage).unwrap(),
        }
    };
    let cases = [
        // (asked, served, streamed, priced at)
        (None, "priority", false, "priority"),
        (None, "priority", true, "priority"),
        (Some("auto"), "priority", false, "priority"),
        (Some("priority"), "default", false, "default"),
        (Some("priority"), "default", true, "default"),
        (Some("flex"), "flex", false, "flex"),
        // A served tier the table does not price: the one asked for.
        (Some("flex"), "scale", false, "flex"),
        (None, "default", true, "default"),
    ];
    for (asked, served, stream, priced_at) in cases {
        let mut body = json!({"model": "mock-gpt", "max_tokens": 100, "stream": stream,
                              "stream_options": {"include_usage": true}});
        if let Some(asked) = asked {
            body["service_tier"] = json!(asked);
        }
        let before = books.settled_balance(&pro).await;
        let reply = books.post(CHAT, Some(&pro), &[("x-provider-served-tier", served)], &body).await;
        assert_eq!(reply.status, 200, "{asked:?} served {served}");
        let charged = before - books.settled_balance(&pro).await;
        assert_eq!(
            charged,
            in_tier(priced_at),
            "{asked:?} served {served} (stream {stream}): {priced_at} prices"
        );
    }
}

#[tokio::test]
async fn price_modifiers_the_client_picks_are_priced() {
    // Proves defect 9 (prices): a `service_tier` the client picked and Anthropic cache writes
    // were priced at base input rates. Now a priced tier applies its multipliers, an unpriced
    // tier is refused, and cache writes are charged at their own prices.
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    let table = books.gateway.prices().unwrap().current();
    let now = chrono::Utc::now();

    let before = books.settled_balance(&pro).await;
    let body = json!({"model": "mock-gpt", "max_tokens": 100, "service_tier": "priority"});
    assert_eq!(books.post(CHAT, Some(&pro), &[], &body).await.status, 200);
    let last = books.provider.last();
    let priority =
        table.model("mock-gpt", now).unwrap().in_tier(table.service_tier("mock-gpt", "priority").unwrap());
    let usage = TokenUsage {
        input_tokens: last.input_tokens,
        output_tokens: last.output_tokens,
        ..TokenUsage::default()
    };
    let charged = before - books.settled_balance(&pro).await;
    assert_eq!(charged, priority.cost(&usage).unwrap(), "priority prices");
    assert!(
        charged > books.cost("mock-gpt", last.input_tokens, last.output_tokens),
        "above the default tier"
    );

    let body = json!({"model": "mock-gpt", "service_tier": "scale"});
    let reply = books.post(CHAT, Some(&pro), &[], &body).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["code"], "service_tier_not_priced");

    // Options that bill the same tokens at other rates, which the table
    // cannot state (Anthropic's fast mode and region, OpenRouter's fallback
    // models, plugins and provider routing), are refused before anything is held or sent.
    let forwarded = books.provider.received().len();
    for (path, option) in [
        ("/v1/messages", json!({"speed": "fast"})),
        ("/v1/messages", json!({"inference_geo": "us"})),
        (CHAT, json!({"models": ["mock-claude"]})),
        (CHAT, json!({"plugins": [{"id": "web", "max_results": 20}]})),
        (CHAT, json!({"provider": {"order": ["dearest"], "allow_fallbacks": false}})),
        // Chat-side web search, billed per search or per source.
        (CHAT, json!({"web_search_options": {"search_context_size": "high"}})),
        (CHAT, json!({"search_parameters": {"mode": "on"}})),
        // Azure's On Your Data (a search the operator's resources run and
        // bill), Groq's compound tools, Anthropic's server-side compaction.
        (CHAT, json!({"data_sources": [{"type": "azure_search", "parameters": {"index_name": "i"}}]})),
        (CHAT, json!({"compound_custom": {"tools": {"enabled_tools": ["web_search"]}}})),
        (CHAT, json!({"search_settings": {"country": "fr"}})),
        ("/v1/messages", json!({"compaction": {"trigger": 50000}})),
        // Routers that serve another model than the one priced: LiteLLM's
        // client-side fallbacks, its switch that fails the named model so
        // they (or the proxy's own) serve, its per-request router, and
        // OpenRouter's presets.
        (CHAT, json!({"fallbacks": ["mock-gpt-large"]})),
        (CHAT, json!({"context_window_fallback_dict": {"mock-claude": "mock-gpt-large"}})),
        (CHAT, json!({"mock_testing_fallbacks": true})),
        (CHAT, json!({"user_config": {"model_list": []}})),
        (CHAT, json!({"preset": "dearest"})),
    ] {
        let mut body = json!({"model": "mock-claude", "max_tokens": 10, "messages": []});
        body.as_object_mut().unwrap().extend(option.as_object().unwrap().clone());
        let reply = books.post(path, Some(&pro), &[], &body).await;
        assert_eq!(reply.status, 400, "{option}");
        assert_eq!(reply.json()["error"]["code"], "option_not_priced", "{option}");
    }
    assert_eq!(books.provider.received().len(), forwarded, "nothing reached the upstream");
    // Their default prices pass.
    let body = json!({"model": "mock-claude", "max_tokens": 10, "messages": [],
                      "speed": "standard", "inference_geo": "global"});
    assert_eq!(books.post("/v1/messages", Some(&pro), &[], &body).await.status, 200);
    // The 1M-token context window, which Anthropic bills at long-context
    // rates above 200k input tokens, only for a model the table gives them.
    let forwarded = books.provider.received().len();
    let body = json!({"model": "claude-haiku-4-5", "max_tokens": 10, "messages": []});
    for beta in ["context-1m-2025-08-07", "interleaved-thinking-2025-05-14, CONTEXT-1M-2025-08-07"] {
        let reply = books.post("/v1/messages", Some(&pro), &[("anthropic-beta", beta)], &body).await;
        assert_eq!(reply.status, 400, "{beta}");
        assert_eq!(reply.json()["error"]["code"], "option_not_priced", "{beta}");
    }
    let reply =
        books.post("/v1/messages", Some(&pro), &[("anthropic-beta", "compact-2026-01-12")], &body).await;
    assert_eq!(reply.json()["error"]["code"], "option_not_priced", "server-side compaction");
    assert_eq!(books.provider.received().len(), forwarded, "nothing reached the upstream");
    let beta = [("anthropic-beta", "context-1m-2025-08-07")];
    let body = json!({"model": "mock-claude", "max_tokens": 10, "messages": []});
    assert_eq!(books.post("/v1/messages", Some(&pro), &beta, &body).await.status, 200, "long-context prices");
    let body = json!({"model": "claude-haiku-4-5", "max_tokens": 10, "messages": []});
    let other = [("anthropic-beta", "interleaved-thinking-2025-05-14")];
    assert_eq!(books.post("/v1/messages", Some(&pro), &other, &body).await.status, 200, "other betas");
    // Chat tools an OpenAI-compatible upstream runs for a fee of its own.
    let body = json!({"model": "mock-gpt", "max_tokens": 10, "messages": [],
                      "tools": [{"type": "function", "function": {"name": "f"}}, {"type": "browser_search"}]});
    let reply = books.post(CHAT, Some(&pro), &[], &body).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["code"], "tool_not_priced");
    let body = json!({"model": "mock-gpt", "max_tokens": 10, "messages": [],
                      "tools": [{"type": "function", "function": {"name": "f"}}, {"type": "custom", "name": "g"}]});
    assert_eq!(books.post(CHAT, Some(&pro), &[], &body).await.status, 200, "client-run tools pass");

    let before = books.settled_balance(&pro).await;
    let headers = [("x-provider-cache-write-5m", "1000"), ("x-provider-cache-write-1h", "2000")];
    let body = json!({"model": "mock-claude", "max_tokens": 10, "messages": []});
    assert_eq!(books.post("/v1/messages", Some(&pro), &headers, &body).await.status, 200);
    let last = books.provider.last();
    let usage = TokenUsage {
        input_tokens: last.input_tokens,
        cache_write_5m_tokens: 1000,
        cache_write_1h_tokens: 2000,
        output_tokens: last.output_tokens,
        ..TokenUsage::default()
    };
    let charged = before - books.settled_balance(&pro).await;
    assert_eq!(
        charged,
        table.model("mock-claude", now).unwrap().cost(&usage).unwrap(),
        "cache writes at their prices"
    );
    assert!(charged > books.reported_cost("mock-claude"), "dearer than plain input");
    // Worked out by hand from config/prices.toml, not by the table the
    // gateway loaded (a loader that swapped the 5-minute and hour-long rates
    // would move both sides above): the writes replace plain input at $3/M
    // with 1,000 at $3.75/M and 2,000 at $6/M, $0.00675 more.
    let plain = TokenUsage {
        input_tokens: last.input_tokens,
        output_tokens: last.output_tokens,
        ..TokenUsage::default()
    };
    let plain = table.model("mock-claude", now).unwrap().cost(&plain).unwrap();
    assert_eq!(charged - plain, "0.00675".parse::<Decimal>().unwrap(), "the writes' premium");

    // OpenRouter reports cache writes as one count, whatever their lifetime:
    // a request whose breakpoints may ask for an hour pays the hour's price.
    let model = table.model("mock-claude", now).unwrap();
    for (ttl, hour) in [(None, false), (Some("5m"), false), (Some("1h"), true)] {
        let mut mark = json!({"type": "ephemeral"});
        if let Some(ttl) = ttl {
            mark["ttl"] = json!(ttl);
        }
        let body = json!({"model": "mock-claude", "max_tokens": 10, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi", "cache_control": mark}]}]});
        let before = books.settled_balance(&pro).await;
        let headers = [("x-provider-cache-write-5m", "3000")];
        assert_eq!(books.post(CHAT, Some(&pro), &headers, &body).await.status, 200, "{ttl:?}");
        let last = books.provider.last();
        let usage = TokenUsage {
            input_tokens: last.input_tokens,
            cache_write_5m_tokens: if hour { 0 } else { 3000 },
            cache_write_1h_tokens: if hour { 3000 } else { 0 },
            output_tokens: last.output_tokens,
            ..TokenUsage::default()
        };
        let charged = before - books.settled_balance(&pro).await;
        assert_eq!(charged, model.cost(&usage).unwrap(), "ttl {ttl:?}");
    }

    // A model without write prices would charge writes as plain input: a
    // request that marks cache breakpoints is refused for it, before anything
    // is held or sent; mentioning the key in text is no mark.
    let forwarded = books.provider.received().len();
    let marked = |model: &str, text: &str| {
        json!({"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": [
            {"type": "text", "text": text, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]})
    };
    let reply = books.post(CHAT, Some(&pro), &[], &marked("mock-gpt", "hi")).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["code"], "cache_write_not_priced");
    assert_eq!(books.provider.received().len(), forwarded, "nothing reached the upstream");
    let mention = json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "what does \"cache_control\": do?"}]});
    assert_eq!(books.post(CHAT, Some(&pro), &[], &mention).await.status, 200);
    assert_eq!(books.post("/v1/messages", Some(&pro), &[], &marked("mock-claude", "hi")).await.status, 200);
}

#[tokio::test]
async fn a_call_is_charged_at_the_prices_in_force_when_it_was_held_hosted_tools_included() {
    // A scheduled tool price that came into force while a call ran charged the call's tokens at
    // the prices of its hold but its hosted tool calls at the new price.
    use creditgate::clock::ManualClock;
    let provider = Provider::start().await;
    let data_dir = tempfile::tempdir().unwrap();
    let now = chrono::Utc::now();
    let switch = (now + chrono::TimeDelta::hours(1)).format("%Y-%m-%dT%H:%M:%SZ");
    let prices = data_dir.path().join("prices.toml");
    let schedule =
        format!("\n[[tools.\"web_search_call\".schedule]]\neffective_from = {switch}\nper_call = \"5\"\n");
    std::fs::write(&prices, std::fs::read_to_string(PRICES_FILE).unwrap() + &schedule).unwrap();
    let text = config_text(provider.addr(), "", "").replace(PRICES_FILE, prices.to_str().unwrap());
    let config = parse_config(&text, &data_dir.path().join("data"));
    let clock = ManualClock::new(now);
    let cancel = tokio_util::sync::CancellationToken::new();
    let gateway = Gateway::start_with_clock(config, clock.clone(), cancel).await.unwrap();
    let keys = seed(&gateway, "100", "1");
    let books = Books { provider, _books: BooksCheck::of(&gateway), gateway, keys, _data_dir: data_dir };
    let pro = books.keys.pro.clone();
    let per_call =
        books.gateway.prices().unwrap().current().tool("web_search_call", now).unwrap().cost(0).unwrap();
    let body = json!({"model": "mock-gpt", "max_output_tokens": 50, "input": "news?",
                      "tools": [{"type": "web_search"}], "max_tool_calls": 2});
    let before = books.settled_balance(&pro).await;
    let headers = [("x-provider-tool-calls", "2"), ("x-provider-head-delay-ms", "1500")];
    let (reply, ()) = tokio::join!(books.post("/v1/responses", Some(&pro), &headers, &body), async {
        // Past the switch once the call is held (the upstream has it) and
        // before it settles (the upstream thinks for 1.5 s).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while books.provider.received().is_empty() {
            assert!(std::time::Instant::now() < deadline, "the call never reached the upstream");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        clock.advance(chrono::TimeDelta::hours(2));
        assert_eq!(books.gateway.ledger().open_holds(), 1, "the switch came while the call was upstream");
    });
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let charged = before - books.settled_balance(&pro).await;
    assert_eq!(
        charged,
        books.reported_cost("mock-gpt") + per_call * Decimal::from(2u64),
        "both searches at the old price"
    );
}

#[tokio::test]
async fn hosted_tool_calls_are_held_bounded_and_charged_per_call() {
    // Proves the per-call fees of the upstream's own tools (Responses API web search) are
    // charged: the request is held for max_tool_calls calls (sent upstream when the request
    // names no bound), each reported call is charged, and an unpriced hosted tool is refused.
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    let table = books.gateway.prices().unwrap().current();
    let per_call = table.tool("web_search_call", chrono::Utc::now()).unwrap().cost(0).unwrap();
    let tools =
        json!([{"type": "web_search"}, {"type": "function", "name": "f", "parameters": {"type": "object"}}]);
    for (bound, wanted, expected_calls, sent_bound) in
        [(None, 3, 3, 10), (Some(2), 5, 2, 2), (None, 40, 10, 10)]
    {
        let mut body =
            json!({"model": "mock-gpt", "max_output_tokens": 50, "input": "news?", "tools": tools});
        if let Some(bound) = bound {
            body["max_tool_calls"] = json!(bound);
        }
        let before = books.settled_balance(&pro).await;
        let wanted = wanted.to_string();
        let reply = books
            .post("/v1/responses", Some(&pro), &[("x-provider-tool-calls", wanted.as_str())], &body)
            .await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        let last = books.provider.last();
        assert_eq!(last.body["max_tool_calls"], sent_bound, "the bound the hold assumed went upstream");
        assert_eq!(last.hosted_calls, expected_calls);
        let charged = before - books.settled_balance(&pro).await;
        let expected = books.reported_cost("mock-gpt") + per_call * Decimal::from(expected_calls);
        assert_eq!(charged, expected, "tokens plus {expected_calls} searches");
    }
    // Anthropic's web search: bounded by max_uses, counted by usage.server_tool_use.
    let per_search = table.tool("web_search_requests", chrono::Utc::now()).unwrap().cost(0).unwrap();
    let before = books.settled_balance(&pro).await;
    let body = json!({"model": "mock-claude", "max_tokens": 50, "messages": [],
                      "tools": [{"type": "web_search_20250305", "name": "web_search"}]});
    let reply = books.post("/v1/messages", Some(&pro), &[("x-provider-tool-calls", "40")], &body).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let last = books.provider.last();
    assert_eq!(last.body["tools"][0]["max_uses"], 10, "the bound the hold assumed went upstream");
    assert_eq!(last.hosted_calls, 10);
    let charged = before - books.settled_balance(&pro).await;
    assert_eq!(charged, books.reported_cost("mock-claude") + per_search * Decimal::from(10u64));

    // The web search preview leaves web_search_call items too, and OpenAI
    // bills it apart: before, its calls were charged at the tool's price.
    let preview = table.tool("web_search_preview_call", chrono::Utc::now()).unwrap().cost(0).unwrap();
    assert!(preview > per_call);
    let before = books.settled_balance(&pro).await;
    let body = json!({"model": "mock-gpt", "max_output_tokens": 50, "input": "news?", "max_tool_calls": 3,
                      "tools": [{"type": "web_search_preview_2025_03_11"}]});
    let reply = books.post("/v1/responses", Some(&pro), &[("x-provider-tool-calls", "2")], &body).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let charged = before - books.settled_balance(&pro).await;
    assert_eq!(charged, books.reported_cost("mock-gpt") + preview * Decimal::from(2u64));

    let body = json!({"model": "mock-gpt", "input": "draw", "tools": [{"type": "image_generation"}]});
    let reply = books.post("/v1/responses", Some(&pro), &[], &body).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["code"], "tool_not_priced");
    // A tool the upstream runs that the gateway does not know (OpenAI's
    // hosted shell bills its containers by size and time) is not served,
    // nor a code interpreter container larger than the one the table prices.
    let sent = books.provider.received().len();
    let shell = json!({"type": "shell", "environment": {"type": "container_auto", "memory_limit": "64g"}});
    let large = json!({"type": "code_interpreter", "container": {"type": "auto", "memory_limit": "64g"}});
    for (tool, code) in [(shell, "tool_not_priced"), (large, "option_not_priced")] {
        let body = json!({"model": "mock-gpt", "input": "run", "max_tool_calls": 1, "tools": [tool]});
        let reply = books.post("/v1/responses", Some(&pro), &[], &body).await;
        assert_eq!(reply.status, 400, "{tool}");
        assert_eq!(reply.json()["error"]["code"], code, "{tool}");
    }
    assert_eq!(books.provider.received().len(), sent, "nothing reached the upstream");
    // Tools that bill only tokens, and the default container, pass.
    let tools = json!([{"type": "mcp", "server_label": "x", "server_url": "https://mcp.example"},
                       {"type": "local_shell"}, {"type": "function", "name": "f"},
                       {"type": "code_interpreter", "container": {"type": "auto", "memory_limit": "1g"}}]);
    let body = json!({"model": "mock-gpt", "input": "run", "max_tool_calls": 1, "tools": tools});
    assert_eq!(books.post("/v1/responses", Some(&pro), &[], &body).await.status, 200);

    // Anthropic's code execution is billed by container time, which no
    // response reports: refused in every dated version, before anything is held.
    let sent = books.provider.received().len();
    let before = books.settled_balance(&pro).await;
    for kind in ["code_execution_20250522", "code_execution_20250825"] {
        let body = json!({"model": "mock-claude", "max_tokens": 50, "messages": [],
                          "tools": [{"type": kind, "name": "code_execution"}]});
        let reply = books.post("/v1/messages", Some(&pro), &[], &body).await;
        assert_eq!(reply.status, 400, "{kind}");
        assert_eq!(reply.json()["error"]["code"], "tool_not_metered", "{kind}");
    }
    assert_eq!(books.provider.received().len(), sent);
    assert_eq!(books.settled_balance(&pro).await, before);
}

#[tokio::test]
async fn hosted_calls_of_a_tool_the_table_does_not_price_cost_the_hold_not_nothing() {
    // A response may carry hosted tool calls the request did not enable (a stored prompt
    // with tools): before, calls of a tool without a price were charged nothing.
    let prices_dir = tempfile::tempdir().unwrap();
    let prices = prices_dir.path().join("prices.toml");
    let table = std::fs::read_to_string(PRICES_FILE).unwrap();
    let unpriced = table.replace("[tools.\"web_search_call\"]\nper_call = \"0.01\"\n", "");
    assert_ne!(unpriced, table);
    std::fs::write(&prices, unpriced).unwrap();
    let books = Books::start(|t| t.replace(PRICES_FILE, prices.to_str().unwrap()), "100", "1").await;
    let pro = books.keys.pro.clone();
    let before = books.settled_balance(&pro).await;
    let body = json!({"model": "mock-gpt", "max_output_tokens": 50, "input": "news?"});
    let reply = books.post("/v1/responses", Some(&pro), &[("x-provider-tool-calls", "3")], &body).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(books.provider.last().hosted_calls, 3);
    let charged = before - books.settled_balance(&pro).await;
    assert!(charged > books.reported_cost("mock-gpt"), "more than the tokens: {charged}");
    assert_eq!(books.debit_held(charged).await, Some(charged), "the hold, charged whole");
}

#[tokio::test]
async fn a_response_too_large_to_hold_is_charged_the_usage_at_its_end() {
    // Proves a JSON body past what the meter holds (4 MiB) is charged what the upstream
    // reports, tokens and hosted calls, and reaches the client whole. Before, it was
    // charged its hold.
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    let table = books.gateway.prices().unwrap().current();
    let per_call = table.tool("web_search_call", chrono::Utc::now()).unwrap().cost(0).unwrap();
    let body = json!({"model": "mock-gpt", "max_output_tokens": 50, "input": "news?",
                      "tools": [{"type": "web_search"}], "max_tool_calls": 3});
    let text_bytes = (creditgate::meter::MAX_METERED_JSON_BYTES + 1024 * 1024).to_string();
    let before = books.settled_balance(&pro).await;
    let headers = [("x-provider-tool-calls", "2"), ("x-provider-text-bytes", text_bytes.as_str())];
    let reply = books.post("/v1/responses", Some(&pro), &headers, &body).await;
    assert_eq!(reply.status, 200);
    assert!(reply.body.len() > creditgate::meter::MAX_METERED_JSON_BYTES, "{} bytes", reply.body.len());
    let answer = reply.json();
    let last = books.provider.last();
    assert_eq!(answer["usage"]["output_tokens"], last.output_tokens, "the body reached the client whole");
    let charged = before - books.settled_balance(&pro).await;
    let reported = books.reported_cost("mock-gpt") + per_call * Decimal::from(2u64);
    assert_eq!(charged, reported, "tokens plus 2 searches, not the hold");
    let held = books.cost("mock-gpt", last.input_tokens, 50) + per_call * Decimal::from(3u64);
    assert!(charged < held, "{charged} charged against a hold of about {held}");
}

#[tokio::test]
async fn a_streamed_response_whose_last_event_is_too_long_to_hold_is_charged_its_usage() {
    // Proves a Responses stream whose `response.completed` line runs past what the meter
    // holds of a line (1 MiB: the event repeats the whole output) is charged the usage in
    // it, tokens and hosted calls, and reaches the client whole. Before, the hold.
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    let table = books.gateway.prices().unwrap().current();
    let per_call = table.tool("web_search_call", chrono::Utc::now()).unwrap().cost(0).unwrap();
    let body = json!({"model": "mock-gpt", "stream": true, "max_output_tokens": 50, "input": "news?",
                      "tools": [{"type": "web_search"}], "max_tool_calls": 3});
    let before = books.settled_balance(&pro).await;
    let headers = [("x-provider-tool-calls", "2"), ("x-provider-text-bytes", "3000000")];
    let reply = books.post("/v1/responses", Some(&pro), &headers, &body).await;
    assert_eq!(reply.status, 200);
    let last_line = reply.body.split(|b| *b == b'\n').rev().find(|line| line.starts_with(b"data:")).unwrap();
    assert!(last_line.len() > 3_000_000, "the completed event came whole: {} bytes", last_line.len());
    let completed: Value = serde_json::from_slice(&last_line[5..]).unwrap();
    let last = books.provider.last();
    assert_eq!(completed["response"]["usage"]["output_tokens"], last.output_tokens);
    let charged = before - books.settled_balance(&pro).await;
    let reported = books.reported_cost("mock-gpt") + per_call * Decimal::from(2u64);
    assert_eq!(charged, reported, "tokens plus 2 searches, not the hold");
}

#[tokio::test]
async fn usage_past_the_hold_raises_an_alert() {
    // Proves an overrun is signalled to alerts (a usage_over_hold rule fires for each one), not
    // only counted: an upstream that ignored the cap it was sent is worth a look every time.
    let books = Books::start(
        |t| t.replace("[admin]\n", "[admin]\nalert_webhook_allow = [\"127.0.0.1/32\"]\n"),
        "100",
        "1",
    )
    .await;
    let hooks = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", hooks.local_addr().unwrap());
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = hooks.accept().await else { return };
            let events_tx = events_tx.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buffer).await {
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&buffer[..n]);
                    let text = String::from_utf8_lossy(&request).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().to_owned())
                            })
                            .and_then(|v| v.parse::<usize>().ok())
                            .unwrap_or(0);
                        if body.len() >= length {
                            let _ = events_tx.send(body.to_owned());
                            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
                            break;
                        }
                    }
                }
            });
        }
    });
    let org = books.keys.org.0;
    let rule = json!({"wallet": "pool", "condition": {"type": "usage_over_hold"}, "webhook_url": hook_url, "secret": "s3cret-s3cret-s3cret"});
    let request = Request::post(format!("http://{}/admin/v1/orgs/{org}/alerts", books.gateway.admin_addr()))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(rule.to_string())))
        .unwrap();
    assert_eq!(send(request).await.status, 201);
    let pro = books.keys.pro.clone();
    let body = json!({"model": "mock-gpt", "max_tokens": 10});
    assert_eq!(books.post(CHAT, Some(&pro), &[("x-provider-output", "50")], &body).await.status, 200);
    let ignoring = [("x-provider-output", "5000"), ("x-provider-ignore-cap", "1")];
    for _ in 0..2 {
        assert_eq!(books.post(CHAT, Some(&pro), &ignoring, &body).await.status, 200);
    }
    for _ in 0..2 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
        assert!(event.contains("usage_over_hold"), "{event}");
    }
    let more = tokio::time::timeout(Duration::from_millis(500), events.recv()).await;
    assert!(more.is_err(), "one alert per overrun, none for the request within its hold");
}

/// Reads a response body to its end within `limit`: `Ok(true)` when it
/// ended in an error (the gateway cut it), `Ok(false)` when it ended cleanly.
async fn read_to_end(
    body: &mut hyper::body::Incoming,
    limit: Duration,
) -> Result<bool, tokio::time::error::Elapsed> {
    tokio::time::timeout(limit, async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(_)) => return true,
                None => return false,
            }
        }
    })
    .await
}

#[tokio::test]
async fn an_upstream_idle_past_its_timeout_is_cut_but_one_that_keeps_sending_is_not() {
    // Proves the upstream idle timeout counts silence, not the response's length: a stream
    // with 150 ms between events runs past several 400 ms timeouts and is charged its usage,
    // and one that goes silent before its usage is cut and charged its hold.
    let books = Books::start(
        |t| {
            t.replace(
                "credential_env = \"MOCK_UPSTREAM_KEY\"",
                "credential_env = \"MOCK_UPSTREAM_KEY\"\nidle_timeout_ms = 400",
            )
        },
        "100",
        "1",
    )
    .await;
    let pro = books.keys.pro.clone();
    let body = json!({"model": "mock-gpt", "stream": true, "max_tokens": 100, "n": 8});
    let before = books.settled_balance(&pro).await;
    let started = std::time::Instant::now();
    let paced = books
        .post(CHAT, Some(&pro), &[("x-provider-pace-ms", "150"), ("x-provider-output", "40")], &body)
        .await;
    assert_eq!(paced.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "the stream was paced: {:?}",
        started.elapsed()
    );
    let text = String::from_utf8_lossy(&paced.body);
    assert!(text.contains("[DONE]"), "the paced stream ran to its end: {text}");
    let charged = before - books.settled_balance(&pro).await;
    assert_eq!(charged, books.reported_cost("mock-gpt"), "the paced stream's usage");

    let before = books.settled_balance(&pro).await;
    let started = std::time::Instant::now();
    let response = books.open_post(CHAT, &pro, &[("x-provider-usage-delay-ms", "20000")], &body).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let ended = read_to_end(&mut body, Duration::from_secs(5)).await;
    assert_eq!(ended, Ok(true), "the silent upstream's response was cut with an error");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cut after the idle timeout: {:?}",
        started.elapsed()
    );
    // A silent upstream may be reasoning (billed, not streamed) up to the cap: the hold.
    let charged = before - books.settled_balance(&pro).await;
    assert!(books
        .metrics()
        .await
        .lines()
        .any(|line| line == "creditgate_settles_total{result=\"debited_no_usage\"} 1"));
    let held = books.debit_held(charged).await;
    assert_eq!(held, Some(charged), "the cut stream was charged its hold");
    let open = books.gateway.ledger().balance(books.wallet(&pro), chrono::Utc::now()).unwrap().open_holds;
    assert_eq!(open, 0);
}

#[tokio::test]
async fn a_stream_the_upstream_breaks_is_charged_an_estimate_unless_it_may_run_hosted_tools() {
    // Proves the estimate for a stream the upstream broke off before its usage: what it
    // delivered plus its request, under the hold. A call that may run the upstream's own tools
    // is charged its hold instead: the calls it made before the break are billed, not all seen.
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    let tools = json!([{"type": "web_search"}]);
    for (path, body, estimated) in [
        (CHAT, json!({"model": "mock-gpt", "stream": true, "max_tokens": 100}), true),
        (
            "/v1/responses",
            json!({"model": "mock-gpt", "stream": true, "input": "news?", "tools": tools}),
            false,
        ),
    ] {
        let before = books.settled_balance(&pro).await;
        let response = books.open_post(path, &pro, &[("x-provider-reset-after", "1")], &body).await;
        assert_eq!(response.status(), 200);
        let broke = read_to_end(&mut response.into_body(), Duration::from_secs(5)).await;
        assert_eq!(broke, Ok(true), "{path}: the client saw the stream break");
        let charged = before - books.settled_balance(&pro).await;
        let held = books.debit_held(charged).await.expect("a debit");
        if estimated {
            assert!(charged > Decimal::ZERO && charged < held, "{path}: an estimate under the hold");
        } else {
            assert_eq!(charged, held, "{path}: the hold");
        }
    }
    let metrics = books.metrics().await;
    assert!(
        metrics.lines().any(|line| line == "creditgate_settles_total{result=\"debited_estimate\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|line| line == "creditgate_settles_total{result=\"debited_no_usage\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_response_is_ended_after_max_response_ms_even_when_its_client_stopped_reading() {
    // Proves a client cannot keep a request (and its hold) open at will: the response is cut
    // after [server] max_response_ms however the client behaves, and the request is charged
    // its hold (nothing is read on after the cut; a running total below the hold is no bill).
    let books = Books::start(
        |t| {
            t.replace(
                "shutdown_grace_ms = 5000",
                "shutdown_grace_ms = 5000\nmax_response_ms = 1000\nread_on_timeout_ms = 300",
            )
        },
        "100",
        "1",
    )
    .await;
    let pro = books.keys.pro.clone();
    let wallet = books.wallet(&pro);
    // Anthropic's stream opens with a running count (`output_tokens: 1`), and a provider with
    // continuous usage stats sends one on every chunk: neither is the bill.
    for (path, model, running) in
        [(CHAT, "mock-gpt", "0"), (CHAT, "mock-gpt", "1"), ("/v1/messages", "mock-claude", "0")]
    {
        let before = books.settled_balance(&pro).await;
        let mut headers = vec![("x-provider-usage-delay-ms", "20000")];
        if running == "1" {
            headers.push(("x-provider-usage-every-chunk", running));
        }
        let body = json!({"model": model, "stream": true, "max_tokens": 100, "messages": []});
        let response = books.open_post(path, &pro, &headers, &body).await;
        let mut body = response.into_body();
        next_chunk(&mut body).await.unwrap();
        // The client stops reading; the upstream would take 20 s more.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let ended = read_to_end(&mut body, Duration::from_secs(3)).await;
        assert!(ended.is_ok(), "the gateway ended the response");
        let charged = before - books.settled_balance(&pro).await;
        assert_eq!(
            books.debit_held(charged).await,
            Some(charged),
            "{model} (running usage: {running}): the cut request was charged its hold"
        );
    }
    let open = books.gateway.ledger().balance(wallet, chrono::Utc::now()).unwrap().open_holds;
    assert_eq!(open, 0);
}

#[tokio::test]
async fn audio_the_price_table_cannot_price_is_refused_not_charged_as_text() {
    // Proves audio is refused before anything is held or sent: providers
    // bill audio tokens at their own rates (OpenAI's audio models: 16x the
    // text rate on input, 8x on output), and the price table states none,
    // so a call with audio would have been charged its tokens as text.
    let books = Books::start(|t| t, "100", "1").await;
    let pro = books.keys.pro.clone();
    let sent = books.provider.received().len();
    let before = books.settled_balance(&pro).await;
    let part = json!({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}});
    let refused = [
        ("input_audio", json!({"model": "mock-gpt", "messages": [{"role": "user", "content": [part]}]})),
        ("modalities", json!({"model": "mock-gpt", "modalities": ["text", "audio"], "messages": []})),
        ("audio", json!({"model": "mock-gpt", "audio": {"voice": "alloy", "format": "wav"}, "messages": []})),
        ("modalities", json!({"model": "mock-gpt", "modalities": ["TEXT", "AUDIO"], "messages": []})),
        // An earlier audio reply, by id: the upstream reads it back as audio input.
        (
            "messages[].audio",
            json!({"model": "mock-gpt", "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "audio": {"id": "audio_abc123"}},
                {"role": "user", "content": "go on"}]}),
        ),
    ];
    for (marker, body) in refused {
        let reply = books.post(CHAT, Some(&pro), &[], &body).await;
        assert_eq!(reply.status, 400, "{marker}");
        assert_eq!(reply.json()["error"]["code"], "audio_not_priced", "{marker}");
        assert!(reply.json()["error"]["message"].as_str().unwrap().contains(marker));
    }
    assert_eq!(books.provider.received().len(), sent, "nothing reached the upstream");
    assert_eq!(books.settled_balance(&pro).await, before, "nothing was charged");

    // Text that only mentions audio, and text-only modalities, are served.
    let text = json!({"model": "mock-gpt", "max_tokens": 10, "modalities": ["text"],
        "messages": [{"role": "user", "content": "what is an {\"type\": \"input_audio\"} part?"}]});
    assert_eq!(books.post(CHAT, Some(&pro), &[], &text).await.status, 200);
    assert_eq!(before - books.settled_balance(&pro).await, books.reported_cost("mock-gpt"));
}

#[tokio::test]
async fn an_azure_deployment_in_the_path_must_be_the_model_priced() {
    // Proves a path that names a deployment (Azure serves that one and
    // ignores the body's model) is priced only when the body names the same:
    // a dear deployment cannot be priced as a cheap model the body names.
    let books = Books::start(
        |t| {
            format!(
                "{t}\n[[routes]]\nprefix = \"/openai/deployments\"\nupstream = \"mock\"\nflavour = \"openai-chat\"\n"
            )
        },
        "100",
        "1",
    )
    .await;
    let pro = books.keys.pro.clone();
    let sent = books.provider.received().len();
    let before = books.settled_balance(&pro).await;
    let body = json!({"model": "mock-gpt", "max_tokens": 10, "messages": []});
    let reply = books.post("/openai/deployments/mock-claude/chat/completions", Some(&pro), &[], &body).await;
    assert_eq!(reply.status, 400);
    assert!(reply.json()["error"]["message"].as_str().unwrap().contains("mock-claude"));
    // Another casing is no route here at all.
    let reply = books.post("/openai/Deployments/mock-claude/chat/completions", Some(&pro), &[], &body).await;
    assert_eq!(reply.status, 404);
    assert_eq!(books.provider.received().len(), sent, "nothing reached the upstream");
    assert_eq!(books.settled_balance(&pro).await, before, "nothing was charged");
    let body = json!({"model": "mock-gpt", "max_tokens": 10, "messages": []});
    let reply = books.post("/openai/deployments/mock-gpt/chat/completions", Some(&pro), &[], &body).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(before - books.settled_balance(&pro).await, books.reported_cost("mock-gpt"));
}
