//! The admin API through its real listener, against a single node (the
//! suite is `admin_api/suite.rs`; `admin_api_cluster.rs` runs it against a
//! cluster replica).
#![allow(clippy::unwrap_used)]

mod common;

#[path = "admin_api/suite.rs"]
mod suite;

/// A single node's admin write waits for its journal's flush and fsync off
/// the runtime: the listener (on this test's one-thread runtime) answers
/// meanwhile. Before, the write blocked the thread for the whole wait.
#[tokio::test]
async fn an_admin_write_waiting_for_its_flush_leaves_the_runtime_serving() {
    use common::*;
    use std::time::{Duration, Instant};
    // Flushes at most once a second: a write right after another waits for the next.
    let stack = start_edited(|t| t.replace("[log]", "[ledger]\nflush_interval_ms = 1000\n\n[log]")).await;
    let org = stack.keys.org.0;
    let buy = |n: u32| {
        let request = http::Request::post(stack.admin_url(&format!("/admin/v1/orgs/{org}/purchases")))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .header("idempotency-key", format!("wait-{n}"))
            .body(http_body_util::Full::new(bytes::Bytes::from(r#"{"amount": "1"}"#)))
            .unwrap();
        async move {
            let reply = send(request).await;
            (reply.status, Instant::now())
        }
    };
    assert_eq!(buy(1).await.0, 201, "the first write flushes at once");
    let started = Instant::now();
    let (second, health) = tokio::join!(buy(2), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reply = send(
            http::Request::get(stack.admin_url("/healthz"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await;
        (reply.status, Instant::now())
    });
    assert_eq!((second.0, health.0), (http::StatusCode::CREATED, http::StatusCode::OK));
    let (write_took, health_took) = (second.1 - started, health.1 - started);
    assert!(
        health_took + Duration::from_millis(300) < write_took,
        "the health check waited for the write: {health_took:?} against {write_took:?}"
    );
}
