//! Importing LiteLLM's public price catalog into a price table.
//!
//! Outside [`crate::pricing`] on purpose: the catalog is made of binary
//! doubles, and the money module holds none (a test checks it).
//!
//! `model_prices_and_context_window.json` (shipped in the `litellm` Python
//! package) prices tokens as JSON numbers per token, such as `1.5e-07`. Each
//! number is read as the binary double JSON parsers give, turned into its
//! shortest decimal form (the digits that round-trip to that double; for the
//! catalog's values, the digits written in the file) and only then into an
//! exact [`Decimal`], multiplied by 1,000,000 for the per-1M-token prices of
//! a price table. No arithmetic happens in floating point.
//!
//! A model is imported only when every price it carries can be expressed;
//! otherwise it is skipped with the reason (never dropped silently), because
//! a partly imported model would be charged less than the provider bills.
//! Fields that do not change what a call through the gateway costs (batch-API
//! prices, metadata) are ignored.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde_json::{Map, Value};

/// API modes the gateway meters by tokens.
const TOKEN_MODES: &[&str] = &["chat", "completion", "responses", "embedding"];

/// Fields that carry no price (metadata), or prices of provider batch APIs,
/// which a real-time gateway does not proxy. A multiplier of the prices is
/// a price, whatever its name says ([`is_uplift`]).
fn ignored(field: &str) -> bool {
    field.ends_with("_batches") || !(field.contains("cost") || field.contains("pric") || is_uplift(field))
}

/// A field that scales the prices for some deployments
/// (`regional_processing_uplift_multiplier_eu`, `fedramp_uplift_multiplier`).
fn is_uplift(field: &str) -> bool {
    field.contains("uplift") || field.contains("multiplier")
}

/// Providers whose web search is a hosted tool a request opts into: the
/// gateway prices it per call under `[tools]` and refuses it unpriced, so the
/// catalog's per-query search fee need not be on the model. (Elsewhere, as
/// on Perplexity, every call searches and the model is skipped.)
fn search_is_a_tool(provider: &str) -> bool {
    ["openai", "azure", "azure_ai", "anthropic", "gemini", "groq"].contains(&provider)
        || provider.starts_with("vertex_ai")
        || provider.starts_with("bedrock")
}

/// Models that search on every call (search previews, OpenAI's search API
/// models, deep research): their per-query fee belongs to every request, not
/// to a tool call.
fn always_searches(name: &str) -> bool {
    name.contains("search-preview") || name.contains("search-api") || name.contains("deep-research")
}

/// A value that charges something: a non-zero number, or an object or
/// array holding one (tiered or per-size prices).
fn charges(value: &Value) -> bool {
    match value {
        Value::Number(number) => number.as_f64().is_some_and(|amount| amount != 0.0),
        Value::Array(items) => items.iter().any(charges),
        Value::Object(fields) => fields.values().any(charges),
        _ => false,
    }
}

/// A model that was not imported, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The catalog's name for it.
    pub model: String,
    /// Why the price schema cannot express it.
    pub reason: String,
}

/// The result of an import: the table's `[models]` and what was left out.
#[derive(Debug, Default)]
pub struct Import {
    /// Model name -> its price-table entry.
    pub models: BTreeMap<String, toml::Table>,
    /// Models left out, with their reasons.
    pub skipped: Vec<Skipped>,
    /// What imported models leave out or round (a service tier the table
    /// cannot state is refused when a request asks for it; surcharges of
    /// some deployments), for the operator to read.
    pub notes: Vec<Skipped>,
    /// Every name the catalog has, imported or not.
    pub known: std::collections::BTreeSet<String>,
}

/// A per-token price as an exact per-1M-token decimal string.
pub fn per_mtok(value: &Value) -> Result<Decimal, String> {
    let per_token = exact(value)?;
    let per_mtok = per_token.checked_mul(Decimal::from(1_000_000));
    per_mtok.map(|price| price.normalize()).ok_or_else(|| format!("{value} per token is too large a price"))
}

/// A JSON number as an exact decimal, through its shortest decimal form.
fn exact(value: &Value) -> Result<Decimal, String> {
    let number = value.as_number().ok_or_else(|| format!("{value} is not a number"))?;
    let text = if let Some(whole) = number.as_u64() {
        whole.to_string()
    } else if let Some(float) = number.as_f64() {
        // `Display` for f64 prints the shortest digits that round-trip, in
        // positional notation (no exponent).
        format!("{float}")
    } else {
        return Err(format!("{number} is negative"));
    };
    let decimal = Decimal::from_str_exact(&text).map_err(|err| format!("{text}: {err}"))?;
    if decimal.is_sign_negative() {
        return Err(format!("{text} is negative"));
    }
    Ok(decimal)
}

/// The multiplier `tier / base` in the price table's precision (four
/// places), rounded up: a tier's price is never stated below the
/// catalog's. Whether it was rounded.
fn ratio(tier: Decimal, base: Decimal) -> Option<(Decimal, bool)> {
    if base.is_zero() {
        return None;
    }
    let ratio = tier.checked_div(base)?;
    let rounded = ratio.round_dp_with_strategy(4, rust_decimal::RoundingStrategy::ToPositiveInfinity);
    (rounded > Decimal::ZERO).then_some((rounded.normalize(), rounded != ratio))
}

/// Shell-style pattern with `*` only, matched against the whole name.
pub fn matches(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// Imports every token-priced model of the catalog (or those matching one
/// of `only`).
pub fn import_litellm(catalog: &str, only: &[String]) -> Result<Import, String> {
    let catalog: Map<String, Value> =
        serde_json::from_str(catalog).map_err(|err| format!("the catalog is not a JSON object: {err}"))?;
    let mut import = Import::default();
    for (name, entry) in &catalog {
        if name == "sample_spec" {
            continue;
        }
        import.known.insert(name.clone());
        if !(only.is_empty() || only.iter().any(|pattern| matches(pattern, name))) {
            continue;
        }
        let Some(entry) = entry.as_object() else {
            import.skipped.push(Skipped { model: name.clone(), reason: "not a JSON object".into() });
            continue;
        };
        match model(name, entry) {
            Ok((table, notes)) => {
                import.models.insert(name.clone(), table);
                import.notes.extend(notes.into_iter().map(|reason| Skipped { model: name.clone(), reason }));
            }
            Err(reason) => import.skipped.push(Skipped { model: name.clone(), reason }),
        }
    }
    Ok(import)
}

/// One catalog entry as a price-table model with notes on what it leaves
/// out, or why it cannot be one.
fn model(name: &str, entry: &Map<String, Value>) -> Result<(toml::Table, Vec<String>), String> {
    let mode = entry.get("mode").and_then(Value::as_str).unwrap_or("(none)");
    if !TOKEN_MODES.contains(&mode) {
        return Err(format!("mode {mode} is not metered by tokens"));
    }
    let price = |field: &str| -> Result<Option<Decimal>, String> {
        entry.get(field).map(per_mtok).transpose().map_err(|err| format!("{field}: {err}"))
    };
    let mut used: Vec<String> = vec!["input_cost_per_token".into(), "output_cost_per_token".into()];
    let input = price("input_cost_per_token")?;
    let output = price("output_cost_per_token")?;
    let Some(input) = input else {
        return Err("no input_cost_per_token".into());
    };
    // The catalog writes 0 where it does not know a price (and for routers
    // whose routed model bills on top): imported, every call would be free.
    // A model that really is free can be priced in the overlay.
    if input.is_zero() {
        return Err("input_cost_per_token is 0 (the catalog's placeholder for unknown)".into());
    }
    if mode != "embedding" && output.is_some_and(|output| output.is_zero()) {
        return Err("output_cost_per_token is 0 (the catalog's placeholder for unknown)".into());
    }
    let mut table = toml::Table::new();
    let mut early_notes: Vec<String> = Vec::new();
    let set = |table: &mut toml::Table, key: &str, amount: Decimal| {
        table.insert(key.into(), toml::Value::String(amount.to_string()));
    };
    set(&mut table, "input_per_mtok", input);
    // A text model without an output price would get free output.
    if mode != "embedding" && output.is_none() {
        return Err("states no output_cost_per_token".into());
    }
    let output = output.filter(|output| !output.is_zero());
    if let Some(output) = output {
        set(&mut table, "output_per_mtok", output);
        let max_output = entry
            .get("max_output_tokens")
            .or_else(|| entry.get("max_tokens"))
            .and_then(Value::as_u64)
            .filter(|tokens| *tokens > 0)
            .ok_or("prices output but states no max_output_tokens to hold for")?;
        table.insert(
            "default_max_output_tokens".into(),
            toml::Value::Integer(i64::try_from(max_output.min(1_000_000)).unwrap_or(1_000_000)),
        );
    }
    // DeepSeek's name for the cache-read price.
    used.push("input_cost_per_token_cache_hit".into());
    if !entry.contains_key("cache_read_input_token_cost") {
        if let Some(amount) = price("input_cost_per_token_cache_hit")?.filter(|amount| !amount.is_zero()) {
            set(&mut table, "cached_input_per_mtok", amount);
        }
    }
    for (field, key) in [
        ("cache_read_input_token_cost", "cached_input_per_mtok"),
        ("cache_creation_input_token_cost", "cache_write_5m_per_mtok"),
        ("cache_creation_input_token_cost_above_1hr", "cache_write_1h_per_mtok"),
    ] {
        used.push(field.into());
        match price(field)? {
            // A placeholder, as above: left out, the input price applies.
            Some(amount) if amount.is_zero() => {
                early_notes.push(format!(
                    "{field} is 0 (the catalog's placeholder): left out, input's price applies"
                ));
            }
            Some(amount) => set(&mut table, key, amount),
            None => {}
        }
    }
    // Anthropic-style 1-hour cache writes cost 2x input; a catalog entry
    // with a 5-minute write price but none for the hour would otherwise
    // charge them as plain input.
    if table.contains_key("cache_write_5m_per_mtok") && !table.contains_key("cache_write_1h_per_mtok") {
        let doubled = input.checked_mul(Decimal::TWO).ok_or("an input price too large to double")?;
        set(&mut table, "cache_write_1h_per_mtok", doubled);
        early_notes
            .push("1-hour cache writes priced at 2x input (the catalog states no price for them)".to_owned());
    }
    // Reasoning tokens are output tokens; a separate price is only
    // expressible when it is the output price.
    used.push("output_cost_per_reasoning_token".into());
    if let Some(reasoning) = price("output_cost_per_reasoning_token")? {
        if Some(reasoning) != output {
            return Err("prices reasoning tokens apart from output".into());
        }
    }
    // A model that reasons may bill reasoning it never streams (OpenAI's
    // o-series and GPT-5, Gemini's thoughts): a stream broken off before
    // its usage is charged the hold.
    // Claude thinks only when asked (and a request that asks is charged the
    // hold for a broken stream anyway).
    // Unless the catalog says it thinks by default, or always.
    let always_thinks = ["thinking_on_by_default", "thinking_always_on"]
        .iter()
        .any(|flag| entry.get(*flag).and_then(Value::as_bool) == Some(true));
    let opt_in = (entry.get("litellm_provider").and_then(Value::as_str) == Some("anthropic")
        || name.starts_with("claude"))
        && !always_thinks;
    if entry.get("supports_reasoning").and_then(Value::as_bool) == Some(true) && !opt_in {
        table.insert("hidden_reasoning".into(), toml::Value::Boolean(true));
    }
    let mut notes = early_notes;
    for tier in ["priority", "flex"] {
        let multipliers = match tier_multipliers(entry, &price, tier, &mut used) {
            Ok(multipliers) => multipliers,
            Err(reason) => {
                // Every `*_<tier>` field is accounted for: the tier is left
                // out whole, so a request asking for it is refused.
                used.extend(entry.keys().filter(|field| field.ends_with(&format!("_{tier}"))).cloned());
                notes.push(format!(
                    "service tier {tier} left out (requests asking for it are refused): {reason}"
                ));
                None
            }
        };
        if let Some((multipliers, approximate)) = multipliers {
            if approximate {
                notes
                    .push(format!("service tier {tier}'s multipliers rounded up to the table's four places"));
            }
            let tiers =
                table.entry("service_tiers").or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(tiers) = tiers {
                tiers.insert(tier.into(), toml::Value::Table(multipliers));
            }
        }
    }
    if let Some((long_context, approximate)) = long_context(entry, &price, &mut used)? {
        if approximate {
            notes.push("long-context multipliers rounded up to the table's four places".into());
        }
        table.insert("long_context".into(), toml::Value::Table(long_context));
    }
    let provider = entry.get("litellm_provider").and_then(Value::as_str).unwrap_or("");
    if entry.get("search_context_cost_per_query").is_some_and(charges)
        && search_is_a_tool(provider)
        && !always_searches(name)
    {
        used.push("search_context_cost_per_query".into());
        notes.push(
            "web search is priced per call under [tools] (set it in the overlay), not per model".into(),
        );
    }
    // Surcharges for some deployments (EU data residency, FedRAMP, regional
    // endpoints) multiply the prices: the table states one price, the
    // standard deployment's, and says so where an operator reads it.
    for (field, value) in entry.iter().filter(|(field, _)| is_uplift(field)) {
        // One of 1 or less surcharges nothing.
        if value.as_f64().is_some_and(|factor| factor <= 1.0) {
            used.push(field.clone());
        }
        if let Some(factor) = value.as_f64().filter(|factor| *factor > 1.0) {
            used.push(field.clone());
            notes.push(format!(
                "{field} = {factor}: a deployment it names bills that much more, and the table \
                 prices the standard one (price it in the overlay if yours is that deployment)"
            ));
        }
    }
    // Anything priced that was not read is a price the table cannot state.
    let unpriced: Vec<&str> = entry
        .iter()
        .filter(|(field, value)| !ignored(field) && !used.contains(field) && charges(value))
        .map(|(field, _)| field.as_str())
        .collect();
    if !unpriced.is_empty() {
        return Err(format!("prices the schema cannot express: {}", unpriced.join(", ")));
    }
    Ok((table, notes))
}

/// The two multipliers of a tier: one for every input-side rate, one for
/// output.
#[derive(Default)]
struct Ratios {
    input: Option<Decimal>,
    output: Option<Decimal>,
    /// A ratio was rounded up, or rates of one side scale by different
    /// factors and the largest is stated: the tier costs a little more here.
    approximate: bool,
}

impl Ratios {
    /// Folds in `field` as a multiple of `base_field`; errors name the tier
    /// as `TIER` for the caller to fill in.
    fn fold(
        &mut self,
        field: &str,
        base_field: &str,
        price: &dyn Fn(&str) -> Result<Option<Decimal>, String>,
    ) -> Result<(), String> {
        let (Some(tiered), Some(base)) = (price(field)?, price(base_field)?) else {
            return Err(format!("{field} has no base price {base_field}"));
        };
        let (ratio, rounded) =
            ratio(tiered, base).ok_or_else(|| format!("{field} is no positive multiple of {base_field}"))?;
        let slot = if base_field.starts_with("output") { &mut self.output } else { &mut self.input };
        self.approximate |= rounded || slot.is_some_and(|seen| seen != ratio);
        *slot = Some(slot.map_or(ratio, |seen| seen.max(ratio)));
        Ok(())
    }

    /// The multipliers, and whether they are rounded up (see `approximate`).
    fn table(self) -> (toml::Table, bool) {
        let text = |ratio: Option<Decimal>| toml::Value::String(ratio.unwrap_or(Decimal::ONE).to_string());
        let mut table = toml::Table::new();
        table.insert("input".into(), text(self.input));
        table.insert("output".into(), text(self.output));
        (table, self.approximate)
    }
}

/// `service_tiers.<tier>` from the catalog's `*_<tier>` prices, when they are
/// exact multiples of the base prices (one multiplier for every input-side
/// rate, one for output).
fn tier_multipliers(
    entry: &Map<String, Value>,
    price: &dyn Fn(&str) -> Result<Option<Decimal>, String>,
    tier: &str,
    used: &mut Vec<String>,
) -> Result<Option<(toml::Table, bool)>, String> {
    let fields: Vec<String> =
        entry.keys().filter(|field| field.ends_with(&format!("_{tier}"))).cloned().collect();
    if fields.is_empty() {
        return Ok(None);
    }
    let mut ratios = Ratios::default();
    for field in &fields {
        let base_field = &field[..field.len() - tier.len() - 1];
        if base_field.contains("_above_") {
            return Err(format!("{field}: a {tier} price above an input size"));
        }
        ratios
            .fold(field, base_field, price)
            .map_err(|err| err.replace("TIER", &format!("{tier} prices")))?;
        used.push(field.clone());
    }
    Ok(Some(ratios.table()))
}

/// `long_context` from `*_above_<N>k_tokens` prices: one threshold, exact
/// multipliers.
fn long_context(
    entry: &Map<String, Value>,
    price: &dyn Fn(&str) -> Result<Option<Decimal>, String>,
    used: &mut Vec<String>,
) -> Result<Option<(toml::Table, bool)>, String> {
    let fields: Vec<&String> =
        entry.keys().filter(|field| field.contains("_above_") && field.ends_with("k_tokens")).collect();
    if fields.is_empty() {
        return Ok(None);
    }
    let mut threshold: Option<u64> = None;
    let mut ratios = Ratios::default();
    for field in fields {
        let (base_field, size) = field.rsplit_once("_above_").ok_or("unreachable")?;
        let thousands: u64 = size
            .trim_end_matches("k_tokens")
            .parse()
            .map_err(|_| format!("{field}: unreadable input size"))?;
        if threshold.is_some_and(|seen| seen != thousands) {
            return Err("prices more than one input-size tier".into());
        }
        threshold = Some(thousands);
        ratios.fold(field, base_field, price).map_err(|err| err.replace("TIER", "the input-size tier"))?;
        used.push(field.clone());
    }
    let (mut table, approximate) = ratios.table();
    let tokens =
        threshold.unwrap_or_default().checked_mul(1000).ok_or("an input-size tier past any count")?;
    table
        .insert("above_input_tokens".into(), toml::Value::Integer(i64::try_from(tokens).unwrap_or(i64::MAX)));
    Ok(Some((table, approximate)))
}

/// Lays `overlay` (a price file) over `models`: every field an overlay
/// model sets replaces the catalog's, models only the overlay names are
/// added, and the overlay's `label`, `limits`, `[markup]` and `tools` are
/// kept (an overlay model's or tool's `markup_percent` is one of its fields). An
/// overlay entry for a catalog model the import left out (skipped, or not
/// selected) is dropped and listed: on its own it would price only the
/// fields it sets, leaving the rest free. Returns the whole table and what
/// was dropped.
pub fn with_overlay(
    models: BTreeMap<String, toml::Table>,
    overlay: Option<&str>,
    known: &std::collections::BTreeSet<String>,
) -> Result<(toml::Table, Vec<Skipped>), String> {
    let mut dropped = Vec::new();
    let mut overlay: toml::Table = match overlay {
        Some(text) => toml::from_str(text).map_err(|err| format!("overlay: {err}"))?,
        None => toml::Table::new(),
    };
    let mut merged: toml::Table =
        models.into_iter().map(|(name, table)| (name, toml::Value::Table(table))).collect();
    if let Some(toml::Value::Table(overlay_models)) = overlay.remove("models") {
        for (name, fields) in overlay_models {
            let toml::Value::Table(fields) = fields else {
                return Err(format!("overlay: models.\"{name}\" is not a table"));
            };
            match merged.get_mut(&name) {
                Some(toml::Value::Table(model)) => model.extend(fields),
                _ if known.contains(&name) => dropped.push(Skipped {
                    model: name,
                    reason: "the overlay sets some of its prices, but the import left the catalog's out \
                             (skipped or not selected), so the rest would be free"
                        .into(),
                }),
                _ => {
                    merged.insert(name, toml::Value::Table(fields));
                }
            }
        }
    }
    let mut table = overlay;
    table.insert("models".into(), toml::Value::Table(merged));
    Ok((table, dropped))
}

/// The price file an import writes: the catalog's models under `overlay`,
/// each model checked by the price-file validator on its own (with the
/// overlay's limits) so one the gateway would refuse is skipped with the
/// validator's reason, then the whole file checked. Returns the file's text
/// every skipped model and how many models it prices. Without an overlay label, the label is
/// `<label>-<today>`; without an overlay `as_of`, it is today.
pub fn price_file(
    import: Import,
    overlay: Option<&str>,
    label: &str,
    source: &str,
) -> Result<(String, Vec<Skipped>, usize), String> {
    let Import { models, mut skipped, known, .. } = import;
    let (mut table, dropped) = with_overlay(models, overlay, &known)?;
    // A model the import skipped and the overlay named is listed once, with
    // the catalog's reason first.
    for drop in dropped {
        match skipped.iter_mut().find(|skip| skip.model == drop.model) {
            Some(skip) => skip.reason = format!("{}; {}", skip.reason, drop.reason),
            None => skipped.push(drop),
        }
    }
    let limits = table.get("limits").cloned();
    if let Some(toml::Value::Table(models)) = table.get_mut("models") {
        let names: Vec<String> = models.keys().cloned().collect();
        for name in names {
            let mut alone = toml::Table::new();
            alone.insert("label".into(), toml::Value::String("check".into()));
            if let Some(limits) = &limits {
                alone.insert("limits".into(), limits.clone());
            }
            let mut one = toml::Table::new();
            one.insert(name.clone(), models[&name].clone());
            alone.insert("models".into(), toml::Value::Table(one));
            let text = toml::to_string(&alone).map_err(|err| err.to_string())?;
            if let Err(errors) = crate::pricing::PriceTable::parse(&name, &text) {
                let reason =
                    errors.problems.iter().map(|problem| problem.message.clone()).collect::<Vec<_>>();
                skipped.push(Skipped { model: name.clone(), reason: reason.join("; ") });
                models.remove(&name);
            }
        }
    }
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    if !table.contains_key("label") {
        table.insert("label".into(), toml::Value::String(format!("{label}-{today}")));
    }
    if !table.contains_key("as_of") {
        table.insert("as_of".into(), toml::Value::String(today));
    }
    let body = toml::to_string(&table).map_err(|err| err.to_string())?;
    let text = format!(
        "# Imported by `creditgate prices import` from {source}: per-token catalog\n\
         # prices x 1,000,000, converted through their shortest decimal form.\n\
         # Review with `creditgate prices diff` before it goes live.\n\n{body}"
    );
    crate::pricing::PriceTable::parse("imported", &text).map_err(|errors| errors.to_string())?;
    skipped.sort_by(|a, b| a.model.cmp(&b.model));
    let count = table.get("models").and_then(toml::Value::as_table).map_or(0, toml::Table::len);
    Ok((text, skipped, count))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn per_token_floats_become_their_written_decimals_exactly() {
        let json: Value =
            serde_json::from_str("[1.5e-07, 2.5e-06, 1e-05, 3.75e-06, 0, 7.5e-08, 1.1e-06]").unwrap();
        let prices: Vec<Decimal> = json.as_array().unwrap().iter().map(|v| per_mtok(v).unwrap()).collect();
        assert_eq!(prices, [dec!(0.15), dec!(2.5), dec!(10), dec!(3.75), dec!(0), dec!(0.075), dec!(1.1)]);
        assert!(per_mtok(&serde_json::json!(-1e-6)).is_err());
        // Too large to scale to a million tokens: an error, not a panic.
        assert!(per_mtok(&serde_json::json!(1e24)).is_err());
    }

    #[test]
    fn a_price_the_schema_cannot_state_skips_the_model_and_never_drops_silently() {
        let catalog = r#"{
            "tiered": {"mode": "chat", "input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06,
                       "max_output_tokens": 100, "tiered_pricing": [{"range": [0, 32000], "input_cost_per_token": 1e-06}]},
            "sonar": {"mode": "chat", "litellm_provider": "perplexity", "input_cost_per_token": 1e-06,
                      "output_cost_per_token": 1e-06, "max_output_tokens": 100,
                      "search_context_cost_per_query": {"search_context_size_low": 0.005}},
            "searchy": {"mode": "chat", "litellm_provider": "openai", "input_cost_per_token": 1e-06,
                        "output_cost_per_token": 1e-06, "max_output_tokens": 100,
                        "search_context_cost_per_query": {"search_context_size_low": 0.01}},
            "gpt-x-search-preview": {"mode": "chat", "litellm_provider": "openai", "input_cost_per_token": 1e-06,
                        "output_cost_per_token": 1e-06, "max_output_tokens": 100,
                        "search_context_cost_per_query": {"search_context_size_low": 0.01}},
            "gpt-x-search-api-2025-10-14": {"mode": "chat", "litellm_provider": "openai", "input_cost_per_token": 1e-06,
                        "output_cost_per_token": 1e-06, "max_output_tokens": 100,
                        "search_context_cost_per_query": {"search_context_size_low": 0.01}},
            "no-output": {"mode": "chat", "input_cost_per_token": 1e-06, "max_output_tokens": 100},
            "cachey": {"mode": "chat", "input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
                       "cache_creation_input_token_cost": 3.75e-06, "max_output_tokens": 100,
                       "supports_reasoning": true},
            "embed": {"mode": "embedding", "input_cost_per_token": 2e-08}
        }"#;
        let import = import_litellm(catalog, &[]).unwrap();
        let skipped: Vec<&str> = import.skipped.iter().map(|skip| skip.model.as_str()).collect();
        assert_eq!(
            skipped,
            ["gpt-x-search-api-2025-10-14", "gpt-x-search-preview", "no-output", "sonar", "tiered"]
        );
        let imported: Vec<&str> = import.models.keys().map(String::as_str).collect();
        assert_eq!(imported, ["cachey", "embed", "searchy"]);
        // Web search as a hosted tool is priced under [tools]: said, not hidden.
        assert!(import.notes.iter().any(|note| note.model == "searchy" && note.reason.contains("[tools]")));
        // 1-hour cache writes are not left at the input price.
        assert_eq!(import.models["cachey"]["cache_write_1h_per_mtok"].as_str(), Some("6"));
        // A model that reasons is marked: its reasoning may be billed unseen.
        assert_eq!(import.models["cachey"]["hidden_reasoning"].as_bool(), Some(true));
        assert!(!import.models["embed"].contains_key("hidden_reasoning"));
    }

    #[test]
    fn placeholders_surcharges_default_thinking_and_inexact_tiers_never_undercharge() {
        let catalog = r#"{
            "unknown-in": {"mode": "chat", "input_cost_per_token": 0, "output_cost_per_token": 2e-06, "max_output_tokens": 100},
            "unknown-out": {"mode": "chat", "input_cost_per_token": 1e-06, "output_cost_per_token": 0.0, "max_output_tokens": 100},
            "unknown-cache": {"mode": "chat", "input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06, "max_output_tokens": 100,
                              "cache_read_input_token_cost": 0, "fedramp_uplift_multiplier": 1.0},
            "eu-uplift": {"mode": "chat", "input_cost_per_token": 5e-06, "output_cost_per_token": 3e-05, "max_output_tokens": 100,
                          "regional_processing_uplift_multiplier_eu": 1.1},
            "claude-thinks": {"mode": "chat", "litellm_provider": "anthropic", "input_cost_per_token": 3e-06,
                              "output_cost_per_token": 1.5e-05, "max_output_tokens": 100,
                              "supports_reasoning": true, "thinking_on_by_default": true},
            "claude-asks": {"mode": "chat", "litellm_provider": "anthropic", "input_cost_per_token": 3e-06,
                            "output_cost_per_token": 1.5e-05, "max_output_tokens": 100, "supports_reasoning": true},
            "priced-priority": {"mode": "chat", "input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07,
                                "max_output_tokens": 100, "input_cost_per_token_priority": 2.5e-07,
                                "cache_read_input_token_cost": 7.5e-08, "cache_read_input_token_cost_priority": 1.3e-07,
                                "output_cost_per_token_priority": 1e-06}
        }"#;
        let import = import_litellm(catalog, &[]).unwrap();
        let skipped: Vec<&str> = import.skipped.iter().map(|skip| skip.model.as_str()).collect();
        assert_eq!(skipped, ["unknown-in", "unknown-out"], "a zero is the catalog's unknown, not free");
        let note = |model: &str, text: &str| {
            import.notes.iter().any(|note| note.model == model && note.reason.contains(text))
        };
        assert!(note("eu-uplift", "regional_processing_uplift_multiplier_eu"), "{:?}", import.notes);
        // A zero cache-read price is left out (input's applies), and a
        // multiplier of 1 surcharges nothing.
        assert!(!import.models["unknown-cache"].contains_key("cached_input_per_mtok"));
        assert!(note("unknown-cache", "cache_read_input_token_cost is 0"));
        assert!(!note("unknown-cache", "fedramp"));
        assert_eq!(import.models["claude-thinks"]["hidden_reasoning"].as_bool(), Some(true));
        assert!(!import.models["claude-asks"].contains_key("hidden_reasoning"));
        // 0.25/0.15 is 1.6666…: rounded up, and the input side's largest
        // factor (cached 0.13/0.075 = 1.7333…) stated for all of it.
        let tier = &import.models["priced-priority"]["service_tiers"]["priority"];
        assert_eq!(tier["input"].as_str(), Some("1.7334"));
        assert_eq!(tier["output"].as_str(), Some("1.6667"));
        assert!(note("priced-priority", "rounded up"));
    }

    #[test]
    fn an_overlay_never_completes_a_model_the_import_left_out() {
        let catalog = r#"{
            "kept": {"mode": "chat", "input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06, "max_output_tokens": 100},
            "audio": {"mode": "chat", "input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06,
                      "max_output_tokens": 100, "input_cost_per_audio_token": 1e-05}
        }"#;
        let overlay = "label = \"o\"\n[models.\"audio\"]\ninput_per_mtok = \"0.5\"\n\
                       [models.\"private\"]\ninput_per_mtok = \"1\"\n[models.\"kept\"]\ninput_per_mtok = \"0.9\"\n";
        let (text, skipped, count) =
            price_file(import_litellm(catalog, &[]).unwrap(), Some(overlay), "t", "test").unwrap();
        let table: toml::Table = toml::from_str(&text).unwrap();
        let models = table["models"].as_table().unwrap();
        assert!(!models.contains_key("audio"), "a skipped model came back with only the overlay's prices");
        assert_eq!(models["kept"]["input_per_mtok"].as_str(), Some("0.9"));
        assert_eq!(models["kept"]["output_per_mtok"].as_str(), Some("2"));
        assert!(models.contains_key("private"));
        assert_eq!(count, 2);
        let audio = skipped.iter().find(|skip| skip.model == "audio").unwrap();
        assert!(
            audio.reason.contains("input_cost_per_audio_token") && audio.reason.contains("overlay"),
            "{}",
            audio.reason
        );
    }

    #[test]
    fn an_overlay_s_markups_pass_into_the_imported_table() {
        let catalog = r#"{
            "kept": {"mode": "chat", "input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06, "max_output_tokens": 100},
            "other": {"mode": "chat", "input_cost_per_token": 3e-06, "output_cost_per_token": 4e-06, "max_output_tokens": 100}
        }"#;
        let overlay = "label = \"o\"\n[markup]\npercent = \"20\"\n\
                       [models.\"kept\"]\nmarkup_percent = \"7.5\"\n\
                       [tools.\"t\"]\nper_call = \"0.01\"\nmarkup_percent = \"0\"\n";
        let (text, skipped, _) =
            price_file(import_litellm(catalog, &[]).unwrap(), Some(overlay), "t", "test").unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        let table = crate::pricing::PriceTable::parse("imported", &text).unwrap();
        let now = chrono::Utc::now();
        assert_eq!(table.markup().percent(), dec!(20), "the table-wide markup");
        assert_eq!(table.model("kept", now).unwrap().markup().percent(), dec!(7.5), "the model's own");
        assert_eq!(table.model("kept", now).unwrap().output_per_mtok(), dec!(2), "catalog prices kept");
        assert_eq!(table.model("other", now).unwrap().markup().percent(), dec!(20), "the table's");
        assert!(table.tool("t", now).unwrap().markup().is_none(), "the tool's \"0\"");
    }

    #[test]
    fn patterns_match_whole_names() {
        assert!(matches("gpt-4o*", "gpt-4o-mini"));
        assert!(matches("*claude*", "anthropic/claude-3"));
        assert!(!matches("gpt-4o", "gpt-4o-mini"));
        assert!(matches("a*b*c", "a-b-c"));
        assert!(!matches("a*b*c", "a-c"));
    }
}
