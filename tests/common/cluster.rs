//! Cluster-mode test harness: `creditgate serve` processes with
//! `[cluster]` on a real PostgreSQL, in front of a real mock upstream, and
//! the queries that audit the shared books.
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use creditgate::cluster::migrate::migrate;
use creditgate::cluster::{Books, Database, WalletAudit};
use creditgate::mock::{MockOptions, MockUpstream};
use http::Method;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::pg::Postgres;
use super::*;

pub const URL_VAR: &str = "CG_TEST_DATABASE_URL";
/// Short leases and treasury, so expiry and takeover fit in a test.
pub const LEASE_TTL_MS: u64 = 2_000;

pub struct Replica {
    pub child: Child,
    pub proxy: String,
    pub admin: String,
    pub data: tempfile::TempDir,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Cluster {
    pub url: String,
    pub config: tempfile::NamedTempFile,
    pub replicas: Vec<Replica>,
    pub mock: MockUpstream,
}

pub fn config_file(mock: std::net::SocketAddr) -> tempfile::NamedTempFile {
    let settings = format!("lease_ttl_ms = {LEASE_TTL_MS}\ntreasury_ttl_ms = 1500\nship_interval_ms = 20");
    let text = with_cluster_section(&config_text(mock, "", ""), &settings);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

/// A mock upstream and a replica config file for it as [`config_file`]
/// writes it, edited by `edit`; with the edited text.
pub async fn edited_config(
    edit: impl FnOnce(String) -> String,
) -> (MockUpstream, tempfile::NamedTempFile, String) {
    let mock = MockUpstream::start("127.0.0.1:0".parse().unwrap(), MockOptions::default()).await.unwrap();
    let config = config_file(mock.addr());
    let text = edit(std::fs::read_to_string(config.path()).unwrap());
    std::fs::write(config.path(), &text).unwrap();
    (mock, config, text)
}

/// The name a replica keeps in its data directory.
pub fn replica_name(replica: &Replica) -> String {
    std::fs::read_to_string(replica.data.path().join("replica-name")).unwrap().trim().to_owned()
}

/// Gateway config `text` with a `[cluster]` section: the database URL in
/// [`URL_VAR`], and `settings`.
pub fn with_cluster_section(text: &str, settings: &str) -> String {
    text.replace(
        "[upstreams.mock]",
        &format!("[cluster]\ndatabase_url_env = \"{URL_VAR}\"\n{settings}\n\n[upstreams.mock]"),
    )
}

/// A [`Stack`] whose gateway is a cluster replica, in process, on a fresh
/// database of this test binary's shared PostgreSQL: config `text` edited
/// by `edit`, the gateway reading `clock`, the usual org seeded (through
/// its ledger, once it is the treasurer) as of `clock`'s now.
pub async fn start_replica_stack(
    edit: impl FnOnce(String) -> String,
    clock: std::sync::Arc<dyn creditgate::clock::Clock>,
) -> Stack {
    static DATABASES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = format!("stack_{}", DATABASES.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let url = Postgres::shared().create_database(&name);
    let mock = MockUpstream::start("127.0.0.1:0".parse().unwrap(), MockOptions::default()).await.unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    // A small pool: every test of the binary shares one server. A long
    // treasury: a busy machine must not depose the only replica (a deposed
    // treasurer takes no more changes until it restarts).
    let settings = "max_connections = 4\ntreasury_ttl_ms = 30000\nship_interval_ms = 20";
    let text = with_cluster_section(&edit(config_text(mock.addr(), "", "")), settings);
    let env = |name: &str| (name == URL_VAR).then(|| url.clone());
    let config = parse_config_with_env(&text, data_dir.path(), &env);
    let shutdown = CancellationToken::new();
    let now = clock.now();
    let gateway = creditgate::app::Gateway::start_with_clock(config, clock, shutdown.clone()).await.unwrap();
    let spec = creditgate::demo::SeedSpec {
        org_name: "test-org".into(),
        pool: "100".parse().unwrap(),
        lite_allowance: "1".parse().unwrap(),
    };
    // The only replica takes the treasury within a poll; until then its
    // ledger refuses changes (and makes none).
    let deadline = Instant::now() + Duration::from_secs(20);
    let keys = loop {
        // Off the runtime: a change waits for the shared log, whose appends
        // this (single-threaded) runtime drives.
        let (ledger, spec) = (gateway.ledger(), spec.clone());
        let seeded = tokio::task::spawn_blocking(move || creditgate::demo::seed_org(&ledger, &spec, now));
        match seeded.await.unwrap() {
            Ok(keys) => break keys,
            Err(error) => assert!(Instant::now() < deadline, "the replica never became treasurer: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Stack { keys, mock, books: super::BooksCheck::of(&gateway), gateway, shutdown, data_dir }
}

/// Starts a replica whose log goes to `<data>/replica.log` (kept for a
/// failing test's message); returns once it serves.
pub fn spawn_replica(config: &std::path::Path, url: &str, data: tempfile::TempDir) -> Replica {
    spawn_replica_with_env(config, url, data, &[])
}

/// [`spawn_replica`] with more environment (a test clock shift, say).
pub fn spawn_replica_with_env(
    config: &std::path::Path,
    url: &str,
    data: tempfile::TempDir,
    env: &[(&str, &str)],
) -> Replica {
    let log_path = data.path().join("replica.log");
    // A restart on the same directory must not read the last run's address.
    let _ = std::fs::rename(&log_path, data.path().join("replica.previous.log"));
    let log = std::fs::File::options().create(true).append(true).open(&log_path).unwrap();
    let child = serve_command(config, data.path())
        .env(URL_VAR, url)
        .envs(env.iter().copied())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    // Owned at once, so a failed start is killed too (on drop).
    let mut replica = Replica { child, proxy: String::new(), admin: String::new(), data };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = replica.log();
        let field = |name: &str| {
            text.lines()
                .filter(|line| line.contains("creditgate is serving"))
                .find_map(|line| line.split(name).nth(1).and_then(|r| r.split_whitespace().next()))
                .map(str::to_owned)
        };
        if let (Some(proxy), Some(admin)) = (field("proxy_addr="), field("admin_addr=")) {
            (replica.proxy, replica.admin) = (proxy, admin);
            return replica;
        }
        assert!(Instant::now() < deadline, "the replica did not start: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Replica {
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("replica.log")).unwrap_or_default()
    }
}

pub async fn start_cluster(pg: &Postgres, name: &str, replicas: usize) -> Cluster {
    start_cluster_at(pg.create_database(name), replicas).await
}

/// `replicas` replicas on the database at `url` (any libpq URL).
pub async fn start_cluster_at(url: String, replicas: usize) -> Cluster {
    let mock = MockUpstream::start("127.0.0.1:0".parse().unwrap(), MockOptions::default()).await.unwrap();
    let config = config_file(mock.addr());
    let replicas =
        (0..replicas).map(|_| spawn_replica(config.path(), &url, tempfile::tempdir().unwrap())).collect();
    Cluster { url, config, replicas, mock }
}

pub async fn books(url: &str) -> Books {
    let db = Database::new(url, 2).unwrap();
    migrate(&db).await.unwrap();
    Books::new(db)
}

pub fn client(
) -> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

pub async fn admin(
    replica: &Replica,
    method: Method,
    path: &str,
    body: Value,
    key: Option<&str>,
) -> Option<Reply> {
    operator_call(&replica.admin, method, path, body, key).await
}

/// An admin write, retried while the cluster has no treasurer yet (503).
pub async fn admin_write(replica: &Replica, path: &str, body: Value, key: Option<&str>) -> Value {
    admin_change(replica, Method::POST, path, body, key).await
}

/// As [`admin_write`], with any method.
pub async fn admin_change(
    replica: &Replica,
    method: Method,
    path: &str,
    body: Value,
    key: Option<&str>,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = admin(replica, method.clone(), path, body.clone(), key).await;
        match reply {
            Some(reply) if reply.status.is_success() => return reply.json(),
            Some(reply) if reply.status != 503 => panic!("{path}: {} {:?}", reply.status, reply.body),
            _ => {}
        }
        assert!(Instant::now() < deadline, "{path}: no treasurer answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The id of the org's first key.
pub async fn first_key(replica: &Replica, org: u64) -> u64 {
    let reply =
        admin(replica, Method::GET, &format!("/admin/v1/orgs/{org}/keys"), Value::Null, None).await.unwrap();
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let keys = reply.json();
    let key = keys.get("keys").unwrap_or(&keys);
    key[0]["id"].as_u64().unwrap_or_else(|| panic!("no key in {keys}"))
}

/// An org whose pool holds `allocation` from its contract plus `purchase`
/// bought through a follower, and a Pro user's key; made through replica
/// `via`. Returns (org id, key secret).
pub async fn funded_org(cluster: &Cluster, via: usize, allocation: &str, purchase: &str) -> (u64, String) {
    let replica = &cluster.replicas[via];
    let today = chrono::Utc::now().date_naive().to_string();
    let org = admin_write(
        replica,
        "/admin/v1/orgs",
        json!({"name": "cluster-org", "contract": {"start": today, "years": 1, "platform_allocation_per_year": allocation}}),
        None,
    )
    .await;
    let org = org["id"].as_u64().unwrap();
    let base = format!("/admin/v1/orgs/{org}");
    let user =
        admin_write(replica, &format!("{base}/users"), json!({"name": "pat", "plan": "pro"}), None).await;
    let key = admin_write(replica, &format!("{base}/keys"), json!({"user": user["id"]}), None).await;
    admin_write(
        replica,
        &format!("{base}/purchases"),
        json!({"amount": purchase, "reference": "INV-1"}),
        Some("cluster-buy-1"),
    )
    .await;
    // The other replicas learn all of it from the log within a poll or two.
    let total = allocation.parse::<Decimal>().unwrap() + purchase.parse::<Decimal>().unwrap();
    for replica in &cluster.replicas {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reply = admin(replica, Method::GET, &format!("{base}/balances"), Value::Null, None).await;
            let shown = reply.as_ref().map(|reply| reply.json()["balances"][0].clone());
            let balance = |reply: &Reply| {
                reply.json()["balances"][0]["balance"].as_str().map(|b| b.parse::<Decimal>().unwrap())
            };
            if reply.is_some_and(|reply| reply.status == 200 && balance(&reply) == Some(total)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a replica did not learn the org ({shown:?}): {}",
                replica.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (org, key["secret"].as_str().unwrap().to_owned())
}

/// One chat call of known, fixed usage through `replica`: the status, or
/// `None` when the connection failed.
pub async fn call(proxy: &str, secret: &str) -> Option<u16> {
    let body = json!({"model": "mock-gpt", "max_tokens": 50, "seed": 40,
                      "messages": [{"role": "user", "content": "hello"}]});
    let request = Request::post(format!("http://{proxy}/v1/chat/completions"))
        .header("authorization", format!("Bearer {secret}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response =
        tokio::time::timeout(Duration::from_secs(10), client().request(request)).await.ok()?.ok()?;
    let status = response.status().as_u16();
    http_body_util::BodyExt::collect(response.into_body()).await.ok()?;
    Some(status)
}

/// The pool wallet's audit line in PostgreSQL.
pub async fn pool_audit(url: &str, org: u64) -> WalletAudit {
    let wallet = format!("pool:org_{org}");
    let audit = books(url).await.audit().await.unwrap();
    audit.into_iter().find(|line| line.wallet == wallet).unwrap_or_else(|| panic!("no wallet {wallet}"))
}

/// Waits until every replica shipped its outbox and the treasurer posted
/// every shipped debit.
pub async fn settled(url: &str) {
    let db = Database::new(url, 1).unwrap();
    let client = db.client().await.unwrap();
    let since: chrono::DateTime<chrono::Utc> = client.query_one("SELECT now()", &[]).await.unwrap().get(0);
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let client = db.client().await.unwrap();
        let unposted: i64 = client
            .query_one(
                "SELECT count(*) FROM cg_debits
                 WHERE post_seq > (SELECT posted_through FROM cg_posting) AND post_error IS NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        // Replicas seen shortly before the wait began are live; each must
        // report an empty outbox after it began (a killed one never does).
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE last_seen <= $1),
                        COALESCE(sum(outbox_len) FILTER (WHERE last_seen > $1), 0)::bigint
                 FROM cg_replicas WHERE last_seen > $1 - interval '1 second'",
                &[&since],
            )
            .await
            .unwrap();
        let (stale, outbox): (i64, i64) = (row.get(0), row.get(1));
        if unposted == 0 && outbox == 0 && stale == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{unposted} debits unposted, {outbox} unshipped, {stale} replicas not reporting"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `creditgate ledger verify --database-url-env` on the cluster's books.
pub fn verify(url: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .args(["ledger", "verify", "--database-url-env", URL_VAR])
        .env(URL_VAR, url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ledger verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Debits shipped for the pool, and their amounts.
pub async fn debits(url: &str, org: u64) -> Vec<Decimal> {
    let db = Database::new(url, 1).unwrap();
    let client = db.client().await.unwrap();
    let wallet = format!("pool:org_{org}");
    client
        .query("SELECT amount FROM cg_debits WHERE wallet = $1", &[&wallet])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// What each call held (the same for every call here).
pub async fn held_per_call(url: &str, org: u64) -> Decimal {
    let db = Database::new(url, 1).unwrap();
    let client = db.client().await.unwrap();
    let wallet = format!("pool:org_{org}");
    let held: String = client
        .query_one("SELECT max(body->>'held') FROM cg_debits WHERE wallet = $1", &[&wallet])
        .await
        .unwrap()
        .get(0);
    held.parse().unwrap()
}

/// The pool's balance as replica `replica`'s admin API shows it.
pub async fn shown_balance(replica: &Replica, org: u64) -> Decimal {
    let reply = admin(replica, Method::GET, &format!("/admin/v1/orgs/{org}/balances"), Value::Null, None)
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.json()["balances"][0]["balance"].as_str().unwrap().parse().unwrap()
}

/// One call of a load run.
#[derive(Clone, Copy, Debug)]
pub struct Call {
    /// Which replica it went to.
    pub replica: usize,
    pub status: Option<u16>,
    pub started: Instant,
    pub finished: Instant,
}

/// Calls through every replica in turn until `stop`.
pub fn load(
    proxies: Vec<String>,
    secret: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Call>> {
    let log = CallLog::default();
    let running = load_logged(proxies, secret, stop, log.clone());
    tokio::spawn(async move {
        running.await.unwrap();
        log.calls()
    })
}

/// The calls of load runs, as each ends.
#[derive(Clone, Default)]
pub struct CallLog(std::sync::Arc<std::sync::Mutex<Vec<Call>>>);

impl CallLog {
    pub fn calls(&self) -> Vec<Call> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (up to 30 s) until each of `replicas` served a call that
    /// started after `after`: load that runs for a fixed time after an
    /// outage may not come round to every replica, since calls caught in
    /// the outage take seconds each.
    pub async fn until_each_serves_after(&self, replicas: usize, after: Instant) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let served = |replica| {
            self.0
                .lock()
                .unwrap()
                .iter()
                .any(|c| c.replica == replica && c.status == Some(200) && c.started > after)
        };
        while !(0..replicas).all(served) {
            assert!(Instant::now() < deadline, "not every replica served again within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// [`load`], each call logged in `log` as it ends.
pub fn load_logged(
    proxies: Vec<String>,
    secret: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    log: CallLog,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let replica = i % proxies.len();
            let started = Instant::now();
            let status = call(&proxies[replica], &secret).await;
            log.0.lock().unwrap().push(Call { replica, status, started, finished: Instant::now() });
            i += 1;
        }
    })
}

/// `calls` concurrent calls, spread over the replicas in turn; their statuses.
pub async fn burst(cluster: &Cluster, secret: &str, calls: usize) -> Vec<Option<u16>> {
    let tasks: Vec<_> = (0..calls)
        .map(|i| {
            let proxy = cluster.replicas[i % cluster.replicas.len()].proxy.clone();
            let secret = secret.to_owned();
            tokio::spawn(async move { call(&proxy, &secret).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    statuses
}

/// The calls served (200) that began a lease TTL after the books became
/// unreachable at `cut_off` and ended before they could be reached again:
/// none may exist, since a hold needs a lease and none was renewed.
pub fn served_without_lease(seen: &[Call], cut_off: Instant, back: Instant) -> Vec<Call> {
    seen.iter()
        .filter(|call| {
            call.status == Some(200)
                && call.started > cut_off + Duration::from_millis(LEASE_TTL_MS)
                && call.finished < back
        })
        .copied()
        .collect()
}

/// A TCP relay between one replica and PostgreSQL that a test can cut, as
/// a network partition would: cut, it drops every relayed connection and
/// closes new ones at once; stalled, it keeps every connection open and
/// relays nothing (a silent partition, a frozen host); mended, it relays
/// again. Severed, the connections open now lose their client side while
/// the server side stays open, so the server still sees the sessions alive
/// (as behind a proxy that keeps its server connections).
pub struct DbGate {
    port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stalled: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    severs: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    relays: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl DbGate {
    /// A relay to the server of database URL `url` (`…@127.0.0.1:PORT/…`).
    pub async fn start(url: &str) -> DbGate {
        let server_port: u16 =
            url.split("127.0.0.1:").nth(1).and_then(|rest| rest.split('/').next()).unwrap().parse().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let relays = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stalled = std::sync::Arc::new(tokio::sync::watch::Sender::new(false));
        let severs = std::sync::Arc::new(tokio::sync::watch::Sender::new(0u64));
        let (gate_open, gate_stalled, gate_relays) = (open.clone(), stalled.clone(), relays.clone());
        let gate_severs = severs.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !gate_open.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let mut stalled = gate_stalled.subscribe();
                let mut severs = gate_severs.subscribe();
                severs.mark_unchanged();
                let relay = tokio::spawn(async move {
                    let stalled_at_once = *stalled.borrow();
                    if stalled_at_once {
                        // Open, and silent.
                        return std::future::pending::<()>().await;
                    }
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", server_port)).await
                    {
                        let stall = async { stalled.wait_for(|stalled| *stalled).await.is_ok() };
                        let (stalled_now, severed) = tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => (false, false),
                            stalled_now = stall => (stalled_now, false),
                            severed = severs.changed() => (false, severed.is_ok()),
                        };
                        if severed {
                            // The client side closes; the server's stays open.
                            drop(inbound);
                            let _keep = outbound;
                            std::future::pending::<()>().await;
                        } else if stalled_now {
                            // Both ends stay open (owned here), and nothing passes.
                            std::future::pending::<()>().await;
                        }
                    }
                });
                gate_relays.lock().unwrap().push(relay);
            }
        });
        DbGate { port, open, stalled, severs, relays, accept }
    }

    /// `url` with the relay in place of the server.
    pub fn url(&self, url: &str) -> String {
        let (head, rest) = url.split_once("127.0.0.1:").unwrap();
        let (_, path) = rest.split_once('/').unwrap();
        format!("{head}127.0.0.1:{}/{path}", self.port)
    }

    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for relay in self.relays.lock().unwrap().drain(..) {
            relay.abort();
        }
    }

    pub fn mend(&self) {
        self.stalled.send_replace(false);
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Every connection, open or new, stays open and silent until cut.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Closes the client side of every connection open now and keeps its
    /// server side open; new connections relay as before.
    pub fn sever_clients(&self) {
        self.severs.send_modify(|generation| *generation += 1);
    }
}

impl Drop for DbGate {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
