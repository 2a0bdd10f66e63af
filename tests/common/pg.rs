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

/// A temp dir holding an empty `data` directory the server's user owns.
fn data_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix("creditgate-pg-").tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    use std::os::unix::fs::PermissionsExt;
    // The server refuses a data directory others can read.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    if is_root() {
        // The temp dir is root's and 0700; the server's user must reach its
        // data and socket directories.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let status = Command::new("chown").arg("postgres:postgres").arg(&data).status().unwrap();
        assert!(status.success(), "chown postgres {data:?}");
    }
    (dir, data)
}

/// A fresh cluster from `initdb` (trust on loopback): the binaries' directory,
/// the temp dir and its data directory.
fn initdb() -> (PathBuf, tempfile::TempDir, PathBuf) {
    let bin = bin_dir();
    let (dir, data) = data_dir();
    let out = command(&bin, "initdb")
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "-D"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
    (bin, dir, data)
}

/// Sends `signal` (a `kill` name: `KILL`, `STOP`, ...) to each of `pids`.
fn signal(signal: &str, pids: &[String]) {
    if !pids.is_empty() {
        let _ = Command::new("kill").arg(format!("-{signal}")).args(pids).status();
    }
}

/// The pids of `parent`'s children (the postmaster's backends and workers).
fn children(parent: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
            (ppid == parent).then(|| entry.file_name().to_string_lossy().into_owned())
        })
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Postgres {
    /// initdb and start a server; returns once it accepts connections.
    pub fn start() -> Postgres {
        let (bin, dir, _) = initdb();
        let mut pg = Postgres { bin, dir, port: free_port(), child: None };
        pg.spawn();
        pg
    }

    /// A server that takes TLS connections only (`hostnossl ... reject`),
    /// with a certificate for 127.0.0.1 and localhost signed by a throwaway
    /// CA; returns it with the CA's PEM file. Certificates come from the
    /// `openssl` command (Debian's package, which PostgreSQL's pulls in).
    pub fn start_tls() -> (Postgres, PathBuf) {
        let (bin, dir, data) = initdb();
        let certs = dir.path().join("certs");
        std::fs::create_dir(&certs).unwrap();
        let script = r#"set -e
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=creditgate-test-ca   -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign   -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost   -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost
basicConstraints=CA:FALSE
keyUsage=digitalSignature
extendedKeyUsage=serverAuth
' > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext -out server.pem 2>/dev/null
chmod 600 server.key"#;
        let out = Command::new("sh").args(["-c", script]).current_dir(&certs).output().unwrap();
        assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
        for file in ["server.pem", "server.key"] {
            std::fs::copy(certs.join(file), data.join(file)).unwrap();
        }
        if is_root() {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(data.join("server.pem"))
                .arg(data.join("server.key"))
                .status()
                .unwrap();
            assert!(status.success());
        }
        use std::io::Write;
        let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
        writeln!(conf, "ssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'").unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        let mut pg = Postgres { bin, dir, port: free_port(), child: None };
        pg.spawn();
        (pg, certs.join("ca.pem"))
    }

    /// One server for the whole test binary, started on first use; tests
    /// keep apart by database ([`Postgres::create_database`]). A static is
    /// never dropped, so a watchdog process stops the server and deletes
    /// its directory once this process has exited.
    pub fn shared() -> &'static Postgres {
        static SHARED: std::sync::OnceLock<Postgres> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            let pg = Postgres::start();
            pg.stop_when_gone(std::process::id());
            pg
        })
    }

    /// Spawns the watchdog: waits for process `owner` to exit, then stops
    /// the server (fast shutdown) and removes its directory.
    // The watchdog outlives this process on purpose: nothing here waits for it.
    #[allow(clippy::zombie_processes)]
    fn stop_when_gone(&self, owner: u32) {
        let postmaster = self.child.as_ref().map(|child| self.postmaster_pid(child)).unwrap();
        let dir = self.dir.path().display();
        let script = format!(
            "while kill -0 {owner} 2>/dev/null; do sleep 0.5; done; kill -INT {postmaster}; \
             while kill -0 {postmaster} 2>/dev/null; do sleep 0.2; done; rm -rf '{dir}'"
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
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

    /// The postmaster's pid while it runs (its backends are its children).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|child| self.postmaster_pid(child).parse().ok())
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

    /// The postmaster's own pid (the child may be `runuser`, which does not
    /// pass signals on).
    fn postmaster_pid(&self, child: &Child) -> String {
        std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next().map(str::to_owned))
            .unwrap_or_else(|| child.id().to_string())
    }

    /// Stops the server (fast shutdown: open sessions are cut).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT is a fast shutdown.
            signal("INT", &[self.postmaster_pid(&child)]);
            let _ = child.wait();
        }
    }

    /// Kills the server as a lost machine would lose it: SIGKILL to the
    /// postmaster and every backend at once, no shutdown checkpoint, no
    /// goodbye to clients or standbys. Its data stays; it is not restarted.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let postmaster = self.postmaster_pid(&child);
            // Stopped, it forks no new backend while its children are listed.
            signal("STOP", std::slice::from_ref(&postmaster));
            let mut pids = children(&postmaster);
            pids.push(postmaster);
            signal("KILL", &pids);
            // As root the child is `runuser`, which stops itself when the
            // postmaster stops and then never reaps it: it goes too.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs one statement with psql on database `postgres`; its output.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-qAt", "-v", "ON_ERROR_STOP=1", "-d", &self.url(), "-c", sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// A streaming standby of this server: a base backup (`pg_basebackup
    /// -R`, which writes `standby.signal` and the `primary_conninfo`) on its
    /// own free port, started in hot standby; returns once it accepts
    /// (read-only) connections. `initdb -A trust` lets loopback connect for
    /// replication, and `wal_level = replica` is the default.
    pub fn start_standby(&self) -> Postgres {
        let (dir, data) = data_dir();
        let out = command(&self.bin, "pg_basebackup")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
            .args(["-X", "stream", "-c", "fast", "-R", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_basebackup failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut standby = Postgres { bin: self.bin.clone(), dir, port: free_port(), child: None };
        standby.spawn();
        standby
    }

    /// Promotes this standby to a primary (`pg_ctl promote`, waiting until
    /// it accepts writes).
    pub fn promote(&self) {
        let out = command(&self.bin, "pg_ctl")
            .args(["promote", "-w", "-t", "30", "-D"])
            .arg(self.data())
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl promote: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(self.psql("SELECT pg_is_in_recovery()"), "f", "promoted: {}", self.log());
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

/// A primary and a **synchronous** streaming standby of it, for failover.
///
/// Zero-loss failover needs synchronous replication: the primary runs with
/// `synchronous_standby_names = '*'` and `synchronous_commit = on`, so a
/// commit is acknowledged only once the standby has flushed its WAL, and a
/// standby promoted after the primary is lost holds every transaction a
/// client saw commit (Patroni's `synchronous_mode` does the same). With
/// asynchronous replication a failover may lose the last acknowledged
/// commits (a shipped debit, a lease, a log record), and no book could stay
/// exact. The standby itself names no synchronous standby, so once promoted
/// it commits alone.
pub struct Replicated {
    pub primary: Postgres,
    pub standby: Postgres,
}

impl Replicated {
    /// Starts both; returns once the standby streams synchronously.
    pub fn start() -> Replicated {
        let primary = Postgres::start();
        let standby = primary.start_standby();
        // Set only now: a primary that waits for a standby that is not there
        // yet would block every commit, the standby's own setup included.
        primary.psql("ALTER SYSTEM SET synchronous_standby_names = '*'");
        primary.psql("ALTER SYSTEM SET synchronous_commit = on");
        primary.psql("SELECT pg_reload_conf()");
        let deadline = Instant::now() + Duration::from_secs(30);
        while primary.psql("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'") != "1" {
            assert!(
                Instant::now() < deadline,
                "the standby does not stream synchronously: {}",
                standby.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Replicated { primary, standby }
    }

    /// Creates a database on the primary (it streams to the standby) and
    /// returns its libpq multi-host URL: the primary first, then the standby.
    pub fn create_database(&self, name: &str) -> String {
        self.primary.create_database(name);
        format!(
            "postgresql://postgres@127.0.0.1:{},127.0.0.1:{}/{name}",
            self.primary.port(),
            self.standby.port()
        )
    }
}
