//! The mock upstream: an OpenAI- and Anthropic-compatible model server plus a
//! tool endpoint, used by the demo, the tests and the load harness.
//!
//! Endpoints: `POST /v1/chat/completions` (plain and `"stream": true` SSE, with
//! a final usage chunk when `stream_options.include_usage` is set),
//! `POST /v1/embeddings`, `POST /v1/responses`, `POST /v1/messages` (plain and
//! streamed, usage in `message_start` / `message_delta`),
//! `POST /v1/tools/web-search` (units in the `x-usage-units` header), any method
//! on `/echo/...` (streams the request body back), and `GET /_mock/journal`
//! (what it served, as JSON).
//!
//! ## Usage is a deterministic function of the request
//! So tests can compute the expected charge on their own:
//! - `input_tokens = max(1, ceil(request_body_bytes / 4))`
//! - `output_tokens = min(max_tokens, 10 + seed % 41)`, where `max_tokens` is
//!   the first of `max_tokens`, `max_completion_tokens`, `max_output_tokens` in
//!   the body (default 64) and `seed` is the body's `seed` (default 0);
//!   embeddings have no output tokens
//! - tool units = the body's `num_results` (default 5, at most 100)
//!
//! ## Controls, per request, as headers
//! `x-mock-status: CODE` answers that status with an error body;
//! `x-mock-latency-ms: N` waits before the response head;
//! `x-mock-pace-ms: N` waits between stream events (default from options);
//! `x-mock-reset-after: N` breaks the connection after N events (or after half
//! of a plain body); `x-mock-hang: 1` never answers; `x-mock-omit-usage: 1`
//! leaves `usage` out of a JSON body; `x-mock-usage: {...}` replaces it;
//! `x-mock-input-tokens: N` reports N input tokens, JSON or stream (context
//! the upstream read that the request does not carry).

mod responses;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::server::{self, BoxError, Drained, ServeOptions};

/// Most journal entries kept; older ones are dropped first.
const JOURNAL_CAPACITY: usize = 100_000;
/// Largest request body the mock reads for a model call.
const MAX_MODEL_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Output cap when the request names none.
pub const DEFAULT_MAX_TOKENS: u64 = 64;
const DEFAULT_TOOL_UNITS: u64 = 5;
const MAX_TOOL_UNITS: u64 = 100;

/// Settings for the whole mock.
#[derive(Debug, Clone, Default)]
pub struct MockOptions {
    /// Wait before every response head.
    pub latency: Duration,
    /// Default gap between stream events.
    pub pace: Duration,
    /// Journal entries kept (default 100,000); a load run that audits every
    /// call needs room for all of them.
    pub journal_capacity: Option<usize>,
}

/// Token and unit counts the mock reported for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MockUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub units: u64,
}

/// What the mock saw and answered for one request.
#[derive(Debug, Clone, Serialize)]
pub struct JournalEntry {
    pub seq: u64,
    pub method: String,
    /// Path and query as received.
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body_bytes: u64,
    pub model: Option<String>,
    pub stream: bool,
    pub status: u16,
    pub usage: Option<MockUsage>,
    /// When each stream event was handed to the connection.
    #[serde(skip)]
    pub event_times: Arc<Mutex<Vec<Instant>>>,
}

impl JournalEntry {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn event_times(&self) -> Vec<Instant> {
        self.event_times.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

/// A bounded log of served requests, shared with tests and the load harness.
#[derive(Debug, Default)]
pub struct Journal {
    entries: Mutex<VecDeque<JournalEntry>>,
    next_seq: std::sync::atomic::AtomicU64,
    capacity: usize,
}

impl Journal {
    fn record(&self, mut entry: JournalEntry) {
        entry.seq = self.next_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= self.capacity.max(1) {
                entries.pop_front();
            }
            entries.push_back(entry);
        }
    }

    pub fn entries(&self) -> Vec<JournalEntry> {
        self.entries.lock().map(|e| e.iter().cloned().collect()).unwrap_or_default()
    }

    pub fn last(&self) -> Option<JournalEntry> {
        self.entries.lock().ok().and_then(|e| e.back().cloned())
    }

    /// Takes every entry out, oldest first. The load harness drains the
    /// journal after each phase so a long run never overflows it.
    pub fn drain(&self) -> Vec<JournalEntry> {
        self.entries.lock().map(|mut e| e.drain(..).collect()).unwrap_or_default()
    }

    pub fn clear(&self) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.clear();
        }
    }
}

/// A running mock upstream.
pub struct MockUpstream {
    addr: SocketAddr,
    journal: Arc<Journal>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Drained>,
}

impl MockUpstream {
    /// Bind `addr` (port 0 picks a free port) and start serving.
    pub async fn start(addr: SocketAddr, options: MockOptions) -> std::io::Result<MockUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let journal = Arc::new(Journal {
            capacity: options.journal_capacity.unwrap_or(JOURNAL_CAPACITY),
            ..Journal::default()
        });
        let shutdown = CancellationToken::new();
        let state = Arc::new(MockState { options, journal: journal.clone(), shutdown: shutdown.clone() });
        let serve_options = ServeOptions {
            name: "mock",
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(1),
            max_request_duration: None,
            client_stall_timeout: Duration::from_secs(60),
            http2_max_concurrent_streams: 200,
        };
        let task =
            tokio::spawn(server::serve(listener, serve_options, shutdown.clone(), move |req, _peer| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(state.handle(req).await) }
            }));
        Ok(MockUpstream { addr, journal, shutdown, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn journal(&self) -> Arc<Journal> {
        self.journal.clone()
    }

    /// Stop serving; hanging requests are cut.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Wait until the mock is stopped from elsewhere (e.g. the CLI's signal).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

struct MockState {
    options: MockOptions,
    journal: Arc<Journal>,
    shutdown: CancellationToken,
}

/// Per-request controls read from `x-mock-*` headers.
struct Controls {
    status: Option<StatusCode>,
    latency: Duration,
    pace: Duration,
    reset_after: Option<usize>,
    hang: bool,
    omit_usage: bool,
    /// Input tokens the answer reports, whatever the body's size.
    input_tokens: Option<u64>,
    /// Replaces the `usage` object of a JSON answer (fault injection).
    usage_override: Option<serde_json::Value>,
}

impl Controls {
    fn from_headers(headers: &HeaderMap, options: &MockOptions) -> Self {
        let number =
            |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        Controls {
            status: number("x-mock-status")
                .and_then(|code| u16::try_from(code).ok())
                .and_then(|code| StatusCode::from_u16(code).ok()),
            latency: number("x-mock-latency-ms").map_or(options.latency, Duration::from_millis),
            pace: number("x-mock-pace-ms").map_or(options.pace, Duration::from_millis),
            reset_after: number("x-mock-reset-after").and_then(|n| usize::try_from(n).ok()),
            hang: headers.contains_key("x-mock-hang"),
            omit_usage: headers.contains_key("x-mock-omit-usage"),
            input_tokens: number("x-mock-input-tokens"),
            usage_override: headers
                .get("x-mock-usage")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| serde_json::from_str(v).ok()),
        }
    }
}

/// The answer the mock built for a request, before it is written out.
pub(crate) enum Reply {
    Json(StatusCode, serde_json::Value, Option<MockUsage>),
    /// Server-sent events: each string is one whole event.
    Events(Vec<String>, MockUsage),
}

impl MockState {
    async fn handle(&self, request: Request<Incoming>) -> Response<MockBody> {
        let controls = Controls::from_headers(request.headers(), &self.options);
        let (parts, body) = request.into_parts();
        let mut entry = JournalEntry {
            seq: 0,
            method: parts.method.to_string(),
            uri: parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect(),
            body_bytes: 0,
            model: None,
            stream: false,
            status: 200,
            usage: None,
            event_times: Arc::default(),
        };
        if controls.hang {
            self.journal.record(entry);
            self.shutdown.cancelled().await;
            return plain(StatusCode::SERVICE_UNAVAILABLE, "mock stopped");
        }
        if !controls.latency.is_zero() {
            tokio::time::sleep(controls.latency).await;
        }
        let path = parts.uri.path().to_owned();
        if path.starts_with("/echo") {
            return self.echo(&parts.method, &parts.uri, body, entry);
        }
        if parts.method == Method::GET && path == "/_mock/journal" {
            let entries = serde_json::to_value(self.journal.entries()).unwrap_or_default();
            return json(StatusCode::OK, &entries);
        }
        let bytes = match http_body_util::Limited::new(body, MAX_MODEL_BODY_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return plain(StatusCode::PAYLOAD_TOO_LARGE, "request body unreadable or too large"),
        };
        entry.body_bytes = bytes.len() as u64;
        let reply = match controls.status {
            Some(status) => responses::error(status, "injected by x-mock-status"),
            None => responses::answer(
                parts.method == Method::POST,
                &path,
                &bytes,
                controls.input_tokens,
                &mut entry,
            ),
        };
        self.write(reply, &controls, entry)
    }

    fn echo(
        &self,
        method: &Method,
        uri: &http::Uri,
        body: Incoming,
        mut entry: JournalEntry,
    ) -> Response<MockBody> {
        entry.body_bytes = body.size_hint().exact().unwrap_or(0);
        self.journal.record(entry);
        let mut response = Response::new(MockBody::Echo(body));
        let headers = response.headers_mut();
        headers.insert(
            "x-echo-method",
            HeaderValue::from_str(method.as_str()).unwrap_or(HeaderValue::from_static("?")),
        );
        if let Ok(value) = HeaderValue::from_str(&uri.to_string()) {
            headers.insert("x-echo-uri", value);
        }
        response
    }

    fn write(&self, reply: Reply, controls: &Controls, mut entry: JournalEntry) -> Response<MockBody> {
        match reply {
            Reply::Json(status, mut value, usage) => {
                if let Some(object) = value.as_object_mut() {
                    if controls.omit_usage {
                        object.remove("usage");
                    }
                    if let Some(usage) = &controls.usage_override {
                        object.insert("usage".to_owned(), usage.clone());
                    }
                }
                entry.status = status.as_u16();
                entry.usage = usage;
                self.journal.record(entry);
                let mut response = match controls.reset_after {
                    // Send half the body, then break the connection.
                    Some(_) => {
                        let text = value.to_string();
                        let half_len = text.len() / 2;
                        let half = Bytes::from(text).slice(..half_len);
                        let (tx, rx) = mpsc::channel(2);
                        let _ = tx.try_send(Ok(Frame::data(half)));
                        let _ = tx.try_send(Err(BoxError::from("mock reset")));
                        Response::new(MockBody::Channel(rx))
                    }
                    None => json(status, &value),
                };
                if let Some(units) = usage.map(|u| u.units).filter(|&u| u > 0) {
                    response.headers_mut().insert("x-usage-units", HeaderValue::from(units));
                }
                *response.status_mut() = status;
                response
            }
            Reply::Events(events, usage) => {
                entry.stream = true;
                entry.usage = Some(usage);
                let times = entry.event_times.clone();
                self.journal.record(entry);
                let (tx, rx) = mpsc::channel(1);
                tokio::spawn(pace_events(events, controls.pace, controls.reset_after, tx, times));
                let mut response = Response::new(MockBody::Channel(rx));
                let headers = response.headers_mut();
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                response
            }
        }
    }
}

type FrameResult = Result<Frame<Bytes>, BoxError>;

/// Write events one by one, `pace` apart, recording when each was handed over;
/// break off with an error after `reset_after` events if asked.
async fn pace_events(
    events: Vec<String>,
    pace: Duration,
    reset_after: Option<usize>,
    tx: mpsc::Sender<FrameResult>,
    times: Arc<Mutex<Vec<Instant>>>,
) {
    for (i, event) in events.into_iter().enumerate() {
        if reset_after == Some(i) {
            let _ = tx.send(Err(BoxError::from("mock reset mid-stream"))).await;
            return;
        }
        if i > 0 && !pace.is_zero() {
            tokio::time::sleep(pace).await;
        }
        if let Ok(mut t) = times.lock() {
            t.push(Instant::now());
        }
        if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
            return; // client went away
        }
    }
}

/// The mock's response body: fixed bytes, paced events, or an echo of the request.
pub enum MockBody {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<FrameResult>),
    Echo(Incoming),
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FrameResult>> {
        match self.get_mut() {
            MockBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Channel(rx) => rx.poll_recv(cx),
            MockBody::Echo(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Full(bytes) => bytes.is_none(),
            MockBody::Channel(_) => false,
            MockBody::Echo(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            MockBody::Full(Some(b)) => http_body::SizeHint::with_exact(b.len() as u64),
            MockBody::Full(None) => http_body::SizeHint::with_exact(0),
            MockBody::Channel(_) => http_body::SizeHint::default(),
            MockBody::Echo(body) => body.size_hint(),
        }
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<MockBody> {
    let mut response = Response::new(MockBody::Full(Some(Bytes::from(value.to_string()))));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<MockBody> {
    let mut response = Response::new(MockBody::Full(Some(Bytes::from_static(text.as_bytes()))));
    *response.status_mut() = status;
    response
}
