//! A seeded random workload against a deliberately naive reference model.
//!
//! Holds, settles (under, at and over the hold), releases, purchases, clock
//! jumps from minutes to weeks (crossing months, contract years and a
//! renewal), TTL voids and restarts through a real sled directory. After
//! every step both wallets' balance, available balance and open holds must
//! equal the model's. A failure prints the seed and step; rerun one seed with
//! `LEDGER_SIM_SEED=<seed> cargo test simulation`.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Datelike, NaiveDate, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

use crate::ledger::entity::{KeyHash, Plan};
use crate::ledger::ids::{KeyId, OrgId, Owner, RequestId, WalletId};
use crate::ledger::limit::Limits;
use crate::ledger::testkit::{details, request, term, SplitMix};
use crate::ledger::{Hold, LedgerConfig, NewKey, NewOrg, NewUser, PurchaseRequest, SpendContext};
use crate::store::{open_ledger, verify_store, OpenLedger, SledStore, StoreConfig};

const STEPS: usize = 10_000;
const HOLD_TTL_MINUTES: i64 = 30;
const PLATFORM: Decimal = dec!(2000);
const SEATS: u32 = 2;
const PER_SEAT: Decimal = dec!(300);
const ALLOWANCE: Decimal = dec!(50);

// ---- the reference model ---------------------------------------------------

#[derive(Clone, Debug)]
struct ModelLot {
    expires_at: DateTime<Utc>,
    rank: u8,
    seq: u64,
    left: Decimal,
}

#[derive(Debug, Default)]
struct ModelWallet {
    lots: Vec<ModelLot>,
    deficit: Decimal,
    /// Amount, TTL expiry, and whether its token still lives (only orphans expire).
    holds: BTreeMap<RequestId, (Decimal, DateTime<Utc>, bool)>,
    /// When each hold was taken and the lots live then: its call is paid
    /// from them even if they expired before it settled.
    made: BTreeMap<RequestId, (DateTime<Utc>, Vec<u64>)>,
    /// Lots written off at their expiry, with what their write-off still holds.
    expired: Vec<ModelLot>,
    granted: HashSet<String>,
}

impl ModelWallet {
    fn balance(&self) -> Decimal {
        self.lots.iter().map(|l| l.left).sum::<Decimal>() - self.deficit
    }

    fn available(&self) -> Decimal {
        self.balance() - self.holds.values().map(|h| h.0).sum::<Decimal>()
    }

    fn add_lot(&mut self, seq: &mut u64, rank: u8, amount: Decimal, expires_at: DateTime<Utc>) {
        let repaid = self.deficit.min(amount);
        self.deficit -= repaid;
        *seq += 1;
        self.lots.push(ModelLot { expires_at, rank, seq: *seq, left: amount - repaid });
    }

    /// The seqs of the live lots.
    fn live(&self) -> Vec<u64> {
        self.lots.iter().map(|l| l.seq).collect()
    }

    /// Gives back, from lots live at `made_at` that expired since (within
    /// the 31 days write-offs are remembered), what a call made then costs.
    fn take_back(
        &mut self,
        seq: &mut u64,
        made_at: DateTime<Utc>,
        live: &[u64],
        cost: Decimal,
        now: DateTime<Utc>,
    ) {
        let horizon = now - TimeDelta::days(31);
        self.expired.sort_by_key(|l| (l.expires_at, l.rank, l.seq));
        let mut left = cost;
        let mut given = Vec::new();
        for lot in &mut self.expired {
            if lot.expires_at <= horizon || lot.expires_at <= made_at || !live.contains(&lot.seq) {
                continue;
            }
            let give = left.min(lot.left);
            lot.left -= give;
            left -= give;
            if !give.is_zero() {
                given.push((lot.rank, give, lot.expires_at));
            }
        }
        self.expired.retain(|l| !l.left.is_zero());
        for (rank, give, expires_at) in given {
            self.add_lot(seq, rank, give, expires_at);
        }
    }

    fn draw(&mut self, amount: Decimal) {
        self.lots.sort_by_key(|l| (l.expires_at, l.rank, l.seq));
        let mut left = amount;
        for lot in &mut self.lots {
            let take = left.min(lot.left);
            lot.left -= take;
            left -= take;
        }
        self.lots.retain(|l| !l.left.is_zero());
        self.deficit += left;
    }
}

/// The model's view of the org: zone, terms (start date, years) and wallets.
struct Model {
    tz: Tz,
    terms: Vec<(NaiveDate, u32)>,
    pool: ModelWallet,
    lite: ModelWallet,
    seq: u64,
}

impl Model {
    fn midnight(&self, date: NaiveDate) -> DateTime<Utc> {
        let naive = date.and_hms_opt(0, 0, 0).unwrap();
        self.tz.from_local_datetime(&naive).earliest().unwrap().with_timezone(&Utc)
    }

    fn anniversary(start: NaiveDate, years: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(start.year() + i32::try_from(years).unwrap(), start.month(), start.day())
            .unwrap()
    }

    fn term_end_at(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.terms.iter().find_map(|(start, years)| {
            let end = self.midnight(Self::anniversary(*start, *years));
            (self.midnight(*start) <= now && now < end).then_some(end)
        })
    }

    fn advance(&mut self, wallet: WalletKey, now: DateTime<Utc>) {
        let (tz, terms) = (self.tz, self.terms.clone());
        let mut years = Vec::new();
        for (index, (start, count)) in terms.iter().enumerate() {
            for year in 0..*count {
                let from = self.midnight(Self::anniversary(*start, year));
                let to = self.midnight(Self::anniversary(*start, year + 1));
                years.push((format!("{index}:{year}"), from, to));
            }
        }
        let local = now.with_timezone(&tz);
        let month_start = self.midnight(NaiveDate::from_ymd_opt(local.year(), local.month(), 1).unwrap());
        let next =
            if local.month() == 12 { (local.year() + 1, 1) } else { (local.year(), local.month() + 1) };
        let month_end = self.midnight(NaiveDate::from_ymd_opt(next.0, next.1, 1).unwrap());
        let mut seq = self.seq;
        let target = match wallet {
            WalletKey::Pool => &mut self.pool,
            WalletKey::Lite => &mut self.lite,
        };
        let (live, expired): (Vec<ModelLot>, Vec<ModelLot>) =
            std::mem::take(&mut target.lots).into_iter().partition(|l| l.expires_at > now);
        target.lots = live;
        target.expired.extend(expired.into_iter().filter(|l| !l.left.is_zero()));
        target.holds.retain(|_, h| h.1 > now || h.2);
        match wallet {
            WalletKey::Pool => {
                for (name, from, to) in years {
                    if from <= now && now < to && target.granted.insert(name) {
                        target.add_lot(&mut seq, 0, PLATFORM, to);
                        target.add_lot(&mut seq, 1, PER_SEAT * Decimal::from(SEATS), to);
                    }
                }
            }
            WalletKey::Lite => {
                let name = format!("{}-{}", local.year(), local.month());
                if month_start <= now && target.granted.insert(name) {
                    target.add_lot(&mut seq, 2, ALLOWANCE, month_end);
                }
            }
        }
        self.seq = seq;
    }

    fn wallet(&mut self, wallet: WalletKey) -> &mut ModelWallet {
        match wallet {
            WalletKey::Pool => &mut self.pool,
            WalletKey::Lite => &mut self.lite,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WalletKey {
    Pool,
    Lite,
}

// ---- the system under test -------------------------------------------------

struct System {
    opened: OpenLedger<SledStore>,
    org: OrgId,
    pool_key: KeyId,
    lite_wallet: WalletId,
    lite_key: KeyId,
    holds: Vec<(WalletKey, Hold)>,
}

impl System {
    fn wallet_id(&self, wallet: WalletKey) -> WalletId {
        match wallet {
            WalletKey::Pool => WalletId::Pool(self.org),
            WalletKey::Lite => self.lite_wallet,
        }
    }

    fn key(&self, wallet: WalletKey) -> KeyId {
        match wallet {
            WalletKey::Pool => self.pool_key,
            WalletKey::Lite => self.lite_key,
        }
    }
}

fn config() -> (LedgerConfig, StoreConfig) {
    let ledger = LedgerConfig {
        hold_ttl_ms: u64::try_from(HOLD_TTL_MINUTES * 60_000).unwrap(),
        max_open_holds_per_wallet: 64,
        ..LedgerConfig::default()
    };
    (ledger, StoreConfig { flush_interval_ms: 1, ..StoreConfig::default() })
}

fn setup(dir: &std::path::Path, tz: Tz, now: DateTime<Utc>) -> System {
    let (ledger_config, store_config) = config();
    let opened = open_ledger(dir, ledger_config, store_config).unwrap();
    let ledger = &opened.ledger;
    let contract = term("2027-01-01", 2, PLATFORM, SEATS, PER_SEAT);
    let org = ledger
        .create_org(NewOrg { name: "sim".into(), time_zone: tz, contract: Some(contract) }, now)
        .unwrap()
        .id;
    let mut keys = Vec::new();
    for (index, plan) in [Plan::Pro, Plan::Lite].into_iter().enumerate() {
        let new_user = NewUser {
            name: format!("u{index}"),
            plan,
            lite_monthly_allowance: ALLOWANCE,
            prorate_on_downgrade: false,
            limits: Limits::NONE,
        };
        let user = ledger.create_user(org, new_user, now).unwrap().id;
        let new_key = NewKey {
            owner: Owner::User(user),
            hash: KeyHash::of_secret(&format!("sim-{index}")),
            label: String::new(),
            limits: Limits::NONE,
        };
        keys.push((user, ledger.create_key(org, new_key, now).unwrap().id));
    }
    System {
        opened,
        org,
        pool_key: keys[0].1,
        lite_wallet: WalletId::Lite(keys[1].0),
        lite_key: keys[1].1,
        holds: Vec::new(),
    }
}

/// Restarts on the same directory; with `checkpoint`, writes a checkpoint
/// first, so the restart loads it and replays only what follows.
fn restart(system: System, dir: &std::path::Path, checkpoint: bool) -> System {
    let System { opened, org, pool_key, lite_wallet, lite_key, holds } = system;
    // Tokens belong to the old in-memory state, and keep its store open.
    drop(holds);
    opened.writer.shutdown().unwrap();
    drop(opened);
    let (ledger_config, store_config) = config();
    if checkpoint {
        crate::store::history::checkpoint_offline(dir, ledger_config.clone()).unwrap();
    }
    let opened = open_ledger(dir, ledger_config, store_config).unwrap();
    System { opened, org, pool_key, lite_wallet, lite_key, holds: Vec::new() }
}

fn jump(rng: &mut SplitMix) -> TimeDelta {
    let seconds = match rng.below(100) {
        0..=69 => rng.below(600),
        70..=89 => rng.below(6 * 3600),
        90..=98 => rng.below(5 * 86_400),
        _ => rng.below(45 * 86_400),
    };
    TimeDelta::seconds(i64::try_from(seconds).unwrap())
}

/// Runs one seed; panics (after printing the seed and step) on any divergence.
fn run(seed: u64) {
    let step = std::cell::Cell::new(0_usize);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_steps(seed, &step)));
    if let Err(panic) = outcome {
        eprintln!("ledger simulation failed: seed {seed} at step {}", step.get());
        std::panic::resume_unwind(panic);
    }
}

fn run_steps(seed: u64, step: &std::cell::Cell<usize>) {
    let mut rng = SplitMix(seed);
    let tz = if seed % 2 == 0 { Tz::America__New_York } else { Tz::UTC };
    let dir = tempfile::tempdir().unwrap();
    let mut now: DateTime<Utc> = "2027-01-20T12:00:00Z".parse().unwrap();
    let mut system = setup(dir.path(), tz, now);
    let mut model = Model {
        tz,
        terms: vec![(NaiveDate::from_ymd_opt(2027, 1, 1).unwrap(), 2)],
        pool: ModelWallet::default(),
        lite: ModelWallet::default(),
        seq: 0,
    };
    let mut purchases = 0_u64;
    let mut renewed = false;
    let mut seen = Seen::default();
    for index in 0..STEPS {
        step.set(index);
        let wallet = if rng.chance(60) { WalletKey::Pool } else { WalletKey::Lite };
        match rng.below(1000) {
            0..=299 => {
                let amount = rng.cents(2000);
                model.advance(wallet, now);
                let expected = {
                    let m = model.wallet(wallet);
                    m.holds.len() < 64 && m.available() >= amount
                };
                let context = SpendContext { key: system.key(wallet), end_user: None };
                let id = request();
                let result = system.opened.ledger.hold(system.wallet_id(wallet), id, amount, context, now);
                assert_eq!(
                    result.is_ok(),
                    expected,
                    "hold {amount} on {wallet:?}: {:?}",
                    result.as_ref().err()
                );
                seen.refused += u32::from(result.is_err());
                if let Ok(hold) = result {
                    let expiry = now + TimeDelta::minutes(HOLD_TTL_MINUTES);
                    let m = model.wallet(wallet);
                    m.holds.insert(id, (amount, expiry, true));
                    let live = m.live();
                    m.made.insert(id, (now, live));
                    system.holds.push((wallet, hold));
                }
            }
            300..=549 if !system.holds.is_empty() => {
                let pick = usize::try_from(rng.below(system.holds.len() as u64)).unwrap();
                let (wallet, hold) = system.holds.swap_remove(pick);
                let held = hold.amount();
                let actual = if rng.chance(10) {
                    Decimal::ZERO
                } else {
                    (held * Decimal::from(rng.below(151)) / dec!(100)).round_dp(2)
                };
                model.advance(wallet, now);
                let mut seq = model.seq;
                let model_wallet = model.wallet(wallet);
                let was_open = model_wallet.holds.remove(&hold.request_id()).is_some();
                let made = model_wallet.made.remove(&hold.request_id());
                if let (true, Some((made_at, live)), false) = (was_open, made, actual.is_zero()) {
                    let written_off = model_wallet.expired.iter().map(|l| l.left).sum::<Decimal>();
                    model_wallet.take_back(&mut seq, made_at, &live, actual, now);
                    let after = model_wallet.expired.iter().map(|l| l.left).sum::<Decimal>();
                    seen.taken_back += u32::from(after < written_off);
                }
                model_wallet.draw(actual);
                model.seq = seq;
                let settled = hold.settle(actual, details(), now).unwrap();
                assert_eq!(settled.late, !was_open, "late flag");
                seen.overruns += u32::from(settled.overrun > Decimal::ZERO);
                assert_eq!(settled.debited, actual);
            }
            550..=609 if !system.holds.is_empty() => {
                let pick = usize::try_from(rng.below(system.holds.len() as u64)).unwrap();
                let (wallet, hold) = system.holds.swap_remove(pick);
                model.advance(wallet, now);
                let held =
                    model.wallet(wallet).holds.remove(&hold.request_id()).map_or(Decimal::ZERO, |h| h.0);
                assert_eq!(hold.release(now), held, "released amount");
            }
            610..=629 if !system.holds.is_empty() => {
                // A token lost without a settle: its hold is an orphan the TTL voids.
                let pick = usize::try_from(rng.below(system.holds.len() as u64)).unwrap();
                let (wallet, hold) = system.holds.swap_remove(pick);
                if let Some(open) = model.wallet(wallet).holds.get_mut(&hold.request_id()) {
                    open.2 = false;
                }
                drop(hold);
                seen.orphans += 1;
            }
            630..=659 => {
                purchases += 1;
                let amount = rng.cents(20_000) + dec!(1);
                let request = PurchaseRequest {
                    org: system.org,
                    amount,
                    expires_at: None,
                    reference: None,
                    idempotency_key: format!("p{purchases}"),
                };
                model.advance(WalletKey::Pool, now);
                let result = system.opened.ledger.purchase(request, now);
                match model.term_end_at(now) {
                    Some(end) => {
                        let receipt = result.unwrap();
                        assert_eq!(receipt.expires_at, end);
                        let mut seq = model.seq;
                        model.pool.add_lot(&mut seq, 3, amount, end);
                        model.seq = seq;
                    }
                    None => assert!(result.is_err(), "purchase outside any term must be refused"),
                }
            }
            660..=859 => now += jump(&mut rng),
            860..=879 => {
                let report = system.opened.ledger.tick(now);
                model.advance(WalletKey::Pool, now);
                model.advance(WalletKey::Lite, now);
                assert_eq!(report.wallets, 2);
            }
            880..=882 => {
                // Every other restart goes through a checkpoint.
                system = restart(system, dir.path(), seen.restarts % 2 == 1);
                seen.restarts += 1;
                model.pool.holds.clear();
                model.lite.holds.clear();
                model.pool.made.clear();
                model.lite.made.clear();
            }
            _ => {}
        }
        if !renewed && now >= "2028-10-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap() {
            renewed = true;
            let next = term("2029-01-01", 2, PLATFORM, SEATS, PER_SEAT);
            system.opened.ledger.renew_contract(system.org, next, now).unwrap();
            model.terms.push((NaiveDate::from_ymd_opt(2029, 1, 1).unwrap(), 2));
        }
        for wallet in [WalletKey::Pool, WalletKey::Lite] {
            model.advance(wallet, now);
            let view = system.opened.ledger.balance(system.wallet_id(wallet), now).unwrap();
            let expected = model.wallet(wallet);
            assert_eq!(
                (view.balance, view.available, view.open_holds),
                (expected.balance(), expected.available(), expected.holds.len()),
                "{wallet:?} at {now}"
            );
        }
    }
    system.holds.clear();
    system.opened.writer.shutdown().unwrap();
    drop(system);
    let report = verify_store(dir.path(), None).unwrap();
    assert!(report.is_clean(), "{:#?}", report.audit.mismatches);
    assert!(purchases > 0 && renewed, "the workload must reach purchases and the renewal");
    assert!(
        seen.refused > 0
            && seen.orphans > 0
            && seen.overruns > 0
            && seen.restarts >= 5
            && seen.taken_back > 0,
        "the workload must exercise refusals, orphaned holds, overruns, restarts and calls paid by credit \
         that expired while they ran: {seen:?}"
    );
}

/// What the workload went through, so a quiet run cannot pass unnoticed.
#[derive(Debug, Default)]
struct Seen {
    refused: u32,
    orphans: u32,
    overruns: u32,
    restarts: u32,
    /// Settles paid (in part) by credit that expired while they were held.
    taken_back: u32,
}

#[test]
fn seeded_workload_matches_the_reference_model() {
    // Proves 10,000 random steps per seed (with restarts through sled, every other one from a
    // checkpoint) never diverge from the model.
    // One seed runs in UTC, the other in New York (odd/even).
    let seeds = match std::env::var("LEDGER_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(seed) => vec![seed],
        None => vec![0x5EED_0001, 0x5EED_0002],
    };
    for seed in seeds {
        run(seed);
    }
}
