//! The admin listener (separate port, loopback by default).
//!
//! Endpoints:
//! - `GET /healthz` — 200 while the process is up.
//! - `GET /readyz` — 200 once the store is open and state is loaded, 503 before
//!   and during shutdown.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::proxy::{json_response, GatewayBody};

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
}

impl Admin {
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<GatewayBody>, Infallible> {
        let response = match (request.method(), request.uri().path()) {
            (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
            (&Method::GET, "/readyz") if self.readiness.is_ready() => {
                json_response(StatusCode::OK, &json!({"status": "ready"}))
            }
            (&Method::GET, "/readyz") => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "not_ready"}),
            ),
            (_, path) => json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": {"type": "invalid_request_error", "code": "not_found", "message": format!("no admin endpoint at {path}")}}),
            ),
        };
        Ok(response)
    }
}
