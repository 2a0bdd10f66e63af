//! `[server] scheduler = "thread-per-core"`: one single-threaded runtime per
//! proxy thread, each accepting on its own `SO_REUSEPORT` listener on the
//! same address (the kernel spreads new connections over them), as nginx
//! and pingora run.
//!
//! Why: in the work-stealing runtime a task woken during its own poll (the
//! metered path reads the request body inside hyper's service call) is
//! handed to an idle worker, which costs futex wake-ups and a core switch
//! per request at low concurrency. Here a connection, its request, the
//! upstream connection it uses (each thread has its own client pool, see
//! [`thread_index`]) and any background read-on it leaves all stay on one
//! thread. Measured on the 2-core test machine (bench/README.md, "Issue 17,
//! step 2"): about 4% fewer instructions per request, but later answers
//! at concurrency 1, where work stealing overlaps the two sides of a
//! request on two cores; so it is not the default.
//!
//! Shutdown: each thread drains its listener as [`serve`] does, then keeps
//! its runtime running until [`PerCore::release`], so tasks it still owns
//! (reading on for usage after a client left) can finish their settles.

use std::cell::Cell;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{serve, BoxError, Drained, ServeOptions};

/// Pending connections the kernel queues per listener (tokio's default).
const LISTEN_BACKLOG: i32 = 1024;

thread_local! {
    static THREAD_INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Which proxy thread this is: 0 ..= threads - 1 on a per-core thread, 0
/// anywhere else. Per-thread state (the upstream client pools) is indexed
/// by it.
pub fn thread_index() -> usize {
    THREAD_INDEX.with(Cell::get)
}

/// `threads` listeners on `addr`, all bound with `SO_REUSEPORT` to the
/// same port (the first one's, when `addr` asks for port 0). Bound here,
/// before any thread starts, so a taken address fails start-up.
pub fn bind(addr: SocketAddr, threads: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut bound = addr;
    let mut listeners = Vec::with_capacity(threads);
    for _ in 0..threads.max(1) {
        let socket = Socket::new(Domain::for_address(bound), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&bound.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        let listener = std::net::TcpListener::from(socket);
        bound = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// The proxy threads, serving until shutdown.
pub struct PerCore {
    drained: Vec<oneshot::Receiver<Drained>>,
    release: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Start one thread per listener, each serving `handler` on its own
/// current-thread runtime; `options.max_connections` is shared out among
/// them.
pub fn start<H, F, B>(
    listeners: Vec<std::net::TcpListener>,
    options: ServeOptions,
    shutdown: CancellationToken,
    handler: H,
) -> std::io::Result<PerCore>
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Response<B>, std::convert::Infallible>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let count = listeners.len().max(1);
    let options = ServeOptions { max_connections: (options.max_connections / count).max(1), ..options };
    let release = CancellationToken::new();
    let mut per_core = PerCore { drained: Vec::new(), release: release.clone(), threads: Vec::new() };
    for (index, listener) in listeners.into_iter().enumerate() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (sent, drained) = oneshot::channel();
        let (options, stop, handler, release) =
            (options.clone(), shutdown.clone(), handler.clone(), release.clone());
        let thread = std::thread::Builder::new().name(format!("creditgate-proxy-{index}")).spawn(move || {
            THREAD_INDEX.with(|cell| cell.set(index));
            runtime.block_on(async move {
                let outcome = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, options, stop, handler).await,
                    Err(error) => {
                        tracing::error!(%error, index, "a proxy thread cannot use its listener");
                        Drained::TimedOut
                    }
                };
                let _ = sent.send(outcome);
                release.cancelled().await;
            });
        });
        match thread {
            Ok(thread) => {
                per_core.drained.push(drained);
                per_core.threads.push(thread);
            }
            Err(error) => {
                shutdown.cancel();
                per_core.release();
                return Err(error);
            }
        }
    }
    Ok(per_core)
}

impl PerCore {
    /// Waits until every thread has drained its listener (after shutdown);
    /// `All` only if every one drained within the grace period.
    pub async fn drained(&mut self) -> Drained {
        let mut all = Drained::All;
        for drained in self.drained.drain(..) {
            if drained.await.unwrap_or(Drained::TimedOut) != Drained::All {
                all = Drained::TimedOut;
            }
        }
        all
    }

    /// Lets the threads' runtimes stop (dropping any task still on them)
    /// and joins the threads.
    pub fn release(self) {
        self.release.cancel();
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}
