//! `creditgate admin ...` drives a real admin listener: set up an org, buy
//! credits, read balances and usage; refusals exit non-zero with the reason.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

/// Run `creditgate admin --url URL ARGS...` with the operator token.
async fn admin_cli(stack: &Stack, args: &[&str]) -> (bool, String, String) {
    admin_cli_at(format!("http://{}", stack.gateway.admin_addr()), args).await
}

/// The same against any admin URL.
async fn admin_cli_at(url: String, args: &[&str]) -> (bool, String, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_creditgate"))
            .args(["admin", "--url", &url])
            .args(&args)
            .env("CREDITGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn field(stdout: &str, name: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    value[name].to_string().trim_matches('"').to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_the_common_tasks_from_the_command_line() {
    let stack = start().await;
    let today = chrono::Utc::now().date_naive().to_string();
    let (ok, out, err) =
        admin_cli(&stack, &["create-org", "--name", "cli-org", "--start", &today, "--platform", "20"]).await;
    assert!(ok, "{err}");
    let org = field(&out, "id");
    let (ok, out, err) =
        admin_cli(&stack, &["add-user", "--org", &org, "--name", "ana", "--plan", "pro"]).await;
    assert!(ok, "{err}");
    let user = field(&out, "id");
    let (ok, out, err) =
        admin_cli(&stack, &["create-key", "--org", &org, "--user", &user, "--label", "cli"]).await;
    assert!(ok, "{err}");
    let secret = field(&out, "secret");
    assert!(secret.starts_with("cg_"));
    let (ok, out, err) =
        admin_cli(&stack, &["purchase", "--org", &org, "--amount", "5", "--idempotency-key", "cli-buy-1"])
            .await;
    assert!(ok && out.contains("cli-buy-1"), "{out}{err}");

    let reply = post_json(
        &stack.url("/v1/chat/completions"),
        &secret,
        &serde_json::json!({"model": "mock-gpt", "max_tokens": 5}),
    )
    .await;
    assert_eq!(reply.status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;

    let (ok, out, err) = admin_cli(&stack, &["balance", "--org", &org]).await;
    assert!(ok, "{err}");
    assert!(out.lines().next().unwrap().starts_with("wallet"), "a table: {out}");
    assert!(out.contains("24.99"), "25 less one small call: {out}");
    let (ok, table, err) = admin_cli(&stack, &["usage", "--org", &org, "--group-by", "model"]).await;
    assert!(ok, "{err}");
    assert!(table.contains("mock-gpt") && table.contains("\u{2014} total \u{2014}"), "{table}");
    let (ok, csv, _) = admin_cli(&stack, &["usage", "--org", &org, "--group-by", "model", "--csv"]).await;
    assert!(ok);
    assert!(csv.starts_with("model,requests,charged"), "{csv}");

    // A refused call exits non-zero and says why.
    let (ok, _, err) = admin_cli(&stack, &["add-user", "--org", &org, "--name", "x", "--plan", "lite"]).await;
    assert!(!ok);
    assert!(err.contains("lite_monthly_allowance"), "{err}");
}

/// An admin "server" that reads one request head and hangs up without an
/// answer, as a connection lost mid-purchase would; returns the head it read.
async fn hang_up_once() -> (String, tokio::task::JoinHandle<String>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let head = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let read = socket.read(&mut chunk).await.unwrap();
            assert!(read > 0, "the CLI closed before sending its request");
            head.extend_from_slice(&chunk[..read]);
        }
        String::from_utf8_lossy(&head).into_owned()
    });
    (url, head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purchase_that_got_no_answer_names_its_key_and_a_retry_with_it_buys_once() {
    let (url, head) = hang_up_once().await;
    let (ok, _, err) = admin_cli_at(url, &["purchase", "--org", "1", "--amount", "5"]).await;
    assert!(!ok, "no answer is a failure");
    let sent = head.await.unwrap().to_lowercase();
    let key = sent
        .lines()
        .find_map(|line| line.strip_prefix("idempotency-key: "))
        .expect("the purchase carried an idempotency key")
        .trim()
        .to_owned();
    assert!(err.contains(&format!("--idempotency-key {key}")), "the CLI told the key it sent: {err}");

    // The retry the CLI suggested, twice, against a real gateway: one purchase.
    let stack = start().await;
    for _ in 0..2 {
        let (ok, _, err) =
            admin_cli(&stack, &["purchase", "--org", "1", "--amount", "5", "--idempotency-key", &key]).await;
        assert!(ok, "{err}");
    }
    let (ok, out, err) = admin_cli(&stack, &["balance", "--org", "1"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("105"), "100 seeded + 5 bought once: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_query_values_are_percent_encoded() {
    // A `+` in a time zone offset would read as a space if sent raw.
    let stack = start().await;
    let (ok, out, err) = admin_cli(
        &stack,
        &["usage", "--org", "1", "--from", "2020-01-01T00:00:00+01:00", "--to", "2099-01-01T00:00:00+01:00"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("\u{2014} total \u{2014}"), "{out}");
}
