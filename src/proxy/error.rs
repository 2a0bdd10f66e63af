//! Every way a proxied request can fail, and the one place that turns a
//! failure into an HTTP response.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// A request the gateway answers itself instead of (or after) the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route serves {path}")]
    RouteNotFound { path: String },
    #[error("request body exceeds the {limit_bytes}-byte limit")]
    BodyTooLarge { limit_bytes: u64 },
    #[error("upstream {upstream} refused the connection: {reason}")]
    UpstreamUnreachable { upstream: String, reason: String },
    #[error("upstream {upstream} did not accept a connection within {timeout:?}")]
    UpstreamConnectTimeout { upstream: String, timeout: Duration },
    #[error("upstream {upstream} did not answer within {timeout:?}")]
    UpstreamTimeout { upstream: String, timeout: Duration },
    #[error("upstream {upstream} failed: {reason}")]
    UpstreamFailed { upstream: String, reason: String },
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
    pub fn class(&self) -> ErrorClass {
        use tracing::Level;
        let (status, kind, code, level) = match self {
            ProxyError::RouteNotFound { .. } => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "route_not_found",
                Level::DEBUG,
            ),
            ProxyError::BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "body_too_large",
                Level::DEBUG,
            ),
            ProxyError::UpstreamUnreachable { .. } => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "upstream_unreachable",
                Level::WARN,
            ),
            ProxyError::UpstreamConnectTimeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_error",
                "upstream_connect_timeout",
                Level::WARN,
            ),
            ProxyError::UpstreamTimeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_error",
                "upstream_timeout",
                Level::WARN,
            ),
            ProxyError::UpstreamFailed { .. } => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "upstream_failed",
                Level::WARN,
            ),
        };
        ErrorClass {
            status,
            kind,
            code,
            level,
        }
    }

    /// The JSON error response: `{"error": {"type", "code", "message"}}`.
    pub fn to_response(&self) -> Response<Bytes> {
        let class = self.class();
        json_error(class.status, class.kind, class.code, &self.to_string())
    }
}

/// Build a JSON error response in the gateway's one error shape.
pub fn json_error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response<Bytes> {
    let body = serde_json::json!({
        "error": { "type": kind, "code": code, "message": message }
    });
    let mut response = Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
