//! `creditgate-bare-proxy`: the minimal reverse proxy a user would otherwise
//! run in front of one upstream, and the reference row of the load harness
//! and of `bench/profile/callgrind.sh` (issue 17): every other mode is
//! reported as a ratio to it.
//!
//! It is meant to be a fair baseline, not a strawman: a hyper 1.x HTTP/1.1
//! server with keep-alive, the hyper-util client with a keep-alive pool to
//! the upstream, TCP_NODELAY on both sides, and method, path, headers and
//! body forwarded untouched and streamed both ways (nothing buffered,
//! nothing parsed). It meters nothing and logs nothing per request.
//!
//! ```sh
//! creditgate-bare-proxy --listen 127.0.0.1:0 --upstream 127.0.0.1:8090 --workers 1
//! ```
//! prints `listening on ADDR` on stderr once it accepts connections.
//!
//! With `--floor auth|meter` it is instead the floor under the pass-through
//! or the metered route: the least work those routes must add (`floor`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use std::path::PathBuf;

use bytes::Bytes;
use clap::Parser;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

#[path = "bare_proxy/floor.rs"]
mod floor;

/// Pause after a failed accept (out of file descriptors, say), so the loop
/// does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

#[derive(Parser, Debug)]
#[command(
    name = "creditgate-bare-proxy",
    about = "A minimal hyper reverse proxy to one upstream (benchmark baseline)"
)]
struct Args {
    /// Address to listen on; port 0 picks one (printed on stderr).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The one upstream, `host:port`, spoken to in plain HTTP/1.1.
    #[arg(long)]
    upstream: Authority,
    /// Tokio worker threads (1: one core, as issue 17's table measured each proxy).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Idle keep-alive connections kept to the upstream.
    #[arg(long, default_value_t = 1024)]
    pool_max_idle: usize,
    /// Be the floor under a gateway route instead of a bare proxy.
    #[arg(long, value_enum, requires = "keys")]
    floor: Option<floor::Kind>,
    /// The floor's API keys, one secret per line; each pays from a wallet of its own.
    #[arg(long)]
    keys: Option<PathBuf>,
    /// The models the metering floor prices (comma-separated); others get 400.
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// The metering floor's sled directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// A response body: the upstream's, streamed, or empty for our own errors.
type Body = Either<Incoming, Empty<Bytes>>;

struct Proxy {
    client: Client<HttpConnector, Incoming>,
    upstream: Authority,
}

impl Proxy {
    /// One request: the same request to the upstream, its response back.
    /// The only rewrite is the URI's scheme and authority, which the client
    /// needs to pick the pooled connection; `Host` stays the client's.
    async fn forward(self: Arc<Self>, request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let (mut parts, body) = request.into_parts();
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.upstream.clone());
        uri.path_and_query.get_or_insert(PathAndQuery::from_static("/"));
        parts.uri = match Uri::from_parts(uri) {
            Ok(uri) => uri,
            Err(_) => return Ok(status(StatusCode::BAD_REQUEST)),
        };
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(response) => Ok(response.map(Either::Left)),
            Err(_) => Ok(status(StatusCode::BAD_GATEWAY)),
        }
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(Either::Right(Empty::new()));
    *response.status_mut() = code;
    response
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!("listening on {}", listener.local_addr()?);
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let mut builder = Client::builder(TokioExecutor::new());
    builder.pool_timer(TokioTimer::new()).pool_max_idle_per_host(args.pool_max_idle);
    let client = builder.build(connector);
    let floor = match (args.floor, &args.keys) {
        (Some(kind), Some(keys_file)) => Some(Arc::new(floor::Floor::new(floor::Options {
            kind,
            keys_file,
            models: &args.models,
            data_dir: args.data_dir.as_deref(),
            upstream: args.upstream.clone(),
            pool: Arc::new(creditgate::proxy::PlainPool::new(
                &args.upstream,
                std::time::Duration::from_secs(2),
                args.pool_max_idle,
            )),
        })?)),
        _ => None,
    };
    let proxy = Arc::new(Proxy { client, upstream: args.upstream });
    // Keep-alive is hyper's default; the timer drives its header read timeout.
    let mut connections = http1::Builder::new();
    connections.timer(TokioTimer::new());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Small responses and stream events leave at once, as the gateway's do.
        let _ = stream.set_nodelay(true);
        let connection = connections.clone();
        let io = TokioIo::new(stream);
        if let Some(floor) = &floor {
            let floor = floor.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| floor.clone().handle(request));
                let _ = connection.serve_connection(io, service).await;
            });
            continue;
        }
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| proxy.clone().forward(request));
            let _ = connection.serve_connection(io, service).await;
        });
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("creditgate-bare-proxy: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // The accept loop runs on a worker too, so `--workers 1` is one busy thread.
    match runtime.block_on(async { tokio::spawn(serve(args)).await }) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(error)) => {
            eprintln!("creditgate-bare-proxy: {error:#}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("creditgate-bare-proxy: {error}");
            ExitCode::FAILURE
        }
    }
}
