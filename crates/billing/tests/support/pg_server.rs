//! A real PostgreSQL server for the tests: Debian's `postgresql` package's `initdb` and
//! `postgres`, in a temporary directory, listening on a free loopback port (TCP only), run
//! as the `postgres` user when the tests run as root (the server refuses root). Stopped
//! when the last [`PgServer`] handle of the test binary is dropped, by the pid of the
//! `postgres` process the tests started.
//!
//! Each test takes a database of its own ([`PgServer::fresh_database`]), so tests run in
//! parallel on one server.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// What a test that needs PostgreSQL says when it cannot find it.
pub const MISSING: &str = "PostgreSQL server binaries (initdb, postgres) not found under \
    /usr/lib/postgresql/*/bin (or $PG_BIN): install Debian's package `postgresql` \
    (apt-get install postgresql); .ci/run installs it";

/// A running server; dropping the last handle stops it.
pub struct PgServer {
    port: u16,
    child: Mutex<Child>,
    /// The data directory and the log; removed after the server has stopped.
    dir: Option<tempfile::TempDir>,
    databases: AtomicUsize,
}

static SHARED: Mutex<Weak<PgServer>> = Mutex::new(Weak::new());

/// The server shared by the tests of this binary, started if none is running.
pub fn shared() -> Arc<PgServer> {
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(server) = shared.upgrade() {
        return server;
    }
    let server = Arc::new(PgServer::start());
    *shared = Arc::downgrade(&server);
    server
}

/// The directory of `initdb` and `postgres`: `$PG_BIN`, or the newest
/// `/usr/lib/postgresql/<version>/bin`.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("postgres").exists()).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// The uid and gid to run the server as: the `postgres` user's when we are root.
fn server_ids() -> Option<(u32, u32)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    if uid != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let entry = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("running as root and no `postgres` user to run PostgreSQL as: install Debian's package `postgresql`");
    let fields: Vec<&str> = entry.split(':').collect();
    Some((fields[2].parse().unwrap(), fields[3].parse().unwrap()))
}

/// `program` run as `ids` (when given) in `cwd`: a directory the server's user owns, since
/// initdb fails in a working directory it cannot read (a checkout under /root, say).
fn command(program: &Path, ids: Option<(u32, u32)>, cwd: &Path) -> Command {
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = ids {
        cmd.uid(uid).gid(gid);
    }
    cmd.current_dir(cwd).env_remove("PGDATA").env("LC_ALL", "C");
    cmd
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PgServer {
    /// Starts a new server (initdb, then postgres) and waits until it takes connections.
    pub fn start() -> PgServer {
        let bin = bin_dir().unwrap_or_else(|| panic!("{MISSING}"));
        let ids = server_ids();
        let dir = tempfile::Builder::new()
            .prefix("billing-pg-")
            .tempdir()
            .unwrap();
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let data = dir.path().join("data");
        let out = command(&bin.join("initdb"), ids, dir.path())
            .arg("-D")
            .arg(&data)
            .args(["--auth=trust", "--username=billing", "--encoding=UTF8"])
            .args(["--no-sync", "--no-instructions"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}; {MISSING}", bin.join("initdb").display()));
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let log_path = dir.path().join("postgres.log");
        for _attempt in 0..5 {
            let port = free_port();
            let log = std::fs::File::create(&log_path).unwrap();
            if let Some((uid, gid)) = ids {
                std::os::unix::fs::chown(&log_path, Some(uid), Some(gid)).unwrap();
            }
            let child = command(&bin.join("postgres"), ids, dir.path())
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string()])
                .args(["-c", "listen_addresses=127.0.0.1"])
                .args(["-c", "unix_socket_directories="])
                .args(["-c", "synchronous_commit=on", "-c", "fsync=on"])
                .args(["-c", "max_connections=200"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut server = PgServer {
                port,
                child: Mutex::new(child),
                dir: None,
                databases: AtomicUsize::new(0),
            };
            if server.wait_ready(Duration::from_secs(30)) {
                server.dir = Some(dir);
                return server;
            }
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if !log.contains("could not bind") && !log.contains("Address already in use") {
                panic!("PostgreSQL did not start on port {port}:\n{log}");
            }
            // The port was taken between our look and the server's bind: try another.
        }
        panic!("PostgreSQL found no free port in five tries");
    }

    fn wait_ready(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.lock().unwrap().try_wait() {
                return false;
            }
            if postgres::Client::connect(&self.url("postgres"), postgres::NoTls).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://billing@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a new, empty database and returns its URL.
    pub fn fresh_database(&self) -> String {
        let n = self.databases.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{}_{n}", std::process::id());
        let mut admin = postgres::Client::connect(&self.url("postgres"), postgres::NoTls).unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        self.url(&name)
    }

    /// The pid of the `postgres` process the tests started.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        // SIGINT: PostgreSQL's fast shutdown (roll back sessions, checkpoint, exit).
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}
