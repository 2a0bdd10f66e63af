//! The money phases of a request: identify the caller by API key, price the
//! request from the table in force, hold the most it can cost, and — when the
//! response has ended — settle the real cost from the metered usage.

use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use memchr::memmem::Finder;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::Value;

use super::context::Outcome;
use super::error::ProxyError;
use super::headers::X_API_KEY;
use crate::clock::Clock;
use crate::config::Flavour;
use crate::ledger::entity::KeyHash;
use crate::ledger::entry::{SettleDetails, Usage};
use crate::ledger::ids::RequestId;
use crate::ledger::{Hold, Ledger, ResolvedKey};
use crate::meter::{Meter, Reported};
use crate::pricing::{HoldRequest, ModelPrice, PriceTable, TokenUsage, ToolPrice};

/// Header an application uses to name its end user (recorded, for reports).
pub static END_USER: HeaderName = HeaderName::from_static("x-creditgate-end-user");
/// Available balance of the paying wallet after the hold.
pub static AVAILABLE: HeaderName = HeaderName::from_static("x-creditgate-available");
/// Longest end-user id kept; longer ones are refused.
const MAX_END_USER_LEN: usize = 128;
/// Units a tool call is held for when the price is per unit: the hold must
/// cover the worst case before the tool reports its count.
pub const TOOL_HOLD_UNITS: u64 = 100;
/// Input tokens estimated per request byte when a stream is cut short before
/// the upstream reported its input (one token per four bytes, as for English).
const REQUEST_BYTES_PER_TOKEN: u64 = 4;

/// What is being bought.
#[derive(Debug, Clone)]
pub enum Priced {
    Model { name: Arc<str>, price: ModelPrice, flavour: Flavour },
    Tool { name: Arc<str>, price: ToolPrice, units_header: Option<HeaderName> },
}

impl Priced {
    /// The model or tool name as the request gave it.
    pub fn name(&self) -> &str {
        match self {
            Priced::Model { name, .. } | Priced::Tool { name, .. } => name,
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
    pub priced: Option<Priced>,
    pub request_bytes: u64,
    /// The output cap the request named, if any.
    pub max_output_tokens: Option<u64>,
    pub hold: Option<Hold>,
    pub meter: Option<Meter>,
    /// The gateway added `stream_options.include_usage`; remove what it adds.
    pub injected_usage: bool,
    pub upstream_status: Option<StatusCode>,
    pub tool_units: Option<u64>,
    /// For releasing the hold if the request is dropped before it settles.
    pub clock: Arc<dyn Clock>,
}

impl Drop for Charge {
    /// A request dropped before its response began (the client went away
    /// while the upstream was still thinking) releases its hold at once
    /// instead of leaving it to the TTL. After a settle there is no hold left.
    fn drop(&mut self) {
        if let Some(hold) = self.hold.take() {
            hold.release(self.clock.now());
        }
    }
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Charge")
            .field("key", &self.key.key)
            .field("request_id", &self.request_id)
            .field("held", &self.hold.as_ref().map(Hold::amount))
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
            let text = value.to_str().ok().filter(|t| !t.is_empty() && t.len() <= MAX_END_USER_LEN);
            let text = text.ok_or(ProxyError::InvalidField {
                field: "x-creditgate-end-user",
                reason: format!("must be 1 to {MAX_END_USER_LEN} visible ASCII characters"),
            })?;
            Some(Arc::from(text))
        }
    };
    Ok((key, end_user))
}

/// The fields of a model request the gateway reads; everything else is
/// skipped without being built.
#[derive(Deserialize)]
struct ModelFields {
    model: Option<Value>,
    max_tokens: Option<Value>,
    max_completion_tokens: Option<Value>,
    max_output_tokens: Option<Value>,
    stream: Option<Value>,
    stream_options: Option<Value>,
}

/// What the price phase learned from a model request body.
pub struct ModelRequest {
    pub model: String,
    pub max_output_tokens: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Read `model`, the output cap and the stream flags from a JSON body.
pub fn read_model_request(body: &[u8]) -> Result<ModelRequest, ProxyError> {
    let fields: ModelFields =
        serde_json::from_slice(body).map_err(|e| ProxyError::InvalidJson { reason: e.to_string() })?;
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
    let mut max_output_tokens = None;
    for (field, value) in [
        ("max_tokens", fields.max_tokens),
        ("max_completion_tokens", fields.max_completion_tokens),
        ("max_output_tokens", fields.max_output_tokens),
    ] {
        match value {
            None | Some(Value::Null) => {}
            Some(v) => {
                let n = v.as_u64().ok_or_else(|| ProxyError::InvalidField {
                    field,
                    reason: "must be a whole number of tokens, 0 or more".into(),
                })?;
                max_output_tokens.get_or_insert(n);
            }
        }
    }
    let stream = match fields.stream {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => {
            return Err(ProxyError::InvalidField { field: "stream", reason: "must be true or false".into() })
        }
    };
    let include_usage = fields
        .stream_options
        .as_ref()
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(ModelRequest { model, max_output_tokens, stream, include_usage })
}

/// Searchers built once (building one costs more than searching a body).
static STREAM_OPTIONS: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"stream_options"));
static UNICODE_ESCAPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\\u"));

/// The body with `stream_options.include_usage = true` added, so the stream
/// reports its usage; `None` if the body is not a JSON object.
pub fn with_include_usage(body: &[u8]) -> Option<Bytes> {
    // Most bodies have no stream_options at all: splice the field in after
    // the opening brace instead of rebuilding the document. A body that
    // mentions the name anywhere, or spells any key with \u escapes, takes
    // the general path so no second stream_options can appear.
    let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[start] == b'{' && STREAM_OPTIONS.find(body).is_none() && UNICODE_ESCAPE.find(body).is_none() {
        let rest = &body[start + 1..];
        let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
        let field: &[u8] = if empty {
            br#"{"stream_options":{"include_usage":true}"#
        } else {
            br#"{"stream_options":{"include_usage":true},"#
        };
        return Some(Bytes::from([field, rest].concat()));
    }
    let mut value: Value = serde_json::from_slice(body).ok()?;
    let object = value.as_object_mut()?;
    let options = object.entry("stream_options").or_insert_with(|| Value::Object(Default::default()));
    options.as_object_mut()?.insert("include_usage".into(), Value::Bool(true));
    serde_json::to_vec(&value).ok().map(Bytes::from)
}

/// Phase `price`: the most this request can cost.
pub fn hold_amount(
    priced: &Priced,
    request_bytes: u64,
    max_output_tokens: Option<u64>,
) -> Result<Decimal, ProxyError> {
    let amount = match priced {
        Priced::Model { price, .. } => {
            price.hold_amount(&HoldRequest { input_bytes: request_bytes, max_output_tokens })
        }
        Priced::Tool { price, units_header, .. } => {
            let units = if units_header.is_some() { TOOL_HOLD_UNITS } else { 0 };
            price.hold_amount(units)
        }
    };
    amount.map_err(|_| ProxyError::InvalidField {
        field: "max_tokens",
        reason: "the request could cost more than the gateway can represent; lower it".into(),
    })
}

/// Look the model up; unpriced models are refused, never served free.
pub fn price_model(
    table: &PriceTable,
    model: &str,
    flavour: Flavour,
    now: DateTime<Utc>,
) -> Result<Priced, ProxyError> {
    let price =
        table.model(model, now).ok_or_else(|| ProxyError::UnpricedModel { model: model.to_owned() })?;
    Ok(Priced::Model { name: Arc::from(model), price, flavour })
}

pub fn price_tool(
    table: &PriceTable,
    tool: &str,
    units_header: Option<HeaderName>,
    now: DateTime<Utc>,
) -> Result<Priced, ProxyError> {
    let price = table.tool(tool, now).ok_or_else(|| ProxyError::UnpricedModel { model: tool.to_owned() })?;
    Ok(Priced::Tool { name: Arc::from(tool), price, units_header })
}

impl Charge {
    /// Called with the upstream's response head: start metering its body.
    pub fn on_response_head(&mut self, status: StatusCode, headers: &HeaderMap) {
        self.upstream_status = Some(status);
        let event_stream = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        match &self.priced {
            Some(Priced::Model { .. }) => self.meter = Some(Meter::new(event_stream, self.injected_usage)),
            Some(Priced::Tool { units_header: Some(name), .. }) => {
                self.tool_units =
                    headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
            }
            _ => {}
        }
    }

    /// Phase `settle`: debit the real cost and release the rest of the hold,
    /// or release it all when the upstream failed. Returns what was debited
    /// and whether usage was missing (charged at the hold).
    pub fn settle(mut self, outcome: Outcome, now: DateTime<Utc>) -> SettleResult {
        let Some(hold) = self.hold.take() else {
            return SettleResult::NotHeld;
        };
        let Some(priced) = self.priced.clone() else {
            hold.release(now);
            return SettleResult::Released;
        };
        if !self.upstream_status.is_some_and(|s| s.is_success()) {
            hold.release(now);
            return SettleResult::Released;
        }
        let held = hold.amount();
        let (cost, usage, estimated) = match &priced {
            Priced::Model { price, flavour, .. } => self.model_cost(price, *flavour, outcome, held),
            Priced::Tool { price, .. } => {
                let units = self.tool_units.unwrap_or(0);
                let cost = price.cost(units).map(|c| c.min(held)).unwrap_or(held);
                (cost, Usage { tool_units: units, ..Usage::default() }, false)
            }
        };
        let name = match &priced {
            Priced::Model { name, .. } | Priced::Tool { name, .. } => name.clone(),
        };
        let name_for_metrics = name.clone();
        let details = SettleDetails {
            route: self.route.clone(),
            model: name,
            usage,
            price_version: self.table.version_text(),
        };
        match hold.settle(cost, details, now) {
            Ok(settlement) => {
                SettleResult::Debited { amount: settlement.debited, estimated, item: name_for_metrics }
            }
            Err(error) => SettleResult::Failed(error.to_string()),
        }
    }

    /// Cost from the reported usage; a stream cut short is charged for what
    /// it delivered, capped at the hold; a complete response without usage is
    /// charged at the hold (counted in a metric by the caller).
    fn model_cost(
        &mut self,
        price: &ModelPrice,
        flavour: Flavour,
        outcome: Outcome,
        held: Decimal,
    ) -> (Decimal, Usage, bool) {
        let (reported, delivered) = match self.meter.as_mut() {
            Some(meter) => (meter.finish(), meter.delivered_output_estimate()),
            None => (Reported::default(), 0),
        };
        let no_output = flavour == Flavour::OpenaiEmbeddings;
        let complete = reported.input_tokens.is_some() && (reported.output_tokens.is_some() || no_output);
        let (tokens, estimated) = match outcome {
            Outcome::Completed if complete => {
                let usage = token_usage(&reported, 0);
                if self.implausible(&usage) {
                    // A usage no request like this can have (garbage from the
                    // upstream): never bill it, charge the hold and flag it.
                    tracing::warn!(
                        input = usage.input_tokens,
                        output = usage.output_tokens,
                        "implausible usage reported; charged at the hold"
                    );
                    return (held, Usage::default(), true);
                }
                (usage, false)
            }
            Outcome::Completed => return (held, Usage::default(), true),
            _ => {
                let input_estimate = self.request_bytes.div_ceil(REQUEST_BYTES_PER_TOKEN);
                let mut usage = token_usage(&reported, delivered);
                if reported.input_tokens.is_none() {
                    usage.input_tokens = input_estimate;
                }
                (usage, true)
            }
        };
        let cost = price.cost(&tokens).map_or(held, |c| if estimated { c.min(held) } else { c });
        let usage = Usage {
            input_tokens: tokens.input_tokens,
            output_tokens: tokens.output_tokens,
            cached_input_tokens: tokens.cached_input_tokens,
            tool_units: 0,
        };
        (cost, usage, estimated)
    }
}

/// Slack for bytes the gateway itself adds to a request (`stream_options`).
const ADDED_REQUEST_BYTES: u64 = 64;

impl Charge {
    /// More input tokens than request bytes (no tokenizer does that), or more
    /// output than the request allowed.
    fn implausible(&self, usage: &TokenUsage) -> bool {
        usage.input_tokens > self.request_bytes + ADDED_REQUEST_BYTES
            || self.max_output_tokens.is_some_and(|max| usage.output_tokens > max)
    }
}

fn token_usage(reported: &Reported, delivered_output: u64) -> TokenUsage {
    let input = reported.input_tokens.unwrap_or(0);
    TokenUsage {
        input_tokens: input,
        cached_input_tokens: reported.cached_input_tokens.unwrap_or(0).min(input),
        output_tokens: reported.output_tokens.unwrap_or(0).max(delivered_output),
    }
}

/// How a settle ended, for logs and metrics.
#[derive(Debug)]
pub enum SettleResult {
    NotHeld,
    Released,
    Debited { amount: Decimal, estimated: bool, item: Arc<str> },
    Failed(String),
}

impl SettleResult {
    /// Bounded label for the settle metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            SettleResult::NotHeld => "not_held",
            SettleResult::Released => "released",
            SettleResult::Debited { estimated: false, .. } => "debited",
            SettleResult::Debited { estimated: true, .. } => "debited_estimate",
            SettleResult::Failed(_) => "failed",
        }
    }
}

/// The `x-creditgate-available` value.
pub fn available_header(amount: Decimal) -> Option<HeaderValue> {
    HeaderValue::from_str(&amount.normalize().to_string()).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::{json, Value};

    use super::with_include_usage;

    fn injected(body: &str) -> Value {
        serde_json::from_slice(&with_include_usage(body.as_bytes()).unwrap()).unwrap()
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
    }
}
