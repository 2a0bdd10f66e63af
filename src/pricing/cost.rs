//! Cost functions: exact integer arithmetic, one rounding at the end.
//!
//! Prices are loaded as whole picodollars (1e-12 dollar). A per-1M-token price
//! in picodollars is the same number as a per-token price in attodollars
//! (1e-18 dollar), so `tokens × price` is an exact count of attodollars, and a
//! flat fee in picodollars is `fee × 10^6` attodollars. A call's total is summed
//! exactly in `u128` attodollars and then rounded up once to whole nanodollars
//! (1e-9 dollar, [`COST_SCALE`] decimal places).
//!
//! Why integers rather than `Decimal` arithmetic: `Decimal`'s multiplication
//! silently rounds when an exact product needs more than 96 bits, and a large
//! token count times a finely divided price can need more. `u128` never does
//! that: it is exact or it reports overflow.
//!
//! Overflow. A token term is at most `u64::MAX × u64::MAX < u128::MAX`, so it
//! cannot overflow. With prices under the hard ceiling (10^6 dollars, that is
//! 10^18 picodollars) a model call's total is at most about 3.7 × 10^28
//! nanodollars for any `u64` usage, which fits a `Decimal` (7.9 × 10^28), so
//! model costs and holds never fail.
//! A tool's `units × per_unit` has no such bound, so every cost function returns
//! [`CostError::Overflow`] as a value rather than saturating to a wrong amount.

use rust_decimal::Decimal;

/// Decimal places of every computed cost and hold: whole nanodollars.
pub const COST_SCALE: u32 = 9;

/// Decimal places of every loaded price: whole picodollars.
pub(super) const PRICE_SCALE: u32 = 12;

const ATTOS_PER_PICO: u128 = 1_000_000;
const ATTOS_PER_NANO: u128 = 1_000_000_000;

/// An exact non-negative price in picodollars, per 1M tokens for token rates
/// and per call or per unit for fees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Picos(pub(super) u64);

impl Picos {
    /// The price in dollars. Cannot panic: any `u64` fits a `Decimal` mantissa.
    fn dollars(self) -> Decimal {
        Decimal::from_i128_with_scale(i128::from(self.0), PRICE_SCALE).normalize()
    }
}

/// What an operator who resells credits charges above cost: a percentage,
/// kept exactly as a whole number of millionths of the cost (a ten-thousandth
/// of a percent, [`MARKUP_PERCENT_PLACES`] decimal places of the percent).
/// `Markup::NONE` is 0%.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Markup {
    pub(super) millionths: u64,
}

/// Decimal places a markup percent may have (`"33.3333"`).
pub const MARKUP_PERCENT_PLACES: u32 = 4;
/// A whole cost in [`Markup`]'s millionths.
const MARKUP_ONE: u128 = 1_000_000;

impl Markup {
    pub const NONE: Markup = Markup { millionths: 0 };

    /// The markup as written in a price file: percent of the cost.
    pub fn percent(self) -> Decimal {
        Decimal::from_i128_with_scale(i128::from(self.millionths), MARKUP_PERCENT_PLACES).normalize()
    }

    pub fn is_none(self) -> bool {
        self.millionths == 0
    }
}

/// What the customer pays for costs each under its own markup:
/// `Σ cost × (1 + percent/100)`, computed exactly and rounded up (towards
/// +∞) once, to whole nanodollars ([`COST_SCALE`]), never per part. The
/// costs are the operator's, as the cost functions return them (whole
/// nanodollars); a cost with more places is taken rounded up, so the price
/// never falls below it. Exact because it is integer arithmetic: a cost of
/// at most `Decimal::MAX` nanodollars (< 2^96) times at most 1.1 × 10^7
/// millionths fits a `u128` many times over.
pub fn customer_price(parts: &[(Decimal, Markup)]) -> Result<Decimal, CostError> {
    let mut millionths_of_nanos: u128 = 0;
    for &(cost, markup) in parts {
        let nanos = whole_nanos(cost)?;
        let factor = MARKUP_ONE + u128::from(markup.millionths);
        let term = nanos.checked_mul(factor).ok_or(CostError::Overflow)?;
        millionths_of_nanos = millionths_of_nanos.checked_add(term).ok_or(CostError::Overflow)?;
    }
    let nanos = i128::try_from(millionths_of_nanos.div_ceil(MARKUP_ONE)).map_err(|_| CostError::Overflow)?;
    Decimal::try_from_i128_with_scale(nanos, COST_SCALE).map_err(|_| CostError::Overflow)
}

/// A non-negative cost in whole nanodollars, rounded up; a negative one is
/// no cost the cost functions make, and is refused rather than priced.
fn whole_nanos(cost: Decimal) -> Result<u128, CostError> {
    if cost.is_sign_negative() && !cost.is_zero() {
        return Err(CostError::Negative);
    }
    let rounded = cost.round_dp_with_strategy(COST_SCALE, rust_decimal::RoundingStrategy::AwayFromZero);
    let mantissa = u128::try_from(rounded.mantissa()).map_err(|_| CostError::Negative)?;
    let places = COST_SCALE.checked_sub(rounded.scale()).ok_or(CostError::Overflow)?;
    mantissa.checked_mul(10u128.pow(places)).ok_or(CostError::Overflow)
}

/// A cost that does not fit the money type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CostError {
    /// The exact total is above `Decimal::MAX` nanodollars (about 7.9 × 10^19
    /// dollars). No wallet can cover it; the caller should refuse the request.
    #[error("the cost is too large to represent (above about 7.9e19 dollars); refuse the request")]
    Overflow,
    /// A negative amount was given as a cost to mark up.
    #[error("a cost cannot be negative")]
    Negative,
}

/// Tokens a model call used, as the upstream reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// All input tokens, cached ones included (OpenAI's `prompt_tokens`;
    /// for Anthropic, `input_tokens` plus the cache read and write tokens).
    pub input_tokens: u64,
    /// The part of `input_tokens` served from the provider's prompt cache.
    pub cached_input_tokens: u64,
    /// The part of `input_tokens` written to a prompt cache kept 5 minutes.
    pub cache_write_5m_tokens: u64,
    /// ... and to one kept an hour.
    pub cache_write_1h_tokens: u64,
    pub output_tokens: u64,
}

/// Price multipliers, in ten-thousandths so that they stay exact integers:
/// one for every input-side rate (input, cached input, cache writes), one
/// for output. A service tier (`priority`, `flex`) and a long-context tier
/// are each one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Multipliers {
    pub(super) input: u64,
    pub(super) output: u64,
}

/// 1× in [`Multipliers`]' ten-thousandths.
pub(super) const MULTIPLIER_ONE: u64 = 10_000;

impl Multipliers {
    pub const ONE: Multipliers = Multipliers { input: MULTIPLIER_ONE, output: MULTIPLIER_ONE };

    /// Both applied: the products, in hundred-millionths.
    fn and(self, other: Multipliers) -> (u128, u128) {
        (u128::from(self.input) * u128::from(other.input), u128::from(self.output) * u128::from(other.output))
    }
}

/// Rates that apply to the whole call once its input is above a size
/// (Anthropic and Google price long prompts higher).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongContext {
    pub(super) above_input_tokens: u64,
    pub(super) multipliers: Multipliers,
}

/// What is known about a model call before it is forwarded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldRequest {
    /// Size of the request body. A byte-level BPE never makes more tokens than
    /// bytes, so this bounds the input tokens from above.
    pub input_bytes: u64,
    /// The request's `max_tokens` (or equivalent), if it names one.
    pub max_output_tokens: Option<u64>,
}

/// The prices of one model at one instant. Small and `Copy`: a lookup returns
/// it by value, without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelPrice {
    pub(super) input_per_mtok: Picos,
    /// Equal to `input_per_mtok` when the file sets no cached price.
    pub(super) cached_input_per_mtok: Picos,
    pub(super) output_per_mtok: Picos,
    pub(super) per_request: Picos,
    /// Equal to `input_per_mtok` when the file sets no cache-write price.
    pub(super) cache_write_5m_per_mtok: Picos,
    pub(super) cache_write_1h_per_mtok: Picos,
    /// Whether the file states both cache-write prices. Without them a
    /// request that marks cache breakpoints is refused: the providers that
    /// bill writes bill them above plain input (Anthropic: 1.25x, 2x).
    pub(super) cache_writes_priced: bool,
    /// Output tokens to hold for when a request names no maximum. Zero only
    /// for models whose output is free, where it does not matter.
    pub(super) default_max_output_tokens: u64,
    pub(super) long_context: Option<LongContext>,
    /// The service tier the request asked for ([`ModelPrice::in_tier`]).
    pub(super) tier: Multipliers,
    /// What the customer pays above these prices (the model's own, else the table's).
    pub(super) markup: Markup,
    /// The model reasons in tokens it bills and never streams (`hidden_reasoning`):
    /// a stream the upstream breaks off shows nothing of them.
    pub(super) hidden_reasoning: bool,
}

impl ModelPrice {
    /// The most this call can cost the customer: [`ModelPrice::hold_cost`]
    /// with the markup on. Never less than the marked-up [`ModelPrice::cost`]
    /// of a usage that stays within it (both round up, from a larger cost).
    pub fn hold_amount(&self, request: &HoldRequest) -> Result<Decimal, CostError> {
        customer_price(&[(self.hold_cost(request)?, self.markup)])
    }

    /// The most this call can cost the operator: every input byte as a token
    /// at the dearest input-side price, plus the allowed output tokens.
    /// Never less than [`ModelPrice::cost`] of a usage that stays within it.
    pub fn hold_cost(&self, request: &HoldRequest) -> Result<Decimal, CostError> {
        let input_price = self
            .input_per_mtok
            .max(self.cached_input_per_mtok)
            .max(self.cache_write_5m_per_mtok)
            .max(self.cache_write_1h_per_mtok);
        let output_tokens = request.max_output_tokens.unwrap_or(self.default_max_output_tokens);
        let (input_scale, output_scale) = self.multipliers(request.input_bytes);
        scaled_total(&[
            (tokens_at(request.input_bytes, input_price), input_scale),
            (tokens_at(output_tokens, self.output_per_mtok), output_scale),
            (fee(self.per_request), UNSCALED),
        ])
    }

    /// The tier's multipliers, and the long-context ones once `input_tokens`
    /// is above the model's threshold.
    fn multipliers(&self, input_tokens: u64) -> (u128, u128) {
        let long = match self.long_context {
            Some(long) if input_tokens > long.above_input_tokens => long.multipliers,
            _ => Multipliers::ONE,
        };
        self.tier.and(long)
    }

    /// Whether the file states long-context multipliers for the model.
    pub fn has_long_context_prices(&self) -> bool {
        self.long_context.is_some()
    }

    /// These prices in a service tier.
    pub fn cache_writes_priced(&self) -> bool {
        self.cache_writes_priced
    }

    pub fn in_tier(self, tier: Multipliers) -> ModelPrice {
        ModelPrice { tier, ..self }
    }

    /// What the call cost. Cached input tokens are charged at the cached price;
    /// a cached count above the input count is charged in full (the upstream's
    /// word is taken for the cached part, the rest of the input is then zero).
    pub fn cost(&self, usage: &TokenUsage) -> Result<Decimal, CostError> {
        let uncached_tokens = usage
            .input_tokens
            .saturating_sub(usage.cached_input_tokens)
            .saturating_sub(usage.cache_write_5m_tokens)
            .saturating_sub(usage.cache_write_1h_tokens);
        let input_attos = [
            tokens_at(uncached_tokens, self.input_per_mtok),
            tokens_at(usage.cached_input_tokens, self.cached_input_per_mtok),
            tokens_at(usage.cache_write_5m_tokens, self.cache_write_5m_per_mtok),
            tokens_at(usage.cache_write_1h_tokens, self.cache_write_1h_per_mtok),
        ]
        .iter()
        .try_fold(0u128, |sum, &term| sum.checked_add(term))
        .ok_or(CostError::Overflow)?;
        let (input_scale, output_scale) = self.multipliers(usage.input_tokens);
        scaled_total(&[
            (input_attos, input_scale),
            (tokens_at(usage.output_tokens, self.output_per_mtok), output_scale),
            (fee(self.per_request), UNSCALED),
        ])
    }

    /// Dollars per 1M input tokens.
    pub fn input_per_mtok(&self) -> Decimal {
        self.input_per_mtok.dollars()
    }

    /// Dollars per 1M cached input tokens (the input price when none is set).
    pub fn cached_input_per_mtok(&self) -> Decimal {
        self.cached_input_per_mtok.dollars()
    }

    /// Dollars per 1M output tokens.
    pub fn output_per_mtok(&self) -> Decimal {
        self.output_per_mtok.dollars()
    }

    /// Dollars charged per request on top of tokens.
    pub fn per_request(&self) -> Decimal {
        self.per_request.dollars()
    }

    /// Whether the model bills reasoning it never streams: what a stream
    /// broken off before its usage delivered is no floor on its bill.
    pub fn reasons_unseen(&self) -> bool {
        self.hidden_reasoning
    }

    pub fn default_max_output_tokens(&self) -> u64 {
        self.default_max_output_tokens
    }

    /// The markup the customer pays on [`ModelPrice::cost`].
    pub fn markup(&self) -> Markup {
        self.markup
    }
}

/// The prices of one tool at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolPrice {
    pub(super) per_call: Picos,
    pub(super) per_unit: Picos,
    /// What the customer pays above these prices (the tool's own, else the table's).
    pub(super) markup: Markup,
}

impl ToolPrice {
    /// What a call costs the operator: `per_call + units × per_unit`.
    pub fn cost(&self, units: u64) -> Result<Decimal, CostError> {
        let unit_attos = u128::from(units)
            .checked_mul(u128::from(self.per_unit.0))
            .and_then(|picos| picos.checked_mul(ATTOS_PER_PICO))
            .ok_or(CostError::Overflow)?;
        total(&[fee(self.per_call), unit_attos])
    }

    /// The most a call reporting at most `max_units` units can cost the
    /// customer: the cost of `max_units` with the markup on.
    pub fn hold_amount(&self, max_units: u64) -> Result<Decimal, CostError> {
        customer_price(&[(self.cost(max_units)?, self.markup)])
    }

    /// The markup the customer pays on [`ToolPrice::cost`].
    pub fn markup(&self) -> Markup {
        self.markup
    }

    /// Dollars per call.
    pub fn per_call(&self) -> Decimal {
        self.per_call.dollars()
    }

    /// Dollars per unit.
    pub fn per_unit(&self) -> Decimal {
        self.per_unit.dollars()
    }
}

/// Exact attodollars for `tokens` at a per-1M-token price. Cannot overflow:
/// the product of two `u64`s is below `u128::MAX`.
fn tokens_at(tokens: u64, price_per_mtok: Picos) -> u128 {
    u128::from(tokens) * u128::from(price_per_mtok.0)
}

/// Exact attodollars of a flat fee. Cannot overflow: `u64::MAX × 10^6 < u128::MAX`.
fn fee(price: Picos) -> u128 {
    u128::from(price.0) * ATTOS_PER_PICO
}

/// A term's scale when no multiplier applies: two multipliers of 1×.
const UNSCALED: u128 = (MULTIPLIER_ONE as u128) * (MULTIPLIER_ONE as u128);

/// The one rounding rule: sum the exact attodollar terms, then round the total
/// up (towards +∞) to whole nanodollars. Never per token or per term, so
/// splitting a call's usage can never change what it costs.
fn total(attos_terms: &[u128]) -> Result<Decimal, CostError> {
    let terms: Vec<(u128, u128)> = attos_terms.iter().map(|&attos| (attos, UNSCALED)).collect();
    scaled_total(&terms)
}

/// [`total`] of terms each multiplied by its scale (two [`Multipliers`]
/// applied, in hundred-millionths): still exact, still one rounding.
fn scaled_total(terms: &[(u128, u128)]) -> Result<Decimal, CostError> {
    // Terms at 1× are summed as they are, so they overflow no sooner than
    // without multipliers; the others in hundred-millionths of an attodollar.
    let (mut plain, mut scaled) = (0u128, 0u128);
    for &(attos, scale) in terms {
        if scale == UNSCALED {
            plain = plain.checked_add(attos).ok_or(CostError::Overflow)?;
        } else {
            let term = attos.checked_mul(scale).ok_or(CostError::Overflow)?;
            scaled = scaled.checked_add(term).ok_or(CostError::Overflow)?;
        }
    }
    // plain + scaled / UNSCALED attodollars, rounded up once to nanodollars.
    let whole = plain.checked_add(scaled / UNSCALED).ok_or(CostError::Overflow)?;
    let nanos =
        if scaled % UNSCALED == 0 { whole.div_ceil(ATTOS_PER_NANO) } else { whole / ATTOS_PER_NANO + 1 };
    let nanos = i128::try_from(nanos).map_err(|_| CostError::Overflow)?;
    Decimal::try_from_i128_with_scale(nanos, COST_SCALE).map_err(|_| CostError::Overflow)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;

    fn dec(text: &str) -> Decimal {
        Decimal::from_str(text).unwrap()
    }

    /// A price given in dollars, as the loader would store it.
    fn picos(dollars: &str) -> Picos {
        let mut d = dec(dollars);
        d.rescale(PRICE_SCALE);
        Picos(u64::try_from(d.mantissa()).unwrap())
    }

    fn model(input: &str, cached: &str, output: &str, per_request: &str) -> ModelPrice {
        ModelPrice {
            input_per_mtok: picos(input),
            cached_input_per_mtok: picos(cached),
            output_per_mtok: picos(output),
            per_request: picos(per_request),
            cache_write_5m_per_mtok: picos(input),
            cache_write_1h_per_mtok: picos(input),
            cache_writes_priced: false,
            default_max_output_tokens: 4096,
            long_context: None,
            tier: Multipliers::ONE,
            markup: Markup::NONE,
            hidden_reasoning: false,
        }
    }

    fn usage(input: u64, cached: u64, output: u64) -> TokenUsage {
        TokenUsage {
            input_tokens: input,
            cached_input_tokens: cached,
            output_tokens: output,
            ..TokenUsage::default()
        }
    }

    /// A multiplier written as a decimal, in ten-thousandths.
    fn times(text: &str) -> u64 {
        rust_decimal::prelude::ToPrimitive::to_u64(&(dec(text) * Decimal::from(MULTIPLIER_ONE))).unwrap()
    }

    #[test]
    fn cache_writes_are_priced_apart_from_plain_and_cached_input() {
        let price = ModelPrice {
            cache_write_5m_per_mtok: picos("3.75"),
            cache_write_1h_per_mtok: picos("6"),
            ..model("3", "0.3", "15", "0")
        };
        // 1000 input: 100 cache reads, 200 5-minute writes, 300 1-hour writes, 400 plain.
        let used =
            TokenUsage { cache_write_5m_tokens: 200, cache_write_1h_tokens: 300, ..usage(1000, 100, 10) };
        let expected = dec("0.0012") + dec("0.00003") + dec("0.00075") + dec("0.0018") + dec("0.00015");
        assert_eq!(price.cost(&used).unwrap(), expected, "400×3 + 100×0.3 + 200×3.75 + 300×6 + 10×15 per 1M");
        let hold = price.hold_amount(&HoldRequest { input_bytes: 1000, max_output_tokens: Some(0) }).unwrap();
        assert_eq!(hold, dec("0.006"), "the hold prices every input byte as a 1-hour cache write");
    }

    #[test]
    fn tier_and_long_context_multipliers_apply_exactly_with_one_rounding() {
        let base = model("3", "3", "15", "0.001");
        let priority = base.in_tier(Multipliers { input: times("1.7"), output: times("1.7") });
        assert_eq!(
            priority.cost(&usage(1_000_000, 0, 100_000)).unwrap(),
            dec("7.65") + dec("0.001"),
            "fee unscaled"
        );
        let long = ModelPrice {
            long_context: Some(LongContext {
                above_input_tokens: 200_000,
                multipliers: Multipliers { input: times("2"), output: times("1.5") },
            }),
            ..base
        };
        assert_eq!(
            long.cost(&usage(200_000, 0, 1000)).unwrap(),
            dec("0.6") + dec("0.015") + dec("0.001"),
            "at the threshold: base"
        );
        assert_eq!(
            long.cost(&usage(200_001, 0, 1000)).unwrap(),
            dec("1.200006") + dec("0.0225") + dec("0.001"),
            "above: the whole call"
        );
        // A third: 1 token at $1/M × 0.3333 = 3.333e-7, rounded up once to 3.34e-7.
        let third =
            model("1", "1", "0", "0").in_tier(Multipliers { input: times("0.3333"), output: MULTIPLIER_ONE });
        assert_eq!(third.cost(&usage(1, 0, 0)).unwrap(), dec("0.000000334"));
        assert_eq!(third.cost(&usage(3, 0, 0)).unwrap(), dec("0.000001"), "9999e-13 rounds up to 1e-6");
    }

    #[test]
    fn rounding_rule_table() {
        // (input price per Mtok, input tokens, expected cost as printed)
        let cases = [
            ("0.15", 1, "0.000000150"),      // exact at 1e-9 already
            ("0.0000001", 1, "0.000000001"), // 1e-13 rounds up to 1e-9
            ("0.15", 0, "0.000000000"),      // nothing used, nothing charged
            ("2.5", 1_000_000, "2.500000000"),
            ("0.000999", 1, "0.000000001"), // 9.99e-10 rounds up
            ("0.001", 1, "0.000000001"),    // exactly 1e-9 stays
            ("0.001001", 1, "0.000000002"), // 1.001e-9 rounds up
        ];
        for (price, tokens, want) in cases {
            let got = model(price, price, "0", "0").cost(&usage(tokens, 0, 0)).unwrap();
            assert_eq!(got.to_string(), want, "{tokens} tokens at {price}/Mtok");
            assert_eq!(got.scale(), COST_SCALE, "every cost has 9 decimal places");
        }
    }

    #[test]
    fn rounding_happens_once_per_call_not_per_token() {
        // 3 tokens at 1e-13 each: per-token rounding would give 3e-9.
        let price = model("0.0000001", "0.0000001", "0", "0");
        let got = price.cost(&usage(3, 0, 0)).unwrap();
        assert_eq!(got, dec("0.000000001"), "sum then round");
    }

    #[test]
    fn cost_charges_cached_output_and_request_fee() {
        let price = model("2.5", "1.25", "10", "0.001");
        // 1000 uncached × 2.5e-6 + 1000 cached × 1.25e-6 + 500 × 1e-5 + 0.001
        let got = price.cost(&usage(2000, 1000, 500)).unwrap();
        assert_eq!(got, dec("0.00975"), "2.5e-3 + 1.25e-3 + 5e-3 + 1e-3");
    }

    #[test]
    fn cached_count_above_input_is_charged_as_cached() {
        let price = model("1", "0.5", "0", "0");
        let got = price.cost(&usage(10, 20, 0)).unwrap();
        assert_eq!(got, dec("0.00001"), "20 cached × 0.5e-6, 0 uncached");
    }

    #[test]
    fn hold_uses_the_default_output_cap_when_the_request_names_none() {
        let price = model("1", "1", "2", "0");
        let hold = price.hold_amount(&HoldRequest { input_bytes: 100, max_output_tokens: None }).unwrap();
        assert_eq!(hold, dec("0.008292"), "100 × 1e-6 + 4096 × 2e-6");
    }

    #[test]
    fn hold_uses_the_dearer_of_input_and_cached_prices() {
        // Cache writes can be priced above plain input; the hold must cover them.
        let price = model("1", "3", "0", "0");
        let hold = price.hold_amount(&HoldRequest { input_bytes: 10, max_output_tokens: Some(0) }).unwrap();
        assert_eq!(hold, dec("0.00003"), "10 bytes × 3e-6");
    }

    #[test]
    fn largest_model_usage_at_the_hard_ceiling_does_not_overflow() {
        let ceiling = Picos(1_000_000 * 1_000_000_000_000);
        let price = ModelPrice {
            input_per_mtok: ceiling,
            cached_input_per_mtok: ceiling,
            output_per_mtok: ceiling,
            per_request: ceiling,
            cache_write_5m_per_mtok: ceiling,
            cache_write_1h_per_mtok: ceiling,
            cache_writes_priced: true,
            default_max_output_tokens: u64::MAX,
            long_context: None,
            tier: Multipliers::ONE,
            markup: Markup::NONE,
            hidden_reasoning: false,
        };
        let most = usage(u64::MAX, 0, u64::MAX);
        assert!(price.cost(&most).is_ok(), "u64 usage at the ceiling fits");
        let request = HoldRequest { input_bytes: u64::MAX, max_output_tokens: None };
        assert!(price.hold_amount(&request).is_ok(), "u64 hold fits");
    }

    #[test]
    fn absurd_tool_units_report_overflow_instead_of_a_wrong_amount() {
        let tool = ToolPrice { per_call: Picos(0), per_unit: Picos(u64::MAX), markup: Markup::NONE };
        assert_eq!(tool.cost(u64::MAX), Err(CostError::Overflow));
    }

    #[test]
    fn tool_cost_is_per_call_plus_units_times_per_unit() {
        let tool = ToolPrice { per_call: picos("0.005"), per_unit: picos("0.001"), markup: Markup::NONE };
        assert_eq!(tool.cost(0).unwrap(), dec("0.005"), "call fee only");
        assert_eq!(tool.cost(10).unwrap(), dec("0.015"), "plus 10 units");
        assert_eq!(tool.hold_amount(10).unwrap(), dec("0.015"), "hold = cost");
    }

    #[test]
    fn price_getters_return_dollars() {
        let price = model("0.15", "0.075", "0.6", "0");
        assert_eq!(price.input_per_mtok().to_string(), "0.15");
        assert_eq!(price.cached_input_per_mtok().to_string(), "0.075");
        assert_eq!(price.output_per_mtok().to_string(), "0.6");
        assert_eq!(price.per_request().to_string(), "0");
        let max = Picos(u64::MAX).dollars();
        assert_eq!(max.to_string(), "18446744.073709551615", "u64 never panics");
    }

    /// A markup written as a percent, in millionths.
    fn markup(percent: &str) -> Markup {
        let millionths = dec(percent) * Decimal::from(10_000);
        Markup { millionths: rust_decimal::prelude::ToPrimitive::to_u64(&millionths).unwrap() }
    }

    #[test]
    fn a_markup_is_applied_exactly_to_the_whole_cost() {
        assert_eq!(customer_price(&[(dec("0.001612"), markup("20"))]).unwrap(), dec("0.0019344"), "× 1.2");
        assert_eq!(customer_price(&[(dec("0.001612"), Markup::NONE)]).unwrap(), dec("0.001612"), "0%");
        assert_eq!(customer_price(&[]).unwrap(), Decimal::ZERO, "nothing costs nothing");
        assert_eq!(markup("33.3333").percent(), dec("33.3333"));
        assert_eq!(markup("20").percent().to_string(), "20");
        let price = customer_price(&[(dec("1"), markup("1000"))]).unwrap();
        assert_eq!(price, dec("11"), "the largest markup: 11 × cost");
        assert_eq!(price.scale(), COST_SCALE, "prices have 9 places like costs");
    }

    #[test]
    fn a_marked_up_price_beyond_nine_places_is_rounded_up_once() {
        // 123 nanodollars × 1.075 = 132.225 nanodollars: rounded up to 133.
        assert_eq!(customer_price(&[(dec("0.000000123"), markup("7.5"))]).unwrap(), dec("0.000000133"));
        // 3 nanodollars × 1.33333 = 3.99999: up to 4, never down to 3.
        assert_eq!(customer_price(&[(dec("0.000000003"), markup("33.333"))]).unwrap(), dec("0.000000004"));
        // Two parts of one nanodollar each at 7.5%: once over the whole
        // (2.15 → 3) is one nanodollar less than per part (1.075 → 2, twice).
        let once =
            customer_price(&[(dec("0.000000001"), markup("7.5")), (dec("0.000000001"), markup("7.5"))]);
        let per_part = customer_price(&[(dec("0.000000001"), markup("7.5"))]).unwrap() * Decimal::TWO;
        assert_eq!(once.unwrap(), dec("0.000000003"));
        assert_eq!(per_part, dec("0.000000004"), "rounding each part would overcharge");
    }

    #[test]
    fn the_model_hold_and_the_tool_hold_are_marked_up() {
        let price = ModelPrice { markup: markup("20"), ..model("1", "1", "2", "0") };
        let request = HoldRequest { input_bytes: 100, max_output_tokens: None };
        assert_eq!(price.hold_cost(&request).unwrap(), dec("0.008292"), "operator side");
        assert_eq!(price.hold_amount(&request).unwrap(), dec("0.0099504"), "customer side: × 1.2");
        let tool = ToolPrice { per_call: picos("0.005"), per_unit: picos("0.001"), markup: markup("35") };
        assert_eq!(tool.cost(10).unwrap(), dec("0.015"));
        assert_eq!(tool.hold_amount(10).unwrap(), dec("0.02025"), "0.015 × 1.35");
    }

    #[test]
    fn a_negative_or_unrepresentable_cost_is_an_error_not_a_price() {
        assert_eq!(customer_price(&[(dec("-0.1"), Markup::NONE)]), Err(CostError::Negative));
        assert_eq!(customer_price(&[(Decimal::MAX, markup("20"))]), Err(CostError::Overflow));
        assert_eq!(customer_price(&[(dec("0.0000000001"), Markup::NONE)]).unwrap(), dec("0.000000001"));
    }

    fn any_price() -> impl Strategy<Value = Picos> {
        // Up to the hard ceiling of 10^6 dollars, weighted towards small prices.
        prop_oneof![0..=20_000_000_000_000u64, 0..=1_000_000_000_000_000_000u64].prop_map(Picos)
    }

    prop_compose! {
        fn any_model()(input in any_price(), cached in any_price(), output in any_price(),
                       fee in any_price(), default_out in 0..=1_000_000u64) -> ModelPrice {
            ModelPrice {
                input_per_mtok: input,
                cached_input_per_mtok: cached,
                output_per_mtok: output,
                per_request: fee,
                cache_write_5m_per_mtok: input,
                cache_write_1h_per_mtok: input,
                cache_writes_priced: false,
                default_max_output_tokens: default_out,
                long_context: None,
                tier: Multipliers::ONE,
            markup: Markup::NONE,
            hidden_reasoning: false,
            }
        }
    }

    proptest! {
        #[test]
        fn cost_never_decreases_with_more_input_or_output(
            price in any_model(), input in 0..u64::MAX / 2, cached in any::<u64>(),
            output in 0..u64::MAX / 2, more in 0..u64::MAX / 2,
        ) {
            let cached = cached % (input + 1);
            let base = price.cost(&usage(input, cached, output)).unwrap();
            let more_input = price.cost(&usage(input + more, cached, output)).unwrap();
            let more_output = price.cost(&usage(input, cached, output + more)).unwrap();
            prop_assert!(more_input >= base, "more input tokens cost less");
            prop_assert!(more_output >= base, "more output tokens cost less");
        }

        #[test]
        fn cost_never_decreases_with_more_cached_input(
            price in any_model(), input in 0..u64::MAX / 2, cached in any::<u64>(),
            output in any::<u64>(), more in 0..u64::MAX / 4,
        ) {
            // Cached tokens are part of the input: adding some adds both counts.
            // (Raising the cached count alone moves tokens to a cheaper price,
            // which may rightly lower the cost.)
            let cached = cached % (input + 1);
            let base = price.cost(&usage(input, cached, output)).unwrap();
            let more_cached = price.cost(&usage(input + more, cached + more, output)).unwrap();
            prop_assert!(more_cached >= base, "more cached input tokens cost less");
        }

        #[test]
        fn cost_never_exceeds_a_hold_that_covers_the_usage(
            price in any_model(), input_bytes in any::<u64>(), input in any::<u64>(),
            cached in any::<u64>(), max_output in proptest::option::of(any::<u64>()),
            output in any::<u64>(),
        ) {
            // Bring the usage within the hold: input <= bytes, cached <= input,
            // output <= the hold's output cap.
            let input = input % input_bytes.saturating_add(1);
            let cached = cached % input.saturating_add(1);
            let cap = max_output.unwrap_or(price.default_max_output_tokens);
            let output = output % cap.saturating_add(1);
            let hold = price.hold_amount(&HoldRequest { input_bytes, max_output_tokens: max_output });
            let cost = price.cost(&usage(input, cached, output)).unwrap();
            prop_assert!(cost <= hold.unwrap(), "cost {} above hold", cost);
        }

        #[test]
        fn a_marked_up_cost_never_exceeds_the_marked_up_hold(
            price in any_model(), input_bytes in 0..u64::MAX / 4, input in any::<u64>(),
            output in any::<u64>(), millionths in 0..=10_000_000u64,
        ) {
            let price = ModelPrice { markup: Markup { millionths }, ..price };
            let input = input % input_bytes.saturating_add(1);
            let output = output % price.default_max_output_tokens.saturating_add(1);
            let hold = price.hold_amount(&HoldRequest { input_bytes, max_output_tokens: None });
            let cost = price.cost(&usage(input, 0, output)).unwrap();
            let charged = customer_price(&[(cost, price.markup())]);
            match (charged, hold) {
                (Ok(charged), Ok(hold)) => {
                    prop_assert!(charged <= hold, "price {} above hold {}", charged, hold);
                    prop_assert!(charged >= cost, "price {} below cost {}", charged, cost);
                }
                // The dearer hold may not fit where the price does; never the reverse.
                (_, Err(_)) => {}
                (Err(_), Ok(_)) => prop_assert!(false, "the price overflowed but the hold did not"),
            }
        }

        #[test]
        fn tool_cost_never_decreases_with_more_units(
            per_call in any_price(), per_unit in any_price(), units in 0..u64::MAX / 2, more in 0..u64::MAX / 2,
        ) {
            // An overflow counts as the highest cost: once reached, more units
            // must overflow too.
            let tool = ToolPrice { per_call, per_unit, markup: Markup::NONE };
            match (tool.cost(units), tool.cost(units + more)) {
                (Ok(base), Ok(bigger)) => prop_assert!(bigger >= base, "more units cost less"),
                (Ok(_) | Err(_), Err(_)) => {}
                (Err(_), Ok(_)) => prop_assert!(false, "fewer units overflowed, more did not"),
            }
        }
    }
}
