//! `creditgate-growth`: restart time, peak memory and disk against the size
//! of the ledger's history (issue 19). Not a timed test: a measurement.
//!
//! `creditgate-growth run --records N` writes N debit records through the
//! ledger and the sled store (hold + settle on 1,000 keys, time spread over
//! `--days` days, the background historian checkpointing as in production),
//! stops, then restarts in a fresh process and reports the time until the
//! ledger is ready and the peak RSS of that process; then it applies
//! retention (`--retain-days`) and `ledger compact`, reports the disk before
//! and after, and restarts once more. Each phase runs as its own process (`write`,
//! `restart`, `retain`), so peak RSS is that of the phase alone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use clap::{Parser, Subcommand};
use creditgate::clock::ManualClock;
use creditgate::ledger::contract::ContractTerm;
use creditgate::ledger::entity::{KeyHash, Plan};
use creditgate::ledger::entry::{SettleDetails, Usage};
use creditgate::ledger::ids::{KeyId, Owner, RequestId};
use creditgate::ledger::limit::Limits;
use creditgate::ledger::{LedgerConfig, NewKey, NewOrg, NewUser, PurchaseRequest, SpendContext};
use creditgate::store::export::ExportPlan;
use creditgate::store::history::{checkpoint_offline, retain_through, Historian, HistoryConfig};
use creditgate::store::{checkpoint, open_ledger, SledStore, Store, StoreConfig};
use rust_decimal::Decimal;

#[derive(Parser)]
#[command(about = "Restart time, peak RSS and disk against ledger history size")]
struct Cli {
    #[command(subcommand)]
    command: Phase,
}

#[derive(Subcommand)]
enum Phase {
    /// All phases, each in its own process.
    Run {
        /// Debit records to write (e.g. 1000000, 10000000, 50000000).
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        /// Days the records are spread over.
        #[arg(long, default_value_t = 10)]
        days: i64,
        /// Whole days kept by retention.
        #[arg(long, default_value_t = 2)]
        retain_days: u32,
        /// Records written after the last checkpoint, which a restart must
        /// replay (the checkpoint period is 1M records or 5 minutes: the
        /// worst case is 1M).
        #[arg(long, default_value_t = 500_000)]
        tail: u64,
        /// Data directory (default: a temporary one, removed after).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Writes the records.
    Write {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        records: u64,
        #[arg(long)]
        days: i64,
        #[arg(long)]
        tail: u64,
    },
    /// Opens the ledger as start-up does and reports the time and peak RSS.
    Restart {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Checkpoints, exports and prunes what retention allows.
    Retain {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        days: i64,
        #[arg(long)]
        retain_days: u32,
    },
}

const KEYS: u64 = 1_000;

fn start_time() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2027-03-01T00:00:00Z").map(|t| t.with_timezone(&Utc)).unwrap_or_default()
}

fn ledger_dir(dir: &Path) -> PathBuf {
    dir.join("ledger")
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Phase::Run { records, days, retain_days, tail, dir } => run(records, days, retain_days, tail, dir),
        Phase::Write { dir, records, days, tail } => write(&dir, records, days, tail),
        Phase::Restart { dir } => restart(&dir),
        Phase::Retain { dir, days, retain_days } => retain(&dir, days, retain_days),
    }
}

fn run(records: u64, days: i64, retain_days: u32, tail: u64, dir: Option<PathBuf>) -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let dir = dir.unwrap_or_else(|| temp.path().to_owned());
    let me = std::env::current_exe()?;
    let phase = |args: &[String]| -> anyhow::Result<()> {
        let status = std::process::Command::new(&me).args(args).status()?;
        anyhow::ensure!(status.success(), "phase {args:?} failed");
        Ok(())
    };
    let dir_arg = dir.display().to_string();
    phase(&[
        "write".into(),
        "--dir".into(),
        dir_arg.clone(),
        "--records".into(),
        records.to_string(),
        "--days".into(),
        days.to_string(),
        "--tail".into(),
        tail.to_string(),
    ])?;
    phase(&["restart".into(), "--dir".into(), dir_arg.clone()])?;
    phase(&[
        "retain".into(),
        "--dir".into(),
        dir_arg.clone(),
        "--days".into(),
        days.to_string(),
        "--retain-days".into(),
        retain_days.to_string(),
    ])?;
    phase(&["restart".into(), "--dir".into(), dir_arg])?;
    Ok(())
}

/// Checkpoints are waited for this many times over the run: the write is
/// far faster than the days of traffic it stands for, and in production
/// the 5-minute timer checkpoints many times a day.
const CHECKPOINT_STOPS: u64 = 20;

fn write(dir: &Path, records: u64, days: i64, tail: u64) -> anyhow::Result<()> {
    let ledger_dir = ledger_dir(dir);
    let opened = open_ledger(&ledger_dir, LedgerConfig::default(), StoreConfig::default())?;
    let start = start_time();
    let clock = ManualClock::new(start);
    let historian = Historian::start(
        opened.writer.clone(),
        &ledger_dir,
        dir.join("exports"),
        HistoryConfig::default(),
        LedgerConfig::default(),
        opened.checkpoint,
        clock.clone(),
    )?;
    let ledger = opened.ledger;
    let term = ContractTerm {
        start: start.date_naive(),
        years: 1,
        platform_allocation_per_year: Decimal::from(1_000_000_000),
        pro_seats: 0,
        seat_allocation_per_year: Decimal::ZERO,
    };
    let org = ledger
        .create_org(NewOrg { name: "growth".into(), time_zone: Tz::UTC, contract: Some(term) }, start)?
        .id;
    let mut keys: Vec<KeyId> = Vec::new();
    for index in 0..KEYS {
        let new = NewUser {
            name: format!("u{index}"),
            plan: Plan::Pro,
            lite_monthly_allowance: Decimal::ZERO,
            prorate_on_downgrade: false,
            limits: Limits::NONE,
        };
        let user = ledger.create_user(org, new, start)?.id;
        let key = NewKey {
            owner: Owner::User(user),
            hash: KeyHash::of_secret(&format!("growth-{}-{index}", org.0)),
            label: String::new(),
            limits: Limits::NONE,
        };
        keys.push(ledger.create_key(org, key, start)?.id);
    }
    let buy = PurchaseRequest {
        org,
        amount: Decimal::from(1_000),
        expires_at: None,
        reference: None,
        idempotency_key: "growth".into(),
    };
    ledger.purchase(buy, start)?;
    let wallet = creditgate::ledger::ids::WalletId::Pool(org);
    let details = SettleDetails {
        route: Arc::from("/v1/chat/completions"),
        model: Arc::from("gpt-growth"),
        price_version: Arc::from("v1"),
        usage: Usage { input_tokens: 120, output_tokens: 80, cached_input_tokens: 0, tool_units: 0 },
        operator_cost: None,
    };
    let span_ms = days * 86_400_000;
    let began = Instant::now();
    let checkpointed = records.saturating_sub(tail);
    let stop_every = (checkpointed / CHECKPOINT_STOPS).max(1);
    for n in 0..records {
        if n > 0 && n <= checkpointed && (n % stop_every == 0 || n == checkpointed) {
            let written = opened.writer.durable_through();
            while historian.status().checkpoint_seq < written && opened.writer.durable_through() >= written {
                std::thread::sleep(std::time::Duration::from_millis(20));
                clock.advance(TimeDelta::minutes(5));
            }
            if n == checkpointed {
                // The tail is written with the historian stopped: a restart
                // replays it.
                historian.stop();
            }
        }
        let offset = i64::try_from(u128::from(n) * u128::try_from(span_ms)? / u128::from(records.max(1)))?;
        let now = start + TimeDelta::milliseconds(offset);
        if n % 10_000 == 0 {
            clock.set(now);
        }
        let key = keys[usize::try_from(n % KEYS)?];
        let context = SpendContext { key, end_user: None };
        let id = RequestId(uuid::Uuid::from_u128(u128::from(n) + 1));
        let hold = ledger.hold(wallet, id, Decimal::new(2, 3), context, now)?;
        hold.settle(Decimal::new(1, 3), details.clone(), now)?;
    }
    let elapsed = began.elapsed();
    historian.stop();
    opened.writer.shutdown()?;
    let status = historian.status();
    println!(
        "write: {records} records in {:.1} s ({:.0}/s); checkpoints written {}, newest covers {}; store {} MB",
        elapsed.as_secs_f64(),
        records as f64 / elapsed.as_secs_f64().max(1e-9),
        status.checkpoints_written,
        status.checkpoint_seq,
        megabytes(&ledger_dir)
    );
    Ok(())
}

fn restart(dir: &Path) -> anyhow::Result<()> {
    let ledger_dir = ledger_dir(dir);
    // The part of a start sled's own recovery takes, measured alone first.
    let store_open = {
        let began = Instant::now();
        let store = SledStore::open(&ledger_dir)?;
        let took = began.elapsed();
        drop(store);
        took
    };
    let began = Instant::now();
    let opened = open_ledger(&ledger_dir, LedgerConfig::default(), StoreConfig::default())?;
    let ready = began.elapsed();
    let from = opened.checkpoint.as_ref().map_or(0, |c| c.seq);
    let replayed = opened.writer.store().records_after(from).count();
    opened.writer.shutdown()?;
    println!(
        "restart: ready in {} ms (checkpoint {from}, {replayed} records replayed after it; sled's own open {} ms); peak RSS {} MB",
        ready.as_millis(),
        store_open.as_millis(),
        peak_rss_kb() / 1024
    );
    Ok(())
}

fn retain(dir: &Path, days: i64, retain_days: u32) -> anyhow::Result<()> {
    let ledger_dir = ledger_dir(dir);
    let before = megabytes(&ledger_dir);
    // Retention needs two checkpoints (it prunes below the older one).
    checkpoint_offline(&ledger_dir, LedgerConfig::default())?;
    let kept = checkpoint::list(&checkpoint::dir_of(&ledger_dir))?;
    let through = kept.last().map_or(0, |(seq, _)| *seq);
    let now = start_time() + TimeDelta::days(days);
    let cut = (now - TimeDelta::days(i64::from(retain_days))).date_naive();
    let began = Instant::now();
    let exports = dir.join("exports");
    {
        let store = SledStore::open(&ledger_dir)?;
        let plan = ExportPlan { after: 0, through, before: cut, from: None };
        retain_through(&store, &exports, true, plan, &ledger_dir).map_err(anyhow::Error::msg)?;
        println!(
            "retain: pruned through record {} in {:.1} s",
            store.pruned_through(),
            began.elapsed().as_secs_f64()
        );
    }
    let pruned = megabytes(&ledger_dir);
    let began = Instant::now();
    creditgate::store::compact::compact(&ledger_dir)?;
    println!(
        "retain: store {before} MB before, {pruned} MB after pruning, {} MB after `ledger compact` ({:.1} s); \
         exports {} MB (keeping {retain_days} of {days} days)",
        megabytes(&ledger_dir),
        began.elapsed().as_secs_f64(),
        megabytes(&exports)
    );
    Ok(())
}

/// Size of the files under `dir`, in MB.
fn megabytes(dir: &Path) -> u64 {
    creditgate::store::compact::size(dir) / 1_000_000
}

/// The process's peak resident set (VmHWM), in KiB.
fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|value| value.split_whitespace().next().and_then(|kb| kb.parse().ok()))
        })
        .unwrap_or(0)
}
