//! Price lookup + cost for one request, against a plain `HashMap` lookup of
//! the same name as a baseline (so the figure can be read as a ratio).
//!
//! `cargo bench -p creditgate-bench --bench pricing`
//!
//! Target: the model case under 200 ns median.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use chrono::{DateTime, Utc};
use creditgate::pricing::{HoldRequest, PriceTable, TokenUsage};
use criterion::{criterion_group, criterion_main, Criterion};

/// The example price file shipped with the gateway.
const PRICES: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/prices.toml"));

/// A fixed instant, so the schedule picked never changes between runs.
fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2025-11-25T12:00:00Z")
        .expect("a valid RFC 3339 instant")
        .with_timezone(&Utc)
}

fn pricing(c: &mut Criterion) {
    let table = PriceTable::parse("config/prices.toml", PRICES).expect("the example file is valid");
    let at = now();
    // A realistic chat request: ~4 kB body, max_tokens 1024; it used 1200
    // input tokens (200 of them cached) and 300 output tokens.
    let model = "gpt-4o-mini";
    let request = HoldRequest { input_bytes: 4_000, max_output_tokens: Some(1_024) };
    let usage = TokenUsage {
        input_tokens: 1_200,
        cached_input_tokens: 200,
        output_tokens: 300,
        ..TokenUsage::default()
    };
    let tool = "web-search";
    let tool_units = 10_u64;
    // The baseline: the same name looked up in a std map of the same size.
    let baseline: HashMap<String, u64> = [
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4.1",
        "gpt-4.1-mini",
        "text-embedding-3-small",
        "text-embedding-3-large",
        "claude-sonnet-4",
        "claude-opus-4-1",
        "claude-haiku-4-5",
        "claude-3-5-haiku",
        "mock-gpt",
        "mock-embed",
        "mock-claude",
    ]
    .iter()
    .zip(0_u64..)
    .map(|(name, price)| ((*name).to_owned(), price))
    .collect();

    let mut group = c.benchmark_group("pricing");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    group.bench_function("baseline_hashmap_lookup", |b| {
        b.iter(|| black_box(baseline.get(black_box(model)).copied()))
    });
    group.bench_function("model_lookup_hold_cost", |b| {
        b.iter(|| {
            let price = table.model(black_box(model), black_box(at)).expect("the model is priced");
            let hold = price.hold_amount(black_box(&request)).expect("fits");
            let cost = price.cost(black_box(&usage)).expect("fits");
            black_box((hold, cost))
        })
    });
    group.bench_function("tool_lookup_hold_cost", |b| {
        b.iter(|| {
            let price = table.tool(black_box(tool), black_box(at)).expect("the tool is priced");
            let hold = price.hold_amount(black_box(tool_units)).expect("fits");
            let cost = price.cost(black_box(tool_units)).expect("fits");
            black_box((hold, cost))
        })
    });
    group.finish();
}

criterion_group!(benches, pricing);
criterion_main!(benches);
