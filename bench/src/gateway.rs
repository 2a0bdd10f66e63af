//! Running a real `creditgate` process: its config, the write-through
//! switch, start-up, graceful stop (SIGTERM) and `ledger verify`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::client::{self, Http};

pub const ADMIN_TOKEN: &str = "load-admin-token";
const ADMIN_TOKEN_ENV: &str = "CREDITGATE_LOAD_ADMIN_TOKEN";
/// `Host` of requests for the unmetered pass-through route.
pub const PASSTHROUGH_HOST: &str = "passthrough.load";
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running gateway process on its own temporary data directory.
pub struct Gateway {
    pub name: &'static str,
    child: Child,
    pub proxy: String,
    pub admin: String,
    pub data_dir: PathBuf,
    bin: PathBuf,
    /// Kept for the life of the process.
    _dir: tempfile::TempDir,
}

/// The config of every gateway the harness runs: every model flavour, the
/// web-search tool, and an unmetered `passthrough = true` route chosen by
/// `Host`, through an origin of its own (the same mock, named `localhost`: a
/// host-bound pass-through route never takes a path a metered route of its
/// origin claims). `server` goes into `[server]` (the scheduler); `extra` is
/// appended (the write-through switch).
pub fn config_text(mock: SocketAddr, prices: &Path, server: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
{server}
[log]
level = "warn"
[pricing]
file = "{prices}"
[admin]
token_env = "{ADMIN_TOKEN_ENV}"
[upstreams.mock]
base_url = "http://{mock}"
pool_max_idle_per_host = 1024
[[routes]]
prefix = "/v1/chat/completions"
upstream = "mock"
flavour = "openai-chat"
[[routes]]
prefix = "/v1/embeddings"
upstream = "mock"
flavour = "openai-embeddings"
[[routes]]
prefix = "/v1/responses"
upstream = "mock"
flavour = "openai-responses"
[[routes]]
prefix = "/v1/messages"
upstream = "mock"
flavour = "anthropic-messages"
[[routes]]
prefix = "/v1/tools/web-search"
upstream = "mock"
tool = "web-search"
units_header = "x-usage-units"
[upstreams.mock-direct]
base_url = "http://localhost:{mock_port}"
pool_max_idle_per_host = 1024
[[routes]]
prefix = "/v1"
host = "{PASSTHROUGH_HOST}"
upstream = "mock-direct"
passthrough = true
public = true
methods = ["GET", "POST"]
{extra}
"#,
        prices = prices.display(),
        mock_port = mock.port(),
    )
}

/// The config text that turns durable write-through off, in whichever form
/// this gateway binary accepts (`[store]` or `[ledger]` section), found with
/// `creditgate check-config`; `None` when it has no such switch.
pub fn write_through_off_switch(
    bin: &Path,
    mock: SocketAddr,
    prices: &Path,
) -> anyhow::Result<Option<String>> {
    let dir = tempfile::tempdir()?;
    for section in ["[store]\nwrite_through = false\n", "[ledger]\nwrite_through = false\n"] {
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, config_text(mock, prices, "", section))?;
        let status = Command::new(bin)
            .args(["check-config", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        if status.success() {
            return Ok(Some(section.to_owned()));
        }
    }
    Ok(None)
}

/// What a gateway process is started with.
pub struct Launch<'a> {
    pub name: &'static str,
    pub bin: &'a Path,
    pub mock: SocketAddr,
    pub prices: &'a Path,
    /// Lines for `[server]` in [`config_text`].
    pub server: &'a str,
    /// Config text appended to [`config_text`]'s.
    pub extra: &'a str,
    /// Its data directory (`None`: a new temporary one).
    pub data_dir: Option<PathBuf>,
    /// Environment variables it also gets.
    pub env: &'a [(&'a str, &'a str)],
}

impl Gateway {
    /// Starts a gateway as `launch` says; returns once it is ready.
    pub async fn start(launch: Launch<'_>, http: &Http) -> anyhow::Result<Gateway> {
        let Launch { name, bin, mock, prices, server, extra, data_dir, env } = launch;
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("gateway.toml");
        std::fs::write(&config_path, config_text(mock, prices, server, extra))?;
        let data_dir = data_dir.unwrap_or_else(|| dir.path().join("data"));
        let mut child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&config_path)
            .arg("--data-dir")
            .arg(&data_dir)
            .env(ADMIN_TOKEN_ENV, ADMIN_TOKEN)
            .env("RUST_LOG", "warn,creditgate::app=info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot run {} (build it: cargo build --release -p creditgate --bin creditgate)",
                    bin.display()
                )
            })?;
        let stderr = child.stderr.take().context("the gateway's stderr is not piped")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the gateway's log to the end so the pipe never fills; the
        // address line tells where it listens; warnings are shown.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let field = |name: &str| {
                    line.split(name).nth(1).and_then(|r| r.split_whitespace().next()).map(str::to_owned)
                };
                if let (Some(proxy), Some(admin)) = (field("proxy_addr="), field("admin_addr=")) {
                    let _ = tx.send((proxy, admin));
                } else if line.contains("ERROR") || line.contains("WARN") {
                    eprintln!("[{name}] {line}");
                }
            }
        });
        let (proxy, admin) = match rx.recv_timeout(START_TIMEOUT) {
            Ok(addrs) => addrs,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                bail!("the {name} gateway did not start within {START_TIMEOUT:?} (exit: {status:?})");
            }
        };
        let gateway = Gateway { name, child, proxy, admin, data_dir, bin: bin.to_owned(), _dir: dir };
        gateway.wait_ready(http).await?;
        Ok(gateway)
    }

    async fn wait_ready(&self, http: &Http) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let request = http::Request::get(format!("http://{}/readyz", self.admin))
                .body(http_body_util::Full::new(bytes::Bytes::new()))?;
            if matches!(client::call(http, request).await, Ok((200, _))) {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                bail!("the {} gateway never turned ready", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait for a clean exit (in-flight work settled, store flushed).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status()?;
        if !status.success() {
            bail!("could not send SIGTERM to the {} gateway", self.name);
        }
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("the {} gateway exited with {status} after SIGTERM", self.name);
                }
                return Ok(());
            }
            if started.elapsed() > STOP_TIMEOUT {
                bail!("the {} gateway did not exit within {STOP_TIMEOUT:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `creditgate ledger verify` on a stopped gateway's data directory.
    pub fn verify(bin: &Path, data_dir: &Path) -> anyhow::Result<String> {
        let output = Command::new(bin).args(["ledger", "verify", "--data-dir"]).arg(data_dir).output()?;
        let text =
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        if !output.status.success() {
            bail!("creditgate ledger verify failed ({}):\n{text}", output.status);
        }
        Ok(text.trim().to_owned())
    }

    /// Stop gracefully and verify the ledger on the data directory it left.
    pub fn stop_and_verify(mut self) -> anyhow::Result<String> {
        self.stop()?;
        Gateway::verify(&self.bin, &self.data_dir)
            .with_context(|| format!("the {} gateway's ledger", self.name))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
