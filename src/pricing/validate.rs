//! The validated layer: raw entries become prices, and every problem in the
//! file is reported at once, each at its own line with a hint how to fix it.

use std::collections::HashMap;
use std::ops::Range;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use toml::{Spanned, Value};

use super::cost::{
    LongContext, Markup, ModelPrice, Multipliers, Picos, ToolPrice, MARKUP_PERCENT_PLACES, MULTIPLIER_ONE,
    PRICE_SCALE,
};
use super::problems::{PriceFileErrors, Problems};
use super::schema::{
    Lenient, RawEntries, RawLimits, RawLongContext, RawMarkup, RawModel, RawModelChange, RawPriceFile,
    RawTool, RawToolChange, RawValue,
};
use super::table::{ModelEntry, Schedule, ToolEntry};

/// Largest price file accepted. Callers should bound their read by it too.
pub const MAX_PRICE_FILE_BYTES: usize = 4 * 1024 * 1024;

/// Default ceiling on per-1M-token prices, in dollars. Real prices are far
/// below it; its job is to catch a slip of magnitude ("150" for "0.150").
const DEFAULT_MAX_PRICE_PER_MTOK: u32 = 10_000;
/// Default ceiling on per-request, per-call and per-unit fees, in dollars.
const DEFAULT_MAX_PRICE_PER_CALL: u32 = 100;
/// No ceiling may be raised above this many dollars. It keeps every price at
/// most 10^18 picodollars, which is what makes model costs overflow-free.
const HARD_MAX_PRICE: u32 = 1_000_000;
/// Bound on `default_max_output_tokens`: a slip here would inflate every hold.
const MAX_DEFAULT_OUTPUT_TOKENS: u64 = 10_000_000;
/// Bound on a tier or long-context multiplier: a slip of magnitude, not a price.
const MAX_MULTIPLIER: u64 = 100;
/// Bound on a markup, in percent: 1000% is eleven times cost, far above any
/// resale margin; more is a slip of magnitude ("200" for "20.0").
const MAX_MARKUP_PERCENT: u32 = 1_000;
/// Bound on the label: it is printed in every ledger entry as `label@hash`.
const MAX_LABEL_CHARS: usize = 64;

/// The parts of a valid price file, ready to become a `PriceTable`.
pub(super) struct Validated {
    pub(super) label: String,
    pub(super) as_of: Option<NaiveDate>,
    /// The table-wide markup (`[markup] percent`); entries may override it.
    pub(super) markup: Markup,
    pub(super) models: Vec<ModelEntry>,
    pub(super) tools: Vec<ToolEntry>,
    /// Every model name and alias, to its index in `models`.
    pub(super) model_names: HashMap<Box<str>, usize>,
    pub(super) tool_names: HashMap<Box<str>, usize>,
}

/// Parses and checks a whole price file.
pub(super) fn validate(file: &str, text: &str) -> Result<Validated, PriceFileErrors> {
    let mut problems = Problems::new(text);
    if text.len() > MAX_PRICE_FILE_BYTES {
        problems.at(
            0,
            format!(
                "the file is {} bytes, above the limit of {MAX_PRICE_FILE_BYTES}; \
                 a price file this large is almost certainly the wrong file",
                text.len()
            ),
        );
        return Err(problems.into_errors(file));
    }
    let raw = match toml::from_str::<RawPriceFile>(text) {
        Ok(raw) => raw,
        Err(error) => {
            let offset = error.span().map_or(0, |span| span.start);
            problems.at(offset, one_line(error.message()));
            return Err(problems.into_errors(file));
        }
    };
    let mut checker = Checker { problems, ceilings: Ceilings::default(), markup: Markup::NONE };
    let validated = checker.file(raw);
    if checker.problems.is_empty() {
        Ok(validated)
    } else {
        Err(checker.problems.into_errors(file))
    }
}

/// The magnitude ceilings in force for this file.
struct Ceilings {
    per_mtok: Decimal,
    per_call: Decimal,
}

impl Default for Ceilings {
    fn default() -> Self {
        Self {
            per_mtok: Decimal::from(DEFAULT_MAX_PRICE_PER_MTOK),
            per_call: Decimal::from(DEFAULT_MAX_PRICE_PER_CALL),
        }
    }
}

/// Which ceiling a price is held to.
#[derive(Clone, Copy)]
enum PriceKind {
    PerMtok,
    PerCall,
}

/// Model prices while a schedule is merged: `None` is "not set here".
#[derive(Clone, Copy, Default)]
struct ModelRates {
    input: Option<Picos>,
    cached_input: Option<Picos>,
    cache_write_5m: Option<Picos>,
    cache_write_1h: Option<Picos>,
    output: Option<Picos>,
    per_request: Option<Picos>,
}

/// The price fields a model and each of its schedule entries may set.
struct RateFields<'r> {
    input: Option<&'r RawValue>,
    cached_input: Option<&'r RawValue>,
    cache_write_5m: Option<&'r RawValue>,
    cache_write_1h: Option<&'r RawValue>,
    output: Option<&'r RawValue>,
    per_request: Option<&'r RawValue>,
}

impl ModelRates {
    /// The prices in force after `change`: what it sets wins, the rest carries over.
    fn then(self, change: Self) -> Self {
        Self {
            input: change.input.or(self.input),
            cached_input: change.cached_input.or(self.cached_input),
            cache_write_5m: change.cache_write_5m.or(self.cache_write_5m),
            cache_write_1h: change.cache_write_1h.or(self.cache_write_1h),
            output: change.output.or(self.output),
            per_request: change.per_request.or(self.per_request),
        }
    }

    /// An unset price is zero, except the cached and cache-write prices,
    /// which follow the input price in force (also after a scheduled input
    /// change); a model without both write prices serves no request that
    /// marks cache breakpoints.
    fn price(
        self,
        default_max_output_tokens: u64,
        long_context: Option<LongContext>,
        markup: Markup,
        hidden_reasoning: bool,
    ) -> ModelPrice {
        let input = self.input.unwrap_or_default();
        ModelPrice {
            input_per_mtok: input,
            cached_input_per_mtok: self.cached_input.unwrap_or(input),
            output_per_mtok: self.output.unwrap_or_default(),
            per_request: self.per_request.unwrap_or_default(),
            cache_write_5m_per_mtok: self.cache_write_5m.unwrap_or(input),
            cache_write_1h_per_mtok: self.cache_write_1h.unwrap_or(input),
            cache_writes_priced: self.cache_write_5m.is_some() && self.cache_write_1h.is_some(),
            default_max_output_tokens,
            long_context,
            tier: Multipliers::ONE,
            markup,
            hidden_reasoning,
        }
    }
}

#[derive(Clone, Copy, Default)]
struct ToolRates {
    per_call: Option<Picos>,
    per_unit: Option<Picos>,
}

impl ToolRates {
    fn then(self, change: Self) -> Self {
        Self { per_call: change.per_call.or(self.per_call), per_unit: change.per_unit.or(self.per_unit) }
    }

    fn price(self, markup: Markup) -> ToolPrice {
        ToolPrice {
            per_call: self.per_call.unwrap_or_default(),
            per_unit: self.per_unit.unwrap_or_default(),
            markup,
        }
    }
}

/// A schedule entry once typed: when it starts, where it is, what it sets.
struct Change<R> {
    from: DateTime<Utc>,
    offset: usize,
    rates: R,
}

/// What the schedule checks need from a raw schedule entry.
trait RawChange {
    fn effective_from(&self) -> Option<&RawValue>;
    fn sets_no_price(&self) -> bool;
}

impl RawChange for RawModelChange {
    fn effective_from(&self) -> Option<&RawValue> {
        self.effective_from.as_ref()
    }

    fn sets_no_price(&self) -> bool {
        self.input_per_mtok.is_none()
            && self.output_per_mtok.is_none()
            && self.cached_input_per_mtok.is_none()
            && self.cache_write_5m_per_mtok.is_none()
            && self.cache_write_1h_per_mtok.is_none()
            && self.per_request.is_none()
    }
}

impl RawChange for RawToolChange {
    fn effective_from(&self) -> Option<&RawValue> {
        self.effective_from.as_ref()
    }

    fn sets_no_price(&self) -> bool {
        self.per_call.is_none() && self.per_unit.is_none()
    }
}

/// A model that passed its own checks, with what the name index needs.
struct CheckedModel {
    entry: ModelEntry,
    name_offset: usize,
    aliases: Vec<(String, usize)>,
}

/// Which model a name or alias resolves to, and where that was written.
#[derive(Clone, Copy)]
struct NameOwner {
    model: usize,
    offset: usize,
    is_alias: bool,
}

struct Checker<'a> {
    problems: Problems<'a>,
    ceilings: Ceilings,
    /// The table-wide markup, for entries that set none of their own.
    markup: Markup,
}

impl Checker<'_> {
    fn file(&mut self, raw: RawPriceFile) -> Validated {
        let label = self.label(raw.label.as_ref());
        let as_of = raw.as_of.as_ref().and_then(|value| self.as_of(value));
        if let Some(limits) = &raw.limits {
            self.ceilings = self.limits(limits);
        }
        if let Some(markup) = &raw.markup {
            self.markup = self.table_markup(markup);
        }
        if raw.models.is_empty() && raw.tools.is_empty() {
            self.problems.at(
                0,
                "the file prices no model and no tool, so every request would be refused; \
                 add a [models.\"name\"] or [tools.\"name\"] table",
            );
        }
        let models: Vec<CheckedModel> =
            in_file_order(raw.models).iter().filter_map(|(name, body)| self.model(name, body)).collect();
        let model_names = self.model_names(&models);
        let tools: Vec<ToolEntry> =
            in_file_order(raw.tools).iter().filter_map(|(name, body)| self.tool(name, body)).collect();
        let tool_names =
            tools.iter().enumerate().map(|(index, tool)| (Box::from(tool.name.as_str()), index)).collect();
        Validated {
            label,
            as_of,
            markup: self.markup,
            models: models.into_iter().map(|model| model.entry).collect(),
            tools,
            model_names,
            tool_names,
        }
    }

    /// `as_of = "YYYY-MM-DD"`: when the prices were last checked.
    fn as_of(&mut self, value: &RawValue) -> Option<NaiveDate> {
        let date = match value.get_ref() {
            Value::String(text) => {
                NaiveDate::parse_from_str(text, "%Y-%m-%d").ok().filter(|_| text.len() == 10)
            }
            _ => None,
        };
        if date.is_none() {
            let message = format!(
                "as_of = {}: write the date the prices were last checked as \"YYYY-MM-DD\", e.g. as_of = \"2026-11-30\"",
                self.written(value)
            );
            self.problems.at_span(&value.span(), message);
        }
        date
    }

    fn label(&mut self, raw: Option<&RawValue>) -> String {
        let Some(value) = raw else {
            self.problems.at(
                0,
                "the file has no `label`; add a line such as label = \"2026-11\" at the top: \
                 with the content hash it names this table in the ledger",
            );
            return String::new();
        };
        match value.get_ref() {
            Value::String(label) if is_valid_label(label) => label.clone(),
            _ => {
                let message = format!(
                    "label = {}: use a string of 1 to {MAX_LABEL_CHARS} letters, digits, \
                     '.', '_', ':' or '-', e.g. label = \"2026-11\"",
                    self.written(value)
                );
                self.problems.at_span(&value.span(), message);
                String::new()
            }
        }
    }

    fn limits(&mut self, limits: &Spanned<Lenient<RawLimits>>) -> Ceilings {
        let defaults = Ceilings::default();
        let limits = match limits.get_ref() {
            Lenient::Valid(limits) => limits,
            Lenient::Invalid(message) => {
                self.invalid_entry("[limits]", &limits.span(), message);
                return defaults;
            }
        };
        Ceilings {
            per_mtok: self
                .ceiling("max_price_per_mtok", limits.max_price_per_mtok.as_ref())
                .unwrap_or(defaults.per_mtok),
            per_call: self
                .ceiling("max_price_per_call", limits.max_price_per_call.as_ref())
                .unwrap_or(defaults.per_call),
        }
    }

    /// `[markup] percent`: the table-wide markup (none when unset).
    fn table_markup(&mut self, markup: &Spanned<Lenient<RawMarkup>>) -> Markup {
        let markup = match markup.get_ref() {
            Lenient::Valid(markup) => markup,
            Lenient::Invalid(message) => {
                self.invalid_entry("[markup]", &markup.span(), message);
                return Markup::NONE;
            }
        };
        markup
            .percent
            .as_ref()
            .and_then(|value| self.markup_percent("percent", value))
            .unwrap_or(Markup::NONE)
    }

    /// An entry's `markup_percent`, or the table's when it sets none.
    fn entry_markup(&mut self, value: Option<&RawValue>) -> Markup {
        match value {
            Some(value) => self.markup_percent("markup_percent", value).unwrap_or(self.markup),
            None => self.markup,
        }
    }

    /// A markup percent: an exact decimal string (or integer) from 0 to
    /// [`MAX_MARKUP_PERCENT`] with at most [`MARKUP_PERCENT_PLACES`] places.
    fn markup_percent(&mut self, field: &str, value: &RawValue) -> Option<Markup> {
        let shape = Exact { noun: "percent", hint: "a markup is a percent of the cost", example: "20" };
        self.exact(field, value, &shape, parse_markup)
    }

    fn ceiling(&mut self, field: &str, value: Option<&RawValue>) -> Option<Decimal> {
        let value = value?;
        let amount = self.decimal(field, value)?;
        let fault = if amount.is_zero() {
            "a ceiling of zero would refuse every price; raise it or remove it".to_owned()
        } else if amount > Decimal::from(HARD_MAX_PRICE) {
            format!(
                "above the hard limit of {HARD_MAX_PRICE} dollars, which keeps every cost \
                 exact and overflow-free; no real price needs more"
            )
        } else {
            return Some(amount);
        };
        let message = format!("{field} = {}: {fault}", self.written(value));
        self.problems.at_span(&value.span(), message);
        None
    }

    fn model(&mut self, name: &Spanned<String>, body: &Spanned<Lenient<RawModel>>) -> Option<CheckedModel> {
        let what = format!("model `{}`", name.get_ref());
        self.entry_name(&what, name);
        let raw = self.entry_body(&what, body)?;
        if raw.input_per_mtok.is_none() && raw.output_per_mtok.is_none() {
            let message = format!(
                "{what} has neither input_per_mtok nor output_per_mtok; set at least one \
                 (\"0\" makes that direction free)"
            );
            self.problems.at_span(&name.span(), message);
        }
        let base = self.model_rates(RateFields {
            input: raw.input_per_mtok.as_ref(),
            cached_input: raw.cached_input_per_mtok.as_ref(),
            cache_write_5m: raw.cache_write_5m_per_mtok.as_ref(),
            cache_write_1h: raw.cache_write_1h_per_mtok.as_ref(),
            output: raw.output_per_mtok.as_ref(),
            per_request: raw.per_request.as_ref(),
        });
        let changes = self.changes(&what, &raw.schedule, |checker, change| {
            checker.model_rates(RateFields {
                input: change.input_per_mtok.as_ref(),
                cached_input: change.cached_input_per_mtok.as_ref(),
                cache_write_5m: change.cache_write_5m_per_mtok.as_ref(),
                cache_write_1h: change.cache_write_1h_per_mtok.as_ref(),
                output: change.output_per_mtok.as_ref(),
                per_request: change.per_request.as_ref(),
            })
        });
        let periods = merge(base, changes, ModelRates::then);
        let default_output = self.default_output(&what, name, raw, &periods);
        let long_context = raw.long_context.as_ref().and_then(|long| self.long_context(&what, long));
        let markup = self.entry_markup(raw.markup_percent.as_ref());
        let hidden_reasoning =
            raw.hidden_reasoning.as_ref().is_some_and(|value| self.flag("hidden_reasoning", value));
        let schedule = Schedule::new(periods.into_iter().map(|(from, rates)| {
            (from, rates.price(default_output, long_context, markup, hidden_reasoning))
        }));
        let service_tiers = in_file_order_ref(&raw.service_tiers)
            .into_iter()
            .filter_map(|(tier, body)| {
                let what = format!("{what} service tier `{}`", tier.get_ref());
                let raw = self.entry_body(&what, body)?;
                Some((tier.get_ref().clone(), self.multipliers(raw.input.as_ref(), raw.output.as_ref())?))
            })
            .collect();
        let aliases = self.aliases(&raw.aliases);
        Some(CheckedModel {
            entry: ModelEntry { name: name.get_ref().clone(), schedule, service_tiers },
            name_offset: name.span().start,
            aliases,
        })
    }

    /// Each alias that is a usable name, with where it is written.
    fn aliases(&mut self, aliases: &[RawValue]) -> Vec<(String, usize)> {
        aliases.iter().filter_map(|alias| Some((self.name("alias", alias)?, alias.span().start))).collect()
    }

    fn model_rates(&mut self, fields: RateFields<'_>) -> ModelRates {
        use PriceKind::{PerCall, PerMtok};
        ModelRates {
            input: self.price("input_per_mtok", fields.input, PerMtok),
            cached_input: self.price("cached_input_per_mtok", fields.cached_input, PerMtok),
            cache_write_5m: self.price("cache_write_5m_per_mtok", fields.cache_write_5m, PerMtok),
            cache_write_1h: self.price("cache_write_1h_per_mtok", fields.cache_write_1h, PerMtok),
            output: self.price("output_per_mtok", fields.output, PerMtok),
            per_request: self.price("per_request", fields.per_request, PerCall),
        }
    }

    /// `[models."name".long_context]`: above how many input tokens which
    /// multipliers apply.
    fn long_context(&mut self, what: &str, body: &Spanned<Lenient<RawLongContext>>) -> Option<LongContext> {
        let what = format!("{what} long_context");
        let raw = self.entry_body(&what, body)?;
        let above = match raw.above_input_tokens.as_ref().map(|value| (value, value.get_ref())) {
            Some((_, Value::Integer(n))) if *n > 0 => u64::try_from(*n).ok(),
            Some((value, _)) => {
                let message =
                    format!("above_input_tokens = {}: use a whole number above 0", self.written(value));
                self.problems.at_span(&value.span(), message);
                return None;
            }
            None => {
                self.problems.at_span(&body.span(), format!("{what} needs above_input_tokens, e.g. 200000"));
                return None;
            }
        }?;
        let multipliers = self.multipliers(raw.input.as_ref(), raw.output.as_ref())?;
        Some(LongContext { above_input_tokens: above, multipliers })
    }

    /// Input and output multipliers (each defaults to 1): exact decimals
    /// above 0, at most 100, with at most 4 decimal places.
    fn multipliers(&mut self, input: Option<&RawValue>, output: Option<&RawValue>) -> Option<Multipliers> {
        let input = self.multiplier("input", input)?;
        let output = self.multiplier("output", output)?;
        Some(Multipliers { input, output })
    }

    fn multiplier(&mut self, field: &str, value: Option<&RawValue>) -> Option<u64> {
        let Some(value) = value else { return Some(MULTIPLIER_ONE) };
        let amount = self.decimal(field, value)?;
        // Bounded before it is scaled: a 27-digit value would overflow.
        let scaled = (amount > Decimal::ZERO && amount <= Decimal::from(MAX_MULTIPLIER))
            .then(|| amount * Decimal::from(MULTIPLIER_ONE))
            .filter(|scaled| scaled.fract().is_zero());
        let result = scaled.and_then(|scaled| rust_decimal::prelude::ToPrimitive::to_u64(&scaled));
        if result.is_none() {
            let message = format!(
                "{field} = {}: a multiplier is above 0, at most {MAX_MULTIPLIER}, with at most 4 decimal places",
                self.written(value)
            );
            self.problems.at_span(&value.span(), message);
        }
        result
    }

    /// Output tokens to hold when a request names no maximum. Required as soon
    /// as output costs anything: guessing it would be guessing at money.
    fn default_output(
        &mut self,
        what: &str,
        name: &Spanned<String>,
        raw: &RawModel,
        periods: &[(DateTime<Utc>, ModelRates)],
    ) -> u64 {
        if let Some(value) = &raw.default_max_output_tokens {
            return self.output_tokens(value).unwrap_or(0);
        }
        let output_costs = periods.iter().any(|(_, rates)| rates.output.is_some_and(|price| price.0 > 0));
        if output_costs {
            let message = format!(
                "{what} prices output but has no default_max_output_tokens; set it to the \
                 output to hold for when a request names no max_tokens, e.g. 4096"
            );
            self.problems.at_span(&name.span(), message);
        }
        0
    }

    fn tool(&mut self, name: &Spanned<String>, body: &Spanned<Lenient<RawTool>>) -> Option<ToolEntry> {
        let what = format!("tool `{}`", name.get_ref());
        self.entry_name(&what, name);
        let raw = self.entry_body(&what, body)?;
        self.tool_shape(&what, name, raw);
        let base = self.tool_rates(raw.per_call.as_ref(), raw.per_unit.as_ref());
        let changes = self.changes(&what, &raw.schedule, |checker, change| {
            checker.tool_rates(change.per_call.as_ref(), change.per_unit.as_ref())
        });
        let periods = merge(base, changes, ToolRates::then);
        let unit = raw.unit.as_ref().and_then(|unit| self.name("unit", unit));
        let markup = self.entry_markup(raw.markup_percent.as_ref());
        Some(ToolEntry {
            name: name.get_ref().clone(),
            unit,
            schedule: Schedule::new(periods.into_iter().map(|(from, rates)| (from, rates.price(markup)))),
        })
    }

    /// The base entry must price the tool by itself (as for models), and
    /// `unit` goes with `per_unit`, in either direction.
    fn tool_shape(&mut self, what: &str, name: &Spanned<String>, raw: &RawTool) {
        let sets_per_unit = raw.per_unit.is_some()
            || raw.schedule.iter().any(
                |change| matches!(change.get_ref(), Lenient::Valid(change) if change.per_unit.is_some()),
            );
        let fault = if raw.per_call.is_none() && raw.per_unit.is_none() {
            format!(
                "{what} has neither per_call nor per_unit; set at least one \
                 (per_call = \"0\" makes calls free)"
            )
        } else if sets_per_unit && raw.unit.is_none() {
            format!("{what} has per_unit but no unit; name what is counted, e.g. unit = \"results\"")
        } else if !sets_per_unit && raw.unit.is_some() {
            format!("{what} has a unit but no per_unit; add per_unit or remove unit")
        } else {
            return;
        };
        self.problems.at_span(&name.span(), fault);
    }

    fn tool_rates(&mut self, per_call: Option<&RawValue>, per_unit: Option<&RawValue>) -> ToolRates {
        ToolRates {
            per_call: self.price("per_call", per_call, PriceKind::PerCall),
            per_unit: self.price("per_unit", per_unit, PriceKind::PerCall),
        }
    }

    /// Types each schedule entry and reports entries that cannot be ordered:
    /// a missing instant, or two entries starting at the same instant.
    /// Entries may be written in any order; they are sorted by instant.
    fn changes<T: RawChange, R>(
        &mut self,
        what: &str,
        entries: &[Spanned<Lenient<T>>],
        mut rates: impl FnMut(&mut Self, &T) -> R,
    ) -> Vec<Change<R>> {
        let mut changes = Vec::with_capacity(entries.len());
        for entry in entries {
            let span = entry.span();
            let raw = match entry.get_ref() {
                Lenient::Valid(raw) => raw,
                Lenient::Invalid(message) => {
                    self.invalid_entry(&format!("schedule entry of {what}"), &span, message);
                    continue;
                }
            };
            if raw.sets_no_price() {
                let message = format!(
                    "schedule entry of {what} sets no price; add the prices that change or \
                     remove the entry"
                );
                self.problems.at_span(&span, message);
            }
            let rates = rates(self, raw);
            if let Some(from) = self.effective_from(what, raw.effective_from(), &span) {
                changes.push(Change { from, offset: span.start, rates });
            }
        }
        // Stable: of two entries at the same instant, the later one in the file
        // stays second and is the one reported.
        changes.sort_by_key(|change| change.from);
        self.report_same_instants(what, &changes);
        // The file is already refused; keep the schedule well-formed meanwhile.
        changes.dedup_by_key(|change| change.from);
        changes
    }

    fn report_same_instants<R>(&mut self, what: &str, changes: &[Change<R>]) {
        for pair in changes.windows(2) {
            if let [first, second] = pair {
                if first.from == second.from {
                    let message = format!(
                        "schedule entry of {what}: effective_from {} is also the start of the \
                         entry at line {}; two prices cannot start at the same instant: merge \
                         the entries or move one",
                        second.from.to_rfc3339(),
                        self.problems.line_of(first.offset)
                    );
                    self.problems.at(second.offset, message);
                }
            }
        }
    }

    fn effective_from(
        &mut self,
        what: &str,
        value: Option<&RawValue>,
        entry: &Range<usize>,
    ) -> Option<DateTime<Utc>> {
        let Some(value) = value else {
            let message = format!(
                "schedule entry of {what} has no effective_from; add the instant the prices \
                 start, e.g. effective_from = 2026-12-01T00:00:00Z"
            );
            self.problems.at_span(entry, message);
            return None;
        };
        let parsed = match value.get_ref() {
            Value::Datetime(at) if at.date.is_some() && at.time.is_some() && at.offset.is_some() => {
                parse_instant(&at.to_string())
            }
            Value::String(text) => parse_instant(text),
            _ => None,
        };
        if parsed.is_none() {
            let message = format!(
                "effective_from = {}: use an instant with a date, a time and a UTC offset, \
                 e.g. effective_from = 2026-12-01T00:00:00Z (a local time would start the \
                 prices at different instants on different hosts)",
                self.written(value)
            );
            self.problems.at_span(&value.span(), message);
        }
        parsed
    }

    /// Builds the index of model names and aliases; each must resolve to one model.
    fn model_names(&mut self, models: &[CheckedModel]) -> HashMap<Box<str>, usize> {
        let mut names: HashMap<&str, NameOwner> = models
            .iter()
            .enumerate()
            .map(|(model, checked)| {
                let owner = NameOwner { model, offset: checked.name_offset, is_alias: false };
                (checked.entry.name.as_str(), owner)
            })
            .collect();
        for (model, checked) in models.iter().enumerate() {
            for (alias, offset) in &checked.aliases {
                if let Some(&taken) = names.get(alias.as_str()) {
                    self.report_taken_alias(models, model, alias, *offset, taken);
                    continue;
                }
                let owner = NameOwner { model, offset: *offset, is_alias: true };
                names.insert(alias, owner);
            }
        }
        names.into_iter().map(|(name, owner)| (Box::from(name), owner.model)).collect()
    }

    fn report_taken_alias(
        &mut self,
        models: &[CheckedModel],
        model: usize,
        alias: &str,
        offset: usize,
        taken: NameOwner,
    ) {
        let name_of = |index: usize| models.get(index).map_or("", |m| m.entry.name.as_str());
        let (name, other) = (name_of(model), name_of(taken.model));
        let line = self.problems.line_of(taken.offset);
        let fault = match (taken.model == model, taken.is_alias) {
            (true, false) => "is the model's own name; remove it".to_owned(),
            (true, true) => format!("is listed twice (first at line {line}); remove one"),
            (false, false) => format!(
                "is already the name of model `{other}` (line {line}); a name must resolve \
                 to one model: remove the alias"
            ),
            (false, true) => format!(
                "is already an alias of model `{other}` (line {line}); a name must resolve \
                 to one model: keep it in one list"
            ),
        };
        let message = format!("alias `{alias}` of model `{name}` {fault}");
        self.problems.at(offset, message);
    }

    fn entry_name(&mut self, what: &str, name: &Spanned<String>) {
        let text = name.get_ref();
        if text.is_empty() || text.trim() != text {
            let message = format!("{what}: a name must be non-empty, without surrounding spaces");
            self.problems.at_span(&name.span(), message);
        }
    }

    fn entry_body<'t, T>(&mut self, what: &str, body: &'t Spanned<Lenient<T>>) -> Option<&'t T> {
        match body.get_ref() {
            Lenient::Valid(raw) => Some(raw),
            Lenient::Invalid(message) => {
                self.invalid_entry(what, &body.span(), message);
                None
            }
        }
    }

    /// Reports an entry that serde refused (an unknown key, or a key of the
    /// wrong shape), at the offending key's line when it can be found.
    fn invalid_entry(&mut self, what: &str, span: &Range<usize>, message: &str) {
        let offset = locate_key(self.problems.text(), span, message).unwrap_or(span.start);
        let message = serde_message(message);
        let hint = if message.starts_with("unknown field") {
            "; check the spelling against the keys listed"
        } else {
            ""
        };
        self.problems.at(offset, format!("{what}: {message}{hint}"));
    }

    /// A price in whole picodollars, or `None` (with a problem recorded if it was set).
    fn price(&mut self, field: &str, value: Option<&RawValue>, kind: PriceKind) -> Option<Picos> {
        let value = value?;
        let amount = self.decimal(field, value)?;
        let (ceiling, limit, per) = match kind {
            PriceKind::PerMtok => (self.ceilings.per_mtok, "max_price_per_mtok", "per 1M tokens"),
            PriceKind::PerCall => (self.ceilings.per_call, "max_price_per_call", "per call or unit"),
        };
        let picos = if amount > ceiling { None } else { to_picos(amount) };
        if picos.is_none() {
            let message = format!(
                "{field} = {}: above the ceiling of {ceiling} dollars {per}; if the price is \
                 right, raise [limits] {limit} (at most {HARD_MAX_PRICE})",
                self.written(value)
            );
            self.problems.at_span(&value.span(), message);
        }
        picos
    }

    /// An exact non-negative decimal: a string of digits or a TOML integer.
    fn decimal(&mut self, field: &str, value: &RawValue) -> Option<Decimal> {
        let shape = Exact { noun: "amount", hint: "a price is a dollar amount", example: "0.15" };
        self.exact(field, value, &shape, parse_amount)
    }

    /// A value written as a string of digits (or a TOML integer) and read
    /// exactly by `parse`; a bare float or another type is refused.
    fn exact<T>(
        &mut self,
        field: &str,
        value: &RawValue,
        shape: &Exact,
        parse: fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let parsed = match value.get_ref() {
            Value::String(text) => parse(text),
            Value::Integer(number) => parse(&number.to_string()),
            Value::Float(_) => Err(format!(
                "a bare TOML float goes through binary floating point and may not be the \
                 {} written; quote it: {field} = \"{}\"",
                shape.noun,
                self.written(value)
            )),
            other => Err(format!(
                "{} written as a string, e.g. {field} = \"{}\"; this is a {}",
                shape.hint,
                shape.example,
                other.type_str()
            )),
        };
        match parsed {
            Ok(amount) => Some(amount),
            Err(fault) => {
                let message = format!("{field} = {}: {fault}", self.written(value));
                self.problems.at_span(&value.span(), message);
                None
            }
        }
    }

    fn output_tokens(&mut self, value: &RawValue) -> Option<u64> {
        let tokens = match value.get_ref() {
            Value::Integer(number) => u64::try_from(*number).ok(),
            _ => None,
        }
        .filter(|tokens| (1..=MAX_DEFAULT_OUTPUT_TOKENS).contains(tokens));
        if tokens.is_none() {
            let message = format!(
                "default_max_output_tokens = {}: use a whole number of tokens from 1 to \
                 {MAX_DEFAULT_OUTPUT_TOKENS}, e.g. 4096",
                self.written(value)
            );
            self.problems.at_span(&value.span(), message);
        }
        tokens
    }

    /// `true` or `false`.
    fn flag(&mut self, field: &str, value: &RawValue) -> bool {
        match value.get_ref() {
            Value::Boolean(set) => *set,
            _ => {
                let message = format!("{field} = {}: use true or false", self.written(value));
                self.problems.at_span(&value.span(), message);
                false
            }
        }
    }

    /// A non-empty string without surrounding spaces (an alias or a unit).
    fn name(&mut self, field: &str, value: &RawValue) -> Option<String> {
        match value.get_ref() {
            Value::String(text) if !text.is_empty() && text.trim() == text => Some(text.clone()),
            _ => {
                let message = format!(
                    "{field} = {}: use a non-empty string without surrounding spaces",
                    self.written(value)
                );
                self.problems.at_span(&value.span(), message);
                None
            }
        }
    }

    /// The value exactly as the operator wrote it, for quoting in messages.
    fn written(&self, value: &RawValue) -> &str {
        self.problems.text().get(value.span()).unwrap_or("the value")
    }
}

/// Parses a dollar amount written as plain digits with an optional fraction.
/// Stricter than `Decimal`'s parser on purpose: no sign, exponent, `_` or
/// leading `.`, so what is accepted reads the same to every operator.
fn parse_amount(text: &str) -> Result<Decimal, String> {
    if text.starts_with('-') {
        return Err("a price is a charge and cannot be negative; use zero or more".to_owned());
    }
    let (whole, fraction) = text.split_once('.').unwrap_or((text, "0"));
    let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || !all_digits(fraction) {
        return Err("not a decimal amount; write digits with an optional fraction, e.g. \"0.15\" \
             (no sign, exponent, spaces or separators)"
            .to_owned());
    }
    let places = fraction.trim_end_matches('0').len();
    if places > PRICE_SCALE as usize {
        return Err(format!(
            "{places} decimal places, more than the {PRICE_SCALE} kept exactly \
             (a millionth of a millionth of a dollar); round it"
        ));
    }
    Decimal::from_str_exact(text)
        .map(|amount| amount.normalize())
        .map_err(|_| format!("too large; no price may exceed {HARD_MAX_PRICE} dollars"))
}

/// How an exact value is written, for the messages of [`Checker::exact`].
struct Exact {
    /// What the value is ("amount").
    noun: &'static str,
    /// What it must be ("a price is a dollar amount").
    hint: &'static str,
    /// A value to show ("0.15").
    example: &'static str,
}

/// Parses a markup percent: digits with an optional fraction, as for prices.
fn parse_markup(text: &str) -> Result<Markup, String> {
    if text.starts_with('-') {
        return Err("a markup cannot be negative (that would sell below cost); \
                    use \"0\" for no markup"
            .to_owned());
    }
    let (whole, fraction) = text.split_once('.').unwrap_or((text, "0"));
    let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || !all_digits(fraction) {
        return Err("not a percent; write digits with an optional fraction, e.g. \"20\" or \"7.5\" \
             (no sign, % sign, exponent, spaces or separators)"
            .to_owned());
    }
    let places = fraction.trim_end_matches('0').len();
    if places > MARKUP_PERCENT_PLACES as usize {
        return Err(format!(
            "{places} decimal places, more than the {MARKUP_PERCENT_PLACES} a markup keeps \
             (a ten-thousandth of a percent); round it"
        ));
    }
    let percent = Decimal::from_str_exact(text).ok().filter(|p| *p <= Decimal::from(MAX_MARKUP_PERCENT));
    let millionths = percent
        .map(|percent| percent * Decimal::from(10u64.pow(MARKUP_PERCENT_PLACES)))
        .and_then(|millionths| rust_decimal::prelude::ToPrimitive::to_u64(&millionths));
    millionths.map(|millionths| Markup { millionths }).ok_or_else(|| {
        format!(
            "above {MAX_MARKUP_PERCENT}%, which would charge more than {} times the cost; \
             a markup is a percent (\"20\" for 20%), not a multiplier",
            MAX_MARKUP_PERCENT / 100 + 1
        )
    })
}

/// Whole picodollars of an amount with at most 12 decimal places, if it fits.
fn to_picos(amount: Decimal) -> Option<Picos> {
    let mut picos = amount;
    picos.rescale(PRICE_SCALE);
    // `rescale` quietly keeps fewer places when the mantissa would overflow.
    if picos.scale() != PRICE_SCALE {
        return None;
    }
    u64::try_from(picos.mantissa()).ok().map(Picos)
}

fn parse_instant(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text).ok().map(|at| at.with_timezone(&Utc))
}

fn is_valid_label(label: &str) -> bool {
    (1..=MAX_LABEL_CHARS).contains(&label.chars().count())
        && label.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
}

/// The base prices (in force since the beginning of time) followed by each
/// change in time order, every period carrying the merged prices.
fn merge<R: Copy>(base: R, changes: Vec<Change<R>>, then: fn(R, R) -> R) -> Vec<(DateTime<Utc>, R)> {
    let mut periods = Vec::with_capacity(changes.len() + 1);
    periods.push((DateTime::<Utc>::MIN_UTC, base));
    let mut current = base;
    for change in changes {
        current = then(current, change.rates);
        periods.push((change.from, current));
    }
    periods
}

/// [`in_file_order`] without taking the entries.
fn in_file_order_ref<T>(entries: &RawEntries<T>) -> Vec<(&Spanned<String>, &Spanned<Lenient<T>>)> {
    let mut entries: Vec<_> = entries.iter().collect();
    entries.sort_by_key(|(name, _)| name.span().start);
    entries
}

fn in_file_order<T>(entries: RawEntries<T>) -> Vec<(Spanned<String>, Spanned<Lenient<T>>)> {
    let mut entries: Vec<_> = entries.into_iter().collect();
    entries.sort_by_key(|(name, _)| name.span().start);
    entries
}

/// A serde message on one line, with a trailing "in `key`" line moved to the
/// front: "schedule: invalid type: integer `5`, expected a sequence".
fn serde_message(message: &str) -> String {
    let text = message.trim_end();
    match text.rsplit_once('\n') {
        Some((rest, last)) => match trailing_key(last) {
            Some(key) => format!("{key}: {}", one_line(rest)),
            None => one_line(text),
        },
        None => one_line(text),
    }
}

/// The key of a line "in `key`", which toml appends to a nested error.
fn trailing_key(line: &str) -> Option<&str> {
    line.trim().strip_prefix("in `")?.strip_suffix('`')
}

/// toml's messages can span lines; ours are one line.
fn one_line(message: &str) -> String {
    message.lines().map(str::trim).filter(|line| !line.is_empty()).collect::<Vec<_>>().join("; ")
}

/// Finds where the key named in a serde error is written inside an entry:
/// "unknown field `k`" or a trailing "in `k`". Header tables span their whole
/// body, so the key's own line is inside `span`. `None` if not found; the
/// caller then points at the entry.
fn locate_key(text: &str, span: &Range<usize>, message: &str) -> Option<usize> {
    let key =
        quoted_after(message, "unknown field `").or_else(|| message.lines().last().and_then(trailing_key))?;
    let body = text.get(span.clone())?;
    let mut line_start = span.start;
    for line in body.split_inclusive('\n') {
        let indent = line.len() - line.trim_start().len();
        let rest = line.trim_start();
        let unquoted =
            rest.strip_prefix('"').and_then(|r| r.strip_prefix(key)).and_then(|r| r.strip_prefix('"'));
        let after = unquoted.or_else(|| rest.strip_prefix(key));
        if after.is_some_and(|after| after.trim_start().starts_with(['=', '.'])) {
            return Some(line_start + indent);
        }
        line_start += line.len();
    }
    None
}

fn quoted_after<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    let start = message.find(prefix)? + prefix.len();
    let rest = message.get(start..)?;
    rest.find('`').and_then(|end| rest.get(..end))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::pricing::{PriceTable, Problem};

    /// The problems of a file that must fail, as (line, message).
    fn problems(text: &str) -> Vec<(usize, String)> {
        let errors = PriceTable::parse("prices.toml", text).unwrap_err();
        errors.problems.into_iter().map(|Problem { line, message, .. }| (line, message)).collect()
    }

    /// Asserts that the file fails with exactly one problem, at `line`,
    /// whose message contains every one of `parts`.
    #[track_caller]
    fn assert_one_problem(text: &str, line: usize, parts: &[&str]) {
        let found = problems(text);
        assert_eq!(found.len(), 1, "expected one problem, got {found:#?}");
        let (found_line, message) = &found[0];
        assert_eq!(*found_line, line, "wrong line for: {message}");
        for part in parts {
            assert!(message.contains(part), "`{part}` missing from: {message}");
        }
    }

    const HEAD: &str = "label = \"t\"\n";

    fn file(body: &str) -> String {
        format!("{HEAD}{body}")
    }

    #[test]
    fn a_minimal_file_is_valid() {
        let text = file("[models.m]\ninput_per_mtok = \"1\"\n");
        assert!(PriceTable::parse("p.toml", &text).is_ok());
    }

    #[test]
    fn a_toml_syntax_error_is_located() {
        let text = file("[models.m]\ninput_per_mtok = \"1\n");
        assert_one_problem(&text, 3, &["string"]);
    }

    #[test]
    fn an_unknown_top_level_key_is_located() {
        assert_one_problem(&file("\nmodel = 3\n"), 3, &["unknown field `model`"]);
    }

    #[test]
    fn an_unknown_model_key_is_reported_at_its_own_line() {
        let text = file("[models.m]\ninput_per_mtok = \"1\"\ninptu_per_mtok = \"2\"\n");
        assert_one_problem(
            &text,
            4,
            &["model `m`", "unknown field `inptu_per_mtok`", "input_per_mtok", "spelling"],
        );
    }

    #[test]
    fn an_unknown_key_in_an_inline_table_is_reported_at_the_entry() {
        let text = file("[models]\nm = { input_per_mtok = \"1\", colour = \"red\" }\n");
        assert_one_problem(&text, 3, &["model `m`", "unknown field `colour`"]);
    }

    #[test]
    fn an_unknown_key_in_a_schedule_entry_is_reported_at_its_own_line() {
        let text = file(concat!(
            "[models.m]\n",
            "input_per_mtok = \"1\"\n",
            "[[models.m.schedule]]\n",
            "effective_from = 2026-12-01T00:00:00Z\n",
            "input_per_mtok = \"2\"\n",
            "efective = 1\n",
        ));
        assert_one_problem(&text, 7, &["schedule entry of model `m`", "`efective`"]);
    }

    #[test]
    fn unknown_keys_in_tools_and_limits_are_located() {
        let text = file(concat!(
            "[limits]\n",
            "max_price = \"1\"\n",
            "[tools.t]\n",
            "per_call = \"1\"\n",
            "per_cal = \"1\"\n",
        ));
        let found = problems(&text);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert_eq!(found[0].0, 3, "{found:#?}");
        assert!(found[0].1.contains("[limits]: unknown field `max_price`"));
        assert_eq!(found[1].0, 6, "{found:#?}");
        assert!(found[1].1.contains("tool `t`: unknown field `per_cal`"));
    }

    #[test]
    fn a_key_of_the_wrong_shape_is_located() {
        let text = file("[models.m]\ninput_per_mtok = \"1\"\nschedule = 3\n");
        assert_one_problem(&text, 4, &["model `m`: schedule: invalid type", "expected a sequence"]);
    }

    #[test]
    fn a_bare_float_is_refused_with_a_hint_to_quote_it() {
        let text = file("[models.m]\ninput_per_mtok = 0.1\n");
        assert_one_problem(
            &text,
            3,
            &["input_per_mtok = 0.1", "binary floating point", "input_per_mtok = \"0.1\""],
        );
    }

    #[test]
    fn a_negative_price_is_refused() {
        let text = file("[models.m]\ninput_per_mtok = \"-0.5\"\n");
        assert_one_problem(&text, 3, &["input_per_mtok = \"-0.5\"", "negative"]);
        let text = file("[models.m]\ninput_per_mtok = -1\n");
        assert_one_problem(&text, 3, &["negative"]);
    }

    #[test]
    fn a_non_numeric_price_is_refused() {
        for written in ["\"abc\"", "\"1e3\"", "\"1_000\"", "\".5\"", "\" 1\"", "\"\""] {
            let text = file(&format!("[models.m]\ninput_per_mtok = {written}\n"));
            assert_one_problem(&text, 3, &[written, "not a decimal amount"]);
        }
        let text = file("[models.m]\ninput_per_mtok = true\n");
        assert_one_problem(&text, 3, &["written as a string", "boolean"]);
    }

    #[test]
    fn integer_prices_and_trailing_zeros_are_accepted() {
        let text = file("[models.m]\ninput_per_mtok = 2\noutput_per_mtok = \"0.150000000000000\"\n");
        let text = format!("{text}default_max_output_tokens = 10\n");
        assert!(PriceTable::parse("p.toml", &text).is_ok());
    }

    #[test]
    fn more_than_twelve_decimal_places_are_refused() {
        let text = file("[models.m]\ninput_per_mtok = \"0.0000000000001\"\n");
        assert_one_problem(&text, 3, &["13 decimal places", "round it"]);
    }

    #[test]
    fn a_price_above_the_default_ceiling_is_refused() {
        let text = file("[models.m]\ninput_per_mtok = \"10000.01\"\n");
        assert_one_problem(&text, 3, &["above the ceiling of 10000", "max_price_per_mtok"]);
        let text = file("[tools.t]\nper_call = \"150\"\n");
        assert_one_problem(&text, 3, &["above the ceiling of 100", "max_price_per_call"]);
    }

    #[test]
    fn the_ceilings_follow_the_limits_table() {
        let limits = "[limits]\nmax_price_per_mtok = \"20000\"\nmax_price_per_call = \"0.01\"\n";
        let ok = file(&format!("{limits}[models.m]\ninput_per_mtok = \"15000\"\n"));
        assert!(PriceTable::parse("p.toml", &ok).is_ok(), "raised ceiling");
        let low = file(&format!("{limits}[tools.t]\nper_unit = \"0.02\"\nunit = \"u\"\n"));
        assert_one_problem(&low, 6, &["per_unit = \"0.02\"", "ceiling of 0.01"]);
    }

    #[test]
    fn a_limit_must_be_above_zero_and_at_most_the_hard_maximum() {
        let text = file("[limits]\nmax_price_per_mtok = \"1000001\"\nmax_price_per_call = 0\n");
        let text = format!("{text}[models.m]\ninput_per_mtok = \"1\"\n");
        let found = problems(&text);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert_eq!(found[0].0, 3);
        assert!(found[0].1.contains("hard limit of 1000000"), "{}", found[0].1);
        assert_eq!(found[1].0, 4);
        assert!(found[1].1.contains("zero"), "{}", found[1].1);
    }

    #[test]
    fn tier_and_long_context_multipliers_are_checked() {
        let text = file(concat!(
            "[models.m]\ninput_per_mtok = \"1\"\n",
            "service_tiers.priority = { input = \"0\" }\n",
            "service_tiers.flex = { output = \"1.00001\" }\n",
            "service_tiers.slow = { input = 0.5 }\n",
            "long_context = { input = \"2\" }\n",
            "[models.n]\ninput_per_mtok = \"1\"\n",
            // Too large to scale by 10^4: a problem, not a panic.
            "service_tiers.priority = { input = \"100000000000000000000000000\" }\n",
        ));
        let found = problems(&text);
        assert_eq!(found.len(), 5, "{found:?}");
        assert!(found.iter().any(|(line, m)| *line == 10 && m.contains("above 0, at most 100")), "{found:?}");
        assert!(found.iter().any(|(_, m)| m.contains("above 0, at most 100")), "{found:?}");
        assert!(found.iter().any(|(_, m)| m.contains("bare TOML float")), "{found:?}");
        assert!(found.iter().any(|(_, m)| m.contains("needs above_input_tokens")), "{found:?}");
        let valid = file(concat!(
            "[models.m]\ninput_per_mtok = \"1\"\ncache_write_1h_per_mtok = \"2\"\n",
            "service_tiers.priority = { input = \"1.7\", output = \"1.7\" }\n",
            "long_context = { above_input_tokens = 200000, input = \"2\", output = \"1.5\" }\n",
        ));
        assert!(PriceTable::parse("prices.toml", &valid).is_ok(), "multipliers and cache writes in range");
    }

    #[test]
    fn markups_are_exact_percents_from_zero_to_a_thousand_with_four_places() {
        let text = file(concat!(
            "[markup]\npercent = \"20\"\n",
            "[models.m]\ninput_per_mtok = \"1\"\nmarkup_percent = \"33.3333\"\n",
            "[models.free]\ninput_per_mtok = \"1\"\nmarkup_percent = \"0\"\n",
            "[models.plain]\ninput_per_mtok = \"1\"\n",
            "[tools.t]\nper_call = \"1\"\nmarkup_percent = 1000\n",
        ));
        let table = PriceTable::parse("p.toml", &text).unwrap();
        let now = chrono::Utc::now();
        let percent = |markup: crate::pricing::Markup| markup.percent().to_string();
        assert_eq!(percent(table.markup()), "20");
        assert_eq!(percent(table.model("m", now).unwrap().markup()), "33.3333", "the model's own");
        assert_eq!(percent(table.model("free", now).unwrap().markup()), "0", "\"0\" turns it off");
        assert_eq!(percent(table.model("plain", now).unwrap().markup()), "20", "the table's");
        assert_eq!(percent(table.tool("t", now).unwrap().markup()), "1000", "the tool's own");
        let none = PriceTable::parse("p.toml", &file("[models.m]\ninput_per_mtok = \"1\"\n")).unwrap();
        assert!(none.markup().is_none(), "no [markup]: none");
    }

    #[test]
    fn a_bad_markup_is_refused_with_the_reason() {
        let model = "[models.m]\ninput_per_mtok = \"1\"\n";
        let cases: [(&str, &[&str]); 7] = [
            ("\"-5\"", &["percent = \"-5\"", "cannot be negative", "\"0\" for no markup"]),
            ("-5", &["cannot be negative"]),
            ("\"1000.0001\"", &["above 1000%", "not a multiplier"]),
            ("\"99999999999999999999999999999\"", &["above 1000%"]),
            ("\"12.34567\"", &["5 decimal places", "more than the 4"]),
            ("\"20%\"", &["not a percent"]),
            ("0.2", &["bare TOML float", "percent = \"0.2\""]),
        ];
        for (written, parts) in cases {
            assert_one_problem(&file(&format!("[markup]\npercent = {written}\n{model}")), 3, parts);
        }
        let entry = file("[models.m]\ninput_per_mtok = \"1\"\nmarkup_percent = \"-1\"\n");
        assert_one_problem(&entry, 4, &["markup_percent = \"-1\"", "negative"]);
        let tool = file("[tools.t]\nper_call = \"1\"\nmarkup_percent = true\n");
        assert_one_problem(&tool, 4, &["markup_percent = true", "percent of the cost", "boolean"]);
        let typo = file(&format!("[markup]\npercnt = \"20\"\n{model}"));
        assert_one_problem(&typo, 3, &["[markup]: unknown field `percnt`"]);
    }

    #[test]
    fn a_model_needs_an_input_or_output_price() {
        let text = file("[models.m]\nper_request = \"1\"\n");
        assert_one_problem(&text, 2, &["model `m`", "neither input_per_mtok nor output_per_mtok"]);
    }

    #[test]
    fn a_model_that_prices_output_needs_a_default_output_cap() {
        let text = file("[models.m]\noutput_per_mtok = \"1\"\n");
        assert_one_problem(&text, 2, &["default_max_output_tokens", "4096"]);
        let free_output = file("[models.m]\ninput_per_mtok = \"1\"\noutput_per_mtok = \"0\"\n");
        assert!(PriceTable::parse("p.toml", &free_output).is_ok(), "free output needs no cap");
    }

    #[test]
    fn the_default_output_cap_must_be_a_positive_bounded_count() {
        for written in ["0", "-5", "\"4096\"", "10000001"] {
            let text = file(&format!(
                "[models.m]\noutput_per_mtok = \"1\"\ndefault_max_output_tokens = {written}\n"
            ));
            assert_one_problem(&text, 4, &["default_max_output_tokens", "whole number"]);
        }
    }

    #[test]
    fn a_tool_needs_a_price_and_per_unit_needs_a_unit() {
        let neither = file("[tools.t]\nunit = \"results\"\n");
        let found = problems(&neither);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].1.contains("neither per_call nor per_unit"), "{found:#?}");
        let no_unit = file("[tools.t]\nper_unit = \"0.001\"\n");
        assert_one_problem(&no_unit, 2, &["tool `t`", "per_unit but no unit"]);
        let no_per_unit = file("[tools.t]\nper_call = \"0.001\"\nunit = \"results\"\n");
        assert_one_problem(&no_per_unit, 2, &["unit but no per_unit"]);
    }

    #[test]
    fn an_alias_may_not_name_another_model() {
        let text = file(concat!(
            "[models.a]\ninput_per_mtok = \"1\"\n",
            "[models.b]\ninput_per_mtok = \"1\"\naliases = [\"a\"]\n",
        ));
        assert_one_problem(&text, 6, &["alias `a` of model `b`", "name of model `a` (line 2)"]);
    }

    #[test]
    fn an_alias_may_belong_to_one_model_only() {
        let text = file(concat!(
            "[models.a]\ninput_per_mtok = \"1\"\naliases = [\"x\"]\n",
            "[models.b]\ninput_per_mtok = \"1\"\n",
            "aliases = [\n  \"y\",\n  \"x\",\n]\n",
        ));
        assert_one_problem(&text, 9, &["alias `x` of model `b`", "alias of model `a` (line 4)"]);
    }

    #[test]
    fn an_alias_may_not_repeat_within_its_model() {
        let own = file("[models.a]\ninput_per_mtok = \"1\"\naliases = [\"a\"]\n");
        assert_one_problem(&own, 4, &["alias `a` of model `a`", "own name"]);
        let twice = file("[models.a]\ninput_per_mtok = \"1\"\naliases = [\"x\", \"x\"]\n");
        assert_one_problem(&twice, 4, &["listed twice"]);
        let empty = file("[models.a]\ninput_per_mtok = \"1\"\naliases = [\"\"]\n");
        assert_one_problem(&empty, 4, &["alias = \"\"", "non-empty"]);
    }

    #[test]
    fn two_schedule_entries_may_not_start_at_the_same_instant() {
        let text = file(concat!(
            "[models.m]\ninput_per_mtok = \"1\"\n",
            "[[models.m.schedule]]\neffective_from = 2026-12-01T00:00:00Z\ninput_per_mtok = \"2\"\n",
            "[[models.m.schedule]]\neffective_from = \"2026-12-01T01:00:00+01:00\"\n",
            "input_per_mtok = \"3\"\n",
        ));
        assert_one_problem(&text, 7, &["2026-12-01T00:00:00+00:00", "entry at line 4", "merge"]);
    }

    #[test]
    fn a_schedule_entry_needs_an_instant_with_an_offset_and_a_price() {
        let text = file(concat!(
            "[models.m]\ninput_per_mtok = \"1\"\n",
            "[[models.m.schedule]]\ninput_per_mtok = \"2\"\n",
            "[[models.m.schedule]]\neffective_from = 2026-12-01T00:00:00\ninput_per_mtok = \"2\"\n",
            "[[models.m.schedule]]\neffective_from = \"soon\"\ninput_per_mtok = \"2\"\n",
            "[[models.m.schedule]]\neffective_from = 2027-01-01T00:00:00Z\n",
        ));
        let found = problems(&text);
        let lines: Vec<usize> = found.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [4, 7, 10, 12], "{found:#?}");
        assert!(found[0].1.contains("has no effective_from"), "{found:#?}");
        assert!(found[1].1.contains("UTC offset"), "{found:#?}");
        assert!(found[2].1.contains("effective_from = \"soon\""), "{found:#?}");
        assert!(found[3].1.contains("sets no price"), "{found:#?}");
    }

    #[test]
    fn the_label_is_required_and_printable() {
        let text = "[models.m]\ninput_per_mtok = \"1\"\n";
        assert_one_problem(text, 1, &["no `label`"]);
        let text = "label = \"two words\"\n[models.m]\ninput_per_mtok = \"1\"\n";
        assert_one_problem(text, 1, &["label = \"two words\"", "letters, digits"]);
    }

    #[test]
    fn a_file_that_prices_nothing_is_refused() {
        assert_one_problem(HEAD, 1, &["prices no model and no tool"]);
    }

    #[test]
    fn a_file_above_the_size_limit_is_refused() {
        let text = file(&"#".repeat(super::MAX_PRICE_FILE_BYTES));
        assert_one_problem(&text, 1, &["above the limit"]);
    }

    #[test]
    fn every_problem_in_a_file_is_reported_at_once_in_file_order() {
        let text = concat!(
            "label = \"t\"\n",
            "[models.a]\n",
            "input_per_mtok = 0.5\n",
            "output_per_mtok = \"-1\"\n",
            "[models.b]\n",
            "input_per_mtok = \"1\"\n",
            "colour = \"red\"\n",
            "[models.c]\n",
            "input_per_mtok = \"1\"\n",
            "aliases = [\"a\"]\n",
            "[tools.t]\n",
            "per_unit = \"x\"\n",
        );
        let errors = PriceTable::parse("prices.toml", text).unwrap_err();
        let located: Vec<String> = errors
            .to_string()
            .lines()
            .map(|line| line.split(": ").next().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            located,
            [
                "prices.toml:3:18",
                "prices.toml:4:19",
                "prices.toml:7:1",
                "prices.toml:10:12",
                "prices.toml:11:8",
                "prices.toml:12:12",
            ],
            "{errors}"
        );
    }

    #[test]
    fn hidden_reasoning_is_true_or_false() {
        let model = "label = \"t\"\n[models.m]\ninput_per_mtok = \"1\"\n";
        let table = PriceTable::parse("p.toml", &format!("{model}hidden_reasoning = true\n")).unwrap();
        assert!(table.model("m", chrono::Utc::now()).unwrap().reasons_unseen());
        let table = PriceTable::parse("p.toml", model).unwrap();
        assert!(!table.model("m", chrono::Utc::now()).unwrap().reasons_unseen());
        assert_one_problem(
            &format!("{model}hidden_reasoning = \"yes\"\n"),
            4,
            &["hidden_reasoning", "true or false"],
        );
    }
}
