//! The accept loop shared by every listener (proxy, admin, mock upstream):
//! HTTP/1.1 and h2c on one port, a bound on open connections, a header-read
//! timeout, and graceful shutdown that lets in-flight requests finish.
//!
//! Silent clients cannot hold the listener: a connection with no request in
//! flight is closed once it has been idle too long (the header-read timeout
//! before its first request, which also bounds protocol detection; the
//! keep-alive idle timeout after), and when every connection slot is taken,
//! a new client takes the slot of the connection idle the longest.
//!
//! Nor can clients that stop reading: a connection with a response that has
//! been waiting for its client to take the next part (an h2 flow window left
//! at zero), or whose socket has refused every write (a full socket: also
//! responses to pipelined requests, which hyper queues before their bodies
//! are ever polled), for `client_stall_timeout` is closed. Each request is
//! timed on its own: on h2, the other streams of a connection neither hide
//! a stuck one nor share its fate (the connection drains, and closes once
//! only stuck streams are left).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub mod per_core;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Pause after a failed accept (e.g. out of file descriptors) before retrying,
/// so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// A connection with no request in flight is closed after this long idle
/// (HTTP/1.1 keep-alive and h2 alike).
const KEEP_ALIVE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most often idle connections are looked for; also the resolution of the
/// idle timeouts.
const IDLE_SWEEP_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Name for logs: "proxy", "admin", "mock".
    pub name: &'static str,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// How long in-flight requests may run after shutdown is signalled.
    pub shutdown_grace: Duration,
    /// A request in flight this long closes its connection (an h2 one
    /// drains first, and closes once only stuck streams are left), whether
    /// or not its client still reads: a response body is only polled (and
    /// its own deadline checked) while the client reads.
    pub max_request_duration: Option<Duration>,
    /// A response that waited this long for its client to take its next
    /// part closes its connection (a client that stopped reading; an h2
    /// connection drains first).
    pub client_stall_timeout: Duration,
    /// Streams one h2 connection may have open at once.
    pub http2_max_concurrent_streams: u32,
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
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(options.header_read_timeout);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(options.http2_max_concurrent_streams);
    let permits = Arc::new(Semaphore::new(options.max_connections));
    let open = Arc::new(OpenConnections::default());
    let sweep = open.clone().close_idle(
        options.header_read_timeout,
        options.max_request_duration,
        options.client_stall_timeout,
        shutdown.clone(),
    );
    tokio::spawn(sweep);
    // Owned so that shutdown can cut what outlives the grace period and wait
    // for it: a request's settle runs when its connection is dropped.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
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
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Full: the connection idle the longest makes room, if any
                // is idle; otherwise wait for one to end.
                if open.close_longest_idle() {
                    tracing::debug!(
                        listener = options.name,
                        "closed the longest-idle connection to admit a new one"
                    );
                }
                tokio::select! {
                    permit = permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                    () = shutdown.cancelled() => break,
                }
            }
        };
        // Small writes (SSE events) must leave at once, not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let tracked = open.add();
        let service = {
            let tracked = tracked.clone();
            service_fn(move |request| {
                let busy = Busy::start(&tracked, request.version());
                // Called inside the block: a future made outside and awaited
                // inside is stored twice over in the block's state, and that
                // state is copied whole every time the block is moved.
                let handler = handler.clone();
                async move {
                    let response = handler(request, peer).await?;
                    // In flight until the body is dropped: sent or abandoned.
                    Ok::<_, Infallible>(response.map(|body| ClientPaced::new(body, busy)))
                }
            })
        };
        let io = WriteWatched { io: TokioIo::new(stream), tracked: tracked.clone() };
        let connection = builder.serve_connection(io, service).into_owned();
        let name = options.name;
        let open = open.clone();
        connections.spawn(async move {
            let mut connection = pin!(connection);
            let mut draining = false;
            // The listener's word is read at every poll: one atomic load,
            // where a select over a shutdown watch and a close token polled
            // two more futures (and took two locks) at every wake.
            let ended = std::future::poll_fn(|cx| {
                tracked.signal.waker.register(cx.waker());
                match tracked.signal.state.load(Ordering::Acquire) {
                    Signal::CLOSE => return Poll::Ready(None),
                    Signal::DRAIN if !draining => {
                        draining = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    _ => {}
                }
                connection.as_mut().poll(cx).map(Some)
            })
            .await;
            match ended {
                Some(Err(error)) => {
                    tracing::debug!(listener = name, %peer, error = %error, "connection ended with an error");
                }
                None => tracing::debug!(listener = name, %peer, "closed an idle connection"),
                Some(Ok(())) => {}
            }
            open.remove(tracked.id);
            drop(permit);
        });
    }
    drop(listener);
    // Each connection finishes the request it is serving and closes.
    open.drain_all();
    let all_closed = async { while connections.join_next().await.is_some() {} };
    let drained = match tokio::time::timeout(options.shutdown_grace, all_closed).await {
        Ok(()) => Drained::All,
        Err(_) => {
            tracing::warn!(
                listener = options.name,
                "shutdown grace period ran out; cutting open connections"
            );
            connections.abort_all();
            Drained::TimedOut
        }
    };
    // Every connection task has ended (and so every request has settled)
    // before the caller goes on to close the store.
    while connections.join_next().await.is_some() {}
    drained
}

/// The open connections of one listener, for closing idle ones.
#[derive(Default)]
struct OpenConnections {
    next_id: AtomicU64,
    connections: Mutex<HashMap<u64, Arc<Tracked>>>,
    /// Milliseconds since the sweep began, set at each sweep: what response
    /// bodies read instead of the system clock on every part.
    clock_ms: Arc<AtomicU64>,
}

/// One open connection.
struct Tracked {
    id: u64,
    /// Requests whose response has not been sent (or dropped) yet.
    in_flight: AtomicUsize,
    /// Each of them, for its own age and stall: on h2 one connection carries
    /// many, and neither a sibling's start nor its progress may hide one
    /// that has run too long or that its client stopped reading.
    requests: Mutex<Vec<Arc<InFlight>>>,
    /// Whether a request ever started on it.
    served: AtomicBool,
    /// It carries HTTP/2: a stuck stream first drains it (GOAWAY: the
    /// other streams run on), and closes it once every stream left is stuck.
    multiplexed: AtomicBool,
    /// The sweep asked it to drain for a stuck stream.
    drained_for_stuck: AtomicBool,
    /// When it last started or finished a request (or was accepted).
    last_active: Mutex<Instant>,
    /// When (on the listener's clock) the socket last refused a write that
    /// has not gone through since; [`NOT_BLOCKED`] while writes go through.
    write_blocked_at: AtomicU64,
    /// The listener's coarse clock ([`OpenConnections::clock_ms`]).
    clock_ms: Arc<AtomicU64>,
    /// What the listener asks of it: to drain (shutdown) or to close.
    signal: Signal,
}

/// The listener's word to one connection's task, which reads it whenever it
/// is polled and registers its waker so that raising it wakes the task.
#[derive(Default)]
struct Signal {
    state: AtomicU8,
    waker: AtomicWaker,
}

impl Signal {
    /// Finish the request in flight, then close.
    const DRAIN: u8 = 1;
    /// Close now.
    const CLOSE: u8 = 2;

    fn raise(&self, to: u8) {
        self.state.fetch_max(to, Ordering::AcqRel);
        self.waker.wake();
    }

    fn closing(&self) -> bool {
        self.state.load(Ordering::Acquire) >= Signal::CLOSE
    }
}

/// One request in flight: when it started, and since when (on the
/// listener's clock) its response has waited for the client to take its
/// next part ([`NOT_OWED`] while it waits on nothing but its own source).
struct InFlight {
    started: Instant,
    owed_since: AtomicU64,
}

/// [`InFlight::owed_since`] while nothing is owed.
const NOT_OWED: u64 = u64::MAX;

impl Tracked {
    /// How long it has been idle; `None` while a request is in flight.
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(now.saturating_duration_since(*self.last_active.lock()))
    }
}

/// A request in flight on a connection, from its head to its body's end.
struct Busy {
    tracked: Arc<Tracked>,
    request: Arc<InFlight>,
}

impl Busy {
    fn start(tracked: &Arc<Tracked>, version: http::Version) -> Busy {
        tracked.served.store(true, Ordering::Relaxed);
        if version == http::Version::HTTP_2 {
            tracked.multiplexed.store(true, Ordering::Relaxed);
        }
        let now = Instant::now();
        let request = Arc::new(InFlight { started: now, owed_since: AtomicU64::new(NOT_OWED) });
        tracked.requests.lock().push(request.clone());
        tracked.in_flight.fetch_add(1, Ordering::AcqRel);
        *tracked.last_active.lock() = now;
        Busy { tracked: tracked.clone(), request }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.tracked.last_active.lock() = Instant::now();
        let mut requests = self.tracked.requests.lock();
        if let Some(at) = requests.iter().position(|request| Arc::ptr_eq(request, &self.request)) {
            requests.swap_remove(at);
        }
        drop(requests);
        self.tracked.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl OpenConnections {
    fn add(&self) -> Arc<Tracked> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let tracked = Arc::new(Tracked {
            id,
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
            multiplexed: AtomicBool::new(false),
            drained_for_stuck: AtomicBool::new(false),
            last_active: Mutex::new(Instant::now()),
            write_blocked_at: AtomicU64::new(NOT_BLOCKED),
            clock_ms: self.clock_ms.clone(),
            signal: Signal::default(),
        });
        self.connections.lock().insert(id, tracked.clone());
        tracked
    }

    fn remove(&self, id: u64) {
        self.connections.lock().remove(&id);
    }

    /// Asks every open connection to finish what it serves and close.
    fn drain_all(&self) {
        for tracked in self.connections.lock().values() {
            tracked.signal.raise(Signal::DRAIN);
        }
    }

    /// Closes the connection idle the longest; false when none is idle.
    fn close_longest_idle(&self) -> bool {
        let now = Instant::now();
        let connections = self.connections.lock();
        let longest = connections
            .values()
            .filter(|tracked| !tracked.signal.closing())
            .filter_map(|tracked| tracked.idle_for(now).map(|idle| (idle, tracked)))
            .max_by_key(|(idle, _)| *idle);
        match longest {
            Some((_, tracked)) => {
                tracked.signal.raise(Signal::CLOSE);
                true
            }
            None => false,
        }
    }

    /// Closes connections idle past their limit until shutdown: the
    /// header-read timeout before a first request (a client that never
    /// completes one, or never gets through protocol detection), the
    /// keep-alive idle timeout after.
    async fn close_idle(
        self: Arc<Self>,
        header_read_timeout: Duration,
        max_busy: Option<Duration>,
        stall: Duration,
        shutdown: CancellationToken,
    ) {
        let shortest = max_busy.map_or(header_read_timeout, |busy| busy.min(header_read_timeout)).min(stall);
        let interval = IDLE_SWEEP_INTERVAL.min(shortest.max(Duration::from_millis(10)));
        let began = Instant::now();
        // Both waits are stamped with the clock of the sweep before they
        // began, up to one interval early: one interval more is allowed, so
        // a socket full for a moment at a sweep is never taken for a stall.
        let stall_ms = u64::try_from((stall + interval).as_millis()).unwrap_or(u64::MAX);
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shutdown.cancelled() => return,
            }
            let now = Instant::now();
            let now_ms = u64::try_from(now.saturating_duration_since(began).as_millis()).unwrap_or(u64::MAX);
            self.clock_ms.store(now_ms, Ordering::Relaxed);
            for tracked in self.connections.lock().values() {
                let blocked_at = tracked.write_blocked_at.load(Ordering::Acquire);
                let socket_stalled =
                    blocked_at != NOT_BLOCKED && now_ms.saturating_sub(blocked_at) >= stall_ms;
                // A request is stuck when its client stopped taking its
                // response, or it has run past its limit.
                let (any_stuck, all_stuck) = {
                    let requests = tracked.requests.lock();
                    let stuck = |request: &Arc<InFlight>| {
                        let since = request.owed_since.load(Ordering::Acquire);
                        (since != NOT_OWED && now_ms.saturating_sub(since) >= stall_ms)
                            || max_busy
                                .is_some_and(|max| now.saturating_duration_since(request.started) >= max)
                    };
                    (requests.iter().any(stuck), requests.iter().all(stuck))
                };
                if socket_stalled || any_stuck {
                    tracked.stuck(socket_stalled, all_stuck);
                    continue;
                }
                let limit = if tracked.served.load(Ordering::Relaxed) {
                    KEEP_ALIVE_IDLE_TIMEOUT
                } else {
                    header_read_timeout
                };
                if tracked.idle_for(now).is_some_and(|idle| idle >= limit) {
                    tracked.signal.raise(Signal::CLOSE);
                }
            }
        }
    }
}

impl Tracked {
    /// A request on it has run past its limit, or its client stopped taking
    /// a response. HTTP/1.1 carries one request at a time: the connection
    /// closes. An h2 connection first drains (GOAWAY: new streams go to a
    /// new connection, the others run on) and closes once every stream left
    /// on it is stuck, at the latest when the others reach their own limit;
    /// a socket that takes no writes at all closes at once.
    fn stuck(&self, socket_stalled: bool, all_stuck: bool) {
        if socket_stalled || all_stuck || !self.multiplexed.load(Ordering::Relaxed) {
            tracing::debug!(
                "closed a connection whose client stopped reading, or whose request ran too long"
            );
            self.signal.raise(Signal::CLOSE);
        } else if !self.drained_for_stuck.swap(true, Ordering::AcqRel) {
            tracing::debug!("draining an h2 connection with a stream stuck");
            self.signal.raise(Signal::DRAIN);
        }
    }
}

/// A response body on its way to the client. Between the moment it has a
/// part ready (the response head, then each part it yields) and the moment
/// the connection asks for the next, it is owed to the client: a client
/// that stops reading (a full socket, an h2 window at zero) keeps it owed,
/// and the sweep closes the connection after `client_stall_timeout`. A body
/// waiting on its own source (an upstream that has not answered yet) owes
/// nothing. Holds the request's [`Busy`] until it is dropped.
struct ClientPaced<B> {
    body: B,
    busy: Busy,
    owing: bool,
}

impl<B> ClientPaced<B> {
    fn new(body: B, busy: Busy) -> ClientPaced<B> {
        let mut paced = ClientPaced { body, busy, owing: false };
        paced.owe();
        paced
    }

    fn owe(&mut self) {
        let now_ms = self.busy.tracked.clock_ms.load(Ordering::Relaxed);
        self.busy.request.owed_since.store(now_ms, Ordering::Release);
        self.owing = true;
    }

    fn paid(&mut self) {
        if std::mem::take(&mut self.owing) {
            self.busy.request.owed_since.store(NOT_OWED, Ordering::Release);
        }
    }
}

impl<B> Drop for ClientPaced<B> {
    fn drop(&mut self) {
        self.paid();
    }
}

impl<B: http_body::Body<Data = Bytes> + Unpin> http_body::Body for ClientPaced<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        // Asked for the next part: the client took the last one.
        self.paid();
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self.owe();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    // Kept, so a known length is still sent as content-length.
    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// [`Tracked::write_blocked_at`] while the socket takes writes.
const NOT_BLOCKED: u64 = u64::MAX;

/// A connection's socket, watched for writes it refuses. A response body
/// that is never polled cannot say its client stopped reading: hyper reads
/// pipelined requests and runs their handlers while an earlier response
/// still waits in its write buffer, and it polls none of them until that
/// buffer drains. So the sweep also closes a connection whose socket has
/// refused writes for `client_stall_timeout`.
struct WriteWatched<I> {
    io: I,
    tracked: Arc<Tracked>,
}

impl<I> WriteWatched<I> {
    fn note<T>(&self, result: &Poll<T>) {
        let blocked_at = &self.tracked.write_blocked_at;
        match result {
            Poll::Pending => {
                if blocked_at.load(Ordering::Relaxed) == NOT_BLOCKED {
                    blocked_at.store(self.tracked.clock_ms.load(Ordering::Relaxed), Ordering::Release);
                }
            }
            Poll::Ready(_) => {
                if blocked_at.load(Ordering::Relaxed) != NOT_BLOCKED {
                    blocked_at.store(NOT_BLOCKED, Ordering::Release);
                }
            }
        }
    }
}

impl<I: hyper::rt::Read + Unpin> hyper::rt::Read for WriteWatched<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: hyper::rt::Write + Unpin> hyper::rt::Write for WriteWatched<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.note(&result);
        result
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        let result = std::pin::Pin::new(&mut self.io).poll_flush(cx);
        self.note(&result);
        result
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Puts the calling thread under the idle scheduling policy, so background
/// work (reports, the ledger historian) only takes CPU the proxy leaves.
/// Failing to is harmless: the work still runs, at normal priority.
pub fn idle_priority(what: &str) {
    use thread_priority::{NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy};
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    let thread = thread_priority::thread_native_id();
    if let Err(error) = thread_priority::set_thread_priority_and_policy(thread, ThreadPriority::Min, idle) {
        tracing::debug!(?error, what, "a background thread keeps its normal priority");
    }
}
