//! Cluster mode's shared credit on a real PostgreSQL (started by the test,
//! see `common/pg.rs`): migrations, leases across replicas, idempotent
//! shipping, expiry and late shipping, a database outage, a multi-host URL.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::pg::Postgres;
use creditgate::cluster::migrate::{latest_version, migrate, migrate_to};
use creditgate::cluster::{Books, Database, LeaseBook, LeaseRefusal, LeaseSettings, ShippedDebit};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use tokio_util::sync::CancellationToken;

const ORG: i64 = 1;
const WALLET: &str = "pool:org_1";

async fn books(url: &str) -> Books {
    let db = Database::new(url, 8).unwrap();
    migrate(&db).await.unwrap();
    Books::new(db)
}

fn settings(replica: &str) -> LeaseSettings {
    let mut settings = LeaseSettings::new(replica);
    settings.ttl = Duration::from_secs(3);
    settings.safety = Duration::from_millis(500);
    settings.target = Duration::from_millis(200);
    settings.min_lease = dec!(0.01);
    settings
}

/// Three replicas on one database, each renewing, shipping and refilling
/// every `every` until [`Replicas::stop`].
struct Replicas {
    books: Vec<Arc<LeaseBook>>,
    stop: CancellationToken,
    maintainers: Vec<tokio::task::JoinHandle<()>>,
}

impl Replicas {
    async fn start(url: &str, settings: impl Fn(&str) -> LeaseSettings, every: Duration) -> Replicas {
        let stop = CancellationToken::new();
        let mut replicas = Replicas { books: Vec::new(), stop: stop.clone(), maintainers: Vec::new() };
        for (index, name) in ["r1", "r2", "r3"].into_iter().enumerate() {
            let book =
                Arc::new(LeaseBook::new(books(url).await, settings(name), 1 + index as i64 * 1_000_000));
            let (book2, stop) = (book.clone(), stop.clone());
            replicas.maintainers.push(tokio::spawn(async move {
                while !stop.is_cancelled() {
                    if let Err(err) = book2.maintain().await {
                        eprintln!("maintain: {err}");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(every) => {}
                    }
                }
            }));
            replicas.books.push(book);
        }
        replicas
    }

    /// Stops maintenance and shuts every replica down cleanly.
    async fn stop(self) {
        self.stop.cancel();
        for task in self.maintainers {
            task.await.unwrap();
        }
        for book in &self.books {
            book.shutdown().await.unwrap();
        }
    }
}

/// Every wallet's books balance, and no debit went uncovered.
async fn assert_books_exact(books: &Books) -> Vec<creditgate::cluster::WalletAudit> {
    let audit = books.audit().await.unwrap();
    for wallet in &audit {
        assert!(wallet.balances(), "books do not balance: {wallet:?}");
    }
    audit
}

/// A small xorshift, so the spend pattern is varied but repeatable.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_apply_each_migration_once_and_refuse_a_newer_schema() {
    let pg = Postgres::start();
    let url = pg.create_database("migrate");
    let runs = (0..3).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { migrate(&Database::new(&url, 2).unwrap()).await.unwrap() })
    });
    let mut applied = 0;
    for run in runs {
        applied += run.await.unwrap();
    }
    assert_eq!(
        applied,
        usize::try_from(latest_version()).unwrap(),
        "each version applied by exactly one replica"
    );

    let db = Database::new(&url, 2).unwrap();
    // The form of cg_draw_lease version 9 replaced refuses to run: a
    // replica of an older binary still running would draw leases with no
    // expiry bound.
    let client = db.client().await.unwrap();
    let old_draw = client
        .query("SELECT * FROM cg_draw_lease('old', 'pool:org_1', 1::numeric, 1::numeric, 1000::bigint, 1000::bigint)", &[])
        .await
        .unwrap_err();
    let text = old_draw.as_db_error().map(|db| db.message().to_owned()).unwrap_or_default();
    assert!(text.contains("older than the books"), "{old_draw:?}");
    client.execute("INSERT INTO cg_schema (version, name) VALUES (9999, 'future')", &[]).await.unwrap();
    let err = migrate(&db).await.unwrap_err().to_string();
    assert!(err.contains("newer than this binary"), "{err}");
}

/// An upgrade that finds debits shipped but not yet posted: version 13
/// moves them from the flag it drops into the treasurer's queue, in
/// shipping order, and version 28 numbers them for posting in the queue's
/// order (all but a debit of nothing, which posts nothing), so the
/// treasurer still posts each of them once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debits_waiting_to_be_posted_across_the_upgrades_stay_waiting() {
    let pg = Postgres::start();
    let url = pg.create_database("upgrade");
    let db = Database::new(&url, 4).unwrap();
    assert_eq!(migrate_to(&db, 12).await.unwrap(), 12);
    let books = Books::new(db.clone());
    books.fund(ORG, WALLET, dec!(1), "p").await.unwrap();
    let second = Duration::from_secs(10);
    let lease = books.draw_lease("r1", WALLET, dec!(1), dec!(0.1), second, second, Duration::ZERO).await;
    let lease = lease.unwrap().unwrap();
    let requests: Vec<uuid::Uuid> = (0..4).map(|_| uuid::Uuid::now_v7()).collect();
    let batch: Vec<ShippedDebit> = requests
        .iter()
        .zip(1..)
        .map(|(request, entry)| ShippedDebit {
            entry,
            wallet: WALLET.into(),
            lease: lease.id,
            amount: if entry == 4 { Decimal::ZERO } else { dec!(0.1) },
            at: Utc::now(),
            detail: serde_json::value::to_raw_value(&serde_json::json!({ "request_id": request })).unwrap(),
        })
        .collect();
    assert_eq!(books.ship("r1", &batch).await.unwrap(), 4);
    let requests = &requests[..3];
    let client = db.client().await.unwrap();
    let flagged: i64 =
        client.query_one("SELECT count(*) FROM cg_debits WHERE NOT posted", &[]).await.unwrap().get(0);
    assert_eq!(flagged, 4, "at version 12 they wait under the flag");

    assert_eq!(migrate(&db).await.unwrap(), usize::try_from(latest_version() - 12).unwrap());
    let queued = books.unposted(10).await.unwrap();
    let entries: Vec<i64> = queued.iter().map(|debit| debit.entry).collect();
    assert_eq!(entries, vec![1, 2, 3], "every waiting debit is queued, oldest first");
    let numbers: Vec<i64> = queued.iter().map(|debit| debit.post_seq).collect();
    assert_eq!(numbers, vec![1, 2, 3], "and numbered for posting in that order (version 28)");
    let ids: Vec<Option<String>> = client
        .query("SELECT request_id::text FROM cg_debits WHERE post_seq IS NOT NULL ORDER BY post_seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let expected: Vec<Option<String>> = requests.iter().map(|id| Some(id.to_string())).collect();
    assert_eq!(ids, expected, "each keeps its request");
    let nothing: Option<i64> =
        client.query_one("SELECT post_seq FROM cg_debits WHERE entry = 4", &[]).await.unwrap().get(0);
    assert_eq!(nothing, None, "a debit of nothing is not numbered");
    let flag: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'cg_debits' AND column_name = 'posted'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(flag, 0, "the flag is gone");
    assert_books_exact(&books).await;
}

/// The overdraft attack across replicas: three replicas, eight clients each,
/// every request holding the most it may cost, on a $1 wallet, until the
/// wallet answers 402 everywhere. Total debits never exceed the funding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_spending_one_small_wallet_never_overdraw_it() {
    let pg = Postgres::start();
    let url = pg.create_database("overdraft");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(1.00), "purchase-1").await.unwrap();

    let replicas = Replicas::start(&url, settings, Duration::from_millis(50)).await;
    let max_cost = dec!(0.05);
    let mut clients = Vec::new();
    for (index, book) in replicas.books.iter().enumerate() {
        for client in 0..8u64 {
            let book = book.clone();
            clients.push(tokio::spawn(async move {
                let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (index as u64 * 64 + client + 1);
                let (mut served, mut debited, mut refusals) = (0u32, Decimal::ZERO, 0u32);
                // A client retries a 402 a few times, as real ones do; that
                // also lets credit parked on another replica come back.
                while refusals < 20 {
                    match book.hold(WALLET, max_cost).await {
                        Ok(hold) => {
                            refusals = 0;
                            tokio::task::yield_now().await;
                            // Real cost: anything from nothing to the whole hold.
                            let debit = max_cost * Decimal::from(next(&mut seed) % 101) / dec!(100);
                            book.settle(hold, debit, Utc::now(), serde_json::json!({"client": client}));
                            served += 1;
                            debited += debit;
                        }
                        Err(LeaseRefusal::InsufficientCredit { .. }) => {
                            refusals += 1;
                            tokio::time::sleep(Duration::from_millis(25)).await;
                        }
                        Err(err) => panic!("{err}"),
                    }
                }
                (served, debited)
            }));
        }
    }
    let (mut served, mut debited) = (0u32, Decimal::ZERO);
    for client in clients {
        let (s, d) = client.await.unwrap();
        served += s;
        debited += d;
    }
    replicas.stop().await;

    let audit = assert_books_exact(&admin).await;
    let wallet = audit.iter().find(|wallet| wallet.wallet == WALLET).unwrap();
    assert_eq!(wallet.debited, debited, "every settled debit shipped exactly once");
    assert!(wallet.debited <= dec!(1.00), "overdrawn: debited {} of 1.00", wallet.debited);
    assert!(wallet.balance >= Decimal::ZERO);
    assert_eq!(wallet.uncovered, Decimal::ZERO, "no debit outside a lease");
    assert_eq!(wallet.leased, Decimal::ZERO, "every lease given back at shutdown");
    // The wallet was really spent down: what is left cannot pay one more
    // max-cost request, so no replica refused while credit was free.
    assert!(wallet.balance < max_cost, "left {} unspent; served {served}", wallet.balance);
    assert!(served > 20, "served {served}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shipped_batch_debits_once_however_often_it_is_retried() {
    let pg = Postgres::start();
    let url = pg.create_database("ship");
    let books = books(&url).await;
    books.fund(ORG, WALLET, dec!(10), "p").await.unwrap();
    // The same idempotency key funds once.
    let again = books.fund(ORG, WALLET, dec!(10), "p").await.unwrap();
    assert!(!again.created);
    assert_eq!(again.balance, dec!(10));
    // Credit never moves between organizations.
    assert!(books.fund(2, WALLET, dec!(5), "other-org").await.is_err());

    let lease = books
        .draw_lease(
            "r1",
            WALLET,
            dec!(2),
            dec!(1),
            Duration::from_secs(10),
            Duration::from_secs(10),
            Duration::ZERO,
        )
        .await
        .unwrap()
        .unwrap();
    let batch: Vec<ShippedDebit> = (1..=3)
        .map(|entry| ShippedDebit {
            entry,
            wallet: WALLET.into(),
            lease: lease.id,
            amount: dec!(0.25),
            at: Utc::now(),
            detail: creditgate::cluster::empty_detail(),
        })
        .collect();
    assert_eq!(books.ship("r1", &batch).await.unwrap(), 3);
    assert_eq!(books.ship("r1", &batch).await.unwrap(), 0, "a retried batch adds nothing");
    assert_eq!(books.ship("r1", &batch[1..]).await.unwrap(), 0);
    // Another replica's entry 1 is another debit.
    let other = books
        .draw_lease(
            "r2",
            WALLET,
            dec!(1),
            dec!(1),
            Duration::from_secs(10),
            Duration::from_secs(10),
            Duration::ZERO,
        )
        .await
        .unwrap()
        .unwrap();
    let theirs = ShippedDebit { lease: other.id, ..batch[0].clone() };
    assert_eq!(books.ship("r2", &[theirs]).await.unwrap(), 1);

    let audit = assert_books_exact(&books).await;
    assert_eq!(audit[0].debited, dec!(1.00));
    assert_eq!(audit[0].balance, dec!(9.00));
    // Open leases: r1's 2 less 0.75 spent, r2's 1 less 0.25.
    assert_eq!(audit[0].leased, dec!(2.00));
}

/// The outbox on disk: each flush writes what was settled since the last
/// one as one record, not one per debit; a restart finds exactly what was
/// flushed (and reads a record an older version wrote per debit), ships it
/// once, and a record goes from the disk once its debits shipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_writes_one_record_per_flush_and_a_restart_ships_exactly_what_was_flushed() {
    let pg = Postgres::start();
    let url = pg.create_database("outbox");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(10), "p").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // sled's background threads may keep the dropped database (and its file
    // lock) for a moment, so a reopen right after the drop may have to wait.
    let open = || {
        let started = std::time::Instant::now();
        loop {
            match sled::Config::new().path(dir.path()).flush_every_ms(None).open() {
                Ok(db) => return db.open_tree("debits").unwrap(),
                Err(err) if started.elapsed() < Duration::from_secs(10) => {
                    eprintln!("reopening the outbox: {err}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(err) => panic!("cannot reopen the outbox: {err}"),
            }
        }
    };

    let tree = open();
    let book = LeaseBook::with_outbox(books(&url).await, settings("disk"), 1, tree.clone()).unwrap();
    // Held first: a hold that draws a lease ships the outbox.
    let mut holds = Vec::new();
    for _ in 0..7 {
        holds.push(book.hold(WALLET, dec!(0.5)).await.unwrap());
    }
    let lease = holds[0].lease();
    for hold in holds.drain(..5) {
        book.settle(hold, dec!(0.1), Utc::now(), serde_json::json!({"n": 1}));
    }
    book.flush_outbox().await.unwrap();
    assert_eq!(tree.len(), 1, "five debits flushed together are one record");
    // Settled after the last flush: lost with the process, as the module says.
    for hold in holds {
        book.settle(hold, dec!(0.1), Utc::now(), serde_json::json!({}));
    }
    drop(book);
    drop(tree);

    // An older version's record: one debit under its entry number.
    let tree = open();
    let old = ShippedDebit {
        entry: 900,
        wallet: WALLET.into(),
        lease,
        amount: dec!(0.25),
        at: Utc::now(),
        detail: creditgate::cluster::empty_detail(),
    };
    tree.insert(900_i64.to_be_bytes(), serde_json::to_vec(&old).unwrap()).unwrap();
    let restarted = LeaseBook::with_outbox(books(&url).await, settings("disk"), 1, tree.clone()).unwrap();
    assert_eq!(restarted.outbox_len(), 6, "the five flushed debits and the older record");
    assert!(restarted.settled_through() > 900, "new debits are numbered above what the disk kept");
    restarted.recover().await.unwrap();
    assert_eq!(restarted.outbox_len(), 0);
    assert!(tree.is_empty(), "shipped records are gone from the disk");
    let audit = assert_books_exact(&admin).await;
    assert_eq!(audit[0].debited, dec!(0.75), "0.5 flushed, 0.25 from the older record, each once");

    // A flush that finds nothing new writes nothing; a later one is read back.
    let hold = restarted.hold(WALLET, dec!(0.5)).await.unwrap();
    restarted.settle(hold, dec!(0.2), Utc::now(), serde_json::json!({}));
    restarted.flush_outbox().await.unwrap();
    restarted.flush_outbox().await.unwrap();
    assert_eq!(tree.len(), 1);
    restarted.shutdown().await.unwrap();
    assert!(tree.is_empty());
    assert_eq!(assert_books_exact(&admin).await[0].debited, dec!(0.95));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debits_a_failed_shipment_puts_back_are_on_disk() {
    // A shipment takes the outbox; while it is out, a flush writes only what
    // is left. Put back after a failure, debits settled before that flush
    // stayed in memory only, and in an outage (no new settles, so no new
    // flush) a crash lost them. Now a failed shipment writes them itself.
    let pg = Postgres::start();
    let url = pg.create_database("put_back");
    books(&url).await.fund(ORG, WALLET, dec!(10), "p").await.unwrap();
    let gate = common::cluster::DbGate::start(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let tree = sled::Config::new().path(dir.path()).open().unwrap().open_tree("debits").unwrap();
    let book =
        LeaseBook::with_outbox(books(&gate.url(&url)).await, settings("gated"), 1, tree.clone()).unwrap();
    let hold = book.hold(WALLET, dec!(0.5)).await.unwrap();
    book.settle(hold, dec!(0.1), Utc::now(), serde_json::json!({}));
    assert!(tree.is_empty(), "settled, not yet flushed");
    gate.cut();
    assert!(book.ship().await.is_err(), "the database is out of reach");
    assert_eq!(book.outbox_len(), 1, "the debit is put back");
    assert_eq!(tree.len(), 1, "and written to disk");
}

/// A shipment can hang for as long as the database is silent, and the
/// replica goes on settling inside its leases. Before, the shipment took the
/// whole outbox, flushed or not, and the flush waited behind it: a SIGKILL in
/// the hang lost every settle since the last flush before it. Now what a
/// shipment has out is on disk, and settles made during it are flushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_shipment_has_only_flushed_debits_out_and_settles_go_on_to_disk() {
    let pg = Postgres::start();
    let url = pg.create_database("hanging_ship");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(10), "p").await.unwrap();
    let gate = common::cluster::DbGate::start(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let tree = sled::Config::new().path(dir.path()).open().unwrap().open_tree("debits").unwrap();
    let book = Arc::new(
        LeaseBook::with_outbox(books(&gate.url(&url)).await, settings("hang"), 1, tree.clone()).unwrap(),
    );
    let first = book.hold(WALLET, dec!(0.5)).await.unwrap();
    let second = book.hold(WALLET, dec!(0.5)).await.unwrap();
    book.settle(first, dec!(0.1), Utc::now(), serde_json::json!({}));
    assert!(tree.is_empty(), "settled, not yet flushed");
    gate.stall();
    let shipping = tokio::spawn({
        let book = book.clone();
        async move { book.ship().await }
    });
    let started = std::time::Instant::now();
    while book.outbox_len() > 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "the shipment never took its batch");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(tree.len(), 1, "the debit the shipment has out is on disk");
    // Settled inside the lease while the shipment hangs, and flushed.
    book.settle(second, dec!(0.2), Utc::now(), serde_json::json!({}));
    assert!(book.unflushed());
    book.flush_outbox().await.unwrap();
    assert_eq!(tree.len(), 2);
    // SIGKILL: the process and its shipment are gone; the disk has both.
    shipping.abort();
    let _ = shipping.await;
    drop(book);
    gate.mend();
    let restarted = LeaseBook::with_outbox(books(&url).await, settings("hang"), 1, tree.clone()).unwrap();
    assert_eq!(restarted.outbox_len(), 2);
    restarted.recover().await.unwrap();
    assert!(tree.is_empty());
    assert_eq!(assert_books_exact(&admin).await[0].debited, dec!(0.3));
}

/// A failover to an asynchronous standby can lose a lease drawn just before
/// it. Before, the debits under it broke a foreign key: every shipment
/// failed, and the replica could neither ship nor start again. Now they ship
/// as uncovered, the recorded overrun they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debit_under_a_lease_the_books_lost_ships_as_uncovered() {
    let pg = Postgres::start();
    let url = pg.create_database("lost_lease");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(1), "p").await.unwrap();
    let book = LeaseBook::new(books(&url).await, settings("failed-over"), 1);
    let hold = book.hold(WALLET, dec!(0.5)).await.unwrap();
    let lease = hold.lease();
    // The standby never saw the draw.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "UPDATE cg_wallets SET leased = leased - (SELECT granted - spent FROM cg_leases WHERE id = {lease}) \
             WHERE wallet = '{WALLET}'; DELETE FROM cg_leases WHERE id = {lease};"
        ))
        .await
        .unwrap();
    book.settle(hold, dec!(0.1), Utc::now(), serde_json::json!({}));
    assert_eq!(book.ship().await.unwrap(), 1, "the debit shipped");
    assert_eq!(book.outbox_len(), 0);
    let audit = assert_books_exact(&admin).await;
    assert_eq!((audit[0].debited, audit[0].uncovered), (dec!(0.1), dec!(0.1)), "as recorded overrun");
}

/// A failed sync may leave the outbox's pages dropped yet marked clean, so a
/// later sync that succeeds proves nothing about them. Before, a retry found
/// nothing new and wrote nothing: the debits settled before the failure were
/// on no disk. Now the retry writes them again, and the chunk they left goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_sync_the_outbox_writes_its_debits_again_and_a_restart_queues_each_once() {
    let pg = Postgres::start();
    let url = pg.create_database("failed_sync");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(10), "p").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tree = sled::Config::new().path(dir.path()).open().unwrap().open_tree("debits").unwrap();
    let chunks_on_disk = || -> Vec<u64> {
        tree.iter().keys().map(|key| u64::from_be_bytes(key.unwrap().as_ref().try_into().unwrap())).collect()
    };
    // A pipe cannot be synced (EINVAL): every sync of this outbox fails.
    let (_reader, writer) = std::io::pipe().unwrap();
    let unsyncable = std::fs::File::from(std::os::fd::OwnedFd::from(writer));
    let book = LeaseBook::with_outbox(books(&url).await, settings("unsynced"), 1, tree.clone())
        .unwrap()
        .syncing_outbox_file(unsyncable);
    let hold = book.hold(WALLET, dec!(0.5)).await.unwrap();
    let lease = hold.lease();
    book.settle(hold, dec!(0.1), Utc::now(), serde_json::json!({}));
    assert!(book.flush_outbox().await.is_err(), "the sync fails");
    let first = chunks_on_disk();
    assert_eq!(first.len(), 1);
    assert!(book.flush_outbox().await.is_err());
    let second = chunks_on_disk();
    assert_eq!(second.len(), 1, "one copy on disk: {second:?}");
    assert!(
        second[0] > first[0],
        "written again in a new chunk, the old one gone: {first:?} then {second:?}"
    );
    book.ship().await.unwrap();
    assert!(tree.is_empty(), "shipped, so gone from the disk");
    drop(book);

    // A debit in two chunks (the first kept while a shipment had some of its
    // debits out, then a crash) is queued once, and a chunk left with none goes.
    let debit = |entry: i64| ShippedDebit {
        entry,
        wallet: WALLET.into(),
        lease,
        amount: dec!(0.01),
        at: Utc::now(),
        detail: creditgate::cluster::empty_detail(),
    };
    let write = |chunk: u64, entries: &[i64]| {
        let debits: Vec<ShippedDebit> = entries.iter().map(|&entry| debit(entry)).collect();
        tree.insert(chunk.to_be_bytes(), serde_json::to_vec(&debits).unwrap()).unwrap();
    };
    write(5, &[501, 502]);
    write(6, &[501]);
    write(7, &[502, 503]);
    let restarted = LeaseBook::with_outbox(books(&url).await, settings("unsynced"), 1, tree.clone()).unwrap();
    assert_eq!(restarted.outbox_len(), 3, "501, 502 and 503, each once");
    assert_eq!(chunks_on_disk(), [6, 7], "chunk 5 had nothing left in it");
    restarted.recover().await.unwrap();
    assert!(tree.is_empty());
    assert_eq!(assert_books_exact(&admin).await[0].debited, dec!(0.13), "0.10, then three debits of 0.01");
}

/// kill -9 of a replica: its leases come back after their deadline and the
/// grace; if it returns later and ships what its outbox kept, the debits
/// post as recorded overrun (the stated bound), never lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_leases_return_after_expiry_and_its_late_debits_are_recorded_as_overrun() {
    let pg = Postgres::start();
    let url = pg.create_database("expiry");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(1), "p").await.unwrap();

    // Long enough for the steps below "inside the lease's life" on a loaded machine.
    let mut quick = settings("doomed");
    quick.ttl = Duration::from_secs(3);
    quick.safety = Duration::from_millis(200);
    let doomed = LeaseBook::new(books(&url).await, quick, 1);
    let hold = doomed.hold(WALLET, dec!(0.30)).await.unwrap();
    doomed.settle(hold, dec!(0.20), Utc::now(), serde_json::json!({}));
    // It dies here: no renewal, no shipping, its outbox kept on its disk.

    let survivor = LeaseBook::new(books(&url).await, settings("alive"), 1);
    let before = admin.audit().await.unwrap()[0].clone();
    assert!(before.leased > Decimal::ZERO, "the dead replica's lease is still counted");
    // Inside the lease's life the books keep its credit.
    assert_eq!(admin.expire(Duration::ZERO).await.unwrap(), Decimal::ZERO);
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let returned = admin.expire(Duration::ZERO).await.unwrap();
    assert_eq!(returned, before.leased, "the whole unshipped lease came back");
    // The survivor can now have all of it.
    let big = survivor.hold(WALLET, dec!(1)).await.unwrap();
    survivor.release(big);
    survivor.shutdown().await.unwrap();

    // The dead replica restarts on its data and ships late.
    assert_eq!(doomed.ship().await.unwrap(), 1);
    let audit = assert_books_exact(&admin).await;
    assert_eq!(audit[0].debited, dec!(0.20));
    assert_eq!(audit[0].uncovered, dec!(0.20), "a debit after its lease closed is recorded overrun");
    assert_eq!(audit[0].balance, dec!(0.80));
    assert_eq!(audit[0].leased, Decimal::ZERO);
}

/// With the database down a replica serves only inside the leases it has,
/// then refuses with `Unavailable` (503); nothing is served without a lease,
/// and once the database is back the outbox ships and the books are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_down_holds_are_served_only_inside_leases_and_the_books_catch_up() {
    let mut pg = Postgres::start();
    let url = pg.create_database("outage");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(5), "p").await.unwrap();
    let mut long = settings("r1");
    long.ttl = Duration::from_secs(30);
    long.min_lease = dec!(0.10);
    let book = LeaseBook::new(books(&url).await, long, 1);
    // One lease of 0.10 (the minimum, as there is no spend history yet).
    let first = book.hold(WALLET, dec!(0.01)).await.unwrap();
    book.settle(first, dec!(0.01), Utc::now(), serde_json::json!({}));
    book.ship().await.unwrap();

    pg.stop();
    let mut served = Decimal::ZERO;
    let refusal = loop {
        match book.hold(WALLET, dec!(0.01)).await {
            Ok(hold) => {
                book.settle(hold, dec!(0.01), Utc::now(), serde_json::json!({}));
                served += dec!(0.01);
                assert!(served <= dec!(0.10), "served past its lease while the database was down");
            }
            Err(refusal) => break refusal,
        }
    };
    assert!(matches!(refusal, LeaseRefusal::Unavailable(_)), "{refusal}");
    assert_eq!(served, dec!(0.09), "the rest of its lease, and not a cent more");
    assert!(book.ship().await.is_err());
    assert_eq!(book.outbox_len(), 9, "unshipped debits are kept");

    pg.restart();
    let mut shipped = None;
    for _ in 0..50 {
        match book.ship().await {
            Ok(count) => {
                shipped = Some(count);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(shipped, Some(9));
    book.shutdown().await.unwrap();
    let audit = assert_books_exact(&admin).await;
    assert_eq!(audit[0].debited, dec!(0.10));
    assert_eq!(audit[0].balance, dec!(4.90));
    assert_eq!(audit[0].uncovered, Decimal::ZERO);
}

/// A libpq multi-host URL: the first host is dead, the second is the
/// primary; `target_session_attrs=read-write` is implied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_host_url_finds_the_primary_past_a_dead_host() {
    let pg = Postgres::start();
    pg.create_database("multihost");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url =
        format!("postgresql://postgres@127.0.0.1:{dead},127.0.0.1:{}/multihost?connect_timeout=1", pg.port());
    let books = books(&url).await;
    assert!(books.fund(ORG, WALLET, dec!(1), "p").await.unwrap().created);
    // A malformed URL is a config error that does not echo the password.
    let err = Database::new("postgresql://user:hunter2@[::1", 1).unwrap_err().to_string();
    assert!(!err.contains("hunter2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_is_verified_against_the_named_root_and_carries_notifications() {
    let (pg, ca) = Postgres::start_tls();
    let plain = pg.create_database("tls");
    let verified = format!("{plain}?sslmode=verify-full&sslrootcert={}", ca.display());

    // Over TLS: the books work, the session is encrypted, and the listener
    // (a connection of its own) hears notifications.
    let db = Database::new(&verified, 2).unwrap();
    assert!(db.encrypted());
    migrate(&db).await.unwrap();
    let books = Books::new(db.clone());
    assert!(books.fund(ORG, WALLET, dec!(1), "p").await.unwrap().created);
    let client = db.client().await.unwrap();
    let ssl: bool = client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the session is not encrypted");
    let stop = CancellationToken::new();
    let wakeups = creditgate::cluster::Wakeups::start(db.clone(), stop.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !wakeups.listening() {
        assert!(std::time::Instant::now() < deadline, "the listener never connected over TLS");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hold = LeaseBook::new(books.clone(), settings("r1"), 1).hold(WALLET, dec!(0.1)).await;
    assert!(hold.is_ok());
    stop.cancel();

    // `require` verifies too: against the public roots this throwaway CA
    // is not among, so the connection is refused, not made unverified.
    let unverified = Database::new(&format!("{plain}?sslmode=require"), 1).unwrap();
    let err = unverified.client().await.unwrap_err().to_string();
    assert!(err.contains("TLS handshake"), "{err}");
    // In the clear, this server refuses (so the first session really was TLS).
    let clear = Database::new(&plain, 1).unwrap();
    assert!(!clear.encrypted());
    assert!(clear.client().await.is_err());
    // A root file with no TLS asked for is a mistake, said at once.
    let err = Database::new(&format!("{plain}?sslrootcert={}", ca.display()), 1).unwrap_err().to_string();
    assert!(err.contains("sslmode"), "{err}");
}

/// The global log: four replicas append concurrently (each batch sent twice,
/// as a retry after a lost answer would), two readers tail while they do.
/// Every record appears exactly once, numbered 1..=N without gaps, and both
/// readers see the same order; a retried batch gets its first numbers back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_log_gives_every_record_one_gapless_place_for_every_reader() {
    let pg = Postgres::start();
    let url = pg.create_database("log");
    let books = books(&url).await;
    const REPLICAS: i64 = 4;
    const BATCHES: i64 = 25;
    const PER_BATCH: i64 = 8;
    let total = usize::try_from(REPLICAS * BATCHES * PER_BATCH).unwrap();

    let appending = CancellationToken::new();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let books = books.clone();
            let appending = appending.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut after = 0;
                loop {
                    let done = appending.is_cancelled();
                    let page = books.tail(after, 37).await.unwrap();
                    if page.is_empty() && done {
                        return seen;
                    }
                    for record in page {
                        assert_eq!(record.gseq, after + 1, "a gap or a repeat in the log");
                        after = record.gseq;
                        seen.push((record.replica, record.origin, record.body));
                    }
                }
            })
        })
        .collect();
    let writers: Vec<_> = (0..REPLICAS)
        .map(|replica| {
            let books = books.clone();
            tokio::spawn(async move {
                let name = format!("r{replica}");
                for batch in 0..BATCHES {
                    let records: Vec<(i64, Vec<u8>)> = (0..PER_BATCH)
                        .map(|i| {
                            let origin = batch * PER_BATCH + i;
                            (origin, format!("{name}/{origin}").into_bytes())
                        })
                        .collect();
                    let first = books.append(&name, &records).await.unwrap();
                    let again = books.append(&name, &records).await.unwrap();
                    assert_eq!(first, again, "a retried batch keeps its numbers");
                    assert_eq!(first.len(), records.len());
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    appending.cancel();
    let mut orders = Vec::new();
    for reader in readers {
        orders.push(reader.await.unwrap());
    }
    assert_eq!(orders[0].len(), total, "every record exactly once");
    assert_eq!(orders[0], orders[1], "every reader sees one order");
    let mut distinct: Vec<_> =
        orders[0].iter().map(|(replica, origin, _)| (replica.clone(), *origin)).collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), total);
    for (replica, origin, body) in &orders[0] {
        assert_eq!(body, &format!("{replica}/{origin}").into_bytes());
    }
}

/// No database round trip per request: at steady state on a funded wallet,
/// three replicas send at most one database operation per 100 holds (lease
/// draws, renewals, shipments and give-backs together), and every debit
/// still reaches the books exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_steady_state_a_funded_wallet_costs_under_one_database_operation_per_hundred_requests() {
    let pg = Postgres::start();
    let url = pg.create_database("steady");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(1000), "p").await.unwrap();
    // Production defaults (10 s leases, 1 s of spend each), renewed every
    // 250 ms.
    let replicas =
        Replicas::start(&url, |name: &str| LeaseSettings::new(name), Duration::from_millis(250)).await;
    let run = |holds: u32| {
        let clients: Vec<_> = replicas
            .books
            .iter()
            .flat_map(|book| (0..4).map(move |_| book.clone()))
            .map(|book| {
                tokio::spawn(async move {
                    for _ in 0..holds {
                        let hold = book.hold(WALLET, dec!(0.001)).await.unwrap();
                        book.settle(hold, dec!(0.0005), Utc::now(), serde_json::json!({}));
                    }
                })
            })
            .collect();
        async move {
            for client in clients {
                client.await.unwrap();
            }
        }
    };
    let totals = |replicas: &[Arc<LeaseBook>]| {
        replicas.iter().map(|book| book.stats()).fold((0, 0), |(h, o), (holds, ops)| (h + holds, o + ops))
    };
    // Warm-up: spend history forms over the first second.
    run(2_000).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    run(500).await;
    let (holds_before, ops_before) = totals(&replicas.books);
    run(5_000).await;
    let (holds_after, ops_after) = totals(&replicas.books);
    let (holds, ops) = (holds_after - holds_before, ops_after - ops_before);
    assert_eq!(holds, 12 * 5_000);
    assert!(ops * 100 <= holds, "{ops} database operations for {holds} requests");

    replicas.stop().await;
    let audit = assert_books_exact(&admin).await;
    assert_eq!(audit[0].debited, dec!(0.0005) * Decimal::from(holds_after));
    assert_eq!(audit[0].leased, Decimal::ZERO);
}

/// `creditgate cluster status` shows each replica's leases and outbox;
/// `creditgate ledger verify --database-url-env` passes on exact books and
/// names the wallet when a balance was tampered with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_and_verify_read_the_books_from_the_database() {
    let pg = Postgres::start();
    let url = pg.create_database("cli");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(5), "p").await.unwrap();
    let book = LeaseBook::new(books(&url).await, settings("replica-a"), 1);
    let hold = book.hold(WALLET, dec!(0.50)).await.unwrap();
    book.settle(hold, dec!(0.25), Utc::now(), serde_json::json!({}));
    let hold = book.hold(WALLET, dec!(0.10)).await.unwrap();
    book.settle(hold, dec!(0.10), Utc::now(), serde_json::json!({}));
    book.maintain().await.unwrap(); // ships both, renews with an empty outbox
    let hold = book.hold(WALLET, dec!(0.05)).await.unwrap();
    book.settle(hold, dec!(0.05), Utc::now(), serde_json::json!({}));
    // The renewal a replica sends while its outbox holds that settle, three
    // seconds old (as when the database refused the shipment).
    let outbox = (1, Some(Utc::now() - chrono::TimeDelta::seconds(3)));
    admin.renew("replica-a", Duration::from_secs(10), Duration::ZERO, outbox, &[]).await.unwrap();
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_creditgate"))
            .args(args)
            .env("CG_TEST_DATABASE_URL", &url)
            .output()
            .unwrap()
    };

    let status = cli(&["cluster", "status", "--database-url-env", "CG_TEST_DATABASE_URL", "--json"]);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let replicas: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let replica = &replicas[0];
    assert_eq!(replica["replica"], "replica-a");
    assert_eq!(replica["open_leases"], 1);
    assert_eq!(replica["outbox_len"], 1);
    assert!(replica["outbox_lag_ms"].as_i64().unwrap() >= 3_000, "{replica}");
    assert_eq!(replica["treasurer"], false);
    let table = cli(&["cluster", "status", "--database-url-env", "CG_TEST_DATABASE_URL"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("replica-a"), "{table}");
    // No treasurer here: the two shipped settles wait to be posted, and it says so.
    assert!(table.contains("debits shipped and waiting to be posted: 2 (oldest "), "{table}");
    assert!(table.contains("warning: no replica holds the treasury"), "{table}");

    let verify = cli(&["ledger", "verify", "--database-url-env", "CG_TEST_DATABASE_URL"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    let db = Database::new(&url, 1).unwrap();
    db.client().await.unwrap().execute("UPDATE cg_wallets SET balance = balance + 1", &[]).await.unwrap();
    let tampered = cli(&["ledger", "verify", "--database-url-env", "CG_TEST_DATABASE_URL"]);
    assert_eq!(tampered.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&tampered.stdout).contains("pool:org_1: balance 5.650000000"),
        "{}",
        String::from_utf8_lossy(&tampered.stdout)
    );
    let unset = cli(&["ledger", "verify", "--database-url-env", "CG_NOT_SET"]);
    assert!(String::from_utf8_lossy(&unset.stderr).contains("CG_NOT_SET"));
}

/// A shipment the database refuses does not stop the renewal. Before, a
/// round shipped first and gave up on its error, so a live replica whose
/// outbox would not ship (a batch the database times out on) let its leases
/// lapse; the sweep then closed them and gave their credit back while its
/// holds were still open on them, and that credit was spent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shipment_that_fails_leaves_the_leases_renewed() {
    let pg = Postgres::start();
    let url = pg.create_database("shipfails");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(1), "p").await.unwrap();
    // Renewed each 250 ms below; a 3 s life leaves room for a stalled
    // machine, and the loop runs past it, so only renewals keep it.
    let mut quick = settings("ships-badly");
    quick.ttl = Duration::from_secs(3);
    quick.safety = Duration::from_millis(600);
    let book = LeaseBook::new(books(&url).await, quick, 1);
    let db = Database::new(&url, 1).unwrap();
    // Shipping fails while the function it calls is away.
    db.client()
        .await
        .unwrap()
        .batch_execute("ALTER FUNCTION cg_ship_debits RENAME TO cg_ship_debits_away")
        .await
        .unwrap();
    let streaming = book.hold(WALLET, dec!(0.10)).await.unwrap();
    let done = book.hold(WALLET, dec!(0.05)).await.unwrap();
    book.settle(done, dec!(0.05), Utc::now(), serde_json::json!({}));
    for _ in 0..16 {
        // Its result is the renewal's; what counts is that no lease lapsed.
        let _ = book.maintain().await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(book.outbox_len(), 1, "the debit is still waiting to ship");
    assert_eq!(
        admin.expire(Duration::ZERO).await.unwrap(),
        Decimal::ZERO,
        "no lease of a live replica lapsed"
    );
    db.client()
        .await
        .unwrap()
        .batch_execute("ALTER FUNCTION cg_ship_debits_away RENAME TO cg_ship_debits")
        .await
        .unwrap();
    book.settle(streaming, dec!(0.10), Utc::now(), serde_json::json!({}));
    book.shutdown().await.unwrap();
    let audit = assert_books_exact(&admin).await;
    assert_eq!(audit[0].debited, dec!(0.15));
    assert_eq!(audit[0].uncovered, Decimal::ZERO, "both debits were covered by a live lease");
    assert_eq!(audit[0].leased, Decimal::ZERO);
}

/// A replica cut off past its lease's deadline and grace: the sweep closes
/// the lease and returns its credit; when the replica is back, its renewal
/// does not name that lease, so the replica drops it and draws afresh for
/// new holds (the closed lease is never spent again). The hold that was
/// open on it settles as recorded overrun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_closed_by_the_sweep_is_never_spent_again_after_the_replica_returns() {
    let pg = Postgres::start();
    let url = pg.create_database("revive");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(1), "p").await.unwrap();
    let mut quick = settings("cut-off");
    quick.ttl = Duration::from_secs(1);
    quick.safety = Duration::from_millis(200);
    let book = LeaseBook::new(books(&url).await, quick, 1);
    let streaming = book.hold(WALLET, dec!(0.10)).await.unwrap();
    let first_lease = streaming.lease();
    // Cut off: no renewal while the deadline and the grace pass.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(admin.expire(Duration::ZERO).await.unwrap() > Decimal::ZERO);
    // Back: a maintenance round, then a new hold.
    book.maintain().await.unwrap();
    let next = book.hold(WALLET, dec!(0.05)).await.unwrap();
    assert_ne!(next.lease(), first_lease, "a closed lease was spent again");
    book.settle(next, dec!(0.05), Utc::now(), serde_json::json!({}));
    book.settle(streaming, dec!(0.10), Utc::now(), serde_json::json!({}));
    book.shutdown().await.unwrap();
    let audit = assert_books_exact(&admin).await;
    assert_eq!(audit[0].debited, dec!(0.15));
    assert_eq!(audit[0].uncovered, dec!(0.10), "only the hold open across the cut is overrun");
    assert_eq!(audit[0].leased, Decimal::ZERO);
}

/// The sweep picks expired leases, then waits for their wallets' locks. A
/// replica back from a cut that renewed such a lease in that wait had it
/// closed anyway (its credit back in the wallet, to be leased again) while
/// the renewal told the replica it was open: the credit could be spent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_renewed_while_the_sweep_waits_for_its_wallet_stays_open() {
    let pg = Postgres::start();
    let url = pg.create_database("sweep_race");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(1), "p").await.unwrap();
    let mut quick = settings("back");
    quick.ttl = Duration::from_secs(1);
    quick.safety = Duration::from_millis(200);
    let book = LeaseBook::new(books(&url).await, quick, 1);
    let hold = book.hold(WALLET, dec!(0.10)).await.unwrap();
    let lease = hold.lease();
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    // A shipment holds the wallet's lock while the sweep starts.
    let (mut shipment, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let shipment = shipment.transaction().await.unwrap();
    shipment.execute("SELECT 1 FROM cg_wallets WHERE wallet = $1 FOR UPDATE", &[&WALLET]).await.unwrap();
    let sweeper = books(&url).await;
    let sweep = tokio::spawn(async move { sweeper.expire(Duration::ZERO).await.unwrap() });
    let (watcher, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%cg_close_leases%'";
    let started = std::time::Instant::now();
    while watcher.query_one(waiting, &[]).await.unwrap().get::<_, i64>(0) == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "the sweep never waited for the wallet");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The replica is back and renews the lease in that wait.
    let renewal =
        admin.renew("back", Duration::from_secs(30), Duration::ZERO, (0, None), &[lease]).await.unwrap();
    assert!(renewal.open.iter().any(|(id, _)| *id == lease), "renewed: {:?}", renewal.open);
    shipment.commit().await.unwrap();

    assert_eq!(sweep.await.unwrap(), Decimal::ZERO, "nothing the sweep may close");
    let open: bool = watcher
        .query_one("SELECT closed_at IS NULL FROM cg_leases WHERE id = $1", &[&lease])
        .await
        .unwrap()
        .get(0);
    assert!(open, "the renewed lease stays open");
    book.settle(hold, dec!(0.10), Utc::now(), serde_json::json!({}));
    book.shutdown().await.unwrap();
    let audit = assert_books_exact(&admin).await;
    assert_eq!(
        (audit[0].debited, audit[0].uncovered, audit[0].leased),
        (dec!(0.10), Decimal::ZERO, Decimal::ZERO)
    );
}

/// Credit does not stay parked on a replica whose traffic for a wallet
/// stopped: within a few rounds of the last request every lease is back,
/// without a shutdown, and no refill draws it out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_wallets_leases_come_back_while_the_replicas_keep_running() {
    let pg = Postgres::start();
    let url = pg.create_database("quiet");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(10), "p").await.unwrap();
    let replicas = Replicas::start(&url, settings, Duration::from_millis(50)).await;
    let deadline = std::time::Instant::now() + Duration::from_millis(600);
    while std::time::Instant::now() < deadline {
        for book in &replicas.books {
            let hold = book.hold(WALLET, dec!(0.01)).await.unwrap();
            book.settle(hold, dec!(0.005), Utc::now(), serde_json::json!({}));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let busy = admin.audit().await.unwrap()[0].leased;
    assert!(busy > Decimal::ZERO, "the replicas held leases while busy");
    let mut leased = busy;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        leased = admin.audit().await.unwrap()[0].leased;
        if leased.is_zero() {
            break;
        }
    }
    assert_eq!(leased, Decimal::ZERO, "credit stayed parked on quiet replicas");
    replicas.stop().await;
    assert_books_exact(&admin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_never_outlives_the_credit_it_draws_on() {
    let pg = Postgres::start();
    let url = pg.create_database("lot_expiry");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(10), "purchase-1").await.unwrap();
    // The treasurer's lots, as it publishes them: 6 expiring in 3 s, 4 in
    // an hour. Leases run 30 s, ten times longer than the first lot.
    let db = Database::new(&url, 1).unwrap();
    let client = db.client().await.unwrap();
    let expiry: chrono::DateTime<Utc> =
        client.query_one("SELECT now() + interval '3 seconds'", &[]).await.unwrap().get(0);
    client
        .execute(
            "INSERT INTO cg_lots (wallet, lot, expires_at, remaining) VALUES
                 ($1, 1, $2, 6), ($1, 2, $2 + interval '1 hour', 4)",
            &[&WALLET, &expiry],
        )
        .await
        .unwrap();
    let mut lasting = settings("r1");
    lasting.ttl = Duration::from_secs(30);
    lasting.max_lease = dec!(100);
    let book = Arc::new(LeaseBook::new(books(&url).await, lasting, 1));
    let stop = CancellationToken::new();
    let maintainer = {
        let (book, stop) = (book.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                book.maintain().await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // One hold before the expiry draws a lease; then spend after it until
    // refused. A lease that ran its full 30 s would let the 6 that expired
    // be spent too.
    let hold = book.hold(WALLET, dec!(0.5)).await.unwrap();
    book.settle(hold, dec!(0.5), Utc::now(), serde_json::json!({}));
    while Utc::now() < expiry {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut after = Decimal::ZERO;
    for _ in 0..40 {
        match book.hold(WALLET, dec!(0.5)).await {
            Ok(hold) => {
                book.settle(hold, dec!(0.5), Utc::now(), serde_json::json!({}));
                after += dec!(0.5);
            }
            Err(LeaseRefusal::InsufficientCredit { .. }) => break,
            Err(err) => panic!("{err}"),
        }
    }
    stop.cancel();
    maintainer.await.unwrap();
    book.shutdown().await.unwrap();

    // What outlives the first lot is 4 at most, less what that lot's
    // remainder (6 as the treasurer last saw it) may still owe: spending
    // went on on the second lot's credit and stopped within it.
    assert!(after > Decimal::ZERO, "the lasting credit could not be spent");
    assert!(after <= dec!(3.5), "spent {after} after the lot expired: expired credit was leased");
    // No lease drawn before the expiry ran past it.
    let outliving: i64 = client
        .query_one(
            "SELECT count(*) FROM cg_leases WHERE wallet = $1 AND drawn_at < $2 AND expires_at > $2",
            &[&WALLET, &expiry],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(outliving, 0, "a lease outlived the lot it drew on");
    let audit = assert_books_exact(&admin).await;
    let wallet = audit.iter().find(|wallet| wallet.wallet == WALLET).unwrap();
    assert_eq!(wallet.uncovered, Decimal::ZERO);
    assert_eq!(wallet.debited, dec!(0.5) + after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_idle_in_one_replicas_lease_goes_to_a_hold_on_another_at_once() {
    let pg = Postgres::start();
    let url = pg.create_database("wanted");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(1), "p").await.unwrap();
    // Leases never idle out within the test (no maintenance runs, and the
    // idle time is long): only being asked makes r1 give its lease back.
    let patient = |name: &str| {
        let mut settings = settings(name);
        settings.ttl = Duration::from_secs(30);
        settings.target = Duration::from_secs(30);
        settings.min_lease = dec!(1);
        // Room for a loaded machine: the hand-back below takes a draw, a
        // notification and a give-back, which the default 0.5 s can miss.
        // (A hold waits on the database 5 s at most in all.)
        settings.leased_elsewhere_wait = Duration::from_secs(4);
        settings
    };
    let r1 = Arc::new(LeaseBook::new(books(&url).await, patient("r1"), 1));
    let r2 = LeaseBook::new(books(&url).await, patient("r2"), 1_000_000);
    let stop = CancellationToken::new();
    let wakeups = creditgate::cluster::Wakeups::start(Database::new(&url, 1).unwrap(), stop.clone());
    while !wakeups.listening() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let answering = {
        let (r1, wakeups) = (r1.clone(), wakeups.clone());
        tokio::spawn(async move { r1.answer_wanted(&wakeups).await })
    };

    // r1 leases the whole wallet, spends a little and goes quiet with 0.95
    // of it still leased.
    let hold = r1.hold(WALLET, dec!(0.10)).await.unwrap();
    r1.settle(hold, dec!(0.05), Utc::now(), serde_json::json!({}));
    assert_eq!(admin.audit().await.unwrap()[0].leased, dec!(1));

    // A hold on r2 finds nothing left to lease, asks, and is served from
    // what r1 gave back, inside its wait.
    let asked_at = std::time::Instant::now();
    let hold = match r2.hold(WALLET, dec!(0.5)).await {
        Ok(hold) => hold,
        Err(err) => panic!("a hold the wallet covers was refused while its credit sat idle on r1: {err}"),
    };
    // Handed over on being asked, not when r1's lease idles out (30 s).
    assert!(asked_at.elapsed() < Duration::from_secs(5));
    r2.settle(hold, dec!(0.5), Utc::now(), serde_json::json!({}));

    // Only what is really there: 0.45 is left, so 0.5 more is refused.
    assert!(matches!(r2.hold(WALLET, dec!(0.5)).await, Err(LeaseRefusal::InsufficientCredit { .. })));
    let hold = r1.hold(WALLET, dec!(0.45)).await.unwrap();
    r1.settle(hold, dec!(0.45), Utc::now(), serde_json::json!({}));

    answering.abort();
    stop.cancel();
    r1.shutdown().await.unwrap();
    r2.shutdown().await.unwrap();
    let audit = assert_books_exact(&admin).await;
    assert_eq!(audit[0].debited, dec!(1));
    assert_eq!(audit[0].uncovered, Decimal::ZERO);
}

/// A wallet whose balance in the books is below a hold was refused: for
/// the short memory (half a second by default) more holds at least that
/// large are refused from memory, so a spent wallet's traffic costs the
/// books a few statements, not two per request; a smaller hold still asks,
/// and a purchase is spendable again once the memory lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_wallet_is_refused_from_memory_for_a_while_and_a_purchase_then_spends() {
    let pg = Postgres::start();
    let url = pg.create_database("short");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(0.01), "p").await.unwrap();
    // Longer than the default, so the steps below that must fall inside
    // it do on a loaded machine.
    let memory = Duration::from_secs(3);
    let book = Arc::new(LeaseBook::new(
        books(&url).await,
        LeaseSettings { short_memory: memory, ..settings("replica-a") },
        1,
    ));
    let hold = book.hold(WALLET, dec!(0.006)).await.unwrap();
    book.settle(hold, dec!(0.006), Utc::now(), serde_json::json!({}));

    let (_, before) = book.stats();
    let started = std::time::Instant::now();
    for _ in 0..200 {
        assert!(matches!(book.hold(WALLET, dec!(0.005)).await, Err(LeaseRefusal::InsufficientCredit { .. })));
    }
    let (_, after) = book.stats();
    // The first refusal ships the debit, gives the leftover back, tries to
    // draw and reads the balance: 4 operations; then 2 per memory's length.
    let windows = u64::try_from(started.elapsed().as_millis() / memory.as_millis()).unwrap() + 1;
    assert!(after - before <= 2 + 2 * windows, "{} operations for 200 refusals", after - before);
    // 0.004 is left: a smaller hold is not refused from memory.
    let hold = book.hold(WALLET, dec!(0.003)).await.unwrap();
    book.release(hold);

    // Spent to the last cent, then bought again: refused from memory until
    // the replica's view replays the purchase (which tells the book), or
    // else until the memory lapses.
    let refused = |amount| {
        let book = book.clone();
        async move { matches!(book.hold(WALLET, amount).await, Err(LeaseRefusal::InsufficientCredit { .. })) }
    };
    let hold = book.hold(WALLET, dec!(0.004)).await.unwrap();
    book.settle(hold, dec!(0.004), Utc::now(), serde_json::json!({}));
    assert!(refused(dec!(0.001)).await);
    admin.fund(ORG, WALLET, dec!(0.002), "p2").await.unwrap();
    assert!(refused(dec!(0.001)).await, "remembered short");
    book.credit_arrived(WALLET);
    let hold = book.hold(WALLET, dec!(0.001)).await.expect("spendable once the credit is known");
    book.settle(hold, dec!(0.001), Utc::now(), serde_json::json!({}));
    assert!(refused(dec!(0.005)).await, "0.002 is in the books");
    admin.fund(ORG, WALLET, dec!(1), "p3").await.unwrap();
    assert!(refused(dec!(0.005)).await, "remembered short");
    tokio::time::sleep(memory + Duration::from_millis(50)).await;
    let hold = book.hold(WALLET, dec!(0.005)).await.expect("spendable once the memory lapsed");
    book.settle(hold, dec!(0.005), Utc::now(), serde_json::json!({}));
    book.maintain().await.unwrap();
    let audit = admin.audit().await.unwrap();
    assert_eq!(audit[0].debited, dec!(0.016));
    assert!(audit[0].balances(), "{audit:?}");
}

/// A replica name is held by one live process: a second claim waits, then is refused; the
/// name is free again as soon as its holder lets go; a holder whose connection is cut claims
/// the name again, or learns that another process took it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_name_is_held_by_one_process_at_a_time() {
    use creditgate::cluster::name_lock::{NameLock, TRY_LOCK};
    let pg = Postgres::start();
    let url = pg.create_database("names");
    let db = Database::new(&url, 2).unwrap();
    let patience = Duration::from_millis(600);

    let first_stop = CancellationToken::new();
    let first = NameLock::claim(&db, "twin", patience, first_stop.clone()).await.unwrap();
    let started = std::time::Instant::now();
    let refused = NameLock::claim(&db, "twin", patience, CancellationToken::new()).await.unwrap_err();
    assert!(started.elapsed() >= patience, "it did not wait for the holder to go");
    assert!(refused.to_string().contains("\"twin\" is held by another live process"), "{refused}");
    let other_stop = CancellationToken::new();
    NameLock::claim(&db, "other", patience, other_stop.clone()).await.unwrap();
    assert_eq!(first.lost(), None);

    // Let go: the name is free at once.
    first_stop.cancel();
    let second_stop = CancellationToken::new();
    let second = NameLock::claim(&db, "twin", Duration::from_secs(5), second_stop.clone()).await.unwrap();

    // Its connection is cut with nobody else waiting: it holds the name again.
    let admin = Database::new(&url, 2).unwrap().client().await.unwrap();
    let name_holders = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted";
    // Waiting (up to 5 s) for each session to end: without the wait the ended
    // sessions' locks can still be listed a moment, read as the names claimed again.
    let cut = "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_locks
               WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()";
    assert_eq!(admin.query_one(name_holders, &[]).await.unwrap().get::<_, i64>(0), 2);
    let cut_names = |names: i64| {
        let admin = &admin;
        async move { assert_eq!(admin.query_one(cut, &[]).await.unwrap().get::<_, i64>(0), names) }
    };
    // "other" is cut too, and comes back the same way.
    cut_names(2).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while admin.query_one(name_holders, &[]).await.unwrap().get::<_, i64>(0) < 2 {
        assert!(std::time::Instant::now() < deadline, "the names were not claimed again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(NameLock::claim(&db, "twin", patience, CancellationToken::new()).await.is_err());
    assert_eq!(second.lost(), None);

    // Cut again, and another session takes the name first: the holder learns it lost it.
    let (thief, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    cut_names(2).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !thief.query_one(TRY_LOCK, &[&"twin"]).await.unwrap().get::<_, bool>(0) {
        assert!(std::time::Instant::now() < deadline, "the name never came free");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while second.lost().is_none() {
        assert!(std::time::Instant::now() < deadline, "the holder never learnt its name was taken");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(second.lost().unwrap().contains("another process took"));
    second_stop.cancel();
    other_stop.cancel();
}

/// A draw that committed but whose reply never came back (the connection cut after the commit,
/// or a draw retried after such a cut) leaves a lease its replica never heard of. Before, every
/// renewal renewed all of the replica's open leases, so that credit stayed out of reach until
/// the replica restarted; now only the leases it knows are renewed and the sweep returns the
/// rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_its_replica_never_heard_of_lapses_and_its_credit_comes_back() {
    let pg = Postgres::start();
    let url = pg.create_database("lost_reply");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(1), "p").await.unwrap();
    let mut quick = settings("lost-reply");
    quick.ttl = Duration::from_secs(1);
    quick.safety = Duration::from_millis(200);
    let ttl = quick.ttl;
    let book = LeaseBook::new(books(&url).await, quick, 1);
    let orphan = admin
        .draw_lease("lost-reply", WALLET, dec!(0.40), dec!(0.40), ttl, ttl, Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    let hold = book.hold(WALLET, dec!(0.10)).await.unwrap();
    // The replica's rounds run for twice the TTL while its own hold stays open.
    for _ in 0..8 {
        book.maintain().await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let returned = admin.expire(Duration::ZERO).await.unwrap();
    assert_eq!(returned, orphan.granted, "the unknown lease's credit came back, and only it");
    book.settle(hold, dec!(0.10), Utc::now(), serde_json::json!({}));
    book.shutdown().await.unwrap();
    let audit = assert_books_exact(&admin).await;
    assert_eq!(audit[0].uncovered, Decimal::ZERO, "the replica's own lease was renewed throughout");
    assert_eq!(audit[0].leased, Decimal::ZERO);
    assert_eq!(audit[0].balance, dec!(0.90));
}

/// A hold ships the outbox from its own request when it gives small leftovers back, and a
/// request stops wherever it is when its client leaves. Before, a shipment dropped on its way
/// lost the batch it had taken: those calls were never debited and their leases never went back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shipment_dropped_on_its_way_puts_its_debits_back() {
    let pg = Postgres::start();
    let url = pg.create_database("dropped_ship");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(1), "p").await.unwrap();
    let gate = common::cluster::DbGate::start(&url).await;
    let book = LeaseBook::new(books(&gate.url(&url)).await, settings("dropped"), 1);
    let hold = book.hold(WALLET, dec!(0.15)).await.unwrap();
    book.settle(hold, dec!(0.15), Utc::now(), serde_json::json!({}));
    assert_eq!(book.outbox_len(), 1);
    // The database stops answering: the shipment takes the batch, waits on it, and is
    // dropped. (Polled once on a live database instead, a loaded machine could let the
    // whole round trip finish inside that poll.)
    gate.stall();
    let dropped = tokio::time::timeout(Duration::from_millis(300), book.ship()).await;
    assert!(dropped.is_err(), "the shipment finished on a silent database: {dropped:?}");
    assert_eq!(book.outbox_len(), 1, "the dropped shipment's debit is queued again");
    assert!(book.unflushed(), "a flush is asked for: they were on no disk yet");
    gate.cut();
    gate.mend();
    // The pool finds its silent connection gone and opens another.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while book.outbox_len() > 0 {
        let shipped = book.ship().await;
        assert!(std::time::Instant::now() < deadline, "the shipment never landed: {shipped:?}");
        if book.outbox_len() > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    book.shutdown().await.unwrap();
    let audit = assert_books_exact(&admin).await;
    assert_eq!(audit[0].debited, dec!(0.15));
    assert_eq!(audit[0].leased, Decimal::ZERO, "the lease went back once its debits shipped");
}

/// A database that stops answering without closing its connections (a silent partition, a
/// frozen host) is a 503 within a bounded wait, as one that refuses connections is. Before, a
/// hold that needed a draw waited for as long as the connection stayed open, and every hold on
/// the wallet queued behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_silent_a_hold_that_needs_it_is_refused_in_bounded_time() {
    let pg = Postgres::start();
    let url = pg.create_database("silent");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(1), "p").await.unwrap();
    let gate = common::cluster::DbGate::start(&url).await;
    let book = LeaseBook::new(books(&gate.url(&url)).await, settings("silent"), 1);
    let open = book.hold(WALLET, dec!(0.10)).await.unwrap();
    gate.stall();
    let started = std::time::Instant::now();
    let waiting = async { tokio::join!(book.hold(WALLET, dec!(0.50)), book.hold(WALLET, dec!(0.40))) };
    let refused = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("holds hung on a silent database");
    for hold in [&refused.0, &refused.1] {
        assert!(matches!(hold, Err(LeaseRefusal::Unavailable(_))), "{hold:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(8), "refused after {:?}", started.elapsed());

    // The partition ends; the kernel has given up on the silent connections by then
    // (TCP_USER_TIMEOUT), as the relay's cut does here.
    gate.cut();
    gate.mend();
    book.settle(open, dec!(0.10), Utc::now(), serde_json::json!({}));
    // A draw that reached the database before the stall but whose reply never came back left
    // a lease this replica does not know: it lapses, and the sweep returns its credit.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let next = loop {
        book.maintain().await.unwrap();
        admin.expire(Duration::ZERO).await.unwrap();
        match book.hold(WALLET, dec!(0.50)).await {
            Ok(hold) => break hold,
            Err(refusal) => assert!(std::time::Instant::now() < deadline, "{refusal:?}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    book.settle(next, dec!(0.50), Utc::now(), serde_json::json!({}));
    book.shutdown().await.unwrap();
    let audit = assert_books_exact(&admin).await;
    assert_eq!(audit[0].debited, dec!(0.60));
    assert_eq!(audit[0].uncovered, Decimal::ZERO);
    assert_eq!(audit[0].leased, Decimal::ZERO, "no lease drawn for a refused hold was left open");
}

/// A hold whose draw's grant arrived but which was dropped before it was polled again (its
/// client left in the same moment, or its wait ran out) gives the lease back. Before, the grant
/// was dropped with the channel: the books kept the credit leased to nobody until the lease's
/// deadline, and a client hanging up near empty could park the wallet's last credit that way.
// One thread: nothing else runs during the hold's first poll, so the draw cannot finish
// inside it however loaded the machine is.
#[tokio::test(flavor = "current_thread")]
async fn a_grant_that_arrives_for_a_hold_dropped_before_reading_it_goes_back() {
    let pg = Postgres::start();
    let url = pg.create_database("unread_grant");
    let admin = books(&url).await;
    admin.fund(ORG, WALLET, dec!(1), "p").await.unwrap();
    let book = LeaseBook::new(books(&url).await, settings("unread"), 1);
    let mut hold = Box::pin(book.hold(WALLET, dec!(0.30)));
    // Polled once: it sent its draw and waits for the grant.
    assert!(tokio::time::timeout(Duration::ZERO, &mut hold).await.is_err());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while admin.audit().await.unwrap()[0].leased.is_zero() {
        assert!(std::time::Instant::now() < deadline, "the draw never landed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The grant is in the channel now; the hold is dropped without reading it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(hold);
    // Nothing sweeps leases here, so only the give-back empties it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !admin.audit().await.unwrap()[0].leased.is_zero() {
        assert!(std::time::Instant::now() < deadline, "the unread grant stayed leased");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_books_exact(&admin).await;
}

/// While the session holding a replica's name is down its books send nothing (a twin that took
/// the name meanwhile never has company), and a lock still held by the replica's own lost
/// session, which the server has not seen go (as behind a proxy keeping its server
/// connections), is ended and the name claimed again rather than given up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_lock_session_is_lost_writes_nothing_until_it_holds_its_name_again() {
    use creditgate::cluster::name_lock::NameLock;
    use creditgate::cluster::ClusterError;
    let pg = Postgres::start();
    let url = pg.create_database("severed");
    books(&url).await;
    let gate = common::cluster::DbGate::start(&url).await;
    let stop = CancellationToken::new();
    let lock = NameLock::claim(
        &Database::new(&gate.url(&url), 2).unwrap(),
        "severed",
        Duration::from_secs(5),
        stop.clone(),
    )
    .await
    .unwrap();
    let held = lock.held();
    let fenced = Books::new(Database::new(&url, 2).unwrap()).fenced_by(held.clone());
    fenced.audit().await.unwrap();
    // The same name in another database of the server (a staging cluster, say) is another lock.
    let elsewhere_stop = CancellationToken::new();
    let elsewhere = Database::new(&pg.create_database("severed_staging"), 2).unwrap();
    NameLock::claim(&elsewhere, "severed", Duration::from_secs(1), elsewhere_stop.clone()).await.unwrap();

    gate.sever_clients();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while held.load(std::sync::atomic::Ordering::Acquire) {
        assert!(std::time::Instant::now() < deadline, "the lost session went unnoticed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let refused = fenced.audit().await;
    assert!(matches!(refused, Err(ClusterError::Unavailable(_))), "{refused:?}");

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !held.load(std::sync::atomic::Ordering::Acquire) {
        assert!(std::time::Instant::now() < deadline, "the name was not claimed again: {:?}", lock.lost());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lock.lost(), None, "its own old session is no other process");
    fenced.audit().await.unwrap();
    stop.cancel();
    elsewhere_stop.cancel();
}

/// The SETTING of one session.
async fn shown(db: &Database, setting: &str) -> String {
    db.client().await.unwrap().query_one(&format!("SHOW {setting}"), &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wallet_row_a_stalled_session_holds_fails_a_draw_in_time_and_migrations_still_wait() {
    // A session that stopped inside a transaction (a frozen replica) holds
    // its row locks: draws queued behind them must fail within the pool's
    // lock limit, not keep their connections for as long as it lasts.
    let pg = Postgres::shared();
    let url = pg.create_database("stalled");
    let db = Database::new(&url, 2).unwrap();
    migrate(&db).await.unwrap();
    assert_eq!(shown(&db, "lock_timeout").await, "5s");
    assert_eq!(shown(&db, "idle_in_transaction_session_timeout").await, "1min");
    assert_eq!(shown(&db, "statement_timeout").await, "1min");
    // The URL's own options win, one by one.
    let short = Database::new(&format!("{url}?options=-c%20lock_timeout%3D300ms"), 2).unwrap();
    assert_eq!(shown(&short, "lock_timeout").await, "300ms");
    assert_eq!(shown(&short, "statement_timeout").await, "1min");

    let books = Books::new(db.clone());
    books.fund(ORG, WALLET, dec!(10), "p").await.unwrap();
    let mut stalled = short.client().await.unwrap();
    let stalled = stalled.transaction().await.unwrap();
    stalled.execute("SELECT 1 FROM cg_wallets WHERE wallet = $1 FOR UPDATE", &[&WALLET]).await.unwrap();
    let second = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let draw = tokio::time::timeout(
        Duration::from_secs(20),
        books.draw_lease("r1", WALLET, dec!(1), dec!(1), second, second, Duration::ZERO),
    )
    .await
    .expect("a draw behind a held row lock must not wait for the lock's holder");
    let error = draw.expect_err("the draw waited past the lock limit");
    assert!(error.to_string().contains("lock timeout"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10), "failed after {:?}", started.elapsed());
    stalled.commit().await.unwrap();
    let lease =
        books.draw_lease("r1", WALLET, dec!(1), dec!(1), second, second, Duration::ZERO).await.unwrap();
    assert!(lease.is_some(), "the wallet draws again once the lock is gone");

    // A migration waits for another replica's as long as that takes,
    // whatever the pool's lock limit.
    let url = pg.create_database("stalled_migration");
    let holder = Database::new(&url, 1).unwrap();
    let mut holding = holder.client().await.unwrap();
    let holding = holding.transaction().await.unwrap();
    holding.execute("SELECT pg_advisory_xact_lock(7162814031830606196)", &[]).await.unwrap();
    let short = Database::new(&format!("{url}?options=-c%20lock_timeout%3D100ms"), 2).unwrap();
    let waiting = tokio::spawn(async move { migrate(&short).await });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!waiting.is_finished(), "the migration waits for the lock");
    holding.commit().await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap(), usize::try_from(latest_version()).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_that_stops_waiting_leaves_one_draw_on_the_wallet_not_one_per_hold() {
    // A hold gives up after 5 s, but its draw runs on (a lease the books
    // grant must not go unheard). Before, the next hold on the wallet sent
    // a draw beside it: behind a stalled row, one pooled connection more
    // every 5 s until the pool was gone for every wallet.
    let pg = Postgres::shared();
    let url = pg.create_database("one_draw");
    let db = Database::new(&format!("{url}?options=-c%20lock_timeout%3D30s"), 8).unwrap();
    migrate(&db).await.unwrap();
    let books = Books::new(db.clone());
    books.fund(ORG, WALLET, dec!(10), "p").await.unwrap();
    let book = Arc::new(LeaseBook::new(books, settings("r1"), 1));
    let mut stalled = db.client().await.unwrap();
    let stalled = stalled.transaction().await.unwrap();
    stalled.execute("SELECT 1 FROM cg_wallets WHERE wallet = $1 FOR UPDATE", &[&WALLET]).await.unwrap();

    assert!(book.hold(WALLET, dec!(1)).await.is_err(), "no lease behind the stalled row");
    let second = tokio::spawn({
        let book = book.clone();
        async move { book.hold(WALLET, dec!(1)).await }
    });
    let draws_waiting = || async {
        let client = db.client().await.unwrap();
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%cg_draw_lease%'",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!second.is_finished(), "the second hold waits");
    assert_eq!(draws_waiting().await, 1, "one draw waits on the row, whatever the holds that wait");
    stalled.commit().await.unwrap();
    let hold = second.await.unwrap().expect("once the row is free the waiting hold draws");
    book.settle(hold, dec!(1), Utc::now(), serde_json::json!({}));
    book.shutdown().await.unwrap();
    assert_books_exact(&Books::new(db)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn funding_and_open_leases_are_found_by_wallet_through_an_index() {
    // A cap set in a new period sums that wallet's funding, and `ledger
    // verify` every wallet's funding and open leases: with no index on the
    // wallet, each read every funding row and lease the books ever had.
    let pg = Postgres::shared();
    let url = pg.create_database("wallet_indexes");
    let db = Database::new(&url, 1).unwrap();
    migrate(&db).await.unwrap();
    let mut client = db.client().await.unwrap();
    let tx = client.transaction().await.unwrap();
    // Told not to scan where it has another way: a plan that still scans has none.
    tx.batch_execute("SET LOCAL enable_seqscan = off").await.unwrap();
    for (query, index) in [
        ("SELECT sum(amount) FROM cg_funding WHERE wallet = 'pool:org_1'", "cg_funding_wallet"),
        (
            "SELECT sum(granted - spent) FROM cg_leases WHERE wallet = 'pool:org_1' AND closed_at IS NULL",
            "cg_leases_wallet_open",
        ),
    ] {
        let plan: Vec<String> =
            tx.query(&format!("EXPLAIN {query}"), &[]).await.unwrap().iter().map(|row| row.get(0)).collect();
        assert!(plan.iter().any(|line| line.contains(index)), "{query}: {plan:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_does_not_hold_up_the_renewal_of_the_leases() {
    // Draws and shipments on a slow database can take every pooled
    // connection; the renewal, which keeps every lease of the replica
    // alive, waited behind them and failed, and the leases lapsed. Nor does
    // what fails after a renewal (here a give-back that finds the pool
    // full) make the round count as one that did not reach the books.
    let pg = Postgres::shared();
    let url = pg.create_database("full_pool");
    let db = Database::new(&url, 2).unwrap();
    migrate(&db).await.unwrap();
    let books = Books::new(db.clone());
    books.fund(ORG, WALLET, dec!(10), "p").await.unwrap();
    let book =
        LeaseBook::new(books.clone(), settings("r1"), 1).with_renewal_pool(books.with_own_pool(1).unwrap());
    let hold = book.hold(WALLET, dec!(1)).await.unwrap();
    // Part of the lease left over and a hold taken from it: not spent, and
    // the wallet not yet quiet, so the next round keeps it.
    book.settle(hold, dec!(0.5), Utc::now(), serde_json::json!({}));
    let hold = book.hold(WALLET, dec!(0.1)).await.unwrap();
    book.settle(hold, dec!(0.1), Utc::now(), serde_json::json!({}));
    book.maintain().await.unwrap(); // ships the debits
    assert_eq!(books.open_leases("r1").await.unwrap().len(), 1);
    // Quiet past the spend target: the next round gives the lease back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let renewed_before = last_seen(&db).await;

    let taken = (db.client().await.unwrap(), db.client().await.unwrap());
    let started = std::time::Instant::now();
    book.maintain().await.expect("the renewal goes through its own connection");
    assert!(started.elapsed() < Duration::from_secs(6), "renewed after {:?}", started.elapsed());
    drop(taken);
    let renewed = last_seen(&db).await;
    assert!(renewed > renewed_before, "the replica's row was renewed: {renewed_before} -> {renewed}");
    assert_eq!(books.open_leases("r1").await.unwrap().len(), 1, "the give-back found no connection");
    // Tried again once the pool has room.
    book.maintain().await.unwrap();
    assert!(books.open_leases("r1").await.unwrap().is_empty(), "given back at the next round");
    book.shutdown().await.unwrap();
    assert_books_exact(&books).await;
}

/// When the replica `r1` last renewed, by the database's clock.
async fn last_seen(db: &Database) -> chrono::DateTime<Utc> {
    let client = db.client().await.unwrap();
    client.query_one("SELECT last_seen FROM cg_replicas WHERE replica = 'r1'", &[]).await.unwrap().get(0)
}

/// Every shipped debit pays for each index on cg_debits: its key (a
/// shipment retried adds nothing twice), the reports' range scan and its
/// place in the posting order (where the posting queue's row and its three
/// indexes were), no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shipped_debit_is_indexed_by_its_key_and_for_reports_only() {
    let pg = Postgres::shared();
    let url = pg.create_database("debit_indexes");
    let db = Database::new(&url, 2).unwrap();
    migrate(&db).await.unwrap();
    let client = db.client().await.unwrap();
    let rows = client
        .query("SELECT indexname::text FROM pg_indexes WHERE tablename = 'cg_debits' ORDER BY 1", &[])
        .await
        .unwrap();
    let names: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    assert_eq!(names, ["cg_debits_pkey", "cg_debits_post_seq", "cg_debits_usage"]);
    let tables: i64 = client
        .query_one("SELECT count(*) FROM pg_tables WHERE tablename = 'cg_unposted'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "no queue beside the debits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_built_at_an_upgrade_does_not_stop_the_writes_of_the_replicas_still_running() {
    // Schema 22 indexes two tables every replica writes. Built plainly, in
    // the migration's transaction, the build stopped their writes (draws,
    // renewals, shipments, purchases) until it ended; on large books, past
    // the leases' TTL.
    let pg = Postgres::shared();
    let url = pg.create_database("concurrent_index");
    let db = Database::new(&url, 4).unwrap();
    assert_eq!(migrate_to(&db, 21).await.unwrap(), 21);
    let books = Books::new(db.clone());
    books.fund(ORG, WALLET, dec!(10), "before").await.unwrap();
    // A write of a running replica, open as the upgrade starts: the build
    // waits for it.
    let mut open = db.client().await.unwrap();
    let open = open.transaction().await.unwrap();
    open.batch_execute(
        "INSERT INTO cg_wallets (wallet, org, balance) VALUES ('pool:org_2', 2, 1);
         INSERT INTO cg_funding (org, wallet, amount, idempotency_key) VALUES (2, 'pool:org_2', 1, 'open')",
    )
    .await
    .unwrap();
    let upgrading = tokio::spawn({
        let db = db.clone();
        async move { migrate_to(&db, 22).await }
    });
    // A second replica of the new version starting meanwhile waits its turn.
    let joining = tokio::spawn({
        let db = db.clone();
        async move { migrate_to(&db, 22).await }
    });
    // Until the build runs (waiting for the open write).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let client = db.client().await.unwrap();
        let building: i64 =
            client.query_one("SELECT count(*) FROM pg_stat_progress_create_index", &[]).await.unwrap().get(0);
        if building > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the index build never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!upgrading.is_finished(), "the build waits for the write open before it");
    let write =
        tokio::time::timeout(Duration::from_secs(5), books.fund(ORG, WALLET, dec!(1), "during")).await;
    write.expect("a write waited for the index build").unwrap();
    open.commit().await.unwrap();
    let applied = upgrading.await.unwrap().unwrap() + joining.await.unwrap().unwrap();
    assert_eq!(applied, 1, "schema 22 applied once");
    let client = db.client().await.unwrap();
    let valid: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE c.relname IN ('cg_funding_wallet', 'cg_leases_wallet_open') AND i.indisvalid",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(valid, 2, "both indexes built and valid");
    assert_books_exact(&books).await;
}

/// Shipments number the debits the treasurer must post, and commit in the
/// order of their numbers: one shipment waits for another's commit before
/// it numbers, even on other wallets. A shipment that numbered on from
/// what it could see would take a number an uncommitted one holds, or a
/// lower one, and the treasurer, which posts from a mark, would pass over
/// a debit that committed below it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipments_number_their_debits_in_the_order_they_commit() {
    let pg = Postgres::shared();
    let url = pg.create_database("posting_numbers");
    let books = books(&url).await;
    let other = "pool:org_2";
    books.fund(ORG, WALLET, dec!(1), "p1").await.unwrap();
    books.fund(2, other, dec!(1), "p2").await.unwrap();
    let ttl = Duration::from_secs(10);
    let first = books.draw_lease("r1", WALLET, dec!(1), dec!(0.1), ttl, ttl, Duration::ZERO).await;
    let second = books.draw_lease("r2", other, dec!(1), dec!(0.1), ttl, ttl, Duration::ZERO).await;
    let (first, second) = (first.unwrap().unwrap(), second.unwrap().unwrap());

    // r1's shipment, left open: two debits and one of nothing, which is
    // not posted and so not numbered.
    let db = Database::new(&url, 2).unwrap();
    let mut client = db.client().await.unwrap();
    let open = client.transaction().await.unwrap();
    let shipped: i64 = open
        .query_one(
            "SELECT cg_ship_debits('r1', ARRAY[1, 2, 3]::bigint[], ARRAY[$1, $1, $1]::text[],
                                   ARRAY[$2, $2, $2]::bigint[], ARRAY[0.1, 0, 0.2]::numeric[],
                                   ARRAY[now(), now(), now()], ARRAY['{}', '{}', '{}']::jsonb[])",
            &[&WALLET, &first.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(shipped, 3);
    let debit = |entry, lease, amount| ShippedDebit {
        entry,
        wallet: other.into(),
        lease,
        amount,
        at: Utc::now(),
        detail: creditgate::cluster::empty_detail(),
    };
    let later = {
        let books = books.clone();
        let batch = vec![debit(1, second.id, dec!(0.3))];
        tokio::spawn(async move { books.ship("r2", &batch).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!later.is_finished(), "r2's shipment numbered while r1's was open");
    open.commit().await.unwrap();
    assert_eq!(later.await.unwrap().unwrap(), 1);

    let numbered: Vec<(String, i64, Option<i64>)> = client
        .query("SELECT replica, entry, post_seq FROM cg_debits ORDER BY replica, entry", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let expected = [("r1", 1, Some(1)), ("r1", 2, None), ("r1", 3, Some(2)), ("r2", 1, Some(3))];
    let expected: Vec<(String, i64, Option<i64>)> =
        expected.iter().map(|(replica, entry, seq)| (replica.to_string(), *entry, *seq)).collect();
    assert_eq!(numbered, expected);
    // The treasurer reads them in that order, from its mark.
    let unposted = books.unposted(10).await.unwrap();
    let order: Vec<(&str, i64)> =
        unposted.iter().map(|debit| (debit.replica.as_str(), debit.entry)).collect();
    assert_eq!(order, [("r1", 1), ("r1", 3), ("r2", 1)]);
    client.execute("UPDATE cg_posting SET posted_through = 2", &[]).await.unwrap();
    let unposted = books.unposted(10).await.unwrap();
    assert_eq!(unposted.iter().map(|debit| debit.post_seq).collect::<Vec<_>>(), [3]);
    assert_eq!(books.posting_backlog().await.unwrap().debits, 1);
    assert_books_exact(&books).await;
}
