//! A throwaway PostgreSQL server for cluster tests: Debian's binaries
//! (`apt-get install postgresql`, done by `.ci/install-test-deps`), a fresh
//! data directory from `initdb` in a temp dir, a free loopback port and a
//! private socket directory. Never a system service. As root, the server runs
//! as the `postgres` user, because PostgreSQL refuses to run as root.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running server; stopped (fast shutdown) and deleted on drop.
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

/// The directory holding `initdb`, `postgres` and `pg_ctl`: the newest
/// `/usr/lib/postgresql/N/bin`, else wherever `initdb` is on the PATH.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let which = Command::new("sh").args(["-c", "command -v initdb"]).output().unwrap();
    let path = String::from_utf8(which.stdout).unwrap();
    assert!(
        !path.trim().is_empty(),
        "PostgreSQL is not installed: run .ci/install-test-deps (apt-get install postgresql)"
    );
    Path::new(path.trim()).parent().unwrap().to_path_buf()
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|out| out.stdout.trim_ascii() == b"0").unwrap_or(false)
}

/// Runs a PostgreSQL binary, as `postgres` when we are root.
fn command(bin: &Path, program: &str) -> Command {
    let program = bin.join(program);
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Postgres {
    /// initdb and start a server; returns once it accepts connections.
    pub fn start() -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::Builder::new().prefix("creditgate-pg-").tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if is_root() {
            // The temp dir is root's and 0700; the server's user must reach its
            // data and socket directories.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let status = Command::new("chown").arg("postgres:postgres").arg(&data).status().unwrap();
            assert!(status.success(), "chown postgres {data:?}");
        }
        let out = command(&bin, "initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut pg = Postgres { bin, dir, port: free_port(), child: None };
        pg.spawn();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))
            .unwrap();
        let child = command(&self.bin, "postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            // The socket lives in the data directory, which the server owns.
            .arg("-k")
            .arg(self.data())
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|child| child.try_wait().ok().flatten()) {
                panic!("postgres exited ({status}): {}", self.log());
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .map(|status| status.success())
                .unwrap_or(false);
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "postgres did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for database `postgres` as the superuser (trust auth on loopback).
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Creates a fresh database and returns its URL, so tests sharing one
    /// server do not share books.
    pub fn create_database(&self, name: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-q", "-v", "ON_ERROR_STOP=1", "-d", &self.url(), "-c"])
            .arg(format!("CREATE DATABASE \"{name}\""))
            .output()
            .unwrap();
        assert!(out.status.success(), "createdb: {}", String::from_utf8_lossy(&out.stderr));
        format!("postgresql://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Stops the server (fast shutdown: open sessions are cut).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The postmaster's own pid (the child may be `runuser`, which
            // does not pass signals on); SIGINT is a fast shutdown.
            let pid = std::fs::read_to_string(self.data().join("postmaster.pid"))
                .ok()
                .and_then(|text| text.lines().next().map(str::to_owned))
                .unwrap_or_else(|| child.id().to_string());
            let _ = Command::new("kill").args(["-INT", &pid]).status();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
