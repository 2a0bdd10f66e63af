//! Cluster mode's one set of books on a real PostgreSQL: the treasurer's
//! ledger journals to the shared log, followers replay it and hold the same
//! books, time rules run once, and a treasurer that lost the treasury can
//! never fork the log.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use common::pg::Postgres;
use creditgate::clock::{Clock, ManualClock};
use creditgate::cluster::journal::{decode, Appended, LotMove};
use creditgate::cluster::migrate::migrate;
use creditgate::cluster::{Books, Database, DebitDetail, LeaseBook, LeaseSettings, Replica, ReplicaSettings};
use creditgate::ledger::contract::ContractTerm;
use creditgate::ledger::entity::{KeyHash, Plan};
use creditgate::ledger::entry::{EntryKind, LedgerEntry, SettleDetails, Usage};
use creditgate::ledger::ids::{KeyId, OrgId, Owner, RequestId, UserId, WalletId};
use creditgate::ledger::journal::RecordBody;
use creditgate::ledger::limit::Limits;
use creditgate::ledger::{
    Ledger, LedgerConfig, LedgerError, NewKey, NewOrg, NewUser, PurchaseRequest, SpendContext,
};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

async fn books(url: &str) -> Books {
    let db = Database::new(url, 4).unwrap();
    migrate(&db).await.unwrap();
    Books::new(db)
}

fn settings(name: &str) -> ReplicaSettings {
    let mut settings = ReplicaSettings::new(name);
    settings.treasury_ttl = Duration::from_millis(1500);
    settings
}

async fn replica(url: &str, name: &str) -> Replica {
    Replica::open(books(url).await, LedgerConfig::default(), settings(name)).await.unwrap()
}

fn at(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

/// Every record in the log, decoded, in log order.
async fn log(url: &str) -> Vec<creditgate::ledger::journal::Record> {
    let books = books(url).await;
    let mut records = Vec::new();
    loop {
        let after = records.len() as i64;
        let batch = books.tail(after, 1000).await.unwrap();
        if batch.is_empty() {
            return records;
        }
        records.extend(batch.iter().map(|record| decode(record.gseq, &record.body).unwrap()));
    }
}

fn entries(records: &[creditgate::ledger::journal::Record]) -> Vec<LedgerEntry> {
    let mut entries: Vec<LedgerEntry> = records
        .iter()
        .filter_map(|record| match &record.body {
            RecordBody::Entry(entry) => Some(entry.clone()),
            _ => None,
        })
        .collect();
    entries.sort_by_key(|entry| entry.id);
    entries
}

/// The audit over the log's entries finds every wallet of `ledger` exact.
fn assert_audited(ledger: &Ledger, entries: &[LedgerEntry]) {
    let report = ledger.verify(entries);
    assert!(report.is_clean(), "audit found: {:#?}", report.mismatches);
}

/// The wallet's money as both ledgers see it.
fn same_wallet(a: &Ledger, b: &Ledger, wallet: WalletId, now: DateTime<Utc>) {
    let (x, y) = (a.balance(wallet, now).unwrap(), b.balance(wallet, now).unwrap());
    assert_eq!((x.balance, x.totals, &x.lots), (y.balance, y.totals, &y.lots), "{wallet} differs");
}

/// A database, a clock at `start`, a treasurer and a follower.
async fn cluster(name: &str, start: &str) -> (Postgres, String, Arc<ManualClock>, Replica, Replica) {
    let pg = Postgres::start();
    let url = pg.create_database(name);
    let clock = ManualClock::new(at(start));
    let treasurer = replica(&url, "r1").await;
    let follower = replica(&url, "r2").await;
    assert!(treasurer.try_promote(clock.as_ref()).await.unwrap());
    (pg, url, clock, treasurer, follower)
}

/// Waits for the treasurer's records to reach the log, then has the
/// follower apply all of them.
async fn follow_all(treasurer: &Replica, follower: &Replica) {
    tokio::task::block_in_place(|| treasurer.sync()).unwrap();
    follow(follower).await;
}

async fn follow(replica: &Replica) {
    while replica.catch_up().await.unwrap() > 0 {}
}

/// A contract from 2026 on, with no allocation: purchases alone fund it.
fn term() -> ContractTerm {
    ContractTerm {
        start: "2026-01-01".parse().unwrap(),
        years: 2,
        platform_allocation_per_year: dec!(0),
        pro_seats: 0,
        seat_allocation_per_year: dec!(0),
    }
}

/// A purchase of `amount` under `idempotency_key`.
fn purchase(org: OrgId, amount: Decimal, idempotency_key: &str) -> PurchaseRequest {
    PurchaseRequest {
        org,
        amount,
        expires_at: None,
        reference: None,
        idempotency_key: idempotency_key.into(),
    }
}

struct Seeded {
    org: OrgId,
    lite: UserId,
    pro: UserId,
}

fn seed(ledger: &Ledger, now: DateTime<Utc>) -> Seeded {
    let org = ledger
        .create_org(NewOrg { name: "acme".into(), time_zone: chrono_tz::UTC, contract: Some(term()) }, now)
        .unwrap()
        .id;
    let user = |name: &str, plan, allowance| NewUser {
        name: name.into(),
        plan,
        lite_monthly_allowance: allowance,
        prorate_on_downgrade: false,
        limits: Limits::NONE,
    };
    let lite = ledger.create_user(org, user("lite", Plan::Lite, dec!(5)), now).unwrap().id;
    let pro = ledger.create_user(org, user("pro", Plan::Pro, dec!(0)), now).unwrap().id;
    ledger.purchase(purchase(org, dec!(100), "order-1"), now).unwrap();
    Seeded { org, lite, pro }
}

fn spend(ledger: &Ledger, org: OrgId, owner: Owner, amount: Decimal, now: DateTime<Utc>) {
    let key = new_key(ledger, org, owner, now);
    spend_with(ledger, key, owner, amount, now);
}

fn new_key(ledger: &Ledger, org: OrgId, owner: Owner, now: DateTime<Utc>) -> KeyId {
    let secret = format!("secret-{}", uuid::Uuid::now_v7());
    let key = NewKey { owner, hash: KeyHash::of_secret(&secret), label: "k".into(), limits: Limits::NONE };
    ledger.create_key(org, key, now).unwrap().id
}

/// A request held and settled at `amount` through `key` (records the
/// journal appends in its own time: a settle does not sync).
fn spend_with(ledger: &Ledger, key: KeyId, owner: Owner, amount: Decimal, now: DateTime<Utc>) {
    let wallet = ledger.wallet_of(owner).unwrap();
    let request = RequestId(uuid::Uuid::now_v7());
    let hold = ledger.hold(wallet, request, amount, SpendContext { key, end_user: None }, now).unwrap();
    let details = SettleDetails {
        route: Arc::from("/v1/chat/completions"),
        model: Arc::from("gpt-test"),
        usage: Usage { input_tokens: 10, output_tokens: 20, cached_input_tokens: 0, tool_units: 0 },
        price_version: Arc::from("prices-v1"),
        operator_cost: None,
    };
    hold.settle(amount, details, now).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_replay_the_treasurers_books_exactly() {
    let (_pg, url, clock, treasurer, follower) = cluster("replay", "2026-03-10T12:00:00Z").await;
    assert!(!follower.try_promote(clock.as_ref()).await.unwrap(), "one treasurer at a time");

    let now = clock.now();
    let seeded = seed(treasurer.ledger(), now);
    spend(treasurer.ledger(), seeded.org, Owner::User(seeded.pro), dec!(1.25), now);
    spend(treasurer.ledger(), seeded.org, Owner::User(seeded.lite), dec!(0.5), now);

    // Once the treasurer's records are in the log, a follower that reads it
    // has everything, entities and money alike.
    follow_all(&treasurer, &follower).await;
    let (a, b) = (treasurer.ledger(), follower.ledger());
    assert_eq!(a.orgs(), b.orgs());
    assert_eq!(a.users_page(seeded.org, 0, usize::MAX), b.users_page(seeded.org, 0, usize::MAX));
    assert_eq!(a.keys_of(seeded.org), b.keys_of(seeded.org));
    for wallet in [WalletId::Pool(seeded.org), WalletId::Lite(seeded.lite)] {
        same_wallet(a, b, wallet, now);
    }
    assert_eq!(b.balance(WalletId::Pool(seeded.org), now).unwrap().balance, dec!(98.75));
    assert_eq!(b.balance(WalletId::Lite(seeded.lite), now).unwrap().balance, dec!(4.5));
    let records = log(&url).await;
    assert_audited(a, &entries(&records));
    assert_audited(b, &entries(&records));

    // A replica started later rebuilds the same books from the log alone.
    let late = replica(&url, "r3").await;
    same_wallet(a, late.ledger(), WalletId::Pool(seeded.org), now);
    same_wallet(a, late.ledger(), WalletId::Lite(seeded.lite), now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_makes_no_records_and_a_lite_reset_happens_once() {
    let (_pg, url, clock, treasurer, follower) = cluster("once", "2026-03-31T23:00:00Z").await;
    let seeded = seed(treasurer.ledger(), clock.now());
    spend(treasurer.ledger(), seeded.org, Owner::User(seeded.lite), dec!(3), clock.now());
    follow_all(&treasurer, &follower).await;
    let lite = WalletId::Lite(seeded.lite);

    // April arrives. The follower reads the wallet at the new time but does
    // not grant April's allowance itself; and it refuses any change.
    clock.advance(TimeDelta::hours(2));
    let before = log(&url).await.len();
    assert_eq!(follower.ledger().balance(lite, clock.now()).unwrap().balance, dec!(2));
    let refused = follower.ledger().purchase(purchase(seeded.org, dec!(1), "on-a-follower"), clock.now());
    assert!(matches!(refused, Err(LedgerError::Unavailable(_))), "{refused:?}");
    assert_eq!(log(&url).await.len(), before, "a follower appended to the log");

    // The treasurer's tick grants it (and writes March's remainder off),
    // and the follower learns both from the log.
    treasurer.ledger().tick(clock.now());
    treasurer.ledger().balance(lite, clock.now()).unwrap();
    let settled = follower.ledger().balance(lite, clock.now()).unwrap().balance;
    assert_eq!(settled, dec!(2), "the follower moved before the treasurer's records arrived");
    follow_all(&treasurer, &follower).await;
    same_wallet(treasurer.ledger(), follower.ledger(), lite, clock.now());
    assert_eq!(follower.ledger().balance(lite, clock.now()).unwrap().balance, dec!(5));
    let records = log(&url).await;
    let april_grants = entries(&records)
        .iter()
        .filter(|entry| entry.wallet == lite && matches!(entry.kind, EntryKind::Grant { .. }))
        .filter(|entry| entry.at >= at("2026-04-01T00:00:00Z"))
        .count();
    assert_eq!(april_grants, 1, "April's allowance granted once");
    assert_audited(follower.ledger(), &entries(&records));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_treasurer_cannot_fork_the_log() {
    let (_pg, url, clock, old, new) = cluster("fence", "2026-05-05T10:00:00Z").await;
    let seeded = seed(old.ledger(), clock.now());

    // The old treasurer stops renewing (a pause, a partition); once its
    // treasury lapses the follower takes it, with a new epoch.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert!(new.try_promote(clock.as_ref()).await.unwrap());
    assert!(new.epoch() > old.epoch());
    let purchase = |key: &str| purchase(seeded.org, dec!(10), key);
    new.ledger().purchase(purchase("after-failover"), clock.now()).unwrap();

    // The old one still believes it is treasurer: its change is refused by
    // the log (never acknowledged), and its ledger stops taking work.
    let forked = old.ledger().purchase(purchase("from-the-old-epoch"), clock.now());
    assert!(matches!(forked, Err(LedgerError::Unavailable(_))), "{forked:?}");
    assert!(!old.renew().await.unwrap(), "the old epoch cannot be renewed");
    let again = old.ledger().purchase(purchase("later"), clock.now());
    assert!(again.is_err(), "a deposed treasurer took new work: {again:?}");

    // The log holds one history: the new treasurer's, which a fresh replica
    // rebuilds exactly.
    let records = log(&url).await;
    assert!(!records.iter().any(|record| matches!(&record.body,
        RecordBody::Entry(entry) if matches!(&entry.kind, EntryKind::Purchase { idempotency_key, .. }
            if idempotency_key != "order-1" && idempotency_key != "after-failover"))));
    let fresh = replica(&url, "r3").await;
    same_wallet(new.ledger(), fresh.ledger(), WalletId::Pool(seeded.org), clock.now());
    assert_eq!(fresh.ledger().balance(WalletId::Pool(seeded.org), clock.now()).unwrap().balance, dec!(110));
    assert_audited(fresh.ledger(), &entries(&records));
}

/// A treasurer with a seeded org and a follower that has applied all of it.
async fn a_follower_in_step(name: &str) -> (Postgres, String, Replica, Replica) {
    let (pg, url, clock, treasurer, follower) = cluster(name, "2026-05-05T10:00:00Z").await;
    let _seeded = seed(treasurer.ledger(), clock.now());
    follow_all(&treasurer, &follower).await;
    (pg, url, treasurer, follower)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_meets_a_log_record_that_does_not_replay_must_restart() {
    // Before, it logged a warning and retried the same record forever,
    // serving from a view that no longer moved (revoked keys still working,
    // purchases never spendable) while it said it was ready.
    let (_pg, url, _treasurer, follower) = a_follower_in_step("no_replay").await;
    assert_eq!(follower.must_restart(), None);
    // A ledger entry the follower has applied, appended to the log again
    // (as a bug could): it reads, but its balance no longer matches.
    let books = books(&url).await;
    let entry = books
        .tail(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .find(|record| matches!(decode(record.gseq, &record.body).unwrap().body, RecordBody::Entry(_)))
        .unwrap();
    books.append("intruder", &[(1, entry.body)]).await.unwrap();
    assert!(follower.catch_up().await.is_err());
    let reason = follower.must_restart().expect("a replica whose view stopped must restart");
    assert!(reason.contains("does not replay"), "{reason}");
    // Retrying does not clear it.
    assert!(follower.catch_up().await.is_err());
    assert!(follower.must_restart().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_meets_a_log_record_it_cannot_read_says_it_is_not_ready() {
    // A newer treasurer's record (an upgrade done out of order): restarting
    // the same binary cannot read it either, so the replica stays up inside
    // its leases and reports why it is not ready, instead of crash-looping.
    let (_pg, url, _treasurer, follower) = a_follower_in_step("unreadable").await;
    assert_eq!(follower.unreadable(), None);
    books(&url).await.append("intruder", &[(1, b"a record from a later version".to_vec())]).await.unwrap();
    assert!(follower.catch_up().await.is_err());
    let reason = follower.unreadable().expect("the replica says its view stopped");
    assert!(reason.contains("cannot be read by this version"), "{reason}");
    assert_eq!(follower.must_restart(), None, "a restart would not help");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_treasurer_whose_log_task_ends_before_shutdown_must_restart_and_its_term_lapses() {
    // A panic in the treasurer's log-following task ends it as an abort
    // does: tokio drops it unfinished. Before, the keeper thread went on
    // renewing the term, so posting, ticks and replay stopped for the whole
    // cluster and no follower could take over, while readiness said 200.
    let pg = Postgres::start();
    let url = pg.create_database("ended_early");
    let clock: Arc<ManualClock> = ManualClock::new(at("2026-06-01T08:00:00Z"));
    let first = Arc::new(replica(&url, "r1").await);
    let second = replica(&url, "r2").await;
    let stop = tokio_util::sync::CancellationToken::new();
    let wakeups = creditgate::cluster::Wakeups::start(Database::new(&url, 1).unwrap(), stop.clone());
    let running = tokio::spawn(first.clone().run(clock.clone(), wakeups, stop.clone()));
    while first.epoch().is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(first.must_restart(), None);
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    let reason = first.must_restart().expect("a treasurer whose log task ended must restart");
    assert!(reason.contains("ended before shutdown"), "{reason}");
    // Its term is no longer renewed: it lapses (1.5 s) and another takes it.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !second.try_promote(clock.as_ref()).await.unwrap() {
        assert!(std::time::Instant::now() < deadline, "the ended treasurer's term was still renewed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_treasurer_that_steps_down_hands_over_at_once() {
    let pg = Postgres::start();
    let url = pg.create_database("handover");
    let clock: Arc<ManualClock> = ManualClock::new(at("2026-06-01T08:00:00Z"));
    // A treasury lease far longer than the handover's bound below, so a
    // handover that waited for it to lapse, or for the follower's next
    // periodic claim (every sixth of it, 10 s), fails however slow the
    // machine: only the step-down's wake-up hands over in time.
    let patient = |name: &str| {
        let mut settings = settings(name);
        settings.treasury_ttl = Duration::from_secs(60);
        settings
    };
    let first =
        Arc::new(Replica::open(books(&url).await, LedgerConfig::default(), patient("r1")).await.unwrap());
    let second =
        Arc::new(Replica::open(books(&url).await, LedgerConfig::default(), patient("r2")).await.unwrap());
    let stop_first = tokio_util::sync::CancellationToken::new();
    let stop_second = tokio_util::sync::CancellationToken::new();
    // Each listens for the database's wake-ups as a replica process does.
    let listen = |stop: &tokio_util::sync::CancellationToken| {
        creditgate::cluster::Wakeups::start(Database::new(&url, 1).unwrap(), stop.clone())
    };
    let run_first = tokio::spawn(first.clone().run(clock.clone(), listen(&stop_first), stop_first.clone()));
    while first.epoch().is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let run_second =
        tokio::spawn(second.clone().run(clock.clone(), listen(&stop_second), stop_second.clone()));
    let seeded = seed(first.ledger(), clock.now());

    // A clean shutdown gives the treasury up: the other replica takes it
    // well inside the treasury's lease, with everything applied.
    stop_first.cancel();
    run_first.await.unwrap();
    let started = std::time::Instant::now();
    while second.epoch().is_none() {
        assert!(started.elapsed() < Duration::from_secs(5), "no handover within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(second.ledger().balance(WalletId::Pool(seeded.org), clock.now()).unwrap().balance, dec!(100));
    second.ledger().purchase(purchase(seeded.org, dec!(1), "on-the-new-treasurer"), clock.now()).unwrap();
    stop_second.cancel();
    run_second.await.unwrap();
    let records = log(&url).await;
    assert_audited(second.ledger(), &entries(&records));
}

/// Records the treasurer's ledger made without a sync (a tick's write-off
/// and grant) are in the log when its step-down returns: the term is given
/// up only after them, so a new treasurer cannot fence them off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_treasurer_steps_down_only_after_its_records_reach_the_log() {
    let (_pg, url, clock, treasurer, follower) = cluster("step-down", "2026-03-31T22:00:00Z").await;
    let seeded = seed(treasurer.ledger(), clock.now());
    tokio::task::block_in_place(|| treasurer.sync()).unwrap();
    let before = log(&url).await.len();
    // The log's appends wait behind this lock until the test lets go.
    let db = Database::new(&url, 1).unwrap();
    let blocker = lock_log(&db).await;
    // April: March's allowance written off, April's granted; nobody syncs.
    clock.advance(TimeDelta::hours(3));
    treasurer.ledger().tick(clock.now());
    let stepping = tokio::spawn(async move {
        treasurer.step_down().await;
        treasurer
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stepping.is_finished(), "the step-down gave the term up with its records still on their way");
    // Read in the locking session, at once: the step-down waits 2 s at most.
    let logged: i64 = blocker.query_one("SELECT count(*) FROM cg_log", &[]).await.unwrap().get(0);
    assert_eq!(usize::try_from(logged).unwrap(), before, "the append waits for the lock");
    blocker.batch_execute("COMMIT").await.unwrap();
    let _treasurer = stepping.await.unwrap();
    let records = log(&url).await;
    assert!(
        records.len() >= before + 2,
        "the tick's records reached the log: {} then {}",
        before,
        records.len()
    );
    assert!(follower.try_promote(clock.as_ref()).await.unwrap());
    assert_eq!(follower.ledger().balance(WalletId::Lite(seeded.lite), clock.now()).unwrap().balance, dec!(5));
    assert_audited(follower.ledger(), &entries(&log(&url).await));
}

/// Records nobody syncs (a tick's write-off and grant) are not left in the
/// queue: the appender takes them once the first has waited its linger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_nobody_syncs_reach_the_log_by_themselves() {
    let (_pg, url, clock, treasurer, follower) = cluster("linger", "2026-03-31T22:00:00Z").await;
    let seeded = seed(treasurer.ledger(), clock.now());
    tokio::task::block_in_place(|| treasurer.sync()).unwrap();
    let before = log(&url).await.len();
    // April: March's allowance written off, April's granted; nobody syncs.
    clock.advance(TimeDelta::hours(3));
    treasurer.ledger().tick(clock.now());
    let arrived = wait_for_log(&url, before + 2, Duration::from_secs(5)).await;
    assert!(arrived, "the tick's records stayed in the treasurer's queue");
    follow(&follower).await;
    assert_april_applied(&follower, seeded.lite, clock.now());
    assert_audited(follower.ledger(), &entries(&log(&url).await));
}

/// The follower applied April's reset: March's allowance written off and
/// April's granted (the balance alone is 5 with or without them).
fn assert_april_applied(follower: &Replica, lite: UserId, now: DateTime<Utc>) {
    let wallet = follower.ledger().balance(WalletId::Lite(lite), now).unwrap();
    assert_eq!(
        (wallet.balance, wallet.totals.granted, wallet.totals.written_off),
        (dec!(5), dec!(10), dec!(5))
    );
}

/// An append the database cuts short (its connection ended under it) is
/// tried again on another connection, and its records reach the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_cut_short_is_retried_and_its_records_reach_the_log() {
    let (_pg, url, clock, treasurer, follower) = cluster("retry", "2026-03-31T22:00:00Z").await;
    let seeded = seed(treasurer.ledger(), clock.now());
    tokio::task::block_in_place(|| treasurer.sync()).unwrap();
    let before = log(&url).await.len();
    let db = Database::new(&url, 2).unwrap();
    let blocker = lock_log(&db).await;
    // Read outside the locking transaction, which would see one snapshot
    // of pg_stat_activity throughout.
    let watcher = db.client().await.unwrap();
    clock.advance(TimeDelta::hours(3));
    treasurer.ledger().tick(clock.now());
    // The appender's statement, waiting behind the lock, is ended.
    let waiting = "SELECT pid FROM pg_stat_activity \
                   WHERE wait_event_type = 'Lock' AND query LIKE '%cg_append_books%'";
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let pid: i32 = loop {
        if let Some(row) = watcher.query_opt(waiting, &[]).await.unwrap() {
            break row.get(0);
        }
        assert!(std::time::Instant::now() < deadline, "the append never reached the database");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ended: bool = watcher.query_one("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap().get(0);
    assert!(ended);
    // Retried: another append waits behind the lock.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let again = watcher.query_opt(waiting, &[]).await.unwrap().map(|row| row.get::<_, i32>(0));
        if again.is_some_and(|again| again != pid) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the cut-short append was not tried again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    blocker.batch_execute("COMMIT").await.unwrap();
    tokio::task::block_in_place(|| treasurer.sync()).unwrap();
    assert_eq!(treasurer.must_restart(), None);
    let records = log(&url).await;
    assert!(records.len() >= before + 2, "the tick's records reached the log");
    let mut seqs: Vec<u64> = records.iter().map(|record| record.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), records.len(), "a record reached the log twice");
    follow(&follower).await;
    assert_april_applied(&follower, seeded.lite, clock.now());
    assert_audited(follower.ledger(), &entries(&records));
}

/// An append finds out which of its records the log lacks in one read of
/// the log's key, not a lookup per record, and what it reads of the log
/// does not grow with the log. The server logs the plan of every statement
/// in the books' functions (auto_explain) with the rows and loops of each
/// step; the treasurer appends in rounds of a hundred records (past the
/// five after which PL/pgSQL may plan generically). No step of its
/// functions may read more of `cg_log` than a round holds, and all their
/// steps on `cg_log` together may run only a few times per append.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_reads_of_the_log_once_and_only_the_records_it_appends() {
    let pg = Postgres::start();
    let url = pg.create_database("keyed");
    pg.psql(
        "LOAD 'auto_explain'; \
         ALTER DATABASE keyed SET session_preload_libraries = 'auto_explain'; \
         ALTER DATABASE keyed SET auto_explain.log_min_duration = 0; \
         ALTER DATABASE keyed SET auto_explain.log_nested_statements = on; \
         ALTER DATABASE keyed SET auto_explain.log_analyze = on; \
         ALTER DATABASE keyed SET auto_explain.log_timing = off",
    );
    let clock = ManualClock::new(at("2026-03-01T00:00:00Z"));
    let treasurer = replica(&url, "r1").await;
    assert!(treasurer.try_promote(clock.as_ref()).await.unwrap());
    let seeded = seed(treasurer.ledger(), clock.now());
    let pro = Owner::User(seeded.pro);
    let key = new_key(treasurer.ledger(), seeded.org, pro, clock.now());
    const ROUND: usize = 100;
    for _ in 0..12 {
        for _ in 0..ROUND {
            spend_with(treasurer.ledger(), key, pro, dec!(0.01), clock.now());
        }
        tokio::task::block_in_place(|| treasurer.sync()).unwrap();
    }
    assert!(log(&url).await.len() > 10 * ROUND);
    let (mut steps, mut widest, mut runs, mut appends) =
        (0, (Decimal::ZERO, String::new()), Decimal::ZERO, 0);
    for plan in pg.log().split("LOG:  duration: ").skip(1) {
        if plan.contains("Query Text: SELECT cg_append_books($1,") {
            appends += 1; // the treasurer's call
        }
        if !plan.contains("p_replica") {
            continue; // not a statement of the books' functions
        }
        let lines: Vec<&str> = plan.lines().collect();
        for (at, step) in lines.iter().enumerate().filter(|(_, line)| line.contains(" on cg_log ")) {
            steps += 1;
            runs += plan_figure(step, "loops=");
            let read = log_rows_read(step, &lines[at + 1..]);
            if read > widest.0 {
                widest = (read, step.trim().to_owned());
            }
        }
    }
    assert!(steps > 12, "the server logged the appends' plans ({steps} steps on cg_log)");
    assert!(widest.0 <= Decimal::from(ROUND), "an append read {} log rows: {}", widest.0, widest.1);
    // Each append scans the key once for its records and inserts them. A
    // lookup per record (version 24 made four) runs at least once per
    // record besides the insert, so more than three times per append once
    // appends hold four records or more on average (the journal gathers
    // records for 20 ms, and a round's hundred settles take far less).
    assert!(appends >= 12, "the server logged the treasurer's appends ({appends})");
    assert!(appends <= 12 * ROUND / 4, "a round's settles were appended together ({appends} appends)");
    assert!(runs <= Decimal::from(3 * appends), "{appends} appends ran steps on cg_log {runs} times");
    // Planned at each call, on the tables' size then, not kept from a call
    // when the log was small.
    let db = Database::new(&url, 1).unwrap();
    let replanned: i64 = db
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_proc
             WHERE proname IN ('cg_append', 'cg_append_books', 'cg_ship_debits', 'cg_unlogged', 'cg_append_unlogged')
               AND proconfig @> ARRAY['plan_cache_mode=force_custom_plan']",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(replanned, 6, "the books' append and shipment functions are planned at each call");
}

/// An append tried again after an earlier try of part of it was logged
/// (its commit's answer lost) logs and moves only what it lacked: each
/// origin once, in the order given, without a gap in the log's numbers, and
/// the wallet's funding and lots moved once per record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_tried_again_adds_only_what_it_lacked() {
    let pg = Postgres::start();
    let url = pg.create_database("again");
    let books = books(&url).await;
    let epoch = books.claim_treasury("r1", None, Duration::from_secs(60)).await.unwrap().unwrap();
    let wallet = "pool:1";
    let expires = at("2027-01-01T00:00:00Z");
    // Each record grants 10 into its own lot, then takes 1 from lot 1.
    let record = |origin: i64| Appended {
        origin,
        body: vec![u8::try_from(origin).unwrap()],
        funding: Some((wallet.to_owned(), 1, dec!(10))),
        // As if each posted the shipped debit numbered ten times its origin.
        posts: Some(origin * 10),
        lots: vec![
            LotMove { wallet: wallet.to_owned(), lot: origin, expires_at: Some(expires), delta: dec!(10) },
            LotMove { wallet: wallet.to_owned(), lot: 1, expires_at: None, delta: dec!(-1) },
        ],
    };
    let append = |origins: &[i64]| {
        let records: Vec<Appended> = origins.iter().map(|origin| record(*origin)).collect();
        let books = books.clone();
        async move { books.append_books(epoch, "r1", &records).await.unwrap() }
    };
    let client = Database::new(&url, 1).unwrap().client().await.unwrap();
    let mark = || async {
        client.query_one("SELECT posted_through FROM cg_posting", &[]).await.unwrap().get::<_, i64>(0)
    };
    append(&[1, 2, 3]).await;
    assert_eq!(mark().await, 30, "the posting mark moves to the highest debit an append posts");
    append(&[2, 3, 5, 4]).await;
    assert_eq!(mark().await, 50);
    append(&[1, 4]).await;
    assert_eq!(mark().await, 50, "records logged before move it no more, and never back");
    append(&[7, 6, 5]).await;
    assert_eq!(mark().await, 70);
    let logged: Vec<(i64, i64)> = client
        .query("SELECT gseq, origin FROM cg_log WHERE replica = 'r1' ORDER BY gseq", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let first = logged[0].0;
    let expected: Vec<(i64, i64)> =
        [1, 2, 3, 5, 4, 7, 6].iter().zip(first..).map(|(origin, gseq)| (gseq, *origin)).collect();
    assert_eq!(logged, expected);
    let totals = client
        .query_one(
            "SELECT w.balance, (SELECT count(*) FROM cg_funding f WHERE f.wallet = w.wallet)
             FROM cg_wallets w WHERE w.wallet = $1",
            &[&wallet],
        )
        .await
        .unwrap();
    assert_eq!((totals.get::<_, Decimal>(0), totals.get::<_, i64>(1)), (dec!(70), 7));
    let lots: Vec<(i64, Decimal)> = client
        .query("SELECT lot, remaining FROM cg_lots WHERE wallet = $1 ORDER BY lot", &[&wallet])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let mut expected = vec![(1, dec!(3))];
    expected.extend((2..=7).map(|lot| (lot, dec!(10))));
    assert_eq!(lots, expected, "each record's lot moves applied once");
    // A record without an origin is refused, and nothing of its batch is
    // logged.
    let refused = client
        .query_one(
            "SELECT cg_append_books($1, 'r1', ARRAY[8, NULL]::bigint[], ARRAY['\\x08', '\\x09']::bytea[],
                                    ARRAY[NULL, NULL]::text[], ARRAY[NULL, NULL]::bigint[],
                                    ARRAY[NULL, NULL]::numeric[], ARRAY[NULL, NULL]::text[])",
            &[&epoch],
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(&tokio_postgres::error::SqlState::NOT_NULL_VIOLATION), "{refused}");
    // An older treasurer's append (a request id where the number goes) is
    // refused as a deposed treasurer's is: it stops, and nothing is logged.
    let older = client
        .query_one(
            "SELECT cg_append_books($1, 'r1', ARRAY[8]::bigint[], ARRAY['\\x08']::bytea[], ARRAY[NULL]::text[],
                                    ARRAY[NULL]::bigint[], ARRAY[NULL]::numeric[],
                                    ARRAY['0190e0b2-7c1a-7000-8000-000000000001']::text[])",
            &[&epoch],
        )
        .await
        .unwrap_err();
    assert_eq!(older.code().map(|code| code.code()), Some("CG001"), "{older}");
    let count: i64 = client.query_one("SELECT count(*) FROM cg_log", &[]).await.unwrap().get(0);
    assert_eq!(count, 7);
}

/// The rows a plan step read over all its loops: those it returned and
/// those its filter or recheck (on the lines under it) removed, which
/// EXPLAIN gives per loop. Panics on a step it cannot read, so a format it
/// does not know fails the test instead of passing it.
fn log_rows_read(step: &str, below: &[&str]) -> Decimal {
    let removed: Decimal = below
        .iter()
        .take_while(|line| !line.contains("(cost="))
        .filter(|line| line.trim_start().starts_with("Rows Removed by"))
        .map(|line| plan_figure(line, ": "))
        .sum();
    (plan_figure(step, "actual rows=") + removed) * plan_figure(step, "loops=")
}

/// The number after `after` in a line of EXPLAIN; panics on one it cannot
/// read.
fn plan_figure(text: &str, after: &str) -> Decimal {
    let rest = text.split(after).nth(1).unwrap_or_else(|| panic!("no {after:?} in {text:?}"));
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    digits.parse().unwrap_or_else(|_| panic!("cannot read {after:?} in {text:?}"))
}

/// Polls the log until it holds `len` records; whether it did within `limit`.
async fn wait_for_log(url: &str, len: usize, limit: Duration) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if log(url).await.len() >= len {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A session of `db` holding `cg_log` locked against appends (reads go on)
/// in a transaction the test ends with `COMMIT`.
async fn lock_log(db: &Database) -> deadpool_postgres::Object {
    let session = db.client().await.unwrap();
    session.batch_execute("BEGIN; LOCK TABLE cg_log IN EXCLUSIVE MODE").await.unwrap();
    session
}

/// A debit as a replica settles it under a lease: held `held`, charged
/// `cost`, with the detail the treasurer posts from.
fn settle_on_lease(
    book: &LeaseBook,
    hold: creditgate::cluster::LeaseHold,
    wallet: WalletId,
    key: KeyId,
    cost: Decimal,
) -> RequestId {
    let request_id = RequestId(uuid::Uuid::now_v7());
    let detail = DebitDetail {
        request_id,
        wallet,
        key,
        end_user: None,
        held: hold.amount(),
        held_at: None,
        details: SettleDetails {
            route: Arc::from("/v1/chat/completions"),
            model: Arc::from("gpt-test"),
            usage: Usage { input_tokens: 10, output_tokens: 20, cached_input_tokens: 0, tool_units: 0 },
            price_version: Arc::from("prices-v1"),
            operator_cost: None,
        },
    };
    book.settle(hold, cost, Utc::now(), serde_json::to_value(&detail).unwrap());
    request_id
}

/// The shared books balance, and `wallet`'s row there says `balance`.
async fn assert_shared_books(url: &str, wallet: WalletId, balance: Decimal) {
    let audit = books(url).await.audit().await.unwrap();
    for row in &audit {
        assert!(row.balances(), "shared books do not balance: {row:?}");
        assert_eq!(row.uncovered, Decimal::ZERO, "{row:?}");
    }
    let row = audit.iter().find(|row| row.wallet == wallet.to_string()).unwrap();
    assert_eq!(row.balance, balance, "{row:?}");
}

/// `cg_lots` holds exactly the treasurer's live lots (what bounds leases).
async fn assert_lots_mirrored(url: &str, treasurer: &Ledger) {
    let db = Database::new(url, 1).unwrap();
    let rows = db
        .client()
        .await
        .unwrap()
        .query("SELECT wallet, lot, expires_at, remaining FROM cg_lots ORDER BY wallet, lot", &[])
        .await
        .unwrap();
    let shared: Vec<(String, i64, DateTime<Utc>, Decimal)> =
        rows.iter().map(|row| (row.get(0), row.get(1), row.get(2), row.get(3))).collect();
    let mut live: Vec<(String, i64, DateTime<Utc>, Decimal)> = treasurer
        .live_lots()
        .into_iter()
        .map(|(wallet, lot)| (wallet.to_string(), lot.id.0 as i64, lot.expires_at, lot.remaining))
        .collect();
    live.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    assert!(!live.is_empty());
    assert_eq!(shared, live, "cg_lots differs from the treasurer's lots");
}

fn debits_of(records: &[creditgate::ledger::journal::Record], request: RequestId) -> usize {
    entries(records)
        .iter()
        .filter(|entry| matches!(&entry.kind, EntryKind::Debit(debit) if debit.request_id == request))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_debits_post_once_and_every_book_agrees() {
    let (_pg, url, clock, treasurer, follower) = cluster("posting", "2026-03-31T22:00:00Z").await;
    let seeded = seed(treasurer.ledger(), clock.now());
    let pool = WalletId::Pool(seeded.org);
    let lite = WalletId::Lite(seeded.lite);
    let secret = "sk-posting";
    let new_key =
        |owner| NewKey { owner, hash: KeyHash::of_secret(secret), label: "k".into(), limits: Limits::NONE };
    let pro_key =
        treasurer.ledger().create_key(seeded.org, new_key(Owner::User(seeded.pro)), clock.now()).unwrap().id;
    // The purchase and the Lite allowance reached the shared books with
    // their records: that is what replicas may lease.
    tokio::task::block_in_place(|| treasurer.sync()).unwrap();
    assert_shared_books(&url, pool, dec!(100)).await;
    assert_shared_books(&url, lite, dec!(5)).await;

    // The follower spends under leases and ships; the treasurer posts.
    let book = LeaseBook::new(books(&url).await, LeaseSettings::new("r2"), 1);
    let first = book.hold(&pool.to_string(), dec!(1)).await.unwrap();
    let request_1 = settle_on_lease(&book, first, pool, pro_key, dec!(0.75));
    let second = book.hold(&pool.to_string(), dec!(1)).await.unwrap();
    let request_2 = settle_on_lease(&book, second, pool, pro_key, dec!(0.5));
    book.ship().await.unwrap();
    assert_eq!(book.outbox_len(), 0);
    assert_eq!(treasurer.post_shipped().await.unwrap(), 2);
    assert_eq!(treasurer.post_shipped().await.unwrap(), 0, "posted twice");
    follow_all(&treasurer, &follower).await;
    for ledger in [treasurer.ledger(), follower.ledger()] {
        assert_eq!(ledger.balance(pool, clock.now()).unwrap().balance, dec!(98.75));
    }
    assert_shared_books(&url, pool, dec!(98.75)).await;
    assert_lots_mirrored(&url, treasurer.ledger()).await;

    // April: the treasurer's tick writes March's allowance off and grants
    // April's; the shared books follow.
    clock.advance(TimeDelta::hours(3));
    treasurer.ledger().tick(clock.now());
    tokio::task::block_in_place(|| treasurer.sync()).unwrap();
    assert_shared_books(&url, lite, dec!(5)).await;
    assert_lots_mirrored(&url, treasurer.ledger()).await;

    // A debit shipped around a handover is posted once, by the new
    // treasurer; the ones posted before are not posted again.
    let third = book.hold(&pool.to_string(), dec!(1)).await.unwrap();
    let request_3 = settle_on_lease(&book, third, pool, pro_key, dec!(0.25));
    book.ship().await.unwrap();
    treasurer.step_down().await;
    assert!(follower.try_promote(clock.as_ref()).await.unwrap());
    assert_eq!(follower.post_shipped().await.unwrap(), 1);
    // A debit whose detail cannot be read is marked refused with the
    // reason, not posted and not retried; the shared books still count it.
    let fourth = book.hold(&pool.to_string(), dec!(1)).await.unwrap();
    book.settle(fourth, dec!(0.125), Utc::now(), serde_json::json!({"unexpected": true}));
    book.ship().await.unwrap();
    assert_eq!(follower.post_shipped().await.unwrap(), 1);
    assert_eq!(follower.post_shipped().await.unwrap(), 0, "a refused debit is tried again");
    let db = Database::new(&url, 1).unwrap();
    let client = db.client().await.unwrap();
    // The mark passed the refused debit, the last of its round: it is not
    // read again, and nothing waits to be posted.
    let (mark, last): (i64, i64) = client
        .query_one("SELECT (SELECT posted_through FROM cg_posting), max(post_seq) FROM cg_debits", &[])
        .await
        .map(|row| (row.get(0), row.get(1)))
        .unwrap();
    assert_eq!(mark, last, "the posting mark stopped before a refused debit");
    assert_eq!(books(&url).await.posting_backlog().await.unwrap().debits, 0);
    let refused: Vec<String> = client
        .query("SELECT post_error FROM cg_debits WHERE post_error IS NOT NULL", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].contains("cannot be read"), "{refused:?}");
    book.shutdown().await.unwrap();
    let records = log(&url).await;
    for request in [request_1, request_2, request_3] {
        assert_eq!(debits_of(&records, request), 1, "{request:?}");
    }
    assert_eq!(follower.ledger().balance(pool, clock.now()).unwrap().balance, dec!(98.5));
    assert_shared_books(&url, pool, dec!(98.375)).await;
    // The new treasurer published its lots on taking over, then moved them.
    assert_lots_mirrored(&url, follower.ledger()).await;
    assert_audited(follower.ledger(), &entries(&records));
}

/// A posting round that stops on an error (here: a refusal the database
/// will not record) returns only once the records of the debits it did
/// post are in the log and the mark has passed them. Otherwise the next
/// round, reading from the mark, would post them again: the settled-request
/// memory reaches back only 8 requests a wallet, and this round posts 12.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_posting_round_stopped_short_logs_what_it_posted_before_returning() {
    let (_pg, url, clock, treasurer, follower) = cluster("stopped-short", "2026-03-31T22:00:00Z").await;
    let seeded = seed(treasurer.ledger(), clock.now());
    let pool = WalletId::Pool(seeded.org);
    let new_key = NewKey {
        owner: Owner::User(seeded.pro),
        hash: KeyHash::of_secret("sk-stopped-short"),
        label: "k".into(),
        limits: Limits::NONE,
    };
    let key = treasurer.ledger().create_key(seeded.org, new_key, clock.now()).unwrap().id;
    tokio::task::block_in_place(|| treasurer.sync()).unwrap();
    let book = LeaseBook::new(books(&url).await, LeaseSettings::new("r2"), 1);
    let mut requests = Vec::new();
    for _ in 0..12 {
        let hold = book.hold(&pool.to_string(), dec!(1)).await.unwrap();
        requests.push(settle_on_lease(&book, hold, pool, key, dec!(0.5)));
    }
    // The round's last debit cannot be posted, and its refusal fails.
    let unreadable = book.hold(&pool.to_string(), dec!(1)).await.unwrap();
    book.settle(unreadable, dec!(0.25), Utc::now(), serde_json::json!({"unexpected": true}));
    book.ship().await.unwrap();
    let db = Database::new(&url, 1).unwrap();
    let mut client = db.client().await.unwrap();
    client
        .batch_execute(
            "CREATE FUNCTION cg_test_refusals_down() RETURNS trigger LANGUAGE plpgsql
               AS $$ BEGIN RAISE EXCEPTION 'refusals are down'; END $$;
             CREATE TRIGGER cg_test_refusals_down BEFORE UPDATE OF post_error ON cg_debits
               FOR EACH ROW EXECUTE FUNCTION cg_test_refusals_down();",
        )
        .await
        .unwrap();
    let (good_last, last): (i64, i64) = client
        .query_one("SELECT max(post_seq) FILTER (WHERE amount = 0.5), max(post_seq) FROM cg_debits", &[])
        .await
        .map(|row| (row.get(0), row.get(1)))
        .unwrap();
    assert_eq!(last, good_last + 1);

    // The posting mark's row is held, so the round's append waits: the
    // round must not return while it does.
    let holder = client.transaction().await.unwrap();
    holder.execute("SELECT 1 FROM cg_posting FOR UPDATE", &[]).await.unwrap();
    let watcher = Database::new(&url, 1).unwrap();
    let watcher = watcher.client().await.unwrap();
    let round = treasurer.post_shipped();
    tokio::pin!(round);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::select! {
            ended = &mut round => panic!("the round returned before its records reached the log: {ended:?}"),
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the round's append never reached the mark's row");
    }
    holder.rollback().await.unwrap();
    assert!(round.await.is_err(), "the round did not stop on the failed refusal");
    let mark: i64 = client.query_one("SELECT posted_through FROM cg_posting", &[]).await.unwrap().get(0);
    assert_eq!(mark, good_last, "the mark did not pass what the round posted");

    // Refusals work again: the next round reads the unreadable debit only.
    client.batch_execute("DROP TRIGGER cg_test_refusals_down ON cg_debits").await.unwrap();
    assert_eq!(treasurer.post_shipped().await.unwrap(), 1);
    assert_eq!(treasurer.post_shipped().await.unwrap(), 0);
    let mark: i64 = client.query_one("SELECT posted_through FROM cg_posting", &[]).await.unwrap().get(0);
    assert_eq!(mark, last);
    let records = log(&url).await;
    for request in &requests {
        assert_eq!(debits_of(&records, *request), 1, "{request:?}");
    }
    follow_all(&treasurer, &follower).await;
    for ledger in [treasurer.ledger(), follower.ledger()] {
        assert_eq!(ledger.balance(pool, clock.now()).unwrap().balance, dec!(94));
    }
    book.shutdown().await.unwrap();
    assert_shared_books(&url, pool, dec!(93.75)).await;
    assert_audited(follower.ledger(), &entries(&records));
}

/// A posting round makes a record per debit. They reach the log in one
/// append (one transaction, one wake-up of each follower), not in as many
/// as the appender happened to wake for while the round ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_posting_round_reaches_the_log_in_one_append() {
    let (_pg, url, clock, treasurer, follower) = cluster("one-append", "2026-03-31T22:00:00Z").await;
    let seeded = seed(treasurer.ledger(), clock.now());
    let pool = WalletId::Pool(seeded.org);
    let new_key = NewKey {
        owner: Owner::User(seeded.pro),
        hash: KeyHash::of_secret("sk-one-append"),
        label: "k".into(),
        limits: Limits::NONE,
    };
    let key = treasurer.ledger().create_key(seeded.org, new_key, clock.now()).unwrap().id;
    tokio::task::block_in_place(|| treasurer.sync()).unwrap();
    let book = LeaseBook::new(books(&url).await, LeaseSettings::new("r2"), 1);
    const DEBITS: usize = 1_500;
    for _ in 0..DEBITS {
        let hold = book.hold(&pool.to_string(), dec!(0.01)).await.unwrap();
        settle_on_lease(&book, hold, pool, key, dec!(0.01));
    }
    book.ship().await.unwrap();
    let db = Database::new(&url, 1).unwrap();
    let client = db.client().await.unwrap();
    let before: i64 =
        client.query_one("SELECT COALESCE(max(gseq), 0) FROM cg_log", &[]).await.unwrap().get(0);
    assert_eq!(treasurer.post_shipped().await.unwrap(), DEBITS);
    let (records, appends): (i64, i64) = client
        .query_one("SELECT count(*), count(DISTINCT xmin::text) FROM cg_log WHERE gseq > $1", &[&before])
        .await
        .map(|row| (row.get(0), row.get(1)))
        .unwrap();
    assert_eq!(records, i64::try_from(DEBITS).unwrap(), "one record per posted debit");
    assert_eq!(appends, 1, "the round's records went to the log in {appends} appends");
    follow_all(&treasurer, &follower).await;
    assert_eq!(
        follower.ledger().balance(pool, clock.now()).unwrap().balance,
        treasurer.ledger().balance(pool, clock.now()).unwrap().balance
    );
    book.shutdown().await.unwrap();
    assert_audited(follower.ledger(), &entries(&log(&url).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_cancelled_while_it_waits_for_the_books_leaves_nothing_held() {
    let (_pg, url, clock, treasurer, follower) = cluster("cancelled", "2026-03-31T22:00:00Z").await;
    let seeded = seed(treasurer.ledger(), clock.now());
    let pool = WalletId::Pool(seeded.org);
    let capped = Limits { daily: Some(dec!(10)), ..Limits::NONE };
    let key = NewKey {
        owner: Owner::User(seeded.pro),
        hash: KeyHash::of_secret("sk-cancelled"),
        label: "k".into(),
        limits: capped,
    };
    let key = treasurer.ledger().create_key(seeded.org, key, clock.now()).unwrap().id;
    follow_all(&treasurer, &follower).await;
    let book = Arc::new(LeaseBook::new(books(&url).await, LeaseSettings::new("r2"), 1));

    // The pool's row is locked elsewhere, so the credit draw waits, after
    // the daily limit's headroom was already leased; the client leaves.
    let db = Database::new(&url, 1).unwrap();
    let mut blocker = db.client().await.unwrap();
    let tx = blocker.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM cg_wallets WHERE wallet = $1 FOR UPDATE", &[&pool.to_string()]).await.unwrap();
    let context = SpendContext { key, end_user: None };
    let request_id = RequestId(uuid::Uuid::now_v7());
    let pending = creditgate::cluster::spend::hold(
        follower.ledger(),
        &book,
        pool,
        request_id,
        dec!(1),
        context,
        clock.now(),
    );
    assert!(tokio::time::timeout(Duration::from_millis(300), pending).await.is_err(), "the draw waited");
    tx.rollback().await.unwrap();

    assert_eq!(follower.ledger().open_holds(), 0, "the view's hold was released");
    // Every lease can go back: none keeps a hold that will never end.
    // The draw that was cut short finishes once the row is free, and its
    // lease goes straight back.
    book.shutdown().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !books(&url).await.open_leases("r2").await.unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "a lease was left open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_shared_books(&url, pool, dec!(100)).await;
}

/// A follower tells its watchers of every wallet a replayed record changes,
/// and whether the record credited it: the alerts of a replica that serves
/// none of a wallet's traffic evaluate on it, and its lease book forgets a
/// balance it refused on once credit arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_tells_its_watchers_of_each_wallet_the_log_credits_or_debits() {
    let (_pg, _url, clock, treasurer, follower) = cluster("watch", "2026-03-10T12:00:00Z").await;
    let seen: Arc<std::sync::Mutex<Vec<(WalletId, bool)>>> = Arc::default();
    let told = seen.clone();
    follower.watch_wallets(Box::new(move |wallet, credited| told.lock().unwrap().push((wallet, credited))));
    let now = clock.now();
    let seeded = seed(treasurer.ledger(), now);
    spend(treasurer.ledger(), seeded.org, Owner::User(seeded.pro), dec!(1.25), now);
    follow_all(&treasurer, &follower).await;
    let seen = seen.lock().unwrap().clone();
    let (pool, lite) = (WalletId::Pool(seeded.org), WalletId::Lite(seeded.lite));
    assert!(seen.contains(&(pool, true)), "the purchase: {seen:?}");
    assert!(seen.contains(&(lite, true)), "the Lite allowance: {seen:?}");
    assert!(seen.contains(&(pool, false)), "the debit: {seen:?}");
    assert!(!seen.contains(&(lite, false)), "nothing debited the Lite wallet: {seen:?}");
}

#[tokio::test]
async fn finished_alert_deliveries_are_forgotten_once_their_period_cannot_come_round_again() {
    let url = Postgres::shared().create_database("alert_retention");
    let books = books(&url).await;
    let rule = serde_json::json!({"condition": {"below": "5"}});
    let rule = books.add_alert_rule(1, &rule, 50).await.unwrap().unwrap();
    let event = serde_json::json!({"type": "test"});
    let next_year = (chrono::Utc::now() + TimeDelta::days(300)).to_rfc3339();
    let last_year = (chrono::Utc::now() - TimeDelta::days(95)).to_rfc3339();
    let periods = [
        "granted:10".to_owned(),          // a threshold's: kept whatever its age
        "granted:20".to_owned(),          // kept too (a lifetime credit can recur)
        "over_hold:a-request".to_owned(), // one request's: goes
        last_year.clone(),                // a limit period that has reset: goes
        next_year.clone(),                // a year's limit still running: kept
        "over_hold:pending".to_owned(),   // not yet sent: kept
    ];
    let mut claimed = Vec::new();
    for period in &periods {
        let (id, _) = books.claim_alert(rule, 1, period, "r", &event).await.unwrap().unwrap();
        claimed.push(id);
    }
    for id in &claimed[..5] {
        books.update_alert_delivery(*id, "delivered", 1, None).await.unwrap();
    }
    let db = Database::new(&url, 1).unwrap();
    let client = db.client().await.unwrap();
    client
        .execute("UPDATE cg_alert_deliveries SET updated_at = now() - interval '100 days'", &[])
        .await
        .unwrap();
    drop(client);
    // Within the window nothing goes.
    let long = Duration::from_secs(365 * 24 * 3600);
    assert_eq!(books.forget_old_alert_deliveries(long).await.unwrap(), 0);
    let kept = Duration::from_secs(90 * 24 * 3600);
    assert_eq!(books.forget_old_alert_deliveries(kept).await.unwrap(), 2);
    let left: Vec<i64> = books.alert_deliveries_of(1).await.unwrap().iter().map(|row| row.id).collect();
    assert_eq!(left, [claimed[0], claimed[1], claimed[4], claimed[5]], "{periods:?}");
    // The kept rows still stop a second firing in their periods.
    for period in ["granted:10", "granted:20", next_year.as_str()] {
        assert!(books.claim_alert(rule, 1, period, "r", &event).await.unwrap().is_none(), "{period}");
    }
}

/// Holds `amount` on `wallet` through `book`, with `replica`'s view of the
/// books; true when it was served (the hold is released at once).
async fn served(
    replica: &Replica,
    book: &Arc<LeaseBook>,
    wallet: WalletId,
    key: KeyId,
    amount: Decimal,
    now: DateTime<Utc>,
) -> bool {
    let context = SpendContext { key, end_user: None };
    let request = RequestId(uuid::Uuid::now_v7());
    match creditgate::cluster::spend::hold(replica.ledger(), book, wallet, request, amount, context, now)
        .await
    {
        Ok(hold) => {
            hold.release(now);
            true
        }
        Err(refusal) => {
            assert_eq!(refusal.code(), "spending_limit", "{refusal:?}");
            false
        }
    }
}

/// The cap the books' row for `key`'s daily limit carries.
async fn daily_cap_in_books(url: &str, key: KeyId) -> Decimal {
    let audit = books(url).await.audit().await.unwrap();
    let row = audit.iter().find(|line| line.wallet.starts_with(&format!("limit:{key}:day:")));
    row.unwrap_or_else(|| panic!("no limit row for {key} in {audit:?}")).funded
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_has_not_read_a_lowered_cap_cannot_set_the_books_back_to_it() {
    // Proves a limit row keeps the newest cap whichever replica sets it
    // last: a follower whose view lags a lowered cap (its first hold on the
    // key since it started, so it has no row cap of its own to compare)
    // is held to the lowered cap. Before, it set the row back to the cap it
    // had read, and every replica then spent against the old cap.
    let (_pg, url, clock, treasurer, follower) = cluster("stale_cap", "2026-03-10T12:00:00Z").await;
    let now = clock.now();
    let seeded = seed(treasurer.ledger(), now);
    let pool = WalletId::Pool(seeded.org);
    let daily = |cap| Limits { daily: Some(cap), ..Limits::NONE };
    let key = NewKey {
        owner: Owner::User(seeded.pro),
        hash: KeyHash::of_secret("sk-stale-cap"),
        label: "k".into(),
        limits: daily(dec!(10)),
    };
    let key = treasurer.ledger().create_key(seeded.org, key, now).unwrap().id;
    follow_all(&treasurer, &follower).await;
    let at_treasurer = Arc::new(LeaseBook::new(books(&url).await, LeaseSettings::new("r1"), 1));
    let at_follower = Arc::new(LeaseBook::new(books(&url).await, LeaseSettings::new("r2"), 1));
    assert!(served(&treasurer, &at_treasurer, pool, key, dec!(5), now).await);
    assert_eq!(daily_cap_in_books(&url, key).await, dec!(10));

    // Lowered on the treasurer, which sets the row; the follower reads
    // nothing of it yet.
    treasurer.ledger().set_key_limits(seeded.org, key, daily(dec!(1))).unwrap();
    assert!(served(&treasurer, &at_treasurer, pool, key, dec!(0.5), now).await);
    assert_eq!(daily_cap_in_books(&url, key).await, dec!(1));
    assert!(!served(&follower, &at_follower, pool, key, dec!(5), now).await, "the old cap was restored");
    assert_eq!(daily_cap_in_books(&url, key).await, dec!(1));

    // Raised, the row moves as soon as either replica reads the change.
    treasurer.ledger().set_key_limits(seeded.org, key, daily(dec!(20))).unwrap();
    follow_all(&treasurer, &follower).await;
    assert!(served(&follower, &at_follower, pool, key, dec!(5), now).await);
    assert_eq!(daily_cap_in_books(&url, key).await, dec!(20));
    assert!(served(&treasurer, &at_treasurer, pool, key, dec!(5), now).await);
    for book in [at_treasurer, at_follower] {
        book.shutdown().await.unwrap();
    }
    let audit = books(&url).await.audit().await.unwrap();
    assert!(audit.iter().all(|line| line.balances()), "{audit:?}");
}
