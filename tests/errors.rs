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
    assert!(
        json["error"]["type"].is_string() && json["error"]["message"].is_string(),
        "{json}"
    );
    assert!(
        reply.header("x-request-id").is_some(),
        "errors carry a request id too"
    );
}

#[tokio::test]
async fn unknown_route_is_404() {
    let stack = start().await;
    let reply = send(
        Request::get(stack.url("/nowhere"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_error(&reply, 404, "route_not_found");
    assert!(stack.mock.journal().entries().is_empty(), "nothing was forwarded");
}

#[tokio::test]
async fn refused_upstream_is_502() {
    // Take a free port and close it, so nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(port, "", ""), data_dir.path());
    let gateway = Gateway::start(config, CancellationToken::new()).await.unwrap();
    let url = format!("http://{}/v1/chat/completions", gateway.proxy_addr());
    let reply = post_json(&url, &serde_json::json!({"model": "mock-gpt"})).await;
    assert_error(&reply, 502, "upstream_unreachable");
}

#[tokio::test]
async fn upstream_that_never_answers_is_504() {
    let stack = start_with("", "response_timeout_ms = 300", MockOptions::default()).await;
    let request = Request::post(stack.url("/v1/chat/completions"))
        .header("x-mock-hang", "1")
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
    let stack = start_with("max_body_bytes = 1024", "", MockOptions::default()).await;
    let mut sender = open_h1(stack.gateway.proxy_addr()).await;
    let (tx, body) = channel_body();
    let request = Request::post(stack.url("/v1/chat/completions"))
        .body(body)
        .unwrap();
    let feeder = tokio::spawn(async move {
        for _ in 0..8 {
            if tx
                .send(Ok(http_body::Frame::data(Bytes::from(vec![b'x'; 512]))))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let response = sender.send_request(request).await.unwrap();
    let reply = read(response).await;
    assert_error(&reply, 413, "body_too_large");
    feeder.abort();
}

#[tokio::test]
async fn upstream_error_statuses_pass_through_untouched() {
    let stack = start().await;
    let request = Request::post(stack.url("/v1/chat/completions"))
        .header("x-mock-status", "503")
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
