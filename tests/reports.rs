//! Usage reports read from per-organization rollups agree exactly with a
//! scan of the ledger entries, and keep up as new entries arrive.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};

/// Debits of the stack's org the ledger serves so far.
async fn debits(stack: &Stack) -> usize {
    let page =
        admin_get(stack, &format!("/admin/v1/orgs/{}/ledger?kind=debit&limit=1000", stack.keys.org.0)).await;
    page["entries"].as_array().unwrap().len()
}

/// Waits until the ledger serves `count` debits (they become readable once flushed).
async fn wait_for_debits(stack: &Stack, count: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while debits(stack).await < count {
        assert!(std::time::Instant::now() < deadline, "the debits never became readable");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

const ALL_DIMENSIONS: &str = "user,app,key,end_user,model,tool,route,day,month";

/// The usage report from the rollups (open range) and from a scan (a range
/// that does not start on a quarter hour, covering the same entries).
async fn both_ways(stack: &Stack) -> (Value, Value) {
    let base = format!("/admin/v1/orgs/{}/usage?group_by={ALL_DIMENSIONS}", stack.keys.org.0);
    let rolled = admin_get(stack, &base).await;
    let scanned = admin_get(stack, &format!("{base}&from=2000-01-01T00:00:00.5Z")).await;
    (rolled, scanned)
}

#[tokio::test]
async fn usage_from_rollups_equals_usage_from_the_entries_and_keeps_up() {
    // Proves the rollup path is exact: every dimension and total matches a
    // scan of the entries, before and after more traffic (each entry folded
    // in once), and an aligned range that holds nothing reports nothing.
    let stack = start().await;
    let chat = stack.url("/v1/chat/completions");
    for seed in 1..=2 {
        let body = json!({"model": "mock-gpt", "max_tokens": 20, "seed": seed});
        assert_eq!(post_json(&chat, &stack.keys.pro, &body).await.status, 200);
    }
    let search = json!({"query": "q", "num_results": 3});
    assert_eq!(post_json(&stack.url("/v1/tools/web-search"), &stack.keys.app, &search).await.status, 200);
    wait_for_debits(&stack, 3).await;
    let (rolled, scanned) = both_ways(&stack).await;
    assert_eq!(rolled, scanned, "rollups and entries agree");
    assert_eq!(rolled["total"]["requests"], 3);

    let body = json!({"model": "mock-claude", "max_tokens": 20});
    assert_eq!(post_json(&stack.url("/v1/messages"), &stack.keys.pro, &body).await.status, 200);
    wait_for_debits(&stack, 4).await;
    let (rolled, scanned) = both_ways(&stack).await;
    assert_eq!(rolled, scanned, "rollups and entries agree after more traffic");
    assert_eq!(rolled["total"]["requests"], 4, "each entry is counted once: {rolled}");

    let future = format!("/admin/v1/orgs/{}/usage?from=2100-01-01T00:15:00Z", stack.keys.org.0);
    assert_eq!(admin_get(&stack, &future).await["rows"], json!([]), "an aligned empty range");
}
