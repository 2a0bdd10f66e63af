//! The validated price table and its lookups.

use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::cost::{Markup, ModelPrice, Multipliers, ToolPrice};
use super::problems::PriceFileErrors;
use super::validate::validate;

/// Hex digits of the file's SHA-256 kept in the version: enough to tell
/// tables apart in a ledger, short enough to read.
const CONTENT_HASH_HEX_DIGITS: usize = 12;

/// Which price table priced a request: the operator's label and a hash of
/// the file's bytes. Two files with the same label but different prices get
/// different versions, so a ledger entry always names the exact prices used.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PriceVersion {
    pub label: String,
    /// The file's `as_of`: when its prices were last checked.
    pub as_of: Option<chrono::NaiveDate>,
    /// The first 12 hex digits of the SHA-256 of the file's bytes.
    pub content_hash: String,
}

impl fmt::Display for PriceVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.label, self.content_hash)
    }
}

/// A validated price table. Only [`PriceTable::parse`] builds one, so every
/// table in use has passed every check. Immutable: a reload builds a new one.
#[derive(Debug)]
pub struct PriceTable {
    version: PriceVersion,
    /// `version` as `label@hash`, made once: every debit entry records it.
    version_text: std::sync::Arc<str>,
    /// The table-wide markup; each model's and tool's price carries its own.
    markup: Markup,
    models: Vec<ModelEntry>,
    tools: Vec<ToolEntry>,
    /// Every model name and alias, to its index in `models`. Lookups borrow
    /// the request's `&str`, so they do not allocate.
    model_names: HashMap<Box<str>, usize>,
    tool_names: HashMap<Box<str>, usize>,
}

impl PriceTable {
    /// Parses and validates a price file. `file_name` is used only in messages;
    /// the caller reads the file (this module does no I/O). On error, every
    /// problem found is returned, each with its line and a hint.
    pub fn parse(file_name: &str, text: &str) -> Result<Self, PriceFileErrors> {
        let valid = validate(file_name, text)?;
        let version =
            PriceVersion { label: valid.label, as_of: valid.as_of, content_hash: content_hash(text) };
        Ok(Self {
            version_text: version.to_string().into(),
            version,
            markup: valid.markup,
            models: valid.models,
            tools: valid.tools,
            model_names: valid.model_names,
            tool_names: valid.tool_names,
        })
    }

    pub fn version(&self) -> &PriceVersion {
        &self.version
    }

    /// The version as `label@hash`, shared rather than formatted per use.
    pub fn version_text(&self) -> std::sync::Arc<str> {
        self.version_text.clone()
    }

    /// The table-wide markup (`[markup] percent`); a model or tool may set
    /// its own, which its price carries.
    pub fn markup(&self) -> Markup {
        self.markup
    }

    /// The prices of a model (by name or alias, matched exactly) in force at `at`.
    pub fn model(&self, name: &str, at: DateTime<Utc>) -> Option<ModelPrice> {
        let index = *self.model_names.get(name)?;
        self.models.get(index)?.schedule.at(at)
    }

    /// The multipliers of a service tier of a model, if the file prices it.
    pub fn service_tier(&self, name: &str, tier: &str) -> Option<Multipliers> {
        let index = *self.model_names.get(name)?;
        let tiers = &self.models.get(index)?.service_tiers;
        tiers.iter().find(|(named, _)| named == tier).map(|(_, multipliers)| *multipliers)
    }

    /// The prices of a tool in force at `at`.
    pub fn tool(&self, name: &str, at: DateTime<Utc>) -> Option<ToolPrice> {
        let index = *self.tool_names.get(name)?;
        self.tools.get(index)?.schedule.at(at)
    }

    /// Whether a model name or alias is priced. An unpriced model is refused,
    /// never served free.
    pub fn has_model(&self, name: &str) -> bool {
        self.model_names.contains_key(name)
    }

    pub fn has_tool(&self, name: &str) -> bool {
        self.tool_names.contains_key(name)
    }

    /// The name a model is priced under, resolving aliases, so that reports can
    /// group `gpt-4o-2024-08-06` with `gpt-4o`.
    pub fn canonical_model(&self, name: &str) -> Option<&str> {
        let index = *self.model_names.get(name)?;
        self.models.get(index).map(|model| model.name.as_str())
    }

    /// Every priced model's name (not its aliases), in file order.
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.models.iter().map(|model| model.name.as_str())
    }

    /// Every priced tool's name, in file order.
    pub fn tool_names(&self) -> impl Iterator<Item = &str> {
        self.tools.iter().map(|tool| tool.name.as_str())
    }

    /// Whether any of a tool's prices, now or scheduled, charges per unit.
    pub fn charges_per_unit(&self, name: &str) -> bool {
        let Some(tool) = self.tool_names.get(name).and_then(|index| self.tools.get(*index)) else {
            return false;
        };
        tool.schedule.periods.iter().any(|(_, price)| price.per_unit.0 > 0)
    }

    /// What a tool's `per_unit` counts (e.g. "results"), if it is priced per unit.
    pub fn tool_unit(&self, name: &str) -> Option<&str> {
        let index = *self.tool_names.get(name)?;
        self.tools.get(index)?.unit.as_deref()
    }
}

/// A priced model: its name and its prices over time.
#[derive(Debug)]
pub(super) struct ModelEntry {
    pub(super) name: String,
    pub(super) schedule: Schedule<ModelPrice>,
    /// Multipliers per service tier a request may name (`priority`, `flex`).
    pub(super) service_tiers: Vec<(String, Multipliers)>,
}

#[derive(Debug)]
pub(super) struct ToolEntry {
    pub(super) name: String,
    pub(super) unit: Option<String>,
    pub(super) schedule: Schedule<ToolPrice>,
}

/// Prices over time: each period runs from its start to the next one's.
/// The first period starts at the beginning of time, so every instant has a
/// price.
#[derive(Debug)]
pub(super) struct Schedule<P> {
    /// Sorted by start, strictly increasing (validation refuses equal starts).
    periods: Vec<(DateTime<Utc>, P)>,
}

impl<P: Copy> Schedule<P> {
    /// `periods` must start with the base period and be sorted strictly by start.
    pub(super) fn new(periods: impl IntoIterator<Item = (DateTime<Utc>, P)>) -> Self {
        let periods: Vec<_> = periods.into_iter().collect();
        debug_assert!(
            periods.windows(2).all(|pair| pair[0].0 < pair[1].0),
            "schedule periods must be strictly increasing"
        );
        Self { periods }
    }

    /// The price in force at `at`: that of the last period started at or before it.
    fn at(&self, at: DateTime<Utc>) -> Option<P> {
        let started = self.periods.partition_point(|(from, _)| *from <= at);
        let index = started.checked_sub(1)?;
        self.periods.get(index).map(|(_, price)| *price)
    }
}

fn content_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.get(..CONTENT_HASH_HEX_DIGITS / 2).map(hex::encode).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::pricing::{HoldRequest, TokenUsage};
    use rust_decimal::Decimal;
    use std::str::FromStr;

    /// The example price file shipped with the gateway.
    const EXAMPLE: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/config/prices.toml"));

    fn example() -> PriceTable {
        PriceTable::parse("config/prices.toml", EXAMPLE).unwrap()
    }

    fn instant(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    fn now() -> DateTime<Utc> {
        instant("2025-11-25T12:00:00Z")
    }

    fn dec(text: &str) -> Decimal {
        Decimal::from_str(text).unwrap()
    }

    #[test]
    fn the_example_file_is_valid_and_prices_every_listed_name() {
        let table = example();
        for name in [
            "gpt-4o",
            "gpt-4o-mini",
            "text-embedding-3-small",
            "claude-sonnet-4",
            "claude-haiku-4-5",
            "mock-gpt",
            "mock-embed",
            "mock-claude",
        ] {
            assert!(table.has_model(name), "{name} is priced");
            assert!(table.model(name, now()).is_some(), "{name} has a price now");
        }
        assert!(table.has_tool("web-search"), "web-search is priced");
        assert_eq!(table.tool_unit("web-search"), Some("results"));
        assert_eq!(table.tool_unit("code-interpreter"), None, "per call only");
    }

    #[test]
    fn the_example_prices_one_mini_token_at_fifteen_hundred_millionths_of_a_cent() {
        let mini = example().model("gpt-4o-mini", now()).unwrap();
        let usage = TokenUsage { input_tokens: 1, ..TokenUsage::default() };
        assert_eq!(mini.cost(&usage).unwrap().to_string(), "0.000000150");
        assert_eq!(mini.cached_input_per_mtok(), dec("0.075"));
        assert_eq!(mini.default_max_output_tokens(), 4096);
    }

    #[test]
    fn the_version_is_the_label_and_twelve_hex_digits_of_the_content_hash() {
        let table = example();
        let version = table.version();
        assert_eq!(version.label, "2025-11");
        assert_eq!(version.content_hash.len(), 12, "{version}");
        assert!(version.content_hash.bytes().all(|b| b.is_ascii_hexdigit()), "{version}");
        assert_eq!(version.to_string(), format!("2025-11@{}", version.content_hash));
    }

    #[test]
    fn the_content_hash_is_sha256_of_the_file_bytes() {
        // sha256("") = e3b0c44298fc1c149afbf4c8996fb924...
        assert_eq!(content_hash(""), "e3b0c44298fc");
        let edited = format!("{EXAMPLE}\n# a comment changes the bytes\n");
        let edited = PriceTable::parse("p.toml", &edited).unwrap();
        assert_ne!(edited.version(), example().version(), "any edit is a new version");
    }

    #[test]
    fn a_changed_markup_is_a_new_version() {
        let text = |percent: &str| {
            format!("label = \"t\"\n[markup]\npercent = \"{percent}\"\n[models.m]\ninput_per_mtok = \"1\"\n")
        };
        let twenty = PriceTable::parse("p.toml", &text("20")).unwrap();
        let thirty = PriceTable::parse("p.toml", &text("30")).unwrap();
        assert_ne!(twenty.version(), thirty.version(), "same prices, other markup: another version");
        let usage = TokenUsage { input_tokens: 1_000_000, ..TokenUsage::default() };
        let price = twenty.model("m", now()).unwrap();
        assert_eq!(price.cost(&usage).unwrap(), dec("1"), "the cost is the operator's, unmarked");
        let hold = price.hold_amount(&HoldRequest { input_bytes: 1_000_000, max_output_tokens: None });
        assert_eq!(hold.unwrap(), dec("1.2"), "the hold is the customer's, marked up");
    }

    #[test]
    fn an_alias_resolves_to_its_model() {
        let table = example();
        let by_alias = table.model("gpt-4o-2024-08-06", now());
        assert_eq!(by_alias, table.model("gpt-4o", now()), "same prices");
        assert_eq!(table.canonical_model("gpt-4o-2024-08-06"), Some("gpt-4o"));
        assert_eq!(table.canonical_model("gpt-4o"), Some("gpt-4o"));
        assert!(table.has_model("claude-sonnet-4-20250514"), "Anthropic alias");
    }

    #[test]
    fn unknown_names_have_no_price_and_matching_is_exact() {
        let table = example();
        assert_eq!(table.model("gpt-5-turbo", now()), None);
        assert!(!table.has_model("GPT-4o"), "names are case-sensitive");
        assert!(!table.has_model(" gpt-4o"), "names are not trimmed");
        assert_eq!(table.tool("web-search-pro", now()), None);
        assert!(!table.has_tool("gpt-4o"), "models and tools are separate");
        assert!(!table.has_model("web-search"), "tools and models are separate");
    }

    #[test]
    fn a_scheduled_change_applies_from_its_exact_instant() {
        let table = example();
        let switch = instant("2031-01-01T00:00:00Z");
        let before = switch - chrono::Duration::nanoseconds(1);
        let old = table.model("mock-gpt", before).unwrap();
        let new = table.model("mock-gpt", switch).unwrap();
        assert_eq!(old.input_per_mtok(), dec("1"), "one ns before: old price");
        assert_eq!(new.input_per_mtok(), dec("1.5"), "at the instant: new price");
        assert_eq!(new.output_per_mtok(), dec("3"));
        assert_eq!(new.cached_input_per_mtok(), dec("0.5"), "unset prices carry over");
        assert_eq!(new.per_request(), dec("0.0001"), "unset fees carry over");
        assert_eq!(table.model("mock-gpt", DateTime::<Utc>::MIN_UTC), Some(old));
        assert_eq!(table.model("mock-gpt", DateTime::<Utc>::MAX_UTC), Some(new));
    }

    #[test]
    fn schedule_entries_are_ordered_by_instant_not_by_file_position() {
        let text = concat!(
            "label = \"t\"\n",
            "[tools.t]\nper_call = \"1\"\n",
            "[[tools.t.schedule]]\neffective_from = 2027-01-01T00:00:00Z\nper_call = \"3\"\n",
            "[[tools.t.schedule]]\neffective_from = 2026-01-01T00:00:00Z\nper_call = \"2\"\n",
        );
        let table = PriceTable::parse("p.toml", text).unwrap();
        let per_call = |at: &str| table.tool("t", instant(at)).unwrap().per_call();
        assert_eq!(per_call("2025-06-01T00:00:00Z"), dec("1"), "base before all");
        assert_eq!(per_call("2026-06-01T00:00:00Z"), dec("2"), "first change");
        assert_eq!(per_call("2027-06-01T00:00:00Z"), dec("3"), "second change");
    }

    #[test]
    fn an_unset_cached_price_follows_the_scheduled_input_price() {
        let text = concat!(
            "label = \"t\"\n",
            "[models.m]\ninput_per_mtok = \"1\"\n",
            "[[models.m.schedule]]\neffective_from = 2026-01-01T00:00:00Z\ninput_per_mtok = \"2\"\n",
        );
        let table = PriceTable::parse("p.toml", text).unwrap();
        let later = table.model("m", instant("2026-06-01T00:00:00Z")).unwrap();
        assert_eq!(later.cached_input_per_mtok(), dec("2"), "cached = input in force");
        assert_eq!(later.output_per_mtok(), dec("0"), "an unset price is zero");
    }

    #[test]
    fn example_tool_and_hold_amounts() {
        let table = example();
        let search = table.tool("web-search", now()).unwrap();
        assert_eq!(search.cost(10).unwrap(), dec("0.015"), "0.005 + 10 × 0.001");
        let mock = table.model("mock-gpt", now()).unwrap();
        let hold = mock.hold_amount(&HoldRequest { input_bytes: 1000, max_output_tokens: None }).unwrap();
        // 1000 × 1e-6 + 256 × 2e-6 + 0.0001
        assert_eq!(hold, dec("0.001612"));
    }

    /// The hot path (name lookup, schedule pick, cost) must stay far below the
    /// proxy's per-request budget: the target is a median under 200 ns.
    #[test]
    #[ignore = "timing: run with cargo test --release -- --ignored"]
    fn lookup_and_cost_take_under_200_ns() {
        use std::hint::black_box;
        use std::time::{Duration, Instant};
        const CALLS: u32 = 1000;
        let table = example();
        let names = ["gpt-4o-mini", "claude-sonnet-4-20250514", "mock-gpt"];
        let usage = TokenUsage {
            input_tokens: 1200,
            cached_input_tokens: 200,
            output_tokens: 300,
            ..TokenUsage::default()
        };
        let mut samples: Vec<Duration> = (0..101)
            .map(|_| {
                let start = Instant::now();
                for call in 0..CALLS {
                    let name = names[call as usize % names.len()];
                    let price = table.model(black_box(name), black_box(now())).unwrap();
                    black_box(price.cost(black_box(&usage)).unwrap());
                }
                start.elapsed() / CALLS
            })
            .collect();
        samples.sort();
        let median = samples[samples.len() / 2];
        println!("lookup + cost: median {median:?} per call");
        assert!(median < Duration::from_nanos(200), "median {median:?}");
    }
}
