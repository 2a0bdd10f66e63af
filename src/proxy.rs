//! The data path: every client request runs through named phases with a typed
//! context ([`RequestCtx`]), in the manner of pingora's `ProxyHttp`.
//!
//! | phase | runs | returns | default |
//! |---|---|---|---|
//! | [`Proxy::request_filter`] | first, before the body is read | `Err` answers the client at once | refuses bodies whose declared length is over the limit |
//! | [`Proxy::route`] | after `request_filter` | the route, or 404 | longest matching prefix |
//! | [`Proxy::upstream_request`] | once a route is chosen | the request to send | same method, path, query, headers and body, minus hop-by-hop headers and the client's credential, plus the upstream's |
//! | [`Proxy::forward`] | after `upstream_request` | the upstream's response head, or 502/504/413 | — |
//! | [`Proxy::response_filter`] | on the upstream's response head | — | strips hop-by-hop headers |
//! | [`Proxy::settle`] | **always**, exactly once, when the client's response body ends or is dropped | — | writes the access log line |
//!
//! Bodies stream in both directions: nothing here buffers a whole request or
//! response.

mod body;
mod context;
mod error;
mod headers;
mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Limited};
use hyper::body::Incoming;
use tracing::Instrument;

pub use body::GatewayBody;
pub use context::{Outcome, RequestCtx};
pub use error::{json_error, ErrorClass, ProxyError};
pub use headers::REQUEST_ID;

use crate::config::{GatewayConfig, Route, Upstream};
use crate::pricing::LivePrices;
use crate::telemetry::metrics::{Metrics, RequestLabels};
use upstream::{UpstreamBody, UpstreamClients};

/// The gateway's request handler, shared by all connections.
pub struct Proxy {
    config: Arc<GatewayConfig>,
    upstreams: UpstreamClients,
    /// The price table in force; `None` when every route is pass-through.
    prices: Option<Arc<LivePrices>>,
    metrics: Arc<Metrics>,
}

impl Proxy {
    pub fn new(config: Arc<GatewayConfig>, prices: Option<Arc<LivePrices>>, metrics: Arc<Metrics>) -> Self {
        let upstreams = UpstreamClients::new(&config.upstreams);
        Proxy {
            config,
            upstreams,
            prices,
            metrics,
        }
    }

    /// Entry point for one request: run the phases, turn any error into the
    /// gateway's JSON error, tag the response with the request id and attach
    /// the settle phase to the response body.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<GatewayBody>, Infallible> {
        let request_id = headers::request_id(request.headers());
        let mut ctx = RequestCtx::new(request_id, peer, request.method().clone(), request.uri().clone());
        let span = ctx.span.clone();
        let result = self.run_phases(&mut ctx, request).instrument(span).await;
        let mut response = match result {
            Ok(response) => response,
            Err(error) => {
                let class = error.class();
                ctx.error_code = Some(class.code);
                log_error(&ctx.span, class.level, class.code, &error);
                error.to_response().map(GatewayBody::local)
            }
        };
        ctx.status = response.status();
        response.headers_mut().insert(&REQUEST_ID, ctx.request_id.clone());
        response.body_mut().settle_with(self.clone(), ctx);
        Ok(response)
    }

    async fn run_phases(
        &self,
        ctx: &mut RequestCtx,
        request: Request<Incoming>,
    ) -> Result<Response<GatewayBody>, ProxyError> {
        self.request_filter(ctx, &request)?;
        let route = self.route(ctx, &request)?;
        let upstream = self.upstream_of(route);
        let upstream_request = self.upstream_request(ctx, upstream, request)?;
        let mut response = self.forward(ctx, route, upstream_request).await?;
        self.response_filter(ctx, &mut response);
        Ok(response.map(|body| GatewayBody::upstream(body, upstream.idle_timeout)))
    }

    fn upstream_of(&self, route: &Route) -> &Upstream {
        // Validation guarantees every route's upstream index exists.
        &self.config.upstreams[route.upstream]
    }

    /// Phase: early checks on the request head. Refuses a declared body length
    /// over the limit before a byte of it is read.
    pub fn request_filter(
        &self,
        _ctx: &mut RequestCtx,
        request: &Request<Incoming>,
    ) -> Result<(), ProxyError> {
        let limit_bytes = self.config.server.max_body_bytes;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match declared {
            Some(length) if length > limit_bytes => Err(ProxyError::BodyTooLarge { limit_bytes }),
            _ => Ok(()),
        }
    }

    /// Phase: pick the route (and so the upstream) for the request.
    pub fn route(&self, ctx: &mut RequestCtx, request: &Request<Incoming>) -> Result<&Route, ProxyError> {
        let host = request
            .uri()
            .host()
            .or_else(|| request.headers().get(header::HOST).and_then(|h| h.to_str().ok()));
        let route =
            self.config
                .route_for(host, request.uri().path())
                .ok_or_else(|| ProxyError::RouteNotFound {
                    path: request.uri().path().to_owned(),
                })?;
        ctx.upstream = Some(route.upstream);
        ctx.route_prefix = Some(route.prefix.clone());
        Ok(route)
    }

    /// Phase: build the upstream request. Method, path, query, end-to-end
    /// headers and the body stream pass unchanged; hop-by-hop headers and the
    /// client's credential are removed; the upstream's credential and the
    /// request id are added. The body is capped at `max_body_bytes`.
    pub fn upstream_request(
        &self,
        ctx: &mut RequestCtx,
        upstream: &Upstream,
        request: Request<Incoming>,
    ) -> Result<Request<UpstreamBody>, ProxyError> {
        let (mut parts, body) = request.into_parts();
        parts.uri = upstream::upstream_uri(upstream, &parts.uri).map_err(|e| ProxyError::UpstreamFailed {
            upstream: upstream.name.clone(),
            reason: format!("cannot build upstream URI: {e}"),
        })?;
        parts.version = upstream::upstream_version(upstream);
        let headers = &mut parts.headers;
        headers::strip_hop_by_hop(headers);
        headers::strip_client_credentials(headers);
        // The pooled client sets Host from the upstream URI.
        headers.remove(header::HOST);
        if let Some(credential) = &upstream.credential {
            headers.insert(credential.header.clone(), credential.value.clone());
        }
        headers.insert(&REQUEST_ID, ctx.request_id.clone());
        let limit = usize::try_from(self.config.server.max_body_bytes).unwrap_or(usize::MAX);
        Ok(Request::from_parts(
            parts,
            Either::Left(Limited::new(body, limit)),
        ))
    }

    /// Phase: send upstream and wait for the response head.
    pub async fn forward(
        &self,
        ctx: &mut RequestCtx,
        route: &Route,
        request: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let upstream = self.upstream_of(route);
        let response = self
            .upstreams
            .send(
                route.upstream,
                upstream,
                self.config.server.max_body_bytes,
                request,
            )
            .await?;
        ctx.upstream_status = Some(response.status());
        Ok(response)
    }

    /// Phase: adjust the upstream's response head before it goes to the client.
    pub fn response_filter(&self, _ctx: &mut RequestCtx, response: &mut Response<Incoming>) {
        headers::strip_hop_by_hop(response.headers_mut());
    }

    /// Phase: runs exactly once per request on every path — success, gateway
    /// error, upstream failure, client disconnect — when the response body
    /// ends or is dropped. Writes the access log line.
    pub fn settle(&self, ctx: RequestCtx, outcome: Outcome) {
        let upstream = ctx
            .upstream
            .and_then(|i| self.config.upstreams.get(i))
            .map_or("-", |u| u.name.as_str());
        let route = ctx.route_prefix.clone().unwrap_or_else(|| "none".to_owned());
        let status = ctx.status.as_u16();
        self.metrics.requests.get_or_create(&RequestLabels { route, status }).inc();
        let _entered = ctx.span.enter();
        tracing::info!(
            target: "creditgate::access",
            status = ctx.status.as_u16(),
            upstream,
            upstream_status = ctx.upstream_status.map(|s| s.as_u16()),
            error_code = ctx.error_code,
            outcome = outcome.as_str(),
            response_bytes = ctx.response_bytes,
            duration_us = u64::try_from(ctx.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            peer = %ctx.peer,
            "request finished"
        );
    }
}

fn log_error(span: &tracing::Span, level: tracing::Level, code: &str, error: &ProxyError) {
    let _entered = span.enter();
    if level == tracing::Level::WARN {
        tracing::warn!(code, %error, "request failed");
    } else {
        tracing::debug!(code, %error, "request refused");
    }
}

/// A plain JSON response the gateway makes itself (admin, health).
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<GatewayBody> {
    let mut response = Response::new(GatewayBody::local(value.to_string().into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
