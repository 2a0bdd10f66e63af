//! The `creditgate` command: parse the CLI, load config, hand over to the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use creditgate::app::{self, Gateway};
use creditgate::config::{GatewayConfig, LogConfig, LogFormat};
use creditgate::demo::{self, DemoOptions};
use creditgate::mock::{MockOptions, MockUpstream};
use creditgate::pricing::LivePrices;
use creditgate::server::Drained;
use creditgate::telemetry;
use creditgate::telemetry::metrics::Metrics;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "creditgate", version, about = "A usage-metering API gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, short, default_value = "config/gateway.toml")]
        config: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Validate a config file and exit (non-zero with the reasons if invalid).
    CheckConfig {
        #[arg(long, short, default_value = "config/gateway.toml")]
        config: PathBuf,
    },
    /// Run the mock upstream on its own.
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
        /// Wait this long before every response head.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Default gap between stream events.
        #[arg(long, default_value_t = 0)]
        pace_ms: u64,
    },
    /// Operator tasks over the admin API (token from CREDITGATE_ADMIN_TOKEN).
    Admin(creditgate::admin::cli::AdminArgs),
    /// Ledger operations on a data directory (the gateway must be stopped).
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Cluster mode's shared books in PostgreSQL.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Price-table tasks: import a public catalog, compare two tables.
    Prices {
        #[command(subcommand)]
        command: PricesCommand,
    },
    /// Run the mock upstream and the gateway together on the example config.
    Demo {
        /// Config file (default: config/gateway.toml if present, else built in).
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
        #[arg(long)]
        mock_listen: Option<SocketAddr>,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Recompute every wallet from its ledger entries; exit non-zero on any mismatch.
    Verify {
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        /// Verify cluster mode's books in PostgreSQL instead: the variable
        /// holding the database URL (it carries the password).
        #[arg(long, value_name = "VAR")]
        database_url_env: Option<String>,
        /// Also verify the whole history from the first record, reading the
        /// exported day files in DIR (their manifests are checked too).
        #[arg(long, value_name = "DIR")]
        exports: Option<PathBuf>,
    },
    /// Copy the store into a fresh directory and swap it in, so the space of
    /// pruned records goes back to the file system (gateway stopped).
    Compact {
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
    },
    /// Write the retained records of whole UTC days FROM..=TO to export day
    /// files (JSON Lines, gzip, with manifests), the format retention uses.
    Export {
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        /// First day (YYYY-MM-DD, UTC).
        #[arg(long)]
        from: chrono::NaiveDate,
        /// Last day (YYYY-MM-DD, UTC); days not yet over are not written.
        #[arg(long)]
        to: chrono::NaiveDate,
        /// Where the files go (default: <data-dir>/exports).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Replicas, their open leases and their outbox lag.
    Status {
        /// The environment variable holding the database URL.
        #[arg(long, value_name = "VAR")]
        database_url_env: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PricesCommand {
    /// Write a price table (to stdout) from a public catalog; models the
    /// table cannot express are listed on stderr with the reason.
    Import {
        /// Catalog format: only `litellm` (model_prices_and_context_window.json).
        #[arg(long = "from", value_parser = ["litellm"])]
        format: String,
        /// The catalog file.
        file: PathBuf,
        /// A price file whose every field wins over the catalog's (negotiated
        /// rates, private models, label, limits, markups, tools).
        #[arg(long)]
        overlay: Option<PathBuf>,
        /// Import only models whose name matches one of these (`*` wildcards).
        #[arg(long, num_args = 1..)]
        only: Vec<String>,
    },
    /// Show every model and tool price that changed, was added or removed;
    /// exit 1 when anything changed, 2 when a file is unreadable or invalid.
    Diff { old: PathBuf, new: PathBuf },
}

#[derive(clap::Args)]
struct Overrides {
    /// Proxy listen address (default from config: 127.0.0.1:8080).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin listen address (default from config: 127.0.0.1:8081).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Data directory (default from config: ./data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = runtime_workers(&cli.command) {
        builder.worker_threads(workers);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("creditgate: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("creditgate: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The shared runtime's workers for the config `serve` is given: `[server]
/// workers` (else one per core), or one under `thread-per-core`.
/// The runtime is built before `serve` reads its config; an unreadable one
/// is reported there.
fn runtime_workers(command: &Command) -> Option<usize> {
    match command {
        Command::Serve { config, .. } => GatewayConfig::load(config).ok()?.server.shared_runtime_workers(),
        _ => None,
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve { config, overrides } => serve(config, overrides).await,
        Command::CheckConfig { config } => Ok(check_config(config)),
        Command::Admin(args) => {
            println!("{}", creditgate::admin::cli::run(args).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Ledger { command: LedgerCommand::Verify { database_url_env: Some(var), .. } } => {
            cluster_verify(&var).await
        }
        Command::Ledger { command: LedgerCommand::Verify { data_dir, database_url_env: None, exports } } => {
            ledger_verify(&data_dir, exports.as_deref())
        }
        Command::Ledger { command: LedgerCommand::Compact { data_dir } } => {
            let dir = data_dir.join("ledger");
            if !dir.exists() {
                anyhow::bail!("no ledger at {}", dir.display());
            }
            let (before, after) = creditgate::store::compact::compact(&dir)?;
            println!("{}: {} MB before, {} MB after", dir.display(), before / 1_000_000, after / 1_000_000);
            Ok(ExitCode::SUCCESS)
        }
        Command::Ledger { command: LedgerCommand::Export { data_dir, from, to, out } } => {
            ledger_export(&data_dir, from, to, out)
        }
        Command::Cluster { command: ClusterCommand::Status { database_url_env, json } } => {
            cluster_status(&database_url_env, json).await
        }
        Command::Prices { command: PricesCommand::Import { format, file, overlay, only } } => {
            prices_import(&format, &file, overlay.as_deref(), &only)
        }
        Command::Prices { command: PricesCommand::Diff { old, new } } => Ok(prices_diff(&old, &new)),
        Command::MockUpstream { listen, latency_ms, pace_ms } => {
            mock_upstream(listen, latency_ms, pace_ms).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { config, overrides, mock_listen } => {
            demo::run(DemoOptions {
                config,
                listen: overrides.listen,
                admin_listen: overrides.admin_listen,
                data_dir: overrides.data_dir,
                mock_listen,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Exit status of a gateway that stopped so its supervisor starts it
/// again (EX_TEMPFAIL): a background task it needs failed, or a replica's
/// ledger must be rebuilt from the shared log.
const EXIT_RESTART: u8 = 75;

async fn serve(path: PathBuf, overrides: Overrides) -> anyhow::Result<ExitCode> {
    let mut config = GatewayConfig::load(&path)?;
    telemetry::init(&config.log);
    telemetry::log_panics();
    if let Some(listen) = overrides.listen {
        config.server.listen = listen;
    }
    if let Some(admin_listen) = overrides.admin_listen {
        config.server.admin_listen = admin_listen;
    }
    if let Some(data_dir) = overrides.data_dir {
        config.server.data_dir = data_dir;
    }
    let shutdown = CancellationToken::new();
    app::cancel_on_signal(shutdown.clone());
    // Test-only: run on a clock moved by whole days (see `ShiftedClock`).
    // A release build ignores it: a variable left set would move the books.
    let shift_days =
        test_switch("CREDITGATE_TEST_CLOCK_SHIFT_DAYS").and_then(|days| days.parse::<i64>().ok());
    let gateway = match shift_days.and_then(chrono::TimeDelta::try_days) {
        Some(shift) => {
            tracing::warn!(
                ?shift,
                "CREDITGATE_TEST_CLOCK_SHIFT_DAYS is set: the clock is shifted (tests only)"
            );
            let clock = std::sync::Arc::new(creditgate::clock::ShiftedClock(shift));
            Gateway::start_with_clock(config, clock, shutdown).await?
        }
        None => Gateway::start(config, shutdown).await?,
    };
    let stopped = gateway.wait_stopped().await;
    if let Err(error) = stopped.store {
        eprintln!("creditgate: the ledger's last flush failed; records were left unwritten: {error}");
        return Ok(ExitCode::FAILURE);
    }
    if let Some(reason) = stopped.restart {
        eprintln!("creditgate: stopped to be started again: {reason}");
        return Ok(ExitCode::from(EXIT_RESTART));
    }
    Ok(match stopped.drained {
        Drained::All => ExitCode::SUCCESS,
        // Still a clean exit: the grace period is the operator's choice.
        Drained::TimedOut => ExitCode::SUCCESS,
    })
}

/// A test-only switch's value: read by debug builds (the test suite's)
/// only; a release build warns that it is set and goes on without it.
fn test_switch(name: &str) -> Option<String> {
    let value = std::env::var(name).ok()?;
    if cfg!(debug_assertions) {
        return Some(value);
    }
    tracing::warn!(name, "a test-only switch is set and ignored: this is a release build");
    None
}

fn check_config(path: PathBuf) -> ExitCode {
    let config = match GatewayConfig::load(&path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{}: ok ({} upstream(s), {} route(s))",
        path.display(),
        config.upstreams.len(),
        config.routes.len()
    );
    let Some(pricing) = &config.pricing else {
        return ExitCode::SUCCESS;
    };
    let metrics = Arc::new(Metrics::default());
    match LivePrices::load(&pricing.file, config.required_tools(), chrono::Utc::now(), metrics) {
        Ok(prices) => {
            let status = prices.status(chrono::Utc::now());
            println!("{}: ok (version {})", pricing.file.display(), status.version);
            // Stale prices are a warning, not an error: the table is valid.
            match (status.as_of, status.age_days) {
                (Some(as_of), Some(age)) if age > i64::from(pricing.max_age_days) => println!(
                    "{}: warning: prices as of {as_of} are {age} days old (more than [pricing] max_age_days = {}); \
                     check them, e.g. with `creditgate prices import` and `creditgate prices diff`",
                    pricing.file.display(),
                    pricing.max_age_days
                ),
                (None, _) => println!(
                    "{}: warning: no as_of date, so its age is unknown; add as_of = \"YYYY-MM-DD\" (the day the prices were checked)",
                    pricing.file.display()
                ),
                _ => {}
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

fn ledger_verify(data_dir: &std::path::Path, exports: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    // The gateway keeps its ledger in <data-dir>/ledger.
    let dir = data_dir.join("ledger");
    if !dir.exists() {
        anyhow::bail!("no ledger at {}", dir.display());
    }
    let report = creditgate::store::verify_store(&dir, exports)?;
    println!(
        "{}: {} record(s) after checkpoint {}, {} wallet(s), {} entries checked",
        dir.display(),
        report.records,
        report.checkpoint_seq,
        report.audit.wallets,
        report.audit.entries
    );
    let mut mismatches = report.audit.mismatches.clone();
    if let Some(full) = &report.full_history {
        println!(
            "whole history: {} exported day(s), {} exported record(s), {} entries checked",
            full.days, full.exported_records, full.audit.entries
        );
        mismatches.extend(full.audit.mismatches.iter().cloned());
        for problem in &full.problems {
            eprintln!("export: {problem}");
        }
    }
    if report.is_clean() {
        println!("ok: every wallet's balance equals granted - debited - written_off");
        Ok(ExitCode::SUCCESS)
    } else {
        for mismatch in &mismatches {
            eprintln!("mismatch: {mismatch:?}");
        }
        Ok(ExitCode::FAILURE)
    }
}

fn ledger_export(
    data_dir: &std::path::Path,
    from: chrono::NaiveDate,
    to: chrono::NaiveDate,
    out: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let dir = data_dir.join("ledger");
    if !dir.exists() {
        anyhow::bail!("no ledger at {}", dir.display());
    }
    let out = out.unwrap_or_else(|| data_dir.join("exports"));
    let days = creditgate::store::export::export_range(&dir, &out, from, to, chrono::Utc::now())?;
    for manifest in &days {
        println!(
            "{}: {} record(s), {} entries, records {}..={}",
            out.join(&manifest.file).display(),
            manifest.records,
            manifest.entries,
            manifest.first_seq,
            manifest.last_seq
        );
    }
    println!("{} day file(s) written to {}", days.len(), out.display());
    Ok(ExitCode::SUCCESS)
}

async fn mock_upstream(listen: SocketAddr, latency_ms: u64, pace_ms: u64) -> anyhow::Result<()> {
    telemetry::init(&LogConfig { level: "info".to_owned(), format: LogFormat::Text });
    let options = MockOptions {
        latency: Duration::from_millis(latency_ms),
        pace: Duration::from_millis(pace_ms),
        journal_capacity: None,
    };
    let mock = MockUpstream::start(listen, options).await?;
    println!("mock upstream listening on http://{}", mock.addr());
    app::cancel_on_signal(mock.shutdown_token());
    mock.shutdown_token().cancelled().await;
    mock.stop().await;
    Ok(())
}

fn prices_import(
    format: &str,
    file: &Path,
    overlay: Option<&Path>,
    only: &[String],
) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    let catalog = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let overlay = overlay
        .map(|path| std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display())))
        .transpose()?;
    let import = creditgate::catalog::import_litellm(&catalog, only).map_err(anyhow::Error::msg)?;
    for note in &import.notes {
        eprintln!("note {}: {}", note.model, note.reason);
    }
    let source = format!("the {format} catalog {}", file.display());
    let (text, skipped, imported) =
        creditgate::catalog::price_file(import, overlay.as_deref(), format, &source)
            .map_err(anyhow::Error::msg)?;
    write_out(text.as_bytes())?;
    for skip in &skipped {
        eprintln!("skipped {}: {}", skip.model, skip.reason);
    }
    eprintln!("imported {imported} models, skipped {}", skipped.len());
    Ok(ExitCode::SUCCESS)
}

/// Exit 0: no change; 1: changes (printed); 2: a file is unreadable or invalid.
fn prices_diff(old: &Path, new: &Path) -> ExitCode {
    let read = |path: &Path| -> Result<String, String> {
        let text = std::fs::read_to_string(path).map_err(|err| format!("{}: {err}", path.display()))?;
        creditgate::pricing::PriceTable::parse(&path.display().to_string(), &text)
            .map_err(|err| err.to_string())?;
        Ok(text)
    };
    let changes =
        read(old).and_then(|old| read(new).and_then(|new| creditgate::pricing::diff::diff(&old, &new)));
    match changes {
        Ok(changes) if changes.is_empty() => ExitCode::SUCCESS,
        Ok(changes) => {
            let listing: String = changes.iter().map(|change| format!("{change}\n")).collect();
            match write_out(listing.as_bytes()) {
                Ok(()) => ExitCode::from(1),
                Err(err) => {
                    eprintln!("creditgate: {err}");
                    ExitCode::from(2)
                }
            }
        }
        Err(err) => {
            eprintln!("creditgate: {err}");
            ExitCode::from(2)
        }
    }
}

/// The cluster's books, from the URL in environment variable `var`.
fn cluster_books(var: &str) -> anyhow::Result<creditgate::cluster::Books> {
    let url = std::env::var(var)
        .map_err(|_| anyhow::anyhow!("environment variable {var} (the database URL) is not set"))?;
    Ok(creditgate::cluster::Books::new(creditgate::cluster::Database::new(&url, 2)?))
}

/// Exit 0 when every wallet's balance equals funding less debits and its
/// leased credit equals its open leases; 1 (naming each wallet) otherwise.
async fn cluster_verify(var: &str) -> anyhow::Result<ExitCode> {
    let audit = cluster_books(var)?.audit().await?;
    let wrong: Vec<_> = audit.iter().filter(|wallet| !wallet.balances()).collect();
    for wallet in &wrong {
        println!(
            "{}: balance {} but funded {} - debited {} = {}; leased {} but open leases hold {}",
            wallet.wallet,
            wallet.balance,
            wallet.funded,
            wallet.debited,
            wallet.funded - wallet.debited,
            wallet.leased,
            wallet.open_leases
        );
    }
    let overrun: rust_decimal::Decimal = audit.iter().map(|wallet| wallet.uncovered).sum();
    println!("{} wallet(s) checked, {} mismatched; recorded overrun {overrun}", audit.len(), wrong.len());
    Ok(if wrong.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn cluster_status(var: &str, json: bool) -> anyhow::Result<ExitCode> {
    let books = cluster_books(var)?;
    let replicas = books.replicas().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&replicas)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<25} {:>6} {:>20} {:>8} {:>10}  prices",
        "replica (* treasurer)", "last seen", "leases", "leased", "outbox", "lag ms"
    );
    for replica in &replicas {
        let lag = replica.outbox_lag_ms.map_or_else(|| "-".to_owned(), |ms| ms.to_string());
        let name = if replica.treasurer { format!("{} *", replica.replica) } else { replica.replica.clone() };
        println!(
            "{:<24} {:<25} {:>6} {:>20} {:>8} {:>10}  {}",
            name,
            replica.last_seen.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            replica.open_leases,
            replica.leased,
            replica.outbox_len,
            lag,
            replica.price_version.as_deref().unwrap_or("-")
        );
    }
    let mut versions: Vec<&str> = replicas
        .iter()
        .filter(|replica| replica.live)
        .filter_map(|replica| replica.price_version.as_deref())
        .collect();
    versions.sort_unstable();
    versions.dedup();
    // Shipped debits wait for the treasurer to post them into the ledger
    // (balances, reports, alerts): a backlog that grows means it is behind.
    let backlog = books.posting_backlog().await?;
    let oldest = backlog.oldest_ms.map_or_else(String::new, |ms| format!(" (oldest {ms} ms)"));
    println!("debits shipped and waiting to be posted: {}{oldest}", backlog.debits);
    if !replicas.iter().any(|replica| replica.treasurer) {
        println!("warning: no replica holds the treasury: nothing is posted, and no expiry, reset or grant is applied");
    }
    if versions.len() > 1 {
        println!(
            "warning: live replicas price with different tables ({}); the same call costs what the replica \
             that serves it says",
            versions.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes to stdout; a closed pipe (`| head`) is not an error, anything
/// else (a full disk under `> file`) is.
fn write_out(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::anyhow!("writing the output: {err}"))
        }
        _ => Ok(()),
    }
}
