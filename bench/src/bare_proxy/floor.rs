//! The floors under issue 17's targets: the bare proxy plus only the work a
//! gateway of creditgate's kind cannot skip, written as lean as we know how.
//! The gateway's distance from a floor is what its own design costs; the
//! floor's distance from the bare proxy is what the job itself costs.
//!
//! `--floor auth` (under the pass-through route): the presented key's
//! SHA-256 looked up among the known keys (keys are stored hashed), 401 for
//! an unknown one, and the client's credential removed before forwarding.
//!
//! `--floor meter` (under the metered route): `auth`, then for a model
//! request the body read whole and its `model`, output cap and `stream` read
//! by serde (other fields skipped), an unpriced model refused,
//! `stream_options.include_usage` spliced into an OpenAI chat stream that
//! lacks it, the worst case held in `Decimal` from the key's wallet under a
//! lock; the response scanned for `"usage"` (memmem) as it streams through,
//! the usage object parsed where it is found, the cost settled in `Decimal`,
//! and a 44-byte record appended to a buffer that a writer thread takes
//! every 5 ms and puts into sled as one value, then flushes (the gateway's
//! durability rule, a settle on disk within a flush window or two, kept
//! without waking a thread per record).
//!
//! Left out, all of which the gateway does: per-model prices (one price for
//! every model), tool units from a response header (a tool call costs its
//! hold), a usage key split across two reads, removing the usage event a
//! client did not ask for, spending limits, rate and in-flight caps, request
//! ids, access logs, metrics, timeouts, hop-by-hop headers, the ledger's
//! entries (a 44-byte record instead) and replaying them at start. Each
//! omission makes the floor lower, never higher.
//!
//! Both floors reach the upstream through the gateway's own connection pool
//! (`creditgate::proxy::PlainPool`), which costs less per call than the
//! hyper-util client the bare proxy uses: a floor must not carry a cost the
//! gateway no longer pays.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use creditgate::proxy::{PlainPool, UpstreamBody, WithoutTrailers};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use rust_decimal::Decimal;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// What the floor does on top of the bare proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Authenticate the key, drop the client's credential.
    Auth,
    /// `auth`, then price, hold, meter, settle and persist.
    Meter,
}

/// The gateway's body limit.
const MAX_BODY_BYTES: usize = 1 << 20;

/// A client body forwarded as it comes, under the size cap.
fn streamed(body: Incoming) -> UpstreamBody {
    Either::Left(WithoutTrailers(Limited::new(body, MAX_BODY_BYTES)))
}
/// Output tokens held for when a request names no cap.
const DEFAULT_OUTPUT_CAP: u64 = 4096;
/// The store writer's flush window (the gateway's `[ledger] flush_interval_ms`).
const FLUSH_WINDOW: Duration = Duration::from_millis(5);
/// sled's page cache (the gateway's).
const SLED_CACHE_BYTES: u64 = 8 << 20;
/// Each wallet's credit: enough that the floor never refuses a request the
/// harness's funded wallets would pay.
const WALLET_CREDIT: i64 = 1_000_000_000;

/// One price for every model: $0.15 / $0.60 per million tokens in / out.
fn input_price() -> Decimal {
    Decimal::new(15, 8)
}
fn output_price() -> Decimal {
    Decimal::new(60, 8)
}
/// A tool call's price.
fn tool_price() -> Decimal {
    Decimal::new(1, 2)
}

pub struct Floor {
    kind: Kind,
    /// SHA-256 of each known key → its wallet.
    keys: HashMap<[u8; 32], usize>,
    wallets: Box<[Mutex<Decimal>]>,
    models: HashSet<Box<str>>,
    /// The upstream's `Host`, made once.
    host: HeaderValue,
    /// The gateway's own pool: the floor is as lean as the gateway can be.
    pool: Arc<PlainPool>,
    /// Records settled since the writer last took them, encoded; `None`
    /// for the auth floor.
    records: Option<Arc<Mutex<Vec<u8>>>>,
    sequence: AtomicU64,
}

/// What the writer persists for a settled request.
struct Record {
    sequence: u64,
    wallet: u32,
    cost: Decimal,
    input_tokens: u64,
    output_tokens: u64,
}

impl Record {
    fn encode(&self, into: &mut Vec<u8>) {
        into.extend_from_slice(&self.sequence.to_le_bytes());
        into.extend_from_slice(&self.wallet.to_le_bytes());
        into.extend_from_slice(&self.cost.serialize());
        into.extend_from_slice(&self.input_tokens.to_le_bytes());
        into.extend_from_slice(&self.output_tokens.to_le_bytes());
    }
}

pub struct Options<'a> {
    pub kind: Kind,
    pub keys_file: &'a Path,
    pub models: &'a [String],
    pub data_dir: Option<&'a Path>,
    pub upstream: http::uri::Authority,
    pub pool: Arc<PlainPool>,
}

impl Floor {
    pub fn new(options: Options) -> anyhow::Result<Floor> {
        let text = std::fs::read_to_string(options.keys_file)
            .with_context(|| format!("cannot read {}", options.keys_file.display()))?;
        let secrets: Vec<&str> = text.lines().map(str::trim).filter(|line| !line.is_empty()).collect();
        // A wallet per line, so a secret listed twice cannot point past the end.
        let keys: HashMap<[u8; 32], usize> = secrets
            .iter()
            .enumerate()
            .map(|(wallet, secret)| (Sha256::digest(secret.as_bytes()).into(), wallet))
            .collect();
        let wallets = secrets.iter().map(|_| Mutex::new(Decimal::from(WALLET_CREDIT))).collect();
        let records = match options.kind {
            Kind::Auth => None,
            Kind::Meter => {
                let dir = options.data_dir.context("--floor meter needs --data-dir")?;
                let db = sled::Config::new()
                    .path(dir)
                    .flush_every_ms(None)
                    .cache_capacity(SLED_CACHE_BYTES)
                    .open()
                    .with_context(|| format!("cannot open sled in {}", dir.display()))?;
                let records = Arc::new(Mutex::new(Vec::new()));
                let taken = records.clone();
                std::thread::Builder::new().name("floor-writer".into()).spawn(move || write(&db, &taken))?;
                Some(records)
            }
        };
        Ok(Floor {
            kind: options.kind,
            keys,
            wallets,
            models: options.models.iter().map(|m| m.as_str().into()).collect(),
            host: HeaderValue::from_str(options.upstream.as_str())?,
            pool: options.pool,
            records,
            sequence: AtomicU64::new(0),
        })
    }

    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<FloorBody>, Infallible> {
        Ok(self.serve(request).await.unwrap_or_else(status))
    }

    async fn serve(self: Arc<Self>, request: Request<Incoming>) -> Result<Response<FloorBody>, StatusCode> {
        let (mut parts, body) = request.into_parts();
        let wallet = self.authenticate(&parts.headers).ok_or(StatusCode::UNAUTHORIZED)?;
        parts.headers.remove(header::AUTHORIZATION);
        parts.headers.remove("x-api-key");
        parts.uri = self.upstream_uri(parts.uri)?;
        let path = parts.uri.path();
        if self.kind == Kind::Auth || !path.starts_with("/v1/") {
            let response = self.send(parts, streamed(body)).await;
            return Ok(response.map_err(|_| StatusCode::BAD_GATEWAY)?.map(FloorBody::passed));
        }
        if path.starts_with("/v1/tools/") {
            let held = self.hold(wallet, tool_price())?;
            let response = self.send(parts, streamed(body)).await;
            let meter = Meter::new(self.clone(), wallet, held, false);
            return self.metered(response.map_err(|_| StatusCode::BAD_GATEWAY), meter);
        }
        let bytes = Limited::new(body, MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|_| StatusCode::PAYLOAD_TOO_LARGE)?
            .to_bytes();
        let fields: ModelRequest = serde_json::from_slice(&bytes).map_err(|_| StatusCode::BAD_REQUEST)?;
        if !self.models.contains(fields.model.as_ref()) {
            return Err(StatusCode::BAD_REQUEST);
        }
        let cap = fields.max_tokens.or(fields.max_completion_tokens).or(fields.max_output_tokens);
        let stream = fields.stream;
        let splice = stream && fields.stream_options.is_none() && path.ends_with("/chat/completions");
        // Every input token is at least one byte of the body.
        let worst = Decimal::from(bytes.len()) * input_price()
            + Decimal::from(cap.unwrap_or(DEFAULT_OUTPUT_CAP)) * output_price();
        let held = self.hold(wallet, worst)?;
        let body = if splice { with_include_usage(&bytes) } else { bytes };
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let response = self.send(parts, Either::Right(Full::new(body))).await;
        let meter = Meter::new(self.clone(), wallet, held, stream);
        self.metered(response.map_err(|_| StatusCode::BAD_GATEWAY), meter)
    }

    fn metered(
        &self,
        response: Result<Response<Incoming>, StatusCode>,
        meter: Meter,
    ) -> Result<Response<FloorBody>, StatusCode> {
        match response {
            Ok(response) => Ok(response.map(|body| FloorBody { inner: Some(body), meter: Some(meter) })),
            Err(code) => {
                meter.refund();
                Err(code)
            }
        }
    }

    fn authenticate(&self, headers: &HeaderMap) -> Option<usize> {
        let secret = match headers.get(header::AUTHORIZATION) {
            Some(value) => value.as_bytes().strip_prefix(b"Bearer ")?,
            None => headers.get("x-api-key")?.as_bytes(),
        };
        let digest: [u8; 32] = Sha256::digest(secret).into();
        self.keys.get(&digest).copied()
    }

    /// Origin-form, as the pool sends it: the path and query alone.
    fn upstream_uri(&self, uri: http::Uri) -> Result<http::Uri, StatusCode> {
        let mut parts = uri.into_parts();
        parts.scheme = None;
        parts.authority = None;
        parts.path_and_query.get_or_insert(http::uri::PathAndQuery::from_static("/"));
        http::Uri::from_parts(parts).map_err(|_| StatusCode::BAD_REQUEST)
    }

    async fn send(
        &self,
        mut parts: http::request::Parts,
        body: UpstreamBody,
    ) -> Result<Response<Incoming>, creditgate::proxy::PlainError> {
        parts.headers.insert(header::HOST, self.host.clone());
        self.pool.send(Request::from_parts(parts, body)).await
    }

    fn hold(&self, wallet: usize, amount: Decimal) -> Result<Decimal, StatusCode> {
        let mut balance = self.wallets[wallet].lock().unwrap_or_else(|e| e.into_inner());
        if *balance < amount {
            return Err(StatusCode::PAYMENT_REQUIRED);
        }
        *balance -= amount;
        Ok(amount)
    }
}

/// The request fields a hold needs, borrowed where they can be.
#[derive(Deserialize)]
struct ModelRequest<'a> {
    #[serde(borrow)]
    model: Cow<'a, str>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<serde::de::IgnoredAny>,
}

/// Usage as OpenAI and Anthropic report it; other fields are skipped.
#[derive(Deserialize, Default, Clone, Copy)]
struct Usage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

/// The body with `"stream_options":{"include_usage":true}` spliced in first.
fn with_include_usage(body: &Bytes) -> Bytes {
    const FIELD: &[u8] = br#""stream_options":{"include_usage":true},"#;
    let Some(open) = body.iter().position(|&b| b == b'{') else { return body.clone() };
    let mut out = Vec::with_capacity(body.len() + FIELD.len());
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(FIELD);
    out.extend_from_slice(&body[open + 1..]);
    out.into()
}

/// A request's money from its hold to its settle.
struct Meter {
    floor: Arc<Floor>,
    wallet: usize,
    held: Decimal,
    stream: bool,
    /// A JSON response, kept to be read for usage at its end.
    body: Vec<u8>,
    input_tokens: u64,
    output_tokens: u64,
    reported: bool,
}

impl Meter {
    fn new(floor: Arc<Floor>, wallet: usize, held: Decimal, stream: bool) -> Meter {
        Meter {
            floor,
            wallet,
            held,
            stream,
            body: Vec::new(),
            input_tokens: 0,
            output_tokens: 0,
            reported: false,
        }
    }

    fn observe(&mut self, data: &[u8]) {
        if self.stream {
            self.read_usage(data);
        } else if self.body.len() + data.len() <= MAX_BODY_BYTES {
            self.body.extend_from_slice(data);
        }
    }

    /// Every non-null `"usage"` object in `data`.
    fn read_usage(&mut self, data: &[u8]) {
        for at in memchr::memmem::find_iter(data, b"\"usage\"") {
            let rest = &data[at + 7..];
            let Some(value) = rest.iter().position(|&b| !matches!(b, b' ' | b':' | b'\t')) else { continue };
            if rest[value] != b'{' {
                continue;
            }
            let mut de = serde_json::Deserializer::from_slice(&rest[value..]);
            if let Ok(usage) = Usage::deserialize(&mut de) {
                let input = usage.prompt_tokens.or(usage.input_tokens).unwrap_or(0);
                let output = usage.completion_tokens.or(usage.output_tokens).unwrap_or(0);
                self.input_tokens = self.input_tokens.max(input);
                self.output_tokens = self.output_tokens.max(output);
                self.reported = true;
            }
        }
    }

    /// Nothing reached the upstream: the hold goes back whole.
    fn refund(self) {
        *self.floor.wallets[self.wallet].lock().unwrap_or_else(|e| e.into_inner()) += self.held;
    }

    fn settle(mut self) {
        if !self.stream {
            let body = std::mem::take(&mut self.body);
            self.read_usage(&body);
        }
        let cost = if self.reported {
            let priced = Decimal::from(self.input_tokens) * input_price()
                + Decimal::from(self.output_tokens) * output_price();
            priced.min(self.held)
        } else {
            self.held
        };
        let floor = &self.floor;
        *floor.wallets[self.wallet].lock().unwrap_or_else(|e| e.into_inner()) += self.held - cost;
        if let Some(records) = &floor.records {
            let mut records = records.lock().unwrap_or_else(|e| e.into_inner());
            Record {
                sequence: floor.sequence.fetch_add(1, Ordering::Relaxed),
                wallet: self.wallet as u32,
                cost,
                input_tokens: self.input_tokens,
                output_tokens: self.output_tokens,
            }
            .encode(&mut records);
        }
    }
}

/// The writer: every flush window it takes the records settled meanwhile
/// and puts them into sled as one value, then flushes. It polls rather than
/// being woken per record, the cheapest way we know to keep the gateway's
/// rule that a settle is on disk within a window or two.
fn write(db: &sled::Db, records: &Mutex<Vec<u8>>) {
    let mut segment = Vec::with_capacity(64 << 10);
    let mut key: u64 = 0;
    loop {
        std::thread::sleep(FLUSH_WINDOW);
        std::mem::swap(&mut segment, &mut *records.lock().unwrap_or_else(|e| e.into_inner()));
        if segment.is_empty() {
            continue;
        }
        if db.insert(key.to_be_bytes(), segment.as_slice()).and_then(|_| db.flush()).is_err() {
            eprintln!("floor: the store write failed");
        }
        segment.clear();
        key += 1;
    }
}

/// A response body: the upstream's, metered or passed as it is, or none.
pub struct FloorBody {
    inner: Option<Incoming>,
    meter: Option<Meter>,
}

impl FloorBody {
    fn passed(body: Incoming) -> FloorBody {
        FloorBody { inner: Some(body), meter: None }
    }
}

impl Body for FloorBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(meter), Some(data)) = (this.meter.as_mut(), frame.data_ref()) {
                    meter.observe(data);
                }
            }
            Poll::Ready(None) => {
                if let Some(meter) = this.meter.take() {
                    meter.settle();
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for FloorBody {
    /// A response that never ended (client gone, upstream broke) settles its hold.
    fn drop(&mut self) {
        if let Some(meter) = self.meter.take() {
            meter.settle();
        }
    }
}

fn status(code: StatusCode) -> Response<FloorBody> {
    let mut response = Response::new(FloorBody { inner: None, meter: None });
    *response.status_mut() = code;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_usage_is_spliced_in_first_and_the_body_stays_json() {
        let body = Bytes::from_static(br#" {"model":"m","stream":true}"#);
        let spliced: serde_json::Value = serde_json::from_slice(&with_include_usage(&body)).unwrap();
        assert_eq!(spliced["stream_options"]["include_usage"], true);
        assert_eq!(spliced["model"], "m");
    }

    fn floor() -> Arc<Floor> {
        floor_with_keys("k-1\nk-2\n")
    }

    fn floor_with_keys(lines: &str) -> Arc<Floor> {
        let keys = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(keys.path(), lines).unwrap();
        let upstream: http::uri::Authority = "127.0.0.1:1".parse().unwrap();
        Arc::new(
            Floor::new(Options {
                kind: Kind::Auth,
                keys_file: keys.path(),
                models: &["m".to_owned()],
                data_dir: None,
                upstream: upstream.clone(),
                pool: Arc::new(PlainPool::new(&upstream, std::time::Duration::from_secs(1), 8)),
            })
            .unwrap(),
        )
    }

    #[test]
    fn only_a_known_key_authenticates_and_each_has_its_own_wallet() {
        let floor = floor();
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k-2"));
        assert_eq!(floor.authenticate(&headers), Some(1));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k-3"));
        assert_eq!(floor.authenticate(&headers), None);
        headers.remove(header::AUTHORIZATION);
        headers.insert("x-api-key", HeaderValue::from_static("k-1"));
        assert_eq!(floor.authenticate(&headers), Some(0));
    }

    #[test]
    fn a_secret_listed_twice_still_has_a_wallet() {
        let floor = floor_with_keys("k-1\n\nk-1\n");
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_static("k-1"));
        let wallet = floor.authenticate(&headers).unwrap();
        assert_eq!(floor.hold(wallet, Decimal::ONE), Ok(Decimal::ONE));
    }

    #[test]
    fn usage_is_read_as_providers_write_it_and_settled_in_decimal() {
        let floor = floor();
        let held = floor.hold(0, Decimal::ONE).unwrap();
        let mut meter = Meter::new(floor.clone(), 0, held, true);
        // CRLF framing, a null usage, then the usage chunk with spaces.
        meter.observe(b"data: {\"choices\": [], \"usage\":null}\r\n\r\n");
        meter.observe(
            b"data: {\"choices\": [], \"usage\": {\"prompt_tokens\": 10, \"completion_tokens\": 4}}\r\n\r\n",
        );
        meter.settle();
        let cost = Decimal::from(10) * input_price() + Decimal::from(4) * output_price();
        let balance = *floor.wallets[0].lock().unwrap();
        assert_eq!(balance, Decimal::from(WALLET_CREDIT) - cost);
    }

    #[test]
    fn a_response_without_usage_pays_its_hold_and_a_failed_forward_pays_nothing() {
        let floor = floor();
        let held = floor.hold(1, Decimal::ONE).unwrap();
        let mut meter = Meter::new(floor.clone(), 1, held, false);
        meter.observe(br#"{"id":"x"}"#);
        meter.settle();
        assert_eq!(*floor.wallets[1].lock().unwrap(), Decimal::from(WALLET_CREDIT) - Decimal::ONE);
        let held = floor.hold(1, Decimal::ONE).unwrap();
        Meter::new(floor.clone(), 1, held, false).refund();
        assert_eq!(*floor.wallets[1].lock().unwrap(), Decimal::from(WALLET_CREDIT) - Decimal::ONE);
    }
}
