//! nginx as a second pass-through baseline: a generated config in a temporary
//! prefix (pid, logs and temp paths inside it, so no root is needed), in the
//! foreground, two workers, keep-alive connections to the mock, no buffering.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// The nginx binary on PATH, if any.
pub fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("nginx")).find(|candidate| candidate.is_file())
}

fn config(prefix: &std::path::Path, listen: SocketAddr, mock: SocketAddr) -> String {
    let p = prefix.display();
    format!(
        r#"daemon off;
master_process on;
worker_processes 2;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    client_max_body_size 16m;
    upstream mock {{
        server {mock};
        keepalive 256;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"#
    )
}

impl Nginx {
    pub fn start(bin: &std::path::Path, mock: SocketAddr) -> anyhow::Result<Nginx> {
        let dir = tempfile::tempdir()?;
        // Workers may run as another user when started by root: let them in.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let addr = {
            let probe = TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?
        };
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config(dir.path(), addr, mock))?;
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        let mut nginx = Nginx { child, addr, dir };
        let started = Instant::now();
        while TcpStream::connect(addr).is_err() {
            if let Some(status) = nginx.child.try_wait()? {
                bail!("nginx exited at start ({status}): {}", nginx.error_log());
            }
            if started.elapsed() > START_TIMEOUT {
                bail!("nginx did not listen on {addr} within {START_TIMEOUT:?}: {}", nginx.error_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// SIGQUIT (graceful) to the master; it takes its workers with it.
    pub fn stop(mut self) {
        let _ = Command::new("kill").args(["-QUIT", &self.child.id().to_string()]).status();
        let started = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // TERM, not KILL: a killed master would leave its workers behind.
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
            let _ = self.child.wait();
        }
    }
}
