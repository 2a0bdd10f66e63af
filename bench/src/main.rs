//! `creditgate-load`: drives a creditgate process against the mock upstream,
//! measures it against a baseline in the same run, and audits the books.
//!
//! Modes, run in interleaved rounds so a noisy machine hits all of them alike:
//! `direct` (client → mock), `passthrough` (client → gateway, unmetered route
//! → mock) and `metered` (client → gateway, identify, price, hold, settle →
//! mock). Afterwards every debit in the ledger is checked against the cost
//! computed independently from the mock's usage journal and the price file.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use creditgate::mock::{MockOptions, MockUpstream};
use creditgate::pricing::{PriceTable, TokenUsage};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rust_decimal::Decimal;
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Profile {
    /// Under a minute, asserts correctness only (run by CI).
    Smoke,
    /// The real measurement.
    Full,
}

#[derive(Parser, Debug)]
#[command(about = "Load-test a creditgate gateway and audit its books")]
struct Args {
    #[arg(long, value_enum, default_value = "smoke")]
    profile: Profile,
    /// The creditgate binary to run (default: next to this one).
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
    /// Requests in flight at once (closed loop).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Seconds per mode per round.
    #[arg(long)]
    seconds: Option<u64>,
    /// Interleaved rounds.
    #[arg(long)]
    rounds: Option<usize>,
    /// Print the report as JSON too.
    #[arg(long)]
    json: bool,
}

const ADMIN_TOKEN: &str = "load-admin-token";
const MODES: [&str; 3] = ["direct", "passthrough", "metered"];

type Http = Client<HttpConnector, Full<Bytes>>;

/// One mode's results for one round.
#[derive(Debug, Clone, Default)]
struct Sample {
    requests: u64,
    by_status: HashMap<u16, u64>,
    latencies_us: Vec<u64>,
    elapsed: Duration,
    gateway_cpu: Duration,
}

impl Sample {
    fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> u64 {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return 0;
        }
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[index.min(sorted.len() - 1)]
    }

    fn cpu_per_request_us(&self) -> f64 {
        self.gateway_cpu.as_secs_f64() * 1e6 / self.requests.max(1) as f64
    }
}

struct Gateway {
    child: Child,
    proxy: String,
    admin: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (concurrency, seconds, rounds) = match args.profile {
        Profile::Smoke => {
            (args.concurrency.unwrap_or(4), args.seconds.unwrap_or(2), args.rounds.unwrap_or(1))
        }
        Profile::Full => {
            (args.concurrency.unwrap_or(16), args.seconds.unwrap_or(10), args.rounds.unwrap_or(5))
        }
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let prices_path = root.join("config/prices.toml");
    let prices = PriceTable::parse("prices.toml", &std::fs::read_to_string(&prices_path)?)?;
    let options = MockOptions { journal_capacity: Some(10_000_000), ..MockOptions::default() };
    let mock = MockUpstream::start("127.0.0.1:0".parse()?, options).await?;
    let dir = tempfile::tempdir()?;
    let gateway = start_gateway(&args, &dir, &mock, &prices_path)?;
    let http: Http =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(concurrency * 2).build_http();
    let key = seed(&http, &gateway).await?;

    let mut samples: HashMap<&str, Vec<Sample>> = HashMap::new();
    for round in 0..rounds {
        for mode in MODES {
            let url = match mode {
                "direct" => format!("http://{}/v1/chat/completions", mock.addr()),
                _ => format!("http://{}/v1/chat/completions", gateway.proxy),
            };
            let sample = run_mode(&http, mode, &url, &key, gateway.child.id(), concurrency, seconds).await?;
            eprintln!(
                "round {}/{rounds} {mode:<11} {:>8.0} req/s  p50 {:>6} µs  p99 {:>6} µs",
                round + 1,
                sample.throughput(),
                sample.percentile(0.5),
                sample.percentile(0.99)
            );
            samples.entry(mode).or_default().push(sample);
        }
    }
    let report = report(&samples);
    println!("{}", report.0);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.1)?);
    }
    audit(&http, &gateway, &mock, &prices).await?;
    println!("audit: ok — every debit equals the cost computed from the mock's usage and the price file");
    Ok(())
}

fn start_gateway(
    args: &Args,
    dir: &tempfile::TempDir,
    mock: &MockUpstream,
    prices: &std::path::Path,
) -> anyhow::Result<Gateway> {
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[log]
level = "info"
[pricing]
file = "{prices}"
[admin]
token_env = "CREDITGATE_LOAD_ADMIN_TOKEN"
[upstreams.mock]
base_url = "http://{mock}"
[[routes]]
prefix = "/v1/chat/completions"
upstream = "mock"
flavour = "openai-chat"
[[routes]]
prefix = "/v1"
host = "passthrough.load"
upstream = "mock"
passthrough = true
"#,
        prices = prices.display(),
        mock = mock.addr()
    );
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(&config_path, config)?;
    let bin = match &args.gateway_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?.with_file_name("creditgate"),
    };
    let mut child = Command::new(&bin)
        .args(["serve", "--config"])
        .arg(&config_path)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("CREDITGATE_LOAD_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "warn,creditgate::app=info")
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {} (build it with `cargo build --release`)", bin.display()))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let field = |name: &str| {
                line.split(name).nth(1).and_then(|r| r.split_whitespace().next()).map(str::to_owned)
            };
            if let (Some(proxy), Some(admin)) = (field("proxy_addr="), field("admin_addr=")) {
                let _ = tx.send((proxy, admin));
            }
        }
    });
    let (proxy, admin) = rx.recv_timeout(Duration::from_secs(30)).context("the gateway did not start")?;
    Ok(Gateway { child, proxy, admin })
}

async fn call(http: &Http, request: Request<Full<Bytes>>) -> anyhow::Result<(u16, Bytes)> {
    let response = http.request(request).await?;
    let status = response.status().as_u16();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}

async fn admin(http: &Http, gateway: &Gateway, path: &str, body: Value) -> anyhow::Result<Value> {
    let method = if body.is_null() { "GET" } else { "POST" };
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", gateway.admin))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::new(Bytes::from(if body.is_null() { String::new() } else { body.to_string() })))?;
    let (status, bytes) = call(http, request).await?;
    if status >= 300 {
        bail!("admin {path} answered {status}: {}", String::from_utf8_lossy(&bytes));
    }
    Ok(serde_json::from_slice(&bytes)?)
}

/// An org with a large pool and one Pro key.
async fn seed(http: &Http, gateway: &Gateway) -> anyhow::Result<String> {
    let today = chrono::Utc::now().date_naive().to_string();
    let org = admin(
        http,
        gateway,
        "/admin/v1/orgs",
        json!({"name": "load",
        "contract": {"start": today, "years": 1, "platform_allocation_per_year": "1000000"}}),
    )
    .await?;
    let org = org["id"].as_u64().context("org id")?;
    let user =
        admin(http, gateway, &format!("/admin/v1/orgs/{org}/users"), json!({"name": "load", "plan": "pro"}))
            .await?;
    let key =
        admin(http, gateway, &format!("/admin/v1/orgs/{org}/keys"), json!({"user": user["id"]})).await?;
    Ok(key["secret"].as_str().context("key secret")?.to_owned())
}

/// CPU time (user + system) the process has used so far, from /proc.
fn process_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return Duration::ZERO };
    // Fields after the command name, which may contain spaces, in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else { return Duration::ZERO };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are the 14th and 15th fields: 12 and 13 after the name.
    const TICKS_PER_SECOND: u64 = 100;
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / TICKS_PER_SECOND)
}

async fn run_mode(
    http: &Http,
    mode: &str,
    url: &str,
    key: &str,
    gateway_pid: u32,
    concurrency: usize,
    seconds: u64,
) -> anyhow::Result<Sample> {
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = process_cpu(gateway_pid);
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let (http, url, key, stop, mode) =
                (http.clone(), url.to_owned(), key.to_owned(), stop.clone(), mode.to_owned());
            tokio::spawn(async move {
                let mut sample = Sample::default();
                let mut n = worker as u64;
                while !stop.load(Ordering::Relaxed) {
                    n += concurrency as u64;
                    // One call in five streams.
                    let body = if n.is_multiple_of(5) {
                        format!(r#"{{"model":"mock-gpt","stream":true,"max_tokens":16,"seed":{n}}}"#)
                    } else {
                        format!(r#"{{"model":"mock-gpt","max_tokens":16,"seed":{n}}}"#)
                    };
                    let mut request = Request::post(&url).header("authorization", format!("Bearer {key}"));
                    if mode == "passthrough" {
                        request = request.header("host", "passthrough.load");
                    }
                    let Ok(request) = request.body(Full::new(Bytes::from(body))) else { break };
                    let sent = Instant::now();
                    let status = match call(&http, request).await {
                        Ok((status, _)) => status,
                        Err(_) => 599,
                    };
                    sample.latencies_us.push(sent.elapsed().as_micros() as u64);
                    *sample.by_status.entry(status).or_default() += 1;
                    sample.requests += 1;
                }
                sample
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Sample::default();
    for worker in workers {
        let sample = worker.await?;
        total.requests += sample.requests;
        total.latencies_us.extend(sample.latencies_us);
        for (status, count) in sample.by_status {
            *total.by_status.entry(status).or_default() += count;
        }
    }
    total.elapsed = started.elapsed();
    total.gateway_cpu = process_cpu(gateway_pid).saturating_sub(cpu_before);
    if total.by_status.keys().any(|s| *s != 200) {
        bail!("{mode}: unexpected statuses {:?}", total.by_status);
    }
    Ok(total)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn report(samples: &HashMap<&str, Vec<Sample>>) -> (String, Value) {
    let mut text =
        String::from("mode         req/s (median)  p50 µs  p90 µs  p99 µs  p99.9 µs  gateway CPU µs/req\n");
    let mut json = serde_json::Map::new();
    let stat = |mode: &str, f: &dyn Fn(&Sample) -> f64| {
        median(samples.get(mode).map(|s| s.iter().map(f).collect()).unwrap_or_default())
    };
    for mode in MODES {
        let throughput = stat(mode, &|s| s.throughput());
        let p = |q: f64| stat(mode, &|s| s.percentile(q) as f64);
        let cpu = stat(mode, &|s| s.cpu_per_request_us());
        text.push_str(&format!(
            "{mode:<12} {throughput:>14.0} {:>7.0} {:>7.0} {:>7.0} {:>9.0} {:>19.1}\n",
            p(0.5),
            p(0.9),
            p(0.99),
            p(0.999),
            if mode == "direct" { f64::NAN } else { cpu }
        ));
        json.insert(
            mode.to_owned(),
            json!({"throughput": throughput, "p50_us": p(0.5), "p90_us": p(0.9),
            "p99_us": p(0.99), "p999_us": p(0.999), "gateway_cpu_us_per_request": cpu}),
        );
    }
    // Ratios per round (same round, same noise), then their median and spread.
    let ratios = |a: &str, b: &str, f: &dyn Fn(&Sample) -> f64| -> (f64, f64, f64) {
        let (Some(a), Some(b)) = (samples.get(a), samples.get(b)) else { return (0.0, 0.0, 0.0) };
        let values: Vec<f64> = a.iter().zip(b).map(|(x, y)| f(x) / f(y)).collect();
        let (min, max) = values.iter().fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        (median(values), min, max)
    };
    let throughput = ratios("metered", "passthrough", &|s| s.throughput());
    let cpu = ratios("metered", "passthrough", &|s| s.cpu_per_request_us());
    let added =
        stat("metered", &|s| s.percentile(0.5) as f64) - stat("direct", &|s| s.percentile(0.5) as f64);
    text.push_str(&format!(
        "metered/passthrough throughput {:.2} (spread {:.2}..{:.2}); CPU per request {:.2} (spread {:.2}..{:.2}); added p50 over direct {added:.0} µs\n",
        throughput.0, throughput.1, throughput.2, cpu.0, cpu.1, cpu.2
    ));
    json.insert(
        "metered_over_passthrough".into(),
        json!({"throughput": throughput.0, "cpu_per_request": cpu.0}),
    );
    (text, Value::Object(json))
}

/// Every debit equals the cost of the mock's reported usage at list prices.
async fn audit(
    http: &Http,
    gateway: &Gateway,
    mock: &MockUpstream,
    prices: &PriceTable,
) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_millis(200)).await;
    let orgs = admin(http, gateway, "/admin/v1/orgs", Value::Null).await?;
    let org = orgs["orgs"][0]["id"].as_u64().context("org")?;
    let mut debits: Vec<Value> = Vec::new();
    let mut cursor = 0;
    loop {
        let page = admin(
            http,
            gateway,
            &format!("/admin/v1/orgs/{org}/ledger?kind=debit&limit=1000&after={cursor}"),
            Value::Null,
        )
        .await?;
        debits.extend(page["entries"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_u64() {
            Some(next) => cursor = next,
            None => break,
        }
    }
    let journal = mock.journal().entries();
    let by_request: HashMap<String, &creditgate::mock::JournalEntry> =
        journal.iter().filter_map(|e| e.header("x-request-id").map(|id| (id.replace('-', ""), e))).collect();
    let price = prices.model("mock-gpt", chrono::Utc::now()).context("mock-gpt is priced")?;
    let mut checked = 0;
    for debit in &debits {
        let id = debit["kind"]["request_id"].as_str().context("request id")?.replace('-', "");
        let Some(entry) = by_request.get(&id) else { continue };
        let usage = entry.usage.context("the mock reported usage")?;
        let expected = price.cost(&TokenUsage {
            input_tokens: usage.input_tokens,
            cached_input_tokens: 0,
            output_tokens: usage.output_tokens,
        })?;
        let charged: Decimal = debit["amount"].as_str().context("amount")?.parse::<Decimal>()?.abs();
        if charged != expected {
            bail!("request {id}: charged {charged}, the mock's usage costs {expected}");
        }
        checked += 1;
    }
    if checked == 0 || checked < debits.len() {
        bail!("audited {checked} of {} debits", debits.len());
    }
    println!("audit: {checked} debits checked against {} metered upstream calls", by_request.len());
    Ok(())
}
