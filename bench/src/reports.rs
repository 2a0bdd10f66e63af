//! `creditgate-reports`: reports on a store of a million ledger entries
//! (issue 14, item 7). Builds a real sled data directory straight through
//! the ledger and its store writer (no HTTP: a million requests would take
//! many minutes), starts the real gateway on it, times the first and the
//! steady-state `/usage` and `/ledger` calls, and measures proxy p99 at a
//! fixed request rate with and without a concurrent report load, in the same
//! run and interleaved by round. The run fails (non-zero exit) when a bound
//! is broken.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Days, TimeDelta, Utc};
use chrono_tz::Tz;
use clap::Parser;
use creditgate::ledger::contract::ContractTerm;
use creditgate::ledger::entity::{KeyHash, Plan};
use creditgate::ledger::entry::{SettleDetails, Usage};
use creditgate::ledger::ids::{KeyId, OrgId, Owner, RequestId, WalletId};
use creditgate::ledger::journal::Journal;
use creditgate::ledger::limit::Limits;
use creditgate::ledger::{Ledger, LedgerConfig, NewApp, NewKey, NewOrg, NewUser, SpendContext};
use creditgate::mock::{MockOptions, MockUpstream};
use creditgate::store::{open_ledger, StoreConfig};
use http::Request;
use http_body_util::Full;
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::client::{self, Http};
use crate::cpu::CpuSource;
use crate::drive::{self, Phase, Sequencer, Target};
use crate::gateway::{Gateway, Launch, ADMIN_TOKEN};
use crate::mix::{KeyCounts, Mix, MixConfig};
use crate::settings::LoadShape;
use crate::stats::percentile;

#[derive(Parser, Debug)]
#[command(name = "creditgate-reports", about = "Reports on a store of 1M entries against proxy p99")]
pub struct ReportArgs {
    /// Debit entries written to the store before the gateway starts.
    #[arg(long, default_value_t = 1_000_000)]
    pub entries: u64,
    /// Distinct end users of the application the debits are spread over.
    #[arg(long, default_value_t = 2_000)]
    pub end_users: u64,
    /// Proxy requests per second (open loop).
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Seconds per phase (quiet and with reports) per round.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// The gateway binary (default: `creditgate` next to this one).
    #[arg(long)]
    pub gateway_bin: Option<std::path::PathBuf>,
    #[arg(long)]
    pub prices: Option<std::path::PathBuf>,
    /// Pause after each report call of the concurrent load (a dashboard
    /// polling; 0 sends them back to back).
    #[arg(long, default_value_t = 250)]
    pub report_pause_ms: u64,
    /// Leave usage-by-end-user reports out of the concurrent load. With
    /// more end users than the rollup cap holds they scan the whole store
    /// (about a second of CPU per call at 1M entries).
    #[arg(long)]
    pub no_end_user_reports: bool,
    /// Bound: median over rounds of p99(with reports) / p99(quiet).
    #[arg(long, default_value_t = 1.5)]
    pub max_p99_ratio: f64,
    /// Bound: p99 of steady-state report calls answered from the rollups or
    /// one ledger page, in ms.
    #[arg(long, default_value_t = 100.0)]
    pub max_report_p99_ms: f64,
    /// Bound: p99 of usage reports by end user, which scan the store once
    /// the end-user rollup is over its cap, in ms.
    #[arg(long, default_value_t = 5_000.0)]
    pub max_scan_p99_ms: f64,
    /// Bound: the first `/usage` call after start-up, in ms.
    #[arg(long, default_value_t = 5_000.0)]
    pub max_first_usage_ms: f64,
}

/// The org the bench fills and the key secrets the proxy load uses.
struct Seeded {
    org: OrgId,
    secrets: Vec<String>,
}

const MODELS: [&str; 4] = ["gpt-4o-mini", "mock-gpt", "mock-claude", "gpt-4.1-mini"];

/// Writes `entries` debits of one org through the ledger and its store
/// writer into `dir`, spread over the last 30 days and `end_users` end users.
fn build_store(dir: &std::path::Path, entries: u64, end_users: u64) -> anyhow::Result<Seeded> {
    let open = open_ledger(dir, LedgerConfig::default(), StoreConfig::default())?;
    let ledger = &open.ledger;
    let span = TimeDelta::days(30);
    // The ledger's clock only moves forward: everything starts at the first
    // debit's time, 30 days ago, and the debits walk up to now.
    let now = Utc::now() - span;
    let start = now.date_naive().checked_sub_days(Days::new(30)).context("a start date")?;
    let contract = ContractTerm {
        start,
        years: 2,
        platform_allocation_per_year: Decimal::new(1_000_000_000, 0),
        pro_seats: 0,
        seat_allocation_per_year: Decimal::ZERO,
    };
    let org = ledger
        .create_org(NewOrg { name: "reports".into(), time_zone: Tz::UTC, contract: Some(contract) }, now)?
        .id;
    let user = NewUser {
        name: "pro".into(),
        plan: Plan::Pro,
        lite_monthly_allowance: Decimal::ZERO,
        prorate_on_downgrade: false,
        limits: Limits::NONE,
    };
    let pro = ledger.create_user(org, user, now)?.id;
    let app = NewApp { name: "app".into(), limits: Limits::NONE, end_user_limits: Limits::NONE };
    let app = ledger.create_app(org, app, now)?.id;
    let secrets = vec!["reports-bench-pro".to_owned(), "reports-bench-app".to_owned()];
    let key = |owner: Owner, secret: &str| -> anyhow::Result<KeyId> {
        let new =
            NewKey { owner, hash: KeyHash::of_secret(secret), label: "bench".into(), limits: Limits::NONE };
        Ok(ledger.create_key(org, new, now)?.id)
    };
    let keys = [key(Owner::User(pro), &secrets[0])?, key(Owner::App(app), &secrets[1])?];
    let first = now;
    let step_ms = span.num_milliseconds() / i64::try_from(entries.max(1))?;
    let started = Instant::now();
    for n in 0..entries {
        let at = first + TimeDelta::milliseconds(step_ms * i64::try_from(n)?);
        debit(ledger, org, keys, n, end_users, at)?;
    }
    open.writer.sync()?;
    open.writer.shutdown()?;
    eprintln!("wrote {entries} debits in {:.1?}", started.elapsed());
    Ok(Seeded { org, secrets })
}

/// One hold and settle: nine in ten on the app key with an end user.
fn debit(
    ledger: &Ledger,
    org: OrgId,
    keys: [KeyId; 2],
    n: u64,
    end_users: u64,
    at: DateTime<Utc>,
) -> anyhow::Result<()> {
    let end_user = format!("end-user-{}", n % end_users.max(1));
    let context = if n % 10 == 0 {
        SpendContext { key: keys[0], end_user: None }
    } else {
        SpendContext { key: keys[1], end_user: Some(&end_user) }
    };
    let request = RequestId(Uuid::from_u128(u128::from(n) + 1));
    let hold = ledger
        .hold(WalletId::Pool(org), request, Decimal::new(2, 2), context, at)
        .map_err(|refusal| anyhow::anyhow!("hold refused: {refusal:?}"))?;
    let details = SettleDetails {
        route: Arc::from("/v1/chat/completions"),
        model: Arc::from(MODELS[usize::try_from(n % 4)?]),
        usage: Usage {
            input_tokens: 100 + n % 900,
            output_tokens: 50,
            cached_input_tokens: 0,
            tool_units: 0,
        },
        price_version: Arc::from("bench"),
        operator_cost: None,
    };
    hold.settle(Decimal::new(1, 2) + Decimal::new(i64::try_from(n % 7)?, 4), details, at)
        .map_err(|error| anyhow::anyhow!("settle failed: {error:?}"))?;
    Ok(())
}

/// The report calls of the concurrent load, by name.
fn report_paths(org: OrgId) -> [(&'static str, String); 3] {
    let org = org.0;
    [
        ("usage model,day", format!("/admin/v1/orgs/{org}/usage?group_by=model,day")),
        ("usage end_user", format!("/admin/v1/orgs/{org}/usage?group_by=end_user")),
        ("ledger page", format!("/admin/v1/orgs/{org}/ledger?limit=1000")),
    ]
}

/// One admin GET, timed, with its body; a non-200 answer is an error.
async fn timed_get(http: &Http, admin: &str, path: &str) -> anyhow::Result<(Duration, bytes::Bytes)> {
    let request = Request::get(format!("http://{admin}{path}"))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::new(bytes::Bytes::new()))?;
    let started = Instant::now();
    let (status, body) = client::call(http, request).await?;
    let took = started.elapsed();
    if status != 200 {
        bail!("GET {path} answered {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok((took, body))
}

/// Report calls one at a time, `pause` apart, until `stop`: latencies (ns) per kind.
async fn report_load(
    http: Http,
    admin: String,
    org: OrgId,
    pause: Duration,
    end_user_reports: bool,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<Vec<u64>>> {
    let paths = report_paths(org);
    let mut latencies = vec![Vec::new(); paths.len()];
    // A sparse filter over the whole store: each page scans up to its bound
    // and the loop follows the cursor, as a client paging for grants would.
    let mut cursor = 0_u64;
    while !stop.load(Ordering::Relaxed) {
        for (i, (_, path)) in paths.iter().enumerate() {
            if i == 1 && !end_user_reports {
                continue;
            }
            let path = if i == 2 { format!("{path}&kind=grant&after={cursor}") } else { path.clone() };
            let (took, body) = timed_get(&http, &admin, &path).await?;
            latencies[i].push(u64::try_from(took.as_nanos())?);
            if i == 2 {
                let page: serde_json::Value = serde_json::from_slice(&body)?;
                cursor = page["next_cursor"].as_u64().unwrap_or(0);
            }
            tokio::time::sleep(pause).await;
        }
    }
    Ok(latencies)
}

fn ms(ns: f64) -> f64 {
    ns / 1e6
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

pub async fn run(args: ReportArgs) -> anyhow::Result<bool> {
    let bin = match &args.gateway_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?.with_file_name("creditgate"),
    };
    let prices = args.prices.clone().unwrap_or_else(|| {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/prices.toml")
    });
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let (entries, end_users) = (args.entries, args.end_users);
    // The gateway keeps its store in `<data-dir>/ledger`.
    let store_dir = data_dir.join("ledger");
    let seeded = tokio::task::spawn_blocking(move || build_store(&store_dir, entries, end_users)).await??;

    let mock = MockUpstream::start("127.0.0.1:0".parse()?, MockOptions::default()).await?;
    let http = client::http(1024);
    let started = Instant::now();
    let gateway = Gateway::start(
        Launch {
            name: "reports",
            bin: &bin,
            mock: mock.addr(),
            prices: &prices,
            server: "",
            extra: "",
            data_dir: Some(data_dir.clone()),
            env: &[],
        },
        &http,
    )
    .await?;
    let start_up = started.elapsed();
    eprintln!("gateway ready on {entries} entries in {start_up:.1?}");

    let paths = report_paths(seeded.org);
    let (first_usage, _) = timed_get(&http, &gateway.admin, &paths[0].1).await?;
    let (first_ledger, _) = timed_get(&http, &gateway.admin, &paths[2].1).await?;
    let scan_path = format!("{}&from=2000-01-01T00:00:00.5Z", paths[0].1);
    let (full_scan, _) = timed_get(&http, &gateway.admin, &scan_path).await?;
    eprintln!(
        "first /usage {first_usage:.1?}, first /ledger {first_ledger:.1?}, /usage over an unaligned range (full scan) {full_scan:.1?}"
    );

    let target = Target {
        addrs: vec![gateway.proxy.clone()].into(),
        host: None,
        keys: vec![seeded.secrets.clone()].into(),
        cpu: CpuSource::Process(gateway.pid()),
    };
    let mix = Mix::new(MixConfig::latency_probe(), KeyCounts { funded: seeded.secrets.len(), dry: 0 });
    let sequencer = Arc::new(Sequencer::new());
    let shape = LoadShape::Open { rate: args.rate, max_in_flight: 4096, late_ms: 2 };
    let mut ratios = Vec::new();
    let mut report_ns: Vec<Vec<u64>> = vec![Vec::new(); paths.len()];
    let mut errors = 0;
    println!("proxy at {} req/s, {} s per phase; p99 in µs", args.rate, args.seconds);
    println!("round  quiet p99  with-reports p99  ratio  report calls");
    for round in 0..args.rounds {
        let mut p99 = [0.0; 2];
        // Alternate which phase runs first so drift over the run cancels.
        let order = if round % 2 == 0 { [false, true] } else { [true, false] };
        let mut calls = 0;
        for loaded in order {
            let stop = Arc::new(AtomicBool::new(false));
            let load = loaded.then(|| {
                let pause = Duration::from_millis(args.report_pause_ms);
                tokio::spawn(report_load(
                    http.clone(),
                    gateway.admin.clone(),
                    seeded.org,
                    pause,
                    !args.no_end_user_reports,
                    stop.clone(),
                ))
            });
            let phase = Phase {
                http: &http,
                target: &target,
                mix: &mix,
                shape,
                duration: Duration::from_secs(args.seconds),
                sequencer: &sequencer,
                progress: None,
            };
            let mut sample = drive::run(phase).await?;
            stop.store(true, Ordering::Relaxed);
            if let Some(load) = load {
                for (all, more) in report_ns.iter_mut().zip(load.await??) {
                    calls += more.len();
                    all.extend(more);
                }
            }
            sample.latencies_ns.sort_unstable();
            errors += sample.error_count() + sample.unsent;
            p99[usize::from(loaded)] = sample.percentile_us(0.99);
        }
        let ratio = p99[1] / p99[0].max(1.0);
        ratios.push(ratio);
        println!("{round:>5}  {:>9.0}  {:>16.0}  {ratio:>5.2}  {calls}", p99[0], p99[1]);
    }
    let ratio = median(ratios.clone());
    println!("report calls under load (ms):  p50     p99     max   calls");
    let mut report_p99 = Vec::new();
    for ((name, _), latencies) in paths.iter().zip(report_ns.iter_mut()) {
        latencies.sort_unstable();
        let p = |q| ms(percentile(latencies, q));
        report_p99.push(p(0.99));
        println!("  {name:<16} {:>7.1} {:>7.1} {:>7.1}  {}", p(0.5), p(0.99), p(1.0), latencies.len());
    }
    println!(
        "store: {entries} entries; gateway start-up {:.1} s; first /usage {:.1} ms, first /ledger {:.1} ms, full scan {:.1} ms",
        start_up.as_secs_f64(),
        ms(first_usage.as_nanos() as f64),
        ms(first_ledger.as_nanos() as f64),
        ms(full_scan.as_nanos() as f64)
    );
    let checks = [
        (
            format!("p99(with reports)/p99(quiet), median of rounds {ratio:.2}"),
            ratio <= args.max_p99_ratio,
            format!("≤ {}", args.max_p99_ratio),
        ),
        (
            format!("usage model,day p99 {:.1} ms", report_p99[0]),
            report_p99[0] <= args.max_report_p99_ms,
            format!("≤ {} ms", args.max_report_p99_ms),
        ),
        (
            format!("ledger page p99 {:.1} ms", report_p99[2]),
            report_p99[2] <= args.max_report_p99_ms,
            format!("≤ {} ms", args.max_report_p99_ms),
        ),
        (
            format!("usage end_user p99 {:.1} ms", report_p99[1]),
            report_p99[1] <= args.max_scan_p99_ms,
            format!("≤ {} ms", args.max_scan_p99_ms),
        ),
        (
            format!("first /usage {:.1} ms", ms(first_usage.as_nanos() as f64)),
            ms(first_usage.as_nanos() as f64) <= args.max_first_usage_ms,
            format!("≤ {} ms", args.max_first_usage_ms),
        ),
        (format!("proxy errors and unsent requests {errors}"), errors == 0, "= 0".to_owned()),
    ];
    let mut passed = true;
    for (what, ok, bound) in &checks {
        println!("{}: {what} (bound {bound})", if *ok { "ok" } else { "FAILED" });
        passed &= ok;
    }
    gateway.stop_and_verify().context("after the run")?;
    Ok(passed)
}
