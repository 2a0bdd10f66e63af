//! Command-line flags and the defaults each profile gives them.
//!
//! Every flag left unset takes its profile's value, so `--profile full
//! --seconds 3` is the full comparison with shorter phases.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use rust_decimal::Decimal;

use crate::mix::{MixConfig, ModelChoice};
use crate::tenants::TenantConfig;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Profile {
    /// Under a minute in a debug build, asserts correctness only (run by CI).
    Smoke,
    /// The real measurement: 5 interleaved rounds, nginx when installed.
    Full,
    /// Cluster mode: `--replicas` gateways on one PostgreSQL against the
    /// single-node metered gateway, 3 interleaved rounds, the shared books
    /// audited and verified.
    Cluster,
}

/// Whether to run an optional baseline.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Switch {
    /// Run it when it is available, say so when it is not.
    Auto,
    /// Run it; fail when it is not available.
    On,
    /// Do not run it.
    Off,
}

#[derive(Parser, Debug)]
#[command(
    name = "creditgate-load",
    about = "Load-test a creditgate gateway against baselines and audit its books"
)]
pub struct Args {
    #[arg(long, value_enum, default_value = "smoke")]
    pub profile: Profile,
    /// Cluster profile: gateway replicas sharing one PostgreSQL [2].
    #[arg(long)]
    pub replicas: Option<usize>,
    /// The creditgate binary to run (default: `creditgate` next to this binary).
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    /// The price file the gateways load and the audit prices with.
    #[arg(long)]
    pub prices: Option<PathBuf>,
    /// Closed loop: requests in flight at once [smoke 4, full 16].
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Open loop instead: send this many requests per second on a fixed
    /// schedule; latency counts from each request's intended send time.
    #[arg(long)]
    pub rate: Option<u32>,
    /// Open loop: most requests in flight; a request due while this many are
    /// out is not sent and is counted as unsent.
    #[arg(long, default_value_t = 4096)]
    pub max_in_flight: usize,
    /// Open loop: a request sent more than this after its intended time
    /// counts as late.
    #[arg(long, default_value_t = 2)]
    pub late_ms: u64,
    /// Seconds per mode per round [smoke 2, full 10].
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Interleaved rounds [smoke 1, full 5].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Seconds per mode per round of the concurrency-1 pass; 0 skips it [smoke 1, full 3].
    #[arg(long)]
    pub c1_seconds: Option<u64>,
    /// Paced streams per mode per round for the SSE frame-gap pass; 0 skips it [smoke 2, full 12].
    #[arg(long)]
    pub sse_streams: Option<usize>,
    /// Gap the mock leaves between stream events in the SSE pass.
    #[arg(long, default_value_t = 5)]
    pub sse_pace_ms: u64,
    /// Content events per stream in the SSE pass (10..=50).
    #[arg(long, default_value_t = 24)]
    pub sse_frames: u64,
    /// Models and their weights, `api:model=weight` (api: chat, messages,
    /// embeddings, responses); every model must be in the price file.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "chat:mock-gpt=4,chat:gpt-4o-mini=2,messages:mock-claude=2,embeddings:mock-embed=1,responses:gpt-4.1-mini=1"
    )]
    pub models: Vec<String>,
    /// Share of requests that call the web-search tool (units from the mock's header).
    #[arg(long, default_value_t = 0.1)]
    pub tool_share: f64,
    /// Share of model requests (chat and messages) that stream.
    #[arg(long, default_value_t = 0.2)]
    pub stream_share: f64,
    /// Share of streamed requests whose client hangs up after the first chunk.
    #[arg(long, default_value_t = 0.05)]
    pub abandon_share: f64,
    /// Share of funded model requests sent without an output cap.
    #[arg(long, default_value_t = 0.1)]
    pub no_cap_share: f64,
    /// Request body sizes in bytes, picked uniformly.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,8192")]
    pub body_bytes: Vec<usize>,
    /// `max_tokens` of every model request (the output is 10..=50 tokens, capped by this).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u64,
    /// Funded keys, one user each, paying from a large pool or allowance [smoke 4, full 8].
    #[arg(long)]
    pub keys: Option<usize>,
    /// Share of the funded users that are Lite (own large monthly allowance).
    #[arg(long, default_value_t = 0.25)]
    pub lite_share: f64,
    /// Lite users with a small monthly allowance, meant to run dry.
    #[arg(long, default_value_t = 2)]
    pub dry_lite: usize,
    /// Monthly allowance of those Lite users (dollars).
    #[arg(long, default_value = "0.002")]
    pub dry_allowance: Decimal,
    /// Pool of a second organization (one Pro key, one app key) meant to run
    /// dry (dollars); 0 leaves that organization out.
    #[arg(long, default_value = "0.004")]
    pub dry_pool: Decimal,
    /// Share of requests sent with the keys of the small wallets; their 402s
    /// are cheap, so a large share flatters metered throughput [smoke 0.05, full 0.01].
    #[arg(long)]
    pub dry_share: Option<f64>,
    /// nginx as a second pass-through baseline [smoke off, full auto].
    #[arg(long, value_enum)]
    pub nginx: Option<Switch>,
    /// The bare hyper proxy (`creditgate-bare-proxy` next to this binary) as
    /// the reference row every mode is a ratio to [smoke and full auto].
    #[arg(long, value_enum)]
    pub hyper_proxy: Option<Switch>,
    /// The floors under the pass-through and metered routes (the bare proxy
    /// with `--floor auth` and `--floor meter`) [full auto, smoke off].
    #[arg(long, value_enum)]
    pub floors: Option<Switch>,
    /// A second gateway with durable write-through off [auto: when the
    /// gateway's config has the switch].
    #[arg(long, value_enum, default_value = "auto")]
    pub write_through_off: Switch,
    /// `[server] scheduler` of the gateways this run starts (not the
    /// cluster's replicas) [default: the gateway's own, work-stealing].
    #[arg(long, value_parser = ["work-stealing", "thread-per-core"])]
    pub scheduler: Option<String>,
    /// Cluster profile: `[server] workers` of each replica and of each
    /// split node [default: cores / replicas, at least 1, so that together
    /// they run as many proxy threads as the single node they are compared
    /// with; with one per core each, N replicas on this machine would run
    /// N times as many threads as it has cores].
    #[arg(long)]
    pub replica_workers: Option<usize>,
    /// Write the report as JSON to this file (`-` for stdout).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Seed of the request mix (which key, model, size, stream per request).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Progress lines on stderr once a second [default: when phases last 3 s or more].
    #[arg(long)]
    pub progress: Option<bool>,
    /// Target an already running gateway: its proxy listener (`http://HOST:PORT`).
    /// Needs --target-admin and --target-mock; the harness then starts no
    /// mock and no gateway of its own.
    #[arg(long, requires_all = ["target_admin", "target_mock"])]
    pub target_proxy: Option<String>,
    /// The running gateway's admin listener (`http://HOST:PORT`).
    #[arg(long, requires = "target_proxy")]
    pub target_admin: Option<String>,
    /// The running mock upstream that gateway forwards to (`http://HOST:PORT`,
    /// a `creditgate mock-upstream`; its `GET /_mock/journal` feeds the audit).
    #[arg(long, requires = "target_proxy")]
    pub target_mock: Option<String>,
    /// Admin token of the running gateway [default: $CREDITGATE_ADMIN_TOKEN].
    #[arg(long, requires = "target_proxy")]
    pub admin_token: Option<String>,
    /// `Host` of the running gateway's `passthrough = true` route; without it
    /// the passthrough mode is skipped.
    #[arg(long, requires = "target_proxy")]
    pub target_passthrough_host: Option<String>,
    /// Pid of the running gateway, for CPU per request (without it: "–").
    #[arg(long, requires = "target_proxy")]
    pub target_pid: Option<u32>,
    /// Data directory of the running gateway: `creditgate ledger verify` runs
    /// on it at the end (stop the gateway first: verify needs it stopped).
    #[arg(long, requires = "target_proxy")]
    pub target_data_dir: Option<PathBuf>,
}

/// An already running mock and gateway to drive instead of starting our own.
#[derive(Debug, Clone)]
pub struct TargetSettings {
    /// `host:port` of the proxy listener.
    pub proxy: String,
    /// `host:port` of the admin listener.
    pub admin: String,
    /// `host:port` of the mock upstream.
    pub mock: String,
    pub admin_token: String,
    /// `Host` of the pass-through route, leaked once so targets can borrow it.
    pub passthrough_host: Option<&'static str>,
    pub pid: Option<u32>,
    pub data_dir: Option<PathBuf>,
}

/// `http://host:port[/]` or `host:port` → `host:port`.
fn host_port(flag: &str, url: &str) -> anyhow::Result<String> {
    let rest = url.strip_prefix("http://").unwrap_or(url).trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || url.starts_with("https://") || !rest.contains(':') {
        bail!("{flag} wants http://HOST:PORT, not {url:?}");
    }
    Ok(rest.to_owned())
}

impl TargetSettings {
    fn from_args(args: &Args) -> anyhow::Result<Option<TargetSettings>> {
        let Some(proxy) = &args.target_proxy else { return Ok(None) };
        let (Some(admin), Some(mock)) = (&args.target_admin, &args.target_mock) else {
            bail!("--target-proxy needs --target-admin and --target-mock");
        };
        let admin_token = match &args.admin_token {
            Some(token) => token.clone(),
            None => std::env::var("CREDITGATE_ADMIN_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .context("--target-proxy needs --admin-token or $CREDITGATE_ADMIN_TOKEN")?,
        };
        Ok(Some(TargetSettings {
            proxy: host_port("--target-proxy", proxy)?,
            admin: host_port("--target-admin", admin)?,
            mock: host_port("--target-mock", mock)?,
            admin_token,
            passthrough_host: args.target_passthrough_host.clone().map(|h| &*Box::leak(h.into_boxed_str())),
            pid: args.target_pid,
            data_dir: args.target_data_dir.clone(),
        }))
    }
}

/// How the measured phases drive load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoadShape {
    /// A fixed number of requests in flight, each sent when one finishes.
    Closed { concurrency: usize },
    /// A fixed send schedule, independent of how fast answers come.
    Open { rate: u32, max_in_flight: usize, late_ms: u64 },
}

/// Everything the run needs, with the profile's defaults filled in.
#[derive(Debug, Clone)]
pub struct Settings {
    pub profile: Profile,
    pub gateway_bin: PathBuf,
    pub prices: PathBuf,
    pub load: LoadShape,
    pub seconds: u64,
    pub rounds: usize,
    pub c1_seconds: u64,
    pub sse_streams: usize,
    pub sse_pace_ms: u64,
    pub sse_frames: u64,
    pub mix: MixConfig,
    pub tenants: TenantConfig,
    pub nginx: Switch,
    pub hyper_proxy: Switch,
    pub floors: Switch,
    pub write_through_off: Switch,
    /// `[server] scheduler` of the gateways it starts, if set.
    pub scheduler: Option<String>,
    pub json: Option<PathBuf>,
    pub progress: bool,
    /// Replicas of the cluster mode (0: no cluster mode).
    pub replicas: usize,
    /// `[server] workers` of each replica and split node, if set.
    pub replica_workers: Option<usize>,
    /// Drive an already running mock and gateway instead of starting them.
    pub target: Option<TargetSettings>,
}

impl Settings {
    /// Lines for the `[server]` table of the gateways this run starts.
    pub fn server_lines(&self) -> String {
        self.scheduler.as_ref().map(|s| format!("scheduler = \"{s}\"\n")).unwrap_or_default()
    }

    /// Lines for the `[server]` table of the cluster's replicas and of the
    /// split nodes (which stand in for them).
    pub fn replica_server_lines(&self) -> String {
        self.replica_workers.map(|n| format!("workers = {n}\n")).unwrap_or_default()
    }

    pub fn from_args(args: Args) -> anyhow::Result<Settings> {
        let smoke = args.profile == Profile::Smoke;
        let cluster = args.profile == Profile::Cluster;
        let target = TargetSettings::from_args(&args)?;
        let replicas = match (cluster, args.replicas) {
            (true, Some(0)) => bail!("--replicas must be at least 1"),
            (true, replicas) => replicas.unwrap_or(2),
            (false, None) => 0,
            (false, Some(_)) => bail!("--replicas belongs to --profile cluster"),
        };
        if cluster && target.is_some() {
            bail!("--profile cluster starts its own replicas; it cannot --target-proxy a running gateway");
        }
        let pick = |value: Option<u64>, smoke_value: u64, full_value: u64| {
            value.unwrap_or(if smoke { smoke_value } else { full_value })
        };
        let concurrency = args.concurrency.unwrap_or(if smoke { 4 } else { 16 });
        if concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        let load = match args.rate {
            Some(0) => bail!("--rate must be at least 1 request per second"),
            Some(rate) => {
                LoadShape::Open { rate, max_in_flight: args.max_in_flight.max(1), late_ms: args.late_ms }
            }
            None => LoadShape::Closed { concurrency },
        };
        let seconds = pick(args.seconds, 2, 10).max(1);
        let rounds = args.rounds.unwrap_or(match args.profile {
            Profile::Smoke => 1,
            Profile::Full => 5,
            Profile::Cluster => 3,
        });
        let rounds = rounds.max(1);
        if !(10..=50).contains(&args.sse_frames) {
            bail!("--sse-frames must be 10..=50 (the mock writes 10 + seed % 41 tokens)");
        }
        for (name, share) in [
            ("--tool-share", args.tool_share),
            ("--stream-share", args.stream_share),
            ("--abandon-share", args.abandon_share),
            ("--no-cap-share", args.no_cap_share),
            ("--lite-share", args.lite_share),
            ("--dry-share", args.dry_share.unwrap_or(0.0)),
        ] {
            if !(0.0..=1.0).contains(&share) {
                bail!("{name} must be between 0 and 1, not {share}");
            }
        }
        let models = args.models.iter().map(|m| ModelChoice::parse(m)).collect::<anyhow::Result<Vec<_>>>()?;
        if models.is_empty() && args.tool_share < 1.0 {
            bail!("--models is empty: name at least one `api:model`");
        }
        if args.body_bytes.is_empty() || args.body_bytes.iter().any(|b| *b == 0 || *b > 4 * 1024 * 1024) {
            bail!("--body-bytes needs sizes from 1 to 4 MiB");
        }
        if args.dry_allowance < Decimal::ZERO || args.dry_pool < Decimal::ZERO {
            bail!("--dry-allowance and --dry-pool are amounts of 0 or more");
        }
        let tenants = TenantConfig {
            keys: args.keys.unwrap_or(if smoke { 4 } else { 8 }).max(1),
            lite_share: args.lite_share,
            dry_lite: args.dry_lite,
            dry_allowance: args.dry_allowance,
            dry_pool: args.dry_pool,
        };
        let dry_share = match tenants.dry_keys() {
            0 => 0.0,
            _ => args.dry_share.unwrap_or(if smoke { 0.05 } else { 0.01 }),
        };
        let mix = MixConfig {
            models,
            tool_share: args.tool_share,
            stream_share: args.stream_share,
            body_bytes: args.body_bytes,
            max_tokens: args.max_tokens,
            dry_share,
            abandon_share: args.abandon_share,
            no_cap_share: args.no_cap_share,
            seed: args.seed,
        };
        let gateway_bin = match args.gateway_bin {
            Some(bin) => bin,
            None => std::env::current_exe()
                .context("cannot find this binary's path to look for creditgate next to it")?
                .with_file_name("creditgate"),
        };
        let prices = args
            .prices
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/prices.toml"));
        Ok(Settings {
            profile: args.profile,
            gateway_bin,
            prices,
            load,
            seconds,
            rounds,
            c1_seconds: pick(args.c1_seconds, 1, 3),
            // The SSE pass compares against the mock's own event times: one gateway's.
            sse_streams: args.sse_streams.unwrap_or(match args.profile {
                Profile::Smoke => 2,
                Profile::Full => 12,
                Profile::Cluster => 0,
            }),
            sse_pace_ms: args.sse_pace_ms.max(1),
            sse_frames: args.sse_frames,
            mix,
            tenants,
            scheduler: args.scheduler.clone(),
            nginx: args.nginx.unwrap_or(if smoke || cluster { Switch::Off } else { Switch::Auto }),
            hyper_proxy: args.hyper_proxy.unwrap_or(if cluster { Switch::Off } else { Switch::Auto }),
            floors: args.floors.unwrap_or(if smoke || cluster { Switch::Off } else { Switch::Auto }),
            write_through_off: if cluster { Switch::Off } else { args.write_through_off },
            json: args.json,
            progress: args.progress.unwrap_or(seconds >= 3),
            replicas,
            replica_workers: match (cluster, args.replica_workers) {
                (_, Some(0)) => bail!("--replica-workers must be at least 1"),
                (false, Some(_)) => bail!("--replica-workers belongs to --profile cluster"),
                (true, None) => {
                    let cores = std::thread::available_parallelism().map_or(1, usize::from);
                    Some((cores / replicas.max(1)).max(1))
                }
                (_, workers) => workers,
            },
            target,
        })
    }
}
