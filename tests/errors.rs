//! Each failure maps to its documented status and JSON error code.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use creditgate::app::Gateway;
use creditgate::mock::MockOptions;
use http::Request;
use http_body_util::Full;
use tokio_util::sync::CancellationToken;

fn assert_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "body: {:?}", reply.body);
    let json = reply.json();
    assert_eq!(json["error"]["code"], code, "{json}");
    assert!(json["error"]["type"].is_string() && json["error"]["message"].is_string(), "{json}");
    assert!(reply.header("x-request-id").is_some(), "errors carry a request id too");
}

#[tokio::test]
async fn unknown_route_is_404() {
    let stack = start().await;
    let reply = send(Request::get(stack.url("/nowhere")).body(Full::new(Bytes::new())).unwrap()).await;
    assert_error(&reply, 404, "route_not_found");
    assert!(stack.mock.journal().entries().is_empty(), "nothing was forwarded");
}

#[tokio::test]
async fn refused_upstream_is_502() {
    // Take a free port and close it, so nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(port, "", ""), data_dir.path());
    let gateway = Gateway::start(config, CancellationToken::new()).await.unwrap();
    let keys = seed(&gateway, "10", "1");
    let url = format!("http://{}/v1/chat/completions", gateway.proxy_addr());
    let before = gateway.ledger().available(creditgate::ledger::ids::WalletId::Pool(keys.org));
    let reply = post_json(&url, &keys.pro, &serde_json::json!({"model": "mock-gpt"})).await;
    assert_error(&reply, 502, "upstream_unreachable");
    let after = gateway.ledger().available(creditgate::ledger::ids::WalletId::Pool(keys.org));
    assert_eq!(before, after, "an unreachable upstream costs nothing and leaves no hold open");
}

#[tokio::test]
async fn upstream_that_never_answers_is_504() {
    let stack = start_with("", "response_timeout_ms = 300", MockOptions::default()).await;
    let request = Request::post(stack.url("/v1/chat/completions"))
        .header("x-mock-hang", "1")
        .header("authorization", format!("Bearer {}", stack.keys.pro))
        .body(Full::new(Bytes::from(r#"{"model":"mock-gpt"}"#)))
        .unwrap();
    let started = std::time::Instant::now();
    let reply = send(request).await;
    assert_error(&reply, 504, "upstream_timeout");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "timeout fired late: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn declared_oversized_body_is_413_before_forwarding() {
    let stack = start_with("max_body_bytes = 1024", "", MockOptions::default()).await;
    let request = Request::post(stack.url("/v1/chat/completions"))
        .body(Full::new(Bytes::from(vec![b'x'; 2048])))
        .unwrap();
    let reply = send(request).await;
    assert_error(&reply, 413, "body_too_large");
    assert!(stack.mock.journal().entries().is_empty(), "nothing was forwarded");
}

#[tokio::test]
async fn streamed_oversized_body_is_413() {
    // A chunked body (no declared length) over the limit, written whole in
    // one go so the client is done writing before the gateway answers.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = start_with("max_body_bytes = 1024", "", MockOptions::default()).await;
    let mut stream = tokio::net::TcpStream::connect(stack.gateway.proxy_addr()).await.unwrap();
    let chunk = "x".repeat(512);
    let mut request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: Bearer {}\r\ntransfer-encoding: chunked\r\n\r\n",
        stack.keys.pro
    );
    for _ in 0..3 {
        request.push_str(&format!("200\r\n{chunk}\r\n"));
    }
    request.push_str("0\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("body_too_large"), "{text}");
    assert!(stack.mock.journal().entries().is_empty(), "nothing was forwarded");
}

#[tokio::test]
async fn upstream_error_statuses_pass_through_untouched() {
    let stack = start().await;
    let request = Request::post(stack.url("/v1/chat/completions"))
        .header("x-mock-status", "503")
        .header("authorization", format!("Bearer {}", stack.keys.pro))
        .body(Full::new(Bytes::from(r#"{"model":"mock-gpt"}"#)))
        .unwrap();
    let reply = send(request).await;
    assert_eq!(reply.status, 503);
    assert_eq!(
        reply.json()["error"]["type"],
        "mock_error",
        "the upstream's own error body reaches the client"
    );
}
