//! Cluster mode end to end: three `creditgate serve` processes with
//! `[cluster]` on one real PostgreSQL, in front of a real mock upstream.
//! Money is held under leases, so the replicas together never spend more
//! than a wallet holds; a replica killed with SIGKILL leaves its leases to
//! expire back to the wallet; a database outage turns into 503s once the
//! leases run out, never into service without one; and the books in
//! PostgreSQL balance after each (`creditgate ledger verify
//! --database-url-env`).
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::pg::Postgres;
use common::*;
use creditgate::cluster::migrate::migrate;
use creditgate::cluster::{Books, Database, WalletAudit};
use creditgate::mock::{MockOptions, MockUpstream};
use http::{Method, Request};
use http_body_util::Full;
use rust_decimal::Decimal;
use serde_json::{json, Value};

const URL_VAR: &str = "CG_TEST_DATABASE_URL";
/// Short leases and treasury, so expiry and takeover fit in a test.
const LEASE_TTL_MS: u64 = 2_000;
/// How close to a kill a lost settle must have been served: many outbox
/// flushes (every 20 ms here) on a loaded machine.
const FLUSH_BOUND: Duration = Duration::from_millis(250);

struct Replica {
    child: Child,
    proxy: String,
    admin: String,
    data: tempfile::TempDir,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    url: String,
    config: tempfile::NamedTempFile,
    replicas: Vec<Replica>,
    _mock: MockUpstream,
}

fn config_file(mock: std::net::SocketAddr) -> tempfile::NamedTempFile {
    let text = config_text(mock, "", "").replace(
        "[upstreams.mock]",
        &format!(
            "[cluster]\ndatabase_url_env = \"{URL_VAR}\"\nlease_ttl_ms = {LEASE_TTL_MS}\ntreasury_ttl_ms = 1500\nship_interval_ms = 20\n\n[upstreams.mock]"
        ),
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

/// Starts a replica whose log goes to `<data>/replica.log` (kept for a
/// failing test's message); returns once it serves.
fn spawn_replica(config: &std::path::Path, url: &str, data: tempfile::TempDir) -> Replica {
    let log_path = data.path().join("replica.log");
    let log = std::fs::File::options().create(true).append(true).open(&log_path).unwrap();
    let child =
        serve_command(config, data.path()).env(URL_VAR, url).stderr(Stdio::from(log)).spawn().unwrap();
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
    fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("replica.log")).unwrap_or_default()
    }
}

async fn start_cluster(pg: &Postgres, name: &str, replicas: usize) -> Cluster {
    let url = pg.create_database(name);
    let mock = MockUpstream::start("127.0.0.1:0".parse().unwrap(), MockOptions::default()).await.unwrap();
    let config = config_file(mock.addr());
    let replicas =
        (0..replicas).map(|_| spawn_replica(config.path(), &url, tempfile::tempdir().unwrap())).collect();
    Cluster { url, config, replicas, _mock: mock }
}

async fn books(url: &str) -> Books {
    let db = Database::new(url, 2).unwrap();
    migrate(&db).await.unwrap();
    Books::new(db)
}

fn client(
) -> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

async fn admin(
    replica: &Replica,
    method: Method,
    path: &str,
    body: Value,
    key: Option<&str>,
) -> Option<Reply> {
    operator_call(&replica.admin, method, path, body, key).await
}

/// An admin write, retried while the cluster has no treasurer yet (503).
async fn admin_write(replica: &Replica, path: &str, body: Value, key: Option<&str>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = admin(replica, Method::POST, path, body.clone(), key).await;
        match reply {
            Some(reply) if reply.status.is_success() => return reply.json(),
            Some(reply) if reply.status != 503 => panic!("{path}: {} {:?}", reply.status, reply.body),
            _ => {}
        }
        assert!(Instant::now() < deadline, "{path}: no treasurer answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An org whose pool holds `allocation` from its contract plus `purchase`
/// bought through a follower, and a Pro user's key; made through replica
/// `via`. Returns (org id, key secret).
async fn funded_org(cluster: &Cluster, via: usize, allocation: &str, purchase: &str) -> (u64, String) {
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
async fn call(proxy: &str, secret: &str) -> Option<u16> {
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
async fn pool_audit(url: &str, org: u64) -> WalletAudit {
    let wallet = format!("pool:org_{org}");
    let audit = books(url).await.audit().await.unwrap();
    audit.into_iter().find(|line| line.wallet == wallet).unwrap_or_else(|| panic!("no wallet {wallet}"))
}

/// Waits until every replica shipped its outbox and the treasurer posted
/// every shipped debit.
async fn settled(url: &str) {
    let db = Database::new(url, 1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let client = db.client().await.unwrap();
        let unposted: i64 =
            client.query_one("SELECT count(*) FROM cg_debits WHERE NOT posted", &[]).await.unwrap().get(0);
        let outbox: i64 = client
            .query_one("SELECT COALESCE(sum(outbox_len), 0)::bigint FROM cg_replicas", &[])
            .await
            .unwrap()
            .get(0);
        if unposted == 0 && outbox == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{unposted} debits unposted, {outbox} unshipped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `creditgate ledger verify --database-url-env` on the cluster's books.
fn verify(url: &str) {
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
async fn debits(url: &str, org: u64) -> Vec<Decimal> {
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
async fn held_per_call(url: &str, org: u64) -> Decimal {
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
async fn shown_balance(replica: &Replica, org: u64) -> Decimal {
    let reply = admin(replica, Method::GET, &format!("/admin/v1/orgs/{org}/balances"), Value::Null, None)
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.json()["balances"][0]["balance"].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_max_cost_requests_over_three_replicas_never_overdraw_one_small_wallet() {
    let pg = Postgres::start();
    let cluster = start_cluster(&pg, "overdraft", 3).await;
    // About 25 calls' worth, bought partly through a follower.
    let (org, secret) = funded_org(&cluster, 2, "0.003", "0.002").await;
    let funded = Decimal::new(5, 3);
    let audit = pool_audit(&cluster.url, org).await;
    assert_eq!(audit.funded, funded, "the contract's grant and the purchase are in the shared books");

    let calls: Vec<_> = (0..120)
        .map(|i| {
            let (proxy, secret) = (cluster.replicas[i % 3].proxy.clone(), secret.clone());
            tokio::spawn(async move { call(&proxy, &secret).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in calls {
        statuses.push(task.await.unwrap());
    }
    let served = statuses.iter().filter(|s| **s == Some(200)).count();
    let refused = statuses.iter().filter(|s| **s == Some(402)).count();
    if served + refused != statuses.len() {
        for replica in &cluster.replicas {
            eprintln!("---- {}\n{}", replica.proxy, replica.log());
        }
    }
    assert_eq!(served + refused, statuses.len(), "only 200 or 402: {statuses:?}");
    assert!(refused > 0 && served > 10, "{served} served, {refused} refused");

    settled(&cluster.url).await;
    let amounts = debits(&cluster.url, org).await;
    assert_eq!(amounts.len(), served, "one debit per call served, none for a refusal");
    assert!(amounts.windows(2).all(|pair| pair[0] == pair[1]), "identical calls cost the same: {amounts:?}");
    let spent: Decimal = amounts.iter().sum();
    let audit = pool_audit(&cluster.url, org).await;
    assert_eq!(audit.uncovered, Decimal::ZERO, "every debit was covered by a lease: zero overdraft");
    assert!(spent <= funded, "spent {spent} of {funded}");
    // Near empty, leases shrink to one hold, so when the burst ends at most
    // one hold's worth sits unspent on each replica.
    let held = held_per_call(&cluster.url, org).await;
    assert!(funded - spent < held * Decimal::from(3), "{spent} of {funded} spent; holds of {held}");
    assert_eq!(audit.balance, funded - spent);
    assert!(audit.balances(), "{audit:?}");
    verify(&cluster.url);
    // Every replica's view shows the books' balance once it read the log.
    for replica in &cluster.replicas {
        let deadline = Instant::now() + Duration::from_secs(10);
        while shown_balance(replica, org).await != funded - spent {
            assert!(Instant::now() < deadline, "a replica's view did not catch up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Calls through every live replica in a loop until `stop`; counts statuses.
fn load(
    proxies: Vec<String>,
    secret: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(usize, Option<u16>, Instant)>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let index = i % proxies.len();
            let status = call(&proxies[index], &secret).await;
            seen.push((index, status, Instant::now()));
            i += 1;
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_under_load_leaves_its_leases_to_expire_and_the_books_balance() {
    let pg = Postgres::start();
    let mut cluster = start_cluster(&pg, "killed", 3).await;
    let (org, secret) = funded_org(&cluster, 0, "50", "10").await;
    let addresses: Vec<_> = cluster.replicas.iter().map(|r| r.proxy.clone()).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loads: Vec<_> = (0..4).map(|_| load(addresses.clone(), secret.clone(), stop.clone())).collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let victim = cluster.replicas.remove(1);
    let victim_name = std::fs::read_to_string(victim.data.path().join("replica-name")).unwrap();
    let killed_at = Instant::now();
    let mut victim = victim;
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = Vec::new();
    for load in loads {
        seen.extend(load.await.unwrap());
    }
    let after_kill: Vec<_> = seen.iter().filter(|(index, _, at)| *index != 1 && *at > killed_at).collect();
    assert!(!after_kill.is_empty());
    assert!(after_kill.iter().all(|(_, status, _)| *status == Some(200)), "the others kept serving");

    // Its leases go back within the TTL (plus the sweep's grace and round).
    let books = books(&cluster.url).await;
    let deadline = killed_at + Duration::from_millis(LEASE_TTL_MS * 3);
    loop {
        let open = books.open_leases(victim_name.trim()).await.unwrap();
        if open.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the killed replica's leases are still open: {open:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    settled(&cluster.url).await;
    let served = seen.iter().filter(|(_, status, _)| *status == Some(200)).count();
    let before_restart = debits(&cluster.url, org).await;
    assert!(before_restart.len() <= served, "{} debits, {served} served", before_restart.len());
    assert!(pool_audit(&cluster.url, org).await.balances());
    verify(&cluster.url);

    // Restarted on its data directory, it ships what its outbox kept.
    let data = std::mem::replace(&mut victim.data, tempfile::tempdir().unwrap());
    let restarted = spawn_replica(cluster.config.path(), &cluster.url, data);
    let restarted_name = std::fs::read_to_string(restarted.data.path().join("replica-name")).unwrap();
    assert_eq!(restarted_name, victim_name, "the same replica");
    settled(&cluster.url).await;
    let after_restart = debits(&cluster.url, org).await;
    // Only a settle made within one outbox flush of the kill can be lost
    // (as a single node loses one within its flush window).
    let lost = served - after_restart.len();
    let at_risk = seen
        .iter()
        .filter(|(index, status, at)| {
            *index == 1 && *status == Some(200) && *at <= killed_at && killed_at - *at < FLUSH_BOUND
        })
        .count();
    assert!(
        lost <= at_risk,
        "{lost} served calls lost, only {at_risk} were served within a flush of the kill"
    );
    let audit = pool_audit(&cluster.url, org).await;
    assert!(audit.balances(), "{audit:?}");
    // Debits shipped after their leases expired are posted all the same, and
    // whatever no lease covered is recorded as the wallet's overrun.
    let late: Decimal = after_restart[before_restart.len()..].iter().sum();
    assert!(audit.uncovered <= late, "uncovered {} beyond the late debits {late}", audit.uncovered);
    verify(&cluster.url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_postgresql_stopped_replicas_serve_only_inside_their_leases_then_answer_503() {
    let mut pg = Postgres::start();
    let cluster = start_cluster(&pg, "outage", 3).await;
    let (org, secret) = funded_org(&cluster, 1, "50", "10").await;
    let addresses: Vec<_> = cluster.replicas.iter().map(|r| r.proxy.clone()).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loads: Vec<_> = (0..3).map(|_| load(addresses.clone(), secret.clone(), stop.clone())).collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;

    pg.stop();
    let stopped_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    pg.restart();
    let restarted_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = Vec::new();
    for load in loads {
        seen.extend(load.await.unwrap());
    }
    // Leases stop taking holds a safety margin before their deadline: past
    // the TTL of the outage, nothing is served until the books are back.
    let without_lease: Vec<_> = seen
        .iter()
        .filter(|(_, status, at)| {
            *status == Some(200)
                && *at > stopped_at + Duration::from_millis(LEASE_TTL_MS + 500)
                && *at < restarted_at
        })
        .collect();
    assert!(without_lease.is_empty(), "served without a lease: {without_lease:?}");
    let unavailable = seen.iter().filter(|(_, status, _)| *status == Some(503)).count();
    assert!(unavailable > 0, "503 once the leases ran out");
    let recovered = seen.iter().filter(|(_, status, at)| *status == Some(200) && *at > restarted_at).count();
    assert!(recovered > 0, "serving again once the books are back");

    settled(&cluster.url).await;
    let served = seen.iter().filter(|(_, status, _)| *status == Some(200)).count();
    assert_eq!(debits(&cluster.url, org).await.len(), served, "every call served is debited once");
    let audit = pool_audit(&cluster.url, org).await;
    assert!(audit.balances(), "{audit:?}");
    verify(&cluster.url);
}
