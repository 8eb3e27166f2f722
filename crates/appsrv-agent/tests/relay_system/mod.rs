//! The harness of the agent's cross-process tests with the real relay: `relayd`, the agent
//! (the `appsrv-agent` binary or a program embedding the library), `sip-client` as the
//! terminal and an application server of the test's (Python from the standard library), each
//! a process of its own on loopback, each with its files in one temporary directory.
//!
//! # Where the programs come from
//!
//! Cargo hands an integration test the path of its own crate's binaries only, so `relayd`
//! and `sip-client` are looked up next to `appsrv-agent` in the same target directory;
//! before the first test uses them, [`programs`] runs `cargo build -p relayd -p sip-client`
//! once with the same profile (a no-op when they are fresh), so that a test never runs a
//! stale relay. Examples of this crate are built by `cargo test` itself, next to them in
//! `examples/`.
//!
//! # Waiting and cleaning up
//!
//! Every wait polls a condition (a metric shows, a file holds a line, a process exits)
//! against a bounded deadline and fails with the evidence: the logs of every process of the
//! test. Every process is owned by a [`Guard`] that kills it, by its own pid, when dropped;
//! a failing test keeps its directory and prints its path.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long any one step (a start, a line awaited, a terminal's run) may take.
pub const STEP: Duration = Duration::from_secs(30);
/// How long building relayd and sip-client may take.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(1200);
/// The relay's realm.
pub const REALM: &str = "relay.test";
/// The interpreter of the test's application servers (Debian's `python3`).
pub const PYTHON: &str = "/usr/bin/python3";

/// Polls `cond` every 20 ms until it holds or `timeout` passes; whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A file's text (lossy), empty when it cannot be read (yet).
pub fn read_text(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The JSON objects of a JSON-lines text (a half-written last line is skipped).
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l.trim()).ok())
        .collect()
}

/// A string field of a JSON object, `""` when absent.
pub fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

/// A loopback port free for UDP and TCP on 127.0.0.1 right now, never handed out twice in
/// this test process.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..200 {
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = tcp.local_addr().unwrap().port();
        let Ok(udp) = UdpSocket::bind((Ipv4Addr::LOCALHOST, port)) else {
            continue;
        };
        drop((tcp, udp));
        if given.lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("no free loopback port found");
}

/// The Python interpreter; fails the test naming the Debian package when it is missing.
pub fn python() -> &'static str {
    match Command::new(PYTHON).arg("--version").output() {
        Ok(out) if out.status.success() => PYTHON,
        _ => panic!(
            "{PYTHON} is missing: these tests run an application server written in Python; \
             install the Debian package `python3` (apt-get install -y python3)"
        ),
    }
}

/// A child process killed (SIGKILL, by its own pid) and reaped when dropped.
pub struct Guard {
    child: Child,
    what: String,
}

impl Guard {
    /// Spawns `cmd`, naming it `what` in failures.
    pub fn spawn(mut cmd: Command, what: &str) -> Guard {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Guard {
            child,
            what: what.to_string(),
        }
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }

    /// Sends `signal` (TERM, INT…) to it; whether kill(1) succeeded.
    pub fn signal(&self, signal: &str) -> bool {
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The write end of its stdin, when spawned with a pipe (once).
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Where the programs are.
pub struct Programs {
    /// `relayd`.
    pub relayd: PathBuf,
    /// `appsrv-agent`.
    pub agent: PathBuf,
    /// `sip-client`.
    pub client: PathBuf,
    /// This crate's examples.
    pub examples: PathBuf,
}

/// The programs, relayd and sip-client built first if needed (module documentation).
pub fn programs() -> &'static Programs {
    static PROGRAMS: OnceLock<Result<Programs, String>> = OnceLock::new();
    match PROGRAMS.get_or_init(locate) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// Runs `cargo build ARGS --profile <the tests' profile>` on the workspace, bounded by
/// [`BUILD_TIMEOUT`]; the error says what cargo said.
fn cargo_build(args: &[&str], profile: &str) -> Result<(), String> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let what = format!("cargo build {} --profile {profile}", args.join(" "));
    let log = std::env::temp_dir().join(format!(
        "appsrv-tests-build-{}-{}.log",
        std::process::id(),
        args.join("_").replace(['-', ' '], "")
    ));
    let out = File::create(&log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(&workspace)
        .args(args)
        .args(["--profile", profile])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let mut build = Guard::spawn(cmd, &what);
    let status = build.wait_timeout(BUILD_TIMEOUT);
    let output = read_text(&log);
    let _ = std::fs::remove_file(&log);
    match status {
        None => Err(format!(
            "{what} took longer than {BUILD_TIMEOUT:?}; run it first"
        )),
        Some(s) if !s.success() => Err(format!("{what} failed ({s}):\n{}", tail(&output, 40))),
        Some(_) => Ok(()),
    }
}

/// The profile the tests were built with (`dev`, `release`…), from where the agent is.
fn profile_of(dir: &Path) -> String {
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(other) => other.to_string(),
    }
}

fn locate() -> Result<Programs, String> {
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_appsrv-agent"));
    let dir = agent
        .parent()
        .ok_or("CARGO_BIN_EXE_appsrv-agent has no directory")?
        .to_path_buf();
    cargo_build(&["-p", "relayd", "-p", "sip-client"], &profile_of(&dir))?;
    let exe = |name: &str| dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let programs = Programs {
        relayd: exe("relayd"),
        agent,
        client: exe("sip-client"),
        examples: dir.join("examples"),
    };
    for path in [&programs.relayd, &programs.client] {
        if !path.exists() {
            return Err(format!("{} is missing after the build", path.display()));
        }
    }
    Ok(programs)
}

/// This crate's example `name`, built first if needed (a no-op when `cargo test` has just
/// built it).
pub fn example(name: &str) -> PathBuf {
    let programs = programs();
    let dir = programs.agent.parent().unwrap_or(Path::new("."));
    if let Err(e) = cargo_build(&["-p", "appsrv-agent", "--example", name], &profile_of(dir)) {
        panic!("{e}");
    }
    let path = programs
        .examples
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing after the build",
        path.display()
    );
    path
}

/// A test's temporary directory: removed when dropped, kept (and its path printed) when
/// the test is failing.
pub struct TestDir(Option<tempfile::TempDir>);

impl TestDir {
    /// A fresh directory.
    pub fn new(prefix: &str) -> TestDir {
        TestDir(Some(
            tempfile::Builder::new().prefix(prefix).tempdir().unwrap(),
        ))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.0
            .as_ref()
            .map_or(Path::new(""), tempfile::TempDir::path)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            if std::thread::panicking() {
                eprintln!("test files kept in {}", dir.keep().display());
            }
        }
    }
}

/// One test's world: its directory, relayd, and every process the test started, dropped
/// (killed) before the directory.
pub struct World {
    /// The relay's SIP port (UDP and TCP).
    pub port: u16,
    /// The relay's metrics port.
    pub metrics_port: u16,
    /// The relay's configuration file.
    pub config: PathBuf,
    procs: Vec<(String, Guard)>,
    logs: Mutex<Vec<(String, PathBuf)>>,
    dir: TestDir,
}

impl Drop for World {
    fn drop(&mut self) {
        // The processes go before the directory they write in.
        while let Some((_, guard)) = self.procs.pop() {
            drop(guard);
        }
    }
}

impl World {
    /// Starts relayd with the services `services` (strategy `first`), subscriber alice
    /// (password `alice-secret`, every one of them) and application-server account as1
    /// (password `as1-secret`); returns once its metrics answer.
    pub fn start(services: &[&str]) -> World {
        World::start_with(services, "")
    }

    /// The same, with `extra` TOML tables in relayd's configuration (`[session]`…).
    pub fn start_with(services: &[&str], extra: &str) -> World {
        let programs = programs();
        let dir = TestDir::new("appsrv-relay-");
        let port = free_port();
        let metrics_port = free_port();
        let config = dir.path().join("relayd.toml");
        let mut toml = format!(
            "[listen]\nudp = \"127.0.0.1:{port}\"\ntcp = \"127.0.0.1:{port}\"\n\n\
             [relay]\nrealm = \"{REALM}\"\n\n\
             [storage]\ndata_dir = {data:?}\n\n\
             [log]\nlevel = \"info,relayd=debug\"\n\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
             [registrar]\nallowed_contact_nets = [\"127.0.0.0/8\"]\n\n\
             [directory]\nprobe_interval_secs = 3600\n\n\
             [[users]]\nname = \"alice\"\npassword = \"alice-secret\"\nplan = \"basic\"\n\
             services = [\"*\"]\n\n\
             [[server_accounts]]\nname = \"as1\"\npassword = \"as1-secret\"\nservices = [\"*\"]\n\n\
             [[tariffs]]\nname = \"flat\"\nsetup = 10\nrate = 60\nperiod_seconds = 60\n\
             increment = \"60/60\"\nfree_seconds = 0\ncurrency = \"EUR\"\n\n",
            data = dir.path().join("relayd-data"),
        );
        for s in services {
            let _ = write!(
                toml,
                "[[services]]\nname = \"{s}\"\nstrategy = \"first\"\n\n"
            );
        }
        toml.push_str(extra);
        std::fs::write(&config, toml).unwrap();
        let log = dir.path().join("relayd.log");
        let mut cmd = Command::new(&programs.relayd);
        cmd.arg("--config")
            .arg(&config)
            .arg("run")
            .env("RUST_LOG", "info,relayd=debug")
            .env("NO_COLOR", "1")
            .env_remove("RELAYD_CONFIG")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        let mut world = World {
            port,
            metrics_port,
            config,
            procs: Vec::new(),
            logs: Mutex::new(vec![("relayd".to_string(), log)]),
            dir,
        };
        world
            .procs
            .push(("relayd".into(), Guard::spawn(cmd, "relayd")));
        let ready = wait_until(STEP, || {
            if let Some(status) = world.procs[0].1.try_wait() {
                panic!("relayd exited at start ({status})\n{}", world.report());
            }
            world.metrics().is_some()
        });
        assert!(ready, "relayd never served its metrics\n{}", world.report());
        world
    }

    /// The test's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Adds a file to the evidence of [`World::report`].
    pub fn add_log(&self, name: &str, path: PathBuf) {
        self.logs.lock().unwrap().push((name.to_string(), path));
    }

    /// Starts a process owned by this world (killed when the world is dropped), its
    /// stdout and stderr in files `NAME.out` and `NAME.err` of the directory, stdin a pipe
    /// when `stdin_pipe`. Returns its index for [`World::proc`].
    pub fn spawn(&mut self, name: &str, mut cmd: Command, stdin_pipe: bool) -> usize {
        let out = self.dir().join(format!("{name}.out"));
        let err = self.dir().join(format!("{name}.err"));
        cmd.current_dir(self.dir())
            .stdin(if stdin_pipe {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap());
        self.add_log(&format!("{name} stdout"), out);
        self.add_log(&format!("{name} stderr"), err);
        self.procs.push((name.to_string(), Guard::spawn(cmd, name)));
        self.procs.len() - 1
    }

    /// The process at `index`.
    pub fn proc(&mut self, index: usize) -> &mut Guard {
        &mut self.procs[index].1
    }

    /// What process `name` wrote to stdout so far.
    pub fn stdout_of(&self, name: &str) -> String {
        read_text(&self.dir().join(format!("{name}.out")))
    }

    /// Waits (bounded) for process `index` to exit; its status.
    pub fn wait_exit(&mut self, index: usize) -> ExitStatus {
        let name = self.procs[index].0.clone();
        match self.procs[index].1.wait_timeout(STEP) {
            Some(status) => status,
            None => panic!("{name} did not exit within {STEP:?}\n{}", self.report()),
        }
    }

    /// Everything worth reading when a test fails: the end of every log.
    pub fn report(&self) -> String {
        let mut s = String::new();
        for (name, path) in self.logs.lock().unwrap().iter() {
            let _ = writeln!(s, "--- {name} (end):\n{}", tail(&read_text(path), 40));
        }
        s
    }

    /// The relay's metrics text, `None` when it does not answer.
    pub fn metrics(&self) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.metrics_port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_string())
    }

    /// Waits (bounded) until the relay lists `server` as up for `service`.
    pub fn wait_server_up(&self, service: &str, server: &str) {
        let line = format!("relayd_server_up{{service=\"{service}\",server=\"{server}\"}} 1");
        let up = wait_until(STEP, || {
            self.metrics()
                .is_some_and(|m| m.lines().any(|l| l.trim() == line))
        });
        assert!(
            up,
            "the relay never listed {server} as up for {service}\n{}",
            self.report()
        );
    }

    /// The relay's SIP URI.
    pub fn relay_uri(&self) -> String {
        format!("sip:127.0.0.1:{}", self.port)
    }

    /// `relayd billing export --format jsonl --records KIND` (`sessions`, `charges`).
    pub fn export(&self, records: &str) -> Vec<Value> {
        let mut cmd = Command::new(&programs().relayd);
        cmd.arg("--config")
            .arg(&self.config)
            .args([
                "billing",
                "export",
                "--format",
                "jsonl",
                "--records",
                records,
            ])
            .env_remove("RELAYD_CONFIG")
            .env_remove("RUST_LOG")
            .current_dir(self.dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out: Output = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "relayd billing export failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
            .collect()
    }

    /// Waits (bounded) until `records` holds one for which `pick` holds; returns them all.
    pub fn wait_records(
        &self,
        records: &str,
        n: usize,
        pick: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let mut found = Vec::new();
        let done = wait_until(STEP, || {
            found = self
                .export(records)
                .into_iter()
                .filter(|r| pick(r))
                .collect();
            found.len() >= n
        });
        assert!(
            done,
            "expected {n} {records} record(s), found {}: {found:#?}\n{}",
            found.len(),
            self.report()
        );
        found
    }

    /// The configuration of an agent for account as1 against this relay, on SIP port
    /// `sip_port` and data port `data_port`, with `services` (TOML `[[services]]` tables)
    /// and `extra` TOML; byte-block charging off.
    pub fn agent_toml(&self, sip_port: u16, data_port: u16, services: &str, extra: &str) -> String {
        format!(
            "[relay]\nuri = \"{relay}\"\ndomain = \"{REALM}\"\naccount = \"as1\"\n\
             password = \"as1-secret\"\nexpires = 120\n\n\
             [sip]\nlisten = \"127.0.0.1:{sip_port}\"\n\n\
             [data]\nlisten = \"127.0.0.1:{data_port}\"\n\n\
             {services}\n\
             [billing]\nbytes_per_charge = 0\ncurrency = \"EUR\"\nretry_initial_ms = 200\n\n\
             {extra}\n\
             [log]\nlevel = \"info,appsrv_agent=debug\"\n",
            relay = self.relay_uri(),
        )
    }

    /// A `sip-client` command for alice against this relay, its JSON events in
    /// `NAME.events`.
    pub fn client_cmd(&self, name: &str, args: &[&str]) -> Command {
        let empty = self.dir().join("sip-client.toml");
        if !empty.exists() {
            std::fs::write(&empty, "").unwrap();
        }
        let events = self.dir().join(format!("{name}.events"));
        self.add_log(&format!("{name} events"), events.clone());
        let mut cmd = Command::new(&programs().client);
        cmd.args([
            "-u",
            "alice",
            "--relay",
            &self.relay_uri(),
            "--domain",
            REALM,
        ])
        .arg("--events-file")
        .arg(&events)
        .args(args)
        .env("SIP_CLIENT_PASSWORD", "alice-secret")
        .env("SIP_CLIENT_CONFIG", &empty)
        .env_remove("SIP_CLIENT_USER")
        .env_remove("SIP_CLIENT_RELAY")
        .env_remove("SIP_CLIENT_DOMAIN")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1");
        cmd
    }

    /// The JSON events `sip-client` NAME wrote so far.
    pub fn client_events(&self, name: &str) -> Vec<Value> {
        json_lines(&read_text(&self.dir().join(format!("{name}.events"))))
    }

    /// Waits (bounded) for an event of `sip-client` NAME named `event` for which `also`
    /// holds.
    pub fn wait_client_event(
        &self,
        name: &str,
        event: &str,
        also: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut found = None;
        wait_until(STEP, || {
            found = self
                .client_events(name)
                .into_iter()
                .find(|e| text(e, "event") == event && also(e));
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "sip-client {name}: no `{event}` event within {STEP:?}\n{}",
                self.report()
            )
        })
    }

    /// Waits (bounded) for a JSON line on the stdout of process NAME for which `pick` holds.
    pub fn wait_json_line(&self, name: &str, pick: impl Fn(&Value) -> bool) -> Value {
        let mut found = None;
        wait_until(STEP, || {
            found = json_lines(&self.stdout_of(name))
                .into_iter()
                .find(|v| pick(v));
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "{name} printed no expected JSON line within {STEP:?}\n{}",
                self.report()
            )
        })
    }
}
