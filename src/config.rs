//! Gateway config: strict raw serde types, then validated runtime types.
//!
//! Loading is two layers. The raw layer mirrors the TOML file and rejects
//! unknown keys (`deny_unknown_fields`), so a typo is an error rather than a
//! silently ignored setting. The validated layer ([`GatewayConfig`]) is what the
//! rest of the gateway uses; it can only be built through [`GatewayConfig::parse`]
//! or [`GatewayConfig::load`], so nothing downstream sees an unchecked value.
//!
//! Every section is checked on its own so that one run reports every problem in
//! the file at once, each with `file:line` and a hint.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// Largest request body the gateway accepts unless the config says otherwise.
const DEFAULT_MAX_BODY_BYTES: u64 = 8 * 1024 * 1024;
const DEFAULT_MAX_BUFFERED_BODY_BYTES: u64 = 512 * 1024 * 1024;
const DEFAULT_CLIENT_STALL_TIMEOUT_MS: u64 = 60_000;
/// Most a route's `usage_ceiling` (and `max_units`) may be: a trillion
/// tokens, far past any call, and far from wrapping a report's totals.
const MAX_USAGE_CEILING: u64 = 1_000_000_000_000;
/// Most days `[ledger] retain_days` may keep: past them, the cut-off date
/// is before any date there is.
const MAX_RETAIN_DAYS: u32 = 36_500;
/// Streams one h2 client connection may have open at once (RFC 9113
/// suggests no fewer than 100; hyper's default is 200).
const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// How often the price file is checked for changes.
const DEFAULT_PRICE_WATCH_INTERVAL_MS: u64 = 250;
/// How long in-flight requests may run after a shutdown signal.
const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;
/// Bound on how long a client may take to send request headers (slowloris).
const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Bound on reading a whole request body that must be priced.
const DEFAULT_BODY_READ_TIMEOUT_MS: u64 = 30_000;
/// Reading on after a client left: long enough for a slow model to finish.
const DEFAULT_READ_ON_TIMEOUT_MS: u64 = 120_000;
const DEFAULT_READ_ON_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Longest a response may stream; far above any real completion.
const DEFAULT_MAX_RESPONSE_MS: u64 = 30 * 60 * 1000;
/// Bound on open client connections; excess connections wait in the backlog.
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
const MAX_WORKERS: usize = 1024;
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2_000;
const DEFAULT_RESPONSE_TIMEOUT_MS: u64 = 120_000;
const DEFAULT_IDLE_TIMEOUT_MS: u64 = 120_000;
const DEFAULT_POOL_MAX_IDLE_PER_HOST: usize = 256;

/// The validated gateway config.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The file this config was read from (for messages and relative paths).
    pub source: PathBuf,
    pub server: ServerConfig,
    pub log: LogConfig,
    /// Upstreams in file order; routes refer to them by index.
    pub upstreams: Vec<Upstream>,
    /// Routes in match order: longest prefix first, host-specific before any-host.
    pub routes: Vec<Route>,
    /// The price file; required when any route is metered.
    pub pricing: Option<PricingConfig>,
    pub admin: AdminConfig,
    pub traffic: TrafficConfig,
    pub ledger: LedgerSection,
    /// `[cluster]`: share the books with other replicas through PostgreSQL.
    /// `None` runs a single node on the embedded store.
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: this replica's part in a cluster (DESIGN.md §7).
#[derive(Clone)]
pub struct ClusterConfig {
    /// The database URL (libpq form, several hosts allowed), read from the
    /// environment variable the file names: it carries the password.
    pub database_url: String,
    /// This replica's name in the books; default: one made at first start
    /// and kept in the data directory.
    pub replica: Option<String>,
    /// The URL other replicas forward admin writes to while this replica is
    /// the treasurer; default `http://` + the admin listener's address.
    pub admin_url: Option<String>,
    /// Connections in this replica's pool.
    pub max_connections: usize,
    /// A credit lease's lifetime from its last renewal.
    pub lease_ttl_ms: u64,
    /// The treasury's lease; a lapsed treasurer is replaced after this.
    pub treasury_ttl_ms: u64,
    /// How often settled debits are shipped (and the outbox flushed).
    pub ship_interval_ms: u64,
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL: it carries the password.
        f.debug_struct("ClusterConfig")
            .field("replica", &self.replica)
            .field("admin_url", &self.admin_url)
            .field("lease_ttl_ms", &self.lease_ttl_ms)
            .finish_non_exhaustive()
    }
}

/// `[ledger]`: how the credit ledger holds and persists its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerSection {
    /// Write every committed change through to the sled store (the default).
    /// Off keeps the ledger in memory only: a restart starts empty and the
    /// ledger-entries export is unavailable. For load comparisons and demos,
    /// never for real money.
    pub write_through: bool,
    /// Least time between two group flushes (fsyncs) of the store.
    pub flush_interval_ms: u64,
    /// How long a hold may stay open before it is voided.
    pub hold_ttl_ms: u64,
    /// Checkpoints and retention (`checkpoint_every_records`,
    /// `checkpoint_interval_ms`, `retain_days`, `export`, `export_dir`).
    pub history: crate::store::history::HistoryConfig,
}

impl Default for LedgerSection {
    fn default() -> Self {
        let ledger = crate::ledger::LedgerConfig::default();
        let store = crate::store::StoreConfig::default();
        LedgerSection {
            write_through: true,
            flush_interval_ms: store.flush_interval_ms,
            hold_ttl_ms: ledger.hold_ttl_ms,
            history: crate::store::history::HistoryConfig::default(),
        }
    }
}

/// Per-key traffic caps (answered with 429, never mixed with money refusals).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrafficConfig {
    pub defaults: TrafficCaps,
    /// Overrides by API key id.
    pub per_key: HashMap<u64, TrafficCaps>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficCaps {
    /// Requests a key may start per minute; `None`: no cap.
    pub requests_per_minute: Option<u32>,
    /// Requests a key may have open at once; `None`: no cap.
    pub max_in_flight: Option<u32>,
}

impl TrafficConfig {
    pub fn caps_for(&self, key_id: u64) -> TrafficCaps {
        self.per_key.get(&key_id).copied().unwrap_or(self.defaults)
    }
}

#[derive(Debug, Clone)]
pub struct PricingConfig {
    /// Resolved against the config file's directory.
    pub file: PathBuf,
    /// How often the price file is checked for changes.
    pub watch_interval: Duration,
    /// Past this many days since its `as_of`, `check-config` warns that the
    /// price table may be stale.
    pub max_age_days: u32,
}

/// Rows an organization's usage rollup may hold before that organization's
/// reports scan the ledger instead. A row is about 200 bytes, so the
/// default bounds a rollup near 20 MB.
/// Provider prices change every few weeks; a month-old table deserves a look.
pub const DEFAULT_PRICE_MAX_AGE_DAYS: u32 = 30;

pub const DEFAULT_USAGE_ROLLUP_MAX_ROWS: usize = 100_000;
/// Groups one usage report may have (see [`AdminConfig::max_report_groups`]).
pub const DEFAULT_MAX_REPORT_GROUPS: usize = 100_000;

#[derive(Clone)]
pub struct AdminConfig {
    /// The operator token for `/admin/v1` (all orgs). `None` disables the
    /// admin API; health, readiness and metrics stay open.
    pub operator_token: Option<String>,
    /// Tokens scoped to one organization: they see and change only that
    /// organization, and move money only with `finance = true`.
    pub org_tokens: Vec<OrgToken>,
    /// Networks alert webhooks may reach beyond public addresses (loopback,
    /// private ranges and metadata addresses are refused otherwise).
    pub alert_webhook_allow: Vec<ipnet::IpNet>,
    /// Rows one organization's usage rollup may hold; past it that
    /// organization's usage reports scan the ledger instead.
    pub usage_rollup_max_rows: usize,
    /// Groups one usage report may have: a tenant's clients name their end
    /// users, and a report grouped by millions of them would be held whole
    /// in the process every tenant shares. Past it the report is refused
    /// and asks for a narrower range or grouping.
    pub max_report_groups: usize,
    /// Writes (anything but GET) an organization token may make per
    /// minute: its token is a tenant's, and each write grows the journal.
    /// The operator token has no cap.
    pub org_writes_per_minute: u32,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            operator_token: None,
            org_tokens: Vec::new(),
            alert_webhook_allow: Vec::new(),
            usage_rollup_max_rows: DEFAULT_USAGE_ROLLUP_MAX_ROWS,
            max_report_groups: DEFAULT_MAX_REPORT_GROUPS,
            org_writes_per_minute: DEFAULT_ORG_WRITES_PER_MINUTE,
        }
    }
}

/// Admin writes an organization token may make per minute by default.
pub const DEFAULT_ORG_WRITES_PER_MINUTE: u32 = 600;

/// An organization-scoped admin token.
#[derive(Clone)]
pub struct OrgToken {
    /// The organization it acts for.
    pub org: u64,
    /// The token itself (from the environment, never from the file).
    pub token: String,
    /// May create or remove credit: purchases, adjustments, contracts, Lite
    /// allowances. Off unless the operator grants it in the config.
    pub finance: bool,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = self.operator_token.as_ref().map(|_| "<redacted>");
        f.debug_struct("AdminConfig").field("operator_token", &token).finish()
    }
}

/// How the gateway reads and charges the traffic of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteKind {
    /// A model API; the flavour says where `model`, limits and usage live.
    Model(Flavour),
    /// A tool priced per call and/or per unit; units come from a response
    /// header when the route names one.
    Tool { name: String, units_header: Option<HeaderName> },
    /// Forwarded without metering: the operator said so explicitly.
    Passthrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Flavour {
    OpenaiChat,
    OpenaiEmbeddings,
    OpenaiResponses,
    AnthropicMessages,
}

impl Flavour {
    /// The end of the path that creates a call in this API, wherever the
    /// upstream mounts it (`/v1/chat/completions`,
    /// `/openai/deployments/d/chat/completions`).
    pub fn create_path(self) -> &'static str {
        match self {
            Flavour::OpenaiChat => "/chat/completions",
            Flavour::OpenaiEmbeddings => "/embeddings",
            Flavour::OpenaiResponses => "/responses",
            Flavour::AnthropicMessages => "/messages",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub max_body_bytes: u64,
    /// Bytes of request bodies read whole (model routes) the proxy holds at
    /// once; a request that would pass it gets 503 `gateway_busy`, so many
    /// large bodies sent slowly cannot run the process out of memory.
    pub max_buffered_body_bytes: u64,
    /// The most of that one organization's requests may hold at once, so
    /// one tenant's slow bodies cannot leave every other tenant refused.
    pub max_buffered_body_bytes_per_org: u64,
    pub shutdown_grace: Duration,
    pub header_read_timeout: Duration,
    /// Bound on reading a request body the gateway must see whole (model
    /// routes); a slower client gets 408.
    pub body_read_timeout: Duration,
    pub max_connections: usize,
    /// Threads of the async runtime that serves the proxy and admin API;
    /// `None`: one per core (as the machine reports them).
    pub workers: Option<usize>,
    /// How the proxy's connections are spread over those threads.
    pub scheduler: Scheduler,
    /// After a client leaves a metered response, the gateway reads on for the
    /// upstream's usage this long at most (then it charges the hold).
    pub read_on_timeout: Duration,
    /// ... and this many body bytes at most.
    pub read_on_max_bytes: u64,
    /// A response still streaming after this long is ended (and charged
    /// the hold): no request holds credit forever.
    pub max_response_duration: Duration,
    /// A connection whose response has waited this long for its client to
    /// take the next part is closed: a client that stopped reading would
    /// otherwise hold its connection (and its slot) until
    /// `max_response_duration`.
    pub client_stall_timeout: Duration,
    /// Streams one h2 client connection may have open at once: each is a
    /// request in flight (and may be an upstream connection), and the
    /// connection cap counts the connection once.
    pub http2_max_concurrent_streams: u32,
}

/// `[server] scheduler`: how proxy connections are spread over threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// One multi-threaded runtime whose workers steal each other's tasks.
    #[default]
    WorkStealing,
    /// One single-threaded runtime per worker, each accepting on its own
    /// `SO_REUSEPORT` listener, so a connection's tasks never change thread
    /// (as nginx and pingora run). The admin API and background work keep a
    /// small shared runtime of their own. Single node only.
    ThreadPerCore,
}

impl ServerConfig {
    /// Threads that serve the proxy: the runtime's workers, or one
    /// single-threaded runtime each under `thread-per-core`.
    pub fn proxy_threads(&self) -> usize {
        self.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
    }

    /// Workers of the shared multi-threaded runtime: all of them, or one for
    /// the admin API and background work under `thread-per-core`.
    pub fn shared_runtime_workers(&self) -> Option<usize> {
        match self.scheduler {
            Scheduler::WorkStealing => self.workers,
            Scheduler::ThreadPerCore => Some(1),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A `tracing` filter directive such as `info` or `creditgate=debug`.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// One upstream service the gateway forwards to.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path of the base URL without a trailing slash; prepended to request paths.
    pub base_path: String,
    /// The API it reaches, by name: scheme, host (ASCII case and a trailing
    /// dot folded) and port (the scheme's default when none is written).
    /// Entries with the same origin are one API to the routing rules, which
    /// compare paths as the upstream is sent them (base path first).
    pub origin: (String, String, u16),
    /// The index of the first upstream entry with this origin: compared on
    /// the request path instead of the origin's text.
    pub origin_group: usize,
    pub connect_timeout: Duration,
    /// Time from sending the request to receiving the response head.
    pub response_timeout: Duration,
    /// Longest silence allowed between two chunks of a response body.
    pub idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Speak HTTP/2 without negotiation (h2c) to a plain-HTTP upstream.
    pub http2_prior_knowledge: bool,
    pub credential: Option<Credential>,
    /// When set, the only client request headers forwarded (the gateway's
    /// own — credential, request id, length — are added after).
    pub forward_headers: Option<Vec<HeaderName>>,
    /// The query parameters a metered model call may carry to it: upstreams
    /// read some from the query (LiteLLM's proxy takes `?model=` over the
    /// body's), which the gateway neither reads nor prices.
    pub model_query_params: Vec<String>,
    /// The output-cap field its Chat Completions read: `max_completion_tokens`
    /// (OpenAI's), or `max_tokens` for servers whose OpenAI layer reads only
    /// that (Ollama, llama.cpp, DeepSeek, LM Studio), where a cap sent in the
    /// other field would be ignored.
    pub chat_cap_field: &'static str,
    /// The `Host` header of a plain-HTTP/1.1 upstream, made once here: the
    /// pooled client would otherwise format it for every request. `None`
    /// where the connection may speak HTTP/2, which carries `:authority`.
    pub host_header: Option<HeaderValue>,
}

/// The upstream's own credential, added to every forwarded request.
#[derive(Clone)]
pub struct Credential {
    pub header: HeaderName,
    /// Marked sensitive so hyper never indexes it in HPACK tables.
    pub value: HeaderValue,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The value is a secret: never print it, not even at trace level.
        f.debug_struct("Credential").field("header", &self.header).field("value", &"<redacted>").finish()
    }
}

/// A path prefix (and optional host) mapped to an upstream.
#[derive(Debug, Clone)]
pub struct Route {
    /// Shared, not copied, by every request's context, record and metrics label.
    pub prefix: Arc<str>,
    pub host: Option<String>,
    pub upstream: usize,
    pub kind: RouteKind,
    pub limits: RouteLimits,
}

/// The tools the routes charge for (see [`GatewayConfig::required_tools`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequiredTools {
    /// Every tool a route serves.
    pub names: Vec<String>,
    /// Tools some route serves without a `units_header`: it charges every
    /// call 0 units, so a price per unit there would go uncharged.
    pub without_units: Vec<String>,
}

/// What a route lets a request cost, and who may use it. Each bound exists
/// because a client chooses the value it bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteLimits {
    /// A pass-through route served without an API key (and then without the
    /// upstream's credential). Off unless the operator says so.
    pub public: bool,
    /// Input tokens held for context the upstream reads on its own
    /// (`previous_response_id`, `conversation`, file ids, URL inputs): the
    /// request's bytes do not bound it. 0 refuses such requests.
    pub context_budget_tokens: u64,
    /// The smallest output cap the gateway lowers a request to when the
    /// wallet cannot pay for the default cap; below it the answer is 402.
    pub min_output_tokens: u64,
    /// Sanity ceiling on each count an upstream reports (tokens, a tool's
    /// units): a report above it is charged at the ceiling and flagged, as an
    /// upstream bug rather than a bill.
    pub usage_ceiling: u64,
    /// Units a tool call is held for (per-unit tools).
    pub max_units: u64,
    /// Calls of the upstream's hosted tools (web search, file search, ...) a
    /// Responses request is held for and sent with as `max_tool_calls`,
    /// when it names no bound itself.
    pub max_tool_calls: u64,
    /// Methods a pass-through route forwards; `None`: any. A pass-through on
    /// an upstream that metered routes also use forwards only
    /// [`SAFE_METHODS`] unless its `methods` lists more: the upstream's other
    /// create calls (`/v1/batches`, `/v1/images/generations`) are billed too,
    /// and a broad prefix would pass them on unmetered.
    pub methods: Option<Vec<http::Method>>,
}

/// What a pass-through of a model upstream forwards by default: methods
/// that read, which no model API bills (a tool API may: a search is a GET,
/// so a pass-through on a tool's upstream must list its methods).
pub const SAFE_METHODS: [http::Method; 3] = [http::Method::GET, http::Method::HEAD, http::Method::OPTIONS];

impl Default for RouteLimits {
    fn default() -> Self {
        RouteLimits {
            public: false,
            context_budget_tokens: 128_000,
            min_output_tokens: 16,
            usage_ceiling: 10_000_000,
            max_units: 100,
            max_tool_calls: 10,
            methods: None,
        }
    }
}

impl Route {
    /// Whether this route serves `path` on `host_name` (the request's host
    /// without its port). Prefixes match whole path
    /// segments: `/v1/chat` serves `/v1/chat/completions` but not `/v1/chatty`.
    /// A model route owns every path under its prefix, and serves only those
    /// that create a call in its API ([`Route::creates_calls`]): a path it
    /// does not serve must not fall through to a broader unmetered route.
    fn matches(&self, host_name: Option<&str>, path: &str) -> bool {
        if let Some(want) = &self.host {
            match host_name {
                Some(h) if h.eq_ignore_ascii_case(want) => {}
                _ => return false,
            }
        }
        self.serves_path(path)
    }

    /// Whether this route's prefix covers `path`, whatever the host.
    pub fn serves_path(&self, path: &str) -> bool {
        match path.strip_prefix(&*self.prefix) {
            Some(rest) => self.prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }

    /// Whether a model route serves `path`: one that creates a call in its
    /// API. Beside it are the upstream's stored objects (`/v1/responses/{id}`,
    /// `/v1/messages/batches`), which belong to every tenant of the
    /// operator's account and are not metered. Other routes serve any path.
    pub fn creates_calls(&self, path: &str) -> bool {
        match &self.kind {
            RouteKind::Model(flavour) => path.trim_end_matches('/').ends_with(flavour.create_path()),
            _ => true,
        }
    }
}

fn strip_port(host: &str) -> &str {
    // A byte search: `rsplit_once` sets up a char searcher for every request.
    match host.bytes().rposition(|b| b == b':') {
        Some(colon) if host.as_bytes()[colon + 1..].iter().all(u8::is_ascii_digit) => &host[..colon],
        _ => host,
    }
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub line: usize,
    pub message: String,
    pub hint: Option<String>,
}

/// Everything wrong with a config file, reported at once.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}", render_problems(file, problems))]
    Invalid { file: String, problems: Vec<ConfigProblem> },
}

fn render_problems(file: &str, problems: &[ConfigProblem]) -> String {
    let mut out = format!("{} problem(s) in {file}:", problems.len());
    for p in problems {
        out.push_str(&format!("\n  {file}:{}: {}", p.line, p.message));
        if let Some(hint) = &p.hint {
            out.push_str(&format!(" (hint: {hint})"));
        }
    }
    out
}

// ---------------------------------------------------------------- raw layer

/// A section of the file and where it starts in the text.
struct Section {
    span: std::ops::Range<usize>,
    value: toml::Value,
}

impl Section {
    fn span(&self) -> std::ops::Range<usize> {
        self.span.clone()
    }

    fn into_inner(self) -> toml::Value {
        self.value
    }
}

/// Asked for as `toml::Spanned` is, so the reader gives the section's place
/// where it has one. It has none for a table made only by its sub-tables or
/// dotted keys (`[traffic.per_key."7"]` with no `[traffic]` line), which
/// `Spanned` then refused as "expected a borrowed string": such a section
/// is read all the same and placed at the top of the file.
impl<'de> Deserialize<'de> for Section {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Section, D::Error> {
        const NAME: &str = "$__serde_spanned_private_Spanned";
        const START: &str = "$__serde_spanned_private_start";
        const END: &str = "$__serde_spanned_private_end";
        const VALUE: &str = "$__serde_spanned_private_value";

        struct SectionVisitor;

        impl<'de> serde::de::Visitor<'de> for SectionVisitor {
            type Value = Section;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a table")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Section, A::Error> {
                let mut table = toml::Table::new();
                let Some(first) = map.next_key::<String>()? else {
                    return Ok(Section { span: 0..0, value: toml::Value::Table(table) });
                };
                if first == START {
                    let start: usize = map.next_value()?;
                    let (_, end) = map.next_entry::<String, usize>()?.unwrap_or_default();
                    let value = map.next_entry::<String, toml::Value>()?.map(|(_, value)| value);
                    let value = value.ok_or_else(|| serde::de::Error::missing_field(VALUE))?;
                    return Ok(Section { span: start..end.max(start), value });
                }
                table.insert(first, map.next_value()?);
                while let Some((key, value)) = map.next_entry::<String, toml::Value>()? {
                    table.insert(key, value);
                }
                Ok(Section { span: 0..0, value: toml::Value::Table(table) })
            }
        }

        deserializer.deserialize_struct(NAME, &[START, END, VALUE], SectionVisitor)
    }
}

/// The top level of the file. Each section is kept as a spanned TOML value and
/// deserialized on its own, so an error in one section does not hide the rest.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTop {
    server: Option<Section>,
    log: Option<Section>,
    pricing: Option<Section>,
    admin: Option<Section>,
    traffic: Option<Section>,
    ledger: Option<Section>,
    cluster: Option<Section>,
    #[serde(default)]
    upstreams: BTreeMap<String, Section>,
    #[serde(default)]
    routes: Vec<Section>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    admin_listen: Option<String>,
    data_dir: Option<PathBuf>,
    max_body_bytes: Option<u64>,
    max_buffered_body_bytes: Option<u64>,
    max_buffered_body_bytes_per_org: Option<u64>,
    shutdown_grace_ms: Option<u64>,
    header_read_timeout_ms: Option<u64>,
    body_read_timeout_ms: Option<u64>,
    max_connections: Option<usize>,
    workers: Option<usize>,
    scheduler: Option<Scheduler>,
    read_on_timeout_ms: Option<u64>,
    read_on_max_bytes: Option<u64>,
    max_response_ms: Option<u64>,
    client_stall_timeout_ms: Option<u64>,
    http2_max_concurrent_streams: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<LogFormat>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    base_url: String,
    connect_timeout_ms: Option<u64>,
    response_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    pool_max_idle_per_host: Option<usize>,
    #[serde(default)]
    http2_prior_knowledge: bool,
    /// Name of the environment variable that holds the upstream's secret.
    credential_env: Option<String>,
    /// Header that carries it (default `authorization`).
    credential_header: Option<String>,
    /// Prefix before the secret, e.g. `Bearer` (default: none for custom
    /// headers, `Bearer` for `authorization`).
    credential_scheme: Option<String>,
    /// Request headers forwarded to this upstream; unset forwards every
    /// end-to-end header but the client's credentials and account selectors.
    forward_headers: Option<Vec<String>>,
    /// See [`Upstream::model_query_params`] (default: `api-version`, which Azure needs).
    model_query_params: Option<Vec<String>>,
    /// `max_completion_tokens` (default) or `max_tokens`: see [`Upstream::chat_cap_field`].
    chat_cap_field: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    prefix: String,
    host: Option<String>,
    upstream: String,
    flavour: Option<Flavour>,
    tool: Option<String>,
    units_header: Option<String>,
    #[serde(default)]
    passthrough: bool,
    #[serde(default)]
    public: bool,
    /// Pass-through routes: the methods forwarded (default: any, or only
    /// GET, HEAD and OPTIONS on an upstream a metered route also uses).
    methods: Option<Vec<String>>,
    context_budget_tokens: Option<u64>,
    min_output_tokens: Option<u64>,
    usage_ceiling: Option<u64>,
    max_units: Option<u64>,
    max_tool_calls: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPricing {
    file: PathBuf,
    watch_interval_ms: Option<u64>,
    max_age_days: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTraffic {
    requests_per_minute: Option<u32>,
    max_in_flight: Option<u32>,
    /// Overrides by key id: `[traffic.per_key."12"]`.
    #[serde(default)]
    per_key: BTreeMap<String, TrafficCaps>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLedger {
    write_through: Option<bool>,
    flush_interval_ms: Option<u64>,
    hold_ttl_ms: Option<u64>,
    checkpoint_every_records: Option<u64>,
    checkpoint_interval_ms: Option<u64>,
    retain_days: Option<u32>,
    export: Option<bool>,
    export_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    database_url_env: String,
    replica: Option<String>,
    admin_url: Option<String>,
    max_connections: Option<usize>,
    lease_ttl_ms: Option<u64>,
    treasury_ttl_ms: Option<u64>,
    ship_interval_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    /// Environment variable holding the operator token.
    token_env: Option<String>,
    #[serde(default)]
    org_tokens: Vec<RawOrgToken>,
    /// CIDR networks alert webhooks may reach besides public addresses.
    #[serde(default)]
    alert_webhook_allow: Vec<ipnet::IpNet>,
    /// Rows per organization's usage rollup (default 100,000).
    usage_rollup_max_rows: Option<usize>,
    max_report_groups: Option<usize>,
    /// Admin writes per minute per organization token (default 600).
    org_writes_per_minute: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrgToken {
    org: u64,
    token_env: String,
    #[serde(default)]
    finance: bool,
}

// ---------------------------------------------------------- validated layer

/// Collects problems while walking the file, so all of them are reported.
struct Checker<'a> {
    text: &'a str,
    problems: Vec<ConfigProblem>,
}

impl Checker<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
    }

    fn problem(&mut self, offset: usize, message: impl Into<String>, hint: Option<&str>) {
        let line = self.line_of(offset);
        self.problems.push(ConfigProblem { line, message: message.into(), hint: hint.map(str::to_owned) });
    }

    /// Deserialize one section; on failure record the problem at its line.
    fn section<T: DeserializeOwned>(&mut self, what: &str, value: Section) -> Option<T> {
        let offset = value.span().start;
        match value.into_inner().try_into::<T>() {
            Ok(v) => Some(v),
            Err(e) => {
                let message = format!("{what}: {}", e.message().trim_end());
                self.problem(
                    offset,
                    message,
                    Some("check the key names and value types against config/gateway.toml"),
                );
                None
            }
        }
    }
}

impl GatewayConfig {
    /// Read and validate a config file, taking secrets from the process environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(path, &text, &|name| std::env::var(name).ok())
    }

    /// Validate config text. `env` resolves environment variables (injectable
    /// so tests need not touch the process environment).
    pub fn parse(path: &Path, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let mut checker = Checker { text, problems: Vec::new() };
        let top: RawTop = match toml::from_str(text) {
            Ok(top) => top,
            Err(e) => {
                let offset = e.span().map(|s| s.start).unwrap_or(0);
                checker.problem(offset, e.message().trim_end().to_owned(), Some("the file must be valid TOML with only the documented sections: server, log, pricing, admin, traffic, ledger, cluster, upstreams, routes"));
                return Err(ConfigError::Invalid { file, problems: checker.problems });
            }
        };

        let server_offset = top.server.as_ref().map_or(0, |v| v.span().start);
        let server = top.server.and_then(|v| checker.section::<RawServer>("[server]", v)).unwrap_or_default();
        let log_offset = top.log.as_ref().map_or(0, |v| v.span().start);
        let log = top.log.and_then(|v| checker.section::<RawLog>("[log]", v)).unwrap_or_default();
        let server = validate_server(&mut checker, server_offset, server);
        let level = log.level.unwrap_or_else(|| "info".to_owned());
        if let Some(bad) = unknown_log_level(&level) {
            checker.problem(
                log_offset,
                format!("[log] level {level:?}: {bad:?} is not a level, so every line would be filtered out"),
                Some("use error, warn, info, debug, trace or off, or target=level pairs joined by commas"),
            );
        }
        let log = LogConfig { level, format: log.format.unwrap_or(LogFormat::Text) };

        let pricing = top.pricing.and_then(|v| {
            let offset = v.span().start;
            let raw = checker.section::<RawPricing>("[pricing]", v)?;
            let base = path.parent().unwrap_or(Path::new("."));
            if raw.file.as_os_str().is_empty() {
                checker.problem(
                    offset,
                    "[pricing] file is empty",
                    Some("name the price file, e.g. file = \"prices.toml\""),
                );
            }
            Some(PricingConfig {
                file: base.join(raw.file),
                watch_interval: duration_ms(
                    &mut checker,
                    offset,
                    "[pricing] watch_interval_ms",
                    raw.watch_interval_ms,
                    DEFAULT_PRICE_WATCH_INTERVAL_MS,
                )
                .max(Duration::from_millis(10)),
                max_age_days: raw.max_age_days.unwrap_or(DEFAULT_PRICE_MAX_AGE_DAYS),
            })
        });
        let admin = top.admin.and_then(|v| checker.section::<RawAdmin>("[admin]", v)).unwrap_or_default();
        if admin.org_writes_per_minute == Some(0) {
            checker.problem(
                0,
                "[admin] org_writes_per_minute = 0 would refuse every write of an organization token",
                Some("use at least 1; the default is 600"),
            );
        }
        // An organization token listed but not set is a mistake (its admins
        // would get 401 with nothing said), as an upstream's is; the
        // operator's `token_env` unset turns the operator's access off.
        let mut org_tokens = Vec::new();
        for t in admin.org_tokens {
            match env(&t.token_env).filter(|v| !v.is_empty()) {
                Some(token) => org_tokens.push(OrgToken { org: t.org, token, finance: t.finance }),
                None => checker.problem(
                    0,
                    format!(
                        "[admin] org_tokens: environment variable {} (organization {}) is not set",
                        t.token_env, t.org
                    ),
                    Some("export it before starting, or remove the entry"),
                ),
            }
        }
        let admin = AdminConfig {
            operator_token: admin.token_env.and_then(|var| env(&var)).filter(|t| !t.is_empty()),
            org_tokens,
            alert_webhook_allow: admin.alert_webhook_allow,
            usage_rollup_max_rows: admin.usage_rollup_max_rows.unwrap_or(DEFAULT_USAGE_ROLLUP_MAX_ROWS),
            max_report_groups: admin.max_report_groups.unwrap_or(DEFAULT_MAX_REPORT_GROUPS).max(1),
            org_writes_per_minute: admin.org_writes_per_minute.unwrap_or(DEFAULT_ORG_WRITES_PER_MINUTE),
        };
        // A token is matched to the first entry that has it: one secret given
        // twice would let one organization's admins act as another's (or as
        // the operator).
        let mut tokens: Vec<&str> = admin.org_tokens.iter().map(|t| t.token.as_str()).collect();
        tokens.extend(admin.operator_token.as_deref());
        tokens.sort_unstable();
        if tokens.windows(2).any(|pair| pair[0] == pair[1]) {
            checker.problem(
                0,
                "[admin] two admin tokens (org_tokens, token_env) hold the same secret",
                Some("give every organization token, and the operator's, a secret of its own"),
            );
        }

        let traffic = validate_traffic(&mut checker, top.traffic);
        let ledger = validate_ledger(&mut checker, top.ledger);
        let cluster = top.cluster.and_then(|value| validate_cluster(&mut checker, value, env));
        if cluster.is_some() && server.scheduler == Scheduler::ThreadPerCore {
            checker.problem(
                0,
                "[server] scheduler = \"thread-per-core\" is for a single node; a cluster replica's database connections live on the shared runtime",
                Some("leave scheduler out (work-stealing) with [cluster]"),
            );
        }

        let mut upstreams = Vec::new();
        let mut upstream_index = HashMap::new();
        for (name, value) in top.upstreams {
            let offset = value.span().start;
            let what = format!("[upstreams.{name}]");
            if let Some(raw) = checker.section::<RawUpstream>(&what, value) {
                if let Some(up) = validate_upstream(&mut checker, offset, &name, raw, env) {
                    upstream_index.insert(name, upstreams.len());
                    upstreams.push(up);
                }
            }
        }
        for index in 0..upstreams.len() {
            let origin = &upstreams[index].origin;
            let group = upstreams.iter().position(|u| u.origin == *origin).unwrap_or(index);
            upstreams[index].origin_group = group;
        }

        let mut routes = Vec::new();
        for (i, value) in top.routes.into_iter().enumerate() {
            let offset = value.span().start;
            let what = format!("[[routes]] #{}", i + 1);
            if let Some(raw) = checker.section::<RawRoute>(&what, value) {
                if let Some(route) = validate_route(&mut checker, offset, raw, &upstream_index) {
                    routes.push(route);
                }
            }
        }
        if routes.is_empty() && checker.problems.is_empty() {
            checker.problem(
                0,
                "no routes are configured",
                Some("add a [[routes]] table with `prefix` and `upstream`"),
            );
        }
        check_duplicate_routes(&mut checker, &routes);
        check_tool_passthroughs(&mut checker, &routes, &upstreams);
        only_reads_through_metered_upstreams(&mut routes, &upstreams);
        if pricing.is_none() && routes.iter().any(|r| r.kind != RouteKind::Passthrough) {
            checker.problem(
                0,
                "metered routes need a price file, and [pricing] is missing",
                Some("add [pricing] with file = \"prices.toml\""),
            );
        }
        // Most specific first: host-bound routes, then longer prefixes.
        routes.sort_by(|a, b| {
            b.host.is_some().cmp(&a.host.is_some()).then(b.prefix.len().cmp(&a.prefix.len()))
        });

        if !checker.problems.is_empty() {
            return Err(ConfigError::Invalid { file, problems: checker.problems });
        }
        Ok(GatewayConfig {
            source: path.to_owned(),
            server,
            log,
            upstreams,
            routes,
            pricing,
            admin,
            traffic,
            ledger,
            cluster,
        })
    }

    /// Tools that metered routes charge for; the price file must price
    /// each, and may price per unit only those whose every route counts units.
    pub fn required_tools(&self) -> RequiredTools {
        let mut tools = RequiredTools::default();
        for route in &self.routes {
            if let RouteKind::Tool { name, units_header } = &route.kind {
                tools.names.push(name.clone());
                if units_header.is_none() {
                    tools.without_units.push(name.clone());
                }
            }
        }
        for names in [&mut tools.names, &mut tools.without_units] {
            names.sort();
            names.dedup();
        }
        tools
    }

    /// The route serving a request, if any. A host-bound route comes first,
    /// but `Host` is the client's to choose: a pass-through route never
    /// takes a path that a metered route of the same upstream claims for
    /// some host, or any client could reach that upstream's billed
    /// endpoints unmetered by naming (or not naming) a host.
    pub fn route_for(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        // The port stripped once, not once per route tried.
        let host = host.map(strip_port);
        let route = self.routes.iter().find(|r| r.matches(host, path))?;
        if route.kind != RouteKind::Passthrough {
            return Some(route);
        }
        // The longest metered claim on the path for any host, against the
        // longest pass-through prefix that serves it on this host. Any entry
        // for the same API counts (a second one, kept for its timeouts, say,
        // reaches the same billed endpoints), on the path the upstream is
        // sent: an entry's base path goes in front of the client's.
        let upstream = |r: &Route| self.upstreams.get(r.upstream);
        let group = |r: &Route| upstream(r).map(|u| u.origin_group);
        let same_api = |r: &&Route| group(r) == group(route);
        if !self.routes.iter().filter(same_api).any(|r| r.kind != RouteKind::Passthrough) {
            return Some(route);
        }
        let base = |r: &Route| upstream(r).map_or("", |u| u.base_path.as_str());
        let sent = format!("{}{path}", base(route));
        // What a client of `r` would send for the upstream to be sent `sent`.
        let path_of = |r: &Route| {
            sent.strip_prefix(base(r)).filter(|rest| rest.starts_with('/') || rest.is_empty()).map(|rest| {
                if rest.is_empty() {
                    "/"
                } else {
                    rest
                }
            })
        };
        // Some upstreams match paths loosely (case-insensitively, or with
        // `;` parameters cut off): a claim on the loose form counts too.
        let claims = |r: &Route, path: &str| {
            r.serves_path(path)
                || loosely(path).is_some_and(|loose| {
                    let prefix = r.prefix.to_ascii_lowercase();
                    match loose.strip_prefix(&*prefix) {
                        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
                        None => false,
                    }
                })
        };
        // Lengths on the upstream's side: base path and prefix.
        let reach = |r: &Route| base(r).len() + r.prefix.len();
        let metered = self
            .routes
            .iter()
            .filter(same_api)
            .filter(|r| r.kind != RouteKind::Passthrough && path_of(r).is_some_and(|path| claims(r, path)))
            .max_by_key(|r| reach(r));
        let unmetered = self
            .routes
            .iter()
            .filter(same_api)
            .filter(|r| {
                r.kind == RouteKind::Passthrough && path_of(r).is_some_and(|path| r.matches(host, path))
            })
            .map(reach)
            .max()
            .unwrap_or(0);
        Some(metered.filter(|r| reach(r) >= unmetered).unwrap_or(route))
    }
}

/// `path` as an upstream that matches paths loosely may read it: ASCII case
/// folded and `;` parameters cut from each segment (`/V1/Chat;x=1/completions`
/// is `/v1/chat/completions` to such a server); `None` when it reads the same.
fn loosely(path: &str) -> Option<String> {
    if !path.bytes().any(|b| b == b';' || b.is_ascii_uppercase()) {
        return None;
    }
    let segments: Vec<String> =
        path.split('/').map(|segment| segment.split(';').next().unwrap_or("").to_ascii_lowercase()).collect();
    Some(segments.join("/"))
}

/// Most `[server] max_connections` may be: far above what one process can
/// hold open, and well inside what its semaphore can count.
const MAX_CONNECTIONS: usize = 1_000_000;

/// Longest any timeout or duration in the config may be (a week): a deadline
/// further off could overflow the clock it is added to.
const MAX_DURATION_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// `value` (or `default`) milliseconds, refused past [`MAX_DURATION_MS`].
fn duration_ms(
    checker: &mut Checker<'_>,
    offset: usize,
    name: &str,
    value: Option<u64>,
    default: u64,
) -> Duration {
    let ms = value.unwrap_or(default);
    if ms > MAX_DURATION_MS {
        checker.problem(offset, format!("{name} = {ms} is too long"), Some("use at most 604800000 (a week)"));
    }
    Duration::from_millis(ms.min(MAX_DURATION_MS))
}

/// Refuses a timeout of 0, which would end what it times at once.
fn refuse_zero(checker: &mut Checker<'_>, offset: usize, name: &str, value: Duration) {
    if value.is_zero() {
        checker.problem(
            offset,
            format!("{name} = 0 would cut everything it times at once"),
            Some("use at least 1"),
        );
    }
}

/// `ms`, refused past [`MAX_DURATION_MS`] (for settings kept in milliseconds).
fn at_most_a_week(checker: &mut Checker<'_>, offset: usize, name: &str, ms: u64) -> u64 {
    let kept = duration_ms(checker, offset, name, Some(ms), ms);
    u64::try_from(kept.as_millis()).unwrap_or(MAX_DURATION_MS)
}

/// The first directive of a tracing filter that is a lone word but no
/// level: the filter reads `warning` as a target (at every level) and the
/// gateway's own lines, errors included, are filtered out. Targets with a
/// path (`hyper::proto`), span filters and `target=level` pairs are left to
/// the filter; a level after `=` must be one.
fn unknown_log_level(filter: &str) -> Option<&str> {
    const LEVELS: [&str; 12] =
        ["error", "warn", "info", "debug", "trace", "off", "0", "1", "2", "3", "4", "5"];
    let is_level =
        |word: &str| word.is_empty() || LEVELS.iter().any(|known| known.eq_ignore_ascii_case(word));
    filter.split(',').map(str::trim).filter(|d| !d.is_empty() && !d.contains('[')).find(|directive| {
        match directive.rsplit_once('=') {
            Some((_, level)) => !is_level(level.trim()),
            None => !directive.contains("::") && !is_level(directive),
        }
    })
}

fn validate_server(checker: &mut Checker<'_>, offset: usize, raw: RawServer) -> ServerConfig {
    let mut addr = |value: Option<String>, default: &str, key: &str| -> SocketAddr {
        let text = value.unwrap_or_else(|| default.to_owned());
        text.parse().unwrap_or_else(|_| {
            checker.problem(
                offset,
                format!("[server] {key} = {text:?} is not an address"),
                Some("write it as IP:PORT, e.g. \"127.0.0.1:8080\""),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    };
    let listen = addr(raw.listen, "127.0.0.1:8080", "listen");
    let admin_listen = addr(raw.admin_listen, "127.0.0.1:8081", "admin_listen");
    let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
    if max_body_bytes == 0 {
        checker.problem(
            offset,
            "[server] max_body_bytes must be above 0",
            Some("the default is 8388608 (8 MiB)"),
        );
    }
    let max_buffered_body_bytes = raw.max_buffered_body_bytes.unwrap_or(DEFAULT_MAX_BUFFERED_BODY_BYTES);
    if max_buffered_body_bytes < max_body_bytes {
        checker.problem(
            offset,
            format!(
                "[server] max_buffered_body_bytes = {max_buffered_body_bytes} is below max_body_bytes = {max_body_bytes}: \
                 a body of the largest size could never be read"
            ),
            Some("the default is 536870912 (512 MiB)"),
        );
    }
    // A quarter of the whole by default, and never less than one body.
    let max_buffered_body_bytes_per_org = raw
        .max_buffered_body_bytes_per_org
        .unwrap_or_else(|| (max_buffered_body_bytes / 4).max(max_body_bytes).min(max_buffered_body_bytes));
    if max_buffered_body_bytes_per_org < max_body_bytes
        || max_buffered_body_bytes_per_org > max_buffered_body_bytes
    {
        checker.problem(
            offset,
            format!(
                "[server] max_buffered_body_bytes_per_org = {max_buffered_body_bytes_per_org} is not between \
                 max_body_bytes = {max_body_bytes} and max_buffered_body_bytes = {max_buffered_body_bytes}"
            ),
            Some("leave it out for a quarter of max_buffered_body_bytes"),
        );
    }
    if let Some(workers) = raw.workers.filter(|n| !(1..=MAX_WORKERS).contains(n)) {
        checker.problem(
            offset,
            format!("[server] workers = {workers} is out of range"),
            Some("use 1 to 1024, or leave it out for one per core"),
        );
    }
    let mut ms = |name: &str, value: Option<u64>, default: u64| {
        duration_ms(checker, offset, &format!("[server] {name}"), value, default)
    };
    let shutdown_grace = ms("shutdown_grace_ms", raw.shutdown_grace_ms, DEFAULT_SHUTDOWN_GRACE_MS);
    let header_read_timeout =
        ms("header_read_timeout_ms", raw.header_read_timeout_ms, DEFAULT_HEADER_READ_TIMEOUT_MS);
    let body_read_timeout =
        ms("body_read_timeout_ms", raw.body_read_timeout_ms, DEFAULT_BODY_READ_TIMEOUT_MS);
    let read_on_timeout = ms("read_on_timeout_ms", raw.read_on_timeout_ms, DEFAULT_READ_ON_TIMEOUT_MS);
    let max_response_duration = ms("max_response_ms", raw.max_response_ms, DEFAULT_MAX_RESPONSE_MS);
    let client_stall_timeout =
        ms("client_stall_timeout_ms", raw.client_stall_timeout_ms, DEFAULT_CLIENT_STALL_TIMEOUT_MS);
    if client_stall_timeout < Duration::from_millis(100) {
        checker.problem(
            offset,
            "[server] client_stall_timeout_ms is below 100: clients that read at all would be cut",
            Some("the default is 60000"),
        );
    }
    // At 0 every connection, body or response would be cut at once (and
    // every metered call charged its hold).
    for (name, value) in [
        ("header_read_timeout_ms", header_read_timeout),
        ("body_read_timeout_ms", body_read_timeout),
        ("max_response_ms", max_response_duration),
    ] {
        refuse_zero(checker, offset, &format!("[server] {name}"), value);
    }
    let max_connections = raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if !(1..=MAX_CONNECTIONS).contains(&max_connections) {
        checker.problem(
            offset,
            format!("[server] max_connections = {max_connections} is out of range"),
            Some("use 1 to 1000000; the default is 10000"),
        );
    }
    ServerConfig {
        listen,
        admin_listen,
        data_dir: raw.data_dir.unwrap_or_else(|| PathBuf::from("./data")),
        max_body_bytes,
        max_buffered_body_bytes,
        max_buffered_body_bytes_per_org,
        shutdown_grace,
        header_read_timeout,
        body_read_timeout,
        max_connections: max_connections.clamp(1, MAX_CONNECTIONS),
        workers: raw.workers.map(|n| n.clamp(1, MAX_WORKERS)),
        scheduler: raw.scheduler.unwrap_or_default(),
        read_on_timeout,
        read_on_max_bytes: raw.read_on_max_bytes.unwrap_or(DEFAULT_READ_ON_MAX_BYTES),
        max_response_duration,
        client_stall_timeout,
        http2_max_concurrent_streams: raw
            .http2_max_concurrent_streams
            .unwrap_or(DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS)
            .max(1),
    }
}

fn validate_ledger(checker: &mut Checker<'_>, value: Option<Section>) -> LedgerSection {
    let defaults = LedgerSection::default();
    let Some(value) = value else {
        return defaults;
    };
    let offset = value.span().start;
    let Some(raw) = checker.section::<RawLedger>("[ledger]", value) else {
        return defaults;
    };
    let hold_ttl_ms = raw.hold_ttl_ms.unwrap_or(defaults.hold_ttl_ms);
    let hold_ttl_ms = at_most_a_week(checker, offset, "[ledger] hold_ttl_ms", hold_ttl_ms);
    if hold_ttl_ms < 1_000 {
        checker.problem(
            offset,
            format!("[ledger] hold_ttl_ms = {hold_ttl_ms} would void holds of requests still running"),
            Some("use at least 1000; the default is 600000 (10 minutes)"),
        );
    }
    let flush_interval_ms = raw.flush_interval_ms.unwrap_or(defaults.flush_interval_ms);
    if flush_interval_ms > 1_000 {
        checker.problem(
            offset,
            format!("[ledger] flush_interval_ms = {flush_interval_ms} leaves settles undurable too long"),
            Some("use at most 1000; the default is 5"),
        );
    }
    let history = validate_history(checker, offset, &raw, defaults.history);
    LedgerSection {
        write_through: raw.write_through.unwrap_or(defaults.write_through),
        flush_interval_ms,
        hold_ttl_ms,
        history,
    }
}

fn validate_history(
    checker: &mut Checker<'_>,
    offset: usize,
    raw: &RawLedger,
    defaults: crate::store::history::HistoryConfig,
) -> crate::store::history::HistoryConfig {
    let every = raw.checkpoint_every_records.unwrap_or(defaults.checkpoint_every_records);
    if every == 0 {
        checker.problem(
            offset,
            "[ledger] checkpoint_every_records = 0 would checkpoint without end",
            Some("use at least 1; the default is 1000000"),
        );
    }
    let interval = raw.checkpoint_interval_ms.unwrap_or(defaults.checkpoint_interval_ms);
    let interval = at_most_a_week(checker, offset, "[ledger] checkpoint_interval_ms", interval);
    if interval < 100 {
        checker.problem(
            offset,
            format!("[ledger] checkpoint_interval_ms = {interval} would checkpoint without pause"),
            Some("use at least 100; the default is 300000 (5 minutes)"),
        );
    }
    if raw.retain_days.is_some_and(|days| days > MAX_RETAIN_DAYS) {
        checker.problem(
            offset,
            format!("[ledger] retain_days = {} is past any date", raw.retain_days.unwrap_or_default()),
            Some("use at most 36500 (a hundred years), or leave it out to keep everything"),
        );
    }
    crate::store::history::HistoryConfig {
        checkpoint_every_records: every,
        checkpoint_interval_ms: interval,
        retain_days: raw.retain_days,
        export: raw.export.unwrap_or(defaults.export),
        export_dir: raw.export_dir.clone(),
    }
}

fn validate_cluster(
    checker: &mut Checker<'_>,
    value: Section,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<ClusterConfig> {
    let offset = value.span().start;
    let raw = checker.section::<RawCluster>("[cluster]", value)?;
    let database_url = env(&raw.database_url_env).filter(|url| !url.trim().is_empty());
    if database_url.is_none() {
        checker.problem(
            offset,
            format!("[cluster] database_url_env names {}, which is not set", raw.database_url_env),
            Some("export the PostgreSQL URL in that variable, e.g. postgresql://creditgate:secret@db1,db2/creditgate"),
        );
    }
    if let Some(name) = &raw.replica {
        let fine = !name.is_empty()
            && name.len() <= 64
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !fine {
            checker.problem(
                offset,
                format!("[cluster] replica = {name:?} is not a usable name"),
                Some("use 1-64 letters, digits, '-', '_' or '.', unique per data directory"),
            );
        }
    }
    let lease_ttl_ms = raw.lease_ttl_ms.unwrap_or(10_000);
    let treasury_ttl_ms = raw.treasury_ttl_ms.unwrap_or(6_000);
    for (name, value) in [("lease_ttl_ms", lease_ttl_ms), ("treasury_ttl_ms", treasury_ttl_ms)] {
        if !(1_000..=600_000).contains(&value) {
            checker.problem(
                offset,
                format!("[cluster] {name} = {value} is out of range"),
                Some("use 1000 to 600000 milliseconds"),
            );
        }
    }
    let ship_interval_ms = raw.ship_interval_ms.unwrap_or(250);
    if !(1..=1_000).contains(&ship_interval_ms) {
        checker.problem(
            offset,
            format!("[cluster] ship_interval_ms = {ship_interval_ms} is out of range"),
            Some("use 1 to 1000; settled debits wait in the outbox (kept on disk) that long before the shared books see them"),
        );
    }
    Some(ClusterConfig {
        database_url: database_url?,
        replica: raw.replica,
        admin_url: raw.admin_url,
        max_connections: raw.max_connections.unwrap_or(8).clamp(2, 256),
        lease_ttl_ms,
        treasury_ttl_ms,
        ship_interval_ms,
    })
}

fn validate_traffic(checker: &mut Checker<'_>, value: Option<Section>) -> TrafficConfig {
    let Some(value) = value else {
        return TrafficConfig::default();
    };
    let offset = value.span().start;
    let Some(raw) = checker.section::<RawTraffic>("[traffic]", value) else {
        return TrafficConfig::default();
    };
    let mut per_key = HashMap::new();
    let refuse_zero_caps = |checker: &mut Checker<'_>, section: &str, caps: &TrafficCaps| {
        for (name, cap) in
            [("requests_per_minute", caps.requests_per_minute), ("max_in_flight", caps.max_in_flight)]
        {
            if cap == Some(0) {
                checker.problem(
                    offset,
                    format!("{section} {name} = 0 would refuse every request"),
                    Some("leave it out for no cap; revoke a key to stop it"),
                );
            }
        }
    };
    refuse_zero_caps(
        checker,
        "[traffic]",
        &TrafficCaps { requests_per_minute: raw.requests_per_minute, max_in_flight: raw.max_in_flight },
    );
    for (id, caps) in raw.per_key {
        refuse_zero_caps(checker, &format!("[traffic.per_key.{id:?}]"), &caps);
        match id.parse::<u64>() {
            Ok(id) => {
                per_key.insert(id, caps);
            }
            Err(_) => checker.problem(
                offset,
                format!("[traffic.per_key.{id:?}] is not a key id"),
                Some("key ids are whole numbers, as the admin API shows them"),
            ),
        }
    }
    let defaults =
        TrafficCaps { requests_per_minute: raw.requests_per_minute, max_in_flight: raw.max_in_flight };
    TrafficConfig { defaults, per_key }
}

fn validate_upstream(
    checker: &mut Checker<'_>,
    offset: usize,
    name: &str,
    raw: RawUpstream,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<Upstream> {
    let uri: http::Uri = match raw.base_url.parse() {
        Ok(uri) => uri,
        Err(e) => {
            checker.problem(
                offset,
                format!("[upstreams.{name}] base_url {:?} is not a URL: {e}", raw.base_url),
                Some("write it as http://host:port or https://host"),
            );
            return None;
        }
    };
    let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned()) else {
        checker.problem(
            offset,
            format!("[upstreams.{name}] base_url {:?} needs a scheme and a host", raw.base_url),
            Some("e.g. \"http://127.0.0.1:8090\""),
        );
        return None;
    };
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        checker.problem(
            offset,
            format!("[upstreams.{name}] base_url scheme {scheme} is not supported"),
            Some("use http or https"),
        );
        return None;
    }
    if uri.query().is_some() {
        checker.problem(offset, format!("[upstreams.{name}] base_url must not carry a query string"), None);
    }
    let credential = credential(checker, offset, name, &raw, env);
    let forward_headers = raw.forward_headers.as_ref().map(|names| {
        names
            .iter()
            .filter_map(|text| match HeaderName::from_bytes(text.as_bytes()) {
                Ok(header) => Some(header),
                Err(_) => {
                    checker.problem(
                        offset,
                        format!("[upstreams.{name}] forward_headers: {text:?} is not a header name"),
                        None,
                    );
                    None
                }
            })
            .collect()
    });
    let model_query_params = raw.model_query_params.clone().unwrap_or_else(|| vec!["api-version".to_owned()]);
    for param in &model_query_params {
        if param.is_empty() || param.eq_ignore_ascii_case("model") || param.contains(['&', '=', '%', '+']) {
            checker.problem(
                offset,
                format!("[upstreams.{name}] model_query_params: {param:?} cannot be allowed"),
                Some("list plain parameter names; `model` is read from the body, where it is priced"),
            );
        }
    }
    let host_header = plain_http1_host(&scheme, &authority, raw.http2_prior_knowledge);
    let chat_cap_field = match raw.chat_cap_field.as_deref() {
        None | Some("max_completion_tokens") => "max_completion_tokens",
        Some("max_tokens") => "max_tokens",
        Some(other) => {
            checker.problem(
                offset,
                format!(
                    "[upstreams.{name}] chat_cap_field {other:?} is not an output cap this gateway writes"
                ),
                Some(
                    "use \"max_completion_tokens\" (OpenAI) or \"max_tokens\" (Ollama, llama.cpp, DeepSeek)",
                ),
            );
            "max_completion_tokens"
        }
    };
    let mut ms = |field: &str, value: Option<u64>, default: u64| {
        duration_ms(checker, offset, &format!("[upstreams.{name}] {field}"), value, default)
    };
    let connect_timeout = ms("connect_timeout_ms", raw.connect_timeout_ms, DEFAULT_CONNECT_TIMEOUT_MS);
    let response_timeout = ms("response_timeout_ms", raw.response_timeout_ms, DEFAULT_RESPONSE_TIMEOUT_MS);
    let idle_timeout = ms("idle_timeout_ms", raw.idle_timeout_ms, DEFAULT_IDLE_TIMEOUT_MS);
    for (field, value) in [
        ("connect_timeout_ms", connect_timeout),
        ("response_timeout_ms", response_timeout),
        ("idle_timeout_ms", idle_timeout),
    ] {
        refuse_zero(checker, offset, &format!("[upstreams.{name}] {field}"), value);
    }
    let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
    let origin = (
        scheme.as_str().to_ascii_lowercase(),
        authority.host().trim_end_matches('.').to_ascii_lowercase(),
        authority.port_u16().unwrap_or(default_port),
    );
    Some(Upstream {
        name: name.to_owned(),
        origin,
        // Set once every entry is read.
        origin_group: 0,
        scheme,
        authority,
        base_path: uri.path().trim_end_matches('/').to_owned(),
        connect_timeout,
        response_timeout,
        idle_timeout,
        pool_max_idle_per_host: raw.pool_max_idle_per_host.unwrap_or(DEFAULT_POOL_MAX_IDLE_PER_HOST),
        http2_prior_knowledge: raw.http2_prior_knowledge,
        credential,
        forward_headers,
        model_query_params,
        chat_cap_field,
        host_header,
    })
}

/// `Host` as the pooled client writes it for an HTTP/1.1 request (the host,
/// and the port unless it is 80), for a plain-HTTP upstream without prior
/// knowledge of HTTP/2; `None` for any other.
fn plain_http1_host(
    scheme: &Scheme,
    authority: &Authority,
    http2_prior_knowledge: bool,
) -> Option<HeaderValue> {
    if *scheme != Scheme::HTTP || http2_prior_knowledge {
        return None;
    }
    let text = match authority.port_u16() {
        Some(port) if port != 80 => format!("{}:{port}", authority.host()),
        _ => authority.host().to_owned(),
    };
    HeaderValue::from_str(&text).ok()
}

fn credential(
    checker: &mut Checker<'_>,
    offset: usize,
    name: &str,
    raw: &RawUpstream,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<Credential> {
    let var = raw.credential_env.as_deref()?;
    let header_text = raw.credential_header.as_deref().unwrap_or("authorization");
    let Ok(header) = HeaderName::from_bytes(header_text.as_bytes()) else {
        checker.problem(
            offset,
            format!("[upstreams.{name}] credential_header {header_text:?} is not a header name"),
            None,
        );
        return None;
    };
    let Some(secret) = env(var).filter(|s| !s.is_empty()) else {
        checker.problem(
            offset,
            format!("[upstreams.{name}] environment variable {var} is not set"),
            Some("export it before starting, or remove credential_env"),
        );
        return None;
    };
    let default_scheme = (header == http::header::AUTHORIZATION).then_some("Bearer");
    let text = match raw.credential_scheme.as_deref().or(default_scheme) {
        Some(scheme) if !scheme.is_empty() => format!("{scheme} {secret}"),
        _ => secret,
    };
    let Ok(mut value) = HeaderValue::from_str(&text) else {
        // Do not echo the value: it is a secret.
        checker.problem(
            offset,
            format!("[upstreams.{name}] the value of {var} is not a valid header value"),
            Some("it must be visible ASCII without newlines"),
        );
        return None;
    };
    value.set_sensitive(true);
    Some(Credential { header, value })
}

fn validate_route(
    checker: &mut Checker<'_>,
    offset: usize,
    raw: RawRoute,
    upstream_index: &HashMap<String, usize>,
) -> Option<Route> {
    if !raw.prefix.starts_with('/') {
        checker.problem(
            offset,
            format!("route prefix {:?} must start with '/'", raw.prefix),
            Some("e.g. prefix = \"/v1/chat/completions\""),
        );
        return None;
    }
    // Requests are matched after their path is normalised: a prefix in
    // another form would match none of them (and the calls it meant to
    // meter would fall to a broader route).
    let bare_len = if raw.prefix.len() > 1 && raw.prefix.ends_with('/') {
        raw.prefix.len() - 1
    } else {
        raw.prefix.len()
    };
    let bare = &raw.prefix[..bare_len];
    let normal = crate::proxy::path::normalise(bare);
    if !matches!(&normal, Ok(path) if *path == bare) || (bare.len() > 1 && bare.ends_with('/')) {
        let suggestion = match &normal {
            Ok(path) => format!("prefix = {path:?}"),
            Err(_) => "no percent-escapes of '/', '.' or '\\', no '\\'".to_owned(),
        };
        checker.problem(
            offset,
            format!(
                "route prefix {:?} is not in the form requests are matched in (no `//`, `.` or `..` segments \
                 or escapes of plain characters)",
                raw.prefix
            ),
            Some(&suggestion),
        );
        return None;
    }
    // A metered prefix ending in '/' would not cover the path without it,
    // which would fall to a broader route: it covers both.
    let mut raw = raw;
    if !raw.passthrough {
        raw.prefix.truncate(bare_len);
    }
    let Some(&upstream) = upstream_index.get(&raw.upstream) else {
        let known: Vec<&str> = upstream_index.keys().map(String::as_str).collect();
        checker.problem(
            offset,
            format!("route {:?} names upstream {:?}, which is not defined", raw.prefix, raw.upstream),
            Some(&format!("define [upstreams.{}] or use one of {known:?}", raw.upstream)),
        );
        return None;
    };
    let kind = route_kind(checker, offset, &raw)?;
    let limits = route_limits(checker, offset, &raw, &kind)?;
    Some(Route {
        prefix: Arc::from(raw.prefix),
        host: raw.host.map(|h| h.to_ascii_lowercase()),
        upstream,
        kind,
        limits,
    })
}

fn route_limits(
    checker: &mut Checker<'_>,
    offset: usize,
    raw: &RawRoute,
    kind: &RouteKind,
) -> Option<RouteLimits> {
    let defaults = RouteLimits::default();
    let limits = RouteLimits {
        public: raw.public,
        context_budget_tokens: raw.context_budget_tokens.unwrap_or(defaults.context_budget_tokens),
        min_output_tokens: raw.min_output_tokens.unwrap_or(defaults.min_output_tokens),
        usage_ceiling: raw.usage_ceiling.unwrap_or(defaults.usage_ceiling),
        max_units: raw.max_units.unwrap_or(defaults.max_units),
        max_tool_calls: raw.max_tool_calls.unwrap_or(defaults.max_tool_calls),
        methods: None,
    };
    let model_only = [
        ("context_budget_tokens", raw.context_budget_tokens.is_some()),
        ("min_output_tokens", raw.min_output_tokens.is_some()),
        ("max_tool_calls", raw.max_tool_calls.is_some()),
    ];
    let mut ok = true;
    let mut refuse = |checker: &mut Checker<'_>, message: String| {
        checker.problem(offset, message, None);
        ok = false;
    };
    if raw.public && *kind != RouteKind::Passthrough {
        refuse(checker, format!("route {:?}: only a passthrough route can be public", raw.prefix));
    }
    let mut limits = limits;
    match (&raw.methods, kind) {
        (None, _) => {}
        (Some(_), kind) if *kind != RouteKind::Passthrough => refuse(
            checker,
            format!(
                "route {:?}: methods applies to passthrough routes only (a model route takes POST)",
                raw.prefix
            ),
        ),
        (Some(names), _) => {
            let methods: Vec<http::Method> = names
                .iter()
                .filter_map(|name| {
                    let method = http::Method::from_bytes(name.as_bytes()).ok();
                    // Methods are case-sensitive: `post` is not POST to an upstream.
                    method.filter(|m| m.as_str() == name.to_ascii_uppercase())
                })
                .collect();
            if methods.is_empty() || methods.len() != names.len() {
                refuse(
                    checker,
                    format!(
                        "route {:?}: methods must list HTTP methods in capitals, such as [\"GET\", \"POST\"]",
                        raw.prefix
                    ),
                );
            }
            limits.methods = Some(methods);
        }
    }
    if !matches!(kind, RouteKind::Model(_)) {
        for (name, set) in model_only {
            if set {
                refuse(checker, format!("route {:?}: {name} applies to model routes only", raw.prefix));
            }
        }
    }
    if raw.max_units.is_some() && !matches!(kind, RouteKind::Tool { units_header: Some(_), .. }) {
        refuse(checker, format!("route {:?}: max_units needs a tool route with units_header", raw.prefix));
    }
    if limits.min_output_tokens == 0 {
        refuse(
            checker,
            format!("route {:?}: min_output_tokens must be above 0 (0 would send max_tokens: 0)", raw.prefix),
        );
    }
    if limits.usage_ceiling == 0 || limits.max_units == 0 {
        refuse(checker, format!("route {:?}: usage_ceiling and max_units must be above 0", raw.prefix));
    }
    if limits.usage_ceiling > MAX_USAGE_CEILING || limits.max_units > MAX_USAGE_CEILING {
        refuse(
            checker,
            format!(
                "route {:?}: usage_ceiling and max_units must be at most {MAX_USAGE_CEILING}",
                raw.prefix
            ),
        );
    }
    ok.then_some(limits)
}

/// A route must say how it is charged; forwarding unmetered is a choice the
/// operator makes explicitly (`passthrough = true`), never a default.
fn route_kind(checker: &mut Checker<'_>, offset: usize, raw: &RawRoute) -> Option<RouteKind> {
    let hint = Some("give exactly one of flavour = \"openai-chat\" (or openai-embeddings, openai-responses, anthropic-messages), tool = \"NAME\", or passthrough = true");
    let units_header = match raw.units_header.as_deref().map(|h| HeaderName::from_bytes(h.as_bytes())) {
        None => None,
        Some(Ok(name)) => Some(name),
        Some(Err(_)) => {
            checker.problem(
                offset,
                format!("route {:?}: units_header is not a header name", raw.prefix),
                None,
            );
            return None;
        }
    };
    match (raw.flavour, &raw.tool, raw.passthrough) {
        (Some(flavour), None, false) if units_header.is_none() => Some(RouteKind::Model(flavour)),
        (None, Some(name), false) => Some(RouteKind::Tool { name: name.clone(), units_header }),
        (None, None, true) if units_header.is_none() => Some(RouteKind::Passthrough),
        (None, None, false) => {
            checker.problem(offset, format!("route {:?} does not say how it is charged", raw.prefix), hint);
            None
        }
        _ => {
            checker.problem(
                offset,
                format!("route {:?} mixes flavour, tool, units_header and passthrough", raw.prefix),
                hint,
            );
            None
        }
    }
}

/// A pass-through route that does not list its `methods`, on an upstream a
/// metered route also uses, forwards only [`SAFE_METHODS`]: a model API's
/// other create calls (batches, images, speech, fine-tuning) are billed, and
/// a prefix written for `/v1/models` would pass them on unmetered. An
/// upstream is known by its origin (scheme, host and port, whatever the
/// base path), not by its entry's name: a second entry for the same API
/// (kept for its longer timeouts, say) reaches the same billed endpoints.
/// Known by name: `localhost` and `127.0.0.1` are two origins.
fn only_reads_through_metered_upstreams(routes: &mut [Route], upstreams: &[Upstream]) {
    let origin = |index: usize| origin_of(upstreams, index);
    let metered: std::collections::HashSet<_> =
        routes.iter().filter(|r| r.kind != RouteKind::Passthrough).map(|r| origin(r.upstream)).collect();
    for route in routes
        .iter_mut()
        .filter(|r| r.kind == RouteKind::Passthrough && metered.contains(&origin(r.upstream)))
    {
        route.limits.methods.get_or_insert_with(|| SAFE_METHODS.to_vec());
    }
}

/// The API upstream `index` reaches ([`Upstream::origin`]).
fn origin_of(upstreams: &[Upstream], index: usize) -> Option<&(String, String, u16)> {
    upstreams.get(index).map(|u| &u.origin)
}

/// A pass-through on an upstream a tool route sends to must list its
/// `methods`: tool APIs bill reads too (a web search is a `GET`), so no
/// default is safe.
fn check_tool_passthroughs(checker: &mut Checker<'_>, routes: &[Route], upstreams: &[Upstream]) {
    for route in routes.iter().filter(|r| r.kind == RouteKind::Passthrough && r.limits.methods.is_none()) {
        let origin = origin_of(upstreams, route.upstream);
        let tool = routes.iter().find_map(|r| match &r.kind {
            RouteKind::Tool { name, .. } if origin_of(upstreams, r.upstream) == origin => Some(name),
            _ => None,
        });
        if let Some(tool) = tool {
            checker.problem(
                0,
                format!(
                    "pass-through route {:?} sends where tool route `{tool}` does and lists no `methods`",
                    route.prefix
                ),
                Some("list the methods it forwards: a tool API may bill any of them (a search is a GET)"),
            );
        }
    }
}

fn check_duplicate_routes(checker: &mut Checker<'_>, routes: &[Route]) {
    let mut seen = HashMap::new();
    for r in routes {
        if seen.insert((r.host.clone(), r.prefix.clone()), ()).is_some() {
            checker.problem(
                0,
                format!("route prefix {:?} (host {:?}) is defined twice", r.prefix, r.host),
                Some("remove one of them"),
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::parse(Path::new("test.toml"), text, &|name| {
            (name == "UP_KEY").then(|| "sk-upstream".to_owned())
        })
    }

    #[test]
    fn a_pass_through_where_a_tool_route_sends_must_list_its_methods() {
        let tools = |methods: &str| {
            format!(
                "[upstreams.search]\nbase_url = \"https://search.example/res\"\n\
                 [upstreams.search-status]\nbase_url = \"https://SEARCH.example.:443/status/\"\n\
                 [pricing]\nfile = \"prices.toml\"\n\
                 [[routes]]\nprefix = \"/v1/search\"\nupstream = \"search\"\ntool = \"web-search\"\n\
                 [[routes]]\nprefix = \"/status\"\nupstream = \"search-status\"\npassthrough = true\n{methods}"
            )
        };
        // Another entry for the same API, spelled otherwise (case, a trailing
        // dot, the default port, another base path), is the same upstream.
        let found = problems(&tools(""));
        assert!(found.iter().any(|p| p.message.contains("lists no `methods`")), "{found:?}");
        assert!(parse(&tools("methods = [\"GET\"]\n")).is_ok());
    }

    #[test]
    fn entries_of_one_api_share_their_claims_on_the_path_the_upstream_is_sent() {
        let config = |second_base: &str| {
            parse(&format!(
                "[upstreams.a]\nbase_url = \"https://gw.example/openai\"\n\
                 [upstreams.b]\nbase_url = \"https://GW.example:443{second_base}\"\n\
                 [pricing]\nfile = \"prices.toml\"\n\
                 [[routes]]\nprefix = \"/v1/chat/completions\"\nupstream = \"a\"\nflavour = \"openai-chat\"\n\
                 [[routes]]\nprefix = \"/\"\nhost = \"h.example\"\nupstream = \"b\"\npassthrough = true\nmethods = [\"POST\"]\n"
            ))
            .unwrap()
        };
        let kind =
            |c: &GatewayConfig, path| c.route_for(Some("h.example"), path).map(|route| route.kind.clone());
        // `b` sends `/chat/completions` to /openai/v1/chat/completions: `a`'s metered call.
        let same = config("/openai/v1");
        assert_eq!(kind(&same, "/chat/completions"), Some(RouteKind::Model(Flavour::OpenaiChat)));
        assert_eq!(kind(&same, "/models"), Some(RouteKind::Passthrough));
        // Another API behind the same host (a gateway's other provider): its own.
        let other = config("/workers-ai");
        assert_eq!(kind(&other, "/v1/chat/completions"), Some(RouteKind::Passthrough));
    }

    #[test]
    fn every_duration_in_milliseconds_is_at_most_a_week() {
        for (section, field) in [
            ("ledger", "hold_ttl_ms"),
            ("ledger", "checkpoint_interval_ms"),
            ("pricing", "watch_interval_ms"),
        ] {
            let file = if section == "pricing" { "file = \"prices.toml\"\n" } else { "" };
            let text = format!("{MINIMAL}\n[{section}]\n{file}{field} = 604800001\n");
            let found = problems(&text);
            assert!(
                found.iter().any(|p| p.message.contains(field) && p.message.contains("too long")),
                "{found:?}"
            );
        }
    }

    #[test]
    fn a_host_s_port_is_stripped_only_when_it_is_one() {
        assert_eq!(strip_port("api.example:8443"), "api.example");
        assert_eq!(strip_port("api.example"), "api.example");
        assert_eq!(strip_port("api.example:"), "api.example");
        assert_eq!(strip_port("api.example:80x"), "api.example:80x");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("ünï.example:1"), "ünï.example");
    }

    fn problems(text: &str) -> Vec<ConfigProblem> {
        match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    const MINIMAL: &str = r#"
[upstreams.mock]
base_url = "http://127.0.0.1:8090"

[[routes]]
prefix = "/v1"
upstream = "mock"
passthrough = true
"#;

    #[test]
    fn a_value_that_would_stop_all_traffic_or_overflow_a_count_is_refused_at_load() {
        // Each passed before: 0 cut every connection, body, response or
        // call at once (a metered one charged its hold) or refused every
        // request; a max_connections past 2^61 panicked the listener's task
        // after the start said it was serving.
        let cases = [
            ("[server]\nheader_read_timeout_ms = 0\n", "[server] header_read_timeout_ms = 0"),
            ("[server]\nbody_read_timeout_ms = 0\n", "[server] body_read_timeout_ms = 0"),
            ("[server]\nmax_response_ms = 0\n", "[server] max_response_ms = 0"),
            (
                "[server]\nmax_connections = 2305843009213693952\n",
                "max_connections = 2305843009213693952 is out of range",
            ),
            ("[server]\nmax_connections = 0\n", "max_connections = 0 is out of range"),
            ("[traffic]\nrequests_per_minute = 0\n", "[traffic] requests_per_minute = 0"),
            ("[traffic.per_key.\"7\"]\nmax_in_flight = 0\n", "max_in_flight = 0 would refuse every request"),
        ];
        for (section, expected) in cases {
            let p = problems(&format!("{section}{MINIMAL}"));
            assert!(p.iter().any(|p| p.message.contains(expected)), "{section}: {p:#?}");
        }
        for field in ["connect_timeout_ms", "response_timeout_ms", "idle_timeout_ms"] {
            let text = MINIMAL.replace(
                "base_url = \"http://127.0.0.1:8090\"",
                &format!("base_url = \"http://127.0.0.1:8090\"\n{field} = 0"),
            );
            let p = problems(&text);
            assert!(
                p.iter().any(|p| p.message.contains(&format!("[upstreams.mock] {field} = 0"))),
                "{field}: {p:#?}"
            );
        }
        let model_route =
            MINIMAL.replace("passthrough = true", "flavour = \"openai-chat\"\nmin_output_tokens = 0");
        let p = problems(&model_route);
        assert!(p.iter().any(|p| p.message.contains("min_output_tokens must be above 0")), "{p:#?}");
        // A section written only through its sub-tables has no place of its
        // own in the file: it was refused ("expected a borrowed string").
        let only_overrides = format!("[traffic.per_key.\"7\"]\nmax_in_flight = 3\n{MINIMAL}");
        assert_eq!(parse(&only_overrides).unwrap().traffic.caps_for(7).max_in_flight, Some(3));
        let dotted = format!("server.max_connections = 5\n{MINIMAL}");
        assert_eq!(parse(&dotted).unwrap().server.max_connections, 5);
        let p = problems(&format!("server.max_connections = 0\n{MINIMAL}"));
        assert!(p.iter().any(|p| p.message.contains("max_connections = 0 is out of range")), "{p:#?}");
        // The edges that stay allowed.
        let edges = format!("[server]\nmax_connections = 1000000\nheader_read_timeout_ms = 1\n[traffic]\nrequests_per_minute = 1\n{MINIMAL}");
        assert!(parse(&edges).is_ok(), "{:?}", parse(&edges).err());
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.server.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(c.upstreams[0].base_path, "");
        assert!(c.route_for(None, "/v1/chat/completions").is_some());
        assert!(c.route_for(None, "/v10").is_none(), "prefix must match whole segments");
    }

    #[test]
    fn only_a_plain_http1_upstream_gets_a_host_made_in_advance_written_as_the_client_would() {
        let host = |base_url: &str, h2: bool| {
            let text = MINIMAL.replace("http://127.0.0.1:8090", base_url);
            let text = if h2 {
                text.replace("[[routes]]", "http2_prior_knowledge = true\n\n[[routes]]")
            } else {
                text
            };
            parse(&text).unwrap().upstreams[0].host_header.clone()
        };
        assert_eq!(host("http://127.0.0.1:8090", false), Some(HeaderValue::from_static("127.0.0.1:8090")));
        assert_eq!(
            host("http://models.internal:80/base", false),
            Some(HeaderValue::from_static("models.internal"))
        );
        assert_eq!(host("http://[::1]:9000", false), Some(HeaderValue::from_static("[::1]:9000")));
        assert_eq!(host("https://api.example.com", false), None, "ALPN may pick HTTP/2");
        assert_eq!(host("http://127.0.0.1:8090", true), None, "HTTP/2 carries :authority");
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_line() {
        let text = r#"
[server]
listne = "127.0.0.1:1"

[upstreams.a]
base_url = "ftp://x"

[upstreams.b]
base_url = "http://x"
credential_env = "MISSING"

[[routes]]
prefix = "v1"
upstream = "a"

[[routes]]
prefix = "/v1"
upstream = "nope"
"#;
        let p = problems(text);
        let lines: Vec<usize> = p.iter().map(|p| p.line).collect();
        assert_eq!(p.len(), 5, "one problem per mistake: {p:#?}");
        assert!(p[0].message.contains("listne"), "unknown key named: {}", p[0].message);
        assert!(lines.contains(&6) || lines.contains(&5), "upstream a's line reported: {lines:?}");
        assert!(p.iter().any(|p| p.message.contains("MISSING")), "missing env var named");
        assert!(p.iter().any(|p| p.message.contains("must start with '/'")));
        assert!(p.iter().any(|p| p.message.contains("\"nope\"") && p.hint.is_some()));
    }

    #[test]
    fn a_route_prefix_must_be_in_the_form_requests_are_matched_in() {
        // Proves a prefix the path normaliser would change is refused
        // (requests are matched after normalising, so it matched none), and
        // a metered one ending in '/' covers the path without it: before,
        // `POST /v1/chat/completions` never matched a metered
        // "/v1/chat/completions/" and fell to a broader pass-through.
        for prefix in ["/v1//chat/completions", "/v1/./chat/completions", "/v1/%63hat/completions", "/v1//"] {
            let text = format!(
                "[upstreams.mock]\nbase_url = \"http://127.0.0.1:8090\"\n\n[[routes]]\nprefix = {prefix:?}\n\
                 upstream = \"mock\"\nflavour = \"openai-chat\"\n"
            );
            let p = problems(&text);
            assert!(p.iter().any(|p| p.message.contains("not in the form")), "{prefix}: {p:#?}");
        }
        let metered = "[upstreams.mock]\nbase_url = \"http://127.0.0.1:8090\"\n\n[[routes]]\n\
                       prefix = \"/v1/chat/completions/\"\nupstream = \"mock\"\nflavour = \"openai-chat\"\n\
                       [[routes]]\nprefix = \"/v1\"\nupstream = \"mock\"\npassthrough = true\n\
                       [pricing]\nfile = \"prices.toml\"\n";
        let config = parse(metered).unwrap();
        for path in ["/v1/chat/completions", "/v1/chat/completions/x"] {
            let route = config.route_for(None, path).unwrap();
            assert_eq!(route.kind, RouteKind::Model(Flavour::OpenaiChat), "{path}");
        }
        let passthrough = MINIMAL.replace("prefix = \"/v1\"", "prefix = \"/v1/\"");
        assert!(parse(&passthrough).is_ok(), "a pass-through may end in '/'");
        assert!(parse(&MINIMAL.replace("prefix = \"/v1\"", "prefix = \"/\"")).is_ok());
    }

    #[test]
    fn a_pass_through_on_a_metered_upstream_forwards_only_reads_unless_it_lists_methods() {
        let text = |methods: &str| {
            format!(
                "[upstreams.models]\nbase_url = \"http://127.0.0.1:8090\"\n\
                 [upstreams.other]\nbase_url = \"http://127.0.0.1:8091\"\n\
                 [[routes]]\nprefix = \"/v1/chat/completions\"\nupstream = \"models\"\nflavour = \"openai-chat\"\n\
                 [[routes]]\nprefix = \"/v1\"\nupstream = \"models\"\npassthrough = true\n{methods}\n\
                 [[routes]]\nprefix = \"/other\"\nupstream = \"other\"\npassthrough = true\n\
                 [pricing]\nfile = \"prices.toml\"\n"
            )
        };
        let methods =
            |config: &GatewayConfig, path: &str| config.route_for(None, path).unwrap().limits.methods.clone();
        let config = parse(&text("")).unwrap();
        assert_eq!(methods(&config, "/v1/batches"), Some(SAFE_METHODS.to_vec()), "the model upstream's");
        assert_eq!(methods(&config, "/other/x"), None, "an upstream no metered route uses");
        let config = parse(&text("methods = [\"GET\", \"POST\"]")).unwrap();
        assert_eq!(methods(&config, "/v1/batches"), Some(vec![http::Method::GET, http::Method::POST]));
        for bad in ["methods = [\"post\"]", "methods = []", "methods = [\"GE T\"]"] {
            let p = problems(&text(bad));
            assert!(p.iter().any(|p| p.message.contains("methods must list")), "{bad}: {p:#?}");
        }
        let on_a_model_route = text("")
            .replace("flavour = \"openai-chat\"\n", "flavour = \"openai-chat\"\nmethods = [\"POST\"]\n");
        let p = problems(&on_a_model_route);
        assert!(p.iter().any(|p| p.message.contains("passthrough routes only")), "{p:#?}");
    }

    #[test]
    fn one_secret_may_not_be_two_admin_tokens() {
        let text = |second: &str| {
            format!(
                "{MINIMAL}\n[admin]\ntoken_env = \"OPERATOR\"\n\
                 org_tokens = [{{ org = 1, token_env = \"ACME\" }}, {{ org = 2, token_env = \"{second}\" }}]\n"
            )
        };
        let env = |name: &str| match name {
            "OPERATOR" => Some("operator-secret".to_owned()),
            "ACME" | "ALSO_ACME" => Some("acme-secret".to_owned()),
            "GLOBEX" => Some("globex-secret".to_owned()),
            _ => None,
        };
        let parse = |text: &str| GatewayConfig::parse(Path::new("test.toml"), text, &env);
        assert!(parse(&text("GLOBEX")).is_ok());
        for second in ["ALSO_ACME", "OPERATOR"] {
            match parse(&text(second)) {
                Err(ConfigError::Invalid { problems, .. }) => {
                    assert!(problems.iter().any(|p| p.message.contains("same secret")), "{problems:#?}")
                }
                other => panic!("{second}: org 2 would act with another's token: {other:?}"),
            }
        }
        // A listed token whose variable is unset or empty stops the start.
        for second in ["UNSET", "EMPTY"] {
            let env = |name: &str| if name == "EMPTY" { Some(String::new()) } else { env(name) };
            match GatewayConfig::parse(Path::new("test.toml"), &text(second), &env) {
                Err(ConfigError::Invalid { problems, .. }) => assert!(
                    problems
                        .iter()
                        .any(|p| p.message.contains(&format!("{second} (organization 2) is not set"))),
                    "{problems:#?}"
                ),
                other => panic!("{second}: {other:?}"),
            }
        }
    }

    #[test]
    fn ledger_section_has_defaults_and_bounds() {
        let defaults = parse(MINIMAL).unwrap().ledger;
        assert_eq!(defaults, LedgerSection::default());
        assert!(defaults.write_through);
        assert_eq!(defaults.flush_interval_ms, 5);
        let text = format!(
            "{MINIMAL}\n[ledger]\nwrite_through = false\nflush_interval_ms = 20\nhold_ttl_ms = 60000\n"
        );
        let ledger = parse(&text).unwrap().ledger;
        assert_eq!(
            ledger,
            LedgerSection {
                write_through: false,
                flush_interval_ms: 20,
                hold_ttl_ms: 60_000,
                history: crate::store::history::HistoryConfig::default()
            }
        );
        let text =
            format!("{MINIMAL}\n[ledger]\nflush_interval_ms = 5000\nhold_ttl_ms = 10\nwrite_thru = true\n");
        let found = problems(&text);
        assert_eq!(found.len(), 1, "unknown key reported: {found:?}");
        let text = format!("{MINIMAL}\n[ledger]\nflush_interval_ms = 5000\nhold_ttl_ms = 10\n");
        let found = problems(&text);
        assert_eq!(found.len(), 2, "both bounds reported: {found:?}");
    }

    #[test]
    fn ledger_history_knobs_parse_with_defaults_and_bounds() {
        // Proves checkpoint and retention settings default to every 1M records or 5 minutes, keep
        // everything, export before pruning, and that a zero period is refused.
        let defaults = parse(MINIMAL).unwrap().ledger.history;
        assert_eq!(
            (defaults.checkpoint_every_records, defaults.checkpoint_interval_ms),
            (1_000_000, 300_000)
        );
        assert_eq!((defaults.retain_days, defaults.export), (None, true));
        let text =
            format!("{MINIMAL}\n[ledger]\nretain_days = 30\nexport = false\nexport_dir = \"/srv/old\"\n");
        let history = parse(&text).unwrap().ledger.history;
        assert_eq!((history.retain_days, history.export), (Some(30), false));
        assert_eq!(history.export_dir.as_deref(), Some(Path::new("/srv/old")));
        let text = format!("{MINIMAL}\n[ledger]\ncheckpoint_every_records = 0\ncheckpoint_interval_ms = 5\n");
        assert_eq!(problems(&text).len(), 2, "both bounds reported");
        // A cut-off before any date: it panicked the checkpoint thread at every checkpoint.
        let text = format!("{MINIMAL}\n[ledger]\nretain_days = 100000000\n");
        assert_eq!(problems(&text).len(), 1, "a retention past any date is refused");
        assert!(parse(&format!("{MINIMAL}\n[ledger]\nretain_days = 36500\n")).is_ok());
    }

    #[test]
    fn a_log_level_that_is_not_one_is_refused() {
        // Before, `level = "warning"` was read as a target and every line,
        // errors included, was filtered out.
        for level in [
            "info",
            "WARN",
            "info,creditgate::access=warn",
            "off",
            "creditgate=debug,hyper=info",
            "info,creditgate::access",
            "hyper=3",
            "creditgate=",
            "creditgate[request{route=x}]",
            "creditgate[request{route=x}]=debug",
        ] {
            assert!(parse(&format!("{MINIMAL}\n[log]\nlevel = \"{level}\"\n")).is_ok(), "{level}");
        }
        for level in ["warning", "info,verbose", "creditgate=loud"] {
            let found = problems(&format!("{MINIMAL}\n[log]\nlevel = \"{level}\"\n"));
            assert_eq!(found.len(), 1, "{level}: {found:?}");
            assert!(found[0].message.contains("not a level"), "{found:?}");
        }
    }

    #[test]
    fn a_usage_ceiling_past_a_trillion_is_refused() {
        // Near u64::MAX, report totals could wrap.
        let route = "prefix = \"/v1/chat\"\nupstream = \"mock\"\nflavour = \"openai-chat\"\n";
        let with = |ceiling: u64| format!("{MINIMAL}\n[[routes]]\n{route}usage_ceiling = {ceiling}\n");
        let ceiling_problems = |ceiling| {
            problems(&with(ceiling)).into_iter().filter(|p| p.message.contains("usage_ceiling")).count()
        };
        assert_eq!(ceiling_problems(1_000_000_000_000), 0);
        assert_eq!(ceiling_problems(1_000_000_000_001), 1);
    }

    #[test]
    fn a_timeout_too_long_for_the_clock_is_refused_by_name() {
        // Proves a duration a deadline could not be computed from (it would
        // overflow the clock, on every request) is a config problem, not a panic.
        let long = i64::MAX; // TOML's largest integer
        let text = MINIMAL.replace(
            "[upstreams.mock]\n",
            &format!(
                "[server]\nread_on_timeout_ms = {long}\n\n[upstreams.mock]\nresponse_timeout_ms = {long}\n"
            ),
        );
        let found: Vec<String> = problems(&text).into_iter().map(|p| p.message).collect();
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("[server] read_on_timeout_ms") && found[1].contains("response_timeout_ms"));
        let week = format!("[server]\nmax_response_ms = {}\n{MINIMAL}", 7 * 24 * 3_600_000u64);
        assert!(parse(&week).is_ok(), "a week is allowed");
    }

    #[test]
    fn syntax_error_names_the_line() {
        let p = problems("[server]\nlisten = \n");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].line, 2);
    }

    #[test]
    fn credential_is_resolved_and_never_printed() {
        let text = format!("{MINIMAL}\n[upstreams.secure]\nbase_url = \"https://api.example.com/base/\"\ncredential_env = \"UP_KEY\"\n");
        let c = parse(&text).unwrap();
        let up = c.upstreams.iter().find(|u| u.name == "secure").unwrap();
        let cred = up.credential.as_ref().unwrap();
        assert_eq!(cred.value, "Bearer sk-upstream");
        assert!(cred.value.is_sensitive());
        assert_eq!(up.base_path, "/base");
        assert!(!format!("{c:?}").contains("sk-upstream"), "Debug must redact the secret");
    }

    #[test]
    fn routes_must_say_how_they_are_charged() {
        let text = "[upstreams.a]\nbase_url = \"http://a\"\n[[routes]]\nprefix = \"/v1\"\nupstream = \"a\"\n[[routes]]\nprefix = \"/v2\"\nupstream = \"a\"\ntool = \"t\"\npassthrough = true\n";
        let p = problems(text);
        assert!(
            p.iter().any(|p| p.line == 3 && p.message.contains("does not say how it is charged")),
            "{p:#?}"
        );
        assert!(p.iter().any(|p| p.line == 6 && p.message.contains("mixes")), "{p:#?}");
        let metered = "[upstreams.a]\nbase_url = \"http://a\"\n[[routes]]\nprefix = \"/v1\"\nupstream = \"a\"\ntool = \"web-search\"\nunits_header = \"x-units\"\n";
        let p = problems(metered);
        assert!(
            p.iter().any(|p| p.message.contains("[pricing] is missing")),
            "metered routes need prices: {p:#?}"
        );
        let ok = parse(&format!("{metered}[pricing]\nfile = \"prices.toml\"\n")).unwrap();
        assert_eq!(ok.required_tools().names, ["web-search"]);
        assert_eq!(ok.pricing.unwrap().file, Path::new("prices.toml"));
    }

    #[test]
    fn host_routes_win_over_any_host_and_longest_prefix_wins() {
        let text = r#"
[upstreams.a]
base_url = "http://a"
[upstreams.b]
base_url = "http://b"
[upstreams.c]
base_url = "http://c"
[[routes]]
prefix = "/v1"
upstream = "a"
passthrough = true
[[routes]]
prefix = "/v1/chat"
upstream = "b"
flavour = "openai-chat"
[[routes]]
prefix = "/v1"
host = "special.example"
upstream = "c"
passthrough = true
[pricing]
file = "prices.toml"
"#;
        let c = parse(text).unwrap();
        let name = |host, path| c.upstreams[c.route_for(host, path).unwrap().upstream].name.clone();
        assert_eq!(name(None, "/v1/chat/completions"), "b");
        // Stored objects under a model route are its own (it refuses them), never the
        // broader unmetered route's.
        assert_eq!(name(None, "/v1/chat/completions/chatcmpl_1"), "b");
        let route = c.route_for(None, "/v1/chat/completions/chatcmpl_1").unwrap();
        assert!(!route.creates_calls("/v1/chat/completions/chatcmpl_1"));
        assert!(route.creates_calls("/v1/chat/completions") && route.creates_calls("/v1/chat/completions/"));
        assert_eq!(name(None, "/v1/embeddings"), "a");
        assert_eq!(name(Some("special.example:8080"), "/v1/chat/completions"), "c");
    }

    #[test]
    fn a_pass_through_route_never_takes_what_a_metered_route_of_its_upstream_claims_for_any_host() {
        // The client picks the Host: naming the host must not make a billed endpoint free.
        let text = r#"
[upstreams.a]
base_url = "http://a"
[[routes]]
prefix = "/v1/chat/completions"
upstream = "a"
flavour = "openai-chat"
[[routes]]
prefix = "/v1"
host = "internal.example"
upstream = "a"
passthrough = true
[pricing]
file = "prices.toml"
"#;
        let c = parse(text).unwrap();
        let kind = |path| c.route_for(Some("internal.example"), path).map(|route| route.kind.clone());
        assert_eq!(kind("/v1/chat/completions"), Some(RouteKind::Model(Flavour::OpenaiChat)));
        assert_eq!(kind("/v1/chat/completions/chatcmpl_1"), Some(RouteKind::Model(Flavour::OpenaiChat)));
        assert_eq!(kind("/v1/models"), Some(RouteKind::Passthrough), "the rest of the host is its own");

        // The metered route bound to a host, the pass-through to another or to none.
        let text = r#"
[upstreams.a]
base_url = "http://a"
[[routes]]
prefix = "/v1/chat/completions"
host = "api.example"
upstream = "a"
flavour = "openai-chat"
[[routes]]
prefix = "/v1"
host = "internal.example"
upstream = "a"
passthrough = true
[[routes]]
prefix = "/v1"
upstream = "a"
passthrough = true
[[routes]]
prefix = "/v1/models"
upstream = "a"
passthrough = true
[pricing]
file = "prices.toml"
"#;
        let c = parse(text).unwrap();
        let kind = |host, path| c.route_for(host, path).map(|route| route.kind.clone());
        // A longer pass-through bound to another host frees nothing here.
        let text = r#"
[upstreams.a]
base_url = "http://a"
[[routes]]
prefix = "/tools/search"
upstream = "a"
tool = "search"
[[routes]]
prefix = "/tools/search/v2"
host = "h2.internal"
upstream = "a"
passthrough = true
methods = ["POST"]
[[routes]]
prefix = "/"
host = "h3.example"
upstream = "a"
passthrough = true
methods = ["POST"]
[pricing]
file = "prices.toml"
"#;
        let tools = parse(text).unwrap();
        let tool = |host| tools.route_for(host, "/tools/search/v2").map(|route| route.kind.clone());
        assert_eq!(tool(Some("h2.internal")), Some(RouteKind::Passthrough));
        assert!(matches!(tool(Some("h3.example")), Some(RouteKind::Tool { .. })));
        for host in [Some("internal.example"), Some("other.example"), None] {
            let chat = kind(host, "/v1/chat/completions");
            assert_eq!(chat, Some(RouteKind::Model(Flavour::OpenaiChat)), "{host:?}");
            // A pass-through prefix longer than any metered one keeps its paths.
            assert_eq!(kind(host, "/v1/models"), Some(RouteKind::Passthrough), "{host:?}");
            assert_eq!(kind(host, "/v1/files"), Some(RouteKind::Passthrough), "{host:?}");
            // Spellings an upstream that matches paths loosely reads as the
            // metered path go to the metered route (which refuses them as no
            // call of its API), never through the pass-through unmetered.
            for loose in ["/v1/Chat/Completions", "/v1/chat;a=b/completions"] {
                assert_eq!(
                    kind(host, loose),
                    Some(RouteKind::Model(Flavour::OpenaiChat)),
                    "{host:?} {loose}"
                );
            }
            assert_eq!(kind(host, "/V1/chat/completions"), None, "no route has that prefix: 404");
            assert_eq!(kind(host, "/v1/Models"), Some(RouteKind::Passthrough), "{host:?}");
        }
    }
}
