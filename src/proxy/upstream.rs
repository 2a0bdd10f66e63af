//! Pooled clients to the upstreams (plain HTTP and HTTPS via rustls, HTTP/1.1
//! or HTTP/2) and the mapping of their failures to gateway errors.
//! Plain-HTTP/1.1 upstreams use a pool of our own ([`PlainPool`]); the
//! others, hyper-util's legacy client.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::{PathAndQuery, Uri};
use http::{Request, Version};
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::error::ProxyError;
use super::plain_pool::{HeadResult, PlainError, PlainPool};
use crate::config::Upstream;
use crate::server::per_core::thread_index;

/// The body sent upstream: the client's stream under a size limit, or a body
/// the gateway rebuilt (e.g. after adding `stream_options`).
pub type UpstreamBody = Either<WithoutTrailers<Limited<Incoming>>, Full<Bytes>>;

/// A client's body streamed upstream without its trailers: an h2 upstream
/// would be sent them as they came, past the rules that strip and allow
/// request headers (a trailer `authorization` or `x-api-key`).
pub struct WithoutTrailers<B>(pub B);

impl<B: http_body::Body<Data = Bytes> + Unpin> http_body::Body for WithoutTrailers<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        loop {
            match std::task::ready!(Pin::new(&mut self.0).poll_frame(cx)) {
                Some(Ok(frame)) if frame.is_trailers() => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, UpstreamBody>;

/// An upstream's pooled client.
enum UpstreamClient {
    /// Plain HTTP/1.1 (the upstream has a ready-made `Host`).
    Plain(Arc<PlainPool>),
    /// HTTPS, where ALPN may choose HTTP/2, or HTTP/2 by prior knowledge.
    Legacy(Box<HttpsClient>),
}

/// The upstream's response head, to come. Owns everything it needs, so it
/// can be awaited by a task other than the request's.
pub enum HeadFuture {
    Plain(Pin<Box<dyn Future<Output = HeadResult> + Send>>),
    Legacy(ResponseFuture),
}

/// Why an upstream call got no response head.
pub enum UpstreamError {
    Plain(PlainError),
    Legacy(hyper_util::client::legacy::Error),
}

impl Future for HeadFuture {
    type Output = Result<hyper::Response<Incoming>, UpstreamError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            HeadFuture::Plain(head) => head.as_mut().poll(cx).map_err(UpstreamError::Plain),
            HeadFuture::Legacy(head) => Pin::new(head).poll(cx).map_err(UpstreamError::Legacy),
        }
    }
}

/// One pooled client per upstream, so each keeps its own pool size, timeouts
/// and protocol choice; and one such set per proxy thread under
/// `thread-per-core`, so a thread never sends on a connection whose task
/// another thread runs.
pub struct UpstreamClients {
    /// `[thread][upstream]`; one thread's set under work-stealing.
    clients: Vec<Vec<UpstreamClient>>,
}

impl UpstreamClients {
    pub fn new(upstreams: &[Upstream], threads: usize) -> Self {
        let clients = (0..threads.max(1)).map(|_| upstreams.iter().map(build_client).collect()).collect();
        UpstreamClients { clients }
    }

    /// Sends a request; the future it returns resolves to the response head.
    /// It owns everything it needs, so it can be awaited by a task other than
    /// the request's (reading on after the client left).
    pub fn start(
        &self,
        index: usize,
        upstream: &Upstream,
        request: Request<UpstreamBody>,
    ) -> Result<HeadFuture, ProxyError> {
        let thread = self.clients.get(thread_index()).or_else(|| self.clients.first());
        let Some(client) = thread.and_then(|clients| clients.get(index)) else {
            return Err(ProxyError::UpstreamFailed {
                upstream: upstream.name.clone(),
                reason: "no client configured".to_owned(),
            });
        };
        Ok(match client {
            UpstreamClient::Plain(pool) => HeadFuture::Plain(pool.send(request)),
            UpstreamClient::Legacy(client) => HeadFuture::Legacy(client.request(request)),
        })
    }
}

/// Whether the upstream is reached through our own pool: plain HTTP/1.1,
/// which is when the config made its `Host` header.
fn uses_plain_pool(upstream: &Upstream) -> bool {
    upstream.host_header.is_some()
}

fn build_client(upstream: &Upstream) -> UpstreamClient {
    if uses_plain_pool(upstream) {
        let pool =
            PlainPool::new(&upstream.authority, upstream.connect_timeout, upstream.pool_max_idle_per_host);
        return UpstreamClient::Plain(Arc::new(pool));
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    // Stream chunks as soon as they are written: no Nagle delay on SSE.
    http.set_nodelay(true);
    http.set_connect_timeout(Some(upstream.connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let client = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(super::plain_pool::IDLE_TIMEOUT)
        .pool_max_idle_per_host(upstream.pool_max_idle_per_host)
        .http2_only(upstream.http2_prior_knowledge)
        .build(connector);
    UpstreamClient::Legacy(Box::new(client))
}

/// The upstream URI for a client request: the upstream's base URL with the
/// request's path and query appended; origin-form (the path and query
/// alone) for our own pool, which sends the URI as it is.
pub fn upstream_uri(upstream: &Upstream, client_uri: Uri) -> Result<Uri, http::Error> {
    // The client's path and query were parsed once already: reused, not
    // parsed again, unless a base path goes in front.
    let path_and_query = match client_uri.into_parts().path_and_query {
        Some(path_and_query) if upstream.base_path.is_empty() => path_and_query,
        None if upstream.base_path.is_empty() => PathAndQuery::from_static("/"),
        path_and_query => PathAndQuery::try_from(format!(
            "{}{}",
            upstream.base_path,
            path_and_query.as_ref().map_or("/", PathAndQuery::as_str)
        ))?,
    };
    if uses_plain_pool(upstream) {
        return Ok(Uri::from(path_and_query));
    }
    Uri::builder()
        .scheme(upstream.scheme.clone())
        .authority(upstream.authority.clone())
        .path_and_query(path_and_query)
        .build()
}

/// The HTTP version to ask the pooled client for: it rejects an HTTP/2
/// request on an HTTP/1 connection, and upgrades to HTTP/2 itself when ALPN
/// or prior knowledge says so.
pub fn upstream_version(upstream: &Upstream) -> Version {
    if upstream.http2_prior_knowledge {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    }
}

pub fn classify(error: &UpstreamError, upstream: &Upstream, max_body_bytes: u64) -> ProxyError {
    let name = upstream.name.clone();
    let (error, is_connect, timed_out): (&(dyn StdError + 'static), bool, bool) = match error {
        UpstreamError::Plain(timeout @ PlainError::ConnectTimeout) => (timeout, true, true),
        UpstreamError::Plain(PlainError::Connect(e)) => (e, true, e.kind() == io::ErrorKind::TimedOut),
        UpstreamError::Plain(PlainError::Http(e)) => (e, false, false),
        UpstreamError::Legacy(e) => {
            let timed_out = find_source::<io::Error>(e).is_some_and(|e| e.kind() == io::ErrorKind::TimedOut);
            (e, e.is_connect(), timed_out)
        }
    };
    if find_source::<http_body_util::LengthLimitError>(error).is_some() {
        return ProxyError::BodyTooLarge { limit_bytes: max_body_bytes };
    }
    if is_connect && timed_out {
        return ProxyError::UpstreamConnectTimeout { upstream: name, timeout: upstream.connect_timeout };
    }
    let reason = error_chain(error);
    if is_connect {
        ProxyError::UpstreamUnreachable { upstream: name, reason }
    } else {
        ProxyError::UpstreamFailed { upstream: name, reason }
    }
}

fn find_source<'a, T: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        text.push_str(": ");
        text.push_str(&e.to_string());
        current = e.source();
    }
    text
}
