//! The admin listener (separate port, loopback by default).
//!
//! Open endpoints:
//! - `GET /healthz` — 200 while the process is up.
//! - `GET /readyz` — 200 once the store is open and state is loaded, 503
//!   before that and during shutdown.
//! - `GET /metrics` — Prometheus text.
//!
//! Operator endpoints (`Authorization: Bearer <operator token>`):
//! - `GET /admin/v1/prices` — the price table in force: version, loaded-at,
//!   last reload error.
//! - `POST /admin/v1/prices/reload` — re-read the price file; 200 with the new
//!   status, or 422 with every problem (the old table stays in force).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::clock::Clock;
use crate::pricing::{LivePrices, PriceLoadError};
use crate::proxy::{json_error, json_response, GatewayBody};
use crate::telemetry::metrics::Metrics;

/// Readiness latch: set once start-up is complete, cleared on shutdown.
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

pub struct Admin {
    pub readiness: Arc<Readiness>,
    pub prices: Option<Arc<LivePrices>>,
    pub metrics: Arc<Metrics>,
    pub operator_token: Option<String>,
    pub clock: Arc<dyn Clock>,
}

impl Admin {
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<GatewayBody>, Infallible> {
        let path = request.uri().path();
        let response = match (request.method(), path) {
            (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
            (&Method::GET, "/readyz") if self.readiness.is_ready() => {
                json_response(StatusCode::OK, &json!({"status": "ready"}))
            }
            (&Method::GET, "/readyz") => {
                json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "not_ready"}))
            }
            (&Method::GET, "/metrics") => self.metrics_text(),
            (_, p) if p.starts_with("/admin/v1/") => match self.refuse_unauthorized(&request) {
                None => self.operator(request.method(), p),
                Some(refusal) => refusal,
            },
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no admin endpoint at {path}"),
            ),
        };
        Ok(response)
    }

    /// Check the operator token in constant time; the refusal if it fails.
    fn refuse_unauthorized(&self, request: &Request<Incoming>) -> Option<Response<GatewayBody>> {
        let Some(expected) = &self.operator_token else {
            return Some(error(
                StatusCode::FORBIDDEN,
                "admin_disabled",
                "the admin API is off: set the environment variable named by [admin] token_env",
            ));
        };
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
            None
        } else {
            Some(error(
                StatusCode::UNAUTHORIZED,
                "invalid_admin_token",
                "send the operator token as `Authorization: Bearer <token>`",
            ))
        }
    }

    fn operator(&self, method: &Method, path: &str) -> Response<GatewayBody> {
        match (method, path) {
            (&Method::GET, "/admin/v1/prices") => match &self.prices {
                Some(prices) => json_response(StatusCode::OK, &json!(prices.status())),
                None => no_prices(),
            },
            (&Method::POST, "/admin/v1/prices/reload") => self.reload_prices(),
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no admin endpoint {method} {path}"),
            ),
        }
    }

    fn reload_prices(&self) -> Response<GatewayBody> {
        let Some(prices) = &self.prices else {
            return no_prices();
        };
        match prices.reload(self.clock.now(), "admin api") {
            Ok(_) => json_response(StatusCode::OK, &json!(prices.status())),
            Err(load_error) => {
                let problems: Vec<String> = match &load_error {
                    PriceLoadError::Invalid(errors) => errors
                        .problems
                        .iter()
                        .map(|p| format!("{}:{}:{}: {}", errors.file, p.line, p.column, p.message))
                        .collect(),
                    other => vec![other.to_string()],
                };
                let body = json!({"error": {
                    "type": "invalid_request_error",
                    "code": "price_file_invalid",
                    "message": "the price file was not loaded; the previous table stays in force",
                    "problems": problems,
                    "active_version": prices.status().version,
                }});
                json_response(StatusCode::UNPROCESSABLE_ENTITY, &body)
            }
        }
    }

    fn metrics_text(&self) -> Response<GatewayBody> {
        let mut response = Response::new(GatewayBody::local(self.metrics.render().into()));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        response
    }
}

fn no_prices() -> Response<GatewayBody> {
    error(
        StatusCode::NOT_FOUND,
        "no_price_table",
        "this gateway has no [pricing] file configured",
    )
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<GatewayBody> {
    json_error(status, "admin_error", code, message).map(GatewayBody::local)
}
