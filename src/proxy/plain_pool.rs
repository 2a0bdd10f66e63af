//! Our own pool of plain-HTTP/1.1 connections to one upstream.
//!
//! Why not hyper-util's legacy client, which HTTPS and HTTP/2 upstreams keep
//! (ALPN, multiplexing): per request it hashes its pool key with SipHash
//! twice, boxes a checkout future and spawns a task that puts the connection
//! back once it is ready again (bench/README.md, issue 17 step 12). Here a
//! connection stays on its list while it serves a call and is used again
//! once its response head came and hyper says it is ready, which is what
//! that task waits for. The list is scanned from the most recently used end
//! under a lock that no await is made under; busy connections are passed
//! over, so a call scans about as many as are in flight.
//!
//! What the legacy client does that this keeps: a call that a reused
//! connection never sent (it closed between the check and the send) is sent
//! again on another, one that was sent is not (the upstream may bill it);
//! a task closes connections idle past the idle timeout, and those beyond the
//! count kept idle, checking every second; a connect tries each resolved
//! address with its share of the connect timeout.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::upstream::UpstreamBody;

/// Idle connections are closed after this long (the legacy client's setting).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The idle task looks at the pool this often (or twice per idle timeout,
/// when that is shorter).
const REAP_EVERY: Duration = Duration::from_secs(1);

/// How many reused connections a call is tried on before a new one is opened
/// for it: each try that fails unsent found a connection closing.
const REUSED_TRIES: usize = 4;

/// Why a call got no response head.
#[derive(Debug)]
pub enum PlainError {
    ConnectTimeout,
    Connect(io::Error),
    /// The HTTP exchange failed (handshake, send, or the response head).
    Http(hyper::Error),
}

impl std::fmt::Display for PlainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlainError::ConnectTimeout => f.write_str("connect timed out"),
            PlainError::Connect(e) => write!(f, "connect failed: {e}"),
            PlainError::Http(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for PlainError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PlainError::ConnectTimeout => None,
            PlainError::Connect(e) => Some(e),
            PlainError::Http(e) => Some(e),
        }
    }
}

pub type HeadResult = Result<Response<Incoming>, PlainError>;

struct Pooled {
    sender: SendRequest<UpstreamBody>,
    /// Set from a send until its response head came (or the wait was
    /// dropped): till then hyper may call the connection ready while the
    /// request still waits in its queue, and a second call would queue
    /// behind the first one's whole response.
    awaiting_head: Arc<AtomicBool>,
    /// When the idle task first saw it ready since its last send.
    idle_since: Option<Instant>,
}

/// Clears a connection's `awaiting_head` when the wait for the head ends,
/// however it ends.
struct AwaitingHead(Arc<AtomicBool>);

impl Drop for AwaitingHead {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

pub struct PlainPool {
    /// Host (an IPv6 address without brackets) and port to connect to.
    host: String,
    port: u16,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    /// Least recently sent on first; busy connections stay on it.
    connections: Mutex<VecDeque<Pooled>>,
    idle_task_started: AtomicBool,
}

impl PlainPool {
    pub fn new(authority: &http::uri::Authority, connect_timeout: Duration, max_idle: usize) -> Self {
        Self::with_idle_timeout(authority, connect_timeout, max_idle, IDLE_TIMEOUT)
    }

    fn with_idle_timeout(
        authority: &http::uri::Authority,
        connect_timeout: Duration,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Self {
        let host = authority.host();
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        PlainPool {
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(80),
            connect_timeout,
            idle_timeout,
            max_idle,
            connections: Mutex::new(VecDeque::new()),
            idle_task_started: AtomicBool::new(false),
        }
    }

    /// Sends `request` (origin-form URI, `Host` set) on a ready pooled
    /// connection or a new one. The future owns what it needs, so another
    /// task can await it.
    pub fn send(
        self: &Arc<Self>,
        request: Request<UpstreamBody>,
    ) -> Pin<Box<dyn Future<Output = HeadResult> + Send>> {
        let pool = Arc::clone(self);
        Box::pin(async move {
            let mut request = request;
            for _ in 0..REUSED_TRIES {
                match pool.send_on_ready(request) {
                    Ok((sent, waiting)) => {
                        let answer = sent.await;
                        drop(waiting);
                        match answer {
                            Ok(response) => return Ok(response),
                            Err(mut unsent) => match unsent.take_message() {
                                Some(back) => request = back,
                                None => return Err(PlainError::Http(unsent.into_error())),
                            },
                        }
                    }
                    Err(back) => {
                        request = back;
                        break;
                    }
                }
            }
            pool.send_on_new(request).await
        })
    }

    /// Hands `request` to the most recently used ready connection, dropping
    /// the closed ones it passes; `Err` gives the request back when none is
    /// ready.
    #[allow(clippy::type_complexity, clippy::result_large_err)]
    fn send_on_ready(
        &self,
        request: Request<UpstreamBody>,
    ) -> Result<
        (
            impl Future<
                Output = Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<UpstreamBody>>>,
            >,
            AwaitingHead,
        ),
        Request<UpstreamBody>,
    > {
        let mut connections = self.connections.lock();
        let mut at = connections.len();
        while at > 0 {
            at -= 1;
            let candidate = &connections[at];
            if candidate.sender.is_closed() {
                connections.remove(at);
            } else if candidate.awaiting_head.load(Ordering::Acquire) {
                continue;
            } else if candidate.sender.is_ready() {
                let Some(mut chosen) = connections.remove(at) else { break };
                chosen.awaiting_head.store(true, Ordering::Release);
                let waiting = AwaitingHead(Arc::clone(&chosen.awaiting_head));
                // Hands the request to the connection's task; nothing is awaited here.
                let sent = chosen.sender.try_send_request(request);
                chosen.idle_since = None;
                connections.push_back(chosen);
                return Ok((sent, waiting));
            }
        }
        Err(request)
    }

    /// Opens a connection, sends `request` on it and pools it. A failure
    /// here is final: a new connection that fails is no stale one.
    async fn send_on_new(self: &Arc<Self>, request: Request<UpstreamBody>) -> HeadResult {
        let stream = self.connect().await?;
        // Stream chunks as soon as they are written: no Nagle delay on SSE.
        stream.set_nodelay(true).map_err(PlainError::Connect)?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(PlainError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        // A new connection takes its first request whether or not its task
        // has asked for one yet.
        let sent = sender.send_request(request);
        if self.max_idle > 0 {
            let awaiting_head = Arc::new(AtomicBool::new(true));
            let waiting = AwaitingHead(Arc::clone(&awaiting_head));
            self.connections.lock().push_back(Pooled { sender, awaiting_head, idle_since: None });
            self.start_idle_task();
            let answer = sent.await;
            drop(waiting);
            answer.map_err(PlainError::Http)
        } else {
            // Nothing kept idle: the connection closes after this call.
            sent.await.map_err(PlainError::Http)
        }
    }

    /// A TCP connection to the upstream: each address the host resolves to
    /// in turn, each with its share of what is left of the connect timeout.
    async fn connect(&self) -> Result<TcpStream, PlainError> {
        let deadline = Instant::now() + self.connect_timeout;
        let resolve = tokio::net::lookup_host((self.host.as_str(), self.port));
        let addresses: Vec<SocketAddr> = match tokio::time::timeout_at(deadline, resolve).await {
            Err(_) => return Err(PlainError::ConnectTimeout),
            Ok(Err(e)) => return Err(PlainError::Connect(e)),
            Ok(Ok(addresses)) => addresses.collect(),
        };
        let mut last =
            io::Error::new(io::ErrorKind::NotFound, format!("{} resolves to no address", self.host));
        for (tried, address) in addresses.iter().enumerate() {
            let left = addresses.len() - tried;
            let share = deadline.saturating_duration_since(Instant::now()) / u32::try_from(left).unwrap_or(1);
            match tokio::time::timeout(share, TcpStream::connect(address)).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) => last = e,
                Err(_) if left == 1 => return Err(PlainError::ConnectTimeout),
                Err(_) => {
                    last = io::Error::new(io::ErrorKind::TimedOut, format!("connect to {address} timed out"))
                }
            }
        }
        Err(PlainError::Connect(last))
    }

    /// Starts, once, the task that closes idle connections: it holds the
    /// pool weakly, so it ends with it.
    fn start_idle_task(self: &Arc<Self>) {
        if self.idle_task_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = Arc::downgrade(self);
        let every = REAP_EVERY.min(self.idle_timeout / 2).max(Duration::from_millis(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = Weak::upgrade(&pool) else { return };
                pool.close_idle(Instant::now());
            }
        });
    }

    /// Drops the closed connections, those idle past the idle timeout, and
    /// the least recently used idle ones beyond `max_idle`. Dropping a
    /// sender closes its connection.
    fn close_idle(&self, now: Instant) {
        let mut connections = self.connections.lock();
        let mut idle = 0;
        let mut at = connections.len();
        while at > 0 {
            at -= 1;
            let connection = &mut connections[at];
            if connection.sender.is_closed() {
                connections.remove(at);
                continue;
            }
            if connection.awaiting_head.load(Ordering::Acquire) || !connection.sender.is_ready() {
                continue;
            }
            let since = *connection.idle_since.get_or_insert(now);
            idle += 1;
            if idle > self.max_idle || now.saturating_duration_since(since) >= self.idle_timeout {
                connections.remove(at);
            }
        }
    }

    #[cfg(test)]
    fn pooled(&self) -> usize {
        self.connections.lock().len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Either, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// How an upstream of raw sockets treats a connection after answering.
    #[derive(Clone, Copy)]
    enum AfterAnswer {
        KeepOpen,
        /// Closes it this long after the answer, without saying so.
        CloseAfter(Duration),
    }

    struct RawUpstream {
        authority: http::uri::Authority,
        accepted: Arc<AtomicUsize>,
        open: Arc<AtomicUsize>,
        answered: Arc<AtomicUsize>,
    }

    /// An HTTP/1.1 upstream on raw sockets, so the test sees every
    /// connection: it answers each request `hello` after `delay`.
    async fn raw_upstream(after: AfterAnswer, delay: Duration) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let (counted, still_open, answers) =
            (Arc::clone(&accepted), Arc::clone(&open), Arc::clone(&answered));
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                still_open.fetch_add(1, Ordering::SeqCst);
                let (still_open, answers) = (Arc::clone(&still_open), Arc::clone(&answers));
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        // Requests here have no body: one ends at its blank line.
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            tokio::time::sleep(delay).await;
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
                            if socket.write_all(answer).await.is_err() {
                                break;
                            }
                            answers.fetch_add(1, Ordering::SeqCst);
                            if let AfterAnswer::CloseAfter(after) = after {
                                tokio::time::sleep(after).await;
                                still_open.fetch_sub(1, Ordering::SeqCst);
                                return;
                            }
                        }
                    }
                    still_open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        RawUpstream { authority, accepted, open, answered }
    }

    /// Waits until `done` holds, for at most 5 s; whether it came to hold.
    async fn eventually(mut done: impl FnMut() -> bool) -> bool {
        let waited = Instant::now();
        while !done() {
            if waited.elapsed() > Duration::from_secs(5) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    fn request(upstream: &RawUpstream) -> Request<UpstreamBody> {
        get(upstream.authority.as_str())
    }

    fn get(host: &str) -> Request<UpstreamBody> {
        Request::builder()
            .uri("/v1/models")
            .header(http::header::HOST, host)
            .body(Either::Right(Full::new(Bytes::new())))
            .unwrap()
    }

    async fn call(pool: &Arc<PlainPool>, upstream: &RawUpstream) -> Bytes {
        let response = pool.send(request(upstream)).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap().to_bytes()
    }

    fn pool_for(upstream: &RawUpstream, max_idle: usize) -> Arc<PlainPool> {
        Arc::new(PlainPool::new(&upstream.authority, Duration::from_secs(2), max_idle))
    }

    #[tokio::test]
    async fn calls_one_after_another_share_one_connection() {
        let upstream = raw_upstream(AfterAnswer::KeepOpen, Duration::ZERO).await;
        let pool = pool_for(&upstream, 8);
        for _ in 0..20 {
            assert_eq!(call(&pool, &upstream).await, "hello");
        }
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_costs_no_call() {
        let upstream = raw_upstream(AfterAnswer::CloseAfter(Duration::from_millis(10)), Duration::ZERO).await;
        let pool = pool_for(&upstream, 8);
        for _ in 0..5 {
            assert_eq!(call(&pool, &upstream).await, "hello");
            // The upstream closes it; the pool sees it closed.
            let closed = || pool.connections.lock().iter().all(|c| c.sender.is_closed());
            assert!(eventually(|| upstream.open.load(Ordering::SeqCst) == 0 && closed()).await);
        }
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 5);
        assert!(pool.pooled() <= 1, "closed connections are dropped: {} pooled", pool.pooled());
    }

    #[tokio::test]
    async fn calls_at_once_get_a_connection_each_and_only_max_idle_stay_open() {
        let upstream = raw_upstream(AfterAnswer::KeepOpen, Duration::from_millis(100)).await;
        let pool = pool_for(&upstream, 2);
        let calls: Vec<_> = (0..6)
            .map(|_| {
                let (pool, request) = (Arc::clone(&pool), request(&upstream));
                tokio::spawn(async move { pool.send(request).await.unwrap().into_body().collect().await })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap().to_bytes(), "hello");
        }
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 6, "one connection per call in flight");
        assert_eq!(call(&pool, &upstream).await, "hello");
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 6, "a later call reuses one");
        assert!(eventually(|| upstream.open.load(Ordering::SeqCst) <= 2).await);
        assert_eq!(upstream.open.load(Ordering::SeqCst), 2, "connections beyond max_idle are closed");
    }

    #[tokio::test]
    async fn connections_idle_past_the_timeout_are_closed_and_replaced() {
        let upstream = raw_upstream(AfterAnswer::KeepOpen, Duration::ZERO).await;
        let pool = Arc::new(PlainPool::with_idle_timeout(
            &upstream.authority,
            Duration::from_secs(2),
            8,
            Duration::from_millis(50),
        ));
        assert_eq!(call(&pool, &upstream).await, "hello");
        assert!(eventually(|| pool.pooled() == 0).await, "the idle connection was dropped");
        assert!(eventually(|| upstream.open.load(Ordering::SeqCst) == 0).await, "and closed");
        assert_eq!(call(&pool, &upstream).await, "hello");
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 2, "the idle connection was not reused");
    }

    #[tokio::test]
    async fn a_call_its_connection_never_sent_goes_out_on_a_new_one_and_reaches_the_upstream_once() {
        let upstream = raw_upstream(AfterAnswer::KeepOpen, Duration::ZERO).await;
        let pool = pool_for(&upstream, 8);
        // A pooled connection whose task asks for a request once and is then
        // gone (as when a connection closes between the check and the send).
        let stream = TcpStream::connect(upstream.authority.as_str()).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        let mut connection = Box::pin(connection);
        std::future::poll_fn(|cx| {
            let _ = connection.as_mut().poll(cx);
            std::task::Poll::Ready(())
        })
        .await;
        assert!(sender.is_ready());
        let awaiting_head = Arc::new(AtomicBool::new(false));
        pool.connections.lock().push_back(Pooled {
            sender,
            awaiting_head: Arc::clone(&awaiting_head),
            idle_since: None,
        });
        let call = tokio::spawn({
            let (pool, request) = (Arc::clone(&pool), request(&upstream));
            async move { pool.send(request).await }
        });
        assert!(
            eventually(|| awaiting_head.load(Ordering::Acquire)).await,
            "the call took the pooled connection"
        );
        drop(connection);
        let response = call.await.unwrap().expect("sent again on a new connection");
        assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "hello");
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(upstream.answered.load(Ordering::SeqCst), 1, "the call reached the upstream once");
    }

    #[tokio::test]
    async fn with_nothing_kept_idle_each_call_has_a_connection_of_its_own() {
        let upstream = raw_upstream(AfterAnswer::KeepOpen, Duration::ZERO).await;
        let pool = pool_for(&upstream, 0);
        for _ in 0..3 {
            assert_eq!(call(&pool, &upstream).await, "hello");
        }
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 3);
        assert_eq!(pool.pooled(), 0);
    }

    #[tokio::test]
    async fn a_connect_the_upstream_never_answers_times_out() {
        // A listener that never accepts, its queue filled: the kernel drops
        // further SYNs, so a connect waits.
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        socket.listen(0).unwrap();
        let address = socket.local_addr().unwrap().as_socket().unwrap();
        let mut queued = Vec::new();
        while let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(address)).await
        {
            queued.push(stream);
            assert!(queued.len() < 64, "the listen queue never filled");
        }
        let pool =
            Arc::new(PlainPool::new(&address.to_string().parse().unwrap(), Duration::from_millis(300), 8));
        let request = get("x");
        let started = Instant::now();
        assert!(matches!(pool.send(request).await, Err(PlainError::ConnectTimeout)));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        drop(listener);
        let pool = Arc::new(PlainPool::new(&authority, Duration::from_secs(2), 8));
        let request = get("x");
        assert!(matches!(pool.send(request).await, Err(PlainError::Connect(_))));
    }
}
