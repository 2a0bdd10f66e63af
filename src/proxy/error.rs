//! Every way a proxied request can fail, and the one place that turns a
//! failure into an HTTP response.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::json;

use crate::ledger::ids::WalletKind;
use crate::ledger::limit::{LimitPeriod, LimitSubject};
use crate::ledger::Refusal;

/// A request the gateway answers itself instead of (or after) the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route serves {path}")]
    RouteNotFound { path: String },
    #[error("{path} is not a call this model route meters; the upstream's stored objects are not served through the gateway")]
    NotACall { path: String },
    #[error("{method} is not served here: a model route takes POST (it creates a metered call)")]
    MethodNotAllowed { method: http::Method },
    #[error("{method} is not forwarded here: this unmetered route forwards only {allowed}, so that no call the upstream bills passes it unmetered")]
    MethodNotForwarded { method: http::Method, allowed: String },
    #[error("`{header}` is not accepted: the method a route meters or forwards is the request's own")]
    MethodOverride { header: &'static str },
    #[error("request body exceeds the {limit_bytes}-byte limit")]
    BodyTooLarge { limit_bytes: u64 },
    #[error("the gateway is reading as many request bodies as its memory budget allows; retry shortly")]
    BodyBudget,
    #[error("a model request's body is read as sent, and this one is encoded (`content-encoding: {encoding}`); send it unencoded")]
    EncodedRequestBody { encoding: String },
    #[error("the request body did not arrive within {timeout:?}")]
    BodyTimeout { timeout: Duration },
    #[error("upstream {upstream} refused the connection: {reason}")]
    UpstreamUnreachable { upstream: String, reason: String },
    #[error("upstream {upstream} did not accept a connection within {timeout:?}")]
    UpstreamConnectTimeout { upstream: String, timeout: Duration },
    #[error("upstream {upstream} did not answer within {timeout:?}")]
    UpstreamTimeout { upstream: String, timeout: Duration },
    #[error("upstream {upstream} failed: {reason}")]
    UpstreamFailed { upstream: String, reason: String },
    #[error("upstream {upstream} refused the gateway's own credential for it; the operator must renew it (your key is fine)")]
    UpstreamAuthFailed { upstream: String },
    #[error("no API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`")]
    MissingKey,
    #[error("the API key is unknown or revoked")]
    InvalidKey,
    #[error("the request body is not valid JSON: {reason}")]
    InvalidJson { reason: String },
    #[error("the request names no `model`; add the model to charge for")]
    MissingModel,
    #[error("`{model}` has no price on this gateway; use a priced model or ask the operator to add it to the price file")]
    UnpricedModel { model: String },
    #[error("`{model}` has no price for service tier `{tier}`; use the default tier or ask the operator to price it")]
    UnpricedServiceTier { model: String, tier: String },
    #[error("the request enables the upstream's `{tool}` tool, which has no price on this gateway; ask the operator to price [tools.\"{tool}\"]")]
    UnpricedHostedTool { tool: &'static str },
    #[error("the request enables the upstream's `{tool}` tool, which the upstream bills by time the gateway cannot meter; run code on the client side")]
    UnmeteredHostedTool { tool: &'static str },
    #[error("the request enables a tool of type `{tool}`, which this gateway does not know how the upstream bills; it is not served")]
    UnknownHostedTool { tool: String },
    #[error("the request marks cache breakpoints (`cache_control`), and `{model}` has no cache-write prices on this gateway; leave them out or ask the operator to price cache_write_5m and cache_write_1h")]
    CacheWriteNotPriced { model: String },
    #[error("the request sets `{field}`, which changes what the upstream bills and has no price on this gateway; leave it out")]
    UnpricedOption { field: &'static str },
    #[error("`{field}` {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("this route is metered but the gateway has no price table")]
    NoPriceTable,
    #[error("{0}")]
    Refused(Box<Refusal>),
    #[error("this key may not use {what} `{name}`; ask the operator to widen the key's scope")]
    NotAllowed { what: &'static str, name: String },
    #[error("the request makes the upstream read input it does not carry (`{marker}`), which this route does not allow")]
    ServerContextRefused { marker: &'static str },
    #[error("background responses are not served: the gateway meters a response as it streams, and a background one is billed after the connection ends")]
    BackgroundRefused,
    #[error("the request sends or asks for audio (`{marker}`), which this gateway cannot price: providers bill audio tokens at their own rates and the price table has none; send text")]
    AudioRefused { marker: &'static str },
    #[error("the query parameter `{name}` is not accepted on a metered call: the upstream may read it in place of what the body says and is priced")]
    QueryParamRefused { name: String },
    #[error("a model request's body is read as JSON, and this one is sent as `{content_type}`; send `application/json`")]
    UnsupportedContentType { content_type: String },
    #[error("the path {reason}; send a normalised path")]
    InvalidPath { reason: &'static str },
    #[error("the request's Host {host:?} does not match the host of its target URI")]
    HostMismatch { host: String },
    #[error("this key is over its {cap} cap of {limit}; retry after {retry_after_secs} s")]
    TrafficCap { cap: &'static str, limit: u32, retry_after_secs: u64 },
}

/// How an error is shown to the client and the operator.
pub struct ErrorClass {
    pub status: StatusCode,
    /// Broad family, as in OpenAI-style error bodies.
    pub kind: &'static str,
    /// Stable, low-cardinality machine code (also used as a metric label).
    pub code: &'static str,
    /// Client mistakes log at debug, gateway or upstream trouble at warn.
    pub level: tracing::Level,
}

impl ProxyError {
    /// The single mapping from errors to responses. Exhaustive on purpose: a
    /// new variant does not compile until it has a status and a code.
    #[rustfmt::skip]
    pub fn class(&self) -> ErrorClass {
        use tracing::Level;
        use StatusCode as S;
        let (status, kind, code, level) = match self {
            ProxyError::RouteNotFound { .. } => (S::NOT_FOUND, "invalid_request_error", "route_not_found", Level::DEBUG),
            ProxyError::NotACall { .. } => (S::NOT_FOUND, "invalid_request_error", "not_a_metered_call", Level::DEBUG),
            ProxyError::MethodNotAllowed { .. } => (S::METHOD_NOT_ALLOWED, "invalid_request_error", "method_not_allowed", Level::DEBUG),
            ProxyError::MethodNotForwarded { .. } => (S::METHOD_NOT_ALLOWED, "invalid_request_error", "method_not_forwarded", Level::DEBUG),
            ProxyError::MethodOverride { .. } => (S::BAD_REQUEST, "invalid_request_error", "method_override_not_allowed", Level::DEBUG),
            ProxyError::BodyTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "invalid_request_error", "body_too_large", Level::DEBUG),
            ProxyError::BodyBudget => (S::SERVICE_UNAVAILABLE, "gateway_error", "gateway_busy", Level::WARN),
            ProxyError::QueryParamRefused { .. } => (S::BAD_REQUEST, "invalid_request_error", "query_param_not_accepted", Level::DEBUG),
            ProxyError::UnsupportedContentType { .. } => (S::UNSUPPORTED_MEDIA_TYPE, "invalid_request_error", "content_type_not_supported", Level::DEBUG),
            ProxyError::EncodedRequestBody { .. } => (S::UNSUPPORTED_MEDIA_TYPE, "invalid_request_error", "request_encoding_not_supported", Level::DEBUG),
            ProxyError::BodyTimeout { .. } => (S::REQUEST_TIMEOUT, "invalid_request_error", "body_timeout", Level::DEBUG),
            ProxyError::UpstreamUnreachable { .. } => (S::BAD_GATEWAY, "upstream_error", "upstream_unreachable", Level::WARN),
            ProxyError::UpstreamConnectTimeout { .. } => (S::GATEWAY_TIMEOUT, "upstream_error", "upstream_connect_timeout", Level::WARN),
            ProxyError::UpstreamTimeout { .. } => (S::GATEWAY_TIMEOUT, "upstream_error", "upstream_timeout", Level::WARN),
            ProxyError::UpstreamFailed { .. } => (S::BAD_GATEWAY, "upstream_error", "upstream_failed", Level::WARN),
            ProxyError::UpstreamAuthFailed { .. } => (S::BAD_GATEWAY, "upstream_error", "upstream_auth_failed", Level::ERROR),
            ProxyError::MissingKey => (S::UNAUTHORIZED, "authentication_error", "missing_api_key", Level::DEBUG),
            ProxyError::InvalidKey => (S::UNAUTHORIZED, "authentication_error", "invalid_api_key", Level::DEBUG),
            ProxyError::InvalidJson { .. } => (S::BAD_REQUEST, "invalid_request_error", "invalid_json", Level::DEBUG),
            ProxyError::MissingModel => (S::BAD_REQUEST, "invalid_request_error", "missing_model", Level::DEBUG),
            ProxyError::UnpricedModel { .. } => (S::BAD_REQUEST, "invalid_request_error", "model_not_priced", Level::DEBUG),
            ProxyError::UnpricedServiceTier { .. } => (S::BAD_REQUEST, "invalid_request_error", "service_tier_not_priced", Level::DEBUG),
            ProxyError::UnpricedHostedTool { .. } => (S::BAD_REQUEST, "invalid_request_error", "tool_not_priced", Level::DEBUG),
            ProxyError::UnmeteredHostedTool { .. } => (S::BAD_REQUEST, "invalid_request_error", "tool_not_metered", Level::DEBUG),
            ProxyError::UnknownHostedTool { .. } => (S::BAD_REQUEST, "invalid_request_error", "tool_not_priced", Level::DEBUG),
            ProxyError::CacheWriteNotPriced { .. } => (S::BAD_REQUEST, "invalid_request_error", "cache_write_not_priced", Level::DEBUG),
            ProxyError::UnpricedOption { .. } => (S::BAD_REQUEST, "invalid_request_error", "option_not_priced", Level::DEBUG),
            ProxyError::InvalidField { .. } => (S::BAD_REQUEST, "invalid_request_error", "invalid_field", Level::DEBUG),
            ProxyError::NoPriceTable => (S::SERVICE_UNAVAILABLE, "gateway_error", "no_price_table", Level::ERROR),
            ProxyError::Refused(refusal) => refusal_class(refusal),
            ProxyError::NotAllowed { .. } => (S::FORBIDDEN, "permission_error", "not_allowed_for_key", Level::DEBUG),
            ProxyError::ServerContextRefused { .. } => (S::BAD_REQUEST, "invalid_request_error", "server_context_not_allowed", Level::DEBUG),
            ProxyError::BackgroundRefused => (S::BAD_REQUEST, "invalid_request_error", "background_not_supported", Level::DEBUG),
            ProxyError::AudioRefused { .. } => (S::BAD_REQUEST, "invalid_request_error", "audio_not_priced", Level::DEBUG),
            ProxyError::InvalidPath { .. } => (S::BAD_REQUEST, "invalid_request_error", "invalid_path", Level::DEBUG),
            ProxyError::HostMismatch { .. } => (S::BAD_REQUEST, "invalid_request_error", "host_mismatch", Level::DEBUG),
            ProxyError::TrafficCap { .. } => (S::TOO_MANY_REQUESTS, "rate_limit_error", "traffic_cap", Level::DEBUG),
        };
        ErrorClass { status, kind, code, level }
    }

    /// The JSON error response: `{"error": {"type", "code", "message"}}`,
    /// plus the wallet facts for money refusals.
    pub fn to_response(&self) -> Response<Bytes> {
        let class = self.class();
        let mut body =
            json!({"error": {"type": class.kind, "code": class.code, "message": self.to_string()}});
        if let ProxyError::Refused(refusal) = self {
            add_refusal_facts(&mut body["error"], refusal);
        }
        let mut response = json_body(class.status, &body);
        if let ProxyError::TrafficCap { retry_after_secs, cap, limit } = self {
            body["error"]["cap"] = json!(cap);
            body["error"]["limit"] = json!(limit);
            response = json_body(class.status, &body);
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        }
        match self {
            ProxyError::BodyBudget => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
            }
            ProxyError::MethodNotAllowed { .. } => {
                response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
            }
            ProxyError::MethodNotForwarded { allowed, .. } => {
                if let Ok(allowed) = HeaderValue::from_str(allowed) {
                    response.headers_mut().insert(header::ALLOW, allowed);
                }
            }
            _ => {}
        }
        response
    }
}

/// Money refusals are 402; traffic and capacity refusals are 429; a ledger
/// that cannot record is 503 (never free service).
#[rustfmt::skip]
fn refusal_class(refusal: &Refusal) -> (StatusCode, &'static str, &'static str, tracing::Level) {
    use tracing::Level;
    match refusal {
        Refusal::InsufficientFunds { .. } => (StatusCode::PAYMENT_REQUIRED, "insufficient_credits", "insufficient_credits", Level::DEBUG),
        Refusal::SpendingLimit { .. } => (StatusCode::PAYMENT_REQUIRED, "spend_limit_reached", "spend_limit_reached", Level::DEBUG),
        Refusal::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "gateway_error", "ledger_unavailable", Level::ERROR),
        Refusal::TooManyOpenHolds { .. } | Refusal::EndUserCapacity { .. } => {
            (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", refusal.code(), Level::WARN)
        }
        Refusal::DuplicateRequest { .. } => (StatusCode::CONFLICT, "invalid_request_error", "duplicate_request", Level::DEBUG),
        Refusal::NotAPayer { .. } | Refusal::UnknownWallet { .. } => {
            (StatusCode::FORBIDDEN, "authentication_error", refusal.code(), Level::WARN)
        }
        Refusal::InvalidAmount { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "gateway_error", "invalid_amount", Level::ERROR),
    }
}

fn add_refusal_facts(error: &mut serde_json::Value, refusal: &Refusal) {
    let (view, required) = match refusal {
        Refusal::InsufficientFunds { wallet, required } => (wallet, *required),
        Refusal::SpendingLimit { wallet, required, limit } => {
            error["limit"] = json!({
                "subject": limit_subject(&limit.subject),
                "period": limit_period(limit.period),
                "cap": limit.cap.normalize().to_string(),
                "spent": limit.spent.normalize().to_string(),
                "resets_at": limit.resets_at,
            });
            error["resets_at"] = json!(limit.resets_at);
            (wallet, *required)
        }
        _ => return,
    };
    error["wallet"] = json!(match view.kind {
        WalletKind::Pool => "org",
        WalletKind::Lite => "lite",
    });
    error["available"] = json!(view.available.normalize().to_string());
    error["required"] = json!(required.normalize().to_string());
    if matches!(refusal, Refusal::InsufficientFunds { .. }) {
        error["resets_at"] = json!(view.resets_at);
    }
}

fn limit_subject(subject: &LimitSubject) -> &'static str {
    match subject {
        LimitSubject::Key(_) => "key",
        LimitSubject::User(_) => "user",
        LimitSubject::App(_) => "app",
        LimitSubject::EndUser { .. } => "end_user",
    }
}

fn limit_period(period: LimitPeriod) -> &'static str {
    match period {
        LimitPeriod::Request => "request",
        LimitPeriod::Day => "day",
        LimitPeriod::Month => "month",
        LimitPeriod::ContractYear => "contract_year",
    }
}

/// Most bytes of a client's text (a path, a model name) an error answer or
/// a log line repeats: the client chooses its length.
pub const ECHOED_BYTES: usize = 256;

/// `text` cut to at most [`ECHOED_BYTES`] bytes, at a character boundary.
pub fn clipped(text: &str) -> &str {
    if text.len() <= ECHOED_BYTES {
        return text;
    }
    let mut end = ECHOED_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Build a JSON error response in the gateway's one error shape.
pub fn json_error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response<Bytes> {
    json_body(status, &json!({"error": {"type": kind, "code": code, "message": message}}))
}

fn json_body(status: StatusCode, body: &serde_json::Value) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn clipped_text_keeps_whole_characters() {
        assert_eq!(clipped("short"), "short");
        let long = "é".repeat(200); // 400 bytes
        let clip = clipped(&long);
        assert_eq!(clip.len(), ECHOED_BYTES);
        assert!(long.starts_with(clip));
        let odd = format!("a{long}"); // a boundary at 256 falls inside an é
        assert_eq!(clipped(&odd).len(), ECHOED_BYTES - 1);
    }

    #[test]
    fn a_ledger_that_cannot_record_answers_503_never_free_service() {
        let error = ProxyError::Refused(Box::new(Refusal::Unavailable { reason: "disk full".into() }));
        let response = error.to_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["error"]["code"], "ledger_unavailable");
    }
}
