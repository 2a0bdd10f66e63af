//! Store faults, on the real binary and a real data directory: a store that
//! lost acknowledged writes refuses to start, a truncated store is reported
//! (never a panic), a full disk makes the gateway unready until space
//! returns and then it resumes with every record stored once, and a shutdown
//! whose last flush fails exits non-zero.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{config_text, logged_addresses, serve_command, ADMIN_TOKEN};
use serde_json::{json, Value};

/// A gateway process; killed if the test ends before it exits.
struct Gateway {
    child: Option<Child>,
    proxy: String,
    admin: String,
}

impl Gateway {
    fn start(config: &Path, data: &Path) -> Gateway {
        let mut child = serve_command(config, data).stderr(Stdio::piped()).spawn().unwrap();
        let (proxy, admin) = logged_addresses(&mut child);
        Gateway { child: Some(child), proxy, admin }
    }

    fn admin(&self, method: &str, path: &str, body: &Value, idempotency: Option<&str>) -> (u16, Value) {
        let mut headers = format!("authorization: Bearer {ADMIN_TOKEN}\r\n");
        if let Some(key) = idempotency {
            headers.push_str(&format!("idempotency-key: {key}\r\n"));
        }
        http(&self.admin, method, path, &headers, &body.to_string())
    }

    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let pid = child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        child.wait().unwrap()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One HTTP/1.1 request on a fresh connection; the status and the JSON body
/// (`Null` when the body is not JSON).
fn http(addr: &str, method: &str, path: &str, headers: &str, body: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-type: application/json\r\n\
         {headers}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.get(9..12).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Starts the gateway on `data` expecting it to refuse: its output once it
/// exits, or a failure if it is still serving after a while.
fn start_refused(config: &Path, data: &Path) -> Output {
    let child = serve_command(config, data).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let (done, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match exited.recv_timeout(Duration::from_secs(15)) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("the gateway started on a store it should have refused");
        }
    }
}

fn verify(data: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .args(["ledger", "verify", "--data-dir"])
        .arg(data)
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// An organization with a funded pool, a Pro user and a key; its id and the key's secret.
fn seed(gateway: &Gateway) -> (u64, String) {
    let today = chrono::Utc::now().date_naive().to_string();
    let contract = json!({"start": today, "years": 1, "platform_allocation_per_year": "1000"});
    let (status, org) =
        gateway.admin("POST", "/admin/v1/orgs", &json!({"name": "faults", "contract": contract}), None);
    assert_eq!(status, 201, "{org}");
    let org = org["id"].as_u64().unwrap();
    let (_, user) = gateway.admin(
        "POST",
        &format!("/admin/v1/orgs/{org}/users"),
        &json!({"name": "u", "plan": "pro"}),
        None,
    );
    let (_, key) =
        gateway.admin("POST", &format!("/admin/v1/orgs/{org}/keys"), &json!({"user": user["id"]}), None);
    (org, key["secret"].as_str().unwrap().to_owned())
}

fn purchase(gateway: &Gateway, org: u64, key: &str) -> (u16, Value) {
    gateway.admin("POST", &format!("/admin/v1/orgs/{org}/purchases"), &json!({"amount": "1"}), Some(key))
}

fn chat(gateway: &Gateway, secret: &str) -> u16 {
    let headers = format!("authorization: Bearer {secret}\r\n");
    http(&gateway.proxy, "POST", "/v1/chat/completions", &headers, r#"{"model":"mock-gpt","max_tokens":8}"#).0
}

/// Every ledger entry of `org`, paged through the admin API.
fn ledger(gateway: &Gateway, org: u64) -> Vec<Value> {
    let mut entries = Vec::new();
    let mut cursor = 0;
    loop {
        let path = format!("/admin/v1/orgs/{org}/ledger?limit=1000&after={cursor}");
        let (status, page) = gateway.admin("GET", &path, &json!({}), None);
        assert_eq!(status, 200, "{page}");
        entries.extend(page["entries"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_u64() {
            Some(next) => cursor = next,
            None => return entries,
        }
    }
}

/// A mock upstream on its own runtime, a config for it, and a data path.
struct Setup {
    _runtime: tokio::runtime::Runtime,
    _mock: creditgate::mock::MockUpstream,
    dir: tempfile::TempDir,
    config: PathBuf,
}

fn setup() -> Setup {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mock = runtime
        .block_on(creditgate::mock::MockUpstream::start("127.0.0.1:0".parse().unwrap(), Default::default()))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, config_text(mock.addr(), "", "")).unwrap();
    Setup { _runtime: runtime, _mock: mock, dir, config }
}

#[test]
fn a_store_that_lost_its_last_acknowledged_write_refuses_to_start() {
    // Proves the durable watermark: zeroing the tail of sled's log while the
    // gateway is stopped loses the last acknowledged purchase; the gateway
    // and `ledger verify` then refuse the store with a clear message instead
    // of serving books without it.
    let setup = setup();
    let data = setup.dir.path().join("data");
    let gateway = Gateway::start(&setup.config, &data);
    let (org, _) = seed(&gateway);
    let (status, receipt) = purchase(&gateway, org, "last-one");
    assert_eq!(status, 201, "{receipt}");
    assert!(gateway.terminate().success());

    let db = data.join("ledger").join("db");
    let length = std::fs::metadata(&db).unwrap().len();
    let mut file = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(length - 200)).unwrap();
    file.write_all(&[0; 200]).unwrap();
    file.sync_all().unwrap();
    drop(file);

    let started = start_refused(&setup.config, &data);
    assert!(
        !started.status.success(),
        "a store missing acknowledged records must not start: {}",
        text(&started)
    );
    assert!(
        text(&started).contains("was acknowledged as durable"),
        "the refusal says what is wrong: {}",
        text(&started)
    );
    let verified = verify(&data);
    assert!(!verified.status.success(), "ledger verify reports the loss: {}", text(&verified));
}

#[test]
fn a_truncated_store_is_reported_as_damaged_not_a_panic() {
    // Proves sled's panic on a log cut short under its snapshot is caught at
    // the store's boundary: start-up and `ledger verify` exit with an error
    // naming the damage (exit 1), never a panic (exit 101).
    let setup = setup();
    let data = setup.dir.path().join("data");
    // Two runs, as a store lives: sled rewrites its snapshot when it opens,
    // so the second run's log reaches well past the snapshot, over several
    // of sled's 512 KiB log segments.
    let gateway = Gateway::start(&setup.config, &data);
    let (org, _) = seed(&gateway);
    buy_many(&gateway, org, 0..400, 1);
    assert!(gateway.terminate().success());
    let gateway = Gateway::start(&setup.config, &data);
    buy_many(&gateway, org, 400..3_400, 8);
    assert!(gateway.terminate().success());

    let length = std::fs::metadata(data.join("ledger").join("db")).unwrap().len();
    let mut damaged = 0;
    for cut in (500_000..length).step_by(50_000) {
        let copy = setup.dir.path().join("cut");
        let _ = std::fs::remove_dir_all(&copy);
        copy_dir(&data, &copy);
        let file = std::fs::OpenOptions::new().write(true).open(copy.join("ledger").join("db")).unwrap();
        file.set_len(cut).unwrap();
        drop(file);
        let verified = verify(&copy);
        assert_ne!(
            verified.status.code(),
            Some(101),
            "a store cut at {cut} made verify panic: {}",
            text(&verified)
        );
        if !verified.status.success() {
            damaged += 1;
            assert!(
                text(&verified).contains("damaged") || text(&verified).contains("corrupt"),
                "{}",
                text(&verified)
            );
            let started = start_refused(&setup.config, &copy);
            assert_ne!(
                started.status.code(),
                Some(101),
                "a store cut at {cut} made start-up panic: {}",
                text(&started)
            );
            assert!(!started.status.success(), "a damaged store does not start: {}", text(&started));
        }
    }
    assert!(damaged > 0, "no cut of a {length}-byte store was found damaged");
}

/// Purchases numbered `keys`, from `threads` connections at a time.
fn buy_many(gateway: &Gateway, org: u64, keys: std::ops::Range<usize>, threads: usize) {
    let keys: Vec<usize> = keys.collect();
    for chunk in keys.chunks(threads) {
        let requests: Vec<_> = chunk
            .iter()
            .map(|n| {
                let (admin, key) = (gateway.admin.clone(), format!("fill-{n}"));
                std::thread::spawn(move || {
                    let headers =
                        format!("authorization: Bearer {ADMIN_TOKEN}\r\nidempotency-key: {key}\r\n");
                    http(
                        &admin,
                        "POST",
                        &format!("/admin/v1/orgs/{org}/purchases"),
                        &headers,
                        r#"{"amount":"1"}"#,
                    )
                })
            })
            .collect();
        for request in requests {
            assert_eq!(request.join().unwrap().0, 201);
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A 2 MiB tmpfs, unmounted on drop; `None` where mounting is not allowed.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf) -> Option<Tmpfs> {
        std::fs::create_dir_all(&at).unwrap();
        let mounted =
            Command::new("mount").args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"]).arg(&at).status().ok()?;
        mounted.success().then_some(Tmpfs(at))
    }

    /// Fills the file system; the filler's path.
    fn fill(&self) -> PathBuf {
        let filler = self.0.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0_u8; 4096];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_full_disk_makes_the_gateway_unready_and_it_resumes_when_space_returns() {
    // Proves, on a real 2 MiB tmpfs: once the store fails, /readyz answers
    // 503 with the reason and new work is refused; when space returns the
    // writer recovers by itself, /readyz is 200 again, purchases and proxied
    // calls work, and every record is stored exactly once. Then a SIGTERM
    // while the disk is full again exits non-zero.
    let setup = setup();
    let Some(tmpfs) = Tmpfs::mount(setup.dir.path().join("tmpfs")) else {
        panic!("this test needs a tmpfs (run as root, or where `mount -t tmpfs` is allowed)");
    };
    let data = tmpfs.0.join("data");
    let gateway = Gateway::start(&setup.config, &data);
    let (org, secret) = seed(&gateway);
    assert_eq!(chat(&gateway, &secret), 200);
    let ready = |gateway: &Gateway| http(&gateway.admin, "GET", "/readyz", "", "");

    let filler = tmpfs.fill();
    let mut refused = 0;
    for n in 0..20 {
        if purchase(&gateway, org, &format!("full-{n}")).0 == 503 {
            refused += 1;
        }
        let _ = chat(&gateway, &secret);
    }
    assert!(refused > 0, "no purchase was refused on a full disk");
    let (status, body) = ready(&gateway);
    assert_eq!(status, 503, "readiness reports the failed store: {body}");
    assert!(body["reason"].as_str().unwrap_or("").contains("unavailable"), "{body}");
    assert_eq!(chat(&gateway, &secret), 503, "new calls are refused while the store fails");

    std::fs::remove_file(&filler).unwrap();
    wait_for("the store to recover", || ready(&gateway).0 == 200);
    assert_eq!(purchase(&gateway, org, "after-recovery").0, 201);
    assert_eq!(chat(&gateway, &secret), 200, "calls are served again");

    let entries = ledger(&gateway, org);
    let mut ids: Vec<u64> = entries.iter().map(|entry| entry["id"].as_u64().unwrap()).collect();
    let count = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), count, "no entry is served twice");
    let purchases: Vec<&str> = entries
        .iter()
        .filter(|entry| entry["kind"]["type"] == "purchase")
        .map(|entry| entry["kind"]["idempotency_key"].as_str().unwrap())
        .collect();
    assert!(purchases.contains(&"after-recovery"), "{purchases:?}");

    // Full again, with work waiting for the disk: the last flush fails.
    // (sled may have room left in a segment it already holds: write until
    // the store fails.)
    let filler = tmpfs.fill();
    let failed = (0..500).any(|n| {
        let _ = chat(&gateway, &secret);
        purchase(&gateway, org, &format!("at-the-end-{n}")).0 == 503
    });
    assert!(failed, "the store never failed on a full disk");
    let exit = gateway.terminate();
    assert!(!exit.success(), "a shutdown whose last flush failed must not exit 0 ({exit:?})");
    std::fs::remove_file(&filler).unwrap();
    let verified = verify(&data);
    assert!(verified.status.success(), "the books add up and hold no record twice: {}", text(&verified));
}

#[test]
fn a_money_write_answered_503_on_a_full_disk_is_answered_once_on_a_retry_after_recovery() {
    // Proves the honest semantics of a purchase whose disk fails: the 503
    // says the outcome is unknown and to retry with the same
    // Idempotency-Key; after space returns, that retry answers 201 with the
    // one purchase (whether the first call landed or not), a second retry
    // answers the same, and the pool holds the credit exactly once per key.
    let setup = setup();
    let Some(tmpfs) = Tmpfs::mount(setup.dir.path().join("tmpfs")) else {
        panic!("this test needs a tmpfs (run as root, or where `mount -t tmpfs` is allowed)");
    };
    let data = tmpfs.0.join("data");
    let gateway = Gateway::start(&setup.config, &data);
    let (org, _) = seed(&gateway);
    let filler = tmpfs.fill();
    // Write until the store fails (sled may still have room in a segment).
    let mut unknown = Vec::new();
    for n in 0..500 {
        let key = format!("unknown-{n}");
        let (status, body) = purchase(&gateway, org, &key);
        if status == 503 {
            assert_eq!(body["error"]["code"], "outcome_unknown", "{body}");
            let message = body["error"]["message"].as_str().unwrap_or("");
            assert!(message.contains("same Idempotency-Key"), "the 503 says how to retry: {body}");
            unknown.push(key);
            if unknown.len() == 3 {
                break;
            }
        }
    }
    assert!(!unknown.is_empty(), "the store never failed on a full disk");

    std::fs::remove_file(&filler).unwrap();
    let ready = || http(&gateway.admin, "GET", "/readyz", "", "").0 == 200;
    wait_for("the store to recover", ready);
    for key in &unknown {
        let (status, first) = purchase(&gateway, org, key);
        assert_eq!(status, 201, "the retry of {key} answers the purchase: {first}");
        let (status, again) = purchase(&gateway, org, key);
        assert_eq!((status, &again), (201, &first), "a second retry answers the same purchase");
    }
    let entries = ledger(&gateway, org);
    let keys: Vec<&str> = entries
        .iter()
        .filter(|entry| entry["kind"]["type"] == "purchase")
        .map(|entry| entry["kind"]["idempotency_key"].as_str().unwrap())
        .collect();
    for key in &unknown {
        assert_eq!(keys.iter().filter(|k| *k == key).count(), 1, "{key} is bought exactly once: {keys:?}");
    }
    let (_, balances) = gateway.admin("GET", &format!("/admin/v1/orgs/{org}/balances"), &json!({}), None);
    let pool: rust_decimal::Decimal = balances["balances"][0]["balance"].as_str().unwrap().parse().unwrap();
    let bought = rust_decimal::Decimal::from(keys.len());
    assert_eq!(pool, rust_decimal::Decimal::from(1000) + bought, "one credit per purchase: {balances}");
}
