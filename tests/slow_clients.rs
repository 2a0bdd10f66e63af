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
    // silent one to time out: the header-read timeout, 10 s.)
    let limit = open_files_limit().unwrap_or(0);
    assert!(
        limit >= IDLE_SOCKETS as u64 + 200,
        "this test needs more than {IDLE_SOCKETS} open files (ulimit -n is {limit})"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    // The requests below are answered by the gateway itself; no upstream is contacted.
    std::fs::write(&config, config_text("127.0.0.1:9".parse().unwrap(), "", "")).unwrap();
    let mut child = serve_command(&config, &dir.path().join("data")).stderr(Stdio::piped()).spawn().unwrap();
    let (proxy, admin) = logged_addresses(&mut child);
    let _stop = KillOnDrop(child);

    let idle: Vec<TcpStream> = (0..IDLE_SOCKETS).map(|_| TcpStream::connect(&proxy).unwrap()).collect();
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
