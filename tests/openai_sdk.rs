//! The real `openai` Python SDK works through the gateway with nothing changed
//! but `base_url` and the key, plain and streaming, and is charged for it.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use creditgate::ledger::entity::KeyHash;
use rust_decimal::Decimal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_needs_only_a_base_url_and_a_key() {
    let stack = start().await;
    let pool = stack.gateway.ledger().resolve_key(&KeyHash::of_secret(&stack.keys.pro)).unwrap().wallet;
    let before = stack.gateway.ledger().balance(pool, chrono::Utc::now()).unwrap().balance;
    let base_url = stack.url("/v1");
    let key = stack.keys.pro.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_client.py"))
            .arg(base_url)
            .arg(key)
            .output()
            .expect("python3 must be installed")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "the SDK script failed (install it with `python3 -m pip install -r tests/requirements.txt`):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // The mock answers min(max_tokens, 10 + seed % 41) tokens: min(12, 15).
    assert_eq!(result["plain_content"], "tok ".repeat(12), "{result}");
    assert_eq!(result["streamed"], "tok ".repeat(7), "{result}");
    assert_eq!(
        result["saw_usage_chunk"], false,
        "the usage the gateway asked for stays hidden from the client"
    );
    assert_eq!(result["refused"], "AuthenticationError", "a bad key is a 401 the SDK understands");

    // Both calls were charged, from the usage the mock reported.
    let journal = stack.mock.journal().entries();
    assert_eq!(journal.len(), 2, "two calls reached the upstream");
    let million = Decimal::from(1_000_000u64);
    let expected: Decimal = journal
        .iter()
        .map(|e| {
            let u = e.usage.unwrap();
            Decimal::from(u.input_tokens) / million
                + Decimal::from(u.output_tokens * 2) / million
                + Decimal::new(1, 4)
        })
        .sum();
    let mut charged = Decimal::ZERO;
    for _ in 0..100 {
        let b = stack.gateway.ledger().balance(pool, chrono::Utc::now()).unwrap();
        charged = before - b.balance;
        if b.open_holds == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(charged, expected);
}
