//! `creditgate demo`: the mock upstream and the gateway in one process, on the
//! example config, so a newcomer can curl it straight away.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::app::{self, Gateway};
use crate::config::GatewayConfig;
use crate::ledger::contract::ContractTerm;
use crate::ledger::entity::{KeyHash, Plan};
use crate::ledger::ids::{OrgId, Owner};
use crate::ledger::limit::Limits;
use crate::ledger::{Ledger, LedgerError, NewApp, NewKey, NewOrg, NewUser};
use crate::mock::{MockOptions, MockUpstream};
use crate::telemetry;

/// The example config and price file, built in so `demo` runs from any
/// directory.
pub const EXAMPLE_CONFIG: &str = include_str!("../config/gateway.toml");
const EXAMPLE_CONFIG_PATH: &str = "config/gateway.toml";
pub const EXAMPLE_PRICES: &str = include_str!("../config/prices.toml");
/// Marks the config as the built-in copy, whose price file lives in the data
/// directory (see [`place_builtin_prices`]).
const BUILTIN_SOURCE: &str = "<built-in config/gateway.toml>";

/// Where the demo listens and keeps its data; `None` keeps the config's value.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    pub config: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub mock_listen: Option<SocketAddr>,
}

/// Load the demo's config: the named file, else `config/gateway.toml` if it
/// exists here, else the built-in copy.
pub fn demo_config(path: Option<&Path>) -> anyhow::Result<GatewayConfig> {
    match path {
        Some(path) => Ok(GatewayConfig::load(path)?),
        None if Path::new(EXAMPLE_CONFIG_PATH).exists() => {
            Ok(GatewayConfig::load(Path::new(EXAMPLE_CONFIG_PATH))?)
        }
        None => Ok(GatewayConfig::parse(Path::new(BUILTIN_SOURCE), EXAMPLE_CONFIG, &|name| {
            std::env::var(name).ok()
        })?),
    }
}

/// The built-in config has no file beside it: its price file is the built-in
/// example, written to `<data-dir>/prices.toml` unless one is there already
/// (so an operator's edits survive, and live reload watches a real file).
pub fn place_builtin_prices(config: &mut GatewayConfig) -> anyhow::Result<()> {
    if config.source != Path::new(BUILTIN_SOURCE) {
        return Ok(());
    }
    let Some(pricing) = config.pricing.as_mut() else { return Ok(()) };
    let dir = &config.server.data_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let file = dir.join("prices.toml");
    if !file.exists() {
        std::fs::write(&file, EXAMPLE_PRICES).with_context(|| format!("cannot write {}", file.display()))?;
    }
    pricing.file = file;
    Ok(())
}

/// What to create for a seeded organization.
#[derive(Debug, Clone)]
pub struct SeedSpec {
    pub org_name: String,
    /// Platform credits granted for the first contract year (the pool).
    pub pool: Decimal,
    /// The Lite user's monthly allowance.
    pub lite_allowance: Decimal,
}

/// Keys of a seeded organization, labelled by kind. The secrets exist only
/// here: the ledger keeps their hashes.
#[derive(Debug, Clone, Serialize)]
pub struct SeededKeys {
    pub org: OrgId,
    pub pro: String,
    pub lite: String,
    pub app: String,
}

/// A fresh API key secret: 244 random bits behind a recognisable prefix.
pub fn new_secret() -> String {
    format!("cg_{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// Create an org with a one-year contract funding its pool, a Pro user, a
/// Lite user and an application, each with one key.
pub fn seed_org(ledger: &Ledger, spec: &SeedSpec, now: DateTime<Utc>) -> Result<SeededKeys, LedgerError> {
    let contract = ContractTerm {
        start: now.date_naive(),
        years: 1,
        platform_allocation_per_year: spec.pool,
        pro_seats: 0,
        seat_allocation_per_year: Decimal::ZERO,
    };
    let org = ledger
        .create_org(
            NewOrg { name: spec.org_name.clone(), time_zone: chrono_tz::UTC, contract: Some(contract) },
            now,
        )?
        .id;
    let user = |name: &str, plan, allowance| NewUser {
        name: name.to_owned(),
        plan,
        lite_monthly_allowance: allowance,
        prorate_on_downgrade: false,
        limits: Limits::default(),
    };
    let pro = ledger.create_user(org, user("pro-user", Plan::Pro, Decimal::ZERO), now)?.id;
    let lite = ledger.create_user(org, user("lite-user", Plan::Lite, spec.lite_allowance), now)?.id;
    let app = ledger
        .create_app(
            org,
            NewApp {
                name: "embedded-app".into(),
                limits: Limits::default(),
                end_user_limits: Limits::default(),
            },
            now,
        )?
        .id;
    let key_for = |owner: Owner, label: &str| -> Result<String, LedgerError> {
        let secret = new_secret();
        let new = NewKey {
            owner,
            hash: KeyHash::of_secret(&secret),
            label: label.to_owned(),
            limits: Limits::default(),
        };
        ledger.create_key(org, new, now)?;
        Ok(secret)
    };
    Ok(SeededKeys {
        org,
        pro: key_for(Owner::User(pro), "pro")?,
        lite: key_for(Owner::User(lite), "lite")?,
        app: key_for(Owner::App(app), "app")?,
    })
}

/// Run the demo until SIGINT/SIGTERM.
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let mut config = demo_config(options.config.as_deref())?;
    telemetry::init(&config.log);
    telemetry::log_panics();
    if let Some(listen) = options.listen {
        config.server.listen = listen;
    }
    if let Some(admin_listen) = options.admin_listen {
        config.server.admin_listen = admin_listen;
    }
    if let Some(data_dir) = options.data_dir {
        config.server.data_dir = data_dir;
    }
    place_builtin_prices(&mut config)?;
    let mock_addr = options.mock_listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8090)));
    let mock = MockUpstream::start(mock_addr, MockOptions::default())
        .await
        .with_context(|| format!("cannot start the mock upstream on {mock_addr}"))?;
    // Point the config's `mock` upstream at wherever the mock really listens.
    for upstream in config.upstreams.iter_mut().filter(|u| u.name == "mock") {
        upstream.authority = mock.addr().to_string().parse().context("mock address")?;
    }
    // A newcomer needs the admin API (top-ups, reports, the CLI) without a
    // restart: the demo mints an operator token unless the environment
    // variable the config names already holds one.
    let admin_token = config.admin.operator_token.get_or_insert_with(new_secret).clone();
    let shutdown = CancellationToken::new();
    app::cancel_on_signal(shutdown.clone());
    let data_dir = config.server.data_dir.clone();
    let gateway = Gateway::start(config, shutdown).await?;
    let spec = SeedSpec {
        org_name: "demo-org".into(),
        pool: Decimal::new(2, 3),           // $0.002: a handful of calls
        lite_allowance: Decimal::new(1, 3), // $0.001 a month
    };
    let keys = seed_org(&gateway.ledger(), &spec, Utc::now()).context("cannot seed the demo org")?;
    let demo_json = serde_json::json!({
        "proxy_url": format!("http://{}", gateway.proxy_addr()),
        "admin_url": format!("http://{}", gateway.admin_addr()),
        "admin_token": admin_token,
        "dashboard_url": format!("http://{}/ui/", gateway.admin_addr()),
        "org": keys.org,
        "keys": {"pro": keys.pro, "lite": keys.lite, "app": keys.app},
    });
    let demo_path = data_dir.join("demo.json");
    write_private(&demo_path, &serde_json::to_vec_pretty(&demo_json)?)
        .with_context(|| format!("cannot write {}", demo_path.display()))?;
    print_walkthrough(&gateway, mock.addr(), &keys, &admin_token, &demo_path);
    gateway.wait().await;
    mock.stop().await;
    Ok(())
}

/// Writes `bytes` readable by the owner only (the file holds secrets), whole:
/// a reader never sees half of it.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let partial = path.with_extension("json.partial");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    std::io::Write::write_all(&mut options.open(&partial)?, bytes)?;
    std::fs::rename(&partial, path)
}

fn print_walkthrough(
    gateway: &Gateway,
    mock_addr: SocketAddr,
    keys: &SeededKeys,
    admin_token: &str,
    demo_path: &Path,
) {
    let proxy = gateway.proxy_addr();
    let admin = gateway.admin_addr();
    let pro = &keys.pro;
    println!(
        "creditgate demo is running.
  proxy:          http://{proxy}
  admin:          http://{admin}
  mock upstream:  http://{mock_addr}
  dashboard:      http://{admin}/ui/  (sign in with the admin token)
  admin token:    {admin_token}
  keys (also in {demo}):
    pro:  {pro}
    lite: {lite}
    app:  {app}

A charged call (the pool holds $0.002; repeat it until the answer is 402):
  curl -si http://{proxy}/v1/chat/completions -H 'authorization: Bearer {pro}' \\
       -H 'content-type: application/json' \\
       -d '{{\"model\":\"mock-gpt\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"max_tokens\":200}}'
Top the pool up with the admin token (a retry with the same key buys nothing more):
  curl -s http://{admin}/admin/v1/orgs/{org}/purchases -H 'authorization: Bearer {admin_token}' \\
       -H 'idempotency-key: demo-top-up-1' -d '{{\"amount\":\"1.00\"}}'
  (or: CREDITGATE_ADMIN_TOKEN={admin_token} creditgate admin --url http://{admin} purchase --org {org} --amount 1.00)
A stream:
  curl -sN http://{proxy}/v1/chat/completions -H 'authorization: Bearer {pro}' \\
       -d '{{\"model\":\"mock-gpt\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'

Stop with Ctrl-C.",
        org = keys.org.0,
        demo = demo_path.display(),
        lite = keys.lite,
        app = keys.app,
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_config_gets_the_built_in_prices_in_its_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let builtin = || {
            let mut config =
                GatewayConfig::parse(Path::new(BUILTIN_SOURCE), EXAMPLE_CONFIG, &|_| None).unwrap();
            config.server.data_dir = dir.path().join("data");
            config
        };
        let mut config = builtin();
        place_builtin_prices(&mut config).unwrap();
        let file = dir.path().join("data/prices.toml");
        assert_eq!(config.pricing.as_ref().unwrap().file, file);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), EXAMPLE_PRICES);
        // An operator's edited copy is kept.
        std::fs::write(&file, "# edited\n").unwrap();
        place_builtin_prices(&mut builtin()).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "# edited\n");
        // A config read from a file keeps its own price file.
        let mut from_file = GatewayConfig::load(Path::new(EXAMPLE_CONFIG_PATH)).unwrap();
        let before = from_file.pricing.as_ref().unwrap().file.clone();
        place_builtin_prices(&mut from_file).unwrap();
        assert_eq!(from_file.pricing.unwrap().file, before);
    }
}
