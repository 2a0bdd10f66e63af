//! `creditgate admin ...` drives a real admin listener: set up an org, buy
//! credits, read balances and usage; refusals exit non-zero with the reason.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

/// Run `creditgate admin --url URL ARGS...` with the operator token.
async fn admin_cli(stack: &Stack, args: &[&str]) -> (bool, String, String) {
    let url = format!("http://{}", stack.gateway.admin_addr());
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
    assert!(table.contains("mock-gpt") && table.contains("TOTAL"), "{table}");
    let (ok, csv, _) = admin_cli(&stack, &["usage", "--org", &org, "--group-by", "model", "--csv"]).await;
    assert!(ok);
    assert!(csv.starts_with("model,requests,charged"), "{csv}");

    // A refused call exits non-zero and says why.
    let (ok, _, err) = admin_cli(&stack, &["add-user", "--org", &org, "--name", "x", "--plan", "lite"]).await;
    assert!(!ok);
    assert!(err.contains("lite_monthly_allowance"), "{err}");
}
