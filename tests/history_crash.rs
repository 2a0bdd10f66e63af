//! Crash safety of checkpoints and retention: a real `creditgate serve`
//! process on a real sled directory, with a real mock upstream, is killed
//! with SIGKILL while it writes a checkpoint, while it writes an export, and
//! while it prunes. The window is held open by the test-only
//! `CREDITGATE_TEST_PAUSE` hook (no timing luck). After each kill the
//! gateway starts, every acknowledged purchase is in its balance, an
//! idempotency key from an exported (pruned) day still replays, and
//! `creditgate ledger verify --exports` passes over the whole history.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request};
use http_body_util::Full;
use rust_decimal::Decimal;
use serde_json::{json, Value};

struct Running {
    child: Child,
    proxy: String,
    admin: String,
}

impl Drop for Running {
    /// A test that fails must not leave its gateway running (holding the
    /// test's output open).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `serve` with the clock shifted by `shift_days` and the test pause.
fn spawn(config: &Path, data: &Path, shift_days: i64, pause: Option<&str>) -> Running {
    let mut command = serve_command(config, data);
    command.env("CREDITGATE_TEST_CLOCK_SHIFT_DAYS", shift_days.to_string());
    if let Some(pause) = pause {
        command.env("CREDITGATE_TEST_PAUSE", pause);
    }
    let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
    let (proxy, admin) = logged_addresses(&mut child);
    Running { child, proxy, admin }
}

fn stop(mut running: Running) {
    let status = Command::new("kill").args(["-TERM", &running.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert!(running.child.wait().unwrap().success(), "a clean stop exits 0");
}

async fn call(running: &Running, method: Method, path: &str, body: Value, key: Option<&str>) -> Reply {
    operator_call(&running.admin, method, path, body, key).await.unwrap()
}

async fn pool_balance(running: &Running) -> Decimal {
    let balances = call(running, Method::GET, "/admin/v1/orgs/1/balances", json!({}), None).await.json();
    balances["balances"][0]["balance"].as_str().unwrap().parse().unwrap()
}

/// Served chat calls through the proxy (each settles a debit).
async fn traffic(running: &Running, secret: &str, calls: usize) {
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    for _ in 0..calls {
        let request = Request::post(format!("http://{}/v1/chat/completions", running.proxy))
            .header("authorization", format!("Bearer {secret}"))
            .body(Full::new(Bytes::from(r#"{"model":"mock-gpt","max_tokens":10}"#)))
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        http_body_util::BodyExt::collect(response.into_body()).await.unwrap();
    }
}

/// Two past days of history written through the gateway (stopped cleanly
/// each time), then a run in the present that is killed at `step`.
async fn killed_during(step: &str) {
    let mock = creditgate::mock::MockUpstream::start("127.0.0.1:0".parse().unwrap(), Default::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    let ledger = "\n[ledger]\ncheckpoint_every_records = 5\ncheckpoint_interval_ms = 200\nretain_days = 1\n";
    std::fs::write(&config, config_text(mock.addr(), "", "") + ledger).unwrap();
    let data = dir.path().join("data");
    let started = (chrono::Utc::now() - chrono::TimeDelta::days(10)).date_naive().to_string();

    // Three days ago: the org, a user, a key, a purchase, traffic.
    let running = spawn(&config, &data, -3, None);
    let org = call(
        &running,
        Method::POST,
        "/admin/v1/orgs",
        json!({"name": "history", "contract": {"start": started, "years": 1, "platform_allocation_per_year": "1000"}}),
        None,
    )
    .await
    .json();
    assert_eq!(org["id"], 1);
    let user =
        call(&running, Method::POST, "/admin/v1/orgs/1/users", json!({"name": "u", "plan": "pro"}), None)
            .await
            .json();
    let key =
        call(&running, Method::POST, "/admin/v1/orgs/1/keys", json!({"user": user["id"]}), None).await.json();
    let secret = key["secret"].as_str().unwrap().to_owned();
    let bought =
        call(&running, Method::POST, "/admin/v1/orgs/1/purchases", json!({"amount": "5"}), Some("old-buy"))
            .await;
    assert_eq!(bought.status, 201);
    traffic(&running, &secret, 15).await;
    stop(running);
    // Two days ago: more traffic.
    let running = spawn(&config, &data, -2, None);
    traffic(&running, &secret, 15).await;
    let before = pool_balance(&running).await;
    stop(running);

    // Today, with the step held open: purchases until the pause shows.
    let running = spawn(&config, &data, 0, Some(&format!("{step}=20000")));
    let marker = data.join("ledger").join(format!("test-paused-{step}"));
    let mut acknowledged = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !marker.exists() {
        assert!(std::time::Instant::now() < deadline, "the {step} pause never came");
        let idempotency = format!("today-{acknowledged}");
        let reply = call(
            &running,
            Method::POST,
            "/admin/v1/orgs/1/purchases",
            json!({"amount": "1"}),
            Some(&idempotency),
        )
        .await;
        if reply.status == 201 {
            acknowledged += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut running = running;
    running.child.kill().unwrap(); // SIGKILL, inside the step
    running.child.wait().unwrap();

    // Restart: nothing acknowledged is lost, nothing counted twice.
    let running = spawn(&config, &data, 0, None);
    let after = pool_balance(&running).await;
    let floor = before + Decimal::from(acknowledged);
    assert!(
        after == floor || after == floor + Decimal::ONE,
        "balance {after}: {before} before today plus {acknowledged} acknowledged purchases (one more may have \
         committed unanswered)"
    );
    let replay =
        call(&running, Method::POST, "/admin/v1/orgs/1/purchases", json!({"amount": "5"}), Some("old-buy"))
            .await;
    assert!(replay.status.is_success(), "{:?}", replay.json());
    assert_eq!(pool_balance(&running).await, after, "an old idempotency key replays, even after pruning");
    // Let retention finish, then audit the whole history.
    let page = call(&running, Method::GET, "/admin/v1/orgs/1/ledger?limit=1", json!({}), None).await.json();
    assert!(page["history"]["export_dir"].is_string(), "the ledger page says where history lives: {page}");
    traffic(&running, &secret, 12).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop(running);
    let verify = Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .args(["ledger", "verify", "--data-dir"])
        .arg(&data)
        .arg("--exports")
        .arg(data.join("exports"))
        .output()
        .unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&verify.stdout), String::from_utf8_lossy(&verify.stderr));
    assert!(verify.status.success(), "{said}");
    assert!(said.contains("exported day(s)"), "{said}");
    println!("{step}: {said}");
    mock.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_a_checkpoint_is_written() {
    // Proves a checkpoint half written at a kill is ignored and start-up is correct.
    killed_during("checkpoint").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_an_export_is_written() {
    // Proves an export file half written at a kill is never taken as complete nor pruned.
    killed_during("export").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_pruning() {
    // Proves a kill between recording the prune floor and removing records is recovered.
    killed_during("prune").await;
}

/// The historian's `creditgate_history_records_handed_over` gauge.
async fn handed_over(running: &Running) -> u64 {
    let metrics = call(running, Method::GET, "/metrics", json!({}), None).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    text.lines()
        .find_map(|line| line.strip_prefix("creditgate_history_records_handed_over "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no hand-over gauge in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shadow_keeps_catching_up_while_a_checkpoint_is_written() {
    // Proves a checkpoint is written off the historian's own thread: with
    // the write held open, records made durable meanwhile still reach the
    // shadow by the writer's hand-over (before, the historian sat inside
    // the write, and under load the hand-over filled up behind it).
    let mock = creditgate::mock::MockUpstream::start("127.0.0.1:0".parse().unwrap(), Default::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    let ledger = "\n[ledger]\ncheckpoint_every_records = 5\ncheckpoint_interval_ms = 200\n";
    std::fs::write(&config, config_text(mock.addr(), "", "") + ledger).unwrap();
    let data = dir.path().join("data");
    let started = (chrono::Utc::now() - chrono::TimeDelta::days(10)).date_naive().to_string();
    let running = spawn(&config, &data, 0, Some("checkpoint=20000"));
    let org = json!({"name": "busy", "contract": {"start": started, "years": 1, "platform_allocation_per_year": "1000"}});
    assert_eq!(call(&running, Method::POST, "/admin/v1/orgs", org, None).await.status, 201);
    let marker = data.join("ledger").join("test-paused-checkpoint");
    let buy = |n: usize| {
        let running = &running;
        async move {
            let reply = call(
                running,
                Method::POST,
                "/admin/v1/orgs/1/purchases",
                json!({"amount": "1"}),
                Some(&format!("buy-{n}")),
            )
            .await;
            assert_eq!(reply.status, 201);
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    while !marker.exists() {
        assert!(std::time::Instant::now() < deadline, "the checkpoint pause never came");
        buy(n).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the historian take what came before the pause, then write more.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = handed_over(&running).await;
    for more in 0..10 {
        buy(n + more).await;
    }
    // Polled, not slept through: the checkpoint's pause lasts 20 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut after = handed_over(&running).await;
    while after < before + 10 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = handed_over(&running).await;
    }
    assert!(marker.exists(), "still inside the checkpoint's write");
    assert!(after >= before + 10, "the shadow took the purchases made during the write: {before} -> {after}");
    drop(running);
    mock.stop().await;
}
