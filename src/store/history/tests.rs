//! Checkpoints, retention and verification across the cut, on real sled
//! directories.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

use crate::clock::ManualClock;
use crate::ledger::entity::{KeyHash, Plan};
use crate::ledger::ids::{Owner, WalletId};
use crate::ledger::journal::{Journal, NullJournal};
use crate::ledger::limit::Limits;
use crate::ledger::testkit::{at, details, purchase, request, term};
use crate::ledger::{Ledger, LedgerConfig, NewApp, NewKey, NewOrg, NewUser, SpendContext};
use crate::store::export::{self, ExportPlan};
use crate::store::history::{checkpoint_offline, retain_through, Historian, HistoryConfig};
use crate::store::{checkpoint, open_ledger, verify_store, GroupCommit, SledStore, Store, StoreConfig};

fn fast() -> StoreConfig {
    StoreConfig { flush_interval_ms: 1, ..StoreConfig::default() }
}

/// Org, Pro and Lite users with daily caps, an app with end-user caps, a
/// purchase, settles on `days` consecutive days from `start`, and a Lite
/// user upgraded to Pro half-way. Returns the pool and the remaining Lite
/// wallet.
fn populate(ledger: &Ledger, start: DateTime<Utc>, days: i64) -> Vec<WalletId> {
    let org = ledger
        .create_org(
            NewOrg {
                name: "acme".into(),
                time_zone: Tz::Europe__Paris,
                contract: Some(term("2027-01-01", 1, dec!(1000), 2, dec!(10))),
            },
            start,
        )
        .unwrap()
        .id;
    let capped = Limits { daily: Some(dec!(50)), monthly: Some(dec!(400)), ..Limits::NONE };
    let mut users = Vec::new();
    for (index, plan) in [Plan::Pro, Plan::Lite, Plan::Lite].into_iter().enumerate() {
        let new = NewUser {
            name: format!("u{index}"),
            plan,
            lite_monthly_allowance: dec!(30),
            prorate_on_downgrade: true,
            limits: capped,
        };
        let user = ledger.create_user(org, new, start).unwrap().id;
        let key = NewKey {
            owner: Owner::User(user),
            hash: KeyHash::of_secret(&format!("secret-{index}")),
            label: String::new(),
            limits: Limits { daily: Some(dec!(20)), ..Limits::NONE },
        };
        users.push((user, ledger.create_key(org, key, start).unwrap().id));
    }
    let app = ledger
        .create_app(
            org,
            NewApp {
                name: "bot".into(),
                limits: capped,
                end_user_limits: Limits { daily: Some(dec!(5)), ..Limits::NONE },
            },
            start,
        )
        .unwrap()
        .id;
    let app_key = NewKey {
        owner: Owner::App(app),
        hash: KeyHash::of_secret("secret-app"),
        label: String::new(),
        limits: Limits::NONE,
    };
    let app_key = ledger.create_key(org, app_key, start).unwrap().id;
    ledger.purchase(purchase(org, dec!(40), "buy-1"), start).unwrap();
    for day in 0..days {
        let now = start + TimeDelta::days(day) + TimeDelta::minutes(day * 7);
        if day == days / 2 {
            ledger.set_user_plan(org, users[2].0, Plan::Pro, now).unwrap();
        }
        let mut spenders: Vec<(SpendContext<'_>, Owner)> = users
            .iter()
            .map(|(user, key)| (SpendContext { key: *key, end_user: None }, Owner::User(*user)))
            .collect();
        spenders.push((SpendContext { key: app_key, end_user: Some("carol") }, Owner::App(app)));
        for (context, owner) in spenders {
            let wallet = ledger.wallet_of(owner).unwrap();
            for cost in [dec!(1.25), dec!(0.5)] {
                if let Ok(hold) = ledger.hold(wallet, request(), dec!(2), context, now) {
                    hold.settle(cost, details(), now).unwrap();
                }
            }
        }
    }
    vec![WalletId::Pool(org), WalletId::Lite(users[1].0), WalletId::Lite(users[2].0)]
}

/// The ledger a full replay of the store at `dir` gives.
fn replayed(dir: &Path) -> Ledger {
    let store = SledStore::open(dir).unwrap();
    Ledger::restore(LedgerConfig::default(), Arc::new(NullJournal), store.records().map(Result::unwrap))
        .unwrap()
}

fn highest(dir: &Path) -> u64 {
    let store = SledStore::open(dir).unwrap();
    store.records().map(|r| r.unwrap().seq).max().unwrap()
}

#[test]
fn a_checkpoint_restores_exactly_what_a_full_replay_does() {
    // Proves a checkpoint holds the whole state (lots, sums, limit counters
    // of keys, owners and end users, a Lite wallet left by an upgrade,
    // idempotency keys): restored from it, the ledger snapshots identically
    // to a full replay, refuses and accepts the same, and numbers on.
    let dir = tempfile::tempdir().unwrap();
    let start = at("2027-03-10T09:00:00Z");
    let wallets = {
        let opened = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
        let wallets = populate(&opened.ledger, start, 4);
        opened.writer.shutdown().unwrap();
        wallets
    };
    let seq = checkpoint_offline(dir.path(), LedgerConfig::default()).unwrap().unwrap();
    assert_eq!(seq, highest(dir.path()), "the checkpoint covers every stored record");
    let full = replayed(dir.path());
    let saved = checkpoint::load_newest(&checkpoint::dir_of(dir.path())).unwrap().0.unwrap();
    assert_eq!(saved, full.snapshot(seq), "the checkpoint is the full replay's state");
    assert!(saved.wallets.iter().any(|w| !w.spends.owners.is_empty()), "limit counters are kept");
    let opened = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
    assert_eq!(opened.checkpoint.as_ref().map(|c| c.seq), Some(seq), "start-up used the checkpoint");
    assert_eq!(opened.ledger.snapshot(seq), full.snapshot(seq), "restored state equals the full replay");
    let now = start + TimeDelta::days(3) + TimeDelta::hours(1);
    for wallet in &wallets {
        let (restored, replay) =
            (opened.ledger.balance(*wallet, now).unwrap(), full.balance(*wallet, now).unwrap());
        assert_eq!((restored.balance, restored.totals), (replay.balance, replay.totals), "{wallet}");
    }
    let org = match wallets[0] {
        WalletId::Pool(org) => org,
        WalletId::Lite(_) => unreachable!(),
    };
    let again = purchase(org, dec!(40), "buy-1");
    let receipt = opened.ledger.purchase(again, now).unwrap();
    assert!(receipt.entry.0 < seq, "the idempotency key replays its first receipt");
    let org_again =
        opened.ledger.create_org(NewOrg { name: "b".into(), time_zone: Tz::UTC, contract: None }, now);
    assert!(org_again.unwrap().id.0 > seq, "numbers continue above the checkpoint");
    opened.writer.shutdown().unwrap();
    drop(opened);
    let report = verify_store(dir.path(), None).unwrap();
    assert!(report.is_clean(), "{:#?}", report.audit.mismatches);
    assert_eq!((report.checkpoint_seq, report.records), (seq, 1), "verify starts from the checkpoint");
}

#[test]
fn daily_caps_count_the_same_after_a_checkpoint() {
    // Proves limit counters survive: a hold that the restored key's daily
    // cap refuses is refused by the full replay too, and vice versa.
    let dir = tempfile::tempdir().unwrap();
    let start = at("2027-03-10T09:00:00Z");
    {
        let opened = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
        populate(&opened.ledger, start, 1);
        opened.writer.shutdown().unwrap();
    }
    checkpoint_offline(dir.path(), LedgerConfig::default()).unwrap().unwrap();
    let full = replayed(dir.path());
    let opened = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
    let key = full.keys_of(crate::ledger::ids::OrgId(1)).first().unwrap().id;
    let owner = full.key(key).unwrap().owner;
    let wallet = full.wallet_of(owner).unwrap();
    let context = SpendContext { key, end_user: None };
    for amount in [dec!(18), dec!(17), dec!(1)] {
        let restored = opened.ledger.hold(wallet, request(), amount, context, start).map(drop).is_ok();
        let replay = full.hold(wallet, request(), amount, context, start).map(drop).is_ok();
        assert_eq!(restored, replay, "hold of {amount} under a daily cap of 20 after 1.75 spent");
    }
    opened.writer.shutdown().unwrap();
}

/// Opens, populates over `days` days from `start`, and checkpoints twice
/// (retention prunes only below the older of two checkpoints).
fn history_dir(start: DateTime<Utc>, days: i64) -> (tempfile::TempDir, Vec<WalletId>) {
    let dir = tempfile::tempdir().unwrap();
    let opened = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
    let wallets = populate(&opened.ledger, start, days);
    opened.writer.shutdown().unwrap();
    drop(opened);
    checkpoint_offline(dir.path(), LedgerConfig::default()).unwrap().unwrap();
    let opened = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
    let late = start + TimeDelta::days(days);
    opened.ledger.tick(late);
    opened
        .ledger
        .create_org(NewOrg { name: "late".into(), time_zone: Tz::UTC, contract: None }, late)
        .unwrap();
    opened.writer.shutdown().unwrap();
    drop(opened);
    checkpoint_offline(dir.path(), LedgerConfig::default()).unwrap().unwrap();
    (dir, wallets)
}

#[test]
fn retention_exports_whole_old_days_prunes_them_and_verify_spans_the_cut() {
    // Proves retention exports whole days older than the cut (files and
    // manifests that match), prunes exactly those, that restart still
    // gives the same balances, and that `verify` with the exports checks
    // the whole history and notices a damaged export.
    let start = at("2027-03-10T09:00:00Z");
    let (dir, wallets) = history_dir(start, 5);
    let exports = dir.path().join("exports");
    let before_prune = replayed(dir.path());
    let now = start + TimeDelta::days(5);
    let oldest_checkpoint = checkpoint::list(&checkpoint::dir_of(dir.path())).unwrap().last().unwrap().0;
    let store = SledStore::open(dir.path()).unwrap();
    let cut = (now - TimeDelta::days(2)).date_naive();
    let plan = ExportPlan { after: 0, through: oldest_checkpoint, before: cut, from: None };
    let newest = retain_through(&store, &exports, true, plan, dir.path()).unwrap();
    assert_eq!(newest, Some(cut.pred_opt().unwrap()), "days up to the cut are exported");
    let pruned = store.pruned_through();
    assert!(pruned > 0, "something was pruned");
    let left = store.records().count();
    let below = store.records().filter(|r| r.as_ref().unwrap().seq <= pruned).count();
    assert!(
        below < left && below < 64,
        "only a segment straddling the cut keeps older records: {below} of {left}"
    );
    drop(store);
    let days = export::exported_days(&exports);
    assert_eq!(days.len(), 3, "the first three whole days: {days:?}");
    let mut exported = Vec::new();
    let check = export::read_exports(&exports, |record| exported.push(record)).unwrap();
    assert!(check.problems.is_empty(), "{:?}", check.problems);
    assert_eq!(check.manifests.last().unwrap().last_seq, pruned, "the cut is the last exported record");
    let debited: Decimal = check.manifests.iter().map(|m| m.total.debited).sum();
    assert!(debited > Decimal::ZERO, "manifests sum the debits");
    // Again: nothing more is due, nothing changes.
    let store = SledStore::open(dir.path()).unwrap();
    let plan = ExportPlan { after: 0, through: oldest_checkpoint, before: cut, from: None };
    assert_eq!(retain_through(&store, &exports, true, plan, dir.path()).unwrap(), None);
    drop(store);
    let opened = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
    for wallet in &wallets {
        let (after, before) =
            (opened.ledger.balance(*wallet, now).unwrap(), before_prune.balance(*wallet, now).unwrap());
        assert_eq!((after.balance, after.totals), (before.balance, before.totals), "{wallet}");
    }
    opened.writer.shutdown().unwrap();
    drop(opened);
    let report = verify_store(dir.path(), Some(&exports)).unwrap();
    assert!(report.is_clean(), "{report:#?}");
    let full = report.full_history.as_ref().unwrap();
    assert_eq!((full.days, full.exported_records), (3, exported.len()));
    // A damaged export is reported, not trusted.
    let file = exports.join(&check.manifests[0].file);
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let report = verify_store(dir.path(), Some(&exports)).unwrap();
    assert!(!report.is_clean(), "a flipped byte in an export fails verify");
    // Without the exports the history does not reach the first record.
    std::fs::remove_dir_all(&exports).unwrap();
    let report = verify_store(dir.path(), Some(&exports)).unwrap();
    assert!(!report.is_clean(), "missing exports fail the whole-history check");
}

#[test]
fn a_start_refuses_pruned_records_no_checkpoint_covers() {
    // Proves that when every checkpoint covering the pruned records is
    // gone, start-up stops with an error instead of serving partial books.
    let start = at("2027-03-10T09:00:00Z");
    let (dir, _) = history_dir(start, 4);
    let store = SledStore::open(dir.path()).unwrap();
    let through = checkpoint::list(&checkpoint::dir_of(dir.path())).unwrap().last().unwrap().0;
    let plan =
        ExportPlan { after: 0, through, before: (start + TimeDelta::days(3)).date_naive(), from: None };
    retain_through(&store, &dir.path().join("exports"), false, plan, dir.path()).unwrap();
    assert!(store.pruned_through() > 0);
    drop(store);
    std::fs::remove_dir_all(checkpoint::dir_of(dir.path())).unwrap();
    let error = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap_err().to_string();
    assert!(error.contains("pruned"), "{error}");
}

/// A historian over `writer` from the first record: a checkpoint every
/// `every` records or every minute of `clock`.
fn start_historian(
    dir: &Path,
    writer: &Arc<GroupCommit<SledStore>>,
    every: u64,
    clock: &Arc<ManualClock>,
) -> Historian {
    let config = HistoryConfig {
        checkpoint_every_records: every,
        checkpoint_interval_ms: 60_000,
        ..HistoryConfig::default()
    };
    let clock: Arc<dyn crate::clock::Clock> = clock.clone();
    Historian::start(writer.clone(), dir, dir.join("exports"), config, LedgerConfig::default(), None, clock)
        .unwrap()
}

#[test]
fn the_historian_checkpoints_by_count_and_by_clock_off_the_request_path() {
    // Proves the background historian writes a checkpoint once enough
    // records are durable, and another once the injected clock passes the
    // interval, and that a restart then starts from the newest one.
    let dir = tempfile::tempdir().unwrap();
    let start = at("2027-03-10T09:00:00Z");
    let clock = ManualClock::new(start);
    let opened = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
    let historian = start_historian(dir.path(), &opened.writer, 20, &clock);
    populate(&opened.ledger, start, 2);
    let wait_for = |count: u64| {
        for _ in 0..100 {
            if historian.status().checkpoints_written >= count {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no checkpoint {count}: {:?}", historian.status());
    };
    wait_for(1);
    let by_count = historian.status().checkpoint_seq;
    opened
        .ledger
        .create_org(NewOrg { name: "one more".into(), time_zone: Tz::UTC, contract: None }, start)
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(historian.status().checkpoints_written, 1, "one record is not enough before the interval");
    clock.advance(TimeDelta::minutes(2));
    wait_for(2);
    let by_clock = historian.status().checkpoint_seq;
    assert!(by_clock > by_count, "{by_clock} > {by_count}");
    historian.stop();
    opened.writer.shutdown().unwrap();
    drop(opened);
    let reopened = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
    assert_eq!(reopened.checkpoint.as_ref().map(|c| c.seq), Some(by_clock));
    reopened.writer.shutdown().unwrap();
}

/// A populated, flushed store with a historian started over it (a
/// checkpoint only by the clock), for the hand-over tests.
struct Watched {
    dir: tempfile::TempDir,
    start: DateTime<Utc>,
    clock: Arc<ManualClock>,
    opened: crate::store::OpenLedger<SledStore>,
    org: crate::ledger::ids::OrgId,
    /// Durable before the historian started.
    before: u64,
    historian: Historian,
}

fn watched() -> Watched {
    let dir = tempfile::tempdir().unwrap();
    let start = at("2027-03-10T09:00:00Z");
    let clock = ManualClock::new(start);
    let opened = open_ledger(dir.path(), LedgerConfig::default(), fast()).unwrap();
    let wallets = populate(&opened.ledger, start, 2);
    let WalletId::Pool(org) = wallets[0] else { unreachable!() };
    Journal::sync(&*opened.writer).unwrap();
    let before = opened.writer.durable_through();
    let historian = start_historian(dir.path(), &opened.writer, 1_000_000, &clock);
    Watched { dir, start, clock, opened, org, before, historian }
}

impl Watched {
    /// Flushes, moves the clock past the interval and waits for the
    /// checkpoint of everything durable: its number and the status then.
    fn checkpoint_all(&self) -> (u64, crate::store::history::HistoryStatus) {
        Journal::sync(&*self.opened.writer).unwrap();
        let last = self.opened.writer.durable_through();
        for _ in 0..100 {
            // Past the interval again each time: a checkpoint taken before
            // the last batch reached the shadow is followed by another.
            self.clock.advance(TimeDelta::minutes(2));
            if self.historian.status().checkpoint_seq >= last {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = self.historian.status();
        assert_eq!(status.checkpoint_seq, last, "{status:?}");
        (last, status)
    }

    /// Stops everything; the newest checkpoint must be exactly a full
    /// replay's state through `last`.
    fn assert_checkpoint_is_a_full_replay(self, last: u64) {
        self.historian.stop();
        self.opened.writer.shutdown().unwrap();
        drop(self.opened);
        let saved = checkpoint::load_newest(&checkpoint::dir_of(self.dir.path())).unwrap().0.unwrap();
        assert_eq!(
            saved,
            replayed(self.dir.path()).snapshot(last),
            "the checkpoint is the full replay's state"
        );
    }
}

#[test]
fn the_shadow_takes_flushed_batches_from_the_writer_and_reads_back_only_what_it_missed() {
    // Proves the hand-over: records durable before the historian started
    // are read back from the store, later ones arrive from the writer after
    // each flush, and the checkpoint built from both is exactly a full
    // replay's state.
    let watched = watched();
    let later = watched.start + TimeDelta::days(2);
    for n in 0..40 {
        watched.opened.ledger.purchase(purchase(watched.org, dec!(3), &format!("later-{n}")), later).unwrap();
        if n % 10 == 0 {
            // A few flushes, so several batches are handed over.
            Journal::sync(&*watched.opened.writer).unwrap();
        }
    }
    let (last, status) = watched.checkpoint_all();
    assert!(
        status.records_read_back >= watched.before,
        "what came before the historian is read back: {status:?}"
    );
    assert!(status.records_handed_over > 0, "later records come from the writer: {status:?}");
    assert!(
        status.records_read_back + status.records_handed_over <= last,
        "no record is taken twice: {status:?}"
    );
    watched.assert_checkpoint_is_a_full_replay(last);
}

#[test]
fn records_flushed_while_a_step_runs_come_from_the_next_hand_over_not_the_store() {
    // Proves that under writes flushing all along, the shadow reads nothing
    // back from the store once it has what came before it: a batch flushed
    // while a step applies the batches it took waits for the next step.
    // (Each step used to read back up to the writer's mark at its end,
    // which under load was 5-11% of all records.) The checkpoint built this
    // way is still exactly a full replay's state.
    let watched = watched();
    for _ in 0..100 {
        if watched.historian.status().records_read_back >= watched.before {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let at_start = watched.historian.status();
    assert!(
        at_start.records_read_back >= watched.before,
        "what came before is read back first: {at_start:?}"
    );
    // Some six steps of the historian (one each 500 ms), a flush each
    // record: at most one a millisecond (the flush interval), far fewer
    // batches a step than the hand-over holds.
    let later = watched.start + TimeDelta::days(2);
    let until = std::time::Instant::now() + Duration::from_millis(3_000);
    let mut n = 0;
    while std::time::Instant::now() < until {
        watched
            .opened
            .ledger
            .purchase(purchase(watched.org, dec!(1), &format!("steady-{n}")), later)
            .unwrap();
        Journal::sync(&*watched.opened.writer).unwrap();
        n += 1;
    }
    let (last, status) = watched.checkpoint_all();
    assert!(n >= 100, "the writes ran through several steps: {n}");
    assert_eq!(
        status.records_read_back, at_start.records_read_back,
        "nothing written after the start was read back: {status:?}"
    );
    watched.assert_checkpoint_is_a_full_replay(last);
}

/// Writes the checked-in fixture (`tests/fixtures/checkpoint-v1.cgcp`)
/// when `CREDITGATE_WRITE_CHECKPOINT_FIXTURE` names where to put it; the
/// fixture must only change with a new format version.
#[test]
fn write_the_checkpoint_fixture_on_request() {
    let Ok(path) = std::env::var("CREDITGATE_WRITE_CHECKPOINT_FIXTURE") else {
        return;
    };
    let ledger = Ledger::new(LedgerConfig::default(), Arc::new(NullJournal));
    populate(&ledger, at("2027-03-10T09:00:00Z"), 2);
    let dir = tempfile::tempdir().unwrap();
    let seq = ledger
        .create_org(
            NewOrg { name: "last".into(), time_zone: Tz::UTC, contract: None },
            at("2027-03-12T09:00:00Z"),
        )
        .unwrap()
        .id
        .0;
    // A shadow without open holds: replay the same state from a snapshot.
    let written = checkpoint::write(dir.path(), &ledger.snapshot(seq), || {}).unwrap();
    std::fs::copy(written, path).unwrap();
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.metadata().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn compaction_gives_pruned_space_back_and_survives_an_interrupted_swap() {
    // Proves `ledger compact` shrinks a pruned store without changing a
    // balance, keeps checkpoints and the watermark, and that a crash after
    // the original was moved aside is finished (or undone) by the next open.
    let start = at("2027-03-10T09:00:00Z");
    let (dir, wallets) = history_dir(start, 6);
    let ledger_dir = dir.path().join("ledger");
    std::fs::rename(dir.path().join("checkpoints"), dir.path().join("moved")).unwrap();
    // The store lives in a subdirectory so it has a parent to swap in.
    std::fs::create_dir(&ledger_dir).unwrap();
    for entry in std::fs::read_dir(dir.path()).unwrap().flatten() {
        if entry.file_name() != "ledger" && entry.file_name() != "moved" {
            std::fs::rename(entry.path(), ledger_dir.join(entry.file_name())).unwrap();
        }
    }
    std::fs::rename(dir.path().join("moved"), checkpoint::dir_of(&ledger_dir)).unwrap();
    let now = start + TimeDelta::days(6);
    let through = checkpoint::list(&checkpoint::dir_of(&ledger_dir)).unwrap().last().unwrap().0;
    let before = replayed(&ledger_dir);
    {
        let store = SledStore::open(&ledger_dir).unwrap();
        let plan =
            ExportPlan { after: 0, through, before: (now - TimeDelta::days(1)).date_naive(), from: None };
        retain_through(&store, &dir.path().join("exports"), true, plan, &ledger_dir).unwrap();
    }
    let (size_before, size_after) = crate::store::compact::compact(&ledger_dir).unwrap();
    assert!(size_after < size_before, "{size_after} < {size_before}");
    let check = |label: &str| {
        let opened = open_ledger(&ledger_dir, LedgerConfig::default(), fast()).unwrap();
        assert!(opened.checkpoint.is_some(), "{label}: checkpoints came along");
        for wallet in &wallets {
            let (after, expected) =
                (opened.ledger.balance(*wallet, now).unwrap(), before.balance(*wallet, now).unwrap());
            assert_eq!(
                (after.balance, after.totals),
                (expected.balance, expected.totals),
                "{label}: {wallet}"
            );
        }
        opened.writer.shutdown().unwrap();
    };
    check("compacted");
    // A crash between the two renames: the original moved aside, the complete copy not yet in place.
    let copy = dir.path().join("ledger.compacting");
    copy_tree(&ledger_dir, &copy);
    std::fs::write(copy.join("COMPLETE"), b"").unwrap();
    std::fs::rename(&ledger_dir, dir.path().join("ledger.old")).unwrap();
    check("finished after a crash");
    assert!(!copy.exists() && !dir.path().join("ledger.old").exists(), "nothing is left behind");
    // The original moved aside with no complete copy to take its place (the
    // swap failed, or another command removed the copy): it is put back.
    // Before, the next open made an empty store and the one after it
    // deleted the original.
    std::fs::write(ledger_dir.join("MOVED_BY_COMPACTION"), b"").unwrap();
    std::fs::rename(&ledger_dir, dir.path().join("ledger.old")).unwrap();
    check("put back");
    assert!(!dir.path().join("ledger.old").exists() && !ledger_dir.join("MOVED_BY_COMPACTION").exists());
    let report = verify_store(&ledger_dir, Some(&dir.path().join("exports"))).unwrap();
    assert!(report.is_clean(), "{report:#?}");
    // One an operator moved aside on purpose (no mark) stays where it is.
    std::fs::rename(&ledger_dir, dir.path().join("ledger.old")).unwrap();
    crate::store::compact::finish_interrupted(&ledger_dir).unwrap();
    assert!(!ledger_dir.exists() && dir.path().join("ledger.old").exists());
}

#[test]
fn a_record_stored_after_the_writer_wrote_past_its_number_is_in_the_checkpoint() {
    // Proves a record whose thread stalled past the writer's gap patience
    // (written after the records numbered above it) reaches the shadow and
    // the checkpoint. Before, the durable mark moved past the missing
    // number, a checkpoint was taken without it, and the record, when it
    // came, was skipped as already covered: a restart from that checkpoint
    // lost it.
    let source = tempfile::tempdir().unwrap();
    let opened = open_ledger(source.path(), LedgerConfig::default(), fast()).unwrap();
    populate(&opened.ledger, at("2027-03-10T09:00:00Z"), 2);
    opened.writer.shutdown().unwrap();
    drop(opened);
    let mut records: Vec<_> = SledStore::open(source.path()).unwrap().records().map(Result::unwrap).collect();
    records.sort_by_key(|record| record.seq);
    // The last entry of some wallet with other records after it: numbers are
    // taken under the wallet's lock, so only other wallets' records can
    // overtake a stalled one.
    let wallet_of = |record: &crate::ledger::journal::Record| match &record.body {
        crate::ledger::journal::RecordBody::Entry(entry) => Some(entry.wallet),
        _ => None,
    };
    let position = (records.len() / 2..records.len() - 1)
        .find(|&n| {
            wallet_of(&records[n])
                .is_some_and(|wallet| records[n + 1..].iter().all(|later| wallet_of(later) != Some(wallet)))
        })
        .unwrap();
    let stalled = records.remove(position);
    let last = records.last().unwrap().seq;

    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig { gap_patience_ms: 20, ..fast() };
    let opened = open_ledger(dir.path(), LedgerConfig::default(), config).unwrap();
    let clock = ManualClock::new(at("2027-03-12T09:00:00Z"));
    let historian = start_historian(dir.path(), &opened.writer, 1_000_000, &clock);
    for record in records {
        Journal::append(&*opened.writer, record).unwrap();
    }
    // Answered once the records past the gap are written (after the patience).
    Journal::sync(&*opened.writer).unwrap();
    assert_eq!(opened.writer.durable_through(), stalled.seq - 1, "the mark waits below the gap");
    assert_eq!(opened.writer.stats().sequence_gaps_open, 1);
    for _ in 0..10 {
        clock.advance(TimeDelta::minutes(2));
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = historian.status();
    assert!(before.checkpoint_seq < stalled.seq, "no checkpoint passes the gap: {before:?}");

    Journal::append(&*opened.writer, stalled.clone()).unwrap();
    Journal::sync(&*opened.writer).unwrap();
    assert_eq!(opened.writer.durable_through(), last);
    assert_eq!(opened.writer.stats().sequence_gaps_open, 0);
    assert_eq!(opened.writer.stats().written_out_of_order, 1);
    for _ in 0..200 {
        clock.advance(TimeDelta::minutes(2));
        if historian.status().checkpoint_seq >= last {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(historian.status().checkpoint_seq, last, "{:?}", historian.status());
    historian.stop();
    opened.writer.shutdown().unwrap();
    drop(opened);
    let saved = checkpoint::load_newest(&checkpoint::dir_of(dir.path())).unwrap().0.unwrap();
    assert_eq!(saved, replayed(dir.path()).snapshot(last), "the checkpoint is the full replay's state");
    assert_eq!(saved, replayed(source.path()).snapshot(last), "and the original ledger's");
}
