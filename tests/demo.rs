//! `creditgate demo` as a newcomer runs it: the real binary, its admin token
//! from `demo.json`, a top-up through the admin API, then a stream.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::Request;
use serde_json::{json, Value};

/// A demo process, killed when the test ends.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the demo on free loopback ports with `data` as its data dir.
fn start_demo(data: &Path, admin_token_env: Option<&str>) -> Demo {
    let mut command = Command::new(env!("CARGO_BIN_EXE_creditgate"));
    command
        .args(["demo", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--mock-listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env_remove("CREDITGATE_ADMIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(token) = admin_token_env {
        command.env("CREDITGATE_ADMIN_TOKEN", token);
    }
    Demo(command.spawn().unwrap())
}

/// `demo.json` once the demo has written it (whole: it is renamed into place).
async fn demo_json(data: &Path) -> Value {
    let path = data.join("demo.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(bytes) = std::fs::read(&path) {
            return serde_json::from_slice(&bytes).unwrap();
        }
        assert!(Instant::now() < deadline, "the demo wrote no {}", path.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn admin_post(url: String, token: &str, key: &str, body: Value) -> Reply {
    let request = Request::post(url)
        .header("authorization", format!("Bearer {token}"))
        .header("idempotency-key", key)
        .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    send(request).await
}

#[tokio::test]
async fn the_demo_mints_an_admin_token_that_tops_up_the_pool_before_a_stream() {
    let data = tempfile::tempdir().unwrap();
    let _demo = start_demo(data.path(), None);
    let demo = demo_json(data.path()).await;
    let token = demo["admin_token"].as_str().expect("demo.json names an admin token");
    assert!(token.len() >= 32, "a real secret: {token}");
    let (proxy, admin, org) =
        (demo["proxy_url"].as_str().unwrap(), demo["admin_url"].as_str().unwrap(), &demo["org"]);
    let key = demo["keys"]["pro"].as_str().unwrap();
    // Spend the $0.002 pool until the gateway refuses.
    let call = json!({"model": "mock-gpt", "max_tokens": 200});
    let mut refused = false;
    for _ in 0..50 {
        if post_json(&format!("{proxy}/v1/chat/completions"), key, &call).await.status == 402 {
            refused = true;
            break;
        }
    }
    assert!(refused, "the demo pool runs dry");
    // The dashboard is served where demo.json says, under a strict CSP, and the
    // org summary it reads counts that 402.
    let get = |url: String| {
        Request::get(url)
            .header("authorization", format!("Bearer {token}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    let page =
        send(get(demo["dashboard_url"].as_str().expect("demo.json names the dashboard").to_owned())).await;
    assert_eq!(page.status, 200);
    assert!(page.header("content-security-policy").is_some_and(|csp| csp.contains("default-src 'none'")));
    let summary = send(get(format!("{admin}/admin/v1/orgs/{org}/summary"))).await.json();
    let counts = summary["refusals"]["counts"].as_array().unwrap();
    assert!(
        counts.iter().any(|c| c["reason"] == "insufficient_credits" && c["total"].as_u64() >= Some(1)),
        "the 402 is counted: {summary}"
    );
    let bought = admin_post(
        format!("{admin}/admin/v1/orgs/{org}/purchases"),
        token,
        "top-up-1",
        json!({"amount": "1.00"}),
    )
    .await;
    assert_eq!(bought.status, 201, "the demo's token buys credit: {:?}", bought.body);
    let stream =
        json!({"model": "mock-gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let reply = post_json(&format!("{proxy}/v1/chat/completions"), key, &stream).await;
    assert_eq!(reply.status, 200, "the stream after the top-up is served: {:?}", reply.body);
    assert!(String::from_utf8_lossy(&reply.body).contains("[DONE]"), "{:?}", reply.body);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.path().join("demo.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "demo.json holds secrets: owner only, got {mode:o}");
    }
}

#[tokio::test]
async fn the_demo_uses_the_admin_token_of_the_environment_when_set() {
    let data = tempfile::tempdir().unwrap();
    let _demo = start_demo(data.path(), Some("operator-chosen-token-0123456789"));
    let demo = demo_json(data.path()).await;
    assert_eq!(demo["admin_token"], "operator-chosen-token-0123456789");
    let admin = demo["admin_url"].as_str().unwrap();
    let request = Request::get(format!("{admin}/admin/v1/orgs"))
        .header("authorization", "Bearer operator-chosen-token-0123456789")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(send(request).await.status, 200);
}
