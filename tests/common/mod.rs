//! Shared test harness: a real gateway on 127.0.0.1:0 in front of a real mock
//! upstream over TCP, with a real data directory.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use creditgate::app::Gateway;
use creditgate::config::GatewayConfig;
use creditgate::demo::{seed_org, SeedSpec, SeededKeys};
use creditgate::mock::{MockBody, MockOptions, MockUpstream};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub mod cluster;
pub mod pg;
pub mod provider;
pub mod webdriver;

pub const UPSTREAM_SECRET: &str = "sk-upstream-secret-0123456789";
pub const ADMIN_TOKEN: &str = "admin-token-for-tests";
/// Scoped to the organization the stack seeds (the first one created).
pub const ORG_TOKEN: &str = "org-token-for-tests";
/// For org 1 with `finance = true`, when a test's config lists it.
pub const FINANCE_TOKEN: &str = "finance-token-for-tests";
pub const PRICES_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/prices.toml");

pub struct Stack {
    /// Checks every wallet's books when the test is done with the stack
    /// (first, so dropped while the gateway still runs).
    pub books: BooksCheck,
    pub keys: SeededKeys,
    pub mock: MockUpstream,
    pub gateway: Gateway,
    pub shutdown: CancellationToken,
    pub data_dir: tempfile::TempDir,
}

/// Asserts, when dropped at the end of a test (one that has not already
/// failed), that every wallet's balance is `granted - debited -
/// written_off`: the rule that must hold after every test. The balance is
/// the wallet's lots, the sums its entries: two records kept apart. Holds
/// the ledger weakly: a test that stopped its gateway (and checked the
/// books it left on disk) must find the store free.
pub struct BooksCheck(std::sync::Weak<creditgate::ledger::Ledger>);

impl BooksCheck {
    pub fn of(gateway: &Gateway) -> BooksCheck {
        BooksCheck(std::sync::Arc::downgrade(&gateway.ledger()))
    }
}

impl Drop for BooksCheck {
    fn drop(&mut self) {
        if let (false, Some(ledger)) = (std::thread::panicking(), self.0.upgrade()) {
            assert_books_balance(&ledger);
        }
    }
}

/// Every wallet's balance is `granted - debited - written_off`.
pub fn assert_books_balance(ledger: &creditgate::ledger::Ledger) {
    for (wallet, balance, totals) in ledger.wallet_totals() {
        assert_eq!(
            balance,
            totals.balance(),
            "wallet {wallet:?}: balance against granted - debited - written_off"
        );
    }
}

/// Waits (up to 10 s) until no hold is open and every wallet, recomputed
/// from the entries in the store alone, matches the live books; fails with
/// what does not add up.
pub async fn audit(gateway: &Gateway) {
    let ledger = gateway.ledger();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let entries = gateway.ledger_entries(0, usize::MAX).unwrap();
        let report = ledger.verify(&entries);
        let quiet = ledger.open_holds() == 0 && report.is_clean();
        if quiet || std::time::Instant::now() > deadline {
            assert_eq!(ledger.open_holds(), 0, "holds still open");
            assert!(report.is_clean(), "the entries do not add up to the books: {:#?}", report.mismatches);
            assert_books_balance(&ledger);
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Stack {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.proxy_addr())
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.admin_addr())
    }
}

/// Gateway config text for a mock at `mock`; `extra_server` and
/// `extra_upstream` are appended to those sections.
pub fn config_text(mock: SocketAddr, extra_server: &str, extra_upstream: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace_ms = 5000
{extra_server}

[log]
level = "warn"

[pricing]
file = "{prices}"
watch_interval_ms = 50

[admin]
token_env = "ADMIN_TOKEN"
org_tokens = [{{ org = 1, token_env = "ORG_TOKEN" }}]

[upstreams.mock]
base_url = "http://{mock}"
credential_env = "MOCK_UPSTREAM_KEY"
{extra_upstream}

[[routes]]
prefix = "/v1/chat/completions"
upstream = "mock"
flavour = "openai-chat"

[[routes]]
prefix = "/v1/embeddings"
upstream = "mock"
flavour = "openai-embeddings"

[[routes]]
prefix = "/v1/responses"
upstream = "mock"
flavour = "openai-responses"

[[routes]]
prefix = "/v1/messages"
upstream = "mock"
flavour = "anthropic-messages"

# The tool: the same mock under another name (`localhost`), as a tool API
# would have an origin of its own (a pass-through on a tool's origin must
# list its methods: tool APIs bill reads too).
[upstreams.mock-tools]
base_url = "http://localhost:{mock_port}"
credential_env = "MOCK_UPSTREAM_KEY"

[[routes]]
prefix = "/v1/tools/web-search"
upstream = "mock-tools"
tool = "web-search"
units_header = "x-usage-units"

# The metered routes' upstream: a pass-through on it forwards only reads
# unless it lists the methods (the tests of the data path send them all).
[[routes]]
prefix = "/echo"
upstream = "mock"
passthrough = true
public = true
methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

# Unmetered access to the model endpoints: with a key (the default), and
# without one (public), for tests of the bare data path. Through an origin
# of their own (the same mock, named `localhost`): a pass-through route never
# takes a path a metered route of its origin claims, and forwards only reads
# unless it lists its methods (the client picks the Host). As the tool's
# origin too, they must list them.
[upstreams.mock-direct]
base_url = "http://localhost:{mock_port}"
credential_env = "MOCK_UPSTREAM_KEY"

[[routes]]
prefix = "/v1"
host = "passthrough.test"
upstream = "mock-direct"
passthrough = true
methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

[[routes]]
prefix = "/v1"
host = "public.test"
upstream = "mock-direct"
passthrough = true
public = true
methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
"#,
        prices = PRICES_FILE,
        mock_port = mock.port(),
    )
}

pub fn parse_config(text: &str, data_dir: &Path) -> GatewayConfig {
    parse_config_with_env(text, data_dir, &|_| None)
}

/// As [`parse_config`], with more environment variables from `env`.
pub fn parse_config_with_env(
    text: &str,
    data_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> GatewayConfig {
    let mut config = GatewayConfig::parse(Path::new("test.toml"), text, &|name| match name {
        "MOCK_UPSTREAM_KEY" => Some(UPSTREAM_SECRET.to_owned()),
        "ADMIN_TOKEN" => Some(ADMIN_TOKEN.to_owned()),
        "ORG_TOKEN" => Some(ORG_TOKEN.to_owned()),
        "FINANCE_TOKEN" => Some(FINANCE_TOKEN.to_owned()),
        other => env(other),
    })
    .unwrap();
    config.server.data_dir = data_dir.to_owned();
    config
}

pub async fn start_with(extra_server: &str, extra_upstream: &str, mock_options: MockOptions) -> Stack {
    let mock = MockUpstream::start("127.0.0.1:0".parse().unwrap(), mock_options).await.unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(mock.addr(), extra_server, extra_upstream), data_dir.path());
    let shutdown = CancellationToken::new();
    let gateway = Gateway::start(config, shutdown.clone()).await.unwrap();
    let keys = seed(&gateway, "100", "1");
    Stack { keys, mock, books: BooksCheck::of(&gateway), gateway, shutdown, data_dir }
}

/// Seed an org whose pool holds `pool` dollars and whose Lite user gets
/// `lite` dollars a month.
pub fn seed(gateway: &Gateway, pool: &str, lite: &str) -> SeededKeys {
    let spec = SeedSpec {
        org_name: "test-org".into(),
        pool: pool.parse().unwrap(),
        lite_allowance: lite.parse().unwrap(),
    };
    seed_org(&gateway.ledger(), &spec, chrono::Utc::now()).unwrap()
}

/// A stack whose config text the test edits first (e.g. to add [traffic]).
pub async fn start_edited(edit: impl FnOnce(String) -> String) -> Stack {
    let mock = MockUpstream::start("127.0.0.1:0".parse().unwrap(), MockOptions::default()).await.unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let config = parse_config(&edit(config_text(mock.addr(), "", "")), data_dir.path());
    let shutdown = CancellationToken::new();
    let gateway = Gateway::start(config, shutdown.clone()).await.unwrap();
    let keys = seed(&gateway, "100", "1");
    Stack { keys, mock, books: BooksCheck::of(&gateway), gateway, shutdown, data_dir }
}

/// A stack whose gateway reads `clock`.
pub async fn start_with_clock(clock: std::sync::Arc<dyn creditgate::clock::Clock>) -> Stack {
    start_edited_with_clock(|text| text, clock).await
}

/// A stack whose config text the test edits first, and whose gateway reads `clock`.
pub async fn start_edited_with_clock(
    edit: impl FnOnce(String) -> String,
    clock: std::sync::Arc<dyn creditgate::clock::Clock>,
) -> Stack {
    let mock = MockUpstream::start("127.0.0.1:0".parse().unwrap(), MockOptions::default()).await.unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let config = parse_config(&edit(config_text(mock.addr(), "", "")), data_dir.path());
    let shutdown = CancellationToken::new();
    let now = clock.now();
    let gateway = Gateway::start_with_clock(config, clock, shutdown.clone()).await.unwrap();
    let spec = SeedSpec {
        org_name: "test-org".into(),
        pool: "100".parse().unwrap(),
        lite_allowance: "1".parse().unwrap(),
    };
    let keys = seed_org(&gateway.ledger(), &spec, now).unwrap();
    Stack { keys, mock, books: BooksCheck::of(&gateway), gateway, shutdown, data_dir }
}

pub async fn start() -> Stack {
    start_with("", "", MockOptions::default()).await
}

/// GET an admin path as the operator; the answer must be 200 JSON.
pub async fn admin_get(stack: &Stack, path: &str) -> serde_json::Value {
    let request = Request::get(stack.admin_url(path))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = send(request).await;
    assert_eq!(reply.status, 200, "{path}: {}", String::from_utf8_lossy(&reply.body));
    reply.json()
}

/// A complete response, read to the end.
pub struct Reply {
    pub status: http::StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Send one request with a fixed body and read the whole response.
pub async fn send(request: Request<Full<Bytes>>) -> Reply {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .expect("request timed out")
        .expect("request failed");
    read(response).await
}

pub async fn read(response: Response<Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body failed").to_bytes();
    Reply { status: parts.status, headers: parts.headers, body }
}

/// POST a JSON body with an API key.
pub async fn post_json(url: &str, key: &str, body: &serde_json::Value) -> Reply {
    let request = Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    send(request).await
}

/// An HTTP/1.1 connection whose request body the test streams by hand.
pub async fn open_h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<MockBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    sender
}

/// One h2c connection (prior knowledge): every request sent on it is a
/// stream of that one connection.
pub async fn open_h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<MockBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    sender
}

pub type BodySender = mpsc::Sender<Result<http_body::Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>>;

/// A request body the test feeds chunk by chunk (sent chunked, no length).
pub fn channel_body() -> (BodySender, MockBody) {
    let (tx, rx) = mpsc::channel(1);
    (tx, MockBody::Channel(rx))
}

/// Read the next data frame of a streamed response.
pub async fn next_chunk(body: &mut Incoming) -> Option<Bytes> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("no frame within 10 s")?;
        if let Ok(data) = frame.expect("stream broke").into_data() {
            return Some(data);
        }
    }
}

/// The proxy and admin addresses a `creditgate serve` process logs on start.
/// Its stderr is read on a thread that keeps draining it, so the child never
/// blocks on a full pipe.
pub fn logged_addresses(child: &mut std::process::Child) -> (String, String) {
    use std::io::BufRead as _;
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel::<(String, String)>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let field = |name: &str| {
                line.split(name).nth(1).and_then(|r| r.split_whitespace().next()).map(str::to_owned)
            };
            if let (Some(proxy), Some(admin)) = (field("proxy_addr="), field("admin_addr=")) {
                let _ = tx.send((proxy, admin));
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("the gateway did not start")
}

/// `creditgate serve` on `config` and `data`, with the test secrets in its
/// environment.
pub fn serve_command(config: &Path, data: &Path) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_creditgate"));
    command
        .args(["serve", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .env("MOCK_UPSTREAM_KEY", UPSTREAM_SECRET)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("ORG_TOKEN", ORG_TOKEN)
        .env("RUST_LOG", "info");
    command
}

/// An admin call as the operator to the admin listener at `admin`, with an
/// `Idempotency-Key` when given; `None` when it did not answer in time.
pub async fn operator_call(
    admin: &str,
    method: http::Method,
    path: &str,
    body: serde_json::Value,
    idempotency_key: Option<&str>,
) -> Option<Reply> {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"));
    if let Some(key) = idempotency_key {
        request = request.header("idempotency-key", key);
    }
    let request = request.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request)).await.ok()?.ok()?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    Some(Reply { status: parts.status, headers: parts.headers, body })
}
