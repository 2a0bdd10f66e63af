//! Slow and silent clients: thousands of sockets that never send a request
//! do not stop the listener serving a fresh client.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{config_text, logged_addresses, serve_command};

/// Idle sockets opened against the proxy listener (the default connection
/// limit is 10,000, so these alone fill every slot).
const IDLE_SOCKETS: usize = 10_000;

/// The soft limit on open files of this process, from /proc.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Status code of one `GET path` on a fresh connection, within `deadline`.
fn get_within(addr: &str, path: &str, deadline: Duration) -> Result<u16, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(deadline)).map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut head = [0_u8; 12];
    stream.read_exact(&mut head).map_err(|e| format!("no answer: {e}"))?;
    String::from_utf8_lossy(&head[9..12]).parse().map_err(|_| "not HTTP".to_owned())
}

#[test]
fn ten_thousand_idle_sockets_do_not_stop_a_fresh_client_being_served() {
    // Proves a full listener admits a new client by closing the connection
    // idle the longest: with 10,000 silent sockets holding every slot, a
    // fresh request on the proxy is answered within 1 s, and the admin
    // listener keeps answering too. (Before, the fresh client waited for a
    // silent one to time out: the header-read timeout, 10 s by default.)
    let limit = open_files_limit().unwrap_or(0);
    assert!(
        limit >= IDLE_SOCKETS as u64 + 200,
        "this test needs more than {IDLE_SOCKETS} open files (ulimit -n is {limit})"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    // The requests below are answered by the gateway itself; no upstream is
    // contacted. Silent sockets are not timed out within the test, so only
    // closing the longest-idle one can make room.
    let server = format!("max_connections = {IDLE_SOCKETS}\nheader_read_timeout_ms = 300000");
    std::fs::write(&config, config_text("127.0.0.1:9".parse().unwrap(), &server, "")).unwrap();
    let mut child = serve_command(&config, &dir.path().join("data")).stderr(Stdio::piped()).spawn().unwrap();
    let (proxy, admin) = logged_addresses(&mut child);
    let child = KillOnDrop(child);

    // Opened in batches the gateway takes before the next: the listener's
    // accept queue holds 1,024, and a client connected past it is only
    // half-open on the server (before, most of the 10,000 never reached the
    // gateway, which held some 3,000 and so was never full). The gateway's
    // descriptors say how many it holds.
    let pid = child.0.id();
    let descriptors = || {
        // Sockets only: the gateway's other files may come and go.
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
        let is_socket = |entry: &std::fs::DirEntry| {
            std::fs::read_link(entry.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
        };
        entries.filter_map(Result::ok).filter(is_socket).count()
    };
    let base = descriptors();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut idle: Vec<TcpStream> = Vec::with_capacity(IDLE_SOCKETS);
    while idle.len() < IDLE_SOCKETS {
        let batch = (IDLE_SOCKETS - idle.len()).min(500);
        idle.extend((0..batch).map(|_| TcpStream::connect(&proxy).unwrap()));
        while descriptors() < base + idle.len() {
            assert!(
                Instant::now() < deadline,
                "the gateway took {} of {} connections",
                descriptors().saturating_sub(base),
                idle.len()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let started = Instant::now();
    let status = get_within(&proxy, "/no-such-route", Duration::from_secs(1));
    let took = started.elapsed();
    assert!(status.is_ok(), "the fresh client was not served within 1 s: {status:?}");
    assert!(took < Duration::from_secs(1), "the fresh client waited {took:?}");
    println!("with {IDLE_SOCKETS} idle sockets open, a fresh client was answered in {took:?}");
    assert_eq!(get_within(&admin, "/healthz", Duration::from_secs(1)), Ok(200), "the admin listener answers");
    drop(idle);
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_body_that_stops_arriving_is_refused_not_waited_for() {
    // Proves the admin API bounds its body read: a client that announces 100
    // bytes and sends 10 gets a 400 naming the body once the read timeout
    // (here the 300 ms header-read timeout) passes. (Before, the request
    // waited for the rest forever.)
    let stack = common::start_with("header_read_timeout_ms = 300", "", Default::default()).await;
    let admin = stack.gateway.admin_addr();
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(admin).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            stream,
            "POST /admin/v1/orgs HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {}\r\n\
             content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"name\":",
            common::ADMIN_TOKEN
        )
        .unwrap();
        let mut answer = Vec::new();
        let mut buffer = [0_u8; 4096];
        while !String::from_utf8_lossy(&answer).contains("}}") {
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "a stalled body is refused: {answer:?}");
    assert!(answer.contains("\"field\":\"body\""), "the error names the body: {answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_of_known_length_keeps_its_content_length() {
    // Proves the per-connection request tracking leaves bodies as they are:
    // a response whose length is known is sent with content-length, not
    // re-chunked.
    let stack = common::start().await;
    let admin = stack.gateway.admin_addr();
    let head = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(admin).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(stream, "GET /healthz HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.to_ascii_lowercase()
    })
    .await
    .unwrap();
    assert!(head.contains("content-length:"), "{head}");
    assert!(!head.contains("transfer-encoding: chunked"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pipelines_requests_and_never_reads_is_cut() {
    // Before, pipelined requests whose answers the client never read held
    // the connection (and its slot) for max_response_ms, 30 minutes: hyper
    // queued the answers in its write buffer and ran the next request's
    // handler, whose body it never polled, so nothing looked owed. 10,000
    // such sockets shut the listener for everyone, without a key. Now a
    // socket that refuses writes for client_stall_timeout is closed.
    let server = "client_stall_timeout_ms = 500";
    let stack = common::start_with(server, "", Default::default()).await;
    let proxy = stack.gateway.proxy_addr();
    let ended = tokio::task::spawn_blocking(move || {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        // Small windows, so the answers back up quickly (loopback buffers
        // otherwise autotune to many MiB).
        socket.set_recv_buffer_size(4096).unwrap();
        socket.set_send_buffer_size(4096).unwrap();
        socket.connect(&proxy.into()).unwrap();
        let mut stream: TcpStream = socket.into();
        stream.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let requests = "GET /no-such-route HTTP/1.1\r\nhost: test\r\n\r\n".repeat(500);
        let started = Instant::now();
        // Until the gateway cuts it: whatever the buffers hold, a gateway
        // that never cuts is caught by the write timeout or the deadline.
        while started.elapsed() < Duration::from_secs(30) {
            if let Err(error) = stream.write_all(requests.as_bytes()) {
                return (error.kind(), started.elapsed());
            }
        }
        (std::io::ErrorKind::Other, started.elapsed())
    })
    .await
    .unwrap();
    let (kind, took) = ended;
    assert!(
        matches!(kind, std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset),
        "the gateway closed the connection ({kind:?} after {took:?})"
    );
    assert!(
        took < Duration::from_secs(15),
        "closed within the stall timeout and a sweep, not at a write timeout: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_response_is_cut_and_a_slow_upstream_is_not() {
    // Before, a connection whose client never read its response stayed open
    // (and held its slot) until max_response_ms, 30 minutes by default: a
    // listener full of them accepted no one. Now the response's next part
    // waiting client_stall_timeout for the client closes it.
    let server = "client_stall_timeout_ms = 500\nmax_body_bytes = 536870912";
    let stack = common::start_with(server, "", Default::default()).await;
    let proxy = stack.gateway.proxy_addr();
    let ended = tokio::task::spawn_blocking(move || {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        // A small window, so the echo backs up at once. Loopback buffers
        // autotune up to tcp_rmem's maximum (32 MiB on some machines), and
        // the four sockets between this client and the echo once absorbed
        // a whole 48 MiB body before the gateway had a chance to cut it.
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&proxy.into()).unwrap();
        let mut stream: TcpStream = socket.into();
        stream.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let size = 512 * 1024 * 1024;
        write!(stream, "POST /echo/big HTTP/1.1\r\nhost: test\r\ncontent-length: {size}\r\n\r\n").unwrap();
        // The echo comes back as it is sent; this client never reads it.
        let chunk = vec![b'x'; 64 * 1024];
        let started = Instant::now();
        for _ in 0..size / chunk.len() {
            if let Err(error) = stream.write_all(&chunk) {
                return (error.kind(), started.elapsed());
            }
        }
        (std::io::ErrorKind::Other, started.elapsed())
    })
    .await
    .unwrap();
    let (kind, took) = ended;
    assert!(
        matches!(kind, std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset),
        "the gateway closed the connection ({kind:?} after {took:?})"
    );

    // A stream whose upstream pauses longer than the stall timeout between
    // events is waiting on the upstream, not on its client: it runs to the end.
    let body = r#"{"model":"mock-gpt","stream":true,"max_tokens":3,"stream_options":{"include_usage":true}}"#;
    let request = http::Request::post(stack.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {}", stack.keys.pro))
        .header("x-mock-pace-ms", "700")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let started = Instant::now();
    let reply = common::send(request).await;
    assert_eq!(reply.status, 200);
    assert!(String::from_utf8_lossy(&reply.body).contains("[DONE]"), "the stream ran to its end");
    assert!(
        started.elapsed() > Duration::from_millis(1400),
        "the upstream paused longer than the stall timeout"
    );
}

/// `GET path` on an h2 connection, read to its end.
async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<creditgate::mock::MockBody>,
    path: &str,
    latency_ms: u64,
) -> Result<u16, String> {
    use http_body_util::BodyExt;
    let request = http::Request::get(format!("http://test{path}"))
        .header("x-mock-latency-ms", latency_ms.to_string())
        .body(creditgate::mock::MockBody::Full(None))
        .unwrap();
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    response.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_h2_connection_is_not_cut_while_each_of_its_requests_is_young() {
    // Before, an h2 connection was timed from the moment it went from no
    // request in flight to one, and cut at max_response_ms with every stream
    // on it: a client (Envoy, a Go or gRPC client) whose requests overlap
    // never returns to none, so its connection was reset every 30 minutes of
    // steady traffic. Now each request is timed on its own.
    let stack = common::start_with("max_response_ms = 1500", "", Default::default()).await;
    let sender = common::open_h2(stack.gateway.proxy_addr()).await;
    let mut requests = Vec::new();
    // Two in flight at every moment for 4 s, none older than 0.4 s.
    for i in 0..20 {
        let mut sender = sender.clone();
        requests
            .push(tokio::spawn(async move { h2_get(&mut sender, &format!("/echo/overlap/{i}"), 400).await }));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (i, request) in requests.into_iter().enumerate() {
        assert_eq!(request.await.unwrap(), Ok(200), "request {i} on the busy connection");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stream_its_client_stops_reading_is_cut_though_other_streams_keep_coming() {
    // Before, every new stream's response head restarted the stall clock of
    // the whole connection: a client that never read one stream and sent a
    // cheap request every few seconds on another held that stream (its
    // upstream socket, its hold, its in-flight slot) for max_response_ms,
    // 30 minutes. Now each response has its own stall clock: the connection
    // drains (GOAWAY: no new streams, the others run on, a stream streaming
    // past the stall timeout included) and closes once only the stuck one is left.
    let server = "client_stall_timeout_ms = 500\nmax_body_bytes = 67108864";
    let stack = common::start_with(server, "", Default::default()).await;
    let mut sender = common::open_h2(stack.gateway.proxy_addr()).await;
    // A stream the client reads, paced by its upstream for about 3 s.
    let body = r#"{"model":"mock-gpt","stream":true,"max_tokens":8,"stream_options":{"include_usage":true}}"#;
    let streamed = http::Request::post("http://test/v1/chat/completions")
        .header("authorization", format!("Bearer {}", stack.keys.pro))
        .header("x-mock-pace-ms", "300")
        .body(creditgate::mock::MockBody::Full(Some(bytes::Bytes::from(body))))
        .unwrap();
    let mut reader = sender.clone();
    let sibling = tokio::spawn(async move {
        use http_body_util::BodyExt;
        let response = reader.send_request(streamed).await.map_err(|e| e.to_string())?;
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>((Instant::now(), String::from_utf8_lossy(&body).into_owned()))
    });
    let (tx, body) = common::channel_body();
    let request = http::Request::post("http://test/echo/unread").body(body).unwrap();
    // The echo comes back as it is sent; this client never reads it.
    let _response = tokio::spawn(sender.send_request(request));
    let feeder = tokio::spawn(async move {
        let started = Instant::now();
        let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
        for _ in 0..1024 {
            if tx.send(Ok(http_body::Frame::data(chunk.clone()))).await.is_err() {
                break;
            }
        }
        // Ends when the connection drops the body: fed to the end, or cut.
        tx.closed().await;
        started.elapsed()
    });
    // A short request every 300 ms on the same connection, for as long as it
    // takes new streams.
    let mut others = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !feeder.is_finished() && Instant::now() < deadline {
        if h2_get(&mut sender, "/echo/other", 0).await == Ok(200) {
            others += 1;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(others > 0, "other streams were served beside the stuck one");
    assert!(feeder.is_finished(), "the unread stream was still open after 10 s");
    let cut_at = Instant::now();
    let took = feeder.await.unwrap();
    assert!(took < Duration::from_secs(8), "cut once the streams beside it ended: {took:?}");
    let (ended_at, text) = sibling.await.unwrap().expect("the stream beside the stuck one ran to its end");
    assert!(text.contains("[DONE]"), "{text}");
    assert!(ended_at <= cut_at, "the stuck stream outlived the one beside it");
}
