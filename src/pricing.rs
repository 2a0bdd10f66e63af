//! Price table: the operator's price file, validated, and the cost of a call.
//!
//! Pure and synchronous: the caller reads the file and passes its name and
//! text to [`PriceTable::parse`]; lookups and cost functions take the instant
//! and the usage as arguments.
//!
//! # The price file (TOML)
//!
//! ```toml
//! label = "2026-11"                  # required; names the table with its hash
//!
//! [limits]                           # optional magnitude ceilings, in dollars
//! max_price_per_mtok = "10000"       # default 10000; at most 1000000
//! max_price_per_call = "100"         # per_request, per_call, per_unit; default 100
//!
//! [models."gpt-4o-mini"]
//! input_per_mtok = "0.15"            # dollars per 1M input tokens
//! cached_input_per_mtok = "0.075"    # optional; default: the input price
//! output_per_mtok = "0.60"           # at least one of input/output is required
//! per_request = "0"                  # optional flat fee per request
//! default_max_output_tokens = 16384  # required when output costs anything
//! aliases = ["gpt-4o-mini-2024-07-18"]
//!
//! [[models."gpt-4o-mini".schedule]]  # optional scheduled changes
//! effective_from = 2026-12-01T00:00:00Z
//! input_per_mtok = "0.20"            # prices not set here carry over
//!
//! [tools."web-search"]
//! per_call = "0.005"                 # at least one of per_call/per_unit
//! per_unit = "0.001"
//! unit = "results"                   # required with per_unit
//! markup_percent = "35"              # optional; this entry's own markup
//!
//! [markup]                           # optional; what customers pay above cost
//! percent = "20"                     # 0 to 1000, at most 4 decimal places
//! ```
//!
//! Unknown keys are errors. Amounts are dollars written as strings of digits
//! with an optional fraction (`"0.15"`), or TOML integers; at most 12 decimal
//! places, never negative. Bare TOML floats are refused: `0.1` would have gone
//! through binary floating point. Names and aliases match exactly, and each
//! resolves to one model. Schedule entries may be in any order; two may not
//! start at the same instant; before the first one the base prices apply.
//! Every problem in a file is reported at once as `file:line:col: message`.
//!
//! # Rounding
//!
//! A call's total is computed exactly (integer attodollars), then rounded up,
//! towards +∞, to whole nanodollars: every cost and hold has exactly 9 decimal
//! places. The rounding is applied once per call, never per token or per term.
//! Arithmetic is checked: a total that cannot be represented is returned as
//! [`CostError::Overflow`], never saturated. With every price under the hard
//! ceiling of 10^6 dollars this cannot happen for model calls, whatever the
//! `u64` token counts; only a tool's `units × per_unit` can reach it.
//!
//! # Markup
//!
//! The prices are what the operator pays. An operator who resells credits
//! sets `[markup] percent` (and `markup_percent` on a model or tool to
//! differ from it, `"0"` for none): the customer is charged
//! `cost × (1 + percent/100)`, computed exactly on the whole call's cost (as
//! rounded above) and rounded up once more, to whole nanodollars — never per
//! token, per term or per part ([`customer_price`]). Holds are marked up the
//! same way, so a hold still covers its settle. The markup is in the file,
//! so changing it makes a new [`PriceVersion`].
//!
//! # Version
//!
//! [`PriceVersion`] is the file's `label` plus the first 12 hex digits of the
//! SHA-256 of its bytes, displayed as `label@hash`. A request is held and
//! settled with the same version.

mod cost;
pub mod diff;
mod live;
mod problems;
mod schema;
mod table;
mod validate;

pub use cost::{
    customer_price, CostError, HoldRequest, LongContext, Markup, ModelPrice, Multipliers, TokenUsage,
    ToolPrice, COST_SCALE, MARKUP_PERCENT_PLACES,
};
pub use live::{LivePrices, PriceLoadError, PriceStatus};
pub use problems::{PriceFileErrors, Problem};
pub use table::{PriceTable, PriceVersion};
pub use validate::MAX_PRICE_FILE_BYTES;

#[cfg(test)]
mod tests {
    /// Every source file of this module, read at compile time.
    const SOURCES: [(&str, &str); 8] = [
        ("pricing.rs", include_str!("pricing.rs")),
        ("cost.rs", include_str!("pricing/cost.rs")),
        ("diff.rs", include_str!("pricing/diff.rs")),
        ("live.rs", include_str!("pricing/live.rs")),
        ("problems.rs", include_str!("pricing/problems.rs")),
        ("schema.rs", include_str!("pricing/schema.rs")),
        ("table.rs", include_str!("pricing/table.rs")),
        ("validate.rs", include_str!("pricing/validate.rs")),
    ];

    #[test]
    fn no_float_type_appears_in_the_money_module() {
        // Spelt in pieces so that this test does not find itself.
        let banned = [concat!("f", "32"), concat!("f", "64")];
        for (file, source) in SOURCES {
            // Split identifiers at `_` too (to catch `to_fXX`), and drop leading
            // digits (to catch literal suffixes like `1fXX`).
            let words = source
                .split(|c: char| !c.is_ascii_alphanumeric())
                .map(|word| word.trim_start_matches(|c: char| c.is_ascii_digit()));
            for word in words {
                assert!(!banned.contains(&word), "{file} mentions `{word}`");
            }
        }
    }

    #[test]
    fn the_float_check_covers_every_file_of_the_module() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/pricing");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut checked: Vec<&str> = SOURCES.iter().map(|(file, _)| *file).collect();
        checked.retain(|file| *file != "pricing.rs");
        assert_eq!(on_disk, checked, "add new files of src/pricing/ to SOURCES");
    }
}
