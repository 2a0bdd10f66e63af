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

mod audio;
mod body;
mod body_budget;
mod cache_marks;
mod charge;
mod context;
mod error;
pub(crate) mod headers;
mod json_members;
mod model_fields;
pub(crate) mod path;
mod plain_pool;
mod read_on;
mod server_context;
mod traffic;
mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use body::GatewayBody;
/// Request-body field extraction, public for the fuzz targets.
pub use charge::{cap_field, edited_body, read_model_request, with_include_usage, BodyEdits, ModelRequest};
pub use context::{Outcome, RequestCtx};
pub use error::{json_error, ErrorClass, ProxyError};
pub use headers::REQUEST_ID;
/// The plain-HTTP/1.1 upstream pool, public for the bench's floors, which use it too.
pub use plain_pool::{PlainError, PlainPool};
pub use upstream::{UpstreamBody, WithoutTrailers};

use crate::alerts::{Alerts, Signal};
use crate::clock::Clock;
use crate::cluster::{self, LeaseBook};
use crate::config::{Flavour, GatewayConfig, Route, RouteKind, Scheduler, Upstream};
use crate::ledger::ids::{KeyId, RequestId, WalletId};
use crate::ledger::Refusal;
use crate::ledger::{Ledger, SpendContext};
use crate::pricing::{LivePrices, ModelPrice};
use crate::telemetry::metrics::{
    CachedCounters, ItemLabels, Metrics, ReasonLabels, RequestLabels, ResultLabels, SharedText,
};
use charge::Reservation;
use charge::{OutputPlan, Priced};
use upstream::UpstreamClients;

/// The gateway's request handler, shared by all connections.
pub struct Proxy {
    config: Arc<GatewayConfig>,
    upstreams: UpstreamClients,
    /// The price table in force; `None` when every route is pass-through.
    prices: Option<Arc<LivePrices>>,
    ledger: Arc<Ledger>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    traffic: traffic::TrafficCaps,
    alerts: Arc<Alerts>,
    /// Work a request leaves behind (reading on after a client left); the
    /// gateway waits for it before the store writer stops.
    background: TaskTracker,
    shutdown: CancellationToken,
    /// When the shutdown began (noted by the gateway as it begins, or by the
    /// first work that sees it): the grace period counts from there.
    shutdown_began: std::sync::OnceLock<tokio::time::Instant>,
    /// Cluster mode: the leases credit is held under (see `cluster::spend`).
    leases: Option<Arc<LeaseBook>>,
    /// Bounds the request bodies read whole at once.
    body_budget: body_budget::BodyBudget,
    /// The counters most requests increment: each route's 200s, and the
    /// settles by how they ended.
    ok_requests: CachedCounters,
    settles: CachedCounters,
}

impl Proxy {
    pub fn new(
        config: Arc<GatewayConfig>,
        prices: Option<Arc<LivePrices>>,
        ledger: Arc<Ledger>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        alerts: Arc<Alerts>,
        shutdown: CancellationToken,
    ) -> Self {
        let client_sets = match config.server.scheduler {
            Scheduler::WorkStealing => 1,
            Scheduler::ThreadPerCore => config.server.proxy_threads(),
        };
        let upstreams = UpstreamClients::new(&config.upstreams, client_sets);
        let traffic = traffic::TrafficCaps::new(config.traffic.clone());
        let background = TaskTracker::new();
        let body_budget = body_budget::BodyBudget::new(
            config.server.max_buffered_body_bytes,
            config.server.max_buffered_body_bytes_per_org,
        );
        Proxy {
            ok_requests: CachedCounters::new(config.routes.len()),
            settles: CachedCounters::new(charge::SETTLE_LABELS.len()),
            body_budget,
            config,
            upstreams,
            prices,
            ledger,
            clock,
            metrics,
            traffic,
            alerts,
            background,
            shutdown,
            shutdown_began: std::sync::OnceLock::new(),
            leases: None,
        }
    }

    /// Cluster mode: holds take credit from these leases as well as the
    /// replica's view of the books.
    pub fn with_leases(mut self, leases: Arc<LeaseBook>) -> Self {
        self.leases = Some(leases);
        self
    }

    /// When the shutdown's grace period ends, once the shutdown began.
    pub fn grace_ends(&self) -> Option<tokio::time::Instant> {
        if !self.shutdown.is_cancelled() {
            return None;
        }
        let began = *self.shutdown_began.get_or_init(tokio::time::Instant::now);
        Some(began + self.config.server.shutdown_grace)
    }

    /// Resolves when the shutdown's grace period is over: work a request left
    /// behind gets the grace the requests still on the listeners get.
    pub async fn grace_over(&self) {
        self.shutdown.cancelled().await;
        if let Some(ends) = self.grace_ends() {
            tokio::time::sleep_until(ends).await;
        }
    }

    /// Wait for the work requests left behind (each ends by itself within
    /// `read_on_timeout`, or when the shutdown's grace period ends).
    pub async fn drain_background(&self) {
        self.background.close();
        self.background.wait().await;
    }

    /// Entry point for one request: run the phases, turn any error into the
    /// gateway's JSON error, tag the response with the request id and attach
    /// the settle phase to the response body.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<GatewayBody>, Infallible> {
        let request_id = headers::mint_request_id();
        // Boxed: the context is large, and it moves from here to the
        // response body, whose settle takes it.
        let mut ctx = Box::new(RequestCtx::new(request_id, peer, request.method(), request.uri()));
        ctx.client_request_id = headers::client_request_id(request.headers());
        let span = ctx.span.clone();
        let result = self.run_phases(&mut ctx, request).instrument(span).await;
        let mut response = match result {
            Ok(response) => response,
            Err(error) => {
                self.signal_refusal(&error);
                let class = error.class();
                ctx.error_code = Some(class.code);
                log_error(&ctx.span, class.level, class.code, &error);
                error.to_response().map(GatewayBody::local)
            }
        };
        ctx.status = response.status();
        response.headers_mut().insert(&REQUEST_ID, ctx.request_id.clone());
        if let Some(cap) = ctx.charge.as_ref().and_then(|c| c.output_cap) {
            response.headers_mut().insert(&charge::OUTPUT_CAP, HeaderValue::from(cap));
        }
        if let Some(available) =
            ctx.wallet.and_then(|w| self.ledger.available(w)).and_then(charge::available_header)
        {
            response.headers_mut().insert(&charge::AVAILABLE, available);
        }
        response.body_mut().settle_with(self.clone(), ctx);
        Ok(response)
    }

    async fn run_phases(
        self: &Arc<Self>,
        ctx: &mut RequestCtx,
        mut request: Request<Incoming>,
    ) -> Result<Response<GatewayBody>, ProxyError> {
        self.request_filter(ctx, &request)?;
        normalise_path(&mut request)?;
        let route = self.route(ctx, &request)?;
        let upstream = self.upstream_of(route);
        let (parts, body) = self.charge(ctx, route, request).await?;
        let upstream_request = self.upstream_request(ctx, upstream, parts, body)?;
        let mut response = self.forward(ctx, route, upstream_request).await?;
        self.response_filter(ctx, upstream, &mut response);
        // The upstream refused the operator's credential, which the gateway
        // sent in place of the client's: its answer (`invalid_api_key`, a
        // fragment of the operator's key) would tell the client its own key
        // is bad. The call charges nothing, as any upstream error.
        if upstream.credential.is_some()
            && matches!(
                response.status(),
                StatusCode::UNAUTHORIZED | StatusCode::PROXY_AUTHENTICATION_REQUIRED
            )
        {
            return Err(ProxyError::UpstreamAuthFailed { upstream: upstream.name.clone() });
        }
        let max_duration = self.config.server.max_response_duration;
        Ok(response.map(|body| GatewayBody::upstream(body, upstream.idle_timeout, max_duration)))
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
        // hyper parsed `Content-Length` already: a body of known length
        // hints exactly that.
        match request.body().size_hint().exact() {
            Some(length) if length > limit_bytes => Err(ProxyError::BodyTooLarge { limit_bytes }),
            _ => Ok(()),
        }
    }

    /// Phase: pick the route (and so the upstream) for the request, on its
    /// normalised path. A target URI's host and the `Host` header must agree,
    /// so no one value picks the route while another reaches the upstream.
    pub fn route(&self, ctx: &mut RequestCtx, request: &Request<Incoming>) -> Result<&Route, ProxyError> {
        let header_host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok());
        let host = match (request.uri().host(), header_host) {
            (Some(uri_host), Some(header_host)) if !same_host(uri_host, header_host) => {
                return Err(ProxyError::HostMismatch { host: header_host.chars().take(256).collect() })
            }
            (Some(uri_host), _) => Some(uri_host),
            (None, header_host) => header_host,
        };
        let route = self.config.route_for(host, request.uri().path()).ok_or_else(|| {
            ProxyError::RouteNotFound { path: error::clipped(request.uri().path()).to_owned() }
        })?;
        ctx.upstream = Some(route.upstream);
        ctx.route_prefix = Some(route.prefix.clone());
        ctx.route_index = self.config.routes.iter().position(|r| std::ptr::eq(r, route));
        // Beside a create path, or with GET or DELETE on one, a model route
        // would list, read or remove stored objects.
        if !route.creates_calls(request.uri().path()) {
            return Err(ProxyError::NotACall { path: request.uri().path().chars().take(256).collect() });
        }
        if matches!(route.kind, RouteKind::Model(_)) && request.method() != http::Method::POST {
            return Err(ProxyError::MethodNotAllowed { method: request.method().clone() });
        }
        if let Some(allowed) = &route.limits.methods {
            if !allowed.contains(request.method()) {
                let allowed = allowed.iter().map(http::Method::as_str).collect::<Vec<_>>().join(", ");
                return Err(ProxyError::MethodNotForwarded { method: request.method().clone(), allowed });
            }
        }
        // Some upstreams (Google's APIs among them) serve the method a header
        // names instead of the request's: a metered POST could read stored
        // objects, and a GET through a read-only pass-through could create a
        // call. Only a pass-through free to forward any method passes them.
        if route.kind != RouteKind::Passthrough || route.limits.methods.is_some() {
            if let Some(header) = headers::method_override(request.headers()) {
                return Err(ProxyError::MethodOverride { header });
            }
        }
        Ok(route)
    }

    /// Phases identify, price and hold. Every route but a `public`
    /// pass-through needs a key, so the operator's upstream credential is
    /// only ever used on behalf of a known caller. Model requests are read
    /// whole (up to the body limit) to find `model`, the output cap and the
    /// choice count; the output cap that was held is the one that goes
    /// upstream. Tool and pass-through bodies stream through unread.
    pub async fn charge(
        &self,
        ctx: &mut RequestCtx,
        route: &Route,
        request: Request<Incoming>,
    ) -> Result<(http::request::Parts, UpstreamBody), ProxyError> {
        let limit = self.config.server.max_body_bytes;
        let (parts, incoming) = request.into_parts();
        let streamed = |incoming| {
            Either::Left(WithoutTrailers(Limited::new(
                incoming,
                usize::try_from(limit).unwrap_or(usize::MAX),
            )))
        };
        if route.kind == RouteKind::Passthrough && route.limits.public {
            return Ok((parts, streamed(incoming)));
        }
        let (key, end_user) = charge::identify(&self.ledger, &parts.headers)?;
        ctx.authenticated = true;
        if !self.ledger.key_allows(key.key, &route.prefix, None) {
            return Err(ProxyError::NotAllowed { what: "route", name: route.prefix.to_string() });
        }
        ctx.in_flight = self.traffic.admit(key.key)?;
        if route.kind == RouteKind::Passthrough {
            return Ok((parts, streamed(incoming)));
        }
        ctx.wallet = Some(key.wallet);
        let table = self.prices.as_ref().ok_or(ProxyError::NoPriceTable)?.current();
        let now = self.clock.now();
        let request_id = ledger_request_id(&ctx.request_id);
        let context = SpendContext { key: key.key, end_user: end_user.as_deref() };
        let (body, priced, hold, held_cost, output_cap, injected_usage, estimated_input) = match &route.kind {
            RouteKind::Model(flavour) => {
                if let Some(query) = parts.uri.query() {
                    let allowed = &self.config.upstreams[route.upstream].model_query_params;
                    charge::check_query(query, allowed, *flavour)?;
                }
                charge::check_content_type(&parts.headers)?;
                // The body is priced as sent; an upstream that decodes it
                // (deflate, brotli) could read another document. Every value
                // is checked, and every token of each (`identity, deflate`).
                for encoding in parts.headers.get_all(header::CONTENT_ENCODING) {
                    let encoding = String::from_utf8_lossy(encoding.as_bytes());
                    if encoding.split(',').any(|token| !token.trim().eq_ignore_ascii_case("identity")) {
                        return Err(ProxyError::EncodedRequestBody {
                            encoding: encoding.chars().take(64).collect(),
                        });
                    }
                }
                let timeout = self.config.server.body_read_timeout;
                // The budget is taken while the body is read and parsed; the
                // bytes then go upstream.
                let (bytes, _budget) =
                    tokio::time::timeout(timeout, self.body_budget.read(incoming, limit, key.org))
                        .await
                        .map_err(|_| ProxyError::BodyTimeout { timeout })??;
                let upstream = &self.config.upstreams[route.upstream];
                // The cap field this upstream reads (OpenAI's chat reads
                // `max_tokens` too; servers set to `max_tokens` read only
                // that), and the one the gateway writes a cap into.
                let cap_field = match flavour {
                    Flavour::OpenaiChat => Some(upstream.chat_cap_field),
                    _ => charge::cap_field(*flavour),
                };
                let fields = charge::read_model_request_for(&bytes, *flavour, cap_field)?;
                charge::check_deployment(&upstream.base_path, parts.uri.path(), &fields.model)?;
                let price = charge::price_model(&table, &fields.model, fields.service_tier.as_deref(), now)?;
                let requested_tier = fields
                    .service_tier
                    .as_deref()
                    .map_or(crate::meter::ServiceTier::Default, crate::meter::ServiceTier::from_name);
                if *flavour == Flavour::AnthropicMessages {
                    // Anthropic bills a 1M-context call above 200k input
                    // tokens at long-context rates, on the whole call.
                    if !price.has_long_context_prices()
                        && charge::asks_anthropic_beta(&parts.headers, "context-1m")
                    {
                        return Err(ProxyError::UnpricedOption { field: "anthropic-beta: context-1m" });
                    }
                    // Server-side compaction is a summarising pass billed
                    // apart from the usage the response reports.
                    if charge::asks_anthropic_beta(&parts.headers, "compact-") {
                        return Err(ProxyError::UnpricedOption { field: "anthropic-beta: compact" });
                    }
                }
                if fields.cache_breakpoints && !price.cache_writes_priced() {
                    return Err(ProxyError::CacheWriteNotPriced { model: fields.model });
                }
                self.check_item_allowed(key.key, route, &fields.model)?;
                let context_tokens = match fields.server_context {
                    Some(marker) if route.limits.context_budget_tokens == 0 => {
                        return Err(ProxyError::ServerContextRefused { marker })
                    }
                    Some(_) => route.limits.context_budget_tokens,
                    None => 0,
                }
                .saturating_add(fields.tool_prompt_tokens);
                let request_bytes = bytes.len() as u64;
                let hosted = charge::hosted_tools_hold(&table, &fields, route.limits.max_tool_calls, now)?;
                let tool_calls = hosted.calls_to_send;
                let plan = OutputPlan {
                    hosted_fee: hosted.fee,
                    hosted_cost: hosted.cost,
                    ..OutputPlan::new(&fields, *flavour, &price, context_tokens)
                };
                let (hold, plan) = self
                    .hold_model(key.wallet, request_id, &price, request_bytes, plan, route, context, now)
                    .await?;
                let inject = *flavour == Flavour::OpenaiChat && fields.stream && !fields.include_usage;
                let cap_edit = match (cap_field, plan.cap) {
                    (Some(field), Some(cap)) if fields.max_output_tokens != Some(cap) => Some((field, cap)),
                    _ => None,
                };
                let (max_tool_calls, anthropic_max_uses) = match flavour {
                    Flavour::AnthropicMessages => (None, tool_calls),
                    _ => (tool_calls, None),
                };
                let edits =
                    BodyEdits { cap: cap_edit, include_usage: inject, max_tool_calls, anthropic_max_uses };
                let bytes = if edits == BodyEdits::default() {
                    bytes
                } else {
                    charge::edited_body(&bytes, edits).ok_or_else(|| ProxyError::InvalidJson {
                        reason: "the body must be a JSON object".into(),
                    })?
                };
                // At most the hold (markups are not negative), so it fits where the hold did.
                let held_cost =
                    charge::model_hold_cost(&price, request_bytes, &plan).unwrap_or_else(|| hold.amount());
                // A call that may run the upstream's own tools has an estimate
                // of none: the calls made before a cut are billed, not all seen.
                let estimated_input = fields
                    .hosted_tools
                    .is_empty()
                    .then(|| charge::estimated_input_tokens(request_bytes, context_tokens));
                let reasons_unseen = price.reasons_unseen() || fields.asks_reasoning;
                let priced = Priced::Model {
                    name: Arc::from(fields.model),
                    price,
                    flavour: *flavour,
                    web_search_preview: fields.web_search_preview,
                    cache_longer_lifetime: fields.cache_longer_lifetime,
                    requested_tier,
                    held_output_tokens: plan.cap.unwrap_or(0).saturating_mul(plan.choices),
                    hosted_calls_held: (!fields.hosted_tools.is_empty()).then_some(hosted.calls_held),
                    reasons_unseen,
                };
                (Either::Right(Full::new(bytes)), priced, hold, held_cost, plan.cap, inject, estimated_input)
            }
            RouteKind::Tool { name, units_header } => {
                let price = charge::price_tool(&table, name, now)?;
                self.check_item_allowed(key.key, route, name)?;
                let held = charge::tool_hold_amount(&price, units_header.as_ref(), route.limits.max_units)?;
                let priced = Priced::Tool {
                    name: Arc::from(name.as_str()),
                    price,
                    units_header: units_header.clone(),
                };
                let hold = self.hold(key.wallet, request_id, held.price, context, now).await?;
                // A tool call is charged its units or its hold, never an estimate.
                (streamed(incoming), priced, hold, held.cost, None, false, None)
            }
            RouteKind::Passthrough => return Ok((parts, streamed(incoming))),
        };
        ctx.charge = Some(charge::Charge {
            key,
            end_user,
            request_id,
            route: route.prefix.clone(),
            table,
            priced_at: now,
            priced: Some(priced),
            estimated_input_tokens: estimated_input,
            limits: route.limits.clone(),
            output_cap,
            hold: Some(hold),
            held_cost,
            meter: None,
            injected_usage,
            upstream_status: None,
            tool_units: None,
            sent: false,
            clock: self.clock.clone(),
        });
        Ok((parts, body))
    }

    fn check_item_allowed(&self, key: KeyId, route: &Route, item: &str) -> Result<(), ProxyError> {
        if self.ledger.key_allows(key, &route.prefix, Some(item)) {
            Ok(())
        } else {
            Err(ProxyError::NotAllowed { what: "model", name: item.to_owned() })
        }
    }

    /// Phase hold for a model request. A request that named no output cap
    /// and cannot afford the default one is offered the largest cap its
    /// wallet can pay, down to the route's `min_output_tokens`: small
    /// balances are not refused for a worst case the caller never asked for.
    #[allow(clippy::too_many_arguments)]
    async fn hold_model(
        &self,
        wallet: WalletId,
        request_id: RequestId,
        price: &ModelPrice,
        request_bytes: u64,
        plan: OutputPlan,
        route: &Route,
        context: SpendContext<'_>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(Reservation, OutputPlan), ProxyError> {
        let amount = charge::model_hold_amount(price, request_bytes, &plan)?;
        match self.hold(wallet, request_id, amount, context, now).await {
            Ok(hold) => Ok((hold, plan)),
            Err(ProxyError::Refused(refusal)) => {
                let Refusal::InsufficientFunds { wallet: view, .. } = refusal.as_ref() else {
                    return Err(ProxyError::Refused(refusal));
                };
                let min_cap = route.limits.min_output_tokens;
                let Some(lowered) = plan.affordable(price, request_bytes, view.available, min_cap) else {
                    return Err(ProxyError::Refused(refusal));
                };
                let amount = charge::model_hold_amount(price, request_bytes, &lowered)?;
                Ok((self.hold(wallet, request_id, amount, context, now).await?, lowered))
            }
            Err(error) => Err(error),
        }
    }

    async fn hold(
        &self,
        wallet: WalletId,
        request_id: RequestId,
        amount: rust_decimal::Decimal,
        context: SpendContext<'_>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Reservation, ProxyError> {
        let started = std::time::Instant::now();
        let hold = match &self.leases {
            None => self.ledger.hold(wallet, request_id, amount, context, now).map(Reservation::Local),
            // Boxed: the lease path's future is large, and inline it would
            // swell every request's future, which is copied whole on each move.
            Some(leases) => {
                Box::pin(cluster::spend::hold(&self.ledger, leases, wallet, request_id, amount, context, now))
                    .await
                    .map(Reservation::Leased)
            }
        };
        self.metrics.hold_seconds.observe(started.elapsed().as_secs_f64());
        hold.map_err(|refusal| ProxyError::Refused(Box::new(refusal)))
    }

    /// Phase: build the upstream request. Method, path, query, end-to-end
    /// headers and the body stream pass unchanged; hop-by-hop headers and the
    /// client's credential are removed; the upstream's credential and the
    /// request id are added. The body is capped at `max_body_bytes`.
    pub fn upstream_request(
        &self,
        ctx: &mut RequestCtx,
        upstream: &Upstream,
        mut parts: http::request::Parts,
        body: UpstreamBody,
    ) -> Result<Request<UpstreamBody>, ProxyError> {
        parts.uri = upstream::upstream_uri(upstream, std::mem::take(&mut parts.uri)).map_err(|e| {
            ProxyError::UpstreamFailed {
                upstream: upstream.name.clone(),
                reason: format!("cannot build upstream URI: {e}"),
            }
        })?;
        parts.version = upstream::upstream_version(upstream);
        let headers = &mut parts.headers;
        headers::strip_hop_by_hop(headers);
        headers::strip_client_only(headers);
        if let Some(allowed) = &upstream.forward_headers {
            headers::keep_only(headers, allowed);
        }
        // Host names the upstream: made once per plain-HTTP/1.1 upstream,
        // else left to the pooled client, which sets it from the upstream URI.
        match &upstream.host_header {
            Some(host) => headers.insert(header::HOST, host.clone()),
            None => headers.remove(header::HOST),
        };
        // An anonymous request (a public route) never carries the operator's credential.
        if let (Some(credential), true) = (&upstream.credential, ctx.authenticated) {
            headers.insert(credential.header.clone(), credential.value.clone());
        }
        if ctx.charge.is_some() {
            // The meter reads what the upstream sends: ask for it unencoded.
            headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        }
        headers.insert(&REQUEST_ID, ctx.request_id.clone());
        if let Either::Right(full) = &body {
            // The body may have been rewritten: announce its real length.
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(full.size_hint().exact().unwrap_or(0)));
        }
        Ok(Request::from_parts(parts, body))
    }

    /// Phase: send upstream and wait for the response head. The upstream
    /// bills a call it was sent whether or not anyone waits for the answer:
    /// when the client leaves first (this future is dropped) or the head is
    /// later than the upstream's `response_timeout` (504), a metered call's
    /// wait goes on in the background and it is settled from the answer.
    pub async fn forward(
        self: &Arc<Self>,
        ctx: &mut RequestCtx,
        route: &Route,
        request: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let upstream = self.upstream_of(route);
        let deadline = tokio::time::Instant::now() + upstream.response_timeout;
        let head = self.upstreams.start(route.upstream, upstream, request)?;
        if let Some(charge) = ctx.charge.as_mut() {
            charge.sent = true;
        }
        let mut waiting = AwaitingHead { proxy: self, ctx, head: None, deadline };
        let answer = tokio::time::timeout_at(deadline, waiting.head.insert(head)).await;
        match answer {
            Ok(answer) => {
                waiting.head = None;
                let response = answer
                    .map_err(|e| upstream::classify(&e, upstream, self.config.server.max_body_bytes))?;
                waiting.ctx.upstream_status = Some(response.status());
                Ok(response)
            }
            Err(_) => {
                // The 504 is counted and logged as the request; the call, later.
                waiting.wait_on(StatusCode::GATEWAY_TIMEOUT, true);
                Err(ProxyError::UpstreamTimeout {
                    upstream: upstream.name.clone(),
                    timeout: upstream.response_timeout,
                })
            }
        }
    }

    /// Phase: adjust the upstream's response head before it goes to the client.
    pub fn response_filter(
        &self,
        ctx: &mut RequestCtx,
        upstream: &Upstream,
        response: &mut Response<Incoming>,
    ) {
        headers::strip_hop_by_hop(response.headers_mut());
        headers::strip_upstream_only(response.headers_mut(), upstream);
        if let Some(charge) = ctx.charge.as_mut() {
            charge.on_response_head(response.status(), response.headers());
            if charge.injected_usage {
                // The body the client gets is shorter than the upstream's.
                response.headers_mut().remove(header::CONTENT_LENGTH);
            }
        }
    }

    /// Phase: runs exactly once per request on every path — success, gateway
    /// error, upstream failure, client disconnect — when the response body
    /// ends or is dropped. Writes the access log line.
    pub fn settle(&self, mut ctx: Box<RequestCtx>, outcome: Outcome) {
        let started = std::time::Instant::now();
        let settled = ctx.charge.take().map(|charge| charge.settle(outcome, self.clock.now()));
        self.record_settle(settled.as_ref(), started.elapsed());
        if let (Some(charge::SettleResult::Debited { over_hold, .. }), Some(wallet)) = (&settled, ctx.wallet)
        {
            self.alerts.notify(Signal::Changed(wallet));
            if !over_hold.is_zero() {
                self.alerts.notify(Signal::OverHold(wallet, ledger_request_id(&ctx.request_id)));
            }
        }
        if ctx.counted {
            let _entered = ctx.span.enter();
            let settled = settled.as_ref().map(|s| format!("{s:?}"));
            tracing::info!(outcome = outcome.as_str(), settled, "call settled after its answer");
            return;
        }
        let upstream =
            ctx.upstream.and_then(|i| self.config.upstreams.get(i)).map_or("-", |u| u.name.as_str());
        let status = ctx.status.as_u16();
        let labels = || RequestLabels {
            route: SharedText(ctx.route_prefix.clone().unwrap_or_else(|| Arc::from("none"))),
            status,
        };
        let cached = ctx
            .route_index
            .filter(|_| status == 200)
            .and_then(|route| self.ok_requests.get(route, &self.metrics.requests, labels));
        match cached {
            Some(counter) => counter.inc(),
            None => self.metrics.requests.get_or_create(&labels()).inc(),
        };
        if let (402 | 429, Some(reason)) = (status, ctx.error_code) {
            self.metrics.refusals.get_or_create(&ReasonLabels { reason }).inc();
        }
        let _entered = ctx.span.enter();
        tracing::info!(
            target: "creditgate::access",
            status = ctx.status.as_u16(),
            upstream,
            upstream_status = ctx.upstream_status.map(|s| s.as_u16()),
            error_code = ctx.error_code,
            client_request_id = ctx.client_request_id.as_ref().and_then(|v| v.to_str().ok()),
            outcome = outcome.as_str(),
            settled = settled.as_ref().map(|s| format!("{s:?}")),
            response_bytes = ctx.response_bytes,
            duration_us = u64::try_from(ctx.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            peer = %ctx.peer,
            "request finished"
        );
    }
}

/// A call sent upstream whose response head is awaited. Dropped before the
/// head came (the client left), or told to stop waiting, it hands a metered
/// call to [`read_on::head`], which waits on and settles it.
struct AwaitingHead<'a> {
    proxy: &'a Arc<Proxy>,
    ctx: &'a mut RequestCtx,
    head: Option<upstream::HeadFuture>,
    deadline: tokio::time::Instant,
}

impl AwaitingHead<'_> {
    /// Moves the wait to the background, with the charge; `status` is what
    /// the client got. A call that holds nothing is simply dropped.
    fn wait_on(&mut self, status: StatusCode, counted: bool) {
        let Some(head) = self.head.take() else { return };
        if self.ctx.charge.is_some() {
            let ctx = self.ctx.detach_charge(status, counted);
            read_on::head(Arc::clone(self.proxy), ctx, head, self.deadline);
        }
    }
}

impl Drop for AwaitingHead<'_> {
    fn drop(&mut self) {
        // 499: the client closed the connection (nginx's code for it).
        self.wait_on(StatusCode::from_u16(499).unwrap_or(StatusCode::REQUEST_TIMEOUT), false);
    }
}

impl Proxy {
    /// Tell the alerts about money refusals (empty Lite wallet, limit reached).
    fn signal_refusal(&self, error: &ProxyError) {
        let ProxyError::Refused(refusal) = error else { return };
        match refusal.as_ref() {
            Refusal::InsufficientFunds { wallet, .. } => self.alerts.notify(Signal::Empty(wallet.wallet)),
            Refusal::SpendingLimit { wallet, limit, .. } => {
                self.alerts.notify(Signal::LimitReached(wallet.wallet, limit.resets_at));
            }
            _ => {}
        }
    }

    fn record_settle(&self, settled: Option<&charge::SettleResult>, took: std::time::Duration) {
        let Some(result) = settled else { return };
        let labels = || ResultLabels { result: result.metric_label() };
        match self.settles.get(result.metric_slot(), &self.metrics.settles, labels) {
            Some(counter) => counter.inc(),
            None => self.metrics.settles.get_or_create(&labels()).inc(),
        };
        self.metrics.settle_seconds.observe(took.as_secs_f64());
        if let charge::SettleResult::Debited { amount, item, over_hold, .. } = result {
            if !over_hold.is_zero() {
                // An upstream billed past the cap it was sent: an alert, not a discount.
                tracing::warn!(%over_hold, item = %item, "debit exceeded its hold");
            }
            // Debits carry at most 9 decimal places: this is exact.
            let nanodollars = (*amount * rust_decimal::Decimal::from(1_000_000_000u64)).trunc();
            if let Some(n) = rust_decimal::prelude::ToPrimitive::to_u64(&nanodollars) {
                self.metrics
                    .charged_nanodollars
                    .get_or_create(&ItemLabels { item: SharedText(item.clone()) })
                    .inc_by(n);
            }
        }
    }
}

/// Read a whole request body, refusing one over `limit_bytes`.
/// Normalises the request's path in place (see [`path::normalise`]).
fn normalise_path(request: &mut Request<Incoming>) -> Result<(), ProxyError> {
    let normalised = match path::normalise(request.uri().path())? {
        std::borrow::Cow::Borrowed(_) => return Ok(()),
        std::borrow::Cow::Owned(normalised) => normalised,
    };
    let path_and_query = match request.uri().query() {
        Some(query) => format!("{normalised}?{query}"),
        None => normalised,
    };
    let mut uri = http::uri::Parts::from(std::mem::take(request.uri_mut()));
    uri.path_and_query = Some(
        path_and_query.parse().map_err(|_| ProxyError::InvalidPath { reason: "is not a valid URI path" })?,
    );
    *request.uri_mut() =
        http::Uri::from_parts(uri).map_err(|_| ProxyError::InvalidPath { reason: "is not a valid URI" })?;
    Ok(())
}

/// Host names equal without their ports, ignoring case.
fn same_host(uri_host: &str, header_host: &str) -> bool {
    let name = match header_host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => header_host,
    };
    name.eq_ignore_ascii_case(uri_host.trim_start_matches('[').trim_end_matches(']'))
        || name.eq_ignore_ascii_case(uri_host)
}

/// The ledger's id for a request: the request id the gateway minted (a UUID;
/// a fresh one stands in should it somehow not parse). Never the client's.
fn ledger_request_id(request_id: &HeaderValue) -> RequestId {
    let parsed = request_id.to_str().ok().and_then(|text| uuid::Uuid::try_parse(text).ok());
    RequestId(parsed.unwrap_or_else(headers::new_request_uuid))
}

/// The error is logged escaped (`?` on its text): some carry strings from
/// the request body (an unpriced model's name), which could hold newlines
/// and terminal escapes that the text log format writes as they are.
fn log_error(span: &tracing::Span, level: tracing::Level, code: &str, error: &ProxyError) {
    let _entered = span.enter();
    match level {
        // The operator's to mend (an upstream credential refused, the books
        // unreachable): logged whatever filter quiets the rest.
        tracing::Level::ERROR => tracing::error!(code, error = ?error.to_string(), "request failed"),
        tracing::Level::WARN => tracing::warn!(code, error = ?error.to_string(), "request failed"),
        _ => tracing::debug!(code, error = ?error.to_string(), "request refused"),
    }
}

/// A plain JSON response the gateway makes itself (admin, health).
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<GatewayBody> {
    let mut response = Response::new(GatewayBody::local(value.to_string().into()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::{log_error, ProxyError};

    /// Lines a subscriber writes, kept for the test to read.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::ErrorKind::Other)?.extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn errors_the_operator_must_mend_are_logged_at_error_and_refusals_at_debug() {
        // Before, an error classed ERROR (the upstream refusing the operator's
        // credential: every call a 502) went out at debug, below any
        // production filter.
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::Span::none();
            let failed = ProxyError::UpstreamAuthFailed { upstream: "openai".into() };
            log_error(&span, failed.class().level, failed.class().code, &failed);
            let refused = ProxyError::MissingModel;
            log_error(&span, refused.class().level, refused.class().code, &refused);
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("ERROR") && text.contains("upstream_auth_failed"), "{text}");
        assert!(!text.contains("missing_model"), "a client's mistake stays at debug: {text}");
    }
}
