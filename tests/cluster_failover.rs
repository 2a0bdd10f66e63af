//! Cluster mode across a PostgreSQL failover: three `creditgate serve`
//! processes on a primary with a synchronous streaming standby, reached
//! through the libpq multi-host URL. The primary is killed (SIGKILL of the
//! postmaster and its backends, as a machine loss) while load runs, and the
//! standby is promoted a lease TTL later. The replicas serve inside their
//! leases, then answer 503, then find the promoted standby through the URL
//! and serve again; every call served is debited exactly once, no lease is
//! overdrawn, and the books balance (`creditgate ledger verify`).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::cluster::*;
use common::pg::Replicated;
use rust_decimal::Decimal;

/// How long the cluster has no primary: longer than a lease, so the
/// replicas run out of leased credit before the standby is promoted.
const OUTAGE: Duration = Duration::from_millis(LEASE_TTL_MS + 1_000);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_promoted_under_load_takes_over_and_the_books_stay_exact() {
    let mut pg = Replicated::start();
    let url = pg.create_database("failover");
    let cluster = start_cluster_at(url, 3).await;
    for replica in &cluster.replicas {
        assert!(
            !replica.log().contains("replicates asynchronously"),
            "a synchronous standby: {}",
            replica.log()
        );
    }
    let (org, secret) = funded_org(&cluster, 1, "50", "10").await;
    let addresses: Vec<_> = cluster.replicas.iter().map(|r| r.proxy.clone()).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let log = CallLog::default();
    let loads: Vec<_> =
        (0..3).map(|_| load_logged(addresses.clone(), secret.clone(), stop.clone(), log.clone())).collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;

    pg.primary.kill();
    let killed_at = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    // The standby takes writes a little before `pg_ctl promote` returns.
    let promoting_at = Instant::now();
    pg.standby.promote();
    let promoted_at = Instant::now();
    // Load runs until every replica served again after the promotion (the
    // check below), however long calls caught in the outage took.
    log.until_each_serves_after(cluster.replicas.len(), promoted_at).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for load in loads {
        load.await.unwrap();
    }
    let seen = log.calls();
    let logs = || {
        cluster
            .replicas
            .iter()
            .map(|replica| format!("---- {}\n{}", replica.proxy, replica.log()))
            .collect::<String>()
    };

    // A hold needs a lease, and none was renewed after the primary died: a
    // call that began a TTL into the outage cannot have been served.
    let without_lease = served_without_lease(&seen, killed_at, promoting_at);
    assert!(without_lease.is_empty(), "served without a lease: {without_lease:?}");
    let unavailable = seen.iter().filter(|call| call.status == Some(503)).count();
    assert!(unavailable > 0, "503 once the leases ran out");
    // Every replica found the promoted standby through the multi-host URL.
    for replica in 0..cluster.replicas.len() {
        let recovered = seen
            .iter()
            .filter(|call| call.replica == replica && call.status == Some(200) && call.started > promoted_at)
            .count();
        assert!(recovered > 0, "replica {replica} serves again after the promotion:\n{}", logs());
    }
    let other: Vec<_> = seen.iter().filter(|call| !matches!(call.status, Some(200 | 503))).collect();
    assert!(other.is_empty(), "only 200 or 503: {other:?}");

    settled(&cluster.url).await;
    let served = seen.iter().filter(|call| call.status == Some(200)).count();
    let amounts = debits(&cluster.url, org).await;
    assert_eq!(amounts.len(), served, "every call served is debited once, none lost in the failover");
    let audit = pool_audit(&cluster.url, org).await;
    assert!(audit.balances(), "{audit:?}");
    assert_eq!(audit.uncovered, Decimal::ZERO, "every debit was covered by a lease: {audit:?}");
    verify(&cluster.url);
}
