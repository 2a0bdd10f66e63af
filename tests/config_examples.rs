//! Every example file in config/ parses.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use creditgate::config::GatewayConfig;

#[test]
fn every_gateway_example_parses() {
    let mut checked = 0;
    for entry in std::fs::read_dir("config").unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("gateway") && name.ends_with(".toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            // Secrets named by examples are stand-ins here.
            let config = GatewayConfig::parse(&path, &text, &|_| Some("example-secret".to_owned()))
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(!config.routes.is_empty(), "{name} has routes");
            checked += 1;
        }
    }
    assert!(checked >= 1, "found no gateway example in config/");
    let built_in = GatewayConfig::parse(Path::new("built-in"), creditgate::demo::EXAMPLE_CONFIG, &|_| None);
    assert!(built_in.is_ok(), "the demo's built-in config parses without any environment");
}

#[test]
fn every_price_example_parses_and_prices_what_the_gateway_example_routes() {
    let mut checked = 0;
    for entry in std::fs::read_dir("config").unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("prices") && name.ends_with(".toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            creditgate::pricing::PriceTable::parse(&name, &text).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
    }
    assert!(checked >= 1, "found no price example in config/");
    let config = GatewayConfig::parse(
        Path::new("config/gateway.toml"),
        &std::fs::read_to_string("config/gateway.toml").unwrap(),
        &|_| None,
    )
    .unwrap();
    let pricing = config.pricing.as_ref().expect("the example config names a price file");
    let metrics = std::sync::Arc::new(creditgate::telemetry::metrics::Metrics::default());
    let live = creditgate::pricing::LivePrices::load(
        &pricing.file,
        config.required_tools(),
        chrono::Utc::now(),
        metrics,
    );
    assert!(
        live.is_ok(),
        "the example price file prices every tool the example routes name: {:?}",
        live.err()
    );
}
