//! `creditgate demo`: the mock upstream and the gateway in one process, on the
//! example config, so a newcomer can curl it straight away.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::app::{self, Gateway};
use crate::config::GatewayConfig;
use crate::mock::{MockOptions, MockUpstream};
use crate::telemetry;

/// The example config, built in so `demo` runs from any directory.
pub const EXAMPLE_CONFIG: &str = include_str!("../config/gateway.toml");
const EXAMPLE_CONFIG_PATH: &str = "config/gateway.toml";

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
        None => Ok(GatewayConfig::parse(
            Path::new("<built-in config/gateway.toml>"),
            EXAMPLE_CONFIG,
            &|name| std::env::var(name).ok(),
        )?),
    }
}

/// Run the demo until SIGINT/SIGTERM.
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let mut config = demo_config(options.config.as_deref())?;
    telemetry::init(&config.log);
    if let Some(listen) = options.listen {
        config.server.listen = listen;
    }
    if let Some(admin_listen) = options.admin_listen {
        config.server.admin_listen = admin_listen;
    }
    if let Some(data_dir) = options.data_dir {
        config.server.data_dir = data_dir;
    }
    let mock_addr = options
        .mock_listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8090)));
    let mock = MockUpstream::start(mock_addr, MockOptions::default())
        .await
        .with_context(|| format!("cannot start the mock upstream on {mock_addr}"))?;
    // Point the config's `mock` upstream at wherever the mock really listens.
    for upstream in config.upstreams.iter_mut().filter(|u| u.name == "mock") {
        upstream.authority = mock.addr().to_string().parse().context("mock address")?;
    }
    let shutdown = CancellationToken::new();
    app::cancel_on_signal(shutdown.clone());
    let gateway = Gateway::start(config, shutdown).await?;
    print_walkthrough(&gateway, mock.addr());
    gateway.wait().await;
    mock.stop().await;
    Ok(())
}

fn print_walkthrough(gateway: &Gateway, mock_addr: SocketAddr) {
    let proxy = gateway.proxy_addr();
    println!(
        "creditgate demo is running.
  proxy:          http://{proxy}
  admin:          http://{admin}
  mock upstream:  http://{mock_addr}

Try:
  curl -s http://{proxy}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{\"model\":\"mock-gpt\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"max_tokens\":20}}'
  curl -sN http://{proxy}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{\"model\":\"mock-gpt\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'
  curl -s http://{admin}/healthz

Stop with Ctrl-C.",
        admin = gateway.admin_addr(),
    );
}
