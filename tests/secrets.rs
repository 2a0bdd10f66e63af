//! Secrets stay secret: API keys are stored only as hashes, and neither they
//! nor the upstream credential appear in the logs at any level.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use creditgate::mock::{MockOptions, MockUpstream};

/// Every byte under `dir`, file by file.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn api_keys_are_stored_only_as_hashes() {
    let stack = start().await;
    // Use the keys so settles are written too, then stop to flush everything.
    for key in [&stack.keys.pro, &stack.keys.app] {
        let reply =
            post_json(&stack.url("/v1/chat/completions"), key, &serde_json::json!({"model": "mock-gpt"}))
                .await;
        assert_eq!(reply.status, 200);
    }
    stack.shutdown.cancel();
    stack.gateway.wait().await;
    let files = files_under(stack.data_dir.path());
    assert!(files.iter().map(|(_, b)| b.len()).sum::<usize>() > 0, "the store wrote something");
    for secret in [&stack.keys.pro, &stack.keys.lite, &stack.keys.app] {
        // The part after the prefix: 64 random hex digits.
        let needle = secret.trim_start_matches("cg_").as_bytes();
        for (path, bytes) in &files {
            assert!(!contains(bytes, needle), "a key secret is stored in {}", path.display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_even_at_trace_level() {
    let mock = MockUpstream::start("127.0.0.1:0".parse().unwrap(), MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(&config_path, config_text(mock.addr(), "", "")).unwrap();
    let data = dir.path().join("data");
    // Seed a key through the real admin API of a real process.
    let mut child = Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .args(["serve", "--config"])
        .arg(&config_path)
        .arg("--data-dir")
        .arg(&data)
        .env("MOCK_UPSTREAM_KEY", UPSTREAM_SECRET)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("ORG_TOKEN", ORG_TOKEN)
        .env("RUST_LOG", "trace")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let mut proxy = None;
    let mut admin = None;
    while proxy.is_none() || admin.is_none() {
        let line = rx.recv_timeout(Duration::from_secs(20)).expect("gateway did not start");
        if let Some(rest) = line.split("proxy_addr=").nth(1) {
            proxy = Some(rest.split_whitespace().next().unwrap().to_owned());
        }
        if let Some(rest) = line.split("admin_addr=").nth(1) {
            admin = Some(rest.split_whitespace().next().unwrap().to_owned());
        }
    }
    let (proxy, admin) = (proxy.unwrap(), admin.unwrap());
    let admin_call = |method: http::Method, path: String, body: serde_json::Value| {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("http://{admin}{path}"))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
            .unwrap();
        send(request)
    };
    let today = chrono::Utc::now().date_naive().to_string();
    let org = admin_call(http::Method::POST, "/admin/v1/orgs".into(),
        serde_json::json!({"name": "o", "contract": {"start": today, "years": 1, "platform_allocation_per_year": "10"}})).await.json();
    let org = org["id"].as_u64().unwrap();
    let user = admin_call(
        http::Method::POST,
        format!("/admin/v1/orgs/{org}/users"),
        serde_json::json!({"name": "u", "plan": "pro"}),
    )
    .await
    .json();
    let key = admin_call(
        http::Method::POST,
        format!("/admin/v1/orgs/{org}/keys"),
        serde_json::json!({"user": user["id"]}),
    )
    .await
    .json();
    let secret = key["secret"].as_str().unwrap().to_owned();
    // A model name carrying a line of its own (and a terminal escape) stays on the refusal's line.
    let forging = serde_json::json!({"model": "unpriced\nFORGED-LINE status=200\u{1b}[2J"});
    for body in [serde_json::json!({"model": "mock-gpt"}), serde_json::json!({"model": "unpriced"}), forging]
    {
        post_json(&format!("http://{proxy}/v1/chat/completions"), &secret, &body).await;
    }
    post_json(
        &format!("http://{proxy}/v1/chat/completions"),
        "cg_wrong_key_value_0000",
        &serde_json::json!({}),
    )
    .await;
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert!(child.wait().unwrap().success());
    let logs = reader.join().unwrap();
    assert!(logs.contains("request finished"), "trace logs were captured");
    assert!(logs.contains("FORGED-LINE"), "the refusal was logged");
    assert!(!logs.lines().any(|line| line.starts_with("FORGED-LINE")), "a client forged a log line:\n{logs}");
    assert!(!logs.contains('\u{1b}'), "a client's terminal escape reached the log");
    for secret in [secret.as_str(), UPSTREAM_SECRET, ADMIN_TOKEN, "cg_wrong_key_value_0000"] {
        assert!(!logs.contains(secret), "a secret appears in the logs:\n{logs}");
    }
    mock.stop().await;
}
