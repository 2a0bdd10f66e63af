//! Restart and durability tests against a real sled directory.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono_tz::Tz;
use rust_decimal_macros::dec;

use crate::ledger::entity::{KeyHash, Plan};
use crate::ledger::ids::{Owner, WalletId};
use crate::ledger::journal::{Journal, JournalError, Record, RecordBody};
use crate::ledger::limit::Limits;
use crate::ledger::testkit::{at, details, purchase, request, term};
use crate::ledger::{Ledger, LedgerConfig, NewKey, NewOrg, NewUser, PurchaseRequest, SpendContext};
use crate::store::{open_ledger, open_ledger_on, verify_store, SledStore, Store, StoreConfig, StoreError};

fn fast() -> StoreConfig {
    StoreConfig { flush_interval_ms: 1, ..StoreConfig::default() }
}

/// A sled directory holding [`populate`]'s ledger, writer shut down.
fn populated_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let opened = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
    populate(&opened.ledger);
    opened.writer.shutdown().unwrap();
    dir
}

/// A fresh sled directory holding exactly `records`, in the order given
/// (as one written before the writer ordered records may).
fn stored(records: &[Record]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.append_as_given(records).unwrap();
    store.flush().unwrap();
    dir
}

fn all_records(store: &impl Store) -> Vec<Record> {
    store.read_after(0, usize::MAX).unwrap()
}

/// A small but complete ledger: org, Lite and Pro users, keys, a purchase,
/// settles with an overrun, and one hold left open.
fn populate(ledger: &Ledger) -> Vec<WalletId> {
    let now = at("2027-03-10T12:00:00Z");
    let org = ledger
        .create_org(
            NewOrg {
                name: "acme".into(),
                time_zone: Tz::America__New_York,
                contract: Some(term("2027-01-01", 1, dec!(100), 2, dec!(10))),
            },
            now,
        )
        .unwrap()
        .id;
    let mut wallets = vec![WalletId::Pool(org)];
    for (index, plan) in [Plan::Pro, Plan::Lite].into_iter().enumerate() {
        let user = ledger
            .create_user(
                org,
                NewUser {
                    name: format!("u{index}"),
                    plan,
                    lite_monthly_allowance: dec!(7.5),
                    prorate_on_downgrade: true,
                    limits: Limits { daily: Some(dec!(50)), ..Limits::NONE },
                },
                now,
            )
            .unwrap();
        let key = ledger
            .create_key(
                org,
                NewKey {
                    owner: Owner::User(user.id),
                    hash: KeyHash::of_secret(&format!("secret-{index}")),
                    label: String::new(),
                    limits: Limits::NONE,
                },
                now,
            )
            .unwrap();
        let wallet = ledger.wallet_of(Owner::User(user.id)).unwrap();
        let context = SpendContext { key: key.id, end_user: None };
        for cost in [dec!(1.25), dec!(3)] {
            let hold = ledger.hold(wallet, request(), dec!(2), context, now).unwrap();
            hold.settle(cost, details(), now).unwrap();
        }
        // Left open on purpose: holds do not survive a restart.
        let _left_open = ledger.hold(wallet, request(), dec!(1), context, now).unwrap();
        if plan == Plan::Lite {
            wallets.push(wallet);
        }
    }
    ledger.purchase(purchase(org, dec!(40), "buy-1"), now).unwrap();
    wallets
}

#[test]
fn restart_rebuilds_identical_balances_and_ledger() {
    // Proves dropping all memory and reopening the sled directory gives the same balances,
    // the same records, voided holds, working idempotency and continuing sequence numbers.
    let dir = tempfile::tempdir().unwrap();
    let now = at("2027-03-10T12:00:00Z");
    let (wallets, before_balances, before_records) = {
        let opened = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
        let wallets = populate(&opened.ledger);
        let balances: Vec<_> = wallets.iter().map(|w| opened.ledger.balance(*w, now).unwrap()).collect();
        opened.writer.shutdown().unwrap();
        (wallets, balances, all_records(opened.writer.store()))
    };
    let reopened = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
    assert_eq!(all_records(reopened.writer.store()), before_records, "same ledger on disk");
    for (wallet, before) in wallets.iter().zip(&before_balances) {
        let after = reopened.ledger.balance(*wallet, now).unwrap();
        assert_eq!(
            (after.balance, after.totals, &after.lots),
            (before.balance, before.totals, &before.lots),
            "{wallet}"
        );
        assert_eq!(
            (after.held, after.available),
            (dec!(0), after.balance),
            "{wallet}: holds are void after restart"
        );
    }
    let org = match wallets[0] {
        WalletId::Pool(org) => org,
        WalletId::Lite(_) => unreachable!(),
    };
    let replay = purchase(org, dec!(40), "buy-1");
    let receipt = reopened.ledger.purchase(replay, now).unwrap();
    assert_eq!(receipt.balance_after, before_balances[0].balance, "idempotency survives the restart");
    let last_seq = before_records.last().unwrap().seq;
    let org_again = reopened
        .ledger
        .create_org(NewOrg { name: "b".into(), time_zone: Tz::UTC, contract: None }, now)
        .unwrap();
    assert!(org_again.id.0 > last_seq, "sequence numbers continue after the restart");
    reopened.writer.shutdown().unwrap();
    drop(reopened);
    let report = verify_store(dir.path(), None).unwrap();
    assert!(report.is_clean(), "{:#?}", report.audit.mismatches);
    assert_eq!(report.records, before_records.len() + 1);
}

/// A store that records the highest sequence number each flush made durable.
struct Watched {
    inner: SledStore,
    appended_max: AtomicU64,
    durable_max: AtomicU64,
}

impl Store for Watched {
    fn append(&self, records: &[Record]) -> Result<(), StoreError> {
        if let Some(last) = records.iter().map(|r| r.seq).max() {
            self.appended_max.fetch_max(last, Ordering::SeqCst);
        }
        self.inner.append(records)
    }

    fn flush(&self) -> Result<(), StoreError> {
        let covered = self.appended_max.load(Ordering::SeqCst);
        self.inner.flush()?;
        self.durable_max.fetch_max(covered, Ordering::SeqCst);
        Ok(())
    }

    fn records(&self) -> Box<dyn Iterator<Item = Result<Record, StoreError>> + '_> {
        self.inner.records()
    }

    fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        self.inner.read_after(after, limit)
    }
}

#[test]
fn money_moving_admin_writes_are_durable_before_ok() {
    // Proves a purchase (and entity creation) returns only after a flush covering its record.
    let dir = tempfile::tempdir().unwrap();
    let store = Watched {
        inner: SledStore::open(dir.path()).unwrap(),
        appended_max: AtomicU64::new(0),
        durable_max: AtomicU64::new(0),
    };
    let config = StoreConfig { flush_interval_ms: 20, ..StoreConfig::default() };
    let opened = open_ledger_on(store, LedgerConfig::default(), config).unwrap();
    let now = at("2027-03-10T12:00:00Z");
    let org = opened
        .ledger
        .create_org(
            NewOrg {
                name: "a".into(),
                time_zone: Tz::UTC,
                contract: Some(term("2027-01-01", 1, dec!(10), 0, dec!(0))),
            },
            now,
        )
        .unwrap();
    assert!(opened.writer.store().durable_max.load(Ordering::SeqCst) >= org.id.0);
    for round in 0..5 {
        let receipt = opened
            .ledger
            .purchase(
                PurchaseRequest {
                    org: org.id,
                    amount: dec!(1),
                    expires_at: None,
                    reference: None,
                    idempotency_key: format!("k{round}"),
                },
                now,
            )
            .unwrap();
        let durable = opened.writer.store().durable_max.load(Ordering::SeqCst);
        assert!(
            durable >= receipt.entry.0,
            "purchase {} returned before its flush ({durable})",
            receipt.entry
        );
    }
    let stats = opened.writer.stats();
    assert!(stats.flushes >= 6 && stats.written == stats.appended, "{stats:?}");
    opened.writer.shutdown().unwrap();
}

#[test]
fn a_corrupt_record_stops_the_start_and_fails_verify() {
    // Proves a record that does not decode is an error naming it, not a silently smaller ledger.
    let dir = populated_dir();
    {
        let db = super::sled::open_db(dir.path()).unwrap();
        db.open_tree("records").unwrap().insert(3_u64.to_be_bytes(), b"{not json".as_slice()).unwrap();
        db.flush().unwrap();
    }
    let error = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap_err();
    assert!(matches!(error, StoreError::Decode { seq: 3, .. }), "{error}");
    assert!(verify_store(dir.path(), None).is_err());
}

#[test]
fn a_damaged_segment_stops_the_start() {
    // Proves a segment whose bytes were damaged on disk is an error, not a shorter ledger.
    let dir = populated_dir();
    {
        let db = super::sled::open_db(dir.path()).unwrap();
        let tree = db.open_tree("records").unwrap();
        let (key, value) = tree.last().unwrap().unwrap();
        let mut damaged = value.to_vec();
        damaged.truncate(damaged.len() - 3);
        tree.insert(key, damaged).unwrap();
        db.flush().unwrap();
    }
    let error = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap_err();
    assert!(matches!(error, StoreError::Decode { .. }), "{error}");
}

#[test]
fn a_first_format_store_opens_replays_and_takes_new_segments() {
    // Proves a directory written one JSON record per key (format 1) keeps working after the upgrade.
    let dir = tempfile::tempdir().unwrap();
    let original = {
        let opened = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
        populate(&opened.ledger);
        opened.writer.shutdown().unwrap();
        all_records(opened.writer.store())
    };
    let legacy = tempfile::tempdir().unwrap();
    {
        let db = ::sled::open(legacy.path()).unwrap();
        db.open_tree("meta").unwrap().insert("format", "creditgate-ledger-1").unwrap();
        let tree = db.open_tree("records").unwrap();
        for record in &original {
            tree.insert(record.seq.to_be_bytes(), serde_json::to_vec(record).unwrap()).unwrap();
        }
        db.flush().unwrap();
    }
    let opened = open_ledger(legacy.path(), LedgerConfig::default(), fast()).unwrap();
    assert_eq!(all_records(opened.writer.store()), original);
    let wallet = match original.iter().find_map(|r| match &r.body {
        RecordBody::Org(org) => Some(org.id),
        _ => None,
    }) {
        Some(org) => org,
        None => panic!("populate creates an org"),
    };
    let purchase = PurchaseRequest {
        org: wallet,
        idempotency_key: "after-upgrade".into(),
        amount: dec!(3),
        expires_at: None,
        reference: None,
    };
    opened.ledger.purchase(purchase, at("2027-03-11T00:00:00Z")).unwrap();
    opened.writer.shutdown().unwrap();
    let last = original.last().unwrap().seq;
    let newer = opened.writer.store().read_after(last, 10).unwrap();
    assert!(!newer.is_empty() && newer.iter().all(|record| record.seq > last), "{newer:?}");
    let balance = opened.ledger.balance(WalletId::Pool(wallet), at("2027-03-11T00:00:00Z")).unwrap();
    drop(opened);
    let reopened = open_ledger(legacy.path(), LedgerConfig::default(), fast()).unwrap();
    let again = reopened.ledger.balance(WalletId::Pool(wallet), at("2027-03-11T00:00:00Z")).unwrap();
    assert_eq!(again.balance, balance.balance, "the mixed store replays to the same balance");
    reopened.writer.shutdown().unwrap();
    drop(reopened);
    assert!(verify_store(legacy.path(), None).unwrap().is_clean());
}

#[test]
fn appends_of_one_segment_and_of_many_all_come_back_after_a_reopen() {
    // Proves the single-insert path (one segment) and the batch (several) store the same records.
    let dir = populated_dir();
    let store = SledStore::open(dir.path()).unwrap();
    let records = all_records(&store);
    let base = records.last().unwrap().seq;
    // Enough copies to overflow a segment many times over, then one small append.
    let copies: Vec<Record> = (0..2_000)
        .map(|n| Record { seq: base + 1 + n as u64, body: records[n % records.len()].body.clone() })
        .collect();
    let (many, one) = copies.split_at(copies.len() - 1);
    store.append(many).unwrap();
    store.append(one).unwrap();
    store.flush().unwrap();
    drop(store);
    let reopened = SledStore::open(dir.path()).unwrap();
    let back = all_records(&reopened);
    assert_eq!(back.len(), records.len() + copies.len());
    let seqs: Vec<u64> = back.iter().map(|r| r.seq).collect();
    let expected: Vec<u64> = records.iter().chain(&copies).map(|r| r.seq).collect();
    assert_eq!(seqs, expected);
    assert_eq!(back.last().unwrap().body, one[0].body);
}

#[test]
fn paging_is_in_sequence_order_even_when_batches_arrived_out_of_order() {
    // Proves read_after returns every record after the cursor, sorted, across segment boundaries.
    let dir = tempfile::tempdir().unwrap();
    let opened = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
    populate(&opened.ledger);
    opened.writer.shutdown().unwrap();
    let mut records = all_records(opened.writer.store());
    drop(opened);
    let store = SledStore::open(dir.path()).unwrap();
    // Append copies under fresh numbers, a late one straddling two batches.
    let base = records.last().unwrap().seq;
    let mut copies: Vec<Record> = records
        .iter()
        .enumerate()
        .map(|(n, record)| Record { seq: base + 1 + n as u64, body: record.body.clone() })
        .collect();
    let late = copies.remove(3);
    let (first, second) = copies.split_at(copies.len() / 2);
    // As a store written before the writer ordered records holds them.
    store.append_as_given(first).unwrap();
    store.append_as_given(&[second.to_vec(), vec![late]].concat()).unwrap();
    records.extend(copies.iter().cloned());
    records.sort_by_key(|record| record.seq);
    let mut expected: Vec<u64> = records.iter().map(|r| r.seq).collect();
    expected.push(base + 4);
    expected.sort_unstable();
    for page in [1, 2, 5, 1000] {
        let mut seen = Vec::new();
        let mut cursor = 0;
        loop {
            let step = store.read_after(cursor, page).unwrap();
            let Some(last) = step.last() else { break };
            cursor = last.seq;
            seen.extend(step.iter().map(|r| r.seq));
        }
        assert_eq!(seen, expected, "pages of {page}");
    }
}

#[test]
fn records_appended_out_of_sequence_across_wallets_replay_and_verify() {
    // Proves restart accepts append order: a settle numbered before another
    // wallet's may reach the writer after it (seen under load), and replay
    // must not refuse the directory for that.
    let dir = populated_dir();
    let mut records = all_records(&SledStore::open(dir.path()).unwrap());
    let entry_wallet = |record: &Record| match &record.body {
        RecordBody::Entry(entry) => Some(entry.wallet),
        _ => None,
    };
    let swap_at = (1..records.len())
        .find(|&i| {
            let (a, b) = (entry_wallet(&records[i - 1]), entry_wallet(&records[i]));
            a.is_some() && b.is_some() && a != b
        })
        .expect("populate writes entries of two wallets next to each other");
    records.swap(swap_at - 1, swap_at);
    let swapped = stored(&records);
    let original = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
    let reopened = open_ledger(swapped.path(), LedgerConfig::default(), fast()).unwrap();
    let now = at("2027-03-10T12:00:00Z");
    let wallets: std::collections::BTreeSet<WalletId> = records.iter().filter_map(entry_wallet).collect();
    for wallet in wallets {
        assert_eq!(
            reopened.ledger.balance(wallet, now).unwrap().balance,
            original.ledger.balance(wallet, now).unwrap().balance
        );
    }
    original.writer.shutdown().unwrap();
    reopened.writer.shutdown().unwrap();
    drop((original, reopened));
    assert!(verify_store(swapped.path(), None).unwrap().is_clean());

    // The same swap inside one wallet is refused.
    let mut records = all_records(&SledStore::open(dir.path()).unwrap());
    let wallet = entry_wallet(&records[swap_at]).unwrap();
    let same: Vec<usize> =
        (0..records.len()).filter(|&i| entry_wallet(&records[i]) == Some(wallet)).collect();
    records.swap(same[0], same[1]);
    let broken = stored(&records);
    let error = open_ledger(broken.path(), LedgerConfig::default(), fast()).unwrap_err();
    assert!(matches!(error, StoreError::Restore(_)), "{error}");
    // And a wallet's entry stored twice.
    let mut records = all_records(&SledStore::open(dir.path()).unwrap());
    records.push(records[same[1]].clone());
    let doubled = stored(&records);
    let error = open_ledger(doubled.path(), LedgerConfig::default(), fast()).unwrap_err();
    assert!(error.to_string().contains("of the same wallet"), "{error}");
}

#[test]
fn verify_store_reports_a_tampered_balance() {
    // Proves verify_store recomputes wallets from entries and reports an edited entry.
    let dir = populated_dir();
    {
        let store = SledStore::open(dir.path()).unwrap();
        let mut records = all_records(&store);
        let debit = records
            .iter_mut()
            .find(|r| matches!(&r.body, RecordBody::Entry(e) if e.amount < dec!(0)))
            .unwrap();
        if let RecordBody::Entry(entry) = &mut debit.body {
            entry.amount -= dec!(1);
        }
        store.append(std::slice::from_ref(debit)).unwrap();
        store.flush().unwrap();
    }
    let report = verify_store(dir.path(), None).unwrap();
    assert!(!report.is_clean(), "tampering must be found");
    let _unused = Arc::new(());
}

/// A store in memory that counts what it is asked to do.
#[derive(Default)]
struct Counting {
    appended: AtomicU64,
    flushes: AtomicU64,
}

impl Store for Counting {
    fn append(&self, records: &[Record]) -> Result<(), StoreError> {
        // Writing a batch takes time (sled: encoding and inserts), long
        // enough for the queue to fill up behind it, as under real load.
        std::thread::sleep(std::time::Duration::from_millis(5));
        self.appended.fetch_add(records.len() as u64, Ordering::SeqCst);
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        std::thread::sleep(std::time::Duration::from_micros(200));
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn records(&self) -> Box<dyn Iterator<Item = Result<Record, StoreError>> + '_> {
        Box::new(std::iter::empty())
    }

    fn read_after(&self, _after: u64, _limit: usize) -> Result<Vec<Record>, StoreError> {
        Ok(Vec::new())
    }
}

#[test]
fn the_writer_keeps_flushing_under_steady_load() {
    // Proves a group closes at its deadline even while records keep coming:
    // settles become durable within the flush window and a waiting admin
    // write is answered during the load, not after it.
    use crate::store::GroupCommit;
    let dir = tempfile::tempdir().unwrap();
    let template = {
        let opened = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
        populate(&opened.ledger);
        opened.writer.shutdown().unwrap();
        drop(opened);
        all_records(&SledStore::open(dir.path()).unwrap()).remove(0)
    };
    let store = Arc::new(Counting::default());
    let writer = Arc::new(GroupCommit::start(Arc::clone(&store), fast()).unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (writer, stop, template) = (Arc::clone(&writer), Arc::clone(&stop), template.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                writer.append(template.clone()).unwrap();
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    let flushes_before = store.flushes.load(Ordering::SeqCst);
    // Sync on another thread: a writer that never flushes would block it
    // until the load stops, which this test must not wait for.
    let (done, waited) = std::sync::mpsc::channel();
    {
        let writer = Arc::clone(&writer);
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let result = writer.sync();
            let _ = done.send((result, started.elapsed()));
        });
    }
    let answer = waited.recv_timeout(std::time::Duration::from_secs(2));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let flushes_during = store.flushes.load(Ordering::SeqCst) - flushes_before;
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    writer.shutdown().unwrap();
    let (result, waited) = answer.expect("a sync under steady load was never answered");
    result.unwrap();
    assert!(waited < std::time::Duration::from_secs(1), "a sync under load waited {waited:?}");
    assert!(flushes_during >= 10, "only {flushes_during} flushes in 300 ms of steady load");
}

/// A sled store with a fault switched on when told to.
struct Faulty {
    inner: SledStore,
    fault: std::sync::atomic::AtomicU8,
}

/// Works.
const HEALTHY: u8 = 0;
/// Fails every write, flush and reopen (a full or broken disk).
const FAILING: u8 = 1;
/// Takes writes without keeping them (what a crash loses).
const FORGETTING: u8 = 2;
/// Works, but a reopen finds flushed records gone (damage a failure left).
const LOST: u8 = 3;
/// Panics on every write (a bug in the writer's path).
const PANICKING: u8 = 4;
/// Panics on every read back (a bug in the historian's path); writes work.
const PANICKING_READS: u8 = 5;

impl Faulty {
    fn new(dir: &std::path::Path) -> Faulty {
        Faulty { inner: SledStore::open(dir).unwrap(), fault: HEALTHY.into() }
    }

    fn set(&self, fault: u8) {
        self.fault.store(fault, Ordering::SeqCst);
    }

    fn check(&self) -> Result<bool, StoreError> {
        match self.fault.load(Ordering::SeqCst) {
            FAILING => Err(StoreError::Sled(::sled::Error::Io(std::io::Error::other("disk full")))),
            PANICKING => panic!("a bug in the store's write path"),
            fault => Ok(fault == FORGETTING),
        }
    }
}

impl Store for Faulty {
    fn append(&self, records: &[Record]) -> Result<(), StoreError> {
        if self.check()? {
            return Ok(());
        }
        self.inner.append(records)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.flush()
    }

    fn records(&self) -> Box<dyn Iterator<Item = Result<Record, StoreError>> + '_> {
        self.inner.records()
    }

    fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        assert_ne!(self.fault.load(Ordering::SeqCst), PANICKING_READS, "a bug in the store's read path");
        self.inner.read_after(after, limit)
    }

    fn acknowledge(&self, reserved_seq: u64) -> Result<(), StoreError> {
        self.check()?;
        self.inner.acknowledge(reserved_seq)
    }

    fn reserved_seq(&self) -> u64 {
        self.inner.reserved_seq()
    }

    fn reopen(&self) -> Result<std::collections::HashSet<u64>, StoreError> {
        self.check()?;
        if self.fault.load(Ordering::SeqCst) == LOST {
            let path = std::path::PathBuf::from("watermark");
            return Err(StoreError::BehindWatermark { found_seq: 1, acknowledged_seq: 2, path });
        }
        self.inner.reopen()
    }
}

/// A writer over a healthy [`Faulty`] store with record 1 durable.
#[allow(clippy::type_complexity)]
fn faulty_writer_with_one_record(
) -> (impl Fn(u64) -> Record, tempfile::TempDir, Arc<Faulty>, crate::store::GroupCommit<Faulty>) {
    let numbered = numbered_records();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Faulty::new(dir.path()));
    let writer = crate::store::GroupCommit::start(Arc::clone(&store), fast()).unwrap();
    writer.begin_after(0).unwrap();
    writer.append(numbered(1)).unwrap();
    writer.sync().unwrap();
    (numbered, dir, store, writer)
}

#[test]
fn a_historian_that_panics_says_so_in_its_status() {
    // Before, its thread died unseen: the status (and the metrics and admin
    // API read from it) went on showing the last checkpoint as current
    // while checkpoints and pruning had stopped for good.
    use crate::store::history::{Historian, HistoryConfig};
    let (_numbered, dir, store, writer) = faulty_writer_with_one_record();
    store.set(PANICKING_READS);
    let writer = Arc::new(writer);
    let clock: Arc<dyn crate::clock::Clock> = crate::clock::ManualClock::new(at("2027-03-10T12:00:00Z"));
    let ledger_config = LedgerConfig::default();
    let exports = dir.path().join("exports");
    let historian = Historian::start(
        writer.clone(),
        dir.path(),
        exports,
        HistoryConfig::default(),
        ledger_config,
        None,
        clock,
    )
    .unwrap();
    wait_until("the historian's panic to show in its status", || {
        historian.status().last_error.is_some_and(|error| error.contains("panicked"))
    });
    historian.stop();
}

#[test]
fn a_store_that_lost_flushed_records_stops_the_journal_for_good() {
    // Proves the writer does not retry over a loss: a reopen that finds
    // flushed records gone (BehindWatermark) fails the journal for good, so
    // the ledger stops and a restart refuses the store, where before the
    // writer wrote on after the gap and moved the watermark past it.
    let (numbered, _dir, store, writer) = faulty_writer_with_one_record();
    store.set(FAILING);
    writer.append(numbered(2)).unwrap();
    wait_until("the writer to see the failure", || writer.health().is_err());
    assert!(matches!(writer.health(), Err(JournalError::Unavailable { .. })), "retried at first");
    store.set(LOST);
    wait_until("the loss to stop the journal", || {
        matches!(writer.health(), Err(JournalError::Failed { .. }))
    });
    store.set(HEALTHY);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(matches!(writer.health(), Err(JournalError::Failed { .. })), "for good");
    assert!(writer.append(numbered(3)).is_err());
}

#[test]
fn a_store_that_cannot_write_refuses_new_work_then_resumes_when_it_can() {
    // Proves fail-closed: once the store fails, holds are refused as
    // Unavailable (the proxy answers 503), and admin writes return an error;
    // and that the writer recovers once the store works again.
    let dir = tempfile::tempdir().unwrap();
    let now = at("2027-03-10T12:00:00Z");
    let store = Faulty::new(dir.path());
    let opened = open_ledger_on(store, LedgerConfig::default(), fast()).unwrap();
    let wallets = populate(&opened.ledger);
    let pool = wallets[0];
    let key = opened.ledger.keys_of(opened.ledger.wallet_org(pool).unwrap())[0].id;
    let context = SpendContext { key, end_user: None };
    opened.writer.store().set(FAILING);
    // The first write after the break fails in the writer; from then on the
    // ledger takes no work.
    let hold = opened.ledger.hold(pool, request(), dec!(1), context, now).unwrap();
    let _ = hold.settle(dec!(1), details(), now);
    let purchase = PurchaseRequest {
        org: opened.ledger.wallet_org(pool).unwrap(),
        amount: dec!(1),
        expires_at: None,
        reference: None,
        idempotency_key: "after-break".into(),
    };
    assert!(opened.ledger.purchase(purchase, now).is_err(), "a purchase is never acknowledged unrecorded");
    let refused = opened.ledger.hold(pool, request(), dec!(1), context, now).unwrap_err();
    assert_eq!(refused.code(), "ledger_unavailable", "{refused:?}");
    assert!(opened.writer.health().is_err(), "the writer reports the failing store");

    // The disk works again: the writer recovers by itself and nothing it
    // kept is lost or written twice.
    opened.writer.store().set(HEALTHY);
    wait_until("the writer to recover", || opened.writer.health().is_ok());
    let hold = opened.ledger.hold(pool, request(), dec!(1), context, now).unwrap();
    hold.settle(dec!(0.5), details(), now).unwrap();
    opened.writer.sync().unwrap();
    opened.writer.shutdown().unwrap();
    let seqs: Vec<u64> = opened.writer.store().records().map(|r| r.unwrap().seq).collect();
    assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "every record stored once: {seqs:?}");
    drop(opened);
    let report = verify_store(dir.path(), None).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn a_number_waiting_in_the_queue_of_a_failing_store_is_never_written_past() {
    // Proves a gap is released only when the queue does not hold the missing
    // number. While the store failed, the writer read its queue only up to a
    // bound and, after the gap patience, wrote past a number still waiting in
    // it: the durable mark then covered a record not yet written, which a
    // checkpoint could leave out for good.
    use crate::store::GroupCommit;
    let numbered = numbered_records();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Faulty::new(dir.path()));
    let config = StoreConfig { queue_capacity: 4, max_batch: 4, gap_patience_ms: 20, ..fast() };
    let writer = GroupCommit::start(Arc::clone(&store), config).unwrap();
    writer.begin_after(0).unwrap();
    store.set(FAILING);
    writer.append(numbered(1)).unwrap();
    wait_until("the writer to see the failure", || writer.health().is_err());
    // 6 comes before 5 (two threads, one slower to send), and 4 fills the
    // bound of records kept for the failing store, so 5 waits in the queue.
    for seq in [2, 3, 6, 4, 5] {
        writer.append(numbered(seq)).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    store.set(HEALTHY);
    wait_until("the writer to recover", || writer.health().is_ok());
    writer.sync().unwrap();
    assert_eq!(writer.durable_through(), 6);
    assert_eq!(writer.stats().written_out_of_order, 0, "every record was written in number order");
    writer.shutdown().unwrap();
    let stored: Vec<u64> = store.records().map(|r| r.unwrap().seq).collect();
    assert_eq!(stored, [1, 2, 3, 4, 5, 6]);
}

#[test]
fn a_writer_thread_that_panics_fails_the_journal_for_good_and_says_so() {
    // Proves a dead writer is seen: before, its panic set nothing, so
    // health (and /readyz) stayed ok while every hold was refused as closed
    // and the records it had taken were lost.
    let (numbered, _dir, store, writer) = faulty_writer_with_one_record();
    store.set(PANICKING);
    writer.append(numbered(2)).unwrap();
    // A sync waiting as it panics is told why, not that the journal closed.
    let synced = writer.sync();
    assert!(
        matches!(&synced, Err(JournalError::Failed { reason }) if reason.contains("panicked")),
        "{synced:?}"
    );
    wait_until("the writer's panic to fail the journal", || {
        matches!(writer.health(), Err(JournalError::Failed { .. }))
    });
    assert!(writer.append(numbered(3)).is_err(), "no new work is taken");
    assert!(matches!(writer.sync(), Err(JournalError::Failed { .. })));
    assert!(matches!(writer.shutdown(), Err(JournalError::Failed { .. })));
}

#[test]
fn a_sync_waiting_behind_a_gap_is_answered_when_the_store_fails() {
    // Proves a barrier carried over a gap in the numbers (a record taken but
    // not yet sent) is answered with the store's failure. It was answered
    // only once the store recovered: a purchase waiting on it held the admin
    // lock, and every admin change waited, for the whole outage.
    use crate::store::GroupCommit;
    let numbered = numbered_records();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Faulty::new(dir.path()));
    let config = StoreConfig { gap_patience_ms: 60_000, ..fast() };
    let writer = Arc::new(GroupCommit::start(Arc::clone(&store), config).unwrap());
    writer.begin_after(0).unwrap();
    writer.append(numbered(1)).unwrap();
    writer.sync().unwrap();
    // 2 is taken and not yet sent: 3 waits behind it, and so does the sync.
    writer.append(numbered(3)).unwrap();
    store.set(FAILING);
    let (answer, answered) = std::sync::mpsc::channel();
    let waiting = Arc::clone(&writer);
    std::thread::spawn(move || answer.send(waiting.sync()));
    let result = answered.recv_timeout(std::time::Duration::from_secs(5)).expect("the sync was not answered");
    assert!(matches!(result, Err(JournalError::Unavailable { .. })), "{result:?}");
    store.set(HEALTHY);
    wait_until("the writer to recover", || writer.health().is_ok());
    writer.append(numbered(2)).unwrap();
    writer.sync().unwrap();
    writer.shutdown().unwrap();
    let stored: Vec<u64> = store.records().map(|r| r.unwrap().seq).collect();
    assert_eq!(stored, [1, 2, 3]);
}

/// Copies of one real record under any number, for the ordering tests.
pub(crate) fn numbered_records() -> impl Fn(u64) -> Record {
    let template = all_records(&SledStore::open(populated_dir().path()).unwrap()).remove(0);
    move |seq| Record { seq, body: template.body.clone() }
}

/// A writer over a fresh sled store at `dir`, numbering from 1.
fn sled_writer(
    dir: &std::path::Path,
    gap_patience_ms: u64,
) -> (Arc<SledStore>, crate::store::GroupCommit<SledStore>) {
    let store = Arc::new(SledStore::open(dir).unwrap());
    let config = StoreConfig { gap_patience_ms, ..fast() };
    let writer = crate::store::GroupCommit::start(Arc::clone(&store), config).unwrap();
    writer.begin_after(0).unwrap();
    (store, writer)
}

/// Polls `done` until it holds (or fails the test after a generous bound).
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn a_reader_paging_by_number_never_skips_a_record_appended_out_of_order() {
    // Proves the writer stores records in number order and serves only up to
    // the durable, contiguous floor: with records 1 and 3 queued before 2, a
    // reader first sees only 1, then 2 and 3. (Before, 1 and 3 were stored
    // and served together, and a reader resuming after 3 never saw 2.)
    let numbered = numbered_records();
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = sled_writer(dir.path(), 60_000);
    writer.append(numbered(1)).unwrap();
    writer.append(numbered(3)).unwrap();
    wait_until("record 1 to be durable", || writer.durable_through() >= 1);
    let seqs = |records: Vec<Record>| records.iter().map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(seqs(writer.read_durable_after(0, 100).unwrap()), [1], "3 waits for 2");
    writer.append(numbered(2)).unwrap();
    writer.sync().unwrap();
    assert_eq!(seqs(writer.read_durable_after(1, 100).unwrap()), [2, 3]);
    writer.shutdown().unwrap();
    let stored: Vec<u64> = store.records().map(|r| r.unwrap().seq).collect();
    assert_eq!(stored, [1, 2, 3], "the store's order is number order");
}

#[test]
fn a_record_written_late_is_stored_at_its_number_and_the_mark_waits_for_it() {
    // Proves a record whose thread stalled past the gap patience (the
    // records after it written without it) holds the durable mark below its
    // number until it comes, and is then stored at its number's place: a
    // reader paging in small steps gets every record once, in order, and a
    // reopen reads them in order. Before, the mark moved past the missing
    // number, and a reader that had moved past it never saw the record.
    let numbered = numbered_records();
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = sled_writer(dir.path(), 20);
    writer.append(numbered(1)).unwrap();
    for seq in 3..=300 {
        writer.append(numbered(seq)).unwrap();
    }
    // Answered once 3..=300 are written past the gap.
    writer.sync().unwrap();
    assert_eq!(store.read_after(2, 1000).unwrap().len(), 298, "the records past the gap are stored");
    assert_eq!(writer.durable_through(), 1, "the mark waits below the missing number");
    assert_eq!(writer.stats().sequence_gaps_open, 1);
    let seqs = |records: Vec<Record>| records.iter().map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(seqs(writer.read_durable_after(0, 100).unwrap()), [1]);
    writer.append(numbered(2)).unwrap();
    writer.sync().unwrap();
    assert_eq!(writer.durable_through(), 300);
    assert_eq!(writer.stats().sequence_gaps_open, 0);
    assert_eq!(writer.stats().written_out_of_order, 1);
    let mut seen = Vec::new();
    let mut cursor = 0;
    loop {
        let page = seqs(writer.read_durable_after(cursor, 5).unwrap());
        let Some(&last) = page.last() else { break };
        cursor = last;
        seen.extend(page);
    }
    assert_eq!(seen, (1..=300).collect::<Vec<u64>>(), "pages of 5");
    writer.shutdown().unwrap();
    drop(writer);
    drop(store);
    let reopened = SledStore::open(dir.path()).unwrap();
    let stored: Vec<u64> = reopened.records().map(|r| r.unwrap().seq).collect();
    assert_eq!(stored, (1..=300).collect::<Vec<u64>>(), "the store's order is number order");
}

#[test]
fn a_late_record_goes_into_the_segment_where_its_number_belongs_once() {
    // Proves the store puts records numbered below its tail in their place
    // (reading in key order gives number order), across segments, and that
    // writing one again (a retry after a failed flush) does not double it.
    let numbered = numbered_records();
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let missing = [2, 150, 151, 299];
    let present: Vec<Record> = (1..=300).filter(|seq| !missing.contains(seq)).map(&numbered).collect();
    for chunk in present.chunks(37) {
        store.append(chunk).unwrap();
    }
    store.append(&[numbered(151), numbered(2)]).unwrap();
    store.append(&[numbered(299), numbered(301), numbered(150)]).unwrap();
    store.append(&[numbered(150)]).unwrap();
    store.flush().unwrap();
    drop(store);
    let reopened = SledStore::open(dir.path()).unwrap();
    let stored: Vec<u64> = reopened.records().map(|r| r.unwrap().seq).collect();
    assert_eq!(stored, (1..=301).collect::<Vec<u64>>());
    let page: Vec<u64> = reopened.read_after(149, 3).unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(page, [150, 151, 152]);
    // A different record under a stored number (a bug) is kept beside it,
    // for verify and replay to see, not written over it.
    let other = all_records(&SledStore::open(populated_dir().path()).unwrap()).remove(1);
    reopened.append(&[Record { seq: 150, body: other.body }]).unwrap();
    let stored: Vec<u64> = reopened.records().map(|r| r.unwrap().seq).collect();
    assert_eq!(stored.iter().filter(|&&seq| seq == 150).count(), 2);
}

#[test]
fn paging_under_concurrent_settles_returns_every_entry_exactly_once() {
    // Proves a reader paging through the durable records while four threads
    // settle on two wallets sees every record exactly once, in order.
    let dir = tempfile::tempdir().unwrap();
    let opened = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
    let wallets = populate(&opened.ledger);
    let org = opened.ledger.wallet_org(wallets[0]).unwrap();
    let keys = opened.ledger.keys_of(org);
    let now = at("2027-03-10T12:00:00Z");
    let spenders: Vec<_> = (0..4)
        .map(|n| {
            let (ledger, wallet, key) = (Arc::clone(&opened.ledger), wallets[n % 2], keys[n % 2].id);
            std::thread::spawn(move || {
                let context = SpendContext { key, end_user: None };
                for _ in 0..400 {
                    let hold = ledger.hold(wallet, request(), dec!(0.01), context, now).unwrap();
                    hold.settle(dec!(0.001), details(), now).unwrap();
                }
            })
        })
        .collect();
    let mut seen = Vec::new();
    let mut cursor = 0;
    let mut read_page = |seen: &mut Vec<u64>| {
        let page = opened.writer.read_durable_after(cursor, 7).unwrap();
        if let Some(last) = page.last() {
            cursor = last.seq;
        }
        seen.extend(page.iter().map(|r| r.seq));
        !page.is_empty()
    };
    while spenders.iter().any(|spender| !spender.is_finished()) {
        read_page(&mut seen);
    }
    for spender in spenders {
        spender.join().unwrap();
    }
    opened.writer.sync().unwrap();
    while read_page(&mut seen) {}
    opened.writer.shutdown().unwrap();
    let stored: Vec<u64> = all_records(opened.writer.store()).iter().map(|r| r.seq).collect();
    assert!(seen.windows(2).all(|pair| pair[0] < pair[1]), "every record once, in order");
    assert_eq!(seen, stored, "the pages hold every stored record");
    assert!(seen.len() > 1_600, "the settles were paged: {}", seen.len());
}

#[test]
fn numbers_lost_in_a_crash_are_never_handed_out_again() {
    // Proves entry ids are never reused: records lost after the last flush
    // took numbers, and after the restart new records are numbered above
    // them. (Before, numbering resumed after the highest stored record and
    // gave the lost numbers to new entries.)
    let dir = tempfile::tempdir().unwrap();
    let now = at("2027-03-10T12:00:00Z");
    let buy = |org, key: &str| PurchaseRequest {
        org,
        amount: dec!(1),
        expires_at: None,
        reference: None,
        idempotency_key: key.into(),
    };
    let (org, lost) = {
        let store = Faulty::new(dir.path());
        let opened = open_ledger_on(store, LedgerConfig::default(), fast()).unwrap();
        let wallets = populate(&opened.ledger);
        let org = opened.ledger.wallet_org(wallets[0]).unwrap();
        opened.writer.store().set(FORGETTING);
        let lost = opened.ledger.purchase(buy(org, "lost"), now).unwrap().entry.0;
        opened.writer.shutdown().unwrap();
        (org, lost)
    };
    let opened = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
    assert!(
        opened.ledger.purchase(buy(org, "lost"), now).is_ok(),
        "the lost purchase is not in the books and can be made again"
    );
    let again = opened.ledger.purchase(buy(org, "after-restart"), now).unwrap().entry.0;
    assert!(again > lost, "entry {again} reuses a number at or below lost entry {lost}");
    opened.writer.shutdown().unwrap();
}

#[test]
fn ledger_verify_finds_a_checkpoint_that_adds_up_but_is_not_what_its_records_make() {
    // Before, both the replay and the auditor started from the newest
    // checkpoint: one that gave a wallet 5 more, in a lot and in its sums
    // alike, passed. Its records are all still in the store.
    let dir = populated_dir();
    let records = all_records(&SledStore::open(dir.path()).unwrap());
    let seq = records.last().unwrap().seq;
    let made = Ledger::restore_from(
        LedgerConfig::default(),
        Arc::new(crate::ledger::journal::NullJournal),
        None,
        records,
    )
    .unwrap()
    .snapshot(seq);
    let checkpoints = crate::store::checkpoint::dir_of(dir.path());
    crate::store::checkpoint::write(&checkpoints, &made, || {}).unwrap();
    let report = verify_store(dir.path(), None).unwrap();
    assert!(report.is_clean(), "the true checkpoint passes: {:#?}", report.audit.mismatches);
    assert_eq!(report.checkpoint_seq, seq);

    let mut forged = made.clone();
    let wallet = forged.wallets.iter_mut().find(|wallet| !wallet.lots.is_empty()).unwrap();
    wallet.lots[0].granted += dec!(5);
    wallet.lots[0].remaining += dec!(5);
    wallet.totals.granted += dec!(5);
    std::fs::remove_dir_all(&checkpoints).unwrap();
    crate::store::checkpoint::write(&checkpoints, &forged, || {}).unwrap();
    let report = verify_store(dir.path(), None).unwrap();
    assert!(!report.is_clean(), "a forged checkpoint passed");
    assert!(
        report
            .audit
            .mismatches
            .iter()
            .any(|m| m.problem.contains("checkpoint") && m.problem.contains("wallets")),
        "{:#?}",
        report.audit.mismatches
    );
}
