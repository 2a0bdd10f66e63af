//! Graceful shutdown: stop accepting, let in-flight streams finish, exit 0.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use creditgate::ledger::entry::EntryKind;
use creditgate::mock::{MockOptions, MockUpstream};
use creditgate::server::Drained;
use http::Request;
use http_body_util::Full;

const STREAM_BODY: &str = r#"{"model":"mock-gpt","stream":true,"max_tokens":8}"#;

#[tokio::test]
async fn shutdown_lets_an_in_flight_stream_finish() {
    let stack = start().await;
    let mut sender = open_h1(stack.gateway.proxy_addr()).await;
    let request = Request::post(stack.url("/v1/chat/completions"))
        .header("x-mock-pace-ms", "50")
        .header("authorization", format!("Bearer {}", stack.keys.pro))
        .body(creditgate::mock::MockBody::Full(Some(Bytes::from(STREAM_BODY))))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let mut body = response.into_body();
    let mut received = next_chunk(&mut body).await.unwrap().to_vec();

    stack.shutdown.cancel();
    let proxy_addr = stack.gateway.proxy_addr();
    let drained = tokio::spawn(stack.gateway.wait());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        tokio::net::TcpStream::connect(proxy_addr).await.is_err(),
        "new connections are refused after shutdown"
    );

    while let Some(chunk) = next_chunk(&mut body).await {
        received.extend_from_slice(&chunk);
    }
    assert!(received.ends_with(b"data: [DONE]\n\n"), "the in-flight stream ran to its end");
    let content_events = String::from_utf8_lossy(&received).matches(r#""tok ""#).count();
    assert_eq!(content_events, 8, "every token arrived");
    assert_eq!(drained.await.unwrap(), Drained::All);
}

/// Kills the gateway process if the test fails before it exits by itself.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `creditgate serve` as a real process and return it with its proxy
/// and admin addresses.
fn spawn_gateway(
    config_path: &std::path::Path,
    data_dir: &std::path::Path,
) -> (std::process::Child, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .args(["serve", "--config"])
        .arg(config_path)
        .arg("--data-dir")
        .arg(data_dir)
        .env("MOCK_UPSTREAM_KEY", UPSTREAM_SECRET)
        .env("ORG_TOKEN", ORG_TOKEN)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Read stderr on a thread (and keep draining it so the child never blocks
    // on a full pipe); the test waits for the addresses with a deadline.
    std::thread::spawn(move || {
        let field = |line: &str, name: &str| {
            line.split(name).nth(1).map(|rest| rest.split_whitespace().next().unwrap_or_default().to_owned())
        };
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let (Some(proxy), Some(admin)) = (field(&line, "proxy_addr="), field(&line, "admin_addr=")) {
                let _ = tx.send((proxy, admin));
            }
        }
    });
    let (proxy, admin) =
        rx.recv_timeout(Duration::from_secs(20)).expect("gateway did not report its address");
    (child, proxy, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_a_price_file_does_not_stop_the_gateway_whose_data_directory_is_private() {
    // Before, a pass-through config (no [pricing]) installed no SIGHUP
    // handler, and SIGHUP's default ended the process without a drain.
    let mock = MockUpstream::start("127.0.0.1:0".parse().unwrap(), MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("gateway.toml");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n[upstreams.mock]\n\
         base_url = \"http://{}\"\n\n[[routes]]\nprefix = \"/echo\"\nupstream = \"mock\"\npassthrough = true\npublic = true\n",
        mock.addr()
    );
    std::fs::write(&config_path, config).unwrap();
    let data = dir.path().join("new").join("data");
    let (child, addr, _) = spawn_gateway(&config_path, &data);
    let mut child = KillOnDrop(child);
    let status = Command::new("kill").args(["-HUP", &child.0.id().to_string()]).status().unwrap();
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(child.0.try_wait().unwrap().is_none(), "the gateway is still running");
    let reply =
        send(Request::get(format!("http://{addr}/echo/after-hup")).body(Full::new(Bytes::new())).unwrap())
            .await;
    assert_eq!(reply.status, 200);
    // The ledger names organizations and end users: its directory is the gateway user's only.
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&data).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
}

// Multi-threaded: the test does blocking socket I/O while the mock runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_stream_and_exits_zero() {
    let mock = MockUpstream::start("127.0.0.1:0".parse().unwrap(), MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(&config_path, config_text(mock.addr(), "", "")).unwrap();
    let (child, addr, _) = spawn_gateway(&config_path, &dir.path().join("data"));
    let mut child = KillOnDrop(child);

    // A raw HTTP/1.1 stream, read on a blocking thread.
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: public.test\r\nx-mock-pace-ms: 60\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{STREAM_BODY}",
        STREAM_BODY.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    let n = stream.read(&mut first).unwrap();
    assert!(n > 0 && first.starts_with(b"HTTP/1.1 200"), "stream started");

    let status = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
    assert!(status.success());
    let reader = std::thread::spawn(move || {
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        rest
    });
    let rest = reader.join().unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("data: [DONE]"), "stream finished after SIGTERM: {text}");
    let exit = child.0.wait().unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    mock.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_setting_sizes_the_runtime_and_check_config_bounds_it() {
    let mock = MockUpstream::start("127.0.0.1:0".parse().unwrap(), MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let metric = |text: &str| {
        text.lines().find_map(|line| line.strip_prefix("creditgate_runtime_workers ")).map(str::to_owned)
    };
    for (workers, expected) in [("workers = 3", 3), ("", std::thread::available_parallelism().unwrap().get())]
    {
        let config_path = dir.path().join("gateway.toml");
        std::fs::write(&config_path, config_text(mock.addr(), workers, "")).unwrap();
        let (child, _, admin) = spawn_gateway(&config_path, &dir.path().join(format!("data{expected}")));
        let mut child = KillOnDrop(child);
        let metrics =
            send(Request::get(format!("http://{admin}/metrics")).body(Full::new(Bytes::new())).unwrap())
                .await;
        let text = String::from_utf8_lossy(&metrics.body).into_owned();
        assert_eq!(metric(&text).as_deref(), Some(expected.to_string().as_str()), "{workers:?}: {text}");
        Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
        assert!(child.0.wait().unwrap().success());
    }
    for bad in ["workers = 0", "workers = 5000"] {
        let config_path = dir.path().join("bad.toml");
        std::fs::write(&config_path, config_text(mock.addr(), bad, "")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_creditgate"))
            .args(["check-config", "--config"])
            .arg(&config_path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("workers"), "{bad}: {stderr}");
    }
    mock.stop().await;
}

#[test]
fn check_config_accepts_the_examples_and_rejects_a_broken_file() {
    let ok = Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .args(["check-config", "--config", "config/gateway.toml"])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "[server]\nlisten = \"nope\"\nbogus = 1\n\n[[routes]]\nprefix = \"/v1\"\nupstream = \"ghost\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .args(["check-config", "--config"])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a broken config must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.toml:1:") && stderr.contains("bogus"),
        "unknown key with file:line: {stderr}"
    );
    assert!(
        stderr.contains("broken.toml:5:") && stderr.contains("ghost"),
        "bad upstream with file:line: {stderr}"
    );
}

#[tokio::test]
async fn admin_health_and_readiness() {
    let stack = start().await;
    let health = send(Request::get(stack.admin_url("/healthz")).body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(health.status, 200);
    let ready = send(Request::get(stack.admin_url("/readyz")).body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["status"], "ready");
}

#[tokio::test]
async fn streams_cut_at_the_end_of_the_grace_period_are_settled_before_the_store_closes() {
    // Proves defect 10 of issue 13: a stream still running when the grace period ran out
    // settled after the store writer had stopped, so its debit never reached the store. Now
    // the remaining connections are cut, their settles awaited, and only then the store closes.
    let mock = MockUpstream::start("127.0.0.1:0".parse().unwrap(), MockOptions::default()).await.unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let text =
        config_text(mock.addr(), "", "").replace("shutdown_grace_ms = 5000", "shutdown_grace_ms = 300");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let gateway = creditgate::app::Gateway::start(parse_config(&text, data_dir.path()), shutdown.clone())
        .await
        .unwrap();
    let keys = seed(&gateway, "100", "1");
    let wallet = gateway
        .ledger()
        .resolve_key(&creditgate::ledger::entity::KeyHash::of_secret(&keys.pro))
        .unwrap()
        .wallet;
    let seeded = gateway.ledger().balance(wallet, chrono::Utc::now()).unwrap().balance;
    let mut sender = open_h1(gateway.proxy_addr()).await;
    let request = Request::post(format!("http://{}/v1/chat/completions", gateway.proxy_addr()))
        .header("x-mock-pace-ms", "200")
        .header("authorization", format!("Bearer {}", keys.pro))
        .body(creditgate::mock::MockBody::Full(Some(Bytes::from(
            r#"{"model":"mock-gpt","stream":true,"max_tokens":40}"#,
        ))))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let mut body = response.into_body();
    next_chunk(&mut body).await.unwrap();

    shutdown.cancel();
    let ledger = gateway.ledger();
    let drained = tokio::time::timeout(Duration::from_secs(10), gateway.wait()).await.unwrap();
    assert_eq!(drained, Drained::TimedOut, "the 8 s stream outlived the 300 ms grace");
    let settled = ledger.balance(wallet, chrono::Utc::now()).unwrap();
    assert_eq!(settled.open_holds, 0, "the cut stream settled before the gateway stopped");
    assert!(settled.balance < seeded, "and was charged: {} !< {seeded}", settled.balance);
    drop((ledger, body));

    // Reopen the same data directory (once the last handles on it are gone): the charge is there.
    let mut reopened = None;
    for _ in 0..50 {
        let config = parse_config(&text, data_dir.path());
        match creditgate::app::Gateway::start(config, tokio_util::sync::CancellationToken::new()).await {
            Ok(gateway) => {
                reopened = Some(gateway);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let gateway = reopened.expect("the data directory reopens");
    let after = gateway.ledger().balance(wallet, chrono::Utc::now()).unwrap();
    assert_eq!(after.balance, settled.balance, "the charge survived the restart");
    assert_eq!(after.balance, after.totals.balance());
}

#[tokio::test]
async fn a_call_its_client_left_is_read_on_through_the_shutdown_grace() {
    // Proves reading on for the usage of a call whose client left is in-flight work: it
    // goes on through the shutdown's grace period, as the streams still sending do, and
    // the call is charged its usage. Before, it stopped when the shutdown began and the
    // call was charged its hold.
    let stack = start().await;
    let ledger = stack.gateway.ledger();
    let wallet =
        ledger.resolve_key(&creditgate::ledger::entity::KeyHash::of_secret(&stack.keys.pro)).unwrap().wallet;
    let balance = || ledger.balance(wallet, chrono::Utc::now()).unwrap().balance;
    let stream = |pace: &str| small_usage_stream(&stack, pace);
    let before = balance();
    let mut sender = open_h1(stack.gateway.proxy_addr()).await;
    let reply = read(sender.send_request(stream("1")).await.unwrap()).await;
    assert!(reply.body.ends_with(b"data: [DONE]\n\n"));
    let usage_cost = before - balance();
    assert!(usage_cost > rust_decimal::Decimal::ZERO);

    // Left after its first event, with some 700 ms of the stream to come.
    let before = balance();
    let mut sender = open_h1(stack.gateway.proxy_addr()).await;
    let mut body = sender.send_request(stream("100")).await.unwrap().into_body();
    assert!(next_chunk(&mut body).await.is_some(), "the stream started");
    drop((body, sender));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(ledger.open_holds(), 1, "read on for its usage");
    stack.shutdown.cancel();
    assert_eq!(stack.gateway.wait().await, Drained::All);
    assert_eq!(ledger.open_holds(), 0);
    assert_eq!(before - balance(), usage_cost, "charged its usage, not its hold");
}

/// A stream whose usage the mock reports as 3 + 2 tokens, `pace_ms` between
/// its events.
fn small_usage_stream(stack: &Stack, pace_ms: &str) -> Request<creditgate::mock::MockBody> {
    Request::post(stack.url("/v1/chat/completions"))
        .header("x-mock-pace-ms", pace_ms)
        .header("x-mock-usage", r#"{"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}"#)
        .header("authorization", format!("Bearer {}", stack.keys.pro))
        .body(creditgate::mock::MockBody::Full(Some(Bytes::from(STREAM_BODY))))
        .unwrap()
}

/// The amounts of the debits the gateway has made durable so far.
fn debit_amounts(gateway: &creditgate::app::Gateway) -> Vec<rust_decimal::Decimal> {
    let entries = gateway.ledger_entries(0, 10_000).unwrap();
    entries.iter().filter(|e| matches!(e.kind, EntryKind::Debit(_))).map(|e| e.amount.abs()).collect()
}

/// Names of this process's threads that serve the proxy under
/// `thread-per-core` (the kernel keeps 15 bytes of a thread's name).
fn proxy_threads_running() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("creditgate-prox"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_per_core_charges_every_request_reads_on_and_drains_streams_at_shutdown() {
    assert_eq!(proxy_threads_running(), 0);
    let stack = start_with("scheduler = \"thread-per-core\"\nworkers = 3", "", MockOptions::default()).await;
    assert_eq!(proxy_threads_running(), 3, "one thread per configured worker");
    let metrics =
        send(Request::get(stack.admin_url("/metrics")).body(Full::new(Bytes::new())).unwrap()).await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(metrics.contains("creditgate_proxy_threads 3\n"), "{metrics}");
    let ledger = stack.gateway.ledger();
    let org_balance = || -> rust_decimal::Decimal {
        let wallets = ledger.wallets_of(stack.keys.org);
        wallets.iter().map(|w| ledger.balance(*w, chrono::Utc::now()).unwrap().balance).sum()
    };
    let before = org_balance();

    // Each on a connection of its own, so the kernel spreads them over the
    // three listeners.
    let calls = 24;
    for _ in 0..calls {
        let mut sender = open_h1(stack.gateway.proxy_addr()).await;
        let request = Request::post(stack.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {}", stack.keys.pro))
            .body(creditgate::mock::MockBody::Full(Some(Bytes::from(
                r#"{"model":"mock-gpt","max_tokens":8}"#,
            ))))
            .unwrap();
        let reply = read(sender.send_request(request).await.unwrap()).await;
        assert_eq!(reply.status, 200, "{:?}", String::from_utf8_lossy(&reply.body));
    }
    let mut debits = Vec::new();
    for _ in 0..200 {
        debits = debit_amounts(&stack.gateway);
        if debits.len() == calls {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(debits.len(), calls, "one debit per request");
    // Each the usage its upstream reported, at mock-gpt's prices, whichever
    // thread served it.
    let price = stack.gateway.prices().unwrap().current().model("mock-gpt", chrono::Utc::now()).unwrap();
    let mut reported: Vec<rust_decimal::Decimal> = stack
        .mock
        .journal()
        .entries()
        .iter()
        .map(|entry| {
            let usage = entry.usage.expect("the mock reported usage");
            let usage = creditgate::pricing::TokenUsage {
                input_tokens: usage.input_tokens,
                output_tokens: usage.output_tokens,
                ..Default::default()
            };
            price.cost(&usage).unwrap()
        })
        .collect();
    let mut charged = debits.clone();
    reported.sort();
    charged.sort();
    assert_eq!(charged, reported, "every request charged what its upstream reported");
    let spent: rust_decimal::Decimal = debits.iter().sum();
    let after = org_balance();
    assert_eq!(before - after, spent, "the pool paid exactly the debits");

    // The same small-usage stream three times. Read to its end:
    let stream = |pace: &str| small_usage_stream(&stack, pace);
    let mut sender = open_h1(stack.gateway.proxy_addr()).await;
    let reply = read(sender.send_request(stream("1")).await.unwrap()).await;
    assert!(reply.body.ends_with(b"data: [DONE]\n\n"));
    let usage_cost = after - org_balance();
    assert!(usage_cost > rust_decimal::Decimal::ZERO);

    // Left after its first event: the gateway reads on for the usage on
    // that connection's thread (charging the whole hold if it could not).
    let after = org_balance();
    let mut sender = open_h1(stack.gateway.proxy_addr()).await;
    // Paced at 200 ms, so the hold is still open below on a loaded machine.
    let mut body = sender.send_request(stream("200")).await.unwrap().into_body();
    assert!(next_chunk(&mut body).await.is_some(), "the stream started");
    drop(body);
    drop(sender);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(ledger.open_holds(), 1, "the left stream's hold waits for its usage");
    for _ in 0..1000 {
        if ledger.open_holds() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(after - org_balance(), usage_cost, "the left stream was charged its usage, not its hold");

    // In flight when shutdown starts: it runs to its end on its thread.
    let after = org_balance();
    let mut sender = open_h1(stack.gateway.proxy_addr()).await;
    let mut body = sender.send_request(stream("40")).await.unwrap().into_body();
    let mut received = next_chunk(&mut body).await.unwrap().to_vec();
    stack.shutdown.cancel();
    let stopped = tokio::spawn(stack.gateway.wait());
    while let Some(chunk) = next_chunk(&mut body).await {
        received.extend_from_slice(&chunk);
    }
    assert!(received.ends_with(b"data: [DONE]\n\n"), "the in-flight stream ran to its end");
    assert_eq!(stopped.await.unwrap(), Drained::All);
    assert_eq!(proxy_threads_running(), 0, "the proxy threads ended");
    assert_eq!(ledger.open_holds(), 0);
    assert_eq!(after - org_balance(), usage_cost, "charged its usage");
    for (wallet, balance, totals) in ledger.wallet_totals() {
        assert_eq!(balance, totals.granted - totals.debited - totals.written_off, "wallet {wallet:?}");
    }
    stack.mock.stop().await;
}

#[test]
fn thread_per_core_is_refused_in_cluster_mode_and_unknown_schedulers_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let check = |server: &str, extra: &str| {
        let path = dir.path().join("gateway.toml");
        let text = config_text("127.0.0.1:9".parse().unwrap(), server, "") + extra;
        std::fs::write(&path, text).unwrap();
        Command::new(env!("CARGO_BIN_EXE_creditgate"))
            .args(["check-config", "--config"])
            .arg(&path)
            .env("CG_TEST_DATABASE_URL", "postgres://127.0.0.1:9/none")
            .env("MOCK_UPSTREAM_KEY", UPSTREAM_SECRET)
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .env("ORG_TOKEN", ORG_TOKEN)
            .output()
            .unwrap()
    };
    let cluster = "\n[cluster]\ndatabase_url_env = \"CG_TEST_DATABASE_URL\"\n";
    let fine = check("scheduler = \"thread-per-core\"", "");
    assert!(fine.status.success(), "{}", String::from_utf8_lossy(&fine.stderr));
    assert!(check("", cluster).status.success(), "the cluster section itself is fine");
    let out = check("scheduler = \"thread-per-core\"", cluster);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("thread-per-core"), "{stderr}");
    let out = check("scheduler = \"round-robin\"", "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("round-robin"), "{stderr}");
}
