//! The data path forwards every request and response unchanged, apart from
//! the documented header rules, and streams bodies in both directions.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};

#[tokio::test]
async fn every_method_and_body_shape_reaches_the_upstream_unchanged() {
    let stack = start().await;
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("text", b"hello, upstream".to_vec()),
        ("json", br#"{"model":"x","nested":{"a":[1,2,3]}}"#.to_vec()),
        ("binary", binary),
    ];
    let methods = [Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS];
    for method in &methods {
        for (shape, body) in &bodies {
            let uri = stack.url("/echo/items/42?q=a%20b&flag&x=%E2%9C%93");
            let request = Request::builder()
                .method(method.clone())
                .uri(&uri)
                .header("x-custom", "one")
                .header("x-multi", "first")
                .header("x-multi", "second")
                .header("content-type", "application/octet-stream")
                .body(Full::new(Bytes::from(body.clone())))
                .unwrap();
            let reply = send(request).await;
            assert_eq!(reply.status, 200, "{method} {shape}");
            assert_eq!(reply.body.as_ref(), body.as_slice(), "{method} {shape}: body echoed byte for byte");
            assert_eq!(reply.header("x-echo-method"), Some(method.as_str()));
            assert_eq!(
                reply.header("x-echo-uri"),
                Some("/echo/items/42?q=a%20b&flag&x=%E2%9C%93"),
                "path and query intact"
            );
            let seen = stack.mock.journal().last().unwrap();
            assert_eq!(seen.header("x-custom"), Some("one"));
            let multi: Vec<&str> =
                seen.headers.iter().filter(|(k, _)| k == "x-multi").map(|(_, v)| v.as_str()).collect();
            assert_eq!(multi, ["first", "second"], "repeated headers keep their order");
            assert!(reply.header("x-request-id").is_some(), "every response has a request id");
        }
    }
    // HEAD has no response body but must still pass through.
    let request = Request::head(stack.url("/echo/head")).body(Full::new(Bytes::new())).unwrap();
    let reply = send(request).await;
    assert_eq!(reply.status, 200);
    assert_eq!(stack.mock.journal().last().unwrap().method, "HEAD");
}

#[tokio::test]
async fn chunked_request_bodies_stream_through() {
    let stack = start().await;
    let mut sender = open_h1(stack.gateway.proxy_addr()).await;
    let (tx, body) = channel_body();
    let request = Request::post(stack.url("/echo/chunked")).body(body).unwrap();
    let response_future = tokio::spawn(async move { sender.send_request(request).await.unwrap() });
    let mut sent = Vec::new();
    for i in 0..5u8 {
        let chunk = Bytes::from(vec![i; 1000 + usize::from(i)]);
        sent.extend_from_slice(&chunk);
        tx.send(Ok(http_body::Frame::data(chunk))).await.unwrap();
    }
    drop(tx);
    let response = response_future.await.unwrap();
    let reply = read(response).await;
    assert_eq!(reply.body.as_ref(), sent.as_slice(), "chunked body arrives whole and in order");
}

#[tokio::test]
async fn credentials_are_swapped_in_both_directions() {
    let stack = start().await;
    let client_key = stack.keys.pro.clone();
    let client_key = client_key.as_str();
    let request = Request::post(stack.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {client_key}"))
        .header("x-api-key", client_key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(r#"{"model":"mock-gpt","max_tokens":5}"#)))
        .unwrap();
    let reply = send(request).await;
    assert_eq!(reply.status, 200);
    let seen = stack.mock.journal().last().unwrap();
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {UPSTREAM_SECRET}").as_str()),
        "upstream gets its own credential"
    );
    assert_eq!(seen.header("x-api-key"), None, "client's x-api-key is removed");
    let everything_upstream_saw = format!("{:?}", seen.headers);
    assert!(
        !everything_upstream_saw.contains(client_key),
        "client key reached the upstream: {everything_upstream_saw}"
    );
    let everything_client_saw = format!("{:?}{:?}", reply.headers, reply.body);
    assert!(!everything_client_saw.contains(UPSTREAM_SECRET), "upstream secret reached the client");
    assert_eq!(
        seen.header("x-request-id"),
        reply.header("x-request-id"),
        "request id is propagated upstream"
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let stack = start().await;
    let request = Request::get(stack.url("/echo/hop"))
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "private")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic abc")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = send(request).await;
    assert_eq!(reply.status, 200);
    let seen = stack.mock.journal().last().unwrap();
    for name in ["x-hop", "keep-alive", "proxy-authorization"] {
        assert_eq!(seen.header(name), None, "{name} must not be forwarded");
    }
    assert_eq!(seen.header("x-end-to-end"), Some("kept"));
}

#[tokio::test]
async fn the_upstream_sees_its_own_host_never_the_client_s() {
    let stack = start().await;
    for client_host in ["evil.example", "127.0.0.1:1"] {
        let request = Request::get(stack.url("/echo/host"))
            .header("host", client_host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let reply = send(request).await;
        assert_eq!(reply.status, 200, "{client_host}");
        let seen = stack.mock.journal().last().unwrap();
        let hosts: Vec<&str> =
            seen.headers.iter().filter(|(k, _)| k == "host").map(|(_, v)| v.as_str()).collect();
        assert_eq!(hosts, [stack.mock.addr().to_string()], "one Host, the upstream's, for {client_host}");
    }
}

#[tokio::test]
async fn the_gateway_mints_every_request_id_whatever_the_client_sends() {
    // Proves the client's x-request-id never becomes the gateway's id (it keys the hold):
    // two requests with the same client id get two different ids.
    let stack = start().await;
    let with_id = |id: &str| {
        Request::get(stack.url("/echo/id")).header("x-request-id", id).body(Full::new(Bytes::new())).unwrap()
    };
    let client_id = "0192f0c4-7a1b-7cde-8f00-1234567890ab";
    let first = send(with_id(client_id)).await;
    let second = send(with_id(client_id)).await;
    let (first, second) = (first.header("x-request-id").unwrap(), second.header("x-request-id").unwrap());
    assert_ne!(first, client_id, "the client's id is not taken");
    assert_ne!(first, second, "each request has its own id");
    assert_eq!(first.len(), 32, "a minted UUIDv7");
}

#[tokio::test]
async fn sse_events_reach_the_client_before_the_upstream_writes_the_next() {
    let stack = start().await;
    let mut sender = open_h1(stack.gateway.proxy_addr()).await;
    let (tx, body) = channel_body();
    let request = Request::post(stack.url("/v1/chat/completions"))
        // Paced widely, so a loaded machine's delay stays well inside a gap.
        .header("x-mock-pace-ms", "1000")
        .header("authorization", format!("Bearer {}", stack.keys.pro))
        .body(body)
        .unwrap();
    tx.send(Ok(http_body::Frame::data(Bytes::from(r#"{"model":"mock-gpt","stream":true,"max_tokens":3}"#))))
        .await
        .unwrap();
    drop(tx);
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let first = next_chunk(&mut body).await.unwrap();
    let first_received = Instant::now();
    assert!(first.starts_with(b"data: "), "first event: {first:?}");
    let mut rest = Vec::new();
    while let Some(chunk) = next_chunk(&mut body).await {
        rest.extend_from_slice(&chunk);
    }
    assert!(rest.ends_with(b"data: [DONE]\n\n"));
    let times = stack.mock.journal().last().unwrap().event_times();
    assert!(times.len() >= 3, "events written: {}", times.len());
    assert!(
        first_received < times[1],
        "client held event 1 only {:?} after the upstream wrote event 2",
        first_received.saturating_duration_since(times[1])
    );
    assert!(
        times[1] - first_received > Duration::from_millis(500),
        "the first event was not held back until near the second"
    );
}

#[tokio::test]
async fn large_bodies_stream_both_ways_without_being_held_whole() {
    // Full-duplex echo: each 1 MiB chunk must come back before the next one is
    // sent. A gateway that buffered the request body would deadlock here.
    let stack = start_with("max_body_bytes = 134217728", "", Default::default()).await;
    let mut sender = open_h1(stack.gateway.proxy_addr()).await;
    let (tx, body) = channel_body();
    let request = Request::put(stack.url("/echo/large")).body(body).unwrap();
    let response_future = tokio::spawn(async move { sender.send_request(request).await.unwrap() });
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 64;
    tx.send(Ok(http_body::Frame::data(Bytes::from(vec![0u8; CHUNK])))).await.unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), response_future)
        .await
        .expect("response head did not arrive while the request body was still open")
        .unwrap();
    let mut body = response.into_body();
    let mut received = 0usize;
    for i in 1..=CHUNKS {
        while received < i * CHUNK {
            let chunk = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .expect("echo of the last chunk never came back: the body is being held")
                .unwrap()
                .unwrap();
            if let Ok(data) = chunk.into_data() {
                assert!(data.iter().all(|&b| b == (i - 1) as u8), "chunk {i} corrupted");
                received += data.len();
            }
        }
        if i < CHUNKS {
            tx.send(Ok(http_body::Frame::data(Bytes::from(vec![i as u8; CHUNK])))).await.unwrap();
        }
    }
    drop(tx);
    assert_eq!(received, CHUNK * CHUNKS);
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let stack = start().await;
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let request = Request::post(stack.url("/echo/h2")).body(Full::new(Bytes::from("over h2"))).unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "over h2");
}

#[tokio::test]
async fn http2_prior_knowledge_upstreams_are_reached_over_h2() {
    let stack = start_with("", "http2_prior_knowledge = true", Default::default()).await;
    let reply = post_json(
        &stack.url("/v1/chat/completions"),
        &stack.keys.pro,
        &serde_json::json!({"model": "mock-gpt"}),
    )
    .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.json()["model"], "mock-gpt");
}

#[tokio::test]
async fn an_h2_connection_carries_at_most_the_configured_streams_at_once() {
    // Before, hyper's default of 200 streams applied to every h2 connection,
    // and the listener's connection cap counted each connection once: one
    // socket could hold 200 requests (each perhaps an upstream connection).
    let stack = start_with("http2_max_concurrent_streams = 2", "", Default::default()).await;
    let mut sender = open_h2(stack.gateway.proxy_addr()).await;
    // One request first, so the client has the gateway's SETTINGS (before
    // them, a stream past the limit is refused, not queued).
    let warm = Request::get("http://test/echo/warm").body(creditgate::mock::MockBody::Full(None)).unwrap();
    sender.send_request(warm).await.unwrap().into_body().collect().await.unwrap();
    let started = Instant::now();
    let mut requests = Vec::new();
    for i in 0..3 {
        let mut sender = sender.clone();
        requests.push(tokio::spawn(async move {
            let request = Request::get(format!("http://test/echo/slow/{i}"))
                .header("x-mock-latency-ms", "1500")
                .body(creditgate::mock::MockBody::Full(None))
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.unwrap();
            started.elapsed()
        }));
    }
    let mut took: Vec<Duration> = Vec::new();
    for request in requests {
        took.push(request.await.unwrap());
    }
    took.sort();
    assert!(took[1] < Duration::from_millis(2700), "two ran at once: {took:?}");
    assert!(took[2] >= Duration::from_millis(3000), "the third waited for a stream: {took:?}");
}

#[tokio::test]
async fn request_trailers_do_not_reach_an_h2_upstream() {
    // Before, a streamed body's trailers went to an upstream reached over h2
    // as they came: a trailer `x-api-key` or `authorization` passed the
    // rules that strip and allow request headers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|request: Request<hyper::body::Incoming>| async move {
                let collected = request.into_body().collect().await?;
                let names: Vec<String> = collected
                    .trailers()
                    .map(|trailers| trailers.keys().map(|name| name.to_string()).collect())
                    .unwrap_or_default();
                let body = collected.to_bytes();
                Ok::<_, hyper::Error>(
                    http::Response::builder()
                        .header("x-upstream-trailers", names.join(","))
                        .body(Full::new(body))
                        .unwrap(),
                )
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    let stack =
        start_edited(|text| {
            text.replacen(r#"base_url = "http://"#, &format!(r#"base_url = "http://{upstream}" # "#), 1)
                .replacen("[upstreams.mock]\n", "[upstreams.mock]\nhttp2_prior_knowledge = true\n", 1)
        })
        .await;
    let mut sender = open_h2(stack.gateway.proxy_addr()).await;
    let (tx, body) = channel_body();
    let request = Request::post("http://test/echo/trailers").body(body).unwrap();
    let response = tokio::spawn(sender.send_request(request));
    tx.send(Ok(http_body::Frame::data(Bytes::from("payload")))).await.unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-api-key", "client-secret".parse().unwrap());
    trailers.insert("x-checksum", "abc".parse().unwrap());
    tx.send(Ok(http_body::Frame::trailers(trailers))).await.unwrap();
    drop(tx);
    let reply = read(response.await.unwrap().unwrap()).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body.as_ref(), b"payload", "the body itself went through");
    assert_eq!(reply.header("x-upstream-trailers"), Some(""), "no trailer reached the upstream");
}

#[tokio::test]
async fn the_upstream_s_account_origin_and_auth_failures_stay_behind_the_gateway() {
    // Before, the upstream's answer went to the client with only hop-by-hop
    // headers removed: a 401 for the operator's revoked credential told the
    // client its own key was bad (with a fragment of the operator's key), a
    // redirect named the upstream's address, and the upstream's account,
    // cookies and origin policies came along.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(
                move |request: Request<hyper::body::Incoming>| async move {
                    let auth_failed = r#"{"error":{"code":"invalid_api_key","message":"Incorrect API key provided: sk-proj-...abcd"}}"#;
                    let response = match request.uri().path() {
                        "/echo/auth" => http::Response::builder()
                            .status(401)
                            .header("www-authenticate", "Bearer")
                            .body(Full::new(Bytes::from(auth_failed))),
                        "/echo/moved" => http::Response::builder()
                            .status(307)
                            .header("location", format!("http://{upstream}/echo/there?x=1"))
                            .body(Full::new(Bytes::new())),
                        _ => http::Response::builder()
                            .header("x-request-id", "req_abc")
                            .header("openai-organization", "org-operator")
                            .header("set-cookie", "__cf_bm=1; Domain=api.openai.com")
                            .header("alt-svc", "h3=\":443\"")
                            .header("x-ratelimit-remaining-requests", "99")
                            .body(Full::new(Bytes::new())),
                    };
                    Ok::<_, hyper::Error>(response.unwrap())
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    let stack = start_edited(|text| {
        text.replacen(r#"base_url = "http://"#, &format!(r#"base_url = "http://{upstream}" # "#), 1)
    })
    .await;
    let get = |path: &str| send(Request::get(stack.url(path)).body(Full::new(Bytes::new())).unwrap());

    let refused = get("/echo/auth").await;
    assert_eq!(refused.status, 502, "{:?}", refused.body);
    assert_eq!(refused.json()["error"]["code"], "upstream_auth_failed");
    assert!(!String::from_utf8_lossy(&refused.body).contains("sk-"), "{:?}", refused.body);
    assert!(refused.header("www-authenticate").is_none());

    let moved = get("/echo/moved").await;
    assert_eq!(moved.status, 307);
    assert_eq!(moved.header("location"), Some("/echo/there?x=1"), "relative to the gateway");

    let plain = get("/echo/headers").await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("x-upstream-request-id"), Some("req_abc"), "the provider's id, for its support");
    assert_ne!(plain.header("x-request-id"), Some("req_abc"), "the gateway's own id");
    for name in ["openai-organization", "set-cookie", "alt-svc"] {
        assert!(plain.header(name).is_none(), "{name} stays behind the gateway");
    }
    assert_eq!(plain.header("x-ratelimit-remaining-requests"), Some("99"), "the rest passes");
}
