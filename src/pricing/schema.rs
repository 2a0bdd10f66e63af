//! The raw layer: serde types that mirror the price file.
//!
//! Tables are strict (`deny_unknown_fields`): a misspelt key is an error, never
//! a silently ignored price. Two choices make one run report every problem:
//!
//! - Each model, tool and schedule entry is wrapped in [`Lenient`], so a bad
//!   key in one entry is recorded and the other entries are still read.
//! - Leaf values are kept as spanned [`toml::Value`]s and typed during
//!   validation, so every bad value is reported at its own line. (Typed serde
//!   fields would stop at the first bad value of a table.) This is also how a
//!   bare TOML float is refused without this module ever holding a binary float.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// A leaf value and where it is in the file.
pub(super) type RawValue = Spanned<toml::Value>;

/// A named entry (`[models."name"]`), with the span of its name and of its body.
pub(super) type RawEntries<T> = BTreeMap<Spanned<String>, Spanned<Lenient<T>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPriceFile {
    pub label: Option<RawValue>,
    /// The date the prices were last checked against the providers.
    pub as_of: Option<RawValue>,
    pub limits: Option<Spanned<Lenient<RawLimits>>>,
    /// What the customer pays above the prices (which are the operator's cost).
    pub markup: Option<Spanned<Lenient<RawMarkup>>>,
    #[serde(default)]
    pub models: RawEntries<RawModel>,
    #[serde(default)]
    pub tools: RawEntries<RawTool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub max_price_per_mtok: Option<RawValue>,
    pub max_price_per_call: Option<RawValue>,
}

/// `[markup]`: the table-wide markup, in percent of the cost.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMarkup {
    pub percent: Option<RawValue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    pub input_per_mtok: Option<RawValue>,
    pub output_per_mtok: Option<RawValue>,
    pub cached_input_per_mtok: Option<RawValue>,
    pub cache_write_5m_per_mtok: Option<RawValue>,
    pub cache_write_1h_per_mtok: Option<RawValue>,
    pub per_request: Option<RawValue>,
    pub default_max_output_tokens: Option<RawValue>,
    /// This model's markup in percent, instead of the table's (`"0"`: none).
    pub markup_percent: Option<RawValue>,
    pub long_context: Option<Spanned<Lenient<RawLongContext>>>,
    /// The model reasons in tokens it bills and never streams.
    pub hidden_reasoning: Option<RawValue>,
    /// Multipliers per `service_tier` a request may ask for.
    #[serde(default)]
    pub service_tiers: RawEntries<RawMultipliers>,
    #[serde(default)]
    pub aliases: Vec<RawValue>,
    #[serde(default)]
    pub schedule: Vec<Spanned<Lenient<RawModelChange>>>,
}

/// A scheduled change: from `effective_from` on, the prices it sets replace
/// those before it; the prices it leaves out carry over.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModelChange {
    pub effective_from: Option<RawValue>,
    pub input_per_mtok: Option<RawValue>,
    pub output_per_mtok: Option<RawValue>,
    pub cached_input_per_mtok: Option<RawValue>,
    pub cache_write_5m_per_mtok: Option<RawValue>,
    pub cache_write_1h_per_mtok: Option<RawValue>,
    pub per_request: Option<RawValue>,
}

/// Multipliers on the input-side rates and on the output rate.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMultipliers {
    pub input: Option<RawValue>,
    pub output: Option<RawValue>,
}

/// Multipliers that apply to a whole call above an input size.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLongContext {
    pub above_input_tokens: Option<RawValue>,
    pub input: Option<RawValue>,
    pub output: Option<RawValue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTool {
    pub per_call: Option<RawValue>,
    pub per_unit: Option<RawValue>,
    pub unit: Option<RawValue>,
    /// This tool's markup in percent, instead of the table's (`"0"`: none).
    pub markup_percent: Option<RawValue>,
    #[serde(default)]
    pub schedule: Vec<Spanned<Lenient<RawToolChange>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawToolChange {
    pub effective_from: Option<RawValue>,
    pub per_call: Option<RawValue>,
    pub per_unit: Option<RawValue>,
}

/// A value that failed to deserialize is kept as its error message instead of
/// failing the whole file.
///
/// Sound for `toml` because its deserializer works on an already parsed tree:
/// an entry that fails leaves nothing half-consumed for the entries after it.
/// (It would not be sound for a streaming format such as JSON.)
#[derive(Debug)]
pub(super) enum Lenient<T> {
    Valid(T),
    Invalid(String),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match T::deserialize(deserializer) {
            Ok(value) => Self::Valid(value),
            Err(error) => Self::Invalid(error.to_string()),
        })
    }
}
