//! The bare hyper proxy (`creditgate-bare-proxy`, built from this crate) as
//! the reference every mode is a ratio to: what a user would run instead of
//! the gateway (issue 17).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

pub const BIN: &str = "creditgate-bare-proxy";
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct BareProxy {
    child: Child,
    pub addr: SocketAddr,
}

/// The bare proxy binary next to this one, if it was built.
pub fn find() -> Option<PathBuf> {
    let bin = std::env::current_exe().ok()?.with_file_name(BIN);
    bin.is_file().then_some(bin)
}

/// `ADDR` from the proxy's `listening on ADDR` line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    line.strip_prefix("listening on ")?.trim().parse().ok()
}

impl BareProxy {
    /// Starts it on a free port in front of `mock`, with `extra` arguments
    /// (a `--floor`); returns once it listens.
    pub fn start(
        bin: &Path,
        mock: SocketAddr,
        workers: usize,
        extra: &[String],
    ) -> anyhow::Result<BareProxy> {
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--upstream", &mock.to_string()])
            .args(["--workers", &workers.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        let stderr = child.stderr.take().context("the bare proxy's stderr is not piped")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads its stderr to the end so the pipe never fills.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                match listening_addr(&line) {
                    Some(addr) => {
                        let _ = tx.send(addr);
                    }
                    None => eprintln!("[{BIN}] {line}"),
                }
            }
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => Ok(BareProxy { child, addr }),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                bail!("{} did not listen within {START_TIMEOUT:?} (exit: {status:?})", bin.display())
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The bare proxy as the floor under a gateway route (`kind`: `auth` or
/// `meter`), with `keys` known, the mix's `models` priced and its store in `dir`.
pub fn floor_args(kind: &str, keys_file: &Path, models: &[String], dir: &Path) -> Vec<String> {
    let mut args = vec!["--floor".to_owned(), kind.to_owned(), "--keys".to_owned()];
    args.push(keys_file.display().to_string());
    if kind == "meter" {
        args.extend(["--models".to_owned(), models.join(","), "--data-dir".to_owned()]);
        args.push(dir.display().to_string());
    }
    args
}

impl Drop for BareProxy {
    fn drop(&mut self) {
        // It holds no state worth a graceful stop.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_gives_the_address() {
        assert_eq!(listening_addr("listening on 127.0.0.1:4567"), Some("127.0.0.1:4567".parse().unwrap()));
        assert_eq!(listening_addr("some warning"), None, "other lines are not addresses");
    }
}
