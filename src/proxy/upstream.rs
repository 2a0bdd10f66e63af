//! Pooled clients to the upstreams (plain HTTP and HTTPS via rustls, HTTP/1.1
//! or HTTP/2) and the mapping of their failures to gateway errors.

use std::error::Error as StdError;
use std::io;

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
use crate::config::Upstream;
use crate::server::per_core::thread_index;

/// The body sent upstream: the client's stream under a size limit, or a body
/// the gateway rebuilt (e.g. after adding `stream_options`).
pub type UpstreamBody = Either<Limited<Incoming>, Full<Bytes>>;

type HttpsClient = Client<HttpsConnector<HttpConnector>, UpstreamBody>;

/// Idle pooled connections are closed after this long.
const POOL_IDLE_TIMEOUT_SECS: u64 = 90;

/// One pooled client per upstream, so each keeps its own pool size, timeouts
/// and protocol choice; and one such set per proxy thread under
/// `thread-per-core`, so a thread never sends on a connection whose task
/// another thread runs.
pub struct UpstreamClients {
    /// `[thread][upstream]`; one thread's set under work-stealing.
    clients: Vec<Vec<HttpsClient>>,
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
    ) -> Result<ResponseFuture, ProxyError> {
        let thread = self.clients.get(thread_index()).or_else(|| self.clients.first());
        let Some(client) = thread.and_then(|clients| clients.get(index)) else {
            return Err(ProxyError::UpstreamFailed {
                upstream: upstream.name.clone(),
                reason: "no client configured".to_owned(),
            });
        };
        Ok(client.request(request))
    }
}

fn build_client(upstream: &Upstream) -> HttpsClient {
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
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(std::time::Duration::from_secs(POOL_IDLE_TIMEOUT_SECS))
        .pool_max_idle_per_host(upstream.pool_max_idle_per_host)
        .http2_only(upstream.http2_prior_knowledge)
        .build(connector)
}

/// The upstream URI for a client request: the upstream's base URL with the
/// request's path and query appended.
pub fn upstream_uri(upstream: &Upstream, client_uri: &Uri) -> Result<Uri, http::Error> {
    let path_and_query = client_uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let path_and_query = if upstream.base_path.is_empty() {
        PathAndQuery::try_from(path_and_query)?
    } else {
        PathAndQuery::try_from(format!("{}{path_and_query}", upstream.base_path))?
    };
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

pub fn classify(
    error: &hyper_util::client::legacy::Error,
    upstream: &Upstream,
    max_body_bytes: u64,
) -> ProxyError {
    let name = upstream.name.clone();
    if find_source::<http_body_util::LengthLimitError>(error).is_some() {
        return ProxyError::BodyTooLarge { limit_bytes: max_body_bytes };
    }
    let timed_out = find_source::<io::Error>(error).is_some_and(|e| e.kind() == io::ErrorKind::TimedOut);
    if error.is_connect() && timed_out {
        return ProxyError::UpstreamConnectTimeout { upstream: name, timeout: upstream.connect_timeout };
    }
    let reason = error_chain(error);
    if error.is_connect() {
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
