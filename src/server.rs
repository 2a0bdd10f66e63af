//! The accept loop shared by every listener (proxy, admin, mock upstream):
//! HTTP/1.1 and h2c on one port, a bound on open connections, a header-read
//! timeout, and graceful shutdown that lets in-flight requests finish.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Pause after a failed accept (e.g. out of file descriptors) before retrying,
/// so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Name for logs: "proxy", "admin", "mock".
    pub name: &'static str,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// How long in-flight requests may run after shutdown is signalled.
    pub shutdown_grace: Duration,
}

/// How a listener stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every connection finished within the grace period.
    All,
    /// The grace period ran out with connections still open; they were cut.
    TimedOut,
}

/// Serve `handler` on `listener` until `shutdown` is cancelled, then stop
/// accepting and wait up to the grace period for open requests to finish.
pub async fn serve<H, F, B>(
    listener: TcpListener,
    options: ServeOptions,
    shutdown: CancellationToken,
    handler: H,
) -> Drained
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(options.header_read_timeout);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(options.max_connections));
    // Owned so that shutdown can cut what outlives the grace period and wait
    // for it: a request's settle runs when its connection is dropped.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(listener = options.name, %error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Small writes (SSE events) must leave at once, not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |request| handler(request, peer));
        let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        let connection = graceful.watch(connection);
        let name = options.name;
        connections.spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(listener = name, %peer, error = %error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let drained = tokio::select! {
        () = graceful.shutdown() => Drained::All,
        () = tokio::time::sleep(options.shutdown_grace) => {
            tracing::warn!(listener = options.name, "shutdown grace period ran out; cutting open connections");
            connections.abort_all();
            Drained::TimedOut
        }
    };
    // Every connection task has ended (and so every request has settled)
    // before the caller goes on to close the store.
    while connections.join_next().await.is_some() {}
    drained
}
