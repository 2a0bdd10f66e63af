//! Hold + settle pairs through the ledger's public API, in memory and with
//! sled write-through (group commit), on one hot wallet and spread over
//! 100k wallets, so "write-through on / off" is a ratio from one run.
//!
//! `cargo bench -p creditgate-bench --bench ledger`
//!
//! Targets (per core, in memory): >= 1M pairs/s on one hot wallet, >= 5M
//! pairs/s spread; write-through on >= 0.9x of off.
//!
//! A baseline runs first in the same process: one dependent load at a
//! random place in 128 MiB (the wallets' footprint is of that order), the
//! latency every pair on a cold wallet pays a few times over. After the
//! runs, the store writer's and sled's I/O threads' CPU time is divided by
//! the records they took, so the cost of write-through per record is a
//! figure from the same run as the ratio.
//!
//! Request ids are counter-based (`Uuid::from_u128`), not minted v7 UUIDs:
//! minting costs the proxy a few hundred ns per request and is not ledger
//! work. Both ledgers are rebuilt from the same records (`Ledger::restore`
//! for memory, `open_ledger` on a sled directory for write-through), so
//! their wallets are laid out the same way.

use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use creditgate::ledger::contract::ContractTerm;
use creditgate::ledger::entity::{KeyHash, Plan};
use creditgate::ledger::entry::{SettleDetails, Usage};
use creditgate::ledger::ids::{KeyId, OrgId, Owner, RequestId, UserId, WalletId};
use creditgate::ledger::journal::{Journal, MemoryJournal, NullJournal, Record};
use creditgate::ledger::limit::Limits;
use creditgate::ledger::{Ledger, LedgerConfig, NewKey, NewOrg, NewUser, SpendContext};
use creditgate::store::{open_ledger, GroupCommit, SledStore, Store, StoreConfig};
use creditgate_bench::cpu::own_threads_cpu;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rust_decimal::Decimal;
use uuid::Uuid;

/// Wallets in the spread case.
const SPREAD_WALLETS: usize = 100_000;

/// A (wallet, key) pair a request can spend from.
type Target = (WalletId, KeyId);

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2027-03-10T12:00:00Z")
        .expect("a valid RFC 3339 instant")
        .with_timezone(&Utc)
}

/// The records of a ledger with one funded org: a Pro user (the hot pool
/// wallet) and `SPREAD_WALLETS` Lite users with their own wallets, each
/// with a key.
struct Setup {
    records: Vec<Record>,
    hot: Target,
    spread: Vec<Target>,
}

fn setup() -> Setup {
    let journal = Arc::new(MemoryJournal::default());
    let ledger = Ledger::new(LedgerConfig::default(), journal.clone());
    let org = ledger
        .create_org(
            NewOrg {
                name: "bench".into(),
                time_zone: Tz::UTC,
                contract: Some(ContractTerm {
                    start: NaiveDate::from_ymd_opt(2027, 1, 1).expect("a valid date"),
                    years: 1,
                    platform_allocation_per_year: Decimal::new(100_000_000_000, 0),
                    pro_seats: 0,
                    seat_allocation_per_year: Decimal::ZERO,
                }),
            },
            now(),
        )
        .expect("the org is valid")
        .id;
    let pro = user(&ledger, org, Plan::Pro, 0);
    let hot = (WalletId::Pool(org), key(&ledger, org, pro, 0));
    let spread = (1..=SPREAD_WALLETS)
        .map(|n| {
            let lite = user(&ledger, org, Plan::Lite, n);
            (WalletId::Lite(lite), key(&ledger, org, lite, n))
        })
        .collect();
    Setup { records: journal.records(), hot, spread }
}

fn user(ledger: &Ledger, org: OrgId, plan: Plan, n: usize) -> UserId {
    let new = NewUser {
        name: format!("user-{n}"),
        plan,
        lite_monthly_allowance: Decimal::new(1_000_000, 0),
        prorate_on_downgrade: false,
        limits: Limits::NONE,
    };
    ledger.create_user(org, new, now()).expect("the user is valid").id
}

fn key(ledger: &Ledger, org: OrgId, user: UserId, n: usize) -> KeyId {
    let new = NewKey {
        owner: Owner::User(user),
        hash: KeyHash::of_secret(&format!("bench-secret-{n}")),
        label: "bench".into(),
        limits: Limits::NONE,
    };
    ledger.create_key(org, new, now()).expect("the key is valid").id
}

/// Fresh request ids: each caller takes a block no other caller shares.
#[derive(Default)]
struct Ids(Cell<u128>);

impl Ids {
    fn block(&self, len: u64) -> u128 {
        let start = self.0.get();
        self.0.set(start + u128::from(len));
        start
    }
}

fn details() -> SettleDetails {
    SettleDetails {
        route: Arc::from("/v1/chat/completions"),
        model: Arc::from("gpt-4o-mini"),
        usage: Usage { input_tokens: 1_000, output_tokens: 300, cached_input_tokens: 200, tool_units: 0 },
        price_version: Arc::from("2025-11@0123456789ab"),
        operator_cost: None,
    }
}

/// splitmix64: picks the wallet of each pair (a few ns).
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Runs `count` hold+settle pairs on wallets drawn from `targets`.
fn pairs(
    ledger: &Ledger,
    targets: &[Target],
    first_id: u128,
    count: u64,
    seed: u64,
    details: &SettleDetails,
) {
    let now = now();
    let (held, cost) = (Decimal::new(2, 2), Decimal::new(1, 2));
    let mut random = seed;
    let len = targets.len() as u64;
    for pair in 0..count {
        let request = RequestId(Uuid::from_u128(first_id + u128::from(pair)));
        let pick = usize::try_from(next_random(&mut random) % len).unwrap_or(0);
        let (wallet, key) = targets[pick];
        let context = SpendContext { key, end_user: None };
        let hold = ledger.hold(wallet, request, held, context, now).expect("the wallet is funded");
        black_box(hold.settle(cost, details.clone(), now).expect("settles"));
    }
}

/// Measures `iters` pairs split over `threads` threads.
fn timed(ledger: &Ledger, targets: &[Target], ids: &Ids, threads: u64, iters: u64) -> Duration {
    let per_thread = iters.div_ceil(threads);
    let first = ids.block(per_thread * threads);
    if threads == 1 {
        let details = details();
        let started = Instant::now();
        pairs(ledger, targets, first, iters, 1, &details);
        return started.elapsed();
    }
    let started = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let details = details();
            scope.spawn(move || {
                let first_id = first + u128::from(thread * per_thread);
                pairs(ledger, targets, first_id, per_thread, thread + 1, &details);
            });
        }
    });
    started.elapsed()
}

struct Variant {
    name: &'static str,
    ledger: Arc<Ledger>,
    /// The write-through writer, drained between benchmarks.
    writer: Option<Arc<GroupCommit<SledStore>>>,
}

impl Variant {
    fn drain(&self) {
        if let Some(writer) = &self.writer {
            writer.sync().expect("the store flushes");
        }
    }
}

fn memory(setup: &Setup) -> Variant {
    let ledger =
        Ledger::restore(LedgerConfig::default(), Arc::new(NullJournal), setup.records.iter().cloned())
            .expect("the records replay");
    ledger.tick(now());
    Variant { name: "memory", ledger: Arc::new(ledger), writer: None }
}

fn sled(setup: &Setup, dir: &std::path::Path) -> Variant {
    {
        // Writing the setup records straight to the store skips 200k admin
        // operations that would each wait for a group flush.
        let store = SledStore::open(dir).expect("sled opens");
        for chunk in setup.records.chunks(8_192) {
            store.append(chunk).expect("sled takes the records");
        }
        store.flush().expect("sled flushes");
    }
    let open = open_ledger(dir, LedgerConfig::default(), StoreConfig::default()).expect("the store replays");
    open.ledger.tick(now());
    let variant = Variant { name: "sled_write_through", ledger: open.ledger, writer: Some(open.writer) };
    variant.drain();
    variant
}

/// A random cyclic walk over `bytes` of memory, one step per cache line:
/// each step's address depends on the previous load (Sattolo's shuffle).
fn pointer_chase(bytes: usize) -> Vec<usize> {
    const STRIDE: usize = 64 / std::mem::size_of::<usize>();
    let lines = bytes / 64;
    let mut order: Vec<usize> = (0..lines).collect();
    let mut random = 7_u64;
    for i in (1..lines).rev() {
        let j = usize::try_from(next_random(&mut random) % (i as u64)).unwrap_or(0);
        order.swap(i, j);
    }
    let mut next = vec![0_usize; lines * STRIDE];
    for (i, line) in order.iter().enumerate() {
        next[line * STRIDE] = order[(i + 1) % lines] * STRIDE;
    }
    next
}

fn baseline(c: &mut Criterion) {
    let chase = pointer_chase(128 << 20);
    let mut at = 0;
    let mut group = c.benchmark_group("baseline");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
    group.bench_function("dependent_load_random_128MiB", |b| {
        b.iter(|| {
            at = chase[at];
            black_box(at)
        })
    });
    group.finish();
}

fn ledger(c: &mut Criterion) {
    baseline(c);
    let setup = setup();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let variants = [memory(&setup), sled(&setup, dir.path())];
    // From here on the writer and sled's I/O threads only serve the runs.
    let durable_cpu = || own_threads_cpu("ledger-writer") + own_threads_cpu("sled-io");
    let durable_before = durable_cpu();
    let ids = Ids::default();
    let hot = [setup.hot];
    let cases: [(&str, &[Target], u64); 4] = [
        ("hot_wallet", &hot, 1),
        ("spread_100k", &setup.spread, 1),
        ("hot_wallet_2_threads", &hot, 2),
        ("spread_100k_2_threads", &setup.spread, 2),
    ];

    let mut group = c.benchmark_group("ledger_hold_settle");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    for (case, targets, threads) in cases {
        for variant in &variants {
            variant.drain();
            let ledger = &*variant.ledger;
            group.bench_function(BenchmarkId::new(variant.name, case), |b| {
                b.iter_custom(|iters| timed(ledger, targets, &ids, threads, iters))
            });
        }
    }
    group.finish();

    for variant in &variants {
        if let Some(writer) = &variant.writer {
            writer.sync().expect("the store flushes");
            let durable = durable_cpu().saturating_sub(durable_before);
            let stats = writer.stats();
            writer.shutdown().expect("the writer stops cleanly");
            println!(
                "write-through: {} records appended, {} flushes, {} appends waited for room",
                stats.appended, stats.flushes, stats.waited_for_room
            );
            let per_record = durable.as_nanos() / u128::from(stats.appended.max(1));
            println!(
                "write-through CPU: {durable:.2?} in the writer and sled's I/O threads, {per_record} ns per record"
            );
        }
    }
}

criterion_group!(benches, ledger);
criterion_main!(benches);
