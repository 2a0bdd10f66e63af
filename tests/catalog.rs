//! `creditgate prices import` on LiteLLM's real catalog (from the pinned
//! `litellm` wheel that `.ci/install-test-deps` fetches), overlays, and
//! `creditgate prices diff`, through the real binary.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::str::FromStr;

use rust_decimal::Decimal;

const BINARY: &str = env!("CARGO_BIN_EXE_creditgate");
const CATALOG_VERSION: &str = "1.110.2";

fn catalog_path() -> PathBuf {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/catalog/litellm-{CATALOG_VERSION}.json"));
    assert!(
        path.exists(),
        "{} is missing: run .ci/install-test-deps (it fetches the litellm wheel)",
        path.display()
    );
    path
}

fn run(args: &[&str]) -> Output {
    Command::new(BINARY).args(args).output().unwrap()
}

/// `prices import --from litellm CATALOG --overlay OVERLAY [--only ONLY...]`.
fn import_with_overlay(catalog: &Path, overlay: &Path, only: &[&str]) -> Output {
    let mut args = vec![
        "prices",
        "import",
        "--from",
        "litellm",
        catalog.to_str().unwrap(),
        "--overlay",
        overlay.to_str().unwrap(),
    ];
    if !only.is_empty() {
        args.push("--only");
        args.extend_from_slice(only);
    }
    run(&args)
}

/// The number literally written for `field` of `model` in the catalog's
/// text, read as an exact decimal (not through a binary double, so this
/// check does not share the importer's path).
fn written_price(catalog: &str, model: &str, field: &str) -> Option<Decimal> {
    let start = catalog.find(&format!("\n    \"{model}\": {{"))?;
    let end = start + catalog[start..].find("\n    }")?;
    let body = &catalog[start..end];
    let at = body.find(&format!("\n        \"{field}\": "))? + field.len() + 13;
    let literal: String = body[at..].chars().take_while(|c| !matches!(c, ',' | '\n')).collect();
    let literal = literal.trim();
    let exact = if literal.contains(['e', 'E']) {
        Decimal::from_scientific(literal).unwrap()
    } else {
        Decimal::from_str_exact(literal).unwrap()
    };
    Some(exact)
}

/// The value of `key` under `[models."model"]` in an imported table.
fn imported(table: &toml::Table, model: &str, key: &str) -> Option<Decimal> {
    let value = table.get("models")?.get(model)?.get(key)?;
    Some(Decimal::from_str(value.as_str().unwrap()).unwrap())
}

#[test]
fn the_real_litellm_catalog_imports_exactly_and_every_skip_has_a_reason() {
    let catalog_file = catalog_path();
    let catalog = std::fs::read_to_string(&catalog_file).unwrap();
    let out = run(&["prices", "import", "--from", "litellm", catalog_file.to_str().unwrap()]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    let text = String::from_utf8(out.stdout).unwrap();

    // The output is a price file the gateway accepts: check-config passes.
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.toml");
    std::fs::write(&prices, &text).unwrap();
    let gateway = dir.path().join("gateway.toml");
    std::fs::write(
        &gateway,
        format!(
            "[server]\ndata_dir = {:?}\n[pricing]\nfile = {:?}\n[upstreams.openai]\nbase_url = \"http://127.0.0.1:9\"\n\
             [[routes]]\nprefix = \"/v1/chat/completions\"\nupstream = \"openai\"\nflavour = \"openai-chat\"\n",
            dir.path().join("data"),
            prices
        ),
    )
    .unwrap();
    let check = run(&["check-config", "--config", gateway.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // A sample of well-known models across providers: each price equals the
    // catalog's per-token price x 1,000,000, exactly.
    let table: toml::Table = toml::from_str(&text).unwrap();
    let sample = [
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4.1",
        "gpt-4.1-mini",
        "gpt-4.1-nano",
        "gpt-5",
        "gpt-5-mini",
        "o3",
        "o4-mini",
        "text-embedding-3-small",
        "text-embedding-3-large",
        "claude-sonnet-4-5",
        "claude-opus-4-5",
        "claude-opus-4-6",
        "anthropic.claude-3-5-haiku-20241022-v1:0",
        "claude-haiku-4-5",
        "deepseek/deepseek-chat",
        "mistral/mistral-large-latest",
        "mistral/codestral-latest",
        "mistral/devstral-latest",
        "xai/grok-4.3",
        "cohere/embed-v4.0",
        "gemini/gemini-2.5-flash-lite",
        "gpt-5-nano",
        "together_ai/meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo",
    ];
    let fields = [
        ("input_cost_per_token", "input_per_mtok"),
        ("output_cost_per_token", "output_per_mtok"),
        ("cache_read_input_token_cost", "cached_input_per_mtok"),
        ("cache_creation_input_token_cost", "cache_write_5m_per_mtok"),
        ("cache_creation_input_token_cost_above_1hr", "cache_write_1h_per_mtok"),
    ];
    let mut compared = 0;
    let mut models = 0;
    for model in sample {
        assert!(catalog.contains(&format!("\n    \"{model}\": {{")), "{model} is not in the catalog");
        if imported(&table, model, "input_per_mtok").is_none() {
            // A sample model may be skipped, but only with a reason.
            assert!(
                stderr.contains(&format!("skipped {model}: ")),
                "{model} is neither imported nor listed as skipped"
            );
            continue;
        }
        models += 1;
        for (catalog_field, key) in fields {
            let Some(per_token) = written_price(&catalog, model, catalog_field) else { continue };
            let expected = per_token * Decimal::from(1_000_000);
            if expected.is_zero() {
                // Embeddings' output is free, and a zero cache price is the
                // catalog's placeholder: both are left out.
                assert_eq!(imported(&table, model, key), None, "{model} {key}");
                continue;
            }
            assert_eq!(imported(&table, model, key), Some(expected), "{model} {key}");
            compared += 1;
        }
    }
    assert!(models >= 20, "only {models} sample models imported");
    assert!(compared >= 50, "only {compared} prices compared");

    // Every entry is imported or skipped with a reason; none vanish.
    let entries = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&catalog).unwrap();
    let total = entries.keys().filter(|name| *name != "sample_spec").count();
    let skipped: Vec<&str> = stderr.lines().filter(|line| line.starts_with("skipped ")).collect();
    for line in &skipped {
        let reason = line.split_once(": ").map(|(_, reason)| reason.trim()).unwrap_or("");
        assert!(!reason.is_empty(), "a skip without a reason: {line}");
    }
    let imported_count = table["models"].as_table().unwrap().len();
    assert_eq!(imported_count + skipped.len(), total, "imported {imported_count}, skipped {}", skipped.len());
    assert!(imported_count > 500, "imported only {imported_count}");
}

#[test]
fn an_overlay_wins_over_the_catalog_for_every_field_it_sets() {
    let catalog_file = catalog_path();
    let dir = tempfile::tempdir().unwrap();
    let overlay = dir.path().join("overlay.toml");
    std::fs::write(
        &overlay,
        r#"label = "acme-2026-12"

[limits]
max_price_per_mtok = "500"

[markup]
percent = "20"

[models."gpt-4o"]
input_per_mtok = "2.10"          # negotiated
markup_percent = "12.5"

[models."acme-private"]
input_per_mtok = "0.50"
output_per_mtok = "1.50"
default_max_output_tokens = 4096

[tools."web_search_call"]
per_call = "0.01"
markup_percent = "0"
"#,
    )
    .unwrap();
    let out = import_with_overlay(&catalog_file, &overlay, &["gpt-4o", "claude-sonnet-4*"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let table: toml::Table = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(table["label"].as_str(), Some("acme-2026-12"));
    assert_eq!(imported(&table, "gpt-4o", "input_per_mtok"), Some(Decimal::from_str("2.10").unwrap()));
    // Fields the overlay leaves alone come from the catalog.
    assert_eq!(imported(&table, "gpt-4o", "output_per_mtok"), Some(Decimal::from(10)));
    assert_eq!(imported(&table, "acme-private", "output_per_mtok"), Some(Decimal::from_str("1.50").unwrap()));
    assert!(table["tools"].get("web_search_call").is_some());
    // The overlay's markups pass into the table: table-wide, per model and per tool.
    assert_eq!(table["markup"]["percent"].as_str(), Some("20"));
    assert_eq!(table["models"]["gpt-4o"]["markup_percent"].as_str(), Some("12.5"));
    assert_eq!(table["tools"]["web_search_call"]["markup_percent"].as_str(), Some("0"));
    let models = table["models"].as_table().unwrap();
    assert!(models
        .keys()
        .all(|name| name == "gpt-4o" || name == "acme-private" || name.starts_with("claude-sonnet-4")));
    assert!(models.keys().any(|name| name.starts_with("claude-sonnet-4")));
}

#[test]
fn prices_diff_reports_each_change_and_exits_one_only_when_something_changed() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let old = write(
        "old.toml",
        "label = \"a\"\n[models.\"m\"]\ninput_per_mtok = \"2.00\"\noutput_per_mtok = \"8\"\ndefault_max_output_tokens = 100\n\
         [models.\"gone\"]\ninput_per_mtok = \"1\"\n",
    );
    let new = write(
        "new.toml",
        "label = \"b\"\n[models.\"m\"]\ninput_per_mtok = \"2.50\"\noutput_per_mtok = \"6\"\ndefault_max_output_tokens = 100\n\
         [models.\"fresh\"]\ninput_per_mtok = \"3\"\n",
    );
    let out = run(&["prices", "diff", &old, &new]);
    assert_eq!(out.status.code(), Some(1));
    let lines = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        lines,
        "model fresh: added (input_per_mtok = 3)\nmodel m: input_per_mtok 2.00 -> 2.50 (+25%)\n\
         model m: output_per_mtok 8 -> 6 (-25%)\nmodel gone: removed\n"
    );
    let same = run(&["prices", "diff", &old, &old]);
    assert_eq!(same.status.code(), Some(0));
    assert!(same.stdout.is_empty());
    let broken = write("broken.toml", "label = \"c\"\n[models.\"m\"]\ninput_per_mtok = 2.5\n");
    let invalid = run(&["prices", "diff", &old, &broken]);
    assert_eq!(invalid.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&invalid.stderr).contains("broken.toml:3"),
        "{}",
        String::from_utf8_lossy(&invalid.stderr)
    );
}

/// The README's update workflow: the real catalog under the example overlay
/// gives a table the example gateway config accepts, with the negotiated
/// rate and the mock models in it.
#[test]
fn the_readme_workflow_with_the_example_overlay_gives_a_table_the_example_gateway_accepts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let catalog_file = catalog_path();
    let out = import_with_overlay(&catalog_file, &root.join("config/overlay.toml"), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(root.join("config/gateway.toml"), dir.path().join("gateway.toml")).unwrap();
    std::fs::write(dir.path().join("prices.toml"), &out.stdout).unwrap();
    let check = Command::new(BINARY)
        .args(["check-config", "--config", dir.path().join("gateway.toml").to_str().unwrap()])
        .env("CREDITGATE_ADMIN_TOKEN", "example")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{said}{}", String::from_utf8_lossy(&check.stderr));
    assert!(said.contains("(version example@"), "{said}");
    let table: toml::Table = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(imported(&table, "gpt-4o", "input_per_mtok"), Some(Decimal::from_str("2.25").unwrap()));
    assert_eq!(imported(&table, "mock-gpt", "output_per_mtok"), Some(Decimal::from(2)));
    // `prices diff` against the example table lists the change and exits 1.
    let diff = run(&[
        "prices",
        "diff",
        root.join("config/prices.toml").to_str().unwrap(),
        dir.path().join("prices.toml").to_str().unwrap(),
    ]);
    assert_eq!(diff.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&diff.stdout).contains("model gpt-4o: input_per_mtok 2.50 -> 2.25 (-10%)")
    );
}
