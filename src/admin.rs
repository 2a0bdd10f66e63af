//! The admin listener (separate port, loopback by default).
//!
//! Open endpoints:
//! - `GET /healthz` — 200 while the process is up.
//! - `GET /readyz` — 200 once the store is open and state is loaded, 503
//!   before that, during shutdown and while the store fails (with a reason).
//! - `GET /metrics` — Prometheus text.
//! - `GET /ui/` — the dashboard (see `ui`): static pages that sign in with
//!   a token kept in the browser tab and call `/admin/v1` like any client.
//!
//! `/admin/v1` (`Authorization: Bearer <token>`): the operator token sees
//! every organization; an organization token (`[[admin.org_tokens]]`) sees
//! only its own, and anything of another organization answers 404. Calls that
//! create or remove credit (purchases, adjustments, contracts, Lite
//! allowances and downgrades that grant them) need the operator token or an
//! org token the operator marked `finance = true`; other org tokens get 403.
//! An upgrade to Pro, which writes off the Lite remainder, does not: that
//! credit was the org's own allowance to its user, and leaves no wallet
//! anyone else can spend (calls still open settle on it).
//! - `GET /admin/v1/whoami` — the caller's scope: operator, or which org
//!   and whether it may move money.
//! - `GET /admin/v1/prices` — the price table in force: version, loaded-at,
//!   as_of and age, table-wide markup, last reload error (operator).
//! - `GET /admin/v1/prices/table` — every model and tool with its prices in
//!   force now (operator).
//! - `POST /admin/v1/prices/reload` — re-read the price file; 200 with the new
//!   status, or 422 with every problem; the old table stays in force (operator).
//! - `GET|POST /admin/v1/orgs` — list (own org for org tokens) / create (operator).
//! - `GET /admin/v1/orgs/{org}` — one organization with its contracts.
//! - `POST /admin/v1/orgs/{org}/contracts` — add a term (renewal).
//! - `GET|POST /admin/v1/orgs/{org}/users`, `PATCH .../users/{user}` — plan,
//!   Lite allowance, limits.
//! - `GET|POST /admin/v1/orgs/{org}/apps`, `PUT .../apps/{app}/limits`.
//! - `GET|POST /admin/v1/orgs/{org}/keys` (the secret is returned once),
//!   `POST .../keys/{key}/revoke`, `PUT .../keys/{key}/limits`,
//!   `PUT .../keys/{key}/scope` (allowed routes and models).
//! - `POST /admin/v1/orgs/{org}/purchases`, `POST .../adjustments` — need an
//!   `Idempotency-Key` header; a replay returns the original result. A 503
//!   `outcome_unknown` (the store failed mid-write) is settled by retrying
//!   with the same key once `/readyz` is 200: it answers the one result.
//! - `GET /admin/v1/orgs/{org}/balances` — pool and Lite wallets, lots, holds.
//! - `GET /admin/v1/orgs/{org}/summary` — the org's time zone, this contract
//!   year's allocation consumed, and recent 402s per wallet and reason
//!   (counted in memory since the process started).
//! - `GET|POST /admin/v1/orgs/{org}/alerts`, `GET .../alerts/deliveries` —
//!   alert rules (signed webhooks, public addresses only unless
//!   `[admin] alert_webhook_allow` opens more; at most 50 per org) and their
//!   delivery status (org tokens see only that a delivery failed, not why).
//! - `GET /admin/v1/orgs/{org}/ledger` — entries with cursor paging and
//!   filters (`after`, `limit`, `wallet`, `kind`, `key`, `user`, `from`, `to`).
//! - `GET /admin/v1/orgs/{org}/usage` — totals grouped by `group_by` (user,
//!   app, key, end_user, model, tool, route, day, month) over `from`..`to`, as
//!   JSON or CSV (`format=csv` or `Accept: text/csv`). In cluster mode a
//!   report is a SQL aggregate read from PostgreSQL directly, so it already
//!   counts debits shipped but not yet posted to the ledger.

mod aggregates;
mod api;
mod background;
pub mod cli;
pub mod client;
mod error;
pub mod openapi;
mod reports;
mod rollup;
/// A usage group's totals, the same on a single node and in cluster mode.
pub use rollup::Totals as UsageTotals;
mod strict;
mod summary;
mod ui;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;
use subtle::ConstantTimeEq;

pub use error::AdminError;
pub use rollup::Rollups;

use crate::alerts::Alerts;
use crate::clock::Clock;
use crate::ledger::entry::LedgerEntry;
use crate::ledger::ids::OrgId;
use crate::ledger::Ledger;
use crate::pricing::{LivePrices, PriceLoadError};
use crate::proxy::{json_error, json_response, GatewayBody};
use crate::store::WriterStats;
use crate::telemetry::metrics::Metrics;

/// Readiness: a latch set once start-up is complete and cleared on
/// shutdown, and a probe of the store, which can fail (and recover) while the
/// process runs.
#[derive(Default)]
pub struct Readiness {
    ready: AtomicBool,
    store: std::sync::OnceLock<StoreProbe>,
}

/// `Err(reason)` while the store cannot make changes durable.
pub type StoreProbe = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness").field("ready", &self.ready).finish_non_exhaustive()
    }
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Makes readiness follow the store's health too (set once).
    pub fn watch_store(&self, probe: StoreProbe) {
        let _already = self.store.set(probe);
    }

    pub fn is_ready(&self) -> bool {
        self.check().is_ok()
    }

    /// `Ok` when ready; otherwise why not.
    pub fn check(&self) -> Result<(), String> {
        if !self.ready.load(Ordering::Acquire) {
            return Err("starting or stopping".into());
        }
        self.store.get().map_or(Ok(()), |probe| probe())
    }
}

/// Who an admin request acts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Operator,
    /// One organization; `finance` lets it create or remove credit.
    Org {
        org: OrgId,
        finance: bool,
    },
}

impl Scope {
    pub fn sees(self, org: OrgId) -> bool {
        match self {
            Scope::Operator => true,
            Scope::Org { org: own, .. } => own == org,
        }
    }

    /// The scope as `GET /admin/v1/whoami` shows it.
    pub fn view(self) -> serde_json::Value {
        match self {
            Scope::Operator => json!({"scope": "operator", "org": null, "finance": true}),
            Scope::Org { org, finance } => json!({"scope": "org", "org": org, "finance": finance}),
        }
    }

    /// Refuses callers that may not create or remove credit: money is the
    /// operator's (or a finance token's) business, not every org admin's.
    pub fn require_finance(self) -> Result<(), AdminError> {
        match self {
            Scope::Operator | Scope::Org { finance: true, .. } => Ok(()),
            Scope::Org { finance: false, .. } => Err(AdminError::FinanceOnly),
        }
    }

    /// What this token's reports show of the operator's cost.
    pub fn cost_view(self) -> reports::CostView {
        match self {
            Scope::Operator => reports::CostView::WithOperatorCost,
            Scope::Org { .. } => reports::CostView::ChargedOnly,
        }
    }
}

/// An organization token as configured.
#[derive(Clone)]
pub struct OrgAccess {
    pub org: OrgId,
    pub token: String,
    /// May create or remove credit.
    pub finance: bool,
}

/// Reads ledger entries from the store: given `(after record, at most
/// records)`, the entries among them and the last record read (`None`: end).
pub type EntryReader =
    Arc<dyn Fn(u64, usize) -> Result<(Vec<LedgerEntry>, Option<u64>), AdminError> + Send + Sync>;

/// Cluster mode: runs a usage aggregate on the shared books. Called on
/// report threads, never on the runtime's own.
pub type UsageReader = Arc<
    dyn Fn(&crate::cluster::usage::UsageQuery) -> Result<Vec<crate::cluster::usage::UsageGroup>, AdminError>
        + Send
        + Sync,
>;

/// Where usage reports come from.
#[derive(Clone)]
pub enum UsageSource {
    /// Single node: the ledger's entries, folded into per-organization
    /// rollups kept up to date from [`Admin::entries`].
    Rollups(Arc<rollup::Rollups>),
    /// Cluster mode: SQL aggregates over the shipped debits (which include
    /// debits shipped but not yet posted to the ledger).
    Database(UsageReader),
}

/// Largest admin request body read.
const MAX_ADMIN_BODY_BYTES: usize = 1024 * 1024;
/// Cluster mode: how long an admin change waits for the shared log before
/// answering 503 `outcome_unknown` (the database is out of reach) instead
/// of holding the caller until it returns. Under a follower's forwarding
/// timeout, so the follower relays this answer.
const CLUSTER_CHANGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(8);

pub struct Admin {
    pub readiness: Arc<Readiness>,
    pub prices: Option<Arc<LivePrices>>,
    pub metrics: Arc<Metrics>,
    pub operator_token: Option<String>,
    pub org_tokens: Vec<OrgAccess>,
    pub clock: Arc<dyn Clock>,
    pub ledger: Arc<Ledger>,
    pub entries: EntryReader,
    pub alerts: Arc<Alerts>,
    /// The store writer's counters, read at scrape time.
    pub store_stats: Arc<dyn Fn() -> WriterStats + Send + Sync>,
    /// Longest wait for a request body, so a client that stops sending
    /// cannot hold a request (and its connection) open.
    pub body_read_timeout: std::time::Duration,
    /// Where usage reports read their totals.
    pub usage: UsageSource,
    /// Groups one usage report may have (`[admin] max_report_groups`).
    pub max_report_groups: usize,
    /// Checkpoints and retention: where history older than the store's
    /// retained window lives (single node with write-through only).
    pub history: Option<Arc<crate::store::history::Historian>>,
    /// Cluster mode: a follower forwards organization writes to the
    /// treasurer, whose ledger alone can make them.
    pub cluster: Option<Arc<crate::cluster::ClusterNode>>,
    /// Each organization token's writes in the last minute, and the cap.
    pub org_writes: crate::rate_window::RequestWindows,
    pub org_writes_per_minute: u32,
}

impl Admin {
    /// Builds the usage rollups from the store on a low-priority thread,
    /// off the request path, so the first report does not scan the store.
    /// Stops at the next step once `shutdown` is cancelled. Nothing to build
    /// when reports come from the database.
    pub fn build_rollups(&self, shutdown: tokio_util::sync::CancellationToken) {
        let UsageSource::Rollups(rollups) = &self.usage else { return };
        let (entries, rollups) = (self.entries.clone(), rollups.clone());
        let started = background::spawn("usage-rollups", move || {
            let started = std::time::Instant::now();
            match rollups.catch_up(&*entries, &|| shutdown.is_cancelled()) {
                Ok(true) => tracing::info!(elapsed_ms = started.elapsed().as_millis(), "usage rollups built"),
                Ok(false) => {}
                // A report will try again (and answer the error) when called.
                Err(error) => tracing::warn!(%error, "building the usage rollups failed"),
            }
        });
        if let Err(error) = started {
            tracing::warn!(%error, "the usage rollups will be built by the first report");
        }
    }

    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<GatewayBody>, Infallible> {
        let path = request.uri().path().to_owned();
        let response = match (request.method(), path.as_str()) {
            (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
            (&Method::GET, "/readyz") => match self.readiness.check() {
                Ok(()) => json_response(StatusCode::OK, &json!({"status": "ready"})),
                Err(reason) => json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status": "not_ready", "reason": reason}),
                ),
            },
            (&Method::GET, "/metrics") => self.metrics_text(),
            (_, p) if p == "/ui" || p.starts_with("/ui/") => ui::serve(request.method(), p),
            (_, p) if p.starts_with("/admin/v1/") => match self.api(request).await {
                Ok(response) => response,
                Err(error) => error_response(&method_not_allowed(error)),
            },
            _ => error(StatusCode::NOT_FOUND, "not_found", &format!("no admin endpoint at {path}")),
        };
        Ok(response)
    }

    /// The caller's scope from its token, compared in constant time.
    fn scope(&self, headers: &http::HeaderMap) -> Result<Scope, AdminError> {
        if self.operator_token.is_none() && self.org_tokens.is_empty() {
            return Err(AdminError::Disabled);
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .as_bytes();
        let matches = |token: &str| bool::from(presented.ct_eq(token.as_bytes()));
        // Compare against every token so timing does not tell which matched.
        let mut scope = None;
        if self.operator_token.as_deref().is_some_and(matches) {
            scope = Some(Scope::Operator);
        }
        for access in &self.org_tokens {
            if matches(&access.token) && scope.is_none() {
                scope = Some(Scope::Org { org: access.org, finance: access.finance });
            }
        }
        scope.ok_or(AdminError::Unauthorized)
    }

    async fn api(&self, request: Request<Incoming>) -> Result<Response<GatewayBody>, AdminError> {
        let scope = self.scope(request.headers())?;
        let (parts, body) = request.into_parts();
        let path = parts.uri.path().trim_start_matches("/admin/v1/").trim_end_matches('/');
        let segments: Vec<&str> = path.split('/').collect();
        let now = self.clock.now();
        let forwarded = self
            .cluster
            .as_ref()
            .filter(|node| forwarded_in_cluster(&parts.method, &segments) && !node.is_treasurer());
        // Counted where the write is made (a follower's forwarded writes
        // count on the treasurer, once, whatever it answers), and before the
        // body is read: a token over its cap costs no more than its headers.
        if let (Scope::Org { org, .. }, None) = (scope, forwarded) {
            let write = !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
            if write && !self.org_writes.admit(org.0, self.org_writes_per_minute) {
                return Err(AdminError::TooManyWrites { limit: self.org_writes_per_minute });
            }
        }
        let body = read_body(body, self.body_read_timeout).await?;
        if let Some(node) = forwarded {
            if let Some(reply) = node.forward_admin(&parts, body.clone()).await {
                return match reply {
                    Ok(response) => Ok(response.map(GatewayBody::local)),
                    Err(reason) => Err(AdminError::Ledger(crate::ledger::LedgerError::Unavailable(
                        crate::ledger::journal::JournalError::Unavailable { reason },
                    ))),
                };
            }
            // It became the treasurer while the body was read: the write is
            // made here, so it counts here.
            if let Scope::Org { org, .. } = scope {
                if !self.org_writes.admit(org.0, self.org_writes_per_minute) {
                    return Err(AdminError::TooManyWrites { limit: self.org_writes_per_minute });
                }
            }
        }
        let mut params = reports::query_pairs(parts.uri.query());
        // As documented: `?limit=` is the same as no `limit` at all.
        params.retain(|_, value| !value.is_empty());
        let (status, value) = match segments.as_slice() {
            ["prices", "table"] if parts.method == Method::GET => {
                if scope != Scope::Operator {
                    return Err(AdminError::OperatorOnly);
                }
                let Some(prices) = &self.prices else { return Ok(no_prices()) };
                (StatusCode::OK, summary::price_table(&prices.current(), now))
            }
            ["prices"] | ["prices", "reload"] => {
                if scope != Scope::Operator {
                    return Err(AdminError::OperatorOnly);
                }
                return Ok(self.operator(&parts.method, parts.uri.path()).await);
            }
            ["whoami"] if parts.method == Method::GET => (StatusCode::OK, scope.view()),
            ["orgs"] => {
                let (method, headers, body) = (parts.method.clone(), parts.headers.clone(), body.clone());
                self.change(&parts.method, move |ledger| {
                    api::orgs(ledger, scope, &method, &headers, &body, now)
                })
                .await?
            }
            ["orgs", org, rest @ ..] => {
                let org = OrgId(org.parse().map_err(|_| AdminError::NotFound(format!("no org {org}")))?);
                // Another organization's resources do not exist for this token.
                let time_zone = match self.ledger.org(org) {
                    Some(found) if scope.sees(org) => found.time_zone,
                    _ => return Err(AdminError::NotFound(format!("no org {}", org.0))),
                };
                let call = api::OrgCall { ledger: &self.ledger, org, scope, headers: &parts.headers, now };
                match (&parts.method, rest) {
                    (_, ["alerts", ..]) => {
                        api::alert_resource(&call, &self.alerts, &parts.method, rest, &body).await?
                    }
                    (&Method::GET, ["summary"]) => {
                        let wallets = self.ledger.wallets_of(org);
                        let refusals =
                            self.alerts.refusal_counts(&wallets, now).await.map_err(api::alert_error)?;
                        summary::org_summary(&self.ledger, refusals, org, now)?
                    }
                    // Off the runtime and one at a time per organization:
                    // a list reads every record of its kind.
                    (&Method::GET, [list @ ("users" | "apps" | "keys")]) => {
                        let (ledger, list) = (self.ledger.clone(), (*list).to_owned());
                        background::listing(org.0, move || reports::list_page(&ledger, org, &list, &params))
                            .await??
                    }
                    (&Method::GET, ["ledger"]) => {
                        let entries = self.entries.clone();
                        let (status, mut page) = self
                            .report(org, move || {
                                reports::ledger_page(&*entries, org, &params, scope.cost_view())
                            })
                            .await??;
                        if let Some(history) = &self.history {
                            page["history"] = history_view(&history.status(), scope);
                        }
                        (status, page)
                    }
                    (&Method::GET, ["usage"]) => {
                        if params.get("format").is_some_and(|f| f != "csv" && f != "json") {
                            return Err(AdminError::bad("format", "\"json\" or \"csv\""));
                        }
                        let wants_csv = params.get("format").is_some_and(|f| f == "csv")
                            || parts
                                .headers
                                .get(header::ACCEPT)
                                .and_then(|v| v.to_str().ok())
                                .is_some_and(|a| a.contains("text/csv"));
                        let (entries, usage) = (self.entries.clone(), self.usage.clone());
                        let ledger = self.ledger.clone();
                        let costs = scope.cost_view();
                        let max_groups = self.max_report_groups;
                        let (status, text, content_type) = self
                            .report(org, move || {
                                let report =
                                    reports::Report { org, time_zone, csv: wants_csv, costs, max_groups };
                                reports::usage(&*entries, &usage, &ledger, &params, report)
                            })
                            .await??;
                        let mut response = Response::new(GatewayBody::local(Bytes::from(text)));
                        *response.status_mut() = status;
                        response
                            .headers_mut()
                            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
                        if let Some(history) = &self.history {
                            // Usage is summed from the retained records only: say where
                            // the older ones are.
                            let status = history.status();
                            let headers = response.headers_mut();
                            headers.insert(
                                "x-creditgate-retained-after",
                                HeaderValue::from(status.pruned_through),
                            );
                            // A path on the operator's machine is the operator's business.
                            if let Some(dir) = status
                                .export_dir
                                .as_ref()
                                .filter(|_| scope == Scope::Operator)
                                .and_then(|d| HeaderValue::try_from(d.display().to_string()).ok())
                            {
                                headers.insert("x-creditgate-exports", dir);
                            }
                        }
                        return Ok(response);
                    }
                    _ => {
                        let (method, headers, body) =
                            (parts.method.clone(), parts.headers.clone(), body.clone());
                        let call = api::OrgCall { ledger: &self.ledger, org, scope, headers: &headers, now };
                        let taken = api::credit_taken(&call, &method, rest, &body);
                        let reserved = match (&self.cluster, taken) {
                            (Some(node), Some(taken)) => reserve(node, taken).await?,
                            _ => None,
                        };
                        let rest: Vec<String> = rest.iter().map(|segment| (*segment).to_owned()).collect();
                        let changed = self
                            .change(&parts.method, move |ledger| {
                                let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
                                let call = api::OrgCall { ledger, org, scope, headers: &headers, now };
                                api::org_resource(&call, &method, &rest, &body)
                            })
                            .await;
                        // In the books, or refused: the credit is free again. A change whose
                        // outcome is unknown may still be written, and one whose request is
                        // dropped here runs on where it cannot be cancelled: their
                        // reservations lapse (credit given back before the change lands
                        // could be leased again and spent).
                        if let (Some(node), Some(lease)) = (&self.cluster, reserved) {
                            if !matches!(changed, Err(AdminError::OutcomeUnknown { .. })) {
                                node.release(lease).await;
                            }
                        }
                        changed?
                    }
                }
            }
            ["openapi.json"] if parts.method == Method::GET => (StatusCode::OK, openapi::document()),
            _ => return Err(api::no_route(&parts.method, parts.uri.path())),
        };
        Ok(json_response(status, &value))
    }

    /// Runs a report's work off the runtime: a single node's scans under
    /// the idle policy, a cluster's database reads at normal priority (see
    /// [`background::database_report`]).
    async fn report<T: Send + 'static>(
        &self,
        org: OrgId,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AdminError> {
        match self.cluster {
            None => background::report(org.0, work).await,
            Some(_) => background::database_report(org.0, work).await,
        }
    }

    /// Runs an organization call that may change the books on a blocking
    /// thread: a change waits for its journal to be durable (a single
    /// node's flush and fsync), which on a runtime thread would stall every
    /// request that thread serves, and with as many writes as the runtime
    /// has threads, all of them. In cluster mode the journal is the shared
    /// log, whose appends run on this runtime: a change waiting on a
    /// runtime thread could leave none to drive them (a deadlock).
    async fn change(
        &self,
        method: &Method,
        work: impl FnOnce(&Ledger) -> api::Answer + Send + 'static,
    ) -> api::Answer {
        if *method == Method::GET {
            return work(&self.ledger);
        }
        let ledger = self.ledger.clone();
        let change = tokio::task::spawn_blocking(move || work(&ledger));
        let not_finished = |error| AdminError::Store(format!("the change did not finish: {error}"));
        if self.cluster.is_none() {
            return change.await.map_err(not_finished)?;
        }
        match tokio::time::timeout(CLUSTER_CHANGE_TIMEOUT, change).await {
            Ok(done) => done.map_err(not_finished)?,
            // The change stays queued for the log and is written once the
            // database is back; the caller is told it cannot know yet.
            Err(_) => Err(AdminError::OutcomeUnknown {
                operation: "change",
                reason: format!(
                    "the database is out of reach: the cluster's shared log did not take it within {} s",
                    CLUSTER_CHANGE_TIMEOUT.as_secs()
                ),
            }),
        }
    }

    async fn operator(&self, method: &Method, path: &str) -> Response<GatewayBody> {
        match (method, path) {
            (&Method::GET, "/admin/v1/prices") => match &self.prices {
                Some(prices) => json_response(StatusCode::OK, &json!(prices.status(self.clock.now()))),
                None => no_prices(),
            },
            (&Method::POST, "/admin/v1/prices/reload") => self.reload_prices().await,
            _ => error_response(&method_not_allowed(api::no_route(method, path))),
        }
    }

    /// Re-reads this gateway's price file; in a cluster, once it loaded,
    /// every other replica is asked to re-read its own.
    async fn reload_prices(&self) -> Response<GatewayBody> {
        let Some(prices) = &self.prices else {
            return no_prices();
        };
        match prices.reload(self.clock.now(), "admin api") {
            Ok(_) => {
                let mut status = json!(prices.status(self.clock.now()));
                if let Some(node) = &self.cluster {
                    status["replicas_asked"] = match node.books().ask_price_reload().await {
                        Ok(()) => json!(true),
                        Err(error) => json!(format!("not asked: {error}")),
                    };
                }
                json_response(StatusCode::OK, &status)
            }
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
                    "active_version": prices.status(self.clock.now()).version,
                }});
                json_response(StatusCode::UNPROCESSABLE_ENTITY, &body)
            }
        }
    }

    fn metrics_text(&self) -> Response<GatewayBody> {
        let stats = (self.store_stats)();
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics.open_holds.set(gauge(self.ledger.open_holds() as u64));
        self.metrics.holds_voided.set(gauge(self.ledger.holds_voided()));
        self.metrics.store_flushes.set(gauge(stats.flushes));
        self.metrics.store_flush_micros.set(gauge(stats.flush_micros));
        self.metrics.store_records_written_late.set(gauge(stats.written_out_of_order));
        self.metrics.store_sequence_gaps_open.set(gauge(stats.sequence_gaps_open));
        self.metrics.store_appends_waited.set(gauge(stats.waited_for_room));
        self.metrics.store_failures.set(gauge(stats.store_failures));
        if let Some(history) = &self.history {
            let status = history.status();
            self.metrics.history_handed_over.set(gauge(status.records_handed_over));
            self.metrics.history_read_back.set(gauge(status.records_read_back));
            self.metrics.history_checkpoint_seq.set(gauge(status.checkpoint_seq));
            self.metrics.history_failing.set(i64::from(status.last_error.is_some()));
        }
        if let Some(prices) = &self.prices {
            let failing = prices.status(self.clock.now()).last_reload_error.is_some();
            self.metrics.price_reload_failing.set(i64::from(failing));
        }
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        self.metrics.runtime_workers.set(gauge(workers as u64));
        if let (Some(node), Some(cluster)) = (&self.cluster, &self.metrics.cluster) {
            let (holds, statements) = node.lease_book().stats();
            cluster.lease_holds.set(gauge(holds));
            cluster.db_statements.set(gauge(statements));
            let unshipped = node.lease_book().unshipped();
            cluster.outbox_debits.set(gauge(unshipped.debits as u64));
            cluster.outbox_oldest_seconds.set(unshipped.oldest.map_or(0.0, |at| at.elapsed().as_secs_f64()));
            cluster.database_unreached_seconds.set(node.database_unreached_for().as_secs_f64());
            cluster.log_applied.set(node.replica().applied());
            cluster.treasurer.set(i64::from(node.replica().holds_treasury()));
        }
        let mut response = Response::new(GatewayBody::local(self.metrics.render().into()));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        response
    }
}

/// The writes a follower forwards to the treasurer: every change to an
/// organization's books. Price reloads stay with the replica (its own price
/// file); alert rules go from any replica straight to the shared books.
fn forwarded_in_cluster(method: &Method, segments: &[&str]) -> bool {
    let writes = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    writes && matches!(segments, ["orgs"] | ["orgs", _, ..]) && !matches!(segments, ["orgs", _, "alerts", ..])
}

fn no_prices() -> Response<GatewayBody> {
    error(StatusCode::NOT_FOUND, "no_price_table", "this gateway has no [pricing] file configured")
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<GatewayBody> {
    json_error(status, "admin_error", code, message).map(GatewayBody::local)
}

/// A path that exists with other methods answers 405 with `Allow`, not 404.
fn method_not_allowed(error: AdminError) -> AdminError {
    match error {
        AdminError::NoRoute { method, path } => {
            let allowed = openapi::methods_for(&path);
            if allowed.is_empty() {
                return AdminError::NoRoute { method, path };
            }
            let allow = allowed.iter().map(|m| m.to_ascii_uppercase()).collect::<Vec<_>>().join(", ");
            AdminError::MethodNotAllowed { method, path, allow }
        }
        other => other,
    }
}

fn error_response(error: &AdminError) -> Response<GatewayBody> {
    let (status, code) = error.class();
    // Never say which organization owns something, nor whether it exists in
    // another one: both read exactly as a missing id does.
    use crate::ledger::LedgerError;
    let message = match error {
        AdminError::Ledger(LedgerError::CrossOrg { target, .. }) => format!("{target} not found"),
        AdminError::Ledger(LedgerError::UnknownUser(id)) => format!("{id} not found"),
        AdminError::Ledger(LedgerError::UnknownApp(id)) => format!("{id} not found"),
        AdminError::Ledger(LedgerError::UnknownKey(id)) => format!("{id} not found"),
        AdminError::Ledger(LedgerError::UnknownWallet(id)) => format!("{id} not found"),
        AdminError::Ledger(LedgerError::UnknownOrg(id)) => format!("{id} not found"),
        other => other.to_string(),
    };
    let mut body = json!({"error": {"type": "admin_error", "code": code, "message": message}});
    if let AdminError::BadRequest { field, .. } | AdminError::Rule { field, .. } = error {
        body["error"]["field"] = json!(field);
    }
    let mut response = json_response(status, &body);
    if let AdminError::MethodNotAllowed { allow, .. } = error {
        if let Ok(value) = HeaderValue::from_str(allow) {
            response.headers_mut().insert(header::ALLOW, value);
        }
    }
    if let AdminError::TooManyWrites { .. } = error {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
    }
    response
}

async fn read_body(body: Incoming, timeout: std::time::Duration) -> Result<Bytes, AdminError> {
    match tokio::time::timeout(timeout, Limited::new(body, MAX_ADMIN_BODY_BYTES).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(_)) => {
            Err(AdminError::bad("body", format!("unreadable or over {MAX_ADMIN_BODY_BYTES} bytes")))
        }
        Err(_) => Err(AdminError::bad("body", format!("not received within {} ms", timeout.as_millis()))),
    }
}

/// Where the ledger's history lives, beside a page of entries: the hot
/// store answers only for records after `retained_after`; older ones are in
/// the export directory, one file per day (see `crate::store::export`).
/// The export directory, a path on the operator's machine, is shown to the
/// operator's token only.
fn history_view(status: &crate::store::history::HistoryStatus, scope: Scope) -> serde_json::Value {
    let export_dir = status.export_dir.as_ref().filter(|_| scope == Scope::Operator);
    serde_json::json!({
        "retained_after": status.pruned_through,
        "export_dir": export_dir,
        "exported_through": status.exported_through,
        "checkpoint_seq": status.checkpoint_seq,
        "checkpoint_at": status.checkpoint_at,
    })
}

/// Cluster mode: takes the credit a change takes out of reach of the
/// replicas' leases first ([`crate::cluster::ClusterNode::reserve`]); the
/// reservation's lease, to give back once the change is in the books
/// ([`crate::cluster::ClusterNode::release`]). A
/// negative adjustment larger than the wallet's balance in the books is
/// refused; a write-off takes what the books hold.
async fn reserve(
    node: &crate::cluster::ClusterNode,
    taken: api::CreditTaken,
) -> Result<Option<i64>, AdminError> {
    use crate::cluster::node::Reserved;
    let (wallet, amount, exact) = match taken {
        api::CreditTaken::Adjustment(wallet, amount) => (wallet.to_string(), amount, true),
        api::CreditTaken::WriteOff(wallet, amount) => (wallet.to_string(), amount, false),
    };
    let failed = |error: crate::cluster::ClusterError| {
        AdminError::Store(format!("cannot reserve the credit the change takes: {error}"))
    };
    // Bounded like a change's wait for the books: a silent database answers
    // 503, not a request held for as long as its connection lives.
    let wallet = wallet.as_str();
    let reserve = |amount| async move {
        match tokio::time::timeout(CLUSTER_CHANGE_TIMEOUT, node.reserve(wallet, amount)).await {
            Ok(reserved) => reserved.map_err(failed),
            Err(_) => {
                Err(AdminError::Store("the cluster's books did not answer the reservation in time".into()))
            }
        }
    };
    let mut reserved = reserve(amount).await?;
    if let (Reserved::Short { balance }, false) = (reserved, exact) {
        // The books hold less than the replica's view (debits shipped, not yet posted).
        if balance <= rust_decimal::Decimal::ZERO {
            return Ok(None);
        }
        reserved = reserve(balance).await?;
    }
    match reserved {
        Reserved::Lease(lease) => Ok(Some(lease)),
        Reserved::Short { balance } => Err(AdminError::rule(
            "amount",
            format!(
                "{wallet} holds {balance} in the cluster's books, less than the {amount} the change takes"
            ),
        )),
        Reserved::Leased => Err(AdminError::CreditLeased { wallet: wallet.to_owned() }),
    }
}
