//! The money phases of a request: identify the caller by API key, price the
//! request from the table in force, hold the most it can cost, and — when the
//! response has ended — settle the real cost from the metered usage.

use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use memchr::memmem::Finder;
use rust_decimal::Decimal;
use serde_json::value::RawValue;
use serde_json::Value;

use super::context::Outcome;
use super::error::{clipped, ProxyError};
use super::headers::X_API_KEY;
use super::json_members::Members;
use super::model_fields::ModelFields;
use super::{audio, server_context};
use crate::clock::Clock;
use crate::cluster::ClusterHold;
use crate::config::{Flavour, RouteLimits};
use crate::ledger::entity::KeyHash;
use crate::ledger::entry::{SettleDetails, Usage};
use crate::ledger::ids::{Owner, RequestId};
use crate::ledger::{Hold, Ledger, ResolvedKey, SettleError};
use crate::meter::{HostedTool, Meter, Reported, ServiceTier};
use crate::pricing::{
    customer_price, HoldRequest, Markup, ModelPrice, Multipliers, PriceTable, TokenUsage, ToolPrice,
};

/// Header an application uses to name its end user (recorded, for reports).
pub static END_USER: HeaderName = HeaderName::from_static("x-creditgate-end-user");
/// The output cap per choice the gateway sent upstream (and held for).
pub static OUTPUT_CAP: HeaderName = HeaderName::from_static("x-creditgate-max-output-tokens");
/// Available balance of the paying wallet after the hold.
pub static AVAILABLE: HeaderName = HeaderName::from_static("x-creditgate-available");
/// Longest end-user id kept; longer ones are refused.
const MAX_END_USER_LEN: usize = 128;
/// Input tokens estimated per request byte when a stream is cut short before
/// the upstream reported its input (one token per four bytes, as for English).
const REQUEST_BYTES_PER_TOKEN: u64 = 4;

/// What is being bought.
#[derive(Debug, Clone)]
pub enum Priced {
    /// `web_search_preview`: the request enabled OpenAI's web search
    /// preview, whose calls are priced apart ([`HostedTool::price_name`]).
    Model {
        name: Arc<str>,
        price: ModelPrice,
        flavour: Flavour,
        web_search_preview: bool,
        /// The request may have asked for hour-long cache writes: writes
        /// the usage does not split by lifetime are charged as those.
        cache_longer_lifetime: bool,
        /// The service tier the request asked for (`price` is in it).
        requested_tier: ServiceTier,
        /// Output tokens the hold allowed for: the cap sent, times the choices.
        held_output_tokens: u64,
        /// Hosted tool calls the hold allowed for, all the bounds sent
        /// upstream together (`None`: the request enabled none).
        hosted_calls_held: Option<u64>,
        /// The model may bill reasoning it does not stream (the table marks
        /// it `hidden_reasoning`, or the request asks for reasoning).
        reasons_unseen: bool,
    },
    Tool {
        name: Arc<str>,
        price: ToolPrice,
        units_header: Option<HeaderName>,
    },
}

impl Priced {
    /// The model or tool name as the request gave it.
    pub fn name(&self) -> &str {
        match self {
            Priced::Model { name, .. } | Priced::Tool { name, .. } => name,
        }
    }
}

/// A request's reservation: on this node's ledger, or (cluster mode) in
/// the replica's view and under a lease.
#[derive(Debug)]
pub enum Reservation {
    Local(Hold),
    Leased(ClusterHold),
}

impl Reservation {
    /// The amount held.
    pub fn amount(&self) -> Decimal {
        match self {
            Reservation::Local(hold) => hold.amount(),
            Reservation::Leased(hold) => hold.amount(),
        }
    }

    /// Debits `cost` and releases the rest; returns the amount debited.
    pub fn settle(
        self,
        cost: Decimal,
        details: SettleDetails,
        now: DateTime<Utc>,
    ) -> Result<Decimal, SettleError> {
        match self {
            Reservation::Local(hold) => hold.settle(cost, details, now).map(|settlement| settlement.debited),
            Reservation::Leased(hold) => Ok(hold.settle(cost, details, now)),
        }
    }

    /// Ends the hold without a debit.
    pub fn release(self, now: DateTime<Utc>) -> Decimal {
        match self {
            Reservation::Local(hold) => hold.release(now),
            Reservation::Leased(hold) => hold.release(now),
        }
    }
}

/// A request's money state, from identify to settle.
pub struct Charge {
    pub key: ResolvedKey,
    pub end_user: Option<Arc<str>>,
    pub request_id: RequestId,
    pub route: Arc<str>,
    pub table: Arc<PriceTable>,
    /// When the call was priced and held: every part of it is charged at
    /// the prices in force then, hosted tool calls included.
    pub priced_at: DateTime<Utc>,
    pub priced: Option<Priced>,
    /// Input an estimate charges when the upstream reports none (see
    /// [`estimated_input_tokens`]); `None`: a call cut short is charged its
    /// hold, never an estimate (tools, and calls that may run the upstream's
    /// hosted tools, whose calls before the cut are billed but not all seen).
    pub estimated_input_tokens: Option<u64>,
    /// The route's bounds (usage ceiling) for the settle.
    pub limits: RouteLimits,
    /// The output cap per choice sent upstream (model routes).
    pub output_cap: Option<u64>,
    pub hold: Option<Reservation>,
    /// What the hold is at the operator's cost (the hold itself is the
    /// customer's price): recorded as the cost when the hold is charged.
    pub held_cost: Decimal,
    pub meter: Option<Meter>,
    /// The gateway added `stream_options.include_usage`; remove what it adds.
    pub injected_usage: bool,
    pub upstream_status: Option<StatusCode>,
    pub tool_units: Option<u64>,
    /// The call was handed to the upstream, which bills it whether or not
    /// anyone reads the answer: dropped unsettled, it is charged its hold.
    pub sent: bool,
    /// For ending the hold if the request is dropped before it settles.
    pub clock: Arc<dyn Clock>,
}

impl Drop for Charge {
    /// A request dropped before it was sent (the client went away while its
    /// body was read) releases its hold at once instead of leaving it to the
    /// TTL. Every way a sent call ends settles it (a client that leaves is
    /// read on for, see `read_on`), so one dropped unsettled after it was
    /// sent was cut off by a panic (in a read-on task, or in the settle
    /// itself): the upstream may bill it all, and unless its answer was an
    /// error (which bills nothing) it is charged its hold, never made free.
    /// After a settle no hold is left.
    fn drop(&mut self) {
        if self.hold.is_none() {
            return;
        }
        let now = self.clock.now();
        // What the settle would do when nothing is known of the answer.
        if !self.sent || self.priced.is_none() || self.upstream_bills_nothing(Outcome::NoAnswer) {
            return self.release_hold(now);
        }
        let (Some(hold), Some(priced)) = (self.hold.take(), self.priced.as_ref()) else { return };
        let amount = hold.amount();
        let details = SettleDetails {
            route: self.route.clone(),
            model: Arc::from(priced.name()),
            usage: Usage::default(),
            price_version: self.table.version_text(),
            operator_cost: Some(self.held_cost),
        };
        let request_id = self.request_id;
        match hold.settle(amount, details, now) {
            Ok(debited) => tracing::error!(
                %request_id, %debited,
                "a call sent upstream was dropped before its settle: charged its hold"
            ),
            Err(error) => tracing::error!(
                %request_id, %error,
                "a call sent upstream was dropped before its settle, and charging its hold failed"
            ),
        }
    }
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Charge")
            .field("key", &self.key.key)
            .field("request_id", &self.request_id)
            .field("held", &self.hold.as_ref().map(Reservation::amount))
            .finish()
    }
}

/// Phase `identify`: the API key from `Authorization: Bearer` or `x-api-key`,
/// looked up by its SHA-256. Comparing digests leaks nothing about the secret.
pub fn identify(ledger: &Ledger, headers: &HeaderMap) -> Result<(ResolvedKey, Option<Arc<str>>), ProxyError> {
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .or_else(|| headers.get(&X_API_KEY).and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or(ProxyError::MissingKey)?;
    let key = ledger.resolve_key(&KeyHash::of_secret(secret)).ok_or(ProxyError::InvalidKey)?;
    let end_user = match headers.get(&END_USER) {
        None => None,
        Some(value) => {
            // Visible ASCII, and spaces only between characters: a tab or
            // an edge space makes an id that reads as another in a report.
            let visible = |t: &str| {
                t.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
                    && !t.starts_with(' ')
                    && !t.ends_with(' ')
            };
            let text =
                value.to_str().ok().filter(|t| !t.is_empty() && t.len() <= MAX_END_USER_LEN && visible(t));
            let text = text.ok_or(ProxyError::InvalidField {
                field: "x-creditgate-end-user",
                reason: format!(
                    "must be 1 to {MAX_END_USER_LEN} visible ASCII characters (spaces only between them)"
                ),
            })?;
            // End users are an application's customers; a user's spend is its own.
            if let Owner::User(_) = key.owner {
                return Err(ProxyError::InvalidField {
                    field: "x-creditgate-end-user",
                    reason: "names an application's end user; send it with an application's key".into(),
                });
            }
            Some(Arc::from(text))
        }
    };
    Ok((key, end_user))
}

/// Responses API tool types that bill only tokens: the client runs them
/// (functions, custom tools, local shell, patches, computer use) or the
/// upstream calls out for them at no fee of its own (remote MCP servers).
/// Types the upstream runs for a fee are [`HostedTool`]s; any other type is
/// refused.
const RESPONSES_TOKEN_TOOLS: [&str; 8] = [
    "function",
    "custom",
    "local_shell",
    "apply_patch",
    "computer_use_preview",
    "computer_use",
    "computer",
    "mcp",
];

/// Tokens beyond twice the output a hold allowed for before a stream's
/// delivered text counts as past its cap (see `Charge::model_cost`).
const RAN_PAST_CAP_SLACK_TOKENS: u64 = 256;

/// Cloudflare's "a timeout occurred": the origin took the call and had not
/// answered when the edge gave up. The call runs on, and is billed.
const ORIGIN_TIMED_OUT: u16 = 524;

/// Chat Completions tool types that bill only tokens: the client runs them.
/// Any other type is one an OpenAI-compatible upstream runs itself, for a
/// fee of its own (Groq's `browser_search` and `code_interpreter`), and is
/// refused.
const CHAT_TOKEN_TOOLS: [&str; 2] = ["function", "custom"];

/// Input a request's tools make the upstream bill beyond the body's bytes,
/// which bound everything else it sends: Anthropic's tool-use system prompt
/// (at most 530 tokens over its models) whenever tools are given, and the
/// built-in client tools' own definitions and prompts (Claude 4: bash 245,
/// the text editor 700, computer use 735 plus 499 of system prompt; matched
/// by type prefix, every version). Rounded up: a hold too large is given
/// back at the settle, one too small overdraws the wallet.
const TOOL_USE_PROMPT_TOKENS: u64 = 600;
const BUILT_IN_TOOL_TOKENS: [(&str, u64); 3] = [("bash_", 300), ("text_editor_", 800), ("computer_", 1_300)];

/// Most choices one request may ask for (`n`, `best_of`); OpenAI's own bound.
pub const MAX_CHOICES: u64 = 128;

/// What the price phase learned from a model request body.
pub struct ModelRequest {
    pub model: String,
    /// The output cap per choice the request names, in a field its API reads.
    pub max_output_tokens: Option<u64>,
    /// Choices the upstream generates (`n`, `best_of`), each billed for its output.
    pub choices: u64,
    pub stream: bool,
    pub include_usage: bool,
    /// The request makes the upstream read input it does not carry itself
    /// (`previous_response_id`, `conversation`, file ids, URLs, hosted
    /// tools): the first such marker found.
    pub server_context: Option<&'static str>,
    /// A service tier other than the default (`priority`, `flex`, ...),
    /// priced by the tier's multipliers or refused.
    pub service_tier: Option<String>,
    /// Tools the upstream runs and bills per call (Responses API).
    pub hosted_tools: Vec<HostedTool>,
    /// One of them is OpenAI's web search preview, priced apart.
    pub web_search_preview: bool,
    /// The hosted tool calls the request's own bounds allow: its
    /// `max_tool_calls` (OpenAI: one bound over every tool), or the sum of
    /// its web search tools' `max_uses` (Anthropic: one bound per tool).
    pub max_tool_calls: Option<u64>,
    /// Bounds the request leaves unset, each to be sent as the route's: one
    /// when a Responses request names no `max_tool_calls`, one per
    /// Anthropic web search tool without `max_uses`.
    pub unbounded_tools: u64,
    /// The request marks cache breakpoints (`cache_control`): the upstream
    /// may bill cache writes, which need their own prices.
    pub cache_breakpoints: bool,
    /// A breakpoint may ask for a lifetime longer than five minutes.
    pub cache_longer_lifetime: bool,
    /// The request asks the model to reason (`thinking`, `reasoning`,
    /// `reasoning_effort`): reasoning billed in full and streamed at most
    /// as a summary.
    pub asks_reasoning: bool,
    /// Input tokens its tools add that its bytes do not carry
    /// ([`TOOL_USE_PROMPT_TOKENS`], [`BUILT_IN_TOOL_TOKENS`]).
    pub tool_prompt_tokens: u64,
}

/// The output-cap field each API reads; a cap in any other field would be
/// ignored by the upstream, so it is refused rather than believed.
pub fn cap_field(flavour: Flavour) -> Option<&'static str> {
    match flavour {
        Flavour::OpenaiChat => Some("max_completion_tokens"),
        Flavour::OpenaiResponses => Some("max_output_tokens"),
        Flavour::AnthropicMessages => Some("max_tokens"),
        Flavour::OpenaiEmbeddings => None,
    }
}

/// Read `model`, the output cap, the choice count and the stream flags from a
/// JSON object body.
pub fn read_model_request(body: &[u8], flavour: Flavour) -> Result<ModelRequest, ProxyError> {
    read_model_request_for(body, flavour, cap_field(flavour))
}

/// [`read_model_request`] for an upstream that reads its output cap in
/// `cap_field` (named in what is refused).
pub fn read_model_request_for(
    body: &[u8],
    flavour: Flavour,
    cap_field: Option<&'static str>,
) -> Result<ModelRequest, ProxyError> {
    // serde's derive also reads a JSON array into a struct, by position.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ProxyError::InvalidJson { reason: "the body must be a JSON object".into() });
    }
    // Skipped members are not checked for UTF-8 by the parser; JSON must be.
    // (Checked whole, the parser need not check each key it reads again.)
    let Ok(text) = std::str::from_utf8(body) else {
        return Err(ProxyError::InvalidJson { reason: "the body is not UTF-8".into() });
    };
    let fields: ModelFields =
        serde_json::from_str(text).map_err(|e| ProxyError::InvalidJson { reason: e.to_string() })?;
    let model = match fields.model {
        Some(Value::String(model)) if !model.is_empty() => model,
        Some(_) => {
            return Err(ProxyError::InvalidField {
                field: "model",
                reason: "must be a non-empty string".into(),
            })
        }
        None => return Err(ProxyError::MissingModel),
    };
    let caps = [
        ("max_tokens", count(fields.max_tokens, "max_tokens")?),
        ("max_completion_tokens", count(fields.max_completion_tokens, "max_completion_tokens")?),
        ("max_output_tokens", count(fields.max_output_tokens, "max_output_tokens")?),
    ];
    let max_output_tokens = output_cap(flavour, &caps, cap_field)?;
    let other_caps = [
        ("n_predict", fields.n_predict.is_some()),
        ("num_predict", fields.num_predict.is_some()),
        ("max_new_tokens", fields.max_new_tokens.is_some()),
        ("options", fields.options.is_some()),
    ];
    if let Some((field, _)) = other_caps.into_iter().find(|(_, set)| *set) {
        return Err(ProxyError::InvalidField {
            field,
            reason: format!(
                "is an output cap (or holds one) some servers read in place of the API's own, past the one the gateway holds for; use `{}`",
                cap_field.unwrap_or("max_tokens")
            ),
        });
    }
    let mut choices = 1;
    for (field, value) in [("n", fields.n), ("best_of", fields.best_of)] {
        if let Some(n) = count(value, field)? {
            if n == 0 || n > MAX_CHOICES {
                return Err(ProxyError::InvalidField {
                    field,
                    reason: format!("must be a whole number from 1 to {MAX_CHOICES}"),
                });
            }
            choices = choices.max(n);
        }
    }
    let stream = match fields.stream {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => {
            return Err(ProxyError::InvalidField { field: "stream", reason: "must be true or false".into() })
        }
    };
    // A background response runs on after the connection ends and is billed
    // then, where no meter reads it (a stream cut while it reasons would be
    // charged what it had sent).
    match fields.background {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => return Err(ProxyError::BackgroundRefused),
        Some(_) => {
            return Err(ProxyError::InvalidField {
                field: "background",
                reason: "must be true or false".into(),
            })
        }
    }
    if flavour != Flavour::OpenaiEmbeddings {
        let is_audio = |modality: &Value| modality.as_str().is_some_and(|m| m.eq_ignore_ascii_case("audio"));
        let audio_out = match &fields.modalities {
            Some(Value::Array(modalities)) => modalities.iter().any(is_audio),
            Some(modality) => is_audio(modality),
            None => false,
        };
        if audio_out {
            return Err(ProxyError::AudioRefused { marker: "modalities" });
        }
        if fields.audio.as_ref().is_some_and(|audio| !audio.is_null()) {
            return Err(ProxyError::AudioRefused { marker: "audio" });
        }
        if fields.messages.as_ref().is_some_and(|messages| messages.0) {
            return Err(ProxyError::AudioRefused { marker: "messages[].audio" });
        }
        if audio::has_input_audio(body) {
            return Err(ProxyError::AudioRefused { marker: "input_audio" });
        }
    }
    let other_than = |value: &Option<Value>, default: &str| {
        value.as_ref().is_some_and(|value| !value.is_null() && value.as_str() != Some(default))
    };
    let unpriced = [
        ("speed", other_than(&fields.speed, "standard")),
        ("inference_geo", other_than(&fields.inference_geo, "global")),
        ("models", fields.models.is_some()),
        ("plugins", fields.plugins.is_some()),
        ("provider", fields.provider.is_some()),
        // Chat-side web search: OpenAI's search models and xAI's Live
        // Search bill per search or per source, a fee the table does not state.
        ("web_search_options", fields.web_search_options.as_ref().is_some_and(|v| !v.is_null())),
        ("search_parameters", fields.search_parameters.as_ref().is_some_and(|v| !v.is_null())),
        ("data_sources", fields.data_sources.is_some()),
        ("compound_custom", fields.compound_custom.is_some()),
        ("search_settings", fields.search_settings.is_some()),
        ("compaction", fields.compaction.is_some()),
        ("fallbacks", fields.fallbacks.is_some()),
        ("context_window_fallback_dict", fields.context_window_fallback_dict.is_some()),
        ("mock_testing_fallbacks", fields.mock_testing_fallbacks.is_some()),
        ("user_config", fields.user_config.is_some()),
        ("preset", fields.preset.is_some()),
    ];
    if let Some((field, _)) = unpriced.into_iter().find(|(_, set)| *set) {
        return Err(ProxyError::UnpricedOption { field });
    }
    let include_usage = fields
        .stream_options
        .as_ref()
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let server_context = match flavour {
        // Embeddings read only the text they are sent (and their
        // `"encoding_format": "base64"` is no media).
        Flavour::OpenaiEmbeddings => None,
        _ => server_context::marker(body),
    };
    // `auto` runs on the project's default tier, which the operator chose
    // (the response says which tier served the call, and settles at its
    // prices: see `Charge::price_as_served`); Anthropic's `standard_only` is
    // the standard tier.
    let service_tier = match fields.service_tier {
        None | Some(Value::Null) => None,
        Some(Value::String(tier)) if ServiceTier::from_name(&tier) == ServiceTier::Default => None,
        Some(Value::String(tier)) if !tier.is_empty() && tier.len() <= 64 => Some(tier),
        Some(_) => {
            return Err(ProxyError::InvalidField {
                field: "service_tier",
                reason: "must be a tier name such as \"default\" or \"priority\"".into(),
            })
        }
    };
    let mut hosted_tools: Vec<HostedTool> = Vec::new();
    let mut web_search_preview = false;
    // Anthropic reads no top-level bound: one would have been held for and
    // sent as the tools' `max_uses`, which the upstream obeys, while the
    // upstream ignored it.
    if flavour == Flavour::AnthropicMessages && fields.max_tool_calls.is_some() {
        return Err(ProxyError::InvalidField {
            field: "max_tool_calls",
            reason: "is not read by this API; bound each web search tool with `max_uses`".into(),
        });
    }
    let mut max_tool_calls = count(fields.max_tool_calls, "max_tool_calls")?;
    let mut unbounded_tools = 0u64;
    let mut tool_prompt_tokens = match &fields.tools {
        Some(tools) if !tools.is_empty() && flavour != Flavour::OpenaiEmbeddings => TOOL_USE_PROMPT_TOKENS,
        _ => 0,
    };
    let recognise = match flavour {
        Flavour::OpenaiResponses => HostedTool::from_request_type,
        Flavour::AnthropicMessages => HostedTool::from_anthropic_type,
        _ => |_: &str| None,
    };
    for tool in fields.tools.into_iter().flatten() {
        let built_in = tool.kind.as_deref().and_then(|kind| {
            BUILT_IN_TOOL_TOKENS
                .iter()
                .find(|(prefix, _)| kind.starts_with(prefix))
                .map(|(_, tokens)| *tokens)
        });
        tool_prompt_tokens = tool_prompt_tokens.saturating_add(built_in.unwrap_or(0));
        // Anthropic bills code execution by container time, which no
        // response reports: it cannot be metered, so it is not served.
        if flavour == Flavour::AnthropicMessages
            && tool.kind.as_deref().is_some_and(|kind| kind.starts_with("code_execution"))
        {
            return Err(ProxyError::UnmeteredHostedTool { tool: "code_execution" });
        }
        let Some(hosted) = tool.kind.as_deref().and_then(recognise) else {
            // A Responses tool the upstream runs and the gateway does not
            // know (`shell`, whose containers bill by size and time, or
            // one added later) would be served with its fees unmetered.
            let billed_by_the_upstream = |kind: &str| match flavour {
                Flavour::OpenaiResponses => !RESPONSES_TOKEN_TOOLS.contains(&kind),
                Flavour::OpenaiChat => !CHAT_TOKEN_TOOLS.contains(&kind),
                _ => false,
            };
            match tool.kind {
                Some(kind) if billed_by_the_upstream(&kind) => {
                    return Err(ProxyError::UnknownHostedTool { tool: kind.chars().take(64).collect() })
                }
                _ => continue,
            }
        };
        // A code interpreter container's session is billed by its memory
        // size (1 GB the default); the table prices one size per call.
        if hosted == HostedTool::CodeInterpreter {
            let memory = tool.container.as_ref().and_then(|container| container.get("memory_limit"));
            if memory.is_some_and(|memory| !memory.is_null() && memory.as_str() != Some("1g")) {
                return Err(ProxyError::UnpricedOption { field: "memory_limit" });
            }
        }
        if flavour == Flavour::OpenaiResponses {
            web_search_preview |=
                tool.kind.as_deref().is_some_and(|kind| kind.starts_with("web_search_preview"));
        }
        if !hosted_tools.contains(&hosted) {
            hosted_tools.push(hosted);
        }
        if hosted == HostedTool::AnthropicWebSearch {
            match count(tool.max_uses, "max_uses")? {
                Some(uses) => max_tool_calls = Some(max_tool_calls.unwrap_or(0).saturating_add(uses)),
                None => unbounded_tools += 1,
            }
        }
    }
    if flavour != Flavour::AnthropicMessages && !hosted_tools.is_empty() && max_tool_calls.is_none() {
        unbounded_tools = 1;
    }
    let cache_breakpoints =
        flavour != Flavour::OpenaiEmbeddings && super::cache_marks::marks_cache_breakpoints(body);
    Ok(ModelRequest {
        model,
        max_output_tokens,
        choices,
        stream,
        include_usage,
        server_context,
        service_tier,
        hosted_tools,
        web_search_preview,
        max_tool_calls,
        unbounded_tools,
        cache_breakpoints,
        cache_longer_lifetime: cache_breakpoints && super::cache_marks::asks_longer_cache_lifetime(body),
        asks_reasoning: asks_reasoning(fields.thinking, fields.reasoning, fields.reasoning_effort),
        tool_prompt_tokens,
    })
}

/// Whether a request's reasoning options ask for reasoning: anything set but
/// Anthropic's `{"type": "disabled"}`, OpenRouter's `{"enabled": false}` or
/// an effort of `"none"`.
fn asks_reasoning(thinking: Option<Value>, reasoning: Option<Value>, effort: Option<Value>) -> bool {
    let off = |value: &Value| match value {
        Value::Null => true,
        Value::Bool(on) => !on,
        Value::String(effort) => effort.eq_ignore_ascii_case("none"),
        Value::Object(object) => {
            object.get("type").and_then(Value::as_str) == Some("disabled")
                || object.get("enabled") == Some(&Value::Bool(false))
                || object
                    .get("effort")
                    .and_then(Value::as_str)
                    .is_some_and(|e| e.eq_ignore_ascii_case("none"))
        }
        _ => false,
    };
    [thinking, reasoning, effort].iter().flatten().any(|value| !off(value))
}

/// Azure-style upstreams (`/openai/deployments/{name}/chat/completions`)
/// serve the deployment the path names and ignore the body's `model`, which
/// is what the gateway prices and checks against the key's scope: the two
/// must name the same thing (Azure's own clients send both), or a call to
/// a dear deployment would be priced as a cheap model. So do OpenAI's legacy
/// engine paths, which LiteLLM's proxy still serves
/// (`/engines/{name}/chat/completions`). `base` is the upstream's base path,
/// which the request path is appended to, so the name may come from either.
pub fn check_deployment(base: &str, path: &str, model: &str) -> Result<(), ProxyError> {
    // Most paths name no deployment: a search for the words, in any case,
    // spares them the split (a segment never spans the two).
    if !names_deployments(base) && !names_deployments(path) {
        return Ok(());
    }
    // `;` parameters cut, as a server matching paths loosely reads them.
    let mut segments = base
        .split('/')
        .chain(path.split('/'))
        .map(|segment| segment.split(';').next().unwrap_or(""))
        .filter(|segment| !segment.is_empty());
    let mut previous = "";
    while let Some(segment) = segments.next() {
        let names = (previous.eq_ignore_ascii_case("openai") && segment.eq_ignore_ascii_case("deployments"))
            || segment.eq_ignore_ascii_case("engines");
        previous = segment;
        if !names {
            continue;
        }
        let Some(deployment) = segments.next() else { break };
        previous = deployment;
        if !deployment.eq_ignore_ascii_case(model) {
            return Err(ProxyError::InvalidField {
                field: "model",
                reason: format!(
                    "must name the deployment in the path (`{}`): the upstream serves that deployment, \
                     whatever the body's model",
                    deployment.chars().take(128).collect::<String>()
                ),
            });
        }
    }
    Ok(())
}

/// A metered call's query string may carry only the parameters its
/// upstream lists (`model_query_params`): upstreams read some of theirs from
/// the query (LiteLLM's proxy takes `?model=` over the body's `model`),
/// which the gateway neither reads nor prices. Names are compared decoded,
/// as the upstream reads them, and `;` separates as `&` does (older Python
/// servers split on both). An API's own parameters that name no model pass
/// too ([`query_params_of`]).
pub fn check_query(query: &str, allowed: &[String], flavour: Flavour) -> Result<(), ProxyError> {
    let own = query_params_of(flavour);
    for part in query.split(';') {
        for (name, _) in form_urlencoded::parse(part.as_bytes()) {
            let listed = allowed.iter().any(|allowed| **allowed == *name) || own.contains(&&*name);
            if !name.is_empty() && !listed {
                return Err(ProxyError::QueryParamRefused { name: name.chars().take(64).collect() });
            }
        }
    }
    Ok(())
}

/// Query parameters an API's own clients send on its create calls: the
/// Anthropic SDKs send beta calls as `POST /v1/messages?beta=true`.
fn query_params_of(flavour: Flavour) -> &'static [&'static str] {
    match flavour {
        Flavour::AnthropicMessages => &["beta"],
        _ => &[],
    }
}

/// A model request's body is read as JSON: sent as anything else (a form),
/// an upstream that picks its parser by `content-type` (one-api-style
/// aggregators) could read another document from the same bytes. Absent is
/// taken as JSON; `application/json` and `+json` types, with parameters, pass,
/// once.
pub fn check_content_type(headers: &http::HeaderMap) -> Result<(), ProxyError> {
    let mut values = headers.get_all(http::header::CONTENT_TYPE).iter();
    let Some(value) = values.next() else { return Ok(()) };
    // Compared as bytes, in place: on every model request.
    let bytes = value.as_bytes();
    let media_type = bytes.split(|b| *b == b';').next().unwrap_or_default().trim_ascii();
    let json = media_type.eq_ignore_ascii_case(b"application/json")
        || (media_type.len() > b"application/+json".len()
            && media_type[..b"application/".len()].eq_ignore_ascii_case(b"application/")
            && media_type[media_type.len() - b"+json".len()..].eq_ignore_ascii_case(b"+json"));
    if json && values.next().is_none() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(bytes);
    Err(ProxyError::UnsupportedContentType { content_type: text.chars().take(64).collect() })
}

/// Whether `text` holds `deployments` or `engines`, in any case. (Two
/// memchr searches cost 317 instructions on a chat path; a split into
/// segments cost 1,097.)
fn names_deployments(text: &str) -> bool {
    let bytes = text.as_bytes();
    let holds =
        |word: &[u8], at: usize| bytes.get(at..at + word.len()).is_some_and(|w| w.eq_ignore_ascii_case(word));
    memchr::memchr2_iter(b'd', b'D', bytes).any(|at| holds(b"deployments", at))
        || memchr::memchr2_iter(b'e', b'E', bytes).any(|at| holds(b"engines", at))
}

/// A whole number of tokens or choices, 0 or more; `null` counts as absent.
fn count(value: Option<Value>, field: &'static str) -> Result<Option<u64>, ProxyError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| ProxyError::InvalidField {
            field,
            reason: "must be a whole number, 0 or more".into(),
        }),
    }
}

/// The cap the upstream will enforce. Chat reads `max_tokens` (older
/// models) and `max_completion_tokens`; both given must agree. A cap field
/// the API does not read is refused: the upstream would ignore it.
fn output_cap(
    flavour: Flavour,
    caps: &[(&'static str, Option<u64>)],
    upstream_field: Option<&'static str>,
) -> Result<Option<u64>, ProxyError> {
    // OpenAI's chat reads `max_tokens` too; an upstream set to read
    // `max_tokens` (Ollama, llama.cpp) reads only that.
    let read_by_api = |field: &str| match flavour {
        Flavour::OpenaiChat if upstream_field == Some("max_tokens") => field == "max_tokens",
        Flavour::OpenaiChat => field == "max_tokens" || field == "max_completion_tokens",
        Flavour::OpenaiEmbeddings => false,
        _ => cap_field(flavour) == Some(field),
    };
    let mut cap = None;
    for &(field, value) in caps {
        let Some(value) = value else { continue };
        if flavour == Flavour::OpenaiEmbeddings {
            continue;
        }
        if !read_by_api(field) {
            return Err(ProxyError::InvalidField {
                field,
                reason: format!(
                    "is not read by this route's upstream, so it would not cap the output; use `{}`",
                    upstream_field.unwrap_or("max_tokens")
                ),
            });
        }
        match cap {
            Some(earlier) if earlier != value => {
                return Err(ProxyError::InvalidField {
                    field,
                    reason: "conflicts with another output cap in the request; give one".into(),
                })
            }
            _ => cap = Some(value),
        }
    }
    Ok(cap)
}

/// Searchers built once (building one costs more than searching a body).
static STREAM_OPTIONS: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"stream_options\""));
pub(super) static UNICODE_ESCAPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\\u"));
/// What the gateway changes in a model request body before it goes upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BodyEdits {
    /// Set this output cap field (the request named none, or the gateway
    /// lowered it to what the wallet can pay).
    pub cap: Option<(&'static str, u64)>,
    /// Set `max_tool_calls` (hosted tools enabled, no bound named).
    pub max_tool_calls: Option<u64>,
    /// Set `max_uses` on Anthropic web search tools that name none.
    pub anthropic_max_uses: Option<u64>,
    /// Add `stream_options.include_usage = true`.
    pub include_usage: bool,
}

/// The body with `stream_options.include_usage = true` added, so the stream
/// reports its usage; `None` if the body is not a JSON object.
pub fn with_include_usage(body: &[u8]) -> Option<Bytes> {
    edited_body(body, BodyEdits { include_usage: true, ..BodyEdits::default() })
}

/// The body with `edits` applied; `None` if the body is not a JSON object.
pub fn edited_body(body: &[u8], edits: BodyEdits) -> Option<Bytes> {
    // Most bodies name neither field: splice them in after the opening brace
    // instead of rebuilding the document. A body that mentions a name
    // anywhere, or spells any key with \u escapes, takes the general path
    // so no field can appear twice.
    let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
    let named = |field: &str| memchr::memmem::find(body, format!("\"{field}\"").as_bytes()).is_some();
    let cap_named = edits.cap.is_some_and(|(field, _)| named(field))
        || (edits.max_tool_calls.is_some() && named("max_tool_calls"));
    let options_named = edits.include_usage && STREAM_OPTIONS.find(body).is_some();
    let nested = edits.anthropic_max_uses.is_some();
    if body[start] == b'{' && !cap_named && !options_named && !nested && UNICODE_ESCAPE.find(body).is_none() {
        let rest = &body[start + 1..];
        let mut spliced = Vec::with_capacity(body.len() + 64);
        spliced.push(b'{');
        if edits.include_usage {
            spliced.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
        }
        if let Some((field, cap)) = edits.cap {
            spliced.extend_from_slice(format!("\"{field}\":{cap},").as_bytes());
        }
        if let Some(calls) = edits.max_tool_calls {
            spliced.extend_from_slice(format!("\"max_tool_calls\":{calls},").as_bytes());
        }
        if rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}') {
            spliced.pop();
        }
        spliced.extend_from_slice(rest);
        return Some(Bytes::from(spliced));
    }
    // Edited member by member: what is not edited goes as it was written,
    // in its order (see `json_members`).
    let mut object = Members::of(std::str::from_utf8(body).ok()?)?;
    if let Some((field, cap)) = edits.cap {
        object.set_to(field, &cap)?;
    }
    if let Some(calls) = edits.max_tool_calls {
        object.set_to("max_tool_calls", &calls)?;
    }
    if let Some(uses) = edits.anthropic_max_uses {
        if let Some(tools) =
            object.get("tools").and_then(|tools| serde_json::from_str::<Vec<&RawValue>>(tools.get()).ok())
        {
            let mut bounded: Vec<Box<RawValue>> = Vec::with_capacity(tools.len());
            for tool in tools {
                bounded.push(with_max_uses(tool, uses)?);
            }
            object.set_to("tools", &bounded)?;
        }
    }
    if edits.include_usage {
        // Absent or `null` (which OpenAI reads as absent): a new object.
        let mut options = match object.get("stream_options").map(RawValue::get) {
            None | Some("null") => Members::of("{}")?,
            Some(options) => Members::of(options)?,
        };
        options.set_to("include_usage", &true)?;
        object.set("stream_options", options.to_raw()?);
    }
    serde_json::to_vec(&object).ok().map(Bytes::from)
}

/// An Anthropic tool with `max_uses` set to `uses` when it is a web search
/// that names none (`null` is no bound to the upstream, so it is replaced
/// too); any other tool as it was written.
fn with_max_uses(tool: &RawValue, uses: u64) -> Option<Box<RawValue>> {
    let Some(mut members) = Members::of(tool.get()) else {
        return Some(tool.to_owned());
    };
    let kind = members.get("type").and_then(|kind| serde_json::from_str::<String>(kind.get()).ok());
    let searches = kind.is_some_and(|kind| kind.starts_with("web_search_"));
    if !searches || members.get("max_uses").is_some_and(|bound| bound.get() != "null") {
        return Some(tool.to_owned());
    }
    members.set_to("max_uses", &uses)?;
    members.to_raw()
}

/// The output a model request is held for, and the cap that goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputPlan {
    /// Output cap per choice sent upstream; `None` for APIs without output.
    pub cap: Option<u64>,
    /// The request named its cap itself (the gateway never lowers it then).
    pub named: bool,
    pub choices: u64,
    /// Input tokens held beyond the request's bytes for context the upstream
    /// reads itself (the route's context budget).
    pub context_tokens: u64,
    /// Held for the hosted tool calls the request may make (customer price).
    pub hosted_fee: Decimal,
    /// `hosted_fee` at the operator's cost.
    pub hosted_cost: Decimal,
}

impl OutputPlan {
    /// The cap the request named, or the price table's default.
    pub fn new(fields: &ModelRequest, flavour: Flavour, price: &ModelPrice, context_tokens: u64) -> Self {
        let cap =
            cap_field(flavour).map(|_| fields.max_output_tokens.unwrap_or(price.default_max_output_tokens()));
        OutputPlan {
            cap,
            named: fields.max_output_tokens.is_some(),
            choices: fields.choices,
            context_tokens,
            hosted_fee: Decimal::ZERO,
            hosted_cost: Decimal::ZERO,
        }
    }

    fn hold_request(&self, request_bytes: u64, cap: Option<u64>) -> Option<HoldRequest> {
        let output = match cap {
            Some(cap) => Some(cap.checked_mul(self.choices)?),
            None => None,
        };
        Some(HoldRequest {
            input_bytes: request_bytes.checked_add(self.context_tokens)?,
            max_output_tokens: output,
        })
    }

    /// For a request that named no cap: the largest cap from `min_cap` up to
    /// the planned one whose hold fits in `available`.
    pub fn affordable(
        &self,
        price: &ModelPrice,
        request_bytes: u64,
        available: Decimal,
        min_cap: u64,
    ) -> Option<Self> {
        let planned = self.cap?;
        if self.named || min_cap >= planned {
            return None;
        }
        let fits = |cap: u64| {
            self.hold_request(request_bytes, Some(cap))
                .and_then(|request| price.hold_amount(&request).ok())
                .is_some_and(|hold| hold + self.hosted_fee <= available)
        };
        if !fits(min_cap) {
            return None;
        }
        // The hold grows with the cap: find the last cap that fits.
        let (mut low, mut high) = (min_cap, planned);
        while high - low > 1 {
            let middle = low + (high - low) / 2;
            if fits(middle) {
                low = middle;
            } else {
                high = middle;
            }
        }
        Some(OutputPlan { cap: Some(low), ..*self })
    }
}

/// The operator's cost of what a model request is held for (`plan` as
/// held); `None` only if it cannot be represented.
pub fn model_hold_cost(price: &ModelPrice, request_bytes: u64, plan: &OutputPlan) -> Option<Decimal> {
    plan.hold_request(request_bytes, plan.cap)
        .and_then(|request| price.hold_cost(&request).ok())
        .and_then(|cost| cost.checked_add(plan.hosted_cost))
}

/// Phase `price`: the most a model request can cost the customer.
pub fn model_hold_amount(
    price: &ModelPrice,
    request_bytes: u64,
    plan: &OutputPlan,
) -> Result<Decimal, ProxyError> {
    plan.hold_request(request_bytes, plan.cap)
        .and_then(|request| price.hold_amount(&request).ok())
        .and_then(|hold| hold.checked_add(plan.hosted_fee))
        .ok_or_else(|| ProxyError::InvalidField {
            field: "max_tokens",
            reason: "the request could cost more than the gateway can represent; lower it".into(),
        })
}

/// What a request holds for hosted tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostedHold {
    /// The customer's price: calls × the dearest marked-up per-call price.
    pub fee: Decimal,
    /// The operator's cost: calls × the dearest per-call cost.
    pub cost: Decimal,
    /// The bound to send upstream where the request named none.
    pub calls_to_send: Option<u64>,
    /// The calls held for: all the bounds sent allow.
    pub calls_held: u64,
}

/// Input tokens for a call cut off before its usage: the body at
/// [`REQUEST_BYTES_PER_TOKEN`], plus the context the hold allowed for when the
/// request makes the upstream read input it does not carry (which the
/// upstream bills whether or not it finishes).
pub fn estimated_input_tokens(request_bytes: u64, context_tokens: u64) -> u64 {
    request_bytes.div_ceil(REQUEST_BYTES_PER_TOKEN).saturating_add(context_tokens)
}

/// Phase `price` for the upstream's own tools a Responses request enables:
/// every such tool must be priced (as `[tools."<item type>"]`), and the
/// request is held for `max_tool_calls` calls of the dearest, each tool
/// with its own markup; a request that names no bound is sent with the
/// route's.
pub fn hosted_tools_hold(
    table: &PriceTable,
    fields: &ModelRequest,
    route_calls: u64,
    now: DateTime<Utc>,
) -> Result<HostedHold, ProxyError> {
    if fields.hosted_tools.is_empty() {
        return Ok(HostedHold {
            fee: Decimal::ZERO,
            cost: Decimal::ZERO,
            calls_to_send: None,
            calls_held: 0,
        });
    }
    let (mut dearest_price, mut dearest_cost) = (Decimal::ZERO, Decimal::ZERO);
    for tool in &fields.hosted_tools {
        let name = tool.price_name(fields.web_search_preview);
        let per_call = table
            .tool(name, now)
            .and_then(|price| Some((price.hold_amount(0).ok()?, price.cost(0).ok()?)))
            .ok_or(ProxyError::UnpricedHostedTool { tool: name })?;
        dearest_price = dearest_price.max(per_call.0);
        dearest_cost = dearest_cost.max(per_call.1);
    }
    // The bounds the request set, and the route's for each it left unset.
    let calls =
        fields.max_tool_calls.unwrap_or(0).saturating_add(fields.unbounded_tools.saturating_mul(route_calls));
    let times = |per_call: Decimal| {
        per_call.checked_mul(Decimal::from(calls)).ok_or_else(|| ProxyError::InvalidField {
            field: "max_tool_calls",
            reason: "the request could cost more than the gateway can represent; lower it".into(),
        })
    };
    Ok(HostedHold {
        fee: times(dearest_price)?,
        cost: times(dearest_cost)?,
        calls_to_send: (fields.unbounded_tools > 0).then_some(route_calls),
        calls_held: calls,
    })
}

/// A call's costs, each under its markup: the tokens, then one part per
/// hosted tool. Inline, so a settle allocates nothing for them.
type CostParts = smallvec::SmallVec<[(Decimal, Markup); 1 + HostedTool::ALL.len()]>;

/// What the hosted tool calls a response reports cost the operator (each at
/// its tool's per-call price), one part per tool with the tool's markup,
/// added to `parts`; returns how many calls there were. `None` when a tool
/// the table does not price made calls (the request did not enable it: a
/// stored prompt may carry tools): the call is then charged its hold, as a
/// response the meter cannot price, not those calls at nothing.
fn hosted_calls_cost(
    table: &PriceTable,
    reported: &Reported,
    now: DateTime<Utc>,
    web_search_preview: bool,
    parts: &mut CostParts,
) -> Option<u64> {
    let mut calls = 0u64;
    for (tool, count) in HostedTool::ALL.into_iter().zip(reported.hosted_calls) {
        if count == 0 {
            continue;
        }
        calls += u64::from(count);
        let name = tool.price_name(web_search_preview);
        match table.tool(name, now).and_then(|price| Some((price.cost(0).ok()?, price.markup()))) {
            Some((per_call, markup)) => {
                // A product that does not fit makes the price overflow, so the call is charged its hold.
                let cost = per_call.checked_mul(Decimal::from(count)).unwrap_or(Decimal::MAX);
                parts.push((cost, markup));
            }
            None => {
                tracing::warn!(tool = name, count, "unpriced hosted tool calls reported; charged the hold");
                return None;
            }
        }
    }
    Some(calls)
}

/// `tokens` with input and output at most `ceiling`, the parts of the input
/// (cached reads, cache writes) keeping their shares of what is left of it:
/// cache writes rounded up and cached reads down, the dearer way for each.
fn clipped_to(tokens: TokenUsage, ceiling: u64) -> TokenUsage {
    let input = tokens.input_tokens.min(ceiling);
    let share = |part: u64, round_up: bool| -> u64 {
        if tokens.input_tokens == 0 {
            return 0;
        }
        let (of, whole) = (u128::from(part) * u128::from(input), u128::from(tokens.input_tokens));
        let share = if round_up { of.div_ceil(whole) } else { of / whole };
        u64::try_from(share).unwrap_or(input)
    };
    let cache_write_1h_tokens = share(tokens.cache_write_1h_tokens, true).min(input);
    let cache_write_5m_tokens = share(tokens.cache_write_5m_tokens, true).min(input - cache_write_1h_tokens);
    let cached_input_tokens =
        share(tokens.cached_input_tokens, false).min(input - cache_write_1h_tokens - cache_write_5m_tokens);
    TokenUsage {
        input_tokens: input,
        cached_input_tokens,
        cache_write_5m_tokens,
        cache_write_1h_tokens,
        output_tokens: tokens.output_tokens.min(ceiling),
    }
}

/// What a settle charges: the operator's cost and the customer's price.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amounts {
    pub cost: Decimal,
    pub price: Decimal,
}

impl Amounts {
    /// Both sides capped at the hold's.
    fn at_most(self, held: Amounts) -> Amounts {
        Amounts { cost: self.cost.min(held.cost), price: self.price.min(held.price) }
    }

    /// Costs each under its markup: their sum, and the price of the whole
    /// rounded up once ([`customer_price`]).
    fn of(parts: &[(Decimal, Markup)]) -> Option<Amounts> {
        let cost = parts.iter().try_fold(Decimal::ZERO, |sum, (cost, _)| sum.checked_add(*cost))?;
        Some(Amounts { cost, price: customer_price(parts).ok()? })
    }
}

/// Phase `price`: the most a tool call can cost (its route's most units),
/// as the customer's price and the operator's cost.
pub fn tool_hold_amount(
    price: &ToolPrice,
    units_header: Option<&HeaderName>,
    max_units: u64,
) -> Result<Amounts, ProxyError> {
    let units = if units_header.is_some() { max_units } else { 0 };
    let amounts =
        price.hold_amount(units).and_then(|held| Ok(Amounts { cost: price.cost(units)?, price: held }));
    amounts.map_err(|_| ProxyError::InvalidField {
        field: "max_units",
        reason: "the route's max_units costs more than the gateway can represent".into(),
    })
}

/// Look the model up (in the service tier the request asked for); unpriced
/// models and tiers are refused, never served at the wrong price.
pub fn price_model(
    table: &PriceTable,
    model: &str,
    service_tier: Option<&str>,
    now: DateTime<Utc>,
) -> Result<ModelPrice, ProxyError> {
    let mut price = table
        .model(model, now)
        .ok_or_else(|| ProxyError::UnpricedModel { model: clipped(model).to_owned() })?;
    if let Some(tier) = service_tier {
        let multipliers = table.service_tier(model, tier).ok_or_else(|| ProxyError::UnpricedServiceTier {
            model: clipped(model).to_owned(),
            tier: clipped(tier).to_owned(),
        })?;
        price = price.in_tier(multipliers);
    }
    Ok(price)
}

/// Whether an Anthropic request opts into a beta whose name starts with
/// `prefix` (`context-1m-2025-08-07`), in any of its comma-separated values.
pub fn asks_anthropic_beta(headers: &HeaderMap, prefix: &str) -> bool {
    headers.get_all("anthropic-beta").iter().any(|value| {
        value.as_bytes().split(|b| *b == b',').any(|beta| {
            let beta = beta.trim_ascii();
            beta.len() >= prefix.len() && beta[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
        })
    })
}

pub fn price_tool(table: &PriceTable, tool: &str, now: DateTime<Utc>) -> Result<ToolPrice, ProxyError> {
    table.tool(tool, now).ok_or_else(|| ProxyError::UnpricedModel { model: clipped(tool).to_owned() })
}

impl Charge {
    /// Called with the upstream's response head: start metering its body.
    pub fn on_response_head(&mut self, status: StatusCode, headers: &HeaderMap) {
        self.upstream_status = Some(status);
        let event_stream = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            // A media type is case-insensitive (`Text/Event-Stream`).
            .is_some_and(|v| v.get(..17).is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream")));
        // The gateway asked for an unencoded body; an upstream that encodes
        // anyway cannot be metered (it is charged the hold) or rewritten.
        let encoded = headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        match &self.priced {
            Some(Priced::Model { .. }) if encoded => self.meter = None,
            Some(Priced::Model { .. }) => self.meter = Some(Meter::new(event_stream, self.injected_usage)),
            Some(Priced::Tool { units_header: Some(name), .. }) => {
                self.tool_units =
                    headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
            }
            _ => {}
        }
    }

    /// Phase `settle`: debit what the upstream reported and release the
    /// rest of the hold, or release it all when the upstream failed.
    ///
    /// Rules (the README's "Billing guarantees" table lists every ending):
    /// - Reported usage is charged in full, never less: the hold is a
    ///   reservation, not a discount. A cost above the hold (an upstream that
    ///   ignored the forwarded cap) is debited whole and flagged `over_hold`;
    ///   the ledger records any part no lot covers as the wallet's overrun.
    /// - Each reported count above the route's `usage_ceiling` is charged at
    ///   the ceiling and flagged `ceiling`: garbage, not a bill.
    /// - A 2xx response that ended without usage is charged the hold
    ///   (`no_usage`), as is a tool call without a readable units header,
    ///   a response the client left whose usage the gateway could not read
    ///   on to in time, and one ended for running too long.
    /// - A response the upstream broke off (reset) without usage is charged
    ///   what it delivered, estimated from every kind of delta it carried,
    ///   plus the context the hold allowed for, up to the hold
    ///   (`estimated`); one that may have run hosted tools, the hold. An
    ///   upstream cut for silence is charged the hold.
    /// - Whatever the ending, a stream without usage that delivered clearly
    ///   more text than the hold allowed for (more than twice its output
    ///   tokens and 256: an upstream that ignored the cap) is charged that
    ///   estimate, at most the route's usage ceiling: what it delivered is a
    ///   floor on its bill.
    /// - Usage is the bill only once the event that ends it has come (or the
    ///   body ended): a running total before a cut is a floor.
    /// - A body the gateway could not read (encoded) is charged the hold.
    /// - A call the upstream was sent is settled from its answer even when
    ///   the client left first or the gateway stopped waiting (504): the
    ///   gateway waits on in the background. No answer in time: the hold.
    /// - A non-2xx response, or an upstream that failed, costs nothing;
    ///   except 524, an edge (Cloudflare, in front of OpenAI) that stopped
    ///   waiting for an origin that had the call and runs it on: the hold.
    pub fn settle(mut self, outcome: Outcome, now: DateTime<Utc>) -> SettleResult {
        // The hold stays in the charge until the debit is made: a panic
        // while the cost is worked out leaves it to `Drop`, which charges a
        // sent call its hold instead of letting the hold go unspent.
        let Some(held_price) = self.hold.as_ref().map(Reservation::amount) else {
            return SettleResult::NotHeld;
        };
        let Some(priced) = self.priced.clone() else {
            self.release_hold(now);
            return SettleResult::Released;
        };
        if self.upstream_bills_nothing(outcome) {
            self.release_hold(now);
            return SettleResult::Released;
        }
        let timed_out_at_the_edge = self.upstream_status.is_some_and(|s| s.as_u16() == ORIGIN_TIMED_OUT);
        let held = Amounts { cost: self.held_cost, price: held_price };
        let (charged, usage, flag) = match &priced {
            // Its body is the edge's page, whatever the client did with it.
            _ if timed_out_at_the_edge => (held, Usage::default(), SettleFlag::NoUsage),
            Priced::Model { price, flavour, .. } => self.model_cost(price, *flavour, outcome, held),
            Priced::Tool { price, units_header, .. } => self.tool_cost(price, units_header.is_some(), held),
        };
        let name = match &priced {
            Priced::Model { name, .. } | Priced::Tool { name, .. } => name.clone(),
        };
        let details = SettleDetails {
            route: self.route.clone(),
            model: name.clone(),
            usage,
            price_version: self.table.version_text(),
            operator_cost: Some(charged.cost),
        };
        let flag =
            if flag == SettleFlag::Exact && charged.price > held.price { SettleFlag::OverHold } else { flag };
        let Some(hold) = self.hold.take() else {
            return SettleResult::NotHeld;
        };
        match hold.settle(charged.price, details, now) {
            Ok(debited) => SettleResult::Debited {
                amount: debited,
                over_hold: (debited - held.price).max(Decimal::ZERO),
                flag,
                item: name,
            },
            Err(error) => SettleResult::Failed(error.to_string()),
        }
    }

    /// An upstream that failed bills nothing; one that had the call and
    /// never answered (or timed out at its edge) may bill it all.
    fn upstream_bills_nothing(&self, outcome: Outcome) -> bool {
        let answered = self.upstream_status.is_some_and(|s| s.is_success());
        let timed_out_at_the_edge = self.upstream_status.is_some_and(|s| s.as_u16() == ORIGIN_TIMED_OUT);
        let unanswered =
            (self.upstream_status.is_none() && outcome == Outcome::NoAnswer) || timed_out_at_the_edge;
        !answered && !unanswered
    }

    fn release_hold(&mut self, now: DateTime<Utc>) {
        if let Some(hold) = self.hold.take() {
            hold.release(now);
        }
    }

    fn model_cost(
        &mut self,
        price: &ModelPrice,
        flavour: Flavour,
        outcome: Outcome,
        held: Amounts,
    ) -> (Amounts, Usage, SettleFlag) {
        let Some(meter) = self.meter.as_mut() else {
            // An encoded body (the gateway asked for none) cannot be read,
            // however it ended: only the hold is sure not to bill less.
            return (held, Usage::default(), SettleFlag::NoUsage);
        };
        let (mut reported, delivered) = (meter.finish(), meter.delivered_output_estimate());
        let usage_is_final = meter.usage_is_final();
        // A stream that delivered clearly more text than the hold allowed
        // for (twice it, and more: the estimate is rough) came from an
        // upstream that ignored the cap it was sent.
        let held_output = match &self.priced {
            Some(Priced::Model { held_output_tokens, .. }) => *held_output_tokens,
            _ => u64::MAX,
        };
        let ran_past_cap = meter.estimate_counts_text()
            && delivered > held_output.saturating_mul(2).saturating_add(RAN_PAST_CAP_SLACK_TOKENS);
        let calls_clipped = self.hosted_calls_within_bound(&mut reported);
        let served = self.price_as_served(price, reported.served_tier);
        let price = &served;
        let longer = matches!(self.priced, Some(Priced::Model { cache_longer_lifetime: true, .. }));
        if longer && reported.cache_write_1h_tokens.is_none() {
            reported.cache_write_1h_tokens = reported.cache_write_5m_tokens.take();
        }
        let no_output = flavour == Flavour::OpenaiEmbeddings;
        // A body cut short has seen at most a running total, unless its
        // usage came in the event that ends it.
        let ended = outcome == Outcome::Completed || usage_is_final;
        let complete =
            ended && reported.input_tokens.is_some() && (reported.output_tokens.is_some() || no_output);
        if complete {
            let (tokens, clipped) = self.within_ceiling(token_usage(&reported, 0), &reported);
            let flag = if clipped || calls_clipped { SettleFlag::Ceiling } else { SettleFlag::Exact };
            return match self.priced(price, tokens, &reported) {
                Some((charged, usage)) => (charged, usage, flag),
                None => (held, Usage::default(), flag),
            };
        }
        // A running total the upstream reported before the end (Anthropic's
        // `message_start` carries the whole input) is a floor on its bill,
        // whatever the hold or the estimate says.
        let floor = (reported.input_tokens.is_some() || reported.output_tokens.is_some())
            .then(|| self.within_ceiling(token_usage(&reported, 0), &reported).0)
            .and_then(|tokens| self.priced(price, tokens, &reported));
        let estimate = self.estimated_input_tokens.and_then(|estimated_input| {
            let mut tokens = token_usage(&reported, delivered);
            if reported.input_tokens.is_none() {
                tokens.input_tokens = estimated_input;
            }
            let (tokens, _) = self.within_ceiling(tokens, &reported);
            self.priced(price, tokens, &reported)
        });
        // A model that reasons unseen may have billed up to its cap in
        // reasoning before the upstream broke off, however little text came:
        // only the hold is sure not to bill less.
        let reasons_unseen = matches!(self.priced, Some(Priced::Model { reasons_unseen: true, .. }));
        let charges_hold =
            outcome.charges_hold_without_usage() || (reasons_unseen && outcome == Outcome::UpstreamBroke);
        let (charged, usage, flag) = match estimate {
            // More was delivered than the hold allowed for: the upstream
            // ignored the cap it was sent (a server that reads another cap
            // field), and what it delivered is a floor on its bill, however
            // the call ended.
            Some((charged, usage)) if ran_past_cap && charged.price > held.price => {
                (charged, usage, SettleFlag::Estimated)
            }
            Some((charged, usage)) if !charges_hold => (charged.at_most(held), usage, SettleFlag::Estimated),
            _ => (held, Usage::default(), SettleFlag::NoUsage),
        };
        match floor {
            Some((least, usage)) if least.price > charged.price => (least, usage, flag),
            _ => (charged, usage, flag),
        }
    }

    /// The prices of the tier the upstream says served the call, when it
    /// names one other than the request's: OpenAI serves `auto` (or no
    /// tier) on a project's own default, which may be priority, and may
    /// serve a `priority` request at the default tier; Anthropic's `auto`
    /// runs on priority capacity where the organization has it. The bill
    /// follows the tier that served. A served tier the table does not price
    /// leaves the request's prices (and is logged).
    fn price_as_served(&self, price: &ModelPrice, served: Option<ServiceTier>) -> ModelPrice {
        let Some(Priced::Model { name, requested_tier, .. }) = &self.priced else {
            return *price;
        };
        let Some(served) = served.filter(|served| served != requested_tier) else {
            return *price;
        };
        let multipliers = match served {
            ServiceTier::Default => Some(Multipliers::ONE),
            named => named.table_name().and_then(|tier| self.table.service_tier(name, tier)),
        };
        match multipliers {
            Some(multipliers) => price.in_tier(multipliers),
            None => {
                tracing::debug!(model = %name, ?served, "the upstream served a tier the table does not price; charged at the requested tier");
                *price
            }
        }
    }

    /// Each hosted tool's reported calls at most the bound the upstream was
    /// sent (`max_tool_calls`, `max_uses`: limits the providers enforce) and
    /// the route's usage ceiling: a count past them is an upstream's bug,
    /// not a bill (4,294,967,295 searches would be a debit of millions).
    /// A request that enabled no hosted tool (a stored prompt's) sent no
    /// bound: its calls are clipped at the ceiling only. Whether one was
    /// past its bound.
    fn hosted_calls_within_bound(&self, reported: &mut Reported) -> bool {
        let held = match &self.priced {
            Some(Priced::Model { hosted_calls_held, .. }) => *hosted_calls_held,
            _ => None,
        };
        let ceiling = self.limits.usage_ceiling;
        // OpenAI's bound is on all the tools together (Anthropic reports one).
        let mut left = u32::try_from(held.map_or(ceiling, |held| held.min(ceiling))).unwrap_or(u32::MAX);
        let mut clipped = false;
        for count in &mut reported.hosted_calls {
            if *count > left {
                tracing::warn!(
                    reported = *count,
                    left,
                    "hosted tool calls past the bound sent reported; charged at the bound"
                );
                *count = left;
                clipped = true;
            }
            left -= *count;
        }
        clipped
    }

    /// `tokens` with each count at most the route's ceiling (a count above it
    /// is an upstream's bug, not a bill), and whether one was above it.
    fn within_ceiling(&self, tokens: TokenUsage, reported: &Reported) -> (TokenUsage, bool) {
        let ceiling = self.limits.usage_ceiling;
        if tokens.input_tokens <= ceiling && tokens.output_tokens <= ceiling {
            return (tokens, false);
        }
        tracing::warn!(
            input = reported.input_tokens,
            output = reported.output_tokens,
            ceiling,
            "usage above the route's ceiling reported; charged at the ceiling"
        );
        (clipped_to(tokens, ceiling), true)
    }

    /// One price over the whole call: tokens at the model's markup, each
    /// hosted tool's calls at the tool's, rounded up once. `None` when the
    /// amounts cannot be represented (the caller charges the hold).
    fn priced(
        &self,
        price: &ModelPrice,
        tokens: TokenUsage,
        reported: &Reported,
    ) -> Option<(Amounts, Usage)> {
        let mut parts = CostParts::new();
        parts.push((price.cost(&tokens).ok()?, price.markup()));
        let preview = matches!(self.priced, Some(Priced::Model { web_search_preview: true, .. }));
        let tool_calls = hosted_calls_cost(&self.table, reported, self.priced_at, preview, &mut parts)?;
        let usage = Usage {
            input_tokens: tokens.input_tokens,
            output_tokens: tokens.output_tokens,
            cached_input_tokens: tokens.cached_input_tokens,
            // A Responses call's hosted tool calls (the entry's unit count).
            tool_units: tool_calls,
        };
        Some((Amounts::of(&parts)?, usage))
    }

    /// A tool's units as its header reported them, up to the ceiling; no
    /// readable count (where the route reads one) is charged the hold.
    fn tool_cost(
        &self,
        price: &ToolPrice,
        counts_units: bool,
        held: Amounts,
    ) -> (Amounts, Usage, SettleFlag) {
        let reported = match (counts_units, self.tool_units) {
            (false, _) => 0,
            (true, Some(units)) => units,
            (true, None) => return (held, Usage::default(), SettleFlag::NoUsage),
        };
        let ceiling = self.limits.usage_ceiling;
        let units = reported.min(ceiling);
        let flag = if reported > ceiling { SettleFlag::Ceiling } else { SettleFlag::Exact };
        let charged = price.cost(units).ok().and_then(|cost| Amounts::of(&[(cost, price.markup())]));
        (charged.unwrap_or(held), Usage { tool_units: units, ..Usage::default() }, flag)
    }
}

fn token_usage(reported: &Reported, delivered_output: u64) -> TokenUsage {
    let input = reported.input_tokens.unwrap_or(0);
    // Parts of the input, each at most what is left of it.
    let cached = reported.cached_input_tokens.unwrap_or(0).min(input);
    let write_1h = reported.cache_write_1h_tokens.unwrap_or(0).min(input - cached);
    let write_5m = reported.cache_write_5m_tokens.unwrap_or(0).min(input - cached - write_1h);
    TokenUsage {
        input_tokens: input,
        cached_input_tokens: cached,
        cache_write_5m_tokens: write_5m,
        cache_write_1h_tokens: write_1h,
        output_tokens: reported.output_tokens.unwrap_or(0).max(delivered_output),
    }
}

/// How a debit's amount was arrived at (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleFlag {
    /// From the usage the upstream reported.
    Exact,
    /// Reported usage cost more than the hold: charged in full.
    OverHold,
    /// A reported count was above the route's ceiling: charged at the ceiling.
    Ceiling,
    /// A response that ended without usage: charged the hold.
    NoUsage,
    /// A response cut short: charged what it delivered, up to the hold.
    Estimated,
}

/// How a settle ended, for logs and metrics.
#[derive(Debug)]
pub enum SettleResult {
    NotHeld,
    Released,
    /// `over_hold`: what the debit exceeded the hold by.
    Debited {
        amount: Decimal,
        over_hold: Decimal,
        flag: SettleFlag,
        item: Arc<str>,
    },
    Failed(String),
}

impl SettleResult {
    /// Bounded label for the settle metric.
    pub fn metric_label(&self) -> &'static str {
        SETTLE_LABELS[self.metric_slot()]
    }

    /// The place of [`SettleResult::metric_label`] in [`SETTLE_LABELS`].
    pub fn metric_slot(&self) -> usize {
        match self {
            SettleResult::NotHeld => 0,
            SettleResult::Released => 1,
            SettleResult::Debited { flag: SettleFlag::Exact, .. } => 2,
            SettleResult::Debited { flag: SettleFlag::OverHold, .. } => 3,
            SettleResult::Debited { flag: SettleFlag::Ceiling, .. } => 4,
            SettleResult::Debited { flag: SettleFlag::NoUsage, .. } => 5,
            SettleResult::Debited { flag: SettleFlag::Estimated, .. } => 6,
            SettleResult::Failed(_) => 7,
        }
    }
}

/// The `result` label of each way a settle ends.
pub const SETTLE_LABELS: [&str; 8] = [
    "not_held",
    "released",
    "debited",
    "debited_over_hold",
    "debited_ceiling",
    "debited_no_usage",
    "debited_estimate",
    "failed",
];

/// The `x-creditgate-available` value: the amount without trailing zeros,
/// as `Decimal::normalize().to_string()` writes it. Written on every
/// metered answer, so an amount whose digits fit in a `u64` (any real
/// balance) is formatted in a stack buffer, without the formatter's
/// allocation and 96-bit divisions.
pub fn available_header(amount: Decimal) -> Option<HeaderValue> {
    let Ok(mut digits) = u64::try_from(amount.mantissa().unsigned_abs()) else {
        return HeaderValue::from_str(&amount.normalize().to_string()).ok();
    };
    let mut scale = amount.scale();
    while scale > 0 && digits % 10 == 0 {
        digits /= 10;
        scale -= 1;
    }
    // At most 20 digits, a point, a sign and the zeros before a fraction
    // (the scale is at most 28).
    let mut buffer = [0_u8; 52];
    let mut at = buffer.len();
    let mut written = 0;
    while digits > 0 || written <= scale {
        if written == scale && scale > 0 {
            at -= 1;
            buffer[at] = b'.';
        }
        at -= 1;
        buffer[at] = b'0' + (digits % 10) as u8;
        digits /= 10;
        written += 1;
    }
    if amount.is_sign_negative() && !amount.is_zero() {
        at -= 1;
        buffer[at] = b'-';
    }
    HeaderValue::from_bytes(&buffer[at..]).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::{json, Value};

    use super::with_include_usage;

    #[test]
    fn a_charge_dropped_unsettled_is_charged_its_hold_once_sent_unless_the_upstream_failed() {
        // A panic between sending a call and settling it (in a read-on task,
        // or before the response body took the charge) drops the charge: the
        // upstream has the call and may bill it all, so it must not be free.
        use std::sync::Arc;

        use rust_decimal_macros::dec;

        use super::{Charge, Priced, Reservation};
        use crate::clock::ManualClock;
        use crate::ledger::entity::Plan;
        use crate::ledger::ids::{Owner, WalletId};
        use crate::ledger::limit::Limits;
        use crate::ledger::testkit::{assert_verified, at, key, ledger, org, request, term, user};
        use crate::ledger::{ResolvedKey, SpendContext};
        use crate::pricing::PriceTable;

        let now = at("2027-03-10T12:00:00Z");
        let (ledger, journal) = ledger();
        let contract = term("2027-01-01", 1, dec!(10), 0, dec!(0));
        let org = org(&ledger, chrono_tz::Tz::UTC, Some(contract), now);
        let user = user(&ledger, org, Plan::Pro, dec!(0), now);
        let key_id = key(&ledger, org, Owner::User(user), Limits::NONE, now);
        let wallet = WalletId::Pool(org);
        let resolved = ResolvedKey { key: key_id, org, owner: Owner::User(user), wallet };
        let table = Arc::new(
            PriceTable::parse("prices.toml", "label = \"t\"\n[tools.\"search\"]\nper_call = \"0.5\"\n")
                .unwrap(),
        );
        let price = table.tool("search", now).unwrap();
        let charge = |sent: bool, amount, upstream_status: Option<http::StatusCode>| {
            let request_id = request();
            let context = SpendContext { key: key_id, end_user: None };
            let hold = ledger.hold(wallet, request_id, amount, context, now).unwrap();
            Charge {
                key: resolved,
                end_user: None,
                request_id,
                route: Arc::from("/tools"),
                table: table.clone(),
                priced_at: now,
                priced: Some(Priced::Tool { name: Arc::from("search"), price, units_header: None }),
                estimated_input_tokens: None,
                limits: crate::config::RouteLimits::default(),
                output_cap: None,
                hold: Some(Reservation::Local(hold)),
                held_cost: amount,
                meter: None,
                injected_usage: false,
                upstream_status,
                tool_units: None,
                sent,
                clock: ManualClock::new(now),
            }
        };
        let totals = || ledger.balance(wallet, now).unwrap();

        drop(charge(false, dec!(2), None));
        // An upstream that answered with an error bills nothing, as the settle says.
        drop(charge(true, dec!(2), Some(http::StatusCode::INTERNAL_SERVER_ERROR)));
        let after_unsent = totals();
        assert_eq!(
            (after_unsent.balance, after_unsent.held, after_unsent.totals.debited),
            (dec!(10), dec!(0), dec!(0))
        );

        drop(charge(true, dec!(3), None));
        let after_sent = totals();
        assert_eq!(after_sent.open_holds, 0, "the hold is ended, not left to its TTL");
        assert_eq!(
            (after_sent.balance, after_sent.held, after_sent.totals.debited),
            (dec!(7), dec!(0), dec!(3))
        );
        assert_eq!(
            after_sent.balance,
            after_sent.totals.granted - after_sent.totals.debited - after_sent.totals.written_off
        );
        assert_verified(&ledger, &journal);
    }

    #[test]
    fn a_usage_clipped_to_the_ceiling_keeps_the_shares_of_its_input() {
        use super::clipped_to;
        use crate::pricing::TokenUsage;
        let usage = TokenUsage {
            input_tokens: 300,
            cached_input_tokens: 100,
            cache_write_5m_tokens: 50,
            cache_write_1h_tokens: 101,
            output_tokens: 7,
        };
        // Under the ceiling: as it was.
        assert_eq!(clipped_to(usage, 300), usage);
        // A third of it: writes rounded up, reads down, never past the input.
        let third = clipped_to(usage, 100);
        assert_eq!(
            (
                third.input_tokens,
                third.cache_write_1h_tokens,
                third.cache_write_5m_tokens,
                third.cached_input_tokens
            ),
            (100, 34, 17, 33)
        );
        let all_writes =
            TokenUsage { input_tokens: 9, cache_write_1h_tokens: 5, cache_write_5m_tokens: 4, ..usage };
        let tiny = clipped_to(all_writes, 1);
        assert_eq!(
            (tiny.cache_write_1h_tokens, tiny.cache_write_5m_tokens, tiny.cached_input_tokens),
            (1, 0, 0)
        );
        assert_eq!(clipped_to(usage, 5).output_tokens, 5);
    }

    #[test]
    fn a_deployment_named_in_the_path_or_base_path_must_be_the_body_s_model() {
        use super::check_deployment;
        let path = "/openai/deployments/gpt-4o/chat/completions";
        assert!(check_deployment("", "/v1/chat/completions", "m").is_ok());
        assert!(check_deployment("", path, "gpt-4o").is_ok());
        assert!(check_deployment("", &path.replace("gpt-4o", "GPT-4o"), "gpt-4o").is_ok());
        assert!(check_deployment("", path, "gpt-4o-mini").is_err());
        assert!(check_deployment("/openai/deployments/gpt-4o", "/chat/completions", "gpt-4o-mini").is_err());
        // Split across the two: the base path names `deployments`, the request the name.
        assert!(check_deployment("/openai/deployments", "/gpt-4o/chat/completions", "gpt-4o-mini").is_err());
        assert!(check_deployment("/openai", "/deployments/gpt-4o/chat/completions", "gpt-4o").is_ok());
        assert!(check_deployment("", "/openai/deployments;x/gpt-4o/chat/completions", "mini").is_err());
        assert!(
            check_deployment("", "/OpenAI/DePloyments/gpt-4o/chat/completions", "mini").is_err(),
            "any case"
        );
        assert!(check_deployment("/OPENAI/", "/DEPLOYMENTS;v=1/gpt-4o/x", "mini").is_err());
        // Other APIs' deployments (SAP AI Core: opaque ids) are not Azure's.
        assert!(check_deployment("", "/v2/inference/deployments/d4f1/chat/completions", "gpt-4o").is_ok());
        // OpenAI's legacy engine paths, which LiteLLM's proxy serves the named model on.
        let azure = ["api-version".to_owned()];
        let chat = crate::config::Flavour::OpenaiChat;
        assert!(super::check_query("api-version=2024-10-21", &azure, chat).is_ok());
        assert!(super::check_query("api-version=1&&", &azure, chat).is_ok());
        for refused in [
            "model=claude-opus-4-1",
            "api-version=1&model=x",
            "m%6Fdel=x",
            "api-version=1;model=x",
            "Model=x",
            "model",
            "beta=true",
        ] {
            assert!(
                matches!(
                    super::check_query(refused, &azure, chat),
                    Err(super::ProxyError::QueryParamRefused { .. })
                ),
                "{refused}"
            );
        }
        assert!(super::check_query("model=x", &[], chat).is_err());
        // The Anthropic SDKs' beta calls.
        let messages = crate::config::Flavour::AnthropicMessages;
        assert!(super::check_query("beta=true", &[], messages).is_ok());
        assert!(super::check_query("beta=true&model=x", &[], messages).is_err());
        let typed = |values: &[&'static str]| {
            let mut headers = http::HeaderMap::new();
            for value in values {
                headers.append(http::header::CONTENT_TYPE, http::HeaderValue::from_static(value));
            }
            super::check_content_type(&headers).is_ok()
        };
        assert!(typed(&[]) && typed(&["application/json"]) && typed(&["Application/JSON; charset=utf-8"]));
        assert!(typed(&["application/vnd.api+json"]));
        assert!(
            !typed(&["application/x-www-form-urlencoded"]) && !typed(&["multipart/form-data; boundary=x"])
        );
        assert!(
            !typed(&["text/plain"]) && !typed(&["application/json", "application/x-www-form-urlencoded"])
        );
        assert!(check_deployment("", "/engines/claude-opus-4-1/chat/completions", "gpt-4o-mini").is_err());
        assert!(check_deployment("/v1", "/Engines;x/claude-opus-4-1/completions", "gpt-4o-mini").is_err());
        assert!(check_deployment("", "/v1/engines/gpt-4o-mini/chat/completions", "gpt-4o-mini").is_ok());
    }

    fn injected(body: &str) -> Value {
        let edited = with_include_usage(body.as_bytes()).unwrap();
        // Parsed into a `Value`, a duplicate key would keep only its last
        // copy: an upstream that reads the first would see the client's.
        let named = top_level_keys(&edited).into_iter().filter(|key| key == "stream_options").count();
        assert_eq!(named, 1, "one stream_options: {}", String::from_utf8_lossy(&edited));
        serde_json::from_slice(&edited).unwrap()
    }

    /// The keys of a JSON object as written, duplicates included.
    fn top_level_keys(json: &[u8]) -> Vec<String> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = Vec<String>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Vec<String>, A::Error> {
                let mut keys = Vec::new();
                while let Some((key, _)) = map.next_entry::<String, serde::de::IgnoredAny>()? {
                    keys.push(key);
                }
                Ok(keys)
            }
        }
        serde::Deserializer::deserialize_map(&mut serde_json::Deserializer::from_slice(json), Keys).unwrap()
    }

    #[test]
    fn the_available_header_writes_an_amount_as_normalize_to_string_does() {
        // Proves the stack-buffer formatting against rust_decimal's own for
        // signs, zeros, scales 0 to 28, trailing zeros and mantissas beyond
        // a u64 (those take the general path).
        use rust_decimal::Decimal;
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut cases: Vec<Decimal> = vec![
            Decimal::ZERO,
            Decimal::new(0, 9),
            Decimal::new(-0, 3),
            -Decimal::new(0, 3),
            -Decimal::ZERO,
            Decimal::new(1, 28),
            Decimal::new(-1, 28),
            Decimal::new(1_000, 3),
            Decimal::new(-25_000_000_000, 9),
            Decimal::new(i64::MAX, 0),
            Decimal::new(i64::MIN + 1, 5),
            Decimal::MAX,
            Decimal::MIN,
            Decimal::from_i128_with_scale(u64::MAX as i128, 4),
            Decimal::from_i128_with_scale(u64::MAX as i128 + 1, 4),
        ];
        for _ in 0..20_000 {
            let mantissa = i64::try_from(next() >> (next() % 64)).unwrap_or(i64::MAX);
            let mantissa = if next() % 2 == 0 { mantissa } else { -mantissa };
            cases.push(Decimal::new(mantissa, (next() % 29) as u32));
        }
        for amount in cases {
            let expected = amount.normalize().to_string();
            let header = super::available_header(amount).unwrap();
            assert_eq!(header.to_str().unwrap(), expected, "{amount:?}");
        }
    }

    #[test]
    fn include_usage_is_added_once_whatever_the_body_looks_like() {
        let cases = [
            (r#"{"model":"m","stream":true}"#, json!({"model":"m","stream":true})),
            ("  {\n}", json!({})),
            (
                r#"{"model":"m","stream_options":{"other":1}}"#,
                json!({"model":"m","stream_options":{"other":1}}),
            ),
            (
                r#"{"model":"m","messages":[{"content":"what are stream_options?"}]}"#,
                json!({"model":"m","messages":[{"content":"what are stream_options?"}]}),
            ),
            (r#"{"stream\u005foptions":{"include_usage":false}}"#, json!({})),
        ];
        for (body, mut expected) in cases {
            let options = expected.as_object_mut().unwrap().entry("stream_options").or_insert(json!({}));
            options.as_object_mut().unwrap().insert("include_usage".into(), json!(true));
            assert_eq!(injected(body), expected, "{body}");
        }
        assert!(with_include_usage(b"[1]").is_none(), "not an object");
        let null = injected(r#"{"model":"m","stream_options":null}"#);
        assert_eq!(null, json!({"model":"m","stream_options":{"include_usage":true}}), "null is absent");
    }

    #[test]
    fn an_edited_body_keeps_every_other_byte_as_written() {
        // Before, a body the general path edited was rebuilt through
        // `Value`: every object's keys came out sorted (a Structured Outputs
        // schema then asked for its fields in another order), integers past
        // u64 as floats, and escapes spelled out.
        use super::{edited_body, BodyEdits};
        let schema = r#"{"properties":{"reasoning":{"type":"string"},"answer":{"type":"string"}}}"#;
        let body = format!(
            r#"{{"model":"m","response_format":{{"type":"json_schema","schema":{schema}}},"seed":123456789012345678901234567890,"messages":[{{"content":"caf\u00e9"}}],"stream":true}}"#
        );
        let edited =
            edited_body(body.as_bytes(), BodyEdits { include_usage: true, ..BodyEdits::default() }).unwrap();
        let text = std::str::from_utf8(&edited).unwrap();
        assert!(text.contains(schema), "nested order kept: {text}");
        assert!(text.contains("123456789012345678901234567890"), "a large integer kept: {text}");
        assert!(text.contains(r#""caf\u00e9""#), "escapes kept: {text}");
        assert!(text.starts_with(r#"{"model":"m","response_format""#), "top-level order kept: {text}");
        assert!(text.ends_with(r#""stream_options":{"include_usage":true}}"#), "{text}");
        // An Anthropic web search without a bound gets one; its other members stay in order.
        let tools = r#"{"model":"m","tools":[{"name":"f","input_schema":{"z":1,"a":2}},{"type":"web_search_20250305","name":"web_search","max_uses":null}]}"#;
        let edits = BodyEdits { anthropic_max_uses: Some(5), ..BodyEdits::default() };
        let edited = edited_body(tools.as_bytes(), edits).unwrap();
        let text = std::str::from_utf8(&edited).unwrap();
        assert!(text.contains(r#"{"name":"f","input_schema":{"z":1,"a":2}}"#), "{text}");
        assert!(
            text.contains(r#"{"type":"web_search_20250305","name":"web_search","max_uses":5}"#),
            "{text}"
        );
    }
}
